//! Authorization: Kubernetes RBAC over Role/ClusterRole and their bindings.
//! Pure: the caller hands in the bindings and roles it read from the store.
//!
//! Members of `system:masters` are allowed everything before RBAC is
//! consulted, as in Kubernetes (so the admin cannot lock itself out).

use serde_json::Value;

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    pub fn is_master(&self) -> bool {
        self.groups.iter().any(|g| g == "system:masters")
    }
}

/// What is being asked: a resource verb or a non-resource URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attributes {
    Resource {
        verb: String,
        group: String,
        resource: String,
        subresource: Option<String>,
        namespace: Option<String>,
        name: Option<String>,
    },
    NonResource {
        verb: String,
        path: String,
    },
}

/// The RBAC objects relevant to one request.
pub struct Policy<'a> {
    pub cluster_role_bindings: &'a [Value],
    /// RoleBindings of the request's namespace.
    pub role_bindings: &'a [Value],
    /// Looks a role up: (kind "Role"/"ClusterRole", name) -> object.
    pub role: &'a dyn Fn(&str, &str) -> Option<Value>,
}

fn subject_matches(s: &Value, u: &User, binding_ns: Option<&str>) -> bool {
    let name = s["name"].as_str().unwrap_or_default();
    match s["kind"].as_str().unwrap_or_default() {
        "User" => name == u.name,
        "Group" => u.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let ns = s["namespace"].as_str().or(binding_ns).unwrap_or_default();
            u.name == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

fn has(list: &Value, want: &str) -> bool {
    list.as_array().into_iter().flatten().filter_map(Value::as_str).any(|x| x == "*" || x == want)
}

fn rule_allows(rule: &Value, a: &Attributes) -> bool {
    match a {
        Attributes::Resource { verb, group, resource, subresource, name, .. } => {
            let res = match subresource {
                Some(s) => format!("{resource}/{s}"),
                None => resource.clone(),
            };
            let res_ok = rule["resources"].as_array().into_iter().flatten().filter_map(Value::as_str).any(|r| {
                r == "*"
                    || r == res
                    || (subresource.is_some() && r == format!("*/{}", subresource.as_deref().unwrap_or_default()))
            });
            let names = rule["resourceNames"].as_array().filter(|n| !n.is_empty());
            let name_ok = match names {
                None => true,
                Some(ns) => name.as_deref().is_some_and(|n| ns.iter().any(|x| x == n)),
            };
            has(&rule["verbs"], verb) && has(&rule["apiGroups"], group) && res_ok && name_ok
        }
        Attributes::NonResource { verb, path } => {
            has(&rule["verbs"], verb)
                && rule["nonResourceURLs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .any(|u| u == "*" || u == path || u.strip_suffix('*').is_some_and(|p| path.starts_with(p)))
        }
    }
}

/// Rules a role grants, following `aggregationRule` is not supported: the
/// role's own rules only.
fn rules(role: &Value) -> impl Iterator<Item = &Value> {
    role["rules"].as_array().into_iter().flatten()
}

/// `Ok(())` if allowed, else the reason to put in a 403.
pub fn authorize(u: &User, a: &Attributes, p: &Policy) -> Result<(), String> {
    if u.is_master() {
        return Ok(());
    }
    for b in p.cluster_role_bindings {
        if b["subjects"].as_array().into_iter().flatten().any(|s| subject_matches(s, u, None)) {
            if let Some(role) = (p.role)("ClusterRole", b["roleRef"]["name"].as_str().unwrap_or_default()) {
                if rules(&role).any(|r| rule_allows(r, a)) {
                    return Ok(());
                }
            }
        }
    }
    if let Attributes::Resource { namespace: Some(_), .. } = a {
        for b in p.role_bindings {
            let ns = b["metadata"]["namespace"].as_str();
            if b["subjects"].as_array().into_iter().flatten().any(|s| subject_matches(s, u, ns)) {
                let kind = b["roleRef"]["kind"].as_str().unwrap_or_default();
                if let Some(role) = (p.role)(kind, b["roleRef"]["name"].as_str().unwrap_or_default()) {
                    if rules(&role).any(|r| rule_allows(r, a)) {
                        return Ok(());
                    }
                }
            }
        }
    }
    Err(denied_message(u, a))
}

/// Kubernetes' wording, which users grep for.
pub fn denied_message(u: &User, a: &Attributes) -> String {
    match a {
        Attributes::Resource { verb, group, resource, subresource, namespace, name } => {
            let res = match subresource {
                Some(s) => format!("{resource}/{s}"),
                None => resource.clone(),
            };
            let what = match name {
                Some(n) => format!("{res} \"{n}\""),
                None => res.clone(),
            };
            let scope = match namespace {
                Some(ns) => format!("in the namespace \"{ns}\""),
                None => "at the cluster scope".to_string(),
            };
            format!(
                "{what} is forbidden: User \"{}\" cannot {verb} resource \"{res}\" in API group \"{group}\" {scope}",
                u.name
            )
        }
        Attributes::NonResource { verb, path } => {
            format!("forbidden: User \"{}\" cannot {verb} path \"{path}\"", u.name)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs(verb: &str, resource: &str, ns: Option<&str>) -> Attributes {
        Attributes::Resource {
            verb: verb.into(),
            group: "".into(),
            resource: resource.into(),
            subresource: None,
            namespace: ns.map(str::to_string),
            name: None,
        }
    }

    #[test]
    fn namespaced_reader_reads_only_its_namespace() {
        let role = json!({"rules": [{"apiGroups": [""], "resources": ["pods", "configmaps"], "verbs": ["get", "list", "watch"]}]});
        let rb = vec![json!({"metadata": {"namespace": "team"}, "roleRef": {"kind": "Role", "name": "reader"},
            "subjects": [{"kind": "User", "name": "alice"}]})];
        let role_of = move |k: &str, n: &str| (k == "Role" && n == "reader").then(|| role.clone());
        let alice = User { name: "alice".into(), groups: vec!["system:authenticated".into()] };
        let p = Policy { cluster_role_bindings: &[], role_bindings: &rb, role: &role_of };
        assert!(authorize(&alice, &attrs("list", "pods", Some("team")), &p).is_ok());
        let e = authorize(&alice, &attrs("create", "pods", Some("team")), &p).unwrap_err();
        assert!(e.contains("cannot create resource \"pods\""), "{e}");
        assert!(authorize(&alice, &attrs("list", "pods", None), &p).is_err());
        assert!(authorize(&alice, &attrs("list", "secrets", Some("team")), &p).is_err());
        let bob = User { name: "bob".into(), groups: vec![] };
        assert!(authorize(&bob, &attrs("list", "pods", Some("team")), &p).is_err());
        let root = User { name: "admin".into(), groups: vec!["system:masters".into()] };
        assert!(authorize(&root, &attrs("delete", "nodes", None), &p).is_ok());
    }

    #[test]
    fn cluster_roles_subresources_names_and_urls() {
        let cr = json!({"rules": [
            {"apiGroups": ["apps"], "resources": ["deployments/scale"], "verbs": ["patch"], "resourceNames": ["web"]},
            {"nonResourceURLs": ["/healthz", "/api/*"], "verbs": ["get"]}]});
        let crb = vec![
            json!({"roleRef": {"kind": "ClusterRole", "name": "x"}, "subjects": [{"kind": "Group", "name": "ops"}]}),
        ];
        let role_of = move |k: &str, _: &str| (k == "ClusterRole").then(|| cr.clone());
        let u = User { name: "u".into(), groups: vec!["ops".into()] };
        let p = Policy { cluster_role_bindings: &crb, role_bindings: &[], role: &role_of };
        let scale = |name: &str| Attributes::Resource {
            verb: "patch".into(),
            group: "apps".into(),
            resource: "deployments".into(),
            subresource: Some("scale".into()),
            namespace: Some("d".into()),
            name: Some(name.into()),
        };
        assert!(authorize(&u, &scale("web"), &p).is_ok());
        assert!(authorize(&u, &scale("db"), &p).is_err());
        let url = |path: &str| Attributes::NonResource { verb: "get".into(), path: path.into() };
        assert!(authorize(&u, &url("/api/v1"), &p).is_ok());
        assert!(authorize(&u, &url("/metrics"), &p).is_err());
    }
}
