//! Kubernetes Services on this node, the way kube-proxy's nftables mode
//! does them (simplified): one nftables table of family `ip` per node,
//! written whole by [`plan`] and loaded by [`apply`] as one `nft -f`
//! transaction, so a change never leaves half a table in the kernel.
//!
//! The table (see `plan`'s doc for a full example):
//! - `service-ips` (cluster IP . protocol . port → `goto svc-…`) and
//!   `service-nodeports` (protocol . nodePort → the same chain), looked up
//!   by chain `services`, which the nat chains `nat-prerouting` (pods'
//!   traffic arriving from the bridge) and `nat-output` (the host's own)
//!   jump to at priority dstnat. NodePorts answer on every local address
//!   but 127.0.0.0/8 (DNAT from loopback to a pod needs route_localnet).
//! - one chain per service port with ready endpoints, `svc-<ns>/<name>/
//!   <proto>/<port>`: it marks the packet ([`MASQUERADE_MARK`]) and DNATs
//!   to `numgen random mod N` of the endpoints.
//! - `nat-postrouting` masquerades what was marked and DNATed. Nodes need
//!   not have br_netfilter (bridge-nf-call-iptables): without it, when a
//!   pod reaches a Service whose endpoint sits on the same bridge, the
//!   endpoint's reply would go straight back over the bridge from the
//!   endpoint's own address, never un-DNATed by the host's conntrack, and
//!   the client would drop it. And a pod reaching itself (hairpin) would
//!   get a packet from its own address, which Linux drops as a martian,
//!   br_netfilter or not. Masqueraded, replies come back to the host. The
//!   price: endpoints see the node's address, not the client's. (kube-proxy
//!   masquerades only hairpin and off-cluster traffic, which needs the
//!   cluster CIDR and per-endpoint chains; masquerading every Service
//!   connection is the simplest rule that is always right.)
//! - `filter-input`, `filter-forward`, `filter-output` (priority filter -
//!   10: after DNAT, before a host firewall's drop policy) reject what is
//!   left: service ports without a ready endpoint (`no-endpoint-services`,
//!   `no-endpoint-nodeports`) and anything else still addressed to
//!   [`SERVICE_CIDR`] (an unallocated cluster IP, an unknown port), with a
//!   TCP reset or ICMP port-unreachable, so clients fail at once instead of
//!   their packets leaking out through the default route.
//!
//! - Endpoints on loopback (the masters of `capstan up` serve the API on
//!   127.0.0.1, and so the `kubernetes` Service leads there): a packet
//!   DNATed from a pod to 127.0.0.1 is a martian unless its bridge has
//!   `route_localnet` (set by podnet.rs, as kube-proxy does for
//!   localhost NodePorts); `filter-input` then drops whatever reaches
//!   127.0.0.0/8 from elsewhere without having been DNATed.
//!
//! Not done: IPv6, sessionAffinity ClientIP (ignored: every connection
//! picks an endpoint anew), externalIPs and LoadBalancer ingress IPs,
//! externalTrafficPolicy/internalTrafficPolicy Local, terminating
//! endpoints, and flushing stale UDP conntrack entries when a Service
//! gains its first endpoint (kube-proxy runs `conntrack -D` for that).
//!
//! Layout: [`plan`] and [`table_name`] are pure (objects in, script out;
//! no IO here); [`apply`] and [`remove`] run `nft -f -`. Tests beside,
//! in `proxy_test.rs`; the real-kernel ones need root.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Where the masters allocate cluster IPs. Whatever in it matches no
/// Service is rejected.
pub use capstan_proto::k8s::network::SERVICE_CIDR;

/// The packet mark bit of connections DNATed to an endpoint, masqueraded in
/// postrouting. kube-proxy's masquerade bit, so the two agree should both
/// run on one host; portmap (hostPorts) uses 0x2000.
pub const MASQUERADE_MARK: u32 = 0x4000;

/// Bound on one `nft` run (a table of thousands of Services loads in well
/// under a second).
const NFT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Kubernetes' spelling, TCP when absent.
    fn parse(v: &Value) -> Option<Protocol> {
        match v {
            Value::Null => Some(Protocol::Tcp),
            Value::String(s) => match s.as_str() {
                "TCP" => Some(Protocol::Tcp),
                "UDP" => Some(Protocol::Udp),
                "SCTP" => Some(Protocol::Sctp),
                _ => None,
            },
            _ => None,
        }
    }
    /// nftables' name (an `inet_proto` symbol and an `l4proto`).
    fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// One port of one Service, with where it leads. Ordered as the script
/// lists them: by namespace, name, port, protocol (the rest only breaks
/// ties between malformed duplicates, whatever order they came in).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ServicePort<'a> {
    namespace: &'a str,
    name: &'a str,
    port: u16,
    protocol: Protocol,
    cluster_ip: Ipv4Addr,
    node_port: Option<u16>,
    /// Ready endpoints, sorted and without duplicates.
    endpoints: Vec<(Ipv4Addr, u16)>,
}

impl ServicePort<'_> {
    /// Unique per table: the API server keeps (port, protocol) unique
    /// within a Service, and names are checked by [`object_name`].
    fn chain(&self) -> String {
        format!("svc-{}/{}/{}/{}", self.namespace, self.name, self.protocol.nft(), self.port)
    }
}

/// A namespace or Service name usable inside a chain name: what the API
/// server allows for them (DNS labels), nothing nft's lexer could read
/// otherwise, and short enough for nft's 255-byte chain names.
fn object_name(v: &Value) -> Option<&str> {
    let s = v.as_str()?;
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.'));
    ok.then_some(s)
}

fn port_number(v: &Value) -> Option<u16> {
    v.as_u64().and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0)
}

fn ipv4(v: &Value) -> Option<Ipv4Addr> {
    v.as_str()?.parse().ok()
}

/// A port's name; absent means "" (the single unnamed port).
fn port_name(v: &Value) -> Option<&str> {
    match v {
        Value::Null => Some(""),
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// The Service's IPv4 cluster IP: `clusterIP`, or for a dual-stack Service
/// whose first family is IPv6 the IPv4 one in `clusterIPs`. None for a
/// headless Service ("None") or one without an IPv4 address.
fn cluster_ipv4(spec: &Value) -> Option<Ipv4Addr> {
    if spec["clusterIP"] == "None" {
        return None;
    }
    ipv4(&spec["clusterIP"]).or_else(|| spec["clusterIPs"].as_array()?.iter().find_map(ipv4))
}

/// The ready addresses of `endpoints` (the Service's Endpoints object; more
/// than one only in malformed input) serving the port named `name` over
/// `protocol`.
fn ready_endpoints(endpoints: &[&Value], name: &str, protocol: Protocol) -> Vec<(Ipv4Addr, u16)> {
    let mut out = BTreeSet::new();
    let subsets = endpoints.iter().filter_map(|e| e["subsets"].as_array()).flatten();
    for subset in subsets {
        let ports = subset["ports"].as_array().map(Vec::as_slice).unwrap_or_default();
        let matching = ports
            .iter()
            .filter(|p| port_name(&p["name"]) == Some(name) && Protocol::parse(&p["protocol"]) == Some(protocol));
        for port in matching.filter_map(|p| port_number(&p["port"])) {
            // notReadyAddresses are left out: kube-proxy sends no new
            // connection to a pod that fails its readiness probe.
            let addresses = subset["addresses"].as_array().map(Vec::as_slice).unwrap_or_default();
            out.extend(addresses.iter().filter_map(|a| ipv4(&a["ip"])).map(|ip| (ip, port)));
        }
    }
    out.into_iter().collect()
}

/// Every routable service port, sorted by namespace, name, port and
/// protocol; malformed objects and ports are left out.
fn service_ports<'a>(services: &'a [Value], endpoints: &'a [Value]) -> Vec<ServicePort<'a>> {
    let mut by_name: BTreeMap<(&str, &str), Vec<&Value>> = BTreeMap::new();
    for e in endpoints {
        if let (Some(ns), Some(name)) = (object_name(&e["metadata"]["namespace"]), object_name(&e["metadata"]["name"]))
        {
            by_name.entry((ns, name)).or_default().push(e);
        }
    }
    let mut out = Vec::new();
    for svc in services {
        let (Some(namespace), Some(name)) =
            (object_name(&svc["metadata"]["namespace"]), object_name(&svc["metadata"]["name"]))
        else {
            continue;
        };
        let spec = &svc["spec"];
        let node_ports = match &spec["type"] {
            Value::Null => false,
            Value::String(t) if t == "ClusterIP" => false,
            Value::String(t) if t == "NodePort" || t == "LoadBalancer" => true,
            // ExternalName is DNS only; unknown types get nothing.
            _ => continue,
        };
        let Some(cluster_ip) = cluster_ipv4(spec) else { continue };
        for p in spec["ports"].as_array().map(Vec::as_slice).unwrap_or_default() {
            let (Some(protocol), Some(port), Some(port_name)) =
                (Protocol::parse(&p["protocol"]), port_number(&p["port"]), port_name(&p["name"]))
            else {
                continue;
            };
            out.push(ServicePort {
                namespace,
                name,
                protocol,
                cluster_ip,
                port,
                node_port: if node_ports { port_number(&p["nodePort"]) } else { None },
                endpoints: ready_endpoints(
                    by_name.get(&(namespace, name)).map(Vec::as_slice).unwrap_or_default(),
                    port_name,
                    protocol,
                ),
            });
        }
    }
    out.sort();
    // A key twice in one nft set is an error that would reject the whole
    // script, a chain twice would merge two; only malformed objects collide
    // (two Services claiming one cluster IP, a nodePort used twice, one
    // Service given twice): the first in order keeps it.
    let mut chains = BTreeSet::new();
    let mut cluster_keys = BTreeSet::new();
    let mut node_keys = BTreeSet::new();
    out.retain_mut(|sp| {
        if !chains.insert((sp.namespace, sp.name, sp.protocol, sp.port))
            || !cluster_keys.insert((sp.cluster_ip, sp.protocol, sp.port))
        {
            return false;
        }
        if let Some(np) = sp.node_port {
            if !node_keys.insert((sp.protocol, np)) {
                sp.node_port = None;
            }
        }
        true
    });
    out
}

/// `table` made safe to splice into a script: a name from [`table_name`]
/// passes unchanged; anything else cannot break out of the statement.
fn table_ident(table: &str) -> String {
    let mut s: String = table.chars().map(ident_char).collect();
    // nft identifiers start with a letter or '_'.
    if !s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        s.insert(0, '_');
    }
    s
}

/// The table name for a node: `capstan-` + the node name with anything
/// but `[a-zA-Z0-9_-]` replaced by '_', at most 64 chars. A longer one is
/// cut and ends in a hash of the whole node name, so two long names
/// sharing a prefix still get two tables.
pub fn table_name(node: &str) -> String {
    const MAX: usize = 64;
    let mut name = String::from("capstan-");
    name.extend(node.chars().map(ident_char));
    if name.len() <= MAX {
        return name;
    }
    let hash = hex::encode(Sha256::digest(node.as_bytes()));
    // Every char is ASCII by now, so any byte offset is a char boundary.
    format!("{}-{}", &name[..MAX - 9], &hash[..8])
}

fn ident_char(c: char) -> char {
    if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
        c
    } else {
        '_'
    }
}

/// An nft `elements = { ... }` line, or nothing for an empty set (nft
/// refuses `{ }`).
fn elements(out: &mut String, items: &[String]) {
    if !items.is_empty() {
        out.push_str(&format!("\t\telements = {{ {} }}\n", items.join(", ")));
    }
}

/// The nftables script that makes `services` reachable: ClusterIP (and
/// NodePort) -> ready endpoints. `services` and `endpoints` are Kubernetes
/// JSON objects (v1 Service, v1 Endpoints) as the API serves them.
///
/// Applied with [`apply`] it replaces the whole table `table` in one
/// transaction (`add table` so that `delete table` cannot fail, then the
/// table anew). The same objects in any order give the same script, so a
/// caller can skip applying an unchanged one. Headless Services, IPv6
/// cluster IPs and malformed objects get no rules; sessionAffinity is
/// ignored. For `default/web` (10.96.0.10:80/TCP, nodePort 30080, two
/// ready pods on 8080), exactly:
///
/// ```text
/// add table ip capstan-n1
/// delete table ip capstan-n1
/// table ip capstan-n1 {
///     comment "Kubernetes Services, written whole by capstan-node (proxy.rs)"
///     map service-ips {
///         type ipv4_addr . inet_proto . inet_service : verdict
///         elements = { 10.96.0.10 . tcp . 80 : goto svc-default/web/tcp/80 }
///     }
///     map service-nodeports {
///         type inet_proto . inet_service : verdict
///         elements = { tcp . 30080 : goto svc-default/web/tcp/80 }
///     }
///     set no-endpoint-services {
///         type ipv4_addr . inet_proto . inet_service
///     }
///     set no-endpoint-nodeports {
///         type inet_proto . inet_service
///     }
///     chain nat-prerouting {
///         type nat hook prerouting priority dstnat; policy accept;
///         jump services
///     }
///     chain nat-output {
///         type nat hook output priority -100; policy accept;
///         jump services
///     }
///     chain services {
///         ip daddr . meta l4proto . th dport vmap @service-ips
///         fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports
///     }
///     chain svc-default/web/tcp/80 {
///         meta mark set meta mark | 0x4000
///         meta l4proto tcp dnat to numgen random mod 2 map { 0 : 10.244.1.5 . 8080, 1 : 10.244.2.7 . 8080 }
///     }
///     chain nat-postrouting {
///         type nat hook postrouting priority srcnat; policy accept;
///         meta mark & 0x4000 == 0x4000 ct status dnat masquerade fully-random
///     }
///     chain filter-input {
///         type filter hook input priority filter - 10; policy accept;
///         ip daddr 127.0.0.0/8 ip saddr != 127.0.0.0/8 ct status & dnat == 0 drop
///         ct state new ip daddr != 127.0.0.0/8 meta l4proto . th dport @no-endpoint-nodeports jump reject-packet
///         jump reject-unserved
///     }
///     chain filter-forward {
///         type filter hook forward priority filter - 10; policy accept;
///         jump reject-unserved
///     }
///     chain filter-output {
///         type filter hook output priority filter - 10; policy accept;
///         jump reject-unserved
///     }
///     chain reject-unserved {
///         ip daddr . meta l4proto . th dport @no-endpoint-services jump reject-packet
///         ip daddr 10.96.0.0/16 jump reject-packet
///     }
///     chain reject-packet {
///         meta l4proto tcp reject with tcp reset
///         reject
///     }
/// }
/// ```
pub fn plan(table: &str, services: &[Value], endpoints: &[Value]) -> String {
    let table = table_ident(table);
    let ports = service_ports(services, endpoints);
    let (served, unserved): (Vec<&ServicePort>, Vec<&ServicePort>) =
        ports.iter().partition(|sp| !sp.endpoints.is_empty());

    let mut s = String::new();
    s.push_str(&format!("add table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n"));
    s.push_str("\tcomment \"Kubernetes Services, written whole by capstan-node (proxy.rs)\"\n");

    s.push_str("\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n");
    let items: Vec<String> = served
        .iter()
        .map(|sp| format!("{} . {} . {} : goto {}", sp.cluster_ip, sp.protocol.nft(), sp.port, sp.chain()))
        .collect();
    elements(&mut s, &items);
    s.push_str("\t}\n");

    s.push_str("\tmap service-nodeports {\n\t\ttype inet_proto . inet_service : verdict\n");
    let items: Vec<String> = served
        .iter()
        .filter_map(|sp| Some(format!("{} . {} : goto {}", sp.protocol.nft(), sp.node_port?, sp.chain())))
        .collect();
    elements(&mut s, &items);
    s.push_str("\t}\n");

    s.push_str("\tset no-endpoint-services {\n\t\ttype ipv4_addr . inet_proto . inet_service\n");
    let items: Vec<String> =
        unserved.iter().map(|sp| format!("{} . {} . {}", sp.cluster_ip, sp.protocol.nft(), sp.port)).collect();
    elements(&mut s, &items);
    s.push_str("\t}\n");

    s.push_str("\tset no-endpoint-nodeports {\n\t\ttype inet_proto . inet_service\n");
    let items: Vec<String> =
        unserved.iter().filter_map(|sp| Some(format!("{} . {}", sp.protocol.nft(), sp.node_port?))).collect();
    elements(&mut s, &items);
    s.push_str("\t}\n");

    // nft 1.0.6 knows the name "dstnat" for prerouting only; -100 is its value.
    s.push_str(
        "\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n",
    );
    s.push_str(
        "\tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n",
    );
    s.push_str(
        "\tchain services {\n\
         \t\tip daddr . meta l4proto . th dport vmap @service-ips\n\
         \t\tfib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n\
         \t}\n",
    );
    for sp in &served {
        let targets: Vec<String> =
            sp.endpoints.iter().enumerate().map(|(i, (ip, port))| format!("{i} : {ip} . {port}")).collect();
        s.push_str(&format!(
            "\tchain {} {{\n\t\tmeta mark set meta mark | {MASQUERADE_MARK:#x}\n\
             \t\tmeta l4proto {} dnat to numgen random mod {} map {{ {} }}\n\t}}\n",
            sp.chain(),
            sp.protocol.nft(),
            targets.len(),
            targets.join(", ")
        ));
    }
    // fully-random: kube-proxy's choice, against the race of two
    // connections picking one source port at once (lost UDP/DNS packets).
    s.push_str(&format!(
        "\tchain nat-postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & {MASQUERADE_MARK:#x} == {MASQUERADE_MARK:#x} ct status dnat masquerade fully-random\n\t}}\n"
    ));
    // `ct state new` on nodePorts: replies to the host's own connections
    // from such a port (never by default: ephemeral ports start at 32768)
    // must not be reset. The loopback rule: pod bridges route 127/8 (see the
    // module doc), so only what a Service sent there may arrive.
    s.push_str(
        "\tchain filter-input {\n\t\ttype filter hook input priority filter - 10; policy accept;\n\
         \t\tip daddr 127.0.0.0/8 ip saddr != 127.0.0.0/8 ct status & dnat == 0 drop\n\
         \t\tct state new ip daddr != 127.0.0.0/8 meta l4proto . th dport @no-endpoint-nodeports jump reject-packet\n\
         \t\tjump reject-unserved\n\t}\n",
    );
    s.push_str(
        "\tchain filter-forward {\n\t\ttype filter hook forward priority filter - 10; policy accept;\n\
         \t\tjump reject-unserved\n\t}\n",
    );
    s.push_str(
        "\tchain filter-output {\n\t\ttype filter hook output priority filter - 10; policy accept;\n\
         \t\tjump reject-unserved\n\t}\n",
    );
    s.push_str(&format!(
        "\tchain reject-unserved {{\n\
         \t\tip daddr . meta l4proto . th dport @no-endpoint-services jump reject-packet\n\
         \t\tip daddr {SERVICE_CIDR} jump reject-packet\n\t}}\n"
    ));
    s.push_str("\tchain reject-packet {\n\t\tmeta l4proto tcp reject with tcp reset\n\t\treject\n\t}\n");
    s.push_str("}\n");
    s
}

/// Applies a script from [`plan`] atomically (`nft -f -`, one
/// transaction). Errors carry nft's stderr.
pub async fn apply(script: &str) -> anyhow::Result<()> {
    nft_script(script).await
}

/// Deletes the table if it exists (adding it first, in the same
/// transaction, makes the delete succeed when it does not; nft 1.0.6 has
/// no `destroy`).
pub async fn remove(table: &str) -> anyhow::Result<()> {
    let t = table_ident(table);
    nft_script(&format!("add table ip {t}\ndelete table ip {t}\n")).await
}

async fn nft_script(script: &str) -> anyhow::Result<()> {
    // nft lives in /usr/sbin, which a service manager's PATH may lack.
    let path = format!("{}:/usr/local/sbin:/usr/sbin:/sbin", std::env::var("PATH").unwrap_or_default());
    let mut child = tokio::process::Command::new("nft")
        .args(["-f", "-"])
        .env("PATH", path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run nft")?;
    let stdin = child.stdin.take();
    let run = async {
        // Fed while nft runs, so neither side can block on a full pipe.
        let feed = async {
            if let Some(mut w) = stdin {
                w.write_all(script.as_bytes()).await?;
            }
            Ok::<(), std::io::Error>(())
        };
        let (fed, out) = tokio::join!(feed, child.wait_with_output());
        Ok::<_, std::io::Error>((fed, out?))
    };
    let (fed, out) = tokio::time::timeout(NFT_TIMEOUT, run)
        .await
        .map_err(|_| anyhow::anyhow!("nft -f - timed out after {NFT_TIMEOUT:?}"))?
        .context("nft -f -")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!("nft -f - failed ({}): {}", out.status, stderr.trim());
    }
    // nft read all it needed and succeeded; a failed write would be odd.
    fed.context("writing the script to nft")?;
    Ok(())
}

#[cfg(test)]
#[path = "proxy_test.rs"]
mod tests;
