//! Cluster DNS, answered by every node for its own pods.
//!
//! Kubernetes runs CoreDNS as pods behind the `kube-dns` Service; Capstan's
//! agents already hold every Service and Endpoints (the service proxy's
//! feed, `services.rs`), so each agent answers the cluster's names itself,
//! the way NodeLocal DNSCache sits on every node — but authoritative, with
//! no cache to go stale and nothing to fail between a pod and its node:
//!
//! - Pods get `nameserver 10.96.0.10` ([`CLUSTER_DNS_IP`], the `kube-dns`
//!   Service the masters create), the search path
//!   `<ns>.svc.cluster.local svc.cluster.local cluster.local` and
//!   `ndots:5`, as the kubelet writes them ([`pod_resolv_conf`], which
//!   also follows `dnsPolicy` and `dnsConfig`).
//! - The node's service proxy sends `kube-dns` to this node's own resolver,
//!   listening on the pod bridge's gateway address, UDP and TCP, port 53
//!   or, when the host's own DNS server holds that, any free port
//!   ([`bind`], [`serve`]). It binds with IP_FREEBIND because the bridge
//!   (and so the address) appears only with the first pod.
//! - Names (CoreDNS's `kubernetes` plugin, TTL 5 s): `<svc>.<ns>.svc.<domain>`
//!   is A of the cluster IP; for a headless Service the ready endpoints;
//!   for ExternalName a CNAME. `<host>.<svc>.<ns>.svc.<domain>` is an
//!   endpoint by its hostname (StatefulSet pods) or its dashed IP.
//!   `_<port>._<proto>.<svc>.<ns>.svc.<domain>` is SRV (and SRV on the
//!   Service name lists every port). `<a-b-c-d>.<ns>.pod.<domain>` is A of
//!   that IP. PTR for cluster IPs and endpoints with a name. Anything
//!   else under the domain is NXDOMAIN with the zone's SOA, so search-path
//!   misses are answered at once and cached negatively.
//! - Everything else goes to the host's own nameservers (from the node's
//!   /etc/resolv.conf), the reply relayed unchanged; SERVFAIL when none
//!   answers in time.
//!
//! Not done: AAAA records (the pod network is IPv4 only: AAAA questions
//! get an empty answer), EndpointSlices (Endpoints carry the same
//! addresses), wildcard queries, a cache for forwarded names.
//!
//! Layout: [`Zone`] (objects in, answers out), [`pod_resolv_conf`] and
//! [`upstreams`] are pure and tested in `dns_test.rs`; [`serve`] and the
//! forwarding below it are the IO.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use capstan_proto::k8s::network::{CLUSTER_DNS_IP, CLUSTER_DOMAIN};
use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, CNAME, PTR, SOA, SRV};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use parking_lot::RwLock;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long answers may be cached (CoreDNS's default for the cluster zone).
pub const TTL: u32 = 5;
/// The Service every pod's nameserver address belongs to.
pub const DNS_SERVICE: (&str, &str) = ("kube-system", "kube-dns");
/// Replies over UDP are cut to this (the EDNS size the DNS flag day
/// settled on) even when a client offers more; bigger ones go over TCP.
const MAX_UDP_PAYLOAD: u16 = 1232;
/// How long one upstream has to answer a forwarded query.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle TCP client is dropped after this.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Bound on concurrent TCP clients and forwarded UDP queries.
const MAX_IN_FLIGHT: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Port {
    name: String,
    /// Lowercase, as it appears in SRV names (`_tcp`).
    protocol: String,
    port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    /// The endpoint's label under its Service: its hostname, else its IP
    /// with dashes.
    label: String,
    ip: Ipv4Addr,
    ports: Vec<Port>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Target {
    ClusterIp(Ipv4Addr),
    Headless,
    ExternalName(Name),
}

#[derive(Clone, Debug)]
struct Service {
    target: Target,
    ports: Vec<Port>,
    /// Ready endpoints, sorted by label.
    endpoints: Vec<Endpoint>,
}

/// The cluster's names at one moment, built from the Services and
/// Endpoints the agent holds. Immutable; a change builds a new one.
#[derive(Debug, Default)]
pub struct Zone {
    services: HashMap<(String, String), Service>,
    namespaces: HashSet<String>,
    reverse: HashMap<Ipv4Addr, Name>,
    serial: u32,
}

/// What to do with a query.
#[derive(Debug)]
pub enum Outcome {
    /// Send this reply.
    Reply(Message),
    /// Not the cluster's: ask the host's nameservers.
    Forward,
    /// Not a query (a response, or garbage without an id): say nothing.
    Drop,
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn dashed(ip: Ipv4Addr) -> String {
    ip.to_string().replace('.', "-")
}

fn ports_of(v: &Value) -> Vec<Port> {
    let mut out: Vec<Port> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let port = p["port"].as_u64().and_then(|n| u16::try_from(n).ok()).filter(|n| *n != 0)?;
            let protocol = p["protocol"].as_str().unwrap_or("TCP").to_ascii_lowercase();
            let name = p["name"].as_str().unwrap_or_default().to_string();
            Some(Port { name, protocol, port })
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `<name>.<domain>.` or None when `name` is no DNS name.
fn fqdn(name: &str) -> Option<Name> {
    let name = name.trim_end_matches('.');
    if name.is_empty() || name.len() > 253 {
        return None;
    }
    Name::from_ascii(format!("{name}.")).ok()
}

fn service_name(svc: &str, ns: &str) -> String {
    format!("{svc}.{ns}.svc.{CLUSTER_DOMAIN}")
}

impl Zone {
    /// The zone for `services` and `endpoints` (v1 objects as the API
    /// serves them); malformed objects are left out. `serial` goes into
    /// the SOA.
    pub fn build(services: &[&Value], endpoints: &[&Value], serial: u32) -> Zone {
        let key = |o: &Value| -> Option<(String, String)> {
            let ns = o["metadata"]["namespace"].as_str().filter(|s| dns_label(s))?;
            let name = o["metadata"]["name"].as_str().filter(|s| dns_label(s))?;
            Some((ns.to_string(), name.to_string()))
        };
        let by_key: HashMap<(String, String), &Value> = endpoints.iter().filter_map(|e| Some((key(e)?, *e))).collect();
        let mut zone = Zone { serial, ..Zone::default() };
        for svc in services {
            let Some(k) = key(svc) else { continue };
            let spec = &svc["spec"];
            let target = if spec["type"] == "ExternalName" {
                match spec["externalName"].as_str().and_then(fqdn) {
                    Some(n) => Target::ExternalName(n),
                    None => continue,
                }
            } else if spec["clusterIP"] == "None" {
                Target::Headless
            } else {
                match spec["clusterIP"].as_str().and_then(|s| s.parse().ok()) {
                    Some(ip) => Target::ClusterIp(ip),
                    None => continue,
                }
            };
            let mut eps = BTreeMap::new();
            let subsets = by_key.get(&k).and_then(|e| e["subsets"].as_array()).into_iter().flatten();
            for subset in subsets {
                let ports = ports_of(&subset["ports"]);
                for a in subset["addresses"].as_array().into_iter().flatten() {
                    let Some(ip) = a["ip"].as_str().and_then(|s| s.parse::<Ipv4Addr>().ok()) else { continue };
                    let hostname = a["hostname"].as_str().filter(|h| dns_label(h));
                    let label = hostname.map_or_else(|| dashed(ip), str::to_string);
                    let e = eps.entry(label.clone()).or_insert(Endpoint { label, ip, ports: vec![] });
                    e.ports.extend(ports.iter().cloned());
                }
            }
            let endpoints: Vec<Endpoint> = eps
                .into_values()
                .map(|mut e| {
                    e.ports.sort();
                    e.ports.dedup();
                    e
                })
                .collect();
            let base = service_name(&k.1, &k.0);
            if let (Target::ClusterIp(ip), Some(n)) = (&target, fqdn(&base)) {
                zone.reverse.entry(*ip).or_insert(n);
            }
            for e in &endpoints {
                if let Some(n) = fqdn(&format!("{}.{base}", e.label)) {
                    zone.reverse.entry(e.ip).or_insert(n);
                }
            }
            zone.namespaces.insert(k.0.clone());
            zone.services.insert(k, Service { target, ports: ports_of(&spec["ports"]), endpoints });
        }
        zone
    }

    /// The answer to `req`.
    pub fn resolve(&self, req: &Message) -> Outcome {
        if req.metadata.message_type != MessageType::Query {
            return Outcome::Drop;
        }
        if req.metadata.op_code != OpCode::Query {
            return Outcome::Reply(reply(req, ResponseCode::NotImp));
        }
        let [q] = req.queries.as_slice() else {
            return Outcome::Reply(reply(req, ResponseCode::FormErr));
        };
        let labels: Vec<String> = q.name().iter().map(|l| String::from_utf8_lossy(l).to_ascii_lowercase()).collect();
        let domain: Vec<&str> = CLUSTER_DOMAIN.split('.').collect();
        if labels.ends_with(&["in-addr".to_string(), "arpa".to_string()]) {
            return match self.reverse_lookup(&labels) {
                Some(target) if q.query_class() == DNSClass::IN => {
                    let mut m = reply(req, ResponseCode::NoError);
                    m.metadata.authoritative = true;
                    if matches!(q.query_type(), RecordType::PTR | RecordType::ANY) {
                        m.add_answer(Record::from_rdata(q.name().clone(), TTL, RData::PTR(PTR(target))));
                    }
                    Outcome::Reply(m)
                }
                _ => Outcome::Forward,
            };
        }
        if labels.len() < domain.len() || labels[labels.len() - domain.len()..] != domain[..] {
            return Outcome::Forward;
        }
        let rest: Vec<&str> = labels[..labels.len() - domain.len()].iter().map(String::as_str).collect();
        let mut m = reply(req, ResponseCode::NoError);
        m.metadata.authoritative = true;
        if q.query_class() != DNSClass::IN {
            m.metadata.response_code = ResponseCode::Refused;
            return Outcome::Reply(m);
        }
        let found = self.records(q.name(), &rest);
        match found {
            None => m.metadata.response_code = ResponseCode::NXDomain,
            Some((answers, additionals)) => {
                let qt = q.query_type();
                let fits =
                    |r: &Record| qt == RecordType::ANY || r.record_type() == qt || r.record_type() == RecordType::CNAME;
                let answers: Vec<Record> = answers.into_iter().filter(fits).collect();
                if answers.iter().any(|r| r.record_type() == RecordType::SRV) {
                    m.add_additionals(additionals);
                }
                if qt == RecordType::SOA && rest.is_empty() {
                    m.add_answer(self.soa());
                }
                m.add_answers(answers);
            }
        }
        if m.answers.is_empty() {
            m.add_authority(self.soa());
        }
        Outcome::Reply(m)
    }

    fn soa(&self) -> Record {
        let domain = fqdn(CLUSTER_DOMAIN).unwrap_or_else(Name::root);
        let ns = fqdn(&format!("ns.dns.{CLUSTER_DOMAIN}")).unwrap_or_else(Name::root);
        let mbox = fqdn(&format!("hostmaster.{CLUSTER_DOMAIN}")).unwrap_or_else(Name::root);
        Record::from_rdata(domain, TTL, RData::SOA(SOA::new(ns, mbox, self.serial, 7200, 1800, 86400, TTL)))
    }

    fn reverse_lookup(&self, labels: &[String]) -> Option<Name> {
        let [d, c, b, a, _, _] = labels else { return None };
        let ip: Ipv4Addr = format!("{a}.{b}.{c}.{d}").parse().ok()?;
        self.reverse.get(&ip).cloned()
    }

    /// The records at `name` (its labels below the cluster domain in
    /// `rest`) and their SRV targets' addresses; None when the name does
    /// not exist.
    fn records(&self, name: &Name, rest: &[&str]) -> Option<(Vec<Record>, Vec<Record>)> {
        let a = |n: &Name, ip: Ipv4Addr| Record::from_rdata(n.clone(), TTL, RData::A(A(ip)));
        let srv = |n: &Name, weight: u16, port: u16, target: &Name| {
            Record::from_rdata(n.clone(), TTL, RData::SRV(SRV::new(0, weight, port, target.clone())))
        };
        let weight = |count: usize| u16::try_from(100 / count.max(1)).unwrap_or(1).max(1);
        match rest {
            [] | ["svc"] => Some((vec![], vec![])),
            [ns, "svc"] => self.namespaces.contains(*ns).then(|| (vec![], vec![])),
            [ip, _ns, "pod"] => {
                let ip: Ipv4Addr = ip.replace('-', ".").parse().ok()?;
                Some((vec![a(name, ip)], vec![]))
            }
            [svc, ns, "svc"] => {
                let s = self.services.get(&(ns.to_string(), svc.to_string()))?;
                let base = fqdn(&service_name(svc, ns))?;
                Some(match &s.target {
                    Target::ExternalName(t) => {
                        (vec![Record::from_rdata(name.clone(), TTL, RData::CNAME(CNAME(t.clone())))], vec![])
                    }
                    Target::ClusterIp(ip) => {
                        let w = weight(s.ports.len());
                        let mut answers = vec![a(name, *ip)];
                        answers.extend(s.ports.iter().map(|p| srv(name, w, p.port, &base)));
                        (answers, vec![a(&base, *ip)])
                    }
                    Target::Headless => {
                        let ips: BTreeSet<Ipv4Addr> = s.endpoints.iter().map(|e| e.ip).collect();
                        let mut answers: Vec<Record> = ips.into_iter().map(|ip| a(name, ip)).collect();
                        let mut extra = vec![];
                        let n: usize = s.endpoints.iter().map(|e| e.ports.len()).sum();
                        for e in &s.endpoints {
                            let Some(target) = fqdn(&format!("{}.{}", e.label, service_name(svc, ns))) else {
                                continue;
                            };
                            answers.extend(e.ports.iter().map(|p| srv(name, weight(n), p.port, &target)));
                            extra.push(a(&target, e.ip));
                        }
                        (answers, extra)
                    }
                })
            }
            [label, svc, ns, "svc"] => {
                let s = self.services.get(&(ns.to_string(), svc.to_string()))?;
                let e = s.endpoints.iter().find(|e| e.label == *label)?;
                Some((vec![a(name, e.ip)], vec![]))
            }
            [port, proto, svc, ns, "svc"] => {
                let (port, proto) = (port.strip_prefix('_')?, proto.strip_prefix('_')?);
                let s = self.services.get(&(ns.to_string(), svc.to_string()))?;
                let matches = |p: &&Port| p.name == port && p.protocol == proto;
                let (answers, extra): (Vec<Record>, Vec<Record>) = match &s.target {
                    Target::ClusterIp(ip) => {
                        let base = fqdn(&service_name(svc, ns))?;
                        let ports: Vec<&Port> = s.ports.iter().filter(matches).collect();
                        let answers = ports.iter().map(|p| srv(name, weight(ports.len()), p.port, &base)).collect();
                        (answers, vec![a(&base, *ip)])
                    }
                    Target::Headless => {
                        let hits: Vec<(&Endpoint, &Port)> = s
                            .endpoints
                            .iter()
                            .flat_map(|e| e.ports.iter().filter(matches).map(move |p| (e, p)))
                            .collect();
                        let mut answers = vec![];
                        let mut extra = vec![];
                        for (e, p) in &hits {
                            let target = fqdn(&format!("{}.{}", e.label, service_name(svc, ns)))?;
                            answers.push(srv(name, weight(hits.len()), p.port, &target));
                            extra.push(a(&target, e.ip));
                        }
                        (answers, extra)
                    }
                    Target::ExternalName(_) => (vec![], vec![]),
                };
                (!answers.is_empty()).then_some((answers, extra))
            }
            _ => None,
        }
    }
}

/// An empty reply to `req` with `code`, echoing its question and EDNS.
fn reply(req: &Message, code: ResponseCode) -> Message {
    let mut m = Message::response(req.metadata.id, req.metadata.op_code);
    m.metadata.recursion_desired = req.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.metadata.checking_disabled = req.metadata.checking_disabled;
    m.metadata.response_code = code;
    m.add_queries(req.queries.iter().cloned());
    if req.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(MAX_UDP_PAYLOAD);
        m.set_edns(edns);
    }
    m
}

/// The bytes to send for `m` over UDP to a client that asked with `req`:
/// cut to an empty, truncated reply when it would not fit, so the client
/// asks again over TCP.
pub fn udp_bytes(req: &Message, m: &Message) -> Option<Vec<u8>> {
    let limit = req.edns.as_ref().map_or(512, |e| e.max_payload().clamp(512, MAX_UDP_PAYLOAD));
    let full = m.to_vec().ok()?;
    if full.len() <= usize::from(limit) {
        return Some(full);
    }
    m.truncate().to_vec().ok()
}

/// A reply to bytes that did not parse: FORMERR with the request's id, or
/// nothing when there is not even an id (or it was a response).
pub fn malformed(bytes: &[u8]) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
    let is_response = bytes.get(2).is_some_and(|b| b & 0x80 != 0);
    if is_response {
        return None;
    }
    Message::error_msg(id, OpCode::Query, ResponseCode::FormErr).to_vec().ok()
}

/// A SERVFAIL for `req` (no upstream answered).
fn servfail(req: &Message) -> Option<Vec<u8>> {
    reply(req, ResponseCode::ServFail).to_vec().ok()
}

/// The nameservers of a resolv.conf, port 53, without the cluster's own
/// address (forwarding there would loop).
pub fn upstreams(conf: &ResolvConf) -> Vec<SocketAddr> {
    conf.nameservers
        .iter()
        .filter_map(|n| n.parse::<std::net::IpAddr>().ok())
        .filter(|ip| *ip != std::net::IpAddr::V4(CLUSTER_DNS_IP))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A resolv.conf's `search` domains and `options`, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    pub searches: Vec<String>,
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Reads the lines the resolver reads (the last `search` line wins,
    /// as in glibc).
    pub fn parse(text: &str) -> ResolvConf {
        let mut out = ResolvConf::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => out.nameservers.extend(words.next().map(str::to_string)),
                Some("search" | "domain") => out.searches = words.map(str::to_string).collect(),
                Some("options") => out.options.extend(words.map(str::to_string)),
                _ => {}
            }
        }
        out
    }

    fn render(&self) -> String {
        let mut s = String::new();
        if !self.searches.is_empty() {
            s.push_str(&format!("search {}\n", self.searches.join(" ")));
        }
        for n in &self.nameservers {
            s.push_str(&format!("nameserver {n}\n"));
        }
        if !self.options.is_empty() {
            s.push_str(&format!("options {}\n", self.options.join(" ")));
        }
        s
    }
}

/// The kubelet's limits: resolvers read three nameservers; more search
/// domains than 32 are cut.
const MAX_NAMESERVERS: usize = 3;
const MAX_SEARCHES: usize = 32;

/// The /etc/resolv.conf for a pod (its `spec`, in `namespace`) on a node
/// whose own resolv.conf is `host`: `dnsPolicy` ClusterFirst (default)
/// uses the cluster DNS, except with hostNetwork where only
/// ClusterFirstWithHostNet does; Default is the node's file; None is
/// only `dnsConfig`, which every policy then extends (nameservers and
/// search domains appended without repeats, options replacing those of
/// the same name).
pub fn pod_resolv_conf(spec: &Value, namespace: &str, host: &ResolvConf) -> String {
    let policy = spec["dnsPolicy"].as_str().unwrap_or("ClusterFirst");
    let host_network = spec["hostNetwork"] == true;
    let mut conf = match policy {
        "None" => ResolvConf::default(),
        "ClusterFirst" if !host_network => cluster_first(namespace, host),
        "ClusterFirstWithHostNet" => cluster_first(namespace, host),
        _ => host.clone(),
    };
    let cfg = &spec["dnsConfig"];
    let strings = |v: &Value| -> Vec<String> {
        v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
    };
    for n in strings(&cfg["nameservers"]) {
        if !conf.nameservers.contains(&n) {
            conf.nameservers.push(n);
        }
    }
    for s in strings(&cfg["searches"]) {
        if !conf.searches.contains(&s) {
            conf.searches.push(s);
        }
    }
    for o in cfg["options"].as_array().into_iter().flatten() {
        let Some(name) = o["name"].as_str().filter(|n| !n.is_empty()) else { continue };
        let opt = match o["value"].as_str() {
            Some(v) => format!("{name}:{v}"),
            None => name.to_string(),
        };
        conf.options.retain(|x| x.split(':').next() != Some(name));
        conf.options.push(opt);
    }
    conf.nameservers.truncate(MAX_NAMESERVERS);
    conf.searches.truncate(MAX_SEARCHES);
    conf.render()
}

/// The DNS domain of a pod (its `spec`, in `namespace`) that names a
/// `subdomain`: `<subdomain>.<ns>.svc.<cluster domain>`. With a headless
/// Service of that name, `<hostname>.<domain>` resolves to the pod.
pub fn pod_domain(spec: &Value, namespace: &str) -> Option<String> {
    let sub = spec["subdomain"].as_str().filter(|s| dns_label(s))?;
    Some(format!("{sub}.{namespace}.svc.{CLUSTER_DOMAIN}"))
}

fn cluster_first(namespace: &str, host: &ResolvConf) -> ResolvConf {
    let mut searches =
        vec![format!("{namespace}.svc.{CLUSTER_DOMAIN}"), format!("svc.{CLUSTER_DOMAIN}"), CLUSTER_DOMAIN.to_string()];
    searches.extend(host.searches.iter().filter(|s| !s.is_empty()).cloned());
    searches.dedup();
    ResolvConf { nameservers: vec![CLUSTER_DNS_IP.to_string()], searches, options: vec!["ndots:5".into()] }
}

/// The zone the server answers from, swapped whole on every change.
#[derive(Debug, Default)]
pub struct ZoneCell(RwLock<Arc<Zone>>);

impl ZoneCell {
    pub fn get(&self) -> Arc<Zone> {
        self.0.read().clone()
    }
    pub fn set(&self, zone: Zone) {
        *self.0.write() = Arc::new(zone);
    }
}

/// The server's sockets: UDP and TCP on one address and port.
pub struct Listeners {
    udp: tokio::net::UdpSocket,
    tcp: tokio::net::TcpListener,
    pub addr: std::net::SocketAddrV4,
}

/// Binds UDP and TCP on `ip` at the first of `ports` where both are free
/// (0: a port the kernel picks). The agent asks for 53 and then any
/// port: pods always ask 10.96.0.10:53 and the proxy DNATs to wherever
/// this ended up, so a host DNS server holding 0.0.0.0:53 costs nothing.
/// Must run inside a tokio runtime.
pub fn bind(ip: Ipv4Addr, ports: &[u16]) -> std::io::Result<Listeners> {
    let mut last = std::io::Error::other("no port to try");
    for &want in ports {
        // A kernel-picked UDP port may be taken for TCP: a few tries.
        for _ in 0..if want == 0 { 16 } else { 1 } {
            let attempt = (|| {
                let udp = freebind_socket(SocketAddr::from((ip, want)), socket2::Type::DGRAM)?;
                let port = udp.local_addr()?.as_socket().map_or(want, |a| a.port());
                let tcp = freebind_socket(SocketAddr::from((ip, port)), socket2::Type::STREAM)?;
                tcp.listen(128)?;
                Ok::<_, std::io::Error>(Listeners {
                    udp: tokio::net::UdpSocket::from_std(udp.into())?,
                    tcp: tokio::net::TcpListener::from_std(tcp.into())?,
                    addr: std::net::SocketAddrV4::new(ip, port),
                })
            })();
            match attempt {
                Ok(l) => return Ok(l),
                Err(e) => last = e,
            }
        }
    }
    Err(last)
}

fn freebind_socket(addr: SocketAddr, ty: socket2::Type) -> std::io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, ty, None)?;
    s.set_freebind_v4(true)?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

/// What the server does with one query's bytes.
enum Step {
    Send(Vec<u8>),
    Nothing,
    /// Ask the upstreams (the parsed query, for a SERVFAIL).
    Forward(Message),
}

fn step(zone: &Zone, bytes: &[u8], tcp: bool) -> Step {
    let req = match Message::from_vec(bytes) {
        Ok(m) => m,
        Err(_) => return malformed(bytes).map_or(Step::Nothing, Step::Send),
    };
    let out = match zone.resolve(&req) {
        Outcome::Drop => None,
        Outcome::Reply(m) if tcp => m.to_vec().ok(),
        Outcome::Reply(m) => udp_bytes(&req, &m),
        Outcome::Forward => return Step::Forward(req),
    };
    out.map_or(Step::Nothing, Step::Send)
}

/// The first upstream's reply to `bytes`, or a SERVFAIL for `req`.
async fn forward(upstreams: &[SocketAddr], req: &Message, bytes: &[u8], tcp: bool) -> Option<Vec<u8>> {
    for up in upstreams {
        let answer = if tcp { forward_tcp(*up, bytes).await } else { forward_udp(*up, bytes).await };
        match answer {
            Ok(r) => return Some(r),
            Err(e) => tracing::debug!(upstream = %up, error = %e, "upstream DNS did not answer"),
        }
    }
    servfail(req)
}

async fn forward_udp(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if up.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("static");
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    sock.connect(up).await?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65535];
    let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))??;
        // Only the reply to this query (same id) counts.
        if n >= 2 && buf[..2] == query[..2] {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn forward_tcp(up: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(up).await?;
        write_frame(&mut s, query).await?;
        read_frame(&mut s).await?.ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))
    };
    tokio::time::timeout(FORWARD_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(bytes.len()).map_err(|_| std::io::Error::other("DNS message over 64 KiB"))?;
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    w.write_all(&out).await
}

/// The response code of a reply's bytes, as metrics label it.
pub fn rcode_label(reply: &[u8]) -> &'static str {
    match reply.get(3).map(|b| b & 0x0f) {
        Some(0) => "NOERROR",
        Some(1) => "FORMERR",
        Some(2) => "SERVFAIL",
        Some(3) => "NXDOMAIN",
        Some(4) => "NOTIMP",
        Some(5) => "REFUSED",
        _ => "OTHER",
    }
}

/// Counts one reply in `capstan_node_dns_responses_total`.
fn count(metrics: &Option<prometheus::IntCounterVec>, reply: &[u8], source: &str) {
    if let Some(m) = metrics {
        m.with_label_values(&[rcode_label(reply), source]).inc();
    }
}

/// Answers DNS on `listeners` (UDP and TCP) from `zone`, forwarding
/// other names to `upstreams`, until the process ends. Replies are counted
/// in `metrics` (the agent's `capstan_node_dns_responses_total`).
pub async fn serve(
    listeners: Listeners,
    zone: Arc<ZoneCell>,
    upstreams: Vec<SocketAddr>,
    metrics: Option<prometheus::IntCounterVec>,
) {
    let Listeners { udp, tcp, addr } = listeners;
    let udp = Arc::new(udp);
    let upstreams: Arc<[SocketAddr]> = upstreams.into();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    tracing::info!(%addr, ?upstreams, "cluster DNS listening");
    {
        let (zone, upstreams, slots, metrics) = (zone.clone(), upstreams.clone(), slots.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = tcp.accept().await else {
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
                let (zone, upstreams, metrics) = (zone.clone(), upstreams.clone(), metrics.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    let mut conn = conn;
                    while let Ok(Ok(Some(q))) = tokio::time::timeout(TCP_IDLE, read_frame(&mut conn)).await {
                        let r = match step(&zone.get(), &q, true) {
                            Step::Send(r) => {
                                count(&metrics, &r, "cluster");
                                r
                            }
                            Step::Nothing => break,
                            Step::Forward(req) => match forward(&upstreams, &req, &q, true).await {
                                Some(r) => {
                                    count(&metrics, &r, "upstream");
                                    r
                                }
                                None => break,
                            },
                        };
                        if write_frame(&mut conn, &r).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, from) = match udp.recv_from(&mut buf).await {
            Ok(x) => x,
            Err(e) => {
                tracing::debug!(error = %e, "DNS receive failed");
                continue;
            }
        };
        let q = &buf[..n];
        // Cluster names are answered inline; forwarded ones wait on an
        // upstream, so they get their own task (bounded).
        let req = match step(&zone.get(), q, false) {
            Step::Send(r) => {
                count(&metrics, &r, "cluster");
                let _ = udp.send_to(&r, from).await;
                continue;
            }
            Step::Nothing => continue,
            Step::Forward(req) => req,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else { continue };
        let (upstreams, udp, q, metrics) = (upstreams.clone(), udp.clone(), q.to_vec(), metrics.clone());
        tokio::spawn(async move {
            let _slot = slot;
            if let Some(r) = forward(&upstreams, &req, &q, false).await {
                count(&metrics, &r, "upstream");
                let _ = udp.send_to(&r, from).await;
            }
        });
    }
}

#[cfg(test)]
#[path = "dns_test.rs"]
mod tests;
