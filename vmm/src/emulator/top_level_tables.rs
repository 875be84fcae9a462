//! Every copy of a top-level page table's kernel half in guest RAM.
//!
//! A 64-bit Linux gives each process its own top-level table whose upper
//! half (entries 256-511: kernel text, the direct map, vmalloc space, the
//! CPU entry area with IDT, GDT and TSS) is a copy of the same entries. A
//! triple fault under a table the VMM never saw (CR3 loads do not exit
//! under nested paging) leaves one trace the VMM can still find: a page
//! that holds most of those entries but not all. This finds such pages
//! by the entries they share with a known table, so a report can name a
//! corrupted one and the bytes that differ.
//!
//! Reads only; the scan looks at three entries of every page and reads a
//! whole kernel half only where one of them matches.

use std::fmt::{self, Write};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::x86::PAGE_TABLE_SIZE;

/// A 4-level or 5-level top-level table: 512 entries, the upper half the
/// kernel's (SDM Vol. 3A, 4.5).
pub(super) const TOP_LEVEL_ENTRIES: usize = 512;
pub(super) const KERNEL_HALF_FIRST: usize = 256;
const ENTRY_SIZE: u64 = 8;
/// Differing pages listed in full; the rest are counted.
const LISTED: usize = 16;

/// One entry of a copy that is not the reference's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryDiff {
    pub index: usize,
    pub expected: u64,
    pub found: u64,
}

/// A page whose kernel half matches the reference's in part.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartialCopy {
    pub gpa: u64,
    pub diffs: Vec<EntryDiff>,
}

/// What a scan found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelHalfCensus {
    /// The reference table's page.
    pub reference: u64,
    /// Non-zero entries in the reference's kernel half.
    pub present: usize,
    /// Pages (the reference among them) whose kernel half equals it.
    pub exact: usize,
    /// Pages that share a sampled entry but differ elsewhere.
    pub partial: Vec<PartialCopy>,
}

impl KernelHalfCensus {
    /// Scans every page of `mem` for copies of the kernel half of the
    /// top-level table at `root`. A page counts as a copy if it holds the
    /// reference's first, middle or last non-zero kernel entry at its index;
    /// a copy with all three overwritten is not found.
    pub fn scan(mem: &GuestMemoryMmap, root: u64) -> Self {
        let mut census = KernelHalfCensus {
            reference: root,
            ..Default::default()
        };
        let Some(reference) = kernel_half(mem, root) else {
            return census;
        };
        let present: Vec<usize> = (0..reference.len())
            .filter(|&i| reference[i] != 0)
            .collect();
        census.present = present.len();
        let (Some(&first), Some(&last)) = (present.first(), present.last()) else {
            return census;
        };
        let samples = [first, present[present.len() / 2], last];
        for region in mem.iter() {
            let start = region.start_addr().0;
            let pages = region.len() / PAGE_TABLE_SIZE;
            for page in 0..pages {
                let gpa = start + page * PAGE_TABLE_SIZE;
                let shares_one = samples
                    .iter()
                    .any(|&i| entry_at(mem, gpa, KERNEL_HALF_FIRST + i) == Some(reference[i]));
                if !shares_one {
                    continue;
                }
                let Some(half) = kernel_half(mem, gpa) else {
                    continue;
                };
                let diffs: Vec<EntryDiff> = (0..half.len())
                    .filter(|&i| half[i] != reference[i])
                    .map(|i| EntryDiff {
                        index: KERNEL_HALF_FIRST + i,
                        expected: reference[i],
                        found: half[i],
                    })
                    .collect();
                if diffs.is_empty() {
                    census.exact += 1;
                } else {
                    census.partial.push(PartialCopy { gpa, diffs });
                }
            }
        }
        census
    }
}

impl fmt::Display for KernelHalfCensus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "copies in guest RAM of the kernel half of the top-level table at GPA {:#x}:",
            self.reference
        )?;
        if self.present == 0 {
            return write!(f, " none looked for, it has no entries");
        }
        write!(
            f,
            " {} pages equal it, {} differ",
            self.exact,
            self.partial.len()
        )?;
        for copy in self.partial.iter().take(LISTED) {
            let mut line = String::new();
            for d in &copy.diffs {
                let _ = write!(
                    line,
                    " [{}] {:#x} (not {:#x})",
                    d.index, d.found, d.expected
                );
            }
            write!(f, "\n  GPA {:#x}:{line}", copy.gpa)?;
        }
        if self.partial.len() > LISTED {
            write!(f, "\n  and {} more", self.partial.len() - LISTED)?;
        }
        Ok(())
    }
}

/// Entries 256-511 of the table page at `gpa`; `None` if it is not RAM.
pub(super) fn kernel_half(mem: &GuestMemoryMmap, gpa: u64) -> Option<Vec<u64>> {
    let mut raw = [0u8; (TOP_LEVEL_ENTRIES - KERNEL_HALF_FIRST) * ENTRY_SIZE as usize];
    mem.read_slice(
        &mut raw,
        GuestAddress(gpa + KERNEL_HALF_FIRST as u64 * ENTRY_SIZE),
    )
    .ok()?;
    Some(
        raw.chunks_exact(ENTRY_SIZE as usize)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
    )
}

fn entry_at(mem: &GuestMemoryMmap, gpa: u64, index: usize) -> Option<u64> {
    mem.read_obj(GuestAddress(gpa + index as u64 * ENTRY_SIZE))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: u64 = 0x3000;
    const TEXT: u64 = 0x0000_0000_0260_0063;
    const DIRECT: u64 = 0x8000_0000_0270_0067;
    const ENTRY_AREA: u64 = 0x0000_0000_0280_0063;

    fn set(mem: &GuestMemoryMmap, table: u64, index: u64, value: u64) {
        mem.write_obj(value, GuestAddress(table + index * 8))
            .unwrap();
    }

    fn process_table(mem: &GuestMemoryMmap, table: u64) {
        set(mem, table, 0, 0x0000_0000_0123_4067); // a user entry
        set(mem, table, 273, DIRECT);
        set(mem, table, 508, ENTRY_AREA);
        set(mem, table, 511, TEXT);
    }

    #[test]
    fn finds_the_copies_and_names_the_entries_a_partial_one_lost() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        process_table(&mem, ROOT);
        process_table(&mem, 0x5000);
        process_table(&mem, 0x9000);
        // A 4-byte write of 2 over entry 511's low half: not present.
        mem.write_obj(2u32, GuestAddress(0x9000 + 511 * 8)).unwrap();
        // A page that shares nothing sampled is no copy.
        set(&mem, 0xa000, 300, DIRECT);

        let census = KernelHalfCensus::scan(&mem, ROOT);

        assert_eq!(census.present, 3);
        assert_eq!(census.exact, 2);
        assert_eq!(
            census.partial,
            vec![PartialCopy {
                gpa: 0x9000,
                diffs: vec![EntryDiff {
                    index: 511,
                    expected: TEXT,
                    found: 2,
                }],
            }]
        );
        assert_eq!(
            census.to_string(),
            "copies in guest RAM of the kernel half of the top-level table at GPA 0x3000: \
             2 pages equal it, 1 differ\n  GPA 0x9000: [511] 0x2 (not 0x2600063)"
        );
    }

    #[test]
    fn a_table_without_a_kernel_half_is_not_looked_for() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 16)]).unwrap();
        set(&mem, ROOT, 0, 0x2067);
        let census = KernelHalfCensus::scan(&mem, ROOT);
        assert_eq!(census.present, 0);
        assert!(census
            .to_string()
            .ends_with("at GPA 0x3000: none looked for, it has no entries"));
    }
}
