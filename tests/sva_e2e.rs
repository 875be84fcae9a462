//! End-to-end SVA micro-guests: guests that build their own scalable-mode
//! VT-d structures, drive the vIOMMU and the vDSA through MMIO and submit
//! work from CPL3 (issue 7, item 4). No Linux involved.
//! These tests need /dev/kvm and fail with a message saying so without it.

use std::sync::Arc;

use iced_x86::code_asm::*;
use pasid::{PasidSpace, Scope};
use pci::PciAddress;
use vdsa::completion::{CompletionRecord, Status};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use microguest::driver::dsa::{wait_for_completion, DsaDriver, WqSetup};
use microguest::driver::vtd::{ContextControls, FirstStageBinding, ScalableTables, Vtd};
use microguest::driver::{read_report, report, slot, store_qwords, GuestFailure};
use microguest::sva_demo::*;
use microguest::{
    self, enter_user, exit_with, MicroGuest, MicroOptions, MicroRun, DATA_START, PML4_START,
    USER_STACK_TOP,
};
use viommu::paging::{walk, AccessType, PagingLevels};
use viommu::tables::{ContextEntry, Pgtt, RootEntry};
use viommu::FaultReason;
use vmm::vm::RunExit;

fn run(guest: MicroGuest, options: MicroOptions) -> MicroRun {
    microguest::require_kvm();
    microguest::run(guest, options).expect("micro-guest machine")
}

/// #UD vector.
const UD: u8 = 6;

/// Asserts the run ended with [`DONE`], naming the failed guest check if not.
fn assert_done(run: &MicroRun) {
    if let RunExit::TestExit(v) = run.exit {
        if let Some(failure) = GuestFailure::decode(v) {
            panic!("guest check failed: {failure:?}");
        }
    }
    assert_eq!(run.exit, RunExit::TestExit(DONE));
}

/// The entry the vIOMMU would use for (`rid`, `pasid`), read from the
/// guest's memory the way the unit walks it.
fn pasid_entry_of(
    memory: &GuestMemoryMmap,
    root: u64,
    rid: PciAddress,
    pasid: u32,
) -> Result<viommu::PasidEntry, FaultReason> {
    let (bus, devfn) = (rid.bus, rid.devfn());
    let root_entry = RootEntry::read(memory, root, bus).map_err(|f| f.reason)?;
    let context_table = root_entry.context_table(devfn).map_err(|f| f.reason)?;
    let context = ContextEntry::read(memory, context_table, devfn).map_err(|f| f.reason)?;
    context.pasid_entry(memory, pasid).map_err(|f| f.reason)
}

#[test]
fn guest_built_tables_point_pasids_at_the_guests_page_tables() {
    const RID: PciAddress = PciAddress::new(0, 3, 0);
    // Upper half of its context table.
    const OTHER_RID: PciAddress = PciAddress::new(2, 0x10, 5);
    let mut tables = ScalableTables::default();
    tables.add_device(RID, ContextControls::default()).unwrap();
    tables
        .add_device(
            OTHER_RID,
            ContextControls {
                dte: false,
                pre: false,
            },
        )
        .unwrap();
    for (pasid, did) in [(5, 1), (70, 2)] {
        tables
            .bind(
                RID,
                FirstStageBinding {
                    pasid,
                    flptr: PML4_START,
                    did,
                },
            )
            .unwrap();
    }
    let mut g = MicroGuest::new();
    tables.emit(&mut g.asm).unwrap();
    exit_with(&mut g.asm, DONE).unwrap();
    let r = run(g, MicroOptions::default());
    assert_done(&r);

    let root = tables.root_table();
    let bus0 = RootEntry::read(&r.memory, root, 0).unwrap();
    let context_table = bus0.context_table(0x18).unwrap();
    let context = ContextEntry::read(&r.memory, context_table, 0x18).unwrap();
    assert!(context.paside && context.pre && context.dte && !context.fpd);
    assert_eq!(context.max_pasids(), 8192, "PDTS 0");
    assert_eq!(context.rid_pasid, 0);
    let other = {
        let e = RootEntry::read(&r.memory, root, 2).unwrap();
        ContextEntry::read(&r.memory, e.context_table(0x85).unwrap(), 0x85).unwrap()
    };
    assert!(other.paside && !other.pre && !other.dte);
    assert_ne!(other.pasid_dir, context.pasid_dir, "a directory per device");

    for (pasid, did) in [(5, 1), (70, 2)] {
        let e = pasid_entry_of(&r.memory, root, RID, pasid).unwrap();
        assert_eq!(e.pgtt, Pgtt::FirstStage);
        assert_eq!((e.flptr, e.did), (PML4_START, did));
        assert_eq!(e.flpm, PagingLevels::Four);
        assert!(e.nxe && !e.sre && !e.wpe && !e.fpd);
        // A user write through the entry lands where the guest's own CPU
        // mapping puts it (identity).
        let va = DATA_START + 0x5123;
        let t = walk(
            &r.memory,
            e.flptr,
            va,
            AccessType::WRITE.as_user(),
            &viommu::first_stage_config(&e),
        )
        .unwrap();
        assert_eq!(t.phys_for(va), va);
    }
    assert_eq!(
        pasid_entry_of(&r.memory, root, RID, 6),
        Err(FaultReason::PasidEntryNotPresent),
        "PASID 6 shares PASID 5's table but was never bound"
    );
    assert_eq!(
        pasid_entry_of(&r.memory, root, RID, 200),
        Err(FaultReason::PasidDirNotPresent)
    );
    assert_eq!(
        pasid_entry_of(&r.memory, root, RID, 8192),
        Err(FaultReason::PasidTooLarge)
    );
    assert_eq!(
        pasid_entry_of(&r.memory, root, PciAddress::new(0, 4, 0), 5),
        Err(FaultReason::ContextEntryNotPresent)
    );
}

mod iommu_alone {
    //! The guest's VT-d driver against the vIOMMU alone (no device): the
    //! host plays the device, posting a page request and recording the
    //! page group response.

    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use bus::BusDevice;
    use microguest::driver::vtd::{ContextControls, FirstStageBinding, ScalableTables, Vtd};
    use microguest::driver::{read_report, slot};
    use microguest::{
        exit_with, MicroGuest, MicroOptions, DATA_PT_START, DATA_START, PML4_START, PTE_P, PTE_U,
        PTE_W,
    };
    use pci::MsiRecorder;
    use viommu::regs::{gcmd, GSTS};
    use viommu::{
        AtsDevice, DeviceTlbInvalidation, Iommu, PageGroupResponse, PageRequest, PasidTag,
        ResponseCode,
    };
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm::layout;

    type Unit = Iommu<Arc<GuestMemoryMmap>>;

    struct Window(Arc<Unit>);
    impl BusDevice for Window {
        fn read(&mut self, _: u64, offset: u64, data: &mut [u8]) {
            self.0.mmio_read(offset, data);
        }
        fn write(&mut self, _: u64, offset: u64, data: &[u8]) {
            self.0.mmio_write(offset, data);
        }
    }

    #[derive(Default)]
    struct Responses(Mutex<Vec<PageGroupResponse>>);
    impl AtsDevice for Responses {
        fn invalidate_device_tlb(&self, _: &DeviceTlbInvalidation) {}
        fn page_group_response(&self, response: &PageGroupResponse) {
            self.0.lock().unwrap().push(*response);
        }
    }

    const RID: pci::PciAddress = pci::PciAddress::new(0, 3, 0);
    const DEV: pci::PciAddress = RID;
    const PASID: u32 = 9;
    const PAGE: u64 = DATA_START + 0x7000;

    #[test]
    fn guest_enables_translation_and_answers_a_page_request() {
        microguest::require_kvm();
        // The harness's machine without accelerators; the test puts its
        // own VT-d unit where the vIOMMU goes.
        let mut machine = microguest::machine(&MicroOptions::default()).unwrap();
        let unit = Arc::new(Iommu::new(
            Arc::new(machine.memory().clone()),
            Arc::new(MsiRecorder::new()),
        ));
        let device = Arc::new(Responses::default());
        unit.register_device(DEV, device.clone());
        machine
            .devices()
            .add_mmio_device(
                layout::VIOMMU_START,
                layout::VIOMMU_SIZE,
                Arc::new(Mutex::new(Window(unit.clone()))),
            )
            .unwrap();

        let mut tables = ScalableTables::default();
        tables.add_device(RID, ContextControls::default()).unwrap();
        tables
            .bind(
                RID,
                FirstStageBinding {
                    pasid: PASID,
                    flptr: PML4_START,
                    did: 3,
                },
            )
            .unwrap();
        let vtd = Vtd::default();
        let mut g = MicroGuest::new();
        g.map_page(PAGE, 0).unwrap();
        tables.emit(&mut g.asm).unwrap();
        vtd.enable(&mut g.asm, tables.root_table()).unwrap();
        vtd.service_page_request(&mut g.asm).unwrap();
        exit_with(&mut g.asm, super::DONE).unwrap();
        let loaded = g.load(machine.memory()).unwrap();
        machine.set_boot_state(loaded.regs, loaded.sregs);
        let memory = machine.memory().clone();

        // The device: once translation is on, a write page request.
        let poster = {
            let unit = unit.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                loop {
                    let mut b = [0u8; 4];
                    unit.mmio_read(GSTS, &mut b);
                    if u32::from_le_bytes(b) & gcmd::TE != 0 {
                        break;
                    }
                    assert!(start.elapsed() < Duration::from_secs(20), "no TE");
                    std::thread::sleep(Duration::from_millis(1));
                }
                unit.page_request(&PageRequest {
                    requester_id: DEV,
                    pasid: Some(PasidTag {
                        pasid: PASID,
                        privileged: false,
                    }),
                    address: PAGE + 0x123,
                    read: true,
                    write: true,
                    execute: false,
                    last_in_group: true,
                    prg_index: 0x17,
                    private_data: None,
                })
            })
        };
        let exit = machine.run(Some(Duration::from_secs(30))).unwrap();
        let posted = poster.join().unwrap();
        assert_eq!(exit, vmm::vm::RunExit::TestExit(super::DONE));
        assert_eq!(posted, Ok(()));
        let gsts = read_report(&memory, slot::GSTS) as u32;
        assert_eq!(
            gsts & (gcmd::TE | gcmd::QIE | gcmd::SRTP),
            gcmd::TE | gcmd::QIE | gcmd::SRTP
        );
        // The request as the guest read it from the queue.
        let qw0 = read_report(&memory, slot::PRQ_QW0);
        let qw1 = read_report(&memory, slot::PRQ_QW1);
        assert_eq!((qw0 >> 16) as u16, RID.rid(), "requester ID");
        assert_eq!((qw0 >> 32) & 0xf_ffff, u64::from(PASID), "PASID");
        assert_ne!(qw0 & (1 << 8), 0, "PASID present");
        assert_eq!(qw1 & !0xfff, PAGE);
        assert_eq!(qw1 & 0b111, 0b111, "read, write, last in group");
        assert_eq!(read_report(&memory, slot::PRQ_SERVICED), 1);
        // The guest mapped the page and answered Success for the group.
        let pte: u64 = memory
            .read_obj(GuestAddress(
                DATA_PT_START + ((PAGE - DATA_START) >> 12) * 8,
            ))
            .unwrap();
        assert_eq!(pte, PAGE | PTE_P | PTE_W | PTE_U);
        assert_eq!(
            *device.0.lock().unwrap(),
            vec![PageGroupResponse {
                requester_id: DEV,
                pasid: Some(PASID),
                prg_index: 0x17,
                code: ResponseCode::Success,
                private_data: None,
                from_hardware: false,
            }]
        );
    }
}

/// #UD vector: the user program gives the CPU back to its kernel with ud2.
/// Asserts guest memory at `addr` holds `expected`, naming the first
/// differing byte rather than printing kilobytes.
fn assert_memory(memory: &GuestMemoryMmap, addr: u64, expected: &[u8], what: &str) {
    let actual = bytes(memory, addr, expected.len());
    if let Some(i) = actual.iter().zip(expected).position(|(a, e)| a != e) {
        let wrong = actual.iter().zip(expected).filter(|(a, e)| a != e).count();
        panic!(
            "{what}: {wrong} of {} bytes differ, the first at {:#x}: {:#04x} instead of {:#04x}",
            expected.len(),
            addr + i as u64,
            actual[i],
            expected[i]
        );
    }
}

/// The page-fault copy: two pages, the second destination page not
/// present in the process's page tables.
const COPY_PF: Copy = Copy {
    src: DATA_START + 0x3_0000,
    dst: DATA_START + 0x3_4000,
    len: 0x2000,
    record: DATA_START + 0x3_8000,
    descriptor: DATA_START + 0x3_8040,
};
/// The destination page that is not present.
const MISSING_PAGE: u64 = COPY_PF.dst + 0x1000;
/// Report slot of the page-fault copy's completion status.
const SLOT_PF_STATUS: usize = slot::USER + 3;

/// The page-fault program: [`bring_up`] with WQ 0 dedicated to the PASID
/// (block-on-fault as `block_on_fault` says), then at CPL3 MOVDIR64B of
/// [`COPY_PF`] with the descriptor's BOF flag likewise. With
/// block-on-fault the user program gives the CPU back to the kernel (ud2),
/// which services the page request from the page request queue (maps the
/// page, answers Success) and polls the record; without it the user
/// program polls the record itself.
fn page_fault_program(p: SvaProgram, block_on_fault: bool) -> MicroGuest {
    let mut g = MicroGuest::new();
    g.write(COPY_PF.src, &pattern(COPY_PF.len as usize, p.seed));
    g.map_page(MISSING_PAGE, 0).unwrap();
    let dsa = DsaDriver::default();
    let a = &mut g.asm;
    let wq = WqSetup::dedicated(0, 0, p.pasid).with_block_on_fault(block_on_fault);
    bring_up(a, &p, &[wq]).unwrap();
    store_descriptor(a, &COPY_PF, block_on_fault).unwrap();
    let mut user = a.create_label();
    enter_user(a, user, USER_STACK_TOP).unwrap();

    a.set_label(&mut user).unwrap();
    dsa.movdir64b(a, 0, COPY_PF.descriptor).unwrap();
    if block_on_fault {
        // Back to the kernel, which services the fault.
        let mut kernel = a.create_label();
        a.ud2().unwrap();
        a.set_label(&mut kernel).unwrap();
        a.endbr64().unwrap();
        Vtd::default().service_page_request(a).unwrap();
        g.handler(UD, kernel);
    }
    let a = &mut g.asm;
    wait_for_completion(a, COPY_PF.record).unwrap();
    report(a, SLOT_PF_STATUS, rax).unwrap();
    exit_with(a, DONE).unwrap();
    g
}

/// The 32 bytes of the completion record at `addr`.
fn record(memory: &GuestMemoryMmap, addr: u64) -> [u8; 32] {
    let mut b = [0u8; 32];
    memory.read_slice(&mut b, GuestAddress(addr)).unwrap();
    b
}

/// The record of a descriptor that completed (status Success, no bytes
/// completed or fault address: those are for partial completions).
fn success() -> [u8; 32] {
    CompletionRecord::new(Status::Success).to_bytes()
}

/// What every run of [`sva_program`] must show: both copies done, both
/// records Success with every byte, one #GP, the BAR sizes the vDSA has.
fn assert_sva_program_results(run: &MicroRun, seed: u8) {
    assert_done(run);
    let m = &run.memory;
    for (i, c) in [COPY_DWQ, COPY_SWQ].iter().enumerate() {
        assert_memory(
            m,
            c.dst,
            &pattern(c.len as usize, seed.wrapping_add(i as u8)),
            &format!("copy {i}'s destination"),
        );
        assert_eq!(record(m, c.record), success(), "copy {i}'s record");
    }
    assert_eq!(
        read_report(m, SLOT_GP),
        1,
        "one #GP, then the ENQCMD went through"
    );
    assert_eq!(
        read_report(m, slot::BAR0_SIZE),
        vdsa::regs::layout::BAR0_SIZE
    );
    assert_eq!(
        read_report(m, slot::BAR2_SIZE),
        8 * vdsa::regs::layout::PORTALS_PER_WQ,
        "8 WQs"
    );
}

/// FSTS of the vIOMMU.
fn fault_status(iommu: &vmm::sva::Viommu) -> u32 {
    let mut b = [0u8; 4];
    iommu.mmio_read(viommu::regs::FSTS, &mut b);
    u32::from_le_bytes(b)
}

/// The host PASID the guest's PASID maps to after the run.
fn host_pasid(run: &MicroRun, gpasid: u32) -> u32 {
    let hpasid = run
        .pasids
        .table()
        .translate(gpasid)
        .expect("the guest PASID has a host PASID");
    assert_eq!(run.pasids.guest_pasid(hpasid), Some(gpasid));
    hpasid
}

#[test]
fn user_movdir64b_and_enqcmd_copy_through_the_viommu() {
    let r = run(sva_program(program(true, 3)).unwrap(), options(true));
    assert_sva_program_results(&r, 3);
    // Both WQs' DMA carried the host PASID, never the guest's number.
    let hpasid = host_pasid(&r, GUEST_PASID);
    assert_ne!(hpasid, GUEST_PASID);
    assert_eq!(
        r.pasids.device_requests(),
        vec![(program(true, 3).dsa_rid, hpasid)]
    );
    let iommu = r.iommu.as_ref().expect("a vIOMMU");
    assert_eq!(fault_status(iommu), 0, "no fault recorded on the way");
}

#[test]
fn user_movdir64b_and_enqcmd_copy_without_iommu() {
    let r = run(sva_program(program(false, 5)).unwrap(), options(false));
    assert_sva_program_results(&r, 5);
    assert!(r.iommu.is_none());
}

#[test]
fn block_on_fault_page_request_serviced_by_the_guest_completes_the_copy() {
    let p = program(true, 7);
    let r = run(page_fault_program(p, true), options(true));
    assert_done(&r);
    let m = &r.memory;
    assert_memory(
        m,
        COPY_PF.dst,
        &pattern(COPY_PF.len as usize, 7),
        "both pages copied once the guest mapped the second",
    );
    assert_eq!(record(m, COPY_PF.record), success());
    // The page request as the guest read it from its page request queue:
    // the vDSA's requester ID, the guest's PASID (not the host's), the
    // missing page, a write, last of its group.
    assert_eq!(read_report(m, slot::PRQ_SERVICED), 1);
    let qw0 = read_report(m, slot::PRQ_QW0);
    let qw1 = read_report(m, slot::PRQ_QW1);
    assert_eq!((qw0 >> 16) as u16, p.dsa_rid.rid(), "requester ID");
    assert_ne!(qw0 & (1 << 8), 0, "PASID present");
    assert_eq!((qw0 >> 32) as u32 & 0xf_ffff, GUEST_PASID, "guest PASID");
    assert_eq!(qw0 & (1 << 53), 0, "user request (no privilege)");
    assert_eq!(qw1 & !0xfff, MISSING_PAGE, "page address");
    assert_eq!(qw1 & 0b110, 0b110, "write, last in group");
    // The device asked in the host PASID; the guest saw its own.
    let hpasid = host_pasid(&r, GUEST_PASID);
    assert_ne!(hpasid, GUEST_PASID);
    assert_eq!(r.pasids.device_requests(), vec![(p.dsa_rid, hpasid)]);
    let iommu = r.iommu.as_ref().unwrap();
    assert_eq!(fault_status(iommu), 0, "a page request is no fault record");
}

#[test]
fn without_block_on_fault_the_copy_completes_partially_at_the_fault() {
    let p = program(true, 9);
    let r = run(page_fault_program(p, false), options(true));
    assert_done(&r);
    let m = &r.memory;
    // The first page arrived, the missing one was never written.
    assert_memory(
        m,
        COPY_PF.dst,
        &pattern(COPY_PF.len as usize, 9)[..0x1000],
        "the page before the fault",
    );
    assert_memory(m, MISSING_PAGE, &[0u8; 0x1000], "the missing page");
    let mut expected = CompletionRecord::new(Status::PageFaultNobof);
    expected.fault_write = true;
    expected.bytes_completed = 0x1000;
    expected.fault_addr = MISSING_PAGE;
    assert_eq!(
        record(m, COPY_PF.record),
        expected.to_bytes(),
        "status 0x83 (page fault, write), 0x1000 bytes done, fault address"
    );
    assert_eq!(
        read_report(m, SLOT_PF_STATUS),
        u64::from(expected.status_byte())
    );
    // No page request: nothing in the queue.
    let iommu = r.iommu.as_ref().unwrap();
    let mut head = [0u8; 8];
    let mut tail = [0u8; 8];
    iommu.mmio_read(viommu::regs::PQH, &mut head);
    iommu.mmio_read(viommu::regs::PQT, &mut tail);
    assert_eq!(head, tail, "the page request queue stayed empty");
}

#[test]
fn two_guests_with_the_same_guest_pasid_get_different_host_pasids_and_keep_to_their_memory() {
    // Two VMs of one VMM process, one host PASID space, running at once:
    // both use guest PASID GUEST_PASID and the same buffer addresses, with
    // different data.
    let space = Arc::new(PasidSpace::new());
    let guest = |seed: u8| {
        let space = space.clone();
        std::thread::spawn(move || {
            run(
                sva_program(program(true, seed)).unwrap(),
                MicroOptions {
                    pasid_space: Some(space),
                    ..options(true)
                },
            )
        })
    };
    let (a, b) = (guest(11), guest(12));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    // Each copy read and wrote its own guest's memory only.
    assert_sva_program_results(&a, 11);
    assert_sva_program_results(&b, 12);
    for (run, seed) in [(&a, 11u8), (&b, 12u8)] {
        for (i, c) in [COPY_DWQ, COPY_SWQ].iter().enumerate() {
            assert_memory(
                &run.memory,
                c.src,
                &pattern(c.len as usize, seed.wrapping_add(i as u8)),
                "sources untouched",
            );
        }
    }
    // Same guest PASID, two host PASIDs, each charged to its guest, and
    // neither guest's table knows the other's.
    let (ha, hb) = (host_pasid(&a, GUEST_PASID), host_pasid(&b, GUEST_PASID));
    assert_ne!(ha, hb);
    assert_eq!(a.pasids.guest_pasid(hb), None);
    assert_eq!(b.pasids.guest_pasid(ha), None);
    assert_eq!(space.owner_of(Scope::Global, ha), Some(a.pasids.owner()));
    assert_eq!(space.owner_of(Scope::Global, hb), Some(b.pasids.owner()));
    // Each vDSA's DMA carried its own guest's host PASID only.
    let rid = program(true, 0).dsa_rid;
    assert_eq!(a.pasids.device_requests(), vec![(rid, ha)]);
    assert_eq!(b.pasids.device_requests(), vec![(rid, hb)]);
}

/// A VM that ran ENQCMD through its vIOMMU gives every host PASID back to
/// the process's space once it is gone: the space another VM allocates
/// from is as it was before.
#[test]
fn a_finished_vm_frees_its_host_pasids() {
    let space = Arc::new(PasidSpace::new());
    let r = run(
        sva_program(program(true, 13)).unwrap(),
        MicroOptions {
            pasid_space: Some(space.clone()),
            ..options(true)
        },
    );
    assert_sva_program_results(&r, 13);
    let hpasid = host_pasid(&r, GUEST_PASID);
    let quarantine = r.pasids.quarantine();
    for h in [hpasid, quarantine] {
        assert_eq!(space.owner_of(Scope::Global, h), Some(r.pasids.owner()));
    }
    let pasids = Arc::downgrade(&r.pasids);
    drop(r);
    assert!(pasids.upgrade().is_none(), "the VM's PASIDs outlived it");
    for h in [hpasid, quarantine] {
        assert_eq!(space.owner_of(Scope::Global, h), None, "{h:#x} not freed");
    }
    assert_eq!(space.allocated(), 0);
}

/// Report slot of ZF after the ENQCMD that follows the teardown.
const SLOT_ZF_AFTER_TEARDOWN: usize = slot::USER + 4;

/// The teardown program: the PASID entry is set up as in [`bring_up`] (WQ
/// 1 shared), the process copies [`COPY_SWQ`] with ENQCMD, then gives the
/// CPU to its kernel (ud2), which tears the PASID down as intel-iommu
/// does on unbind (PASID-table entry cleared, PASID-cache and PASID-based
/// IOTLB invalidation) and submits [`COPY_DWQ`]'s descriptor with ENQCMD
/// once more (through the #GP fixup if it takes one), recording ZF and the
/// number of #GPs.
fn teardown_program(p: SvaProgram) -> MicroGuest {
    let mut g = MicroGuest::new();
    g.write(COPY_SWQ.src, &pattern(COPY_SWQ.len as usize, p.seed));
    g.write(COPY_DWQ.src, &pattern(COPY_DWQ.len as usize, p.seed ^ 0xff));
    let dsa = DsaDriver::default();
    let vtd = Vtd::default();
    // bring_up's tables, planned again to learn the entry's address.
    let (_, entry) = p.setup().tables().unwrap();
    let a = &mut g.asm;
    bring_up(a, &p, &[WqSetup::shared(1, 1)]).unwrap();
    store_descriptor(a, &COPY_SWQ, false).unwrap();
    // The second submission reuses COPY_DWQ's buffers on the shared WQ.
    store_descriptor(a, &COPY_DWQ, false).unwrap();
    let mut user = a.create_label();
    a.xor(r15d, r15d).unwrap();
    enter_user(a, user, USER_STACK_TOP).unwrap();

    a.set_label(&mut user).unwrap();
    dsa.enqcmd(a, 1, COPY_SWQ.descriptor).unwrap();
    wait_for_completion(a, COPY_SWQ.record).unwrap();
    report(a, SLOT_SWQ_STATUS, rax).unwrap();
    a.ud2().unwrap();

    let mut kernel = a.create_label();
    a.set_label(&mut kernel).unwrap();
    a.endbr64().unwrap();
    store_qwords(a, entry, &[0; 8]).unwrap();
    vtd.invalidate_pasid(a, p.did, p.pasid).unwrap();
    a.mov(rdi, dsa.portal(1)).unwrap();
    a.mov(rsi, COPY_DWQ.descriptor).unwrap();
    a.enqcmd(rdi, zmmword_ptr(rsi)).unwrap();
    a.setz(al).unwrap();
    a.movzx(eax, al).unwrap();
    report(a, SLOT_ZF_AFTER_TEARDOWN, rax).unwrap();
    report(a, SLOT_GP, r15).unwrap();
    exit_with(a, DONE).unwrap();
    g.handler(UD, kernel);
    install_gp_fixup(&mut g, &p).unwrap();
    g
}

#[test]
fn after_the_guest_tears_its_pasid_down_the_host_pasid_is_freed_and_enqcmd_refused() {
    let space = Arc::new(PasidSpace::new());
    let p = program(true, 21);
    let r = run(
        teardown_program(p),
        MicroOptions {
            pasid_space: Some(space.clone()),
            ..options(true)
        },
    );
    assert_done(&r);
    let m = &r.memory;
    // Before the teardown: the copy went through in a host PASID.
    assert_memory(
        m,
        COPY_SWQ.dst,
        &pattern(COPY_SWQ.len as usize, 21),
        "the copy before the teardown",
    );
    assert_eq!(record(m, COPY_SWQ.record), success());
    // Two #GPs: the first ENQCMD's, and the one after the teardown (the
    // VMM forgets the address space's IA32_PASID with the mapping; the
    // fixup loads it again and the retried ENQCMD is refused below).
    assert_eq!(read_report(m, SLOT_GP), 2);
    let requests = r.pasids.device_requests();
    assert_eq!(requests.len(), 1);
    let (rid, hpasid) = requests[0];
    assert_eq!(rid, p.dsa_rid);
    // The teardown unmapped the guest PASID and gave the host PASID back.
    assert!(r.pasids.table().translate(GUEST_PASID).is_err());
    assert_eq!(r.pasids.guest_pasid(hpasid), None);
    assert_eq!(
        space.owner_of(Scope::Global, hpasid),
        None,
        "host PASID freed"
    );
    // The ENQCMD after it was refused (ZF=1) and nothing ran.
    assert_eq!(
        read_report(m, SLOT_ZF_AFTER_TEARDOWN),
        1,
        "ZF=1: not accepted"
    );
    assert_eq!(record(m, COPY_DWQ.record), [0u8; 32]);
    assert_memory(
        m,
        COPY_DWQ.dst,
        &vec![0u8; COPY_DWQ.len as usize],
        "the refused copy's destination",
    );
}

/// A guest PASID that has no PASID-table entry (the process's is
/// [`GUEST_PASID`]).
const STRAY_PASID: u32 = GUEST_PASID + 1;

/// Runs a program whose dedicated WQ 0 names [`STRAY_PASID`]: MOVDIR64B of
/// [`COPY_DWQ`] from CPL3, then the wait for SWERROR.
fn run_stray_dedicated_wq() -> MicroRun {
    let p = program(true, 31);
    let dsa = DsaDriver::default();
    let mut g = MicroGuest::new();
    g.write(COPY_DWQ.src, &pattern(COPY_DWQ.len as usize, 31));
    let a = &mut g.asm;
    bring_up(a, &p, &[WqSetup::dedicated(0, 0, STRAY_PASID)]).unwrap();
    store_descriptor(a, &COPY_DWQ, false).unwrap();
    let mut user = a.create_label();
    enter_user(a, user, USER_STACK_TOP).unwrap();
    a.set_label(&mut user).unwrap();
    dsa.movdir64b(a, 0, COPY_DWQ.descriptor).unwrap();
    dsa.wait_for_software_error(a).unwrap();
    exit_with(a, DONE).unwrap();
    let r = run(g, options(true));
    assert_done(&r);
    r
}

/// SWERROR as the guest read it.
fn software_error(run: &MicroRun) -> [u64; 4] {
    std::array::from_fn(|q| read_report(&run.memory, slot::SWERROR + q))
}

/// SWERROR of a MEMMOVE from WQ 0 with `pasid` whose completion record at
/// `record` could not be written (a write translation failure).
fn record_translation_error(pasid: u32, record: u64) -> [u64; 4] {
    let mut reg = vdsa::swerr::SwErrReg::default();
    reg.record(&vdsa::swerr::SoftwareError {
        code: Status::CraXlat as u8,
        wq: Some(0),
        desc: Some(vdsa::swerr::DescInfo {
            operation: vdsa::descriptor::Opcode::Memmove as u8,
            pasid,
            privileged: false,
            batch_index: None,
        }),
        fault: Some((record, true)),
        info: None,
    });
    reg.0
}

#[test]
fn a_dedicated_wq_bound_to_a_pasid_the_guest_never_set_up_fails_the_copy() {
    let r = run_stray_dedicated_wq();
    let m = &r.memory;
    // Nothing was copied and no record could be written: the error is in
    // SWERROR (completion record translation error, WQ 0, MEMMOVE, the
    // record's address, a write). Its PASID field is checked by
    // `swerror_and_the_fault_log_name_the_stray_pasid` below.
    let pasid_field = {
        let mut q0 = vdsa::swerr::SwErrQ0(0);
        q0.set_pasid(u64::MAX);
        q0.0
    };
    let mut seen = software_error(&r);
    seen[0] &= !pasid_field;
    assert_eq!(seen, record_translation_error(0, COPY_DWQ.record));
    assert_eq!(record(m, COPY_DWQ.record), [0u8; 32], "no record written");
    assert_memory(
        m,
        COPY_DWQ.dst,
        &vec![0u8; COPY_DWQ.len as usize],
        "the failed copy's destination",
    );
    assert!(
        r.pasids.table().translate(STRAY_PASID).is_err(),
        "never mapped"
    );
}

/// What hardware shows for the same program: SWERROR names the WQ's PASID
/// (0x1235), and the IOMMU records the request it blocked (fault reason:
/// PASID-table entry not present), which the guest's fault handler reads.
#[test]
fn swerror_and_the_fault_log_name_the_stray_pasid() {
    let r = run_stray_dedicated_wq();
    assert_eq!(
        software_error(&r),
        record_translation_error(STRAY_PASID, COPY_DWQ.record)
    );
    let iommu = r.iommu.as_ref().unwrap();
    assert_ne!(fault_status(iommu) & 0x2, 0, "FSTS.PPF: a fault recorded");
}

#[test]
fn a_guest_naming_another_guests_host_pasid_gets_its_own_address_space() {
    // Guest A runs first and keeps its mapping (its run, and with it its
    // PASID table, stays alive). Guest B, sharing the host PASID space,
    // then uses A's host PASID number as its own guest PASID.
    let space = Arc::new(PasidSpace::new());
    let shared = |p: SvaProgram| {
        run(
            sva_program(p).unwrap(),
            MicroOptions {
                pasid_space: Some(space.clone()),
                ..options(true)
            },
        )
    };
    let a = shared(program(true, 41));
    assert_sva_program_results(&a, 41);
    let ha = host_pasid(&a, GUEST_PASID);
    let b = shared(SvaProgram {
        pasid: ha,
        ..program(true, 42)
    });
    // B's copies read and wrote B's memory, in a host PASID of its own.
    assert_sva_program_results(&b, 42);
    let hb = host_pasid(&b, ha);
    assert_ne!(hb, ha);
    assert_eq!(
        b.pasids.device_requests(),
        vec![(program(true, 0).dsa_rid, hb)]
    );
    // A's memory is as A's run left it.
    for (i, c) in [COPY_DWQ, COPY_SWQ].iter().enumerate() {
        let own = pattern(c.len as usize, 41u8.wrapping_add(i as u8));
        assert_memory(&a.memory, c.src, &own, "A's source");
        assert_memory(&a.memory, c.dst, &own, "A's destination");
    }
    assert_eq!(
        a.pasids.device_requests(),
        vec![(program(true, 0).dsa_rid, ha)]
    );
}
