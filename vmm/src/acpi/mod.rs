//! ACPI tables for the configured machine and the ACPI power-off device.
//!
//! [`create_acpi_tables`] writes, from `layout::ACPI_START` on:
//!
//! | table | contents |
//! | ----- | -------- |
//! | RSDP  | revision 2, points at the XSDT (in the BIOS search area, so a guest finds it without `acpi_rsdp_addr` too) |
//! | DSDT  | `\_S5`, the PCIe host bridge `\_SB.PCI0` with its windows, COM1, motherboard resources (ECAM, sleep registers) |
//! | FACP  | hardware-reduced ACPI: no PM1/GPE blocks, no SCI; a sleep control/status register pair for S5 |
//! | APIC  | a local APIC per vCPU, the IOAPIC, IRQ0 to GSI 2, LINT1 as NMI |
//! | MCFG  | the ECAM window of segment 0, bus 0 |
//! | extra | caller-built tables copied verbatim (the vIOMMU's DMAR) |
//! | XSDT  | the tables above except RSDP and DSDT |
//!
//! Hardware-reduced ACPI is the simplest model a Linux guest accepts: no
//! PM timer, no fixed events, and power-off is one byte written to the
//! sleep control register, which [`AcpiSleepDevice`] turns into a callback.
//!
//! # Manual check with iasl
//!
//! The unit tests parse the tables back and check every pointer and
//! checksum. A second opinion on the AML comes from ACPICA's disassembler
//! (Debian package `acpica-tools`); the check is an ignored test because it
//! needs that tool:
//!
//! ```text
//! apt-get install acpica-tools
//! cargo test -p vmm --lib acpi::tests::iasl_disassembles_every_table -- --ignored
//! ```
//!
//! It writes each table to a temporary directory, runs `iasl -d` on it and
//! fails on any error or warning.

mod dsdt;
mod fadt;
mod madt;
mod power;
#[cfg(test)]
mod tests;

use acpi_tables::{mcfg::MCFG, rsdp::Rsdp, xsdt::XSDT, Aml};
use log::debug;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout;

pub use power::{AcpiSleepDevice, SLEEP_CONTROL_SLP_EN, SLEEP_TYPE_S5};

/// OEM ID in every table header.
const OEM_ID: [u8; 6] = *b"VTDDSA";
/// OEM table ID in every table header.
const OEM_TABLE_ID: [u8; 8] = *b"VTDDSAVM";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;

/// Size of the standard table header; offsets below are from table start.
const HEADER_LEN: usize = 36;
const HEADER_LENGTH_OFFSET: usize = 4;
const HEADER_CHECKSUM_OFFSET: usize = 9;
/// Tables are placed on this alignment.
const TABLE_ALIGN: u64 = 16;

/// A range of guest-physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddressRange {
    /// First address.
    pub start: u64,
    /// Size in bytes (not zero).
    pub size: u64,
}

impl AddressRange {
    /// The last address in the range.
    pub fn last(&self) -> u64 {
        self.start + self.size - 1
    }
}

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiConfig {
    /// Number of vCPUs; vCPU `i` has local APIC ID `i`.
    pub num_cpus: u8,
    /// ECAM (MMCONFIG) base for segment 0, bus 0.
    pub ecam_base: u64,
    /// PCI 32-bit MMIO window.
    pub pci_mmio32: AddressRange,
    /// PCI 64-bit MMIO window.
    pub pci_mmio64: AddressRange,
    /// COM1's I/O base.
    pub serial_port: u16,
    /// COM1's ISA interrupt.
    pub serial_irq: u32,
    /// Complete tables (header and checksum included) to list in the XSDT
    /// as they are, e.g. the vIOMMU's DMAR.
    pub extra_tables: Vec<Vec<u8>>,
}

impl AcpiConfig {
    /// The machine of `layout` with `num_cpus` vCPUs and no extra tables.
    pub fn new(num_cpus: u8) -> Self {
        Self {
            num_cpus,
            ecam_base: layout::PCIE_ECAM_START,
            pci_mmio32: AddressRange {
                start: layout::PCI_MMIO32_START,
                size: layout::PCI_MMIO32_SIZE,
            },
            pci_mmio64: AddressRange {
                start: layout::PCI_MMIO64_START,
                size: layout::PCI_MMIO64_SIZE,
            },
            serial_port: layout::COM1_PORT,
            serial_irq: layout::COM1_IRQ,
            extra_tables: Vec::new(),
        }
    }
}

/// Errors building the tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The machine has no vCPU.
    #[error("ACPI tables need at least one vCPU")]
    NoCpus,
    /// An extra table is malformed.
    #[error("extra ACPI table {index} is malformed: {reason}")]
    InvalidExtraTable {
        /// Position in `AcpiConfig::extra_tables`.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// The tables do not fit in the ACPI area.
    #[error(
        "ACPI tables need {needed:#x} bytes, more than the {available:#x} reserved at {start:#x}"
    )]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
        /// Start of the area.
        start: u64,
    },
    /// Guest memory does not cover the ACPI area.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    GuestMemory(#[from] GuestMemoryError),
}

/// Serialises an `Aml` item (a table of the acpi_tables crate) to bytes.
fn aml_bytes(item: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    item.to_aml_bytes(&mut bytes);
    bytes
}

/// Checks that `table` is a complete ACPI table: header present, length
/// field equal to its size, bytes summing to zero.
fn validate_table(table: &[u8]) -> Result<(), String> {
    if table.len() < HEADER_LEN {
        return Err(format!(
            "{} bytes, shorter than a table header",
            table.len()
        ));
    }
    let signature = &table[..4];
    if !signature
        .iter()
        .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
    {
        return Err(format!(
            "signature {signature:02x?} is not an ACPI signature"
        ));
    }
    let mut length = [0; 4];
    length.copy_from_slice(&table[HEADER_LENGTH_OFFSET..HEADER_LENGTH_OFFSET + 4]);
    let length = u32::from_le_bytes(length);
    if length as usize != table.len() {
        return Err(format!(
            "length field {length} but {} bytes given",
            table.len()
        ));
    }
    let sum = table.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    if sum != 0 {
        return Err(format!(
            "checksum byte {:#04x} does not make the bytes sum to zero",
            table[HEADER_CHECKSUM_OFFSET]
        ));
    }
    Ok(())
}

/// Places tables one after another from a start address.
struct Placer {
    next: u64,
    tables: Vec<(GuestAddress, Vec<u8>)>,
}

impl Placer {
    fn place(&mut self, bytes: Vec<u8>) -> GuestAddress {
        let addr = GuestAddress(self.next);
        self.next = (self.next + bytes.len() as u64).next_multiple_of(TABLE_ALIGN);
        self.tables.push((addr, bytes));
        addr
    }
}

/// Builds the tables for `config` and writes them to `mem` at
/// `layout::ACPI_START`. Returns the RSDP's address (for boot_params'
/// `acpi_rsdp_addr`).
pub fn create_acpi_tables<M: GuestMemoryBackend>(
    mem: &M,
    config: &AcpiConfig,
) -> Result<GuestAddress, AcpiError> {
    if config.num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    for (index, table) in config.extra_tables.iter().enumerate() {
        validate_table(table).map_err(|reason| AcpiError::InvalidExtraTable { index, reason })?;
    }

    let rsdp_addr = GuestAddress(layout::ACPI_START);
    let mut placer = Placer {
        next: (layout::ACPI_START + Rsdp::len() as u64).next_multiple_of(TABLE_ALIGN),
        tables: Vec::new(),
    };
    let dsdt = placer.place(dsdt::build(config));
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(placer.place(fadt::build(dsdt)).0);
    xsdt.add_entry(placer.place(madt::build(config)).0);
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(config.ecam_base, 0, 0, 0);
    xsdt.add_entry(placer.place(aml_bytes(&mcfg)).0);
    for table in &config.extra_tables {
        xsdt.add_entry(placer.place(table.clone()).0);
    }
    let xsdt_addr = placer.place(aml_bytes(&xsdt));

    let needed = placer.next - layout::ACPI_START;
    let available = layout::ACPI_END - layout::ACPI_START;
    if needed > available {
        return Err(AcpiError::TooLarge {
            needed,
            available,
            start: layout::ACPI_START,
        });
    }

    mem.write_slice(&aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr.0)), rsdp_addr)?;
    for (addr, bytes) in &placer.tables {
        debug!(
            "acpi: {} at {:#x}, {} bytes",
            String::from_utf8_lossy(&bytes[..4]),
            addr.0,
            bytes.len()
        );
        mem.write_slice(bytes, *addr)?;
    }
    Ok(rsdp_addr)
}
