//! The PASID mapper, the DMA adapter over a real vIOMMU with scalable-mode
//! tables in guest memory, and the vDSA behind both (no KVM needed).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use bus::{StoreKind, StoreReply};
use pasid::{Ia32Pasid, PasidSpace, Scope};
use pci::MsiRecorder;
use vdsa::dma::{AddressSpace, DmaFault, DmaPort, FaultKind, PasidTag};
use vdsa::wqcfg::mode;
use viommu::paging::builder::PageTableBuilder;
use viommu::paging::{entry, PagingLevels};
use viommu::regs::{gcmd, iqa, rtaddr, FSTS, GCMD, GSTS, IQA, IQT, PQA, PQT, RTADDR};
use viommu::{PasidCacheScope, PasidObserver};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

const VALID: u64 = Ia32Pasid::VALID;

/// A PASID authority the test sets up by hand.
#[derive(Default)]
struct FakeIommu(Mutex<HashMap<u32, PasidSetup>>);

impl FakeIommu {
    fn set(&self, gpasid: u32, root: Option<u64>) {
        self.0.lock().unwrap().insert(
            gpasid,
            PasidSetup {
                first_stage_root: root,
            },
        );
    }

    fn tear_down(&self, gpasid: u32) {
        self.0.lock().unwrap().remove(&gpasid);
    }
}

impl PasidAuthority for FakeIommu {
    fn pasid_setup(&self, _rid: Option<pci::PciAddress>, gpasid: u32) -> Option<PasidSetup> {
        self.0.lock().unwrap().get(&gpasid).copied()
    }
}

fn guest(space: &Arc<PasidSpace>, name: &str) -> (Arc<GuestPasids>, Arc<FakeIommu>) {
    let pasids = Arc::new(GuestPasids::new(space.clone(), name).unwrap());
    let iommu = Arc::new(FakeIommu::default());
    pasids.set_authority(iommu.clone());
    (pasids, iommu)
}

#[test]
fn lazy_fill_only_after_the_viommu_confirms() {
    let space = Arc::new(PasidSpace::new());
    let (pasids, iommu) = guest(&space, "g");
    assert_eq!(pasids.host_pasid(Some(DEV), 5), Err(PasidMiss::NotSetUp(5)));
    assert!(pasids.table().is_empty(), "a miss allocates nothing");
    iommu.set(5, None);
    let h = pasids.host_pasid(Some(DEV), 5).unwrap();
    assert_eq!(pasids.host_pasid(Some(DEV), 5), Ok(h), "filled once");
    assert_eq!(pasids.guest_pasid(h), Some(5));
    assert_eq!(pasids.table().len(), 1);
    assert_eq!(pasids.host_pasid(None, 0), Err(PasidMiss::Invalid(0)));
    assert_eq!(
        pasids.host_pasid(None, 1 << 20),
        Err(PasidMiss::Invalid(1 << 20))
    );
    // Where the device must get some PASID (WQCFG), a guest PASID the
    // vIOMMU does not confirm gets an unverified host PASID: it maps back
    // to the guest PASID, stays out of the table (ENQCMD never uses it),
    // and is the same every time.
    let u = pasids.host_pasid_for_device(Some(DEV), 6);
    assert_eq!(pasids.guest_pasid(u), Some(6));
    assert_eq!(
        pasids.table().translate(6),
        Err(pasid::Error::TranslationFault(6))
    );
    assert_eq!(pasids.host_pasid(Some(DEV), 6), Err(PasidMiss::NotSetUp(6)));
    assert_eq!(pasids.host_pasid_for_device(Some(DEV), 6), u);
    assert_eq!(pasids.host_pasids_of(6), vec![u]);
    assert_eq!(space.owner_of(Scope::Global, u), Some(pasids.owner()));
    // PASID 0 gets the quarantine PASID, which maps back to nothing.
    let q = pasids.host_pasid_for_device(Some(DEV), 0);
    assert_eq!(q, pasids.quarantine());
    assert_eq!(pasids.guest_pasid(q), None);
    assert_eq!(space.owner_of(Scope::Global, q), Some(pasids.owner()));
    // Once the guest sets it up, ENQCMD gets a mapping of its own.
    iommu.set(6, None);
    let h6 = pasids.host_pasid(Some(DEV), 6).unwrap();
    assert_ne!(h6, u);
    assert_eq!(pasids.host_pasids_of(6), vec![h6, u]);
}

#[test]
fn without_a_viommu_every_pasid_maps_up_to_the_guest_limit() {
    let space = Arc::new(PasidSpace::new());
    let pasids = GuestPasids::new(space.clone(), "no-iommu").unwrap();
    let h = pasids.host_pasid(None, 0xabcde).unwrap();
    assert_eq!(pasids.guest_pasid(h), Some(0xabcde));
    // The quarantine PASID and the mapping are charged to the guest.
    assert_eq!(space.charged(pasids.owner()), Ok(2));
    assert_eq!(space.limit(pasids.owner()), Ok(Some(GUEST_PASID_LIMIT)));
}

#[test]
fn teardown_through_the_observer_frees_the_host_pasid() {
    let space = Arc::new(PasidSpace::new());
    let (pasids, iommu) = guest(&space, "g");
    let freed = Arc::new(Mutex::new(Vec::new()));
    let log = freed.clone();
    pasids.on_host_pasid_freed(Arc::new(move |h| log.lock().unwrap().push(h)));
    iommu.set(5, None);
    iommu.set(6, None);
    let h5 = pasids.host_pasid(None, 5).unwrap();
    let h6 = pasids.host_pasid(None, 6).unwrap();
    // An invalidation of a PASID the guest still has changes nothing.
    pasids.pasid_cache_invalidated(PasidCacheScope::Pasid { did: 1, pasid: 5 });
    assert_eq!(pasids.table().entries(), vec![(5, h5), (6, h6)]);
    iommu.tear_down(5);
    pasids.pasid_cache_invalidated(PasidCacheScope::Pasid { did: 1, pasid: 5 });
    assert_eq!(pasids.table().entries(), vec![(6, h6)]);
    assert_eq!(pasids.guest_pasid(h5), None);
    assert_eq!(space.owner_of(Scope::Global, h5), None, "h5 is free");
    assert_eq!(*freed.lock().unwrap(), vec![h5]);
    // A global invalidation re-checks every mapping.
    iommu.tear_down(6);
    pasids.pasid_cache_invalidated(PasidCacheScope::Global);
    assert!(pasids.table().is_empty());
    assert_eq!(*freed.lock().unwrap(), vec![h5, h6]);
    assert_eq!(space.charged(pasids.owner()), Ok(1), "only the quarantine");
}

#[test]
fn two_vms_in_one_process_get_different_host_pasids() {
    let space = Arc::new(PasidSpace::new());
    let (a, ia) = guest(&space, "a");
    let (b, ib) = guest(&space, "b");
    ia.set(5, None);
    ib.set(5, None);
    let (ha, hb) = (
        a.host_pasid(None, 5).unwrap(),
        b.host_pasid(None, 5).unwrap(),
    );
    assert_ne!(ha, hb);
    assert_eq!((a.guest_pasid(hb), b.guest_pasid(ha)), (None, None));
    assert_eq!(
        (a.guest_pasid(b.quarantine()), a.guest_pasid(a.quarantine())),
        (None, None)
    );
    let owner = a.owner();
    drop(a);
    drop(b);
    assert_eq!(space.allocated(), 0, "every host PASID returned");
    assert_eq!(
        space.charged(owner),
        Err(pasid::Error::UnknownOwner(owner)),
        "the guest left the space"
    );
}

#[test]
fn ia32_pasid_follows_the_address_space() {
    let space = Arc::new(PasidSpace::new());
    let (pasids, iommu) = guest(&space, "g");
    let (cr3_a, cr3_b, cr3_c) = (0x10_0000u64, 0x20_0000u64, 0x30_0000u64);
    iommu.set(5, Some(cr3_a));
    iommu.set(6, Some(cr3_b));
    pasids.record_msr_write(cr3_a, VALID | 5);
    pasids.record_msr_write(cr3_b, VALID | 6);
    // Alternating on one vCPU: each address space keeps its own PASID,
    // whatever was written last; PCID bits and the PTI user-PGD bit do
    // not matter.
    for _ in 0..3 {
        assert_eq!(pasids.enqcmd_pasid(cr3_a | 0x1003), VALID | 5);
        assert_eq!(pasids.enqcmd_pasid(cr3_b), VALID | 6);
    }
    // A fresh process has none: ENQCMD takes #GP.
    assert_eq!(pasids.enqcmd_pasid(cr3_c), 0);
    // The guest points PASID 6 at other page tables: the stale address
    // space loses it for good.
    iommu.set(6, Some(cr3_c));
    assert_eq!(pasids.enqcmd_pasid(cr3_b), 0);
    iommu.set(6, Some(cr3_b));
    assert_eq!(pasids.enqcmd_pasid(cr3_b), 0);
    // A PASID without any entry keeps its record: the ENQCMD goes out
    // with it and the portal refuses it.
    iommu.tear_down(5);
    assert_eq!(pasids.enqcmd_pasid(cr3_a), VALID | 5);
    // Clearing the MSR's valid bit forgets the address space's PASID.
    pasids.record_msr_write(cr3_a, 0);
    assert_eq!(pasids.enqcmd_pasid(cr3_a), 0);
}

#[test]
fn teardown_forgets_the_address_spaces_of_the_pasid() {
    let space = Arc::new(PasidSpace::new());
    let (pasids, iommu) = guest(&space, "g");
    iommu.set(5, Some(0x10_0000));
    iommu.set(6, Some(0x20_0000));
    pasids.record_msr_write(0x10_0000, VALID | 5);
    // PASID 6 is recorded but no ENQCMD mapped it yet.
    pasids.record_msr_write(0x20_0000, VALID | 6);
    pasids.host_pasid(None, 5).unwrap();
    iommu.tear_down(5);
    iommu.tear_down(6);
    pasids.pasid_cache_invalidated(PasidCacheScope::Domain { did: 1 });
    // Even with the PASIDs set up again for those page tables, the old
    // MSR values are not revived: the tasks must load them again (#GP
    // fixup).
    iommu.set(5, Some(0x10_0000));
    iommu.set(6, Some(0x20_0000));
    assert_eq!(pasids.enqcmd_pasid(0x10_0000), 0);
    assert_eq!(pasids.enqcmd_pasid(0x20_0000), 0);
}

#[test]
fn enqueue_commands_get_the_host_pasid_and_keep_the_rest() {
    let space = Arc::new(PasidSpace::new());
    let (pasids, iommu) = guest(&space, "g");
    let mut cmd = [0x5au8; 64];
    cmd[..4].copy_from_slice(&(0x8000_0000u32 | 5).to_le_bytes());
    assert_eq!(translate_enqueue(&pasids, DEV, &cmd), None, "not set up");
    iommu.set(5, None);
    let out = translate_enqueue(&pasids, DEV, &cmd).unwrap();
    let h = pasids.table().translate(5).unwrap();
    assert_eq!(
        u32::from_le_bytes(out[..4].try_into().unwrap()),
        0x8000_0000 | h
    );
    assert_eq!(out[4..], cmd[4..]);
}

#[test]
fn placements_match_the_root_complex() {
    let mem: GuestMem =
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
    let space = Arc::new(PasidSpace::new());
    let pasids = Arc::new(GuestPasids::new(space, "g").unwrap());
    let root = crate::pci_root::PciRoot::new();
    let configs = [
        vdsa::DsaConfig::default(),
        vdsa::DsaConfig {
            num_wqs: 1,
            ..Default::default()
        },
        vdsa::DsaConfig::default(),
    ];
    let attached = attach_devices(
        &pasids,
        mem,
        Arc::new(MsiRecorder::new()),
        None,
        &root,
        &configs,
    )
    .unwrap();
    assert_eq!(attached.dsa, dsa_placements(&configs));
    assert!(attached.dmar.is_none());
    assert_eq!(attached.dsa[0].bar2, crate::layout::PCI_MMIO64_START);
}

// ---- A guest with scalable-mode tables, for the vIOMMU-backed paths. ----

/// Requester ID of the device under test (00:01.0).
const RID: u16 = 0x08;
/// [`RID`] as the function it names.
const DEV: pci::PciAddress = pci::PciAddress::from_rid(RID);
const MEM_SIZE: usize = 32 << 20;
/// Guest PASID of the test process.
const GPASID: u32 = 5;
/// Domain ID of its PASID entry.
const DID: u16 = 1;
/// Where the process's buffer lives (guest virtual) and its backing page.
const IOVA: u64 = 0x7f00_0000_0000;
const GPA: u64 = 0x80_0000;
/// Page-table area.
const TABLES: u64 = 0x100_0000;

// Scalable-mode structure bits (VT-d 9.4, 9.6).
const PRESENT: u64 = 1;
const CONTEXT_PASIDE: u64 = 1 << 3;
const CONTEXT_PRE: u64 = 1 << 4;
const CONTEXT_DTE: u64 = 1 << 2;
const CONTEXT_PDTS_1M: u64 = 7 << 9;
const PASID_AW_4LEVEL: u64 = 2 << 2;
const PASID_PGTT_FIRST_STAGE: u64 = 1 << 6;
const PASID_DESC_TYPE: u64 = 7;
const PASID_DESC_SELECTIVE: u64 = 1 << 4;
const WAIT_DESC: u64 = 5 | (1 << 5) | (1 << 6);

struct ScalableGuest {
    mem: GuestMem,
    iommu: Arc<Viommu>,
    next_page: u64,
    queue: u64,
    tail: u64,
    pasid_table: u64,
    /// Page request queue (one page).
    prq: u64,
    /// The PTE of `IOVA + 0x1000`, not present until a test fills it.
    spare_pte: u64,
}

impl ScalableGuest {
    /// Translation on, queued invalidation on, `RID` with PASIDs enabled,
    /// `GPASID` a first-stage entry over page tables mapping `IOVA` to
    /// `GPA` (user, writable).
    fn new() -> (Self, u64) {
        let mem: GuestMem =
            Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let iommu = Arc::new(Viommu::new(mem.clone(), Arc::new(MsiRecorder::new())));
        let mut g = ScalableGuest {
            mem,
            iommu,
            next_page: 0x1_0000,
            queue: 0,
            tail: 0,
            pasid_table: 0,
            prq: 0,
            spare_pte: 0,
        };
        let root = g.page();
        let context_table = g.page();
        let pasid_dir = g.alloc(32);
        g.pasid_table = g.page();
        g.queue = g.page();
        g.prq = g.page();
        g.write(root + u64::from(RID >> 8) * 16, context_table | PRESENT);
        let context = context_table + u64::from(RID & 0x7f) * 32;
        g.write(
            context,
            pasid_dir | CONTEXT_PDTS_1M | CONTEXT_PRE | CONTEXT_PASIDE | CONTEXT_DTE | PRESENT,
        );
        g.write(
            pasid_dir + u64::from(GPASID >> 6) * 8,
            g.pasid_table | PRESENT,
        );
        let mut tables =
            PageTableBuilder::new(&*g.mem, PagingLevels::Four, TABLES, TABLES + 0x10_0000).unwrap();
        let flags = entry::PRESENT | entry::WRITABLE | entry::USER | entry::ACCESSED;
        tables.map(IOVA, GPA, 0x1000, flags).unwrap();
        tables
            .map(IOVA + 0x1000, GPA + 0x1000, 0x1000, flags)
            .unwrap();
        g.spare_pte = tables.entry_addr(IOVA + 0x1000, 1).unwrap();
        g.write(g.spare_pte, 0);
        let pgd = tables.root();
        g.set_first_stage(pgd);

        g.mmio64(RTADDR, root | (rtaddr::TTM_SCALABLE << 10));
        g.gcmd(gcmd::SRTP);
        g.mmio64(IQA, g.queue | iqa::DW);
        g.mmio64(PQA, g.prq);
        g.gcmd(gcmd::QIE);
        g.gcmd(gcmd::TE);
        (g, pgd)
    }

    fn alloc(&mut self, pages: u64) -> u64 {
        let at = self.next_page;
        self.next_page += pages * 0x1000;
        at
    }

    fn page(&mut self) -> u64 {
        self.alloc(1)
    }

    fn write(&self, at: u64, v: u64) {
        self.mem.write_obj(v, GuestAddress(at)).unwrap();
    }

    fn mmio64(&self, offset: u64, v: u64) {
        self.iommu.mmio_write(offset, &v.to_le_bytes());
    }

    fn gcmd(&self, bit: u32) {
        let mut sts = [0u8; 4];
        self.iommu.mmio_read(GSTS, &mut sts);
        let persistent = u32::from_le_bytes(sts) & (gcmd::TE | gcmd::QIE);
        self.iommu
            .mmio_write(GCMD, &(persistent | bit).to_le_bytes());
    }

    /// GPASID's entry: first stage at `pgd`, user requests only.
    fn set_first_stage(&self, pgd: u64) {
        let entry = self.pasid_table + u64::from(GPASID & 0x3f) * 64;
        self.write(entry, PASID_PGTT_FIRST_STAGE | PASID_AW_4LEVEL | PRESENT);
        self.write(entry + 8, u64::from(DID));
        self.write(entry + 16, pgd);
    }

    /// What intel_pasid_tear_down_entry does: clear the entry, then a
    /// PASID-selective PASID-cache invalidation and a wait.
    fn tear_down(&mut self) {
        let entry = self.pasid_table + u64::from(GPASID & 0x3f) * 64;
        for qw in 0..8 {
            self.write(entry + qw * 8, 0);
        }
        let inv = PASID_DESC_TYPE
            | PASID_DESC_SELECTIVE
            | (u64::from(DID) << 16)
            | (u64::from(GPASID) << 32);
        self.submit([inv, 0]);
    }

    /// Queues `descriptor` and a status-write wait, as qi_submit_sync does,
    /// and checks the wait completed.
    fn submit(&mut self, descriptor: [u64; 2]) {
        let status = self.next_page;
        self.write(status, 0);
        for (i, [qw0, qw1]) in [descriptor, [WAIT_DESC | (1 << 32), status]]
            .into_iter()
            .enumerate()
        {
            // A one-page queue of 256-bit descriptors: 128 slots.
            let at = self.queue + (self.tail + i as u64) % 128 * 32;
            self.write(at, qw0);
            self.write(at + 8, qw1);
        }
        self.tail = (self.tail + 2) % 128;
        self.mmio64(IQT, self.tail << 5);
        assert_eq!(self.mem.read_obj::<u32>(GuestAddress(status)).unwrap(), 1);
    }
}

fn user(pasid: u32) -> AddressSpace {
    AddressSpace::Untranslated(Some(PasidTag {
        pasid,
        privileged: false,
    }))
}

#[test]
fn dma_with_a_host_pasid_uses_the_guests_pasid_entry() {
    let (g, pgd) = ScalableGuest::new();
    let pasids = Arc::new(GuestPasids::new(Arc::new(PasidSpace::new()), "g").unwrap());
    pasids.set_authority(Arc::new(ViommuAuthority::new(&g.iommu, vec![DEV])));
    assert_eq!(
        pasids.host_pasid(Some(DEV), GPASID + 1),
        Err(PasidMiss::NotSetUp(GPASID + 1)),
        "no PASID-table entry"
    );
    let h = pasids.host_pasid(Some(DEV), GPASID).unwrap();
    let port = ViommuDma::new(g.iommu.clone(), g.mem.clone(), DEV, pasids.clone());
    port.write(user(h), IOVA + 0x10, b"through the guest's tables")
        .unwrap();
    let mut back = [0u8; 26];
    g.mem
        .read_slice(&mut back, GuestAddress(GPA + 0x10))
        .unwrap();
    assert_eq!(&back, b"through the guest's tables");
    let mut buf = [0u8; 26];
    port.read(user(h), IOVA + 0x10, &mut buf).unwrap();
    assert_eq!(buf, back);
    // Not mapped in the process: a page fault, progress reported.
    assert_eq!(
        port.read(user(h), IOVA + 0xff8, &mut [0u8; 16]),
        Err(DmaFault {
            done: 8,
            addr: IOVA + 0x1000,
            write: false,
            kind: FaultKind::PageFault
        })
    );
    // A host PASID that is not this guest's: a translation error, and the
    // vIOMMU is never asked.
    for other in [pasids.quarantine(), h + 1] {
        assert_eq!(
            port.read(user(other), IOVA, &mut [0u8; 4]),
            Err(DmaFault {
                done: 0,
                addr: IOVA,
                write: false,
                kind: FaultKind::TranslationError
            })
        );
    }
    // ATS: a writable page comes back writable.
    let t = port.translate(
        Some(PasidTag {
            pasid: h,
            privileged: false,
        }),
        IOVA + 0x20,
    );
    let t = t.unwrap().unwrap();
    assert_eq!((t.addr, t.size, t.read, t.write), (GPA, 0x1000, true, true));
    // Translated requests reach guest-physical memory directly.
    port.write(AddressSpace::Translated, GPA, b"xy").unwrap();
    assert_eq!(
        g.mem.read_obj::<[u8; 2]>(GuestAddress(GPA)).unwrap(),
        *b"xy"
    );
    // ENQCMD's staleness check sees the entry's page tables.
    assert_eq!(
        ViommuAuthority::new(&g.iommu, vec![DEV]).pasid_setup(None, GPASID),
        Some(PasidSetup {
            first_stage_root: Some(address_space_key(pgd))
        })
    );
}

#[test]
fn guest_pasid_teardown_unmaps_and_frees_through_the_viommu() {
    let (mut g, _) = ScalableGuest::new();
    let space = Arc::new(PasidSpace::new());
    let pasids = Arc::new(GuestPasids::new(space.clone(), "g").unwrap());
    pasids.set_authority(Arc::new(ViommuAuthority::new(&g.iommu, vec![DEV])));
    g.iommu.add_pasid_observer(pasids.clone());
    let h = pasids.host_pasid(Some(DEV), GPASID).unwrap();
    let port = ViommuDma::new(g.iommu.clone(), g.mem.clone(), DEV, pasids.clone());
    port.write(user(h), IOVA, &[1]).unwrap();
    g.tear_down();
    assert_eq!(pasids.guest_pasid(h), None, "unmapped");
    assert_eq!(space.owner_of(Scope::Global, h), None, "host PASID freed");
    assert_eq!(
        port.write(user(h), IOVA, &[2]).unwrap_err().kind,
        FaultKind::TranslationError
    );
    assert_eq!(
        pasids.host_pasid(Some(DEV), GPASID),
        Err(PasidMiss::NotSetUp(GPASID))
    );
}

/// A vDSA behind `g`'s vIOMMU, with PASID (and ATS if `ats`) enabled and
/// WQ 0 shared in group 0, enabled.
fn shared_wq_device(g: &ScalableGuest, ats: bool) -> (Arc<GuestPasids>, Accelerators) {
    wq_device(g, ats, mode::PASID_EN | WQCFG_PRIORITY_1)
}

/// [`shared_wq_device`] with WQCFG dword 2 `mode` (PRI enabled too when
/// it asks for block on fault).
fn wq_device(g: &ScalableGuest, ats: bool, mode: u32) -> (Arc<GuestPasids>, Accelerators) {
    wq_device_in(&Arc::new(PasidSpace::new()), g, ats, mode)
}

/// [`wq_device`] for a guest whose host PASIDs come from `space`.
fn wq_device_in(
    space: &Arc<PasidSpace>,
    g: &ScalableGuest,
    ats: bool,
    mode: u32,
) -> (Arc<GuestPasids>, Accelerators) {
    use vdsa::command::code;
    use vdsa::regs::{layout as regs, offset};
    let pasids = Arc::new(GuestPasids::new(space.clone(), "g").unwrap());
    let root = crate::pci_root::PciRoot::new();
    let attached = attach_devices(
        &pasids,
        g.mem.clone(),
        Arc::new(MsiRecorder::new()),
        Some(g.iommu.clone()),
        &root,
        &[vdsa::DsaConfig {
            interrupt_handles: false,
            ..Default::default()
        }],
    )
    .unwrap();
    assert_eq!(attached.dsa[0].bdf.rid(), RID);
    let function = attached.functions[0].clone();
    let mut guard = function.lock().unwrap();
    let dev: &mut dyn pci::PciDevice = &mut *guard;
    dev.config_write(0x04, &6u16.to_le_bytes());
    let pasid_cap = find_ext_cap(dev, EXT_CAP_PASID);
    dev.config_write(pasid_cap + 6, &1u16.to_le_bytes());
    if ats {
        let ats_cap = find_ext_cap(dev, EXT_CAP_ATS);
        dev.config_write(ats_cap + 6, &0x8000u16.to_le_bytes());
    }
    if mode & mode::BOF != 0 {
        // Block on fault needs PRI: 32 outstanding requests, enabled.
        let pri = find_ext_cap(dev, EXT_CAP_PRI);
        dev.config_write(pri + 0xc, &32u32.to_le_bytes());
        dev.config_write(pri + 4, &1u16.to_le_bytes());
    }
    let w32 =
        |dev: &mut dyn pci::PciDevice, at: u64, v: u32| dev.bar_write(0, at, &v.to_le_bytes());
    let w64 =
        |dev: &mut dyn pci::PciDevice, at: u64, v: u64| dev.bar_write(0, at, &v.to_le_bytes());
    w64(dev, regs::GRPCFG, 1);
    w64(dev, regs::GRPCFG + 32, 1);
    w32(dev, regs::WQCFG, 16);
    w32(dev, regs::WQCFG + 4, 8);
    w32(dev, regs::WQCFG + 8, mode);
    w32(dev, regs::WQCFG + 12, 31 | (10 << 5));
    for cmd in [code::ENABLE_DEVICE << 20, code::ENABLE_WQ << 20] {
        w32(dev, offset::CMD, cmd);
        let mut sts = [0u8; 4];
        loop {
            dev.bar_read(0, offset::CMDSTS, &mut sts);
            if u32::from_le_bytes(sts) & (1 << 31) == 0 {
                break;
            }
            std::thread::yield_now();
        }
        assert_eq!(u32::from_le_bytes(sts), 0, "command {cmd:#x}");
    }
    drop(guard);
    (pasids, attached)
}

/// ENQCMD-formats a 64-byte MEMMOVE in GPASID's address space (`IOVA` to
/// `IOVA + 0x100`, record at `IOVA + 0x800`) with guest PASID `gpasid`,
/// stores it at WQ 0's portal and returns the answer.
fn enqcmd_memmove(attached: &Accelerators, gpasid: u32) -> StoreReply {
    enqcmd_memmove_to(attached, gpasid, IOVA + 0x100, 0)
}

/// [`enqcmd_memmove`] to `dst`, with `flags` added.
fn enqcmd_memmove_to(attached: &Accelerators, gpasid: u32, dst: u64, flags: u32) -> StoreReply {
    let mut desc = vdsa::descriptor::Descriptor::new(
        vdsa::descriptor::Opcode::Memmove,
        vdsa::descriptor::flags::CRAV | vdsa::descriptor::flags::RCR | flags,
    );
    desc.set_pasid(gpasid, false)
        .set_completion_addr(IOVA + 0x800)
        .set_src(IOVA)
        .set_dst(dst)
        .set_xfer_size(0x40);
    let mut dev = attached.functions[0].lock().unwrap();
    pci::PciDevice::bar_store64(&mut *dev, 2, 0, &desc.0, StoreKind::Enqcmd)
}

/// Waits for the completion record of [`enqcmd_memmove`]; returns its status.
fn completion_status(g: &ScalableGuest) -> u8 {
    let start = std::time::Instant::now();
    loop {
        let status = g.mem.read_obj::<u8>(GuestAddress(GPA + 0x800)).unwrap();
        if status != 0 {
            return status;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::yield_now();
    }
}

#[test]
fn enqcmd_to_a_shared_wq_runs_in_the_guests_address_space() {
    // The whole path without KVM: a vDSA behind the vIOMMU, a shared WQ,
    // an ENQCMD-formatted MEMMOVE with the guest PASID at the portal.
    let (g, _) = ScalableGuest::new();
    let (pasids, attached) = shared_wq_device(&g, false);
    g.mem.write_slice(&[0xc3; 0x40], GuestAddress(GPA)).unwrap();
    assert_eq!(enqcmd_memmove(&attached, GPASID), StoreReply::Accepted);
    let h = pasids.table().translate(GPASID).unwrap();
    assert_ne!(h, GPASID, "the device got the host PASID");
    assert_eq!(
        completion_status(&g),
        vdsa::completion::Status::Success as u8
    );
    let mut copied = [0u8; 0x40];
    g.mem
        .read_slice(&mut copied, GuestAddress(GPA + 0x100))
        .unwrap();
    assert_eq!(copied, [0xc3; 0x40]);
    // A guest PASID the guest never set up is not enqueued.
    assert_eq!(enqcmd_memmove(&attached, GPASID + 1), StoreReply::Retry);
}

/// A guest's devices, vIOMMU and PASIDs reference one another (the unit
/// observes the PASIDs, the PASIDs ask the unit, the devices' ports and
/// bridges hold both). Once the VM lets go of them, every host PASID it
/// held (mapped, unverified, quarantine) is back in the space and its
/// owner is gone.
#[test]
fn a_dropped_guest_frees_its_host_pasids() {
    let space = Arc::new(PasidSpace::new());
    let (g, _) = ScalableGuest::new();
    let (pasids, attached) = wq_device_in(&space, &g, true, mode::PASID_EN | WQCFG_PRIORITY_1);
    assert_eq!(enqcmd_memmove(&attached, GPASID), StoreReply::Accepted);
    assert_eq!(
        completion_status(&g),
        vdsa::completion::Status::Success as u8
    );
    let mapped = pasids.table().translate(GPASID).unwrap();
    let unverified = pasids.host_pasid_for_device(Some(DEV), GPASID + 1);
    let held = [mapped, unverified, pasids.quarantine()];
    for h in held {
        assert_eq!(space.owner_of(Scope::Global, h), Some(pasids.owner()));
    }
    assert_eq!(space.allocated(), 3);
    let weak = Arc::downgrade(&pasids);
    drop(pasids);
    drop(attached);
    drop(g);
    assert!(weak.upgrade().is_none(), "the guest's PASIDs outlived it");
    for h in held {
        assert_eq!(space.owner_of(Scope::Global, h), None, "{h:#x} not freed");
    }
    assert_eq!(space.allocated(), 0);
}

/// Two VMs in one process share a host PASID space so small (4 bits, 15
/// PASIDs) that a freed host PASID is handed out again at once. VM A's
/// submitter stores ENQCMDs at its shared WQ while A's guest tears its
/// PASID down and sets it up again, over and over (PASID-cache
/// invalidations through the vIOMMU's queue); VM B takes and gives back
/// host PASIDs all the while. No DMA request of A's device may carry a
/// host PASID that is B's when it is made, and once A's device is idle
/// every host PASID A gave up is free again.
#[test]
fn teardown_never_lets_a_descriptor_run_with_another_vms_host_pasid() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const TEARDOWNS: usize = 1000;
    let space = Arc::new(PasidSpace::with_bits(4).unwrap());
    let (mut ga, pgd) = ScalableGuest::new();
    let (a, attached) = wq_device_in(&space, &ga, false, mode::PASID_EN | WQCFG_PRIORITY_1);
    ga.iommu.add_pasid_observer(a.clone());
    let (b, ib) = guest(&space, "b");
    let stop = AtomicBool::new(false);
    let accepted = AtomicU64::new(0);
    let mut a_hpasids = Vec::new();
    let b_hpasids = std::thread::scope(|s| {
        let submitter = s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                if enqcmd_memmove(&attached, GPASID) == StoreReply::Accepted {
                    accepted.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let other_vm = s.spawn(|| {
            let mut seen = BTreeSet::new();
            let mut gpasid = 1;
            while !stop.load(Ordering::Relaxed) {
                gpasid = gpasid % 3 + 1;
                ib.set(gpasid, None);
                if let Ok(h) = b.host_pasid(None, gpasid) {
                    seen.insert(h);
                }
                ib.tear_down(gpasid);
                b.pasid_cache_invalidated(PasidCacheScope::Pasid {
                    did: 1,
                    pasid: gpasid,
                });
            }
            seen
        });
        for _ in 0..TEARDOWNS {
            if let Ok(h) = a.host_pasid(Some(DEV), GPASID) {
                a_hpasids.push(h);
            }
            std::thread::yield_now();
            ga.tear_down();
            ga.set_first_stage(pgd);
        }
        stop.store(true, Ordering::Relaxed);
        submitter.join().unwrap();
        other_vm.join().unwrap()
    });
    let handle = attached.functions[0]
        .lock()
        .unwrap()
        .device()
        .iommu_handle();
    let start = std::time::Instant::now();
    while a_hpasids.iter().any(|&h| handle.pasid_in_use(h)) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "device never idle"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(
        a.foreign_requests(),
        0,
        "a descriptor ran with B's host PASID"
    );
    assert!(accepted.load(Ordering::Relaxed) > 0);
    // The test had teeth: B was handed host PASIDs A had held.
    let reused = a_hpasids.iter().filter(|h| b_hpasids.contains(h)).count();
    assert!(reused > 0, "A {a_hpasids:?}, B {b_hpasids:?}");
    // Retired host PASIDs are freed once the device has let go of them:
    // A holds its quarantine PASID and its mapping (if the last submission
    // filled one; the submitter's check can race the guest's teardown and
    // leave a mapping the guest's next invalidation removes), nothing else.
    a.reap_retired();
    assert_eq!(a.retired(), Vec::<u32>::new());
    assert_eq!(space.charged(a.owner()), Ok(1 + a.table().len()));
}

#[test]
fn teardown_flushes_the_device_tlb_of_the_host_pasid() {
    let (mut g, _) = ScalableGuest::new();
    let (pasids, attached) = shared_wq_device(&g, true);
    g.iommu.add_pasid_observer(pasids.clone());
    assert_eq!(enqcmd_memmove(&attached, GPASID), StoreReply::Accepted);
    assert_eq!(
        completion_status(&g),
        vdsa::completion::Status::Success as u8
    );
    let handle = attached.functions[0]
        .lock()
        .unwrap()
        .device()
        .iommu_handle();
    assert!(
        handle.cached_translations() > 0,
        "ATS filled the device TLB"
    );
    let h = pasids.table().translate(GPASID).unwrap();
    g.tear_down();
    assert_eq!(pasids.guest_pasid(h), None);
    assert_eq!(
        handle.cached_translations(),
        0,
        "nothing cached under {h:#x}"
    );
    assert_eq!(enqcmd_memmove(&attached, GPASID), StoreReply::Retry);
}

#[test]
fn a_dedicated_wq_with_a_pasid_the_guest_never_set_up_fails_translation() {
    use vdsa::regs::offset;
    let (g, _) = ScalableGuest::new();
    let unknown = GPASID + 4;
    let mode = mode::DEDICATED | WQCFG_PRIORITY_1 | mode::PASID_EN | (unknown << mode::PASID_SHIFT);
    let (pasids, attached) = wq_device(&g, false, mode);
    assert!(pasids.table().is_empty(), "no host PASID for it");
    let mut desc = vdsa::descriptor::Descriptor::new(
        vdsa::descriptor::Opcode::Memmove,
        vdsa::descriptor::flags::CRAV | vdsa::descriptor::flags::RCR,
    );
    desc.set_completion_addr(IOVA + 0x800)
        .set_src(IOVA)
        .set_dst(IOVA + 0x100)
        .set_xfer_size(0x40);
    let mut dev = attached.functions[0].lock().unwrap();
    assert_eq!(
        pci::PciDevice::bar_store64(&mut *dev, 2, 0, &desc.0, StoreKind::Movdir64b),
        StoreReply::Accepted
    );
    // Nothing can be written in that address space, not even the record:
    // SWERROR 0x1a (completion record translation), WQ 0, descriptor valid,
    // with the record address and the WQ's (guest) PASID; the vIOMMU
    // recorded the requests it refused.
    let start = std::time::Instant::now();
    let mut q = [0u8; 8];
    loop {
        pci::PciDevice::bar_read(&mut *dev, 0, offset::SWERR, &mut q);
        if u64::from_le_bytes(q) & 1 != 0 {
            break;
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        std::thread::yield_now();
    }
    let swerr = u64::from_le_bytes(q);
    assert_eq!(swerr & 0xff00, 0x1a00, "{swerr:#x}");
    assert_eq!((swerr >> 16) & 0xff, 0, "WQ 0");
    assert_eq!((swerr >> 40) & 0xf_ffff, u64::from(unknown), "PASID field");
    pci::PciDevice::bar_read(&mut *dev, 0, offset::SWERR + 16, &mut q);
    assert_eq!(u64::from_le_bytes(q), IOVA + 0x800);
    assert_eq!(g.mem.read_obj::<u8>(GuestAddress(GPA + 0x800)).unwrap(), 0);
    let mut fsts = [0u8; 4];
    g.iommu.mmio_read(FSTS, &mut fsts);
    assert_eq!(
        u32::from_le_bytes(fsts) & FSTS_PPF,
        FSTS_PPF,
        "a fault recorded"
    );
    assert!(pasids.table().is_empty(), "still not mapped");
}

#[test]
fn page_requests_carry_the_guest_pasid_and_responses_reach_the_device() {
    let (mut g, _) = ScalableGuest::new();
    let mode = mode::PASID_EN | WQCFG_PRIORITY_1 | mode::BOF;
    // The device sends page requests with ATS and PRI both enabled.
    let (pasids, attached) = wq_device(&g, true, mode);
    g.mem.write_slice(&[0x3c; 0x40], GuestAddress(GPA)).unwrap();
    // The destination page is not present yet: block on fault.
    let dst = IOVA + 0x1000;
    assert_eq!(
        enqcmd_memmove_to(&attached, GPASID, dst, vdsa::descriptor::flags::BOF),
        StoreReply::Accepted
    );
    let start = std::time::Instant::now();
    let mut tail = [0u8; 8];
    while {
        g.iommu.mmio_read(PQT, &mut tail);
        u64::from_le_bytes(tail) == 0
    } {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "no page request; completion status {:#x}",
            g.mem.read_obj::<u8>(GuestAddress(GPA + 0x800)).unwrap()
        );
        std::thread::yield_now();
    }
    let request: [u64; 2] = g.mem.read_obj(GuestAddress(g.prq)).unwrap();
    assert_eq!(request[0] & 0xf, 1, "page request descriptor");
    assert_eq!((request[0] >> 8) & 1, 1, "PASID present");
    assert_eq!((request[0] >> 16) & 0xffff, u64::from(RID));
    assert_eq!(
        (request[0] >> 32) & 0xf_ffff,
        u64::from(GPASID),
        "the guest's PASID, not host PASID {:#x}",
        pasids.table().translate(GPASID).unwrap()
    );
    assert_eq!(request[1] & !0xfff, dst);
    assert_eq!(request[1] & 0b10, 0b10, "write access");
    assert_eq!(
        g.mem.read_obj::<u8>(GuestAddress(GPA + 0x800)).unwrap(),
        0,
        "still blocked"
    );
    // The guest maps the page and answers Success.
    let flags = entry::PRESENT | entry::WRITABLE | entry::USER | entry::ACCESSED;
    g.write(g.spare_pte, (GPA + 0x1000) | flags);
    let prg = (request[1] >> 3) & 0x1ff;
    let response = PAGE_GROUP_RESPONSE
        | PAGE_GROUP_RESPONSE_PASID_PRESENT
        | (u64::from(RID) << 16)
        | (u64::from(GPASID) << 32);
    g.submit([response, (prg << 3) | PAGE_GROUP_RESPONSE_LAST]);
    assert_eq!(
        completion_status(&g),
        vdsa::completion::Status::Success as u8
    );
    let mut copied = [0u8; 0x40];
    g.mem
        .read_slice(&mut copied, GuestAddress(GPA + 0x1000))
        .unwrap();
    assert_eq!(copied, [0x3c; 0x40]);
}

/// FSTS: primary pending fault.
const FSTS_PPF: u32 = 1 << 1;
/// WQCFG dword 2: block on fault enable.
/// WQCFG priority 1, the one every WQ here runs at.
const WQCFG_PRIORITY_1: u32 = 1 << mode::PRIORITY_SHIFT;
/// Page group response descriptor (VT-d 6.5.2.11): type, PASID present,
/// last page in group.
const PAGE_GROUP_RESPONSE: u64 = 9;
const PAGE_GROUP_RESPONSE_PASID_PRESENT: u64 = 1 << 4;
const PAGE_GROUP_RESPONSE_LAST: u64 = 1 << 2;

/// PCIe extended capability IDs.
const EXT_CAP_ATS: u16 = 0x0f;
const EXT_CAP_PRI: u16 = 0x13;
const EXT_CAP_PASID: u16 = 0x1b;

fn find_ext_cap(dev: &mut dyn pci::PciDevice, id: u16) -> u16 {
    let mut at = 0x100u16;
    loop {
        let mut h = [0u8; 4];
        dev.config_read(at, &mut h);
        let h = u32::from_le_bytes(h);
        if h as u16 == id {
            return at;
        }
        at = (h >> 20) as u16;
        assert_ne!(at, 0, "extended capability {id:#x} not found");
    }
}

#[test]
fn a_vcpus_enqcmd_pasid_hint_is_revalidated_against_records_and_viommu_invalidations() {
    let (mut g, pgd) = ScalableGuest::new();
    let pasids = Arc::new(GuestPasids::new(Arc::new(PasidSpace::new()), "g").unwrap());
    pasids.set_authority(Arc::new(ViommuAuthority::new(&g.iommu, vec![DEV])));
    g.iommu.add_pasid_observer(pasids.clone());
    let other = pgd + 0x10_0000;
    let mut hint = EnqcmdPasidHint::default();
    let mut hinted = |cr3| pasids.enqcmd_pasid_hinted(cr3, &mut hint);
    assert_eq!(hinted(pgd), 0, "nothing recorded: #GP");
    pasids.record_msr_write(pgd, VALID | u64::from(GPASID));
    for _ in 0..3 {
        assert_eq!(hinted(pgd), VALID | u64::from(GPASID));
        assert_eq!(hinted(other | 0x1003), 0, "another address space");
    }
    // Another vCPU's WRMSR in the same address space.
    pasids.record_msr_write(pgd, VALID | u64::from(GPASID + 1));
    assert_eq!(hinted(pgd), VALID | u64::from(GPASID + 1));
    pasids.record_msr_write(pgd, VALID | u64::from(GPASID));
    assert_eq!(hinted(pgd), VALID | u64::from(GPASID));
    // The guest points the PASID at other page tables: until it
    // invalidates, the vIOMMU (and so the check) still uses the cached
    // entry; after, the record is stale and dropped.
    g.set_first_stage(other);
    assert_eq!(hinted(pgd), VALID | u64::from(GPASID));
    assert_eq!(pasids.enqcmd_pasid(pgd), VALID | u64::from(GPASID));
    let inv =
        PASID_DESC_TYPE | PASID_DESC_SELECTIVE | (u64::from(DID) << 16) | (u64::from(GPASID) << 32);
    g.submit([inv, 0]);
    assert_eq!(hinted(pgd), 0);
    assert_eq!(pasids.enqcmd_pasid(pgd), 0);
    // Recorded for the page tables the entry now has; then torn down.
    pasids.record_msr_write(other, VALID | u64::from(GPASID));
    assert_eq!(hinted(other), VALID | u64::from(GPASID));
    g.tear_down();
    assert_eq!(hinted(other), 0, "the teardown forgot the address space");
}
