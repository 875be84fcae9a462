//! Machines: the [`builder`] that assembles every machine from a
//! [`MachineConfig`], the [`device_manager`] that owns its buses, PCIe
//! root complex and vIOMMU attachment, and the standard machine for Linux
//! guests ([`run_linux`]): everything, with ACPI tables and the loaded
//! kernel.

pub mod builder;
pub mod device_manager;

pub use builder::{build, Machine, MachineConfig};
pub use device_manager::DeviceManager;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use crate::acpi::AcpiError;
use crate::boot::{load_linux, BootConfig, BootError};
use crate::devices::serial::{SerialDevice, SerialOutput};
use crate::devices::virtio::event_loop::EventLoopError;
use crate::devices::virtio::fs::FsError;
use crate::devices::virtio::transport::TransportError;
use crate::devices::virtio::ConsoleInput;
use crate::pci_root::PciRootError;
use crate::platform::Platform;
use crate::sva::{AccelConfig, AccelError};
use crate::vm::{RunExit, VmError};

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

/// Errors building or booting a machine; each prints as one line.
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
    /// A device's place on a bus is taken.
    #[error(transparent)]
    Bus(#[from] bus::BusError),
    /// A PCI device was asked for on a machine without a root complex.
    #[error("a PCI device needs the PCIe root complex, which this machine lacks")]
    NoPciRoot,
}

/// Builds the Linux machine ([`build`]: PCIe root complex, vIOMMU and
/// vDSAs, pvpanic, virtio devices, ACPI), boots the kernel and runs it to
/// the end.
pub fn run_linux(config: LinuxConfig) -> Result<RunExit, MachineError> {
    // A plain boot on the terminal takes typed input on COM1; `vmm run`
    // (virtio consoles) leaves the VMM's stdin alone.
    let interactive = matches!(config.serial, SerialOutput::Stdout) && config.consoles.is_empty();
    let machine_config = MachineConfig {
        pci: true,
        accel: config.accel,
        pvpanic: true,
        consoles: config.consoles,
        filesystems: config.filesystems,
        acpi: true,
        ..MachineConfig::new(config.cpus, config.memory, config.serial, config.platform)
    };
    let mut machine = build(machine_config)?;
    if interactive {
        if let Some(serial) = machine.devices().serial() {
            forward_stdin(serial.clone());
        }
    }
    let boot = BootConfig {
        kernel: config.kernel,
        initramfs: config.initramfs,
        cmdline: config.platform.with_kernel_params(&config.cmdline),
        rsdp: machine.rsdp(),
    };
    let state = load_linux(machine.memory(), &boot)?;
    let regs = state.regs();
    machine.set_boot_state_with(regs, Box::new(move |sregs| state.apply_sregs(sregs)));
    machine.run(config.timeout)
}

/// Feeds what is typed on the VMM's stdin to COM1. The thread ends at
/// end of input (CI runs with stdin closed or /dev/null) or on a read error
/// (a non-blocking or unreadable stdin), never retrying in a loop, and
/// otherwise with the process. A signal that interrupts the read is not
/// the end.
fn forward_stdin(serial: Arc<Mutex<SerialDevice>>) {
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
