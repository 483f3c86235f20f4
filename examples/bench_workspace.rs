//! Benchmark behind `scripts/bench-workspace`: a sizeable repository (thousands of files and
//! commits, made with `git fast-import`) served by a running coordinator. Prints, in one run:
//! plain git (init + fetch of the commit + checkout) through the coordinator's git route, which is
//! `git http-backend` behind a token check; our `prepare-workspace` cold (empty object cache, no
//! template); a second job on the same repository, one commit later, with the object cache only
//! (`EXECUTOR_WORKSPACE_TEMPLATES=0`: the warm clone before templates); and the same with the
//! workspace template the cold job made (when the executor runs as root, with a workspace disk).
//!
//! Environment: BENCH_URL, BENCH_SECRET, BENCH_ADMIN_TOKEN, BENCH_BIN (the executor binary),
//! BENCH_WORK (a scratch directory), BENCH_FILES (4000), BENCH_COMMITS (2000), BENCH_RUNS (3).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn env(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn sh(dir: &Path, args: &[&str], envs: &[(String, String)]) -> Res<String> {
    let o = Command::new("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .output()?;
    if !o.status.success() {
        return Err(format!("git {args:?}: {}", String::from_utf8_lossy(&o.stderr)).into());
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Writes a fast-import stream: `commits` commits over `files` files, each commit changing a few.
fn make_repo(dir: &Path, files: usize, commits: usize) -> Res<()> {
    std::fs::create_dir_all(dir)?;
    sh(dir, &["init", "-q", "-b", "main", "."], &[])?;
    let mut child = Command::new("git")
        .current_dir(dir)
        .args(["fast-import", "--quiet"])
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .stdin(Stdio::piped())
        .spawn()?;
    let mut w = std::io::BufWriter::new(child.stdin.take().ok_or("no stdin")?);
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for c in 0..commits {
        writeln!(w, "commit refs/heads/main")?;
        writeln!(w, "committer Bench <bench@localhost> {} +0000", 1_600_000_000 + c)?;
        let msg = format!("commit {c}");
        writeln!(w, "data {}\n{msg}", msg.len())?;
        let touched: Vec<usize> =
            if c == 0 { (0..files).collect() } else { (0..4).map(|_| next() as usize % files).collect() };
        for f in touched {
            let mut body = String::new();
            for l in 0..(20 + f % 40) {
                body.push_str(&format!("line {l} of file {f}: value {} at commit {c}\n", next() % 100_000));
            }
            writeln!(w, "M 100644 inline src/dir{}/file{f}.txt", f % 50)?;
            writeln!(w, "data {}\n{body}", body.len())?;
        }
    }
    drop(w);
    if !child.wait()?.success() {
        return Err("git fast-import failed".into());
    }
    sh(dir, &["repack", "-a", "-d", "-q"], &[])?;
    // fast-import writes objects and refs only; the next commits need a work tree.
    sh(dir, &["reset", "-q", "--hard"], &[])?;
    Ok(())
}

struct Ctx {
    url: String,
    secret: String,
    admin: String,
    bin: PathBuf,
    agent: ureq::Agent,
}

impl Ctx {
    fn submit(&self, commit: &str) -> Res<i64> {
        let job = serde_json::json!({"repositoryName": "bench/big", "commit": commit, "dockerSteps": []});
        let v: String = self
            .agent
            .post(&format!("{}/api/jobs", self.url))
            .set("Authorization", &format!("Bearer {}", self.admin))
            .set("Content-Type", "application/json")
            .send_string(&job.to_string())?
            .into_string()?;
        let v: serde_json::Value = serde_json::from_str(&v)?;
        v["id"].as_i64().ok_or_else(|| "no id".into())
    }

    fn exec(&self, state: &Path, args: &[&str], templates: bool) -> Res<Duration> {
        let t = Instant::now();
        let o = Command::new(&self.bin)
            .args(args)
            .env("EXECUTOR_WORKSPACE_TEMPLATES", if templates { "8" } else { "0" })
            .env("EXECUTOR_FRONTEND_URL", &self.url)
            .env("EXECUTOR_FRONTEND_PASSWORD", &self.secret)
            .env("EXECUTOR_QUEUE_NAME", "batches")
            .env("EXECUTOR_RUNTIME", "shell")
            .env("EXECUTOR_ALLOW_UNISOLATED", "1")
            .env("EXECUTOR_STATE_DIR", state)
            .stdin(Stdio::null())
            .output()?;
        let took = t.elapsed();
        if !o.status.success() {
            return Err(format!("executor {args:?}: {}", String::from_utf8_lossy(&o.stderr)).into());
        }
        Ok(took)
    }

    /// The log entries of a job as `key durationMs` pairs.
    fn entries(&self, id: i64) -> Res<String> {
        let v: String = self
            .agent
            .get(&format!("{}/api/jobs/{id}", self.url))
            .set("Authorization", &format!("Bearer {}", self.admin))
            .call()?
            .into_string()?;
        let v: serde_json::Value = serde_json::from_str(&v)?;
        let mut out = Vec::new();
        for e in v["logs"].as_array().cloned().unwrap_or_default() {
            if let (Some(k), Some(d)) = (e["key"].as_str(), e["durationMs"].as_i64()) {
                if k.starts_with("setup.") {
                    out.push(format!("{} {d}", k.trim_start_matches("setup.")));
                }
            }
        }
        Ok(out.join(", "))
    }

    /// dequeue, then a timed prepare-workspace, then complete.
    fn ours(&self, state: &Path, commit: &str, templates: bool) -> Res<Duration> {
        let id = self.submit(commit)?;
        let doc = state.join("doc.json");
        let d = doc.to_string_lossy().into_owned();
        self.exec(state, &["dequeue", "-o", &d], templates)?;
        let took = self.exec(state, &["prepare-workspace", "-i", &d, "-o", &d], templates)?;
        self.exec(state, &["complete", "-i", &d, "-o", &d], templates)?;
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            println!("  job {id}: {} ms: {}", took.as_millis(), self.entries(id)?);
        }
        Ok(took)
    }

    /// Plain git through the same git route, with a job token obtained as an executor would.
    fn plain(&self, work: &Path, commit: &str, run: usize) -> Res<Duration> {
        let id = self.submit(commit)?;
        let name = format!("bench-plain-{run}");
        let auth = format!("token-executor {}", self.secret);
        self.agent
            .post(&format!("{}/.executors/queue/batches/heartbeat", self.url))
            .set("Authorization", &auth)
            .set("Content-Type", "application/json")
            .send_string(&serde_json::json!({"executorName": name, "version": "V2"}).to_string())?;
        let job: String = self
            .agent
            .post(&format!("{}/.executors/queue/batches/dequeue", self.url))
            .set("Authorization", &auth)
            .set("Content-Type", "application/json")
            .send_string(&serde_json::json!({"executorName": name, "version": "5.2.0"}).to_string())?
            .into_string()?;
        let job: serde_json::Value = serde_json::from_str(&job)?;
        if job["id"].as_i64() != Some(id) {
            return Err("dequeued another job than submitted".into());
        }
        let token = job["token"].as_str().ok_or("no token")?.to_string();
        let headers = [
            format!("Authorization: Bearer {token}"),
            format!("X-Sourcegraph-Job-ID: {id}"),
            format!("X-Sourcegraph-Executor-Name: {name}"),
        ];
        let mut envs = vec![("GIT_CONFIG_COUNT".to_string(), "3".to_string())];
        for (i, h) in headers.iter().enumerate() {
            envs.push((format!("GIT_CONFIG_KEY_{i}"), "http.extraHeader".into()));
            envs.push((format!("GIT_CONFIG_VALUE_{i}"), h.clone()));
        }
        let dir = work.join(format!("plain-{run}"));
        std::fs::create_dir_all(&dir)?;
        let remote = format!("{}/.executors/git/bench/big", self.url);
        let t = Instant::now();
        sh(&dir, &["init", "-q"], &[])?;
        let init = t.elapsed();
        sh(
            &dir,
            &["-c", "protocol.version=2", "fetch", "-q", "--no-recurse-submodules", &remote, commit],
            &envs,
        )?;
        let fetched = t.elapsed();
        sh(&dir, &["checkout", "-q", "--force", commit], &[])?;
        let took = t.elapsed();
        if std::env::var_os("BENCH_VERBOSE").is_some() {
            println!(
                "  plain {run}: init {} ms, fetch {} ms, checkout {} ms",
                init.as_millis(),
                (fetched - init).as_millis(),
                (took - fetched).as_millis()
            );
        }
        self.agent
            .post(&format!("{}/.executors/queue/batches/markComplete", self.url))
            .set("Authorization", &format!("Bearer {token}"))
            .set("X-Sourcegraph-Job-ID", &id.to_string())
            .set("X-Sourcegraph-Executor-Name", &name)
            .set("Content-Type", "application/json")
            .send_string(&serde_json::json!({"executorName": name, "jobId": id}).to_string())?;
        Ok(took)
    }
}

/// Flushes what earlier measurements wrote, so that no measurement pays for another's writeback.
/// Nothing is deleted before the end: on this host's ext4 (mounted `discard`), the deletions of
/// earlier runs made later file creations wait, and plain git's checkout went from 0.08 to 3 s.
fn settle() {
    let _ = Command::new("sync").status();
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn main() -> Res<()> {
    let work = PathBuf::from(env("BENCH_WORK", ""));
    let ctx = Ctx {
        url: env("BENCH_URL", ""),
        secret: env("BENCH_SECRET", ""),
        admin: env("BENCH_ADMIN_TOKEN", ""),
        bin: PathBuf::from(env("BENCH_BIN", "")),
        agent: ureq::AgentBuilder::new().timeout(Duration::from_secs(300)).build(),
    };
    if ctx.url.is_empty() || work.as_os_str().is_empty() {
        return Err("run through scripts/bench-workspace".into());
    }
    let files: usize = env("BENCH_FILES", "4000").parse()?;
    let commits: usize = env("BENCH_COMMITS", "2000").parse()?;
    let runs: usize = env("BENCH_RUNS", "3").parse()?;

    let repo = work.join("big");
    let t = Instant::now();
    make_repo(&repo, files, commits)?;
    let c1 = sh(&repo, &["rev-parse", "HEAD"], &[])?;
    let size: u64 = std::fs::read_dir(repo.join(".git/objects/pack"))?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!(
        "repository: {files} files, {commits} commits, {:.1} MiB packed (made in {:.1} s)",
        size as f64 / 1048576.0,
        t.elapsed().as_secs_f64()
    );
    let o = Command::new(&ctx.bin)
        .args(["queue", "repo", "add", "bench/big"])
        .arg(&repo)
        .env("EXECUTOR_FRONTEND_URL", &ctx.url)
        .env("EXECUTOR_QUEUE_ADMIN_TOKEN", &ctx.admin)
        .output()
        .map_err(|e| format!("running {}: {e}", ctx.bin.display()))?;
    if !o.status.success() {
        return Err(format!("repo add: {}", String::from_utf8_lossy(&o.stderr)).into());
    }

    let (mut plain, mut cold, mut warm, mut tmpl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        settle();
        plain.push(ctx.plain(&work, &c1, run).map_err(|e| format!("plain git: {e}"))?);
        // Two executor hosts: one without templates (the warm clone before them), one with.
        let state = work.join(format!("state-{run}"));
        let state_t = work.join(format!("state-t-{run}"));
        for s in [&state, &state_t] {
            std::fs::create_dir_all(s).map_err(|e| format!("creating {}: {e}", s.display()))?;
        }
        settle();
        cold.push(ctx.ours(&state, &c1, false).map_err(|e| format!("cold: {e}"))?);
        ctx.ours(&state_t, &c1, true).map_err(|e| format!("cold, making the template: {e}"))?;
        // The next job on the repository, one commit later, on the same executor host.
        let f = repo.join(format!("src/new-{run}.txt"));
        std::fs::write(&f, format!("run {run}\n")).map_err(|e| format!("writing {}: {e}", f.display()))?;
        sh(&repo, &["add", "-A"], &[])?;
        sh(&repo, &["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-q", "-m", "next"], &[])?;
        let c2 = sh(&repo, &["rev-parse", "HEAD"], &[])?;
        settle();
        warm.push(ctx.ours(&state, &c2, false).map_err(|e| format!("warm: {e}"))?);
        settle();
        tmpl.push(ctx.ours(&state_t, &c2, true).map_err(|e| format!("warm, template: {e}"))?);
        sh(&repo, &["reset", "-q", "--hard", &c1], &[])?;
    }
    let (p, c, w, t) =
        (median(plain.clone()), median(cold.clone()), median(warm.clone()), median(tmpl.clone()));
    let list = |v: &[Duration]| {
        v.iter().map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0)).collect::<Vec<_>>().join(", ")
    };
    println!("runs: {runs} (medians; each run in ms; prepare-workspace includes its process start)");
    println!("plain git through the git route (baseline) {p:8.0} ms   [{}]", list(&plain));
    println!("prepare-workspace, cold cache               {c:8.0} ms   [{}]", list(&cold));
    println!("prepare-workspace, warm, object cache only  {w:8.0} ms   [{}]", list(&warm));
    println!("prepare-workspace, warm, from the template  {t:8.0} ms   [{}]", list(&tmpl));
    println!("cold / plain = {:.2}x (goal <= 1.20x)", c / p);
    println!("cold / warm  = {:.2}x (goal >= 3x)", c / w);
    println!("plain / template warm = {:.2}x (goal >= 10x)", p / t);
    Ok(())
}
