//! Guest-physical memory map of the machine, shared by every part of the VMM.
//!
//! ```text
//! 0x0000_0000 .. 0xC000_0000   RAM (low part, at most 3 GiB)
//!     0x0000_0500              boot GDT (direct Linux boot)
//!     0x0000_7000              Linux boot_params (zero page)
//!     0x0000_8FF0              initial stack pointer (direct Linux boot)
//!     0x0000_9000 .. 0xF000    boot page tables: PML4, PDPT, 4 page directories
//!     0x0002_0000              kernel command line
//!     0x000A_0000 .. 0xE_0000  legacy VGA/option-ROM hole (not RAM in E820)
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

/// The boot GDT written for a direct 64-bit Linux boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// Linux boot_params ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial RSP of the boot vCPU for a direct 64-bit Linux boot.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Boot page tables: the PML4 page; the PDPT and the page directories follow.
pub const BOOT_PML4_START: u64 = 0x9000;
/// Boot page tables: the page-directory-pointer table.
pub const BOOT_PDPT_START: u64 = 0xa000;
/// Boot page tables: the first of the page directories (one per GiB mapped).
pub const BOOT_PD_START: u64 = 0xb000;
/// End of conventional memory: 0xA0000..ACPI_START is the legacy VGA and
/// option-ROM hole, which the E820 map does not report as RAM.
pub const LEGACY_HOLE_START: u64 = 0xA_0000;
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

/// ACPI sleep control register (hardware-reduced ACPI, one byte): the
/// guest writes SLP_TYP and SLP_EN here to power off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (hardware-reduced ACPI, one byte).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;

/// COM1 port base and its ISA interrupt.
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;
