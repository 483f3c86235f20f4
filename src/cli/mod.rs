//! Every clap type of the binary. Nothing outside `cli` knows clap: each command's flags are
//! turned into the settings structs of the module that does the work.

mod cache;
mod debug;
pub mod docs;
mod docs_extra;
mod env_check;
pub(crate) mod image;
pub(crate) mod install;
mod log;
pub(crate) mod queue;
pub(crate) mod src_cli;
mod stages;

use clap::{Parser, Subcommand};

use crate::base::exit;
use std::path::PathBuf;

pub(crate) mod executor;
pub(crate) mod vm;

#[derive(Debug, Parser)]
#[command(
    name = "executor",
    version,
    about = "Run untrusted jobs in disposable sandboxes for a coordinator",
    long_about = "Run untrusted jobs in disposable sandboxes for a coordinator that speaks \
Sourcegraph's executor protocol. Each pipeline stage reads one JSON run document and writes the \
updated document; `executor loop` chains the stages; `executor queue` is the coordinator.",
    propagate_version = true,
    max_term_width = 100
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Manage the local image store (import, build, list, remove)
    Image(image::ImageArgs),
    /// The coordinator: serve the job queue, or talk to its admin API
    Queue(queue::QueueArgs),
    /// Write the man pages and shell completions generated from these definitions
    #[command(hide = true)]
    GenerateDocs {
        /// Directory that receives man/, completions/ and docs/settings.md
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    #[command(flatten)]
    Executor(Box<executor::ExecutorCommand>),
    /// Install what a runtime needs on this host
    #[command(subcommand)]
    Install(install::InstallCommand),
    /// Boot a microVM, run a command in it and print the phases of the boot with their times
    TestVm(vm::TestVmArgs),
    /// Manage the host's dependency caches (list, remove, prune, verify)
    Cache(cache::CacheArgs),
    /// A shell in the sandbox kept for a failed job on this host (EXECUTOR_KEEP_FAILED)
    Debug(debug::DebugArgs),
    /// Serve one allowlist job's DNS (started and stopped by the job's network)
    #[command(hide = true)]
    NetworkResolver {
        /// The resolver's configuration, written by the job's network setup
        #[arg(required_unless_present = "spare")]
        config: Option<PathBuf>,
        /// Start ahead of a job: read the configuration's path (a file of DIR) from stdin
        #[arg(long, value_name = "DIR", conflicts_with = "config")]
        spare: Option<PathBuf>,
    },
}

/// The clap command tree, for the generated man pages and completions.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

/// The arguments as clap reads them: a bare `executor` is `executor run`, as Sourcegraph's
/// binary (whose unit says `ExecStart=/usr/local/bin/executor`) runs its executor when given no
/// command.
fn args(mut argv: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if argv.len() == 1 {
        argv.push("run".into());
    }
    argv
}

/// Parses the arguments, runs the command and returns the exit status.
pub(crate) fn main() -> i32 {
    let cli = match <Cli as clap::Parser>::try_parse_from(args(std::env::args_os().collect())) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => exit::OK,
                _ => exit::USAGE,
            };
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("executor: {err:#}");
            exit::code_for(&err)
        }
    }
}

/// Starts sending this process's traces where `EXECUTOR_OTLP_ENDPOINT` says, as `service`
/// (nothing when unset); the spans still queued are sent when the returned value drops.
fn install_traces(service: &'static str) -> anyhow::Result<crate::base::trace::Installed> {
    let usage = |e: anyhow::Error| exit::ExitError::new(exit::USAGE, format!("{e:#}"));
    let endpoint = crate::config::otlp_from_env().map_err(usage)?;
    Ok(crate::base::trace::install(service, endpoint.as_deref()).map_err(usage)?)
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    log::install(&cli.command)?;
    if !matches!(cli.command, Command::GenerateDocs { .. }) {
        let env = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())));
        for line in env_check::report(&env_check::known_variables(&command()), env) {
            eprintln!("executor: warning: {line}");
        }
    }
    match cli.command {
        Command::GenerateDocs { out } => docs::generate(&out).map(|_| exit::OK),
        Command::Image(args) => image::run(args),
        Command::Executor(cmd) => executor::run(*cmd),
        Command::Install(cmd) => install::run(cmd),
        Command::TestVm(args) => vm::test_vm(args),
        Command::Queue(args) => queue::run(args),
        Command::Cache(args) => cache::run(args),
        Command::Debug(args) => debug::run(args),
        Command::NetworkResolver { config, spare } => match (config, spare) {
            (_, Some(dir)) => crate::network::dns::serve_spare(&dir),
            (Some(config), None) => crate::network::dns::serve_main(&config),
            (None, None) => unreachable!("clap requires CONFIG without --spare"),
        }
        .map(|()| exit::OK),
    }
}
