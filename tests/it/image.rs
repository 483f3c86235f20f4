//! `executor image ...` through the real binary: import of docker save and OCI layout tarballs
//! (with whiteouts and hostile entries), build-busybox, ls, rm, and concurrent imports.

use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::common::{self, Exec};

mod hostile;
mod pull;

fn tar_bytes(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    build(&mut b);
    b.into_inner().unwrap()
}

fn add(b: &mut tar::Builder<Vec<u8>>, path: &str, data: &[u8], mode: u32) {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(mode);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, path, data).unwrap();
}

fn add_raw(b: &mut tar::Builder<Vec<u8>>, kind: tar::EntryType, path: &str, link: &str) {
    let mut h = tar::Header::new_gnu();
    h.set_size(0);
    h.set_mode(0o644);
    h.set_entry_type(kind);
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
    h.set_cksum();
    b.append(&h, std::io::empty()).unwrap();
}

fn sha(b: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(b))
}

const CONFIG: &str = r#"{"config":{"Env":["PATH=/bin","LANG=C"],"WorkingDir":"/work"}}"#;

fn layers() -> (Vec<u8>, Vec<u8>) {
    let l1 = tar_bytes(|b| {
        add(b, "bin/tool", b"#!/bin/sh\n", 0o755);
        add(b, "etc/old", b"old", 0o644);
        add(b, "etc/keep", b"keep", 0o644);
    });
    let l2 = tar_bytes(|b| {
        add(b, "etc/.wh.old", b"", 0o644);
        add(b, "etc/new", b"new", 0o600);
        add_raw(b, tar::EntryType::Link, "etc/keep-link", "etc/keep");
    });
    (l1, l2)
}

/// A `docker save` tarball with two layers.
fn docker_save() -> Vec<u8> {
    let (l1, l2) = layers();
    let manifest = format!(
        r#"[{{"Config":"{c}.json","RepoTags":["demo:1"],"Layers":["{a}/layer.tar","{b}/layer.tar"]}}]"#,
        c = sha(CONFIG.as_bytes()),
        a = sha(&l1),
        b = sha(&l2)
    );
    tar_bytes(|b| {
        add(b, "manifest.json", manifest.as_bytes(), 0o644);
        add(b, &format!("{}.json", sha(CONFIG.as_bytes())), CONFIG.as_bytes(), 0o644);
        add(b, &format!("{}/layer.tar", sha(&l1)), &l1, 0o644);
        add(b, &format!("{}/layer.tar", sha(&l2)), &l2, 0o644);
    })
}

/// An OCI image layout tarball with gzipped layers; returns it and its manifest digest.
fn oci_layout() -> (Vec<u8>, String) {
    let (l1, l2) = layers();
    let gz = |d: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, d).unwrap();
        e.finish().unwrap()
    };
    let (g1, g2) = (gz(&l1), gz(&l2));
    let manifest = format!(
        r#"{{"schemaVersion":2,"config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{c}","size":{cs}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{a}","size":1}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:{b}","size":1}}]}}"#,
        c = sha(CONFIG.as_bytes()),
        cs = CONFIG.len(),
        a = sha(&g1),
        b = sha(&g2)
    );
    let md = sha(manifest.as_bytes());
    let index = format!(
        r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:{md}","size":{}}}]}}"#,
        manifest.len()
    );
    let t = tar_bytes(|b| {
        add(b, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#, 0o644);
        add(b, "index.json", index.as_bytes(), 0o644);
        add(b, &format!("blobs/sha256/{md}"), manifest.as_bytes(), 0o644);
        add(b, &format!("blobs/sha256/{}", sha(CONFIG.as_bytes())), CONFIG.as_bytes(), 0o644);
        add(b, &format!("blobs/sha256/{}", sha(&g1)), &g1, 0o644);
        add(b, &format!("blobs/sha256/{}", sha(&g2)), &g2, 0o644);
    });
    (t, format!("sha256:{md}"))
}

/// `executor image ARGS` on the state directory `state`.
fn image_exec(state: &Path, args: &[&str]) -> Exec {
    Exec::new().arg("image").args(args).env("EXECUTOR_STATE_DIR", state)
}

/// Runs `executor image ARGS` whatever its status.
fn image(state: &Path, args: &[&str]) -> std::process::Output {
    image_exec(state, args).any_status().run()
}

/// Runs `executor image ARGS`, which must succeed.
#[track_caller]
fn image_ok(state: &Path, args: &[&str]) -> std::process::Output {
    image_exec(state, args).run()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn image_import_docker_save_and_oci_layout_then_ls_and_rm() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let docker = write(tmp.path(), "docker.tar", &docker_save());
    let (oci, oci_digest) = oci_layout();
    let oci = write(tmp.path(), "oci.tar", &oci);

    image_ok(&state, &["import", "demo:1", docker.to_str().unwrap()]);
    let out = image_ok(&state, &["import", "demo-oci", oci.to_str().unwrap()]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("demo-oci:latest {oci_digest}\n"));

    let store = executor::image::ImageStore::open(&state.join("images")).unwrap();
    for reference in ["demo:1", "demo-oci", &format!("demo-oci@{oci_digest}")] {
        let img = store.resolve(reference).unwrap();
        let r = &img.rootfs;
        assert!(!r.join("etc/old").exists(), "{reference}: whiteout not applied");
        assert_eq!(std::fs::read_to_string(r.join("etc/new")).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(r.join("etc/keep-link")).unwrap(), "keep");
        assert_eq!(img.env, vec!["PATH=/bin", "LANG=C"]);
        assert_eq!(img.workdir, "/work");
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(r.join("bin/tool")).unwrap();
        assert_eq!(md.uid(), executor::image::ID_BASE, "owned by the container's root, not host root");
        assert_eq!(md.mode() & 0o777, 0o755);
    }
    let err = store.resolve("demo:2").unwrap_err();
    assert!(format!("{err:#}").contains("unknown image \"demo:2\""), "{err:#}");

    let out = image(&state, &["ls", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}:{}", e["name"].as_str().unwrap(), e["tag"].as_str().unwrap()))
        .collect();
    assert_eq!(names, ["demo-oci:latest", "demo:1"]);
    let out = image(&state, &["ls"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NAME") && table.contains("demo-oci"), "{table}");

    image_exec(&state, &["rm", "demo-oci"]).stdout_has(format!("deleted {oci_digest}")).run();
    let out = image(&state, &["rm", "demo-oci"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown image \"demo-oci\""));
    assert_eq!(store.list().unwrap().len(), 1);
}

/// Two `docker save` tarballs whose configs are the same and name no layer digests (hand-made
/// images do that) are two images: each keeps its own tree, and its files keep their times.
#[test]
fn image_import_same_config_other_layers_is_another_image() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let docker = write(tmp.path(), "docker.tar", &docker_save());
    let other_layer = tar_bytes(|b| {
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o644);
        h.set_mtime(1_234_567_890);
        b.append_data(&mut h, "etc/other", &b"other"[..]).unwrap();
    });
    let manifest = format!(r#"[{{"Config":"c.json","Layers":["{}/layer.tar"]}}]"#, sha(&other_layer));
    let other = write(
        tmp.path(),
        "other.tar",
        &tar_bytes(|b| {
            add(b, "manifest.json", manifest.as_bytes(), 0o644);
            add(b, "c.json", CONFIG.as_bytes(), 0o644);
            add(b, &format!("{}/layer.tar", sha(&other_layer)), &other_layer, 0o644);
        }),
    );
    image_ok(&state, &["import", "demo:1", docker.to_str().unwrap()]);
    image_ok(&state, &["import", "demo:2", other.to_str().unwrap()]);
    let store = executor::image::ImageStore::open(&state.join("images")).unwrap();
    let (one, two) = (store.resolve("demo:1").unwrap(), store.resolve("demo:2").unwrap());
    assert_ne!(one.digest, two.digest);
    assert_eq!(std::fs::read_to_string(one.rootfs.join("etc/new")).unwrap(), "new");
    assert!(!one.rootfs.join("etc/other").exists());
    assert!(!two.rootfs.join("etc/new").exists());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(two.rootfs.join("etc/other")).unwrap().mtime(), 1_234_567_890);
    // The same tarball again is the same image.
    image_ok(&state, &["import", "demo:3", other.to_str().unwrap()]);
    assert_eq!(store.resolve("demo:3").unwrap().digest, two.digest);
}

#[test]
fn image_import_refuses_hostile_tarballs() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "escape",
            tar_bytes(|b| add_raw(b, tar::EntryType::Regular, "../../outside", "")),
            "escapes the image root",
        ),
        ("device", tar_bytes(|b| add_raw(b, tar::EntryType::Char, "dev/mem", "")), "refusing device node"),
        (
            "hardlink",
            tar_bytes(|b| add_raw(b, tar::EntryType::Link, "shadow", "../../etc/shadow")),
            "out of the image tree",
        ),
        (
            "symlink-parent",
            tar_bytes(|b| {
                add_raw(b, tar::EntryType::Symlink, "etc", "/etc");
                add(b, "etc/cron.d/evil", b"x", 0o644);
            }),
            "is a symlink",
        ),
        // A whiteout of `..` would remove the layer's parent directory.
        ("whiteout-parent", tar_bytes(|b| add(b, "etc/sub/.wh...", b"", 0o644)), "refusing whiteout"),
        ("whiteout-self", tar_bytes(|b| add(b, "etc/.wh..", b"", 0o644)), "refusing whiteout"),
    ];
    for (name, layer, want) in cases {
        let manifest = r#"[{"Config":"c.json","Layers":["l/layer.tar"]}]"#;
        let t = tar_bytes(|b| {
            add(b, "manifest.json", manifest.as_bytes(), 0o644);
            add(b, "c.json", b"{}", 0o644);
            add(b, "l/layer.tar", &layer, 0o644);
        });
        let file = write(tmp.path(), &format!("{name}.tar"), &t);
        let out = image(&state, &["import", name, file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{name}: {stderr}");
        assert!(stderr.contains(want), "{name}: {stderr}");
    }
    assert!(!Path::new("/etc/cron.d/evil").exists());
    assert!(!tmp.path().join("outside").exists());
    let out = image(&state, &["ls", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    assert_eq!(std::fs::read_dir(state.join("images/tmp")).unwrap().count(), 0, "staging left behind");
}

/// An OCI layout whose blobs do not match the digests that name them (a layer, the config, the
/// manifest) is refused, so that it can never stand in for the image those digests name; and a
/// docker save layer that is not the one its config's `diff_ids` names is refused too.
#[test]
fn image_import_refuses_tampered_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let (good, _) = oci_layout();
    // Rewrites the archive, replacing the content of the entries `pick` chooses.
    let tamper = |pick: &dyn Fn(&str, &[u8]) -> bool| -> Vec<u8> {
        let mut ar = tar::Archive::new(std::io::Cursor::new(good.clone()));
        tar_bytes(|b| {
            for e in ar.entries().unwrap() {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut e, &mut data).unwrap();
                if pick(&path, &data) {
                    data = tar_bytes(|l| add(l, "etc/poison", b"from a tampered tarball", 0o644));
                    if path.ends_with(&sha(CONFIG.as_bytes())) || data.is_empty() {
                        data = br#"{"config":{"Env":["POISON=1"]}}"#.to_vec();
                    }
                }
                add(b, &path, &data, 0o644);
            }
        })
    };
    // A gzipped layer blob, then the config.
    let layer = |p: &str, d: &[u8]| p.starts_with("blobs/") && d.starts_with(&[0x1f, 0x8b]);
    let config = |p: &str, _: &[u8]| p.ends_with(&sha(CONFIG.as_bytes()));
    type Pick<'a> = &'a dyn Fn(&str, &[u8]) -> bool;
    let cases: [(&str, Pick); 2] = [("layer", &layer), ("config", &config)];
    for (what, pick) in cases {
        let file = write(tmp.path(), &format!("{what}.tar"), &tamper(pick));
        let out = image(&state, &["import", &format!("tampered-{what}"), file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains("does not match its digest"), "{what}: {stderr}");
    }
    let out = image(&state, &["ls", "--json"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");

    // docker save: the second layer is not the tar its config's diff_ids names.
    let (l1, l2) = layers();
    let config = format!(
        r#"{{"config":{{}},"rootfs":{{"type":"layers","diff_ids":["sha256:{}","sha256:{}"]}}}}"#,
        sha(&l1),
        sha(&l2)
    );
    let evil = tar_bytes(|b| add(b, "etc/poison", b"x", 0o644));
    let manifest = r#"[{"Config":"c.json","Layers":["a/layer.tar","b/layer.tar"]}]"#;
    let t = tar_bytes(|b| {
        add(b, "manifest.json", manifest.as_bytes(), 0o644);
        add(b, "c.json", config.as_bytes(), 0o644);
        add(b, "a/layer.tar", &l1, 0o644);
        add(b, "b/layer.tar", &evil, 0o644);
    });
    let file = write(tmp.path(), "saved.tar", &t);
    let out = image(&state, &["import", "saved", file.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("layer 2") && stderr.contains("does not match its digest"), "{stderr}");
    // The honest one imports.
    let t = tar_bytes(|b| {
        add(b, "manifest.json", manifest.as_bytes(), 0o644);
        add(b, "c.json", config.as_bytes(), 0o644);
        add(b, "a/layer.tar", &l1, 0o644);
        add(b, "b/layer.tar", &l2, 0o644);
    });
    let file = write(tmp.path(), "honest.tar", &t);
    image_ok(&state, &["import", "saved", file.to_str().unwrap()]);
}

#[test]
fn image_concurrent_imports_and_builds_share_one_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let docker = write(tmp.path(), "docker.tar", &docker_save());
    let children: Vec<_> = (0..4)
        .map(|i| {
            let mut c = common::executor();
            c.args(["image", "import", &format!("same:{i}"), docker.to_str().unwrap()])
                .env("EXECUTOR_STATE_DIR", &state);
            c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .chain((0..2).map(|i| {
            let mut c = common::executor();
            c.args(["image", "build-busybox", &format!("bb:{i}")]).env("EXECUTOR_STATE_DIR", &state);
            c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        }))
        .collect();
    for c in children {
        common::assert_ok(&c.wait_with_output().unwrap());
    }
    let store = executor::image::ImageStore::open(&state.join("images")).unwrap();
    assert_eq!(store.list().unwrap().len(), 6);
    let trees = std::fs::read_dir(state.join("images/rootfs"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count();
    assert_eq!(trees, 2, "one tree per distinct image");
    let a = store.resolve("bb:0").unwrap();
    assert_eq!(a.digest, store.resolve("bb:1").unwrap().digest, "busybox builds are reproducible");
    assert!(a.rootfs.join("bin/busybox").is_file() && a.rootfs.join("bin/sh").is_symlink());
}
