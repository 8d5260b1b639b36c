//! Deployments, ReplicaSets, StatefulSets and the scheduler against a real
//! `capstan up` cluster, driven by kubectl. Nodes are Node objects created
//! through the API; the test kubelet (`common/kubelet.rs`) plays every node.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use common::kubelet::{nodes_with_kubelet, TestKubelet};
use common::{json_of, kubectl, ok};

const DEPLOY: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxSurge: 1, maxUnavailable: 0}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: app
        image: registry.local/web:1
        resources:
          requests: {cpu: 100m, memory: 64Mi}
";

/// Three masters, three nodes of `cpu` cores with the test kubelet, and
/// the `web` Deployment rolled out.
fn cluster_with_deployment(cpu: &str) -> (common::Up, PathBuf, TestKubelet) {
    let up = common::up(3);
    let kc = up.dir.path().join("kubeconfig");
    let kubelet = nodes_with_kubelet(&kc, &["n1", "n2", "n3"], cpu);
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(DEPLOY));
    assert!(good, "{err}");
    ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    (up, kc, kubelet)
}

#[test]
fn deployments_roll_out_through_replicasets_onto_nodes() {
    // apply -> ReplicaSet -> pods bound to nodes; rollout status returns.
    let (_up, kc, _kubelet) = cluster_with_deployment("4");
    ok(&kc, &["wait", "--for=condition=Available", "deploy/web", "--timeout=30s"]);
    let pods = json_of(&kc, &["get", "pods", "-l", "app=web"]);
    let nodes: Vec<&str> =
        pods["items"].as_array().unwrap().iter().map(|p| p["spec"]["nodeName"].as_str().unwrap()).collect();
    assert_eq!(nodes.len(), 3);
    assert!(nodes.iter().collect::<std::collections::HashSet<_>>().len() >= 2, "pods spread over nodes: {nodes:?}");
    let rs = json_of(&kc, &["get", "rs", "-l", "app=web"]);
    assert_eq!(rs["items"].as_array().unwrap().len(), 1);
    assert_eq!(rs["items"][0]["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "1");

    // A new image rolls out within maxSurge 1 / maxUnavailable 0 at every step.
    let watching = Arc::new(AtomicBool::new(true));
    let (w, kc2) = (watching.clone(), kc.clone());
    let sampler = std::thread::spawn(move || {
        let mut worst = (0i64, i64::MAX);
        while w.load(Ordering::Relaxed) {
            let (good, out, _) = kubectl(&kc2, &["get", "rs", "-l", "app=web", "-o", "json"], None);
            if good {
                let v: Value = serde_json::from_str(&out).unwrap();
                let items = v["items"].as_array().cloned().unwrap_or_default();
                let total: i64 = items.iter().map(|r| r["spec"]["replicas"].as_i64().unwrap_or(0)).sum();
                let available: i64 = items.iter().map(|r| r["status"]["availableReplicas"].as_i64().unwrap_or(0)).sum();
                worst = (worst.0.max(total), worst.1.min(available));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        worst
    });
    ok(&kc, &["set", "image", "deploy/web", "app=registry.local/web:2"]);
    ok(&kc, &["rollout", "status", "deploy/web", "--timeout=90s"]);
    watching.store(false, Ordering::Relaxed);
    let (max_total, min_available) = sampler.join().unwrap();
    eprintln!("rolling update: at most {max_total} replicas, at least {min_available} available");
    assert!(max_total <= 4, "maxSurge 1: at most 4 replicas, saw {max_total}");
    assert!(min_available >= 3, "maxUnavailable 0: never fewer than 3 available, saw {min_available}");
    let d = json_of(&kc, &["get", "deploy", "web"]);
    assert_eq!(d["status"]["updatedReplicas"], 3);
    assert_eq!(d["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "2");
    let history = ok(&kc, &["rollout", "history", "deploy/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");

    // Undo goes back to the first template, as revision 3.
    ok(&kc, &["rollout", "undo", "deploy/web"]);
    ok(&kc, &["rollout", "status", "deploy/web", "--timeout=90s"]);
    let d = json_of(&kc, &["get", "deploy", "web"]);
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["image"], "registry.local/web:1");
    assert_eq!(d["metadata"]["annotations"]["deployment.kubernetes.io/revision"], "3");

    // Scale; a Service's Endpoints and EndpointSlice follow the ready pods.
    ok(&kc, &["scale", "deploy/web", "--replicas=5"]);
    ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    assert_eq!(json_of(&kc, &["get", "pods", "-l", "app=web"])["items"].as_array().unwrap().len(), 5);
    ok(&kc, &["create", "service", "clusterip", "web", "--tcp=80:8080"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (good, out, _) = kubectl(&kc, &["get", "endpoints", "web", "-o", "json"], None);
        let ep: Value = if good { serde_json::from_str(&out).unwrap() } else { json!({}) };
        let ready = ep["subsets"][0]["addresses"].as_array().map_or(0, Vec::len);
        if ready == 5 {
            assert_eq!(ep["subsets"][0]["ports"][0]["port"], 8080);
            break;
        }
        assert!(Instant::now() < deadline, "endpoints never listed the 5 ready pods: {ep}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let slices = json_of(&kc, &["get", "endpointslices", "-l", "kubernetes.io/service-name=web"]);
    assert_eq!(slices["items"][0]["endpoints"].as_array().map(Vec::len), Some(5));

    // A disruption budget: evictions that would break it are refused (429).
    let pdb = "apiVersion: policy/v1\nkind: PodDisruptionBudget\nmetadata:\n  name: web\n  namespace: default\nspec:\n  minAvailable: 5\n  selector:\n    matchLabels: {app: web}\n";
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(pdb));
    assert!(good, "{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while json_of(&kc, &["get", "pdb", "web"])["status"]["currentHealthy"] != 5 {
        assert!(Instant::now() < deadline, "PDB status never counted the pods");
        std::thread::sleep(Duration::from_millis(200));
    }
    let victim =
        json_of(&kc, &["get", "pods", "-l", "app=web"])["items"][0]["metadata"]["name"].as_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let eviction = dir.path().join("eviction.json");
    std::fs::write(
        &eviction,
        json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": victim, "namespace": "default"}})
            .to_string(),
    )
    .unwrap();
    let evict = |kc: &Path| {
        kubectl(
            kc,
            &[
                "create",
                "--raw",
                &format!("/api/v1/namespaces/default/pods/{victim}/eviction"),
                "-f",
                eviction.to_str().unwrap(),
            ],
            None,
        )
    };
    let (good, _, err) = evict(&kc);
    assert!(!good && err.contains("disruption budget"), "{err}");
    assert!(kubectl(&kc, &["get", "pod", &victim], None).0, "a refused eviction changes nothing");
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(&pdb.replace("minAvailable: 5", "minAvailable: 4")));
    assert!(good, "{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while json_of(&kc, &["get", "pdb", "web"])["status"]["disruptionsAllowed"] != 1 {
        assert!(Instant::now() < deadline, "PDB never allowed a disruption");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (good, _, err) = evict(&kc);
    assert!(good, "an eviction within budget: {err}");
    ok(&kc, &["delete", "pdb", "web"]);
    ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);

    // A pod that fits nowhere says why.
    let big = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: huge\n  namespace: default\nspec:\n  containers:\n  - name: c\n    image: x\n    resources:\n      requests: {cpu: \"64\"}\n";
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(big));
    assert!(good, "{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let p = json_of(&kc, &["get", "pod", "huge"]);
        let c =
            p["status"]["conditions"].as_array().and_then(|c| c.iter().find(|c| c["type"] == "PodScheduled")).cloned();
        if let Some(c) = c {
            assert_eq!(c["status"], "False");
            assert_eq!(c["message"], "0/3 nodes are available: 3 Insufficient cpu.");
            break;
        }
        assert!(Instant::now() < deadline, "no PodScheduled condition on {p}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // A DaemonSet puts one pod on every node, and rolls a new image out.
    let ds = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: agent\n  namespace: default\nspec:\n  selector:\n    matchLabels: {app: agent}\n  template:\n    metadata:\n      labels: {app: agent}\n    spec:\n      containers:\n      - name: agent\n        image: registry.local/agent:1\n";
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(ds));
    assert!(good, "{err}");
    ok(&kc, &["rollout", "status", "ds/agent", "--timeout=60s"]);
    // Live agent pods (old ones may still be terminating: the test kubelet
    // finishes them): (node, image).
    let live = |kc: &Path| live_pods(kc, "app=agent", &["spec", "nodeName"]);
    let on = |image: &str| ["n1", "n2", "n3"].map(|n| (n.to_string(), image.to_string())).to_vec();
    assert_eq!(live(&kc), on("registry.local/agent:1"));
    ok(&kc, &["set", "image", "ds/agent", "agent=registry.local/agent:2"]);
    ok(&kc, &["rollout", "status", "ds/agent", "--timeout=60s"]);
    assert_eq!(live(&kc), on("registry.local/agent:2"));

    // A Job runs its pods to completion, two at a time.
    let job = "apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: pi\n  namespace: default\nspec:\n  completions: 3\n  parallelism: 2\n  template:\n    spec:\n      restartPolicy: Never\n      containers:\n      - name: pi\n        image: registry.local/pi:1\n";
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(job));
    assert!(good, "{err}");
    ok(&kc, &["wait", "--for=condition=complete", "job/pi", "--timeout=60s"]);
    let j = json_of(&kc, &["get", "job", "pi"]);
    assert_eq!(j["status"]["succeeded"], 3);
    assert_eq!(
        json_of(&kc, &["get", "pods", "-l", "job-name=pi"])["items"].as_array().unwrap().len(),
        3,
        "no extra pods"
    );
    let table = ok(&kc, &["get", "job", "pi"]);
    assert!(table.contains("Complete") && table.contains("3/3"), "{table}");

    // Deleting the Deployment takes its ReplicaSets and pods with it.
    ok(&kc, &["delete", "deploy", "web"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !json_of(&kc, &["get", "pods", "-l", "app=web"])["items"].as_array().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "pods of the deleted Deployment remain");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(json_of(&kc, &["get", "rs", "-l", "app=web"])["items"].as_array().unwrap().is_empty());
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

#[test]
fn controllers_fail_over_when_their_master_dies() {
    let (up, kc, _kubelet) = cluster_with_deployment("8");

    let holder = ok(
        &kc,
        &["get", "lease", "-n", "kube-system", "capstan-controller-manager", "-o", "jsonpath={.spec.holderIdentity}"],
    );
    // Holder identities are `<master name>_<process uuid>`.
    let victim: usize = holder
        .trim()
        .strip_prefix("master-")
        .and_then(|n| n.split('_').next())
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or_else(|| panic!("holder {holder:?} is not a master"))
        - 1;
    let survivor = (victim + 1) % 3;
    let kc2 = kubeconfig_for_master(&up, survivor);
    let killed = up.kill9(victim).expect("victim pid");

    // Ask for more replicas through a surviving master, then time how long
    // until a controller acts on it.
    let asked = Instant::now();
    let deadline = asked + Duration::from_secs(30);
    loop {
        let (good, _, _) = kubectl(&kc2, &["scale", "deploy/web", "--replicas=5"], None);
        if good {
            break;
        }
        assert!(Instant::now() < deadline, "scale not accepted after the kill");
        std::thread::sleep(Duration::from_millis(50));
    }
    let acted = loop {
        let rs = json_of(&kc2, &["get", "rs", "-l", "app=web"]);
        if rs["items"].as_array().unwrap().iter().any(|r| r["spec"]["replicas"] == 5) {
            break asked.elapsed();
        }
        assert!(Instant::now() < deadline, "no controller acted within 30 s of the kill");
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("controllers acted {acted:?} after the lease holder (master-{}) was killed", victim + 1);
    let new_holder = ok(
        &kc2,
        &["get", "lease", "-n", "kube-system", "capstan-controller-manager", "-o", "jsonpath={.spec.holderIdentity}"],
    );
    assert_ne!(new_holder.trim(), holder.trim(), "another process took the lease");
    assert!(acted < Duration::from_secs(3), "failover took {acted:?}");
    ok(&kc2, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    // No work done twice: exactly the asked-for pods, and it stays so while
    // the killed master comes back.
    assert!(up.wait_restarted(victim, killed, Duration::from_secs(30)), "capstan up restarts the killed master");
    for _ in 0..10 {
        let pods = json_of(&kc2, &["get", "pods", "-l", "app=web"]);
        assert_eq!(pods["items"].as_array().unwrap().len(), 5, "{pods}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_node_that_stops_heartbeating_loses_its_pods_to_the_others() {
    let up = common::Up::start_with(std::path::Path::new(common::BIN), 1, &["--node-monitor-grace-period=3"])
        .expect("capstan up");
    let kc = up.dir.path().join("kubeconfig");
    let kubelet = nodes_with_kubelet(&kc, &["n1", "n2"], "8");
    // Pods that leave an unreachable node after 2 s instead of 300 s.
    let deploy = DEPLOY.replace("replicas: 3", "replicas: 4").replace(
        "      containers:",
        "      tolerations:\n      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}\n      containers:",
    );
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(&deploy));
    assert!(good, "{err}");
    ok(&kc, &["rollout", "status", "deploy/web", "--timeout=60s"]);
    let on = |kc: &Path, node: &str| -> usize {
        let pods = json_of(kc, &["get", "pods", "-l", "app=web"]);
        pods["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| !p["metadata"]["deletionTimestamp"].is_string() && p["spec"]["nodeName"] == node)
            .count()
    };
    assert!(on(&kc, "n1") > 0, "pods spread onto n1 too");

    // n1 goes silent.
    kubelet.alive.lock().unwrap().retain(|n| n != "n1");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n1 = json_of(&kc, &["get", "node", "n1"]);
        let unknown = n1["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "Unknown");
        let tainted = n1["spec"]["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|t| t["key"] == "node.kubernetes.io/unreachable" && t["effect"] == "NoExecute");
        if unknown && tainted && on(&kc, "n1") == 0 && on(&kc, "n2") == 4 {
            break;
        }
        assert!(Instant::now() < deadline, "pods did not leave the silent node: {n1}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let table = ok(&kc, &["get", "nodes"]);
    assert!(table.lines().any(|l| l.starts_with("n1") && l.contains("Unknown")), "{table}");
    // The alerting gauge counts it (CapstanNodesNotReady).
    let (_, metrics) = common::http_get(&format!("{}/metrics", common::metrics_url(&up, 0))).unwrap();
    let line = r#"capstan_node_status_condition{condition="Ready",status="unknown"} 1"#;
    assert!(metrics.lines().any(|l| l == line), "no {line} in /metrics");
    // As events: the node's NotReady (where describe node looks), each eviction.
    let not_ready = wait_event(&kc, "default", 30, "NodeNotReady", |e| {
        e["reason"] == "NodeNotReady" && e["involvedObject"]["name"] == "n1"
    });
    assert_eq!(not_ready["message"], "Node n1 status is now: NodeNotReady");
    assert_eq!(not_ready["source"]["component"], "node-controller");
    let described = ok(&kc, &["describe", "node", "n1"]);
    assert!(described.split("Events:").nth(1).is_some_and(|e| e.contains("NodeNotReady")), "{described}");
    let evicted = wait_event(&kc, "default", 30, "TaintManagerEviction", |e| e["reason"] == "TaintManagerEviction");
    let pod = evicted["involvedObject"]["name"].as_str().unwrap();
    assert_eq!(evicted["message"], format!("Marking for deletion Pod default/{pod}"));

    // It comes back: Ready, untainted.
    kubelet.alive.lock().unwrap().push("n1".into());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n1 = json_of(&kc, &["get", "node", "n1"]);
        let taints = n1["spec"]["taints"].as_array().map_or(0, Vec::len);
        if taints == 0
            && ok(&kc, &["get", "node", "n1"]).contains("Ready")
            && !ok(&kc, &["get", "node", "n1"]).contains("NotReady")
        {
            break;
        }
        assert!(Instant::now() < deadline, "n1 did not come back: {n1}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn cronjobs_fire_on_schedule() {
    let (_up, kc, _kubelet) = cluster_with_deployment("4");
    let bad = "apiVersion: batch/v1\nkind: CronJob\nmetadata:\n  name: bad\n  namespace: default\nspec:\n  schedule: \"61 * * * *\"\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers:\n          - {name: c, image: x}\n";
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(bad));
    assert!(!good && err.contains("spec.schedule"), "an invalid schedule is refused: {err}");
    // Every minute: the first run comes within 60 s.
    let cj = bad.replace("name: bad", "name: tick").replace("61 * * * *", "* * * * *");
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(&cj));
    assert!(good, "{err}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let jobs = json_of(&kc, &["get", "jobs"]);
        let done = jobs["items"].as_array().unwrap().iter().any(|j| {
            j["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("tick-"))
                && j["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == "Complete")
        });
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "no run of the CronJob completed: {jobs}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let cj = json_of(&kc, &["get", "cronjob", "tick"]);
    assert!(cj["status"]["lastScheduleTime"].is_string(), "{cj}");
    // Kubernetes' events on the CronJob: the run created, then seen completed.
    let on_tick = |e: &Value, reason: &str| e["reason"] == reason && e["involvedObject"]["name"] == "tick";
    let created = wait_event(&kc, "default", 30, "SuccessfulCreate on tick", |e| on_tick(e, "SuccessfulCreate"));
    let job =
        created["message"].as_str().unwrap().strip_prefix("Created job ").expect("Created job <name>").to_string();
    assert!(job.starts_with("tick-"), "{created}");
    let seen = wait_event(&kc, "default", 60, "SawCompletedJob", |e| on_tick(e, "SawCompletedJob"));
    assert!(seen["message"].as_str().unwrap().ends_with(", condition: Complete"), "{seen}");
    let completed = wait_event(&kc, "default", 30, "the Job's Completed", |e| {
        e["reason"] == "Completed" && e["involvedObject"]["name"] == job.as_str()
    });
    assert_eq!(
        (&completed["message"], &completed["source"]["component"]),
        (&json!("Job completed"), &json!("job-controller"))
    );
    // Each run is named by its minute, and the status names the latest.
    let jobs = json_of(&kc, &["get", "jobs"]);
    let times: Vec<&str> = jobs["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|j| j["metadata"]["annotations"]["batch.kubernetes.io/cronjob-scheduled-timestamp"].as_str())
        .collect();
    assert!(!times.is_empty());
    let latest = times.iter().max().unwrap();
    let cj = json_of(&kc, &["get", "cronjob", "tick"]);
    assert!(cj["status"]["lastScheduleTime"].as_str().unwrap() >= *latest, "{cj}");
}

const STATEFULSET: &str = "apiVersion: v1
kind: Service
metadata:
  name: db
  namespace: default
spec:
  clusterIP: None
  selector: {app: db}
  ports:
  - {port: 5432}
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: db
  namespace: default
spec:
  serviceName: db
  replicas: 3
  podManagementPolicy: OrderedReady
  selector:
    matchLabels: {app: db}
  template:
    metadata:
      labels: {app: db}
    spec:
      containers:
      - name: db
        image: registry.local/db:1
";

/// Pod watch events (`kubectl get -w`), in the order the API sent them.
struct PodWatch {
    child: std::process::Child,
    events: Arc<std::sync::Mutex<Vec<Value>>>,
}

impl PodWatch {
    fn start(kc: &Path, selector: &str) -> PodWatch {
        let mut child = Command::new("kubectl")
            .args(["get", "pods", "-l", selector, "--watch", "--output-watch-events", "-o", "json"])
            .env("KUBECONFIG", kc)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (out, into) = (child.stdout.take().unwrap(), events.clone());
        std::thread::spawn(move || {
            for ev in serde_json::Deserializer::from_reader(out).into_iter::<Value>() {
                match ev {
                    Ok(ev) => into.lock().unwrap().push(ev),
                    Err(_) => return,
                }
            }
        });
        PodWatch { child, events }
    }

    fn len(&self) -> usize {
        self.events.lock().unwrap().len()
    }

    /// Events from index `from` on: (type, pod name, image, running and
    /// ready, being deleted).
    fn since(&self, from: usize) -> Vec<(String, String, String, bool, bool)> {
        self.events.lock().unwrap()[from..]
            .iter()
            .map(|e| {
                let p = &e["object"];
                let ready = p["status"]["phase"] == "Running"
                    && p["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True");
                (
                    e["type"].as_str().unwrap_or_default().to_string(),
                    p["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                    p["spec"]["containers"][0]["image"].as_str().unwrap_or_default().to_string(),
                    ready,
                    p["metadata"]["deletionTimestamp"].is_string(),
                )
            })
            .collect()
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Index of the first event matching `f`, with a message if none does.
fn first(
    evs: &[(String, String, String, bool, bool)],
    what: &str,
    f: impl Fn(&(String, String, String, bool, bool)) -> bool,
) -> usize {
    evs.iter().position(f).unwrap_or_else(|| panic!("no event where {what}: {evs:?}"))
}

/// `(field at path, first image)` of the pods `selector` picks that are not
/// being deleted, sorted.
fn live_pods(kc: &Path, selector: &str, path: &[&str]) -> Vec<(String, String)> {
    let pods = json_of(kc, &["get", "pods", "-l", selector]);
    let mut out: Vec<(String, String)> = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| !p["metadata"]["deletionTimestamp"].is_string())
        .map(|p| {
            let field = path.iter().fold(p, |v, k| &v[*k]);
            (field.as_str().unwrap().to_string(), p["spec"]["containers"][0]["image"].as_str().unwrap().to_string())
        })
        .collect();
    out.sort();
    out
}

/// `(name, image)` of the live pods of `app=db`, by name.
fn db_pods(kc: &Path) -> Vec<(String, String)> {
    live_pods(kc, "app=db", &["metadata", "name"])
}

fn wait_for_db_pods(kc: &Path, want: &[(&str, &str)], secs: u64) {
    let want: Vec<(String, String)> = want.iter().map(|(n, i)| (n.to_string(), i.to_string())).collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let have = db_pods(kc);
        if have == want {
            return;
        }
        assert!(Instant::now() < deadline, "pods never became {want:?}: {have:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn statefulsets_start_in_order_and_update_from_the_top() {
    let up = common::up(1);
    let kc = up.dir.path().join("kubeconfig");
    let _kubelet = nodes_with_kubelet(&kc, &["n1", "n2"], "4");
    let watch = PodWatch::start(&kc, "app=db");
    std::thread::sleep(Duration::from_secs(1));
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(STATEFULSET));
    assert!(good, "{err}");
    ok(&kc, &["rollout", "status", "sts/db", "--timeout=90s"]);
    let (v1, v2) = ("registry.local/db:1", "registry.local/db:2");
    assert_eq!(
        db_pods(&kc),
        [("db-0".to_string(), v1.to_string()), ("db-1".into(), v1.into()), ("db-2".into(), v1.into())]
    );

    // OrderedReady: db-i is created only after db-(i-1) was Running and Ready.
    let evs = watch.since(0);
    let added = |name: &str| first(&evs, &format!("{name} is added"), |e| e.0 == "ADDED" && e.1 == name);
    let (a0, a1, a2) = (added("db-0"), added("db-1"), added("db-2"));
    assert!(a0 < a1 && a1 < a2, "creation order: {evs:?}");
    for pod in ["db-0", "db-1", "db-2"] {
        let msg = format!("create Pod {pod} in StatefulSet db successful");
        let e = wait_event(&kc, "default", 30, &msg, |e| e["reason"] == "SuccessfulCreate" && e["message"] == msg);
        assert_eq!(
            (&e["involvedObject"]["kind"], &e["source"]["component"]),
            (&json!("StatefulSet"), &json!("statefulset-controller"))
        );
    }
    for (prev, at) in [("db-0", a1), ("db-1", a2)] {
        let ready_at = first(&evs, &format!("{prev} is ready"), |e| e.1 == prev && e.3);
        assert!(ready_at < at, "{prev} was not ready before its successor was created: {evs:?}");
    }
    let p = json_of(&kc, &["get", "pod", "db-1"]);
    assert_eq!(p["spec"]["hostname"], "db-1");
    assert_eq!(p["spec"]["subdomain"], "db");
    assert_eq!(p["metadata"]["labels"]["statefulset.kubernetes.io/pod-name"], "db-1");
    assert_eq!(p["metadata"]["labels"]["apps.kubernetes.io/pod-index"], "1");
    let s = json_of(&kc, &["get", "sts", "db"]);
    let rev1 = s["status"]["updateRevision"].as_str().unwrap().to_string();
    assert_eq!(s["status"]["currentRevision"], json!(rev1));
    assert_eq!(p["metadata"]["labels"]["controller-revision-hash"], json!(rev1));
    assert_eq!((s["status"]["readyReplicas"].as_i64(), s["status"]["updatedReplicas"].as_i64()), (Some(3), Some(3)));

    // A new image with partition 1: db-2 then db-1 are replaced, db-0 stays.
    let mark = watch.len();
    let patch = json!({"spec": {"updateStrategy": {"rollingUpdate": {"partition": 1}},
        "template": {"spec": {"containers": [{"name": "db", "image": v2}]}}}});
    ok(&kc, &["patch", "sts", "db", "-p", &patch.to_string()]);
    ok(&kc, &["rollout", "status", "sts/db", "--timeout=90s"]);
    wait_for_db_pods(&kc, &[("db-0", v1), ("db-1", v2), ("db-2", v2)], 30);
    let evs = watch.since(mark);
    let going = |name: &str| first(&evs, &format!("{name} is deleted"), |e| e.1 == name && (e.4 || e.0 == "DELETED"));
    let back_ready = |name: &str| first(&evs, &format!("new {name} is ready"), |e| e.1 == name && e.2 == v2 && e.3);
    assert!(going("db-2") < back_ready("db-2"), "{evs:?}");
    assert!(back_ready("db-2") < going("db-1"), "db-1 was replaced before the new db-2 was ready: {evs:?}");
    assert!(!evs.iter().any(|e| e.1 == "db-0" && (e.4 || e.0 == "DELETED")), "db-0 is below the partition: {evs:?}");
    let s = json_of(&kc, &["get", "sts", "db"]);
    let rev2 = s["status"]["updateRevision"].as_str().unwrap().to_string();
    assert_ne!(rev1, rev2);
    assert_eq!(s["status"]["currentRevision"], json!(rev1), "the partition keeps db-0 at the old revision");
    assert_eq!((s["status"]["updatedReplicas"].as_i64(), s["status"]["currentReplicas"].as_i64()), (Some(2), Some(1)));

    // Undo: the first revision's template again, renumbered 3.
    ok(&kc, &["rollout", "undo", "sts/db"]);
    wait_for_db_pods(&kc, &[("db-0", v1), ("db-1", v1), ("db-2", v1)], 90);
    let revs = json_of(&kc, &["get", "controllerrevisions", "-l", "app=db"]);
    let mut numbers: Vec<(String, i64)> = revs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["metadata"]["name"].as_str().unwrap().to_string(), r["revision"].as_i64().unwrap()))
        .collect();
    numbers.sort();
    let mut want = vec![(rev1.clone(), 3), (rev2.clone(), 2)];
    want.sort();
    assert_eq!(numbers, want);
    let history = ok(&kc, &["rollout", "history", "sts/db"]);
    assert!(history.contains('2') && history.contains('3'), "{history}");

    // Scale to 1: db-2 goes, and only then db-1.
    let mark = watch.len();
    ok(&kc, &["scale", "sts", "db", "--replicas=1"]);
    wait_for_db_pods(&kc, &[("db-0", v1)], 60);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !watch.since(mark).iter().any(|e| e.0 == "DELETED" && e.1 == "db-1") {
        assert!(Instant::now() < deadline, "db-1 never deleted: {:?}", watch.since(mark));
        std::thread::sleep(Duration::from_millis(100));
    }
    let evs = watch.since(mark);
    let gone2 = first(&evs, "db-2 is gone", |e| e.0 == "DELETED" && e.1 == "db-2");
    let going1 = first(&evs, "db-1 is deleted", |e| e.1 == "db-1" && (e.4 || e.0 == "DELETED"));
    assert!(gone2 < going1, "db-1 was deleted before db-2 was gone: {evs:?}");
    eprintln!("statefulset: {} pod events watched", watch.len());
    let s = json_of(&kc, &["get", "sts", "db"]);
    assert_eq!((s["status"]["replicas"].as_i64(), s["status"]["readyReplicas"].as_i64()), (Some(1), Some(1)));

    // Orphaned, then applied again: db-0 and the revisions are adopted, not
    // replaced, and the set grows back from db-1.
    let uid0 = json_of(&kc, &["get", "pod", "db-0"])["metadata"]["uid"].clone();
    ok(&kc, &["delete", "sts", "db", "--cascade=orphan"]);
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(STATEFULSET));
    assert!(good, "{err}");
    ok(&kc, &["rollout", "status", "sts/db", "--timeout=90s"]);
    wait_for_db_pods(&kc, &[("db-0", v1), ("db-1", v1), ("db-2", v1)], 30);
    let s = json_of(&kc, &["get", "sts", "db"]);
    let p0 = json_of(&kc, &["get", "pod", "db-0"]);
    assert_eq!(p0["metadata"]["uid"], uid0, "db-0 was adopted, not recreated");
    assert_eq!(p0["metadata"]["ownerReferences"][0]["uid"], s["metadata"]["uid"]);
    assert_eq!(s["status"]["updateRevision"], json!(rev1), "the adopted revision, no new one");
    assert_eq!(s["status"]["collisionCount"].as_i64().unwrap_or(0), 0);
}

/// Waits until `check` holds for `kubectl get pods -n <ns> -l <selector>`.
fn wait_pods(
    kc: &Path,
    ns: &str,
    selector: &str,
    secs: u64,
    what: &str,
    check: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let items = |list: &Value| list["items"].as_array().cloned().unwrap_or_default();
    let list = common::wait_json(kc, &["get", "pods", "-n", ns, "-l", selector], secs, what, |l| check(&items(l)));
    items(&list)
}

fn node_of(p: &Value) -> String {
    p["spec"]["nodeName"].as_str().unwrap_or_default().to_string()
}

fn scheduled_message(p: &Value) -> String {
    p["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "PodScheduled")
        .map(|c| c["message"].as_str().unwrap_or_default().to_string())
        .unwrap_or_default()
}

const SPREAD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: spread, namespace: sched}
spec:
  replicas: 3
  selector: {matchLabels: {app: spread}}
  template:
    metadata: {labels: {app: spread}}
    spec:
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - labelSelector: {matchLabels: {app: spread}}
            topologyKey: kubernetes.io/hostname
      containers:
      - name: app
        image: registry.local/app:1.0
        resources: {requests: {cpu: 100m, memory: 64Mi}}
"#;

const PRIORITIES: &str = r#"
apiVersion: scheduling.k8s.io/v1
kind: PriorityClass
metadata: {name: high}
value: 1000
description: "evicts the fillers"
---
apiVersion: v1
kind: Pod
metadata: {name: important, namespace: sched, labels: {app: important}}
spec:
  priorityClassName: high
  containers:
  - name: app
    image: registry.local/app:1.0
    resources: {requests: {cpu: 1500m, memory: 64Mi}}
"#;

/// Anti-affinity spreads a Deployment one pod per node, and a pod that
/// fits nowhere says why; cordon and drain move pods off a node through
/// the eviction API; a high-priority pod preempts low-priority ones.
#[test]
fn the_scheduler_spreads_drains_and_preempts() {
    let up = common::up(3);
    let kc = up.dir.path().join("kubeconfig");
    let kubelet = nodes_with_kubelet(&kc, &["n1", "n2", "n3"], "2");
    ok(&kc, &["create", "namespace", "sched"]);

    // Required anti-affinity: one pod per node, and a fourth has nowhere to go.
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(SPREAD));
    assert!(good, "{err}");
    ok(&kc, &["rollout", "status", "deploy/spread", "-n", "sched", "--timeout=60s"]);
    let pods = wait_pods(&kc, "sched", "app=spread", 30, "three spread pods", |p| p.len() == 3);
    let mut nodes: Vec<String> = pods.iter().map(node_of).collect();
    nodes.sort();
    assert_eq!(nodes, ["n1", "n2", "n3"], "one pod per node");
    ok(&kc, &["scale", "deploy/spread", "-n", "sched", "--replicas=4"]);
    let pods = wait_pods(&kc, "sched", "app=spread", 30, "the fourth pod's reason", |p| {
        p.iter().any(|p| node_of(p).is_empty() && !scheduled_message(p).is_empty())
    });
    let pending = pods.iter().find(|p| node_of(p).is_empty()).unwrap();
    assert_eq!(scheduled_message(pending), "0/3 nodes are available: 3 node(s) didn't match pod anti-affinity rules.");

    // Cordon + drain n3: its pod is evicted; the pending fourth cannot use n3 either.
    ok(&kc, &["cordon", "n3"]);
    let node = json_of(&kc, &["get", "node", "n3"]);
    assert_eq!(node["spec"]["unschedulable"], true);
    ok(&kc, &["drain", "n3", "--ignore-daemonsets", "--delete-emptydir-data", "--timeout=60s"]);
    let pods = wait_pods(&kc, "sched", "app=spread", 30, "n3 empty, its pod replaced", |p| {
        p.iter().all(|p| node_of(p) != "n3") && p.iter().filter(|p| node_of(p).is_empty()).count() == 2
    });
    for p in pods.iter().filter(|p| node_of(p).is_empty()) {
        let why = scheduled_message(p);
        assert!(why.contains("2 node(s) didn't match pod anti-affinity rules"), "{why}");
        assert!(why.contains("1 node(s) were unschedulable"), "{why}");
    }
    ok(&kc, &["uncordon", "n3"]);
    wait_pods(&kc, "sched", "app=spread", 30, "a pod back on n3", |p| p.iter().any(|p| node_of(p) == "n3"));
    ok(&kc, &["delete", "deploy/spread", "-n", "sched", "--wait=false"]);
    wait_pods(&kc, "sched", "app=spread", 30, "the spread pods gone", |p| p.is_empty());

    // Fill every node's 2 CPUs with low-priority pods, then ask for 1.5 CPUs at priority 1000.
    for i in 0..6 {
        let filler = format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: filler-{i}, namespace: sched, labels: {{app: filler}}}}\nspec:\n  containers:\n  - name: app\n    image: registry.local/app:1.0\n    resources: {{requests: {{cpu: 900m, memory: 64Mi}}}}\n"
        );
        let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(&filler));
        assert!(good, "{err}");
    }
    wait_pods(&kc, "sched", "app=filler", 30, "six fillers placed", |p| {
        p.len() == 6 && p.iter().all(|p| !node_of(p).is_empty())
    });
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(PRIORITIES));
    assert!(good, "{err}");
    let important = wait_pods(&kc, "sched", "app=important", 60, "the important pod bound", |p| {
        p.len() == 1 && !node_of(&p[0]).is_empty()
    });
    let p = &important[0];
    assert_eq!(p["spec"]["priority"], 1000);
    assert_eq!(p["spec"]["preemptionPolicy"], "PreemptLowerPriority");
    assert_eq!(p["status"]["nominatedNodeName"], p["spec"]["nodeName"], "nominated where it was placed");
    let fillers = wait_pods(&kc, "sched", "app=filler", 30, "two fillers gone", |p| p.len() == 4);
    let preempted = wait_event(&kc, "sched", 30, "Preempted", |e| e["reason"] == "Preempted");
    let by = format!("Preempted by pod {} on node {}", p["metadata"]["uid"].as_str().unwrap(), node_of(p));
    assert_eq!(preempted["message"], by);
    assert!(preempted["involvedObject"]["name"].as_str().unwrap().starts_with("filler-"), "{preempted}");
    assert!(
        fillers.iter().filter(|f| node_of(f) == node_of(p)).count() == 0,
        "both fillers on the important pod's node were preempted"
    );

    // Priority admission: a class that does not exist, a priority the pod may not state.
    let (good, _, err) = kubectl(
        &kc,
        &[
            "run",
            "nope",
            "-n",
            "sched",
            "--image=registry.local/app:1.0",
            "--overrides",
            r#"{"spec": {"priorityClassName": "missing"}}"#,
        ],
        None,
    );
    assert!(!good);
    assert!(err.contains("no PriorityClass with name missing was found"), "{err}");
    let (good, _, err) = kubectl(
        &kc,
        &[
            "run",
            "liar",
            "-n",
            "sched",
            "--image=registry.local/app:1.0",
            "--overrides",
            r#"{"spec": {"priority": 5}}"#,
        ],
        None,
    );
    assert!(!good);
    assert!(err.contains("must not be provided in pod spec"), "{err}");
    let table = ok(&kc, &["get", "priorityclass"]);
    assert!(table.contains("system-node-critical") && table.contains("2000001000"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("high") && l.contains("1000")), "{table}");
    drop(kubelet);
}

/// Waits until the events of namespace `ns` hold one `check` accepts.
fn wait_event(kc: &Path, ns: &str, secs: u64, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let list = json_of(kc, &["get", "events", "-n", ns]);
        if let Some(e) = list["items"].as_array().into_iter().flatten().find(|e| check(e)) {
            return e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            serde_json::to_string_pretty(&list["items"]).unwrap()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

const EVENTFUL: &str = "apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: ev}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers:
      - name: app
        image: registry.local/web:1
        resources: {requests: {cpu: 100m, memory: 64Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: stuck, namespace: ev}
spec:
  nodeSelector: {disk: ssd}
  containers:
  - name: app
    image: registry.local/web:1
";

/// A rollout leaves Kubernetes' events behind — on the Deployment, its
/// ReplicaSet and each pod — that `kubectl get events` and `kubectl
/// describe` show; they expire with the event TTL; and an event repeated
/// (an unschedulable pod retried) is one Event counting its repeats.
#[test]
fn controllers_and_the_scheduler_record_events() {
    let up = common::up(1);
    let kc = up.dir.path().join("kubeconfig");
    let kubelet = nodes_with_kubelet(&kc, &["n1"], "4");
    ok(&kc, &["create", "namespace", "ev"]);
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(EVENTFUL));
    assert!(good, "{err}");
    ok(&kc, &["rollout", "status", "deploy/web", "-n", "ev", "--timeout=60s"]);
    let rs = json_of(&kc, &["get", "rs", "-n", "ev", "-l", "app=web"]);
    let rs_name = rs["items"][0]["metadata"]["name"].as_str().unwrap().to_string();
    let rs_uid = rs["items"][0]["metadata"]["uid"].clone();
    let pods = wait_pods(&kc, "ev", "app=web", 30, "two web pods", |p| p.len() == 2);

    let is = |e: &Value, reason: &str, kind: &str, name: &str| {
        e["reason"] == reason && e["involvedObject"]["kind"] == kind && e["involvedObject"]["name"] == name
    };
    let scaled = wait_event(&kc, "ev", 30, "ScalingReplicaSet", |e| is(e, "ScalingReplicaSet", "Deployment", "web"));
    assert_eq!(scaled["message"], format!("Scaled up replica set {rs_name} from 0 to 2"));
    assert_eq!(scaled["type"], "Normal");
    assert_eq!(scaled["source"]["component"], "deployment-controller");
    assert_eq!(scaled["involvedObject"]["apiVersion"], "apps/v1");
    assert_eq!(scaled["involvedObject"]["namespace"], "ev");
    assert_eq!(scaled["count"], 1);
    for p in &pods {
        let pod = p["metadata"]["name"].as_str().unwrap();
        let created = wait_event(&kc, "ev", 30, "SuccessfulCreate", |e| {
            is(e, "SuccessfulCreate", "ReplicaSet", &rs_name) && e["message"] == format!("Created pod: {pod}")
        });
        assert_eq!(created["involvedObject"]["uid"], rs_uid);
        assert_eq!(created["source"]["component"], "replicaset-controller");
        let scheduled = wait_event(&kc, "ev", 30, "Scheduled", |e| is(e, "Scheduled", "Pod", pod));
        assert_eq!(scheduled["message"], format!("Successfully assigned ev/{pod} to n1"));
        assert_eq!(scheduled["involvedObject"]["uid"], p["metadata"]["uid"]);
        assert_eq!(scheduled["source"]["component"], "default-scheduler");
        assert!(scheduled["firstTimestamp"].is_string() && scheduled["lastTimestamp"].is_string(), "{scheduled}");
    }

    // The table kubectl prints, and the Events section of describe.
    let pod = pods[0]["metadata"]["name"].as_str().unwrap();
    let table = ok(&kc, &["get", "events", "-n", "ev"]);
    let header = table.lines().next().unwrap_or_default().split_whitespace().collect::<Vec<_>>().join(" ");
    assert_eq!(header, "LAST SEEN TYPE REASON OBJECT MESSAGE", "{table}");
    let row = table.lines().find(|l| l.contains(&format!("pod/{pod}")) && l.contains("Scheduled"));
    let row = row.unwrap_or_else(|| panic!("no Scheduled row for {pod}: {table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..4], ["Normal", "Scheduled", &format!("pod/{pod}")], "{row}");
    assert!(row.ends_with(&format!("Successfully assigned ev/{pod} to n1")), "{row}");
    assert!(table.contains("deployment/web") && table.contains(&format!("replicaset/{rs_name}")), "{table}");
    let wide = ok(&kc, &["get", "events", "-n", "ev", "-o", "wide"]);
    assert!(wide.contains("SOURCE") && wide.contains("COUNT") && wide.contains("default-scheduler"), "{wide}");
    let described = ok(&kc, &["describe", "pod", pod, "-n", "ev"]);
    let events = described.split("Events:").nth(1).unwrap_or_else(|| panic!("no Events section: {described}"));
    assert!(
        events.lines().any(|l| l.contains("Normal")
            && l.contains("Scheduled")
            && l.contains("default-scheduler")
            && l.contains(&format!("Successfully assigned ev/{pod} to n1"))),
        "{events}"
    );
    let described = ok(&kc, &["describe", "deploy", "web", "-n", "ev"]);
    assert!(described.contains(&format!("Scaled up replica set {rs_name} from 0 to 2")), "{described}");

    // Written in-process, Events still go on the event lease (1 h TTL).
    let name = scaled["metadata"]["name"].as_str().unwrap();
    let got: Value = serde_json::from_str(&common::etcdctl(
        &up,
        &["get", &format!("/registry/core/events/ev/{name}"), "-w", "json"],
    ))
    .unwrap();
    let lease = got["kvs"][0]["lease"].as_i64().expect("the event's key has a lease");
    let ttl = common::etcdctl(&up, &["lease", "timetolive", &format!("{lease:x}")]);
    let secs: i64 =
        ttl.split("remaining(").nth(1).and_then(|r| r.split('s').next()).and_then(|n| n.parse().ok()).expect(&ttl);
    assert!((3500..=3660).contains(&secs), "{ttl}");

    // The pod that fits nowhere: each retry (a node change) says the same,
    // and it is one Event whose count goes up.
    let why = "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.";
    let failed = wait_event(&kc, "ev", 30, "FailedScheduling", |e| is(e, "FailedScheduling", "Pod", "stuck"));
    assert_eq!(failed["type"], "Warning");
    assert!(failed["message"].as_str().unwrap().starts_with(why), "{failed}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut tick = 0;
    let repeated = loop {
        tick += 1;
        ok(&kc, &["label", "node", "n1", &format!("tick={tick}"), "--overwrite"]);
        std::thread::sleep(Duration::from_millis(1500));
        let list = json_of(&kc, &["get", "events", "-n", "ev", "--field-selector", "involvedObject.name=stuck"]);
        let items: Vec<Value> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["reason"] == "FailedScheduling")
            .cloned()
            .collect();
        assert_eq!(items.len(), 1, "one Event for the repeats: {items:?}");
        if items[0]["count"].as_i64().unwrap_or(0) >= 3 {
            break items[0].clone();
        }
        assert!(Instant::now() < deadline, "FailedScheduling never repeated: {items:?}");
    };
    assert_eq!(repeated["metadata"]["name"], failed["metadata"]["name"]);
    assert_eq!(repeated["firstTimestamp"], failed["firstTimestamp"]);
    assert!(repeated["lastTimestamp"].as_str() >= failed["lastTimestamp"].as_str(), "{repeated}");
    let described = ok(&kc, &["describe", "pod", "stuck", "-n", "ev"]);
    let events = described.split("Events:").nth(1).unwrap_or_default();
    let line = events.lines().find(|l| l.contains("FailedScheduling")).unwrap_or_else(|| panic!("{described}"));
    assert!(line.contains("Warning") && line.contains(" (x") && line.contains(why), "{line}");

    // The recorder's counts.
    let (code, body) = common::http_get(&format!("{}/metrics", common::metrics_url(&up, 0))).unwrap();
    assert_eq!(code, 200);
    let count = |result: &str| -> f64 {
        let series = format!("capstan_events_recorded_total{{result=\"{result}\"}} ");
        let line = body.lines().find(|l| l.starts_with(&series)).unwrap_or_else(|| panic!("no {series}"));
        line[series.len()..].trim().parse().unwrap()
    };
    assert!(count("written") >= 6.0 && count("aggregated") >= 2.0, "{}", count("written"));
    assert_eq!((count("dropped"), count("failed")), (0.0, 0.0));
    drop(kubelet);
}
