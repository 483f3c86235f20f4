//! Test skips that CI can forbid: a test that cannot run on this machine (no root, no runc, no
//! QEMU...) says so with `SKIPPED`, unless `EXECUTOR_TEST_REQUIRE` lists the capability it lacks,
//! in which case the missing capability is a failure. Shared by the unit tests and the
//! integration tests so that both read the variable the same way.

/// The variable: capability names separated by commas (`root,runc,microvm`).
pub const REQUIRE_VAR: &str = "EXECUTOR_TEST_REQUIRE";

/// Every capability a test may skip for, and what it means.
pub const CAPABILITIES: &[(&str, &str)] = &[
    ("root", "running as root (user namespaces, mounts, cgroups)"),
    ("runc", "the runc OCI runtime"),
    ("crun", "the crun OCI runtime"),
    ("runsc", "the runsc (gVisor) OCI runtime"),
    ("gcc", "gcc with a static libc, to build the escape probe helper"),
    ("ext4", "mkfs.ext4, for loop-mounted workspace disks"),
    ("microvm", "QEMU and the tools `executor install vm` needs (TCG is enough)"),
    ("dpkg-deb", "dpkg-deb, to build and inspect the Debian package"),
    ("openssl", "the openssl command, to make test certificates"),
    ("chromium", "Chromium and chromedriver, for the admin console's browser tests"),
    ("registry", "docker-registry, skopeo and htpasswd, for a loopback image registry"),
    ("netns", "network namespaces, nftables, dnsmasq and python3, for the per-job network tests"),
    ("fuzz", "a nightly Rust toolchain and cargo-fuzz, for the fuzz targets' smoke run"),
    ("postgres", "PostgreSQL (initdb, pg_ctl) and a postgres user, for the coordinator's PostgreSQL backend"),
];

/// The capabilities `list` (the variable's value) requires; an unknown name is an error so that
/// a typo cannot quietly require nothing.
pub fn parse(list: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        if !CAPABILITIES.iter().any(|(known, _)| *known == name) {
            let known: Vec<&str> = CAPABILITIES.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "{REQUIRE_VAR} lists {name:?}, which no test knows (known: {})",
                known.join(",")
            ));
        }
        out.push(name.to_string());
    }
    Ok(out)
}

/// What to do when `test` lacks `capability` (because `why`), given the variable's value: `Ok`
/// with the skip notice, or `Err` with the failure when the capability is required.
pub fn decide(list: Option<&str>, test: &str, capability: &str, why: &str) -> Result<String, String> {
    assert!(
        CAPABILITIES.iter().any(|(known, _)| *known == capability),
        "skip for an unknown capability {capability:?}: add it to testkit::skip::CAPABILITIES"
    );
    let required = parse(list.unwrap_or(""))?;
    if required.iter().any(|r| r == capability) {
        return Err(format!("{REQUIRE_VAR} lists {capability} but {test} cannot run: {why}"));
    }
    Ok(format!("SKIPPED {test}: {why} (needs {capability})"))
}

/// Says that `test` is skipped for lacking `capability`; panics instead when the environment's
/// `EXECUTOR_TEST_REQUIRE` lists it. The caller returns right after.
#[track_caller]
pub fn skip(test: &str, capability: &str, why: &str) {
    let list = std::env::var(REQUIRE_VAR).ok();
    match decide(list.as_deref(), test, capability, why) {
        Ok(notice) => eprintln!("{notice}"),
        Err(failure) => panic!("{failure}"),
    }
}

/// Whether this process runs as root; for the tests that need it.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_capability_fails_and_others_skip() {
        let fail = decide(Some("root, runc"), "t", "runc", "runc is not installed").unwrap_err();
        assert_eq!(fail, "EXECUTOR_TEST_REQUIRE lists runc but t cannot run: runc is not installed");
        let notice = decide(Some("root,runc"), "t", "crun", "crun is not installed").unwrap();
        assert_eq!(notice, "SKIPPED t: crun is not installed (needs crun)");
        assert!(decide(None, "t", "root", "needs root").is_ok());
        assert!(decide(Some(""), "t", "root", "needs root").is_ok());
        assert!(decide(Some(",root,"), "t", "root", "needs root").is_err());
    }

    #[test]
    fn unknown_names_are_errors() {
        let err = decide(Some("root,rnuc"), "t", "crun", "no crun").unwrap_err();
        assert!(err.contains("\"rnuc\"") && err.contains("known: root,runc"), "{err}");
        assert!(parse("root,runc,crun,runsc,gcc,ext4,microvm,dpkg-deb,openssl,chromium,registry,netns,fuzz")
            .is_ok());
    }

    #[test]
    #[should_panic(expected = "unknown capability")]
    fn skipping_for_an_unlisted_capability_is_a_bug() {
        let _ = decide(None, "t", "kvm", "no kvm");
    }
}
