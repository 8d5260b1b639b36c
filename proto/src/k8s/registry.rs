//! The resource types the API server serves: one [`ResourceType`] per kind,
//! built from the typed objects of `k8s-openapi` (which carry Kubernetes'
//! group, version, kind, plural and scope) plus what only the API server
//! knows (short names, categories, subresources).
//!
//! Pure data and decoding: no IO.

use std::any::TypeId;
use std::sync::LazyLock;

use k8s_openapi::api::{apps, autoscaling, batch, coordination, core, discovery, policy, rbac, scheduling, storage};
use k8s_openapi::{NamespaceResourceScope, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// One served kind.
pub struct ResourceType {
    pub group: &'static str,
    pub version: &'static str,
    pub kind: &'static str,
    pub list_kind: String,
    /// The URL segment, e.g. `deployments`.
    pub plural: &'static str,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    pub categories: &'static [&'static str],
    /// Subresources served under `<object>/<name>` (e.g. `status`, `scale`).
    pub subresources: &'static [&'static str],
    /// Decode into the typed object and encode it again: rejects values of
    /// the wrong type and drops fields Kubernetes does not define.
    pub normalize: fn(&Value) -> Result<Value, serde_json::Error>,
    /// [`ResourceType::normalize`] straight from JSON text, for a body with
    /// nothing to drop: `None` when the text does not decode or names a
    /// field the kind does not define (the caller then takes the `Value`
    /// path, which says which). Saves building and dropping the body as a
    /// `Value`.
    pub normalize_exact: fn(&[u8]) -> Option<Value>,
    /// The kind's JSON schema (components of `/openapi/v3`).
    pub schema: fn(&mut schemars::SchemaGenerator) -> schemars::Schema,
    /// The schema's component name, e.g. `io.k8s.api.apps.v1.Deployment`.
    pub schema_name: fn() -> std::borrow::Cow<'static, str>,
}

impl ResourceType {
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `group/version` path prefix: `/api/v1` or `/apis/<group>/<version>`.
    pub fn path_prefix(&self) -> String {
        if self.group.is_empty() {
            format!("/api/{}", self.version)
        } else {
            format!("/apis/{}/{}", self.group, self.version)
        }
    }

    /// Verbs on the collection/object, as discovery lists them.
    pub fn verbs(&self) -> &'static [&'static str] {
        &["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
    }
}

fn normalize<T: DeserializeOwned + Serialize>(v: &Value) -> Result<Value, serde_json::Error> {
    serde_json::to_value(T::deserialize(v)?)
}

fn normalize_exact<T: DeserializeOwned + Serialize>(json: &[u8]) -> Option<Value> {
    let mut dropped = false;
    let mut de = serde_json::Deserializer::from_slice(json);
    let typed: T = serde_ignored::deserialize(&mut de, |_| dropped = true).ok()?;
    de.end().ok()?;
    if dropped {
        return None;
    }
    serde_json::to_value(typed).ok()
}

fn entry<T>(
    short_names: &'static [&'static str],
    categories: &'static [&'static str],
    subresources: &'static [&'static str],
) -> ResourceType
where
    T: Resource + k8s_openapi::ListableResource + DeserializeOwned + Serialize + schemars::JsonSchema + 'static,
{
    ResourceType {
        group: T::GROUP,
        version: T::VERSION,
        kind: T::KIND,
        list_kind: T::LIST_KIND.to_string(),
        plural: T::URL_PATH_SEGMENT,
        singular: T::KIND.to_ascii_lowercase(),
        namespaced: TypeId::of::<T::Scope>() == TypeId::of::<NamespaceResourceScope>(),
        short_names,
        categories,
        subresources,
        normalize: normalize::<T>,
        normalize_exact: normalize_exact::<T>,
        schema: |g| g.subschema_for::<T>(),
        schema_name: T::schema_name,
    }
}

const ALL: &[&str] = &["all"];
const NONE: &[&str] = &[];
const STATUS: &[&str] = &["status"];
const SCALABLE: &[&str] = &["scale", "status"];

static TYPES: LazyLock<Vec<ResourceType>> = LazyLock::new(|| {
    vec![
        entry::<core::v1::Namespace>(&["ns"], NONE, &["finalize", "status"]),
        entry::<core::v1::Pod>(
            &["po"],
            ALL,
            &["attach", "binding", "ephemeralcontainers", "eviction", "exec", "log", "portforward", "status"],
        ),
        entry::<core::v1::Node>(&["no"], NONE, STATUS),
        entry::<core::v1::Service>(&["svc"], ALL, STATUS),
        entry::<core::v1::Endpoints>(&["ep"], NONE, NONE),
        entry::<core::v1::ConfigMap>(&["cm"], NONE, NONE),
        entry::<core::v1::Secret>(NONE, NONE, NONE),
        entry::<core::v1::Event>(&["ev"], NONE, NONE),
        entry::<core::v1::ServiceAccount>(&["sa"], NONE, &["token"]),
        entry::<core::v1::PersistentVolumeClaim>(&["pvc"], NONE, STATUS),
        entry::<core::v1::PersistentVolume>(&["pv"], NONE, STATUS),
        entry::<apps::v1::Deployment>(&["deploy"], ALL, SCALABLE),
        entry::<apps::v1::ReplicaSet>(&["rs"], ALL, SCALABLE),
        entry::<apps::v1::DaemonSet>(&["ds"], ALL, STATUS),
        entry::<apps::v1::StatefulSet>(&["sts"], ALL, SCALABLE),
        entry::<apps::v1::ControllerRevision>(NONE, NONE, NONE),
        entry::<batch::v1::Job>(NONE, ALL, STATUS),
        entry::<batch::v1::CronJob>(&["cj"], ALL, STATUS),
        entry::<coordination::v1::Lease>(NONE, NONE, NONE),
        entry::<policy::v1::PodDisruptionBudget>(&["pdb"], NONE, STATUS),
        entry::<discovery::v1::EndpointSlice>(NONE, NONE, NONE),
        entry::<rbac::v1::Role>(NONE, NONE, NONE),
        entry::<rbac::v1::ClusterRole>(NONE, NONE, NONE),
        entry::<rbac::v1::RoleBinding>(NONE, NONE, NONE),
        entry::<rbac::v1::ClusterRoleBinding>(NONE, NONE, NONE),
        entry::<autoscaling::v2::HorizontalPodAutoscaler>(&["hpa"], ALL, STATUS),
        entry::<scheduling::v1::PriorityClass>(&["pc"], NONE, NONE),
        entry::<storage::v1::StorageClass>(&["sc"], NONE, NONE),
    ]
});

/// Every served kind, in discovery order.
pub fn all() -> &'static [ResourceType] {
    &TYPES
}

/// The kind served at `group`/`version`/`plural`.
pub fn by_plural(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    all().iter().find(|t| t.group == group && t.version == version && t.plural == plural)
}

/// The kind named by `apiVersion` and `kind` in a body.
pub fn by_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    all().iter().find(|t| t.kind == kind && t.api_version() == api_version)
}

/// Served group/versions in discovery order (`""` is the core group).
pub fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for t in all() {
        if !out.contains(&(t.group, t.version)) {
            out.push((t.group, t.version));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_and_names_come_from_the_types() {
        let pods = by_plural("", "v1", "pods").unwrap();
        assert!(pods.namespaced);
        assert_eq!(pods.kind, "Pod");
        assert_eq!(pods.list_kind, "PodList");
        let nodes = by_plural("", "v1", "nodes").unwrap();
        assert!(!nodes.namespaced);
        let d = by_kind("apps/v1", "Deployment").unwrap();
        assert_eq!(d.plural, "deployments");
        assert_eq!(d.path_prefix(), "/apis/apps/v1");
        assert!(by_kind("v1", "Deployment").is_none());
        assert_eq!(group_versions()[0], ("", "v1"));
    }

    #[test]
    fn normalize_rejects_wrong_types_and_drops_undefined_fields() {
        let cm = by_kind("v1", "ConfigMap").unwrap();
        let v = serde_json::json!({"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"a"},"data":{"k":"v"},"bogus":1});
        let n = (cm.normalize)(&v).unwrap();
        assert_eq!(n["data"]["k"], "v");
        assert!(n.get("bogus").is_none());
        let bad = serde_json::json!({"metadata":{"name":"a"},"data":{"k":1}});
        assert!((cm.normalize)(&bad).is_err());
    }

    /// Straight from text, a body gives what the `Value` path gives, or
    /// nothing (left to that path) when anything would be dropped or does
    /// not decode.
    #[test]
    fn normalize_exact_is_the_value_path_or_nothing() {
        let pod = by_kind("v1", "Pod").unwrap();
        let full = r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","labels":{"a":"b"},
            "annotations":{"n":"\u00e9 \" q"},"generateName":"x-"},
            "spec":{"containers":[{"name":"c","image":"i","args":["1"],"resources":{"requests":{"cpu":"100m"}},
            "ports":[{"containerPort":80}],"env":[{"name":"E","value":"v"}]}],"priority":5,"nodeSelector":{"k":"v"},
            "affinity":{"podAntiAffinity":{"requiredDuringSchedulingIgnoredDuringExecution":[{"labelSelector":
            {"matchLabels":{"app":"x"}},"topologyKey":"h"}]}},"tolerations":[{"operator":"Exists"}],
            "terminationGracePeriodSeconds":30},"status":{"phase":"Pending"}}"#;
        let exact = [
            full,
            r#"{"metadata":{"name":"p"},"spec":{"containers":[]}}"#,
            r#"{"metadata":null}"#,
            // Duplicate keys: the last wins on both paths.
            r#"{"metadata":{"name":"a"},"metadata":{"name":"b"}}"#,
        ];
        for text in exact {
            let by_value = (pod.normalize)(&serde_json::from_str(text).unwrap()).unwrap();
            assert_eq!((pod.normalize_exact)(text.as_bytes()), Some(by_value), "{text}");
        }
        let left = [
            r#"{"metadata":{"name":"p"},"bogus":1}"#,
            r#"{"metadata":{"name":"p"},"bogus":null}"#,
            r#"{"spec":{"containers":[{"name":"c","imagePullPolicyy":"Always"}]}}"#,
            r#"{"apiVersion":"apps/v1","kind":"Pod"}"#,
            r#"{"apiVersion":"v1","kind":"Node"}"#,
            r#"{"metadata":{"name":"p"}} trailing"#,
            r#"{"metadata":{"name":1}}"#,
            r#"[1]"#,
            "not json",
        ];
        for text in left {
            assert_eq!((pod.normalize_exact)(text.as_bytes()), None, "{text}");
        }
    }
}
