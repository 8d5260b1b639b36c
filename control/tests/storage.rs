//! PersistentVolumes, PersistentVolumeClaims and StorageClasses against a
//! real `capstan up` cluster, driven by kubectl: the default `local-path`
//! class, static binding, the scheduler's volume rules, StatefulSet claims,
//! generic ephemeral volumes, protection and reclaiming. Nodes are Node
//! objects played by the test kubelet (`common/kubelet.rs`); each announces
//! a local-path directory as its agent would. (Containers writing to these
//! volumes: `nodes.rs`.)

mod common;

use std::path::Path;

use serde_json::{json, Value};

use common::kubelet::nodes_with_kubelet;
use common::{json_of, kubectl, ok, wait_for};

const LOCAL_PATH_ROOT: &str = "capstan.io/local-path-root";

fn apply(kc: &Path, yaml: &str) {
    let (good, _, err) = kubectl(kc, &["apply", "-f", "-"], Some(yaml));
    assert!(good, "{err}");
}

/// The object, once `check` holds for it.
fn wait_object(kc: &Path, args: &[&str], what: &str, check: impl Fn(&Value) -> bool) -> Value {
    common::wait_json(kc, args, 60, what, check)
}

fn gone(kc: &Path, args: &[&str], what: &str) {
    wait_for(60, what, || {
        let (good, _, err) = kubectl(kc, args, None);
        (!good && err.contains("NotFound")).then_some(())
    });
}

const STATEFULSET: &str = "apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db}
spec:
  serviceName: db
  replicas: 2
  selector: {matchLabels: {app: db}}
  persistentVolumeClaimRetentionPolicy: {whenDeleted: Delete, whenScaled: Retain}
  template:
    metadata: {labels: {app: db}}
    spec:
      containers:
      - name: db
        image: registry.local/db:1
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 1Gi}}
";

#[test]
fn claims_bind_provision_follow_their_pods_and_are_reclaimed() {
    let up = common::up(1);
    let kc = up.dir.path().join("kubeconfig");
    let _kubelet = nodes_with_kubelet(&kc, &["n1", "n2"], "4");
    for n in ["n1", "n2"] {
        ok(&kc, &["annotate", "node", n, &format!("{LOCAL_PATH_ROOT}=/var/lib/capstan-test/{n}/local-path")]);
    }

    // Every cluster has the default class, shown as kubectl shows it.
    let sc = ok(&kc, &["get", "storageclass"]);
    let row = sc.lines().find(|l| l.starts_with("local-path")).unwrap_or_else(|| panic!("{sc}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cols[..6],
        ["local-path", "(default)", "capstan.io/local-path", "Delete", "WaitForFirstConsumer", "false"]
    );

    // Bad claims are refused with Kubernetes' reasons; nothing is stored.
    let (good, _, err) = kubectl(
        &kc,
        &["apply", "-f", "-"],
        Some("apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: bad}\nspec: {accessModes: [Sideways]}\n"),
    );
    assert!(!good);
    assert!(err.contains("spec.accessModes: Unsupported value: \"Sideways\""), "{err}");
    assert!(err.contains("spec.resources[storage]: Required value"), "{err}");
    gone(&kc, &["get", "pvc", "bad"], "the refused claim");

    // A static volume binds a claim of no class that fits it.
    apply(
        &kc,
        "apiVersion: v1
kind: PersistentVolume
metadata: {name: static-1, labels: {disk: ssd}}
spec:
  capacity: {storage: 5Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: ''
  hostPath: {path: /srv/static-1}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: logs}
spec:
  storageClassName: ''
  accessModes: [ReadWriteOnce]
  selector: {matchLabels: {disk: ssd}}
  resources: {requests: {storage: 2Gi}}
",
    );
    let pvc = wait_object(&kc, &["get", "pvc", "logs"], "logs bound", |c| c["status"]["phase"] == "Bound");
    assert_eq!(pvc["spec"]["volumeName"], "static-1");
    assert_eq!(pvc["status"]["capacity"]["storage"], "5Gi", "the volume's size, not the request");
    let pv = wait_object(&kc, &["get", "pv", "static-1"], "static-1 bound", |v| v["status"]["phase"] == "Bound");
    assert_eq!(pv["spec"]["claimRef"]["name"], "logs");
    let pvs = ok(&kc, &["get", "pv", "static-1"]);
    assert!(pvs.contains("RWO") && pvs.contains("default/logs") && pvs.contains("Bound"), "{pvs}");
    let (good, _, err) =
        kubectl(&kc, &["patch", "pv", "static-1", "-p", r#"{"spec":{"hostPath":{"path":"/elsewhere"}}}"#], None);
    assert!(!good && err.contains("spec.persistentvolumesource is immutable"), "{err}");

    // A pod naming a claim that does not exist waits, saying so; the claim
    // made, it is scheduled.
    apply(
        &kc,
        "apiVersion: v1
kind: Pod
metadata: {name: reader}
spec:
  containers: [{name: c, image: registry.local/r:1}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: later}}]
",
    );
    let msg = "0/2 nodes are available: persistentvolumeclaim \"later\" not found.";
    wait_object(&kc, &["get", "pod", "reader"], "reader unschedulable", |p| {
        p["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["message"] == msg)
    });
    apply(
        &kc,
        "apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: later}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 100Mi}}
",
    );
    let claim = json_of(&kc, &["get", "pvc", "later"]);
    assert_eq!(claim["spec"]["storageClassName"], "local-path", "the default class");
    let reader = wait_object(&kc, &["get", "pod", "reader"], "reader scheduled", |p| p["spec"]["nodeName"].is_string());
    let node = reader["spec"]["nodeName"].as_str().unwrap().to_string();
    // The scheduler chose the node; the volume was provisioned there.
    let claim = wait_object(&kc, &["get", "pvc", "later"], "later bound", |c| c["status"]["phase"] == "Bound");
    assert_eq!(claim["metadata"]["annotations"]["volume.kubernetes.io/selected-node"], json!(node));
    let volume = claim["spec"]["volumeName"].as_str().unwrap().to_string();
    assert_eq!(volume, format!("pvc-{}", claim["metadata"]["uid"].as_str().unwrap()));
    let pv = json_of(&kc, &["get", "pv", &volume]);
    assert_eq!(
        pv["spec"]["hostPath"]["path"],
        json!(format!("/var/lib/capstan-test/{node}/local-path/{volume}_default_later"))
    );
    let terms = &pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0];
    assert_eq!(terms["values"], json!([node]));

    // Protection: the claim in use stays (Terminating) until its pod goes;
    // then the provisioned volume is released and deleted (policy Delete).
    ok(&kc, &["delete", "pvc", "later", "--wait=false"]);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let claim = json_of(&kc, &["get", "pvc", "later"]);
    assert!(claim["metadata"]["deletionTimestamp"].is_string());
    assert!(ok(&kc, &["get", "pvc", "later"]).contains("Terminating"));
    ok(&kc, &["delete", "pod", "reader", "--wait=false"]);
    gone(&kc, &["get", "pvc", "later"], "the claim once its pod is gone");
    gone(&kc, &["get", "pv", &volume], "the provisioned volume, reclaimed");

    // A StatefulSet: a claim per pod, each pod where its volume is; a
    // replaced pod goes back to its node and its claim.
    apply(&kc, STATEFULSET);
    ok(&kc, &["rollout", "status", "sts/db", "--timeout=90s"]);
    let mut placed = Vec::new();
    for i in 0..2 {
        let pod = json_of(&kc, &["get", "pod", &format!("db-{i}")]);
        let claim = wait_object(&kc, &["get", "pvc", &format!("data-db-{i}")], "sts claim bound", |c| {
            c["status"]["phase"] == "Bound"
        });
        assert_eq!(claim["metadata"]["labels"]["app"], "db");
        assert_eq!(claim["metadata"]["ownerReferences"][0]["kind"], "StatefulSet", "whenDeleted: Delete");
        let vols = pod["spec"]["volumes"].as_array().unwrap();
        assert!(vols.iter().any(|v| v["persistentVolumeClaim"]["claimName"] == format!("data-db-{i}")), "{vols:?}");
        let pv = json_of(&kc, &["get", "pv", claim["spec"]["volumeName"].as_str().unwrap()]);
        let on =
            pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0].clone();
        assert_eq!(pod["spec"]["nodeName"], on, "db-{i} runs where its volume is");
        placed.push((pod["metadata"]["uid"].clone(), on, claim["metadata"]["uid"].clone()));
    }
    // Deleted, db-0 comes back to its volume's node and its claim.
    ok(&kc, &["delete", "pod", "db-0"]);
    let back = wait_object(&kc, &["get", "pod", "db-0"], "db-0 back", |p| {
        p["metadata"]["uid"] != placed[0].0 && p["spec"]["nodeName"].is_string()
    });
    assert_eq!(back["spec"]["nodeName"], placed[0].1, "a replaced pod returns to its volume");
    assert_eq!(json_of(&kc, &["get", "pvc", "data-db-0"])["metadata"]["uid"], placed[0].2, "and to its claim");

    // Deleting the set deletes its claims (whenDeleted: Delete), and their volumes.
    let volumes: Vec<String> = (0..2)
        .map(|i| {
            json_of(&kc, &["get", "pvc", &format!("data-db-{i}")])["spec"]["volumeName"].as_str().unwrap().to_string()
        })
        .collect();
    ok(&kc, &["delete", "sts", "db", "--wait=false"]);
    for i in 0..2 {
        gone(&kc, &["get", "pvc", &format!("data-db-{i}")], "the set's claims");
    }
    for v in &volumes {
        gone(&kc, &["get", "pv", v], "the set's volumes");
    }
    // A generic ephemeral volume: a claim made for the pod, gone with it.
    apply(
        &kc,
        "apiVersion: v1
kind: Pod
metadata: {name: scratchy}
spec:
  containers: [{name: c, image: registry.local/r:1}]
  volumes:
  - name: scratch
    ephemeral:
      volumeClaimTemplate:
        spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 10Mi}}}
",
    );
    let claim = wait_object(&kc, &["get", "pvc", "scratchy-scratch"], "the ephemeral claim bound", |c| {
        c["status"]["phase"] == "Bound"
    });
    assert_eq!(claim["metadata"]["ownerReferences"][0]["name"], "scratchy");
    wait_object(&kc, &["get", "pod", "scratchy"], "scratchy scheduled", |p| p["spec"]["nodeName"].is_string());
    let volume = claim["spec"]["volumeName"].as_str().unwrap().to_string();
    ok(&kc, &["delete", "pod", "scratchy", "--wait=false"]);
    gone(&kc, &["get", "pvc", "scratchy-scratch"], "the ephemeral claim, with its pod");
    gone(&kc, &["get", "pv", &volume], "the ephemeral claim's volume");

    // Deleting a namespace (made by `kubectl create ns`, whose spec is
    // empty) deletes its pods and claims, and so the claims' volumes.
    ok(&kc, &["create", "namespace", "scratch"]);
    apply(
        &kc,
        "apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: tmp, namespace: scratch}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 10Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: user, namespace: scratch}
spec:
  containers: [{name: c, image: registry.local/r:1}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: tmp}}]
",
    );
    let claim = wait_object(&kc, &["get", "pvc", "tmp", "-n", "scratch"], "the scratch claim bound", |c| {
        c["status"]["phase"] == "Bound"
    });
    let volume = claim["spec"]["volumeName"].as_str().unwrap().to_string();
    ok(&kc, &["delete", "namespace", "scratch", "--wait=false"]);
    gone(&kc, &["get", "namespace", "scratch"], "the namespace, emptied");
    gone(&kc, &["get", "pv", &volume], "the volume of the namespace's claim");

    // The static volume's claim outlives all that; deleting it releases the
    // volume, which Retain keeps.
    ok(&kc, &["delete", "pvc", "logs"]);
    wait_object(&kc, &["get", "pv", "static-1"], "static-1 released", |v| v["status"]["phase"] == "Released");
}
