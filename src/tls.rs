//! TLS for every connection, normal and replication, with libpq's `sslmode` meanings.
//!
//! | sslmode     | TLS            | certificate chain | host name |
//! |-------------|----------------|-------------------|-----------|
//! | disable     | never          | –                 | –         |
//! | prefer      | if offered     | not checked       | no        |
//! | require     | required       | not checked       | no        |
//! | verify-ca   | required       | checked           | no        |
//! | verify-full | required       | checked           | checked   |
//!
//! One [`TlsConnector`] per database serves both the tokio-postgres connections (through
//! [`tokio_postgres::tls::MakeTlsConnect`]) and our own replication connection.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::conninfo::{ConnInfo, SslMode};

/// Why TLS could not be set up (before any connection is made).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA file could not be read or holds no certificate.
    #[error("cannot load sslrootcert {path}: {reason}")]
    RootCert {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A verify mode without any CA to verify against.
    #[error("sslmode={0} needs sslrootcert (a CA file, or \"system\" for the platform store); ~/.postgresql/root.crt does not exist")]
    NoRootCert(SslMode),
    /// rustls refused the configuration.
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client configuration for one database's `sslmode` and `sslrootcert`.
#[derive(Clone)]
pub struct TlsConnector {
    mode: SslMode,
    config: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnector")
            .field("mode", &self.mode)
            .finish()
    }
}

fn load_roots(info: &ConnInfo) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    let path = match &info.sslrootcert {
        Some(p) => p.clone(),
        None => {
            let p = default_root_cert();
            if !p.exists() {
                return Err(TlsError::NoRootCert(info.sslmode));
            }
            p
        }
    };
    let shown = path.display().to_string();
    if path.as_os_str() == "system" {
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
    } else {
        use rustls::pki_types::pem::PemObject;
        let certs = CertificateDer::pem_file_iter(&path).map_err(|e| TlsError::RootCert {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        for cert in certs {
            let cert = cert.map_err(|e| TlsError::RootCert {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
            roots.add(cert).map_err(|e| TlsError::RootCert {
                path: shown.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(TlsError::RootCert {
            path: shown,
            reason: "no certificates found".into(),
        });
    }
    Ok(roots)
}

/// libpq's default root CA file, `~/.postgresql/root.crt`.
fn default_root_cert() -> std::path::PathBuf {
    let home = std::env::var_os("HOME").unwrap_or_default();
    Path::new(&home).join(".postgresql/root.crt")
}

impl TlsConnector {
    /// Builds the connector for one database. Fails early when a verify mode has no usable CA.
    pub fn new(info: &ConnInfo) -> Result<Self, TlsError> {
        let provider = provider();
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        // Like libpq: with a root CA file (given, or ~/.postgresql/root.crt), `require` checks
        // the certificate chain as `verify-ca` does.
        let mode = match info.sslmode {
            SslMode::Require if info.sslrootcert.is_some() || default_root_cert().exists() => {
                SslMode::VerifyCa
            }
            m => m,
        };
        let config = match mode {
            SslMode::Disable => None,
            SslMode::Prefer | SslMode::Require => Some(
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
                    .with_no_client_auth(),
            ),
            SslMode::VerifyCa => {
                let inner = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(load_roots(info)?),
                    provider,
                )
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
                Some(
                    builder
                        .dangerous()
                        .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                        .with_no_client_auth(),
                )
            }
            SslMode::VerifyFull => Some(
                builder
                    .with_root_certificates(load_roots(info)?)
                    .with_no_client_auth(),
            ),
        };
        Ok(TlsConnector {
            mode: info.sslmode,
            config: config.map(Arc::new),
        })
    }

    /// The sslmode this connector enforces.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// Runs the TLS handshake over an established stream (after the server accepted SSLRequest).
    pub async fn handshake<S>(&self, host: &str, stream: S) -> io::Result<TlsStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let config = self.config.clone().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS requested with sslmode=disable",
            )
        })?;
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "invalid TLS server name"))?;
        let s = tokio_rustls::TlsConnector::from(config)
            .connect(name, stream)
            .await?;
        Ok(TlsStream(Box::new(s)))
    }
}

/// Accepts any certificate (sslmode prefer/require), still checking handshake signatures.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Checks the chain against the roots but not the host name (sslmode verify-ca).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// A TLS-wrapped stream, usable by tokio-postgres and by our replication connection.
pub struct TlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    fn channel_binding(&self) -> tokio_postgres::tls::ChannelBinding {
        tokio_postgres::tls::ChannelBinding::none()
    }
}

/// The per-connection half of [`TlsConnector`] that tokio-postgres asks for.
pub struct TlsConnect {
    connector: TlsConnector,
    host: String,
}

impl tokio_postgres::tls::MakeTlsConnect<tokio_postgres::Socket> for TlsConnector {
    type Stream = TlsStream<tokio_postgres::Socket>;
    type TlsConnect = TlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<TlsConnect> {
        Ok(TlsConnect {
            connector: self.clone(),
            host: domain.to_string(),
        })
    }
}

impl tokio_postgres::tls::TlsConnect<tokio_postgres::Socket> for TlsConnect {
    type Stream = TlsStream<tokio_postgres::Socket>;
    type Error = io::Error;
    type Future = BoxFuture<'static, io::Result<Self::Stream>>;

    fn connect(self, stream: tokio_postgres::Socket) -> Self::Future {
        Box::pin(async move { self.connector.handshake(&self.host, stream).await })
    }
}
