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
//! [`Catalog`] is pure (frames in, objects out); [`run`] is the IO.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use capstan_proto::k8s::stored::StoredObject;
use capstan_proto::nodewire::{NodeRequest, PodFrame};
use parking_lot::Mutex;
use serde_json::Value;

use crate::conn::Masters;

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

    /// This node's nftables script for what the catalog holds.
    pub fn script(&self, table: &str) -> String {
        let services: Vec<Value> = self.services.values().cloned().collect();
        let endpoints: Vec<Value> = self.endpoints.values().cloned().collect();
        crate::proxy::plan(table, &services, &endpoints)
    }
}

/// Keeps the table `table` in step with the cluster's Services, forever.
pub async fn run(masters: Arc<Masters>, table: String) {
    let catalog = Arc::new(Mutex::new(Catalog::default()));
    let (changed, mut seen) = tokio::sync::watch::channel(0u64);
    let writer = catalog.clone();
    tokio::spawn(async move {
        let mut applied: Option<String> = None;
        while seen.changed().await.is_ok() {
            // Until the latest state is in the kernel (a failed apply is
            // retried with whatever the catalog holds by then).
            loop {
                tokio::time::sleep(SETTLE).await;
                seen.borrow_and_update();
                let script = writer.lock().script(&table);
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
}
