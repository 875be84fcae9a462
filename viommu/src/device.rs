// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! The device side of the unit: request tags, results, and the callbacks through which the
//! unit reaches devices (device-TLB invalidations, page group responses) and the VMM (PASID
//! cache invalidations).

use pci::PciAddress;

use crate::cache::PasidCacheScope;
use crate::fault::FaultReason;

/// The PASID TLP prefix of a request-with-PASID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PasidTag {
    /// 20-bit PASID.
    pub pasid: u32,
    /// Privileged-mode-requested (supervisor request).
    pub privileged: bool,
}

/// Why a DMA request was not translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaFault {
    /// A remapping fault. `recorded` is false when fault processing was disabled (FPD) on
    /// the path, so no fault record was attempted.
    #[error("remapping fault {reason:?} ({:#x})", reason.code())]
    Translation {
        /// Architectural fault reason.
        reason: FaultReason,
        /// A fault record was attempted (it may still have been dropped by PFO).
        recorded: bool,
    },
    /// The request was blocked without a fault: a request-with-PASID while translation is
    /// disabled, or remapping in legacy mode, which this model does not implement.
    #[error("request blocked (translation disabled for PASID requests, or legacy mode)")]
    Blocked,
}

/// A DMA through translation stopped part-way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DMA stopped at {address:#x} after {completed} bytes: {kind}")]
pub struct DmaError {
    /// Bytes transferred before the failure.
    pub completed: usize,
    /// Input (I/O virtual) address that failed.
    pub address: u64,
    /// What failed.
    pub kind: DmaErrorKind,
}

/// A memory-to-memory DMA copy stopped part-way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DMA copy {}: {error}", if *.write { "write" } else { "read" })]
pub struct CopyError {
    /// Where and why; `completed` counts bytes written to the destination.
    pub error: DmaError,
    /// The failing access was the write to the destination.
    pub write: bool,
}

/// Cause of a [`DmaError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DmaErrorKind {
    /// Translation failed.
    #[error("{0}")]
    Fault(DmaFault),
    /// The translated address is not guest RAM (the bus would answer with an error).
    #[error("translated address {phys_addr:#x} is not guest memory")]
    Memory {
        /// The translated address.
        phys_addr: u64,
    },
}

/// The answer to an ATS translation request: a translation the device may cache in its
/// device TLB until the unit invalidates it. `read == write == false` means "no
/// translation" (the device may then issue a page request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AtsCompletion {
    /// Translated address (base of the translated range).
    pub translated_addr: u64,
    /// Size of the translated range (a power of two, at least 4 KiB).
    pub size: u64,
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed (for first-stage translations only once the page is dirty).
    pub write: bool,
    /// Execute allowed.
    pub execute: bool,
    /// The translation is for privileged requests.
    pub privileged: bool,
}

/// ATS translation request failures the device sees as an error completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AtsError {
    /// Unsupported Request completion; a fault was recorded unless FPD.
    #[error("unsupported request: {0:?}")]
    UnsupportedRequest(FaultReason),
    /// Translation disabled or legacy mode: no translation service.
    #[error("translation service not available")]
    Blocked,
}

/// A device-TLB invalidation request forwarded to the device (from a device-TLB or a
/// PASID-based device-TLB invalidate descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceTlbInvalidation {
    /// The device whose TLB is invalidated (the descriptor's SID).
    pub source_id: PciAddress,
    /// Physical function source ID (for VFs; reported as written).
    pub pf_source_id: PciAddress,
    /// PASID for a PASID-based invalidation; `None` for translations without PASID.
    pub pasid: Option<u32>,
    /// PASID-based only: also invalidate global translations (G bit).
    pub global: bool,
    /// Start of the invalidated range.
    pub address: u64,
    /// Length of the invalidated range (`u64::MAX` for the whole address space).
    pub size: u64,
}

impl DeviceTlbInvalidation {
    /// Whether `addr` falls in the invalidated range.
    pub fn covers(&self, addr: u64) -> bool {
        addr >= self.address && addr - self.address < self.size
    }
}

/// Decode the ATS invalidation address/size encoding: with S=0 one 4 KiB page; with S=1 the
/// number of trailing ones above bit 12 gives the size (ones=0: 8 KiB, 1: 16 KiB, ...).
pub fn decode_invalidation_range(addr: u64, size_bit: bool) -> (u64, u64) {
    let page = addr & !0xfff;
    if !size_bit {
        return (page, 0x1000);
    }
    let ones = (addr >> 12).trailing_ones();
    if ones >= 51 {
        return (0, u64::MAX);
    }
    let size = 1u64 << (12 + ones + 1);
    (page & !(size - 1), size)
}

/// Page group response codes (PCIe PRG Response Message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseCode {
    /// Pages made resident: retry the translation.
    Success,
    /// Invalid request: the device must not retry.
    InvalidRequest,
    /// Response failure: disable the PRI.
    Failure,
    /// A reserved code, passed through as written.
    Reserved(u8),
}

impl ResponseCode {
    /// Decode the 4-bit field.
    pub fn from_bits(v: u8) -> Self {
        match v & 0xf {
            0 => ResponseCode::Success,
            1 => ResponseCode::InvalidRequest,
            0xf => ResponseCode::Failure,
            other => ResponseCode::Reserved(other),
        }
    }

    /// Encode as the 4-bit field.
    pub fn bits(self) -> u8 {
        match self {
            ResponseCode::Success => 0,
            ResponseCode::InvalidRequest => 1,
            ResponseCode::Failure => 0xf,
            ResponseCode::Reserved(v) => v & 0xf,
        }
    }
}

/// A page group response for a device's page request group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageGroupResponse {
    /// The device.
    pub requester_id: PciAddress,
    /// PASID of the group, if the response carries one.
    pub pasid: Option<u32>,
    /// Page request group index.
    pub prg_index: u16,
    /// Response code.
    pub code: ResponseCode,
    /// Private data echoed from the request, if present.
    pub private_data: Option<[u64; 2]>,
    /// Generated by the unit itself (page request queue overflow or a request the unit
    /// refused), not by software.
    pub from_hardware: bool,
}

/// A device behind the unit that uses ATS/PRI. Register it with
/// [`Iommu::register_device`](crate::Iommu::register_device) under its requester ID.
///
/// Callbacks run on the thread that processed the guest's invalidation queue (a vCPU MMIO
/// exit) or posted the page request. They must not write the unit's registers; they may call
/// its translation functions.
pub trait AtsDevice: Send + Sync {
    /// Drop cached translations in the invalidated range. The unit treats the invalidation
    /// as complete when this returns.
    fn invalidate_device_tlb(&self, invalidation: &DeviceTlbInvalidation);

    /// Software answered a page request group.
    fn page_group_response(&self, response: &PageGroupResponse);
}

/// Observer of PASID-cache invalidations (the guest tore down or changed PASID entries).
pub trait PasidObserver: Send + Sync {
    /// A PASID-cache invalidation was executed with this scope.
    fn pasid_cache_invalidated(&self, scope: PasidCacheScope);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalidation_size_encoding() {
        assert_eq!(
            decode_invalidation_range(0x1234_5678, false),
            (0x1234_5000, 0x1000)
        );
        // Bit 12 clear with S=1: 8 KiB.
        assert_eq!(
            decode_invalidation_range(0x1234_4000, true),
            (0x1234_4000, 0x2000)
        );
        // Linux encodes 2 MiB at 0x40_0000 as addr | (1 << 20) - 1 >> 12 << 12 ... i.e. bits 19:12 set.
        assert_eq!(
            decode_invalidation_range(0x40_0000 | 0xf_f000, true),
            (0x40_0000, 0x20_0000)
        );
        assert_eq!(decode_invalidation_range(!0u64 >> 1, true), (0, u64::MAX));
        let inv = DeviceTlbInvalidation {
            source_id: PciAddress::default(),
            pf_source_id: PciAddress::default(),
            pasid: None,
            global: false,
            address: 0x40_0000,
            size: 0x20_0000,
        };
        assert!(inv.covers(0x5f_ffff) && !inv.covers(0x60_0000) && !inv.covers(0x3f_ffff));
    }

    #[test]
    fn response_codes_round_trip() {
        for v in 0..16u8 {
            assert_eq!(ResponseCode::from_bits(v).bits(), v);
        }
    }
}
