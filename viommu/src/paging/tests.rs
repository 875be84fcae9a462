// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

use std::cell::Cell;

use proptest::prelude::*;
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::builder::{PageTableBuilder, TABLE_FLAGS};
use super::*;

const MEM_SIZE: u64 = 4 << 20;
const TABLES: u64 = 0x10_0000;
const TABLES_END: u64 = 0x20_0000;
const RW_USER: u64 = entry::WRITABLE | entry::USER;

fn memory() -> GuestMemoryMmap<()> {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn cfg(levels: PagingLevels) -> WalkConfig {
    WalkConfig {
        levels,
        ..WalkConfig::default()
    }
}

const USER_READ: AccessType = AccessType {
    write: false,
    user: true,
    execute: false,
};
const USER_WRITE: AccessType = AccessType {
    write: true,
    user: true,
    execute: false,
};
const USER_EXEC: AccessType = AccessType {
    write: false,
    user: true,
    execute: true,
};
const SUPER_EXEC: AccessType = AccessType {
    write: false,
    user: false,
    execute: true,
};

#[test]
fn translates_every_page_size_at_both_level_counts() {
    for levels in [PagingLevels::Four, PagingLevels::Five] {
        let mem = memory();
        let mut b = PageTableBuilder::new(&mem, levels, TABLES, TABLES_END).unwrap();
        // A high user address (bit 47 set is only canonical in 5-level mode, so stay below).
        let va_4k = 0x7fff_1234_5000;
        let va_2m = 0x0000_5555_4020_0000;
        let va_1g = 0x0000_3f80_4000_0000;
        b.map(va_4k, 0x3000, PAGE_SIZE_4K, RW_USER).unwrap();
        b.map(va_2m, 0x20_0000, PAGE_SIZE_2M, RW_USER).unwrap();
        b.map(va_1g, 0x1_4000_0000, PAGE_SIZE_1G, entry::USER)
            .unwrap();
        let c = cfg(levels);

        let t = walk(&mem, b.root(), va_4k + 0x123, USER_READ, &c).unwrap();
        assert_eq!(t.phys_addr, 0x3123);
        assert_eq!(t.page_size, PAGE_SIZE_4K);
        assert!(t.writable && t.user && t.executable);

        let t = walk(&mem, b.root(), va_2m + 0x1_2345, USER_WRITE, &c).unwrap();
        assert_eq!(t.phys_addr, 0x21_2345);
        assert_eq!(t.page_size, PAGE_SIZE_2M);
        assert!(t.dirty);

        let t = walk(&mem, b.root(), va_1g + 0x3fff_fff8, USER_READ, &c).unwrap();
        assert_eq!(t.phys_addr, 0x1_7fff_fff8);
        assert_eq!(t.page_size, PAGE_SIZE_1G);
        assert!(!t.writable);
    }
}

#[test]
fn five_level_reaches_addresses_above_48_bits() {
    let mem = memory();
    let mut b = PageTableBuilder::new(&mem, PagingLevels::Five, TABLES, TABLES_END).unwrap();
    let va = 0x00ff_8000_0000_0000 | 0x1000; // bit 55 set, canonical in 57-bit space.
    b.map(va, 0x5000, PAGE_SIZE_4K, RW_USER).unwrap();
    let t = walk(&mem, b.root(), va + 8, USER_READ, &cfg(PagingLevels::Five)).unwrap();
    assert_eq!(t.phys_addr, 0x5008);
    // The same address is not canonical for 4-level paging.
    assert_eq!(
        walk(&mem, b.root(), va, USER_READ, &cfg(PagingLevels::Four)),
        Err(WalkFault::NonCanonical)
    );
}

#[test]
fn non_canonical_addresses_fault_before_any_memory_access() {
    let mem = memory();
    // Root outside memory: a canonical check that touched memory would report TableOutsideMemory.
    let root = 0x1_0000_0000;
    for (levels, va) in [
        (PagingLevels::Four, 0x0000_8000_0000_0000u64),
        (PagingLevels::Four, 0xffff_7fff_ffff_ffff),
        (PagingLevels::Five, 0x0100_0000_0000_0000),
        (PagingLevels::Five, 0xfeff_ffff_ffff_ffff),
    ] {
        assert_eq!(
            walk(&mem, root, va, USER_READ, &cfg(levels)),
            Err(WalkFault::NonCanonical),
            "{levels:?} {va:#x}"
        );
    }
    // Kernel half is canonical and goes on to read the root table.
    assert_eq!(
        walk(
            &mem,
            root,
            0xffff_8000_0000_0000,
            AccessType::READ,
            &cfg(PagingLevels::Four)
        ),
        Err(WalkFault::TableOutsideMemory {
            addr: root + 256 * 8
        })
    );
}

#[test]
fn not_present_is_reported_at_the_level_it_occurs() {
    let mem = memory();
    let mut b = PageTableBuilder::new(&mem, PagingLevels::Four, TABLES, TABLES_END).unwrap();
    let va = 0x4000_0000_0000u64 + 0x20_1000;
    b.map(va, 0x7000, PAGE_SIZE_4K, RW_USER).unwrap();
    let c = cfg(PagingLevels::Four);
    for level in 1..=4u8 {
        let addr = b.entry_addr(va, level).unwrap();
        let saved = b.read_entry(addr).unwrap();
        b.write_entry(addr, saved & !entry::PRESENT).unwrap();
        assert_eq!(
            walk(&mem, b.root(), va, USER_READ, &c),
            Err(WalkFault::NotPresent { level })
        );
        b.write_entry(addr, saved).unwrap();
    }
    // Neighbouring page never mapped.
    assert_eq!(
        walk(&mem, b.root(), va + PAGE_SIZE_4K, USER_READ, &c),
        Err(WalkFault::NotPresent { level: 1 })
    );
}

#[test]
fn reserved_bits_fault_with_their_level() {
    let mem = memory();
    let mut b = PageTableBuilder::new(&mem, PagingLevels::Four, TABLES, TABLES_END).unwrap();
    let va_4k = 0x1000_0000_0000u64;
    let va_2m = 0x2000_0000_0000u64;
    let va_1g = 0x3000_0000_0000u64;
    b.map(va_4k, 0x8000, PAGE_SIZE_4K, RW_USER).unwrap();
    b.map(va_2m, 0x40_0000, PAGE_SIZE_2M, RW_USER).unwrap();
    b.map(va_1g, 0x4000_0000, PAGE_SIZE_1G, RW_USER).unwrap();
    let narrow = WalkConfig {
        phys_addr_bits: 39,
        ..cfg(PagingLevels::Four)
    };

    let cases: [(u64, u8, u64, WalkConfig); 8] = [
        // Address bit above MAXPHYADDR in a PTE and in a PML4E.
        (va_4k, 1, 1 << 40, narrow),
        (va_4k, 4, 1 << 45, narrow),
        // XD without NXE.
        (
            va_4k,
            1,
            entry::EXECUTE_DISABLE,
            WalkConfig {
                nxe: false,
                ..narrow
            },
        ),
        // PS in a PML4E.
        (va_4k, 4, entry::PAGE_SIZE, narrow),
        // Low address bits of a 2 MiB page (bit 13) and of a 1 GiB page (bit 29).
        (va_2m, 2, 1 << 13, narrow),
        (va_1g, 3, 1 << 29, narrow),
        // 1 GiB page where 1 GiB pages are not supported.
        (
            va_1g,
            3,
            0,
            WalkConfig {
                page_1g: false,
                ..narrow
            },
        ),
        // Bit 51 even with a 52-bit physical address width is fine; 1 << 40 with 39 bits is not.
        (va_2m, 3, 1 << 40, narrow),
    ];
    for (va, level, bit, c) in cases {
        let addr = b.entry_addr(va, level).unwrap();
        let saved = b.read_entry(addr).unwrap();
        b.write_entry(addr, saved | bit).unwrap();
        assert_eq!(
            walk(&mem, b.root(), va, USER_READ, &c),
            Err(WalkFault::ReservedBit { level }),
            "va {va:#x} level {level} bit {bit:#x}"
        );
        b.write_entry(addr, saved).unwrap();
    }
    // The PAT bit of a large page is not reserved.
    let addr = b.entry_addr(va_2m, 2).unwrap();
    let saved = b.read_entry(addr).unwrap();
    b.write_entry(addr, saved | entry::LARGE_PAT).unwrap();
    assert!(walk(&mem, b.root(), va_2m, USER_READ, &narrow).is_ok());
    // The ignored bits 62:52 are not reserved either.
    b.write_entry(addr, saved | (0x7ff << 52)).unwrap();
    assert!(walk(&mem, b.root(), va_2m, USER_READ, &narrow).is_ok());
}

#[test]
fn access_rights_follow_the_sdm() {
    let mem = memory();
    let mut b = PageTableBuilder::new(&mem, PagingLevels::Four, TABLES, TABLES_END).unwrap();
    let ro_user = 0x1000_0000u64;
    let rw_super = 0x2000_0000u64;
    let xd_user = 0x3000_0000u64;
    let user_under_super_table = 0x4000_0000u64;
    b.map(ro_user, 0x1000, PAGE_SIZE_4K, entry::USER).unwrap();
    b.map(rw_super, 0x2000, PAGE_SIZE_4K, entry::WRITABLE)
        .unwrap();
    b.map(
        xd_user,
        0x3000,
        PAGE_SIZE_4K,
        RW_USER | entry::EXECUTE_DISABLE,
    )
    .unwrap();
    b.map(user_under_super_table, 0x4000, PAGE_SIZE_4K, RW_USER)
        .unwrap();
    // Clear U/S in the PDE above the last page: the page is supervisor-only.
    let pde = b.entry_addr(user_under_super_table, 2).unwrap();
    b.write_entry(pde, b.read_entry(pde).unwrap() & !entry::USER)
        .unwrap();

    let c = cfg(PagingLevels::Four);
    let no_wp = WalkConfig {
        write_protect: false,
        ..c
    };
    let no_nx = WalkConfig { nxe: false, ..c };
    let smep = WalkConfig { smep: true, ..c };
    let smap = WalkConfig { smap: true, ..c };
    let root = b.root();
    let prot = |violation| {
        Err(WalkFault::Protection {
            level: 1,
            violation,
        })
    };
    use Violation::*;
    let cases: [(u64, AccessType, WalkConfig, Result<(), WalkFault>); 16] = [
        (ro_user, USER_WRITE, c, prot(Write)),
        (rw_super, USER_READ, c, prot(User)),
        (user_under_super_table, USER_READ, c, prot(User)),
        (xd_user, USER_EXEC, c, prot(Execute)),
        (xd_user, SUPER_EXEC, c, prot(Execute)),
        // Supervisor write to a read-only page: faults only with CR0.WP.
        (ro_user, AccessType::WRITE, c, prot(Write)),
        (ro_user, AccessType::WRITE, no_wp, Ok(())),
        // Without NXE, XD is reserved rather than a protection.
        (
            xd_user,
            USER_EXEC,
            no_nx,
            Err(WalkFault::ReservedBit { level: 1 }),
        ),
        // SMEP: supervisor fetch from a user page.
        (ro_user, SUPER_EXEC, c, Ok(())),
        (ro_user, SUPER_EXEC, smep, prot(SupervisorExecute)),
        (rw_super, SUPER_EXEC, smep, Ok(())),
        // SMAP: supervisor data access to a user page.
        (ro_user, AccessType::READ, c, Ok(())),
        (ro_user, AccessType::READ, smap, prot(SupervisorAccess)),
        (rw_super, AccessType::WRITE, smap, Ok(())),
        (rw_super, AccessType::WRITE, c, Ok(())),
        (user_under_super_table, AccessType::READ, smap, Ok(())),
    ];
    for (va, access, cfg, expected) in cases {
        assert_eq!(
            walk(&mem, root, va, access, &cfg).map(|_| ()),
            expected,
            "va {va:#x} {access:?} {cfg:?}"
        );
    }
    // A protection fault on a large page reports the leaf level.
    b.map(0x8000_0000, 0x20_0000, PAGE_SIZE_2M, entry::USER)
        .unwrap();
    assert_eq!(
        walk(&mem, root, 0x8000_0000, USER_WRITE, &c),
        Err(WalkFault::Protection {
            level: 2,
            violation: Write
        })
    );
}

#[test]
fn page_fault_error_codes() {
    let c = cfg(PagingLevels::Four);
    let np = WalkFault::NotPresent { level: 2 };
    let rsvd = WalkFault::ReservedBit { level: 1 };
    let prot = WalkFault::Protection {
        level: 1,
        violation: Violation::Write,
    };
    assert_eq!(np.page_fault_error_code(USER_WRITE, &c), Some(0b110));
    assert_eq!(np.page_fault_error_code(AccessType::READ, &c), Some(0));
    assert_eq!(rsvd.page_fault_error_code(USER_READ, &c), Some(0b1101));
    assert_eq!(
        prot.page_fault_error_code(AccessType::WRITE, &c),
        Some(0b11)
    );
    assert_eq!(prot.page_fault_error_code(USER_EXEC, &c), Some(0b10101));
    let legacy = WalkConfig {
        nxe: false,
        smep: false,
        ..c
    };
    assert_eq!(prot.page_fault_error_code(USER_EXEC, &legacy), Some(0b101));
    assert_eq!(
        WalkFault::NonCanonical.page_fault_error_code(USER_READ, &c),
        None
    );
}

#[test]
fn accessed_and_dirty_are_set_only_on_success() {
    let mem = memory();
    let mut b = PageTableBuilder::new(&mem, PagingLevels::Four, TABLES, TABLES_END).unwrap();
    let va = 0x7f00_0000_0000u64;
    b.map(va, 0x9000, PAGE_SIZE_4K, RW_USER).unwrap();
    b.map(va + PAGE_SIZE_4K, 0xa000, PAGE_SIZE_4K, entry::USER)
        .unwrap();
    // Strip A from the intermediate entries so we can see the walker set them.
    for level in 2..=4 {
        let a = b.entry_addr(va, level).unwrap();
        b.write_entry(a, b.read_entry(a).unwrap() & !entry::ACCESSED)
            .unwrap();
    }
    let pte = b.entry_addr(va, 1).unwrap();
    let pte_ro = b.entry_addr(va + PAGE_SIZE_4K, 1).unwrap();
    let c = cfg(PagingLevels::Four);

    // A failed write to the read-only page changes nothing.
    assert!(walk(&mem, b.root(), va + PAGE_SIZE_4K, USER_WRITE, &c).is_err());
    assert_eq!(
        b.read_entry(pte_ro).unwrap(),
        0xa000 | entry::USER | entry::PRESENT
    );
    for level in 2..=4 {
        let a = b.entry_addr(va, level).unwrap();
        assert_eq!(b.read_entry(a).unwrap() & entry::ACCESSED, 0);
    }

    // A read sets A everywhere, D nowhere.
    let t = walk(&mem, b.root(), va, USER_READ, &c).unwrap();
    assert!(!t.dirty);
    for level in 1..=4 {
        let e = b.read_entry(b.entry_addr(va, level).unwrap()).unwrap();
        assert_eq!(e & entry::ACCESSED, entry::ACCESSED, "level {level}");
        assert_eq!(e & entry::DIRTY, 0, "level {level}");
    }
    // A write sets D in the leaf only.
    let t = walk(&mem, b.root(), va, USER_WRITE, &c).unwrap();
    assert!(t.dirty);
    assert_eq!(
        b.read_entry(pte).unwrap(),
        0x9000 | RW_USER | entry::PRESENT | entry::ACCESSED | entry::DIRTY
    );
    assert_eq!(
        b.read_entry(b.entry_addr(va, 2).unwrap()).unwrap() & entry::DIRTY,
        0
    );
    // A walk with updates disabled leaves memory alone.
    let pte2 = b.entry_addr(va + PAGE_SIZE_4K, 1).unwrap();
    let quiet = WalkConfig {
        set_accessed_dirty: false,
        ..c
    };
    walk(&mem, b.root(), va + PAGE_SIZE_4K, USER_READ, &quiet).unwrap();
    assert_eq!(b.read_entry(pte2).unwrap() & entry::ACCESSED, 0);
    assert_eq!(TABLE_FLAGS & entry::DIRTY, 0);
}

#[test]
fn table_outside_memory_reports_the_entry_address() {
    let mem = memory();
    let mut b = PageTableBuilder::new(&mem, PagingLevels::Four, TABLES, TABLES_END).unwrap();
    let va = 0x1234_5000u64;
    b.map(va, 0xb000, PAGE_SIZE_4K, RW_USER).unwrap();
    // Point the PDE at a table beyond the end of guest memory.
    let pde = b.entry_addr(va, 2).unwrap();
    b.write_entry(pde, 0x1_0000_0000 | TABLE_FLAGS).unwrap();
    assert_eq!(
        walk(&mem, b.root(), va, USER_READ, &cfg(PagingLevels::Four)),
        Err(WalkFault::TableOutsideMemory {
            addr: 0x1_0000_0000 + ((va >> 12) & 0x1ff) * 8
        })
    );
}

/// Memory whose entry at `victim` is rewritten by "another CPU" on the first compare-exchange.
struct Racing<'a> {
    inner: GuestTables<'a, GuestMemoryMmap<()>>,
    victim: u64,
    replacement: u64,
    races_left: Cell<u32>,
}

impl PageTableMemory for Racing<'_> {
    fn read_entry(&self, addr: u64) -> Result<u64, WalkFault> {
        self.inner.read_entry(addr)
    }

    fn compare_exchange_entry(
        &self,
        addr: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, WalkFault> {
        if addr == self.victim && self.races_left.get() > 0 {
            self.races_left.set(self.races_left.get() - 1);
            self.inner
                .0
                .write_obj(self.replacement, GuestAddress(addr))
                .unwrap();
        }
        self.inner.compare_exchange_entry(addr, current, new)
    }
}

#[test]
fn an_entry_changed_during_the_update_restarts_the_walk() {
    let mem = memory();
    let mut b = PageTableBuilder::new(&mem, PagingLevels::Four, TABLES, TABLES_END).unwrap();
    let va = 0x5000_0000u64;
    b.map(va, 0xc000, PAGE_SIZE_4K, RW_USER).unwrap();
    let pte = b.entry_addr(va, 1).unwrap();
    // The guest remaps the page (new frame) between our read and our A update.
    let racing = Racing {
        inner: GuestTables(&mem),
        victim: pte,
        replacement: 0xd000 | RW_USER | entry::PRESENT,
        races_left: Cell::new(1),
    };
    let c = cfg(PagingLevels::Four);
    let t = walk_with(&racing, b.root(), va, USER_READ, &c).unwrap();
    assert_eq!(t.phys_addr, 0xd000);
    assert_eq!(
        b.read_entry(pte).unwrap(),
        0xd000 | RW_USER | entry::PRESENT | entry::ACCESSED
    );

    // A CPU that only sets A concurrently does not force a restart and loses nothing.
    let racing = Racing {
        inner: GuestTables(&mem),
        victim: pte,
        replacement: 0xd000 | RW_USER | entry::PRESENT | entry::ACCESSED,
        races_left: Cell::new(1),
    };
    let t = walk_with(&racing, b.root(), va, USER_WRITE, &c).unwrap();
    assert!(t.dirty);
    assert_eq!(
        b.read_entry(pte).unwrap(),
        0xd000 | RW_USER | entry::PRESENT | entry::ACCESSED | entry::DIRTY
    );

    // Tables that never stop changing: the walk gives up instead of spinning.
    b.write_entry(pte, 0xc000 | RW_USER | entry::PRESENT)
        .unwrap();
    let racing = Racing {
        inner: GuestTables(&mem),
        victim: pte,
        replacement: 0xc000 | RW_USER | entry::PRESENT,
        races_left: Cell::new(u32::MAX),
    };
    // Each race rewrites the same value, but bit-identical rewrites still leave A clear, so
    // alternate the frame to make every compare-exchange fail.
    struct Flipping<'a>(Racing<'a>, Cell<bool>);
    impl PageTableMemory for Flipping<'_> {
        fn read_entry(&self, addr: u64) -> Result<u64, WalkFault> {
            self.0.read_entry(addr)
        }
        fn compare_exchange_entry(
            &self,
            addr: u64,
            current: u64,
            new: u64,
        ) -> Result<Result<u64, u64>, WalkFault> {
            self.1.set(!self.1.get());
            let frame = if self.1.get() { 0xe000 } else { 0xf000 };
            self.0
                .inner
                .0
                .write_obj(frame | RW_USER | entry::PRESENT, GuestAddress(addr))
                .unwrap();
            self.0.inner.compare_exchange_entry(addr, current, new)
        }
    }
    let flipping = Flipping(racing, Cell::new(false));
    assert_eq!(
        walk_with(&flipping, b.root(), va, USER_READ, &c),
        Err(WalkFault::Contended)
    );
}

#[test]
fn builder_rejects_bad_requests() {
    let mem = memory();
    let mut b = PageTableBuilder::new(&mem, PagingLevels::Four, TABLES, TABLES + 0x3000).unwrap();
    assert_eq!(
        b.map(0x1000, 0x1000, 0x3000, 0),
        Err(builder::BuildError::BadPage)
    );
    assert_eq!(
        b.map(0x1000, 0x1000, PAGE_SIZE_2M, 0),
        Err(builder::BuildError::BadPage)
    );
    b.map(0, 0, PAGE_SIZE_2M, 0).unwrap();
    assert_eq!(
        b.map(0x1000, 0x1000, PAGE_SIZE_4K, 0),
        Err(builder::BuildError::Conflict)
    );
    assert_eq!(
        b.map(1 << 39, 0x1000, PAGE_SIZE_4K, 0),
        Err(builder::BuildError::OutOfTableSpace)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any set of 4 KiB mappings translates back to the frames it was built with, and an
    /// unmapped neighbour is reported not present.
    #[test]
    fn random_mappings_round_trip(
        pages in proptest::collection::btree_map(0u64..(1 << 35), 0u64..(1 << 28), 1..16),
        offset in 0u64..PAGE_SIZE_4K,
    ) {
        let mem = memory();
        let mut b = PageTableBuilder::new(&mem, PagingLevels::Four, TABLES, TABLES_END).unwrap();
        for (&vpn, &pfn) in &pages {
            b.map(vpn << 12, pfn << 12, PAGE_SIZE_4K, RW_USER).unwrap();
        }
        let c = cfg(PagingLevels::Four);
        for (&vpn, &pfn) in &pages {
            let t = walk(&mem, b.root(), (vpn << 12) | offset, USER_READ, &c).unwrap();
            prop_assert_eq!(t.phys_addr, (pfn << 12) | offset);
            if !pages.contains_key(&(vpn ^ 1)) {
                prop_assert_eq!(
                    walk(&mem, b.root(), (vpn ^ 1) << 12, USER_READ, &c),
                    Err(WalkFault::NotPresent { level: 1 })
                );
            }
        }
    }

    /// Arbitrary bytes as page tables never panic the walker.
    #[test]
    fn garbage_tables_never_panic(
        entries in proptest::collection::vec(any::<u64>(), 64),
        va in any::<u64>(),
        write: bool, user: bool, execute: bool, five: bool,
    ) {
        let mem = memory();
        // Fill the first 64 entries of several tables with garbage, pointing into low memory
        // half the time so the walk continues.
        for table in 0..4u64 {
            for (i, e) in entries.iter().enumerate() {
                let e = if i % 2 == 0 { e & 0x3f_f1ff } else { *e };
                mem.write_obj(e, GuestAddress(table * 0x1000 + (i as u64) * 8)).unwrap();
            }
        }
        let c = cfg(if five { PagingLevels::Five } else { PagingLevels::Four });
        let _ = walk(&mem, 0, va, AccessType { write, user, execute }, &c);
    }
}
