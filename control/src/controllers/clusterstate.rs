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
    memchr::memmem::find(c.archived().json.as_slice(), b"CrashLoopBackOff").is_some()
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
        let mut counts: HashMap<&'static str, i64> = HashMap::new();
        for s in status.values() {
            *counts.entry(s).or_default() += 1;
        }
        let publish = |counts: &HashMap<&'static str, i64>, looping: usize| {
            for s in ["true", "false", "unknown"] {
                metrics.node_ready.with_label_values(&[s]).set(counts.get(s).copied().unwrap_or(0));
            }
            metrics.crash_looping.set(looping as i64);
        };
        publish(&counts, looping.len());
        loop {
            tokio::select! {
                Some(c) = node_rx.recv() => {
                    let now = c.new.map(|n| ready_status(&n.object()));
                    let was = match now {
                        Some(s) => status.insert(c.key, s),
                        None => status.remove(&c.key),
                    };
                    if was == now {
                        continue;
                    }
                    for (s, d) in [(was, -1), (now, 1)] {
                        if let Some(s) = s {
                            *counts.entry(s).or_default() += d;
                        }
                    }
                }
                Some(c) = pod_rx.recv() => {
                    let changed = if c.new.as_ref().is_some_and(|p| mentions_crash_loop(p) && crash_looping(&p.object())) {
                        looping.insert(c.key)
                    } else {
                        looping.remove(&c.key)
                    };
                    if !changed {
                        continue;
                    }
                }
                else => return,
            }
            publish(&counts, looping.len());
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
