//! The Debian package: built from the test binary, it carries the binary, a man page for every
//! subcommand, the three completions, both systemd units and their 0600 configuration files.

use crate::common::{self, Exec};
use std::process::Command;

#[test]
fn deb_contains_binary_docs_units_and_private_config() {
    if which::which("dpkg-deb").is_err() {
        common::skip(
            "deb_contains_binary_docs_units_and_private_config",
            "dpkg-deb",
            "dpkg-deb is not installed",
        );
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let o = Exec::program(format!("{root}/scripts/build-deb"))
        .args(["--binary", common::bin().to_str().unwrap(), "--out", out.path().to_str().unwrap()])
        .run();
    let deb = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert!(deb.ends_with(".deb"), "{deb}");

    let listing = Command::new("dpkg-deb").args(["-c", &deb]).output().unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    for want in [
        "./usr/bin/executor",
        "./usr/lib/executor/executor-guest-agent",
        "./usr/share/man/man1/executor.1.gz",
        "./usr/share/bash-completion/completions/executor",
        "./usr/share/zsh/vendor-completions/_executor",
        "./usr/share/fish/vendor_completions.d/executor.fish",
        "./lib/systemd/system/executor.service",
        "./lib/systemd/system/executor-queue.service",
    ] {
        assert!(listing.contains(want), "{want} missing from the package:\n{listing}");
    }
    // Every visible subcommand has its page.
    for (name, _) in executor::cli::docs::render().unwrap() {
        if name.ends_with(".1") {
            assert!(listing.contains(&format!("{name}.gz")), "man page {name} missing");
        }
    }
    for conf in ["./etc/executor/executor.env", "./etc/executor/queue.env"] {
        let line = listing.lines().find(|l| l.ends_with(conf)).unwrap_or_else(|| panic!("{conf} missing"));
        assert!(line.starts_with("-rw-------"), "{conf} must be private: {line}");
    }
    let conffiles = Command::new("dpkg-deb").args(["-I", &deb, "conffiles"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&conffiles.stdout),
        "/etc/executor/executor.env\n/etc/executor/queue.env\n"
    );
    let field = Command::new("dpkg-deb").args(["-f", &deb, "Package", "Version"]).output().unwrap();
    let field = String::from_utf8_lossy(&field.stdout);
    assert!(field.contains("Package: executor"), "{field}");
    assert!(field.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))), "{field}");
}
