//! Certificates made by the tests: a CA that issues server and client certificates for
//! 127.0.0.1, written as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

/// A certificate and its key, as files.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A test certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, as a PEM file.
    pub cert: PathBuf,
    dir: PathBuf,
    name: String,
}

impl TestCa {
    /// Creates a CA named `name` and writes its certificate to `dir/name-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Self {
        let key = KeyPair::generate().expect("generate CA key");
        let mut params = CertificateParams::new(Vec::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} test CA"));
        let cert = params.self_signed(&key).expect("self-sign CA");
        let cert_path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write CA certificate");
        Self {
            issuer: Issuer::new(params, key),
            cert: cert_path,
            dir: dir.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Issues a certificate valid for 127.0.0.1 and localhost, written as `name-role.pem/.key`.
    pub fn issue(&self, role: &str) -> Issued {
        let key = KeyPair::generate().expect("generate key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
                .expect("certificate parameters");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{} {role}", self.name));
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign certificate");
        let base = self.dir.join(format!("{}-{role}", self.name));
        let issued = Issued {
            cert: base.with_extension("pem"),
            key: base.with_extension("key"),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write key");
        issued
    }
}
