//! The IO side of pod volumes: fetch sources, mount tmpfs, write files,
//! resolve volumeMounts to host paths, and tear it all down.
//!
//! Fail-static: when a ConfigMap or Secret cannot be fetched (masters
//! unreachable, not "not found"), a volume written earlier is kept as it
//! is, so containers restart while the masters are away; so is the host
//! path a claim volume resolved to earlier (its `capstan.io~claim` record).

use std::collections::HashMap;
use std::ffi::CString;
use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{
    bound_volumes, check_name, claim_of, plan_volume, plugin_of, sources_of, sub_path, write_atomic, HostPathType,
    PathCheck, SourceRef, Sources, VolumeError, VolumePlan, DATA_LINK, PLUGIN_CLAIM,
};
use crate::agent::NodeInfo;
use crate::runtime::Mount;

/// A volume ready to be mounted into containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The host directory (or file, for a hostPath) to mount.
    pub path: PathBuf,
    /// Containers see it read-only (configMap, secret, downwardAPI,
    /// projected always; a claim volume when it says `readOnly`).
    pub read_only: bool,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> VolumeError + 'a {
    move |e| VolumeError::Io { op, path: path.to_path_buf(), message: e.to_string() }
}

/// `<data-dir>/pods/<uid>/volumes`.
pub fn volumes_dir(data_dir: &Path, uid: &str) -> PathBuf {
    data_dir.join("pods").join(uid).join("volumes")
}

fn check_uid(uid: &str) -> Result<(), VolumeError> {
    check_name(uid).map_err(|_| VolumeError::Io {
        op: "pod uid",
        path: PathBuf::from(uid),
        message: "not usable as a directory name".into(),
    })
}

/// Makes every volume of `pod` ready under `data_dir`: fetches the
/// ConfigMaps, Secrets and claims it reads with `fetch(source)`
/// (`Ok(None)` = not found, `Err` = could not ask), then the
/// PersistentVolumes of the bound claims, mounts tmpfs where the volume
/// needs one and (re)writes file sets that changed. Idempotent; call
/// before every container start so updates reach restarted containers.
pub async fn prepare<F, Fut>(
    pod: &Value,
    data_dir: &Path,
    node: &NodeInfo,
    fetch: F,
) -> Result<HashMap<String, Prepared>, VolumeError>
where
    F: Fn(SourceRef) -> Fut,
    Fut: Future<Output = Result<Option<Value>, String>>,
{
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
    check_uid(uid)?;
    let mut sources = Sources::new();
    for s in sources_of(pod) {
        let got = fetch(s.clone()).await;
        sources.insert(s, got);
    }
    // A claim names its volume only once fetched.
    for s in bound_volumes(&sources) {
        let got = fetch(s.clone()).await;
        sources.insert(s, got);
    }
    let mut work = Vec::new();
    for v in pod["spec"]["volumes"].as_array().into_iter().flatten() {
        let name = v["name"].as_str().unwrap_or_default().to_string();
        let read_only = claim_of(pod, v).is_some_and(|c| c.read_only);
        work.push((name, plugin_of(v), read_only, plan_volume(pod, v, &sources, node)));
    }
    let root = volumes_dir(data_dir, uid);
    tokio::task::spawn_blocking(move || {
        // Every volume must be possible before any is touched.
        let mut plans = Vec::new();
        for (name, plugin, read_only, plan) in work {
            match plan {
                Ok(plan) => plans.push((name, Ok(plan))),
                Err(e @ VolumeError::Unavailable { .. }) => {
                    let Some(kept) = kept(&root, &name, plugin, read_only) else { return Err(e) };
                    tracing::warn!(volume = %name, error = %e, "keeping the volume's last contents");
                    plans.push((name, Err(kept)));
                }
                Err(e) => return Err(e),
            }
        }
        let mut out = HashMap::new();
        for (name, plan) in plans {
            let ready = match plan {
                Ok(plan) => materialize(&root, &name, &plan)?,
                Err(kept) => kept,
            };
            out.insert(name, ready);
        }
        Ok(out)
    })
    .await
    .map_err(|e| VolumeError::Io { op: "prepare volumes", path: PathBuf::new(), message: e.to_string() })?
}

/// What an earlier `prepare` made of volume `name`, for when its sources
/// cannot be fetched now: a file set's directory (once written), or the
/// host path a claim volume resolved to (its record).
fn kept(root: &Path, name: &str, plugin: Option<&'static str>, claim_read_only: bool) -> Option<Prepared> {
    if let Some(plugin) = plugin {
        let dir = root.join(plugin).join(name);
        fs::symlink_metadata(dir.join(DATA_LINK)).ok()?;
        return Some(Prepared { path: dir, read_only: true });
    }
    let path = fs::read_link(root.join(PLUGIN_CLAIM).join(name)).ok()?;
    Some(Prepared { path, read_only: claim_read_only })
}

/// A local-path volume's directory: made once, mode 0777 (not subject to
/// the umask); an existing one is left as its users made it.
fn provisioned_dir(path: &Path) -> Result<(), VolumeError> {
    if fs::symlink_metadata(path).is_ok() {
        return host_path(path, HostPathType::Directory);
    }
    if let Some(parent) = path.parent() {
        mkdir(parent, 0o755)?;
    }
    fs::DirBuilder::new().mode(0o777).create(path).map_err(io_err("create directory", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o777)).map_err(io_err("chmod", path))
}

fn mkdir(path: &Path, mode: u32) -> Result<(), VolumeError> {
    fs::DirBuilder::new().recursive(true).mode(mode).create(path).map_err(io_err("create directory", path))
}

/// Makes one planned volume real under `root` (the pod's volumes dir).
pub fn materialize(root: &Path, name: &str, plan: &VolumePlan) -> Result<Prepared, VolumeError> {
    match plan {
        VolumePlan::HostPath { path, kind } => {
            host_path(path, *kind)?;
            Ok(Prepared { path: path.clone(), read_only: false })
        }
        VolumePlan::Persistent { path, check, read_only } => {
            match check {
                PathCheck::HostPath(kind) => host_path(path, *kind)?,
                PathCheck::Exists => {
                    fs::metadata(path).map_err(io_err("local volume", path))?;
                }
                PathCheck::Provisioned => provisioned_dir(path)?,
            }
            record_claim(root, name, path)?;
            Ok(Prepared { path: path.clone(), read_only: *read_only })
        }
        VolumePlan::EmptyDir { memory, size_limit, gid } => {
            let dir = root.join(super::PLUGIN_EMPTY_DIR).join(name);
            let fresh = fs::symlink_metadata(&dir).is_err();
            mkdir(root, 0o750)?;
            mkdir(&dir, 0o777)?;
            if *memory && !is_mount_point(&dir) {
                mount_tmpfs(&dir, *size_limit)?;
            }
            if let Some(gid) = gid {
                std::os::unix::fs::chown(&dir, None, Some(*gid)).map_err(io_err("chown", &dir))?;
            }
            if fresh || *memory || gid.is_some() {
                // Writable by any user the container runs as, as the kubelet makes it.
                let mode = if gid.is_some() { 0o2777 } else { 0o777 };
                fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &dir))?;
            }
            Ok(Prepared { path: dir, read_only: false })
        }
        VolumePlan::Files { plugin, tmpfs, files, gid } => {
            let dir = root.join(plugin).join(name);
            mkdir(root, 0o750)?;
            mkdir(&dir, 0o755)?;
            if *tmpfs && !is_mount_point(&dir) {
                mount_tmpfs(&dir, None)?;
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", &dir))?;
            }
            if let Some(gid) = gid {
                std::os::unix::fs::chown(&dir, None, Some(*gid)).map_err(io_err("chown", &dir))?;
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o2755)).map_err(io_err("chmod", &dir))?;
            }
            write_atomic(&dir, files, *gid).map_err(io_err("write volume", &dir))?;
            Ok(Prepared { path: dir, read_only: true })
        }
    }
}

/// `<volumes>/capstan.io~claim/<name>` -> `path`: what claim volume `name`
/// resolved to (see `kept` and [`claimed_paths`]). Only a symlink: the
/// pod's cleanup removes it, never what it points to.
fn record_claim(root: &Path, name: &str, path: &Path) -> Result<(), VolumeError> {
    let dir = root.join(PLUGIN_CLAIM);
    mkdir(root, 0o750)?;
    mkdir(&dir, 0o750)?;
    let link = dir.join(name);
    if fs::read_link(&link).is_ok_and(|to| to == path) {
        return Ok(());
    }
    match fs::remove_file(&link) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove", &link)(e)),
        _ => {}
    }
    symlink(path, &link).map_err(io_err("record the claim's path", &link))
}

/// The host paths the claim volumes of every pod with volumes under
/// `data_dir` resolved to (their records): what the local-path reclaimer
/// must leave alone.
pub fn claimed_paths(data_dir: &Path) -> Vec<PathBuf> {
    let links = |uid: String| fs::read_dir(volumes_dir(data_dir, &uid).join(PLUGIN_CLAIM)).into_iter().flatten();
    pods_with_volumes(data_dir).into_iter().flat_map(links).filter_map(|e| fs::read_link(e.ok()?.path()).ok()).collect()
}

/// hostPath's `type` checks, creating what the `...OrCreate` types may.
fn host_path(path: &Path, kind: HostPathType) -> Result<(), VolumeError> {
    let not_a = |expected| VolumeError::HostPathType { path: path.display().to_string(), expected };
    match kind {
        HostPathType::DirectoryOrCreate if fs::metadata(path).is_err() => mkdir(path, 0o755)?,
        HostPathType::FileOrCreate if fs::metadata(path).is_err() => {
            // Like the kubelet: the file, not its parent directories.
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(path)
                .map_err(io_err("create file", path))?;
        }
        _ => {}
    }
    let ft = |path: &Path| fs::metadata(path).map(|m| m.file_type()).ok();
    let ok = match kind {
        HostPathType::Unset => return Ok(()),
        HostPathType::DirectoryOrCreate | HostPathType::Directory => ft(path).is_some_and(|t| t.is_dir()),
        HostPathType::FileOrCreate | HostPathType::File => ft(path).is_some_and(|t| t.is_file()),
        HostPathType::Socket => ft(path).is_some_and(|t| t.is_socket()),
        HostPathType::CharDevice => ft(path).is_some_and(|t| t.is_char_device()),
        HostPathType::BlockDevice => ft(path).is_some_and(|t| t.is_block_device()),
    };
    if ok {
        return Ok(());
    }
    Err(not_a(match kind {
        HostPathType::DirectoryOrCreate | HostPathType::Directory => "directory",
        HostPathType::FileOrCreate | HostPathType::File => "file",
        HostPathType::Socket => "socket file",
        HostPathType::CharDevice => "character device",
        _ => "block device",
    }))
}

fn cstr(path: &Path) -> Result<CString, VolumeError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| VolumeError::Io {
        op: "path",
        path: path.to_path_buf(),
        message: "contains a NUL byte".into(),
    })
}

fn mount_tmpfs(dir: &Path, size: Option<u64>) -> Result<(), VolumeError> {
    let target = cstr(dir)?;
    let mut opts = "mode=0755".to_string();
    if let Some(size) = size {
        opts.push_str(&format!(",size={size}"));
    }
    let opts = CString::new(opts).unwrap_or_default();
    let tmpfs = c"tmpfs";
    // SAFETY: plain syscall; every pointer is a valid NUL-terminated string.
    let rc = unsafe {
        libc::mount(
            tmpfs.as_ptr(),
            target.as_ptr(),
            tmpfs.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io_err("mount tmpfs on", dir)(io::Error::last_os_error()));
    }
    Ok(())
}

/// Whether `path` is the root of a mount (it sits on another device than
/// its parent; every tmpfs has its own).
pub fn is_mount_point(path: &Path) -> bool {
    let dev = |p: &Path| fs::symlink_metadata(p).map(|m| m.dev()).ok();
    match (dev(path), path.parent().and_then(dev)) {
        (Some(a), Some(b)) => a != b,
        _ => false,
    }
}

/// Mount points at or below `dir` in this process' mount namespace, from
/// /proc/self/mountinfo, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let dir = fs::canonicalize(dir).unwrap_or_else(|_| std::path::absolute(dir).unwrap_or_else(|_| dir.into()));
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut out: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(&dir))
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    out.dedup();
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).filter(|o| b[i] == b'\\' && o.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(o) => {
                out.push(o.iter().fold(0u8, |acc, c| acc.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The runtime mounts for one container's `volumeMounts`; `env` (the
/// container's resolved environment) expands `subPathExpr`. A subPath that
/// does not exist yet is created as a directory with the volume root's
/// mode; one that leads (through symlinks) out of its volume is refused.
pub fn mounts_for(
    container: &Value,
    env: &[(String, String)],
    prepared: &HashMap<String, Prepared>,
) -> Result<Vec<Mount>, VolumeError> {
    let cname = container["name"].as_str().unwrap_or_default();
    let mut out = Vec::new();
    for m in container["volumeMounts"].as_array().into_iter().flatten() {
        let name = m["name"].as_str().unwrap_or_default();
        let vol = prepared
            .get(name)
            .ok_or_else(|| VolumeError::UnknownVolume { volume: name.into(), container: cname.into() })?;
        let target = m["mountPath"].as_str().filter(|p| !p.is_empty()).ok_or_else(|| VolumeError::Invalid {
            volume: name.into(),
            message: format!("a volumeMount of container {cname:?} has no mountPath"),
        })?;
        let host_path = match sub_path(m, env)? {
            None => vol.path.clone(),
            Some(sub) => resolve_sub_path(name, &vol.path, &sub)?,
        };
        out.push(Mount {
            host_path,
            container_path: PathBuf::from(target),
            read_only: vol.read_only || m["readOnly"].as_bool().unwrap_or(false),
        });
    }
    Ok(out)
}

fn resolve_sub_path(volume: &str, root: &Path, sub: &Path) -> Result<PathBuf, VolumeError> {
    let escapes = |p: &Path| VolumeError::SubPath {
        volume: volume.into(),
        sub_path: sub.display().to_string(),
        reason: format!("resolves to {} outside the volume", p.display()),
    };
    let root_real = fs::canonicalize(root).map_err(io_err("resolve", root))?;
    let full = root.join(sub);
    // Check the part that exists before creating anything below it.
    let mut existing = full.clone();
    while fs::symlink_metadata(&existing).is_err() && existing.pop() {}
    let real = fs::canonicalize(&existing).map_err(io_err("resolve", &existing))?;
    if !real.starts_with(&root_real) {
        return Err(escapes(&real));
    }
    if existing != full {
        let mode = fs::metadata(root).map_err(io_err("stat", root))?.permissions().mode() & 0o7777;
        let missing = full.strip_prefix(&existing).unwrap_or(sub);
        let mut at = real.clone();
        for c in missing.components() {
            at.push(c);
            match fs::DirBuilder::new().mode(mode).create(&at) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(io_err("create subPath", &at)(e)),
                _ => fs::set_permissions(&at, fs::Permissions::from_mode(mode)).map_err(io_err("chmod", &at))?,
            }
        }
    }
    let real = fs::canonicalize(&full).map_err(io_err("resolve", &full))?;
    if !real.starts_with(&root_real) {
        return Err(escapes(&real));
    }
    Ok(real)
}

/// Unmounts (lazily) and removes everything of pod `uid`'s volumes.
/// Idempotent. Removes nothing while a mount is left below, so no tmpfs
/// (nor a host directory mounted there by mistake) is ever emptied by it.
pub fn cleanup(data_dir: &Path, uid: &str) -> Result<(), VolumeError> {
    check_uid(uid)?;
    let dir = volumes_dir(data_dir, uid);
    if fs::symlink_metadata(&dir).is_ok() {
        for _ in 0..8 {
            let mounts = mounts_under(&dir);
            if mounts.is_empty() {
                break;
            }
            for m in mounts {
                let c = cstr(&m)?;
                // SAFETY: plain syscall on a valid NUL-terminated string.
                if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                    let err = io::Error::last_os_error();
                    if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
                        return Err(io_err("unmount", &m)(err));
                    }
                }
            }
        }
        if let Some(m) = mounts_under(&dir).first() {
            return Err(VolumeError::Io { op: "unmount", path: m.clone(), message: "still mounted".into() });
        }
        match fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err("remove", &dir)(e)),
            _ => {}
        }
    }
    // The pod's own directory, if nothing else lives there.
    if let Some(pod_dir) = dir.parent() {
        let _ = fs::remove_dir(pod_dir);
    }
    Ok(())
}

/// Uids of pods that have a volumes directory under `data_dir` (for the
/// agent to clean up after pods it no longer knows).
pub fn pods_with_volumes(data_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(data_dir.join("pods")) else { return vec![] };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("volumes").is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}
