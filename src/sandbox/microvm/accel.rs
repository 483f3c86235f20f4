//! Choosing the accelerator of a microVM: KVM where it was asked for or where a real guest boots
//! under it (the KVM boot probe, cached per guest kernel), TCG where it was asked for or allowed.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::boot::VmBoot;
use super::{Accel, MicroVm};
use crate::sandbox::{Limits, Runtime};

/// The cached answer of the KVM boot probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KvmProbe {
    pub works: bool,
    pub detail: String,
    pub kernel_version: String,
}

impl MicroVm {
    /// Chooses the accelerator and says why.
    pub fn choose_accel(&self) -> Result<(Accel, String)> {
        match self.opts.vm_accel {
            Accel::Kvm => Ok((Accel::Kvm, "--accel kvm was asked for".into())),
            Accel::Tcg => Ok((Accel::Tcg, "--accel tcg was asked for (software emulation: slow)".into())),
            Accel::Auto => {
                let probe = self.kvm_probe()?;
                if probe.works {
                    Ok((Accel::Kvm, format!("the KVM boot probe passed ({})", probe.detail)))
                } else if self.opts.vm_allow_tcg {
                    Ok((
                        Accel::Tcg,
                        format!("KVM is unusable ({}); TCG allowed by EXECUTOR_VM_ALLOW_TCG", probe.detail),
                    ))
                } else {
                    bail!(
                        "KVM is unusable here ({}) and TCG is not allowed (set EXECUTOR_VM_ALLOW_TCG=1 or --accel tcg \
                         to accept slow software emulation)",
                        probe.detail
                    )
                }
            }
        }
    }

    /// The KVM boot probe, cached under `vm/kvm-probe.json` per guest kernel.
    pub fn kvm_probe(&self) -> Result<KvmProbe> {
        let manifest = crate::vm::installed(&self.opts.state_dir)?;
        let path = self.vm_dir().join("kvm-probe.json");
        if let Some(p) =
            fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<KvmProbe>(&t).ok())
        {
            if p.kernel_version == manifest.kernel_version {
                return Ok(p);
            }
        }
        let (works, detail) = if fs::File::options().read(true).write(true).open("/dev/kvm").is_err() {
            (false, "/dev/kvm cannot be opened".to_string())
        } else if Path::new("/sys/module/kvm_pvm").exists() {
            // KVM-PVM emulates an unmodified guest's ring 0 and then pauses the VM: see docs.
            (false, "/dev/kvm is KVM-PVM, which cannot run an unmodified guest kernel".to_string())
        } else {
            let start = Instant::now();
            let limits = Limits::default();
            let res = self.boot_vm(
                &format!("probe-{}", uuid::Uuid::new_v4()),
                &VmBoot::new(None, &[], Accel::Kvm, String::new(), &limits, Duration::from_secs(15)),
            );
            match res {
                Ok(rec) => {
                    let _ = self.teardown(&rec);
                    (true, format!("a KVM guest answered in {} ms", start.elapsed().as_millis()))
                }
                Err(e) => (false, format!("a KVM guest did not boot: {e:#}")),
            }
        };
        let p = KvmProbe { works, detail, kernel_version: manifest.kernel_version };
        fs::create_dir_all(self.vm_dir()).ok();
        let _ = crate::base::fs::write_atomic(&path, &serde_json::to_vec_pretty(&p).unwrap_or_default());
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accel_parses_and_prints() {
        for a in [Accel::Auto, Accel::Kvm, Accel::Tcg] {
            assert_eq!(a.to_string().parse::<Accel>().unwrap(), a);
        }
        assert!("hvf".parse::<Accel>().is_err());
    }
}
