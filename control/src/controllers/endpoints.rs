//! Endpoints and EndpointSlice controller: for every Service with a
//! selector, the addresses of the pods it selects — ready ones in
//! `addresses`, the others in `notReadyAddresses` (slices: conditions) —
//! with each port's `targetPort` resolved against the pod (named ports may
//! differ per pod, so pods are grouped into one subset per port set).
//!
//! [`endpoints`] and [`slice`] are pure; the shell writes the results and
//! deletes them when their Service goes.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::informer::Informer;
use super::runtime::{ReconcileResult, Reconciler};
use crate::api::objects::Found;
use crate::api::{internal, ApiServer};

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
const MANAGED_BY: &str = "endpointslice-controller.k8s.io";

fn selects(selector: &Value, pod: &Value) -> bool {
    let labels = &pod["metadata"]["labels"];
    selector.as_object().is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The port a Service port reaches on `pod`, if the pod has it.
fn target_port(port: &Value, pod: &Value) -> Option<i64> {
    match &port["targetPort"] {
        Value::Number(n) => n.as_i64(),
        Value::String(name) => pod["spec"]["containers"]
            .as_array()?
            .iter()
            .flat_map(|c| c["ports"].as_array().into_iter().flatten())
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64()),
        _ => port["port"].as_i64(),
    }
}

/// Pods the Service selects and that can receive traffic at all.
fn members<'a>(svc: &Value, pods: &'a [Value]) -> Vec<&'a Value> {
    let publish_not_ready = svc["spec"]["publishNotReadyAddresses"] == true;
    pods.iter()
        .filter(|p| selects(&svc["spec"]["selector"], p))
        .filter(|p| p["status"]["podIP"].as_str().is_some_and(|ip| !ip.is_empty()))
        .filter(|p| publish_not_ready || !p["metadata"]["deletionTimestamp"].is_string())
        .filter(|p| !matches!(p["status"]["phase"].as_str(), Some("Succeeded" | "Failed")))
        .collect()
}

/// A pod naming this Service as its subdomain is known in DNS by its
/// hostname (StatefulSet pods: `<pod>.<service>.<ns>.svc`).
fn dns_hostname<'a>(svc: &Value, p: &'a Value) -> Option<&'a str> {
    let h = p["spec"]["hostname"].as_str().filter(|h| !h.is_empty())?;
    (p["spec"]["subdomain"] == svc["metadata"]["name"]).then_some(h)
}

fn target_ref(p: &Value) -> Value {
    json!({"kind": "Pod", "namespace": p["metadata"]["namespace"], "name": p["metadata"]["name"], "uid": p["metadata"]["uid"]})
}

fn resolved_ports(svc: &Value, pod: &Value) -> Vec<Value> {
    svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|sp| {
            let mut p = json!({"port": target_port(sp, pod)?, "protocol": sp["protocol"].as_str().unwrap_or("TCP")});
            if let Some(n) = sp["name"].as_str() {
                p["name"] = json!(n);
            }
            Some(p)
        })
        .collect()
}

/// One subset being built: ready addresses, not-ready addresses, ports.
type Subset = (Vec<Value>, Vec<Value>, Vec<Value>);

/// The Endpoints object for `svc`, or None when it has no selector.
pub fn endpoints(svc: &Value, pods: &[Value]) -> Option<Value> {
    if svc["spec"]["selector"].as_object().is_none_or(|s| s.is_empty()) {
        return None;
    }
    let publish_not_ready = svc["spec"]["publishNotReadyAddresses"] == true;
    let mut subsets: BTreeMap<String, Subset> = BTreeMap::new();
    for p in members(svc, pods) {
        let ports = resolved_ports(svc, p);
        let entry = subsets.entry(serde_json::to_string(&ports).unwrap_or_default()).or_insert((vec![], vec![], ports));
        let mut addr = json!({"ip": p["status"]["podIP"], "targetRef": target_ref(p)});
        if let Some(h) = dns_hostname(svc, p) {
            addr["hostname"] = json!(h);
        }
        if let Some(n) = p["spec"]["nodeName"].as_str() {
            addr["nodeName"] = json!(n);
        }
        if super::replicaset::is_ready(p) || publish_not_ready {
            entry.0.push(addr);
        } else {
            entry.1.push(addr);
        }
    }
    let subsets: Vec<Value> = subsets
        .into_values()
        .map(|(ready, not_ready, ports)| {
            let mut s = json!({});
            if !ready.is_empty() {
                s["addresses"] = Value::Array(ready);
            }
            if !not_ready.is_empty() {
                s["notReadyAddresses"] = Value::Array(not_ready);
            }
            if !ports.is_empty() {
                s["ports"] = Value::Array(ports);
            }
            s
        })
        .collect();
    let meta = &svc["metadata"];
    let mut ep = json!({"apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "labels": meta["labels"]}});
    if !subsets.is_empty() {
        ep["subsets"] = Value::Array(subsets);
    }
    if ep["metadata"]["labels"].is_null() {
        ep["metadata"].as_object_mut().map(|m| m.remove("labels"));
    }
    Some(ep)
}

/// The EndpointSlice for `svc` (all its endpoints in one slice).
pub fn slice(svc: &Value, pods: &[Value]) -> Option<Value> {
    endpoints(svc, pods)?;
    let meta = &svc["metadata"];
    let name = meta["name"].as_str().unwrap_or_default();
    let members = members(svc, pods);
    let ports = members.first().map(|p| resolved_ports(svc, p)).unwrap_or_default();
    let endpoints: Vec<Value> = members
        .iter()
        .map(|p| {
            let ready = super::replicaset::is_ready(p);
            let terminating = p["metadata"]["deletionTimestamp"].is_string();
            let mut e = json!({"addresses": [p["status"]["podIP"]],
                "conditions": {"ready": ready && !terminating, "serving": ready, "terminating": terminating},
                "targetRef": target_ref(p)});
            if let Some(h) = dns_hostname(svc, p) {
                e["hostname"] = json!(h);
            }
            if let Some(n) = p["spec"]["nodeName"].as_str() {
                e["nodeName"] = json!(n);
            }
            e
        })
        .collect();
    Some(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"generateName": format!("{name}-"), "namespace": meta["namespace"],
            "labels": {SERVICE_NAME_LABEL: name, "endpointslice.kubernetes.io/managed-by": MANAGED_BY},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": name, "uid": meta["uid"],
                "controller": true, "blockOwnerDeletion": true}]},
        "addressType": "IPv4", "endpoints": endpoints, "ports": ports}))
}

pub struct EndpointsController {
    pub api: Arc<ApiServer>,
    pub services: Arc<Informer>,
    pub pods: Arc<Informer>,
    pub endpoints: Arc<Informer>,
    pub slices: Arc<Informer>,
}

impl EndpointsController {
    /// Services in the pod's namespace whose selector matches it.
    /// Runs for every pod change: only the pod's labels are needed, read
    /// from its archive.
    pub fn keys_for_pod(&self, pod: &super::informer::Cached) -> Vec<String> {
        let services = self.services.list_namespace(pod.namespace());
        if services.is_empty() {
            return vec![];
        }
        let obj = json!({"metadata": {"labels": pod.labels()}});
        services.into_iter().filter(|s| selects(&s.object()["spec"]["selector"], &obj)).map(|s| s.key.clone()).collect()
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let err = |e: crate::api::status::ApiError| e.to_string();
        let current_ep = self.endpoints.get(&key);
        let Some(svc) = self.services.get(&key) else {
            // Service gone: its Endpoints go too (slices go with their owner, by GC).
            if let Some(c) = current_ep {
                let found = c.found();
                internal::delete(&self.api, self.endpoints.rt, &found).await.map_err(err)?;
            }
            return Ok(None);
        };
        let svc = svc.object();
        let ns = svc["metadata"]["namespace"].as_str().unwrap_or_default().to_string();
        let pods: Vec<Value> = self.pods.list_namespace(&ns).iter().map(|p| p.object()).collect();
        let Some(want) = endpoints(&svc, &pods) else { return Ok(None) };
        match current_ep {
            None => {
                internal::write(&self.api, self.endpoints.rt, None, want, "endpoint-controller").await.map_err(err)?;
            }
            Some(c) => {
                let cur = c.object();
                if cur["subsets"] != want["subsets"] {
                    let mut next = cur.clone();
                    match want.get("subsets") {
                        Some(s) => next["subsets"] = s.clone(),
                        None => {
                            next.as_object_mut().map(|m| m.remove("subsets"));
                        }
                    }
                    let found = Found { object: cur, mod_revision: c.mod_revision };
                    internal::write(&self.api, self.endpoints.rt, Some(&found), next, "endpoint-controller")
                        .await
                        .map_err(err)?;
                }
            }
        }
        let Some(want) = slice(&svc, &pods) else { return Ok(None) };
        let name = svc["metadata"]["name"].as_str().unwrap_or_default();
        let existing = self
            .slices
            .list_namespace(&ns)
            .into_iter()
            .find(|s| s.object()["metadata"]["labels"][SERVICE_NAME_LABEL] == name);
        match existing {
            None => {
                internal::write(&self.api, self.slices.rt, None, want, "endpointslice-controller")
                    .await
                    .map_err(err)?;
            }
            Some(c) => {
                let cur = c.object();
                if cur["endpoints"] != want["endpoints"] || cur["ports"] != want["ports"] {
                    let mut next = cur.clone();
                    next["endpoints"] = want["endpoints"].clone();
                    next["ports"] = want["ports"].clone();
                    let found = Found { object: cur, mod_revision: c.mod_revision };
                    internal::write(&self.api, self.slices.rt, Some(&found), next, "endpointslice-controller")
                        .await
                        .map_err(err)?;
                }
            }
        }
        Ok(None)
    }
}

impl Reconciler for EndpointsController {
    fn name(&self) -> &'static str {
        "endpoints"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.services.list().iter().map(|c| c.key.clone()).collect();
        keys.extend(self.endpoints.list().iter().map(|c| c.key.clone()));
        keys.sort();
        keys.dedup();
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool, port_name: &str, port: i64) -> Value {
        let mut p = json!({"metadata": {"name": name, "namespace": "d", "uid": name, "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": port_name, "containerPort": port}]}]},
            "status": {"phase": "Running", "podIP": ip}});
        if ready {
            p["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
        }
        p
    }

    fn svc(target: Value) -> Value {
        json!({"metadata": {"name": "web", "namespace": "d", "uid": "s1"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}]}})
    }

    #[test]
    fn ready_and_not_ready_addresses_with_resolved_ports() {
        let pods = [
            pod("a", "10.0.0.1", true, "web", 8080),
            pod("b", "10.0.0.2", false, "web", 8080),
            pod("c", "", true, "web", 8080),
        ];
        let ep = endpoints(&svc(json!("web")), &pods).unwrap();
        let s = &ep["subsets"][0];
        assert_eq!(s["addresses"][0]["ip"], "10.0.0.1");
        assert_eq!(s["notReadyAddresses"][0]["ip"], "10.0.0.2");
        assert_eq!(s["ports"], json!([{"name": "http", "port": 8080, "protocol": "TCP"}]));
        assert_eq!(ep["subsets"].as_array().unwrap().len(), 1, "the pod without an IP is left out");
        let sl = slice(&svc(json!("web")), &pods).unwrap();
        assert_eq!(sl["endpoints"].as_array().unwrap().len(), 2);
        assert_eq!(sl["endpoints"][1]["conditions"]["ready"], false);
        assert_eq!(sl["metadata"]["labels"][SERVICE_NAME_LABEL], "web");
    }

    #[test]
    fn pods_in_the_services_subdomain_are_named_by_hostname() {
        let mut named = pod("web-0", "10.0.0.1", true, "web", 8080);
        named["spec"]["hostname"] = json!("web-0");
        named["spec"]["subdomain"] = json!("web");
        let mut elsewhere = pod("x-0", "10.0.0.2", true, "web", 8080);
        elsewhere["spec"]["hostname"] = json!("x-0");
        elsewhere["spec"]["subdomain"] = json!("other");
        let ep = endpoints(&svc(json!("web")), &[named, elsewhere]).unwrap();
        let addrs = &ep["subsets"][0]["addresses"];
        assert_eq!(addrs[0]["hostname"], "web-0");
        assert!(addrs[1].get("hostname").is_none(), "{addrs}");
    }

    #[test]
    fn named_ports_that_differ_split_subsets_and_no_selector_means_no_endpoints() {
        let pods = [pod("a", "10.0.0.1", true, "web", 8080), pod("b", "10.0.0.2", true, "web", 9090)];
        assert_eq!(endpoints(&svc(json!("web")), &pods).unwrap()["subsets"].as_array().unwrap().len(), 2);
        assert_eq!(endpoints(&svc(json!(7000)), &pods).unwrap()["subsets"][0]["ports"][0]["port"], 7000);
        let mut manual = svc(json!(80));
        manual["spec"].as_object_mut().unwrap().remove("selector");
        assert!(endpoints(&manual, &pods).is_none());
    }
}
