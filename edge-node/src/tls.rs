//! The edge's TLS identity. A production edge is given a certificate and key; for a laptop
//! or a test, a self-signed one is generated once and kept in the data directory so clients
//! can trust it by file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS files in {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid certificate or key PEM: {0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

pub struct Identity {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

impl Identity {
    /// Uses `<dir>/edge-cert.pem` and `<dir>/edge-key.pem`, creating a self-signed pair for
    /// `localhost`, `127.0.0.1` and `::1` if they do not exist.
    pub fn load_or_create(dir: &Path) -> Result<Self, TlsError> {
        let io = |source| TlsError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let cert_path = dir.join("edge-cert.pem");
        let key_path = dir.join("edge-key.pem");
        if !cert_path.exists() || !key_path.exists() {
            let ck = rcgen::generate_simple_self_signed(vec![
                "localhost".into(),
                "127.0.0.1".into(),
                "::1".into(),
            ])?;
            // Write the key first and the certificate last: the certificate's presence marks
            // a complete pair for concurrent starters.
            std::fs::write(&key_path, ck.key_pair.serialize_pem()).map_err(io)?;
            std::fs::write(&cert_path, ck.cert.pem()).map_err(io)?;
        }
        Ok(Self {
            cert_path,
            key_path,
        })
    }

    pub fn server_config(
        &self,
        transport: quinn::TransportConfig,
    ) -> Result<quinn::ServerConfig, TlsError> {
        let certs =
            CertificateDer::pem_file_iter(&self.cert_path)?.collect::<Result<Vec<_>, _>>()?;
        let key = PrivateKeyDer::from_pem_file(&self.key_path)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // No ALPN: rsocket-py's QUIC client offers none, and rustls refuses a mismatch.
        let tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| TlsError::Quic(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        cfg.transport_config(Arc::new(transport));
        Ok(cfg)
    }
}
