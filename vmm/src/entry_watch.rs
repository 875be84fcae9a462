//! Exception-entry watch: hardware execution breakpoints (DR0..DR3) on the
//! guest's own exception handlers, so the VMM sees the exception entries it
//! must act on.
//!
//! Some guest events are delivered straight to the guest's IDT and never
//! exit to the VMM: a guest's ENQCMD or MOVDIR64B that the host CPU lacks
//! (#UD, at CPL 3 and CPL 0), a guest's ENQCMD on a host CPU whose
//! IA32_PASID is not the guest's (#GP), and on PVM the backend's half-done
//! SYSCALL (a #PF at LSTAR). A breakpoint on the handler's first
//! instruction ends KVM_RUN with `KVM_EXIT_DEBUG` there, the exception
//! frame on the stack. On ordinary KVM the breakpoint is the hardware's
//! (KVM intercepts the #DB); on PVM the guest's CPL 0 code is always run by
//! KVM's instruction emulator, which checks code breakpoints before each
//! instruction (docs/pvm-backend.md §2.8).
//!
//! Which handlers are watched is the platform's choice
//! (`crate::platform::Platform::watched_vectors`): #UD where the host CPU
//! lacks ENQCMD or MOVDIR64B, #GP where it has ENQCMD
//! (`crate::emulator::handle_exception_entry`), and on PVM #PF once the
//! guest has configured SYSCALL (`crate::emulator::complete_syscall`). A
//! guest pays nothing for the vectors not watched.
//!
//! A handler's address is the linear address its gate names, in the
//! table IDTR points at as the vCPU's mode reads it: 16-byte gates in
//! IA-32e mode, 8-byte interrupt and trap gates in protected mode (task
//! gates are not watched), the IVT's segment:offset entries in real mode
//! (`crate::emulator::idt_handler`).
//!
//! The vCPU re-reads the handler addresses from the guest IDT when
//! (re)arming: at its start (micro-guests have their IDT then), when the
//! guest loads another IDT or switches modes (CR0.PE, EFER.LMA) and, on PVM,
//! at every write of a SYSCALL MSR (Linux writes LSTAR in `syscall_init()`,
//! after `idt_setup_traps()`, on every CPU). On ordinary KVM, where no
//! SYSCALL MSR exits, the vCPU re-arms at the first debug-register-free
//! chance it has: see `crate::vcpu`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use kvm_bindings::{kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_USE_HW_BP};

/// Number of hardware breakpoints (DR0..DR3).
pub const SLOTS: usize = 4;

/// DR7 bits for breakpoint `slot`: local enable, R/W = 00 (instruction
/// execution), LEN = 00 (one byte) (SDM Vol. 3B, 18.2.4).
fn dr7_enable(slot: usize) -> u64 {
    1 << (slot * 2)
}

/// The handlers being watched.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EntryWatch {
    slots: [Option<(u8, u64)>; SLOTS],
}

/// More vectors than debug registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("more than {SLOTS} exception handlers to watch")]
pub struct TooManyWatches;

impl EntryWatch {
    /// A watch of `handlers` (vector, handler address), one debug register
    /// each.
    pub fn new(handlers: &[(u8, u64)]) -> Result<Self, TooManyWatches> {
        if handlers.len() > SLOTS {
            return Err(TooManyWatches);
        }
        let mut watch = Self::default();
        for (slot, &h) in watch.slots.iter_mut().zip(handlers) {
            *slot = Some(h);
        }
        Ok(watch)
    }

    /// The same watch without `vector`'s handler.
    pub fn without(&self, vector: u8) -> Self {
        let mut watch = self.clone();
        for slot in &mut watch.slots {
            if slot.is_some_and(|(v, _)| v == vector) {
                *slot = None;
            }
        }
        watch
    }

    /// Nothing watched.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// The vector whose handler is at `pc`, if watched.
    pub fn vector_at(&self, pc: u64) -> Option<u8> {
        self.slots
            .iter()
            .flatten()
            .find(|&&(_, handler)| handler == pc)
            .map(|&(v, _)| v)
    }

    /// The handler watched for `vector`.
    pub fn handler(&self, vector: u8) -> Option<u64> {
        self.slots
            .iter()
            .flatten()
            .find(|&&(v, _)| v == vector)
            .map(|&(_, h)| h)
    }

    /// "#6@0x..., #14@0x..." for logs; "none" when empty.
    pub fn describe(&self) -> String {
        let watched: Vec<String> = self
            .slots
            .iter()
            .flatten()
            .map(|(v, h)| format!("#{v}@{h:#x}"))
            .collect();
        if watched.is_empty() {
            "none".into()
        } else {
            watched.join(", ")
        }
    }

    /// The `KVM_SET_GUEST_DEBUG` argument that arms the watch (or disarms
    /// it, when empty).
    pub fn guest_debug(&self) -> kvm_guest_debug {
        let mut debug = kvm_guest_debug::default();
        if self.is_empty() {
            return debug;
        }
        debug.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        for (slot, watched) in self.slots.iter().enumerate() {
            if let Some((_, handler)) = watched {
                debug.arch.debugreg[slot] = *handler;
                debug.arch.debugreg[7] |= dr7_enable(slot);
            }
        }
        debug
    }
}

/// The handlers the vCPUs of one VM last found in a guest IDT, shared.
///
/// A vCPU arms its watch from its own IDT when it exits to the VMM after
/// loading one. A secondary vCPU may never exit between its start (no IDT)
/// and its first ENQCMDS: with an in-kernel LAPIC, its INIT/SIPI, timer and
/// HLT all stay in KVM. So a vCPU that finds new handlers publishes them
/// here and has the others kicked out of KVM_RUN; a vCPU without an IDT of
/// its own watches the published ones (Linux's CPUs share one IDT).
#[derive(Debug, Default)]
pub struct SharedHandlers {
    generation: AtomicU64,
    handlers: Mutex<Vec<(u8, u64)>>,
}

impl SharedHandlers {
    /// Publishes `handlers`; true if they differ from the published ones
    /// (the other vCPUs are then to look).
    pub fn publish(&self, handlers: &[(u8, u64)]) -> bool {
        let mut current = self.handlers.lock().unwrap_or_else(|e| e.into_inner());
        if current.as_slice() == handlers {
            return false;
        }
        *current = handlers.to_vec();
        self.generation.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Bumped by every change: a vCPU compares it at each exit.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The published handlers of `vectors`, with the generation they are of.
    pub fn get(&self, vectors: &[u8]) -> (u64, Vec<(u8, u64)>) {
        let current = self.handlers.lock().unwrap_or_else(|e| e.into_inner());
        let generation = self.generation();
        let handlers = current
            .iter()
            .filter(|(v, _)| vectors.contains(v))
            .copied()
            .collect();
        (generation, handlers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_registers_follow_the_slots() {
        let w =
            EntryWatch::new(&[(6, 0xffff_ffff_8140_0a40), (14, 0xffff_ffff_8140_0aa0)]).unwrap();
        let d = w.guest_debug();
        assert_eq!(d.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(d.arch.debugreg[0], 0xffff_ffff_8140_0a40);
        assert_eq!(d.arch.debugreg[1], 0xffff_ffff_8140_0aa0);
        assert_eq!(d.arch.debugreg[2], 0);
        assert_eq!(d.arch.debugreg[7], 0b101, "L0 and L1, execute, length 1");
        assert_eq!(w.vector_at(0xffff_ffff_8140_0aa0), Some(14));
        assert_eq!(w.vector_at(0xffff_ffff_8140_0aa1), None);
        assert_eq!(w.handler(6), Some(0xffff_ffff_8140_0a40));
    }

    #[test]
    fn a_vector_can_be_dropped() {
        let w = EntryWatch::new(&[(6, 0x1000), (14, 0x2000)]).unwrap();
        let d = w.without(6);
        assert_eq!(d.vector_at(0x1000), None);
        assert_eq!(d.vector_at(0x2000), Some(14));
        assert_eq!(d.guest_debug().arch.debugreg[7], 0b100, "only DR1 left");
        assert!(w.without(6).without(14).is_empty());
    }

    #[test]
    fn shared_handlers_change_generation_only_when_they_change() {
        let shared = SharedHandlers::default();
        assert_eq!(shared.get(&[6]), (0, vec![]));
        assert!(shared.publish(&[(6, 0x1000), (14, 0x2000)]));
        assert!(!shared.publish(&[(6, 0x1000), (14, 0x2000)]));
        assert_eq!(shared.get(&[6]), (1, vec![(6, 0x1000)]));
        assert!(shared.publish(&[(6, 0x3000)]));
        assert_eq!(shared.generation(), 2);
    }

    #[test]
    fn empty_watch_disarms() {
        let d = EntryWatch::default().guest_debug();
        assert_eq!(d.control, 0);
        assert_eq!(d.arch.debugreg[7], 0);
    }

    #[test]
    fn at_most_four_handlers() {
        assert_eq!(
            EntryWatch::new(&[(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)]),
            Err(TooManyWatches)
        );
        assert!(EntryWatch::new(&[(1, 1), (2, 2), (3, 3), (4, 4)]).is_ok());
    }
}
