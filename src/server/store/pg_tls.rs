//! TLS to PostgreSQL over rustls, with libpq's settings in the database URL: `sslmode`
//! (`disable`, `prefer`, `require`, `verify-ca`, `verify-full`), `sslrootcert` (a PEM file, or
//! `system` for the public web roots) and a client certificate (`sslcert` and `sslkey`). The
//! PostgreSQL client knows only `disable`, `prefer` and `require` and no files: this module takes
//! the TLS parameters out of the URL, builds the rustls configuration they ask for, and hands the
//! client a connector ([`MakeRustls`]) that speaks it.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use postgres::Socket;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// libpq's `sslmode` values (`allow` is not offered: it prefers plain text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SslMode {
    /// Plain text only.
    Disable,
    /// TLS when the server offers it (certificate not checked), plain text otherwise; libpq's
    /// default.
    Prefer,
    /// TLS or nothing; the certificate is checked against `sslrootcert` when one is given (as
    /// libpq does when a root certificate file exists), else not at all.
    Require,
    /// TLS with a certificate that chains to `sslrootcert`, whatever name it carries.
    VerifyCa,
    /// TLS with a certificate that chains to `sslrootcert` and names the host of the URL.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, String> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            "allow" => {
                return Err(
                    "sslmode=allow is not supported: use disable, prefer, require, verify-ca or verify-full"
                        .into(),
                )
            }
            other => {
                return Err(format!(
                    "unknown sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full"
                ))
            }
        })
    }

    /// What the PostgreSQL client is told: whether to ask for TLS and whether to insist.
    pub(crate) fn client_mode(self) -> postgres::config::SslMode {
        match self {
            SslMode::Disable => postgres::config::SslMode::Disable,
            SslMode::Prefer => postgres::config::SslMode::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => postgres::config::SslMode::Require,
        }
    }
}

/// Where the server's certificate must lead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootCert {
    File(PathBuf),
    /// The public web roots built into the binary.
    System,
}

/// The TLS settings of a database URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TlsSettings {
    pub(crate) mode: SslMode,
    pub(crate) root_cert: Option<RootCert>,
    /// The client certificate and its key (PEM files).
    pub(crate) client_cert: Option<(PathBuf, PathBuf)>,
}

/// The URL's TLS parameters (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) taken out: the URL
/// the PostgreSQL client parses, and the settings. The messages never quote the URL (it may hold
/// the password).
pub(crate) fn split_url(url: &str) -> Result<(String, TlsSettings), String> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, q),
        None => (url, ""),
    };
    let (mut mode, mut root, mut cert, mut key) = (None, None, None, None);
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = || {
            percent_decode(v).ok_or_else(|| format!("the database URL's {k} is not valid percent-encoding"))
        };
        match k {
            "sslmode" => mode = Some(SslMode::parse(&value()?)?),
            "sslrootcert" => root = Some(value()?),
            "sslcert" => cert = Some(value()?),
            "sslkey" => key = Some(value()?),
            "sslpassword"
            | "sslcrl"
            | "sslcrldir"
            | "sslsni"
            | "ssl_min_protocol_version"
            | "ssl_max_protocol_version"
            | "sslcompression"
            | "sslcertmode" => {
                return Err(format!("the database URL's {k} is not supported"));
            }
            _ => kept.push(pair),
        }
    }
    let root_cert = root.map(|r| if r == "system" { RootCert::System } else { RootCert::File(r.into()) });
    let mode = mode.unwrap_or(SslMode::Prefer);
    if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
        let name = if mode == SslMode::VerifyCa { "verify-ca" } else { "verify-full" };
        return Err(format!(
            "sslmode={name} needs sslrootcert=PATH (the CA's PEM file) or sslrootcert=system in the database URL"
        ));
    }
    let client_cert = match (cert, key) {
        (None, None) => None,
        (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
        _ => {
            return Err(
                "the database URL needs both sslcert and sslkey for a client certificate, or neither".into()
            )
        }
    };
    let url = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    Ok((url, TlsSettings { mode, root_cert, client_cert }))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("reading the PostgreSQL {what} {}: {e}", path.display()))
}

/// The rustls client configuration `settings` ask for.
pub(crate) fn client_config(settings: &TlsSettings) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match &settings.root_cert {
        None => None,
        Some(RootCert::System) => {
            Some(rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() })
        }
        Some(RootCert::File(path)) => {
            let pem = read_pem(path, "root certificate (sslrootcert)")?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("parsing sslrootcert {}: {e}", path.display()))?;
                roots.add(cert).map_err(|e| format!("adding sslrootcert {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("no certificate in sslrootcert {}", path.display()));
            }
            Some(roots)
        }
    };
    let verifier: Arc<dyn ServerCertVerifier> = match (settings.mode, roots) {
        (SslMode::Disable | SslMode::Prefer, _) | (SslMode::Require, None) => {
            Arc::new(EncryptionOnly { provider: provider.clone() })
        }
        (_, None) => return Err("checking the server's certificate needs sslrootcert".into()),
        (mode, Some(roots)) => {
            let webpki = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .map_err(|e| format!("configuring the PostgreSQL certificate check: {e}"))?;
            if mode == SslMode::VerifyFull {
                webpki
            } else {
                Arc::new(ChainOnly { webpki })
            }
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("configuring TLS: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &settings.client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let pem = read_pem(cert, "client certificate (sslcert)")?;
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("parsing sslcert {}: {e}", cert.display()))?;
            if certs.is_empty() {
                return Err(format!("no certificate in sslcert {}", cert.display()));
            }
            let key_pem = read_pem(key, "client key (sslkey)")?;
            // The key's own bytes never reach a message.
            let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                .map_err(|_| format!("no readable private key in sslkey {}", key.display()))?;
            builder.with_client_auth_cert(certs, key_der).map_err(|e| {
                format!("sslcert {} does not match sslkey {}: {e}", cert.display(), key.display())
            })?
        }
    };
    Ok(Arc::new(config))
}

/// `prefer` and `require` without a root certificate: the connection is encrypted, the
/// certificate is not checked (libpq's meaning); the handshake's signatures still are.
#[derive(Debug)]
struct EncryptionOnly {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for EncryptionOnly {
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain is checked to the root certificate, the name is not.
#[derive(Debug)]
struct ChainOnly {
    webpki: Arc<rustls::client::WebPkiServerVerifier>,
}

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
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
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// The PostgreSQL client's TLS connector over rustls.
#[derive(Clone)]
pub(crate) struct MakeRustls {
    config: Arc<rustls::ClientConfig>,
}

impl MakeRustls {
    pub(crate) fn new(config: Arc<rustls::ClientConfig>) -> MakeRustls {
        MakeRustls { config }
    }
}

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> std::io::Result<RustlsConnect> {
        let name = ServerName::try_from(domain.to_string()).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("host name {domain:?} for TLS: {e}"),
            )
        })?;
        Ok(RustlsConnect { connector: tokio_rustls::TlsConnector::from(self.config.clone()), name })
    }
}

/// One connection's handshake.
pub(crate) struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

type Handshake = Pin<Box<dyn Future<Output = std::io::Result<RustlsStream>> + Send>>;

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = std::io::Error;
    type Future = Handshake;

    fn connect(self, stream: Socket) -> Handshake {
        Box::pin(async move { self.connector.connect(self.name, stream).await.map(RustlsStream) })
    }
}

/// A TLS connection to the server.
pub(crate) struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

impl TlsStream for RustlsStream {
    /// No channel binding: SCRAM authenticates without it (the client's default `prefer`).
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_leave_the_url() {
        let (url, s) = split_url(
            "postgres://u:p@db/x?application_name=a&sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&sslcert=/c.pem&sslkey=/k.pem",
        )
        .unwrap();
        assert_eq!(url, "postgres://u:p@db/x?application_name=a");
        assert_eq!(s.mode, SslMode::VerifyFull);
        assert_eq!(s.root_cert, Some(RootCert::File("/etc/ca.pem".into())));
        assert_eq!(s.client_cert, Some(("/c.pem".into(), "/k.pem".into())));
        let (url, s) = split_url("postgres://u@db/x").unwrap();
        assert_eq!((url.as_str(), s.mode, s.root_cert), ("postgres://u@db/x", SslMode::Prefer, None));
        let (_, s) = split_url("postgres://u@db/x?sslmode=verify-ca&sslrootcert=system").unwrap();
        assert_eq!((s.mode, s.root_cert), (SslMode::VerifyCa, Some(RootCert::System)));
        assert!(split_url("postgres://u@db/x?sslmode=verify-full").unwrap_err().contains("sslrootcert"));
        assert!(split_url("postgres://u@db/x?sslmode=bogus").unwrap_err().contains("unknown sslmode"));
        assert!(split_url("postgres://u@db/x?sslcert=/c").unwrap_err().contains("both sslcert and sslkey"));
        assert!(split_url("postgres://u@db/x?sslpassword=x").unwrap_err().contains("not supported"));
    }

    #[test]
    fn missing_or_empty_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let settings = |root: &Path| TlsSettings {
            mode: SslMode::VerifyFull,
            root_cert: Some(RootCert::File(root.to_path_buf())),
            client_cert: None,
        };
        let err = client_config(&settings(&dir.path().join("nope.pem"))).unwrap_err();
        assert!(err.contains("nope.pem"), "{err}");
        assert!(client_config(&settings(&empty)).unwrap_err().contains("no certificate"));
        let plain = TlsSettings { mode: SslMode::Require, root_cert: None, client_cert: None };
        client_config(&plain).unwrap();
    }
}

/// Against real servers: a throwaway cluster with `ssl=on` and a CA made here, and the test
/// binary's plain-text one.
#[cfg(test)]
mod server_tests {
    use crate::server::store::{testing, PgOptions, PgPool, StoreError};
    use std::path::Path;
    use std::process::Command;
    use testkit::cluster::Cluster;

    fn openssl(dir: &Path, args: &[&str]) {
        let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// A self-signed CA: `name.pem`, `name.key`.
    fn make_ca(dir: &Path, name: &str) {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }

    /// A certificate `ca` signs: `name.pem`, `name.key`, with common name `cn` and, when given,
    /// `san` (e.g. `DNS:localhost`); a client certificate without.
    fn make_leaf(dir: &Path, ca: &str, name: &str, cn: &str, san: Option<&str>) {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        let ext = format!("{name}.ext");
        std::fs::write(
            dir.join(&ext),
            san.map_or_else(|| "extendedKeyUsage=clientAuth\n".into(), |s| format!("subjectAltName={s}\n")),
        )
        .unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{ca}.pem"),
                "-CAkey",
                &format!("{ca}.key"),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &format!("{name}.pem"),
            ],
        );
    }

    fn connect(url: String) -> Result<postgres::Client, StoreError> {
        PgPool::new(&PgOptions { url: crate::base::secret::Secret::new(url), password: None })?.connect()
    }

    fn on_tls(client: &mut postgres::Client) -> bool {
        client.query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).unwrap().get(0)
    }

    #[test]
    fn sslmodes_against_a_tls_server_and_a_plain_one() {
        let test = "sslmodes_against_a_tls_server_and_a_plain_one";
        let cluster = match Cluster::start() {
            Ok(c) => c,
            Err(why) => return crate::base::skip::skip(test, "postgres", &why),
        };
        let certs = tempfile::tempdir().unwrap();
        let d = certs.path();
        make_ca(d, "ca");
        make_ca(d, "other-ca");
        make_leaf(d, "ca", "server", "localhost", Some("DNS:localhost"));
        make_leaf(d, "ca", "client", "certuser", None);
        // The server's files, the postgres user's own (it refuses a key others can read).
        let data = cluster.dir().join("data");
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&data).unwrap());
        for f in ["server.pem", "server.key", "ca.pem"] {
            std::fs::copy(d.join(f), data.join(f)).unwrap();
            std::os::unix::fs::chown(data.join(f), Some(owner), None).unwrap();
            std::fs::set_permissions(data.join(f), std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
        let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).unwrap();
        std::io::Write::write_all(
            &mut conf,
            b"\nssl = on\nssl_cert_file = 'server.pem'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.pem'\n",
        )
        .unwrap();
        let hba = std::fs::read_to_string(data.join("pg_hba.conf")).unwrap();
        std::fs::write(data.join("pg_hba.conf"), format!("hostssl all certuser 127.0.0.1/32 cert\n{hba}"))
            .unwrap();
        cluster.stop().unwrap();
        cluster.start_server().unwrap_or_else(|e| panic!("{e}"));
        let mut admin = connect(cluster.url("postgres")).unwrap();
        admin.batch_execute("CREATE ROLE certuser LOGIN").unwrap();

        let port = cluster.port();
        let ca = d.join("ca.pem").display().to_string();
        let url =
            |host: &str, user: &str, query: &str| format!("postgres://{user}@{host}:{port}/postgres?{query}");

        // require: encrypted, the certificate unchecked; prefer takes TLS where offered.
        assert!(on_tls(&mut connect(url("127.0.0.1", "postgres", "sslmode=require")).unwrap()));
        assert!(on_tls(&mut connect(url("127.0.0.1", "postgres", "")).unwrap()), "prefer is the default");
        assert!(!on_tls(&mut connect(url("127.0.0.1", "postgres", "sslmode=disable")).unwrap()));
        // verify-full: the chain and the name; verify-ca: the chain only.
        let full = format!("sslmode=verify-full&sslrootcert={ca}");
        assert!(on_tls(&mut connect(url("localhost", "postgres", &full)).unwrap()));
        let err = connect(url("127.0.0.1", "postgres", &full)).err().expect("connected").to_string();
        assert!(err.contains("certificate") && err.contains("127.0.0.1"), "{err}");
        let verify_ca = format!("sslmode=verify-ca&sslrootcert={ca}");
        assert!(on_tls(&mut connect(url("127.0.0.1", "postgres", &verify_ca)).unwrap()));
        let other = format!("sslmode=verify-ca&sslrootcert={}", d.join("other-ca.pem").display());
        let err = connect(url("127.0.0.1", "postgres", &other)).err().expect("connected").to_string();
        assert!(err.contains("certificate"), "{err}");
        // require with a root certificate checks the chain, as libpq does.
        let require_ca = format!("sslmode=require&sslrootcert={}", d.join("other-ca.pem").display());
        assert!(connect(url("127.0.0.1", "postgres", &require_ca)).is_err());
        // A client certificate: the `cert` rule lets certuser in with it, and not without.
        let client = format!(
            "sslmode=verify-full&sslrootcert={ca}&sslcert={}&sslkey={}",
            d.join("client.pem").display(),
            d.join("client.key").display()
        );
        let mut c = connect(url("localhost", "certuser", &client)).unwrap();
        assert_eq!(c.query_one("SELECT current_user::text", &[]).unwrap().get::<_, String>(0), "certuser");
        assert!(connect(url("localhost", "certuser", &full)).is_err(), "no client certificate");

        // A plain-text server: refused under require, plain text under prefer.
        let plain = testing::cluster().unwrap();
        let plain_url = |q: &str| format!("{}?{q}", plain.url("postgres"));
        let err = connect(plain_url("sslmode=require")).err().expect("connected").to_string();
        assert!(err.to_lowercase().contains("tls"), "{err}");
        assert!(!on_tls(&mut connect(plain_url("sslmode=prefer")).unwrap()));
    }
}
