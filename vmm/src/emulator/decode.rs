//! Instruction decoding (iced-x86) and operand addressing in every mode:
//! 64-bit mode (FS/GS bases, canonical addresses), and compatibility,
//! protected and real mode (every segment's base and limit, 16- and
//! 32-bit address sizes, 32-bit linear addresses).

use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction, OpKind, Register};
use kvm_bindings::kvm_segment;

use super::context::{CpuContext, CpuMode, LINEAR32_MASK};
use super::exception::Exception;
use super::mmu::MAX_INSN_LEN;
use crate::x86::segment::kind;

/// Decodes the first instruction of `bytes` as `bitness`-bit code (64, 32
/// or 16: [`CpuContext::code_bitness`]) at `rip`. `None` if the bytes are
/// not a valid instruction (this includes a LOCK prefix on an instruction
/// that does not take one, and a truncated one).
pub(crate) fn decode(bytes: &[u8], bitness: u32, rip: u64) -> Option<Instruction> {
    let bytes = &bytes[..bytes.len().min(MAX_INSN_LEN)];
    let mut decoder = Decoder::try_with_ip(bitness, bytes, rip, DecoderOptions::NONE).ok()?;
    let instr = decoder.decode();
    (!instr.is_invalid()).then_some(instr)
}

/// Whether `bytes` begin with no instruction at all (an undefined opcode, a
/// prefix the opcode does not take, a register where only memory is
/// allowed): what the CPU answers with #UD. Bytes that may merely stop short
/// of a whole instruction are not: they count as no instruction only if no
/// continuation tried (zeros, all ones) makes one of them.
pub(crate) fn is_undefined(bytes: &[u8], bitness: u32, rip: u64) -> bool {
    let known = bytes.len().min(MAX_INSN_LEN);
    known > 0
        && [0x00, 0xff].into_iter().all(|fill| {
            let mut window = [fill; MAX_INSN_LEN];
            window[..known].copy_from_slice(&bytes[..known]);
            Decoder::try_with_ip(bitness, &window, rip, DecoderOptions::NONE).is_ok_and(
                |mut decoder| {
                    decoder.decode().is_invalid()
                        && decoder.last_error() == DecoderError::InvalidInstruction
                },
            )
        })
}

/// A memory operand's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemoryOperand {
    /// Linear address: segment base + effective address (truncated to the
    /// address size; RIP-relative resolved), 32 bits wide outside 64-bit
    /// mode.
    pub linear: u64,
    /// The effective address (the offset in the segment).
    pub offset: u64,
    /// The segment the reference goes through.
    pub segment: Register,
    /// The reference uses SS (RSP/RBP/ESP/EBP/BP base or an SS override):
    /// a bad address raises #SS instead of #GP.
    pub ss_based: bool,
}

impl MemoryOperand {
    /// The reference to `offset` in segment `segment` (e.g. ES:(E)DI).
    pub fn in_segment(ctx: &CpuContext, segment: Register, offset: u64) -> Option<Self> {
        let base = ctx.segment_base(segment)?;
        let linear = base.wrapping_add(offset);
        Some(MemoryOperand {
            linear: if ctx.is_64bit_mode() {
                linear
            } else {
                linear & LINEAR32_MASK
            },
            offset,
            segment,
            ss_based: segment == Register::SS,
        })
    }
}

/// Address of memory operand `operand` of `instr`.
pub(crate) fn memory_operand(
    ctx: &CpuContext,
    instr: &Instruction,
    operand: u32,
) -> Option<MemoryOperand> {
    if operand >= instr.op_count() || instr.op_kind(operand) != OpKind::Memory {
        return None;
    }
    let segment = instr.memory_segment();
    // The effective address, masked by iced-x86 to the address size.
    let offset = instr.virtual_address(operand, 0, |reg, _, _| {
        if reg.is_segment_register() {
            Some(0)
        } else {
            ctx.gpr(reg)
        }
    })?;
    MemoryOperand::in_segment(ctx, segment, offset)
}

/// Raises the exception an access of `len` bytes at `m` takes before any
/// paging: in 64-bit mode #GP(0) (#SS(0) if SS-based) unless every byte is
/// canonical; elsewhere the segment checks ([`check_segment`]).
pub(crate) fn check_access(
    ctx: &CpuContext,
    m: &MemoryOperand,
    len: u64,
    write: bool,
) -> Result<(), Exception> {
    if ctx.is_64bit_mode() {
        return check_canonical(ctx, m.linear, len, m.ss_based);
    }
    let Some(segment) = ctx.segment(m.segment) else {
        return Err(Exception::gp0());
    };
    if check_segment(ctx.mode(), segment, m.offset, len, write) {
        Ok(())
    } else {
        Err(Exception::address_fault(m.ss_based))
    }
}

/// Whether bytes `offset ..= offset + len - 1` of `segment` may be read
/// (or written) outside 64-bit mode: the segment is usable, a write goes
/// to writable data (real mode: any segment), a read not to execute-only
/// code, and every byte is within the limit: up to the limit for an
/// expand-up segment, above it up to 0xffff or 0xffff_ffff (by the B flag)
/// for an expand-down one (SDM Vol. 3A, 5.3). The last byte's offset is
/// not wrapped: an access running past the top of the address size is
/// outside every limit, as KVM's own emulator treats it.
pub(crate) fn check_segment(
    mode: CpuMode,
    segment: &kvm_segment,
    offset: u64,
    len: u64,
    write: bool,
) -> bool {
    if segment.unusable != 0 || (mode != CpuMode::Real && segment.present == 0) {
        return false;
    }
    let code = segment.type_ & kind::CODE != 0;
    let rw = segment.type_ & kind::WRITABLE != 0;
    let type_ok = if write {
        (mode == CpuMode::Real || !code) && rw
    } else {
        !code || rw
    };
    if !type_ok {
        return false;
    }
    let last = offset.saturating_add(len.saturating_sub(1));
    let limit = u64::from(segment.limit);
    if !code && segment.type_ & kind::EXPAND_DOWN != 0 {
        let upper = if segment.db != 0 { 0xffff_ffff } else { 0xffff };
        offset > limit && last <= upper
    } else {
        last <= limit
    }
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

    fn decode64(bytes: &[u8], rip: u64) -> Option<Instruction> {
        decode(bytes, 64, rip)
    }

    fn is_undefined64(bytes: &[u8], rip: u64) -> bool {
        is_undefined(bytes, 64, rip)
    }

    fn ctx() -> CpuContext {
        let mut c = CpuContext {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            features: Default::default(),
        };
        c.sregs.efer = crate::x86::efer::LMA;
        c.sregs.cs.l = 1;
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
        let i = decode64(&[0xf2, 0x0f, 0x38, 0xf8, 0x02], 0x1000).unwrap();
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
        let i = decode64(&[0x67, 0xf2, 0x0f, 0x38, 0xf8, 0x44, 0xb2, 0xf0], 0).unwrap();
        assert_eq!(i.code(), Code::Enqcmd_r32_m512);
        assert_eq!(i.op0_register(), Register::EAX);
        assert_eq!(c.gpr(i.op0_register()), Some(0x1000));
        // 0x1_0000_0008 + 0x40 - 0x10 truncated to 32 bits
        assert_eq!(memory_operand(&c, &i, 1).unwrap().linear, 0x38);
    }

    #[test]
    fn segment_override_adds_fs_or_gs_base() {
        // movdir64b rax, fs:[rdx]
        let i = decode64(&[0x64, 0x66, 0x0f, 0x38, 0xf8, 0x02], 0).unwrap();
        assert_eq!(i.code(), Code::Movdir64b_r64_m512);
        assert_eq!(memory_operand(&ctx(), &i, 1).unwrap().linear, 0x7_2000);
        // enqcmds rax, gs:[rdx]
        let i = decode64(&[0x65, 0xf3, 0x0f, 0x38, 0xf8, 0x02], 0).unwrap();
        assert_eq!(i.code(), Code::Enqcmds_r64_m512);
        assert_eq!(memory_operand(&ctx(), &i, 1).unwrap().linear, 0x9_2000);
    }

    #[test]
    fn rip_relative_source() {
        // enqcmd rax, [rip + 0x100]; 9 bytes long
        let i = decode64(
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
        let i = decode64(&[0x66, 0x0f, 0x38, 0xf8, 0x45, 0x08], 0).unwrap();
        let m = memory_operand(&ctx(), &i, 1).unwrap();
        assert_eq!(m.linear, 0x8008);
        assert!(m.ss_based);
    }

    #[test]
    fn register_source_and_lock_prefix_are_invalid() {
        // movdir64b rax, rdx (mod = 11) does not exist
        assert!(decode64(&[0x66, 0x0f, 0x38, 0xf8, 0xc2], 0).is_none());
        // lock enqcmd
        assert!(decode64(&[0xf0, 0xf2, 0x0f, 0x38, 0xf8, 0x02], 0).is_none());
        // truncated
        assert!(decode64(&[0xf2, 0x0f, 0x38], 0).is_none());
        assert!(decode64(&[], 0).is_none());
    }

    #[test]
    fn only_bytes_no_continuation_completes_are_undefined() {
        // PUSH ES (not in 64-bit mode), LOCK NOP.
        assert!(is_undefined64(&[0x06], 0));
        assert!(is_undefined64(&[0xf0, 0x90], 0));
        // MOVDIR64B without its ModRM byte yet; nothing at all.
        assert!(!is_undefined64(&[0x66, 0x0f, 0x38, 0xf8], 0));
        assert!(!is_undefined64(&[], 0));
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
