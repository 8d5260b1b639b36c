//! Tests of proxy.rs: the planner on JSON fixtures (pure), then, as root,
//! nft's own check of every planned script and the rules at work on the
//! real kernel (a bridge, two pod namespaces, a Service of each kind).

use super::*;
use serde_json::json;

fn service(ns: &str, name: &str, spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name}, "spec": spec})
}

fn endpoints(ns: &str, name: &str, subsets: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"namespace": ns, "name": name}, "subsets": subsets})
}

/// default/web: 10.96.0.10:80/TCP, two ready pods and one not ready.
fn web() -> (Value, Value) {
    (
        service("default", "web", json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}]})),
        endpoints(
            "default",
            "web",
            json!([{
                "addresses": [{"ip": "10.244.2.7"}, {"ip": "10.244.1.5"}],
                "notReadyAddresses": [{"ip": "10.244.3.9"}],
                "ports": [{"port": 8080, "protocol": "TCP"}],
            }]),
        ),
    )
}

/// The body of chain `name` (the lines between its braces), if any.
fn chain<'a>(script: &'a str, name: &str) -> Option<&'a str> {
    let start = script.find(&format!("\tchain {name} {{\n"))?;
    let body = &script[start..];
    let body = &body[body.find('\n')? + 1..];
    Some(&body[..body.find("\n\t}\n")?])
}

/// The elements of map or set `name`, as written.
fn elements_of(script: &str, name: &str) -> Vec<String> {
    let start = script.find(&format!("\tmap {name} {{\n")).or_else(|| script.find(&format!("\tset {name} {{\n")));
    let Some(start) = start else { panic!("no set {name} in\n{script}") };
    let body = &script[start..];
    let body = &body[..body.find("\n\t}\n").unwrap()];
    match body.split_once("elements = { ") {
        Some((_, rest)) => rest.trim_end().trim_end_matches('}').trim().split(", ").map(str::to_string).collect(),
        None => vec![],
    }
}

#[test]
fn a_port_with_ready_endpoints_is_dnated_to_one_of_them_at_random() {
    let (svc, eps) = web();
    let s = plan("capstan-n1", &[svc], &[eps]);
    assert!(s.starts_with("add table ip capstan-n1\ndelete table ip capstan-n1\ntable ip capstan-n1 {\n"), "{s}");
    assert_eq!(elements_of(&s, "service-ips"), ["10.96.0.10 . tcp . 80 : goto svc-default/web/tcp/80"]);
    // Sorted by address; the not-ready pod is left out.
    assert_eq!(
        chain(&s, "svc-default/web/tcp/80").unwrap(),
        "\t\tmeta mark set meta mark | 0x4000\n\
         \t\tmeta l4proto tcp dnat to numgen random mod 2 map { 0 : 10.244.1.5 . 8080, 1 : 10.244.2.7 . 8080 }"
    );
    assert!(!s.contains("10.244.3.9"), "{s}");
    assert!(elements_of(&s, "no-endpoint-services").is_empty());
    assert!(elements_of(&s, "service-nodeports").is_empty(), "a ClusterIP Service has no nodePort");
    // Both the pods' traffic and the host's reach the lookup.
    assert!(chain(&s, "nat-prerouting").unwrap().contains("type nat hook prerouting priority dstnat"));
    assert!(chain(&s, "nat-output").unwrap().contains("type nat hook output priority -100"));
    assert!(chain(&s, "nat-prerouting").unwrap().ends_with("jump services"));
    assert!(chain(&s, "nat-output").unwrap().ends_with("jump services"));
    assert!(chain(&s, "nat-postrouting")
        .unwrap()
        .contains("meta mark & 0x4000 == 0x4000 ct status dnat masquerade fully-random"));
    assert!(s.ends_with("}\n"));
}

#[test]
fn headless_and_external_name_services_get_no_rules() {
    let headless = service("default", "db", json!({"clusterIP": "None", "ports": [{"port": 5432}]}));
    let external = service("default", "ext", json!({"type": "ExternalName", "externalName": "example.com"}));
    let eps = endpoints("default", "db", json!([{"addresses": [{"ip": "10.244.1.5"}], "ports": [{"port": 5432}]}]));
    let s = plan("t", &[headless, external], &[eps]);
    assert_eq!(s, plan("t", &[], &[]));
    assert!(!s.contains("chain svc-"), "{s}");
    // With nothing to serve, the service CIDR is still closed.
    assert!(chain(&s, "reject-unserved").unwrap().contains("ip daddr 10.96.0.0/16 jump reject-packet"));
}

#[test]
fn a_port_without_ready_endpoints_is_rejected() {
    let spec = |ip: &str| json!({"clusterIP": ip, "ports": [{"port": 80}]});
    let services = [
        service("d", "missing", spec("10.96.0.20")),
        service("d", "empty", spec("10.96.0.21")),
        service("d", "not-ready", spec("10.96.0.22")),
    ];
    let eps = [
        endpoints("d", "empty", json!([])),
        endpoints("d", "not-ready", json!([{"notReadyAddresses": [{"ip": "10.244.1.5"}], "ports": [{"port": 8080}]}])),
    ];
    let s = plan("t", &services, &eps);
    assert!(elements_of(&s, "service-ips").is_empty(), "{s}");
    assert_eq!(
        elements_of(&s, "no-endpoint-services"),
        ["10.96.0.21 . tcp . 80", "10.96.0.20 . tcp . 80", "10.96.0.22 . tcp . 80"]
    );
    assert!(!s.contains("chain svc-"), "{s}");
    // TCP gets a reset, the rest port-unreachable: refused at once either way.
    assert_eq!(chain(&s, "reject-packet").unwrap(), "\t\tmeta l4proto tcp reject with tcp reset\n\t\treject");
    for hook in ["filter-forward", "filter-output", "filter-input"] {
        let c = chain(&s, hook).unwrap();
        assert!(c.contains("priority filter - 10") && c.ends_with("jump reject-unserved"), "{hook}: {c}");
    }
}

#[test]
fn named_ports_pick_their_endpoints_by_name_and_protocol() {
    let svc = service(
        "kube-system",
        "dns",
        json!({"clusterIP": "10.96.0.53", "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP"},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            {"name": "metrics", "port": 9153},
            {"name": "sctp", "port": 7777, "protocol": "SCTP"},
        ]}),
    );
    let eps = endpoints(
        "kube-system",
        "dns",
        json!([
            {
                "addresses": [{"ip": "10.244.1.2"}],
                "ports": [
                    {"name": "dns", "port": 5353, "protocol": "UDP"},
                    {"name": "dns-tcp", "port": 5353, "protocol": "TCP"},
                    // Same name, other protocol: serves no port of ours.
                    {"name": "metrics", "port": 9999, "protocol": "UDP"},
                ],
            },
            {
                "addresses": [{"ip": "10.244.2.2"}],
                "ports": [{"name": "metrics", "port": 9153}, {"name": "sctp", "port": 7000, "protocol": "SCTP"}],
            },
        ]),
    );
    let s = plan("t", &[svc], &[eps]);
    assert_eq!(
        elements_of(&s, "service-ips"),
        [
            "10.96.0.53 . tcp . 53 : goto svc-kube-system/dns/tcp/53",
            "10.96.0.53 . udp . 53 : goto svc-kube-system/dns/udp/53",
            "10.96.0.53 . sctp . 7777 : goto svc-kube-system/dns/sctp/7777",
            "10.96.0.53 . tcp . 9153 : goto svc-kube-system/dns/tcp/9153",
        ]
    );
    let dnat = |c: &str| chain(&s, c).unwrap().lines().nth(1).unwrap().trim().to_string();
    assert_eq!(
        dnat("svc-kube-system/dns/udp/53"),
        "meta l4proto udp dnat to numgen random mod 1 map { 0 : 10.244.1.2 . 5353 }"
    );
    assert_eq!(
        dnat("svc-kube-system/dns/tcp/53"),
        "meta l4proto tcp dnat to numgen random mod 1 map { 0 : 10.244.1.2 . 5353 }"
    );
    assert_eq!(
        dnat("svc-kube-system/dns/tcp/9153"),
        "meta l4proto tcp dnat to numgen random mod 1 map { 0 : 10.244.2.2 . 9153 }"
    );
    assert_eq!(
        dnat("svc-kube-system/dns/sctp/7777"),
        "meta l4proto sctp dnat to numgen random mod 1 map { 0 : 10.244.2.2 . 7000 }"
    );

    // An unnamed service port takes the unnamed endpoint port only.
    let svc = service("d", "one", json!({"clusterIP": "10.96.0.1", "ports": [{"port": 443}]}));
    let eps = endpoints(
        "d",
        "one",
        json!([{"addresses": [{"ip": "10.0.0.1"}], "ports": [{"name": "https", "port": 6443}]},
               {"addresses": [{"ip": "10.0.0.2"}], "ports": [{"name": "", "port": 6443}]}]),
    );
    let s = plan("t", &[svc], &[eps]);
    assert!(chain(&s, "svc-d/one/tcp/443").unwrap().contains("mod 1 map { 0 : 10.0.0.2 . 6443 }"), "{s}");
}

#[test]
fn node_ports_lead_to_the_same_chain_and_are_rejected_without_endpoints() {
    let (mut svc, eps) = web();
    svc["spec"]["type"] = json!("NodePort");
    svc["spec"]["ports"][0]["nodePort"] = json!(30080);
    let lb = service(
        "default",
        "lb",
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.11", "ports": [{"port": 80, "nodePort": 30081}]}),
    );
    // A nodePort left on a ClusterIP Service (after a type change) is dead.
    let stale =
        service("default", "stale", json!({"clusterIP": "10.96.0.12", "ports": [{"port": 80, "nodePort": 30082}]}));
    let s = plan("t", &[svc, lb, stale], &[eps]);
    assert_eq!(elements_of(&s, "service-nodeports"), ["tcp . 30080 : goto svc-default/web/tcp/80"]);
    assert_eq!(elements_of(&s, "no-endpoint-nodeports"), ["tcp . 30081"]);
    assert!(chain(&s, "services")
        .unwrap()
        .contains("fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports"));
    assert!(chain(&s, "filter-input").unwrap().contains(
        "ct state new ip daddr != 127.0.0.0/8 meta l4proto . th dport @no-endpoint-nodeports jump reject-packet"
    ));
    assert!(!s.contains("30082"), "{s}");
}

#[test]
fn the_script_depends_on_the_objects_not_their_order() {
    let (web_svc, web_eps) = web();
    let a = service("a", "z", json!({"clusterIP": "10.96.9.9", "ports": [{"port": 90}, {"port": 9}]}));
    let b = service("b", "a", json!({"clusterIP": "10.96.8.8", "ports": [{"port": 1}]}));
    let a_eps = endpoints(
        "a",
        "z",
        json!([{"addresses": [{"ip": "10.1.0.3"}, {"ip": "10.1.0.1"}, {"ip": "10.1.0.2"}], "ports": [{"port": 7}]},
               {"addresses": [{"ip": "10.1.0.1"}], "ports": [{"port": 7}]}]),
    );
    let one = plan("t", &[web_svc.clone(), a.clone(), b.clone()], &[web_eps.clone(), a_eps.clone()]);
    let two = plan("t", &[b, web_svc, a], &[a_eps, web_eps]);
    assert_eq!(one, two);
    // Chains follow namespace, name, port; endpoints are sorted, once each.
    let chains: Vec<&str> = one.lines().filter_map(|l| l.strip_prefix("\tchain svc-")).collect();
    assert_eq!(chains, ["a/z/tcp/9 {", "a/z/tcp/90 {", "default/web/tcp/80 {"]);
    assert!(chain(&one, "svc-a/z/tcp/9")
        .unwrap()
        .contains("mod 3 map { 0 : 10.1.0.1 . 7, 1 : 10.1.0.2 . 7, 2 : 10.1.0.3 . 7 }"));
}

#[test]
fn malformed_objects_are_skipped_without_panicking() {
    let (web_svc, web_eps) = web();
    let junk_services = vec![
        json!(null),
        json!("Service"),
        json!([]),
        json!({}),
        json!({"metadata": {"name": "x"}, "spec": {"clusterIP": "10.96.0.30", "ports": [{"port": 80}]}}),
        service("d", "Bad Name", json!({"clusterIP": "10.96.0.31", "ports": [{"port": 80}]})),
        service("d", "inject\n}\nflush ruleset", json!({"clusterIP": "10.96.0.32", "ports": [{"port": 80}]})),
        service("d", "no-spec", json!(null)),
        service("d", "bad-ip", json!({"clusterIP": "10.96.0.300", "ports": [{"port": 80}]})),
        service("d", "octal-ip", json!({"clusterIP": "010.96.0.1", "ports": [{"port": 80}]})),
        service("d", "v6", json!({"clusterIP": "fd00::10", "ports": [{"port": 80}]})),
        service("d", "no-ip", json!({"ports": [{"port": 80}]})),
        service("d", "ports-not-list", json!({"clusterIP": "10.96.0.33", "ports": {"port": 80}})),
        service(
            "d",
            "bad-ports",
            json!({"type": "NodePort", "clusterIP": "10.96.0.34", "ports": [
                {"port": 0}, {"port": 65536}, {"port": -1}, {"port": "80"}, {"port": 80.5}, {},
                {"port": 81, "protocol": "ICMP"}, {"port": 82, "protocol": "tcp"}, {"port": 83, "name": 7},
                {"port": 84, "nodePort": 70000}, {"port": 85, "nodePort": "30000"},
            ]}),
        ),
        service("d", &"x".repeat(64), json!({"clusterIP": "10.96.0.37", "ports": [{"port": 80}]})),
        service("d", "weird-type", json!({"type": "Magic", "clusterIP": "10.96.0.35", "ports": [{"port": 80}]})),
        service("d", "type-not-string", json!({"type": 1, "clusterIP": "10.96.0.36", "ports": [{"port": 80}]})),
    ];
    let junk_endpoints = vec![
        json!(null),
        json!({"metadata": {"namespace": "d", "name": "bad-ports"}, "subsets": "nope"}),
        endpoints(
            "d",
            "bad-ports",
            json!([null, {"addresses": "x"}, {"addresses": [{"ip": "10.1.1.1"}], "ports": [{"port": 99999}]},
                   {"addresses": [{"ip": 5}, {"ip": "fd00::1"}, {"ip": "10.1.1.300"}, {}], "ports": [{"port": 8080}]}]),
        ),
    ];
    let mut services = junk_services.clone();
    services.push(web_svc.clone());
    let mut eps = junk_endpoints.clone();
    eps.push(web_eps.clone());
    let s = plan("t", &services, &eps);
    assert_eq!(elements_of(&s, "service-ips"), ["10.96.0.10 . tcp . 80 : goto svc-default/web/tcp/80"]);
    // bad-ports keeps its valid ports (84 and 85 without their bad
    // nodePorts); none has a usable endpoint.
    assert_eq!(elements_of(&s, "no-endpoint-services"), ["10.96.0.34 . tcp . 84", "10.96.0.34 . tcp . 85"]);
    assert!(elements_of(&s, "no-endpoint-nodeports").is_empty());
    assert!(!s.contains("flush"), "{s}");
    // The table name cannot inject either.
    let s = plan("x\nflush ruleset", &[], &[]);
    assert!(s.starts_with("add table ip x_flush_ruleset\n"), "{s}");
    assert!(plan("1x", &[], &[]).starts_with("add table ip _1x\n"));
}

#[test]
fn duplicate_keys_keep_the_first_in_order() {
    let (web_svc, web_eps) = web();
    // Two Services claiming one cluster IP and port, and one nodePort.
    let mut twin =
        service("default", "web2", json!({"clusterIP": "10.96.0.10", "ports": [{"port": 80}, {"port": 81}]}));
    twin["spec"]["type"] = json!("NodePort");
    twin["spec"]["ports"][1]["nodePort"] = json!(30080);
    let mut web_np = web_svc.clone();
    web_np["spec"]["type"] = json!("NodePort");
    web_np["spec"]["ports"][0]["nodePort"] = json!(30080);
    let s = plan("t", &[twin, web_np], std::slice::from_ref(&web_eps));
    assert_eq!(elements_of(&s, "service-ips"), ["10.96.0.10 . tcp . 80 : goto svc-default/web/tcp/80"]);
    assert_eq!(elements_of(&s, "no-endpoint-services"), ["10.96.0.10 . tcp . 81"]);
    assert_eq!(elements_of(&s, "service-nodeports"), ["tcp . 30080 : goto svc-default/web/tcp/80"]);
    assert!(elements_of(&s, "no-endpoint-nodeports").is_empty(), "{s}");

    // One Service given twice with two cluster IPs: one chain, whatever the order.
    let mut moved = web_svc.clone();
    moved["spec"]["clusterIP"] = json!("10.96.0.99");
    let one = plan("t", &[web_svc.clone(), moved.clone()], std::slice::from_ref(&web_eps));
    assert_eq!(one, plan("t", &[moved, web_svc.clone()], std::slice::from_ref(&web_eps)));
    assert_eq!(one.matches("\tchain svc-default/web/tcp/80 {").count(), 1, "{one}");
    assert_eq!(elements_of(&one, "service-ips"), ["10.96.0.10 . tcp . 80 : goto svc-default/web/tcp/80"]);
    // Its Endpoints given twice: the addresses of both.
    let other = endpoints("default", "web", json!([{"addresses": [{"ip": "10.244.9.9"}], "ports": [{"port": 8080}]}]));
    let s = plan("t", &[web_svc], &[other, web_eps]);
    assert!(chain(&s, "svc-default/web/tcp/80").unwrap().contains("mod 3 map"), "{s}");
}

#[test]
fn dual_stack_services_use_their_ipv4_address() {
    let svc = service(
        "d",
        "dual",
        json!({"clusterIP": "fd00::10", "clusterIPs": ["fd00::10", "10.96.0.40"], "ports": [{"port": 80}]}),
    );
    let eps = endpoints(
        "d",
        "dual",
        json!([{"addresses": [{"ip": "fd00::5"}, {"ip": "10.244.1.5"}], "ports": [{"port": 80}]}]),
    );
    let s = plan("t", &[svc], &[eps]);
    assert_eq!(elements_of(&s, "service-ips"), ["10.96.0.40 . tcp . 80 : goto svc-d/dual/tcp/80"]);
    assert!(!s.contains("fd00"), "{s}");
}

#[test]
fn table_names_are_nft_identifiers_of_at_most_64_chars() {
    assert_eq!(table_name("node-1"), "capstan-node-1");
    assert_eq!(table_name("n1.example.com"), "capstan-n1_example_com");
    assert_eq!(table_name("ünï côde"), "capstan-_n__c_de");
    let long_a = format!("{}-a", "x".repeat(80));
    let long_b = format!("{}-b", "x".repeat(80));
    assert_eq!(table_name(&long_a).len(), 64);
    assert_ne!(table_name(&long_a), table_name(&long_b), "long names stay apart");
    assert_eq!(table_name(&long_a), table_name(&long_a));
    for n in ["node-1", "a.b", &long_a, ""] {
        let t = table_name(n);
        assert_eq!(table_ident(&t), t, "plan and remove use it unchanged");
    }
}

// ---- root: nft itself and the kernel ----

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `nft <args> -f -` on `script`, synchronously (Drop guards use it).
fn nft_sync(args: &[&str], script: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(args)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child.stdin.take().map(|mut w| w.write_all(script.as_bytes())).transpose().map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn nft_accepts_every_planned_script() {
    if !is_root() {
        eprintln!("skipping: nft -c needs root");
        return;
    }
    let (web_svc, web_eps) = web();
    let mut np = web_svc.clone();
    np["spec"]["type"] = json!("NodePort");
    np["spec"]["ports"][0]["nodePort"] = json!(30080);
    let dns = service(
        "kube-system",
        "dns",
        json!({"type": "LoadBalancer", "clusterIP": "10.96.0.53", "ports": [
            {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
            {"name": "dns-tcp", "port": 53, "protocol": "TCP", "nodePort": 30053},
            {"name": "sctp", "port": 7777, "protocol": "SCTP", "nodePort": 30077},
        ]}),
    );
    let dns_eps = endpoints(
        "kube-system",
        "dns",
        json!([{"addresses": [{"ip": "10.244.1.2"}, {"ip": "10.244.1.3"}],
                "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}, {"name": "sctp", "port": 7, "protocol": "SCTP"}]}]),
    );
    let many: Vec<Value> = (0..300)
        .map(|i| {
            service(
                "load",
                &format!("s{i}"),
                json!({"clusterIP": format!("10.96.{}.{}", 100 + i / 250, i % 250 + 1), "ports": [{"port": 80}]}),
            )
        })
        .collect();
    let many_eps: Vec<Value> = (0..300)
        .filter(|i| i % 3 != 0)
        .map(|i| {
            endpoints("load", &format!("s{i}"), json!([{"addresses": (1..=i % 7 + 1).map(|k| json!({"ip": format!("10.245.{}.{k}", i % 250)})).collect::<Vec<_>>(), "ports": [{"port": 8080}]}]))
        })
        .collect();
    let headless = service("d", "h", json!({"clusterIP": "None", "ports": [{"port": 80}]}));
    let fixtures: Vec<(&str, Vec<Value>, Vec<Value>)> = vec![
        ("nothing", vec![], vec![]),
        ("web", vec![web_svc.clone()], vec![web_eps.clone()]),
        ("no endpoints", vec![web_svc.clone()], vec![]),
        ("nodeport", vec![np.clone()], vec![web_eps.clone()]),
        ("nodeport without endpoints", vec![np], vec![]),
        ("dns", vec![dns, headless], vec![dns_eps]),
        ("300 services", many, many_eps),
    ];
    let table = format!("capstan-test-{}-check", std::process::id());
    for (what, services, eps) in fixtures {
        let script = plan(&table, &services, &eps);
        if let Err(e) = nft_sync(&["-c"], &script) {
            panic!("nft -c refused the {what} script: {e}\n{script}");
        }
    }
}

mod kernel {
    //! The rules at work: a bridge with a gateway address, like the CNI
    //! bridge plugin's, and two "pods" (network namespaces with a veth on
    //! it, hairpin on) serving TCP. Everything is named after the process
    //! id and torn down by [`Lab`]'s Drop, also when an assertion fails.

    use super::*;
    use std::io::{Read, Write};
    use std::net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket};
    use std::os::fd::AsRawFd;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    const POD_PORT: u16 = 8080;
    const POD_UDP_PORT: u16 = 5353;

    struct Lab {
        table: String,
        bridge: String,
        /// Host ends of the pods' veths.
        veths: Vec<String>,
        netns_dir: PathBuf,
        netns: Vec<PathBuf>,
        stop: Arc<AtomicBool>,
        servers: Vec<std::thread::JoinHandle<()>>,
        _tmp: tempfile::TempDir,
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for s in self.servers.drain(..) {
                let _ = s.join();
            }
            let t = &self.table;
            let _ = nft_sync(&[], &format!("add table ip {t}\ndelete table ip {t}\n"));
            for v in &self.veths {
                let _ = std::process::Command::new("ip").args(["link", "del", v]).output();
            }
            for ns in &self.netns {
                let _ = crate::netns::remove(ns);
            }
            let _ = crate::netns::release_dir(&self.netns_dir);
            let _ = std::process::Command::new("ip").args(["link", "del", &self.bridge]).output();
        }
    }

    fn run(args: &[&str]) {
        let out = std::process::Command::new(args[0]).args(&args[1..]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Moves the calling thread (only it: CLONE_NEWNET is per thread) into `ns`.
    fn enter(ns: &Path) -> std::io::Result<()> {
        let f = std::fs::File::open(ns)?;
        // SAFETY: setns on an fd we hold open.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    impl Lab {
        /// The bridge 10.243.<net>.1/24 and pods at .2, .3, ... serving POD_PORT.
        fn new(net: u8, pods: &[&'static str]) -> Lab {
            let pid = std::process::id();
            let tmp = tempfile::tempdir().unwrap();
            let mut lab = Lab {
                table: format!("capstan-test-{pid}-kernel"),
                bridge: format!("cpb{pid}"),
                veths: vec![],
                netns_dir: tmp.path().join("netns"),
                netns: vec![],
                stop: Arc::new(AtomicBool::new(false)),
                servers: vec![],
                _tmp: tmp,
            };
            let br = lab.bridge.clone();
            run(&["ip", "link", "add", &br, "type", "bridge"]);
            run(&["ip", "addr", "add", &format!("10.243.{net}.1/24"), "dev", &br]);
            run(&["ip", "link", "set", &br, "up"]);
            for (i, name) in pods.iter().enumerate() {
                let ns = crate::netns::create(&lab.netns_dir, name).unwrap();
                lab.netns.push(ns.clone());
                let (host, peer) = (format!("cpv{pid}{name}"), format!("cpp{pid}{name}"));
                run(&["ip", "link", "add", &host, "type", "veth", "peer", "name", &peer]);
                lab.veths.push(host.clone());
                run(&["ip", "link", "set", &peer, "netns", ns.to_str().unwrap()]);
                let inside = |args: &[&str]| {
                    let mut all = vec!["nsenter".to_string(), format!("--net={}", ns.display()), "ip".into()];
                    all.extend(args.iter().map(|s| s.to_string()));
                    run(&all.iter().map(String::as_str).collect::<Vec<_>>());
                };
                inside(&["link", "set", &peer, "name", "eth0"]);
                inside(&["addr", "add", &format!("10.243.{net}.{}/24", i + 2), "dev", "eth0"]);
                inside(&["link", "set", "eth0", "up"]);
                inside(&["link", "set", "lo", "up"]);
                inside(&["route", "add", "default", "via", &format!("10.243.{net}.1")]);
                run(&["ip", "link", "set", &host, "master", &br]);
                // As the CNI bridge plugin's hairpinMode: a pod reaching itself
                // through a Service gets its packets back out its own port.
                run(&["ip", "link", "set", &host, "type", "bridge_slave", "hairpin", "on"]);
                run(&["ip", "link", "set", &host, "up"]);
                lab.serve(Some(ns), name, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, POD_PORT));
            }
            lab
        }

        /// A TCP server in `ns` (None: the host) answering "<name> <peer ip>"
        /// to every connection; returns its address.
        fn serve(&mut self, ns: Option<PathBuf>, name: &'static str, at: SocketAddrV4) -> SocketAddrV4 {
            let (ready, bound) = std::sync::mpsc::channel();
            let stop = self.stop.clone();
            self.servers.push(std::thread::spawn(move || {
                let listener = (|| {
                    if let Some(ns) = &ns {
                        enter(ns)?;
                    }
                    let l = TcpListener::bind(at)?;
                    l.set_nonblocking(true)?;
                    Ok::<_, std::io::Error>(l)
                })();
                let listener = match listener {
                    Ok(l) => l,
                    Err(e) => return ready.send(Err(e)).unwrap_or_default(),
                };
                let _ = ready.send(listener.local_addr());
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, peer)) => {
                            let _ = conn.write_all(format!("{name} {}\n", peer.ip()).as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
            match bound.recv().unwrap().unwrap() {
                std::net::SocketAddr::V4(a) => a,
                other => panic!("bound {other}"),
            }
        }

        /// The same over UDP: each datagram answered with "<name> <peer ip>".
        fn serve_udp(&mut self, ns: PathBuf, name: &'static str, at: SocketAddrV4) {
            let (ready, bound) = std::sync::mpsc::channel();
            let stop = self.stop.clone();
            self.servers.push(std::thread::spawn(move || {
                let socket = (|| {
                    enter(&ns)?;
                    let s = UdpSocket::bind(at)?;
                    s.set_read_timeout(Some(Duration::from_millis(20)))?;
                    Ok::<_, std::io::Error>(s)
                })();
                let socket = match socket {
                    Ok(s) => s,
                    Err(e) => return ready.send(Err(e)).unwrap_or_default(),
                };
                let _ = ready.send(Ok(()));
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(format!("{name} {}", peer.ip()).as_bytes(), peer);
                    }
                }
            }));
            bound.recv().unwrap().unwrap();
        }
    }

    /// Connects to `to` from `from` (a pod's namespace, or the host) and
    /// returns the answer, or the error and how long it took to come.
    fn ask(from: Option<&Path>, to: SocketAddrV4) -> Result<String, (std::io::ErrorKind, Duration)> {
        let from = from.map(Path::to_path_buf);
        std::thread::spawn(move || {
            let started = Instant::now();
            let fail = |e: std::io::Error| (e.kind(), started.elapsed());
            if let Some(ns) = &from {
                enter(ns).map_err(fail)?;
            }
            let mut s = TcpStream::connect_timeout(&to.into(), Duration::from_secs(2)).map_err(fail)?;
            s.set_read_timeout(Some(Duration::from_secs(2))).map_err(fail)?;
            let mut answer = String::new();
            s.read_to_string(&mut answer).map_err(fail)?;
            Ok(answer.trim().to_string())
        })
        .join()
        .unwrap()
    }

    /// One datagram to `to` from `from`, and the answer; a connected socket,
    /// so an ICMP port-unreachable comes back as ConnectionRefused.
    fn ask_udp(from: Option<&Path>, to: SocketAddrV4) -> Result<String, std::io::ErrorKind> {
        let from = from.map(Path::to_path_buf);
        std::thread::spawn(move || {
            let fail = |e: std::io::Error| e.kind();
            if let Some(ns) = &from {
                enter(ns).map_err(fail)?;
            }
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(fail)?;
            s.connect(to).map_err(fail)?;
            s.set_read_timeout(Some(Duration::from_secs(2))).map_err(fail)?;
            s.send(b"?").map_err(fail)?;
            let mut buf = [0u8; 512];
            let n = s.recv(&mut buf).map_err(fail)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .join()
        .unwrap()
    }

    fn assert_refused(from: Option<&Path>, to: SocketAddrV4) {
        match ask(from, to) {
            Ok(a) => panic!("{to} from {from:?} answered {a:?}"),
            Err((kind, took)) => {
                assert_eq!(kind, std::io::ErrorKind::ConnectionRefused, "{to} from {from:?}");
                assert!(took < Duration::from_secs(1), "{to} from {from:?} refused only after {took:?}");
            }
        }
    }

    fn svc(name: &str, ip: Ipv4Addr, node_port: Option<u16>) -> Value {
        let mut port = json!({"name": "http", "port": 80, "protocol": "TCP"});
        if let Some(np) = node_port {
            port["nodePort"] = json!(np);
        }
        let kind = if node_port.is_some() { "NodePort" } else { "ClusterIP" };
        service("proxy-test", name, json!({"type": kind, "clusterIP": ip.to_string(), "ports": [port]}))
    }

    fn eps(name: &str, ready: &[SocketAddrV4]) -> Value {
        let subsets: Vec<Value> = ready
            .iter()
            .map(|a| json!({"addresses": [{"ip": a.ip().to_string()}], "ports": [{"name": "http", "port": a.port()}]}))
            .collect();
        endpoints("proxy-test", name, json!(subsets))
    }

    #[tokio::test]
    async fn services_reach_pods_from_the_host_and_from_pods() {
        if !is_root() {
            eprintln!("skipping: needs root (network namespaces, nftables)");
            return;
        }
        if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").unwrap_or_default().trim() != "1" {
            eprintln!("skipping: net.ipv4.ip_forward is off (the CNI bridge plugin turns it on)");
            return;
        }
        let pid = std::process::id();
        // Away from the live clusters' 10.244 pods and from other processes
        // running this test.
        let net = (pid % 250 + 3) as u8;
        let mut lab = Lab::new(net, &["a", "b"]);
        let (ns_a, ns_b) = (lab.netns[0].clone(), lab.netns[1].clone());
        let gw = Ipv4Addr::new(10, 243, net, 1);
        let pod = |i: u8| SocketAddrV4::new(Ipv4Addr::new(10, 243, net, i + 2), POD_PORT);
        // A host-network endpoint (the bridge address is local).
        let host_ep = lab.serve(None, "host", SocketAddrV4::new(gw, 0));
        lab.serve_udp(ns_a.clone(), "a", SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, POD_UDP_PORT));

        let k = (pid % 250 + 2) as u8;
        let ip = |third: u8| Ipv4Addr::new(10, 96, third, k);
        // Two per process (web, empty): NodePorts are the whole host's.
        let node_port = 30000 + (pid % 1250) as u16 * 2;
        let services = [
            svc("web", ip(250), Some(node_port)),
            svc("to-a", ip(251), None),
            svc("to-b", ip(252), None),
            svc("host", ip(253), None),
            svc("empty", ip(254), Some(node_port + 1)),
            service(
                "proxy-test",
                "dns",
                json!({"clusterIP": ip(248).to_string(), "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP"},
                    {"name": "unserved", "port": 54, "protocol": "UDP"},
                ]}),
            ),
        ];
        let endpoints = [
            eps("web", &[pod(0), pod(1)]),
            eps("to-a", &[pod(0)]),
            eps("to-b", &[pod(1)]),
            eps("host", &[host_ep]),
            // Only a not-ready pod.
            endpoints(
                "proxy-test",
                "empty",
                json!([{"notReadyAddresses": [{"ip": pod(0).ip().to_string()}], "ports": [{"name": "http", "port": POD_PORT}]}]),
            ),
            endpoints(
                "proxy-test",
                "dns",
                json!([{"addresses": [{"ip": pod(0).ip().to_string()}],
                        "ports": [{"name": "dns", "port": POD_UDP_PORT, "protocol": "UDP"}]}]),
            ),
        ];
        let at = |ip: Ipv4Addr| SocketAddrV4::new(ip, 80);
        let script = plan(&lab.table, &services, &endpoints);
        apply(&script).await.unwrap();

        // Host -> cluster IP: spread over both pods, masqueraded to the bridge address.
        let mut seen = BTreeSet::new();
        for _ in 0..24 {
            let answer = ask(None, at(ip(250))).unwrap();
            let (who, peer) = answer.split_once(' ').unwrap();
            assert_eq!(peer, gw.to_string(), "{answer}");
            seen.insert(who.to_string());
        }
        assert_eq!(seen, BTreeSet::from(["a".to_string(), "b".to_string()]));
        // Pod -> cluster IP -> another pod on the same bridge, and itself
        // (hairpin). Masqueraded: hairpin times out without it; pod to pod
        // needs it where br_netfilter is off (some kernels build it in and
        // call the hooks for bridged traffic, then it works either way).
        assert_eq!(ask(Some(&ns_a), at(ip(252))).unwrap(), format!("b {gw}"));
        assert_eq!(ask(Some(&ns_a), at(ip(251))).unwrap(), format!("a {gw}"));
        assert_eq!(ask(Some(&ns_b), at(ip(251))).unwrap(), format!("a {gw}"));
        assert!(ask(Some(&ns_b), at(ip(250))).unwrap().starts_with(['a', 'b']));
        // A host-network endpoint, from the host and from a pod.
        assert!(ask(None, at(ip(253))).unwrap().starts_with("host "));
        assert!(ask(Some(&ns_a), at(ip(253))).unwrap().starts_with("host "));
        // NodePort on a local address, from the host and from a pod.
        assert!(ask(None, SocketAddrV4::new(gw, node_port)).unwrap().starts_with(['a', 'b']));
        assert!(ask(Some(&ns_b), SocketAddrV4::new(gw, node_port)).unwrap().starts_with(['a', 'b']));

        // Refused at once: no ready endpoint, an unknown port, an unknown
        // cluster IP; from the host (output hook) and a pod (forward hook).
        for from in [None, Some(ns_a.as_path())] {
            assert_refused(from, at(ip(254)));
            assert_refused(from, SocketAddrV4::new(ip(250), 81));
            assert_refused(from, at(ip(249)));
        }
        assert_refused(None, SocketAddrV4::new(gw, node_port + 1));

        // UDP: answered through the Service, refused (port-unreachable) without endpoints.
        let dns = |port: u16| SocketAddrV4::new(ip(248), port);
        assert_eq!(ask_udp(None, dns(53)).unwrap(), format!("a {gw}"));
        assert_eq!(ask_udp(Some(&ns_b), dns(53)).unwrap(), format!("a {gw}"));
        assert_eq!(ask_udp(Some(&ns_a), dns(53)).unwrap(), format!("a {gw}"));
        assert_eq!(ask_udp(Some(&ns_b), dns(54)), Err(std::io::ErrorKind::ConnectionRefused));
        // The host's own datagram is dropped in its output hook: send fails at once.
        assert_eq!(ask_udp(None, dns(54)), Err(std::io::ErrorKind::PermissionDenied));

        // A new script replaces the table in one go: web now leads to b only.
        let endpoints = [eps("web", &[pod(1)])];
        apply(&plan(&lab.table, &services[..1], &endpoints)).await.unwrap();
        for _ in 0..8 {
            assert_eq!(ask(None, at(ip(250))).unwrap(), format!("b {gw}"));
        }
        assert_refused(None, at(ip(251)));

        // A broken script changes nothing and says why.
        let err = apply(&format!("{}\nthis is not nft\n", plan(&lab.table, &[], &[]))).await.unwrap_err();
        assert!(format!("{err:#}").contains("syntax error"), "{err:#}");
        assert_eq!(ask(None, at(ip(250))).unwrap(), format!("b {gw}"));

        remove(&lab.table).await.unwrap();
        let listed = std::process::Command::new("nft").args(["list", "table", "ip", &lab.table]).output().unwrap();
        assert!(!listed.status.success(), "table still there");
        remove(&lab.table).await.unwrap();
        drop(lab);
    }
}
