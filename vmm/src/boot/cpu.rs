//! The boot vCPU's 64-bit entry state: GDT, identity page tables, control
//! registers and segment registers, as Linux's 64-bit boot protocol wants
//! them (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol").

use kvm_bindings::kvm_dtable;

use crate::layout;
use crate::x86::pte;
use crate::x86::segment::{self, SegmentDescriptor};

pub use crate::x86::{cr0, cr4, efer};

/// RFLAGS with only the always-one bit 1 set: interrupts disabled.
pub const RFLAGS_RESERVED_ONE: u64 = crate::x86::rflags::FIXED;

/// __BOOT_CS: flat 64-bit code.
pub const BOOT_CS: SegmentDescriptor = segment::code64(0);
/// __BOOT_DS: flat read/write data.
pub const BOOT_DS: SegmentDescriptor = segment::data(0);
/// A busy 64-bit TSS, so that TR holds a valid system segment until the
/// kernel loads its own.
pub const BOOT_TSS: SegmentDescriptor = segment::tss64(0x67, segment::kind::TSS64_BUSY);

/// Selectors the boot protocol names: GDT entries 2 and 3.
pub const BOOT_CS_SELECTOR: u16 = 0x10;
/// __BOOT_DS.
pub const BOOT_DS_SELECTOR: u16 = 0x18;
/// The TSS (a 16-byte system descriptor: entries 4 and 5).
pub const BOOT_TSS_SELECTOR: u16 = 0x20;

/// The boot GDT: null, unused, __BOOT_CS, __BOOT_DS, TSS (two entries).
pub fn gdt() -> [u64; 6] {
    [
        0,
        0,
        BOOT_CS.to_u64(),
        BOOT_DS.to_u64(),
        BOOT_TSS.to_u64(),
        0,
    ]
}

/// The GDT register value for [`gdt`] at `layout::BOOT_GDT_START`.
pub fn gdt_register() -> kvm_dtable {
    kvm_dtable {
        base: layout::BOOT_GDT_START,
        limit: (std::mem::size_of::<[u64; 6]>() - 1) as u16,
        padding: [0; 3],
    }
}

/// GiB of address space the boot page tables map (one page directory each).
pub const IDENTITY_MAPPED_GIB: u64 = 4;
const ENTRIES_PER_TABLE: u64 = 512;
const PAGE_2M: u64 = 2 << 20;

/// A page-table page to write: its address and its 512 entries.
pub struct PageTable {
    /// Guest-physical address of the page.
    pub addr: u64,
    /// The entries.
    pub entries: Vec<u64>,
}

/// Identity page tables for the first [`IDENTITY_MAPPED_GIB`] GiB with
/// 2 MiB pages (no CPUID feature needed, unlike 1 GiB pages): a PML4 at
/// `layout::BOOT_PML4_START`, a PDPT at `BOOT_PDPT_START` and one page
/// directory per GiB from `BOOT_PD_START`. CR3 is the PML4's address.
pub fn identity_page_tables() -> Vec<PageTable> {
    let table_flags = pte::PRESENT | pte::WRITABLE;
    let mut pml4 = vec![0; ENTRIES_PER_TABLE as usize];
    pml4[0] = layout::BOOT_PDPT_START | table_flags;
    let mut pdpt = vec![0; ENTRIES_PER_TABLE as usize];
    let mut tables = Vec::new();
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd_addr = layout::BOOT_PD_START + gib * 0x1000;
        pdpt[gib as usize] = pd_addr | table_flags;
        let entries = (0..ENTRIES_PER_TABLE)
            .map(|i| ((gib * ENTRIES_PER_TABLE + i) * PAGE_2M) | table_flags | pte::PAGE_SIZE)
            .collect();
        tables.push(PageTable {
            addr: pd_addr,
            entries,
        });
    }
    tables.insert(
        0,
        PageTable {
            addr: layout::BOOT_PDPT_START,
            entries: pdpt,
        },
    );
    tables.insert(
        0,
        PageTable {
            addr: layout::BOOT_PML4_START,
            entries: pml4,
        },
    );
    tables
}
