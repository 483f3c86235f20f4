//! A short soak in the suite: `scripts/soak 16` (two jobs of each of its eight kinds: plain,
//! failing, memory hog, fork bomb, disk filler, 20 MB log, leftover background process,
//! canceled) through a real coordinator and `executor loop` on `oci` (runc), 4 at a time. The
//! script checks every outcome and that nothing is left (mounts, loop devices, processes,
//! cgroups, network namespaces, nftables elements, workspaces) and exits 1 otherwise.

use crate::common;
use std::path::Path;

#[test]
fn soak_mixed_jobs_on_oci_end_right_and_leave_nothing() {
    if !crate::oci::can_run("soak_mixed_jobs_on_oci_end_right_and_leave_nothing", "runc") {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/soak");
    let out = std::process::Command::new(script)
        .arg("16")
        .env("SOAK_BIN", common::bin())
        .env("RUNTIME", "oci")
        .env("OCI_RUNTIME", "runc")
        .env("PARALLEL", "4")
        .env("EXECUTOR_NETWORK", "none")
        .output()
        .expect("running scripts/soak");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "scripts/soak 16 failed ({}):\n{text}", out.status);
    assert!(text.contains("16 of 16 jobs finished"), "{text}");
    for what in ["mounts", "loops", "netns", "cgroups", "nft", "processes", "workspaces and sandbox records"]
    {
        assert!(text.contains(&format!("  {what}: 0\n")), "{what} left:\n{text}");
    }
}
