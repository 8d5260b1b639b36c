//! Pod volumes: what each of a pod's volumes should hold, decided purely,
//! and the host side that makes it so.
//!
//! - this file: the planner, pure (no IO, no clock): [`sources_of`] names the
//!   ConfigMaps, Secrets and PersistentVolumeClaims a pod's volumes read
//!   ([`bound_volumes`] then the PersistentVolumes of the claims fetched);
//!   [`plan_volume`] turns one volume plus those objects into a
//!   [`VolumePlan`] (for configMap, secret, downwardAPI and projected
//!   volumes the exact file set, [`FileEntry`]s with their modes);
//!   [`sub_path`] validates a volumeMount's subPath.
//! - `volumes/claim.rs`: persistentVolumeClaim and generic ephemeral
//!   volumes, pure: the claim must be Bound, its PersistentVolume a
//!   hostPath or local volume whose nodeAffinity admits this node.
//! - `volumes/host.rs`: the IO shell: [`prepare`] fetches the sources,
//!   mounts tmpfs where needed and writes the files; [`mounts_for`] maps a
//!   container's volumeMounts to runtime mounts; [`cleanup`] unmounts and
//!   removes everything of a pod. The agent prepares before every
//!   container start and every [`REFRESH`] while the pod runs, so
//!   ConfigMap and Secret updates reach running containers (not through a
//!   subPath mount, which pins the file, as in Kubernetes).
//! - `volumes/downward.rs`: the downward API items (fieldRef, labels and
//!   annotations files, resourceFieldRef), pure.
//! - `volumes/writer.rs`: [`write_atomic`], Kubernetes' AtomicWriter
//!   layout (files in a timestamped directory, published by renaming the
//!   `..data` symlink, user-visible names linked through `..data`).
//!
//! Layout, as the kubelet's: `<data-dir>/pods/<uid>/volumes/<plugin>/<name>`,
//! plugin one of the `PLUGIN_*` names (`kubernetes.io~empty-dir`, ...).
//! hostPath volumes have no directory there: the container mounts the host
//! path itself. Neither do claim volumes: the container bind-mounts their
//! PersistentVolume's host path, and `capstan.io~claim/<name>` (not the
//! kubelet's) is a symlink to that path, recording what the claim resolved
//! to (for a restart while the masters are away, and for the local-path
//! reclaimer's "in use", `localpath.rs`).
//!
//! Kubernetes' rules kept here: secret and projected volumes live on tmpfs
//! (never on disk), so does an emptyDir with `medium: Memory`; configMap,
//! secret, downwardAPI and projected volumes are mounted read-only; file
//! modes are the item's `mode`, else the volume's `defaultMode`, else 0644;
//! a missing ConfigMap/Secret (or key named by an item) is an error unless
//! `optional`, an optional one yields no files; downward API label and
//! annotation files are `key="value"` lines (Go-quoted), sorted by key; a
//! claim that is missing or not Bound yet is an error the pod's start
//! retries ([`VolumeError::NotFound`], [`VolumeError::NotBound`]); a claim
//! volume is read-only when its `readOnly` says so (or the volumeMount's).
//!
//! With `securityContext.fsGroup`, emptyDir roots and file-set volumes
//! belong to that group (setgid directories, group-readable files).
//!
//! ServiceAccount tokens (projected `serviceAccountToken`) are requested
//! from the masters bound to the pod and rewritten on every refresh.
//! Not supported (yet): clusterTrustBundle, fsGroupChangePolicy, block
//! volumes, PersistentVolumes other than hostPath and local, and every
//! network/CSI volume type (an error names them).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::agent::{bytes_of, expand, NodeInfo};

#[path = "volumes/claim.rs"]
mod claim;
#[path = "volumes/downward.rs"]
mod downward;
#[path = "volumes/host.rs"]
mod host;
#[path = "volumes/writer.rs"]
mod writer;

pub use claim::{bound_volumes, claim_of, node_affinity_admits, ClaimUse};
use downward::downward;
pub use downward::{format_map, go_quote};
pub use host::{
    claimed_paths, cleanup, is_mount_point, mounts_for, mounts_under, pods_with_volumes, prepare, volumes_dir, Prepared,
};
pub use writer::{write_atomic, DATA_LINK};

pub const PLUGIN_EMPTY_DIR: &str = "kubernetes.io~empty-dir";
pub const PLUGIN_CONFIGMAP: &str = "kubernetes.io~configmap";
pub const PLUGIN_SECRET: &str = "kubernetes.io~secret";
pub const PLUGIN_DOWNWARD_API: &str = "kubernetes.io~downward-api";
pub const PLUGIN_PROJECTED: &str = "kubernetes.io~projected";
/// Not a volume directory: a symlink per claim volume to the host path it
/// resolved to (see the module doc).
pub const PLUGIN_CLAIM: &str = "capstan.io~claim";

/// How often a running pod's file-set volumes are refreshed from their
/// sources (the kubelet's sync period).
pub const REFRESH: std::time::Duration = std::time::Duration::from_secs(60);

/// Kubernetes' default file mode for configMap, secret, downwardAPI and
/// projected volumes.
pub const DEFAULT_MODE: u32 = 0o644;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VolumeError {
    /// A ConfigMap or Secret that is not optional, a claim or its
    /// PersistentVolume, does not exist.
    #[error("{kind} {name:?} not found")]
    NotFound { kind: &'static str, name: String },
    /// The claim exists but its volume is not known yet (the binder or
    /// provisioner has not got to it): the pod's start waits for it.
    #[error("persistentvolumeclaim {claim:?} is not bound yet")]
    NotBound { claim: String },
    /// An item names a key the object does not have (and is not optional).
    #[error("{}", missing_key(kind, key))]
    MissingKey { kind: &'static str, name: String, key: String },
    /// The masters could not be asked (not the same as "not found").
    #[error("{kind} {name:?}: {message}")]
    Unavailable { kind: &'static str, name: String, message: String },
    /// A volume's spec cannot be honoured (bad path, mode, unsupported type).
    #[error("volume {volume:?}: {message}")]
    Invalid { volume: String, message: String },
    #[error("hostPath type check failed: {path} is not a {expected}")]
    HostPathType { path: String, expected: &'static str },
    #[error("cannot find volume {volume:?} to mount into container {container:?}")]
    UnknownVolume { volume: String, container: String },
    #[error("volume mount {volume:?}: invalid subPath {sub_path:?}: {reason}")]
    SubPath { volume: String, sub_path: String, reason: String },
    #[error("{op} {path}: {message}")]
    Io { op: &'static str, path: PathBuf, message: String },
}

/// Kubernetes' own wording.
fn missing_key(kind: &str, key: &str) -> String {
    match kind {
        "configmap" => format!("configmap references non-existent config key: {key}"),
        _ => format!("references non-existent secret key: {key}"),
    }
}

/// What volumes read from the masters: ConfigMaps, Secrets, the pod's
/// ServiceAccount tokens (projected `serviceAccountToken`; the source's name
/// is [`token_source_name`], the fetched object `{"token": ...}`),
/// PersistentVolumeClaims and the (cluster-scoped) PersistentVolumes they
/// are bound to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceKind {
    ConfigMap,
    Secret,
    Token,
    PersistentVolumeClaim,
    PersistentVolume,
}

/// A token source's name: its audience and lifetime.
pub fn token_source_name(t: &Value) -> String {
    format!("{}\n{}", t["audience"].as_str().unwrap_or_default(), t["expirationSeconds"].as_i64().unwrap_or(3607))
}

/// The (audience, expirationSeconds) a token source's name stands for.
pub fn token_source_parts(name: &str) -> (Option<String>, i64) {
    let (aud, secs) = name.split_once('\n').unwrap_or((name, "3607"));
    (Some(aud.to_string()).filter(|a| !a.is_empty()), secs.parse().unwrap_or(3607))
}

impl SourceKind {
    /// The API resource (`configmaps`, `secrets`, ...) to fetch.
    pub fn resource(self) -> &'static str {
        match self {
            SourceKind::ConfigMap => "configmaps",
            SourceKind::Secret => "secrets",
            SourceKind::Token => "serviceaccounts/token",
            SourceKind::PersistentVolumeClaim => "persistentvolumeclaims",
            SourceKind::PersistentVolume => "persistentvolumes",
        }
    }

    /// The word Kubernetes' messages use (`configmap "x" not found`).
    pub fn singular(self) -> &'static str {
        match self {
            SourceKind::ConfigMap => "configmap",
            SourceKind::Secret => "secret",
            SourceKind::Token => "serviceaccount token",
            SourceKind::PersistentVolumeClaim => "persistentvolumeclaim",
            SourceKind::PersistentVolume => "persistentvolume",
        }
    }

    /// Whether the object lives in the pod's namespace (a PersistentVolume
    /// is cluster-scoped: fetched with an empty namespace).
    pub fn namespaced(self) -> bool {
        self != SourceKind::PersistentVolume
    }
}

/// An object that a volume reads (in the pod's namespace unless
/// [`SourceKind::namespaced`] says otherwise).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRef {
    pub kind: SourceKind,
    pub name: String,
}

/// What fetching each source gave: `Ok(None)` is "not found", `Err` is
/// "could not ask" (masters unreachable).
pub type Sources = BTreeMap<SourceRef, Result<Option<Value>, String>>;

/// One file of a volume, `path` relative to the volume's root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEntry {
    pub path: String,
    pub bytes: Vec<u8>,
    pub mode: u32,
}

/// hostPath's `type`: what must be at the path, and what may be created.
/// Also a hostPath PersistentVolume's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostPathType {
    /// No check at all.
    Unset,
    DirectoryOrCreate,
    Directory,
    FileOrCreate,
    File,
    Socket,
    CharDevice,
    BlockDevice,
}

/// What one volume is to be.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VolumePlan {
    /// A directory kept for the pod's life (0777), on tmpfs when `memory`;
    /// `size_limit` is the tmpfs size (sizeLimit, at most the pod's memory
    /// limit, else the node's memory). On disk it is not enforced.
    /// `gid`: the pod's fsGroup, owning the directory (setgid).
    EmptyDir { memory: bool, size_limit: Option<u64>, gid: Option<u32> },
    /// The host's own path, checked (and maybe created) per `kind`.
    HostPath { path: PathBuf, kind: HostPathType },
    /// A claim's PersistentVolume: its path on this host, checked per
    /// `check`, bind-mounted (read-only when the pod's volume says so).
    Persistent { path: PathBuf, check: PathCheck, read_only: bool },
    /// A file set written atomically, read-only to containers; with an
    /// fsGroup (`gid`) the files are that group's and group-readable.
    Files { plugin: &'static str, tmpfs: bool, files: Vec<FileEntry>, gid: Option<u32> },
}

impl VolumePlan {
    /// The plugin directory name, None for hostPath and claims (no
    /// directory of ours).
    pub fn plugin(&self) -> Option<&'static str> {
        match self {
            VolumePlan::EmptyDir { .. } => Some(PLUGIN_EMPTY_DIR),
            VolumePlan::HostPath { .. } | VolumePlan::Persistent { .. } => None,
            VolumePlan::Files { plugin, .. } => Some(plugin),
        }
    }
}

/// What a PersistentVolume's path must be before it is mounted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathCheck {
    /// A hostPath PV: its `type`, as for a hostPath volume (DirectoryOrCreate creates it).
    HostPath(HostPathType),
    /// A local PV: the path must exist (nothing is created).
    Exists,
    /// A local-path PV (provisioned by the masters): its directory is
    /// created writable by every user, as the local-path provisioner
    /// does, so containers running as any user can use their volume.
    Provisioned,
}

/// The plugin directory a volume spec uses (to find an earlier copy when
/// its sources cannot be fetched now).
pub fn plugin_of(volume: &Value) -> Option<&'static str> {
    [
        ("emptyDir", PLUGIN_EMPTY_DIR),
        ("configMap", PLUGIN_CONFIGMAP),
        ("secret", PLUGIN_SECRET),
        ("downwardAPI", PLUGIN_DOWNWARD_API),
        ("projected", PLUGIN_PROJECTED),
    ]
    .into_iter()
    .find(|(field, _)| volume[*field].is_object())
    .map(|(_, plugin)| plugin)
}

/// Whether any volume of the pod follows its sources (configMap, secret,
/// downwardAPI, projected) and so is worth refreshing while it runs.
pub fn refreshable(pod: &Value) -> bool {
    volumes(pod).any(|v| plugin_of(v).is_some_and(|p| p != PLUGIN_EMPTY_DIR))
}

/// The host paths of the pod's hostPath volumes (what it uses of the host
/// besides its claims).
pub fn host_paths(pod: &Value) -> Vec<PathBuf> {
    volumes(pod).filter_map(|v| v["hostPath"]["path"].as_str()).map(PathBuf::from).collect()
}

fn volumes(pod: &Value) -> impl Iterator<Item = &Value> {
    pod["spec"]["volumes"].as_array().into_iter().flatten()
}

/// The ConfigMaps, Secrets, tokens and PersistentVolumeClaims the pod's
/// volumes read, each once, sorted.
pub fn sources_of(pod: &Value) -> Vec<SourceRef> {
    let mut out = BTreeSet::new();
    let mut add = |kind, name: Option<&str>| {
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            out.insert(SourceRef { kind, name: name.to_string() });
        }
    };
    for v in volumes(pod) {
        add(SourceKind::PersistentVolumeClaim, claim_of(pod, v).as_ref().map(|c| c.claim.as_str()));
        add(SourceKind::ConfigMap, v["configMap"]["name"].as_str());
        add(SourceKind::Secret, v["secret"]["secretName"].as_str());
        for s in v["projected"]["sources"].as_array().into_iter().flatten() {
            add(SourceKind::ConfigMap, s["configMap"]["name"].as_str());
            add(SourceKind::Secret, s["secret"]["name"].as_str());
            if s["serviceAccountToken"].is_object() {
                add(SourceKind::Token, Some(&token_source_name(&s["serviceAccountToken"])));
            }
        }
    }
    out.into_iter().collect()
}

/// Volume names become directory names: refuse separators and dot-names.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(format!("invalid volume name {name:?}"));
    }
    Ok(())
}

/// What `volume` (one entry of `spec.volumes`) of `pod` should be, given
/// the fetched `sources`.
pub fn plan_volume(pod: &Value, volume: &Value, sources: &Sources, node: &NodeInfo) -> Result<VolumePlan, VolumeError> {
    let name = volume["name"].as_str().unwrap_or_default();
    let invalid = |message: String| VolumeError::Invalid { volume: name.to_string(), message };
    check_name(name).map_err(invalid)?;
    if let Some(e) = volume.get("emptyDir").filter(|v| v.is_object()) {
        let memory = match e["medium"].as_str().unwrap_or_default() {
            "" => false,
            "Memory" => true,
            other => return Err(invalid(format!("emptyDir medium {other:?} is not supported"))),
        };
        let mut size_limit = match &e["sizeLimit"] {
            Value::Null => None,
            q => Some(quantity(q).and_then(|q| bytes_of(&q)).ok_or_else(|| invalid(format!("bad sizeLimit {q}")))?),
        };
        if memory {
            // tmpfs pages are the pod's memory: no bigger than the pod may use.
            let pod_limit = pod_memory_limit(pod).or_else(|| bytes_of(&node.memory)).filter(|l| *l > 0);
            size_limit = match (size_limit, pod_limit) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        return Ok(VolumePlan::EmptyDir { memory, size_limit, gid: fs_group(pod) });
    }
    if let Some(h) = volume.get("hostPath").filter(|v| v.is_object()) {
        let (path, kind) = host_path_of(h).map_err(invalid)?;
        return Ok(VolumePlan::HostPath { path, kind });
    }
    if let Some(c) = claim_of(pod, volume) {
        return claim::plan(pod, name, &c, sources, node);
    }
    let (plugin, tmpfs, mut files) = if let Some(c) = volume.get("configMap").filter(|v| v.is_object()) {
        let mode = mode_or(&c["defaultMode"], DEFAULT_MODE).map_err(invalid)?;
        (PLUGIN_CONFIGMAP, false, keys_of(SourceKind::ConfigMap, &c["name"], c, mode, sources)?)
    } else if let Some(s) = volume.get("secret").filter(|v| v.is_object()) {
        let mode = mode_or(&s["defaultMode"], DEFAULT_MODE).map_err(invalid)?;
        (PLUGIN_SECRET, true, keys_of(SourceKind::Secret, &s["secretName"], s, mode, sources)?)
    } else if let Some(d) = volume.get("downwardAPI").filter(|v| v.is_object()) {
        let mode = mode_or(&d["defaultMode"], DEFAULT_MODE).map_err(invalid)?;
        (PLUGIN_DOWNWARD_API, false, downward(pod, &d["items"], mode, node).map_err(invalid)?)
    } else if let Some(p) = volume.get("projected").filter(|v| v.is_object()) {
        let mode = mode_or(&p["defaultMode"], DEFAULT_MODE).map_err(invalid)?;
        let mut files = Vec::new();
        for s in p["sources"].as_array().into_iter().flatten() {
            if s["configMap"].is_object() {
                files.extend(keys_of(SourceKind::ConfigMap, &s["configMap"]["name"], &s["configMap"], mode, sources)?);
            } else if s["secret"].is_object() {
                files.extend(keys_of(SourceKind::Secret, &s["secret"]["name"], &s["secret"], mode, sources)?);
            } else if s["downwardAPI"].is_object() {
                files.extend(downward(pod, &s["downwardAPI"]["items"], mode, node).map_err(invalid)?);
            } else if s["serviceAccountToken"].is_object() {
                let t = &s["serviceAccountToken"];
                let path = t["path"].as_str().unwrap_or_default().to_string();
                let r = SourceRef { kind: SourceKind::Token, name: token_source_name(t) };
                let token = match sources.get(&r) {
                    Some(Ok(Some(obj))) => obj["token"].as_str().unwrap_or_default().as_bytes().to_vec(),
                    Some(Err(message)) => {
                        let message = message.clone();
                        return Err(VolumeError::Unavailable { kind: "serviceaccount token", name: path, message });
                    }
                    _ => return Err(VolumeError::NotFound { kind: "serviceaccount token", name: path }),
                };
                files.push(FileEntry { path, bytes: token, mode });
            }
            // clusterTrustBundle: not supported; nothing written.
        }
        (PLUGIN_PROJECTED, true, files)
    } else {
        let kind = volume.as_object().and_then(|o| o.keys().find(|k| *k != "name").cloned()).unwrap_or_default();
        return Err(invalid(format!("volume type {kind:?} is not supported by capstan-node")));
    };
    check_file_set(&files).map_err(invalid)?;
    let gid = fs_group(pod);
    if gid.is_some() {
        // As the kubelet's SetVolumeOwnership does for a read-only volume.
        files.iter_mut().for_each(|f| f.mode |= 0o440);
    }
    Ok(VolumePlan::Files { plugin, tmpfs, files, gid })
}

/// A hostPath source (a pod volume's or a PersistentVolume's): its
/// absolute path and `type`.
fn host_path_of(h: &Value) -> Result<(PathBuf, HostPathType), String> {
    let path = h["path"].as_str().unwrap_or_default();
    if !path.starts_with('/') {
        return Err(format!("hostPath path {path:?} must be absolute"));
    }
    let kind = match h["type"].as_str().unwrap_or_default() {
        "" => HostPathType::Unset,
        "DirectoryOrCreate" => HostPathType::DirectoryOrCreate,
        "Directory" => HostPathType::Directory,
        "FileOrCreate" => HostPathType::FileOrCreate,
        "File" => HostPathType::File,
        "Socket" => HostPathType::Socket,
        "CharDevice" => HostPathType::CharDevice,
        "BlockDevice" => HostPathType::BlockDevice,
        other => return Err(format!("unknown hostPath type {other:?}")),
    };
    Ok((PathBuf::from(path), kind))
}

/// `spec.securityContext.fsGroup`.
fn fs_group(pod: &Value) -> Option<u32> {
    pod["spec"]["securityContext"]["fsGroup"].as_u64().and_then(|g| u32::try_from(g).ok())
}

/// The pod's memory limit as Kubernetes' PodLimits counts it: the app
/// containers' limits summed, or the largest init container's if bigger.
fn pod_memory_limit(pod: &Value) -> Option<u64> {
    let limits = |list: &str| -> Vec<u64> {
        pod["spec"][list]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| quantity(&c["resources"]["limits"]["memory"]).and_then(|q| bytes_of(&q)))
            .collect()
    };
    let total = limits("containers").iter().sum::<u64>().max(limits("initContainers").into_iter().max().unwrap_or(0));
    (total > 0).then_some(total)
}

/// A Quantity as JSON (usually a string, sometimes a bare number).
fn quantity(q: &Value) -> Option<String> {
    match q {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn mode_or(v: &Value, default: u32) -> Result<u32, String> {
    match v {
        Value::Null => Ok(default),
        v => match v.as_u64() {
            Some(m) if m <= 0o777 => Ok(m as u32),
            _ => Err(format!("mode {v} must be between 0 and 0777 (511)")),
        },
    }
}

/// The keys of a ConfigMap (`data` as text, `binaryData` base64) or Secret
/// (`data` base64), as bytes.
pub fn data_bytes(kind: SourceKind, obj: &Value) -> BTreeMap<String, Vec<u8>> {
    use base64::Engine;
    let b64 = |v: &Value| v.as_str().and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok());
    let mut out = BTreeMap::new();
    for (k, v) in obj["data"].as_object().into_iter().flatten() {
        let bytes = match kind {
            SourceKind::ConfigMap | SourceKind::Token => v.as_str().map(|s| s.as_bytes().to_vec()),
            SourceKind::Secret => b64(v),
            SourceKind::PersistentVolumeClaim | SourceKind::PersistentVolume => None,
        };
        out.extend(bytes.map(|b| (k.clone(), b)));
    }
    if kind == SourceKind::ConfigMap {
        for (k, v) in obj["binaryData"].as_object().into_iter().flatten() {
            out.extend(b64(v).map(|b| (k.clone(), b)));
        }
    }
    out
}

/// The files of a configMap or secret source: every key (path = key), or
/// only the `items` (key -> path, per-item mode).
fn keys_of(
    kind: SourceKind,
    name: &Value,
    src: &Value,
    default_mode: u32,
    sources: &Sources,
) -> Result<Vec<FileEntry>, VolumeError> {
    let name = name.as_str().unwrap_or_default().to_string();
    let optional = src["optional"].as_bool().unwrap_or(false);
    let obj = match sources.get(&SourceRef { kind, name: name.clone() }) {
        Some(Ok(Some(obj))) => obj,
        Some(Ok(None)) | None if optional => return Ok(vec![]),
        Some(Ok(None)) | None => return Err(VolumeError::NotFound { kind: kind.singular(), name }),
        Some(Err(message)) => {
            return Err(VolumeError::Unavailable { kind: kind.singular(), name, message: message.clone() })
        }
    };
    let data = data_bytes(kind, obj);
    let Some(items) = src["items"].as_array().filter(|i| !i.is_empty()) else {
        return Ok(data.into_iter().map(|(path, bytes)| FileEntry { path, bytes, mode: default_mode }).collect());
    };
    let mut out = Vec::new();
    for item in items {
        let key = item["key"].as_str().unwrap_or_default();
        let Some(bytes) = data.get(key).cloned() else {
            if optional {
                continue;
            }
            return Err(VolumeError::MissingKey { kind: kind.singular(), name, key: key.to_string() });
        };
        let mode = mode_or(&item["mode"], default_mode)
            .map_err(|message| VolumeError::Invalid { volume: name.clone(), message })?;
        let path = item["path"].as_str().unwrap_or_default().to_string();
        out.push(FileEntry { path, bytes, mode });
    }
    Ok(out)
}

/// Paths are relative, free of `..`, not starting with `..` (the writer's
/// own names), unique, and no file is also another's directory.
fn check_file_set(files: &[FileEntry]) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for f in files {
        check_item_path(&f.path)?;
        if !seen.insert(f.path.as_str()) {
            return Err(format!("conflicting duplicate path {:?}", f.path));
        }
    }
    for f in files {
        if seen.iter().any(|p| p.strip_prefix(f.path.as_str()).is_some_and(|rest| rest.starts_with('/'))) {
            return Err(format!("path {:?} is both a file and a directory", f.path));
        }
    }
    Ok(())
}

fn check_item_path(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("an item has an empty path".into());
    }
    if p.len() > 4096 {
        return Err(format!("path {p:?} is longer than 4096 bytes"));
    }
    if p.starts_with('/') {
        return Err(format!("path {p:?} must be relative"));
    }
    if p.starts_with("..") {
        return Err(format!("path {p:?} must not start with '..'"));
    }
    for c in p.split('/') {
        if c == ".." {
            return Err(format!("path {p:?} must not contain '..'"));
        }
        if c.is_empty() || c == "." || c.len() > 255 || c.contains('\0') {
            return Err(format!("path {p:?} has an invalid element {c:?}"));
        }
    }
    Ok(())
}

/// A volumeMount's `subPath`, or its `subPathExpr` expanded with the
/// container's `env` (`$(VAR)`): relative, without `..`, normalized.
pub fn sub_path(mount: &Value, env: &[(String, String)]) -> Result<Option<PathBuf>, VolumeError> {
    let volume = mount["name"].as_str().unwrap_or_default().to_string();
    let nonempty = |k: &str| mount[k].as_str().filter(|s| !s.is_empty());
    let raw = match (nonempty("subPath"), nonempty("subPathExpr")) {
        (None, None) => return Ok(None),
        (Some(p), None) => p.to_string(),
        (None, Some(e)) => expand(e, env),
        (Some(p), Some(_)) => {
            let reason = "subPath and subPathExpr are mutually exclusive".into();
            return Err(VolumeError::SubPath { volume, sub_path: p.into(), reason });
        }
    };
    let err =
        |reason: &str| VolumeError::SubPath { volume: volume.clone(), sub_path: raw.clone(), reason: reason.into() };
    if raw.contains('\0') {
        return Err(err("must not contain NUL"));
    }
    let mut out = PathBuf::new();
    for c in Path::new(&raw).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err(err("must not contain '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(err("must be a relative path")),
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

#[cfg(test)]
#[path = "volumes_test.rs"]
mod tests;
