//! The `default/kubernetes` Service's endpoints: where pods reach the API.
//!
//! Every master keeps a Lease `kube-system/apiserver-<name>` (labelled
//! `apiserver.kubernetes.io/identity: kube-apiserver`, like Kubernetes' API
//! server identity leases) renewed every [`RENEW_EVERY`], its API address
//! in the annotation [`ADDRESS_ANNOTATION`]. Every master also rewrites
//! the selector-less Endpoints `default/kubernetes` from the leases still
//! valid: all compute the same object, so the first write wins and the
//! others find nothing to change. A master that stops renewing (killed,
//! removed) drops out after [`LEASE_SECONDS`]; its lease is deleted an
//! hour after it expired. The Service itself (cluster IP 10.96.0.1, port
//! 443) is a built-in object (`bootstrap.rs`).
//!
//! [`lease`], [`endpoints`] and [`forgotten`] are pure; [`run`] is the loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use capstan_proto::k8s::registry;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::ApiServer;

pub const NAMESPACE: &str = "kube-system";
pub const IDENTITY_LABEL: &str = "apiserver.kubernetes.io/identity";
pub const ADDRESS_ANNOTATION: &str = "capstan.io/api-address";
/// How long a master counts after its last renewal.
pub const LEASE_SECONDS: i64 = 15;
pub const RENEW_EVERY: Duration = Duration::from_secs(5);
/// Expired this long, a master's lease is removed.
const FORGET_AFTER: chrono::Duration = chrono::Duration::hours(1);

fn micro(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// The lease of master `name` serving the API at `address`, renewed at
/// `now` (keeping `prev`'s acquireTime).
pub fn lease(name: &str, address: SocketAddr, now: DateTime<Utc>, prev: Option<&Value>) -> Value {
    let acquired = prev.and_then(|p| p["spec"]["acquireTime"].as_str()).map_or_else(|| micro(now), str::to_string);
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": format!("apiserver-{name}"), "namespace": NAMESPACE,
            "labels": {IDENTITY_LABEL: "kube-apiserver"},
            "annotations": {ADDRESS_ANNOTATION: address.to_string()}},
        "spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS,
            "acquireTime": acquired, "renewTime": micro(now)}})
}

fn expiry(lease: &Value) -> Option<DateTime<Utc>> {
    let renew = DateTime::parse_from_rfc3339(lease["spec"]["renewTime"].as_str()?).ok()?;
    let secs = lease["spec"]["leaseDurationSeconds"].as_i64()?;
    Some(renew.with_timezone(&Utc) + chrono::Duration::seconds(secs))
}

fn is_master_lease(lease: &Value) -> bool {
    lease["metadata"]["labels"][IDENTITY_LABEL] == "kube-apiserver"
}

/// The Endpoints `default/kubernetes` for `leases` at `now`: the API
/// address of every master whose lease is valid, one subset per port
/// (masters on one host differ only in port), sorted.
pub fn endpoints(leases: &[Value], now: DateTime<Utc>) -> Value {
    let mut by_port: std::collections::BTreeMap<u16, std::collections::BTreeSet<std::net::IpAddr>> = Default::default();
    for l in leases.iter().filter(|l| is_master_lease(l)).filter(|l| expiry(l).is_some_and(|e| e > now)) {
        if let Some(addr) =
            l["metadata"]["annotations"][ADDRESS_ANNOTATION].as_str().and_then(|a| a.parse::<SocketAddr>().ok())
        {
            by_port.entry(addr.port()).or_default().insert(addr.ip());
        }
    }
    let subsets: Vec<Value> = by_port
        .into_iter()
        .map(|(port, ips)| {
            json!({"addresses": ips.iter().map(|ip| json!({"ip": ip.to_string()})).collect::<Vec<_>>(),
                "ports": [{"name": "https", "port": port, "protocol": "TCP"}]})
        })
        .collect();
    json!({"apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "kubernetes", "namespace": "default",
            "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": subsets})
}

/// Whether a master's lease has been expired so long it is forgotten.
pub fn forgotten(lease: &Value, now: DateTime<Utc>) -> bool {
    is_master_lease(lease) && expiry(lease).is_none_or(|e| e + FORGET_AFTER < now)
}

async fn round(api: &ApiServer, name: &str, address: SocketAddr) -> Result<(), super::status::ApiError> {
    let leases_rt = registry::by_kind("coordination.k8s.io/v1", "Lease").expect("Lease is served");
    let ep_rt = registry::by_kind("v1", "Endpoints").expect("Endpoints are served");
    let mine = format!("apiserver-{name}");
    let cur = api.objects.get(leases_rt, Some(NAMESPACE), &mine).await?;
    let now = Utc::now();
    let renewed = lease(name, address, now, cur.as_ref().map(|f| &f.object));
    super::internal::write(api, leases_rt, cur.as_ref(), renewed, "kube-apiserver").await?;
    let page = api.objects.list_local(leases_rt, Some(NAMESPACE), None, None, &|kv| {
        super::objects::decode_kv(kv).map(|v| is_master_lease(&v).then_some(v))
    })?;
    for old in page.items.iter().filter(|l| forgotten(l, now)) {
        let old_name = old["metadata"]["name"].as_str().unwrap_or_default();
        if let Some(found) = api.objects.get_local(leases_rt, Some(NAMESPACE), old_name)? {
            super::internal::delete(api, leases_rt, &found).await?;
        }
    }
    let want = endpoints(&page.items, now);
    let cur = api.objects.get(ep_rt, Some("default"), "kubernetes").await?;
    let have = cur.as_ref().map(|f| &f.object["subsets"]);
    let empty = json!([]);
    if have.map(|s| if s.is_null() { &empty } else { s }) != Some(&want["subsets"]) {
        let next = match &cur {
            Some(f) => {
                let mut o = f.object.clone();
                o["subsets"] = want["subsets"].clone();
                o
            }
            None => want,
        };
        super::internal::write(api, ep_rt, cur.as_ref(), next, "kube-apiserver").await?;
    }
    Ok(())
}

/// Renews this master's lease and the `kubernetes` endpoints forever.
/// Without a routable address (the API listens on 0.0.0.0 or ::) there is
/// nothing to publish.
pub async fn run(api: Arc<ApiServer>, name: String, address: SocketAddr) {
    if address.ip().is_unspecified() {
        tracing::warn!(%address, "the API listens on every address: the kubernetes Service gets no endpoint for this master");
        return;
    }
    loop {
        if let Err(e) = round(&api, &name, address).await {
            tracing::debug!("kubernetes endpoints not updated: {e}");
        }
        tokio::time::sleep(RENEW_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    #[test]
    fn live_masters_are_the_endpoints() {
        let a = lease("m1", "127.0.0.1:6443".parse().unwrap(), at(0), None);
        let b = lease("m2", "127.0.0.1:7443".parse().unwrap(), at(10), None);
        let c = lease("m3", "10.0.0.3:6443".parse().unwrap(), at(10), None);
        let stranger = json!({"metadata": {"name": "x", "annotations": {ADDRESS_ANNOTATION: "10.9.9.9:1"}},
            "spec": {"renewTime": micro(at(10)), "leaseDurationSeconds": 15}});
        let leases = [a.clone(), b, c, stranger];
        let ep = endpoints(&leases, at(12));
        assert_eq!(
            ep["subsets"],
            json!([
                {"addresses": [{"ip": "10.0.0.3"}, {"ip": "127.0.0.1"}], "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]},
                {"addresses": [{"ip": "127.0.0.1"}], "ports": [{"name": "https", "port": 7443, "protocol": "TCP"}]},
            ])
        );
        // m1 stopped renewing at 0: gone after 15 s.
        let ep = endpoints(&leases, at(16));
        assert_eq!(ep["subsets"][0]["addresses"], json!([{"ip": "10.0.0.3"}]));
        assert_eq!(endpoints(&leases, at(100))["subsets"], json!([]));
        // Renewing keeps when it was first acquired.
        let renewed = lease("m1", "127.0.0.1:6443".parse().unwrap(), at(5), Some(&a));
        assert_eq!(renewed["spec"]["acquireTime"], a["spec"]["acquireTime"]);
        assert_ne!(renewed["spec"]["renewTime"], a["spec"]["renewTime"]);
        assert!(!forgotten(&a, at(1000)));
        assert!(forgotten(&a, at(3700)));
        assert!(!forgotten(&leases[3], at(99_999)), "only master leases are collected");
    }
}
