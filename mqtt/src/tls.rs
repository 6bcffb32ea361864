//! TLS for the MQTT connection: server verification against `ROOT_CA` (or the system's roots
//! when none is given), and an optional client certificate and key for mutual TLS.
//!
//! The rustls configuration is built once, before connecting, so an unreadable or malformed file
//! is a configuration error at start-up (naming the file), not a reconnect loop. The `ring`
//! crypto provider is passed explicitly: no process-wide default is needed.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConfig;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Which of the TLS files a problem is with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsFile {
    Ca,
    ClientCert,
    ClientKey,
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
    #[error("no trusted root certificates: {0}")]
    NoRoots(String),
}

/// TLS settings of the MQTT connection; the files are read by [`TlsConfig::client_config`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsConfig {
    /// CA certificates (PEM) that sign the broker's certificate; `None` uses the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS; set together with `client_key_file`.
    pub client_cert_file: Option<PathBuf>,
    /// Private key (PEM: PKCS#8, PKCS#1 or SEC1) of the client certificate.
    pub client_key_file: Option<PathBuf>,
}

impl TlsConfig {
    /// Reads the files and builds the rustls client configuration.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        let roots = match &self.ca_file {
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(path, TlsFile::Ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| file_error(TlsFile::Ca, path, e))?;
                }
                roots
            }
            None => system_roots()?,
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots);
        let config = match (&self.client_cert_file, &self.client_key_file) {
            (Some(cert_path), Some(key_path)) => {
                let chain = read_certs(cert_path, TlsFile::ClientCert)?;
                let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
                    file_error(TlsFile::ClientKey, key_path, pem_reason(e, "private key"))
                })?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    file_error(
                        TlsFile::ClientKey,
                        key_path,
                        format!("does not fit the client certificate: {e}"),
                    )
                })?
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
            (None, None) => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

fn read_certs(path: &Path, file: TlsFile) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(file, path, pem_reason(e, "certificate")))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(file, path, pem_reason(e, "certificate")))?;
    if certs.is_empty() {
        return Err(file_error(file, path, "no PEM certificate in it"));
    }
    Ok(certs)
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
        return Err(TlsError::NoRoots(format!(
            "none found on the system ({}); set ROOT_CA",
            errors.join("; ")
        )));
    }
    Ok(roots)
}

fn pem_reason(error: rustls_pki_types::pem::Error, what: &str) -> String {
    match error {
        rustls_pki_types::pem::Error::Io(e) => e.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => format!("no PEM {what} in it"),
        other => format!("not a valid PEM {what}: {other:?}"),
    }
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
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write test file");
        path
    }

    fn ca_and_client(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let client_key = rcgen::KeyPair::generate().expect("key");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let client = rcgen::CertificateParams::new(vec!["client".to_owned()])
            .expect("params")
            .signed_by(&client_key, &issuer)
            .expect("client cert");
        (
            write(dir, "ca.pem", &ca.pem()),
            write(dir, "client.pem", &client.pem()),
            write(dir, "client.key", &client_key.serialize_pem()),
        )
    }

    #[test]
    fn builds_with_ca_and_client_certificate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca, cert, key) = ca_and_client(dir.path());
        let tls = TlsConfig {
            ca_file: Some(ca),
            client_cert_file: Some(cert),
            client_key_file: Some(key),
        };
        assert!(
            tls.client_config()
                .expect("valid")
                .client_auth_cert_resolver
                .has_certs()
        );
    }

    #[test]
    fn each_bad_file_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca, cert, key) = ca_and_client(dir.path());
        let garbage = write(dir.path(), "garbage.pem", "not a certificate");
        let missing = dir.path().join("missing.pem");
        let cases = [
            (
                Some(missing.clone()),
                None,
                None,
                TlsFile::Ca,
                "No such file",
            ),
            (
                Some(garbage.clone()),
                None,
                None,
                TlsFile::Ca,
                "no PEM certificate",
            ),
            (
                Some(ca.clone()),
                Some(cert.clone()),
                Some(garbage),
                TlsFile::ClientKey,
                "private key",
            ),
            (
                Some(ca.clone()),
                Some(cert.clone()),
                None,
                TlsFile::ClientKey,
                "needs its key",
            ),
            (
                Some(ca.clone()),
                Some(missing),
                Some(key.clone()),
                TlsFile::ClientCert,
                "No such",
            ),
            (
                Some(ca),
                Some(cert),
                Some(dir.path().join("ca.pem")),
                TlsFile::ClientKey,
                "key",
            ),
        ];
        for (ca_file, client_cert_file, client_key_file, expected_file, reason) in cases {
            let tls = TlsConfig {
                ca_file,
                client_cert_file,
                client_key_file,
            };
            match tls.client_config() {
                Err(TlsError::File {
                    file, reason: got, ..
                }) => {
                    assert_eq!(file, expected_file, "{tls:?}: {got}");
                    assert!(got.contains(reason), "{tls:?}: {got:?} lacks {reason:?}");
                }
                other => panic!("{tls:?}: expected a file error, got {other:?}"),
            }
        }
    }
}
