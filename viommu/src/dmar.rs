// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! ACPI DMA Remapping Reporting table (DMAR, VT-d chapter 8) describing this unit.

use acpi_tables::sdt::Sdt;

use crate::regs::HOST_ADDRESS_WIDTH;

/// DMAR flag: interrupt remapping supported.
pub const DMAR_INTR_REMAP: u8 = 1 << 0;
/// DMAR flag: x2APIC opt-out.
pub const DMAR_X2APIC_OPT_OUT: u8 = 1 << 1;
/// DMAR flag: DMA control platform opt-in.
pub const DMAR_PLATFORM_OPT_IN: u8 = 1 << 2;

/// DRHD flag: the unit covers every PCI device of its segment not claimed by another unit.
pub const DRHD_INCLUDE_PCI_ALL: u8 = 1 << 0;

/// Remapping structure type of a DRHD.
const DRHD_TYPE: u16 = 0;
/// Fixed part of a DRHD.
const DRHD_HEADER_LEN: usize = 16;
/// DMAR revision.
const DMAR_REVISION: u8 = 1;

/// Device scope entry types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum ScopeType {
    /// PCI endpoint device.
    PciEndpoint = 1,
    /// PCI sub-hierarchy (a bridge and everything below).
    PciSubHierarchy = 2,
    /// I/O APIC (enumeration ID = APIC ID).
    IoApic = 3,
    /// MSI-capable HPET (enumeration ID = HPET number).
    Hpet = 4,
    /// ACPI namespace device.
    AcpiNamespace = 5,
}

/// A device scope: a device found by walking `path` (device, function) pairs from
/// `start_bus`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceScope {
    /// Kind of device.
    pub kind: ScopeType,
    /// I/O APIC ID, HPET number or ACPI device number; 0 for PCI devices.
    pub enumeration_id: u8,
    /// Bus where the path starts.
    pub start_bus: u8,
    /// (device, function) hops; one for a device on `start_bus`.
    pub path: Vec<(u8, u8)>,
}

impl DeviceScope {
    /// A PCI endpoint at `bus:device.function` directly on that bus.
    pub fn pci_endpoint(bus: u8, device: u8, function: u8) -> Self {
        DeviceScope {
            kind: ScopeType::PciEndpoint,
            enumeration_id: 0,
            start_bus: bus,
            path: vec![(device, function)],
        }
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.kind as u8);
        out.push((6 + 2 * self.path.len()) as u8);
        out.extend_from_slice(&[0, 0]);
        out.push(self.enumeration_id);
        out.push(self.start_bus);
        for &(device, function) in &self.path {
            out.push(device);
            out.push(function);
        }
    }
}

/// What to put in the DMAR table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmarConfig {
    /// Guest-physical base of the unit's 4 KiB register window.
    pub register_base: u64,
    /// PCI segment of the unit.
    pub segment: u16,
    /// Set INCLUDE_PCI_ALL (the unit covers every PCI device of the segment).
    pub include_pci_all: bool,
    /// Explicit device scopes (PCI devices without INCLUDE_PCI_ALL, I/O APICs, HPETs).
    pub scopes: Vec<DeviceScope>,
    /// DMAR flags (interrupt remapping must stay clear: this unit does not implement it).
    pub flags: u8,
    /// ACPI OEM ID.
    pub oem_id: [u8; 6],
    /// ACPI OEM table ID.
    pub oem_table_id: [u8; 8],
}

impl DmarConfig {
    /// One unit at `register_base` covering all PCI devices of segment 0.
    pub fn include_all(register_base: u64) -> Self {
        DmarConfig {
            register_base,
            segment: 0,
            include_pci_all: true,
            scopes: Vec::new(),
            flags: 0,
            oem_id: *b"VMMSVA",
            oem_table_id: *b"VIOMMU  ",
        }
    }
}

/// Build the DMAR table bytes (ACPI header with checksum, host address width, flags, one
/// DRHD for this unit).
pub fn build_dmar_table(config: &DmarConfig) -> Vec<u8> {
    let mut body = Vec::new();
    body.push(HOST_ADDRESS_WIDTH - 1);
    body.push(config.flags);
    body.extend_from_slice(&[0; 10]);

    let mut scopes = Vec::new();
    for scope in &config.scopes {
        scope.encode(&mut scopes);
    }
    body.extend_from_slice(&DRHD_TYPE.to_le_bytes());
    body.extend_from_slice(&((DRHD_HEADER_LEN + scopes.len()) as u16).to_le_bytes());
    body.push(if config.include_pci_all {
        DRHD_INCLUDE_PCI_ALL
    } else {
        0
    });
    body.push(0);
    body.extend_from_slice(&config.segment.to_le_bytes());
    body.extend_from_slice(&config.register_base.to_le_bytes());
    body.extend_from_slice(&scopes);

    let mut sdt = Sdt::new(
        *b"DMAR",
        36,
        DMAR_REVISION,
        config.oem_id,
        config.oem_table_id,
        1,
    );
    sdt.append_slice(&body);
    sdt.as_slice().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    #[test]
    fn include_all_table_layout() {
        let t = build_dmar_table(&DmarConfig::include_all(0xfed9_0000));
        assert_eq!(&t[0..4], b"DMAR");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.len(), 48 + 16);
        assert_eq!(t[8], 1, "revision");
        assert!(checksum_ok(&t));
        assert_eq!(t[36], 47, "host address width - 1");
        assert_eq!(t[37], 0, "flags: no interrupt remapping");
        // DRHD.
        assert_eq!(u16::from_le_bytes([t[48], t[49]]), 0);
        assert_eq!(u16::from_le_bytes([t[50], t[51]]), 16);
        assert_eq!(t[52], DRHD_INCLUDE_PCI_ALL);
        assert_eq!(u16::from_le_bytes([t[54], t[55]]), 0, "segment");
        assert_eq!(
            u64::from_le_bytes(t[56..64].try_into().unwrap()),
            0xfed9_0000
        );
    }

    #[test]
    fn device_scopes() {
        let config = DmarConfig {
            include_pci_all: false,
            scopes: vec![
                DeviceScope::pci_endpoint(0, 3, 0),
                DeviceScope {
                    kind: ScopeType::IoApic,
                    enumeration_id: 2,
                    start_bus: 0,
                    path: vec![(0x1f, 0)],
                },
            ],
            ..DmarConfig::include_all(0xfed9_0000)
        };
        let t = build_dmar_table(&config);
        assert!(checksum_ok(&t));
        assert_eq!(u16::from_le_bytes([t[50], t[51]]), 16 + 8 + 8);
        assert_eq!(t[52], 0);
        assert_eq!(&t[64..72], &[1, 8, 0, 0, 0, 0, 3, 0]);
        assert_eq!(&t[72..80], &[3, 8, 0, 0, 2, 0, 0x1f, 0]);
        assert_eq!(t.len(), 80);
    }
}
