//! The real etcdctl (Debian's etcd-client 3.4) against `capstan up` with
//! three masters, configured only by the `etcdctl.env` that `up` writes.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Up;

fn parse_env(path: &Path) -> HashMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

struct Etcdctl {
    up: Up,
    env: HashMap<String, String>,
}

fn up() -> Etcdctl {
    let up = common::up(3);
    let env = parse_env(&up.dir.path().join("etcdctl.env"));
    Etcdctl { up, env }
}

impl Etcdctl {
    /// `program` with the env from etcdctl.env; etcdctl refuses an endpoint
    /// given both as flag and variable, so an explicit flag drops the variable.
    fn command(&self, program: &str, args: &[&str]) -> Command {
        let mut c = Command::new(program);
        c.envs(&self.env).args(args);
        if args.contains(&"--endpoints") {
            c.env_remove("ETCDCTL_ENDPOINTS");
        }
        c
    }

    fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let mut a = vec!["--command-timeout=15s"];
        a.extend_from_slice(args);
        self.command("etcdctl", &a).output().expect("run etcdctl")
    }

    /// Run etcdctl; it must succeed; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.etcdctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn on(&self, endpoint: &str, args: &[&str]) -> String {
        let mut a = vec!["--endpoints", endpoint];
        a.extend_from_slice(args);
        self.ok(&a)
    }

    fn endpoints(&self) -> Vec<String> {
        self.env["ETCDCTL_ENDPOINTS"].split(',').map(String::from).collect()
    }
}

fn revision_of(json: &str) -> i64 {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    v["header"]["revision"].as_i64().unwrap()
}

#[test]
fn etcdctl_against_three_masters() {
    let up = up();
    let eps = up.endpoints();
    assert_eq!(eps.len(), 3);

    // membership and status
    let members = up.ok(&["member", "list"]);
    for name in ["master-1", "master-2", "master-3"] {
        assert!(members.contains(name), "{members}");
    }
    assert!(!members.contains("true"), "no member is still a learner: {members}");
    let status = up.ok(&["endpoint", "status", "-w", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let leaders: std::collections::BTreeSet<u64> =
        status.as_array().unwrap().iter().map(|s| s["Status"]["leader"].as_u64().unwrap()).collect();
    assert_eq!(leaders.len(), 1, "every master names the same leader");

    // put/get through different masters
    assert_eq!(up.on(&eps[0], &["put", "/app/a", "1"]).trim(), "OK");
    up.on(&eps[1], &["put", "/app/b", "2"]);
    up.on(&eps[2], &["put", "/app/c", "3"]);
    let first_rev = revision_of(&up.ok(&["get", "/app/a", "-w", "json"]));
    up.ok(&["put", "/app/a", "10"]);
    assert_eq!(up.on(&eps[2], &["get", "/app/a", "--print-value-only"]).trim(), "10");
    assert_eq!(
        up.ok(&["get", "/app/", "--prefix", "--keys-only"]).split_whitespace().collect::<Vec<_>>(),
        ["/app/a", "/app/b", "/app/c"]
    );
    assert_eq!(up.ok(&["get", "/app/", "--prefix", "--limit", "2"]).lines().count(), 4);
    let old = up.ok(&["get", "/app/a", "--rev", &(first_rev - 2).to_string(), "--print-value-only"]);
    assert_eq!(old.trim(), "1", "read at a past revision");
    let sorted = up.ok(&["get", "/app/", "--prefix", "--keys-only", "--sort-by=VALUE", "--order=DESCEND"]);
    assert_eq!(
        sorted.split_whitespace().collect::<Vec<_>>(),
        ["/app/c", "/app/b", "/app/a"],
        "sorted by value, descending"
    );

    // del
    assert_eq!(up.ok(&["del", "/app/c"]).trim(), "1");
    assert_eq!(up.ok(&["get", "/app/c"]).trim(), "");

    // txn (interactive input on stdin)
    let mut txn = Command::new("etcdctl")
        .envs(&up.env)
        .args(["txn"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    txn.stdin.take().unwrap().write_all(b"value(\"/app/a\") = \"10\"\n\nput /app/t yes\n\nput /app/t no\n\n").unwrap();
    let out = txn.wait_with_output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("SUCCESS"), "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(up.ok(&["get", "/app/t", "--print-value-only"]).trim(), "yes");

    // watch --rev replays history (then is stopped by its timeout)
    let start = revision_of(&up.ok(&["get", "/app/a", "-w", "json"])) + 1;
    up.ok(&["put", "/w/1", "a"]);
    up.ok(&["put", "/w/2", "b"]);
    let out = Command::new("timeout")
        .args(["3", "etcdctl", "watch", "/w/", "--prefix", "--rev", &start.to_string()])
        .envs(&up.env)
        .output()
        .unwrap();
    let w = String::from_utf8_lossy(&out.stdout);
    assert!(w.contains("/w/1") && w.contains("/w/2"), "watch output: {w}");

    // leases: grant, attach, keep-alive once, time-to-live, expiry deletes the key
    let grant = up.ok(&["lease", "grant", "3"]);
    let id = grant.split_whitespace().nth(1).unwrap().to_string();
    up.ok(&["put", "/lease/k", "v", "--lease", &id]);
    let ka = up.ok(&["lease", "keep-alive", "--once", &id]);
    assert!(ka.contains("keepalived with TTL"), "{ka}");
    let ttl = up.ok(&["lease", "timetolive", &id, "--keys"]);
    assert!(ttl.contains("/lease/k"), "{ttl}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !up.ok(&["get", "/lease/k"]).trim().is_empty() {
        assert!(Instant::now() < deadline, "leased key did not expire");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(up.ok(&["lease", "timetolive", &id]).contains("already expired"));

    // snapshot save
    let snap = up.up.dir.path().join("snap.db");
    let out = up.etcdctl(&["--endpoints", &eps[0], "snapshot", "save", snap.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::metadata(&snap).unwrap().len() > 0);

    // compaction, then a watch from a compacted revision is refused clearly
    let cur = revision_of(&up.ok(&["get", "/app/a", "-w", "json"]));
    assert!(up.ok(&["compaction", &cur.to_string()]).contains("compacted revision"));
    let out = Command::new("timeout")
        .args(["5", "etcdctl", "watch", "/app/", "--prefix", "--rev", "2"])
        .envs(&up.env)
        .output()
        .unwrap();
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(all.contains("compacted"), "watch from a compacted revision: {all}");
    let out = up.etcdctl(&["get", "/app/a", "--rev", "2"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("required revision has been compacted"));

    // kill -9 the leader; watch --rev on a survivor still sees everything
    let status: serde_json::Value = serde_json::from_str(&up.ok(&["endpoint", "status", "-w", "json"])).unwrap();
    let leader_id = status[0]["Status"]["leader"].as_u64().unwrap();
    let mut leader_dir = None;
    for i in 1..=3 {
        let d = up.up.dir.path().join(format!("master-{i}"));
        if common::endpoints(&d).map(|e| e.id) == Some(leader_id) {
            leader_dir = Some(d);
        }
    }
    let leader_ep = common::endpoints(&leader_dir.unwrap()).unwrap();
    let before = revision_of(&up.ok(&["get", "/app/a", "-w", "json"])) + 1;
    unsafe {
        libc::kill(leader_ep.pid as i32, libc::SIGKILL);
    }
    let survivors: Vec<String> = eps.iter().filter(|e| **e != leader_ep.etcd_url).cloned().collect();
    let joined = survivors.join(",");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = up.etcdctl(&["--endpoints", &joined, "put", "/after/kill", "x"]);
        if out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "no write accepted after the leader kill");
        std::thread::sleep(Duration::from_millis(200));
    }
    let rev = before.to_string();
    let out = up
        .command(
            "timeout",
            &["3", "etcdctl", "--endpoints", &survivors[0], "watch", "/after/", "--prefix", "--rev", &rev],
        )
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("/after/kill"));
}
