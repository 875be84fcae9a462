// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Request processing (VT-d 3.4-3.6): root entry, context entry, PASID entry, then the
//! first-stage, second-stage, nested or pass-through translation, through the caches; plus the
//! device-facing entry points built on it (translation, DMA, ATS, page requests).

use std::ops::Range;
use std::sync::atomic::Ordering;

use log::debug;
use pci::PciAddress;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemory, Permissions};

use crate::cache::{CachedStage, Caches, IotlbEntry};
use crate::device::{
    AtsCompletion, AtsError, CopyError, DmaError, DmaErrorKind, DmaFault, PageGroupResponse,
    PasidTag, ResponseCode,
};
use crate::fault::{FaultReason, FaultRecord, LogOutcome};
use crate::paging::{self, AccessType, Translation, WalkConfig, PAGE_SIZE_4K};
use crate::prq::{PageRequest, PostOutcome};
use crate::regs::{rtaddr, HOST_ADDRESS_WIDTH};
use crate::second_stage::{self, StageTranslation};
use crate::tables::{ContextEntry, PasidEntry, Pgtt, RootEntry, TableFault};
use crate::{lock, Iommu};

/// Why a request was not translated (before fault recording).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Failure {
    Fault(TableFault),
    Blocked,
}

impl From<TableFault> for Failure {
    fn from(f: TableFault) -> Self {
        Failure::Fault(f)
    }
}

/// Why [`Iommu::resolve_pasid`] found no usable PASID entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PasidLookupError {
    /// Translation is disabled or not in scalable mode: no PASID is set up.
    #[error("translation disabled or not in scalable mode")]
    TranslationDisabled,
    /// The structures leading to the entry fault with this reason.
    #[error("{0}")]
    Fault(FaultReason),
}

/// Why a page request was not queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageRequestRejection {
    /// The request faulted on the root/context structures (recorded unless FPD).
    Fault(FaultReason),
    /// The page request queue is full: PRO set.
    QueueFull,
    /// No page request queue is set up (PQA=0) or it is not in guest RAM.
    QueueUnavailable,
    /// Translation disabled or not in scalable mode.
    TranslationDisabled,
}

/// A page request the unit did not queue, with the response the unit itself gives the device
/// for the group (if the request needed one): Success after a queue overflow (the device
/// retries the translation), Invalid Request otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("page request rejected: {reason:?}")]
pub struct PageRequestError {
    /// Why.
    pub reason: PageRequestRejection,
    /// The unit-generated page group response, if the request needed a response.
    pub response: Option<PageGroupResponse>,
}

/// Identity translation of one 4 KiB page (pass-through, or translation disabled).
fn identity(iova: u64) -> Translation {
    Translation {
        phys_addr: iova,
        page_size: PAGE_SIZE_4K,
        writable: true,
        user: true,
        executable: true,
        dirty: true,
    }
}

/// Identity translation as an IOTLB-style entry (not inserted in the IOTLB).
fn identity_entry(iova: u64) -> IotlbEntry {
    IotlbEntry {
        translation: identity(iova & !(PAGE_SIZE_4K - 1)),
        stage: CachedStage::SecondStage,
        readable: true,
        write_protect: false,
    }
}

/// Pages a DMA translates per acquisition of the cache lock.
const DMA_WINDOW_PAGES: usize = 256;

/// Who is asking for what, for a DMA.
#[derive(Clone, Copy)]
struct DmaRequest {
    rid: u16,
    tag: Option<PasidTag>,
    access: AccessType,
}

/// The address-independent part of a translated request.
struct Route {
    entry: PasidEntry,
    pasid: u32,
    /// The access, with `user` set from the request's privilege.
    access: AccessType,
}

/// Each thread's most recent translation: a one-entry, lock-free front of the IOTLB for
/// devices that DMA page after page. It is a copy of an IOTLB entry, tagged with the unit's
/// invalidation generation; any invalidation (or translation/root-table change) moves the
/// generation on and so retires it, as it retires the IOTLB entry itself.
mod recent {
    use std::cell::Cell;

    use crate::cache::IotlbEntry;
    use crate::device::PasidTag;
    use crate::paging::{AccessType, Translation};

    #[derive(Clone, Copy)]
    struct Recent {
        unit: u64,
        generation: u64,
        rid: u16,
        tag: Option<PasidTag>,
        /// Input address of the page.
        page: u64,
        entry: IotlbEntry,
    }

    thread_local! {
        static RECENT: Cell<Option<Recent>> = const { Cell::new(None) };
    }

    pub(super) fn lookup(
        unit: u64,
        generation: u64,
        rid: u16,
        tag: Option<PasidTag>,
        iova: u64,
        access: AccessType,
    ) -> Option<Translation> {
        let r = RECENT.with(Cell::get)?;
        let t = r.entry.translation;
        let access = AccessType {
            user: !tag.is_some_and(|t| t.privileged),
            ..access
        };
        (r.unit == unit
            && r.generation == generation
            && r.rid == rid
            && r.tag == tag
            && iova & !(t.page_size - 1) == r.page
            && r.entry.permits(access))
        .then(|| Translation {
            phys_addr: t.phys_for(iova),
            ..t
        })
    }

    pub(super) fn remember(
        unit: u64,
        generation: u64,
        rid: u16,
        tag: Option<PasidTag>,
        iova: u64,
        entry: &IotlbEntry,
    ) {
        RECENT.with(|c| {
            c.set(Some(Recent {
                unit,
                generation,
                rid,
                tag,
                page: iova & !(entry.translation.page_size - 1),
                entry: *entry,
            }))
        });
    }
}

/// First-stage paging controls from a PASID-table entry. VT-d never lets supervisor requests
/// execute from user pages and has no SMAP.
///
/// XD (bit 63) is never a reserved bit here, whatever the entry's NXE says: the VT-d
/// specification dropped Execute-Requested requests (ECAP.ERS=0) and deprecated NXE and XD
/// with them, and Linux stopped setting NXE (6.11) while the process page tables it binds
/// for SVA carry XD on every data page. Without execute requests XD restricts nothing.
pub fn first_stage_config(entry: &PasidEntry) -> WalkConfig {
    WalkConfig {
        levels: entry.flpm,
        nxe: true,
        write_protect: entry.wpe,
        smep: true,
        smap: false,
        set_accessed_dirty: true,
        page_1g: true,
        phys_addr_bits: HOST_ADDRESS_WIDTH,
    }
}

impl<S: GuestAddressSpace> Iommu<S> {
    /// The scalable-mode root table address, or why there is none.
    fn scalable_root(&self) -> Result<u64, Failure> {
        if !self.translation_enabled.load(Ordering::Acquire) {
            return Err(Failure::Blocked);
        }
        let rt = self.root_table.load(Ordering::Acquire);
        match rtaddr::ttm(rt) {
            rtaddr::TTM_SCALABLE => Ok(rt & rtaddr::RTA_MASK),
            rtaddr::TTM_LEGACY => Err(Failure::Blocked),
            _ => Err(TableFault::new(FaultReason::RootTableInvalid).into()),
        }
    }

    fn context_entry(
        caches: &mut Caches,
        mem: &S::M,
        root: u64,
        rid: u16,
    ) -> Result<ContextEntry, TableFault> {
        if let Some(c) = caches.context.get(rid) {
            return Ok(c);
        }
        let function = PciAddress::from_rid(rid);
        let table = RootEntry::read(mem, root, function.bus)?.context_table(function.devfn())?;
        let entry = ContextEntry::read(mem, table, function.devfn())?;
        caches.context.insert(rid, entry);
        Ok(entry)
    }

    fn pasid_entry(
        caches: &mut Caches,
        mem: &S::M,
        rid: u16,
        context: &ContextEntry,
        pasid: u32,
    ) -> Result<PasidEntry, TableFault> {
        if let Some(e) = caches.pasid.get(rid, pasid) {
            return Ok(e);
        }
        let entry = context.pasid_entry(mem, pasid)?;
        caches.pasid.insert(rid, pasid, entry);
        Ok(entry)
    }

    /// Everything about a request that does not depend on its address: the PASID entry found
    /// through the context and PASID caches, and the checks on it. Needs the cache lock.
    fn route(
        caches: &mut Caches,
        mem: &S::M,
        root: u64,
        rid: u16,
        tag: Option<PasidTag>,
        access: AccessType,
        ats: bool,
    ) -> Result<Route, Failure> {
        let context = Self::context_entry(caches, mem, root, rid)?;
        let ctx_fault = |reason| Failure::Fault(TableFault::new(reason).with_fpd(context.fpd));
        let (pasid, privileged) = match tag {
            Some(_) if !context.paside => return Err(ctx_fault(FaultReason::PasidDisabled)),
            Some(t) => (t.pasid, t.privileged),
            None => (context.rid_pasid, false),
        };
        if ats && !context.dte {
            return Err(ctx_fault(FaultReason::DeviceTlbDisabled));
        }
        let entry = Self::pasid_entry(caches, mem, rid, &context, pasid)?;
        let fault = |reason| Failure::Fault(TableFault::new(reason).with_fpd(entry.fpd));
        if privileged && !entry.sre {
            return Err(fault(FaultReason::SupervisorRequestsDisabled));
        }
        if access.execute {
            // ECAP.ERS=0: no execute requests.
            return Err(fault(FaultReason::ExecuteRequestsDisabled));
        }
        Ok(Route {
            entry,
            pasid,
            access: AccessType {
                user: !privileged,
                ..access
            },
        })
    }

    /// Translate one address of a routed request: IOTLB, else a walk that fills the IOTLB.
    fn translate_page(
        caches: &mut Caches,
        mem: &S::M,
        route: &Route,
        iova: u64,
    ) -> Result<IotlbEntry, Failure> {
        let entry = &route.entry;
        let access = route.access;
        let fault = |reason| Failure::Fault(TableFault::new(reason).with_fpd(entry.fpd));
        let stage = match entry.pgtt {
            Pgtt::PassThrough if iova >> HOST_ADDRESS_WIDTH != 0 => {
                return Err(fault(FaultReason::AddressBeyondMax))
            }
            Pgtt::PassThrough => return Ok(identity_entry(iova)),
            Pgtt::FirstStage => CachedStage::FirstStage,
            Pgtt::SecondStage => CachedStage::SecondStage,
            Pgtt::Nested => CachedStage::Nested,
        };
        if let Some(hit) = caches.iotlb.lookup(entry.did, route.pasid, iova) {
            if hit.permits(access) {
                return Ok(*hit);
            }
        }
        let cfg = first_stage_config(entry);
        let walked = match entry.pgtt {
            Pgtt::FirstStage => paging::walk(mem, entry.flptr, iova, access, &cfg)
                .map(|translation| StageTranslation {
                    translation,
                    readable: true,
                })
                .map_err(|f| FaultReason::from_first_stage(&f)),
            Pgtt::SecondStage => {
                second_stage::translate(mem, entry.slptptr, iova, access, entry.slee)
            }
            _ => second_stage::translate_nested(
                mem,
                entry.flptr,
                entry.slptptr,
                iova,
                access,
                &cfg,
                entry.slee,
            ),
        };
        let StageTranslation {
            translation,
            readable,
        } = walked.map_err(fault)?;
        let new = IotlbEntry {
            translation,
            stage,
            readable,
            write_protect: stage == CachedStage::SecondStage || entry.wpe,
        };
        caches.iotlb.insert(entry.did, route.pasid, iova, new);
        Ok(new)
    }

    /// The root table when translation is on; `Ok(None)` when it is off and the request
    /// passes through untranslated (requests without PASID, not ATS).
    fn root_for(&self, tag: Option<PasidTag>, ats: bool) -> Result<Option<u64>, Failure> {
        match self.scalable_root() {
            Err(Failure::Blocked)
                if tag.is_none() && !ats && !self.translation_enabled.load(Ordering::Acquire) =>
            {
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    /// Translate one request through the caches and tables. `ats` marks a translation
    /// request (needs DTE).
    fn resolve(
        &self,
        mem: &S::M,
        rid: u16,
        tag: Option<PasidTag>,
        iova: u64,
        access: AccessType,
        ats: bool,
    ) -> Result<Translation, Failure> {
        // Read before taking the cache lock: an invalidation racing with this request makes
        // the memo below stale from birth.
        let generation = self.generation.load(Ordering::Acquire);
        let Some(root) = self.root_for(tag, ats)? else {
            return Ok(identity(iova));
        };
        let mut caches = lock(&self.caches);
        let route = Self::route(&mut caches, mem, root, rid, tag, access, ats)?;
        let hit = Self::translate_page(&mut caches, mem, &route, iova)?;
        drop(caches);
        if !ats {
            recent::remember(self.unit_id, generation, rid, tag, iova, &hit);
        }
        let t = hit.translation;
        Ok(Translation {
            phys_addr: t.phys_for(iova),
            ..t
        })
    }

    /// Record a fault in the primary fault log and raise the fault event if due.
    pub(crate) fn record_fault(&self, record: FaultRecord) {
        debug!("viommu: fault {record:x?}");
        let msi = {
            let mut regs = lock(&self.regs);
            match regs.fault_log.log(&record) {
                LogOutcome::Recorded {
                    first_pending: true,
                }
                | LogOutcome::Overflowed => regs.fault_event.raise(),
                _ => None,
            }
        };
        self.deliver(msi);
    }

    /// Turn a failure into what the device sees, recording the fault unless FPD.
    fn report(
        &self,
        rid: u16,
        tag: Option<PasidTag>,
        iova: u64,
        access: AccessType,
        failure: Failure,
    ) -> DmaFault {
        match failure {
            Failure::Blocked => DmaFault::Blocked,
            Failure::Fault(f) => {
                if !f.fpd {
                    self.record_fault(FaultRecord {
                        reason: f.reason,
                        source_id: PciAddress::from_rid(rid),
                        pasid: tag.map(|t| t.pasid),
                        address: iova,
                        write: access.write,
                        privileged: tag.is_some_and(|t| t.privileged),
                        execute: access.execute,
                    });
                }
                DmaFault::Translation {
                    reason: f.reason,
                    recorded: !f.fpd,
                }
            }
        }
    }

    /// Translate an untranslated DMA request from `requester`, with the
    /// PASID prefix `pasid` if any. `access.write` and `access.execute` describe the request;
    /// `access.user` is ignored: the privilege comes from the PASID prefix (requests without
    /// PASID are user requests). A failure records a fault (unless FPD) and may raise the
    /// fault event.
    pub fn translate(
        &self,
        requester: PciAddress,
        pasid: Option<PasidTag>,
        iova: u64,
        access: AccessType,
    ) -> Result<Translation, DmaFault> {
        let rid = requester.rid();
        let generation = self.generation.load(Ordering::Acquire);
        if let Some(t) = recent::lookup(self.unit_id, generation, rid, pasid, iova, access) {
            return Ok(t);
        }
        let mem = self.mem.memory();
        self.resolve(&mem, rid, pasid, iova, access, false)
            .map_err(|f| self.report(rid, pasid, iova, access, f))
    }

    /// Translate up to [`DMA_WINDOW_PAGES`] pages of `[iova, iova + len)` under one cache lock,
    /// appending physically contiguous runs to `runs` as (physical address, byte count).
    /// Stops at the first failing address.
    fn translate_window(
        &self,
        mem: &S::M,
        request: &DmaRequest,
        iova: u64,
        len: usize,
        runs: &mut Vec<(u64, usize)>,
    ) -> Result<(), (u64, Failure)> {
        let DmaRequest { rid, tag, access } = *request;
        let mut push = |phys: u64, n: usize| match runs.last_mut() {
            Some((start, count)) if *start + *count as u64 == phys => *count += n,
            _ => runs.push((phys, n)),
        };
        let chunk_len = |addr: u64, page_size: u64, done: usize| {
            let left_in_page = page_size - (addr & (page_size - 1));
            (len - done).min(usize::try_from(left_in_page).unwrap_or(usize::MAX))
        };
        let root = self.root_for(tag, false).map_err(|f| (iova, f))?;
        let Some(root) = root else {
            push(iova, len);
            return Ok(());
        };
        let mut caches = lock(&self.caches);
        let route =
            Self::route(&mut caches, mem, root, rid, tag, access, false).map_err(|f| (iova, f))?;
        let mut done = 0;
        for _ in 0..DMA_WINDOW_PAGES {
            if done == len {
                break;
            }
            let addr = iova.wrapping_add(done as u64);
            let e = Self::translate_page(&mut caches, mem, &route, addr).map_err(|f| (addr, f))?;
            let n = chunk_len(addr, e.translation.page_size, done);
            push(e.translation.phys_for(addr), n);
            done += n;
        }
        Ok(())
    }

    fn dma(
        &self,
        rid: u16,
        pasid: Option<PasidTag>,
        iova: u64,
        len: usize,
        write: bool,
        mut copy: impl FnMut(&S::M, u64, Range<usize>) -> bool,
    ) -> Result<(), DmaError> {
        let mem = self.mem.memory();
        let access = AccessType {
            write,
            user: false,
            execute: false,
        };
        let request = DmaRequest {
            rid,
            tag: pasid,
            access,
        };
        let mut runs = Vec::new();
        let mut done = 0;
        while done < len {
            runs.clear();
            let start = iova.wrapping_add(done as u64);
            let window = self.dma_window();
            let result = self.translate_window(&mem, &request, start, len - done, &mut runs);
            for &(phys, n) in &runs {
                if !copy(&mem, phys, done..done + n) {
                    return Err(self.memory_error(&mem, iova, done, phys, n, &mut copy));
                }
                done += n;
            }
            drop(window);
            if let Err((addr, failure)) = result {
                return Err(DmaError {
                    completed: done,
                    address: addr,
                    kind: DmaErrorKind::Fault(self.report(rid, pasid, addr, access, failure)),
                });
            }
        }
        Ok(())
    }

    /// A run of `n` bytes at `phys` failed to copy: find the first page of it that is not
    /// guest memory, copying the pages before it.
    fn memory_error(
        &self,
        mem: &S::M,
        iova: u64,
        mut done: usize,
        phys: u64,
        n: usize,
        copy: &mut impl FnMut(&S::M, u64, Range<usize>) -> bool,
    ) -> DmaError {
        let end = done + n;
        let mut p = phys;
        while done < end {
            let step = ((PAGE_SIZE_4K - (p & (PAGE_SIZE_4K - 1))) as usize).min(end - done);
            if !copy(mem, p, done..done + step) {
                break;
            }
            done += step;
            p += step as u64;
        }
        DmaError {
            completed: done,
            address: iova.wrapping_add(done as u64),
            kind: DmaErrorKind::Memory { phys_addr: p },
        }
    }

    /// Copy `len` bytes from I/O virtual address `src` to `dst` through translation, memory
    /// to memory (no bounce buffer): each window of source pages is translated, then the
    /// destination pages for it. The ranges must not overlap. On failure, `completed` counts
    /// the bytes written to `dst`; the error is the first failing access in copy order (a
    /// destination fault before the source fault's position comes first).
    pub fn dma_copy(
        &self,
        requester: PciAddress,
        pasid: Option<PasidTag>,
        src: u64,
        dst: u64,
        len: usize,
    ) -> Result<(), CopyError> {
        let rid = requester.rid();
        let mem = self.mem.memory();
        let request = |write| DmaRequest {
            rid,
            tag: pasid,
            access: AccessType {
                write,
                user: false,
                execute: false,
            },
        };
        let (read, write) = (request(false), request(true));
        let (mut from, mut to) = (Vec::new(), Vec::new());
        let mut done = 0;
        while done < len {
            from.clear();
            to.clear();
            let at = |base: u64| base.wrapping_add(done as u64);
            let window = self.dma_window();
            let read_result = self.translate_window(&mem, &read, at(src), len - done, &mut from);
            let readable: usize = from.iter().map(|r| r.1).sum();
            let write_result = self.translate_window(&mem, &write, at(dst), readable, &mut to);
            let (mut i, mut j, mut off_s, mut off_d) = (0, 0, 0, 0);
            while i < from.len() && j < to.len() {
                let n = (from[i].1 - off_s).min(to[j].1 - off_d);
                let (p, q) = (from[i].0 + off_s as u64, to[j].0 + off_d as u64);
                if let Err((copied, phys_addr, write)) = copy_phys(&*mem, p, q, n) {
                    done += copied;
                    let base = if write { dst } else { src };
                    return Err(CopyError {
                        error: DmaError {
                            completed: done,
                            address: base.wrapping_add(done as u64),
                            kind: DmaErrorKind::Memory { phys_addr },
                        },
                        write,
                    });
                }
                done += n;
                off_s += n;
                off_d += n;
                if off_s == from[i].1 {
                    (i, off_s) = (i + 1, 0);
                }
                if off_d == to[j].1 {
                    (j, off_d) = (j + 1, 0);
                }
            }
            drop(window);
            let failed = match (write_result, read_result) {
                (Err(failure), _) => Some((failure, &write)),
                (Ok(()), Err(failure)) => Some((failure, &read)),
                (Ok(()), Ok(())) => None,
            };
            if let Some(((addr, failure), request)) = failed {
                let access = request.access;
                return Err(CopyError {
                    error: DmaError {
                        completed: done,
                        address: addr,
                        kind: DmaErrorKind::Fault(self.report(rid, pasid, addr, access, failure)),
                    },
                    write: access.write,
                });
            }
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at I/O virtual address `iova` through translation, page by page.
    /// On failure, the error says how many bytes were read and which address failed.
    pub fn dma_read(
        &self,
        requester: PciAddress,
        pasid: Option<PasidTag>,
        iova: u64,
        buf: &mut [u8],
    ) -> Result<(), DmaError> {
        self.dma(
            requester.rid(),
            pasid,
            iova,
            buf.len(),
            false,
            |mem, phys, range| mem.read_slice(&mut buf[range], GuestAddress(phys)).is_ok(),
        )
    }

    /// Write `data` at I/O virtual address `iova` through translation, page by page. On
    /// failure, the error says how many bytes were written and which address failed.
    pub fn dma_write(
        &self,
        requester: PciAddress,
        pasid: Option<PasidTag>,
        iova: u64,
        data: &[u8],
    ) -> Result<(), DmaError> {
        self.dma(
            requester.rid(),
            pasid,
            iova,
            data.len(),
            true,
            |mem, phys, range| mem.write_slice(&data[range], GuestAddress(phys)).is_ok(),
        )
    }

    /// An ATS translation request. Not-present and permission failures answer with
    /// `read == write == false` and record nothing (the device may then send a page request);
    /// broken structures or a context entry without DTE answer Unsupported Request and record
    /// a fault. Write permission is granted only when `access.write` is set or the page is
    /// already dirty, so the first-stage dirty flag stays exact. Execute is never granted
    /// (ECAP.ERS=0).
    pub fn ats_translate(
        &self,
        requester: PciAddress,
        pasid: Option<PasidTag>,
        iova: u64,
        access: AccessType,
    ) -> Result<AtsCompletion, AtsError> {
        let rid = requester.rid();
        let mem = self.mem.memory();
        let privileged = pasid.is_some_and(|t| t.privileged);
        match self.resolve(&mem, rid, pasid, iova, access, true) {
            Ok(t) => Ok(AtsCompletion {
                translated_addr: t.page_base(),
                size: t.page_size,
                read: true,
                write: t.writable && t.dirty,
                execute: false,
                privileged,
            }),
            Err(Failure::Blocked) => Err(AtsError::Blocked),
            Err(Failure::Fault(f)) if f.reason.is_permission_like() => Ok(AtsCompletion {
                translated_addr: iova & !(PAGE_SIZE_4K - 1),
                size: PAGE_SIZE_4K,
                read: false,
                write: false,
                execute: false,
                privileged,
            }),
            Err(failure) => match self.report(rid, pasid, iova, access, failure) {
                DmaFault::Translation { reason, .. } => Err(AtsError::UnsupportedRequest(reason)),
                DmaFault::Blocked => Err(AtsError::Blocked),
            },
        }
    }

    /// The PASID-table entry the unit uses for (`requester`, `pasid`): the one a request-with-PASID
    /// from that requester would be translated with, read through the context and PASID
    /// caches exactly as a DMA request would (so an entry the guest changed without a
    /// PASID-cache invalidation may still be the cached one). Records no fault.
    pub fn resolve_pasid(
        &self,
        requester: PciAddress,
        pasid: u32,
    ) -> Result<PasidEntry, PasidLookupError> {
        let rid = requester.rid();
        let root = self
            .scalable_root()
            .map_err(|_| PasidLookupError::TranslationDisabled)?;
        let mem = self.mem.memory();
        let mut caches = lock(&self.caches);
        let context = Self::context_entry(&mut caches, &mem, root, rid)
            .map_err(|f| PasidLookupError::Fault(f.reason))?;
        if !context.paside {
            return Err(PasidLookupError::Fault(FaultReason::PasidDisabled));
        }
        Self::pasid_entry(&mut caches, &mem, rid, &context, pasid)
            .map_err(|f| PasidLookupError::Fault(f.reason))
    }

    /// A device's page request (PCIe PRI). Checks the requester's context entry (present,
    /// PRE, and PASIDE for a request with PASID), then writes the request to the page request
    /// queue and raises the page request event. Software answers through the invalidation
    /// queue; the response reaches the device through [`crate::AtsDevice::page_group_response`].
    pub fn page_request(&self, request: &PageRequest) -> Result<(), PageRequestError> {
        let rid = request.requester_id.rid();
        let reject = |reason, code| PageRequestError {
            reason,
            response: request.needs_response().then_some(PageGroupResponse {
                requester_id: request.requester_id,
                pasid: request.pasid.map(|t| t.pasid),
                prg_index: request.prg_index,
                code,
                private_data: request.private_data,
                from_hardware: true,
            }),
        };
        let root = self.scalable_root().map_err(|_| {
            reject(
                PageRequestRejection::TranslationDisabled,
                ResponseCode::InvalidRequest,
            )
        })?;
        let mem = self.mem.memory();
        let context = {
            let mut caches = lock(&self.caches);
            Self::context_entry(&mut caches, &mem, root, rid)
        };
        let checked = context.and_then(|c| {
            let fault = |reason| Err(TableFault::new(reason).with_fpd(c.fpd));
            if !c.pre {
                fault(FaultReason::PageRequestDisabled)
            } else if request.pasid.is_some() && !c.paside {
                fault(FaultReason::PasidDisabled)
            } else {
                Ok(())
            }
        });
        if let Err(f) = checked {
            let access = AccessType {
                write: request.write,
                user: false,
                execute: request.execute,
            };
            self.report(
                rid,
                request.pasid,
                request.address,
                access,
                Failure::Fault(f),
            );
            return Err(reject(
                PageRequestRejection::Fault(f.reason),
                ResponseCode::InvalidRequest,
            ));
        }
        let (outcome, msi) = lock(&self.regs).prq.post(&*mem, &request.encode());
        self.deliver(msi);
        match outcome {
            PostOutcome::Queued => Ok(()),
            PostOutcome::Overflow => Err(reject(
                PageRequestRejection::QueueFull,
                ResponseCode::Success,
            )),
            PostOutcome::Unavailable => Err(reject(
                PageRequestRejection::QueueUnavailable,
                ResponseCode::InvalidRequest,
            )),
        }
    }
}

/// Copies `n` bytes of guest memory from `from` to `to` (in one piece when both ranges lie
/// in one region each, else page by page); on failure, the bytes copied, the address that is
/// not guest memory and whether it was the destination.
fn copy_phys<M: GuestMemory + ?Sized>(
    mem: &M,
    from: u64,
    to: u64,
    n: usize,
) -> Result<(), (usize, u64, bool)> {
    let slice = |addr: u64, len: usize, access| {
        let mut pieces = mem.get_slices(GuestAddress(addr), len, access).ok()?;
        match (pieces.next(), pieces.next()) {
            (Some(Ok(one)), None) => Some(one),
            _ => None,
        }
    };
    if let (Some(s), Some(t)) = (
        slice(from, n, Permissions::Read),
        slice(to, n, Permissions::Write),
    ) {
        s.copy_to_volatile_slice(t);
        return Ok(());
    }
    let left_in_page = |addr: u64| (PAGE_SIZE_4K - (addr & (PAGE_SIZE_4K - 1))) as usize;
    let mut done = 0;
    while done < n {
        let (p, q) = (from + done as u64, to + done as u64);
        let step = left_in_page(p).min(left_in_page(q)).min(n - done);
        match (
            slice(p, step, Permissions::Read),
            slice(q, step, Permissions::Write),
        ) {
            (Some(s), Some(t)) => s.copy_to_volatile_slice(t),
            (None, _) => return Err((done, p, false)),
            (Some(_), None) => return Err((done, q, true)),
        }
        done += step;
    }
    Ok(())
}
