//! Test certificates, made at test time into a directory (no private key
//! is checked in): a CA, and leaf certificates it signs for nodes (server
//! and client use) or clients (client use), as PEM files.

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use ringkv_net::tls::ClientTls;
use std::path::{Path, PathBuf};

/// A test CA whose files live in `dir`.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
    dir: PathBuf,
    /// The CA certificate, PEM: what a side that trusts this CA loads.
    pub pem: PathBuf,
}

/// A certificate and its key, as PEM files.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Leaf {
    /// `ringkv server` flags that make a node present this certificate and
    /// trust `ca`.
    pub fn server_flags(&self, ca: &Path) -> Vec<String> {
        let path = |p: &Path| p.to_str().expect("utf-8 temp path").to_string();
        vec!["--tls-cert".into(), path(&self.cert), "--tls-key".into(), path(&self.key), "--tls-ca".into(), path(ca)]
    }
}

impl Ca {
    /// A new CA named `name`, writing its files under `dir`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, format!("ringkv test CA {name}"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let dir = dir.join(format!("ca-{name}"));
        std::fs::create_dir_all(&dir).expect("CA dir");
        let pem = dir.join("ca.pem");
        std::fs::write(&pem, cert.pem()).expect("writing the CA certificate");
        Ca { cert, key, dir, pem }
    }

    /// A node's certificate: `names` (IP addresses or DNS names) as its
    /// SANs, usable as server and as client certificate.
    pub fn node(&self, file: &str, names: &[&str]) -> Leaf {
        let uses = [ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(file, names, &uses)
    }

    /// A client's certificate (client use only).
    pub fn client(&self, file: &str) -> Leaf {
        self.issue(file, &[], &[ExtendedKeyUsagePurpose::ClientAuth])
    }

    fn issue(&self, file: &str, names: &[&str], uses: &[ExtendedKeyUsagePurpose]) -> Leaf {
        let sans: Vec<String> = names.iter().map(ToString::to_string).collect();
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, file);
        params.extended_key_usages = uses.to_vec();
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("signing");
        let leaf = Leaf { cert: self.dir.join(format!("{file}.pem")), key: self.dir.join(format!("{file}-key.pem")) };
        std::fs::write(&leaf.cert, cert.pem()).expect("writing a certificate");
        std::fs::write(&leaf.key, key.serialize_pem()).expect("writing a key");
        leaf
    }

    /// What a client that trusts this CA (presenting `identity`) uses.
    pub fn client_tls(&self, identity: Option<&Leaf>) -> ClientTls {
        ClientTls::from_files(&self.pem, identity.map(|l| l.cert.as_path()), identity.map(|l| l.key.as_path()), None)
            .expect("client TLS settings")
    }
}
