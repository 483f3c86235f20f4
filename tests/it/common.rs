//! Shared test helpers: the binary under test, temporary directories, and skip notices.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The `executor` binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_executor"))
}

/// A command for the binary with a clean `EXECUTOR_*` environment.
pub fn executor() -> Command {
    let mut c = Command::new(bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("EXECUTOR_") {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null());
    c
}

/// Runs `cmd` to completion and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running the executor binary")
}

/// Prints why a test is skipped; used only where the machine truly cannot run it.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

pub fn is_root() -> bool {
    nix_uid() == 0
}

fn nix_uid() -> u32 {
    // Avoids unsafe: /proc/self/status names the real uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(u32::MAX)
}
