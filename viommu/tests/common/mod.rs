// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! A test "guest": guest memory with a page allocator, the unit, and helpers that program it
//! the way Linux's intel-iommu driver does (init sequence, context and PASID entries, queued
//! invalidation with a status-write wait descriptor per batch).

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

pub use pci::PciAddress;
use viommu::paging::builder::PageTableBuilder;
use viommu::paging::PagingLevels;
use viommu::regs::*;
use viommu::{
    AtsDevice, DeviceTlbInvalidation, Iommu, MsiSink, PageGroupResponse, PasidCacheScope,
    PasidObserver,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub type Mem = Arc<GuestMemoryMmap<()>>;

pub const MEM_SIZE: u64 = 64 << 20;
/// The unit's fault event goes here.
pub const FAULT_MSI: (u64, u32) = (0xfee0_0000, 0x41);
/// The unit's invalidation completion event goes here.
pub const INV_MSI: (u64, u32) = (0xfee0_1000, 0x42);
/// The unit's page request event goes here.
pub const PRQ_MSI: (u64, u32) = (0xfee0_2000, 0x43);

/// The requester ID the tests use for "the device" (bus 0, device 3, function 0).
pub const RID: u16 = 0x0018;
/// A device in the upper half of a context table (devfn >= 0x80), on bus 2.
pub const RID_HIGH: u16 = 0x0285;
/// [`RID`] as the function it names, as the unit's requests take it.
pub const DEV: PciAddress = PciAddress::from_rid(RID);
/// [`RID_HIGH`] as the function it names.
pub const DEV_HIGH: PciAddress = PciAddress::from_rid(RID_HIGH);

/// Records every MSI.
#[derive(Default)]
pub struct RecordingMsi(pub Mutex<Vec<(u64, u32)>>);

impl MsiSink for RecordingMsi {
    fn send_msi(&self, msg: pci::MsiMessage) {
        let (address, data) = (msg.address, msg.data);
        self.0.lock().unwrap().push((address, data));
    }
}

impl RecordingMsi {
    pub fn take(&self) -> Vec<(u64, u32)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

/// Records device-TLB invalidations and page group responses.
#[derive(Default)]
pub struct RecordingDevice {
    pub invalidations: Mutex<Vec<DeviceTlbInvalidation>>,
    pub responses: Mutex<Vec<PageGroupResponse>>,
}

impl AtsDevice for RecordingDevice {
    fn invalidate_device_tlb(&self, invalidation: &DeviceTlbInvalidation) {
        self.invalidations.lock().unwrap().push(*invalidation);
    }

    fn page_group_response(&self, response: &PageGroupResponse) {
        self.responses.lock().unwrap().push(*response);
    }
}

/// Records PASID-cache invalidations.
#[derive(Default)]
pub struct RecordingObserver(pub Mutex<Vec<PasidCacheScope>>);

impl PasidObserver for RecordingObserver {
    fn pasid_cache_invalidated(&self, scope: PasidCacheScope) {
        self.0.lock().unwrap().push(scope);
    }
}

/// Context-entry flags as Linux sets them.
#[derive(Clone, Copy)]
pub struct ContextFlags {
    pub dte: bool,
    pub paside: bool,
    pub pre: bool,
    pub fpd: bool,
}

impl Default for ContextFlags {
    fn default() -> Self {
        ContextFlags {
            dte: true,
            paside: true,
            pre: true,
            fpd: false,
        }
    }
}

/// Invalidation descriptors, built like Linux's iommu.h macros.
pub mod qi {
    pub fn context_global() -> [u64; 4] {
        [1 | (1 << 4), 0, 0, 0]
    }
    pub fn context_device(sid: u16) -> [u64; 4] {
        [1 | (3 << 4) | (u64::from(sid) << 32), 0, 0, 0]
    }
    pub fn iotlb_global() -> [u64; 4] {
        [2 | (1 << 4) | (1 << 6) | (1 << 7), 0, 0, 0]
    }
    pub fn iotlb_domain(did: u16) -> [u64; 4] {
        [2 | (2 << 4) | (u64::from(did) << 16), 0, 0, 0]
    }
    pub fn iotlb_page(did: u16, addr: u64, am: u8) -> [u64; 4] {
        [
            2 | (3 << 4) | (u64::from(did) << 16),
            addr | u64::from(am),
            0,
            0,
        ]
    }
    pub fn piotlb_pasid(did: u16, pasid: u32) -> [u64; 4] {
        [
            6 | (2 << 4) | (u64::from(did) << 16) | (u64::from(pasid) << 32),
            0,
            0,
            0,
        ]
    }
    pub fn piotlb_page(did: u16, pasid: u32, addr: u64, am: u8) -> [u64; 4] {
        [
            6 | (3 << 4) | (u64::from(did) << 16) | (u64::from(pasid) << 32),
            addr | u64::from(am),
            0,
            0,
        ]
    }
    pub fn pasid_cache_global() -> [u64; 4] {
        [7 | (3 << 4), 0, 0, 0]
    }
    pub fn pasid_cache_pasid(did: u16, pasid: u32) -> [u64; 4] {
        [
            7 | (1 << 4) | (u64::from(did) << 16) | (u64::from(pasid) << 32),
            0,
            0,
            0,
        ]
    }
    pub fn dev_tlb(sid: u16, addr: u64, size_bit: bool) -> [u64; 4] {
        [
            3 | (u64::from(sid) << 32) | (0x1f << 16),
            addr | u64::from(size_bit),
            0,
            0,
        ]
    }
    pub fn pasid_dev_tlb(sid: u16, pasid: u32, addr: u64, size_bit: bool) -> [u64; 4] {
        [
            8 | (u64::from(sid) << 16) | (u64::from(pasid) << 32),
            addr | (u64::from(size_bit) << 11),
            0,
            0,
        ]
    }
    pub fn page_response(rid: u16, pasid: u32, prg: u16, code: u8, lpig: bool) -> [u64; 4] {
        [
            9 | (1 << 4)
                | (u64::from(code) << 12)
                | (u64::from(rid) << 16)
                | (u64::from(pasid) << 32),
            (u64::from(prg) << 3) | (u64::from(lpig) << 2),
            0,
            0,
        ]
    }
    pub fn wait(status_addr: u64, data: u32, interrupt: bool) -> [u64; 4] {
        [
            5 | (1 << 5) | (1 << 6) | (u64::from(interrupt) << 4) | (u64::from(data) << 32),
            status_addr,
            0,
            0,
        ]
    }
}

/// The registers garbage writes aim at (besides any offset in the window).
pub const GARBAGE_TARGETS: [u64; 18] = [
    GCMD,
    RTADDR,
    CCMD,
    FSTS,
    FECTL,
    IQT,
    IQA,
    ICS,
    IECTL,
    PQH,
    PQT,
    PQA,
    PRS,
    PECTL,
    IVA,
    IOTLB_REG,
    FRCD_BASE + 8,
    FRCD_BASE + 12,
];

/// Status value Linux's qi_submit_sync waits for.
pub const QI_DONE: u32 = 2;

pub struct Guest {
    pub mem: Mem,
    pub iommu: Iommu<Mem>,
    pub msis: Arc<RecordingMsi>,
    next_page: u64,
    pub root_table: u64,
    pub queue: u64,
    pub queue_entries: u64,
    queue_tail: u64,
    pub status: u64,
    pub prq: u64,
    /// PASID directory per requester.
    pasid_dirs: Vec<(u16, u64)>,
}

impl Guest {
    /// Memory and the unit, not yet initialised.
    pub fn bare() -> Self {
        Self::bare_sized(MEM_SIZE)
    }

    /// Like [`Guest::bare`] with `size` bytes of memory (at least [`MEM_SIZE`]; what lies
    /// above it is the caller's).
    pub fn bare_sized(size: u64) -> Self {
        assert!(size >= MEM_SIZE);
        let mem = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap(),
        );
        let msis = Arc::new(RecordingMsi::default());
        let iommu = Iommu::new(mem.clone(), msis.clone());
        Guest {
            mem,
            iommu,
            msis,
            next_page: 0x10_0000,
            root_table: 0,
            queue: 0,
            queue_entries: 0,
            queue_tail: 0,
            status: 0,
            prq: 0,
            pasid_dirs: Vec::new(),
        }
    }

    /// Memory and the unit after Linux's init sequence.
    pub fn new() -> Self {
        let mut g = Guest::bare();
        g.linux_init(1);
        g
    }

    /// Allocate `n` zeroed, contiguous pages.
    pub fn alloc(&mut self, n: u64) -> u64 {
        let addr = self.next_page;
        self.next_page += n * 0x1000;
        assert!(self.next_page <= MEM_SIZE / 2, "test guest out of memory");
        self.mem
            .write_slice(&vec![0u8; (n * 0x1000) as usize], GuestAddress(addr))
            .unwrap();
        addr
    }

    pub fn read32(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.iommu.mmio_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn read64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.iommu.mmio_read(offset, &mut b);
        u64::from_le_bytes(b)
    }

    pub fn write32(&self, offset: u64, v: u32) {
        self.iommu.mmio_write(offset, &v.to_le_bytes());
    }

    pub fn write64(&self, offset: u64, v: u64) {
        self.iommu.mmio_write(offset, &v.to_le_bytes());
    }

    /// Set a GCMD bit the way Linux does (persistent bits from GSTS) and check GSTS follows.
    pub fn gcmd(&self, bit: u32, on: bool) {
        let persistent = self.read32(GSTS) & (gcmd::TE | gcmd::QIE);
        let v = if on {
            persistent | bit
        } else {
            persistent & !bit
        };
        self.write32(GCMD, v);
    }

    /// intel-iommu init: QI with 256-bit descriptors in `queue_pages` pages, scalable-mode
    /// root table, global invalidations, 64 KiB page request queue, fault/PR/IE event MSIs,
    /// translation enable.
    pub fn linux_init(&mut self, queue_pages: u64) {
        self.queue = self.alloc(queue_pages);
        self.queue_entries = queue_pages * 0x1000 / 32;
        self.status = self.alloc(1);
        let qs = queue_pages.trailing_zeros() as u64;
        self.write64(IQT, 0);
        self.write64(IQA, self.queue | iqa::DW | qs);
        self.gcmd(gcmd::QIE, true);
        assert_ne!(self.read32(GSTS) & gcmd::QIE, 0);

        self.root_table = self.alloc(1);
        self.write64(RTADDR, self.root_table | (1 << 10));
        self.write32(GCMD, self.read32(GSTS) | gcmd::SRTP);
        assert_ne!(self.read32(GSTS) & gcmd::SRTP, 0, "RTPS");

        for (i, (addr, data)) in [FAULT_MSI, INV_MSI, PRQ_MSI].into_iter().enumerate() {
            let ctl = [FECTL, IECTL, PECTL][i];
            self.write32(ctl + 4, data);
            self.write32(ctl + 8, addr as u32);
            self.write32(ctl + 12, (addr >> 32) as u32);
            self.write32(ctl, 0);
        }

        self.prq = self.alloc(16);
        self.write64(PQH, 0);
        self.write64(PQT, 0);
        self.write64(PQA, self.prq | 4);

        self.submit(&[
            qi::context_global(),
            qi::pasid_cache_global(),
            qi::iotlb_global(),
        ]);
        self.gcmd(gcmd::TE, true);
        assert_ne!(self.read32(GSTS) & gcmd::TE, 0);
    }

    /// Write descriptors plus a wait descriptor at IQT, move IQT (wrapping), and return
    /// whether the wait's status write arrived (as qi_submit_sync polls for it).
    pub fn submit(&mut self, descriptors: &[[u64; 4]]) -> bool {
        self.mem.write_obj(0u32, GuestAddress(self.status)).unwrap();
        let mut all = descriptors.to_vec();
        all.push(qi::wait(self.status, QI_DONE, false));
        self.submit_raw(&all);
        self.mem.read_obj::<u32>(GuestAddress(self.status)).unwrap() == QI_DONE
    }

    /// Write descriptors at IQT and move IQT, without a wait descriptor.
    pub fn submit_raw(&mut self, descriptors: &[[u64; 4]]) {
        for d in descriptors {
            self.mem
                .write_obj(*d, GuestAddress(self.queue + self.queue_tail * 32))
                .unwrap();
            self.queue_tail = (self.queue_tail + 1) % self.queue_entries;
        }
        self.write64(IQT, self.queue_tail << 5);
    }

    /// The PASID directory of `rid`, allocating one (PDTS=7, 1M PASIDs) on first use.
    pub fn pasid_dir(&mut self, rid: u16) -> u64 {
        if let Some(&(_, d)) = self.pasid_dirs.iter().find(|(r, _)| *r == rid) {
            return d;
        }
        let d = self.alloc(32);
        self.pasid_dirs.push((rid, d));
        d
    }

    /// Address of the scalable-mode context entry for `rid`, creating the context table.
    pub fn context_entry_addr(&mut self, rid: u16) -> u64 {
        let bus = u64::from(rid >> 8);
        let devfn = u64::from(rid & 0xff);
        let root_entry = self.root_table + bus * 16 + if devfn >= 0x80 { 8 } else { 0 };
        let mut half: u64 = self.mem.read_obj(GuestAddress(root_entry)).unwrap();
        if half & 1 == 0 {
            half = self.alloc(1) | 1;
            self.mem.write_obj(half, GuestAddress(root_entry)).unwrap();
        }
        (half & !0xfff) + (devfn & 0x7f) * 32
    }

    /// Program `rid`'s context entry (pasid dir, PDTS=7, RID_PASID 0).
    pub fn set_context(&mut self, rid: u16, flags: ContextFlags) {
        let dir = self.pasid_dir(rid);
        let addr = self.context_entry_addr(rid);
        let lo = dir
            | (7 << 9)
            | (u64::from(flags.pre) << 4)
            | (u64::from(flags.paside) << 3)
            | (u64::from(flags.dte) << 2)
            | (u64::from(flags.fpd) << 1)
            | 1;
        self.mem
            .write_obj([lo, 0u64, 0, 0], GuestAddress(addr))
            .unwrap();
    }

    /// Address of the PASID-table entry of (`rid`, `pasid`), creating the PASID table.
    pub fn pasid_entry_addr(&mut self, rid: u16, pasid: u32) -> u64 {
        let dir = self.pasid_dir(rid);
        let dir_entry = dir + u64::from(pasid >> 6) * 8;
        let mut d: u64 = self.mem.read_obj(GuestAddress(dir_entry)).unwrap();
        if d & 1 == 0 {
            d = self.alloc(1) | 1;
            self.mem.write_obj(d, GuestAddress(dir_entry)).unwrap();
        }
        (d & !0xfff) + u64::from(pasid & 0x3f) * 64
    }

    pub fn set_pasid_entry(&mut self, rid: u16, pasid: u32, raw: [u64; 8]) {
        let addr = self.pasid_entry_addr(rid, pasid);
        self.mem.write_obj(raw, GuestAddress(addr)).unwrap();
    }

    pub fn read_obj<T: vm_memory::ByteValued>(&self, addr: u64) -> T {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

/// Page tables in guest memory, allocated from 4 MiB at `area` (the upper half of memory,
/// above what [`Guest::alloc`] hands out).
pub fn page_tables(
    mem: &Mem,
    levels: PagingLevels,
    area: u64,
) -> PageTableBuilder<'_, GuestMemoryMmap<()>> {
    assert!(area >= MEM_SIZE / 2 && area + (4 << 20) <= MEM_SIZE);
    PageTableBuilder::new(&**mem, levels, area, area + (4 << 20)).unwrap()
}

/// Table areas for [`page_tables`].
pub const TABLES_A: u64 = 0x200_0000;
pub const TABLES_B: u64 = 0x240_0000;
pub const TABLES_C: u64 = 0x280_0000;

/// A PASID-table entry as intel_pasid_setup_first_level writes it: FLPTR=pgd, DID, AW=2,
/// PWSNP, NXE, PGTT=1, P; supervisor binds add SRE and WPE; FLPM=1 for 5-level.
pub fn first_level_entry(pgd: u64, did: u16, supervisor: bool, five_level: bool) -> [u64; 8] {
    let mut e = [0u64; 8];
    e[0] = (1 << 6) | (2 << 2) | 1;
    e[1] = u64::from(did) | (1 << 23);
    e[2] = pgd | (1 << 5) | (u64::from(five_level) << 2);
    if supervisor {
        e[2] |= 1 | (1 << 4);
    }
    e
}

/// A second-stage-only entry (PGTT=2, AW=2).
pub fn second_level_entry(slptptr: u64, did: u16) -> [u64; 8] {
    let mut e = [0u64; 8];
    e[0] = slptptr | (2 << 6) | (2 << 2) | 1;
    e[1] = u64::from(did);
    e
}

/// A pass-through entry (PGTT=4).
pub fn pass_through_entry(did: u16) -> [u64; 8] {
    let mut e = [0u64; 8];
    e[0] = (4 << 6) | (2 << 2) | 1;
    e[1] = u64::from(did);
    e
}

/// A nested entry (PGTT=3).
pub fn nested_entry(flptr: u64, slptptr: u64, did: u16) -> [u64; 8] {
    let mut e = [0u64; 8];
    e[0] = slptptr | (3 << 6) | (2 << 2) | 1;
    e[1] = u64::from(did);
    e[2] = flptr | (1 << 5);
    e
}
