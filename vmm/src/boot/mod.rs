//! Direct 64-bit Linux boot: the kernel (ELF vmlinux or bzImage), the
//! initramfs, the command line, boot_params with the E820 map, and the
//! boot vCPU's entry state.
//!
//! [`load_linux`] writes everything into guest memory and returns a
//! [`BootState`]; the machine applies it to vCPU 0 (no KVM ioctl here):
//!
//! ```text
//! let state = boot::load_linux(&mem, &config)?;
//! vcpu0.set_regs(&state.regs())?;
//! let mut sregs = vcpu0.get_sregs()?;
//! state.apply_sregs(&mut sregs);
//! vcpu0.set_sregs(&sregs)?;
//! ```
//!
//! The entry state follows the 64-bit boot protocol: long mode with paging,
//! the first 4 GiB identity-mapped with 2 MiB pages (no CPUID feature
//! needed beyond long mode itself, unlike 1 GiB pages), CS = __BOOT_CS
//! (0x10) and DS/ES/SS = __BOOT_DS (0x18) from a GDT at
//! `layout::BOOT_GDT_START`, interrupts disabled, RSI = boot_params.

mod cpu;
mod e820;
mod kernel;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE};
use log::info;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::layout;

pub use cpu::IDENTITY_MAPPED_GIB;
pub use e820::{e820_entries, e820_map, E820Entry, E820Type};
pub use kernel::KernelFormat;

/// boot_params.hdr.boot_flag.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// boot_params.hdr.header: "HdrS".
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// boot_params.hdr.type_of_loader: "undefined" boot loader.
pub const TYPE_OF_LOADER_UNDEFINED: u8 = 0xff;
/// Physical alignment of a relocatable x86-64 kernel (2 MiB), written for an
/// ELF vmlinux, which has no setup header of its own.
const ELF_KERNEL_ALIGNMENT: u32 = 0x20_0000;
/// Highest initramfs address an x86-64 kernel accepts by default (its
/// header's initrd_addr_max); used for an ELF vmlinux.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// Initramfs placement granularity.
const PAGE_SIZE: u64 = 0x1000;

/// What to boot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// An ELF vmlinux or a bzImage.
    pub kernel: PathBuf,
    /// An initramfs (cpio, compressed or not), placed at the top of low RAM.
    pub initramfs: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// The RSDP's address, from `acpi::create_acpi_tables`.
    pub rsdp: Option<GuestAddress>,
}

/// Errors preparing a boot. Each message is one line naming the problem.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel image {}: {source}", path.display())]
    KernelRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The initramfs file cannot be opened or read.
    #[error("cannot read initramfs {}: {source}", path.display())]
    InitramfsRead {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a kernel this VMM can boot.
    #[error("{} is not a bootable x86-64 Linux kernel: {reason}", path.display())]
    NotAKernel {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Guest RAM below the MMIO hole is too small for an image.
    #[error(
        "guest memory is too small for {}: it needs RAM up to {} MiB, the guest has {} MiB below the PCI hole",
        path.display(), needed.div_ceil(1 << 20), available >> 20
    )]
    MemoryTooSmall {
        /// The kernel or initramfs file.
        path: PathBuf,
        /// Address up to which RAM is needed.
        needed: u64,
        /// End of RAM below the MMIO hole.
        available: u64,
    },
    /// The command line does not fit.
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The longest accepted, without the terminating NUL.
        max: usize,
    },
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Writing to guest memory failed.
    #[error("cannot write the {what} to guest memory: {source}")]
    GuestMemory {
        /// What was being written.
        what: &'static str,
        /// Why it failed.
        source: GuestMemoryError,
    },
}

/// A range of guest memory [`load_linux`] wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryWrite {
    /// What the range holds.
    pub what: &'static str,
    /// First address.
    pub start: GuestAddress,
    /// Length in bytes.
    pub len: u64,
}

/// The boot vCPU's entry state and what was written to memory.
#[derive(Clone, Debug)]
pub struct BootState {
    /// The kernel's format.
    pub kernel_format: KernelFormat,
    /// The 64-bit entry point (RIP).
    pub entry: GuestAddress,
    /// boot_params (RSI).
    pub boot_params: GuestAddress,
    /// The initramfs, if any: start and length.
    pub initramfs: Option<(GuestAddress, u64)>,
    /// Every range written, in order.
    pub writes: Vec<MemoryWrite>,
}

impl BootState {
    /// The general-purpose registers for vCPU 0: RIP at the entry point,
    /// RSI pointing at boot_params, RSP/RBP at the boot stack, interrupts
    /// disabled.
    pub fn regs(&self) -> kvm_regs {
        kvm_regs {
            rip: self.entry.0,
            rsi: self.boot_params.0,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rflags: cpu::RFLAGS_RESERVED_ONE,
            ..Default::default()
        }
    }

    /// Sets the long-mode fields of `sregs` (read from the vCPU first, so
    /// that the APIC base and the rest keep KVM's values): CR0/CR3/CR4,
    /// EFER, GDT, an empty IDT, CS/DS/ES/FS/GS/SS and TR.
    pub fn apply_sregs(&self, sregs: &mut kvm_sregs) {
        sregs.cr0 = cpu::cr0::PE | cpu::cr0::ET | cpu::cr0::NE | cpu::cr0::PG;
        sregs.cr3 = layout::BOOT_PML4_START;
        sregs.cr4 = cpu::cr4::PAE;
        sregs.efer |= cpu::efer::LME | cpu::efer::LMA;
        sregs.gdt = cpu::gdt_register();
        // The kernel loads its own IDT before it enables interrupts.
        sregs.idt = kvm_dtable::default();
        sregs.cs = cpu::BOOT_CS.to_kvm_segment(cpu::BOOT_CS_SELECTOR);
        let data = cpu::BOOT_DS.to_kvm_segment(cpu::BOOT_DS_SELECTOR);
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = cpu::BOOT_TSS.to_kvm_segment(cpu::BOOT_TSS_SELECTOR);
    }
}

/// One past the last RAM address below the MMIO hole, if RAM starts at 0.
fn low_ram_end<M: GuestMemoryBackend>(mem: &M) -> u64 {
    let mut end = 0;
    let mut ranges = e820::memory_regions(mem);
    ranges.sort();
    for (start, size) in ranges {
        if start == end && start < layout::MMIO_HOLE_START {
            end = (start + size).min(layout::MMIO_HOLE_START);
        }
    }
    end
}

/// Records writes and turns guest-memory errors into [`BootError`].
struct Writer<'a, M> {
    mem: &'a M,
    writes: Vec<MemoryWrite>,
}

impl<M: GuestMemoryBackend> Writer<'_, M> {
    fn write(&mut self, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| BootError::GuestMemory { what, source })?;
        self.record(what, addr, bytes.len() as u64);
        Ok(())
    }

    fn record(&mut self, what: &'static str, addr: u64, len: u64) {
        self.writes.push(MemoryWrite {
            what,
            start: GuestAddress(addr),
            len,
        });
    }
}

/// Loads the initramfs at the top of low RAM, page-aligned, below
/// `addr_max` and above `kernel_end`. Returns its address and length.
fn load_initramfs<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    kernel_end: u64,
    top: u64,
) -> Result<(u64, u64), BootError> {
    let read_error = |source| BootError::InitramfsRead {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let len = file.metadata().map_err(read_error)?.len();
    let too_small = || BootError::MemoryTooSmall {
        path: path.to_owned(),
        needed: kernel_end.next_multiple_of(PAGE_SIZE) + len,
        available: top,
    };
    let addr = top
        .checked_sub(len)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|&a| a >= kernel_end)
        .ok_or_else(too_small)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len as usize)
        .map_err(|source| match source {
            GuestMemoryError::IOError(source) => read_error(source),
            source => BootError::GuestMemory {
                what: "initramfs",
                source,
            },
        })?;
    Ok((addr, len))
}

/// Loads the kernel, the initramfs and the command line, writes boot_params,
/// the GDT and the page tables, and returns vCPU 0's entry state.
pub fn load_linux<M: GuestMemoryBackend>(
    mem: &M,
    config: &BootConfig,
) -> Result<BootState, BootError> {
    let ram_end = low_ram_end(mem);
    let kernel = kernel::load_kernel(mem, &config.kernel, ram_end)?;
    let mut w = Writer {
        mem,
        writes: Vec::new(),
    };
    w.record("kernel", kernel.start.0, kernel.end - kernel.start.0);

    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => params.hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT,
    }
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = SETUP_HEADER_MAGIC;
    params.hdr.type_of_loader = TYPE_OF_LOADER_UNDEFINED;

    // Command line, NUL-terminated.
    let mut max = layout::CMDLINE_MAX_SIZE - 1;
    if kernel.setup_header.is_some() && params.hdr.cmdline_size != 0 {
        max = max.min(params.hdr.cmdline_size as usize);
    }
    if config.cmdline.len() > max {
        return Err(BootError::CmdlineTooLong {
            len: config.cmdline.len(),
            max,
        });
    }
    if config.cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let cmdline = [config.cmdline.as_bytes(), &[0]].concat();
    w.write("command line", layout::CMDLINE_START, &cmdline)?;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = config.cmdline.len() as u32;

    let mut initramfs = None;
    if let Some(path) = &config.initramfs {
        let addr_max = match kernel.setup_header {
            Some(hdr) if hdr.initrd_addr_max != 0 => u64::from(hdr.initrd_addr_max),
            _ => DEFAULT_INITRD_ADDR_MAX,
        };
        let top = ram_end.min(addr_max + 1);
        let (addr, len) = load_initramfs(mem, path, kernel.end, top)?;
        w.record("initramfs", addr, len);
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = len as u32;
        params.ext_ramdisk_size = (len >> 32) as u32;
        initramfs = Some((GuestAddress(addr), len));
    }

    let e820 = e820_map(mem);
    for (slot, entry) in params
        .e820_table
        .iter_mut()
        .zip(e820.iter().take(E820_MAX_ENTRIES_ZEROPAGE))
    {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = e820.len().min(E820_MAX_ENTRIES_ZEROPAGE) as u8;
    if let Some(rsdp) = config.rsdp {
        params.acpi_rsdp_addr = rsdp.0;
    }
    mem.write_obj(params, GuestAddress(layout::ZERO_PAGE_START))
        .map_err(|source| BootError::GuestMemory {
            what: "boot_params",
            source,
        })?;
    w.record(
        "boot_params",
        layout::ZERO_PAGE_START,
        std::mem::size_of::<boot_params>() as u64,
    );

    let gdt: Vec<u8> = cpu::gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    w.write("GDT", layout::BOOT_GDT_START, &gdt)?;
    for table in cpu::identity_page_tables() {
        let bytes: Vec<u8> = table.entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        w.write("page table", table.addr, &bytes)?;
    }

    info!(
        "boot: {:?} kernel at {:#x}..{:#x}, entry {:#x}{}",
        kernel.format,
        kernel.start.0,
        kernel.end,
        kernel.entry.0,
        initramfs
            .map(|(a, l)| format!(", initramfs {l} bytes at {:#x}", a.0))
            .unwrap_or_default()
    );
    Ok(BootState {
        kernel_format: kernel.format,
        entry: kernel.entry,
        boot_params: GuestAddress(layout::ZERO_PAGE_START),
        initramfs,
        writes: w.writes,
    })
}
