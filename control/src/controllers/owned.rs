//! What the controllers of owned objects share (ReplicaSets own pods,
//! Deployments own ReplicaSets, Jobs and DaemonSets own pods): finding an
//! object's owners, its dependents, and expectations — after writing, wait
//! until the dependents' informer has seen the write before planning again.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde_json::Value;

use super::events::{EventRecorder, EventType};
use super::informer::{Cached, Informer};
use crate::api::{internal, ApiServer};

/// Per owner key: the store revision of its controller's last write.
#[derive(Default)]
pub struct Expectations(Mutex<HashMap<String, i64>>);

/// Where a reconcile of an owner starts.
pub enum Start {
    /// The owner is gone or being deleted: nothing to do.
    Nothing,
    /// Our last writes are not visible yet: look again shortly.
    Wait,
    Go(Arc<Cached>),
}

impl Expectations {
    pub fn start(&self, owners: &Informer, dependents: &Informer, key: &str) -> Start {
        let Some(cached) = owners.get(key) else {
            self.0.lock().remove(key);
            return Start::Nothing;
        };
        if cached.deleting() {
            return Start::Nothing;
        }
        if self.0.lock().get(key).is_some_and(|rev| dependents.revision() < *rev) {
            return Start::Wait;
        }
        Start::Go(cached)
    }

    pub fn wrote(&self, key: &str, revision: i64) {
        if revision > 0 {
            self.0.lock().insert(key.to_string(), revision);
        }
    }
}

/// Keys of the objects in `owners` that own `obj`.
pub fn owner_keys(owners: &Informer, obj: &Cached) -> Vec<String> {
    if obj.archived().owners.is_empty() {
        return vec![];
    }
    owners
        .list_namespace(obj.namespace())
        .into_iter()
        .filter(|o| obj.owned_by(o.uid()))
        .map(|o| o.key.clone())
        .collect()
}

/// The objects of `dependents` that `owner` owns, decoded.
pub fn dependents_of(dependents: &Informer, owner: &Cached) -> Vec<Value> {
    let uid = owner.uid();
    dependents.list_namespace(owner.namespace()).iter().filter(|p| p.owned_by(uid)).map(|p| p.object()).collect()
}

/// Whom a controller's creates and deletes of dependents are told to:
/// the owner, with Kubernetes' PodControl events (`SuccessfulCreate`
/// "Created pod: x", `FailedCreate` "Error creating: …", `SuccessfulDelete`
/// "Deleted pod: x", `FailedDelete` "Error deleting: …").
pub type Told<'a> = Option<(&'a EventRecorder, &'a Value)>;

/// Creates `objs` through admission as `manager`; the last write's revision.
pub async fn create_all(
    api: &ApiServer,
    into: &Informer,
    objs: Vec<Value>,
    manager: &str,
    told: Told<'_>,
) -> Result<i64, String> {
    let mut last = 0;
    for o in objs {
        match internal::write(api, into.rt, None, o, manager).await {
            Ok(created) => {
                if let Some((rec, owner)) = told {
                    let name = created["metadata"]["name"].as_str().unwrap_or_default();
                    let kind = into.rt.kind.to_lowercase();
                    rec.event(owner, EventType::Normal, "SuccessfulCreate", format!("Created {kind}: {name}"));
                }
                last = last.max(crate::api::objects::revision_of(&created));
            }
            Err(e) => {
                if let Some((rec, owner)) = told {
                    rec.event(owner, EventType::Warning, "FailedCreate", format!("Error creating: {e}"));
                }
                return Err(e.to_string());
            }
        }
    }
    Ok(last)
}

/// Deletes the named objects of namespace `ns` that `from` still holds.
pub async fn delete_all(
    api: &ApiServer,
    from: &Informer,
    ns: &str,
    names: &[String],
    told: Told<'_>,
) -> Result<(), String> {
    for name in names {
        if let Some(c) = from.get(&format!("{ns}/{name}")) {
            match internal::delete(api, from.rt, &c.found()).await {
                Ok(()) => {
                    if let Some((rec, owner)) = told {
                        let kind = from.rt.kind.to_lowercase();
                        rec.event(owner, EventType::Normal, "SuccessfulDelete", format!("Deleted {kind}: {name}"));
                    }
                }
                Err(e) => {
                    // Already gone is no failure to tell (Kubernetes' PodControl).
                    if let (Some((rec, owner)), false) = (told, e.code == 404) {
                        rec.event(owner, EventType::Warning, "FailedDelete", format!("Error deleting: {e}"));
                    }
                    return Err(e.to_string());
                }
            }
        }
    }
    Ok(())
}
