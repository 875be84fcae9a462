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
