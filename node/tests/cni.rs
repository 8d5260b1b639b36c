//! Pod networking against the real CNI plugins in /usr/lib/cni: needs root
//! (CI runs as root with containernetworking-plugins installed; elsewhere
//! these tests say so and pass without doing anything).
//!
//! Every test works on its own bridge and pod CIDR derived from the process
//! id, and a guard tears down sandboxes, kills the processes it started,
//! removes the namespaces and deletes the bridge even when an assertion
//! fails.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use capstan_node::cni::{bridge_name, Cni, CniConfig, PodCidr};
use capstan_node::netns;
use capstan_node::runtime::PortMapping;

fn usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let plugins = Path::new("/usr/lib/cni/bridge").exists();
    if !(root && plugins) {
        eprintln!("skipping: needs root and /usr/lib/cni (root={root}, plugins={plugins})");
    }
    root && plugins
}

/// A pod network of one test: its bridge, CIDR, namespaces and processes.
struct Net {
    cni: Cni,
    netns_dir: PathBuf,
    sandboxes: Vec<(String, PathBuf)>,
    children: Vec<Child>,
    _tmp: tempfile::TempDir,
}

impl Net {
    fn new(test: &str, octet_salt: u32) -> Net {
        let tmp = tempfile::tempdir().unwrap();
        let pid = std::process::id();
        // 10.200-239.x.0/24: away from the host's and other tests' networks.
        let second = 200 + (pid / 250 + octet_salt) % 40;
        let third = (pid + octet_salt * 7) % 250;
        let cidr = PodCidr::parse(&format!("10.{second}.{third}.0/24")).unwrap();
        let cfg = CniConfig::new(tmp.path().join("cni"), bridge_name(&format!("{test}-{pid}")), cidr);
        Net {
            cni: Cni::new(cfg).unwrap(),
            netns_dir: tmp.path().join("netns"),
            sandboxes: vec![],
            children: vec![],
            _tmp: tmp,
        }
    }

    fn sandbox(&mut self, id: &str) -> PathBuf {
        let path = netns::create(&self.netns_dir, id).unwrap();
        self.sandboxes.push((id.to_string(), path.clone()));
        path
    }

    fn spawn_in(&mut self, ns: &Path, args: &[&str]) {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.display()))
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        self.children.push(child);
    }

    fn ipam_file(&self, ip: IpAddr) -> PathBuf {
        self.cni.config().state_dir.join("ipam").join(&self.cni.config().network_name).join(ip.to_string())
    }

    fn veths_on_bridge(&self) -> usize {
        let out =
            Command::new("ip").args(["-o", "link", "show", "master", &self.cni.config().bridge]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Drop may run inside the test's runtime: tear down on a thread
        // with its own.
        let sandboxes = std::mem::take(&mut self.sandboxes);
        let cni = &self.cni;
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                for (id, path) in &sandboxes {
                    if let Err(e) = rt.block_on(cni.teardown(id, Some(path))) {
                        eprintln!("cleanup: teardown {id}: {e}");
                    }
                    let _ = netns::remove(path);
                }
            });
        });
        let _ = netns::release_dir(&self.netns_dir);
        let _ = Command::new("ip").args(["link", "del", &self.cni.config().bridge]).stderr(Stdio::null()).status();
    }
}

/// GET / over plain TCP, retried until the server is up (bounded).
fn http_get(addr: SocketAddr, within: Duration) -> Result<String, String> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(mut s) => {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let req = format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n");
                if s.write_all(req.as_bytes()).is_ok() {
                    let mut body = String::new();
                    if s.read_to_string(&mut body).is_ok() && !body.is_empty() {
                        return Ok(body);
                    }
                }
                last = "empty or failed response".into();
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Err(format!("{addr}: {last}"))
}

fn serve(net: &mut Net, ns: &Path, port: u16, text: &str) {
    let www = net._tmp.path().join(format!("www-{port}-{}", net.children.len()));
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), text).unwrap();
    let port = port.to_string();
    net.spawn_in(ns, &["busybox", "httpd", "-f", "-p", &port, "-h", www.to_str().unwrap()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_ips_and_reach_the_host_and_each_other() {
    if !usable() {
        return;
    }
    let mut net = Net::new("pods", 0);
    let a = net.sandbox("sandbox-a");
    let b = net.sandbox("sandbox-b");
    // Concurrently, as the pod workers will: host-local's lock keeps the
    // two allocations apart.
    let (ip_a, ip_b) = tokio::join!(net.cni.setup("sandbox-a", &a, &[]), net.cni.setup("sandbox-b", &b, &[]));
    let (ip_a, ip_b) = (ip_a.unwrap(), ip_b.unwrap());
    let cidr = net.cni.config().pod_cidr;
    assert!(cidr.contains(ip_a) && cidr.contains(ip_b), "{ip_a} {ip_b} not in {cidr}");
    assert_ne!(ip_a, ip_b);
    assert_ne!(ip_a, IpAddr::V4(cidr.gateway()));
    assert!(net.ipam_file(ip_a).exists() && net.ipam_file(ip_b).exists());
    assert_eq!(net.veths_on_bridge(), 2);

    // Inside: lo and eth0, the default route via the bridge.
    let out =
        Command::new("nsenter").arg(format!("--net={}", a.display())).args(["ip", "-o", "addr"]).output().unwrap();
    let addrs = String::from_utf8_lossy(&out.stdout);
    assert!(addrs.contains("lo") && addrs.contains("127.0.0.1") && addrs.contains(&ip_a.to_string()), "{addrs}");

    // The host reaches a server in pod a.
    serve(&mut net, &a, 8080, "hello from a");
    let body = tokio::task::spawn_blocking(move || http_get(SocketAddr::new(ip_a, 8080), Duration::from_secs(10)))
        .await
        .unwrap()
        .unwrap();
    assert!(body.contains("hello from a"), "{body}");

    // Pod b reaches pod a. (busybox-static's wget segfaults in Debian 12,
    // so a raw request through nc.)
    let out = Command::new("timeout")
        .args(["15", "nsenter", &format!("--net={}", b.display()), "sh", "-c"])
        .arg(format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 5 {ip_a} 8080"))
        .output()
        .unwrap();
    assert!(out.status.success(), "nc from b: {}: {}", out.status, String::from_utf8_lossy(&out.stderr));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("hello from a"), "{body}");

    // Teardown releases the IP and the veth, and is idempotent.
    net.cni.teardown("sandbox-a", Some(&a)).await.unwrap();
    assert!(!net.ipam_file(ip_a).exists(), "host-local still holds {ip_a}");
    assert!(net.ipam_file(ip_b).exists());
    assert_eq!(net.veths_on_bridge(), 1);
    net.cni.teardown("sandbox-a", Some(&a)).await.unwrap();
    // Without a namespace any more, and for a sandbox never set up.
    netns::remove(&a).unwrap();
    net.cni.teardown("sandbox-a", Some(&a)).await.unwrap();
    net.cni.teardown("never-set-up", None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_port_reaches_the_pod_and_teardown_removes_the_rules() {
    if !usable() {
        return;
    }
    let mut net = Net::new("hostport", 13);
    let ns = net.sandbox("sandbox-hp");
    let host_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let ports = [PortMapping { container_port: 8080, host_port, protocol: "TCP".into(), host_ip: None }];
    let ip = net.cni.setup("sandbox-hp", &ns, &ports).await.unwrap();
    let nat = || String::from_utf8(Command::new("iptables-save").args(["-t", "nat"]).output().unwrap().stdout).unwrap();
    assert!(nat().contains("sandbox-hp"), "no portmap rules for the sandbox:\n{}", nat());

    serve(&mut net, &ns, 8080, "hello via hostPort");
    // The pod itself first, so a failure below is about the port mapping.
    let direct = tokio::task::spawn_blocking(move || http_get(SocketAddr::new(ip, 8080), Duration::from_secs(10)));
    assert!(direct.await.unwrap().unwrap().contains("hello via hostPort"));
    // The node's own addresses: the bridge gateway and loopback (portmap's
    // snat + route_localnet make 127.0.0.1 work).
    let gw = IpAddr::V4(net.cni.config().pod_cidr.gateway());
    for host in [gw, "127.0.0.1".parse().unwrap()] {
        let got =
            tokio::task::spawn_blocking(move || http_get(SocketAddr::new(host, host_port), Duration::from_secs(10)));
        let body = got.await.unwrap().unwrap_or_else(|e| panic!("hostPort via {host}: {e}"));
        assert!(body.contains("hello via hostPort"), "{body}");
    }

    net.cni.teardown("sandbox-hp", Some(&ns)).await.unwrap();
    assert!(!nat().contains("sandbox-hp"), "portmap rules left:\n{}", nat());
    assert!(!net.ipam_file(ip).exists());
}
