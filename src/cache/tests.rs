use super::rules::{check_paths, specs, CacheRules};
use super::*;
use crate::protocol::{CacheDecl, CacheKeyDecl, DockerStep, Job};

fn job(repo: &str, image: &str, decl: bool) -> Job {
    Job {
        id: 1,
        repository_name: repo.into(),
        docker_steps: vec![DockerStep { image: image.into(), ..Default::default() }],
        caches: if decl {
            vec![CacheDecl {
                key: CacheKeyDecl { files: vec!["package-lock.json".into()], prefix: "npm".into() },
                paths: vec!["/root/.npm".into(), "node_modules".into()],
            }]
        } else {
            Vec::new()
        },
        ..Default::default()
    }
}

fn digest(image: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(image.as_bytes())))
}

#[test]
fn keys_follow_lockfile_repository_image_and_rules() {
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("package-lock.json"), "v1").unwrap();
    let rules = CacheRules::defaults();
    let one = specs(&job("r", "node:20", true), &rules, ws.path(), &digest).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].paths, ["/root/.npm", "node_modules"]);
    assert!(one[0].made_of.iter().any(|m| m.starts_with("file package-lock.json sha256:")), "{:?}", one[0]);
    let again = specs(&job("r", "node:20", true), &rules, ws.path(), &digest).unwrap();
    assert_eq!(one[0].key, again[0].key, "the same inputs make the same key");
    let other_repo = specs(&job("other", "node:20", true), &rules, ws.path(), &digest).unwrap();
    assert_ne!(one[0].key, other_repo[0].key, "another repository never shares the key");
    let other_image = specs(&job("r", "node:22", true), &rules, ws.path(), &digest).unwrap();
    assert_ne!(one[0].key, other_image[0].key);
    std::fs::write(ws.path().join("package-lock.json"), "v2").unwrap();
    let changed = specs(&job("r", "node:20", true), &rules, ws.path(), &digest).unwrap();
    assert_ne!(one[0].key, changed[0].key, "a changed lockfile is another key");
    // No declaration: the shipped rule for scip-typescript applies, in the step's directory.
    let mut sg = job("r", "sourcegraph/scip-typescript:latest", false);
    sg.docker_steps[0].dir = "web".into();
    assert!(rules::any(&sg, &rules));
    let s = specs(&sg, &rules, ws.path(), &digest).unwrap();
    assert_eq!(s[0].prefix, "npm");
    assert!(s[0].made_of.iter().any(|m| m == "file web/package-lock.json absent"), "{:?}", s[0].made_of);
    assert!(!rules::any(&job("r", "alpine", false), &rules));
    assert!(rules::any(&job("r", "docker.io/sourcegraph/scip-go:v1", false), &rules));
}

#[test]
fn rules_files_and_paths_are_checked() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("rules.json");
    std::fs::write(
        &f,
        r#"[{"image":"ghcr.io/me/*","prefix":"m","files":["a.lock"],"paths":["/root/.m"],
        "shareAcrossRepositories":true}]"#,
    )
    .unwrap();
    let r = CacheRules::load(Some(&f)).unwrap();
    let mut j = job("r", "ghcr.io/me/tool:1", false);
    let ws = tempfile::tempdir().unwrap();
    let s = specs(&j, &r, ws.path(), &digest).unwrap();
    assert_eq!(s[0].repository, "*");
    j.repository_name = "other".into();
    assert_eq!(specs(&j, &r, ws.path(), &digest).unwrap()[0].key, s[0].key, "shared across repositories");
    std::fs::write(&f, r#"[{"image":"x","prefix":"","paths":["/a"]}]"#).unwrap();
    assert!(format!("{:#}", CacheRules::load(Some(&f)).unwrap_err()).contains("no prefix"));
    for bad in ["/", "/proc/x", "/data", "../x", "a/../b", "/tmp/x", ".executor-root-1", "a,b"] {
        assert!(check_paths(&[bad.to_string()]).is_err(), "{bad}");
    }
    check_paths(&["/root/.npm".into(), "node_modules".into(), "web/.yarn/cache".into()]).unwrap();
    let mut j = job("r", "node", true);
    j.caches[0].paths = vec!["/sys/x".into()];
    assert!(specs(&j, &CacheRules::defaults(), ws.path(), &digest).is_err());
}

fn spec(key: &str) -> CacheSpec {
    CacheSpec {
        key: key.into(),
        repository: "r".into(),
        prefix: "p".into(),
        paths: vec!["/root/.npm".into()],
        made_of: Vec::new(),
    }
}

#[test]
fn promote_merges_uppers_and_verify_marks_corruption() {
    let d = tempfile::tempdir().unwrap();
    let store = CacheStore::new(d.path());
    let key = "ab".repeat(32);
    assert_eq!(store.lookup(&key), Lookup::Miss { why: "no version yet".into() });
    // A first job (a miss) writes two files.
    let up = tempfile::tempdir().unwrap();
    std::fs::create_dir(up.path().join("pkg")).unwrap();
    std::fs::write(up.path().join("pkg/a"), "aaa").unwrap();
    std::fs::write(up.path().join("b"), "bb").unwrap();
    // The times the job wrote are kept, a directory's too (bytecode caches compare them).
    let set = crate::base::fs::set_times;
    set(&up.path().join("pkg/a"), (1_000_000, 7)).unwrap();
    set(&up.path().join("pkg"), (2_000_000, 0)).unwrap();
    let mtime = |p: std::path::PathBuf| {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::symlink_metadata(p).unwrap();
        (md.mtime(), md.mtime_nsec())
    };
    let uid_base = nix::unistd::geteuid().as_raw();
    let bytes = store.promote(&spec(&key), None, &[up.path().to_path_buf()], uid_base, false, "1").unwrap();
    assert_eq!(bytes, Some(5));
    let Lookup::Hit { version: v1, bytes } = store.lookup(&key) else { panic!("a hit") };
    assert_eq!(bytes, 5);
    assert_eq!(std::fs::read_to_string(v1.join("tree/p0/pkg/a")).unwrap(), "aaa");
    assert_eq!(mtime(v1.join("tree/p0/pkg/a")), (1_000_000, 7));
    assert_eq!(mtime(v1.join("tree/p0/pkg")), (2_000_000, 0));
    // A job that changed nothing saves nothing.
    let empty = tempfile::tempdir().unwrap();
    assert_eq!(
        store.promote(&spec(&key), Some(&v1), &[empty.path().to_path_buf()], uid_base, false, "2").unwrap(),
        None
    );
    // A second job rewrites `b` and adds `c` over v1, which a running job still holds.
    store.lease("sb-1", std::slice::from_ref(&v1)).unwrap();
    let up2 = tempfile::tempdir().unwrap();
    std::fs::write(up2.path().join("b"), "new").unwrap();
    std::fs::write(up2.path().join("c"), "c").unwrap();
    set(&up2.path().join("c"), (3_000_000, 0)).unwrap();
    store.promote(&spec(&key), Some(&v1), &[up2.path().to_path_buf()], uid_base, false, "3").unwrap();
    let Lookup::Hit { version: v2, .. } = store.lookup(&key) else { panic!("a hit") };
    assert_ne!(v1, v2);
    assert_eq!(std::fs::read_to_string(v2.join("tree/p0/b")).unwrap(), "new");
    assert_eq!(std::fs::read_to_string(v2.join("tree/p0/pkg/a")).unwrap(), "aaa");
    assert_eq!(mtime(v2.join("tree/p0/pkg")), (2_000_000, 0), "a directory copied from v1");
    assert_eq!(mtime(v2.join("tree/p0/c")), (3_000_000, 0));
    assert_eq!(std::fs::read_to_string(v1.join("tree/p0/b")).unwrap(), "bb", "never changed under a job");
    assert!(v1.exists(), "a leased version stays");
    // Corruption: the constant-time check catches a broken meta at once, the full check a file.
    // The janitor's share checks each version once within its period.
    assert!(store.verify_due(std::time::Duration::from_secs(3600), 1).unwrap().is_empty());
    let stamped = |v: &std::path::Path| v.join("verified").exists();
    assert_eq!([stamped(&v1), stamped(&v2)].iter().filter(|s| **s).count(), 1, "one a pass");
    assert!(store.verify().unwrap().is_empty());
    assert!(stamped(&v1) && stamped(&v2));
    std::fs::remove_file(v2.join("tree/p0/c")).unwrap();
    std::fs::write(v2.join("tree/p0/c"), "tampered").unwrap();
    let bad = store.verify().unwrap();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(matches!(store.lookup(&key), Lookup::Miss { why } if why.starts_with("corrupted")));
    // The janitor removes the corrupted version but not the leased one; then, released, v1 goes
    // (it is no longer current).
    let gone = store.prune(0, false, |_| false).unwrap();
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert!(v1.exists());
    store.release("sb-1").unwrap();
    let gone = store.prune(0, false, |_| false).unwrap();
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert!(store.list().unwrap().is_empty());
}

#[test]
fn whiteouts_and_broken_meta() {
    let d = tempfile::tempdir().unwrap();
    let store = CacheStore::new(d.path());
    let key = "cd".repeat(32);
    let up = tempfile::tempdir().unwrap();
    std::fs::create_dir(up.path().join("dir")).unwrap();
    std::fs::write(up.path().join("dir/x"), "x").unwrap();
    std::fs::write(up.path().join("gone"), "g").unwrap();
    let me = nix::unistd::geteuid().as_raw();
    store.promote(&spec(&key), None, &[up.path().to_path_buf()], me, false, "1").unwrap();
    let Lookup::Hit { version: v1, .. } = store.lookup(&key) else { panic!("a hit") };
    if nix::unistd::geteuid().is_root() {
        // A whiteout (what overlayfs leaves for a deleted lower file) deletes in the new version.
        let up2 = tempfile::tempdir().unwrap();
        nix::sys::stat::mknod(
            &up2.path().join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        store.promote(&spec(&key), Some(&v1), &[up2.path().to_path_buf()], me, false, "2").unwrap();
        let Lookup::Hit { version: v2, .. } = store.lookup(&key) else { panic!("a hit") };
        assert!(!v2.join("tree/p0/gone").exists());
        assert!(v2.join("tree/p0/dir/x").exists());
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(v2.join("tree/p0/dir/x")).unwrap().uid(), crate::image::ID_BASE);
    }
    let Lookup::Hit { version, .. } = store.lookup(&key) else { panic!("a hit") };
    let meta = version.join("meta.json");
    let text = std::fs::read_to_string(&meta).unwrap().replace("\"bytes\": ", "\"bytes\": 9");
    std::fs::write(&meta, text).unwrap();
    match store.lookup(&key) {
        Lookup::Miss { why } => assert!(why.contains("checksum"), "{why}"),
        hit => panic!("{hit:?}"),
    }
    assert!(store.remove("zz").is_err());
    let (gone, kept) = store.remove(&key[..8]).unwrap();
    assert_eq!((gone.len(), kept.len()), (1, 0));
}

#[test]
fn eviction_keeps_leased_versions_within_budget() {
    let d = tempfile::tempdir().unwrap();
    let store = CacheStore::new(d.path());
    let me = nix::unistd::geteuid().as_raw();
    let mut versions = Vec::new();
    for (i, k) in ["11", "22", "33"].iter().enumerate() {
        let up = tempfile::tempdir().unwrap();
        std::fs::write(up.path().join("f"), vec![b'x'; 1000]).unwrap();
        let key = k.repeat(32);
        store.promote(&spec(&key), None, &[up.path().to_path_buf()], me, false, &i.to_string()).unwrap();
        let Lookup::Hit { version, .. } = store.lookup(&key) else { panic!("a hit") };
        versions.push(version);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The oldest is in use: the budget (one version) takes the next two instead.
    store.lease("sb-old", &versions[..1]).unwrap();
    let gone = store.prune(1000, false, |s| s != "sb-old").unwrap();
    assert_eq!(gone.len(), 2, "{gone:?}");
    assert!(versions[0].exists(), "a version in use is never evicted");
    // Once its sandbox is gone, the janitor drops the lease and may evict it.
    let gone = store.prune(500, false, |_| true).unwrap();
    assert_eq!(gone.len(), 1, "{gone:?}");
}

/// An upper layer that came back from a guest (whiteouts as `.wh.<name>` files, opaque
/// directories with `.wh..wh..opq`) applies as the overlay layer it was; a base version gone
/// under a promotion fails it rather than saving the upper alone; a version's microVM disk
/// counts in its size and a changed one is found by `verify`; a job's lease before its sandbox
/// exists holds until it lapses.
#[test]
fn guest_uppers_disks_and_boot_leases() {
    let d = tempfile::tempdir().unwrap();
    let store = CacheStore::new(d.path());
    let key = "ef".repeat(32);
    let me = nix::unistd::geteuid().as_raw();
    let up = tempfile::tempdir().unwrap();
    for dir in ["keep", "opq"] {
        std::fs::create_dir(up.path().join(dir)).unwrap();
        std::fs::write(up.path().join(dir).join("old"), "o").unwrap();
    }
    std::fs::write(up.path().join("gone"), "g").unwrap();
    store.promote(&spec(&key), None, &[up.path().to_path_buf()], me, true, "1").unwrap();
    let Lookup::Hit { version: v1, .. } = store.lookup(&key) else { panic!("a hit") };
    let up2 = tempfile::tempdir().unwrap();
    let u = up2.path();
    std::fs::write(u.join(".wh.gone"), "").unwrap();
    std::fs::write(u.join(".wh.."), "").unwrap();
    std::fs::create_dir(u.join("opq")).unwrap();
    std::fs::write(u.join("opq/.wh..wh..opq"), "").unwrap();
    std::fs::write(u.join("opq/new"), "n").unwrap();
    std::fs::create_dir(u.join("keep")).unwrap();
    std::fs::write(u.join("keep/new"), "n").unwrap();
    store.promote(&spec(&key), Some(&v1), &[u.to_path_buf()], me, true, "2").unwrap();
    let Lookup::Hit { version: v2, .. } = store.lookup(&key) else { panic!("a hit") };
    let t = v2.join("tree/p0");
    assert!(!t.join("gone").exists() && !t.join(".wh.gone").exists());
    assert!(t.join("keep/old").exists() && t.join("keep/new").exists());
    assert!(
        !t.join("opq/old").exists() && t.join("opq/new").exists() && !t.join("opq/.wh..wh..opq").exists()
    );
    assert!(t.join(".wh..").is_file(), "`..` is never a whiteout's name: kept as a plain file");
    assert!(d.path().exists());
    // The base went (v1 was replaced and not leased): a promotion on it fails.
    assert!(!v1.exists());
    let err = store.promote(&spec(&key), Some(&v1), &[u.to_path_buf()], me, true, "3").unwrap_err();
    assert!(format!("{err:#}").contains("is gone"), "{err:#}");
    // A microVM disk counts, and verify finds one changed.
    let before = store.list().unwrap()[0].bytes;
    std::fs::write(v2.join(VM_DISK), vec![7u8; 8192]).unwrap();
    std::fs::write(v2.join(VM_DISK_SHA256), sha256_file(&v2.join(VM_DISK)).unwrap()).unwrap();
    assert!(store.list().unwrap()[0].bytes >= before + 8192);
    assert!(store.verify().unwrap().is_empty());
    std::fs::write(v2.join(VM_DISK), vec![8u8; 8192]).unwrap();
    let bad = store.verify().unwrap();
    assert!(bad[0].1.contains("microVM disk"), "{bad:?}");
    // A boot lease holds even though no sandbox of its name exists.
    store.lease("boot-7-q", std::slice::from_ref(&v2)).unwrap();
    store.prune(0, false, |_| true).unwrap();
    assert!(v2.exists(), "held by the job until its VM exists");
}
