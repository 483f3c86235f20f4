//! What makes one VM its own inside the guest: its machine id (`/etc/machine-id`, also put into
//! every step's root), and for a VM restored from a snapshot the host's `Reseed`: fresh entropy
//! mixed into the kernel's RNG and a CRNG reseed, and the host's clock. Without the reseed two
//! VMs restored from one snapshot would continue the same RNG state and hand their jobs the
//! same random stream.

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::Path;

use super::protocol::Reseed;

/// The guest's machine id file.
const MACHINE_ID: &str = "/etc/machine-id";

/// Whether `id` is a machine id: 32 lowercase hex digits, not all zero.
pub(crate) fn valid_machine_id(id: &str) -> bool {
    id.len() == 32
        && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0')
}

/// A fresh machine id from the kernel's RNG (a cold-booted VM's own).
pub(crate) fn new_machine_id() -> Result<String> {
    let mut b = [0u8; 16];
    read_random(&mut b)?;
    Ok(hex(&b))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("the seed is not hex");
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("the seed is not hex"))
        .collect()
}

fn read_random(buf: &mut [u8]) -> Result<()> {
    use std::io::Read;
    fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(buf)).context("reading /dev/urandom")
}

/// Writes the guest's machine id.
pub(crate) fn set_machine_id(id: &str) -> Result<()> {
    if !valid_machine_id(id) {
        bail!("{id:?} is not a machine id");
    }
    fs::create_dir_all("/etc").context("creating /etc")?;
    fs::write(MACHINE_ID, format!("{id}\n")).with_context(|| format!("writing {MACHINE_ID}"))
}

/// Puts the VM's machine id into a step's (writable) root, replacing the image's.
pub(crate) fn write_machine_id(root: &Path) -> Result<()> {
    copy_machine_id(Path::new(MACHINE_ID), root)
}

fn copy_machine_id(source: &Path, root: &Path) -> Result<()> {
    let Ok(text) = fs::read_to_string(source) else { return Ok(()) };
    let etc = root.join("etc");
    fs::create_dir_all(&etc).context("creating /etc in the step's root")?;
    let target = etc.join("machine-id");
    // The image's may be a symlink: it is replaced, not followed.
    if fs::symlink_metadata(&target).is_ok() {
        fs::remove_file(&target).context("replacing the image's /etc/machine-id")?;
    }
    fs::write(&target, text).context("writing the step's /etc/machine-id")
}

/// Carries out the host's `Reseed`: entropy first (nothing random is drawn before it), then the
/// clock and the machine id.
pub(crate) fn reseed(r: &Reseed) -> Result<()> {
    let seed = unhex(&r.seed)?;
    if seed.len() < 32 {
        bail!("the seed has {} bytes, fewer than 32", seed.len());
    }
    let dev = fs::OpenOptions::new().write(true).open("/dev/urandom").context("opening /dev/urandom")?;
    crate::base::sys::reseed_kernel_rng(&dev, &seed).context("reseeding the kernel's RNG")?;
    let ts =
        nix::sys::time::TimeSpec::new((r.unix_ms / 1000) as i64, ((r.unix_ms % 1000) * 1_000_000) as i64);
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).context("setting the clock")?;
    set_machine_id(&r.machine_id)
}

/// The host's side: a `Reseed` with 64 bytes of the host's randomness, its clock, a fresh
/// machine id from the host's RNG, and the VM's network, if it has one.
pub(crate) fn host_reseed(id: u32, net: Option<&super::boot::GuestNet>) -> Result<Reseed> {
    let mut seed = [0u8; 64];
    read_random(&mut seed)?;
    let unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("reading the host's clock")?
        .as_millis() as u64;
    Ok(Reseed {
        id,
        seed: hex(&seed),
        unix_ms,
        machine_id: new_machine_id()?,
        net: net.map(|n| n.to_value()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ids_are_32_lowercase_hex_digits_and_fresh() {
        let a = new_machine_id().unwrap();
        let b = new_machine_id().unwrap();
        assert!(valid_machine_id(&a) && valid_machine_id(&b) && a != b);
        for bad in ["", "0".repeat(32).as_str(), &"A".repeat(32), &"a".repeat(31), "../../etc/passwd"] {
            assert!(!valid_machine_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_host_reseed_is_fresh_and_well_formed() {
        let a = host_reseed(1, None).unwrap();
        let b = host_reseed(2, None).unwrap();
        assert_ne!(a.seed, b.seed);
        assert_ne!(a.machine_id, b.machine_id);
        assert_eq!(unhex(&a.seed).unwrap().len(), 64);
        assert!(unhex("zz").is_err() && unhex("abc").is_err());
        assert!(a.unix_ms > 1_700_000_000_000);
        assert_eq!(a.net, None);
        let n = super::super::boot::GuestNet::parse("10.255.0.6/30,10.255.0.5,192.0.2.53").unwrap();
        let c = host_reseed(3, Some(&n)).unwrap();
        assert_eq!(c.net.as_deref(), Some("10.255.0.6/30,10.255.0.5,192.0.2.53"));
        let wire = serde_json::to_string(&a).unwrap();
        assert!(!wire.contains("net"), "a VM without a network gets no net field: {wire}");
    }

    #[test]
    fn a_steps_machine_id_replaces_the_images_link() {
        let d = tempfile::tempdir().unwrap();
        let source = d.path().join("machine-id");
        std::fs::write(&source, "0123456789abcdef0123456789abcdef\n").unwrap();
        let root = d.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        std::os::unix::fs::symlink(&victim, root.join("etc/machine-id")).unwrap();
        copy_machine_id(&source, &root).unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/machine-id")).unwrap(),
            "0123456789abcdef0123456789abcdef\n"
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        // No id of the guest's own: the image's stays.
        let bare = d.path().join("bare");
        copy_machine_id(&d.path().join("none"), &bare).unwrap();
        assert!(!bare.join("etc").exists());
    }
}
