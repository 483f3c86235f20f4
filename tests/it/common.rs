//! Shared test helpers: the binary under test, temporary directories, and skip notices.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

/// The `executor` binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_executor"))
}

/// A command for the binary with a clean `EXECUTOR_*` environment.
pub fn executor() -> Command {
    let mut c = Command::new(bin());
    for (k, _) in std::env::vars() {
        if k.starts_with("EXECUTOR_") {
            c.env_remove(k);
        }
    }
    c.stdin(Stdio::null());
    c
}

/// Runs `cmd` to completion and returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().expect("running the executor binary")
}

/// Prints why a test is skipped; used only where the machine truly cannot run it.
pub fn skip(test: &str, why: &str) {
    eprintln!("SKIPPED {test}: {why}");
}

pub fn is_root() -> bool {
    nix_uid() == 0
}

fn nix_uid() -> u32 {
    // Avoids unsafe: /proc/self/status names the real uid.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(u32::MAX)
}

/// A CA and a certificate for 127.0.0.1 made with openssl; `None` (and a skip notice) without it.
pub fn make_ca(dir: &std::path::Path, test: &str) -> Option<(String, String, String)> {
    let p = |name: &str| dir.join(name).to_str().unwrap().to_string();
    let (ca, cert, key) = (p("ca.pem"), p("cert.pem"), p("key.pem"));
    std::fs::write(p("ext.cnf"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    let steps = [
        format!("req -x509 {ec} -days 1 -subj /CN=test-ca -keyout {} -out {ca}", p("ca.key")),
        format!("req {ec} -subj /CN=127.0.0.1 -keyout {key} -out {}", p("req.csr")),
        format!(
            "x509 -req -in {} -CA {ca} -CAkey {} -CAcreateserial -days 1 -extfile {} -out {cert}",
            p("req.csr"),
            p("ca.key"),
            p("ext.cnf")
        ),
    ];
    for step in steps {
        let args: Vec<&str> = step.split(' ').collect();
        match std::process::Command::new("openssl").args(&args).stderr(std::process::Stdio::null()).status() {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("openssl {step}: {s}"),
            Err(e) => {
                skip(test, &format!("no openssl binary: {e}"));
                return None;
            }
        }
    }
    Some((ca, cert, key))
}
