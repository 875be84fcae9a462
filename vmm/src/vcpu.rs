//! A vCPU thread's state and its run loop: every exit is answered here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bus::{StoreKind, StoreReply};
use kvm_bindings::{
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_sync_regs, kvm_vcpu_events, Msrs,
    KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION,
};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use pasid::{Ia32Pasid, MSR_IA32_PASID};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::emulator::{
    self, EmulatorError, EntryAction, FallbackInstruction, GuestCpu, Outcome, StepOver,
    SyscallMsrs, XState, XStateLayout, XsaveFeatures,
};
use crate::entry_watch::{EntryWatch, SharedHandlers};
use crate::platform::{vector, HostCpu, Platform};
use crate::sva::{EnqcmdPasidHint, GuestPasids};
use crate::vcpu_trace::{EmulationRoute, EntryRoute, ExitTrace, Route};
use crate::x86::{CR3_ROOT_MASK, PAGE_TABLE_SIZE};
use bus::Bus;

/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES.
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// #DB, the debug exception.
const DEBUG_VECTOR: u8 = 1;

/// Why a vCPU stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// Another vCPU or the VMM asked it to.
    Requested,
    /// A test-exit write, a power-off or a reset device ended the run.
    DeviceRequest,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM reported a system event (power-off or reset).
    SystemEvent(u32),
    /// An exit the VMM cannot answer: one line for the user.
    Fatal(String),
}

/// The state a vCPU thread owns.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Its index.
    pub id: u8,
    pub(crate) memory: GuestMemoryMmap,
    pub(crate) mmio: Arc<Bus>,
    pub(crate) pio: Arc<Bus>,
    pub(crate) pasid_msr: Ia32Pasid,
    /// The guest's PASIDs; IA32_PASID writes are recorded there per
    /// address space.
    pub(crate) pasids: Arc<GuestPasids>,
    /// This vCPU's last trapped ENQCMD's PASID, re-validated at each use.
    enqcmd_hint: EnqcmdPasidHint,
    /// The kind of KVM: which workarounds apply.
    platform: Platform,
    /// What the host CPU runs natively: which exception entries to watch.
    host_cpu: HostCpu,
    watch: EntryWatch,
    /// The guest IDT and mode the watch was last armed from.
    armed_idt: Option<IdtKey>,
    /// Handlers found by any vCPU of the VM, and how to have the others
    /// look at them.
    shared: Arc<SharedHandlers>,
    kick_others: Arc<dyn Fn() + Send + Sync>,
    /// The shared generation this vCPU's watch reflects.
    applied_generation: u64,
    /// What this vCPU last found in its own IDT (and published).
    own_handlers: Vec<(u8, u64)>,
    /// Debug exits at watched handlers, by vector (#UD, #GP, #PF).
    watch_exits: WatchExits,
    syscall_msrs: SyscallMsrs,
    /// KVM has stored this exit's registers in the `kvm_run` page (see
    /// [`Vcpu::new`]); false before the first exit.
    synced: bool,
    /// The XSAVE layout and instructions of this vCPU's CPUID, read at the
    /// first emulated XSAVE-family instruction.
    xsave_cpuid: Option<(XStateLayout, XsaveFeatures)>,
    /// Emulation-failure exits the fallback emulator answered, by
    /// instruction.
    fallback_exits: Vec<(FallbackInstruction, u64)>,
    /// The last exits and the state last resumed with, for the report of
    /// a triple fault.
    trace: Box<ExitTrace>,
}

impl Vcpu {
    pub(crate) fn new(
        fd: VcpuFd,
        id: u8,
        memory: GuestMemoryMmap,
        mmio: Arc<Bus>,
        pio: Arc<Bus>,
        pasids: Arc<GuestPasids>,
    ) -> Self {
        let mut fd = fd;
        // Every vCPU ioctl costs a vCPU reload on this platform, which is
        // most of a trap's price: with KVM_CAP_SYNC_REGS KVM stores the
        // registers, segment registers and events in the `kvm_run` page at
        // each exit and loads the ones marked dirty at the next KVM_RUN, so
        // answering a trapped ENQCMD takes no register ioctl at all.
        fd.set_sync_valid_reg(SyncReg::Register);
        fd.set_sync_valid_reg(SyncReg::SystemRegister);
        fd.set_sync_valid_reg(SyncReg::VcpuEvents);
        Self {
            fd,
            id,
            memory,
            mmio,
            pio,
            pasid_msr: Ia32Pasid::new(),
            pasids,
            enqcmd_hint: EnqcmdPasidHint::default(),
            platform: Platform::Kvm,
            host_cpu: HostCpu::default(),
            watch: EntryWatch::default(),
            armed_idt: None,
            shared: Arc::default(),
            kick_others: Arc::new(|| {}),
            applied_generation: 0,
            own_handlers: Vec::new(),
            watch_exits: WatchExits::default(),
            syscall_msrs: SyscallMsrs::default(),
            synced: false,
            xsave_cpuid: None,
            fallback_exits: Vec::new(),
            trace: Box::default(),
        }
    }

    /// Runs on `platform` (ordinary KVM until told) with a host CPU that
    /// runs natively what `host_cpu` says (nothing until told).
    pub(crate) fn with_platform(mut self, platform: Platform, host_cpu: HostCpu) -> Self {
        self.platform = platform;
        self.host_cpu = host_cpu;
        self
    }

    /// Shares the handlers it finds with the VM's other vCPUs through
    /// `shared`; `kick_others` makes them leave KVM_RUN to look.
    pub(crate) fn with_shared_watch(
        mut self,
        shared: Arc<SharedHandlers>,
        kick_others: Arc<dyn Fn() + Send + Sync>,
    ) -> Self {
        self.shared = shared;
        self.kick_others = kick_others;
        self
    }

    /// (Re)arms the exception-entry watch from the guest IDT, on the
    /// vectors the platform needs ([`Platform::watched_vectors`]). Gates the
    /// IDT lacks (none before the guest loads one) are not watched.
    fn arm_entry_watch(&mut self) -> Result<(), String> {
        let vectors = self
            .platform
            .watched_vectors(self.host_cpu, self.syscall_msrs.configured());
        let key = GuestCpu::sregs(self).ok().map(|sregs| IdtKey::of(&sregs));
        self.armed_idt = key.or(self.armed_idt);
        // A real-mode IVT has no present bits: a secondary vCPU's IDTR from
        // reset until its startup code loads the OS's table reads as one.
        let real_mode = key.is_some_and(|k| !k.protected);
        let mut handlers = Vec::new();
        for &v in &vectors {
            if let Some(h) = emulator::idt_handler(self, v).map_err(|e| e.to_string())? {
                handlers.push((v, h));
            }
        }
        let (generation, shared) = self.shared.get(&vectors);
        if handlers.is_empty() || (real_mode && !shared.is_empty()) {
            // No IDT of its own yet (a secondary vCPU before it starts):
            // the handlers another vCPU found.
            self.applied_generation = generation;
            handlers = shared;
        } else if real_mode {
            // A real-mode guest's own IVT: watched, never published.
            self.applied_generation = generation;
        } else {
            if handlers != self.own_handlers {
                self.own_handlers = handlers.clone();
                if self.shared.publish(&handlers) {
                    (self.kick_others)();
                }
            }
            self.applied_generation = self.shared.generation();
        }
        let watch = EntryWatch::new(&handlers).map_err(|e| e.to_string())?;
        if watch != self.watch {
            self.fd
                .set_guest_debug(&watch.guest_debug())
                .map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))?;
            log::debug!("vCPU {}: watching exception entries {handlers:x?}", self.id);
            self.watch = watch;
        }
        Ok(())
    }

    /// Re-arms the watch when the guest has loaded another IDT since it
    /// was armed, or switched modes so that the same IDTR means other
    /// gates (real mode's IVT, protected mode's 8-byte or IA-32e mode's
    /// 16-byte gates), or another vCPU published new handlers (see
    /// [`SharedHandlers`]). Linux fills its IDT's exception gates before it loads the
    /// table at its final (read-only) alias, on every CPU, so the first
    /// exit after that sees the handlers it keeps; before, the gates are
    /// its early boot handlers. On ordinary KVM this is the only trigger
    /// (no SYSCALL MSR exits there); it costs a comparison per exit.
    fn rearm_on_new_idt(&mut self) -> Result<(), String> {
        let shared_changed = self.shared.generation() != self.applied_generation;
        let idt_changed = self.synced && {
            let key = IdtKey::of(&self.fd.sync_regs_mut().sregs);
            self.armed_idt != Some(key)
        };
        if shared_changed || idt_changed {
            self.arm_entry_watch()
        } else {
            Ok(())
        }
    }

    /// The guest wrote a SYSCALL MSR, which the VMM's MSR filter intercepts:
    /// give KVM the value, keep it for the SYSCALL fix, and watch #PF.
    fn on_syscall_msr(&mut self, index: u32, data: u64) -> Result<(), String> {
        let msrs = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .map_err(|e| format!("MSR list: {e}"))?;
        match self.fd.set_msrs(&msrs) {
            Ok(1) => {}
            other => {
                return Err(format!(
                    "vCPU {}: KVM_SET_MSRS of MSR {index:#x} = {data:#x} failed: {other:?}",
                    self.id
                ))
            }
        }
        self.syscall_msrs.record(index, data);
        self.arm_entry_watch()
    }

    /// Keeps the state the vCPU resumes with (the `kvm_run` sync area
    /// after an exit) and ends the last exit's time.
    fn trace_resume(&mut self) {
        if self.synced {
            let s = self.fd.sync_regs_mut();
            self.trace.resume(Some((&s.regs, &s.sregs, &s.events)));
        } else {
            self.trace.resume(None);
        }
    }

    /// Records the exit KVM_RUN reported (`errno`: it returned that error).
    fn trace_exit(&mut self, errno: Option<i32>) {
        let rip = if self.synced {
            self.fd.sync_regs_mut().regs.rip
        } else {
            0
        };
        self.trace
            .exit(self.fd.get_kvm_run(), errno.map_or(Ok(()), Err), rip);
    }

    /// KVM_EXIT_SHUTDOWN: reports the vCPU's state and its last exits.
    fn triple_fault(&mut self) -> VcpuStop {
        self.trace_exit(None);
        let (phys_addr_bits, page_1g) = (
            GuestCpu::max_phys_addr_bits(self),
            GuestCpu::has_1g_pages(self),
        );
        let report = self
            .trace
            .shutdown_report(self.id, &self.fd, |regs, sregs| {
                let mut s = emulator::describe_delivery_path(
                    self.memory(),
                    regs,
                    sregs,
                    phys_addr_bits,
                    page_1g,
                );
                // The fault may have run under another process's table:
                // a copy of the kernel half that lost entries names it.
                let root = sregs.cr3 & CR3_ROOT_MASK;
                let census = emulator::KernelHalfCensus::scan(self.memory(), root);
                s += "\n";
                s += &census.to_string();
                // A device write that hit one of those tables would
                // explain a triple fault the guest never reported.
                let mut watched = vec![(root, PAGE_TABLE_SIZE, "the top-level page table".into())];
                watched.extend(census.partial.iter().map(|c| {
                    (
                        c.gpa,
                        PAGE_TABLE_SIZE,
                        format!("the partial copy at GPA {:#x}", c.gpa),
                    )
                }));
                s += "\n";
                s += &self.pasids.device_writes().report(&watched);
                s
            });
        log::error!("{report}");
        VcpuStop::TripleFault
    }

    fn rip(&mut self) -> u64 {
        GuestCpu::regs(self).map_or(0, |r| r.rip)
    }

    /// Reads one kind of vCPU state: from the `kvm_run` page after an
    /// exit, through its ioctl before the first one.
    fn read_state<T: Copy>(&mut self, state: &SyncedState<T>) -> Result<T, EmulatorError> {
        if self.synced {
            Ok(*(state.field)(self.fd.sync_regs_mut()))
        } else {
            (state.get)(&self.fd).map_err(vcpu_error)
        }
    }

    /// Writes one kind of vCPU state: into the `kvm_run` page, marked
    /// dirty for the next KVM_RUN, or through its ioctl before the first.
    fn write_state<T: Copy>(
        &mut self,
        state: &SyncedState<T>,
        value: &T,
    ) -> Result<(), EmulatorError> {
        if self.synced {
            *(state.field)(self.fd.sync_regs_mut()) = *value;
            self.fd.set_sync_dirty_reg(state.flag);
            Ok(())
        } else {
            (state.set)(&self.fd, value).map_err(vcpu_error)
        }
    }

    /// Runs until the guest or the VMM ends the run.
    pub fn run(&mut self, stop: &AtomicBool) -> VcpuStop {
        let why = self.run_loop(stop);
        log::info!(
            "vCPU {}: {} ({}): exception-entry watch exits {}; fallback-emulated exits {:?}",
            self.id,
            self.platform.name(),
            self.watch.describe(),
            self.watch_exits,
            self.fallback_exits
        );
        why
    }

    fn run_loop(&mut self, stop: &AtomicBool) -> VcpuStop {
        if let Err(e) = self.arm_entry_watch() {
            return VcpuStop::Fatal(format!(
                "vCPU {}: cannot watch exception entries: {e}",
                self.id
            ));
        }
        loop {
            if stop.load(Ordering::Acquire) {
                return VcpuStop::Requested;
            }
            self.trace_resume();
            let result = self.fd.run();
            self.synced = result.is_ok();
            let mut errno = None;
            let action = match result {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => {
                        if !self.pio.write(port.into(), data) {
                            log::debug!("OUT to unclaimed port {port:#x}");
                        }
                        Action::CheckStop
                    }
                    VcpuExit::IoIn(port, data) => {
                        if !self.pio.read(port.into(), data) {
                            data.fill(0xff);
                        }
                        Action::Resume
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        if !self.mmio.read(addr, data) {
                            data.fill(0xff);
                        }
                        Action::Resume
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        if !self.mmio.write(addr, data) {
                            log::debug!("MMIO write to unclaimed {addr:#x}");
                        }
                        Action::CheckStop
                    }
                    VcpuExit::X86Rdmsr(msr) => {
                        if msr.index == MSR_IA32_PASID {
                            *msr.data = self.pasid_msr.read();
                        } else {
                            *msr.error = 1;
                        }
                        Action::Resume
                    }
                    VcpuExit::X86Wrmsr(msr) if is_syscall_msr(msr.index) => {
                        if msr.index == emulator::syscall_msr::LSTAR && !is_canonical(msr.data) {
                            // What KVM itself answers to a non-canonical LSTAR.
                            *msr.error = 1;
                            Action::Resume
                        } else {
                            Action::SyscallMsr(msr.index, msr.data)
                        }
                    }
                    VcpuExit::X86Wrmsr(msr) => {
                        if msr.index != MSR_IA32_PASID || self.pasid_msr.write(msr.data).is_err() {
                            // Reserved bits or an MSR nobody emulates: #GP.
                            *msr.error = 1;
                            Action::Resume
                        } else {
                            Action::PasidWritten(msr.data)
                        }
                    }
                    VcpuExit::Debug(arch) => Action::Debug(arch.pc, arch.dr6),
                    VcpuExit::InternalError => Action::InternalError,
                    VcpuExit::Shutdown => return self.triple_fault(),
                    VcpuExit::SystemEvent(kind, _) => return VcpuStop::SystemEvent(kind),
                    VcpuExit::Hlt => Action::Fatal("HLT (interrupts cannot wake it)".into()),
                    VcpuExit::Intr => Action::Resume,
                    other => Action::Fatal(format!("{other:?}")),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    errno = Some(e.errno());
                    Action::Resume
                }
                Err(e) => return VcpuStop::Fatal(format!("vCPU {}: KVM_RUN failed: {e}", self.id)),
            };
            self.trace_exit(errno);
            if let Err(e) = self.rearm_on_new_idt() {
                return VcpuStop::Fatal(format!(
                    "vCPU {}: cannot watch exception entries: {e}",
                    self.id
                ));
            }
            match action {
                Action::Resume => {}
                Action::CheckStop => {
                    if stop.load(Ordering::Acquire) {
                        return VcpuStop::DeviceRequest;
                    }
                }
                Action::SyscallMsr(index, data) => {
                    if let Err(line) = self.on_syscall_msr(index, data) {
                        return VcpuStop::Fatal(line);
                    }
                }
                Action::PasidWritten(value) => {
                    // The running address space now has this PASID.
                    match GuestCpu::sregs(self) {
                        Ok(sregs) => self.pasids.record_msr_write(sregs.cr3, value),
                        Err(e) => {
                            return VcpuStop::Fatal(format!(
                                "vCPU {}: reading CR3 after WRMSR IA32_PASID: {e}",
                                self.id
                            ))
                        }
                    }
                }
                Action::Debug(pc, dr6) => {
                    if let Err(line) = self.on_debug(pc, dr6) {
                        return VcpuStop::Fatal(line);
                    }
                }
                Action::InternalError => {
                    if let Err(line) = self.on_internal_error() {
                        return VcpuStop::Fatal(line);
                    }
                }
                Action::Fatal(exit) => {
                    let rip = self.rip();
                    return VcpuStop::Fatal(format!(
                        "vCPU {}: unhandled exit {exit} at RIP {rip:#x}",
                        self.id
                    ));
                }
            }
        }
    }

    /// A hardware breakpoint hit: the entry of a watched exception handler.
    fn on_debug(&mut self, pc: u64, dr6: u64) -> Result<(), String> {
        let Some(vector) = self.watch.vector_at(pc) else {
            return self.reflect_debug_exception(dr6);
        };
        if log::log_enabled!(log::Level::Trace) {
            if let Ok(frame) = emulator::read_exception_frame(self, vector) {
                log::trace!("vCPU {}: entry of vector {vector}: {frame:x?}", self.id);
            }
        }
        self.watch_exits.count(vector);
        let handled = match vector {
            vector::UD | vector::GP => {
                let action =
                    emulator::handle_exception_entry(self, vector).map_err(|e| self.fatal(&e))?;
                self.trace
                    .route(Route::Entry(vector, EntryRoute::of(&action)));
                match action {
                    EntryAction::PassThrough => false,
                    EntryAction::NotHandled(u) => {
                        log::warn!(
                            "vCPU {}: vector {vector} entry left to the guest: {u}",
                            self.id
                        );
                        false
                    }
                    EntryAction::Emulated(_) | EntryAction::Faulted(_) | EntryAction::Retry => true,
                }
            }
            vector::PF if self.platform.completes_syscall() => {
                let msrs = self.syscall_msrs;
                let entry = emulator::complete_syscall(self, &msrs).map_err(|e| self.fatal(&e))?;
                if entry.is_some() && log::log_enabled!(log::Level::Trace) {
                    if let Ok(r) = GuestCpu::regs(self) {
                        log::trace!(
                            "vCPU {}: system call {} ({:#x}, {:#x}, {:#x}) from {:#x}",
                            self.id,
                            r.rax,
                            r.rdi,
                            r.rsi,
                            r.rdx,
                            r.rcx
                        );
                    }
                }
                if entry.is_none() {
                    if let Ok(Some(frame)) = emulator::read_exception_frame(self, vector::PF) {
                        if frame.rip == msrs.lstar {
                            log::warn!(
                                "vCPU {}: #PF at LSTAR not taken for a SYSCALL: {frame:x?}, {msrs:x?}",
                                self.id
                            );
                        }
                    }
                }
                if entry.is_some() {
                    self.trace.route(Route::SyscallEntry);
                }
                entry.is_some()
            }
            _ => false,
        };
        if handled {
            return Ok(());
        }
        // The guest's handler runs: execute its first instruction here.
        match emulator::step_over_handler_entry(self).map_err(|e| self.fatal(&e))? {
            StepOver::NotHandled(u) => {
                // A handler that does not begin with a no-op (e.g. Linux's
                // early boot handlers without IBT, `push $0`): stop watching
                // it, so the guest's handler runs, until the guest loads
                // another IDT (Linux: its final one).
                log::warn!(
                    "vCPU {}: vector {vector} handler not watched: cannot step over its first \
                     instruction: {u}",
                    self.id
                );
                self.trace.route(Route::Unwatched(vector));
                self.unwatch(vector)
            }
            StepOver::Skipped(_) | StepOver::Emulated(_) => {
                self.trace.route(Route::StepOver(vector));
                Ok(())
            }
        }
    }

    /// A debug exception that is the guest's own (a single step with TF,
    /// ICEBP, its own breakpoints): while the VMM's hardware breakpoints are
    /// armed, KVM brings every #DB here. The guest gets it as the CPU
    /// delivers it, its DR6 (`dr6`, as the exit reports it) updated.
    fn reflect_debug_exception(&mut self, dr6: u64) -> Result<(), String> {
        self.trace.route(Route::ReflectDebug(dr6));
        let mut debug_regs = self
            .fd
            .get_debug_regs()
            .map_err(|e| format!("vCPU {}: KVM_GET_DEBUGREGS: {e}", self.id))?;
        debug_regs.dr6 = dr6 & 0xffff_ffff;
        self.fd
            .set_debug_regs(&debug_regs)
            .map_err(|e| format!("vCPU {}: KVM_SET_DEBUGREGS: {e}", self.id))?;
        self.inject_exception(DEBUG_VECTOR, None, None)
            .map_err(|e| self.fatal(&e))
    }

    /// Stops watching `vector`'s handler (until the next re-arm).
    fn unwatch(&mut self, vector: u8) -> Result<(), String> {
        let watch = self.watch.without(vector);
        self.fd
            .set_guest_debug(&watch.guest_debug())
            .map_err(|e| format!("vCPU {}: KVM_SET_GUEST_DEBUG: {e}", self.id))?;
        self.watch = watch;
        Ok(())
    }

    /// KVM's emulator gave up: emulate the instruction here or stop.
    fn on_internal_error(&mut self) -> Result<(), String> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
            return Err(format!(
                "vCPU {}: internal error exit with reason {}",
                self.id, run.exit_reason
            ));
        }
        // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so KVM filled the
        // `emulation_failure` member of the exit union (a plain-data struct
        // whose every bit pattern is valid).
        let failure = unsafe { run.__bindgen_anon_1.emulation_failure };
        if failure.suberror != KVM_INTERNAL_ERROR_EMULATION {
            let rip = self.rip();
            return Err(format!(
                "vCPU {}: KVM internal error, suberror {} at RIP {rip:#x}",
                self.id, failure.suberror
            ));
        }
        // SAFETY: the instruction-bytes member is the only one of its union
        // and is plain data.
        let insn = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
        let bytes: &[u8] = if failure.flags & EMULATION_FLAG_INSTRUCTION_BYTES != 0 {
            &insn.insn_bytes[..usize::from(insn.insn_size).min(insn.insn_bytes.len())]
        } else {
            &[]
        };
        let outcome =
            emulator::handle_emulation_failure(self, bytes).map_err(|e| self.fatal(&e))?;
        self.trace
            .route(Route::Emulation(EmulationRoute::of(&outcome)));
        match outcome {
            Outcome::NotHandled(u) => Err(format!("vCPU {}: emulation failure: {u}", self.id)),
            outcome => {
                if let Outcome::Emulated(which) = outcome {
                    match self.fallback_exits.iter_mut().find(|(w, _)| *w == which) {
                        Some((_, n)) => *n += 1,
                        None => self.fallback_exits.push((which, 1)),
                    }
                }
                log::trace!("vCPU {}: emulation failure answered: {outcome:x?}", self.id);
                Ok(())
            }
        }
    }

    fn fatal(&mut self, e: &EmulatorError) -> String {
        let rip = self.rip();
        format!("vCPU {}: emulator error at RIP {rip:#x}: {e}", self.id)
    }
}

/// What the handler addresses of the watch are read from: IDTR, and the
/// mode that says how its entries are laid out (CR0.PE, EFER.LMA).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct IdtKey {
    base: u64,
    limit: u16,
    protected: bool,
    long_mode: bool,
}

impl IdtKey {
    fn of(sregs: &kvm_sregs) -> Self {
        IdtKey {
            base: sregs.idt.base,
            limit: sregs.idt.limit,
            protected: sregs.cr0 & crate::x86::cr0::PE != 0,
            long_mode: sregs.efer & crate::x86::efer::LMA != 0,
        }
    }
}

/// How often each watched handler was entered (a debug exit each).
#[derive(Clone, Copy, Debug, Default)]
struct WatchExits {
    ud: u64,
    gp: u64,
    pf: u64,
}

impl WatchExits {
    fn count(&mut self, v: u8) {
        match v {
            vector::UD => self.ud += 1,
            vector::GP => self.gp += 1,
            vector::PF => self.pf += 1,
            _ => {}
        }
    }
}

impl std::fmt::Display for WatchExits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#UD {}, #GP {}, #PF {}", self.ud, self.gp, self.pf)
    }
}

/// One kind of vCPU state: its field in the `kvm_run` sync area, its
/// dirty flag and its ioctls.
struct SyncedState<T> {
    field: fn(&mut kvm_sync_regs) -> &mut T,
    flag: SyncReg,
    get: fn(&VcpuFd) -> Result<T, kvm_ioctls::Error>,
    set: fn(&VcpuFd, &T) -> Result<(), kvm_ioctls::Error>,
}

const REGS: SyncedState<kvm_regs> = SyncedState {
    field: |s| &mut s.regs,
    flag: SyncReg::Register,
    get: VcpuFd::get_regs,
    set: VcpuFd::set_regs,
};

const SREGS: SyncedState<kvm_sregs> = SyncedState {
    field: |s| &mut s.sregs,
    flag: SyncReg::SystemRegister,
    get: VcpuFd::get_sregs,
    set: VcpuFd::set_sregs,
};

const EVENTS: SyncedState<kvm_vcpu_events> = SyncedState {
    field: |s| &mut s.events,
    flag: SyncReg::VcpuEvents,
    get: VcpuFd::get_vcpu_events,
    set: VcpuFd::set_vcpu_events,
};

enum Action {
    Resume,
    CheckStop,
    SyscallMsr(u32, u64),
    PasidWritten(u64),
    Debug(u64, u64),
    InternalError,
    Fatal(String),
}

fn is_syscall_msr(index: u32) -> bool {
    use emulator::syscall_msr::{FMASK, LSTAR, STAR};
    matches!(index, STAR | LSTAR | FMASK)
}

/// Canonical for 4-level paging (48-bit linear addresses); KVM's own LSTAR
/// check.
fn is_canonical(addr: u64) -> bool {
    ((addr as i64) << 16 >> 16) as u64 == addr
}

/// The events to hand KVM for injecting exception `vector` (with
/// `error_code`), from `at_exit`, the events KVM reported at the exit.
///
/// Only the event fields KVM always takes are written, as they were at the
/// exit, plus the exception: no validity flag is kept, so KVM does not take
/// back the exit's NMI-pending count, SMM state (with its latched INIT),
/// SIPI vector or interrupt shadow. Those can change between the exit and
/// the next KVM_RUN (another vCPU's NMI or INIT arrives while the VMM
/// answers, which can take long: an ENQCMD may run its descriptor), and
/// writing the exit's values back would drop them.
///
/// An event KVM was still delivering at the exit (an exception, an
/// external interrupt or an NMI "injected") would be lost under the new
/// exception: KVM re-injects only one event per entry and forgets the
/// rest, and a lost interrupt leaves its vector in service for good. That
/// is refused, naming both.
fn events_injecting(
    at_exit: kvm_vcpu_events,
    vector: u8,
    error_code: Option<u32>,
) -> Result<kvm_vcpu_events, String> {
    let mut events = at_exit;
    let in_delivery = if at_exit.exception.injected != 0 || at_exit.exception.pending != 0 {
        Some(format!("exception {}", at_exit.exception.nr))
    } else if at_exit.nmi.injected != 0 {
        Some("an NMI".to_string())
    } else if at_exit.interrupt.injected != 0 {
        Some(format!("interrupt {:#x}", at_exit.interrupt.nr))
    } else {
        None
    };
    if let Some(other) = in_delivery {
        return Err(format!(
            "cannot inject exception {vector}: KVM was delivering {other} at the exit"
        ));
    }
    events.flags = 0;
    events.exception.injected = 1;
    events.exception.pending = 0;
    events.exception.nr = vector;
    events.exception.has_error_code = u8::from(error_code.is_some());
    events.exception.error_code = error_code.unwrap_or(0);
    events.exception_has_payload = 0;
    events.exception_payload = 0;
    Ok(events)
}

fn vcpu_error(e: kvm_ioctls::Error) -> EmulatorError {
    EmulatorError::Vcpu(Box::new(e))
}

impl GuestCpu for Vcpu {
    fn regs(&mut self) -> Result<kvm_regs, EmulatorError> {
        self.read_state(&REGS)
    }

    fn set_regs(&mut self, regs: &kvm_regs) -> Result<(), EmulatorError> {
        self.write_state(&REGS, regs)
    }

    fn sregs(&mut self) -> Result<kvm_sregs, EmulatorError> {
        self.read_state(&SREGS)
    }

    fn set_sregs(&mut self, sregs: &kvm_sregs) -> Result<(), EmulatorError> {
        self.write_state(&SREGS, sregs)
    }

    fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    fn ia32_pasid(&self) -> u64 {
        self.pasid_msr.read()
    }

    fn emulates(&self, which: FallbackInstruction) -> bool {
        self.platform.emulates(which)
    }

    /// The PASID recorded for the address space of `cr3` (the MSR value the
    /// running task would have had restored), checked against the guest's
    /// PASID-table entry; not the last value written, which may belong to
    /// another task.
    fn enqcmd_pasid(&mut self, cr3: u64) -> u64 {
        self.pasids.enqcmd_pasid_hinted(cr3, &mut self.enqcmd_hint)
    }

    fn xstate(&mut self) -> Result<XState, EmulatorError> {
        use crate::platform::pvm;
        let (layout, features) = match &self.xsave_cpuid {
            Some(c) => c.clone(),
            None => {
                let cpuid = self
                    .fd
                    .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
                    .map_err(vcpu_error)?;
                let c = pvm::xsave_cpuid(cpuid.as_slice());
                self.xsave_cpuid = Some(c.clone());
                c
            }
        };
        let xsave = self.fd.get_xsave().map_err(vcpu_error)?;
        let xcrs = self.fd.get_xcrs().map_err(vcpu_error)?;
        Ok(XState {
            image: pvm::xstate_image(&xsave),
            xcr0: pvm::xcr0_of(&xcrs),
            xss: 0,
            pasid: self.pasid_msr.read(),
            layout,
            features,
        })
    }

    fn set_xstate(&mut self, state: &XState) -> Result<(), EmulatorError> {
        let xsave = crate::platform::pvm::kvm_xsave_of(&state.image);
        // SAFETY: `xsave` is a whole `kvm_xsave` (4096 bytes, no trailing
        // part), which is all KVM_SET_XSAVE reads.
        unsafe { self.fd.set_xsave(&xsave) }.map_err(vcpu_error)?;
        if state.pasid != self.pasid_msr.read() {
            self.pasid_msr
                .write(state.pasid)
                .map_err(|e| EmulatorError::Vcpu(format!("IA32_PASID: {e:?}").into()))?;
        }
        Ok(())
    }

    fn inject_exception(
        &mut self,
        vector: u8,
        error_code: Option<u32>,
        cr2: Option<u64>,
    ) -> Result<(), EmulatorError> {
        if let Some(cr2) = cr2 {
            let mut sregs = self.read_state(&SREGS)?;
            sregs.cr2 = cr2;
            self.write_state(&SREGS, &sregs)?;
        }
        let events = self.read_state(&EVENTS)?;
        let events = events_injecting(events, vector, error_code)
            .map_err(|e| EmulatorError::Vcpu(e.into()))?;
        self.write_state(&EVENTS, &events)
    }

    fn store64(
        &mut self,
        gpa: u64,
        data: &[u8; 64],
        kind: StoreKind,
    ) -> Result<StoreReply, EmulatorError> {
        if self.memory.address_in_range(GuestAddress(gpa)) {
            self.memory
                .write_slice(data, GuestAddress(gpa))
                .map_err(|e| EmulatorError::Store {
                    gpa,
                    message: e.to_string(),
                })?;
            // Ordinary memory takes a MOVDIR64B; it is no enqueue target.
            return Ok(kind.reply_without_enqueue_target());
        }
        Ok(self
            .mmio
            .store64(gpa, data, kind)
            .unwrap_or_else(|| kind.reply_without_enqueue_target()))
    }

    fn read_device(&mut self, gpa: u64, data: &mut [u8]) {
        if !self.mmio.read(gpa, data) {
            // Nothing claims it: a master abort reads as all ones.
            data.fill(0xff);
        }
    }

    fn write_device(&mut self, gpa: u64, data: &[u8]) {
        // A write nobody claims is dropped, as on the bus.
        let _ = self.mmio.write(gpa, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{
        KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SHADOW, KVM_VCPUEVENT_VALID_SMM,
    };

    /// What KVM_GET_VCPU_EVENTS reports at a quiet exit.
    fn quiet_exit() -> kvm_vcpu_events {
        let mut e = kvm_vcpu_events {
            flags: KVM_VCPUEVENT_VALID_NMI_PENDING
                | KVM_VCPUEVENT_VALID_SHADOW
                | KVM_VCPUEVENT_VALID_SMM,
            ..Default::default()
        };
        // A stale vector of an earlier exception, not in delivery.
        e.exception.nr = 6;
        e
    }

    #[test]
    fn an_injected_exception_keeps_nmis_and_inits_that_arrive_after_the_exit() {
        let events = events_injecting(quiet_exit(), 14, Some(6)).unwrap();
        assert_eq!(
            (
                events.exception.injected,
                events.exception.nr,
                events.exception.has_error_code,
                events.exception.error_code
            ),
            (1, 14, 1, 6)
        );
        // Without the flags KVM keeps its own NMI-pending count, SMM state
        // (latched INIT) and interrupt shadow instead of the exit's.
        assert_eq!(events.flags, 0);
        let db = events_injecting(quiet_exit(), 1, None).unwrap();
        assert_eq!((db.exception.nr, db.exception.has_error_code), (1, 0));
    }

    #[test]
    fn an_event_in_delivery_is_not_replaced() {
        let mut irq = quiet_exit();
        irq.interrupt.injected = 1;
        irq.interrupt.nr = 0xec;
        assert_eq!(
            events_injecting(irq, 14, Some(4)).unwrap_err(),
            "cannot inject exception 14: KVM was delivering interrupt 0xec at the exit"
        );
        let mut nmi = quiet_exit();
        nmi.nmi.injected = 1;
        assert!(events_injecting(nmi, 1, None)
            .unwrap_err()
            .contains("an NMI"));
        let mut ud = quiet_exit();
        ud.exception.injected = 1;
        assert!(events_injecting(ud, 13, Some(0))
            .unwrap_err()
            .contains("delivering exception 6"));
    }
}
