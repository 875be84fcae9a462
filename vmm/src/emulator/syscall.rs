//! Completing the guest's SYSCALL, which this platform's KVM leaves half done.
//!
//! What the guest does: a user process executes SYSCALL (Linux: every
//! system call). What the backend does (docs/pvm-backend.md §2.3): it loads
//! RIP from the guest's LSTAR, RCX and R11 with the return RIP and RFLAGS,
//! masks RFLAGS with SFMASK, but keeps the user's CS, SS and privilege
//! level, which is what its paravirtual guests expect. The kernel's entry
//! code then runs as user code, its page is supervisor-only, and the guest
//! receives a #PF at LSTAR from "user mode". Left alone, Linux kills the
//! process (init's first system call panics the guest).
//!
//! Why the VMM answers so: the VMM watches the guest's #PF handler with a
//! hardware breakpoint (see `crate::entry_watch`). When the exception frame
//! there is exactly what the backend's half-done SYSCALL produces,
//! [`broken_syscall_entry`] computes the state a real SYSCALL would have
//! given (SDM Vol. 2B, SYSCALL: CS and SS from STAR[47:32] with fixed flat
//! descriptors, CPL 0, RFLAGS = R11 & ~SFMASK with RF cleared), and
//! [`complete_syscall`] puts the vCPU there, at LSTAR, at CPL 0. The frame
//! the backend pushed on the kernel stack is dropped (it is below the stack
//! pointer the kernel's entry code loads). The return path (SYSRETQ, IRETQ)
//! works on this platform and needs nothing.

use kvm_bindings::kvm_segment;

use super::context::CpuContext;
use super::entry::{frame_at, ExceptionFrame};
use super::{EmulatorError, GuestCpu};
use crate::x86::{rflags, segment, vector};

/// MSR indices of the SYSCALL configuration.
pub use crate::x86::msr;

/// #PF error-code bit: the access was made in user mode.
const PF_USER: u64 = 1 << 2;

/// The guest's SYSCALL configuration, as it last wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallMsrs {
    /// IA32_STAR.
    pub star: u64,
    /// IA32_LSTAR.
    pub lstar: u64,
    /// IA32_FMASK.
    pub fmask: u64,
}

impl SyscallMsrs {
    /// Records a write of `index`; `false` if it is not a SYSCALL MSR.
    pub fn record(&mut self, index: u32, value: u64) -> bool {
        match index {
            msr::STAR => self.star = value,
            msr::LSTAR => self.lstar = value,
            msr::FMASK => self.fmask = value,
            _ => return false,
        }
        true
    }

    /// The guest has set up 64-bit SYSCALL (a non-zero LSTAR).
    pub fn configured(&self) -> bool {
        self.lstar != 0
    }

    /// The kernel code selector SYSCALL loads (STAR[47:32], RPL cleared).
    pub fn kernel_cs(&self) -> u16 {
        ((self.star >> 32) as u16) & !3
    }
}

/// The state a completed SYSCALL puts the vCPU in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallEntry {
    /// LSTAR.
    pub rip: u64,
    /// The user's stack pointer (SYSCALL does not switch stacks).
    pub rsp: u64,
    /// R11 & ~FMASK, RF clear, bit 1 set.
    pub rflags: u64,
    /// STAR[47:32].
    pub cs: u16,
    /// STAR[47:32] + 8.
    pub ss: u16,
}

impl SyscallEntry {
    /// The code segment SYSCALL loads: flat, 64-bit, DPL 0, execute/read,
    /// accessed (fixed values, not read from the GDT).
    pub fn cs_segment(&self) -> kvm_segment {
        segment::code64(0).to_kvm_segment(self.cs)
    }

    /// The stack segment SYSCALL loads: flat, DPL 0, read/write, accessed.
    pub fn ss_segment(&self) -> kvm_segment {
        segment::data(0).to_kvm_segment(self.ss)
    }
}

/// Recognises the backend's half-done SYSCALL at the entry of the guest's
/// #PF handler and says where the SYSCALL should have gone. All must hold:
/// the guest configured SYSCALL; the fault is a user-mode access (error
/// code bit 2) at LSTAR (CR2 and the frame's RIP); the interrupted context
/// has a user CS; and its IF is clear, which user code cannot arrange: only
/// the SYSCALL mask produces it. `r11` is the vCPU's R11 (the user RFLAGS
/// SYSCALL saved there).
pub fn broken_syscall_entry(
    frame: &ExceptionFrame,
    cr2: u64,
    r11: u64,
    msrs: &SyscallMsrs,
) -> Option<SyscallEntry> {
    let user_fault = frame.error_code.is_some_and(|e| e & PF_USER != 0);
    let at_lstar = frame.rip == msrs.lstar && cr2 == msrs.lstar;
    let masked = frame.rflags & rflags::IF == 0;
    if !msrs.configured() || !user_fault || !at_lstar || !frame.from_user() || !masked {
        return None;
    }
    let cs = msrs.kernel_cs();
    Some(SyscallEntry {
        rip: msrs.lstar,
        rsp: frame.rsp,
        rflags: (r11 & !msrs.fmask & !rflags::RF) | rflags::FIXED,
        cs,
        ss: cs.wrapping_add(8),
    })
}

/// At the entry of the guest's #PF handler: if the fault is the backend's
/// half-done SYSCALL, puts the vCPU at LSTAR at CPL 0 as SYSCALL would
/// have (general registers other than RIP, RSP, RFLAGS untouched: RCX and
/// R11 already hold what SYSCALL saves) and returns the entry. Otherwise
/// the vCPU is unchanged and the guest's handler is to run: `None`.
pub fn complete_syscall<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    msrs: &SyscallMsrs,
) -> Result<Option<SyscallEntry>, EmulatorError> {
    if !msrs.configured() {
        return Ok(None);
    }
    let mut ctx = CpuContext::capture(cpu)?;
    if !ctx.is_64bit_mode() {
        return Ok(None);
    }
    let Some(frame) = frame_at(&ctx, cpu.memory(), vector::PF) else {
        return Ok(None);
    };
    let Some(entry) = broken_syscall_entry(&frame, ctx.sregs.cr2, ctx.regs.r11, msrs) else {
        return Ok(None);
    };
    ctx.regs.rip = entry.rip;
    ctx.regs.rsp = entry.rsp;
    ctx.regs.rflags = entry.rflags;
    ctx.sregs.cs = entry.cs_segment();
    ctx.sregs.ss = entry.ss_segment();
    cpu.set_sregs(&ctx.sregs)?;
    cpu.set_regs(&ctx.regs)?;
    Ok(Some(entry))
}
