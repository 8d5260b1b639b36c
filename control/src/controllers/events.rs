//! Events, as client-go's EventRecorder and EventBroadcaster record them:
//! "what happened to this object, and why", as core/v1 Events that
//! `kubectl get events` and `kubectl describe` show.
//!
//! - [`EventRecorder::event`] never blocks a reconcile: the record goes into
//!   a bounded channel and is dropped (and counted) when the channel is full,
//!   as client-go drops.
//! - One task per master drains the channel through the pure
//!   [`correlator`] (spam filter, aggregation) and hands each Event to one
//!   of [`LANES`] writers by its name, which write through `api::internal`
//!   like any controller write: one Event's writes stay in order, and a
//!   burst is written many at a time (one writer waiting for each commit
//!   wrote ~100 a second and dropped most of a 5,000-pod burst's
//!   `Scheduled` events). Expiry is the store's:
//!   every Event is created on the shared event lease (`--event-ttl`, 1 h;
//!   see `api::objects`), and updates keep that lease.
//!
//! Events come from reconciles, which run only on the master holding the
//! controller lease, so only that master writes them.

pub mod correlator;

use std::sync::Arc;

use capstan_proto::k8s::registry::ResourceType;
use chrono::Utc;
use prometheus::IntCounterVec;
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub use self::correlator::EventType;
pub use self::correlator::ObjectRef;
use self::correlator::{Correlator, Decision, Record, Written};
use crate::api::{internal, ApiServer};

/// Records waiting for the writer (client-go's `maxQueuedEvents`).
pub const QUEUE: usize = 1000;

/// The field manager of the writer's writes.
const MANAGER: &str = "event-recorder";

/// Records events as one component (`source.component`). Cheap to clone.
#[derive(Clone)]
pub struct EventRecorder {
    tx: mpsc::Sender<Record>,
    component: &'static str,
    /// `capstan_events_recorded_total{result}`.
    results: IntCounterVec,
}

impl EventRecorder {
    /// Records that `reason` happened to `involved` (a whole object, with
    /// kind and apiVersion). Never waits: a full queue drops the event.
    pub fn event(&self, involved: &Value, type_: EventType, reason: &str, message: impl Into<String>) {
        self.record(ObjectRef::of(involved), String::new(), type_, reason, message.into());
    }

    /// Records an event seen on node `host` (`source.host`), e.g. the
    /// kubelet's about a container (`involved.field_path`).
    pub fn record(&self, involved: ObjectRef, host: String, type_: EventType, reason: &str, message: String) {
        let r = Record {
            involved,
            type_,
            reason: reason.to_string(),
            message,
            source: self.component,
            host,
            at: Utc::now(),
        };
        if self.tx.try_send(r).is_err() {
            self.results.with_label_values(&["dropped"]).inc();
        }
    }

    /// The same recorder speaking as another component (e.g. the node
    /// lifecycle controller's taint evictions).
    pub fn as_component(&self, component: &'static str) -> EventRecorder {
        EventRecorder { component, ..self.clone() }
    }

    /// A recorder whose records land in the returned receiver (tests).
    #[cfg(test)]
    pub fn channel(component: &'static str, size: usize) -> (EventRecorder, mpsc::Receiver<Record>) {
        let (tx, rx) = mpsc::channel(size);
        let results = IntCounterVec::new(prometheus::Opts::new("t", "t"), &["result"]).unwrap();
        (EventRecorder { tx, component, results }, rx)
    }
}

/// The reference `kubectl describe node` looks events up by: Kubernetes'
/// node events carry the node's name as its uid.
pub fn node_ref(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "uid": name}})
}

/// Hands out recorders and owns the writer task.
pub struct EventBroadcaster {
    tx: mpsc::Sender<Record>,
    results: IntCounterVec,
}

impl EventBroadcaster {
    /// Starts the writer on the current runtime.
    pub fn start(api: Arc<ApiServer>, results: IntCounterVec) -> anyhow::Result<EventBroadcaster> {
        let rt = capstan_proto::k8s::registry::by_kind("v1", "Event")
            .ok_or_else(|| anyhow::anyhow!("the Event kind is not registered"))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_events(api, rt, rx, results.clone()));
        Ok(EventBroadcaster { tx, results })
    }

    pub fn recorder(&self, component: &'static str) -> EventRecorder {
        EventRecorder { tx: self.tx.clone(), component, results: self.results.clone() }
    }
}

/// Writers of Events at once; one Event (by name) always goes to the same.
pub const LANES: usize = 16;

/// The lane of an Event: a hash of its namespace and name.
fn lane(event: &Value) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (event["metadata"]["namespace"].as_str(), event["metadata"]["name"].as_str()).hash(&mut h);
    (h.finish() % LANES as u64) as usize
}

/// Correlates each record and hands the decision to its Event's lane.
async fn write_events(
    api: Arc<ApiServer>,
    rt: &'static ResourceType,
    mut rx: mpsc::Receiver<Record>,
    results: IntCounterVec,
) {
    let correlator = Arc::new(parking_lot::Mutex::new(Correlator::default()));
    let lanes: Vec<mpsc::Sender<Written>> = (0..LANES)
        .map(|_| {
            let (tx, rx) = mpsc::channel(QUEUE / LANES);
            tokio::spawn(write_lane(api.clone(), rt, rx, results.clone(), correlator.clone()));
            tx
        })
        .collect();
    while let Some(r) = rx.recv().await {
        let decision = correlator.lock().observe(&r, Utc::now());
        match decision {
            Decision::Spam => results.with_label_values(&["spam"]).inc(),
            Decision::Write(w) => {
                // A full lane drops, as a full queue does (the lanes live
                // as long as this task, so it is never closed).
                if let Err(e) = lanes[lane(&w.event)].try_send(w) {
                    results.with_label_values(&["dropped"]).inc();
                    correlator.lock().forget(&e.into_inner());
                }
            }
        }
    }
}

/// One lane: its Events' writes one at a time, in order (an aggregated
/// Event is read, bumped and written back).
async fn write_lane(
    api: Arc<ApiServer>,
    rt: &'static ResourceType,
    mut rx: mpsc::Receiver<Written>,
    results: IntCounterVec,
    correlator: Arc<parking_lot::Mutex<Correlator>>,
) {
    while let Some(w) = rx.recv().await {
        match write_one(&api, rt, &w.event, w.aggregated).await {
            Ok(result) => results.with_label_values(&[result]).inc(),
            Err(e) => {
                results.with_label_values(&["failed"]).inc();
                tracing::debug!(
                    reason = w.event["reason"].as_str(),
                    event = w.event["metadata"]["name"].as_str(),
                    "event not written: {e}"
                );
                correlator.lock().forget(&w);
            }
        }
    }
}

/// Creates `event`, or bumps the Event of its name when `aggregated` (and
/// creates it whole if it has gone meanwhile). What happened, for the metric.
async fn write_one(
    api: &ApiServer,
    rt: &'static ResourceType,
    event: &Value,
    aggregated: bool,
) -> Result<&'static str, crate::api::status::ApiError> {
    if aggregated {
        let ns = event["metadata"]["namespace"].as_str();
        let name = event["metadata"]["name"].as_str().unwrap_or_default();
        // One retry: another writer (a client, or the previous lease
        // holder) may have touched it.
        for _ in 0..2 {
            let Some(cur) = api.objects.get(rt, ns, name).await? else { break };
            let mut next = cur.object.clone();
            for f in ["count", "lastTimestamp", "message"] {
                next[f] = event[f].clone();
            }
            match internal::write(api, rt, Some(&cur), next, MANAGER).await {
                Ok(_) => return Ok("aggregated"),
                Err(e) if e.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
    }
    internal::create(api, rt, event.clone(), MANAGER).await?;
    Ok("written")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_keeps_its_lane_and_events_spread_over_lanes() {
        let ev = |ns: &str, name: &str| json!({"metadata": {"namespace": ns, "name": name}});
        assert_eq!(lane(&ev("d", "web.1")), lane(&ev("d", "web.1")), "an Event's writes stay in order");
        let used: std::collections::BTreeSet<usize> = (0..200).map(|i| lane(&ev("d", &format!("pod-{i}.x")))).collect();
        assert!(used.len() > LANES / 2, "200 Events used only lanes {used:?}");
        assert!(used.iter().all(|&l| l < LANES));
    }

    #[test]
    fn recording_never_waits_and_counts_what_a_full_queue_drops() {
        let (rec, mut rx) = EventRecorder::channel("replicaset-controller", 2);
        let rs = json!({"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": "web-1", "namespace": "d", "uid": "u1", "resourceVersion": "9"}});
        for i in 0..5 {
            rec.event(&rs, EventType::Normal, "SuccessfulCreate", format!("Created pod: web-1-{i}"));
        }
        assert_eq!(rec.results.with_label_values(&["dropped"]).get(), 3);
        let r = rx.try_recv().unwrap();
        assert_eq!(r.source, "replicaset-controller");
        assert_eq!(r.involved.kind, "ReplicaSet");
        assert_eq!(r.involved.api_version, "apps/v1");
        assert_eq!(r.involved.resource_version, "9");
        assert_eq!(r.message, "Created pod: web-1-0");
        let taints = rec.as_component("taint-eviction-controller");
        drop(rx.try_recv());
        taints.event(&rs, EventType::Normal, "TaintManagerEviction", "m");
        assert_eq!(rx.try_recv().unwrap().source, "taint-eviction-controller");
    }
}
