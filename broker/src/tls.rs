//! TLS for fluidcloud's network services: the server's identity, and the
//! three ways a client decides to trust it.
//!
//! A relocation service carries bearer tokens and starts work that stops
//! and moves running services, so nothing it says may cross a network in
//! clear or reach a party that only claims to be the service. This module
//! holds everything that decision needs, in one place, so that every
//! network service of fluidcloud (`fluidcloud serve` today, the agent a
//! site will run later) gets the same answers:
//!
//! - **The server's identity** ([`ServerIdentity`]): a certificate and key
//!   given as PEM files, or — so that HTTPS works with no set-up at all — a
//!   self-signed certificate generated once into a directory of the
//!   service's state (key mode 0600, directory 0700) and reused on every
//!   later start, so its [`Fingerprint`] stays the one clients pinned.
//! - **The client's trust**, one of:
//!   - the system's roots ([`client_config`] with no CA: the platform
//!     store, or `$SSL_CERT_FILE` / `$SSL_CERT_DIR` where they are set, as
//!     OpenSSL-based tools read them), for a service behind a certificate
//!     from a public or company CA;
//!   - one CA certificate file ([`client_config`] with a CA), for a private
//!     CA, or a generated certificate copied to the client;
//!   - a pinned SHA-256 fingerprint ([`pinned_client_config`]), for the
//!     generated self-signed certificate: only the certificate with that
//!     digest is accepted, its names and issuer are not checked (nothing
//!     could vouch for them), but the handshake's signatures still are, so
//!     whoever answers must hold the certificate's private key.
//!
//!   Each records why it refused a certificate ([`ClientTls::rejection`]),
//!   because an HTTP client reports a refused certificate as a connection
//!   error several layers down; the caller can then say in one line which
//!   fingerprint it saw and which it expected.
//! - **Serving** ([`serve_tls`]): the axum router behind a TLS listener
//!   whose handshakes run in their own tasks with a time limit, so a client
//!   that opens a connection and says nothing holds up no one.
//!
//! Every configuration names its crypto provider (aws-lc-rs, the one the
//! workspace already builds for `object_store`) instead of relying on a
//! process-wide default, which would panic if another dependency ever
//! enabled a second provider. Mutual TLS, which the agent may need, is a
//! client verifier on [`server_config`] and a certificate on the client
//! configurations: both fit the types here without changing them.

use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest as _, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::rest::ClientAddr;

/// File name of the generated certificate in an identity directory.
pub const CERT_FILE: &str = "cert.pem";
/// File name of the generated private key in an identity directory.
pub const KEY_FILE: &str = "key.pem";

/// Longest a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes going on at once; past it, connections wait in the backlog.
const MAX_HANDSHAKES: usize = 128;

/// Errors of TLS set-up. Each names the file or value at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file or directory could not be read, written or created.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done (`read`, `create`, ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key, or they do not match.
    #[error("{}: {detail}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// A private key others may read: it is not used.
    #[error(
        "{}: the private key is readable by others (mode {mode:04o}); run `chmod 600` on it",
        path.display()
    )]
    Insecure {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A fingerprint that is not `sha256:` and 64 hex digits.
    #[error(
        "invalid fingerprint `{given}`: {detail} (expected `sha256:` followed by 64 hex digits)"
    )]
    Fingerprint {
        /// What was given.
        given: String,
        /// What is wrong with it.
        detail: String,
    },
    /// A name for the certificate that is neither an IP address nor a DNS name.
    #[error("invalid certificate name `{name}`: not an IP address or a DNS name")]
    Name {
        /// The name.
        name: String,
    },
    /// The system has no root certificate a client could trust.
    #[error(
        "no trusted root certificates found on this system{detail}; install the CA bundle (Debian: ca-certificates), or name the server's CA or fingerprint"
    )]
    NoRoots {
        /// Where it looked, and what failed.
        detail: String,
    },
    /// rustls or rcgen refused the configuration.
    #[error("TLS set-up failed: {0}")]
    Setup(String),
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    move |source| TlsError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The provider every configuration uses (see the module docs for why it
/// is named rather than taken from the process default).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

// ---------------------------------------------------------------- fingerprint

/// The SHA-256 digest of a certificate's DER encoding, written
/// `sha256:` + 64 lowercase hex digits — what `serve` prints and what a
/// client pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of `cert`.
    pub fn of(cert: &CertificateDer<'_>) -> Self {
        Self(Sha256::digest(cert.as_ref()).into())
    }

    /// The 32 bytes of the digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Fingerprint {
    type Err = TlsError;

    /// `sha256:HEX`; the prefix in any case, the hex digits in any case and
    /// optionally separated by `:` as `openssl x509 -fingerprint` prints them.
    fn from_str(s: &str) -> Result<Self, TlsError> {
        let bad = |detail: &str| TlsError::Fingerprint {
            given: s.to_owned(),
            detail: detail.to_owned(),
        };
        let t = s.trim();
        let hex = match t.split_once(':') {
            Some((alg, rest)) if alg.eq_ignore_ascii_case("sha256") => rest,
            Some((alg, _)) if !alg.is_empty() && alg.chars().all(|c| c.is_ascii_alphanumeric()) => {
                return Err(bad(&format!("`{alg}` is not a supported digest")));
            }
            _ => return Err(bad("the `sha256:` prefix is missing")),
        };
        let digits: Vec<u8> = hex.bytes().filter(|&b| b != b':').collect();
        if digits.len() != 64 {
            return Err(bad(&format!("{} hex digits", digits.len())));
        }
        let mut out = [0u8; 32];
        for (i, pair) in digits.chunks_exact(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| bad("not hex"))?;
            out[i] =
                u8::from_str_radix(text, 16).map_err(|_| bad(&format!("`{text}` is not hex")))?;
        }
        Ok(Self(out))
    }
}

// ---------------------------------------------------------------- identity

/// Where a [`ServerIdentity`] came from.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdentityOrigin {
    /// The certificate and key files given.
    Given,
    /// Generated now into this directory.
    Generated(PathBuf),
    /// Generated by an earlier start, read from this directory.
    Reused(PathBuf),
}

/// A server's certificate chain and private key.
pub struct ServerIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    fingerprint: Fingerprint,
    origin: IdentityOrigin,
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("fingerprint", &self.fingerprint)
            .field("chain", &self.chain.len())
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// The names of the generated certificate for a service listening on
/// `listen` and known as `extra`: the listen address (the loopback
/// addresses when it listens on all of them), `localhost`, and `extra`.
pub fn default_names(listen: IpAddr, extra: &[String]) -> Vec<String> {
    let mut names = Vec::new();
    if listen.is_unspecified() {
        names.push("127.0.0.1".to_owned());
        names.push("::1".to_owned());
    } else {
        names.push(listen.to_canonical().to_string());
    }
    names.push("localhost".to_owned());
    for n in extra {
        if !names.iter().any(|m| m.eq_ignore_ascii_case(n)) {
            names.push(n.clone());
        }
    }
    names
}

fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    let bad = || TlsError::Name {
        name: name.to_owned(),
    };
    // `[::1]` as written in URLs is an address too.
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name.to_owned()).map_err(|_| bad())
}

impl ServerIdentity {
    /// The identity of a service: the given certificate and key (PEM), or
    /// else the certificate kept in `dir` — generated there on first use
    /// for `names` (see [`default_names`]) and reused afterwards.
    ///
    /// The directory appears whole or not at all: the pair is written into
    /// a temporary sibling directory that is then renamed to `dir`, so two
    /// services starting at once on the same state end up with the same
    /// identity (the second rename fails, and its service reads the first
    /// one's), and an interrupted start leaves no half identity behind.
    ///
    /// A kept key that others may read is refused ([`TlsError::Insecure`])
    /// rather than silently tightened: someone else may have copied it. A
    /// directory with only one of the two files is an error too (delete it
    /// to generate a new identity; its fingerprint changes).
    ///
    /// # Errors
    /// [`TlsError`] naming the file at fault, or the invalid name.
    pub fn load_or_generate(
        dir: &Path,
        given: Option<(&Path, &Path)>,
        names: &[String],
    ) -> Result<Self, TlsError> {
        for n in names {
            server_name(n)?;
        }
        if let Some((cert, key)) = given {
            return Self::load(cert, key, IdentityOrigin::Given);
        }
        match Self::kept(dir)? {
            Some(identity) => Ok(identity),
            None => Self::generate(dir, names),
        }
    }

    /// The identity kept in `dir`, if there is one.
    fn kept(dir: &Path) -> Result<Option<Self>, TlsError> {
        let cert = dir.join(CERT_FILE);
        let key = dir.join(KEY_FILE);
        match (cert.exists(), key.exists()) {
            (true, true) => {
                check_private(&key)?;
                Self::load(&cert, &key, IdentityOrigin::Reused(dir.to_owned())).map(Some)
            }
            (false, false) => Ok(None),
            (has_cert, _) => Err(TlsError::Invalid {
                path: dir.to_owned(),
                detail: format!(
                    "holds {} but not {}; delete the directory to generate a new certificate (its fingerprint will change)",
                    if has_cert { CERT_FILE } else { KEY_FILE },
                    if has_cert { KEY_FILE } else { CERT_FILE },
                ),
            }),
        }
    }

    /// Reads a certificate chain and its key from PEM files.
    fn load(cert: &Path, key: &Path, origin: IdentityOrigin) -> Result<Self, TlsError> {
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_error(cert, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_error(cert, e))?;
        let Some(first) = chain.first() else {
            return Err(TlsError::Invalid {
                path: cert.to_owned(),
                detail: "no `BEGIN CERTIFICATE` block".to_owned(),
            });
        };
        let fingerprint = Fingerprint::of(first);
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| match e {
            rustls::pki_types::pem::Error::NoItemsFound => TlsError::Invalid {
                path: key.to_owned(),
                detail: "no `BEGIN PRIVATE KEY` block (PKCS#8, PKCS#1 or SEC1)".to_owned(),
            },
            e => pem_error(key, e),
        })?;
        let identity = Self {
            chain,
            key: key_der,
            fingerprint,
            origin,
        };
        // The same check the server configuration makes, here where the
        // error can name the files.
        server_config(&identity).map_err(|e| TlsError::Invalid {
            path: key.to_owned(),
            detail: format!("does not fit the certificate {}: {e}", cert.display()),
        })?;
        Ok(identity)
    }

    fn generate(dir: &Path, names: &[String]) -> Result<Self, TlsError> {
        let setup = |e: rcgen::Error| TlsError::Setup(format!("generating a certificate: {e}"));
        let mut params = rcgen::CertificateParams::new(
            names
                .iter()
                .map(|n| {
                    n.strip_prefix('[')
                        .and_then(|n| n.strip_suffix(']'))
                        .unwrap_or(n)
                        .to_owned()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(setup)?;
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "fluidcloud (self-signed)");
        params.distinguished_name = dn;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(setup)?;
        let cert = params.self_signed(&key).map_err(setup)?;

        let parent = dir.parent().unwrap_or(Path::new("."));
        create_private_dirs(parent)?;
        let name = dir
            .file_name()
            .map_or_else(|| "tls".into(), |n| n.to_string_lossy().into_owned());
        static ATTEMPT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let attempt = ATTEMPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = parent.join(format!(".{name}.tmp-{}-{attempt}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        create_private_dir(&tmp)?;
        let written = write_file(&tmp.join(KEY_FILE), key.serialize_pem().as_bytes(), 0o600)
            .and_then(|()| write_file(&tmp.join(CERT_FILE), cert.pem().as_bytes(), 0o644));
        if let Err(e) = written {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if let Err(e) = std::fs::rename(&tmp, dir) {
            let _ = std::fs::remove_dir_all(&tmp);
            // Another start got there first: its identity is the one.
            if let Some(theirs) = Self::kept(dir)? {
                return Ok(theirs);
            }
            return Err(TlsError::Io {
                action: "rename into place",
                path: dir.to_owned(),
                source: e,
            });
        }
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
        let der = cert.der().clone();
        Ok(Self {
            fingerprint: Fingerprint::of(&der),
            chain: vec![der],
            key: PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            origin: IdentityOrigin::Generated(dir.to_owned()),
        })
    }

    /// The fingerprint of the certificate (the first of the chain).
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// Where the identity came from.
    pub fn origin(&self) -> &IdentityOrigin {
        &self.origin
    }

    /// Those of `names` the certificate is not valid for: a client that
    /// verifies names (not a pinned one) would refuse them.
    pub fn missing_names(&self, names: &[String]) -> Vec<String> {
        let Some(first) = self.chain.first() else {
            return names.to_vec();
        };
        let Ok(cert) = webpki::EndEntityCert::try_from(first) else {
            return names.to_vec();
        };
        names
            .iter()
            .filter(|n| {
                server_name(n).map_or(true, |sn| {
                    cert.verify_is_valid_for_subject_name(&sn).is_err()
                })
            })
            .cloned()
            .collect()
    }
}

fn pem_error(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    match e {
        rustls::pki_types::pem::Error::Io(source) => TlsError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        },
        e => TlsError::Invalid {
            path: path.to_owned(),
            detail: format!("not a PEM file: {e}"),
        },
    }
}

#[cfg(unix)]
fn check_private(key: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(key)
        .map_err(io_error("read", key))?
        .permissions()
        .mode()
        & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TlsError::Insecure {
            path: key.to_owned(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_key: &Path) -> Result<(), TlsError> {
    Ok(())
}

/// A new directory only its owner may enter (mode 0700 from the start,
/// so there is no moment when it is wider).
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut b = std::fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        b.mode(0o700);
    }
    b.create(dir).map_err(io_error("create", dir))
}

/// Creates `dir` and its missing parents, each only its owner may enter
/// (the state directory holds relocation records as well); existing ones
/// are left as they are.
fn create_private_dirs(dir: &Path) -> Result<(), TlsError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        b.mode(0o700);
    }
    b.create(dir).map_err(io_error("create", dir))
}

/// Writes a new file created with `mode` (never wider, whatever the
/// umask), durably.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        o.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut f = o.open(path).map_err(io_error("create", path))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(io_error("write", path))
}

/// The server configuration for `identity`: TLS 1.2 and 1.3, HTTP/1.1,
/// no client certificates.
///
/// # Errors
/// [`TlsError::Setup`] when the key does not fit the certificate or its
/// algorithm is not supported.
pub fn server_config(identity: &ServerIdentity) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// As [`server_config`], and asks clients for a certificate, which they
/// may withhold. Whoever presents one must prove they hold its key (the
/// handshake's signature is checked); which certificates are welcome is
/// the application's decision, made on the [`Peer`] fingerprint of the
/// connection ([`serve_tls_peers`]). A site agent pins the agent a
/// transfer ticket was issued for this way.
///
/// # Errors
/// As [`server_config`].
pub fn server_config_peer_certs(
    identity: &ServerIdentity,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setup(e.to_string()))?
        .with_client_cert_verifier(Arc::new(AnyClientCert {
            provider: provider(),
        }))
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| TlsError::Setup(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Checks a TLS 1.2 handshake signature against the certificate itself:
/// who signs holds the certificate's key, whatever vouches (or not) for it.
fn signed_tls12(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls12_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// As [`signed_tls12`], for TLS 1.3.
fn signed_tls13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

/// The signature schemes `provider` verifies.
fn schemes(provider: &CryptoProvider) -> Vec<SignatureScheme> {
    provider
        .signature_verification_algorithms
        .supported_schemes()
}

/// Accepts any client certificate whose key signs the handshake; the
/// certificate's fingerprint is checked by the application.
#[derive(Debug)]
struct AnyClientCert {
    provider: Arc<CryptoProvider>,
}

impl rustls::server::danger::ClientCertVerifier for AnyClientCert {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signed_tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signed_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

// ---------------------------------------------------------------- clients

/// Why a client refused a server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Rejection {
    /// A pinned fingerprint that the certificate does not have.
    Mismatch {
        /// The pinned one.
        expected: Fingerprint,
        /// The certificate's.
        received: Fingerprint,
    },
    /// The certificate does not verify against the trusted roots.
    Untrusted {
        /// The certificate's fingerprint.
        received: Fingerprint,
        /// rustls's reason (unknown issuer, expired, wrong name, ...).
        reason: String,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mismatch { expected, received } => write!(
                f,
                "the server's certificate is {received}, not the pinned {expected}"
            ),
            Self::Untrusted { received, reason } => write!(
                f,
                "the server's certificate ({received}) is not trusted: {reason}"
            ),
        }
    }
}

/// A client configuration, and the last certificate it refused.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The rustls configuration (hand it to the HTTP client).
    pub config: rustls::ClientConfig,
    rejected: Arc<Mutex<Option<Rejection>>>,
}

impl ClientTls {
    fn new(
        verifier: Arc<dyn ServerCertVerifier>,
        rejected: Arc<Mutex<Option<Rejection>>>,
    ) -> Result<Self, TlsError> {
        Self::with_identity(verifier, rejected, None)
    }

    fn with_identity(
        verifier: Arc<dyn ServerCertVerifier>,
        rejected: Arc<Mutex<Option<Rejection>>>,
        identity: Option<&ServerIdentity>,
    ) -> Result<Self, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Setup(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = match identity {
            Some(id) => builder
                .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
                .map_err(|e| TlsError::Setup(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        Ok(Self { config, rejected })
    }

    /// Why the last server certificate was refused, if one was: an HTTP
    /// client's connection error says little more than "invalid peer
    /// certificate".
    pub fn rejection(&self) -> Option<Rejection> {
        self.rejected
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// A client that trusts `ca` (PEM, one or more certificates), or the
/// system's roots without one.
///
/// # Errors
/// [`TlsError`] naming the CA file; [`TlsError::NoRoots`] when the system
/// has no usable root certificate.
pub fn client_config(ca: Option<&Path>) -> Result<ClientTls, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| pem_error(path, e))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error(path, e))?;
            if certs.is_empty() {
                return Err(TlsError::Invalid {
                    path: path.to_owned(),
                    detail: "no `BEGIN CERTIFICATE` block".to_owned(),
                });
            }
            for c in certs {
                roots.add(c).map_err(|e| TlsError::Invalid {
                    path: path.to_owned(),
                    detail: format!("not a usable CA certificate: {e}"),
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let mut detail = String::new();
                for var in ["SSL_CERT_FILE", "SSL_CERT_DIR"] {
                    if let Some(v) = std::env::var_os(var) {
                        detail.push_str(&format!(" (${var} is {})", Path::new(&v).display()));
                    }
                }
                if let Some(e) = found.errors.first() {
                    detail.push_str(&format!(": {e}"));
                }
                return Err(TlsError::NoRoots { detail });
            }
            for e in &found.errors {
                tracing::debug!(error = %e, "skipped while loading root certificates");
            }
        }
    }
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Setup(e.to_string()))?;
    let rejected = Arc::new(Mutex::new(None));
    ClientTls::new(
        Arc::new(Recording {
            inner: verifier,
            rejected: rejected.clone(),
        }),
        rejected,
    )
}

/// A client that accepts exactly the certificate whose fingerprint is
/// `pin`, whatever its names and issuer.
///
/// # Errors
/// [`TlsError::Setup`] only if the provider supports no protocol version.
pub fn pinned_client_config(pin: Fingerprint) -> Result<ClientTls, TlsError> {
    let rejected = Arc::new(Mutex::new(None));
    ClientTls::new(
        Arc::new(Pinned {
            expected: pin,
            provider: provider(),
            rejected: rejected.clone(),
        }),
        rejected,
    )
}

/// As [`pinned_client_config`], and presents `identity`'s certificate to
/// the server: one site agent pulling from another proves which agent it
/// is with the same certificate that its own clients pin.
///
/// # Errors
/// [`TlsError::Setup`] when the identity's key is not usable.
pub fn pinned_client_config_as(
    pin: Fingerprint,
    identity: &ServerIdentity,
) -> Result<ClientTls, TlsError> {
    let rejected = Arc::new(Mutex::new(None));
    ClientTls::with_identity(
        Arc::new(Pinned {
            expected: pin,
            provider: provider(),
            rejected: rejected.clone(),
        }),
        rejected,
        Some(identity),
    )
}

/// The system's or a CA's verification, remembering what it refused.
#[derive(Debug)]
struct Recording {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    rejected: Arc<Mutex<Option<Rejection>>>,
}

impl ServerCertVerifier for Recording {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| {
                let reason = match e {
                    rustls::Error::InvalidCertificate(c) => describe(c),
                    e => e.to_string(),
                };
                *self.rejected.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(Rejection::Untrusted {
                        received: Fingerprint::of(end_entity),
                        reason,
                    });
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

fn describe(e: &rustls::CertificateError) -> String {
    use rustls::CertificateError as C;
    match e {
        C::UnknownIssuer => "issued by no CA this client trusts (self-signed?)".to_owned(),
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "not valid for the server's name".to_owned()
        }
        C::Expired | C::ExpiredContext { .. } => "expired".to_owned(),
        C::NotValidYet | C::NotValidYetContext { .. } => "not valid yet".to_owned(),
        C::Revoked => "revoked".to_owned(),
        e => format!("{e:?}"),
    }
}

/// Accepts one certificate by its digest; still checks the handshake's
/// signatures against it, so only the holder of its key passes.
#[derive(Debug)]
struct Pinned {
    expected: Fingerprint,
    provider: Arc<CryptoProvider>,
    rejected: Arc<Mutex<Option<Rejection>>>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let received = Fingerprint::of(end_entity);
        if received == self.expected {
            return Ok(ServerCertVerified::assertion());
        }
        let rejection = Rejection::Mismatch {
            expected: self.expected,
            received,
        };
        let message = rejection.to_string();
        *self.rejected.lock().unwrap_or_else(PoisonError::into_inner) = Some(rejection);
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch(message)))),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signed_tls12(&self.provider, message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        signed_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        schemes(&self.provider)
    }
}

#[derive(Debug)]
struct PinMismatch(String);

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PinMismatch {}

// ---------------------------------------------------------------- serving

/// A TCP listener whose connections come out TLS-terminated. Handshakes
/// run in tasks of their own, each limited in time, so the accept loop
/// never waits on a client.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    /// Terminates TLS with `config` on the connections of `listener`.
    ///
    /// # Errors
    /// When the listener has no local address.
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(MAX_HANDSHAKES);
        let tls = TlsAcceptor::from(config);
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait, as
                        // axum's own loop does, instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let tls = tls.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self {
            local,
            ready,
            acceptor,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept task ended (its runtime is shutting down): no
            // connection will come any more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for ClientAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        Self(*stream.remote_addr())
    }
}

/// Serves `router` over TLS on `listener` until `shutdown` completes; the
/// handlers see the client's address as [`ClientAddr`].
///
/// # Errors
/// When the listener fails.
pub async fn serve_tls(
    listener: TcpListener,
    router: Router,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = TlsListener::new(listener, config)?;
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<ClientAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn fingerprints_read_as_written_and_as_openssl_prints_them() {
        let f = Fingerprint([0xab; 32]);
        let text = f.to_string();
        assert_eq!(text, format!("sha256:{}", "ab".repeat(32)));
        assert_eq!(text.parse::<Fingerprint>().unwrap(), f);
        assert_eq!(
            format!("SHA256:{}", vec!["AB"; 32].join(":"))
                .parse::<Fingerprint>()
                .unwrap(),
            f
        );
        for (bad, says) in [
            ("ab".repeat(32), "prefix"),
            (
                format!("md5:{}", "ab".repeat(16)),
                "`md5` is not a supported digest",
            ),
            (format!("sha256:{}", "ab".repeat(31)), "62 hex digits"),
            (format!("sha256:{}zz", "ab".repeat(31)), "`zz` is not hex"),
        ] {
            let e = bad.parse::<Fingerprint>().unwrap_err().to_string();
            assert!(e.contains(says) && e.contains(&bad), "{bad}: {e}");
        }
    }

    #[test]
    fn the_generated_identity_is_kept_private_and_reused() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state/tls");
        let names = default_names("127.0.0.1".parse().unwrap(), &["svc.example".into()]);
        let first = ServerIdentity::load_or_generate(&dir, None, &names).unwrap();
        assert_eq!(first.origin(), &IdentityOrigin::Generated(dir.clone()));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&tmp.path().join("state")), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        assert!(first.missing_names(&names).is_empty());
        assert_eq!(
            first.missing_names(&["other.example".into(), "10.1.2.3".into()]),
            ["other.example", "10.1.2.3"]
        );

        let again = ServerIdentity::load_or_generate(&dir, None, &names).unwrap();
        assert_eq!(again.fingerprint(), first.fingerprint());
        assert_eq!(again.origin(), &IdentityOrigin::Reused(dir.clone()));

        std::fs::set_permissions(dir.join(KEY_FILE), std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let e = ServerIdentity::load_or_generate(&dir, None, &names).unwrap_err();
        assert!(matches!(e, TlsError::Insecure { mode: 0o644, .. }), "{e}");

        std::fs::remove_file(dir.join(KEY_FILE)).unwrap();
        let e = ServerIdentity::load_or_generate(&dir, None, &names)
            .unwrap_err()
            .to_string();
        assert!(e.contains("holds cert.pem but not key.pem"), "{e}");

        // Given files: the same certificate, another origin; a key that is
        // not the certificate's is refused naming both files.
        let other = tmp.path().join("other");
        let second = ServerIdentity::load_or_generate(&other, None, &names).unwrap();
        let given = ServerIdentity::load_or_generate(
            &dir,
            Some((&other.join(CERT_FILE), &other.join(KEY_FILE))),
            &[],
        )
        .unwrap();
        assert_eq!(given.fingerprint(), second.fingerprint());
        let e = ServerIdentity::load_or_generate(
            &dir,
            Some((&dir.join(CERT_FILE), &other.join(KEY_FILE))),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("does not fit the certificate"), "{e}");
        let e = ServerIdentity::load_or_generate(&dir, None, &["bad name!".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`bad name!`"), "{e}");
    }

    #[test]
    fn services_starting_together_share_one_generated_identity() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("tls");
        let names = default_names("127.0.0.1".parse().unwrap(), &[]);
        let fingerprints: Vec<Fingerprint> = std::thread::scope(|s| {
            let started: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        ServerIdentity::load_or_generate(&dir, None, &names)
                            .unwrap()
                            .fingerprint()
                    })
                })
                .collect();
            started.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let kept = ServerIdentity::load_or_generate(&dir, None, &names).unwrap();
        assert!(
            fingerprints.iter().all(|f| *f == kept.fingerprint()),
            "{fingerprints:?}"
        );
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["tls"]);
    }

    #[test]
    fn names_of_a_service_on_every_address_are_the_loopback_ones() {
        assert_eq!(
            default_names(
                "0.0.0.0".parse().unwrap(),
                &["localhost".into(), "a.example".into()]
            ),
            ["127.0.0.1", "::1", "localhost", "a.example"]
        );
        assert_eq!(
            default_names("::ffff:10.0.0.1".parse().unwrap(), &[]),
            ["10.0.0.1", "localhost"]
        );
    }
}

/// Who is at the other end of a TLS connection: its address, and the
/// fingerprint of the certificate it presented, if it presented one
/// (servers configured with [`server_config_peer_certs`]).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// The client's address.
    pub addr: SocketAddr,
    /// Its certificate's fingerprint.
    pub cert: Option<Fingerprint>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        let cert = stream
            .io()
            .get_ref()
            .1
            .peer_certificates()
            .and_then(<[CertificateDer<'_>]>::first)
            .map(Fingerprint::of);
        Self {
            addr: *stream.remote_addr(),
            cert,
        }
    }
}

/// As [`serve_tls`], with the handlers seeing the client as [`Peer`].
///
/// # Errors
/// When the listener fails.
pub async fn serve_tls_peers(
    listener: TcpListener,
    router: Router,
    config: Arc<rustls::ServerConfig>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = TlsListener::new(listener, config)?;
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
