//! Clap types of the executor's commands: the pipeline stages, `loop`, `validate`, `janitor`,
//! and the configuration flags they share (each with its `EXECUTOR_*` variable).

use clap::{Args, Subcommand};
use std::path::PathBuf;

use crate::config::table::{self, Group, Raw};

/// The executor's configuration: the flags of the settings table (`config::table`), each also
/// set by its environment variable; the shared secret comes only from
/// `EXECUTOR_FRONTEND_PASSWORD` or `--password-file`.
#[derive(Debug, Clone, Default)]
pub struct ConfigArgs {
    /// The unvalidated values (`config::Settings::load` validates them).
    pub raw: Raw,
}

impl clap::FromArgMatches for ConfigArgs {
    fn from_arg_matches(m: &clap::ArgMatches) -> Result<Self, clap::Error> {
        Ok(ConfigArgs { raw: Raw::from_matches(m, Group::Executor) })
    }
    fn update_from_arg_matches(&mut self, m: &clap::ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

impl clap::Args for ConfigArgs {
    fn group_id() -> Option<clap::Id> {
        Some(clap::Id::from("ConfigArgs"))
    }
    fn augment_args(cmd: clap::Command) -> clap::Command {
        let none: [clap::Id; 0] = [];
        cmd.group(clap::ArgGroup::new("ConfigArgs").multiple(true).args(none))
            .next_help_heading("Configuration")
            .args(table::args(Group::Executor))
    }
    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
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
pub struct LoopArgs {
    /// Run `validate`'s checks first and exit 1 when one fails, as Sourcegraph's `run --verify`
    #[arg(long)]
    pub verify: bool,
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
    /// `executor run` is the same command, under the name Sourcegraph's executor gives it, and a
    /// bare `executor` runs it too.
    #[command(visible_alias = "run")]
    Loop(LoopArgs),
    /// Check the configuration, the coordinator's acceptance of the secret and the runtime's tools
    Validate(ConfigOnly),
    /// Remove workspaces and sandboxes that no live job owns (one pass)
    Janitor(ConfigOnly),
}

/// Validates the flags into settings and runs the command; returns the exit status.
pub(crate) fn run(cmd: ExecutorCommand) -> anyhow::Result<i32> {
    use super::stages as cmd;
    use crate::base::exit::{ExitError, USAGE};
    use crate::config::{Needs, Settings};
    use crate::stage::Stage;
    let load = |c: &ConfigArgs, needs: Needs| {
        Settings::load(&c.raw, needs).map_err(|e| anyhow::Error::new(ExitError::new(USAGE, format!("{e:#}"))))
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
        ExecutorCommand::Loop(a) => {
            let settings = load(&a.config, Needs::Coordinator)?;
            if a.verify {
                cmd::validate(settings.clone())?;
            }
            let _traces = super::install_traces("executor")?;
            crate::run_loop::run(settings)
        }
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
