//! The kubelet's Events: what happened to a pod's containers (Pulled,
//! Created, Started, Killing, Unhealthy, BackOff, Failed...), as
//! `kubectl describe pod` shows them.
//!
//! Recording never blocks a pod worker: events go into a bounded queue and
//! are dropped when it is full (client-go drops too). One sender task
//! drains the queue, batching whatever queued up while the previous report
//! was in flight into one `NodeRequest::Events`. The master's gateway
//! checks each is about a pod bound to this node and writes it through its
//! event correlator (aggregation, spam filter, TTL).

use std::sync::Arc;

use capstan_proto::nodewire::{AgentEvent, NodeRequest, NodeResponse};
use tokio::sync::mpsc;

use crate::conn::Masters;
use crate::pods::PodSpec;

/// Events waiting for the sender.
const QUEUE: usize = 1024;
/// Events per report (the gateway's limit).
const BATCH: usize = 256;

/// Records events about the node's pods. Cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<AgentEvent>,
}

impl Recorder {
    /// A recorder and the queue its sender drains ([`send`]).
    pub fn new() -> (Recorder, mpsc::Receiver<AgentEvent>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Recorder { tx }, rx)
    }

    /// A `Normal` event about `pod` (or its `container`).
    pub fn normal(&self, pod: &PodSpec, container: Option<&str>, reason: &str, message: String) {
        self.record(event(pod, container, false, reason, message));
    }

    /// A `Warning` event about `pod` (or its `container`).
    pub fn warning(&self, pod: &PodSpec, container: Option<&str>, reason: &str, message: String) {
        self.record(event(pod, container, true, reason, message));
    }

    fn record(&self, e: AgentEvent) {
        if self.tx.try_send(e).is_err() {
            tracing::debug!("event queue full: event dropped");
        }
    }
}

/// The event as the gateway takes it; messages are cut to its limit on a
/// character boundary.
pub fn event(pod: &PodSpec, container: Option<&str>, warning: bool, reason: &str, mut message: String) -> AgentEvent {
    const MAX: usize = 1024;
    if message.len() > MAX {
        let mut cut = MAX;
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
    }
    AgentEvent {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        uid: pod.uid.clone(),
        container: container.map(str::to_string),
        warning,
        reason: reason.to_string(),
        message,
    }
}

/// Sends queued events to the masters until the recorders are gone. A
/// report that fails is dropped, not retried: events are best effort, and
/// a master that is down would otherwise hold every later one back.
pub async fn send(masters: Arc<Masters>, mut rx: mpsc::Receiver<AgentEvent>) {
    while let Some(first) = rx.recv().await {
        let mut events = vec![first];
        while events.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => events.push(e),
                Err(_) => break,
            }
        }
        let n = events.len();
        match masters.request(&NodeRequest::Events { events }).await {
            Ok(NodeResponse::Done) => {}
            Ok(other) => tracing::debug!(events = n, answer = ?other, "events not all recorded"),
            Err(e) => tracing::debug!(events = n, error = %e, "events not sent"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> PodSpec {
        let raw = serde_json::json!({
            "metadata": {"namespace": "d", "name": "web", "uid": "u1"},
            "spec": {"containers": [{"name": "c", "image": "busybox:stable"}]},
        });
        PodSpec::parse(&raw).unwrap()
    }

    #[test]
    fn events_name_the_pod_and_container_and_fit_the_gateways_limit() {
        let e = event(&pod(), Some("c"), true, "Unhealthy", "é".repeat(600));
        assert_eq!((e.namespace.as_str(), e.pod.as_str(), e.uid.as_str()), ("d", "web", "u1"));
        assert_eq!(e.container.as_deref(), Some("c"));
        assert!(e.warning);
        assert_eq!(e.message.len(), 1024, "cut on a character boundary at the limit");
        assert!(e.message.chars().all(|c| c == 'é'));
    }

    #[tokio::test]
    async fn a_full_queue_drops_instead_of_blocking() {
        let (rec, mut rx) = Recorder::new();
        let pod = pod();
        for i in 0..QUEUE + 10 {
            rec.normal(&pod, None, "Started", format!("{i}"));
        }
        let mut got = 0;
        while rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, QUEUE);
    }
}
