//! Hostile registries written by the tests, on loopback: one that redirects to a host-only
//! service, names a token realm on it or answers with its text, one that a job names without
//! the operator listing it, one that serves a doubly gzipped layer, and one that trickles its
//! manifest at a job with a 10 s deadline. The host-only service must see no request, and no
//! error (the job's log included) may quote what it or the registry said.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::common::{self, Exec};

/// What a test server answers one request with.
enum Reply {
    Bytes(Vec<u8>),
    /// The head, then the body a byte at a time, `every` apart, for at most `for_at_most`.
    Trickle {
        head: String,
        every: Duration,
        for_at_most: Duration,
    },
}

fn http(status: &str, extra: &str, body: &[u8]) -> Reply {
    let mut r =
        format!("HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n", body.len())
            .into_bytes();
    r.extend_from_slice(body);
    Reply::Bytes(r)
}

/// A plain HTTP server on loopback that answers each request's path with `answer`, and records
/// the paths it was asked for.
struct Server {
    port: u16,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Server {
    fn start(answer: impl Fn(&str) -> Reply + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let paths = Arc::new(Mutex::new(Vec::new()));
        let seen = paths.clone();
        let answer = Arc::new(answer);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { break };
                let (seen, answer) = (seen.clone(), answer.clone());
                std::thread::spawn(move || handle(conn, &seen, &*answer));
            }
        });
        Server { port, paths }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

fn handle(mut conn: TcpStream, seen: &Mutex<Vec<String>>, answer: &dyn Fn(&str) -> Reply) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            // A TLS hello: these servers speak plain HTTP only.
            Ok(1) if head.is_empty() && byte[0] == 0x16 => return,
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let path = text.split(' ').nth(1).unwrap_or("").to_string();
    seen.lock().unwrap().push(path.clone());
    match answer(&path) {
        Reply::Bytes(b) => {
            let _ = conn.write_all(&b);
        }
        Reply::Trickle { head, every, for_at_most } => {
            let started = Instant::now();
            if conn.write_all(head.as_bytes()).is_err() {
                return;
            }
            while started.elapsed() < for_at_most {
                std::thread::sleep(every);
                if conn.write_all(b" ").is_err() {
                    return;
                }
            }
        }
    }
}

/// The marker of what the host-only service says: no error may quote it.
const SECRET: &str = "INTERNAL-ANSWER-7731";

fn pull(state: &std::path::Path, reference: &str, listed: Option<&str>) -> std::process::Output {
    let mut e = Exec::new().arg("image").args(["pull", reference]).env("EXECUTOR_STATE_DIR", state);
    if let Some(l) = listed {
        e = e.env("EXECUTOR_PRIVATE_REGISTRIES", l);
    }
    e.any_status().run()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A registry (listed by the operator) that sends the host to a service only the host reaches:
/// by a redirect, by a token realm, and by answering with that service's kind of text. The
/// service sees no request, and no error quotes anything.
#[test]
fn a_hostile_registry_reaches_no_host_only_service() {
    let service = Server::start(|_| {
        http("200 OK", "Content-Type: application/json\r\n", format!(r#"{{"token":"{SECRET}"}}"#).as_bytes())
    });
    let svc = service.host();
    let registry = Server::start(move |path| {
        if path == "/v2/" {
            http("200 OK", "", b"{}")
        } else if path.starts_with("/v2/redirect/") {
            http("307 Temporary Redirect", &format!("Location: http://{svc}/admin?{SECRET}\r\n"), b"")
        } else if path.starts_with("/v2/realm/") {
            let challenge =
                format!("WWW-Authenticate: Bearer realm=\"http://{svc}/token\",service=\"x\"\r\n");
            http("401 Unauthorized", &challenge, b"")
        } else if path.starts_with("/v2/scheme/") {
            http("401 Unauthorized", &format!("WWW-Authenticate: {SECRET} realm=\"x\"\r\n"), b"")
        } else {
            // A manifest whose fields hold what the registry wants to read back.
            let body = format!(r#"{{"schemaVersion":"{SECRET}","layers":"{SECRET}"}}"#);
            http("200 OK", "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n", body.as_bytes())
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let host = registry.host();
    for (repo, want) in [
        ("redirect", "resolves to a private, loopback, link-local or this host's address"),
        ("realm", "the token realm"),
        ("scheme", "unsupported authentication"),
        ("quote", "is not a valid document"),
    ] {
        let out = pull(&state, &format!("{host}/{repo}/img:1"), Some(&host));
        let err = stderr(&out);
        assert_ne!(out.status.code(), Some(0), "{repo}: {err}");
        assert!(err.contains(want), "{repo}: {err}");
        assert!(!err.contains(SECRET) && !err.contains("/admin"), "{repo}: an answer was quoted: {err}");
    }
    assert_eq!(service.paths(), Vec::<String>::new(), "the host-only service was asked");

    // Not listed: a loopback registry is refused before any request.
    let before = registry.paths().len();
    let out = pull(&state, &format!("{host}/quote/img:1"), None);
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains(&format!("{host} resolves to a private")) && err.contains("EXECUTOR_PRIVATE_REGISTRIES"),
        "{err}"
    );
    assert_eq!(registry.paths().len(), before, "an unlisted registry was asked");
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

/// A registry serving one image whose only layer is `blob` with `media_type`.
fn one_layer_registry(blob: Vec<u8>, media_type: &str) -> Server {
    let config = br#"{"architecture":"amd64","os":"linux","config":{}}"#.to_vec();
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"{media_type}","digest":"{}","size":{}}}]}}"#,
        sha(&config),
        config.len(),
        sha(&blob),
        blob.len()
    );
    let (cd, bd) = (sha(&config), sha(&blob));
    Server::start(move |path| {
        if path == "/v2/" {
            http("200 OK", "", b"{}")
        } else if path.contains("/manifests/") {
            http(
                "200 OK",
                "Content-Type: application/vnd.oci.image.manifest.v1+json\r\n",
                manifest.as_bytes(),
            )
        } else if path.ends_with(&cd) {
            http("200 OK", "", &config)
        } else if path.ends_with(&bd) {
            http("200 OK", "", &blob)
        } else {
            http("404 Not Found", "", b"")
        }
    })
}

/// A gzip layer that holds a second gzip stream: the cap counts what is decompressed once, so
/// the second stream is never unpacked past it.
#[test]
fn a_doubly_gzipped_layer_does_not_pass_the_cap() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("bomb");
    std::fs::create_dir(&dir).unwrap();
    common::sh(&dir, "truncate -s 64M zeros && tar -cf layer.tar zeros && rm zeros");
    let tar = std::fs::read(dir.join("layer.tar")).unwrap();
    let twice = gzip(&gzip(&tar));
    drop(tar);
    assert!(twice.len() < 1 << 20, "small: {}", twice.len());
    let registry = one_layer_registry(twice, "application/vnd.oci.image.layer.v1.tar+gzip");
    let state = tmp.path().join("state");
    let reference = format!("{}/bomb/img:1", registry.host());
    let out = Exec::new()
        .arg("image")
        .args(["pull", &reference])
        .env("EXECUTOR_STATE_DIR", &state)
        .env("EXECUTOR_PRIVATE_REGISTRIES", registry.host())
        .env("EXECUTOR_IMAGE_MAX_SIZE", "16M")
        .any_status()
        .run();
    let err = stderr(&out);
    assert_ne!(out.status.code(), Some(0), "the doubly gzipped layer was unpacked: {err}");
    let store = executor::image::ImageStore::open(&state.join("images")).unwrap();
    assert!(store.resolve(&reference).is_err(), "{err}");
    let mut left = 0u64;
    for e in walk(&state.join("images/rootfs")) {
        left += std::fs::symlink_metadata(&e).map(|m| m.len()).unwrap_or(0);
    }
    assert!(left < 16 << 20, "{left} bytes unpacked");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        if let Ok(rd) = std::fs::read_dir(&p) {
            for e in rd.flatten() {
                stack.push(e.path());
                out.push(e.path());
            }
        }
    }
    out
}

/// A registry that trickles its manifest a byte a second: a job with a 10 s deadline ends within
/// 15 s, and the next job is not held up by the pull's lock.
#[test]
fn a_trickling_registry_does_not_outlive_the_jobs_deadline() {
    let test = "image::hostile::a_trickling_registry_does_not_outlive_the_jobs_deadline";
    if !crate::oci::can_run(test, "runc") {
        return;
    }
    let registry = Server::start(|path| {
        if path == "/v2/" {
            http("200 OK", "", b"{}")
        } else {
            Reply::Trickle {
                head: "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.manifest.v1+json\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n".into(),
                every: Duration::from_secs(1),
                for_at_most: Duration::from_secs(60),
            }
        }
    });
    let reference = format!("{}/slow/img:1", registry.host());
    let c = crate::coordinator::Coordinator::start();
    let f = crate::oci::Fixture::new("runc");
    let id = c.submit(serde_json::json!({
        "dockerSteps": [{"key": "x", "image": reference, "dir": "", "env": [], "commands": ["true"]}]
    }));
    let prefix = format!("slow{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut cmd = common::executor();
    c.executor_env(&mut cmd);
    cmd.env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "oci")
        .env("EXECUTOR_OCI_RUNTIME", "runc")
        .env("EXECUTOR_STATE_DIR", f.state())
        .env("EXECUTOR_VM_PREFIX", &prefix)
        .env("EXECUTOR_JOB_MEMORY", "200M")
        .env("EXECUTOR_JOB_NUM_CPUS", "1")
        .env("EXECUTOR_NUM_TOTAL_JOBS", "1")
        .env("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", "10s")
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
        .env("EXECUTOR_PRIVATE_REGISTRIES", registry.host())
        .env("EXECUTOR_IMAGE_PULL", "missing")
        .arg("loop");
    let started = Instant::now();
    let out = common::run(&mut cmd);
    let took = started.elapsed();
    let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(30));
    assert_ne!(job["state"], "completed", "{job:#}");
    eprintln!(
        "the loop took {took:?} for a job with a 10 s deadline: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(took < Duration::from_secs(15), "the job outlived its deadline: {took:?}");
    let logs = job["logs"].to_string();
    assert!(logs.contains("setup.image.pull"), "{job:#}");
}

/// A registry listed by the operator redirects a job's pull to a host-only service: the
/// service sees no request and the job's log quotes nothing of it.
#[test]
fn a_jobs_log_quotes_nothing_a_redirect_reached() {
    let test = "image::hostile::a_jobs_log_quotes_nothing_a_redirect_reached";
    if !crate::oci::can_run(test, "runc") {
        return;
    }
    let service = Server::start(|_| http("200 OK", "", SECRET.as_bytes()));
    let svc = service.host();
    let registry = Server::start(move |path| {
        if path == "/v2/" {
            http("200 OK", "", b"{}")
        } else {
            http("302 Found", &format!("Location: http://{svc}/latest/meta-data/{SECRET}\r\n"), b"")
        }
    });
    let reference = format!("{}/team/img:1", registry.host());
    let c = crate::coordinator::Coordinator::start();
    let f = crate::oci::Fixture::new("runc");
    let id = c.submit(serde_json::json!({
        "dockerSteps": [{"key": "x", "image": reference, "dir": "", "env": [], "commands": ["true"]}]
    }));
    let prefix = format!("redir{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut cmd = common::executor();
    c.executor_env(&mut cmd);
    cmd.env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "oci")
        .env("EXECUTOR_OCI_RUNTIME", "runc")
        .env("EXECUTOR_STATE_DIR", f.state())
        .env("EXECUTOR_VM_PREFIX", &prefix)
        .env("EXECUTOR_JOB_MEMORY", "200M")
        .env("EXECUTOR_JOB_NUM_CPUS", "1")
        .env("EXECUTOR_NUM_TOTAL_JOBS", "1")
        .env("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", "60s")
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
        .env("EXECUTOR_PRIVATE_REGISTRIES", registry.host())
        .env("EXECUTOR_IMAGE_PULL", "missing")
        .arg("loop");
    common::run(&mut cmd);
    let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(60));
    assert_ne!(job["state"], "completed", "{job:#}");
    let logs = job["logs"].to_string();
    assert!(logs.contains("resolves to a private"), "{job:#}");
    assert!(
        !logs.contains(SECRET) && !logs.contains("meta-data"),
        "the job's log quotes the redirect: {logs}"
    );
    assert_eq!(service.paths(), Vec::<String>::new(), "the host-only service was asked");
}
