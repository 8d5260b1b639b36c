//! Garbage collector and namespace lifecycle.
//!
//! - Background: an object whose owners (`ownerReferences` uids) are all
//!   gone is deleted.
//! - Foreground: an owner marked for deletion with the `foregroundDeletion`
//!   finalizer has its dependents deleted; once none remain the finalizer
//!   goes and the owner with it.
//! - Orphan: an owner with the `orphan` finalizer has its uid removed from
//!   its dependents' ownerReferences, then loses the finalizer.
//! - Namespaces being deleted are emptied, then their `kubernetes`
//!   finalizer is removed.
//!
//! The collector keeps a [`Graph`] of every object's index fields (uid,
//! owners, namespace, deleting), fed by the watch hub's frames like an
//! informer, with owner -> dependents and namespace -> contents indexes.
//! A change marks only the objects it can affect (the object, its owners,
//! its dependents, its namespace) and a pass plans only those; a full
//! pass every 5 s is the safety net. Deciding is pure ([`Graph::take_plan`]).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use capstan_proto::k8s::registry::{self, ResourceType};
use capstan_proto::k8s::stored::StoredObject;
use serde_json::Value;

use crate::api::admission::{plan_delete, DeletePlan};
use crate::api::objects::Objects;
use crate::api::status::ApiError;
use capstan_raft::types::{KeyRange, RangeRequest};

/// What the collector needs to know about one object.
#[derive(Debug, Clone, PartialEq)]
pub struct Obj {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub owners: Vec<String>,
    pub deleting: bool,
    /// `metadata.finalizers` (plus `spec.finalizers` for namespaces), only
    /// read for objects being deleted.
    pub finalizers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Delete { kind: &'static str, namespace: String, name: String, uid: String },
    RemoveOwnerRef { kind: &'static str, namespace: String, name: String, owner: String },
    RemoveFinalizer { kind: &'static str, namespace: String, name: String, finalizer: String },
}

fn delete(o: &Obj) -> Action {
    Action::Delete { kind: o.kind, namespace: o.namespace.clone(), name: o.name.clone(), uid: o.uid.clone() }
}

fn remove_finalizer(o: &Obj, f: &str) -> Action {
    Action::RemoveFinalizer { kind: o.kind, namespace: o.namespace.clone(), name: o.name.clone(), finalizer: f.into() }
}

/// An object's store key.
type Key = Vec<u8>;

/// Every object's index fields with the indexes the rules need, and the
/// objects a change may have given work.
#[derive(Default)]
pub struct Graph {
    objs: HashMap<Key, Obj>,
    by_uid: HashMap<String, Key>,
    /// Owner uid -> dependents (also for owners that do not exist).
    dependents: HashMap<String, BTreeSet<Key>>,
    /// Namespace -> its namespaced objects.
    contents: HashMap<String, BTreeSet<Key>>,
    /// Namespace name -> the Namespace object's key.
    namespaces: HashMap<String, Key>,
    dirty: BTreeSet<Key>,
}

impl Graph {
    pub fn from_objects(objs: impl IntoIterator<Item = (Key, Obj)>) -> Graph {
        let mut g = Graph::default();
        for (k, o) in objs {
            g.upsert(k, o);
        }
        g
    }

    fn mark_uid(&mut self, uid: &str) {
        if let Some(k) = self.by_uid.get(uid) {
            self.dirty.insert(k.clone());
        }
    }

    fn mark_namespace(&mut self, ns: &str) {
        if let Some(k) = self.namespaces.get(ns) {
            self.dirty.insert(k.clone());
        }
    }

    /// Takes `key` out of the indexes; its fields.
    fn unlink(&mut self, key: &[u8]) -> Option<Obj> {
        let o = self.objs.remove(key)?;
        if self.by_uid.get(&o.uid).is_some_and(|k| k == key) {
            self.by_uid.remove(&o.uid);
        }
        for owner in &o.owners {
            if let Some(set) = self.dependents.get_mut(owner) {
                set.remove(key);
                if set.is_empty() {
                    self.dependents.remove(owner);
                }
            }
        }
        if o.kind == "Namespace" {
            self.namespaces.remove(&o.name);
        } else if let Some(set) = self.contents.get_mut(&o.namespace) {
            set.remove(key);
            if set.is_empty() {
                self.contents.remove(&o.namespace);
            }
        }
        Some(o)
    }

    /// An object was written: it, its owners (a foreground owner may wait
    /// for it) and its namespace may have work.
    pub fn upsert(&mut self, key: Key, o: Obj) {
        self.unlink(&key);
        for owner in &o.owners {
            self.dependents.entry(owner.clone()).or_default().insert(key.clone());
            self.mark_uid(owner);
        }
        if o.kind == "Namespace" {
            self.namespaces.insert(o.name.clone(), key.clone());
        } else if !o.namespace.is_empty() {
            self.contents.entry(o.namespace.clone()).or_default().insert(key.clone());
            self.mark_namespace(&o.namespace);
        }
        self.by_uid.insert(o.uid.clone(), key.clone());
        self.dirty.insert(key.clone());
        self.objs.insert(key, o);
    }

    /// An object is gone: its dependents may have lost their last owner;
    /// its owners and its namespace may have been waiting for it.
    pub fn remove(&mut self, key: &[u8]) {
        let Some(o) = self.unlink(key) else { return };
        let deps: Vec<Key> = self.dependents.get(&o.uid).into_iter().flatten().cloned().collect();
        self.dirty.extend(deps);
        for owner in &o.owners {
            self.mark_uid(owner);
        }
        self.mark_namespace(&o.namespace);
    }

    /// Marks `key` for the next pass (an action on it failed).
    pub fn mark(&mut self, key: Key) {
        if self.objs.contains_key(&key) {
            self.dirty.insert(key);
        }
    }

    pub fn mark_all(&mut self) {
        self.dirty = self.objs.keys().cloned().collect();
    }

    pub fn len(&self) -> usize {
        self.objs.len()
    }

    fn dependents_of(&self, uid: &str) -> impl Iterator<Item = &Obj> {
        self.dependents.get(uid).into_iter().flatten().filter_map(|k| self.objs.get(k))
    }

    /// The actions for every marked object (and clears the marks), with the
    /// store key each acts on. Idempotent: planning again before the
    /// actions are seen yields the same actions.
    pub fn take_plan(&mut self) -> Vec<(Key, Action)> {
        let dirty = std::mem::take(&mut self.dirty);
        let mut out = Vec::new();
        let key_of = |o: &Obj| self.by_uid.get(&o.uid).cloned().unwrap_or_default();
        for key in dirty {
            let Some(o) = self.objs.get(&key) else { continue };
            if !o.owners.is_empty() && !o.deleting && o.owners.iter().all(|u| !self.by_uid.contains_key(u)) {
                out.push((key.clone(), delete(o)));
            }
            if !o.deleting {
                continue;
            }
            if o.finalizers.iter().any(|f| f == "orphan") {
                let mut any = false;
                for d in self.dependents_of(&o.uid) {
                    any = true;
                    let owner = o.uid.clone();
                    let a = Action::RemoveOwnerRef {
                        kind: d.kind,
                        namespace: d.namespace.clone(),
                        name: d.name.clone(),
                        owner,
                    };
                    out.push((key_of(d), a));
                }
                if !any {
                    out.push((key.clone(), remove_finalizer(o, "orphan")));
                }
            }
            if o.finalizers.iter().any(|f| f == "foregroundDeletion") {
                let mut any = false;
                for d in self.dependents_of(&o.uid) {
                    any = true;
                    if !d.deleting {
                        out.push((key_of(d), delete(d)));
                    }
                }
                if !any {
                    out.push((key.clone(), remove_finalizer(o, "foregroundDeletion")));
                }
            }
            if o.kind == "Namespace" && o.finalizers.iter().any(|f| f == "kubernetes") {
                let mut any = false;
                for (k, c) in
                    self.contents.get(&o.name).into_iter().flatten().filter_map(|k| Some((k, self.objs.get(k)?)))
                {
                    any = true;
                    if !c.deleting {
                        out.push((k.clone(), delete(c)));
                    }
                }
                if !any {
                    out.push((key.clone(), remove_finalizer(o, "kubernetes")));
                }
            }
        }
        out
    }

    /// Applies one committed revision's events; false if the frame cannot
    /// be read (the caller resynchronises).
    pub fn apply(&mut self, frame: &capstan_raft::watch::Frame) -> bool {
        let Ok(wire) = frame.archived() else { return false };
        for ev in wire.events.iter() {
            let key: Key = ev.kv.key.as_slice().to_vec();
            if ev.delete {
                self.remove(&key);
                continue;
            }
            match obj_of(&key, &ev.kv.value) {
                // Its fields are as they were (a binding, a status): the
                // indexes stand and only its own rules may have work (an
                // action on it may have met this write).
                Some(o) if self.objs.get(&key) == Some(&o) => {
                    self.dirty.insert(key);
                }
                Some(o) => self.upsert(key, o),
                // Not an object (claims, leases, Capstan's own keys).
                None => self.remove(&key),
            }
        }
        true
    }
}

/// The actions the rules give for `objs`, all considered.
#[cfg(test)]
pub fn plan(objs: &[Obj]) -> Vec<Action> {
    let mut g = Graph::from_objects(objs.iter().enumerate().map(|(i, o)| (i.to_be_bytes().to_vec(), o.clone())));
    g.take_plan().into_iter().map(|(_, a)| a).collect()
}

/// The collector's fields of the object stored at `key`, if it is one.
fn obj_of(key: &[u8], value: &[u8]) -> Option<Obj> {
    static PREFIXES: std::sync::LazyLock<Vec<(Vec<u8>, &'static ResourceType)>> = std::sync::LazyLock::new(|| {
        registry::all().iter().map(|rt| (crate::api::objects::prefix(rt, None), rt)).collect()
    });
    let (_, rt) = PREFIXES.iter().find(|(p, _)| key.starts_with(p))?;
    // Frame payloads are not aligned for rkyv: copy once.
    let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(value.len());
    buf.extend_from_slice(value);
    let a = StoredObject::access(&buf).ok()?;
    let mut o = Obj {
        kind: rt.kind,
        namespace: a.namespace.to_string(),
        name: a.name.to_string(),
        uid: a.uid.to_string(),
        owners: a.owners.iter().map(|s| s.to_string()).collect(),
        deleting: a.deleting,
        finalizers: vec![],
    };
    if o.deleting {
        let v: Value = serde_json::from_slice(&a.json).ok()?;
        let list = |x: &Value| -> Vec<String> {
            x.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect()
        };
        o.finalizers = list(&v["metadata"]["finalizers"]);
        o.finalizers.extend(list(&v["spec"]["finalizers"]));
    }
    Some(o)
}

/// Every object from this master's applied state, as a graph with every
/// object marked, and the revision it was read at.
pub fn snapshot(objects: &Objects) -> Result<(Graph, i64), ApiError> {
    let range = KeyRange::prefix(b"/registry/".to_vec());
    let (kvs, _, rev) = objects.range(&RangeRequest { range, ..Default::default() })?;
    let g = Graph::from_objects(kvs.iter().filter_map(|kv| Some((kv.key.to_vec(), obj_of(&kv.key, &kv.value)?))));
    Ok((g, rev))
}

fn kind_type(kind: &str) -> Option<&'static ResourceType> {
    registry::all().iter().find(|t| t.kind == kind)
}

/// Carries out one action; a 404 or 409 means the world moved and the next
/// pass decides again.
pub async fn execute(objects: &Objects, a: &Action) -> Result<(), ApiError> {
    let (kind, ns, name) = match a {
        Action::Delete { kind, namespace, name, .. }
        | Action::RemoveOwnerRef { kind, namespace, name, .. }
        | Action::RemoveFinalizer { kind, namespace, name, .. } => (*kind, namespace, name),
    };
    let rt = kind_type(kind).ok_or_else(|| ApiError::internal(format!("no kind {kind}")))?;
    let ns = (!ns.is_empty()).then_some(ns.as_str());
    let Some(cur) = objects.get_local(rt, ns, name)? else { return Ok(()) };
    let now = crate::api::handlers::now();
    match a {
        Action::Delete { uid, .. } => {
            if cur.object["metadata"]["uid"].as_str() != Some(uid) {
                return Ok(());
            }
            match plan_delete(kind, &cur.object, Some("Background"), None, &now) {
                DeletePlan::Now => objects.delete(rt, &cur.object, cur.mod_revision).await.map(|_| ()),
                DeletePlan::Mark(m) => objects.update(rt, m, cur.mod_revision).await.map(|_| ()),
                DeletePlan::Pending => Ok(()),
            }
        }
        Action::RemoveOwnerRef { owner, .. } => {
            let mut obj = cur.object.clone();
            if let Some(refs) = obj["metadata"]["ownerReferences"].as_array_mut() {
                refs.retain(|r| r["uid"].as_str() != Some(owner));
            }
            if obj["metadata"]["ownerReferences"].as_array().is_some_and(|r| r.is_empty()) {
                if let Some(m) = obj["metadata"].as_object_mut() {
                    m.remove("ownerReferences");
                }
            }
            objects.update(rt, obj, cur.mod_revision).await.map(|_| ())
        }
        Action::RemoveFinalizer { finalizer, .. } => {
            let mut obj = cur.object.clone();
            for path in [&["metadata", "finalizers"][..], &["spec", "finalizers"][..]] {
                if let Some(list) = obj[path[0]][path[1]].as_array_mut() {
                    list.retain(|f| f.as_str() != Some(finalizer));
                }
            }
            let left = |v: &Value| v.as_array().is_some_and(|l| !l.is_empty());
            if !left(&obj["metadata"]["finalizers"]) && !left(&obj["spec"]["finalizers"]) {
                objects.delete(rt, &obj, cur.mod_revision).await.map(|_| ())
            } else {
                objects.update(rt, obj, cur.mod_revision).await.map(|_| ())
            }
        }
    }
}

/// Keeps the graph from the watch hub (resynchronised from a full read
/// at start, on lag, on a gap or a snapshot install) and, while this
/// master holds the controller lease, carries out the plan for what
/// changes marked — and for everything every 5 s.
pub async fn run(objects: Objects, leading: tokio::sync::watch::Receiver<bool>) {
    use tokio::sync::broadcast::error::{RecvError, TryRecvError};
    loop {
        // Subscribe before reading: later frames are then all in the channel.
        let mut frames = objects.node.hub.frames();
        let (mut graph, mut rev) = match snapshot(&objects) {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!("garbage collector: reading objects: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        'follow: loop {
            let mut next = tokio::select! {
                r = frames.recv() => match r {
                    Ok(f) => Some(f),
                    Err(RecvError::Lagged(_)) => break 'follow,
                    Err(RecvError::Closed) => return,
                },
                _ = tick.tick() => {
                    graph.mark_all();
                    None
                }
            };
            // This frame and whatever else is already waiting.
            while let Some(f) = next.take() {
                if f.revision > rev {
                    if f.reset || f.revision > rev + 1 || !graph.apply(&f) {
                        break 'follow;
                    }
                    rev = f.revision;
                }
                match frames.try_recv() {
                    Ok(f) => next = Some(f),
                    Err(TryRecvError::Empty) => {}
                    Err(TryRecvError::Lagged(_)) => break 'follow,
                    Err(TryRecvError::Closed) => return,
                }
            }
            if !*leading.borrow() {
                continue;
            }
            let actions = graph.take_plan();
            if !actions.is_empty() {
                tracing::debug!(objects = graph.len(), actions = actions.len(), "garbage collector pass");
            }
            for (key, a) in actions {
                match execute(&objects, &a).await {
                    Ok(()) => tracing::debug!(?a, "garbage collector acted"),
                    // The world moved: the frames that moved it mark it again.
                    Err(e) if e.code == 404 || e.code == 409 => {}
                    Err(e) => {
                        tracing::warn!(?a, "garbage collector: {e}");
                        graph.mark(key);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(kind: &'static str, ns: &str, name: &str, uid: &str, owners: &[&str]) -> Obj {
        Obj {
            kind,
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
            owners: owners.iter().map(|s| s.to_string()).collect(),
            deleting: false,
            finalizers: vec![],
        }
    }

    fn deleting(mut o: Obj, finalizers: &[&str]) -> Obj {
        o.deleting = true;
        o.finalizers = finalizers.iter().map(|s| s.to_string()).collect();
        o
    }

    #[test]
    fn background_deletes_orphans_of_gone_owners_only() {
        let objs = vec![
            obj("ReplicaSet", "d", "rs", "rs1", &["gone"]),
            obj("Pod", "d", "p1", "p1", &["rs1"]),
            obj("Pod", "d", "p2", "p2", &["rs1", "other-live"]),
            obj("Pod", "d", "other", "other-live", &[]),
        ];
        let a = plan(&objs);
        assert_eq!(
            a,
            vec![Action::Delete { kind: "ReplicaSet", namespace: "d".into(), name: "rs".into(), uid: "rs1".into() }]
        );
    }

    #[test]
    fn foreground_waits_for_dependents_and_orphan_detaches_them() {
        let owner = deleting(obj("Deployment", "d", "web", "d1", &[]), &["foregroundDeletion"]);
        let a = plan(&[owner.clone(), obj("ReplicaSet", "d", "rs", "rs1", &["d1"])]);
        assert_eq!(
            a,
            vec![Action::Delete { kind: "ReplicaSet", namespace: "d".into(), name: "rs".into(), uid: "rs1".into() }]
        );
        let a = plan(&[owner.clone(), deleting(obj("ReplicaSet", "d", "rs", "rs1", &["d1"]), &["foregroundDeletion"])]);
        assert!(!a.iter().any(|x| matches!(x, Action::RemoveFinalizer { name, .. } if name == "web")));
        let a = plan(&[owner]);
        assert_eq!(
            a,
            vec![remove_finalizer(&deleting(obj("Deployment", "d", "web", "d1", &[]), &[]), "foregroundDeletion")]
        );

        let owner = deleting(obj("Deployment", "d", "web", "d1", &[]), &["orphan"]);
        let a = plan(&[owner.clone(), obj("ReplicaSet", "d", "rs", "rs1", &["d1"])]);
        assert_eq!(
            a,
            vec![Action::RemoveOwnerRef {
                kind: "ReplicaSet",
                namespace: "d".into(),
                name: "rs".into(),
                owner: "d1".into()
            }]
        );
        assert_eq!(plan(std::slice::from_ref(&owner)), vec![remove_finalizer(&owner, "orphan")]);
    }

    #[test]
    fn changes_mark_only_what_they_affect() {
        use capstan_raft::mvcc::{Event, EventKind};
        use capstan_raft::types::KeyValue;
        use capstan_raft::watch::Frame;
        let key = |kind: &str, name: &str| format!("/registry/{kind}/d/{name}").into_bytes();
        let put = |k: Vec<u8>, obj: serde_json::Value| Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: k.into(),
                value: StoredObject::from_object(&obj).unwrap().encode().into(),
                ..Default::default()
            },
            prev_kv: None,
        };
        let del = |k: Vec<u8>| Event {
            kind: EventKind::Delete,
            kv: KeyValue { key: k.into(), ..Default::default() },
            prev_kv: None,
        };
        let (rs, pod) = (key("apps/replicasets", "rs"), key("core/pods", "p"));
        let mut g = Graph::default();
        assert!(g.apply(&Frame::encode(2, &[
            put(rs.clone(), serde_json::json!({"metadata": {"name": "rs", "namespace": "d", "uid": "rs1"}})),
            put(pod.clone(), serde_json::json!({"metadata": {"name": "p", "namespace": "d", "uid": "p1", "ownerReferences": [{"uid": "rs1"}]}})),
            put(b"/capstan/not-an-object".to_vec(), serde_json::json!({})),
        ])));
        assert_eq!(g.len(), 2, "only registry objects are tracked");
        assert!(g.take_plan().is_empty(), "the owner lives");
        assert!(g.take_plan().is_empty() && g.dirty.is_empty(), "nothing marked, nothing planned");
        // A write that leaves the collector's fields alone (a binding)
        // marks only the object, not its owner, and keeps the indexes.
        let bound = serde_json::json!({"metadata": {"name": "p", "namespace": "d", "uid": "p1",
            "ownerReferences": [{"uid": "rs1"}]}, "spec": {"nodeName": "n1"}});
        assert!(g.apply(&Frame::encode(3, &[put(pod.clone(), bound)])));
        assert_eq!(g.dirty, BTreeSet::from([pod.clone()]));
        assert!(g.take_plan().is_empty());
        // The owner goes: its dependent is marked and collected.
        assert!(g.apply(&Frame::encode(4, &[del(rs)])));
        assert_eq!(
            g.take_plan(),
            vec![(pod, Action::Delete { kind: "Pod", namespace: "d".into(), name: "p".into(), uid: "p1".into() })]
        );
        assert!(
            !g.apply(&Frame { bytes: bytes::Bytes::from_static(b"garbage"), ..Frame::encode(5, &[]) }),
            "unreadable: resync"
        );
    }

    #[test]
    fn namespaces_are_emptied_then_released() {
        let ns = deleting(obj("Namespace", "", "team", "n1", &[]), &["kubernetes"]);
        let a =
            plan(&[ns.clone(), obj("ConfigMap", "team", "c", "c1", &[]), obj("ConfigMap", "other", "c", "c2", &[])]);
        assert_eq!(
            a,
            vec![Action::Delete { kind: "ConfigMap", namespace: "team".into(), name: "c".into(), uid: "c1".into() }]
        );
        assert_eq!(plan(std::slice::from_ref(&ns)), vec![remove_finalizer(&ns, "kubernetes")]);
    }
}
