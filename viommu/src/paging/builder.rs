// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Builds IA-32e page tables in guest memory, the way an OS does: intermediate entries
//! P|R/W|U/S|A, leaves with the caller's flags. For tests, benchmarks and micro-guests.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{entry, entry_address, PagingLevels, PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K};

/// Flags of a non-leaf entry written by [`PageTableBuilder`] (Linux's `_PAGE_TABLE` minus D).
pub const TABLE_FLAGS: u64 = entry::PRESENT | entry::WRITABLE | entry::USER | entry::ACCESSED;

/// Errors from [`PageTableBuilder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The area reserved for tables is used up.
    #[error("no room left for page tables")]
    OutOfTableSpace,
    /// A table or entry address is not backed by guest memory.
    #[error("guest memory access at {0:#x} failed")]
    Memory(u64),
    /// Page size not 4 KiB, 2 MiB or 1 GiB, or an address not aligned to it.
    #[error("bad page size or alignment")]
    BadPage,
    /// A large page already covers the address, so no table can be placed there.
    #[error("address already mapped by a large page")]
    Conflict,
}

/// Allocates tables from a range of guest memory and maps pages into them.
#[derive(Debug)]
pub struct PageTableBuilder<'a, M: GuestMemory + ?Sized> {
    mem: &'a M,
    levels: PagingLevels,
    root: u64,
    next_table: u64,
    table_end: u64,
}

impl<'a, M: GuestMemory + ?Sized> PageTableBuilder<'a, M> {
    /// New, empty tables; tables are allocated from `[table_area, table_area_end)`, which must be
    /// 4 KiB aligned guest RAM.
    pub fn new(
        mem: &'a M,
        levels: PagingLevels,
        table_area: u64,
        table_area_end: u64,
    ) -> Result<Self, BuildError> {
        let mut builder = PageTableBuilder {
            mem,
            levels,
            root: 0,
            next_table: table_area,
            table_end: table_area_end,
        };
        builder.root = builder.alloc_table()?;
        Ok(builder)
    }

    /// Physical address of the root (PML4 or PML5) table.
    pub fn root(&self) -> u64 {
        self.root
    }

    fn alloc_table(&mut self) -> Result<u64, BuildError> {
        if self.next_table & (PAGE_SIZE_4K - 1) != 0
            || self.next_table + PAGE_SIZE_4K > self.table_end
        {
            return Err(BuildError::OutOfTableSpace);
        }
        let table = self.next_table;
        self.mem
            .write_slice(&[0u8; PAGE_SIZE_4K as usize], GuestAddress(table))
            .map_err(|_| BuildError::Memory(table))?;
        self.next_table += PAGE_SIZE_4K;
        Ok(table)
    }

    fn read(&self, addr: u64) -> Result<u64, BuildError> {
        self.mem
            .read_obj(GuestAddress(addr))
            .map_err(|_| BuildError::Memory(addr))
    }

    /// Write the raw entry at `addr`.
    pub fn write_entry(&self, addr: u64, value: u64) -> Result<(), BuildError> {
        self.mem
            .write_obj(value, GuestAddress(addr))
            .map_err(|_| BuildError::Memory(addr))
    }

    /// Read the raw entry at `addr`.
    pub fn read_entry(&self, addr: u64) -> Result<u64, BuildError> {
        self.read(addr)
    }

    /// Map `va` to `pa` with a page of `page_size` and leaf `flags` (P is added; PS is added for
    /// large pages). Intermediate entries are created with [`TABLE_FLAGS`].
    pub fn map(&mut self, va: u64, pa: u64, page_size: u64, flags: u64) -> Result<(), BuildError> {
        let leaf_level = match page_size {
            PAGE_SIZE_4K => 1,
            PAGE_SIZE_2M => 2,
            PAGE_SIZE_1G => 3,
            _ => return Err(BuildError::BadPage),
        };
        if va & (page_size - 1) != 0 || pa & (page_size - 1) != 0 {
            return Err(BuildError::BadPage);
        }
        let mut table = self.root;
        for level in (leaf_level + 1..=self.levels.count()).rev() {
            let addr = entry_address(table, va, level);
            let value = self.read(addr)?;
            if value & entry::PRESENT == 0 {
                let next = self.alloc_table()?;
                self.write_entry(addr, next | TABLE_FLAGS)?;
                table = next;
            } else if value & entry::PAGE_SIZE != 0 && level <= 3 {
                return Err(BuildError::Conflict);
            } else {
                table = value & entry::ADDRESS_MASK;
            }
        }
        let mut leaf = pa | flags | entry::PRESENT;
        if leaf_level > 1 {
            leaf |= entry::PAGE_SIZE;
        }
        self.write_entry(entry_address(table, va, leaf_level), leaf)
    }

    /// Address of the entry at `level` (1 = PTE ... 5 = PML5E) used to translate `va`, if the
    /// tables above it are present.
    pub fn entry_addr(&self, va: u64, level: u8) -> Option<u64> {
        let mut table = self.root;
        for l in (level + 1..=self.levels.count()).rev() {
            let value = self.read(entry_address(table, va, l)).ok()?;
            if value & entry::PRESENT == 0 || (l <= 3 && value & entry::PAGE_SIZE != 0) {
                return None;
            }
            table = value & entry::ADDRESS_MASK;
        }
        Some(entry_address(table, va, level))
    }
}
