//! The node authorizer and node bookkeeping, pure: what a node may read,
//! which identity a certificate carries, and which pod CIDR a new node gets.
//!
//! What a node may read, as Kubernetes' node authorizer: the Secrets,
//! ConfigMaps and PersistentVolumeClaims its pods reference
//! ([`references`]), and a PersistentVolume that such a claim is bound to
//! ([`claim_volume`]) or that is pinned to the node ([`pinned_to`]: its
//! own local volumes, which its reclaimer checks). A PersistentVolume that
//! does not exist is answered 404 (the gateway's shell), so the node can
//! tell "gone" from "forbidden".

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use capstan_proto::nodewire::AgentEvent;
use serde_json::Value;

/// A Secret, ConfigMap or PersistentVolumeClaim a pod references:
/// (resource, name) in its namespace.
pub type Reference = (&'static str, String);

/// The namespaced resources a node may read when a pod references them:
/// (resource, kind).
pub fn readable(resource: &str) -> Option<(&'static str, &'static str)> {
    [("secrets", "Secret"), ("configmaps", "ConfigMap"), ("persistentvolumeclaims", "PersistentVolumeClaim")]
        .into_iter()
        .find(|(r, _)| *r == resource)
}

/// Everything `pod` lets its node read, as Kubernetes' node authorizer
/// derives it: volumes (secret, configMap, projected sources,
/// persistentVolumeClaim, and the claim `<pod>-<volume>` of a generic
/// ephemeral volume), env and envFrom of every container and init
/// container, and imagePullSecrets.
pub fn references(pod: &Value) -> BTreeSet<Reference> {
    let mut out = BTreeSet::new();
    let mut add = |resource: &'static str, name: &Value| {
        if let Some(n) = name.as_str().filter(|n| !n.is_empty()) {
            out.insert((resource, n.to_string()));
        }
    };
    let spec = &pod["spec"];
    for v in spec["volumes"].as_array().into_iter().flatten() {
        add("secrets", &v["secret"]["secretName"]);
        add("configmaps", &v["configMap"]["name"]);
        add("persistentvolumeclaims", &v["persistentVolumeClaim"]["claimName"]);
        if v["ephemeral"].is_object() {
            let (pod_name, volume) = (&pod["metadata"]["name"], &v["name"]);
            if let (Some(p), Some(v)) = (pod_name.as_str(), volume.as_str()) {
                add("persistentvolumeclaims", &Value::String(format!("{p}-{v}")));
            }
        }
        for src in v["projected"]["sources"].as_array().into_iter().flatten() {
            add("secrets", &src["secret"]["name"]);
            add("configmaps", &src["configMap"]["name"]);
        }
    }
    for list in ["containers", "initContainers", "ephemeralContainers"] {
        for c in spec[list].as_array().into_iter().flatten() {
            for e in c["env"].as_array().into_iter().flatten() {
                add("secrets", &e["valueFrom"]["secretKeyRef"]["name"]);
                add("configmaps", &e["valueFrom"]["configMapKeyRef"]["name"]);
            }
            for e in c["envFrom"].as_array().into_iter().flatten() {
                add("secrets", &e["secretRef"]["name"]);
                add("configmaps", &e["configMapRef"]["name"]);
            }
        }
    }
    for s in spec["imagePullSecrets"].as_array().into_iter().flatten() {
        add("secrets", &s["name"]);
    }
    out
}

/// The volume a claim names (`spec.volumeName`), once the binder set it.
pub fn claim_volume(pvc: &Value) -> Option<&str> {
    pvc["spec"]["volumeName"].as_str().filter(|v| !v.is_empty())
}

/// The claim a PersistentVolume says it is bound to: (namespace, name).
pub fn claim_ref(pv: &Value) -> Option<(&str, &str)> {
    let r = &pv["spec"]["claimRef"];
    Some((r["namespace"].as_str()?, r["name"].as_str()?))
}

/// Whether a PersistentVolume is pinned to `node`: a term of its required
/// nodeAffinity asks for `kubernetes.io/hostname` In a list naming the
/// node (how the local-path provisioner pins the volumes it makes), or for
/// the field `metadata.name` In such a list (its way for a node without
/// that label).
pub fn pinned_to(pv: &Value, node: &str) -> bool {
    let terms = &pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"];
    items(terms).iter().any(|t| {
        items(&t["matchExpressions"]).iter().any(|r| requires_in(r, "kubernetes.io/hostname", node))
            || items(&t["matchFields"]).iter().any(|r| requires_in(r, "metadata.name", node))
    })
}

/// A node selector requirement `key` In a list holding `value`.
fn requires_in(r: &Value, key: &str, value: &str) -> bool {
    r["key"] == key && r["operator"] == "In" && items(&r["values"]).iter().any(|v| v.as_str() == Some(value))
}

fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The node a verified client certificate speaks for: CN
/// `system:node:<name>` in group `system:nodes`, with the clientAuth usage.
pub fn node_identity(info: &capstan_raft::pki::CertInfo) -> Option<String> {
    use capstan_proto::nodewire::{NODES_GROUP, NODE_USER_PREFIX};
    let name = info.common_name.strip_prefix(NODE_USER_PREFIX)?;
    (info.client_auth && info.organizations.iter().any(|o| o == NODES_GROUP) && valid_node_name(name))
        .then(|| name.to_string())
}

/// The Node an agent registers must be an object whose `metadata`,
/// `metadata.labels`, `spec` and `status` are objects where present: the
/// gateway writes into them (pod CIDR, labels).
pub fn check_registration(node: &Value) -> Result<(), String> {
    let object_or_absent = |v: &Value, what: &str| {
        if v.is_null() || v.is_object() {
            Ok(())
        } else {
            Err(format!("Node {what} must be an object"))
        }
    };
    if !node.is_object() {
        return Err("a Node must be a JSON object".into());
    }
    object_or_absent(&node["metadata"], "metadata")?;
    object_or_absent(&node["metadata"]["labels"], "metadata.labels")?;
    object_or_absent(&node["metadata"]["annotations"], "metadata.annotations")?;
    object_or_absent(&node["spec"], "spec")?;
    object_or_absent(&node["status"], "status")?;
    // Volumes pinned to a node name it by this label (local-path node
    // affinity): a node may not claim another's.
    let hostname = &node["metadata"]["labels"]["kubernetes.io/hostname"];
    if !hostname.is_null() && *hostname != node["metadata"]["name"] {
        return Err(format!("label kubernetes.io/hostname={hostname} must be the node's own name"));
    }
    Ok(())
}

/// An Event an agent reports must look like the kubelet's: a CamelCase
/// reason, a bounded message, a container name that is a DNS-1123 label.
pub fn check_event(e: &AgentEvent) -> Result<(), String> {
    let reason_ok =
        !e.reason.is_empty() && e.reason.len() <= 128 && e.reason.bytes().all(|b| b.is_ascii_alphanumeric());
    if !reason_ok {
        return Err(format!("event reason {:?} is not 1-128 letters and digits", e.reason));
    }
    if e.message.len() > MAX_EVENT_MESSAGE {
        return Err(format!("event message longer than {MAX_EVENT_MESSAGE} bytes"));
    }
    if let Some(c) = &e.container {
        let label_ok = !c.is_empty() && c.len() <= 63 && !c.contains('.') && valid_node_name(c);
        if !label_ok {
            return Err(format!("container name {c:?} is not a DNS-1123 label"));
        }
    }
    Ok(())
}

/// Longest event message accepted (Kubernetes' events.k8s.io note limit).
pub const MAX_EVENT_MESSAGE: usize = 1024;

/// A node name is a DNS-1123 subdomain (Kubernetes' rule for Node names).
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The cluster's pod network, split into one /24 per node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClusterCidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

pub const NODE_PREFIX: u8 = 24;

impl ClusterCidr {
    pub fn parse(s: &str) -> Result<ClusterCidr, String> {
        let (ip, len) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
        let base: Ipv4Addr = ip.parse().map_err(|_| format!("{ip:?} is not an IPv4 address"))?;
        let prefix: u8 = len.parse().map_err(|_| format!("{len:?} is not a prefix length"))?;
        if !(8..=NODE_PREFIX).contains(&prefix) {
            return Err(format!("the cluster CIDR's prefix must be between /8 and /{NODE_PREFIX}, got /{prefix}"));
        }
        let mask = u32::MAX << (32 - prefix);
        if u32::from(base) & !mask != 0 {
            return Err(format!("{s} has host bits set"));
        }
        Ok(ClusterCidr { base, prefix })
    }

    pub fn blocks(&self) -> u32 {
        1 << (NODE_PREFIX - self.prefix)
    }

    pub fn block(&self, i: u32) -> String {
        let ip = Ipv4Addr::from(u32::from(self.base) + (i << (32 - NODE_PREFIX)));
        format!("{ip}/{NODE_PREFIX}")
    }

    /// The first block not in `used`, starting at `from` (so concurrent
    /// registrations that lost a race try the next one).
    pub fn free_block(&self, used: &BTreeSet<String>, from: u32) -> Option<String> {
        (from..self.blocks()).map(|i| self.block(i)).find(|b| !used.contains(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn agent_events_must_look_like_the_kubelets() {
        let ok = AgentEvent {
            namespace: "d".into(),
            pod: "p".into(),
            uid: "u".into(),
            container: Some("web-1".into()),
            warning: true,
            reason: "Unhealthy".into(),
            message: "Liveness probe failed: HTTP probe failed with statuscode: 500".into(),
        };
        assert_eq!(check_event(&ok), Ok(()));
        assert_eq!(check_event(&AgentEvent { container: None, ..ok.clone() }), Ok(()));
        for reason in ["", "Not Camel", "a:b", &"R".repeat(129)] {
            assert!(check_event(&AgentEvent { reason: reason.into(), ..ok.clone() }).is_err(), "{reason:?}");
        }
        let long = AgentEvent { message: "m".repeat(MAX_EVENT_MESSAGE + 1), ..ok.clone() };
        assert!(check_event(&long).unwrap_err().contains("longer than"));
        for c in ["", "Web", "a.b", "-a", &"c".repeat(64)] {
            assert!(check_event(&AgentEvent { container: Some(c.into()), ..ok.clone() }).is_err(), "{c:?}");
        }
    }

    #[test]
    fn a_pod_references_what_its_volumes_env_and_pull_secrets_name() {
        let pod = json!({"spec": {
            "volumes": [
                {"name": "a", "secret": {"secretName": "s1"}},
                {"name": "b", "configMap": {"name": "c1"}},
                {"name": "c", "projected": {"sources": [{"secret": {"name": "s2"}}, {"configMap": {"name": "c2"}}, {"downwardAPI": {}}]}},
                {"name": "d", "emptyDir": {}}
            ],
            "initContainers": [{"name": "i", "envFrom": [{"secretRef": {"name": "s3"}}, {"configMapRef": {"name": "c3"}}]}],
            "containers": [{"name": "x", "env": [
                {"name": "A", "valueFrom": {"secretKeyRef": {"name": "s4", "key": "k"}}},
                {"name": "B", "valueFrom": {"configMapKeyRef": {"name": "c4", "key": "k"}}},
                {"name": "C", "value": "plain"},
                {"name": "D", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
            ]}],
            "imagePullSecrets": [{"name": "pull"}, {"name": ""}]
        }});
        let got: Vec<String> = references(&pod).into_iter().map(|(r, n)| format!("{r}/{n}")).collect();
        assert_eq!(
            got,
            [
                "configmaps/c1",
                "configmaps/c2",
                "configmaps/c3",
                "configmaps/c4",
                "secrets/pull",
                "secrets/s1",
                "secrets/s2",
                "secrets/s3",
                "secrets/s4"
            ]
        );
        assert!(references(&json!({})).is_empty());
    }

    #[test]
    fn a_pod_references_its_claims_and_its_ephemeral_volumes_claims() {
        let pod = json!({"metadata": {"name": "web-0", "namespace": "d"}, "spec": {"volumes": [
            {"name": "data", "persistentVolumeClaim": {"claimName": "data-web-0", "readOnly": true}},
            {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
            {"name": "empty", "persistentVolumeClaim": {"claimName": ""}},
            {"name": "h", "hostPath": {"path": "/x"}}
        ]}});
        let got: Vec<String> = references(&pod).into_iter().map(|(r, n)| format!("{r}/{n}")).collect();
        assert_eq!(got, ["persistentvolumeclaims/data-web-0", "persistentvolumeclaims/web-0-scratch"]);
        assert_eq!(readable("persistentvolumeclaims"), Some(("persistentvolumeclaims", "PersistentVolumeClaim")));
        assert_eq!(readable("secrets"), Some(("secrets", "Secret")));
        for other in ["persistentvolumes", "pods", "nodes", "serviceaccounts", ""] {
            assert_eq!(readable(other), None, "{other}");
        }
    }

    #[test]
    fn a_persistent_volume_is_readable_when_claimed_or_pinned_to_the_node() {
        let pinned = |values: Value, op: &str| {
            json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": op, "values": values}]}
            ]}}}})
        };
        assert!(pinned_to(&pinned(json!(["n1"]), "In"), "n1"));
        assert!(pinned_to(&pinned(json!(["n0", "n1"]), "In"), "n1"));
        assert!(!pinned_to(&pinned(json!(["n1"]), "In"), "n2"));
        assert!(!pinned_to(&pinned(json!(["n2"]), "NotIn"), "n1"), "NotIn does not pin");
        assert!(!pinned_to(&pinned(json!("n1"), "In"), "n1"));
        let fields = json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}
        ]}}}});
        assert!(pinned_to(&fields, "n1") && !pinned_to(&fields, "n2"));
        let label_as_field = json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}]}
        ]}}}});
        assert!(!pinned_to(&label_as_field, "n1"));
        assert!(!pinned_to(&json!({"spec": {"hostPath": {"path": "/x"}}}), "n1"));
        assert!(!pinned_to(&json!({"spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": "x"}}}}), "n1"));

        let pvc = json!({"spec": {"volumeName": "pvc-1"}, "status": {"phase": "Bound"}});
        assert_eq!(claim_volume(&pvc), Some("pvc-1"));
        assert_eq!(claim_volume(&json!({"spec": {"volumeName": ""}})), None);
        assert_eq!(claim_volume(&json!({"spec": {}})), None);
        let pv = json!({"spec": {"claimRef": {"kind": "PersistentVolumeClaim", "namespace": "d", "name": "data"}}});
        assert_eq!(claim_ref(&pv), Some(("d", "data")));
        assert_eq!(claim_ref(&json!({"spec": {}})), None);
    }

    fn info(cn: &str, groups: &[&str], client: bool) -> capstan_raft::pki::CertInfo {
        capstan_raft::pki::CertInfo {
            common_name: cn.into(),
            organizations: groups.iter().map(|g| g.to_string()).collect(),
            server_auth: false,
            client_auth: client,
            not_after_unix: 0,
            member_id: None,
        }
    }

    #[test]
    fn only_a_node_certificate_speaks_for_a_node() {
        assert_eq!(node_identity(&info("system:node:n1", &["system:nodes"], true)), Some("n1".into()));
        assert_eq!(node_identity(&info("system:node:n1", &[], true)), None, "group required");
        assert_eq!(node_identity(&info("system:node:n1", &["system:nodes"], false)), None, "clientAuth required");
        assert_eq!(node_identity(&info("admin", &["system:masters"], true)), None);
        assert_eq!(node_identity(&info("system:node:Bad_Name", &["system:nodes"], true)), None);
        assert!(valid_node_name("node-1.example"));
        for bad in ["", "-a", "a-", "a..b", "UPPER", "a_b", &"x".repeat(254)] {
            assert!(!valid_node_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn registrations_the_gateway_writes_into_must_be_objects() {
        assert!(check_registration(&json!({"metadata": {"name": "n", "labels": {"a": "b"}}, "status": {}})).is_ok());
        assert!(check_registration(&json!({"metadata": {"name": "n"}})).is_ok());
        let annotated = json!({"metadata": {"name": "n", "annotations": {"capstan.io/local-path-root": "/lp"}}});
        assert!(check_registration(&annotated).is_ok());
        assert!(
            check_registration(&json!({"metadata": {"name": "n", "labels": {"kubernetes.io/hostname": "n"}}})).is_ok()
        );
        for bad in [
            json!([]),
            json!({"metadata": {"name": "n"}, "spec": "x"}),
            json!({"metadata": {"name": "n", "labels": [1]}}),
            json!({"metadata": {"name": "n", "annotations": "a=b"}}),
            json!({"metadata": {"name": "n"}, "status": 3}),
            json!({"metadata": {"name": "n", "labels": {"kubernetes.io/hostname": "other"}}}),
        ] {
            assert!(check_registration(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pod_cidrs_are_per_node_blocks_of_the_cluster_cidr() {
        let c = ClusterCidr::parse("10.244.0.0/16").unwrap();
        assert_eq!(c.blocks(), 256);
        assert_eq!(c.block(0), "10.244.0.0/24");
        assert_eq!(c.block(255), "10.244.255.0/24");
        let used: BTreeSet<String> = ["10.244.0.0/24".to_string(), "10.244.2.0/24".to_string()].into();
        assert_eq!(c.free_block(&used, 0).as_deref(), Some("10.244.1.0/24"));
        assert_eq!(c.free_block(&used, 2).as_deref(), Some("10.244.3.0/24"));
        assert_eq!(c.free_block(&used, 256), None);
        let tiny = ClusterCidr::parse("10.9.9.0/24").unwrap();
        assert_eq!(tiny.free_block(&["10.9.9.0/24".to_string()].into(), 0), None, "exhausted");
        for bad in ["10.244.0.0", "10.244.0.1/16", "10.0.0.0/4", "10.0.0.0/25", "x/16", "::1/64"] {
            assert!(ClusterCidr::parse(bad).is_err(), "{bad}");
        }
    }
}
