//! Benchmark for scripts/bench-image: resolving an image already in the store, in process
//! (`ImageStore::resolve`, what vm-boot and the runtimes do per job) and as the command
//! `executor image pull REF` (process start, the pull lock and the store lookup, no request).
//!
//! Usage: bench_image STATE_DIR REFERENCE EXECUTOR_BINARY RUNS

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use executor::image::ImageStore;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, state, reference, bin, runs] = args.as_slice() else {
        bail!("usage: bench_image STATE_DIR REFERENCE EXECUTOR_BINARY RUNS");
    };
    let runs: usize = runs.parse().context("RUNS")?;
    let store = ImageStore::open(&std::path::Path::new(state).join("images"))?;
    let mut resolve = Vec::new();
    for _ in 0..runs * 10 {
        let t = Instant::now();
        store.resolve(reference)?;
        resolve.push(t.elapsed());
    }
    let mut command = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let out = Command::new(bin)
            .args(["image", "pull", reference])
            .env("EXECUTOR_STATE_DIR", state)
            .stdin(Stdio::null())
            .output()?;
        command.push(t.elapsed());
        if !out.status.success() {
            bail!("executor image pull {reference}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    println!(
        "cached resolve, in process ({} runs): p50 {}  p90 {}",
        resolve.len(),
        ms(percentile(&mut resolve, 0.5)),
        ms(percentile(&mut resolve, 0.9))
    );
    println!(
        "cached `executor image pull` (process start included, {runs} runs): p50 {}  p90 {}",
        ms(percentile(&mut command, 0.5)),
        ms(percentile(&mut command, 0.9))
    );
    Ok(())
}
