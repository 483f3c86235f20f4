//! The container root of an `oci` step behaves like `docker run --rm`: the image under a
//! writable layer of the step's own, on the job's workspace disk; the image config's `Env`,
//! `User` and `WorkingDir`; `HOME` from the image's passwd; and the state directory private to
//! root while the runtimes still reach everything they need.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

use executor::base::cancel::Cancel;
use executor::sandbox::{BootRequest, Limits, OutputSink, Runtime, SandboxRecord, StepEnd, StepSpec, Stream};

use crate::common::{self, Exec};
use crate::oci::{can_run, Fixture};

fn limits() -> Limits {
    Limits { cpus: 1, memory_bytes: 256 << 20, disk_bytes: 64 << 20, pids: 128 }
}

/// Output and the limits a step was told it hit.
#[derive(Default)]
struct Sink {
    out: Vec<u8>,
    err: Vec<u8>,
    limits: Vec<String>,
}

impl OutputSink for Sink {
    fn output(&mut self, stream: Stream, data: &[u8]) {
        match stream {
            Stream::Stdout => self.out.extend_from_slice(data),
            Stream::Stderr => self.err.extend_from_slice(data),
        }
    }
    fn limit_hit(&mut self, what: &str) {
        self.limits.push(what.to_string());
    }
}

fn boot(f: &Fixture, image: &str, lim: &Limits) -> SandboxRecord {
    let ws = f.workspace();
    let req = BootRequest {
        job_uid: "1",
        workspace: &ws,
        images: vec![image.into()],
        limits: lim,
        name_prefix: "ocirootfs",
        coordinator: None,
        endpoints: &[],
    };
    f.rt.boot(&req).unwrap()
}

fn run(f: &Fixture, sb: &SandboxRecord, image: &str, script: &str, env: &[String]) -> (StepEnd, Sink) {
    let name = format!(".step-{}.sh", uuid::Uuid::new_v4().simple());
    std::fs::write(f.workspace().join(&name), script).unwrap();
    let step = StepSpec { key: "step.0", image, script: &name, dir: "repo", env };
    let mut sink = Sink::default();
    let end = f.rt.run_step(sb, &step, &mut sink, &Cancel::new()).unwrap();
    std::fs::remove_file(f.workspace().join(&name)).ok();
    (end, sink)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Imports `app:1`: busybox, a passwd with `app` (uid 1000, home /home/app, also in group
/// `staff`), /home/app owned by it, /usr/share/doc/readme, and a config with `Env`, `User: app`
/// and `WorkingDir: /opt/app`.
fn import_app_image(f: &Fixture) {
    import_app_image_to(&f.state(), f.tmp.path());
}

/// The modification time of the app image's files: a step sees it (layers keep their times).
const IMAGE_MTIME: u64 = 1_500_000_000;

/// [`import_app_image`] into the state directory `state`, building in `tmp`.
pub fn import_app_image_to(state: &std::path::Path, tmp: &std::path::Path) {
    let bb_path = which::which("busybox").unwrap();
    let bb = std::fs::read(&bb_path).unwrap();
    let list = std::process::Command::new(&bb_path).arg("--list").output().unwrap();
    let mut layer = tar::Builder::new(Vec::new());
    let mut entry = |path: &str, data: &[u8], mode: u32, uid: u64, kind: tar::EntryType| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_entry_type(kind);
        h.set_mtime(IMAGE_MTIME);
        layer.append_data(&mut h, path, data).unwrap();
    };
    for d in
        ["bin", "etc", "home", "usr", "usr/local", "usr/share", "usr/share/doc", "opt", "opt/app", "root"]
    {
        entry(d, b"", 0o755, 0, tar::EntryType::Directory);
    }
    entry("tmp", b"", 0o1777, 0, tar::EntryType::Directory);
    entry("home/app", b"", 0o755, 1000, tar::EntryType::Directory);
    entry("bin/busybox", &bb, 0o755, 0, tar::EntryType::Regular);
    entry("usr/share/doc/readme", b"from the image\n", 0o644, 0, tar::EntryType::Regular);
    entry(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
        0o644,
        0,
        tar::EntryType::Regular,
    );
    entry("etc/group", b"root:x:0:\napp:x:1000:\nstaff:x:50:app\n", 0o644, 0, tar::EntryType::Regular);
    for applet in text(&list.stdout).lines().filter(|a| !a.is_empty() && *a != "busybox") {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        layer.append_link(&mut h, format!("bin/{applet}"), "busybox").unwrap();
    }
    let layer = layer.into_inner().unwrap();
    let config = serde_json::json!({"config": {
        "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "APP_MODE=image", "OVERRIDE=image"],
        "User": "app",
        "WorkingDir": "/opt/app",
    }});
    let mut t = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", br#"[{"Config":"c.json","Layers":["l/layer.tar"]}]"#.to_vec()),
        ("c.json", serde_json::to_vec(&config).unwrap()),
        ("l/layer.tar", layer),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        t.append_data(&mut h, name, &data[..]).unwrap();
    }
    let file = tmp.join("app-image.tar");
    std::fs::write(&file, t.into_inner().unwrap()).unwrap();
    Exec::new().args(["image", "import", "app:1"]).arg(&file).env("EXECUTOR_STATE_DIR", state).run();
}

/// apt-get-style writes into /usr, /var and $HOME, a removed image file, read back in the same
/// step; the next step (its own `docker run --rm`) and a second job see the image as it was.
fn writes_stay_in_the_step(oci: &str, test: &str) {
    if !can_run(test, oci) {
        return;
    }
    let f = Fixture::new(oci);
    let sb = boot(&f, "busybox", &limits());
    let install = "set -e; mkdir -p /usr/lib/pkg /var/lib/dpkg/info; echo installed > /usr/lib/pkg/file; \
                   echo pkg > /var/lib/dpkg/info/pkg.list; printf '#!/bin/sh\\necho tool ran\\n' > /usr/bin/tool; \
                   chmod 755 /usr/bin/tool; echo rc > \"$HOME/.rc\"; rm /bin/vi; echo \"home=$HOME\"; \
                   cat /usr/lib/pkg/file /var/lib/dpkg/info/pkg.list \"$HOME/.rc\"; tool; \
                   test -e /bin/vi || echo vi-removed; ls -A /data";
    let (end, out) = run(&f, &sb, "busybox", install, &[]);
    assert_eq!(end, StepEnd::Exited(0), "{} {}", text(&out.out), text(&out.err));
    let stdout = text(&out.out);
    assert!(
        stdout.starts_with("home=/root\ninstalled\npkg\nrc\ntool ran\nvi-removed\n"),
        "{stdout}{}",
        text(&out.err)
    );
    // The step's layer is at the top of the workspace, hidden and empty in the container.
    assert!(stdout.lines().any(|l| l.starts_with(".executor-root-")), "{stdout}");
    // Its removal runs beside the next step (an unmount waits for an RCU grace period).
    let left = || -> Vec<String> {
        std::fs::read_dir(f.workspace())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".executor-root-"))
            .collect()
    };
    common::wait_until("the step's layer to go", Duration::from_secs(10), || left().is_empty());
    let check = "for p in /usr/lib/pkg/file /var/lib/dpkg/info/pkg.list \"$HOME/.rc\" /usr/bin/tool; do \
                 test -e $p && echo \"still there: $p\"; done; test -e /bin/vi && echo vi-back; true";
    let (end, out) = run(&f, &sb, "busybox", check, &[]);
    assert_eq!(end, StepEnd::Exited(0), "{}", text(&out.err));
    assert_eq!(text(&out.out), "vi-back\n", "the next step starts from the image");
    f.rt.teardown(&sb).unwrap();
    let second = boot(&f, "busybox", &limits());
    let (end, out) = run(&f, &second, "busybox", check, &[]);
    assert_eq!(end, StepEnd::Exited(0), "{}", text(&out.err));
    assert_eq!(text(&out.out), "vi-back\n", "a second job sees the image as it was");
    f.rt.teardown(&second).unwrap();
    assert!(!executor::sandbox::oci::rootfs::reach_dir(&sb.name).exists());
    let store = f.state().join("images/rootfs");
    let tree = std::fs::read_dir(&store).unwrap().map(|e| e.unwrap().path()).find(|p| p.is_dir()).unwrap();
    assert!(!tree.join("usr/lib/pkg").exists() && tree.join("bin/vi").exists(), "the store is unchanged");
}

#[test]
fn oci_runc_root_is_writable_per_step_like_docker_run() {
    writes_stay_in_the_step("runc", "oci_runc_root_is_writable_per_step_like_docker_run");
}

#[test]
fn oci_crun_root_is_writable_per_step_like_docker_run() {
    writes_stay_in_the_step("crun", "oci_crun_root_is_writable_per_step_like_docker_run");
}

#[test]
fn oci_runsc_root_is_writable_per_step_like_docker_run() {
    writes_stay_in_the_step("runsc", "oci_runsc_root_is_writable_per_step_like_docker_run");
}

fn image_config_honoured(oci: &str, test: &str) {
    if !can_run(test, oci) {
        return;
    }
    let f = Fixture::new(oci);
    import_app_image(&f);
    std::fs::write(f.workspace().join("repo/input.txt"), "from the host\n").unwrap();
    let sb = boot(&f, "app:1", &limits());
    let env = vec!["OVERRIDE=step".to_string(), "STEP_ONLY=1".to_string()];
    let script = "echo \"uid=$(id -u) gid=$(id -g) groups=$(id -G)\"; echo \"home=$HOME\"; pwd; \
                  echo \"path=$PATH mode=$APP_MODE override=$OVERRIDE step=$STEP_ONLY\"; cat input.txt; \
                  echo mine > \"$HOME/.rc\" && cat \"$HOME/.rc\"; echo t > /tmp/t && echo tmp-ok; \
                  touch /usr/local/x 2>/dev/null || echo usr-denied; cat /usr/share/doc/readme; \
                  stat -c %Y /usr/share/doc/readme";
    let (end, out) = run(&f, &sb, "app:1", script, &env);
    assert_eq!(end, StepEnd::Exited(0), "{} {}", text(&out.out), text(&out.err));
    assert_eq!(
        text(&out.out),
        "uid=1000 gid=1000 groups=1000 50\nhome=/home/app\n/data/repo\n\
         path=/usr/local/bin:/usr/bin:/bin mode=image override=step step=1\nfrom the host\nmine\ntmp-ok\n\
         usr-denied\nfrom the image\n1500000000\n",
        "{}",
        text(&out.err)
    );
    f.rt.teardown(&sb).unwrap();
    assert_eq!(std::fs::metadata(f.workspace()).unwrap().mode() & 0o7777, 0o755, "mode restored");
}

#[test]
fn oci_runc_image_env_user_and_workdir_are_honoured() {
    image_config_honoured("runc", "oci_runc_image_env_user_and_workdir_are_honoured");
}

#[test]
fn oci_crun_image_env_user_and_workdir_are_honoured() {
    image_config_honoured("crun", "oci_crun_image_env_user_and_workdir_are_honoured");
}

#[test]
fn oci_runsc_image_env_user_and_workdir_are_honoured() {
    image_config_honoured("runsc", "oci_runsc_image_env_user_and_workdir_are_honoured");
}

/// Writes into the root count against the workspace disk: past the cap the step fails and is
/// told which limit it hit; the layer is gone afterwards, and the space with it.
#[test]
fn oci_root_writes_past_the_disk_cap_fail_naming_it() {
    let test = "oci_root_writes_past_the_disk_cap_fail_naming_it";
    if !can_run(test, "runc") {
        return;
    }
    if which::which("mkfs.ext4").is_err() {
        common::skip(test, "ext4", "mkfs.ext4 (e2fsprogs) is needed for the workspace disk");
        return;
    }
    let f = Fixture::new("runc");
    f.mount_workspace_disk(32 << 20);
    let lim = Limits { disk_bytes: 32 << 20, ..limits() };
    let sb = boot(&f, "busybox", &lim);
    let (end, out) = run(
        &f,
        &sb,
        "busybox",
        "dd if=/dev/zero of=/usr/a bs=1M count=20 2>/dev/null; dd if=/dev/zero of=/usr/b bs=1M count=20",
        &[],
    );
    assert_ne!(end, StepEnd::Exited(0), "{}", text(&out.err));
    assert!(text(&out.err).contains("No space left on device"), "{}", text(&out.err));
    assert!(
        out.limits
            .iter()
            .any(|l| l.contains("workspace disk limit of 32 MiB") && l.contains("writable root")),
        "{:?}",
        out.limits
    );
    let (end, out) =
        run(&f, &sb, "busybox", "dd if=/dev/zero of=/data/c bs=1M count=20 2>&1 && echo room", &[]);
    assert_eq!(end, StepEnd::Exited(0), "the layer's space came back: {}", text(&out.out));
    f.rt.teardown(&sb).unwrap();
}

/// Finding 2 of the security review, the state directory: made 0700 (an existing 0755 one is
/// tightened) and, while a step runs, nothing under it nor the sandbox's reach directory can be
/// listed or read by `nobody`; the job itself still reads its workspace and writes its root.
fn state_dir_private(oci: &str, test: &str) {
    if !can_run(test, oci) {
        return;
    }
    let f = Fixture::new(oci);
    // Only the state directory itself stands between other users and the jobs.
    std::fs::set_permissions(f.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(f.state(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // As `prepare-workspace` makes it (here outside the state directory, so it must hold alone).
    std::fs::set_permissions(f.workspace(), std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(f.workspace().join("repo/secret.txt"), "job-secret\n").unwrap();
    let sb = boot(&f, "busybox", &limits());
    assert_eq!(std::fs::metadata(f.state()).unwrap().mode() & 0o7777, 0o700, "state dir tightened");
    let ws = f.workspace();
    let reach = executor::sandbox::oci::rootfs::reach_dir(&sb.name);
    let flag = ws.join("repo/started");
    std::thread::scope(|s| {
        let step = s.spawn(|| {
            run(
                &f,
                &sb,
                "busybox",
                "echo x > /etc/mine; touch started; sleep 3; cat secret.txt /etc/mine",
                &[],
            )
        });
        common::wait_until("the step to start", Duration::from_secs(20), || flag.exists());
        let as_nobody = |script: &str| {
            let o = Exec::program("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", script])
                .any_status()
                .run();
            (o.status.success(), text(&o.stdout))
        };
        let mut attempts: Vec<String> = vec![
            format!("ls '{}'", f.state().display()),
            format!("ls '{}/images'", f.state().display()),
            format!("ls '{}/sandboxes'", f.state().display()),
            format!("cat '{}/repo/secret.txt'", ws.display()),
            format!("ls '{}'", reach.display()),
            format!("cat '{}/data/repo/secret.txt'", reach.display()),
        ];
        let roots: Vec<_> = executor::sandbox::oci::rootfs::reach_sandboxes(|n| n == sb.name);
        assert_eq!(roots, vec![sb.name.clone()]);
        attempts.push(format!("ls '{}'/root-*/etc", reach.display()));
        for a in &attempts {
            let (ok, out) = as_nobody(a);
            assert!(!ok, "nobody could `{a}` during a job: {out}");
        }
        let (end, out) = step.join().unwrap();
        assert_eq!(end, StepEnd::Exited(0), "{}", text(&out.err));
        assert_eq!(text(&out.out), "job-secret\nx\n");
    });
    f.rt.teardown(&sb).unwrap();
    assert!(!reach.exists(), "reach directory left");
}

#[test]
fn oci_runc_state_dir_is_private_during_a_job() {
    state_dir_private("runc", "oci_runc_state_dir_is_private_during_a_job");
}

#[test]
fn oci_crun_state_dir_is_private_during_a_job() {
    state_dir_private("crun", "oci_crun_state_dir_is_private_during_a_job");
}

#[test]
fn oci_runsc_state_dir_is_private_during_a_job() {
    state_dir_private("runsc", "oci_runsc_state_dir_is_private_during_a_job");
}
