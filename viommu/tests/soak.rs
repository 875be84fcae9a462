// SPDX-License-Identifier: Apache-2.0

//! The hostile soak: a guest that throws everything at the unit. Random
//! register writes, random qwords poked into its root, context, PASID and
//! page tables (mostly entry-like values pointing at other tables),
//! invalidation queues full of real and garbage descriptors (status writes
//! anywhere the guest names), translations, ATS requests and page requests
//! from random requesters and PASIDs at random addresses. Guest RAM outside
//! the region the guest ever names is a canary, checked every few thousand
//! operations and at the end; the unit must never panic, and must still
//! complete an invalidation wait after the storm.
//!
//! `SOAK_OPS` sets the number of operations (default 10^6, what CI runs);
//! `SOAK_SEED` the random seed. Overnight:
//! `SOAK_OPS=100000000 cargo test --release -p viommu --test soak -- --nocapture`

mod common;

use std::sync::Arc;
use std::time::Instant;

use testkit::{pattern, Canary, Rng, SoakSettings};

use common::{qi, PciAddress, RecordingMsi, GARBAGE_TARGETS};
use viommu::regs::*;
use viommu::{AccessType, Iommu, PageRequest, PasidTag};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Far above 4 GiB, at no round address, so that no 32-bit value in guest
/// data is an address in it; below the unit's 48-bit address width.
const BASE: u64 = 0x3a5c_0000_0000;
const MIB: u64 = 1 << 20;
const CANARY_LOW: (u64, u64) = (BASE, MIB);
/// Where every address the guest names lies (or beyond RAM).
const PLAY: (u64, u64) = (BASE + MIB, 8 * MIB);
const RAM_END: u64 = PLAY.0 + PLAY.1;
const CANARY_HIGH: (u64, u64) = (RAM_END + MIB, MIB);
const CHECK_EVERY: u64 = 4096;
/// Pages the guest's structures live in: most pokes land there.
const HOT_PAGES: u64 = 64;
/// The largest region the unit writes from one guest-named base (a
/// 128-page page request queue).
const REACH: u64 = 512 * 1024;

type Mem = Arc<GuestMemoryMmap<()>>;

/// Whether a value, read as an address (or a page address with flags),
/// could make the unit write a canary.
fn reaches_canary(v: u64) -> bool {
    [v, v & 0x000f_ffff_ffff_f000].iter().any(|&a| {
        [CANARY_LOW, CANARY_HIGH]
            .iter()
            .any(|&(start, len)| a.wrapping_sub(start.wrapping_sub(REACH)) < len + REACH)
    })
}

struct Soak {
    mem: Mem,
    iommu: Iommu<Mem>,
    rng: Rng,
    hot: u64,
    queue: u64,
    tail: u64,
    status: u64,
    canaries: [Canary; 2],
    counts: [u64; 6],
    /// Translations that succeeded: the garbage reached the page walks.
    translated: u64,
}

impl Soak {
    fn new(seed: u64) -> Self {
        let mem: Mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(CANARY_LOW.0), CANARY_LOW.1 as usize),
                (GuestAddress(PLAY.0), PLAY.1 as usize),
                (GuestAddress(CANARY_HIGH.0), CANARY_HIGH.1 as usize),
            ])
            .unwrap(),
        );
        let iommu = Iommu::new(mem.clone(), Arc::new(RecordingMsi::default()));
        let canaries = [
            Canary::new(CANARY_LOW.0, pattern(CANARY_LOW.1 as usize, 0xc0ffee)),
            Canary::new(CANARY_HIGH.0, pattern(CANARY_HIGH.1 as usize, 0xbadf00d)),
        ];
        for canary in &canaries {
            mem.write_slice(canary.expected(), GuestAddress(canary.start()))
                .unwrap();
        }
        let hot = PLAY.0;
        let queue = hot + HOT_PAGES * 0x1000;
        let status = queue + 0x1000;
        let mut soak = Self {
            mem,
            iommu,
            rng: Rng::new(seed.wrapping_mul(2).wrapping_add(1)),
            hot,
            queue,
            tail: 0,
            status,
            canaries,
            counts: [0; 6],
            translated: 0,
        };
        soak.init();
        soak
    }

    fn write64(&self, offset: u64, v: u64) {
        self.iommu.mmio_write(offset, &v.to_le_bytes());
    }

    fn read64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        self.iommu.mmio_read(offset, &mut b);
        u64::from_le_bytes(b)
    }

    /// What intel-iommu's init does: queued invalidation on a one-page
    /// queue, the root table at the first hot page (scalable mode), a page
    /// request queue after the status page, translation on. Errors left by
    /// the garbage are cleared first.
    fn init(&mut self) {
        self.iommu.mmio_write(GCMD, &0u32.to_le_bytes());
        self.iommu.mmio_write(FSTS, &u32::MAX.to_le_bytes());
        self.tail = 0;
        self.write64(IQT, 0);
        self.write64(IQA, self.queue | iqa::DW);
        self.iommu.mmio_write(GCMD, &gcmd::QIE.to_le_bytes());
        self.write64(RTADDR, self.hot | (1 << 10));
        self.iommu
            .mmio_write(GCMD, &(gcmd::QIE | gcmd::SRTP).to_le_bytes());
        let prq = self.status + 0x1000;
        self.write64(PQH, 0);
        self.write64(PQT, 0);
        self.write64(PQA, prq | 4);
        self.iommu
            .mmio_write(GCMD, &(gcmd::QIE | gcmd::TE).to_le_bytes());
    }

    /// An address the guest would name: mostly in its tables or RAM,
    /// often straddling RAM's end or beyond it, sometimes anything.
    fn address(&mut self) -> u64 {
        loop {
            let a = match self.rng.below(100) {
                0..=49 => self.hot + self.rng.below(HOT_PAGES * 0x1000),
                50..=69 => PLAY.0 + self.rng.below(PLAY.1),
                70..=79 => RAM_END - 1 - self.rng.below(256),
                80..=84 => RAM_END + self.rng.below(0x10_0000),
                _ => self.rng.next(),
            };
            if !reaches_canary(a) {
                return a;
            }
        }
    }

    /// A table-entry-like value: a hot page with random flag bits (present
    /// most of the time), or any value.
    fn entry(&mut self) -> u64 {
        if self.rng.chance(70) {
            let page = self.hot + self.rng.below(HOT_PAGES) * 0x1000;
            page | (self.rng.next() & 0xfff) | u64::from(self.rng.chance(80))
        } else {
            self.address()
        }
    }

    fn poke(&mut self) {
        let at = if self.rng.chance(80) {
            self.hot + self.rng.below(HOT_PAGES * 512) * 8
        } else {
            PLAY.0 + self.rng.below(PLAY.1 / 8) * 8
        };
        let v = self.entry();
        self.mem.write_obj(v, GuestAddress(at)).unwrap();
        self.counts[0] += 1;
    }

    fn register_write(&mut self) {
        let offset = if self.rng.chance(70) {
            GARBAGE_TARGETS[self.rng.below(GARBAGE_TARGETS.len() as u64) as usize]
        } else {
            self.rng.below(REG_WINDOW_SIZE / 4) * 4
        };
        let value = if self.rng.chance(50) {
            self.entry()
        } else {
            self.rng.next() & !u64::from(self.rng.chance(50)) << 63
        };
        let value = if reaches_canary(value) { 0 } else { value };
        if self.rng.chance(50) {
            self.iommu.mmio_write(offset & !7, &value.to_le_bytes());
        } else {
            self.iommu.mmio_write(offset, &(value as u32).to_le_bytes());
        }
        let mut b = [0u8; 8];
        self.iommu
            .mmio_read(self.rng.below(REG_WINDOW_SIZE / 8) * 8, &mut b);
        self.counts[1] += 1;
    }

    fn descriptor(&mut self) -> [u64; 4] {
        let r = &mut self.rng;
        let (did, pasid, sid) = (r.next() as u16, r.below(1 << 20) as u32, r.next() as u16);
        let addr = r.next() & !0xfff;
        let am = r.below(64) as u8;
        match r.below(12) {
            0 => qi::context_global(),
            1 => qi::context_device(sid),
            2 => qi::iotlb_global(),
            3 => qi::iotlb_domain(did),
            4 => qi::iotlb_page(did, addr, am),
            5 => qi::piotlb_pasid(did, pasid),
            6 => qi::piotlb_page(did, pasid, addr, am),
            7 => qi::pasid_cache_global(),
            8 => qi::pasid_cache_pasid(did, pasid),
            9 => qi::pasid_dev_tlb(sid, pasid, addr, r.chance(50)),
            10 => {
                let status = self.address() & !3;
                qi::wait(status, self.rng.next() as u32, self.rng.chance(30))
            }
            _ => {
                let mut raw = [0u64; 4];
                for q in raw.iter_mut() {
                    *q = self.entry();
                }
                raw
            }
        }
    }

    /// One to four descriptors at the tail, then IQT moves.
    fn invalidate(&mut self) {
        for _ in 0..=self.rng.below(4) {
            let d = self.descriptor();
            self.mem
                .write_obj(d, GuestAddress(self.queue + self.tail * 32))
                .unwrap();
            self.tail = (self.tail + 1) % 128;
        }
        self.write64(IQT, self.tail << 5);
        self.counts[2] += 1;
    }

    fn requester(&mut self) -> (PciAddress, Option<PasidTag>) {
        let rid = PciAddress::from_rid(if self.rng.chance(70) {
            self.rng.below(64) as u16
        } else {
            self.rng.next() as u16
        });
        let pasid = self.rng.chance(60).then(|| PasidTag {
            pasid: if self.rng.chance(70) {
                self.rng.below(128) as u32
            } else {
                self.rng.below(1 << 20) as u32
            },
            privileged: self.rng.chance(30),
        });
        (rid, pasid)
    }

    fn translate(&mut self) {
        let (rid, tag) = self.requester();
        let iova = self.iova();
        let access = AccessType {
            write: self.rng.chance(50),
            user: self.rng.chance(50),
            execute: self.rng.chance(10),
        };
        if self.iommu.translate(rid, tag, iova, access).is_ok() {
            self.translated += 1;
        }
        let mut buf = [0u8; 64];
        let len = 1 + self.rng.below(64) as usize;
        let _ = self.iommu.dma_read(rid, tag, iova, &mut buf[..len]);
        self.counts[3] += 1;
    }

    fn iova(&mut self) -> u64 {
        match self.rng.below(4) {
            0 => self.rng.below(1 << 30),
            1 => self.address(),
            _ => self.rng.next(),
        }
    }

    fn ats(&mut self) {
        let (rid, tag) = self.requester();
        let iova = self.iova();
        let _ = self.iommu.ats_translate(rid, tag, iova, AccessType::READ);
        self.counts[4] += 1;
    }

    fn page_request(&mut self) {
        let (rid, tag) = self.requester();
        let address = self.address();
        let _ = self.iommu.page_request(&PageRequest {
            requester_id: rid,
            pasid: tag,
            address,
            read: self.rng.chance(70),
            write: self.rng.chance(50),
            execute: self.rng.chance(10),
            last_in_group: self.rng.chance(50),
            prg_index: self.rng.below(512) as u16,
            private_data: self
                .rng
                .chance(20)
                .then(|| [self.rng.next(), self.rng.next()]),
        });
        self.counts[5] += 1;
    }

    fn check_canaries(&self, ops: u64) {
        for canary in &self.canaries {
            let mut now = vec![0u8; canary.expected().len()];
            self.mem
                .read_slice(&mut now, GuestAddress(canary.start()))
                .unwrap();
            canary.check(&now, ops);
        }
    }
}

#[test]
fn hostile_soak() {
    let SoakSettings { ops, seed } = SoakSettings::from_env(0x5eed_1044);
    let start = Instant::now();
    let mut soak = Soak::new(seed);
    let mut dirty = false;
    for op in 1..=ops {
        match soak.rng.below(100) {
            0..=29 => soak.poke(),
            30..=37 => {
                soak.register_write();
                dirty = true;
            }
            38..=57 => soak.invalidate(),
            58..=84 => soak.translate(),
            85..=94 => soak.ats(),
            _ => soak.page_request(),
        }
        if op % 512 == 0 && dirty {
            soak.init();
            dirty = false;
        }
        if op % CHECK_EVERY == 0 {
            soak.check_canaries(op);
        }
    }
    soak.check_canaries(ops);
    assert_eq!(soak.read64(CAP), CAP_VALUE);
    assert_eq!(soak.read64(ECAP), ECAP_VALUE);
    // After a fresh init the queue still runs: a wait writes its status.
    soak.init();
    let status = soak.status;
    soak.mem.write_obj(0u32, GuestAddress(status)).unwrap();
    soak.mem
        .write_obj(qi::wait(status, 2, false), GuestAddress(soak.queue))
        .unwrap();
    soak.write64(IQT, 1 << 5);
    assert_eq!(
        soak.mem.read_obj::<u32>(GuestAddress(status)).unwrap(),
        2,
        "the unit still runs its invalidation queue"
    );
    let [pokes, regs, queues, translations, ats, prs] = soak.counts;
    println!(
        "viommu soak: {ops} operations (seed {seed:#x}): {pokes} table pokes, {regs} register \
         writes, {queues} queue submissions, {translations} translations + DMA reads ({} translated), \
         {ats} ATS, {prs} page requests, in {:.1} s",
        soak.translated,
        start.elapsed().as_secs_f64()
    );
}
