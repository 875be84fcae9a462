//! The Software Error register (SWERROR, BAR0 0xc0, 4 x 64 bits): errors
//! that have no completion record to go to (DSA specification §9.2.15).
//!
//! Only one error is held. Recording an error while Valid is set sets
//! Overflow instead; software clears Valid and Overflow by writing ones.

use crate::bits::bitfields;

/// Other software error codes (DSA specification §5.8.2).
pub mod code {
    /// The Command register was written while a command was active.
    pub const CMD_WHILE_ACTIVE: u8 = 0x52;
    /// A descriptor was submitted to a full dedicated WQ.
    pub const DWQ_FULL: u8 = 0x53;
    /// An unsupported change to PCI configuration while the device was not
    /// disabled (the device halts).
    pub const CONFIG_CHANGE: u8 = 0x51;
}

/// Qword 0 of SWERROR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwErrQ0(pub u64);
impl SwErrQ0 {
    bitfields! { u64;
        /// An error is recorded.
        valid / set_valid: 0, 0;
        /// More errors occurred after the recorded one.
        overflow / set_overflow: 1, 1;
        /// The descriptor fields are valid.
        desc_valid / set_desc_valid: 2, 2;
        /// The WQ index is valid.
        wq_idx_valid / set_wq_idx_valid: 3, 3;
        /// The descriptor was a batch member.
        batch / set_batch: 4, 4;
        /// The faulting access was a write.
        fault_rw / set_fault_rw: 5, 5;
        /// The descriptor's privilege.
        privileged / set_privileged: 6, 6;
        /// The error information field is valid.
        info_valid / set_info_valid: 7, 7;
        /// Error code.
        error / set_error: 15, 8;
        /// WQ index.
        wq_idx / set_wq_idx: 23, 16;
        /// Operation code.
        operation / set_operation: 39, 32;
        /// PASID.
        pasid / set_pasid: 59, 40;
    }

    /// Bits software clears by writing ones.
    pub const W1C: u64 = 0b11;
}

/// Information identifying the descriptor behind an error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescInfo {
    /// Operation code.
    pub operation: u8,
    /// PASID the descriptor ran with.
    pub pasid: u32,
    /// Privilege the descriptor ran with.
    pub privileged: bool,
    /// Index in its batch, for batch members.
    pub batch_index: Option<u16>,
}

/// One software error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SoftwareError {
    /// Error code (operation status or §5.8.2 code).
    pub code: u8,
    /// The WQ the descriptor went to.
    pub wq: Option<u8>,
    /// The descriptor, if known.
    pub desc: Option<DescInfo>,
    /// The faulting address and whether the access was a write.
    pub fault: Option<(u64, bool)>,
    /// Error information (invalid flags, interrupt handle...).
    pub info: Option<u32>,
}

/// The SWERROR register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SwErrReg(pub [u64; 4]);

impl SwErrReg {
    /// Records `err`; returns whether Valid went from 0 to 1 (which raises
    /// INTCAUSE.ERR when enabled).
    pub fn record(&mut self, err: &SoftwareError) -> bool {
        let mut q0 = SwErrQ0(self.0[0]);
        if q0.valid() == 1 {
            q0.set_overflow(1);
            self.0[0] = q0.0;
            return false;
        }
        let overflow = q0.overflow();
        let mut q0 = SwErrQ0(0);
        q0.set_valid(1)
            .set_overflow(overflow)
            .set_error(u64::from(err.code));
        if let Some(wq) = err.wq {
            q0.set_wq_idx_valid(1).set_wq_idx(u64::from(wq));
        }
        let mut q1 = 0u64;
        if let Some(desc) = err.desc {
            q0.set_desc_valid(1)
                .set_operation(u64::from(desc.operation))
                .set_pasid(u64::from(desc.pasid))
                .set_privileged(u64::from(desc.privileged));
            if let Some(index) = desc.batch_index {
                q0.set_batch(1);
                q1 |= u64::from(index);
            }
        }
        let mut q2 = 0;
        if let Some((addr, write)) = err.fault {
            q2 = addr;
            q0.set_fault_rw(u64::from(write));
        }
        if let Some(info) = err.info {
            q0.set_info_valid(1);
            q1 |= u64::from(info) << 32;
        }
        self.0 = [q0.0, q1, q2, 0];
        true
    }

    /// A write of `value` to qword 0 bits selected by `mask`: Valid and
    /// Overflow are write-1-to-clear, everything else is read-only.
    pub fn write_q0(&mut self, value: u64, mask: u64) {
        self.0[0] &= !(value & mask & SwErrQ0::W1C);
    }

    /// Whether an error is held.
    pub fn valid(&self) -> bool {
        SwErrQ0(self.0[0]).valid() == 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: u8) -> SoftwareError {
        SoftwareError {
            code,
            wq: Some(2),
            desc: Some(DescInfo {
                operation: 3,
                pasid: 0x1234,
                privileged: true,
                batch_index: Some(5),
            }),
            fault: Some((0xa000, true)),
            info: Some(0x40),
        }
    }

    #[test]
    fn layout_and_overflow() {
        let mut r = SwErrReg::default();
        assert!(r.record(&err(0x11)));
        assert_eq!(r.0[0], 0x0012_3403_0002_11fd);
        assert_eq!(r.0[1], 0x40_0000_0005);
        assert_eq!(r.0[2], 0xa000);
        assert!(!r.record(&err(0x03)), "second error overflows");
        assert_eq!(r.0[0] & 0xff03, 0x1103, "first error kept, overflow set");
        r.write_q0(0b01, u64::MAX);
        assert_eq!(r.0[0] & 3, 0b10, "valid cleared, overflow still set");
        assert!(r.record(&err(0x53)));
        assert_eq!(r.0[0] & 0xff03, 0x5303, "overflow stays until cleared");
        r.write_q0(u64::MAX, u64::MAX);
        assert_eq!(r.0[0] & 3, 0);
    }
}
