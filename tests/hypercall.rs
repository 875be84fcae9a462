//! A guest's hypercall instructions (VMCALL, VMMCALL) at CPL 0, in
//! micro-guests: ordinary KVM runs the hypercall; PVM cannot (its KVM
//! emulator would rewrite the guest's code and spin on it), so there the
//! guest gets #UD at the instruction with its code untouched, and CPUID
//! offers none of the paravirtual features a Linux guest uses by
//! hypercall. These tests need /dev/kvm.

use iced_x86::code_asm::*;
use microguest::{self, exit_with_eax, MicroGuest, MicroOptions, MicroRun, CODE_START};
use vm_memory::{Bytes, GuestAddress};
use vmm::platform::pvm::{kvm_feature, HYPERCALL_FEATURES};
use vmm::platform::Platform;
use vmm::vm::RunExit;

/// A hypercall number KVM does not have.
const UNKNOWN_HYPERCALL: u32 = 0x7fff_0000;
/// KVM's answer to it: -KVM_ENOSYS in RAX.
const KVM_ENOSYS: u32 = 1000;
/// What the guest's #UD handler reports: this, with the frame's RIP
/// relative to the program's start.
const UD_AT: u32 = 0x0600_0000;
/// What the guest reports after the hypercall returned: this, with RAX's
/// low 16 bits.
const RETURNED: u32 = 0x7e70_0000;

fn run(guest: MicroGuest) -> MicroRun {
    microguest::require_kvm();
    microguest::run(guest, MicroOptions::default()).expect("micro-guest machine")
}

/// Kernel code making hypercall `insn` (VMMCALL or VMCALL) with an unknown
/// number; its own #UD handler reports where it was raised. Returns the
/// program and the instruction's offset in it.
fn kernel_hypercall(vmmcall: bool) -> (MicroGuest, u64) {
    let mut g = MicroGuest::new();
    let mut ud = g.asm.create_label();
    let mut start = g.asm.create_label();
    g.asm.jmp(start).unwrap();
    g.asm.set_label(&mut ud).unwrap();
    g.asm.endbr64().unwrap();
    g.asm.mov(rax, qword_ptr(rsp)).unwrap();
    g.asm.sub(eax, CODE_START as i32).unwrap();
    g.asm.or(eax, UD_AT as i32).unwrap();
    exit_with_eax(&mut g.asm).unwrap();
    g.handler(6, ud);
    g.asm.set_label(&mut start).unwrap();
    g.asm.mov(eax, UNKNOWN_HYPERCALL).unwrap();
    g.asm.xor(ebx, ebx).unwrap();
    let mut insn = g.asm.create_label();
    g.asm.set_label(&mut insn).unwrap();
    if vmmcall {
        g.asm.vmmcall().unwrap();
    } else {
        g.asm.vmcall().unwrap();
    }
    g.asm.and(eax, 0xffff).unwrap();
    g.asm.or(eax, RETURNED as i32).unwrap();
    exit_with_eax(&mut g.asm).unwrap();
    // jmp rel8 (2), endbr64 (4), mov rax,[rsp] (4), sub eax,imm32 (5),
    // or eax,imm32 (5), out (2), hlt (1), mov eax,imm32 (5), xor (2).
    (g, 30)
}

#[test]
fn a_kernel_hypercall_never_rewrites_the_guests_code() {
    let platform = Platform::host();
    for (vmmcall, bytes) in [(true, [0x0f, 0x01, 0xd9]), (false, [0x0f, 0x01, 0xc1])] {
        let name = if vmmcall { "VMMCALL" } else { "VMCALL" };
        let (guest, offset) = kernel_hypercall(vmmcall);
        let run = run(guest);
        let mut code = [0u8; 3];
        run.memory
            .read_slice(&mut code, GuestAddress(CODE_START + offset))
            .unwrap();
        match platform {
            Platform::Pvm => {
                assert_eq!(
                    run.exit,
                    RunExit::TestExit(UD_AT | offset as u32),
                    "{name}: #UD at the instruction"
                );
                assert_eq!(code, bytes, "{name}: the guest's code is its own");
            }
            // KVM runs it (the other vendor's instruction after rewriting
            // it to this host's, KVM's default).
            Platform::Kvm => assert_eq!(
                run.exit,
                RunExit::TestExit(RETURNED | (KVM_ENOSYS.wrapping_neg() & 0xffff)),
                "{name}: -KVM_ENOSYS for an unknown hypercall"
            ),
        }
    }
}

#[test]
fn cpuid_offers_paravirtual_features_only_where_hypercalls_work() {
    let mut g = MicroGuest::new();
    g.asm.mov(eax, 0x4000_0001u32).unwrap();
    g.asm.xor(ecx, ecx).unwrap();
    g.asm.cpuid().unwrap();
    exit_with_eax(&mut g.asm).unwrap();
    let RunExit::TestExit(features) = run(g).exit else {
        panic!("the guest did not report CPUID 0x4000_0001");
    };
    match Platform::host() {
        Platform::Pvm => assert_eq!(
            features & HYPERCALL_FEATURES,
            0,
            "KVM features {features:#x}"
        ),
        // KVM has offered PV IPIs since Linux 4.19.
        Platform::Kvm => assert_ne!(
            features & kvm_feature::PV_SEND_IPI,
            0,
            "KVM features {features:#x}"
        ),
    }
}
