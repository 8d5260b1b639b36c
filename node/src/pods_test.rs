use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde_json::json;

use super::*;
use crate::runtime::{ContainerState, ContainerStatus, PullPolicy, Sandbox};

fn t(s: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + s)
}

fn pod(restart: &str, init: &[&str], apps: &[&str]) -> PodSpec {
    let c = |n: &&str| json!({"name": n, "image": "busybox:1"});
    PodSpec::parse(&json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
        "spec": {
            "restartPolicy": restart,
            "initContainers": init.iter().map(c).collect::<Vec<_>>(),
            "containers": apps.iter().map(c).collect::<Vec<_>>(),
        }
    }))
    .unwrap()
}

fn sandbox() -> Sandbox {
    Sandbox { id: "sb".into(), pod_uid: "u1".into(), ip: Some("10.244.0.5".parse().unwrap()), netns: None }
}

fn ctr(name: &str, attempt: u32, state: ContainerState) -> ContainerStatus {
    ContainerStatus {
        id: format!("{name}-{attempt}"),
        pod_uid: "u1".into(),
        name: name.into(),
        attempt,
        image: "docker.io/library/busybox:1".into(),
        image_id: "sha256:abc".into(),
        state,
        labels: BTreeMap::new(),
    }
}

fn run(at: u64) -> ContainerState {
    ContainerState::Running { started_at: t(at) }
}

fn exit(code: i32, at: u64) -> ContainerState {
    ContainerState::Exited {
        started_at: Some(t(at.saturating_sub(5))),
        finished_at: t(at),
        exit_code: code,
        oom_killed: false,
    }
}

fn plan_of(p: &PodSpec, sb: Option<&Sandbox>, cs: &[ContainerStatus], mem: &Memory, now: u64) -> Vec<Action> {
    plan(p, &Observed { sandbox: sb, containers: cs.iter().collect() }, mem, t(now)).0
}

fn start(name: &str, init: bool, attempt: u32) -> Action {
    Action::Start { name: name.into(), init, attempt }
}

#[test]
fn sandbox_then_init_containers_in_order_then_apps() {
    let p = pod("Always", &["i1", "i2"], &["a", "b"]);
    let m = Memory::default();
    let sb = sandbox();
    assert_eq!(plan_of(&p, None, &[], &m, 0), vec![Action::RunSandbox]);
    assert_eq!(plan_of(&p, Some(&sb), &[], &m, 0), vec![start("i1", true, 0)]);
    assert_eq!(plan_of(&p, Some(&sb), &[ctr("i1", 0, run(1))], &m, 2), vec![], "one init container at a time");
    assert_eq!(plan_of(&p, Some(&sb), &[ctr("i1", 0, exit(0, 2))], &m, 3), vec![start("i2", true, 0)]);
    let done = [ctr("i1", 0, exit(0, 2)), ctr("i2", 0, exit(0, 3))];
    assert_eq!(plan_of(&p, Some(&sb), &done, &m, 4), vec![start("a", false, 0), start("b", false, 0)]);
    // A failed init container is retried (policy Always) before any app container.
    let failed = [ctr("i1", 0, exit(1, 2))];
    assert_eq!(plan_of(&p, Some(&sb), &failed, &m, 3), vec![start("i1", true, 1)]);
}

#[test]
fn restart_policies_and_back_off() {
    let sb = sandbox();
    let m = Memory::default();
    let ok = [ctr("a", 0, exit(0, 10))];
    let bad = [ctr("a", 0, exit(2, 10))];
    assert_eq!(plan_of(&pod("Always", &[], &["a"]), Some(&sb), &ok, &m, 11), vec![start("a", false, 1)]);
    assert_eq!(plan_of(&pod("OnFailure", &[], &["a"]), Some(&sb), &bad, &m, 11), vec![start("a", false, 1)]);
    // Done for good: the network goes, the containers stay for logs.
    assert_eq!(plan_of(&pod("OnFailure", &[], &["a"]), Some(&sb), &ok, &m, 11), vec![Action::RemoveSandbox]);
    assert_eq!(plan_of(&pod("Never", &[], &["a"]), Some(&sb), &bad, &m, 11), vec![Action::RemoveSandbox]);
    assert_eq!(plan_of(&pod("Never", &[], &["a"]), None, &bad, &m, 11), vec![]);

    // Within the back-off nothing starts; the worker wakes when it ends.
    let p = pod("Always", &[], &["a"]);
    let mut m = Memory::default();
    let first = next_backoff(None, Duration::from_secs(5), t(3));
    m.backoff.insert("a".into(), next_backoff(Some(&first), Duration::from_secs(5), t(10)));
    let (actions, wake) = plan(&p, &Observed { sandbox: Some(&sb), containers: bad.iter().collect() }, &m, t(12));
    assert_eq!((actions, wake), (vec![], Some(Duration::from_secs(8))));
    let st = status(
        &p,
        &Observed { sandbox: Some(&sb), containers: bad.iter().collect() },
        &m,
        t(12),
        "10.0.0.1",
        &serde_json::Value::Null,
    );
    let c = &st["containerStatuses"][0];
    assert_eq!(c["state"]["waiting"]["reason"], "CrashLoopBackOff");
    assert_eq!(c["lastState"]["terminated"]["exitCode"], 2);
    assert_eq!(c["lastState"]["terminated"]["reason"], "Error");
    assert_eq!(plan_of(&p, Some(&sb), &bad, &m, 20), vec![start("a", false, 1)]);
}

#[test]
fn back_off_doubles_to_five_minutes_and_resets_after_a_long_run() {
    let mut b = next_backoff(None, Duration::from_secs(1), t(0));
    assert_eq!(b.delay, Duration::ZERO, "the first restart is immediate");
    let mut delays = vec![];
    for _ in 0..8 {
        b = next_backoff(Some(&b), Duration::from_secs(1), t(0));
        delays.push(b.delay.as_secs());
    }
    assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300, 300]);
    assert_eq!(next_backoff(Some(&b), Duration::from_secs(601), t(0)).delay, Duration::ZERO);
}

#[test]
fn phases_follow_the_containers() {
    let sb = sandbox();
    let m = Memory::default();
    let phase = |p: &PodSpec, cs: &[ContainerStatus]| {
        status(
            p,
            &Observed { sandbox: Some(&sb), containers: cs.iter().collect() },
            &m,
            t(100),
            "10.0.0.1",
            &serde_json::Value::Null,
        )["phase"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let never = pod("Never", &[], &["a", "b"]);
    assert_eq!(phase(&never, &[]), "Pending");
    assert_eq!(phase(&never, &[ctr("a", 0, run(1)), ctr("b", 0, exit(0, 2))]), "Running");
    assert_eq!(phase(&never, &[ctr("a", 0, exit(0, 3)), ctr("b", 0, exit(0, 2))]), "Succeeded");
    assert_eq!(phase(&never, &[ctr("a", 0, exit(1, 3)), ctr("b", 0, exit(0, 2))]), "Failed");
    let with_init = pod("Never", &["i"], &["a"]);
    assert_eq!(phase(&with_init, &[ctr("i", 0, exit(1, 3))]), "Failed");
    assert_eq!(phase(&with_init, &[ctr("i", 0, run(3))]), "Pending");
    // Always: an exited container is restarting, the pod is Running.
    assert_eq!(phase(&pod("Always", &[], &["a"]), &[ctr("a", 2, exit(0, 3))]), "Running");
}

#[test]
fn deleting_stops_with_the_grace_period_then_removes_everything() {
    let mut p = pod("Always", &[], &["a", "b"]);
    p.deleting = true;
    p.grace = Duration::from_secs(7);
    let sb = sandbox();
    let mut m = Memory::default();
    let live = [ctr("a", 0, run(1)), ctr("b", 0, exit(0, 2))];
    assert_eq!(
        plan_of(&p, Some(&sb), &live, &m, 5),
        vec![Action::Stop { id: "a-0".into(), grace: Duration::from_secs(7) }]
    );
    m.stopping.insert("a-0".into(), t(5));
    assert_eq!(plan_of(&p, Some(&sb), &live, &m, 6), vec![], "stop is not repeated");
    let dead = [ctr("a", 0, exit(137, 9)), ctr("b", 0, exit(0, 2))];
    assert_eq!(
        plan_of(&p, Some(&sb), &dead, &m, 10),
        vec![
            Action::Remove { id: "a-0".into() },
            Action::Remove { id: "b-0".into() },
            Action::RemoveSandbox,
            Action::Terminated
        ]
    );
    assert_eq!(plan_of(&p, None, &[], &m, 11), vec![Action::Terminated]);
}

#[test]
fn unhealthy_containers_are_stopped_and_old_attempts_collected() {
    let p = pod("Always", &[], &["a"]);
    let sb = sandbox();
    let mut m = Memory::default();
    m.unhealthy.insert("a-3".into(), "Liveness probe failed".into());
    let cs = [ctr("a", 3, run(40)), ctr("a", 2, exit(1, 30)), ctr("a", 1, exit(1, 20)), ctr("a", 0, exit(1, 10))];
    assert_eq!(
        plan_of(&p, Some(&sb), &cs, &m, 50),
        vec![
            Action::Remove { id: "a-1".into() },
            Action::Remove { id: "a-0".into() },
            Action::Stop { id: "a-3".into(), grace: Duration::from_secs(30) }
        ]
    );
    // A container the pod no longer names goes too.
    let stray = [ctr("a", 0, run(1)), ctr("gone", 0, run(1))];
    assert_eq!(
        plan_of(&p, Some(&sb), &stray, &Memory::default(), 5),
        vec![Action::Stop { id: "gone-0".into(), grace: Duration::from_secs(30) }]
    );
}

#[test]
fn status_reports_readiness_restarts_ooms_and_ip() {
    let p = pod("Always", &[], &["a", "b"]);
    let sb = sandbox();
    let mut m = Memory { start_time: Some(t(0)), ..Default::default() };
    let oom = ContainerState::Exited { started_at: Some(t(1)), finished_at: t(2), exit_code: 137, oom_killed: true };
    let cs = [ctr("a", 1, run(3)), ctr("a", 0, oom), ctr("b", 0, run(1))];
    m.ready.insert("a-1".into(), true);
    m.ready.insert("b-0".into(), false);
    let obs = Observed { sandbox: Some(&sb), containers: cs.iter().collect() };
    let st = status(&p, &obs, &m, t(10), "10.0.0.1", &serde_json::Value::Null);
    assert_eq!(st["phase"], "Running");
    assert_eq!(st["podIP"], "10.244.0.5");
    assert_eq!(st["startTime"], "2023-11-14T22:13:20Z");
    let a = &st["containerStatuses"][0];
    assert_eq!((a["restartCount"].as_u64(), a["ready"].as_bool()), (Some(1), Some(true)));
    assert_eq!(a["lastState"]["terminated"]["reason"], "OOMKilled");
    assert!(a["state"]["running"]["startedAt"].is_string());
    assert_eq!(a["containerID"], "containerd://a-1");
    let ready = st["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("False"), Some("ContainersNotReady")));
    m.ready.insert("b-0".into(), true);
    let st = status(&p, &obs, &m, t(11), "10.0.0.1", &serde_json::Value::Null);
    let ready = st["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap();
    assert_eq!(ready["status"], "True");
    // An image error shows as the container's waiting reason.
    let mut m = Memory::default();
    m.waiting.insert(
        "a".into(),
        Waiting {
            reason: "ErrImagePull".into(),
            message: "no such image".into(),
            retry_at: t(20),
            delay: BACKOFF_START,
        },
    );
    let st = status(
        &p,
        &Observed { sandbox: Some(&sb), containers: vec![] },
        &m,
        t(10),
        "10.0.0.1",
        &serde_json::Value::Null,
    );
    assert_eq!(st["containerStatuses"][0]["state"]["waiting"]["reason"], "ErrImagePull");
    assert_eq!(st["phase"], "Pending");
    assert_eq!(plan_of(&p, Some(&sb), &[], &m, 10), vec![start("b", false, 0)], "a waits for its retry");
}

#[test]
fn specs_parse_with_kubernetes_defaults() {
    let p = PodSpec::parse(&json!({
        "metadata": {"name": "p", "namespace": "ns", "uid": "u", "deletionTimestamp": "x", "deletionGracePeriodSeconds": 3},
        "spec": {"containers": [
            {"name": "a", "image": "busybox"},
            {"name": "b", "image": "reg:5000/x/busybox:1.36"},
            {"name": "c", "image": "busybox:latest"},
            {"name": "d", "image": "busybox:1", "imagePullPolicy": "Never"}
        ]}
    }))
    .unwrap();
    let pulls: Vec<PullPolicy> = p.containers.iter().map(|c| c.pull_policy).collect();
    assert_eq!(pulls, [PullPolicy::Always, PullPolicy::IfNotPresent, PullPolicy::Always, PullPolicy::Never]);
    assert_eq!((p.restart_policy, p.deleting, p.grace), (RestartPolicy::Always, true, Duration::from_secs(3)));
    assert!(PodSpec::parse(&json!({"metadata": {"uid": "u"}, "spec": {"containers": [{"name": "a"}]}})).is_err());
    assert!(PodSpec::parse(&json!({"metadata": {"uid": "u"}, "spec": {}})).is_err());
    assert_eq!(qos_class(&json!({"spec": {"containers": [{}]}})), "BestEffort");
    let g = json!({"spec": {"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}});
    assert_eq!(qos_class(&g), "Guaranteed");
    let b = json!({"spec": {"containers": [{"resources": {"requests": {"cpu": "1"}}}]}});
    assert_eq!(qos_class(&b), "Burstable");
}

#[test]
fn ephemeral_containers_start_once_when_added_and_are_never_restarted() {
    let mut raw = pod("Always", &[], &["a"]).raw;
    raw["spec"]["ephemeralContainers"] = json!([{"name": "debugger", "image": "busybox:1"}]);
    let p = PodSpec::parse(&raw).unwrap();
    let mut m = Memory::default();
    m.ready.insert("a-0".into(), true);
    let sb = sandbox();
    let app = ctr("a", 0, run(1));
    assert_eq!(plan_of(&p, Some(&sb), std::slice::from_ref(&app), &m, 2), vec![start("debugger", false, 0)]);
    let running = [app.clone(), ctr("debugger", 0, run(2))];
    assert_eq!(plan_of(&p, Some(&sb), &running, &m, 3), vec![]);
    // It exited (even failing): it stays exited, under restartPolicy Always too.
    let exited = [app.clone(), ctr("debugger", 0, exit(1, 4))];
    assert_eq!(plan_of(&p, Some(&sb), &exited, &m, 5), vec![], "ephemeral containers never restart");
    let obs = Observed { sandbox: Some(&sb), containers: exited.iter().collect() };
    let st = status(&p, &obs, &m, t(5), "10.0.0.1", &json!({}));
    let eph = &st["ephemeralContainerStatuses"][0];
    assert_eq!(eph["name"], "debugger");
    assert_eq!(eph["state"]["terminated"]["exitCode"], 1, "{st}");
    assert_eq!(st["phase"], "Running", "an ephemeral container does not end the pod");
    assert_eq!(st["conditions"][2]["status"], "True", "nor make it unready: {st}");
    // Named by the pod, so not collected as a stranger.
    assert!(!plan_of(&p, Some(&sb), &exited, &m, 6).iter().any(|a| matches!(a, Action::Remove { .. })));
}
