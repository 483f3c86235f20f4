//! The coordinator serves registered repositories over git's smart HTTP protocol to the token of
//! a job on that repository only, and serves stored files to jobs that reference them.

use crate::common::{self, Exec};
use crate::coordinator::Coordinator;
use serde_json::json;
use std::path::Path;
use std::process::Command;

/// Makes a repository with two commits; returns (path, first commit, second commit).
pub fn make_repo(root: &Path, name: &str) -> (std::path::PathBuf, String, String) {
    let repo = root.join(name);
    std::fs::create_dir_all(&repo).unwrap();
    common::sh(&repo, "git init -q -b main . && echo one > a.txt && git add -A && git commit -qm one");
    let c1 = common::sh(&repo, "git rev-parse HEAD");
    common::sh(
        &repo,
        "echo two > a.txt && mkdir -p sub && echo s > sub/s.txt && git add -A && git commit -qm two",
    );
    let c2 = common::sh(&repo, "git rev-parse HEAD");
    (repo, c1, c2)
}

/// `executor queue ...` with the admin token.
fn queue_cli(c: &Coordinator) -> Exec {
    Exec::new().with(|cmd| c.admin_env(cmd)).arg("queue")
}

/// `git ls-remote` through the coordinator with the given headers; returns (success, stderr).
fn ls_remote(c: &Coordinator, name: &str, headers: &[String]) -> (bool, String) {
    let mut cmd = Command::new("git");
    cmd.env("GIT_CONFIG_NOSYSTEM", "1").env("GIT_CONFIG_GLOBAL", "/dev/null").env("GIT_TERMINAL_PROMPT", "0");
    cmd.env("GIT_CONFIG_COUNT", headers.len().to_string());
    for (i, h) in headers.iter().enumerate() {
        cmd.env(format!("GIT_CONFIG_KEY_{i}"), "http.extraHeader").env(format!("GIT_CONFIG_VALUE_{i}"), h);
    }
    let o = cmd
        .args(["-c", "protocol.version=2", "ls-remote"])
        .arg(format!("{}/.executors/git/{name}", c.url))
        .output()
        .unwrap();
    (o.status.success(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// Git's words for a 401: it asks for a username, which the test forbids.
fn unauthorized(err: &str) -> bool {
    err.contains("401") || err.contains("could not read Username") || err.contains("Authentication failed")
}

fn job_headers(job: &serde_json::Value, executor: &str) -> Vec<String> {
    vec![
        format!("Authorization: Bearer {}", job["token"].as_str().unwrap()),
        format!("X-Sourcegraph-Job-ID: {}", job["id"]),
        format!("X-Sourcegraph-Executor-Name: {executor}"),
    ]
}

#[test]
fn repositories_are_served_only_to_their_jobs() {
    let c = Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo_a, _, c2) = make_repo(tmp.path(), "a");
    let (repo_b, _, _) = make_repo(tmp.path(), "b");
    for (name, path) in [("github.com/acme/a", &repo_a), ("github.com/acme/b", &repo_b)] {
        queue_cli(&c).args(["repo", "add", name, path.to_str().unwrap()]).run();
    }
    let o = queue_cli(&c).args(["repo", "ls", "--json"]).run();
    let listed: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(listed["repos"].as_array().unwrap().len(), 2);
    queue_cli(&c).args(["repo", "add", "bad/../name", repo_a.to_str().unwrap()]).fails().run();
    // A directory that is not a repository must be refused.
    queue_cli(&c)
        .args(["repo", "add", "x", tmp.path().to_str().unwrap()])
        .fails()
        .stderr_has("not a git repository")
        .run();

    c.submit(json!({"repositoryName": "github.com/acme/a", "commit": c2, "dockerSteps": []}));
    c.submit(json!({"repositoryName": "github.com/acme/unregistered", "commit": c2, "dockerSteps": []}));
    let ex = c.executor("exec-1");
    ex.heartbeat("batches", &[]);
    let job_a = ex.dequeue("batches", "").unwrap();
    let job_u = ex.dequeue("batches", "").unwrap();

    let (ok, err) = ls_remote(&c, "github.com/acme/a", &job_headers(&job_a, "exec-1"));
    assert!(ok, "{err}");
    // A full fetch of one commit by its hash, with protocol v2.
    let clone = tmp.path().join("clone");
    std::fs::create_dir(&clone).unwrap();
    common::sh(&clone, "git init -q .");
    let mut fetch = Command::new("git");
    fetch.current_dir(&clone).env("GIT_CONFIG_GLOBAL", "/dev/null").env("GIT_CONFIG_COUNT", "3");
    for (i, h) in job_headers(&job_a, "exec-1").iter().enumerate() {
        fetch.env(format!("GIT_CONFIG_KEY_{i}"), "http.extraHeader").env(format!("GIT_CONFIG_VALUE_{i}"), h);
    }
    let o = fetch
        .args(["-c", "protocol.version=2", "fetch", "--depth=1"])
        .arg(format!("{}/.executors/git/github.com/acme/a", c.url))
        .arg(&c2)
        .output()
        .unwrap();
    common::assert_ok(&o);
    assert_eq!(common::sh(&clone, "git rev-parse FETCH_HEAD"), c2);

    // Another job's token, for another repository: 403.
    let (ok, err) = ls_remote(&c, "github.com/acme/b", &job_headers(&job_a, "exec-1"));
    assert!(!ok && err.contains("403"), "{err}");
    // No token: 401.
    let (ok, err) = ls_remote(&c, "github.com/acme/a", &[]);
    assert!(!ok && unauthorized(&err), "{err}");
    // The contract's fallback for callers without a job token (Sourcegraph's test-vm): the shared
    // secret from an executor that heartbeated reads a served repository; a wrong secret, an
    // executor never seen, or no executor headers do not.
    let secret = |s: &str, name: &str| {
        vec![
            format!("Authorization: token-executor {s}"),
            "X-Sourcegraph-Job-ID: 0".to_string(),
            format!("X-Sourcegraph-Executor-Name: {name}"),
        ]
    };
    let (ok, err) = ls_remote(&c, "github.com/acme/b", &secret(&c.secret, "exec-1"));
    assert!(ok, "{err}");
    let (ok, err) = ls_remote(&c, "github.com/acme/a", &secret(&"x".repeat(c.secret.len()), "exec-1"));
    assert!(!ok && err.contains("403"), "{err}");
    let (ok, err) = ls_remote(&c, "github.com/acme/a", &secret(&c.secret, "never-seen"));
    assert!(!ok && unauthorized(&err), "{err}");
    let (ok, err) =
        ls_remote(&c, "github.com/acme/a", &[format!("Authorization: token-executor {}", c.secret)]);
    assert!(!ok && err.contains("400"), "{err}");
    // A job on a repository nobody registered: 404.
    let (ok, err) = ls_remote(&c, "github.com/acme/unregistered", &job_headers(&job_u, "exec-1"));
    assert!(!ok && (err.contains("404") || err.contains("not found")), "{err}");
    // Pushes are refused.
    let (code, _) =
        c.request("GET", "/.executors/git/github.com/acme/a/info/refs?service=git-receive-pack", None, None);
    assert!(code == 401 || code == 403, "{code}");

    // Once the job is finished its token is gone.
    assert_eq!(ex.mark("batches", &job_a, "markComplete", ""), 204);
    let (ok, err) = ls_remote(&c, "github.com/acme/a", &job_headers(&job_a, "exec-1"));
    assert!(!ok && unauthorized(&err), "{err}");

    queue_cli(&c).args(["repo", "rm", "github.com/acme/b"]).run();
    queue_cli(&c).args(["repo", "rm", "github.com/acme/b"]).fails().run();
}

#[test]
fn files_are_served_to_jobs_that_reference_them() {
    let c = Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("input.bin");
    std::fs::write(&f, b"file store bytes\x00\x01").unwrap();
    queue_cli(&c).args(["files", "put", "batch-changes", "spec1/file1", f.to_str().unwrap()]).run();
    queue_cli(&c).args(["files", "put", "batch-changes", "../escape", f.to_str().unwrap()]).fails().run();

    c.submit(
        json!({"files": {"in.bin": {"bucket": "batch-changes", "key": "spec1/file1"}}, "dockerSteps": []}),
    );
    c.submit(json!({"dockerSteps": []}));
    let ex = c.executor("exec-1");
    ex.heartbeat("batches", &[]);
    let with = ex.dequeue("batches", "").unwrap();
    let without = ex.dequeue("batches", "").unwrap();
    let get = |job: &serde_json::Value, path: &str| {
        let r = c
            .agent()
            .get(&format!("{}/.executors/files/{path}", c.url))
            .set("Authorization", &format!("Bearer {}", job["token"].as_str().unwrap()))
            .set("X-Sourcegraph-Job-ID", &job["id"].to_string())
            .set("X-Sourcegraph-Executor-Name", "exec-1")
            .call();
        match r {
            Ok(resp) => {
                let mut body = Vec::new();
                std::io::Read::read_to_end(&mut resp.into_reader(), &mut body).unwrap();
                (200, body)
            }
            Err(ureq::Error::Status(code, _)) => (code, Vec::new()),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(get(&with, "batch-changes/spec1/file1"), (200, b"file store bytes\x00\x01".to_vec()));
    assert_eq!(get(&without, "batch-changes/spec1/file1").0, 403);
    assert_eq!(get(&with, "batch-changes/spec1/missing").0, 403);
    let (code, _) = c.request("GET", "/.executors/files/batch-changes/spec1/file1", None, None);
    assert_eq!(code, 401);
}
