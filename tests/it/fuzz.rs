//! The cargo-fuzz targets in fuzz/ get a smoke run (`scripts/fuzz --runs N`): every target
//! builds, starts from its seeds and survives a few thousand generated inputs.

use std::path::Path;
use std::process::Command;

use crate::common;

/// Inputs per target: enough to leave the seeds behind, short enough for the suite.
const SMOKE_RUNS: &str = "3000";

#[test]
fn fuzz_targets_survive_a_smoke_run() {
    let test = "fuzz_targets_survive_a_smoke_run";
    let nightly = Command::new("cargo").args(["+nightly", "--version"]).output();
    if !matches!(&nightly, Ok(o) if o.status.success()) {
        common::skip(test, "fuzz", "cargo-fuzz needs a nightly toolchain (rustup toolchain install nightly)");
        return;
    }
    let fuzz = Command::new("cargo").args(["+nightly", "fuzz", "--version"]).output();
    if !matches!(&fuzz, Ok(o) if o.status.success()) {
        common::skip(test, "fuzz", "cargo-fuzz is not installed (scripts/install-deps installs it)");
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(root.join("scripts/fuzz"))
        .args(["--runs", SMOKE_RUNS])
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "scripts/fuzz failed:\n{err}");
    let targets = ["job_json", "run_document", "image_import", "guest_frames", "git_route", "workspace_tar"];
    for t in targets {
        assert!(err.contains(&format!("== fuzz: {t} ")), "target {t} did not run:\n{err}");
    }
    let done = err.lines().filter(|l| l.starts_with("Done ") || l.contains("DONE")).count();
    assert_eq!(done, targets.len(), "each target reports its runs:\n{err}");
}
