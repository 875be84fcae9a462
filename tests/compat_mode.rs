//! MOVDIR64B, ENQCMD and ENQCMDS outside 64-bit mode, in micro-guests:
//! compatibility mode (32- and 16-bit code in long mode) at CPL 0, where
//! this machine's KVM hands the instruction over as an emulation failure,
//! and at CPL 3, where the host CPU raises #UD at the guest's handler
//! (the VMM's watch there emulates it); protected mode with paging off and
//! real mode at CPL 0. Each case asserts the architectural answer: the
//! store, or the exception with its error code (and CR2), raised from the
//! interrupted context. Protected mode with 32-bit or PAE paging is
//! covered by the emulator's unit tests only: this machine's KVM (PVM)
//! runs no guest with paging on outside long mode (it shuts the vCPU
//! down). These tests need /dev/kvm.

use bus::StoreKind;
use iced_x86::code_asm::*;
use microguest::demos::command;
use microguest::test_devices::PortalStore;
use microguest::{
    self, exit_with, MicroGuest, MicroOptions, MicroRun, DATA_START, FREE_SELECTOR, KERNEL32_CS,
    TEST_MMIO_START, TEST_PORTAL_START, USER32_CS, USER_DS, USER_STACK_TOP,
};
use pasid::MSR_IA32_PASID as IA32_PASID;
use vm_memory::{Bytes, GuestAddress};
use vmm::platform::Platform;
use vmm::vm::RunExit;
use vmm::x86::segment;

/// Where the 32- or 16-bit code is loaded (identity-mapped, executable).
const CODE32: u64 = DATA_START + 0x8000;
/// The 64-byte command the guests submit.
const SRC: u64 = DATA_START + 0x1000;
/// Where a fault handler records CR2, the frame's RIP and CS.
const REPORT: u64 = DATA_START + 0x7000;
/// What 32-bit code reports when the instruction completed.
const DONE: u32 = 0x3200;

const GP: u8 = 13;
const SS: u8 = 12;
const PF: u8 = 14;
const UD: u8 = 6;

/// A data segment with a base and a byte-granular limit.
const BASED_DS: u16 = FREE_SELECTOR;
/// A data segment (for SS) with a small limit.
const SMALL_SS: u16 = FREE_SELECTOR + 8;
/// A 16-bit code segment based at [`CODE32`].
const CODE16_CS: u16 = FREE_SELECTOR + 16;

fn assemble(bitness: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    let mut a = CodeAssembler::new(bitness).unwrap();
    f(&mut a);
    a.assemble(ip).unwrap()
}

/// 32-bit `code` at [`CODE32`], then the exit with [`DONE`] | ZF.
fn code32_reporting_zf(code: impl FnOnce(&mut CodeAssembler)) -> Vec<u8> {
    assemble(32, CODE32, |a| {
        code(a);
        a.setz(al).unwrap();
        a.movzx(eax, al).unwrap();
        a.or(eax, DONE as i32).unwrap();
        a.out(0xf4, eax).unwrap();
        a.hlt().unwrap();
    })
}

fn stores(run: &MicroRun) -> Vec<PortalStore> {
    run.portal.stores.lock().unwrap().clone()
}

/// A read/write data segment at `base` whose last byte is `base + limit`
/// (byte granularity, B=1).
fn data_segment(base: u32, limit: u32, dpl: u8) -> u64 {
    segment::SegmentDescriptor {
        limit,
        granularity_4k: false,
        ..segment::data(dpl)
    }
    .to_u64_at(base)
}

/// 64-bit code that far-returns to `selector:target` (RETFQ).
fn far_return_to(asm: &mut CodeAssembler, selector: u16, target: u64) {
    asm.push(i32::from(selector)).unwrap();
    asm.mov(rax, target).unwrap();
    asm.push(rax).unwrap();
    asm.db(&[0x48, 0xcb]).unwrap(); // retfq
}

/// 64-bit handlers for #GP, #SS, #PF and #UD that record CR2, the frame's
/// RIP and CS at [`REPORT`] and exit with `vector << 24 | error code`.
fn fault_handlers(g: &mut MicroGuest) {
    for vector in [GP, SS, PF, UD] {
        let mut l = g.asm.create_label();
        g.asm.set_label(&mut l).unwrap();
        g.asm.endbr64().unwrap();
        if vector == UD {
            g.asm.xor(ebx, ebx).unwrap();
        } else {
            g.asm.pop(rbx).unwrap(); // the error code
        }
        g.asm.mov(rdi, REPORT).unwrap();
        g.asm.mov(rax, cr2).unwrap();
        g.asm.mov(qword_ptr(rdi), rax).unwrap();
        g.asm.mov(rax, qword_ptr(rsp)).unwrap();
        g.asm.mov(qword_ptr(rdi + 8), rax).unwrap();
        g.asm.mov(rax, qword_ptr(rsp + 8)).unwrap();
        g.asm.mov(qword_ptr(rdi + 16), rax).unwrap();
        g.asm.mov(eax, ebx).unwrap();
        g.asm.or(eax, u32::from(vector) << 24).unwrap();
        g.asm.out(0xf4, eax).unwrap();
        g.asm.hlt().unwrap();
        g.handler(vector, l);
    }
}

/// What [`fault_handlers`] recorded: (CR2, RIP, CS).
fn report(run: &MicroRun) -> (u64, u64, u64) {
    let at = |off: u64| -> u64 { run.memory.read_obj(GuestAddress(REPORT + off)).unwrap() };
    (at(0), at(8), at(16))
}

fn fault(vector: u8, error_code: u32) -> RunExit {
    RunExit::TestExit(u32::from(vector) << 24 | error_code)
}

/// A CPL 0 guest that sets up `segments`, writes the command at SRC and
/// enters 32-bit compatibility-mode code (CS 0x08) whose body is `code`;
/// the body's fall-through exits with [`DONE`] | ZF.
fn kernel_compat(
    segments: &[(u16, u64)],
    prepare: impl FnOnce(&mut MicroGuest),
    code: impl FnOnce(&mut CodeAssembler),
) -> MicroRun {
    let mut g = MicroGuest::new();
    for &(selector, desc) in segments {
        g.segment(selector, desc).unwrap();
    }
    g.write(SRC, &command(0x8000_0042));
    prepare(&mut g);
    g.write(
        CODE32,
        &code32_reporting_zf(|a| {
            code(a);
        }),
    );
    far_return_to(&mut g.asm, KERNEL32_CS, CODE32);
    fault_handlers(&mut g);
    microguest::require_kvm();
    microguest::run(g, MicroOptions::default()).expect("micro-guest machine")
}

/// The instruction's offset in [`CODE32`] after `setup`, for the frame's RIP.
fn insn_offset(setup: impl FnOnce(&mut CodeAssembler)) -> u64 {
    assemble(32, CODE32, setup).len() as u64
}

#[test]
fn compat_kernel_movdir64b_reaches_the_portal() {
    // The upper halves of RDI and RSI are not part of a 32-bit address.
    let r = kernel_compat(
        &[],
        |g| {
            g.asm.mov(rdi, 0xdead_beef_0000_0000u64).unwrap();
            g.asm.mov(rsi, 0x1234_5678_0000_0000u64).unwrap();
        },
        |a| {
            a.mov(edi, (TEST_PORTAL_START + 0x40) as u32).unwrap();
            a.mov(esi, SRC as u32).unwrap();
            a.movdir64b(edi, zmmword_ptr(esi)).unwrap();
        },
    );
    assert_eq!(r.exit, RunExit::TestExit(DONE));
    assert_eq!(
        stores(&r),
        vec![PortalStore {
            kind: StoreKind::Movdir64b,
            offset: 0x40,
            data: command(0x8000_0042)
        }]
    );
}

#[test]
fn compat_kernel_enqcmds_retry_sets_zf() {
    let mut g = MicroGuest::new();
    g.write(SRC, &command(0x8000_0042));
    g.write(
        CODE32,
        &code32_reporting_zf(|a| {
            a.mov(edi, (TEST_PORTAL_START + 0x80) as u32).unwrap();
            a.mov(esi, SRC as u32).unwrap();
            a.enqcmds(edi, zmmword_ptr(esi)).unwrap();
        }),
    );
    far_return_to(&mut g.asm, KERNEL32_CS, CODE32);
    microguest::require_kvm();
    let r = microguest::run(
        g,
        MicroOptions {
            portal_retry: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(r.exit, RunExit::TestExit(DONE | 1), "ZF=1: retry");
    assert_eq!(stores(&r).len(), 1);
    assert_eq!(
        (stores(&r)[0].kind, stores(&r)[0].data),
        (StoreKind::Enqcmds, command(0x8000_0042))
    );
}

#[test]
fn compat_kernel_movdir64b_to_ram_stores_the_64_bytes() {
    let dest = DATA_START + 0x6040;
    let r = kernel_compat(
        &[],
        |_| {},
        |a| {
            a.mov(edi, dest as u32).unwrap();
            a.mov(esi, SRC as u32).unwrap();
            a.movdir64b(edi, zmmword_ptr(esi)).unwrap();
        },
    );
    assert_eq!(r.exit, RunExit::TestExit(DONE));
    assert!(stores(&r).is_empty());
    let mut back = [0u8; 64];
    r.memory.read_slice(&mut back, GuestAddress(dest)).unwrap();
    assert_eq!(back, command(0x8000_0042));
}

#[test]
fn compat_kernel_source_through_a_based_data_segment() {
    // DS based 0x1000 below SRC: [esi = 0x1000] is SRC. ES keeps base 0.
    let base = (SRC - 0x1000) as u32;
    let r = kernel_compat(
        &[(BASED_DS, data_segment(base, 0xf_ffff, 0))],
        |_| {},
        |a| {
            a.mov(eax, u32::from(BASED_DS)).unwrap();
            a.mov(ds, ax).unwrap();
            a.mov(edi, TEST_PORTAL_START as u32).unwrap();
            a.mov(esi, 0x1000u32).unwrap();
            a.movdir64b(edi, zmmword_ptr(esi)).unwrap();
        },
    );
    assert_eq!(r.exit, RunExit::TestExit(DONE));
    assert_eq!(stores(&r).len(), 1);
    assert_eq!(stores(&r)[0].data, command(0x8000_0042));
}

/// A compatibility-mode MOVDIR64B from SRC to ES:`offset`, ES being the
/// portal's page (base at the portal, limit 0xfff).
fn store_through_portal_es(offset: u32) -> MicroRun {
    kernel_compat(
        &[(BASED_DS, data_segment(TEST_PORTAL_START as u32, 0xfff, 0))],
        |_| {},
        |a| {
            a.mov(eax, u32::from(BASED_DS)).unwrap();
            a.mov(es, ax).unwrap();
            a.mov(edi, offset).unwrap();
            a.mov(esi, SRC as u32).unwrap();
            a.movdir64b(edi, zmmword_ptr(esi)).unwrap();
        },
    )
}

#[test]
fn compat_kernel_destination_through_a_based_es() {
    // ES based at the portal page: ES:EDI = 0x1c0 is its offset 0x1c0.
    let r = store_through_portal_es(0x1c0);
    assert_eq!(r.exit, RunExit::TestExit(DONE));
    assert_eq!(stores(&r).len(), 1);
    assert_eq!(stores(&r)[0].offset, 0x1c0);
}

/// Loads `segment` (selector `selector`, whose limit ends `limit_after`
/// bytes after SRC) with `load`, then runs `movdir64b edi, [base]` with
/// `base` = SRC; asserts that it raises `vector` with error code 0 at the
/// instruction, from CS 0x08, and stores nothing.
fn assert_limit_fault(
    selector: u16,
    limit_after: u64,
    load: fn(&mut CodeAssembler),
    base: AsmRegister32,
    vector: u8,
) {
    let setup = |a: &mut CodeAssembler| {
        a.mov(eax, u32::from(selector)).unwrap();
        load(a);
        a.mov(edi, TEST_PORTAL_START as u32).unwrap();
        a.mov(base, SRC as u32).unwrap();
    };
    let at = CODE32 + insn_offset(setup);
    let r = kernel_compat(
        &[(selector, data_segment(0, (SRC + limit_after) as u32, 0))],
        |_| {},
        |a| {
            setup(a);
            a.movdir64b(edi, zmmword_ptr(base)).unwrap();
        },
    );
    assert_eq!(r.exit, fault(vector, 0));
    let (_, rip, frame_cs) = report(&r);
    assert_eq!(
        (rip, frame_cs),
        (at, u64::from(KERNEL32_CS)),
        "raised at the instruction"
    );
    assert!(stores(&r).is_empty());
}

#[test]
fn compat_kernel_source_past_the_ds_limit_is_gp0() {
    // DS ends 0x3e bytes after SRC: the 64th byte is outside it.
    assert_limit_fault(BASED_DS, 0x3e, |a| a.mov(ds, ax).unwrap(), esi, GP);
}

#[test]
fn compat_kernel_stack_source_past_the_ss_limit_is_ss0() {
    // EBP as the base: an SS reference; SS ends below the source's end.
    assert_limit_fault(SMALL_SS, 0x20, |a| a.mov(ss, ax).unwrap(), ebp, SS);
}

#[test]
fn compat_kernel_destination_past_the_es_limit_is_gp0() {
    // ES:0x1000 is one byte past the limit.
    let r = store_through_portal_es(0x1000);
    assert_eq!(r.exit, fault(GP, 0));
    assert!(stores(&r).is_empty());
}

#[test]
fn compat_kernel_16bit_address_size_wraps_at_64_kib() {
    // movdir64b di, [si + 0x10] (0x67 prefix): SI = 0xfff8 wraps to 8, in
    // a DS based 8 below SRC; DI, not EDI, is the destination offset.
    let r = kernel_compat(
        &[(BASED_DS, data_segment((SRC - 8) as u32, 0xf_ffff, 0))],
        |_| {},
        |a| {
            a.mov(eax, u32::from(BASED_DS)).unwrap();
            a.mov(ds, ax).unwrap();
            a.mov(edi, 0xdead_6040u32).unwrap();
            a.mov(esi, 0x1234_fff8u32).unwrap();
            a.movdir64b(di, zmmword_ptr(si + 0x10)).unwrap();
        },
    );
    assert_eq!(r.exit, RunExit::TestExit(DONE));
    // ES base 0: linear = DI = 0x6040, in RAM.
    assert!(stores(&r).is_empty());
    let mut back = [0u8; 64];
    r.memory
        .read_slice(&mut back, GuestAddress(0x6040))
        .unwrap();
    assert_eq!(back, command(0x8000_0042));
}

#[test]
fn compat_kernel_16bit_code_segment_uses_16bit_addresses() {
    // A CS.D=0 code segment based at CODE32: IP 0 is its first byte;
    // movdir64b di, [si] needs no prefix there.
    let mut g = MicroGuest::new();
    g.segment(CODE16_CS, segment::code16(0).to_u64_at(CODE32 as u32))
        .unwrap();
    g.segment(BASED_DS, data_segment(TEST_PORTAL_START as u32, 0xffff, 0))
        .unwrap();
    g.write(SRC, &command(0x16));
    g.write(
        CODE32,
        &assemble(16, 0, |a| {
            // ES based at the portal; DS flat (the kernel data segment).
            a.mov(ax, i32::from(BASED_DS)).unwrap();
            a.mov(es, ax).unwrap();
            a.mov(ax, i32::from(microguest::KERNEL_DS)).unwrap();
            a.mov(ds, ax).unwrap();
            a.mov(di, 0x240).unwrap();
            a.mov(esi, SRC as u32).unwrap();
            // The 0x67 prefix makes the source [esi]: 32-bit addressing in
            // 16-bit code; the destination register is then EDI.
            a.movdir64b(edi, zmmword_ptr(esi)).unwrap();
            a.mov(eax, DONE).unwrap();
            a.out(0xf4, eax).unwrap();
            a.hlt().unwrap();
        }),
    );
    far_return_to(&mut g.asm, CODE16_CS, 0);
    fault_handlers(&mut g);
    microguest::require_kvm();
    let r = microguest::run(g, MicroOptions::default()).unwrap();
    assert_eq!(r.exit, RunExit::TestExit(DONE));
    assert_eq!(stores(&r).len(), 1);
    assert_eq!(
        (stores(&r)[0].offset, stores(&r)[0].data),
        (0x240, command(0x16))
    );
}

#[test]
fn compat_kernel_misaligned_destination_is_gp0() {
    let r = kernel_compat(
        &[],
        |_| {},
        |a| {
            a.mov(edi, (TEST_PORTAL_START + 0x48) as u32).unwrap();
            a.mov(esi, SRC as u32).unwrap();
            a.enqcmds(edi, zmmword_ptr(esi)).unwrap();
        },
    );
    assert_eq!(r.exit, fault(GP, 0));
    assert!(stores(&r).is_empty());
}

#[test]
fn compat_kernel_destination_on_a_missing_page_is_pf_write_with_cr2() {
    let page = DATA_START + 0x4000;
    let r = kernel_compat(
        &[],
        |g| g.map_page(page, 0).unwrap(),
        |a| {
            a.mov(edi, (page + 0x80) as u32).unwrap();
            a.mov(esi, SRC as u32).unwrap();
            a.movdir64b(edi, zmmword_ptr(esi)).unwrap();
        },
    );
    // Supervisor write, not present: error code 2; CR2 = the destination.
    assert_eq!(r.exit, fault(PF, 2));
    assert_eq!(report(&r).0, page + 0x80);
    assert!(stores(&r).is_empty());
}

#[test]
fn compat_kernel_source_from_device_registers_reads_the_device() {
    // The scratch device's first register reads "TEST".
    let r = kernel_compat(
        &[],
        |_| {},
        |a| {
            a.mov(edi, TEST_PORTAL_START as u32).unwrap();
            a.mov(esi, TEST_MMIO_START as u32).unwrap();
            a.movdir64b(edi, zmmword_ptr(esi)).unwrap();
        },
    );
    assert_eq!(r.exit, RunExit::TestExit(DONE));
    let mut expected = [0u8; 64];
    expected[..4].copy_from_slice(&microguest::test_devices::TEST_MMIO_MAGIC.to_le_bytes());
    assert_eq!(stores(&r).len(), 1);
    assert_eq!(stores(&r)[0].data, expected);
}

/// The platforms a user-mode test runs on: this host's, and ordinary KVM's
/// behaviour (its #UD watch) if the host is not that.
fn platforms() -> Vec<Platform> {
    let host = Platform::host();
    let mut all = vec![host];
    if host != Platform::Kvm {
        all.push(Platform::Kvm);
    }
    all
}

/// A guest that loads IA32_PASID (valid, PASID 0x77), then runs 32-bit
/// `code` at CPL 3 (CS 0x23, IOPL 3); falling through exits with
/// [`DONE`] | ZF from user mode.
fn user_compat(platform: Platform, code: impl FnOnce(&mut CodeAssembler)) -> MicroRun {
    user_compat_in(MicroGuest::new(), platform, code)
}

/// [`user_compat`] on a prepared guest `g`.
fn user_compat_in(
    mut g: MicroGuest,
    platform: Platform,
    code: impl FnOnce(&mut CodeAssembler),
) -> MicroRun {
    g.write(SRC, &command(0x33));
    g.write(
        CODE32,
        &code32_reporting_zf(|a| {
            code(a);
        }),
    );
    g.asm.mov(ecx, IA32_PASID).unwrap();
    g.asm.mov(eax, 0x8000_0077u32).unwrap();
    g.asm.xor(edx, edx).unwrap();
    g.asm.wrmsr().unwrap();
    // IRETQ to CPL 3: SS, RSP, RFLAGS (IOPL 3), CS, RIP.
    g.asm.push(i32::from(USER_DS)).unwrap();
    g.asm.mov(rax, USER_STACK_TOP).unwrap();
    g.asm.push(rax).unwrap();
    g.asm.push(0x3002).unwrap();
    g.asm.push(i32::from(USER32_CS)).unwrap();
    g.asm.mov(rax, CODE32).unwrap();
    g.asm.push(rax).unwrap();
    g.asm.iretq().unwrap();
    exit_with(&mut g.asm, 1).unwrap();
    fault_handlers(&mut g);
    microguest::require_kvm();
    microguest::run(
        g,
        MicroOptions {
            platform,
            ..Default::default()
        },
    )
    .expect("micro-guest machine")
}

#[test]
fn compat_user_enqcmd_completes_with_the_msr_pasid() {
    for platform in platforms() {
        let r = user_compat(platform, |a| {
            a.mov(edi, (TEST_PORTAL_START + 0x100) as u32).unwrap();
            a.mov(esi, SRC as u32).unwrap();
            a.enqcmd(edi, zmmword_ptr(esi)).unwrap();
        });
        assert_eq!(
            r.exit,
            RunExit::TestExit(DONE),
            "{platform}: back in user mode, ZF=0"
        );
        assert_eq!(stores(&r).len(), 1, "{platform}");
        assert_eq!(
            (stores(&r)[0].kind, stores(&r)[0].offset, stores(&r)[0].data),
            (StoreKind::Enqcmd, 0x100, command(0x77)),
            "{platform}"
        );
    }
}

#[test]
fn compat_user_movdir64b_reaches_the_portal() {
    for platform in platforms() {
        let r = user_compat(platform, |a| {
            a.mov(edi, (TEST_PORTAL_START + 0xfc0) as u32).unwrap();
            a.mov(esi, SRC as u32).unwrap();
            a.movdir64b(edi, zmmword_ptr(esi)).unwrap();
        });
        assert_eq!(r.exit, RunExit::TestExit(DONE), "{platform}");
        assert_eq!(stores(&r).len(), 1, "{platform}");
        assert_eq!(stores(&r)[0].data, command(0x33), "{platform}");
    }
}

#[test]
fn compat_user_enqcmds_is_gp0_from_user_mode() {
    for platform in platforms() {
        let setup = |a: &mut CodeAssembler| {
            a.mov(edi, TEST_PORTAL_START as u32).unwrap();
            a.mov(esi, SRC as u32).unwrap();
        };
        let at = CODE32 + insn_offset(setup);
        let r = user_compat(platform, |a| {
            setup(a);
            a.enqcmds(edi, zmmword_ptr(esi)).unwrap();
        });
        assert_eq!(r.exit, fault(GP, 0), "{platform}");
        let (_, rip, frame_cs) = report(&r);
        assert_eq!((rip, frame_cs), (at, u64::from(USER32_CS)), "{platform}");
        assert!(stores(&r).is_empty());
    }
}

#[test]
fn compat_user_source_on_a_supervisor_page_is_pf_with_cr2() {
    let page = DATA_START + 0x5000;
    for platform in platforms() {
        let mut g = MicroGuest::new();
        g.map_page(page, microguest::PTE_P | microguest::PTE_W)
            .unwrap();
        let r = user_compat_in(g, platform, |a| {
            a.mov(edi, TEST_PORTAL_START as u32).unwrap();
            a.mov(esi, (page - 0x10) as u32).unwrap();
            a.movdir64b(edi, zmmword_ptr(esi)).unwrap();
        });
        // A user read of a present supervisor page: P | U, CR2 = its
        // first byte.
        assert_eq!(r.exit, fault(PF, 5), "{platform}");
        assert_eq!(report(&r).0, page, "{platform}");
        assert!(stores(&r).is_empty());
    }
}

/// Starts the guest in protected mode without long mode or paging: flat
/// 32-bit code (the harness's 0x08) at [`CODE32`], flat data (0x18).
fn protected_mode(l: &mut microguest::LoadedGuest) {
    use vmm::x86::{cr0, rflags};
    l.sregs.cr0 = cr0::PE | cr0::ET | cr0::NE;
    l.sregs.cr4 = 0;
    l.sregs.efer = 0;
    l.sregs.cs = segment::code32(0).to_kvm_segment(KERNEL32_CS);
    l.regs.rip = CODE32;
    l.regs.rsp = 0x1f_0000;
    l.regs.rflags = rflags::FIXED;
}

#[test]
fn protected_mode_without_paging_stores_to_the_physical_portal() {
    let mut g = MicroGuest::new();
    g.write(SRC, &command(0x8000_0099));
    g.write(
        CODE32,
        &code32_reporting_zf(|a| {
            a.mov(edi, (TEST_PORTAL_START + 0xc0) as u32).unwrap();
            a.mov(esi, SRC as u32).unwrap();
            a.enqcmds(edi, zmmword_ptr(esi)).unwrap();
        }),
    );
    microguest::require_kvm();
    let r = microguest::run_from(g, MicroOptions::default(), protected_mode).unwrap();
    assert_eq!(r.exit, RunExit::TestExit(DONE));
    assert_eq!(
        stores(&r),
        vec![PortalStore {
            kind: StoreKind::Enqcmds,
            offset: 0xc0,
            data: command(0x8000_0099)
        }]
    );
}

/// Real mode: code at 0x6000 (CS 0x600), the command at 0x7000 (DS 0x700),
/// destination segment ES 0x7100, stack SS 0x800 with SP 0x1000, and a
/// #GP handler (IVT entry 13) at 0x600:0x200 that exits with
/// `0x0d0000 | SP`.
fn real_mode_run(code: impl FnOnce(&mut CodeAssembler)) -> MicroRun {
    const CODE: u64 = 0x6000;
    const HANDLER: u64 = 0x200;
    let mut g = MicroGuest::new();
    g.write(0x7000, &command(0x1616));
    g.write(CODE, &assemble(16, 0, code));
    g.write(
        CODE + HANDLER,
        &assemble(16, HANDLER, |a| {
            a.xor(eax, eax).unwrap();
            a.mov(ax, sp).unwrap();
            a.or(eax, 0x0d_0000).unwrap();
            a.out(0xf4, eax).unwrap();
            a.hlt().unwrap();
        }),
    );
    // IVT entry 13: offset, segment.
    g.write(
        u64::from(GP) * 4,
        &[HANDLER as u8, (HANDLER >> 8) as u8, 0x00, 0x06],
    );
    microguest::require_kvm();
    microguest::run_from(g, MicroOptions::default(), |l| {
        use vmm::x86::rflags;
        l.sregs.cr0 = vmm::x86::cr0::ET;
        l.sregs.cr4 = 0;
        l.sregs.efer = 0;
        let real = |selector: u16, code: bool| {
            let desc = if code {
                segment::code16(0)
            } else {
                segment::SegmentDescriptor {
                    limit: 0xffff,
                    granularity_4k: false,
                    default_32: false,
                    ..segment::data(0)
                }
            };
            let mut s = desc.to_kvm_segment(selector);
            s.base = u64::from(selector) << 4;
            s
        };
        l.sregs.cs = real(0x600, true);
        l.sregs.ds = real(0x700, false);
        l.sregs.es = real(0x7100, false);
        l.sregs.ss = real(0x800, false);
        l.sregs.fs = real(0, false);
        l.sregs.gs = real(0, false);
        l.sregs.idt.base = 0;
        l.sregs.idt.limit = 0x3ff;
        l.regs.rip = 0;
        l.regs.rsp = 0x1000;
        l.regs.rflags = rflags::FIXED;
    })
    .expect("micro-guest machine")
}

#[test]
fn real_mode_movdir64b_stores_to_es_di() {
    let r = real_mode_run(|a| {
        a.mov(di, 0x40).unwrap();
        a.xor(si, si).unwrap();
        a.movdir64b(di, zmmword_ptr(si)).unwrap();
        a.mov(eax, DONE).unwrap();
        a.out(0xf4, eax).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(r.exit, RunExit::TestExit(DONE));
    let mut back = [0u8; 64];
    r.memory
        .read_slice(&mut back, GuestAddress(0x71040))
        .unwrap();
    assert_eq!(back, command(0x1616));
}

#[test]
fn real_mode_source_past_64_kib_is_gp_without_an_error_code() {
    // SI = 0xffe0: the 64 bytes run past DS's 64 KiB. The #GP frame is
    // FLAGS, CS, IP: SP 0x1000 - 6, no error code.
    let r = real_mode_run(|a| {
        a.mov(di, 0x40).unwrap();
        a.mov(si, 0xffe0).unwrap();
        a.movdir64b(di, zmmword_ptr(si)).unwrap();
        a.mov(eax, DONE).unwrap();
        a.out(0xf4, eax).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(r.exit, RunExit::TestExit(0x0d_0000 | (0x1000 - 6)));
    let mut back = [0u8; 64];
    r.memory
        .read_slice(&mut back, GuestAddress(0x71040))
        .unwrap();
    assert_eq!(back, [0; 64], "nothing stored");
}
