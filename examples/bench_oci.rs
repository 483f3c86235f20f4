//! Benchmark for scripts/bench-oci: the time from the executor starting a step to the step's
//! first output byte, against the bare OCI runtime running an equivalent hand-written bundle
//! (same image root, same user namespace mapping, same workspace bind mount, same command),
//! measured in the same run for runc, crun and runsc.

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use executor::base::cancel::Cancel;
use executor::image::{build, ImageStore, ID_BASE, ID_COUNT};
use executor::sandbox::oci::OciRuntime;
use executor::sandbox::{BootRequest, Limits, OutputSink, Runtime, RuntimeOptions, StepSpec, Stream};

struct First(Option<Instant>);

impl OutputSink for First {
    fn output(&mut self, _: Stream, _: &[u8]) {
        self.0.get_or_insert_with(Instant::now);
    }
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The hand-written bundle: what a person would write for `runc run` with the same isolation
/// of the essentials (namespaces with the same id mapping, read-only image root, /data).
fn bare_config(rootfs: &Path, ws: &Path) -> serde_json::Value {
    let map = serde_json::json!([{ "containerID": 0, "hostID": ID_BASE, "size": ID_COUNT }]);
    serde_json::json!({
        "ociVersion": "1.0.2",
        "process": { "terminal": false, "user": { "uid": 0, "gid": 0 }, "args": ["/bin/sh", "/data/step.sh"],
                     "env": ["PATH=/bin:/usr/bin"], "cwd": "/data", "noNewPrivileges": true },
        "root": { "path": rootfs, "readonly": true },
        "hostname": "bare",
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"] },
            { "destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"] },
            { "destination": "/data", "type": "bind", "source": ws, "options": ["rbind", "rw"] }
        ],
        "linux": {
            "namespaces": [{ "type": "user" }, { "type": "pid" }, { "type": "mount" }, { "type": "network" },
                           { "type": "ipc" }, { "type": "uts" }],
            "uidMappings": map, "gidMappings": map
        }
    })
}

/// `runtime run` of the bare bundle; returns the time to the first stdout byte and to its exit.
fn bare_run(which: &str, root: &Path, bundle: &Path, id: &str) -> Result<(Duration, Duration)> {
    let mut cmd = if which == "crun" {
        // The same hybrid-cgroup workaround the executor applies (docs/sandbox-oci.md).
        let mut c = Command::new("unshare");
        c.args(["--mount", "--propagation", "private", "--", "sh", "-c"]);
        c.arg("umount -l /sys/fs/cgroup/unified 2>/dev/null; exec \"$0\" \"$@\"").arg("crun");
        c
    } else {
        Command::new(which)
    };
    cmd.arg("--root").arg(root);
    if which == "runsc" {
        cmd.args(["--platform=ptrace", "--network=none"]);
    }
    cmd.arg("run").arg("--bundle").arg(bundle).arg(id);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("running {which}"))?;
    let mut out = child.stdout.take().context("no stdout")?;
    let mut b = [0u8; 1];
    let n = out.read(&mut b)?;
    let t = t0.elapsed();
    let mut rest = Vec::new();
    let _ = out.read_to_end(&mut rest);
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait()?;
    let total = t0.elapsed();
    if n == 0 {
        bail!("{which} run printed nothing ({status}): {}", err.trim());
    }
    Ok((t, total))
}

fn main() -> Result<()> {
    let n: usize = std::env::var("BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let tmp = tempfile::tempdir()?;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711))?;
    let state = tmp.path().join("state");
    let store = ImageStore::open(&state.join("images"))?;
    let img = build::build_busybox(&store, "busybox")?;
    // The bare bundle's root is a copy outside the executor's state directory, which is private
    // (0700, root's): the container's mapped root could not reach the store's tree in it.
    let bare_rootfs = tmp.path().join("bare-rootfs");
    let copied = Command::new("cp").arg("-a").arg(&img.rootfs).arg(&bare_rootfs).status()?;
    if !copied.success() {
        bail!("copying the image root {} for the bare bundle: {copied}", img.rootfs.display());
    }
    let ws = tmp.path().join("ws");
    std::fs::create_dir_all(&ws)?;
    std::fs::write(ws.join("step.sh"), "echo x\n")?;

    println!(
        "{:<6} {:>5} {:>22} {:>22} {:>10} {:>26}",
        "oci", "runs", "executor p50/p90 ms", "bare p50/p90 ms", "ratio p50", "whole step p50 exec/bare"
    );
    for which in ["runc", "crun", "runsc"] {
        if which::which(which).is_err() {
            println!("{which:<6} not installed");
            continue;
        }
        let runs = if which == "runsc" { n.min(15) } else { n };
        let opts =
            RuntimeOptions { state_dir: state.clone(), oci_runtime: which.into(), ..Default::default() };
        let rt = OciRuntime::new(opts)?;
        let limits = Limits { cpus: 2, memory_bytes: 1 << 30, disk_bytes: 0, pids: 1024 };
        let sb = rt.boot(&BootRequest {
            job_uid: "bench",
            workspace: &ws,
            images: vec!["busybox".into()],
            limits: &limits,
            name_prefix: "benchoci",
            coordinator: None,
            endpoints: &[],
        })?;
        let bundle = tmp.path().join(format!("bare-{which}"));
        std::fs::create_dir_all(&bundle)?;
        std::fs::write(bundle.join("config.json"), serde_json::to_vec(&bare_config(&bare_rootfs, &ws))?)?;
        let root = tmp.path().join(format!("bare-root-{which}"));

        let (mut ex, mut bare) = (Vec::new(), Vec::new());
        let (mut ex_total, mut bare_total) = (Vec::new(), Vec::new());
        // Alternate the two so that machine noise hits both alike; the first pair warms caches.
        for i in 0..runs + 1 {
            let step = StepSpec { key: "bench", image: "busybox", script: "step.sh", dir: "", env: &[] };
            let mut sink = First(None);
            let t0 = Instant::now();
            rt.run_step(&sb, &step, &mut sink, &Cancel::new())?;
            let total = t0.elapsed();
            let first = sink.0.context("the step printed nothing")?;
            let (b, b_total) = bare_run(which, &root, &bundle, &format!("bare-{which}-{i}"))?;
            if i > 0 {
                ex.push(first - t0);
                bare.push(b);
                ex_total.push(total);
                bare_total.push(b_total);
            }
        }
        rt.teardown(&sb)?;
        rt.janitor("benchoci", &HashSet::new())?;
        let (e50, e90) = (percentile(&mut ex, 0.5), percentile(&mut ex, 0.9));
        let (b50, b90) = (percentile(&mut bare, 0.5), percentile(&mut bare, 0.9));
        let (t_ex, t_bare) = (percentile(&mut ex_total, 0.5), percentile(&mut bare_total, 0.5));
        println!(
            "{which:<6} {runs:>5} {:>22} {:>22} {:>9.2}x {:>26}",
            format!("{:.1} / {:.1}", ms(e50), ms(e90)),
            format!("{:.1} / {:.1}", ms(b50), ms(b90)),
            ms(e50) / ms(b50),
            format!("{:.1} / {:.1}", ms(t_ex), ms(t_bare)),
        );
    }
    Ok(())
}
