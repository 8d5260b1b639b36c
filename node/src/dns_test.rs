use super::*;
use hickory_proto::op::Query;
use serde_json::json;

fn zone() -> Zone {
    let services = [
        json!({"metadata": {"namespace": "d", "name": "web"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
        json!({"metadata": {"namespace": "d", "name": "db"}, "spec": {"clusterIP": "None", "ports": [{"name": "pg", "port": 5432}]}}),
        json!({"metadata": {"namespace": "d", "name": "ext"}, "spec": {"type": "ExternalName", "externalName": "example.org"}}),
        json!({"metadata": {"namespace": "d", "name": "Bad_Name"}, "spec": {"clusterIP": "10.96.0.30"}}),
        json!({"metadata": {"namespace": "e", "name": "noip"}, "spec": {}}),
    ];
    let endpoints = [
        json!({"metadata": {"namespace": "d", "name": "db"}, "subsets": [
            {"addresses": [{"ip": "10.244.0.5", "hostname": "db-0"}, {"ip": "10.244.0.6"}],
             "notReadyAddresses": [{"ip": "10.244.0.7", "hostname": "db-2"}],
             "ports": [{"name": "pg", "port": 5432, "protocol": "TCP"}]}]}),
        json!({"metadata": {"namespace": "d", "name": "web"}, "subsets": [
            {"addresses": [{"ip": "10.244.0.9"}], "ports": [{"name": "http", "port": 8080}]}]}),
    ];
    Zone::build(&services.iter().collect::<Vec<_>>(), &endpoints.iter().collect::<Vec<_>>(), 42)
}

/// A query for `name` of type `qt`.
fn query(name: &str, qt: RecordType) -> Message {
    let mut req = Message::query();
    req.add_query(Query::query(Name::from_ascii(name).unwrap(), qt));
    req
}

fn ask(zone: &Zone, name: &str, qt: RecordType) -> Message {
    let mut req = query(name, qt);
    req.metadata.recursion_desired = true;
    // Through the wire format both ways, as a client would see it.
    let req = Message::from_vec(&req.to_vec().unwrap()).unwrap();
    match zone.resolve(&req) {
        Outcome::Reply(m) => {
            assert_eq!(m.metadata.id, req.metadata.id);
            assert_eq!(m.queries, req.queries, "the question is echoed");
            Message::from_vec(&m.to_vec().unwrap()).unwrap()
        }
        other => panic!("{name}: {other:?}"),
    }
}

fn rdata(m: &Message) -> Vec<String> {
    m.answers.iter().map(|r| format!("{} {}", r.name, r.data)).collect()
}

#[test]
fn services_resolve_to_their_cluster_ip_endpoints_or_alias() {
    let z = zone();
    let m = ask(&z, "web.d.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.metadata.authoritative);
    assert_eq!(rdata(&m), ["web.d.svc.cluster.local. 10.96.0.20"]);
    assert_eq!(m.answers[0].ttl, TTL);
    // Case does not matter.
    assert_eq!(rdata(&ask(&z, "WEB.D.svc.Cluster.Local.", RecordType::A)).len(), 1);
    // Headless: the ready endpoints only.
    let m = ask(&z, "db.d.svc.cluster.local.", RecordType::A);
    assert_eq!(rdata(&m), ["db.d.svc.cluster.local. 10.244.0.5", "db.d.svc.cluster.local. 10.244.0.6"]);
    // ExternalName: a CNAME, whatever was asked.
    let m = ask(&z, "ext.d.svc.cluster.local.", RecordType::A);
    assert_eq!(rdata(&m), ["ext.d.svc.cluster.local. example.org."]);
    // AAAA of an existing name: no data, not NXDOMAIN, with the SOA.
    let m = ask(&z, "web.d.svc.cluster.local.", RecordType::AAAA);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(m.authorities[0].record_type(), RecordType::SOA);
}

#[test]
fn endpoints_have_names_and_ports_have_srv_records() {
    let z = zone();
    let m = ask(&z, "db-0.db.d.svc.cluster.local.", RecordType::A);
    assert_eq!(rdata(&m), ["db-0.db.d.svc.cluster.local. 10.244.0.5"]);
    let m = ask(&z, "10-244-0-6.db.d.svc.cluster.local.", RecordType::A);
    assert_eq!(rdata(&m), ["10-244-0-6.db.d.svc.cluster.local. 10.244.0.6"]);
    // A not-ready endpoint has no name yet.
    let m = ask(&z, "db-2.db.d.svc.cluster.local.", RecordType::A);
    assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);

    let m = ask(&z, "_pg._tcp.db.d.svc.cluster.local.", RecordType::SRV);
    assert_eq!(
        rdata(&m),
        [
            "_pg._tcp.db.d.svc.cluster.local. 0 50 5432 10-244-0-6.db.d.svc.cluster.local.",
            "_pg._tcp.db.d.svc.cluster.local. 0 50 5432 db-0.db.d.svc.cluster.local.",
        ]
    );
    let extra: Vec<String> = m.additionals.iter().map(|r| format!("{} {}", r.name, r.data)).collect();
    assert_eq!(extra, ["10-244-0-6.db.d.svc.cluster.local. 10.244.0.6", "db-0.db.d.svc.cluster.local. 10.244.0.5"]);
    // A ClusterIP Service's port points at the Service, on its port.
    let m = ask(&z, "_dns._udp.web.d.svc.cluster.local.", RecordType::SRV);
    assert_eq!(rdata(&m), ["_dns._udp.web.d.svc.cluster.local. 0 100 53 web.d.svc.cluster.local."]);
    // SRV on the Service name lists every port.
    let m = ask(&z, "web.d.svc.cluster.local.", RecordType::SRV);
    assert_eq!(m.answers.len(), 2);
    for missing in
        ["_dns._tcp.web.d.svc.cluster.local.", "_x._tcp.web.d.svc.cluster.local.", "pg._tcp.db.d.svc.cluster.local."]
    {
        assert_eq!(ask(&z, missing, RecordType::SRV).metadata.response_code, ResponseCode::NXDomain, "{missing}");
    }
}

#[test]
fn unknown_cluster_names_are_nxdomain_and_other_names_are_forwarded() {
    let z = zone();
    for name in [
        "nope.d.svc.cluster.local.",
        "web.x.svc.cluster.local.",
        "bad_name.d.svc.cluster.local.",
        "noip.e.svc.cluster.local.",
        "a.b.c.d.e.f.cluster.local.",
        "google.com.d.svc.cluster.local.",
        "x.cluster.local.",
    ] {
        let m = ask(&z, name, RecordType::A);
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert_eq!(m.authorities.len(), 1, "{name}: negative answers carry the SOA");
    }
    // Zone cuts that exist: no data.
    for name in ["cluster.local.", "svc.cluster.local.", "d.svc.cluster.local."] {
        assert_eq!(ask(&z, name, RecordType::A).metadata.response_code, ResponseCode::NoError, "{name}");
    }
    let m = ask(&z, "cluster.local.", RecordType::SOA);
    assert!(matches!(&m.answers[0].data, RData::SOA(s) if s.serial == 42));
    // Pods by dashed address, in any namespace.
    let m = ask(&z, "10-244-1-2.any.pod.cluster.local.", RecordType::A);
    assert_eq!(rdata(&m), ["10-244-1-2.any.pod.cluster.local. 10.244.1.2"]);
    assert_eq!(
        ask(&z, "10-244-1.any.pod.cluster.local.", RecordType::A).metadata.response_code,
        ResponseCode::NXDomain
    );

    for name in ["example.org.", "cluster.local.example.org.", "local."] {
        let req = query(name, RecordType::A);
        assert!(matches!(z.resolve(&req), Outcome::Forward), "{name}");
    }
}

#[test]
fn reverse_lookups_name_services_and_endpoints() {
    let z = zone();
    let m = ask(&z, "20.0.96.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(rdata(&m), ["20.0.96.10.in-addr.arpa. web.d.svc.cluster.local."]);
    let m = ask(&z, "5.0.244.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(rdata(&m), ["5.0.244.10.in-addr.arpa. db-0.db.d.svc.cluster.local."]);
    let req = query("1.1.168.192.in-addr.arpa.", RecordType::PTR);
    assert!(matches!(z.resolve(&req), Outcome::Forward));
}

#[test]
fn bad_queries_get_errors_not_silence() {
    let z = zone();
    // Two questions.
    let mut req = query("web.d.svc.cluster.local.", RecordType::A);
    req.add_query(Query::query(Name::from_ascii("db.d.svc.cluster.local.").unwrap(), RecordType::A));
    assert!(matches!(z.resolve(&req), Outcome::Reply(m) if m.metadata.response_code == ResponseCode::FormErr));
    // No question.
    assert!(
        matches!(z.resolve(&Message::query()), Outcome::Reply(m) if m.metadata.response_code == ResponseCode::FormErr)
    );
    // Another opcode.
    let mut req = Message::query();
    req.metadata.op_code = OpCode::Status;
    assert!(matches!(z.resolve(&req), Outcome::Reply(m) if m.metadata.response_code == ResponseCode::NotImp));
    // A response is never answered.
    let resp = Message::response(7, OpCode::Query);
    assert!(matches!(z.resolve(&resp), Outcome::Drop));
    // Garbage: FORMERR with its id when there is one, else nothing.
    let r = Message::from_vec(&malformed(&[0x12, 0x34, 0x01, 0xff]).unwrap()).unwrap();
    assert_eq!((r.metadata.id, r.metadata.response_code), (0x1234, ResponseCode::FormErr));
    assert!(malformed(&[0x12]).is_none());
    assert!(malformed(&[0x12, 0x34, 0x80]).is_none(), "a response is not answered");
}

#[test]
fn big_udp_replies_are_truncated_for_tcp() {
    let addresses: Vec<Value> = (1..=60).map(|i| json!({"ip": format!("10.244.1.{i}")})).collect();
    let svc = json!({"metadata": {"namespace": "d", "name": "many"}, "spec": {"clusterIP": "None"}});
    let ep = json!({"metadata": {"namespace": "d", "name": "many"}, "subsets": [{"addresses": addresses}]});
    let z = Zone::build(&[&svc], &[&ep], 1);
    let mut req = query("many.d.svc.cluster.local.", RecordType::A);
    let Outcome::Reply(m) = z.resolve(&req) else { panic!() };
    assert_eq!(m.answers.len(), 60);
    let small = Message::from_vec(&udp_bytes(&req, &m).unwrap()).unwrap();
    assert!(small.metadata.truncation && small.answers.is_empty(), "60 answers do not fit 512 bytes");
    // With EDNS offering 4096 the reply fits the 1232 bytes sent at most.
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    req.set_edns(edns);
    let Outcome::Reply(m) = z.resolve(&req) else { panic!() };
    let bytes = udp_bytes(&req, &m).unwrap();
    assert!(bytes.len() <= usize::from(MAX_UDP_PAYLOAD));
    assert_eq!(Message::from_vec(&bytes).unwrap().answers.len(), 60);
}

#[test]
fn pods_naming_a_subdomain_have_a_domain() {
    assert_eq!(pod_domain(&json!({"subdomain": "db"}), "d").as_deref(), Some("db.d.svc.cluster.local"));
    assert_eq!(pod_domain(&json!({}), "d"), None);
    assert_eq!(pod_domain(&json!({"subdomain": "Not_A_Label"}), "d"), None);
}

#[test]
fn pods_resolv_conf_follows_dns_policy_and_config() {
    let host = ResolvConf::parse(
        "# host\nnameserver 192.168.1.1\nnameserver 10.96.0.10\nsearch corp.example\noptions edns0 ndots:1\n",
    );
    assert_eq!(host.nameservers, ["192.168.1.1", "10.96.0.10"]);
    let many = ResolvConf::parse("nameserver 192.168.1.1\nnameserver 10.96.0.10\nnameserver bogus\nnameserver ::1\n");
    let want: Vec<SocketAddr> = vec!["192.168.1.1:53".parse().unwrap(), "[::1]:53".parse().unwrap()];
    assert_eq!(upstreams(&many), want);

    let cluster = "search ns1.svc.cluster.local svc.cluster.local cluster.local corp.example\nnameserver 10.96.0.10\noptions ndots:5\n";
    assert_eq!(pod_resolv_conf(&json!({}), "ns1", &host), cluster);
    assert_eq!(pod_resolv_conf(&json!({"dnsPolicy": "ClusterFirst"}), "ns1", &host), cluster);
    // hostNetwork pods keep the node's resolver unless they ask.
    let host_file = "search corp.example\nnameserver 192.168.1.1\nnameserver 10.96.0.10\noptions edns0 ndots:1\n";
    assert_eq!(pod_resolv_conf(&json!({"hostNetwork": true}), "ns1", &host), host_file);
    assert_eq!(
        pod_resolv_conf(&json!({"hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"}), "ns1", &host),
        cluster
    );
    assert_eq!(pod_resolv_conf(&json!({"dnsPolicy": "Default"}), "ns1", &host), host_file);
    // None: only dnsConfig. Options override by name; lists capped.
    let spec = json!({"dnsPolicy": "None", "dnsConfig": {
        "nameservers": ["1.1.1.1", "8.8.8.8", "1.1.1.1", "9.9.9.9", "4.4.4.4"],
        "searches": ["a.example", "a.example"],
        "options": [{"name": "ndots", "value": "2"}, {"name": "edns0"}, {"name": "ndots", "value": "3"}, {"value": "x"}]}});
    assert_eq!(
        pod_resolv_conf(&spec, "ns1", &host),
        "search a.example\nnameserver 1.1.1.1\nnameserver 8.8.8.8\nnameserver 9.9.9.9\noptions edns0 ndots:3\n"
    );
    // ClusterFirst extended by dnsConfig.
    let spec = json!({"dnsConfig": {"searches": ["extra.example"], "options": [{"name": "ndots", "value": "2"}]}});
    assert_eq!(
        pod_resolv_conf(&spec, "ns1", &host),
        "search ns1.svc.cluster.local svc.cluster.local cluster.local corp.example extra.example\nnameserver 10.96.0.10\noptions ndots:2\n"
    );
}

/// A UDP port with its TCP twin free too, on 127.0.0.1.
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

async fn udp_ask(server: SocketAddr, name: &str) -> Message {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let req = query(name, RecordType::A);
    sock.send_to(&req.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf)).await.unwrap().unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.metadata.id, req.metadata.id);
    m
}

/// The server over real sockets: cluster names from the zone over UDP and
/// TCP, other names relayed from an upstream, SERVFAIL when the upstream
/// is silent, FORMERR for garbage.
#[tokio::test]
async fn serves_the_zone_and_forwards_the_rest() {
    // An upstream that answers every question with 192.0.2.1 (UDP and
    // TCP), and one that never answers.
    fn answer(q: &[u8]) -> Vec<u8> {
        let req = Message::from_vec(q).unwrap();
        let mut m = reply(&req, ResponseCode::NoError);
        m.add_answer(Record::from_rdata(req.queries[0].name().clone(), 60, RData::A(A(Ipv4Addr::new(192, 0, 2, 1)))));
        m.to_vec().unwrap()
    }
    let up_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let upstream = tokio::net::UdpSocket::bind(up_addr).await.unwrap();
    let upstream_tcp = tokio::net::TcpListener::bind(up_addr).await.unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
            upstream.send_to(&answer(&buf[..n]), from).await.unwrap();
        }
    });
    tokio::spawn(async move {
        while let Ok((mut c, _)) = upstream_tcp.accept().await {
            while let Ok(Some(q)) = read_frame(&mut c).await {
                write_frame(&mut c, &answer(&q)).await.unwrap();
            }
        }
    });
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();

    let cell = Arc::new(ZoneCell::default());
    cell.set(zone());
    let first = bind(Ipv4Addr::LOCALHOST, &[0]).unwrap();
    let server = SocketAddr::V4(first.addr);
    let metrics = prometheus::IntCounterVec::new(prometheus::Opts::new("r", "r"), &["rcode", "source"]).unwrap();
    tokio::spawn(serve(first, cell.clone(), vec![up_addr], Some(metrics.clone())));
    // A port someone else holds (the upstream's) is passed over for the
    // next one listed, as the agent passes over a host's DNS server on 53.
    let second = bind(Ipv4Addr::LOCALHOST, &[up_addr.port(), 0]).unwrap();
    assert_ne!(second.addr.port(), up_addr.port());
    let port2 = second.addr.port();
    tokio::spawn(serve(second, cell.clone(), vec![silent.local_addr().unwrap()], None));

    let m = udp_ask(server, "web.d.svc.cluster.local.").await;
    assert_eq!(rdata(&m), ["web.d.svc.cluster.local. 10.96.0.20"]);
    let m = udp_ask(server, "example.org.").await;
    assert_eq!(rdata(&m), ["example.org. 192.0.2.1"], "relayed from the upstream");
    // A new zone is answered at once.
    cell.set(Zone::default());
    assert_eq!(udp_ask(server, "web.d.svc.cluster.local.").await.metadata.response_code, ResponseCode::NXDomain);
    cell.set(zone());

    // TCP: two questions on one connection, length-prefixed.
    let mut conn = tokio::net::TcpStream::connect(server).await.unwrap();
    for name in ["db.d.svc.cluster.local.", "example.org."] {
        let req = query(name, RecordType::A);
        write_frame(&mut conn, &req.to_vec().unwrap()).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut conn)).await.unwrap().unwrap().unwrap();
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(m.metadata.id, req.metadata.id);
        assert_eq!(m.answers.len(), if name.starts_with("db") { 2 } else { 1 }, "{name}");
    }

    let started = std::time::Instant::now();
    let m = udp_ask(SocketAddr::from(([127, 0, 0, 1], port2)), "example.org.").await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() >= FORWARD_TIMEOUT);
    // Cluster names do not wait for a silent upstream.
    let m = udp_ask(SocketAddr::from(([127, 0, 0, 1], port2)), "web.d.svc.cluster.local.").await;
    assert_eq!(m.answers.len(), 1);

    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&[0xab, 0xcd, 0x01, 0x00, 0xff], server).await.unwrap();
    let mut buf = vec![0u8; 512];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf)).await.unwrap().unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!((m.metadata.id, m.metadata.response_code), (0xabcd, ResponseCode::FormErr));
    // Every reply of the first server was counted.
    let n = |rcode: &str, source: &str| metrics.with_label_values(&[rcode, source]).get();
    assert_eq!(n("NOERROR", "cluster"), 2, "web over UDP, db over TCP");
    assert_eq!(n("NXDOMAIN", "cluster"), 1);
    assert_eq!(n("FORMERR", "cluster"), 1);
    assert_eq!(n("NOERROR", "upstream"), 2, "example.org over UDP and TCP");
}
