//! The executor's settings: `EXECUTOR_*` environment variables and the equivalent flags, declared
//! once each in [`table`], parsed into their types by [`parse`], and joined into one [`Settings`]
//! struct here. The shared secret only ever comes from
//! `EXECUTOR_FRONTEND_PASSWORD` or `--password-file`, and is held in a [`Secret`] that never prints.

use anyhow::{bail, Context, Result};
use std::path::PathBuf;

use crate::api::{Client, Resources};
use crate::base::secret::Secret;
use crate::protocol::MIN_SECRET_LEN;
use crate::sandbox::RuntimeChoice;

pub(crate) mod parse;
mod setting;
pub(crate) mod table;

pub(crate) use parse::{LogFormat, LogLevel};
pub(crate) use table::{Raw, Values};

/// Validated settings, each in its type: every setting of the table through [`Values`] (so a
/// new setting is its table entry and the code that reads `settings.<id>`), and beside them
/// what joins several settings or comes from elsewhere.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    values: Values,
    pub password: Secret,
    /// One queue (`EXECUTOR_QUEUE_NAME`), or several with `multi_queue` (`EXECUTOR_QUEUE_NAMES`).
    pub queues: Vec<String>,
    pub multi_queue: bool,
    /// `EXECUTOR_RUNTIME`, else what `EXECUTOR_USE_FIRECRACKER` implies, else `auto`.
    pub runtime: RuntimeChoice,
    /// How pulls reach registries (the registry settings).
    pub pull: crate::image::pull::PullSettings,
    /// Every job's network (`EXECUTOR_NETWORK`, `_CIDR`, `_ALLOW`, `_BANDWIDTH`,
    /// `EXECUTOR_DNS_SERVERS`).
    pub network: crate::network::Settings,
}

impl std::ops::Deref for Settings {
    type Target = Values;
    fn deref(&self) -> &Values {
        &self.values
    }
}

fn network_of(v: &Values) -> Result<crate::network::Settings> {
    crate::network::Settings::parse(
        v.network.as_deref(),
        v.network_cidr.as_deref(),
        v.network_allow.as_deref(),
        v.dns_servers.as_deref(),
    )?
    .with_bandwidth(v.network_bandwidth.as_deref())?
    .with_hosts(
        v.network_allow_hosts.as_deref(),
        crate::network::DnsLimits {
            grace_s: v.network_dns_grace.as_secs(),
            rate: v.network_dns_rate.min(u32::MAX as usize) as u32,
            max_name: v.network_dns_max_name,
        },
    )
}

/// What a command needs besides the secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Needs {
    /// The coordinator's URL and the queues (dequeue, loop, validate).
    Coordinator,
    /// Only the secret: the later stages find the URL in the run document.
    DocumentOnly,
}

pub(crate) const DEFAULT_STATE_DIR: &str = "/var/lib/executor";

/// The disk all workspace templates together may take.
pub(crate) const WORKSPACE_TEMPLATES_MAX_BYTES: u64 = 8 << 30;

impl Settings {
    /// Validates `raw`, reading the secret from `EXECUTOR_FRONTEND_PASSWORD` or the password file.
    pub(crate) fn load(raw: &Raw, needs: Needs) -> Result<Settings> {
        let file = raw.get("password_file").map(PathBuf::from);
        let password = load_password(file.as_deref())?;
        Self::from_raw(raw, password, needs)
    }

    /// Validates `raw` with the secret already read.
    pub(crate) fn from_raw(raw: &Raw, password: Secret, needs: Needs) -> Result<Settings> {
        if password.expose().chars().count() < MIN_SECRET_LEN {
            bail!("the frontend password is shorter than {MIN_SECRET_LEN} characters");
        }
        Self::from_values(Values::parse(raw)?, password, needs)
    }

    /// The settings of `v`: the rules that join several settings.
    pub(crate) fn from_values(v: Values, password: Secret, needs: Needs) -> Result<Settings> {
        if v.frontend_url.is_none() && needs == Needs::Coordinator {
            bail!("EXECUTOR_FRONTEND_URL (--frontend-url) is not set");
        }
        let (queues, multi_queue) = match (v.queue_name.clone(), v.queue_names.clone()) {
            (Some(_), Some(_)) => bail!("set only one of EXECUTOR_QUEUE_NAME and EXECUTOR_QUEUE_NAMES"),
            (Some(q), None) => (vec![q], false),
            (None, Some(qs)) => (qs, true),
            (None, None) if needs == Needs::Coordinator => {
                bail!("set EXECUTOR_QUEUE_NAME (--queue) or EXECUTOR_QUEUE_NAMES (--queues)")
            }
            (None, None) => (Vec::new(), false),
        };
        // Sourcegraph's switch picks the runtime only when none is named.
        let runtime = v.runtime_name.unwrap_or(match v.use_firecracker {
            Some(true) => RuntimeChoice::Only(crate::sandbox::RuntimeKind::Microvm),
            Some(false) => RuntimeChoice::Only(crate::sandbox::RuntimeKind::Oci),
            None => RuntimeChoice::Auto,
        });
        let pull = pull_settings(&v)?;
        let network = network_of(&v)?;
        // A rules file that does not parse fails at startup, not at each job.
        if let Some(rules) = &v.cache_rules {
            crate::cache::rules::CacheRules::load(Some(rules))?;
        }
        Ok(Settings { values: v, password, queues, multi_queue, runtime, pull, network })
    }

    /// Only the jobs' network settings of `raw`, for commands that need no secret
    /// (`install iptables-rules`).
    pub(crate) fn network_only(raw: &Raw) -> Result<crate::network::Settings> {
        network_of(&Values::parse(raw)?)
    }

    /// The coordinator's URL, for commands that need it.
    pub(crate) fn frontend_url(&self) -> Result<&str> {
        self.frontend_url.as_deref().context("EXECUTOR_FRONTEND_URL (--frontend-url) is not set")
    }

    /// A coordinator client for `base_url` with this executor's CA and shared secret.
    pub(crate) fn client(&self, base_url: &str, executor_name: &str) -> Result<Client> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let sources = crate::api::metrics::Sources {
            node_exporter: var("NODE_EXPORTER_URL"),
            registry_exporter: var("DOCKER_REGISTRY_NODE_EXPORTER_URL"),
        };
        Ok(Client::new(self.frontend_ca.as_deref(), &self.password, base_url, executor_name)?
            .with_metrics_sources(sources))
    }

    /// What a job may use here, as each dequeue reports it.
    pub(crate) fn resources(&self) -> Resources {
        Resources {
            num_cpus: self.job_cpus as i64,
            memory: self.job_memory.to_string(),
            disk_space: self.disk_space.to_string(),
        }
    }

    /// The options every sandbox runtime gets.
    pub(crate) fn runtime_options(&self) -> crate::sandbox::RuntimeOptions {
        crate::sandbox::RuntimeOptions {
            state_dir: self.state_dir.clone(),
            allow_unisolated: self.allow_unisolated,
            oci_runtime: self.oci_runtime.as_str().to_string(),
            vm_accel: self.vm_accel,
            vm_allow_tcg: self.vm_allow_tcg,
            network: self.network.clone(),
            keep_failed: self.keep_failed.is_some(),
            vm_snapshots: self.vm_snapshots.unwrap_or(true),
        }
    }

    /// Resource limits for one job's sandbox.
    pub(crate) fn limits(&self) -> crate::sandbox::Limits {
        crate::sandbox::Limits {
            cpus: self.job_cpus,
            memory_bytes: self.job_memory.bytes,
            disk_bytes: self.disk_space.bytes,
            pids: 0,
        }
    }

    /// The microVM pool of `loop` when it runs `runtime`: its size and the memory budget. 0 for
    /// any other runtime; else `EXECUTOR_VM_POOL_SIZE`, or when unset (or `auto`) as many idle
    /// VMs as fit in the budget beside `EXECUTOR_MAXIMUM_NUM_JOBS` jobs at their full size, at
    /// most that many (`Budget::default_pool_size`).
    pub(crate) fn vm_pool(
        &self,
        runtime: crate::sandbox::RuntimeKind,
    ) -> Result<(usize, crate::sandbox::microvm::pool::Budget)> {
        let budget = crate::sandbox::microvm::pool::Budget::for_host(&self.limits())?;
        let size = if runtime != crate::sandbox::RuntimeKind::Microvm {
            0
        } else {
            self.vm_pool_size.unwrap_or_else(|| budget.default_pool_size(self.max_jobs))
        };
        Ok((size, budget))
    }

    /// How many pool VMs `loop` restores from a snapshot at once: `EXECUTOR_VM_POOL_RESTORES`,
    /// or when unset (or `auto`) the host's CPU count, at most 4
    /// (`pool::default_restores`).
    pub(crate) fn vm_pool_restores(&self) -> usize {
        self.vm_pool_restores.unwrap_or_else(crate::sandbox::microvm::pool::default_restores)
    }

    /// Where job workspaces live.
    pub(crate) fn workspaces_dir(&self) -> PathBuf {
        self.state_dir.join("workspaces")
    }

    /// The workspace templates of this state directory, within their bounds.
    pub(crate) fn templates(&self) -> crate::workspace::template::Templates {
        crate::workspace::template::Templates::new(
            crate::workspace::templates_dir(&self.workspaces_dir()),
            self.workspace_templates,
            WORKSPACE_TEMPLATES_MAX_BYTES,
        )
    }
}

/// Reads the secret from `--password-file` or `EXECUTOR_FRONTEND_PASSWORD`.
pub(crate) fn load_password(file: Option<&std::path::Path>) -> Result<Secret> {
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

/// How pulls reach registries, from the registry settings of `v` (`executor image pull` reads
/// the same ones).
pub(crate) fn pull_settings(v: &Values) -> Result<crate::image::pull::PullSettings> {
    let mut pull = crate::image::pull::PullSettings::new(
        v.docker_auth_config.as_ref().map(Secret::expose),
        &v.registry_mirror,
        &v.insecure_registry,
        v.registry_ca.as_deref(),
        None,
    )?;
    pull.max_unpacked = v.image_max_size;
    pull.private = v.private_registry.clone();
    pull.timeout = v.image_pull_timeout;
    Ok(pull)
}

/// `EXECUTOR_IMAGE_CACHE_SIZE`: a size (`20G`), or unset, empty or `0` for no budget.
pub(crate) fn parse_cache_size(v: Option<&str>) -> Result<u64> {
    let s = table::setting("image_cache_bytes").context("no setting image_cache_size")?;
    parse::budget(s, v.map(std::ffi::OsStr::new))
}

/// A budget setting of the table (`cache_bytes`) given to a command outside the executor's
/// settings (`executor cache prune --cache-size`).
pub(crate) fn parse_size_setting(id: &str, v: Option<&str>) -> Result<u64> {
    let s = table::setting(id).with_context(|| format!("no setting {id}"))?;
    parse::budget(s, v.map(std::ffi::OsStr::new))
}

/// `EXECUTOR_LOG_LEVEL`, else `SRC_LOG_LEVEL`, and `EXECUTOR_LOG_FORMAT` from the environment:
/// the log facade reads them at startup, before the flags.
pub(crate) fn log_from_env() -> Result<(LogLevel, LogFormat)> {
    Ok((from_env("log_level", parse::log_level)?, from_env("log_format", parse::log_format)?))
}

/// `EXECUTOR_OTLP_ENDPOINT`, else `OTEL_EXPORTER_OTLP_ENDPOINT`: where `loop` and `queue serve`
/// send traces, read at startup; `None`: no traces.
pub(crate) fn otlp_from_env() -> Result<Option<String>> {
    from_env("otlp_endpoint", parse::text)
}

/// Setting `id` read from the environment alone (its variable or an alias, whose name its errors
/// then carry), or its default.
fn from_env<T>(id: &str, parse: fn(&table::Setting, Option<&std::ffi::OsStr>) -> Result<T>) -> Result<T> {
    let s = table::setting(id).with_context(|| format!("no setting {id}"))?;
    match s.env_value() {
        Some((v, var)) => parse(&s.read_from(var), Some(&v)),
        None => parse(s, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::OciRuntime;
    use std::time::Duration;

    fn pw() -> Secret {
        Secret::new("s".repeat(24))
    }

    fn raw() -> Raw {
        let mut r = Raw::default();
        r.set("frontend_url", "http://127.0.0.1:3080/").set("queue_name", "batches");
        r
    }

    fn load(r: &Raw) -> Result<Settings> {
        Settings::from_raw(r, pw(), Needs::Coordinator)
    }

    #[test]
    fn use_firecracker_picks_the_runtime_unless_one_is_named() {
        for (fc, rt, want) in [
            (Some("true"), None, RuntimeChoice::Only(crate::sandbox::RuntimeKind::Microvm)),
            (Some("false"), None, RuntimeChoice::Only(crate::sandbox::RuntimeKind::Oci)),
            (None, None, RuntimeChoice::Auto),
            (Some("true"), Some("oci"), RuntimeChoice::Only(crate::sandbox::RuntimeKind::Oci)),
        ] {
            let mut r = raw();
            if let Some(fc) = fc {
                r.set("use_firecracker", fc);
            }
            if let Some(rt) = rt {
                r.set("runtime_name", rt);
            }
            assert_eq!(load(&r).unwrap().runtime, want, "{fc:?} {rt:?}");
        }
    }

    #[test]
    fn a_cache_rules_file_that_does_not_parse_fails_at_startup() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("rules.json");
        std::fs::write(&f, r#"[{"image": "x*", "prefix": "p", "paths": ["/proc/x"]}]"#).unwrap();
        let mut r = raw();
        r.set("cache_rules", &f);
        let e = format!("{:#}", load(&r).unwrap_err());
        assert!(e.contains("cache rules") && e.contains("/proc"), "{e}");
        std::fs::write(&f, r#"[{"image": "x*", "prefix": "p", "paths": ["/root/.p"]}]"#).unwrap();
        load(&r).unwrap();
    }

    #[test]
    fn defaults_follow_the_contract() {
        let s = load(&raw()).unwrap();
        assert_eq!(s.frontend_url.as_deref(), Some("http://127.0.0.1:3080"));
        assert_eq!(s.queues, vec!["batches"]);
        assert!(!s.multi_queue);
        assert_eq!(s.poll_interval, Duration::from_secs(1));
        assert_eq!(s.max_jobs, 1);
        assert_eq!(s.max_runtime_per_job, Some(Duration::from_secs(1800)));
        assert_eq!(s.shutdown_grace, None, "the jobs end first, as in Sourcegraph's executor");
        assert_eq!(s.max_active_time, None);
        assert_eq!(s.job_cpus, 4);
        assert_eq!(s.limits().memory_bytes, 12 << 30);
        assert_eq!(s.limits().disk_bytes, 20 << 30);
        assert_eq!((s.resources().memory.as_str(), s.resources().disk_space.as_str()), ("12G", "20G"));
        assert_eq!(s.runtime, RuntimeChoice::Auto);
        assert_eq!(s.oci_runtime, OciRuntime::Runc);
        assert_eq!(s.runtime_options().oci_runtime, "runc");
        assert!(!s.allow_unisolated);
        assert_eq!(s.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(s.workspace_templates, 8);
        assert_eq!(s.pull.max_unpacked, 32 << 30);
        assert_eq!(s.log_level, LogLevel::Info);
        assert_eq!(s.network.mode, crate::network::Mode::Internet, "jobs reach the internet by default");
    }

    #[test]
    fn sizes_reach_the_limits_and_the_coordinator_as_written() {
        let mut r = raw();
        r.set("job_memory", "512M").set("disk_space", "1GiB").set("image_max_size", "1G");
        let s = load(&r).unwrap();
        assert_eq!((s.limits().memory_bytes, s.limits().disk_bytes), (512 << 20, 1 << 30));
        assert_eq!((s.resources().memory.as_str(), s.resources().disk_space.as_str()), ("512M", "1GiB"));
        assert_eq!(s.pull.max_unpacked, 1 << 30);
        r.set("image_max_size", "huge");
        let e = format!("{:#}", load(&r).unwrap_err());
        assert!(e.starts_with("EXECUTOR_IMAGE_MAX_SIZE \"huge\""), "{e}");
    }

    #[test]
    fn password_never_prints() {
        let mut r = raw();
        r.set("docker_auth_config", r#"{"auths": {"r.example": {"auth": "dXNlcjpwYXNz"}}}"#);
        let s = load(&r).unwrap();
        let shown = format!("{s:?} {}", s.password);
        assert!(!shown.contains(&"s".repeat(24)), "{shown}");
        assert!(!shown.contains("dXNlcjpwYXNz"), "the registry credentials print: {shown}");
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn rejects_bad_values_with_their_names() {
        let short = Settings::from_raw(&raw(), Secret::new("short"), Needs::Coordinator).unwrap_err();
        assert!(short.to_string().contains("shorter than 20"), "{short}");
        let mut r = raw();
        r.set("queue_names", "codeintel");
        let both = load(&r).unwrap_err();
        assert!(both.to_string().contains("only one"), "{both}");
        let mut r = raw();
        r.set("queue_name", "nope");
        assert!(load(&r).unwrap_err().to_string().contains("\"nope\""));
        let mut r = raw();
        r.set("frontend_url", "ftp://x");
        assert!(load(&r).is_err());
        let mut r = raw();
        r.set("max_runtime_per_job", "10x");
        let e = format!("{:#}", load(&r).unwrap_err());
        assert!(e.contains("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB"), "{e}");
        // The one duration syntax of the project: a bare number is seconds, as for the coordinator.
        let mut r = raw();
        r.set("poll_interval", "5").set("max_runtime_per_job", "1h30m");
        let s = load(&r).unwrap();
        assert_eq!(
            (s.poll_interval, s.max_runtime_per_job),
            (Duration::from_secs(5), Some(Duration::from_secs(5400)))
        );
        // Sourcegraph's executor takes 0 as "no deadline"; so does this one.
        let mut r = raw();
        r.set("max_runtime_per_job", "0").set("shutdown_grace", "90s");
        let s = load(&r).unwrap();
        assert_eq!((s.max_runtime_per_job, s.shutdown_grace), (None, Some(Duration::from_secs(90))));
        let mut r = raw();
        r.set("shutdown_grace", "unlimited");
        assert_eq!(load(&r).unwrap().shutdown_grace, None);
        let mut r = raw();
        r.set("runtime_name", "docker");
        assert!(load(&r).is_err());
        let mut r = raw();
        r.set("use_firecracker", "maybe");
        let e = format!("{:#}", load(&r).unwrap_err());
        assert!(e.contains("EXECUTOR_USE_FIRECRACKER"), "{e}");
        let mut r = raw();
        r.set("vm_startup_script", "/nonexistent/startup.sh");
        let e = format!("{:#}", load(&r).unwrap_err());
        assert!(e.contains("EXECUTOR_VM_STARTUP_SCRIPT_PATH"), "{e}");
        let mut r = raw();
        r.set("state_dir", "relative");
        let e = format!("{:#}", load(&r).unwrap_err());
        assert!(e.contains("EXECUTOR_STATE_DIR relative must be an absolute path"), "{e}");
        let mut r = raw();
        r.unset("frontend_url");
        assert!(load(&r).is_err());
        r.unset("queue_name");
        assert!(Settings::from_raw(&r, pw(), Needs::DocumentOnly).is_ok());
    }

    #[test]
    fn multi_queue() {
        let mut r = raw();
        r.unset("queue_name").set("queue_names", "codeintel, batches,codeintel");
        let s = load(&r).unwrap();
        assert_eq!(s.queues, vec!["codeintel", "batches"]);
        assert!(s.multi_queue);
    }
}
