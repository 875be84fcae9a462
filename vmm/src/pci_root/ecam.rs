//! ECAM (enhanced configuration access mechanism, MMCONFIG): each function's
//! 4 KiB configuration space mapped in memory.

use bus::BusDevice;
use log::debug;

use super::PciRoot;

/// ECAM offset fields: bus in bits 27:20, device/function in 19:12,
/// register in 11:0.
const ECAM_BUS_SHIFT: u64 = 20;
const ECAM_DEVFN_SHIFT: u64 = 12;
const ECAM_REGISTER_MASK: u64 = 0xfff;

/// The ECAM window of bus 0. Register it on the MMIO bus at
/// `layout::PCIE_ECAM_START` with length `layout::PCIE_ECAM_SIZE`.
///
/// Accesses of 1, 2 or 4 bytes, naturally aligned, reach the function's
/// configuration space; other sizes, other buses and absent functions read
/// all ones and ignore writes.
pub struct PciEcam {
    root: PciRoot,
}

/// A decoded ECAM offset.
struct EcamAddress {
    devfn: u8,
    register: u16,
}

impl EcamAddress {
    fn decode(offset: u64, len: usize) -> Option<Self> {
        let bus = offset >> ECAM_BUS_SHIFT;
        let register = offset & ECAM_REGISTER_MASK;
        let sized = matches!(len, 1 | 2 | 4) && register % len as u64 == 0;
        (bus == 0 && sized).then_some(Self {
            devfn: ((offset >> ECAM_DEVFN_SHIFT) & 0xff) as u8,
            register: register as u16,
        })
    }
}

impl PciEcam {
    pub(super) fn new(root: PciRoot) -> Self {
        Self { root }
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match EcamAddress::decode(offset, data.len()) {
            Some(a) => self.root.config_read(a.devfn, a.register, data),
            None => {
                debug!(
                    "ecam: unsupported read at {offset:#x}, {} bytes",
                    data.len()
                );
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match EcamAddress::decode(offset, data.len()) {
            Some(a) => self.root.config_write(a.devfn, a.register, data),
            None => debug!(
                "ecam: unsupported write at {offset:#x}, {} bytes",
                data.len()
            ),
        }
    }
}
