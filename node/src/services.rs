//! The service proxy's feed: every Service and Endpoints of the cluster,
//! watched from a master (`NodeRequest::WatchServices`; re-watched from a
//! fresh listing whenever the stream ends), turned into this node's
//! nftables table by `proxy.rs` shortly after each change.
//!
//! Changes come in bursts (a rollout moves many endpoints), so the table is
//! rewritten at most every [`SETTLE`], and only when the script differs.
//! Fail-static: while no master is reachable the table stays as it was, so
//! running pods keep reaching their Services.
//!
//! The same catalog feeds the node's cluster DNS (`dns.rs`): each rewrite
//! also swaps in a new [`Zone`], and `kube-system/kube-dns` is routed to
//! this node's own resolver whatever its Endpoints say.
//!
//! [`Catalog`] is pure (frames in, objects out); [`run`] is the IO.

use std::collections::BTreeMap;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Duration;

use capstan_proto::k8s::stored::StoredObject;
use capstan_proto::nodewire::{NodeRequest, PodFrame};
use parking_lot::Mutex;
use serde_json::Value;

use crate::conn::Masters;
use crate::dns::{Zone, ZoneCell, DNS_SERVICE};

/// How long changes settle before the table is rewritten.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The Services and Endpoints last heard of, by `namespace/name`.
#[derive(Debug, Default)]
pub struct Catalog {
    services: BTreeMap<String, Value>,
    endpoints: BTreeMap<String, Value>,
}

impl Catalog {
    /// Applies one frame of the watch (a reset replaces everything).
    /// Undecodable objects and unknown kinds are skipped.
    pub fn apply(&mut self, frame: PodFrame) {
        if frame.reset {
            self.services.clear();
            self.endpoints.clear();
        }
        for ev in frame.events {
            let Some((kind, key)) = ev.key.split_once('/') else { continue };
            let map = match kind {
                "Service" => &mut self.services,
                "Endpoints" => &mut self.endpoints,
                _ => continue,
            };
            if ev.delete {
                map.remove(key);
                continue;
            }
            match StoredObject::decode(&ev.object, ev.mod_revision) {
                Ok(v) => {
                    map.insert(key.to_string(), v);
                }
                Err(e) => tracing::warn!(object = %ev.key, error = %e, "undecodable object in the service watch"),
            }
        }
    }

    /// This node's nftables script for what the catalog holds. With
    /// `local_dns`, the cluster DNS Service leads to that address.
    pub fn script(&self, table: &str, local_dns: Option<SocketAddrV4>) -> String {
        let services: Vec<Value> = self.services.values().cloned().collect();
        let dns_key = format!("{}/{}", DNS_SERVICE.0, DNS_SERVICE.1);
        let mut endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .filter(|(k, _)| local_dns.is_none() || **k != dns_key)
            .map(|(_, v)| v.clone())
            .collect();
        if let (Some(addr), Some(svc)) = (local_dns, self.services.get(&dns_key)) {
            endpoints.push(local_dns_endpoints(svc, addr));
        }
        crate::proxy::plan(table, &services, &endpoints)
    }

    /// The cluster DNS zone for what the catalog holds.
    pub fn zone(&self, serial: u32) -> Zone {
        let services: Vec<&Value> = self.services.values().collect();
        let endpoints: Vec<&Value> = self.endpoints.values().collect();
        Zone::build(&services, &endpoints, serial)
    }
}

/// Endpoints for the cluster DNS Service `svc` at `addr`: each of its
/// ports 53 (DNS over UDP and over TCP) served there.
fn local_dns_endpoints(svc: &Value, addr: SocketAddrV4) -> Value {
    let ports: Vec<Value> = svc["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["port"] == 53)
        .map(|p| serde_json::json!({"name": p["name"], "port": addr.port(), "protocol": p["protocol"]}))
        .collect();
    serde_json::json!({
        "metadata": {"namespace": DNS_SERVICE.0, "name": DNS_SERVICE.1},
        "subsets": [{"addresses": [{"ip": addr.ip().to_string()}], "ports": ports}],
    })
}

/// This node's cluster DNS: its resolver's address and the zone it
/// answers from.
pub struct LocalDns {
    pub addr: SocketAddrV4,
    pub zone: Arc<ZoneCell>,
}

/// Keeps the table `table` (and `dns`'s zone) in step with the cluster's
/// Services, forever.
pub async fn run(masters: Arc<Masters>, table: String, dns: Option<LocalDns>) {
    let catalog = Arc::new(Mutex::new(Catalog::default()));
    let (changed, mut seen) = tokio::sync::watch::channel(0u64);
    let writer = catalog.clone();
    tokio::spawn(async move {
        let mut applied: Option<String> = None;
        let mut serial = 0u32;
        while seen.changed().await.is_ok() {
            // Until the latest state is in the kernel (a failed apply is
            // retried with whatever the catalog holds by then).
            loop {
                tokio::time::sleep(SETTLE).await;
                seen.borrow_and_update();
                let script = {
                    let catalog = writer.lock();
                    if let Some(dns) = &dns {
                        serial = serial.wrapping_add(1);
                        dns.zone.set(catalog.zone(serial));
                    }
                    catalog.script(&table, dns.as_ref().map(|d| d.addr))
                };
                if applied.as_deref() == Some(script.as_str()) {
                    break;
                }
                match crate::proxy::apply(&script).await {
                    Ok(()) => {
                        tracing::debug!(table, "service rules updated");
                        applied = Some(script);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(table, error = %format!("{e:#}"), "service rules not applied; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    });
    let apply = |frame| {
        catalog.lock().apply(frame);
        changed.send_modify(|n| *n += 1);
    };
    masters.follow(&NodeRequest::WatchServices, "service", apply).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use capstan_proto::nodewire::PodEvent;
    use serde_json::json;

    fn put(key: &str, obj: Value) -> PodEvent {
        let bytes = StoredObject::from_object(&obj).unwrap().encode();
        PodEvent { key: key.into(), delete: false, mod_revision: 7, object: bytes.to_vec() }
    }

    #[test]
    fn frames_keep_the_catalog_of_services_and_endpoints() {
        let svc = json!({"metadata": {"name": "web", "namespace": "d"}, "spec": {"clusterIP": "10.96.0.9"}});
        let ep = json!({"metadata": {"name": "web", "namespace": "d"}, "subsets": []});
        let mut c = Catalog::default();
        c.apply(PodFrame {
            reset: true,
            events: vec![put("Service/d/web", svc.clone()), put("Endpoints/d/web", ep), put("Pod/d/x", json!({}))],
        });
        assert_eq!(c.services.keys().collect::<Vec<_>>(), ["d/web"]);
        assert_eq!(c.endpoints.len(), 1, "unknown kinds are skipped");
        assert_eq!(c.services["d/web"]["metadata"]["resourceVersion"], "7");
        let gone = PodEvent { key: "Endpoints/d/web".into(), delete: true, mod_revision: 0, object: vec![] };
        let junk = PodEvent { key: "Service/d/bad".into(), delete: false, mod_revision: 1, object: vec![1, 2, 3] };
        c.apply(PodFrame {
            reset: false,
            events: vec![gone, junk, PodEvent { key: "no-slash".into(), ..put("x/y", json!({})) }],
        });
        assert!(c.endpoints.is_empty());
        assert_eq!(c.services.len(), 1, "an undecodable object is skipped");
        // A reset listing replaces everything.
        c.apply(PodFrame { reset: true, events: vec![] });
        assert!(c.services.is_empty());
    }

    #[test]
    fn the_cluster_dns_service_leads_to_this_node() {
        let dns = json!({"metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"}, {"name": "metrics", "port": 9153}]}});
        let elsewhere = json!({"metadata": {"name": "kube-dns", "namespace": "kube-system"},
            "subsets": [{"addresses": [{"ip": "10.244.9.9"}], "ports": [{"name": "dns", "port": 53, "protocol": "UDP"}]}]});
        let mut c = Catalog::default();
        c.apply(PodFrame {
            reset: true,
            events: vec![put("Service/kube-system/kube-dns", dns), put("Endpoints/kube-system/kube-dns", elsewhere)],
        });
        let local = c.script("t", Some(SocketAddrV4::new(std::net::Ipv4Addr::new(10, 244, 3, 1), 10053)));
        assert!(local.contains("10.244.3.1 . 10053") && !local.contains("10.244.9.9"), "{local}");
        assert!(local.contains("10.96.0.10 . udp . 53") && local.contains("10.96.0.10 . tcp . 53"), "{local}");
        assert!(!local.contains("kube-dns/tcp/9153"), "only the DNS ports lead here: {local}");
        // Without a local resolver (sim nodes), the Endpoints as they are.
        assert!(c.script("t", None).contains("10.244.9.9 . 53"));
        assert!(matches!(c.zone(1).resolve(&{
            let mut q = hickory_proto::op::Message::query();
            q.add_query(hickory_proto::op::Query::query(
                hickory_proto::rr::Name::from_ascii("kube-dns.kube-system.svc.cluster.local.").unwrap(),
                hickory_proto::rr::RecordType::A,
            ));
            q
        }), crate::dns::Outcome::Reply(m) if m.answers.len() == 1));
    }
}
