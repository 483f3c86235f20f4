//! Typed values of the sandbox settings that are more than a number or a path: which OCI
//! runtime the `oci` sandbox drives (`EXECUTOR_OCI_RUNTIME`).

use anyhow::{bail, Result};

/// The OCI runtime of the `oci` sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OciRuntime {
    #[default]
    Runc,
    Crun,
    /// gVisor.
    Runsc,
}

impl OciRuntime {
    pub const DEFAULT: OciRuntime = OciRuntime::Runc;

    /// The runtime's command name (`runc`, `crun`, `runsc`).
    pub const fn as_str(self) -> &'static str {
        match self {
            OciRuntime::Runc => "runc",
            OciRuntime::Crun => "crun",
            OciRuntime::Runsc => "runsc",
        }
    }
}

impl std::str::FromStr for OciRuntime {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<OciRuntime> {
        match s {
            "runc" => Ok(OciRuntime::Runc),
            "crun" => Ok(OciRuntime::Crun),
            "runsc" => Ok(OciRuntime::Runsc),
            other => bail!("unknown OCI runtime {other:?} (want one of runc, crun, runsc)"),
        }
    }
}

impl std::fmt::Display for OciRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_match_the_oci_sandbox() {
        for name in super::super::oci::OCI_RUNTIMES {
            assert_eq!(name.parse::<OciRuntime>().unwrap().as_str(), *name);
        }
        assert_eq!(OciRuntime::DEFAULT.as_str(), super::super::oci::DEFAULT_OCI_RUNTIME);
        assert!("docker".parse::<OciRuntime>().is_err());
    }
}
