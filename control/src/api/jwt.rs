//! ServiceAccount tokens as Kubernetes issues them: ES256 JWTs whose
//! `kubernetes.io` claim names the namespace, the ServiceAccount and the
//! object the token is bound to (a Pod or a Secret).
//!
//! Pure: the key, `now` and uids come in. Whether the named objects still
//! exist (with the same uids) is the caller's question, answered from the
//! store in `serviceaccount.rs`.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde::{Deserialize, Serialize};

/// `iss` of every token, and the audience the API server accepts
/// (Kubernetes' defaults for `--service-account-issuer` and `--api-audiences`).
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Clock skew tolerated on `exp` and `nbf` between the masters and clients.
pub const LEEWAY_SECS: i64 = 60;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("the service account signing key does not load: {0}")]
    BadKey(String),
    #[error("signing the token: {0}")]
    Sign(String),
    #[error("invalid bearer token: {0}")]
    Invalid(String),
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token audiences {0:?} are not accepted by this server")]
    Audience(Vec<String>),
}

/// The ECDSA P-256 key every master signs and verifies tokens with.
pub struct SigningKey {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// Key id in the JWT header: a digest of the public key, as Kubernetes does.
    pub kid: String,
}

impl SigningKey {
    /// A new private key, PKCS#8 DER.
    pub fn generate() -> Result<Vec<u8>, TokenError> {
        let rng = ring::rand::SystemRandom::new();
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map(|d| d.as_ref().to_vec())
            .map_err(|e| TokenError::BadKey(e.to_string()))
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<SigningKey, TokenError> {
        let rng = ring::rand::SystemRandom::new();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &rng)
            .map_err(|e| TokenError::BadKey(e.to_string()))?;
        let public = pair.public_key().as_ref();
        use base64::Engine;
        use sha2::Digest;
        let kid = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(public));
        Ok(SigningKey { encoding: EncodingKey::from_ec_der(der), decoding: DecodingKey::from_ec_der(public), kid })
    }
}

/// A name and uid, as the `kubernetes.io` claim records objects.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ObjectRef {
    pub name: String,
    pub uid: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct KubernetesClaims {
    pub namespace: String,
    pub serviceaccount: ObjectRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<ObjectRef>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: Vec<String>,
    pub exp: i64,
    pub iat: i64,
    pub nbf: i64,
    pub jti: String,
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaims,
}

/// `system:serviceaccount:<namespace>:<name>`, the user a token authenticates as.
pub fn username(namespace: &str, name: &str) -> String {
    format!("system:serviceaccount:{namespace}:{name}")
}

impl Claims {
    /// Claims for a token issued at `now` that lives `seconds`.
    pub fn new(kubernetes: KubernetesClaims, audiences: Vec<String>, now: i64, seconds: i64, jti: String) -> Claims {
        Claims {
            iss: ISSUER.to_string(),
            sub: username(&kubernetes.namespace, &kubernetes.serviceaccount.name),
            aud: audiences,
            exp: now + seconds,
            iat: now,
            nbf: now,
            jti,
            kubernetes,
        }
    }

    /// The groups of the token's user (Kubernetes adds `system:authenticated`).
    pub fn groups(&self) -> Vec<String> {
        vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{}", self.kubernetes.namespace)]
    }
}

pub fn issue(key: &SigningKey, claims: &Claims) -> Result<String, TokenError> {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &key.encoding).map_err(|e| TokenError::Sign(e.to_string()))
}

/// Does the bearer token look like a JWT (three base64url parts) rather than
/// one of Capstan's opaque API tokens?
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

/// Checks signature, algorithm, issuer, time window and audience; the
/// claims are trustworthy only if this returns them.
pub fn verify(key: &SigningKey, token: &str, audiences: &[&str], now: i64) -> Result<Claims, TokenError> {
    let mut v = Validation::new(Algorithm::ES256);
    v.set_issuer(&[ISSUER]);
    // Time and audience are checked below against the caller's `now`.
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.set_required_spec_claims(&["iss", "sub", "aud", "exp", "nbf"]);
    let data =
        jsonwebtoken::decode::<Claims>(token, &key.decoding, &v).map_err(|e| TokenError::Invalid(e.to_string()))?;
    let c = data.claims;
    if now > c.exp + LEEWAY_SECS {
        return Err(TokenError::Expired);
    }
    if now + LEEWAY_SECS < c.nbf {
        return Err(TokenError::NotYetValid);
    }
    if !c.aud.iter().any(|a| audiences.contains(&a.as_str())) {
        return Err(TokenError::Audience(c.aud));
    }
    if c.sub != username(&c.kubernetes.namespace, &c.kubernetes.serviceaccount.name) {
        return Err(TokenError::Invalid("sub does not match the kubernetes.io claim".into()));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SigningKey {
        SigningKey::from_pkcs8(&SigningKey::generate().unwrap()).unwrap()
    }

    fn claims(now: i64, seconds: i64, aud: &str) -> Claims {
        let k = KubernetesClaims {
            namespace: "team".into(),
            serviceaccount: ObjectRef { name: "default".into(), uid: "sa-uid".into() },
            pod: Some(ObjectRef { name: "p".into(), uid: "pod-uid".into() }),
            secret: None,
        };
        Claims::new(k, vec![aud.into()], now, seconds, "jti-1".into())
    }

    #[test]
    fn issued_tokens_verify_with_kubernetes_claims() {
        let k = key();
        let now = 1_700_000_000;
        let t = issue(&k, &claims(now, 3600, ISSUER)).unwrap();
        assert!(looks_like_jwt(&t));
        let c = verify(&k, &t, &[ISSUER], now + 10).unwrap();
        assert_eq!(c.sub, "system:serviceaccount:team:default");
        assert_eq!((c.exp - c.iat, c.nbf), (3600, now));
        assert_eq!(c.kubernetes.pod.as_ref().map(|p| p.uid.as_str()), Some("pod-uid"));
        assert_eq!(c.groups(), ["system:serviceaccounts", "system:serviceaccounts:team"]);
        // The payload is plain JSON with Kubernetes' claim names.
        use base64::Engine;
        let payload = t.split('.').nth(1).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(json["kubernetes.io"]["serviceaccount"]["name"], "default");
        assert!(json["kubernetes.io"].get("secret").is_none());
        assert!(!looks_like_jwt("capstan-0123abcd"));
    }

    #[test]
    fn expired_early_foreign_and_misaddressed_tokens_are_refused() {
        let k = key();
        let now = 1_700_000_000;
        let t = issue(&k, &claims(now, 600, ISSUER)).unwrap();
        assert_eq!(verify(&k, &t, &[ISSUER], now + 600 + LEEWAY_SECS + 1), Err(TokenError::Expired));
        assert!(verify(&k, &t, &[ISSUER], now + 600 + LEEWAY_SECS).is_ok(), "within the leeway");
        assert_eq!(verify(&k, &t, &[ISSUER], now - LEEWAY_SECS - 1), Err(TokenError::NotYetValid));
        // Signed by another cluster's key.
        assert!(matches!(verify(&key(), &t, &[ISSUER], now), Err(TokenError::Invalid(_))));
        // A token for another audience (e.g. a vault) is not an API credential.
        let vault = issue(&k, &claims(now, 600, "vault")).unwrap();
        assert_eq!(verify(&k, &vault, &[ISSUER], now), Err(TokenError::Audience(vec!["vault".into()])));
        // Tampered payload: the signature no longer matches.
        let mut parts: Vec<String> = t.split('.').map(str::to_string).collect();
        let mut forged = claims(now, 600, ISSUER);
        forged.kubernetes.namespace = "kube-system".into();
        forged.sub = username("kube-system", "default");
        use base64::Engine;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert!(matches!(verify(&k, &parts.join("."), &[ISSUER], now), Err(TokenError::Invalid(_))));
        // An unsigned token ("alg": "none") is refused whatever it claims.
        let none = format!(
            "{}.{}.",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert!(matches!(verify(&k, &none, &[ISSUER], now), Err(TokenError::Invalid(_))));
        assert!(matches!(verify(&k, "eyJ.garbage.x", &[ISSUER], now), Err(TokenError::Invalid(_))));
    }
}
