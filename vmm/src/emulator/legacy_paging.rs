//! The paging modes of protected mode without long mode: 32-bit paging
//! (CR4.PAE=0: two levels of 4-byte entries, 4 MiB pages with CR4.PSE) and
//! PAE paging (CR4.PAE=1: four PDPTEs, then two levels of 8-byte entries,
//! 2 MiB pages, execute-disable with EFER.NXE) (SDM Vol. 3A, 4.3 and 4.4).
//!
//! The access rights, the #PF error code and the accessed/dirty updates
//! follow the IA-32e walker's rules ([`viommu::paging`]): the same
//! [`WalkConfig`] and [`WalkFault`], the same rights check. Two
//! simplifications: the PDPTEs are read from memory at each walk (the CPU
//! loads them when CR3 is written), and a reserved bit in a PDPTE is a
//! reserved-bit #PF (the CPU raises #GP at that CR3 write).

use std::sync::atomic::Ordering;

use viommu::paging::{self, entry, AccessType, Translation, WalkConfig, WalkFault};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

/// Which of the two modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LegacyPaging {
    /// 32-bit paging; `pse`: CR4.PSE (4 MiB pages).
    Bits32 { pse: bool },
    /// PAE paging.
    Pae,
}

/// CR3 in 32-bit paging: bits 31:12 locate the page directory.
const CR3_PD_MASK: u64 = 0xffff_f000;
/// CR3 in PAE paging: bits 31:5 locate the four PDPTEs.
const CR3_PDPT_MASK: u64 = 0xffff_ffe0;
/// A 4-byte entry's address bits.
const ENTRY32_ADDRESS_MASK: u64 = 0xffff_f000;
/// A 4 MiB page's bits 31:22 and, with PSE-36, bits 20:13 holding physical
/// address bits 39:32.
const PAGE_4M_LOW_MASK: u64 = 0xffc0_0000;
const PAGE_4M_HIGH_SHIFT: u32 = 13;
const PAGE_4M_HIGH_BITS: u32 = 8;
/// Bit 21 of a 4 MiB page's entry is reserved.
const PAGE_4M_RESERVED: u64 = 1 << 21;
/// PDPTE bits that must be 0 below bit 12: 2:1 and 8:5.
const PDPTE_RESERVED_LOW: u64 = 0x1e6;
/// How often a walk restarts because another vCPU changed an entry while
/// this one set its accessed/dirty flags.
const MAX_WALK_RETRIES: usize = 64;

/// One paging-structure entry the walk used.
#[derive(Clone, Copy, Default)]
struct Used {
    addr: u64,
    value: u64,
    size: u64,
}

/// Translates the 32-bit linear address `va` through the tables CR3 =
/// `cr3` points to.
pub(crate) fn walk<M: GuestMemory>(
    mem: &M,
    mode: LegacyPaging,
    cr3: u64,
    va: u64,
    access: AccessType,
    cfg: &WalkConfig,
) -> Result<u64, WalkFault> {
    for _ in 0..MAX_WALK_RETRIES {
        if let Some(pa) = walk_once(mem, mode, cr3, va, access, cfg)? {
            return Ok(pa);
        }
    }
    Err(WalkFault::Contended)
}

/// The bits of `value`, a present directory (`large`: mapping a page) or
/// table entry, that must be 0.
fn reserved_bits(mode: LegacyPaging, value: u64, large: bool, cfg: &WalkConfig) -> u64 {
    let phys_bits = u32::from(cfg.phys_addr_bits.clamp(32, 52));
    let reserved = match mode {
        LegacyPaging::Bits32 { .. } if large => {
            // PSE-36: bits 20:13 carry physical bits 39:32; those at or
            // above MAXPHYADDR are reserved.
            let usable = phys_bits.saturating_sub(32).min(PAGE_4M_HIGH_BITS);
            let high = ((1u64 << PAGE_4M_HIGH_BITS) - 1) & !((1u64 << usable) - 1);
            PAGE_4M_RESERVED | (high << PAGE_4M_HIGH_SHIFT)
        }
        LegacyPaging::Bits32 { .. } => 0,
        LegacyPaging::Pae => {
            let mut reserved = entry::ADDRESS_MASK & !((1u64 << phys_bits) - 1);
            if !cfg.nxe {
                reserved |= entry::EXECUTE_DISABLE;
            }
            if large {
                // Bits 20:13 of a 2 MiB page (bit 12 is PAT).
                reserved |=
                    (paging::PAGE_SIZE_2M - 1) & !(paging::PAGE_SIZE_4K - 1) & !entry::LARGE_PAT;
            }
            reserved
        }
    };
    value & reserved
}

fn read_entry<M: GuestMemory>(mem: &M, addr: u64, size: u64) -> Result<u64, WalkFault> {
    let at = GuestAddress(addr);
    let value = if size == 4 {
        mem.load::<u32>(at, Ordering::Acquire).map(u64::from)
    } else {
        mem.load::<u64>(at, Ordering::Acquire)
    };
    value.map_err(|_| WalkFault::TableOutsideMemory { addr })
}

/// Sets `flags` in a used entry atomically. `Ok(false)`: the entry
/// changed in another bit since it was read (the walk starts over). A
/// 4-byte entry is exchanged within its aligned quadword.
fn set_flags<M: GuestMemory>(mem: &M, used: &Used, flags: u64) -> Result<bool, WalkFault> {
    if used.value & flags == flags {
        return Ok(true);
    }
    let outside = WalkFault::TableOutsideMemory { addr: used.addr };
    let (quad, shift) = (used.addr & !7, (used.addr & 7) * 8);
    let mask = if used.size == 4 {
        0xffff_ffffu64 << shift
    } else {
        u64::MAX
    };
    let whole = mem
        .load::<u64>(GuestAddress(quad), Ordering::Acquire)
        .map_err(|_| outside)?;
    if (whole & mask) >> shift != used.value {
        return Ok(false);
    }
    let new = whole | (flags << shift);
    Ok(paging::compare_exchange_u64(mem, quad, whole, new)
        .ok_or(outside)?
        .is_ok())
}

fn walk_once<M: GuestMemory>(
    mem: &M,
    mode: LegacyPaging,
    cr3: u64,
    va: u64,
    access: AccessType,
    cfg: &WalkConfig,
) -> Result<Option<u64>, WalkFault> {
    let (entry_size, index_bits, mut table) = match mode {
        LegacyPaging::Bits32 { .. } => (4u64, 10u32, cr3 & CR3_PD_MASK),
        LegacyPaging::Pae => {
            let addr = (cr3 & CR3_PDPT_MASK) + ((va >> 30) & 3) * 8;
            let pdpte = read_entry(mem, addr, 8)?;
            if pdpte & entry::PRESENT == 0 {
                return Err(WalkFault::NotPresent { level: 3 });
            }
            let phys_bits = u32::from(cfg.phys_addr_bits.clamp(32, 52));
            let high = entry::ADDRESS_MASK & !((1u64 << phys_bits) - 1);
            if pdpte & (PDPTE_RESERVED_LOW | high | entry::EXECUTE_DISABLE) != 0 {
                return Err(WalkFault::ReservedBit { level: 3 });
            }
            (8, 9, pdpte & entry::ADDRESS_MASK)
        }
    };
    let address_mask = if entry_size == 4 {
        ENTRY32_ADDRESS_MASK
    } else {
        entry::ADDRESS_MASK
    };
    let mut t = Translation {
        phys_addr: 0,
        page_size: paging::PAGE_SIZE_4K,
        writable: true,
        user: true,
        executable: true,
        dirty: false,
    };
    let mut used = [Used::default(); 2];
    let mut level = 2u8;
    loop {
        let shift = 12 + index_bits * u32::from(level - 1);
        let index = (va >> shift) & ((1 << index_bits) - 1);
        let addr = table + index * entry_size;
        let value = read_entry(mem, addr, entry_size)?;
        if value & entry::PRESENT == 0 {
            return Err(WalkFault::NotPresent { level });
        }
        let large = level == 2
            && value & entry::PAGE_SIZE != 0
            && mode != (LegacyPaging::Bits32 { pse: false });
        if reserved_bits(mode, value, large, cfg) != 0 {
            return Err(WalkFault::ReservedBit { level });
        }
        t.writable &= value & entry::WRITABLE != 0;
        t.user &= value & entry::USER != 0;
        if cfg.nxe {
            t.executable &= value & entry::EXECUTE_DISABLE == 0;
        }
        used[usize::from(2 - level)] = Used {
            addr,
            value,
            size: entry_size,
        };
        if level == 1 || large {
            t.page_size = 1 << shift;
            let offset = va & (t.page_size - 1);
            t.phys_addr = match mode {
                LegacyPaging::Bits32 { .. } if large => {
                    let high = (value >> PAGE_4M_HIGH_SHIFT) & ((1 << PAGE_4M_HIGH_BITS) - 1);
                    (value & PAGE_4M_LOW_MASK) | (high << 32) | offset
                }
                _ => (value & address_mask & !(t.page_size - 1)) | offset,
            };
            break;
        }
        table = value & address_mask;
        level -= 1;
    }
    paging::check_access(&t, access, cfg, level)?;
    if cfg.set_accessed_dirty {
        let used = &used[..usize::from(3 - level)];
        for (i, e) in used.iter().enumerate() {
            let mut flags = entry::ACCESSED;
            if i == used.len() - 1 && access.write {
                flags |= entry::DIRTY;
            }
            if !set_flags(mem, e, flags)? {
                return Ok(None);
            }
        }
    }
    Ok(Some(t.phys_addr))
}
