//! The DSDT: the AML namespace of the machine.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name, Package,
    Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::{sdt::Sdt, Aml};

use super::{aml_bytes, AcpiConfig, HEADER_LEN, OEM_ID, OEM_REVISION, OEM_TABLE_ID};
use crate::layout;

/// DSDT revision 2: integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;

/// Legacy configuration ports 0xCF8..0xCFF, consumed by the host bridge.
const CONFIG_PORTS_LEN: u8 = 8;
/// I/O ports the host bridge forwards: everything but the config ports.
const IO_WINDOW_LOW: (u16, u16) = (0x0000, 0x0cf7);
const IO_WINDOW_HIGH: (u16, u16) = (0x0d00, 0xffff);
/// A 16550 decodes eight ports.
const UART_PORTS_LEN: u8 = 8;
/// The sleep control and status registers are adjacent single bytes.
const SLEEP_PORTS_LEN: u8 = 2;

/// The \_S5 package: SLP_TYPa, SLP_TYPb, two reserved.
fn s5_package() -> Vec<u8> {
    let typ = super::SLEEP_TYPE_S5;
    aml_bytes(&Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&typ, &typ, &0u8, &0u8]),
    ))
}

/// `\_SB.PCI0`: the PCIe host bridge of segment 0, bus 0.
fn pci_host_bridge(config: &AcpiConfig) -> Vec<u8> {
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let config_ports = IO::new(
        layout::PCI_CONFIG_ADDRESS_PORT,
        layout::PCI_CONFIG_ADDRESS_PORT,
        1,
        CONFIG_PORTS_LEN,
    );
    let io_low = AddressSpace::<u16>::new_io(IO_WINDOW_LOW.0, IO_WINDOW_LOW.1, None);
    let io_high = AddressSpace::<u16>::new_io(IO_WINDOW_HIGH.0, IO_WINDOW_HIGH.1, None);
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        config.pci_mmio32.start as u32,
        config.pci_mmio32.last() as u32,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        config.pci_mmio64.start,
        config.pci_mmio64.last(),
        None,
    );
    let crs = ResourceTemplate::new(vec![
        &bus,
        &config_ports,
        &io_low,
        &io_high,
        &mmio32,
        &mmio64,
    ]);
    aml_bytes(&Device::new(
        Path::new("PCI0"),
        vec![
            &Name::new(Path::new("_HID"), &hid),
            &Name::new(Path::new("_CID"), &cid),
            &Name::new(Path::new("_SEG"), &0u8),
            &Name::new(Path::new("_BBN"), &0u8),
            &Name::new(Path::new("_UID"), &0u8),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    ))
}

/// A device identified by a PNP ID, with one instance and fixed resources.
fn pnp_device(name: &str, pnp_id: &str, crs: &ResourceTemplate<'_>) -> Vec<u8> {
    aml_bytes(&Device::new(
        Path::new(name),
        vec![
            &Name::new(Path::new("_HID"), &EISAName::new(pnp_id)),
            &Name::new(Path::new("_UID"), &0u8),
            &Name::new(Path::new("_CRS"), crs),
        ],
    ))
}

/// `\_SB.COM1`: the 16550 UART.
fn serial_port(config: &AcpiConfig) -> Vec<u8> {
    let ports = IO::new(config.serial_port, config.serial_port, 1, UART_PORTS_LEN);
    // ISA interrupts are edge-triggered, active high, exclusive.
    let irq = Interrupt::new(true, true, false, false, config.serial_irq);
    pnp_device(
        "COM1",
        "PNP0501",
        &ResourceTemplate::new(vec![&ports, &irq]),
    )
}

/// `\_SB.MRES`: motherboard resources. Linux uses MMCONFIG only when the
/// ECAM window is reserved here or in the E820 map; the sleep registers are
/// listed so that nothing else claims their ports.
fn motherboard_resources(config: &AcpiConfig) -> Vec<u8> {
    let ecam_size = layout::PCIE_ECAM_SIZE;
    let ecam32 = u32::try_from(config.ecam_base + ecam_size)
        .ok()
        .map(|_| Memory32Fixed::new(true, config.ecam_base as u32, ecam_size as u32));
    let ecam64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        config.ecam_base,
        config.ecam_base + ecam_size - 1,
        None,
    );
    let ecam: &dyn Aml = match &ecam32 {
        Some(fixed) => fixed,
        None => &ecam64,
    };
    let sleep = IO::new(
        layout::ACPI_SLEEP_CONTROL_PORT,
        layout::ACPI_SLEEP_CONTROL_PORT,
        1,
        SLEEP_PORTS_LEN,
    );
    pnp_device(
        "MRES",
        "PNP0C02",
        &ResourceTemplate::new(vec![ecam, &sleep]),
    )
}

/// The complete DSDT for `config`.
pub(super) fn build(config: &AcpiConfig) -> Vec<u8> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        HEADER_LEN as u32,
        DSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    let mut body = s5_package();
    let devices = [
        pci_host_bridge(config),
        serial_port(config),
        motherboard_resources(config),
    ]
    .concat();
    body.extend(Scope::raw(Path::new("\\_SB_"), devices));
    dsdt.append_slice(&body);
    dsdt.as_slice().to_vec()
}
