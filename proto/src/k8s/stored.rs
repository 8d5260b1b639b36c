//! How an object sits in the store, in watch frames and on the node wire.
//!
//! A [`StoredObject`] is an rkyv archive. The fields that controllers,
//! selectors and the node gateway filter on (namespace, name, uid, labels,
//! `spec.nodeName`, owner uids) are archived fields, read in place without
//! decoding; the whole object follows as its canonical JSON (without
//! `metadata.resourceVersion`, which is the store revision and is filled in
//! on read). Keeping the body as JSON means a GET or LIST answers with the
//! stored bytes' content and the object model stays the one Kubernetes
//! defines, field for field.

use rkyv::rancor;
use serde_json::Value;

#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct StoredObject {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub labels: Vec<(String, String)>,
    /// `spec.nodeName` of pods; empty for everything else.
    pub node_name: String,
    /// `metadata.ownerReferences[*].uid`.
    pub owners: Vec<String>,
    /// `metadata.deletionTimestamp` is set: the object is being deleted.
    pub deleting: bool,
    /// The object as JSON, `metadata.resourceVersion` removed.
    pub json: Vec<u8>,
}

/// Errors decoding a stored object: the store holds something that is not
/// one (never expected; reported, not panicked on).
#[derive(Debug, thiserror::Error)]
pub enum StoredError {
    #[error("stored object archive is invalid: {0}")]
    Archive(String),
    #[error("stored object JSON is invalid: {0}")]
    Json(#[from] serde_json::Error),
}

impl StoredObject {
    /// Index fields are taken from the object itself, so they cannot disagree.
    pub fn from_object(obj: &Value) -> Result<StoredObject, serde_json::Error> {
        let meta = &obj["metadata"];
        let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let mut body = obj.clone();
        if let Some(m) = body.get_mut("metadata").and_then(Value::as_object_mut) {
            m.remove("resourceVersion");
        }
        Ok(StoredObject {
            namespace: s(&meta["namespace"]),
            name: s(&meta["name"]),
            uid: s(&meta["uid"]),
            labels: meta["labels"]
                .as_object()
                .map(|m| m.iter().map(|(k, v)| (k.clone(), s(v))).collect())
                .unwrap_or_default(),
            node_name: s(&obj["spec"]["nodeName"]),
            owners: meta["ownerReferences"]
                .as_array()
                .map(|a| a.iter().map(|o| s(&o["uid"])).collect())
                .unwrap_or_default(),
            deleting: meta["deletionTimestamp"].is_string(),
            json: serde_json::to_vec(&body)?,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing owned strings and vectors into a Vec cannot fail.
        rkyv::to_bytes::<rancor::Error>(self).map(|b| b.into_vec()).unwrap_or_default()
    }

    /// The archive, validated, read in place.
    pub fn access(bytes: &[u8]) -> Result<&ArchivedStoredObject, StoredError> {
        rkyv::access::<ArchivedStoredObject, rancor::Error>(bytes).map_err(|e| StoredError::Archive(e.to_string()))
    }

    /// The object with `metadata.resourceVersion` set to `revision`.
    pub fn decode(bytes: &[u8], revision: i64) -> Result<Value, StoredError> {
        Self::decode_archived(Self::access(bytes)?, revision)
    }

    /// [`StoredObject::decode`] of an archive already accessed.
    pub fn decode_archived(a: &ArchivedStoredObject, revision: i64) -> Result<Value, StoredError> {
        let mut v: Value = serde_json::from_slice(&a.json)?;
        if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("resourceVersion".into(), Value::String(revision.to_string()));
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trips_and_indexes_in_place() {
        let pod = json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"ns","uid":"u1",
            "resourceVersion":"7","labels":{"app":"web"},"ownerReferences":[{"uid":"rs1"}]},"spec":{"nodeName":"n1"}});
        let bytes = StoredObject::from_object(&pod).unwrap().encode();
        let a = StoredObject::access(&bytes).unwrap();
        assert_eq!(a.name.as_str(), "p");
        assert_eq!(a.node_name.as_str(), "n1");
        assert_eq!(a.labels[0].1.as_str(), "web");
        assert_eq!(a.owners[0].as_str(), "rs1");
        let back = StoredObject::decode(&bytes, 42).unwrap();
        assert_eq!(back["metadata"]["resourceVersion"], "42");
        assert_eq!(back["spec"], pod["spec"]);
        assert!(StoredObject::access(b"garbage").is_err());
    }
}
