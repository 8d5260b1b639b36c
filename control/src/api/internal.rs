//! The in-process write path for controllers and the scheduler: the same
//! admission as an HTTP request (typed normalization, defaults, validation,
//! system metadata, managedFields), then an optimistic-concurrency write
//! through Raft — without an HTTP hop.

use capstan_proto::k8s::registry::ResourceType;
use serde_json::Value;

use super::objects::Found;
use super::status::ApiError;
use super::ApiServer;

fn normalized(rt: &ResourceType, obj: &Value) -> Result<Value, ApiError> {
    (rt.normalize)(obj)
        .map_err(|e| ApiError::internal(format!("{} built by a controller does not decode: {e}", rt.kind)))
}

/// Creates `obj` (`cur` = None) or replaces `cur` with it, as `manager`.
pub async fn write(
    api: &ApiServer,
    rt: &ResourceType,
    cur: Option<&Found>,
    obj: Value,
    manager: &str,
) -> Result<Value, ApiError> {
    match cur {
        None => {
            let new = admitted(api, rt, obj, manager).await?;
            api.objects.create(rt, new).await
        }
        Some(cur) => {
            let now = super::handlers::now();
            let obj = normalized(rt, &obj)?;
            let mut new = super::admission::prepare_update(rt, &cur.object, obj, None)?;
            super::apply::track_update(rt, Some(&cur.object), &mut new, manager, &now);
            api.objects.update(rt, new, cur.mod_revision).await
        }
    }
}

/// Creates `obj` as `manager`, as [`write`] does, for a writer that needs
/// only the new revision (the object is freed before the write waits).
pub async fn create(api: &ApiServer, rt: &ResourceType, obj: Value, manager: &str) -> Result<i64, ApiError> {
    let new = admitted(api, rt, obj, manager).await?;
    Ok(api.objects.create_stored(rt, new).await?.1)
}

/// `obj` as a create through the API would store it.
async fn admitted(api: &ApiServer, rt: &ResourceType, obj: Value, manager: &str) -> Result<Value, ApiError> {
    let now = super::handlers::now();
    let obj = normalized(rt, &obj)?;
    let ns = obj["metadata"]["namespace"].as_str().map(str::to_string);
    let mut new = super::admission::prepare_create(
        rt,
        ns.as_deref(),
        obj,
        &now,
        &uuid::Uuid::new_v4().to_string(),
        &super::handlers::random_suffix(),
    )?;
    super::apply::track_update(rt, None, &mut new, manager, &now);
    super::admission::admit_new(api, rt, new).await
}

/// Replaces `cur`'s status with `status` (the `/status` subresource).
pub async fn write_status(api: &ApiServer, rt: &ResourceType, cur: &Found, status: Value) -> Result<Value, ApiError> {
    let mut obj = cur.object.clone();
    obj["status"] = status;
    let obj = normalized(rt, &obj)?;
    let new = super::admission::prepare_update(rt, &cur.object, obj, Some("status"))?;
    api.objects.update(rt, new, cur.mod_revision).await
}

/// Deletes `cur` as a Background DELETE would.
pub async fn delete(api: &ApiServer, rt: &ResourceType, cur: &Found) -> Result<(), ApiError> {
    match super::admission::plan_delete(rt.kind, &cur.object, Some("Background"), None, &super::handlers::now()) {
        super::admission::DeletePlan::Now => api.objects.delete(rt, &cur.object, cur.mod_revision).await.map(|_| ()),
        super::admission::DeletePlan::Mark(m) => api.objects.update(rt, m, cur.mod_revision).await.map(|_| ()),
        super::admission::DeletePlan::Pending => Ok(()),
    }
}

/// Removes `finalizer` from `cur`; an object being deleted goes with its
/// last finalizer, as through the API.
pub async fn remove_finalizer(
    api: &ApiServer,
    rt: &ResourceType,
    cur: &Found,
    finalizer: &str,
) -> Result<(), ApiError> {
    let mut obj = cur.object.clone();
    let Some(list) = obj["metadata"]["finalizers"].as_array_mut() else { return Ok(()) };
    let before = list.len();
    list.retain(|f| f.as_str() != Some(finalizer));
    if list.len() == before {
        return Ok(());
    }
    let none_left = list.is_empty();
    if none_left && obj["metadata"]["deletionTimestamp"].is_string() {
        return api.objects.delete(rt, &obj, cur.mod_revision).await.map(|_| ());
    }
    let new = super::admission::prepare_update(rt, &cur.object, obj, None)?;
    api.objects.update(rt, new, cur.mod_revision).await.map(|_| ())
}
