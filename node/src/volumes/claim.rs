//! persistentVolumeClaim volumes, and generic ephemeral volumes (whose
//! claim is `<pod>-<volume>`, made for the pod by the masters), planned
//! purely: no IO here.
//!
//! A claim volume is ready when its claim is Bound (`status.phase` and
//! `spec.volumeName`), the PersistentVolume it names is a hostPath or
//! local volume, and the PV's `nodeAffinity` (if any) admits this node.
//! It is then that host path, bind-mounted into the containers as a
//! hostPath volume would be (`type` checks, subPaths). A claim not bound
//! yet, or missing, is an error the pod's start retries.

use std::collections::BTreeSet;
use std::path::PathBuf;

use capstan_proto::k8s::selector::NodeSelectorTerm;
use serde_json::Value;

use super::{host_path_of, PathCheck, SourceKind, SourceRef, Sources, VolumeError, VolumePlan};
use crate::agent::NodeInfo;

/// The claim a pod volume mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClaimUse {
    pub claim: String,
    /// `persistentVolumeClaim.readOnly` (containers then mount it read-only).
    pub read_only: bool,
    /// A generic ephemeral volume: the claim must belong to the pod.
    pub ephemeral: bool,
}

/// The claim `volume` (one entry of the pod's `spec.volumes`) mounts, if it
/// is a persistentVolumeClaim or ephemeral volume.
pub fn claim_of(pod: &Value, volume: &Value) -> Option<ClaimUse> {
    let str_of = |v: &Value| v.as_str().unwrap_or_default().to_string();
    if let Some(c) = volume.get("persistentVolumeClaim").filter(|c| c.is_object()) {
        let read_only = c["readOnly"].as_bool().unwrap_or(false);
        return Some(ClaimUse { claim: str_of(&c["claimName"]), read_only, ephemeral: false });
    }
    volume.get("ephemeral").filter(|e| e.is_object())?;
    // Kubernetes' name for an ephemeral volume's claim.
    let claim = format!("{}-{}", str_of(&pod["metadata"]["name"]), str_of(&volume["name"]));
    Some(ClaimUse { claim, read_only: false, ephemeral: true })
}

/// The volume a claim is bound to: its `spec.volumeName` once its phase
/// is Bound (a volumeName alone may be a pre-binding the binder has not
/// honoured yet).
pub fn bound_volume(pvc: &Value) -> Option<&str> {
    let bound = pvc["status"]["phase"].as_str() == Some("Bound");
    pvc["spec"]["volumeName"].as_str().filter(|v| bound && !v.is_empty())
}

/// The PersistentVolumes the fetched claims in `sources` are bound to,
/// each once: what to fetch next.
pub fn bound_volumes(sources: &Sources) -> Vec<SourceRef> {
    let names: BTreeSet<&str> = sources
        .iter()
        .filter(|(r, _)| r.kind == SourceKind::PersistentVolumeClaim)
        .filter_map(|(_, got)| got.as_ref().ok()?.as_ref().and_then(bound_volume))
        .collect();
    names.into_iter().map(|n| SourceRef { kind: SourceKind::PersistentVolume, name: n.to_string() }).collect()
}

/// What claim volume `name` of `pod` is, given the fetched `sources`.
pub(super) fn plan(
    pod: &Value,
    name: &str,
    c: &ClaimUse,
    sources: &Sources,
    node: &NodeInfo,
) -> Result<VolumePlan, VolumeError> {
    let invalid = |message: String| VolumeError::Invalid { volume: name.to_string(), message };
    if c.claim.is_empty() {
        return Err(invalid("persistentVolumeClaim.claimName is empty".into()));
    }
    let pvc = fetched(sources, SourceKind::PersistentVolumeClaim, &c.claim)?;
    if pvc["metadata"]["deletionTimestamp"].is_string() {
        // As the kubelet: a pod must not start on data about to go.
        return Err(invalid(format!("persistentvolumeclaim {:?} is being deleted", c.claim)));
    }
    if c.ephemeral && !owned_by_pod(pvc, pod) {
        // Someone else's claim that happens to have the name.
        let field = |k: &str| pod["metadata"][k].as_str().unwrap_or_default();
        let message = format!(
            "persistentvolumeclaim {:?} was not created for pod {}/{} (the pod is not its owner)",
            c.claim,
            field("namespace"),
            field("name")
        );
        return Err(invalid(message));
    }
    let pv_name = bound_volume(pvc).ok_or_else(|| VolumeError::NotBound { claim: c.claim.clone() })?;
    let pv = fetched(sources, SourceKind::PersistentVolume, pv_name)?;
    let pv_error = |m: String| invalid(format!("persistentvolume {pv_name:?}: {m}"));
    check_claim_ref(&pv["spec"]["claimRef"], pod, pvc).map_err(pv_error)?;
    if !node_affinity_admits(&pv["spec"]["nodeAffinity"], node) {
        return Err(pv_error(format!("its nodeAffinity does not admit node {:?}", node.name)));
    }
    if pv["spec"]["volumeMode"].as_str() == Some("Block") {
        return Err(pv_error("block volumes are not supported by capstan-node".into()));
    }
    let (path, mut check) = pv_path(&pv["spec"]).map_err(pv_error)?;
    if check == PathCheck::HostPath(super::HostPathType::DirectoryOrCreate) && provisioned_here(pv) {
        check = PathCheck::Provisioned;
    }
    Ok(VolumePlan::Persistent { path, check, read_only: c.read_only })
}

/// A fetched object: missing and "could not ask" are different errors.
fn fetched<'a>(sources: &'a Sources, kind: SourceKind, name: &str) -> Result<&'a Value, VolumeError> {
    let (kind_name, name) = (kind.singular(), name.to_string());
    match sources.get(&SourceRef { kind, name: name.clone() }) {
        Some(Ok(Some(obj))) => Ok(obj),
        Some(Err(message)) => Err(VolumeError::Unavailable { kind: kind_name, name, message: message.clone() }),
        Some(Ok(None)) | None => Err(VolumeError::NotFound { kind: kind_name, name }),
    }
}

/// An ephemeral volume's claim is the pod's: its controller owner is the pod.
fn owned_by_pod(pvc: &Value, pod: &Value) -> bool {
    let uid = pod["metadata"]["uid"].as_str().unwrap_or_default();
    pvc["metadata"]["ownerReferences"].as_array().into_iter().flatten().any(|o| {
        o["kind"] == "Pod"
            && o["controller"].as_bool() == Some(true)
            && o["uid"].as_str() == Some(uid)
            && !uid.is_empty()
    })
}

/// A PV whose `claimRef` names another claim is not this claim's (the
/// binder moved it). A PV without one is accepted: `status.phase` of the
/// claim already says the binding is done.
fn check_claim_ref(claim_ref: &Value, pod: &Value, pvc: &Value) -> Result<(), String> {
    if !claim_ref.is_object() {
        return Ok(());
    }
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pvc["metadata"]["name"].as_str().unwrap_or_default();
    let field = |k: &str| claim_ref[k].as_str().unwrap_or_default();
    let uid = pvc["metadata"]["uid"].as_str().unwrap_or_default();
    let same_uid = field("uid").is_empty() || uid.is_empty() || field("uid") == uid;
    if field("namespace") == ns && field("name") == name && same_uid {
        return Ok(());
    }
    Err(format!("it is bound to persistentvolumeclaim {}/{}, not {ns}/{name}", field("namespace"), field("name")))
}

/// A volume the masters' local-path provisioner made for this node.
fn provisioned_here(pv: &Value) -> bool {
    use capstan_proto::k8s::storage::{LOCAL_PATH_PROVISIONER, PROVISIONED_BY};
    pv["metadata"]["annotations"][PROVISIONED_BY] == LOCAL_PATH_PROVISIONER
}

/// Where a PV's data is on this host: a hostPath (checked as a hostPath
/// volume) or a local path (which must exist).
fn pv_path(spec: &Value) -> Result<(PathBuf, PathCheck), String> {
    if let Some(h) = spec.get("hostPath").filter(|h| h.is_object()) {
        let (path, kind) = host_path_of(h)?;
        return Ok((path, PathCheck::HostPath(kind)));
    }
    if let Some(l) = spec.get("local").filter(|l| l.is_object()) {
        let path = l["path"].as_str().unwrap_or_default();
        if !path.starts_with('/') {
            return Err(format!("local path {path:?} must be absolute"));
        }
        return Ok((PathBuf::from(path), PathCheck::Exists));
    }
    match capstan_proto::k8s::storage::volume_sources(spec).first() {
        Some(source) => {
            Err(format!("unsupported volume source {source:?} (capstan-node mounts hostPath and local volumes)"))
        }
        None => Err("it has no volume source".into()),
    }
}

/// Whether a PV's `nodeAffinity` lets it be used on `node`: no `required`
/// selector, or one of its terms matches (Kubernetes' rules: the terms
/// are ORed, a term's requirements ANDed, an empty term matches nothing).
pub fn node_affinity_admits(affinity: &Value, node: &NodeInfo) -> bool {
    let required = &affinity["required"];
    if !required.is_object() {
        return true;
    }
    let labels = node.all_labels();
    required["nodeSelectorTerms"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|t| NodeSelectorTerm::parse(t).matches(&labels, &node.name))
}
