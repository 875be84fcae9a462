//! Fallback emulation of instructions the platform's KVM emulator lacks
//! (seen at CPL 0 in a Linux guest on PVM: docs/pvm-platform.md).
//!
//! To add an instruction: a variant of [`FallbackInstruction`], its line in
//! [`FallbackInstruction::of`], and its function in [`execute`]'s match.
//! Each function works on the [`CpuContext`] copy and returns a [`Step`];
//! nothing reaches the vCPU unless the instruction completes.

use iced_x86::{Instruction, Mnemonic, OpKind};

use super::context::CpuContext;
use super::decode::{check_access, memory_operand};
use super::exception::Exception;
use super::guest_atomic::{compare_exchange_u128, AtomicAccessError};
use super::mmu::{read_linear_any, translate, AccessError, AccessKind, Privilege};
use super::{EmulatorError, GuestCpu, Step, UnhandledReason};
use crate::x86::{cr0, rflags};

/// An instruction the fallback emulator knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FallbackInstruction {
    /// CLAC: clear RFLAGS.AC (CPL 0 only).
    Clac,
    /// STAC: set RFLAGS.AC (CPL 0 only).
    Stac,
    /// FWAIT / WAIT: no-op (#NM if CR0.MP and CR0.TS).
    Fwait,
    /// POPCNT r, r/m: population count; ZF = (source == 0), other status
    /// flags cleared.
    Popcnt,
    /// INT3: #BP delivered with RIP after the instruction.
    Int3,
    /// INT1 (ICEBP): #DB delivered with RIP after the instruction.
    Int1,
    /// CMPXCHG16B m128 (normally LOCKed): atomic 128-bit compare-exchange
    /// with RDX:RAX / RCX:RBX; only ZF changes.
    Cmpxchg16b,
    /// XSAVE / XSAVE64: save the state components EDX:EAX & XCR0 asks for
    /// (standard format). This and the six below: `super::xsave`.
    Xsave,
    /// XSAVEOPT / XSAVEOPT64.
    Xsaveopt,
    /// XSAVEC / XSAVEC64 (compacted format, init optimisation).
    Xsavec,
    /// XSAVES / XSAVES64 (compacted, supervisor components, CPL 0).
    Xsaves,
    /// XRSTOR / XRSTOR64 (standard or compacted form).
    Xrstor,
    /// XRSTORS / XRSTORS64 (compacted, supervisor components, CPL 0).
    Xrstors,
    /// XGETBV: read XCR0 (or XINUSE with ECX = 1).
    Xgetbv,
    /// LSL r, r/m16: the limit of the segment a selector names, ZF set;
    /// ZF clear (and the destination kept) where the selector cannot be
    /// read at this privilege. Linux's paranoid entries (NMI, #DB, #MC)
    /// read their CPU number with it when the CPU lacks RDPID.
    Lsl,
}

impl FallbackInstruction {
    /// The fallback instruction `instr` is, if any.
    pub fn of(instr: &Instruction) -> Option<Self> {
        Some(match instr.mnemonic() {
            Mnemonic::Clac => Self::Clac,
            Mnemonic::Stac => Self::Stac,
            Mnemonic::Wait => Self::Fwait,
            Mnemonic::Popcnt => Self::Popcnt,
            Mnemonic::Int3 => Self::Int3,
            Mnemonic::Int1 => Self::Int1,
            Mnemonic::Cmpxchg16b => Self::Cmpxchg16b,
            Mnemonic::Lsl => Self::Lsl,
            m => return super::xsave::of(m),
        })
    }
}

/// Executes `which` (decoded as `instr`) on `ctx`.
pub(crate) fn execute<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    ctx: &mut CpuContext,
    instr: &Instruction,
    which: FallbackInstruction,
) -> Result<Step<FallbackInstruction>, EmulatorError> {
    let step = match which {
        FallbackInstruction::Clac => set_ac(ctx, false),
        FallbackInstruction::Stac => set_ac(ctx, true),
        FallbackInstruction::Fwait => fwait(ctx),
        FallbackInstruction::Popcnt => popcnt(cpu, ctx, instr),
        FallbackInstruction::Int3 => int3(ctx),
        FallbackInstruction::Int1 => Err(Stop::Trap(Exception::db())),
        FallbackInstruction::Cmpxchg16b => cmpxchg16b(cpu, ctx, instr),
        FallbackInstruction::Lsl => lsl(cpu, ctx, instr),
        xsave_family => return super::xsave::execute(cpu, ctx, instr, xsave_family),
    };
    Ok(conclude(step, ctx, instr, which))
}

/// The step an instruction's result is: RIP after it if it completed or
/// trapped.
pub(super) fn conclude(
    step: Result<(), Stop>,
    ctx: &mut CpuContext,
    instr: &Instruction,
    which: FallbackInstruction,
) -> Step<FallbackInstruction> {
    match step {
        Ok(()) => {
            ctx.regs.rip = ctx.next_ip(instr);
            Step::Completed(which)
        }
        Err(Stop::Trap(e)) => {
            ctx.regs.rip = ctx.next_ip(instr);
            Step::Trap(e)
        }
        Err(Stop::Fault(e)) => Step::Fault(e),
        Err(Stop::Retry) => Step::Retry,
        Err(Stop::Unsupported(r)) => Step::Unsupported(r),
    }
}

/// How an instruction ended if it did not simply complete.
pub(super) enum Stop {
    /// Raised before any change (RIP at the instruction).
    Fault(Exception),
    /// Raised after completion (RIP after the instruction).
    Trap(Exception),
    /// Not executed: to be executed again.
    Retry,
    Unsupported(UnhandledReason),
}

impl From<Exception> for Stop {
    fn from(e: Exception) -> Self {
        Stop::Fault(e)
    }
}

impl From<AccessError> for Stop {
    fn from(e: AccessError) -> Self {
        match e {
            AccessError::Fault(e) => Stop::Fault(e),
            AccessError::NotRam { gpa } => {
                Stop::Unsupported(UnhandledReason::OperandNotRam { gpa })
            }
            AccessError::Contended => Stop::Retry,
        }
    }
}

fn set_ac(ctx: &mut CpuContext, set: bool) -> Result<(), Stop> {
    if ctx.cpl() != 0 {
        return Err(Exception::ud().into());
    }
    if set {
        ctx.regs.rflags |= rflags::AC;
    } else {
        ctx.regs.rflags &= !rflags::AC;
    }
    Ok(())
}

fn fwait(ctx: &CpuContext) -> Result<(), Stop> {
    let c = ctx.sregs.cr0;
    if c & cr0::MP != 0 && c & cr0::TS != 0 {
        return Err(Exception::nm().into());
    }
    Ok(())
}

fn int3(_ctx: &CpuContext) -> Result<(), Stop> {
    Err(Stop::Trap(Exception::bp()))
}

fn popcnt<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    ctx: &mut CpuContext,
    instr: &Instruction,
) -> Result<(), Stop> {
    let dest = instr.op0_register();
    let size = dest.size();
    let value = match instr.op1_kind() {
        OpKind::Register => ctx
            .gpr(instr.op1_register())
            .ok_or(Stop::Unsupported(UnhandledReason::BadOperand))?,
        OpKind::Memory => {
            let m = memory_operand(ctx, instr, 1)
                .ok_or(Stop::Unsupported(UnhandledReason::BadOperand))?;
            check_access(ctx, &m, size as u64, false)?;
            // Device memory is read through its device, as the CPU does.
            let mut buf = [0u8; 8];
            read_linear_any(cpu, ctx, m.linear, &mut buf[..size], Privilege::of(ctx))?;
            u64::from_le_bytes(buf)
        }
        _ => return Err(Stop::Unsupported(UnhandledReason::BadOperand)),
    };
    ctx.set_gpr(dest, u64::from(value.count_ones()))
        .ok_or(Stop::Unsupported(UnhandledReason::BadOperand))?;
    ctx.set_status_flags(if value == 0 { rflags::ZF } else { 0 });
    Ok(())
}

/// CMPXCHG16B's read and write of 16 bytes of device memory at `gpa`
/// (16-byte aligned): two 8-byte reads, then two 8-byte writes of `new`
/// if the value was `expected`, else of the value read (the destination is
/// always written).
fn device_compare_exchange<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    gpa: u64,
    expected: u128,
    new: u128,
) -> Result<u128, u128> {
    let mut bytes = [0u8; 16];
    for (i, half) in bytes.chunks_mut(8).enumerate() {
        cpu.read_device(gpa + 8 * i as u64, half);
    }
    let actual = u128::from_le_bytes(bytes);
    let written = if actual == expected { new } else { actual };
    for (i, half) in written.to_le_bytes().chunks(8).enumerate() {
        cpu.write_device(gpa + 8 * i as u64, half);
    }
    if actual == expected {
        Ok(actual)
    } else {
        Err(actual)
    }
}

fn cmpxchg16b<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    ctx: &mut CpuContext,
    instr: &Instruction,
) -> Result<(), Stop> {
    const SIZE: u64 = 16;
    let m = memory_operand(ctx, instr, 0).ok_or(Stop::Unsupported(UnhandledReason::BadOperand))?;
    if m.linear % SIZE != 0 {
        return Err(Exception::gp0().into());
    }
    check_access(ctx, &m, SIZE, true)?;
    // A locked read-modify-write: the page must be writable even when the
    // comparison fails (SDM: the destination is always written).
    let gpa = translate(
        cpu.memory(),
        ctx,
        m.linear,
        AccessKind::Write,
        Privilege::of(ctx),
    )?;
    let r = &ctx.regs;
    let expected = (u128::from(r.rdx) << 64) | u128::from(r.rax);
    let new = (u128::from(r.rcx) << 64) | u128::from(r.rbx);
    let result = match compare_exchange_u128(cpu.memory(), gpa, expected, new) {
        Ok(result) => result,
        // Device memory: the locked read and write go to the device (a bus
        // lock on hardware; nothing else reaches the device in between
        // here, as each access takes the device's lock and vCPUs reach a
        // device only through this VMM).
        Err(AtomicAccessError::NotRam) => device_compare_exchange(cpu, gpa, expected, new),
        Err(AtomicAccessError::Misaligned) => {
            return Err(Stop::Unsupported(UnhandledReason::BadOperand))
        }
    };
    match result {
        Ok(_) => ctx.regs.rflags |= rflags::ZF,
        Err(actual) => {
            ctx.regs.rflags &= !rflags::ZF;
            ctx.regs.rax = actual as u64;
            ctx.regs.rdx = (actual >> 64) as u64;
        }
    }
    Ok(())
}

/// System-segment types LSL accepts in IA-32e mode: LDT, available and
/// busy 64-bit TSS (SDM Vol. 2A, LSL); outside it also the 16-bit TSS
/// types and the 32-bit TSS types (the same numbers as the 64-bit ones).
const LSL_SYSTEM_TYPES: [u8; 3] = [0x2, 0x9, 0xb];
const LSL_LEGACY_SYSTEM_TYPES: [u8; 2] = [0x1, 0x3];

/// The limit LSL loads from descriptor `desc` for a selector with
/// requested privilege `rpl` at `cpl`, or `None` (ZF cleared) where the
/// type or privilege forbids it.
fn lsl_limit(desc: u64, cpl: u8, rpl: u8, long_mode: bool) -> Option<u32> {
    let desc = crate::x86::segment::SegmentDescriptor::from_u64(desc);
    if !desc.code_or_data
        && !LSL_SYSTEM_TYPES.contains(&desc.kind)
        && (long_mode || !LSL_LEGACY_SYSTEM_TYPES.contains(&desc.kind))
    {
        return None;
    }
    if !desc.is_conforming_code() && (desc.dpl < cpl || desc.dpl < rpl) {
        return None;
    }
    Some(desc.byte_limit())
}

fn lsl<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    ctx: &mut CpuContext,
    instr: &Instruction,
) -> Result<(), Stop> {
    use crate::x86::{efer, SELECTOR_RPL_MASK, SELECTOR_TI};
    if ctx.sregs.cr0 & cr0::PE == 0 || ctx.regs.rflags & rflags::VM != 0 {
        return Err(Exception::ud().into());
    }
    let selector = match instr.op1_kind() {
        OpKind::Register => {
            ctx.gpr(instr.op1_register())
                .ok_or(Stop::Unsupported(UnhandledReason::BadOperand))? as u16
        }
        OpKind::Memory => {
            let m = memory_operand(ctx, instr, 1)
                .ok_or(Stop::Unsupported(UnhandledReason::BadOperand))?;
            check_access(ctx, &m, 2, false)?;
            let mut buf = [0u8; 2];
            read_linear_any(cpu, ctx, m.linear, &mut buf, Privilege::of(ctx))?;
            u16::from_le_bytes(buf)
        }
        _ => return Err(Stop::Unsupported(UnhandledReason::BadOperand)),
    };
    let (base, limit) = if selector & SELECTOR_TI != 0 {
        let ldt = &ctx.sregs.ldt;
        if ldt.unusable != 0 || ldt.present == 0 {
            (0, None)
        } else {
            (ldt.base, Some(ldt.limit))
        }
    } else {
        (ctx.sregs.gdt.base, Some(u32::from(ctx.sregs.gdt.limit)))
    };
    let offset = u64::from(selector & !7);
    let null = selector & !SELECTOR_RPL_MASK == 0;
    let found = match limit {
        Some(limit) if !null && offset + 7 <= u64::from(limit) => {
            let mut buf = [0u8; 8];
            read_linear_any(
                cpu,
                ctx,
                base.wrapping_add(offset),
                &mut buf,
                Privilege::Implicit,
            )?;
            let long_mode = ctx.sregs.efer & efer::LMA != 0;
            lsl_limit(
                u64::from_le_bytes(buf),
                ctx.cpl(),
                (selector & SELECTOR_RPL_MASK) as u8,
                long_mode,
            )
        }
        _ => None,
    };
    match found {
        Some(value) => {
            ctx.set_gpr(instr.op0_register(), u64::from(value))
                .ok_or(Stop::Unsupported(UnhandledReason::BadOperand))?;
            ctx.regs.rflags |= rflags::ZF;
        }
        None => ctx.regs.rflags &= !rflags::ZF,
    }
    Ok(())
}
