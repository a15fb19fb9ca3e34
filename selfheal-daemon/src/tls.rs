//! Client-side TLS trust, shared by the daemon's TLS clients: a PEM CA file read into trust
//! anchors (`notifications.smtp_ca_file` for the email channel, `checks[].ca_file` and
//! `database.ca_file` for PostgreSQL), and the one rustls connector of the PostgreSQL
//! connections (the postgres checks and the session actuator).
//!
//! Owns: reading a CA file, when the connection or the channel that uses it is set up (config
//! validation reads no files, and a file fixed on disk is picked up by the next connection);
//! the client config of the PostgreSQL connections: ring, TLS 1.2 and 1.3, the web PKI roots
//! (webpki-roots) plus the CA file's certificates, no client certificate.
//!
//! Whether a PostgreSQL connection uses TLS is the URL's `sslmode`: `require` is TLS or no
//! connection; `disable` and `prefer` (the default) are plain text, as before TLS was
//! supported — a `prefer` that tried TLS would fail on the self-signed certificates many
//! servers offer by default (Debian's "snakeoil" names the machine, not `localhost`), since
//! this client never skips verification. When TLS is used, rustls always verifies the
//! server's certificate chain up to a trusted root and that the certificate names the URL's
//! host (an IP address host must be in the certificate as one): `require` here is what libpq
//! calls `verify-full`, stricter than libpq's `require` (which encrypts without checking whom
//! to). A server whose certificate comes from a private CA needs that CA in the `ca_file`;
//! libpq's own `verify-ca`/`verify-full` modes and `sslrootcert` are not URL options
//! tokio-postgres knows.
//!
//! Must not: turn verification off, or bring in a crypto provider other than ring.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::{pem::PemObject as _, CertificateDer};
use tokio_postgres_rustls::MakeRustlsConnect;

/// What is wrong with a CA file, found when the connection or the channel that uses it is set
/// up.
#[derive(Debug, thiserror::Error)]
pub enum CaFileError {
    #[error("cannot read it")]
    Read(#[source] std::io::Error),
    #[error("it is not valid PEM")]
    Pem(#[source] rustls_pki_types::pem::Error),
    #[error("it holds no certificate (no BEGIN CERTIFICATE section)")]
    NoCertificate,
    #[error("a certificate in it cannot be used as a trust anchor")]
    Unusable(#[source] rustls::Error),
}

/// The certificates of the PEM bundle at `path`, each checked to be usable as a trust anchor
/// (other sections, such as a key, are skipped).
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, CaFileError> {
    let pem = std::fs::read(path).map_err(CaFileError::Read)?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(CaFileError::Pem)?;
    if certificates.is_empty() {
        return Err(CaFileError::NoCertificate);
    }
    // The check rustls makes of a root (the certificate parses and has what an anchor needs),
    // so that a client given these certificates never refuses one of them later.
    let mut anchors = RootCertStore::empty();
    for certificate in &certificates {
        anchors
            .add(certificate.clone())
            .map_err(CaFileError::Unusable)?;
    }
    Ok(certificates)
}

/// A CA file and the config key that names it (`checks[0].ca_file`, `database.ca_file`), for
/// the errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile {
    pub key: String,
    pub path: PathBuf,
}

/// Why the TLS side of a PostgreSQL connection cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum PostgresTlsError {
    #[error("cannot use {key} {}", path.display())]
    CaFile {
        key: String,
        path: PathBuf,
        #[source]
        source: CaFileError,
    },
    #[error("cannot set up TLS with the ring provider")]
    Provider(#[source] rustls::Error),
}

/// The TLS connector of a PostgreSQL connection: the web PKI roots plus the certificates of
/// `ca_file`, read now. Used as is whatever the URL's `sslmode`; with `disable` it is never
/// asked to connect.
pub fn postgres_connector(ca_file: Option<&CaFile>) -> Result<MakeRustlsConnect, PostgresTlsError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(CaFile { key, path }) = ca_file {
        let certificates = read_ca_file(path).map_err(|source| PostgresTlsError::CaFile {
            key: key.clone(),
            path: path.clone(),
            source,
        })?;
        // Every one was accepted by the same check in `read_ca_file`.
        roots.add_parsable_certificates(certificates);
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(PostgresTlsError::Provider)?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

/// A PostgreSQL connection's driver, whichever transport it runs on; it ends when the
/// client is dropped.
pub type PostgresConnection =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum PostgresConnectError {
    #[error(transparent)]
    Tls(#[from] PostgresTlsError),
    #[error("cannot connect")]
    Connect(#[source] tokio_postgres::Error),
}

/// Connects to `url`: over TLS (verified, see the module doc) when its `sslmode` is
/// `require`, in plain text otherwise.
pub async fn connect_postgres(
    url: &str,
    ca_file: Option<&CaFile>,
) -> Result<(tokio_postgres::Client, PostgresConnection), PostgresConnectError> {
    let require = url
        .parse::<tokio_postgres::Config>()
        .is_ok_and(|config| config.get_ssl_mode() == tokio_postgres::config::SslMode::Require);
    if require {
        let tls = postgres_connector(ca_file)?;
        let (client, connection) = tokio_postgres::connect(url, tls)
            .await
            .map_err(PostgresConnectError::Connect)?;
        Ok((client, Box::pin(connection)))
    } else {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .map_err(PostgresConnectError::Connect)?;
        Ok((client, Box::pin(connection)))
    }
}

#[cfg(test)]
mod tests {
    use selfheal_receivers::TestPki;

    use super::*;
    use crate::app::error_chain;

    fn ca_file(path: PathBuf) -> CaFile {
        CaFile {
            key: "checks[0].ca_file".to_owned(),
            path,
        }
    }

    #[test]
    fn a_bad_ca_file_is_an_error_naming_the_key_the_path_and_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::localhost().expect("test PKI");
        let cases = [
            ("missing.pem", None, "cannot read it"),
            ("empty.pem", Some(String::new()), "holds no certificate"),
            (
                // A key alone: PEM, but no certificate.
                "key-only.pem",
                Some(pki.key_pem.clone()),
                "holds no certificate",
            ),
            (
                "bad-base64.pem",
                Some("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n".to_owned()),
                "is not valid PEM",
            ),
            (
                "not-a-certificate.pem",
                Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".to_owned()),
                "cannot be used as a trust anchor",
            ),
        ];
        for (name, contents, reason) in cases {
            let path = dir.path().join(name);
            if let Some(contents) = contents {
                std::fs::write(&path, contents).expect("write");
            }
            let Err(error) = postgres_connector(Some(&ca_file(path.clone()))) else {
                panic!("{name}: a connector was built");
            };
            assert!(
                matches!(&error, PostgresTlsError::CaFile { key, path: p, .. }
                    if key == "checks[0].ca_file" && *p == path),
                "{name}: {error:?}"
            );
            let text = error_chain(&error);
            assert!(
                text.starts_with(&format!(
                    "cannot use checks[0].ca_file {}: ",
                    path.display()
                )) && text.contains(reason),
                "{name}: {text}"
            );
        }
    }

    #[test]
    fn a_ca_file_adds_its_certificates_to_the_web_pki_roots() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = TestPki::localhost().expect("test PKI");
        // The CA, its key and a leaf: the key is skipped, both certificates are read.
        let path = dir.path().join("bundle.pem");
        std::fs::write(
            &path,
            format!("{}{}{}", pki.ca_pem, pki.key_pem, pki.cert_pem),
        )
        .expect("write");
        assert_eq!(read_ca_file(&path).expect("read").len(), 2);
        assert!(postgres_connector(Some(&ca_file(path))).is_ok());
        assert!(postgres_connector(None).is_ok());
    }
}
