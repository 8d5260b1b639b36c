//! The Kubernetes API server every master serves (HTTPS), so kubectl 1.32
//! and other Kubernetes clients work unchanged.
//!
//! Tour (one concern per file; the pure ones are tested without sockets):
//! - `request.rs`: method + path + query -> [`request::Route`] (Kubernetes' RequestInfo).
//! - `mod.rs` (here): TLS accept loop, authentication (client certificate,
//!   bearer token), authorization, dispatch, response encoding, metrics.
//! - `handlers.rs`: get/list/create/update/patch/delete and the subresources.
//! - `watch.rs`: `?watch=true` streams from the store's watch hub.
//! - `objects.rs`: objects in the replicated store (key layout, optimistic concurrency).
//! - `admission.rs`: system metadata, defaults, validation; `priority.rs`: pod
//!   priority from PriorityClasses.
//! - `hpa_v1.rs`: autoscaling/v1 HorizontalPodAutoscalers converted to and
//!   from the stored v2.
//! - `patch.rs`: JSON, merge and strategic merge patches.
//! - `project.rs`: decoding only the fields a Table row reads.
//! - `resource_metrics.rs`: `metrics.k8s.io` (NodeMetrics, PodMetrics) from
//!   the node agents' usage reports.
//! - `selector.rs`, `table.rs`, `discovery.rs`, `openapi.rs`, `rbac.rs`, `status.rs`.
//! - `bootstrap.rs`: built-in namespaces, RBAC roles and the default StorageClass created at start.
//! - `storage.rs`: PersistentVolume(Claim)s and StorageClasses at admission.
//! - `serviceaccount.rs`: TokenRequest, ServiceAccount token authentication and
//!   pod admission (account, API credentials volume); `jwt.rs`: the tokens (pure).
//!
//! Data path of a write: decode (JSON/YAML) -> typed normalization
//! (unknown fields per `fieldValidation`) -> admission -> `Objects` txn
//! through Raft -> response with the new resourceVersion (= store revision).

pub mod admission;
pub mod apiservers;
pub mod apply;
pub mod bootstrap;
pub mod discovery;
pub mod handlers;
pub mod hpa_v1;
pub mod internal;
pub mod jwt;
pub mod nodestream;
pub mod objects;
pub mod openapi;
pub mod patch;
pub mod portforward;
pub mod priority;
mod project;
pub mod rbac;
pub mod request;
pub mod resource_metrics;
pub mod selector;
pub mod serviceaccount;
pub mod spdy;
pub mod status;
pub mod storage;
pub mod table;
mod watch;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use bytes::Bytes;
use capstan_raft::watch::WatchHub;
use capstan_raft::StoreNode;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use serde_json::Value;
use tokio::net::TcpListener;

use self::objects::Objects;
use self::rbac::{Attributes, User};
use self::request::{Query, Route};
use self::status::ApiError;

/// `apiserver_*` metrics, with Kubernetes' names and labels.
#[derive(Clone)]
pub struct ApiMetrics {
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub inflight: IntGauge,
    pub watches: IntGaugeVec,
}

impl ApiMetrics {
    pub fn new(r: &Registry) -> prometheus::Result<ApiMetrics> {
        let m = ApiMetrics {
            requests: IntCounterVec::new(
                Opts::new("apiserver_request_total", "API requests by verb, resource and HTTP code."),
                &["verb", "resource", "code"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "apiserver_request_duration_seconds",
                    "API request latency (watches: until the stream ends).",
                )
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0]),
                &["verb", "resource"],
            )?,
            inflight: IntGauge::new("apiserver_current_inflight_requests", "API requests being served.")?,
            watches: IntGaugeVec::new(
                Opts::new("apiserver_longrunning_requests", "Open watches by resource."),
                &["verb", "resource"],
            )?,
        };
        r.register(Box::new(m.requests.clone()))?;
        r.register(Box::new(m.duration.clone()))?;
        r.register(Box::new(m.inflight.clone()))?;
        r.register(Box::new(m.watches.clone()))?;
        Ok(m)
    }
}

pub struct ApiServer {
    pub objects: Objects,
    pub hub: Arc<WatchHub>,
    pub node: Arc<StoreNode>,
    pub max_request_bytes: usize,
    /// host:port clients reach this master's API at (discovery).
    pub address: String,
    pub metrics: ApiMetrics,
    /// The cluster CA certificate (PEM), published to pods as `kube-root-ca.crt`.
    pub ca_pem: String,
    /// ServiceAccount token signing key, loaded on first use.
    pub sa_key: serviceaccount::KeyCache,
    /// Decoded RBAC bindings, reused until they change.
    pub bindings: BindingCache,
    /// This master's node gateway (set once it runs): log and exec streams.
    pub gateway: std::sync::OnceLock<Arc<crate::gateway::Gateway>>,
}

/// RBAC bindings of one kind (and namespace) decoded once and reused until
/// the set changes. The set is fingerprinted by a keys-only range (count
/// and highest mod revision), which any create, update or delete changes,
/// so authorizing a request no longer decodes every binding.
/// A binding list and the fingerprint (count, highest mod revision) it was read at.
type Bindings = (usize, i64, Arc<Vec<Value>>);

#[derive(Default)]
pub struct BindingCache(parking_lot::Mutex<std::collections::HashMap<(&'static str, String), Bindings>>);

/// Namespaces' RoleBinding lists kept at most (then the cache starts over).
const BINDING_CACHE_ENTRIES: usize = 10_000;

impl BindingCache {
    fn get(&self, objects: &Objects, kind: &'static str, ns: Option<&str>) -> Arc<Vec<Value>> {
        let Some(rt) = capstan_proto::k8s::registry::by_kind("rbac.authorization.k8s.io/v1", kind) else {
            return Arc::default();
        };
        let range = capstan_raft::types::KeyRange::prefix(objects::prefix(rt, ns));
        let keys = capstan_raft::types::RangeRequest { range, keys_only: true, ..Default::default() };
        let Ok((kvs, _, _)) = objects.range(&keys) else { return Arc::default() };
        let fingerprint = (kvs.len(), kvs.iter().map(|kv| kv.mod_revision).max().unwrap_or(0));
        let key = (kind, ns.unwrap_or_default().to_string());
        if let Some((n, rev, list)) = self.0.lock().get(&key) {
            if (*n, *rev) == fingerprint {
                return list.clone();
            }
        }
        // Read after the fingerprint: never older than it, so a stale list
        // is never kept under a newer fingerprint.
        let list = Arc::new(
            objects
                .list_local(rt, ns, None, None, &|kv| objects::decode_kv(kv).map(Some))
                .map(|p| p.items)
                .unwrap_or_default(),
        );
        let mut cache = self.0.lock();
        if cache.len() >= BINDING_CACHE_ENTRIES {
            cache.clear();
        }
        cache.insert(key, (fingerprint.0, fingerprint.1, list.clone()));
        list
    }
}

/// What a handler returns: status, body, warnings.
pub struct Reply {
    pub code: StatusCode,
    pub body: ReplyBody,
    pub warnings: Vec<String>,
}

pub enum ReplyBody {
    Json(Value),
    /// An object's JSON text, already encoded (a stored object with its
    /// resourceVersion spliced in: see `StoredObject::json_archived`).
    JsonText(Bytes),
    /// Already encoded, with its content type.
    Raw(Bytes, &'static str),
    Stream(Body, &'static str),
    /// 101 Switching Protocols to a WebSocket: (Sec-WebSocket-Accept, protocol).
    Switching(String, &'static str),
    /// 101 Switching Protocols to SPDY/3.1 speaking this stream protocol
    /// (X-Stream-Protocol-Version).
    SwitchingSpdy(&'static str),
}

impl Reply {
    pub fn ok(v: Value) -> Reply {
        Reply { code: StatusCode::OK, body: ReplyBody::Json(v), warnings: vec![] }
    }
    pub fn with_code(mut self, code: StatusCode) -> Reply {
        self.code = code;
        self
    }
}

/// The request as handlers see it.
pub struct Ctx {
    pub user: User,
    pub query: Query,
    pub accept: String,
    pub content_type: String,
    pub user_agent: String,
    pub body: Bytes,
    /// A WebSocket upgrade the client asked for (`kubectl exec`).
    pub upgrade: Option<nodestream::WsUpgrade>,
}

impl ApiServer {
    /// Accepts TLS connections until the listener fails; each connection is
    /// served (HTTP/1.1 or HTTP/2) on its own task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) -> anyhow::Result<()> {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let me = self.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let cert_user = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|der| capstan_raft::pki::cert_info(der).ok())
                    .filter(|ci| ci.client_auth)
                    .map(|ci| User { name: ci.common_name, groups: ci.organizations });
                let svc = hyper::service::service_fn(move |req| {
                    let me = me.clone();
                    let u = cert_user.clone();
                    async move { Ok::<_, Infallible>(me.handle(u, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), svc)
                    .await;
            });
        }
    }

    async fn handle(self: Arc<Self>, cert_user: Option<User>, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let started = Instant::now();
        self.metrics.inflight.inc();
        let (mut parts, body) = req.into_parts();
        let query = Query::parse(parts.uri.query());
        let route = request::route(&parts.method, parts.uri.path(), &query);
        let (verb, resource) = match &route {
            Route::Resource(r) => (r.verb, r.resource.clone()),
            _ => (method_label(&parts.method), String::new()),
        };
        let accept = header_str(&parts.headers, header::ACCEPT);
        let wants_yaml = accept.starts_with("application/yaml");
        // Kubernetes' Audit-ID: the client's if it sent a sane one, else a
        // fresh one; on every log line of the request and in the response.
        let audit_id = audit_id(&parts.headers);
        let span = tracing::info_span!("request", audit_id = %audit_id, verb, path = %parts.uri.path());
        let result = {
            use tracing::Instrument;
            self.clone().dispatch(cert_user, route, &mut parts, query, body, accept).instrument(span.clone()).await
        };
        let _entered = span.enter();
        let mut resp = match result {
            Ok(reply) => render(reply, wants_yaml),
            Err(e) => {
                tracing::debug!(code = e.code, reason = e.reason, "request failed: {}", e.message);
                render(
                    Reply {
                        code: StatusCode::from_u16(e.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                        body: ReplyBody::Json(e.to_status()),
                        warnings: vec![],
                    },
                    wants_yaml,
                )
            }
        };
        if let Ok(v) = HeaderValue::from_str(&audit_id) {
            resp.headers_mut().insert("audit-id", v);
        }
        let code = resp.status().as_u16();
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        if code >= 500 {
            tracing::warn!(code, latency_ms = ms, resource, "request");
        } else {
            tracing::debug!(code, latency_ms = ms, resource, "request");
        }
        self.metrics.inflight.dec();
        self.metrics.requests.with_label_values(&[verb, &resource, resp.status().as_str()]).inc();
        if verb != "watch" {
            self.metrics.duration.with_label_values(&[verb, &resource]).observe(started.elapsed().as_secs_f64());
        }
        resp
    }

    async fn dispatch(
        self: Arc<Self>,
        cert_user: Option<User>,
        route: Route,
        parts: &mut http::request::Parts,
        query: Query,
        body: hyper::body::Incoming,
        accept: String,
    ) -> Result<Reply, ApiError> {
        let user = match cert_user {
            Some(u) => Some(u),
            None => self.bearer_user(&parts.headers).await?,
        };
        match &route {
            Route::Version => return Ok(Reply::ok(discovery::version())),
            Route::Health(what) => {
                let checks = crate::health::readiness(&crate::health::input(&self.node));
                let (code, text) =
                    crate::health::render(&checks, query.get("verbose").is_some() || query.flag("verbose"), what);
                return Ok(Reply {
                    code,
                    body: ReplyBody::Raw(Bytes::from(text), "text/plain; charset=utf-8"),
                    warnings: vec![],
                });
            }
            _ => {}
        }
        let Some(mut user) = user else {
            return Err(ApiError::unauthorized());
        };
        user.groups.push("system:authenticated".into());
        let path = parts.uri.path().to_string();
        if !matches!(route, Route::Resource(_)) {
            self.authorize(&user, &Attributes::NonResource { verb: "get".into(), path: path.clone() })?;
        }
        match route {
            Route::Version | Route::Health(_) => unreachable!("answered above"),
            Route::DiscoveryRoot { core } => {
                if discovery::wants_aggregated(&accept) {
                    let v = serde_json::to_vec(&discovery::aggregated(core))
                        .map_err(|e| ApiError::internal(e.to_string()))?;
                    Ok(Reply {
                        code: StatusCode::OK,
                        body: ReplyBody::Raw(Bytes::from(v), discovery::AGGREGATED_V2),
                        warnings: vec![],
                    })
                } else if core {
                    Ok(Reply::ok(discovery::api_versions(&self.address)))
                } else {
                    Ok(Reply::ok(discovery::api_group_list()))
                }
            }
            Route::DiscoveryGroup(g) => discovery::group(&g).map(Reply::ok).ok_or_else(not_found_path),
            Route::DiscoveryGroupVersion { group, version } => {
                discovery::resource_list(&group, &version).map(Reply::ok).ok_or_else(not_found_path)
            }
            Route::OpenApiRoot => Ok(Reply {
                code: StatusCode::OK,
                body: ReplyBody::Raw(openapi::DOCS.root.clone(), "application/json"),
                warnings: vec![],
            }),
            Route::OpenApiGroupVersion { group, version } => {
                let key = if group.is_empty() { format!("api/{version}") } else { format!("apis/{group}/{version}") };
                match openapi::DOCS.by_path.get(&key) {
                    Some((doc, _)) => Ok(Reply {
                        code: StatusCode::OK,
                        body: ReplyBody::Raw(doc.clone(), "application/json"),
                        warnings: vec![],
                    }),
                    None => Err(not_found_path()),
                }
            }
            Route::NotFound => Err(not_found_path()),
            Route::Resource(r) => {
                let body = read_body(body, self.max_request_bytes).await?;
                let ctx = Ctx {
                    user,
                    query,
                    accept,
                    content_type: header_str(&parts.headers, header::CONTENT_TYPE),
                    user_agent: header_str(&parts.headers, header::USER_AGENT),
                    body,
                    upgrade: nodestream::WsUpgrade::take(parts),
                };
                handlers::resource(self, r, ctx).await
            }
        }
    }

    /// Bearer tokens issued by `capstan kubeconfig --token`: the store keeps
    /// only a SHA-256 of each (see [`token_key`]); and ServiceAccount tokens
    /// (JWTs, see `serviceaccount.rs`). A token that matches nothing is a
    /// 401, never an anonymous request.
    async fn bearer_user(&self, headers: &http::HeaderMap) -> Result<Option<User>, ApiError> {
        let Some(token) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
        else {
            return Ok(None);
        };
        if jwt::looks_like_jwt(token) {
            return serviceaccount::authenticate(self, token).await.map(Some);
        }
        let key = token_key(token);
        let lookup = || -> Result<Option<User>, ApiError> {
            let req = capstan_raft::types::RangeRequest {
                range: capstan_raft::types::KeyRange::key(key.clone()),
                ..Default::default()
            };
            let (kvs, _, _) = self.objects.range(&req)?;
            Ok(kvs
                .first()
                .and_then(|kv| serde_json::from_slice::<TokenRecord>(&kv.value).ok())
                .map(|t| User { name: t.user, groups: t.groups }))
        };
        if let Some(u) = lookup()? {
            return Ok(Some(u));
        }
        // Created through another master a moment ago? Catch up once.
        self.objects.sync().await?;
        lookup()?.map(Some).ok_or_else(ApiError::unauthorized)
    }

    /// RBAC over this master's applied state (bindings change rarely; a
    /// binding written a moment ago elsewhere may take a replication round
    /// to apply, as with Kubernetes' informer-fed authorizer).
    pub fn authorize(&self, user: &User, attrs: &Attributes) -> Result<(), ApiError> {
        if user.is_master() {
            return Ok(());
        }
        let crbs = self.bindings.get(&self.objects, "ClusterRoleBinding", None);
        let ns = match attrs {
            Attributes::Resource { namespace: Some(ns), .. } => Some(ns.as_str()),
            _ => None,
        };
        let rbs = match ns {
            Some(ns) => self.bindings.get(&self.objects, "RoleBinding", Some(ns)),
            None => Arc::default(),
        };
        let role = |kind: &str, name: &str| -> Option<Value> {
            let rt = capstan_proto::k8s::registry::by_kind("rbac.authorization.k8s.io/v1", kind)?;
            let ns = if kind == "Role" { ns } else { None };
            self.objects.get_local(rt, ns, name).ok().flatten().map(|f| f.object)
        };
        let policy = rbac::Policy { cluster_role_bindings: &crbs, role_bindings: &rbs, role: &role };
        rbac::authorize(user, attrs, &policy).map_err(ApiError::forbidden)
    }
}

/// Metric label for non-resource requests.
fn method_label(m: &http::Method) -> &'static str {
    match m.as_str() {
        "GET" => "get",
        "POST" => "post",
        "PUT" => "put",
        "PATCH" => "patch",
        "DELETE" => "delete",
        _ => "other",
    }
}

/// What the store keeps for an API bearer token.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct TokenRecord {
    pub user: String,
    pub groups: Vec<String>,
}

/// Store key of an API bearer token: its SHA-256, so a leaked store
/// backup does not leak usable tokens.
pub fn token_key(token: &str) -> Vec<u8> {
    use sha2::Digest;
    format!("/capstan/api-tokens/{}", hex::encode(sha2::Sha256::digest(token.as_bytes()))).into_bytes()
}

/// The request's Audit-ID: the client's (at most 128 printable ASCII
/// characters) or a new UUID.
fn audit_id(h: &http::HeaderMap) -> String {
    h.get("audit-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string)
}

fn not_found_path() -> ApiError {
    ApiError::new(404, "NotFound", "the server could not find the requested resource")
}

fn header_str(h: &http::HeaderMap, name: header::HeaderName) -> String {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string()
}

async fn read_body(body: hyper::body::Incoming, limit: usize) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(body, limit);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::too_large(limit)),
        Err(e) => Err(ApiError::bad_request(format!("reading the request body: {e}"))),
    }
}

fn render(reply: Reply, yaml: bool) -> Response<Body> {
    let (bytes, ct): (Body, &str) = match reply.body {
        ReplyBody::Json(v) if yaml => match serde_norway::to_string(&v) {
            Ok(s) => (Body::from(s), "application/yaml"),
            Err(_) => (Body::from(serde_json::to_vec(&v).unwrap_or_default()), "application/json"),
        },
        ReplyBody::Json(v) => (Body::from(serde_json::to_vec(&v).unwrap_or_default()), "application/json"),
        ReplyBody::JsonText(b) if yaml => match serde_json::from_slice::<Value>(&b) {
            Ok(v) => return render(Reply { body: ReplyBody::Json(v), ..reply }, true),
            Err(_) => (Body::from(b), "application/json"),
        },
        ReplyBody::JsonText(b) => (Body::from(b), "application/json"),
        ReplyBody::Raw(b, ct) => (Body::from(b), ct),
        ReplyBody::Stream(b, ct) => (b, ct),
        ReplyBody::Switching(accept, protocol) => {
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(protocol));
            if let Ok(v) = HeaderValue::from_str(&accept) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
            return resp;
        }
        ReplyBody::SwitchingSpdy(protocol) => {
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = resp.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert("x-stream-protocol-version", HeaderValue::from_static(protocol));
            return resp;
        }
    };
    let mut resp = Response::new(bytes);
    *resp.status_mut() = reply.code;
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
    for w in reply.warnings {
        let quoted = w.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(v) = HeaderValue::from_str(&format!("299 - \"{quoted}\"")) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_ids_are_the_clients_when_sane() {
        let mut h = http::HeaderMap::new();
        assert_eq!(audit_id(&h).len(), 36, "a fresh UUID");
        h.insert("audit-id", HeaderValue::from_static("abc-123"));
        assert_eq!(audit_id(&h), "abc-123");
        h.insert("audit-id", HeaderValue::from_str(&"x".repeat(129)).unwrap());
        assert_eq!(audit_id(&h).len(), 36, "too long: replaced");
        h.insert("audit-id", HeaderValue::from_static("two words"));
        assert_ne!(audit_id(&h), "two words");
    }
}
