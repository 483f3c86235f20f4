//! Benchmark for scripts/bench-image: what the writable root costs a step, in one run.
//!
//! 1. The layer alone: making and mounting a step's overlay (layer directory on the workspace,
//!    upper/work, overlay mount) and unmounting and removing it, which is all a step does more
//!    than with a read-only image root (`sandbox::oci::rootfs::{mount_step, unmount_step}`).
//! 2. Whole steps (`true` in busybox through `Runtime::run_step` with runc), for scale.
//!
//! Usage: bench_image_layer STATE_DIR WORKSPACE RUNS   (the store must hold `busybox`)

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use executor::base::cancel::Cancel;
use executor::sandbox::oci::{rootfs, OciDetails, OciRuntime};
use executor::sandbox::{
    BootRequest, Limits, OutputSink, RecordDetails, Runtime, RuntimeOptions, StepEnd, StepSpec, Stream,
};

struct Null;
impl OutputSink for Null {
    fn output(&mut self, _: Stream, _: &[u8]) {}
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, state, workspace, runs] = args.as_slice() else {
        bail!("usage: bench_image_layer STATE_DIR WORKSPACE RUNS");
    };
    let runs: usize = runs.parse().context("RUNS")?;
    let ws = std::path::PathBuf::from(workspace);
    let opts = RuntimeOptions { state_dir: state.into(), oci_runtime: "runc".into(), ..Default::default() };
    let rt = OciRuntime::new(opts)?;
    let limits = Limits { cpus: 0, memory_bytes: 512 << 20, disk_bytes: 0, pids: 0 };
    let req = BootRequest {
        job_uid: "bench",
        workspace: &ws,
        images: vec!["busybox".into()],
        limits: &limits,
        name_prefix: "benchlayer",
        coordinator: None,
        endpoints: &[],
    };
    let sb = rt.boot(&req)?;
    let res = (|| -> Result<()> {
        let Some(d) = OciDetails::of(&sb)? else { bail!("no oci details") };
        let img = d.images.get("busybox").context("busybox in the sandbox")?;
        let lower = img.root.clone().unwrap_or_else(|| img.rootfs.clone());
        // On the step's path: making and mounting the layer, and handing its removal to a
        // thread (what run_step does). Beside it: the removal itself, done in the foreground.
        let (mut layer, mut mounts, mut unmounts) = (Vec::new(), Vec::new(), Vec::new());
        let etc = rootfs::EtcFiles::new("sandbox", None, String::new());
        for i in 0..runs * 5 {
            let t = Instant::now();
            let root = rootfs::mount_step(&sb.name, &d.workspace, &lower, &format!("bench-{i:08x}"), &etc)?;
            let m = t.elapsed();
            if i % 2 == 0 {
                rootfs::unmount_step_later(root);
                layer.push(t.elapsed());
                mounts.push(m);
            } else {
                let u = Instant::now();
                rootfs::unmount_step(&root)?;
                unmounts.push(u.elapsed());
            }
            // Steps are at least ~50 ms apart (a whole `true` step, below): let the previous
            // layer's deferred unmount finish as it would between real steps, since mounts made
            // back to back wait for it (the kernel's mount lock, held across an RCU grace period).
            std::thread::sleep(Duration::from_millis(50));
        }
        rootfs::remove_step_roots(&sb.name, &d.workspace);
        std::fs::write(ws.join("step.sh"), "true\n")?;
        let mut steps = Vec::new();
        for _ in 0..runs {
            let step = StepSpec { key: "bench", image: "busybox", script: "step.sh", dir: "", env: &[] };
            let t = Instant::now();
            let end = rt.run_step(&sb, &step, &mut Null, &Cancel::new())?;
            steps.push(t.elapsed());
            if end != StepEnd::Exited(0) {
                bail!("the step ended {end:?}");
            }
        }
        let layer_p50 = percentile(&mut layer, 0.5);
        let step_p50 = percentile(&mut steps, 0.5);
        println!(
            "writable root on a step's path ({} runs): p50 {}  p90 {} (goal: under 3 ms); a read-only root costs 0",
            layer.len(),
            ms(layer_p50),
            ms(percentile(&mut layer, 0.9))
        );
        println!(
            "  of which making and mounting: p50 {}; the unmount and removal, off the step's path: p50 {}",
            ms(percentile(&mut mounts, 0.5)),
            ms(percentile(&mut unmounts, 0.5))
        );
        println!(
            "whole step `true` with runc ({runs} runs): p50 {}  p90 {}; the layer is {:.1}% of it",
            ms(step_p50),
            ms(percentile(&mut steps, 0.9)),
            100.0 * layer_p50.as_secs_f64() / step_p50.as_secs_f64()
        );
        Ok(())
    })();
    rt.teardown(&sb)?;
    res
}
