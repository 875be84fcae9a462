//! The machine builder: the one place a machine is assembled from a
//! [`MachineConfig`], in this order: the VM (guest memory, interrupt chip,
//! PIT, KVM capabilities) with the buses of its [`DeviceManager`], the
//! legacy devices, the PCIe root complex, the vIOMMU and the vDSAs
//! attached to it, pvpanic, the virtio consoles and file systems, the ACPI
//! power-off port and tables. The vCPUs are created when the machine runs.
//! Linux guests ([`super::run_linux`]), `vmm run` and the micro-guest
//! harness all get their machine here; the harness then adds its test
//! devices through [`Machine::devices`].

use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::{kvm_regs, kvm_sregs};
use pasid::PasidSpace;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::device_manager::DeviceManager;
use super::{MachineError, VirtioConsole, VirtioFs};
use crate::acpi::{create_acpi_tables, AcpiConfig};
use crate::devices::serial::SerialOutput;
use crate::devices::virtio::VirtioEventLoop;
use crate::platform::{HostCpu, Platform};
use crate::sva::AccelConfig;
use crate::vm::{ExitReporter, RunExit, SregsSetup, Vm, VmConfig};

/// What a machine is made of.
pub struct MachineConfig {
    /// Number of vCPUs (1 to 255).
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Where COM1's output goes.
    pub serial: SerialOutput,
    /// The kind of KVM serving /dev/kvm ([`crate::platform`]).
    pub platform: Platform,
    /// What the host CPU runs natively, if not probed (see
    /// [`Vm::set_host_cpu`]).
    pub host_cpu: Option<HostCpu>,
    /// The host PASID space the guest's host PASIDs come from
    /// ([`crate::vm::host_pasid_space`] when `None`).
    pub pasid_space: Option<Arc<PasidSpace>>,
    /// A PCIe root complex even with no PCI device asked for below (any
    /// of them brings one).
    pub pci: bool,
    /// The vIOMMU and the vDSA functions.
    pub accel: AccelConfig,
    /// The pvpanic PCI function.
    pub pvpanic: bool,
    /// One virtio console per entry, in PCI order after the vDSAs and
    /// pvpanic: the guest sees them as hvc0, hvc1, ...
    pub consoles: Vec<VirtioConsole>,
    /// One virtio-fs device per entry, after the consoles.
    pub filesystems: Vec<VirtioFs>,
    /// ACPI tables (MADT, FADT, DSDT, and the vIOMMU's DMAR) and the ACPI
    /// power-off port.
    pub acpi: bool,
}

impl MachineConfig {
    /// A machine of `cpus` vCPUs and `memory` bytes of RAM on `platform`
    /// with COM1 writing to `serial`, and nothing else: no PCI, no ACPI.
    pub fn new(cpus: u8, memory: u64, serial: SerialOutput, platform: Platform) -> Self {
        Self {
            cpus,
            memory,
            serial,
            platform,
            host_cpu: None,
            pasid_space: None,
            pci: false,
            accel: AccelConfig::default(),
            pvpanic: false,
            consoles: Vec::new(),
            filesystems: Vec::new(),
            acpi: false,
        }
    }

    fn wants_pci(&self) -> bool {
        self.pci
            || self.accel.iommu
            || !self.accel.dsa.is_empty()
            || self.pvpanic
            || !self.consoles.is_empty()
            || !self.filesystems.is_empty()
    }
}

/// An assembled machine, before it runs.
pub struct Machine {
    vm: Vm,
    devices: DeviceManager,
    rsdp: Option<GuestAddress>,
}

/// Assembles the machine `config` describes.
pub fn build(config: MachineConfig) -> Result<Machine, MachineError> {
    let mut devices = DeviceManager::new();
    let pci = config.wants_pci();
    let vm_config = VmConfig {
        cpus: config.cpus,
        memory: config.memory,
        platform: config.platform,
        pasid_space: config.pasid_space,
    };
    let mut vm = Vm::new(vm_config, devices.mmio().clone(), devices.pio().clone())?;
    if let Some(host) = config.host_cpu {
        vm.set_host_cpu(host);
    }
    devices.add_legacy_devices(&vm, config.serial)?;
    if pci {
        devices.add_pci_root()?;
        devices.attach_accelerators(&vm, &config.accel)?;
    }
    if config.pvpanic {
        devices.add_pvpanic(&vm)?;
    }
    devices.add_virtio_consoles(&vm, config.consoles)?;
    devices.add_virtio_fs(&vm, &config.filesystems)?;
    let rsdp = if config.acpi {
        devices.add_acpi_power_off(&vm)?;
        let mut acpi = AcpiConfig::new(config.cpus);
        let dmar = devices.accelerators().and_then(|a| a.dmar.clone());
        acpi.extra_tables.extend(dmar);
        Some(create_acpi_tables(vm.memory(), &acpi)?)
    } else {
        None
    };
    Ok(Machine { vm, devices, rsdp })
}

impl Machine {
    /// The VM: memory, PASIDs, the flags devices raise.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The devices and the buses they sit on.
    pub fn devices(&self) -> &DeviceManager {
        &self.devices
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.vm.memory()
    }

    /// Where the ACPI tables' RSDP is, if the machine has them.
    pub fn rsdp(&self) -> Option<GuestAddress> {
        self.rsdp
    }

    /// What a device uses to end the run with a value (see
    /// [`Vm::exit_reporter`]).
    pub fn exit_reporter(&self) -> ExitReporter {
        self.vm.exit_reporter()
    }

    /// The registers vCPU 0 starts with (see [`Vm::set_boot_state`]).
    pub fn set_boot_state(&mut self, regs: kvm_regs, sregs: kvm_sregs) {
        self.vm.set_boot_state(regs, sregs);
    }

    /// The registers vCPU 0 starts with, its segment and control registers
    /// derived from KVM's reset values by `setup`.
    pub fn set_boot_state_with(&mut self, regs: kvm_regs, setup: SregsSetup) {
        self.vm.set_boot_state_with(regs, setup);
    }

    /// Runs the machine until the guest or `timeout` ends the run, with
    /// the virtio devices served by their event loop for its length.
    pub fn run(self, timeout: Option<Duration>) -> Result<RunExit, MachineError> {
        let virtio = self.devices.virtio_devices();
        let event_loop = if virtio.is_empty() {
            None
        } else {
            Some(VirtioEventLoop::start(virtio)?)
        };
        let exit = self.vm.run(timeout);
        // Stopping the loop flushes what the guest queued last.
        drop(event_loop);
        Ok(exit)
    }
}
