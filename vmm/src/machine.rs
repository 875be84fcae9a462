//! The standard machine for Linux guests: the VM, the PCIe root complex,
//! ACPI tables with the power-off device (and the vIOMMU's DMAR), the
//! vIOMMU and vDSA functions, and the loaded kernel.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use crate::acpi::{create_acpi_tables, AcpiConfig, AcpiError, AcpiSleepDevice};
use crate::boot::{load_linux, BootConfig, BootError};
use crate::devices::pvpanic::PvPanic;
use crate::devices::serial::SerialOutput;
use crate::devices::virtio::event_loop::{EventLoopError, SharedVirtioDevice};
use crate::devices::virtio::fs::FsError;
use crate::devices::virtio::transport::TransportError;
use crate::devices::virtio::{
    Console, ConsoleInput, VhostUserFs, VirtioEventLoop, VirtioPciDevice,
};
use crate::layout;
use crate::msi::KvmMsiSink;
use crate::pci_root::{PciConfigIo, PciRoot, PciRootError};
use crate::sva::{attach, AccelConfig, AccelError};
use crate::vcpu::UdHook;
use crate::vm::{RunExit, Vm, VmConfig, VmError};

/// What to boot and on what.
pub struct LinuxConfig {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Where COM1 writes.
    pub serial: SerialOutput,
    /// Give up after this long.
    pub timeout: Option<Duration>,
    /// The vIOMMU and vDSA functions.
    pub accel: AccelConfig,
    /// One virtio console device per entry, in PCI order: the guest sees
    /// them as hvc0, hvc1, ...
    pub consoles: Vec<VirtioConsole>,
    /// One virtio-fs device per entry, after the consoles.
    pub filesystems: Vec<VirtioFs>,
}

/// A virtio-fs device: the guest mounts it by `tag`; a vhost-user backend
/// (virtiofsd) listening on `socket` serves it.
pub struct VirtioFs {
    /// The mount tag.
    pub tag: String,
    /// The backend's vhost-user socket.
    pub socket: PathBuf,
}

/// A virtio console's host side.
pub struct VirtioConsole {
    /// Where the guest's output goes.
    pub output: Box<dyn Write + Send>,
    /// What the guest reads.
    pub input: Arc<ConsoleInput>,
}

/// Errors building the Linux machine; each prints as one line.
#[derive(Debug, Error)]
pub enum MachineError {
    /// The VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// The kernel or initramfs.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The vIOMMU or a vDSA.
    #[error(transparent)]
    Accel(#[from] AccelError),
    /// A PCI function could not be placed.
    #[error(transparent)]
    Pci(#[from] PciRootError),
    /// A virtio device could not be built.
    #[error(transparent)]
    Virtio(#[from] TransportError),
    /// A virtio-fs backend could not be connected.
    #[error(transparent)]
    Fs(#[from] FsError),
    /// The virtio event loop could not start.
    #[error(transparent)]
    EventLoop(#[from] EventLoopError),
    /// The pvpanic device could not be built.
    #[error("pvpanic: {0}")]
    PvPanic(#[from] pci::ConfigError),
    /// An EventFd could not be created.
    #[error("virtio console input: {0}")]
    Io(#[from] std::io::Error),
}

/// Builds the machine, boots the kernel and runs it to the end.
pub fn run_linux(config: LinuxConfig) -> Result<RunExit, MachineError> {
    // A plain boot on the terminal takes typed input on COM1; `vmm run`
    // (virtio consoles) leaves the VMM's stdin alone.
    let interactive = matches!(config.serial, SerialOutput::Stdout) && config.consoles.is_empty();
    let vm_config = VmConfig {
        cpus: config.cpus,
        memory: config.memory,
        serial: config.serial,
        ud_hook: Some(UdHook::Breakpoint),
        pasid_space: None,
    };
    let mut vm = Vm::new(vm_config)?;
    if interactive {
        forward_stdin(vm.serial().clone());
    }

    let root = attach_pci_root(&vm)?;
    let accel = attach(&vm, &root, &config.accel)?;
    add_pvpanic(&vm, &root)?;
    let mut virtio = add_virtio_consoles(&vm, &root, config.consoles)?;
    virtio.extend(add_virtio_fs(&vm, &root, &config.filesystems)?);

    let (power_off, stop) = (vm.power_off_flag(), vm.stop_flag());
    let sleep = AcpiSleepDevice::new(move || {
        power_off.store(true, Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
    });
    vm.pio()
        .insert(
            layout::ACPI_SLEEP_CONTROL_PORT.into(),
            AcpiSleepDevice::PORT_COUNT,
            Arc::new(Mutex::new(sleep)),
        )
        .map_err(VmError::from)?;

    let mut acpi = AcpiConfig::new(config.cpus);
    acpi.extra_tables.extend(accel.dmar);
    let rsdp = create_acpi_tables(vm.memory(), &acpi)?;
    let boot = BootConfig {
        kernel: config.kernel,
        initramfs: config.initramfs,
        cmdline: with_platform_params(&config.cmdline),
        rsdp: Some(rsdp),
    };
    let state = load_linux(vm.memory(), &boot)?;
    let regs = state.regs();
    vm.set_boot_state_with(regs, Box::new(move |sregs| state.apply_sregs(sregs)));
    let event_loop = if virtio.is_empty() {
        None
    } else {
        Some(VirtioEventLoop::start(&virtio)?)
    };
    let exit = vm.run(config.timeout);
    // Stopping the loop flushes what the guest queued last.
    drop(event_loop);
    Ok(exit)
}

/// The pvpanic PCI device: a guest panic ends the run as
/// [`RunExit::GuestPanic`].
fn add_pvpanic(vm: &Vm, root: &PciRoot) -> Result<(), MachineError> {
    let (panicked, stop) = (vm.panic_flag(), vm.stop_flag());
    let pvpanic = PvPanic::new(Box::new(move || {
        panicked.store(true, Ordering::SeqCst);
        stop.store(true, Ordering::SeqCst);
    }))?;
    let bdf = root.add_device(Arc::new(Mutex::new(pvpanic)))?;
    log::debug!("pvpanic at {bdf}");
    Ok(())
}

/// One virtio-console PCI function per entry of `consoles`.
fn add_virtio_consoles(
    vm: &Vm,
    root: &PciRoot,
    consoles: Vec<VirtioConsole>,
) -> Result<Vec<SharedVirtioDevice>, MachineError> {
    let msi = Arc::new(KvmMsiSink::new(vm.fd().clone()));
    let mut devices = Vec::new();
    for console in consoles {
        let device = Console::new(console.output, console.input)?;
        let pci = VirtioPciDevice::new(Box::new(device), vm.memory().clone(), msi.clone())?;
        let shared = Arc::new(Mutex::new(pci));
        let bdf = root.add_device(shared.clone())?;
        log::debug!("virtio-console at {bdf}");
        devices.push(shared);
    }
    Ok(devices)
}

/// One virtio-fs PCI function per entry of `filesystems`, each connected
/// to its vhost-user backend.
fn add_virtio_fs(
    vm: &Vm,
    root: &PciRoot,
    filesystems: &[VirtioFs],
) -> Result<Vec<SharedVirtioDevice>, MachineError> {
    let msi = Arc::new(KvmMsiSink::new(vm.fd().clone()));
    let mut devices = Vec::new();
    for fs in filesystems {
        let device = VhostUserFs::connect(&fs.socket, &fs.tag)?;
        let pci = VirtioPciDevice::new(Box::new(device), vm.memory().clone(), msi.clone())?;
        let shared = Arc::new(Mutex::new(pci));
        let bdf = root.add_device(shared.clone())?;
        log::debug!("virtio-fs '{}' at {bdf}", fs.tag);
        devices.push(shared);
    }
    Ok(devices)
}

/// Puts a PCIe root complex on `vm`'s buses: ECAM, the 0xCF8/0xCFC ports
/// and the BAR windows.
pub fn attach_pci_root(vm: &Vm) -> Result<PciRoot, VmError> {
    let root = PciRoot::new();
    vm.mmio().insert(
        layout::PCIE_ECAM_START,
        layout::PCIE_ECAM_SIZE,
        Arc::new(Mutex::new(root.ecam())),
    )?;
    vm.pio().insert(
        layout::PCI_CONFIG_ADDRESS_PORT.into(),
        PciConfigIo::PORT_COUNT,
        Arc::new(Mutex::new(root.config_io())),
    )?;
    let windows = Arc::new(Mutex::new(root.mmio_windows()));
    vm.mmio().insert(
        layout::PCI_MMIO32_START,
        layout::PCI_MMIO32_SIZE,
        windows.clone(),
    )?;
    vm.mmio()
        .insert(layout::PCI_MMIO64_START, layout::PCI_MMIO64_SIZE, windows)?;
    Ok(root)
}

/// Kernel parameters every Linux guest needs on this platform, each with
/// the reason; the VMM puts them before the user's command line.
pub const PLATFORM_PARAMS: &[(&str, &str)] = &[
    (
        "noxsave",
        // What the guest does: with XSAVE, FPU initialisation runs XRSTOR at
        // CPL 0. The backend's emulator cannot run it and the VMM's fallback
        // emulator does not have it, so the boot would stop there.
        "the backend cannot emulate XRSTOR",
    ),
    (
        "forcecpuid=movdir64b,enqcmd",
        // What the guest does: idxd refuses to load without MOVDIR64B and
        // offers shared work queues only with ENQCMD. The backend ignores
        // KVM_SET_CPUID2 for leaf 7, so the VMM cannot advertise them; the
        // guest kernel's forcecpuid= (guest-images/patches/0002) takes them
        // from here. The VMM emulates both where the backend traps them.
        "CPUID leaf 7 cannot advertise MOVDIR64B and ENQCMD on this backend",
    ),
    (
        "clearcpuid=smap",
        // What the guest does: with SMAP it brackets every user-memory access
        // with STAC/CLAC and enters every exception with CLAC. The backend's
        // emulator lacks both, so each is an emulation-failure exit (7,136
        // of them in a boot to `echo hi`, measured). The backend shows SMAP
        // in CPUID leaf 7 whatever KVM_SET_CPUID2 says; without it the
        // kernel leaves both instructions out.
        "every STAC/CLAC would be an emulation-failure exit",
    ),
    (
        GLIBC_NO_AVX,
        // What the guest does: its user code runs natively on the host CPU,
        // where CPUID (answered by the backend) and XGETBV (the host's XCR0)
        // offer AVX, AVX2 and AVX-512, so glibc's string functions use
        // YMM/ZMM registers and ymm16-31 (e.g. memcpy's `vmovdqu64
        // %ymm16`). The kernel, booted with `noxsave`, context-switches
        // only the FXSAVE state (x87, XMM0-15): the upper YMM halves, ZMM,
        // ymm16-31 and the opmask registers are shared by every process on
        // a vCPU. With two processes alive (a pipe) one overwrote another's
        // ymm16 while the other was in a page fault inside memcpy, and the
        // new process's TLS lost its first word: "segfault at 0 ip 4a4d02"
        // (measured). The kernel passes this unknown `NAME=value` parameter
        // to init's environment, and glibc then picks SSE2 code. Programs
        // that use AVX on their own are not covered: that needs the guest
        // kernel to manage XSAVE state (XSAVE/XRSTOR emulation, no
        // `noxsave`).
        "guest processes would share the AVX state the kernel does not switch",
    ),
];

/// The kernel parameter that reaches init's environment (and from there
/// every process's) and keeps glibc to the registers the `noxsave` guest
/// kernel context-switches (x87, SSE). See [`PLATFORM_PARAMS`].
pub const GLIBC_NO_AVX: &str =
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD";

/// `cmdline` with [`PLATFORM_PARAMS`] in front (before any `--`: kernel
/// parameters, not init's arguments; the kernel gives the one it does not
/// know, [`GLIBC_NO_AVX`], to init as an environment variable), except
/// those the user already gave.
pub fn with_platform_params(cmdline: &str) -> String {
    let given = |p: &str| {
        let name = p.split('=').next().unwrap_or(p);
        cmdline
            .split_whitespace()
            .take_while(|w| *w != "--")
            .any(|w| w.split('=').next() == Some(name))
    };
    let mut params: Vec<&str> = PLATFORM_PARAMS
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !given(p))
        .collect();
    if !cmdline.trim().is_empty() {
        params.push(cmdline.trim());
    }
    params.join(" ")
}

/// Feeds what is typed on the VMM's stdin to COM1. The thread ends at
/// end of input (CI runs with no stdin) and otherwise with the process.
fn forward_stdin(serial: Arc<Mutex<crate::devices::serial::SerialDevice>>) {
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin().lock();
            while let Ok(n @ 1..) = stdin.read(&mut buf) {
                if let Ok(mut serial) = serial.lock() {
                    serial.enqueue_input(&buf[..n]);
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("serial input disabled: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_params_come_before_the_users_and_before_init_args() {
        assert_eq!(
            with_platform_params("console=ttyS0 -- vmm.cmd=true"),
            format!("noxsave forcecpuid=movdir64b,enqcmd clearcpuid=smap {GLIBC_NO_AVX} console=ttyS0 -- vmm.cmd=true")
        );
        assert_eq!(
            with_platform_params(""),
            format!("noxsave forcecpuid=movdir64b,enqcmd clearcpuid=smap {GLIBC_NO_AVX}")
        );
    }

    #[test]
    fn a_parameter_the_user_gave_is_not_repeated() {
        assert_eq!(
            with_platform_params("forcecpuid=movdir64b console=ttyS0"),
            format!("noxsave clearcpuid=smap {GLIBC_NO_AVX} forcecpuid=movdir64b console=ttyS0")
        );
        // After `--` it is an argument of init, not a kernel parameter.
        assert_eq!(
            with_platform_params("console=ttyS0 -- noxsave"),
            format!("noxsave forcecpuid=movdir64b,enqcmd clearcpuid=smap {GLIBC_NO_AVX} console=ttyS0 -- noxsave")
        );
    }
}
