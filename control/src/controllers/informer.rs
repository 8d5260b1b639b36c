//! Informers: one per resource per master, fed by the store's watch hub.
//!
//! The hub hands every subscriber the same `Bytes` frame (a refcount, never
//! a copy). One writer task per master validates each frame once and hands
//! each changed object to the informer of its kind, which takes it out of
//! the frame once, into an aligned buffer held by an `Arc<Cached>`;
//! every controller on this master shares that `Arc` and reads the
//! object's index fields (name, namespace, labels, node, owners) in place
//! from its rkyv archive. Only a reconcile that needs the whole object
//! decodes its JSON.
//!
//! The cache is resynchronised from the store (a list at one revision,
//! emitted as a diff) at start, when the hub lags, when a frame is missing
//! or when the store installs a snapshot — never a silent gap.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use capstan_proto::k8s::registry::ResourceType;
use capstan_proto::k8s::stored::{ArchivedStoredObject, StoredObject};
use capstan_raft::types::{KeyRange, RangeRequest};
use capstan_raft::watch::{ArchivedWireFrame, Frame};
use parking_lot::{Mutex, RwLock};
use rkyv::util::AlignedVec;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};

use crate::api::objects::{prefix, Objects};

/// One object as the informer holds it.
pub struct Cached {
    /// `namespace/name`, or `name` for cluster-scoped kinds.
    pub key: String,
    pub mod_revision: i64,
    bytes: AlignedVec,
}

impl Cached {
    pub fn new(key: String, mod_revision: i64, value: &[u8]) -> Option<Cached> {
        let mut bytes = AlignedVec::with_capacity(value.len());
        bytes.extend_from_slice(value);
        // Validated once here, so readers need not (validation walks the
        // whole archive: far more than reading one field).
        StoredObject::access(&bytes).ok()?;
        Some(Cached { key, mod_revision, bytes })
    }

    /// The archived object, read in place.
    /// The stored archive's bytes (forwarded to nodes as they are).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn archived(&self) -> &ArchivedStoredObject {
        // SAFETY: `new` validated these bytes as an `ArchivedStoredObject`,
        // and the buffer is private and never changes afterwards.
        unsafe { rkyv::access_unchecked::<ArchivedStoredObject>(&self.bytes) }
    }

    /// The whole object, decoded (with its resourceVersion).
    pub fn object(&self) -> Value {
        StoredObject::decode_archived(self.archived(), self.mod_revision).unwrap_or(Value::Null)
    }

    /// The object and its revision, as writes guarded by it take them.
    pub fn found(&self) -> crate::api::objects::Found {
        crate::api::objects::Found { object: self.object(), mod_revision: self.mod_revision }
    }

    pub fn namespace(&self) -> &str {
        self.archived().namespace.as_str()
    }

    pub fn uid(&self) -> &str {
        self.archived().uid.as_str()
    }

    pub fn node_name(&self) -> &str {
        self.archived().node_name.as_str()
    }

    pub fn owned_by(&self, uid: &str) -> bool {
        self.archived().owners.iter().any(|o| o.as_str() == uid)
    }

    pub fn deleting(&self) -> bool {
        self.archived().deleting
    }

    /// `metadata.labels` as JSON, built from the archived labels without
    /// decoding the object.
    pub fn labels(&self) -> Value {
        let labels = self.archived().labels.iter().map(|e| (e.0.to_string(), Value::String(e.1.to_string())));
        Value::Object(labels.collect())
    }

    /// Whether the object's JSON contains `needle`: a cheap test that
    /// rules an object out before decoding it (a hit still needs a look).
    pub fn mentions(&self, needle: &[u8]) -> bool {
        memchr::memmem::find(&self.archived().json, needle).is_some()
    }
}

/// A change the informer applied: what was, what is.
#[derive(Clone)]
pub struct Change {
    pub key: String,
    pub old: Option<Arc<Cached>>,
    pub new: Option<Arc<Cached>>,
    /// This informer's change counter: changes are numbered in the order
    /// they are emitted (see [`Informer::attach`]).
    pub seq: u64,
}

/// Subscribers and the number of the last change emitted to them. The cache
/// is updated and the change emitted under this one lock, so whoever holds
/// it sees a cache that reflects exactly the changes numbered up to `seq`.
#[derive(Default)]
struct Subscribers {
    list: Vec<mpsc::UnboundedSender<Change>>,
    seq: u64,
}

impl Subscribers {
    fn emit(&mut self, key: String, old: Option<Arc<Cached>>, new: Option<Arc<Cached>>) {
        self.seq += 1;
        let c = Change { key, old, new, seq: self.seq };
        self.list.retain(|s| s.send(c.clone()).is_ok());
    }
}

pub struct Informer {
    pub rt: &'static ResourceType,
    prefix: Vec<u8>,
    cache: RwLock<BTreeMap<String, Arc<Cached>>>,
    /// Keys of the objects naming each node (pods by `spec.nodeName`).
    by_node: RwLock<HashMap<String, BTreeSet<String>>>,
    revision: AtomicI64,
    subscribers: Mutex<Subscribers>,
}

fn cache_key(prefix: &[u8], key: &[u8]) -> Option<String> {
    key.strip_prefix(prefix).and_then(|k| std::str::from_utf8(k).ok()).map(str::to_string)
}

impl Informer {
    fn new(rt: &'static ResourceType) -> Informer {
        Informer {
            rt,
            prefix: prefix(rt, None),
            cache: RwLock::new(BTreeMap::new()),
            by_node: RwLock::default(),
            revision: AtomicI64::new(0),
            subscribers: Mutex::default(),
        }
    }

    pub fn get(&self, key: &str) -> Option<Arc<Cached>> {
        self.cache.read().get(key).cloned()
    }

    pub fn list(&self) -> Vec<Arc<Cached>> {
        self.cache.read().values().cloned().collect()
    }

    /// Objects naming `node` (pods bound to it), from an index.
    pub fn list_node(&self, node: &str) -> Vec<Arc<Cached>> {
        let keys: Vec<String> = self.by_node.read().get(node).map(|k| k.iter().cloned().collect()).unwrap_or_default();
        let cache = self.cache.read();
        keys.iter().filter_map(|k| cache.get(k).cloned()).collect()
    }

    fn reindex(&self, old: Option<&Cached>, new: Option<&Cached>) {
        let (was, is) = (old.map_or("", |o| o.node_name()), new.map_or("", |n| n.node_name()));
        if was == is {
            return;
        }
        let mut idx = self.by_node.write();
        if let Some(o) = old.filter(|_| !was.is_empty()) {
            if let Some(set) = idx.get_mut(was) {
                set.remove(&o.key);
                if set.is_empty() {
                    idx.remove(was);
                }
            }
        }
        if let Some(n) = new.filter(|_| !is.is_empty()) {
            idx.entry(is.to_string()).or_default().insert(n.key.clone());
        }
    }

    /// Objects of one namespace (key prefix `ns/`).
    pub fn list_namespace(&self, ns: &str) -> Vec<Arc<Cached>> {
        let start = format!("{ns}/");
        self.cache
            .read()
            .range(start.clone()..)
            .take_while(|(k, _)| k.starts_with(&start))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The store revision the cache reflects.
    pub fn revision(&self) -> i64 {
        self.revision.load(Ordering::Acquire)
    }

    /// Every change from now on (a resync replays differences as changes).
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Change> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers.lock().list.push(tx);
        rx
    }

    /// The objects now and every change after them, none missed and none
    /// twice (the cache changes and changes are emitted under one lock).
    pub fn list_and_subscribe(&self) -> (Vec<Arc<Cached>>, mpsc::UnboundedReceiver<Change>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut subs = self.subscribers.lock();
        subs.list.push(tx);
        (self.list(), rx)
    }

    /// Runs `f` on a cache that reflects exactly the changes numbered up to
    /// the `seq` it is given, while no change can be emitted: a subscriber
    /// that takes a snapshot here and then ignores changes numbered `<= seq`
    /// sees every change once, none twice, and no stale one.
    pub fn attach<T>(&self, f: impl FnOnce(&Self, u64) -> T) -> T {
        let subs = self.subscribers.lock();
        f(self, subs.seq)
    }

    /// Replaces the cache with the store's state at its current revision,
    /// emitting the differences.
    fn relist(&self, objects: &Objects) {
        let range = KeyRange::prefix(self.prefix.clone());
        let Ok((kvs, _, rev)) = objects.range(&RangeRequest { range, ..Default::default() }) else {
            return;
        };
        let mut fresh = BTreeMap::new();
        for kv in &kvs {
            if let Some(k) = cache_key(&self.prefix, &kv.key) {
                if let Some(c) = Cached::new(k.clone(), kv.mod_revision, &kv.value) {
                    fresh.insert(k, Arc::new(c));
                }
            }
        }
        let mut idx: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (k, c) in &fresh {
            if !c.node_name().is_empty() {
                idx.entry(c.node_name().to_string()).or_default().insert(k.clone());
            }
        }
        let mut subs = self.subscribers.lock();
        *self.by_node.write() = idx;
        let old = std::mem::replace(&mut *self.cache.write(), fresh.clone());
        self.revision.store(rev, Ordering::Release);
        for (k, o) in &old {
            match fresh.get(k) {
                None => subs.emit(k.clone(), Some(o.clone()), None),
                Some(n) if n.mod_revision != o.mod_revision => subs.emit(k.clone(), Some(o.clone()), Some(n.clone())),
                Some(_) => {}
            }
        }
        for (k, n) in &fresh {
            if !old.contains_key(k) {
                subs.emit(k.clone(), None, Some(n.clone()));
            }
        }
    }

    /// Applies the events of `frame` under this informer's prefix; false
    /// if the frame does not follow the cache (resynchronise).
    fn apply(&self, frame: &Frame, wire: &ArchivedWireFrame) -> bool {
        let rev = self.revision();
        if frame.reset || frame.revision > rev + 1 {
            return false;
        }
        if frame.revision <= rev {
            return true;
        }
        for ev in wire.events.iter() {
            let Some(k) = cache_key(&self.prefix, &ev.kv.key) else { continue };
            let mut subs = self.subscribers.lock();
            let old = self.cache.read().get(&k).cloned();
            let new = if ev.delete {
                self.cache.write().remove(&k);
                None
            } else {
                match Cached::new(k.clone(), ev.kv.mod_revision.to_native(), &ev.kv.value) {
                    Some(c) => {
                        let c = Arc::new(c);
                        self.cache.write().insert(k.clone(), c.clone());
                        Some(c)
                    }
                    // Not an object (written around the API): not cached.
                    None => {
                        self.cache.write().remove(&k);
                        None
                    }
                }
            };
            self.reindex(old.as_deref(), new.as_deref());
            subs.emit(k, old, new);
        }
        self.revision.store(frame.revision, Ordering::Release);
        true
    }
}

/// The one writer of every informer of a master: each frame is received,
/// validated and routed once (a task per informer woke, and validated the
/// frame, once per informer for every revision of any kind).
async fn run(informers: Vec<Arc<Informer>>, objects: Objects) {
    loop {
        // Subscribe before listing: frames after the lists' revisions are
        // then all in the channel.
        let mut frames = objects.node.hub.frames();
        for inf in &informers {
            inf.relist(&objects);
        }
        loop {
            match frames.recv().await {
                Ok(frame) => {
                    let Ok(wire) = frame.archived() else { break };
                    if !informers.iter().all(|inf| inf.apply(&frame, wire)) {
                        break; // resync
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }
}

/// The informers of one master, by kind.
pub struct Informers {
    pub by_kind: BTreeMap<&'static str, Arc<Informer>>,
}

impl Informers {
    pub fn start(objects: &Objects, kinds: &[&str]) -> Informers {
        let by_kind: BTreeMap<_, _> = capstan_proto::k8s::registry::all()
            .iter()
            .filter(|rt| kinds.contains(&rt.kind))
            .map(|rt| (rt.kind, Arc::new(Informer::new(rt))))
            .collect();
        tokio::spawn(run(by_kind.values().cloned().collect(), objects.clone()));
        Informers { by_kind }
    }

    pub fn get(&self, kind: &str) -> &Arc<Informer> {
        self.by_kind.get(kind).unwrap_or_else(|| panic!("no informer for {kind} was started"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cached(obj: &Value) -> Cached {
        let bytes = StoredObject::from_object(obj).unwrap().encode();
        Cached::new("d/p".into(), 7, &bytes).unwrap()
    }

    #[test]
    fn labels_and_mentions_read_the_archive() {
        let pod = json!({"metadata": {"name": "p", "namespace": "d", "labels": {"app": "web", "tier": "1"}},
            "spec": {"volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": "data"}}]}});
        let c = cached(&pod);
        assert_eq!(c.labels(), json!({"app": "web", "tier": "1"}));
        assert_eq!(c.labels(), c.object()["metadata"]["labels"], "the same labels as the decoded object");
        assert!(c.mentions(b"\"persistentVolumeClaim\""));
        assert!(!c.mentions(b"\"ephemeral\""));
        let bare = cached(&json!({"metadata": {"name": "q", "namespace": "d"}}));
        assert_eq!(bare.labels(), json!({}));
    }
}
