//! Emulation of instructions the host KVM cannot run: MOVDIR64B, ENQCMD,
//! ENQCMDS, and a fallback for others.
//!
//! A guest's MOVDIR64B, ENQCMD or ENQCMDS reaches the VMM by one of three
//! routes, whichever the host produces (`crate::platform`):
//!
//! 1. `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION` with the
//!    instruction bytes, RIP at the instruction: the host has the
//!    instruction and its destination is emulated MMIO, or (PVM) KVM's
//!    emulator runs the guest's CPL 0 code and lacks it. On PVM the same
//!    exit brings the instructions its emulator lacks (`clac`, `stac`,
//!    `fwait`, `popcnt`, `int3`, `lock cmpxchg16b`, the XSAVE family but
//!    XSETBV), which the fallback
//!    emulator answers when [`GuestCpu::emulates`] says so. The caller passes
//!    them to [`handle_emulation_failure`].
//! 2. #UD at the guest's own handler, at CPL 3 or CPL 0: the host CPU lacks
//!    the instruction. The VMM sees the handler's entry (a breakpoint on
//!    it, or on PVM the `clac` at Linux's entry points, which route 1
//!    already brings here) and calls [`handle_exception_entry`].
//! 3. #GP(0) at the guest's own handler: the host CPU has ENQCMD, and its
//!    IA32_PASID is not the guest's. Same entry logic as route 2.
//!
//! The module does not touch KVM: the vCPU is reached through the
//! [`GuestCpu`] trait, which the VMM's vCPU implements and which a test can
//! mock over a plain [`vm_memory::GuestMemoryMmap`].
//!
//! Every mode is emulated: 64-bit mode, compatibility mode (32- and 16-bit
//! code in long mode, IA-32e paging), protected mode (paging off, 32-bit or
//! PAE paging; virtual-8086 mode included) and real mode, each with its
//! operand and address sizes, segment bases and limits (`decode`) and
//! page walk (`mmu`, `legacy_paging`).
//!
//! # Wiring it into a vCPU loop
//!
//! ```text
//! KVM_EXIT_INTERNAL_ERROR, suberror KVM_INTERNAL_ERROR_EMULATION:
//!     bytes = data[1 .. 1 + data[0]] if flags bit 0 (KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES) else []
//!     match handle_emulation_failure(vcpu, bytes)? {
//!         Outcome::NotHandled(u) => stop: "emulation failure: {u}"
//!         _ => resume          // Store / Emulated / Exception / ExceptionEntry
//!     }
//! KVM_EXIT_DEBUG at idt_handler(vcpu, 6 or 13) (breakpoint route):
//!     match handle_exception_entry(vcpu, vector)? {
//!         EntryAction::PassThrough => step_over_handler_entry (the handler runs)
//!         EntryAction::NotHandled(u) => log "{u}", resume as for PassThrough
//!         _ => resume          // the vCPU is back in the interrupted context
//!     }
//! KVM_EXIT_X86_RDMSR / WRMSR of IA32_PASID_MSR: keep the value per vCPU;
//!     GuestCpu::ia32_pasid returns it.
//! ```
//!
//! Other exception entries (e.g. #PF for a SYSCALL fixup) can be recognised
//! with [`is_exception_entry`] and [`read_exception_frame`] before calling
//! [`handle_emulation_failure`] on the `clac` there.

mod context;
mod decode;
mod delivery_path;
mod direct_store;
mod entry;
mod exception;
mod fallback;
mod guest_atomic;
mod legacy_paging;
mod mmu;
mod syscall;
mod top_level_tables;
mod xsave;

#[cfg(test)]
mod test_cpu;
#[cfg(test)]
mod tests;

use std::fmt;

use bus::{StoreKind, StoreReply};
use iced_x86::Mnemonic;
use kvm_bindings::{kvm_regs, kvm_sregs};

use context::CpuContext;
use mmu::Privilege;

pub use delivery_path::describe_delivery_path;
pub use entry::{
    handle_exception_entry, idt_handler, is_exception_entry, read_exception_frame,
    step_over_handler_entry, EntryAction, ExceptionFrame, StepOver,
};
pub use exception::Exception;
pub use fallback::FallbackInstruction;
pub use pasid::MSR_IA32_PASID as IA32_PASID_MSR;
pub use syscall::{
    broken_syscall_entry, complete_syscall, msr as syscall_msr, SyscallEntry, SyscallMsrs,
};
pub use top_level_tables::KernelHalfCensus;
pub use xsave::{XComponent, XState, XStateLayout, XsaveFeatures};

/// Errors of the VMM side: the vCPU or a device could not be reached. A
/// guest's bad instruction or operand is never an error: it gets its
/// architectural exception or an [`Outcome::NotHandled`].
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// Reading or writing vCPU state, or injecting an exception, failed.
    #[error("vCPU access failed: {0}")]
    Vcpu(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The 64-byte store could not be delivered to its target.
    #[error("64-byte store to GPA {gpa:#x} failed: {message}")]
    Store {
        /// Guest-physical destination.
        gpa: u64,
        /// What went wrong.
        message: String,
    },
}

/// The vCPU as the emulator sees it. The VMM's vCPU implements this over
/// KVM; tests implement it over plain guest memory.
pub trait GuestCpu {
    /// General registers (`KVM_GET_REGS`).
    fn regs(&mut self) -> Result<kvm_regs, EmulatorError>;
    /// Writes general registers (`KVM_SET_REGS`): RIP, RFLAGS, and the
    /// registers an instruction writes; after an emulated user-mode ENQCMD
    /// also RSP.
    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), EmulatorError>;
    /// Segment and control registers (`KVM_GET_SREGS`).
    fn sregs(&mut self) -> Result<kvm_sregs, EmulatorError>;
    /// Writes segment and control registers (`KVM_SET_SREGS`). Only used to
    /// return from a #UD handler entry to the user context (CS and SS
    /// change; everything else is written back as read).
    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), EmulatorError>;
    /// Guest RAM.
    fn memory(&self) -> &vm_memory::GuestMemoryMmap;
    /// This vCPU's IA32_PASID (MSR 0xD93): bits 19:0 PASID, bit 31 valid.
    fn ia32_pasid(&self) -> u64;
    /// The IA32_PASID value an ENQCMD executed with `cr3` uses. Hardware
    /// uses the MSR as XSAVES left it for the running task; a VMM whose
    /// guest has no PASID state component keeps the value per address space
    /// (see docs/ia32-pasid-follows-address-space.md). Defaults to the MSR.
    fn enqcmd_pasid(&mut self, cr3: u64) -> u64 {
        let _ = cr3;
        self.ia32_pasid()
    }
    /// MAXPHYADDR the guest's CPUID reports (leaf 0x8000_0008 EAX[7:0]):
    /// paging-entry address bits from here to 51 are reserved.
    fn max_phys_addr_bits(&self) -> u8 {
        52
    }
    /// Whether the guest's CPUID reports 1 GiB pages (leaf 0x8000_0001
    /// EDX[26]); if not, PS in a PDPTE is a reserved bit.
    fn has_1g_pages(&self) -> bool {
        true
    }
    /// Whether an emulation-failure exit of `which` is answered by the
    /// fallback emulator (the platform's choice: only PVM's emulator lacks
    /// these instructions, see `crate::platform::Platform::emulates`). If
    /// not, [`handle_emulation_failure`] reports it as not handled.
    fn emulates(&self, which: FallbackInstruction) -> bool {
        let _ = which;
        true
    }
    /// The vCPU's state the XSAVE family moves ([`XState`]); only vCPUs
    /// whose platform answers the family
    /// ([`GuestCpu::emulates`]) need it.
    fn xstate(&mut self) -> Result<XState, EmulatorError> {
        Err(EmulatorError::Vcpu("this vCPU has no XSAVE state".into()))
    }
    /// Loads the state an XRSTOR or XRSTORS left in `state`: the image's
    /// user components and IA32_PASID.
    fn set_xstate(&mut self, state: &XState) -> Result<(), EmulatorError> {
        let _ = state;
        Err(EmulatorError::Vcpu("this vCPU has no XSAVE state".into()))
    }
    /// Injects an exception at the vCPU's current state: the frame the guest
    /// sees holds the RIP, CS, RFLAGS, RSP, SS the vCPU has now (so a fault
    /// is injected with RIP still at the instruction; #BP from INT3 after
    /// RIP was advanced). For #PF `cr2` is `Some` and the guest's CR2 must
    /// hold it when its handler runs (`KVM_SET_VCPU_EVENTS` with an
    /// exception payload, or CR2 through `KVM_SET_SREGS`).
    fn inject_exception(
        &mut self,
        vector: u8,
        error_code: Option<u32>,
        cr2: Option<u64>,
    ) -> Result<(), EmulatorError>;
    /// One 64-byte store, not torn, to a guest-physical address: RAM (a
    /// plain write) or a device on the MMIO bus ([`bus::BusDevice::store64`]).
    /// `gpa` is 64-byte aligned. The reply sets ZF for ENQCMD/ENQCMDS and
    /// is ignored for MOVDIR64B; what a store to RAM answers to ENQCMD is the
    /// implementer's choice (documented there).
    fn store64(
        &mut self,
        gpa: u64,
        data: &[u8; 64],
        kind: StoreKind,
    ) -> Result<StoreReply, EmulatorError>;
    /// Reads guest-physical memory that is not RAM as the platform does: a
    /// device on the MMIO bus answers its range; an address no device
    /// claims reads as all ones (a master abort). `data` is at most 8 bytes
    /// and naturally aligned. The default knows no devices.
    fn read_device(&mut self, gpa: u64, data: &mut [u8]) {
        let _ = gpa;
        data.fill(0xff);
    }
    /// Writes guest-physical memory that is not RAM: the device on the MMIO
    /// bus that claims `gpa` gets it; a write nobody claims is dropped.
    /// `data` is at most 8 bytes and naturally aligned. The default knows
    /// no devices.
    fn write_device(&mut self, gpa: u64, data: &[u8]) {
        let _ = (gpa, data);
    }
}

/// A completed 64-byte store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreRecord {
    /// Which instruction.
    pub kind: StoreKind,
    /// Linear destination address (the register operand).
    pub linear: u64,
    /// Guest-physical destination the store went to.
    pub gpa: u64,
    /// The target's answer (ZF for ENQCMD/ENQCMDS).
    pub reply: StoreReply,
}

/// Why an instruction was not emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnhandledReason {
    /// The vCPU is not in 64-bit mode, where alone the fallback emulator
    /// executes the first instruction of a handler it steps over.
    NotLongMode,
    /// The bytes stop short of a whole instruction (or could not be read);
    /// bytes that are no instruction at all get #UD instead.
    Undecodable,
    /// A valid instruction the emulator does not implement.
    UnknownInstruction(Mnemonic),
    /// An operand form the emulator does not take.
    BadOperand,
    /// A memory operand is not in guest RAM.
    OperandNotRam {
        /// Guest-physical address of the operand.
        gpa: u64,
    },
}

impl fmt::Display for UnhandledReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotLongMode => write!(f, "vCPU not in 64-bit mode"),
            Self::Undecodable => write!(f, "not a whole instruction"),
            Self::UnknownInstruction(m) => {
                write!(f, "no emulation for {}", format!("{m:?}").to_lowercase())
            }
            Self::BadOperand => write!(f, "unsupported operand"),
            Self::OperandNotRam { gpa } => write!(f, "memory operand at GPA {gpa:#x} is not RAM"),
        }
    }
}

/// An instruction the emulator did not emulate; the vCPU is unchanged.
/// `Display` is the one-line diagnostic the VMM stops with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unhandled {
    /// RIP of the instruction.
    pub rip: u64,
    /// Its bytes (as many as were known).
    pub bytes: Vec<u8>,
    /// Why.
    pub reason: UnhandledReason,
}

impl fmt::Display for Unhandled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RIP {:#x} bytes [", self.rip)?;
        for (i, b) in self.bytes.iter().enumerate() {
            if i > 0 {
                write!(f, " ")?;
            }
            write!(f, "{b:02x}")?;
        }
        write!(f, "]: {}", self.reason)
    }
}

/// What [`handle_emulation_failure`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// MOVDIR64B, ENQCMD or ENQCMDS completed: RIP advanced, flags set.
    Store(StoreRecord),
    /// A fallback instruction completed: RIP advanced.
    Emulated(FallbackInstruction),
    /// The instruction raised this exception, now injected: RIP at the
    /// instruction for a fault, after it for #BP from INT3.
    Exception(Exception),
    /// The instruction was the `clac` at the entry of the guest's handler
    /// for `vector`, and the entry logic acted (see [`EntryAction`]); the
    /// `clac` itself was not executed. An entry that is not ours, or whose
    /// instruction cannot be emulated (logged), runs the `clac` and is
    /// reported as [`Outcome::Emulated`]: the guest's handler then runs.
    ExceptionEntry {
        /// The exception whose handler was entered.
        vector: u8,
        /// What the entry logic did: [`EntryAction::Emulated`] or
        /// [`EntryAction::Faulted`].
        action: EntryAction,
    },
    /// Nothing changed: other vCPUs kept rewriting the guest's page tables
    /// while the walk set accessed/dirty flags. Resuming executes the
    /// instruction (and exits) again.
    Retry,
    /// Not emulated; the vCPU is unchanged. The caller stops with a
    /// one-line diagnostic naming the exit and this value.
    NotHandled(Unhandled),
}

/// How one emulated instruction ended, before it is applied to the vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step<T> {
    /// Completed; the context holds the new state.
    Completed(T),
    /// Raised before any state change: inject with RIP at the instruction.
    Fault(Exception),
    /// Raised after completion: apply the context, then inject.
    Trap(Exception),
    /// Not executed (the page walk lost a race with other vCPUs): the
    /// guest executes the instruction again.
    Retry,
    /// Not emulated; nothing changes.
    Unsupported(UnhandledReason),
}

impl<T> From<mmu::AccessError> for Step<T> {
    /// A failed operand access; device memory is reported as an operand
    /// that is not RAM.
    fn from(e: mmu::AccessError) -> Self {
        match e {
            mmu::AccessError::Fault(e) => Step::Fault(e),
            mmu::AccessError::NotRam { gpa } => {
                Step::Unsupported(UnhandledReason::OperandNotRam { gpa })
            }
            mmu::AccessError::Contended => Step::Retry,
        }
    }
}

impl<T> Step<T> {
    /// The step with its exception as the CPU delivers it in `ctx`'s mode
    /// (real mode pushes no error code).
    fn delivered_in(self, ctx: &CpuContext) -> Self {
        match self {
            Step::Fault(e) => Step::Fault(ctx.delivered(e)),
            Step::Trap(e) => Step::Trap(ctx.delivered(e)),
            other => other,
        }
    }

    fn map<U>(self, f: impl FnOnce(T) -> U) -> Step<U> {
        match self {
            Step::Completed(t) => Step::Completed(f(t)),
            Step::Fault(e) => Step::Fault(e),
            Step::Trap(e) => Step::Trap(e),
            Step::Retry => Step::Retry,
            Step::Unsupported(r) => Step::Unsupported(r),
        }
    }
}

/// Applies a step to the vCPU: writes the context back if the step changed
/// it (with the segment registers too if `switch_context`, where the
/// context is another privilege level's, which also applies before a
/// fault), then injects the step's exception.
pub(crate) fn apply_step<C: GuestCpu + ?Sized, T>(
    cpu: &mut C,
    ctx: &CpuContext,
    step: &Step<T>,
    switch_context: bool,
) -> Result<(), EmulatorError> {
    let (write_back, exception) = match step {
        Step::Completed(_) => (true, None),
        Step::Trap(e) => (true, Some(e)),
        Step::Fault(e) => (switch_context, Some(e)),
        Step::Retry => (switch_context, None),
        Step::Unsupported(_) => (false, None),
    };
    if write_back {
        if switch_context {
            cpu.set_sregs(&ctx.sregs)?;
        }
        cpu.set_regs(&ctx.regs)?;
    }
    if let Some(e) = exception {
        cpu.inject_exception(e.vector, e.error_code, e.cr2)?;
    }
    Ok(())
}

/// Handles a KVM emulation-failure exit: `insn_bytes` are the bytes from
/// the exit (empty if KVM gave none: they are then fetched at RIP), the
/// vCPU's RIP is at the instruction. Dispatches by decoded instruction to
/// the 64-byte stores or the fallback emulator, applies the result to the
/// vCPU and says what happened.
pub fn handle_emulation_failure<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    insn_bytes: &[u8],
) -> Result<Outcome, EmulatorError> {
    let mut ctx = CpuContext::capture(cpu)?;
    let rip = ctx.regs.rip;
    let bitness = ctx.code_bitness();
    let bytes = if insn_bytes.is_empty() {
        mmu::fetch_instruction(cpu.memory(), &ctx, rip, Privilege::of(&ctx))
            .map(|bytes| bytes.to_vec())
            .unwrap_or_default()
    } else {
        insn_bytes[..insn_bytes.len().min(mmu::MAX_INSN_LEN)].to_vec()
    };
    let not_handled =
        |bytes: Vec<u8>, reason| Ok(Outcome::NotHandled(Unhandled { rip, bytes, reason }));
    let instr = decode::decode(&bytes, bitness, rip);
    let undefined = match &instr {
        Some(i) => matches!(i.mnemonic(), Mnemonic::Ud0 | Mnemonic::Ud1 | Mnemonic::Ud2),
        None => decode::is_undefined(&bytes, bitness, rip),
    };
    if undefined {
        // No instruction at all, or one defined to raise it: the CPU's
        // answer is #UD.
        let ud = Exception::ud();
        apply_step::<C, ()>(cpu, &ctx, &Step::Fault(ud), false)?;
        return Ok(Outcome::Exception(ud));
    }
    let Some(instr) = instr else {
        return not_handled(bytes, UnhandledReason::Undecodable);
    };
    let bytes = bytes[..instr.len().min(bytes.len())].to_vec();

    let step = if let Some(kind) = direct_store::store_kind(&instr) {
        direct_store::execute(cpu, &mut ctx, &instr, kind)?.map(Outcome::Store)
    } else if let Some(which) = FallbackInstruction::of(&instr).filter(|w| cpu.emulates(*w)) {
        // A handler entry is 64-bit code: in IA-32e mode every IDT gate
        // leads to a 64-bit code segment.
        if which == FallbackInstruction::Clac
            && ctx.is_64bit_mode()
            && ctx.cpl() == 0
            && entry::is_entry(&ctx, cpu.memory(), rip, crate::x86::vector::UD)
        {
            match entry::store_entry(cpu, &ctx, crate::x86::vector::UD)? {
                EntryAction::PassThrough => {}
                // The vCPU is unchanged: the guest's handler runs and the
                // user process sees its #UD.
                EntryAction::NotHandled(u) => log::warn!("{u}; #UD left to the guest"),
                action => {
                    return Ok(Outcome::ExceptionEntry {
                        vector: crate::x86::vector::UD,
                        action,
                    })
                }
            }
        }
        fallback::execute(cpu, &mut ctx, &instr, which)?.map(Outcome::Emulated)
    } else {
        Step::Unsupported(UnhandledReason::UnknownInstruction(instr.mnemonic()))
    };

    let step = step.delivered_in(&ctx);
    apply_step(cpu, &ctx, &step, false)?;
    Ok(match step {
        Step::Completed(outcome) => outcome,
        Step::Fault(e) | Step::Trap(e) => Outcome::Exception(e),
        Step::Retry => Outcome::Retry,
        Step::Unsupported(reason) => Outcome::NotHandled(Unhandled { rip, bytes, reason }),
    })
}
