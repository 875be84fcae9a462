//! Dispatch of memory accesses in the PCI MMIO windows to function BARs.

use bus::{BusDevice, StoreKind, StoreReply};
use log::trace;

use super::{lock, PciRoot};

/// The PCI MMIO windows. Register the same instance on the MMIO bus twice:
/// at `layout::PCI_MMIO32_START` (length `PCI_MMIO32_SIZE`) and at
/// `layout::PCI_MMIO64_START` (length `PCI_MMIO64_SIZE`); the absolute
/// address `base + offset` selects the BAR.
///
/// An access wholly inside a BAR that decodes now (memory space enabled)
/// goes to its function with the offset into that BAR. Anything else is
/// unclaimed: reads return all ones, writes and MOVDIR64B are dropped, and
/// ENQCMD/ENQCMDS get [`StoreReply::Retry`] (ZF=1), as a store that no
/// device accepted.
pub struct PciMmioWindows {
    root: PciRoot,
}

impl PciMmioWindows {
    pub(super) fn new(root: PciRoot) -> Self {
        Self { root }
    }
}

impl BusDevice for PciMmioWindows {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        let addr = base.wrapping_add(offset);
        match self.root.route(addr, data.len()) {
            Some((route, offset)) => lock(&route.device).bar_read(route.bar.index, offset, data),
            None => {
                trace!("pci: unclaimed read at {addr:#x}");
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        let addr = base.wrapping_add(offset);
        match self.root.route(addr, data.len()) {
            Some((route, offset)) => lock(&route.device).bar_write(route.bar.index, offset, data),
            None => trace!("pci: unclaimed write at {addr:#x} dropped"),
        }
    }

    fn store64(&mut self, base: u64, offset: u64, data: &[u8; 64], kind: StoreKind) -> StoreReply {
        let addr = base.wrapping_add(offset);
        match self.root.route(addr, data.len()) {
            Some((route, offset)) => {
                lock(&route.device).bar_store64(route.bar.index, offset, data, kind)
            }
            None => {
                trace!("pci: unclaimed {kind:?} at {addr:#x}");
                // A posted store nobody claims is lost; a non-posted
                // enqueue nobody claims is not accepted.
                kind.reply_without_enqueue_target()
            }
        }
    }
}
