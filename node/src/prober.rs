//! Liveness, readiness and startup probes (exec, httpGet, tcpSocket) with
//! Kubernetes' timing: initialDelaySeconds, periodSeconds (10),
//! timeoutSeconds (1), successThreshold (1), failureThreshold (3).
//!
//! The verdict logic is pure ([`Tracker::record`]); the pod worker runs
//! due probes each round ([`run`]) and feeds the verdicts into its
//! `pods::Memory`: readiness gates `ready`, a liveness (or startup) verdict
//! of failure marks the container unhealthy (the worker stops it and the
//! restart policy decides), and until a startup probe succeeds neither of
//! the other two runs.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    pub fn field(self) -> &'static str {
        match self {
            Kind::Startup => "startupProbe",
            Kind::Liveness => "livenessProbe",
            Kind::Readiness => "readinessProbe",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    Exec(Vec<String>),
    Http { scheme: String, host: Option<String>, port: u16, path: String, headers: Vec<(String, String)> },
    Tcp { host: Option<String>, port: u16 },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Probe {
    pub action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
}

/// A port given by number or by the name of one of the container's ports.
fn port_of(v: &Value, container: &Value) -> Option<u16> {
    if let Some(n) = v.as_u64() {
        return u16::try_from(n).ok().filter(|p| *p > 0);
    }
    let name = v.as_str()?;
    if let Ok(n) = name.parse::<u16>() {
        return Some(n);
    }
    container["ports"].as_array()?.iter().find(|p| p["name"] == name)?["containerPort"]
        .as_u64()
        .and_then(|n| u16::try_from(n).ok())
}

impl Probe {
    /// The probe of `kind` in a container spec, if it has one.
    pub fn parse(container: &Value, kind: Kind) -> Option<Probe> {
        let p = &container[kind.field()];
        if !p.is_object() {
            return None;
        }
        let secs = |k: &str, d: u64| Duration::from_secs(p[k].as_u64().unwrap_or(d));
        let action = Action::parse(p, container)?;
        let at_least_one = |k: &str, d: u64| p[k].as_u64().unwrap_or(d).max(1) as u32;
        Some(Probe {
            action,
            initial_delay: secs("initialDelaySeconds", 0),
            period: secs("periodSeconds", 10).max(Duration::from_secs(1)),
            timeout: secs("timeoutSeconds", 1).max(Duration::from_secs(1)),
            // Liveness and startup probes must have successThreshold 1.
            success_threshold: if kind == Kind::Readiness { at_least_one("successThreshold", 1) } else { 1 },
            failure_threshold: at_least_one("failureThreshold", 3),
        })
    }
}

impl Action {
    /// A probe's or lifecycle hook's handler (exec, httpGet, tcpSocket).
    pub fn parse(p: &Value, container: &Value) -> Option<Action> {
        let action = if let Some(cmd) = p["exec"]["command"].as_array() {
            Action::Exec(cmd.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        } else if p["httpGet"].is_object() {
            let h = &p["httpGet"];
            Action::Http {
                scheme: h["scheme"].as_str().unwrap_or("HTTP").to_ascii_lowercase(),
                host: h["host"].as_str().filter(|s| !s.is_empty()).map(str::to_string),
                port: port_of(&h["port"], container)?,
                path: h["path"].as_str().filter(|s| !s.is_empty()).unwrap_or("/").to_string(),
                headers: h["httpHeaders"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| Some((x["name"].as_str()?.to_string(), x["value"].as_str()?.to_string())))
                    .collect(),
            }
        } else if p["tcpSocket"].is_object() {
            let t = &p["tcpSocket"];
            Action::Tcp {
                host: t["host"].as_str().filter(|s| !s.is_empty()).map(str::to_string),
                port: port_of(&t["port"], container)?,
            }
        } else {
            return None;
        };
        Some(action)
    }
}

/// One probe of one container: when it runs next and its verdict so far.
#[derive(Clone, Debug, PartialEq)]
pub struct Tracker {
    pub next: Instant,
    successes: u32,
    failures: u32,
    /// The verdict: None until a threshold is first crossed.
    pub verdict: Option<bool>,
    pub last_message: String,
}

impl Tracker {
    pub fn new(probe: &Probe, started: Instant) -> Tracker {
        Tracker {
            next: started + probe.initial_delay,
            successes: 0,
            failures: 0,
            verdict: None,
            last_message: String::new(),
        }
    }

    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// Counts one result; the verdict flips only after `successThreshold`
    /// consecutive successes or `failureThreshold` consecutive failures.
    pub fn record(&mut self, probe: &Probe, ok: bool, message: String, now: Instant) {
        self.next = now + probe.period;
        if ok {
            self.successes += 1;
            self.failures = 0;
            if self.successes >= probe.success_threshold {
                self.verdict = Some(true);
            }
        } else {
            self.failures += 1;
            self.successes = 0;
            self.last_message = message;
            if self.failures >= probe.failure_threshold {
                self.verdict = Some(false);
            }
        }
    }
}

/// The outcome of one probe run: success, and the failure message.
pub async fn run<F, Fut>(probe: &Probe, kind: Kind, pod_ip: Option<IpAddr>, exec: F) -> (bool, String)
where
    F: FnOnce(Vec<String>, Duration) -> Fut,
    Fut: std::future::Future<Output = Result<i32, String>>,
{
    match run_action(&probe.action, probe.timeout, pod_ip, exec).await {
        Ok(()) => (true, String::new()),
        Err(m) => (false, format!("{} probe failed: {m}", kind.name())),
    }
}

/// Runs a probe's or hook's handler within `timeout`; why it failed.
pub async fn run_action<F, Fut>(
    action: &Action,
    timeout: Duration,
    pod_ip: Option<IpAddr>,
    exec: F,
) -> Result<(), String>
where
    F: FnOnce(Vec<String>, Duration) -> Fut,
    Fut: std::future::Future<Output = Result<i32, String>>,
{
    match action {
        Action::Exec(cmd) => match tokio::time::timeout(timeout, exec(cmd.clone(), timeout)).await {
            Ok(Ok(0)) => Ok(()),
            Ok(Ok(code)) => Err(format!("command {cmd:?} exited with {code}")),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("command timed out after {timeout:?}")),
        },
        Action::Tcp { host, port } => {
            let addr = target(host, pod_ip).ok_or("the pod has no IP yet")?;
            match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((addr.as_str(), *port))).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("dial tcp {addr}:{port}: {e}")),
                Err(_) => Err(format!("dial tcp {addr}:{port}: i/o timeout")),
            }
        }
        Action::Http { scheme, host, port, path, headers } => {
            let addr = target(host, pod_ip).ok_or("the pod has no IP yet")?;
            let url = format!("{scheme}://{addr}:{port}{path}");
            match http_get(&url, headers, timeout).await {
                Ok(code) if (200..400).contains(&code) => Ok(()),
                Ok(code) => Err(format!("HTTP probe failed with statuscode: {code}")),
                Err(e) => Err(format!("Get \"{url}\": {e}")),
            }
        }
    }
}

fn target(host: &Option<String>, pod_ip: Option<IpAddr>) -> Option<String> {
    host.clone().or_else(|| pod_ip.map(|ip| ip.to_string()))
}

async fn http_get(url: &str, headers: &[(String, String)], timeout: Duration) -> Result<u16, String> {
    // Probes do not follow redirects to other hosts and accept any
    // certificate, as the kubelet's do.
    let client = reqwest::Client::builder()
        .timeout(timeout)
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::limited(10))
        .build()
        .map_err(|e| e.to_string())?;
    let mut req = client.get(url).header("User-Agent", "kube-probe/1.32");
    for (k, v) in headers {
        req = req.header(k, v);
    }
    req.send().await.map(|r| r.status().as_u16()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn probes_parse_with_kubernetes_defaults_and_named_ports() {
        let c = json!({
            "ports": [{"name": "http", "containerPort": 8080}],
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}},
            "readinessProbe": {"tcpSocket": {"port": 9000}, "periodSeconds": 2, "successThreshold": 2, "failureThreshold": 1},
            "startupProbe": {"exec": {"command": ["cat", "/tmp/ok"]}, "initialDelaySeconds": 5, "successThreshold": 4},
        });
        let l = Probe::parse(&c, Kind::Liveness).unwrap();
        assert_eq!(
            l.action,
            Action::Http { scheme: "http".into(), host: None, port: 8080, path: "/healthz".into(), headers: vec![] }
        );
        assert_eq!(
            (l.period, l.timeout, l.success_threshold, l.failure_threshold),
            (Duration::from_secs(10), Duration::from_secs(1), 1, 3)
        );
        let r = Probe::parse(&c, Kind::Readiness).unwrap();
        assert_eq!(
            (r.action.clone(), r.period, r.success_threshold, r.failure_threshold),
            (Action::Tcp { host: None, port: 9000 }, Duration::from_secs(2), 2, 1)
        );
        let s = Probe::parse(&c, Kind::Startup).unwrap();
        assert_eq!(s.success_threshold, 1, "startup probes succeed once");
        assert_eq!(s.initial_delay, Duration::from_secs(5));
        assert!(Probe::parse(&json!({}), Kind::Liveness).is_none());
        assert!(
            Probe::parse(&json!({"livenessProbe": {"httpGet": {"port": "nope"}}}), Kind::Liveness).is_none(),
            "unknown named port"
        );
    }

    #[test]
    fn verdicts_flip_only_after_consecutive_thresholds() {
        let p = Probe {
            action: Action::Tcp { host: None, port: 1 },
            initial_delay: Duration::from_secs(3),
            period: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            success_threshold: 2,
            failure_threshold: 3,
        };
        let t0 = Instant::now();
        let mut t = Tracker::new(&p, t0);
        assert!(!t.due(t0) && t.due(t0 + Duration::from_secs(3)), "initial delay");
        t.record(&p, true, String::new(), t0);
        assert_eq!(t.verdict, None, "one success of two");
        assert_eq!(t.next, t0 + Duration::from_secs(2));
        t.record(&p, true, String::new(), t0);
        assert_eq!(t.verdict, Some(true));
        t.record(&p, false, "a".into(), t0);
        t.record(&p, false, "b".into(), t0);
        assert_eq!(t.verdict, Some(true), "two failures of three");
        t.record(&p, true, String::new(), t0);
        t.record(&p, false, "c".into(), t0);
        t.record(&p, false, "d".into(), t0);
        assert_eq!(t.verdict, Some(true), "a success resets the failures");
        t.record(&p, false, "e".into(), t0);
        assert_eq!((t.verdict, t.last_message.as_str()), (Some(false), "e"));
    }

    #[tokio::test]
    async fn tcp_and_exec_probes_report_like_the_kubelet() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let probe = |action| Probe {
            action,
            initial_delay: Duration::ZERO,
            period: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            success_threshold: 1,
            failure_threshold: 1,
        };
        let no_exec = |_: Vec<String>, _| async { Err::<i32, String>("unused".into()) };
        assert!(run(&probe(Action::Tcp { host: None, port }), Kind::Readiness, Some(ip), no_exec).await.0);
        drop(l);
        let (ok, msg) = run(&probe(Action::Tcp { host: None, port }), Kind::Liveness, Some(ip), no_exec).await;
        assert!(!ok && msg.starts_with("Liveness probe failed: dial tcp 127.0.0.1:"), "{msg}");
        let exits = |code: i32| move |_: Vec<String>, _| async move { Ok::<i32, String>(code) };
        assert!(run(&probe(Action::Exec(vec!["true".into()])), Kind::Startup, None, exits(0)).await.0);
        let (ok, msg) = run(&probe(Action::Exec(vec!["false".into()])), Kind::Liveness, None, exits(1)).await;
        assert!(!ok && msg.contains("exited with 1"), "{msg}");
        let (ok, msg) = run(&probe(Action::Tcp { host: None, port }), Kind::Readiness, None, no_exec).await;
        assert!(!ok && msg.contains("no IP"), "{msg}");
    }
}
