//! `/livez`, `/readyz`, `/healthz` and `/metrics` of a master, served over
//! plain HTTP on `--metrics-listen` for Prometheus and probes.
//!
//! The checks are a pure function of a snapshot of the master's state
//! (`HealthInput`), so they are tested without sockets; the HTTP part only
//! renders them Kubernetes-style (`[+]name ok` lines with `?verbose`).
//!
//! Built with the `failpoints` feature (chaos harness only), the same
//! listener also serves `GET /debug/failpoints` (the armed crash points) and
//! `PUT /debug/failpoints/<name>` with a `fail` action string as the body
//! (e.g. `1*return`: the master aborts at the next hit of that point; see
//! `capstan_raft::failpoints`). Without the feature these routes do not
//! exist (404).

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
#[cfg(feature = "failpoints")]
use axum::routing::put;
use axum::Router;
use capstan_raft::storage::Storage;
use capstan_raft::StoreNode;
use prometheus::{Encoder, Registry, TextEncoder};

/// Local log entries not yet applied above which a master is not ready.
pub const MAX_APPLY_LAG: u64 = 10_000;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct HealthInput {
    pub has_leader: bool,
    pub last_log_index: u64,
    pub applied_index: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub name: &'static str,
    pub failure: Option<String>,
}

/// Readiness: this master can serve linearizable requests now.
pub fn readiness(h: &HealthInput) -> Vec<Check> {
    let lag = h.last_log_index.saturating_sub(h.applied_index);
    vec![
        Check { name: "raft-leader", failure: (!h.has_leader).then(|| "no leader known (no quorum?)".to_string()) },
        Check {
            name: "apply-lag",
            failure: (lag > MAX_APPLY_LAG)
                .then(|| format!("{lag} log entries not yet applied (limit {MAX_APPLY_LAG})")),
        },
    ]
}

/// Renders checks as Kubernetes does; 200 if all pass, else 503.
pub fn render(checks: &[Check], verbose: bool, what: &str) -> (StatusCode, String) {
    let ok = checks.iter().all(|c| c.failure.is_none());
    let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    if !verbose {
        return (status, if ok { "ok".into() } else { format!("{what} check failed") });
    }
    let mut body = String::new();
    for c in checks {
        match &c.failure {
            None => body.push_str(&format!("[+]{} ok\n", c.name)),
            Some(why) => body.push_str(&format!("[-]{} failed: {why}\n", c.name)),
        }
    }
    body.push_str(&format!("{what} check {}\n", if ok { "passed" } else { "failed" }));
    (status, body)
}

#[derive(Clone)]
struct Ctx {
    node: Arc<StoreNode>,
    storage: Arc<Storage>,
    registry: Registry,
}

pub fn input(node: &StoreNode) -> HealthInput {
    let m = node.raft.metrics().borrow().clone();
    HealthInput {
        has_leader: m.current_leader.is_some(),
        last_log_index: m.last_log_index.unwrap_or(0),
        applied_index: m.last_applied.map_or(0, |l| l.index),
    }
}

#[derive(serde::Deserialize)]
struct Verbose {
    verbose: Option<String>,
}

async fn livez(Query(q): Query<Verbose>) -> Response {
    let checks = [Check { name: "ping", failure: None }];
    render(&checks, q.verbose.is_some(), "livez").into_response()
}

async fn readyz(State(ctx): State<Ctx>, Query(q): Query<Verbose>) -> Response {
    render(&readiness(&input(&ctx.node)), q.verbose.is_some(), "readyz").into_response()
}

async fn healthz(State(ctx): State<Ctx>, Query(q): Query<Verbose>) -> Response {
    render(&readiness(&input(&ctx.node)), q.verbose.is_some(), "healthz").into_response()
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    ctx.node.refresh_metrics(ctx.storage.disk_size());
    let mut buf = Vec::new();
    let encoder = TextEncoder::new();
    if let Err(e) = encoder.encode(&ctx.registry.gather(), &mut buf) {
        return (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics: {e}")).into_response();
    }
    ([(header::CONTENT_TYPE, encoder.format_type().to_string())], buf).into_response()
}

/// The registry with every metric of this master registered.
pub fn registry(node: &StoreNode, storage: &Storage) -> anyhow::Result<Registry> {
    let r = Registry::new();
    node.metrics.register(&r)?;
    node.hub.metrics().register(&r)?;
    storage.metrics.register(&r)?;
    r.register(Box::new(capstan_raft::metrics::ProcessMetrics::for_self()))?;
    Ok(r)
}

pub fn router(node: Arc<StoreNode>, storage: Arc<Storage>, registry: Registry) -> Router {
    let r = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/healthz", get(healthz));
    #[cfg(feature = "failpoints")]
    let r = r.route("/debug/failpoints", get(list_failpoints)).route("/debug/failpoints/{name}", put(arm_failpoint));
    r.with_state(Ctx { node, storage, registry })
}

/// Largest accepted action string: real ones are a few dozen bytes.
#[cfg(any(test, feature = "failpoints"))]
pub const MAX_FAILPOINT_ACTION: usize = 1024;

/// Checks a `PUT /debug/failpoints/<name>` request before it reaches the
/// `fail` crate: a known point, and a non-empty, short, UTF-8 action string
/// (trimmed, so `curl -d` and `echo |` bodies both work). The action's own
/// syntax is checked by `fail` when it is armed.
#[cfg(any(test, feature = "failpoints"))]
pub fn parse_failpoint_request<'a>(name: &str, body: &'a [u8]) -> Result<&'a str, String> {
    if !capstan_raft::failpoints::is_known(name) {
        return Err(format!("unknown failpoint {name:?}; known: {}", capstan_raft::failpoints::NAMES.join(", ")));
    }
    if body.len() > MAX_FAILPOINT_ACTION {
        return Err(format!("action longer than {MAX_FAILPOINT_ACTION} bytes"));
    }
    let action = std::str::from_utf8(body).map_err(|_| "action is not UTF-8".to_string())?.trim();
    if action.is_empty() {
        return Err("empty action: send e.g. `1*return` (crash at the next hit) or `off`".into());
    }
    Ok(action)
}

#[cfg(feature = "failpoints")]
async fn list_failpoints() -> Response {
    let mut body = String::new();
    for (name, action) in capstan_raft::failpoints::armed() {
        body.push_str(&format!("{name}={action}\n"));
    }
    body.into_response()
}

#[cfg(feature = "failpoints")]
async fn arm_failpoint(axum::extract::Path(name): axum::extract::Path<String>, body: axum::body::Bytes) -> Response {
    let armed = parse_failpoint_request(&name, &body)
        .and_then(|action| capstan_raft::failpoints::arm(&name, action).map(|()| action));
    match armed {
        Ok(action) => {
            tracing::warn!(failpoint = %name, action, "failpoint armed");
            (StatusCode::OK, format!("{name}={action}\n")).into_response()
        }
        Err(e) => (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failpoint_requests_are_checked() {
        assert_eq!(parse_failpoint_request("raft::compaction", b" 1*return\n"), Ok("1*return"));
        assert_eq!(parse_failpoint_request("raft::snapshot_build", b"off"), Ok("off"));
        let unknown = parse_failpoint_request("raft::nope", b"return").unwrap_err();
        assert!(unknown.contains("unknown failpoint") && unknown.contains("raft::compaction"), "{unknown}");
        assert!(parse_failpoint_request("", b"return").is_err());
        assert!(parse_failpoint_request("raft::compaction", b"  \n").unwrap_err().contains("empty"));
        assert!(parse_failpoint_request("raft::compaction", b"\xff\xfe").unwrap_err().contains("UTF-8"));
        let long = vec![b'x'; MAX_FAILPOINT_ACTION + 1];
        assert!(parse_failpoint_request("raft::compaction", &long).is_err());
    }

    /// Arming as the endpoint does (the `fail` crate checks the action).
    #[cfg(feature = "failpoints")]
    #[test]
    fn failpoint_arming_rejects_bad_actions() {
        // Armed with a harmless action and disarmed again: this test
        // process must not abort.
        assert!(capstan_raft::failpoints::arm("raft::compaction", "1*sleep(1)").is_ok());
        assert!(capstan_raft::failpoints::armed().iter().any(|(n, a)| n == "raft::compaction" && a == "1*sleep(1)"));
        assert!(capstan_raft::failpoints::arm("raft::compaction", "explode").is_err());
        assert!(capstan_raft::failpoints::arm("raft::compaction", "sleep").is_err());
        assert!(capstan_raft::failpoints::arm("raft::compaction", "off").is_ok());
        assert!(capstan_raft::failpoints::arm("raft::nope", "off").is_err());
    }

    #[test]
    fn ready_only_with_a_leader_and_a_small_apply_lag() {
        let good = HealthInput { has_leader: true, last_log_index: 100, applied_index: 90 };
        assert!(readiness(&good).iter().all(|c| c.failure.is_none()));
        let (code, body) = render(&readiness(&good), true, "readyz");
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("[+]raft-leader ok") && body.ends_with("readyz check passed\n"));

        let no_leader = HealthInput { has_leader: false, ..good.clone() };
        let (code, body) = render(&readiness(&no_leader), true, "readyz");
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("[-]raft-leader failed"));

        let lagging = HealthInput { applied_index: 0, last_log_index: MAX_APPLY_LAG + 1, ..good };
        let (code, body) = render(&readiness(&lagging), false, "readyz");
        assert_eq!((code, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "readyz check failed"));
    }
}
