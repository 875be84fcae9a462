//! The IA32_PASID MSR of one vCPU.

use thiserror::Error;

/// MSR index of IA32_PASID.
pub const IA32_PASID: u32 = 0xd93;
/// Bit 31: the PASID in bits 19:0 is valid.
pub const IA32_PASID_VALID: u64 = 1 << 31;
const PASID_MASK: u64 = (1 << crate::PASID_BITS) - 1;
const WRITABLE: u64 = IA32_PASID_VALID | PASID_MASK;

/// A rejected write to IA32_PASID (the VMM answers it with #GP(0)).
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
#[error("IA32_PASID write {0:#x} sets reserved bits")]
pub struct MsrError(pub u64);

/// IA32_PASID: bits 19:0 PASID, bit 31 valid, all other bits reserved.
/// Reset value 0 (no valid PASID).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PasidMsr {
    value: u64,
}

impl PasidMsr {
    /// The MSR at reset.
    pub const fn new() -> Self {
        Self { value: 0 }
    }

    /// The value RDMSR returns.
    pub const fn read(&self) -> u64 {
        self.value
    }

    /// A WRMSR: rejected, leaving the MSR unchanged, if reserved bits are set.
    pub fn write(&mut self, value: u64) -> Result<(), MsrError> {
        if value & !WRITABLE != 0 {
            return Err(MsrError(value));
        }
        self.value = value;
        Ok(())
    }

    /// The PASID, if the valid bit is set.
    pub const fn pasid(&self) -> Option<u32> {
        if self.value & IA32_PASID_VALID != 0 {
            Some((self.value & PASID_MASK) as u32)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_is_invalid() {
        assert_eq!(PasidMsr::new().read(), 0);
        assert_eq!(PasidMsr::new().pasid(), None);
    }

    #[test]
    fn valid_write_reads_back() {
        let mut msr = PasidMsr::new();
        msr.write(IA32_PASID_VALID | 0xf_ffff).unwrap();
        assert_eq!(msr.read(), 0x800f_ffff);
        assert_eq!(msr.pasid(), Some(0xf_ffff));
        msr.write(0x1234).unwrap();
        assert_eq!(
            msr.pasid(),
            None,
            "PASID without the valid bit is not usable"
        );
    }

    #[test]
    fn reserved_bits_are_rejected() {
        let mut msr = PasidMsr::new();
        msr.write(IA32_PASID_VALID | 7).unwrap();
        for bad in [1 << 20, 1 << 30, 1 << 32, u64::MAX] {
            assert_eq!(msr.write(bad), Err(MsrError(bad)));
        }
        assert_eq!(
            msr.read(),
            IA32_PASID_VALID | 7,
            "a rejected write changes nothing"
        );
    }
}
