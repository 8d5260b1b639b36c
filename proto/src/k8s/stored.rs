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

/// An object serialized without `metadata.resourceVersion`, as if it had
/// been removed from a copy (the copy and its drop cost more than the
/// serialization on every write).
struct WithoutRv<'a>(&'a Value);

impl serde::Serialize for WithoutRv<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let Value::Object(top) = self.0 else { return self.0.serialize(s) };
        let Some(Value::Object(meta)) = top.get("metadata") else { return self.0.serialize(s) };
        if !meta.contains_key("resourceVersion") {
            return self.0.serialize(s);
        }
        let mut map = s.serialize_map(Some(top.len()))?;
        for (k, v) in top {
            if k == "metadata" {
                map.serialize_key(k)?;
                map.serialize_value(&MetaWithoutRv(meta))?;
            } else {
                map.serialize_entry(k, v)?;
            }
        }
        map.end()
    }
}

struct MetaWithoutRv<'a>(&'a serde_json::Map<String, Value>);

impl serde::Serialize for MetaWithoutRv<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len() - 1))?;
        for (k, v) in self.0.iter().filter(|(k, _)| *k != "resourceVersion") {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
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
            json: serde_json::to_vec(&WithoutRv(obj))?,
        })
    }

    /// An owned copy of an archive (to change a field and store it again).
    pub fn from_archived(a: &ArchivedStoredObject) -> Result<StoredObject, StoredError> {
        rkyv::deserialize::<StoredObject, rancor::Error>(a).map_err(|e| StoredError::Archive(e.to_string()))
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

    /// [`StoredObject::decode_archived`] as JSON text, without building the
    /// object: the revision is written into the stored text's metadata
    /// (watch events and reads send stored objects as they are; parsing
    /// each into a `Value` to add one field and writing it out again was
    /// most of what a watch cost the server).
    pub fn json_archived(a: &ArchivedStoredObject, revision: i64) -> Result<Vec<u8>, StoredError> {
        #[derive(serde::Deserialize)]
        struct Top<'a> {
            #[serde(borrow, default)]
            metadata: Option<&'a serde_json::value::RawValue>,
        }
        let json = a.json.as_slice();
        // Stored metadata never holds a resourceVersion (removed on
        // write); should the text name one anywhere, the parse decides.
        let named = memchr::memmem::find(json, b"\"resourceVersion\"").is_some();
        // The metadata object's text is a slice of `json`: its offset is
        // where the field goes. Found by reading only the members before
        // it where those are scalars (stored keys are sorted: apiVersion,
        // kind, metadata), else by parsing the whole text.
        let at = metadata_start(json).filter(|_| !named).or_else(|| {
            serde_json::from_slice::<Top>(json)
                .ok()
                .and_then(|t| t.metadata)
                .map(|m| m.get())
                .filter(|m| m.starts_with('{') && !m.contains("\"resourceVersion\""))
                .map(|m| m.as_ptr() as usize - json.as_ptr() as usize + 1)
        });
        let Some(at) = at else {
            return Ok(serde_json::to_vec(&Self::decode_archived(a, revision)?)?);
        };
        let field = format!("\"resourceVersion\":\"{revision}\"");
        let empty = json[at..].iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'}');
        let mut out = Vec::with_capacity(json.len() + field.len() + 1);
        out.extend_from_slice(&json[..at]);
        out.extend_from_slice(field.as_bytes());
        if !empty {
            out.push(b',');
        }
        out.extend_from_slice(&json[at..]);
        Ok(out)
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

/// The offset just inside the `{` of `json`'s top-level `metadata`
/// object, read from the members before it only; None when one of those
/// is not a scalar or the text is not an object as far as it was read
/// (the caller then parses it whole).
fn metadata_start(json: &[u8]) -> Option<usize> {
    let ws = |i: &mut usize| {
        while json.get(*i).is_some_and(u8::is_ascii_whitespace) {
            *i += 1;
        }
    };
    let mut i = 0;
    ws(&mut i);
    if json.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        ws(&mut i);
        let key = i;
        i = string_end(json, i)?;
        let key = &json[key..i];
        ws(&mut i);
        if json.get(i) != Some(&b':') {
            return None;
        }
        i += 1;
        ws(&mut i);
        if key == b"\"metadata\"" {
            return (json.get(i) == Some(&b'{')).then_some(i + 1);
        }
        match json.get(i)? {
            b'"' => i = string_end(json, i)?,
            b'-' | b'0'..=b'9' | b't' | b'f' | b'n' => {
                while json.get(i).is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.')) {
                    i += 1;
                }
            }
            _ => return None,
        }
        ws(&mut i);
        if json.get(i) != Some(&b',') {
            return None;
        }
        i += 1;
    }
}

/// The offset just past the JSON string starting at `i`.
fn string_end(json: &[u8], mut i: usize) -> Option<usize> {
    if json.get(i) != Some(&b'"') {
        return None;
    }
    i += 1;
    loop {
        let j = i + memchr::memchr2(b'"', b'\\', json.get(i..)?)?;
        if json[j] == b'"' {
            return Some(j + 1);
        }
        i = j + 2;
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

    /// The spliced text is the decoded object, whatever the metadata.
    #[test]
    fn json_text_with_revision_is_the_decoded_object() {
        let objects = [
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"},
                "annotations": {"last": "{\"metadata\":{\"resourceVersion\":\"3\"}}"}},
                "aaa": {"metadata": {"nested": true}}, "spec": {"x": [1, {"metadata": {}}]}}),
            json!({"metadata": {}}),
            json!({"kind": "NoMetadata"}),
            json!({"metadata": "not an object"}),
            json!({"metadata": null}),
            json!({"metadata": {"name": "q\"uote\\", "resourceVersion": "5"}}),
            json!(["not", "an", "object"]),
            // Members before the metadata: scalars (read past), an
            // object (parsed), escapes in keys and values.
            json!({"aa": -1.5e3, "ab": true, "ac": null, "apiVersion": "v\"1\\", "k\"ey": "x", "metadata": {"name": "p"}}),
            json!({"data": {"metadata": {"name": "inner"}}, "metadata": {"name": "outer"}}),
            json!({"involvedObject": {"resourceVersion": "3"}, "metadata": {"name": "e"}}),
        ];
        for obj in objects {
            let bytes = StoredObject::from_object(&obj).unwrap().encode();
            let a = StoredObject::access(&bytes).unwrap();
            let text = StoredObject::json_archived(a, 42).unwrap();
            let back: Value = serde_json::from_slice(&text).unwrap();
            assert_eq!(back, StoredObject::decode_archived(a, 42).unwrap(), "{obj}");
        }
        // Spliced, not written again: the field leads the metadata.
        let bytes = StoredObject::from_object(&json!({"metadata": {"name": "p"}, "spec": {}})).unwrap().encode();
        let text = StoredObject::json_archived(StoredObject::access(&bytes).unwrap(), 7).unwrap();
        assert_eq!(text, br#"{"metadata":{"resourceVersion":"7","name":"p"},"spec":{}}"#);
        // A stored text that names a resourceVersion in its metadata
        // (never written, but read from disk) still yields one field.
        let mut odd = StoredObject::from_object(&json!({"metadata": {"name": "p"}})).unwrap();
        odd.json = br#"{"metadata":{"resourceVersion":"1","name":"p"}}"#.to_vec();
        let bytes = odd.encode();
        let a = StoredObject::access(&bytes).unwrap();
        let text = String::from_utf8(StoredObject::json_archived(a, 42).unwrap()).unwrap();
        assert_eq!(text.matches("resourceVersion").count(), 1, "{text}");
        assert!(text.contains(r#""resourceVersion":"42""#), "{text}");
    }

    /// The metadata is found by reading only what precedes it when that
    /// is scalars, and never read past the end of any text.
    #[test]
    fn metadata_is_found_past_scalar_members_only() {
        let at = |t: &str| metadata_start(t.as_bytes());
        let text = r#" { "apiVersion" : "v1" , "kind":"Pod","n":-1.5e+3,"metadata" : {"name":"p"},"spec":{}}"#;
        assert_eq!(at(text), Some(text.find(r#"{"name""#).unwrap() + 1));
        assert_eq!(at(r#"{"k\"ey":"a\\","metadata":{}}"#), Some(r#"{"k\"ey":"a\\","metadata":{"#.len()));
        for not in [
            r#"{"data":{"metadata":{}},"metadata":{}}"#,
            r#"{"metadata":null}"#,
            r#"{"a":[1],"metadata":{}}"#,
            "[]",
            "",
        ] {
            assert_eq!(at(not), None, "{not}");
        }
        for cut in 0..text.len() {
            let _ = at(&text[..cut]);
        }
        assert_eq!(at(&text[..text.find("metadata").unwrap() + 3]), None);
    }

    /// The stored JSON is the object's serialization with the
    /// resourceVersion removed from a copy, byte for byte.
    #[test]
    fn stored_json_is_the_object_without_its_resource_version() {
        let objects = [
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "resourceVersion": "7", "uid": "u",
                "labels": {"a": "b"}}, "spec": {"resourceVersion": "kept: not metadata"}, "status": {}}),
            json!({"metadata": {"resourceVersion": "1"}}),
            json!({"metadata": {"name": "no-rv"}, "zzz": [1, 2]}),
            json!({"metadata": "not an object"}),
            json!({"kind": "NoMetadata"}),
            json!(["not", "an", "object"]),
            // Members before the metadata: scalars (read past), an
            // object (parsed), escapes in keys and values.
            json!({"aa": -1.5e3, "ab": true, "ac": null, "apiVersion": "v\"1\\", "k\"ey": "x", "metadata": {"name": "p"}}),
            json!({"data": {"metadata": {"name": "inner"}}, "metadata": {"name": "outer"}}),
            json!({"involvedObject": {"resourceVersion": "3"}, "metadata": {"name": "e"}}),
        ];
        for obj in objects {
            let mut copy = obj.clone();
            if let Some(m) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            let stored = StoredObject::from_object(&obj).unwrap();
            assert_eq!(String::from_utf8(stored.json).unwrap(), serde_json::to_string(&copy).unwrap());
        }
    }
}
