//! The workspace tarball a microVM guest sends back (`sandbox::microvm::unpack_workspace`): any
//! bytes unpack or fail without a panic, nothing lands outside the workspace, and nothing
//! unpacked keeps a setuid, setgid or sticky bit or is a device node or FIFO.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn check(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let Ok(meta) = std::fs::symlink_metadata(e.path()) else { continue };
        let t = meta.file_type();
        assert!(t.is_file() || t.is_dir() || t.is_symlink(), "{:?} is special", e.path());
        if !t.is_symlink() {
            assert_eq!(meta.permissions().mode() & 0o7000, 0, "{:?} kept a special mode", e.path());
        }
        if t.is_dir() {
            check(&e.path());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(tmp) = tempfile::tempdir() else { return };
    let ws = tmp.path().join("ws");
    let tar = tmp.path().join("ws.tar");
    if std::fs::create_dir(&ws).is_err() || std::fs::write(&tar, data).is_err() {
        return;
    }
    let Ok(file) = std::fs::File::open(&tar) else { return };
    let _ = executor::sandbox::microvm::unpack_workspace(file, &ws);
    let mut names: Vec<_> = std::fs::read_dir(tmp.path())
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    names.sort();
    assert_eq!(names, ["ws", "ws.tar"], "unpacking wrote outside the workspace");
    check(&ws);
});
