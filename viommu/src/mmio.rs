// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! The register window: decoding 32- and 64-bit accesses and the side effects of writes.

use std::sync::atomic::Ordering;

use log::{debug, warn};
use vm_memory::GuestAddressSpace;

use crate::cache::{IotlbFamily, PasidCacheScope};
use crate::fault::PrimaryFaultLog;
use crate::interrupt::{EventInterrupt, Msi};
use crate::invalidation::{InvalidationQueue, QueueError};
use crate::prq::PageRequestQueue;
use crate::regs::*;
use crate::{lock, Iommu};

/// Register state of the unit (everything software can read back).
#[derive(Debug, Default)]
pub(crate) struct RegisterFile {
    /// GSTS.
    pub gsts: u32,
    /// RTADDR as last written.
    pub rtaddr: u64,
    /// CCMD.
    pub ccmd: u64,
    /// Primary fault log (FRCD registers, FRI, PFO, PPF).
    pub fault_log: PrimaryFaultLog,
    /// FSTS.IQE/ICE/ITE.
    pub fsts_errors: u32,
    /// Fault event (FECTL...).
    pub fault_event: EventInterrupt,
    /// Invalidation queue (IQA, IQH, IQT).
    pub iq: InvalidationQueue,
    /// ICS.
    pub ics: u32,
    /// Invalidation completion event (IECTL...).
    pub inv_event: EventInterrupt,
    /// IQERCD.
    pub iqercd: u64,
    /// Page request queue (PQA, PQH, PQT, PRS, PECTL...).
    pub prq: PageRequestQueue,
    /// IVA.
    pub iva: u64,
    /// IOTLB invalidate register.
    pub iotlb: u64,
}

impl RegisterFile {
    /// FSTS value.
    fn fsts(&self) -> u32 {
        self.fault_log.status_bits() | self.fsts_errors
    }

    /// An invalidation queue error: stop the queue, record IQEI, raise the fault event.
    pub fn queue_error(&mut self, error: QueueError) -> Option<Msi> {
        warn!("viommu: invalidation queue error: {error}");
        self.iq.stopped = true;
        self.iqercd = iqercd::iqei(error as u8);
        let first = self.fsts_errors & fsts::IQE == 0;
        self.fsts_errors |= fsts::IQE;
        if first {
            self.fault_event.raise()
        } else {
            None
        }
    }

    /// The value of a 64-bit register at `base`, or `None` if `base` is not one.
    fn read64(&self, base: u64) -> Option<u64> {
        let v = match base {
            CAP => CAP_VALUE,
            ECAP => ECAP_VALUE,
            RTADDR => self.rtaddr,
            CCMD => self.ccmd,
            AFLOG | IRTA => 0,
            IQH => self.iq.head,
            IQT => self.iq.tail,
            IQA => self.iq.iqa,
            IQERCD => self.iqercd,
            PQH => self.prq.head,
            PQT => self.prq.tail,
            PQA => self.prq.pqa,
            IVA => self.iva,
            IOTLB_REG => self.iotlb,
            b if (FRCD_BASE..FRCD_BASE + NUM_FAULT_RECORDS as u64 * FRCD_SIZE).contains(&b) => {
                let off = b - FRCD_BASE;
                self.fault_log
                    .read((off / FRCD_SIZE) as usize, ((off % FRCD_SIZE) / 8) as usize)
            }
            _ => return None,
        };
        Some(v)
    }

    /// The value of a 32-bit register.
    fn read32(&self, offset: u64) -> u32 {
        match offset {
            VER => VERSION,
            GSTS => self.gsts,
            FSTS => self.fsts(),
            FECTL..=FEUADDR => self.fault_event.read((offset - FECTL) / 4),
            ICS => self.ics,
            IECTL..=IEUADDR => self.inv_event.read((offset - IECTL) / 4),
            PRS => self.prq.status,
            PECTL..=PEUADDR => self.prq.event.read((offset - PECTL) / 4),
            // GCMD is write-only; PMEN, reserved and unimplemented offsets read as zero.
            _ => 0,
        }
    }
}

/// Work left after a register write, done once the register lock is released.
#[derive(Default)]
struct Aftermath {
    msis: Vec<Msi>,
    process_queue: bool,
}

impl Aftermath {
    fn msi(&mut self, msi: Option<Msi>) {
        self.msis.extend(msi);
    }
}

impl<S: GuestAddressSpace> Iommu<S> {
    /// Guest read of `data.len()` bytes at `offset` in the register window. 4- and 8-byte
    /// naturally aligned accesses are decoded; anything else reads as zeros.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        if !(len == 4 || len == 8) || offset % len != 0 || offset >= REG_WINDOW_SIZE {
            debug!("viommu: unsupported read of {len} bytes at {offset:#x}");
            data.fill(0);
            return;
        }
        let regs = lock(&self.regs);
        let value = if len == 8 {
            regs.read64(offset).unwrap_or_else(|| {
                u64::from(regs.read32(offset)) | (u64::from(regs.read32(offset + 4)) << 32)
            })
        } else {
            match regs.read64(offset & !7) {
                Some(v) => (v >> ((offset & 4) * 8)) & 0xffff_ffff,
                None => u64::from(regs.read32(offset)),
            }
        };
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
    }

    /// Guest write of `data` at `offset` in the register window. 4- and 8-byte naturally
    /// aligned accesses are decoded (a 4-byte write to half of a 64-bit register merges with
    /// the other half); anything else is ignored.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if !(len == 4 || len == 8) || offset % len != 0 || offset >= REG_WINDOW_SIZE {
            debug!("viommu: unsupported write of {len} bytes at {offset:#x}");
            return;
        }
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let mut after = Aftermath::default();
        {
            let mut regs = lock(&self.regs);
            if len == 8 {
                if regs.read64(offset).is_some() {
                    self.write64(&mut regs, offset, value, &mut after);
                } else {
                    self.write32(&mut regs, offset, value as u32, &mut after);
                    self.write32(&mut regs, offset + 4, (value >> 32) as u32, &mut after);
                }
            } else {
                let base = offset & !7;
                match regs.read64(base) {
                    Some(current) => {
                        // Fault records are RW1C: the half not written must not echo F back.
                        let current = if (FRCD_BASE..IOTLB_REG_BASE).contains(&base) {
                            0
                        } else {
                            current
                        };
                        let merged = if offset & 4 != 0 {
                            (current & 0xffff_ffff) | (value << 32)
                        } else {
                            (current & !0xffff_ffff) | value
                        };
                        self.write64(&mut regs, base, merged, &mut after);
                    }
                    None => self.write32(&mut regs, offset, value as u32, &mut after),
                }
            }
        }
        for msi in after.msis {
            self.deliver(Some(msi));
        }
        if after.process_queue {
            self.process_invalidation_queue();
        }
    }

    fn write64(&self, regs: &mut RegisterFile, base: u64, value: u64, after: &mut Aftermath) {
        match base {
            RTADDR => regs.rtaddr = value & rtaddr::WRITABLE,
            CCMD => regs.ccmd = self.context_command(value & ccmd::WRITABLE),
            IQT => {
                if let Err(e) = regs.iq.set_tail(value) {
                    after.msi(regs.queue_error(e));
                }
                after.process_queue = true;
            }
            IQA => regs.iq.iqa = value & iqa::WRITABLE,
            PQH => regs.prq.set_head(value),
            PQT => regs.prq.set_tail(value),
            PQA => regs.prq.set_address(value),
            IVA => regs.iva = value & iva::WRITABLE,
            IOTLB_REG => regs.iotlb = self.iotlb_command(value & iotlb_reg::WRITABLE, regs.iva),
            b if (FRCD_BASE..FRCD_BASE + NUM_FAULT_RECORDS as u64 * FRCD_SIZE).contains(&b) => {
                let off = b - FRCD_BASE;
                if off % FRCD_SIZE == 8 {
                    regs.fault_log
                        .write_upper((off / FRCD_SIZE) as usize, value);
                    if regs.fsts() & (fsts::PPF | fsts::RW1C) == 0 {
                        regs.fault_event.clear_pending();
                    }
                }
            }
            // CAP, ECAP, IQH, IQERCD, AFLOG, IRTA: read-only or unsupported.
            _ => debug!("viommu: write to read-only register {base:#x} ignored"),
        }
    }

    fn write32(&self, regs: &mut RegisterFile, offset: u64, value: u32, after: &mut Aftermath) {
        match offset {
            GCMD => self.global_command(regs, value),
            FSTS => {
                let cleared_iqe = value & fsts::IQE != 0 && regs.fsts_errors & fsts::IQE != 0;
                regs.fsts_errors &= !(value & (fsts::IQE | fsts::ICE | fsts::ITE));
                if value & fsts::PFO != 0 {
                    regs.fault_log.clear_overflow();
                }
                if cleared_iqe {
                    // Fetching resumes at IQH (software may have replaced the bad descriptor).
                    regs.iq.stopped = false;
                    after.process_queue = true;
                }
                if regs.fsts() & (fsts::PPF | fsts::RW1C) == 0 {
                    regs.fault_event.clear_pending();
                }
            }
            FECTL..=FEUADDR => after.msi(regs.fault_event.write((offset - FECTL) / 4, value)),
            ICS => {
                regs.ics &= !(value & ics::IWC);
                if regs.ics == 0 {
                    regs.inv_event.clear_pending();
                }
            }
            IECTL..=IEUADDR => after.msi(regs.inv_event.write((offset - IECTL) / 4, value)),
            PRS => {
                if regs.prq.write_status(value) {
                    regs.prq.event.clear_pending();
                }
            }
            PECTL..=PEUADDR => after.msi(regs.prq.event.write((offset - PECTL) / 4, value)),
            // VER, GSTS: read-only; PMEN: protected memory regions are not supported.
            _ => debug!("viommu: write to {offset:#x} ignored"),
        }
    }

    /// GCMD: apply every command whose bit differs from the status, then report in GSTS.
    fn global_command(&self, regs: &mut RegisterFile, value: u32) {
        let status = regs.gsts;
        if (value ^ status) & gcmd::TE != 0 {
            regs.gsts ^= gcmd::TE;
            self.translation_enabled
                .store(value & gcmd::TE != 0, Ordering::Release);
            // After the store: a memo made from the old mode carries the old generation.
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        if value & gcmd::SRTP != 0 {
            self.root_table.store(regs.rtaddr, Ordering::Release);
            self.generation.fetch_add(1, Ordering::AcqRel);
            regs.gsts |= gcmd::SRTP;
        }
        if (value ^ status) & gcmd::QIE != 0 {
            if value & gcmd::QIE != 0 {
                regs.iq.head = 0;
                regs.iq.enabled = true;
                regs.gsts |= gcmd::QIE;
            } else {
                regs.iq.enabled = false;
                regs.gsts &= !gcmd::QIE;
            }
        }
        // WBF completes at once (WBFS reads 0); fault logging and interrupt remapping
        // commands are for features CAP/ECAP do not advertise and are ignored.
    }

    /// CCMD with ICC set: register-based context-cache invalidation. Returns the new CCMD.
    fn context_command(&self, value: u64) -> u64 {
        if value & ccmd::ICC == 0 {
            return value;
        }
        let granularity = ccmd::cirg(value);
        let mut caches = self.caches_for_invalidation();
        match granularity {
            1 | 2 => caches.context.invalidate_all(),
            3 => caches
                .context
                .invalidate_device(ccmd::sid(value), ccmd::fm(value)),
            _ => {}
        }
        (value & !ccmd::ICC & !ccmd::caig(3)) | ccmd::caig(granularity)
    }

    /// IOTLB register with IVT set: register-based IOTLB invalidation (reaches second-stage
    /// and nested entries; global reaches everything). Returns the new register value.
    fn iotlb_command(&self, value: u64, iva_value: u64) -> u64 {
        if value & iotlb_reg::IVT == 0 {
            return value;
        }
        let granularity = iotlb_reg::iirg(value);
        let did = iotlb_reg::did(value);
        let mut caches = self.caches_for_invalidation();
        match granularity {
            1 => caches.iotlb.clear(),
            2 => caches
                .iotlb
                .invalidate_domain(IotlbFamily::SecondStage, did, None),
            3 => caches.iotlb.invalidate_range(
                IotlbFamily::SecondStage,
                did,
                None,
                iva::addr(iva_value),
                iva::am(iva_value),
            ),
            _ => {}
        }
        (value & !iotlb_reg::IVT & !iotlb_reg::iaig(3)) | iotlb_reg::iaig(granularity)
    }

    /// Notify PASID observers (after a PASID-cache invalidation).
    pub(crate) fn notify_pasid_observers(&self, scope: PasidCacheScope) {
        let observers = self
            .pasid_observers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for o in observers {
            o.pasid_cache_invalidated(scope);
        }
    }
}
