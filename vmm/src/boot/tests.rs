//! Tests of direct Linux boot with synthetic kernel images.

use std::path::Path;

use kvm_bindings::kvm_sregs;
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, EM_AARCH64, EM_X86_64, PT_LOAD};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::*;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// RAM laid out as the machine does: low RAM up to the MMIO hole, the rest
/// from 4 GiB.
fn ram_layout(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(layout::MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if size > low {
        ranges.push((layout::HIGH_RAM_START, size - low));
    }
    ranges
}

fn memory(size: u64) -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = ram_layout(size)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).unwrap()
}

fn ram(addr: u64, size: u64) -> E820Entry {
    E820Entry {
        addr,
        size,
        kind: E820Type::Ram,
    }
}

fn reserved(addr: u64, size: u64) -> E820Entry {
    E820Entry {
        addr,
        size,
        kind: E820Type::Reserved,
    }
}

/// The entries every map has around low RAM of `low_end`.
fn low_entries(low_end: u64) -> Vec<E820Entry> {
    vec![
        ram(0, 0xa_0000),
        reserved(0xe_0000, 0x2_0000),
        ram(0x10_0000, low_end - 0x10_0000),
        reserved(layout::PCIE_ECAM_START, layout::PCIE_ECAM_SIZE),
    ]
}

#[test]
fn e820_for_several_ram_sizes() {
    assert_eq!(e820_entries(&ram_layout(64 * MIB)), low_entries(64 * MIB));
    assert_eq!(e820_entries(&ram_layout(GIB)), low_entries(GIB));
    assert_eq!(e820_entries(&ram_layout(3 * GIB)), low_entries(3 * GIB));
    let mut four = low_entries(3 * GIB);
    four.push(ram(4 * GIB, GIB));
    assert_eq!(e820_entries(&ram_layout(4 * GIB)), four);
    let mut sixteen = low_entries(3 * GIB);
    sixteen.push(ram(4 * GIB, 13 * GIB));
    assert_eq!(e820_entries(&ram_layout(16 * GIB)), sixteen);
    // RAM too small to reach the kernel area: only the first piece.
    assert_eq!(
        e820_entries(&[(0, 0x8_0000)]),
        vec![
            ram(0, 0x8_0000),
            reserved(0xe_0000, 0x2_0000),
            reserved(layout::PCIE_ECAM_START, layout::PCIE_ECAM_SIZE),
        ]
    );
}

#[test]
fn e820_map_follows_guest_memory_regions() {
    assert_eq!(e820_map(&memory(64 * MIB)), low_entries(64 * MIB));
}

/// An x86-64 ELF executable with one loadable segment of `code` at
/// `paddr`, `memsz` bytes in memory, entry at `paddr`.
fn synthetic_elf(machine: u16, paddr: u64, code: &[u8], memsz: u64) -> Vec<u8> {
    let ehdr_len = std::mem::size_of::<Elf64_Ehdr>();
    let phdr_len = std::mem::size_of::<Elf64_Phdr>();
    let mut ehdr = Elf64_Ehdr {
        e_type: 2, // ET_EXEC
        e_machine: machine,
        e_version: 1,
        e_entry: paddr,
        e_phoff: ehdr_len as u64,
        e_ehsize: ehdr_len as u16,
        e_phentsize: phdr_len as u16,
        e_phnum: 1,
        ..Default::default()
    };
    ehdr.e_ident[..7].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    let phdr = Elf64_Phdr {
        p_type: PT_LOAD,
        p_flags: 5,
        p_offset: (ehdr_len + phdr_len) as u64,
        p_vaddr: 0xffff_ffff_8000_0000 + paddr,
        p_paddr: paddr,
        p_filesz: code.len() as u64,
        p_memsz: memsz,
        p_align: 0x20_0000,
    };
    [ehdr.as_slice(), phdr.as_slice(), code].concat()
}

/// A bzImage with one setup sector and a `payload_len`-byte payload.
fn synthetic_bzimage(version: u16, xloadflags: u16, payload_len: usize) -> Vec<u8> {
    let hdr = setup_header {
        setup_sects: 1,
        boot_flag: 0xaa55,
        header: 0x5372_6448,
        version,
        loadflags: 1,
        code32_start: 0x10_0000,
        initrd_addr_max: 0x37ff_ffff,
        kernel_alignment: 0x20_0000,
        relocatable_kernel: 1,
        xloadflags,
        cmdline_size: 2047,
        pref_address: 0x100_0000,
        init_size: 0x80_0000,
        ..Default::default()
    };
    let mut image = vec![0u8; 1024];
    image[0x1f1..0x1f1 + std::mem::size_of::<setup_header>()].copy_from_slice(hdr.as_slice());
    image.extend((0..payload_len).map(|i| (i % 251) as u8));
    image
}

fn file_with(bytes: &[u8]) -> TempFile {
    let file = TempFile::new_with_prefix("/tmp/vmm-boot-test").unwrap();
    std::fs::write(file.as_path(), bytes).unwrap();
    file
}

fn config(kernel: &Path) -> BootConfig {
    BootConfig {
        kernel: kernel.to_owned(),
        ..Default::default()
    }
}

fn read_params(mem: &GuestMemoryMmap) -> boot_params {
    mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap()
}

const CODE: [u8; 8] = [0x48, 0x31, 0xc0, 0xf4, 0xeb, 0xfd, 0x90, 0x90];

#[test]
fn elf_vmlinux_with_initramfs_and_cmdline() {
    let mem = memory(64 * MIB);
    let kernel = file_with(&synthetic_elf(EM_X86_64, 0x100_0000, &CODE, 0x1_0000));
    let initrd_bytes: Vec<u8> = (0..10 * 1024).map(|i| (i % 7) as u8).collect();
    let initrd = file_with(&initrd_bytes);
    let cfg = BootConfig {
        kernel: kernel.as_path().to_owned(),
        initramfs: Some(initrd.as_path().to_owned()),
        cmdline: "console=ttyS0 panic=-1".into(),
        rsdp: Some(GuestAddress(layout::ACPI_START)),
    };
    let state = load_linux(&mem, &cfg).unwrap();
    assert_eq!(state.kernel_format, KernelFormat::Elf);
    assert_eq!(state.entry, GuestAddress(0x100_0000));

    let mut code = [0u8; 8];
    mem.read_slice(&mut code, GuestAddress(0x100_0000)).unwrap();
    assert_eq!(code, CODE);

    let p = read_params(&mem);
    let hdr = p.hdr;
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.header }, 0x5372_6448);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.kernel_alignment }, 0x20_0000);
    assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
    assert_eq!({ hdr.cmdline_size }, 22);
    let mut cmdline = [0u8; 23];
    mem.read_slice(&mut cmdline, GuestAddress(layout::CMDLINE_START))
        .unwrap();
    assert_eq!(&cmdline, b"console=ttyS0 panic=-1\0");

    // Top of low RAM, page-aligned.
    assert_eq!({ hdr.ramdisk_image }, 0x3ff_d000);
    assert_eq!({ hdr.ramdisk_size }, 10 * 1024);
    assert_eq!(state.initramfs, Some((GuestAddress(0x3ff_d000), 10 * 1024)));
    let mut loaded = vec![0u8; initrd_bytes.len()];
    mem.read_slice(&mut loaded, GuestAddress(0x3ff_d000))
        .unwrap();
    assert_eq!(loaded, initrd_bytes);

    assert_eq!({ p.acpi_rsdp_addr }, layout::ACPI_START);
    assert_eq!(p.e820_entries, 4);
    let table: Vec<(u64, u64, u32)> = p.e820_table[..4]
        .iter()
        .map(|e| (e.addr, e.size, e.r#type))
        .collect();
    assert_eq!(
        table,
        [
            (0, 0xa_0000, 1),
            (0xe_0000, 0x2_0000, 2),
            (0x10_0000, 64 * MIB - 0x10_0000, 1),
            (layout::PCIE_ECAM_START, layout::PCIE_ECAM_SIZE, 2),
        ]
    );

    let whats: Vec<&str> = state.writes.iter().map(|w| w.what).collect();
    assert_eq!(
        whats,
        [
            "kernel",
            "command line",
            "initramfs",
            "boot_params",
            "GDT",
            "page table",
            "page table",
            "page table",
            "page table",
            "page table",
            "page table"
        ]
    );
    assert_eq!(
        state.writes[0],
        MemoryWrite {
            what: "kernel",
            start: GuestAddress(0x100_0000),
            len: 0x1_0000
        }
    );
}

#[test]
fn entry_registers_and_long_mode_state() {
    let mem = memory(64 * MIB);
    let kernel = file_with(&synthetic_elf(EM_X86_64, 0x100_0000, &CODE, 0x1000));
    let state = load_linux(&mem, &config(kernel.as_path())).unwrap();

    let regs = state.regs();
    assert_eq!(regs.rip, 0x100_0000);
    assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
    assert_eq!(regs.rflags, 0x2, "interrupts disabled");
    assert_eq!(regs.rsp, layout::BOOT_STACK_POINTER);

    let mut sregs = kvm_sregs {
        apic_base: 0xfee0_0900,
        ..Default::default()
    };
    state.apply_sregs(&mut sregs);
    assert_eq!(sregs.cr0, 0x8000_0031, "PG, NE, ET, PE");
    assert_eq!(sregs.cr3, layout::BOOT_PML4_START);
    assert_eq!(sregs.cr4, 0x20, "PAE");
    assert_eq!(sregs.efer, 0x500, "LME, LMA");
    assert_eq!(sregs.apic_base, 0xfee0_0900, "left as KVM has it");
    assert_eq!(
        (sregs.cs.selector, sregs.cs.l, sregs.cs.db, sregs.cs.type_),
        (0x10, 1, 0, 0xb)
    );
    for seg in [sregs.ds, sregs.es, sregs.ss, sregs.fs, sregs.gs] {
        assert_eq!((seg.selector, seg.db, seg.type_), (0x18, 1, 0x3));
        assert_eq!(seg.limit, 0xffff_ffff);
    }
    assert_eq!(
        (sregs.tr.selector, sregs.tr.type_, sregs.tr.s),
        (0x20, 0xb, 0)
    );
    assert_eq!(
        (sregs.gdt.base, sregs.gdt.limit),
        (layout::BOOT_GDT_START, 47)
    );

    let mut gdt = [0u64; 6];
    for (i, d) in gdt.iter_mut().enumerate() {
        *d = mem
            .read_obj(GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .unwrap();
    }
    assert_eq!(
        gdt,
        [
            0,
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x0000_8b00_0000_0067,
            0
        ]
    );

    let entry = |addr: u64| -> u64 { mem.read_obj(GuestAddress(addr)).unwrap() };
    assert_eq!(entry(layout::BOOT_PML4_START), layout::BOOT_PDPT_START | 3);
    assert_eq!(entry(layout::BOOT_PML4_START + 8), 0);
    for gib in 0..4 {
        assert_eq!(
            entry(layout::BOOT_PDPT_START + 8 * gib),
            (layout::BOOT_PD_START + 0x1000 * gib) | 3
        );
    }
    assert_eq!(
        entry(layout::BOOT_PDPT_START + 32),
        0,
        "nothing above 4 GiB"
    );
    assert_eq!(entry(layout::BOOT_PD_START), 0x83);
    assert_eq!(entry(layout::BOOT_PD_START + 8), 0x20_0083);
    assert_eq!(
        entry(layout::BOOT_PD_START + 3 * 0x1000 + 511 * 8),
        0xffe0_0083,
        "the last 2 MiB page below 4 GiB"
    );
}

#[test]
fn bzimage_enters_at_startup_64_with_its_setup_header() {
    let mem = memory(GIB);
    let image = synthetic_bzimage(0x020f, 0x3, 0x4000);
    let kernel = file_with(&image);
    let initrd = file_with(&[0x5a; 0x1800]);
    let cfg = BootConfig {
        initramfs: Some(initrd.as_path().to_owned()),
        cmdline: "quiet".into(),
        ..config(kernel.as_path())
    };
    let state = load_linux(&mem, &cfg).unwrap();
    assert_eq!(state.kernel_format, KernelFormat::BzImage);
    assert_eq!(state.entry, GuestAddress(0x10_0200));
    let mut payload = vec![0u8; 0x4000];
    mem.read_slice(&mut payload, GuestAddress(layout::KERNEL_START))
        .unwrap();
    assert_eq!(payload, image[1024..]);

    let hdr = read_params(&mem).hdr;
    assert_eq!({ hdr.version }, 0x020f);
    assert_eq!({ hdr.xloadflags }, 0x3);
    assert_eq!({ hdr.code32_start }, 0x10_0000);
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.cmdline_size }, 5);
    // initrd_addr_max 0x37ffffff caps the initramfs below 896 MiB.
    assert_eq!({ hdr.ramdisk_image }, 0x3800_0000 - 0x2000);
    assert_eq!({ hdr.ramdisk_size }, 0x1800);
    // The kernel needs its decompression area: 16 MiB + init_size.
    assert_eq!(state.writes[0].len, 0x180_0000 - layout::KERNEL_START);
}

fn error_of(mem: &GuestMemoryMmap, cfg: &BootConfig) -> String {
    load_linux(mem, cfg).unwrap_err().to_string()
}

/// What the CLI prints for a file that is not a kernel.
fn not_a_kernel(file: &TempFile, reason: &str) -> String {
    format!(
        "{} is not a bootable x86-64 Linux kernel: {reason}",
        file.as_path().display()
    )
}

#[test]
fn unreadable_and_garbage_kernels() {
    let mem = memory(64 * MIB);
    assert_eq!(
        error_of(&mem, &config(Path::new("/nonexistent/vmlinux"))),
        "cannot read kernel image /nonexistent/vmlinux: No such file or directory (os error 2)"
    );
    let garbage = file_with(&[0x42; 4096]);
    assert_eq!(
        error_of(&mem, &config(garbage.as_path())),
        not_a_kernel(&garbage, "neither an ELF vmlinux nor a bzImage")
    );
    let empty = file_with(&[]);
    assert_eq!(
        error_of(&mem, &config(empty.as_path())),
        not_a_kernel(&empty, "neither an ELF vmlinux nor a bzImage")
    );
}

#[test]
fn truncated_and_foreign_elf_files() {
    let mem = memory(64 * MIB);
    let full = synthetic_elf(EM_X86_64, 0x100_0000, &CODE, 0x1000);
    let cut = file_with(&full[..full.len() - 3]);
    assert_eq!(
        error_of(&mem, &config(cut.as_path())),
        not_a_kernel(
            &cut,
            "truncated: segment 0 ends at byte 128, the file has 125"
        )
    );
    let header_only = file_with(&full[..20]);
    assert_eq!(
        error_of(&mem, &config(header_only.as_path())),
        not_a_kernel(&header_only, "truncated ELF header")
    );
    let arm = file_with(&synthetic_elf(EM_AARCH64, 0x100_0000, &CODE, 0x1000));
    assert_eq!(
        error_of(&mem, &config(arm.as_path())),
        not_a_kernel(&arm, "an ELF file for machine 183, not x86-64")
    );
    let low = file_with(&synthetic_elf(EM_X86_64, 0x8000, &CODE, 0x1000));
    assert_eq!(
        error_of(&mem, &config(low.as_path())),
        not_a_kernel(&low, "segment 0 loads at 0x8000, below 0x100000")
    );
}

#[test]
fn bzimages_without_64_bit_entry() {
    let mem = memory(64 * MIB);
    let no64 = file_with(&synthetic_bzimage(0x020f, 0, 0x4000));
    assert_eq!(
        error_of(&mem, &config(no64.as_path())),
        not_a_kernel(&no64, "a bzImage without a 64-bit entry point")
    );
    let old = file_with(&synthetic_bzimage(0x020a, 0, 0x4000));
    assert_eq!(
        error_of(&mem, &config(old.as_path())),
        not_a_kernel(
            &old,
            "boot protocol 2.10, 2.12 or later is needed for 64-bit entry"
        )
    );
}

#[test]
fn memory_too_small_for_kernel_or_initramfs() {
    let mem = memory(64 * MIB);
    let big = file_with(&synthetic_elf(EM_X86_64, 0x100_0000, &CODE, 64 * MIB));
    assert_eq!(
        error_of(&mem, &config(big.as_path())),
        format!(
            "guest memory is too small for {}: it needs RAM up to 80 MiB, the guest has 64 MiB below the PCI hole",
            big.as_path().display()
        )
    );

    let small = memory(20 * MIB);
    let kernel = file_with(&synthetic_elf(EM_X86_64, 0x100_0000, &CODE, 2 * MIB));
    let initrd = file_with(&vec![0u8; (3 * MIB) as usize]);
    let cfg = BootConfig {
        initramfs: Some(initrd.as_path().to_owned()),
        ..config(kernel.as_path())
    };
    assert_eq!(
        error_of(&small, &cfg),
        format!(
            "guest memory is too small for {}: it needs RAM up to 21 MiB, the guest has 20 MiB below the PCI hole",
            initrd.as_path().display()
        )
    );

    let missing = BootConfig {
        initramfs: Some("/nonexistent/initramfs.cpio".into()),
        ..config(kernel.as_path())
    };
    assert_eq!(
        error_of(&small, &missing),
        "cannot read initramfs /nonexistent/initramfs.cpio: No such file or directory (os error 2)"
    );
}

#[test]
fn command_line_limits() {
    let mem = memory(64 * MIB);
    let kernel = file_with(&synthetic_elf(EM_X86_64, 0x100_0000, &CODE, 0x1000));
    let long = BootConfig {
        cmdline: "x".repeat(layout::CMDLINE_MAX_SIZE),
        ..config(kernel.as_path())
    };
    assert_eq!(
        error_of(&mem, &long),
        format!(
            "kernel command line is {} bytes, the limit is {}",
            layout::CMDLINE_MAX_SIZE,
            layout::CMDLINE_MAX_SIZE - 1
        )
    );
    let nul = BootConfig {
        cmdline: "a\0b".into(),
        ..config(kernel.as_path())
    };
    assert_eq!(
        error_of(&mem, &nul),
        "kernel command line contains a NUL byte"
    );
    // A bzImage's own limit (cmdline_size 2047) applies.
    let bz = file_with(&synthetic_bzimage(0x020f, 0x3, 0x4000));
    let over = BootConfig {
        cmdline: "y".repeat(2048),
        ..config(bz.as_path())
    };
    assert_eq!(
        error_of(&memory(GIB), &over),
        "kernel command line is 2048 bytes, the limit is 2047"
    );
}
