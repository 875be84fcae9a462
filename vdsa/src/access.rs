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
