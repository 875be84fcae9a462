// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! VT-d second-stage translation (VT-d 9.8 format: R/W/X bits, 4-level, 4 KiB / 2 MiB / 1 GiB)
//! and nested translation (first-stage tables whose addresses go through the second stage).

use std::cell::Cell;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::fault::FaultReason;
use crate::paging::{
    compare_exchange_u64, entry_address, level_page_size, walk_with, AccessType, PageTableMemory,
    Translation, WalkConfig, WalkFault,
};
use crate::regs::HOST_ADDRESS_WIDTH;

/// Second-stage entry bits.
pub mod sl_entry {
    /// R: read allowed.
    pub const READ: u64 = 1 << 0;
    /// W: write allowed.
    pub const WRITE: u64 = 1 << 1;
    /// X: execute allowed (with SLEE).
    pub const EXECUTE: u64 = 1 << 2;
    /// PS: the entry maps a 2 MiB (level 2) or 1 GiB (level 3) page.
    pub const PAGE_SIZE: u64 = 1 << 7;
    /// Bits 51:12: address.
    pub const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
    /// Reserved in every entry: bit 11 and bit 62.
    pub const RESERVED: u64 = (1 << 11) | (1 << 62);
}

/// Levels of the (only supported) 4-level second stage.
const SL_LEVELS: u8 = 4;
/// Input-address width of 4-level second-stage tables.
const SL_INPUT_BITS: u32 = 48;

/// A second-stage (or nested) translation: the translation and whether reads are allowed
/// (second-stage entries can be write-only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageTranslation {
    /// The translation.
    pub translation: Translation,
    /// R=1 at every second-stage level.
    pub readable: bool,
}

/// Result of a second-stage or nested translation.
pub type SecondStageResult = Result<StageTranslation, FaultReason>;

/// Translate `addr` through the second-stage tables at `root`. `slee` enables the X bit check
/// for execute requests. Second-stage A/D flags are not supported (ECAP.SLADS=0), so the
/// tables are only read.
pub fn translate<M: GuestMemory + ?Sized>(
    mem: &M,
    root: u64,
    addr: u64,
    access: AccessType,
    slee: bool,
) -> SecondStageResult {
    if addr >> SL_INPUT_BITS != 0 {
        return Err(FaultReason::AddressBeyondMax);
    }
    let reserved_hi = sl_entry::ADDRESS_MASK & !((1u64 << HOST_ADDRESS_WIDTH) - 1);
    let mut table = root & sl_entry::ADDRESS_MASK;
    let (mut read, mut write, mut exec) = (true, true, true);
    let mut level = SL_LEVELS;
    loop {
        let entry_addr = entry_address(table, addr, level);
        let e: u64 = mem
            .read_obj(GuestAddress(entry_addr))
            .map_err(|_| FaultReason::SecondStageAccess)?;
        if e & (sl_entry::READ | sl_entry::WRITE) == 0 {
            return Err(FaultReason::SecondStagePermission);
        }
        let large = e & sl_entry::PAGE_SIZE != 0;
        let mut reserved = sl_entry::RESERVED | reserved_hi;
        match level {
            4 => reserved |= sl_entry::PAGE_SIZE,
            3 | 2 if large => reserved |= (level_page_size(level) - 1) & sl_entry::ADDRESS_MASK,
            _ => {}
        }
        if e & reserved != 0 {
            return Err(FaultReason::SecondStageReserved);
        }
        read &= e & sl_entry::READ != 0;
        write &= e & sl_entry::WRITE != 0;
        exec &= e & sl_entry::EXECUTE != 0;
        if level == 1 || large {
            let page_size = level_page_size(level);
            let denied = (access.write && !write)
                || (!access.write && !read)
                || (access.execute && slee && !exec);
            if denied {
                return Err(FaultReason::SecondStagePermission);
            }
            return Ok(StageTranslation {
                translation: Translation {
                    phys_addr: (e & sl_entry::ADDRESS_MASK & !(page_size - 1))
                        | (addr & (page_size - 1)),
                    page_size,
                    writable: write,
                    user: true,
                    executable: !slee || exec,
                    dirty: true,
                },
                readable: read,
            });
        }
        table = e & sl_entry::ADDRESS_MASK;
        level -= 1;
    }
}

/// First-stage tables living in guest-physical space that the second stage maps
/// (nested translation). Remembers the second-stage fault that stopped the walk.
struct NestedTables<'a, M: GuestMemory + ?Sized> {
    mem: &'a M,
    sl_root: u64,
    fl_root: u64,
    fault: Cell<Option<FaultReason>>,
}

impl<M: GuestMemory + ?Sized> NestedTables<'_, M> {
    fn host_address(&self, gpa: u64, write: bool) -> Result<u64, WalkFault> {
        let access = AccessType {
            write,
            user: false,
            execute: false,
        };
        match translate(self.mem, self.sl_root, gpa, access, false) {
            Ok(t) => Ok(t.translation.phys_addr),
            Err(reason) => {
                let reason = match reason {
                    FaultReason::SecondStagePermission if write => {
                        FaultReason::FirstStageWriteNested
                    }
                    FaultReason::SecondStagePermission
                        if gpa & !0xfff == self.fl_root & sl_entry::ADDRESS_MASK =>
                    {
                        FaultReason::FirstStageRootReadNested
                    }
                    FaultReason::SecondStagePermission => FaultReason::FirstStageReadNested,
                    FaultReason::AddressBeyondMax => FaultReason::FirstStageBeyondMgawNested,
                    other => other,
                };
                self.fault.set(Some(reason));
                Err(WalkFault::TableOutsideMemory { addr: gpa })
            }
        }
    }
}

impl<M: GuestMemory + ?Sized> PageTableMemory for NestedTables<'_, M> {
    fn read_entry(&self, addr: u64) -> Result<u64, WalkFault> {
        let hpa = self.host_address(addr, false)?;
        self.mem
            .read_obj(GuestAddress(hpa))
            .map_err(|_| WalkFault::TableOutsideMemory { addr: hpa })
    }

    fn compare_exchange_entry(
        &self,
        addr: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, WalkFault> {
        let hpa = self.host_address(addr, true)?;
        compare_exchange_u64(self.mem, hpa, current, new)
            .ok_or(WalkFault::TableOutsideMemory { addr: hpa })
    }
}

/// Nested translation: walk the first stage at `fl_root` (a guest-physical address) with
/// every table access translated by the second stage at `sl_root`, then translate the
/// first stage's output through the second stage. The result's page size is the smaller of
/// the two stages' pages.
pub fn translate_nested<M: GuestMemory + ?Sized>(
    mem: &M,
    fl_root: u64,
    sl_root: u64,
    addr: u64,
    access: AccessType,
    cfg: &WalkConfig,
    slee: bool,
) -> SecondStageResult {
    let tables = NestedTables {
        mem,
        sl_root,
        fl_root,
        fault: Cell::new(None),
    };
    let first = walk_with(&tables, fl_root, addr, access, cfg).map_err(|f| {
        tables
            .fault
            .get()
            .unwrap_or_else(|| FaultReason::from_first_stage(&f))
    })?;
    let second = translate(mem, sl_root, first.phys_addr, access, slee)?;
    let page_size = first.page_size.min(second.translation.page_size);
    Ok(StageTranslation {
        translation: Translation {
            phys_addr: second.translation.phys_addr,
            page_size,
            writable: first.writable && second.translation.writable,
            user: first.user,
            executable: first.executable && second.translation.executable,
            dirty: first.dirty,
        },
        readable: second.readable,
    })
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::paging::builder::PageTableBuilder;
    use crate::paging::{entry, PagingLevels, PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K};

    const RW: u64 = sl_entry::READ | sl_entry::WRITE;

    /// Second-stage tables built with the first-stage builder: an SL entry with R|W looks like
    /// P|R/W to it, and PS sits at the same bit.
    fn mem() -> GuestMemoryMmap<()> {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap()
    }

    fn sl_builder(m: &GuestMemoryMmap<()>) -> PageTableBuilder<'_, GuestMemoryMmap<()>> {
        PageTableBuilder::new(m, PagingLevels::Four, 0x10_0000, 0x18_0000).unwrap()
    }

    /// The builder writes intermediate entries with U/S and A (bits 2, 5); in second-stage
    /// format bit 2 is X and bit 5 is ignored, which is fine for these tests.
    const READ: AccessType = AccessType::READ;
    const WRITE: AccessType = AccessType::WRITE;

    #[test]
    fn second_stage_page_sizes_and_permissions() {
        let m = mem();
        let mut b = sl_builder(&m);
        b.map(0x1000, 0x40_0000, PAGE_SIZE_4K, RW).unwrap();
        b.map(0x20_0000, 0x60_0000, PAGE_SIZE_2M, sl_entry::READ)
            .unwrap();
        b.map(0x4000_0000, 0x8000_0000, PAGE_SIZE_1G, RW).unwrap();
        let root = b.root();

        let t = translate(&m, root, 0x1234, WRITE, false)
            .unwrap()
            .translation;
        assert_eq!((t.phys_addr, t.page_size), (0x40_0234, PAGE_SIZE_4K));
        let t = translate(&m, root, 0x2f_ffff, READ, false)
            .unwrap()
            .translation;
        assert_eq!(
            (t.phys_addr, t.page_size, t.writable),
            (0x6f_ffff, PAGE_SIZE_2M, false)
        );
        let t = translate(&m, root, 0x4000_1000, READ, false)
            .unwrap()
            .translation;
        assert_eq!((t.phys_addr, t.page_size), (0x8000_1000, PAGE_SIZE_1G));

        assert_eq!(
            translate(&m, root, 0x20_0000, WRITE, false),
            Err(FaultReason::SecondStagePermission)
        );
        assert_eq!(
            translate(&m, root, 0x3000, READ, false),
            Err(FaultReason::SecondStagePermission)
        );
        assert_eq!(
            translate(&m, root, 1 << 48, READ, false),
            Err(FaultReason::AddressBeyondMax)
        );
        // A write-only leaf refuses reads.
        b.map(0x5000, 0x41_0000, PAGE_SIZE_4K, 0).unwrap();
        let leaf = b.entry_addr(0x5000, 1).unwrap();
        b.write_entry(leaf, 0x41_0000 | sl_entry::WRITE).unwrap();
        assert_eq!(
            translate(&m, root, 0x5000, READ, false),
            Err(FaultReason::SecondStagePermission)
        );
        let w = translate(&m, root, 0x5000, WRITE, false).unwrap();
        assert!(!w.readable && w.translation.writable);
    }

    #[test]
    fn second_stage_reserved_bits_and_bad_tables() {
        let m = mem();
        let mut b = sl_builder(&m);
        b.map(0x1000, 0x40_0000, PAGE_SIZE_4K, RW).unwrap();
        b.map(0x20_0000, 0x60_0000, PAGE_SIZE_2M, RW).unwrap();
        let root = b.root();
        for (va, level, bit) in [
            (0x1000u64, 1u8, 1u64 << 11),
            (0x1000, 1, 1 << 62),
            (0x1000, 1, 1 << 49),
            (0x1000, 4, entry::PAGE_SIZE),
            (0x20_0000, 2, 1 << 12),
        ] {
            let a = b.entry_addr(va, level).unwrap();
            let saved = b.read_entry(a).unwrap();
            b.write_entry(a, saved | bit).unwrap();
            assert_eq!(
                translate(&m, root, va, READ, false),
                Err(FaultReason::SecondStageReserved),
                "level {level} bit {bit:#x}"
            );
            b.write_entry(a, saved).unwrap();
        }
        let a = b.entry_addr(0x1000, 2).unwrap();
        b.write_entry(a, 0x7000_0000 | RW).unwrap();
        assert_eq!(
            translate(&m, root, 0x1000, READ, false),
            Err(FaultReason::SecondStageAccess)
        );
    }

    #[test]
    fn nested_translation_goes_through_both_stages() {
        let m = mem();
        // Second stage: identity-map the first 4 MiB (the first-stage tables live at GPA
        // 0x20_0000..), and map GPA 0x60_0000.. to HPA 0x50_0000...
        let mut sl = sl_builder(&m);
        sl.map(0, 0, PAGE_SIZE_2M, RW).unwrap();
        sl.map(0x20_0000, 0x20_0000, PAGE_SIZE_2M, RW).unwrap();
        for i in 0..16u64 {
            sl.map(
                0x60_0000 + i * PAGE_SIZE_4K,
                0x50_0000 + i * PAGE_SIZE_4K,
                PAGE_SIZE_4K,
                RW,
            )
            .unwrap();
        }
        // First stage, tables in GPA 0x20_0000.., mapping VA 0x1000 to GPA 0x60_3000.
        let mut fl = PageTableBuilder::new(&m, PagingLevels::Four, 0x20_0000, 0x28_0000).unwrap();
        fl.map(
            0x1000,
            0x60_3000,
            PAGE_SIZE_4K,
            entry::WRITABLE | entry::USER,
        )
        .unwrap();
        let cfg = WalkConfig::default();
        let user_write = WRITE.as_user();
        let t =
            translate_nested(&m, fl.root(), sl.root(), 0x1abc, user_write, &cfg, false).unwrap();
        assert_eq!(t.translation.phys_addr, 0x50_3abc);
        assert_eq!(t.translation.page_size, PAGE_SIZE_4K);
        // The first stage's A/D bits were written through the second stage.
        let pte = fl.entry_addr(0x1000, 1).unwrap();
        assert_eq!(
            fl.read_entry(pte).unwrap() & (entry::ACCESSED | entry::DIRTY),
            entry::ACCESSED | entry::DIRTY
        );

        // First-stage fault keeps its first-stage reason.
        assert_eq!(
            translate_nested(&m, fl.root(), sl.root(), 0x5000, user_write, &cfg, false),
            Err(FaultReason::FirstStageNotPresent)
        );
        // First-stage output not mapped by the second stage.
        fl.map(0x2000, 0x70_0000, PAGE_SIZE_4K, entry::USER)
            .unwrap();
        assert_eq!(
            translate_nested(
                &m,
                fl.root(),
                sl.root(),
                0x2000,
                READ.as_user(),
                &cfg,
                false
            ),
            Err(FaultReason::SecondStagePermission)
        );
        // Make the second stage map the first-stage PT page read-only: A/D update fails.
        let pt_gpa =
            fl.read_entry(fl.entry_addr(0x1000, 2).unwrap()).unwrap() & entry::ADDRESS_MASK;
        let mut sl2 = PageTableBuilder::new(&m, PagingLevels::Four, 0x18_0000, 0x1c_0000).unwrap();
        for gpa in (0x20_0000..0x28_0000).step_by(PAGE_SIZE_4K as usize) {
            let flags = if gpa == pt_gpa { sl_entry::READ } else { RW };
            sl2.map(gpa, gpa, PAGE_SIZE_4K, flags).unwrap();
        }
        fl.write_entry(
            pte,
            0x60_3000 | entry::WRITABLE | entry::USER | entry::PRESENT,
        )
        .unwrap();
        assert_eq!(
            translate_nested(&m, fl.root(), sl2.root(), 0x1000, user_write, &cfg, false),
            Err(FaultReason::FirstStageWriteNested)
        );
        // Root table not mapped by the second stage.
        let sl3 = PageTableBuilder::new(&m, PagingLevels::Four, 0x1c_0000, 0x1d_0000).unwrap();
        assert_eq!(
            translate_nested(&m, fl.root(), sl3.root(), 0x1000, user_write, &cfg, false),
            Err(FaultReason::FirstStageRootReadNested)
        );
    }
}
