//! The vDSA as the guest's PCI function: the VMM boundary where enqueued
//! descriptors get host PASIDs.

use std::sync::Arc;

use bus::{StoreKind, StoreReply};
use pasid::PasidTranslator;
use pci::{MappedBar, PciAddress, PciDevice};
use vdsa::Dsa;

use super::guest_pasids::GuestPasids;

/// The BAR holding the vDSA's portals.
const PORTAL_BAR: u8 = 2;
/// Descriptor dword 0, bits 19:0: the PASID of an ENQCMD/ENQCMDS command.
const DESC_PASID_MASK: u32 = 0x000f_ffff;

/// The vDSA's PASID translation for one guest and one requester ID.
pub struct DevicePasids {
    pasids: Arc<GuestPasids>,
    rid: PciAddress,
}

impl DevicePasids {
    /// The translation of device `rid` of the guest whose PASIDs are
    /// `pasids`.
    pub fn new(pasids: Arc<GuestPasids>, rid: PciAddress) -> Self {
        Self { pasids, rid }
    }
}

impl PasidTranslator for DevicePasids {
    fn to_host(&self, guest: u32) -> u32 {
        self.pasids.host_pasid_for_device(Some(self.rid), guest)
    }

    fn to_guest(&self, host: u32) -> Option<u32> {
        self.pasids.guest_pasid(host)
    }
}

/// A vDSA function on the guest's PCI bus.
///
/// Everything passes through to the device except ENQCMD and ENQCMDS
/// stores to its portals, whose command dword 0 carries a guest PASID (from
/// the vCPU's IA32_PASID, or from the ENQCMDS source): it is replaced by
/// the host PASID. A guest PASID with no host PASID that the vIOMMU does
/// not confirm is not enqueued: the instruction answers Retry (ZF=1), what
/// ENQCMD reports for a command the device did not take, and the device
/// never sees it.
pub struct DsaFunction {
    dsa: Dsa,
    rid: PciAddress,
    pasids: Arc<GuestPasids>,
}

impl DsaFunction {
    /// `dsa`, at requester ID `rid`, in the guest whose PASIDs are `pasids`.
    pub fn new(dsa: Dsa, rid: PciAddress, pasids: Arc<GuestPasids>) -> Self {
        Self { dsa, rid, pasids }
    }

    /// The device model.
    pub fn device(&self) -> &Dsa {
        &self.dsa
    }
}

/// The enqueue command with its guest PASID replaced by `pasids`'s host
/// PASID, or `None` when the guest PASID has none.
pub fn translate_enqueue(
    pasids: &GuestPasids,
    rid: PciAddress,
    data: &[u8; 64],
) -> Option<[u8; 64]> {
    let dword0 = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let gpasid = dword0 & DESC_PASID_MASK;
    match pasids.host_pasid(Some(rid), gpasid) {
        Ok(hpasid) => {
            let mut out = *data;
            let dword0 = (dword0 & !DESC_PASID_MASK) | hpasid;
            out[..4].copy_from_slice(&dword0.to_le_bytes());
            Some(out)
        }
        Err(miss) => {
            log::debug!("{rid}: enqueue not accepted: {miss}");
            None
        }
    }
}

impl PciDevice for DsaFunction {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.dsa.config_read(offset, data)
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.dsa.config_write(offset, data)
    }

    fn mapped_bars(&self) -> Vec<MappedBar> {
        self.dsa.mapped_bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        self.dsa.bar_read(bar, offset, data)
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        self.dsa.bar_write(bar, offset, data)
    }

    fn bar_store64(
        &mut self,
        bar: u8,
        offset: u64,
        data: &[u8; 64],
        kind: StoreKind,
    ) -> StoreReply {
        if bar != PORTAL_BAR || kind == StoreKind::Movdir64b {
            return self.dsa.bar_store64(bar, offset, data, kind);
        }
        // Held until the descriptor is queued: a teardown of its PASID
        // waits for it before the host PASID can be freed.
        let _submission = self.pasids.submission();
        match translate_enqueue(&self.pasids, self.rid, data) {
            Some(command) => self.dsa.bar_store64(bar, offset, &command, kind),
            None => StoreReply::Retry,
        }
    }
}
