//! Kubernetes' AtomicWriter layout, so a container never sees half of an
//! update:
//!
//! ```text
//! <dir>/..2026_01_02_03_04_05.123456789/<the files>   one directory per version
//! <dir>/..data -> ..2026_01_02_03_04_05.123456789      switched by rename(2)
//! <dir>/<top-level name> -> ..data/<top-level name>    what users open
//! ```
//!
//! A new version is written beside the current one, then `..data_tmp` is
//! pointed at it and renamed over `..data` (atomic); links for new
//! top-level names are added, stale ones and the old version removed. An
//! unchanged file set (same paths, bytes and modes) writes nothing.
//! Names starting with `..` belong to the writer (the planner refuses them).

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{symlink, DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::FileEntry;

/// The symlink naming the current version.
pub const DATA_LINK: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

/// Makes `dir` (which must exist) hold exactly `files`, owned by group
/// `gid` when given (directories then setgid). Returns whether anything
/// changed.
pub fn write_atomic(dir: &Path, files: &[FileEntry], gid: Option<u32>) -> io::Result<bool> {
    let current = fs::read_link(dir.join(DATA_LINK)).ok();
    if let Some(cur) = &current {
        if same_files(&dir.join(cur), files, gid)? {
            link_top_level(dir, files)?;
            return Ok(false);
        }
    }
    let version = new_version_dir(dir)?;
    let written = write_version(&dir.join(&version), files, gid);
    if let Err(e) = written {
        let _ = fs::remove_dir_all(dir.join(&version));
        return Err(e);
    }
    let tmp = dir.join(DATA_TMP);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    symlink(&version, &tmp)?;
    fs::rename(&tmp, dir.join(DATA_LINK))?;
    link_top_level(dir, files)?;
    // Old versions (the previous one, and any a crash left behind) and links to names no longer there.
    let tops = top_level(files);
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let kind = entry.file_type()?;
        if name.starts_with("..") {
            if kind.is_dir() && name != version.to_string_lossy() {
                fs::remove_dir_all(entry.path())?;
            }
        } else if kind.is_symlink() && !tops.contains(&name) {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(true)
}

fn top_level(files: &[FileEntry]) -> BTreeSet<String> {
    files.iter().map(|f| f.path.split('/').next().unwrap_or_default().to_string()).collect()
}

/// `<name> -> ..data/<name>` for each top-level name (kept if present).
fn link_top_level(dir: &Path, files: &[FileEntry]) -> io::Result<()> {
    for top in top_level(files) {
        let link = dir.join(&top);
        match fs::symlink_metadata(&link) {
            Ok(m) if m.file_type().is_symlink() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not the writer's link", link.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => symlink(Path::new(DATA_LINK).join(&top), &link)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A fresh `..<UTC timestamp>.<random>` directory; returns its name.
fn new_version_dir(dir: &Path) -> io::Result<PathBuf> {
    let stamp = chrono::Utc::now().format("..%Y_%m_%d_%H_%M_%S");
    loop {
        let name = PathBuf::from(format!("{stamp}.{:09}", rand::random::<u32>() % 1_000_000_000));
        match fs::DirBuilder::new().mode(0o755).create(dir.join(&name)) {
            Ok(()) => {
                fs::set_permissions(dir.join(&name), fs::Permissions::from_mode(0o755))?;
                return Ok(name);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
}

fn write_version(root: &Path, files: &[FileEntry], gid: Option<u32>) -> io::Result<()> {
    let mut dirs = vec![root.to_path_buf()];
    for f in files {
        let path = root.join(&f.path);
        if let Some(parent) = path.parent() {
            fs::DirBuilder::new().recursive(true).mode(0o755).create(parent)?;
            dirs.extend(parent.ancestors().take_while(|d| *d != root).map(Path::to_path_buf));
        }
        let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(f.mode).open(&path)?;
        file.write_all(&f.bytes)?;
        // The umask may have cut bits off the creation mode.
        file.set_permissions(fs::Permissions::from_mode(f.mode))?;
        if gid.is_some() {
            std::os::unix::fs::fchown(&file, None, gid)?;
        }
    }
    if let Some(gid) = gid {
        for d in dirs {
            std::os::unix::fs::chown(&d, None, Some(gid))?;
            fs::set_permissions(&d, fs::Permissions::from_mode(0o2755))?;
        }
    }
    Ok(())
}

/// Whether the version at `root` holds exactly `files` (owned by `gid`).
fn same_files(root: &Path, files: &[FileEntry], gid: Option<u32>) -> io::Result<bool> {
    let mut found = Vec::new();
    if let Err(e) = collect(root, "", &mut found) {
        return if e.kind() == io::ErrorKind::NotFound { Ok(false) } else { Err(e) };
    }
    if found.len() != files.len() {
        return Ok(false);
    }
    for f in files {
        if !found.contains(&f.path) {
            return Ok(false);
        }
        let path = root.join(&f.path);
        let meta = fs::metadata(&path)?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode != f.mode || gid.is_some_and(|g| meta.gid() != g) || fs::read(&path)? != f.bytes {
            return Ok(false);
        }
    }
    Ok(true)
}

fn collect(dir: &Path, prefix: &str, out: &mut Vec<String>) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if entry.file_type()?.is_dir() {
            collect(&entry.path(), &format!("{name}/"), out)?;
        } else {
            out.push(name);
        }
    }
    Ok(())
}
