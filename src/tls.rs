//! TLS for relays: one rustls `ClientConfig` per tenant (trust anchors from the
//! system store plus the tenant's `ca_file`), and a brand-new
//! `ClientConnection` for every session. Session resumption is off, so no TLS
//! state ever carries from one session into the next. Knows nothing of the
//! configuration file: callers pass the values. A failed handshake becomes a
//! typed kind (`CertificateProblem`, `HandshakeProblem`, `Incompatibility`)
//! that says in words what happened, never in rustls' Debug text.

use crate::base::stream::Transport;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{Resumption, WebPkiServerVerifier};
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

/// A TLS failure with a relay. Each kind says in words what happened (its
/// `Display`); what the admin should do about it is advice.rs's to say, by
/// matching the kind.
#[derive(Debug)]
pub enum TlsError {
    /// The tenant's TLS settings cannot be used (bad ca_file, bad host name).
    Config(String),
    /// The relay's certificate was refused.
    Certificate(CertificateProblem),
    /// The relay does not speak TLS here, broke off, or broke the protocol.
    Handshake(HandshakeProblem),
    /// Both sides speak TLS but agree on no version or cipher suite: no
    /// other `tls =` mode helps, the relay's TLS settings must change.
    Incompatible(Incompatibility),
    Timeout,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TlsError::Config(why) => write!(f, "TLS configuration: {why}"),
            TlsError::Certificate(problem) => write!(f, "TLS certificate refused: {problem}"),
            TlsError::Handshake(problem) => write!(f, "TLS handshake failed: {problem}"),
            TlsError::Incompatible(problem) => write!(f, "TLS handshake failed: {problem}"),
            TlsError::Timeout => f.write_str("TLS handshake timed out"),
        }
    }
}

impl std::error::Error for TlsError {}

/// Why the relay's certificate was refused. Each kind names the fix that
/// works for it, for advice.rs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateProblem {
    /// Signed by its own key and by no CA we trust. Fix: put this very
    /// certificate (PEM) in ca_file.
    SelfSigned,
    /// The relay presents a CA certificate (basicConstraints CA:TRUE) as its
    /// own, as `openssl req -x509` makes by default. ca_file cannot help: a
    /// CA certificate is never accepted as a server's. Fix: the relay needs a
    /// server certificate (CA:FALSE), self-signed or signed by that CA (then
    /// the CA goes in ca_file); tls_verify = no is the insecure last resort.
    CaUsedAsEndEntity,
    /// Past its notAfter. Fix: the relay's operator renews it (or this
    /// machine's clock is far ahead).
    Expired,
    /// Before its notBefore. Fix: this machine's clock (NTP), or the relay's
    /// certificate was issued with a future date.
    NotYetValid,
    /// Not issued for the name in `relay`. Fix: set `relay` to one of the
    /// names the certificate carries (`presented`).
    WrongName {
        expected: String,
        presented: Vec<String>,
    },
    /// Signed by a CA we do not trust. Fix: put the CA certificate that
    /// signed it (PEM) in ca_file, or have the relay send its intermediates.
    UnknownIssuer,
    /// A signature in the chain does not verify (e.g. a regenerated
    /// certificate with the name of the one in ca_file). Fix: put the relay's
    /// current CA (or self-signed certificate) in ca_file.
    BadSignature,
    /// Revoked by its CA. Fix: the relay's operator replaces it.
    Revoked,
    /// Signed with an algorithm we do not accept (SHA-1, MD5, small RSA).
    /// Fix: the relay's operator reissues it with SHA-256 or better.
    UnsupportedAlgorithm,
    /// Issued for another purpose (extended key usage without serverAuth).
    /// Fix: the relay needs a certificate issued for TLS servers.
    WrongPurpose,
    /// Not a well-formed certificate. Fix: the relay's operator.
    BadEncoding,
    /// The relay sent no certificate at all.
    NonePresented,
    /// Any other refusal, in words.
    Other(String),
}

impl fmt::Display for CertificateProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertificateProblem::SelfSigned => {
                f.write_str("the relay's certificate is self-signed: no trusted CA vouches for it")
            }
            CertificateProblem::CaUsedAsEndEntity => f.write_str(
                "the relay presents a CA certificate (CA:TRUE) as its own server certificate, \
                 which is never accepted, even from ca_file",
            ),
            CertificateProblem::Expired => f.write_str("the relay's certificate has expired"),
            CertificateProblem::NotYetValid => {
                f.write_str("the relay's certificate is not valid yet (check this machine's clock)")
            }
            CertificateProblem::WrongName {
                expected,
                presented,
            } => {
                write!(
                    f,
                    "the relay's certificate is not valid for the host name in `relay` ({expected})"
                )?;
                if !presented.is_empty() {
                    write!(f, "; it is issued for {}", presented.join(", "))?;
                }
                Ok(())
            }
            CertificateProblem::UnknownIssuer => {
                f.write_str("the relay's certificate is not signed by a trusted CA")
            }
            CertificateProblem::BadSignature => f.write_str(
                "a signature on the relay's certificate does not verify: \
                 it was not signed by the certificate it names as its issuer",
            ),
            CertificateProblem::Revoked => {
                f.write_str("the relay's certificate has been revoked by its CA")
            }
            CertificateProblem::UnsupportedAlgorithm => f.write_str(
                "the relay's certificate is signed with an algorithm pbxmail does not accept \
                 (such as SHA-1 or MD5)",
            ),
            CertificateProblem::WrongPurpose => {
                f.write_str("the relay's certificate is not issued for use by a TLS server")
            }
            CertificateProblem::BadEncoding => {
                f.write_str("the relay's certificate is not a well-formed certificate")
            }
            CertificateProblem::NonePresented => f.write_str("the relay sent no certificate"),
            CertificateProblem::Other(words) => {
                write!(f, "the relay's certificate was refused: {words}")
            }
        }
    }
}

/// A handshake that failed before the two sides could compare versions
/// and ciphers, or broke off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeProblem {
    /// The relay answered in plain text (an SMTP greeting) where TLS was
    /// due: on an implicit-TLS connection to a plain or STARTTLS port. Fix:
    /// tls = starttls (port 587/25), or the relay's implicit-TLS port (465).
    NotTls,
    /// The relay closed the connection during the handshake.
    Closed,
    /// The relay ended the handshake with a TLS alert, named in words.
    Alert(String),
    /// The relay broke the TLS protocol; what it did, in words.
    Protocol(String),
    /// The connection failed underneath (the system's words).
    Io(String),
}

impl fmt::Display for HandshakeProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeProblem::NotTls => f.write_str(
                "the relay answered in plain text, not TLS: it does not speak TLS \
                 from the first byte on this port",
            ),
            HandshakeProblem::Closed => {
                f.write_str("the relay closed the connection during the TLS handshake")
            }
            HandshakeProblem::Alert(alert) => {
                write!(
                    f,
                    "the relay ended the handshake with the TLS alert \"{alert}\""
                )
            }
            HandshakeProblem::Protocol(what) => {
                write!(f, "the relay broke the TLS protocol ({what})")
            }
            HandshakeProblem::Io(why) => write!(f, "connection error: {why}"),
        }
    }
}

/// The relay speaks TLS, but nothing both sides accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incompatibility {
    /// Only TLS 1.1 or older (SSL 3, TLS 1.0): pbxmail requires TLS 1.2 or
    /// 1.3, as RFC 8996 does. Not a `tls =` mode problem. Fix: the relay's
    /// operator enables TLS 1.2; tls = none on a trusted network only.
    OldProtocolVersion,
    /// No cipher suite (or other parameter) in common; also what a relay's
    /// handshake_failure alert means. Fix: the relay's operator enables a
    /// modern suite (ECDHE with AES-GCM or ChaCha20-Poly1305).
    NoSharedCipher,
    /// Another mismatch, in words.
    Other(String),
}

impl fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Incompatibility::OldProtocolVersion => f.write_str(
                "the relay only speaks an old TLS version (TLS 1.1 or older); \
                 pbxmail requires TLS 1.2 or 1.3",
            ),
            Incompatibility::NoSharedCipher => f.write_str(
                "the relay and pbxmail have no cipher suite in common \
                 (the relay refused every one offered)",
            ),
            Incompatibility::Other(words) => {
                write!(f, "the relay and pbxmail cannot agree: {words}")
            }
        }
    }
}

impl TlsError {
    /// What a rustls error means, in kinds and words (never its Debug text).
    pub fn from_rustls(error: &rustls::Error) -> TlsError {
        use rustls::{AlertDescription as Alert, Error, InvalidMessage, PeerIncompatible};
        match error {
            Error::InvalidCertificate(cert) => TlsError::Certificate(certificate_problem(cert)),
            Error::NoCertificatesPresented => {
                TlsError::Certificate(CertificateProblem::NonePresented)
            }
            // The first bytes were no TLS record: "220 ..." is content type 0x32.
            Error::InvalidMessage(
                InvalidMessage::InvalidContentType | InvalidMessage::UnknownProtocolVersion,
            ) => TlsError::Handshake(HandshakeProblem::NotTls),
            Error::PeerIncompatible(PeerIncompatible::ServerDoesNotSupportTls12Or13)
            | Error::AlertReceived(Alert::ProtocolVersion) => {
                TlsError::Incompatible(Incompatibility::OldProtocolVersion)
            }
            Error::PeerIncompatible(PeerIncompatible::NoCipherSuitesInCommon)
            | Error::AlertReceived(Alert::HandshakeFailure | Alert::InsufficientSecurity) => {
                TlsError::Incompatible(Incompatibility::NoSharedCipher)
            }
            Error::PeerIncompatible(other) => {
                TlsError::Incompatible(Incompatibility::Other(words(&format!("{other:?}"))))
            }
            Error::AlertReceived(alert) => {
                TlsError::Handshake(HandshakeProblem::Alert(words(&format!("{alert:?}"))))
            }
            Error::General(what) => TlsError::Handshake(HandshakeProblem::Protocol(what.clone())),
            Error::InvalidMessage(what) => {
                TlsError::Handshake(HandshakeProblem::Protocol(words(&format!("{what:?}"))))
            }
            Error::PeerMisbehaved(what) => {
                TlsError::Handshake(HandshakeProblem::Protocol(words(&format!("{what:?}"))))
            }
            other => TlsError::Handshake(HandshakeProblem::Protocol(words(&format!("{other:?}")))),
        }
    }
}

fn certificate_problem(error: &CertificateError) -> CertificateProblem {
    match error {
        CertificateError::Other(other) => {
            // Our verifier's own finding, or webpki's, which rustls passes on
            // as an opaque error whose text is the variant's name.
            if other.0.downcast_ref::<SelfSigned>().is_some() {
                return CertificateProblem::SelfSigned;
            }
            let name = other.0.to_string();
            match name.split(['(', ' ', '{']).next().unwrap_or_default() {
                "CaUsedAsEndEntity" => CertificateProblem::CaUsedAsEndEntity,
                _ => CertificateProblem::Other(words(&name)),
            }
        }
        CertificateError::UnknownIssuer => CertificateProblem::UnknownIssuer,
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            CertificateProblem::Expired
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            CertificateProblem::NotYetValid
        }
        CertificateError::NotValidForName => CertificateProblem::WrongName {
            expected: String::new(),
            presented: Vec::new(),
        },
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => CertificateProblem::WrongName {
            expected: expected.to_str().into_owned(),
            presented: presented.iter().map(|name| presented_name(name)).collect(),
        },
        CertificateError::BadSignature => CertificateProblem::BadSignature,
        CertificateError::Revoked => CertificateProblem::Revoked,
        #[allow(deprecated)]
        CertificateError::UnsupportedSignatureAlgorithm
        | CertificateError::UnsupportedSignatureAlgorithmContext { .. }
        | CertificateError::UnsupportedSignatureAlgorithmForPublicKeyContext { .. } => {
            CertificateProblem::UnsupportedAlgorithm
        }
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            CertificateProblem::WrongPurpose
        }
        CertificateError::BadEncoding => CertificateProblem::BadEncoding,
        other => CertificateProblem::Other(words(&format!("{other:?}"))),
    }
}

/// A name the certificate carries, as webpki reports it (its Debug form,
/// `DnsName("mx.example")`), as the name alone; other kinds as words.
fn presented_name(debug: &str) -> String {
    debug
        .strip_prefix("DnsName(\"")
        .and_then(|rest| rest.strip_suffix("\")"))
        .map_or_else(|| words(debug), str::to_string)
}

/// A Rust variant name as words, for the kinds rustls may add later:
/// `SelectedUnofferedCipherSuite { .. }` becomes "selected unoffered cipher
/// suite". Only the leading name is kept: the data behind it is Debug text.
fn words(debug: &str) -> String {
    let name: String = debug
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    let mut out = String::with_capacity(name.len() + 8);
    for c in name.chars() {
        if c.is_ascii_uppercase() && !out.is_empty() {
            out.push(' ');
        }
        out.push(c.to_ascii_lowercase());
    }
    if out.is_empty() {
        out.push_str("an unnamed error");
    }
    out
}

/// Our verifier's finding that an unknown issuer is the certificate itself.
#[derive(Debug)]
struct SelfSigned;

impl fmt::Display for SelfSigned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("self-signed certificate")
    }
}

impl std::error::Error for SelfSigned {}

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
            let fail = |e: &dyn std::fmt::Display| {
                TlsError::Config(format!("ca_file {}: {e}", path.display()))
            };
            // Bounded and regular files only: a FIFO or /dev/zero here
            // must not hang or exhaust the tenant thread.
            let pem = crate::base::fs::read_small_file(path, crate::base::fs::MAX_CA_FILE)
                .map_err(|e| fail(&e))?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| fail(&e))?;
            let (added, _) = roots.add_parsable_certificates(certs);
            if added == 0 {
                return Err(TlsError::Config(format!(
                    "ca_file {} holds no usable PEM certificate",
                    path.display()
                )));
            }
        }
        match WebPkiServerVerifier::builder_with_provider(Arc::clone(&roots), provider()).build() {
            Ok(inner) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NamesSelfSigned { inner }))
                .with_no_client_auth(),
            // No anchor at all (no system store, no ca_file): every relay is
            // an unknown issuer, and the plain verifier says so.
            Err(_) => builder.with_root_certificates(roots).with_no_client_auth(),
        }
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
    let mut conn =
        ClientConnection::new(Arc::clone(config), name).map_err(|e| TlsError::from_rustls(&e))?;
    // The handshake as a whole, not each read, is bounded: a relay that
    // trickles its handshake one record at a time is given up on in time.
    // A timeout past what the clock holds bounds each read only.
    let deadline = Instant::now().checked_add(timeout);
    while conn.is_handshaking() {
        let left = deadline.map_or(timeout, |d| d.saturating_duration_since(Instant::now()));
        if left.is_zero() {
            return Err(TlsError::Timeout);
        }
        tcp.set_timeout(left)
            .map_err(|e| TlsError::Handshake(HandshakeProblem::Io(e.to_string())))?;
        conn.complete_io(&mut tcp)
            .map_err(explain_handshake_error)?;
    }
    Ok(StreamOwned::new(conn, tcp))
}

fn explain_handshake_error(e: io::Error) -> TlsError {
    if let Some(rustls_error) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return TlsError::from_rustls(rustls_error);
    }
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => TlsError::Timeout,
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => TlsError::Handshake(HandshakeProblem::Closed),
        _ => TlsError::Handshake(HandshakeProblem::Io(e.to_string())),
    }
}

/// The system's certificate verifier, with one finding of ours on top: an
/// unknown issuer that is the certificate itself is named self-signed, the
/// case an admin meets most and fixes differently (the certificate itself
/// goes in ca_file). Every verdict is the inner verifier's.
#[derive(Debug)]
struct NamesSelfSigned {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for NamesSelfSigned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verdict {
            Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
                if intermediates.is_empty() && signs_itself(end_entity, server_name, now) =>
            {
                Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                    rustls::OtherError(Arc::new(SelfSigned)),
                )))
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether `cert` verifies with itself as the only trust anchor (its
/// issuer is itself and its own key signed it); a name that does not
/// match still leaves it self-signed.
fn signs_itself(cert: &CertificateDer<'_>, server_name: &ServerName<'_>, now: UnixTime) -> bool {
    let mut own = RootCertStore::empty();
    if own.add(cert.clone().into_owned()).is_err() {
        return false;
    }
    let Ok(alone) = WebPkiServerVerifier::builder_with_provider(Arc::new(own), provider()).build()
    else {
        return false;
    };
    matches!(
        alone.verify_server_cert(cert, &[], server_name, &[], now),
        Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            ))
    )
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

    /// Read on the tenant thread: a FIFO must not block it, /dev/zero must
    /// not fill its memory.
    #[test]
    fn ca_file_that_is_a_fifo_or_a_device_is_refused_at_once() {
        let dir = scratch("special");
        let fifo = dir.join("ca.fifo");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).unwrap();
        for (path, what) in [
            (fifo.as_path(), "a FIFO"),
            (Path::new("/dev/zero"), "a character device"),
        ] {
            let why = config_error(client_config(true, Some(path), &empty_roots()));
            let named = format!("ca_file {}: {what}, not a regular file", path.display());
            assert!(why.starts_with(&named), "{why}");
        }
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

    /// Real handshakes on loopback against a relay thread: a rustls server
    /// presenting an rcgen-made certificate, or scripted bytes.
    mod handshakes {
        use super::*;
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        use rustls::{ServerConfig, ServerConnection};
        use std::io::Read;
        use std::net::TcpListener;

        const RELAY: &str = "relay.test";

        struct Cert {
            der: CertificateDer<'static>,
            key: KeyPair,
        }

        fn ca(name: &str) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let key = KeyPair::generate().unwrap();
            let der = params.self_signed(&key).unwrap().der().clone();
            (der, Issuer::new(params, key))
        }

        fn leaf(
            names: &[&str],
            issuer: Option<&Issuer<'_, KeyPair>>,
            edit: impl FnOnce(&mut CertificateParams),
        ) -> Cert {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, RELAY);
            edit(&mut params);
            let key = KeyPair::generate().unwrap();
            let cert = match issuer {
                Some(issuer) => params.signed_by(&key, issuer).unwrap(),
                None => params.self_signed(&key).unwrap(),
            };
            Cert {
                der: cert.der().clone(),
                key,
            }
        }

        fn roots(anchors: &[&CertificateDer<'static>]) -> Arc<RootCertStore> {
            let mut roots = RootCertStore::empty();
            for anchor in anchors {
                roots.add((*anchor).clone()).unwrap();
            }
            Arc::new(roots)
        }

        /// A relay presenting `cert`, with the handshake run to its end.
        fn presenting(cert: &Cert) -> impl FnOnce(TcpStream) + Send + 'static {
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key.serialize_der()));
            let config = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(vec![cert.der.clone()], key)
                .unwrap();
            move |mut tcp| {
                let mut conn = ServerConnection::new(Arc::new(config)).unwrap();
                while conn.is_handshaking() {
                    if conn.complete_io(&mut tcp).is_err() {
                        break;
                    }
                }
            }
        }

        /// A relay that reads the ClientHello, answers `bytes`, and waits
        /// for the client to hang up.
        fn answering(bytes: &'static [u8]) -> impl FnOnce(TcpStream) + Send + 'static {
            move |mut tcp| {
                let mut hello = [0u8; 4096];
                let _ = tcp.read(&mut hello);
                let _ = tcp.write_all(bytes);
                let _ = io::copy(&mut tcp, &mut io::sink());
            }
        }

        fn against(
            relay: impl FnOnce(TcpStream) + Send + 'static,
            verify: bool,
            system: Arc<RootCertStore>,
        ) -> Result<(), TlsError> {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let thread = std::thread::spawn(move || {
                let (tcp, _) = listener.accept().unwrap();
                tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                relay(tcp);
            });
            let config = client_config(verify, None, &system).unwrap();
            let tcp = TcpStream::connect(addr).unwrap();
            let result = handshake(tcp, &config, RELAY, Duration::from_secs(10)).map(|_| ());
            thread.join().unwrap();
            result
        }

        /// What an admin reads: words, never a Rust variant in Debug form.
        fn assert_words(error: &TlsError) -> String {
            let text = error.to_string();
            let camel = text
                .split(|c: char| !c.is_ascii_alphanumeric())
                .any(|word| {
                    word.as_bytes()
                        .windows(2)
                        .any(|w| w[0].is_ascii_lowercase() && w[1].is_ascii_uppercase())
                });
            assert!(
                !camel && !text.contains("Error") && !text.contains('{'),
                "{text}"
            );
            text
        }

        fn unrelated_anchor() -> Arc<RootCertStore> {
            roots(&[&ca("some public CA").0])
        }

        #[test]
        fn self_signed_certificate_is_named_so_and_works_from_ca_file() {
            let cert = leaf(&[RELAY], None, |_| {});
            let error = against(presenting(&cert), true, unrelated_anchor()).unwrap_err();
            assert!(
                matches!(error, TlsError::Certificate(CertificateProblem::SelfSigned)),
                "{error:?}"
            );
            assert!(assert_words(&error).contains("self-signed"));
            // The fix that works: the certificate itself as a trust anchor.
            assert!(against(presenting(&cert), true, roots(&[&cert.der])).is_ok());
        }

        #[test]
        fn ca_certificate_used_as_the_relays_own_is_named_so() {
            // What `openssl req -x509` makes: self-signed and CA:TRUE. Even
            // trusted (in ca_file) it is refused as a server certificate.
            let cert = leaf(&[RELAY], None, |p| {
                p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)
            });
            for anchors in [unrelated_anchor(), roots(&[&cert.der])] {
                let error = against(presenting(&cert), true, anchors).unwrap_err();
                assert!(
                    matches!(
                        error,
                        TlsError::Certificate(CertificateProblem::CaUsedAsEndEntity)
                    ),
                    "{error:?}"
                );
                assert!(assert_words(&error).contains("CA certificate"));
            }
        }

        #[test]
        fn expired_certificate_is_named_so() {
            let (root, issuer) = ca("test CA");
            let cert = leaf(&[RELAY], Some(&issuer), |p| {
                p.not_before = rcgen::date_time_ymd(2001, 1, 1);
                p.not_after = rcgen::date_time_ymd(2001, 12, 31);
            });
            let error = against(presenting(&cert), true, roots(&[&root])).unwrap_err();
            assert!(
                matches!(error, TlsError::Certificate(CertificateProblem::Expired)),
                "{error:?}"
            );
            assert!(assert_words(&error).contains("expired"));
        }

        #[test]
        fn not_yet_valid_certificate_is_named_so() {
            let (root, issuer) = ca("test CA");
            let cert = leaf(&[RELAY], Some(&issuer), |p| {
                p.not_before = rcgen::date_time_ymd(2999, 1, 1);
                p.not_after = rcgen::date_time_ymd(3000, 1, 1);
            });
            let error = against(presenting(&cert), true, roots(&[&root])).unwrap_err();
            assert!(
                matches!(
                    error,
                    TlsError::Certificate(CertificateProblem::NotYetValid)
                ),
                "{error:?}"
            );
            assert!(assert_words(&error).contains("not valid yet"));
        }

        #[test]
        fn certificate_for_another_name_names_both() {
            let (root, issuer) = ca("test CA");
            let cert = leaf(&["other.test"], Some(&issuer), |_| {});
            let error = against(presenting(&cert), true, roots(&[&root])).unwrap_err();
            let TlsError::Certificate(CertificateProblem::WrongName {
                expected,
                presented,
            }) = &error
            else {
                panic!("{error:?}");
            };
            assert_eq!(expected, RELAY);
            assert_eq!(presented, &["other.test".to_string()]);
            let text = assert_words(&error);
            assert!(
                text.contains("host name") && text.contains("other.test"),
                "{text}"
            );
        }

        #[test]
        fn certificate_from_an_untrusted_ca_is_an_unknown_issuer() {
            let (_, issuer) = ca("private CA");
            let cert = leaf(&[RELAY], Some(&issuer), |_| {});
            let error = against(presenting(&cert), true, unrelated_anchor()).unwrap_err();
            assert!(
                matches!(
                    error,
                    TlsError::Certificate(CertificateProblem::UnknownIssuer)
                ),
                "{error:?}"
            );
            assert!(assert_words(&error).contains("trusted CA"));
        }

        #[test]
        fn certificate_signed_by_another_key_of_a_trusted_name_is_a_bad_signature() {
            // A regenerated CA with the name of the one the admin trusts.
            let (trusted, _) = ca("test CA");
            let (_, impostor) = ca("test CA");
            let cert = leaf(&[RELAY], Some(&impostor), |_| {});
            let error = against(presenting(&cert), true, roots(&[&trusted])).unwrap_err();
            assert!(
                matches!(
                    error,
                    TlsError::Certificate(CertificateProblem::BadSignature)
                ),
                "{error:?}"
            );
            assert_words(&error);
        }

        /// A TLS 1.0-only relay answers our ClientHello with a TLS 1.0
        /// ServerHello. That is a version problem, not a wrong `tls =` mode.
        #[test]
        fn tls_1_0_only_relay_is_an_old_version_not_a_wrong_mode() {
            const SERVER_HELLO_TLS10: &[u8] = &[
                0x16, 0x03, 0x01, 0x00, 0x2a, // handshake record, 42 octets
                0x02, 0x00, 0x00, 0x26, // ServerHello, 38 octets
                0x03, 0x01, // TLS 1.0
                0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
                0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
                0x11, 0x11, 0x11, 0x11, // random
                0x00, // no session id
                0x00, 0x2f, // TLS_RSA_WITH_AES_128_CBC_SHA
                0x00, // no compression
            ];
            // Or, from a stricter server, a protocol_version alert.
            const ALERT_PROTOCOL_VERSION: &[u8] = &[0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x46];
            for answer in [SERVER_HELLO_TLS10, ALERT_PROTOCOL_VERSION] {
                let error = against(answering(answer), true, unrelated_anchor()).unwrap_err();
                assert!(
                    matches!(
                        error,
                        TlsError::Incompatible(Incompatibility::OldProtocolVersion)
                    ),
                    "{error:?}"
                );
                let text = assert_words(&error);
                assert!(text.contains("TLS 1.2"), "{text}");
                assert!(!text.contains("plain"), "{text}");
            }
        }

        #[test]
        fn handshake_failure_alert_is_no_shared_cipher() {
            const ALERT_HANDSHAKE_FAILURE: &[u8] = &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];
            let error =
                against(answering(ALERT_HANDSHAKE_FAILURE), true, unrelated_anchor()).unwrap_err();
            assert!(
                matches!(
                    error,
                    TlsError::Incompatible(Incompatibility::NoSharedCipher)
                ),
                "{error:?}"
            );
            assert_words(&error);
        }

        #[test]
        fn other_alerts_are_named_in_words() {
            const ALERT_INTERNAL_ERROR: &[u8] = &[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x50];
            let error =
                against(answering(ALERT_INTERNAL_ERROR), true, unrelated_anchor()).unwrap_err();
            assert!(
                matches!(error, TlsError::Handshake(HandshakeProblem::Alert(_))),
                "{error:?}"
            );
            assert!(assert_words(&error).contains("internal error"));
        }

        /// Implicit TLS to a port that speaks plain SMTP: the greeting comes
        /// back where a ServerHello was due.
        #[test]
        fn plain_text_on_an_implicit_tls_port_is_not_tls() {
            let error = against(
                answering(b"220 relay.test ESMTP Postfix\r\n"),
                true,
                unrelated_anchor(),
            )
            .unwrap_err();
            assert!(
                matches!(error, TlsError::Handshake(HandshakeProblem::NotTls)),
                "{error:?}"
            );
            assert!(assert_words(&error).contains("plain text"));
        }

        #[test]
        fn relay_hanging_up_mid_handshake_is_closed() {
            let error = against(drop, true, unrelated_anchor()).unwrap_err();
            assert!(
                matches!(error, TlsError::Handshake(HandshakeProblem::Closed)),
                "{error:?}"
            );
            assert_words(&error);
        }

        #[test]
        fn without_verification_a_self_signed_relay_is_accepted() {
            let cert = leaf(&["other.test"], None, |_| {});
            assert!(against(presenting(&cert), false, unrelated_anchor()).is_ok());
        }

        #[test]
        fn a_timeout_past_the_clock_does_not_panic() {
            let cert = leaf(&[RELAY], None, |_| {});
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let relay = presenting(&cert);
            let thread = std::thread::spawn(move || relay(listener.accept().unwrap().0));
            let config = client_config(true, None, &roots(&[&cert.der])).unwrap();
            let tcp = TcpStream::connect(addr).unwrap();
            assert!(handshake(tcp, &config, RELAY, Duration::MAX).is_ok());
            thread.join().unwrap();
        }

        #[test]
        fn words_keep_only_the_name_of_a_variant() {
            assert_eq!(
                words("SelectedUnofferedCipherSuite"),
                "selected unoffered cipher suite"
            );
            assert_eq!(words("Unknown(123)"), "unknown");
            assert_eq!(words("Other(OtherError(CaUsedAsEndEntity))"), "other");
            assert_eq!(words("(x)"), "an unnamed error");
            assert_eq!(presented_name("DnsName(\"mx.example\")"), "mx.example");
            assert_eq!(presented_name("IpAddress([127, 0, 0, 1])"), "ip address");
        }
    }
}
