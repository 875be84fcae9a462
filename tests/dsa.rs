//! The vDSA in the real machine, driven by micro-guests through ECAM and
//! BAR0 MMIO as idxd would. These tests need /dev/kvm.

use iced_x86::code_asm::*;
use microguest::driver::dsa::{wait_for_completion, DsaDriver, WqSetup};
use microguest::driver::ecam::PciFunction;
use microguest::{exit_with_eax, MicroGuest, MicroOptions, MicroRun, DATA_START};
use vdsa::completion::Status;
use vdsa::descriptor::{flags, Descriptor, Opcode};
use vdsa::DsaConfig;
use vm_memory::{Bytes, GuestAddress};
use vmm::sva::{dsa_placements, AccelConfig, DsaPlacement};
use vmm::vm::RunExit;

const DESC: u64 = DATA_START + 0x1000;
const COMPLETION: u64 = DATA_START + 0x2000;
const SRC: u64 = DATA_START + 0x10_000;
const DST: u64 = DATA_START + 0x20_000;
const LEN: usize = 0x3000;

fn run(guest: MicroGuest, accel: AccelConfig) -> MicroRun {
    microguest::require_kvm();
    microguest::run(
        guest,
        MicroOptions {
            accel,
            ..Default::default()
        },
    )
    .expect("micro-guest machine")
}

/// Emits what idxd does with the vDSA the VMM placed at `dsa`: PASID
/// enable (if `pasid`), memory decode and bus master, then the device and
/// `wq` brought up through BAR0 (the harness's one DSA driver).
fn bring_up(g: &mut MicroGuest, dsa: &DsaPlacement, wq: WqSetup, pasid: bool) {
    let function = PciFunction::at(dsa.bdf);
    if pasid {
        function.enable_pasid(&mut g.asm, false).unwrap();
    }
    function.enable_memory_and_bus_master(&mut g.asm).unwrap();
    let driver = DsaDriver {
        bar0: dsa.bar0,
        bar2: dsa.bar2,
    };
    driver.bring_up(&mut g.asm, &[wq]).unwrap();
}

/// Emits a wait for the completion record at `COMPLETION`, then ends the
/// run with its status.
fn exit_with_completion_status(asm: &mut CodeAssembler) {
    wait_for_completion(asm, COMPLETION).unwrap();
    exit_with_eax(asm).unwrap();
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 256) as u8).collect()
}

/// A guest with a MEMMOVE descriptor of [`pattern`] at `DESC` (`SRC` to
/// `DST`, completion record at `COMPLETION`) and its source filled.
fn memmove_guest() -> MicroGuest {
    let mut g = MicroGuest::new();
    let mut desc = Descriptor::new(Opcode::Memmove, flags::CRAV | flags::RCR);
    desc.set_completion_addr(COMPLETION)
        .set_src(SRC)
        .set_dst(DST)
        .set_xfer_size(LEN as u32);
    g.write(DESC, &desc.0);
    g.write(SRC, &pattern(LEN));
    g
}

#[test]
fn kernel_movdir64b_memmove_through_a_dedicated_wq() {
    let accel = AccelConfig {
        iommu: false,
        dsa: vec![DsaConfig::default()],
    };
    let dsa = dsa_placements(&accel.dsa)[0];
    let mut g = memmove_guest();
    bring_up(&mut g, &dsa, WqSetup::kernel_dedicated(0, 0), false);
    // MOVDIR64B the descriptor to WQ 0's unlimited portal.
    g.asm.mov(rdi, dsa.bar2).unwrap();
    g.asm.mov(rsi, DESC).unwrap();
    g.asm.movdir64b(rdi, ptr(rsi)).unwrap();
    exit_with_completion_status(&mut g.asm);

    let r = run(g, accel);
    assert_eq!(r.dsa, vec![dsa], "the vDSA is where the guest looked");
    assert_eq!(r.exit, RunExit::TestExit(Status::Success as u32));
    let mut copied = vec![0u8; LEN];
    r.memory.read_slice(&mut copied, GuestAddress(DST)).unwrap();
    assert_eq!(copied, pattern(LEN));
    // The completion record: status Success, bytes completed 0 (only
    // meaningful for partial completions), fault address 0.
    let mut record = [0u8; 32];
    r.memory
        .read_slice(&mut record, GuestAddress(COMPLETION))
        .unwrap();
    assert_eq!(record[0], Status::Success as u8);
}

/// Two address spaces (page-table roots) alternate on one vCPU: each
/// loaded IA32_PASID once, under its own CR3; every ENQCMD carries the
/// PASID of the address space it runs in, not the MSR's last value (the
/// PTI user PGD, 4 KiB above the kernel one, is the same address space);
/// an address space that never loaded one takes #GP.
#[test]
fn ia32_pasid_follows_cr3_across_context_switches() {
    use microguest::demos::command;
    use microguest::{PML4_START, TEST_PORTAL_START};
    const CMD: u64 = DATA_START + 0x1000;
    // 8 KiB aligned, as Linux's PGDs are; A's PTI user half follows it.
    const PML4_A: u64 = DATA_START + 0x4000;
    const PML4_A_USER: u64 = PML4_A + 0x1000;
    const PML4_B: u64 = DATA_START + 0x6000;
    const GP: u8 = 13;
    const GP_RESULT: u32 = 0x6d0d;
    let (pasid_a, pasid_b) = (0x11u32, 0x22u32);
    let mut g = MicroGuest::new();
    g.write(CMD, &command(u32::MAX));
    let a = &mut g.asm;
    // Two copies of the harness's PML4: same mappings, distinct roots.
    for pml4 in [PML4_A, PML4_A_USER, PML4_B] {
        a.mov(rsi, PML4_START).unwrap();
        a.mov(rdi, pml4).unwrap();
        a.mov(ecx, 512).unwrap();
        a.rep().movsq().unwrap();
    }
    let switch_and_load = |a: &mut CodeAssembler, pml4: u64, pasid: u32| {
        a.mov(rax, pml4).unwrap();
        a.mov(cr3, rax).unwrap();
        a.mov(ecx, pasid::MSR_IA32_PASID).unwrap();
        a.mov(eax, 0x8000_0000 | pasid).unwrap();
        a.xor(edx, edx).unwrap();
        a.wrmsr().unwrap();
    };
    let switch_and_enqcmd = |a: &mut CodeAssembler, pml4: u64| {
        a.mov(rax, pml4).unwrap();
        a.mov(cr3, rax).unwrap();
        a.mov(rdi, TEST_PORTAL_START).unwrap();
        a.mov(rsi, CMD).unwrap();
        a.enqcmd(rdi, zmmword_ptr(rsi)).unwrap();
    };
    switch_and_load(a, PML4_A, pasid_a);
    switch_and_load(a, PML4_B, pasid_b);
    switch_and_enqcmd(a, PML4_A);
    switch_and_enqcmd(a, PML4_B);
    switch_and_enqcmd(a, PML4_A_USER);
    switch_and_enqcmd(a, PML4_B);
    // The harness's own address space never loaded a PASID.
    switch_and_enqcmd(a, PML4_START);
    microguest::exit_with(a, 0x600d).unwrap();
    let mut gp = g.asm.create_label();
    g.asm.set_label(&mut gp).unwrap();
    microguest::exit_with(&mut g.asm, GP_RESULT).unwrap();
    g.handler(GP, gp);

    let r = run(g, AccelConfig::default());
    assert_eq!(
        r.exit,
        RunExit::TestExit(GP_RESULT),
        "the last ENQCMD takes #GP"
    );
    let pasids: Vec<u32> = r
        .portal
        .stores
        .lock()
        .unwrap()
        .iter()
        .map(|s| u32::from_le_bytes(s.data[..4].try_into().unwrap()))
        .collect();
    assert_eq!(pasids, vec![pasid_a, pasid_b, pasid_a, pasid_b]);
}

/// A CPL0 guest with a shared WQ 0 (PASID enabled) that loads IA32_PASID
/// with `pasid` and ENQCMDs a MEMMOVE to the WQ's portal. The run ends with
/// `0x5a00 | ZF` when the ENQCMD was refused, else with the completion
/// status.
fn enqcmd_to_shared_wq(accel: &AccelConfig, pasid: u32) -> MicroGuest {
    let dsa = dsa_placements(&accel.dsa)[0];
    let mut g = memmove_guest();
    bring_up(&mut g, &dsa, WqSetup::shared(0, 0), true);
    let a = &mut g.asm;
    a.mov(ecx, pasid::MSR_IA32_PASID).unwrap();
    a.mov(eax, 0x8000_0000 | pasid).unwrap();
    a.xor(edx, edx).unwrap();
    a.wrmsr().unwrap();
    a.mov(rdi, dsa.bar2).unwrap();
    a.mov(rsi, DESC).unwrap();
    a.enqcmd(rdi, zmmword_ptr(rsi)).unwrap();
    let mut accepted = a.create_label();
    a.jnz(accepted).unwrap();
    microguest::exit_with(a, 0x5a01).unwrap();
    a.set_label(&mut accepted).unwrap();
    exit_with_completion_status(a);
    g
}

#[test]
fn without_a_viommu_enqcmd_pasids_still_go_through_the_guest_table() {
    let accel = AccelConfig {
        iommu: false,
        dsa: vec![DsaConfig::default()],
    };
    let r = run(enqcmd_to_shared_wq(&accel, 0x77), accel);
    assert_eq!(r.exit, RunExit::TestExit(Status::Success as u32));
    let mut copied = vec![0u8; LEN];
    r.memory.read_slice(&mut copied, GuestAddress(DST)).unwrap();
    assert_eq!(copied, pattern(LEN));
    let host = r
        .pasids
        .table()
        .translate(0x77)
        .expect("mapped on first use");
    assert_eq!(r.pasids.guest_pasid(host), Some(0x77));
}

#[test]
fn enqcmd_with_a_pasid_the_viommu_does_not_know_is_not_accepted() {
    // The guest never set up PASID tables (translation is off): PASID 0x77
    // does not exist for the vIOMMU, so the descriptor is not enqueued and
    // ENQCMD reports ZF=1.
    let accel = AccelConfig {
        iommu: true,
        dsa: vec![DsaConfig::default()],
    };
    let r = run(enqcmd_to_shared_wq(&accel, 0x77), accel);
    assert_eq!(r.exit, RunExit::TestExit(0x5a01), "ZF=1");
    assert!(r.pasids.table().is_empty(), "no host PASID allocated");
    let record: [u8; 32] = r.memory.read_obj(GuestAddress(COMPLETION)).unwrap();
    assert_eq!(record, [0; 32], "the device never ran it");
}

/// One vDSA (behind the vIOMMU if `iommu`) of a guest whose host PASIDs
/// come from `space`.
fn one_dsa_in(
    space: &std::sync::Arc<pasid::PasidSpace>,
    iommu: bool,
) -> (AccelConfig, MicroOptions) {
    let accel = AccelConfig {
        iommu,
        dsa: vec![DsaConfig::default()],
    };
    let options = MicroOptions {
        accel: accel.clone(),
        pasid_space: Some(space.clone()),
        ..Default::default()
    };
    (accel, options)
}

#[test]
fn two_guests_of_one_host_get_different_host_pasids_for_one_guest_pasid() {
    let space = std::sync::Arc::new(pasid::PasidSpace::new());
    let (accel, options) = one_dsa_in(&space, false);
    let first = microguest::run(enqcmd_to_shared_wq(&accel, 0x77), options.clone()).unwrap();
    let second = microguest::run(enqcmd_to_shared_wq(&accel, 0x77), options).unwrap();
    for r in [&first, &second] {
        assert_eq!(r.exit, RunExit::TestExit(Status::Success as u32));
    }
    let h1 = first.pasids.table().translate(0x77).unwrap();
    let h2 = second.pasids.table().translate(0x77).unwrap();
    assert_ne!(h1, h2);
    assert_eq!(first.pasids.guest_pasid(h2), None);
    assert_eq!(second.pasids.guest_pasid(h1), None);
    assert_eq!(
        space.owner_of(pasid::Scope::Global, h2),
        Some(second.pasids.owner())
    );
}

/// Two guests of one host, one after the other: once the first machine is
/// gone, every host PASID it held (its quarantine PASID, the one its
/// ENQCMD got) is free again and its guest-PASID table is dropped, while
/// the second guest's are still its own.
#[test]
fn a_guests_host_pasids_are_free_once_its_machine_is_gone() {
    for iommu in [false, true] {
        let space = std::sync::Arc::new(pasid::PasidSpace::new());
        let (accel, options) = one_dsa_in(&space, iommu);
        let first = microguest::run(enqcmd_to_shared_wq(&accel, 0x77), options.clone()).unwrap();
        let held: Vec<u32> = (0..space.capacity())
            .filter(|&h| space.owner_of(pasid::Scope::Global, h) == Some(first.pasids.owner()))
            .collect();
        assert!(
            !held.is_empty(),
            "iommu {iommu}: the first guest holds host PASIDs"
        );
        let table = std::sync::Arc::downgrade(&first.pasids);
        drop(first);
        assert!(
            table.upgrade().is_none(),
            "iommu {iommu}: the guest's PASIDs outlive it"
        );
        for h in &held {
            assert_eq!(
                space.owner_of(pasid::Scope::Global, *h),
                None,
                "host PASID {h:#x}"
            );
        }
        assert_eq!(space.allocated(), 0, "iommu {iommu}");
        let second = microguest::run(enqcmd_to_shared_wq(&accel, 0x77), options).unwrap();
        assert_ne!(
            space.allocated(),
            0,
            "iommu {iommu}: the second guest's own"
        );
        drop(second);
        assert_eq!(space.allocated(), 0, "iommu {iommu}");
    }
}
