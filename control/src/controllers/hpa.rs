//! HorizontalPodAutoscaler controller (autoscaling/v2): every 15 s it sets
//! the scale target's `spec.replicas` (Deployment, ReplicaSet, StatefulSet:
//! what their `/scale` subresource writes) from the pods' resource usage
//! (`metrics.k8s.io`, see `api/resource_metrics.rs`).
//!
//! [`plan`] is the pure core: the HPA, its target, the target's pods, their
//! usage, the recent recommendations and `now` in; the replica count, the
//! status and an event out. It follows Kubernetes' replica calculator:
//! `desired = ceil(current * usage / target)` per metric with a 0.1
//! tolerance, the largest proposal wins, pods without metrics and unready
//! pods are assumed at the target (missing, scaling down), 0 (missing or
//! unready, scaling up) or left out so they never flip the direction, then
//! the stabilization windows (scale down 300 s, scale up 0 s by default),
//! the rate policies and min/max replicas.
//!
//! Simplified, on purpose:
//! - Metric sources: `Resource` (cpu, memory) with `Utilization` or
//!   `AverageValue` targets; other types make ScalingActive False.
//! - A pod is unready when its Ready condition is not True (Kubernetes also
//!   looks at the CPU initialization period).
//! - Rate policies (`behavior.*.policies`, Kubernetes' defaults when none)
//!   are applied to the current replica count per reconcile, not over the
//!   history of past scale events in `periodSeconds`.
//! - Recommendations live in this master's memory (as in Kubernetes): a new
//!   controller leader starts its stabilization window afresh.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use parking_lot::Mutex;
use serde_json::{json, Value};

use super::events::{EventRecorder, EventType};
use super::informer::Informer;
use super::runtime::{ReconcileResult, Reconciler};
use super::scheduler::model::parse_quantity;
use crate::api::{internal, resource_metrics, ApiServer};

/// How often every HPA is evaluated (Kubernetes' `--horizontal-pod-autoscaler-sync-period`).
pub const SYNC_PERIOD: Duration = Duration::from_secs(15);
pub const TOLERANCE: f64 = 0.1;
pub const DEFAULT_SCALE_DOWN_WINDOW: i64 = 300;
const MANAGER: &str = "horizontal-pod-autoscaler";

/// What `plan` knows about the scale target (its `/scale` view).
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// `spec.replicas`.
    pub replicas: i64,
    /// `status.replicas`.
    pub status_replicas: i64,
}

/// A pod's usage: (container, CPU nanocores, memory bytes).
pub type PodMetrics = HashMap<String, Vec<(String, u64, u64)>>;

/// One recommendation (a desired replica count at a time), kept for the
/// stabilization windows.
pub type Recommendation = (DateTime<Utc>, i64);

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Write the target's `spec.replicas` to this.
    pub scale: Option<i64>,
    pub status: Value,
    /// Record in the history (None when no recommendation could be made).
    pub recommendation: Option<i64>,
    /// (type, reason, message) of an event to record.
    pub event: Option<(EventType, &'static str, String)>,
}

/// A metric's proposal: replicas, and its entry in `status.currentMetrics`.
struct Proposal {
    replicas: i64,
    status: Value,
    description: String,
}

type MetricError = (&'static str, String);

fn condition(ty: &str, status: bool, reason: &str, message: impl Into<String>, now: &str) -> Value {
    json!({"type": ty, "status": if status { "True" } else { "False" }, "reason": reason,
        "message": message.into(), "lastTransitionTime": now})
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Ready" && c["status"] == "True")
}

fn ignored(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_string() || pod["status"]["phase"] == "Failed"
}

/// The metrics of a v2 spec; an HPA without any scales on CPU at 80%
/// (Kubernetes' default).
pub fn metric_specs(hpa: &Value) -> Vec<Value> {
    match hpa["spec"]["metrics"].as_array() {
        Some(m) if !m.is_empty() => m.clone(),
        _ => vec![json!({"type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}})],
    }
}

/// A pod's usage of `resource` in milli-units (millicores, rounded up per
/// container as Kubernetes' `MilliValue` does; milli-bytes).
fn usage_milli(containers: &[(String, u64, u64)], resource: &str) -> f64 {
    containers
        .iter()
        .map(|(_, cpu, mem)| if resource == "cpu" { cpu.div_ceil(1_000_000) as f64 } else { *mem as f64 * 1000.0 })
        .sum()
}

/// A pod's request of `resource` in milli-units: the sum over its
/// containers; an error names the first container without one.
fn request_milli(pod: &Value, resource: &str) -> Result<f64, String> {
    let mut total = 0.0;
    for c in pod["spec"]["containers"].as_array().into_iter().flatten() {
        match parse_quantity(&c["resources"]["requests"][resource], true) {
            Some(q) => total += q as f64,
            None => {
                return Err(format!(
                    "missing request for {resource} in container {} of Pod {}",
                    c["name"].as_str().unwrap_or_default(),
                    pod["metadata"]["name"].as_str().unwrap_or_default()
                ))
            }
        }
    }
    Ok(total)
}

/// The ratio of usage to target over `pods` (name -> (usage, request)):
/// (ratio, current utilization percent or average value in milli-units).
fn ratio(values: &HashMap<String, (f64, f64)>, utilization: Option<f64>, average: Option<f64>) -> (f64, f64) {
    let usage: f64 = values.values().map(|(u, _)| u).sum();
    match (utilization, average) {
        (Some(target), _) => {
            let requests: f64 = values.values().map(|(_, r)| r).sum();
            let current = usage * 100.0 / requests;
            (current / target, current)
        }
        (_, Some(target)) => {
            let avg = usage / values.len() as f64;
            (avg / target, avg)
        }
        _ => (1.0, 0.0),
    }
}

/// Kubernetes' replica calculator for one Resource metric.
fn resource_proposal(
    spec: &Value,
    current: i64,
    pods: &[Value],
    metrics: &PodMetrics,
) -> Result<Proposal, MetricError> {
    const FAILED: &str = "FailedGetResourceMetric";
    let resource = spec["resource"]["name"].as_str().unwrap_or_default().to_string();
    if resource != "cpu" && resource != "memory" {
        return Err(("InvalidMetricSourceType", format!("resource {resource:?} is not supported (cpu, memory)")));
    }
    let target = &spec["resource"]["target"];
    let utilization = match target["type"].as_str() {
        Some("Utilization") => Some(target["averageUtilization"].as_f64().filter(|u| *u > 0.0).ok_or_else(|| {
            ("InvalidMetricSourceType", "target averageUtilization must be a positive integer".to_string())
        })?),
        _ => None,
    };
    let average = match target["type"].as_str() {
        Some("AverageValue") => Some(
            parse_quantity(&target["averageValue"], true)
                .filter(|v| *v > 0)
                .ok_or_else(|| ("InvalidMetricSourceType", "target averageValue must be a positive quantity".into()))?
                as f64,
        ),
        Some("Utilization") => None,
        other => {
            return Err(("InvalidMetricSourceType", format!("target type {other:?} is not supported for {resource}")))
        }
    };
    if pods.is_empty() {
        return Err((
            FAILED,
            format!("unable to get metrics for resource {resource}: no pods match the target's selector"),
        ));
    }
    // name -> (usage, request), for the ready pods that have metrics.
    let mut values: HashMap<String, (f64, f64)> = HashMap::new();
    let (mut missing, mut unready) = (Vec::new(), Vec::new());
    let mut ready_count = 0i64;
    for pod in pods.iter().filter(|p| !ignored(p)) {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let request = if utilization.is_some() { request_milli(pod, &resource).map_err(|e| (FAILED, e))? } else { 0.0 };
        match metrics.get(&name) {
            None => missing.push((name, request)),
            // Kubernetes leaves unready pods out for CPU only.
            Some(_) if resource == "cpu" && !is_ready(pod) => unready.push((name, request)),
            Some(c) => {
                ready_count += 1;
                values.insert(name, (usage_milli(c, &resource), request));
            }
        }
    }
    if values.is_empty() {
        return Err((
            FAILED,
            format!("unable to get metrics for resource {resource}: no metrics returned from resource metrics API"),
        ));
    }
    if utilization.is_some() && values.values().any(|(_, r)| *r <= 0.0) {
        return Err((FAILED, format!("missing request for {resource}: requests are zero")));
    }
    let (usage_ratio, current_value) = ratio(&values, utilization, average);
    let rebalance_unready = !unready.is_empty() && usage_ratio > 1.0;
    let replicas = if !rebalance_unready && missing.is_empty() {
        if (1.0 - usage_ratio).abs() <= TOLERANCE {
            current
        } else {
            (usage_ratio * ready_count as f64).ceil() as i64
        }
    } else {
        // Scaling down: a pod without metrics may be busy (assume it at
        // the target); scaling up: it may be idle (assume 0).
        for (name, request) in &missing {
            let assumed = if usage_ratio < 1.0 {
                match (utilization, average) {
                    (Some(_), _) => *request,
                    (_, Some(t)) => t,
                    _ => 0.0,
                }
            } else {
                0.0
            };
            values.insert(name.clone(), (assumed, *request));
        }
        if rebalance_unready {
            for (name, request) in &unready {
                values.insert(name.clone(), (0.0, *request));
            }
        }
        let (new_ratio, _) = ratio(&values, utilization, average);
        let flips = (usage_ratio < 1.0 && new_ratio > 1.0) || (usage_ratio > 1.0 && new_ratio < 1.0);
        if (1.0 - new_ratio).abs() <= TOLERANCE || flips {
            current
        } else {
            let n = (new_ratio * values.len() as f64).ceil() as i64;
            if (new_ratio < 1.0 && n > current) || (new_ratio > 1.0 && n < current) {
                current
            } else {
                n
            }
        }
    };
    let (current_status, description) = match utilization {
        Some(_) => {
            let average_value = values_average(&values);
            (
                json!({"averageUtilization": current_value as i64, "averageValue": format_milli(&resource, average_value)}),
                format!("{resource} resource utilization (percentage of request)"),
            )
        }
        None => (json!({"averageValue": format_milli(&resource, current_value)}), format!("{resource} resource")),
    };
    Ok(Proposal {
        replicas,
        status: json!({"type": "Resource", "resource": {"name": resource, "current": current_status}}),
        description,
    })
}

fn values_average(values: &HashMap<String, (f64, f64)>) -> f64 {
    values.values().map(|(u, _)| u).sum::<f64>() / values.len().max(1) as f64
}

/// A milli-unit amount as a quantity: `250m` of CPU, whole bytes of memory.
pub fn format_milli(resource: &str, milli: f64) -> String {
    if resource == "cpu" {
        format!("{}m", milli.round() as i64)
    } else {
        resource_metrics::memory_quantity((milli / 1000.0).round().max(0.0) as u64)
    }
}

/// Kubernetes' default rate policies: up by max(100%, 4 pods), down by 100%, per period.
fn rate_limit(behavior: &Value, current: i64, up: bool) -> Option<i64> {
    let rules = &behavior[if up { "scaleUp" } else { "scaleDown" }];
    let select = rules["selectPolicy"].as_str().unwrap_or("Max");
    if select == "Disabled" {
        return Some(current);
    }
    let defaults = if up {
        json!([{"type": "Percent", "value": 100}, {"type": "Pods", "value": 4}])
    } else {
        json!([{"type": "Percent", "value": 100}])
    };
    let policies = rules["policies"].as_array().filter(|p| !p.is_empty()).cloned();
    let policies = policies.unwrap_or_else(|| defaults.as_array().cloned().unwrap_or_default());
    let limits: Vec<i64> = policies
        .iter()
        .map(|p| {
            let v = p["value"].as_i64().unwrap_or(0);
            let change = match p["type"].as_str() {
                Some("Percent") if up => (current as f64 * v as f64 / 100.0).ceil() as i64,
                Some("Percent") => (current as f64 * v as f64 / 100.0).floor() as i64,
                _ => v,
            };
            if up {
                current + change
            } else {
                current - change
            }
        })
        .collect();
    // "Max" allows the largest change: the highest limit up, the lowest down.
    let most = if up { limits.iter().max() } else { limits.iter().min() };
    let least = if up { limits.iter().min() } else { limits.iter().max() };
    if select == "Min" {
        least.copied()
    } else {
        most.copied()
    }
}

fn window(behavior: &Value, up: bool) -> i64 {
    let w = behavior[if up { "scaleUp" } else { "scaleDown" }]["stabilizationWindowSeconds"].as_i64();
    w.unwrap_or(if up { 0 } else { DEFAULT_SCALE_DOWN_WINDOW }).max(0)
}

/// The longest stabilization window of `hpa`: how long history is kept.
pub fn history_span(hpa: &Value) -> chrono::Duration {
    let b = &hpa["spec"]["behavior"];
    chrono::Duration::seconds(window(b, true).max(window(b, false)))
}

/// Keeps a condition's transition time while its status does not change.
fn keep_transitions(conditions: &mut [Value], old: &Value) {
    for c in conditions {
        let prev = old["conditions"].as_array().into_iter().flatten().find(|o| o["type"] == c["type"]);
        if let Some(p) = prev.filter(|p| p["status"] == c["status"]) {
            c["lastTransitionTime"] = p["lastTransitionTime"].clone();
        }
    }
}

/// The pure core: what the HPA should do now. `pods` are the pods the
/// target's selector matches; `metrics` their usage by pod name; `history`
/// this HPA's recent recommendations (older ones are ignored).
pub fn plan(
    hpa: &Value,
    target: Option<&Target>,
    pods: &[Value],
    metrics: &PodMetrics,
    history: &[Recommendation],
    now: DateTime<Utc>,
) -> Decision {
    let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let spec = &hpa["spec"];
    let old = &hpa["status"];
    let min = spec["minReplicas"].as_i64().unwrap_or(1);
    let max = spec["maxReplicas"].as_i64().unwrap_or(min.max(1));
    let mut status = json!({
        "observedGeneration": hpa["metadata"]["generation"].as_i64().unwrap_or(1),
        "currentReplicas": old["currentReplicas"].as_i64().unwrap_or(0),
        "desiredReplicas": old["desiredReplicas"].as_i64().unwrap_or(0),
    });
    if old["lastScaleTime"].is_string() {
        status["lastScaleTime"] = old["lastScaleTime"].clone();
    }
    let finish = |mut status: Value, mut conditions: Vec<Value>| {
        keep_transitions(&mut conditions, old);
        status["conditions"] = json!(conditions);
        status
    };
    let Some(target) = target else {
        let r = &spec["scaleTargetRef"];
        let msg = format!(
            "the HPA controller was unable to get the target's current scale: {} {:?} not found",
            r["kind"].as_str().unwrap_or_default(),
            r["name"].as_str().unwrap_or_default()
        );
        let conds = vec![condition("AbleToScale", false, "FailedGetScale", msg.clone(), &ts)];
        return Decision {
            scale: None,
            status: finish(status, conds),
            recommendation: None,
            event: Some((EventType::Warning, "FailedGetScale", msg)),
        };
    };
    let current = target.replicas;
    status["currentReplicas"] = json!(target.status_replicas);
    if current == 0 && min != 0 {
        status["desiredReplicas"] = json!(0);
        let conds = vec![
            condition(
                "AbleToScale",
                true,
                "SucceededGetScale",
                "the HPA controller was able to get the target's current scale",
                &ts,
            ),
            condition(
                "ScalingActive",
                false,
                "ScalingDisabled",
                "scaling is disabled since the replica count of the target is zero",
                &ts,
            ),
        ];
        return Decision { scale: None, status: finish(status, conds), recommendation: None, event: None };
    }
    let mut best: Option<Proposal> = None;
    let mut errors: Vec<MetricError> = Vec::new();
    let mut current_metrics = Vec::new();
    for m in metric_specs(hpa) {
        let result = match m["type"].as_str() {
            Some("Resource") => resource_proposal(&m, current, pods, metrics),
            other => Err(("InvalidMetricSourceType", format!("metric type {other:?} is not supported"))),
        };
        match result {
            Ok(p) => {
                current_metrics.push(p.status.clone());
                if best.as_ref().is_none_or(|b| p.replicas > b.replicas) {
                    best = Some(p);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    status["currentMetrics"] = json!(current_metrics);
    let able = condition(
        "AbleToScale",
        true,
        "SucceededGetScale",
        "the HPA controller was able to get the target's current scale",
        &ts,
    );
    let Some(best) = best else {
        let (reason, msg) = errors.into_iter().next().unwrap_or(("FailedGetResourceMetric", "no metrics".into()));
        let conds = vec![
            able,
            condition(
                "ScalingActive",
                false,
                reason,
                format!("the HPA was unable to compute the replica count: {msg}"),
                &ts,
            ),
        ];
        status["desiredReplicas"] = json!(current);
        return Decision {
            scale: None,
            status: finish(status, conds),
            recommendation: None,
            event: Some((EventType::Warning, reason, msg)),
        };
    };
    // A metric that failed might have wanted more: never scale down then.
    let proposed = if errors.is_empty() { best.replicas } else { best.replicas.max(current) };

    // Stabilization: the lowest recommendation of the up window and the
    // highest of the down window bound the move from the current count.
    let behavior = &spec["behavior"];
    let up_cutoff = now - chrono::Duration::seconds(window(behavior, true));
    let down_cutoff = now - chrono::Duration::seconds(window(behavior, false));
    let (mut up_rec, mut down_rec) = (proposed, proposed);
    for (at, r) in history {
        if *at > up_cutoff {
            up_rec = up_rec.min(*r);
        }
        if *at > down_cutoff {
            down_rec = down_rec.max(*r);
        }
    }
    let stabilized = current.max(up_rec).min(down_rec);
    let mut able = able;
    if stabilized != proposed && proposed < current {
        able = condition(
            "AbleToScale",
            true,
            "ScaleDownStabilized",
            "recent recommendations were higher than current one, applying the highest recent recommendation",
            &ts,
        );
    } else if stabilized != proposed {
        able = condition(
            "AbleToScale",
            true,
            "ScaleUpStabilized",
            "recent recommendations were lower than current one, applying the lowest recent recommendation",
            &ts,
        );
    }
    // Rate policies, then min/max.
    let (mut desired, mut limited) = (stabilized, None);
    if stabilized > current {
        let cap = rate_limit(behavior, current, true).unwrap_or(stabilized);
        if cap < desired {
            desired = cap;
            limited =
                Some(("ScaleUpLimit", "the desired replica count is increasing faster than the maximum scale rate"));
        }
    } else if stabilized < current {
        let floor = rate_limit(behavior, current, false).unwrap_or(stabilized);
        if floor > desired {
            desired = floor;
            limited =
                Some(("ScaleDownLimit", "the desired replica count is decreasing faster than the maximum scale rate"));
        }
    }
    if desired > max {
        desired = max;
        limited = Some(("TooManyReplicas", "the desired replica count is more than the maximum replica count"));
    } else if desired < min {
        desired = min;
        limited = Some(("TooFewReplicas", "the desired replica count is less than the minimum replica count"));
    }
    status["desiredReplicas"] = json!(desired);
    let scale = (desired != current).then_some(desired);
    let event = scale.map(|n| {
        let direction = if n > current { "above" } else { "below" };
        if scale.is_some() {
            status["lastScaleTime"] = json!(ts);
        }
        (
            EventType::Normal,
            "SuccessfulRescale",
            format!("New size: {n}; reason: {} {direction} target", best.description),
        )
    });
    if scale.is_some() {
        able = condition(
            "AbleToScale",
            true,
            "SucceededRescale",
            format!("the HPA controller was able to update the target scale to {desired}"),
            &ts,
        );
    } else if able["reason"] == "SucceededGetScale" {
        able = condition("AbleToScale", true, "ReadyForNewScale", "recommended size matches current size", &ts);
    }
    let conds = vec![
        able,
        condition(
            "ScalingActive",
            true,
            "ValidMetricFound",
            format!("the HPA was able to successfully calculate a replica count from {}", best.description),
            &ts,
        ),
        match limited {
            Some((reason, msg)) => condition("ScalingLimited", true, reason, msg, &ts),
            None => condition(
                "ScalingLimited",
                false,
                "DesiredWithinRange",
                "the desired count is within the acceptable range",
                &ts,
            ),
        },
    ];
    Decision { scale, status: finish(status, conds), recommendation: Some(proposed), event }
}

/// The shell: reads the HPA, its target and the target's pods from the
/// informers and the usage reports from the store, carries out [`plan`].
pub struct HpaController {
    pub api: Arc<ApiServer>,
    pub hpas: Arc<Informer>,
    pub pods: Arc<Informer>,
    /// Scale targets by kind (Deployment, ReplicaSet, StatefulSet).
    pub targets: HashMap<&'static str, Arc<Informer>>,
    pub recorder: EventRecorder,
    history: Mutex<HashMap<String, Vec<Recommendation>>>,
}

impl HpaController {
    pub fn new(
        api: Arc<ApiServer>,
        hpas: Arc<Informer>,
        pods: Arc<Informer>,
        targets: HashMap<&'static str, Arc<Informer>>,
        recorder: EventRecorder,
    ) -> Self {
        HpaController { api, hpas, pods, targets, recorder, history: Mutex::default() }
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let Some(cached) = self.hpas.get(&key) else {
            self.history.lock().remove(&key);
            return Ok(None);
        };
        let hpa = cached.object();
        let ns = cached.namespace().to_string();
        let r = &hpa["spec"]["scaleTargetRef"];
        let kind = r["kind"].as_str().unwrap_or_default();
        let target_key = format!("{ns}/{}", r["name"].as_str().unwrap_or_default());
        let target_obj = self.targets.get(kind).and_then(|inf| inf.get(&target_key).map(|c| (inf.clone(), c)));
        let target = target_obj.as_ref().map(|(_, c)| {
            let o = c.object();
            Target {
                replicas: o["spec"]["replicas"].as_i64().unwrap_or(1),
                status_replicas: o["status"]["replicas"].as_i64().unwrap_or(0),
            }
        });
        let selector = target_obj.as_ref().map(|(_, c)| c.object()["spec"]["selector"].clone()).unwrap_or_default();
        let pods: Vec<Value> = self
            .pods
            .list_namespace(&ns)
            .iter()
            .map(|p| p.object())
            .filter(|p| super::disruption::selects(&selector, &p["metadata"]["labels"]))
            .collect();
        let reports = resource_metrics::reports(&self.api).map_err(|e| e.message)?;
        let metrics: PodMetrics = resource_metrics::pod_usage(&reports)
            .into_iter()
            .filter_map(|(k, (_, p))| k.strip_prefix(&format!("{ns}/")).map(|n| (n.to_string(), p.containers.clone())))
            .collect();
        let now = Utc::now();
        let history = {
            let mut h = self.history.lock();
            let list = h.entry(key.clone()).or_default();
            let span = history_span(&hpa);
            list.retain(|(at, _)| *at > now - span);
            list.clone()
        };
        let d = plan(&hpa, target.as_ref(), &pods, &metrics, &history, now);
        if let Some(rec) = d.recommendation {
            self.history.lock().entry(key.clone()).or_default().push((now, rec));
        }
        if let (Some(n), Some((inf, c))) = (d.scale, &target_obj) {
            let mut obj = c.object();
            obj["spec"]["replicas"] = json!(n);
            internal::write(&self.api, inf.rt, Some(&c.found()), obj, MANAGER).await.map_err(|e| e.message)?;
        }
        if let Some((ty, reason, msg)) = &d.event {
            self.recorder.event(&hpa, *ty, reason, msg.clone());
        }
        if status_differs(&hpa["status"], &d.status) {
            internal::write_status(&self.api, self.hpas.rt, &cached.found(), d.status).await.map_err(|e| e.message)?;
        }
        Ok(Some(SYNC_PERIOD))
    }
}

/// Differs in more than the conditions' messages' timestamps.
fn status_differs(old: &Value, new: &Value) -> bool {
    old != new
}

impl Reconciler for HpaController {
    fn name(&self) -> &'static str {
        "horizontalpodautoscaler"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.hpas.list().iter().map(|c| c.key.clone()).collect()
    }
}

#[cfg(test)]
#[path = "hpa_test.rs"]
mod tests;
