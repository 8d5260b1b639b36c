//! ServiceAccounts in the API server: the token signing key, the
//! TokenRequest subresource (`serviceaccounts/<name>/token`), authentication
//! of ServiceAccount tokens, and the ServiceAccount admission of new pods
//! (the account must exist; its API credentials are mounted).
//!
//! Key layout: `/capstan/serviceaccount-signing-key` holds the PKCS#8 DER of
//! the ECDSA P-256 key every master signs and verifies tokens with. The
//! first master that needs it creates it with a create-if-absent
//! transaction, so all masters agree on one key; it travels in snapshots
//! and backups like every other key, so a restored cluster's tokens stay
//! valid.
//!
//! The decisions ([`token_spec`], [`check_bound`], [`apply_service_account`])
//! are pure; the rest reads the store.

use std::sync::Arc;
use std::time::Duration;

use capstan_proto::k8s::registry::{self, ResourceType};
use capstan_raft::types::{KeyRange, RangeRequest};
use chrono::{DateTime, Utc};
use http::StatusCode;
use serde_json::{json, Value};

use super::jwt::{self, Claims, KubernetesClaims, ObjectRef, SigningKey};
use super::rbac::User;
use super::status::ApiError;
use super::{ApiServer, Ctx, Reply};

pub const SIGNING_KEY: &[u8] = b"/capstan/serviceaccount-signing-key";

/// Where the API credentials are mounted in every container.
pub const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The ConfigMap with the cluster CA that every namespace gets.
pub const ROOT_CA_CONFIGMAP: &str = "kube-root-ca.crt";

const DEFAULT_EXPIRATION: i64 = 3600;
const MIN_EXPIRATION: i64 = 600;
/// Longer requests are granted this long, as Kubernetes caps them at
/// `--service-account-max-token-expiration`.
pub const MAX_EXPIRATION: i64 = 48 * 3600;

/// How long pod admission waits for a namespace's `default` ServiceAccount,
/// which the ServiceAccount controller creates moments after the namespace.
pub const DEFAULT_ACCOUNT_WAIT: Duration = Duration::from_secs(5);

/// This master's copy of the signing key, loaded on first use.
#[derive(Default)]
pub struct KeyCache(parking_lot::RwLock<Option<Arc<SigningKey>>>);

/// A registered kind, or a 500 naming it (a kind the code relies on).
pub fn kind(api_version: &str, kind: &str) -> Result<&'static ResourceType, ApiError> {
    registry::by_kind(api_version, kind).ok_or_else(|| ApiError::internal(format!("no {kind} kind")))
}

fn read_key(api: &ApiServer) -> Result<Option<Vec<u8>>, ApiError> {
    let req = RangeRequest { range: KeyRange::key(SIGNING_KEY.to_vec()), ..Default::default() };
    let (kvs, _, _) = api.objects.range(&req)?;
    Ok(kvs.first().map(|kv| kv.value.to_vec()))
}

/// The cluster's signing key, created by whichever master first needs it.
pub async fn signing_key(api: &ApiServer) -> Result<Arc<SigningKey>, ApiError> {
    if let Some(k) = api.sa_key.0.read().clone() {
        return Ok(k);
    }
    let der = match read_key(api)? {
        Some(d) => d,
        None => {
            api.objects.sync().await?;
            match read_key(api)? {
                Some(d) => d,
                None => {
                    let fresh = SigningKey::generate().map_err(|e| ApiError::internal(e.to_string()))?;
                    // Another master may have won the race: read whatever is stored.
                    api.objects.put_if_absent(SIGNING_KEY.to_vec(), fresh).await?;
                    api.objects.sync().await?;
                    read_key(api)?.ok_or_else(|| ApiError::unavailable("the signing key is not yet stored"))?
                }
            }
        }
    };
    let key = Arc::new(SigningKey::from_pkcs8(&der).map_err(|e| ApiError::internal(e.to_string()))?);
    *api.sa_key.0.write() = Some(key.clone());
    Ok(key)
}

// ---------------------------------------------------------------------------
// TokenRequest.

/// A validated `TokenRequest.spec`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSpec {
    pub audiences: Vec<String>,
    /// Granted lifetime (requests above [`MAX_EXPIRATION`] are cut to it).
    pub seconds: i64,
    /// (kind, name, uid if given)
    pub bound: Option<(String, String, Option<String>)>,
}

/// Kubernetes' defaults and validation of a TokenRequest spec; the errors
/// are (field, message) for a 422.
pub fn token_spec(spec: &Value) -> Result<TokenSpec, Vec<(String, String)>> {
    let mut errs = Vec::new();
    let seconds = match spec.get("expirationSeconds") {
        None | Some(Value::Null) => DEFAULT_EXPIRATION,
        Some(v) => match v.as_i64() {
            Some(s) if s < MIN_EXPIRATION => {
                errs.push((
                    "spec.expirationSeconds".into(),
                    format!("Invalid value: {s}: may not specify a duration less than 10 minutes"),
                ));
                s
            }
            Some(s) if s > 1 << 32 => {
                errs.push((
                    "spec.expirationSeconds".into(),
                    format!("Invalid value: {s}: may not specify a duration larger than 2^32 seconds"),
                ));
                s
            }
            Some(s) => s.min(MAX_EXPIRATION),
            None => {
                errs.push(("spec.expirationSeconds".into(), format!("Invalid value: {v}: must be an integer")));
                0
            }
        },
    };
    let mut audiences = Vec::new();
    for (i, a) in spec["audiences"].as_array().into_iter().flatten().enumerate() {
        match a.as_str() {
            Some(s) if !s.is_empty() => audiences.push(s.to_string()),
            _ => errs.push((format!("spec.audiences[{i}]"), "Invalid value: must be a non-empty string".into())),
        }
    }
    if audiences.is_empty() {
        audiences.push(jwt::ISSUER.to_string());
    }
    let r = &spec["boundObjectRef"];
    let bound = if r.is_object() {
        let kind = r["kind"].as_str().unwrap_or_default().to_string();
        let name = r["name"].as_str().unwrap_or_default().to_string();
        if !matches!(kind.as_str(), "Pod" | "Secret") {
            errs.push((
                "spec.boundObjectRef.kind".into(),
                format!("Unsupported value: {kind:?}: supported values: \"Pod\", \"Secret\""),
            ));
        }
        if r["apiVersion"].as_str().is_some_and(|v| !v.is_empty() && v != "v1") {
            errs.push(("spec.boundObjectRef.apiVersion".into(), "Unsupported value: supported values: \"v1\"".into()));
        }
        if name.is_empty() {
            errs.push(("spec.boundObjectRef.name".into(), "Required value".into()));
        }
        let uid = r["uid"].as_str().filter(|u| !u.is_empty()).map(str::to_string);
        Some((kind, name, uid))
    } else {
        None
    };
    if errs.is_empty() {
        Ok(TokenSpec { audiences, seconds, bound })
    } else {
        Err(errs)
    }
}

/// A token issued for a ServiceAccount: the JWT, its expiry (RFC 3339) and
/// the object it is bound to (as a TokenRequest's `boundObjectRef`).
pub struct Issued {
    pub token: String,
    pub expires: String,
    pub bound_ref: Value,
}

/// Issues a token for ServiceAccount `ns/name` as `spec` asks (bound to
/// a Pod or Secret that must exist with the uid given).
pub async fn issue(api: &ApiServer, ns: &str, name: &str, spec: &TokenSpec) -> Result<Issued, ApiError> {
    let sa = api
        .objects
        .get(kind("v1", "ServiceAccount")?, Some(ns), name)
        .await?
        .ok_or_else(|| ApiError::not_found("", "serviceaccounts", name))?
        .object;
    let mut claims =
        KubernetesClaims { namespace: ns.to_string(), serviceaccount: object_ref(&sa), pod: None, secret: None };
    let mut bound_ref = Value::Null;
    if let Some((bkind, bname, buid)) = &spec.bound {
        let rt = kind("v1", bkind)?;
        super::admission::check_name(bkind, bname).map_err(|_| ApiError::not_found("", rt.plural, bname))?;
        let obj = api
            .objects
            .get_local(rt, Some(ns), bname)?
            .ok_or_else(|| ApiError::not_found("", rt.plural, bname))?
            .object;
        let uid = obj["metadata"]["uid"].as_str().unwrap_or_default();
        if buid.as_deref().is_some_and(|u| u != uid) {
            return Err(ApiError::conflict(
                "",
                rt.plural,
                bname,
                &format!(
                    "the UID in the bound object reference ({}) does not match the UID in record",
                    buid.as_deref().unwrap_or_default()
                ),
            ));
        }
        if bkind == "Pod" && obj["spec"]["serviceAccountName"].as_str() != Some(name) {
            return Err(ApiError::bad_request(format!(
                "cannot bind token for serviceaccount {name:?} to pod running with different serviceaccount name."
            )));
        }
        let r = Some(object_ref(&obj));
        if bkind == "Pod" {
            claims.pod = r;
        } else {
            claims.secret = r;
        }
        bound_ref = json!({"kind": bkind, "apiVersion": "v1", "name": bname, "uid": uid});
    }
    let key = signing_key(api).await?;
    let now = Utc::now();
    let c =
        Claims::new(claims, spec.audiences.clone(), now.timestamp(), spec.seconds, uuid::Uuid::new_v4().to_string());
    let token = jwt::issue(&key, &c).map_err(|e| ApiError::internal(e.to_string()))?;
    let expires = DateTime::from_timestamp(c.exp, 0).unwrap_or(now).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    Ok(Issued { token, expires, bound_ref })
}

/// `POST .../serviceaccounts/<name>/token`: an `authentication.k8s.io/v1`
/// TokenRequest answered with a signed token.
pub async fn token_request(api: &ApiServer, ns: &str, name: &str, ctx: &Ctx) -> Result<Reply, ApiError> {
    let body = super::handlers::decode_body(ctx)?;
    let k = body["kind"].as_str().unwrap_or_default();
    let av = body["apiVersion"].as_str().unwrap_or_default();
    if (!k.is_empty() && k != "TokenRequest") || (!av.is_empty() && av != "authentication.k8s.io/v1") {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({av}) or kind ({k}) does not match the expected authentication.k8s.io/v1 TokenRequest"
        )));
    }
    let spec = token_spec(&body["spec"]).map_err(|errs| ApiError::invalid("TokenRequest", name, errs))?;
    let Issued { token, expires, bound_ref } = issue(api, ns, name, &spec).await?;
    let mut out_spec = json!({"audiences": spec.audiences, "expirationSeconds": spec.seconds});
    if bound_ref.is_object() {
        out_spec["boundObjectRef"] = bound_ref;
    }
    let out = json!({
        "kind": "TokenRequest", "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": ns, "creationTimestamp": super::handlers::now()},
        "spec": out_spec,
        "status": {"token": token, "expirationTimestamp": expires},
    });
    Ok(Reply::ok(out).with_code(StatusCode::CREATED))
}

fn object_ref(obj: &Value) -> ObjectRef {
    ObjectRef {
        name: obj["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        uid: obj["metadata"]["uid"].as_str().unwrap_or_default().to_string(),
    }
}

// ---------------------------------------------------------------------------
// Authentication.

fn deleted_by(obj: &Value, now: DateTime<Utc>) -> bool {
    obj["metadata"]["deletionTimestamp"]
        .as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .is_some_and(|t| t <= now)
}

/// Whether the objects a verified token names still stand: the
/// ServiceAccount and any bound object exist with the uids the token
/// recorded and are not being deleted. `Err` says why not.
pub fn check_bound(
    claims: &Claims,
    sa: Option<&Value>,
    pod: Option<&Value>,
    secret: Option<&Value>,
    now: DateTime<Utc>,
) -> Result<(), String> {
    let k = &claims.kubernetes;
    let same = |o: Option<&Value>, r: &ObjectRef, what: &str| -> Result<(), String> {
        match o {
            None => Err(format!("{what} {}/{} has been deleted", k.namespace, r.name)),
            Some(o) if o["metadata"]["uid"].as_str() != Some(r.uid.as_str()) => {
                Err(format!("{what} {}/{} has been replaced (uid {})", k.namespace, r.name, o["metadata"]["uid"]))
            }
            Some(o) if deleted_by(o, now) => Err(format!("{what} {}/{} is being deleted", k.namespace, r.name)),
            Some(_) => Ok(()),
        }
    };
    same(sa, &k.serviceaccount, "service account")?;
    if let Some(p) = &k.pod {
        same(pod, p, "pod")?;
    }
    if let Some(s) = &k.secret {
        same(secret, s, "secret")?;
    }
    Ok(())
}

/// The user a ServiceAccount token authenticates as; any failure is a 401.
pub async fn authenticate(api: &ApiServer, token: &str) -> Result<User, ApiError> {
    let key = signing_key(api).await?;
    let now = Utc::now();
    let claims = jwt::verify(&key, token, &[jwt::ISSUER], now.timestamp()).map_err(|e| {
        tracing::debug!("service account token refused: {e}");
        ApiError::unauthorized()
    })?;
    let check = || -> Result<Result<(), String>, ApiError> {
        let k = &claims.kubernetes;
        let get = |kind_name: &str, name: Option<&str>| -> Result<Option<Value>, ApiError> {
            match name {
                None => Ok(None),
                Some(n) => Ok(api.objects.get_local(kind("v1", kind_name)?, Some(&k.namespace), n)?.map(|f| f.object)),
            }
        };
        let sa = get("ServiceAccount", Some(&k.serviceaccount.name))?;
        let pod = get("Pod", k.pod.as_ref().map(|p| p.name.as_str()))?;
        let secret = get("Secret", k.secret.as_ref().map(|s| s.name.as_str()))?;
        Ok(check_bound(&claims, sa.as_ref(), pod.as_ref(), secret.as_ref(), now))
    };
    let mut verdict = check()?;
    if verdict.is_err() {
        // Issued through another master a moment ago? Catch up once.
        api.objects.sync().await?;
        verdict = check()?;
    }
    if let Err(why) = verdict {
        tracing::debug!(user = %claims.sub, "service account token invalidated: {why}");
        return Err(ApiError::unauthorized());
    }
    let groups = claims.groups();
    Ok(User { name: claims.sub, groups })
}

// ---------------------------------------------------------------------------
// Pod admission.

/// Kubernetes' `kube-api-access-<suffix>` projected volume: a bound token,
/// the cluster CA and the namespace.
pub fn api_access_volume(name: &str) -> Value {
    json!({"name": name, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
        {"configMap": {"name": ROOT_CA_CONFIGMAP, "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}})
}

/// What the ServiceAccount admission plugin does to a new pod whose
/// account `sa` exists: its image pull secrets if the pod names none, and
/// unless automounting is off (pod first, then account), the API access
/// volume mounted read-only in every container that has nothing at
/// [`MOUNT_PATH`] yet.
pub fn apply_service_account(pod: &mut Value, sa: &Value, suffix: &str) {
    let spec = &mut pod["spec"];
    if spec["imagePullSecrets"].as_array().is_none_or(|s| s.is_empty()) {
        if let Some(s) = sa["imagePullSecrets"].as_array().filter(|s| !s.is_empty()) {
            spec["imagePullSecrets"] = Value::Array(s.clone());
        }
    }
    let automount =
        spec["automountServiceAccountToken"].as_bool().or(sa["automountServiceAccountToken"].as_bool()).unwrap_or(true);
    if !automount {
        return;
    }
    let existing = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str())
        .find(|n| n.starts_with("kube-api-access-"))
        .map(str::to_string);
    let volume = existing.clone().unwrap_or_else(|| format!("kube-api-access-{suffix}"));
    let mount = json!({"name": volume, "readOnly": true, "mountPath": MOUNT_PATH});
    let mut needed = false;
    for list in ["initContainers", "containers"] {
        for c in spec[list].as_array_mut().into_iter().flatten() {
            let taken = c["volumeMounts"].as_array().into_iter().flatten().any(|m| m["mountPath"] == MOUNT_PATH);
            if !taken {
                if !c["volumeMounts"].is_array() {
                    c["volumeMounts"] = json!([]);
                }
                if let Some(ms) = c["volumeMounts"].as_array_mut() {
                    ms.push(mount.clone());
                }
                needed = true;
            }
        }
    }
    if needed && existing.is_none() {
        if !spec["volumes"].is_array() {
            spec["volumes"] = json!([]);
        }
        if let Some(vs) = spec["volumes"].as_array_mut() {
            vs.push(api_access_volume(&volume));
        }
    }
}

/// Admits a new pod (after defaulting): its ServiceAccount must exist.
/// A namespace's `default` account is waited for up to `wait`, since the
/// controller creates it just after the namespace (Kubernetes rejects at
/// once, and clients retry).
pub async fn admit_pod(api: &ApiServer, mut pod: Value, wait: Duration) -> Result<Value, ApiError> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
    let name = pod["spec"]["serviceAccountName"].as_str().filter(|n| !n.is_empty()).unwrap_or("default").to_string();
    let rt = kind("v1", "ServiceAccount")?;
    let mut sa = api.objects.get_local(rt, Some(&ns), &name)?;
    if sa.is_none() {
        api.objects.sync().await?;
        sa = api.objects.get_local(rt, Some(&ns), &name)?;
    }
    let deadline = tokio::time::Instant::now() + wait;
    while sa.is_none() && name == "default" && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        sa = api.objects.get_local(rt, Some(&ns), &name)?;
    }
    let Some(sa) = sa else {
        return Err(ApiError::forbidden(format!(
            "pods {:?} is forbidden: error looking up service account {ns}/{name}: serviceaccount {name:?} not found",
            pod["metadata"]["name"].as_str().unwrap_or_default()
        ))
        .with_details(json!({"name": pod["metadata"]["name"], "kind": "pods"})));
    };
    apply_service_account(&mut pod, &sa.object, &super::handlers::random_suffix());
    Ok(pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_spec_defaults_bounds_and_bindings() {
        let s = token_spec(&json!({})).unwrap();
        assert_eq!((s.seconds, s.audiences.as_slice(), &s.bound), (3600, &[jwt::ISSUER.to_string()][..], &None));
        let e = token_spec(&json!({"expirationSeconds": 599})).unwrap_err();
        assert!(e[0].0 == "spec.expirationSeconds" && e[0].1.contains("less than 10 minutes"), "{e:?}");
        assert_eq!(token_spec(&json!({"expirationSeconds": 600})).unwrap().seconds, 600);
        assert_eq!(token_spec(&json!({"expirationSeconds": 365 * 86400})).unwrap().seconds, MAX_EXPIRATION);
        assert!(token_spec(&json!({"expirationSeconds": "1h"})).is_err());
        let s =
            token_spec(&json!({"audiences": ["vault"], "boundObjectRef": {"kind": "Pod", "name": "p", "uid": "u"}}))
                .unwrap();
        assert_eq!(s.audiences, ["vault"]);
        assert_eq!(s.bound, Some(("Pod".into(), "p".into(), Some("u".into()))));
        let e = token_spec(&json!({"boundObjectRef": {"kind": "Node", "name": ""}})).unwrap_err();
        let fields: Vec<&str> = e.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(fields, ["spec.boundObjectRef.kind", "spec.boundObjectRef.name"]);
    }

    fn claims(pod: bool) -> Claims {
        let k = KubernetesClaims {
            namespace: "team".into(),
            serviceaccount: ObjectRef { name: "default".into(), uid: "sa-1".into() },
            pod: pod.then(|| ObjectRef { name: "p".into(), uid: "pod-1".into() }),
            secret: None,
        };
        Claims::new(k, vec![jwt::ISSUER.into()], 0, 3600, "j".into())
    }

    fn obj(uid: &str) -> Value {
        json!({"metadata": {"uid": uid}})
    }

    #[test]
    fn tokens_die_with_their_account_and_bound_object() {
        let now = Utc::now();
        let (sa, pod) = (obj("sa-1"), obj("pod-1"));
        assert_eq!(check_bound(&claims(false), Some(&sa), None, None, now), Ok(()));
        assert_eq!(check_bound(&claims(true), Some(&sa), Some(&pod), None, now), Ok(()));
        let e = check_bound(&claims(false), None, None, None, now).unwrap_err();
        assert!(e.contains("service account team/default has been deleted"), "{e}");
        let e = check_bound(&claims(false), Some(&obj("sa-2")), None, None, now).unwrap_err();
        assert!(e.contains("replaced"), "recreated under the same name: {e}");
        let e = check_bound(&claims(true), Some(&sa), None, None, now).unwrap_err();
        assert!(e.contains("pod team/p has been deleted"), "{e}");
        let e = check_bound(&claims(true), Some(&sa), Some(&obj("pod-2")), None, now).unwrap_err();
        assert!(e.contains("pod team/p has been replaced"), "{e}");
        let mut going = pod.clone();
        going["metadata"]["deletionTimestamp"] = json!("2000-01-01T00:00:00Z");
        assert!(check_bound(&claims(true), Some(&sa), Some(&going), None, now).is_err());
        going["metadata"]["deletionTimestamp"] = json!("2999-01-01T00:00:00Z");
        assert_eq!(check_bound(&claims(true), Some(&sa), Some(&going), None, now), Ok(()), "still in its grace period");
    }

    #[test]
    fn admission_mounts_api_access_unless_opted_out() {
        let pod = json!({"spec": {"serviceAccountName": "default",
            "initContainers": [{"name": "i", "image": "x"}],
            "containers": [{"name": "a", "image": "x"},
                {"name": "b", "image": "x", "volumeMounts": [{"name": "own", "mountPath": MOUNT_PATH}]}]}});
        let sa = json!({"metadata": {"name": "default"}, "imagePullSecrets": [{"name": "reg"}]});
        let mut p = pod.clone();
        apply_service_account(&mut p, &sa, "abcde");
        let s = &p["spec"];
        assert_eq!(s["volumes"], json!([api_access_volume("kube-api-access-abcde")]));
        let mount = json!({"name": "kube-api-access-abcde", "readOnly": true, "mountPath": MOUNT_PATH});
        assert_eq!(s["initContainers"][0]["volumeMounts"], json!([mount]));
        assert_eq!(s["containers"][0]["volumeMounts"], json!([mount]));
        assert_eq!(s["containers"][1]["volumeMounts"].as_array().unwrap().len(), 1, "its own mount wins");
        assert_eq!(s["imagePullSecrets"], json!([{"name": "reg"}]));
        let src = &s["volumes"][0]["projected"]["sources"];
        assert_eq!(src[0]["serviceAccountToken"]["expirationSeconds"], 3607);
        assert_eq!(src[1]["configMap"]["name"], "kube-root-ca.crt");
        assert_eq!(src[2]["downwardAPI"]["items"][0]["fieldRef"]["fieldPath"], "metadata.namespace");

        // Admitting again (e.g. a copied spec) adds nothing twice.
        let mut again = p.clone();
        apply_service_account(&mut again, &sa, "zzzzz");
        assert_eq!(again, p);

        let mut off = pod.clone();
        off["spec"]["automountServiceAccountToken"] = json!(false);
        let on_sa = json!({"automountServiceAccountToken": true});
        apply_service_account(&mut off, &on_sa, "abcde");
        assert!(off["spec"].get("volumes").is_none(), "the pod's choice wins over the account's");
        let mut p = pod.clone();
        apply_service_account(&mut p, &json!({"automountServiceAccountToken": false}), "abcde");
        assert!(p["spec"].get("volumes").is_none());
    }
}
