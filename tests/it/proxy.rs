//! Corporate networks: a coordinator behind a TLS-inspecting proxy made by the test (a `CONNECT`
//! proxy on loopback that terminates TLS with a certificate of a CA the test makes, and forwards
//! to the real coordinator), trusted only through the system trust store the test points
//! `SSL_CERT_FILE` at; the same without that trust (the first failure says what to set); and
//! `NO_PROXY` sending the executor around the proxy.

use std::io::Read;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::common::{self, Exec};
use crate::coordinator::Coordinator;
use crate::gitserve::make_repo;

/// The name the executor knows its coordinator by: only the proxy resolves it.
const NAME: &str = "coordinator.example";

/// What the proxy saw: the request line and `User-Agent` of each request made to it.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A proxy on 127.0.0.1: each `CONNECT` is answered 200, its TLS terminated with `cert`/`key`
/// (when given) and its bytes forwarded to `upstream`; any other request gets a 403.
struct Proxy {
    addr: SocketAddr,
    seen: Seen,
    _runtime: tokio::runtime::Runtime,
}

impl Proxy {
    fn start(upstream: SocketAddr, cert: Option<(&Path, &Path)>) -> Proxy {
        use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
        let acceptor = cert.map(|(cert, key)| {
            let certs: Vec<CertificateDer<'static>> =
                CertificateDer::pem_file_iter(cert).unwrap().map(|c| c.unwrap()).collect();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            let config = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
            tokio_rustls::TlsAcceptor::from(Arc::new(config))
        });
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Seen = Arc::default();
        let seen2 = seen.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let (acceptor, seen) = (acceptor.clone(), seen2.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, upstream, acceptor, seen).await;
                });
            }
        });
        Proxy { addr, seen, _runtime: runtime }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<(String, String)> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(
    stream: tokio::net::TcpStream,
    upstream: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    seen: Seen,
) -> std::io::Result<()> {
    let mut reader = tokio::io::BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).await?;
    let mut agent = String::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).await? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("user-agent") {
                agent = v.trim().to_string();
            }
        }
    }
    seen.lock().unwrap().push((line.trim().to_string(), agent));
    let mut stream = reader.into_inner();
    let Some(acceptor) = acceptor.filter(|_| line.starts_with("CONNECT ")) else {
        stream.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
        return Ok(());
    };
    stream.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await?;
    let mut tls = acceptor.accept(stream).await?;
    let mut up = tokio::net::TcpStream::connect(upstream).await?;
    tokio::io::copy_bidirectional(&mut tls, &mut up).await?;
    Ok(())
}

/// A CA and a certificate of it for [`NAME`], made with openssl: (ca, cert, key).
fn make_ca(dir: &Path, test: &str) -> Option<(std::path::PathBuf, std::path::PathBuf, std::path::PathBuf)> {
    let p = |name: &str| dir.join(name);
    std::fs::write(p("ext.cnf"), format!("subjectAltName=DNS:{NAME}\n")).unwrap();
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let s = |name: &str| p(name).display().to_string();
    let steps = [
        format!(
            "req -x509 {ec} -days 1 -subj /CN=inspecting-proxy-ca -keyout {} -out {}",
            s("ca.key"),
            s("ca.pem")
        ),
        format!("req {ec} -subj /CN={NAME} -keyout {} -out {}", s("key.pem"), s("req.csr")),
        format!(
            "x509 -req -in {} -CA {} -CAkey {} -CAcreateserial -days 1 -extfile {} -out {}",
            s("req.csr"),
            s("ca.pem"),
            s("ca.key"),
            s("ext.cnf"),
            s("cert.pem")
        ),
    ];
    for step in steps {
        let args: Vec<&str> = step.split(' ').collect();
        match Command::new("openssl").args(&args).stderr(Stdio::null()).status() {
            Ok(st) if st.success() => {}
            Ok(st) => panic!("openssl {step}: {st}"),
            Err(e) => {
                common::skip(test, "openssl", &format!("no openssl binary: {e}"));
                return None;
            }
        }
    }
    Some((p("ca.pem"), p("cert.pem"), p("key.pem")))
}

/// The coordinator's address for the proxy to forward to.
fn upstream(c: &Coordinator) -> SocketAddr {
    c.url.trim_start_matches("http://").trim_end_matches('/').parse().unwrap()
}

/// `executor <args>` with the shell runtime, the batches queue and nothing of the test's own
/// proxy or trust variables.
fn executor(c: &Coordinator, state: &Path) -> Command {
    let mut cmd = common::executor();
    c.executor_env(&mut cmd);
    for v in ["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "SSL_CERT_FILE", "SSL_CERT_DIR"] {
        cmd.env_remove(v).env_remove(v.to_ascii_lowercase());
    }
    cmd.env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "shell")
        .env("EXECUTOR_ALLOW_UNISOLATED", "1")
        .env("EXECUTOR_STATE_DIR", state)
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms");
    cmd
}

fn register(c: &Coordinator, name: &str, path: &Path) {
    Exec::new()
        .with(|cmd| c.admin_env(cmd))
        .args(["queue", "repo", "add", name, path.to_str().unwrap()])
        .run();
}

#[test]
fn proxy_a_coordinator_behind_a_tls_inspecting_proxy() {
    let test = "proxy_a_coordinator_behind_a_tls_inspecting_proxy";
    let dir = tempfile::tempdir().unwrap();
    let Some((ca, cert, key)) = make_ca(dir.path(), test) else { return };
    let c = Coordinator::start();
    let proxy = Proxy::start(upstream(&c), Some((&cert, &key)));
    let (repo, _, commit) = make_repo(dir.path(), "origin");
    register(&c, "github.com/acme/p", &repo);
    let state = tempfile::tempdir().unwrap();

    // Without the proxy's CA in the trust store: the first failure says what failed and what to
    // set, once, and the executor keeps trying quietly.
    let mut cmd = executor(&c, state.path());
    cmd.env("EXECUTOR_FRONTEND_URL", format!("https://{NAME}"))
        .env("HTTPS_PROXY", proxy.url())
        .arg("loop")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let text = Arc::new(Mutex::new(String::new()));
    let text2 = text.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            text2.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    let warned = common::poll_until(Duration::from_secs(20), || text.lock().unwrap().contains("retrying"));
    // Three more attempts at least (one a second), none of them said again.
    let connects = proxy.seen().len();
    common::poll_until(Duration::from_secs(10), || proxy.seen().len() >= connects + 3);
    let _ = child.kill();
    let _ = child.wait();
    reader.join().unwrap();
    let log = text.lock().unwrap().clone();
    assert!(warned, "no warning about the first failure:\n{log}");
    let warning: Vec<&str> = log.lines().filter(|l| l.contains("cannot reach the coordinator")).collect();
    assert_eq!(warning.len(), 1, "said once, then quiet:\n{log}");
    for word in ["TLS certificate", "SSL_CERT_FILE", "SSL_CERT_DIR", "EXECUTOR_FRONTEND_CA", NAME] {
        assert!(warning[0].contains(word), "{word} missing from: {}", warning[0]);
    }
    assert!(proxy.seen().len() >= connects + 3, "the executor stopped trying: {:?}", proxy.seen());

    // Trusted through the system store: the executor and its git reach the coordinator through
    // the proxy and run a job.
    let id = c.submit(json!({"repositoryName": "github.com/acme/p", "commit": commit,
        "dockerSteps": [{"image": "alpine", "commands": ["cat a.txt"]}]}));
    let before = proxy.seen().len();
    let t = Instant::now();
    let mut cmd = executor(&c, state.path());
    cmd.env("EXECUTOR_FRONTEND_URL", format!("https://{NAME}"))
        .env("HTTPS_PROXY", proxy.url())
        .env("SSL_CERT_FILE", &ca)
        .env("EXECUTOR_NUM_TOTAL_JOBS", "1")
        .arg("loop");
    let o = common::run(&mut cmd);
    common::assert_ok(&o);
    let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(20));
    assert_eq!(job["state"], "completed", "{job:#}");
    assert!(job.to_string().contains("stdout: two"), "{job:#}");
    let seen: Vec<(String, String)> = proxy.seen().split_off(before);
    let connect = format!("CONNECT {NAME}:443 HTTP/1.1");
    assert!(seen.iter().any(|(l, a)| *l == connect && a.starts_with("executor/")), "{seen:?}");
    assert!(
        seen.iter().any(|(l, a)| *l == connect && a.starts_with("git/")),
        "git went around the proxy: {seen:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(60));
}

#[test]
fn proxy_no_proxy_reaches_the_coordinator_directly() {
    let c = Coordinator::start();
    let proxy = Proxy::start(upstream(&c), None);
    let state = tempfile::tempdir().unwrap();
    let id = c.submit(Coordinator::simple_job());
    let mut cmd = executor(&c, state.path());
    cmd.env("HTTP_PROXY", proxy.url())
        .env("HTTPS_PROXY", proxy.url())
        .env("NO_PROXY", "example.com, 127.0.0.0/8")
        .env("EXECUTOR_NUM_TOTAL_JOBS", "1")
        .arg("loop");
    common::assert_ok(&common::run(&mut cmd));
    c.wait_state(id, &["completed"], Duration::from_secs(20));
    assert_eq!(proxy.seen(), vec![], "NO_PROXY names the coordinator: nothing goes to the proxy");
    // Without NO_PROXY the same executor asks the proxy (which refuses it).
    let mut cmd = executor(&c, state.path());
    cmd.env("HTTP_PROXY", proxy.url()).arg("validate");
    let o = common::run(&mut cmd);
    assert!(!o.status.success());
    let seen = proxy.seen();
    assert!(
        seen.iter().any(|(l, _)| l.starts_with(&format!("GET {}/.executors/test/auth", c.url))),
        "{seen:?}"
    );
}
