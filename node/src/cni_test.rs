//! Unit tests of cni.rs's pure core (the real plugins: node/tests/cni.rs).

use super::*;

fn cfg() -> CniConfig {
    CniConfig::new("/data/cni", "capstan0", PodCidr::parse("10.244.3.0/24").unwrap())
}

#[test]
fn pod_cidr_parses_and_names_its_gateway() {
    let c = PodCidr::parse("10.244.3.0/24").unwrap();
    assert_eq!(c.gateway(), Ipv4Addr::new(10, 244, 3, 1));
    assert_eq!(c.to_string(), "10.244.3.0/24");
    assert!(c.contains("10.244.3.200".parse().unwrap()));
    assert!(!c.contains("10.244.4.2".parse().unwrap()));
    assert!(!c.contains("::1".parse().unwrap()));
    for bad in ["10.244.3.1/24", "10.244.3.0", "10.244.3.0/33", "10.244.3.0/32", "fd00::/64", "x/24", "10.0.0.0/-1"] {
        assert!(PodCidr::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn bridge_names_are_short_unique_and_valid() {
    let a = bridge_name("node-a:/tmp/x");
    let b = bridge_name("node-b:/tmp/x");
    assert_ne!(a, b);
    assert_eq!(a, bridge_name("node-a:/tmp/x"));
    assert!(valid_ifname(&a) && a.len() <= 15, "{a}");
    let mut c = cfg();
    c.bridge = "this-name-is-too-long".into();
    assert!(c.validate().is_err());
}

#[test]
fn conflist_is_bridge_with_host_local_then_portmap() {
    let l = conflist(&cfg());
    assert_eq!(l["cniVersion"], "1.0.0");
    assert_eq!(l["name"], "capstan");
    let b = &l["plugins"][0];
    assert_eq!(b["type"], "bridge");
    assert_eq!(b["bridge"], "capstan0");
    assert_eq!(b["isGateway"], true);
    assert_eq!(b["ipMasq"], false, "one node-wide masquerade rule instead of a chain per pod");
    let rule = masquerade_rule(&cfg().pod_cidr, &cfg().bridge).join(" ");
    assert!(
        rule.starts_with(&format!("-s {0} ! -d {0} ", cfg().pod_cidr)) && rule.ends_with("-j MASQUERADE"),
        "{rule}"
    );
    assert_eq!(b["hairpinMode"], true);
    assert_eq!(b["ipam"]["type"], "host-local");
    assert_eq!(b["ipam"]["ranges"][0][0]["subnet"], "10.244.3.0/24");
    assert_eq!(b["ipam"]["ranges"][0][0]["gateway"], "10.244.3.1");
    assert_eq!(b["ipam"]["dataDir"], "/data/cni/ipam");
    assert!(b.get("mtu").is_none());
    assert_eq!(l["plugins"][1]["type"], "portmap");
    assert_eq!(l["plugins"][1]["capabilities"]["portMappings"], true);
}

#[test]
fn plan_without_host_ports_skips_portmap() {
    let p = plan(&cfg(), &[]);
    let names: Vec<_> = p.iter().map(|i| (i.plugin.as_str(), i.ifname.as_str())).collect();
    assert_eq!(names, vec![("loopback", "lo"), ("bridge", "eth0")]);
    for i in &p {
        assert_eq!(i.config["cniVersion"], "1.0.0");
        assert!(i.config["name"].is_string());
    }
}

#[test]
fn plan_with_host_ports_fills_runtime_config() {
    let ports = [
        PortMapping { container_port: 80, host_port: 8080, protocol: "TCP".into(), host_ip: None },
        PortMapping {
            container_port: 53,
            host_port: 5353,
            protocol: "UDP".into(),
            host_ip: Some("127.0.0.1".parse().unwrap()),
        },
    ];
    let p = plan(&cfg(), &ports);
    assert_eq!(p.len(), 3);
    let pm = &p[2];
    assert_eq!(pm.plugin, "portmap");
    assert_eq!(pm.ifname, "eth0");
    assert_eq!(pm.config["name"], "capstan");
    assert_eq!(
        pm.config["runtimeConfig"]["portMappings"],
        json!([
            { "hostPort": 8080, "containerPort": 80, "protocol": "tcp" },
            { "hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1" },
        ])
    );
    let chained = with_prev_result(&pm.config, Some(&json!({"cniVersion": "1.0.0"})));
    assert_eq!(chained["prevResult"]["cniVersion"], "1.0.0");
    assert!(with_prev_result(&pm.config, None).get("prevResult").is_none());
}

#[test]
fn result_ip_is_the_one_inside_the_sandbox() {
    let r = br#"{"cniVersion":"1.0.0","interfaces":[{"name":"capstan0","mac":"aa"},{"name":"veth1","mac":"bb"},
        {"name":"eth0","mac":"cc","sandbox":"/run/netns/x"}],
        "ips":[{"interface":0,"address":"10.0.0.9/24"},{"interface":2,"address":"10.244.3.7/24","gateway":"10.244.3.1"}],
        "routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;
    assert_eq!(parse_result(r).unwrap(), "10.244.3.7".parse::<IpAddr>().unwrap());
    let bare = br#"{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.2/16"}]}"#;
    assert_eq!(parse_result(bare).unwrap(), "10.1.0.2".parse::<IpAddr>().unwrap());
    assert!(parse_result(br#"{"cniVersion":"1.0.0","ips":[]}"#).is_err());
    assert!(parse_result(b"garbage").is_err());
    assert!(parse_result(br#"{"ips":[{"address":"nope"}]}"#).is_err());
}

#[test]
fn plugin_errors_become_clear_messages() {
    let e = parse_plugin_error(
        "bridge",
        "ADD",
        "exit status: 1",
        br#"{"code":7,"msg":"bad config","details":"no bridge"}"#,
        b"",
    );
    let s = e.to_string();
    assert!(matches!(e, CniError::Plugin { code: 7, .. }));
    assert!(
        s.contains("bridge ADD")
            && s.contains("invalid network config")
            && s.contains("bad config")
            && s.contains("no bridge"),
        "{s}"
    );
    let e = parse_plugin_error("portmap", "DEL", "signal: 9", b"", b"panic: boom\n");
    assert_eq!(e.to_string(), "CNI plugin portmap DEL: signal: 9: panic: boom");
    let e = parse_plugin_error("x", "ADD", "exit status: 2", b"", b"");
    assert_eq!(e.to_string(), "CNI plugin x ADD: exit status: 2");
    assert_eq!(code_meaning(11), "try again later");
    assert_eq!(code_meaning(120), "plugin-specific error");
}

#[tokio::test]
async fn bad_sandbox_ids_are_refused_before_any_plugin_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg();
    c.state_dir = tmp.path().to_path_buf();
    c.plugin_dir = tmp.path().join("no-plugins");
    let cni = Cni::new(c).unwrap();
    for bad in ["", "../x", "a/b", ".hidden"] {
        assert!(matches!(cni.setup(bad, Path::new("/nonexistent"), &[]).await, Err(CniError::Config(_))));
    }
    // A missing plugin is a clear error; the record stays for a later
    // teardown since the undo could not run either.
    let err = cni.setup("abc", Path::new("/nonexistent"), &[]).await.unwrap_err();
    assert!(err.to_string().contains("cannot run"), "{err}");
    assert!(tmp.path().join("attachments/abc.json").exists());
}
