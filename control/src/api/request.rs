//! What a request asks for, decoded from its method, path and query —
//! Kubernetes' `RequestInfo`. Pure: no IO, tested without sockets.

use std::collections::HashMap;

/// A resource request (`/api/...` or `/apis/...` below a group/version).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResourceRequest {
    pub verb: &'static str,
    pub group: String,
    pub version: String,
    pub namespace: Option<String>,
    pub resource: String,
    pub name: Option<String>,
    pub subresource: Option<String>,
}

/// Every path the API server answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Version,
    Health(String),
    /// `/api` (core) or `/apis`.
    DiscoveryRoot {
        core: bool,
    },
    /// `/api/v1` or `/apis/<g>/<v>`: the legacy APIResourceList.
    DiscoveryGroupVersion {
        group: String,
        version: String,
    },
    /// `/apis/<g>`: the legacy APIGroup.
    DiscoveryGroup(String),
    OpenApiRoot,
    OpenApiGroupVersion {
        group: String,
        version: String,
    },
    Resource(ResourceRequest),
    NotFound,
}

/// Query parameters, first value wins (`all` keeps repeated ones, e.g.
/// exec's `command`).
#[derive(Debug, Clone, Default)]
pub struct Query(HashMap<String, String>, Vec<(String, String)>);

impl Query {
    pub fn parse(q: Option<&str>) -> Query {
        let mut m = HashMap::new();
        let mut all = Vec::new();
        for (k, v) in form_urlencoded::parse(q.unwrap_or_default().as_bytes()) {
            all.push((k.to_string(), v.to_string()));
            m.entry(k.into_owned()).or_insert_with(|| v.into_owned());
        }
        Query(m, all)
    }

    /// Every value of a repeated parameter, in order.
    pub fn all(&self, k: &str) -> Vec<String> {
        self.1.iter().filter(|(key, _)| key == k).map(|(_, v)| v.clone()).collect()
    }

    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str).filter(|s| !s.is_empty())
    }

    pub fn flag(&self, k: &str) -> bool {
        matches!(self.0.get(k).map(String::as_str), Some("true" | "1" | ""))
    }
}

pub fn route(method: &http::Method, path: &str, query: &Query) -> Route {
    let parts: Vec<&str> = path.trim_matches('/').split('/').filter(|p| !p.is_empty()).collect();
    match parts.as_slice() {
        ["version"] => Route::Version,
        [h @ ("healthz" | "livez" | "readyz"), ..] => Route::Health(h.to_string()),
        ["api"] => Route::DiscoveryRoot { core: true },
        ["apis"] => Route::DiscoveryRoot { core: false },
        ["api", v] => Route::DiscoveryGroupVersion { group: String::new(), version: v.to_string() },
        ["apis", g] => Route::DiscoveryGroup(g.to_string()),
        ["apis", g, v] => Route::DiscoveryGroupVersion { group: g.to_string(), version: v.to_string() },
        ["openapi", "v3"] => Route::OpenApiRoot,
        ["openapi", "v3", "api", v] => Route::OpenApiGroupVersion { group: String::new(), version: v.to_string() },
        ["openapi", "v3", "apis", g, v] => Route::OpenApiGroupVersion { group: g.to_string(), version: v.to_string() },
        ["api", v, rest @ ..] => resource(method, "", v, rest, query),
        ["apis", g, v, rest @ ..] => resource(method, g, v, rest, query),
        _ => Route::NotFound,
    }
}

fn resource(method: &http::Method, group: &str, version: &str, rest: &[&str], query: &Query) -> Route {
    let mut parts = rest;
    let mut namespace = None;
    if parts.first() == Some(&"namespaces") && parts.len() > 1 {
        namespace = Some(parts[1].to_string());
        // `namespaces/<ns>/status|finalize` are the namespace's own subresources.
        if parts.len() > 2 && !matches!(parts[2], "status" | "finalize") {
            parts = &parts[2..];
        }
    }
    let (resource, name, subresource) = match parts {
        [r] => (*r, None, None),
        [r, n] => (*r, Some(n.to_string()), None),
        [r, n, s] => (*r, Some(n.to_string()), Some(s.to_string())),
        _ => return Route::NotFound,
    };
    if resource == "namespaces" {
        namespace = None;
    }
    let verb = match (method.as_str(), &name) {
        ("GET", None) if query.flag("watch") => "watch",
        ("GET", None) => "list",
        ("GET", Some(_)) if query.flag("watch") => "watch",
        ("GET" | "HEAD", Some(_)) => "get",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", None) => "deletecollection",
        ("DELETE", Some(_)) => "delete",
        _ => return Route::NotFound,
    };
    Route::Resource(ResourceRequest {
        verb,
        group: group.to_string(),
        version: version.to_string(),
        namespace,
        resource: resource.to_string(),
        name,
        subresource,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    fn r(method: Method, path: &str) -> ResourceRequest {
        let q = Query::parse(path.split_once('?').map(|x| x.1));
        match route(&method, path.split('?').next().unwrap(), &q) {
            Route::Resource(r) => r,
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn resource_paths() {
        let x = r(Method::GET, "/api/v1/namespaces/default/pods");
        assert_eq!((x.verb, x.namespace.as_deref(), x.resource.as_str()), ("list", Some("default"), "pods"));
        let x = r(Method::GET, "/api/v1/namespaces/default/pods?watch=true");
        assert_eq!(x.verb, "watch");
        let x = r(Method::PATCH, "/apis/apps/v1/namespaces/a/deployments/web/scale");
        assert_eq!(
            (x.group.as_str(), x.name.as_deref(), x.subresource.as_deref()),
            ("apps", Some("web"), Some("scale"))
        );
        let x = r(Method::GET, "/api/v1/namespaces/kube-system");
        assert_eq!((x.resource.as_str(), x.name.as_deref(), x.namespace), ("namespaces", Some("kube-system"), None));
        let x = r(Method::PUT, "/api/v1/namespaces/x/finalize");
        assert_eq!((x.resource.as_str(), x.subresource.as_deref()), ("namespaces", Some("finalize")));
        let x = r(Method::DELETE, "/api/v1/nodes");
        assert_eq!((x.verb, x.namespace), ("deletecollection", None));
        let x = r(Method::GET, "/api/v1/pods");
        assert_eq!((x.verb, x.namespace), ("list", None));
        assert_eq!(route(&Method::GET, "/api/v1/a/b/c/d", &Query::default()), Route::NotFound);
    }

    #[test]
    fn discovery_paths() {
        let q = Query::default();
        assert_eq!(route(&Method::GET, "/apis", &q), Route::DiscoveryRoot { core: false });
        assert_eq!(
            route(&Method::GET, "/apis/apps/v1", &q),
            Route::DiscoveryGroupVersion { group: "apps".into(), version: "v1".into() }
        );
        assert_eq!(
            route(&Method::GET, "/openapi/v3/api/v1", &q),
            Route::OpenApiGroupVersion { group: "".into(), version: "v1".into() }
        );
        assert_eq!(route(&Method::GET, "/readyz", &q), Route::Health("readyz".into()));
    }
}
