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

/// `executor loop` on microvm with a pool of one VM, for `jobs` jobs, its log in `log`.
fn pool_loop(
    c: &crate::coordinator::Coordinator,
    prefix: &str,
    state: &std::path::Path,
    jobs: usize,
    log: &std::path::Path,
) -> std::process::Child {
    let mut cmd = common::executor();
    crate::microvm::pool_loop_env(&mut cmd, c, prefix, state);
    cmd.arg("loop")
        .env("EXECUTOR_NUM_TOTAL_JOBS", jobs.to_string())
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "1s")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    cmd.spawn().expect("starting executor loop")
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
         ! ls /data/.executor-cache-0/upper 2>/dev/null && echo wrote && \
         touch -d @1500000000 /root/.dep/pkg && \
         echo hit=$EXECUTOR_CACHE_HIT dep=$EXECUTOR_CACHE_HIT_DEP",
    );
    let b = submit(
        REPO,
        &tip,
        "cat /root/.dep/pkg deps/mod && echo extra > /root/.dep/extra && \
         stat -c mtime=%Y /root/.dep/pkg && echo hit=$EXECUTOR_CACHE_HIT dep=$EXECUTOR_CACHE_HIT_DEP",
    );
    let untrusted = submit(REPO, &old, "cat /root/.dep/extra && echo poison > /root/.dep/pkg");
    run_loop(3, 1);
    let a = done(a);
    assert!(entry(&a, "step.docker.s").contains("wrote"), "{}", log(&a));
    // The steps are told whether the caches hit (GitHub's `cache-hit`).
    assert!(entry(&a, "step.docker.s").contains("hit=false dep=false"), "{}", log(&a));
    let setup = entry(&a, "setup.cache");
    assert!(setup.contains("miss (no version yet)") && setup.contains("file lock.txt sha256:"), "{setup}");
    assert!(setup.contains("attached 2 paths of 1 caches in"), "{setup}");
    assert!(entry(&a, "teardown.cache").contains("saved a new version"), "{}", log(&a));
    let b = done(b);
    assert!(entry(&b, "setup.cache").contains(": hit, "), "{}", log(&b));
    let out = entry(&b, "step.docker.s");
    assert!(out.contains("stdout: cached") && out.contains("stdout: mod"), "{}", log(&b));
    assert!(out.contains("hit=true dep=true"), "{}", log(&b));
    // The time a's step gave its file came through the save (bytecode caches compare them).
    assert!(out.contains("stdout: mtime=1500000000"), "{out}");
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
    // lockfile (a new tip) is another key; a repository with files of its own at a cache's
    // relative path does not get that cache (its overlay would hide them).
    let corrupted = submit(REPO, &tip, "test ! -e /root/.dep/extra && echo fresh");
    common::sh(&repo, "echo 'deps v2' > lock.txt && git commit -qam three");
    let changed = submit(
        REPO,
        &common::sh(&repo, "git rev-parse HEAD"),
        "test ! -e /root/.dep/pkg && echo new | tee /root/.dep/pkg",
    );
    // (On a branch of its own: the changed lockfile's commit stays the default branch's tip.)
    common::sh(&repo, "git checkout -qb vendored && mkdir deps && echo vendored > deps/kept && git add -A && git commit -qm four");
    let vendored = submit(
        REPO,
        &common::sh(&repo, "git rev-parse HEAD && git checkout -q main"),
        "cat deps/kept && echo hit=${EXECUTOR_CACHE_HIT:-none}",
    );
    run_loop(3, 1);
    let corrupted = done(corrupted);
    let setup = entry(&corrupted, "setup.cache");
    assert!(setup.contains("miss (") && !setup.contains("hit"), "{setup}");
    assert!(entry(&corrupted, "step.docker.s").contains("fresh"), "{}", log(&corrupted));
    let changed = done(changed);
    assert!(entry(&changed, "setup.cache").contains("miss (no version yet)"), "{}", log(&changed));
    assert!(entry(&changed, "teardown.cache").contains("saved a new version"), "{}", log(&changed));
    let vendored = done(vendored);
    let setup = entry(&vendored, "setup.cache");
    assert!(
        setup.contains("not used: the repository has files at deps, which the cache would hide"),
        "{setup}"
    );
    assert!(!setup.contains("attached"), "the job has no caches: {setup}");
    let out = entry(&vendored, "step.docker.s");
    assert!(out.contains("stdout: vendored") && out.contains("stdout: hit=none"), "{}", log(&vendored));

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

/// Dependency caches on the `microvm` runtime (docs/caches.md, "On microvm"), through the
/// coordinator and the real loop with a pool of one VM, one job at a time: a trusted job that
/// misses fills both paths and saves (its version's read-only disk made at the save); a
/// trusted job that hits sees the files (its VM booted with the version's disk, not taken from
/// the pool), adds one and deletes one (a whiteout that must travel back from the guest) and
/// saves; an untrusted job hits that version and its writes are never saved; a job whose
/// lockfile changed misses. Owners a step gave come back in the version and its disk.
#[test]
fn microvm_caches_hit_miss_trust_and_whiteouts() {
    let test = "microvm_caches_hit_miss_trust_and_whiteouts";
    if let Some(why) = crate::microvm::missing() {
        return common::skip(test, "microvm", &why);
    }
    let state = crate::microvm::state_dir();
    let c = crate::coordinator::Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("cached-repo");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::write(repo.join("lock.txt"), "deps v1\n").unwrap();
    common::sh(&repo, "git init -q -b main . && git add -A && git commit -qm one");
    let old = common::sh(&repo, "git rev-parse HEAD");
    // A branch whose lockfile changed: another key (and not the default branch's tip).
    common::sh(&repo, "git checkout -qb bump && echo 'deps v2' > lock.txt && git commit -qam bump");
    let bumped = common::sh(&repo, "git rev-parse HEAD");
    common::sh(&repo, "git checkout -q main && echo readme > README && git add -A && git commit -qm two");
    let tip = common::sh(&repo, "git rev-parse HEAD");
    // A repository name of its own: the key is never another test run's.
    let name = format!("github.com/acme/vmcached{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
    Exec::new().with(|cmd| c.admin_env(cmd)).args(["queue", "repo", "add", &name]).arg(&repo).run();
    let prefix = format!("mvc{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = crate::microvm::watchdog(state.clone(), prefix.clone(), Duration::from_secs(500));
    let submit = |commit: &str, script: &str| {
        c.submit(json!({"repositoryName": name, "commit": commit,
            "dockerSteps": [{"key": "s", "image": crate::microvm::IMAGE, "dir": "", "env": [], "commands": [script]}],
            "caches": [{"key": {"files": ["lock.txt"], "prefix": "dep"}, "paths": ["/root/.dep", "deps"]}]}))
    };
    let a = submit(
        &tip,
        "test ! -e /root/.dep/pkg && echo cached > /root/.dep/pkg && mkdir /root/.dep/d && echo x > /root/.dep/d/x \
         && echo mod > deps/mod && ! ls /data/.executor-cache-0/upper 2>/dev/null && echo wrote \
         && echo o > /root/.dep/owned && chown 1234:1235 /root/.dep/owned \
         && touch -d @1500000000 /root/.dep/owned && echo hit=$EXECUTOR_CACHE_HIT dep=$EXECUTOR_CACHE_HIT_DEP",
    );
    let b = submit(
        &tip,
        "cat /root/.dep/pkg /root/.dep/d/x deps/mod && echo extra > /root/.dep/extra && rm /root/.dep/d/x \
         && stat -c 'owner=%u:%g mtime=%Y' /root/.dep/owned \
         && echo hit=$EXECUTOR_CACHE_HIT dep=$EXECUTOR_CACHE_HIT_DEP",
    );
    let untrusted =
        submit(&old, "cat /root/.dep/extra && test ! -e /root/.dep/d/x && echo whiteout-seen && echo poison > /root/.dep/pkg");
    let changed = submit(&bumped, "test ! -e /root/.dep/pkg && echo fresh");
    let log_path = tmp.path().join("loop.log");
    let mut lp = pool_loop(&c, &prefix, &state, 4, &log_path);
    let loop_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let done = |id: i64| {
        let job = c.wait_state(id, &["completed", "failed", "errored", "canceled"], Duration::from_secs(240));
        assert_eq!(job["state"], "completed", "{}\n{}", log(&job), loop_log());
        eprintln!("job {id}: setup.cache: {}", entry(&job, "setup.cache"));
        eprintln!("job {id}: setup.cache.attach: {}", entry(&job, "setup.cache.attach"));
        eprintln!("job {id}: teardown.cache: {}", entry(&job, "teardown.cache"));
        let took = |key: &str| {
            job["logs"]
                .as_array()
                .and_then(|a| a.iter().find(|e| e["key"] == key))
                .map(|e| e["durationMs"].clone())
        };
        eprintln!(
            "job {id}: setup.microvm.start ({:?} ms): {}",
            took("setup.microvm.start"),
            entry(&job, "setup.microvm.start")
        );
        eprintln!(
            "job {id}: setup.cache {:?} ms, setup.cache.attach {:?} ms, step {:?} ms",
            took("setup.cache"),
            took("setup.cache.attach"),
            took("step.docker.s")
        );
        job
    };

    let a = done(a);
    assert!(entry(&a, "step.docker.s").contains("wrote"), "{}", log(&a));
    // The steps are told whether the caches hit (GitHub's `cache-hit`).
    assert!(entry(&a, "step.docker.s").contains("hit=false dep=false"), "{}", log(&a));
    let setup = entry(&a, "setup.cache");
    assert!(
        setup.contains("miss (no version yet)") && setup.contains("nothing hit: no cache disk"),
        "{setup}"
    );
    let attach = entry(&a, "setup.cache.attach");
    assert!(attach.contains("attached 2 paths of 1 caches in"), "{}", log(&a));
    let said = entry(&a, "teardown.cache");
    assert!(said.contains("saved a new version") && said.contains("its microVM disk made in"), "{said}");

    let b = done(b);
    let setup = entry(&b, "setup.cache");
    assert!(
        setup.contains(": hit, ") && setup.contains("1 read-only cache disks for the VM's boot"),
        "{setup}"
    );
    assert!(entry(&b, "step.docker.s").contains("hit=true dep=true"), "{}", log(&b));
    assert!(
        !setup.contains("made the version's read-only disk"),
        "made at the save, not on the job's path: {setup}"
    );
    let out = entry(&b, "step.docker.s");
    assert!(
        out.contains("stdout: cached") && out.contains("stdout: x") && out.contains("stdout: mod"),
        "{out}"
    );
    // The owner a's step gave its file came back through the save and the version's disk.
    assert!(out.contains("stdout: owner=1234:1235 mtime=1500000000"), "{out}");
    // The guest's part of the attach (the overlay mounted at the first step) is in the log.
    let guest_ms = out
        .split("[executor: caches attached in the guest in ")
        .nth(1)
        .and_then(|r| r.split(" ms]").next())
        .and_then(|ms| ms.parse::<f64>().ok());
    assert!(guest_ms.is_some_and(|ms| ms < 10_000.0), "{out}");
    assert!(entry(&b, "teardown.cache").contains("saved a new version"), "{}", log(&b));
    assert!(entry(&b, "setup.microvm.start").contains("booting a VM of its own"), "{}", log(&b));

    let untrusted = done(untrusted);
    assert!(entry(&untrusted, "setup.cache").contains(": hit, "), "{}", log(&untrusted));
    let out = entry(&untrusted, "step.docker.s");
    assert!(out.contains("stdout: extra") && out.contains("whiteout-seen"), "{out}");
    assert!(
        entry(&untrusted, "teardown.cache").contains("not saved: the job is not trusted"),
        "{}",
        log(&untrusted)
    );

    let changed = done(changed);
    assert!(entry(&changed, "setup.cache").contains("miss (no version yet)"), "{}", log(&changed));
    assert!(entry(&changed, "step.docker.s").contains("fresh"), "{}", log(&changed));
    common::wait_exit_ok(&mut lp, Duration::from_secs(60));

    // The store holds b's version: a's files, b's addition, b's deletion, no poison; its disk
    // counted in its size; nothing leased once the jobs are gone.
    let ls = Exec::new().env("EXECUTOR_STATE_DIR", &state).args(["cache", "ls", "--json"]).run();
    let listed: Value = serde_json::from_slice(&ls.stdout).unwrap();
    // (The version b replaced, held by b itself while it saved, goes at the next janitor pass.)
    let mine: Vec<&Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["repository"] == name.as_str() && v["current"] == true && v["paths"][0] == "/root/.dep")
        .filter(|v| v["files"] == 4)
        .collect();
    assert_eq!(mine.len(), 1, "{listed:#}");
    let version = state.join("caches/entries").join(mine[0]["version"].as_str().unwrap());
    let tree = version.join("tree");
    assert_eq!(std::fs::read_to_string(tree.join("p0/pkg")).unwrap(), "cached\n");
    assert_eq!(std::fs::read_to_string(tree.join("p0/extra")).unwrap(), "extra\n");
    assert_eq!(std::fs::read_to_string(tree.join("p1/mod")).unwrap(), "mod\n");
    assert!(tree.join("p0/d").is_dir() && !tree.join("p0/d/x").exists(), "the whiteout came back");
    use std::os::unix::fs::MetadataExt;
    let owned = std::fs::symlink_metadata(tree.join("p0/owned")).unwrap();
    let base = 2_000_000_000; // the image store's id range (image::ID_BASE)
    assert_eq!((owned.uid() - base, owned.gid() - base), (1234, 1235));
    assert_eq!(owned.mtime(), 1_500_000_000);
    let disk = std::fs::metadata(version.join("disk.ext4")).unwrap();
    assert!(mine[0]["bytes"].as_u64().unwrap() >= disk.blocks() * 512, "{listed:#}");
    Exec::new().env("EXECUTOR_STATE_DIR", &state).args(["cache", "verify"]).run();
    let leases: Vec<String> = std::fs::read_dir(state.join("caches/leases"))
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    assert!(!leases.iter().any(|l| l.starts_with(&prefix) || l.starts_with("boot-")), "{leases:?}");
    let key = mine[0]["key"].as_str().unwrap();
    let gone = Exec::new().env("EXECUTOR_STATE_DIR", &state).args(["cache", "rm", &key[..12]]).run();
    assert!(
        String::from_utf8_lossy(&gone.stdout).contains("removed"),
        "{}",
        String::from_utf8_lossy(&gone.stdout)
    );
    assert!(!version.exists());
}

/// A stream of jobs whose caches hit on microvm takes pool VMs: the first hit boots a VM of its
/// own with its cache disks, the pool then makes its next VMs with exactly those disks (a
/// template saved and VMs restored from it), and the next hit takes one; a job of another
/// repository never gets a VM carrying them (its VM has one disk fewer).
#[test]
fn microvm_cache_hits_take_pool_vms_that_carry_their_disks() {
    let test = "microvm_cache_hits_take_pool_vms_that_carry_their_disks";
    if let Some(why) = crate::microvm::missing() {
        return common::skip(test, "microvm", &why);
    }
    let state = crate::microvm::state_dir();
    let c = crate::coordinator::Coordinator::start();
    let tmp = tempfile::tempdir().unwrap();
    let mut names = Vec::new();
    let mut tips = Vec::new();
    for r in ["streamed", "other"] {
        let repo = tmp.path().join(r);
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(repo.join("lock.txt"), "deps v1\n").unwrap();
        common::sh(&repo, "git init -q -b main . && git add -A && git commit -qm one");
        tips.push(common::sh(&repo, "git rev-parse HEAD"));
        let name = format!("github.com/acme/{r}{}", &uuid::Uuid::new_v4().simple().to_string()[..6]);
        Exec::new().with(|cmd| c.admin_env(cmd)).args(["queue", "repo", "add", &name]).arg(&repo).run();
        names.push(name);
    }
    let prefix = format!("mvp{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _dog = crate::microvm::watchdog(state.clone(), prefix.clone(), Duration::from_secs(500));
    // Each step prints how many virtio disks its VM has.
    let disks = "echo disks=$(grep -c ' vd[a-z]*$' /proc/partitions)";
    let submit = |repo: usize, script: &str| {
        c.submit(json!({"repositoryName": names[repo], "commit": tips[repo],
            "dockerSteps": [{"key": "s", "image": crate::microvm::IMAGE, "dir": "", "env": [],
                "commands": [format!("{script} && {disks}")]}],
            "caches": [{"key": {"files": ["lock.txt"], "prefix": "dep"}, "paths": ["/root/.dep"]}]}))
    };
    let a = submit(0, "echo cached > /root/.dep/pkg");
    let b_id = submit(0, "cat /root/.dep/pkg");
    let log_path = tmp.path().join("loop.log");
    let mut lp = pool_loop(&c, &prefix, &state, 4, &log_path);
    let loop_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let done = |id: i64| {
        let job = c.wait_state(id, &["completed", "failed", "errored", "canceled"], Duration::from_secs(240));
        assert_eq!(job["state"], "completed", "{}\n{}", log(&job), loop_log());
        let ms = job["logs"].as_array().and_then(|a| a.iter().find(|e| e["key"] == "setup.microvm.start"));
        let ms = ms.map(|e| e["durationMs"].clone()).unwrap_or_default();
        eprintln!("job {id}: setup.microvm.start ({ms} ms): {}", entry(&job, "setup.microvm.start"));
        job
    };
    let count = |job: &Value| -> usize {
        let out = entry(job, "step.docker.s");
        out.split("stdout: disks=")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{out}"))
    };
    let a = done(a);
    assert!(entry(&a, "teardown.cache").contains("saved a new version"), "{}", log(&a));
    let b = done(b_id);
    assert!(entry(&b, "setup.cache").contains(": hit, "), "{}", log(&b));
    assert!(entry(&b, "step.docker.s").contains("stdout: cached"), "{}", log(&b));
    assert!(entry(&b, "teardown.cache").contains("not saved: the job changed nothing"), "{}", log(&b));
    let start = entry(&b, "setup.microvm.start");
    assert!(start.contains("booting a VM of its own with the disks of the caches"), "{start}");
    assert_eq!(count(&b), count(&a) + 1, "{}\n{}", log(&a), log(&b));

    // The pool turns to VMs carrying the version's disk (a template of that key saved, a VM
    // restored from it) once a VM it was making for the key before is discarded.
    let after = |from: usize, what: &str| loop_log()[from..].find(what).map(|i| from + i);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let ready = loop {
        let dequeued = after(0, &format!("job {b_id}: dequeued")).unwrap_or_else(|| panic!("{}", loop_log()));
        if let Some(r) = after(dequeued, "ready, carrying 1 cache disk)") {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no VM with the cache disk got ready\n{}", loop_log());
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("ready: {}", loop_log()[ready..].lines().next().unwrap_or_default());
    let c3 = done(submit(0, "cat /root/.dep/pkg"));
    let start = entry(&c3, "setup.microvm.start");
    assert!(start.contains("took VM") && start.contains("from the pool"), "{start}\n{}", loop_log());
    assert!(entry(&c3, "step.docker.s").contains("stdout: cached"), "{}", log(&c3));
    assert_eq!(count(&c3), count(&b), "{}", log(&c3));

    // Another repository's job misses its cache and gets no VM with the first one's disk.
    let d = done(submit(1, "test ! -e /root/.dep/pkg"));
    assert!(entry(&d, "setup.cache").contains("miss"), "{}", log(&d));
    assert_eq!(count(&d), count(&a), "{}\n{}", log(&d), loop_log());
    common::wait_exit_ok(&mut lp, Duration::from_secs(60));
    assert!(
        crate::microvm::processes_with(&prefix).iter().all(|p| !p.contains("qemu")),
        "{:?}",
        crate::microvm::processes_with(&prefix)
    );
}
