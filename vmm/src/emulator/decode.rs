//! Instruction decoding (iced-x86) and operand addressing in 64-bit mode.

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction, OpKind, Register};

use super::context::CpuContext;
use super::exception::Exception;
use super::mmu::MAX_INSN_LEN;

/// Decodes the first instruction of `bytes` as 64-bit code at `rip`.
/// `None` if the bytes are not a valid instruction (this includes a LOCK
/// prefix on an instruction that does not take one, and a truncated one).
pub(crate) fn decode(bytes: &[u8], rip: u64) -> Option<Instruction> {
    let bytes = &bytes[..bytes.len().min(MAX_INSN_LEN)];
    let mut decoder = Decoder::with_ip(64, bytes, rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    (!instr.is_invalid()).then_some(instr)
}

/// Whether `bytes` begin with no instruction at all (an undefined opcode, a
/// prefix the opcode does not take, a register where only memory is
/// allowed): what the CPU answers with #UD. Bytes that may merely stop short
/// of a whole instruction are not: they count as no instruction only if no
/// continuation tried (zeros, all ones) makes one of them.
pub(crate) fn is_undefined(bytes: &[u8], rip: u64) -> bool {
    let known = bytes.len().min(MAX_INSN_LEN);
    known > 0
        && [0x00, 0xff].into_iter().all(|fill| {
            let mut window = [fill; MAX_INSN_LEN];
            window[..known].copy_from_slice(&bytes[..known]);
            let mut decoder = Decoder::with_ip(64, &window, rip, DecoderOptions::NONE);
            decoder.decode().is_invalid()
                && decoder.last_error() == DecoderError::InvalidInstruction
        })
}

/// A memory operand's linear address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemoryOperand {
    /// Linear address: segment base + effective address (truncated to 32
    /// bits under a 0x67 address-size prefix; RIP-relative resolved).
    pub linear: u64,
    /// The reference uses SS (RSP/RBP base or an SS override): a bad
    /// address raises #SS instead of #GP.
    pub ss_based: bool,
}

/// Linear address of memory operand `operand` of `instr`.
pub(crate) fn memory_operand(
    ctx: &CpuContext,
    instr: &Instruction,
    operand: u32,
) -> Option<MemoryOperand> {
    if operand >= instr.op_count() || instr.op_kind(operand) != OpKind::Memory {
        return None;
    }
    let linear = instr.virtual_address(operand, 0, |reg, _, _| ctx.operand_value(reg))?;
    Some(MemoryOperand {
        linear,
        ss_based: instr.memory_segment() == Register::SS,
    })
}

/// Raises #GP(0) (#SS(0) if SS-based) unless every byte of
/// `[linear, linear + len)` is canonical.
pub(crate) fn check_canonical(
    ctx: &CpuContext,
    linear: u64,
    len: u64,
    ss_based: bool,
) -> Result<(), Exception> {
    let levels = ctx.paging_levels();
    let last = linear.wrapping_add(len.saturating_sub(1));
    // Wrapping past 2^64 crosses the non-canonical hole too.
    if levels.is_canonical(linear) && levels.is_canonical(last) && last >= linear {
        Ok(())
    } else {
        Err(Exception::non_canonical(ss_based))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::Code;
    use kvm_bindings::{kvm_regs, kvm_sregs};

    fn ctx() -> CpuContext {
        let mut c = CpuContext {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            features: Default::default(),
        };
        c.regs.rax = 0xffff_ffff_0000_1000;
        c.regs.rdx = 0x2000;
        c.regs.rsi = 0x10;
        c.regs.rbp = 0x8000;
        c.sregs.fs.base = 0x7_0000;
        c.sregs.gs.base = 0x9_0000;
        c
    }

    #[test]
    fn enqcmd_decodes_with_reg_destination_and_memory_source() {
        // enqcmd rax, [rdx]
        let i = decode(&[0xf2, 0x0f, 0x38, 0xf8, 0x02], 0x1000).unwrap();
        assert_eq!(i.code(), Code::Enqcmd_r64_m512);
        assert_eq!(i.op0_register(), Register::RAX);
        assert_eq!(memory_operand(&ctx(), &i, 1).unwrap().linear, 0x2000);
        assert_eq!(i.len(), 5);
    }

    #[test]
    fn address_size_prefix_truncates_to_32_bits() {
        // enqcmd eax, [edx + esi*4 - 0x10] with a 0x67 prefix
        let mut c = ctx();
        c.regs.rdx = 0x1_0000_0008;
        let i = decode(&[0x67, 0xf2, 0x0f, 0x38, 0xf8, 0x44, 0xb2, 0xf0], 0).unwrap();
        assert_eq!(i.code(), Code::Enqcmd_r32_m512);
        assert_eq!(i.op0_register(), Register::EAX);
        assert_eq!(c.gpr(i.op0_register()), Some(0x1000));
        // 0x1_0000_0008 + 0x40 - 0x10 truncated to 32 bits
        assert_eq!(memory_operand(&c, &i, 1).unwrap().linear, 0x38);
    }

    #[test]
    fn segment_override_adds_fs_or_gs_base() {
        // movdir64b rax, fs:[rdx]
        let i = decode(&[0x64, 0x66, 0x0f, 0x38, 0xf8, 0x02], 0).unwrap();
        assert_eq!(i.code(), Code::Movdir64b_r64_m512);
        assert_eq!(memory_operand(&ctx(), &i, 1).unwrap().linear, 0x7_2000);
        // enqcmds rax, gs:[rdx]
        let i = decode(&[0x65, 0xf3, 0x0f, 0x38, 0xf8, 0x02], 0).unwrap();
        assert_eq!(i.code(), Code::Enqcmds_r64_m512);
        assert_eq!(memory_operand(&ctx(), &i, 1).unwrap().linear, 0x9_2000);
    }

    #[test]
    fn rip_relative_source() {
        // enqcmd rax, [rip + 0x100]; 9 bytes long
        let i = decode(
            &[0xf2, 0x0f, 0x38, 0xf8, 0x05, 0x00, 0x01, 0x00, 0x00],
            0x40_0000,
        )
        .unwrap();
        let m = memory_operand(&ctx(), &i, 1).unwrap();
        assert_eq!(m.linear, 0x40_0000 + 9 + 0x100);
        assert!(!m.ss_based);
    }

    #[test]
    fn rbp_base_is_ss_based() {
        // movdir64b rax, [rbp + 8]
        let i = decode(&[0x66, 0x0f, 0x38, 0xf8, 0x45, 0x08], 0).unwrap();
        let m = memory_operand(&ctx(), &i, 1).unwrap();
        assert_eq!(m.linear, 0x8008);
        assert!(m.ss_based);
    }

    #[test]
    fn register_source_and_lock_prefix_are_invalid() {
        // movdir64b rax, rdx (mod = 11) does not exist
        assert!(decode(&[0x66, 0x0f, 0x38, 0xf8, 0xc2], 0).is_none());
        // lock enqcmd
        assert!(decode(&[0xf0, 0xf2, 0x0f, 0x38, 0xf8, 0x02], 0).is_none());
        // truncated
        assert!(decode(&[0xf2, 0x0f, 0x38], 0).is_none());
        assert!(decode(&[], 0).is_none());
    }

    #[test]
    fn only_bytes_no_continuation_completes_are_undefined() {
        // PUSH ES (not in 64-bit mode), LOCK NOP.
        assert!(is_undefined(&[0x06], 0));
        assert!(is_undefined(&[0xf0, 0x90], 0));
        // MOVDIR64B without its ModRM byte yet; nothing at all.
        assert!(!is_undefined(&[0x66, 0x0f, 0x38, 0xf8], 0));
        assert!(!is_undefined(&[], 0));
    }

    #[test]
    fn canonical_range_check() {
        let c = ctx();
        assert_eq!(check_canonical(&c, 0x7fff_ffff_ffc0, 64, false), Ok(()));
        assert_eq!(
            check_canonical(&c, 0x7fff_ffff_ffd0, 64, false),
            Err(Exception::gp0())
        );
        assert_eq!(
            check_canonical(&c, 0x8000_0000_0000, 64, true),
            Err(Exception::ss0())
        );
        assert_eq!(
            check_canonical(&c, u64::MAX - 8, 64, false),
            Err(Exception::gp0())
        );
    }
}
