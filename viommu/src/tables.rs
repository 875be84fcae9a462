// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Scalable-mode translation structures in guest memory (VT-d 9.2, 9.4, 9.5, 9.6): root
//! entries, context entries, PASID-directory entries and PASID-table entries.
//!
//! Each entry is read as raw quadwords and decoded into a typed struct; a malformed entry
//! yields the architectural fault reason together with the entry's fault-processing-disable
//! (FPD) bit, so the caller knows whether to record the fault.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::fault::FaultReason;
use crate::paging::PagingLevels;
use crate::regs::HOST_ADDRESS_WIDTH;

/// A fault found while reading translation structures, with the FPD state that governs
/// whether it is recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableFault {
    /// The fault reason.
    pub reason: FaultReason,
    /// Fault processing disabled by an entry on the path (context, PASID directory or PASID
    /// table entry): the request is blocked but no fault is recorded.
    pub fpd: bool,
}

impl TableFault {
    /// A fault with FPD clear.
    pub fn new(reason: FaultReason) -> Self {
        TableFault { reason, fpd: false }
    }

    /// Same fault, with FPD if `fpd` is set.
    pub fn with_fpd(self, fpd: bool) -> Self {
        TableFault {
            reason: self.reason,
            fpd: self.fpd || fpd,
        }
    }
}

impl From<FaultReason> for TableFault {
    fn from(reason: FaultReason) -> Self {
        TableFault::new(reason)
    }
}

/// Bits 63:12 of a table pointer.
const POINTER_MASK: u64 = !0xfff;

/// Pointer bits at or above the host address width (reserved in every structure).
fn beyond_haw(pointer: u64) -> bool {
    pointer & POINTER_MASK & !((1u64 << HOST_ADDRESS_WIDTH) - 1) != 0
}

/// Read `N` little-endian quadwords.
fn read_qwords<M: GuestMemory + ?Sized, const N: usize>(mem: &M, addr: u64) -> Option<[u64; N]>
where
    [u64; N]: vm_memory::ByteValued,
{
    mem.read_obj::<[u64; N]>(GuestAddress(addr)).ok()
}

/// Scalable-mode root entry (128-bit, one per bus): the lower half points at the context
/// table for devfn 0-127, the upper half at the one for devfn 128-255.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootEntry {
    /// Raw quadwords (lower, upper).
    pub raw: [u64; 2],
}

impl RootEntry {
    /// Size of a root entry in bytes.
    pub const SIZE: u64 = 16;

    /// Read the root entry for `bus` from the root table at `root_table`.
    pub fn read<M: GuestMemory + ?Sized>(
        mem: &M,
        root_table: u64,
        bus: u8,
    ) -> Result<Self, TableFault> {
        read_qwords::<M, 2>(
            mem,
            (root_table & POINTER_MASK) + u64::from(bus) * Self::SIZE,
        )
        .map(|raw| RootEntry { raw })
        .ok_or(FaultReason::RootEntryAccess.into())
    }

    /// Context table that holds `devfn`'s context entry.
    pub fn context_table(&self, devfn: u8) -> Result<u64, TableFault> {
        let half = self.raw[usize::from(devfn >= 0x80)];
        if half & 1 == 0 {
            return Err(FaultReason::RootEntryNotPresent.into());
        }
        if half & 0xffe != 0 || beyond_haw(half) {
            return Err(FaultReason::RootEntryReserved.into());
        }
        Ok(half & POINTER_MASK)
    }
}

/// Scalable-mode context entry (256-bit, 128 per table, indexed by devfn & 0x7f).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ContextEntry {
    /// FPD: fault processing disable.
    pub fpd: bool,
    /// DTE: device-TLB (ATS translation requests) enabled.
    pub dte: bool,
    /// PASIDE: requests with PASID enabled.
    pub paside: bool,
    /// PRE: page requests enabled.
    pub pre: bool,
    /// PDTS: the PASID directory has 2^(PDTS+7) entries.
    pub pdts: u8,
    /// PASID directory pointer.
    pub pasid_dir: u64,
    /// RID_PASID: PASID used for requests without PASID.
    pub rid_pasid: u32,
}

/// Context-entry bits.
pub mod context {
    /// P: present.
    pub const P: u64 = 1 << 0;
    /// FPD: fault processing disable.
    pub const FPD: u64 = 1 << 1;
    /// DTE: device-TLB enable.
    pub const DTE: u64 = 1 << 2;
    /// PASIDE: PASID enable.
    pub const PASIDE: u64 = 1 << 3;
    /// PRE: page request enable.
    pub const PRE: u64 = 1 << 4;
    /// Reserved bits 8:5 of the first quadword.
    pub const RESERVED_LO: u64 = 0xf << 5;
    /// PDTS field shift (bits 11:9).
    pub const PDTS_SHIFT: u32 = 9;
    /// Second quadword: RID_PASID (bits 19:0); bits 63:20 reserved (no RID_PRIV support).
    pub const RID_PASID_MASK: u64 = pasid::PASID_MASK as u64;
}

impl ContextEntry {
    /// Size of a scalable-mode context entry in bytes.
    pub const SIZE: u64 = 32;

    /// Read the context entry for `devfn` from `context_table`.
    pub fn read<M: GuestMemory + ?Sized>(
        mem: &M,
        context_table: u64,
        devfn: u8,
    ) -> Result<Self, TableFault> {
        let raw = read_qwords::<M, 4>(mem, context_table + u64::from(devfn & 0x7f) * Self::SIZE)
            .ok_or(TableFault::new(FaultReason::ContextEntryAccess))?;
        Self::decode(raw)
    }

    /// Decode and check a raw entry.
    pub fn decode(raw: [u64; 4]) -> Result<Self, TableFault> {
        let fpd = raw[0] & context::FPD != 0;
        let fault = |reason| Err(TableFault { reason, fpd });
        if raw[0] & context::P == 0 {
            return fault(FaultReason::ContextEntryNotPresent);
        }
        if raw[0] & context::RESERVED_LO != 0
            || beyond_haw(raw[0])
            || raw[1] & !context::RID_PASID_MASK != 0
            || raw[2] != 0
            || raw[3] != 0
        {
            return fault(FaultReason::ContextEntryReserved);
        }
        Ok(ContextEntry {
            fpd,
            dte: raw[0] & context::DTE != 0,
            paside: raw[0] & context::PASIDE != 0,
            pre: raw[0] & context::PRE != 0,
            pdts: ((raw[0] >> context::PDTS_SHIFT) & 7) as u8,
            pasid_dir: raw[0] & POINTER_MASK,
            rid_pasid: (raw[1] & context::RID_PASID_MASK) as u32,
        })
    }

    /// Number of PASIDs the PASID directory covers.
    pub fn max_pasids(&self) -> u64 {
        1u64 << (u32::from(self.pdts) + 7 + 6)
    }

    /// Find and decode the PASID-table entry for `pasid`. The returned entry's `fpd` includes
    /// the FPD bits of this context entry and of the PASID-directory entry.
    pub fn pasid_entry<M: GuestMemory + ?Sized>(
        &self,
        mem: &M,
        pasid: u32,
    ) -> Result<PasidEntry, TableFault> {
        if u64::from(pasid) >= self.max_pasids() {
            return Err(TableFault::new(FaultReason::PasidTooLarge).with_fpd(self.fpd));
        }
        let dir =
            PasidDirEntry::read(mem, self.pasid_dir, pasid).map_err(|f| f.with_fpd(self.fpd))?;
        let fpd = self.fpd || dir.fpd;
        PasidEntry::read(mem, dir.pasid_table, pasid)
            .map(|mut e| {
                e.fpd |= fpd;
                e
            })
            .map_err(|f| f.with_fpd(fpd))
    }
}

/// Scalable-mode PASID-directory entry (64-bit, indexed by PASID bits 19:6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasidDirEntry {
    /// FPD: fault processing disable.
    pub fpd: bool,
    /// Pointer to the PASID table (64 entries).
    pub pasid_table: u64,
}

impl PasidDirEntry {
    /// Read the directory entry for `pasid`.
    pub fn read<M: GuestMemory + ?Sized>(
        mem: &M,
        pasid_dir: u64,
        pasid: u32,
    ) -> Result<Self, TableFault> {
        let raw = read_qwords::<M, 1>(mem, pasid_dir + u64::from(pasid >> 6) * 8)
            .ok_or(TableFault::new(FaultReason::PasidDirAccess))?[0];
        let fpd = raw & 2 != 0;
        if raw & 1 == 0 {
            return Err(TableFault {
                reason: FaultReason::PasidDirNotPresent,
                fpd,
            });
        }
        if raw & 0xffc != 0 || beyond_haw(raw) {
            return Err(TableFault {
                reason: FaultReason::PasidDirReserved,
                fpd,
            });
        }
        Ok(PasidDirEntry {
            fpd,
            pasid_table: raw & POINTER_MASK,
        })
    }
}

/// PASID-granular translation type (PGTT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Pgtt {
    /// First-stage only (IA-32e tables at FLPTR).
    FirstStage,
    /// Second-stage only (VT-d second-stage tables at SLPTPTR).
    SecondStage,
    /// First stage nested on second stage.
    Nested,
    /// Pass-through: output address = input address.
    PassThrough,
}

/// PASID-table-entry bits (quadword index, bit).
pub mod pasid_entry {
    /// qw0: P.
    pub const P: u64 = 1 << 0;
    /// qw0: FPD.
    pub const FPD: u64 = 1 << 1;
    /// qw0: AW field shift (bits 4:2).
    pub const AW_SHIFT: u32 = 2;
    /// qw0: SLEE (second-stage execute enable).
    pub const SLEE: u64 = 1 << 5;
    /// qw0: PGTT field shift (bits 8:6).
    pub const PGTT_SHIFT: u32 = 6;
    /// qw0: SLADE (reserved: no second-stage A/D support) and bits 11:10.
    pub const RESERVED_QW0: u64 = 0x7 << 9;
    /// qw1: DID (bits 15:0).
    pub const DID_MASK: u64 = 0xffff;
    /// qw1: reserved bits 22:16 and the memory-type fields 63:25 (ECAP.MTS=0).
    pub const RESERVED_QW1: u64 = (0x7f << 16) | !((1u64 << 25) - 1);
    /// qw2: SRE.
    pub const SRE: u64 = 1 << 0;
    /// qw2: ERE (reserved: ECAP.ERS=0).
    pub const ERE: u64 = 1 << 1;
    /// qw2: FLPM field shift (bits 3:2).
    pub const FLPM_SHIFT: u32 = 2;
    /// qw2: WPE.
    pub const WPE: u64 = 1 << 4;
    /// qw2: NXE.
    pub const NXE: u64 = 1 << 5;
    /// qw2: EAFE (reserved: ECAP.EAFS=0) and bits 11:8.
    pub const RESERVED_QW2: u64 = (1 << 7) | (0xf << 8) | ERE;
}

/// Decoded scalable-mode PASID-table entry (512-bit, 64 per table, indexed by PASID bits 5:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasidEntry {
    /// FPD: fault processing disable.
    pub fpd: bool,
    /// Translation type.
    pub pgtt: Pgtt,
    /// Domain ID tagging cached translations.
    pub did: u16,
    /// Second-stage levels from AW (only 4-level is supported: AW=2).
    pub aw: u8,
    /// Second-stage page table pointer.
    pub slptptr: u64,
    /// Second-stage execute enable.
    pub slee: bool,
    /// Supervisor (privileged) requests allowed.
    pub sre: bool,
    /// First-stage paging mode (FLPM).
    pub flpm: PagingLevels,
    /// First-stage write protect for supervisor requests (WPE).
    pub wpe: bool,
    /// First-stage XD bits honoured (NXE).
    pub nxe: bool,
    /// First-stage page table pointer (a CR3-like PGD address).
    pub flptr: u64,
}

impl PasidEntry {
    /// Size of a PASID-table entry in bytes.
    pub const SIZE: u64 = 64;

    /// Read and decode the entry for `pasid` from `pasid_table`.
    pub fn read<M: GuestMemory + ?Sized>(
        mem: &M,
        pasid_table: u64,
        pasid: u32,
    ) -> Result<Self, TableFault> {
        let raw = read_qwords::<M, 8>(mem, pasid_table + u64::from(pasid & 0x3f) * Self::SIZE)
            .ok_or(TableFault::new(FaultReason::PasidEntryAccess))?;
        Self::decode(&raw)
    }

    /// Decode and check a raw entry. Quadwords 3-7 are not interpreted.
    pub fn decode(raw: &[u64; 8]) -> Result<Self, TableFault> {
        use pasid_entry::*;
        let fpd = raw[0] & FPD != 0;
        let fault = |reason| Err(TableFault { reason, fpd });
        if raw[0] & P == 0 {
            return fault(FaultReason::PasidEntryNotPresent);
        }
        if raw[0] & RESERVED_QW0 != 0 || raw[1] & RESERVED_QW1 != 0 || raw[2] & RESERVED_QW2 != 0 {
            return fault(FaultReason::PasidEntryReserved);
        }
        let pgtt = match (raw[0] >> PGTT_SHIFT) & 7 {
            1 => Pgtt::FirstStage,
            2 => Pgtt::SecondStage,
            3 => Pgtt::Nested,
            4 => Pgtt::PassThrough,
            _ => return fault(FaultReason::PasidEntryInvalid),
        };
        let flpm = match (raw[2] >> FLPM_SHIFT) & 3 {
            0 => PagingLevels::Four,
            1 => PagingLevels::Five,
            _ => return fault(FaultReason::PasidEntryReserved),
        };
        let aw = ((raw[0] >> AW_SHIFT) & 7) as u8;
        let uses_first = matches!(pgtt, Pgtt::FirstStage | Pgtt::Nested);
        let uses_second = matches!(pgtt, Pgtt::SecondStage | Pgtt::Nested);
        if (uses_first && beyond_haw(raw[2])) || (uses_second && beyond_haw(raw[0])) {
            return fault(FaultReason::PasidEntryReserved);
        }
        // Only 4-level (48-bit) second-stage tables are advertised in SAGAW.
        if uses_second && aw != 2 {
            return fault(FaultReason::PasidEntryInvalid);
        }
        Ok(PasidEntry {
            fpd,
            pgtt,
            did: (raw[1] & DID_MASK) as u16,
            aw,
            slptptr: raw[0] & POINTER_MASK,
            slee: raw[0] & SLEE != 0,
            sre: raw[2] & SRE != 0,
            flpm,
            wpe: raw[2] & WPE != 0,
            nxe: raw[2] & NXE != 0,
            flptr: raw[2] & POINTER_MASK,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_entry_fields_and_reserved_bits() {
        let ok = [0x1234_5000 | (7 << 9) | 0x1d, 5, 0, 0];
        let c = ContextEntry::decode(ok).unwrap();
        assert!(c.dte && c.paside && c.pre && !c.fpd);
        assert_eq!(c.pdts, 7);
        assert_eq!(c.max_pasids(), 1 << 20);
        assert_eq!(c.pasid_dir, 0x1234_5000);
        assert_eq!(c.rid_pasid, 5);
        for bad in [
            [ok[0] | 1 << 5, 0, 0, 0],
            [ok[0] | 1 << 50, 0, 0, 0],
            [ok[0], 1 << 20, 0, 0],
            [ok[0], 0, 1, 0],
            [ok[0], 0, 0, 1 << 63],
        ] {
            assert_eq!(
                ContextEntry::decode(bad),
                Err(TableFault::new(FaultReason::ContextEntryReserved)),
                "{bad:x?}"
            );
        }
        assert_eq!(
            ContextEntry::decode([2, 0, 0, 0]),
            Err(TableFault {
                reason: FaultReason::ContextEntryNotPresent,
                fpd: true
            })
        );
    }

    #[test]
    fn pasid_entry_as_linux_writes_it_for_sva() {
        // FLPTR=pgd, DID=1, AW=2, PWSNP, NXE, PGTT=1, P=1 (pasid.c intel_pasid_setup_first_level).
        let mut raw = [0u64; 8];
        raw[0] = (1 << 6) | (2 << 2) | 1;
        raw[1] = 1 | (1 << 23);
        raw[2] = 0x7654_3000 | (1 << 5);
        let e = PasidEntry::decode(&raw).unwrap();
        assert_eq!(e.pgtt, Pgtt::FirstStage);
        assert_eq!(e.did, 1);
        assert_eq!(e.flptr, 0x7654_3000);
        assert!(e.nxe && !e.sre && !e.wpe);
        assert_eq!(e.flpm, PagingLevels::Four);

        let check = |f: &dyn Fn(&mut [u64; 8]), reason| {
            let mut r = raw;
            f(&mut r);
            assert_eq!(PasidEntry::decode(&r).unwrap_err().reason, reason);
        };
        check(&|r| r[0] &= !1, FaultReason::PasidEntryNotPresent);
        check(&|r| r[0] |= 1 << 10, FaultReason::PasidEntryReserved);
        check(&|r| r[1] |= 1 << 30, FaultReason::PasidEntryReserved);
        check(&|r| r[2] |= 1 << 1, FaultReason::PasidEntryReserved);
        check(&|r| r[2] |= 2 << 2, FaultReason::PasidEntryReserved);
        check(&|r| r[2] |= 1 << 50, FaultReason::PasidEntryReserved);
        check(
            &|r| r[0] = (r[0] & !(7 << 6)) | (5 << 6),
            FaultReason::PasidEntryInvalid,
        );
        check(&|r| r[0] &= !(7 << 6), FaultReason::PasidEntryInvalid);
        // Second stage with an unsupported AW.
        check(
            &|r| r[0] = (r[0] & !(0x1ff << 2)) | (2 << 6) | (3 << 2),
            FaultReason::PasidEntryInvalid,
        );
    }

    #[test]
    fn root_entry_halves() {
        let r = RootEntry {
            raw: [0x1000 | 1, 0x2000],
        };
        assert_eq!(r.context_table(0x7f), Ok(0x1000));
        assert_eq!(
            r.context_table(0x80),
            Err(TableFault::new(FaultReason::RootEntryNotPresent))
        );
        let r = RootEntry {
            raw: [0x1000 | 1 | 4, 0x2000 | 1],
        };
        assert_eq!(
            r.context_table(0),
            Err(TableFault::new(FaultReason::RootEntryReserved))
        );
        assert_eq!(r.context_table(0xff), Ok(0x2000));
    }
}
