//! The test kubelet: plays every node of a cluster whose nodes are Node
//! objects created through the API. It marks pods bound to a node Running
//! and Ready, finishes the deletion of pods being deleted, and heartbeats
//! the nodes it is told are alive, as a kubelet would.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::kubectl;

/// What a kubelet does to report a pod: a merge patch of its status.
pub fn set_status(kc: &Path, ns: &str, name: &str, status: &Value) {
    let patch = status.to_string();
    kubectl(kc, &["patch", "pod", name, "-n", ns, "--subresource=status", "--type=merge", "-p", &patch], None);
}

/// Plays the kubelet of every node until dropped.
pub struct TestKubelet {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Nodes whose status it reports (heartbeats) about once a second.
    pub alive: Arc<std::sync::Mutex<Vec<String>>>,
}

impl TestKubelet {
    pub fn start(kc: PathBuf) -> TestKubelet {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let alive = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let beating = alive.clone();
        let thread = std::thread::spawn(move || {
            let mut last_beat = Instant::now() - Duration::from_secs(10);
            // Each pod gets its own address, as CNI would give it.
            let mut ips: std::collections::HashMap<String, String> = std::collections::HashMap::new();
            while !s.load(Ordering::Relaxed) {
                if last_beat.elapsed() > Duration::from_secs(1) {
                    last_beat = Instant::now();
                    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                    let nodes = beating.lock().unwrap().clone();
                    for n in nodes {
                        let ready = json!({"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "test kubelet", "lastHeartbeatTime": now, "lastTransitionTime": now}]}});
                        kubectl(
                            &kc,
                            &["patch", "node", &n, "--subresource=status", "--type=merge", "-p", &ready.to_string()],
                            None,
                        );
                    }
                }
                let (good, out, _) = kubectl(&kc, &["get", "pods", "-A", "-o", "json"], None);
                if good {
                    let list: Value = serde_json::from_str(&out).unwrap_or(json!({}));
                    for p in list["items"].as_array().into_iter().flatten() {
                        let (ns, name) =
                            (p["metadata"]["namespace"].as_str().unwrap(), p["metadata"]["name"].as_str().unwrap());
                        if p["spec"]["nodeName"].as_str().is_none_or(str::is_empty) {
                            continue;
                        }
                        if p["metadata"]["deletionTimestamp"].is_string() {
                            kubectl(
                                &kc,
                                &["delete", "pod", name, "-n", ns, "--grace-period=0", "--force", "--wait=false"],
                                None,
                            );
                        } else if p["metadata"]["labels"]["batch.kubernetes.io/job-name"].is_string() {
                            // Job pods run to completion at once.
                            if p["status"]["phase"] != "Succeeded" {
                                let done = json!({"status": {"phase": "Succeeded"}});
                                set_status(&kc, ns, name, &done);
                            }
                        } else if p["status"]["phase"] != "Running" {
                            let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
                            let c = p["spec"]["containers"][0]["name"].clone();
                            let n = ips.len();
                            let ip = ips
                                .entry(format!("{ns}/{name}"))
                                .or_insert_with(|| format!("10.244.{}.{}", n / 250, n % 250 + 2))
                                .clone();
                            let status = json!({"status": {"phase": "Running", "podIP": ip,
                                "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": now},
                                    {"type": "ContainersReady", "status": "True", "lastTransitionTime": now}],
                                "containerStatuses": [{"name": c, "ready": true, "restartCount": 0, "image": p["spec"]["containers"][0]["image"],
                                    "imageID": "", "started": true, "state": {"running": {"startedAt": now}}}]}});
                            set_status(&kc, ns, name, &status);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        TestKubelet { stop, thread: Some(thread), alive }
    }
}

impl Drop for TestKubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn node(name: &str, cpu: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels: {{kubernetes.io/hostname: {name}}}\nstatus:\n  capacity: {{cpu: \"{cpu}\", memory: 8Gi, pods: \"110\"}}\n  allocatable: {{cpu: \"{cpu}\", memory: 8Gi, pods: \"110\"}}\n"
    )
}

/// Node objects `names` of `cpu` cores, heartbeating through a test
/// kubelet that also plays their pods.
pub fn nodes_with_kubelet(kc: &Path, names: &[&str], cpu: &str) -> TestKubelet {
    for n in names {
        let (good, _, err) = kubectl(kc, &["apply", "-f", "-"], Some(&node(n, cpu)));
        assert!(good, "{err}");
    }
    let kubelet = TestKubelet::start(kc.to_path_buf());
    *kubelet.alive.lock().unwrap() = names.iter().map(|n| n.to_string()).collect();
    kubelet
}
