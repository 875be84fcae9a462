//! The vDSA's path to memory through the vIOMMU, and the vIOMMU's path
//! back to the vDSA.
//!
//! The device tags its requests with host PASIDs; the guest's PASID tables
//! are indexed by guest PASIDs. [`ViommuDma`] maps each host PASID back
//! through the guest's table ([`GuestPasids::guest_pasid`]) and asks the
//! vIOMMU to translate with the guest's PASID-table entry (an unverified
//! host PASID maps back too, and fails or not as the guest's tables say).
//! A host PASID that does not map back (the quarantine PASID, a PASID the guest tore down, or
//! one that is not this guest's) fails as a request whose PASID has no
//! PASID-table entry would: a translation error, which the device reports
//! as such (completion status 0x22, or SWERROR when even the completion
//! record cannot be written). No request of one guest ever reaches the
//! vIOMMU (or the memory) of another: the adapter belongs to one guest.

use std::sync::{Arc, OnceLock, Weak};

use pci::PciAddress;
use vdsa::dma::{
    AddressSpace, DmaFault, DmaPort, FaultKind, IdentityDma, PageRequest, PageResponseCode,
    PasidTag, Translation,
};
use vdsa::DsaIommuHandle;
use viommu::{
    tables::Pgtt, AccessType, AtsDevice, DeviceTlbInvalidation, DmaErrorKind, Generation, Iommu,
    PageGroupResponse, ResponseCode,
};
use vm_memory::GuestMemoryMmap;

use super::guest_pasids::{address_space_key, GuestPasids, PasidAuthority, PasidSetup};

/// Guest memory as the vIOMMU and the devices hold it.
pub type GuestMem = Arc<GuestMemoryMmap>;

/// The vIOMMU of a machine.
pub type Viommu = Iommu<GuestMem>;

/// The vIOMMU as the judge of which guest PASIDs exist: a PASID is set up
/// when the unit resolves a present PASID-table entry for it, for the
/// device asking, or for any of the devices behind the unit.
///
/// It holds the unit weakly: the unit holds the guest's PASIDs (as an
/// observer), which hold their authority, so a strong reference would keep
/// both, and the guest's host PASIDs, alive after the VM. A unit that is
/// gone confirms no PASID.
pub struct ViommuAuthority {
    iommu: Weak<Viommu>,
    rids: Vec<PciAddress>,
}

impl ViommuAuthority {
    /// Checks with `iommu`; `rids` are the devices behind it.
    pub fn new(iommu: &Arc<Viommu>, rids: Vec<PciAddress>) -> Self {
        Self {
            iommu: Arc::downgrade(iommu),
            rids,
        }
    }
}

impl PasidAuthority for ViommuAuthority {
    fn pasid_setup(&self, rid: Option<PciAddress>, gpasid: u32) -> Option<PasidSetup> {
        let iommu = self.iommu.upgrade()?;
        let rids = match rid.as_ref() {
            Some(r) => std::slice::from_ref(r),
            None => &self.rids[..],
        };
        rids.iter()
            .find_map(|&r| iommu.resolve_pasid(r, gpasid).ok())
            .map(|entry| setup_of(&entry))
    }

    fn generation(&self) -> Option<Generation> {
        self.iommu.upgrade().map(|iommu| iommu.generation_handle())
    }

    /// The first device's present entry lasts (the unit caches it until an
    /// invalidation); one found for a later device does not: the first
    /// device's entry may become present without an invalidation.
    fn lasting_setup(&self, gpasid: u32) -> (Option<PasidSetup>, bool) {
        let Some(iommu) = self.iommu.upgrade() else {
            return (None, false);
        };
        self.rids
            .iter()
            .enumerate()
            .find_map(|(i, &r)| {
                iommu
                    .resolve_pasid(r, gpasid)
                    .ok()
                    .map(|entry| (setup_of(&entry), i == 0))
            })
            .map_or((None, false), |(setup, lasting)| (Some(setup), lasting))
    }
}

fn setup_of(entry: &viommu::tables::PasidEntry) -> PasidSetup {
    PasidSetup {
        first_stage_root: matches!(entry.pgtt, Pgtt::FirstStage | Pgtt::Nested)
            .then(|| address_space_key(entry.flptr)),
    }
}

/// A device's [`DmaPort`] through the vIOMMU.
pub struct ViommuDma {
    iommu: Arc<Viommu>,
    memory: IdentityDma<GuestMem>,
    rid: PciAddress,
    pasids: Arc<GuestPasids>,
    device: OnceLock<DsaIommuHandle>,
}

impl ViommuDma {
    /// The port of the function at `rid`.
    pub fn new(
        iommu: Arc<Viommu>,
        memory: GuestMem,
        rid: PciAddress,
        pasids: Arc<GuestPasids>,
    ) -> Self {
        Self {
            iommu,
            memory: IdentityDma::new(memory),
            rid,
            pasids,
            device: OnceLock::new(),
        }
    }

    /// Where the vIOMMU's own answers to page requests go (a request it
    /// refuses is answered at once).
    pub fn connect(&self, device: DsaIommuHandle) {
        let _ = self.device.set(device);
    }

    /// The guest's view of a request's PASID prefix: `Err` when the host
    /// PASID is not one of the guest's.
    fn guest_tag(&self, tag: Option<PasidTag>) -> Result<Option<viommu::PasidTag>, ()> {
        match tag {
            None => Ok(None),
            Some(t) => match self.pasids.guest_pasid_of_request(self.rid, t.pasid) {
                Some(pasid) => Ok(Some(viommu::PasidTag {
                    pasid,
                    privileged: t.privileged,
                })),
                None => {
                    log::debug!(
                        "{}: host PASID {:#x} is not the guest's: translation error",
                        self.rid,
                        t.pasid
                    );
                    Err(())
                }
            },
        }
    }

    fn access(
        &self,
        space: AddressSpace,
        addr: u64,
        write: bool,
        dma: impl FnOnce(Option<viommu::PasidTag>) -> Result<(), viommu::DmaError>,
        direct: impl FnOnce(&IdentityDma<GuestMem>) -> Result<(), DmaFault>,
    ) -> Result<(), DmaFault> {
        let tag = match space {
            AddressSpace::Translated => return direct(&self.memory),
            AddressSpace::Untranslated(tag) => tag,
        };
        let Ok(tag) = self.guest_tag(tag) else {
            return Err(DmaFault {
                done: 0,
                addr,
                write,
                kind: FaultKind::TranslationError,
            });
        };
        dma(tag).map_err(|e| DmaFault {
            done: e.completed,
            addr: e.address,
            write,
            kind: fault_kind(e.kind),
        })
    }
}

/// How a vIOMMU failure looks to the device: faults a page request may
/// resolve are page faults; the rest are translation errors; a translated
/// address outside guest RAM is unmapped.
fn fault_kind(kind: DmaErrorKind) -> FaultKind {
    match kind {
        DmaErrorKind::Fault(viommu::DmaFault::Translation { reason, .. })
            if reason.is_permission_like() =>
        {
            FaultKind::PageFault
        }
        DmaErrorKind::Fault(_) => FaultKind::TranslationError,
        DmaErrorKind::Memory { .. } => FaultKind::Unmapped,
    }
}

fn response_code(code: ResponseCode) -> PageResponseCode {
    match code {
        ResponseCode::Success => PageResponseCode::Success,
        ResponseCode::InvalidRequest => PageResponseCode::InvalidRequest,
        ResponseCode::Failure | ResponseCode::Reserved(_) => PageResponseCode::ResponseFailure,
    }
}

impl DmaPort for ViommuDma {
    fn read(&self, space: AddressSpace, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let (iommu, rid) = (&self.iommu, self.rid);
        // Both closures need the buffer; only one runs.
        let buf = std::cell::RefCell::new(buf);
        self.access(
            space,
            addr,
            false,
            |tag| iommu.dma_read(rid, tag, addr, &mut buf.borrow_mut()),
            |direct| direct.read(space, addr, &mut buf.borrow_mut()),
        )
    }

    fn write(&self, space: AddressSpace, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        let (iommu, rid) = (&self.iommu, self.rid);
        self.pasids
            .device_writes()
            .record(rid, space, addr, data.len());
        self.access(
            space,
            addr,
            true,
            |tag| iommu.dma_write(rid, tag, addr, data),
            |direct| direct.write(space, addr, data),
        )
    }

    /// Memory to memory through the vIOMMU, without a bounce buffer.
    fn copy(&self, space: AddressSpace, src: u64, dst: u64, len: usize) -> Result<(), DmaFault> {
        self.pasids
            .device_writes()
            .record(self.rid, space, dst, len);
        let tag = match space {
            AddressSpace::Translated => return self.memory.copy(space, src, dst, len),
            AddressSpace::Untranslated(tag) => tag,
        };
        let Ok(tag) = self.guest_tag(tag) else {
            return Err(DmaFault {
                done: 0,
                addr: src,
                write: false,
                kind: FaultKind::TranslationError,
            });
        };
        self.iommu
            .dma_copy(self.rid, tag, src, dst, len)
            .map_err(|e| DmaFault {
                done: e.error.completed,
                addr: e.error.address,
                write: e.write,
                kind: fault_kind(e.error.kind),
            })
    }

    /// ATS translation: asked as a write first, so a writable page comes
    /// back writable (and dirty, as the device may write it); a page the
    /// guest mapped read-only comes back read-only.
    fn translate(
        &self,
        pasid: Option<PasidTag>,
        addr: u64,
    ) -> Option<Result<Translation, DmaFault>> {
        let fault = |kind| DmaFault {
            done: 0,
            addr,
            write: false,
            kind,
        };
        let Ok(tag) = self.guest_tag(pasid) else {
            return Some(Err(fault(FaultKind::TranslationError)));
        };
        let ask = |write| {
            self.iommu.ats_translate(
                self.rid,
                tag,
                addr,
                AccessType {
                    write,
                    user: !tag.is_some_and(|t| t.privileged),
                    execute: false,
                },
            )
        };
        let answer = match ask(true) {
            Ok(c) if !c.read => ask(false),
            other => other,
        };
        Some(match answer {
            Ok(c) => Ok(Translation {
                addr: c.translated_addr,
                size: c.size,
                read: c.read,
                write: c.write,
            }),
            Err(_) => Err(fault(FaultKind::TranslationError)),
        })
    }

    fn page_request(&self, request: PageRequest) {
        let respond = |code| {
            if let Some(device) = self.device.get() {
                device.page_response(request.prg_index, code);
            }
        };
        let Ok(tag) = self.guest_tag(request.pasid) else {
            return respond(PageResponseCode::InvalidRequest);
        };
        let posted = self.iommu.page_request(&viommu::PageRequest {
            requester_id: self.rid,
            pasid: tag,
            address: request.addr,
            read: request.read,
            write: request.write,
            execute: false,
            last_in_group: request.last,
            prg_index: request.prg_index,
            private_data: None,
        });
        if let Err(e) = posted {
            log::debug!("{}: {e}", self.rid);
            if let Some(response) = e.response {
                respond(response_code(response.code));
            }
        }
    }
}

/// The vIOMMU's callbacks into one vDSA: device-TLB invalidations (guest
/// PASIDs become host PASIDs) and page group responses.
pub struct DsaAtsBridge {
    device: DsaIommuHandle,
    pasids: Arc<GuestPasids>,
}

impl DsaAtsBridge {
    /// The bridge to `device` of the guest whose PASIDs are `pasids`.
    pub fn new(device: DsaIommuHandle, pasids: Arc<GuestPasids>) -> Self {
        Self { device, pasids }
    }
}

impl AtsDevice for DsaAtsBridge {
    fn invalidate_device_tlb(&self, inv: &DeviceTlbInvalidation) {
        // Every host PASID standing for the guest PASID. One with none any
        // more (torn down before its device-TLB invalidation) has nothing of
        // its own cached: its host PASIDs' entries went when the mapping
        // did. Invalidate every PASID then, which is never wrong.
        let hosts = inv.pasid.map(|g| self.pasids.host_pasids_of(g));
        match hosts {
            Some(hosts) if !hosts.is_empty() => {
                for h in hosts {
                    self.device
                        .invalidate_device_tlb(Some(h), inv.address, inv.size);
                }
            }
            _ => self
                .device
                .invalidate_device_tlb(None, inv.address, inv.size),
        }
    }

    fn page_group_response(&self, response: &PageGroupResponse) {
        self.device
            .page_response(response.prg_index, response_code(response.code));
    }
}
