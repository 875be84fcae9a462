// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Remapping-unit register offsets and bit fields (VT-d spec chapter 11).
//!
//! Offsets are within the unit's 4 KiB MMIO window. Multi-bit fields get small accessor
//! functions; single bits are `const` masks named as in the specification.

/// Size of the register window.
pub const REG_WINDOW_SIZE: u64 = 0x1000;

/// Version register (32-bit, RO).
pub const VER: u64 = 0x00;
/// Capability register (64-bit, RO).
pub const CAP: u64 = 0x08;
/// Extended capability register (64-bit, RO).
pub const ECAP: u64 = 0x10;
/// Global command register (32-bit, WO).
pub const GCMD: u64 = 0x18;
/// Global status register (32-bit, RO).
pub const GSTS: u64 = 0x1c;
/// Root table address register (64-bit).
pub const RTADDR: u64 = 0x20;
/// Context command register (64-bit).
pub const CCMD: u64 = 0x28;
/// Fault status register (32-bit).
pub const FSTS: u64 = 0x34;
/// Fault event control register (32-bit).
pub const FECTL: u64 = 0x38;
/// Fault event data register (32-bit).
pub const FEDATA: u64 = 0x3c;
/// Fault event address register (32-bit).
pub const FEADDR: u64 = 0x40;
/// Fault event upper address register (32-bit).
pub const FEUADDR: u64 = 0x44;
/// Advanced fault log register (64-bit; advanced fault logging is not supported: reads 0).
pub const AFLOG: u64 = 0x58;
/// Protected memory enable register (32-bit; PLMR/PHMR not supported: reads 0).
pub const PMEN: u64 = 0x64;
/// Invalidation queue head (64-bit, RO).
pub const IQH: u64 = 0x80;
/// Invalidation queue tail (64-bit).
pub const IQT: u64 = 0x88;
/// Invalidation queue address (64-bit).
pub const IQA: u64 = 0x90;
/// Invalidation completion status (32-bit).
pub const ICS: u64 = 0x9c;
/// Invalidation completion event control (32-bit).
pub const IECTL: u64 = 0xa0;
/// Invalidation completion event data (32-bit).
pub const IEDATA: u64 = 0xa4;
/// Invalidation completion event address (32-bit).
pub const IEADDR: u64 = 0xa8;
/// Invalidation completion event upper address (32-bit).
pub const IEUADDR: u64 = 0xac;
/// Invalidation queue error record (64-bit, RO).
pub const IQERCD: u64 = 0xb0;
/// Interrupt remapping table address (64-bit; interrupt remapping not supported: reads 0).
pub const IRTA: u64 = 0xb8;
/// Page request queue head (64-bit).
pub const PQH: u64 = 0xc0;
/// Page request queue tail (64-bit, RO for software).
pub const PQT: u64 = 0xc8;
/// Page request queue address (64-bit).
pub const PQA: u64 = 0xd0;
/// Page request status (32-bit).
pub const PRS: u64 = 0xdc;
/// Page request event control (32-bit).
pub const PECTL: u64 = 0xe0;
/// Page request event data (32-bit).
pub const PEDATA: u64 = 0xe4;
/// Page request event address (32-bit).
pub const PEADDR: u64 = 0xe8;
/// Page request event upper address (32-bit).
pub const PEUADDR: u64 = 0xec;

/// Fault-recording registers start at `CAP.FRO * 16`.
pub const FRCD_BASE: u64 = 0x400;
/// Number of fault-recording registers (CAP.NFR + 1).
pub const NUM_FAULT_RECORDS: usize = 8;
/// Size of one fault-recording register.
pub const FRCD_SIZE: u64 = 16;
/// IOTLB registers start at `ECAP.IRO * 16`: IVA, then IOTLB at +8.
pub const IOTLB_REG_BASE: u64 = 0x500;
/// Invalidate address register.
pub const IVA: u64 = IOTLB_REG_BASE;
/// IOTLB invalidate register.
pub const IOTLB_REG: u64 = IOTLB_REG_BASE + 8;

/// VER value: major 3, minor 0 (scalable mode arrived with VT-d 3.0).
pub const VERSION: u32 = 0x30;

/// Host address width implemented (bits of guest physical address).
pub const HOST_ADDRESS_WIDTH: u8 = 48;

/// CAP register bits.
pub mod cap {
    /// ND: number of domains = 2^(4 + 2*ND). 6 gives the full 16-bit DID space.
    pub const fn nd(n: u64) -> u64 {
        n & 0x7
    }
    /// RWBF: write-buffer flushing required.
    pub const RWBF: u64 = 1 << 4;
    /// CM: caching mode (not-present entries may be cached).
    pub const CM: u64 = 1 << 7;
    /// SAGAW field: bit 2 = 48-bit (4-level), bit 3 = 57-bit (5-level) second stage.
    pub const fn sagaw(bits: u64) -> u64 {
        (bits & 0x1f) << 8
    }
    /// SAGAW value for 4-level second-stage tables.
    pub const SAGAW_4_LEVEL: u64 = 1 << 2;
    /// MGAW field (maximum guest address width minus one).
    pub const fn mgaw(width_minus_one: u64) -> u64 {
        (width_minus_one & 0x3f) << 16
    }
    /// FRO field (fault-recording register offset / 16).
    pub const fn fro(offset: u64) -> u64 {
        ((offset / 16) & 0x3ff) << 24
    }
    /// SLLPS field: bit 0 = 2 MiB, bit 1 = 1 GiB second-stage pages.
    pub const fn sllps(bits: u64) -> u64 {
        (bits & 0xf) << 34
    }
    /// PSI: page-selective invalidation.
    pub const PSI: u64 = 1 << 39;
    /// NFR field (number of fault-recording registers minus one).
    pub const fn nfr(count: u64) -> u64 {
        ((count - 1) & 0xff) << 40
    }
    /// MAMV field (maximum address-mask value for page-selective invalidation).
    pub const fn mamv(v: u64) -> u64 {
        (v & 0x3f) << 48
    }
    /// DWD: write draining.
    pub const DWD: u64 = 1 << 54;
    /// DRD: read draining.
    pub const DRD: u64 = 1 << 55;
    /// FL1GP: first-stage 1 GiB pages.
    pub const FL1GP: u64 = 1 << 56;
    /// FL5LP: first-stage 5-level paging.
    pub const FL5LP: u64 = 1 << 60;
    /// ESRTPS: SRTP also invalidates all caches.
    pub const ESRTPS: u64 = 1 << 63;
}

/// ECAP register bits.
pub mod ecap {
    /// C: page-walk coherency (legacy mode).
    pub const C: u64 = 1 << 0;
    /// QI: queued invalidation.
    pub const QI: u64 = 1 << 1;
    /// DT: device-TLB (ATS).
    pub const DT: u64 = 1 << 2;
    /// IR: interrupt remapping.
    pub const IR: u64 = 1 << 3;
    /// PT: pass-through translation type.
    pub const PT: u64 = 1 << 6;
    /// IRO field (IOTLB register offset / 16).
    pub const fn iro(offset: u64) -> u64 {
        ((offset / 16) & 0x3ff) << 8
    }
    /// NEST: nested translation.
    pub const NEST: u64 = 1 << 26;
    /// PRS: page requests.
    pub const PRS: u64 = 1 << 29;
    /// ERS: execute requests.
    pub const ERS: u64 = 1 << 30;
    /// SRS: supervisor (privileged) requests.
    pub const SRS: u64 = 1 << 31;
    /// PSS field: PASID width minus one.
    pub const fn pss(bits_minus_one: u64) -> u64 {
        (bits_minus_one & 0x1f) << 35
    }
    /// PASID: requests with PASID.
    pub const PASID: u64 = 1 << 40;
    /// PDS: page-request drain.
    pub const PDS: u64 = 1 << 42;
    /// SMTS: scalable-mode translation.
    pub const SMTS: u64 = 1 << 43;
    /// SLADS: second-stage accessed/dirty.
    pub const SLADS: u64 = 1 << 45;
    /// SLTS: second-stage translation.
    pub const SLTS: u64 = 1 << 46;
    /// FLTS: first-stage translation.
    pub const FLTS: u64 = 1 << 47;
    /// SMPWC: scalable-mode page-walk coherency.
    pub const SMPWC: u64 = 1 << 48;
    /// RPS: RID_PASID field of the context entry honoured.
    pub const RPS: u64 = 1 << 49;
}

/// The CAP value this model advertises.
pub const CAP_VALUE: u64 = cap::nd(6)
    | cap::sagaw(cap::SAGAW_4_LEVEL)
    | cap::mgaw(HOST_ADDRESS_WIDTH as u64 - 1)
    | cap::fro(FRCD_BASE)
    | cap::sllps(0b11)
    | cap::PSI
    | cap::nfr(NUM_FAULT_RECORDS as u64)
    | cap::mamv(18)
    | cap::DWD
    | cap::DRD
    | cap::FL1GP
    | cap::FL5LP;

/// Bits of the PASID supported (ECAP.PSS + 1): all of them.
pub const PASID_BITS: u32 = pasid::PASID_BITS;

/// The ECAP value this model advertises.
pub const ECAP_VALUE: u64 = ecap::C
    | ecap::QI
    | ecap::DT
    | ecap::PT
    | ecap::iro(IOTLB_REG_BASE)
    | ecap::NEST
    | ecap::PRS
    | ecap::SRS
    | ecap::pss(PASID_BITS as u64 - 1)
    | ecap::PASID
    | ecap::PDS
    | ecap::SMTS
    | ecap::SLTS
    | ecap::FLTS
    | ecap::SMPWC
    | ecap::RPS;

/// GCMD and GSTS bits (the same positions: a command bit and its status bit).
pub mod gcmd {
    /// TE / TES: translation enable.
    pub const TE: u32 = 1 << 31;
    /// SRTP / RTPS: set root table pointer.
    pub const SRTP: u32 = 1 << 30;
    /// SFL / FLS: set fault log (advanced fault logging).
    pub const SFL: u32 = 1 << 29;
    /// EAFL / AFLS: enable advanced fault logging.
    pub const EAFL: u32 = 1 << 28;
    /// WBF / WBFS: write-buffer flush.
    pub const WBF: u32 = 1 << 27;
    /// QIE / QIES: queued invalidation enable.
    pub const QIE: u32 = 1 << 26;
    /// IRE / IRES: interrupt remapping enable.
    pub const IRE: u32 = 1 << 25;
    /// SIRTP / IRTPS: set interrupt remap table pointer.
    pub const SIRTP: u32 = 1 << 24;
    /// CFI / CFIS: compatibility format interrupts.
    pub const CFI: u32 = 1 << 23;
}

/// RTADDR fields.
pub mod rtaddr {
    /// Root table address (bits 63:12).
    pub const RTA_MASK: u64 = !0xfff;
    /// Translation table mode field (bits 11:10).
    pub fn ttm(v: u64) -> u64 {
        (v >> 10) & 3
    }
    /// TTM value for legacy mode.
    pub const TTM_LEGACY: u64 = 0;
    /// TTM value for scalable mode.
    pub const TTM_SCALABLE: u64 = 1;
    /// Bits software can write.
    pub const WRITABLE: u64 = !0x3ff;
}

/// CCMD fields.
pub mod ccmd {
    /// ICC: invalidate context cache (set by software, cleared on completion).
    pub const ICC: u64 = 1 << 63;
    /// CIRG: requested granularity (1 global, 2 domain, 3 device).
    pub fn cirg(v: u64) -> u64 {
        (v >> 61) & 3
    }
    /// CAIG: actual granularity reported back.
    pub fn caig(granularity: u64) -> u64 {
        (granularity & 3) << 59
    }
    /// DID field.
    pub fn did(v: u64) -> u16 {
        v as u16
    }
    /// SID field.
    pub fn sid(v: u64) -> u16 {
        (v >> 16) as u16
    }
    /// FM field.
    pub fn fm(v: u64) -> u8 {
        ((v >> 32) & 3) as u8
    }
    /// Bits software can write.
    pub const WRITABLE: u64 = 0xffff_ffff | (3 << 32) | (3 << 61) | ICC;
}

/// IOTLB invalidate register fields.
pub mod iotlb_reg {
    /// IVT: invalidate IOTLB (cleared on completion).
    pub const IVT: u64 = 1 << 63;
    /// IIRG: requested granularity (1 global, 2 domain, 3 page).
    pub fn iirg(v: u64) -> u64 {
        (v >> 60) & 3
    }
    /// IAIG: actual granularity.
    pub fn iaig(granularity: u64) -> u64 {
        (granularity & 3) << 57
    }
    /// DID field.
    pub fn did(v: u64) -> u16 {
        (v >> 32) as u16
    }
    /// Bits software can write.
    pub const WRITABLE: u64 = (0xffff << 32) | (3 << 48) | (3 << 60) | IVT;
}

/// IVA fields.
pub mod iva {
    /// Address mask (number of low page-number bits ignored).
    pub fn am(v: u64) -> u8 {
        (v & 0x3f) as u8
    }
    /// Page address.
    pub fn addr(v: u64) -> u64 {
        v & !0xfff
    }
    /// Bits software can write.
    pub const WRITABLE: u64 = !0xf80;
}

/// FSTS bits.
pub mod fsts {
    /// PFO: primary fault overflow (RW1C).
    pub const PFO: u32 = 1 << 0;
    /// PPF: primary pending fault (RO: some record has F=1).
    pub const PPF: u32 = 1 << 1;
    /// IQE: invalidation queue error (RW1C).
    pub const IQE: u32 = 1 << 4;
    /// ICE: invalidation completion error (RW1C).
    pub const ICE: u32 = 1 << 5;
    /// ITE: invalidation time-out error (RW1C).
    pub const ITE: u32 = 1 << 6;
    /// FRI: fault record index field.
    pub fn fri(index: usize) -> u32 {
        ((index as u32) & 0xff) << 8
    }
    /// Bits cleared by writing 1.
    pub const RW1C: u32 = PFO | IQE | ICE | ITE;
}

/// Event control register bits (FECTL, IECTL, PECTL).
pub mod ectl {
    /// IM: interrupt mask.
    pub const IM: u32 = 1 << 31;
    /// IP: interrupt pending (RO).
    pub const IP: u32 = 1 << 30;
}

/// IQA fields.
pub mod iqa {
    /// Queue base (bits 63:12).
    pub const BASE_MASK: u64 = !0xfff;
    /// DW: 256-bit descriptors.
    pub const DW: u64 = 1 << 11;
    /// QS: queue size is 4 KiB << QS.
    pub fn qs(v: u64) -> u64 {
        v & 7
    }
    /// Bits software can write.
    pub const WRITABLE: u64 = BASE_MASK | DW | 7;
}

/// IQH/IQT field: byte offset of a descriptor (bits 18:4).
pub const IQ_OFFSET_MASK: u64 = 0x7fff0;

/// ICS bits.
pub mod ics {
    /// IWC: invalidation wait descriptor complete (RW1C).
    pub const IWC: u32 = 1 << 0;
}

/// IQERCD fields.
pub mod iqercd {
    /// IQEI field (bits 3:0).
    pub fn iqei(code: u8) -> u64 {
        u64::from(code & 0xf)
    }
}

/// PQH/PQT field: byte offset of a 32-byte page request descriptor (bits 18:5).
pub const PQ_OFFSET_MASK: u64 = 0x7ffe0;

/// PQA fields.
pub mod pqa {
    /// Queue base (bits 63:12).
    pub const BASE_MASK: u64 = !0xfff;
    /// PQS: queue size is 4 KiB << PQS.
    pub fn pqs(v: u64) -> u64 {
        v & 7
    }
    /// Bits software can write.
    pub const WRITABLE: u64 = BASE_MASK | 7;
}

/// PRS bits.
pub mod prs {
    /// PPR: pending page request (RW1C).
    pub const PPR: u32 = 1 << 0;
    /// PRO: page request overflow (RW1C).
    pub const PRO: u32 = 1 << 1;
}

/// Event data registers: bits 15:0 (interrupt message data) are writable.
pub const EDATA_WRITABLE: u32 = 0xffff;
/// Event address registers: bits 31:2 are writable.
pub const EADDR_WRITABLE: u32 = !3;

// The fault-recording and IOTLB registers fit the 4 KiB window Linux maps, without overlap.
const _: () = assert!(FRCD_BASE + NUM_FAULT_RECORDS as u64 * FRCD_SIZE <= IOTLB_REG_BASE);
const _: () = assert!(IOTLB_REG + 8 <= REG_WINDOW_SIZE);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_match_what_linux_needs_for_sva() {
        // Field positions cross-checked against the bit layout the Linux driver decodes.
        assert_eq!(CAP_VALUE & 7, 6, "ND");
        assert_eq!((CAP_VALUE >> 8) & 0x1f, 0b100, "SAGAW 4-level");
        assert_eq!((CAP_VALUE >> 16) & 0x3f, 47, "MGAW");
        assert_eq!(((CAP_VALUE >> 24) & 0x3ff) * 16, FRCD_BASE, "FRO");
        assert_eq!(
            ((CAP_VALUE >> 40) & 0xff) + 1,
            NUM_FAULT_RECORDS as u64,
            "NFR"
        );
        assert_ne!(CAP_VALUE & (1 << 56), 0, "FL1GP");
        assert_eq!(CAP_VALUE & (1 << 7), 0, "CM");
        assert_eq!(CAP_VALUE & (1 << 4), 0, "RWBF");
        assert_eq!(((ECAP_VALUE >> 8) & 0x3ff) * 16, IOTLB_REG_BASE, "IRO");
        assert_eq!((ECAP_VALUE >> 35) & 0x1f, 19, "PSS");
        for (bit, name) in [
            (1, "QI"),
            (2, "DT"),
            (29, "PRS"),
            (31, "SRS"),
            (40, "PASID"),
            (42, "PDS"),
            (43, "SMTS"),
            (47, "FLTS"),
            (48, "SMPWC"),
        ] {
            assert_ne!(ECAP_VALUE & (1 << bit), 0, "{name}");
        }
        // No virtual command interface (keeps 6.1 from switching PASID allocation).
        assert_eq!(ECAP_VALUE & (1 << 44), 0, "VCS");
    }
}
