//! End-to-end SVA micro-guests: guests that build their own scalable-mode
//! VT-d structures, drive the vIOMMU and the vDSA through MMIO and submit
//! work from CPL3 (issue 7, item 4). No Linux involved.
//! These tests need /dev/kvm and fail with a message saying so without it.

use vm_memory::GuestMemoryMmap;

use viommu::paging::{walk, AccessType, PagingLevels};
use viommu::tables::{ContextEntry, Pgtt, RootEntry};
use viommu::FaultReason;
use vmm::microguest::sva::vtd::{ContextControls, FirstStageBinding, ScalableTables};
use vmm::microguest::sva::GuestFailure;
use vmm::microguest::{
    self, exit_with, MicroGuest, MicroOptions, MicroRun, DATA_START, PML4_START,
};
use vmm::vm::RunExit;

/// What every guest program ends with when all its checks passed.
const DONE: u32 = 0x5a0d;

fn run(guest: MicroGuest, options: MicroOptions) -> MicroRun {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm, which this machine lacks"
    );
    microguest::run(guest, options).expect("micro-guest machine")
}

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
    rid: u16,
    pasid: u32,
) -> Result<viommu::PasidEntry, FaultReason> {
    let bus = viommu::tables::bus(rid);
    let devfn = viommu::tables::devfn(rid);
    let root_entry = RootEntry::read(memory, root, bus).map_err(|f| f.reason)?;
    let context_table = root_entry.context_table(devfn).map_err(|f| f.reason)?;
    let context = ContextEntry::read(memory, context_table, devfn).map_err(|f| f.reason)?;
    context.pasid_entry(memory, pasid).map_err(|f| f.reason)
}

#[test]
fn guest_built_tables_point_pasids_at_the_guests_page_tables() {
    const RID: u16 = 0x0018; // 00:03.0
    const OTHER_RID: u16 = 0x0285; // 02:10.5, upper half of its context table
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
        pasid_entry_of(&r.memory, root, 0x0020, 5),
        Err(FaultReason::ContextEntryNotPresent)
    );
}

mod iommu_alone {
    //! The guest's VT-d driver against the vIOMMU alone (no device): the
    //! host plays the device, posting a page request and recording the
    //! page group response.

    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use pci::{BusDevice, MsiRecorder};
    use viommu::regs::{gcmd, GSTS};
    use viommu::{
        AtsDevice, DeviceTlbInvalidation, Iommu, PageGroupResponse, PageRequest, PasidTag,
        ResponseCode,
    };
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm::layout;
    use vmm::microguest::sva::vtd::{ContextControls, FirstStageBinding, ScalableTables, Vtd};
    use vmm::microguest::sva::{read_report, slot};
    use vmm::microguest::{
        exit_with, MicroGuest, DATA_PT_START, DATA_START, MICRO_MEMORY, PML4_START, PTE_P, PTE_U,
        PTE_W,
    };
    use vmm::vcpu::UdHook;
    use vmm::vm::{Vm, VmConfig};

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

    const RID: u16 = 0x0018;
    const PASID: u32 = 9;
    const PAGE: u64 = DATA_START + 0x7000;

    #[test]
    fn guest_enables_translation_and_answers_a_page_request() {
        assert!(std::path::Path::new("/dev/kvm").exists(), "needs /dev/kvm");
        let mut vm = Vm::new(VmConfig {
            cpus: 1,
            memory: MICRO_MEMORY,
            serial: vmm::devices::serial::SerialOutput::Sink,
            ud_hook: Some(UdHook::Breakpoint),
        })
        .unwrap();
        let unit = Arc::new(Iommu::new(
            Arc::new(vm.memory().clone()),
            Arc::new(MsiRecorder::new()),
        ));
        let device = Arc::new(Responses::default());
        unit.register_device(RID, device.clone());
        vm.mmio()
            .insert(
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
        let loaded = g.load(vm.memory()).unwrap();
        vm.set_boot_state(loaded.regs, loaded.sregs);
        let memory = vm.memory().clone();

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
                    requester_id: RID,
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
        let exit = vm.run(Some(Duration::from_secs(30)));
        let posted = poster.join().unwrap();
        let run = vmm::microguest::MicroRun {
            exit,
            portal: Default::default(),
            memory,
        };
        super::assert_done(&run);
        assert_eq!(posted, Ok(()));
        let gsts = read_report(&run.memory, slot::GSTS) as u32;
        assert_eq!(
            gsts & (gcmd::TE | gcmd::QIE | gcmd::SRTP),
            gcmd::TE | gcmd::QIE | gcmd::SRTP
        );
        // The request as the guest read it from the queue.
        let qw0 = read_report(&run.memory, slot::PRQ_QW0);
        let qw1 = read_report(&run.memory, slot::PRQ_QW1);
        assert_eq!((qw0 >> 16) as u16, RID, "requester ID");
        assert_eq!((qw0 >> 32) & 0xf_ffff, u64::from(PASID), "PASID");
        assert_ne!(qw0 & (1 << 8), 0, "PASID present");
        assert_eq!(qw1 & !0xfff, PAGE);
        assert_eq!(qw1 & 0b111, 0b111, "read, write, last in group");
        assert_eq!(read_report(&run.memory, slot::PRQ_SERVICED), 1);
        // The guest mapped the page and answered Success for the group.
        let pte: u64 = run
            .memory
            .read_obj(GuestAddress(
                DATA_PT_START + ((PAGE - DATA_START) >> 12) * 8,
            ))
            .unwrap();
        assert_eq!(pte, PAGE | PTE_P | PTE_W | PTE_U);
        assert_eq!(
            *device.0.lock().unwrap(),
            vec![PageGroupResponse {
                requester_id: RID,
                pasid: Some(PASID),
                prg_index: 0x17,
                code: ResponseCode::Success,
                private_data: None,
                from_hardware: false,
            }]
        );
    }
}
