//! `executor`: runs untrusted jobs in disposable sandboxes for a coordinator that speaks
//! Sourcegraph's executor protocol, and that coordinator itself (`executor queue`).
//!
//! The modules form layers that only point down (`layers::LAYERS` is the table a test checks
//! every `crate::` path against), bottom to top:
//!
//! | layer | modules | what they own |
//! |---|---|---|
//! | 0 base | `base` (fs, proc, units, lock, cancel, redact, secret, exit, sys) | utilities that know no job |
//! | 1 wire | `protocol`, `guest`, `githttp` | the executor protocol's types, the guest agent's frames, git's smart HTTP |
//! | 2 documents and client | `document`, `api` | the run document (and its sandbox records), the coordinator client |
//! | 3 job I/O | `logs`, `git` | execution log entries, cloning |
//! | 4 job resources | `workspace`, `image`, `vm`, `network` | workspaces, the image store, the microVM guest's kernel and initramfs, per-job networks |
//! | 5 sandboxes | `sandbox`, `cache` | the `Runtime` trait and its backends; the dependency caches they attach |
//! | 6 settings | `config` | the executor's validated settings |
//! | 7 work | `stage`, `server` | the pipeline stages; the coordinator beside them |
//! | 8 the loop | `run_loop` | many jobs at once, heartbeats, janitor, shutdown |
//! | 9 cli | `cli` | every clap type and the commands behind them |

pub mod base;

pub mod githttp;
pub mod guest;
pub mod protocol;

mod api;
pub mod document;

mod git;
mod logs;

pub mod image;
pub mod network;
mod vm;
pub mod workspace;

mod cache;
pub mod sandbox;

mod config;

pub mod server;
mod stage;

mod run_loop;

pub mod cli;

#[cfg(test)]
mod layers;

/// Parses the arguments, runs the command and returns the exit status.
pub fn main() -> i32 {
    // The oci runtime starts this binary under another name for its shim (no subcommand: it
    // is nothing an operator runs).
    let mut args = std::env::args_os();
    if args.next().is_some_and(|a| a == sandbox::oci::shim::ARG0) {
        return sandbox::oci::shim::main_with_args(args);
    }
    cli::main()
}
