//! Every clap type of the binary. Nothing outside `cli` knows clap: each command's flags are
//! turned into the settings structs of the module that does the work.

pub mod image;
pub mod queue;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

pub mod executor;
pub mod vm;

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
        /// Directory that receives man/ and completions/
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    #[command(flatten)]
    Executor(Box<executor::ExecutorCommand>),
    /// Install what a runtime needs on this host
    #[command(subcommand)]
    Install(vm::InstallCommand),
    /// Boot a microVM, run a command in it and print the phases of the boot with their times
    TestVm(vm::TestVmArgs),
}

/// The clap command tree, for the generated man pages and completions.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}
