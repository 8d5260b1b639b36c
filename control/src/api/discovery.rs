//! Discovery documents: aggregated `apidiscovery.k8s.io/v2` (what kubectl
//! 1.32 asks for first) and the legacy `APIVersions`/`APIGroupList`/
//! `APIResourceList` (what `kubectl drain` and older clients read), plus
//! `/version`. All built from the registry of served kinds.

use capstan_proto::k8s::registry::{self, ResourceType};
use serde_json::{json, Value};

/// Content type of an aggregated discovery answer.
pub const AGGREGATED_V2: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// True if the Accept header asks for aggregated discovery (v2).
pub fn wants_aggregated(accept: &str) -> bool {
    accept
        .split(',')
        .any(|a| a.contains("g=apidiscovery.k8s.io") && a.contains("v=v2") && a.contains("as=APIGroupDiscoveryList"))
}

pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "32",
        "gitVersion": "v1.32.0-capstan",
        "gitCommit": env!("CARGO_PKG_VERSION"),
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "n/a (Rust)",
        "compiler": "rustc",
        "platform": "linux/amd64"
    })
}

/// A served resource that is not stored: reviews answered on the spot,
/// and `metrics.k8s.io` built from the node agents' usage reports.
struct Virtual {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    verbs: &'static [&'static str],
}

const CREATE: &[&str] = &["create"];
const READ: &[&str] = &["get", "list"];

const VIRTUAL: &[Virtual] = &[
    Virtual {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectaccessreviews",
        kind: "SelfSubjectAccessReview",
        namespaced: false,
        verbs: CREATE,
    },
    Virtual {
        group: "authorization.k8s.io",
        version: "v1",
        plural: "selfsubjectrulesreviews",
        kind: "SelfSubjectRulesReview",
        namespaced: false,
        verbs: CREATE,
    },
    Virtual {
        group: "authentication.k8s.io",
        version: "v1",
        plural: "selfsubjectreviews",
        kind: "SelfSubjectReview",
        namespaced: false,
        verbs: CREATE,
    },
    Virtual {
        group: "metrics.k8s.io",
        version: "v1beta1",
        plural: "nodes",
        kind: "NodeMetrics",
        namespaced: false,
        verbs: READ,
    },
    Virtual {
        group: "metrics.k8s.io",
        version: "v1beta1",
        plural: "pods",
        kind: "PodMetrics",
        namespaced: true,
        verbs: READ,
    },
];

/// The kind of a served-but-not-stored resource (reviews, metrics).
pub fn is_virtual(group: &str, version: &str, plural: &str) -> Option<&'static str> {
    VIRTUAL.iter().find(|v| v.group == group && v.version == version && v.plural == plural).map(|v| v.kind)
}

/// (kind of the response, group, version, verbs) of a subresource.
fn subresource_shape(
    rt: &ResourceType,
    sub: &str,
) -> (&'static str, &'static str, &'static str, &'static [&'static str]) {
    match sub {
        "status" => (rt.kind, rt.group, rt.version, &["get", "patch", "update"]),
        "scale" => ("Scale", "autoscaling", "v1", &["get", "patch", "update"]),
        "log" => ("Pod", "", "v1", &["get"]),
        "exec" => ("PodExecOptions", "", "v1", &["create", "get"]),
        "attach" => ("PodAttachOptions", "", "v1", &["create", "get"]),
        "portforward" => ("PodPortForwardOptions", "", "v1", &["create", "get"]),
        "ephemeralcontainers" => ("Pod", "", "v1", &["get", "patch", "update"]),
        "eviction" => ("Eviction", "policy", "v1", &["create"]),
        "binding" => ("Binding", "", "v1", &["create"]),
        "finalize" => (rt.kind, rt.group, rt.version, &["update"]),
        "token" => ("TokenRequest", "authentication.k8s.io", "v1", &["create"]),
        _ => (rt.kind, rt.group, rt.version, &["get"]),
    }
}

fn gvs(core: bool) -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> =
        registry::group_versions().into_iter().filter(|(g, _)| g.is_empty() == core).collect();
    if !core {
        for v in VIRTUAL {
            if !out.contains(&(v.group, v.version)) {
                out.push((v.group, v.version));
            }
        }
    }
    out
}

/// `/api` or `/apis` as an aggregated APIGroupDiscoveryList.
pub fn aggregated(core: bool) -> Value {
    let mut groups: Vec<(&str, Vec<Value>)> = Vec::new();
    for (g, v) in gvs(core) {
        let mut resources: Vec<Value> = registry::all()
            .iter()
            .filter(|t| t.group == g && t.version == v)
            .map(|t| {
                let subs: Vec<Value> = t
                    .subresources
                    .iter()
                    .map(|s| {
                        let (kind, sg, sv, verbs) = subresource_shape(t, s);
                        json!({"subresource": s, "responseKind": {"group": sg, "version": sv, "kind": kind}, "verbs": verbs})
                    })
                    .collect();
                let mut r = json!({
                    "resource": t.plural,
                    "responseKind": {"group": t.group, "version": t.version, "kind": t.kind},
                    "scope": if t.namespaced { "Namespaced" } else { "Cluster" },
                    "singularResource": t.singular,
                    "verbs": t.verbs(),
                });
                if !t.short_names.is_empty() {
                    r["shortNames"] = json!(t.short_names);
                }
                if !t.categories.is_empty() {
                    r["categories"] = json!(t.categories);
                }
                if !subs.is_empty() {
                    r["subresources"] = json!(subs);
                }
                r
            })
            .collect();
        for vr in VIRTUAL.iter().filter(|x| x.group == g && x.version == v) {
            let scope = if vr.namespaced { "Namespaced" } else { "Cluster" };
            let singular = if vr.group == "metrics.k8s.io" {
                vr.plural.trim_end_matches('s').to_string()
            } else {
                vr.kind.to_lowercase()
            };
            resources.push(json!({"resource": vr.plural, "responseKind": {"group": g, "version": v, "kind": vr.kind},
                "scope": scope, "singularResource": singular, "verbs": vr.verbs}));
        }
        let version = json!({"version": v, "resources": resources, "freshness": "Current"});
        match groups.iter_mut().find(|(name, _)| *name == g) {
            Some((_, vs)) => vs.push(version),
            None => groups.push((g, vec![version])),
        }
    }
    let items: Vec<Value> =
        groups.into_iter().map(|(g, versions)| json!({"metadata": {"name": g}, "versions": versions})).collect();
    json!({"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2", "metadata": {}, "items": items})
}

/// Legacy `/api`.
pub fn api_versions(server_address: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]})
}

fn api_group(g: &str) -> Value {
    let versions: Vec<Value> = gvs(false)
        .into_iter()
        .filter(|(x, _)| *x == g)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({"name": g, "versions": versions, "preferredVersion": versions.first().cloned().unwrap_or(Value::Null)})
}

/// Legacy `/apis`.
pub fn api_group_list() -> Value {
    let mut names: Vec<&str> = Vec::new();
    for (g, _) in gvs(false) {
        if !names.contains(&g) {
            names.push(g);
        }
    }
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": names.into_iter().map(api_group).collect::<Vec<_>>()})
}

/// Legacy `/apis/<g>`.
pub fn group(g: &str) -> Option<Value> {
    if !gvs(false).iter().any(|(x, _)| *x == g) {
        return None;
    }
    let mut v = api_group(g);
    v["kind"] = json!("APIGroup");
    v["apiVersion"] = json!("v1");
    Some(v)
}

/// Legacy `/api/v1` or `/apis/<g>/<v>`: an APIResourceList.
pub fn resource_list(g: &str, v: &str) -> Option<Value> {
    if !gvs(g.is_empty()).iter().any(|(x, y)| *x == g && *y == v) {
        return None;
    }
    let mut resources = Vec::new();
    for t in registry::all().iter().filter(|t| t.group == g && t.version == v) {
        let mut r = json!({"name": t.plural, "singularName": t.singular, "namespaced": t.namespaced, "kind": t.kind,
            "verbs": t.verbs()});
        if !t.short_names.is_empty() {
            r["shortNames"] = json!(t.short_names);
        }
        if !t.categories.is_empty() {
            r["categories"] = json!(t.categories);
        }
        resources.push(r);
        for s in t.subresources {
            let (kind, sg, sv, verbs) = subresource_shape(t, s);
            let mut r = json!({"name": format!("{}/{s}", t.plural), "singularName": "", "namespaced": t.namespaced,
                "kind": kind, "verbs": verbs});
            if sg != t.group || sv != t.version {
                r["group"] = json!(sg);
                r["version"] = json!(sv);
            }
            resources.push(r);
        }
    }
    for vr in VIRTUAL.iter().filter(|x| x.group == g && x.version == v) {
        let singular = if vr.group == "metrics.k8s.io" { "" } else { &vr.kind.to_lowercase() };
        resources.push(json!({"name": vr.plural, "singularName": singular, "namespaced": vr.namespaced,
            "kind": vr.kind, "verbs": vr.verbs}));
    }
    let gv = if g.is_empty() { v.to_string() } else { format!("{g}/{v}") };
    Some(json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregated_lists_core_and_groups_separately() {
        let core = aggregated(true);
        assert_eq!(core["items"].as_array().unwrap().len(), 1);
        let pods = core["items"][0]["versions"][0]["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resource"] == "pods")
            .unwrap()
            .clone();
        assert_eq!(pods["scope"], "Namespaced");
        assert_eq!(pods["shortNames"][0], "po");
        assert!(pods["subresources"].as_array().unwrap().iter().any(|s| s["subresource"] == "log"));
        let apis = aggregated(false);
        let names: Vec<&str> =
            apis["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap()).collect();
        assert!(names.contains(&"apps") && names.contains(&"authorization.k8s.io") && !names.contains(&""));
        assert!(wants_aggregated(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json"
        ));
        assert!(!wants_aggregated("application/json"));
        let metrics =
            apis["items"].as_array().unwrap().iter().find(|i| i["metadata"]["name"] == "metrics.k8s.io").unwrap();
        assert_eq!(metrics["versions"][0]["version"], "v1beta1");
        let res = metrics["versions"][0]["resources"].as_array().unwrap();
        assert!(res.iter().any(|r| r["resource"] == "pods"
            && r["scope"] == "Namespaced"
            && r["responseKind"]["kind"] == "PodMetrics"));
        assert!(res
            .iter()
            .any(|r| r["resource"] == "nodes" && r["scope"] == "Cluster" && r["verbs"] == json!(["get", "list"])));
    }

    #[test]
    fn legacy_documents() {
        let v1 = resource_list("", "v1").unwrap();
        assert!(v1["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "pods/eviction" && r["group"] == "policy"));
        assert!(resource_list("apps", "v1").is_some());
        assert!(resource_list("nope", "v1").is_none());
        assert!(group("apps").is_some());
        assert!(api_group_list()["groups"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["name"] == "rbac.authorization.k8s.io"));
    }
}
