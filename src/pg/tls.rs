//! TLS for every connection walshuttle makes, with rustls (ring as the one crypto
//! provider of the process).
//!
//! The `sslmode` and `sslrootcert` settings follow libpq:
//!
//! | `sslmode` | TLS | certificate check |
//! |---|---|---|
//! | `disable` | never | — |
//! | `prefer` (default) | if the server offers it, else plain | none |
//! | `require` | always | none (as libpq: with an explicit `sslrootcert`, the chain, like `verify-ca`) |
//! | `verify-ca` | always | chain to `sslrootcert`, any host name |
//! | `verify-full` | always | chain to `sslrootcert` and the host name |
//!
//! Without `sslrootcert`, the `verify-*` modes read `~/.postgresql/root.crt`, as libpq
//! does. tokio-postgres's own parser knows only `disable`/`prefer`/`require` and no
//! `sslrootcert`, so [`extract_settings`] takes both out of the connection string first.
//!
//! Ordinary sessions use [`MakeRustlsConnect`] (tokio-postgres's TLS hook); the
//! replication client negotiates with [`negotiate`] itself.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SslMode {
    /// Never TLS.
    Disable,
    /// TLS when the server offers it, plain otherwise; no certificate check.
    #[default]
    Prefer,
    /// Always TLS; no certificate check unless `sslrootcert` is given.
    Require,
    /// Always TLS; the server certificate must chain to the root certificate.
    VerifyCa,
    /// Always TLS; chain as `VerifyCa`, and the certificate must name the host.
    VerifyFull,
}

impl SslMode {
    /// The spelling used in connection strings.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    fn parse(value: &str) -> Result<SslMode, String> {
        match value {
            "disable" => Ok(SslMode::Disable),
            "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            // Echo the value only when it is a plain word: a malformed string could
            // carry the rest of the connection string, password included.
            other if other.len() <= 24 && other.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => Err(format!(
                "sslmode `{other}` is not supported: use disable, prefer, require, verify-ca or verify-full"
            )),
            _ => Err(
                "this sslmode is not supported: use disable, prefer, require, verify-ca or verify-full".to_string(),
            ),
        }
    }

    /// The closest mode tokio-postgres knows (it decides whether TLS is mandatory;
    /// the certificate checks are ours).
    pub fn driver_mode(self) -> tokio_postgres::config::SslMode {
        match self {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                tokio_postgres::config::SslMode::Require
            }
        }
    }

    /// Whether a server that refuses TLS must be refused in turn.
    pub fn tls_required(self) -> bool {
        !matches!(self, SslMode::Disable | SslMode::Prefer)
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The TLS part of one connection string.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// `sslmode`, `prefer` when not given.
    pub mode: SslMode,
    /// `sslrootcert`: PEM file of the certificate authorities to trust.
    pub root_cert: Option<PathBuf>,
}

/// How the server certificate is checked, derived from [`TlsSettings`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Check {
    /// Any certificate (libpq's `prefer`/`require`): encryption, no authentication.
    Nothing,
    /// The chain up to a trusted root, not the name.
    Chain,
    /// The chain and the host name.
    ChainAndName,
}

impl TlsSettings {
    fn check(&self) -> Check {
        match self.mode {
            SslMode::Disable | SslMode::Prefer => Check::Nothing,
            // libpq: "if a root CA file exists, sslmode=require behaves like verify-ca".
            SslMode::Require if self.root_cert.is_some() => Check::Chain,
            SslMode::Require => Check::Nothing,
            SslMode::VerifyCa => Check::Chain,
            SslMode::VerifyFull => Check::ChainAndName,
        }
    }

    /// Builds the rustls client configuration for these settings: reads the root
    /// certificates when the mode verifies. Errors are one line saying what to fix.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let provider = crypto_provider();
        let verifier: Arc<dyn ServerCertVerifier> = match self.check() {
            Check::Nothing => Arc::new(AcceptAnyCertificate(provider.clone())),
            check => {
                let roots = self.root_store()?;
                let webpki =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| format!("cannot use the root certificates: {e}"))?;
                if check == Check::Chain {
                    Arc::new(ChainOnly(webpki))
                } else {
                    webpki
                }
            }
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(Arc::new(config))
    }

    fn root_store(&self) -> Result<RootCertStore, String> {
        let path = match &self.root_cert {
            Some(path) => path.clone(),
            None => {
                let default = default_root_cert();
                match default {
                    Some(path) if path.exists() => path,
                    _ => {
                        return Err(format!(
                            "sslmode={} needs the certificate of the CA that signed the server's certificate, \
                             and no sslrootcert is given (nor is there a {}): add sslrootcert=/path/to/ca.pem \
                             to the connection string",
                            self.mode,
                            default
                                .map(|p| p.display().to_string())
                                .unwrap_or_else(|| "~/.postgresql/root.crt".into())
                        ))
                    }
                }
            }
        };
        load_roots(&path)
    }
}

fn default_root_cert() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").filter(|h| !h.is_empty())?;
    Some(Path::new(&home).join(".postgresql").join("root.crt"))
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let shown = path.display();
    let text = std::fs::read(path).map_err(|e| format!("cannot read sslrootcert {shown}: {e}"))?;
    let mut roots = RootCertStore::empty();
    let mut found = 0usize;
    for cert in CertificateDer::pem_slice_iter(&text) {
        let cert = cert.map_err(|e| format!("sslrootcert {shown} is not a valid PEM file: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("sslrootcert {shown} holds an unusable certificate: {e}"))?;
        found += 1;
    }
    if found == 0 {
        return Err(format!(
            "sslrootcert {shown} holds no certificate (expected PEM blocks starting with -----BEGIN CERTIFICATE-----)"
        ));
    }
    Ok(roots)
}

/// The process-wide crypto provider (ring), installed as rustls's default once.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            // Another part of the process may have installed it first: use that one.
            let _ = rustls::crypto::ring::default_provider().install_default();
            CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
        })
        .clone()
}

// ---------------------------------------------------------------------------
// Connection-string handling
// ---------------------------------------------------------------------------

/// Takes `sslmode` and `sslrootcert` out of a connection string (URL query
/// parameters or key/value pairs), returning the rest for tokio-postgres and the TLS
/// settings. A string that does not tokenize is returned unchanged, so that
/// tokio-postgres reports the syntax error.
pub fn extract_settings(text: &str) -> Result<(String, TlsSettings), String> {
    let mut settings = TlsSettings::default();
    let rest = if let Some(after_scheme) = ["postgresql://", "postgres://"]
        .iter()
        .find_map(|p| text.strip_prefix(p))
    {
        let prefix_len = text.len() - after_scheme.len();
        extract_from_url(text, prefix_len, &mut settings)?
    } else {
        extract_from_key_values(text, &mut settings)?
    };
    Ok((rest, settings))
}

fn apply(key: &str, value: &str, settings: &mut TlsSettings) -> Result<bool, String> {
    match key {
        "sslmode" => {
            settings.mode = SslMode::parse(value)?;
            Ok(true)
        }
        "sslrootcert" => {
            if value == "system" {
                return Err(
                    "sslrootcert=system is not supported: give the path of a PEM file holding the CA certificate"
                        .into(),
                );
            }
            settings.root_cert = if value.is_empty() {
                None
            } else {
                Some(expand_home(value))
            };
            Ok(true)
        }
        "sslcert" | "sslkey" | "sslpassword" => Err(format!(
            "{key} is not supported: walshuttle does not send client certificates; \
             authenticate with a password (sslmode and sslrootcert still apply)"
        )),
        _ => Ok(false),
    }
}

fn expand_home(value: &str) -> PathBuf {
    if let Some(rest) = value.strip_prefix("~/") {
        if let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            return Path::new(&home).join(rest);
        }
    }
    PathBuf::from(value)
}

fn extract_from_url(
    text: &str,
    prefix_len: usize,
    settings: &mut TlsSettings,
) -> Result<String, String> {
    // Mirrors tokio-postgres's URL parser: credentials end at the first '@', the
    // query starts at the first '?' after them.
    let after = &text[prefix_len..];
    let creds_len = after.find('@').map(|i| i + 1).unwrap_or(0);
    let Some(q) = after[creds_len..].find('?') else {
        return Ok(text.to_string());
    };
    let query_start = prefix_len + creds_len + q + 1;
    let mut kept: Vec<&str> = Vec::new();
    for pair in text[query_start..].split('&') {
        let Some((raw_key, raw_value)) = pair.split_once('=') else {
            kept.push(pair);
            continue;
        };
        let key = percent_decode(raw_key)?;
        let value = percent_decode(raw_value)?;
        if !apply(&key, &value, settings)? {
            kept.push(pair);
        }
    }
    let mut out = text[..query_start - 1].to_string();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    Ok(out)
}

/// Percent-decoding as tokio-postgres does it (with the same crate): malformed
/// escapes stay as they are.
fn percent_decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| {
            "a connection-string value is not valid UTF-8 once percent-decoded".to_string()
        })
}

fn extract_from_key_values(text: &str, settings: &mut TlsSettings) -> Result<String, String> {
    let Some(pairs) = tokenize_key_values(text) else {
        return Ok(text.to_string());
    };
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for (start, end, key, value) in pairs {
        if apply(&key, &value, settings)? {
            out.push_str(&text[last..start]);
            last = end;
        }
    }
    out.push_str(&text[last..]);
    Ok(out)
}

/// `(start, end, key, value)` of every `key = value` pair, as tokio-postgres's
/// key/value parser reads them; `None` when the string does not parse.
fn tokenize_key_values(text: &str) -> Option<Vec<(usize, usize, String, String)>> {
    let mut it = text.char_indices().peekable();
    let mut pairs = Vec::new();
    let skip_ws = |it: &mut std::iter::Peekable<std::str::CharIndices<'_>>| {
        while it.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
            it.next();
        }
    };
    loop {
        skip_ws(&mut it);
        let Some(&(start, _)) = it.peek() else {
            return Some(pairs);
        };
        let mut key = String::new();
        while let Some(&(_, c)) = it.peek() {
            if c.is_whitespace() || c == '=' {
                break;
            }
            key.push(c);
            it.next();
        }
        if key.is_empty() {
            return None;
        }
        skip_ws(&mut it);
        if it.next().map(|(_, c)| c) != Some('=') {
            return None;
        }
        skip_ws(&mut it);
        let mut value = String::new();
        if it.peek().map(|&(_, c)| c) == Some('\'') {
            it.next();
            loop {
                match it.next()? {
                    (_, '\'') => break,
                    (_, '\\') => value.push(it.next()?.1),
                    (_, c) => value.push(c),
                }
            }
        } else {
            while let Some(&(_, c)) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                it.next();
                if c == '\\' {
                    if let Some((_, c2)) = it.next() {
                        value.push(c2);
                    }
                } else {
                    value.push(c);
                }
            }
            if value.is_empty() {
                return None;
            }
        }
        let end = it.peek().map(|&(i, _)| i).unwrap_or(text.len());
        pairs.push((start, end, key, value));
    }
}

// ---------------------------------------------------------------------------
// Certificate verifiers
// ---------------------------------------------------------------------------

/// Accepts any server certificate: libpq's `sslmode=require` (and `prefer`), which
/// encrypts but does not authenticate the server. Handshake signatures are still
/// checked against the certificate presented.
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

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// libpq's `verify-ca`: the chain must lead to a trusted root, the host name is not
/// checked. webpki checks the chain (and validity dates) before the name, so a name
/// mismatch means everything else passed.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
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

// ---------------------------------------------------------------------------
// tokio-postgres integration
// ---------------------------------------------------------------------------

/// tokio-postgres's TLS hook over tokio-rustls.
#[derive(Clone)]
pub struct MakeRustlsConnect {
    config: Arc<ClientConfig>,
}

impl MakeRustlsConnect {
    /// A connector using `config` for every connection.
    pub fn new(config: Arc<ClientConfig>) -> Self {
        MakeRustlsConnect { config }
    }
}

impl<S> MakeTlsConnect<S> for MakeRustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> io::Result<RustlsConnect> {
        Ok(RustlsConnect {
            config: self.config.clone(),
            domain: domain.to_string(),
        })
    }
}

/// One pending TLS handshake for tokio-postgres.
pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    domain: String,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = server_name(&self.domain)?;
            let stream = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await?;
            Ok(RustlsStream(stream))
        })
    }
}

/// A TLS stream handed to tokio-postgres.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // tls-server-end-point needs the hash algorithm of the certificate's signature,
        // i.e. an X.509 parser; SCRAM works without channel binding.
        ChannelBinding::none()
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

fn server_name(host: &str) -> io::Result<ServerName<'static>> {
    ServerName::try_from(host.to_string()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("`{host}` is not a host name or IP address TLS can verify"),
        )
    })
}

// ---------------------------------------------------------------------------
// Replication connections: SSLRequest by hand
// ---------------------------------------------------------------------------

/// What [`negotiate`] ended with.
pub enum Negotiated<S> {
    /// The server refused TLS and the mode allows plain connections.
    Plain(S),
    /// A TLS session over the stream.
    Tls(Box<tokio_rustls::client::TlsStream<S>>),
}

/// Why [`negotiate`] failed, as one line for the user.
#[derive(Debug)]
pub enum NegotiateError {
    /// The socket failed before or during the SSLRequest.
    Io(io::Error),
    /// TLS could not be set up, or the handshake failed.
    Tls(String),
}

/// Sends an SSLRequest (unless `sslmode=disable`) and, when the server answers `S`,
/// runs the TLS handshake with `host` as the server name.
pub async fn negotiate<S>(
    mut stream: S,
    settings: &TlsSettings,
    host: &str,
) -> Result<Negotiated<S>, NegotiateError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if settings.mode == SslMode::Disable {
        return Ok(Negotiated::Plain(stream));
    }
    let config = settings.client_config().map_err(NegotiateError::Tls)?;
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    stream.write_all(&buf).await.map_err(NegotiateError::Io)?;
    stream.flush().await.map_err(NegotiateError::Io)?;
    // Exactly one byte: anything the server sent after it must be TLS, never
    // plaintext we would otherwise take as authenticated (CVE-2021-23222).
    let mut answer = [0u8; 1];
    stream
        .read_exact(&mut answer)
        .await
        .map_err(NegotiateError::Io)?;
    match answer[0] {
        b'S' => {}
        b'N' if !settings.mode.tls_required() => return Ok(Negotiated::Plain(stream)),
        b'N' => return Err(NegotiateError::Tls(refused_message(settings.mode))),
        other => {
            return Err(NegotiateError::Tls(format!(
                "the server answered the TLS request with {:?} instead of S or N: is this a PostgreSQL server?",
                other as char
            )))
        }
    }
    let name = server_name(host).map_err(|e| NegotiateError::Tls(e.to_string()))?;
    match tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
    {
        Ok(tls) => Ok(Negotiated::Tls(Box::new(tls))),
        Err(e) => Err(NegotiateError::Tls(handshake_failure(&e, settings))),
    }
}

/// The message for a server that answered `N` to an SSLRequest under a mode that
/// requires TLS.
pub fn refused_message(mode: SslMode) -> String {
    format!(
        "the server does not accept TLS connections but sslmode={mode} requires TLS; \
         enable ssl on the server, or use sslmode=prefer"
    )
}

/// "TLS handshake failed: <cause>; <what to check>" for a failed handshake whose
/// error is (or wraps) a rustls error.
pub fn handshake_failure(
    error: &(dyn std::error::Error + 'static),
    settings: &TlsSettings,
) -> String {
    match find_rustls_error(error) {
        Some(e) => format!("TLS handshake failed: {e}; {}", hint(e, settings)),
        None => format!("TLS handshake failed: {error}"),
    }
}

/// Finds a rustls error in an error chain, looking inside `io::Error`s (whose
/// `source()` skips the error they wrap).
pub fn find_rustls_error<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    let mut current: Option<&'a (dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        if let Some(inner) = e.downcast_ref::<io::Error>().and_then(|io| io.get_ref()) {
            if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                return Some(r);
            }
        }
        current = e.source();
    }
    None
}

fn hint(error: &rustls::Error, settings: &TlsSettings) -> String {
    let root = match &settings.root_cert {
        Some(p) => format!("sslrootcert {}", p.display()),
        None => "sslrootcert".to_string(),
    };
    match error {
        rustls::Error::InvalidCertificate(c) => match c {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "check {root} (the CA that signed the server certificate)"
            ),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                "connect using a host name the server certificate names, or use sslmode=verify-ca to check only the CA".into()
            }
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. } => {
                "renew the server certificate, or check this machine's clock".into()
            }
            _ => format!("check the server certificate and {root}"),
        },
        rustls::Error::AlertReceived(_) => {
            "the server rejected the TLS session: check the server's ssl settings (it may require a client certificate, which walshuttle does not send)".into()
        }
        _ => "check the server's ssl settings and the sslmode of the connection string".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extract(text: &str) -> (String, TlsSettings) {
        extract_settings(text).unwrap()
    }

    #[test]
    fn url_without_tls_parameters_is_unchanged() {
        let (rest, s) = extract("postgresql://u:p@db:5432/app");
        assert_eq!(rest, "postgresql://u:p@db:5432/app");
        assert_eq!(s, TlsSettings::default());
        assert_eq!(s.mode, SslMode::Prefer);
        let (rest, _) = extract("postgres://u@db/app?connect_timeout=5");
        assert_eq!(rest, "postgres://u@db/app?connect_timeout=5");
    }

    #[test]
    fn url_parameters_are_taken_out() {
        let (rest, s) = extract(
            "postgresql://u:p@localhost:5432/app?sslmode=verify-full&sslrootcert=/etc/ca%20dir/ca.pem",
        );
        assert_eq!(rest, "postgresql://u:p@localhost:5432/app");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, Some(PathBuf::from("/etc/ca dir/ca.pem")));

        let (rest, s) =
            extract("postgresql://db/app?connect_timeout=3&sslmode=verify-ca&application_name=x");
        assert_eq!(
            rest,
            "postgresql://db/app?connect_timeout=3&application_name=x"
        );
        assert_eq!(s.mode, SslMode::VerifyCa);
        assert_eq!(s.root_cert, None);

        // A '?' in the password is not the query.
        let (rest, s) = extract("postgresql://u:a?b@db/app?sslmode=require");
        assert_eq!(rest, "postgresql://u:a?b@db/app");
        assert_eq!(s.mode, SslMode::Require);
    }

    #[test]
    fn key_value_parameters_are_taken_out() {
        let (rest, s) = extract(
            "host=localhost sslmode = verify-full dbname=app sslrootcert='/tmp/my ca.pem' user=u",
        );
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, Some(PathBuf::from("/tmp/my ca.pem")));
        let parsed: tokio_postgres::Config = rest.parse().unwrap();
        assert_eq!(parsed.get_dbname(), Some("app"));
        assert_eq!(parsed.get_user(), Some("u"));
        assert!(!rest.contains("ssl"), "{rest}");

        let (rest, s) = extract("host=db sslmode=disable");
        assert_eq!(s.mode, SslMode::Disable);
        assert_eq!(rest.trim(), "host=db");
    }

    #[test]
    fn bad_values_are_refused_with_the_choices() {
        let err = extract_settings("postgresql://db/app?sslmode=verify").unwrap_err();
        assert!(err.contains("verify-full"), "{err}");
        let err = extract_settings("host=db sslmode=allow").unwrap_err();
        assert!(err.contains("not supported"), "{err}");
        let err = extract_settings("host=db sslrootcert=system").unwrap_err();
        assert!(err.contains("system"), "{err}");
        let err = extract_settings("postgresql://db/app?sslcert=/c.pem").unwrap_err();
        assert!(err.contains("client certificates"), "{err}");
    }

    #[test]
    fn unparsable_key_values_pass_through() {
        let (rest, s) = extract("host=db sslmode");
        assert_eq!(rest, "host=db sslmode");
        assert_eq!(s, TlsSettings::default());
    }

    #[test]
    fn percent_decoding_is_lenient() {
        assert_eq!(percent_decode("a%20b").unwrap(), "a b");
        assert_eq!(percent_decode("100%").unwrap(), "100%");
        assert_eq!(percent_decode("%zz%4").unwrap(), "%zz%4");
    }

    #[test]
    fn checks_follow_libpq() {
        let s = |mode, root: Option<&str>| TlsSettings {
            mode,
            root_cert: root.map(PathBuf::from),
        };
        assert_eq!(s(SslMode::Prefer, None).check(), Check::Nothing);
        assert_eq!(s(SslMode::Require, None).check(), Check::Nothing);
        assert_eq!(s(SslMode::Require, Some("/ca")).check(), Check::Chain);
        assert_eq!(s(SslMode::VerifyCa, Some("/ca")).check(), Check::Chain);
        assert_eq!(
            s(SslMode::VerifyFull, Some("/ca")).check(),
            Check::ChainAndName
        );
    }

    #[test]
    fn missing_root_certificate_is_reported() {
        let settings = TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some(PathBuf::from("/nonexistent/walshuttle-ca.pem")),
        };
        let err = settings.client_config().unwrap_err();
        assert!(
            err.contains("cannot read sslrootcert /nonexistent/walshuttle-ca.pem"),
            "{err}"
        );
        assert!(TlsSettings::default().client_config().is_ok());
    }

    #[test]
    fn empty_pem_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = load_roots(&path).unwrap_err();
        assert!(err.contains("holds no certificate"), "{err}");
    }
}
