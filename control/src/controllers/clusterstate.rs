//! Cluster-state gauges for alerting, as kube-state-metrics would give
//! them: nodes by their Ready condition, and pods whose containers are in
//! CrashLoopBackOff. Kept from informer changes on every master (the
//! numbers agree across masters; alerts take the max).
//!
//! Deciding is pure ([`ready_status`], [`crash_looping`]); a pod is only
//! decoded when its stored JSON mentions CrashLoopBackOff at all.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;

use super::informer::{Cached, Informer};

/// A node's Ready condition as kube-state-metrics labels it.
pub fn ready_status(node: &Value) -> &'static str {
    let ready = node["status"]["conditions"].as_array().into_iter().flatten().find(|c| c["type"] == "Ready");
    match ready.and_then(|c| c["status"].as_str()) {
        Some("True") => "true",
        Some("False") => "false",
        _ => "unknown",
    }
}

/// Whether any container (or init container) waits in CrashLoopBackOff.
pub fn crash_looping(pod: &Value) -> bool {
    ["containerStatuses", "initContainerStatuses"].iter().any(|list| {
        pod["status"][list]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["state"]["waiting"]["reason"] == "CrashLoopBackOff")
    })
}

fn mentions_crash_loop(c: &Cached) -> bool {
    let json = c.archived().json.as_slice();
    json.windows(b"CrashLoopBackOff".len()).any(|w| w == b"CrashLoopBackOff")
}

/// Follows the node and pod informers and sets the gauges.
pub fn start(nodes: Arc<Informer>, pods: Arc<Informer>, metrics: super::metrics::ControllerMetrics) {
    let mut node_rx = nodes.subscribe();
    let mut pod_rx = pods.subscribe();
    tokio::spawn(async move {
        let mut status: HashMap<String, &'static str> = HashMap::new();
        let mut looping: HashSet<String> = HashSet::new();
        // What was cached before subscribing; the channels carry the rest.
        for n in nodes.list() {
            status.insert(n.key.clone(), ready_status(&n.object()));
        }
        for p in pods.list().iter().filter(|p| mentions_crash_loop(p) && crash_looping(&p.object())) {
            looping.insert(p.key.clone());
        }
        loop {
            tokio::select! {
                Some(c) = node_rx.recv() => match c.new {
                    Some(n) => { status.insert(c.key, ready_status(&n.object())); }
                    None => { status.remove(&c.key); }
                },
                Some(c) = pod_rx.recv() => {
                    if c.new.as_ref().is_some_and(|p| mentions_crash_loop(p) && crash_looping(&p.object())) {
                        looping.insert(c.key);
                    } else {
                        looping.remove(&c.key);
                    }
                }
                else => return,
            }
            for s in ["true", "false", "unknown"] {
                let n = status.values().filter(|v| **v == s).count();
                metrics.node_ready.with_label_values(&[s]).set(n as i64);
            }
            metrics.crash_looping.set(looping.len() as i64);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn node_readiness_and_crash_loops() {
        let node = |s: &str| json!({"status": {"conditions": [{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": s}]}});
        assert_eq!(ready_status(&node("True")), "true");
        assert_eq!(ready_status(&node("False")), "false");
        assert_eq!(ready_status(&node("Unknown")), "unknown");
        assert_eq!(ready_status(&json!({})), "unknown", "never reported");
        let waiting = |reason: &str| {
            json!({"status": {"containerStatuses": [{"name": "a", "state": {"running": {}}},
            {"name": "b", "state": {"waiting": {"reason": reason}}}]}})
        };
        assert!(crash_looping(&waiting("CrashLoopBackOff")));
        assert!(!crash_looping(&waiting("ContainerCreating")));
        assert!(crash_looping(
            &json!({"status": {"initContainerStatuses": [{"state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}})
        ));
        assert!(
            !crash_looping(&json!({"metadata": {"annotations": {"note": "CrashLoopBackOff"}}})),
            "only states count"
        );
    }
}
