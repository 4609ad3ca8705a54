//! TLS pieces every side shares: reading PEM files, the rustls settings of
//! a connecting side (the CLI, the client library, a node dialling a peer),
//! the name a node's certificate is checked against, and a TLS failure in
//! words (docs/SECURITY.md, "TLS").
//!
//! The crypto provider is `ring`, chosen here once ([`provider`]): every
//! rustls configuration of the workspace is built from it, so none depends
//! on a process-wide default being installed.
//!
//! Names: a connecting side checks the node's certificate against the IP
//! address it connected to (an IP SAN), unless it was given a server name,
//! which is then checked as a DNS SAN instead. Members of a ring are known
//! by IP address, so the first needs no naming scheme; the second lets
//! every node share one name (and one certificate, if the operator wants).

use rustls::client::ClientConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

/// The CLI's environment variables for its TLS flags.
pub const CA_ENV: &str = "RINGKV_TLS_CA";
pub const CERT_ENV: &str = "RINGKV_TLS_CERT";
pub const KEY_ENV: &str = "RINGKV_TLS_KEY";
pub const SERVER_NAME_ENV: &str = "RINGKV_TLS_SERVER_NAME";

/// The first byte of every TLS record a connecting side sends first (a
/// handshake record). A ringkv frame starts with its length instead, so a
/// node can tell a plain client from a TLS one by this byte.
pub const HANDSHAKE_RECORD: u8 = 0x16;

/// The crypto provider of every TLS configuration here.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain from a PEM file; `setting` names it in errors.
pub fn load_certs(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let read = std::fs::read(path).map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_slice_iter(&read)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{setting}: {} is not PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{setting}: {} holds no certificate (PEM \"BEGIN CERTIFICATE\")", path.display()));
    }
    Ok(certs)
}

/// The private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path, setting: &str) -> Result<PrivateKeyDer<'static>, String> {
    std::fs::metadata(path).map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("{setting}: {} holds no usable private key: {e}", path.display()))
}

/// The trusted certificates of a PEM bundle.
pub fn load_roots(path: &Path, setting: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path, setting)? {
        roots.add(cert).map_err(|e| format!("{setting}: {}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(roots)
}

/// A certificate chain and the private key of its first certificate,
/// checked to belong together.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// Reads both files; each error names its setting.
    pub fn load(cert: &Path, cert_setting: &str, key: &Path, key_setting: &str) -> Result<Identity, String> {
        let chain = load_certs(cert, cert_setting)?;
        let key_der = load_key(key, key_setting)?;
        CertifiedKey::from_der(chain.clone(), key_der.clone_key(), &provider()).map_err(|e| {
            format!("{key_setting}: {} does not go with the certificate {}: {e}", key.display(), cert.display())
        })?;
        Ok(Identity { chain, key: key_der })
    }
}

/// What a connecting side needs for TLS: the settings and, optionally, the
/// name to check the node's certificate for (see the module doc).
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<ClientConfig>,
    pub server_name: Option<ServerName<'static>>,
}

impl ClientTls {
    /// Trusts `roots`, presents `identity` when the node asks for a
    /// certificate, and checks `server_name` (a DNS name) instead of the
    /// address when given.
    pub fn new(
        roots: RootCertStore,
        identity: Option<Identity>,
        server_name: Option<&str>,
    ) -> Result<ClientTls, String> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let config = match identity {
            Some(id) => builder.with_client_auth_cert(id.chain, id.key).map_err(|e| e.to_string())?,
            None => builder.with_no_client_auth(),
        };
        let server_name = server_name
            .map(|n| ServerName::try_from(n.to_string()).map_err(|e| format!("server name {n:?}: {e}")))
            .transpose()?;
        Ok(ClientTls { config: Arc::new(config), server_name })
    }

    /// From PEM files: the CA bundle, and a client certificate and key
    /// (both or neither). The errors name the flag or variable.
    pub fn from_files(
        ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
        server_name: Option<&str>,
    ) -> Result<ClientTls, String> {
        let roots = load_roots(ca, "TLS CA")?;
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some(Identity::load(c, "TLS client certificate", k, "TLS client key")?),
            (None, None) => None,
            _ => return Err("a TLS client certificate needs its key, and a key its certificate".into()),
        };
        ClientTls::new(roots, identity, server_name)
    }

    /// The name the certificate of the node at `ip` must carry.
    pub fn name_for(&self, ip: IpAddr) -> ServerName<'static> {
        self.server_name.clone().unwrap_or(ServerName::IpAddress(ip.into()))
    }

    /// A new client connection to the node at `ip`.
    pub fn connect(&self, ip: IpAddr) -> Result<rustls::ClientConnection, rustls::Error> {
        rustls::ClientConnection::new(self.config.clone(), self.name_for(ip))
    }
}

/// A TLS failure as a reader can act on it.
pub fn describe(e: &rustls::Error) -> String {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error as E};
    match e {
        E::InvalidCertificate(Cert::UnknownIssuer) => {
            "bad certificate: the other side's certificate is not signed by a CA trusted here".into()
        }
        E::InvalidCertificate(c @ (Cert::NotValidForName | Cert::NotValidForNameContext { .. })) => {
            format!("name mismatch: {c} (the certificate must carry the address connected to, or the server name)")
        }
        E::InvalidCertificate(c) => format!("bad certificate: {c}"),
        E::AlertReceived(Alert::CertificateRequired) => {
            "the other side requires a client certificate and none was given".into()
        }
        E::AlertReceived(
            a @ (Alert::UnknownCA | Alert::BadCertificate | Alert::CertificateUnknown | Alert::DecryptError),
        ) => format!("the other side refused this side's certificate ({a:?}): is it signed by the CA it trusts?"),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
            format!("the other side does not speak TLS here (is TLS on there?): {e}")
        }
        E::NoCertificatesPresented => "no certificate was presented".into(),
        other => other.to_string(),
    }
}

/// The rustls error inside an I/O error, where rustls put one (its
/// blocking and async streams report failures as I/O errors).
pub fn from_io(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}
