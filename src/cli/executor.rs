//! Clap types of the executor's commands: the pipeline stages, `loop`, `validate`, `janitor`,
//! and the configuration flags they share (each with its `EXECUTOR_*` variable).

use clap::{Args, Subcommand};
use std::path::PathBuf;

use crate::config::RawSettings;

/// The executor's configuration. Every flag can also be set by its environment variable; the
/// shared secret comes only from `EXECUTOR_FRONTEND_PASSWORD` or `--password-file`.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Configuration")]
pub struct ConfigArgs {
    /// The coordinator's URL (scheme and host)
    #[arg(long, env = "EXECUTOR_FRONTEND_URL", value_name = "URL")]
    pub frontend_url: Option<String>,
    /// Read the shared secret from this file instead of EXECUTOR_FRONTEND_PASSWORD
    #[arg(long, env = "EXECUTOR_FRONTEND_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// PEM file of CA certificates trusted for an https coordinator, besides the public roots
    #[arg(long, env = "EXECUTOR_FRONTEND_CA", value_name = "FILE")]
    pub frontend_ca: Option<PathBuf>,
    /// The queue to take jobs from (batches or codeintel)
    #[arg(long = "queue", env = "EXECUTOR_QUEUE_NAME", value_name = "NAME")]
    pub queue_name: Option<String>,
    /// Several queues, comma-separated (multi-queue mode)
    #[arg(long = "queues", env = "EXECUTOR_QUEUE_NAMES", value_name = "NAMES")]
    pub queue_names: Option<String>,
    /// Pause between empty dequeues [default: 1s]
    #[arg(long, env = "EXECUTOR_QUEUE_POLL_INTERVAL", value_name = "DURATION")]
    pub poll_interval: Option<String>,
    /// Jobs run at once by `loop` [default: 1]
    #[arg(long = "max-jobs", env = "EXECUTOR_MAXIMUM_NUM_JOBS", value_name = "N")]
    pub maximum_num_jobs: Option<String>,
    /// `loop` stops after dequeuing this many jobs (0: no limit) [default: 0]
    #[arg(long = "num-total-jobs", env = "EXECUTOR_NUM_TOTAL_JOBS", value_name = "N")]
    pub num_total_jobs: Option<String>,
    /// `loop` stops dequeuing after this long (0: no limit) [default: 0]
    #[arg(long, env = "EXECUTOR_MAX_ACTIVE_TIME", value_name = "DURATION")]
    pub max_active_time: Option<String>,
    /// Deadline of each job, from its dequeue [default: 30m]
    #[arg(long = "max-runtime", env = "EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", value_name = "DURATION")]
    pub maximum_runtime_per_job: Option<String>,
    /// Period of the janitor in `loop` [default: 1m]
    #[arg(long = "cleanup-interval", env = "EXECUTOR_CLEANUP_TASK_INTERVAL", value_name = "DURATION")]
    pub cleanup_task_interval: Option<String>,
    /// Keep workspaces after `complete`, for debugging
    #[arg(long, env = "EXECUTOR_KEEP_WORKSPACES", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub keep_workspaces: Option<String>,
    /// CPUs of each job's sandbox (0: unbounded) [default: 4]
    #[arg(long = "job-cpus", env = "EXECUTOR_JOB_NUM_CPUS", value_name = "N")]
    pub job_num_cpus: Option<String>,
    /// Memory of each job's sandbox, like 12G (0: unbounded) [default: 12G]
    #[arg(long, env = "EXECUTOR_JOB_MEMORY", value_name = "SIZE")]
    pub job_memory: Option<String>,
    /// Disk space of each job's workspace [default: 20G]
    #[arg(long, env = "EXECUTOR_FIRECRACKER_DISK_SPACE", value_name = "SIZE")]
    pub disk_space: Option<String>,
    /// Sandbox runtime: auto, microvm, oci or shell (no isolation) [default: auto]
    #[arg(long, env = "EXECUTOR_RUNTIME", value_name = "NAME")]
    pub runtime: Option<String>,
    /// Sourcegraph's switch: true picks microvm, false oci, when --runtime is not given
    #[arg(long, env = "EXECUTOR_USE_FIRECRACKER", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub use_firecracker: Option<String>,
    /// A script run inside the sandbox before the first step (in the first step's image), logged as setup.startup-script
    #[arg(long, env = "EXECUTOR_VM_STARTUP_SCRIPT_PATH", value_name = "FILE")]
    pub vm_startup_script: Option<PathBuf>,
    /// Where workspaces, sandboxes and images live [default: /var/lib/executor]
    #[arg(long, env = "EXECUTOR_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Allow the shell runtime, which runs steps on this host without any isolation
    #[arg(long, env = "EXECUTOR_ALLOW_UNISOLATED", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub allow_unisolated: Option<String>,
    /// Prefix of sandbox names; the janitor only touches sandboxes with it [default: executor]
    #[arg(long, env = "EXECUTOR_VM_PREFIX", value_name = "PREFIX")]
    pub vm_prefix: Option<String>,
    /// OCI runtime of the oci sandbox: runc, crun or runsc (gVisor) [default: runc]
    #[arg(long, env = "EXECUTOR_OCI_RUNTIME", value_name = "NAME")]
    pub oci_runtime: Option<String>,
    /// microvm accelerator: kvm, tcg, or auto (KVM where the cached boot probe passed, else TCG if allowed) [default: auto]
    #[arg(long = "vm-accel", env = "EXECUTOR_VM_ACCEL", value_name = "ACCEL")]
    pub vm_accel: Option<String>,
    /// Let the microvm runtime fall back to TCG software emulation (slow) where KVM does not work
    #[arg(long = "vm-allow-tcg", env = "EXECUTOR_VM_ALLOW_TCG", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub vm_allow_tcg: Option<String>,
    /// microVMs `loop` keeps booted ahead of demand, each used by one job then destroyed; unset or auto: chosen from memory, 0: off
    #[arg(long = "vm-pool-size", env = "EXECUTOR_VM_POOL_SIZE", value_name = "N")]
    pub vm_pool_size: Option<String>,
    /// After SIGTERM, how long `loop` lets running jobs finish before killing them [default: 30s]
    #[arg(long, env = "EXECUTOR_SHUTDOWN_GRACE", value_name = "DURATION")]
    pub shutdown_grace: Option<String>,
    /// Heartbeat period [default: 5s]
    #[arg(long, env = "EXECUTOR_HEARTBEAT_INTERVAL", value_name = "DURATION")]
    pub heartbeat_interval: Option<String>,
    /// Largest artifact archive `upload` sends [default: 100M]
    #[arg(long, env = "EXECUTOR_ARTIFACTS_MAX_SIZE", value_name = "SIZE")]
    pub artifacts_max_size: Option<String>,
    /// Limit for each git command of a clone [default: 10m]
    #[arg(long, env = "EXECUTOR_GIT_TIMEOUT", value_name = "DURATION")]
    pub git_timeout: Option<String>,
    /// How many workspace templates (one per repository: its workspace disk right after a clean
    /// checkout, which the next job's disk is copied from) to keep; 0 for none [default: 8]
    #[arg(long, env = "EXECUTOR_WORKSPACE_TEMPLATES", value_name = "N")]
    pub workspace_templates: Option<String>,
    /// When vm-boot pulls a job's images from their registry: missing, always or never
    /// [default: missing]
    #[arg(long, env = "EXECUTOR_IMAGE_PULL", value_name = "POLICY")]
    pub image_pull: Option<String>,
    /// The most the image store may take on disk; least recently used pulled images beyond it
    /// are removed by the janitor and `image prune` [default: no budget]
    #[arg(long, env = "EXECUTOR_IMAGE_CACHE_SIZE", value_name = "SIZE")]
    pub image_cache_size: Option<String>,
    #[command(flatten)]
    pub registry: super::image::RegistryArgs,
    /// A job's network: internet (public addresses through the egress policy) or none (loopback) [default: internet]
    #[arg(long, env = "EXECUTOR_NETWORK", value_name = "MODE")]
    pub network: Option<String>,
    /// The pool each job's /30 comes from [default: 10.255.0.0/16]
    #[arg(long, env = "EXECUTOR_NETWORK_CIDR", value_name = "CIDR")]
    pub network_cidr: Option<String>,
    /// Destinations jobs may reach despite the policy, comma-separated CIDR[:PORT]
    #[arg(long, env = "EXECUTOR_NETWORK_ALLOW", value_name = "LIST")]
    pub network_allow: Option<String>,
    /// Resolvers named in a job's resolv.conf, comma-separated [default: the host's non-loopback ones]
    #[arg(long, env = "EXECUTOR_DNS_SERVERS", value_name = "LIST")]
    pub dns_servers: Option<String>,
    /// A cap on each job's bandwidth: RATE for both directions, or INGRESS/EGRESS as seen from the job (e.g. 50mbit/10mbit) [default: none]
    #[arg(long, env = "EXECUTOR_NETWORK_BANDWIDTH", value_name = "RATE")]
    pub network_bandwidth: Option<String>,
}

impl ConfigArgs {
    /// The unvalidated settings (`config::Settings::load` validates them).
    pub fn raw(&self) -> RawSettings {
        let fallback = |v: &Option<String>, var: &str| v.clone().or_else(|| std::env::var(var).ok());
        RawSettings {
            frontend_url: self.frontend_url.clone(),
            password_file: self.password_file.clone(),
            frontend_ca: self.frontend_ca.clone(),
            queue_name: self.queue_name.clone(),
            queue_names: self.queue_names.clone(),
            poll_interval: self.poll_interval.clone(),
            maximum_num_jobs: self.maximum_num_jobs.clone(),
            num_total_jobs: self.num_total_jobs.clone(),
            max_active_time: self.max_active_time.clone(),
            maximum_runtime_per_job: self.maximum_runtime_per_job.clone(),
            cleanup_task_interval: self.cleanup_task_interval.clone(),
            keep_workspaces: self.keep_workspaces.clone(),
            job_num_cpus: fallback(&self.job_num_cpus, "EXECUTOR_FIRECRACKER_NUM_CPUS"),
            job_memory: fallback(&self.job_memory, "EXECUTOR_FIRECRACKER_MEMORY"),
            disk_space: self.disk_space.clone(),
            runtime: self.runtime.clone(),
            use_firecracker: self.use_firecracker.clone(),
            vm_startup_script: self.vm_startup_script.clone(),
            state_dir: self.state_dir.clone(),
            allow_unisolated: self.allow_unisolated.clone(),
            vm_prefix: self.vm_prefix.clone(),
            oci_runtime: self.oci_runtime.clone(),
            vm_accel: self.vm_accel.clone(),
            vm_allow_tcg: self.vm_allow_tcg.clone(),
            vm_pool_size: self.vm_pool_size.clone(),
            shutdown_grace: self.shutdown_grace.clone(),
            heartbeat_interval: self.heartbeat_interval.clone(),
            artifacts_max_size: self.artifacts_max_size.clone(),
            git_timeout: self.git_timeout.clone(),
            workspace_templates: self.workspace_templates.clone(),
            image_pull: self.image_pull.clone(),
            docker_auth_config: self.registry.docker_auth_config.clone(),
            registry_mirrors: self.registry.registry_mirror.clone(),
            insecure_registries: self.registry.insecure_registry.clone(),
            registry_ca: self.registry.registry_ca.clone(),
            image_max_size: Some(self.registry.image_max_size.clone()),
            image_cache_size: self.image_cache_size.clone(),
            network: self.network.clone(),
            network_cidr: self.network_cidr.clone(),
            network_allow: self.network_allow.clone(),
            dns_servers: self.dns_servers.clone(),
            network_bandwidth: self.network_bandwidth.clone(),
        }
    }
}

/// Where a stage reads and writes its run document.
#[derive(Debug, Clone, Args)]
pub struct DocumentIo {
    /// Read the run document from FILE instead of standard input
    #[arg(long, short, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Write the updated run document to FILE (atomically) instead of standard output
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct DequeueArgs {
    /// Write the new run document to FILE (atomically) instead of standard output
    #[arg(long, short, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Wait up to DURATION for a job, with the coordinator's long poll where it offers one
    #[arg(long, value_name = "DURATION")]
    pub wait: Option<String>,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Clone, Args)]
pub struct StageArgs {
    #[command(flatten)]
    pub io: DocumentIo,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ConfigOnly {
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// The executor's commands (flattened into the root command).
#[derive(Debug, Subcommand)]
pub enum ExecutorCommand {
    /// Take one job from the coordinator and write its new run document (exit 4: no job)
    Dequeue(DequeueArgs),
    /// Create the job's workspace: repository, files, one script per step
    PrepareWorkspace(StageArgs),
    /// Start the job's sandbox with the chosen runtime and record it in the document
    VmBoot(StageArgs),
    /// Run the job's steps in its sandbox, streaming each as a log entry
    RunSteps(StageArgs),
    /// Pack the job's artifacts into a tar.gz and send them to the coordinator
    Upload(StageArgs),
    /// Report the outcome, tear down the sandbox and delete the workspace (safe to run twice)
    Complete(StageArgs),
    /// Run jobs continuously: the stages in-process, with heartbeats, cancellation and draining
    ///
    /// `executor run` is the same command, under the name Sourcegraph's executor gives it.
    #[command(visible_alias = "run")]
    Loop(ConfigOnly),
    /// Check the configuration, the coordinator's acceptance of the secret and the runtime's tools
    Validate(ConfigOnly),
    /// Remove workspaces and sandboxes that no live job owns (one pass)
    Janitor(ConfigOnly),
}

/// Validates the flags into settings and runs the command; returns the exit status.
pub fn run(cmd: ExecutorCommand) -> anyhow::Result<i32> {
    use super::stages as cmd;
    use crate::base::exit::{ExitError, USAGE};
    use crate::config::{Needs, Settings};
    use crate::stage::Stage;
    let load = |c: &ConfigArgs, needs: Needs| {
        Settings::load(c.raw(), needs)
            .map_err(|e| anyhow::Error::new(ExitError::new(USAGE, format!("{e:#}"))))
    };
    match cmd {
        ExecutorCommand::Dequeue(a) => {
            let wait = match a.wait.as_deref() {
                Some(w) => Some(
                    crate::base::units::parse_duration(w)
                        .map_err(|e| ExitError::new(USAGE, format!("--wait {w:?}: {e:#}")))?,
                ),
                None => None,
            };
            cmd::dequeue(load(&a.config, Needs::Coordinator)?, a.output.as_deref(), wait)
        }
        ExecutorCommand::PrepareWorkspace(a) => stage(Stage::PrepareWorkspace, a, load),
        ExecutorCommand::VmBoot(a) => stage(Stage::VmBoot, a, load),
        ExecutorCommand::RunSteps(a) => stage(Stage::RunSteps, a, load),
        ExecutorCommand::Upload(a) => stage(Stage::Upload, a, load),
        ExecutorCommand::Complete(a) => stage(Stage::Complete, a, load),
        ExecutorCommand::Loop(a) => crate::run_loop::run(load(&a.config, Needs::Coordinator)?),
        ExecutorCommand::Validate(a) => cmd::validate(load(&a.config, Needs::Coordinator)?),
        ExecutorCommand::Janitor(a) => cmd::janitor(load(&a.config, Needs::DocumentOnly)?),
    }
}

fn stage(
    stage: crate::stage::Stage,
    a: StageArgs,
    load: impl Fn(&ConfigArgs, crate::config::Needs) -> anyhow::Result<crate::config::Settings>,
) -> anyhow::Result<i32> {
    let settings = load(&a.config, crate::config::Needs::DocumentOnly)?;
    super::stages::stage(stage, settings, a.io.input.as_deref(), a.io.output.as_deref())
}
