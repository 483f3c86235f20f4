//! prepare-workspace against the real coordinator: clone variants, the job token kept out of
//! everything a job or an operator sees, hostile repositories, files from the files store, and the
//! object cache across jobs.

use crate::common::{self, Exec};
use crate::coordinator::Coordinator;
use crate::gitserve::make_repo;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Output;

struct Stages<'a> {
    c: &'a Coordinator,
    state: tempfile::TempDir,
}

impl Stages<'_> {
    fn new(c: &Coordinator) -> Stages<'_> {
        Stages { c, state: tempfile::tempdir().unwrap() }
    }

    /// A stage, as an executor configured for the shell runtime runs it.
    fn exec(&self) -> Exec {
        Exec::new()
            .with(|cmd| self.c.executor_env(cmd))
            .env("EXECUTOR_QUEUE_NAME", "batches")
            .env("EXECUTOR_RUNTIME", "shell")
            .env("EXECUTOR_ALLOW_UNISOLATED", "1")
            .env("EXECUTOR_STATE_DIR", self.state.path())
    }

    /// Runs a stage whatever its status.
    fn stage(&self, args: &[&str]) -> Output {
        self.exec().args(args).any_status().run()
    }

    /// dequeue + prepare-workspace; returns (document path, prepare's output).
    fn prepare(&self) -> (PathBuf, Output) {
        let d = self.state.path().join(format!("doc-{}.json", uuid::Uuid::new_v4()));
        self.exec().args(["dequeue", "-o", d.to_str().unwrap()]).run();
        let o = self.stage(&["prepare-workspace", "-i", d.to_str().unwrap(), "-o", d.to_str().unwrap()]);
        (d, o)
    }

    fn finish(&self, d: &Path) {
        for s in ["vm-boot", "run-steps", "upload", "complete"] {
            self.stage(&[s, "-i", d.to_str().unwrap(), "-o", d.to_str().unwrap()]);
        }
    }
}

fn doc(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn workspace(d: &Path) -> PathBuf {
    PathBuf::from(doc(d)["workspace"]["path"].as_str().unwrap())
}

fn git(dir: &Path, args: &[&str]) -> String {
    common::sh(dir, &format!("git {}", args.join(" ")))
}

fn register(c: &Coordinator, name: &str, path: &Path) {
    Exec::new()
        .with(|cmd| c.admin_env(cmd))
        .args(["queue", "repo", "add", name, path.to_str().unwrap()])
        .run();
}

fn log_keys(job: &Value) -> Vec<String> {
    job["logs"].as_array().unwrap().iter().map(|e| e["key"].as_str().unwrap().to_string()).collect()
}

#[test]
fn clone_variants_produce_the_right_tree() {
    let c = Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, c1, c2) = make_repo(tmp.path(), "origin");
    register(&c, "github.com/acme/w", &repo);
    let ex = Stages::new(&c);

    // Plain, at the older commit, in a repositoryDirectory.
    let id = c
        .submit(json!({"repositoryName": "github.com/acme/w", "commit": c1, "repositoryDirectory": "src/w",
        "dockerSteps": [{"image": "x", "commands": ["true"]}]}));
    let (d, o) = ex.prepare();
    common::assert_ok(&o);
    let r = workspace(&d).join("src/w");
    assert_eq!(git(&r, &["rev-parse", "HEAD"]), c1);
    assert_eq!(std::fs::read_to_string(r.join("a.txt")).unwrap(), "one\n");
    assert_eq!(git(&r, &["remote", "get-url", "origin"]), "github.com/acme/w");
    let keys = log_keys(&c.job(id));
    let git_keys: Vec<&str> =
        keys.iter().map(String::as_str).filter(|k| k.starts_with("setup.git.")).collect();
    let want = [
        "setup.git.init",
        "setup.git.add-remote",
        "setup.git.disable-gc",
        "setup.git.fetch",
        "setup.git.checkout",
        "setup.git.set-remote",
    ];
    let ordered: Vec<&str> = git_keys.iter().copied().filter(|k| want.contains(k)).collect();
    assert_eq!(ordered, want, "{keys:?}");
    ex.finish(&d);

    // Shallow.
    c.submit(
        json!({"repositoryName": "github.com/acme/w", "commit": c2, "shallowClone": true, "dockerSteps": []}),
    );
    let (d, o) = ex.prepare();
    common::assert_ok(&o);
    assert_eq!(git(&workspace(&d), &["rev-list", "--count", "HEAD"]), "1");
    ex.finish(&d);

    // Sparse.
    c.submit(json!({"repositoryName": "github.com/acme/w", "commit": c2, "sparseCheckout": ["sub/"], "dockerSteps": []}));
    let (d, o) = ex.prepare();
    common::assert_ok(&o);
    let ws = workspace(&d);
    assert!(ws.join("sub/s.txt").exists() && !ws.join("a.txt").exists());
    ex.finish(&d);

    // A repositoryDirectory that leaves the workspace never becomes a job (the executor refuses
    // it too, for coordinators that do not check: see the workspace unit tests).
    let (code, body) = c.request(
        "POST",
        "/api/jobs",
        Some(&c.admin_auth()),
        Some(
            &json!({"repositoryName": "github.com/acme/w", "commit": c2, "repositoryDirectory": "../out"})
                .to_string(),
        ),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("repositoryDirectory"), "{body}");
}

#[test]
fn token_never_reaches_config_logs_documents_or_steps() {
    let c = Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, _, c2) = make_repo(tmp.path(), "origin");
    register(&c, "github.com/acme/w", &repo);
    let ex = Stages::new(&c);
    let id = c.submit(json!({"repositoryName": "github.com/acme/w", "commit": c2,
        "dockerSteps": [{"image": "x", "commands": ["env", "cat .git/config", "cat /proc/$PPID/environ | tr '\\0' '\\n'"]}]}));
    let (d, o) = ex.prepare();
    common::assert_ok(&o);
    let token =
        executor::document::unseal_job(doc(&d)["sealedJob"].as_str().unwrap(), &c.secret).unwrap().token;
    assert_eq!(token.len(), 40);
    let config = std::fs::read_to_string(workspace(&d).join(".git/config")).unwrap();
    assert!(!config.contains(&token));
    let doc_text = std::fs::read_to_string(&d).unwrap();
    ex.finish(&d);
    assert!(!doc_text.contains(&token));
    let job = c.wait_state(id, &["completed"], std::time::Duration::from_secs(20));
    let text = job.to_string();
    assert!(text.contains("PATH="), "the step's env was printed: {text}");
    assert!(!text.contains(&token), "the token reached a log");
    assert!(!text.contains(&c.secret));
}

#[test]
fn hostile_repository_and_paths_fail_cleanly() {
    let c = Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let outside = tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let repo = tmp.path().join("evil");
    std::fs::create_dir(&repo).unwrap();
    std::os::unix::fs::symlink(&outside, repo.join("evil")).unwrap();
    let commit =
        common::sh(&repo, "git init -q . && git add -A && git commit -qm evil && git rev-parse HEAD");
    register(&c, "evil", &repo);
    let ex = Stages::new(&c);

    for (path, _) in [("/tmp/abs", "absolute"), ("a/../../x", "..")] {
        let job = json!({"repositoryName": "evil", "commit": commit, "files": {path: {"content": "x"}}});
        let (code, body) = c.request("POST", "/api/jobs", Some(&c.admin_auth()), Some(&job.to_string()));
        assert_eq!(code, 400, "{path}: {body}");
    }
    // The checked-out symlink can only be caught by the executor.
    let id = c.submit(
        json!({"repositoryName": "evil", "commit": commit, "files": {"evil/passwd": {"content": "pwned"}}, "dockerSteps": []}),
    );
    let (d, o) = ex.prepare();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("symlink"), "{err}");
    ex.finish(&d);
    let job = c.wait_state(id, &["failed", "errored"], std::time::Duration::from_secs(10));
    assert!(job["failureMessage"].as_str().unwrap().contains("symlink"), "{job}");
    assert_eq!(
        std::fs::read_dir(&outside).unwrap().count(),
        0,
        "something was written outside the workspace"
    );
    assert!(!Path::new("/tmp/abs").exists());
}

#[test]
fn missing_commit_and_files_store_and_cache() {
    let c = Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, c1, c2) = make_repo(tmp.path(), "origin");
    register(&c, "github.com/acme/w", &repo);
    let ex = Stages::new(&c);

    let missing = "0123456789012345678901234567890123456789";
    let id = c.submit(json!({"repositoryName": "github.com/acme/w", "commit": missing, "dockerSteps": []}));
    let (d, o) = ex.prepare();
    assert_eq!(o.status.code(), Some(1));
    ex.finish(&d);
    let job = c.wait_state(id, &["failed", "errored"], std::time::Duration::from_secs(10));
    let msg = job["failureMessage"].as_str().unwrap();
    assert!(
        msg.contains(missing) && msg.contains("github.com/acme/w") && msg.contains("does not exist"),
        "{msg}"
    );

    // A file from the files store, with its modifiedAt.
    let f = tmp.path().join("payload");
    std::fs::write(&f, b"from the store").unwrap();
    Exec::new()
        .with(|cmd| c.admin_env(cmd))
        .args(["queue", "files", "put", "batch-changes", "s/f", f.to_str().unwrap()])
        .run();
    c.submit(json!({"repositoryName": "github.com/acme/w", "commit": c1, "dockerSteps": [],
        "files": {"in/f.txt": {"bucket": "batch-changes", "key": "s/f", "modifiedAt": "2021-02-03T04:05:06Z"}}}));
    let (d, o) = ex.prepare();
    common::assert_ok(&o);
    let written = workspace(&d).join("in/f.txt");
    assert_eq!(std::fs::read(&written).unwrap(), b"from the store");
    let mtime = std::fs::metadata(&written).unwrap().modified().unwrap();
    assert_eq!(mtime.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(), 1612325106);
    ex.finish(&d);

    // The second job on the repository fetched into and from the object cache.
    let id = c.submit(json!({"repositoryName": "github.com/acme/w", "commit": c2, "dockerSteps": []}));
    let (d, o) = ex.prepare();
    common::assert_ok(&o);
    assert_eq!(git(&workspace(&d), &["rev-parse", "HEAD"]), c2);
    ex.finish(&d);
    let keys = log_keys(&c.wait_state(id, &["completed"], std::time::Duration::from_secs(10)));
    assert!(keys.iter().any(|k| k == "setup.git.cache-fetch"), "{keys:?}");
    let caches: Vec<_> = std::fs::read_dir(ex.state.path().join("cache/git")).unwrap().flatten().collect();
    assert!(caches.iter().any(|e| e.file_name().to_string_lossy().ends_with(".git")));
}
