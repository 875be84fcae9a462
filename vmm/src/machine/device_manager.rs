//! The device manager: it owns the machine's buses, its PCIe root complex
//! and its vIOMMU, and puts every device on them: the legacy devices (COM1,
//! the i8042's reset line, the ACPI power-off port), the PCI functions
//! (the vDSAs, each attached to the vIOMMU when there is one, pvpanic,
//! virtio consoles and file systems) and, for a harness, devices of its own
//! at fixed places. The vCPUs dispatch their MMIO and port I/O into the
//! same buses ([`crate::vm::Vm::new`] takes them).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bus::{Bus, SharedDevice};
use pci::MsiSink;
use vmm_sys_util::eventfd::EventFd;

use super::{MachineError, VirtioConsole, VirtioFs};
use crate::acpi::AcpiSleepDevice;
use crate::devices::i8042::{I8042, I8042_COMMAND_PORT};
use crate::devices::pvpanic::PvPanic;
use crate::devices::serial::{SerialDevice, SerialOutput};
use crate::devices::virtio::event_loop::SharedVirtioDevice;
use crate::devices::virtio::{Console, VhostUserFs, VirtioPciDevice};
use crate::layout;
use crate::msi::KvmMsiSink;
use crate::pci_root::{PciConfigIo, PciRoot};
use crate::sva::{attach_devices, attach_viommu, AccelConfig, Accelerators, GuestMem};
use crate::vm::{Vm, VmError};

/// The machine's devices and the buses they sit on.
pub struct DeviceManager {
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    pci_root: Option<PciRoot>,
    accelerators: Option<Accelerators>,
    virtio: Vec<SharedVirtioDevice>,
}

impl Default for DeviceManager {
    fn default() -> Self {
        Self::new()
    }
}

impl DeviceManager {
    /// Empty buses, no device yet.
    pub fn new() -> Self {
        Self {
            mmio: Arc::new(Bus::new()),
            pio: Arc::new(Bus::new()),
            serial: None,
            pci_root: None,
            accelerators: None,
            virtio: Vec::new(),
        }
    }

    /// The MMIO bus.
    pub fn mmio(&self) -> &Arc<Bus> {
        &self.mmio
    }

    /// The port-I/O bus.
    pub fn pio(&self) -> &Arc<Bus> {
        &self.pio
    }

    /// COM1 (once [`Self::add_legacy_devices`] added it), to feed it input.
    pub fn serial(&self) -> Option<&Arc<Mutex<SerialDevice>>> {
        self.serial.as_ref()
    }

    /// The PCIe root complex, if the machine has one.
    pub fn pci_root(&self) -> Option<&PciRoot> {
        self.pci_root.as_ref()
    }

    /// The vIOMMU and the vDSAs, once attached.
    pub fn accelerators(&self) -> Option<&Accelerators> {
        self.accelerators.as_ref()
    }

    /// The virtio PCI functions, for the event loop that serves them.
    pub fn virtio_devices(&self) -> &[SharedVirtioDevice] {
        &self.virtio
    }

    /// Puts `device` at `base..base + len` on the MMIO bus.
    pub fn add_mmio_device(
        &self,
        base: u64,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), MachineError> {
        Ok(self.mmio.insert(base, len, device)?)
    }

    /// Puts `device` at ports `port..port + len` on the port-I/O bus.
    pub fn add_pio_device(
        &self,
        port: u16,
        len: u64,
        device: SharedDevice,
    ) -> Result<(), MachineError> {
        Ok(self.pio.insert(port.into(), len, device)?)
    }

    /// COM1 (interrupt through an irqfd on `vm`) writing to `output`, and
    /// the i8042's command port, whose reset command resets the machine.
    pub fn add_legacy_devices(
        &mut self,
        vm: &Vm,
        output: SerialOutput,
    ) -> Result<(), MachineError> {
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(VmError::Thread)?;
        vm.fd()
            .register_irqfd(&serial_irq, layout::COM1_IRQ)
            .map_err(|source| VmError::Kvm {
                what: "KVM_IRQFD (COM1)",
                source,
            })?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, output)));
        self.add_pio_device(layout::COM1_PORT, 8, serial.clone())?;
        self.serial = Some(serial);
        let i8042 = I8042::new(vm.reset_flag(), vm.stop_flag());
        self.add_pio_device(I8042_COMMAND_PORT, 1, Arc::new(Mutex::new(i8042)))
    }

    /// The ACPI sleep control port: the guest's S5 ends the run as
    /// [`crate::vm::RunExit::PowerOff`].
    pub fn add_acpi_power_off(&self, vm: &Vm) -> Result<(), MachineError> {
        let (power_off, stop) = (vm.power_off_flag(), vm.stop_flag());
        let sleep = AcpiSleepDevice::new(move || {
            power_off.store(true, Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
        });
        self.add_pio_device(
            layout::ACPI_SLEEP_CONTROL_PORT,
            AcpiSleepDevice::PORT_COUNT,
            Arc::new(Mutex::new(sleep)),
        )
    }

    /// Puts a PCIe root complex on the buses: ECAM, the 0xCF8/0xCFC ports
    /// and the BAR windows.
    pub fn add_pci_root(&mut self) -> Result<(), MachineError> {
        let root = PciRoot::new();
        self.add_mmio_device(
            layout::PCIE_ECAM_START,
            layout::PCIE_ECAM_SIZE,
            Arc::new(Mutex::new(root.ecam())),
        )?;
        self.add_pio_device(
            layout::PCI_CONFIG_ADDRESS_PORT,
            PciConfigIo::PORT_COUNT,
            Arc::new(Mutex::new(root.config_io())),
        )?;
        let windows = Arc::new(Mutex::new(root.mmio_windows()));
        self.add_mmio_device(
            layout::PCI_MMIO32_START,
            layout::PCI_MMIO32_SIZE,
            windows.clone(),
        )?;
        self.add_mmio_device(layout::PCI_MMIO64_START, layout::PCI_MMIO64_SIZE, windows)?;
        self.pci_root = Some(root);
        Ok(())
    }

    fn root(&self) -> Result<&PciRoot, MachineError> {
        self.pci_root.as_ref().ok_or(MachineError::NoPciRoot)
    }

    /// Puts the vIOMMU (if `config` asks for one) on the MMIO bus and the
    /// vDSAs on the root complex, each attached to the vIOMMU, all wired
    /// to `vm`'s PASIDs ([`Vm::pasids`]).
    pub fn attach_accelerators(
        &mut self,
        vm: &Vm,
        config: &AccelConfig,
    ) -> Result<&Accelerators, MachineError> {
        let memory: GuestMem = Arc::new(vm.memory().clone());
        let msi: Arc<dyn MsiSink> = Arc::new(KvmMsiSink::new(vm.fd().clone()));
        let iommu = if config.iommu {
            Some(attach_viommu(&self.mmio, memory.clone(), msi.clone())?)
        } else {
            None
        };
        let attached = attach_devices(vm.pasids(), memory, msi, iommu, self.root()?, &config.dsa)?;
        Ok(self.accelerators.insert(attached))
    }

    /// The pvpanic PCI function: a guest panic ends the run as
    /// [`crate::vm::RunExit::GuestPanic`].
    pub fn add_pvpanic(&self, vm: &Vm) -> Result<(), MachineError> {
        let (panicked, stop) = (vm.panic_flag(), vm.stop_flag());
        let pvpanic = PvPanic::new(Box::new(move || {
            panicked.store(true, Ordering::SeqCst);
            stop.store(true, Ordering::SeqCst);
        }))?;
        let bdf = self.root()?.add_device(Arc::new(Mutex::new(pvpanic)))?;
        log::debug!("pvpanic at {bdf}");
        Ok(())
    }

    /// One virtio-console PCI function per entry of `consoles`.
    pub fn add_virtio_consoles(
        &mut self,
        vm: &Vm,
        consoles: Vec<VirtioConsole>,
    ) -> Result<(), MachineError> {
        let msi = Arc::new(KvmMsiSink::new(vm.fd().clone()));
        for console in consoles {
            let device = Console::new(console.output, console.input)?;
            let pci = VirtioPciDevice::new(Box::new(device), vm.memory().clone(), msi.clone())?;
            let shared = Arc::new(Mutex::new(pci));
            let bdf = self.root()?.add_device(shared.clone())?;
            log::debug!("virtio-console at {bdf}");
            self.virtio.push(shared);
        }
        Ok(())
    }

    /// One virtio-fs PCI function per entry of `filesystems`, each
    /// connected to its vhost-user backend.
    pub fn add_virtio_fs(&mut self, vm: &Vm, filesystems: &[VirtioFs]) -> Result<(), MachineError> {
        let msi = Arc::new(KvmMsiSink::new(vm.fd().clone()));
        for fs in filesystems {
            let device = VhostUserFs::connect(&fs.socket, &fs.tag)?;
            let pci = VirtioPciDevice::new(Box::new(device), vm.memory().clone(), msi.clone())?;
            let shared = Arc::new(Mutex::new(pci));
            let bdf = self.root()?.add_device(shared.clone())?;
            log::debug!("virtio-fs '{}' at {bdf}", fs.tag);
            self.virtio.push(shared);
        }
        Ok(())
    }
}
