//! A guest-side driver library for SVA micro-guests: Rust functions that
//! emit the code a guest kernel runs to drive the vIOMMU and the vDSA.
//!
//! The host only computes values (table entries, register images,
//! descriptors); every store into guest memory and every register access
//! is an instruction of the guest program, in the order a driver does it:
//!
//! - [`vtd`]: scalable-mode root, context, PASID-directory and PASID-table
//!   entries; the remapping unit's registers (RTADDR, GCMD/GSTS, queued
//!   invalidation with wait descriptors, the page request queue) and the
//!   page group response.
//! - [`ecam`]: PCI configuration through ECAM: identity check, BAR sizing
//!   and assignment, bus master, and the PASID, ATS and PRI enables.
//! - [`dsa`]: the vDSA's BAR0: Reset Device, GRPCFG, WQCFG, Enable Device,
//!   Enable WQ with CMDSTS checks; descriptors and completion records.
//! - [`kernel`]: all of it in one call for one process and one vDSA, and
//!   the ENQCMD #GP fixup.
//!
//! # Conventions
//!
//! Emitted code clobbers `rax`, `rcx`, `rdx`, `rsi`, `rdi` and `r8`-`r11`;
//! `rbx`, `rbp` and `r12`-`r15` belong to the caller. A check that fails
//! ends the run through the test-exit port with
//! `FAILURE | step << 16 | (observed & 0xffff)` ([`GuestFailure`] decodes
//! it). Polls are bounded by a TSC budget, not an iteration count, so they
//! behave the same at CPL0 (emulated on this platform) and CPL3 (native).
//! Guest routines record what a test checks in the report area
//! ([`REPORT_START`], slots in [`slot`]).

pub mod dsa;
pub mod ecam;
pub mod kernel;
pub mod vtd;

use iced_x86::code_asm::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use vmm::layout;

/// Where the guest builds its VT-d translation structures (root table,
/// context tables, PASID directories and tables: 16 pages).
pub const VTD_TABLES_START: u64 = 0x40_0000;
/// Pages reserved for the translation structures.
pub const VTD_TABLES_PAGES: u64 = 16;
/// The invalidation queue (one page of 256-bit descriptors).
pub const INVALIDATION_QUEUE_START: u64 = 0x41_0000;
/// The status word invalidation wait descriptors write.
pub const QI_STATUS: u64 = 0x41_1000;
/// The page request queue (one page).
pub const PAGE_REQUEST_QUEUE_START: u64 = 0x41_2000;
/// Scratch page where runtime-built invalidation descriptors are composed.
pub const QI_SCRATCH: u64 = 0x41_3000;
/// The report area: one u64 per [`slot`].
pub const REPORT_START: u64 = 0x42_0000;

/// Where the guest assigns the vDSA's BAR0 (in the 32-bit window, which the
/// micro-guest's identity map covers).
pub const DSA_BAR0: u64 = layout::PCI_MMIO32_START;
/// Where the guest assigns the vDSA's BAR2 (portals).
pub const DSA_BAR2: u64 = layout::PCI_MMIO32_START + 0x10_0000;

/// Report slots: what guest routines record for the host to check.
pub mod slot {
    /// Size of BAR0 found by the sizing probe.
    pub const BAR0_SIZE: usize = 0;
    /// Size of BAR2 found by the sizing probe.
    pub const BAR2_SIZE: usize = 1;
    /// Offset of the PASID extended capability.
    pub const PASID_CAP: usize = 2;
    /// Offset of the ATS extended capability.
    pub const ATS_CAP: usize = 3;
    /// Offset of the PRI extended capability.
    pub const PRI_CAP: usize = 4;
    /// GENSTS after Enable Device.
    pub const GENSTS: usize = 5;
    /// First quadword of the last page request serviced.
    pub const PRQ_QW0: usize = 6;
    /// Second quadword of the last page request serviced.
    pub const PRQ_QW1: usize = 7;
    /// Number of page requests serviced.
    pub const PRQ_SERVICED: usize = 8;
    /// GSTS after translation enable.
    pub const GSTS: usize = 9;
    /// The vDSA's SWERROR, four quadwords (slots 10 to 13).
    pub const SWERROR: usize = 10;
    /// First slot free for test programs.
    pub const USER: usize = 16;
}

/// Exit values of failed checks carry this tag in bits 31:24.
pub const FAILURE: u32 = 0xfa00_0000;

/// TSC cycles a poll waits before it fails (a few seconds at the clock
/// rates of this project's machines).
pub const POLL_TSC_BUDGET: u64 = 12_000_000_000;

/// The check that failed, in a failure exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Step {
    /// GSTS never showed QIES after QIE.
    QueuedInvalidationEnable = 1,
    /// GSTS never showed RTPS after SRTP.
    SetRootTablePointer = 2,
    /// GSTS never showed TES after TE.
    TranslationEnable = 3,
    /// An invalidation wait descriptor never wrote its status.
    InvalidationWait = 4,
    /// The function's vendor/device ID is not the expected one.
    PciIdentity = 5,
    /// A BAR is not a 64-bit memory BAR.
    BarType = 6,
    /// An extended capability is missing.
    ExtendedCapability = 7,
    /// An administrative command never finished (CMDSTS.Active).
    CommandTimeout = 8,
    /// An administrative command finished with an error (low CMDSTS).
    CommandStatus = 9,
    /// GENSTS does not say Enabled after Enable Device.
    DeviceState = 10,
    /// A WQ is not enabled after Enable WQ (WQCFG status dword).
    WqState = 11,
    /// A completion record never got a status.
    CompletionTimeout = 12,
    /// No page request arrived in the page request queue.
    PageRequestTimeout = 13,
    /// A page request for an address outside the pages the guest can map.
    PageRequestAddress = 14,
    /// ENQCMD/ENQCMDS answered Retry too often.
    EnqueueRetry = 15,
    /// SWERROR never showed an error.
    SoftwareErrorTimeout = 16,
}

impl Step {
    const ALL: [Step; 16] = [
        Step::QueuedInvalidationEnable,
        Step::SetRootTablePointer,
        Step::TranslationEnable,
        Step::InvalidationWait,
        Step::PciIdentity,
        Step::BarType,
        Step::ExtendedCapability,
        Step::CommandTimeout,
        Step::CommandStatus,
        Step::DeviceState,
        Step::WqState,
        Step::CompletionTimeout,
        Step::PageRequestTimeout,
        Step::PageRequestAddress,
        Step::EnqueueRetry,
        Step::SoftwareErrorTimeout,
    ];

    /// The step with code `code`.
    pub fn from_code(code: u8) -> Option<Self> {
        Self::ALL.iter().copied().find(|s| *s as u8 == code)
    }
}

/// A failure exit, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestFailure {
    /// The check that failed.
    pub step: Step,
    /// The low 16 bits of the value the guest saw.
    pub observed: u16,
}

impl GuestFailure {
    /// Decodes a test-exit value; `None` unless it is a failure exit.
    pub fn decode(exit: u32) -> Option<Self> {
        if exit & 0xff00_0000 != FAILURE {
            return None;
        }
        Some(Self {
            step: Step::from_code((exit >> 16) as u8)?,
            observed: exit as u16,
        })
    }
}

/// Emits a failure exit for `step` with the value in `eax`.
pub fn fail_with_eax(asm: &mut CodeAssembler, step: Step) -> Result<(), IcedError> {
    asm.and(eax, 0xffff)?;
    asm.or(eax, (FAILURE | (u32::from(step as u8) << 16)) as i32)?;
    asm.out(i32::from(crate::TEST_EXIT_PORT as u8), eax)?;
    asm.hlt()
}

/// Access width of a poll or register access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// One byte (completion record status).
    Byte,
    /// Four bytes.
    Dword,
}

/// What a poll waits for: `(value & mask) == want` or `!= want`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Until {
    /// The masked value equals the operand.
    Equals(u32),
    /// The masked value differs from the operand.
    Differs(u32),
}

/// Emits `rax = TSC`.
fn read_tsc(asm: &mut CodeAssembler) -> Result<(), IcedError> {
    asm.rdtsc()?;
    asm.shl(rdx, 32)?;
    asm.or(rax, rdx)
}

/// Emits `r8 = TSC + POLL_TSC_BUDGET`, the deadline of a poll.
pub(super) fn start_deadline(asm: &mut CodeAssembler) -> Result<(), IcedError> {
    read_tsc(asm)?;
    asm.mov(r8, POLL_TSC_BUDGET)?;
    asm.add(r8, rax)
}

/// Emits `pause`, then a jump to `again` while the TSC is before the
/// deadline in `r8`.
pub(super) fn before_deadline(asm: &mut CodeAssembler, again: CodeLabel) -> Result<(), IcedError> {
    asm.pause()?;
    read_tsc(asm)?;
    asm.cmp(rax, r8)?;
    asm.jb(again)
}

/// Emits a poll of the value at `[rdi]` until `(value & mask)` satisfies
/// `until`; leaves the value in `eax`. After [`POLL_TSC_BUDGET`] cycles the
/// run fails with `step` and the last value.
pub fn poll_rdi(
    asm: &mut CodeAssembler,
    width: Width,
    mask: u32,
    until: Until,
    step: Step,
) -> Result<(), IcedError> {
    let mut again = asm.create_label();
    let mut done = asm.create_label();
    start_deadline(asm)?;
    asm.set_label(&mut again)?;
    match width {
        Width::Byte => asm.movzx(eax, byte_ptr(rdi))?,
        Width::Dword => asm.mov(eax, dword_ptr(rdi))?,
    }
    asm.mov(r9d, eax)?;
    asm.and(r9d, mask as i32)?;
    let (Until::Equals(want) | Until::Differs(want)) = until;
    asm.cmp(r9d, want as i32)?;
    match until {
        Until::Equals(_) => asm.je(done)?,
        Until::Differs(_) => asm.jne(done)?,
    }
    asm.mov(r10d, eax)?;
    before_deadline(asm, again)?;
    asm.mov(eax, r10d)?;
    fail_with_eax(asm, step)?;
    asm.set_label(&mut done)
}

/// [`poll_rdi`] of the value at `addr`.
pub fn poll(
    asm: &mut CodeAssembler,
    addr: u64,
    width: Width,
    mask: u32,
    until: Until,
    step: Step,
) -> Result<(), IcedError> {
    asm.mov(rdi, addr)?;
    poll_rdi(asm, width, mask, until, step)
}

/// Emits a 4-byte store of `value` at `addr` (memory or MMIO).
pub fn write32(asm: &mut CodeAssembler, addr: u64, value: u32) -> Result<(), IcedError> {
    asm.mov(rdi, addr)?;
    asm.mov(dword_ptr(rdi), value)
}

/// Emits an 8-byte store of `value` at `addr` (memory or MMIO).
pub fn write64(asm: &mut CodeAssembler, addr: u64, value: u64) -> Result<(), IcedError> {
    asm.mov(rdi, addr)?;
    asm.mov(rax, value)?;
    asm.mov(qword_ptr(rdi), rax)
}

/// Emits a 4-byte load from `addr` into `eax`.
pub fn read32(asm: &mut CodeAssembler, addr: u64) -> Result<(), IcedError> {
    asm.mov(rdi, addr)?;
    asm.mov(eax, dword_ptr(rdi))
}

/// Emits stores of `qwords` at `addr`, `addr + 8`, ...
pub fn store_qwords(asm: &mut CodeAssembler, addr: u64, qwords: &[u64]) -> Result<(), IcedError> {
    asm.mov(rdi, addr)?;
    for (i, q) in qwords.iter().enumerate() {
        asm.mov(rax, *q)?;
        asm.mov(qword_ptr(rdi + 8 * i as i32), rax)?;
    }
    Ok(())
}

/// Emits stores of `bytes` (a multiple of 8 long) at `addr`.
pub fn store_bytes(asm: &mut CodeAssembler, addr: u64, bytes: &[u8]) -> Result<(), IcedError> {
    let qwords: Vec<u64> = bytes
        .chunks(8)
        .map(|c| {
            let mut q = [0u8; 8];
            q[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(q)
        })
        .collect();
    store_qwords(asm, addr, &qwords)
}

/// Emits zeroing of `pages` 4 KiB pages at `addr` (`rep stosq`).
pub fn zero_pages(asm: &mut CodeAssembler, addr: u64, pages: u64) -> Result<(), IcedError> {
    asm.cld()?;
    asm.mov(rdi, addr)?;
    asm.mov(ecx, (pages * 512) as u32)?;
    asm.xor(eax, eax)?;
    asm.rep().stosq()
}

/// Emits a store of `reg` into report slot `slot`.
pub fn report(asm: &mut CodeAssembler, slot: usize, reg: AsmRegister64) -> Result<(), IcedError> {
    asm.mov(rdi, REPORT_START + 8 * slot as u64)?;
    asm.mov(qword_ptr(rdi), reg)
}

/// Reads report slot `slot` from a finished run's memory.
pub fn read_report(memory: &GuestMemoryMmap, slot: usize) -> u64 {
    memory
        .read_obj(GuestAddress(REPORT_START + 8 * slot as u64))
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_exits_decode() {
        let exit = FAILURE | (u32::from(Step::CommandStatus as u8) << 16) | 0x11;
        assert_eq!(
            GuestFailure::decode(exit),
            Some(GuestFailure {
                step: Step::CommandStatus,
                observed: 0x11
            })
        );
        assert_eq!(GuestFailure::decode(0x600), None);
        assert_eq!(GuestFailure::decode(FAILURE | (0xee << 16)), None);
        for step in Step::ALL {
            assert_eq!(Step::from_code(step as u8), Some(step));
        }
    }
}
