//! The table of the executor's settings: one entry per setting with its flag, environment
//! variable and aliases, default, help text and typed parser. The clap arguments (and so `--help`,
//! the man pages and the completions), the environment check's known names and the settings
//! reference are all made from it; [`Values`] is what its parsers make of one invocation.
//!
//! A new setting is one entry in [`settings!`] below plus the code that reads its field.

use anyhow::Result;
use clap::{Arg, ArgMatches};
use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::Duration;

use super::parse::{self, LogFormat, LogLevel, Size};
pub(crate) use super::setting::{Group, Setting, Shape};
use crate::base::secret::Secret;
use crate::sandbox::microvm::Accel;
use crate::sandbox::{OciRuntime, RuntimeChoice};

/// The raw values of one invocation, by setting id (unset settings are absent), each with the
/// variable it was read from.
#[derive(Clone, Default)]
pub struct Raw(BTreeMap<&'static str, (OsString, &'static str)>);

impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secret = |id: &str| setting(id).is_some_and(|s| s.secret);
        f.debug_map()
            .entries(
                self.0
                    .iter()
                    .map(|(id, (v, _))| (id, if secret(id) { "[redacted]".into() } else { v.clone() })),
            )
            .finish()
    }
}

impl Raw {
    /// The settings of `group` found in `m` (and their aliases in the environment); settings
    /// without a flag are read from the environment.
    pub fn from_matches(m: &ArgMatches, group: Group) -> Raw {
        let mut raw = Raw::default();
        for s in TABLE {
            let from = match s.group {
                Group::EnvOnly => None,
                g if in_group(g, group) => Some(m),
                _ => continue,
            };
            if let Some(v) = s.raw(from) {
                raw.0.insert(s.id, v);
            }
        }
        raw
    }

    /// Sets `id` as if given (for tests and callers building settings in code).
    pub fn set(&mut self, id: &'static str, value: impl Into<OsString>) -> &mut Raw {
        self.0.insert(id, (value.into(), setting(id).map_or("", |s| s.env)));
        self
    }

    /// Forgets `id`.
    pub fn unset(&mut self, id: &str) -> &mut Raw {
        self.0.remove(id);
        self
    }

    pub fn get(&self, id: &str) -> Option<&OsStr> {
        self.0.get(id).map(|(v, _)| v.as_os_str())
    }

    /// The variable `id`'s value was read from.
    pub fn read_from(&self, id: &str) -> Option<&'static str> {
        self.0.get(id).map(|(_, var)| *var)
    }
}

/// Whether a setting of group `g` is a flag of the commands that take `of`.
fn in_group(g: Group, of: Group) -> bool {
    match of {
        Group::Executor => matches!(g, Group::Executor | Group::Registry),
        Group::Registry => g == Group::Registry,
        Group::EnvOnly => false,
    }
}

/// The clap arguments of the settings of `group`, in table order.
pub(crate) fn args(group: Group) -> impl Iterator<Item = Arg> {
    TABLE.iter().filter(move |s| in_group(s.group, group)).map(Setting::arg)
}

/// Every variable the table reads (names and aliases).
pub(crate) fn variables() -> impl Iterator<Item = &'static str> {
    TABLE.iter().flat_map(|s| std::iter::once(s.env).chain(s.aliases.iter().copied()))
}

/// The setting `id`.
pub(crate) fn setting(id: &str) -> Option<&'static Setting> {
    TABLE.iter().find(|s| s.id == id)
}

/// Declares [`TABLE`] and [`Values`]: `field: Type = parser { Setting fields }` per setting.
/// `parser(&Setting, Option<&OsStr>)` turns the raw value (absent when unset) into the type.
/// Attributes before an entry go on its field of [`Values`].
macro_rules! settings {
    ($( $(#[$attr:meta])* $field:ident : $ty:ty = $parse:path { $($k:ident : $v:expr),* $(,)? } )*) => {
        /// Every setting, in the order `--help` lists them.
        pub(crate) static TABLE: &[Setting] = &[ $( Setting { id: stringify!($field), $($k: $v,)* ..Setting::EMPTY } ),* ];

        /// Every setting parsed into its type.
        #[derive(Debug, Clone)]
        pub(crate) struct Values { $( $(#[$attr])* pub(crate) $field: $ty, )* }

        impl Values {
            /// Runs each setting's parser on its raw value.
            pub(crate) fn parse(raw: &Raw) -> Result<Values> {
                Ok(Values { $( $field: {
                    let id = stringify!($field);
                    let s = setting(id).ok_or_else(|| anyhow::anyhow!("no setting {id}"))?;
                    let s = s.read_from(raw.read_from(id).unwrap_or(s.env));
                    $parse(&s, raw.get(id))?
                }, )* })
            }
        }
    };
}

settings! {
    frontend_url: Option<String> = parse::url {
        flag: "frontend-url", env: "EXECUTOR_FRONTEND_URL", value_name: "URL",
        help: "The coordinator's URL (scheme and host)",
    }
    // Read from the raw values before the others are checked (`Settings::load` needs the secret
    // first); parsed here too so that it is declared and documented like every setting.
    #[allow(dead_code)]
    password_file: Option<PathBuf> = parse::path {
        flag: "password-file", env: "EXECUTOR_FRONTEND_PASSWORD_FILE", value_name: "FILE", shape: Shape::Path,
        help: "Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD",
    }
    frontend_ca: Option<PathBuf> = parse::nonempty_path {
        flag: "frontend-ca", env: "EXECUTOR_FRONTEND_CA", value_name: "FILE", shape: Shape::Path,
        help: "PEM file of CA certificates trusted for an https coordinator, besides the public roots and the \
               system trust store (SSL_CERT_FILE, SSL_CERT_DIR)",
    }
    queue_name: Option<String> = parse::queue {
        flag: "queue", env: "EXECUTOR_QUEUE_NAME", value_name: "NAME",
        help: "The queue to take jobs from (batches or codeintel)",
    }
    queue_names: Option<Vec<String>> = parse::queues {
        flag: "queues", env: "EXECUTOR_QUEUE_NAMES", value_name: "NAMES",
        help: "Several queues, comma-separated (multi-queue mode)",
    }
    poll_interval: Duration = parse::duration {
        flag: "poll-interval", env: "EXECUTOR_QUEUE_POLL_INTERVAL", value_name: "DURATION", default: Some("1s"),
        help: "Pause between empty dequeues",
    }
    max_jobs: usize = parse::at_least_one {
        flag: "max-jobs", env: "EXECUTOR_MAXIMUM_NUM_JOBS", value_name: "N", default: Some("1"),
        help: "Jobs run at once by `loop`",
    }
    num_total_jobs: u64 = parse::number {
        flag: "num-total-jobs", env: "EXECUTOR_NUM_TOTAL_JOBS", value_name: "N", default: Some("0"),
        help: "`loop` stops after dequeuing this many jobs (0: no limit)",
    }
    max_active_time: Option<Duration> = parse::duration_or_unlimited {
        flag: "max-active-time", env: "EXECUTOR_MAX_ACTIVE_TIME", value_name: "DURATION", default: Some("0"),
        help: "`loop` stops dequeuing after this long (0: no limit)",
    }
    max_runtime_per_job: Option<Duration> = parse::duration_or_unlimited {
        flag: "max-runtime", env: "EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", value_name: "DURATION", default: Some("30m"),
        help: "Deadline of each job, from its dequeue (0: none, as in Sourcegraph's executor)",
    }
    cleanup_interval: Duration = parse::duration {
        flag: "cleanup-interval", env: "EXECUTOR_CLEANUP_TASK_INTERVAL", value_name: "DURATION", default: Some("1m"),
        help: "Period of the janitor in `loop`",
    }
    keep_workspaces: bool = parse::boolean {
        flag: "keep-workspaces", env: "EXECUTOR_KEEP_WORKSPACES", value_name: "BOOL", shape: Shape::Switch,
        help: "Keep workspaces after `complete`, for debugging",
    }
    job_cpus: u32 = parse::number {
        flag: "job-cpus", env: "EXECUTOR_JOB_NUM_CPUS", aliases: &["EXECUTOR_FIRECRACKER_NUM_CPUS"],
        value_name: "N", default: Some("4"),
        help: "CPUs of each job's sandbox (0: unbounded)",
    }
    job_memory: Size = parse::size {
        flag: "job-memory", env: "EXECUTOR_JOB_MEMORY", aliases: &["EXECUTOR_FIRECRACKER_MEMORY"],
        value_name: "SIZE", default: Some("12G"),
        help: "Memory of each job's sandbox, like 12G (0: unbounded)",
    }
    disk_space: Size = parse::size {
        flag: "disk-space", env: "EXECUTOR_FIRECRACKER_DISK_SPACE", value_name: "SIZE", default: Some("20G"),
        help: "Disk space of each job's workspace",
    }
    runtime_name: Option<RuntimeChoice> = parse::runtime {
        flag: "runtime", env: "EXECUTOR_RUNTIME", value_name: "NAME", default_note: Some("auto"),
        help: "Sandbox runtime: auto, microvm, oci or shell (no isolation)",
    }
    use_firecracker: Option<bool> = parse::opt_boolean {
        flag: "use-firecracker", env: "EXECUTOR_USE_FIRECRACKER", value_name: "BOOL", shape: Shape::Switch,
        help: "Sourcegraph's switch: true picks microvm, false oci, when --runtime is not given",
    }
    vm_startup_script: Option<PathBuf> = parse::existing_file {
        flag: "vm-startup-script", env: "EXECUTOR_VM_STARTUP_SCRIPT_PATH", value_name: "FILE", shape: Shape::Path,
        help: "A script run before the first step, logged as setup.startup-script: on microvm as root in the guest (as Sourcegraph), elsewhere in the first step's image",
    }
    state_dir: PathBuf = parse::absolute_dir {
        flag: "state-dir", env: "EXECUTOR_STATE_DIR", value_name: "DIR", shape: Shape::Path,
        default: Some(super::DEFAULT_STATE_DIR),
        help: "Where workspaces, sandboxes and images live",
    }
    allow_unisolated: bool = parse::boolean {
        flag: "allow-unisolated", env: "EXECUTOR_ALLOW_UNISOLATED", value_name: "BOOL", shape: Shape::Switch,
        help: "Allow the shell runtime, which runs steps on this host without any isolation",
    }
    vm_prefix: String = parse::name_prefix {
        flag: "vm-prefix", env: "EXECUTOR_VM_PREFIX", value_name: "PREFIX", default: Some("executor"),
        help: "Prefix of sandbox names; the janitor only touches sandboxes with it",
    }
    oci_runtime: OciRuntime = parse::oci_runtime {
        flag: "oci-runtime", env: "EXECUTOR_OCI_RUNTIME", value_name: "NAME", default: Some(OciRuntime::DEFAULT.as_str()),
        help: "OCI runtime of the oci sandbox: runc, crun or runsc (gVisor)",
    }
    vm_accel: Accel = parse::accel {
        flag: "vm-accel", env: "EXECUTOR_VM_ACCEL", value_name: "ACCEL", default: Some("auto"),
        help: "microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed)",
    }
    vm_allow_tcg: bool = parse::boolean {
        flag: "vm-allow-tcg", env: "EXECUTOR_VM_ALLOW_TCG", value_name: "BOOL", shape: Shape::Switch,
        help: "Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work",
    }
    vm_pool_size: Option<usize> = parse::count_or_auto {
        flag: "vm-pool-size", env: "EXECUTOR_VM_POOL_SIZE", value_name: "N",
        help: "microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off",
    }
    vm_pool_restores: Option<usize> = parse::at_least_one_or_auto {
        flag: "vm-pool-restores", env: "EXECUTOR_VM_POOL_RESTORES", value_name: "N",
        help: "How many pool VMs `loop` restores from a snapshot at once (cold boots go one at a time), \
               within the memory budget; unset or auto: the host's CPU count, at most 4",
    }
    shutdown_grace: Option<Duration> = parse::duration_or_forever {
        flag: "shutdown-grace", env: "EXECUTOR_SHUTDOWN_GRACE", value_name: "DURATION",
        default_note: Some("until the jobs end"),
        help: "After SIGTERM, SIGINT or SIGHUP, how long `loop` waits for running jobs to end; then (or on a \
               second signal) it stops them and exits without reporting them, so that the coordinator \
               requeues them",
    }
    heartbeat_interval: Duration = parse::heartbeat {
        flag: "heartbeat-interval", env: "EXECUTOR_HEARTBEAT_INTERVAL", value_name: "DURATION", default: Some("5s"),
        help: "Heartbeat period",
    }
    artifacts_max_bytes: u64 = parse::bytes {
        flag: "artifacts-max-size", env: "EXECUTOR_ARTIFACTS_MAX_SIZE", value_name: "SIZE", default: Some("100M"),
        help: "Largest artifact archive `upload` sends",
    }
    git_timeout: Duration = parse::duration {
        flag: "git-timeout", env: "EXECUTOR_GIT_TIMEOUT", value_name: "DURATION", default: Some("10m"),
        help: "Limit for each git command of a clone",
    }
    workspace_templates: usize = parse::number {
        flag: "workspace-templates", env: "EXECUTOR_WORKSPACE_TEMPLATES", value_name: "N", default: Some("8"),
        help: "How many workspace templates (one per repository: its workspace disk right after a clean \
               checkout, which the next job's disk is copied from) to keep; 0 for none",
    }
    image_pull: crate::image::pull::PullPolicy = parse::pull_policy {
        flag: "image-pull", env: "EXECUTOR_IMAGE_PULL", value_name: "POLICY", default: Some("missing"),
        help: "When vm-boot pulls a job's images from their registry: missing, always or never",
    }
    image_cache_bytes: u64 = parse::budget {
        flag: "image-cache-size", env: "EXECUTOR_IMAGE_CACHE_SIZE", value_name: "SIZE", default_note: Some("no budget"),
        help: "The most the image store may take on disk; least recently used pulled images beyond it \
               are removed by the janitor and `image prune`",
    }
    docker_auth_config: Option<Secret> = parse::secret {
        flag: "docker-auth-config", env: "EXECUTOR_DOCKER_AUTH_CONFIG", value_name: "JSON",
        group: Group::Registry, secret: true,
        help: "Registry credentials: the content of a Docker config.json (`{\"auths\": {\"registry\": \
               {\"auth\": \"<base64 user:password>\"}}}`); never logged",
    }
    registry_mirror: Vec<String> = parse::list {
        flag: "registry-mirror", env: "EXECUTOR_DOCKER_REGISTRY_MIRROR_URL", value_name: "URL",
        shape: Shape::List, group: Group::Registry,
        help: "Docker Hub mirrors (base URLs, comma-separated), tried in order before Docker Hub",
    }
    insecure_registry: Vec<String> = parse::list {
        flag: "insecure-registry", env: "EXECUTOR_INSECURE_REGISTRIES", value_name: "HOST",
        shape: Shape::List, group: Group::Registry,
        help: "Registries (`host` or `host:port`, comma-separated) that may be reached over plain HTTP; \
               loopback registries always may",
    }
    private_registry: Vec<String> = parse::list {
        flag: "private-registry", env: "EXECUTOR_PRIVATE_REGISTRIES", value_name: "HOST",
        shape: Shape::List, group: Group::Registry,
        help: "Registries (`host` or `host:port`, comma-separated) that may be at private, loopback, \
               link-local or this host's addresses; pulls refuse other such destinations, as the job's \
               egress policy does (insecure registries and mirrors are listed too)",
    }
    image_pull_timeout: Duration = parse::duration {
        flag: "image-pull-timeout", env: "EXECUTOR_IMAGE_PULL_TIMEOUT", value_name: "DURATION", default: Some("30m"),
        group: Group::Registry,
        help: "The most one image pull may take (a job's own deadline stops it sooner)",
    }
    registry_ca: Option<PathBuf> = parse::path {
        flag: "registry-ca", env: "EXECUTOR_REGISTRY_CA", value_name: "FILE", shape: Shape::Path,
        group: Group::Registry,
        help: "Extra CA certificates (PEM) trusted for registries' TLS, besides the public roots and the system \
               trust store",
    }
    image_max_size: u64 = parse::bytes {
        flag: "image-max-size", env: "EXECUTOR_IMAGE_MAX_SIZE", value_name: "SIZE", default: Some("32G"),
        clap_default: true, group: Group::Registry,
        help: "The most an image's layers may unpack to (a decompression bomb stops here)",
    }
    network: Option<String> = parse::text {
        flag: "network", env: "EXECUTOR_NETWORK", value_name: "MODE", default_note: Some("internet"),
        help: "A job's network: internet (public addresses through the egress policy), allowlist (only the names of \
               EXECUTOR_NETWORK_ALLOW_HOSTS, through a resolver of the executor's) or none (loopback)",
    }
    network_cidr: Option<String> = parse::text {
        flag: "network-cidr", env: "EXECUTOR_NETWORK_CIDR", value_name: "CIDR",
        default_note: Some(crate::network::DEFAULT_POOL),
        help: "The pool each job's /30 comes from",
    }
    network_allow: Option<String> = parse::text {
        flag: "network-allow", env: "EXECUTOR_NETWORK_ALLOW", value_name: "LIST",
        help: "Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]",
    }
    dns_servers: Option<String> = parse::text {
        flag: "dns-servers", env: "EXECUTOR_DNS_SERVERS", value_name: "LIST",
        default_note: Some("the host's non-loopback ones"),
        help: "Resolvers named in a job's resolv.conf, comma-separated",
    }
    network_bandwidth: Option<String> = parse::text {
        flag: "network-bandwidth", env: "EXECUTOR_NETWORK_BANDWIDTH", value_name: "RATE", default_note: Some("none"),
        help: "A cap on each job's bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit)",
    }
    // The log facade reads these two from the environment at startup, before the flags
    // (`config::log_from_env`); they are parsed here too, as every entry is.
    #[allow(dead_code)]
    log_level: LogLevel = parse::log_level {
        env: "EXECUTOR_LOG_LEVEL", aliases: &["SRC_LOG_LEVEL"], value_name: "LEVEL", default: Some("info"),
        group: Group::EnvOnly,
        help: "The most detailed log lines written: error, warn, info, debug or trace (Sourcegraph's dbug \
               and eror too); read at startup by the log facade",
    }
    #[allow(dead_code)]
    log_format: LogFormat = parse::log_format {
        env: "EXECUTOR_LOG_FORMAT", value_name: "FORMAT", default: Some("human"),
        group: Group::EnvOnly,
        help: "How log lines look: human (today's lines) or json (one object a line, with the job id, \
               stage and runtime as fields); read at startup by the log facade",
    }    // Read at startup by `loop` and `queue serve` (`config::otlp_from_env`), as the log settings.
    #[allow(dead_code)]
    otlp_endpoint: Option<String> = parse::text {
        env: "EXECUTOR_OTLP_ENDPOINT", aliases: &["OTEL_EXPORTER_OTLP_ENDPOINT"], value_name: "URL",
        group: Group::EnvOnly, default_note: Some("off"),
        help: "An OpenTelemetry collector's OTLP/HTTP base URL (spans go to URL/v1/traces, with the headers of \
               OTEL_EXPORTER_OTLP_HEADERS): `loop` sends one trace per job, `queue serve` a span per submit; \
               unset: no traces",
    }
    caches: Option<bool> = parse::opt_boolean {
        flag: "caches", env: "EXECUTOR_CACHES", value_name: "BOOL", default_note: Some("true"),
        help: "Attach dependency caches to jobs that declare them or match a cache rule (docs/caches.md)",
    }
    cache_rules: Option<PathBuf> = parse::existing_file {
        flag: "cache-rules", env: "EXECUTOR_CACHE_RULES", value_name: "FILE",
        default_note: Some("the shipped rules for Sourcegraph's indexers"),
        help: "A JSON list of {image, prefix, files, paths}: the caches of jobs that declare none, by step image",
    }
    cache_bytes: u64 = parse::budget {
        flag: "cache-size", env: "EXECUTOR_CACHE_SIZE", value_name: "SIZE", default_note: Some("no budget"),
        help: "The most the dependency caches may take on disk; least recently used versions beyond it \
               (never one a running job uses) are removed by the janitor, each save and `cache prune`",
    }
    cache_trusted_queues: Vec<String> = parse::list {
        flag: "cache-trusted-queues", env: "EXECUTOR_CACHE_TRUSTED_QUEUES", value_name: "LIST",
        help: "Queues whose successful jobs save their caches whatever their commit (besides commits at the \
               tip of their repository's default branch), comma-separated",
    }
    keep_failed: Option<Duration> = parse::duration_or_unlimited {
        flag: "keep-failed", env: "EXECUTOR_KEEP_FAILED", value_name: "DURATION", default: Some("0"),
        help: "Keep a failed job's sandbox (an oci container's layer, a paused microVM) this long for \
               `executor debug JOB` (network off, secrets out of its environment); 0: never. A \
               coordinator's per-queue policy may shorten it",
    }
    keep_failed_max: usize = parse::number {
        flag: "keep-failed-max", env: "EXECUTOR_KEEP_FAILED_MAX", value_name: "N", default: Some("3"),
        help: "The most sandboxes kept for debugging at once; the oldest is released first",
    }
    keep_failed_disk: u64 = parse::bytes {
        flag: "keep-failed-disk", env: "EXECUTOR_KEEP_FAILED_DISK", value_name: "SIZE", default: Some("20G"),
        help: "The most disk all sandboxes kept for debugging may hold; the oldest is released first",
    }
    vm_snapshots: Option<bool> = parse::opt_boolean {
        flag: "vm-snapshots", env: "EXECUTOR_VM_SNAPSHOTS", value_name: "BOOL",
        help: "Restore the VM pool's VMs from a snapshot of one booted template per pool key instead of \
               booting each (default true; false: every VM boots)",
    }
    network_allow_hosts: Option<String> = parse::text {
        flag: "network-allow-hosts", env: "EXECUTOR_NETWORK_ALLOW_HOSTS", value_name: "NAMES", default_note: Some("none"),
        help: "With EXECUTOR_NETWORK=allowlist, the names jobs may resolve and reach, comma-separated: NAME or \
               *.NAME (the names below it), either with :PORT (e.g. registry.npmjs.org,*.github.com,proxy.golang.org:443)",
    }
    network_dns_grace: Duration = parse::duration {
        flag: "network-dns-grace", env: "EXECUTOR_NETWORK_DNS_GRACE", value_name: "DURATION", default: Some("30s"),
        help: "With EXECUTOR_NETWORK=allowlist, how long an answer's addresses stay reachable past its TTL",
    }
    network_dns_rate: usize = parse::at_least_one {
        flag: "network-dns-rate", env: "EXECUTOR_NETWORK_DNS_RATE", value_name: "N", default: Some("50"),
        help: "With EXECUTOR_NETWORK=allowlist, DNS questions per second a job's resolver answers (a burst of \
               as many); more are refused and logged (bounds DNS tunnelling)",
    }
    network_dns_max_name: usize = parse::at_least_one {
        flag: "network-dns-max-name", env: "EXECUTOR_NETWORK_DNS_MAX_NAME", value_name: "N", default: Some("128"),
        help: "With EXECUTOR_NETWORK=allowlist, the longest name (characters) a job's resolver forwards; longer \
               ones are refused and logged (bounds DNS tunnelling)",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_every_flag_setting_has_a_flag() {
        let (mut ids, mut vars, mut flags) = (Vec::new(), Vec::new(), Vec::new());
        for s in TABLE {
            assert!(!ids.contains(&s.id), "{} is declared twice", s.id);
            ids.push(s.id);
            for name in std::iter::once(s.env).chain(s.aliases.iter().copied()) {
                assert!(!vars.contains(&name), "{name} is read by two settings");
                vars.push(name);
            }
            if !s.flag.is_empty() {
                assert!(!flags.contains(&s.flag), "--{} is declared twice", s.flag);
                flags.push(s.flag);
            }
            assert_eq!(s.flag.is_empty(), s.group == Group::EnvOnly, "{}", s.id);
            assert!(s.env.starts_with("EXECUTOR_") && !s.help.is_empty(), "{}", s.id);
            assert!(!s.help.ends_with('.'), "{}: help ends without a period", s.id);
        }
        assert!(variables().any(|v| v == "SRC_LOG_LEVEL"));
    }

    #[test]
    fn errors_name_the_alias_a_value_came_from() {
        let mut raw = Raw::default();
        raw.0.insert("job_memory", ("lots".into(), "EXECUTOR_FIRECRACKER_MEMORY"));
        let e = format!("{:#}", Values::parse(&raw).unwrap_err());
        assert!(e.starts_with("EXECUTOR_FIRECRACKER_MEMORY \"lots\""), "{e}");
        raw.set("job_memory", "lots");
        let e = format!("{:#}", Values::parse(&raw).unwrap_err());
        assert!(e.starts_with("EXECUTOR_JOB_MEMORY \"lots\""), "{e}");
    }

    #[test]
    fn raw_values_of_secret_settings_never_print() {
        let mut raw = Raw::default();
        raw.set("docker_auth_config", "hunter2-credentials").set("vm_prefix", "ci");
        let shown = format!("{raw:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("[redacted]") && shown.contains("ci"),
            "{shown}"
        );
    }

    #[test]
    fn flags_parse_into_values() {
        let cmd = clap::Command::new("t").args(args(Group::Executor));
        let m = cmd
            .try_get_matches_from([
                "t",
                "--job-memory",
                "2G",
                "--keep-workspaces",
                "--registry-mirror",
                "https://a",
                "--registry-mirror",
                "https://b,https://c",
            ])
            .unwrap();
        let v = Values::parse(&Raw::from_matches(&m, Group::Executor)).unwrap();
        assert_eq!(v.job_memory.bytes, 2 << 30);
        assert!(v.keep_workspaces);
        assert_eq!(v.registry_mirror, ["https://a", "https://b", "https://c"]);
        assert_eq!(v.image_max_size, 32 << 30, "clap's default");
    }
}
