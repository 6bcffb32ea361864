//! TLS for the MQTT connection: server verification against `ROOT_CA` (or the system's roots
//! when none is given), and an optional client certificate and key for mutual TLS.
//!
//! OpenSSL does the work (through native-tls), as it does for Mosquitto and for librdkafka in
//! this same binary, so the certificates people make with the `openssl` command line work:
//! X.509 v1 certificates (what `openssl x509 -req` issues without an extensions file), CA
//! bundles, PKCS#8, PKCS#1 and SEC1 keys, and encrypted keys with `MQTT_CLIENT_KEY_PASSWORD`.
//!
//! The connector is built once, before connecting, so an unreadable, malformed, expired or
//! mismatched file is a configuration error at start-up that names the file's variable, not a
//! reconnect loop.

use std::fmt;
use std::path::{Path, PathBuf};

use native_tls::{Certificate, Identity, Protocol, TlsConnector};
use openssl::asn1::Asn1Time;
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;

/// Which of the TLS inputs a problem is with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFile {
    Ca,
    ClientCert,
    ClientKey,
    /// The password of an encrypted client key (not a file; its value is never shown).
    ClientKeyPassword,
}

/// Why the TLS configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot use {}: {reason}", path.display())]
    File {
        file: TlsFile,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS cannot be set up: {0}")]
    Library(String),
}

/// TLS settings of the MQTT connection; the files are read by [`TlsConfig::connector`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// CA certificates (PEM, one or several) that sign the broker's certificate; `None` uses
    /// the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; set together with `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1, encrypted or not) of the client certificate.
    pub client_key_file: Option<PathBuf>,
    /// Password of an encrypted client key. `Debug` never shows it.
    pub client_key_password: Option<String>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_file", &self.ca_file)
            .field("client_cert_file", &self.client_cert_file)
            .field("client_key_file", &self.client_key_file)
            .field(
                "client_key_password",
                &self.client_key_password.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

impl TlsConfig {
    /// Reads and checks the files and builds the connector.
    pub fn connector(&self) -> Result<TlsConnector, TlsError> {
        let mut builder = TlsConnector::builder();
        builder.min_protocol_version(Some(Protocol::Tlsv12));
        if let Some(path) = &self.ca_file {
            for cert in read_certs(path, TlsFile::Ca)? {
                let der = cert.to_der().map_err(library)?;
                builder.add_root_certificate(Certificate::from_der(&der).map_err(library)?);
            }
            builder.disable_built_in_roots(true);
        }
        match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert_path), Some(key_path)) => {
                builder.identity(self.identity(cert_path, key_path)?);
            }
            (Some(cert_path), None) => {
                return Err(file_error(
                    TlsFile::ClientKey,
                    cert_path,
                    "a client certificate needs its key as well",
                ));
            }
            (None, Some(key_path)) => {
                return Err(file_error(
                    TlsFile::ClientCert,
                    key_path,
                    "a client key needs its certificate as well",
                ));
            }
            (None, None) => {}
        }
        builder.build().map_err(library)
    }

    /// The client certificate chain and its key, checked against each other.
    fn identity(&self, cert_path: &Path, key_path: &Path) -> Result<Identity, TlsError> {
        let chain = read_certs(cert_path, TlsFile::ClientCert)?;
        let leaf = &chain[0];
        let now = Asn1Time::days_from_now(0).map_err(library)?;
        if leaf.not_after() < now {
            return Err(file_error(
                TlsFile::ClientCert,
                cert_path,
                format!(
                    "the certificate expired on {}; issue a new one",
                    leaf.not_after()
                ),
            ));
        }
        if leaf.not_before() > now {
            return Err(file_error(
                TlsFile::ClientCert,
                cert_path,
                format!("the certificate is not valid before {}", leaf.not_before()),
            ));
        }
        let key = self.read_key(key_path)?;
        let fits = leaf
            .public_key()
            .map_err(|e| file_error(TlsFile::ClientCert, cert_path, e))?
            .public_eq(&key);
        if !fits {
            return Err(file_error(
                TlsFile::ClientKey,
                key_path,
                format!(
                    "this key does not belong to the certificate in MQTT_CLIENT_CERT ({})",
                    cert_path.display()
                ),
            ));
        }
        let mut chain_pem = Vec::new();
        for cert in &chain {
            chain_pem.extend(cert.to_pem().map_err(library)?);
        }
        let key_pem = key.private_key_to_pem_pkcs8().map_err(library)?;
        Identity::from_pkcs8(&chain_pem, &key_pem).map_err(library)
    }

    /// Reads a PEM private key in any of the formats OpenSSL writes, decrypting it with the
    /// password when it is encrypted. OpenSSL is never left to ask for a password on a
    /// terminal: a key that needs one without one configured is an error here.
    fn read_key(&self, path: &Path) -> Result<PKey<Private>, TlsError> {
        let pem = std::fs::read(path).map_err(|e| file_error(TlsFile::ClientKey, path, e))?;
        let mut asked = false;
        let parsed = PKey::private_key_from_pem_callback(&pem, |buffer| {
            asked = true;
            match &self.client_key_password {
                Some(password) if password.len() <= buffer.len() => {
                    buffer[..password.len()].copy_from_slice(password.as_bytes());
                    Ok(password.len())
                }
                _ => Err(openssl::error::ErrorStack::get()),
            }
        });
        match (parsed, asked, &self.client_key_password) {
            (Ok(key), _, _) => Ok(key),
            (Err(_), true, None) => Err(file_error(
                TlsFile::ClientKey,
                path,
                "the key is encrypted: set MQTT_CLIENT_KEY_PASSWORD",
            )),
            (Err(_), true, Some(_)) => Err(file_error(
                TlsFile::ClientKeyPassword,
                path,
                "the password does not decrypt the key in MQTT_CLIENT_KEY",
            )),
            (Err(_), false, _) => Err(file_error(
                TlsFile::ClientKey,
                path,
                "no PEM private key in it (PKCS#8, PKCS#1 or SEC1)",
            )),
        }
    }
}

/// Every certificate of a PEM file, at least one.
fn read_certs(path: &Path, file: TlsFile) -> Result<Vec<X509>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| file_error(file, path, e))?;
    let certs = X509::stack_from_pem(&pem)
        .map_err(|e| file_error(file, path, format!("not a valid PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(file_error(file, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn library(error: impl ToString) -> TlsError {
    TlsError::Library(error.to_string())
}

fn file_error(file: TlsFile, path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        file,
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::rsa::Rsa;
    use openssl::symm::Cipher;
    use openssl::x509::X509NameBuilder;

    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write test file");
        path
    }

    fn rsa_key() -> PKey<Private> {
        PKey::from_rsa(Rsa::generate(2048).expect("RSA key")).expect("key")
    }

    /// A certificate for `key`, signed by `issuer` (itself when `None`), X.509 `version` (0 is
    /// v1, 2 is v3), valid from `days_from` to `days_to` (days from now, negative: past).
    fn certificate(
        name: &str,
        key: &PKey<Private>,
        issuer: Option<(&X509, &PKey<Private>)>,
        version: i32,
        (days_from, days_to): (i64, i64),
    ) -> X509 {
        let mut subject = X509NameBuilder::new().expect("name");
        subject
            .append_entry_by_nid(Nid::COMMONNAME, name)
            .expect("CN");
        let subject = subject.build();
        let mut builder = X509::builder().expect("builder");
        builder.set_version(version).expect("version");
        builder.set_subject_name(&subject).expect("subject");
        builder
            .set_issuer_name(issuer.map_or(&subject, |(cert, _)| cert.subject_name()))
            .expect("issuer");
        builder.set_pubkey(key).expect("public key");
        let day = 24 * 3600;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs() as i64;
        builder
            .set_not_before(&Asn1Time::from_unix(now + days_from * day).expect("time"))
            .expect("not before");
        builder
            .set_not_after(&Asn1Time::from_unix(now + days_to * day).expect("time"))
            .expect("not after");
        let signer = issuer.map_or(key, |(_, key)| key);
        builder.sign(signer, MessageDigest::sha256()).expect("sign");
        builder.build()
    }

    struct Files {
        dir: tempfile::TempDir,
        ca: PathBuf,
        ca_cert: X509,
        ca_key: PKey<Private>,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let ca_key = rsa_key();
            let ca_cert = certificate("test CA", &ca_key, None, 2, (-1, 365));
            // A bundle: an unrelated CA first, as system bundles have many.
            let other_key = rsa_key();
            let other = certificate("other CA", &other_key, None, 2, (-1, 365));
            let mut bundle = other.to_pem().expect("PEM");
            bundle.extend(ca_cert.to_pem().expect("PEM"));
            let ca = write(dir.path(), "ca.pem", &bundle);
            Self {
                dir,
                ca,
                ca_cert,
                ca_key,
            }
        }

        /// A client certificate (X.509 `version`) for `key`, and the key as `key_pem`.
        fn client(
            &self,
            name: &str,
            key: &PKey<Private>,
            key_pem: &[u8],
            version: i32,
            validity: (i64, i64),
        ) -> TlsConfig {
            let cert = certificate(
                "client",
                key,
                Some((&self.ca_cert, &self.ca_key)),
                version,
                validity,
            );
            TlsConfig {
                ca_file: Some(self.ca.clone()),
                client_cert_file: Some(write(
                    self.dir.path(),
                    &format!("{name}.pem"),
                    &cert.to_pem().expect("PEM"),
                )),
                client_key_file: Some(write(self.dir.path(), &format!("{name}.key"), key_pem)),
                client_key_password: None,
            }
        }
    }

    const VALID: (i64, i64) = (-1, 365);

    #[test]
    fn v1_and_v3_certificates_with_every_key_format_are_accepted() {
        let files = Files::new();
        let rsa = rsa_key();
        let ec = PKey::from_ec_key(
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).expect("curve"))
                .expect("EC key"),
        )
        .expect("key");
        let pkcs1 = rsa.rsa().expect("RSA").private_key_to_pem().expect("PEM");
        let sec1 = ec.ec_key().expect("EC").private_key_to_pem().expect("PEM");
        let pkcs8 = rsa.private_key_to_pem_pkcs8().expect("PEM");
        let encrypted = rsa
            .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), b"s3cret")
            .expect("PEM");
        let encrypted_pkcs1 = rsa
            .rsa()
            .expect("RSA")
            .private_key_to_pem_passphrase(Cipher::aes_128_cbc(), b"s3cret")
            .expect("PEM");
        assert!(String::from_utf8_lossy(&pkcs1).contains("BEGIN RSA PRIVATE KEY"));
        assert!(String::from_utf8_lossy(&sec1).contains("BEGIN EC PRIVATE KEY"));
        assert!(String::from_utf8_lossy(&encrypted).contains("BEGIN ENCRYPTED PRIVATE KEY"));
        // Name, key, its PEM, X.509 version (0: v1, 2: v3), password.
        type Case<'a> = (&'a str, &'a PKey<Private>, &'a [u8], i32, Option<&'a str>);
        let cases: [Case<'_>; 6] = [
            ("v1-pkcs1", &rsa, &pkcs1, 0, None),
            ("v3-pkcs8", &rsa, &pkcs8, 2, None),
            ("v1-sec1", &ec, &sec1, 0, None),
            ("v3-sec1", &ec, &sec1, 2, None),
            ("v1-encrypted-pkcs8", &rsa, &encrypted, 0, Some("s3cret")),
            (
                "v3-encrypted-pkcs1",
                &rsa,
                &encrypted_pkcs1,
                2,
                Some("s3cret"),
            ),
        ];
        for (name, key, pem, version, password) in cases {
            let mut tls = files.client(name, key, pem, version, VALID);
            tls.client_key_password = password.map(str::to_owned);
            if let Err(e) = tls.connector() {
                panic!("{name}: {e}");
            }
        }
    }

    #[test]
    fn each_bad_input_names_its_variable() {
        let files = Files::new();
        let dir = files.dir.path();
        let key = rsa_key();
        let pkcs8 = key.private_key_to_pem_pkcs8().expect("PEM");
        let encrypted = key
            .private_key_to_pem_pkcs8_passphrase(Cipher::aes_256_cbc(), b"s3cret")
            .expect("PEM");
        let good = files.client("good", &key, &pkcs8, 2, VALID);
        let expired = files.client("expired", &key, &pkcs8, 0, (-30, -1));
        let future = files.client("future", &key, &pkcs8, 0, (10, 20));
        let locked = files.client("locked", &key, &encrypted, 2, VALID);
        let other_key = write(
            dir,
            "other.key",
            &rsa_key().private_key_to_pem_pkcs8().expect("PEM"),
        );
        let garbage = write(dir, "garbage.pem", b"not a certificate");
        let missing = dir.join("missing.pem");
        let with = |adjust: &dyn Fn(&mut TlsConfig)| {
            let mut tls = good.clone();
            adjust(&mut tls);
            tls
        };
        let cases = [
            (
                with(&|t| t.ca_file = Some(missing.clone())),
                TlsFile::Ca,
                "No such file",
            ),
            (
                with(&|t| t.ca_file = Some(garbage.clone())),
                TlsFile::Ca,
                "no PEM certificate",
            ),
            (
                with(&|t| t.client_key_file = Some(garbage.clone())),
                TlsFile::ClientKey,
                "no PEM private key",
            ),
            (
                with(&|t| t.client_key_file = None),
                TlsFile::ClientKey,
                "needs its key",
            ),
            (
                with(&|t| t.client_cert_file = None),
                TlsFile::ClientCert,
                "needs its certificate",
            ),
            (
                with(&|t| t.client_cert_file = Some(missing.clone())),
                TlsFile::ClientCert,
                "No such file",
            ),
            (
                with(&|t| t.client_cert_file = Some(garbage.clone())),
                TlsFile::ClientCert,
                "no PEM certificate",
            ),
            (
                with(&|t| t.client_key_file = Some(other_key.clone())),
                TlsFile::ClientKey,
                "does not belong to the certificate in MQTT_CLIENT_CERT",
            ),
            (expired, TlsFile::ClientCert, "expired on"),
            (future, TlsFile::ClientCert, "not valid before"),
            (
                locked.clone(),
                TlsFile::ClientKey,
                "encrypted: set MQTT_CLIENT_KEY_PASSWORD",
            ),
            (
                TlsConfig {
                    client_key_password: Some("wrong".to_owned()),
                    ..locked
                },
                TlsFile::ClientKeyPassword,
                "does not decrypt",
            ),
        ];
        for (tls, expected_file, reason) in cases {
            match tls.connector() {
                Err(TlsError::File {
                    file, reason: got, ..
                }) => {
                    assert_eq!(file, expected_file, "{tls:?}: {got}");
                    assert!(got.contains(reason), "{tls:?}: {got:?} lacks {reason:?}");
                    assert!(!got.contains("wrong"), "a password leaked: {got}");
                }
                Err(other) => panic!("{tls:?}: expected a file error, got {other}"),
                Ok(_) => panic!("{tls:?}: expected a file error, got a connector"),
            }
        }
    }

    #[test]
    fn debug_never_shows_the_key_password() {
        let tls = TlsConfig {
            client_key_password: Some("s3cret".to_owned()),
            ..TlsConfig::default()
        };
        assert!(!format!("{tls:?}").contains("s3cret"));
    }
}
