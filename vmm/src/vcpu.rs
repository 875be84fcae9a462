//! A vCPU thread's state and its run loop: every exit is answered here.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_bindings::{
    kvm_guest_debug, kvm_regs, kvm_sregs, kvm_sync_regs, kvm_vcpu_events, KVM_EXIT_INTERNAL_ERROR,
    KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP, KVM_INTERNAL_ERROR_EMULATION,
};
use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use pasid::{Ia32Pasid, MSR_IA32_PASID};
use pci::{StoreKind, StoreReply};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::bus::Bus;
use crate::emulator::{self, EmulatorError, EntryAction, GuestCpu, Outcome};
use crate::sva::GuestPasids;

/// Vector of #UD, the exception a user-mode ENQCMD raises on this platform.
const UD_VECTOR: u8 = 6;
/// DR7: local enable of breakpoint 0 (execute, length 1).
const DR7_L0: u64 = 1;
/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES.
const EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;

/// How the VMM sees a guest's #UD entries (where a user-mode ENQCMD lands).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UdHook {
    /// A hardware execution breakpoint on the guest's #UD handler, armed
    /// from the guest IDT when the vCPU starts (micro-guests).
    Breakpoint,
    /// The emulation-failure exit of the `clac` that Linux's entry points
    /// begin with; the emulator recognises the #UD entry there.
    EntryClac,
}

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
    pub(crate) ud_hook: Option<UdHook>,
    ud_handler: Option<u64>,
    ud_handler_skip: u64,
    /// KVM has stored this exit's registers in the `kvm_run` page (see
    /// [`Vcpu::new`]); false before the first exit.
    synced: bool,
}

impl Vcpu {
    pub(crate) fn new(
        fd: VcpuFd,
        id: u8,
        memory: GuestMemoryMmap,
        mmio: Arc<Bus>,
        pio: Arc<Bus>,
        ud_hook: Option<UdHook>,
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
            ud_hook,
            ud_handler: None,
            ud_handler_skip: 0,
            synced: false,
        }
    }

    /// Arms the #UD breakpoint from the guest IDT (for [`UdHook::Breakpoint`]).
    fn arm_ud_breakpoint(&mut self) -> Result<(), String> {
        let handler = emulator::idt_handler(self, UD_VECTOR).map_err(|e| e.to_string())?;
        let Some(handler) = handler else {
            return Err("the guest IDT has no #UD gate to watch".into());
        };
        let mut debug = kvm_guest_debug {
            control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
            ..Default::default()
        };
        // The backend re-fires an instruction breakpoint whatever RFLAGS.RF
        // says (measured), so letting the guest's handler run means stepping
        // over its first instruction, which must therefore be one that does
        // nothing: Linux's entry points begin with `endbr64`.
        let first = self.read_linear(handler, 4)?;
        self.ud_handler_skip = match first.as_slice() {
            [0xf3, 0x0f, 0x1e, 0xfa] => 4,
            [0x90, ..] => 1,
            _ => {
                return Err(format!(
                "the #UD handler at {handler:#x} does not begin with endbr64 or nop ({first:02x?})"
            ))
            }
        };
        debug.arch.debugreg[0] = handler;
        debug.arch.debugreg[7] = DR7_L0;
        self.fd
            .set_guest_debug(&debug)
            .map_err(|e| format!("KVM_SET_GUEST_DEBUG: {e}"))?;
        self.ud_handler = Some(handler);
        Ok(())
    }

    /// Reads guest-virtual memory through KVM's translation.
    fn read_linear(&self, addr: u64, len: usize) -> Result<Vec<u8>, String> {
        let t = self
            .fd
            .translate_gva(addr)
            .map_err(|e| format!("KVM_TRANSLATE {addr:#x}: {e}"))?;
        if t.valid == 0 {
            return Err(format!("{addr:#x} is not mapped in the guest"));
        }
        let mut buf = vec![0; len];
        self.memory
            .read_slice(&mut buf, GuestAddress(t.physical_address))
            .map_err(|e| format!("reading {addr:#x}: {e}"))?;
        Ok(buf)
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
        if self.ud_hook == Some(UdHook::Breakpoint) {
            if let Err(e) = self.arm_ud_breakpoint() {
                return VcpuStop::Fatal(format!("vCPU {}: cannot watch #UD entries: {e}", self.id));
            }
        }
        loop {
            if stop.load(Ordering::Acquire) {
                return VcpuStop::Requested;
            }
            let result = self.fd.run();
            self.synced = result.is_ok();
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
                    VcpuExit::X86Wrmsr(msr) => {
                        if msr.index != MSR_IA32_PASID || self.pasid_msr.write(msr.data).is_err() {
                            // Reserved bits or an MSR nobody emulates: #GP.
                            *msr.error = 1;
                            Action::Resume
                        } else {
                            Action::PasidWritten(msr.data)
                        }
                    }
                    VcpuExit::Debug(arch) => Action::Debug(arch.pc),
                    VcpuExit::InternalError => Action::InternalError,
                    VcpuExit::Shutdown => return VcpuStop::TripleFault,
                    VcpuExit::SystemEvent(kind, _) => return VcpuStop::SystemEvent(kind),
                    VcpuExit::Hlt => Action::Fatal("HLT (interrupts cannot wake it)".into()),
                    VcpuExit::Intr => Action::Resume,
                    other => Action::Fatal(format!("{other:?}")),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Action::Resume,
                Err(e) => return VcpuStop::Fatal(format!("vCPU {}: KVM_RUN failed: {e}", self.id)),
            };
            match action {
                Action::Resume => {}
                Action::CheckStop => {
                    if stop.load(Ordering::Acquire) {
                        return VcpuStop::DeviceRequest;
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
                Action::Debug(pc) => {
                    if let Err(line) = self.on_debug(pc) {
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

    /// A hardware breakpoint hit: the #UD handler entry when armed.
    fn on_debug(&mut self, pc: u64) -> Result<(), String> {
        if Some(pc) != self.ud_handler {
            return Err(format!(
                "vCPU {}: unexpected debug exit at RIP {pc:#x}",
                self.id
            ));
        }
        let action =
            emulator::handle_exception_entry(self, UD_VECTOR).map_err(|e| self.fatal(&e))?;
        match action {
            EntryAction::PassThrough | EntryAction::NotHandled(_) => {
                if let EntryAction::NotHandled(u) = &action {
                    log::warn!("vCPU {}: #UD entry left to the guest: {u}", self.id);
                }
                // Let the guest's handler run: step over its first
                // instruction (see arm_ud_breakpoint).
                let mut regs = GuestCpu::regs(self).map_err(|e| self.fatal(&e))?;
                regs.rip += self.ud_handler_skip;
                GuestCpu::set_regs(self, &regs).map_err(|e| self.fatal(&e))
            }
            EntryAction::Emulated(_) | EntryAction::Faulted(_) | EntryAction::Retry => Ok(()),
        }
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
        let bytes = bytes.to_vec();
        match emulator::handle_emulation_failure(self, &bytes).map_err(|e| self.fatal(&e))? {
            Outcome::NotHandled(u) => Err(format!("vCPU {}: emulation failure: {u}", self.id)),
            _ => Ok(()),
        }
    }

    fn fatal(&mut self, e: &EmulatorError) -> String {
        let rip = self.rip();
        format!("vCPU {}: emulator error at RIP {rip:#x}: {e}", self.id)
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
    PasidWritten(u64),
    Debug(u64),
    InternalError,
    Fatal(String),
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

    /// The PASID recorded for the address space of `cr3` (the MSR value the
    /// running task would have had restored), checked against the guest's
    /// PASID-table entry; not the last value written, which may belong to
    /// another task.
    fn enqcmd_pasid(&mut self, cr3: u64) -> u64 {
        self.pasids.enqcmd_pasid(cr3)
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
        let mut events = self.read_state(&EVENTS)?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = u8::from(error_code.is_some());
        events.exception.error_code = error_code.unwrap_or(0);
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
}
