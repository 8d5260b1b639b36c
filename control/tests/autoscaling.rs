//! `kubectl top` and the HorizontalPodAutoscaler against a real
//! three-master `capstan up` cluster and a real node agent
//! (`capstan-node --runtime sim`). The sim runtime gives each container the
//! synthetic load its environment asks for (`CAPSTAN_SIM_CPU`,
//! `CAPSTAN_SIM_MEMORY`), so usage is known exactly: the agent reports it
//! every 15 s, the gateway stores it, every master serves it as
//! `metrics.k8s.io`, and the HPA scales on it.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use common::{ok, wait_for};

fn kubectl(kc: &Path, args: &[&str]) -> (bool, String, String) {
    common::kubectl(kc, args, None)
}

fn kubectl_stdin(kc: &Path, args: &[&str], input: &str) -> String {
    let (good, out, err) = common::kubectl(kc, args, Some(input));
    assert!(good, "kubectl {args:?}: {err}");
    out
}

/// A kubeconfig like `capstan up`'s, pointing at master `i`.
fn kubeconfig_for_master(up: &common::Up, i: usize) -> PathBuf {
    let ep: Value = serde_json::from_slice(&std::fs::read(up.master_dir(i).join("endpoints.json")).unwrap()).unwrap();
    let kc = std::fs::read_to_string(up.dir.path().join("kubeconfig")).unwrap();
    let server = kc.lines().find_map(|l| l.trim().strip_prefix("server: ")).unwrap().to_string();
    let path = up.dir.path().join(format!("kubeconfig-{i}"));
    std::fs::write(&path, kc.replace(&server, ep["api_url"].as_str().unwrap())).unwrap();
    path
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: c
        image: busybox
        env: [{name: CAPSTAN_SIM_CPU, value: "300m"}, {name: CAPSTAN_SIM_MEMORY, value: "64Mi"}]
        resources: {requests: {cpu: 200m, memory: 128Mi}}
"#;

/// The rows of a `kubectl top` table (header dropped), split into cells.
fn rows(out: &str) -> Vec<Vec<String>> {
    out.lines().skip(1).map(|l| l.split_whitespace().map(str::to_string).collect()).collect()
}

#[test]
fn kubectl_top_and_the_hpa_scale_on_reported_usage() {
    let up = common::up(3);
    let kc = up.dir.path().join("kubeconfig");
    let node = common::SimAgent::start(&up, "sim-1", &[common::node_addr(&up, 0)]);
    wait_for(60, "node sim-1 to register", || {
        let (ok, out, _) = kubectl(&kc, &["get", "node", "sim-1", "-o", "name"]);
        ok.then_some(out)
    });
    kubectl_stdin(&kc, &["apply", "-f", "-"], DEPLOYMENT);

    // kubectl top pods: exactly the synthetic load, through any master.
    let kc3 = kubeconfig_for_master(&up, 2);
    let pods = wait_for(90, "kubectl top pods to show both pods", || {
        let (ok, out, _) = kubectl(&kc3, &["top", "pods", "-l", "app=web", "--no-headers=false"]);
        let r = rows(&out);
        (ok && r.len() == 2 && r.iter().all(|c| c.get(1).map(String::as_str) == Some("300m"))).then_some(r)
    });
    assert!(pods.iter().all(|c| c[2] == "64Mi"), "{pods:?}\n{}", node.log());
    let all = ok(&kc, &["top", "pods", "-A"]);
    assert!(rows(&all).iter().filter(|c| c[0] == "default" && c[1].starts_with("web-")).count() == 2, "{all}");
    let (_, none, _) = kubectl(&kc, &["top", "pods", "-l", "app=other"]);
    assert!(rows(&none).is_empty(), "{none}");
    let nodes = wait_for(30, "kubectl top nodes", || {
        let (ok, out, _) = kubectl(&kc, &["top", "nodes"]);
        (ok && out.contains("sim-1")).then_some(out)
    });
    assert!(nodes.lines().next().unwrap().contains("CPU(cores)"), "{nodes}");
    // The raw API as metrics-server answers it, and a clear 404.
    let raw: Value =
        serde_json::from_str(&ok(&kc, &["get", "--raw", "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods"]))
            .unwrap();
    assert_eq!(raw["kind"], "PodMetricsList");
    assert_eq!(raw["items"][0]["window"], "15s");
    assert!(raw["items"][0]["containers"][0]["usage"]["cpu"].as_str().unwrap().ends_with('n'));
    let (found, _, err) = kubectl(&kc, &["get", "--raw", "/apis/metrics.k8s.io/v1beta1/nodes/nope"]);
    assert!(!found && (err.contains("NotFound") || err.contains("not found")), "{err}");

    // kubectl autoscale (an autoscaling/v1 create): 300m of 200m = 150% of
    // a 50% target wants 6 replicas; maxReplicas holds it at 5.
    ok(&kc, &["autoscale", "deploy", "web", "--cpu-percent=50", "--min=1", "--max=5"]);
    wait_for(120, "the HPA to scale web to 5", || {
        let out = ok(&kc, &["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]);
        (out.trim() == "5").then_some(())
    });
    let hpa = wait_for(60, "kubectl get hpa to show the current utilization", || {
        let out = ok(&kc, &["get", "hpa", "web"]);
        out.contains("cpu: 150%/50%").then_some(out)
    });
    assert!(hpa.contains("Deployment/web"), "{hpa}");
    let v2: Value = serde_json::from_str(&ok(&kc, &["get", "hpa", "web", "-o", "json"])).unwrap();
    assert_eq!(v2["apiVersion"], "autoscaling/v2");
    assert_eq!(v2["status"]["desiredReplicas"], 5);
    let conds = v2["status"]["conditions"].as_array().unwrap();
    let cond = |t: &str| conds.iter().find(|c| c["type"] == t).cloned().unwrap_or_default();
    assert_eq!(cond("ScalingActive")["status"], "True");
    assert_eq!(cond("ScalingLimited")["reason"], "TooManyReplicas");
    // The v1 view kubectl autoscale created it through.
    let v1: Value = serde_json::from_str(&ok(
        &kc,
        &["get", "--raw", "/apis/autoscaling/v1/namespaces/default/horizontalpodautoscalers/web"],
    ))
    .unwrap();
    assert_eq!(v1["spec"]["targetCPUUtilizationPercentage"], 50);
    assert_eq!(v1["status"]["currentCPUUtilizationPercentage"], 150);
    // Two more resyncs later it still respects maxReplicas.
    std::thread::sleep(Duration::from_secs(32));
    let out = ok(&kc, &["get", "deploy", "web", "-o", "jsonpath={.spec.replicas}"]);
    assert_eq!(out.trim(), "5");
    let events = ok(&kc, &["get", "events", "--field-selector", "involvedObject.kind=HorizontalPodAutoscaler"]);
    assert!(events.contains("SuccessfulRescale") && events.contains("New size: 5"), "{events}");
}
