// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Emulated Intel VT-d remapping unit in scalable mode, for guests that use PASIDs and
//! Shared Virtual Addressing (SVA).
//!
//! [`Iommu`] is a plain state machine over guest memory (vm-memory): the VMM maps its 4 KiB
//! register window ([`Iommu::mmio_read`] / [`Iommu::mmio_write`]), feeds it DMA requests from
//! emulated devices ([`Iommu::translate`], [`Iommu::dma_read`], [`Iommu::dma_write`],
//! [`Iommu::ats_translate`], [`Iommu::page_request`]) and puts [`dmar::build_dmar_table`]'s
//! table in the guest's ACPI tables.
//!
//! Supported: scalable-mode root/context/PASID structures with PGTT first-stage,
//! second-stage, nested and pass-through; 4- and 5-level first-stage paging with 4 KiB, 2 MiB
//! and 1 GiB pages; queued invalidation with 128- and 256-bit descriptors; fault recording;
//! device TLB (ATS) and page requests (PRI). Not supported: legacy-mode translation,
//! interrupt remapping, advanced fault logging, second-stage A/D flags, execute requests.
//!
//! Threading: every method takes `&self`. Register state, the caches and the invalidation
//! queue sit behind separate mutexes; MSIs and device callbacks are issued after the register
//! lock is released.

#![forbid(unsafe_code)]

pub mod cache;
pub mod device;
pub mod dmar;
pub mod fault;
pub mod interrupt;
pub mod invalidation;
mod mmio;
pub mod paging;
pub mod prq;
pub mod regs;
pub mod second_stage;
pub mod tables;
mod translate;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use pci::PciAddress;
use vm_memory::GuestAddressSpace;

pub use cache::PasidCacheScope;
pub use device::{
    AtsCompletion, AtsDevice, AtsError, CopyError, DeviceTlbInvalidation, DmaError, DmaErrorKind,
    DmaFault, PageGroupResponse, PasidObserver, PasidTag, ResponseCode,
};
pub use fault::{FaultReason, FaultRecord};
pub use interrupt::MsiSink;
pub use paging::{AccessType, Translation};
pub use prq::PageRequest;
pub use tables::PasidEntry;
pub use translate::{first_stage_config, PageRequestError, PageRequestRejection, PasidLookupError};

use cache::Caches;
use mmio::RegisterFile;

/// Source of [`Iommu`] unit IDs.
static NEXT_UNIT_ID: AtomicU64 = AtomicU64::new(0);

/// Lock a mutex, ignoring poisoning (a panicking device thread must not take the unit down).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One emulated VT-d remapping hardware unit.
pub struct Iommu<S: GuestAddressSpace> {
    mem: S,
    msi: Arc<dyn MsiSink>,
    regs: Mutex<RegisterFile>,
    caches: Mutex<Caches>,
    /// Serialises invalidation-queue processing (held while calling device callbacks).
    queue: Mutex<()>,
    /// GSTS.TES, readable without the register lock.
    translation_enabled: AtomicBool,
    /// RTADDR as latched by the last SRTP command.
    root_table: AtomicU64,
    /// Distinguishes units in per-thread translation memos.
    unit_id: u64,
    /// Moves on with every cache invalidation and translation-mode change; translations
    /// memoised outside the cache lock are only valid for the generation they were made in.
    /// Shared with the [`Generation`] handles given out.
    generation: Arc<AtomicU64>,
    /// Held shared by each DMA window from its translation to the end of its memory
    /// accesses, exclusively (and at once released) by an invalidation before it completes:
    /// the unit drains requests translated with invalidated entries (CAP.DRD/DWD), so once
    /// software sees an invalidation complete, no DMA writes through what it removed.
    dma_in_flight: RwLock<()>,
    devices: RwLock<HashMap<PciAddress, Arc<dyn AtsDevice>>>,
    pasid_observers: RwLock<Vec<Arc<dyn PasidObserver>>>,
}

impl<S: GuestAddressSpace> std::fmt::Debug for Iommu<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommu").finish_non_exhaustive()
    }
}

impl<S: GuestAddressSpace> Iommu<S> {
    /// A unit in its reset state (translation disabled, all events masked) over guest memory
    /// `mem`, sending its MSIs to `msi`.
    pub fn new(mem: S, msi: Arc<dyn MsiSink>) -> Self {
        Iommu {
            mem,
            msi,
            regs: Mutex::new(RegisterFile::default()),
            caches: Mutex::new(Caches::default()),
            queue: Mutex::new(()),
            translation_enabled: AtomicBool::new(false),
            root_table: AtomicU64::new(0),
            unit_id: NEXT_UNIT_ID.fetch_add(1, Ordering::Relaxed),
            generation: Arc::new(AtomicU64::new(0)),
            dma_in_flight: RwLock::new(()),
            devices: RwLock::new(HashMap::new()),
            pasid_observers: RwLock::new(Vec::new()),
        }
    }

    /// Register the device at `requester` for device-TLB invalidations and page group
    /// responses. Replaces an earlier registration for the same function.
    pub fn register_device(&self, requester: PciAddress, device: Arc<dyn AtsDevice>) {
        self.devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(requester, device);
    }

    /// Forget the device at `requester`.
    pub fn unregister_device(&self, requester: PciAddress) {
        self.devices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&requester);
    }

    /// Be told about every PASID-cache invalidation the guest issues (it tore a PASID down or
    /// changed its entry).
    pub fn add_pasid_observer(&self, observer: Arc<dyn PasidObserver>) {
        self.pasid_observers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(observer);
    }

    fn device(&self, requester: PciAddress) -> Option<Arc<dyn AtsDevice>> {
        self.devices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&requester)
            .cloned()
    }

    /// The unit's invalidation generation: it moves on with every cache invalidation and
    /// translation-mode or root-table change, so an answer read through the caches (a
    /// present entry, which stays cached until invalidated) holds while it stays the same.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// A handle on [`Iommu::generation`] that reads it without the unit.
    pub fn generation_handle(&self) -> Generation {
        Generation(self.generation.clone())
    }

    /// Lock the caches to invalidate some of them: also retires every translation memoised
    /// outside the lock.
    fn caches_for_invalidation(&self) -> MutexGuard<'_, Caches> {
        let caches = lock(&self.caches);
        self.generation.fetch_add(1, Ordering::AcqRel);
        caches
    }

    /// Marks a DMA window in flight (see `dma_in_flight`). Never held across another
    /// acquisition of it, nor while taking the register lock.
    fn dma_window(&self) -> RwLockReadGuard<'_, ()> {
        self.dma_in_flight.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for every DMA window that started before now, so every one that translated
    /// through entries just invalidated has finished. Call without the cache lock (a window
    /// takes it while it translates).
    fn drain_dma(&self) {
        drop(
            self.dma_in_flight
                .write()
                .unwrap_or_else(|e| e.into_inner()),
        );
    }

    fn deliver(&self, msi: Option<interrupt::Msi>) {
        if let Some(msi) = msi {
            msi.deliver(self.msi.as_ref());
        }
    }
}

impl<S: GuestAddressSpace> Drop for Iommu<S> {
    fn drop(&mut self) {
        // What was memoised through the unit's caches is gone with it.
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

/// A read-only view of a unit's invalidation generation ([`Iommu::generation`]): a memo of
/// something read through the unit's caches is checked with one load, without a reference
/// to the unit. It moves on once more when the unit goes away.
#[derive(Clone, Debug)]
pub struct Generation(Arc<AtomicU64>);

impl Generation {
    /// The generation now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests;
