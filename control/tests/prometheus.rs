//! A real Prometheus (Debian's 2.42) scrapes `capstan up` with the config
//! `up` writes: every target up, exactly one leader, and every /metrics page
//! passes `promtool check metrics`. Health endpoints answer as Kubernetes'.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The single value of an instant query, or None (not up yet, no data).
fn query(port: u16, q: &str) -> Option<f64> {
    let enc: String = q
        .bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b == b'_' { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect();
    let (code, body) = http_get(&format!("http://127.0.0.1:{port}/api/v1/query?query={enc}")).ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn prometheus_scrapes_every_master_and_agent() {
    // Three masters and a hollow node agent, as `capstan up` starts them.
    let up = Up::start_full(std::path::Path::new(BIN), None, 3, &[], &["--nodes", "1", "--runtime", "sim"])
        .expect("capstan up");
    let config = up.dir.path().join("prometheus.yml");
    assert!(config.exists(), "capstan up writes prometheus.yml");
    let out = Command::new("promtool").arg("check").arg("config").arg(&config).output().unwrap();
    assert!(out.status.success(), "promtool check config: {}", String::from_utf8_lossy(&out.stderr));

    // Every /metrics page is well-formed and lint-clean; health endpoints answer.
    let mut exposed = String::new();
    for i in 1..=3 {
        let (code, body) = http_get(&format!("{}/metrics", metrics_url(&up, i))).unwrap();
        assert_eq!(code, 200);
        exposed.push_str(&body);
        for name in [
            "capstan_raft_is_leader",
            "capstan_store_revision",
            "capstan_raft_log_fsync_duration_seconds_bucket",
            "process_resident_memory_bytes",
            "capstan_peer_rtt_seconds",
        ] {
            assert!(body.contains(name), "master-{i} /metrics lacks {name}");
        }
        if let Err(e) = common::promtool_check_metrics(&body) {
            panic!("promtool check metrics on master-{i}: {e}");
        }
        let (code, body) = http_get(&format!("{}/readyz?verbose", metrics_url(&up, i))).unwrap();
        assert_eq!(code, 200, "{body}");
        assert!(body.contains("[+]raft-leader ok"), "{body}");
        assert_eq!(http_get(&format!("{}/livez", metrics_url(&up, i))).unwrap(), (200, "ok".to_string()));
    }

    // The agent's page too (its address is in its data dir).
    let ep: serde_json::Value =
        serde_json::from_slice(&std::fs::read(up.dir.path().join("node-1/endpoints.json")).unwrap()).unwrap();
    let agent = ep["metrics_url"].as_str().unwrap().to_string();
    let (code, body) = http_get(&format!("{agent}/metrics")).unwrap();
    assert_eq!(code, 200);
    if let Err(e) = promtool_check_metrics(&body) {
        panic!("promtool check metrics on the agent: {e}");
    }
    exposed.push_str(&body);
    let (code, body) = http_get(&format!("{agent}/readyz?verbose")).unwrap();
    assert_eq!(code, 200, "{body}");

    // The shipped alerts and dashboard only use metrics that exist.
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let used = std::fs::read_to_string(deploy.join("prometheus/capstan-alerts.yml")).unwrap()
        + &std::fs::read_to_string(deploy.join("grafana/capstan-masters.json")).unwrap();
    let mut names: Vec<&str> = used
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("capstan_") || w.starts_with("process_") || w.starts_with("kubelet_"))
        .collect();
    names.sort();
    names.dedup();
    assert!(names.len() > 10);
    for n in names {
        assert!(exposed.contains(n), "deploy/ refers to {n}, which no master or agent exposes");
    }

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(up.dir.path().join("prometheus.log")).unwrap();
    let _prom = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", up.dir.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let up_sum = query(port, "sum(up{job=\"capstan-master\"})");
        let agents = query(port, "sum(up{job=\"capstan-node\"})");
        let leaders = query(port, "sum(capstan_raft_is_leader)");
        if let (Some(up_sum), Some(agents), Some(leaders)) = (up_sum, agents, leaders) {
            if up_sum == 3.0 && agents == 1.0 {
                assert_eq!(leaders, 1.0, "exactly one leader");
                break;
            }
        }
        assert!(Instant::now() < deadline, "prometheus never saw all three masters and the agent up");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// 1-based, as the masters are named.
fn metrics_url(up: &Up, i: usize) -> String {
    common::metrics_url(up, i - 1)
}

#[test]
fn shipped_rules_and_config_pass_promtool() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "capstan-alerts.yml"],
        vec!["test", "rules", "capstan-alerts.test.yml"],
    ] {
        let out = Command::new("promtool").args(&args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("../grafana/capstan-masters.json")).unwrap()).unwrap();
    assert!(dash["panels"].as_array().unwrap().iter().all(|p| !p["targets"][0]["expr"].as_str().unwrap().is_empty()));
}
