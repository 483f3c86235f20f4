//! Dependency caches on the `oci` runtime (docs/caches.md), through the coordinator and the real
//! loop: one repository, jobs that declare a cache keyed by a lockfile, in three loops that
//! check a miss and its save, a hit (absolute and workspace-relative paths), an untrusted job's
//! writes never saved, two concurrent jobs both hitting, another repository missing, a changed
//! lockfile missing, and a corrupted version found by `executor cache verify` and then missed.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::{self, Exec};
use crate::oci::Fixture;

fn entry(job: &Value, key: &str) -> String {
    job["logs"]
        .as_array()
        .and_then(|a| a.iter().find(|e| e["key"] == key))
        .and_then(|e| e["out"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn log(job: &Value) -> String {
    job["logs"]
        .as_array()
        .map(|a| a.iter().map(|e| format!("[{}] {}\n", e["key"], e["out"].as_str().unwrap_or(""))).collect())
        .unwrap_or_default()
}

#[test]
fn oci_caches_hit_miss_trust_and_integrity() {
    let test = "oci_caches_hit_miss_trust_and_integrity";
    if !crate::oci::can_run(test, "runc") {
        return;
    }
    let c = crate::coordinator::Coordinator::start();
    let f = Fixture::new("runc");
    let repo = f.tmp.path().join("cached-repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("lock.txt"), "deps v1\n").unwrap();
    common::sh(&repo, "git init -q -b main . && git add -A && git commit -qm one");
    let old = common::sh(&repo, "git rev-parse HEAD");
    common::sh(&repo, "echo readme > README && git add -A && git commit -qm two");
    let tip = common::sh(&repo, "git rev-parse HEAD");
    for name in ["github.com/acme/cached", "github.com/acme/other"] {
        Exec::new().with(|cmd| c.admin_env(cmd)).args(["queue", "repo", "add", name]).arg(&repo).run();
    }
    let prefix = format!("ocicache{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    let submit = |repo: &str, commit: &str, script: &str| {
        c.submit(json!({"repositoryName": repo, "commit": commit,
            "dockerSteps": [{"key": "s", "image": "busybox", "dir": "", "env": [], "commands": [script]}],
            "caches": [{"key": {"files": ["lock.txt"], "prefix": "dep"}, "paths": ["/root/.dep", "deps"]}]}))
    };
    let run_loop = |jobs: usize, parallel: usize| {
        let mut cmd = common::executor();
        c.executor_env(&mut cmd);
        cmd.env("EXECUTOR_QUEUE_NAME", "batches")
            .env("EXECUTOR_RUNTIME", "oci")
            .env("EXECUTOR_OCI_RUNTIME", "runc")
            .env("EXECUTOR_STATE_DIR", f.state())
            .env("EXECUTOR_VM_PREFIX", &prefix)
            .env("EXECUTOR_NUM_TOTAL_JOBS", jobs.to_string())
            .env("EXECUTOR_MAXIMUM_NUM_JOBS", parallel.to_string())
            .env("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", "60s")
            .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
            .arg("loop");
        common::assert_ok(&common::run(&mut cmd));
    };
    let done = |id: i64| {
        let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(60));
        assert_eq!(job["state"], "completed", "{}", log(&job));
        job
    };
    const REPO: &str = "github.com/acme/cached";

    // Loop 1, one job at a time: a miss that saves; a hit; an untrusted (old commit) job.
    let a = submit(
        REPO,
        &tip,
        "test ! -e /root/.dep/pkg && echo cached > /root/.dep/pkg && echo mod > deps/mod && \
         ! ls /data/.executor-cache-0/upper 2>/dev/null && echo wrote",
    );
    let b = submit(REPO, &tip, "cat /root/.dep/pkg deps/mod && echo extra > /root/.dep/extra");
    let untrusted = submit(REPO, &old, "cat /root/.dep/extra && echo poison > /root/.dep/pkg");
    run_loop(3, 1);
    let a = done(a);
    assert!(entry(&a, "step.docker.s").contains("wrote"), "{}", log(&a));
    let setup = entry(&a, "setup.cache");
    assert!(setup.contains("miss (no version yet)") && setup.contains("file lock.txt sha256:"), "{setup}");
    assert!(setup.contains("attached 2 paths of 1 caches in"), "{setup}");
    assert!(entry(&a, "teardown.cache").contains("saved a new version"), "{}", log(&a));
    let b = done(b);
    assert!(entry(&b, "setup.cache").contains(": hit, "), "{}", log(&b));
    let out = entry(&b, "step.docker.s");
    assert!(out.contains("stdout: cached") && out.contains("stdout: mod"), "{}", log(&b));
    let untrusted = done(untrusted);
    assert!(entry(&untrusted, "setup.cache").contains(": hit, "), "{}", log(&untrusted));
    assert!(entry(&untrusted, "step.docker.s").contains("extra"), "{}", log(&untrusted));
    let said = entry(&untrusted, "teardown.cache");
    assert!(said.contains("not saved: the job is not trusted"), "{said}");

    // Loop 2, two at once: both hit the same version and never see the untrusted write; a job
    // of another repository with the same lockfile misses.
    let d1 = submit(REPO, &tip, "cat /root/.dep/pkg; sleep 1");
    let d2 = submit(REPO, &tip, "cat /root/.dep/pkg; sleep 1");
    let other = submit("github.com/acme/other", &tip, "test ! -e /root/.dep/pkg && echo empty");
    run_loop(3, 2);
    for d in [d1, d2] {
        let d = done(d);
        assert!(entry(&d, "setup.cache").contains(": hit, "), "{}", log(&d));
        let out = entry(&d, "step.docker.s");
        assert!(out.contains("cached") && !out.contains("poison"), "{out}");
        assert!(entry(&d, "teardown.cache").contains("not saved: the job changed nothing"), "{}", log(&d));
    }
    let other = done(other);
    assert!(entry(&other, "setup.cache").contains("miss (no version yet)"), "{}", log(&other));
    assert!(entry(&other, "step.docker.s").contains("empty"), "{}", log(&other));
    let said = entry(&other, "teardown.cache");
    assert!(said.contains("not saved: the job changed nothing"), "{said}");

    // `cache ls` lists the one version (the other repository's job wrote nothing); tampering with a cached file is found by
    // `cache verify`, and the next job with that key misses.
    let ls = Exec::new().env("EXECUTOR_STATE_DIR", f.state()).args(["cache", "ls", "--json"]).run();
    let listed: Value = serde_json::from_slice(&ls.stdout).unwrap();
    let versions = listed.as_array().unwrap();
    assert_eq!(versions.len(), 1, "{listed:#}");
    let mine = versions.iter().find(|v| v["repository"] == REPO).unwrap();
    assert_eq!(mine["paths"], json!(["/root/.dep", "deps"]));
    let tree = f.state().join("caches/entries").join(mine["version"].as_str().unwrap()).join("tree/p0/pkg");
    assert_eq!(std::fs::read_to_string(&tree).unwrap(), "cached\n");
    std::fs::remove_file(&tree).unwrap();
    std::fs::write(&tree, "tampered\n").unwrap();
    Exec::new()
        .env("EXECUTOR_STATE_DIR", f.state())
        .args(["cache", "verify"])
        .status(1)
        .stdout_has("the tree does not match its manifest")
        .run();
    let ls = Exec::new().env("EXECUTOR_STATE_DIR", f.state()).args(["cache", "ls", "--json"]).run();
    let listed: Value = serde_json::from_slice(&ls.stdout).unwrap();
    let bad = listed.as_array().unwrap().iter().find(|v| v["repository"] == REPO).unwrap();
    assert_eq!(bad["bad"], "corrupted: the tree does not match its manifest", "{listed:#}");

    // Loop 3: the corrupted key misses (the loop's janitor removed the version); a changed
    // lockfile (a new tip) is another key.
    let corrupted = submit(REPO, &tip, "test ! -e /root/.dep/extra && echo fresh");
    common::sh(&repo, "echo 'deps v2' > lock.txt && git commit -qam three");
    let changed = submit(
        REPO,
        &common::sh(&repo, "git rev-parse HEAD"),
        "test ! -e /root/.dep/pkg && echo new | tee /root/.dep/pkg",
    );
    run_loop(2, 1);
    let corrupted = done(corrupted);
    let setup = entry(&corrupted, "setup.cache");
    assert!(setup.contains("miss (") && !setup.contains("hit"), "{setup}");
    assert!(entry(&corrupted, "step.docker.s").contains("fresh"), "{}", log(&corrupted));
    let changed = done(changed);
    assert!(entry(&changed, "setup.cache").contains("miss (no version yet)"), "{}", log(&changed));
    assert!(entry(&changed, "teardown.cache").contains("saved a new version"), "{}", log(&changed));

    // Prune to a budget of one byte: every version goes (none is in use), and nothing of the
    // jobs is left.
    let out =
        Exec::new().env("EXECUTOR_STATE_DIR", f.state()).args(["cache", "prune", "--cache-size", "1"]).run();
    let pruned = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(pruned.contains("removed"), "{pruned}");
    let ls = Exec::new().env("EXECUTOR_STATE_DIR", f.state()).args(["cache", "ls", "--json"]).run();
    assert_eq!(serde_json::from_slice::<Value>(&ls.stdout).unwrap(), json!([]));
    let left = |dir: &str| std::fs::read_dir(f.state().join(dir)).map(|r| r.count()).unwrap_or(0);
    assert_eq!((left("sandboxes"), left("workspaces"), left("caches/leases")), (0, 0, 0));
}
