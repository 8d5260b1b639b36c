//! The HPA's pure core: the replica calculator, stabilization, limits and
//! the status it reports.

use super::*;

const M: u64 = 1_000_000; // nanocores per millicore

fn hpa(min: i64, max: i64, metrics: Value, behavior: Value) -> Value {
    json!({"metadata": {"name": "web", "namespace": "d", "generation": 3},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "minReplicas": min, "maxReplicas": max, "metrics": metrics, "behavior": behavior}})
}

fn cpu_util(percent: i64) -> Value {
    json!([{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": percent}}}])
}

fn pod(name: &str, cpu_request: Option<&str>, ready: bool) -> Value {
    let mut c = json!({"name": "c", "image": "i"});
    if let Some(r) = cpu_request {
        c["resources"] = json!({"requests": {"cpu": r, "memory": "128Mi"}});
    }
    json!({"metadata": {"name": name, "namespace": "d", "labels": {"app": "web"}},
        "spec": {"containers": [c]},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}})
}

fn usage(pods: &[(&str, u64, u64)]) -> PodMetrics {
    pods.iter().map(|(n, milli, mem)| (n.to_string(), vec![("c".to_string(), milli * M, *mem)])).collect()
}

fn target(replicas: i64) -> Target {
    Target { replicas, status_replicas: replicas }
}

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-01-01T00:10:00Z").unwrap().with_timezone(&Utc)
}

fn cond<'a>(d: &'a Decision, ty: &str) -> &'a Value {
    d.status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == ty).unwrap()
}

fn two_pods() -> Vec<Value> {
    vec![pod("a", Some("200m"), true), pod("b", Some("200m"), true)]
}

#[test]
fn scales_up_by_usage_over_target() {
    // 300m of 200m requested = 150% against 50%: ratio 3, 2 pods -> 6.
    let d = plan(
        &hpa(1, 10, cpu_util(50), json!({})),
        Some(&target(2)),
        &two_pods(),
        &usage(&[("a", 300, 0), ("b", 300, 0)]),
        &[],
        now(),
    );
    assert_eq!(d.scale, Some(6));
    assert_eq!(d.recommendation, Some(6));
    assert_eq!(d.status["desiredReplicas"], 6);
    assert_eq!(d.status["currentReplicas"], 2);
    assert_eq!(d.status["observedGeneration"], 3);
    assert_eq!(d.status["lastScaleTime"], "2026-01-01T00:10:00Z");
    assert_eq!(d.status["currentMetrics"][0]["resource"]["name"], "cpu");
    assert_eq!(d.status["currentMetrics"][0]["resource"]["current"]["averageUtilization"], 150);
    assert_eq!(d.status["currentMetrics"][0]["resource"]["current"]["averageValue"], "300m");
    assert_eq!(cond(&d, "AbleToScale")["reason"], "SucceededRescale");
    assert_eq!(cond(&d, "ScalingActive")["status"], "True");
    assert_eq!(cond(&d, "ScalingActive")["reason"], "ValidMetricFound");
    assert_eq!(cond(&d, "ScalingLimited")["status"], "False");
    let (ty, reason, msg) = d.event.unwrap();
    assert_eq!((ty, reason), (EventType::Normal, "SuccessfulRescale"));
    assert!(msg.contains("New size: 6") && msg.contains("above target"), "{msg}");
}

#[test]
fn within_tolerance_nothing_changes() {
    let h = hpa(1, 10, cpu_util(50), json!({}));
    for milli in [105, 91, 109] {
        // 52.5%, 45.5%, 54.5% of a 50% target: within 10%.
        let d = plan(&h, Some(&target(2)), &two_pods(), &usage(&[("a", milli, 0), ("b", milli, 0)]), &[], now());
        assert_eq!(d.scale, None, "{milli}m");
        assert_eq!(d.status["desiredReplicas"], 2);
        assert_eq!(cond(&d, "AbleToScale")["reason"], "ReadyForNewScale");
        assert!(d.event.is_none());
    }
    // Just outside: 112m = 56% -> ratio 1.12 -> ceil(2.24) = 3.
    let d = plan(&h, Some(&target(2)), &two_pods(), &usage(&[("a", 112, 0), ("b", 112, 0)]), &[], now());
    assert_eq!(d.scale, Some(3));
}

#[test]
fn max_and_min_replicas_bound_the_result() {
    let d = plan(
        &hpa(1, 5, cpu_util(50), json!({})),
        Some(&target(2)),
        &two_pods(),
        &usage(&[("a", 300, 0), ("b", 300, 0)]),
        &[],
        now(),
    );
    assert_eq!(d.scale, Some(5));
    assert_eq!(cond(&d, "ScalingLimited")["status"], "True");
    assert_eq!(cond(&d, "ScalingLimited")["reason"], "TooManyReplicas");
    // Nearly idle with no stabilization window: down to minReplicas.
    let no_window = json!({"scaleDown": {"stabilizationWindowSeconds": 0}});
    let d = plan(
        &hpa(2, 5, cpu_util(50), no_window),
        Some(&target(4)),
        &two_pods(),
        &usage(&[("a", 1, 0), ("b", 1, 0)]),
        &[],
        now(),
    );
    assert_eq!(d.scale, Some(2));
    assert_eq!(cond(&d, "ScalingLimited")["reason"], "TooFewReplicas");
    assert!(d.event.unwrap().2.contains("below target"));
    // Already at max and still hot: no write, limited.
    let d = plan(
        &hpa(1, 2, cpu_util(50), json!({})),
        Some(&target(2)),
        &two_pods(),
        &usage(&[("a", 300, 0), ("b", 300, 0)]),
        &[],
        now(),
    );
    assert_eq!(d.scale, None);
    assert_eq!(cond(&d, "ScalingLimited")["reason"], "TooManyReplicas");
}

#[test]
fn scale_down_waits_for_the_stabilization_window() {
    let h = hpa(1, 10, cpu_util(50), json!({}));
    let idle = usage(&[("a", 10, 0), ("b", 10, 0)]);
    // 5% of a 50% target: the calculator wants 1.
    let recent = [(now() - chrono::Duration::seconds(100), 4)];
    let d = plan(&h, Some(&target(4)), &two_pods(), &idle, &recent, now());
    assert_eq!(d.scale, None, "a recommendation of 4 within 300 s holds the count");
    assert_eq!(d.recommendation, Some(1));
    assert_eq!(cond(&d, "AbleToScale")["reason"], "ScaleDownStabilized");
    // The highest recent recommendation wins, but never above the current count.
    let recent = [(now() - chrono::Duration::seconds(100), 3), (now() - chrono::Duration::seconds(50), 2)];
    assert_eq!(plan(&h, Some(&target(4)), &two_pods(), &idle, &recent, now()).scale, Some(3));
    // Older than the window: ignored.
    let old = [(now() - chrono::Duration::seconds(301), 4)];
    assert_eq!(plan(&h, Some(&target(4)), &two_pods(), &idle, &old, now()).scale, Some(1));
    // A shorter window from behavior.
    let short = hpa(1, 10, cpu_util(50), json!({"scaleDown": {"stabilizationWindowSeconds": 60}}));
    assert_eq!(plan(&short, Some(&target(4)), &two_pods(), &idle, &recent, now()).scale, Some(2));
    assert_eq!(history_span(&short), chrono::Duration::seconds(60));
    assert_eq!(history_span(&h), chrono::Duration::seconds(300));
    // Scaling up is not held back by higher... or lower old recommendations (up window 0).
    let hot = usage(&[("a", 300, 0), ("b", 300, 0)]);
    let low = [(now() - chrono::Duration::seconds(10), 1)];
    assert_eq!(plan(&h, Some(&target(2)), &two_pods(), &hot, &low, now()).scale, Some(6));
}

#[test]
fn rate_policies_limit_a_jump() {
    // From 1 replica Kubernetes' default allows max(+100%, +4) = 5.
    let pods = vec![pod("a", Some("100m"), true)];
    let d = plan(&hpa(1, 50, cpu_util(10), json!({})), Some(&target(1)), &pods, &usage(&[("a", 200, 0)]), &[], now());
    assert_eq!(d.scale, Some(5));
    assert_eq!(cond(&d, "ScalingLimited")["reason"], "ScaleUpLimit");
    // A policy of one pod at a time; selectPolicy Disabled stops scaling up.
    let one = json!({"scaleUp": {"policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}]}});
    assert_eq!(
        plan(&hpa(1, 50, cpu_util(10), one), Some(&target(1)), &pods, &usage(&[("a", 200, 0)]), &[], now()).scale,
        Some(2)
    );
    let off = json!({"scaleUp": {"selectPolicy": "Disabled"}});
    assert_eq!(
        plan(&hpa(1, 50, cpu_util(10), off), Some(&target(1)), &pods, &usage(&[("a", 200, 0)]), &[], now()).scale,
        None
    );
}

#[test]
fn pods_without_metrics_never_flip_the_direction() {
    let h = hpa(1, 10, cpu_util(50), json!({"scaleDown": {"stabilizationWindowSeconds": 0}}));
    let three = vec![pod("a", Some("100m"), true), pod("b", Some("100m"), true), pod("new", Some("100m"), true)];
    // Scaling up: the pod without metrics counts as idle. (150+150+0)/300 = 100% -> ratio 2 -> 6.
    let d = plan(&h, Some(&target(3)), &three, &usage(&[("a", 150, 0), ("b", 150, 0)]), &[], now());
    assert_eq!(d.scale, Some(6));
    // Scaling down: it counts as at its request. (5+5+100)/300 = 36.7% -> ceil(0.73 * 3) = 3: no change.
    let d = plan(&h, Some(&target(3)), &three, &usage(&[("a", 5, 0), ("b", 5, 0)]), &[], now());
    assert_eq!(d.scale, None);
    // Assuming it idle would have flipped 55% (up) to below target: stay.
    let d = plan(&h, Some(&target(3)), &three, &usage(&[("a", 60, 0), ("b", 60, 0)]), &[], now());
    assert_eq!(d.scale, None);
}

#[test]
fn unready_pods_count_as_idle_when_scaling_up() {
    let h = hpa(1, 10, cpu_util(50), json!({}));
    let pods = vec![pod("a", Some("100m"), true), pod("b", Some("100m"), false)];
    // a: 200% of request; b unready (left out, then 0): (200+0)/200 = 100% -> ratio 2 -> 4.
    let d = plan(&h, Some(&target(2)), &pods, &usage(&[("a", 200, 0), ("b", 500, 0)]), &[], now());
    assert_eq!(d.scale, Some(4));
    // Terminating and failed pods are ignored entirely.
    let mut gone = pod("c", Some("100m"), true);
    gone["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    let pods = vec![pod("a", Some("100m"), true), gone];
    let d = plan(&h, Some(&target(1)), &pods, &usage(&[("a", 100, 0), ("c", 900, 0)]), &[], now());
    assert_eq!(d.scale, Some(2));
}

#[test]
fn missing_metrics_or_requests_stop_scaling_with_a_reason() {
    let h = hpa(1, 10, cpu_util(50), json!({}));
    let d = plan(&h, Some(&target(2)), &two_pods(), &PodMetrics::new(), &[], now());
    assert_eq!(d.scale, None);
    assert_eq!(d.recommendation, None);
    assert_eq!(cond(&d, "ScalingActive")["status"], "False");
    assert_eq!(cond(&d, "ScalingActive")["reason"], "FailedGetResourceMetric");
    assert!(cond(&d, "ScalingActive")["message"].as_str().unwrap().contains("no metrics returned"));
    assert_eq!(cond(&d, "AbleToScale")["status"], "True");
    assert_eq!(d.event.as_ref().unwrap().0, EventType::Warning);
    // Zero requests: utilization is undefined.
    let zero = vec![pod("a", Some("0"), true)];
    let d = plan(&h, Some(&target(1)), &zero, &usage(&[("a", 100, 0)]), &[], now());
    assert_eq!(cond(&d, "ScalingActive")["reason"], "FailedGetResourceMetric");
    assert_eq!(d.scale, None);
    // No request at all.
    let none = vec![pod("a", None, true)];
    let d = plan(&h, Some(&target(1)), &none, &usage(&[("a", 100, 0)]), &[], now());
    assert_eq!(cond(&d, "ScalingActive")["reason"], "FailedGetResourceMetric");
    assert!(cond(&d, "ScalingActive")["message"].as_str().unwrap().contains("missing request for cpu in container c"));
    // No pods at all.
    let d = plan(&h, Some(&target(1)), &[], &PodMetrics::new(), &[], now());
    assert_eq!(cond(&d, "ScalingActive")["status"], "False");
    // Unsupported metric types.
    let ext = hpa(1, 10, json!([{"type": "External", "external": {}}]), json!({}));
    let d = plan(&ext, Some(&target(1)), &two_pods(), &usage(&[("a", 1, 0)]), &[], now());
    assert_eq!(cond(&d, "ScalingActive")["reason"], "InvalidMetricSourceType");
}

#[test]
fn average_value_targets_and_several_metrics() {
    let mem = json!([{"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "64Mi"}}}]);
    let h = hpa(1, 10, mem, json!({}));
    let d = plan(&h, Some(&target(2)), &two_pods(), &usage(&[("a", 0, 128 << 20), ("b", 0, 128 << 20)]), &[], now());
    assert_eq!(d.scale, Some(4));
    assert_eq!(d.status["currentMetrics"][0]["resource"]["current"]["averageValue"], "128Mi");
    // cpu wants 2 (tolerance), memory wants 4: the largest wins.
    let both = json!([cpu_util(50)[0], {"type": "Resource", "resource": {"name": "memory", "target": {"type": "Utilization", "averageUtilization": 50}}}]);
    let d = plan(
        &hpa(1, 10, both, json!({})),
        Some(&target(2)),
        &two_pods(),
        &usage(&[("a", 100, 128 << 20), ("b", 100, 128 << 20)]),
        &[],
        now(),
    );
    assert_eq!(d.scale, Some(4));
    assert_eq!(d.status["currentMetrics"].as_array().unwrap().len(), 2);
    // No metrics in the spec: CPU at 80%.
    let mut bare = hpa(1, 10, json!(null), json!({}));
    bare["spec"].as_object_mut().unwrap().remove("metrics");
    assert_eq!(metric_specs(&bare)[0]["resource"]["target"]["averageUtilization"], 80);
}

#[test]
fn target_missing_or_at_zero() {
    let h = hpa(1, 10, cpu_util(50), json!({}));
    let d = plan(&h, None, &[], &PodMetrics::new(), &[], now());
    assert_eq!(cond(&d, "AbleToScale")["status"], "False");
    assert_eq!(cond(&d, "AbleToScale")["reason"], "FailedGetScale");
    assert_eq!(d.scale, None);
    let d = plan(&h, Some(&target(0)), &[], &PodMetrics::new(), &[], now());
    assert_eq!(cond(&d, "ScalingActive")["reason"], "ScalingDisabled");
    assert_eq!(d.scale, None);
}

#[test]
fn transition_times_survive_unchanged_conditions() {
    let mut h = hpa(1, 10, cpu_util(50), json!({}));
    let first = plan(&h, Some(&target(2)), &two_pods(), &usage(&[("a", 100, 0), ("b", 100, 0)]), &[], now());
    h["status"] = first.status.clone();
    let later = now() + chrono::Duration::seconds(15);
    let again = plan(&h, Some(&target(2)), &two_pods(), &usage(&[("a", 100, 0), ("b", 100, 0)]), &[], later);
    assert_eq!(again.status, first.status, "a steady state writes nothing new");
    let hot = plan(&h, Some(&target(2)), &two_pods(), &usage(&[("a", 300, 0), ("b", 300, 0)]), &[], later);
    assert_eq!(cond(&hot, "ScalingActive")["lastTransitionTime"], "2026-01-01T00:10:00Z");
    assert_eq!(cond(&hot, "AbleToScale")["lastTransitionTime"], "2026-01-01T00:10:00Z", "still True");
}
