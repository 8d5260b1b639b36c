//! The cluster's certificate authority and the TLS configurations built on it.
//!
//! Every Capstan cluster has exactly one CA, created by the first master at
//! `--init` ([`ClusterCa::generate`]) and kept in its data directory
//! ([`ClusterCa::from_pem`] reloads it). Every certificate the cluster trusts
//! is signed by that CA:
//!
//! - master certificates ([`ClusterCa::issue_master`], or a joiner's CSR via
//!   [`make_csr`] + [`ClusterCa::sign_csr`]) serve both sides of the QUIC peer
//!   transport and the etcd gRPC listener (EKU serverAuth + clientAuth);
//! - admin / node client certificates ([`ClusterCa::issue_client`]) carry the
//!   user in the subject CN and the groups in the subject O attributes, like
//!   Kubernetes client certificates (e.g. `O=system:masters`).
//!
//! A master joining an existing cluster does not have the CA yet: it is given
//! a bootstrap token and the CA's fingerprint (sha256 of the CA certificate's
//! DER, hex — [`ClusterCa::fingerprint`]) and connects once with
//! [`quic_anonymous_client_config`], which trusts a server only if the chain it
//! presents contains the pinned CA and the leaf verifies against that CA. That
//! is why servers always present the chain `[leaf, CA]`
//! ([`quic_server_config`], [`pem_identity_chain`]), and why the peer server
//! may be built with `allow_anonymous` (the joiner has no client certificate
//! until its CSR is signed).
//!
//! Keys are ECDSA P-256; TLS uses rustls with the `ring` provider, passed
//! explicitly so nothing depends on a process-wide default provider.
//!
//! Implementation note: rcgen keeps at most one value per attribute type in a
//! distinguished name, so a client certificate with several groups (several
//! `O` attributes) is produced by letting rcgen build the certificate with a
//! CN-only subject, splicing the full subject into the to-be-signed bytes and
//! signing those again with the CA key (see [`ClusterCa::issue_client`]).

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SigningKey,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme, SupportedProtocolVersion};
use sha2::{Digest, Sha256};

/// ALPN protocol of the QUIC peer transport between masters.
pub const PEER_ALPN: &[u8] = b"capstan-peer";

/// Validity of the cluster CA certificate.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Validity of certificates issued by the CA (capped at the CA's own expiry).
pub const LEAF_VALIDITY: Duration = Duration::from_secs(5 * 365 * 24 * 3600);

/// Certificates are back-dated by this much to tolerate clock skew between
/// the machine that signs and the machines that verify.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Errors from building certificates or TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("PEM: {0}")]
    Pem(String),
    #[error("no certificate found in PEM")]
    NoCertificate,
    #[error("no private key found in PEM")]
    NoPrivateKey,
    #[error("parsing certificate: {0}")]
    Parse(String),
    #[error("certificate has no subject common name")]
    NoCommonName,
    #[error("certificate is not a CA certificate")]
    NotCa,
    #[error("CA private key does not match the CA certificate")]
    KeyMismatch,
    #[error("invalid CA fingerprint {0:?}: expected 64 hex digits (sha256)")]
    InvalidFingerprint(String),
    #[error("invalid name {name:?}: {reason}")]
    InvalidName { name: String, reason: String },
}

/// A certificate and its private key, both PEM.
///
/// `cert_pem` is normally the leaf only; it may also hold a chain starting
/// with the leaf (the TLS builders below add the CA when it is missing).
#[derive(Clone, PartialEq, Eq)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CertifiedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertifiedKey").field("cert_pem", &self.cert_pem).field("key_pem", &"<redacted>").finish()
    }
}

/// The cluster certificate authority: CA certificate and private key.
pub struct ClusterCa {
    cert_pem: String,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    fingerprint: String,
    not_after: SystemTime,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new self-signed CA (ECDSA P-256, valid for [`CA_VALIDITY`]) for the
    /// cluster named `cluster_name`. Called once, by `--init`.
    pub fn generate(cluster_name: &str) -> Result<ClusterCa, PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "capstan");
        dn.push(DnType::CommonName, format!("capstan-ca:{cluster_name}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + CA_VALIDITY).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        Self::from_pem(&cert_pem, &key_pem)
    }

    /// Reload the CA written by [`ClusterCa::cert_pem`] / [`ClusterCa::key_pem`].
    /// Checks that the certificate is a CA and that the key belongs to it.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, PkiError> {
        let cert_der = first_cert(cert_pem)?;
        let key = KeyPair::from_pem(key_pem)?;
        let (not_after, spki) = {
            let (_, x509) =
                x509_parser::parse_x509_certificate(&cert_der).map_err(|e| PkiError::Parse(e.to_string()))?;
            let is_ca =
                x509.basic_constraints().map_err(|e| PkiError::Parse(e.to_string()))?.is_some_and(|bc| bc.value.ca);
            if !is_ca {
                return Err(PkiError::NotCa);
            }
            let ts = x509.validity().not_after.timestamp();
            let not_after = UNIX_EPOCH + Duration::from_secs(u64::try_from(ts).unwrap_or(0));
            (not_after, x509.public_key().raw.to_vec())
        };
        if spki != key.subject_public_key_info() {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
        Ok(ClusterCa {
            cert_pem: cert_pem.to_owned(),
            key_pem: key_pem.to_owned(),
            fingerprint: sha256_hex(&cert_der),
            cert_der,
            not_after,
            issuer,
        })
    }

    /// The CA certificate, PEM (as given to [`ClusterCa::from_pem`]).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM (PKCS#8). Keep it in the data dir, mode 0600.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// sha256 of the CA cert DER, hex — used to pin the CA when joining.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    /// Server+client cert for a master: CN = name, SANs = each entry of
    /// `hosts` (IP addresses become IP SANs, others DNS SANs), plus
    /// "localhost" and 127.0.0.1; EKU serverAuth+clientAuth.
    pub fn issue_master(&self, name: &str, hosts: &[String]) -> Result<CertifiedKey, PkiError> {
        self.issue_member(name, hosts, None)
    }

    /// [`ClusterCa::issue_master`] for Raft member `id`, named in the
    /// certificate by a [`member_uri`] SAN, so peers can refuse it once
    /// that member is removed.
    pub fn issue_member(&self, name: &str, hosts: &[String], id: Option<u64>) -> Result<CertifiedKey, PkiError> {
        check_subject_name(name)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = self.leaf_params();
        params.distinguished_name = cn_only(name);
        params.subject_alt_names = master_sans(hosts)?;
        if let Some(id) = id {
            params.subject_alt_names.push(SanType::URI(member_uri(id).try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKey { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// Client cert (EKU clientAuth) with CN = user, O = each group (e.g.
    /// "system:masters"), in the order given.
    pub fn issue_client(&self, user: &str, groups: &[String]) -> Result<CertifiedKey, PkiError> {
        check_subject_name(user)?;
        for group in groups {
            check_subject_name(group)?;
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = self.leaf_params();
        params.distinguished_name = cn_only(user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        let der = if groups.is_empty() {
            cert.der().to_vec()
        } else {
            // rcgen cannot express repeated O attributes: swap the subject.
            let subject = encode_subject(user, groups);
            replace_subject(cert.der(), &subject, self.issuer.key())?
        };
        Ok(CertifiedKey { cert_pem: der_to_pem(&der), key_pem: key.serialize_pem() })
    }

    /// Sign a PEM CSR produced by [`make_csr`] for Raft member `member`. The
    /// subject CN and the DNS and IP SANs come from the CSR (its signature is
    /// checked); the member's [`member_uri`] and everything else —
    /// validity, serial, basic constraints (never a CA), key usage, EKU
    /// (serverAuth+clientAuth) and any other subject attribute — is the CA's
    /// decision. Returns the certificate PEM (leaf only).
    pub fn sign_csr(&self, csr_pem: &str, member: u64) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let cn = dn_common_name(&csr.params.distinguished_name).ok_or(PkiError::NoCommonName)?;
        check_subject_name(&cn)?;
        let mut params = self.leaf_params();
        params.distinguished_name = cn_only(&cn);
        // The member id is the CA's to state: a URI the CSR asked for is dropped.
        let mut sans = std::mem::take(&mut csr.params.subject_alt_names);
        sans.retain(|s| !matches!(s, SanType::URI(_)));
        sans.push(SanType::URI(member_uri(member).try_into()?));
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        csr.params = params;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }

    /// Sign a node's PEM CSR as a client certificate for `user` in `groups`.
    /// Only the public key (and the CSR's proof of holding it) comes from
    /// the CSR: the subject is the CA's decision, so a node cannot name
    /// itself anything but what its bootstrap token admitted.
    pub fn sign_client_csr(&self, csr_pem: &str, user: &str, groups: &[String]) -> Result<String, PkiError> {
        check_subject_name(user)?;
        for group in groups {
            check_subject_name(group)?;
        }
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        let mut params = self.leaf_params();
        params.distinguished_name = cn_only(user);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        csr.params = params;
        let cert = csr.signed_by(&self.issuer)?;
        if groups.is_empty() {
            return Ok(cert.pem());
        }
        let subject = encode_subject(user, groups);
        Ok(der_to_pem(&replace_subject(cert.der(), &subject, self.issuer.key())?))
    }

    /// Parameters shared by every certificate the CA issues.
    fn leaf_params(&self) -> CertificateParams {
        let mut params = CertificateParams::default();
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + LEAF_VALIDITY).min(self.not_after).into();
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params
    }
}

/// A fresh key pair and a CSR for `name` with the given SAN hosts (plus
/// "localhost" and 127.0.0.1, like [`ClusterCa::issue_master`]), returned as
/// (key_pem, csr_pem).
pub fn make_csr(name: &str, hosts: &[String]) -> Result<(String, String), PkiError> {
    check_subject_name(name)?;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = cn_only(name);
    params.subject_alt_names = master_sans(hosts)?;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// sha256 hex of the first certificate in a PEM.
pub fn fingerprint_pem(cert_pem: &str) -> Result<String, PkiError> {
    Ok(sha256_hex(&first_cert(cert_pem)?))
}

/// sha256 hex of a DER certificate.
pub fn fingerprint_der(cert_der: &[u8]) -> String {
    sha256_hex(cert_der)
}

/// The subject CN of the peer's leaf certificate (DER) — used by servers to
/// know which master/user connected.
pub fn common_name(cert_der: &[u8]) -> Result<String, PkiError> {
    Ok(cert_info(cert_der)?.common_name)
}

/// What a server needs to know about a verified peer certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Subject CN: the master's name or the user.
    pub common_name: String,
    /// Subject O attributes, in order: the user's groups.
    pub organizations: Vec<String>,
    /// EKU includes serverAuth: master certificates (from `issue_master` or
    /// `sign_csr`) have it, client certificates from `issue_client` do not.
    pub server_auth: bool,
    /// EKU includes clientAuth.
    pub client_auth: bool,
    /// Expiry, seconds since the Unix epoch.
    pub not_after_unix: i64,
    /// The Raft member a master certificate was issued to (its
    /// [`member_uri`] SAN); None in certificates from before ids were
    /// written into them, and in client certificates.
    pub member_id: Option<u64>,
}

const MEMBER_URI_PREFIX: &str = "urn:capstan:master:";

/// The SAN naming the Raft member a master certificate belongs to.
pub fn member_uri(id: u64) -> String {
    format!("{MEMBER_URI_PREFIX}{id}")
}

/// Subject CN, groups, EKU and expiry of a DER certificate.
pub fn cert_info(cert_der: &[u8]) -> Result<CertInfo, PkiError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let attr_str = |a: &x509_parser::x509::AttributeTypeAndValue<'_>| {
        a.as_str().map(str::to_owned).map_err(|e| PkiError::Parse(e.to_string()))
    };
    let common_name = x509.subject().iter_common_name().next().ok_or(PkiError::NoCommonName).and_then(attr_str)?;
    let organizations = x509.subject().iter_organization().map(attr_str).collect::<Result<Vec<_>, _>>()?;
    let eku = x509.extended_key_usage().map_err(|e| PkiError::Parse(e.to_string()))?;
    let (server_auth, client_auth) = match eku {
        Some(eku) => (eku.value.server_auth || eku.value.any, eku.value.client_auth || eku.value.any),
        None => (false, false),
    };
    let sans = x509.subject_alternative_name().map_err(|e| PkiError::Parse(e.to_string()))?;
    let member_id = sans.iter().flat_map(|s| s.value.general_names.iter()).find_map(|n| match n {
        x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(MEMBER_URI_PREFIX)?.parse().ok(),
        _ => None,
    });
    Ok(CertInfo {
        common_name,
        organizations,
        server_auth,
        client_auth,
        not_after_unix: x509.validity().not_after.timestamp(),
        member_id,
    })
}

/// The leaf certificate a QUIC peer presented (already verified by the TLS
/// configuration), if it presented one.
pub fn peer_leaf(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

/// `identity.cert_pem` followed by the CA certificate (unless it already
/// contains it), so servers present the full chain `[leaf, CA]`. Use it for
/// tonic's `Identity::from_pem(pem_identity_chain(..), key_pem)`.
pub fn pem_identity_chain(ca_pem: &str, identity: &CertifiedKey) -> Result<String, PkiError> {
    let ca = first_cert(ca_pem)?;
    let certs = parse_certs(&identity.cert_pem)?;
    let mut out = identity.cert_pem.trim_end().to_owned();
    out.push('\n');
    if !certs.iter().any(|c| c.as_ref() == ca.as_ref()) {
        out.push_str(&der_to_pem(&ca));
    }
    Ok(out)
}

/// QUIC server configuration for the peer transport (ALPN `capstan-peer`,
/// TLS 1.3, ring). Presents `identity` with the CA appended; verifies client
/// certificates against `ca_pem`. If `allow_anonymous`, a client without a
/// certificate is still accepted (a joining master presenting a bootstrap
/// token) — a client that does present a certificate must chain to the CA;
/// use [`peer_leaf`] to tell the two apart.
pub fn quic_server_config(
    ca_pem: &str,
    identity: &CertifiedKey,
    allow_anonymous: bool,
) -> Result<quinn::ServerConfig, PkiError> {
    let tls = rustls_server_config(ca_pem, identity, allow_anonymous, &[&rustls::version::TLS13], &[PEER_ALPN])?;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// QUIC client configuration for the peer transport: presents `identity`
/// (with the CA appended), verifies the server chains to `ca_pem` and that
/// the server name used to connect is one of its SANs.
pub fn quic_client_config(ca_pem: &str, identity: &CertifiedKey) -> Result<quinn::ClientConfig, PkiError> {
    let tls = rustls_client_config(ca_pem, Some(identity), &[&rustls::version::TLS13], &[PEER_ALPN])?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// QUIC client configuration without a client certificate, trusting the
/// server only if the chain it presents contains a certificate whose sha256
/// DER fingerprint is `ca_fingerprint` and the leaf verifies directly against
/// that certificate as the only root (webpki rules, including the server-name
/// check against the SANs). Used once, at join. `ca_fingerprint` is
/// case-insensitive and may contain ':' separators.
pub fn quic_anonymous_client_config(ca_fingerprint: &str) -> Result<quinn::ClientConfig, PkiError> {
    let fingerprint = normalize_fingerprint(ca_fingerprint)?;
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier { fingerprint, provider: provider.clone() });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = vec![PEER_ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

/// rustls server configuration for the etcd gRPC listener (ALPN `h2`,
/// TLS 1.2 and 1.3, ring): presents `[leaf, CA]`, verifies client
/// certificates against the CA, optionally accepting clients without one.
/// (tonic's own `ServerTlsConfig` built from [`pem_identity_chain`] and the
/// CA PEM is an alternative.)
pub fn grpc_server_config(
    ca_pem: &str,
    identity: &CertifiedKey,
    allow_anonymous: bool,
) -> Result<rustls::ServerConfig, PkiError> {
    rustls_server_config(ca_pem, identity, allow_anonymous, rustls::DEFAULT_VERSIONS, &[b"h2"])
}

/// rustls server configuration: presents `identity` + CA, verifies client
/// certificates against `ca_pem`.
pub fn rustls_server_config(
    ca_pem: &str,
    identity: &CertifiedKey,
    allow_anonymous: bool,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, PkiError> {
    let provider = provider();
    let roots = Arc::new(root_store(ca_pem)?);
    let builder = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
    let client_verifier = if allow_anonymous { builder.allow_unauthenticated().build()? } else { builder.build()? };
    let (chain, key) = identity_parts(ca_pem, identity)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain, key)?;
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tls)
}

/// rustls client configuration: verifies the server chains to `ca_pem`;
/// presents `identity` (with the CA appended) if given.
pub fn rustls_client_config(
    ca_pem: &str,
    identity: Option<&CertifiedKey>,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, PkiError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)?
        .with_root_certificates(root_store(ca_pem)?);
    let mut tls = match identity {
        Some(identity) => {
            let (chain, key) = identity_parts(ca_pem, identity)?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tls)
}

// ---------------------------------------------------------------------------
// Pinned-CA server verifier (join).

/// Accepts a server iff its presented chain contains the pinned CA and the
/// leaf verifies against that CA alone.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|c| sha256_hex(c) == self.fingerprint)
            .ok_or(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer))?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        // No intermediates: the leaf must be signed by the pinned CA itself.
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

// ---------------------------------------------------------------------------
// Helpers.

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn sha256_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

fn normalize_fingerprint(fp: &str) -> Result<String, PkiError> {
    let norm: String = fp.trim().chars().filter(|c| *c != ':').map(|c| c.to_ascii_lowercase()).collect();
    if norm.len() == 64 && norm.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(norm)
    } else {
        Err(PkiError::InvalidFingerprint(fp.to_owned()))
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and exactly 16 bytes long once DER-encoded.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn cn_only(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn dn_common_name(dn: &DistinguishedName) -> Option<String> {
    match dn.get(&DnType::CommonName)? {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn check_subject_name(name: &str) -> Result<(), PkiError> {
    let reason = if name.is_empty() {
        "empty"
    } else if name.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(PkiError::InvalidName { name: name.to_owned(), reason: reason.to_owned() })
}

/// SANs for a master: `hosts` (IPs as IP SANs, "[v6]" accepted), then
/// "localhost" and 127.0.0.1, without duplicates.
fn master_sans(hosts: &[String]) -> Result<Vec<SanType>, PkiError> {
    let mut sans = Vec::new();
    let all = hosts.iter().map(String::as_str).chain(["localhost", "127.0.0.1"]);
    for host in all {
        let host = host.trim();
        if host.is_empty() {
            continue;
        }
        let unbracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let san = match unbracketed.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                let invalid = |reason: String| PkiError::InvalidName { name: host.to_owned(), reason };
                rustls::pki_types::DnsName::try_from(host).map_err(|e| invalid(e.to_string()))?;
                SanType::DnsName(
                    host.to_ascii_lowercase().try_into().map_err(|e: rcgen::Error| invalid(e.to_string()))?,
                )
            }
        };
        if !sans.contains(&san) {
            sans.push(san);
        }
    }
    Ok(sans)
}

fn parse_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::Pem(e.to_string()))
}

/// The first certificate of a PEM bundle.
pub fn first_cert(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    parse_certs(pem)?.into_iter().next().ok_or(PkiError::NoCertificate)
}

fn root_store(ca_pem: &str) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    let certs = parse_certs(ca_pem)?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate);
    }
    for cert in certs {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// The chain `[leaf.., CA]` and the private key of `identity`.
fn identity_parts(
    ca_pem: &str,
    identity: &CertifiedKey,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
    let mut chain = parse_certs(&identity.cert_pem)?;
    if chain.is_empty() {
        return Err(PkiError::NoCertificate);
    }
    let ca = first_cert(ca_pem)?;
    if !chain.iter().any(|c| c.as_ref() == ca.as_ref()) {
        chain.push(ca);
    }
    let key = PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => PkiError::NoPrivateKey,
        e => PkiError::Pem(e.to_string()),
    })?;
    Ok((chain, key))
}

fn der_to_pem(der: &[u8]) -> String {
    use base64_lite::encode;
    let b64 = encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Minimal standard base64 encoder (for PEM output of DER we built ourselves).
mod base64_lite {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

    pub fn encode(data: &[u8]) -> String {
        let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
        for chunk in data.chunks(3) {
            let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

// --- Minimal DER handling for the multi-O subject of client certificates.

const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
const OID_O: &[u8] = &[0x55, 0x04, 0x0a];

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// (header length, total length) of the DER TLV at the start of `der`.
fn der_tlv_span(der: &[u8]) -> Result<(usize, usize), PkiError> {
    let bad = || PkiError::Parse("truncated DER".to_owned());
    let first = *der.get(1).ok_or_else(bad)?;
    let (header, len) = if first < 0x80 {
        (2, usize::from(first))
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return Err(bad());
        }
        let bytes = der.get(2..2 + n).ok_or_else(bad)?;
        let len = bytes.iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (2 + n, len)
    };
    let total = header + len;
    if total > der.len() {
        return Err(bad());
    }
    Ok((header, total))
}

/// `SEQUENCE OF SET { SEQUENCE { type, UTF8String } }`: one RDN per group
/// (O), then the CN.
fn encode_subject(cn: &str, groups: &[String]) -> Vec<u8> {
    let rdn = |oid: &[u8], value: &str| {
        let mut atv = der_tlv(0x06, oid);
        atv.extend(der_tlv(0x0c, value.as_bytes()));
        der_tlv(0x31, &der_tlv(0x30, &atv))
    };
    let mut rdns = Vec::new();
    for group in groups {
        rdns.extend(rdn(OID_O, group));
    }
    rdns.extend(rdn(OID_CN, cn));
    der_tlv(0x30, &rdns)
}

/// Re-issue `cert_der` (signed by `ca_key`) with its subject replaced by
/// `subject` (a DER Name): splice the new subject into the TBS certificate,
/// sign the new TBS with the CA key and reassemble the certificate.
fn replace_subject(cert_der: &[u8], subject: &[u8], ca_key: &KeyPair) -> Result<Vec<u8>, PkiError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert_der).map_err(|e| PkiError::Parse(e.to_string()))?;
    let tbs = x509.tbs_certificate.as_ref();
    let old_subject = x509.subject().as_raw();
    // Both slices borrow from `cert_der`.
    let tbs_start = tbs.as_ptr() as usize - cert_der.as_ptr() as usize;
    let subj_start = old_subject.as_ptr() as usize - cert_der.as_ptr() as usize;
    let subj_end = subj_start + old_subject.len();
    let tbs_end = tbs_start + tbs.len();
    let tbs_content_start = tbs_start + der_tlv_span(tbs)?.0;
    if !(tbs_content_start <= subj_start && subj_end <= tbs_end) {
        return Err(PkiError::Parse("subject outside TBS certificate".to_owned()));
    }
    let mut content = Vec::with_capacity(tbs.len() + subject.len());
    content.extend_from_slice(&cert_der[tbs_content_start..subj_start]);
    content.extend_from_slice(subject);
    content.extend_from_slice(&cert_der[subj_end..tbs_end]);
    let new_tbs = der_tlv(0x30, &content);

    // The signature algorithm follows the TBS in the outer SEQUENCE.
    let (_, alg_len) = der_tlv_span(&cert_der[tbs_end..])?;
    let alg = &cert_der[tbs_end..tbs_end + alg_len];
    let signature = ca_key.sign(&new_tbs)?;
    let mut bits = Vec::with_capacity(signature.len() + 1);
    bits.push(0); // no unused bits
    bits.extend_from_slice(&signature);

    let mut outer = new_tbs;
    outer.extend_from_slice(alg);
    outer.extend(der_tlv(0x03, &bits));
    Ok(der_tlv(0x30, &outer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::timeout;

    const STEP: Duration = Duration::from_secs(10);

    fn hosts(h: &[&str]) -> Vec<String> {
        h.iter().map(|s| s.to_string()).collect()
    }

    fn verify_server(ca_pem: &str, cert_pem: &str, name: &str) -> Result<(), rustls::Error> {
        let roots = Arc::new(root_store(ca_pem).unwrap());
        let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider()).build().unwrap();
        let leaf = first_cert(cert_pem).unwrap();
        let name = ServerName::try_from(name.to_owned()).unwrap();
        verifier.verify_server_cert(&leaf, &[], &name, &[], UnixTime::now()).map(|_| ())
    }

    fn verify_client(ca_pem: &str, cert_pem: &str) -> Result<(), rustls::Error> {
        let roots = Arc::new(root_store(ca_pem).unwrap());
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider()).build().unwrap();
        let leaf = first_cert(cert_pem).unwrap();
        verifier.verify_client_cert(&leaf, &[], UnixTime::now()).map(|_| ())
    }

    struct Outcome {
        server: Result<quinn::Connection, String>,
        client: Result<quinn::Connection, String>,
        _endpoints: (quinn::Endpoint, quinn::Endpoint),
    }

    /// One QUIC handshake over 127.0.0.1, both sides bounded by a timeout.
    async fn handshake(server_cfg: quinn::ServerConfig, client_cfg: quinn::ClientConfig, server_name: &str) -> Outcome {
        let server_ep = quinn::Endpoint::server(server_cfg, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server_ep.local_addr().unwrap();
        let client_ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let accept = async {
            let incoming = server_ep.accept().await.ok_or("endpoint closed")?;
            incoming.await.map_err(|e| e.to_string())
        };
        let connect = async {
            client_ep
                .connect_with(client_cfg, addr, server_name)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())
        };
        let (server, client) =
            timeout(STEP, async { tokio::join!(accept, connect) }).await.expect("handshake timed out");
        Outcome { server, client, _endpoints: (server_ep, client_ep) }
    }

    /// The client side failed, or (TLS 1.3: the client may finish before the
    /// server has checked its certificate) was closed right after.
    async fn client_failed(client: &Result<quinn::Connection, String>) -> bool {
        match client {
            Err(_) => true,
            Ok(conn) => timeout(STEP, conn.closed()).await.is_ok(),
        }
    }

    #[test]
    fn ca_generate_and_reload() {
        let ca = ClusterCa::generate("test").unwrap();
        assert_eq!(ca.fingerprint().len(), 64);
        assert_eq!(ca.fingerprint(), fingerprint_pem(ca.cert_pem()).unwrap());
        let info = cert_info(ca.cert_der()).unwrap();
        assert_eq!(info.common_name, "capstan-ca:test");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64;
        assert!(info.not_after_unix > now + 9 * 365 * 24 * 3600);

        let reloaded = ClusterCa::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(reloaded.fingerprint(), ca.fingerprint());
        // A cert issued by the reloaded CA verifies against the original.
        let m = reloaded.issue_master("m1", &[]).unwrap();
        verify_server(ca.cert_pem(), &m.cert_pem, "localhost").unwrap();

        // Wrong key for the cert, and a non-CA cert, are refused.
        let other = ClusterCa::generate("other").unwrap();
        assert!(matches!(ClusterCa::from_pem(ca.cert_pem(), other.key_pem()), Err(PkiError::KeyMismatch)));
        assert!(matches!(ClusterCa::from_pem(&m.cert_pem, &m.key_pem), Err(PkiError::NotCa)));
        assert!(matches!(ClusterCa::from_pem("garbage", ca.key_pem()), Err(PkiError::NoCertificate)));
    }

    #[test]
    fn client_csr_gets_the_subject_the_ca_chooses() {
        let ca = ClusterCa::generate("test").unwrap();
        // The CSR asks for a master's name; the CA signs it as the node.
        let (_key, csr) = make_csr("master:evil", &["10.0.0.1".into()]).unwrap();
        let pem = ca.sign_client_csr(&csr, "system:node:n1", &["system:nodes".into()]).unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let info = cert_info(&parsed.contents).unwrap();
        assert_eq!(info.common_name, "system:node:n1");
        assert_eq!(info.organizations, vec!["system:nodes".to_string()]);
        assert!(info.client_auth && !info.server_auth, "a node certificate cannot serve as a master");
        assert!(ca.sign_client_csr("not a csr", "system:node:n1", &[]).is_err());
        assert!(ca.sign_client_csr(&csr, "bad\nname", &[]).is_err());
    }

    #[test]
    fn master_cert_chains_and_has_sans() {
        let ca = ClusterCa::generate("test").unwrap();
        let m = ca.issue_master("master-1", &hosts(&["10.0.0.5", "m1.example.com", "[::1]"])).unwrap();
        for name in ["10.0.0.5", "m1.example.com", "localhost", "127.0.0.1", "::1"] {
            verify_server(ca.cert_pem(), &m.cert_pem, name).unwrap();
        }
        assert!(verify_server(ca.cert_pem(), &m.cert_pem, "10.0.0.6").is_err());
        assert!(verify_server(ca.cert_pem(), &m.cert_pem, "other.example.com").is_err());
        verify_client(ca.cert_pem(), &m.cert_pem).unwrap();
        let info = cert_info(&first_cert(&m.cert_pem).unwrap()).unwrap();
        assert_eq!(info.common_name, "master-1");
        assert!(info.server_auth && info.client_auth);
        assert!(info.organizations.is_empty());
        assert_eq!(info.member_id, None, "no id asked for");
        let m7 = ca.issue_member("master-7", &[], Some(7)).unwrap();
        verify_server(ca.cert_pem(), &m7.cert_pem, "localhost").unwrap();
        assert_eq!(cert_info(&first_cert(&m7.cert_pem).unwrap()).unwrap().member_id, Some(7));

        // Another CA does not trust it.
        let other = ClusterCa::generate("other").unwrap();
        assert!(verify_server(other.cert_pem(), &m.cert_pem, "localhost").is_err());
        assert!(verify_client(other.cert_pem(), &m.cert_pem).is_err());

        assert!(ca.issue_master("", &[]).is_err());
        assert!(ca.issue_master("m", &hosts(&["bad host"])).is_err());
    }

    #[test]
    fn client_cert_groups() {
        let ca = ClusterCa::generate("test").unwrap();
        for groups in
            [hosts(&[]), hosts(&["system:masters"]), hosts(&["system:masters", "system:authenticated", "team-a"])]
        {
            let c = ca.issue_client("admin", &groups).unwrap();
            verify_client(ca.cert_pem(), &c.cert_pem).unwrap();
            let der = first_cert(&c.cert_pem).unwrap();
            let info = cert_info(&der).unwrap();
            assert_eq!(info.common_name, "admin");
            assert_eq!(info.organizations, groups);
            assert!(info.client_auth && !info.server_auth);
            assert_eq!(info.member_id, None);
            // The spliced certificate is a well-formed, CA-signed X.509 cert.
            let (rest, x509) = x509_parser::parse_x509_certificate(&der).unwrap();
            assert!(rest.is_empty());
            let (_, ca_x509) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
            x509.verify_signature(Some(ca_x509.public_key())).unwrap();
            // Not usable as a server certificate.
            assert!(verify_server(ca.cert_pem(), &c.cert_pem, "localhost").is_err());
        }
        // A long group list forces multi-byte DER lengths.
        let many: Vec<String> = (0..20).map(|i| format!("group-{i:02}-xxxxxxxxxxxxxxxx")).collect();
        let c = ca.issue_client("u", &many).unwrap();
        verify_client(ca.cert_pem(), &c.cert_pem).unwrap();
        let info = cert_info(&first_cert(&c.cert_pem).unwrap()).unwrap();
        assert_eq!(info.organizations, many);
    }

    #[test]
    fn csr_round_trip() {
        let ca = ClusterCa::generate("test").unwrap();
        let (key_pem, csr_pem) = make_csr("master-2", &hosts(&["10.1.2.3", "m2.local"])).unwrap();
        let cert_pem = ca.sign_csr(&csr_pem, 42).unwrap();
        assert_eq!(common_name(&first_cert(&cert_pem).unwrap()).unwrap(), "master-2");
        assert_eq!(cert_info(&first_cert(&cert_pem).unwrap()).unwrap().member_id, Some(42));
        for name in ["10.1.2.3", "m2.local", "localhost", "127.0.0.1"] {
            verify_server(ca.cert_pem(), &cert_pem, name).unwrap();
        }
        verify_client(ca.cert_pem(), &cert_pem).unwrap();
        // The cert matches the CSR's key: a TLS config can be built from it.
        let identity = CertifiedKey { cert_pem, key_pem };
        quic_server_config(ca.cert_pem(), &identity, false).unwrap();
        quic_client_config(ca.cert_pem(), &identity).unwrap();

        assert!(ca.sign_csr("not a csr", 1).is_err());
    }

    #[test]
    fn identity_chain_and_fingerprints() {
        let ca = ClusterCa::generate("test").unwrap();
        let m = ca.issue_master("m", &[]).unwrap();
        let chain = pem_identity_chain(ca.cert_pem(), &m).unwrap();
        let certs = parse_certs(&chain).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[1].as_ref(), ca.cert_der().as_ref());
        // Idempotent.
        let again = CertifiedKey { cert_pem: chain.clone(), key_pem: m.key_pem.clone() };
        assert_eq!(parse_certs(&pem_identity_chain(ca.cert_pem(), &again).unwrap()).unwrap().len(), 2);
        assert_eq!(fingerprint_pem(&chain).unwrap(), fingerprint_pem(&m.cert_pem).unwrap());

        let fp = ca.fingerprint();
        let colons: Vec<String> =
            fp.as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap().to_uppercase()).collect();
        assert_eq!(normalize_fingerprint(&colons.join(":")).unwrap(), fp);
        assert!(quic_anonymous_client_config("abcd").is_err());
        assert!(quic_anonymous_client_config(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn base64_matches_reference() {
        for (input, want) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"fooba", "Zm9vYmE="),
            (b"foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_lite::encode(input), want);
        }
    }

    #[tokio::test]
    async fn quic_mutual_tls() {
        let ca = ClusterCa::generate("test").unwrap();
        let m1 = ca.issue_master("master-1", &[]).unwrap();
        let m2 = ca.issue_master("master-2", &[]).unwrap();
        let out = handshake(
            quic_server_config(ca.cert_pem(), &m1, false).unwrap(),
            quic_client_config(ca.cert_pem(), &m2).unwrap(),
            "localhost",
        )
        .await;
        let server = out.server.expect("server side");
        let client = out.client.expect("client side");
        let seen = peer_leaf(&server).expect("client cert");
        assert_eq!(common_name(&seen).unwrap(), "master-2");
        let chain = server.peer_identity().unwrap().downcast::<Vec<CertificateDer<'static>>>().unwrap();
        assert_eq!(chain.len(), 2, "client presents leaf + CA");
        let server_chain = client.peer_identity().unwrap().downcast::<Vec<CertificateDer<'static>>>().unwrap();
        assert_eq!(common_name(&server_chain[0]).unwrap(), "master-1");
        assert_eq!(server_chain[1].as_ref(), ca.cert_der().as_ref());
        assert_eq!(
            server
                .handshake_data()
                .unwrap()
                .downcast::<quinn::crypto::rustls::HandshakeData>()
                .unwrap()
                .protocol
                .as_deref(),
            Some(PEER_ALPN)
        );

        // Wrong server name: the client refuses.
        let out = handshake(
            quic_server_config(ca.cert_pem(), &m1, false).unwrap(),
            quic_client_config(ca.cert_pem(), &m2).unwrap(),
            "not-a-san.example",
        )
        .await;
        assert!(out.client.is_err());
        assert!(out.server.is_err());

        // The allow_anonymous server still takes (and identifies) cert clients.
        let out = handshake(
            quic_server_config(ca.cert_pem(), &m1, true).unwrap(),
            quic_client_config(ca.cert_pem(), &m2).unwrap(),
            "127.0.0.1",
        )
        .await;
        let server = out.server.expect("server side");
        assert_eq!(common_name(&peer_leaf(&server).unwrap()).unwrap(), "master-2");
        assert!(out.client.is_ok());
    }

    #[tokio::test]
    async fn quic_rejects_foreign_client_cert() {
        let ca = ClusterCa::generate("test").unwrap();
        let other = ClusterCa::generate("other").unwrap();
        let m1 = ca.issue_master("master-1", &[]).unwrap();
        let intruder = other.issue_master("intruder", &[]).unwrap();
        for allow_anonymous in [false, true] {
            // The intruder trusts our CA (so it would accept the server) but
            // its own cert is from another CA.
            let out = handshake(
                quic_server_config(ca.cert_pem(), &m1, allow_anonymous).unwrap(),
                quic_client_config(ca.cert_pem(), &intruder).unwrap(),
                "localhost",
            )
            .await;
            assert!(out.server.is_err(), "allow_anonymous={allow_anonymous}");
            assert!(client_failed(&out.client).await);
        }
    }

    #[tokio::test]
    async fn quic_anonymous_pinned_client() {
        let ca = ClusterCa::generate("test").unwrap();
        let m1 = ca.issue_master("master-1", &hosts(&["127.0.0.1"])).unwrap();

        // Fingerprint matches, server allows anonymous: connected, no client cert.
        let out = handshake(
            quic_server_config(ca.cert_pem(), &m1, true).unwrap(),
            quic_anonymous_client_config(&ca.fingerprint()).unwrap(),
            "127.0.0.1",
        )
        .await;
        let server = out.server.expect("server side");
        assert!(peer_leaf(&server).is_none());
        let client = out.client.expect("client side");
        assert_eq!(common_name(&peer_leaf(&client).unwrap()).unwrap(), "master-1");

        // Fingerprint of another CA: the client refuses the server.
        let other = ClusterCa::generate("other").unwrap();
        let out = handshake(
            quic_server_config(ca.cert_pem(), &m1, true).unwrap(),
            quic_anonymous_client_config(&other.fingerprint()).unwrap(),
            "127.0.0.1",
        )
        .await;
        assert!(out.client.is_err());
        assert!(out.server.is_err());

        // A server whose leaf is not signed by the pinned CA, even though it
        // sends the pinned CA certificate in its chain: refused.
        let evil = other.issue_master("evil", &[]).unwrap();
        let mut evil_chain = evil.clone();
        evil_chain.cert_pem = format!("{}{}", evil.cert_pem, ca.cert_pem());
        let out = handshake(
            quic_server_config(other.cert_pem(), &evil_chain, true).unwrap(),
            quic_anonymous_client_config(&ca.fingerprint()).unwrap(),
            "127.0.0.1",
        )
        .await;
        assert!(out.client.is_err());

        // Fingerprint matches but the server requires client certs.
        let out = handshake(
            quic_server_config(ca.cert_pem(), &m1, false).unwrap(),
            quic_anonymous_client_config(&ca.fingerprint()).unwrap(),
            "127.0.0.1",
        )
        .await;
        assert!(out.server.is_err());
        assert!(client_failed(&out.client).await);
    }
}
