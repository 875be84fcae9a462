//! Guest-physical memory map of the machine, shared by every part of the VMM.
//!
//! ```text
//! 0x0000_0000 .. 0xC000_0000   RAM (low part, at most 3 GiB)
//!     0x0000_7000              Linux boot_params (zero page)
//!     0x0002_0000              kernel command line
//!     0x000E_0000              ACPI RSDP and tables (legacy search area)
//!     0x0010_0000              kernel image
//! 0xC000_0000 .. 0xE000_0000   PCI 32-bit MMIO window (BARs)
//! 0xE000_0000 .. 0xE010_0000   PCIe ECAM (MMCONFIG), bus 0 only
//! 0xF000_0000 .. 0xF010_0000   platform test devices (micro-guests)
//! 0xFEC0_0000                  IOAPIC
//! 0xFED9_0000 .. 0xFED9_1000   vIOMMU (VT-d) register window
//! 0xFEE0_0000                  local APICs
//! 0x1_0000_0000 ..             RAM (high part, above 4 GiB)
//! 0x80_0000_0000 .. +64 GiB    PCI 64-bit MMIO window (BARs)
//! ```

/// Start of guest RAM.
pub const RAM_START: u64 = 0;
/// End of the low RAM part: the 32-bit MMIO hole starts here.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// Start of RAM above the 32-bit MMIO hole.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// Linux boot_params ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Linux kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line accepted (bytes, including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;
/// Where the ACPI RSDP and the tables after it are written.
pub const ACPI_START: u64 = 0xE_0000;
/// End of the area reserved for ACPI tables.
pub const ACPI_END: u64 = 0x10_0000;
/// Load address of the Linux kernel.
pub const KERNEL_START: u64 = 0x10_0000;

/// PCI 32-bit MMIO window for BARs.
pub const PCI_MMIO32_START: u64 = 0xC000_0000;
/// Size of the PCI 32-bit MMIO window.
pub const PCI_MMIO32_SIZE: u64 = 0x2000_0000;
/// PCIe ECAM (MMCONFIG) base; bus 0 only.
pub const PCIE_ECAM_START: u64 = 0xE000_0000;
/// ECAM size: 1 MiB per bus.
pub const PCIE_ECAM_SIZE: u64 = 0x10_0000;
/// Legacy PCI configuration address port.
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Legacy PCI configuration data port (4 bytes).
pub const PCI_CONFIG_DATA_PORT: u16 = 0xcfc;

/// Devices used only by micro-guest tests.
pub const TEST_DEVICES_START: u64 = 0xF000_0000;
/// Size of the micro-guest test-device area.
pub const TEST_DEVICES_SIZE: u64 = 0x10_0000;

/// IOAPIC register window.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// vIOMMU (VT-d) register window.
pub const VIOMMU_START: u64 = 0xFED9_0000;
/// Size of the vIOMMU register window.
pub const VIOMMU_SIZE: u64 = 0x1000;
/// Local APIC register window.
pub const LAPIC_START: u64 = 0xFEE0_0000;

/// PCI 64-bit MMIO window for BARs.
pub const PCI_MMIO64_START: u64 = 0x80_0000_0000;
/// Size of the PCI 64-bit MMIO window.
pub const PCI_MMIO64_SIZE: u64 = 0x10_0000_0000;

/// COM1 port base and its ISA interrupt.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;

/// The micro-guest "test exit" port: a 4-byte OUT here ends the run and the
/// value written becomes the run's result.
pub const TEST_EXIT_PORT: u16 = 0xf4;
