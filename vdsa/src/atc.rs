//! The Address Translation Cache (device TLB): ATS translations the device
//! keeps until the IOMMU invalidates them.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::bits::overlaps;
use crate::dma::{PasidTag, Translation};

/// Page sizes a translation can cover, smallest first.
const PAGE_SIZES: [u64; 3] = [1 << 12, 1 << 21, 1 << 30];

/// A multiply-rotate hash for the ATC's small integer keys: a copy looks a
/// page up on each side for every page it moves, and SipHash was a third
/// of the time of a 1 MiB copy.
#[derive(Default)]
struct PageHasher(u64);

impl Hasher for PageHasher {
    fn finish(&self) -> u64 {
        // Page addresses have their low bits clear: mix the high bits down
        // (the table indexes with the low bits).
        let z = (self.0 ^ (self.0 >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_u64(&mut self, v: u64) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(K);
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }

    fn write_isize(&mut self, v: isize) {
        self.write_u64(v as u64);
    }
}

type Entries = HashMap<(Option<PasidTag>, u64), Translation, BuildHasherDefault<PageHasher>>;

/// Cached translations, keyed by PASID tag and untranslated page base.
#[derive(Default)]
pub struct Atc {
    entries: Mutex<Entries>,
    /// Held for reading while a cached translation is in use, for writing
    /// by invalidations: an invalidation completes only after every access
    /// that used an old translation has.
    in_use: RwLock<()>,
}

impl Atc {
    fn lock(&self) -> MutexGuard<'_, Entries> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the start of a translated access.
    pub fn use_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.in_use.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached translation covering `addr`, with its untranslated base.
    pub fn lookup(&self, tag: Option<PasidTag>, addr: u64) -> Option<(u64, Translation)> {
        Self::find(&self.lock(), tag, addr)
    }

    fn find(entries: &Entries, tag: Option<PasidTag>, addr: u64) -> Option<(u64, Translation)> {
        PAGE_SIZES.iter().find_map(|&size| {
            let base = addr & !(size - 1);
            entries
                .get(&(tag, base))
                .filter(|t| t.size == size)
                .map(|t| (base, *t))
        })
    }

    /// How many bytes from `addr`, up to `len`, the cached translations map
    /// contiguously to `target` onwards with the permission asked (`write`,
    /// or read): the run one copy may move. Looked up under one lock.
    pub fn contiguous(
        &self,
        tag: Option<PasidTag>,
        addr: u64,
        target: u64,
        len: u64,
        write: bool,
    ) -> u64 {
        let entries = self.lock();
        let mut covered = 0u64;
        while covered < len {
            let at = addr.wrapping_add(covered);
            let Some((base, t)) = Self::find(&entries, tag, at) else {
                break;
            };
            let offset = at - base;
            if !(if write { t.write } else { t.read })
                || t.addr.wrapping_add(offset) != target.wrapping_add(covered)
            {
                break;
            }
            covered += t.size - offset;
        }
        covered.min(len)
    }

    /// Caches `translation` for the page holding `addr`; returns the page's
    /// untranslated base.
    pub fn insert(&self, tag: Option<PasidTag>, addr: u64, translation: Translation) -> u64 {
        let size = translation.size.max(PAGE_SIZES[0]).next_power_of_two();
        let base = addr & !(size - 1);
        self.lock().insert(
            (tag, base),
            Translation {
                size,
                ..translation
            },
        );
        base
    }

    /// Drops the entry for the page at `base`.
    pub fn remove(&self, tag: Option<PasidTag>, base: u64) {
        self.lock().remove(&(tag, base));
    }

    /// Drops translations of `pasid` (every PASID and untagged ones when
    /// `None`) that overlap `[addr, addr + len)`, then waits for accesses
    /// still using them.
    pub fn invalidate(&self, pasid: Option<u32>, addr: u64, len: u64) {
        self.lock().retain(|(tag, base), t| {
            let tag_matches = pasid.is_none() || tag.map(|t| t.pasid) == pasid;
            !(tag_matches && overlaps(*base, t.size, addr, len))
        });
        drop(self.in_use.write().unwrap_or_else(|e| e.into_inner()));
    }

    /// Drops every translation.
    pub fn clear(&self) {
        self.invalidate(None, 0, u64::MAX);
    }

    /// The number of cached translations.
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(addr: u64, size: u64) -> Translation {
        Translation {
            addr,
            size,
            read: true,
            write: true,
        }
    }

    #[test]
    fn lookup_and_invalidate() {
        let atc = Atc::default();
        let tag = Some(PasidTag {
            pasid: 7,
            privileged: false,
        });
        assert_eq!(atc.insert(tag, 0x20_1234, page(0x9000, 0x1000)), 0x20_1000);
        atc.insert(tag, 0x40_0000, page(0x80_0000, 1 << 21));
        assert_eq!(
            atc.lookup(tag, 0x20_1fff),
            Some((0x20_1000, page(0x9000, 0x1000)))
        );
        assert_eq!(atc.lookup(tag, 0x5f_0000).map(|h| h.0), Some(0x40_0000));
        assert_eq!(atc.lookup(None, 0x20_1000), None, "other tag misses");
        atc.invalidate(Some(8), 0, u64::MAX);
        assert_eq!(atc.len(), 2, "other PASID untouched");
        atc.invalidate(Some(7), 0x20_1800, 1);
        assert_eq!(atc.lookup(tag, 0x20_1000), None);
        assert_eq!(atc.len(), 1);
        atc.clear();
        assert_eq!(atc.len(), 0);
    }
}
