//! Guest linear-address accesses on behalf of an emulated instruction.
//!
//! Translation walks the guest's IA-32e page tables (64-bit and
//! compatibility mode) with the vIOMMU's first-level walker
//! ([`viommu::paging`], the same format), configured from the vCPU's
//! CR0/CR3/CR4/EFER/RFLAGS. A walk fault becomes the #PF the CPU would
//! raise, with its architectural error code and CR2. Outside long mode a
//! linear address is the physical one with paging off, and goes through
//! the 32-bit or PAE tables with paging on ([`super::legacy_paging`]).

use viommu::paging::{self, AccessType, WalkConfig, WalkFault};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion};

use super::context::{CpuContext, LINEAR32_MASK};
use super::exception::Exception;
use super::legacy_paging::{self, LegacyPaging};
use super::GuestCpu;
use crate::x86::{cr0, cr4, efer, rflags, CR3_ROOT_MASK};

/// Size of the smallest page: accesses are split at this granularity.
pub(crate) const PAGE_SIZE: u64 = 4096;

/// Longest x86 instruction.
pub(crate) const MAX_INSN_LEN: usize = 15;

/// What an access does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AccessKind {
    Read,
    Write,
    Fetch,
}

/// On whose behalf an access is made (SDM Vol. 3A, 4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Privilege {
    /// A user-mode access (CPL 3).
    User,
    /// An explicit supervisor-mode access (CPL 0-2): RFLAGS.AC=1 lifts SMAP.
    Supervisor,
    /// An implicit supervisor-mode access (descriptor tables, the exception
    /// frame): SMAP applies regardless of RFLAGS.AC.
    Implicit,
}

impl Privilege {
    /// The privilege of an instruction's explicit data accesses.
    pub fn of(ctx: &CpuContext) -> Self {
        if ctx.cpl() == 3 {
            Privilege::User
        } else {
            Privilege::Supervisor
        }
    }
}

/// Why a linear access did not complete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AccessError {
    /// The guest takes this exception.
    Fault(Exception),
    /// The address translated to guest-physical memory that is not RAM
    /// (a device): the emulator does not read devices.
    NotRam { gpa: u64 },
    /// Other vCPUs kept changing the paging entries while the walker set
    /// accessed/dirty flags: the instruction is to be executed again.
    Contended,
}

impl From<Exception> for AccessError {
    fn from(e: Exception) -> Self {
        AccessError::Fault(e)
    }
}

fn walk_config(ctx: &CpuContext, privilege: Privilege, set_accessed_dirty: bool) -> WalkConfig {
    let s = &ctx.sregs;
    let smap_on = s.cr4 & cr4::SMAP != 0;
    let ac = ctx.regs.rflags & rflags::AC != 0;
    WalkConfig {
        levels: ctx.paging_levels(),
        nxe: s.efer & efer::NXE != 0,
        write_protect: s.cr0 & cr0::WP != 0,
        smep: s.cr4 & cr4::SMEP != 0,
        // An explicit supervisor access with RFLAGS.AC=1 is exempt from SMAP.
        smap: smap_on && !(privilege == Privilege::Supervisor && ac),
        set_accessed_dirty,
        page_1g: ctx.features.page_1g,
        phys_addr_bits: ctx.features.phys_addr_bits,
    }
}

/// The exception (or retry) a walk fault becomes (SDM Vol. 3A, 4.7).
fn fault_to_access_error(
    fault: WalkFault,
    va: u64,
    access: AccessType,
    cfg: &WalkConfig,
) -> AccessError {
    let code = match fault {
        WalkFault::NonCanonical => return AccessError::Fault(Exception::gp0()),
        WalkFault::Contended => return AccessError::Contended,
        // An entry outside guest memory reads as all ones on real hardware
        // (bits above MAXPHYADDR are reserved): a reserved-bit #PF.
        WalkFault::TableOutsideMemory { .. } => {
            WalkFault::ReservedBit { level: 0 }.page_fault_error_code(access, cfg)
        }
        _ => fault.page_fault_error_code(access, cfg),
    };
    match code {
        Some(code) => AccessError::Fault(Exception::page_fault(code, va)),
        None => AccessError::Fault(Exception::gp0()),
    }
}

/// Translates one linear address to a guest-physical address.
pub(crate) fn translate<M: GuestMemory>(
    mem: &M,
    ctx: &CpuContext,
    va: u64,
    kind: AccessKind,
    privilege: Privilege,
) -> Result<u64, AccessError> {
    let access = AccessType {
        write: kind == AccessKind::Write,
        user: privilege == Privilege::User,
        execute: kind == AccessKind::Fetch,
    };
    // The emulator's own peeks (instruction bytes, descriptor tables, the
    // exception frame) are reads the CPU already made or would make; only
    // an instruction's data accesses set accessed/dirty bits.
    let set_ad = kind != AccessKind::Fetch && privilege != Privilege::Implicit;
    let mut cfg = walk_config(ctx, privilege, set_ad);
    if ctx.sregs.efer & efer::LMA == 0 {
        // Protected or real mode: linear addresses are 32 bits; with
        // paging off a linear address is the physical address.
        let va = va & LINEAR32_MASK;
        if ctx.sregs.cr0 & cr0::PG == 0 {
            return Ok(va);
        }
        let mode = if ctx.sregs.cr4 & cr4::PAE != 0 {
            LegacyPaging::Pae
        } else {
            LegacyPaging::Bits32 {
                pse: ctx.sregs.cr4 & cr4::PSE != 0,
            }
        };
        // Execute-disable exists in PAE paging only.
        cfg.nxe &= mode == LegacyPaging::Pae;
        return legacy_paging::walk(mem, mode, ctx.sregs.cr3, va, access, &cfg)
            .map_err(|f| fault_to_access_error(f, va, access, &cfg));
    }
    let root = ctx.sregs.cr3 & CR3_ROOT_MASK;
    paging::walk(mem, root, va, access, &cfg)
        .map(|t| t.phys_addr)
        .map_err(|f| fault_to_access_error(f, va, access, &cfg))
}

/// Splits `[va, va + len)` at page boundaries: (linear address, length).
fn page_chunks(va: u64, len: usize) -> impl Iterator<Item = (u64, usize)> {
    let mut addr = va;
    let mut left = len;
    std::iter::from_fn(move || {
        if left == 0 {
            return None;
        }
        let in_page = (PAGE_SIZE - (addr % PAGE_SIZE)) as usize;
        let n = in_page.min(left);
        let chunk = (addr, n);
        addr = addr.wrapping_add(n as u64);
        left -= n;
        Some(chunk)
    })
}

/// The guest-physical pieces of a linear range, one per page, every page
/// translated before any is used. A range of up to two pages (every
/// operand, descriptor, exception frame and instruction the emulator reads)
/// needs no allocation: emulated instructions sit on the trap path.
struct Pieces {
    inline: [(u64, usize); 2],
    count: usize,
    more: Vec<(u64, usize)>,
}

impl Pieces {
    fn translate<M: GuestMemory>(
        mem: &M,
        ctx: &CpuContext,
        va: u64,
        len: usize,
        kind: AccessKind,
        privilege: Privilege,
    ) -> Result<Self, AccessError> {
        let mut pieces = Pieces {
            inline: [(0, 0); 2],
            count: 0,
            more: Vec::new(),
        };
        for (addr, n) in page_chunks(va, len) {
            let piece = (translate(mem, ctx, addr, kind, privilege)?, n);
            match pieces.inline.get_mut(pieces.count) {
                Some(slot) => *slot = piece,
                None => pieces.more.push(piece),
            }
            pieces.count += 1;
        }
        Ok(pieces)
    }

    /// (guest-physical address, length), in order.
    fn iter(&self) -> impl Iterator<Item = (u64, usize)> + '_ {
        let inline = self.count.min(self.inline.len());
        self.inline[..inline].iter().chain(&self.more).copied()
    }
}

/// Reads `buf.len()` bytes at linear address `va`. Every page is translated
/// before any byte is read, so a fault on the second page of a split access
/// reports that page (CR2 = first byte on it) and reads nothing.
pub(crate) fn read_linear<M: GuestMemory>(
    mem: &M,
    ctx: &CpuContext,
    va: u64,
    buf: &mut [u8],
    kind: AccessKind,
    privilege: Privilege,
) -> Result<(), AccessError> {
    let pieces = Pieces::translate(mem, ctx, va, buf.len(), kind, privilege)?;
    let mut off = 0;
    for (gpa, len) in pieces.iter() {
        mem.read_slice(&mut buf[off..off + len], GuestAddress(gpa))
            .map_err(|_| AccessError::NotRam { gpa })?;
        off += len;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at linear address `va` as a CPU's data read
/// does: every page is translated first (a fault reads nothing), then each
/// byte comes from RAM or, where the guest-physical address is not RAM,
/// from the vCPU's [`GuestCpu::read_device`] (a device's registers, or all
/// ones where no device answers), in naturally aligned pieces of at most 8
/// bytes. A range that straddles the end of RAM reads its RAM bytes from
/// RAM and the rest from the bus.
pub(crate) fn read_linear_any<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    ctx: &CpuContext,
    va: u64,
    buf: &mut [u8],
    privilege: Privilege,
) -> Result<(), AccessError> {
    let pieces = Pieces::translate(
        cpu.memory(),
        ctx,
        va,
        buf.len(),
        AccessKind::Read,
        privilege,
    )?;
    let mut off = 0;
    for (gpa, len) in pieces.iter() {
        read_physical_any(cpu, gpa, &mut buf[off..off + len]);
        off += len;
    }
    Ok(())
}

/// Reads `buf.len()` bytes at guest-physical `gpa` from RAM where it is RAM
/// and from the vCPU's devices elsewhere (see [`read_linear_any`]).
fn read_physical_any<C: GuestCpu + ?Sized>(cpu: &mut C, gpa: u64, buf: &mut [u8]) {
    let mut off = 0;
    while off < buf.len() {
        let at = gpa.wrapping_add(off as u64);
        let left = buf.len() - off;
        let mem = cpu.memory();
        if let Some(region) = mem.find_region(GuestAddress(at)) {
            // The RAM run: up to the end of this region (or of the buffer).
            let region_end = region.start_addr().0.saturating_add(region.len());
            let n = usize::try_from(region_end - at).map_or(left, |in_region| in_region.min(left));
            if mem
                .read_slice(&mut buf[off..off + n], GuestAddress(at))
                .is_err()
            {
                buf[off..off + n].fill(0xff);
            }
            off += n;
        } else {
            // The largest naturally aligned piece of at most 8 bytes.
            let mut n = 8usize.min(left);
            while n > 1 && (at % n as u64 != 0 || !n.is_power_of_two()) {
                n -= 1;
            }
            cpu.read_device(at, &mut buf[off..off + n]);
            off += n;
        }
    }
}

/// Up to [`MAX_INSN_LEN`] instruction bytes, kept on the stack.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InsnBytes {
    bytes: [u8; MAX_INSN_LEN],
    len: usize,
}

impl std::ops::Deref for InsnBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Fetches up to 15 instruction bytes at `rip` (an offset in CS outside
/// 64-bit mode: [`CpuContext::code_linear`]). The first page must be
/// reachable; bytes on a following page that cannot be fetched are left out
/// (the decoder then sees a truncated instruction only if it really spans
/// into that page).
pub(crate) fn fetch_instruction<M: GuestMemory>(
    mem: &M,
    ctx: &CpuContext,
    rip: u64,
    privilege: Privilege,
) -> Result<InsnBytes, AccessError> {
    let mut insn = InsnBytes {
        bytes: [0; MAX_INSN_LEN],
        len: 0,
    };
    for (i, (addr, len)) in page_chunks(ctx.code_linear(rip), MAX_INSN_LEN).enumerate() {
        let chunk = &mut insn.bytes[insn.len..insn.len + len];
        match read_linear(mem, ctx, addr, chunk, AccessKind::Fetch, privilege) {
            Ok(()) => insn.len += len,
            Err(e) if i == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(insn)
}
