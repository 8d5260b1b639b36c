//! The agent's own `/metrics` (Kubernetes' kubelet names where one exists)
//! and `/healthz`, `/livez`, `/readyz` with per-check detail (`?verbose`).
//!
//! [`Instrumented`] wraps any runtime and times every operation
//! (`kubelet_runtime_operations_duration_seconds{operation_type}`), so the
//! pod workers stay unaware of metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use crate::runtime::*;

#[derive(Clone)]
pub struct AgentMetrics {
    pub registry: Registry,
    pub running_pods: IntGauge,
    pub running_containers: IntGauge,
    pub pod_start: Histogram,
    pub started_containers: IntCounter,
    pub started_container_errors: IntCounterVec,
    pub restarts: IntCounter,
    pub runtime_ops: HistogramVec,
    pub runtime_errors: IntCounterVec,
    pub image_pulls: HistogramVec,
    pub master_connected: IntGauge,
    pub master_rtt: prometheus::Gauge,
    /// Cluster DNS replies by response code and by who answered
    /// (`cluster`: this node's zone; `upstream`: the node's resolvers).
    pub dns_responses: IntCounterVec,
}

impl AgentMetrics {
    pub fn new() -> anyhow::Result<AgentMetrics> {
        let registry = Registry::new();
        let buckets = vec![0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0];
        let m = AgentMetrics {
            running_pods: IntGauge::new("kubelet_running_pods", "Pods with a running sandbox on this node")?,
            running_containers: IntGauge::new("kubelet_running_containers", "Containers running on this node")?,
            pod_start: Histogram::with_opts(
                HistogramOpts::new(
                    "kubelet_pod_start_duration_seconds",
                    "From the agent first seeing a pod to all its containers running",
                )
                .buckets(buckets.clone()),
            )?,
            started_containers: IntCounter::new("kubelet_started_containers_total", "Containers started")?,
            started_container_errors: IntCounterVec::new(
                Opts::new("kubelet_started_containers_errors_total", "Container starts that failed, by reason"),
                &["code"],
            )?,
            restarts: IntCounter::new("capstan_node_container_restarts_total", "Containers restarted (attempt > 0)")?,
            runtime_ops: HistogramVec::new(
                HistogramOpts::new(
                    "kubelet_runtime_operations_duration_seconds",
                    "Container runtime (containerd) operations by type",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
                &["operation_type"],
            )?,
            runtime_errors: IntCounterVec::new(
                Opts::new("kubelet_runtime_operations_errors_total", "Failed runtime operations by type"),
                &["operation_type"],
            )?,
            image_pulls: HistogramVec::new(
                HistogramOpts::new("kubelet_image_pull_duration_seconds", "Making an image present, by result")
                    .buckets(buckets),
                &["result"],
            )?,
            master_connected: IntGauge::new("capstan_node_master_connected", "1 while connected to a master")?,
            master_rtt: prometheus::Gauge::new(
                "capstan_node_master_rtt_seconds",
                "QUIC round-trip time to the master",
            )?,
            dns_responses: IntCounterVec::new(
                Opts::new("capstan_node_dns_responses_total", "Cluster DNS replies sent to pods, by rcode and source"),
                &["rcode", "source"],
            )?,
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.running_pods.clone()))?;
        r.register(Box::new(m.running_containers.clone()))?;
        r.register(Box::new(m.pod_start.clone()))?;
        r.register(Box::new(m.started_containers.clone()))?;
        r.register(Box::new(m.started_container_errors.clone()))?;
        r.register(Box::new(m.restarts.clone()))?;
        r.register(Box::new(m.runtime_ops.clone()))?;
        r.register(Box::new(m.runtime_errors.clone()))?;
        r.register(Box::new(m.image_pulls.clone()))?;
        r.register(Box::new(m.master_connected.clone()))?;
        r.register(Box::new(m.master_rtt.clone()))?;
        r.register(Box::new(m.dns_responses.clone()))?;
        r.register(Box::new(capstan_raft::metrics::ProcessMetrics::for_self()))?;
        // Every operation's series exists from the start (at zero), so rates
        // and alerts over them are defined before the first error.
        for op in OPERATIONS {
            m.runtime_ops.with_label_values(&[op]);
            m.runtime_errors.with_label_values(&[op]);
        }
        Ok(m)
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        use prometheus::Encoder;
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// The runtime operations timed (`operation_type`), as the kubelet names them.
pub const OPERATIONS: [&str; 10] = [
    "pull_image",
    "run_podsandbox",
    "remove_podsandbox",
    "list_podsandbox",
    "start_container",
    "stop_container",
    "remove_container",
    "list_containers",
    "exec",
    "container_stats",
];

/// A runtime whose every operation is timed and counted.
pub struct Instrumented<R> {
    pub inner: Arc<R>,
    metrics: AgentMetrics,
}

impl<R> Instrumented<R> {
    pub fn new(inner: Arc<R>, metrics: AgentMetrics) -> Instrumented<R> {
        Instrumented { inner, metrics }
    }

    async fn timed<T>(
        &self,
        op: &str,
        f: impl std::future::Future<Output = Result<T, RuntimeError>>,
    ) -> Result<T, RuntimeError> {
        let start = Instant::now();
        let r = f.await;
        self.metrics.runtime_ops.with_label_values(&[op]).observe(start.elapsed().as_secs_f64());
        if r.is_err() {
            self.metrics.runtime_errors.with_label_values(&[op]).inc();
        }
        r
    }
}

impl<R: Runtime> Runtime for Instrumented<R> {
    fn set_pod_cidr(&self, cidr: &str) {
        self.inner.set_pod_cidr(cidr)
    }

    fn materializes_volumes(&self) -> bool {
        self.inner.materializes_volumes()
    }

    fn has_pod_network(&self) -> bool {
        self.inner.has_pod_network()
    }

    async fn ensure_image(
        &self,
        image: &str,
        policy: PullPolicy,
        auth: &[RegistryAuth],
    ) -> Result<(String, String), RuntimeError> {
        let start = Instant::now();
        let r = self.timed("pull_image", self.inner.ensure_image(image, policy, auth)).await;
        let result = if r.is_ok() { "success" } else { "error" };
        self.metrics.image_pulls.with_label_values(&[result]).observe(start.elapsed().as_secs_f64());
        r
    }

    async fn run_sandbox(&self, cfg: &SandboxConfig) -> Result<Sandbox, RuntimeError> {
        self.timed("run_podsandbox", self.inner.run_sandbox(cfg)).await
    }

    async fn remove_sandbox(&self, sandbox_id: &str) -> Result<(), RuntimeError> {
        self.timed("remove_podsandbox", self.inner.remove_sandbox(sandbox_id)).await
    }

    async fn list_sandboxes(&self) -> Result<Vec<Sandbox>, RuntimeError> {
        let r = self.timed("list_podsandbox", self.inner.list_sandboxes()).await;
        if let Ok(s) = &r {
            self.metrics.running_pods.set(s.len() as i64);
        }
        r
    }

    async fn start_container(&self, sandbox: &Sandbox, cfg: &ContainerConfig) -> Result<String, RuntimeError> {
        let r = self.timed("start_container", self.inner.start_container(sandbox, cfg)).await;
        match &r {
            Ok(_) => {
                self.metrics.started_containers.inc();
                if cfg.attempt > 0 {
                    self.metrics.restarts.inc();
                }
            }
            Err(e) => {
                let code = match e {
                    RuntimeError::Image { .. } => "ErrImage",
                    RuntimeError::Container(_) => "RunContainerError",
                    RuntimeError::Network(_) => "NetworkError",
                    RuntimeError::NotFound(_) => "NotFound",
                    RuntimeError::Other(_) => "Other",
                };
                self.metrics.started_container_errors.with_label_values(&[code]).inc();
            }
        }
        r
    }

    async fn stop_container(&self, id: &str, grace: Duration) -> Result<(), RuntimeError> {
        self.timed("stop_container", self.inner.stop_container(id, grace)).await
    }

    async fn remove_container(&self, id: &str) -> Result<(), RuntimeError> {
        self.timed("remove_container", self.inner.remove_container(id)).await
    }

    async fn list_containers(&self) -> Result<Vec<ContainerStatus>, RuntimeError> {
        let r = self.timed("list_containers", self.inner.list_containers()).await;
        if let Ok(cs) = &r {
            let running = cs.iter().filter(|c| matches!(c.state, ContainerState::Running { .. })).count();
            self.metrics.running_containers.set(running as i64);
        }
        r
    }

    async fn exec(&self, id: &str, cmd: &[String], tty: bool, io: ExecIo) -> Result<ExitCode, RuntimeError> {
        self.timed("exec", self.inner.exec(id, cmd, tty, io)).await
    }

    async fn usage(&self, id: &str) -> Result<Usage, RuntimeError> {
        self.timed("container_stats", self.inner.usage(id)).await
    }

    // Not timed: an attach lasts as long as the user stays.
    async fn attach(&self, id: &str, input: AttachInput) -> Result<(), RuntimeError> {
        self.inner.attach(id, input).await
    }
}

/// The readiness checks of a running agent.
pub type Checks = Arc<dyn Fn() -> futures::future::BoxFuture<'static, Vec<Check>> + Send + Sync>;

/// Serves `/metrics`, `/healthz`, `/livez` (the process answers) and
/// `/readyz` (`checks`) until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, metrics: AgentMetrics, checks: Checks) -> std::io::Result<()> {
    use axum::extract::RawQuery;
    use axum::routing::get;
    let m = metrics.clone();
    let health = |verbose: bool, checks: Vec<Check>| {
        let (code, text) = render_health(&checks, verbose);
        (axum::http::StatusCode::from_u16(code).unwrap_or(axum::http::StatusCode::INTERNAL_SERVER_ERROR), text)
    };
    let verbose = |q: &Option<String>| {
        q.as_deref().is_some_and(|q| q.split('&').any(|p| p == "verbose" || p.starts_with("verbose=")))
    };
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(move || {
                let m = m.clone();
                async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], m.render()) }
            }),
        )
        .route("/healthz", get(move |RawQuery(q): RawQuery| async move { health(verbose(&q), vec![("ping", None)]) }))
        .route("/livez", get(move |RawQuery(q): RawQuery| async move { health(verbose(&q), vec![("ping", None)]) }))
        .route(
            "/readyz",
            get(move |RawQuery(q): RawQuery| {
                let checks = checks.clone();
                async move { health(verbose(&q), checks().await) }
            }),
        );
    axum::serve(listener, app).await
}

/// One health check's result: (name, None if ok or Some(reason)).
pub type Check = (&'static str, Option<String>);

/// Kubernetes' health endpoint text: `ok`, or `[+]`/`[-]` lines with `?verbose`.
pub fn render_health(checks: &[Check], verbose: bool) -> (u16, String) {
    let healthy = checks.iter().all(|(_, e)| e.is_none());
    let code = if healthy { 200 } else { 500 };
    if healthy && !verbose {
        return (code, "ok".into());
    }
    let mut out = String::new();
    for (name, e) in checks {
        match e {
            None => out.push_str(&format!("[+]{name} ok\n")),
            Some(why) => out.push_str(&format!("[-]{name} failed: {why}\n")),
        }
    }
    out.push_str(if healthy { "healthz check passed\n" } else { "healthz check failed\n" });
    (code, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_text_follows_kubernetes() {
        assert_eq!(render_health(&[("ping", None)], false), (200, "ok".into()));
        let (code, text) = render_health(&[("ping", None), ("master", Some("no master reachable".into()))], false);
        assert_eq!(code, 500);
        assert!(text.contains("[+]ping ok\n[-]master failed: no master reachable\n"), "{text}");
        assert!(render_health(&[("ping", None)], true).1.contains("[+]ping ok"));
    }

    #[tokio::test]
    async fn instrumented_runtime_counts_operations() {
        let m = AgentMetrics::new().unwrap();
        let rt = Instrumented::new(Arc::new(crate::sim::SimRuntime::new()), m.clone());
        rt.ensure_image("busybox:1", PullPolicy::IfNotPresent, &[]).await.unwrap();
        let cfg = SandboxConfig {
            pod_uid: "u".into(),
            namespace: "n".into(),
            name: "p".into(),
            hostname: "p".into(),
            port_mappings: vec![],
            host_network: false,
            resolv_conf: None,
            domain: None,
        };
        rt.run_sandbox(&cfg).await.unwrap();
        assert!(rt.remove_container("missing").await.is_ok());
        rt.list_sandboxes().await.unwrap();
        let text = m.render();
        assert!(
            text.contains("kubelet_runtime_operations_duration_seconds_count{operation_type=\"run_podsandbox\"} 1"),
            "{text}"
        );
        assert!(text.contains("kubelet_image_pull_duration_seconds_count{result=\"success\"} 1"), "{text}");
        assert!(text.contains("kubelet_running_pods 1"), "{text}");
    }
}
