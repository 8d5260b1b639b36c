//! Real nodes: `capstan up` with one `capstan-node` agent driving its own
//! containerd (CNI pod networking, the CRI log driver, the busybox image
//! `capstan up` builds into the image directory), driven by kubectl.
//!
//! Needs root, containerd, runc, the CNI plugins, docker-registry and
//! skopeo (CI installs them) and
//! `capstan-node` built next to `capstan` (`cargo test --workspace` does).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use capstan_node::testregistry::{LoopbackRegistry, PASSWORD, USER};
use common::{json_of, kubectl, ok, wait_for};
use serde_json::Value;

/// A cluster of three masters and one containerd node.
fn cluster() -> (common::Up, PathBuf) {
    common::node_binary();
    let up = common::Up::start_full(Path::new(common::BIN), None, 3, &[], &["--nodes", "1", "--no-demo"])
        .expect("capstan up with a node");
    let kc = up.dir.path().join("kubeconfig");
    (up, kc)
}

fn node_dir(up: &common::Up) -> PathBuf {
    up.dir.path().join("node-1")
}

/// `ctr` against the node's own containerd.
fn ctr(up: &common::Up, args: &[&str]) -> String {
    let sock = node_dir(up).join("containerd/containerd.sock");
    let out = Command::new("ctr").arg("--address").arg(&sock).args(["-n", "capstan"]).args(args).output().unwrap();
    assert!(out.status.success(), "ctr {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pod(kc: &Path, name: &str) -> Value {
    json_of(kc, &["get", "pod", name])
}

fn container_status(kc: &Path, name: &str) -> Value {
    pod(kc, name)["status"]["containerStatuses"][0].clone()
}

fn http_get(ip: &str, port: u16) -> String {
    let mut s = std::net::TcpStream::connect_timeout(&format!("{ip}:{port}").parse().unwrap(), Duration::from_secs(3))
        .expect("connect to the pod");
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

fn apply(kc: &Path, yaml: &str) {
    let (good, _, err) = kubectl(kc, &["apply", "-f", "-"], Some(yaml));
    assert!(good, "apply: {err}");
}

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: httpd
        image: busybox:stable
        imagePullPolicy: IfNotPresent
        command: ["sh", "-c", "mkdir -p /www && echo pod=$HOSTNAME > /www/index.html && echo started $HOSTNAME && exec httpd -f -p 8080 -h /www"]
"#;

/// Services: a ClusterIP reaches the Deployment's pods from the host and
/// from a pod, spread over them; a Service with no ready endpoint, and an
/// address in the service range no Service has, refuse at once (nothing
/// leaks out through the default route).
fn services(kc: &Path, web0: &str) {
    apply(
        kc,
        "apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody}
spec:
  selector: {app: nobody}
  ports: [{port: 80}]
",
    );
    let ip = json_of(kc, &["get", "svc", "web"])["spec"]["clusterIP"].as_str().unwrap().to_string();
    let served: std::collections::BTreeSet<String> = wait_for(30, "the Service to answer from the host", || {
        let answers: std::collections::BTreeSet<String> = (0..30)
            .filter_map(|_| {
                let body = try_http_get(&ip, 80)?;
                body.lines().find(|l| l.starts_with("pod=")).map(str::to_string)
            })
            .collect();
        Some(answers).filter(|a| a.len() > 1)
    });
    assert!(served.len() > 1, "requests are spread over the pods: {served:?}");
    let from_pod =
        ok(kc, &["exec", web0, "--", "sh", "-c", &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} 80")]);
    assert!(from_pod.contains("pod=web-"), "a pod reaches the Service: {from_pod}");
    cluster_dns_and_api(kc, web0, &ip);

    let nobody = json_of(kc, &["get", "svc", "nobody"])["spec"]["clusterIP"].as_str().unwrap().to_string();
    for addr in [nobody.as_str(), "10.96.255.254"] {
        let started = std::time::Instant::now();
        let e = std::net::TcpStream::connect_timeout(&format!("{addr}:80").parse().unwrap(), Duration::from_secs(5))
            .expect_err("nothing serves there");
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{addr}: {e}");
        assert!(started.elapsed() < Duration::from_secs(2), "{addr} refused at once");
    }
    ok(kc, &["delete", "svc", "web", "nobody"]);
}

/// Cluster DNS and the API from inside a pod: the kubelet's resolv.conf;
/// a Service by full and by short name (the search path), a headless one
/// by its pods, an ExternalName as an alias, unknown names NXDOMAIN. The
/// `kubernetes` Service lists the three masters and leads to one: from a
/// pod its TLS answers through 10.96.0.1 (the masters serve on 127.0.0.1),
/// and from the host the API certificate is valid for that address.
fn cluster_dns_and_api(kc: &Path, web0: &str, web_ip: &str) {
    apply(
        kc,
        "apiVersion: v1
kind: Service
metadata: {name: web-pods}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: alias}
spec:
  type: ExternalName
  externalName: web.default.svc.cluster.local
",
    );
    let resolv = ok(kc, &["exec", web0, "--", "cat", "/etc/resolv.conf"]);
    assert!(resolv.starts_with("search default.svc.cluster.local svc.cluster.local cluster.local"), "{resolv}");
    assert!(resolv.contains("\nnameserver 10.96.0.10\n") && resolv.contains("options ndots:5"), "{resolv}");
    // busybox's nslookup fails when any search domain is NXDOMAIN, even
    // after a hit: read what it printed, not its exit code.
    let lookup = |name: &str| kubectl(kc, &["exec", web0, "--", "nslookup", name], None).1;
    for name in ["web.default.svc.cluster.local", "web"] {
        let out = lookup(name);
        assert!(out.contains(&format!("Address: {web_ip}\n")), "{name}: {out}");
    }
    let pod_ips = ok(kc, &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].status.podIP}"]);
    let pod_ips: Vec<&str> = pod_ips.split_whitespace().collect();
    assert_eq!(pod_ips.len(), 3, "{pod_ips:?}");
    wait_for(20, "the headless Service to list every pod", || {
        let out = lookup("web-pods.default.svc.cluster.local");
        pod_ips.iter().all(|ip| out.contains(&format!("Address: {ip}\n"))).then_some(())
    });
    let out = lookup("alias.default.svc.cluster.local");
    assert!(out.contains("canonical name = web.default.svc.cluster.local"), "{out}");
    let out = lookup("nope.default.svc.cluster.local");
    assert!(out.contains("can't find nope.default.svc.cluster.local: NXDOMAIN"), "{out}");

    // Each master adds itself within a renewal of joining.
    wait_for(30, "the kubernetes Service to list three masters", || {
        let ep = json_of(kc, &["get", "endpoints", "kubernetes"]);
        let subsets = ep["subsets"].as_array()?;
        (subsets.iter().filter_map(|s| s["addresses"].as_array()).map(Vec::len).sum::<usize>() == 3).then_some(())
    });
    let tls = ok(
        kc,
        &[
            "exec",
            web0,
            "--",
            "sh",
            "-c",
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 10.96.0.1 443 | hexdump -C | head -1",
        ],
    );
    assert!(tls.starts_with("00000000  15 03 03"), "a TLS alert from a master: {tls:?}");
    ok(kc, &["--server", "https://10.96.0.1", "get", "namespace", "default"]);
    ok(kc, &["delete", "svc", "web-pods", "alias"]);
}

/// `kubectl port-forward` (kubectl 1.32: SPDY tunnelled in a WebSocket;
/// plain SPDY when told so) to the pod and to a Service: the first local
/// port it prints answers with the pod's page, twice and with two
/// connections open at once. A port nothing listens on in the pod: the
/// connection is closed and kubectl reports the agent's reason.
fn port_forward(kc: &Path, web0: &str) {
    let start_with = |target: &str, ports: &str, websockets: &str| {
        let mut child = Command::new("kubectl")
            .env("KUBECONFIG", kc)
            .env("KUBECTL_PORT_FORWARD_WEBSOCKETS", websockets)
            .args(["port-forward", target, ports])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // "Forwarding from 127.0.0.1:41235 -> 8080"
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("kubectl port-forward prints its port").unwrap();
        let port: u16 = first
            .strip_prefix("Forwarding from 127.0.0.1:")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        std::thread::spawn(move || lines.for_each(drop));
        (child, port)
    };
    let start = |target: &str, ports: &str| start_with(target, ports, "true");
    let (mut pod_fwd, port) = start(&format!("pod/{web0}"), "0:8080");
    for _ in 0..2 {
        assert!(http_get("127.0.0.1", port).contains(&format!("pod={web0}")));
    }
    let open: Vec<std::net::TcpStream> =
        (0..2).map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    for mut s in open {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        assert!(body.contains(&format!("pod={web0}")), "{body}");
    }
    let _ = pod_fwd.kill();
    let _ = pod_fwd.wait();
    // Plain SPDY, as kubectl before 1.31 and client-go's SPDY dialer speak it.
    let (mut spdy_fwd, port) = start_with(&format!("pod/{web0}"), "0:8080", "false");
    assert!(http_get("127.0.0.1", port).contains(&format!("pod={web0}")), "over plain SPDY");
    let _ = spdy_fwd.kill();
    let _ = spdy_fwd.wait();

    apply(kc, "apiVersion: v1\nkind: Service\nmetadata: {name: web-fwd}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: 8080}]\n");
    let (mut svc_fwd, port) = start("svc/web-fwd", "0:80");
    assert!(http_get("127.0.0.1", port).contains("pod=web-"), "through a Service's port");
    let _ = svc_fwd.kill();
    let _ = svc_fwd.wait();
    ok(kc, &["delete", "svc", "web-fwd"]);

    let (mut nothing, port) = start(&format!("pod/{web0}"), "0:9999");
    assert_eq!(http_get("127.0.0.1", port), "", "nothing listens on 9999 in the pod");
    // kubectl prints the error and drops the connection to the pod; read
    // what it said for a while, whether or not it exits.
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = nothing.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut err = String::new();
    while !err.contains("failed to connect to localhost:9999") {
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(line) => err.push_str(&line),
            Err(_) => panic!("kubectl did not report the failed connection: {err:?}"),
        }
    }
    let _ = nothing.kill();
    let _ = nothing.wait();
}

/// An HTTP GET that may fail (connection refused, no answer yet).
fn try_http_get(ip: &str, port: u16) -> Option<String> {
    let mut s =
        std::net::TcpStream::connect_timeout(&format!("{ip}:{port}").parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body)
}

/// A StatefulSet whose pod counts its boots on its own volume, as a
/// non-root user (a provisioned volume is writable by anyone).
const KEEPER: &str = r#"
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: keeper}
spec:
  serviceName: keeper
  replicas: 1
  selector: {matchLabels: {app: keeper}}
  template:
    metadata: {labels: {app: keeper}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: keeper
        image: busybox:stable
        imagePullPolicy: IfNotPresent
        securityContext: {runAsUser: 1000}
        command: ["sh", "-c", "echo boot >> /data/boots && exec sleep 3600"]
        volumeMounts: [{name: data, mountPath: /data}]
  volumeClaimTemplates:
  - metadata: {name: data}
    spec:
      accessModes: [ReadWriteOnce]
      resources: {requests: {storage: 10Mi}}
"#;

/// A StatefulSet's data outlives its pod: the claim is provisioned on the
/// node, the pod writes to it, a replacement pod finds it. Returns the
/// volume's directory on the host, which the agent removes once the
/// claim and its volume are deleted (checked by the caller later).
fn persistent_volumes(kc: &Path, up: &common::Up) -> PathBuf {
    apply(kc, KEEPER);
    ok(kc, &["rollout", "status", "sts/keeper", "--timeout=90s"]);
    assert_eq!(ok(kc, &["exec", "keeper-0", "--", "cat", "/data/boots"]), "boot\n");
    let claim = json_of(kc, &["get", "pvc", "data-keeper-0"]);
    assert_eq!(claim["status"]["phase"], "Bound");
    let pv = json_of(kc, &["get", "pv", claim["spec"]["volumeName"].as_str().unwrap()]);
    let dir = PathBuf::from(pv["spec"]["hostPath"]["path"].as_str().unwrap());
    let root = std::fs::canonicalize(node_dir(up).join("local-path")).unwrap();
    assert!(dir.starts_with(&root), "{} under the agent's local-path root {}", dir.display(), root.display());
    assert_eq!(std::fs::read_to_string(dir.join("boots")).unwrap(), "boot\n", "the pod wrote to the node's directory");

    let uid = pod(kc, "keeper-0")["metadata"]["uid"].clone();
    ok(kc, &["delete", "pod", "keeper-0"]);
    wait_for(90, "keeper-0 to come back", || {
        let p = pod(kc, "keeper-0");
        Some(()).filter(|_| p["metadata"]["uid"] != uid && p["status"]["phase"] == "Running")
    });
    let boots = wait_for(30, "the second boot", || {
        let (good, out, _) = kubectl(kc, &["exec", "keeper-0", "--", "cat", "/data/boots"], None);
        Some(out).filter(|o| good && o.lines().count() == 2)
    });
    assert_eq!(boots, "boot\nboot\n", "the new pod found the first one's data");

    // The set goes, then its claim (Retain, the default, kept it): the
    // volume is deleted (its class reclaims with Delete), then its directory.
    ok(kc, &["delete", "sts", "keeper"]);
    wait_for(60, "keeper-0 to go", || Some(()).filter(|_| !kubectl(kc, &["get", "pod", "keeper-0"], None).0));
    ok(kc, &["delete", "pvc", "data-keeper-0"]);
    wait_for(60, "the volume to be reclaimed", || {
        Some(()).filter(|_| !kubectl(kc, &["get", "pv", pv["metadata"]["name"].as_str().unwrap()], None).0)
    });
    dir
}

const CONFIG: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {greeting: hello-from-configmap}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: s3cr3t}
---
apiVersion: v1
kind: Pod
metadata: {name: configured, labels: {tier: test}}
spec:
  restartPolicy: Never
  volumes:
  - {name: cfg, configMap: {name: settings}}
  - {name: sec, secret: {secretName: creds}}
  - {name: shared, emptyDir: {}}
  initContainers:
  - name: prepare
    image: busybox:stable
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "echo init-ran-first > /shared/order"]
    volumeMounts: [{name: shared, mountPath: /shared}]
  containers:
  - name: main
    image: busybox:stable
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "cat /shared/order; cat /cfg/greeting; echo; cat /sec/password; echo; echo env=$GREETING/$PASSWORD/$POD; cd /var/run/secrets/kubernetes.io/serviceaccount && cat namespace && echo && cat token && echo"]
    env:
    - name: GREETING
      valueFrom: {configMapKeyRef: {name: settings, key: greeting}}
    - name: PASSWORD
      valueFrom: {secretKeyRef: {name: creds, key: password}}
    - name: POD
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    volumeMounts:
    - {name: cfg, mountPath: /cfg}
    - {name: sec, mountPath: /sec}
    - {name: shared, mountPath: /shared}
"#;

const PROBED: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: probed}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: app
    image: busybox:stable
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "touch /tmp/alive; sleep 3600"]
    readinessProbe:
      exec: {command: ["test", "-f", "/tmp/ready"]}
      periodSeconds: 1
    livenessProbe:
      exec: {command: ["test", "-f", "/tmp/alive"]}
      periodSeconds: 1
      failureThreshold: 2
---
apiVersion: v1
kind: Pod
metadata: {name: hog}
spec:
  restartPolicy: Never
  containers:
  - name: hog
    image: busybox:stable
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "head -c 200m /dev/zero | tail"]
    resources: {limits: {memory: 16Mi}}
---
apiVersion: v1
kind: Pod
metadata: {name: ticker}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: tick
    image: busybox:stable
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.3; done"]
"#;

const HOOKED: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: hooked}
spec:
  terminationGracePeriodSeconds: 5
  volumes: [{name: host, hostPath: {path: HOSTDIR, type: DirectoryOrCreate}}]
  containers:
  - name: c
    image: busybox:stable
    imagePullPolicy: IfNotPresent
    command: ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done"]
    volumeMounts: [{name: host, mountPath: /host}]
    lifecycle:
      postStart: {exec: {command: ["sh", "-c", "echo post > /host/poststart"]}}
      preStop: {exec: {command: ["sh", "-c", "echo pre > /host/prestop"]}}
"#;

const BAD: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: no-image}
spec:
  containers: [{name: c, image: "127.0.0.1:1/nothing/here:1", imagePullPolicy: IfNotPresent}]
---
apiVersion: v1
kind: Pod
metadata: {name: bad-command}
spec:
  restartPolicy: Never
  containers: [{name: c, image: busybox:stable, imagePullPolicy: IfNotPresent, command: ["/no/such/binary"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: missing-config}
spec:
  volumes: [{name: v, configMap: {name: does-not-exist}}]
  containers:
  - {name: c, image: busybox:stable, imagePullPolicy: IfNotPresent, command: ["sleep", "60"], volumeMounts: [{name: v, mountPath: /v}]}
"#;

/// Two pods of an image in the test's registry: one with the pull secret,
/// one without.
const PULLED: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: pulled}
spec:
  restartPolicy: Never
  imagePullSecrets: [{name: regcred}]
  containers: [{name: c, image: "IMAGE", imagePullPolicy: Always, command: ["echo", "pulled from the registry"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: unpulled}
spec:
  containers: [{name: c, image: "IMAGE", imagePullPolicy: Always, command: ["sleep", "60"]}]
"#;

fn waiting_reason(kc: &Path, name: &str) -> Option<String> {
    let s = container_status(kc, name);
    s["state"]["waiting"]["reason"].as_str().map(str::to_string)
}

#[test]
fn real_containers_run_serve_log_exec_restart_and_leave_nothing_behind() {
    let (up, kc) = cluster();
    ok(&kc, &["get", "nodes"]);
    let node = json_of(&kc, &["get", "node", "node-1"]);
    let cidr = node["spec"]["podCIDR"].as_str().expect("a pod CIDR").to_string();
    assert!(node["status"]["nodeInfo"]["containerRuntimeVersion"].as_str().unwrap().starts_with("containerd://"));

    // The agent is scrapeable and ready; capstan up lists it for Prometheus.
    let ep: Value = serde_json::from_slice(&std::fs::read(node_dir(&up).join("endpoints.json")).unwrap()).unwrap();
    let metrics_url = ep["metrics_url"].as_str().unwrap().to_string();
    let (code, body) = common::http_get(&format!("{metrics_url}/readyz?verbose")).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("[+]master ok") && body.contains("[+]runtime ok"), "{body}");
    let prom = std::fs::read_to_string(up.dir.path().join("prometheus.yml")).unwrap();
    assert!(
        prom.contains("job_name: capstan-node") && prom.contains(metrics_url.trim_start_matches("http://")),
        "{prom}"
    );

    // A Deployment of web servers: Running with pod IPs that answer HTTP.
    apply(&kc, WEB);
    ok(&kc, &["rollout", "status", "deploy/web", "--timeout=90s"]);
    let pods = json_of(&kc, &["get", "pods", "-l", "app=web"]);
    let items = pods["items"].as_array().unwrap();
    assert_eq!(items.len(), 3);
    let prefix = cidr.rsplit_once('.').unwrap().0.to_string();
    for p in items {
        assert_eq!(p["status"]["phase"], "Running");
        let ip = p["status"]["podIP"].as_str().expect("a pod IP");
        assert!(ip.starts_with(&prefix), "{ip} in {cidr}");
        let name = p["metadata"]["name"].as_str().unwrap();
        let body = wait_for(20, "the pod to answer HTTP", || Some(http_get(ip, 8080)).filter(|b| b.contains("pod=")));
        assert!(body.contains(&format!("pod={name}")), "{body}");
        // kubectl logs: the container's output.
        assert!(ok(&kc, &["logs", name]).contains(&format!("started {name}")));
    }
    let web0 = items[0]["metadata"]["name"].as_str().unwrap().to_string();
    services(&kc, &web0);
    port_forward(&kc, &web0);
    let (_, body) = common::http_get(&format!("{metrics_url}/metrics")).unwrap();
    for name in [
        "kubelet_running_pods 3",
        "kubelet_pod_start_duration_seconds_count",
        "kubelet_runtime_operations_duration_seconds_bucket{operation_type=\"start_container\"",
        "kubelet_started_containers_total",
        "capstan_node_master_connected 1",
        // The nslookups of `services` above.
        "capstan_node_dns_responses_total{rcode=\"NOERROR\",source=\"cluster\"}",
        "capstan_node_dns_responses_total{rcode=\"NXDOMAIN\",source=\"cluster\"}",
        "process_resident_memory_bytes",
    ] {
        assert!(body.contains(name), "agent /metrics lacks {name}");
    }
    common::promtool_check_metrics(&body).unwrap();

    // kubectl exec: output and exit codes, through whichever master holds the agent.
    assert_eq!(ok(&kc, &["exec", &web0, "--", "cat", "/www/index.html"]).trim(), format!("pod={web0}"));
    let out = Command::new("kubectl")
        .env("KUBECONFIG", &kc)
        .args(["exec", &web0, "--", "sh", "-c", "echo err >&2; exit 3"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("err"));
    let (good, out, err) = kubectl(&kc, &["exec", &web0, "-i", "--", "cat"], Some("via-stdin\n"));
    assert!(good && out == "via-stdin\n", "stdin reaches the process: {out:?} {err}");
    // kubectl cp: tar through exec, both ways.
    let local = up.dir.path().join("cp-in.txt");
    std::fs::write(&local, "copied-in\n").unwrap();
    ok(&kc, &["cp", local.to_str().unwrap(), &format!("{web0}:/tmp/cp-in.txt")]);
    assert_eq!(ok(&kc, &["exec", &web0, "--", "cat", "/tmp/cp-in.txt"]), "copied-in\n");
    let back = up.dir.path().join("cp-out.txt");
    ok(&kc, &["cp", &format!("{web0}:/tmp/cp-in.txt"), back.to_str().unwrap()]);
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "copied-in\n");
    // With a terminal (kubectl insists on one for -t): the process has a tty.
    let (code, screen) = in_terminal(&kc, &format!("exec -it {web0} -- sh -c 'tty; stty size'"), || true, &[]);
    assert_eq!(code, Some(0), "{screen}");
    assert!(screen.contains("/dev/pts/"), "exec -t gives the process a terminal: {screen}");

    attach(&kc);
    debug(&kc, &web0);
    let reclaimed = persistent_volumes(&kc, &up);

    // ConfigMap and Secret volumes and env, init containers first, downward API.
    apply(&kc, CONFIG);
    wait_for(60, "the configured pod to succeed", || {
        Some(()).filter(|_| pod(&kc, "configured")["status"]["phase"] == "Succeeded")
    });
    let logs = ok(&kc, &["logs", "configured"]);
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(
        lines[..5],
        ["init-ran-first", "hello-from-configmap", "s3cr3t", "env=hello-from-configmap/s3cr3t/configured", "default"],
        "{logs}"
    );
    // The projected ServiceAccount token, bound to the pod, authenticates.
    let token = lines.get(5).copied().unwrap_or_default();
    assert_eq!(token.split('.').count(), 3, "a JWT: {logs}");
    let kc_text = std::fs::read_to_string(&kc).unwrap();
    let server = kc_text.lines().find_map(|l| l.trim().strip_prefix("server: ")).unwrap();
    let token_kc = up.dir.path().join("token-kubeconfig");
    let ca = up.dir.path().join("ca.crt");
    // JSON is YAML: a kubeconfig with the token as its only credential.
    let config = serde_json::json!({
        "apiVersion": "v1", "kind": "Config", "current-context": "x",
        "clusters": [{"name": "c", "cluster": {"server": server, "certificate-authority": ca}}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
    });
    std::fs::write(&token_kc, config.to_string()).unwrap();
    let who = ok(&token_kc, &["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"]);
    assert_eq!(who, "system:serviceaccount:default:default");
    assert_eq!(
        pod(&kc, "configured")["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"],
        "Completed"
    );

    // A Job runs to completion.
    ok(&kc, &["create", "job", "once", "--image=busybox:stable", "--", "sh", "-c", "echo job-done"]);
    ok(&kc, &["wait", "--for=condition=complete", "job/once", "--timeout=90s"]);
    assert!(ok(&kc, &["logs", "job/once"]).contains("job-done"));

    // Probes, OOM, log following.
    apply(&kc, PROBED);
    wait_for(60, "probed to run", || {
        Some(()).filter(|_| container_status(&kc, "probed")["state"]["running"].is_object())
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(container_status(&kc, "probed")["ready"], false, "readiness gates Ready");
    ok(&kc, &["exec", "probed", "--", "touch", "/tmp/ready"]);
    wait_for(30, "probed to be Ready", || Some(()).filter(|_| container_status(&kc, "probed")["ready"] == true));
    ok(&kc, &["exec", "probed", "--", "rm", "/tmp/alive"]);
    wait_for(60, "a liveness restart", || {
        Some(()).filter(|_| container_status(&kc, "probed")["restartCount"].as_u64() >= Some(1))
    });
    // The agent's Events tell the story, as the kubelet's do.
    let probed_uid = pod(&kc, "probed")["metadata"]["uid"].as_str().unwrap().to_string();
    let reasons = wait_for(30, "probed's events", || {
        let events = json_of(&kc, &["get", "events"]);
        let mine: Vec<Value> = events["items"]
            .as_array()?
            .iter()
            .filter(|e| e["involvedObject"]["uid"] == probed_uid.as_str() && e["source"]["component"] == "kubelet")
            .cloned()
            .collect();
        let has = |reason: &str| mine.iter().any(|e| e["reason"] == reason);
        ["Pulled", "Created", "Started", "Unhealthy", "Killing"].iter().all(|r| has(r)).then_some(mine)
    });
    for e in &reasons {
        assert_eq!(e["source"]["host"], "node-1", "{e}");
        assert_eq!(e["involvedObject"]["fieldPath"], "spec.containers{app}", "{e}");
    }
    let unhealthy = reasons.iter().find(|e| e["reason"] == "Unhealthy").unwrap();
    assert_eq!(unhealthy["type"], "Warning");
    let messages: Vec<&str> =
        reasons.iter().filter(|e| e["reason"] == "Unhealthy").filter_map(|e| e["message"].as_str()).collect();
    assert!(messages.iter().any(|m| m.starts_with("Liveness probe failed")), "{messages:?}");
    let killing = reasons.iter().find(|e| e["reason"] == "Killing").unwrap();
    assert!(killing["message"].as_str().unwrap().contains("will be restarted"), "{killing}");
    let described = ok(&kc, &["describe", "pod", "probed"]);
    assert!(described.contains("Unhealthy") && described.contains("Liveness probe failed"), "{described}");
    wait_for(60, "hog to be OOM-killed", || {
        let s = container_status(&kc, "hog");
        Some(()).filter(|_| s["state"]["terminated"]["reason"] == "OOMKilled")
    });
    let mut follow = Command::new("kubectl")
        .env("KUBECONFIG", &kc)
        .args(["logs", "-f", "ticker"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(60, "ticker to run", || {
        Some(()).filter(|_| container_status(&kc, "ticker")["state"]["running"].is_object())
    });
    let mut lines = BufReader::new(follow.stdout.take().unwrap()).lines();
    let first: Vec<String> = (0..5).map(|_| lines.next().unwrap().unwrap()).collect();
    assert!(first.iter().all(|l| l.starts_with("tick ")), "{first:?}");
    let _ = follow.kill();
    let _ = follow.wait();

    // Lifecycle hooks: postStart after the start, preStop before the stop.
    let hooks = up.dir.path().join("hooks");
    apply(&kc, &HOOKED.replace("HOSTDIR", &hooks.display().to_string()));
    wait_for(60, "the postStart hook", || {
        std::fs::read_to_string(hooks.join("poststart")).ok().filter(|s| s.trim() == "post")
    });
    ok(&kc, &["delete", "pod", "hooked", "--timeout=60s"]);
    assert_eq!(std::fs::read_to_string(hooks.join("prestop")).unwrap_or_default().trim(), "pre", "preStop ran");

    // Killing a container's process: restarted at once, restartCount 1, --previous logs.
    let id =
        container_status(&kc, &web0)["containerID"].as_str().unwrap().trim_start_matches("containerd://").to_string();
    ctr(&up, &["task", "kill", "-s", "SIGKILL", &id]);
    wait_for(30, "the killed container to be restarted", || {
        let s = container_status(&kc, &web0);
        Some(()).filter(|_| s["restartCount"] == 1 && s["state"]["running"].is_object())
    });
    let s = container_status(&kc, &web0);
    assert_eq!(s["lastState"]["terminated"]["exitCode"], 137);
    assert!(ok(&kc, &["logs", &web0, "--previous"]).contains(&format!("started {web0}")));

    // Bad input: each surfaces as a clear reason.
    apply(&kc, BAD);
    wait_for(60, "ErrImagePull", || {
        waiting_reason(&kc, "no-image").filter(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
    });
    let msg = container_status(&kc, "no-image")["state"]["waiting"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("127.0.0.1:1/nothing/here:1"), "{msg}");
    wait_for(30, "a Failed pull event", || {
        let events = json_of(&kc, &["get", "events", "--field-selector", "involvedObject.name=no-image"]);
        events["items"]
            .as_array()?
            .iter()
            .find(|e| e["reason"] == "Failed" && e["type"] == "Warning")
            .and_then(|e| e["message"].as_str().filter(|m| m.starts_with("Failed to pull image")).map(str::to_string))
    });
    wait_for(60, "the bad command to fail", || {
        let s = container_status(&kc, "bad-command");
        let reason = s["state"]["waiting"]["reason"]
            .as_str()
            .or(s["state"]["terminated"]["reason"].as_str())
            .map(str::to_string);
        reason.filter(|r| r == "RunContainerError" || r == "StartError" || r == "Error")
    });
    let reason = wait_for(60, "the missing ConfigMap to be reported", || {
        waiting_reason(&kc, "missing-config").filter(|r| r == "CreateContainerConfigError")
    });
    assert_eq!(reason, "CreateContainerConfigError");
    let msg =
        container_status(&kc, "missing-config")["state"]["waiting"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("does-not-exist"), "{msg}");

    // Pulls from a real registry: Debian's docker-registry on loopback
    // behind basic auth, the busybox archive pushed there with skopeo. With
    // the imagePullSecret the pod runs; without it the pull is refused.
    let registry = LoopbackRegistry::start(up.dir.path(), true).unwrap();
    let image = registry.push(&up.dir.path().join("images/busybox.tar"), "team/busybox:e2e", true).unwrap();
    ok(
        &kc,
        &[
            "create",
            "secret",
            "docker-registry",
            "regcred",
            &format!("--docker-server={}", registry.host()),
            &format!("--docker-username={USER}"),
            &format!("--docker-password={PASSWORD}"),
        ],
    );
    apply(&kc, &PULLED.replace("IMAGE", &image));
    wait_for(90, "the pulled pod to succeed", || {
        Some(()).filter(|_| pod(&kc, "pulled")["status"]["phase"] == "Succeeded")
    });
    assert!(ok(&kc, &["logs", "pulled"]).contains("pulled from the registry"));
    wait_for(60, "the pull without credentials to fail", || {
        waiting_reason(&kc, "unpulled").filter(|r| r == "ErrImagePull" || r == "ImagePullBackOff")
    });
    let msg = container_status(&kc, "unpulled")["state"]["waiting"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("credentials"), "{msg}");

    // Fail-static: cut the agent off from every master (its QUIC traffic
    // to their node gateways dropped by nftables); its containers keep
    // serving; a pod created meanwhile starts once the masters are back.
    let ip0 = json_of(&kc, &["get", "pod", &web0])["status"]["podIP"].as_str().unwrap().to_string();
    let cuts: Vec<capstan_chaos::cluster::Partition> = (0..3)
        .map(|i| {
            let port: u16 = common::node_addr(&up, i).rsplit_once(':').unwrap().1.parse().unwrap();
            capstan_chaos::cluster::Partition::isolate(port).unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_secs(8));
    assert!(http_get(&ip0, 8080).contains("pod="), "pods keep serving while no master is reachable");
    ok(&kc, &["run", "latecomer", "--image=busybox:stable", "--image-pull-policy=IfNotPresent", "--", "sleep", "3600"]);
    std::thread::sleep(Duration::from_secs(3));
    assert_ne!(pod(&kc, "latecomer")["status"]["phase"], "Running", "the agent cannot have heard of it yet");
    drop(cuts);
    wait_for(60, "the agent to catch up", || {
        Some(()).filter(|_| pod(&kc, "latecomer")["status"]["phase"] == "Running")
    });
    assert_eq!(container_status(&kc, &web0)["restartCount"], 1, "nothing restarted while cut off");
    ok(&kc, &["delete", "pod", "latecomer", "--wait=false"]);

    // kill -9 the agent: containers keep running (they serve HTTP the whole
    // time; capstan up restarts the agent at once, and the new agent
    // replaces the old one's containerd); the restarted agent adopts them.
    let before: Vec<(String, String, String)> = json_of(&kc, &["get", "pods", "-l", "app=web"])["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap().to_string(),
                p["status"]["containerStatuses"][0]["containerID"].as_str().unwrap().to_string(),
                p["status"]["podIP"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let agent_pid = agent_pid(&up);
    unsafe {
        libc::kill(agent_pid as i32, libc::SIGKILL);
    }
    for (name, _, ip) in &before {
        assert!(http_get(ip, 8080).contains(&format!("pod={name}")), "{name} serves on without its agent");
    }
    wait_for(60, "capstan up to restart the agent", || {
        Some(()).filter(|_| agent_pid_now(&up).is_some_and(|p| p != agent_pid))
    });
    std::thread::sleep(Duration::from_secs(5));
    for (name, cid, ip) in &before {
        assert!(http_get(ip, 8080).contains(&format!("pod={name}")), "{name} still serves");
        let s = container_status(&kc, name);
        assert_eq!(s["containerID"].as_str(), Some(cid.as_str()), "{name} adopted, not restarted");
        let restarts = if *name == web0 { 1 } else { 0 };
        assert_eq!(s["restartCount"], restarts, "{name}");
    }

    // Deleting everything leaves no containers, tasks, network namespaces or mounts.
    for what in [
        ["deploy", "web"],
        ["pod", "configured"],
        ["pod", "probed"],
        ["pod", "hog"],
        ["pod", "ticker"],
        ["job", "once"],
    ] {
        ok(&kc, &["delete", what[0], what[1], "--wait=false"]);
    }
    for p in ["no-image", "bad-command", "missing-config", "pulled", "unpulled"] {
        ok(&kc, &["delete", "pod", p, "--wait=false"]);
    }
    wait_for(120, "every pod to go", || {
        Some(()).filter(|_| json_of(&kc, &["get", "pods"])["items"].as_array().unwrap().is_empty())
    });
    wait_for(30, "containers and tasks to go", || {
        Some(()).filter(|_| {
            ctr(&up, &["containers", "list", "-q"]).trim().is_empty()
                && ctr(&up, &["task", "list", "-q"]).trim().is_empty()
        })
    });
    let netns = node_dir(&up).join("netns");
    let left: Vec<String> = std::fs::read_dir(&netns)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "network namespaces left: {left:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let pod_mounts: Vec<&str> =
        mounts.lines().filter(|l| l.contains(&format!("{}/pods/", node_dir(&up).display()))).collect();
    assert!(pod_mounts.is_empty(), "volume mounts left: {pod_mounts:?}");
    // The agent sweeps its local-path root every minute.
    wait_for(90, "the deleted volume's directory to be removed", || Some(()).filter(|_| !reclaimed.exists()));
}

/// The agent's PID, from its containerd's parent... simpler: the process
/// whose command line names the node's data dir.
fn agent_pid_now(up: &common::Up) -> Option<u32> {
    let want = format!("{}", node_dir(up).display());
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        let is_agent = args.first().is_some_and(|a| a.ends_with("capstan-node"))
            && args.contains(&want)
            && !args.iter().any(|a| a == "log-driver");
        is_agent.then_some(pid)
    })
}

fn agent_pid(up: &common::Up) -> u32 {
    agent_pid_now(up).expect("the node agent runs")
}

/// Runs `kubectl <args>` in a terminal (util-linux `script` gives it a
/// pty), types each of `input` (half a second apart) once `ready` holds,
/// and returns kubectl's exit code and everything the terminal showed.
/// The input stays open until kubectl exits: at end of input `script`
/// would type ^D.
fn in_terminal(kc: &Path, args: &str, ready: impl Fn() -> bool, input: &[&str]) -> (Option<i32>, String) {
    // Bounded: a kubectl that hangs cannot outlive the test.
    let mut child = Command::new("timeout")
        .args(["120", "script", "-qfec", &format!("kubectl {args}"), "/dev/null"])
        .env("KUBECONFIG", kc)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("util-linux script");
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        String::from_utf8_lossy(&b).into_owned()
    });
    let mut stdin = child.stdin.take().unwrap();
    if !input.is_empty() {
        wait_for(90, "the terminal's target to be ready", || Some(()).filter(|_| ready()));
        // kubectl attaches once the pod runs; typing may start before that
        // (the terminal keeps it), but not before the process is there.
        std::thread::sleep(Duration::from_millis(1500));
        for line in input {
            stdin.write_all(line.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let status = wait_for(130, &format!("kubectl {args} to end"), || child.try_wait().unwrap());
    drop(stdin);
    (status.code(), reader.join().unwrap())
}

/// `kubectl attach` and `kubectl run -it`: a container's main process, its
/// output as it writes it (streams apart), its terminal and stdin.
fn attach(kc: &Path) {
    apply(kc, TALKER);
    ok(kc, &["wait", "--for=condition=Ready", "pod/talker", "--timeout=60s"]);
    std::thread::sleep(Duration::from_secs(1));
    let out =
        Command::new("timeout").args(["4", "kubectl", "attach", "talker"]).env("KUBECONFIG", kc).output().unwrap();
    assert_eq!(out.status.code(), Some(124), "attach lasts until the client leaves");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("tick-") && !stdout.contains("tock-"), "stdout: {stdout}");
    assert!(stderr.contains("tock-"), "stderr apart: {stderr}");
    // Only what is written from now on (the log has the earlier lines).
    assert!(!stdout.contains("tick-1\n"), "{stdout}");
    // stdin to a container made without it: a clear refusal.
    let (good, _, err) = kubectl(kc, &["attach", "-i", "talker"], Some(""));
    assert!(!good && err.contains("was not created with stdin"), "{err}");
    ok(kc, &["delete", "pod", "talker", "--grace-period=1"]);

    // kubectl run -i --rm without a terminal: piped stdin, both streams,
    // the exit code.
    let mut run = Command::new("timeout")
        .args(["120", "kubectl", "run", "-i", "--rm", "--restart=Never", "piped", "--image=busybox:stable"])
        .args(["--image-pull-policy=Never", "--", "sh"])
        .env("KUBECONFIG", kc)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    run.stdin.take().unwrap().write_all(b"echo piped-$((5*5))\necho to-err >&2\nexit 4\n").unwrap();
    let out = run.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("piped-25") && stderr.contains("to-err"), "{stdout} / {stderr}");
    assert_eq!(out.status.code(), Some(4), "{stdout} / {stderr}");

    // kubectl run -it --rm: a shell, its answers, its exit code, the pod gone.
    let running = || {
        let (good, out, _) = kubectl(kc, &["get", "pod", "shell", "-o", "jsonpath={.status.phase}"], None);
        good && out == "Running"
    };
    let (code, screen) = in_terminal(
        kc,
        "run -it --rm --restart=Never shell --image=busybox:stable --image-pull-policy=Never -- sh",
        running,
        &["echo answer-$((6*7))\n", "exit 3\n"],
    );
    assert!(screen.contains("answer-42"), "the shell answered through the attach: {screen}");
    assert_eq!(code, Some(3), "kubectl run reports the shell's exit code: {screen}");
    wait_for(30, "kubectl run --rm to delete the pod", || {
        Some(()).filter(|_| !kubectl(kc, &["get", "pod", "shell"], None).0)
    });
}

/// `kubectl debug -it --target`: an ephemeral container joins a running
/// pod (its network, and the target container's processes), runs once,
/// and leaves the pod as it was.
fn debug(kc: &Path, target: &str) {
    let state = || pod(kc, target)["status"]["ephemeralContainerStatuses"][0]["state"].clone();
    let (code, screen) = in_terminal(
        kc,
        &format!("debug -it {target} -c dbg --target=httpd --image=busybox:stable --image-pull-policy=Never -- sh"),
        || state()["running"].is_object(),
        &["echo debugging-$((6*7))\n", "wget -qO- 127.0.0.1:8080\n", "ps -o pid,args\n", "exit\n"],
    );
    assert!(screen.contains("debugging-42"), "{screen}");
    assert!(screen.contains(&format!("pod={target}")), "the debugger shares the pod's network: {screen}");
    assert!(screen.contains("httpd -f -p 8080"), "--target shares the target's processes: {screen}");
    assert_eq!(code, Some(0), "{screen}");
    let exited = wait_for(30, "the debugger's status to show its exit", || {
        Some(state()).filter(|s| s["terminated"].is_object())
    });
    assert_eq!(exited["terminated"]["exitCode"], 0, "{exited}");
    let p = pod(kc, target);
    assert_eq!(p["status"]["phase"], "Running");
    assert_eq!(p["status"]["containerStatuses"][0]["restartCount"], 0, "the pod's own container untouched");
    // Ephemeral containers are added, never changed or removed.
    let mut without = p.clone();
    without["spec"]["ephemeralContainers"] = serde_json::json!([]);
    let url = format!("/api/v1/namespaces/default/pods/{target}/ephemeralcontainers");
    let (good, _, err) = kubectl(kc, &["replace", "--raw", &url, "-f", "-"], Some(&without.to_string()));
    assert!(!good && err.contains("may not be removed"), "{err}");
    // Nor does a pod's spec change once it exists (the node runs what it got).
    let patch = r#"{"spec":{"containers":[{"name":"httpd","command":["true"]}]}}"#;
    let (good, _, err) = kubectl(kc, &["patch", "pod", target, "-p", patch], None);
    assert!(!good && err.contains("pod updates may not change fields"), "{err}");
}

const TALKER: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: talker}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:stable
    imagePullPolicy: Never
    command: ["sh", "-c", "i=0; while true; do i=$((i+1)); echo tick-$i; echo tock-$i >&2; sleep 0.3; done"]
"#;
