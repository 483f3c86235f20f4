//! Clone tests against `git upload-pack` (githttp) behind a minimal job-token check on loopback: every
//! clone variant, the token kept out of argv/config/logs, missing commits, a damaged cache.

use super::*;
use crate::githttp::{self, GitRoute};
use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

const TOKEN: &str = "0123456789abcdef0123456789abcdef01234567";

struct Server {
    url: String,
    _rt: tokio::runtime::Runtime,
}

fn serve(repos: HashMap<String, PathBuf>) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let repos = Arc::new(repos);
    let app = axum::Router::new().fallback(move |req: Request<Body>| {
        let repos = repos.clone();
        async move {
            let (parts, body) = req.into_parts();
            let auth = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
            if auth != format!("Bearer {TOKEN}") {
                return Response::builder().status(StatusCode::UNAUTHORIZED).body(Body::empty()).unwrap();
            }
            let path = parts.uri.path().trim_start_matches("/.executors/git/").to_string();
            let Some((name, route)) = GitRoute::split(&path) else {
                return Response::builder().status(StatusCode::NOT_FOUND).body(Body::empty()).unwrap();
            };
            let Some(dir) = repos.get(name) else {
                return Response::builder().status(StatusCode::NOT_FOUND).body(Body::empty()).unwrap();
            };
            githttp::serve(dir, route, &parts.method, parts.uri.query(), &parts.headers, body).await
        }
    });
    rt.spawn(async move { axum::serve(listener, app).await });
    Server { url, _rt: rt }
}

fn sh(dir: &Path, script: &str) -> String {
    let o = Command::new("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@t")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@t")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .unwrap();
    assert!(o.status.success(), "{script}: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// A repository with three commits, a tag, a subdirectory and a 1 MiB file.
fn fixture(root: &Path) -> (PathBuf, Vec<String>) {
    let repo = root.join("origin");
    std::fs::create_dir_all(&repo).unwrap();
    sh(&repo, "git init -q -b main . && echo one > a.txt && mkdir -p sub/deep && echo s > sub/deep/s.txt && git add -A && git commit -qm one");
    let c1 = sh(&repo, "git rev-parse HEAD");
    sh(&repo, "git tag v1 && head -c 1048576 /dev/urandom > big.bin && echo two > a.txt && git add -A && git commit -qm two");
    let c2 = sh(&repo, "git rev-parse HEAD");
    sh(&repo, "echo three > a.txt && echo other > other.txt && git add -A && git commit -qm three");
    let c3 = sh(&repo, "git rev-parse HEAD");
    (repo, vec![c1, c2, c3])
}

/// key, argv, output, exit code
type Entry = (String, Option<Vec<String>>, String, Option<i32>);

#[derive(Default)]
struct MemLog {
    entries: Vec<Entry>,
}

struct MemWriter<'a> {
    log: &'a mut MemLog,
    idx: usize,
}

impl CommandLog for MemLog {
    fn start(&mut self, key: &str, command: Option<Vec<String>>) -> Box<dyn LogWriter + '_> {
        self.entries.push((key.to_string(), command, String::new(), None));
        let idx = self.entries.len() - 1;
        Box::new(MemWriter { log: self, idx })
    }
}

impl LogWriter for MemWriter<'_> {
    fn output(&mut self, _stream: Stream, data: &[u8]) {
        self.log.entries[self.idx].2.push_str(&String::from_utf8_lossy(data));
    }
    fn finish(&mut self, exit_code: i32) {
        self.log.entries[self.idx].3 = Some(exit_code);
    }
}

fn request(server: &Server, ws: &Path, commit: &str) -> CloneRequest {
    CloneRequest {
        frontend_url: server.url.clone(),
        repository_name: "github.com/acme/widgets".into(),
        commit: commit.into(),
        fetch_tags: false,
        shallow: false,
        sparse: vec![],
        dir: ws.join("repo"),
        auth: GitAuth { token: TOKEN.into(), job_id: 1, executor_name: "e".into(), secret: None },
        cache: None,
        step_timeout: Duration::from_secs(60),
        ca_file: None,
        max_bytes: 0,
        workspace: ws.to_path_buf(),
        progress: false,
        cancel: None,
    }
}

fn setup() -> (tempfile::TempDir, Server, Vec<String>) {
    let tmp = tempfile::tempdir().unwrap();
    let (repo, commits) = fixture(tmp.path());
    let server = serve(HashMap::from([("github.com/acme/widgets".to_string(), repo)]));
    (tmp, server, commits)
}

fn head(dir: &Path) -> String {
    sh(dir, "git rev-parse HEAD")
}

fn assert_no_token(ws: &Path, log: &MemLog) {
    let config = std::fs::read_to_string(ws.join("repo/.git/config")).unwrap();
    assert!(!config.contains(TOKEN), "token in .git/config");
    for (key, cmd, out, _) in &log.entries {
        assert!(!format!("{cmd:?}").contains(TOKEN), "token in argv of {key}");
        assert!(!out.contains(TOKEN), "token in output of {key}");
    }
}

#[test]
fn plain_clone_at_an_older_commit() {
    let (tmp, server, commits) = setup();
    let ws = tmp.path().join("ws");
    let mut log = MemLog::default();
    clone(&request(&server, &ws, &commits[1]), &mut log).unwrap();
    let repo = ws.join("repo");
    assert_eq!(head(&repo), commits[1]);
    assert_eq!(std::fs::read_to_string(repo.join("a.txt")).unwrap(), "two\n");
    assert!(!repo.join("other.txt").exists());
    let keys: Vec<&str> = log.entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        keys,
        [
            "setup.git.init",
            "setup.git.add-remote",
            "setup.git.disable-gc",
            "setup.git.fetch",
            "setup.git.checkout",
            "setup.git.set-remote"
        ]
    );
    assert!(log.entries.iter().all(|e| e.3 == Some(0)));
    assert_eq!(sh(&repo, "git remote get-url origin"), "github.com/acme/widgets");
    assert_no_token(&ws, &log);
}

#[test]
fn shallow_sparse_and_tags() {
    let (tmp, server, commits) = setup();
    let ws = tmp.path().join("shallow");
    let mut req = request(&server, &ws, &commits[2]);
    req.shallow = true;
    clone(&req, &mut MemLog::default()).unwrap();
    assert_eq!(sh(&ws.join("repo"), "git rev-list --count HEAD"), "1");
    assert_eq!(sh(&ws.join("repo"), "git tag"), "");

    let ws = tmp.path().join("tags");
    let mut req = request(&server, &ws, &commits[2]);
    req.fetch_tags = true;
    clone(&req, &mut MemLog::default()).unwrap();
    assert_eq!(sh(&ws.join("repo"), "git tag"), "v1");
    assert_eq!(sh(&ws.join("repo"), "git rev-list --count HEAD"), "3");

    let ws = tmp.path().join("sparse");
    let mut req = request(&server, &ws, &commits[2]);
    req.sparse = vec!["sub/".into()];
    let mut log = MemLog::default();
    clone(&req, &mut log).unwrap();
    let repo = ws.join("repo");
    assert!(repo.join("sub/deep/s.txt").exists());
    assert!(!repo.join("a.txt").exists() && !repo.join("big.bin").exists());
    assert!(log.entries.iter().any(|e| e.0 == "setup.git.sparse-checkout-set"));
    assert_no_token(&ws, &log);
}

#[test]
fn missing_commit_names_repository_and_commit() {
    let (tmp, server, _) = setup();
    let ws = tmp.path().join("ws");
    let missing = "1234567890123456789012345678901234567890";
    let err = format!("{:#}", clone(&request(&server, &ws, missing), &mut MemLog::default()).unwrap_err());
    assert!(err.contains(missing) && err.contains("github.com/acme/widgets"), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn wrong_token_is_refused() {
    let (tmp, server, commits) = setup();
    let ws = tmp.path().join("ws");
    let mut req = request(&server, &ws, &commits[0]);
    req.auth.token = "f".repeat(40);
    let err = format!("{:#}", clone(&req, &mut MemLog::default()).unwrap_err());
    assert!(err.contains("failed setup.git.fetch"), "{err}");
}

#[test]
fn cache_serves_the_second_job_and_survives_damage() {
    let (tmp, server, commits) = setup();
    let cache = ObjectCache::new(tmp.path().join("cache"));
    let mut req = request(&server, &tmp.path().join("ws1"), &commits[1]);
    req.cache = Some(cache.clone());
    let mut log = MemLog::default();
    clone(&req, &mut log).unwrap();
    assert_eq!(head(&tmp.path().join("ws1/repo")), commits[1]);
    let said: String = log.entries.iter().filter(|e| e.0 == "setup.git.cache").map(|e| e.2.clone()).collect();
    assert!(said.contains("seeded the object cache"), "{said}");

    // Second job, newer commit: the workspace fetches from the cache.
    let mut req = request(&server, &tmp.path().join("ws2"), &commits[2]);
    req.cache = Some(cache.clone());
    let mut log = MemLog::default();
    clone(&req, &mut log).unwrap();
    assert_eq!(head(&tmp.path().join("ws2/repo")), commits[2]);
    let cache_dir = cache.repo_dir(&server.url, "github.com/acme/widgets");
    let copied: String =
        log.entries.iter().filter(|e| e.0 == "setup.git.cache").map(|e| e.2.clone()).collect();
    assert!(copied.contains("copied"), "{copied}");
    // The fetch found the commit among the copied objects: nothing came over the network.
    let fetch = log.entries.iter().find(|e| e.0 == "setup.git.fetch").unwrap();
    assert!(!fetch.2.contains("Receiving objects"), "{}", fetch.2);
    // Workspace objects are its own copies, not links into the cache.
    let linked = sh(&tmp.path().join("ws2/repo"), "find .git/objects -type f -links +1 | wc -l");
    assert_eq!(linked, "0");
    // The fetch's hint ref is gone, and the history the hint vouched for is all there.
    assert_eq!(sh(&tmp.path().join("ws2/repo"), "git for-each-ref refs/executor"), "");
    sh(&tmp.path().join("ws2/repo"), "git fsck --no-progress");

    // Damage: remove every object of the cache but keep its refs.
    sh(&cache_dir, "rm -rf objects/pack/* objects/??");
    let mut req = request(&server, &tmp.path().join("ws3"), &commits[2]);
    req.cache = Some(cache.clone());
    let mut log = MemLog::default();
    clone(&req, &mut log).unwrap();
    let repo = tmp.path().join("ws3/repo");
    assert_eq!(head(&repo), commits[2]);
    assert_eq!(std::fs::read_to_string(repo.join("a.txt")).unwrap(), "three\n");
    sh(&repo, "git fsck --no-progress");

    // Garbage packs: git's fetch also refetches what it cannot read.
    sh(&cache_dir, "for p in objects/pack/*.pack; do head -c 100 /dev/urandom > $p; done; rm -rf objects/??");
    let mut req = request(&server, &tmp.path().join("ws5"), &commits[2]);
    req.cache = Some(cache.clone());
    clone(&req, &mut MemLog::default()).unwrap();
    assert_eq!(head(&tmp.path().join("ws5/repo")), commits[2]);
    sh(&tmp.path().join("ws5/repo"), "git fsck --no-progress");

    // Damage git cannot repair: the object store is not a directory any more.
    sh(&cache_dir, "rm -rf objects && echo garbage > objects");
    let mut req = request(&server, &tmp.path().join("ws4"), &commits[2]);
    req.cache = Some(cache.clone());
    let mut log = MemLog::default();
    clone(&req, &mut log).unwrap();
    let repo = tmp.path().join("ws4/repo");
    assert_eq!(head(&repo), commits[2]);
    sh(&repo, "git fsck --no-progress");
    let said: String = log.entries.iter().map(|e| format!("{} {:?}\n{}\n", e.0, e.3, e.2)).collect();
    assert!(said.contains("removing it and cloning from the coordinator"), "{said}");
}

#[test]
fn concurrent_jobs_share_the_cache_safely() {
    let (tmp, server, commits) = setup();
    let cache = ObjectCache::new(tmp.path().join("cache"));
    let server = Arc::new(server);
    let results = Arc::new(Mutex::new(Vec::new()));
    std::thread::scope(|s| {
        for i in 0..4 {
            let (cache, commits, results, server) =
                (cache.clone(), commits.clone(), results.clone(), server.clone());
            let ws = tmp.path().join(format!("ws{i}"));
            s.spawn(move || {
                let mut req = request(&server, &ws, &commits[i % 3]);
                req.cache = Some(cache);
                let r = clone(&req, &mut MemLog::default()).map(|_| head(&ws.join("repo")));
                results.lock().unwrap().push((i, r.map_err(|e| format!("{e:#}"))));
            });
        }
    });
    for (i, r) in results.lock().unwrap().iter() {
        assert_eq!(r.as_ref().unwrap(), &commits[i % 3]);
    }
}

#[test]
fn workspace_cap_is_enforced() {
    let (tmp, server, commits) = setup();
    let ws = tmp.path().join("ws");
    let mut req = request(&server, &ws, &commits[2]);
    req.max_bytes = 256 << 10;
    let err = format!("{:#}", clone(&req, &mut MemLog::default()).unwrap_err());
    assert!(err.contains("workspace cap"), "{err}");
}

/// The git route without `git http-backend`: a protocol v0 client (what git speaks unless told
/// otherwise, or an older git) still lists and fetches; a request body compressed as git
/// compresses long negotiations is read; anything but an upload-pack request is refused.
#[test]
fn the_route_serves_v0_and_compressed_requests() {
    let (tmp, server, commits) = setup();
    let url = format!("{}/.executors/git/github.com/acme/widgets", server.url);
    let auth = format!("http.extraHeader=Authorization: Bearer {TOKEN}");
    let refs = sh(tmp.path(), &format!("git -c '{auth}' -c protocol.version=0 ls-remote '{url}'"));
    assert!(refs.contains(&format!("{}\trefs/heads/main", commits[2])), "{refs}");
    let v0 = tmp.path().join("v0");
    sh(tmp.path(), &format!("git -c '{auth}' -c protocol.version=0 clone -q '{url}' '{}'", v0.display()));
    assert_eq!(head(&v0), commits[2]);

    let ls_refs = b"0014command=ls-refs\n0000";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, ls_refs).unwrap();
    let post = |body: &[u8], kind: &str, encoding: Option<&str>| {
        let mut r = ureq::post(&format!("{url}/git-upload-pack"))
            .set("Authorization", &format!("Bearer {TOKEN}"))
            .set("Git-Protocol", "version=2")
            .set("Content-Type", kind);
        if let Some(e) = encoding {
            r = r.set("Content-Encoding", e);
        }
        match r.send_bytes(body) {
            Ok(resp) => (resp.status(), resp.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_string().unwrap_or_default()),
            Err(e) => panic!("{e}"),
        }
    };
    let kind = "application/x-git-upload-pack-request";
    let (code, plain) = post(ls_refs, kind, None);
    assert_eq!(code, 200, "{plain}");
    assert!(plain.contains(&format!("{} refs/heads/main", commits[2])), "{plain}");
    let (code, unzipped) = post(&gz.finish().unwrap(), kind, Some("gzip"));
    assert_eq!((code, &unzipped), (200, &plain));
    assert_eq!(post(ls_refs, "text/plain", None).0, 415);
    assert_eq!(post(b"not gzip", kind, Some("gzip")).0, 400);
}
