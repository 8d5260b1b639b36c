//! `metrics.k8s.io/v1beta1`, served as metrics-server serves it (so
//! `kubectl top` and the HorizontalPodAutoscaler work): NodeMetrics and
//! PodMetrics built from the node agents' latest usage reports, which the
//! node gateway keeps in the store under `/capstan/metrics/nodes/<node>` on
//! a lease (see `objects.rs`), so every master answers the same.
//!
//! Only get and list (with label and field selectors); objects carry the
//! labels of the Node or Pod they describe. A node or pod without a
//! report is a 404 ("metrics not available yet"). The rendering is pure.

use std::collections::HashMap;

use capstan_proto::k8s::registry;
use capstan_proto::nodewire::{NodeUsage, PodUsage};
use serde_json::{json, Value};

use super::rbac::Attributes;
use super::request::ResourceRequest;
use super::selector::{FieldSelector, LabelSelector};
use super::status::ApiError;
use super::{ApiServer, Ctx, Reply};

pub const GROUP: &str = "metrics.k8s.io";
pub const VERSION: &str = "v1beta1";
const API_VERSION: &str = "metrics.k8s.io/v1beta1";

/// CPU as metrics-server writes it: nanocores (`123456n`).
pub fn cpu_quantity(nanocores: u64) -> String {
    format!("{nanocores}n")
}

/// Memory as a binary quantity in canonical form (`123Ki`, or plain bytes
/// when not a multiple of 1024), as metrics-server's Quantity prints it.
pub fn memory_quantity(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if bytes == 0 {
        return "0".into();
    }
    let (mut n, mut unit) = (bytes, "");
    for u in UNITS {
        if n % 1024 != 0 {
            break;
        }
        n /= 1024;
        unit = u;
    }
    format!("{n}{unit}")
}

/// A duration as Go's `time.Duration` prints it (`15s`, `1m30s`, `1h0m0s`).
pub fn go_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

fn usage(cpu: u64, memory: u64) -> Value {
    json!({"cpu": cpu_quantity(cpu), "memory": memory_quantity(memory)})
}

/// A NodeMetrics object; `node` is the Node (for its labels).
pub fn node_metrics(node: &Value, report: &NodeUsage, now: &str) -> Value {
    json!({
        "kind": "NodeMetrics", "apiVersion": API_VERSION,
        "metadata": {"name": node["metadata"]["name"], "creationTimestamp": now,
            "labels": node["metadata"]["labels"].as_object().cloned().unwrap_or_default()},
        "timestamp": report.timestamp, "window": go_duration(report.window_seconds as u64),
        "usage": usage(report.cpu_nanocores, report.memory_bytes),
    })
}

/// A PodMetrics object; `pod` is the Pod (for its labels).
pub fn pod_metrics(pod: &Value, report: &NodeUsage, p: &PodUsage, now: &str) -> Value {
    let containers: Vec<Value> =
        p.containers.iter().map(|(name, cpu, mem)| json!({"name": name, "usage": usage(*cpu, *mem)})).collect();
    json!({
        "kind": "PodMetrics", "apiVersion": API_VERSION,
        "metadata": {"name": p.name, "namespace": p.namespace, "creationTimestamp": now,
            "labels": pod["metadata"]["labels"].as_object().cloned().unwrap_or_default()},
        "timestamp": report.timestamp, "window": go_duration(report.window_seconds as u64),
        "containers": containers,
    })
}

/// Every node's latest report, by node name (undecodable ones skipped).
pub fn reports(api: &ApiServer) -> Result<HashMap<String, NodeUsage>, ApiError> {
    Ok(api
        .objects
        .node_metrics_local()?
        .into_iter()
        .filter_map(|(node, v)| serde_json::from_slice::<NodeUsage>(&v).ok().map(|u| (node, u)))
        .collect())
}

/// Each pod's usage (`namespace/name` -> its node's report and its entry).
pub fn pod_usage(reports: &HashMap<String, NodeUsage>) -> HashMap<String, (&NodeUsage, &PodUsage)> {
    let mut out = HashMap::new();
    for r in reports.values() {
        for p in &r.pods {
            out.insert(format!("{}/{}", p.namespace, p.name), (r, p));
        }
    }
    out
}

fn not_available(resource: &str, name: &str) -> ApiError {
    let mut e = ApiError::not_found(GROUP, resource, name);
    e.message = format!("{}: metrics not available yet", e.message);
    e
}

struct Selectors {
    labels: LabelSelector,
    fields: FieldSelector,
}

fn selectors(ctx: &Ctx) -> Result<Selectors, ApiError> {
    let labels =
        LabelSelector::parse(ctx.query.get("labelSelector").unwrap_or_default()).map_err(ApiError::bad_request)?;
    let fields =
        FieldSelector::parse(ctx.query.get("fieldSelector").unwrap_or_default()).map_err(ApiError::bad_request)?;
    Ok(Selectors { labels, fields })
}

impl Selectors {
    fn select(&self, obj: &Value) -> bool {
        self.labels.matches_json(&obj["metadata"]["labels"]) && self.fields.matches(obj)
    }
}

/// `GET /apis/metrics.k8s.io/v1beta1/...`: nodes and pods, get and list.
pub async fn serve(api: &ApiServer, r: ResourceRequest, ctx: &Ctx) -> Result<Reply, ApiError> {
    let kind = match r.resource.as_str() {
        "nodes" if r.version == VERSION => "Node",
        "pods" if r.version == VERSION => "Pod",
        _ => return Err(ApiError::new(404, "NotFound", "the server could not find the requested resource")),
    };
    if r.subresource.is_some() {
        return Err(ApiError::new(404, "NotFound", "the server could not find the requested resource"));
    }
    if !matches!(r.verb, "get" | "list") {
        return Err(ApiError::method_not_allowed(format!("{} supports only get and list", r.resource)));
    }
    let ns = if kind == "Pod" { r.namespace.clone() } else { None };
    let attrs = Attributes::Resource {
        verb: r.verb.to_string(),
        group: GROUP.to_string(),
        resource: r.resource.clone(),
        subresource: None,
        namespace: ns.clone(),
        name: r.name.clone(),
    };
    api.authorize(&ctx.user, &attrs)?;
    let rt = registry::by_kind("v1", kind).ok_or_else(|| ApiError::internal(format!("{kind} is not registered")))?;
    let reports = reports(api)?;
    let now = super::handlers::now();
    let pods = pod_usage(&reports);
    let render = |obj: &Value| -> Option<Value> {
        let name = obj["metadata"]["name"].as_str()?;
        if kind == "Node" {
            reports.get(name).map(|rep| node_metrics(obj, rep, &now))
        } else {
            let ns = obj["metadata"]["namespace"].as_str()?;
            pods.get(&format!("{ns}/{name}")).map(|(rep, p)| pod_metrics(obj, rep, p, &now))
        }
    };
    if let Some(name) = &r.name {
        if kind == "Pod" && ns.is_none() {
            return Err(ApiError::new(404, "NotFound", "the server could not find the requested resource"));
        }
        let obj =
            api.objects.get_local(rt, ns.as_deref(), name)?.ok_or_else(|| ApiError::not_found("", rt.plural, name))?;
        return render(&obj.object).map(Reply::ok).ok_or_else(|| not_available(&r.resource, name));
    }
    let sel = selectors(ctx)?;
    let page = api.objects.list_local(rt, ns.as_deref(), None, None, &|kv| {
        let obj = super::objects::decode_kv(kv)?;
        Ok(sel.select(&obj).then(|| render(&obj)).flatten())
    })?;
    Ok(Reply::ok(json!({
        "kind": format!("{}MetricsList", kind), "apiVersion": API_VERSION,
        "metadata": {}, "items": page.items,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_and_durations_print_like_metrics_server() {
        assert_eq!(cpu_quantity(123_456), "123456n");
        assert_eq!(memory_quantity(0), "0");
        assert_eq!(memory_quantity(1000), "1000");
        assert_eq!(memory_quantity(123 * 1024), "123Ki");
        assert_eq!(memory_quantity(64 << 20), "64Mi");
        assert_eq!(memory_quantity((64 << 20) + 4096), "65540Ki");
        assert_eq!(go_duration(15), "15s");
        assert_eq!(go_duration(90), "1m30s");
        assert_eq!(go_duration(3600), "1h0m0s");
    }

    #[test]
    fn objects_carry_usage_labels_and_window() {
        let report = NodeUsage {
            timestamp: "2026-01-01T00:00:00Z".into(),
            window_seconds: 15,
            cpu_nanocores: 5,
            memory_bytes: 2048,
            pods: vec![PodUsage {
                namespace: "d".into(),
                name: "p".into(),
                containers: vec![("c".into(), 200_000_000, 1 << 20)],
            }],
        };
        let node = json!({"metadata": {"name": "n1", "labels": {"zone": "a"}}});
        let m = node_metrics(&node, &report, "now");
        assert_eq!(m["kind"], "NodeMetrics");
        assert_eq!(m["metadata"]["labels"]["zone"], "a");
        assert_eq!(m["window"], "15s");
        assert_eq!(m["usage"], json!({"cpu": "5n", "memory": "2Ki"}));
        let pod = json!({"metadata": {"name": "p", "namespace": "d", "labels": {"app": "web"}}});
        let m = pod_metrics(&pod, &report, &report.pods[0], "now");
        assert_eq!(m["metadata"]["namespace"], "d");
        assert_eq!(m["containers"][0], json!({"name": "c", "usage": {"cpu": "200000000n", "memory": "1Mi"}}));
        let mut reports = HashMap::new();
        reports.insert("n1".to_string(), report);
        assert!(pod_usage(&reports).contains_key("d/p"));
        assert_eq!(not_available("pods", "p").code, 404);
    }
}
