//! The local-path root: the directory where the masters' local-path
//! provisioner puts this node's PersistentVolumes, and the reclaimer that
//! removes a volume's directory once the volume is gone.
//!
//! The agent advertises the root on its Node ([`ANNOTATION`]; default
//! `<data-dir>/local-path`, `--local-path-root`). The provisioner makes
//! hostPath PVs `<root>/<pv-name>_<namespace>_<claim>` (type
//! DirectoryOrCreate, pinned to this node by nodeAffinity); the volume
//! code creates the directory when a pod first mounts the claim.
//!
//! Reclaim: once the pod listing is in and then every [`RECLAIM_EVERY`],
//! each directory of the root named like the provisioner's is looked up
//! (its PV, through the gateway). It is removed only when the masters
//! clearly said the PV does not exist ([`Lookup::Gone`], a 404) and no pod
//! of this node uses the path; anything else (forbidden, unreachable, a
//! name we did not make) leaves it. Data goes only because a master said
//! its volume is gone. [`to_remove`] decides, purely; [`reclaim`] is the IO.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The Node annotation naming the root (an absolute directory).
pub use capstan_proto::k8s::storage::LOCAL_PATH_ROOT as ANNOTATION;

/// The root under the data dir when `--local-path-root` is not given.
pub const DEFAULT_DIR: &str = "local-path";

/// How often the root is swept.
pub const RECLAIM_EVERY: Duration = Duration::from_secs(60);

/// `dir` made absolute and created: the root to advertise. A path that is
/// not UTF-8 is refused (the provisioner builds paths from its text).
pub fn prepare_root(dir: &Path) -> std::io::Result<PathBuf> {
    let root = std::path::absolute(dir)?;
    if root.to_str().is_none() {
        let msg = format!("the local-path root {} is not valid UTF-8", root.display());
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg));
    }
    std::fs::create_dir_all(&root)?;
    Ok(root)
}

/// What the masters said about a PersistentVolume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    Exists,
    /// A clear NotFound.
    Gone,
    /// Anything else (forbidden, unreachable, ...): nothing is concluded.
    Failed(String),
}

/// The PersistentVolume a directory of the root belongs to, if its name is
/// the provisioner's `<pv-name>_<namespace>_<claim>` (none of the three
/// may hold a `_`, the PV name is a DNS subdomain). Anything else is never
/// touched.
pub fn pv_of(dir_name: &str) -> Option<&str> {
    let parts: Vec<&str> = dir_name.split('_').collect();
    let [pv, ns, claim] = parts[..] else { return None };
    (dns_subdomain(pv) && !ns.is_empty() && !claim.is_empty()).then_some(pv)
}

fn dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// The directories of `root` (by name, `dirs`) to remove: their PV is
/// [`Lookup::Gone`] and no path in `in_use` (what this node's pods use) is
/// the directory or lies inside it.
pub fn to_remove(root: &Path, dirs: &[String], lookups: &BTreeMap<String, Lookup>, in_use: &[PathBuf]) -> Vec<PathBuf> {
    dirs.iter()
        .filter(|d| pv_of(d).is_some_and(|pv| lookups.get(pv) == Some(&Lookup::Gone)))
        .map(|d| root.join(d))
        .filter(|dir| !in_use.iter().any(|p| p.starts_with(dir)))
        .collect()
}

/// The names of the real directories (not symlinks) directly in `root`.
fn directories(root: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(root) else { return vec![] };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect()
}

/// One sweep of `root`: `lookup(pv)` asks the masters about a PV;
/// `in_use()` lists the host paths this node's pods use, asked after the
/// lookups so a pod that started meanwhile counts. Returns what it removed.
pub async fn reclaim<L, Fut>(root: &Path, lookup: L, in_use: impl FnOnce() -> Vec<PathBuf>) -> Vec<PathBuf>
where
    L: Fn(String) -> Fut,
    Fut: Future<Output = Lookup>,
{
    // Compare real paths: a pod's record may name the root through a symlink.
    let root = std::fs::canonicalize(root).unwrap_or_else(|_| root.to_path_buf());
    let dirs = directories(&root);
    let mut lookups = BTreeMap::new();
    for pv in dirs.iter().filter_map(|d| pv_of(d)) {
        if !lookups.contains_key(pv) {
            lookups.insert(pv.to_string(), lookup(pv.to_string()).await);
        }
    }
    for (pv, why) in lookups.iter().filter_map(|(pv, l)| match l {
        Lookup::Failed(why) => Some((pv, why)),
        _ => None,
    }) {
        tracing::debug!(pv = %pv, error = %why, "local-path reclaim: volume not looked up; its directory stays");
    }
    let in_use: Vec<PathBuf> = in_use().into_iter().map(|p| std::fs::canonicalize(&p).unwrap_or(p)).collect();
    let mut removed = Vec::new();
    for dir in to_remove(&root, &dirs, &lookups, &in_use) {
        let d = dir.clone();
        // remove_dir_all does not follow symlinks: only the volume's own files go.
        let res = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&d)).await;
        match res.map_err(std::io::Error::other).and_then(|r| r) {
            Ok(()) => {
                tracing::info!(path = %dir.display(), "removed the directory of a deleted PersistentVolume");
                removed.push(dir);
            }
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "could not remove a deleted volume's directory")
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_provisioners_directory_names_name_a_volume() {
        assert_eq!(pv_of("pvc-1234_default_data-web-0"), Some("pvc-1234"));
        assert_eq!(pv_of("pv.example_ns_c"), Some("pv.example"));
        for other in ["pvc-1", "pvc-1_ns", "pvc-1_ns_c_extra", "_ns_c", "pvc-1__c", "pvc-1_ns_", "PVC_ns_c", ".x_ns_c"]
        {
            assert_eq!(pv_of(other), None, "{other:?}");
        }
    }

    #[test]
    fn only_gone_volumes_that_no_pod_uses_are_removed() {
        let root = Path::new("/lp");
        let dirs: Vec<String> =
            ["pvc-a_ns_a", "pvc-b_ns_b", "pvc-c_ns_c", "pvc-d_ns_d", "pvc-e_ns_e", "stray"].map(String::from).into();
        let lookups = BTreeMap::from([
            ("pvc-a".to_string(), Lookup::Gone),
            ("pvc-b".to_string(), Lookup::Exists),
            ("pvc-c".to_string(), Lookup::Failed("forbidden".into())),
            ("pvc-d".to_string(), Lookup::Gone),
            ("pvc-e".to_string(), Lookup::Gone),
        ]);
        let in_use = [PathBuf::from("/lp/pvc-d_ns_d"), PathBuf::from("/lp/pvc-e_ns_e/sub"), PathBuf::from("/lp")];
        let got = to_remove(root, &dirs, &lookups, &in_use);
        assert_eq!(got, [PathBuf::from("/lp/pvc-a_ns_a")], "used as itself or through a subPath: kept");
        // Not looked up at all: kept.
        assert!(to_remove(root, &dirs, &BTreeMap::new(), &[]).is_empty());
        // A longer name that merely starts like one in use is not in use.
        let similar = [PathBuf::from("/lp/pvc-a_ns_a2")];
        assert_eq!(to_remove(root, &dirs, &lookups, &similar).len(), 3);
    }

    #[tokio::test]
    async fn a_sweep_removes_what_was_decided_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let root = prepare_root(&tmp.path().join("lp")).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("keep"), "x").unwrap();
        for d in ["pvc-gone_ns_c", "pvc-used_ns_c", "pvc-here_ns_c", "pvc-unknown_ns_c"] {
            std::fs::create_dir_all(root.join(d).join("data")).unwrap();
        }
        // A symlink inside a removed volume is removed, not followed.
        std::os::unix::fs::symlink(&outside, root.join("pvc-gone_ns_c/link")).unwrap();
        // A symlink named like a volume is not a directory of ours.
        std::os::unix::fs::symlink(&outside, root.join("pvc-link_ns_c")).unwrap();
        let lookup = |pv: String| {
            std::future::ready(match pv.as_str() {
                "pvc-here" => Lookup::Exists,
                "pvc-unknown" => Lookup::Failed("unreachable".into()),
                _ => Lookup::Gone,
            })
        };
        let used = root.join("pvc-used_ns_c");
        let removed = reclaim(&root, lookup, || vec![used.clone()]).await;
        assert_eq!(removed, [std::fs::canonicalize(&root).unwrap().join("pvc-gone_ns_c")]);
        assert!(!root.join("pvc-gone_ns_c").exists());
        for kept in ["pvc-used_ns_c", "pvc-here_ns_c", "pvc-unknown_ns_c", "pvc-link_ns_c"] {
            assert!(root.join(kept).exists(), "{kept}");
        }
        assert_eq!(std::fs::read_to_string(outside.join("keep")).unwrap(), "x");
        assert!(root.is_absolute());
    }
}
