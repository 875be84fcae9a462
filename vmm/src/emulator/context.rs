//! A snapshot of the vCPU state an emulated instruction works on.
//!
//! The emulator reads the registers once, works on this copy, and writes it
//! back only when the instruction completes, so a fault leaves the vCPU as
//! it was (fault semantics: RIP at the instruction).

use iced_x86::Register;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use viommu::paging::PagingLevels;

use super::{EmulatorError, Exception, GuestCpu};
use crate::x86::{cr0, cr4, efer, rflags};

/// Outside 64-bit mode linear addresses are 32 bits wide: a segment base
/// plus an offset wraps at 4 GiB (SDM Vol. 3A, 3.4).
pub(crate) const LINEAR32_MASK: u64 = 0xffff_ffff;

/// The processor's operating mode (SDM Vol. 3A, 2.2), as far as addressing
/// and decoding differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CpuMode {
    /// IA-32e mode with a 64-bit code segment.
    Long64,
    /// IA-32e mode with a 32- or 16-bit code segment (compatibility mode):
    /// segmentation as in protected mode, IA-32e paging.
    Compat,
    /// Protected mode (virtual-8086 mode included), paging off, 32-bit or
    /// PAE.
    Protected,
    /// Real-address mode.
    Real,
}

/// CPUID facts the page walk needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CpuFeatures {
    /// MAXPHYADDR.
    pub phys_addr_bits: u8,
    /// 1 GiB pages.
    pub page_1g: bool,
}

impl Default for CpuFeatures {
    fn default() -> Self {
        CpuFeatures {
            phys_addr_bits: 52,
            page_1g: true,
        }
    }
}

/// Registers and segment state of one vCPU.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuContext {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub features: CpuFeatures,
}

impl CpuContext {
    /// Reads the vCPU's registers and segment state.
    pub fn capture<C: GuestCpu + ?Sized>(cpu: &mut C) -> Result<Self, EmulatorError> {
        Ok(CpuContext {
            regs: cpu.regs()?,
            sregs: cpu.sregs()?,
            features: CpuFeatures {
                phys_addr_bits: cpu.max_phys_addr_bits(),
                page_1g: cpu.has_1g_pages(),
            },
        })
    }

    /// Current privilege level: 0 in real mode, 3 in virtual-8086 mode,
    /// otherwise the DPL of the code segment (which equals CS.RPL).
    pub fn cpl(&self) -> u8 {
        match self.mode() {
            CpuMode::Real => 0,
            CpuMode::Protected if self.regs.rflags & rflags::VM != 0 => 3,
            _ => self.sregs.cs.dpl & 3,
        }
    }

    /// 64-bit mode: long mode active and a 64-bit code segment.
    pub fn is_64bit_mode(&self) -> bool {
        self.sregs.efer & efer::LMA != 0 && self.sregs.cs.l != 0
    }

    /// The operating mode (SDM Vol. 3A, 2.2).
    pub fn mode(&self) -> CpuMode {
        if self.sregs.efer & efer::LMA != 0 {
            if self.sregs.cs.l != 0 {
                CpuMode::Long64
            } else {
                CpuMode::Compat
            }
        } else if self.sregs.cr0 & cr0::PE != 0 {
            CpuMode::Protected
        } else {
            CpuMode::Real
        }
    }

    /// The code's default operand and address size in bits (the decoder's
    /// bitness): 64 in 64-bit mode, 16 in real and virtual-8086 mode,
    /// otherwise 32 or 16 by CS.D.
    pub fn code_bitness(&self) -> u32 {
        match self.mode() {
            CpuMode::Long64 => 64,
            CpuMode::Real => 16,
            CpuMode::Protected if self.regs.rflags & rflags::VM != 0 => 16,
            CpuMode::Compat | CpuMode::Protected if self.sregs.cs.db != 0 => 32,
            CpuMode::Compat | CpuMode::Protected => 16,
        }
    }

    /// The instruction pointer after `instr`: EIP and IP wrap at 32 and
    /// 16 bits outside 64-bit mode.
    pub fn next_ip(&self, instr: &iced_x86::Instruction) -> u64 {
        match self.code_bitness() {
            64 => instr.next_ip(),
            32 => u64::from(instr.next_ip32()),
            _ => u64::from(instr.next_ip16()),
        }
    }

    /// Linear address of the code at instruction pointer `ip`: CS's base
    /// applies outside 64-bit mode, where linear addresses are 32 bits.
    pub fn code_linear(&self, ip: u64) -> u64 {
        if self.is_64bit_mode() {
            ip
        } else {
            self.sregs.cs.base.wrapping_add(ip) & LINEAR32_MASK
        }
    }

    /// Paging levels in use: 5 with CR4.LA57 (57-bit linear addresses).
    pub fn paging_levels(&self) -> PagingLevels {
        if self.sregs.cr4 & cr4::LA57 != 0 {
            PagingLevels::Five
        } else {
            PagingLevels::Four
        }
    }

    /// The segment register state of `seg` (ES, CS, SS, DS, FS or GS).
    pub fn segment(&self, seg: Register) -> Option<&kvm_segment> {
        let s = &self.sregs;
        Some(match seg {
            Register::ES => &s.es,
            Register::CS => &s.cs,
            Register::SS => &s.ss,
            Register::DS => &s.ds,
            Register::FS => &s.fs,
            Register::GS => &s.gs,
            _ => return None,
        })
    }

    /// Base address of a segment. In 64-bit mode FS and GS have their
    /// bases and the others are treated as 0 (SDM Vol. 1, 3.4.2.1);
    /// elsewhere every segment has its base.
    pub fn segment_base(&self, seg: Register) -> Option<u64> {
        if self.is_64bit_mode() {
            match seg {
                Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
                Register::FS => Some(self.sregs.fs.base),
                Register::GS => Some(self.sregs.gs.base),
                _ => None,
            }
        } else {
            self.segment(seg).map(|s| s.base)
        }
    }

    /// `e` as the CPU delivers it in this mode: in real mode no error code
    /// is pushed.
    pub fn delivered(&self, e: Exception) -> Exception {
        if self.mode() == CpuMode::Real {
            Exception {
                error_code: None,
                ..e
            }
        } else {
            e
        }
    }

    /// Value of a general-purpose register of any width (AH..BH included).
    pub fn gpr(&self, reg: Register) -> Option<u64> {
        let mut regs = self.regs;
        let full = *gpr_slot(&mut regs, reg.full_register())?;
        Some(match reg.size() {
            8 => full,
            4 => full & 0xffff_ffff,
            2 => full & 0xffff,
            1 if is_high_byte(reg) => (full >> 8) & 0xff,
            1 => full & 0xff,
            _ => return None,
        })
    }

    /// Writes a general-purpose register with x86-64 width rules: a 32-bit
    /// write zero-extends to 64 bits, 16- and 8-bit writes merge.
    pub fn set_gpr(&mut self, reg: Register, value: u64) -> Option<()> {
        let high = is_high_byte(reg);
        let size = reg.size();
        let full = gpr_slot(&mut self.regs, reg.full_register())?;
        *full = match size {
            8 => value,
            4 => value & 0xffff_ffff,
            2 => (*full & !0xffff) | (value & 0xffff),
            1 if high => (*full & !0xff00) | ((value & 0xff) << 8),
            1 => (*full & !0xff) | (value & 0xff),
            _ => return None,
        };
        Some(())
    }

    /// Clears the six status flags and sets those in `set`.
    pub fn set_status_flags(&mut self, set: u64) {
        self.regs.rflags = (self.regs.rflags & !rflags::STATUS) | (set & rflags::STATUS);
    }
}

fn gpr_slot(r: &mut kvm_regs, full: Register) -> Option<&mut u64> {
    Some(match full {
        Register::RAX => &mut r.rax,
        Register::RCX => &mut r.rcx,
        Register::RDX => &mut r.rdx,
        Register::RBX => &mut r.rbx,
        Register::RSP => &mut r.rsp,
        Register::RBP => &mut r.rbp,
        Register::RSI => &mut r.rsi,
        Register::RDI => &mut r.rdi,
        Register::R8 => &mut r.r8,
        Register::R9 => &mut r.r9,
        Register::R10 => &mut r.r10,
        Register::R11 => &mut r.r11,
        Register::R12 => &mut r.r12,
        Register::R13 => &mut r.r13,
        Register::R14 => &mut r.r14,
        Register::R15 => &mut r.r15,
        _ => return None,
    })
}

fn is_high_byte(reg: Register) -> bool {
    matches!(
        reg,
        Register::AH | Register::CH | Register::DH | Register::BH
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> CpuContext {
        CpuContext {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            features: CpuFeatures::default(),
        }
    }

    #[test]
    fn gpr_widths() {
        let mut c = ctx();
        c.regs.rax = 0x1122_3344_5566_7788;
        assert_eq!(c.gpr(Register::RAX), Some(0x1122_3344_5566_7788));
        assert_eq!(c.gpr(Register::EAX), Some(0x5566_7788));
        assert_eq!(c.gpr(Register::AX), Some(0x7788));
        assert_eq!(c.gpr(Register::AH), Some(0x77));
        assert_eq!(c.gpr(Register::AL), Some(0x88));
        assert_eq!(c.gpr(Register::XMM0), None);
    }

    #[test]
    fn set_gpr_widths() {
        let mut c = ctx();
        c.regs.r9 = u64::MAX;
        c.set_gpr(Register::R9D, 0x1234).unwrap();
        assert_eq!(c.regs.r9, 0x1234, "32-bit write zero-extends");
        c.regs.rbx = u64::MAX;
        c.set_gpr(Register::BX, 0x1234).unwrap();
        assert_eq!(c.regs.rbx, 0xffff_ffff_ffff_1234, "16-bit write merges");
        c.set_gpr(Register::BH, 0x56).unwrap();
        assert_eq!(c.regs.rbx, 0xffff_ffff_ffff_5634);
        c.set_gpr(Register::BL, 0x78).unwrap();
        assert_eq!(c.regs.rbx, 0xffff_ffff_ffff_5678);
    }

    #[test]
    fn segment_bases_in_64bit_mode() {
        let mut c = ctx();
        c.sregs.efer = efer::LMA;
        c.sregs.cs.l = 1;
        c.sregs.ds.base = 0x1000;
        c.sregs.fs.base = 0x7000;
        c.sregs.gs.base = 0x9000;
        assert_eq!(c.segment_base(Register::DS), Some(0));
        assert_eq!(c.segment_base(Register::FS), Some(0x7000));
        assert_eq!(c.segment_base(Register::GS), Some(0x9000));
    }

    #[test]
    fn segment_bases_outside_64bit_mode() {
        let mut c = ctx();
        c.sregs.efer = efer::LMA;
        c.sregs.ds.base = 0x1000;
        c.sregs.ss.base = 0x2000;
        c.sregs.fs.base = 0x7000;
        assert_eq!(c.mode(), CpuMode::Compat);
        assert_eq!(c.segment_base(Register::DS), Some(0x1000));
        assert_eq!(c.segment_base(Register::SS), Some(0x2000));
        assert_eq!(c.segment_base(Register::FS), Some(0x7000));
    }

    #[test]
    fn modes_bitness_and_cpl() {
        let mut c = ctx();
        c.sregs.cs.dpl = 3;
        assert_eq!(
            (c.mode(), c.code_bitness(), c.cpl()),
            (CpuMode::Real, 16, 0)
        );
        c.sregs.cr0 = cr0::PE;
        c.sregs.cs.db = 1;
        assert_eq!(
            (c.mode(), c.code_bitness(), c.cpl()),
            (CpuMode::Protected, 32, 3)
        );
        c.regs.rflags = rflags::VM;
        assert_eq!((c.code_bitness(), c.cpl()), (16, 3));
        c.regs.rflags = 0;
        c.sregs.efer = efer::LMA;
        c.sregs.cs.db = 0;
        assert_eq!((c.mode(), c.code_bitness()), (CpuMode::Compat, 16));
        c.sregs.cs.l = 1;
        assert_eq!((c.mode(), c.code_bitness()), (CpuMode::Long64, 64));
    }

    #[test]
    fn code_linear_adds_the_cs_base_and_wraps_outside_64bit_mode() {
        let mut c = ctx();
        c.sregs.efer = efer::LMA;
        c.sregs.cs.base = 0xffff_f000;
        assert_eq!(c.code_linear(0x1234), 0x234);
        c.sregs.cs.l = 1;
        assert_eq!(c.code_linear(0x1234), 0x1234);
    }

    #[test]
    fn status_flags_replace_only_status_bits() {
        let mut c = ctx();
        c.regs.rflags = 0x2 | rflags::AC | rflags::CF | rflags::OF;
        c.set_status_flags(rflags::ZF);
        assert_eq!(c.regs.rflags, 0x2 | rflags::AC | rflags::ZF);
    }
}
