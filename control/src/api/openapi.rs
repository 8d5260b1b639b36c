//! `/openapi/v3`: one OpenAPI 3 document per group/version, generated from
//! the typed objects' JSON schemas (k8s-openapi's schemars impls), plus the
//! extensions kubectl reads:
//! - `x-kubernetes-group-version-kind` on each kind's schema (`kubectl explain`)
//!   and on each operation;
//! - the `fieldValidation` query parameter on every PATCH, which tells
//!   kubectl to leave validation to the server;
//! - `x-kubernetes-patch-merge-key`/`-strategy`, so client-side apply
//!   computes strategic merge patches that merge lists by key.
//!
//! Documents are built once and served from memory.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use capstan_proto::k8s::registry::{self, ResourceType};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use super::patch::schema_merge_key;

pub struct Docs {
    /// "api/v1" / "apis/apps/v1" -> (document bytes, hash)
    pub by_path: BTreeMap<String, (bytes::Bytes, String)>,
    pub root: bytes::Bytes,
}

pub static DOCS: LazyLock<Docs> = LazyLock::new(build);

fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn gvk(rt: &ResourceType) -> Value {
    json!({"group": rt.group, "version": rt.version, "kind": rt.kind})
}

fn build() -> Docs {
    let mut by_path = BTreeMap::new();
    for (g, v) in registry::group_versions() {
        let doc = document(g, v);
        let bytes = serde_json::to_vec(&doc).unwrap_or_default();
        let hash = hex::encode(&Sha256::digest(&bytes)[..16]);
        by_path.insert(gv_path(g, v), (bytes::Bytes::from(bytes), hash));
    }
    let paths: Map<String, Value> = by_path
        .iter()
        .map(|(p, (_, h))| (p.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{p}?hash={h}")})))
        .collect();
    let root = serde_json::to_vec(&json!({"paths": paths})).unwrap_or_default();
    Docs { by_path, root: bytes::Bytes::from(root) }
}

fn document(group: &str, version: &str) -> Value {
    let mut gen = schemars::generate::SchemaSettings::openapi3().into_generator();
    let kinds: Vec<&ResourceType> =
        registry::all().iter().filter(|t| t.group == group && t.version == version).collect();
    let mut paths = Map::new();
    for rt in &kinds {
        let schema_ref = (rt.schema)(&mut gen);
        let schema_ref = serde_json::to_value(&schema_ref).unwrap_or_default();
        add_paths(&mut paths, rt, &schema_ref);
    }
    let mut schemas = gen.take_definitions(true);
    for rt in &kinds {
        if let Some(s) = schemas.get_mut(&*(rt.schema_name)()) {
            s["x-kubernetes-group-version-kind"] = json!([gvk(rt)]);
        }
    }
    for (name, schema) in schemas.iter_mut() {
        annotate_merge_keys(name, schema);
    }
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    })
}

fn add_paths(paths: &mut Map<String, Value>, rt: &ResourceType, schema_ref: &Value) {
    let base = rt.path_prefix();
    let collection = if rt.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}", rt.plural)
    } else {
        format!("{base}/{}", rt.plural)
    };
    let item = format!("{collection}/{{name}}");
    let ext = gvk(rt);
    let body = json!({"content": {"application/json": {"schema": schema_ref}}});
    let ok = json!({"200": {"description": "OK", "content": {"application/json": {"schema": schema_ref}}}});
    let q = |name: &str, desc: &str| json!({"name": name, "in": "query", "description": desc, "schema": {"type": "string", "uniqueItems": true}});
    let op = |id: String, action: &str, params: Vec<Value>, with_body: bool| {
        let mut o = json!({"operationId": id, "responses": ok, "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": ext, "parameters": params});
        if with_body {
            o["requestBody"] = body.clone();
        }
        o
    };
    let write_params = || {
        vec![
            q("dryRun", "When present, indicates that modifications should not be persisted."),
            q("fieldManager", "fieldManager is a name associated with the actor or entity that is making these changes."),
            q("fieldValidation", "fieldValidation instructs the server on how to handle objects in the request containing unknown or duplicate fields. Valid values are: Ignore, Warn, Strict."),
        ]
    };
    let mut patch_params = write_params();
    patch_params.push(json!({"name": "force", "in": "query", "schema": {"type": "boolean", "uniqueItems": true}}));
    let kind = rt.kind;
    paths.insert(
        collection,
        json!({
            "get": op(format!("list{kind}"), "list", vec![q("labelSelector", ""), q("fieldSelector", "")], false),
            "post": op(format!("create{kind}"), "post", write_params(), true),
        }),
    );
    let mut patch = op(format!("patch{kind}"), "patch", patch_params, false);
    patch["requestBody"] = json!({"content": {
        "application/apply-patch+yaml": {"schema": {"type": "object"}},
        "application/json-patch+json": {"schema": {"type": "object"}},
        "application/merge-patch+json": {"schema": {"type": "object"}},
        "application/strategic-merge-patch+json": {"schema": {"type": "object"}}}});
    paths.insert(
        item,
        json!({
            "get": op(format!("read{kind}"), "get", vec![], false),
            "put": op(format!("replace{kind}"), "put", write_params(), true),
            "patch": patch,
            "delete": op(format!("delete{kind}"), "delete", vec![q("propagationPolicy", ""), q("gracePeriodSeconds", "")], false),
        }),
    );
}

fn annotate_merge_keys(def: &str, schema: &mut Value) {
    let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for (field, p) in props.iter_mut() {
        if p.get("type") != Some(&json!("array")) {
            continue;
        }
        match schema_merge_key(def, field) {
            Some(Some(key)) => {
                p["x-kubernetes-patch-merge-key"] = json!(key);
                p["x-kubernetes-patch-strategy"] = json!("merge");
                p["x-kubernetes-list-type"] = json!("map");
                p["x-kubernetes-list-map-keys"] = json!([key]);
            }
            Some(None) => {
                p["x-kubernetes-patch-strategy"] = json!("merge");
                p["x-kubernetes-list-type"] = json!("set");
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents_carry_what_kubectl_looks_for() {
        let (apps, _) = &DOCS.by_path["apis/apps/v1"];
        let doc: Value = serde_json::from_slice(apps).unwrap();
        let d = &doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(d["x-kubernetes-group-version-kind"][0]["kind"], "Deployment");
        let patch = &doc["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "Deployment");
        assert!(patch["parameters"].as_array().unwrap().iter().any(|p| p["name"] == "fieldValidation"));
        let (core, _) = &DOCS.by_path["api/v1"];
        let core: Value = serde_json::from_slice(core).unwrap();
        let c = &core["components"]["schemas"]["io.k8s.api.core.v1.PodSpec"]["properties"]["containers"];
        assert_eq!(c["x-kubernetes-patch-merge-key"], "name");
        let ports = &core["components"]["schemas"]["io.k8s.api.core.v1.ServiceSpec"]["properties"]["ports"];
        assert_eq!(ports["x-kubernetes-patch-merge-key"], "port");
        let root: Value = serde_json::from_slice(&DOCS.root).unwrap();
        assert!(root["paths"]["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .unwrap()
            .starts_with("/openapi/v3/apis/apps/v1?hash="));
    }
}
