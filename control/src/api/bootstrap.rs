//! Objects every cluster has from the start: the built-in namespaces and
//! the RBAC roles and bindings Kubernetes bootstraps (cluster-admin for
//! `system:masters`, discovery and self-review for every authenticated user,
//! and the admin/edit/view roles for binding to users), the system
//! priority classes, the default StorageClass, and the `kubernetes` and
//! `kube-dns` Services.
//!
//! Every master ensures them when it starts; creates compare
//! `create_revision == 0`, so concurrent masters and restarts are harmless
//! and objects an operator changed are left alone.

use std::time::Duration;

use capstan_proto::k8s::registry;
use serde_json::{json, Value};

use super::status::ApiError;
use super::ApiServer;

const BUILTIN_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

fn read_verbs() -> Value {
    json!(["get", "list", "watch"])
}

fn write_verbs() -> Value {
    json!(["create", "delete", "deletecollection", "patch", "update"])
}

/// Namespaced resources grouped by API group, optionally without some.
fn namespaced_rules(verbs: Value, skip: &[&str]) -> Vec<Value> {
    let mut by_group: Vec<(&str, Vec<String>)> = Vec::new();
    for t in registry::all().iter().filter(|t| t.namespaced && !skip.contains(&t.plural)) {
        let mut names = vec![t.plural.to_string()];
        names.extend(
            t.subresources
                .iter()
                // Like Kubernetes' view role: reading pods is not entering them.
                .filter(|s| !matches!(**s, "exec" | "attach" | "portforward") || verbs != read_verbs())
                .map(|s| format!("{}/{s}", t.plural)),
        );
        match by_group.iter_mut().find(|(g, _)| *g == t.group) {
            Some((_, r)) => r.extend(names),
            None => by_group.push((t.group, names)),
        }
    }
    by_group.into_iter().map(|(g, r)| json!({"apiGroups": [g], "resources": r, "verbs": verbs})).collect()
}

fn cluster_role(name: &str, rules: Vec<Value>) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}}, "rules": rules})
}

fn group_binding(name: &str, role: &str, group: &str) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}]})
}

pub fn builtin_objects() -> Vec<Value> {
    let mut out: Vec<Value> = BUILTIN_NAMESPACES
        .iter()
        .map(|n| json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}))
        .collect();
    let rbac_kinds = ["roles", "rolebindings"];
    let mut view = namespaced_rules(read_verbs(), &["secrets", "roles", "rolebindings"]);
    view.push(json!({"apiGroups": [""], "resources": ["namespaces"], "verbs": read_verbs()}));
    // What metrics-server's system:aggregated-metrics-reader grants.
    view.push(json!({"apiGroups": ["metrics.k8s.io"], "resources": ["pods", "nodes"], "verbs": read_verbs()}));
    let mut edit = view.clone();
    edit.extend(
        namespaced_rules(read_verbs(), &[])
            .into_iter()
            .filter(|r| r["resources"].as_array().is_some_and(|x| x.iter().any(|n| n == "secrets"))),
    );
    let mut skip = rbac_kinds.to_vec();
    skip.push("events");
    edit.extend(namespaced_rules(write_verbs(), &skip));
    let mut admin = edit.clone();
    admin.push(json!({"apiGroups": ["rbac.authorization.k8s.io"], "resources": rbac_kinds, "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]}));
    out.extend([
        cluster_role("cluster-admin", vec![
            json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}),
            json!({"nonResourceURLs": ["*"], "verbs": ["*"]}),
        ]),
        cluster_role("admin", admin),
        cluster_role("edit", edit),
        cluster_role("view", view),
        cluster_role("system:discovery", vec![json!({"nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz", "/version", "/version/"], "verbs": ["get"]})]),
        cluster_role("system:basic-user", vec![
            json!({"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]}),
            json!({"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]}),
        ]),
        group_binding("cluster-admin", "cluster-admin", "system:masters"),
        group_binding("system:discovery", "system:discovery", "system:authenticated"),
        group_binding("system:basic-user", "system:basic-user", "system:authenticated"),
    ]);
    out.extend(super::priority::SYSTEM_CLASSES.iter().map(|(name, value, description)| {
        json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass", "metadata": {"name": name},
            "value": value, "description": description, "preemptionPolicy": "PreemptLowerPriority"})
    }));
    out.push(super::storage::builtin_class());
    out.extend(builtin_services());
    out
}

/// `default/kubernetes` (the API, endpoints kept by `apiservers.rs`) and
/// `kube-system/kube-dns` (every pod's nameserver, answered by each node
/// itself: node/src/dns.rs), at their fixed cluster IPs, without
/// selectors.
fn builtin_services() -> [Value; 2] {
    use capstan_proto::k8s::network::{CLUSTER_DNS_IP, KUBERNETES_SERVICE_IP};
    let kubernetes = KUBERNETES_SERVICE_IP.to_string();
    let dns = CLUSTER_DNS_IP.to_string();
    [
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default",
                "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": kubernetes, "clusterIPs": [kubernetes],
                "sessionAffinity": "None",
                "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 443}]}}),
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "kube-dns", "namespace": "kube-system",
                "labels": {"k8s-app": "kube-dns", "kubernetes.io/cluster-service": "true", "kubernetes.io/name": "CoreDNS"}},
            "spec": {"type": "ClusterIP", "clusterIP": dns, "clusterIPs": [dns], "sessionAffinity": "None",
                "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]}}),
    ]
}

/// Creates whatever of [`builtin_objects`] is missing.
pub async fn ensure(api: &ApiServer) -> Result<usize, ApiError> {
    let mut created = 0;
    for obj in builtin_objects() {
        let av = obj["apiVersion"].as_str().unwrap_or_default();
        let rt = registry::by_kind(av, obj["kind"].as_str().unwrap_or_default())
            .ok_or_else(|| ApiError::internal("built-in object of an unserved kind"))?;
        let name = obj["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let ns = obj["metadata"]["namespace"].as_str().map(str::to_string);
        if api.objects.get(rt, ns.as_deref(), &name).await?.is_some() {
            continue;
        }
        let obj = super::admission::prepare_create(
            rt,
            ns.as_deref(),
            obj,
            &super::handlers::now(),
            &uuid::Uuid::new_v4().to_string(),
            "",
        )?;
        match api.objects.create(rt, obj).await {
            Ok(_) => created += 1,
            Err(e) if e.code == 409 => {}
            // A cluster from before the fixed Service addresses may have
            // given 10.96.0.1 or .10 to a Service of its own: keep it, and
            // go on with the rest.
            Err(e) if e.code == 422 => tracing::warn!(object = %name, "built-in object not created: {}", e.message),
            Err(e) => return Err(e),
        }
    }
    Ok(created)
}

/// Retries [`ensure`] until it succeeds (the cluster may still be electing).
pub async fn ensure_forever(api: std::sync::Arc<ApiServer>) {
    loop {
        match ensure(&api).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(created = n, "built-in namespaces and RBAC roles created");
                }
                return;
            }
            Err(e) => {
                tracing::debug!("built-in objects not yet ensured: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_objects_pass_admission() {
        for obj in builtin_objects() {
            let rt = registry::by_kind(obj["apiVersion"].as_str().unwrap(), obj["kind"].as_str().unwrap()).unwrap();
            let n = (rt.normalize)(&obj).unwrap();
            assert!(capstan_proto::k8s::fields::unknown_fields(&obj, &n).is_empty());
            super::super::admission::prepare_create(rt, obj["metadata"]["namespace"].as_str(), n, "t", "u", "")
                .unwrap();
        }
    }
}
