//! The IA32_PASID MSR of one vCPU (rule 5).
//!
//! ENQCMD takes the PASID it puts in the work descriptor from this MSR:
//! bits 19:0 hold the PASID, bit 31 says it is valid, every other bit is
//! reserved. A write that sets a reserved bit is refused with
//! [`Error::MsrReservedBits`] and leaves the register unchanged; the VMM
//! answers it with #GP(0). The reset value is 0 (no valid PASID).

use crate::{Error, Result};

/// MSR index of IA32_PASID.
pub const MSR_IA32_PASID: u32 = 0xd93;

/// Model of one vCPU's IA32_PASID.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ia32Pasid(u64);

impl Ia32Pasid {
    /// Bits 19:0: the PASID.
    pub const PASID_MASK: u64 = crate::PASID_MASK as u64;
    /// Bit 31: the PASID is valid.
    pub const VALID: u64 = 1 << 31;
    /// Every other bit.
    pub const RESERVED_MASK: u64 = !(Self::PASID_MASK | Self::VALID);
    /// Value after reset.
    pub const RESET_VALUE: u64 = 0;

    /// The register at reset.
    pub fn new() -> Self {
        Ia32Pasid(Self::RESET_VALUE)
    }

    /// RDMSR.
    pub fn read(&self) -> u64 {
        self.0
    }

    /// WRMSR. A value with reserved bits set is refused (the VMM injects
    /// #GP) and the register keeps its value.
    pub fn write(&mut self, value: u64) -> Result<()> {
        if value & Self::RESERVED_MASK != 0 {
            log::debug!("IA32_PASID: write of {value:#x} sets reserved bits");
            return Err(Error::MsrReservedBits(value));
        }
        self.0 = value;
        Ok(())
    }

    /// Back to the reset value (vCPU reset, INIT).
    pub fn reset(&mut self) {
        self.0 = Self::RESET_VALUE;
    }

    /// Whether bit 31 is set.
    pub fn valid(&self) -> bool {
        self.0 & Self::VALID != 0
    }

    /// Bits 19:0, whether valid or not.
    pub fn pasid(&self) -> u32 {
        (self.0 & Self::PASID_MASK) as u32
    }

    /// The PASID ENQCMD would use: `Some` only when the valid bit is set.
    pub fn active_pasid(&self) -> Option<u32> {
        self.valid().then(|| self.pasid())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_value_is_zero_and_invalid() {
        let mut msr = Ia32Pasid::new();
        assert_eq!(msr.read(), 0);
        assert_eq!(msr.active_pasid(), None);
        msr.write(Ia32Pasid::VALID | 0x1234).unwrap();
        msr.reset();
        assert_eq!(msr, Ia32Pasid::default());
        assert_eq!(MSR_IA32_PASID, 0xD93);
    }

    #[test]
    fn fields() {
        let mut msr = Ia32Pasid::new();
        msr.write(Ia32Pasid::VALID | 0xf_ffff).unwrap();
        assert_eq!(msr.read(), 0x800f_ffff);
        assert_eq!(msr.active_pasid(), Some(0xf_ffff));
        msr.write(0x1234).unwrap();
        assert!(!msr.valid());
        assert_eq!((msr.pasid(), msr.active_pasid()), (0x1234, None));
    }

    #[test]
    fn every_reserved_bit_is_refused_and_value_kept() {
        let mut msr = Ia32Pasid::new();
        msr.write(Ia32Pasid::VALID | 5).unwrap();
        let reserved: Vec<u32> = (0..64)
            .filter(|bit| Ia32Pasid::RESERVED_MASK & (1 << bit) != 0)
            .collect();
        assert_eq!(reserved, (20..31).chain(32..64).collect::<Vec<_>>());
        for bit in reserved {
            let value = Ia32Pasid::VALID | 5 | 1 << bit;
            assert_eq!(msr.write(value), Err(Error::MsrReservedBits(value)));
            assert_eq!(msr.read(), 0x8000_0005);
        }
    }
}
