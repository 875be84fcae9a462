//! The address of a PCI function: bus, device, function.

use std::fmt;

/// Device numbers on a bus.
pub const DEVICES_PER_BUS: u8 = 32;
/// Functions of a device.
pub const FUNCTIONS_PER_DEVICE: u8 = 8;

/// A PCI function's address (`bus:device.function`), the one type for it
/// in every crate. Its 16-bit encoding ([`PciAddress::rid`], `bus << 8 |
/// device << 3 | function`) is the requester ID that DMA requests, VT-d
/// source IDs, context-table indexes and fault records carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PciAddress {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl PciAddress {
    /// `bus:device.function`; bits of `device` above 4 and of `function`
    /// above 2 are dropped.
    pub const fn new(bus: u8, device: u8, function: u8) -> Self {
        Self {
            bus,
            device: device & (DEVICES_PER_BUS - 1),
            function: function & (FUNCTIONS_PER_DEVICE - 1),
        }
    }

    /// The function a requester ID (`bus << 8 | devfn`) names.
    pub const fn from_rid(rid: u16) -> Self {
        let [bus, devfn] = rid.to_be_bytes();
        Self::new(bus, devfn >> 3, devfn)
    }

    /// A function on bus 0 by its device/function byte.
    pub const fn from_devfn(devfn: u8) -> Self {
        Self::new(0, devfn >> 3, devfn)
    }

    /// The device/function byte (`device << 3 | function`).
    pub const fn devfn(&self) -> u8 {
        ((self.device & (DEVICES_PER_BUS - 1)) << 3) | (self.function & (FUNCTIONS_PER_DEVICE - 1))
    }

    /// The requester ID (`bus << 8 | devfn`).
    pub const fn rid(&self) -> u16 {
        u16::from_be_bytes([self.bus, self.devfn()])
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings() {
        let a = PciAddress::new(0x3a, 0x1f, 7);
        assert_eq!(a.rid(), 0x3aff);
        assert_eq!(a.devfn(), 0xff);
        assert_eq!(PciAddress::from_rid(0x3aff), a);
        assert_eq!(PciAddress::from_rid(0x0108), PciAddress::new(1, 1, 0));
        assert_eq!(PciAddress::from_devfn(0x11), PciAddress::new(0, 2, 1));
        assert_eq!(PciAddress::new(0, 0x21, 9), PciAddress::new(0, 1, 1));
        assert_eq!(a.to_string(), "3a:1f.7");
        assert_eq!(PciAddress::new(0, 4, 0).to_string(), "00:04.0");
    }
}
