//! The instruction trap layer on KVM: MOVDIR64B, ENQCMD and ENQCMDS from
//! micro-guests at CPL0 and CPL3, reaching the test portal.
//! These tests need /dev/kvm and fail with a message saying so without it.

use bus::StoreKind;
use iced_x86::code_asm::*;
use microguest::demos::command;
use microguest::test_devices::PortalStore;
use microguest::{
    self, enter_user, exit_with, MicroGuest, MicroOptions, MicroRun, DATA_START, TEST_MMIO_START,
    TEST_PORTAL_START, USER_CS, USER_STACK_TOP,
};
use vmm::vm::RunExit;

use pasid::MSR_IA32_PASID as IA32_PASID;
/// The 64-byte command the guests submit.
const SRC: u64 = DATA_START + 0x1000;
/// Vector numbers.
const UD: u8 = 6;
const GP: u8 = 13;
const PF: u8 = 14;

fn run(guest: MicroGuest, portal_retry: bool) -> MicroRun {
    microguest::require_kvm();
    microguest::run(
        guest,
        MicroOptions {
            portal_retry,
            ..Default::default()
        },
    )
    .expect("micro-guest machine")
}

fn stores(run: &MicroRun) -> Vec<PortalStore> {
    run.portal.stores.lock().unwrap().clone()
}

/// A #UD handler that reports "unexpected #UD" (it must begin with endbr64).
fn ud_reports(g: &mut MicroGuest, value: u32) {
    let mut l = g.asm.create_label();
    g.asm.set_label(&mut l).unwrap();
    g.asm.endbr64().unwrap();
    exit_with(&mut g.asm, value).unwrap();
    g.handler(UD, l);
}

/// User ENQCMD with IA32_PASID clear: #GP, the guest's handler loads the MSR
/// and returns, the retried ENQCMD reaches the portal with the MSR's PASID.
fn enqcmd_after_gp(portal_retry: bool) -> (RunExit, Vec<PortalStore>) {
    let r = run(microguest::demos::enqcmd_after_gp().unwrap(), portal_retry);
    let s = stores(&r);
    (r.exit, s)
}

#[test]
fn user_enqcmd_takes_gp_then_carries_the_msr_pasid_accepted() {
    let (exit, stores) = enqcmd_after_gp(false);
    assert_eq!(
        exit,
        RunExit::TestExit(0x610),
        "one #GP, then ZF=0 (accepted)"
    );
    assert_eq!(stores.len(), 1);
    assert_eq!(stores[0].kind, StoreKind::Enqcmd);
    assert_eq!(stores[0].offset, 0);
    assert_eq!(
        stores[0].data,
        command(0x1234),
        "PASID from the MSR, privilege and bits 30:20 clear"
    );
}

#[test]
fn user_enqcmd_retry_sets_zf() {
    let (exit, stores) = enqcmd_after_gp(true);
    assert_eq!(exit, RunExit::TestExit(0x611), "one #GP, then ZF=1 (retry)");
    assert_eq!(stores.len(), 1);
    assert_eq!(stores[0].data[..4], 0x1234u32.to_le_bytes());
}

fn kernel_store(kind: StoreKind, portal_retry: bool) -> (RunExit, Vec<PortalStore>) {
    kernel_store_from(kind, SRC, portal_retry, |g| {
        g.write(SRC, &command(0x8000_0042))
    })
}

#[test]
fn kernel_enqcmds_keeps_the_source_pasid_and_privilege() {
    for (retry, zf) in [(false, 0), (true, 1)] {
        let (exit, stores) = kernel_store(StoreKind::Enqcmds, retry);
        assert_eq!(exit, RunExit::TestExit(0x700 | zf));
        assert_eq!(stores.len(), 1);
        assert_eq!(stores[0].kind, StoreKind::Enqcmds);
        assert_eq!(stores[0].offset, 0x40);
        assert_eq!(stores[0].data, command(0x8000_0042));
    }
}

#[test]
fn kernel_movdir64b_reaches_the_portal() {
    let (exit, stores) = kernel_store(StoreKind::Movdir64b, true);
    assert_eq!(
        exit,
        RunExit::TestExit(0x700),
        "MOVDIR64B leaves ZF alone (clear here)"
    );
    assert_eq!(
        stores,
        vec![PortalStore {
            kind: StoreKind::Movdir64b,
            offset: 0x40,
            data: command(0x8000_0042)
        }]
    );
}

#[test]
fn kernel_enqcmd_with_msr_clear_takes_gp() {
    let mut g = MicroGuest::new();
    let mut gp = g.asm.create_label();
    g.write(SRC, &command(0));
    g.asm.mov(rdi, TEST_PORTAL_START).unwrap();
    g.asm.mov(rsi, SRC).unwrap();
    g.asm.enqcmd(rdi, zmmword_ptr(rsi)).unwrap();
    exit_with(&mut g.asm, 1).unwrap();
    g.asm.set_label(&mut gp).unwrap();
    g.asm.pop(rax).unwrap(); // error code
    g.asm.or(eax, 0xd00).unwrap();
    g.asm.out(0xf4, eax).unwrap();
    g.asm.hlt().unwrap();
    g.handler(GP, gp);
    let r = run(g, false);
    assert_eq!(r.exit, RunExit::TestExit(0xd00), "#GP(0)");
    assert!(stores(&r).is_empty());
}

#[test]
fn user_movdir64b_reaches_the_portal() {
    let mut g = MicroGuest::new();
    g.write(SRC, &command(7));
    let mut user = g.asm.create_label();
    enter_user(&mut g.asm, user, USER_STACK_TOP).unwrap();
    g.asm.set_label(&mut user).unwrap();
    g.asm.mov(rdi, TEST_PORTAL_START + 0xfc0).unwrap();
    g.asm.mov(rsi, SRC).unwrap();
    g.asm.movdir64b(rdi, zmmword_ptr(rsi)).unwrap();
    exit_with(&mut g.asm, 0x64b).unwrap();
    ud_reports(&mut g, 0xbad6);
    let r = run(g, false);
    assert_eq!(r.exit, RunExit::TestExit(0x64b));
    assert_eq!(
        stores(&r),
        vec![PortalStore {
            kind: StoreKind::Movdir64b,
            offset: 0xfc0,
            data: command(7)
        }]
    );
}

#[test]
fn user_ud2_reaches_the_guests_own_handler() {
    let mut g = MicroGuest::new();
    let mut user = g.asm.create_label();
    let mut ud = g.asm.create_label();
    enter_user(&mut g.asm, user, USER_STACK_TOP).unwrap();
    g.asm.set_label(&mut user).unwrap();
    g.asm.ud2().unwrap();
    g.asm.set_label(&mut ud).unwrap();
    g.asm.endbr64().unwrap();
    g.asm.mov(rax, qword_ptr(rsp + 8)).unwrap(); // frame CS
    g.asm.shl(eax, 8).unwrap();
    g.asm.or(eax, 0x06).unwrap();
    g.asm.out(0xf4, eax).unwrap();
    g.asm.hlt().unwrap();
    g.handler(UD, ud);
    assert_eq!(
        run(g, false).exit,
        RunExit::TestExit((u32::from(USER_CS) << 8) | 6)
    );
}

#[test]
fn page_fault_on_the_enqcmd_source_is_delivered_to_the_guest() {
    let mut g = MicroGuest::new();
    g.map_page(SRC, 0).unwrap(); // not present
    let mut user = g.asm.create_label();
    let mut pf = g.asm.create_label();
    g.asm.mov(ecx, IA32_PASID).unwrap();
    g.asm.mov(eax, 0x8000_0001u32).unwrap();
    g.asm.xor(edx, edx).unwrap();
    g.asm.wrmsr().unwrap();
    enter_user(&mut g.asm, user, USER_STACK_TOP).unwrap();
    g.asm.set_label(&mut user).unwrap();
    g.asm.mov(rdi, TEST_PORTAL_START).unwrap();
    g.asm.mov(rsi, SRC + 8).unwrap();
    g.asm.enqcmd(rdi, zmmword_ptr(rsi - 8)).unwrap();
    exit_with(&mut g.asm, 1).unwrap();
    // #PF: report the error code and whether CR2 is the source address.
    g.asm.set_label(&mut pf).unwrap();
    g.asm.pop(rbx).unwrap();
    g.asm.mov(rax, cr2).unwrap();
    g.asm.mov(rcx, SRC).unwrap();
    g.asm.cmp(rax, rcx).unwrap();
    g.asm.sete(al).unwrap();
    g.asm.movzx(eax, al).unwrap();
    g.asm.shl(eax, 8).unwrap();
    g.asm.or(eax, ebx).unwrap();
    g.asm.or(eax, 0xe000).unwrap();
    g.asm.out(0xf4, eax).unwrap();
    g.asm.hlt().unwrap();
    g.handler(PF, pf);
    ud_reports(&mut g, 0xbad6);
    let r = run(g, false);
    assert_eq!(
        r.exit,
        RunExit::TestExit(0xe104),
        "#PF error code 4 (user read, not present), CR2 = source"
    );
    assert!(stores(&r).is_empty());
}

/// A CPL0 `kind` store to the portal (offset 0x40) whose 64-byte source is
/// at guest-physical `src` (identity-mapped), after `prepare` ran; the guest
/// exits with 0x700 | ZF.
fn kernel_store_from(
    kind: StoreKind,
    src: u64,
    portal_retry: bool,
    prepare: impl FnOnce(&mut MicroGuest),
) -> (RunExit, Vec<PortalStore>) {
    let mut g = MicroGuest::new();
    prepare(&mut g);
    g.asm.mov(rdi, TEST_PORTAL_START + 0x40).unwrap();
    g.asm.mov(rsi, src).unwrap();
    match kind {
        StoreKind::Enqcmds => g.asm.enqcmds(rdi, zmmword_ptr(rsi)).unwrap(),
        StoreKind::Enqcmd => g.asm.enqcmd(rdi, zmmword_ptr(rsi)).unwrap(),
        StoreKind::Movdir64b => g.asm.movdir64b(rdi, zmmword_ptr(rsi)).unwrap(),
    }
    g.asm.setz(al).unwrap();
    g.asm.movzx(eax, al).unwrap();
    g.asm.or(eax, 0x700).unwrap();
    g.asm.out(0xf4, eax).unwrap();
    g.asm.hlt().unwrap();
    let r = run(g, portal_retry);
    let s = stores(&r);
    (r.exit, s)
}

#[test]
fn kernel_movdir64b_from_device_registers_reads_the_device() {
    // The scratch MMIO device returns what was written to it.
    let (exit, stores) =
        kernel_store_from(StoreKind::Movdir64b, TEST_MMIO_START + 0x100, false, |g| {
            g.asm.mov(rbx, TEST_MMIO_START + 0x100).unwrap();
            for i in 0..8u64 {
                g.asm.mov(rax, 0x1111_1111_1111_1111u64 * (i + 1)).unwrap();
                g.asm.mov(qword_ptr(rbx + 8 * i as i32), rax).unwrap();
            }
        });
    assert_eq!(exit, RunExit::TestExit(0x700), "the VM goes on");
    let expected: Vec<u8> = (1..=8u64)
        .flat_map(|i| (0x1111_1111_1111_1111u64 * i).to_le_bytes())
        .collect();
    assert_eq!(stores.len(), 1);
    assert_eq!(stores[0].data.to_vec(), expected);
}

#[test]
fn kernel_movdir64b_from_the_portal_itself_reads_the_portal() {
    // The test portal's registers read as the number of stores so far (0).
    let (exit, stores) = kernel_store_from(StoreKind::Movdir64b, TEST_PORTAL_START, false, |_| {});
    assert_eq!(exit, RunExit::TestExit(0x700));
    assert_eq!(stores.len(), 1);
    assert_eq!(stores[0].data, [0; 64]);
}

#[test]
fn kernel_enqcmds_from_unassigned_space_reads_all_ones() {
    // Nothing answers there: all ones, of which ENQCMDS keeps the PASID
    // and the privilege bit of dword 0.
    let (exit, stores) = kernel_store_from(
        StoreKind::Enqcmds,
        TEST_PORTAL_START + 0x8_0000,
        false,
        |_| {},
    );
    assert_eq!(exit, RunExit::TestExit(0x700), "accepted: ZF clear");
    assert_eq!(stores.len(), 1);
    assert_eq!(stores[0].data[..4], 0x800f_ffffu32.to_le_bytes());
    assert_eq!(stores[0].data[4..], [0xff; 60]);
}

#[test]
fn kernel_movdir64b_from_across_the_end_of_ram_reads_ones_past_it() {
    let end = microguest::MICRO_MEMORY;
    let (exit, stores) = kernel_store_from(StoreKind::Movdir64b, end - 32, false, |g| {
        g.write(end - 32, &[0x5a; 32]);
    });
    assert_eq!(exit, RunExit::TestExit(0x700));
    assert_eq!(stores.len(), 1);
    assert_eq!(stores[0].data[..32], [0x5a; 32]);
    assert_eq!(stores[0].data[32..], [0xff; 32]);
}

#[test]
fn user_movdir64b_from_device_registers_reads_the_device() {
    // At CPL3 the store traps (its destination is MMIO); its source is the
    // scratch device, whose first register reads "TEST".
    let mut g = MicroGuest::new();
    let mut user = g.asm.create_label();
    enter_user(&mut g.asm, user, USER_STACK_TOP).unwrap();
    g.asm.set_label(&mut user).unwrap();
    g.asm.mov(rdi, TEST_PORTAL_START + 0xfc0).unwrap();
    g.asm.mov(rsi, TEST_MMIO_START).unwrap();
    g.asm.movdir64b(rdi, zmmword_ptr(rsi)).unwrap();
    exit_with(&mut g.asm, 0x64b).unwrap();
    ud_reports(&mut g, 0xbad6);
    let r = run(g, false);
    assert_eq!(r.exit, RunExit::TestExit(0x64b));
    let mut expected = [0u8; 64];
    expected[..4].copy_from_slice(&microguest::test_devices::TEST_MMIO_MAGIC.to_le_bytes());
    assert_eq!(stores(&r).len(), 1);
    assert_eq!(stores(&r)[0].data, expected);
}

#[test]
fn user_enqcmd_from_the_portal_itself_completes_instead_of_ud() {
    // IA32_PASID loaded at CPL0; the user's ENQCMD names the portal page as
    // its source. It completes with the device's answer (ZF=1: retry); the
    // guest's #UD handler never runs.
    let mut g = MicroGuest::new();
    let mut user = g.asm.create_label();
    g.asm.mov(ecx, IA32_PASID).unwrap();
    g.asm.mov(eax, 0x8000_1234u32).unwrap();
    g.asm.xor(edx, edx).unwrap();
    g.asm.wrmsr().unwrap();
    enter_user(&mut g.asm, user, USER_STACK_TOP).unwrap();
    g.asm.set_label(&mut user).unwrap();
    g.asm.mov(rdi, TEST_PORTAL_START).unwrap();
    g.asm.mov(rsi, TEST_PORTAL_START + 0x80).unwrap();
    g.asm.enqcmd(rdi, zmmword_ptr(rsi)).unwrap();
    g.asm.setz(al).unwrap();
    g.asm.movzx(eax, al).unwrap();
    g.asm.or(eax, 0x600).unwrap();
    g.asm.out(0xf4, eax).unwrap();
    g.asm.hlt().unwrap();
    ud_reports(&mut g, 0xbad6);
    let r = run(g, true);
    assert_eq!(r.exit, RunExit::TestExit(0x601));
    let s = stores(&r);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].kind, StoreKind::Enqcmd);
    assert_eq!(s[0].data[..4], 0x1234u32.to_le_bytes());
    assert_eq!(s[0].data[4..], [0; 60], "the portal reads 0 stores so far");
}

/// #SS.
const SS: u8 = 12;

/// A CPL0 micro-guest with the page at `missing` (if any) not present that
/// runs `code` (which sets R12 to the CR2 it expects; otherwise R12 is 1,
/// which no CR2 here equals) with handlers for #GP, #SS and #PF that exit
/// with `vector << 24 | (CR2 == R12) << 20 | error code (16 bits)`, and
/// exits with 0x600 if `code` falls through.
fn kernel_fault(
    missing: Option<u64>,
    code: impl FnOnce(&mut CodeAssembler),
) -> (RunExit, Vec<PortalStore>) {
    let mut g = MicroGuest::new();
    if let Some(page) = missing {
        g.map_page(page, 0).unwrap();
    }
    g.asm.mov(r12, 1u64).unwrap();
    code(&mut g.asm);
    exit_with(&mut g.asm, 0x600).unwrap();
    for vector in [GP, SS, PF] {
        let mut l = g.asm.create_label();
        g.asm.set_label(&mut l).unwrap();
        g.asm.pop(rbx).unwrap(); // the error code
        g.asm.and(ebx, 0xffff).unwrap();
        g.asm.mov(rax, cr2).unwrap();
        g.asm.cmp(rax, r12).unwrap();
        g.asm.sete(al).unwrap();
        g.asm.movzx(eax, al).unwrap();
        g.asm.shl(eax, 20).unwrap();
        g.asm.or(eax, ebx).unwrap();
        g.asm.or(eax, u32::from(vector) << 24).unwrap();
        g.asm.out(0xf4, eax).unwrap();
        g.asm.hlt().unwrap();
        g.handler(vector, l);
    }
    let r = run(g, false);
    let s = stores(&r);
    (r.exit, s)
}

fn fault(vector: u8, cr2_matches: bool, error_code: u32) -> RunExit {
    RunExit::TestExit(u32::from(vector) << 24 | u32::from(cr2_matches) << 20 | error_code)
}

#[test]
fn non_canonical_source_is_gp0() {
    let (exit, stores) = kernel_fault(None, |a| {
        a.mov(rdi, TEST_PORTAL_START).unwrap();
        a.mov(rsi, 0x8000_0000_0000_0000u64).unwrap();
        a.movdir64b(rdi, zmmword_ptr(rsi)).unwrap();
    });
    assert_eq!(exit, fault(GP, false, 0));
    assert!(stores.is_empty());
}

#[test]
fn non_canonical_stack_source_is_ss0() {
    // RBP as the base: the reference is SS-based.
    let (exit, stores) = kernel_fault(None, |a| {
        a.mov(rdi, TEST_PORTAL_START).unwrap();
        a.mov(rbp, 0x0000_8000_0000_0000u64).unwrap();
        a.enqcmds(rdi, zmmword_ptr(rbp)).unwrap();
    });
    assert_eq!(exit, fault(SS, false, 0));
    assert!(stores.is_empty());
}

#[test]
fn source_running_into_a_missing_page_is_pf_at_that_page() {
    let page = DATA_START + 0x4000;
    let (exit, stores) = kernel_fault(Some(page), |a| {
        a.mov(r12, page).unwrap();
        a.mov(rdi, TEST_PORTAL_START).unwrap();
        a.mov(rsi, page - 0x20).unwrap();
        a.movdir64b(rdi, zmmword_ptr(rsi)).unwrap();
    });
    // Supervisor read of a not-present page: error code 0, CR2 = the
    // first byte on the missing page.
    assert_eq!(exit, fault(PF, true, 0));
    assert!(stores.is_empty());
}

#[test]
fn misaligned_destination_is_gp0() {
    let (exit, stores) = kernel_fault(None, |a| {
        a.mov(rdi, TEST_PORTAL_START + 8).unwrap();
        a.mov(rsi, SRC).unwrap();
        a.movdir64b(rdi, zmmword_ptr(rsi)).unwrap();
    });
    assert_eq!(exit, fault(GP, false, 0));
    assert!(stores.is_empty());
}

#[test]
fn non_canonical_destination_is_gp0() {
    let (exit, stores) = kernel_fault(None, |a| {
        a.mov(rdi, 0x1234_0000_0000_0040u64).unwrap();
        a.mov(rsi, SRC).unwrap();
        a.enqcmds(rdi, zmmword_ptr(rsi)).unwrap();
    });
    assert_eq!(exit, fault(GP, false, 0));
    assert!(stores.is_empty());
}

#[test]
fn destination_on_a_missing_page_is_pf_write_with_cr2() {
    let page = DATA_START + 0x4000;
    let (exit, stores) = kernel_fault(Some(page), |a| {
        a.mov(r12, page + 0x40).unwrap();
        a.mov(rdi, page + 0x40).unwrap();
        a.mov(rsi, SRC).unwrap();
        a.movdir64b(rdi, zmmword_ptr(rsi)).unwrap();
    });
    // Supervisor write, not present: error code 2; CR2 = the destination.
    assert_eq!(exit, fault(PF, true, 2));
    assert!(stores.is_empty());
}

#[test]
fn fs_override_source_adds_the_fs_base() {
    let (exit, stores) = kernel_fault(None, |a| {
        // IA32_FS_BASE = SRC - 0x100.
        a.mov(ecx, 0xc000_0100u32).unwrap();
        a.mov(eax, (SRC - 0x100) as u32).unwrap();
        a.mov(edx, ((SRC - 0x100) >> 32) as u32).unwrap();
        a.wrmsr().unwrap();
        a.mov(rdi, TEST_PORTAL_START).unwrap();
        a.mov(rsi, 0x100u64).unwrap();
        a.movdir64b(rdi, zmmword_ptr(rsi).fs()).unwrap();
    });
    assert_eq!(exit, RunExit::TestExit(0x600));
    assert_eq!(stores.len(), 1);
    assert_eq!(stores[0].data, [0; 64], "SRC holds zeros in this guest");
}

#[test]
fn address_size_prefix_truncates_both_addresses() {
    // movdir64b edi, [esi]: the upper halves of RDI and RSI are ignored.
    let (exit, stores) = kernel_fault(None, |a| {
        a.mov(rdi, 0xdead_beef_0000_0000u64 | TEST_PORTAL_START | 0x80)
            .unwrap();
        a.mov(rsi, 0x1234_5678_0000_0000u64 | TEST_MMIO_START)
            .unwrap();
        a.movdir64b(edi, zmmword_ptr(esi)).unwrap();
    });
    assert_eq!(exit, RunExit::TestExit(0x600));
    assert_eq!(stores.len(), 1);
    assert_eq!(stores[0].offset, 0x80);
    assert_eq!(
        stores[0].data[..4],
        microguest::test_devices::TEST_MMIO_MAGIC.to_le_bytes()
    );
}

/// IA32_GS_BASE.
const GS_BASE_MSR: u32 = 0xc000_0101;

#[test]
fn gs_override_source_adds_the_gs_base() {
    let src = DATA_START + 0x3000;
    let mut g = MicroGuest::new();
    g.write(src, &command(0x6a));
    g.asm.mov(ecx, GS_BASE_MSR).unwrap();
    g.asm.mov(eax, (src - 0x240) as u32).unwrap();
    g.asm.mov(edx, ((src - 0x240) >> 32) as u32).unwrap();
    g.asm.wrmsr().unwrap();
    g.asm.mov(rdi, TEST_PORTAL_START + 0x40).unwrap();
    g.asm.mov(rsi, 0x240u64).unwrap();
    g.asm.movdir64b(rdi, zmmword_ptr(rsi).gs()).unwrap();
    exit_with(&mut g.asm, 0x600).unwrap();
    let r = run(g, false);
    assert_eq!(r.exit, RunExit::TestExit(0x600));
    let s = stores(&r);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].offset, 0x40);
    assert_eq!(s[0].data, command(0x6a));
}

/// A CPL0 MOVDIR64B of [`command`] from `SRC` to the portal through a
/// `seg:` override of the source: in 64-bit mode CS, DS, ES and SS have
/// base 0, so every one reads `SRC` itself.
fn store_through_override(seg: fn(AsmMemoryOperand) -> AsmMemoryOperand) {
    let mut g = MicroGuest::new();
    g.write(SRC, &command(0x5e));
    g.asm.mov(rdi, TEST_PORTAL_START + 0x80).unwrap();
    g.asm.mov(rsi, SRC).unwrap();
    g.asm.movdir64b(rdi, seg(zmmword_ptr(rsi))).unwrap();
    exit_with(&mut g.asm, 0x600).unwrap();
    let r = run(g, false);
    assert_eq!(r.exit, RunExit::TestExit(0x600));
    let s = stores(&r);
    assert_eq!(s.len(), 1);
    assert_eq!((s[0].offset, s[0].data), (0x80, command(0x5e)));
}

#[test]
fn cs_override_source_has_base_0() {
    store_through_override(|m| m.cs());
}

#[test]
fn ds_override_source_has_base_0() {
    store_through_override(|m| m.ds());
}

#[test]
fn es_override_source_has_base_0() {
    store_through_override(|m| m.es());
}

#[test]
fn ss_override_source_has_base_0() {
    store_through_override(|m| m.ss());
}

#[test]
fn ss_override_non_canonical_source_is_ss0() {
    // RSI as the base, but SS named: #SS, not #GP.
    let (exit, stores) = kernel_fault(None, |a| {
        a.mov(rdi, TEST_PORTAL_START).unwrap();
        a.mov(rsi, 0x0000_8000_0000_0000u64).unwrap();
        a.movdir64b(rdi, zmmword_ptr(rsi).ss()).unwrap();
    });
    assert_eq!(exit, fault(SS, false, 0));
    assert!(stores.is_empty());
}

#[test]
fn ds_override_of_an_rbp_source_makes_a_non_canonical_one_gp0() {
    // RBP as the base, but DS named: #GP, not #SS.
    let (exit, stores) = kernel_fault(None, |a| {
        a.mov(rdi, TEST_PORTAL_START).unwrap();
        a.mov(rbp, 0xffff_7fff_ffff_ff00u64).unwrap();
        a.enqcmds(rdi, zmmword_ptr(rbp).ds()).unwrap();
    });
    assert_eq!(exit, fault(GP, false, 0));
    assert!(stores.is_empty());
}

/// A micro-guest that loads IA32_PASID (valid, PASID 0x77), runs `prepare`
/// at CPL0, enters CPL3 and runs `code` there (which sets R12 to the CR2 it
/// expects; otherwise R12 is 1), with the pages in `missing` given `flags`.
/// Handlers for #GP, #SS and #PF exit with `vector << 24 | (CR2 == R12)
/// << 20 | (CPL of the faulting code) << 16 | error code (16 bits)`; #UD
/// exits with 0xbad6 and falling through with 0x3600.
fn user_fault(
    pages: &[(u64, u64)],
    prepare: impl FnOnce(&mut CodeAssembler),
    code: impl FnOnce(&mut CodeAssembler),
) -> (RunExit, Vec<PortalStore>, vm_memory::GuestMemoryMmap) {
    let mut g = MicroGuest::new();
    g.write(SRC, &command(0x33));
    for &(page, flags) in pages {
        g.map_page(page, flags).unwrap();
    }
    g.asm.mov(ecx, IA32_PASID).unwrap();
    g.asm.mov(eax, 0x8000_0077u32).unwrap();
    g.asm.xor(edx, edx).unwrap();
    g.asm.wrmsr().unwrap();
    g.asm.mov(r12, 1u64).unwrap();
    prepare(&mut g.asm);
    let mut user = g.asm.create_label();
    enter_user(&mut g.asm, user, USER_STACK_TOP).unwrap();
    g.asm.set_label(&mut user).unwrap();
    code(&mut g.asm);
    exit_with(&mut g.asm, 0x3600).unwrap();
    for vector in [GP, SS, PF] {
        let mut l = g.asm.create_label();
        g.asm.set_label(&mut l).unwrap();
        g.asm.pop(rbx).unwrap(); // the error code
        g.asm.and(ebx, 0xffff).unwrap();
        g.asm.mov(rcx, qword_ptr(rsp + 8)).unwrap(); // frame CS
        g.asm.and(ecx, 3).unwrap();
        g.asm.shl(ecx, 16).unwrap();
        g.asm.or(ebx, ecx).unwrap();
        g.asm.mov(rax, cr2).unwrap();
        g.asm.cmp(rax, r12).unwrap();
        g.asm.sete(al).unwrap();
        g.asm.movzx(eax, al).unwrap();
        g.asm.shl(eax, 20).unwrap();
        g.asm.or(eax, ebx).unwrap();
        g.asm.or(eax, u32::from(vector) << 24).unwrap();
        g.asm.out(0xf4, eax).unwrap();
        g.asm.hlt().unwrap();
        g.handler(vector, l);
    }
    ud_reports(&mut g, 0xbad6);
    let r = run(g, false);
    let s = stores(&r);
    (r.exit, s, r.memory)
}

/// [`fault`] taken at CPL3.
fn user_fault_exit(vector: u8, cr2_matches: bool, error_code: u32) -> RunExit {
    RunExit::TestExit(u32::from(vector) << 24 | u32::from(cr2_matches) << 20 | 3 << 16 | error_code)
}

/// [`user_fault`] with no page changes and nothing to prepare.
fn user_store(
    code: impl FnOnce(&mut CodeAssembler),
) -> (RunExit, Vec<PortalStore>, vm_memory::GuestMemoryMmap) {
    user_fault(&[], |_| {}, code)
}

/// Asserts that `code` at CPL3 raises `vector` with error code 0 and
/// stores nothing.
fn assert_user_exception(vector: u8, code: impl FnOnce(&mut CodeAssembler)) {
    let (exit, stores, _) = user_store(code);
    assert_eq!(exit, user_fault_exit(vector, false, 0));
    assert!(stores.is_empty());
}

/// #PF error code bits.
const PF_PRESENT: u32 = 1;
const PF_WRITE: u32 = 2;
const PF_USER: u32 = 4;

#[test]
fn user_enqcmds_is_gp0() {
    assert_user_exception(GP, |a| {
        a.mov(rdi, TEST_PORTAL_START).unwrap();
        a.mov(rsi, SRC).unwrap();
        a.enqcmds(rdi, zmmword_ptr(rsi)).unwrap();
    });
}

#[test]
fn user_non_canonical_source_is_gp0() {
    assert_user_exception(GP, |a| {
        a.mov(rdi, TEST_PORTAL_START).unwrap();
        a.mov(rsi, 0xff00_0000_0000_0000u64).unwrap();
        a.enqcmd(rdi, zmmword_ptr(rsi)).unwrap();
    });
}

#[test]
fn user_non_canonical_stack_source_is_ss0() {
    // RBP - 0x20 is canonical, but the 64 bytes run past the top of the
    // lower half.
    assert_user_exception(SS, |a| {
        a.mov(rdi, TEST_PORTAL_START).unwrap();
        a.mov(rbp, 0x0000_8000_0000_0000u64).unwrap();
        a.movdir64b(rdi, zmmword_ptr(rbp - 0x20)).unwrap();
    });
}

#[test]
fn user_misaligned_destination_is_gp0() {
    assert_user_exception(GP, |a| {
        a.mov(rdi, TEST_PORTAL_START + 0x20).unwrap();
        a.mov(rsi, SRC).unwrap();
        a.enqcmd(rdi, zmmword_ptr(rsi)).unwrap();
    });
}

#[test]
fn user_non_canonical_destination_is_gp0() {
    assert_user_exception(GP, |a| {
        a.mov(rdi, 0x8000_0000_0000_0000u64).unwrap();
        a.mov(rsi, SRC).unwrap();
        a.movdir64b(rdi, zmmword_ptr(rsi)).unwrap();
    });
}

#[test]
fn user_source_running_into_a_supervisor_page_is_pf_protection_at_that_page() {
    let page = DATA_START + 0x5000;
    let (exit, stores, _) = user_fault(
        &[(page, microguest::PTE_P | microguest::PTE_W)],
        |a| {
            a.mov(r12, page).unwrap();
        },
        |a| {
            a.mov(rdi, TEST_PORTAL_START).unwrap();
            a.mov(rsi, page - 0x10).unwrap();
            a.movdir64b(rdi, zmmword_ptr(rsi)).unwrap();
        },
    );
    // A user read of a present supervisor page: P | U, CR2 = its first byte.
    assert_eq!(exit, user_fault_exit(PF, true, PF_PRESENT | PF_USER));
    assert!(stores.is_empty());
}

#[test]
fn user_destination_on_a_missing_page_is_pf_user_write_with_cr2() {
    let page = DATA_START + 0x5000;
    let (exit, stores, _) = user_fault(
        &[(page, 0)],
        |a| {
            a.mov(r12, page + 0xc0).unwrap();
        },
        |a| {
            a.mov(rdi, page + 0xc0).unwrap();
            a.mov(rsi, SRC).unwrap();
            a.movdir64b(rdi, zmmword_ptr(rsi)).unwrap();
        },
    );
    assert_eq!(exit, user_fault_exit(PF, true, PF_WRITE | PF_USER));
    assert!(stores.is_empty());
}

#[test]
fn user_destination_on_a_read_only_page_is_pf_protection_write() {
    let page = DATA_START + 0x5000;
    let (exit, stores, memory) = user_fault(
        &[(page, microguest::PTE_P | microguest::PTE_U)],
        |a| {
            a.mov(r12, page).unwrap();
        },
        |a| {
            a.mov(rdi, page).unwrap();
            a.mov(rsi, SRC).unwrap();
            a.enqcmd(rdi, zmmword_ptr(rsi)).unwrap();
        },
    );
    assert_eq!(
        exit,
        user_fault_exit(PF, true, PF_PRESENT | PF_WRITE | PF_USER)
    );
    assert!(stores.is_empty());
    let mut back = [0u8; 64];
    vm_memory::Bytes::read_slice(&memory, &mut back, vm_memory::GuestAddress(page)).unwrap();
    assert_eq!(back, [0; 64], "nothing written");
}

#[test]
fn user_movdir64b_to_ram_stores_the_64_bytes() {
    let dest = DATA_START + 0x6040;
    let (exit, stores, memory) = user_store(|a| {
        a.mov(rdi, dest).unwrap();
        a.mov(rsi, SRC).unwrap();
        a.movdir64b(rdi, zmmword_ptr(rsi)).unwrap();
    });
    assert_eq!(exit, RunExit::TestExit(0x3600));
    assert!(stores.is_empty());
    let mut back = [0u8; 64];
    vm_memory::Bytes::read_slice(&memory, &mut back, vm_memory::GuestAddress(dest)).unwrap();
    assert_eq!(back, command(0x33));
}

#[test]
fn user_gs_override_source_adds_the_gs_base() {
    let (exit, stores, _) = user_fault(
        &[],
        |a| {
            a.mov(ecx, GS_BASE_MSR).unwrap();
            a.mov(eax, (SRC - 0x1000) as u32).unwrap();
            a.mov(edx, ((SRC - 0x1000) >> 32) as u32).unwrap();
            a.wrmsr().unwrap();
        },
        |a| {
            a.mov(rdi, TEST_PORTAL_START + 0x100).unwrap();
            a.mov(rsi, 0x1000u64).unwrap();
            a.enqcmd(rdi, zmmword_ptr(rsi).gs()).unwrap();
        },
    );
    assert_eq!(exit, RunExit::TestExit(0x3600));
    assert_eq!(stores.len(), 1);
    assert_eq!(stores[0].kind, StoreKind::Enqcmd);
    assert_eq!(stores[0].offset, 0x100);
    // ENQCMD puts IA32_PASID's PASID in dword 0, the rest as read.
    assert_eq!(stores[0].data, command(0x77));
}

#[test]
fn user_address_size_prefix_truncates_both_addresses() {
    let (exit, stores, _) = user_store(|a| {
        a.mov(rdi, 0xffff_ffff_0000_0000u64 | TEST_PORTAL_START | 0x140)
            .unwrap();
        a.mov(rsi, 0x0000_7fff_0000_0000u64 | SRC).unwrap();
        a.movdir64b(edi, zmmword_ptr(esi)).unwrap();
    });
    assert_eq!(exit, RunExit::TestExit(0x3600));
    assert_eq!(stores.len(), 1);
    assert_eq!((stores[0].offset, stores[0].data), (0x140, command(0x33)));
}
