//! `autoscaling/v1` HorizontalPodAutoscalers, served by conversion: they
//! are stored, listed in the registry and controlled as `autoscaling/v2`
//! (one key per object), and converted at the edge. kubectl 1.32's
//! `kubectl autoscale` creates them through v1 (a protobuf body).
//!
//! Served verbs: create, get, list, update, delete. Patch and watch answer
//! 405 pointing at v2. As in Kubernetes, v1 knows only a CPU utilization
//! target: a v1 update replaces the v2 metrics with that one (Kubernetes
//! keeps the others in an annotation; Capstan does not). The conversions
//! are pure.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};

use super::request::ResourceRequest;
use super::status::ApiError;
use super::{handlers, ApiServer, Ctx, Reply, ReplyBody};

const V1: &str = "autoscaling/v1";
const V2: &str = "autoscaling/v2";

pub fn is_v1(r: &ResourceRequest) -> bool {
    r.group == "autoscaling" && r.version == "v1" && r.resource == "horizontalpodautoscalers"
}

/// A v1 object as v2: `targetCPUUtilizationPercentage` becomes a CPU
/// Utilization metric (none: the v2 default of 80% applies).
pub fn to_v2(v1: &Value) -> Value {
    let mut out = v1.clone();
    out["apiVersion"] = json!(V2);
    if let Some(spec) = out.get_mut("spec").and_then(Value::as_object_mut) {
        if let Some(p) = spec.remove("targetCPUUtilizationPercentage").filter(|p| !p.is_null()) {
            spec.insert(
                "metrics".into(),
                json!([{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": p}}}]),
            );
        }
    }
    if let Some(status) = out.get_mut("status").and_then(Value::as_object_mut) {
        status.remove("currentCPUUtilizationPercentage");
    }
    out
}

fn cpu_utilization(metrics: &Value, at: &str) -> Option<Value> {
    metrics.as_array()?.iter().find(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu").and_then(|m| {
        let v = &m["resource"][at]["averageUtilization"];
        (!v.is_null()).then(|| v.clone())
    })
}

/// A v2 object as v1: the CPU utilization target and current value only.
pub fn to_v1(v2: &Value) -> Value {
    let mut out = v2.clone();
    out["apiVersion"] = json!(V1);
    if let Some(spec) = out.get_mut("spec").and_then(Value::as_object_mut) {
        let target = spec.remove("metrics").and_then(|m| cpu_utilization(&m, "target"));
        spec.remove("behavior");
        if let Some(t) = target {
            spec.insert("targetCPUUtilizationPercentage".into(), t);
        }
    }
    if let Some(status) = out.get_mut("status").and_then(Value::as_object_mut) {
        let current = status.remove("currentMetrics").and_then(|m| cpu_utilization(&m, "current"));
        status.remove("conditions");
        if let Some(c) = current {
            status.insert("currentCPUUtilizationPercentage".into(), c);
        }
        status.entry("currentReplicas").or_insert(json!(0));
        status.entry("desiredReplicas").or_insert(json!(0));
    }
    out
}

fn reply_to_v1(mut reply: Reply) -> Reply {
    // Converted as a Value: text replies are decoded first.
    if let ReplyBody::JsonText(b) = &reply.body {
        if let Ok(v) = serde_json::from_slice(b) {
            reply.body = ReplyBody::Json(v);
        }
    }
    if let ReplyBody::Json(v) = &mut reply.body {
        match v["kind"].as_str() {
            Some("HorizontalPodAutoscaler") => *v = to_v1(v),
            Some("HorizontalPodAutoscalerList") => {
                v["apiVersion"] = json!(V1);
                if let Some(items) = v["items"].as_array_mut() {
                    for i in items {
                        *i = to_v1(i);
                    }
                }
            }
            _ => {}
        }
    }
    reply
}

/// Serves a v1 request through the v2 handlers.
pub async fn serve(api: Arc<ApiServer>, mut r: ResourceRequest, ctx: Ctx) -> Result<Reply, ApiError> {
    if !matches!(r.verb, "create" | "get" | "list" | "update" | "delete") || r.subresource.is_some() {
        return Err(ApiError::method_not_allowed(format!(
            "{}{} of autoscaling/v1 horizontalpodautoscalers is not served; use autoscaling/v2",
            r.verb,
            r.subresource.as_deref().map(|s| format!(" on {s}")).unwrap_or_default()
        )));
    }
    r.version = "v2".into();
    let mut ctx = ctx;
    if matches!(r.verb, "create" | "update") {
        let body = handlers::decode_body(&ctx)?;
        if body["apiVersion"].as_str().is_some_and(|v| v != V1)
            || body["kind"].as_str().is_some_and(|k| k != "HorizontalPodAutoscaler")
        {
            return Err(ApiError::bad_request(format!(
                "expected an autoscaling/v1 HorizontalPodAutoscaler, got {} {}",
                body["apiVersion"].as_str().unwrap_or_default(),
                body["kind"].as_str().unwrap_or_default()
            )));
        }
        let v2 = to_v2(&body);
        ctx.body = Bytes::from(serde_json::to_vec(&v2).map_err(|e| ApiError::internal(e.to_string()))?);
        ctx.content_type = "application/json".into();
    }
    let reply = Box::pin(handlers::resource(api, r, ctx)).await?;
    Ok(reply_to_v1(reply))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_convert_both_ways() {
        let v1 = json!({"apiVersion": V1, "kind": "HorizontalPodAutoscaler", "metadata": {"name": "web"},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 1, "maxReplicas": 5, "targetCPUUtilizationPercentage": 50}});
        let v2 = to_v2(&v1);
        assert_eq!(v2["apiVersion"], V2);
        assert_eq!(v2["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"], 50);
        assert!(v2["spec"].get("targetCPUUtilizationPercentage").is_none());
        let mut stored = v2.clone();
        stored["status"] = json!({"currentReplicas": 2, "desiredReplicas": 3,
            "currentMetrics": [{"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 75}}}],
            "conditions": [{"type": "AbleToScale", "status": "True"}]});
        let back = to_v1(&stored);
        assert_eq!(back["apiVersion"], V1);
        assert_eq!(back["spec"]["targetCPUUtilizationPercentage"], 50);
        assert!(back["spec"].get("metrics").is_none());
        assert_eq!(back["status"]["currentCPUUtilizationPercentage"], 75);
        assert!(back["status"].get("conditions").is_none());
        assert_eq!(back["spec"]["scaleTargetRef"], v1["spec"]["scaleTargetRef"]);
        // Without a CPU target there is no metric (v2 defaults to 80%).
        let mut bare = v1.clone();
        bare["spec"].as_object_mut().unwrap().remove("targetCPUUtilizationPercentage");
        assert!(to_v2(&bare)["spec"].get("metrics").is_none());
        let list =
            reply_to_v1(Reply::ok(json!({"kind": "HorizontalPodAutoscalerList", "apiVersion": V2, "items": [stored]})));
        let ReplyBody::Json(l) = list.body else { panic!() };
        assert_eq!(l["apiVersion"], V1);
        assert_eq!(l["items"][0]["spec"]["targetCPUUtilizationPercentage"], 50);
        // A create answers with the stored text: converted all the same.
        let text = Reply {
            code: http::StatusCode::CREATED,
            body: ReplyBody::JsonText(serde_json::to_vec(&stored).unwrap().into()),
            warnings: vec![],
        };
        let ReplyBody::Json(created) = reply_to_v1(text).body else { panic!("text reply not converted") };
        assert_eq!(created["apiVersion"], V1);
        assert_eq!(created["spec"]["targetCPUUtilizationPercentage"], 50);
    }

    #[test]
    fn only_v1_hpa_requests_are_converted() {
        let r = ResourceRequest {
            group: "autoscaling".into(),
            version: "v1".into(),
            resource: "horizontalpodautoscalers".into(),
            ..Default::default()
        };
        assert!(is_v1(&r));
        assert!(!is_v1(&ResourceRequest { version: "v2".into(), ..r }));
    }
}
