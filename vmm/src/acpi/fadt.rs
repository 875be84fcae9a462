//! The FADT (signature FACP) of a hardware-reduced ACPI platform.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use vm_memory::GuestAddress;

use super::{aml_bytes, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout;

/// IA-PC boot architecture flags (FADT offset 109).
mod iapc_boot_arch {
    /// Probing for VGA is not safe: there is none.
    pub const VGA_NOT_PRESENT: u16 = 1 << 2;
    /// There is no CMOS RTC at ports 0x70/0x71.
    pub const CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
}

/// A one-byte register in port I/O space.
fn io_byte_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// The FADT pointing at the DSDT at `dsdt`.
///
/// Hardware-reduced: no PM1 event/control blocks, no PM timer, no GPE
/// blocks, no SCI, no FACS. The sleep control register
/// (`layout::ACPI_SLEEP_CONTROL_PORT`) takes SLP_TYP/SLP_EN for S5 and the
/// sleep status register (`layout::ACPI_SLEEP_STATUS_PORT`) reads 0; Linux
/// offers ACPI power-off only when both are present. The legacy 8042 flag
/// is clear (no keyboard controller for the guest to probe).
pub(super) fn build(dsdt: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt.0)
        .flag(Flags::HwReducedAcpi);
    fadt.iapc_boot_arch =
        (iapc_boot_arch::VGA_NOT_PRESENT | iapc_boot_arch::CMOS_RTC_NOT_PRESENT).into();
    fadt.sleep_control_reg = io_byte_register(layout::ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_byte_register(layout::ACPI_SLEEP_STATUS_PORT);
    aml_bytes(&fadt.finalize())
}
