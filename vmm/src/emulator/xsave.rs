//! The XSAVE family: XSAVE, XSAVEOPT, XSAVEC, XSAVES, XRSTOR, XRSTORS and
//! XGETBV (SDM Vol. 1, chapter 13 "Managing State Using the XSAVE Feature
//! Set", and the instructions' pages in Vol. 2).
//!
//! The registers these instructions move live in the vCPU ([`XState`]: the
//! standard-format image `KVM_GET_XSAVE` gives, XCR0, IA32_XSS and
//! IA32_PASID); the save area is guest memory at the instruction's operand.
//! What the emulator does, per instruction (RFBM, the requested-feature
//! bitmap, is EDX:EAX AND XCR0, or AND (XCR0 | IA32_XSS) for XSAVES and
//! XRSTORS):
//!
//! - XSAVE (standard format) writes every component in RFBM at its standard
//!   offset and XSTATE_BV\[i\] = XINUSE\[i\] for i in RFBM; no other header
//!   byte. MXCSR and MXCSR_MASK are written when RFBM\[1\] or RFBM\[2\].
//! - XSAVEOPT is XSAVE here: the modified optimisation lets a processor skip
//!   components unmodified since the last XRSTOR from the same area, and
//!   writing them anyway leaves the same bytes.
//! - XSAVEC and XSAVES (compacted format) write component i iff RFBM\[i\]
//!   and XINUSE\[i\] (the init optimisation), at offsets that compact over
//!   RFBM, and write XSTATE_BV = RFBM & XINUSE and XCOMP_BV = bit 63 | RFBM.
//! - XRSTOR (standard or compacted form, by XCOMP_BV\[63\]) and XRSTORS
//!   (compacted only) check the header (#GP(0)), then load component i of
//!   RFBM from memory if XSTATE_BV\[i\] and initialise it otherwise; the
//!   others keep their values. An MXCSR with reserved bits set is #GP(0).
//! - XGETBV reads XCR0 (ECX = 0) or XCR0 & XINUSE (ECX = 1, with
//!   CPUID.(0xD,1):EAX\[2\]); other ECX values are #GP(0).
//!
//! Faults, in the order the SDM lists them: #UD without CR4.OSXSAVE or
//! without the instruction in the guest's CPUID, #NM with CR0.TS, #GP(0) for
//! XSAVES/XRSTORS above CPL 0, #GP(0)/#SS(0) for a non-canonical area,
//! #GP(0) for an area not 64-byte aligned, #PF on the area's pages (every
//! page is translated before anything is written), then XRSTOR's header and
//! MXCSR checks. A fault changes nothing.
//!
//! The only supervisor component kept is PASID (IA32_XSS bit 10), whose
//! 8 bytes are IA32_PASID; other supervisor components are treated as in
//! their initial configuration.

use iced_x86::{Instruction, Mnemonic};

use super::context::CpuContext;
use super::decode::{check_access, memory_operand};
use super::exception::Exception;
use super::fallback::{conclude, FallbackInstruction, Stop};
use super::mmu::{translate, AccessKind, Privilege};
use super::{EmulatorError, GuestCpu, Step, UnhandledReason};
use crate::x86::{cr0, cr4};
use vm_memory::{Bytes, GuestAddress};

/// State-component numbers (SDM Vol. 1, 13.1).
pub mod component {
    /// x87 state.
    pub const X87: usize = 0;
    /// SSE state (XMM registers and MXCSR).
    pub const SSE: usize = 1;
    /// AVX state (upper halves of YMM0-15).
    pub const AVX: usize = 2;
    /// PASID state (IA32_PASID), a supervisor component.
    pub const PASID: usize = 10;
}

/// Size of the legacy region (the FXSAVE image).
pub const LEGACY_SIZE: usize = 512;
/// Offset of the extended region: legacy region plus the 64-byte header.
pub const EXTENDED_START: usize = 576;
/// Offset of XSTATE_BV in the header.
pub const XSTATE_BV: usize = 512;
/// Offset of XCOMP_BV in the header.
pub const XCOMP_BV: usize = 520;
/// XCOMP_BV bit 63: the area is in the compacted format.
pub const COMPACTED: u64 = 1 << 63;
/// Offset of MXCSR in the legacy region.
const MXCSR: usize = 24;
/// Offset of MXCSR_MASK in the legacy region.
const MXCSR_MASK: usize = 28;
/// MXCSR's value in the SSE initial configuration.
pub const MXCSR_INIT: u32 = 0x1f80;
/// MXCSR bits that may be set (MXCSR_MASK with DAZ): bits 31:16 are
/// reserved.
const MXCSR_WRITABLE: u32 = 0xffff;
/// The x87 part of the legacy region: FCW..FDP, then ST0-7/MM0-7.
const X87_RANGES: [(usize, usize); 2] = [(0, 24), (32, 160)];
/// The XMM registers in the legacy region.
const XMM_RANGE: (usize, usize) = (160, 416);
/// FCW in the x87 initial configuration.
const FCW_INIT: u16 = 0x037f;
/// FIP and FDP: 64-bit offsets with REX.W, 32-bit offset + selector without.
const FIP: usize = 8;
const FDP: usize = 16;
/// IA32_PASID's writable bits: 19:0 and the valid bit 31.
const PASID_WRITABLE: u64 = 0x000f_ffff | (1 << 31);
/// Alignment of the save area and of aligned compacted components.
const ALIGN: u64 = 64;
/// Component numbers that can be described by CPUID leaf 0xD.
const COMPONENTS: usize = 63;

/// One state component as CPUID leaf 0xD describes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XComponent {
    /// Size in bytes (EAX).
    pub size: u32,
    /// Offset in the standard format (EBX; 0 for supervisor components).
    pub offset: u32,
    /// 64-byte aligned in the compacted format (ECX bit 1).
    pub align64: bool,
}

/// Where each state component lives in an XSAVE area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XStateLayout {
    components: [XComponent; COMPONENTS],
}

impl XStateLayout {
    /// From CPUID leaf 0xD: `sub_leaf(i)` returns (EAX, EBX, ECX) of
    /// sub-leaf i, for i from 2.
    pub fn from_cpuid(mut sub_leaf: impl FnMut(u32) -> (u32, u32, u32)) -> Self {
        let mut components = [XComponent::default(); COMPONENTS];
        for (i, c) in components.iter_mut().enumerate().skip(component::AVX) {
            let (size, offset, flags) = sub_leaf(i as u32);
            *c = XComponent {
                size,
                offset,
                align64: flags & 2 != 0,
            };
        }
        XStateLayout { components }
    }

    /// Component `i` (zero-sized if CPUID does not describe it).
    pub fn component(&self, i: usize) -> XComponent {
        self.components.get(i).copied().unwrap_or_default()
    }

    /// Offset of component `i` (from 2) in a compacted area whose
    /// XCOMP_BV is `xcomp` (SDM Vol. 1, 13.4.3).
    pub fn compacted_offset(&self, xcomp: u64, i: usize) -> usize {
        let mut offset = EXTENDED_START;
        for j in component::AVX..i {
            if xcomp & (1 << j) != 0 {
                offset = self.place(offset, j) + self.component(j).size as usize;
            }
        }
        self.place(offset, i)
    }

    fn place(&self, offset: usize, i: usize) -> usize {
        if self.component(i).align64 {
            offset.next_multiple_of(ALIGN as usize)
        } else {
            offset
        }
    }
}

/// The guest's CPUID.(EAX=0xD,ECX=1):EAX: which of the family it offers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct XsaveFeatures {
    /// XSAVEOPT (bit 0).
    pub xsaveopt: bool,
    /// XSAVEC and the compacted form of XRSTOR (bit 1).
    pub xsavec: bool,
    /// XGETBV with ECX = 1 (bit 2).
    pub xgetbv1: bool,
    /// XSAVES, XRSTORS and IA32_XSS (bit 3).
    pub xsaves: bool,
}

impl XsaveFeatures {
    /// From CPUID.(EAX=0xD,ECX=1):EAX.
    pub fn from_leaf_d1_eax(eax: u32) -> Self {
        XsaveFeatures {
            xsaveopt: eax & 1 != 0,
            xsavec: eax & 2 != 0,
            xgetbv1: eax & 4 != 0,
            xsaves: eax & 8 != 0,
        }
    }
}

/// A vCPU's state as the XSAVE family sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XState {
    /// The user components in the standard format, as `KVM_GET_XSAVE`
    /// gives them: legacy region, header whose XSTATE_BV is XINUSE, each
    /// component at its standard offset (initial values where not in use).
    pub image: Vec<u8>,
    /// XCR0.
    pub xcr0: u64,
    /// IA32_XSS.
    pub xss: u64,
    /// IA32_PASID: the PASID component's 8 bytes.
    pub pasid: u64,
    /// Where components live (the guest's CPUID leaf 0xD).
    pub layout: XStateLayout,
    /// What the guest's CPUID offers.
    pub features: XsaveFeatures,
}

impl XState {
    /// XINUSE: the image's XSTATE_BV for user components, IA32_PASID != 0
    /// for PASID.
    fn xinuse(&self) -> u64 {
        let mut inuse = read_u64(&self.image, XSTATE_BV);
        if self.pasid != 0 {
            inuse |= 1 << component::PASID;
        }
        inuse
    }

    fn set_xinuse(&mut self, i: usize, inuse: bool) {
        let bv = read_u64(&self.image, XSTATE_BV);
        let bv = if inuse { bv | (1 << i) } else { bv & !(1 << i) };
        self.image[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv.to_le_bytes());
    }

    /// Component `i`'s bytes as saved (`i` >= 2; PASID included).
    fn component_bytes(&self, i: usize) -> Vec<u8> {
        if i == component::PASID {
            return self.pasid.to_le_bytes().to_vec();
        }
        let c = self.layout.component(i);
        let (start, end) = (c.offset as usize, (c.offset + c.size) as usize);
        self.image
            .get(start..end)
            .map(<[u8]>::to_vec)
            .unwrap_or_else(|| vec![0; c.size as usize])
    }
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// Whether `which` belongs to this family.
pub(crate) fn of(mnemonic: Mnemonic) -> Option<FallbackInstruction> {
    use FallbackInstruction as F;
    Some(match mnemonic {
        Mnemonic::Xsave | Mnemonic::Xsave64 => F::Xsave,
        Mnemonic::Xsaveopt | Mnemonic::Xsaveopt64 => F::Xsaveopt,
        Mnemonic::Xsavec | Mnemonic::Xsavec64 => F::Xsavec,
        Mnemonic::Xsaves | Mnemonic::Xsaves64 => F::Xsaves,
        Mnemonic::Xrstor | Mnemonic::Xrstor64 => F::Xrstor,
        Mnemonic::Xrstors | Mnemonic::Xrstors64 => F::Xrstors,
        Mnemonic::Xgetbv => F::Xgetbv,
        _ => return None,
    })
}

/// Executes `which` (decoded as `instr`) on `ctx` and the vCPU's XSAVE
/// state; the new state reaches the vCPU only if the instruction completes.
pub(crate) fn execute<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    ctx: &mut CpuContext,
    instr: &Instruction,
    which: FallbackInstruction,
) -> Result<Step<FallbackInstruction>, EmulatorError> {
    let mut state = cpu.xstate()?;
    let result = match which {
        FallbackInstruction::Xgetbv => xgetbv(ctx, &state),
        FallbackInstruction::Xsave
        | FallbackInstruction::Xsaveopt
        | FallbackInstruction::Xsavec
        | FallbackInstruction::Xsaves => save(cpu, ctx, instr, which, &state),
        FallbackInstruction::Xrstor | FallbackInstruction::Xrstors => {
            restore(cpu, ctx, instr, which, &mut state).map(|()| true)
        }
        _ => return Ok(Step::Unsupported(UnhandledReason::BadOperand)),
    };
    if let Ok(true) = result {
        cpu.set_xstate(&state)?;
    }
    Ok(conclude(result.map(|_| ()), ctx, instr, which))
}

/// The checks every member makes before touching memory: #UD, #NM.
fn check_enabled(ctx: &CpuContext, offered: bool) -> Result<(), Stop> {
    if ctx.sregs.cr4 & cr4::OSXSAVE == 0 || !offered {
        return Err(Exception::ud().into());
    }
    Ok(())
}

fn offered(which: FallbackInstruction, f: XsaveFeatures) -> bool {
    match which {
        FallbackInstruction::Xsaveopt => f.xsaveopt,
        FallbackInstruction::Xsavec => f.xsavec,
        FallbackInstruction::Xsaves | FallbackInstruction::Xrstors => f.xsaves,
        _ => true,
    }
}

fn xgetbv(ctx: &mut CpuContext, state: &XState) -> Result<bool, Stop> {
    check_enabled(ctx, true)?;
    let value = match ctx.regs.rcx as u32 {
        0 => state.xcr0,
        1 if state.features.xgetbv1 => state.xcr0 & state.xinuse(),
        _ => return Err(Exception::gp0().into()),
    };
    ctx.regs.rax = value & 0xffff_ffff;
    ctx.regs.rdx = value >> 32;
    Ok(false)
}

/// The save area's linear address after the common checks: #NM, the CPL
/// of the supervisor forms, canonical, 64-byte aligned.
fn area(
    ctx: &CpuContext,
    instr: &Instruction,
    which: FallbackInstruction,
    state: &XState,
) -> Result<u64, Stop> {
    check_enabled(ctx, offered(which, state.features))?;
    if ctx.sregs.cr0 & cr0::TS != 0 {
        return Err(Exception::nm().into());
    }
    let supervisor = matches!(
        which,
        FallbackInstruction::Xsaves | FallbackInstruction::Xrstors
    );
    if supervisor && ctx.cpl() != 0 {
        return Err(Exception::gp0().into());
    }
    let m = memory_operand(ctx, instr, 0).ok_or(Stop::Unsupported(UnhandledReason::BadOperand))?;
    let restore = matches!(
        which,
        FallbackInstruction::Xrstor | FallbackInstruction::Xrstors
    );
    check_access(ctx, &m, EXTENDED_START as u64, !restore)?;
    if m.linear % ALIGN != 0 {
        return Err(Exception::gp0().into());
    }
    Ok(m.linear)
}

/// EDX:EAX AND XCR0 (and IA32_XSS for the supervisor forms).
fn rfbm(ctx: &CpuContext, which: FallbackInstruction, state: &XState) -> u64 {
    let mask = (ctx.regs.rdx << 32) | (ctx.regs.rax & 0xffff_ffff);
    let enabled = match which {
        FallbackInstruction::Xsaves | FallbackInstruction::Xrstors => state.xcr0 | state.xss,
        _ => state.xcr0,
    };
    mask & enabled & !COMPACTED
}

/// Bytes to read or write at offsets of the save area.
struct AreaAccess {
    base: u64,
    pieces: Vec<(usize, Vec<u8>)>,
}

impl AreaAccess {
    fn new(base: u64) -> Self {
        AreaAccess {
            base,
            pieces: Vec::new(),
        }
    }

    fn put(&mut self, offset: usize, bytes: &[u8]) {
        if !bytes.is_empty() {
            self.pieces.push((offset, bytes.to_vec()));
        }
    }

    /// Translates every page the pieces touch (so a fault writes nothing),
    /// then writes them.
    fn write<C: GuestCpu + ?Sized>(&self, cpu: &mut C, ctx: &CpuContext) -> Result<(), Stop> {
        let mut chunks = Vec::new();
        for (offset, bytes) in &self.pieces {
            for (gpa, at, len) in
                translate_range(cpu, ctx, self.base + *offset as u64, bytes.len(), true)?
            {
                chunks.push((gpa, &bytes[at..at + len]));
            }
        }
        for (gpa, data) in chunks {
            if cpu.memory().write_slice(data, GuestAddress(gpa)).is_err() {
                for (i, piece) in data.chunks(8).enumerate() {
                    cpu.write_device(gpa + 8 * i as u64, piece);
                }
            }
        }
        Ok(())
    }
}

/// Reads `len` bytes at `offset` of the save area.
fn read_area<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    ctx: &CpuContext,
    base: u64,
    offset: usize,
    len: usize,
) -> Result<Vec<u8>, Stop> {
    let mut out = vec![0u8; len];
    for (gpa, at, n) in translate_range(cpu, ctx, base + offset as u64, len, false)? {
        let buf = &mut out[at..at + n];
        if cpu.memory().read_slice(buf, GuestAddress(gpa)).is_err() {
            for (i, piece) in buf.chunks_mut(8).enumerate() {
                cpu.read_device(gpa + 8 * i as u64, piece);
            }
        }
    }
    Ok(out)
}

/// Splits `[va, va + len)` at pages and translates each: (GPA, offset in
/// the range, length).
fn translate_range<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    ctx: &CpuContext,
    va: u64,
    len: usize,
    write: bool,
) -> Result<Vec<(u64, usize, usize)>, Stop> {
    const PAGE: u64 = 4096;
    let kind = if write {
        AccessKind::Write
    } else {
        AccessKind::Read
    };
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < len {
        let addr = va.wrapping_add(at as u64);
        let n = ((PAGE - addr % PAGE) as usize).min(len - at);
        let gpa = translate(cpu.memory(), ctx, addr, kind, Privilege::of(ctx))?;
        out.push((gpa, at, n));
        at += n;
    }
    Ok(out)
}

/// The legacy region's x87 bytes from the image, in the format of the
/// instruction's operand size (REX.W: 64-bit FIP/FDP; without: 32-bit
/// offsets and zero selectors).
fn x87_bytes(image: &[u8], rex_w: bool) -> [u8; 160] {
    let mut x87 = [0u8; 160];
    x87.copy_from_slice(&image[..160]);
    if !rex_w {
        for at in [FIP, FDP] {
            x87[at + 4..at + 8].fill(0);
        }
    }
    x87
}

fn is_rex_w(instr: &Instruction) -> bool {
    matches!(
        instr.mnemonic(),
        Mnemonic::Xsave64
            | Mnemonic::Xsaveopt64
            | Mnemonic::Xsavec64
            | Mnemonic::Xsaves64
            | Mnemonic::Xrstor64
            | Mnemonic::Xrstors64
    )
}

/// XSAVE, XSAVEOPT, XSAVEC, XSAVES. The vCPU's state does not change.
fn save<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    ctx: &CpuContext,
    instr: &Instruction,
    which: FallbackInstruction,
    state: &XState,
) -> Result<bool, Stop> {
    let base = area(ctx, instr, which, state)?;
    let rfbm = rfbm(ctx, which, state);
    let xinuse = state.xinuse();
    let compacted = matches!(
        which,
        FallbackInstruction::Xsavec | FallbackInstruction::Xsaves
    );
    // The init optimisation: the compacted forms skip components in their
    // initial configuration.
    let saved = if compacted { rfbm & xinuse } else { rfbm };
    let image = &state.image;
    let bit = |i: usize| saved & (1 << i) != 0;
    let mut access = AreaAccess::new(base);
    if bit(component::X87) {
        let x87 = x87_bytes(image, is_rex_w(instr));
        for (start, end) in X87_RANGES {
            access.put(start, &x87[start..end]);
        }
    }
    let mxcsr = if compacted {
        bit(component::SSE)
    } else {
        rfbm & ((1 << component::SSE) | (1 << component::AVX)) != 0
    };
    if mxcsr {
        access.put(MXCSR, &image[MXCSR..MXCSR_MASK + 4]);
    }
    if bit(component::SSE) {
        access.put(XMM_RANGE.0, &image[XMM_RANGE.0..XMM_RANGE.1]);
    }
    for i in component::AVX..COMPONENTS {
        if !bit(i) {
            continue;
        }
        let offset = if compacted {
            state.layout.compacted_offset(rfbm, i)
        } else {
            state.layout.component(i).offset as usize
        };
        access.put(offset, &state.component_bytes(i));
    }
    let xstate_bv = if compacted {
        access.put(XCOMP_BV, &(COMPACTED | rfbm).to_le_bytes());
        rfbm & xinuse
    } else {
        // XSTATE_BV's bits outside RFBM keep their value.
        let old = read_u64(&read_area(cpu, ctx, base, XSTATE_BV, 8)?, 0);
        (old & !rfbm) | (rfbm & xinuse)
    };
    access.put(XSTATE_BV, &xstate_bv.to_le_bytes());
    access.write(cpu, ctx)?;
    Ok(false)
}

/// XRSTOR and XRSTORS: the new state in `state`.
fn restore<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    ctx: &CpuContext,
    instr: &Instruction,
    which: FallbackInstruction,
    state: &mut XState,
) -> Result<(), Stop> {
    let base = area(ctx, instr, which, state)?;
    let rfbm = rfbm(ctx, which, state);
    let supervisor = which == FallbackInstruction::Xrstors;
    let header = read_area(cpu, ctx, base, XSTATE_BV, 64)?;
    let xstate_bv = read_u64(&header, 0);
    let xcomp_bv = read_u64(&header, 8);
    let compacted = xcomp_bv & COMPACTED != 0;
    let enabled = if supervisor {
        state.xcr0 | state.xss
    } else {
        state.xcr0
    };
    let gp = || Stop::Fault(Exception::gp0());
    if compacted {
        // The compacted form needs XSAVEC; bytes 63:16 of the header are
        // reserved; XCOMP_BV names enabled components only and covers
        // XSTATE_BV.
        if !(state.features.xsavec || supervisor)
            || header[16..].iter().any(|&b| b != 0)
            || xcomp_bv & !COMPACTED & !enabled != 0
            || xstate_bv & !xcomp_bv != 0
        {
            return Err(gp());
        }
    } else if supervisor || header[8..24].iter().any(|&b| b != 0) || xstate_bv & !enabled != 0 {
        // XRSTORS has no standard form; the standard form's bytes 23:8 are
        // reserved and XSTATE_BV names enabled components only.
        return Err(gp());
    }
    let load = |i: usize| rfbm & (1 << i) != 0 && xstate_bv & (1 << i) != 0;
    let init = |i: usize| rfbm & (1 << i) != 0 && xstate_bv & (1 << i) == 0;
    let rex_w = is_rex_w(instr);

    // Read everything that is loaded before anything changes.
    let legacy = if rfbm & 0b111 != 0 {
        Some(read_area(cpu, ctx, base, 0, LEGACY_SIZE)?)
    } else {
        None
    };
    let mut loaded = Vec::new();
    for i in component::AVX..COMPONENTS {
        if !load(i) {
            continue;
        }
        let c = state.layout.component(i);
        let size = if i == component::PASID {
            8
        } else {
            c.size as usize
        };
        let offset = if compacted {
            state.layout.compacted_offset(xcomp_bv, i)
        } else {
            c.offset as usize
        };
        loaded.push((i, read_area(cpu, ctx, base, offset, size)?));
    }
    // MXCSR: the standard form loads it when RFBM[1] or RFBM[2], the
    // compacted form with the SSE component.
    let mxcsr_loaded = if compacted {
        load(component::SSE)
    } else {
        rfbm & ((1 << component::SSE) | (1 << component::AVX)) != 0
    };
    let mxcsr = match (&legacy, mxcsr_loaded) {
        (Some(l), true) => Some(read_u32(l, MXCSR)),
        _ => None,
    };
    if mxcsr.is_some_and(|m| m & !MXCSR_WRITABLE != 0) {
        return Err(gp());
    }
    if let Some((_, v)) = loaded.iter().find(|(i, _)| *i == component::PASID) {
        if read_u64(v, 0) & !PASID_WRITABLE != 0 {
            return Err(gp());
        }
    }

    // Apply.
    let image = &mut state.image;
    if let Some(l) = &legacy {
        if load(component::X87) {
            for (start, end) in X87_RANGES {
                image[start..end].copy_from_slice(&l[start..end]);
            }
            if !rex_w {
                for at in [FIP, FDP] {
                    image[at + 4..at + 8].fill(0);
                }
            }
        } else if init(component::X87) {
            for (start, end) in X87_RANGES {
                image[start..end].fill(0);
            }
            image[..2].copy_from_slice(&FCW_INIT.to_le_bytes());
        }
        if load(component::SSE) {
            image[XMM_RANGE.0..XMM_RANGE.1].copy_from_slice(&l[XMM_RANGE.0..XMM_RANGE.1]);
        } else if init(component::SSE) {
            image[XMM_RANGE.0..XMM_RANGE.1].fill(0);
            if compacted {
                image[MXCSR..MXCSR + 4].copy_from_slice(&MXCSR_INIT.to_le_bytes());
            }
        }
    }
    if let Some(m) = mxcsr {
        image[MXCSR..MXCSR + 4].copy_from_slice(&m.to_le_bytes());
    }
    for i in 0..COMPONENTS {
        if rfbm & (1 << i) == 0 || i == component::PASID {
            continue;
        }
        if i >= component::AVX {
            let c = state.layout.component(i);
            let range = c.offset as usize..(c.offset + c.size) as usize;
            if c.offset == 0 || range.end > state.image.len() {
                // A supervisor component other than PASID: nothing kept.
                continue;
            }
            match loaded.iter().find(|(j, _)| *j == i) {
                Some((_, v)) => state.image[range].copy_from_slice(v),
                None => state.image[range].fill(0),
            }
        }
        state.set_xinuse(i, load(i));
    }
    // The vCPU's SSE registers hold whatever MXCSR was loaded: KVM then
    // takes the legacy bytes as they are.
    let mxcsr_now = read_u32(&state.image, MXCSR);
    if mxcsr_now != MXCSR_INIT {
        state.set_xinuse(component::SSE, true);
    }
    if rfbm & (1 << component::PASID) != 0 {
        state.pasid = loaded
            .iter()
            .find(|(i, _)| *i == component::PASID)
            .map_or(0, |(_, v)| read_u64(v, 0));
    }
    Ok(())
}

#[cfg(test)]
#[path = "xsave_tests.rs"]
mod tests;
