//! client-go's EventCorrelator, sans IO: every recorded event goes through
//! [`Correlator::observe`] with the time it happened and comes out as the
//! Event to write, or as spam to drop. No clock, no store: the caller
//! passes `now` and carries the decision out.
//!
//! Three stages, as in client-go (`tools/record/events_cache.go`):
//! - spam filter: a token bucket per source + involved object (burst
//!   [`SPAM_BURST`], then one per [`SPAM_REFILL`]), so a crash-looping
//!   object cannot flood the store;
//! - aggregator: more than [`SIMILAR_MAX`] distinct messages with the same
//!   source, object, type and reason within [`WINDOW`] collapse into one
//!   Event "(combined from similar events): <latest message>";
//! - logger: the same event again within [`WINDOW`] bumps `count` and
//!   `lastTimestamp` of the Event already written instead of a new one.
//!
//! Each cache is an LRU of [`CACHE_MAX`] keys, as client-go's: a full
//! cache forgets the key seen longest ago, in O(1) (scanning for the
//! oldest of 4,096 entries per record cost the leader a tenth of its CPU
//! in a 10,000-pod burst).

use std::collections::HashSet;
use std::num::NonZeroUsize;

use lru::LruCache;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

/// Correlation window of the aggregator and the logger (client-go's
/// `maxIntervalInSeconds`).
pub const WINDOW: chrono::Duration = chrono::Duration::minutes(10);
/// Distinct messages of one (object, reason) kept apart before combining.
pub const SIMILAR_MAX: usize = 10;
/// Events an object may get at once before the spam filter throttles it.
pub const SPAM_BURST: f64 = 25.0;
/// One more event allowed per this long once the burst is spent.
pub const SPAM_REFILL: chrono::Duration = chrono::Duration::minutes(5);
/// Keys kept per cache (client-go's LRU size).
pub const CACHE_MAX: usize = 4096;
pub const COMBINED_PREFIX: &str = "(combined from similar events): ";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// The object an Event is about (Kubernetes' ObjectReference).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub kind: String,
    pub api_version: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    /// The part of the object, e.g. `spec.containers{web}` (kubelet events).
    pub field_path: String,
}

impl ObjectRef {
    /// The reference to `obj` (a whole object with kind and apiVersion).
    pub fn of(obj: &Value) -> ObjectRef {
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let m = &obj["metadata"];
        ObjectRef {
            kind: s(&obj["kind"]),
            api_version: s(&obj["apiVersion"]),
            namespace: s(&m["namespace"]),
            name: s(&m["name"]),
            uid: s(&m["uid"]),
            resource_version: s(&m["resourceVersion"]),
            field_path: String::new(),
        }
    }

    pub fn to_json(&self) -> Value {
        let mut r = serde_json::Map::new();
        for (k, v) in [
            ("kind", &self.kind),
            ("namespace", &self.namespace),
            ("name", &self.name),
            ("uid", &self.uid),
            ("apiVersion", &self.api_version),
            ("resourceVersion", &self.resource_version),
            ("fieldPath", &self.field_path),
        ] {
            if !v.is_empty() {
                r.insert(k.into(), json!(v));
            }
        }
        Value::Object(r)
    }

    /// Identity for correlation: the resourceVersion changes with every
    /// write, so it is not part of it (client-go leaves it out too).
    fn key(&self) -> String {
        [&self.kind, &self.namespace, &self.name, &self.uid, &self.api_version, &self.field_path]
            .map(String::as_str)
            .join("\u{0}")
    }
}

/// One recorded event, as a controller said it.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub involved: ObjectRef,
    pub type_: EventType,
    pub reason: String,
    pub message: String,
    /// `source.component`, e.g. `replicaset-controller`.
    pub source: &'static str,
    /// `source.host`: the node, for the kubelet's events; empty otherwise.
    pub host: String,
    pub at: DateTime<Utc>,
}

/// What to do with a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Write(Written),
    /// The spam filter dropped it.
    Spam,
}

/// An Event to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    pub event: Value,
    /// An Event of this name was written before: bump its count,
    /// lastTimestamp and message (create the whole Event if it has gone,
    /// e.g. expired).
    pub aggregated: bool,
    /// The logger's key, for [`Correlator::forget`].
    key: String,
}

fn secs(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// The Event's name, client-go's `<object>.<unix nanos in hex>`, its
/// object part cut so the name stays a valid DNS subdomain (253).
pub fn event_name(object: &str, at: DateTime<Utc>) -> String {
    let nanos = at.timestamp_nanos_opt().unwrap_or_default();
    let suffix = format!(".{nanos:x}");
    let mut prefix = object;
    while prefix.len() + suffix.len() > 253 {
        let cut = prefix.char_indices().last().map_or(0, |(i, _)| i);
        prefix = &prefix[..cut];
    }
    format!("{}{suffix}", prefix.trim_end_matches(['.', '-']))
}

/// A token bucket, refilled continuously.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: DateTime<Utc>,
}

impl Bucket {
    fn refilled(&self, now: DateTime<Utc>) -> f64 {
        let elapsed = (now - self.at).num_milliseconds().max(0) as f64;
        (self.tokens + elapsed / SPAM_REFILL.num_milliseconds() as f64).min(SPAM_BURST)
    }
}

struct Similar {
    messages: HashSet<String>,
    last: DateTime<Utc>,
}

struct Logged {
    name: String,
    namespace: String,
    count: i64,
    first: DateTime<Utc>,
    last: DateTime<Utc>,
}

pub struct Correlator {
    spam: LruCache<String, Bucket>,
    similar: LruCache<String, Similar>,
    logged: LruCache<String, Logged>,
}

impl Default for Correlator {
    fn default() -> Self {
        let cap = NonZeroUsize::new(CACHE_MAX).expect("CACHE_MAX is not zero");
        Correlator { spam: LruCache::new(cap), similar: LruCache::new(cap), logged: LruCache::new(cap) }
    }
}

impl Correlator {
    /// Decides what `r` becomes, at `now`.
    pub fn observe(&mut self, r: &Record, now: DateTime<Utc>) -> Decision {
        let object = format!("{}\u{0}{}\u{0}{}", r.source, r.host, r.involved.key());
        if !self.allow(&object, now) {
            return Decision::Spam;
        }
        let (key, message) = self.aggregate(&object, r, now);
        let namespace = if r.involved.namespace.is_empty() { "default" } else { &r.involved.namespace };
        let fresh = |l: &Logged| now - l.last <= WINDOW;
        let (logged, aggregated) = match self.logged.pop(&key).filter(fresh) {
            Some(mut l) => {
                l.count += 1;
                l.last = r.at.max(l.last);
                (l, true)
            }
            None => {
                let l = Logged {
                    name: event_name(&r.involved.name, r.at),
                    namespace: namespace.to_string(),
                    count: 1,
                    first: r.at,
                    last: r.at,
                };
                (l, false)
            }
        };
        let source = match r.host.as_str() {
            "" => json!({"component": r.source}),
            host => json!({"component": r.source, "host": host}),
        };
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": logged.name, "namespace": logged.namespace},
            "involvedObject": r.involved.to_json(),
            "reason": r.reason,
            "message": message,
            "type": r.type_.as_str(),
            "source": source,
            "reportingComponent": r.source,
            "reportingInstance": r.host,
            "firstTimestamp": secs(logged.first),
            "lastTimestamp": secs(logged.last),
            "count": logged.count,
            "eventTime": null,
        });
        let written = Written { event, aggregated, key: key.clone() };
        self.logged.put(key, logged);
        Decision::Write(written)
    }

    /// Forgets the Event `w` wrote, so the next one like it starts a new
    /// Event (after its write failed for good). A newer Event under the
    /// same key is kept.
    pub fn forget(&mut self, w: &Written) {
        if self.logged.peek(&w.key).is_some_and(|l| w.event["metadata"]["name"] == l.name.as_str()) {
            self.logged.pop(&w.key);
        }
    }

    /// The spam filter: one token per event from the object's bucket.
    fn allow(&mut self, object: &str, now: DateTime<Utc>) -> bool {
        let b = self.spam.get_or_insert_mut_ref(object, || Bucket { tokens: SPAM_BURST, at: now });
        let tokens = b.refilled(now);
        b.at = now.max(b.at);
        if tokens >= 1.0 {
            b.tokens = tokens - 1.0;
            true
        } else {
            b.tokens = tokens;
            false
        }
    }

    /// The aggregator: the logger key and message for `r` — its own, or
    /// the combined one once its (object, type, reason) has too many
    /// distinct messages within the window.
    fn aggregate(&mut self, object: &str, r: &Record, now: DateTime<Utc>) -> (String, String) {
        let similar_key = format!("{object}\u{0}{}\u{0}{}", r.type_.as_str(), r.reason);
        let s = self.similar.get_or_insert_mut_ref(&similar_key, || Similar { messages: HashSet::new(), last: now });
        if now - s.last > WINDOW {
            s.messages.clear();
        }
        s.last = now;
        let new = s.messages.insert(r.message.clone());
        if s.messages.len() < SIMILAR_MAX {
            return (format!("{similar_key}\u{0}{}", r.message), r.message.clone());
        }
        // Keep the first messages apart and the set bounded: this one is
        // combined.
        if new {
            s.messages.remove(&r.message);
        }
        (similar_key, format!("{COMBINED_PREFIX}{}", r.message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn pod(name: &str) -> ObjectRef {
        ObjectRef {
            kind: "Pod".into(),
            api_version: "v1".into(),
            namespace: "d".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            resource_version: "7".into(),
            field_path: String::new(),
        }
    }

    fn rec(obj: &ObjectRef, reason: &str, message: &str, at: DateTime<Utc>) -> Record {
        Record {
            involved: obj.clone(),
            type_: EventType::Warning,
            reason: reason.into(),
            message: message.into(),
            source: "default-scheduler",
            host: String::new(),
            at,
        }
    }

    fn write(d: Decision) -> (Value, bool) {
        match d {
            Decision::Write(w) => (w.event, w.aggregated),
            Decision::Spam => panic!("unexpected spam"),
        }
    }

    #[test]
    fn a_new_event_is_a_whole_core_v1_event() {
        let mut c = Correlator::default();
        let (e, aggregated) = write(c.observe(&rec(&pod("web-1"), "FailedScheduling", "0/1 nodes", t(0)), t(0)));
        assert!(!aggregated);
        assert_eq!(e["metadata"]["namespace"], "d");
        assert_eq!(e["metadata"]["name"], event_name("web-1", t(0)));
        assert!(e["metadata"]["name"].as_str().unwrap().starts_with("web-1."));
        assert_eq!(
            e["involvedObject"],
            json!({"kind": "Pod", "namespace": "d", "name": "web-1", "uid": "uid-web-1", "apiVersion": "v1", "resourceVersion": "7"})
        );
        assert_eq!(
            (&e["type"], &e["reason"], &e["message"], &e["count"]),
            (&json!("Warning"), &json!("FailedScheduling"), &json!("0/1 nodes"), &json!(1))
        );
        assert_eq!(e["source"]["component"], "default-scheduler");
        assert_eq!(e["reportingComponent"], "default-scheduler");
        assert_eq!(e["firstTimestamp"], "2027-01-15T08:00:00Z");
        assert_eq!(e["lastTimestamp"], e["firstTimestamp"]);
    }

    #[test]
    fn cluster_scoped_objects_get_their_events_in_default() {
        let mut c = Correlator::default();
        let node = ObjectRef { kind: "Node".into(), name: "n1".into(), uid: "n1".into(), ..Default::default() };
        let (e, _) = write(c.observe(&rec(&node, "NodeNotReady", "Node n1 status is now: NodeNotReady", t(0)), t(0)));
        assert_eq!(e["metadata"]["namespace"], "default");
        assert!(e["involvedObject"].get("namespace").is_none());
    }

    #[test]
    fn the_same_event_within_the_window_bumps_count_and_last_seen() {
        let mut c = Correlator::default();
        let p = pod("a");
        let (first, _) = write(c.observe(&rec(&p, "FailedScheduling", "m", t(0)), t(0)));
        let (second, aggregated) = write(c.observe(&rec(&p, "FailedScheduling", "m", t(30)), t(30)));
        assert!(aggregated);
        assert_eq!(second["metadata"]["name"], first["metadata"]["name"]);
        assert_eq!(second["count"], 2);
        assert_eq!(second["firstTimestamp"], first["firstTimestamp"]);
        assert_eq!(second["lastTimestamp"], secs(t(30)));
        // A newer resourceVersion of the same object is the same object.
        let mut newer = p.clone();
        newer.resource_version = "8".into();
        let (third, aggregated) = write(c.observe(&rec(&newer, "FailedScheduling", "m", t(60)), t(60)));
        assert!(aggregated);
        assert_eq!(third["count"], 3);

        // Another message, reason, type, source or object is another Event.
        let (e, aggregated) = write(c.observe(&rec(&p, "FailedScheduling", "other", t(61)), t(61)));
        assert!(!aggregated);
        assert_ne!(e["metadata"]["name"], first["metadata"]["name"]);
        assert!(!write(c.observe(&rec(&p, "Scheduled", "m", t(62)), t(62))).1);
        let mut normal = rec(&p, "FailedScheduling", "m", t(63));
        normal.type_ = EventType::Normal;
        assert!(!write(c.observe(&normal, t(63))).1);
        let mut other_source = rec(&p, "FailedScheduling", "m", t(64));
        other_source.source = "kubelet";
        assert!(!write(c.observe(&other_source, t(64))).1);
        assert!(!write(c.observe(&rec(&pod("b"), "FailedScheduling", "m", t(65)), t(65))).1);
    }

    #[test]
    fn kubelet_events_name_their_node_and_container() {
        let mut c = Correlator::default();
        let mut web = pod("a");
        web.field_path = "spec.containers{web}".into();
        let mut r = rec(&web, "Unhealthy", "Liveness probe failed", t(0));
        (r.source, r.host) = ("kubelet", "node-1".into());
        let (e, _) = write(c.observe(&r, t(0)));
        assert_eq!(e["source"], json!({"component": "kubelet", "host": "node-1"}));
        assert_eq!(e["reportingInstance"], "node-1");
        assert_eq!(e["involvedObject"]["fieldPath"], "spec.containers{web}");
        // Another container of the same pod is another Event, not a repeat.
        let mut sidecar = web.clone();
        sidecar.field_path = "spec.containers{sidecar}".into();
        let (other, aggregated) = write(c.observe(&Record { involved: sidecar, at: t(1), ..r.clone() }, t(1)));
        assert!(!aggregated);
        assert_ne!(other["metadata"]["name"], e["metadata"]["name"]);
        let (again, aggregated) = write(c.observe(&r, t(2)));
        assert!(aggregated);
        assert_eq!(again["count"], 2);
    }

    #[test]
    fn past_the_window_the_same_event_is_a_new_one() {
        let mut c = Correlator::default();
        let p = pod("a");
        let (first, _) = write(c.observe(&rec(&p, "R", "m", t(0)), t(0)));
        let later = t(0) + WINDOW + chrono::Duration::seconds(1);
        let (e, aggregated) = write(c.observe(&rec(&p, "R", "m", later), later));
        assert!(!aggregated);
        assert_eq!(e["count"], 1);
        assert_ne!(e["metadata"]["name"], first["metadata"]["name"]);
    }

    #[test]
    fn forgetting_a_failed_write_starts_a_new_event() {
        let mut c = Correlator::default();
        let p = pod("a");
        let Decision::Write(first) = c.observe(&rec(&p, "R", "m", t(0)), t(0)) else { panic!("spam") };
        // A newer Event under the same key is not forgotten for an older one.
        let later = t(0) + WINDOW + chrono::Duration::seconds(1);
        let Decision::Write(newer) = c.observe(&rec(&p, "R", "m", later), later) else { panic!("spam") };
        c.forget(&first);
        assert!(write(c.observe(&rec(&p, "R", "m", later), later)).1, "the newer Event was forgotten");
        c.forget(&newer);
        let (e, aggregated) = write(c.observe(&rec(&p, "R", "m", later), later));
        assert!(!aggregated);
        assert_eq!(e["count"], 1);
    }

    #[test]
    fn the_spam_filter_allows_a_burst_then_one_per_refill() {
        let mut c = Correlator::default();
        let p = pod("crashloop");
        let mut written = 0;
        for _ in 0..40 {
            if c.observe(&rec(&p, "BackOff", "m", t(0)), t(0)) != Decision::Spam {
                written += 1;
            }
        }
        assert_eq!(written, SPAM_BURST as usize);
        // The bucket is per object: another pod is not throttled.
        assert_ne!(c.observe(&rec(&pod("other"), "BackOff", "m", t(0)), t(0)), Decision::Spam);
        // Nor is the same object as another source.
        let mut kubelet = rec(&p, "BackOff", "m", t(0));
        kubelet.source = "kubelet";
        assert_ne!(c.observe(&kubelet, t(0)), Decision::Spam);
        // One token back after the refill interval, not before.
        let almost = t(0) + SPAM_REFILL - chrono::Duration::seconds(1);
        assert_eq!(c.observe(&rec(&p, "BackOff", "m", almost), almost), Decision::Spam);
        let after = t(0) + SPAM_REFILL + chrono::Duration::seconds(1);
        let (e, aggregated) = write(c.observe(&rec(&p, "BackOff", "m", after), after));
        assert!(aggregated, "the allowed one still aggregates into the earlier Event");
        assert_eq!(e["count"], SPAM_BURST as i64 + 1, "spam is not counted");
        assert_eq!(c.observe(&rec(&p, "BackOff", "m", after), after), Decision::Spam);
    }

    #[test]
    fn many_distinct_messages_combine_into_one_event() {
        let mut c = Correlator::default();
        let p = pod("a");
        let mut names = HashSet::new();
        for i in 0..SIMILAR_MAX - 1 {
            let (e, aggregated) = write(c.observe(&rec(&p, "FailedMount", &format!("m{i}"), t(i as i64)), t(0)));
            assert!(!aggregated);
            names.insert(e["metadata"]["name"].as_str().unwrap().to_string());
        }
        assert_eq!(names.len(), SIMILAR_MAX - 1);
        // The same message again is still its own Event.
        let (e, aggregated) = write(c.observe(&rec(&p, "FailedMount", "m3", t(20)), t(20)));
        assert!(aggregated);
        assert_eq!(e["message"], "m3");
        // The tenth distinct message and later ones share one combined Event.
        let (first, aggregated) = write(c.observe(&rec(&p, "FailedMount", "m-new", t(21)), t(21)));
        assert!(!aggregated);
        assert_eq!(first["message"], "(combined from similar events): m-new");
        let (next, aggregated) = write(c.observe(&rec(&p, "FailedMount", "m-newer", t(22)), t(22)));
        assert!(aggregated);
        assert_eq!(next["metadata"]["name"], first["metadata"]["name"]);
        assert_eq!(next["message"], "(combined from similar events): m-newer");
        assert_eq!(next["count"], 2);
    }

    #[test]
    fn caches_stay_bounded() {
        let mut c = Correlator::default();
        let keep = pod("keep");
        for i in 0..(CACHE_MAX + 100) {
            let at = t(i as i64);
            c.observe(&rec(&pod(&format!("p{i}")), "R", "m", at), at);
            if i % 500 == 0 {
                // Seen again and again, so never the least recently seen.
                c.observe(&rec(&keep, "R", "m", at), at);
            }
        }
        assert!(c.logged.len() <= CACHE_MAX);
        assert!(c.spam.len() <= CACHE_MAX);
        assert!(c.similar.len() <= CACHE_MAX);
        // The latest objects are still correlated.
        let last = format!("p{}", CACHE_MAX + 99);
        let at = t((CACHE_MAX + 100) as i64);
        assert!(write(c.observe(&rec(&pod(&last), "R", "m", at), at)).1);
        assert!(write(c.observe(&rec(&keep, "R", "m", at), at)).1, "a key in use was evicted");
        assert!(!write(c.observe(&rec(&pod("p1"), "R", "m", at), at)).1, "the oldest key was kept");
    }

    #[test]
    fn long_object_names_still_make_valid_event_names() {
        let long = "a".repeat(253);
        let n = event_name(&long, t(0));
        assert!(n.len() <= 253);
        assert!(n.starts_with("aaa") && n.contains('.'));
    }
}
