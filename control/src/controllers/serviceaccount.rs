//! ServiceAccount controller and root CA publisher (Kubernetes'
//! `serviceaccount-controller` and `root-ca-cert-publisher` in one): every
//! active namespace has a ServiceAccount `default` and a ConfigMap
//! `kube-root-ca.crt` whose `ca.crt` is the cluster CA, so pods can check
//! the API server's certificate. Both are recreated when deleted and the
//! ConfigMap is reset when edited; nothing is created in a terminating
//! namespace (the namespace's deletion would race it).
//!
//! Keys are namespace names; [`plan`] is pure.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::{json, Value};

use super::informer::{Change, Informer};
use super::runtime::{ReconcileResult, Reconciler};
use crate::api::serviceaccount::ROOT_CA_CONFIGMAP;
use crate::api::{internal, ApiServer};

pub const DEFAULT_ACCOUNT: &str = "default";
const MANAGER: &str = "serviceaccount-controller";
const DESCRIPTION: &str = "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.";

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    CreateServiceAccount(Value),
    CreateConfigMap(Value),
    /// The stored ConfigMap with its data reset.
    ResetConfigMap(Value),
}

fn terminating(ns: &Value) -> bool {
    ns["metadata"]["deletionTimestamp"].is_string() || ns["status"]["phase"] == "Terminating"
}

/// What namespace `ns` (None: deleted) lacks, given whether its `default`
/// account exists and its `kube-root-ca.crt` ConfigMap as stored.
pub fn plan(ns: Option<&Value>, has_default_account: bool, root_ca: Option<&Value>, ca_pem: &str) -> Vec<Action> {
    let Some(ns) = ns.filter(|n| !terminating(n)) else { return vec![] };
    let name = ns["metadata"]["name"].as_str().unwrap_or_default();
    let mut out = Vec::new();
    if !has_default_account {
        out.push(Action::CreateServiceAccount(json!({"apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": DEFAULT_ACCOUNT, "namespace": name}})));
    }
    match root_ca {
        None => out.push(Action::CreateConfigMap(json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": ROOT_CA_CONFIGMAP, "namespace": name,
                "annotations": {"kubernetes.io/description": DESCRIPTION}},
            "data": {"ca.crt": ca_pem}}))),
        Some(cm) if cm["data"] != json!({"ca.crt": ca_pem}) || cm.get("binaryData").is_some() => {
            let mut cm = cm.clone();
            cm["data"] = json!({"ca.crt": ca_pem});
            if let Some(m) = cm.as_object_mut() {
                m.remove("binaryData");
            }
            out.push(Action::ResetConfigMap(cm));
        }
        Some(_) => {}
    }
    out
}

pub struct ServiceAccountController {
    pub api: Arc<ApiServer>,
    pub namespaces: Arc<Informer>,
    pub accounts: Arc<Informer>,
    pub configmaps: Arc<Informer>,
}

impl ServiceAccountController {
    /// The namespace whose `default` account or root CA ConfigMap changed.
    pub fn key_for(c: &Change, name: &str) -> Vec<String> {
        c.key.strip_suffix(name).and_then(|ns| ns.strip_suffix('/')).map(str::to_string).into_iter().collect()
    }

    async fn run(self: Arc<Self>, key: String) -> ReconcileResult {
        let ns = self.namespaces.get(&key).map(|c| c.object());
        let has_default = self.accounts.get(&format!("{key}/{DEFAULT_ACCOUNT}")).is_some();
        let cm = self.configmaps.get(&format!("{key}/{ROOT_CA_CONFIGMAP}"));
        let cm_obj = cm.as_ref().map(|c| c.object());
        for action in plan(ns.as_ref(), has_default, cm_obj.as_ref(), &self.api.ca_pem) {
            let result = match action {
                Action::CreateServiceAccount(sa) => {
                    internal::write(&self.api, self.accounts.rt, None, sa, MANAGER).await.map(|_| ())
                }
                Action::CreateConfigMap(obj) => {
                    internal::write(&self.api, self.configmaps.rt, None, obj, MANAGER).await.map(|_| ())
                }
                Action::ResetConfigMap(obj) => match &cm {
                    Some(cur) => internal::write(&self.api, self.configmaps.rt, Some(&cur.found()), obj, MANAGER)
                        .await
                        .map(|_| ()),
                    None => Ok(()),
                },
            };
            match result {
                // A cache behind our own create: it is there.
                Err(e) if e.code == 409 && e.reason == "AlreadyExists" => {}
                r => r.map_err(|e| e.to_string())?,
            }
        }
        Ok(None)
    }
}

impl Reconciler for ServiceAccountController {
    fn name(&self) -> &'static str {
        "serviceaccount"
    }
    fn reconcile(self: Arc<Self>, key: String) -> BoxFuture<'static, ReconcileResult> {
        Box::pin(self.run(key))
    }
    fn all_keys(&self) -> Vec<String> {
        self.namespaces.list().iter().map(|c| c.key.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

    fn ns(name: &str) -> Value {
        json!({"metadata": {"name": name}, "status": {"phase": "Active"}})
    }

    #[test]
    fn every_active_namespace_gets_an_account_and_the_root_ca() {
        let a = plan(Some(&ns("team")), false, None, CA);
        assert_eq!(a.len(), 2, "{a:?}");
        let Action::CreateServiceAccount(sa) = &a[0] else { panic!("{a:?}") };
        assert_eq!(
            (sa["metadata"]["name"].as_str(), sa["metadata"]["namespace"].as_str()),
            (Some("default"), Some("team"))
        );
        let Action::CreateConfigMap(cm) = &a[1] else { panic!("{a:?}") };
        assert_eq!(cm["metadata"]["name"], "kube-root-ca.crt");
        assert_eq!(cm["data"]["ca.crt"], CA);
        let current = cm.clone();
        assert_eq!(plan(Some(&ns("team")), true, Some(&current), CA), vec![], "nothing to do");
        // Only the account is missing (deleted): recreated.
        assert!(matches!(
            plan(Some(&ns("team")), false, Some(&current), CA).as_slice(),
            [Action::CreateServiceAccount(_)]
        ));
    }

    #[test]
    fn edited_root_ca_is_reset_and_terminating_namespaces_are_left_alone() {
        let mut edited = json!({"metadata": {"name": "kube-root-ca.crt", "namespace": "team", "labels": {"x": "y"}},
            "data": {"ca.crt": "forged", "extra": "1"}});
        let a = plan(Some(&ns("team")), true, Some(&edited), CA);
        let [Action::ResetConfigMap(cm)] = a.as_slice() else { panic!("{a:?}") };
        assert_eq!(cm["data"], json!({"ca.crt": CA}));
        assert_eq!(cm["metadata"]["labels"]["x"], "y", "only the data is reset");
        edited["data"] = json!({"ca.crt": CA});
        edited["binaryData"] = json!({"b": "AA=="});
        assert!(matches!(plan(Some(&ns("team")), true, Some(&edited), CA).as_slice(), [Action::ResetConfigMap(_)]));

        let mut going = ns("team");
        going["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        going["status"]["phase"] = json!("Terminating");
        assert_eq!(plan(Some(&going), false, None, CA), vec![]);
        assert_eq!(plan(None, false, None, CA), vec![], "deleted namespace");
    }
}
