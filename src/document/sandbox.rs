//! The sandbox part of the run document: which runtime holds the job's sandbox, where it lives,
//! and what the runtime recorded about it. The document keeps that record opaque (the runtime's
//! name and its details as JSON): each runtime in `sandbox` owns and decodes its own record
//! type, so the document, a layer below the runtimes, names none of them.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A sandbox runtime.
///
/// It lives here, below `sandbox`, because the run document itself names it: the executor that
/// dequeued a job records its runtime ([`super::ExecutorIdentity::runtime`]) and every sandbox
/// record says which runtime owns it. The runtimes themselves (and the operator's choice among
/// them, `sandbox::RuntimeChoice`) live in `sandbox`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeKind {
    /// No isolation: development only.
    Shell,
    /// A container per step (runc, crun or runsc).
    Oci,
    /// A QEMU microVM per job.
    Microvm,
}

impl RuntimeKind {
    pub const ALL: [RuntimeKind; 3] = [RuntimeKind::Shell, RuntimeKind::Oci, RuntimeKind::Microvm];

    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Shell => "shell",
            RuntimeKind::Oci => "oci",
            RuntimeKind::Microvm => "microvm",
        }
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match RuntimeKind::ALL.into_iter().find(|k| k.name() == s) {
            Some(k) => Ok(k),
            None => bail!("{s:?} is not one of shell, oci, microvm"),
        }
    }
}

/// A running sandbox as recorded in the run document. Everything a later process needs to reach
/// it again, and nothing secret. In JSON: `runtime`, `name`, `stateDir`, optional `pid`, and the
/// runtime's `details`, which only the runtime reads (`sandbox::RecordDetails`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SandboxRecord {
    /// The runtime that owns the sandbox.
    pub runtime: RuntimeKind,
    /// `<prefix>-<uuid>`: the janitor removes sandboxes with the prefix that no live job owns.
    pub name: String,
    /// The runtime's private directory for this sandbox.
    pub state_dir: PathBuf,
    /// A long-lived process the sandbox depends on (QEMU, a supervisor), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// What the runtime recorded, in its own shape; `null` (left out) while it has recorded
    /// nothing (a microVM before QEMU started, a sandbox the janitor found without its record).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub details: serde_json::Value,
}

impl SandboxRecord {
    /// A record of `runtime`'s sandbox with no details yet.
    pub fn new(
        runtime: RuntimeKind,
        name: impl Into<String>,
        state_dir: impl Into<PathBuf>,
    ) -> SandboxRecord {
        SandboxRecord {
            runtime,
            name: name.into(),
            state_dir: state_dir.into(),
            pid: None,
            details: serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_names_round_trip() {
        for k in RuntimeKind::ALL {
            assert_eq!(k.name().parse::<RuntimeKind>().unwrap(), k);
            assert_eq!(serde_json::to_value(k).unwrap(), k.name());
        }
        assert!("auto".parse::<RuntimeKind>().is_err());
        assert!("docker".parse::<RuntimeKind>().unwrap_err().to_string().contains("shell, oci, microvm"));
    }

    #[test]
    fn records_keep_their_json_shape() {
        let mut rec = SandboxRecord::new(RuntimeKind::Shell, "executor-1", "/s/executor-1");
        rec.details = serde_json::json!({"workspace": "/w"});
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"runtime": "shell", "name": "executor-1", "stateDir": "/s/executor-1",
                               "details": {"workspace": "/w"}})
        );
        assert_eq!(serde_json::from_value::<SandboxRecord>(v).unwrap(), rec);
        // The field order on disk is the one it always was.
        let text = serde_json::to_string(&rec).unwrap();
        assert_eq!(
            text,
            r#"{"runtime":"shell","name":"executor-1","stateDir":"/s/executor-1","details":{"workspace":"/w"}}"#
        );
        let booting = serde_json::json!({"runtime": "microvm", "name": "n", "stateDir": "/s", "pid": 7});
        let rec: SandboxRecord = serde_json::from_value(booting.clone()).unwrap();
        assert!(rec.details.is_null());
        assert_eq!(rec.pid, Some(7));
        assert_eq!(serde_json::to_value(&rec).unwrap(), booting);
        let unknown = serde_json::json!({"runtime": "docker", "name": "n", "stateDir": "/s"});
        assert!(serde_json::from_value::<SandboxRecord>(unknown).is_err());
        let extra = serde_json::json!({"runtime": "oci", "name": "n", "stateDir": "/s", "x": 1});
        assert!(serde_json::from_value::<SandboxRecord>(extra).is_err());
    }
}
