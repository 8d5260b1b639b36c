//! What the masters and the node agents agree on about storage objects.

use serde_json::Value;

/// The annotation naming who provisioned a PersistentVolume.
pub const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// Capstan's provisioner of node-local directories (the default class's).
pub const LOCAL_PATH_PROVISIONER: &str = "capstan.io/local-path";

/// The Node annotation a node agent names the directory its local-path
/// volumes live under with (an absolute path).
pub const LOCAL_PATH_ROOT: &str = "capstan.io/local-path-root";

/// PersistentVolume spec fields that are not a volume source.
const NOT_SOURCES: &[&str] = &[
    "accessModes",
    "capacity",
    "claimRef",
    "mountOptions",
    "nodeAffinity",
    "persistentVolumeReclaimPolicy",
    "storageClassName",
    "volumeAttributesClassName",
    "volumeMode",
];

/// The volume sources a PersistentVolume's spec names (one is valid).
pub fn volume_sources(spec: &Value) -> Vec<&str> {
    spec.as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| !NOT_SOURCES.contains(&k.as_str()) && v.is_object())
        .map(|(k, _)| k.as_str())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_the_fields_that_are_not_common_to_all() {
        let spec = serde_json::json!({"capacity": {"storage": "1Gi"}, "hostPath": {"path": "/a"},
            "nfs": {"server": "s"}, "claimRef": {"name": "c"}, "local": "not an object"});
        assert_eq!(volume_sources(&spec), ["hostPath", "nfs"]);
    }
}
