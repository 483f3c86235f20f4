//! `executor`: runs untrusted jobs in disposable sandboxes for a coordinator that speaks
//! Sourcegraph's executor protocol, and that coordinator itself (`executor queue`).
#![deny(unsafe_code)]

pub mod api;
pub mod cancel;
pub mod cli;
pub mod config;
pub mod docs;
mod docs_extra;
pub mod document;
pub mod exit;
pub mod git;
pub mod githttp;
pub mod guest;
pub mod image;
pub mod lockfile;
pub mod logs;
pub mod protocol;
pub mod redact;
pub mod run_loop;
pub mod sandbox;
pub mod server;
pub mod stage;
mod sys;
pub mod vm;
pub mod workspace;

use cli::{Cli, Command};

/// Parses the arguments, runs the command and returns the exit status.
pub fn main() -> i32 {
    let cli = match <Cli as clap::Parser>::try_parse() {
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

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::GenerateDocs { out } => docs::generate(&out).map(|_| exit::OK),
        Command::Image(args) => image::cli::run(args),
        Command::Executor(cmd) => cli::executor::run(*cmd),
        Command::Install(cli::vm::InstallCommand::Vm(args)) => vm::cmd::install_vm(args),
        Command::TestVm(args) => vm::cmd::test_vm(args),
        Command::Queue(args) => cli::queue::run(args),
    }
}
