//! Recognising and loading the kernel image: an ELF vmlinux or a bzImage.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::elf::{self as elf_abi, Elf64_Ehdr, Elf64_Phdr};
use linux_loader::loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryBackend};

use super::BootError;
use crate::layout;

/// Where the setup header sits in a bzImage.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// The setup header's "HdrS" magic.
const SETUP_HEADER_MAGIC: u32 = 0x5372_6448;
/// Boot protocol 2.12 introduced xloadflags (and with it XLF_KERNEL_64).
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// The 64-bit entry point is this far into the protected-mode kernel.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;
/// A bzImage's real-mode part is (setup_sects + 1) sectors of 512 bytes;
/// setup_sects 0 means 4.
const SECTOR_SIZE: u64 = 512;
const DEFAULT_SETUP_SECTS: u64 = 4;
/// ELF identification bytes.
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

/// The kind of kernel image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF vmlinux, loaded at its physical addresses.
    Elf,
    /// A bzImage, whose protected-mode part is loaded at KERNEL_START.
    BzImage,
}

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// The image's format.
    pub format: KernelFormat,
    /// Lowest address written.
    pub start: GuestAddress,
    /// One past the highest address the kernel needs before it reads the
    /// memory map (image, bss, and for a bzImage the decompression area).
    pub end: u64,
    /// The 64-bit entry point.
    pub entry: GuestAddress,
    /// The bzImage setup header, to copy into boot_params.
    pub setup_header: Option<setup_header>,
}

fn not_a_kernel(path: &Path, reason: impl Into<String>) -> BootError {
    BootError::NotAKernel {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// Reads a plain-old-data structure at `offset`, or `None` if the file ends
/// first.
fn read_pod<T: ByteValued + Default>(file: &mut File, offset: u64) -> std::io::Result<Option<T>> {
    let mut value = T::default();
    file.seek(SeekFrom::Start(offset))?;
    match file.read_exact(value.as_mut_slice()) {
        Ok(()) => Ok(Some(value)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Recognises and loads the kernel at `path` into `mem`, whose RAM below
/// the MMIO hole ends at `low_ram_end`.
pub fn load_kernel<M: GuestMemoryBackend>(
    mem: &M,
    path: &Path,
    low_ram_end: u64,
) -> Result<LoadedKernel, BootError> {
    let read_error = |source| BootError::KernelRead {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let file_len = file.metadata().map_err(read_error)?.len();
    let magic: Option<[u8; 4]> = read_pod(&mut file, 0).map_err(read_error)?;
    let hdr_magic: Option<u32> =
        read_pod(&mut file, SETUP_HEADER_OFFSET + 0x11).map_err(read_error)?;
    let format = match (magic, hdr_magic) {
        (Some(ELF_MAGIC), _) => KernelFormat::Elf,
        (_, Some(SETUP_HEADER_MAGIC)) => KernelFormat::BzImage,
        _ => return Err(not_a_kernel(path, "neither an ELF vmlinux nor a bzImage")),
    };
    let (start, end) = match format {
        KernelFormat::Elf => elf_extent(&mut file, path, file_len).map_err(|e| e.or_io(path))?,
        KernelFormat::BzImage => {
            bzimage_extent(&mut file, path, file_len).map_err(|e| e.or_io(path))?
        }
    };
    if end > low_ram_end {
        return Err(BootError::MemoryTooSmall {
            path: path.to_owned(),
            needed: end,
            available: low_ram_end,
        });
    }
    let kernel_start = GuestAddress(layout::KERNEL_START);
    let loaded = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, Some(kernel_start)),
        KernelFormat::BzImage => {
            BzImage::load(mem, Some(kernel_start), &mut file, Some(kernel_start))
        }
    }
    .map_err(|e| not_a_kernel(path, e.to_string()))?;
    let entry = match format {
        KernelFormat::Elf => loaded.kernel_load,
        KernelFormat::BzImage => GuestAddress(loaded.kernel_load.0 + BZIMAGE_ENTRY_64_OFFSET),
    };
    Ok(LoadedKernel {
        format,
        start: GuestAddress(start),
        end: end.max(loaded.kernel_end),
        entry,
        setup_header: loaded.setup_header,
    })
}

/// A failure while scanning the image's headers.
enum ScanError {
    Io(std::io::Error),
    Invalid(BootError),
}

impl ScanError {
    fn or_io(self, path: &Path) -> BootError {
        match self {
            ScanError::Io(source) => BootError::KernelRead {
                path: path.to_owned(),
                source,
            },
            ScanError::Invalid(e) => e,
        }
    }
}

impl From<std::io::Error> for ScanError {
    fn from(e: std::io::Error) -> Self {
        ScanError::Io(e)
    }
}

/// Checks an ELF vmlinux's headers and returns the physical range
/// `[start, end)` of its loadable segments.
///
/// linux-loader loads the segments; this scan exists so that a truncated
/// file and a guest too small for the kernel get their own error instead of
/// the loader's generic "unable to read kernel image".
fn elf_extent(file: &mut File, path: &Path, file_len: u64) -> Result<(u64, u64), ScanError> {
    let invalid = |reason: String| ScanError::Invalid(not_a_kernel(path, reason));
    let ehdr: Elf64_Ehdr =
        read_pod(file, 0)?.ok_or_else(|| invalid("truncated ELF header".into()))?;
    if ehdr.e_ident[elf_abi::EI_CLASS] != elf_abi::ELFCLASS64 {
        return Err(invalid("a 32-bit ELF file".into()));
    }
    if ehdr.e_machine != elf_abi::EM_X86_64 {
        return Err(invalid(format!(
            "an ELF file for machine {}, not x86-64",
            ehdr.e_machine
        )));
    }
    if usize::from(ehdr.e_phentsize) != std::mem::size_of::<Elf64_Phdr>() {
        return Err(invalid(format!(
            "ELF program headers of {} bytes",
            ehdr.e_phentsize
        )));
    }
    let mut extent: Option<(u64, u64)> = None;
    for index in 0..u64::from(ehdr.e_phnum) {
        let at = ehdr.e_phoff + index * std::mem::size_of::<Elf64_Phdr>() as u64;
        let phdr: Elf64_Phdr = read_pod(file, at)?
            .ok_or_else(|| invalid(format!("truncated: program header {index} is cut off")))?;
        if phdr.p_type != elf_abi::PT_LOAD || phdr.p_memsz == 0 {
            continue;
        }
        let file_end = phdr.p_offset.saturating_add(phdr.p_filesz);
        if file_end > file_len {
            return Err(invalid(format!(
                "truncated: segment {index} ends at byte {file_end}, the file has {file_len}"
            )));
        }
        if phdr.p_paddr < layout::KERNEL_START {
            return Err(invalid(format!(
                "segment {index} loads at {:#x}, below {:#x}",
                phdr.p_paddr,
                layout::KERNEL_START
            )));
        }
        let end = phdr.p_paddr.saturating_add(phdr.p_memsz);
        extent = Some(match extent {
            Some((s, e)) => (s.min(phdr.p_paddr), e.max(end)),
            None => (phdr.p_paddr, end),
        });
    }
    extent.ok_or_else(|| invalid("an ELF file with no loadable segment".into()))
}

/// Checks a bzImage's setup header and returns `[start, end)`: from
/// KERNEL_START to the end of the payload or of the area the kernel
/// decompresses into, whichever is higher.
fn bzimage_extent(file: &mut File, path: &Path, file_len: u64) -> Result<(u64, u64), ScanError> {
    let invalid = |reason: String| ScanError::Invalid(not_a_kernel(path, reason));
    let hdr: setup_header = read_pod(file, SETUP_HEADER_OFFSET)?
        .ok_or_else(|| invalid("truncated bzImage setup header".into()))?;
    let version = hdr.version;
    if version < MIN_BOOT_PROTOCOL {
        return Err(invalid(format!(
            "boot protocol {}.{:02}, 2.12 or later is needed for 64-bit entry",
            version >> 8,
            version & 0xff
        )));
    }
    if hdr.xloadflags & XLF_KERNEL_64 == 0 || hdr.loadflags & LOADED_HIGH == 0 {
        return Err(invalid("a bzImage without a 64-bit entry point".into()));
    }
    let setup_sects = match u64::from(hdr.setup_sects) {
        0 => DEFAULT_SETUP_SECTS,
        n => n,
    };
    let setup_len = (setup_sects + 1) * SECTOR_SIZE;
    let payload = file_len
        .checked_sub(setup_len)
        .filter(|&p| p > BZIMAGE_ENTRY_64_OFFSET)
        .ok_or_else(|| {
            invalid(format!(
                "truncated: {file_len} bytes, the setup code alone takes {setup_len}"
            ))
        })?;
    // The decompressor runs at KERNEL_START rounded up to the kernel's
    // alignment, or at its preferred address if that is higher.
    let alignment = u64::from(hdr.kernel_alignment).max(1);
    let run_at = layout::KERNEL_START
        .next_multiple_of(alignment)
        .max(hdr.pref_address);
    let end = (layout::KERNEL_START + payload).max(run_at + u64::from(hdr.init_size));
    Ok((layout::KERNEL_START, end))
}
