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

use std::collections::HashSet;
use std::time::Duration;

use capstan_proto::k8s::registry::{self, ResourceType};
use capstan_proto::k8s::stored::StoredObject;
use serde_json::Value;

use crate::api::admission::{plan_delete, DeletePlan};
use crate::api::objects::Objects;
use crate::api::status::ApiError;

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

fn dependents<'a>(objs: &'a [Obj], uid: &'a str) -> impl Iterator<Item = &'a Obj> + 'a {
    objs.iter().filter(move |d| d.owners.iter().any(|o| o == uid))
}

/// The actions that move the world towards the rules above. Idempotent:
/// planning again before the actions are seen yields the same actions.
pub fn plan(objs: &[Obj]) -> Vec<Action> {
    let uids: HashSet<&str> = objs.iter().map(|o| o.uid.as_str()).collect();
    let mut out = Vec::new();
    for o in objs {
        if !o.owners.is_empty() && !o.deleting && o.owners.iter().all(|u| !uids.contains(u.as_str())) {
            out.push(delete(o));
        }
        if !o.deleting {
            continue;
        }
        if o.finalizers.iter().any(|f| f == "orphan") {
            let mut any = false;
            for d in dependents(objs, &o.uid) {
                any = true;
                out.push(Action::RemoveOwnerRef {
                    kind: d.kind,
                    namespace: d.namespace.clone(),
                    name: d.name.clone(),
                    owner: o.uid.clone(),
                });
            }
            if !any {
                out.push(remove_finalizer(o, "orphan"));
            }
        }
        if o.finalizers.iter().any(|f| f == "foregroundDeletion") {
            let mut any = false;
            for d in dependents(objs, &o.uid) {
                any = true;
                if !d.deleting {
                    out.push(delete(d));
                }
            }
            if !any {
                out.push(remove_finalizer(o, "foregroundDeletion"));
            }
        }
        if o.kind == "Namespace" && o.finalizers.iter().any(|f| f == "kubernetes") {
            let mut any = false;
            for c in objs.iter().filter(|c| c.kind != "Namespace" && c.namespace == o.name) {
                any = true;
                if !c.deleting {
                    out.push(delete(c));
                }
            }
            if !any {
                out.push(remove_finalizer(o, "kubernetes"));
            }
        }
    }
    out
}

/// Every object of every kind from this master's applied state. Only
/// objects being deleted are decoded (for their finalizers).
pub fn snapshot(objects: &Objects) -> Result<Vec<Obj>, ApiError> {
    let out = std::cell::RefCell::new(Vec::new());
    for rt in registry::all() {
        let page = objects.list_local(rt, None, None, None, &|kv| {
            let a = StoredObject::access(&kv.value).map_err(|e| ApiError::internal(e.to_string()))?;
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
                let v: Value = serde_json::from_slice(&a.json).map_err(|e| ApiError::internal(e.to_string()))?;
                let list = |x: &Value| -> Vec<String> {
                    x.as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_string).collect()
                };
                o.finalizers = list(&v["metadata"]["finalizers"]);
                o.finalizers.extend(list(&v["spec"]["finalizers"]));
            }
            out.borrow_mut().push(o);
            Ok(None)
        })?;
        debug_assert!(page.items.is_empty());
    }
    Ok(out.into_inner())
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

/// Whether a committed revision can give the collector work: a delete (an
/// owner may be gone), or an object being deleted or owned by others.
/// Read from the archived index fields (copied once to align them).
pub fn concerns_gc(frame: &capstan_raft::watch::Frame) -> bool {
    let Ok(wire) = frame.archived() else { return true };
    wire.events.iter().any(|ev| {
        if ev.delete {
            return true;
        }
        let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(ev.kv.value.len());
        buf.extend_from_slice(&ev.kv.value);
        StoredObject::access(&buf).is_ok_and(|a| a.deleting || !a.owners.is_empty())
    })
}

/// Runs passes while this master holds the controller lease: after every
/// committed change (coalesced) and at least every 5 s.
pub async fn run(objects: Objects, leading: tokio::sync::watch::Receiver<bool>) {
    use tokio::sync::broadcast::error::RecvError;
    let mut frames = objects.node.hub.frames();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            r = frames.recv() => match r {
                Err(RecvError::Closed) => return,
                // Frames the GC has nothing to do about (most writes, e.g.
                // lease renewals) cost no pass.
                Ok(f) if !concerns_gc(&f) => continue,
                Ok(_) | Err(RecvError::Lagged(_)) => {
                    // Coalesce a burst of changes into one pass.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    while frames.try_recv().is_ok() {}
                }
            },
            _ = tick.tick() => {}
        }
        if !*leading.borrow() {
            continue;
        }
        let actions = match snapshot(&objects) {
            Ok(objs) => {
                let a = plan(&objs);
                tracing::debug!(objects = objs.len(), actions = a.len(), "garbage collector pass");
                a
            }
            Err(e) => {
                tracing::warn!("garbage collector: reading objects: {e}");
                continue;
            }
        };
        for a in &actions {
            match execute(&objects, a).await {
                Ok(()) => tracing::debug!(?a, "garbage collector acted"),
                Err(e) if e.code == 404 || e.code == 409 => {}
                Err(e) => tracing::warn!(?a, "garbage collector: {e}"),
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
    fn only_deletes_and_owned_or_deleting_objects_trigger_a_pass() {
        use capstan_raft::mvcc::{Event, EventKind};
        use capstan_raft::types::KeyValue;
        use capstan_raft::watch::Frame;
        let put = |obj: serde_json::Value| Event {
            kind: EventKind::Put,
            kv: KeyValue {
                key: "/k".into(),
                value: StoredObject::from_object(&obj).unwrap().encode().into(),
                ..Default::default()
            },
            prev_kv: None,
        };
        let lease = serde_json::json!({"metadata": {"name": "l"}});
        assert!(!concerns_gc(&Frame::encode(2, &[put(lease)])));
        let owned = serde_json::json!({"metadata": {"name": "p", "ownerReferences": [{"uid": "rs1"}]}});
        assert!(concerns_gc(&Frame::encode(3, &[put(owned)])));
        let deleting = serde_json::json!({"metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}});
        assert!(concerns_gc(&Frame::encode(4, &[put(deleting)])));
        let del =
            Event { kind: EventKind::Delete, kv: KeyValue { key: "/k".into(), ..Default::default() }, prev_kv: None };
        assert!(concerns_gc(&Frame::encode(5, &[del])));
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
