//! `executor image pull` against Debian's `docker-registry` on loopback (plain HTTP, TLS with a
//! test CA, htpasswd basic auth), with images pushed by `skopeo` from OCI layouts and docker-save
//! tarballs built here: several layers with whiteouts, a zstd layer, a multi-arch index; then a
//! job step in the pulled image, and hostile registries (a tampered blob, a wrong password, a
//! registry stopped mid-pull, 10,000 layers, a gzip bomb).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::Digest;

use crate::common::{self, Exec};

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// Whether the registry tools are installed; prints the skip notice when not.
fn can_run(test: &str) -> bool {
    for tool in ["docker-registry", "skopeo"] {
        if which::which(tool).is_err() {
            common::skip(test, "registry", &format!("{tool} is not installed (scripts/install-deps)"));
            return false;
        }
    }
    true
}

/// A `docker-registry` on 127.0.0.1 with its storage in a temporary directory.
pub(super) struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Arc<Mutex<Child>>,
    tls: bool,
    creds: Option<(String, String)>,
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Ok(mut c) = self.child.lock() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Registry {
    /// Starts it; `tls` is (cert, key) PEM paths, `htpasswd` a bcrypt htpasswd file.
    pub(super) fn start(tls: Option<(&str, &str)>, htpasswd: Option<(&Path, &str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((cert, key)) = tls {
            cfg += &format!("  tls:\n    certificate: {cert}\n    key: {key}\n");
        }
        if let Some((file, _, _)) = htpasswd {
            cfg += &format!("auth:\n  htpasswd:\n    realm: test-registry\n    path: {}\n", file.display());
        }
        let cfg_path = dir.path().join("config.yml");
        std::fs::write(&cfg_path, cfg).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        common::wait_until("the registry listens", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Registry {
            dir,
            port,
            child: Arc::new(Mutex::new(child)),
            tls: tls.is_some(),
            creds: htpasswd.map(|(_, u, p)| (u.to_string(), p.to_string())),
        }
    }

    pub(super) fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `skopeo copy SRC docker://HOST/DEST` (with `--all` for indexes).
    pub(super) fn push(&self, src: &str, dest: &str) {
        let mut args = vec![
            "--insecure-policy".to_string(),
            "copy".into(),
            "--quiet".into(),
            "--all".into(),
            "--dest-tls-verify=false".into(),
        ];
        if let Some((u, p)) = &self.creds {
            args.push(format!("--dest-creds={u}:{p}"));
        }
        args.push(src.into());
        args.push(format!("docker://{}/{dest}", self.host()));
        Exec::program("skopeo").args(&args).run();
    }

    /// The file the registry serves blob `digest` from.
    pub(super) fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir.path().join(format!("data/docker/registry/v2/blobs/sha256/{}/{hex}/data", &hex[..2]))
    }

    fn base(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.host())
    }

    /// Uploads a blob with the registry API (monolithic upload).
    pub(super) fn put_blob(&self, repo: &str, bytes: &[u8]) -> String {
        let digest = sha(bytes);
        let resp = ureq::post(&format!("{}/v2/{repo}/blobs/uploads/", self.base())).call().unwrap();
        let loc = resp.header("location").unwrap().to_string();
        let loc = if loc.starts_with('/') { format!("{}{loc}", self.base()) } else { loc };
        let sep = if loc.contains('?') { '&' } else { '?' };
        ureq::put(&format!("{loc}{sep}digest={digest}"))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(bytes)
            .unwrap();
        digest
    }

    /// The manifest the registry serves for `repo:tag`, and its digest.
    pub(super) fn manifest(&self, repo: &str, tag: &str) -> (serde_json::Value, String) {
        let accept = format!("{OCI_INDEX}, {OCI_MANIFEST}");
        let resp = ureq::get(&format!("{}/v2/{repo}/manifests/{tag}", self.base()))
            .set("Accept", &accept)
            .call()
            .unwrap();
        let mut body = Vec::new();
        resp.into_reader().read_to_end(&mut body).unwrap();
        (serde_json::from_slice(&body).unwrap(), sha(&body))
    }

    /// Puts a manifest under `tag`.
    pub(super) fn put_manifest(&self, repo: &str, tag: &str, media_type: &str, body: &[u8]) {
        ureq::put(&format!("{}/v2/{repo}/manifests/{tag}", self.base()))
            .set("Content-Type", media_type)
            .send_bytes(body)
            .unwrap();
    }
}

/// A tar layer built in memory.
pub(super) struct Layer {
    pub tar: Vec<u8>,
}

impl Layer {
    pub(super) fn new(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Layer {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        Layer { tar: b.into_inner().unwrap() }
    }
    pub(super) fn gzip(&self) -> Vec<u8> {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(&self.tar).unwrap();
        e.finish().unwrap()
    }
    pub(super) fn zstd(&self) -> Vec<u8> {
        zstd::encode_all(&self.tar[..], 3).unwrap()
    }
}

pub(super) fn file(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, data).unwrap();
}

pub(super) fn symlink(b: &mut tar::Builder<Vec<u8>>, path: &str, target: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(0o777);
    h.set_entry_type(tar::EntryType::Symlink);
    b.append_link(&mut h, path, target).unwrap();
}

/// The host's static busybox as a layer, with `sh`, `cat` and `ls` links.
pub(super) fn busybox_layer() -> Layer {
    let bb = std::fs::read("/bin/busybox").expect("busybox-static is installed (scripts/install-deps)");
    Layer::new(|b| {
        file(b, "bin/busybox", &bb, 0o755);
        for tool in ["sh", "cat", "ls", "id", "echo"] {
            symlink(b, &format!("bin/{tool}"), "busybox");
        }
        file(b, "etc/old", b"old", 0o644);
        file(b, "etc/keep", b"keep", 0o644);
        file(b, "opt/x/1", b"1", 0o644);
    })
}

/// An OCI image layout being built in a directory.
pub(super) struct Layout {
    pub dir: PathBuf,
    index: Vec<String>,
}

pub(super) const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub(super) const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

impl Layout {
    pub(super) fn new(dir: &Path) -> Layout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir: dir.to_path_buf(), index: Vec::new() }
    }

    pub(super) fn blob(&self, bytes: &[u8]) -> String {
        let d = sha(bytes);
        std::fs::write(self.dir.join("blobs/sha256").join(d.trim_start_matches("sha256:")), bytes).unwrap();
        d
    }

    /// Adds an image manifest of `layers` (tar, blob bytes, media type); returns (digest, size).
    pub(super) fn image(&self, arch: &str, layers: &[(&[u8], Vec<u8>, &str)]) -> (String, usize) {
        let diff_ids: Vec<String> = layers.iter().map(|(tar, _, _)| format!("\"{}\"", sha(tar))).collect();
        let config = format!(
            r#"{{"architecture":"{arch}","os":"linux","config":{{"Env":["PATH=/bin","FROM_IMAGE=yes"],"WorkingDir":"/work"}},"rootfs":{{"type":"layers","diff_ids":[{}]}}}}"#,
            diff_ids.join(",")
        );
        let cd = self.blob(config.as_bytes());
        let descs: Vec<String> = layers
            .iter()
            .map(|(_, blob, mt)| {
                format!(r#"{{"mediaType":"{mt}","digest":"{}","size":{}}}"#, self.blob(blob), blob.len())
            })
            .collect();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{}}},"layers":[{}]}}"#,
            config.len(),
            descs.join(",")
        );
        (self.blob(manifest.as_bytes()), manifest.len())
    }

    /// Names `digest` (of `media_type`, `size` bytes) as `tag` in index.json.
    pub(super) fn tag(&mut self, tag: &str, media_type: &str, digest: &str, size: usize) {
        self.index.push(format!(
            r#"{{"mediaType":"{media_type}","digest":"{digest}","size":{size},"annotations":{{"org.opencontainers.image.ref.name":"{tag}"}}}}"#
        ));
        let index = format!(r#"{{"schemaVersion":2,"manifests":[{}]}}"#, self.index.join(","));
        std::fs::write(self.dir.join("index.json"), index).unwrap();
    }

    /// A multi-arch index of `(digest, size, arch)`; returns (digest, size).
    pub(super) fn multi(&self, manifests: &[(String, usize, &str)]) -> (String, usize) {
        let m: Vec<String> = manifests
            .iter()
            .map(|(d, s, arch)| {
                format!(
                    r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{d}","size":{s},"platform":{{"architecture":"{arch}","os":"linux"}}}}"#
                )
            })
            .collect();
        let index =
            format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#, m.join(","));
        (self.blob(index.as_bytes()), index.len())
    }

    pub(super) fn src(&self, tag: &str) -> String {
        format!("oci:{}:{tag}", self.dir.display())
    }
}

const GZ: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZST: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// The demo image: busybox + whiteouts (gzip) + a zstd layer. Returns its manifest digest.
fn demo_image(layout: &mut Layout, tag: &str) -> (String, usize) {
    let l1 = busybox_layer();
    let l2 = Layer::new(|b| {
        file(b, "etc/.wh.old", b"", 0o644);
        file(b, "opt/x/.wh..wh..opq", b"", 0o644);
        file(b, "opt/x/2", b"2", 0o644);
        file(b, "etc/new", b"new", 0o600);
    });
    let l3 = Layer::new(|b| file(b, "etc/zstd-file", b"from a zstd layer", 0o644));
    let m = layout
        .image("amd64", &[(&l1.tar, l1.gzip(), GZ), (&l2.tar, l2.gzip(), GZ), (&l3.tar, l3.zstd(), ZST)]);
    layout.tag(tag, OCI_MANIFEST, &m.0, m.1);
    m
}

/// `executor image ARGS` on `state`, with `env`.
/// The test registries are on loopback, which a pull reaches only where the operator listed it.
fn image(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Exec {
    let mut e = Exec::new()
        .arg("image")
        .args(args)
        .env("EXECUTOR_STATE_DIR", state)
        .env("EXECUTOR_PRIVATE_REGISTRIES", "127.0.0.1");
    for (k, v) in env {
        e = e.env(k, v);
    }
    e
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn pulls_layers_whiteouts_zstd_and_multi_arch_from_a_plain_registry() {
    let test = "image::pull::pulls_layers_whiteouts_zstd_and_multi_arch_from_a_plain_registry";
    if !can_run(test) {
        return;
    }
    let reg = Registry::start(None, None);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let (demo_digest, _) = demo_image(&mut layout, "demo");
    let arm_layer = Layer::new(|b| file(b, "arch", b"arm64", 0o644));
    let amd_layer = Layer::new(|b| file(b, "arch", b"amd64", 0o644));
    let bb = busybox_layer();
    let arm =
        layout.image("arm64", &[(&bb.tar, bb.gzip(), GZ), (&arm_layer.tar, arm_layer.tar.clone(), TAR)]);
    let amd =
        layout.image("amd64", &[(&bb.tar, bb.gzip(), GZ), (&amd_layer.tar, amd_layer.tar.clone(), TAR)]);
    let (pushed_index, index_size) = layout.multi(&[(arm.0, arm.1, "arm64"), (amd.0, amd.1, "amd64")]);
    layout.tag("multi", OCI_INDEX, &pushed_index, index_size);
    reg.push(&layout.src("demo"), "team/demo:1");
    reg.push(&layout.src("multi"), "multi:1");
    // skopeo may rewrite an index as it pushes it.
    let (index, index_digest) = reg.manifest("multi", "1");
    let amd_digest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "amd64")
        .map(|m| m["digest"].as_str().unwrap().to_string())
        .unwrap();

    let host = reg.host();
    let demo_ref = format!("{host}/team/demo:1");
    let out =
        image(&state, &["pull", &demo_ref], &[]).stdout_has(format!("{demo_ref} {demo_digest}\n")).run();
    assert!(stderr(&out).contains("layer") && stderr(&out).contains("downloaded"), "{}", stderr(&out));
    let store = executor::image::ImageStore::open(&state.join("images")).unwrap();
    let img = store.resolve(&demo_ref).unwrap();
    let r = &img.rootfs;
    assert!(!r.join("etc/old").exists(), "whiteout not applied");
    assert!(!r.join("opt/x/1").exists() && r.join("opt/x/2").exists(), "opaque whiteout not applied");
    assert_eq!(std::fs::read_to_string(r.join("etc/zstd-file")).unwrap(), "from a zstd layer");
    assert_eq!(img.env, vec!["PATH=/bin", "FROM_IMAGE=yes"]);
    assert_eq!(img.workdir, "/work");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(r.join("etc/new")).unwrap().uid(), executor::image::ID_BASE);
    assert_eq!(store.resolve(&format!("{host}/team/demo@{demo_digest}")).unwrap().rootfs, img.rootfs);

    // The index: this host's platform; the busybox layer is shared with the demo image.
    let multi_ref = format!("{host}/multi:1");
    let out =
        image(&state, &["pull", &multi_ref], &[]).stdout_has(format!("{multi_ref} {index_digest}\n")).run();
    let err = stderr(&out);
    assert_eq!(err.matches("already in the store").count(), 1, "the busybox layer is shared: {err}");
    let multi = store.resolve(&multi_ref).unwrap();
    assert_eq!(std::fs::read_to_string(multi.rootfs.join("arch")).unwrap(), "amd64");
    assert_eq!(multi.digest, amd_digest, "the tree is the linux/amd64 manifest's");

    // Pinned: by the index digest, already in the store, nothing downloaded.
    let pinned = format!("{host}/multi@{index_digest}");
    let out = image(&state, &["pull", &pinned], &[]).stdout_has(format!("{pinned} {index_digest}")).run();
    assert!(stderr(&out).contains(": 0 bytes downloaded"), "{}", stderr(&out));
    // A wrong pin is refused.
    let bad = format!("{host}/multi@sha256:{}", "0".repeat(64));
    let out = image(&state, &["pull", &bad], &[]).fails().run();
    assert!(stderr(&out).contains("404") || stderr(&out).contains("has no"), "{}", stderr(&out));

    // Concurrent pulls of one new image download it once.
    reg.push(&layout.src("demo"), "team/demo:2");
    let demo2 = format!("{host}/team/demo:2");
    let children: Vec<_> = (0..3)
        .map(|_| {
            let mut c = common::executor();
            c.args(["image", "pull", &demo2])
                .env("EXECUTOR_STATE_DIR", &state)
                .env("EXECUTOR_PRIVATE_REGISTRIES", "127.0.0.1");
            c.stdout(Stdio::piped()).stderr(Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    let outs: Vec<_> = children.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    for o in &outs {
        common::assert_ok(o);
    }
    let fresh = outs.iter().filter(|o| !stderr(o).contains(": 0 bytes downloaded")).count();
    assert!(fresh <= 1, "the image was downloaded {fresh} times");
    let list = image(&state, &["ls", "--json"], &[]).run();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3, "{list}");

    // Removing the names collects the trees and their blobs.
    for name in [&demo_ref, &demo2, &multi_ref] {
        image(&state, &["rm", name], &[]).run();
    }
    assert_eq!(std::fs::read_dir(state.join("images/rootfs")).unwrap().count(), 0);
    let blobs = std::fs::read_dir(state.join("images/blobs/sha256"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().ends_with(".lock"))
        .count();
    assert_eq!(blobs, 0, "blobs left after the last image went");
}

/// A `docker save` tarball in `dir`: the busybox layer and one more with a whiteout and
/// `/etc/greeting`.
fn saved_tarball(dir: &Path) -> PathBuf {
    // A docker save tarball: the busybox layer and one more with a whiteout.
    let l1 = busybox_layer();
    let l2 = Layer::new(|b| {
        file(b, "etc/.wh.old", b"", 0o644);
        file(b, "etc/greeting", b"hello from the registry\n", 0o644);
    });
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"]}},"rootfs":{{"type":"layers","diff_ids":["{}","{}"]}}}}"#,
        sha(&l1.tar),
        sha(&l2.tar)
    );
    let hexs = |d: String| d.trim_start_matches("sha256:").to_string();
    let (c, a, b) = (hexs(sha(config.as_bytes())), hexs(sha(&l1.tar)), hexs(sha(&l2.tar)));
    let manifest = format!(
        r#"[{{"Config":"{c}.json","RepoTags":["saved:1"],"Layers":["{a}/layer.tar","{b}/layer.tar"]}}]"#
    );
    let save = Layer::new(|t| {
        file(t, "manifest.json", manifest.as_bytes(), 0o644);
        file(t, &format!("{c}.json"), config.as_bytes(), 0o644);
        file(t, &format!("{a}/layer.tar"), &l1.tar, 0o644);
        file(t, &format!("{b}/layer.tar"), &l2.tar, 0o644);
    });
    let tarball = dir.join("saved.tar");
    std::fs::write(&tarball, &save.tar).unwrap();
    tarball
}

#[test]
fn a_docker_save_image_pulls_and_runs_a_job_step() {
    let test = "image::pull::a_docker_save_image_pulls_and_runs_a_job_step";
    if !can_run(test) || !crate::oci::can_run(test, "runc") {
        return;
    }
    let reg = Registry::start(None, None);
    let tmp = tempfile::tempdir().unwrap();
    let tarball = saved_tarball(tmp.path());
    reg.push(&format!("docker-archive:{}", tarball.display()), "saved:1");

    let f = crate::oci::Fixture::new("runc");
    let reference = format!("{}/saved:1", reg.host());
    image(&f.state(), &["pull", &reference], &[]).run();
    let limits =
        executor::sandbox::Limits { cpus: 1, memory_bytes: 256 << 20, disk_bytes: 64 << 20, pids: 128 };
    let ws = f.workspace();
    let req = executor::sandbox::BootRequest {
        job_uid: "1",
        workspace: &ws,
        images: vec![reference.clone()],
        limits: &limits,
        name_prefix: "pulltest",
        coordinator: None,
        endpoints: &[],
    };
    use executor::sandbox::Runtime;
    let sb = f.rt.boot(&req).unwrap();
    let cancel = executor::base::cancel::Cancel::new();
    let (end, out) = f.run_in(&sb, &reference, "cat /etc/greeting; ls /etc", &[], &cancel);
    f.rt.teardown(&sb).unwrap();
    assert_eq!(end, executor::sandbox::StepEnd::Exited(0), "{} {}", out.stdout(), out.stderr());
    assert!(out.stdout().starts_with("hello from the registry\n"), "{}", out.stdout());
    assert!(!out.stdout().contains("old"), "whiteout: {}", out.stdout());
}

#[test]
fn tls_registry_needs_its_ca() {
    let test = "image::pull::tls_registry_needs_its_ca";
    if !can_run(test) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let Some((ca, cert, key)) = common::make_ca(tmp.path(), test) else { return };
    let reg = Registry::start(Some((&cert, &key)), None);
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let (digest, _) = demo_image(&mut layout, "demo");
    reg.push(&layout.src("demo"), "demo:1");
    let state = tmp.path().join("state");
    let reference = format!("{}/demo:1", reg.host());
    // Loopback may use plain HTTP, but this registry speaks TLS: without the CA it is untrusted.
    let out = image(&state, &["pull", &reference], &[]).fails().run();
    let err = stderr(&out);
    assert!(err.contains(&reg.host()) && (err.contains("certificate") || err.contains("Unknown")), "{err}");
    image(&state, &["pull", &reference], &[("EXECUTOR_REGISTRY_CA", &ca)])
        .stdout_has(format!("{reference} {digest}"))
        .run();
}

/// A loopback registry that takes `user` and `pass` (htpasswd basic auth; its file in `dir`).
fn basic_auth_registry(dir: &Path, user: &str, pass: &str) -> Registry {
    let htpasswd = dir.join("htpasswd");
    let out = Exec::program("htpasswd").args(["-Bbn", user, pass]).run();
    std::fs::write(&htpasswd, &out.stdout).unwrap();
    Registry::start(None, Some((&htpasswd, user, pass)))
}

#[test]
fn basic_auth_registry_takes_docker_config_credentials() {
    let test = "image::pull::basic_auth_registry_takes_docker_config_credentials";
    if !can_run(test) {
        return;
    }
    if which::which("htpasswd").is_err() {
        common::skip(test, "registry", "htpasswd (apache2-utils) is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (user, pass) = ("puller", "s3cret-pa55word");
    let reg = basic_auth_registry(tmp.path(), user, pass);
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let (digest, _) = demo_image(&mut layout, "demo");
    reg.push(&layout.src("demo"), "private/demo:1");
    let state = tmp.path().join("state");
    let reference = format!("{}/private/demo:1", reg.host());
    use base64::Engine;
    let config = |p: &str| {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{p}"));
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.host())
    };

    let out = image(&state, &["pull", &reference], &[]).fails().run();
    assert!(stderr(&out).contains(&format!("registry {} needs credentials", reg.host())), "{}", stderr(&out));

    let wrong = "wrong-pa55word";
    let out = image(&state, &["pull", &reference], &[("EXECUTOR_DOCKER_AUTH_CONFIG", &config(wrong))])
        .fails()
        .run();
    let err = stderr(&out);
    assert!(err.contains(&format!("registry {} refused the credentials", reg.host())), "{err}");
    assert!(!err.contains(wrong) && !err.contains(pass), "a password in the error: {err}");

    let out = image(&state, &["pull", &reference], &[("EXECUTOR_DOCKER_AUTH_CONFIG", &config(pass))])
        .stdout_has(format!("{reference} {digest}"))
        .run();
    assert!(!stderr(&out).contains(pass));
    let meta = std::fs::read_dir(state.join("images")).unwrap().count();
    assert!(meta > 0);
    let stored = common::sh(&state, "grep -rl s3cret-pa55word . || true");
    assert_eq!(stored.trim(), "", "the password was stored");
}

/// A TCP proxy in front of the registry that cuts the connection once `after` bytes went to the
/// client, and with `kill` also kills the registry then (it stops in the middle of a pull).
/// Counts the requests that asked for a `Range`.
fn cutting_proxy(reg: &Registry, after: u64, kill: bool) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = reg.port;
    let child = reg.child.clone();
    let sent = Arc::new(AtomicU64::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let ranges = Arc::new(AtomicU64::new(0));
    let range_count = ranges.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { break };
            let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
            let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let ranges = ranges.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                while let Ok(n @ 1..) = c2.read(&mut buf) {
                    if buf[..n].windows(13).any(|w| w.eq_ignore_ascii_case(b"\r\nrange: byte")) {
                        ranges.fetch_add(1, Ordering::SeqCst);
                    }
                    if s2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
            let (sent, cut, child) = (sent.clone(), cut.clone(), child.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 16384];
                loop {
                    let n = match server.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    if sent.fetch_add(n as u64, Ordering::SeqCst) + n as u64 > after
                        && !cut.swap(true, Ordering::SeqCst)
                    {
                        if kill {
                            if let Ok(mut c) = child.lock() {
                                let _ = c.kill();
                                let _ = c.wait();
                            }
                        }
                        break;
                    }
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, range_count)
}

#[test]
fn hostile_registries_are_refused_naming_what_failed() {
    let test = "image::pull::hostile_registries_are_refused_naming_what_failed";
    if !can_run(test) {
        return;
    }
    let reg = Registry::start(None, None);
    let tmp = tempfile::tempdir().unwrap();
    let host = reg.host();
    let mut layout = Layout::new(&tmp.path().join("layout"));

    // A tampered blob: the registry serves bytes that do not match the digest.
    let victim = Layer::new(|b| file(b, "etc/data", &[7u8; 4096], 0o644));
    let victim_blob = victim.gzip();
    let m = layout.image("amd64", &[(&victim.tar, victim_blob.clone(), GZ)]);
    layout.tag("victim", OCI_MANIFEST, &m.0, m.1);
    reg.push(&layout.src("victim"), "victim:1");
    let blob_digest = sha(&victim_blob);
    let data = reg.blob_file(&blob_digest);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    let state = tmp.path().join("state");
    let out = image(&state, &["pull", &format!("{host}/victim:1")], &[]).fails().run();
    let err = stderr(&out);
    assert!(
        err.contains(&format!("blob {blob_digest}")) && err.contains("does not match its digest"),
        "{err}"
    );
    assert!(err.contains(&format!("pulling {host}/victim:1 from {host}")), "{err}");
    let left: Vec<_> = std::fs::read_dir(state.join("images/blobs/sha256"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.ends_with(".lock"))
        .collect();
    assert!(left.is_empty(), "an unverified blob was kept: {left:?}");

    // A gzip bomb: a small layer that unpacks to far more than the cap.
    let bomb_dir = tmp.path().join("bomb");
    std::fs::create_dir(&bomb_dir).unwrap();
    common::sh(&bomb_dir, "truncate -s 96M zeros && tar -cf - zeros | gzip -1 > layer.tar.gz && rm zeros");
    let bomb = std::fs::read(bomb_dir.join("layer.tar.gz")).unwrap();
    assert!(bomb.len() < 1 << 20, "the bomb is small: {}", bomb.len());
    let m = layout.image("amd64", &[(b"unused", bomb, GZ)]);
    layout.tag("bomb", OCI_MANIFEST, &m.0, m.1);
    reg.push(&layout.src("bomb"), "bomb:1");
    let out = image(&state, &["pull", &format!("{host}/bomb:1")], &[("EXECUTOR_IMAGE_MAX_SIZE", "32M")])
        .fails()
        .run();
    assert!(
        stderr(&out).contains("more than 32 MiB") && stderr(&out).contains("decompression bomb"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_dir(state.join("images/tmp")).unwrap().count(), 0, "staging left behind");

    // 10,000 layers: refused on the manifest, before any layer is fetched.
    let one_blob = Layer::new(|b| file(b, "x", b"x", 0o644)).gzip();
    let one = reg.put_blob("many", &one_blob);
    let cfg_body = br#"{"architecture":"amd64","os":"linux","config":{}}"#;
    let cfg = reg.put_blob("many", cfg_body);
    let layer = format!(r#"{{"mediaType":"{GZ}","digest":"{one}","size":{}}}"#, one_blob.len());
    let layers = vec![layer; 10_000].join(",");
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cfg}","size":{}}},"layers":[{layers}]}}"#,
        cfg_body.len()
    );
    reg.put_manifest("many", "1", OCI_MANIFEST, manifest.as_bytes());
    let out = image(&state, &["pull", &format!("{host}/many:1")], &[]).fails().run();
    assert!(stderr(&out).contains("lists 10000 layers, over the cap"), "{}", stderr(&out));

    // The registry stopped mid-pull: retries, then an error naming the image and the registry.
    let big_dir = tmp.path().join("big");
    std::fs::create_dir(&big_dir).unwrap();
    common::sh(&big_dir, "head -c 24M /dev/urandom > big && tar -cf layer.tar big && rm big");
    let big = std::fs::read(big_dir.join("layer.tar")).unwrap();
    let m = layout.image("amd64", &[(&big, big.clone(), TAR)]);
    layout.tag("big", OCI_MANIFEST, &m.0, m.1);
    reg.push(&layout.src("big"), "big:1");
    // First a connection broken once mid-blob: the pull resumes with a Range and succeeds.
    let (port, ranges) = cutting_proxy(&reg, 4 << 20, false);
    let via = format!("127.0.0.1:{port}/big:1");
    let resumed = tmp.path().join("resumed");
    // skopeo compresses an uncompressed layer as it pushes it: ask the registry for the digest.
    let (_, big_digest) = reg.manifest("big", "1");
    image(&resumed, &["pull", &via], &[]).stdout_has(format!("{via} {big_digest}")).run();
    assert!(ranges.load(Ordering::SeqCst) >= 1, "the broken blob transfer did not resume with a Range");
    let store = executor::image::ImageStore::open(&resumed.join("images")).unwrap();
    assert_eq!(std::fs::read(store.resolve(&via).unwrap().rootfs.join("big")).unwrap().len(), 24 << 20);
    // Then the registry itself stops.
    let (port, _) = cutting_proxy(&reg, 4 << 20, true);
    let via = format!("127.0.0.1:{port}/big:1");
    let out = image(&state, &["pull", &via], &[]).fails().run();
    let err = stderr(&out);
    assert!(err.contains(&format!("pulling {via} from 127.0.0.1:{port}")), "{err}");
    eprintln!("stopped mid-pull: {err}");
    assert!(err.contains("failed 5 times"), "{err}");
    assert!(reg.child.lock().unwrap().try_wait().unwrap().is_some(), "the registry was stopped");
}

#[test]
fn vm_boot_pulls_a_missing_image_with_the_jobs_credentials() {
    let test = "image::pull::vm_boot_pulls_a_missing_image_with_the_jobs_credentials";
    if !can_run(test) || !crate::oci::can_run(test, "runc") {
        return;
    }
    if which::which("htpasswd").is_err() {
        common::skip(test, "registry", "htpasswd (apache2-utils) is not installed");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let (user, pass) = ("jobuser", "job-pa55word-xyz");
    let reg = basic_auth_registry(tmp.path(), user, pass);
    reg.push(&format!("docker-archive:{}", saved_tarball(tmp.path()).display()), "team/saved:1");
    let reference = format!("{}/team/saved:1", reg.host());

    let c = crate::coordinator::Coordinator::start();
    let f = crate::oci::Fixture::new("runc");
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let id = c.submit(serde_json::json!({
        "version": 2,
        "dockerSteps": [{"key": "hello", "image": reference, "dir": "", "env": [], "commands": ["cat /etc/greeting"]}],
        "dockerAuthConfig": {"auths": {reg.host(): {"auth": auth}}}
    }));
    let absent = c.submit(serde_json::json!({
        "dockerSteps": [{"key": "x", "image": format!("{}/team/absent:1", reg.host()), "dir": "", "env": [], "commands": ["true"]}]
    }));
    // A later job that names the private image without credentials.
    let stranger = c.submit(serde_json::json!({
        "dockerSteps": [{"key": "x", "image": reference, "dir": "", "env": [], "commands": ["cat /etc/greeting"]}]
    }));
    let prefix = format!("pull{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let run_loop = |policy: &str| {
        let mut cmd = common::executor();
        c.executor_env(&mut cmd);
        cmd.env("EXECUTOR_QUEUE_NAME", "batches")
            .env("EXECUTOR_RUNTIME", "oci")
            .env("EXECUTOR_OCI_RUNTIME", "runc")
            .env("EXECUTOR_STATE_DIR", f.state())
            .env("EXECUTOR_VM_PREFIX", &prefix)
            .env("EXECUTOR_JOB_MEMORY", "200M")
            .env("EXECUTOR_JOB_NUM_CPUS", "1")
            .env("EXECUTOR_NUM_TOTAL_JOBS", "1")
            .env("EXECUTOR_MAXIMUM_RUNTIME_PER_JOB", "60s")
            .env("EXECUTOR_HEARTBEAT_INTERVAL", "300ms")
            .env("EXECUTOR_IMAGE_PULL", policy)
            .env("EXECUTOR_PRIVATE_REGISTRIES", reg.host())
            .arg("loop");
        common::assert_ok(&common::run(&mut cmd));
    };
    run_loop("missing");
    let job = c.wait_state(id, &["completed", "failed", "errored"], Duration::from_secs(60));
    // The coordinator's view holds the payload; what the executor wrote is the logs.
    let text = job["logs"].to_string();
    assert_eq!(job["state"], "completed", "{job:#}");
    let logs = job["logs"].as_array().unwrap();
    let pull = logs.iter().find(|e| e["key"] == "setup.image.pull").expect("a setup.image.pull entry");
    let out = pull["out"].as_str().unwrap();
    assert!(
        out.contains(&format!("pulled {reference} as {reference}")) && out.contains("digest sha256:"),
        "{out}"
    );
    let step = logs.iter().find(|e| e["key"] == "step.docker.hello").unwrap();
    assert!(step["out"].as_str().unwrap().contains("hello from the registry"), "{step:#}");
    assert!(!text.contains(pass) && !text.contains(&auth), "the job's password reached its log");
    let refs = std::fs::read_to_string(f.state().join("images/refs.json")).unwrap();
    assert!(refs.contains(&reference), "{refs}");

    // Never pulling: the missing image fails the job, naming it.
    run_loop("never");
    let job = c.wait_state(absent, &["completed", "failed", "errored"], Duration::from_secs(60));
    assert_ne!(job["state"], "completed");
    assert!(job.to_string().contains("unknown image"), "{job:#}");
    assert!(!job["logs"].as_array().unwrap().iter().any(|e| e["key"] == "setup.image.pull"));

    // The image the first job pulled with its credentials is not served to a job without them.
    run_loop("missing");
    let job = c.wait_state(stranger, &["completed", "failed", "errored"], Duration::from_secs(60));
    assert_ne!(job["state"], "completed", "a private image served without credentials: {job:#}");
    let text = job["logs"].to_string();
    assert!(text.contains("was pulled with other credentials: not served to this job"), "{job:#}");
    assert!(text.contains("needs credentials"), "{job:#}");
    assert!(!text.contains("hello from the registry"), "{job:#}");
}

/// A token-auth front for the registry, as Docker Hub has: without `Bearer <token>` a request is
/// answered 401 with a `WWW-Authenticate: Bearer realm=...,service=...,scope=...` challenge;
/// `/token` hands out the token for the right basic credentials and records the query it got.
fn token_front(reg: &Registry, user: &str, pass: &str) -> (u16, Arc<Mutex<Vec<String>>>) {
    use base64::Engine;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let upstream = reg.port;
    let basic =
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}")));
    let queries = Arc::new(Mutex::new(Vec::new()));
    let seen = queries.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { break };
            let (basic, seen) = (basic.clone(), seen.clone());
            std::thread::spawn(move || {
                let _ = client.set_read_timeout(Some(Duration::from_secs(5)));
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match client.read(&mut byte) {
                        // A TLS hello: this front speaks plain HTTP only.
                        Ok(1) if head.is_empty() && byte[0] == 0x16 => return,
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let text = String::from_utf8_lossy(&head).into_owned();
                let path = text.split(' ').nth(1).unwrap_or("").to_string();
                let auth = text
                    .lines()
                    .find_map(|l| {
                        l.strip_prefix("Authorization: ").or_else(|| l.strip_prefix("authorization: "))
                    })
                    .unwrap_or("")
                    .trim()
                    .to_string();
                let reply = |client: &mut TcpStream, status: &str, extra: &str, body: &str| {
                    let _ = write!(
                        client,
                        "HTTP/1.1 {status}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                };
                if let Some(query) = path.strip_prefix("/token?") {
                    seen.lock().unwrap().push(query.to_string());
                    if auth == basic {
                        reply(
                            &mut client,
                            "200 OK",
                            "Content-Type: application/json\r\n",
                            r#"{"token":"tok-3141"}"#,
                        );
                    } else {
                        reply(&mut client, "401 Unauthorized", "", "");
                    }
                } else if auth == "Bearer tok-3141" {
                    let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
                    let head = text.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
                    let _ = server.write_all(head.as_bytes());
                    let _ = std::io::copy(&mut server, &mut client);
                } else {
                    let challenge = format!(
                        "WWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"test-registry\",scope=\"repository:private/demo:pull\"\r\n"
                    );
                    reply(&mut client, "401 Unauthorized", &challenge, "");
                }
            });
        }
    });
    (port, queries)
}

#[test]
fn bearer_token_auth_gets_a_token_for_the_repository() {
    let test = "image::pull::bearer_token_auth_gets_a_token_for_the_repository";
    if !can_run(test) {
        return;
    }
    let reg = Registry::start(None, None);
    let tmp = tempfile::tempdir().unwrap();
    let mut layout = Layout::new(&tmp.path().join("layout"));
    let (digest, _) = demo_image(&mut layout, "demo");
    reg.push(&layout.src("demo"), "private/demo:1");
    let (user, pass) = ("tokenuser", "token-pa55word");
    let (port, queries) = token_front(&reg, user, pass);
    let state = tmp.path().join("state");
    let reference = format!("127.0.0.1:{port}/private/demo:1");

    let out = image(&state, &["pull", &reference], &[]).fails().run();
    let err = stderr(&out);
    assert!(err.contains(&format!("registry 127.0.0.1:{port}: the token service refused")), "{err}");

    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    let config = format!(r#"{{"auths":{{"127.0.0.1:{port}":{{"auth":"{auth}"}}}}}}"#);
    let out = image(&state, &["pull", &reference], &[("EXECUTOR_DOCKER_AUTH_CONFIG", &config)])
        .stdout_has(format!("{reference} {digest}"))
        .run();
    assert!(!stderr(&out).contains(pass));
    let queries = queries.lock().unwrap().clone();
    assert!(
        queries
            .iter()
            .all(|q| q.contains("service=test-registry")
                && q.contains("scope=repository%3Aprivate%2Fdemo%3Apull")),
        "{queries:?}"
    );
    assert!(std::fs::read_to_string(state.join("images/refs.json")).unwrap().contains(&reference));
}

/// The cache budget end to end: `image prune --dry-run` lists what would go and removes nothing;
/// `executor janitor` under `EXECUTOR_IMAGE_CACHE_SIZE` removes the layer blobs first, then the
/// least recently used pulled image, and keeps the built one.
#[test]
fn cache_budget_prunes_least_recently_used_pulled_images() {
    let test = "image::pull::cache_budget_prunes_least_recently_used_pulled_images";
    if !can_run(test) {
        return;
    }
    let reg = Registry::start(None, None);
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mut layout = Layout::new(&tmp.path().join("layout"));
    demo_image(&mut layout, "demo");
    let extra = Layer::new(|b| file(b, "big", &vec![7u8; 300_000], 0o644));
    let bb = busybox_layer();
    let m = layout.image("amd64", &[(&bb.tar, bb.gzip(), GZ), (&extra.tar, extra.gzip(), GZ)]);
    layout.tag("other", OCI_MANIFEST, &m.0, m.1);
    let host = reg.host();
    reg.push(&layout.src("demo"), "demo:1");
    reg.push(&layout.src("other"), "other:1");
    image(&state, &["build-busybox"], &[]).run();
    image(&state, &["pull", &format!("{host}/demo:1")], &[]).run();
    std::thread::sleep(Duration::from_millis(20));
    image(&state, &["pull", &format!("{host}/other:1")], &[]).run();
    let blobs = || -> Vec<String> {
        std::fs::read_dir(state.join("images/blobs/sha256"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| !n.ends_with(".lock"))
            .collect()
    };
    assert!(!blobs().is_empty(), "layer blobs are kept for later pulls without a budget");

    let out = image(&state, &["prune", "--dry-run", "--image-cache-size", "1"], &[]).run();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("would remove image sha256:") && text.contains(&format!("{host}/demo:1")),
        "{text}"
    );
    assert!(text.contains(&format!("{host}/other:1")), "{text}");
    assert!(text.contains("kept sha256:") && text.contains("imported or built here"), "{text}");
    assert!(text.contains("would free ") && text.contains("would remove blob sha256:"), "{text}");
    let list = image(&state, &["ls", "--json"], &[]).run();
    let list: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3, "a dry run removes nothing: {list}");

    // A budget just short of what the trees take: the blobs go first, then only the least
    // recently used pulled image.
    let usage = dir_blocks(&state.join("images/rootfs"));
    let out = Exec::new()
        .arg("janitor")
        .env("EXECUTOR_STATE_DIR", &state)
        .env("EXECUTOR_IMAGE_CACHE_SIZE", (usage - 4096).to_string())
        .env("EXECUTOR_FRONTEND_PASSWORD", "unused-by-the-janitor")
        .run();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains(&format!("{host}/demo:1")) && said.contains("EXECUTOR_IMAGE_CACHE_SIZE"), "{said}");
    assert!(!said.contains(&format!("{host}/other:1")), "{said}");
    assert!(blobs().is_empty(), "blobs go before images over the budget: {:?}", blobs());
    let list = image(&state, &["ls", "--json"], &[]).run();
    let names: Vec<String> = serde_json::from_slice::<serde_json::Value>(&list.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"busybox".to_string()) && names.contains(&format!("{host}/other")), "{names:?}");
    assert!(!names.contains(&format!("{host}/demo")), "{names:?}");
}

/// Allocated bytes of every entry below `dir`, as the store counts its trees.
fn dir_blocks(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p).unwrap();
        if p != dir
            && !(md.is_file() && p.extension().is_some_and(|e| e == "json") && p.parent() == Some(dir))
        {
            total += md.blocks() * 512;
        }
        if md.is_dir() {
            stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
        }
    }
    total
}
