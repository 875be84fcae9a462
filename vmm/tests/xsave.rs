//! The XSAVE family on a real vCPU: a micro-guest's kernel code enables
//! XSAVE, restores registers from a hand-made save area, its user code
//! stores them natively, and the kernel saves them back in the standard and
//! compacted formats. On PVM every XSAVE-family instruction at CPL 0 is an
//! emulation-failure exit the VMM's fallback emulator answers; on ordinary
//! KVM they run natively and the results are the same.
//! These tests need /dev/kvm and fail with a message saying so without it.

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress};
use vmm::microguest::{self, enter_user, MicroGuest, MicroOptions, DATA_START, USER_STACK_TOP};
use vmm::vm::RunExit;

/// CR4.OSXSAVE.
const CR4_OSXSAVE: i32 = 1 << 18;
/// XCR0: x87, SSE, AVX.
const XCR0: u32 = 0b111;
/// The hand-made area XRSTOR reads, and the two areas XSAVE and XSAVEC write.
const AREA_IN: u64 = DATA_START + 0x1000;
const AREA_STD: u64 = DATA_START + 0x2000;
const AREA_CMP: u64 = DATA_START + 0x3000;
/// Where user code stores YMM0 and the kernel stores XGETBV's answer.
const YMM_OUT: u64 = DATA_START + 0x400;
const XCR0_OUT: u64 = DATA_START + 0x480;
const DONE: u32 = 0x600d;

fn pattern(seed: u8) -> [u8; 16] {
    std::array::from_fn(|i| seed.wrapping_add(i as u8 * 7))
}

/// Whether this host's CPU has XSAVEC (CPUID.(EAX=0DH,ECX=1):EAX[1]). The
/// guest is offered what the host has; QEMU's TCG CPU of the ordinary-KVM
/// bed has no XSAVEC, so there the compacted half of the test is left out.
fn host_has_xsavec() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    __cpuid(0).eax >= 0xd && __cpuid_count(0xd, 1).eax & (1 << 1) != 0
}

#[test]
fn xrstor_loads_what_user_code_sees_and_xsave_xsavec_save_it() {
    microguest::require_kvm();
    let xsavec = host_has_xsavec();
    if !xsavec {
        eprintln!("this CPU has no XSAVEC: only XRSTOR, XGETBV and XSAVE are checked");
    }
    let mut g = MicroGuest::new();
    let mut user = g.asm.create_label();
    let mut gp_handler = g.asm.create_label();
    let a = &mut g.asm;
    a.mov(rax, cr4).unwrap();
    a.or(rax, CR4_OSXSAVE).unwrap();
    a.mov(cr4, rax).unwrap();
    a.xor(ecx, ecx).unwrap();
    a.xor(edx, edx).unwrap();
    a.mov(eax, XCR0).unwrap();
    a.xsetbv().unwrap();
    a.xor(ecx, ecx).unwrap();
    a.xgetbv().unwrap();
    a.mov(dword_ptr(XCR0_OUT), eax).unwrap();
    a.mov(dword_ptr(XCR0_OUT + 4), edx).unwrap();
    a.mov(eax, u32::MAX).unwrap();
    a.mov(edx, u32::MAX).unwrap();
    a.xrstor64(ptr(AREA_IN)).unwrap();
    enter_user(a, user, USER_STACK_TOP).unwrap();
    // User code: YMM0 to memory natively, then back to the kernel (HLT at
    // CPL 3 is #GP).
    a.set_label(&mut user).unwrap();
    a.vmovdqu(ymmword_ptr(YMM_OUT), ymm0).unwrap();
    a.hlt().unwrap();
    a.set_label(&mut gp_handler).unwrap();
    a.mov(eax, u32::MAX).unwrap();
    a.mov(edx, u32::MAX).unwrap();
    a.xsave64(ptr(AREA_STD)).unwrap();
    if xsavec {
        a.xsavec64(ptr(AREA_CMP)).unwrap();
    }
    microguest::exit_with(a, DONE).unwrap();
    g.handler(13, gp_handler);

    // XRSTOR's input: x87 and SSE from the legacy region, AVX at 576.
    let mut area = vec![0u8; 1024];
    area[0..2].copy_from_slice(&0x037fu16.to_le_bytes()); // FCW
    area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes()); // MXCSR
    area[160..176].copy_from_slice(&pattern(0x11)); // XMM0
    area[576..592].copy_from_slice(&pattern(0x80)); // YMM0[255:128]
    area[512..520].copy_from_slice(&7u64.to_le_bytes()); // XSTATE_BV
    g.write(AREA_IN, &area);
    // Canaries: what XSAVE must leave alone.
    g.write(AREA_STD + 416, &[0xa5; 96]);
    g.write(AREA_STD + 520, &[0x5a; 56]);

    let run = microguest::run(g, MicroOptions::default()).expect("micro-guest machine");
    assert_eq!(run.exit, RunExit::TestExit(DONE));
    let m = &run.memory;
    let read = |at: u64, len: usize| {
        let mut v = vec![0u8; len];
        m.read_slice(&mut v, GuestAddress(at)).unwrap();
        v
    };
    let u64_at = |at: u64| m.read_obj::<u64>(GuestAddress(at)).unwrap();
    assert_eq!(u64_at(XCR0_OUT), u64::from(XCR0), "XGETBV reads XCR0");
    let mut expected_ymm0 = pattern(0x11).to_vec();
    expected_ymm0.extend_from_slice(&pattern(0x80));
    assert_eq!(
        read(YMM_OUT, 32),
        expected_ymm0,
        "user code saw XRSTOR's YMM0"
    );

    // Standard format: XMM0 at 160, YMM0's upper half at 576, XSTATE_BV
    // names SSE and AVX in use; bytes XSAVE does not write keep their value.
    assert_eq!(read(AREA_STD + 160, 16), pattern(0x11));
    assert_eq!(read(AREA_STD + 576, 16), pattern(0x80));
    assert_eq!(u64_at(AREA_STD + 24) & 0xffff_ffff, 0x1f80, "MXCSR");
    assert_eq!(u64_at(AREA_STD + 512) & 0b110, 0b110, "XSTATE_BV");
    assert_eq!(read(AREA_STD + 416, 96), vec![0xa5; 96]);
    assert_eq!(read(AREA_STD + 520, 56), vec![0x5a; 56]);

    if !xsavec {
        return;
    }
    // Compacted: XCOMP_BV = bit 63 | RFBM, AVX first in the extended region.
    assert_eq!(u64_at(AREA_CMP + 520), (1 << 63) | u64::from(XCR0));
    assert_eq!(u64_at(AREA_CMP + 512) & 0b110, 0b110);
    assert_eq!(read(AREA_CMP + 160, 16), pattern(0x11));
    assert_eq!(read(AREA_CMP + 576, 16), pattern(0x80));
}
