//! A scriptable IOMMU over guest RAM, for tests of the device model.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{AddressSpace, DmaFault, DmaPort, FaultKind, PageRequest, Translation};

const PAGE: u64 = 4096;

/// How a page faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FaultRule {
    /// Not present: reads and writes fault.
    NotPresent,
    /// Read-only: writes fault.
    ReadOnly,
    /// The IOMMU refuses every access.
    Refused,
}

#[derive(Default)]
struct MockState {
    faults: HashMap<u64, FaultRule>,
    remap: HashMap<u64, u64>,
    refused: HashSet<u32>,
    translations: usize,
    requests: Vec<PageRequest>,
    spaces: Vec<AddressSpace>,
}

/// A test IOMMU: translates untranslated requests page by page (identity
/// unless a page was remapped), faults the pages a test chose, refuses
/// chosen PASIDs, optionally answers ATS translation requests, and records
/// page requests and the address spaces it saw.
pub struct MockIommu {
    mem: Arc<GuestMemoryMmap>,
    ats: bool,
    state: Mutex<MockState>,
    requests_cv: Condvar,
}

impl MockIommu {
    /// An IOMMU over `mem` without ATS.
    pub fn new(mem: Arc<GuestMemoryMmap>) -> Self {
        Self {
            mem,
            ats: false,
            state: Mutex::default(),
            requests_cv: Condvar::new(),
        }
    }

    /// An IOMMU that also answers ATS translation requests.
    pub fn with_ats(mem: Arc<GuestMemoryMmap>) -> Self {
        Self {
            ats: true,
            ..Self::new(mem)
        }
    }

    fn lock(&self) -> MutexGuard<'_, MockState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the page holding `addr` not present.
    pub fn fault_page(&self, addr: u64) {
        self.lock()
            .faults
            .insert(addr & !(PAGE - 1), FaultRule::NotPresent);
    }

    /// Makes the page holding `addr` read-only.
    pub fn fault_page_writes(&self, addr: u64) {
        self.lock()
            .faults
            .insert(addr & !(PAGE - 1), FaultRule::ReadOnly);
    }

    /// Makes the IOMMU refuse accesses to the page holding `addr` (a
    /// translation error no page request can fix).
    pub fn refuse_page(&self, addr: u64) {
        self.lock()
            .faults
            .insert(addr & !(PAGE - 1), FaultRule::Refused);
    }

    /// Makes the page holding `addr` present and writable again.
    pub fn resolve_page(&self, addr: u64) {
        self.lock().faults.remove(&(addr & !(PAGE - 1)));
    }

    /// Maps the page holding `iova` to the page holding `target`.
    pub fn remap_page(&self, iova: u64, target: u64) {
        self.lock()
            .remap
            .insert(iova & !(PAGE - 1), target & !(PAGE - 1));
    }

    /// Refuses every request tagged with `pasid`.
    pub fn refuse_pasid(&self, pasid: u32) {
        self.lock().refused.insert(pasid);
    }

    /// The number of ATS translation requests answered so far.
    pub fn translations(&self) -> usize {
        self.lock().translations
    }

    /// The distinct address spaces requests used so far.
    pub fn spaces(&self) -> Vec<AddressSpace> {
        self.lock().spaces.clone()
    }

    /// Returns and forgets the page requests received so far.
    pub fn take_page_requests(&self) -> Vec<PageRequest> {
        std::mem::take(&mut self.lock().requests)
    }

    /// Waits up to `timeout` for a page request and returns the oldest one.
    pub fn wait_page_request(&self, timeout: Duration) -> Option<PageRequest> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if !state.requests.is_empty() {
                return Some(state.requests.remove(0));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            state = self
                .requests_cv
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn note_space(&self, space: AddressSpace) {
        let mut state = self.lock();
        if !state.spaces.contains(&space) {
            state.spaces.push(space);
        }
    }

    /// Runs `access(gpa, offset, len)` over the pages of an untranslated
    /// request, stopping at the first fault.
    fn walk(
        &self,
        space: AddressSpace,
        addr: u64,
        len: usize,
        write: bool,
        mut access: impl FnMut(u64, usize, usize) -> bool,
    ) -> Result<(), DmaFault> {
        self.note_space(space);
        let fault = |done: usize, kind| DmaFault {
            done,
            addr: addr.wrapping_add(done as u64),
            write,
            kind,
        };
        if let AddressSpace::Untranslated(Some(tag)) = space {
            if self.lock().refused.contains(&tag.pasid) {
                return Err(fault(0, FaultKind::TranslationError));
            }
        }
        let mut done = 0usize;
        while done < len {
            let at = addr.wrapping_add(done as u64);
            let in_page = (PAGE - (at & (PAGE - 1))) as usize;
            let n = in_page.min(len - done);
            let target = match space {
                AddressSpace::Translated => at,
                AddressSpace::Untranslated(_) => {
                    let state = self.lock();
                    let page = at & !(PAGE - 1);
                    match state.faults.get(&page) {
                        Some(FaultRule::NotPresent) => {
                            return Err(fault(done, FaultKind::PageFault))
                        }
                        Some(FaultRule::ReadOnly) if write => {
                            return Err(fault(done, FaultKind::PageFault))
                        }
                        Some(FaultRule::Refused) => {
                            return Err(fault(done, FaultKind::TranslationError))
                        }
                        _ => {}
                    }
                    state.remap.get(&page).copied().unwrap_or(page) | (at & (PAGE - 1))
                }
            };
            if !access(target, done, n) {
                return Err(fault(done, FaultKind::Unmapped));
            }
            done += n;
        }
        Ok(())
    }
}

impl DmaPort for MockIommu {
    fn read(&self, space: AddressSpace, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        self.walk(space, addr, buf.len(), false, |gpa, off, n| {
            self.mem
                .read_slice(&mut buf[off..off + n], GuestAddress(gpa))
                .is_ok()
        })
    }

    fn write(&self, space: AddressSpace, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        self.walk(space, addr, data.len(), true, |gpa, off, n| {
            self.mem
                .write_slice(&data[off..off + n], GuestAddress(gpa))
                .is_ok()
        })
    }

    fn translate(
        &self,
        pasid: Option<super::PasidTag>,
        addr: u64,
    ) -> Option<Result<Translation, DmaFault>> {
        if !self.ats {
            return None;
        }
        let mut state = self.lock();
        state.translations += 1;
        let page = addr & !(PAGE - 1);
        let fault = |kind| DmaFault {
            done: 0,
            addr,
            write: false,
            kind,
        };
        if pasid.is_some_and(|tag| state.refused.contains(&tag.pasid)) {
            return Some(Err(fault(FaultKind::TranslationError)));
        }
        let rule = state.faults.get(&page).copied();
        match rule {
            Some(FaultRule::NotPresent) => return Some(Err(fault(FaultKind::PageFault))),
            Some(FaultRule::Refused) => return Some(Err(fault(FaultKind::TranslationError))),
            _ => {}
        }
        Some(Ok(Translation {
            addr: state.remap.get(&page).copied().unwrap_or(page),
            size: PAGE,
            read: true,
            write: rule.is_none(),
        }))
    }

    fn page_request(&self, request: PageRequest) {
        self.lock().requests.push(request);
        self.requests_cv.notify_all();
    }
}
