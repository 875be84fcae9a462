//! ENQCMD, ENQCMDS and MOVDIR64B by the exception routes a host produces,
//! at the guest's own handlers, in micro-guests:
//!
//! - #UD at CPL 0 (a host CPU without the instruction: every AMD CPU for
//!   ENQCMD, most CPUs for MOVDIR64B; Linux's idxd submits to kernel work
//!   queues with ENQCMDS and MOVDIR64B);
//! - #GP(0) at CPL 0 and CPL 3 (a host CPU with ENQCMD, whose IA32_PASID is
//!   not the guest's).
//!
//! This machine's KVM (PVM) hands a CPL 0 instruction over as an emulation
//! failure and its CPU has no ENQCMD, so neither route happens here by
//! itself: each guest raises the route on purpose, building the exception
//! frame the CPU would push and jumping to its own handler, where the VMM's
//! breakpoint sees it exactly as it sees a hardware delivery. The #GP route
//! is watched only on a host with ENQCMD, which the test declares
//! (`MicroOptions::host_cpu`). Each runs with the host's platform and with
//! ordinary KVM's behaviour forced. These tests need /dev/kvm.

use bus::StoreKind;
use iced_x86::code_asm::*;
use microguest::demos::command;
use microguest::test_devices::PortalStore;
use microguest::{
    self, exit_with, MicroGuest, MicroOptions, MicroRun, DATA_START, KERNEL_CS, KERNEL_DS,
    TEST_PORTAL_START, USER_CS, USER_DS, USER_STACK_TOP,
};
use vmm::platform::{HostCpu, Platform};
use vmm::vm::RunExit;

use pasid::MSR_IA32_PASID as IA32_PASID;

/// The 64-byte command the guests submit.
const SRC: u64 = DATA_START + 0x1000;
const UD: u8 = 6;
const GP: u8 = 13;
/// What a guest's own handler reports: the vector, with the frame's CS.
const OWN_HANDLER: u32 = 0xee00_0000;
/// What a guest reports if its stack pointer did not come back.
const RSP_LOST: u32 = 0xbad5;
/// IA32_PASID bit 31: the PASID is valid.
const PASID_VALID: u32 = 1 << 31;

/// The platforms each test runs on: this host's, and ordinary KVM's
/// behaviour (no PVM workaround) if the host is not that.
fn platforms() -> Vec<Platform> {
    let host = Platform::host();
    println!("host platform: {host}");
    let mut all = vec![host];
    if host != Platform::Kvm {
        all.push(Platform::Kvm);
    }
    all
}

fn run(guest: MicroGuest, platform: Platform, host_cpu: HostCpu) -> MicroRun {
    microguest::require_kvm();
    microguest::run(
        guest,
        MicroOptions {
            platform,
            host_cpu: Some(host_cpu),
            ..Default::default()
        },
    )
    .expect("micro-guest machine")
}

fn stores(run: &MicroRun) -> Vec<PortalStore> {
    run.portal.stores.lock().unwrap().clone()
}

/// A host CPU with neither instruction (AMD).
const WITHOUT: HostCpu = HostCpu {
    movdir64b: false,
    enqcmd: false,
};
/// A host CPU with both (Sapphire Rapids and later).
const WITH_BOTH: HostCpu = HostCpu {
    movdir64b: true,
    enqcmd: true,
};

/// The guest's own handler for `vector` (emitted here, jumped over): begins with `endbr64` (as Linux's;
/// the VMM steps over it when it leaves the entry to the guest) and reports
/// `OWN_HANDLER | vector << 16 | frame CS`.
fn own_handler(g: &mut MicroGuest, vector: u8) -> CodeLabel {
    let mut l = g.asm.create_label();
    let mut after = g.asm.create_label();
    g.asm.jmp(after).unwrap();
    g.asm.set_label(&mut l).unwrap();
    g.asm.endbr64().unwrap();
    let cs_slot = if vector == GP { 16 } else { 8 };
    g.asm.mov(rax, qword_ptr(rsp + cs_slot)).unwrap();
    g.asm
        .or(eax, (OWN_HANDLER | (u32::from(vector) << 16)) as i32)
        .unwrap();
    g.asm.out(0xf4, eax).unwrap();
    g.asm.hlt().unwrap();
    g.asm.set_label(&mut after).unwrap();
    g.handler(vector, l);
    l
}

/// Emits the frame a CPU pushes for an exception at CPL 0 in 64-bit mode
/// (stack aligned to 16, SS:RSP, RFLAGS, CS, RIP, and an error code for
/// #GP) with RIP = `insn`, then jumps to `handler`. RBX keeps the
/// interrupted RSP for the check after `insn`.
fn raise_from_kernel(g: &mut MicroGuest, handler: CodeLabel, insn: CodeLabel, error: bool) {
    let a = &mut g.asm;
    a.mov(rbx, rsp).unwrap();
    a.and(rsp, -16).unwrap();
    a.push(i32::from(KERNEL_DS)).unwrap();
    a.push(rbx).unwrap();
    a.pushfq().unwrap();
    a.push(i32::from(KERNEL_CS)).unwrap();
    a.lea(rax, ptr(insn)).unwrap();
    a.push(rax).unwrap();
    if error {
        a.push(0).unwrap();
    }
    a.jmp(handler).unwrap();
}

/// After the instruction at `insn`: report `base | ZF`, or RSP_LOST if the
/// stack pointer is not the interrupted one (RBX).
fn report_zf(g: &mut MicroGuest, base: u32) {
    let a = &mut g.asm;
    let mut lost = a.create_label();
    a.setz(al).unwrap();
    a.movzx(eax, al).unwrap();
    a.cmp(rsp, rbx).unwrap();
    a.jne(lost).unwrap();
    a.or(eax, base as i32).unwrap();
    a.out(0xf4, eax).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut lost).unwrap();
    exit_with(a, RSP_LOST).unwrap();
}

/// Kernel code whose `kind` store to the portal (offset 0x40, command with
/// dword 0 = 0x8000_0042) raises `vector` at the guest's handler.
fn kernel_store_by_exception(kind: StoreKind, vector: u8, set_pasid: bool) -> MicroGuest {
    let mut g = MicroGuest::new();
    g.write(SRC, &command(0x8000_0042));
    let handler = own_handler(&mut g, vector);
    let mut insn = g.asm.create_label();
    if set_pasid {
        g.asm.mov(ecx, IA32_PASID).unwrap();
        g.asm.mov(eax, PASID_VALID | 0x1234).unwrap();
        g.asm.xor(edx, edx).unwrap();
        g.asm.wrmsr().unwrap();
    }
    g.asm.mov(rdi, TEST_PORTAL_START + 0x40).unwrap();
    g.asm.mov(rsi, SRC).unwrap();
    raise_from_kernel(&mut g, handler, insn, vector == GP);
    g.asm.set_label(&mut insn).unwrap();
    match kind {
        StoreKind::Enqcmds => g.asm.enqcmds(rdi, zmmword_ptr(rsi)).unwrap(),
        StoreKind::Enqcmd => g.asm.enqcmd(rdi, zmmword_ptr(rsi)).unwrap(),
        StoreKind::Movdir64b => g.asm.movdir64b(rdi, zmmword_ptr(rsi)).unwrap(),
    }
    report_zf(&mut g, 0x700);
    g
}

#[test]
fn kernel_enqcmds_at_the_ud_handler_reaches_the_portal_and_returns_to_the_kernel() {
    for platform in platforms() {
        let g = kernel_store_by_exception(StoreKind::Enqcmds, UD, false);
        let r = run(g, platform, WITHOUT);
        assert_eq!(
            r.exit,
            RunExit::TestExit(0x700),
            "{platform}: ZF=0, RSP back"
        );
        assert_eq!(
            stores(&r),
            vec![PortalStore {
                kind: StoreKind::Enqcmds,
                offset: 0x40,
                data: command(0x8000_0042)
            }],
            "{platform}: source PASID and privilege"
        );
    }
}

#[test]
fn kernel_movdir64b_at_the_ud_handler_reaches_the_portal() {
    for platform in platforms() {
        let g = kernel_store_by_exception(StoreKind::Movdir64b, UD, false);
        let r = run(g, platform, WITHOUT);
        assert_eq!(r.exit, RunExit::TestExit(0x700), "{platform}");
        assert_eq!(stores(&r).len(), 1, "{platform}");
        assert_eq!(stores(&r)[0].kind, StoreKind::Movdir64b);
        assert_eq!(stores(&r)[0].data, command(0x8000_0042), "verbatim");
    }
}

#[test]
fn kernel_ud2_reaches_the_guests_own_handler() {
    for platform in platforms() {
        let mut g = MicroGuest::new();
        own_handler(&mut g, UD);
        g.asm.ud2().unwrap();
        let r = run(g, platform, WITHOUT);
        assert_eq!(
            r.exit,
            RunExit::TestExit(OWN_HANDLER | (u32::from(UD) << 16) | u32::from(KERNEL_CS)),
            "{platform}"
        );
        assert!(stores(&r).is_empty());
    }
}

#[test]
fn kernel_enqcmd_at_the_gp_handler_carries_the_guests_pasid() {
    for platform in platforms() {
        let g = kernel_store_by_exception(StoreKind::Enqcmd, GP, true);
        let r = run(g, platform, WITH_BOTH);
        assert_eq!(r.exit, RunExit::TestExit(0x700), "{platform}");
        assert_eq!(
            stores(&r),
            vec![PortalStore {
                kind: StoreKind::Enqcmd,
                offset: 0x40,
                data: command(0x1234)
            }],
            "{platform}: PASID from the guest's IA32_PASID, user privilege"
        );
    }
}

#[test]
fn enqcmd_at_the_gp_handler_without_a_guest_pasid_is_the_guests() {
    // The guest's IA32_PASID is clear: #GP(0) is its answer too.
    for platform in platforms() {
        let g = kernel_store_by_exception(StoreKind::Enqcmd, GP, false);
        let r = run(g, platform, WITH_BOTH);
        assert_eq!(
            r.exit,
            RunExit::TestExit(OWN_HANDLER | (u32::from(GP) << 16) | u32::from(KERNEL_CS)),
            "{platform}"
        );
        assert!(stores(&r).is_empty());
    }
}

#[test]
fn user_enqcmd_at_the_gp_handler_returns_to_user_mode() {
    for platform in platforms() {
        let mut g = MicroGuest::new();
        g.write(SRC, &command(0));
        let handler = own_handler(&mut g, GP);
        // The guest kernel sets the process's PASID; its user code's ENQCMD
        // is turned into #GP(0) by the host: the frame a delivery from CPL 3
        // pushes (SS:RSP of the user, RFLAGS with IOPL 3, the user CS, RIP
        // of the ENQCMD, error code 0) is built here at CPL 0.
        let mut user_insn = g.asm.create_label();
        let mut user_after = g.asm.create_label();
        g.asm.mov(ecx, IA32_PASID).unwrap();
        g.asm.mov(eax, PASID_VALID | 0x2222).unwrap();
        g.asm.xor(edx, edx).unwrap();
        g.asm.wrmsr().unwrap();
        g.asm.mov(rdi, TEST_PORTAL_START).unwrap();
        g.asm.mov(rsi, SRC).unwrap();
        // Frame: SS, RSP, RFLAGS (IOPL 3), CS, RIP, error code 0.
        g.asm.push(i32::from(USER_DS)).unwrap();
        g.asm.mov(rax, USER_STACK_TOP).unwrap();
        g.asm.push(rax).unwrap();
        g.asm.push(0x3002).unwrap();
        g.asm.push(i32::from(USER_CS)).unwrap();
        g.asm.lea(rax, ptr(user_insn)).unwrap();
        g.asm.push(rax).unwrap();
        g.asm.push(0).unwrap();
        g.asm.jmp(handler).unwrap();
        g.asm.set_label(&mut user_insn).unwrap();
        g.asm.enqcmd(rdi, zmmword_ptr(rsi)).unwrap();
        g.asm.set_label(&mut user_after).unwrap();
        // In user mode (IOPL 3): report ZF and the CS the VMM returned to.
        g.asm.setz(al).unwrap();
        g.asm.movzx(ebx, al).unwrap();
        g.asm.mov(eax, cs).unwrap();
        g.asm.shl(eax, 8).unwrap();
        g.asm.or(eax, ebx).unwrap();
        g.asm.out(0xf4, eax).unwrap();
        g.asm.hlt().unwrap();
        let r = run(g, platform, WITH_BOTH);
        assert_eq!(
            r.exit,
            RunExit::TestExit(u32::from(USER_CS) << 8),
            "{platform}: back at CPL 3 after the ENQCMD, ZF=0"
        );
        assert_eq!(stores(&r).len(), 1, "{platform}");
        assert_eq!(stores(&r)[0].data, command(0x2222));
    }
}

#[test]
fn a_handler_the_vmm_cannot_step_into_is_left_to_the_guest() {
    // Linux's early boot handlers without IBT begin with `push $0`: the VMM
    // stops watching such a handler and the guest's own runs.
    for platform in platforms() {
        let mut g = MicroGuest::new();
        let mut l = g.asm.create_label();
        let mut after = g.asm.create_label();
        g.asm.jmp(after).unwrap();
        g.asm.set_label(&mut l).unwrap();
        g.asm.push(0).unwrap();
        exit_with(&mut g.asm, 0x6006).unwrap();
        g.asm.set_label(&mut after).unwrap();
        g.handler(UD, l);
        g.asm.ud2().unwrap();
        let r = run(g, platform, WITHOUT);
        assert_eq!(r.exit, RunExit::TestExit(0x6006), "{platform}");
    }
}
