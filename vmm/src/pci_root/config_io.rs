//! The legacy configuration mechanism #1: CONFIG_ADDRESS at 0xCF8 and
//! CONFIG_DATA at 0xCFC..0xCFF.

use bus::BusDevice;
use log::debug;
use pci::LEGACY_CONFIG_SPACE_SIZE;

use super::PciRoot;

/// CONFIG_ADDRESS fields.
const ADDRESS_ENABLE: u32 = 1 << 31;
const ADDRESS_BUS_SHIFT: u32 = 16;
const ADDRESS_DEVFN_SHIFT: u32 = 8;
/// Register number (dword-aligned byte offset); bits 1:0 always read 0.
const ADDRESS_REGISTER_MASK: u32 = 0xfc;
/// Bits software can set: enable, bus, device, function, register.
const ADDRESS_WRITABLE: u32 = ADDRESS_ENABLE | 0x00ff_fffc;

/// Port offsets inside the device's range.
const CONFIG_ADDRESS_OFFSET: u64 = 0;
const CONFIG_DATA_OFFSET: u64 = 4;

/// The 0xCF8/0xCFC ports. Register it on the port-I/O bus at
/// `layout::PCI_CONFIG_ADDRESS_PORT` with length [`PciConfigIo::PORT_COUNT`].
///
/// Only 32-bit accesses to 0xCF8 reach CONFIG_ADDRESS (other accesses to
/// 0xCF8..0xCFB read all ones and are ignored, as on PC chipsets where those
/// bytes belong to other registers). Data accesses reach the first 256
/// bytes of the addressed function when the enable bit is set; otherwise,
/// or for another bus or an absent function, they read all ones and writes
/// are dropped.
pub struct PciConfigIo {
    root: PciRoot,
    address: u32,
}

impl PciConfigIo {
    /// Number of ports the device decodes (0xCF8..0xD00).
    pub const PORT_COUNT: u64 = 8;

    pub(super) fn new(root: PciRoot) -> Self {
        Self { root, address: 0 }
    }

    /// The function and register a data access at `offset` (from 0xCF8) of
    /// `len` bytes reaches, if any.
    fn target(&self, offset: u64, len: usize) -> Option<(u8, u16)> {
        let port_offset = offset.checked_sub(CONFIG_DATA_OFFSET)?;
        if self.address & ADDRESS_ENABLE == 0 || (self.address >> ADDRESS_BUS_SHIFT) & 0xff != 0 {
            return None;
        }
        if !matches!(len, 1 | 2 | 4) || port_offset % len as u64 != 0 {
            return None;
        }
        let register = u64::from(self.address & ADDRESS_REGISTER_MASK) + port_offset;
        if register + len as u64 > LEGACY_CONFIG_SPACE_SIZE as u64 {
            return None;
        }
        let devfn = ((self.address >> ADDRESS_DEVFN_SHIFT) & 0xff) as u8;
        Some((devfn, register as u16))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if offset == CONFIG_ADDRESS_OFFSET && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        match self.target(offset, data.len()) {
            Some((devfn, register)) => self.root.config_read(devfn, register, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if offset == CONFIG_ADDRESS_OFFSET && data.len() == 4 {
            let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.address = value & ADDRESS_WRITABLE;
            return;
        }
        match self.target(offset, data.len()) {
            Some((devfn, register)) => self.root.config_write(devfn, register, data),
            None => debug!(
                "pci config port: dropped {}-byte write at 0xcf8+{offset}",
                data.len()
            ),
        }
    }
}
