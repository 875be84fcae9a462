// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Fault reasons and primary fault logging (VT-d 7.1-7.2, fault-recording registers 11.4.14).

use pci::PciAddress;

use crate::paging::{Violation, WalkFault};
use crate::regs::{fsts, NUM_FAULT_RECORDS};

/// Scalable-mode fault reasons (VT-d 7.1.3), the byte reported in a fault record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
#[repr(u8)]
pub enum FaultReason {
    /// Root table address invalid or translation table mode unsupported.
    #[error("invalid root table address / unsupported TTM")]
    RootTableInvalid = 0x30,
    /// Error reading the root entry.
    #[error("error accessing root entry")]
    RootEntryAccess = 0x38,
    /// Root entry present bit clear.
    #[error("root entry not present")]
    RootEntryNotPresent = 0x39,
    /// Reserved bit set in the root entry.
    #[error("reserved field set in root entry")]
    RootEntryReserved = 0x3a,
    /// Error reading the context entry.
    #[error("error accessing context entry")]
    ContextEntryAccess = 0x40,
    /// Context entry present bit clear.
    #[error("context entry not present")]
    ContextEntryNotPresent = 0x41,
    /// Reserved bit set in the context entry.
    #[error("reserved field set in context entry")]
    ContextEntryReserved = 0x42,
    /// Context entry programmed inconsistently.
    #[error("invalid context entry")]
    ContextEntryInvalid = 0x43,
    /// Translation request (ATS) while the context entry's DTE is clear.
    #[error("DTE clear in context entry")]
    DeviceTlbDisabled = 0x44,
    /// Request with PASID while the context entry's PASIDE is clear.
    #[error("PASIDE clear in context entry")]
    PasidDisabled = 0x45,
    /// PASID beyond the PASID directory size.
    #[error("PASID larger than the context entry allows")]
    PasidTooLarge = 0x46,
    /// Page request while the context entry's PRE is clear.
    #[error("PRE clear in context entry")]
    PageRequestDisabled = 0x47,
    /// Error reading the PASID directory entry.
    #[error("error accessing PASID directory entry")]
    PasidDirAccess = 0x50,
    /// PASID directory entry present bit clear.
    #[error("PASID directory entry not present")]
    PasidDirNotPresent = 0x51,
    /// Reserved bit set in the PASID directory entry.
    #[error("reserved field set in PASID directory entry")]
    PasidDirReserved = 0x52,
    /// Error reading the PASID table entry.
    #[error("error accessing PASID table entry")]
    PasidEntryAccess = 0x58,
    /// PASID table entry present bit clear.
    #[error("PASID table entry not present")]
    PasidEntryNotPresent = 0x59,
    /// Reserved bit set in the PASID table entry.
    #[error("reserved field set in PASID table entry")]
    PasidEntryReserved = 0x5a,
    /// PASID table entry programmed inconsistently (e.g. PGTT value).
    #[error("invalid PASID table entry")]
    PasidEntryInvalid = 0x5b,
    /// Execute request while ERE is clear.
    #[error("ERE clear in PASID table entry")]
    ExecuteRequestsDisabled = 0x5c,
    /// Privileged request while SRE is clear.
    #[error("SRE clear in PASID table entry")]
    SupervisorRequestsDisabled = 0x5d,
    /// Error accessing a first-stage paging entry.
    #[error("error accessing first-stage paging entry")]
    FirstStageAccess = 0x70,
    /// First-stage entry not present.
    #[error("first-stage paging entry not present")]
    FirstStageNotPresent = 0x71,
    /// Reserved bit set in a first-stage entry.
    #[error("reserved field set in first-stage paging entry")]
    FirstStageReserved = 0x72,
    /// Nested: a first-stage table address is beyond the second stage's input width.
    #[error("first-stage entry address beyond MGAW in nested translation")]
    FirstStageBeyondMgawNested = 0x74,
    /// Nested: the second stage denies reading the first-stage root table.
    #[error("read permission error on first-stage root table in nested translation")]
    FirstStageRootReadNested = 0x75,
    /// Nested: the second stage denies reading a first-stage paging entry.
    #[error("read permission error on first-stage entry in nested translation")]
    FirstStageReadNested = 0x76,
    /// Nested: the second stage denies the accessed/dirty update of a first-stage entry.
    #[error("write permission error on first-stage entry in nested translation")]
    FirstStageWriteNested = 0x77,
    /// Error accessing a second-stage paging entry.
    #[error("error accessing second-stage paging entry")]
    SecondStageAccess = 0x78,
    /// Second-stage read/write permission denied (includes R=W=0, i.e. not present).
    #[error("second-stage read/write permission error")]
    SecondStagePermission = 0x79,
    /// Reserved bit set in a second-stage entry.
    #[error("reserved field set in second-stage paging entry")]
    SecondStageReserved = 0x7a,
    /// Second-stage page-table pointer invalid.
    #[error("invalid second-stage page table pointer")]
    SecondStagePointerInvalid = 0x7b,
    /// Input address not canonical for first-stage translation.
    #[error("non-canonical address")]
    NonCanonical = 0x80,
    /// User request to a supervisor page.
    #[error("U/S clear for user request")]
    UserSupervisor = 0x81,
    /// Execute request to a non-executable page.
    #[error("no execute permission")]
    NoExecute = 0x82,
    /// Input address beyond what the hardware translates.
    #[error("address beyond the hardware maximum")]
    AddressBeyondMax = 0x83,
    /// Write request to a read-only page.
    #[error("no write permission")]
    NoWrite = 0x85,
    /// Read request without read permission.
    #[error("no read permission")]
    NoRead = 0x86,
}

impl FaultReason {
    /// The reason code as written in a fault record.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// The VT-d reason for a failed first-stage walk.
    pub fn from_first_stage(fault: &WalkFault) -> FaultReason {
        match fault {
            WalkFault::NotPresent { .. } => FaultReason::FirstStageNotPresent,
            WalkFault::ReservedBit { .. } => FaultReason::FirstStageReserved,
            WalkFault::NonCanonical => FaultReason::NonCanonical,
            WalkFault::TableOutsideMemory { .. } | WalkFault::Contended => {
                FaultReason::FirstStageAccess
            }
            WalkFault::Protection { violation, .. } => match violation {
                Violation::User | Violation::SupervisorAccess => FaultReason::UserSupervisor,
                Violation::Write => FaultReason::NoWrite,
                Violation::Execute | Violation::SupervisorExecute => FaultReason::NoExecute,
            },
        }
    }

    /// Whether the fault means the translation simply does not allow the access (not
    /// present / permission), as opposed to malformed or unreachable structures. A translation
    /// request (ATS) answers the former with R=W=0 instead of recording a fault.
    pub fn is_permission_like(self) -> bool {
        matches!(
            self,
            FaultReason::FirstStageNotPresent
                | FaultReason::SecondStagePermission
                | FaultReason::NonCanonical
                | FaultReason::UserSupervisor
                | FaultReason::NoExecute
                | FaultReason::NoWrite
                | FaultReason::NoRead
                | FaultReason::AddressBeyondMax
        )
    }
}

/// What a fault record reports about the faulting request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    /// Why the request faulted.
    pub reason: FaultReason,
    /// Requester ID (bus:dev.fn).
    pub source_id: PciAddress,
    /// PASID of a request-with-PASID.
    pub pasid: Option<u32>,
    /// Faulting address (the page is recorded).
    pub address: u64,
    /// The request was a write (a read otherwise).
    pub write: bool,
    /// Privileged (supervisor) request.
    pub privileged: bool,
    /// Execute requested.
    pub execute: bool,
}

/// Fault-recording register bits in the upper quadword.
mod frcd {
    pub const PRIV: u64 = 1 << 29;
    pub const EXE: u64 = 1 << 30;
    pub const PP: u64 = 1 << 31;
    pub const FR_SHIFT: u32 = 32;
    pub const PV_SHIFT: u32 = 40;
    /// T1: 1 for a read request, 0 for a write (as Linux's `dma_frcd_type` decodes it).
    pub const T1_READ: u64 = 1 << 62;
    /// F: record holds a fault (RW1C).
    pub const F: u64 = 1 << 63;
}

impl FaultRecord {
    /// The 128-bit register encoding (low quadword, high quadword) with F=1.
    pub fn encode(&self) -> [u64; 2] {
        let lo = self.address & !0xfff;
        let mut hi = u64::from(self.source_id.rid())
            | (u64::from(self.reason.code()) << frcd::FR_SHIFT)
            | frcd::F;
        if let Some(pasid) = self.pasid {
            hi |= frcd::PP | (u64::from(pasid & ::pasid::PASID_MASK) << frcd::PV_SHIFT);
        }
        if self.privileged {
            hi |= frcd::PRIV;
        }
        if self.execute {
            hi |= frcd::EXE;
        }
        if !self.write {
            hi |= frcd::T1_READ;
        }
        [lo, hi]
    }
}

/// Primary fault log: the fault-recording registers, FRI and PFO (VT-d 7.2.1).
#[derive(Clone, Debug, Default)]
pub struct PrimaryFaultLog {
    records: [[u64; 2]; NUM_FAULT_RECORDS],
    index: usize,
    overflow: bool,
}

/// Outcome of logging a fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogOutcome {
    /// Recorded; `first_pending` when PPF went from 0 to 1 (a fault event is due).
    Recorded {
        /// PPF was clear before.
        first_pending: bool,
    },
    /// Not recorded; PFO went from 0 to 1 (a fault event is due).
    Overflowed,
    /// Not recorded; PFO was already set.
    Dropped,
}

impl PrimaryFaultLog {
    /// Log a fault: into the record at FRI if it is free, otherwise set PFO.
    pub fn log(&mut self, record: &FaultRecord) -> LogOutcome {
        if self.overflow {
            return LogOutcome::Dropped;
        }
        if self.records[self.index][1] & frcd::F != 0 {
            self.overflow = true;
            return LogOutcome::Overflowed;
        }
        let first_pending = !self.pending();
        self.records[self.index] = record.encode();
        self.index = (self.index + 1) % NUM_FAULT_RECORDS;
        LogOutcome::Recorded { first_pending }
    }

    /// PPF: some record holds an unserviced fault.
    pub fn pending(&self) -> bool {
        self.records.iter().any(|r| r[1] & frcd::F != 0)
    }

    /// PFO status.
    pub fn overflow(&self) -> bool {
        self.overflow
    }

    /// FSTS bits owned by the fault log (PFO, PPF, FRI).
    pub fn status_bits(&self) -> u32 {
        let mut v = fsts::fri(self.index);
        if self.overflow {
            v |= fsts::PFO;
        }
        if self.pending() {
            v |= fsts::PPF;
        }
        v
    }

    /// Software wrote 1 to PFO.
    pub fn clear_overflow(&mut self) {
        self.overflow = false;
    }

    /// Read quadword `qword` (0 or 1) of record `index`.
    pub fn read(&self, index: usize, qword: usize) -> u64 {
        self.records[index % NUM_FAULT_RECORDS][qword & 1]
    }

    /// Software write to the upper quadword of record `index`: F is RW1C, other bits RO.
    pub fn write_upper(&mut self, index: usize, value: u64) {
        if value & frcd::F != 0 {
            let r = &mut self.records[index % NUM_FAULT_RECORDS];
            r[1] &= !frcd::F;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sid: u16) -> FaultRecord {
        FaultRecord {
            reason: FaultReason::FirstStageNotPresent,
            source_id: PciAddress::from_rid(sid),
            pasid: Some(0x12345),
            address: 0x7f81_c968_d123,
            write: false,
            privileged: false,
            execute: false,
        }
    }

    #[test]
    fn record_encoding_matches_the_register_layout() {
        let [lo, hi] = record(0x0810).encode();
        assert_eq!(lo, 0x7f81_c968_d000);
        // Linux reads dword +8 (source id, bit 31 PASID present) and +12 (reason, PASID, type, F).
        let dword2 = hi as u32;
        let dword3 = (hi >> 32) as u32;
        assert_eq!(dword2 & 0xffff, 0x0810);
        assert_eq!(dword2 >> 31, 1);
        assert_eq!(dword3 & 0xff, 0x71);
        assert_eq!((dword3 >> 8) & 0xf_ffff, 0x12345);
        assert_eq!((dword3 >> 30) & 1, 1, "read request");
        assert_eq!(dword3 >> 31, 1, "F");
        let write = FaultRecord {
            write: true,
            pasid: None,
            ..record(1)
        };
        let hi = write.encode()[1];
        assert_eq!((hi >> 62) & 1, 0);
        assert_eq!((hi >> 31) & 1, 0);
    }

    #[test]
    fn overflow_when_the_next_record_is_still_pending() {
        let mut log = PrimaryFaultLog::default();
        assert_eq!(
            log.log(&record(0)),
            LogOutcome::Recorded {
                first_pending: true
            }
        );
        for i in 1..NUM_FAULT_RECORDS {
            assert_eq!(
                log.log(&record(i as u16)),
                LogOutcome::Recorded {
                    first_pending: false
                }
            );
        }
        // FRI wrapped to 0, whose record is unserviced.
        assert_eq!(log.status_bits(), fsts::PPF | fsts::fri(0));
        assert_eq!(log.log(&record(99)), LogOutcome::Overflowed);
        assert_eq!(log.log(&record(100)), LogOutcome::Dropped);
        assert_eq!(log.status_bits(), fsts::PPF | fsts::PFO | fsts::fri(0));
        // Service record 0 and clear PFO: the next fault lands in record 0.
        log.write_upper(0, frcd::F);
        log.clear_overflow();
        assert_eq!(
            log.log(&record(7)),
            LogOutcome::Recorded {
                first_pending: false
            }
        );
        assert_eq!(log.read(0, 1) & 0xffff, 7);
        // Service everything: PPF clears.
        for i in 0..NUM_FAULT_RECORDS {
            log.write_upper(i, frcd::F);
        }
        assert_eq!(log.status_bits() & fsts::PPF, 0);
    }

    #[test]
    fn first_stage_reasons() {
        use crate::paging::Violation::*;
        let p = |violation| WalkFault::Protection {
            level: 1,
            violation,
        };
        let cases = [
            (WalkFault::NotPresent { level: 3 }, 0x71),
            (WalkFault::ReservedBit { level: 1 }, 0x72),
            (WalkFault::NonCanonical, 0x80),
            (WalkFault::TableOutsideMemory { addr: 0 }, 0x70),
            (p(User), 0x81),
            (p(Execute), 0x82),
            (p(SupervisorExecute), 0x82),
            (p(Write), 0x85),
        ];
        for (fault, code) in cases {
            assert_eq!(
                FaultReason::from_first_stage(&fault).code(),
                code,
                "{fault:?}"
            );
        }
    }
}
