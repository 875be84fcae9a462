//! SYSCALL from guest user mode on this platform's KVM: the VMM completes
//! the half-done SYSCALL the backend leaves (a #PF at LSTAR) so the guest
//! kernel's entry point runs at CPL 0. These tests need /dev/kvm.

use microguest::demos::{
    syscall_round_trips, SYSCALL_FMASK, SYSCALL_LOG, SYSCALL_LOGGED, SYSCALL_RESULT,
};
use microguest::{MicroOptions, DEFAULT_HANDLER_RESULT, KERNEL_CS};
use vm_memory::{Bytes, GuestAddress};
use vmm::vm::RunExit;

#[test]
fn user_syscall_enters_lstar_at_cpl0_and_sysret_returns() {
    microguest::require_kvm();
    const CALLS: u32 = 3;
    let guest = syscall_round_trips(CALLS).unwrap();
    let run = microguest::run(guest, MicroOptions::default()).expect("micro-guest machine");
    assert_eq!(
        run.exit,
        RunExit::TestExit(SYSCALL_RESULT | CALLS),
        "every SYSCALL returned after itself (0x{:x} would be the #PF nobody fixed)",
        DEFAULT_HANDLER_RESULT | 14
    );
    for call in 0..u64::from(CALLS.min(SYSCALL_LOGGED)) {
        let seen: u64 = run
            .memory
            .read_obj(GuestAddress(SYSCALL_LOG + call * 8))
            .unwrap();
        let (code_selector, rflags) = (seen >> 32, seen & 0xffff_ffff);
        assert_eq!(
            code_selector,
            u64::from(KERNEL_CS),
            "call {call}: entry ran with CS 0x10"
        );
        assert_eq!(
            rflags & SYSCALL_FMASK,
            0,
            "call {call}: FMASK cleared IF, IOPL... (RFLAGS {rflags:#x})"
        );
    }
}

#[test]
fn many_system_calls_all_return() {
    const CALLS: u32 = 500;
    let guest = syscall_round_trips(CALLS).unwrap();
    let run = microguest::run(guest, MicroOptions::default()).expect("micro-guest machine");
    assert_eq!(run.exit, RunExit::TestExit(SYSCALL_RESULT | CALLS));
}
