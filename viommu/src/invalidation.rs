// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Queued invalidation (VT-d 6.5.2): the invalidation queue registers and the descriptor
//! formats. Executing descriptors needs the caches, guest memory and devices, so it lives
//! with the unit ([`crate::Iommu`]); this module decodes and validates.

use log::{debug, warn};
use pci::PciAddress;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

use crate::cache::{IotlbFamily, PasidCacheScope};
use crate::device::{
    decode_invalidation_range, DeviceTlbInvalidation, PageGroupResponse, ResponseCode,
};
use crate::interrupt::Msi;
use crate::regs::{ics, iqa, IQ_OFFSET_MASK};
use crate::{lock, Iommu};

/// Descriptor type codes (qw0 bits 3:0, with bits 11:9 as the high part).
pub mod desc_type {
    /// Context-cache invalidate.
    pub const CONTEXT_CACHE: u8 = 1;
    /// IOTLB invalidate.
    pub const IOTLB: u8 = 2;
    /// Device-TLB invalidate.
    pub const DEVICE_TLB: u8 = 3;
    /// Interrupt entry cache invalidate.
    pub const IEC: u8 = 4;
    /// Invalidation wait.
    pub const WAIT: u8 = 5;
    /// PASID-based IOTLB invalidate.
    pub const PASID_IOTLB: u8 = 6;
    /// PASID-cache invalidate.
    pub const PASID_CACHE: u8 = 7;
    /// PASID-based device-TLB invalidate.
    pub const PASID_DEVICE_TLB: u8 = 8;
    /// Page group response.
    pub const PAGE_GROUP_RESPONSE: u8 = 9;
}

/// Invalidation queue error information (IQERCD.IQEI).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[repr(u8)]
pub enum QueueError {
    /// IQT beyond the queue size.
    #[error("invalid tail pointer")]
    InvalidTail = 1,
    /// The descriptor could not be fetched from memory.
    #[error("descriptor fetch error")]
    FetchError = 2,
    /// Unknown or unsupported descriptor type.
    #[error("invalid descriptor type")]
    InvalidType = 3,
    /// A reserved field is set (or a reserved granularity used).
    #[error("reserved field violation")]
    ReservedField = 4,
    /// A descriptor that needs 256 bits in a queue of 128-bit descriptors.
    #[error("invalid descriptor width")]
    InvalidWidth = 5,
    /// IQT not aligned to the descriptor size.
    #[error("queue tail misaligned")]
    TailMisaligned = 6,
}

/// Context-cache invalidation granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextScope {
    /// All context entries.
    Global,
    /// Entries of a domain (in scalable mode context entries carry no domain: all of them).
    Domain(u16),
    /// Entries of a source ID under a function mask.
    Device {
        /// Source ID.
        sid: u16,
        /// Function mask (FM).
        function_mask: u8,
    },
}

/// IOTLB invalidation granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IotlbScope {
    /// All entries.
    Global,
    /// All entries of a domain.
    Domain(u16),
    /// A naturally aligned range of 2^am pages in a domain.
    Page {
        /// Domain ID.
        did: u16,
        /// Address.
        addr: u64,
        /// Address mask (log2 of the number of pages).
        am: u8,
    },
}

/// A decoded invalidation descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Descriptor {
    /// Context-cache invalidate.
    ContextCache(ContextScope),
    /// IOTLB invalidate.
    Iotlb(IotlbScope),
    /// Device-TLB invalidate (translations without PASID).
    DeviceTlb {
        /// Device.
        sid: u16,
        /// Physical function source ID.
        pfsid: u16,
        /// Range start.
        address: u64,
        /// Range length.
        size: u64,
    },
    /// Interrupt entry cache invalidate (no interrupt remapping here: completes at once).
    InterruptEntryCache,
    /// Invalidation wait.
    Wait {
        /// IF: raise the invalidation completion event.
        interrupt: bool,
        /// SW: write `status_data` to `status_addr`.
        status_write: bool,
        /// FN: fence (later descriptors wait for this one).
        fence: bool,
        /// PD: page-request drain.
        drain: bool,
        /// Status data.
        status_data: u32,
        /// Status address (4-byte aligned).
        status_addr: u64,
    },
    /// PASID-based IOTLB invalidate.
    PasidIotlb {
        /// Domain ID.
        did: u16,
        /// PASID.
        pasid: u32,
        /// `None` for all non-global translations of the PASID, else (addr, am).
        range: Option<(u64, u8)>,
    },
    /// PASID-cache invalidate.
    PasidCache(PasidCacheScope),
    /// PASID-based device-TLB invalidate.
    PasidDeviceTlb {
        /// Device.
        sid: u16,
        /// Physical function source ID.
        pfsid: u16,
        /// PASID.
        pasid: u32,
        /// G: include global translations.
        global: bool,
        /// Range start.
        address: u64,
        /// Range length.
        size: u64,
    },
    /// Page group response to a device.
    PageGroupResponse(PageGroupResponse),
}

fn bits(v: u64, hi: u32, lo: u32) -> u64 {
    (v >> lo) & ((1u64 << (hi - lo + 1)) - 1)
}

fn mask(hi: u32, lo: u32) -> u64 {
    (((1u128 << (hi + 1)) - 1) as u64) & !((1u64 << lo) - 1)
}

/// Physical function source ID split over qw0 bits 15:12 (low 4 bits) and 63:52 (high 12).
fn pfsid(qw0: u64) -> u16 {
    (bits(qw0, 15, 12) | (bits(qw0, 63, 52) << 4)) as u16
}

impl Descriptor {
    /// Decode a descriptor. `wide` is IQA.DW (256-bit descriptors); in a 128-bit queue
    /// `qw[2]` and `qw[3]` are ignored.
    pub fn decode(qw: [u64; 4], wide: bool) -> Result<Descriptor, QueueError> {
        let ty = bits(qw[0], 3, 0) | (bits(qw[0], 11, 9) << 4);
        let reserved = |q0: u64, q1: u64| -> Result<(), QueueError> {
            if qw[0] & q0 != 0 || qw[1] & q1 != 0 {
                Err(QueueError::ReservedField)
            } else {
                Ok(())
            }
        };
        let upper_zero = || -> Result<(), QueueError> {
            if wide && (qw[2] != 0 || qw[3] != 0) {
                Err(QueueError::ReservedField)
            } else {
                Ok(())
            }
        };
        let g = bits(qw[0], 5, 4);
        let ty = u8::try_from(ty).map_err(|_| QueueError::InvalidType)?;
        if !wide && ty >= desc_type::PASID_IOTLB {
            // Types 6-9 carry 256-bit layouts in scalable mode.
            return if ty <= desc_type::PAGE_GROUP_RESPONSE {
                Err(QueueError::InvalidWidth)
            } else {
                Err(QueueError::InvalidType)
            };
        }
        match ty {
            desc_type::CONTEXT_CACHE => {
                reserved(mask(8, 6) | mask(15, 12) | mask(63, 50), !0)?;
                upper_zero()?;
                let did = bits(qw[0], 31, 16) as u16;
                let scope = match g {
                    1 => ContextScope::Global,
                    2 => ContextScope::Domain(did),
                    3 => ContextScope::Device {
                        sid: bits(qw[0], 47, 32) as u16,
                        function_mask: bits(qw[0], 49, 48) as u8,
                    },
                    _ => return Err(QueueError::ReservedField),
                };
                Ok(Descriptor::ContextCache(scope))
            }
            desc_type::IOTLB => {
                reserved(mask(8, 8) | mask(15, 12) | mask(63, 32), mask(11, 7))?;
                upper_zero()?;
                let did = bits(qw[0], 31, 16) as u16;
                let scope = match g {
                    1 => IotlbScope::Global,
                    2 => IotlbScope::Domain(did),
                    3 => IotlbScope::Page {
                        did,
                        addr: qw[1] & !0xfff,
                        am: bits(qw[1], 5, 0) as u8,
                    },
                    _ => return Err(QueueError::ReservedField),
                };
                Ok(Descriptor::Iotlb(scope))
            }
            desc_type::DEVICE_TLB => {
                reserved(mask(8, 4) | mask(31, 21) | mask(51, 48), mask(11, 1))?;
                upper_zero()?;
                let (address, size) = decode_invalidation_range(qw[1], qw[1] & 1 != 0);
                Ok(Descriptor::DeviceTlb {
                    sid: bits(qw[0], 47, 32) as u16,
                    pfsid: pfsid(qw[0]),
                    address,
                    size,
                })
            }
            desc_type::IEC => {
                reserved(mask(8, 5) | mask(26, 12) | mask(63, 48), !0)?;
                upper_zero()?;
                Ok(Descriptor::InterruptEntryCache)
            }
            desc_type::WAIT => {
                reserved(mask(8, 8) | mask(31, 12), mask(1, 0))?;
                upper_zero()?;
                Ok(Descriptor::Wait {
                    interrupt: qw[0] & (1 << 4) != 0,
                    status_write: qw[0] & (1 << 5) != 0,
                    fence: qw[0] & (1 << 6) != 0,
                    drain: qw[0] & (1 << 7) != 0,
                    status_data: (qw[0] >> 32) as u32,
                    status_addr: qw[1] & !3,
                })
            }
            desc_type::PASID_IOTLB => {
                reserved(mask(8, 6) | mask(15, 12) | mask(63, 52), mask(11, 7))?;
                upper_zero()?;
                let range = match g {
                    2 => None,
                    3 => Some((qw[1] & !0xfff, bits(qw[1], 5, 0) as u8)),
                    _ => return Err(QueueError::ReservedField),
                };
                Ok(Descriptor::PasidIotlb {
                    did: bits(qw[0], 31, 16) as u16,
                    pasid: bits(qw[0], 51, 32) as u32,
                    range,
                })
            }
            desc_type::PASID_CACHE => {
                reserved(mask(8, 6) | mask(15, 12) | mask(63, 52), !0)?;
                upper_zero()?;
                let did = bits(qw[0], 31, 16) as u16;
                let pasid = bits(qw[0], 51, 32) as u32;
                let scope = match g {
                    0 => PasidCacheScope::Domain { did },
                    1 => PasidCacheScope::Pasid { did, pasid },
                    3 => PasidCacheScope::Global,
                    _ => return Err(QueueError::ReservedField),
                };
                Ok(Descriptor::PasidCache(scope))
            }
            desc_type::PASID_DEVICE_TLB => {
                reserved(0, mask(10, 1))?;
                upper_zero()?;
                let (address, size) = decode_invalidation_range(qw[1], qw[1] & (1 << 11) != 0);
                Ok(Descriptor::PasidDeviceTlb {
                    sid: bits(qw[0], 31, 16) as u16,
                    pfsid: pfsid(qw[0]),
                    pasid: bits(qw[0], 51, 32) as u32,
                    global: qw[1] & 1 != 0,
                    address,
                    size,
                })
            }
            desc_type::PAGE_GROUP_RESPONSE => {
                reserved(mask(8, 6) | mask(63, 52), mask(1, 0) | mask(63, 12))?;
                let pasid_present = qw[0] & (1 << 4) != 0;
                let private_present = qw[0] & (1 << 5) != 0;
                Ok(Descriptor::PageGroupResponse(PageGroupResponse {
                    requester_id: PciAddress::from_rid(bits(qw[0], 31, 16) as u16),
                    pasid: pasid_present.then(|| bits(qw[0], 51, 32) as u32),
                    prg_index: bits(qw[1], 11, 3) as u16,
                    code: ResponseCode::from_bits(bits(qw[0], 15, 12) as u8),
                    private_data: private_present.then_some([qw[2], qw[3]]),
                    from_hardware: false,
                }))
            }
            _ => Err(QueueError::InvalidType),
        }
    }
}

/// Invalidation queue registers: IQA, IQH, IQT, and whether the queue is stopped on an error.
#[derive(Clone, Debug, Default)]
pub struct InvalidationQueue {
    /// IQA value.
    pub iqa: u64,
    /// IQH: byte offset of the next descriptor to fetch.
    pub head: u64,
    /// IQT: byte offset one past the last descriptor software submitted.
    pub tail: u64,
    /// GSTS.QIES.
    pub enabled: bool,
    /// FSTS.IQE is set: fetching stops until software clears it.
    pub stopped: bool,
}

impl InvalidationQueue {
    /// Descriptor size in bytes (16 or 32).
    pub fn descriptor_size(&self) -> u64 {
        if self.wide() {
            32
        } else {
            16
        }
    }

    /// IQA.DW.
    pub fn wide(&self) -> bool {
        self.iqa & iqa::DW != 0
    }

    /// Queue size in bytes.
    pub fn size(&self) -> u64 {
        0x1000 << iqa::qs(self.iqa)
    }

    /// Check a new IQT value; the caller raises IQE on error.
    pub fn set_tail(&mut self, value: u64) -> Result<(), QueueError> {
        self.tail = value & IQ_OFFSET_MASK;
        self.check_tail()
    }

    fn check_tail(&self) -> Result<(), QueueError> {
        if self.wide() && self.tail & 0x10 != 0 {
            return Err(QueueError::TailMisaligned);
        }
        if self.tail >= self.size() {
            return Err(QueueError::InvalidTail);
        }
        Ok(())
    }

    /// Guest-physical address and width of the next descriptor to execute, if any.
    pub fn next(&self) -> Option<(u64, bool)> {
        if !self.enabled || self.stopped || self.head == self.tail || self.check_tail().is_err() {
            return None;
        }
        Some(((self.iqa & iqa::BASE_MASK) + self.head, self.wide()))
    }

    /// Move IQH past the descriptor just executed, wrapping at the end of the queue.
    pub fn advance(&mut self) {
        self.head = (self.head + self.descriptor_size()) % self.size();
    }
}

/// Executing the queue: fetch, decode and carry out descriptors from IQH up to IQT.
impl<S: GuestAddressSpace> Iommu<S> {
    /// Run the invalidation queue until it is empty or stopped by an error. Descriptors are
    /// executed synchronously, so every wait descriptor (fence or not) completes after all
    /// earlier descriptors, and page-request drains have nothing to wait for.
    pub(crate) fn process_invalidation_queue(&self) {
        let _serial = lock(&self.queue);
        let mem = self.mem.memory();
        loop {
            let Some((addr, wide)) = lock(&self.regs).iq.next() else {
                break;
            };
            let fetched = if wide {
                mem.read_obj::<[u64; 4]>(GuestAddress(addr))
            } else {
                mem.read_obj::<[u64; 2]>(GuestAddress(addr))
                    .map(|q| [q[0], q[1], 0, 0])
            };
            let decoded = fetched
                .map_err(|_| QueueError::FetchError)
                .and_then(|qw| Descriptor::decode(qw, wide));
            match decoded {
                Ok(descriptor) => {
                    let msi = self.execute(&*mem, descriptor);
                    lock(&self.regs).iq.advance();
                    self.deliver(msi);
                }
                Err(error) => {
                    let msi = lock(&self.regs).queue_error(error);
                    self.deliver(msi);
                    break;
                }
            }
        }
    }

    /// Carry out one descriptor; returns the invalidation completion MSI, if one is due.
    /// An invalidation of translation caches completes only after the DMA windows that may
    /// have translated through what it removed (the unit drains them, CAP.DRD/DWD), so a
    /// later wait descriptor tells software the old translations are out of use.
    fn execute(&self, mem: &S::M, descriptor: Descriptor) -> Option<Msi> {
        debug!("viommu: {descriptor:x?}");
        let msi = self.apply(mem, descriptor);
        if matches!(
            descriptor,
            Descriptor::ContextCache(_)
                | Descriptor::Iotlb(_)
                | Descriptor::PasidIotlb { .. }
                | Descriptor::PasidCache(_)
        ) {
            self.drain_dma();
        }
        msi
    }

    /// The cache, device and event effects of one descriptor.
    fn apply(&self, mem: &S::M, descriptor: Descriptor) -> Option<Msi> {
        match descriptor {
            Descriptor::ContextCache(scope) => {
                let mut caches = self.caches_for_invalidation();
                match scope {
                    ContextScope::Global | ContextScope::Domain(_) => {
                        caches.context.invalidate_all()
                    }
                    ContextScope::Device { sid, function_mask } => {
                        caches.context.invalidate_device(sid, function_mask)
                    }
                }
            }
            Descriptor::Iotlb(scope) => {
                let mut caches = self.caches_for_invalidation();
                match scope {
                    IotlbScope::Global => caches.iotlb.clear(),
                    IotlbScope::Domain(did) => {
                        caches
                            .iotlb
                            .invalidate_domain(IotlbFamily::SecondStage, did, None)
                    }
                    IotlbScope::Page { did, addr, am } => {
                        caches
                            .iotlb
                            .invalidate_range(IotlbFamily::SecondStage, did, None, addr, am)
                    }
                }
            }
            Descriptor::PasidIotlb { did, pasid, range } => {
                let mut caches = self.caches_for_invalidation();
                match range {
                    None => {
                        caches
                            .iotlb
                            .invalidate_domain(IotlbFamily::FirstStage, did, Some(pasid))
                    }
                    Some((addr, am)) => caches.iotlb.invalidate_range(
                        IotlbFamily::FirstStage,
                        did,
                        Some(pasid),
                        addr,
                        am,
                    ),
                }
            }
            Descriptor::PasidCache(scope) => {
                self.caches_for_invalidation().pasid.invalidate(scope);
                self.notify_pasid_observers(scope);
            }
            Descriptor::DeviceTlb {
                sid,
                pfsid,
                address,
                size,
            } => self.forward_device_tlb(DeviceTlbInvalidation {
                source_id: PciAddress::from_rid(sid),
                pf_source_id: PciAddress::from_rid(pfsid),
                pasid: None,
                global: false,
                address,
                size,
            }),
            Descriptor::PasidDeviceTlb {
                sid,
                pfsid,
                pasid,
                global,
                address,
                size,
            } => self.forward_device_tlb(DeviceTlbInvalidation {
                source_id: PciAddress::from_rid(sid),
                pf_source_id: PciAddress::from_rid(pfsid),
                pasid: Some(pasid),
                global,
                address,
                size,
            }),
            Descriptor::PageGroupResponse(response) => match self.device(response.requester_id) {
                Some(device) => device.page_group_response(&response),
                None => debug!(
                    "viommu: page group response for unregistered device {}",
                    response.requester_id
                ),
            },
            Descriptor::InterruptEntryCache => {}
            Descriptor::Wait {
                interrupt,
                status_write,
                status_data,
                status_addr,
                ..
            } => {
                if status_write
                    && mem
                        .write_obj(status_data, GuestAddress(status_addr))
                        .is_err()
                {
                    warn!("viommu: wait descriptor status address {status_addr:#x} is not RAM");
                }
                if interrupt {
                    let mut regs = lock(&self.regs);
                    if regs.ics & ics::IWC == 0 {
                        regs.ics |= ics::IWC;
                        return regs.inv_event.raise();
                    }
                }
            }
        }
        None
    }

    fn forward_device_tlb(&self, invalidation: DeviceTlbInvalidation) {
        match self.device(invalidation.source_id) {
            Some(device) => device.invalidate_device_tlb(&invalidation),
            None => debug!(
                "viommu: device-TLB invalidation for unregistered device {}",
                invalidation.source_id
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Descriptors as Linux's iommu.h macros build them.
    #[test]
    fn decodes_what_linux_sends() {
        // qi_flush_context: device-selective, DID 0, SID 0x0810, FM 0.
        let cc = 1 | (3 << 4) | (0x0810u64 << 32);
        assert_eq!(
            Descriptor::decode([cc, 0, 0, 0], true),
            Ok(Descriptor::ContextCache(ContextScope::Device {
                sid: 0x0810,
                function_mask: 0
            }))
        );
        // qi_flush_piotlb page-selective: DID 1, PASID 5, addr 0x7f00_0000_0000, AM 2, IH.
        let p = 6 | (3 << 4) | (1 << 16) | (5u64 << 32);
        assert_eq!(
            Descriptor::decode([p, 0x7f00_0000_0000 | (1 << 6) | 2, 0, 0], true),
            Ok(Descriptor::PasidIotlb {
                did: 1,
                pasid: 5,
                range: Some((0x7f00_0000_0000, 2))
            })
        );
        // PASID-cache PASID-selective.
        let pc = 7 | (1 << 4) | (1 << 16) | (5u64 << 32);
        assert_eq!(
            Descriptor::decode([pc, 0, 0, 0], true),
            Ok(Descriptor::PasidCache(PasidCacheScope::Pasid {
                did: 1,
                pasid: 5
            }))
        );
        // Wait with SW+FN, status data QI_DONE=2.
        let w = 5 | (1 << 5) | (1 << 6) | (2u64 << 32);
        assert_eq!(
            Descriptor::decode([w, 0x1234_5678, 0, 0], true),
            Ok(Descriptor::Wait {
                interrupt: false,
                status_write: true,
                fence: true,
                drain: false,
                status_data: 2,
                status_addr: 0x1234_5678
            })
        );
        // PASID-based device TLB, SID 0x0810, PASID 5, 2 MiB at 0x40_0000 (S=1).
        let pd = 8 | (0x0810u64 << 16) | (5u64 << 32) | (0x1f << 4);
        assert_eq!(
            Descriptor::decode([pd, 0x4f_f000 | (1 << 11), 0, 0], true),
            Ok(Descriptor::PasidDeviceTlb {
                sid: 0x0810,
                pfsid: 0,
                pasid: 5,
                global: false,
                address: 0x40_0000,
                size: 0x20_0000
            })
        );
        // Page group response: success for RID 0x0810, PASID 5, PRG 0x1ab, LPIG.
        let r = 9 | (1 << 4) | (0x0810u64 << 16) | (5u64 << 32);
        let Ok(Descriptor::PageGroupResponse(resp)) =
            Descriptor::decode([r, (0x1ab << 3) | (1 << 2), 0, 0], true)
        else {
            panic!("not a page group response");
        };
        assert_eq!(
            (resp.requester_id, resp.pasid, resp.prg_index, resp.code),
            (
                PciAddress::from_rid(0x0810),
                Some(5),
                0x1ab,
                ResponseCode::Success
            )
        );
    }

    #[test]
    fn bad_descriptors_give_their_iqei() {
        let cases: [([u64; 4], bool, QueueError); 8] = [
            ([0, 0, 0, 0], true, QueueError::InvalidType),
            ([0xa, 0, 0, 0], true, QueueError::InvalidType),
            ([1 << 9 | 1, 0, 0, 0], true, QueueError::InvalidType),
            ([1, 0, 0, 0], true, QueueError::ReservedField), // context cache G=0
            (
                [2 | (1 << 4), 1 << 8, 0, 0],
                true,
                QueueError::ReservedField,
            ),
            ([5, 0, 1, 0], true, QueueError::ReservedField),
            ([6 | (1 << 4), 0, 0, 0], true, QueueError::ReservedField), // P_IOTLB G=1
            ([6 | (2 << 4), 0, 0, 0], false, QueueError::InvalidWidth),
        ];
        for (qw, wide, err) in cases {
            assert_eq!(Descriptor::decode(qw, wide), Err(err), "{qw:x?}");
        }
        // In a 128-bit queue the upper quadwords are not part of the descriptor.
        assert!(Descriptor::decode([5, 0, 1, 1], false).is_ok());
    }

    #[test]
    fn queue_wraps_and_checks_the_tail() {
        let mut q = InvalidationQueue {
            iqa: 0x10_0000 | iqa::DW,
            enabled: true,
            ..Default::default()
        };
        assert_eq!(q.size(), 0x1000);
        assert_eq!(q.set_tail(0x10), Err(QueueError::TailMisaligned));
        assert_eq!(q.next(), None);
        q.head = 0xfe0;
        q.set_tail(0x20).unwrap();
        assert_eq!(q.next(), Some((0x10_0fe0, true)));
        q.advance();
        assert_eq!(q.head, 0);
        assert_eq!(q.next(), Some((0x10_0000, true)));
        q.advance();
        assert_eq!(q.next(), None);
        assert_eq!(q.set_tail(0x2000), Err(QueueError::InvalidTail));
    }
}
