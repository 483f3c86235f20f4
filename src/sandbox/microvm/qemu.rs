//! The QEMU command line of a microVM, built from a typed description ([`QemuConfig`]) by a pure
//! function ([`QemuConfig::argv`]): no I/O, so that every argument QEMU gets is unit-tested
//! without QEMU. The descriptors it names (kernel, initramfs, console pipe, image disks, TAP) are
//! opened and handed over by the boot (boot.rs); the paths it names are relative to QEMU's
//! working directory, the VM's sandbox directory.

use super::Accel;
use crate::guest::protocol::PORT_NAME;

/// The QEMU binary; the small `-microvm` build is KVM-only, so TCG needs the full one.
pub const QEMU: &str = "qemu-system-x86_64";
/// The machine: no option ROMs. ACPI stays: the guest finds its virtio-mmio devices through it
/// (the Debian kernel cannot take them from its command line). The CMOS RTC stays too: without
/// it the kernel waits about two seconds of TCG time for an RTC update that never comes, and the
/// guest's clock starts in 1970.
pub const MACHINE: &str = "microvm,x-option-roms=off";
/// The workspace disk's file in the sandbox directory.
pub(crate) const WORKSPACE_DISK: &str = "workspace.ext4";
/// The agent's socket in the sandbox directory (relative: a socket address holds 108 bytes).
pub(crate) const AGENT_SOCKET: &str = "agent.sock";
/// The QMP monitor's socket of a snapshot template VM, in its sandbox directory.
pub(crate) const QMP_SOCKET: &str = "qmp.sock";

/// Everything QEMU is told about one VM. Descriptors are the executor's own, kept open across
/// the exec (`/proc/self/fd/N` in QEMU is the same file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QemuConfig {
    /// The VM's name (`-name`), by which the janitor finds its process.
    pub name: String,
    /// `Kvm`, or software emulation for anything else.
    pub accel: Accel,
    pub memory_bytes: u64,
    pub cpus: u32,
    /// The guest kernel and initramfs, open read-only.
    pub kernel_fd: i32,
    pub initrd_fd: i32,
    /// The guest kernel's command line (`crate::guest::boot::BootParams::to_cmdline`).
    pub cmdline: String,
    /// The write end of the console pipe (console.rs).
    pub console_fd: i32,
    /// Whether the VM has a workspace disk ([`WORKSPACE_DISK`]).
    pub workspace_disk: bool,
    /// The image disks in the guest's order (`image0`, `image1`, ...), open read-only.
    pub image_fds: Vec<i32>,
    /// The job network's TAP (net.rs), if the VM has a network.
    pub tap_fd: Option<i32>,
    /// A snapshot template (snapshot.rs): a QMP monitor ([`QMP_SOCKET`]) through which the
    /// host saves it.
    pub monitor: bool,
    /// A VM restored from a snapshot: the read end of the pipe its saved state comes through
    /// (`-incoming fd:N`; with `ram`, `-incoming defer` and the host starts it over QMP once
    /// `x-ignore-shared` is set). The rest of the command line is the template's, device for
    /// device.
    pub incoming_fd: Option<i32>,
    /// The guest's RAM in a file of the executor's (snapshot/ram.rs): its descriptor, and whether
    /// the guest writes into it (`share=on`, a template) or into pages of its own (`share=off`,
    /// copy-on-write: a restored VM).
    pub ram: Option<(i32, bool)>,
}

impl QemuConfig {
    /// QEMU's arguments (without the program name), in the order QEMU has always been given them.
    pub(crate) fn argv(&self) -> Vec<String> {
        let fd_path = |fd: i32| format!("/proc/self/fd/{fd}");
        let mut a: Vec<String> = Vec::new();
        let mut push = |args: &[&str]| a.extend(args.iter().map(|s| s.to_string()));
        let machine = match self.ram {
            Some(_) => format!("{MACHINE},memory-backend=ram0"),
            None => MACHINE.to_string(),
        };
        push(&["-name", &self.name, "-M", &machine, "-nodefaults", "-no-user-config"]);
        // QEMU's own seccomp filter, before anything else it is told.
        push(&["-sandbox", super::jail::SANDBOX]);
        push(&[
            "-display",
            "none",
            "-no-reboot",
            "-m",
            &format!("{}M", self.memory_bytes >> 20),
            "-smp",
            &self.cpus.to_string(),
        ]);
        if let Some((fd, shared)) = self.ram {
            let share = if shared { "on" } else { "off" };
            push(&[
                "-object",
                &format!(
                    "memory-backend-file,id=ram0,size={}M,mem-path={},share={share}",
                    self.memory_bytes >> 20,
                    fd_path(fd)
                ),
            ]);
        }
        match self.accel {
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            _ => push(&["-accel", "tcg", "-cpu", "max"]),
        }
        push(&["-kernel", &fd_path(self.kernel_fd), "-initrd", &fd_path(self.initrd_fd)]);
        push(&["-append", &self.cmdline]);
        push(&["-serial", &format!("file:{}", fd_path(self.console_fd))]);
        if self.workspace_disk {
            push(&["-drive", &format!("id=workspace,file={WORKSPACE_DISK},format=raw,if=none")]);
            push(&["-device", "virtio-blk-device,drive=workspace,serial=workspace"]);
        }
        for (i, fd) in self.image_fds.iter().enumerate() {
            // Through an fd set: the image files need not be readable by QEMU's user.
            let set = i + 1;
            push(&["-add-fd", &format!("fd={fd},set={set},opaque=image{i}")]);
            push(&["-drive", &format!("id=image{i},file=/dev/fdset/{set},format=raw,if=none,readonly=on")]);
            push(&["-device", &format!("virtio-blk-device,drive=image{i},serial=image{i}")]);
        }
        push(&["-device", "virtio-serial-device"]);
        if let Some(tap) = self.tap_fd {
            // A virtio-net device on the microvm machine's MMIO bus.
            push(&["-netdev", &format!("tap,id=net0,fd={tap},vhost=off")]);
            push(&["-device", "virtio-net-device,netdev=net0"]);
        }
        push(&["-chardev", &format!("socket,id=agent,path={AGENT_SOCKET},server=on,wait=off")]);
        push(&["-device", &format!("virtserialport,chardev=agent,name={PORT_NAME}")]);
        if self.monitor {
            push(&["-qmp", &format!("unix:{QMP_SOCKET},server=on,wait=off")]);
        }
        match (self.incoming_fd, self.ram) {
            (Some(_), Some(_)) => push(&["-incoming", "defer"]),
            (Some(fd), None) => push(&["-incoming", &format!("fd:{fd}")]),
            (None, _) => {}
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> QemuConfig {
        QemuConfig {
            name: "executor-1".into(),
            accel: Accel::Tcg,
            memory_bytes: 512 << 20,
            cpus: 2,
            kernel_fd: 5,
            initrd_fd: 6,
            cmdline: "console=ttyS0 quiet".into(),
            console_fd: 7,
            workspace_disk: true,
            image_fds: vec![8, 9],
            tap_fd: None,
            monitor: false,
            incoming_fd: None,
            ram: None,
        }
    }

    /// The argv the runtime gave QEMU before the builder existed, for one VM with a workspace
    /// and two images under TCG, with QEMU's seccomp filter since issue 24: pinned word for word.
    #[test]
    fn the_argv_is_the_one_qemu_always_got() {
        let want = [
            "-name",
            "executor-1",
            "-M",
            "microvm,x-option-roms=off",
            "-nodefaults",
            "-no-user-config",
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-display",
            "none",
            "-no-reboot",
            "-m",
            "512M",
            "-smp",
            "2",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-kernel",
            "/proc/self/fd/5",
            "-initrd",
            "/proc/self/fd/6",
            "-append",
            "console=ttyS0 quiet",
            "-serial",
            "file:/proc/self/fd/7",
            "-drive",
            "id=workspace,file=workspace.ext4,format=raw,if=none",
            "-device",
            "virtio-blk-device,drive=workspace,serial=workspace",
            "-add-fd",
            "fd=8,set=1,opaque=image0",
            "-drive",
            "id=image0,file=/dev/fdset/1,format=raw,if=none,readonly=on",
            "-device",
            "virtio-blk-device,drive=image0,serial=image0",
            "-add-fd",
            "fd=9,set=2,opaque=image1",
            "-drive",
            "id=image1,file=/dev/fdset/2,format=raw,if=none,readonly=on",
            "-device",
            "virtio-blk-device,drive=image1,serial=image1",
            "-device",
            "virtio-serial-device",
            "-chardev",
            "socket,id=agent,path=agent.sock,server=on,wait=off",
            "-device",
            "virtserialport,chardev=agent,name=executor.agent",
        ];
        assert_eq!(config().argv(), want);
    }

    fn after<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn kvm_takes_the_host_cpu_and_anything_else_emulates() {
        let mut c = config();
        c.accel = Accel::Kvm;
        let kvm = c.argv();
        assert_eq!(after(&kvm, "-accel"), ["kvm"]);
        assert_eq!(after(&kvm, "-cpu"), ["host"]);
        for accel in [Accel::Tcg, Accel::Auto] {
            c.accel = accel;
            let a = c.argv();
            assert_eq!((after(&a, "-accel"), after(&a, "-cpu")), (vec!["tcg"], vec!["max"]));
        }
    }

    #[test]
    fn a_network_is_one_tap_device_before_the_agent_port() {
        let mut c = config();
        assert!(after(&c.argv(), "-netdev").is_empty());
        assert!(!c.argv().iter().any(|a| a.contains("virtio-net")));
        c.tap_fd = Some(11);
        let a = c.argv();
        assert_eq!(after(&a, "-netdev"), ["tap,id=net0,fd=11,vhost=off"]);
        let devices = after(&a, "-device");
        let net = devices.iter().position(|d| *d == "virtio-net-device,netdev=net0").unwrap();
        let serial = devices.iter().position(|d| *d == "virtio-serial-device").unwrap();
        assert_eq!(net, serial + 1, "{devices:?}");
        assert!(devices.last().unwrap().starts_with("virtserialport,"));
    }

    #[test]
    fn disks_come_workspace_first_then_images_in_order() {
        let mut c = config();
        c.image_fds = vec![20, 21, 22];
        let argv = c.argv();
        let drives = after(&argv, "-drive");
        let ids: Vec<&str> = drives.iter().map(|d| d.split(',').next().unwrap()).collect();
        assert_eq!(ids, ["id=workspace", "id=image0", "id=image1", "id=image2"]);
        assert_eq!(after(&argv, "-add-fd")[2], "fd=22,set=3,opaque=image2");
        // Image disks are read-only; the workspace is not.
        assert!(drives[1..].iter().all(|d| d.ends_with("readonly=on")) && !drives[0].contains("readonly"));
        c.workspace_disk = false;
        c.image_fds.clear();
        assert!(after(&c.argv(), "-drive").is_empty());
    }

    #[test]
    fn a_template_has_a_monitor_and_a_restore_its_incoming_stream_last() {
        let mut c = config();
        let plain = c.argv();
        c.monitor = true;
        let t = c.argv();
        assert_eq!(&t[..plain.len()], &plain[..], "the template's devices are the VM's");
        assert_eq!(&t[plain.len()..], ["-qmp", "unix:qmp.sock,server=on,wait=off"]);
        c.monitor = false;
        c.incoming_fd = Some(12);
        let r = c.argv();
        assert_eq!(&r[..plain.len()], &plain[..], "a restore has the template's devices");
        assert_eq!(&r[plain.len()..], ["-incoming", "fd:12"]);
    }

    /// The template writes into the executor's RAM file, a restored VM maps it privately and
    /// waits for the host to start its incoming migration; both name the same backend.
    #[test]
    fn shared_ram_is_the_backend_of_template_and_restore_alike() {
        let mut c = config();
        c.monitor = true;
        c.ram = Some((20, true));
        let t = c.argv();
        assert_eq!(after(&t, "-M"), ["microvm,x-option-roms=off,memory-backend=ram0"]);
        assert_eq!(
            after(&t, "-object"),
            ["memory-backend-file,id=ram0,size=512M,mem-path=/proc/self/fd/20,share=on"]
        );
        assert!(after(&t, "-incoming").is_empty());
        c.ram = Some((20, false));
        c.incoming_fd = Some(12);
        let r = c.argv();
        assert_eq!(
            after(&r, "-object"),
            ["memory-backend-file,id=ram0,size=512M,mem-path=/proc/self/fd/20,share=off"]
        );
        assert_eq!(after(&r, "-incoming"), ["defer"]);
        let strip = |a: &[String]| -> Vec<String> {
            a.iter()
                .filter(|x| !x.contains("share=") && *x != "-object" && *x != "-incoming" && *x != "defer")
                .cloned()
                .collect()
        };
        assert_eq!(strip(&t), strip(&r), "the same devices");
    }

    #[test]
    fn sizes_are_mebibytes_and_the_command_line_is_one_argument() {
        let mut c = config();
        c.memory_bytes = 3 << 30;
        c.cpus = 4;
        c.cmdline = "console=ttyS0 panic=-1 executor.images=2".into();
        let a = c.argv();
        assert_eq!((after(&a, "-m"), after(&a, "-smp")), (vec!["3072M"], vec!["4"]));
        assert_eq!(after(&a, "-append"), ["console=ttyS0 panic=-1 executor.images=2"]);
    }
}
