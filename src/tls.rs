//! TLS for relays: one rustls `ClientConfig` per tenant (trust anchors from the
//! system store plus the tenant's `ca_file`), and a brand-new
//! `ClientConnection` for every session. Session resumption is off, so no TLS
//! state ever carries from one session into the next. Knows nothing of the
//! configuration file: callers pass the values.

use crate::base::stream::Transport;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, ClientConnection, DigitallySignedStruct, RootCertStore,
    StreamOwned,
};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub enum TlsError {
    /// The tenant's TLS settings cannot be used (bad ca_file, bad host name).
    Config(String),
    /// The relay's certificate was refused; the string says what to do.
    Certificate(String),
    /// The handshake failed for another reason.
    Handshake(String),
    Timeout,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Config(why) => write!(f, "TLS configuration: {why}"),
            TlsError::Certificate(why) => write!(f, "TLS certificate refused: {why}"),
            TlsError::Handshake(why) => write!(f, "TLS handshake failed: {why}"),
            TlsError::Timeout => f.write_str("TLS handshake timed out"),
        }
    }
}

impl std::error::Error for TlsError {}

/// One ring provider for the whole process.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// The system's trust anchors, loaded once at start and shared by all
/// tenants (one copy, not one per tenant: about 130 kB each).
pub fn system_roots() -> Arc<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        log::warn!("system trust store: {error}");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    log::debug!("system trust store: {added} certificates ({ignored} unusable)");
    Arc::new(roots)
}

/// Builds a tenant's client configuration (once per tenant, at start or
/// reload): with `verify`, the relay's certificate must chain to `system` or
/// to a certificate in `ca_file`; without, `ca_file` is not read.
pub fn client_config(
    verify: bool,
    ca_file: Option<&Path>,
    system: &Arc<RootCertStore>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = if verify {
        let mut roots = Arc::clone(system);
        if let Some(path) = ca_file {
            // Only a tenant with its own anchors gets its own copy of the store.
            let roots = Arc::make_mut(&mut roots);
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
                .map_err(|e| TlsError::Config(format!("ca_file {}: {e}", path.display())))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::Config(format!(
                    "ca_file {} holds no usable PEM certificate",
                    path.display()
                )));
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider())))
            .with_no_client_auth()
    };
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// Runs a fresh handshake over `tcp`, explicitly, so certificate problems
/// surface here with advice rather than later as an I/O error.
pub fn handshake(
    mut tcp: TcpStream,
    config: &Arc<ClientConfig>,
    host: &str,
    timeout: Duration,
) -> Result<StreamOwned<ClientConnection, TcpStream>, TlsError> {
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| TlsError::Config(format!("\"{host}\" is not a valid TLS server name")))?;
    let mut conn = ClientConnection::new(Arc::clone(config), name)
        .map_err(|e| TlsError::Handshake(e.to_string()))?;
    // The handshake as a whole, not each read, is bounded: a relay that
    // trickles its handshake one record at a time is given up on in time.
    let deadline = Instant::now() + timeout;
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(TlsError::Timeout);
        }
        tcp.set_timeout(left)
            .map_err(|e| TlsError::Handshake(e.to_string()))?;
        conn.complete_io(&mut tcp)
            .map_err(explain_handshake_error)?;
    }
    Ok(StreamOwned::new(conn, tcp))
}

fn explain_handshake_error(e: io::Error) -> TlsError {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        return TlsError::Timeout;
    }
    let Some(rustls_error) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return TlsError::Handshake(e.to_string());
    };
    match rustls_error {
        rustls::Error::InvalidCertificate(cert) => TlsError::Certificate(match cert {
            CertificateError::UnknownIssuer => {
                "the relay's certificate is not signed by a trusted CA; \
                 if the relay uses a private CA, put its certificate in ca_file"
                    .into()
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the relay's certificate has expired; the relay's operator must renew it".into()
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "the relay's certificate is not valid for the host name in `relay`; \
                 use the name the certificate was issued for"
                    .into()
            }
            other => format!("{other:?}"),
        }),
        other => TlsError::Handshake(other.to_string()),
    }
}

/// The connection to a relay: plaintext until STARTTLS, or TLS throughout.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

impl Transport for Stream {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.set_timeout(timeout),
            Stream::Tls(s) => s.sock.set_timeout(timeout),
        }
    }
}

/// `tls_verify = no`: the certificate is not checked, but handshake
/// signatures still are (so the session is at least encrypted to the holder of the key).
#[derive(Debug)]
struct AcceptAnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
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

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// A directory of this test's own under the system temp dir.
    fn scratch(test: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pbxmail-tls-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn empty_roots() -> Arc<RootCertStore> {
        Arc::new(RootCertStore::empty())
    }

    fn config_error(result: Result<Arc<ClientConfig>, TlsError>) -> String {
        match result {
            Err(TlsError::Config(why)) => why,
            Err(other) => panic!("not a configuration error: {other}"),
            Ok(_) => panic!("the configuration was accepted"),
        }
    }

    #[test]
    fn ca_file_gets_its_own_store_and_leaves_the_system_one_alone() {
        let dir = scratch("good");
        let ca = rcgen::generate_simple_self_signed(vec!["relay.test".to_string()]).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, ca.cert.pem()).unwrap();
        let system = empty_roots();
        let _config = client_config(true, Some(&path), &system).unwrap();
        assert!(system.is_empty());
        assert_eq!(Arc::strong_count(&system), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_ca_file_the_system_store_is_shared_not_copied() {
        let system = empty_roots();
        let _config = client_config(true, None, &system).unwrap();
        assert_eq!(Arc::strong_count(&system), 2);
    }

    #[test]
    fn missing_ca_file_is_named_in_the_error() {
        let dir = scratch("missing");
        let path = dir.join("absent.pem");
        let why = config_error(client_config(true, Some(&path), &empty_roots()));
        assert!(why.starts_with("ca_file "), "{why}");
        assert!(why.contains(&path.display().to_string()), "{why}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn ca_file_without_a_certificate_is_refused() {
        let dir = scratch("empty");
        let path = dir.join("notes.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let why = config_error(client_config(true, Some(&path), &empty_roots()));
        assert!(why.contains("holds no usable PEM certificate"), "{why}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_verification_ca_file_is_not_read() {
        let dir = scratch("noverify");
        let path = dir.join("absent.pem");
        assert!(client_config(false, Some(&path), &empty_roots()).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
