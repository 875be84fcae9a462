//! "The VMM sees guest exception entries": a guest's ENQCMD, ENQCMDS or
//! MOVDIR64B that the host CPU turned into an exception, answered at the
//! entry of the guest's handler.
//!
//! Two routes end here, each with the vCPU at CPL 0 at the handler's
//! entry, RSP at the hardware exception frame and the interrupted
//! context's general registers untouched:
//!
//! - **#UD**: the host CPU lacks the instruction (every AMD CPU lacks
//!   ENQCMD, most CPUs lack MOVDIR64B). This happens at CPL 3 (a process's
//!   ENQCMD) and at CPL 0 (Linux's idxd submits to kernel work queues with
//!   ENQCMDS and MOVDIR64B).
//! - **#GP(0)**: the host CPU has ENQCMD, but the hardware IA32_PASID is the
//!   VMM thread's, not the guest's, so the guest's ENQCMD faults before its
//!   store. The VMM keeps the guest's IA32_PASID and answers the ENQCMD
//!   with it.
//!
//! The VMM gets control at the handler's entry by a hardware execution
//! breakpoint on it (`crate::entry_watch`, DR = [`idt_handler`]; RIP =
//! handler), or, for #UD on PVM with SMAP visible to a Linux guest, by the
//! emulation-failure exit of the `clac` after `endbr64` at Linux's entry
//! points (RIP = handler + 4; [`super::handle_emulation_failure`] checks
//! every CPL 0 `clac` with [`is_exception_entry`] and comes here itself).
//!
//! If the frame describes an IA-32e context, 64-bit or compatibility mode
//! (a 32-bit process, or 32-bit kernel code; the frame itself is the 64-bit
//! one either way), with CS/SS from the GDT, or for a kernel context the CS
//! and SS the handler runs with where the frame names them (a
//! same-privilege delivery keeps them), whose instruction at the frame's RIP is one of the three (for #GP
//! only ENQCMD, with error code 0), it is emulated in that context, and the
//! vCPU returns there as IRETQ would: RIP, CS, RFLAGS, RSP and SS from the
//! frame (in IA-32e mode IRETQ pops SS:RSP at every privilege level, so a
//! kernel context gets its own stack pointer back and the frame is
//! dropped), with RIP advanced and ZF set from the device's answer, or with
//! the instruction's exception delivered from that context (RIP at the
//! instruction). If emulating raises exactly the exception being delivered
//! (e.g. the guest's own IA32_PASID is not valid either), the guest's
//! handler already has the architectural answer and runs.
//!
//! Outside IA-32e mode (a protected-mode or real-mode handler, reached
//! through an 8-byte gate or the IVT) the frame is the one the gate
//! pushes: IP, CS, FLAGS as words in real mode and through 16-bit gates,
//! EIP, CS, EFLAGS as doublewords through 32-bit gates, with the error
//! code below them (not in real mode) and the outer SS:ESP above them
//! when the delivery changed privilege. The instruction is emulated in
//! the context the frame describes, and the vCPU returns there as IRET
//! would (CS and SS from their descriptors; in real mode CS's base is its
//! selector times 16), or gets the instruction's exception delivered there
//! (in real mode without an error code). A frame from virtual-8086 mode is
//! left to the guest.
//!
//! Anything else is left to the guest's own handler, untouched.

use kvm_bindings::kvm_segment;
use vm_memory::Bytes;

use super::context::{CpuContext, CpuMode, LINEAR32_MASK};
use super::decode::decode;
use super::direct_store::{self, store_kind};
use super::exception::Exception;
use super::mmu::{fetch_instruction, read_linear, translate, AccessKind, Privilege, PAGE_SIZE};
use super::{apply_step, EmulatorError, GuestCpu, Step, StoreRecord, Unhandled};
use crate::x86::{efer, rflags, vector, ENDBR64, SELECTOR_RPL_MASK, SELECTOR_TI};

/// What [`handle_exception_entry`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EntryAction {
    /// Not ours: the vCPU is unchanged and the guest's handler runs.
    PassThrough,
    /// The instruction was emulated; the vCPU is back in the interrupted
    /// (user or kernel) context after it.
    Emulated(StoreRecord),
    /// The instruction faulted; the vCPU is back in the interrupted context
    /// at the instruction and this exception has been injected.
    Faulted(Exception),
    /// The page walk lost a race with other vCPUs: the vCPU is back in the
    /// interrupted context at the instruction, which runs (and traps) again.
    Retry,
    /// The instruction is ours but could not be emulated (e.g. its source is
    /// device memory). The vCPU is unchanged: the caller stops with the
    /// diagnostic, or lets the guest's handler run.
    NotHandled(Unhandled),
}

/// The frame a 64-bit mode CPU pushes when it delivers an exception; for a
/// protected- or real-mode handler, the frame its gate pushes, with the
/// interrupted context's stack pointer and SS also where a delivery
/// without privilege change does not push them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExceptionFrame {
    /// Error code, for the vectors that push one.
    pub error_code: Option<u64>,
    /// RIP of the interrupted context (the faulting instruction for faults).
    pub rip: u64,
    /// Code-segment selector of the interrupted context.
    pub cs: u16,
    /// RFLAGS of the interrupted context.
    pub rflags: u64,
    /// Stack pointer of the interrupted context.
    pub rsp: u64,
    /// Stack-segment selector of the interrupted context.
    pub ss: u16,
}

impl ExceptionFrame {
    /// The interrupted context ran at CPL 3.
    pub fn from_user(&self) -> bool {
        self.cs & SELECTOR_RPL_MASK == 3
    }
}

fn read_u64s<const N: usize>(
    ctx: &CpuContext,
    mem: &vm_memory::GuestMemoryMmap,
    va: u64,
) -> Option<[u64; N]> {
    // At most a frame's five quadwords: read into the stack, not the heap.
    let mut whole = [0u8; 8 * 8];
    let buf = whole.get_mut(..N * 8)?;
    read_linear(mem, ctx, va, buf, AccessKind::Read, Privilege::Implicit).ok()?;
    let mut out = [0u64; N];
    for (o, chunk) in out.iter_mut().zip(buf.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        *o = u64::from_le_bytes(b);
    }
    Some(out)
}

/// The frame at `ctx`'s RSP for an exception with vector `v`.
pub(crate) fn frame_at(
    ctx: &CpuContext,
    mem: &vm_memory::GuestMemoryMmap,
    v: u8,
) -> Option<ExceptionFrame> {
    let (error_code, base) = if vector::has_error_code(v) {
        (
            Some(read_u64s::<1>(ctx, mem, ctx.regs.rsp)?[0]),
            ctx.regs.rsp.wrapping_add(8),
        )
    } else {
        (None, ctx.regs.rsp)
    };
    let [rip, cs, rflags, rsp, ss] = read_u64s::<5>(ctx, mem, base)?;
    Some(ExceptionFrame {
        error_code,
        rip,
        cs: cs as u16,
        rflags,
        rsp,
        ss: ss as u16,
    })
}

/// Reads the exception frame at the vCPU's RSP, as found at the entry of
/// the handler for `vector`: the 64-bit frame in IA-32e mode, outside it
/// the frame its gate pushes (see [`legacy_interrupted`]). `None` if the
/// stack is not readable or the frame describes no context the VMM takes.
pub fn read_exception_frame<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    vector: u8,
) -> Result<Option<ExceptionFrame>, EmulatorError> {
    let ctx = CpuContext::capture(cpu)?;
    if ctx.sregs.efer & efer::LMA == 0 {
        return Ok(legacy_interrupted(&ctx, cpu.memory(), vector).map(|(frame, _)| frame));
    }
    Ok(frame_at(&ctx, cpu.memory(), vector))
}

/// An interrupt or trap gate outside IA-32e mode (SDM Vol. 3A, 6.10-6.12,
/// 20.1.4): an 8-byte IDT gate in protected mode, a 4-byte IVT entry
/// (offset, segment) in real mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LegacyGate {
    /// Linear address of the handler.
    handler: u64,
    /// Bytes per value the delivery pushes: 2 for a 16-bit gate and in
    /// real mode, 4 for a 32-bit gate.
    slot: u64,
}

/// The gate for `v` in the IDT (protected mode) or IVT (real mode) at
/// IDTR, within its limit. Task gates, absent gates and gates whose
/// selector names no present code segment are `None`: the VMM does not
/// watch them.
fn legacy_gate(ctx: &CpuContext, mem: &vm_memory::GuestMemoryMmap, v: u8) -> Option<LegacyGate> {
    const IVT_ENTRY: u64 = 4;
    const GATE_SIZE: u64 = 8;
    const GATE_PRESENT: u64 = 1 << 47;
    const GATE16_INTERRUPT: u64 = 0x6;
    const GATE16_TRAP: u64 = 0x7;
    const GATE32_INTERRUPT: u64 = 0xe;
    const GATE32_TRAP: u64 = 0xf;
    const CODE: u8 = 1 << 3;
    let idt = &ctx.sregs.idt;
    let entry_size = match ctx.mode() {
        CpuMode::Real => IVT_ENTRY,
        CpuMode::Protected => GATE_SIZE,
        CpuMode::Long64 | CpuMode::Compat => return None,
    };
    let offset = u64::from(v) * entry_size;
    if offset + entry_size - 1 > u64::from(idt.limit) {
        return None;
    }
    let at = idt.base.wrapping_add(offset) & LINEAR32_MASK;
    if entry_size == IVT_ENTRY {
        let mut e = [0u8; IVT_ENTRY as usize];
        read_linear(mem, ctx, at, &mut e, AccessKind::Read, Privilege::Implicit).ok()?;
        let ip = u64::from(u16::from_le_bytes([e[0], e[1]]));
        let segment = u64::from(u16::from_le_bytes([e[2], e[3]]));
        return Some(LegacyGate {
            handler: (segment << 4) + ip,
            slot: 2,
        });
    }
    let [g] = read_u64s::<1>(ctx, mem, at)?;
    if g & GATE_PRESENT == 0 {
        return None;
    }
    let slot = match (g >> 40) & 0xf {
        GATE16_INTERRUPT | GATE16_TRAP => 2,
        GATE32_INTERRUPT | GATE32_TRAP => 4,
        _ => return None,
    };
    let offset = (g & 0xffff) | ((g >> 32) & 0xffff_0000);
    let offset = if slot == 2 { offset & 0xffff } else { offset };
    let cs = load_descriptor(ctx, mem, (g >> 16) as u16, &mut None)?;
    if cs.present != 1 || cs.s != 1 || cs.type_ & CODE == 0 {
        return None;
    }
    Some(LegacyGate {
        handler: cs.base.wrapping_add(offset) & LINEAR32_MASK,
        slot,
    })
}

/// An IA-32e mode IDT gate (SDM Vol. 3A, 6.14.1): 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Gate64 {
    pub present: bool,
    pub selector: u16,
    /// Interrupt-stack-table index (0: none).
    pub ist: u8,
    pub handler: u64,
}

impl Gate64 {
    pub const SIZE: u64 = 16;

    /// Decodes the gate's two quadwords.
    pub fn from_quads(lo: u64, hi: u64) -> Self {
        Gate64 {
            present: lo & (1 << 47) != 0,
            selector: (lo >> 16) as u16,
            ist: ((lo >> 32) & 0x7) as u8,
            handler: (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | ((hi & 0xffff_ffff) << 32),
        }
    }

    /// Where gate `v` lies in an IDT at `base` with `limit`, if inside it.
    pub fn address(base: u64, limit: u16, v: u8) -> Option<u64> {
        let offset = u64::from(v) * Self::SIZE;
        (offset + Self::SIZE - 1 <= u64::from(limit)).then(|| base.wrapping_add(offset))
    }
}

/// Handler address in the IDT gate for `v` (present gates only): the
/// 16-byte gates of IA-32e mode, or outside it [`legacy_gate`].
pub(crate) fn gate_handler(
    ctx: &CpuContext,
    mem: &vm_memory::GuestMemoryMmap,
    v: u8,
) -> Option<u64> {
    if ctx.sregs.efer & efer::LMA == 0 {
        return legacy_gate(ctx, mem, v).map(|g| g.handler);
    }
    let at = Gate64::address(ctx.sregs.idt.base, ctx.sregs.idt.limit, v)?;
    let [lo, hi] = read_u64s::<2>(ctx, mem, at)?;
    let gate = Gate64::from_quads(lo, hi);
    gate.present.then_some(gate.handler)
}

/// The handler address the guest's IDT gives for `vector`: where a VMM puts
/// an execution breakpoint to see that exception's entries. `None` if the
/// gate is absent or unreadable.
pub fn idt_handler<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    vector: u8,
) -> Result<Option<u64>, EmulatorError> {
    let ctx = CpuContext::capture(cpu)?;
    Ok(gate_handler(&ctx, cpu.memory(), vector))
}

/// Whether `rip` is the entry of the handler for `v`: the handler's first
/// byte, or the instruction after an ENDBR64 there (where Linux's `clac` is).
pub(crate) fn is_entry(
    ctx: &CpuContext,
    mem: &vm_memory::GuestMemoryMmap,
    rip: u64,
    v: u8,
) -> bool {
    let Some(handler) = gate_handler(ctx, mem, v) else {
        return false;
    };
    if rip == handler {
        return true;
    }
    if rip != handler.wrapping_add(ENDBR64.len() as u64) {
        return false;
    }
    let mut bytes = [0u8; ENDBR64.len()];
    read_linear(
        mem,
        ctx,
        handler,
        &mut bytes,
        AccessKind::Fetch,
        Privilege::Implicit,
    )
    .is_ok()
        && bytes == ENDBR64
}

/// Whether the vCPU's RIP is at the entry of the guest's handler for
/// `vector`: the handler address, or handler + 4 after an ENDBR64 there.
pub fn is_exception_entry<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    vector: u8,
) -> Result<bool, EmulatorError> {
    let ctx = CpuContext::capture(cpu)?;
    Ok(is_entry(&ctx, cpu.memory(), ctx.regs.rip, vector))
}

/// The descriptor-table page a CPU loading several segments walks once:
/// (linear, guest-physical) page address of the last descriptor read.
type TablePage = Option<(u64, u64)>;

/// The descriptor at `va`, read through `page` when it is the same page
/// (an IRET's CS and SS descriptors sit side by side in every OS's GDT),
/// else translated and remembered there.
fn read_descriptor(
    ctx: &CpuContext,
    mem: &vm_memory::GuestMemoryMmap,
    va: u64,
    page: &mut TablePage,
) -> Option<u64> {
    const DESC_SIZE: u64 = 8;
    let offset = va % PAGE_SIZE;
    if offset > PAGE_SIZE - DESC_SIZE {
        // Straddles two pages: walk both.
        return read_u64s::<1>(ctx, mem, va).map(|[d]| d);
    }
    let linear = va - offset;
    let phys = match *page {
        Some((l, p)) if l == linear => p,
        _ => {
            let p = translate(mem, ctx, linear, AccessKind::Read, Privilege::Implicit).ok()?;
            *page = Some((linear, p));
            p
        }
    };
    let mut d = [0u8; 8];
    mem.read_slice(&mut d, vm_memory::GuestAddress(phys + offset))
        .ok()?;
    Some(u64::from_le_bytes(d))
}

/// The segment register state a descriptor in the GDT, or for a selector
/// with TI set in the LDT (a 32-bit process's own code segment, as Wine
/// makes them), loads; the table's page is walked through `page`.
fn load_descriptor(
    ctx: &CpuContext,
    mem: &vm_memory::GuestMemoryMmap,
    selector: u16,
    page: &mut TablePage,
) -> Option<kvm_segment> {
    const DESC_SIZE: u64 = 8;
    let offset = u64::from(selector & !7);
    let (base, limit) = if selector & SELECTOR_TI != 0 {
        let ldt = &ctx.sregs.ldt;
        if ldt.unusable != 0 || ldt.present == 0 {
            return None;
        }
        (ldt.base, u64::from(ldt.limit))
    } else if offset == 0 {
        // The null selector.
        return None;
    } else {
        (ctx.sregs.gdt.base, u64::from(ctx.sregs.gdt.limit))
    };
    if offset + DESC_SIZE - 1 > limit {
        return None;
    }
    let d = read_descriptor(ctx, mem, base.wrapping_add(offset), page)?;
    let access = (d >> 40) as u8;
    let flags = ((d >> 52) & 0xf) as u8;
    let raw_limit = ((d & 0xffff) | ((d >> 32) & 0xf_0000)) as u32;
    let g = (flags >> 3) & 1;
    Some(kvm_segment {
        base: ((d >> 16) & 0xff_ffff) | ((d >> 32) & 0xff00_0000),
        limit: if g != 0 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        // Loading a segment sets its descriptor's accessed bit.
        type_: (access & 0xf) | 1,
        present: access >> 7,
        dpl: (access >> 5) & 3,
        db: (flags >> 2) & 1,
        s: (access >> 4) & 1,
        l: (flags >> 1) & 1,
        g,
        avl: flags & 1,
        unusable: 0,
        padding: 0,
    })
}

/// A code segment of IA-32e mode at `dpl`: present, code, and either
/// 64-bit (L=1, D=0) or compatibility mode (L=0, D=1 for 32-bit or D=0
/// for 16-bit code).
fn is_ia32e_code(s: &kvm_segment, dpl: u8) -> bool {
    const CODE: u8 = 1 << 3;
    s.present == 1 && s.s == 1 && s.type_ & CODE != 0 && s.dpl == dpl && !(s.l == 1 && s.db == 1)
}

/// A user stack segment: present, writable data, DPL 3.
fn is_user_stack(s: &kvm_segment) -> bool {
    const CODE: u8 = 1 << 3;
    const WRITABLE: u8 = 1 << 1;
    s.present == 1 && s.s == 1 && s.type_ & CODE == 0 && s.type_ & WRITABLE != 0 && s.dpl == 3
}

/// The interrupted user context (64-bit or compatibility mode) described
/// by `frame`, on top of the handler-entry state `kernel` (general
/// registers, DS/ES/FS/GS, control registers are the user's: exception
/// delivery does not change them).
fn user_context(
    kernel: &CpuContext,
    mem: &vm_memory::GuestMemoryMmap,
    frame: &ExceptionFrame,
) -> Option<CpuContext> {
    let mut page = None;
    let cs = load_descriptor(kernel, mem, frame.cs, &mut page)?;
    let ss = load_descriptor(kernel, mem, frame.ss, &mut page)?;
    if !is_ia32e_code(&cs, 3) || !is_user_stack(&ss) {
        return None;
    }
    Some(interrupted(kernel, frame, cs, ss))
}

/// The handler-entry state `kernel` with what IRETQ would load from
/// `frame` (RIP, RFLAGS, RSP) and the segment state `cs`, `ss` for its
/// selectors.
fn interrupted(
    kernel: &CpuContext,
    frame: &ExceptionFrame,
    cs: kvm_segment,
    ss: kvm_segment,
) -> CpuContext {
    let mut ctx = *kernel;
    ctx.regs.rip = frame.rip;
    ctx.regs.rsp = frame.rsp;
    ctx.regs.rflags = frame.rflags;
    ctx.sregs.cs = cs;
    ctx.sregs.ss = ss;
    ctx
}

/// The interrupted kernel (CPL 0) context, 64-bit or compatibility mode,
/// described by `frame`, on top of the handler-entry state `kernel`. An exception at CPL 0 is
/// delivered without a privilege change: CS is the gate's (Linux's kernel
/// CS, as the interrupted one) and SS is not reloaded, so both are taken
/// from the handler's state when the frame names the same selectors; a
/// different CS is read from the GDT, a different null SS (which 64-bit
/// mode allows at CPL 0) is loaded unusable, like the CPU does.
fn kernel_context(
    kernel: &CpuContext,
    mem: &vm_memory::GuestMemoryMmap,
    frame: &ExceptionFrame,
) -> Option<CpuContext> {
    if frame.cs & SELECTOR_RPL_MASK != 0 {
        return None;
    }
    let cs = if frame.cs == kernel.sregs.cs.selector {
        kernel.sregs.cs
    } else {
        load_descriptor(kernel, mem, frame.cs, &mut None)?
    };
    if !is_ia32e_code(&cs, 0) {
        return None;
    }
    let ss = if frame.ss == kernel.sregs.ss.selector {
        kernel.sregs.ss
    } else if frame.ss & !SELECTOR_RPL_MASK == 0 {
        kvm_segment {
            selector: frame.ss,
            unusable: 1,
            ..Default::default()
        }
    } else {
        let ss = load_descriptor(kernel, mem, frame.ss, &mut None)?;
        if ss.dpl != 0 || ss.present != 1 {
            return None;
        }
        ss
    };
    Some(interrupted(kernel, frame, cs, ss))
}

/// The frame and the interrupted context at the entry of the handler for
/// `v` outside IA-32e mode, on top of the handler-entry state `handler`
/// (SDM Vol. 3A, 6.12.1 and 20.1.4). The frame's width is the gate's:
/// real mode and 16-bit gates push IP, CS, FLAGS as words, 32-bit gates
/// EIP, CS, EFLAGS as doublewords; protected mode adds the error code
/// below them, and SS:ESP above them when the delivery changed privilege.
/// The context is what IRET would load from it: in real mode CS's selector
/// and base (its other attributes stay), in protected mode CS (and SS) from
/// their descriptors; a 16-bit frame replaces only the low word of FLAGS.
/// A frame from virtual-8086 mode (EFLAGS.VM) is not handled: `None`.
fn legacy_interrupted(
    handler: &CpuContext,
    mem: &vm_memory::GuestMemoryMmap,
    v: u8,
) -> Option<(ExceptionFrame, CpuContext)> {
    const CODE: u8 = 1 << 3;
    const CONFORMING: u8 = 1 << 2;
    const WRITABLE: u8 = 1 << 1;
    let slot = legacy_gate(handler, mem, v)?.slot;
    let real = handler.mode() == CpuMode::Real;
    let stack = handler.sregs.ss;
    let sp_mask: u64 = if stack.db != 0 { 0xffff_ffff } else { 0xffff };
    let sp = handler.regs.rsp & sp_mask;
    let mut popped = 0;
    let mut pop = || -> Option<u64> {
        let mut b = [0u8; 4];
        let at = stack.base.wrapping_add(sp.wrapping_add(popped) & sp_mask) & LINEAR32_MASK;
        read_linear(
            mem,
            handler,
            at,
            &mut b[..slot as usize],
            AccessKind::Read,
            Privilege::Implicit,
        )
        .ok()?;
        popped += slot;
        Some(u64::from(u32::from_le_bytes(b)))
    };
    let error_code = if !real && vector::has_error_code(v) {
        Some(pop()?)
    } else {
        None
    };
    let ip = pop()?;
    let cs = pop()? as u16;
    let flags = pop()?;
    if flags & rflags::VM != 0 {
        return None;
    }
    // CS and SS descriptors share one walk of their table page.
    let mut page = None;
    let mut ctx = *handler;
    ctx.regs.rip = ip;
    ctx.regs.rflags = if slot == 2 {
        (handler.regs.rflags & !0xffff) | flags
    } else {
        flags
    } | rflags::FIXED;
    let rpl = (cs & SELECTOR_RPL_MASK) as u8;
    if real {
        ctx.sregs.cs.selector = cs;
        ctx.sregs.cs.base = u64::from(cs) << 4;
    } else {
        ctx.sregs.cs = if cs == handler.sregs.cs.selector {
            handler.sregs.cs
        } else {
            load_descriptor(handler, mem, cs, &mut page)?
        };
        let c = &ctx.sregs.cs;
        let dpl_ok = if c.type_ & CONFORMING != 0 {
            c.dpl <= rpl
        } else {
            c.dpl == rpl
        };
        if c.present != 1 || c.s != 1 || c.type_ & CODE == 0 || !dpl_ok {
            return None;
        }
    }
    let (rsp, ss) = if !real && rpl != handler.cpl() {
        // An outer-privilege context: its SS:ESP is in the frame.
        let rsp = pop()?;
        let ss = pop()? as u16;
        let seg = load_descriptor(handler, mem, ss, &mut page)?;
        let stack_ok = seg.present == 1
            && seg.s == 1
            && seg.type_ & CODE == 0
            && seg.type_ & WRITABLE != 0
            && seg.dpl == rpl
            && (ss & SELECTOR_RPL_MASK) as u8 == rpl;
        if !stack_ok {
            return None;
        }
        ctx.sregs.ss = seg;
        (rsp, ss)
    } else {
        let rsp = (handler.regs.rsp & !sp_mask) | (sp.wrapping_add(popped) & sp_mask);
        (rsp, stack.selector)
    };
    ctx.regs.rsp = rsp;
    let frame = ExceptionFrame {
        error_code,
        rip: ip,
        cs,
        rflags: ctx.regs.rflags,
        rsp,
        ss,
    };
    Some((frame, ctx))
}

/// The entry logic for #UD or #GP on an already captured handler-entry
/// state (see the module doc).
pub(crate) fn store_entry<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    handler: &CpuContext,
    v: u8,
) -> Result<EntryAction, EmulatorError> {
    if !matches!(v, vector::UD | vector::GP) {
        return Ok(EntryAction::PassThrough);
    }
    let mem = cpu.memory();
    let (frame, interrupted) = if handler.is_64bit_mode() {
        let Some(frame) = frame_at(handler, mem, v) else {
            return Ok(EntryAction::PassThrough);
        };
        if v == vector::GP && frame.error_code != Some(0) {
            return Ok(EntryAction::PassThrough);
        }
        let interrupted = if frame.from_user() {
            user_context(handler, mem, &frame)
        } else {
            kernel_context(handler, mem, &frame)
        };
        let Some(interrupted) = interrupted else {
            log::debug!(
                "vector {v} from RIP {:#x}: CS {:#x}/SS {:#x} not an IA-32e context, left to the guest",
                frame.rip,
                frame.cs,
                frame.ss
            );
            return Ok(EntryAction::PassThrough);
        };
        (frame, interrupted)
    } else if matches!(handler.mode(), CpuMode::Protected | CpuMode::Real) {
        let Some((frame, interrupted)) = legacy_interrupted(handler, mem, v) else {
            log::debug!(
                "vector {v}: no frame of a protected- or real-mode context, left to the guest"
            );
            return Ok(EntryAction::PassThrough);
        };
        if v == vector::GP && frame.error_code != Some(0) {
            return Ok(EntryAction::PassThrough);
        }
        (frame, interrupted)
    } else {
        // IA-32e mode delivers every exception to 64-bit code.
        return Ok(EntryAction::PassThrough);
    };
    let privilege = Privilege::of(&interrupted);
    let Ok(bytes) = fetch_instruction(mem, &interrupted, frame.rip, privilege) else {
        return Ok(EntryAction::PassThrough);
    };
    let Some(instr) = decode(&bytes, interrupted.code_bitness(), frame.rip) else {
        return Ok(EntryAction::PassThrough);
    };
    let Some(kind) = store_kind(&instr) else {
        return Ok(EntryAction::PassThrough);
    };
    // Only ENQCMD depends on IA32_PASID; any other #GP is the guest's.
    if v == vector::GP && kind != bus::StoreKind::Enqcmd {
        return Ok(EntryAction::PassThrough);
    }
    let mut ctx = interrupted;
    // Real mode pushes no error code.
    let step = direct_store::execute(cpu, &mut ctx, &instr, kind)?.delivered_in(&ctx);
    if let Step::Fault(e) = &step {
        if e.vector == v && e.error_code.map(u64::from) == frame.error_code {
            // The exception being delivered is the architectural answer.
            return Ok(EntryAction::PassThrough);
        }
    }
    apply_step(cpu, &ctx, &step, true)?;
    Ok(match step {
        Step::Completed(record) => EntryAction::Emulated(record),
        Step::Fault(e) | Step::Trap(e) => EntryAction::Faulted(e),
        Step::Retry => EntryAction::Retry,
        Step::Unsupported(reason) => EntryAction::NotHandled(Unhandled {
            rip: frame.rip,
            bytes: bytes[..instr.len().min(bytes.len())].to_vec(),
            reason,
        }),
    })
}

/// Called when the VMM has control at the entry of the guest's handler for
/// `vector` (RSP at the hardware exception frame, nothing of the handler
/// executed except an ENDBR64): by a breakpoint on [`idt_handler`], or, in
/// Linux on PVM, at the `clac` after ENDBR64, which
/// [`super::handle_emulation_failure`] routes here itself. For #UD from a
/// user or kernel context in any mode but virtual-8086 whose instruction is ENQCMD, ENQCMDS or
/// MOVDIR64B, and for #GP(0) from one whose instruction is ENQCMD: emulates
/// it and returns to the interrupted context, or delivers its exception
/// there. Anything else: [`EntryAction::PassThrough`].
pub fn handle_exception_entry<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    vector: u8,
) -> Result<EntryAction, EmulatorError> {
    let handler = CpuContext::capture(cpu)?;
    store_entry(cpu, &handler, vector)
}

/// What [`step_over_handler_entry`] executed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StepOver {
    /// A no-op (`nop` of any length, `endbr64`) skipped.
    Skipped(u64),
    /// An instruction the fallback emulator executed (Linux's `clac`).
    Emulated(super::FallbackInstruction),
    /// Neither: the vCPU is unchanged.
    NotHandled(Unhandled),
}

/// Executes the first instruction of a guest exception handler, where a
/// VMM execution breakpoint stopped the vCPU, so that the guest's handler
/// can go on without the breakpoint firing again.
///
/// What the guest did: took an exception whose handler the VMM watches
/// (`crate::entry_watch`), the VMM looked and left it to the guest. Why
/// the VMM answers so: this platform's KVM re-fires an instruction
/// breakpoint whatever RFLAGS.RF says (measured), so resuming at the
/// breakpoint would loop. Linux's entry points begin with `endbr64` (IBT
/// kernels) or the slot of `clac` (a 3-byte NOP when SMAP is off, `clac`
/// when on); micro-guests' handlers with `endbr64` or `nop`. Outside
/// 64-bit mode (a protected- or real-mode handler) only a no-op (`nop`,
/// `endbr32`) is stepped over.
pub fn step_over_handler_entry<C: GuestCpu + ?Sized>(
    cpu: &mut C,
) -> Result<StepOver, EmulatorError> {
    use iced_x86::Mnemonic;

    let mut ctx = CpuContext::capture(cpu)?;
    let rip = ctx.regs.rip;
    let not_handled =
        |bytes: Vec<u8>, reason| Ok(StepOver::NotHandled(Unhandled { rip, bytes, reason }));
    let Ok(bytes) = fetch_instruction(cpu.memory(), &ctx, rip, Privilege::of(&ctx)) else {
        return not_handled(Vec::new(), super::UnhandledReason::Undecodable);
    };
    let Some(instr) = decode(&bytes, ctx.code_bitness(), rip) else {
        return not_handled(bytes.to_vec(), super::UnhandledReason::Undecodable);
    };
    if matches!(
        instr.mnemonic(),
        Mnemonic::Nop | Mnemonic::Endbr64 | Mnemonic::Endbr32
    ) {
        ctx.regs.rip = ctx.next_ip(&instr);
        cpu.set_regs(&ctx.regs)?;
        return Ok(StepOver::Skipped(instr.len() as u64));
    }
    let bytes = bytes[..instr.len().min(bytes.len())].to_vec();
    if !ctx.is_64bit_mode() {
        // Outside 64-bit mode only no-ops are stepped over.
        return not_handled(bytes, super::UnhandledReason::NotLongMode);
    }
    let Some(which) = super::FallbackInstruction::of(&instr) else {
        return not_handled(
            bytes,
            super::UnhandledReason::UnknownInstruction(instr.mnemonic()),
        );
    };
    let step = super::fallback::execute(cpu, &mut ctx, &instr, which)?;
    apply_step(cpu, &ctx, &step, false)?;
    Ok(match step {
        Step::Unsupported(reason) => StepOver::NotHandled(Unhandled { rip, bytes, reason }),
        _ => StepOver::Emulated(which),
    })
}
