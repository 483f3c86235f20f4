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
        self.prepare_env(&[])
    }

    /// [`Stages::prepare`] with more environment for prepare-workspace.
    fn prepare_env(&self, env: &[(&str, &str)]) -> (PathBuf, Output) {
        let d = self.state.path().join(format!("doc-{}.json", uuid::Uuid::new_v4()));
        self.exec().args(["dequeue", "-o", d.to_str().unwrap()]).run();
        let mut e = self.exec();
        for (k, v) in env {
            e = e.env(k, v);
        }
        let o = e
            .args(["prepare-workspace", "-i", d.to_str().unwrap(), "-o", d.to_str().unwrap()])
            .any_status()
            .run();
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

    // The second job on the repository fetched into and from the object cache (without a
    // workspace template, which would spare it that).
    let id = c.submit(json!({"repositoryName": "github.com/acme/w", "commit": c2, "dockerSteps": []}));
    let (d, o) = ex.prepare_env(&[("EXECUTOR_WORKSPACE_TEMPLATES", "0")]);
    common::assert_ok(&o);
    assert_eq!(git(&workspace(&d), &["rev-parse", "HEAD"]), c2);
    ex.finish(&d);
    let keys = log_keys(&c.wait_state(id, &["completed"], std::time::Duration::from_secs(10)));
    assert!(keys.iter().any(|k| k == "setup.git.cache-fetch"), "{keys:?}");
    let caches: Vec<_> = std::fs::read_dir(ex.state.path().join("cache/git")).unwrap().flatten().collect();
    assert!(caches.iter().any(|e| e.file_name().to_string_lossy().ends_with(".git")));
}

/// Sourcegraph's shape: every job is `shallowClone: true`. A shallow job of a commit the object
/// cache has is made from the cache without asking the coordinator for anything (the test
/// removes the repository from the coordinator first), and it is exactly what a depth-1 clone
/// is: the commit's tree, `.git/shallow` naming the commit, no older object, and `git fsck`
/// clean.
#[test]
fn shallow_job_is_served_from_the_cache() {
    let c = Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, c1, c2) = make_repo(tmp.path(), "origin");
    register(&c, "github.com/acme/w", &repo);
    let ex = Stages::new(&c);
    let no_templates = [("EXECUTOR_WORKSPACE_TEMPLATES", "0")];
    // A full clone seeds the cache.
    c.submit(json!({"repositoryName": "github.com/acme/w", "commit": c2, "dockerSteps": []}));
    let (d, o) = ex.prepare_env(&no_templates);
    common::assert_ok(&o);
    ex.finish(&d);

    // The coordinator no longer serves the repository: only the cache can.
    Exec::new().with(|cmd| c.admin_env(cmd)).args(["queue", "repo", "rm", "github.com/acme/w"]).run();
    let id = c.submit(
        json!({"repositoryName": "github.com/acme/w", "commit": c2, "shallowClone": true, "dockerSteps": []}),
    );
    let (d, o) = ex.prepare_env(&no_templates);
    common::assert_ok(&o);
    let ws = workspace(&d);
    assert_eq!(git(&ws, &["rev-parse", "HEAD"]), c2);
    assert_eq!(git(&ws, &["rev-parse", "--is-shallow-repository"]), "true");
    assert_eq!(std::fs::read_to_string(ws.join(".git/shallow")).unwrap().trim(), c2);
    assert_eq!(git(&ws, &["rev-list", "--count", "HEAD"]), "1");
    git(&ws, &["fsck", "--full", "--strict"]);
    assert_eq!(git(&ws, &["status", "--porcelain"]), "");
    assert_eq!(git(&ws, &["ls-tree", "-r", "HEAD"]), git(&repo, &["ls-tree", "-r", &c2]));
    // Only what a depth-1 clone has: the commit, its two trees and two blobs; not the parent.
    let objects = git(&ws, &["cat-file", "--batch-all-objects", "--batch-check"]);
    assert_eq!(objects.lines().count(), 5, "{objects}");
    assert!(!objects.contains(&c1), "{objects}");
    assert_eq!(git(&ws, &["remote", "get-url", "origin"]), "github.com/acme/w");
    ex.finish(&d);
    let keys = log_keys(&c.wait_state(id, &["completed"], std::time::Duration::from_secs(10)));
    assert!(keys.iter().any(|k| k == "setup.git.cache-shallow"), "{keys:?}");
    for k in ["setup.git.fetch", "setup.git.cache-fetch"] {
        assert!(!keys.iter().any(|x| x == k), "{k} asked the coordinator: {keys:?}");
    }
}

/// Shallow jobs (Sourcegraph's) get workspace templates of their own: the second shallow job
/// starts from the first one's pristine shallow checkout, and is still exactly a depth-1 clone of
/// its commit.
#[test]
fn shallow_jobs_start_from_a_shallow_template() {
    let test = "shallow_jobs_start_from_a_shallow_template";
    if !common::is_root() {
        return common::skip(test, "root", "workspace disks (and so templates) need root to loop-mount");
    }
    let c = Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, c1, c2) = make_repo(tmp.path(), "origin");
    register(&c, "github.com/acme/s", &repo);
    let ex = Stages::new(&c);
    let submit = |commit: &str| {
        c.submit(json!({"repositoryName": "github.com/acme/s", "commit": commit, "shallowClone": true,
            "dockerSteps": []}))
    };
    let done = |id| c.wait_state(id, &["completed"], std::time::Duration::from_secs(20));
    let a = submit(&c1);
    let (d, o) = ex.prepare();
    common::assert_ok(&o);
    ex.finish(&d);
    assert!(log_out(&done(a), "setup.git.template").contains("made the workspace template"));
    let b = submit(&c2);
    let (d, o) = ex.prepare();
    common::assert_ok(&o);
    let ws = workspace(&d);
    assert_eq!(git(&ws, &["rev-parse", "HEAD"]), c2);
    assert_eq!(git(&ws, &["rev-parse", "--is-shallow-repository"]), "true");
    assert_eq!(git(&ws, &["rev-list", "--count", "HEAD"]), "1");
    git(&ws, &["fsck", "--full", "--strict"]);
    assert_eq!(git(&ws, &["status", "--porcelain", "--ignored", "--untracked-files=all"]), "");
    assert_eq!(git(&ws, &["ls-tree", "-r", "HEAD"]), git(&repo, &["ls-tree", "-r", &c2]));
    assert_eq!(git(&ws, &["for-each-ref"]), "", "no ref left");
    ex.finish(&d);
    let used = log_out(&done(b), "setup.git.template");
    assert!(used.contains("started as a copy of the template") && used.contains(&c1), "{used}");
}

/// The output of a job's log entries with `key`, joined.
fn log_out(job: &Value, key: &str) -> String {
    job["logs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["key"] == key)
        .map(|e| e["out"].as_str().unwrap_or("").to_string())
        .collect::<Vec<_>>()
        .join("")
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Workspace templates (docs/workspace.md): the next job of a repository starts from a copy of
/// the first job's disk taken right after its clone, gets exactly its own commit (every file
/// re-read, not trusted by its stat data), never sees what the first job wrote, and keeps
/// workspace privacy; two jobs at once both work; another disk size never uses the template.
#[test]
fn template_clone_is_exactly_the_commit_and_private() {
    let test = "template_clone_is_exactly_the_commit_and_private";
    if !common::is_root() {
        return common::skip(test, "root", "workspace disks (and so templates) need root to loop-mount");
    }
    let c = Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let (repo, c1, c2) = make_repo(tmp.path(), "origin");
    register(&c, "github.com/acme/t", &repo);
    let ex = Stages::new(&c);
    let submit = |commit: &str| {
        c.submit(json!({"repositoryName": "github.com/acme/t", "commit": commit, "dockerSteps": []}))
    };
    let done = |id| c.wait_state(id, &["completed"], std::time::Duration::from_secs(20));

    // Job A (cold) makes the template, then writes into its workspace as a step would.
    let a = submit(&c1);
    let (da, o) = ex.prepare();
    common::assert_ok(&o);
    let wa = workspace(&da);
    std::fs::write(wa.join("marker.txt"), "from job a").unwrap();
    std::fs::write(wa.join("a.txt"), "changed by job a\n").unwrap();
    std::fs::write(wa.join(".git/marker"), "from job a").unwrap();
    ex.finish(&da);
    let made = log_out(&done(a), "setup.git.template");
    assert!(made.contains("made the workspace template"), "{made}");
    let templates = ex.state.path().join("templates");
    assert_eq!(mode(&templates), 0o700);
    let images: Vec<PathBuf> = std::fs::read_dir(&templates)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .collect();
    assert!(!images.is_empty());
    for img in &images {
        assert_eq!(mode(img), 0o600, "{}", img.display());
    }

    // Job B, the next commit, through the template.
    let b = submit(&c2);
    let (db, o) = ex.prepare();
    common::assert_ok(&o);
    let wb = workspace(&db);
    assert_eq!(git(&wb, &["rev-parse", "HEAD"]), c2);
    assert!(!wb.join("marker.txt").exists() && !wb.join(".git/marker").exists(), "job a's writes leaked");
    assert_eq!(std::fs::read_to_string(wb.join("a.txt")).unwrap(), "two\n");
    assert_eq!(std::fs::read_to_string(wb.join("sub/s.txt")).unwrap(), "s\n");
    assert_eq!(git(&wb, &["status", "--porcelain", "--ignored", "--untracked-files=all"]), "");
    // Every file hashed again, ignoring the stat data the template's index carried.
    git(&wb, &["update-index", "--really-refresh"]);
    assert_eq!(git(&wb, &["diff", "--name-only", "HEAD"]), "");
    assert_eq!(git(&wb, &["for-each-ref", "refs/executor"]), "", "no template ref left");
    assert_eq!(git(&wb, &["remote", "get-url", "origin"]), "github.com/acme/t");
    assert_eq!(mode(&wb), 0o700);
    let mut img = wb.file_name().unwrap().to_os_string();
    img.push(".img");
    assert_eq!(mode(&wb.with_file_name(img)), 0o600);
    ex.finish(&db);
    let used = log_out(&done(b), "setup.git.template");
    assert!(used.contains("started as a copy of the template") && used.contains(&c1), "{used}");

    // Two jobs of the repository at once: both get their commit.
    let ids = [submit(&c1), submit(&c2)];
    let docs: Vec<PathBuf> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2).map(|_| s.spawn(|| ex.prepare())).collect();
        hs.into_iter()
            .map(|h| {
                let (d, o) = h.join().unwrap();
                common::assert_ok(&o);
                d
            })
            .collect()
    });
    let mut heads: Vec<String> = docs.iter().map(|d| git(&workspace(d), &["rev-parse", "HEAD"])).collect();
    heads.sort();
    let mut want = vec![c1.clone(), c2.clone()];
    want.sort();
    assert_eq!(heads, want);
    for d in &docs {
        assert_eq!(git(&workspace(d), &["status", "--porcelain", "--untracked-files=all"]), "");
        ex.finish(d);
    }
    for id in ids {
        done(id);
    }

    // Another disk size: the template is not used (a new one is made for that size).
    let other = submit(&c2);
    let (d, o) = ex.prepare_env(&[("EXECUTOR_FIRECRACKER_DISK_SPACE", "1G")]);
    common::assert_ok(&o);
    assert_eq!(git(&workspace(&d), &["rev-parse", "HEAD"]), c2);
    ex.finish(&d);
    let out = log_out(&done(other), "setup.git.template");
    assert!(!out.contains("started as a copy") && out.contains("made the workspace template"), "{out}");
}
