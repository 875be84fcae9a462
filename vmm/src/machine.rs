//! The standard machine for Linux guests: the VM, the PCIe root complex,
//! ACPI tables with the power-off device (and the vIOMMU's DMAR), the
//! vIOMMU and vDSA functions, and the loaded kernel.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pci::MsiSink;
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
use crate::platform::Platform;
use crate::sva::{attach_devices, attach_viommu, AccelConfig, AccelError, Accelerators, GuestMem};
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
    /// The kind of KVM the machine runs on.
    pub platform: Platform,
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
        platform: config.platform,
        pasid_space: None,
    };
    let mut vm = Vm::new(vm_config)?;
    if interactive {
        forward_stdin(vm.serial().clone());
    }

    let root = attach_pci_root(&vm)?;
    let accel = attach_accelerators(&vm, &root, &config.accel)?;
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
        cmdline: config.platform.with_kernel_params(&config.cmdline),
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

/// Puts the vIOMMU (if asked) on `vm`'s MMIO bus and the vDSAs on `root`,
/// wired to the VM's PASIDs ([`Vm::pasids`]).
pub fn attach_accelerators(
    vm: &Vm,
    root: &PciRoot,
    config: &AccelConfig,
) -> Result<Accelerators, AccelError> {
    let memory: GuestMem = Arc::new(vm.memory().clone());
    let msi: Arc<dyn MsiSink> = Arc::new(KvmMsiSink::new(vm.fd().clone()));
    let iommu = if config.iommu {
        Some(attach_viommu(vm.mmio(), memory.clone(), msi.clone())?)
    } else {
        None
    };
    attach_devices(vm.pasids(), memory, msi, iommu, root, &config.dsa)
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

/// Feeds what is typed on the VMM's stdin to COM1. The thread ends at
/// end of input (CI runs with stdin closed or /dev/null) or on a read error
/// (a non-blocking or unreadable stdin), never retrying in a loop, and
/// otherwise with the process. A signal that interrupts the read is not
/// the end.
fn forward_stdin(serial: Arc<Mutex<crate::devices::serial::SerialDevice>>) {
    let spawned = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin().lock();
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if let Ok(mut serial) = serial.lock() {
                            serial.enqueue_input(&buf[..n]);
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        log::warn!("serial input: stdin: {e}; no more input");
                        break;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::warn!("serial input disabled: {e}");
    }
}
