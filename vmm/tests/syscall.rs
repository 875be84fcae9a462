//! SYSCALL from guest user mode on this platform's KVM: the VMM completes
//! the half-done SYSCALL the backend leaves (a #PF at LSTAR) so the guest
//! kernel's entry point runs at CPL 0. These tests need /dev/kvm.

use iced_x86::code_asm::*;
use vmm::microguest::{
    self, enter_user, MicroGuest, MicroOptions, DATA_START, DEFAULT_HANDLER_RESULT, KERNEL_CS,
    PTE_P, PTE_W, USER_STACK_TOP,
};
use vmm::vm::RunExit;

const STAR: u32 = 0xc000_0081;
const LSTAR: u32 = 0xc000_0082;
const FMASK: u32 = 0xc000_0084;
/// The kernel's SYSCALL entry: a supervisor-only page, as in Linux (the
/// harness maps everything else user-accessible).
const ENTRY: u64 = DATA_START + 0x10_0000;
/// Where the entry code records what it saw, one u64 per system call.
const LOG: u64 = DATA_START + 0x8000;
/// STAR: SYSCALL loads CS 0x10 / SS 0x18; SYSRET returns to 0x33 / 0x2b.
const STAR_VALUE: u64 = (0x23 << 48) | ((KERNEL_CS as u64) << 32);
/// Linux's mask: TF, DF, IF, IOPL, AC, NT.
const FMASK_VALUE: u64 = 0x47700;
const CALLS: u32 = 3;

fn wrmsr(a: &mut CodeAssembler, index: u32, value: u64) {
    a.mov(ecx, index).unwrap();
    a.mov(eax, value as u32).unwrap();
    a.mov(edx, (value >> 32) as u32).unwrap();
    a.wrmsr().unwrap();
}

/// The entry code: counts the call, records CS (its CPL) and RFLAGS at
/// entry in the log, and returns with SYSRETQ.
fn entry_code() -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    a.mov(rbx, LOG).unwrap();
    a.mov(rax, rdi).unwrap(); // call number, from user code
    a.shl(rax, 3).unwrap();
    a.add(rbx, rax).unwrap();
    a.mov(rax, cs).unwrap();
    a.shl(rax, 32).unwrap();
    a.pushfq().unwrap();
    a.pop(rdx).unwrap();
    a.or(rax, rdx).unwrap();
    a.mov(qword_ptr(rbx), rax).unwrap();
    a.sysretq().unwrap();
    a.assemble(ENTRY).unwrap()
}

#[test]
fn user_syscall_enters_lstar_at_cpl0_and_sysret_returns() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm, which this machine lacks"
    );
    let mut g = MicroGuest::new();
    g.map_page(ENTRY, PTE_P | PTE_W).unwrap();
    g.write(ENTRY, &entry_code());
    let mut user = g.asm.create_label();
    let mut again = g.asm.create_label();
    wrmsr(&mut g.asm, STAR, STAR_VALUE);
    wrmsr(&mut g.asm, LSTAR, ENTRY);
    wrmsr(&mut g.asm, FMASK, FMASK_VALUE);
    enter_user(&mut g.asm, user, USER_STACK_TOP).unwrap();

    // User code: CALLS system calls (RDI = call number), then report how
    // many returned with RCX pointing after the SYSCALL.
    g.asm.set_label(&mut user).unwrap();
    g.asm.xor(edi, edi).unwrap();
    g.asm.xor(esi, esi).unwrap();
    g.asm.set_label(&mut again).unwrap();
    let mut after = g.asm.create_label();
    g.asm.syscall().unwrap();
    g.asm.set_label(&mut after).unwrap();
    g.asm.lea(rax, ptr(after)).unwrap();
    g.asm.cmp(rax, rcx).unwrap();
    g.asm.sete(al).unwrap();
    g.asm.movzx(eax, al).unwrap();
    g.asm.add(esi, eax).unwrap();
    g.asm.inc(edi).unwrap();
    g.asm.cmp(edi, CALLS).unwrap();
    g.asm.jne(again).unwrap();
    g.asm.mov(eax, 0x5c00u32).unwrap();
    g.asm.or(eax, esi).unwrap();
    // SYSRETQ's RFLAGS come from R11, in which the backend drops IOPL: the
    // user cannot use the port itself. HLT raises #GP; its handler reports.
    g.asm.hlt().unwrap();
    let mut gp = g.asm.create_label();
    g.asm.set_label(&mut gp).unwrap();
    g.asm.out(0xf4, eax).unwrap();
    g.asm.hlt().unwrap();
    g.handler(13, gp);

    let run = microguest::run(g, MicroOptions::default()).expect("micro-guest machine");
    assert_eq!(
        run.exit,
        RunExit::TestExit(0x5c00 | CALLS),
        "every SYSCALL returned after itself (0x{:x} would be the #PF nobody fixed)",
        DEFAULT_HANDLER_RESULT | 14
    );
    use vm_memory::Bytes;
    for call in 0..u64::from(CALLS) {
        let seen: u64 = run
            .memory
            .read_obj(vm_memory::GuestAddress(LOG + call * 8))
            .unwrap();
        let (code_selector, rflags) = (seen >> 32, seen & 0xffff_ffff);
        assert_eq!(
            code_selector,
            u64::from(KERNEL_CS),
            "call {call}: entry ran with CS 0x10"
        );
        assert_eq!(
            rflags & FMASK_VALUE,
            0,
            "call {call}: FMASK cleared IF, IOPL... (RFLAGS {rflags:#x})"
        );
    }
}
