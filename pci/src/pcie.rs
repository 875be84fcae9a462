//! The PCI Express capability and capability IDs.

use crate::{ConfigError, PciConfiguration};

/// Standard capability IDs (PCI Local Bus spec).
pub mod cap_id {
    /// Power management.
    pub const POWER_MANAGEMENT: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// PCI Express.
    pub const PCI_EXPRESS: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
}

/// Extended capability IDs (PCI Express spec).
pub mod ext_cap_id {
    /// Advanced error reporting.
    pub const AER: u16 = 0x0001;
    /// Address translation services.
    pub const ATS: u16 = 0x000f;
    /// Page request interface.
    pub const PRI: u16 = 0x0013;
    /// Process address space ID.
    pub const PASID: u16 = 0x001b;
}

/// Device/port type field of the PCI Express Capabilities register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PcieDeviceType {
    /// A PCI Express endpoint below a root port.
    Endpoint = 0,
    /// A root complex integrated endpoint (RCiEP).
    RootComplexIntegratedEndpoint = 9,
}

// Offsets inside the PCI Express capability (from the capability start).
const PCIE_CAPS: usize = 0x02;
const DEVCAP: usize = 0x04;
const DEVCTL: usize = 0x08;
const DEVSTA: usize = 0x0a;
const DEVCAP2: usize = 0x24;
const DEVCTL2: usize = 0x28;
/// Size of a version-2 PCI Express capability.
const PCIE_CAP_SIZE: usize = 0x3c;

const CAP_VERSION_2: u16 = 2;
/// DEVCAP: Function Level Reset capability.
const DEVCAP_FLR: u32 = 1 << 28;
/// DEVCAP: role-based error reporting (required of PCIe 1.1+ functions).
const DEVCAP_RBER: u32 = 1 << 15;
/// DEVCAP2: completion timeout disable supported.
const DEVCAP2_CTDS: u32 = 1 << 4;
/// DEVCAP2: extended fmt field supported (needed with TLP prefixes).
const DEVCAP2_EXT_FMT: u32 = 1 << 20;
/// DEVCAP2: end-end TLP prefix supported; Linux enables PASID only with it.
const DEVCAP2_EE_PREFIX: u32 = 1 << 21;
/// DEVCAP2: max end-end TLP prefixes, encoded 1 (one prefix, the PASID).
const DEVCAP2_MAX_EE_PREFIX_1: u32 = 1 << 22;
/// DEVCTL bits software may write (error reporting, payload, read request, FLR).
const DEVCTL_WRITABLE: u16 = 0xfeff;
/// DEVSTA error bits 3:0 are write-1-to-clear.
const DEVSTA_W1C: u16 = 0x000f;
/// DEVCTL2: completion timeout value/disable and the TLP-prefix blocking bit.
const DEVCTL2_WRITABLE: u16 = 0x801f;

/// A version-2 PCI Express capability for an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcieCapability {
    /// The device/port type.
    pub device_type: PcieDeviceType,
    /// Advertise end-end TLP prefixes (needed for PASID on an RCiEP).
    pub end_end_tlp_prefix: bool,
    /// Advertise Function Level Reset.
    pub flr: bool,
}

impl PcieCapability {
    /// Adds the capability to `config` and returns its offset.
    pub fn add_to(&self, config: &mut PciConfiguration) -> Result<u16, ConfigError> {
        // The body starts after the two-byte ID/next header.
        let mut body = [0u8; PCIE_CAP_SIZE - 2];
        let mut writable = [0u8; PCIE_CAP_SIZE - 2];
        let put = |buf: &mut [u8], at: usize, bytes: &[u8]| {
            buf[at - 2..at - 2 + bytes.len()].copy_from_slice(bytes)
        };
        let caps = CAP_VERSION_2 | ((self.device_type as u16) << 4);
        put(&mut body, PCIE_CAPS, &caps.to_le_bytes());
        let devcap = DEVCAP_RBER | if self.flr { DEVCAP_FLR } else { 0 };
        put(&mut body, DEVCAP, &devcap.to_le_bytes());
        put(&mut writable, DEVCTL, &DEVCTL_WRITABLE.to_le_bytes());
        let mut devcap2 = DEVCAP2_CTDS;
        if self.end_end_tlp_prefix {
            devcap2 |= DEVCAP2_EXT_FMT | DEVCAP2_EE_PREFIX | DEVCAP2_MAX_EE_PREFIX_1;
        }
        put(&mut body, DEVCAP2, &devcap2.to_le_bytes());
        put(&mut writable, DEVCTL2, &DEVCTL2_WRITABLE.to_le_bytes());
        let offset = config.add_capability(crate::cap_id::PCI_EXPRESS, &body, &writable)?;
        config.set_write_one_to_clear(offset + DEVSTA as u16, &DEVSTA_W1C.to_le_bytes());
        Ok(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PciHeader;

    #[test]
    fn rciep_with_tlp_prefix() {
        let mut cfg = PciConfiguration::new(&PciHeader::default());
        let cap = PcieCapability {
            device_type: PcieDeviceType::RootComplexIntegratedEndpoint,
            end_end_tlp_prefix: true,
            flr: false,
        };
        let off = cap.add_to(&mut cfg).unwrap();
        assert_eq!(cfg.find_capability(crate::cap_id::PCI_EXPRESS), Some(off));
        assert_eq!(cfg.read_u16(off + 2), 0x0092, "version 2, type 9");
        assert_eq!(
            cfg.read_u32(off + 0x24) & DEVCAP2_EE_PREFIX,
            DEVCAP2_EE_PREFIX
        );
        cfg.write(off + 0x24, &[0; 4]);
        assert_ne!(cfg.read_u32(off + 0x24), 0, "DEVCAP2 is read-only");
        cfg.write(off + 0x08, &0x2810u16.to_le_bytes());
        assert_eq!(cfg.read_u16(off + 0x08), 0x2810);
    }
}
