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

/// A CA made with the `openssl` command line the way Mosquitto's TLS documentation shows
/// (`openssl req -x509` for the CA, `openssl x509 -req` without an extensions file for the
/// rest), so the broker's and clients' certificates are X.509 v1 with no subjectAltName: the
/// broker must be reached as `localhost`, which the certificate's common name holds.
pub struct OpensslCa {
    dir: PathBuf,
    /// The CA certificate, as a PEM file.
    pub cert: PathBuf,
}

/// The key formats `openssl` writes, for [`OpensslCa::issue`].
#[derive(Clone, Copy, Debug)]
pub enum KeyFormat {
    /// `openssl genrsa` (OpenSSL 3): `BEGIN PRIVATE KEY`.
    Pkcs8,
    /// `openssl rsa -traditional`: `BEGIN RSA PRIVATE KEY`.
    Pkcs1,
    /// `openssl ecparam -genkey`: `BEGIN EC PARAMETERS` then `BEGIN EC PRIVATE KEY`.
    Sec1,
    /// `openssl pkcs8 -topk8 -v2 aes-256-cbc` with this password: `BEGIN ENCRYPTED PRIVATE KEY`.
    EncryptedPkcs8(&'static str),
    /// `openssl rsa -aes256 -traditional` with this password: `Proc-Type: 4,ENCRYPTED`.
    EncryptedPkcs1(&'static str),
}

impl OpensslCa {
    pub fn new(dir: &Path) -> Self {
        let cert = dir.join("ca.crt");
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-x509",
                "-days",
                "30",
                "-extensions",
                "v3_ca",
                "-nodes",
                "-subj",
                "/CN=openssl test CA",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
            ],
        );
        Self {
            dir: dir.to_owned(),
            cert,
        }
    }

    /// Issues a v1 certificate with common name `cn` for a new key in `format`.
    pub fn issue(&self, name: &str, cn: &str, format: KeyFormat) -> Issued {
        let dir = &self.dir;
        let key = format!("{name}.key");
        let plain = format!("{name}.plain.key");
        match format {
            KeyFormat::Sec1 => openssl(
                dir,
                &["ecparam", "-name", "prime256v1", "-genkey", "-out", &plain],
            ),
            _ => openssl(dir, &["genrsa", "-out", &plain, "2048"]),
        }
        let csr = format!("{name}.csr");
        let subject = format!("/CN={cn}");
        openssl(
            dir,
            &[
                "req", "-new", "-key", &plain, "-subj", &subject, "-out", &csr,
            ],
        );
        let cert = format!("{name}.crt");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "30",
                "-out",
                &cert,
            ],
        );
        let text = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in", &cert])
            .current_dir(dir)
            .output()
            .expect("openssl x509 -text");
        assert!(
            String::from_utf8_lossy(&text.stdout).contains("Version: 1 (0x0)"),
            "openssl x509 -req issued an X.509 v1 certificate"
        );
        match format {
            KeyFormat::Pkcs8 | KeyFormat::Sec1 => {
                std::fs::rename(dir.join(&plain), dir.join(&key)).expect("rename key");
            }
            KeyFormat::Pkcs1 => openssl(dir, &["rsa", "-in", &plain, "-traditional", "-out", &key]),
            KeyFormat::EncryptedPkcs8(password) | KeyFormat::EncryptedPkcs1(password) => {
                let how: &[&str] = match format {
                    KeyFormat::EncryptedPkcs8(_) => &["pkcs8", "-topk8", "-v2", "aes-256-cbc"],
                    _ => &["rsa", "-aes256", "-traditional"],
                };
                let pass = format!("pass:{password}");
                let rest = ["-in", &plain, "-passout", &pass, "-out", &key];
                openssl(dir, &[how, &rest[..]].concat());
            }
        }
        Issued {
            cert: dir.join(cert),
            key: dir.join(key),
        }
    }
}

/// Runs the `openssl` command line in `dir`, failing the test with its output if it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let output = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `openssl` ({e}): install it with `apt-get install openssl`")
        });
    assert!(
        output.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A Mosquitto whose main port takes TLS with a certificate from a fresh CA in `dir` (and, with
/// `websockets`, speaks MQTT over WebSockets there); its plain port stays open for test
/// clients. Returns the CA, for `ROOT_CA` and client certificates.
pub fn tls_broker(
    dir: &Path,
    require_certificate: bool,
    websockets: bool,
) -> (crate::Mosquitto, TestCa) {
    let ca = TestCa::new(dir, "trusted");
    let server = ca.issue("server");
    let mqtt = crate::Mosquitto::start_with(crate::MosquittoOptions {
        tls: Some(crate::ListenerTls {
            ca_file: ca.cert.clone(),
            cert_file: server.cert,
            key_file: server.key,
            require_certificate,
        }),
        websockets,
        ..crate::MosquittoOptions::default()
    });
    (mqtt, ca)
}
