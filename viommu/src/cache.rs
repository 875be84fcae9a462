// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Translation caches, kept the way hardware keeps them (VT-d 6.2): a context cache, a PASID
//! cache and an IOTLB tagged by domain, PASID, address and page size. Only present entries and
//! successful translations are cached (CAP.CM=0). Nothing here watches guest memory: a guest
//! that changes a table and forgets the invalidation keeps getting the stale entry, as on
//! silicon. Paging-structure caches are not modelled (a miss walks from the root).

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::paging::{AccessType, Translation, PAGE_SIZE_4K};
use crate::tables::{ContextEntry, PasidEntry};

/// A small multiplicative hasher for the fixed-size integer keys of the caches (the default
/// SipHash costs more than the rest of an IOTLB hit).
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

type KeyMap<K, V> = HashMap<K, V, BuildHasherDefault<KeyHasher>>;

/// Source-ID match for device-selective invalidations: FM (function mask) ignores the low 0-3
/// bits of the function number.
pub fn sid_matches(sid: u16, target: u16, function_mask: u8) -> bool {
    let mask: u16 = match function_mask & 3 {
        0 => 0xffff,
        1 => 0xfffb,
        2 => 0xfff9,
        _ => 0xfff8,
    };
    sid & mask == target & mask
}

/// Context cache: decoded context entries by requester ID, indexed by bus then devfn (no
/// hashing on the request path).
#[derive(Debug, Default)]
pub struct ContextCache {
    buses: KeyMap<u8, Box<[Option<ContextEntry>; 256]>>,
}

impl ContextCache {
    /// Cached entry for `rid`.
    pub fn get(&self, rid: u16) -> Option<ContextEntry> {
        self.buses.get(&((rid >> 8) as u8))?[usize::from(rid as u8)]
    }

    /// Cache a present entry.
    pub fn insert(&mut self, rid: u16, entry: ContextEntry) {
        self.buses
            .entry((rid >> 8) as u8)
            .or_insert_with(|| Box::new([None; 256]))[usize::from(rid as u8)] = Some(entry);
    }

    /// Global (and, in scalable mode where context entries carry no domain, domain-selective)
    /// invalidation.
    pub fn invalidate_all(&mut self) {
        self.buses.clear();
    }

    /// Device-selective invalidation.
    pub fn invalidate_device(&mut self, sid: u16, function_mask: u8) {
        if let Some(bus) = self.buses.get_mut(&((sid >> 8) as u8)) {
            for (devfn, slot) in bus.iter_mut().enumerate() {
                let rid = (sid & 0xff00) | devfn as u16;
                if sid_matches(rid, sid, function_mask) {
                    *slot = None;
                }
            }
        }
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.buses
            .values()
            .map(|b| b.iter().filter(|e| e.is_some()).count())
            .sum()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Upper bound of PASID-cache entries before it is flushed to make room.
const PASID_CACHE_CAPACITY: usize = 4096;

/// PASID cache: decoded PASID-table entries by (requester ID, PASID), tagged with the DID
/// the entry carries.
#[derive(Debug, Default)]
pub struct PasidCache {
    entries: KeyMap<(u16, u32), PasidEntry>,
}

/// Granularity of a PASID-cache invalidation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasidCacheScope {
    /// All entries.
    Global,
    /// All entries of a domain.
    Domain {
        /// Domain ID.
        did: u16,
    },
    /// The entries of one PASID within a domain.
    Pasid {
        /// Domain ID.
        did: u16,
        /// PASID.
        pasid: u32,
    },
}

impl PasidCache {
    /// Cached entry for (`rid`, `pasid`).
    pub fn get(&self, rid: u16, pasid: u32) -> Option<PasidEntry> {
        self.entries.get(&(rid, pasid)).copied()
    }

    /// Cache a present entry.
    pub fn insert(&mut self, rid: u16, pasid: u32, entry: PasidEntry) {
        if self.entries.len() >= PASID_CACHE_CAPACITY {
            self.entries.clear();
        }
        self.entries.insert((rid, pasid), entry);
    }

    /// Invalidate the entries in `scope`.
    pub fn invalidate(&mut self, scope: PasidCacheScope) {
        match scope {
            PasidCacheScope::Global => self.entries.clear(),
            PasidCacheScope::Domain { did } => self.entries.retain(|_, e| e.did != did),
            PasidCacheScope::Pasid { did, pasid } => {
                self.entries.retain(|&(_, p), e| e.did != did || p != pasid)
            }
        }
    }

    /// Number of cached entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Which translation produced an IOTLB entry; the two IOTLB invalidation descriptor families
/// reach different kinds (VT-d 6.5.2.4 and 6.5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CachedStage {
    /// First-stage only (PGTT=1): invalidated by PASID-based IOTLB invalidation.
    FirstStage,
    /// Second-stage only (PGTT=2): invalidated by IOTLB invalidation.
    SecondStage,
    /// Nested (PGTT=3): depends on both stages, so both families invalidate it.
    Nested,
}

/// An IOTLB entry: the translation of one page plus the rights needed to re-check accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IotlbEntry {
    /// The translation (phys_addr is the page base).
    pub translation: Translation,
    /// Which stage(s) produced it.
    pub stage: CachedStage,
    /// Reads allowed (always for first stage).
    pub readable: bool,
    /// Supervisor writes honour R/W (first-stage WPE; always for second stage).
    pub write_protect: bool,
}

impl IotlbEntry {
    /// Whether this cached translation allows `access` without another walk. A write through
    /// a translation whose dirty flag is not yet set needs a walk to set it.
    pub fn permits(&self, access: AccessType) -> bool {
        let t = &self.translation;
        if !access.write && !self.readable {
            return false;
        }
        if access.user && !t.user {
            return false;
        }
        if access.execute && (!t.executable || (!access.user && t.user)) {
            return false;
        }
        if access.write && ((!t.writable && (access.user || self.write_protect)) || !t.dirty) {
            return false;
        }
        true
    }
}

/// An IOTLB slot: the tag (domain, PASID, input page number) and the cached entry.
#[derive(Clone, Copy, Debug)]
struct Slot {
    did: u16,
    pasid: u32,
    /// Input address >> page shift.
    page: u64,
    entry: IotlbEntry,
}

/// One direct-mapped array of the IOTLB, for one page size.
#[derive(Debug)]
struct Way {
    shift: u32,
    slots: Box<[Option<Slot>]>,
    used: usize,
}

impl Way {
    fn new(shift: u32, entries: usize) -> Self {
        Way {
            shift,
            slots: vec![None; entries].into_boxed_slice(),
            used: 0,
        }
    }

    fn size(&self) -> u64 {
        1 << self.shift
    }

    /// Consecutive pages of one address space fall in consecutive slots.
    fn index(&self, did: u16, pasid: u32, page: u64) -> usize {
        let tag = page ^ (u64::from(pasid) << 7) ^ (u64::from(did) << 13);
        (tag as usize) & (self.slots.len() - 1)
    }

    fn lookup(&self, did: u16, pasid: u32, iova: u64) -> Option<&IotlbEntry> {
        let page = iova >> self.shift;
        match &self.slots[self.index(did, pasid, page)] {
            Some(s) if s.page == page && s.pasid == pasid && s.did == did => Some(&s.entry),
            _ => None,
        }
    }

    fn insert(&mut self, did: u16, pasid: u32, iova: u64, entry: IotlbEntry) {
        let page = iova >> self.shift;
        let index = self.index(did, pasid, page);
        let slot = &mut self.slots[index];
        if slot.is_none() {
            self.used += 1;
        }
        *slot = Some(Slot {
            did,
            pasid,
            page,
            entry,
        });
    }

    fn retain(&mut self, mut keep: impl FnMut(&Slot, u64) -> bool) {
        if self.used == 0 {
            return;
        }
        let size = self.size();
        for slot in self.slots.iter_mut() {
            if let Some(s) = slot {
                if !keep(s, size) {
                    *slot = None;
                    self.used -= 1;
                }
            }
        }
    }
}

/// Entries of the 4 KiB, 2 MiB and 1 GiB arrays.
const WAY_ENTRIES: [usize; 3] = [4096, 512, 64];
/// Page shifts of the arrays.
const WAY_SHIFTS: [u32; 3] = [12, 21, 30];

/// Which IOTLB entries an invalidation reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbFamily {
    /// IOTLB invalidate descriptor / register: second-stage-only and nested entries.
    SecondStage,
    /// PASID-based IOTLB invalidate: first-stage-only and nested entries.
    FirstStage,
}

impl IotlbFamily {
    fn reaches(self, stage: CachedStage) -> bool {
        match self {
            IotlbFamily::SecondStage => stage != CachedStage::FirstStage,
            IotlbFamily::FirstStage => stage != CachedStage::SecondStage,
        }
    }
}

/// The IOTLB: one direct-mapped array per page size, like a hardware TLB. A new entry
/// replaces whatever shared its slot (hardware may drop entries at any time).
#[derive(Debug)]
pub struct Iotlb {
    ways: [Way; 3],
}

impl Default for Iotlb {
    fn default() -> Self {
        Iotlb {
            ways: [0, 1, 2].map(|i| Way::new(WAY_SHIFTS[i], WAY_ENTRIES[i])),
        }
    }
}

impl Iotlb {
    /// Look up the translation of `iova` for (`did`, `pasid`).
    pub fn lookup(&self, did: u16, pasid: u32, iova: u64) -> Option<&IotlbEntry> {
        self.ways
            .iter()
            .filter(|w| w.used != 0)
            .find_map(|w| w.lookup(did, pasid, iova))
    }

    /// Cache the translation of the page containing `iova`.
    pub fn insert(&mut self, did: u16, pasid: u32, iova: u64, entry: IotlbEntry) {
        let Some(way) = self
            .ways
            .iter_mut()
            .find(|w| w.size() == entry.translation.page_size)
        else {
            return;
        };
        let mut entry = entry;
        entry.translation.phys_addr = entry.translation.page_base();
        way.insert(did, pasid, iova, entry);
    }

    /// Drop everything (global invalidation).
    pub fn clear(&mut self) {
        for way in &mut self.ways {
            way.retain(|_, _| false);
        }
    }

    /// Domain-selective invalidation (optionally restricted to one PASID).
    pub fn invalidate_domain(&mut self, family: IotlbFamily, did: u16, pasid: Option<u32>) {
        for way in &mut self.ways {
            way.retain(|s, _| {
                !(s.did == did
                    && pasid.is_none_or(|p| p == s.pasid)
                    && family.reaches(s.entry.stage))
            });
        }
    }

    /// Page-selective invalidation of `[addr, addr + 4 KiB << am)` (addr aligned down to
    /// that size), optionally restricted to one PASID.
    pub fn invalidate_range(
        &mut self,
        family: IotlbFamily,
        did: u16,
        pasid: Option<u32>,
        addr: u64,
        am: u8,
    ) {
        // AM beyond the address width covers everything.
        let (start, end) = if am >= 52 {
            (0, u64::MAX)
        } else {
            let len = PAGE_SIZE_4K << am;
            let start = addr & !(len - 1);
            (start, start.saturating_add(len))
        };
        for way in &mut self.ways {
            way.retain(|s, size| {
                let base = s.page.wrapping_mul(size);
                let overlaps = base < end && start < base.saturating_add(size);
                !(overlaps
                    && s.did == did
                    && pasid.is_none_or(|p| p == s.pasid)
                    && family.reaches(s.entry.stage))
            });
        }
    }

    /// Number of cached translations.
    pub fn len(&self) -> usize {
        self.ways.iter().map(|w| w.used).sum()
    }

    /// Whether the IOTLB is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The three caches of a remapping unit.
#[derive(Debug, Default)]
pub struct Caches {
    /// Context cache.
    pub context: ContextCache,
    /// PASID cache.
    pub pasid: PasidCache,
    /// IOTLB.
    pub iotlb: Iotlb,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::{PAGE_SIZE_1G, PAGE_SIZE_2M};

    fn entry(phys: u64, size: u64, stage: CachedStage) -> IotlbEntry {
        IotlbEntry {
            translation: Translation {
                phys_addr: phys,
                page_size: size,
                writable: true,
                user: true,
                executable: true,
                dirty: true,
            },
            stage,
            readable: true,
            write_protect: true,
        }
    }

    #[test]
    fn lookup_finds_every_page_size() {
        let mut tlb = Iotlb::default();
        tlb.insert(
            1,
            5,
            0x1234,
            entry(0x9000, PAGE_SIZE_4K, CachedStage::FirstStage),
        );
        tlb.insert(
            1,
            5,
            0x40_0000,
            entry(0x80_0000, PAGE_SIZE_2M, CachedStage::FirstStage),
        );
        tlb.insert(
            1,
            5,
            0x8000_0000,
            entry(0x4000_0000, PAGE_SIZE_1G, CachedStage::FirstStage),
        );
        assert_eq!(
            tlb.lookup(1, 5, 0x1fff).unwrap().translation.phys_addr,
            0x9000
        );
        assert_eq!(
            tlb.lookup(1, 5, 0x5f_ffff).unwrap().translation.page_size,
            PAGE_SIZE_2M
        );
        assert_eq!(
            tlb.lookup(1, 5, 0xbfff_ffff).unwrap().translation.phys_addr,
            0x4000_0000
        );
        assert!(tlb.lookup(1, 6, 0x1fff).is_none());
        assert!(tlb.lookup(2, 5, 0x1fff).is_none());
        assert!(tlb.lookup(1, 5, 0x2000).is_none());
    }

    #[test]
    fn conflicting_pages_replace_each_other() {
        let mut tlb = Iotlb::default();
        tlb.insert(
            1,
            0,
            0x1000,
            entry(0xa000, PAGE_SIZE_4K, CachedStage::FirstStage),
        );
        // Same slot: 4096 pages further on.
        tlb.insert(
            1,
            0,
            0x1000 + (4096 << 12),
            entry(0xb000, PAGE_SIZE_4K, CachedStage::FirstStage),
        );
        assert!(tlb.lookup(1, 0, 0x1000).is_none());
        assert_eq!(
            tlb.lookup(1, 0, 0x1000 + (4096 << 12))
                .unwrap()
                .translation
                .phys_addr,
            0xb000
        );
        assert_eq!(tlb.len(), 1);
    }

    #[test]
    fn invalidation_families_reach_their_stages() {
        let mut tlb = Iotlb::default();
        tlb.insert(
            1,
            0,
            0x1000,
            entry(0, PAGE_SIZE_4K, CachedStage::FirstStage),
        );
        tlb.insert(
            1,
            0,
            0x2000,
            entry(0, PAGE_SIZE_4K, CachedStage::SecondStage),
        );
        tlb.insert(1, 0, 0x3000, entry(0, PAGE_SIZE_4K, CachedStage::Nested));
        tlb.invalidate_domain(IotlbFamily::SecondStage, 1, None);
        assert!(tlb.lookup(1, 0, 0x1000).is_some());
        assert!(tlb.lookup(1, 0, 0x2000).is_none());
        assert!(tlb.lookup(1, 0, 0x3000).is_none());
        tlb.insert(1, 0, 0x3000, entry(0, PAGE_SIZE_4K, CachedStage::Nested));
        tlb.invalidate_domain(IotlbFamily::FirstStage, 1, Some(0));
        assert!(tlb.is_empty());
    }

    #[test]
    fn range_invalidation_covers_overlapping_large_pages() {
        let mut tlb = Iotlb::default();
        tlb.insert(
            1,
            2,
            0x20_0000,
            entry(0, PAGE_SIZE_2M, CachedStage::FirstStage),
        );
        tlb.insert(
            1,
            2,
            0x40_0000,
            entry(0, PAGE_SIZE_4K, CachedStage::FirstStage),
        );
        tlb.insert(
            1,
            2,
            0x40_1000,
            entry(0, PAGE_SIZE_4K, CachedStage::FirstStage),
        );
        // One 4 KiB page inside the 2 MiB page drops the whole 2 MiB entry only.
        tlb.invalidate_range(IotlbFamily::FirstStage, 1, Some(2), 0x20_5000, 0);
        assert!(tlb.lookup(1, 2, 0x20_0000).is_none());
        assert_eq!(tlb.len(), 2);
        // AM=1 covers 8 KiB aligned down: both 4 KiB pages.
        tlb.invalidate_range(IotlbFamily::FirstStage, 1, Some(2), 0x40_1000, 1);
        assert!(tlb.is_empty());
        assert!(tlb.ways.iter().all(|w| w.used == 0));
    }

    #[test]
    fn cached_rights_are_rechecked() {
        let mut e = entry(0, PAGE_SIZE_4K, CachedStage::FirstStage);
        e.translation.writable = false;
        assert!(e.permits(AccessType::READ.as_user()));
        assert!(!e.permits(AccessType::WRITE.as_user()));
        assert!(!e.permits(AccessType::WRITE));
        e.write_protect = false;
        assert!(e.permits(AccessType::WRITE));
        e.translation.dirty = false;
        assert!(!e.permits(AccessType::WRITE), "needs a walk to set D");
        e.translation.user = false;
        assert!(!e.permits(AccessType::READ.as_user()));
    }

    #[test]
    fn context_cache_device_selective() {
        let e = ContextEntry {
            fpd: false,
            dte: false,
            paside: true,
            pre: false,
            pdts: 0,
            pasid_dir: 0,
            rid_pasid: 0,
        };
        let mut c = ContextCache::default();
        for rid in [0x0810, 0x0811, 0x0817, 0x0818, 0x0910] {
            c.insert(rid, e);
        }
        c.invalidate_device(0x0810, 3);
        assert_eq!(c.len(), 2);
        assert!(c.get(0x0818).is_some() && c.get(0x0910).is_some());
        c.invalidate_all();
        assert!(c.is_empty());
    }

    #[test]
    fn function_mask() {
        assert!(sid_matches(0x0813, 0x0810, 3));
        assert!(!sid_matches(0x0813, 0x0810, 2));
        assert!(sid_matches(0x0812, 0x0810, 2));
        assert!(!sid_matches(0x0811, 0x0810, 0));
    }
}
