//! The E820 memory map handed to Linux in boot_params.

use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout;

/// An E820 range type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not RAM the OS may use (ACPI tables, ECAM).
    Reserved = 2,
}

/// One E820 range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

/// Ranges inside RAM regions that are never reported as RAM: the legacy
/// VGA/option-ROM hole (a gap) and the ACPI area (reported reserved).
const NOT_RAM: [(u64, u64); 2] = [
    (layout::LEGACY_HOLE_START, layout::ACPI_START),
    (layout::ACPI_START, layout::ACPI_END),
];

/// Ranges always reported reserved: the ACPI tables, and the ECAM window
/// (Linux uses MMCONFIG only if the MCFG region is reserved in E820 or in
/// the ACPI motherboard resources).
const RESERVED: [(u64, u64); 2] = [
    (layout::ACPI_START, layout::ACPI_END),
    (
        layout::PCIE_ECAM_START,
        layout::PCIE_ECAM_START + layout::PCIE_ECAM_SIZE,
    ),
];

/// The E820 map for guest RAM made of `ram` ranges `(start, size)`: RAM
/// minus the legacy hole and the ACPI area, plus the reserved ranges,
/// sorted by address.
pub fn e820_entries(ram: &[(u64, u64)]) -> Vec<E820Entry> {
    let mut entries = Vec::new();
    for &(start, size) in ram {
        let mut pieces = vec![(start, start + size)];
        for (hole_start, hole_end) in NOT_RAM {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    [(s, e.min(hole_start)), (s.max(hole_end), e)]
                        .into_iter()
                        .filter(|(s, e)| s < e)
                })
                .collect();
        }
        entries.extend(pieces.into_iter().map(|(s, e)| E820Entry {
            addr: s,
            size: e - s,
            kind: E820Type::Ram,
        }));
    }
    entries.extend(RESERVED.iter().map(|&(s, e)| E820Entry {
        addr: s,
        size: e - s,
        kind: E820Type::Reserved,
    }));
    entries.sort_by_key(|e| e.addr);
    entries
}

/// The regions of `mem`, as `(start, size)` (the machine's layout of RAM
/// for a given size is `crate::vm::ram_ranges`).
pub fn memory_regions<M: GuestMemoryBackend>(mem: &M) -> Vec<(u64, u64)> {
    mem.iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect()
}

/// The E820 map of `mem`.
pub fn e820_map<M: GuestMemoryBackend>(mem: &M) -> Vec<E820Entry> {
    e820_entries(&memory_regions(mem))
}
