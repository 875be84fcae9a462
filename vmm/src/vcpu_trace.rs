//! What a vCPU did just before it stopped: a fixed ring of its last exits
//! and, when the guest triple-faults (KVM_EXIT_SHUTDOWN), a report of its
//! state for the user.
//!
//! A kernel developer whose guest triple-faults needs the registers, the
//! descriptor tables, the pending events and the last things the VMM did
//! for that vCPU (which of its own routes answered an exit: an
//! exception-entry #UD/#GP, a reflected #DB, an emulation failure, an
//! ENQCMD and the device's answer, and how long the exit took). Recording
//! costs no allocation: each exit overwrites one slot of the ring, and the
//! state the VMM resumes the vCPU with is copied into one fixed slot.
//!
//! Some KVMs (AMD SVM's, whose VMCB is undefined after a shutdown
//! intercept) reset the vCPU to its INIT state before they report the
//! shutdown. The report says so when it sees that state, and then the state
//! the VMM last resumed the vCPU with and the ring are what is left of the
//! guest's.

use std::fmt::Write as _;
use std::time::Instant;

use bus::{StoreKind, StoreReply};
use kvm_bindings::{
    kvm_dtable, kvm_regs, kvm_run, kvm_segment, kvm_sregs, kvm_vcpu_events, KVM_EXIT_DEBUG,
    KVM_EXIT_HLT, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_INTR, KVM_EXIT_IO, KVM_EXIT_IO_OUT,
    KVM_EXIT_MMIO, KVM_EXIT_SHUTDOWN, KVM_EXIT_SYSTEM_EVENT, KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR,
};
use kvm_ioctls::VcpuFd;

use crate::emulator::{EntryAction, Exception, FallbackInstruction, Outcome};

/// How many exits the ring keeps.
pub const EXIT_RING_LEN: usize = 32;

/// The selector and RIP the INIT state gives a vCPU (reset vector
/// F000:FFF0, SDM Vol. 3A, 10.1.4).
const INIT_CS_SELECTOR: u16 = 0xf000;
const INIT_RIP: u64 = 0xfff0;

/// What the VMM's entry logic did with a watched exception entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryRoute {
    /// Not the VMM's: the guest's handler runs.
    PassThrough,
    /// A 64-byte store emulated; for ENQCMD/ENQCMDS the device's answer.
    Store(StoreKind, u64, StoreReply),
    /// The instruction's exception delivered in the interrupted context.
    Faulted(Exception),
    /// The page walk lost a race: the instruction runs again.
    Retry,
    /// The VMM's instruction, not emulated: the guest's handler runs.
    NotHandled,
}

impl EntryRoute {
    /// The route of an [`EntryAction`].
    pub fn of(action: &EntryAction) -> Self {
        match action {
            EntryAction::PassThrough => Self::PassThrough,
            EntryAction::Emulated(r) => Self::Store(r.kind, r.gpa, r.reply),
            EntryAction::Faulted(e) => Self::Faulted(*e),
            EntryAction::Retry => Self::Retry,
            EntryAction::NotHandled(_) => Self::NotHandled,
        }
    }
}

/// Which of the VMM's own routes answered an exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Route {
    /// None of them (port or MMIO access, MSR, interrupted KVM_RUN).
    #[default]
    Plain,
    /// The entry of a watched exception handler (a hardware breakpoint).
    Entry(u8, EntryRoute),
    /// A watched handler's entry left to the guest: its first instruction
    /// executed by the VMM (a no-op or `clac`).
    StepOver(u8),
    /// A watched handler that cannot be stepped over, no longer watched.
    Unwatched(u8),
    /// The system-call completion at a watched #PF entry.
    SyscallEntry,
    /// A guest debug exception at no watched PC, reflected with this DR6.
    ReflectDebug(u64),
    /// KVM's emulator gave up; the VMM's answer.
    Emulation(EmulationRoute),
}

/// What the VMM did at an emulation-failure exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmulationRoute {
    /// A 64-byte store; for ENQCMD/ENQCMDS the device's answer.
    Store(StoreKind, u64, StoreReply),
    /// A fallback instruction.
    Fallback(FallbackInstruction),
    /// The instruction's exception, injected.
    Exception(Exception),
    /// The `clac` at a #UD entry: the entry logic acted.
    Entry(u8, EntryRoute),
    /// The page walk lost a race.
    Retry,
    /// Not emulated (the vCPU stops).
    NotHandled,
}

impl EmulationRoute {
    /// The route of an [`Outcome`].
    pub fn of(outcome: &Outcome) -> Self {
        match outcome {
            Outcome::Store(r) => Self::Store(r.kind, r.gpa, r.reply),
            Outcome::Emulated(w) => Self::Fallback(*w),
            Outcome::Exception(e) => Self::Exception(*e),
            Outcome::ExceptionEntry { vector, action } => {
                Self::Entry(*vector, EntryRoute::of(action))
            }
            Outcome::Retry => Self::Retry,
            Outcome::NotHandled(_) => Self::NotHandled,
        }
    }
}

/// What KVM reported with an exit, beyond its reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Detail {
    #[default]
    None,
    Io {
        port: u16,
        out: bool,
        size: u8,
    },
    Mmio {
        addr: u64,
        write: bool,
        len: u32,
    },
    Msr(u32),
    Debug {
        pc: u64,
        dr6: u64,
    },
    /// KVM_RUN returned this errno (EINTR, EAGAIN) instead of an exit.
    Errno(i32),
}

/// One exit of the ring.
#[derive(Clone, Copy, Debug, Default)]
struct ExitRecord {
    /// Number of the exit since the vCPU started (1 = first).
    seq: u64,
    /// KVM_EXIT_*.
    reason: u32,
    /// Guest RIP when KVM reported the exit.
    rip: u64,
    detail: Detail,
    route: Route,
    /// Nanoseconds from KVM_RUN's return to the next KVM_RUN (None while
    /// the VMM is still answering it).
    vmm_ns: Option<u64>,
}

/// The register state the VMM hands KVM at a KVM_RUN.
#[derive(Clone, Copy)]
struct ResumeState {
    /// The exit after which the vCPU was resumed.
    after_exit: u64,
    regs: kvm_regs,
    sregs: kvm_sregs,
    events: kvm_vcpu_events,
}

/// A vCPU's recent history (see the module doc).
pub struct ExitTrace {
    ring: [ExitRecord; EXIT_RING_LEN],
    /// Exits recorded so far; the next goes to `seq % EXIT_RING_LEN`.
    seq: u64,
    /// When the VMM got the newest exit.
    exit_at: Option<Instant>,
    resumed: Option<ResumeState>,
}

impl Default for ExitTrace {
    fn default() -> Self {
        Self {
            ring: [ExitRecord::default(); EXIT_RING_LEN],
            seq: 0,
            exit_at: None,
            resumed: None,
        }
    }
}

impl ExitTrace {
    fn newest(&mut self) -> Option<&mut ExitRecord> {
        let seq = self.seq.checked_sub(1)?;
        Some(&mut self.ring[(seq % EXIT_RING_LEN as u64) as usize])
    }

    /// Records the exit KVM_RUN just reported in `run` (`Err(errno)`: it
    /// returned an error instead), at guest RIP `rip`.
    pub fn exit(&mut self, run: &kvm_run, result: Result<(), i32>, rip: u64) {
        let (reason, detail) = match result {
            Ok(()) => (run.exit_reason, detail_of(run)),
            Err(errno) => (u32::MAX, Detail::Errno(errno)),
        };
        self.seq += 1;
        self.ring[((self.seq - 1) % EXIT_RING_LEN as u64) as usize] = ExitRecord {
            seq: self.seq,
            reason,
            rip,
            detail,
            route: Route::Plain,
            vmm_ns: None,
        };
        self.exit_at = Some(Instant::now());
    }

    /// Which of the VMM's routes answered the newest exit.
    pub fn route(&mut self, route: Route) {
        if let Some(r) = self.newest() {
            r.route = route;
        }
    }

    /// The VMM resumes the vCPU with this state (the `kvm_run` sync area,
    /// dirty parts included; None before the first exit): ends the newest
    /// exit's time and keeps the state.
    pub fn resume(&mut self, state: Option<(&kvm_regs, &kvm_sregs, &kvm_vcpu_events)>) {
        if let Some(at) = self.exit_at.take() {
            let ns = u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX);
            if let Some(r) = self.newest() {
                r.vmm_ns = Some(ns);
            }
        }
        if let Some((regs, sregs, events)) = state {
            self.resumed = Some(ResumeState {
                after_exit: self.seq,
                regs: *regs,
                sregs: *sregs,
                events: *events,
            });
        }
    }

    /// The report for a triple fault of vCPU `id`: its state as KVM now
    /// has it, the state it was last resumed with, what `describe` says of
    /// guest memory under that state, and its last exits.
    pub fn shutdown_report(
        &self,
        id: u8,
        fd: &VcpuFd,
        describe: impl FnOnce(&kvm_regs, &kvm_sregs) -> String,
    ) -> String {
        let mut s = format!(
            "vCPU {id}: KVM_EXIT_SHUTDOWN (triple fault) after exit {}",
            self.seq
        );
        let now = (fd.get_regs(), fd.get_sregs(), fd.get_vcpu_events());
        match now {
            (Ok(regs), Ok(sregs), Ok(events)) => {
                s += "\nvCPU state at the shutdown:";
                if sregs.cs.selector == INIT_CS_SELECTOR && regs.rip == INIT_RIP {
                    s += " (the INIT state: this KVM resets a vCPU that shuts down, as AMD \
                          SVM's does; the guest's state is gone, see the state it was last \
                          resumed with and the exits below)";
                }
                write_state(&mut s, &regs, &sregs, &events);
            }
            (r, sr, e) => {
                let _ = write!(
                    s,
                    "\nvCPU state at the shutdown unreadable: regs {:?}, sregs {:?}, events {:?}",
                    r.err(),
                    sr.err(),
                    e.err()
                );
            }
        }
        match &self.resumed {
            Some(st) => {
                let _ = write!(
                    s,
                    "\nvCPU state the VMM last resumed it with (after exit {}):",
                    st.after_exit
                );
                write_state(&mut s, &st.regs, &st.sregs, &st.events);
                s += "\n";
                s += &describe(&st.regs, &st.sregs);
            }
            None => s += "\nno earlier exit: the vCPU was never resumed after one",
        }
        let first = self.seq.saturating_sub(EXIT_RING_LEN as u64);
        let _ = write!(
            s,
            "\nlast {} exits (oldest first; VMM time from KVM_RUN's return to the next \
             KVM_RUN):",
            self.seq - first
        );
        for seq in first..self.seq {
            let r = &self.ring[(seq % EXIT_RING_LEN as u64) as usize];
            s += "\n  ";
            write_record(&mut s, r);
        }
        s
    }
}

fn detail_of(run: &kvm_run) -> Detail {
    match run.exit_reason {
        KVM_EXIT_IO => {
            // SAFETY: the exit reason is KVM_EXIT_IO, so KVM filled the `io`
            // member of the exit union (plain data).
            let io = unsafe { run.__bindgen_anon_1.io };
            Detail::Io {
                port: io.port,
                out: u32::from(io.direction) == KVM_EXIT_IO_OUT,
                size: io.size,
            }
        }
        KVM_EXIT_MMIO => {
            // SAFETY: the exit reason is KVM_EXIT_MMIO, so KVM filled the
            // `mmio` member (plain data).
            let mmio = unsafe { run.__bindgen_anon_1.mmio };
            Detail::Mmio {
                addr: mmio.phys_addr,
                write: mmio.is_write != 0,
                len: mmio.len,
            }
        }
        KVM_EXIT_X86_RDMSR | KVM_EXIT_X86_WRMSR => {
            // SAFETY: for both MSR exit reasons KVM filled the `msr` member
            // (plain data).
            Detail::Msr(unsafe { run.__bindgen_anon_1.msr }.index)
        }
        KVM_EXIT_DEBUG => {
            // SAFETY: the exit reason is KVM_EXIT_DEBUG, so KVM filled the
            // `debug` member (plain data).
            let arch = unsafe { run.__bindgen_anon_1.debug }.arch;
            Detail::Debug {
                pc: arch.pc,
                dr6: arch.dr6,
            }
        }
        _ => Detail::None,
    }
}

fn reason_name(reason: u32) -> &'static str {
    match reason {
        KVM_EXIT_IO => "IO",
        KVM_EXIT_DEBUG => "DEBUG",
        KVM_EXIT_HLT => "HLT",
        KVM_EXIT_MMIO => "MMIO",
        KVM_EXIT_SHUTDOWN => "SHUTDOWN",
        KVM_EXIT_INTR => "INTR",
        KVM_EXIT_INTERNAL_ERROR => "INTERNAL_ERROR",
        KVM_EXIT_SYSTEM_EVENT => "SYSTEM_EVENT",
        KVM_EXIT_X86_RDMSR => "X86_RDMSR",
        KVM_EXIT_X86_WRMSR => "X86_WRMSR",
        u32::MAX => "no exit",
        _ => "other",
    }
}

fn write_store(s: &mut String, kind: StoreKind, gpa: u64, reply: StoreReply) {
    let _ = write!(s, "{kind:?} to GPA {gpa:#x}");
    if kind != StoreKind::Movdir64b {
        s.push_str(match reply {
            StoreReply::Accepted => " accepted (ZF=0)",
            StoreReply::Retry => " refused (ZF=1)",
        });
    }
}

fn write_entry(s: &mut String, vector: u8, route: &EntryRoute) {
    let _ = write!(s, "entry of vector {vector}: ");
    match route {
        EntryRoute::PassThrough => s.push_str("left to the guest"),
        EntryRoute::Store(k, gpa, reply) => write_store(s, *k, *gpa, *reply),
        EntryRoute::Faulted(e) => {
            let _ = write!(s, "{e} delivered in the interrupted context");
        }
        EntryRoute::Retry => s.push_str("page-walk race, retried"),
        EntryRoute::NotHandled => s.push_str("not emulated, left to the guest"),
    }
}

fn write_record(s: &mut String, r: &ExitRecord) {
    let _ = write!(s, "#{} {} RIP {:#x}", r.seq, reason_name(r.reason), r.rip);
    match r.detail {
        Detail::None => {}
        Detail::Io { port, out, size } => {
            let dir = if out { "OUT" } else { "IN" };
            let _ = write!(s, " {dir} port {port:#x} size {size}");
        }
        Detail::Mmio { addr, write, len } => {
            let dir = if write { "write" } else { "read" };
            let _ = write!(s, " {dir} {addr:#x} len {len}");
        }
        Detail::Msr(index) => {
            let _ = write!(s, " MSR {index:#x}");
        }
        Detail::Debug { pc, dr6 } => {
            let _ = write!(s, " PC {pc:#x} DR6 {dr6:#x}");
        }
        Detail::Errno(e) => {
            let _ = write!(s, " (KVM_RUN errno {e})");
        }
    }
    s.push_str("; route: ");
    match &r.route {
        Route::Plain => s.push('-'),
        Route::Entry(v, route) => write_entry(s, *v, route),
        Route::StepOver(v) => {
            let _ = write!(
                s,
                "entry of vector {v} left to the guest, first instruction stepped"
            );
        }
        Route::Unwatched(v) => {
            let _ = write!(
                s,
                "entry of vector {v} left to the guest, no longer watched"
            );
        }
        Route::SyscallEntry => s.push_str("system call completed"),
        Route::ReflectDebug(dr6) => {
            let _ = write!(s, "#DB reflected into the guest, DR6 {dr6:#x}");
        }
        Route::Emulation(e) => {
            s.push_str("emulation failure: ");
            match e {
                EmulationRoute::Store(k, gpa, reply) => write_store(s, *k, *gpa, *reply),
                EmulationRoute::Fallback(w) => {
                    let _ = write!(s, "{w:?} emulated");
                }
                EmulationRoute::Exception(x) => {
                    let _ = write!(s, "{x} injected");
                }
                EmulationRoute::Entry(v, route) => write_entry(s, *v, route),
                EmulationRoute::Retry => s.push_str("page-walk race, retried"),
                EmulationRoute::NotHandled => s.push_str("not emulated"),
            }
        }
    }
    match r.vmm_ns {
        Some(ns) => {
            let _ = write!(s, "; {}.{:03} us in the VMM", ns / 1000, ns % 1000);
        }
        None => s.push_str("; VMM still answering"),
    }
}

fn write_segment(s: &mut String, name: &str, seg: &kvm_segment) {
    let _ = write!(
        s,
        "\n  {name:<3} {:#06x} base {:#018x} limit {:#010x} type {:#x} s {} dpl {} p {} l {} db {} \
         g {} unusable {}",
        seg.selector,
        seg.base,
        seg.limit,
        seg.type_,
        seg.s,
        seg.dpl,
        seg.present,
        seg.l,
        seg.db,
        seg.g,
        seg.unusable
    );
}

fn write_table(s: &mut String, name: &str, t: &kvm_dtable) {
    let _ = write!(s, "\n  {name} base {:#018x} limit {:#06x}", t.base, t.limit);
}

/// The general registers, RIP/RFLAGS, segments, control registers, EFER,
/// descriptor tables and pending events, a few per line.
fn write_state(s: &mut String, r: &kvm_regs, sr: &kvm_sregs, e: &kvm_vcpu_events) {
    let gprs = [
        ("RAX", r.rax),
        ("RBX", r.rbx),
        ("RCX", r.rcx),
        ("RDX", r.rdx),
        ("RSI", r.rsi),
        ("RDI", r.rdi),
        ("RBP", r.rbp),
        ("RSP", r.rsp),
        ("R8", r.r8),
        ("R9", r.r9),
        ("R10", r.r10),
        ("R11", r.r11),
        ("R12", r.r12),
        ("R13", r.r13),
        ("R14", r.r14),
        ("R15", r.r15),
    ];
    for line in gprs.chunks(4) {
        s.push_str("\n ");
        for (name, v) in line {
            let _ = write!(s, " {name:<3} {v:#018x}");
        }
    }
    let _ = write!(s, "\n  RIP {:#018x} RFLAGS {:#010x}", r.rip, r.rflags);
    for (name, seg) in [
        ("CS", &sr.cs),
        ("SS", &sr.ss),
        ("DS", &sr.ds),
        ("ES", &sr.es),
        ("FS", &sr.fs),
        ("GS", &sr.gs),
        ("TR", &sr.tr),
        ("LDT", &sr.ldt),
    ] {
        write_segment(s, name, seg);
    }
    let _ = write!(
        s,
        "\n  CR0 {:#010x} CR2 {:#018x} CR3 {:#018x} CR4 {:#010x} CR8 {:#x}\n  EFER {:#x} \
         APIC_BASE {:#x}",
        sr.cr0, sr.cr2, sr.cr3, sr.cr4, sr.cr8, sr.efer, sr.apic_base
    );
    write_table(s, "GDT", &sr.gdt);
    write_table(s, "IDT", &sr.idt);
    let x = &e.exception;
    let i = &e.interrupt;
    let n = &e.nmi;
    let _ = write!(
        s,
        "\n  events: exception injected {} pending {} vector {} error code {} ({:#x}) payload {} \
         ({:#x}); interrupt injected {} vector {} soft {} shadow {}; NMI injected {} pending {} \
         masked {}; triple fault pending {}; flags {:#x}",
        x.injected,
        x.pending,
        x.nr,
        x.has_error_code,
        x.error_code,
        e.exception_has_payload,
        e.exception_payload,
        i.injected,
        i.nr,
        i.soft,
        i.shadow,
        n.injected,
        n.pending,
        n.masked,
        e.triple_fault.pending,
        e.flags
    );
    let pending_irqs: Vec<usize> = (0..256)
        .filter(|v| sr.interrupt_bitmap[v / 64] & (1 << (v % 64)) != 0)
        .collect();
    if !pending_irqs.is_empty() {
        let _ = write!(s, "; interrupt bitmap {pending_irqs:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_out(port: u16) -> kvm_run {
        let mut run = kvm_run {
            exit_reason: KVM_EXIT_IO,
            ..Default::default()
        };
        run.__bindgen_anon_1.io.direction = KVM_EXIT_IO_OUT as u8;
        run.__bindgen_anon_1.io.port = port;
        run.__bindgen_anon_1.io.size = 1;
        run
    }

    #[test]
    fn the_ring_keeps_the_last_exits_oldest_first_with_their_routes() {
        let mut t = ExitTrace::default();
        for n in 0..40u16 {
            t.exit(&io_out(n), Ok(()), 0x1000 + u64::from(n));
            t.resume(None);
        }
        let mut run = kvm_run {
            exit_reason: KVM_EXIT_DEBUG,
            ..Default::default()
        };
        run.__bindgen_anon_1.debug.arch.pc = 0xffff_8000_0000_1000;
        run.__bindgen_anon_1.debug.arch.dr6 = 0xffff_0ff1;
        t.exit(&run, Ok(()), 0xffff_8000_0000_1000);
        t.route(Route::Entry(
            6,
            EntryRoute::Store(StoreKind::Enqcmd, 0xfe00_0000, StoreReply::Retry),
        ));
        let mut s = String::new();
        let first = t.seq - EXIT_RING_LEN as u64;
        for seq in first..t.seq {
            write_record(&mut s, &t.ring[(seq % EXIT_RING_LEN as u64) as usize]);
            s.push('\n');
        }
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), EXIT_RING_LEN);
        // Exits 1-9 fell out; exit 10 was the OUT to port 9.
        assert!(
            lines[0].starts_with("#10 IO RIP 0x1009 OUT port 0x9 size 1; route: -; "),
            "{}",
            lines[0]
        );
        assert!(lines[0].ends_with(" us in the VMM"), "{}", lines[0]);
        assert_eq!(
            lines[31],
            "#41 DEBUG RIP 0xffff800000001000 PC 0xffff800000001000 DR6 0xffff0ff1; route: \
             entry of vector 6: Enqcmd to GPA 0xfe000000 refused (ZF=1); VMM still answering"
        );
    }
}
