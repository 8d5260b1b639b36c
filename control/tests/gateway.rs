//! The node gateway with hollow nodes (`capstan-node --runtime sim`): the
//! join, the node authorizer (a node reads and writes only what its pods
//! need), relayed exec, and an agent moving to another master when its
//! master dies.

mod common;

use capstan_node::conn::{self, Masters};
use capstan_proto::nodewire::{AgentEvent, NodeRequest, NodeResponse, PodFrame, MAX_FRAME};
use common::{json_of, kubectl, node_addr, node_token, ok, wait_for};
use serde_json::json;

/// Which master's node gateway holds `node`'s connection.
/// The gateway holding `node`'s connection, as recorded in the store
/// (None while etcdctl cannot read it, e.g. right after a master died).
fn holder(up: &common::Up, node: &str) -> Option<String> {
    let key = format!("/capstan/gateway/nodes/{node}");
    common::etcdctl_try(up, &["get", &key, "--print-value-only"]).ok().map(|v| v.trim().to_string())
}

const WORKLOAD: &str = r#"
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: s3cr3t}
---
apiVersion: v1
kind: Secret
metadata: {name: unrelated}
stringData: {password: other}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: shared}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Mi}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: hollow}
spec:
  replicas: 2
  selector: {matchLabels: {app: hollow}}
  template:
    metadata: {labels: {app: hollow}}
    spec:
      nodeSelector: {kubernetes.io/hostname: sim-a}
      containers:
      - name: c
        image: busybox:stable
        env:
        - name: PASSWORD
          valueFrom: {secretKeyRef: {name: creds, key: password}}
      volumes:
      - name: data
        persistentVolumeClaim: {claimName: shared}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_are_confined_to_their_own_pods_and_move_when_their_master_dies() {
    let up = common::up(3);
    let kc = up.dir.path().join("kubeconfig");
    let token = node_token(&up);
    // master-2 first, so kubectl (master-1) reaches the agent through a relay.
    let servers = [node_addr(&up, 1), node_addr(&up, 0), node_addr(&up, 2)];
    let _agent = common::SimAgent::start(&up, "sim-a", &servers);
    wait_for(60, "sim-a to be Ready", || {
        let (good, out, _) = kubectl(
            &kc,
            &["get", "node", "sim-a", "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"],
            None,
        );
        Some(()).filter(|_| good && out == "True")
    });
    let node = json_of(&kc, &["get", "node", "sim-a"]);
    wait_for(30, "sim-a's Starting event", || {
        Some(()).filter(|_| ok(&kc, &["describe", "node", "sim-a"]).contains("Starting node agent on sim-a"))
    });
    assert!(node["spec"]["podCIDR"].as_str().is_some_and(|c| c.ends_with("/24")));
    assert_eq!(node["metadata"]["labels"]["capstan.io/runtime"], "sim");
    assert!(json_of(&kc, &["get", "lease", "-n", "kube-node-lease", "sim-a"])["spec"]["renewTime"].is_string());

    // Its pods run (the Secret in their env is readable by their node).
    let (good, _, err) = kubectl(&kc, &["apply", "-f", "-"], Some(WORKLOAD));
    assert!(good, "{err}");
    ok(&kc, &["rollout", "status", "deploy/hollow", "--timeout=60s"]);
    let pods = json_of(&kc, &["get", "pods", "-l", "app=hollow"]);
    let pod = pods["items"][0].clone();
    let pod_name = pod["metadata"]["name"].as_str().unwrap().to_string();
    assert!(pod["status"]["podIP"].as_str().is_some());

    // exec reaches the agent through the master that holds its connection.
    assert_eq!(holder(&up, "sim-a"), Some(node_addr(&up, 1)));
    assert_eq!(ok(&kc, &["exec", &pod_name, "--", "echo", "relayed"]).trim(), "echo relayed");

    // A second node is confined to itself.
    let evil_dir = tempfile::tempdir().unwrap();
    // The same token with the CA pin's last hex digit changed.
    let last = if token.ends_with('0') { '1' } else { '0' };
    let bad = format!("{}{last}", &token[..token.len() - 1]);
    let started = std::time::Instant::now();
    let refused = conn::join(evil_dir.path(), &[node_addr(&up, 0)], &bad, "evil").await.unwrap_err();
    assert!(format!("{refused:#}").contains("CA the token pins"), "{refused:#}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "a wrong CA pin fails at once, not after retries");
    let wrong_secret = {
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[2] = "00000000000000000000000000000000";
        parts.join(".")
    };
    let err = conn::join(evil_dir.path(), &[node_addr(&up, 0)], &wrong_secret, "evil").await.unwrap_err();
    assert!(format!("{err:#}").contains("join refused"), "{err:#}");
    let id = conn::join(evil_dir.path(), &[node_addr(&up, 0)], &token, "evil").await.unwrap();
    let evil = Masters::new(&id).unwrap();
    let denied = |r: NodeResponse| matches!(r, NodeResponse::Error { code: 403, .. });
    let other_node = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "sim-a"}});
    let r = evil.request(&NodeRequest::Register { node: other_node.to_string().into_bytes() }).await.unwrap();
    assert!(denied(r.clone()), "registering as another node: {r:?}");
    let read =
        |name: &str| NodeRequest::Get { resource: "secrets".into(), namespace: "default".into(), name: name.into() };
    let r = evil.request(&read("creds")).await.unwrap();
    assert!(denied(r.clone()), "another node's pod's secret: {r:?}");
    let r = evil.request(&read("unrelated")).await.unwrap();
    assert!(denied(r.clone()), "a secret no pod of it uses: {r:?}");
    let r = evil
        .request(&NodeRequest::Get { resource: "pods".into(), namespace: "default".into(), name: pod_name.clone() })
        .await
        .unwrap();
    assert!(denied(r), "nodes read pods only through their watch");
    // Nor another node's claims and volumes; a volume that does not exist
    // is NotFound (what its agent's reclaimer needs to know).
    let claim = wait_for(30, "the shared claim to be bound", || {
        Some(json_of(&kc, &["get", "pvc", "shared"])).filter(|c| c["status"]["phase"] == "Bound")
    });
    let volume = claim["spec"]["volumeName"].as_str().unwrap().to_string();
    let get = |resource: &str, namespace: &str, name: &str| NodeRequest::Get {
        resource: resource.into(),
        namespace: namespace.into(),
        name: name.into(),
    };
    let r = evil.request(&get("persistentvolumeclaims", "default", "shared")).await.unwrap();
    assert!(denied(r.clone()), "another node's pod's claim: {r:?}");
    let r = evil.request(&get("persistentvolumes", "", &volume)).await.unwrap();
    assert!(denied(r.clone()), "a volume pinned to another node: {r:?}");
    let r = evil.request(&get("persistentvolumes", "", "pvc-none")).await.unwrap();
    assert!(matches!(r, NodeResponse::Error { code: 404, .. }), "{r:?}");
    let status = NodeRequest::PodStatus {
        namespace: "default".into(),
        name: pod_name.clone(),
        uid: pod["metadata"]["uid"].as_str().unwrap().into(),
        status: br#"{"phase":"Failed"}"#.to_vec(),
    };
    let r = evil.request(&status).await.unwrap();
    assert!(denied(r.clone()), "writing another node's pod's status: {r:?}");
    assert_eq!(json_of(&kc, &["get", "pod", &pod_name])["status"]["phase"], "Running");
    let lie = AgentEvent {
        namespace: "default".into(),
        pod: pod_name.clone(),
        uid: pod["metadata"]["uid"].as_str().unwrap().into(),
        container: None,
        warning: true,
        reason: "Forged".into(),
        message: "another node's pod".into(),
    };
    let r = evil.request(&NodeRequest::Events { events: vec![lie.clone()] }).await.unwrap();
    assert!(denied(r.clone()), "events about another node's pod: {r:?}");
    let bad = AgentEvent { reason: "not a reason".into(), ..lie };
    let r = evil.request(&NodeRequest::Events { events: vec![bad] }).await.unwrap();
    assert!(matches!(r, NodeResponse::Error { code: 400, .. }), "a malformed event: {r:?}");
    // The real node's events are there, as the kubelet's (the forged one is not).
    let events = wait_for(30, "sim-a's Started event", || {
        let events = json_of(&kc, &["get", "events", "--field-selector", &format!("involvedObject.name={pod_name}")]);
        let items = events["items"].as_array()?.clone();
        items.iter().any(|e| e["reason"] == "Started").then_some(items)
    });
    let started = events.iter().find(|e| e["reason"] == "Started").unwrap();
    assert_eq!(started["source"], json!({"component": "kubelet", "host": "sim-a"}));
    assert!(events.iter().all(|e| e["reason"] != "Forged"));
    let mut watch = evil.watch_pods().await.unwrap();
    let frame = capstan_proto::nodewire::read_frame(&mut watch, MAX_FRAME).await.unwrap().unwrap();
    let frame = PodFrame::decode(&frame).unwrap();
    assert!(frame.reset && frame.events.is_empty(), "evil sees no pods: {} events", frame.events.len());

    // The agent's master dies: it moves to another and keeps working.
    let before = holder(&up, "sim-a").unwrap();
    up.kill9(1);
    let after = wait_for(30, "sim-a to move", || holder(&up, "sim-a").filter(|h| *h != before));
    assert_ne!(after, before);
    ok(&kc, &["scale", "deploy/hollow", "--replicas=4"]);
    ok(&kc, &["rollout", "status", "deploy/hollow", "--timeout=60s"]);
    assert_eq!(ok(&kc, &["exec", &pod_name, "--", "echo", "moved"]).trim(), "echo moved");
}
