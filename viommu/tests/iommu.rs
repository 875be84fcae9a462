// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! The unit driven through its registers and guest memory, the way the Linux driver drives
//! it, with devices issuing requests.

mod common;

use std::sync::Arc;

use common::*;
use viommu::paging::{entry, PagingLevels, PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K};
use viommu::regs::*;
use viommu::{
    AccessType, AtsError, DmaErrorKind, DmaFault, FaultReason, PageRequest, PasidCacheScope,
    PasidTag, ResponseCode,
};
use vm_memory::{Bytes, GuestAddress};

const PASID: u32 = 0x42;
const DID: u16 = 1;
const USER_RW: u64 = entry::WRITABLE | entry::USER;

fn user(pasid: u32) -> Option<PasidTag> {
    Some(PasidTag {
        pasid,
        privileged: false,
    })
}

fn supervisor(pasid: u32) -> Option<PasidTag> {
    Some(PasidTag {
        pasid,
        privileged: true,
    })
}

const READ: AccessType = AccessType::READ;
const WRITE: AccessType = AccessType::WRITE;

/// The fault reason of a translation failure.
fn reason(err: DmaFault) -> Option<FaultReason> {
    match err {
        DmaFault::Translation { reason, .. } => Some(reason),
        DmaFault::Blocked => None,
    }
}

/// The fault reason of a failed DMA.
fn reason_of_kind(kind: DmaErrorKind) -> Option<FaultReason> {
    match kind {
        DmaErrorKind::Fault(f) => reason(f),
        DmaErrorKind::Memory { .. } => None,
    }
}

/// (address, reason, source id, PASID if present, read?, F) of fault record `i`.
fn fault_record(g: &Guest, i: u64) -> (u64, u8, u16, Option<u32>, bool, bool) {
    let lo = g.read64(FRCD_BASE + i * FRCD_SIZE);
    let hi = g.read64(FRCD_BASE + i * FRCD_SIZE + 8);
    let pasid = ((hi >> 31) & 1 == 1).then_some(((hi >> 40) & 0xf_ffff) as u32);
    (
        lo,
        (hi >> 32) as u8,
        hi as u16,
        pasid,
        (hi >> 62) & 1 == 1,
        hi >> 63 == 1,
    )
}

/// Linux's dmar_fault: clear F of every pending record from FRI on, then PFO|PPF.
fn service_faults(g: &Guest) {
    let fri = u64::from((g.read32(FSTS) >> 8) & 0xff);
    for k in 0..NUM_FAULT_RECORDS as u64 {
        let i = (fri + k) % NUM_FAULT_RECORDS as u64;
        let off = FRCD_BASE + i * FRCD_SIZE + 12;
        if g.read32(off) >> 31 == 1 {
            g.write32(off, 1 << 31);
        }
    }
    g.write32(FSTS, fsts::PFO | fsts::PPF);
}

/// A process address space: user pages at 4 KiB, 2 MiB and 1 GiB, shared with a device
/// through an SVA bind (user PASID entry pointing at the process PGD).
struct Sva {
    g: Guest,
    pgd: u64,
}

const VA_4K: u64 = 0x7ffd_1234_5000;
const VA_RO: u64 = 0x7ffd_1234_6000;
const VA_2M: u64 = 0x5555_5540_0000;
const VA_1G: u64 = 0x7f00_4000_0000;
const PA_4K: u64 = 0x30_0000;
const PA_RO: u64 = 0x30_1000;
const PA_2M: u64 = 0x60_0000;
const PA_1G: u64 = 0x4000_0000;

fn sva() -> Sva {
    let mut g = Guest::new();
    let mem = g.mem.clone();
    let mut pt = page_tables(&mem, PagingLevels::Four, TABLES_A);
    pt.map(VA_4K, PA_4K, PAGE_SIZE_4K, USER_RW).unwrap();
    pt.map(VA_RO, PA_RO, PAGE_SIZE_4K, entry::USER).unwrap();
    pt.map(VA_2M, PA_2M, PAGE_SIZE_2M, USER_RW).unwrap();
    pt.map(VA_1G, PA_1G, PAGE_SIZE_1G, USER_RW).unwrap();
    // A kernel page in the same address space.
    pt.map(
        0xffff_8880_0000_0000,
        0x20_0000,
        PAGE_SIZE_2M,
        entry::WRITABLE,
    )
    .unwrap();
    let pgd = pt.root();
    g.set_context(RID, ContextFlags::default());
    g.set_pasid_entry(RID, PASID, first_level_entry(pgd, DID, false, false));
    // Linux with CM=0 follows a new PASID entry with only a write-buffer flush.
    Sva { g, pgd }
}

#[test]
fn linux_init_sequence_leaves_the_unit_enabled() {
    let g = Guest::new();
    assert_eq!(
        g.read32(GSTS),
        gcmd::TE | gcmd::SRTP | gcmd::QIE,
        "TES, RTPS, QIES"
    );
    assert_eq!(g.read64(CAP), CAP_VALUE);
    assert_eq!(g.read64(ECAP), ECAP_VALUE);
    assert_eq!(g.read32(VER), 0x30);
    // The init batch (three invalidations + wait) went through the queue.
    assert_eq!(g.read64(IQH), 4 * 32);
    assert_eq!(g.read64(IQH), g.read64(IQT));
    assert_eq!(g.read32(FSTS), 0);
    assert_eq!(g.read64(PQA), g.prq | 4);
    assert!(g.msis.take().is_empty());
}

#[test]
fn sva_bind_translates_user_addresses() {
    let Sva { g, pgd } = sva();
    for (va, access, phys, size) in [
        (VA_4K + 0x678, WRITE, PA_4K + 0x678, PAGE_SIZE_4K),
        (VA_2M + 0x1f_fff0, READ, PA_2M + 0x1f_fff0, PAGE_SIZE_2M),
        (
            VA_1G + 0x3456_789a,
            WRITE,
            PA_1G + 0x3456_789a,
            PAGE_SIZE_1G,
        ),
        (VA_RO, READ, PA_RO, PAGE_SIZE_4K),
    ] {
        let t = g.iommu.translate(DEV, user(PASID), va, access).unwrap();
        assert_eq!((t.phys_addr, t.page_size), (phys, size), "va {va:#x}");
    }

    // The process's page tables now have A set along the path and D on written pages.
    let pte = |va: u64, level: u8| -> u64 {
        let mut table = pgd;
        let mut e = 0;
        for l in (level..=4).rev() {
            e = g.read_obj::<u64>(viommu::paging::entry_address(table, va, l));
            table = e & entry::ADDRESS_MASK;
        }
        e
    };
    assert_eq!(
        pte(VA_4K, 1) & (entry::ACCESSED | entry::DIRTY),
        entry::ACCESSED | entry::DIRTY
    );
    assert_eq!(
        pte(VA_RO, 1) & (entry::ACCESSED | entry::DIRTY),
        entry::ACCESSED
    );
    assert_eq!(pte(VA_2M, 2) & entry::DIRTY, 0, "read only");
    assert_ne!(pte(VA_1G, 3) & entry::DIRTY, 0);
    assert_ne!(pte(VA_4K, 4) & entry::ACCESSED, 0);

    // DMA through the bind moves real bytes.
    g.iommu
        .dma_write(DEV, user(PASID), VA_4K + 0xff0, &[0xab; 32])
        .unwrap_err(); // crosses into VA_RO, which is read-only
    assert_eq!(g.read_obj::<[u8; 16]>(PA_4K + 0xff0), [0xab; 16]);
    let mut buf = [0u8; 32];
    g.mem.write_slice(&[0x5a; 16], GuestAddress(PA_RO)).unwrap();
    g.iommu
        .dma_read(DEV, user(PASID), VA_4K + 0xff0, &mut buf)
        .unwrap();
    assert_eq!(&buf[..16], &[0xab; 16]);
    assert_eq!(&buf[16..], &[0x5a; 16]);
    assert!(
        g.msis.take().len() == 1,
        "the failed write raised one fault event"
    );
}

/// Linux 6.11 and later bind a process without NXE in the PASID entry, and the
/// process's data pages carry XD: the walk must not call XD reserved (the
/// specification deprecated both with Execute-Requested requests).
#[test]
fn sva_without_nxe_ignores_xd_on_process_pages() {
    let mut g = Guest::new();
    let mem = g.mem.clone();
    let mut pt = page_tables(&mem, PagingLevels::Four, TABLES_A);
    pt.map(VA_4K, PA_4K, PAGE_SIZE_4K, USER_RW | entry::EXECUTE_DISABLE)
        .unwrap();
    let mut pasid_entry = first_level_entry(pt.root(), DID, false, false);
    pasid_entry[2] &= !(1 << 5);
    g.set_context(RID, ContextFlags::default());
    g.set_pasid_entry(RID, PASID, pasid_entry);
    let t = g
        .iommu
        .translate(DEV, user(PASID), VA_4K + 8, WRITE)
        .unwrap();
    assert_eq!(t.phys_addr, PA_4K + 8);
    g.iommu
        .dma_write(DEV, user(PASID), VA_4K + 0x10, &[0xcd; 16])
        .unwrap();
    assert_eq!(g.read_obj::<[u8; 16]>(PA_4K + 0x10), [0xcd; 16]);
    assert_eq!(g.read32(FSTS), 0, "no fault recorded");
}

#[test]
fn sva_faults_record_what_linux_prints() {
    let Sva { g, .. } = sva();
    // Not mapped.
    let err = g
        .iommu
        .translate(DEV, user(PASID), 0x7ffd_0000_0123, READ)
        .unwrap_err();
    assert_eq!(
        err,
        DmaFault::Translation {
            reason: FaultReason::FirstStageNotPresent,
            recorded: true
        }
    );
    assert_eq!(
        fault_record(&g, 0),
        (0x7ffd_0000_0000, 0x71, RID, Some(PASID), true, true)
    );
    assert_eq!(g.read32(FSTS), fsts::PPF | fsts::fri(1));
    assert_eq!(g.msis.take(), vec![FAULT_MSI]);

    // Write to a read-only page, a user request to a kernel page, a non-canonical address,
    // a supervisor request with SRE clear.
    let cases = [
        (user(PASID), VA_RO, WRITE, 0x85),
        (user(PASID), 0xffff_8880_0000_1000, READ, 0x81),
        (user(PASID), 0x8000_0000_0000, READ, 0x80),
        (supervisor(PASID), VA_4K, READ, 0x5d),
    ];
    for (i, (tag, va, access, reason)) in cases.into_iter().enumerate() {
        let err = g.iommu.translate(DEV, tag, va, access).unwrap_err();
        let DmaFault::Translation { reason: r, .. } = err else {
            panic!("{err:?}");
        };
        assert_eq!(r.code(), reason);
        let rec = fault_record(&g, i as u64 + 1);
        assert_eq!((rec.0, rec.1, rec.4), (va & !0xfff, reason, !access.write));
    }
    // PPF was already set: no new event until Linux services the log.
    assert!(g.msis.take().is_empty());
    service_faults(&g);
    assert_eq!(g.read32(FSTS), fsts::fri(5));
    g.iommu
        .translate(DEV, user(PASID), 0x1000, READ)
        .unwrap_err();
    assert_eq!(g.msis.take(), vec![FAULT_MSI]);
}

#[test]
fn supervisor_bind_uses_sre_and_wpe() {
    let Sva { mut g, pgd } = sva();
    g.set_pasid_entry(RID, 7, first_level_entry(pgd, DID, true, false));
    let kva = 0xffff_8880_0000_1234;
    let t = g.iommu.translate(DEV, supervisor(7), kva, WRITE).unwrap();
    assert_eq!(t.phys_addr, 0x20_1234);
    // WPE: supervisor writes to read-only user pages fault; reads of user pages are fine.
    let err = g
        .iommu
        .translate(DEV, supervisor(7), VA_RO, WRITE)
        .unwrap_err();
    assert_eq!(reason(err), Some(FaultReason::NoWrite));
    assert!(g.iommu.translate(DEV, supervisor(7), VA_RO, READ).is_ok());
    // Without WPE supervisor writes ignore R/W.
    let mut e = first_level_entry(pgd, DID, true, false);
    e[2] &= !(1 << 4);
    g.set_pasid_entry(RID, 8, e);
    assert!(g.iommu.translate(DEV, supervisor(8), VA_RO, WRITE).is_ok());
    // Execute requests are refused (ECAP.ERS=0).
    let exec = AccessType {
        execute: true,
        ..READ
    };
    let err = g
        .iommu
        .translate(DEV, supervisor(7), kva, exec)
        .unwrap_err();
    assert_eq!(reason(err), Some(FaultReason::ExecuteRequestsDisabled));
}

#[test]
fn five_level_first_stage() {
    let mut g = Guest::new();
    let mem = g.mem.clone();
    let mut pt = page_tables(&mem, PagingLevels::Five, TABLES_A);
    let va = 0x00aa_bbcc_dd00_0000u64 & !0xfff;
    pt.map(va, 0x12_3000, PAGE_SIZE_4K, USER_RW).unwrap();
    g.set_context(RID, ContextFlags::default());
    g.set_pasid_entry(RID, 3, first_level_entry(pt.root(), DID, false, true));
    let t = g.iommu.translate(DEV, user(3), va | 0x10, READ).unwrap();
    assert_eq!(t.phys_addr, 0x12_3010);
}

#[test]
fn requests_without_pasid_use_rid_pasid() {
    let Sva { mut g, pgd } = sva();
    // Linux's default DMA domain: first-level entry at RID_PASID 0.
    g.set_pasid_entry(RID, 0, first_level_entry(pgd, 2, false, false));
    let t = g.iommu.translate(DEV, None, VA_4K, WRITE).unwrap();
    assert_eq!(t.phys_addr, PA_4K);
    // Fault records for requests without PASID have PP=0.
    g.iommu.translate(DEV, None, 0x1000, READ).unwrap_err();
    let rec = fault_record(&g, 0);
    assert_eq!((rec.1, rec.3), (0x71, None));
}

#[test]
fn structure_faults_report_their_reasons() {
    let mut g = Guest::new();
    let mem = g.mem.clone();
    let mut pt = page_tables(&mem, PagingLevels::Four, TABLES_A);
    pt.map(0x1000, 0x5000, PAGE_SIZE_4K, USER_RW).unwrap();
    let good_entry = first_level_entry(pt.root(), DID, false, false);

    let expect = |g: &Guest, rid: u16, tag, reason: FaultReason| {
        let err = g
            .iommu
            .translate(PciAddress::from_rid(rid), tag, 0x1000, READ)
            .unwrap_err();
        assert_eq!(
            err,
            DmaFault::Translation {
                reason,
                recorded: true
            },
            "rid {rid:#x}"
        );
        service_faults(g);
    };

    // Root entry not present (no context table for bus 5).
    expect(&g, 0x0500, user(1), FaultReason::RootEntryNotPresent);
    // Root entry reserved bit.
    g.mem
        .write_obj(0x7000u64 | 1 | 2, GuestAddress(g.root_table + 6 * 16))
        .unwrap();
    expect(&g, 0x0600, user(1), FaultReason::RootEntryReserved);
    // Context entry not present (context table exists for bus 0).
    g.set_context(RID, ContextFlags::default());
    expect(&g, RID + 1, user(1), FaultReason::ContextEntryNotPresent);
    // Context reserved bit.
    let ce = g.context_entry_addr(RID + 2);
    g.mem
        .write_obj([0x8000u64 | 1 | (1 << 6), 0, 0, 0], GuestAddress(ce))
        .unwrap();
    expect(&g, RID + 2, user(1), FaultReason::ContextEntryReserved);
    // PASIDE clear.
    g.set_context(
        RID + 3,
        ContextFlags {
            paside: false,
            ..Default::default()
        },
    );
    expect(&g, RID + 3, user(1), FaultReason::PasidDisabled);
    // PASID directory entry not present.
    expect(&g, RID, user(1 << 12), FaultReason::PasidDirNotPresent);
    // PASID directory entry reserved bit.
    let dir = g.pasid_dir(RID);
    g.mem
        .write_obj(0x9000u64 | 1 | (1 << 5), GuestAddress(dir + 3 * 8))
        .unwrap();
    expect(&g, RID, user(3 << 6), FaultReason::PasidDirReserved);
    // PASID entry not present (the table exists once another PASID of it is set).
    g.set_pasid_entry(RID, 1, good_entry);
    expect(&g, RID, user(2), FaultReason::PasidEntryNotPresent);
    // PASID entry reserved bit, invalid PGTT.
    let mut bad = good_entry;
    bad[1] |= 1 << 20;
    g.set_pasid_entry(RID, 4, bad);
    expect(&g, RID, user(4), FaultReason::PasidEntryReserved);
    let mut bad = good_entry;
    bad[0] = (bad[0] & !(7 << 6)) | (6 << 6);
    g.set_pasid_entry(RID, 5, bad);
    expect(&g, RID, user(5), FaultReason::PasidEntryInvalid);

    // Table pointers outside guest RAM.
    let outside = MEM_SIZE + 0x10_0000;
    let ce = g.context_entry_addr(0x0700);
    let _ = ce;
    g.mem
        .write_obj(outside | 1, GuestAddress(g.root_table + 8 * 16))
        .unwrap();
    expect(&g, 0x0800, user(1), FaultReason::ContextEntryAccess);
    let ce = g.context_entry_addr(RID + 4);
    g.mem
        .write_obj([outside | (7 << 9) | 8 | 1, 0u64, 0, 0], GuestAddress(ce))
        .unwrap();
    expect(&g, RID + 4, user(1), FaultReason::PasidDirAccess);
    g.mem
        .write_obj(outside | 1, GuestAddress(dir + 5 * 8))
        .unwrap();
    expect(&g, RID, user(5 << 6), FaultReason::PasidEntryAccess);
    let mut far = good_entry;
    far[2] = outside | (1 << 5);
    g.set_pasid_entry(RID, 6, far);
    expect(&g, RID, user(6), FaultReason::FirstStageAccess);

    // The root table itself outside RAM. Like Linux, follow SRTP with global invalidations
    // (CAP.ESRTPS=0): until then the cached entries keep translating.
    g.write64(RTADDR, outside | (1 << 10));
    g.write32(GCMD, g.read32(GSTS) | gcmd::SRTP);
    assert!(g.iommu.translate(DEV, user(1), 0x1000, READ).is_ok());
    assert!(g.submit(&[
        qi::context_global(),
        qi::pasid_cache_global(),
        qi::iotlb_global()
    ]));
    expect(&g, RID, user(1), FaultReason::RootEntryAccess);
    // Unsupported translation table mode.
    g.write64(RTADDR, g.root_table | (2 << 10));
    g.write32(GCMD, g.read32(GSTS) | gcmd::SRTP);
    expect(&g, RID, user(1), FaultReason::RootTableInvalid);
}

#[test]
fn fault_processing_disable_suppresses_records() {
    let mut g = Guest::new();
    g.set_context(
        RID,
        ContextFlags {
            fpd: true,
            ..Default::default()
        },
    );
    let err = g.iommu.translate(DEV, user(9), 0x1000, READ).unwrap_err();
    assert_eq!(
        err,
        DmaFault::Translation {
            reason: FaultReason::PasidDirNotPresent,
            recorded: false
        }
    );
    // Linux's fault_ignore teardown: P=0, FPD=1 in the PASID entry.
    g.set_context(RID + 1, ContextFlags::default());
    let mut e = [0u64; 8];
    e[0] = 2;
    g.set_pasid_entry(RID + 1, 9, e);
    let err = g
        .iommu
        .translate(PciAddress::from_rid(RID + 1), user(9), 0x1000, READ)
        .unwrap_err();
    assert_eq!(
        err,
        DmaFault::Translation {
            reason: FaultReason::PasidEntryNotPresent,
            recorded: false
        }
    );
    assert_eq!(g.read32(FSTS), 0);
    assert!(g.msis.take().is_empty());
}

#[test]
fn primary_fault_overflow() {
    let mut g = Guest::new();
    g.set_context(RID, ContextFlags::default());
    for i in 0..NUM_FAULT_RECORDS as u64 {
        g.iommu.translate(DEV, user(1), i << 12, READ).unwrap_err();
    }
    assert_eq!(g.msis.take(), vec![FAULT_MSI]);
    assert_eq!(g.read32(FSTS), fsts::PPF | fsts::fri(0));
    // The next fault finds record 0 still pending: PFO, one more event, nothing recorded.
    g.iommu
        .translate(DEV, user(1), 0x99_9000, READ)
        .unwrap_err();
    assert_eq!(g.read32(FSTS), fsts::PPF | fsts::PFO | fsts::fri(0));
    assert_eq!(g.msis.take(), vec![FAULT_MSI]);
    g.iommu
        .translate(DEV, user(1), 0x98_9000, WRITE)
        .unwrap_err();
    assert!(g.msis.take().is_empty());
    for i in 0..NUM_FAULT_RECORDS as u64 {
        assert_eq!(fault_record(&g, i).0, i << 12);
    }
    service_faults(&g);
    assert_eq!(g.read32(FSTS), fsts::fri(0));
    g.iommu
        .translate(DEV, user(1), 0x77_7000, WRITE)
        .unwrap_err();
    assert_eq!(fault_record(&g, 0).0, 0x77_7000);
    assert!(!fault_record(&g, 0).4, "write");
    assert_eq!(g.msis.take(), vec![FAULT_MSI]);
}

#[test]
fn masked_fault_event_is_delivered_on_unmask() {
    let mut g = Guest::new();
    g.set_context(RID, ContextFlags::default());
    g.write32(FECTL, ectl::IM);
    g.iommu.translate(DEV, user(1), 0, READ).unwrap_err();
    assert!(g.msis.take().is_empty());
    assert_eq!(g.read32(FECTL), ectl::IM | ectl::IP);
    g.write32(FECTL, 0);
    assert_eq!(g.msis.take(), vec![FAULT_MSI]);
    assert_eq!(g.read32(FECTL), 0);
    // Serviced while masked: no stale interrupt on unmask.
    service_faults(&g);
    g.write32(FECTL, ectl::IM);
    g.iommu.translate(DEV, user(1), 0, READ).unwrap_err();
    service_faults(&g);
    g.write32(FECTL, 0);
    assert!(g.msis.take().is_empty());
}

/// Remap a 4 KiB page of the SVA address space to a new frame (like a CoW break).
fn remap(g: &Guest, pgd: u64, va: u64, pa: u64) {
    let mut table = pgd;
    for l in (2..=4).rev() {
        table =
            g.read_obj::<u64>(viommu::paging::entry_address(table, va, l)) & entry::ADDRESS_MASK;
    }
    g.mem
        .write_obj(
            pa | USER_RW | entry::PRESENT,
            GuestAddress(viommu::paging::entry_address(table, va, 1)),
        )
        .unwrap();
}

#[test]
fn stale_iotlb_until_pasid_based_invalidation() {
    let Sva { mut g, pgd } = sva();
    let phys = |g: &Guest| {
        g.iommu
            .translate(DEV, user(PASID), VA_4K, READ)
            .unwrap()
            .phys_addr
    };
    assert_eq!(phys(&g), PA_4K);
    remap(&g, pgd, VA_4K, 0x70_0000);
    assert_eq!(phys(&g), PA_4K, "stale until invalidated, like silicon");
    // A second-stage (IOTLB) invalidation does not reach first-stage entries.
    assert!(g.submit(&[qi::iotlb_domain(DID)]));
    assert_eq!(phys(&g), PA_4K);
    // Wrong PASID or wrong page: still stale.
    assert!(g.submit(&[qi::piotlb_page(DID, PASID + 1, VA_4K, 0)]));
    assert!(g.submit(&[qi::piotlb_page(DID, PASID, VA_4K + 0x2000, 0)]));
    assert_eq!(phys(&g), PA_4K);
    // Page-selective in PASID.
    assert!(g.submit(&[qi::piotlb_page(DID, PASID, VA_4K, 0)]));
    assert_eq!(phys(&g), 0x70_0000);
    // All in PASID.
    remap(&g, pgd, VA_4K, 0x71_0000);
    assert_eq!(phys(&g), 0x70_0000);
    assert!(g.submit(&[qi::piotlb_pasid(DID, PASID)]));
    assert_eq!(phys(&g), 0x71_0000);
    // Global IOTLB invalidation reaches everything.
    remap(&g, pgd, VA_4K, 0x72_0000);
    assert!(g.submit(&[qi::iotlb_global()]));
    assert_eq!(phys(&g), 0x72_0000);
    // Register-based global IOTLB invalidation too.
    remap(&g, pgd, VA_4K, 0x73_0000);
    g.write64(IOTLB_REG, iotlb_reg::IVT | (1 << 60));
    assert_eq!(g.read64(IOTLB_REG) >> 63, 0, "IVT clears on completion");
    assert_eq!((g.read64(IOTLB_REG) >> 57) & 3, 1, "IAIG global");
    assert_eq!(phys(&g), 0x73_0000);
}

#[test]
fn stale_pasid_and_context_caches_until_invalidated() {
    let Sva { mut g, pgd } = sva();
    assert!(g.iommu.translate(DEV, user(PASID), VA_4K, READ).is_ok());
    // The guest tears the PASID down (clears P) and forgets the PASID-cache invalidation.
    g.set_pasid_entry(RID, PASID, [0; 8]);
    assert!(g.submit(&[qi::piotlb_pasid(DID, PASID)]));
    assert!(
        g.iommu.translate(DEV, user(PASID), VA_4K, READ).is_ok(),
        "cached PASID entry still used"
    );
    let observer = Arc::new(RecordingObserver::default());
    g.iommu.add_pasid_observer(observer.clone());
    assert!(g.submit(&[qi::pasid_cache_pasid(DID, PASID)]));
    assert_eq!(
        *observer.0.lock().unwrap(),
        vec![PasidCacheScope::Pasid {
            did: DID,
            pasid: PASID
        }]
    );
    let err = g
        .iommu
        .translate(DEV, user(PASID), VA_4K, READ)
        .unwrap_err();
    assert_eq!(reason(err), Some(FaultReason::PasidEntryNotPresent));
    assert_eq!(
        g.iommu.resolve_pasid(DEV, PASID),
        Err(viommu::PasidLookupError::Fault(
            FaultReason::PasidEntryNotPresent
        ))
    );
    g.set_pasid_entry(RID, PASID, first_level_entry(pgd, DID, false, false));
    assert_eq!(g.iommu.resolve_pasid(DEV, PASID).unwrap().flptr, pgd);

    // Context cache: disable PASIDs in the context entry; stale until invalidated.
    g.set_context(
        RID,
        ContextFlags {
            paside: false,
            ..Default::default()
        },
    );
    assert!(g.iommu.translate(DEV, user(PASID), VA_4K, READ).is_ok());
    assert!(g.submit(&[qi::context_device(RID + 1)]));
    assert!(g.iommu.translate(DEV, user(PASID), VA_4K, READ).is_ok());
    assert!(g.submit(&[qi::context_device(RID)]));
    let err = g
        .iommu
        .translate(DEV, user(PASID), VA_4K, READ)
        .unwrap_err();
    assert_eq!(reason(err), Some(FaultReason::PasidDisabled));
    // Register-based context invalidation (CCMD) works as well.
    g.set_context(RID, ContextFlags::default());
    g.write64(CCMD, ccmd::ICC | (1 << 61));
    assert_eq!(g.read64(CCMD) >> 63, 0);
    assert_eq!((g.read64(CCMD) >> 59) & 3, 1);
    assert!(g.iommu.translate(DEV, user(PASID), VA_4K, READ).is_ok());
}

#[test]
fn second_stage_and_pass_through_entries() {
    let mut g = Guest::new();
    let mem = g.mem.clone();
    // Second-stage tables: built with the IA-32e builder (R|W at the same bits as P|R/W).
    let mut sl = page_tables(&mem, PagingLevels::Four, TABLES_B);
    sl.map(0x1000, 0x40_0000, PAGE_SIZE_4K, entry::WRITABLE)
        .unwrap();
    g.set_context(RID, ContextFlags::default());
    g.set_pasid_entry(RID, 0, second_level_entry(sl.root(), 5));
    g.set_pasid_entry(RID, 1, pass_through_entry(6));
    let t = g.iommu.translate(DEV, None, 0x1080, WRITE).unwrap();
    assert_eq!(t.phys_addr, 0x40_0080);
    let t = g.iommu.translate(DEV, user(1), 0xdead_b000, WRITE).unwrap();
    assert_eq!(t.phys_addr, 0xdead_b000);
    let err = g.iommu.translate(DEV, user(1), 1 << 50, READ).unwrap_err();
    assert_eq!(reason(err), Some(FaultReason::AddressBeyondMax));
    let err = g.iommu.translate(DEV, None, 0x2000, READ).unwrap_err();
    assert_eq!(reason(err), Some(FaultReason::SecondStagePermission));
    // Stale second-stage translations until IOTLB invalidation (DSI, PSI), not P_IOTLB.
    let leaf = sl.entry_addr(0x1000, 1).unwrap();
    sl.write_entry(leaf, 0x41_0000 | 3).unwrap();
    assert_eq!(
        g.iommu
            .translate(DEV, None, 0x1000, READ)
            .unwrap()
            .phys_addr,
        0x40_0000
    );
    assert!(g.submit(&[qi::piotlb_pasid(5, 0)]));
    assert_eq!(
        g.iommu
            .translate(DEV, None, 0x1000, READ)
            .unwrap()
            .phys_addr,
        0x40_0000
    );
    assert!(g.submit(&[qi::iotlb_page(5, 0x1000, 0)]));
    assert_eq!(
        g.iommu
            .translate(DEV, None, 0x1000, READ)
            .unwrap()
            .phys_addr,
        0x41_0000
    );
    sl.write_entry(leaf, 0x42_0000 | 3).unwrap();
    assert!(g.submit(&[qi::iotlb_domain(5)]));
    assert_eq!(
        g.iommu
            .translate(DEV, None, 0x1000, READ)
            .unwrap()
            .phys_addr,
        0x42_0000
    );
    // Register-based page-selective invalidation through IVA.
    sl.write_entry(leaf, 0x43_0000 | 3).unwrap();
    g.write64(IVA, 0x1000);
    g.write64(IOTLB_REG, iotlb_reg::IVT | (3 << 60) | (5u64 << 32));
    assert_eq!(
        g.iommu
            .translate(DEV, None, 0x1000, READ)
            .unwrap()
            .phys_addr,
        0x43_0000
    );
}

#[test]
fn nested_entry_translates_through_both_stages() {
    let mut g = Guest::new();
    let mem = g.mem.clone();
    // Second stage: identity for the first-stage table area, GPA 0x100_0000 -> HPA 0x50_0000.
    let mut sl = page_tables(&mem, PagingLevels::Four, TABLES_B);
    for i in 0..2 {
        let gpa = TABLES_A + i * PAGE_SIZE_2M;
        sl.map(gpa, gpa, PAGE_SIZE_2M, entry::WRITABLE).unwrap();
    }
    sl.map(0x100_0000, 0x50_0000, PAGE_SIZE_4K, entry::WRITABLE)
        .unwrap();
    let mut fl = page_tables(&mem, PagingLevels::Four, TABLES_A);
    fl.map(0x4000_1000, 0x100_0000, PAGE_SIZE_4K, USER_RW)
        .unwrap();
    g.set_context(RID, ContextFlags::default());
    g.set_pasid_entry(RID, 2, nested_entry(fl.root(), sl.root(), 9));
    let t = g.iommu.translate(DEV, user(2), 0x4000_1008, WRITE).unwrap();
    assert_eq!(t.phys_addr, 0x50_0008);
    // Nested entries are reached by both invalidation families.
    fl.write_entry(fl.entry_addr(0x4000_1000, 1).unwrap(), 0)
        .unwrap();
    assert!(g.iommu.translate(DEV, user(2), 0x4000_1008, READ).is_ok());
    assert!(g.submit(&[qi::iotlb_domain(9)]));
    let err = g
        .iommu
        .translate(DEV, user(2), 0x4000_1008, READ)
        .unwrap_err();
    assert_eq!(reason(err), Some(FaultReason::FirstStageNotPresent));
}

#[test]
fn translation_disabled_passes_through_requests_without_pasid() {
    let g = Guest::bare();
    let t = g.iommu.translate(DEV, None, 0x1234_5678, WRITE).unwrap();
    assert_eq!(t.phys_addr, 0x1234_5678);
    assert_eq!(
        g.iommu.translate(DEV, user(1), 0x1000, READ),
        Err(DmaFault::Blocked)
    );
    assert_eq!(
        g.iommu.resolve_pasid(DEV, 1),
        Err(viommu::PasidLookupError::TranslationDisabled)
    );
}

#[test]
fn dma_stops_at_the_faulting_page() {
    let Sva { g, .. } = sva();
    // 4 KiB page at VA_4K, read-only page after it, nothing after that.
    let data: Vec<u8> = (0..3 * 4096u32).map(|i| i as u8).collect();
    let err = g
        .iommu
        .dma_write(DEV, user(PASID), VA_4K + 0x800, &data)
        .unwrap_err();
    assert_eq!(err.completed, 0x800);
    assert_eq!(err.address, VA_RO);
    assert_eq!(reason_of_kind(err.kind), Some(FaultReason::NoWrite));
    let mut buf = vec![0u8; 3 * 4096];
    let err = g
        .iommu
        .dma_read(DEV, user(PASID), VA_4K + 0x800, &mut buf)
        .unwrap_err();
    assert_eq!(err.completed, 0x800 + 0x1000);
    assert_eq!(err.address, VA_RO + 0x1000);
    assert_eq!(&buf[..0x800], &data[..0x800]);
    // A translation to non-RAM reports the physical address.
    let mut g2 = Guest::new();
    let mem = g2.mem.clone();
    let mut pt = page_tables(&mem, PagingLevels::Four, TABLES_A);
    pt.map(0x1000, MEM_SIZE + 0x1000, PAGE_SIZE_4K, USER_RW)
        .unwrap();
    g2.set_context(RID, ContextFlags::default());
    g2.set_pasid_entry(RID, 1, first_level_entry(pt.root(), DID, false, false));
    let err = g2
        .iommu
        .dma_read(DEV, user(1), 0x1000, &mut buf)
        .unwrap_err();
    assert_eq!(
        err.kind,
        DmaErrorKind::Memory {
            phys_addr: MEM_SIZE + 0x1000
        }
    );
}

#[test]
fn dma_copy_moves_memory_to_memory_and_stops_where_an_access_fails() {
    let Sva { g, .. } = sva();
    // The 2 MiB page is writable; VA_4K is writable, VA_RO after it is not,
    // and nothing is mapped after VA_RO.
    let data: Vec<u8> = (0..0x1800u32).map(|i| (i * 3) as u8).collect();
    g.mem.write_slice(&data, GuestAddress(PA_2M)).unwrap();
    g.iommu
        .dma_copy(DEV, user(PASID), VA_2M, VA_2M + 0x10_0000, data.len())
        .unwrap();
    assert_eq!(
        g.read_obj::<[u8; 32]>(PA_2M + 0x10_0000 + 0x17e0)[..],
        data[0x17e0..]
    );
    // The destination turns read-only after 0x800 bytes: the write fails first.
    let err = g
        .iommu
        .dma_copy(DEV, user(PASID), VA_2M, VA_4K + 0x800, 0x1000)
        .unwrap_err();
    assert!(err.write);
    assert_eq!((err.error.completed, err.error.address), (0x800, VA_RO));
    assert_eq!(reason_of_kind(err.error.kind), Some(FaultReason::NoWrite));
    assert_eq!(
        g.read_obj::<[u8; 16]>(PA_4K + 0xff0)[..],
        data[0x7f0..0x800]
    );
    // The source ends after VA_RO: the read fails once the rest is copied.
    let err = g
        .iommu
        .dma_copy(DEV, user(PASID), VA_RO + 0x800, VA_2M, 0x1000)
        .unwrap_err();
    assert!(!err.write);
    assert_eq!(
        (err.error.completed, err.error.address),
        (0x800, VA_RO + 0x1000)
    );
}

#[test]
fn ats_translation_requests() {
    let Sva { mut g, .. } = sva();
    // Read request on a clean writable page: W withheld until the page is dirty.
    let c = g
        .iommu
        .ats_translate(DEV, user(PASID), VA_4K + 5, READ)
        .unwrap();
    assert_eq!(
        (c.translated_addr, c.size, c.read, c.write),
        (PA_4K, PAGE_SIZE_4K, true, false)
    );
    let c = g
        .iommu
        .ats_translate(DEV, user(PASID), VA_4K, WRITE)
        .unwrap();
    assert!(c.write);
    let c = g
        .iommu
        .ats_translate(DEV, user(PASID), VA_4K, READ)
        .unwrap();
    assert!(c.write, "dirty now");
    let c = g
        .iommu
        .ats_translate(DEV, user(PASID), VA_2M, WRITE)
        .unwrap();
    assert_eq!((c.translated_addr, c.size), (PA_2M, PAGE_SIZE_2M));
    // Not present: a completion without permissions, no fault record.
    let c = g
        .iommu
        .ats_translate(DEV, user(PASID), 0x7000_0000_0000, READ)
        .unwrap();
    assert!(!c.read && !c.write);
    assert_eq!(g.read32(FSTS), 0);
    // DTE clear: Unsupported Request and a fault record.
    g.set_context(
        RID_HIGH,
        ContextFlags {
            dte: false,
            ..Default::default()
        },
    );
    assert_eq!(
        g.iommu.ats_translate(DEV_HIGH, user(1), 0, READ),
        Err(AtsError::UnsupportedRequest(FaultReason::DeviceTlbDisabled))
    );
    assert_eq!(fault_record(&g, 0).1, 0x44);
    assert_eq!(fault_record(&g, 0).2, RID_HIGH);
}

#[test]
fn device_tlb_invalidations_and_page_responses_reach_the_device() {
    let Sva { mut g, .. } = sva();
    let dev = Arc::new(RecordingDevice::default());
    g.iommu.register_device(DEV, dev.clone());
    // Linux's SVA range flush: P_IOTLB then PASID-based devTLB with S=1 for 2 MiB.
    assert!(g.submit(&[
        qi::piotlb_page(DID, PASID, VA_2M, 9),
        qi::pasid_dev_tlb(RID, PASID, VA_2M | 0xf_f000, true),
        qi::dev_tlb(RID, 0x5000, false),
        qi::page_response(RID, PASID, 0x1ab, 0, true),
        qi::dev_tlb(0x0099, 0, false), // unregistered device: completes anyway
    ]));
    let inv = dev.invalidations.lock().unwrap().clone();
    assert_eq!(inv.len(), 2);
    assert_eq!(
        (inv[0].source_id, inv[0].pasid, inv[0].address, inv[0].size),
        (DEV, Some(PASID), VA_2M, PAGE_SIZE_2M)
    );
    assert_eq!(
        (inv[1].pasid, inv[1].address, inv[1].size),
        (None, 0x5000, 0x1000)
    );
    let resp = dev.responses.lock().unwrap().clone();
    assert_eq!(resp.len(), 1);
    assert_eq!(
        (
            resp[0].requester_id,
            resp[0].pasid,
            resp[0].prg_index,
            resp[0].code,
            resp[0].from_hardware
        ),
        (DEV, Some(PASID), 0x1ab, ResponseCode::Success, false)
    );
}

#[test]
fn page_requests_land_in_the_guest_queue() {
    let Sva { g, .. } = sva();
    let req = PageRequest {
        requester_id: DEV,
        pasid: user(PASID),
        address: 0x7ffd_0000_0000,
        read: true,
        write: true,
        execute: false,
        last_in_group: true,
        prg_index: 3,
        private_data: None,
    };
    g.iommu.page_request(&req).unwrap();
    assert_eq!(g.read64(PQT), 32);
    assert_eq!(g.read32(PRS), prs::PPR);
    assert_eq!(g.msis.take(), vec![PRQ_MSI]);
    let d: [u64; 4] = g.read_obj(g.prq);
    assert_eq!(d, req.encode());
    // Linux's prq handler: clear PPR, consume, PQH = PQT.
    g.write32(PRS, prs::PPR);
    g.write64(PQH, g.read64(PQT));
    assert_eq!(g.read32(PRS), 0);

    // Fill the 64 KiB queue: 2047 usable slots.
    let mut queued = 1;
    loop {
        match g.iommu.page_request(&PageRequest {
            prg_index: queued % 512,
            ..req
        }) {
            Ok(()) => queued += 1,
            Err(e) => {
                assert_eq!(e.reason, viommu::PageRequestRejection::QueueFull);
                let r = e.response.unwrap();
                assert_eq!((r.code, r.from_hardware), (ResponseCode::Success, true));
                break;
            }
        }
    }
    assert_eq!(queued, 1 + 2047);
    assert_eq!(g.read32(PRS), prs::PPR | prs::PRO);
    // PPR 0->1 and PRO 0->1 are each a page request event (unmasked: sent at once).
    assert_eq!(g.msis.take(), vec![PRQ_MSI, PRQ_MSI]);

    // PRE clear in the context entry: fault 0x47 and an Invalid Request response.
    let mut g = g;
    g.set_context(
        RID_HIGH,
        ContextFlags {
            pre: false,
            ..Default::default()
        },
    );
    let e = g
        .iommu
        .page_request(&PageRequest {
            requester_id: DEV_HIGH,
            ..req
        })
        .unwrap_err();
    assert_eq!(
        e.reason,
        viommu::PageRequestRejection::Fault(FaultReason::PageRequestDisabled)
    );
    assert_eq!(e.response.unwrap().code, ResponseCode::InvalidRequest);
    assert_eq!(fault_record(&g, 0).1, 0x47);
}

#[test]
fn wait_descriptor_status_write_and_interrupt() {
    let mut g = Guest::new();
    let status2 = g.alloc(1);
    g.submit_raw(&[qi::wait(status2 + 4, 0xcafe, true)]);
    assert_eq!(g.read_obj::<u32>(status2 + 4), 0xcafe);
    assert_eq!(g.read32(ICS), ics::IWC);
    assert_eq!(g.msis.take(), vec![INV_MSI]);
    // IWC still set: another IF wait sends nothing; clearing IWC re-arms.
    g.submit_raw(&[qi::wait(status2, 1, true)]);
    assert!(g.msis.take().is_empty());
    g.write32(ICS, ics::IWC);
    g.submit_raw(&[qi::wait(status2, 1, true)]);
    assert_eq!(g.msis.take(), vec![INV_MSI]);
    // Interrupt-only wait (no SW) writes nothing.
    g.mem.write_obj(0u32, GuestAddress(status2)).unwrap();
    g.submit_raw(&[[5 | (1 << 4) | (7u64 << 32), status2, 0, 0]]);
    assert_eq!(g.read_obj::<u32>(status2), 0);
}

#[test]
fn invalidation_queue_wraps_around() {
    let mut g = Guest::new(); // one page: 128 descriptors
    assert_eq!(g.queue_entries, 128);
    // 3 descriptors + wait per batch; 60 batches = 240 slots after the 4 of init: wraps once.
    for _ in 0..60 {
        assert!(g.submit(&[
            qi::iotlb_global(),
            qi::pasid_cache_global(),
            qi::context_global()
        ]));
    }
    assert_eq!(g.read64(IQH), g.read64(IQT));
    assert_eq!(g.read64(IQH), ((4 + 60 * 4) % 128) * 32);
    assert_eq!(g.read32(FSTS), 0);
}

#[test]
fn bad_descriptor_stops_the_queue_until_linux_fixes_it() {
    let mut g = Guest::new();
    let head = g.read64(IQH);
    // A reserved granularity in a PASID-based IOTLB descriptor, then a wait.
    let bad = [6 | (1 << 4), 0, 0, 0];
    assert!(!g.submit(&[bad]));
    assert_eq!(g.read32(FSTS) & fsts::IQE, fsts::IQE);
    assert_eq!(g.read64(IQERCD) & 0xf, 4, "reserved field violation");
    assert_eq!(g.read64(IQH), head, "IQH points at the bad descriptor");
    assert_eq!(g.msis.take(), vec![FAULT_MSI]);
    // qi_check_fault: copy the wait descriptor over the bad one, clear IQE.
    let wait: [u64; 4] = g.read_obj(g.queue + head + 32);
    g.mem.write_obj(wait, GuestAddress(g.queue + head)).unwrap();
    g.write32(FSTS, fsts::IQE);
    assert_eq!(g.read32(FSTS), 0);
    assert_eq!(g.read_obj::<u32>(g.status), QI_DONE);
    assert_eq!(g.read64(IQH), g.read64(IQT));

    // Unknown type 0xa; in a fresh guest a misaligned tail.
    assert!(!g.submit(&[[0xa, 0, 0, 0]]));
    assert_eq!(g.read64(IQERCD) & 0xf, 3);
    let mut g = Guest::new();
    g.write64(IQT, g.read64(IQT) + 16);
    assert_eq!(g.read64(IQERCD) & 0xf, 6);
    assert_ne!(g.read32(FSTS) & fsts::IQE, 0);
    let _ = g.alloc(0);
}

#[test]
fn register_window_semantics() {
    let g = Guest::new();
    // Read-only registers ignore writes.
    g.write64(CAP, 0);
    g.write64(ECAP, 0);
    g.write32(GSTS, 0);
    g.write64(IQH, 0x40);
    assert_eq!(g.read64(CAP), CAP_VALUE);
    assert_eq!(g.read64(ECAP), ECAP_VALUE);
    assert_eq!(g.read32(GSTS), gcmd::TE | gcmd::SRTP | gcmd::QIE);
    assert_eq!(g.read64(IQH), 4 * 32);
    // 32-bit halves of 64-bit registers.
    assert_eq!(g.read32(CAP), CAP_VALUE as u32);
    assert_eq!(g.read32(CAP + 4), (CAP_VALUE >> 32) as u32);
    g.write32(IVA, 0x1234_5000);
    g.write32(IVA + 4, 0x7f);
    assert_eq!(g.read64(IVA), 0x7f_1234_5000);
    // GCMD reads as zero; unsupported sizes read zero and are ignored.
    assert_eq!(g.read32(GCMD), 0);
    let mut b = [0xffu8; 2];
    g.iommu.mmio_read(CAP, &mut b);
    assert_eq!(b, [0, 0]);
    g.iommu.mmio_write(GCMD, &[0, 0]);
    assert_eq!(g.read32(GSTS) & gcmd::TE, gcmd::TE);
    // Event data keeps only bits 15:0, address bits 1:0 read as zero.
    g.write32(FEDATA, 0xffff_ffff);
    g.write32(FEADDR, 0xffff_ffff);
    assert_eq!((g.read32(FEDATA), g.read32(FEADDR)), (0xffff, 0xffff_fffc));
    // 8-byte access over two 32-bit registers.
    g.write64(FECTL, 0x0000_1234_8000_0000);
    assert_eq!(g.read32(FECTL), ectl::IM);
    assert_eq!(g.read32(FEDATA), 0x1234);
    // Translation disable and re-enable.
    g.gcmd(gcmd::TE, false);
    assert_eq!(g.read32(GSTS) & gcmd::TE, 0);
    assert_eq!(
        g.iommu
            .translate(DEV, None, 0x5000, READ)
            .unwrap()
            .phys_addr,
        0x5000
    );
}

#[test]
fn concurrent_translations_and_invalidations() {
    let Sva { mut g, pgd } = sva();
    let g_ref = &g.iommu;
    std::thread::scope(|s| {
        for t in 0..2 {
            s.spawn(move || {
                for i in 0..2000u64 {
                    let va = if (i + t) % 2 == 0 {
                        VA_4K
                    } else {
                        VA_2M + i * 8
                    };
                    g_ref.translate(DEV, user(PASID), va, READ).unwrap();
                }
            });
        }
        for _ in 0..200 {
            g_ref.mmio_write(IOTLB_REG, &(iotlb_reg::IVT | (1 << 60)).to_le_bytes());
        }
    });
    remap(&g, pgd, VA_4K, 0x74_0000);
    assert!(g.submit(&[qi::piotlb_pasid(DID, PASID)]));
    assert_eq!(
        g.iommu
            .translate(DEV, user(PASID), VA_4K, READ)
            .unwrap()
            .phys_addr,
        0x74_0000
    );
}

#[test]
fn dmar_table_for_this_unit() {
    let t = viommu::dmar::build_dmar_table(&viommu::dmar::DmarConfig::include_all(0xfed9_0000));
    assert_eq!(&t[..4], b"DMAR");
    assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    assert_eq!(t[36] + 1, HOST_ADDRESS_WIDTH);
}

#[test]
fn remaining_invalidation_scopes() {
    let Sva { mut g, pgd } = sva();
    let observer = Arc::new(RecordingObserver::default());
    g.iommu.add_pasid_observer(observer.clone());
    let translates = |g: &Guest| g.iommu.translate(DEV, user(PASID), VA_4K, READ).is_ok();
    assert!(translates(&g));
    // PASID cache, domain-selective: wrong domain leaves the stale entry, right one drops it.
    g.set_pasid_entry(RID, PASID, [0; 8]);
    assert!(g.submit(&[qi::piotlb_pasid(DID, PASID), [7 | (7u64 << 16), 0, 0, 0]]));
    assert!(translates(&g));
    assert!(g.submit(&[[7 | (u64::from(DID) << 16), 0, 0, 0]]));
    assert!(!translates(&g));
    // PASID cache, global.
    g.set_pasid_entry(RID, PASID, first_level_entry(pgd, DID, false, false));
    assert!(translates(&g));
    g.set_pasid_entry(RID, PASID, [0; 8]);
    assert!(g.submit(&[qi::piotlb_pasid(DID, PASID)]));
    assert!(translates(&g));
    assert!(g.submit(&[qi::pasid_cache_global()]));
    assert!(!translates(&g));
    assert_eq!(
        *observer.0.lock().unwrap(),
        vec![
            PasidCacheScope::Domain { did: 7 },
            PasidCacheScope::Domain { did: DID },
            PasidCacheScope::Global
        ]
    );
    // Context cache, global.
    g.set_pasid_entry(RID, PASID, first_level_entry(pgd, DID, false, false));
    assert!(g.submit(&[qi::pasid_cache_global()]));
    assert!(translates(&g));
    g.set_context(
        RID,
        ContextFlags {
            paside: false,
            ..Default::default()
        },
    );
    assert!(translates(&g));
    assert!(g.submit(&[qi::context_global()]));
    assert!(!translates(&g));
}

#[test]
fn queue_of_128_bit_descriptors() {
    let mut g = Guest::new();
    let q = g.alloc(1);
    let status = g.alloc(1);
    g.gcmd(gcmd::QIE, false);
    g.write64(IQT, 0);
    g.write64(IQA, q); // DW=0, QS=0: 256 descriptors of 16 bytes
    g.gcmd(gcmd::QIE, true);
    assert_eq!(g.read64(IQH), 0);
    let wait = qi::wait(status, 0x77, false);
    for (i, d) in [qi::iotlb_global(), wait].iter().enumerate() {
        g.mem
            .write_obj([d[0], d[1]], GuestAddress(q + i as u64 * 16))
            .unwrap();
    }
    g.write64(IQT, 2 << 4);
    assert_eq!(g.read_obj::<u32>(status), 0x77);
    assert_eq!(g.read64(IQH), 32);
    // A PASID-based descriptor needs 256 bits.
    let p = qi::piotlb_pasid(DID, 1);
    g.mem.write_obj([p[0], p[1]], GuestAddress(q + 32)).unwrap();
    g.write64(IQT, 3 << 4);
    assert_ne!(g.read32(FSTS) & fsts::IQE, 0);
    assert_eq!(g.read64(IQERCD) & 0xf, 5, "invalid descriptor width");
    assert_eq!(g.read64(IQH), 32);
}

/// Write `descriptors` and a status-write wait descriptor at IQT through a shared reference
/// (another thread is using the unit meanwhile); whether the wait's status write arrived.
fn submit_shared(g: &Guest, descriptors: &[[u64; 4]]) -> bool {
    g.mem.write_obj(0u32, GuestAddress(g.status)).unwrap();
    let mut tail = g.read64(IQT) >> 5;
    for d in descriptors
        .iter()
        .copied()
        .chain([qi::wait(g.status, QI_DONE, false)])
    {
        g.mem
            .write_obj(d, GuestAddress(g.queue + tail * 32))
            .unwrap();
        tail = (tail + 1) % g.queue_entries;
    }
    g.write64(IQT, tail << 5);
    g.read_obj::<u32>(g.status) == QI_DONE
}

/// What Linux relies on when it frees a page after unmapping it from an SVA process: once
/// the wait descriptor after the PASID-based IOTLB invalidation has written its status, no
/// DMA that translated the page before the invalidation still writes it (CAP.DWD/DRD: the
/// unit drains such requests before the invalidation completes). The device here writes
/// 1 MiB (256 pages, the last one the victim) again and again; the guest remaps the last
/// page, invalidates it, then reuses the old frame and checks nothing overwrote it.
#[test]
fn an_invalidation_completes_after_dma_through_the_old_translation() {
    const VA: u64 = 0x7f12_3400_0000;
    const PAGES: u64 = 256;
    const ROUNDS: usize = 20;
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(20);
    let mut g = Guest::new();
    let mem = g.mem.clone();
    let mut pt = page_tables(&mem, PagingLevels::Four, TABLES_B);
    // Frames one apart, so the DMA moves page by page.
    let frames = g.alloc(2 * PAGES);
    for i in 0..PAGES {
        pt.map(
            VA + i * 0x1000,
            frames + 2 * i * 0x1000,
            PAGE_SIZE_4K,
            USER_RW,
        )
        .unwrap();
    }
    let (old, new) = (frames + 2 * (PAGES - 1) * 0x1000, g.alloc(1));
    let last = VA + (PAGES - 1) * 0x1000;
    let pte = pt.entry_addr(last, 1).unwrap();
    g.set_context(RID, ContextFlags::default());
    g.set_pasid_entry(RID, PASID, first_level_entry(pt.root(), DID, false, false));
    let point_last_page_at = |frame: u64| {
        g.mem
            .write_obj(frame | USER_RW | entry::PRESENT, GuestAddress(pte))
            .unwrap();
        assert!(submit_shared(&g, &[qi::piotlb_page(DID, PASID, last, 0)]));
    };
    let byte = |addr: u64| g.read_obj::<u8>(addr);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let writes = std::sync::atomic::AtomicU64::new(0);
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let start = std::time::Instant::now();
        while !done() {
            assert!(start.elapsed() < PATIENCE, "device stalled: {what}");
            std::thread::yield_now();
        }
    };
    std::thread::scope(|s| {
        let (iommu, stop, writes) = (&g.iommu, &stop, &writes);
        s.spawn(move || {
            let data = vec![0xaa_u8; (PAGES * 0x1000) as usize];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                iommu.dma_write(DEV, user(PASID), VA, &data).unwrap();
                writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        });
        let mut overwritten = 0;
        for _ in 0..ROUNDS {
            g.mem.write_slice(&[0; 0x1000], GuestAddress(old)).unwrap();
            point_last_page_at(old);
            wait_for("writing the old frame", &|| byte(old) == 0xaa);
            // munmap: the page goes, its translation is invalidated, and the frame is free.
            point_last_page_at(new);
            g.mem
                .write_slice(&[0x55; 0x1000], GuestAddress(old))
                .unwrap();
            let n = writes.load(std::sync::atomic::Ordering::SeqCst);
            wait_for("writing on", &|| {
                writes.load(std::sync::atomic::Ordering::SeqCst) >= n + 2
            });
            let mut frame = [0u8; 0x1000];
            g.mem.read_slice(&mut frame, GuestAddress(old)).unwrap();
            if frame.iter().any(|&b| b != 0x55) {
                overwritten += 1;
            }
        }
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            overwritten, 0,
            "rounds in which the device wrote a frame after its invalidation completed"
        );
    });
    assert_eq!(byte(new), 0xaa, "the device writes the new frame");
}
