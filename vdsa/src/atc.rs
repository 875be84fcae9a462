//! The Address Translation Cache (device TLB): ATS translations the device
//! keeps until the IOMMU invalidates them.
//!
//! Translations are kept as runs: pages of one size whose untranslated and
//! translated addresses both follow on, with the same permissions, are one
//! entry. A copy then finds everything it may move in one step with one
//! lookup per side, instead of a lookup per page (with 4 KiB pages those
//! lookups were a fifth of the time of a 1 MiB copy). Invalidation still
//! works page by page: it cuts the pages it names out of a run and keeps
//! the rest.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use crate::dma::{PasidTag, Translation};

/// The smallest translation (a 4 KiB page).
const MIN_PAGE: u64 = 1 << 12;

/// A run of cached translations of one page size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Run {
    /// Bytes covered (a multiple of `page`).
    len: u64,
    /// The translated address of the run's start.
    target: u64,
    /// The page size of every translation in the run.
    page: u64,
    read: bool,
    write: bool,
}

impl Run {
    /// Whether `next`, starting where this run ends, continues it.
    fn continued_by(&self, next: &Run) -> bool {
        self.page == next.page
            && self.read == next.read
            && self.write == next.write
            && self.target.wrapping_add(self.len) == next.target
    }
}

/// Runs keyed by PASID tag and untranslated start.
type Runs = BTreeMap<(Option<PasidTag>, u64), Run>;

/// What the ATC holds for an address: the run of translations around it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    /// The untranslated start of the run.
    pub base: u64,
    /// Bytes the run covers from `base`.
    pub len: u64,
    /// The translated address of `base`.
    pub target: u64,
    /// Reads are allowed.
    pub read: bool,
    /// Writes are allowed.
    pub write: bool,
}

/// Cached translations.
#[derive(Default)]
pub struct Atc {
    runs: Mutex<Runs>,
    /// Held for reading while a cached translation is in use, for writing
    /// by invalidations: an invalidation completes only after every access
    /// that used an old translation has.
    in_use: RwLock<()>,
}

fn end(base: u64, len: u64) -> u128 {
    u128::from(base) + u128::from(len)
}

impl Atc {
    fn lock(&self) -> MutexGuard<'_, Runs> {
        self.runs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the start of a translated access.
    pub fn use_guard(&self) -> RwLockReadGuard<'_, ()> {
        self.in_use.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The cached run of translations covering `addr`.
    pub fn lookup(&self, tag: Option<PasidTag>, addr: u64) -> Option<Hit> {
        let runs = self.lock();
        let (&(t, base), run) = runs.range(..=(tag, addr)).next_back()?;
        (t == tag && u128::from(addr) < end(base, run.len)).then_some(Hit {
            base,
            len: run.len,
            target: run.target,
            read: run.read,
            write: run.write,
        })
    }

    /// Caches `translation` for the page holding `addr`, in place of
    /// whatever was cached for that page.
    pub fn insert(&self, tag: Option<PasidTag>, addr: u64, translation: Translation) {
        let page = translation.size.max(MIN_PAGE).next_power_of_two();
        let mut base = addr & !(page - 1);
        let mut run = Run {
            len: page,
            target: translation.addr,
            page,
            read: translation.read,
            write: translation.write,
        };
        let mut runs = self.lock();
        Self::cut(&mut runs, |t| t == tag, base, page);
        // Join the run that ends here and the one that starts after.
        if let Some((&(t, before), prev)) = runs.range(..(tag, base)).next_back() {
            if t == tag && end(before, prev.len) == u128::from(base) && prev.continued_by(&run) {
                run = Run {
                    len: prev.len + run.len,
                    target: prev.target,
                    ..run
                };
                runs.remove(&(tag, before));
                base = before;
            }
        }
        if let Ok(after) = u64::try_from(end(base, run.len)) {
            if let Some(next) = runs.get(&(tag, after)).copied() {
                if run.continued_by(&next) {
                    run.len += next.len;
                    runs.remove(&(tag, after));
                }
            }
        }
        runs.insert((tag, base), run);
    }

    /// Drops the cached translation of the page holding `addr`.
    pub fn remove(&self, tag: Option<PasidTag>, addr: u64) {
        Self::cut(&mut self.lock(), |t| t == tag, addr, 1);
    }

    /// Cuts the pages overlapping `[addr, addr + len)` out of the runs
    /// whose tag matches; the rest of each run stays cached.
    fn cut(runs: &mut Runs, matches: impl Fn(Option<PasidTag>) -> bool, addr: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (from, to) = (u128::from(addr), end(addr, len));
        let hit: Vec<_> = runs
            .iter()
            .filter(|(&(tag, base), run)| {
                matches(tag) && u128::from(base) < to && from < end(base, run.len)
            })
            .map(|(&key, &run)| (key, run))
            .collect();
        for ((tag, base), run) in hit {
            runs.remove(&(tag, base));
            let page = u128::from(run.page);
            let (start, stop) = (u128::from(base), end(base, run.len));
            let cut_from = (from / page * page).max(start);
            let cut_to = to.div_ceil(page).saturating_mul(page).min(stop);
            if cut_from > start {
                let len = (cut_from - start) as u64;
                runs.insert((tag, base), Run { len, ..run });
            }
            if cut_to < stop {
                let skip = (cut_to - start) as u64;
                runs.insert(
                    (tag, base + skip),
                    Run {
                        len: (stop - cut_to) as u64,
                        target: run.target.wrapping_add(skip),
                        ..run
                    },
                );
            }
        }
    }

    /// Waits for accesses still using translations of `pasid` (every PASID
    /// and untagged ones when `None`) that overlap `[addr, addr + len)`,
    /// then drops those translations. Cutting only once no access is under
    /// way also drops what a translation request answered before the
    /// IOMMU's invalidation put in the cache after this one began.
    pub fn invalidate(&self, pasid: Option<u32>, addr: u64, len: u64) {
        let _no_access = self.in_use.write().unwrap_or_else(|e| e.into_inner());
        Self::cut(
            &mut self.lock(),
            |tag| pasid.is_none() || tag.map(|t| t.pasid) == pasid,
            addr,
            len,
        );
    }

    /// Drops every translation.
    pub fn clear(&self) {
        self.invalidate(None, 0, u64::MAX);
    }

    /// The number of cached translations (pages).
    pub fn len(&self) -> usize {
        self.lock()
            .values()
            .map(|run| usize::try_from(run.len / run.page).unwrap_or(usize::MAX))
            .sum()
    }

    /// The number of runs the translations form.
    pub fn runs(&self) -> usize {
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

    const TAG: Option<PasidTag> = Some(PasidTag {
        pasid: 7,
        privileged: false,
    });

    #[test]
    fn lookup_and_invalidate() {
        let atc = Atc::default();
        atc.insert(TAG, 0x20_1234, page(0x9000, 0x1000));
        atc.insert(TAG, 0x40_0000, page(0x80_0000, 1 << 21));
        let hit = atc.lookup(TAG, 0x20_1fff).unwrap();
        assert_eq!((hit.base, hit.len, hit.target), (0x20_1000, 0x1000, 0x9000));
        assert_eq!(atc.lookup(TAG, 0x5f_0000).map(|h| h.base), Some(0x40_0000));
        assert_eq!(atc.lookup(TAG, 0x20_2000), None);
        assert_eq!(atc.lookup(None, 0x20_1000), None, "other tag misses");
        atc.invalidate(Some(8), 0, u64::MAX);
        assert_eq!(atc.len(), 2, "other PASID untouched");
        atc.invalidate(Some(7), 0x20_1800, 1);
        assert_eq!(atc.lookup(TAG, 0x20_1000), None);
        assert_eq!(atc.len(), 1);
        atc.clear();
        assert_eq!(atc.len(), 0);
    }

    #[test]
    fn contiguous_pages_form_one_run_that_invalidation_cuts() {
        let atc = Atc::default();
        // Filled out of order: pages 1, 0, 3, then 2 closes the gap.
        for p in [1u64, 0, 3, 2] {
            atc.insert(
                TAG,
                0x10_0000 + p * 0x1000,
                page(0x70_0000 + p * 0x1000, 0x1000),
            );
        }
        assert_eq!((atc.len(), atc.runs()), (4, 1));
        let hit = atc.lookup(TAG, 0x10_2abc).unwrap();
        assert_eq!(
            (hit.base, hit.len, hit.target),
            (0x10_0000, 0x4000, 0x70_0000)
        );
        // A page that maps elsewhere, or with other rights, starts a run.
        atc.insert(TAG, 0x10_4000, page(0x90_0000, 0x1000));
        let ro = Translation {
            write: false,
            ..page(0x90_1000, 0x1000)
        };
        atc.insert(TAG, 0x10_5000, ro);
        assert_eq!((atc.len(), atc.runs()), (6, 3));
        // Invalidating page 1 keeps pages 0, 2 and 3 with their targets.
        atc.invalidate(Some(7), 0x10_1000, 0x1000);
        assert_eq!(atc.lookup(TAG, 0x10_1000), None);
        let hit = atc.lookup(TAG, 0x10_3000).unwrap();
        assert_eq!(
            (hit.base, hit.len, hit.target),
            (0x10_2000, 0x2000, 0x70_2000)
        );
        assert_eq!(atc.lookup(TAG, 0x10_0000).unwrap().len, 0x1000);
        // A new answer for a cached page replaces it.
        atc.insert(TAG, 0x10_2000, page(0xa0_0000, 0x1000));
        assert_eq!(atc.lookup(TAG, 0x10_2000).unwrap().target, 0xa0_0000);
        assert_eq!(atc.lookup(TAG, 0x10_3000).unwrap().target, 0x70_3000);
        atc.remove(TAG, 0x10_3fff);
        assert_eq!(atc.lookup(TAG, 0x10_3000), None);
        assert_eq!(atc.len(), 4);
    }

    #[test]
    fn a_large_page_is_dropped_whole() {
        let atc = Atc::default();
        atc.insert(TAG, 0x40_0000, page(0x80_0000, 1 << 21));
        atc.insert(TAG, 0x60_0000, page(0xa0_0000, 1 << 21));
        assert_eq!(atc.runs(), 1);
        atc.invalidate(None, 0x41_0000, 0x1000);
        assert_eq!(atc.lookup(TAG, 0x40_0000), None);
        let hit = atc.lookup(TAG, 0x60_0000).unwrap();
        assert_eq!((hit.len, hit.target), (1 << 21, 0xa0_0000));
        // The top page of the address space.
        atc.insert(TAG, u64::MAX, page(0x1000, 0x1000));
        assert_eq!(
            atc.lookup(TAG, u64::MAX - 5).unwrap().base,
            u64::MAX - 0xfff
        );
        atc.clear();
        assert_eq!(atc.len(), 0);
    }
}
