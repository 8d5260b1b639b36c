//! Named network namespaces as bind-mounted nsfs files, like `ip netns add`,
//! but under a directory of our choosing (`<data-dir>/netns/<name>`) so that
//! several agents on one host, and tests, never share `/var/run/netns`.
//!
//! A network namespace lives as long as something references it. A thread
//! unshares a fresh one and bind-mounts its `/proc/thread-self/ns/net` onto
//! an empty file; the mount is the reference, so the thread can exit and
//! the namespace stays until [`remove`] unmounts the file. Anything that can
//! open the path (`nsenter --net=<path>`, runc's `path` for the network
//! namespace, the CNI plugins' `CNI_NETNS`) enters it.
//!
//! What lives here: the syscalls (`unshare`, `mount`, `umount2`) and the
//! file handling. No knowledge of CNI or containers.
//!
//! Note for adoption after a reboot: the files under a persistent data
//! directory survive a reboot while their mounts do not; [`is_mounted`]
//! tells a live namespace from such a leftover.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("invalid network namespace name {0:?} (want [A-Za-z0-9._-], at most 200 bytes, not . or ..)")]
    InvalidName(String),
    #[error("network namespace {0} already exists")]
    Exists(PathBuf),
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> NetnsError + 'a {
    move |source| NetnsError::Io { op, path: path.to_path_buf(), source }
}

/// Names become file names; refusing separators and dot-names keeps a name
/// from escaping the directory. Sandbox ids (hex) and pod names pass.
pub fn validate_name(name: &str) -> Result<(), NetnsError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NetnsError::InvalidName(name.to_string()))
    }
}

fn cstr(path: &Path) -> Result<CString, NetnsError> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| NetnsError::Io {
        op: "path",
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"),
    })
}

/// Creates the network namespace `<dir>/<name>` and returns its path.
/// Fails with [`NetnsError::Exists`] if the file is already there (a live
/// namespace or a leftover: the caller decides, e.g. with [`is_mounted`]).
pub fn create(dir: &Path, name: &str) -> Result<PathBuf, NetnsError> {
    validate_name(name)?;
    std::fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
    make_shared_mount_point(dir)?;
    let path = dir.join(name);
    // O_EXCL: two creators of one name must not both believe they own it.
    match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(NetnsError::Exists(path)),
        Err(e) => return Err(io_err("create file", &path)(e)),
    }
    let target = cstr(&path)?;
    // unshare(CLONE_NEWNET) changes the namespace of the calling thread
    // only, so a short-lived thread does it and every other thread of the
    // agent (tokio workers included) stays in the host namespace.
    let result = std::thread::Builder::new()
        .name("netns-create".into())
        .spawn(move || -> io::Result<()> {
            // SAFETY: plain syscalls on valid NUL-terminated strings.
            unsafe {
                if libc::unshare(libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                let src = c"/proc/thread-self/ns/net";
                if libc::mount(src.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        })
        .map_err(io_err("spawn thread for", &path))?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")));
    if let Err(source) = result {
        let _ = std::fs::remove_file(&path);
        return Err(NetnsError::Io { op: "unshare and bind-mount network namespace on", path, source });
    }
    Ok(path)
}

/// As iproute2 does for /var/run/netns: make `dir` a mount point with shared
/// propagation, so that namespace mounts made here reach mount namespaces
/// cloned from ours (containerd's, a shim's), and above all so that
/// unmounting one here unmounts it there too, letting the kernel free the
/// namespace instead of it lingering in another mount namespace.
fn make_shared_mount_point(dir: &Path) -> Result<(), NetnsError> {
    let c = cstr(dir)?;
    let none = c"none";
    let mut bound = false;
    loop {
        // SAFETY: plain syscalls on valid NUL-terminated strings.
        let rc = unsafe {
            libc::mount(c"".as_ptr(), c.as_ptr(), none.as_ptr(), libc::MS_SHARED | libc::MS_REC, std::ptr::null())
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // EINVAL: not a mount point yet; bind it onto itself once, then retry.
        if err.raw_os_error() != Some(libc::EINVAL) || bound {
            return Err(NetnsError::Io { op: "make shared mount", path: dir.to_path_buf(), source: err });
        }
        // SAFETY: as above.
        let rc = unsafe {
            libc::mount(c.as_ptr(), c.as_ptr(), none.as_ptr(), libc::MS_BIND | libc::MS_REC, std::ptr::null())
        };
        if rc != 0 {
            return Err(io_err("bind-mount directory onto itself", dir)(io::Error::last_os_error()));
        }
        bound = true;
    }
}

/// Unmounts and deletes the namespace file. Idempotent: a path that is not
/// mounted, or not there at all, is fine. The namespace itself goes away
/// when its last user (a container process, an open fd) does.
pub fn remove(path: &Path) -> Result<(), NetnsError> {
    let c = cstr(path)?;
    // MNT_DETACH: a process still holding the file open must not make the
    // unmount fail; the kernel finishes it when they let go.
    // SAFETY: plain syscall on a valid NUL-terminated string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOENT) => {}
            _ => return Err(io_err("unmount", path)(err)),
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

/// A TCP connection to `addr` made from inside the network namespace at
/// `netns` (a pod's loopback, for `kubectl port-forward`). A socket stays
/// in the namespace it was made in, so a short-lived thread enters the
/// namespace, connects and hands the socket back; every other thread stays
/// in the host namespace.
pub fn connect_in(
    netns: &Path,
    addr: std::net::SocketAddr,
    timeout: std::time::Duration,
) -> io::Result<std::net::TcpStream> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(netns)?;
    std::thread::Builder::new()
        .name("netns-connect".into())
        .spawn(move || {
            // SAFETY: setns on an open namespace fd, for this thread only.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            std::net::TcpStream::connect_timeout(&addr, timeout)
        })?
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")))
}

/// Undoes what [`create`] did to the directory itself (the bind mount that
/// made it a shared mount point), for tests and an agent that wipes its
/// data dir. Remove the namespaces first. Idempotent.
pub fn release_dir(dir: &Path) -> Result<(), NetnsError> {
    let c = cstr(dir)?;
    // SAFETY: plain syscall on a valid NUL-terminated string.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOENT) => {}
            _ => return Err(io_err("unmount", dir)(err)),
        }
    }
    Ok(())
}

/// Names of the namespace files in `dir`, sorted (live or leftover: see
/// [`is_mounted`]). A missing directory has none.
pub fn list(dir: &Path) -> Result<Vec<String>, NetnsError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("read directory", dir)(e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("read directory", dir))?;
        let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
        if validate_name(&name).is_ok() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// Filesystem magic of nsfs (linux/magic.h NSFS_MAGIC).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Whether `path` is a live namespace (an nsfs mount), not an empty file
/// left behind by a reboot or a crash between creating and mounting.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(c) = cstr(path) else { return false };
    // SAFETY: statfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == NSFS_MAGIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn names_that_could_escape_the_directory_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "a b", "x\0y"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        for good in ["abc", "0123abcdef", "pod_a-1.2"] {
            validate_name(good).unwrap();
        }
        assert!(validate_name(&"a".repeat(201)).is_err());
    }

    /// Removes what the test created even when it fails half-way.
    struct Cleanup {
        dir: PathBuf,
        paths: Vec<PathBuf>,
    }
    impl Drop for Cleanup {
        fn drop(&mut self) {
            for p in &self.paths {
                let _ = remove(p);
            }
            let _ = release_dir(&self.dir);
        }
    }

    fn mounted_at(path: &Path) -> bool {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let needle = path.to_str().unwrap();
        mountinfo.lines().any(|l| l.split(' ').nth(4) == Some(needle))
    }

    #[test]
    fn create_enter_list_remove() {
        if !nix_is_root() {
            eprintln!("skipping: needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("netns");
        let mut guard = Cleanup { dir: dir.clone(), paths: vec![dir.join("a"), dir.join("b")] };

        let a = create(&dir, "a").unwrap();
        let b = create(&dir, "b").unwrap();
        assert!(matches!(create(&dir, "a"), Err(NetnsError::Exists(_))));
        assert!(is_mounted(&a) && is_mounted(&b));
        assert!(mounted_at(&a));
        assert_eq!(list(&dir).unwrap(), vec!["a".to_string(), "b".to_string()]);

        // Entering the namespace shows a fresh one: only lo, and down.
        let out =
            Command::new("nsenter").arg(format!("--net={}", a.display())).args(["ip", "-o", "link"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let links = String::from_utf8(out.stdout).unwrap();
        assert_eq!(links.lines().count(), 1, "{links}");
        assert!(links.contains(": lo:"), "{links}");

        // The two are distinct namespaces.
        let ino = |p: &Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();
        assert_ne!(ino(&a), ino(&b));

        remove(&a).unwrap();
        remove(&a).unwrap(); // idempotent
        assert!(!a.exists());
        assert!(!mounted_at(&a));
        assert_eq!(list(&dir).unwrap(), vec!["b".to_string()]);
        remove(&b).unwrap();
        guard.paths.clear();
        drop(guard);
        assert!(!mounted_at(&dir), "directory bind mount left behind");
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert!(!mountinfo.contains(tmp.path().to_str().unwrap()), "{mountinfo}");
    }

    #[test]
    fn leftover_file_is_not_mounted_and_removes_cleanly() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("stale");
        std::fs::write(&p, b"").unwrap();
        assert!(!is_mounted(&p));
        remove(&p).unwrap();
        assert!(!p.exists());
        assert_eq!(list(&tmp.path().join("missing")).unwrap(), Vec::<String>::new());
    }

    fn nix_is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }
}
