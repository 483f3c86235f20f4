//! cliSteps (Sourcegraph's legacy batch path, `src batch exec`, what a default instance sends):
//! on the microvm runtime a real container engine in the guest runs the batch spec's container
//! from an image the host pulled from a loopback registry (the guest has no network); `install
//! src-cli` fetches `src` from the stand-in instance and refuses one that fails its checksum.
//! The real src-cli cannot be had here: the stand-in `src` below follows `src batch exec`'s
//! contract as its public source has it (read the input, run each step's container through
//! `docker`, print JSON events one per line). The oci runtime's refusal, with its advice, is in
//! conformance.rs (the same legacy payload).

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};
use sha2::Digest as _;

use crate::common::{self, Exec};
use crate::conformance::StandIn;

/// The stand-in `src`: `version -client-only`, and `batch exec -f INPUT -repo DIR -tmp DIR`
/// that runs each step's `run` in its `container` through `docker run` with the repository at
/// /work, printing src's JSON log events, one per line, with each line of the container's
/// output in a `TASK_STEP` event.
pub(crate) const STAND_IN_SRC: &str = include_str!("fixtures/stand-in-src.sh");

/// The legacy batches payload (tests/it/fixtures/batches-legacy.json, as a default instance
/// sends it) as the stand-in instance holds a job; with `spec`, its `input.json` is that batch
/// spec input and the repository and workspace files (which the stand-in does not serve) go.
pub(crate) fn legacy_spec(spec: Option<&Value>) -> Value {
    let mut v: Value = serde_json::from_str(include_str!("fixtures/batches-legacy.json")).unwrap();
    let o = v.as_object_mut().unwrap();
    for k in ["version", "id", "token"] {
        o.remove(k);
    }
    if let Some(spec) = spec {
        let input = base64::engine::general_purpose::STANDARD.encode(spec.to_string());
        o.insert("files".into(), json!({"input.json": {"content": input}}));
        for k in ["repositoryName", "commit", "sparseCheckout"] {
            o.remove(k);
        }
        o.insert("repositoryName".into(), json!(""));
        o.insert("commit".into(), json!(""));
    }
    v
}

/// A `docker-registry` on 127.0.0.1, its storage in `dir`; killed on drop.
struct Registry {
    port: u16,
    child: std::process::Child,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Registry {
    fn start(dir: &Path) -> Registry {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg = dir.join("registry.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.join("registry").display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        common::wait_until("the registry listens", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Registry { port, child }
    }
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex(&sha2::Sha256::digest(b)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An OCI layout in `dir` of one image: the host's static busybox and `/marker.txt`.
fn busybox_layout(dir: &Path, marker: &str) {
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8], mode: u32, link: Option<&str>| {
        let mut h = tar::Header::new_gnu();
        h.set_mode(mode);
        match link {
            Some(target) => {
                h.set_size(0);
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, path, target).unwrap();
            }
            None => {
                h.set_size(data.len() as u64);
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(&mut h, path, data).unwrap();
            }
        }
    };
    add("bin/busybox", &std::fs::read("/bin/busybox").unwrap(), 0o755, None);
    for tool in ["sh", "cat", "echo", "ls", "uname"] {
        add(&format!("bin/{tool}"), b"", 0o777, Some("busybox"));
    }
    add("marker.txt", format!("{marker}\n").as_bytes(), 0o644, None);
    let layer = b.into_inner().unwrap();
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    let blob = |bytes: &[u8]| {
        let d = sha(bytes);
        std::fs::write(dir.join("blobs/sha256").join(d.trim_start_matches("sha256:")), bytes).unwrap();
        d
    };
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin","FROM_IMAGE=yes"]}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
        sha(&layer)
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#,
        blob(config.as_bytes()),
        config.len(),
        blob(&layer),
        layer.len()
    );
    let md = blob(manifest.as_bytes());
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    std::fs::write(
        dir.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{},"annotations":{{"org.opencontainers.image.ref.name":"1"}}}}]}}"#,
            manifest.len()
        ),
    )
    .unwrap();
}

fn install_src_cli(state: &Path, url: &str) -> std::process::Output {
    common::run(
        common::executor()
            .args(["install", "src-cli"])
            .env("EXECUTOR_STATE_DIR", state)
            .env("EXECUTOR_FRONTEND_URL", url),
    )
}

#[test]
fn install_src_cli_checks_the_instance_s_checksum() {
    let tmp = tempfile::tempdir().unwrap();
    let sg = StandIn::start();
    let script = STAND_IN_SRC.to_string();
    let good = hex(&sha2::Sha256::digest(script.as_bytes()));
    sg.state.lock().unwrap().src_cli =
        Some((script.clone(), Some(format!("{}  src_linux_amd64\n", "0".repeat(64)))));
    let state = tmp.path().join("state");
    let bad = install_src_cli(&state, &sg.url);
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{err}");
    assert!(err.contains("does not match its checksum") && err.contains(&good), "{err}");
    assert!(!state.join("vm/src-cli/manifest.json").exists(), "nothing is installed");

    if which::which("mkfs.ext4").is_err() {
        return common::skip(
            "install_src_cli_checks_the_instance_s_checksum",
            "microvm",
            "mkfs.ext4 is missing",
        );
    }
    sg.state.lock().unwrap().src_cli = Some((script.clone(), Some(format!("{good}\n"))));
    let ok = install_src_cli(&state, &sg.url);
    let said = String::from_utf8_lossy(&ok.stderr);
    assert!(ok.status.success(), "{said}");
    assert!(said.contains("matches the checksum") && said.contains("version 0.0.0-stand-in"), "{said}");
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(state.join("vm/src-cli/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["sha256"], good);
    assert_eq!(std::fs::read_to_string(m["binary"].as_str().unwrap()).unwrap(), script);

    // An instance that offers no checksum: installed, saying so; --from takes a file.
    sg.state.lock().unwrap().src_cli = Some((script.clone(), None));
    Exec::new()
        .args(["install", "src-cli"])
        .env("EXECUTOR_STATE_DIR", &state)
        .env("EXECUTOR_FRONTEND_URL", &sg.url)
        .stderr_has("no checksum offered")
        .run();
    let file = tmp.path().join("src");
    std::fs::write(&file, "#!/bin/sh\necho Current version: 9.9.9\n").unwrap();
    Exec::new()
        .args(["install", "src-cli", "--from"])
        .arg(&file)
        .env("EXECUTOR_STATE_DIR", &state)
        .env_remove("EXECUTOR_FRONTEND_URL")
        .stderr_has("version 9.9.9")
        .run();
}

#[test]
fn cli_steps_run_src_with_a_real_container_engine_in_the_microvm() {
    let test = "clisteps::cli_steps_run_src_with_a_real_container_engine_in_the_microvm";
    if let Some(why) = crate::microvm::missing() {
        return common::skip(test, "microvm", &why);
    }
    for tool in ["debootstrap", "docker-registry", "skopeo"] {
        if which::which(tool).is_err() {
            return common::skip(test, "microvm", &format!("{tool} is not installed"));
        }
    }
    if !common::is_root() {
        return common::skip(test, "microvm", "the engine's install (debootstrap) needs root");
    }
    let state = crate::microvm::state_dir();
    // The engine, once per state directory (debootstrap from Debian's packages).
    Exec::new().args(["install", "vm", "--engine"]).env("EXECUTOR_STATE_DIR", &state).run();

    let tmp = tempfile::tempdir().unwrap();
    let marker = format!("inside-the-container-{}", uuid::Uuid::new_v4().simple());
    let layout = tmp.path().join("layout");
    busybox_layout(&layout, &marker);
    let reg = Registry::start(tmp.path());
    let image = format!("127.0.0.1:{}/clisteps/busybox:1", reg.port);
    Exec::program("skopeo")
        .args(["--insecure-policy", "copy", "--quiet", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:1", layout.display()))
        .arg(format!("docker://{image}"))
        .run();

    let sg = StandIn::start();
    let script = STAND_IN_SRC.to_string();
    let sum = hex(&sha2::Sha256::digest(script.as_bytes()));
    sg.state.lock().unwrap().src_cli = Some((script, Some(sum)));
    let installed = install_src_cli(&state, &sg.url);
    assert!(installed.status.success(), "{}", String::from_utf8_lossy(&installed.stderr));

    let spec = json!({
        "steps": [{"run": "echo first-line; cat /marker.txt; uname -r; echo $FROM_IMAGE", "container": image}],
        "cachedStepResultFound": false,
    });
    let id = sg.submit(legacy_spec(Some(&spec)));
    let log = tmp.path().join("executor.log");
    let started = Instant::now();
    let mut child = common::executor()
        .arg("run")
        .env("EXECUTOR_FRONTEND_URL", &sg.url)
        .env("EXECUTOR_FRONTEND_PASSWORD", &sg.secret)
        .env("EXECUTOR_QUEUE_NAME", "batches")
        .env("EXECUTOR_RUNTIME", "microvm")
        .env("EXECUTOR_VM_ACCEL", "tcg")
        .env("EXECUTOR_VM_ALLOW_TCG", "1")
        .env("EXECUTOR_VM_POOL_SIZE", "0")
        .env("EXECUTOR_NETWORK", "none")
        .env("EXECUTOR_IMAGE_PULL", "missing")
        // The test's registry is on loopback: pulls go there only when the operator lists it.
        .env("EXECUTOR_PRIVATE_REGISTRIES", format!("127.0.0.1:{}", reg.port))
        .env("EXECUTOR_STATE_DIR", &state)
        .env("EXECUTOR_VM_PREFIX", format!("cli{}", &uuid::Uuid::new_v4().simple().to_string()[..8]))
        .env("EXECUTOR_JOB_MEMORY", "1G")
        .env("EXECUTOR_JOB_NUM_CPUS", "1")
        .env("EXECUTOR_NUM_TOTAL_JOBS", "1")
        .env("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", "600s")
        .env("EXECUTOR_HEARTBEAT_INTERVAL", "1s")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let exited = common::poll_until(Duration::from_secs(900), || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
    let (state_of, failure, logs) = sg.with_job(id, |j| (j.state, j.failure.clone(), j.logs.clone()));
    eprintln!("clisteps: job {state_of} in {:.1}s", started.elapsed().as_secs_f64());
    assert!(exited, "the executor did not exit:\n{stderr}");
    assert_eq!(state_of, "completed", "{failure:?}\n{logs:#?}\n{stderr}");
    assert!(stderr.contains("dequeued (1 steps)"), "the dequeue line counts the cliSteps:\n{stderr}");
    // Heartbeats report the src-cli the jobs run (the installed one; none is on PATH here).
    let hb = sg.state.lock().unwrap().heartbeats.last().cloned().expect("no heartbeat");
    assert_eq!(hb["srcCliVersion"], "0.0.0-stand-in", "{hb}");
    let keys: Vec<&str> = logs.iter().map(|e| e["key"].as_str().unwrap_or("")).collect();
    let entry = logs.iter().find(|e| e["key"] == "step.src.batch-exec").unwrap_or_else(|| panic!("{keys:?}"));
    let out = entry["out"].as_str().unwrap_or("");
    assert_eq!(entry["exitCode"], 0, "{out}");
    // Every stdout line is one whole JSON event, as the instance parses them; the container's
    // own output arrives inside them, from the image the host pulled.
    let events: Vec<Value> = out
        .lines()
        .filter_map(|l| l.strip_prefix("stdout: "))
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}\n{out}")))
        .collect();
    let said: Vec<&str> = events.iter().filter_map(|e| e["metadata"]["out"].as_str()).collect();
    assert!(said.contains(&format!("stdout: {marker}").as_str()), "{said:?}\n{out}");
    assert!(said.contains(&"stdout: yes"), "the image's config reached the engine: {said:?}");
    assert_eq!(events.last().unwrap()["status"], "SUCCESS", "{out}");
    let pull = logs.iter().find(|e| e["key"] == "setup.image.pull").expect("the host pulled the image");
    assert!(pull["out"].as_str().unwrap_or("").contains(&image), "{pull:#}");
    assert!(keys.contains(&"setup.cli-steps"), "{keys:?}");
}
