use super::*;
use crate::api::storage::builtin_class;

fn claim(name: &str, size: &str, class: Option<&str>, extra: Value) -> Value {
    let mut c = json!({"metadata": {"name": name, "namespace": "d", "uid": format!("uid-{name}"),
            "finalizers": [PVC_PROTECTION]},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}},
        "status": {"phase": "Pending"}});
    if let Some(class) = class {
        c["spec"]["storageClassName"] = json!(class);
    }
    json_patch::merge(&mut c, &extra);
    c
}

fn volume(name: &str, size: &str, extra: Value) -> Value {
    let mut v = json!({"metadata": {"name": name, "finalizers": [PV_PROTECTION]},
        "spec": {"accessModes": ["ReadWriteOnce", "ReadOnlyMany"], "capacity": {"storage": size},
            "hostPath": {"path": format!("/srv/{name}")}, "persistentVolumeReclaimPolicy": "Retain"},
        "status": {"phase": "Available"}});
    json_patch::merge(&mut v, &extra);
    v
}

fn node(name: &str, root: Option<&str>) -> Value {
    let mut n = json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}});
    if let Some(r) = root {
        n["metadata"]["annotations"] = json!({LOCAL_PATH_ROOT: r});
    }
    n
}

fn world<'a>(
    pvc: &'a Value,
    volumes: &'a [Value],
    class: Option<&'a Value>,
    node: Option<&'a Value>,
) -> ClaimWorld<'a> {
    ClaimWorld { pvc, volumes, class, node, in_use: false }
}

#[test]
fn a_claim_binds_the_smallest_volume_that_fits() {
    let pvc = claim("data", "2Gi", Some(""), json!({}));
    let volumes = [
        volume("big", "10Gi", json!({})),
        volume("small", "1Gi", json!({})),
        volume("right", "3Gi", json!({})),
        volume("classy", "2Gi", json!({"spec": {"storageClassName": "fast"}})),
        volume("taken", "2Gi", json!({"spec": {"claimRef": {"namespace": "d", "name": "other", "uid": "x"}}})),
        volume("rwx-only", "2Gi", json!({"spec": {"accessModes": ["ReadWriteMany"]}})),
        volume("block", "2Gi", json!({"spec": {"volumeMode": "Block"}})),
        volume("released", "2Gi", json!({"status": {"phase": "Released"}})),
    ];
    assert_eq!(plan_claim(&world(&pvc, &volumes, None, None)), ClaimStep::ClaimVolume("right".into()));
    // A selector narrows the choice to labelled volumes.
    let picky = claim("data", "2Gi", Some(""), json!({"spec": {"selector": {"matchLabels": {"tier": "gold"}}}}));
    let mut labelled = volumes.to_vec();
    labelled.push(volume("gold", "8Gi", json!({"metadata": {"labels": {"tier": "gold"}}})));
    assert_eq!(plan_claim(&world(&picky, &labelled, None, None)), ClaimStep::ClaimVolume("gold".into()));
    // Nothing fits and no class: it waits, saying why.
    let huge = claim("data", "1Ti", Some(""), json!({}));
    let step = plan_claim(&world(&huge, &volumes, None, None));
    assert!(matches!(&step, ClaimStep::Wait { reason: "FailedBinding", .. }), "{step:?}");
}

#[test]
fn binding_is_volume_first_then_claim_then_status() {
    let pvc = claim("data", "1Gi", Some(""), json!({}));
    let free = volume("pv1", "1Gi", json!({}));
    assert_eq!(plan_claim(&world(&pvc, std::slice::from_ref(&free), None, None)), ClaimStep::ClaimVolume("pv1".into()));
    // The volume names the claim: the claim names the volume.
    let claimed =
        volume("pv1", "1Gi", json!({"spec": {"claimRef": {"namespace": "d", "name": "data", "uid": "uid-data"}}}));
    let volumes = [claimed.clone()];
    assert_eq!(plan_claim(&world(&pvc, &volumes, None, None)), ClaimStep::NameVolume("pv1".into()));
    assert_eq!(plan_volume(&claimed, Some(&pvc)), VolumeStep::Nothing, "Available until the claim names it");
    // Both sides: the claim's status, then the volume's.
    let named = claim("data", "1Gi", Some(""), json!({"spec": {"volumeName": "pv1"}}));
    let ClaimStep::Status(st) = plan_claim(&world(&named, &volumes, None, None)) else { panic!() };
    assert_eq!(
        st,
        json!({"phase": "Bound", "accessModes": ["ReadWriteOnce", "ReadOnlyMany"], "capacity": {"storage": "1Gi"}})
    );
    assert_eq!(plan_volume(&claimed, Some(&named)), VolumeStep::Status(json!({"phase": "Bound"})));
    let mut done = named.clone();
    done["status"] = st;
    assert_eq!(plan_claim(&world(&done, &volumes, None, None)), ClaimStep::Nothing, "idempotent");
    // Pre-bound by an administrator by name only: the uid is written first.
    let by_name = volume("pv1", "1Gi", json!({"spec": {"claimRef": {"namespace": "d", "name": "data"}}}));
    assert_eq!(
        plan_claim(&world(&pvc, std::slice::from_ref(&by_name), None, None)),
        ClaimStep::ClaimVolume("pv1".into())
    );
    assert_eq!(plan_claim(&world(&named, &[by_name], None, None)), ClaimStep::ClaimVolume("pv1".into()));
    // A claim made anew under the same name is another claim.
    let again = claim("data", "1Gi", Some(""), json!({"metadata": {"uid": "uid-new"}}));
    assert!(!refers_to(&claimed, &again));
}

#[test]
fn a_claim_naming_a_volume_takes_it_or_says_why_not() {
    let pvc = claim("data", "1Gi", Some(""), json!({"spec": {"volumeName": "pv1"}}));
    let free = volume("pv1", "1Gi", json!({}));
    assert_eq!(plan_claim(&world(&pvc, &[free], None, None)), ClaimStep::ClaimVolume("pv1".into()));
    let other = volume("pv1", "1Gi", json!({"spec": {"claimRef": {"namespace": "d", "name": "x", "uid": "ux"}}}));
    let step = plan_claim(&world(&pvc, std::slice::from_ref(&other), None, None));
    assert!(matches!(&step, ClaimStep::Wait { warning: true, .. }), "{step:?}");
    let step = plan_claim(&world(&pvc, &[], None, None));
    assert!(matches!(&step, ClaimStep::Wait { reason: "FailedBinding", .. }), "{step:?}");
    // Once bound, losing the volume is Lost.
    let bound = claim(
        "data",
        "1Gi",
        Some(""),
        json!({"spec": {"volumeName": "pv1"},
        "metadata": {"annotations": {BIND_COMPLETED: "yes"}}, "status": {"phase": "Bound"}}),
    );
    assert_eq!(plan_claim(&world(&bound, &[], None, None)), ClaimStep::Status(json!({"phase": "Lost"})));
    assert_eq!(plan_claim(&world(&bound, &[other], None, None)), ClaimStep::Status(json!({"phase": "Lost"})));
}

#[test]
fn local_path_waits_for_the_first_consumer_then_provisions_on_its_node() {
    let class = builtin_class();
    let pvc = claim("data", "1Gi", Some("local-path"), json!({}));
    let step = plan_claim(&world(&pvc, &[], Some(&class), None));
    assert!(matches!(&step, ClaimStep::Wait { warning: false, reason: "WaitForFirstConsumer", .. }), "{step:?}");

    let picked = claim("data", "1Gi", Some("local-path"), json!({"metadata": {"annotations": {SELECTED_NODE: "n1"}}}));
    let n1 = node("n1", Some("/var/lib/capstan/local-path/"));
    let ClaimStep::Provision(pv) = plan_claim(&world(&picked, &[], Some(&class), Some(&n1))) else { panic!() };
    assert_eq!(pv["metadata"]["name"], "pvc-uid-data");
    assert_eq!(pv["spec"]["hostPath"]["path"], "/var/lib/capstan/local-path/pvc-uid-data_d_data");
    assert_eq!(pv["spec"]["hostPath"]["type"], "DirectoryOrCreate");
    assert_eq!(pv["spec"]["persistentVolumeReclaimPolicy"], "Delete");
    assert_eq!(pv["spec"]["storageClassName"], "local-path");
    assert_eq!(pv["spec"]["capacity"]["storage"], "1Gi");
    assert!(refers_to(&pv, &picked));
    assert!(volume_admits(&pv, &NodeInfo::new(&n1)));
    assert!(!volume_admits(&pv, &NodeInfo::new(&node("n2", None))));
    // Valid as the API server validates volumes.
    let mut errs = Vec::new();
    crate::api::storage::validate("PersistentVolume", &pv, &mut errs);
    assert!(errs.is_empty(), "{errs:?}");

    // The provisioned volume is pre-bound: the claim names it next.
    let mut made = pv.clone();
    made["status"] = json!({"phase": "Pending"});
    assert_eq!(
        plan_claim(&world(&picked, &[made], Some(&class), Some(&n1))),
        ClaimStep::NameVolume("pvc-uid-data".into())
    );

    // A static volume on the chosen node is preferred to provisioning; one elsewhere is not taken.
    let on = |n: &str| {
        volume(
            &format!("static-{n}"),
            "5Gi",
            json!({"spec": {"storageClassName": "local-path", "nodeAffinity": {"required": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [n]}]}]}}}}),
        )
    };
    let step = plan_claim(&world(&picked, &[on("n2"), on("n1")], Some(&class), Some(&n1)));
    assert_eq!(step, ClaimStep::ClaimVolume("static-n1".into()));
    assert!(matches!(plan_claim(&world(&picked, &[on("n2")], Some(&class), Some(&n1))), ClaimStep::Provision(_)));
}

#[test]
fn provisioning_refusals_say_why() {
    let class = builtin_class();
    let ann = json!({"metadata": {"annotations": {SELECTED_NODE: "n1"}}});
    let picked = claim("data", "1Gi", Some("local-path"), ann.clone());
    let why = |pvc: &Value, class: Option<&Value>, node: Option<&Value>| match plan_claim(&world(pvc, &[], class, node))
    {
        ClaimStep::Wait { warning: true, message, .. } => message,
        other => panic!("{other:?}"),
    };
    assert!(why(&picked, Some(&class), Some(&node("n1", None))).contains("has no local-path directory"));
    assert!(why(&picked, Some(&class), None).contains("\"n1\" does not exist"));
    let mut rwx = picked.clone();
    rwx["spec"]["accessModes"] = json!(["ReadWriteMany"]);
    assert!(why(&rwx, Some(&class), Some(&node("n1", Some("/x")))).contains("ReadWriteMany is not supported"));
    let mut immediate = class.clone();
    immediate["volumeBindingMode"] = json!("Immediate");
    let plain = claim("data", "1Gi", Some("local-path"), json!({}));
    assert!(why(&plain, Some(&immediate), None).contains("needs volumeBindingMode WaitForFirstConsumer"));
    let missing = claim("data", "1Gi", Some("gold"), json!({}));
    assert!(why(&missing, None, None).contains("storageclass.storage.k8s.io \"gold\" not found"));
    let external =
        json!({"metadata": {"name": "ebs"}, "provisioner": "ebs.csi.aws.com", "volumeBindingMode": "Immediate"});
    let ebs = claim("data", "1Gi", Some("ebs"), json!({}));
    let step = plan_claim(&world(&ebs, &[], Some(&external), None));
    assert!(matches!(&step, ClaimStep::Wait { warning: false, reason: "ExternalProvisioning", .. }), "{step:?}");
}

#[test]
fn released_volumes_are_reclaimed_by_policy() {
    let claimed = |policy: &str, phase: &str| {
        volume(
            "pv1",
            "1Gi",
            json!({"spec": {"persistentVolumeReclaimPolicy": policy,
            "claimRef": {"namespace": "d", "name": "data", "uid": "uid-data"}}, "status": {"phase": phase}}),
        )
    };
    // The claim is gone: Released first, then the policy.
    assert_eq!(plan_volume(&claimed("Delete", "Bound"), None), VolumeStep::Status(json!({"phase": "Released"})));
    assert_eq!(plan_volume(&claimed("Delete", "Released"), None), VolumeStep::Delete);
    assert_eq!(plan_volume(&claimed("Retain", "Released"), None), VolumeStep::Nothing);
    let VolumeStep::Status(st) = plan_volume(&claimed("Recycle", "Released"), None) else { panic!() };
    assert_eq!(st["phase"], "Failed");
    assert_eq!(plan_volume(&claimed("Recycle", "Failed"), None), VolumeStep::Nothing);
    // A claim of the same name but another uid does not hold it.
    let newer = claim("data", "1Gi", Some(""), json!({"metadata": {"uid": "other"}}));
    assert_eq!(
        plan_volume(&claimed("Retain", "Bound"), Some(&newer)),
        VolumeStep::Status(json!({"phase": "Released"}))
    );
    // Pre-bound by an administrator to a claim still to come: Available.
    let prebound = volume(
        "pv2",
        "1Gi",
        json!({"spec": {"claimRef": {"namespace": "d", "name": "later"}}, "status": {"phase": "Pending"}}),
    );
    assert_eq!(plan_volume(&prebound, None), VolumeStep::Status(json!({"phase": "Available"})));
}

#[test]
fn protection_holds_claims_in_use_and_bound_volumes() {
    let mut pvc = claim("data", "1Gi", Some(""), json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}));
    let mut w = world(&pvc, &[], None, None);
    w.in_use = true;
    assert_eq!(plan_claim(&w), ClaimStep::Nothing, "a pod still uses it");
    w.in_use = false;
    assert_eq!(plan_claim(&w), ClaimStep::Release);
    pvc["metadata"]["finalizers"] = json!([]);
    assert_eq!(plan_claim(&world(&pvc, &[], None, None)), ClaimStep::Nothing);

    let bound_claim = claim("data", "1Gi", Some(""), json!({"spec": {"volumeName": "pv1"}}));
    let pv = volume(
        "pv1",
        "1Gi",
        json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"claimRef": {"namespace": "d", "name": "data", "uid": "uid-data"}}, "status": {"phase": "Bound"}}),
    );
    assert_eq!(plan_volume(&pv, Some(&bound_claim)), VolumeStep::Nothing, "bound: kept");
    assert_eq!(plan_volume(&pv, None), VolumeStep::Release, "its claim gone: it may go");
}

#[test]
fn pods_name_their_claims() {
    let pod = json!({"metadata": {"name": "web-0", "namespace": "d"}, "spec": {"volumes": [
        {"name": "data", "persistentVolumeClaim": {"claimName": "data-web-0"}},
        {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}},
        {"name": "cfg", "configMap": {"name": "c"}},
    ]}});
    assert_eq!(pod_claims(&pod), ["data-web-0", "web-0-scratch"]);
}
