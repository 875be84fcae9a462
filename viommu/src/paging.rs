// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! IA-32e page-table walker (4-level and 5-level paging, 4 KiB / 2 MiB / 1 GiB pages).
//!
//! The same format serves two users:
//! - the VT-d model's first-stage translation (a PASID-table entry with PGTT=first-stage points
//!   at a process's CPU page tables, see [`crate::tables::PasidEntry`]);
//! - the VMM's instruction-trap layer, which translates guest-virtual addresses of an emulated
//!   `ENQCMD`/`MOVDIR64B` through the guest CPU's page tables.
//!
//! [`walk`] reads paging-structure entries from guest physical memory, checks reserved bits
//! and access rights the way the Intel SDM (Vol. 3A, 4.5-4.6) describes them, and, when the
//! translation succeeds, sets the accessed flag in every entry it used and the dirty flag in the
//! leaf for a write, each with an 8-byte compare-exchange on guest memory (like the processor's
//! locked update). [`walk_with`] does the same over any [`PageTableMemory`], e.g. memory whose
//! table addresses must themselves be translated (nested translation).
//!
//! A fault carries enough information to build the architectural answer:
//! [`WalkFault::page_fault_error_code`] gives the x86 `#PF` error code, and the VT-d model maps
//! a fault to its first-stage fault reason (0x70-0x72, 0x80-0x86).

use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions, VolatileMemory};

pub mod builder;

/// Size of a 4 KiB page.
pub const PAGE_SIZE_4K: u64 = 1 << 12;
/// Size of a 2 MiB page (PDE with PS=1).
pub const PAGE_SIZE_2M: u64 = 1 << 21;
/// Size of a 1 GiB page (PDPTE with PS=1).
pub const PAGE_SIZE_1G: u64 = 1 << 30;

/// Bits of an IA-32e paging-structure entry.
pub mod entry {
    /// P: the entry maps a table or a page.
    pub const PRESENT: u64 = 1 << 0;
    /// R/W: writes allowed (subject to CR0.WP for supervisor accesses).
    pub const WRITABLE: u64 = 1 << 1;
    /// U/S: user-mode accesses allowed.
    pub const USER: u64 = 1 << 2;
    /// PWT: page-level write-through.
    pub const WRITE_THROUGH: u64 = 1 << 3;
    /// PCD: page-level cache disable.
    pub const CACHE_DISABLE: u64 = 1 << 4;
    /// A: set by the walker when the entry is used for a translation.
    pub const ACCESSED: u64 = 1 << 5;
    /// D: set by the walker in the leaf entry when the page is written.
    pub const DIRTY: u64 = 1 << 6;
    /// PS: the PDPTE maps a 1 GiB page, the PDE a 2 MiB page (reserved in PML4E/PML5E).
    pub const PAGE_SIZE: u64 = 1 << 7;
    /// G: global translation (leaf entries only).
    pub const GLOBAL: u64 = 1 << 8;
    /// PAT bit of a 1 GiB / 2 MiB leaf (bit 7 plays this role in a PTE).
    pub const LARGE_PAT: u64 = 1 << 12;
    /// XD: instruction fetches not allowed (reserved unless IA32_EFER.NXE / PASID-entry NXE).
    pub const EXECUTE_DISABLE: u64 = 1 << 63;
    /// Bits 51:12: physical address of the next table or of the page.
    pub const ADDRESS_MASK: u64 = 0x000f_ffff_ffff_f000;
}

/// Number of paging levels: CR4.LA57 for the CPU, FLPM in a VT-d PASID-table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PagingLevels {
    /// 4-level paging, 48-bit linear addresses (PML4 root).
    Four,
    /// 5-level paging, 57-bit linear addresses (PML5 root).
    Five,
}

impl PagingLevels {
    /// Number of tables walked for a 4 KiB page.
    pub fn count(self) -> u8 {
        match self {
            PagingLevels::Four => 4,
            PagingLevels::Five => 5,
        }
    }

    /// Width of a linear address in bits (48 or 57).
    pub fn address_bits(self) -> u32 {
        12 + 9 * u32::from(self.count())
    }

    /// Whether `va` is canonical: bits 63 down to `address_bits() - 1` all equal.
    pub fn is_canonical(self, va: u64) -> bool {
        let shift = 64 - self.address_bits();
        (((va << shift) as i64) >> shift) as u64 == va
    }
}

/// The access being translated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessType {
    /// A write (a read otherwise; a read-modify-write is a write).
    pub write: bool,
    /// A user-mode access (CPL 3; for VT-d a request without the privileged-mode bit).
    pub user: bool,
    /// An instruction fetch (VT-d: execute-requested).
    pub execute: bool,
}

impl AccessType {
    /// Supervisor data read.
    pub const READ: AccessType = AccessType {
        write: false,
        user: false,
        execute: false,
    };
    /// Supervisor data write.
    pub const WRITE: AccessType = AccessType {
        write: true,
        user: false,
        execute: false,
    };

    /// The same access made from user mode.
    pub fn as_user(self) -> AccessType {
        AccessType { user: true, ..self }
    }
}

/// Paging-mode controls that change how entries are interpreted.
///
/// For the CPU these come from CR0/CR4/EFER/CPUID; for a VT-d PASID-table entry from FLPM, NXE,
/// WPE and CAP.FL1GP (VT-d has no SMAP, and supervisor instruction fetches from user pages are
/// always blocked, i.e. `smep: true`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkConfig {
    /// 4- or 5-level paging.
    pub levels: PagingLevels,
    /// XD bits are honoured (IA32_EFER.NXE); if false, bit 63 is a reserved bit.
    pub nxe: bool,
    /// CR0.WP: supervisor writes honour R/W.
    pub write_protect: bool,
    /// CR4.SMEP: supervisor instruction fetches from user pages fault.
    pub smep: bool,
    /// CR4.SMAP with EFLAGS.AC=0 (or an implicit supervisor access): supervisor data accesses
    /// to user pages fault. The caller folds EFLAGS.AC in.
    pub smap: bool,
    /// Set accessed/dirty flags in guest memory on a successful translation.
    pub set_accessed_dirty: bool,
    /// 1 GiB pages are supported (CPUID PDPE1GB / CAP.FL1GP); if false, PS in a PDPTE is a
    /// reserved bit.
    pub page_1g: bool,
    /// Physical-address width (MAXPHYADDR, or the IOMMU's host address width): entry bits from
    /// here up to 51 are reserved. Clamped to 12..=52.
    pub phys_addr_bits: u8,
}

impl Default for WalkConfig {
    /// A typical Linux x86-64 configuration: 4-level, NXE, WP, 1 GiB pages, 52-bit physical
    /// addresses, accessed/dirty updates on, SMEP/SMAP off.
    fn default() -> Self {
        WalkConfig {
            levels: PagingLevels::Four,
            nxe: true,
            write_protect: true,
            smep: false,
            smap: false,
            set_accessed_dirty: true,
            page_1g: true,
            phys_addr_bits: 52,
        }
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Physical address of the translated byte (page base plus the offset within the page).
    pub phys_addr: u64,
    /// Size of the mapping page: 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// R/W=1 at every level.
    pub writable: bool,
    /// U/S=1 at every level.
    pub user: bool,
    /// No XD at any level (always true when XD is not honoured).
    pub executable: bool,
    /// The leaf's dirty flag is set (after the walk's own update). A cached translation with
    /// `dirty == false` must not be used for a write without walking again.
    pub dirty: bool,
}

impl Translation {
    /// Physical base of the mapping page.
    pub fn page_base(&self) -> u64 {
        self.phys_addr & !(self.page_size - 1)
    }

    /// Physical address of `va` if it lies in the same page as this translation.
    pub fn phys_for(&self, va: u64) -> u64 {
        self.page_base() | (va & (self.page_size - 1))
    }
}

/// Which access right a protection fault violated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// User access to a page with U/S=0 at some level.
    User,
    /// Write to a page with R/W=0 at some level (user, or supervisor with WP).
    Write,
    /// Instruction fetch from a page with XD=1 at some level.
    Execute,
    /// Supervisor instruction fetch from a user page (SMEP).
    SupervisorExecute,
    /// Supervisor data access to a user page (SMAP).
    SupervisorAccess,
}

/// Why a walk did not produce a translation. Levels count from 1 (page table) up to 4 (PML4)
/// or 5 (PML5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkFault {
    /// The entry at `level` has P=0.
    #[error("paging entry not present at level {level}")]
    NotPresent {
        /// Level of the entry.
        level: u8,
    },
    /// The entry at `level` has a reserved bit set.
    #[error("reserved bit set in paging entry at level {level}")]
    ReservedBit {
        /// Level of the entry.
        level: u8,
    },
    /// The translation exists but does not allow the access.
    #[error("protection violation {violation:?} (leaf at level {level})")]
    Protection {
        /// Level of the leaf entry.
        level: u8,
        /// The access right that was missing.
        violation: Violation,
    },
    /// The linear address is not canonical (the CPU raises #GP/#SS, VT-d reason 0x80).
    #[error("non-canonical address")]
    NonCanonical,
    /// A paging-structure entry lies outside guest memory (VT-d reason 0x70).
    #[error("paging structure at {addr:#x} is outside guest memory")]
    TableOutsideMemory {
        /// Physical address of the entry that could not be read or updated.
        addr: u64,
    },
    /// The tables kept changing under the walker while it tried to set accessed/dirty flags;
    /// the translation was given up. The CPU trap layer may simply retry the instruction.
    #[error("paging entries changed during accessed/dirty update")]
    Contended,
}

/// x86 `#PF` error-code bits.
pub mod pf_error {
    /// The fault was caused by a page-level protection violation (or reserved bit).
    pub const PRESENT: u32 = 1 << 0;
    /// The access was a write.
    pub const WRITE: u32 = 1 << 1;
    /// The access was a user-mode access.
    pub const USER: u32 = 1 << 2;
    /// A reserved bit was set in some paging-structure entry.
    pub const RESERVED: u32 = 1 << 3;
    /// The access was an instruction fetch (reported only with NXE or SMEP).
    pub const INSTRUCTION: u32 = 1 << 4;
}

impl WalkFault {
    /// The x86 `#PF` error code for this fault, or `None` when the CPU would not raise `#PF`
    /// (non-canonical address: `#GP`/`#SS`; tables outside memory or contention: the caller
    /// decides).
    pub fn page_fault_error_code(&self, access: AccessType, cfg: &WalkConfig) -> Option<u32> {
        let present = match self {
            WalkFault::NotPresent { .. } => 0,
            WalkFault::ReservedBit { .. } => pf_error::PRESENT | pf_error::RESERVED,
            WalkFault::Protection { .. } => pf_error::PRESENT,
            WalkFault::NonCanonical
            | WalkFault::TableOutsideMemory { .. }
            | WalkFault::Contended => return None,
        };
        let mut code = present;
        if access.write {
            code |= pf_error::WRITE;
        }
        if access.user {
            code |= pf_error::USER;
        }
        if access.execute && (cfg.nxe || cfg.smep) {
            code |= pf_error::INSTRUCTION;
        }
        Some(code)
    }
}

/// Where paging-structure entries live. [`walk`] uses guest physical memory directly;
/// implement this to walk tables whose addresses need their own translation.
pub trait PageTableMemory {
    /// Read the 8-byte entry at `addr` (8-byte aligned).
    fn read_entry(&self, addr: u64) -> Result<u64, WalkFault>;

    /// Atomically replace the entry at `addr` with `new` if it still holds `current`.
    /// Returns `Ok(Ok(current))` on success and `Ok(Err(actual))` when the entry had changed.
    fn compare_exchange_entry(
        &self,
        addr: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, WalkFault>;
}

/// [`PageTableMemory`] over guest physical memory.
#[derive(Debug)]
pub struct GuestTables<'a, M: GuestMemory + ?Sized>(pub &'a M);

impl<M: GuestMemory + ?Sized> PageTableMemory for GuestTables<'_, M> {
    fn read_entry(&self, addr: u64) -> Result<u64, WalkFault> {
        self.0
            .load::<u64>(GuestAddress(addr), Ordering::Acquire)
            .map_err(|_| WalkFault::TableOutsideMemory { addr })
    }

    fn compare_exchange_entry(
        &self,
        addr: u64,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, WalkFault> {
        compare_exchange_u64(self.0, addr, current, new)
            .ok_or(WalkFault::TableOutsideMemory { addr })
    }
}

/// Atomic 8-byte compare-exchange on guest memory at `addr` (must be 8-byte aligned).
/// Returns `None` if the address is not backed by guest memory or misaligned. Marks the
/// quadword dirty in the region's bitmap when it is written.
pub fn compare_exchange_u64<M: GuestMemory + ?Sized>(
    mem: &M,
    addr: u64,
    current: u64,
    new: u64,
) -> Option<Result<u64, u64>> {
    let slice = mem
        .get_slices(GuestAddress(addr), 8, Permissions::ReadWrite)
        .ok()?
        .next()?
        .ok()?;
    let atomic = slice.get_atomic_ref::<AtomicU64>(0).ok()?;
    let result = atomic.compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire);
    if result.is_ok() {
        slice.bitmap().mark_dirty(0, 8);
    }
    Some(result)
}

/// How many times a walk restarts because an entry changed during an accessed/dirty update.
const MAX_WALK_RETRIES: usize = 64;

/// Translate `va` through the IA-32e paging structures rooted at `root_table` (CR3-style: the
/// physical address of the PML4 or PML5 table; bits 11:0 and above bit 51 are ignored).
///
/// On success the accessed flags of all entries used, and for a write the leaf's dirty flag, are
/// set atomically in guest memory (if `cfg.set_accessed_dirty`). On a fault nothing is written.
pub fn walk<M: GuestMemory + ?Sized>(
    mem: &M,
    root_table: u64,
    va: u64,
    access: AccessType,
    cfg: &WalkConfig,
) -> Result<Translation, WalkFault> {
    walk_with(&GuestTables(mem), root_table, va, access, cfg)
}

/// [`walk`] over any [`PageTableMemory`].
pub fn walk_with<T: PageTableMemory + ?Sized>(
    tables: &T,
    root_table: u64,
    va: u64,
    access: AccessType,
    cfg: &WalkConfig,
) -> Result<Translation, WalkFault> {
    if !cfg.levels.is_canonical(va) {
        return Err(WalkFault::NonCanonical);
    }
    for _ in 0..MAX_WALK_RETRIES {
        if let Some(translation) = walk_once(tables, root_table, va, access, cfg)? {
            return Ok(translation);
        }
    }
    Err(WalkFault::Contended)
}

/// Address of the entry translating `va` at `level` (1 = PTE ... 5 = PML5E) in `table`.
pub fn entry_address(table: u64, va: u64, level: u8) -> u64 {
    let shift = 12 + 9 * u32::from(level - 1);
    (table & entry::ADDRESS_MASK) + ((va >> shift) & 0x1ff) * 8
}

/// Bytes mapped by one entry at `level` (4 KiB at level 1, 2 MiB at 2, 1 GiB at 3, ...).
pub fn level_page_size(level: u8) -> u64 {
    1 << (12 + 9 * u32::from(level - 1))
}

/// One entry used by a walk: its address and the value read.
#[derive(Clone, Copy, Default)]
struct UsedEntry {
    addr: u64,
    value: u64,
}

/// Reserved bits of a present entry at `level` (bits 51:MAXPHYADDR, XD without NXE, PS where
/// it is not allowed, and the low address bits of a large page).
fn reserved_bits(value: u64, level: u8, cfg: &WalkConfig) -> u64 {
    let phys_bits = cfg.phys_addr_bits.clamp(12, 52);
    let mut reserved = entry::ADDRESS_MASK & !((1u64 << phys_bits) - 1);
    if !cfg.nxe {
        reserved |= entry::EXECUTE_DISABLE;
    }
    let large = value & entry::PAGE_SIZE != 0;
    match level {
        4 | 5 => reserved |= entry::PAGE_SIZE,
        3 if large && !cfg.page_1g => reserved |= entry::PAGE_SIZE,
        // Bits 29:13 of a 1 GiB leaf (bit 12 is PAT).
        3 if large => reserved |= (PAGE_SIZE_1G - 1) & !(PAGE_SIZE_4K - 1) & !entry::LARGE_PAT,
        // Bits 20:13 of a 2 MiB leaf.
        2 if large => reserved |= (PAGE_SIZE_2M - 1) & !(PAGE_SIZE_4K - 1) & !entry::LARGE_PAT,
        _ => {}
    }
    value & reserved
}

/// Access-rights check on the combined permissions of a translation (SDM 4.6): the same rules
/// in every paging mode, so the CPU trap layer's 32-bit and PAE walks use it too. `level` is
/// the leaf's, for the fault.
pub fn check_access(
    t: &Translation,
    access: AccessType,
    cfg: &WalkConfig,
    level: u8,
) -> Result<(), WalkFault> {
    let violation = if access.user {
        if !t.user {
            Some(Violation::User)
        } else if access.write && !t.writable {
            Some(Violation::Write)
        } else if access.execute && !t.executable {
            Some(Violation::Execute)
        } else {
            None
        }
    } else if access.execute {
        if t.user && cfg.smep {
            Some(Violation::SupervisorExecute)
        } else if !t.executable {
            Some(Violation::Execute)
        } else {
            None
        }
    } else if t.user && cfg.smap {
        Some(Violation::SupervisorAccess)
    } else if access.write && !t.writable && cfg.write_protect {
        Some(Violation::Write)
    } else {
        None
    };
    match violation {
        Some(violation) => Err(WalkFault::Protection { level, violation }),
        None => Ok(()),
    }
}

/// One pass of the walk. `Ok(None)` means an entry changed while setting A/D: start over.
fn walk_once<T: PageTableMemory + ?Sized>(
    tables: &T,
    root_table: u64,
    va: u64,
    access: AccessType,
    cfg: &WalkConfig,
) -> Result<Option<Translation>, WalkFault> {
    let top = cfg.levels.count();
    let mut used = [UsedEntry::default(); 5];
    let mut used_count = 0;
    let mut table = root_table & entry::ADDRESS_MASK;
    let mut t = Translation {
        phys_addr: 0,
        page_size: PAGE_SIZE_4K,
        writable: true,
        user: true,
        executable: true,
        dirty: false,
    };
    let mut level = top;
    loop {
        let addr = entry_address(table, va, level);
        let value = tables.read_entry(addr)?;
        if value & entry::PRESENT == 0 {
            return Err(WalkFault::NotPresent { level });
        }
        if reserved_bits(value, level, cfg) != 0 {
            return Err(WalkFault::ReservedBit { level });
        }
        t.writable &= value & entry::WRITABLE != 0;
        t.user &= value & entry::USER != 0;
        if cfg.nxe {
            t.executable &= value & entry::EXECUTE_DISABLE == 0;
        }
        used[used_count] = UsedEntry { addr, value };
        used_count += 1;
        let leaf = level == 1 || (level <= 3 && value & entry::PAGE_SIZE != 0);
        if leaf {
            t.page_size = level_page_size(level);
            t.phys_addr =
                (value & entry::ADDRESS_MASK & !(t.page_size - 1)) | (va & (t.page_size - 1));
            t.dirty = value & entry::DIRTY != 0;
            break;
        }
        table = value & entry::ADDRESS_MASK;
        level -= 1;
    }
    check_access(&t, access, cfg, level)?;

    if cfg.set_accessed_dirty {
        let last = used_count - 1;
        for (i, e) in used[..used_count].iter().enumerate() {
            let mut flags = entry::ACCESSED;
            if i == last && access.write {
                flags |= entry::DIRTY;
            }
            if !set_flags(tables, e, flags)? {
                return Ok(None);
            }
        }
        if access.write {
            t.dirty = true;
        }
    }
    Ok(Some(t))
}

/// Set `flags` (A, or A|D) in a used entry. Returns false if the entry changed in any other
/// bit since it was read, in which case the walk must start over.
fn set_flags<T: PageTableMemory + ?Sized>(
    tables: &T,
    used: &UsedEntry,
    flags: u64,
) -> Result<bool, WalkFault> {
    let ad = entry::ACCESSED | entry::DIRTY;
    let mut current = used.value;
    // A concurrent CPU may set A/D itself; tolerate that once before restarting the walk.
    for _ in 0..2 {
        if current & flags == flags {
            return Ok(true);
        }
        match tables.compare_exchange_entry(used.addr, current, current | flags)? {
            Ok(_) => return Ok(true),
            Err(actual) if actual & !ad == used.value & !ad => current = actual,
            Err(_) => return Ok(false),
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests;
