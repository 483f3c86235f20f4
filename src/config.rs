//! The executor's settings: `EXECUTOR_*` environment variables and the equivalent flags,
//! validated into one [`Settings`] struct in one place. The shared secret only ever comes from
//! `EXECUTOR_FRONTEND_PASSWORD` or `--password-file`, and is held in a [`Secret`] that never prints.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;
use std::time::Duration;

use crate::protocol::{MIN_SECRET_LEN, SOURCEGRAPH_QUEUES};

/// A secret string whose `Debug` and `Display` say `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    /// The secret itself, for an `Authorization` header or a redactor; never for a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Unvalidated settings as the command line and the environment give them (flags win; clap
/// fills each field from its `EXECUTOR_*` variable when the flag is absent).
#[derive(Debug, Clone, Default)]
pub struct RawSettings {
    pub frontend_url: Option<String>,
    pub password_file: Option<PathBuf>,
    pub frontend_ca: Option<PathBuf>,
    pub queue_name: Option<String>,
    pub queue_names: Option<String>,
    pub poll_interval: Option<String>,
    pub maximum_num_jobs: Option<String>,
    pub num_total_jobs: Option<String>,
    pub max_active_time: Option<String>,
    pub maximum_runtime_per_job: Option<String>,
    pub cleanup_task_interval: Option<String>,
    pub keep_workspaces: Option<String>,
    pub job_num_cpus: Option<String>,
    pub job_memory: Option<String>,
    pub disk_space: Option<String>,
    pub runtime: Option<String>,
    pub state_dir: Option<PathBuf>,
    pub allow_unisolated: Option<String>,
    pub vm_prefix: Option<String>,
    pub oci_runtime: Option<String>,
    pub vm_accel: Option<String>,
    pub vm_allow_tcg: Option<String>,
    pub shutdown_grace: Option<String>,
    pub heartbeat_interval: Option<String>,
    pub artifacts_max_size: Option<String>,
    pub git_timeout: Option<String>,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Scheme and host checked; no trailing slash.
    pub frontend_url: Option<String>,
    pub password: Secret,
    /// A PEM file of extra CA certificates trusted for the coordinator.
    pub frontend_ca: Option<PathBuf>,
    /// One queue, or several with `multi_queue`.
    pub queues: Vec<String>,
    pub multi_queue: bool,
    pub poll_interval: Duration,
    pub max_jobs: usize,
    /// Stop after this many dequeues (0 = no limit).
    pub num_total_jobs: u64,
    /// Stop dequeuing after this long (`None` = no limit).
    pub max_active_time: Option<Duration>,
    pub max_runtime_per_job: Duration,
    pub cleanup_interval: Duration,
    pub keep_workspaces: bool,
    pub job_cpus: u32,
    pub job_memory: String,
    pub disk_space: String,
    /// `auto`, `shell`, `oci` or `microvm`.
    pub runtime: String,
    pub state_dir: PathBuf,
    pub allow_unisolated: bool,
    pub vm_prefix: String,
    /// The OCI runtime of the `oci` sandbox: `runc`, `crun` or `runsc`.
    pub oci_runtime: String,
    /// The microvm runtime's accelerator policy.
    pub vm_accel: crate::sandbox::microvm::Accel,
    /// Whether the microvm runtime may fall back to TCG (slow software emulation).
    pub vm_allow_tcg: bool,
    /// How long `loop` lets running jobs finish after SIGTERM before killing them.
    pub shutdown_grace: Duration,
    /// How often `loop` heartbeats (the contract's 5 s; lower it for faster cancels).
    pub heartbeat_interval: Duration,
    /// Largest artifact archive `upload` sends.
    pub artifacts_max_bytes: u64,
    /// Limit for each git command of a clone.
    pub git_timeout: Duration,
}

/// What a command needs besides the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// The coordinator's URL and the queues (dequeue, loop, validate).
    Coordinator,
    /// Only the secret: the later stages find the URL in the run document.
    DocumentOnly,
}

pub const DEFAULT_STATE_DIR: &str = "/var/lib/executor";

impl Settings {
    /// Validates `raw`, reading the secret from `EXECUTOR_FRONTEND_PASSWORD` or the password file.
    pub fn load(raw: RawSettings, needs: Needs) -> Result<Settings> {
        let password = load_password(raw.password_file.as_deref())?;
        Self::from_raw(raw, password, needs)
    }

    /// Validates `raw` with the secret already read.
    pub fn from_raw(raw: RawSettings, password: Secret, needs: Needs) -> Result<Settings> {
        if password.expose().chars().count() < MIN_SECRET_LEN {
            bail!("the frontend password is shorter than {MIN_SECRET_LEN} characters");
        }
        let frontend_url = match raw.frontend_url.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            Some(u) => Some(validate_url(u)?),
            None if needs == Needs::Coordinator => bail!("EXECUTOR_FRONTEND_URL (--frontend-url) is not set"),
            None => None,
        };
        let (queues, multi_queue) =
            parse_queues(raw.queue_name.as_deref(), raw.queue_names.as_deref(), needs)?;
        let max_jobs = parse_num("EXECUTOR_MAXIMUM_NUM_JOBS", raw.maximum_num_jobs.as_deref(), 1)?;
        if max_jobs == 0 {
            bail!("EXECUTOR_MAXIMUM_NUM_JOBS must be at least 1");
        }
        let max_runtime = parse_duration_var(
            "EXECUTOR_MAXIMUM_RUNTIME_PER_JOB",
            raw.maximum_runtime_per_job.as_deref(),
            "30m",
        )?;
        if max_runtime.is_zero() {
            bail!("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB must be more than 0");
        }
        let max_active = parse_duration_var("EXECUTOR_MAX_ACTIVE_TIME", raw.max_active_time.as_deref(), "0")?;
        let job_memory = raw.job_memory.unwrap_or_else(|| "12G".into());
        parse_size(&job_memory).with_context(|| format!("EXECUTOR_JOB_MEMORY {job_memory:?}"))?;
        let disk_space = raw.disk_space.unwrap_or_else(|| "20G".into());
        parse_size(&disk_space).with_context(|| format!("EXECUTOR_FIRECRACKER_DISK_SPACE {disk_space:?}"))?;
        let artifacts = raw.artifacts_max_size.unwrap_or_else(|| "100M".into());
        let artifacts_max_bytes =
            parse_size(&artifacts).with_context(|| format!("EXECUTOR_ARTIFACTS_MAX_SIZE {artifacts:?}"))?;
        let runtime = raw.runtime.unwrap_or_else(|| "auto".into()).trim().to_ascii_lowercase();
        if !["auto", "shell", "oci", "microvm"].contains(&runtime.as_str()) {
            bail!("EXECUTOR_RUNTIME {runtime:?} is not one of auto, shell, oci, microvm");
        }
        let vm_prefix = raw.vm_prefix.unwrap_or_else(|| "executor".into());
        if vm_prefix.is_empty()
            || !vm_prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("EXECUTOR_VM_PREFIX {vm_prefix:?} must be letters, digits, '-' or '_'");
        }
        let oci_runtime = raw
            .oci_runtime
            .unwrap_or_else(|| crate::sandbox::oci::DEFAULT_OCI_RUNTIME.into())
            .trim()
            .to_ascii_lowercase();
        if !crate::sandbox::oci::OCI_RUNTIMES.contains(&oci_runtime.as_str()) {
            bail!("EXECUTOR_OCI_RUNTIME {oci_runtime:?} is not one of runc, crun, runsc");
        }
        let state_dir = raw.state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        if !state_dir.is_absolute() {
            bail!("EXECUTOR_STATE_DIR {} must be an absolute path", state_dir.display());
        }
        Ok(Settings {
            frontend_url,
            password,
            frontend_ca: raw.frontend_ca.filter(|p| !p.as_os_str().is_empty()),
            queues,
            multi_queue,
            poll_interval: parse_duration_var(
                "EXECUTOR_QUEUE_POLL_INTERVAL",
                raw.poll_interval.as_deref(),
                "1s",
            )?,
            max_jobs: max_jobs as usize,
            num_total_jobs: parse_num("EXECUTOR_NUM_TOTAL_JOBS", raw.num_total_jobs.as_deref(), 0)?,
            max_active_time: if max_active.is_zero() { None } else { Some(max_active) },
            max_runtime_per_job: max_runtime,
            cleanup_interval: parse_duration_var(
                "EXECUTOR_CLEANUP_TASK_INTERVAL",
                raw.cleanup_task_interval.as_deref(),
                "1m",
            )?,
            keep_workspaces: parse_bool("EXECUTOR_KEEP_WORKSPACES", raw.keep_workspaces.as_deref())?,
            job_cpus: parse_num("EXECUTOR_JOB_NUM_CPUS", raw.job_num_cpus.as_deref(), 4)? as u32,
            job_memory,
            disk_space,
            runtime,
            state_dir,
            allow_unisolated: parse_bool("EXECUTOR_ALLOW_UNISOLATED", raw.allow_unisolated.as_deref())?,
            vm_prefix,
            oci_runtime,
            vm_accel: raw
                .vm_accel
                .as_deref()
                .unwrap_or("auto")
                .trim()
                .parse()
                .map_err(|e: anyhow::Error| anyhow::anyhow!("EXECUTOR_VM_ACCEL: {e}"))?,
            vm_allow_tcg: parse_bool("EXECUTOR_VM_ALLOW_TCG", raw.vm_allow_tcg.as_deref())?,
            shutdown_grace: parse_duration_var(
                "EXECUTOR_SHUTDOWN_GRACE",
                raw.shutdown_grace.as_deref(),
                "30s",
            )?,
            heartbeat_interval: parse_duration_var(
                "EXECUTOR_HEARTBEAT_INTERVAL",
                raw.heartbeat_interval.as_deref(),
                "5s",
            )?
            .max(Duration::from_millis(100)),
            artifacts_max_bytes,
            git_timeout: parse_duration_var("EXECUTOR_GIT_TIMEOUT", raw.git_timeout.as_deref(), "10m")?,
        })
    }

    /// The coordinator's URL, for commands that need it.
    pub fn frontend_url(&self) -> Result<&str> {
        self.frontend_url.as_deref().context("EXECUTOR_FRONTEND_URL (--frontend-url) is not set")
    }

    /// The options every sandbox runtime gets.
    pub fn runtime_options(&self) -> crate::sandbox::RuntimeOptions {
        crate::sandbox::RuntimeOptions {
            state_dir: self.state_dir.clone(),
            allow_unisolated: self.allow_unisolated,
            oci_runtime: self.oci_runtime.clone(),
            vm_accel: self.vm_accel,
            vm_allow_tcg: self.vm_allow_tcg,
        }
    }

    /// Resource limits for one job's sandbox.
    pub fn limits(&self) -> crate::sandbox::Limits {
        crate::sandbox::Limits {
            cpus: self.job_cpus,
            memory_bytes: parse_size(&self.job_memory).unwrap_or(0),
            disk_bytes: parse_size(&self.disk_space).unwrap_or(0),
            pids: 0,
        }
    }

    /// Where job workspaces live.
    pub fn workspaces_dir(&self) -> PathBuf {
        self.state_dir.join("workspaces")
    }
}

/// Reads the secret from `--password-file` or `EXECUTOR_FRONTEND_PASSWORD`.
pub fn load_password(file: Option<&std::path::Path>) -> Result<Secret> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the password file {}", path.display()))?;
        let pw = text.trim_end_matches(['\n', '\r']);
        if pw.is_empty() {
            bail!("the password file {} is empty", path.display());
        }
        return Ok(Secret::new(pw));
    }
    match std::env::var("EXECUTOR_FRONTEND_PASSWORD") {
        Ok(pw) if !pw.is_empty() => Ok(Secret::new(pw)),
        _ => bail!("no shared secret: set EXECUTOR_FRONTEND_PASSWORD or pass --password-file"),
    }
}

fn validate_url(u: &str) -> Result<String> {
    let (scheme, rest) = u.split_once("://").with_context(|| format!("frontend URL {u:?} has no scheme"))?;
    if scheme != "http" && scheme != "https" {
        bail!("frontend URL {u:?}: scheme must be http or https");
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    if host.is_empty() || host.contains('@') {
        bail!("frontend URL {u:?} has no host (or carries credentials)");
    }
    if rest.contains(['?', '#']) {
        bail!("frontend URL {u:?} must not have a query or fragment");
    }
    Ok(u.trim_end_matches('/').to_string())
}

fn parse_queues(name: Option<&str>, names: Option<&str>, needs: Needs) -> Result<(Vec<String>, bool)> {
    let name = name.map(str::trim).filter(|s| !s.is_empty());
    let names = names.map(str::trim).filter(|s| !s.is_empty());
    let check = |q: &str| -> Result<()> {
        if !SOURCEGRAPH_QUEUES.contains(&q) {
            bail!("queue {q:?} is not one of {}", SOURCEGRAPH_QUEUES.join(", "));
        }
        Ok(())
    };
    match (name, names) {
        (Some(_), Some(_)) => bail!("set only one of EXECUTOR_QUEUE_NAME and EXECUTOR_QUEUE_NAMES"),
        (Some(q), None) => {
            check(q)?;
            Ok((vec![q.to_string()], false))
        }
        (None, Some(list)) => {
            let mut qs: Vec<String> = Vec::new();
            for q in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                check(q)?;
                if !qs.iter().any(|x| x == q) {
                    qs.push(q.to_string());
                }
            }
            if qs.is_empty() {
                bail!("EXECUTOR_QUEUE_NAMES names no queue");
            }
            Ok((qs, true))
        }
        (None, None) if needs == Needs::Coordinator => {
            bail!("set EXECUTOR_QUEUE_NAME (--queue) or EXECUTOR_QUEUE_NAMES (--queues)")
        }
        (None, None) => Ok((Vec::new(), false)),
    }
}

fn parse_num(var: &str, v: Option<&str>, default: u64) -> Result<u64> {
    match v.map(str::trim).filter(|s| !s.is_empty()) {
        None => Ok(default),
        Some(s) => s.parse().with_context(|| format!("{var} {s:?} is not a whole number")),
    }
}

fn parse_bool(var: &str, v: Option<&str>) -> Result<bool> {
    match v.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("0") | Some("false") | Some("no") | Some("off") => Ok(false),
        Some("1") | Some("true") | Some("yes") | Some("on") => Ok(true),
        Some(other) => bail!("{var} {other:?} is not a boolean (true or false)"),
    }
}

fn parse_duration_var(var: &str, v: Option<&str>, default: &str) -> Result<Duration> {
    let s = v.map(str::trim).filter(|s| !s.is_empty()).unwrap_or(default);
    parse_duration(s).with_context(|| format!("{var} {s:?}"))
}

/// Parses a Go-style duration: `0`, `500ms`, `30s`, `1h30m`, `1.5s`.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        bail!("empty duration");
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_end == 0 {
            bail!("not a duration (like 30s, 5m, 1h30m)");
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| anyhow::anyhow!("not a duration"))?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => bail!("a duration needs a unit (ms, s, m, h)"),
            u => bail!("unknown duration unit {u:?}"),
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > 1e10 {
        bail!("duration out of range");
    }
    Ok(Duration::from_secs_f64(total))
}

/// Formats a duration the way Go prints it (`30m0s`, `1.5s`), for messages that mirror Go's.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let frac = d.subsec_millis();
    let s_part =
        if frac > 0 { format!("{s}.{frac:03}").trim_end_matches('0').to_string() } else { s.to_string() };
    if h > 0 {
        format!("{h}h{m}m{s_part}s")
    } else if m > 0 {
        format!("{m}m{s_part}s")
    } else {
        format!("{s_part}s")
    }
}

/// Parses a size such as `12G`, `512M`, `100MB`, `1024`; `K`/`M`/`G`/`T` are powers of 1024.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let num_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if num_end == 0 {
        bail!("not a size (like 512M or 12G)");
    }
    let n: u64 = t[..num_end].parse().context("size out of range")?;
    let unit = t[num_end..].trim().to_ascii_uppercase();
    let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => bail!("unknown size unit {:?}", &t[num_end..]),
    };
    n.checked_mul(mult).context("size out of range")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pw() -> Secret {
        Secret::new("s".repeat(24))
    }

    fn raw() -> RawSettings {
        RawSettings {
            frontend_url: Some("http://127.0.0.1:3080/".into()),
            queue_name: Some("batches".into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = Settings::from_raw(raw(), pw(), Needs::Coordinator).unwrap();
        assert_eq!(s.frontend_url.as_deref(), Some("http://127.0.0.1:3080"));
        assert_eq!(s.queues, vec!["batches"]);
        assert!(!s.multi_queue);
        assert_eq!(s.poll_interval, Duration::from_secs(1));
        assert_eq!(s.max_jobs, 1);
        assert_eq!(s.max_runtime_per_job, Duration::from_secs(1800));
        assert_eq!(s.max_active_time, None);
        assert_eq!(s.job_cpus, 4);
        assert_eq!(s.limits().memory_bytes, 12 << 30);
        assert_eq!(s.runtime, "auto");
        assert_eq!(s.oci_runtime, "runc");
        assert!(!s.allow_unisolated);
    }

    #[test]
    fn password_never_prints() {
        let s = Settings::from_raw(raw(), pw(), Needs::Coordinator).unwrap();
        let shown = format!("{s:?} {}", s.password);
        assert!(!shown.contains(&"s".repeat(24)), "{shown}");
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn rejects_bad_values_with_their_names() {
        let short = Settings::from_raw(raw(), Secret::new("short"), Needs::Coordinator).unwrap_err();
        assert!(short.to_string().contains("shorter than 20"), "{short}");
        let mut r = raw();
        r.queue_names = Some("codeintel".into());
        let both = Settings::from_raw(r, pw(), Needs::Coordinator).unwrap_err();
        assert!(both.to_string().contains("only one"), "{both}");
        let mut r = raw();
        r.queue_name = Some("nope".into());
        assert!(Settings::from_raw(r, pw(), Needs::Coordinator)
            .unwrap_err()
            .to_string()
            .contains("\"nope\""));
        let mut r = raw();
        r.frontend_url = Some("ftp://x".into());
        assert!(Settings::from_raw(r, pw(), Needs::Coordinator).is_err());
        let mut r = raw();
        r.maximum_runtime_per_job = Some("10".into());
        let e = format!("{:#}", Settings::from_raw(r, pw(), Needs::Coordinator).unwrap_err());
        assert!(e.contains("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB"), "{e}");
        let mut r = raw();
        r.runtime = Some("docker".into());
        assert!(Settings::from_raw(r, pw(), Needs::Coordinator).is_err());
        let mut r = raw();
        r.frontend_url = None;
        assert!(Settings::from_raw(r.clone(), pw(), Needs::Coordinator).is_err());
        r.queue_name = None;
        assert!(Settings::from_raw(r, pw(), Needs::DocumentOnly).is_ok());
    }

    #[test]
    fn multi_queue() {
        let mut r = raw();
        r.queue_name = None;
        r.queue_names = Some("codeintel, batches,codeintel".into());
        let s = Settings::from_raw(r, pw(), Needs::Coordinator).unwrap();
        assert_eq!(s.queues, vec!["codeintel", "batches"]);
        assert!(s.multi_queue);
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5x").is_err());
        assert_eq!(format_duration(Duration::from_secs(1800)), "30m0s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_secs(3)), "3s");
        assert_eq!(parse_size("12G").unwrap(), 12 << 30);
        assert_eq!(parse_size("100MB").unwrap(), 100 << 20);
        assert_eq!(parse_size("1024").unwrap(), 1024);
        assert!(parse_size("lots").is_err());
    }
}
