//! The pure StatefulSet plan, stepped against a simulated kubelet.

use super::*;

const READY_AT: &str = "2026-01-01T00:00:00Z";

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn later() -> DateTime<Utc> {
    t("2026-01-01T01:00:00Z")
}

fn sts(replicas: i64, image: &str) -> Value {
    json!({"metadata": {"name": "web", "namespace": "d", "uid": "s1", "generation": 1},
        "spec": {"replicas": replicas, "serviceName": "web-svc", "podManagementPolicy": "OrderedReady",
          "revisionHistoryLimit": 10, "selector": {"matchLabels": {"app": "web"}},
          "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
          "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": image}]}}}})
}

fn running(mut p: Value) -> Value {
    p["spec"]["nodeName"] = json!("n1");
    p["status"] = json!({"phase": "Running",
        "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": READY_AT}]});
    p
}

fn names(pods: &[Value]) -> Vec<String> {
    pods.iter().map(|p| name_of(p).to_string()).collect()
}

/// The set, the pods and revisions it controls, and what happened to them.
struct World {
    sts: Value,
    pods: Vec<Value>,
    revisions: Vec<Value>,
    /// "create web-0@<revision>", "delete web-2", in order.
    log: Vec<String>,
}

impl World {
    fn new(sts: Value) -> World {
        World { sts, pods: vec![], revisions: vec![], log: vec![] }
    }

    /// One reconcile: the plan carried out as the shell would.
    fn step(&mut self) -> Plan {
        let p = plan(&self.sts, &self.pods, &self.revisions, &[], later());
        if let Some(r) = &p.create_revision {
            self.revisions.push(r.clone());
        }
        if let Some((name, n)) = &p.renumber_revision {
            let r = self.revisions.iter_mut().find(|r| name_of(r) == name).unwrap();
            r["revision"] = json!(n);
        }
        for c in &p.create {
            self.log.push(format!("create {}@{}", name_of(c), pod_revision(c)));
            let mut pod = c.clone();
            pod["status"] = json!({"phase": "Pending"});
            self.pods.push(pod);
        }
        for d in &p.delete {
            self.log.push(format!("delete {d}"));
            let pod = self.pods.iter_mut().find(|p| name_of(p) == d).unwrap();
            pod["metadata"]["deletionTimestamp"] = json!(READY_AT);
        }
        self.revisions.retain(|r| !p.prune_revisions.iter().any(|n| n == name_of(r)));
        self.sts["status"] = p.status.clone();
        p
    }

    /// The kubelet: pods being deleted go, new ones run and turn Ready.
    fn kubelet(&mut self) {
        self.pods.retain(|p| !terminating(p));
        for p in self.pods.iter_mut() {
            if p["status"]["phase"] == "Pending" {
                *p = running(p.clone());
            }
        }
    }

    /// Steps until nothing changes.
    fn settle(&mut self) {
        for _ in 0..100 {
            let p = self.step();
            self.kubelet();
            if p.create.is_empty() && p.delete.is_empty() && p.create_revision.is_none() {
                return;
            }
        }
        panic!("never settled: {:?}", self.log);
    }

    fn image(&self, pod: &str) -> String {
        let p = self.pods.iter().find(|p| name_of(p) == pod).unwrap();
        p["spec"]["containers"][0]["image"].as_str().unwrap().to_string()
    }
}

#[test]
fn ordered_ready_creates_the_next_ordinal_only_when_the_previous_is_ready() {
    let mut w = World::new(sts(3, "v1"));
    let p = w.step();
    assert!(p.create_revision.is_some(), "the first revision is recorded");
    assert_eq!(names(&p.create), ["web-0"]);
    let pod = &p.create[0];
    assert_eq!(pod["spec"]["hostname"], "web-0");
    assert_eq!(pod["spec"]["subdomain"], "web-svc");
    assert_eq!(pod["metadata"]["labels"][POD_NAME_LABEL], "web-0");
    assert_eq!(pod["metadata"]["labels"][POD_INDEX_LABEL], "0");
    assert_eq!(pod["metadata"]["labels"]["app"], "web");
    assert_eq!(pod["metadata"]["labels"][HASH_LABEL], name_of(p.create_revision.as_ref().unwrap()));
    assert_eq!(pod["metadata"]["ownerReferences"][0]["uid"], "s1");
    assert_eq!(pod["metadata"]["ownerReferences"][0]["controller"], true);
    // web-0 exists but is not Running and Ready: nothing more.
    let p = w.step();
    assert!(p.create.is_empty() && p.create_revision.is_none(), "{:?}", p.create);
    // Ready: web-1 follows, then web-2.
    w.kubelet();
    assert_eq!(names(&w.step().create), ["web-1"]);
    w.kubelet();
    assert_eq!(names(&w.step().create), ["web-2"]);
    w.kubelet();
    let p = w.step();
    assert!(p.create.is_empty() && p.delete.is_empty());
    assert_eq!(p.status["readyReplicas"], 3);
    assert_eq!(p.status["currentRevision"], p.status["updateRevision"]);
}

#[test]
fn min_ready_seconds_hold_the_next_ordinal_and_ask_for_a_look_later() {
    let mut s = sts(2, "v1");
    s["spec"]["minReadySeconds"] = json!(10);
    let mut w = World::new(s);
    w.step();
    w.kubelet();
    let p = plan(&w.sts, &w.pods, &w.revisions, &[], t(READY_AT) + chrono::Duration::seconds(4));
    assert!(p.create.is_empty(), "web-0 is Ready but not yet available");
    let d = p.requeue.expect("a look when web-0 becomes available");
    assert!(d > Duration::from_secs(5) && d < Duration::from_secs(7), "{d:?}");
    assert_eq!(p.status["availableReplicas"], 0);
    let p = plan(&w.sts, &w.pods, &w.revisions, &[], t(READY_AT) + chrono::Duration::seconds(11));
    assert_eq!(names(&p.create), ["web-1"]);
    assert_eq!(p.status["availableReplicas"], 1);
}

#[test]
fn parallel_creates_and_removes_without_waiting() {
    let mut s = sts(3, "v1");
    s["spec"]["podManagementPolicy"] = json!("Parallel");
    let mut w = World::new(s);
    assert_eq!(names(&w.step().create), ["web-0", "web-1", "web-2"]);
    w.kubelet();
    w.sts["spec"]["replicas"] = json!(1);
    let mut deleted = w.step().delete;
    deleted.sort();
    assert_eq!(deleted, ["web-1", "web-2"]);
}

#[test]
fn scale_down_removes_the_highest_ordinal_first_one_at_a_time() {
    let mut w = World::new(sts(4, "v1"));
    w.settle();
    w.log.clear();
    w.sts["spec"]["replicas"] = json!(2);
    assert_eq!(w.step().delete, ["web-3"]);
    // web-3 is still terminating: web-2 waits for it to be gone.
    assert!(w.step().delete.is_empty());
    w.kubelet();
    assert_eq!(w.step().delete, ["web-2"]);
    w.kubelet();
    assert!(w.step().delete.is_empty());
    assert_eq!(w.log, ["delete web-3", "delete web-2"]);
    assert_eq!(names(&w.pods), ["web-0", "web-1"]);
}

#[test]
fn rolling_update_goes_from_the_top_down_to_the_partition() {
    let mut w = World::new(sts(3, "v1"));
    w.settle();
    let v1 = w.sts["status"]["updateRevision"].as_str().unwrap().to_string();
    w.log.clear();
    w.sts["spec"]["template"]["spec"]["containers"][0]["image"] = json!("v2");
    w.sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"] = json!(1);
    w.sts["metadata"]["generation"] = json!(2);
    w.settle();
    let v2 = w.sts["status"]["updateRevision"].as_str().unwrap().to_string();
    assert_ne!(v1, v2);
    assert_eq!(
        w.log,
        [
            "delete web-2".to_string(),
            format!("create web-2@{v2}"),
            "delete web-1".to_string(),
            format!("create web-1@{v2}"),
        ]
    );
    assert_eq!((w.image("web-0"), w.image("web-1"), w.image("web-2")), ("v1".into(), "v2".into(), "v2".into()));
    let st = &w.sts["status"];
    assert_eq!((st["updatedReplicas"].as_i64(), st["currentReplicas"].as_i64()), (Some(2), Some(1)));
    assert_eq!(st["currentRevision"], json!(v1), "the partition holds the rollout short of complete");
    assert_eq!(st["observedGeneration"], 2);
    // A recreated pod below the partition keeps the current revision.
    w.pods.retain(|p| name_of(p) != "web-0");
    w.log.clear();
    w.settle();
    assert_eq!(w.log, [format!("create web-0@{v1}")]);
    assert_eq!(w.image("web-0"), "v1");
    // Partition 0: web-0 follows and the update revision becomes current.
    w.sts["spec"]["updateStrategy"]["rollingUpdate"]["partition"] = json!(0);
    w.settle();
    assert_eq!(w.image("web-0"), "v2");
    let p = w.step();
    assert_eq!(p.status["currentRevision"], json!(v2));
    assert_eq!(p.status["currentReplicas"], 3);
}

#[test]
fn a_rolling_update_waits_for_each_replaced_pod_to_be_ready() {
    let mut w = World::new(sts(3, "v1"));
    w.settle();
    w.sts["spec"]["template"]["spec"]["containers"][0]["image"] = json!("v2");
    assert_eq!(w.step().delete, ["web-2"]);
    w.kubelet(); // web-2 gone
    assert_eq!(names(&w.step().create), ["web-2"]);
    // web-2 is new but Pending: nothing else is replaced.
    let p = w.step();
    assert!(p.delete.is_empty() && p.create.is_empty(), "{:?}", p.delete);
    w.kubelet();
    assert_eq!(w.step().delete, ["web-1"]);
}

#[test]
fn on_delete_only_recreates_deleted_pods_at_the_new_revision() {
    let mut s = sts(2, "v1");
    s["spec"]["updateStrategy"] = json!({"type": "OnDelete"});
    let mut w = World::new(s);
    w.settle();
    w.sts["spec"]["template"]["spec"]["containers"][0]["image"] = json!("v2");
    w.log.clear();
    w.settle();
    assert!(w.log.is_empty(), "nothing replaced by the controller: {:?}", w.log);
    assert_eq!(w.sts["status"]["updatedReplicas"], 0);
    w.pods.retain(|p| name_of(p) != "web-1");
    w.settle();
    assert_eq!((w.image("web-0"), w.image("web-1")), ("v1".into(), "v2".into()));
    assert_eq!(w.sts["status"]["updatedReplicas"], 1);
    assert_eq!(w.sts["status"]["currentReplicas"], 1);
}

#[test]
fn failed_pods_are_deleted_and_recreated() {
    let mut w = World::new(sts(3, "v1"));
    w.settle();
    w.log.clear();
    let p1 = w.pods.iter_mut().find(|p| name_of(p) == "web-1").unwrap();
    p1["status"]["phase"] = json!("Failed");
    w.settle();
    let rev = w.sts["status"]["updateRevision"].as_str().unwrap().to_string();
    assert_eq!(w.log, ["delete web-1".to_string(), format!("create web-1@{rev}")]);
    assert_eq!(w.sts["status"]["readyReplicas"], 3);
}

#[test]
fn status_counts_ready_available_current_and_updated_pods() {
    let mut s = sts(4, "v2");
    s["spec"]["minReadySeconds"] = json!(30);
    let old_rev = new_revision(&sts(4, "v1"), &revision_name("web", &sts(4, "v1")["spec"]["template"], 0), 1);
    let new_rev = new_revision(&s, &revision_name("web", &s["spec"]["template"], 0), 2);
    let (old, new) = (name_of(&old_rev).to_string(), name_of(&new_rev).to_string());
    s["status"] = json!({"currentRevision": old});
    let now = t(READY_AT) + chrono::Duration::seconds(60);
    let mut fresh = running(pod_for(&s, &s["spec"]["template"], &new, 3));
    fresh["status"]["conditions"][0]["lastTransitionTime"] = json!(now.to_rfc3339());
    let mut leaving = running(pod_for(&s, &s["spec"]["template"], &new, 2));
    leaving["metadata"]["deletionTimestamp"] = json!(READY_AT);
    let pods = [
        running(pod_for(&s, &sts(4, "v1")["spec"]["template"], &old, 0)),
        pod_for(&s, &sts(4, "v1")["spec"]["template"], &old, 1), // no status: not ready
        leaving,
        fresh,
    ];
    let p = plan(&s, &pods, &[old_rev, new_rev], &[], now);
    let st = &p.status;
    assert_eq!(st["replicas"], 4);
    assert_eq!(st["readyReplicas"], 3);
    assert_eq!(st["availableReplicas"], 2, "web-3 has been ready for 0 s of 30");
    assert_eq!(st["currentReplicas"], 2);
    assert_eq!(st["updatedReplicas"], 1, "terminating pods are neither current nor updated");
    assert_eq!((st["currentRevision"].as_str(), st["updateRevision"].as_str()), (Some(&*old), Some(&*new)));
    assert_eq!(st["collisionCount"], 0);
    assert!(p.create_revision.is_none() && p.renumber_revision.is_none());
}

#[test]
fn undo_renumbers_the_old_revision_and_history_is_pruned() {
    let mut w = World::new(sts(1, "v1"));
    w.settle();
    let v1 = w.sts["status"]["updateRevision"].as_str().unwrap().to_string();
    w.sts["spec"]["template"]["spec"]["containers"][0]["image"] = json!("v2");
    w.settle();
    // `kubectl rollout undo` applies the old revision's data as a strategic
    // merge patch: the template is v1's again.
    let rev1 = w.revisions.iter().find(|r| name_of(r) == v1).unwrap().clone();
    assert_eq!(rev1["data"]["spec"]["template"]["$patch"], "replace");
    w.sts["spec"]["template"] = revision_template(&rev1);
    let p = w.step();
    assert_eq!(p.renumber_revision, Some((v1.clone(), 3)));
    assert!(p.create_revision.is_none());
    assert_eq!(p.status["updateRevision"], json!(v1));
    w.kubelet();
    w.settle();
    assert_eq!(w.image("web-0"), "v1");
    assert_eq!(w.revisions.len(), 2);
    // History limit 0: the revision no pod uses goes.
    w.sts["spec"]["revisionHistoryLimit"] = json!(0);
    let p = w.step();
    assert_eq!(p.prune_revisions.len(), 1);
    assert_ne!(p.prune_revisions[0], v1);
}

#[test]
fn a_name_taken_by_another_template_counts_a_collision() {
    let s = sts(1, "v2");
    let name = revision_name("web", &s["spec"]["template"], 0);
    // An older revision of this set under the name v2 would hash to.
    let squatter = new_revision(&sts(1, "v1"), &name, 1);
    let p = plan(&s, &[], &[squatter], &[], later());
    let created = p.create_revision.expect("a new revision");
    assert_ne!(name_of(&created), name);
    assert_eq!(name_of(&created), revision_name("web", &s["spec"]["template"], 1));
    assert_eq!(p.status["collisionCount"], 1);
    assert_eq!(created["revision"], 2);
}

#[test]
fn members_are_exactly_the_set_name_and_an_ordinal() {
    assert_eq!(ordinal_of("web", "web-1"), Some(1));
    assert_eq!(ordinal_of("web", "web-12"), Some(12));
    for bad in ["web-01", "web-", "web-x", "webx-1", "web--1", "web-1-2", "web"] {
        assert_eq!(ordinal_of("web", bad), None, "{bad}");
    }
}

#[test]
fn malformed_specs_fall_back_to_defaults_instead_of_failing() {
    let mut s = sts(1, "v1");
    s["spec"]["replicas"] = json!("three");
    s["spec"]["updateStrategy"] = json!("sideways");
    s["spec"]["template"] = json!(null);
    s["status"] = json!({"collisionCount": "x", "currentRevision": 7});
    let p = plan(&s, &[json!({"metadata": {}}), json!(null)], &[json!({"data": 1})], &[json!(7)], later());
    assert_eq!(names(&p.create), ["web-0"], "replicas defaults to 1");
    assert!(p.create[0]["spec"].is_object());
    let p = plan(&json!({}), &[], &[], &[], later());
    assert_eq!(p.create.len(), 1);
}

#[test]
fn a_huge_replica_count_is_created_in_bounded_batches() {
    let mut s = sts(i64::from(i32::MAX), "v1");
    s["spec"]["podManagementPolicy"] = json!("Parallel");
    s["spec"]["ordinals"] = json!({"start": i64::MAX - 5});
    let p = plan(&s, &[], &[], &[], later());
    assert_eq!(p.create.len(), 5, "the ordinals end at i64::MAX without overflowing");
    s["spec"]["ordinals"] = json!({"start": 0});
    let p = plan(&s, &[], &[], &[], later());
    assert_eq!(p.create.len(), MAX_CREATES);
}

#[test]
fn only_selected_uncontrolled_members_are_adopted() {
    let s = sts(2, "v1");
    let member = |name: &str, app: &str| json!({"metadata": {"name": name, "labels": {"app": app}}});
    assert!(adoptable(&s, "Pod", &member("web-1", "web")));
    assert!(!adoptable(&s, "Pod", &member("web-1", "other")), "not selected");
    assert!(!adoptable(&s, "Pod", &member("web-x", "web")), "not a member's name");
    assert!(adoptable(&s, "ControllerRevision", &member("web-x", "web")), "revisions have any name");
    let mut owned = member("web-0", "web");
    owned["metadata"]["ownerReferences"] = json!([{"uid": "rs", "controller": true}]);
    assert!(!adoptable(&s, "Pod", &owned), "controlled by another");
    let mut leaving = member("web-0", "web");
    leaving["metadata"]["deletionTimestamp"] = json!(READY_AT);
    assert!(!adoptable(&s, "Pod", &leaving));
    let mut no_selector = s.clone();
    no_selector["spec"]["selector"] = json!(null);
    assert!(!adoptable(&no_selector, "Pod", &member("web-1", "web")));
}

fn with_claims(mut s: Value, when_deleted: &str, when_scaled: &str) -> Value {
    s["spec"]["volumeClaimTemplates"] = json!([{"metadata": {"name": "data", "labels": {"tier": "db"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}]);
    s["spec"]["template"]["spec"]["volumes"] =
        json!([{"name": "data", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}]);
    s["spec"]["persistentVolumeClaimRetentionPolicy"] = json!({"whenDeleted": when_deleted, "whenScaled": when_scaled});
    s
}

#[test]
fn each_pod_gets_its_own_claims_made_first() {
    let s = with_claims(sts(2, "v1"), "Retain", "Retain");
    let p = plan(&s, &[], &[], &[], later());
    assert_eq!(names(&p.create), ["web-0"]);
    assert_eq!(names(&p.create_claims), ["data-web-0"]);
    let claim = &p.create_claims[0];
    assert_eq!(claim["metadata"]["labels"], json!({"tier": "db", "app": "web"}), "template labels and the selector's");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "1Gi");
    assert!(claim["metadata"]["ownerReferences"].is_null(), "Retain: the claims outlive the set");
    // The template's volume of the claim's name is replaced; others stay.
    assert_eq!(
        p.create[0]["spec"]["volumes"],
        json!([{"name": "tmp", "emptyDir": {}}, {"name": "data", "persistentVolumeClaim": {"claimName": "data-web-0"}}])
    );
    // A claim that exists is not made again (a replaced pod finds its data).
    let p = plan(&s, &[], &[], std::slice::from_ref(claim), later());
    assert_eq!(names(&p.create), ["web-0"]);
    assert!(p.create_claims.is_empty());
    // One being deleted holds its pod back until it is gone.
    let mut leaving = claim.clone();
    leaving["metadata"]["deletionTimestamp"] = json!(READY_AT);
    let p = plan(&s, &[], &[], &[leaving], later());
    assert!(p.create.is_empty() && p.create_claims.is_empty());

    let owned = with_claims(sts(1, "v1"), "Delete", "Retain");
    let p = plan(&owned, &[], &[], &[], later());
    assert_eq!(p.create_claims[0]["metadata"]["ownerReferences"][0]["uid"], "s1", "Delete: they go with the set");
}

#[test]
fn scaled_away_claims_go_only_when_asked_and_their_pods_are_gone() {
    let claim = |o: i64| {
        let mut c =
            claim_for(&with_claims(sts(1, "v1"), "Retain", "Retain"), &json!({"metadata": {"name": "data"}}), o);
        c["metadata"]["labels"] = json!({"app": "web"});
        c
    };
    let claims =
        [claim(0), claim(1), claim(2), json!({"metadata": {"name": "data-web-3", "labels": {"app": "other"}}})];
    let s = with_claims(sts(1, "v1"), "Retain", "Delete");
    let web2 = running(pod_for(&s, &s["spec"]["template"], "r", 2));
    let p = plan(&s, &[web2], &[], &claims, later());
    assert_eq!(p.delete_claims, ["data-web-1"], "web-2 still runs; data-web-3 is not the set's");
    let kept = with_claims(sts(1, "v1"), "Retain", "Retain");
    assert!(plan(&kept, &[], &[], &claims, later()).delete_claims.is_empty());
}
