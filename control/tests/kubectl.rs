//! Real /usr/bin/kubectl (1.32) against a real `capstan up` cluster: the
//! commands users run, their effect read back, and bad input answered with
//! a Status error that changes nothing.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Kubectl {
    kubeconfig: PathBuf,
    home: tempfile::TempDir,
}

impl Kubectl {
    fn new(kubeconfig: PathBuf) -> Kubectl {
        Kubectl { kubeconfig, home: tempfile::tempdir().unwrap() }
    }

    fn as_user(&self, kubeconfig: PathBuf) -> Kubectl {
        Kubectl::new(kubeconfig)
    }

    fn run_with(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new("timeout")
            .arg("60")
            .arg("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", self.home.path())
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        if let Some(input) = stdin {
            child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Runs and requires success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, None)
    }

    fn ok_with(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run_with(args, stdin);
        let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "kubectl {args:?} failed:\nstdout: {so}\nstderr: {se}");
        so.into_owned()
    }

    /// Runs and requires failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        self.fails_with(args, None)
    }

    fn fails_with(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run_with(args, stdin);
        let (so, se) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "kubectl {args:?} should have failed:\nstdout: {so}\nstderr: {se}");
        se.into_owned()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&a)).expect("kubectl -o json output")
    }
}

fn manifest(name: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/manifests").join(name)).unwrap()
}

fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for what the ServiceAccount controller puts in every namespace, so
/// a test that compares a namespace's contents does not see it arrive.
fn wait_for_root_ca(k: &Kubectl, ns: &str) {
    eventually("kube-root-ca.crt", || k.run_with(&["get", "cm", "kube-root-ca.crt", "-n", ns], None).status.success());
}

#[test]
fn kubectl_drives_a_three_master_cluster() {
    let up = common::up(3);
    let k = Kubectl::new(up.dir.path().join("kubeconfig"));

    // Discovery.
    let res = k.ok(&["api-resources"]);
    for line in ["deployments", "deploy", "apps/v1", "configmaps", "cm", "clusterroles", "rbac.authorization.k8s.io/v1"]
    {
        assert!(res.contains(line), "api-resources lacks {line}:\n{res}");
    }
    assert!(k.ok(&["get", "namespaces"]).contains("kube-system"), "built-in namespaces exist");

    // apply -f, then apply an edited manifest: strategic merge keeps what
    // the edit did not touch and drops what it removed.
    let shop = manifest("shop.yaml");
    let out = k.ok_with(&["apply", "-f", "-"], Some(&shop));
    for what in [
        "namespace/shop created",
        "deployment.apps/web created",
        "service/web created",
        "configmap/cfg created",
        "secret/sec created",
    ] {
        assert!(out.contains(what), "{what} in {out}");
    }
    let d = k.json(&["get", "deploy", "web", "-n", "shop"]);
    assert_eq!(d["metadata"]["generation"], 1);
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["ports"].as_array().unwrap().len(), 2);
    assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate", "defaulted");
    let edited = shop.replace("nginx:1.25", "nginx:1.26").replace("        - containerPort: 443\n", "");
    assert!(k.ok_with(&["apply", "-f", "-"], Some(&edited)).contains("deployment.apps/web configured"));
    let d = k.json(&["get", "deploy", "web", "-n", "shop"]);
    let c = &d["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["image"], "nginx:1.26");
    assert_eq!(c["ports"], serde_json::json!([{"containerPort": 80, "protocol": "TCP"}]));
    assert_eq!(c["env"][0]["name"], "A", "untouched list items stay");
    assert_eq!(d["metadata"]["generation"], 2);
    let svc = k.json(&["get", "svc", "web", "-n", "shop"]);
    assert!(svc["spec"]["clusterIP"].as_str().unwrap().starts_with("10.96."), "cluster IP allocated");
    let sec = k.json(&["get", "secret", "sec", "-n", "shop"]);
    assert_eq!(sec["data"]["password"], "aHVudGVyMg==", "stringData folded into data");

    // Output formats and selectors.
    let yaml = k.ok(&["get", "deploy", "web", "-n", "shop", "-o", "yaml"]);
    assert!(yaml.contains("kind: Deployment") && yaml.contains("resourceVersion:"), "{yaml}");
    let wide = k.ok(&["get", "deploy", "-n", "shop", "-o", "wide"]);
    assert!(
        wide.lines().next().unwrap().split_whitespace().eq([
            "NAME",
            "READY",
            "UP-TO-DATE",
            "AVAILABLE",
            "AGE",
            "CONTAINERS",
            "IMAGES",
            "SELECTOR"
        ]),
        "{wide}"
    );
    assert!(wide.contains("nginx:1.26") && wide.contains("app=web"), "{wide}");
    let all = k.ok(&["get", "cm", "-A"]);
    assert!(all.lines().next().unwrap().starts_with("NAMESPACE"), "{all}");
    assert!(all.contains("shop") && all.contains("cfg"), "{all}");
    k.ok(&["create", "cm", "other", "-n", "shop", "--from-literal=k=v"]);
    k.ok(&["label", "cm", "cfg", "-n", "shop", "tier=front"]);
    assert_eq!(k.ok(&["get", "cm", "-n", "shop", "-l", "tier=front", "-o", "name"]).trim(), "configmap/cfg");
    assert_eq!(
        k.ok(&["get", "cm", "-n", "shop", "-l", "tier in (front,back),!missing", "-o", "name"]).trim(),
        "configmap/cfg"
    );
    assert!(!k.ok(&["get", "cm", "-n", "shop", "-l", "tier!=front", "-o", "name"]).contains("configmap/cfg"));

    // label and annotate: --overwrite and removal.
    let e = k.fails(&["label", "cm", "cfg", "-n", "shop", "tier=back"]);
    assert!(e.contains("already has a value"), "{e}");
    k.ok(&["label", "cm", "cfg", "-n", "shop", "tier=back", "--overwrite"]);
    k.ok(&["annotate", "cm", "cfg", "-n", "shop", "note=hello"]);
    let cm = k.json(&["get", "cm", "cfg", "-n", "shop"]);
    assert_eq!(
        (cm["metadata"]["labels"]["tier"].as_str(), cm["metadata"]["annotations"]["note"].as_str()),
        (Some("back"), Some("hello"))
    );
    k.ok(&["label", "cm", "cfg", "-n", "shop", "tier-"]);
    k.ok(&["annotate", "cm", "cfg", "-n", "shop", "note-"]);
    let cm = k.json(&["get", "cm", "cfg", "-n", "shop"]);
    assert!(
        cm["metadata"]["labels"].get("tier").is_none() && cm["metadata"]["annotations"].get("note").is_none(),
        "{cm}"
    );

    // get -w sees an update made by another client.
    let mut watch = Command::new("timeout")
        .args(["20", "kubectl", "get", "cm", "cfg", "-n", "shop", "-w", "-o", "jsonpath={.data.a}{\"\\n\"}"])
        .env("KUBECONFIG", &k.kubeconfig)
        .env("HOME", k.home.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    k.ok(&["patch", "cm", "cfg", "-n", "shop", "-p", r#"{"data":{"a":"changed"}}"#]);
    let mut seen = String::new();
    {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(watch.stdout.take().unwrap()).lines();
        for _ in 0..2 {
            match lines.next() {
                Some(Ok(l)) => seen.push_str(&format!("{l}\n")),
                _ => break,
            }
        }
    }
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(seen, "1\nchanged\n", "watch shows the current value, then the update");

    // Typed creates (protobuf bodies), scale, explain, auth.
    k.ok(&["create", "namespace", "team"]);
    assert_eq!(k.json(&["get", "ns", "team"])["status"]["phase"], "Active");
    k.ok(&["scale", "deploy", "web", "-n", "shop", "--replicas=5"]);
    assert_eq!(k.json(&["get", "deploy", "web", "-n", "shop"])["spec"]["replicas"], 5);
    let ex = k.ok(&["explain", "deployment.spec.template"]);
    assert!(ex.contains("<PodTemplateSpec>") && ex.contains("<PodSpec>") && ex.contains("DESCRIPTION"), "{ex}");
    assert_eq!(k.ok(&["auth", "can-i", "create", "pods"]).trim(), "yes");

    // Server-side apply, and a conflict between two field managers.
    let ssa =
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: ssa\n  namespace: shop\ndata:\n  a: \"1\"\n  b: \"2\"\n";
    assert!(k.ok_with(&["apply", "--server-side", "-f", "-"], Some(ssa)).contains("serverside-applied"));
    let other = ssa.replace("\"1\"", "\"9\"");
    let e = k.fails_with(&["apply", "--server-side", "--field-manager=other", "-f", "-"], Some(&other));
    assert!(e.contains("conflict with \"kubectl\"") && e.contains(".data.a"), "{e}");
    assert_eq!(k.json(&["get", "cm", "ssa", "-n", "shop"])["data"]["a"], "1", "a conflict changes nothing");
    k.ok_with(&["apply", "--server-side", "--field-manager=other", "--force-conflicts", "-f", "-"], Some(&other));
    let cm = k.json(&["get", "cm", "ssa", "-n", "shop", "--show-managed-fields"]);
    assert_eq!(cm["data"]["a"], "9");
    let managers: Vec<&str> =
        cm["metadata"]["managedFields"].as_array().unwrap().iter().map(|m| m["manager"].as_str().unwrap()).collect();
    assert!(managers.contains(&"kubectl") && managers.contains(&"other"), "{managers:?}");

    // delete with each propagation policy: dependents go (background,
    // foreground) or lose their owner reference (orphan).
    for (policy, child_survives) in [("background", false), ("foreground", false), ("orphan", true)] {
        k.ok_with(&["apply", "-f", "-"], Some(&shop));
        let uid = k.json(&["get", "deploy", "web", "-n", "shop"])["metadata"]["uid"].as_str().unwrap().to_string();
        let child = format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: child\n  namespace: shop\n  ownerReferences:\n  - apiVersion: apps/v1\n    kind: Deployment\n    name: web\n    uid: {uid}\n    controller: true\n");
        k.ok_with(&["apply", "-f", "-"], Some(&child));
        k.ok(&["delete", "deploy", "web", "-n", "shop", &format!("--cascade={policy}")]);
        eventually(&format!("{policy} deletion"), || {
            let gone = !k.run_with(&["get", "deploy", "web", "-n", "shop"], None).status.success();
            let child = k.run_with(&["get", "cm", "child", "-n", "shop", "-o", "json"], None);
            gone && if child_survives {
                child.status.success()
                    && serde_json::from_slice::<serde_json::Value>(&child.stdout).unwrap()["metadata"]
                        .get("ownerReferences")
                        .is_none()
            } else {
                !child.status.success()
            }
        });
        k.run_with(&["delete", "cm", "child", "-n", "shop", "--ignore-not-found"], None);
    }

    // Deleting a namespace deletes what it holds, then the namespace.
    k.ok(&["delete", "namespace", "shop"]);
    eventually("namespace shop gone", || !k.run_with(&["get", "ns", "shop"], None).status.success());
    assert!(k.ok(&["get", "cm", "-A", "-o", "name"]).lines().all(|l| !l.contains("cfg")));
}

fn kubeconfig_for(up: &common::Up, user: &str, extra: &[&str]) -> PathBuf {
    let path = up.dir.path().join(format!("{user}.kubeconfig"));
    let mut args = vec!["kubeconfig", "--data-dir"];
    let dir = up.dir.path().to_str().unwrap().to_string();
    args.push(&dir);
    args.extend(["--user", user]);
    args.extend(extra);
    let out_path = path.to_str().unwrap().to_string();
    args.extend(["--out", &out_path]);
    let out = Command::new(common::BIN).args(&args).output().unwrap();
    assert!(out.status.success(), "capstan kubeconfig: {}", String::from_utf8_lossy(&out.stderr));
    path
}

#[test]
fn authentication_and_rbac() {
    let up = common::up(1);
    let admin = Kubectl::new(up.dir.path().join("kubeconfig"));
    admin.ok(&["create", "namespace", "team"]);
    admin.ok(&["create", "cm", "c", "-n", "team", "--from-literal=a=b"]);
    admin.ok(&["create", "role", "reader", "-n", "team", "--verb=get,list,watch", "--resource=configmaps,pods"]);
    admin.ok(&["create", "rolebinding", "alice-reads", "-n", "team", "--role=reader", "--user=alice"]);

    // No credentials at all: 401, except the anonymous endpoints.
    let server = std::fs::read_to_string(up.dir.path().join("kubeconfig")).unwrap();
    let url = server.lines().find_map(|l| l.trim().strip_prefix("server: ")).unwrap().to_string();
    let curl = |path: &str| {
        let out = Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", &format!("{url}{path}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(curl("/api/v1/namespaces"), "401");
    assert_eq!(curl("/apis"), "401");
    assert_eq!(curl("/version"), "200");
    assert_eq!(curl("/readyz"), "200");
    // kubectl with a kubeconfig without credentials prompts for a password
    // (as against any cluster); with a token nobody issued it gets the 401.
    let nobody = Kubectl::new(up.dir.path().join("nobody.kubeconfig"));
    let mut config: serde_json::Value = serde_norway::from_str(&server).unwrap();
    config["users"][0]["user"] = serde_json::json!({"token": "capstan-nobody"});
    std::fs::write(&nobody.kubeconfig, serde_norway::to_string(&config).unwrap()).unwrap();
    let e = nobody.fails(&["get", "cm", "-n", "team"]);
    assert!(e.contains("provide credentials"), "kubectl's wording for a 401: {e}");

    // alice: a namespaced read-only Role.
    let alice = admin.as_user(kubeconfig_for(&up, "alice", &[]));
    assert!(alice.ok(&["get", "cm", "-n", "team"]).contains("c"));
    let e = alice.fails(&["create", "cm", "x", "-n", "team"]);
    assert!(e.contains("forbidden") && e.contains("cannot create resource \"configmaps\""), "{e}");
    let e = alice.fails(&["delete", "cm", "c", "-n", "team"]);
    assert!(e.contains("forbidden"), "{e}");
    let e = alice.fails(&["get", "cm", "-n", "default"]);
    assert!(e.contains("forbidden") && e.contains("in the namespace \"default\""), "{e}");
    assert_eq!(alice.ok(&["auth", "can-i", "list", "configmaps", "-n", "team"]).trim(), "yes");
    assert_eq!(alice.run_with(&["auth", "can-i", "create", "configmaps", "-n", "team"], None).stdout, b"no\n");
    let cms = admin.ok(&["get", "cm", "-n", "team", "-o", "name"]);
    let cms: Vec<&str> = cms.lines().filter(|l| *l != "configmap/kube-root-ca.crt").collect();
    assert_eq!(cms, ["configmap/c"], "alice changed nothing");

    // Bearer token for bob, no bindings: authenticated, not authorized.
    let bob = admin.as_user(kubeconfig_for(&up, "bob", &["--token", "--group", "devs"]));
    assert!(bob.ok(&["auth", "whoami"]).contains("bob"));
    let e = bob.fails(&["get", "cm", "-n", "team"]);
    assert!(e.contains("User \"bob\" cannot list"), "{e}");
    admin.ok(&["create", "clusterrolebinding", "devs-view", "--clusterrole=view", "--group=devs"]);
    eventually("bob's group binding to apply", || bob.run_with(&["get", "cm", "-n", "team"], None).status.success());
    let forged = Kubectl::new(up.dir.path().join("forged.kubeconfig"));
    std::fs::write(
        &forged.kubeconfig,
        std::fs::read_to_string(&bob.kubeconfig).unwrap().replace("token: capstan-", "token: capstan-0"),
    )
    .unwrap();
    assert!(forged.fails(&["get", "cm", "-n", "team"]).contains("provide credentials"));
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let up = common::up(1);
    let k = Kubectl::new(up.dir.path().join("kubeconfig"));
    wait_for_root_ca(&k, "default");
    k.ok(&["create", "cm", "keep", "-n", "default", "--from-literal=a=1"]);
    let state = || {
        k.ok(&[
            "get",
            "cm,secrets,deploy,ns",
            "-A",
            "-o",
            "custom-columns=NS:.metadata.namespace,NAME:.metadata.name,RV:.metadata.resourceVersion",
        ])
    };
    let before = state();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, body: &[u8]| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_string()
    };
    let cms = "/api/v1/namespaces/default/configmaps";
    // `kubectl create --raw` POSTs a file's bytes as they are.
    let raw = |uri: &str, name: &str, body: &[u8]| -> Vec<String> {
        ["create", "--raw", uri, "-f", &file(name, body)].iter().map(|s| s.to_string()).collect()
    };
    let strict = format!("{cms}?fieldValidation=Strict");
    let big = format!(
        r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"big"}},"data":{{"a":"{}"}}}}"#,
        "x".repeat(4 << 20)
    );
    let patch =
        |extra: &[&str]| -> Vec<String> { ["patch", "cm"].iter().chain(extra).map(|s| s.to_string()).collect() };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (raw(cms, "bad.json", b"{\"kind\": \"ConfigMap\", \"metadata\": {"), "BadRequest"),
        (raw(cms, "bad.yaml", b"kind: ConfigMap\nmetadata: [x\n"), "BadRequest"),
        (raw("/apis/bogus.example.com/v1/namespaces/default/things", "thing.json", b"{}"), "NotFound"),
        (raw(cms, "kind.json", br#"{"apiVersion":"v1","kind":"Secret","metadata":{"name":"x"}}"#), "BadRequest"),
        (
            raw(cms, "name.json", br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"Bad_Name!"}}"#),
            "Invalid",
        ),
        (
            raw(
                &strict,
                "unknown.json",
                br#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"u"},"bogus":1}"#,
            ),
            "unknown field \"bogus\"",
        ),
        (raw(cms, "big.json", big.as_bytes()), "RequestEntityTooLarge"),
        (patch(&["missing", "-n", "default", "-p", r#"{"data":{"a":"b"}}"#]), "NotFound"),
        (
            patch(&[
                "keep",
                "-n",
                "default",
                "--type=json",
                "-p",
                r#"[{"op":"test","path":"/data/a","value":"2"},{"op":"replace","path":"/data/a","value":"3"}]"#,
            ]),
            "is invalid",
        ),
    ];
    for (args, want) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let e = k.fails(&args);
        assert!(e.contains(want), "{:?}: expected {want} in {e}", &args[..args.len().min(4)]);
    }
    // A stale resourceVersion (someone else wrote since it was read): 409.
    let mut cm = k.json(&["get", "cm", "keep", "-n", "default"]);
    k.ok(&["label", "cm", "keep", "-n", "default", "moved=yes"]);
    cm["data"]["a"] = serde_json::json!("stale");
    let e = k.fails_with(&["replace", "-f", "-"], Some(&cm.to_string()));
    assert!(e.contains("Conflict") || e.contains("the object has been modified"), "{e}");
    // A manifest of a kind the server does not serve.
    // (Without --validate=false kubectl first looks for the kind's schema
    // in /openapi/v2, which Capstan does not serve.)
    let e = k.fails_with(
        &["apply", "--validate=false", "-f", "-"],
        Some("apiVersion: example.com/v1\nkind: Gadget\nmetadata:\n  name: g\n"),
    );
    assert!(e.contains("no matches for kind \"Gadget\""), "{e}");
    // A pod CIDR set on Nodes that had none is claimed: two nodes never
    // route the same pod addresses.
    for n in ["cidr-a", "cidr-b"] {
        k.ok_with(&["create", "-f", "-"], Some(&format!("apiVersion: v1\nkind: Node\nmetadata:\n  name: {n}\n")));
    }
    let set = r#"{"spec":{"podCIDR":"10.244.250.0/24","podCIDRs":["10.244.250.0/24"]}}"#;
    k.ok(&["patch", "node", "cidr-a", "-p", set]);
    let e = k.fails(&["patch", "node", "cidr-b", "-p", set]);
    assert!(e.contains("provided CIDR is already allocated"), "{e}");
    assert!(k.json(&["get", "node", "cidr-b"])["spec"]["podCIDR"].is_null(), "the refused patch changed nothing");
    k.ok(&["label", "node", "cidr-a", "still=mine"]);
    k.ok(&["delete", "node", "cidr-a"]);
    k.ok(&["patch", "node", "cidr-b", "-p", set]);
    k.ok(&["delete", "node", "cidr-b"]);
    let after = state();
    let strip = |s: &str| s.lines().filter(|l| !l.contains(" keep ")).map(str::to_string).collect::<Vec<_>>();
    assert_eq!(strip(&before), strip(&after), "nothing but the label changed");
    assert_eq!(k.json(&["get", "cm", "keep", "-n", "default"])["data"]["a"], "1");
}

#[test]
fn paging_watch_from_a_revision_and_compaction() {
    let up = common::up(1);
    let k = Kubectl::new(up.dir.path().join("kubeconfig"));
    wait_for_root_ca(&k, "default");
    for i in 0..5 {
        k.ok(&["create", "cm", &format!("page-{i}"), "-n", "default", &format!("--from-literal=i={i}")]);
    }
    let cms = "/api/v1/namespaces/default/configmaps";
    // limit/continue: pages of 2, all at the first page's resourceVersion.
    let first: serde_json::Value = serde_json::from_str(&k.ok(&["get", "--raw", &format!("{cms}?limit=2")])).unwrap();
    let rv = first["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let mut names: Vec<String> =
        first["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap().into()).collect();
    let mut token = first["metadata"]["continue"].as_str().map(str::to_string);
    k.ok(&["create", "cm", "page-late", "-n", "default"]);
    while let Some(t) = token {
        let page: serde_json::Value =
            serde_json::from_str(&k.ok(&["get", "--raw", &format!("{cms}?limit=2&continue={t}")])).unwrap();
        assert_eq!(page["metadata"]["resourceVersion"].as_str(), Some(rv.as_str()), "pages share one revision");
        names.extend(
            page["items"].as_array().unwrap().iter().map(|i| i["metadata"]["name"].as_str().unwrap().to_string()),
        );
        token = page["metadata"]["continue"].as_str().map(str::to_string);
    }
    names.retain(|n| n != "kube-root-ca.crt");
    assert_eq!(
        names,
        (0..5).map(|i| format!("page-{i}")).collect::<Vec<_>>(),
        "a consistent snapshot, without page-late"
    );
    assert!(k.ok(&["get", "cm", "-n", "default", "--chunk-size=2", "-o", "name"]).contains("page-late"));
    let stale_token = serde_json::from_str::<serde_json::Value>(&k.ok(&["get", "--raw", &format!("{cms}?limit=1")]))
        .unwrap()["metadata"]["continue"]
        .as_str()
        .unwrap()
        .to_string();

    // Watch from a revision: exactly the later events, in order; the
    // stream ends at timeoutSeconds.
    k.ok(&["label", "cm", "page-0", "-n", "default", "x=1"]);
    k.ok(&["delete", "cm", "page-1", "-n", "default"]);
    let started = Instant::now();
    let events = k.ok(&["get", "--raw", &format!("{cms}?watch=true&resourceVersion={rv}&timeoutSeconds=2")]);
    assert!(started.elapsed() < Duration::from_secs(10), "timeoutSeconds ends the watch");
    let seen: Vec<(String, String)> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|e| {
            (e["type"].as_str().unwrap().to_string(), e["object"]["metadata"]["name"].as_str().unwrap().to_string())
        })
        .collect();
    let want = [("ADDED", "page-late"), ("MODIFIED", "page-0"), ("DELETED", "page-1")];
    assert_eq!(seen, want.map(|(a, b)| (a.to_string(), b.to_string())), "{events}");

    // A revision from the future is refused, not waited on.
    let e = k.fails(&["get", "--raw", &format!("{cms}?watch=true&resourceVersion={}", i64::MAX)]);
    assert!(e.contains("Too large resource version"), "{e}");

    // After compaction, a watch from before it gets a 410 ERROR event and
    // an old continue token a 410: never a silent gap.
    let head: serde_json::Value = serde_json::from_str(&k.ok(&["get", "--raw", cms])).unwrap();
    let now_rv = head["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    common::etcdctl(&up, &["compact", &now_rv]);
    let events = k.ok(&["get", "--raw", &format!("{cms}?watch=true&resourceVersion={rv}&timeoutSeconds=2")]);
    let e: serde_json::Value = serde_json::from_str(events.lines().next().expect("an event")).unwrap();
    assert_eq!((e["type"].as_str(), e["object"]["code"].as_i64()), (Some("ERROR"), Some(410)), "{events}");
    let err = k.fails(&["get", "--raw", &format!("{cms}?limit=1&continue={stale_token}")]);
    assert!(err.contains("Expired") || err.contains("too old") || err.contains("410"), "{err}");
}

#[test]
fn pods_and_events() {
    let up = common::up(1);
    let k = Kubectl::new(up.dir.path().join("kubeconfig"));
    // `kubectl run` sends a protobuf Pod; admission fills Kubernetes' defaults.
    k.ok(&["run", "p1", "--image=busybox:1.36", "--restart=Never", "--", "sleep", "3600"]);
    let pod = k.json(&["get", "pod", "p1"]);
    assert_eq!(pod["spec"]["containers"][0]["args"], serde_json::json!(["sleep", "3600"]));
    assert_eq!(pod["spec"]["restartPolicy"], "Never");
    assert_eq!(pod["spec"]["serviceAccountName"], "default");
    assert_eq!(pod["status"]["phase"], "Pending");
    assert_eq!(pod["spec"]["tolerations"].as_array().map(Vec::len), Some(2), "default NoExecute tolerations");
    let table = k.ok(&["get", "pods"]);
    assert!(
        table.lines().next().unwrap().split_whitespace().eq(["NAME", "READY", "STATUS", "RESTARTS", "AGE"]),
        "{table}"
    );
    assert!(table.contains("0/1") && table.contains("Pending"), "{table}");
    // Logs and exec need the pod's node; this one has none.
    let e = k.fails(&["logs", "p1"]);
    assert!(e.contains("does not have a host assigned"), "{e}");
    let e = k.fails(&["logs", "p1", "-c", "nope"]);
    assert!(e.contains("container nope is not valid"), "{e}");
    // An unscheduled pod is deleted at once (no kubelet to wait for).
    k.ok(&["delete", "pod", "p1", "--wait=true", "--timeout=20s"]);

    // Events carry a lease: they expire after Kubernetes' event TTL.
    let event = "apiVersion: v1\nkind: Event\nmetadata:\n  name: e1\n  namespace: default\ninvolvedObject:\n  kind: Pod\n  name: p1\n  namespace: default\nreason: Tested\nmessage: hello\ntype: Normal\n";
    k.ok_with(&["create", "-f", "-"], Some(event));
    let got: serde_json::Value =
        serde_json::from_str(&common::etcdctl(&up, &["get", "/registry/core/events/default/e1", "-w", "json"]))
            .unwrap();
    let lease = got["kvs"][0]["lease"].as_i64().expect("the event's key has a lease");
    let ttl = common::etcdctl(&up, &["lease", "timetolive", &format!("{lease:x}")]);
    let secs: i64 =
        ttl.split("remaining(").nth(1).and_then(|r| r.split('s').next()).and_then(|n| n.parse().ok()).expect(&ttl);
    assert!((3500..=3660).contains(&secs), "{ttl}");
    k.ok(&["label", "event", "e1", "x=y"]);
    let got: serde_json::Value =
        serde_json::from_str(&common::etcdctl(&up, &["get", "/registry/core/events/default/e1", "-w", "json"]))
            .unwrap();
    assert_eq!(got["kvs"][0]["lease"].as_i64(), Some(lease), "updates keep the lease");
    // Bookmarks: an idle watch that asked for them gets one with the
    // current revision (the hub's progress interval is 10 s).
    let list: serde_json::Value =
        serde_json::from_str(&k.ok(&["get", "--raw", "/api/v1/namespaces/default/configmaps"])).unwrap();
    let rv = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let lines = k.ok(&["get", "--raw", &format!("/api/v1/namespaces/default/configmaps?watch=true&allowWatchBookmarks=true&resourceVersion={rv}&timeoutSeconds=12")]);
    let bookmark = lines
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|e| e["type"] == "BOOKMARK")
        .unwrap_or_else(|| panic!("no bookmark in {lines}"));
    let brv: i64 = bookmark["object"]["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    assert!(brv >= rv.parse::<i64>().unwrap(), "{bookmark}");
    let described = k.ok(&["get", "events", "--field-selector", "involvedObject.name=p1"]);
    assert!(described.contains("Tested") && described.contains("pod/p1"), "{described}");
}

/// The claims of a JWT, unverified (the server verifies).
fn jwt_claims(token: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap_or_else(|| panic!("not a JWT: {token}"));
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// kubectl's wordings of a 401.
fn unauthorized(stderr: &str) -> bool {
    stderr.contains("provide credentials") || stderr.contains("(Unauthorized)")
}

/// A kubeconfig like the admin's that authenticates with `token` instead.
fn token_kubeconfig(up: &common::Up, name: &str, token: &str) -> Kubectl {
    let admin = std::fs::read_to_string(up.dir.path().join("kubeconfig")).unwrap();
    let mut config: serde_json::Value = serde_norway::from_str(&admin).unwrap();
    config["users"][0]["user"] = serde_json::json!({ "token": token });
    let k = Kubectl::new(up.dir.path().join(format!("{name}.kubeconfig")));
    std::fs::write(&k.kubeconfig, serde_norway::to_string(&config).unwrap()).unwrap();
    k
}

#[test]
fn service_accounts_tokens_and_pod_credentials() {
    let up = common::up(1);
    let admin = Kubectl::new(up.dir.path().join("kubeconfig"));
    admin.ok(&["create", "namespace", "apps"]);
    let exists = |what: &[&str]| {
        let mut args = vec!["get"];
        args.extend(what);
        args.extend(["-n", "apps"]);
        admin.run_with(&args, None).status.success()
    };
    eventually("the default account and the root CA", || {
        exists(&["sa", "default"]) && exists(&["cm", "kube-root-ca.crt"])
    });
    // kube-root-ca.crt holds the CA the kubeconfig trusts.
    let config: serde_json::Value =
        serde_norway::from_str(&std::fs::read_to_string(&admin.kubeconfig).unwrap()).unwrap();
    let ca = {
        use base64::Engine;
        let b64 = config["clusters"][0]["cluster"]["certificate-authority-data"].as_str().unwrap();
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
    };
    let cm = admin.json(&["get", "cm", "kube-root-ca.crt", "-n", "apps"]);
    assert_eq!(cm["data"]["ca.crt"].as_str().map(str::trim), Some(ca.trim()));

    // TokenRequest through `kubectl create token`.
    let token = admin.ok(&["create", "token", "default", "-n", "apps"]).trim().to_string();
    let c = jwt_claims(&token);
    assert_eq!(c["sub"], "system:serviceaccount:apps:default");
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 3600, "{c}");
    let sa_uid = admin.json(&["get", "sa", "default", "-n", "apps"])["metadata"]["uid"].as_str().unwrap().to_string();
    assert_eq!(c["kubernetes.io"]["serviceaccount"]["uid"].as_str(), Some(sa_uid.as_str()));
    let short = admin.ok(&["create", "token", "default", "-n", "apps", "--duration", "10m"]);
    let c = jwt_claims(short.trim());
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 600);
    let e = admin.fails(&["create", "token", "default", "-n", "apps", "--duration", "5m"]);
    assert!(e.contains("may not specify a duration less than 10 minutes"), "{e}");
    let e = admin.fails(&["create", "token", "ghost", "-n", "apps"]);
    assert!(e.contains("not found"), "{e}");

    // The token authenticates as the account; RBAC decides the rest.
    let sa = token_kubeconfig(&up, "sa", &token);
    let who = sa.ok(&["auth", "whoami"]);
    assert!(who.contains("system:serviceaccount:apps:default") && who.contains("system:serviceaccounts:apps"), "{who}");
    let e = sa.fails(&["get", "pods", "-n", "apps"]);
    assert!(e.contains("User \"system:serviceaccount:apps:default\" cannot list resource \"pods\""), "{e}");
    admin.ok(&[
        "create",
        "rolebinding",
        "sa-view",
        "-n",
        "apps",
        "--clusterrole=view",
        "--serviceaccount=apps:default",
    ]);
    eventually("the account's binding to apply", || sa.run_with(&["get", "pods", "-n", "apps"], None).status.success());
    assert!(sa.fails(&["get", "pods", "-n", "default"]).contains("forbidden"), "bound in apps only");
    let vault = admin.ok(&["create", "token", "default", "-n", "apps", "--audience", "vault"]);
    let e = token_kubeconfig(&up, "vault", vault.trim()).fails(&["get", "pods", "-n", "apps"]);
    assert!(unauthorized(&e), "a token for another audience is no API credential: {e}");

    // Pod admission: the account must exist; its credentials are mounted.
    admin.ok(&["run", "p", "-n", "apps", "--image=busybox:1.36", "--restart=Never", "--", "sleep", "3600"]);
    let pod = admin.json(&["get", "pod", "p", "-n", "apps"]);
    let spec = &pod["spec"];
    assert_eq!(
        (spec["serviceAccountName"].as_str(), spec["serviceAccount"].as_str()),
        (Some("default"), Some("default"))
    );
    let vol = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"].as_str().unwrap().starts_with("kube-api-access-"));
    let vol = vol.unwrap_or_else(|| panic!("no kube-api-access volume: {spec}"));
    let sources = vol["projected"]["sources"].as_array().unwrap();
    assert_eq!(sources[0]["serviceAccountToken"]["path"], "token");
    assert_eq!(sources[1]["configMap"]["name"], "kube-root-ca.crt");
    let mount = &spec["containers"][0]["volumeMounts"][0];
    assert_eq!(
        (mount["mountPath"].as_str(), mount["readOnly"].as_bool(), &mount["name"]),
        (Some("/var/run/secrets/kubernetes.io/serviceaccount"), Some(true), &vol["name"])
    );
    let off = r#"{"spec":{"automountServiceAccountToken":false}}"#;
    admin.ok(&["run", "quiet", "-n", "apps", "--image=busybox:1.36", "--restart=Never", "--overrides", off]);
    assert!(admin.json(&["get", "pod", "quiet", "-n", "apps"])["spec"].get("volumes").is_none());
    let ghost = r#"{"spec":{"serviceAccountName":"ghost"}}"#;
    let e = admin.fails(&["run", "g", "-n", "apps", "--image=busybox:1.36", "--restart=Never", "--overrides", ghost]);
    assert!(e.contains("error looking up service account apps/ghost: serviceaccount \"ghost\" not found"), "{e}");

    // A token bound to a pod dies with the pod.
    let bound = admin
        .ok(&["create", "token", "default", "-n", "apps", "--bound-object-kind", "Pod", "--bound-object-name", "p"])
        .trim()
        .to_string();
    assert_eq!(jwt_claims(&bound)["kubernetes.io"]["pod"]["name"], "p");
    let bound_k = token_kubeconfig(&up, "bound", &bound);
    assert!(bound_k.ok(&["auth", "whoami"]).contains("system:serviceaccount:apps:default"));
    admin.ok(&["delete", "pod", "p", "-n", "apps", "--wait=true", "--timeout=20s"]);
    let e = bound_k.fails(&["get", "pods", "-n", "apps"]);
    assert!(unauthorized(&e), "the bound pod is gone: {e}");

    // Deleting the account invalidates its tokens, even once it is recreated
    // under the same name (a new uid); new tokens work again.
    admin.ok(&["delete", "sa", "default", "-n", "apps"]);
    eventually("the default account to be recreated", || {
        admin.run_with(&["get", "sa", "default", "-n", "apps", "-o", "jsonpath={.metadata.uid}"], None).stdout != b""
            && admin.ok(&["get", "sa", "default", "-n", "apps", "-o", "jsonpath={.metadata.uid}"]) != sa_uid
    });
    let e = sa.fails(&["get", "pods", "-n", "apps"]);
    assert!(unauthorized(&e), "a 401 for the old account's token: {e}");
    let fresh = admin.ok(&["create", "token", "default", "-n", "apps"]).trim().to_string();
    token_kubeconfig(&up, "fresh", &fresh).ok(&["get", "pods", "-n", "apps"]);
    // A token nobody signed is a 401 too.
    let mut forged: Vec<&str> = fresh.split('.').collect();
    forged[2] = "AAAA";
    let e = token_kubeconfig(&up, "forged", &forged.join(".")).fails(&["get", "pods", "-n", "apps"]);
    assert!(unauthorized(&e), "{e}");
}
