//! How an engine touches memory for one descriptor: with the descriptor's
//! PASID, through the ATC when ATS is on, and with page requests when
//! block-on-fault applies.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::atc::Atc;
use crate::dma::{AddressSpace, DmaFault, DmaPort, FaultKind, PageResponseCode, PasidTag};
use crate::prs::{PageRequester, RequestOutcome};

/// Page requests for one address before the device gives up (status 0x04,
/// "excessive page request retries").
const MAX_PAGE_REQUESTS: u32 = 4;
/// The most a copy moves under one hold of the ATC (an invalidation waits
/// for it).
const MAX_RUN: usize = 1 << 20;

/// Why an engine access failed for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// A page fault the device did not (or could not) request.
    PageFault,
    /// A page request was answered Invalid Request, or retried too often.
    PageRequestInvalid,
    /// A page request was answered Response Failure.
    PageRequestFailure,
    /// The IOMMU refused the request.
    TranslationError,
    /// Nothing answers at the address.
    Unmapped,
    /// The descriptor was aborted while waiting for a page.
    Aborted,
}

/// A failed engine access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Bytes of the access completed before the fault.
    pub done: usize,
    /// The faulting (untranslated) address.
    pub addr: u64,
    /// Whether the faulting access was a write.
    pub write: bool,
    /// What went wrong.
    pub cause: Cause,
}

/// The pieces of the device an access needs.
pub struct Path<'a> {
    /// The IOMMU side.
    pub port: &'a dyn DmaPort,
    /// The device TLB.
    pub atc: &'a Atc,
    /// Page request state.
    pub prs: &'a PageRequester,
    /// PRI Outstanding Page Request Allocation.
    pub pri_allocation: u32,
}

/// Memory access with one PASID and fault policy.
pub struct Access<'a> {
    /// Device pieces.
    pub path: Path<'a>,
    /// The PASID prefix of every request.
    pub tag: Option<PasidTag>,
    /// Translate through ATS and the ATC.
    pub ats: bool,
    /// Resolve page faults with page requests.
    pub block_on_fault: bool,
    /// Set when the descriptor is aborted.
    pub cancel: &'a AtomicBool,
    /// Set (and the access fails as [`Cause::Aborted`]) instead of waiting
    /// for a page: a run that must not wait starts over where it may.
    pub defer: Option<&'a AtomicBool>,
}

#[derive(Default)]
struct Retries {
    page: Option<u64>,
    count: u32,
}

impl Access<'_> {
    /// A copy of this access with another block-on-fault policy.
    pub fn with_block_on_fault(&self, block_on_fault: bool) -> Access<'_> {
        Access {
            path: Path { ..self.path },
            tag: self.tag,
            ats: self.ats,
            block_on_fault,
            cancel: self.cancel,
            defer: self.defer,
        }
    }

    /// Whether the descriptor was aborted.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    fn resolve(&self, fault: &DmaFault, retries: &mut Retries) -> Result<(), Cause> {
        match fault.kind {
            FaultKind::PageFault if self.block_on_fault => {
                let page = fault.addr & !0xfff;
                if retries.page == Some(page) {
                    retries.count += 1;
                } else {
                    *retries = Retries {
                        page: Some(page),
                        count: 1,
                    };
                }
                if retries.count > MAX_PAGE_REQUESTS {
                    return Err(Cause::PageRequestInvalid);
                }
                if let Some(defer) = self.defer {
                    defer.store(true, Ordering::SeqCst);
                    return Err(Cause::Aborted);
                }
                let outcome = self.path.prs.request(
                    self.path.port,
                    self.tag,
                    fault.addr,
                    fault.write,
                    self.path.pri_allocation,
                    self.cancel,
                );
                match outcome {
                    RequestOutcome::Answered(PageResponseCode::Success) => Ok(()),
                    RequestOutcome::Answered(PageResponseCode::InvalidRequest) => {
                        Err(Cause::PageRequestInvalid)
                    }
                    RequestOutcome::Answered(PageResponseCode::ResponseFailure) => {
                        Err(Cause::PageRequestFailure)
                    }
                    RequestOutcome::Aborted => Err(Cause::Aborted),
                }
            }
            FaultKind::PageFault => Err(Cause::PageFault),
            FaultKind::TranslationError => Err(Cause::TranslationError),
            FaultKind::Unmapped => Err(Cause::Unmapped),
        }
    }

    /// Runs `step(done)` until it succeeds, resolving faults in between;
    /// `step` returns the raw fault of the remaining part.
    fn retrying(&self, mut step: impl FnMut(usize) -> Result<(), DmaFault>) -> Result<(), Fault> {
        let mut done = 0;
        let mut retries = Retries::default();
        loop {
            match step(done) {
                Ok(()) => return Ok(()),
                Err(fault) => {
                    done += fault.done;
                    self.resolve(&fault, &mut retries).map_err(|cause| Fault {
                        done,
                        addr: fault.addr,
                        write: fault.write,
                        cause,
                    })?;
                }
            }
        }
    }

    /// Reads `buf.len()` bytes at `addr`.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), Fault> {
        let len = buf.len();
        self.retrying(|done| {
            let rest = &mut buf[done..];
            self.pieces(
                addr.wrapping_add(done as u64),
                len - done,
                false,
                &mut |space, a, r| self.path.port.read(space, a, &mut rest[r]),
            )
        })
    }

    /// Writes `data` at `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), Fault> {
        self.retrying(|done| {
            let rest = &data[done..];
            self.pieces(
                addr.wrapping_add(done as u64),
                rest.len(),
                true,
                &mut |space, a, r| self.path.port.write(space, a, &rest[r]),
            )
        })
    }

    /// Copies `len` bytes from `src` to `dst` (the ranges must not overlap).
    pub fn copy(&self, src: u64, dst: u64, len: usize) -> Result<(), Fault> {
        self.retrying(|done| {
            let src = src.wrapping_add(done as u64);
            let dst = dst.wrapping_add(done as u64);
            let len = len - done;
            if !self.ats {
                return self
                    .path
                    .port
                    .copy(AddressSpace::Untranslated(self.tag), src, dst, len);
            }
            let mut moved = 0usize;
            while moved < len {
                let s = src.wrapping_add(moved as u64);
                let d = dst.wrapping_add(moved as u64);
                let _in_use = self.path.atc.use_guard();
                let at = |f: DmaFault| DmaFault { done: moved, ..f };
                let (Some(from), Some(to)) = (
                    self.translation(s, false).map_err(at)?,
                    self.translation(d, true).map_err(at)?,
                ) else {
                    return self
                        .path
                        .port
                        .copy(AddressSpace::Untranslated(self.tag), s, d, len - moved)
                        .map_err(|f| DmaFault {
                            done: moved + f.done,
                            ..f
                        });
                };
                // The ATC keeps contiguous pages as one run: one copy for
                // what is contiguous on both sides.
                let n = from.1.min(to.1).min((len - moved).min(MAX_RUN) as u64);
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                self.path
                    .port
                    .copy(AddressSpace::Translated, from.0, to.0, n)
                    .map_err(|f| DmaFault {
                        done: moved + f.done,
                        addr: if f.write { d } else { s }.wrapping_add(f.done as u64),
                        ..f
                    })?;
                moved += n;
            }
            Ok(())
        })
    }

    /// Splits `[addr, addr+len)` into pieces with one translation each and
    /// runs `io(space, address, piece range)` on them. Without ATS (or when
    /// the port has no ATS) the whole range is one untranslated piece.
    fn pieces(
        &self,
        addr: u64,
        len: usize,
        write: bool,
        io: &mut dyn FnMut(AddressSpace, u64, std::ops::Range<usize>) -> Result<(), DmaFault>,
    ) -> Result<(), DmaFault> {
        let untranslated = AddressSpace::Untranslated(self.tag);
        if !self.ats {
            return io(untranslated, addr, 0..len);
        }
        let mut done = 0usize;
        while done < len {
            let at = addr.wrapping_add(done as u64);
            let _in_use = self.path.atc.use_guard();
            let translated = self
                .translation(at, write)
                .map_err(|f| DmaFault { done, ..f })?;
            let Some((target, room)) = translated else {
                return io(untranslated, at, done..len).map_err(|f| DmaFault {
                    done: done + f.done,
                    ..f
                });
            };
            let n = usize::try_from(room).unwrap_or(usize::MAX).min(len - done);
            io(AddressSpace::Translated, target, done..done + n).map_err(|f| DmaFault {
                done: done + f.done,
                addr: at.wrapping_add(f.done as u64),
                write,
                kind: f.kind,
            })?;
            done += n;
        }
        Ok(())
    }

    /// The translated address of `addr` and the bytes left in its page,
    /// from the ATC or a fresh ATS request; `None` when the port has no ATS.
    fn translation(&self, addr: u64, write: bool) -> Result<Option<(u64, u64)>, DmaFault> {
        let allows = |read: bool, may_write: bool| if write { may_write } else { read };
        let fault = |kind| DmaFault {
            done: 0,
            addr,
            write,
            kind,
        };
        let atc = self.path.atc;
        let hit = match atc.lookup(self.tag, addr) {
            Some(hit) if allows(hit.read, hit.write) => hit,
            stale => {
                if stale.is_some() {
                    // A cached entry without the permission: ask again.
                    atc.remove(self.tag, addr);
                }
                match self.path.port.translate(self.tag, addr) {
                    None => return Ok(None),
                    Some(Err(f)) => return Err(fault(f.kind)),
                    Some(Ok(t)) => {
                        atc.insert(self.tag, addr, t);
                        match atc.lookup(self.tag, addr) {
                            Some(hit) => hit,
                            None => return Err(fault(FaultKind::PageFault)),
                        }
                    }
                }
            }
        };
        if !allows(hit.read, hit.write) {
            return Err(fault(FaultKind::PageFault));
        }
        let offset = addr - hit.base;
        Ok(Some((hit.target.wrapping_add(offset), hit.len - offset)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::dma::{MockIommu, PageRequest, Translation};

    const PAGE: u64 = 0x1000;
    const IOVA: u64 = 0x10_0000;
    const OLD: u64 = 0x20_0000;
    const NEW: u64 = 0x30_0000;
    const TAG: Option<PasidTag> = Some(PasidTag {
        pasid: 5,
        privileged: false,
    });

    /// A port whose first ATS translation request, once armed, tells the test it has its
    /// answer and holds it until the test lets it go: a translation in flight.
    struct SlowAts {
        iommu: MockIommu,
        hold: Mutex<Option<(Sender<()>, Receiver<()>)>>,
    }

    impl DmaPort for SlowAts {
        fn read(&self, space: AddressSpace, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
            self.iommu.read(space, addr, buf)
        }

        fn write(&self, space: AddressSpace, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
            self.iommu.write(space, addr, data)
        }

        fn translate(
            &self,
            pasid: Option<PasidTag>,
            addr: u64,
        ) -> Option<Result<Translation, DmaFault>> {
            let answer = self.iommu.translate(pasid, addr);
            let hold = self.hold.lock().unwrap().take();
            if let Some((answered, go)) = hold {
                answered.send(()).unwrap();
                go.recv().unwrap();
            }
            answer
        }

        fn page_request(&self, request: PageRequest) {
            self.iommu.page_request(request);
        }
    }

    /// A device-TLB invalidation that arrives while an ATS translation of the same page is
    /// in flight (the answer predates the IOMMU's own invalidation) must not leave that
    /// answer cached once it completes: after it, the device's writes reach the new page,
    /// never the old one, which the guest frees as soon as the invalidation completes.
    #[test]
    fn a_translation_in_flight_does_not_outlive_its_invalidation() {
        let mem =
            Arc::new(GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap());
        let (answered_tx, answered) = channel();
        let (go, go_rx) = channel();
        let port = SlowAts {
            iommu: MockIommu::with_ats(mem.clone()),
            hold: Mutex::new(Some((answered_tx, go_rx))),
        };
        port.iommu.remap_page(IOVA, OLD);
        let (atc, prs, cancel) = (
            Atc::default(),
            PageRequester::default(),
            AtomicBool::new(false),
        );
        let access = Access {
            path: Path {
                port: &port,
                atc: &atc,
                prs: &prs,
                pri_allocation: 0,
            },
            tag: TAG,
            ats: true,
            block_on_fault: false,
            cancel: &cancel,
            defer: None,
        };
        std::thread::scope(|s| {
            let device = s.spawn(|| access.write(IOVA, &[0xaa; 64]));
            answered.recv().unwrap();
            // The guest remaps the page and invalidates the IOMMU's and the device's caches.
            port.iommu.remap_page(IOVA, NEW);
            let invalidation = s.spawn(|| atc.invalidate(Some(5), IOVA, PAGE));
            // Let the invalidation get as far as it can while the translation is in flight.
            std::thread::sleep(Duration::from_millis(100));
            go.send(()).unwrap();
            device.join().unwrap().unwrap();
            invalidation.join().unwrap();
        });
        // The invalidation completed: the guest reuses the old frame.
        mem.write_slice(&[0x55; 64], GuestAddress(OLD)).unwrap();
        access.write(IOVA, &[0xbb; 64]).unwrap();
        assert_eq!(
            mem.read_obj::<[u8; 8]>(GuestAddress(NEW)).unwrap(),
            [0xbb; 8]
        );
        assert_eq!(
            mem.read_obj::<[u8; 8]>(GuestAddress(OLD)).unwrap(),
            [0x55; 8]
        );
    }
}
