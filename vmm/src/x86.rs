//! x86-64 architectural constants the emulator needs (Intel SDM Vol. 3A):
//! RFLAGS bits, control-register and EFER bits, exception vectors, page-fault
//! error-code bits, and the canonical-address rule.

/// RFLAGS bits (SDM Vol. 1, 3.4.3).
pub mod rflags {
    /// Carry flag.
    pub const CF: u64 = 1 << 0;
    /// Parity flag.
    pub const PF: u64 = 1 << 2;
    /// Auxiliary carry flag.
    pub const AF: u64 = 1 << 4;
    /// Zero flag.
    pub const ZF: u64 = 1 << 6;
    /// Sign flag.
    pub const SF: u64 = 1 << 7;
    /// Interrupt-enable flag.
    pub const IF: u64 = 1 << 9;
    /// Overflow flag.
    pub const OF: u64 = 1 << 11;
    /// Resume flag.
    pub const RF: u64 = 1 << 16;
    /// Bit 1, which always reads as 1.
    pub const FIXED: u64 = 1 << 1;
    /// Alignment-check / access-control flag (SMAP override).
    pub const AC: u64 = 1 << 18;
    /// The six status flags.
    pub const STATUS: u64 = CF | PF | AF | ZF | SF | OF;
}

/// CR0 bits.
pub mod cr0 {
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// Task switched.
    pub const TS: u64 = 1 << 3;
    /// Write protect: supervisor writes honour read-only pages.
    pub const WP: u64 = 1 << 16;
}

/// CR3: bits 51:12 hold the physical address of the root paging table.
pub const CR3_ROOT_MASK: u64 = 0x000f_ffff_ffff_f000;

/// CR4 bits.
pub mod cr4 {
    /// 57-bit linear addresses (5-level paging).
    pub const LA57: u64 = 1 << 12;
    /// XSAVE and processor extended states enabled.
    pub const OSXSAVE: u64 = 1 << 18;
    /// Supervisor-mode execution prevention.
    pub const SMEP: u64 = 1 << 20;
    /// Supervisor-mode access prevention.
    pub const SMAP: u64 = 1 << 21;
}

/// IA32_EFER bits.
pub mod efer {
    /// Long mode active.
    pub const LMA: u64 = 1 << 10;
    /// Execute-disable bit enable.
    pub const NXE: u64 = 1 << 11;
}

/// Exception vectors.
pub mod vector {
    /// #DB, debug (INT1, single step, debug registers).
    pub const DB: u8 = 1;
    /// #BP, breakpoint (INT3).
    pub const BP: u8 = 3;
    /// #UD, invalid opcode.
    pub const UD: u8 = 6;
    /// #NM, device not available.
    pub const NM: u8 = 7;
    /// #DF, double fault.
    pub const DF: u8 = 8;
    /// #TS, invalid TSS.
    pub const TS: u8 = 10;
    /// #NP, segment not present.
    pub const NP: u8 = 11;
    /// #SS, stack-segment fault.
    pub const SS: u8 = 12;
    /// #GP, general protection.
    pub const GP: u8 = 13;
    /// #PF, page fault.
    pub const PF: u8 = 14;
    /// #AC, alignment check.
    pub const AC: u8 = 17;
    /// #CP, control protection.
    pub const CP: u8 = 21;
    /// #VC, VMM communication.
    pub const VC: u8 = 29;
    /// #SX, security exception.
    pub const SX: u8 = 30;

    /// Whether the CPU pushes an error code when it delivers `v`.
    pub fn has_error_code(v: u8) -> bool {
        matches!(v, DF | TS | NP | SS | GP | PF | AC | CP | VC | SX)
    }
}

/// Requested-privilege-level bits of a segment selector.
pub const SELECTOR_RPL_MASK: u16 = 3;
/// Table-indicator bit of a segment selector (1: LDT).
pub const SELECTOR_TI: u16 = 1 << 2;

/// The ENDBR64 instruction (CET), which Linux puts at every entry point.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// IA32_PASID (MSR 0xD93) fields.
pub mod ia32_pasid {
    /// MSR index.
    pub const MSR: u32 = 0xd93;
    /// Bits 19:0: the PASID.
    pub const PASID_MASK: u64 = 0xf_ffff;
    /// Bit 31: the PASID is valid.
    pub const VALID: u64 = 1 << 31;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_code_vectors() {
        assert!(vector::has_error_code(vector::GP));
        assert!(vector::has_error_code(vector::PF));
        assert!(!vector::has_error_code(vector::UD));
        assert!(!vector::has_error_code(vector::BP));
    }
}
