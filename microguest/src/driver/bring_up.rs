//! Guest-side building blocks for micro-guests that drive a vDSA the way
//! idxd does: PCI command register through ECAM, group and WQ
//! configuration tables, administrative commands through CMD/CMDSTS.
//!
//! Each helper emits CPL0 code (the registers are not user-mapped in a
//! real guest; in a micro-guest everything is) and clobbers RAX and RBX
//! only. A command that fails ends the run with `fail | CMDSTS.err`
//! through the test-exit port.

use iced_x86::code_asm::*;
use pci::header::{command, offset as header};
use vdsa::command::code;
use vdsa::regs::{layout, offset};
use vdsa::wqcfg::mode;

use vmm::layout::PCIE_ECAM_START;
use vmm::sva::DsaPlacement;

/// PCI command register: memory space and bus master.
const PCI_COMMAND_MEMORY_MASTER: u16 = command::MEMORY_SPACE | command::BUS_MASTER;
/// PCI command register offset.
const PCI_COMMAND: u64 = header::COMMAND as u64;
/// CMDSTS.active (bit 31).
const CMDSTS_ACTIVE: u32 = 1 << 31;
/// CMD: command code shift.
const CMD_CODE_SHIFT: u32 = 20;
/// WQCFG dword 2: dedicated mode.
pub const WQCFG_MODE_DEDICATED: u32 = mode::DEDICATED;
/// WQCFG dword 2: priority 1 (bits 7:4).
pub const WQCFG_PRIORITY_1: u32 = 1 << mode::PRIORITY_SHIFT;
/// WQCFG dword 2: PASID field shift (bits 27:8).
pub const WQCFG_PASID_SHIFT: u32 = mode::PASID_SHIFT;
/// WQCFG dword 2: PASID enable.
pub const WQCFG_PASID_EN: u32 = mode::PASID_EN;
/// WQCFG dword 3 for 2 GiB transfers and batches of 1024 (the defaults).
const WQCFG_MAX_SHIFTS: u32 = 31 | (10 << 5);

/// The ECAM address of configuration register `reg` of the function.
pub fn ecam_address(placement: &DsaPlacement, reg: u64) -> u64 {
    PCIE_ECAM_START + (u64::from(placement.bdf.devfn()) << 12) + reg
}

/// Emits pci_enable_device + pci_set_master.
pub fn enable_pci(asm: &mut CodeAssembler, dsa: &DsaPlacement) -> Result<(), IcedError> {
    asm.mov(rbx, ecam_address(dsa, PCI_COMMAND))?;
    asm.mov(word_ptr(rbx), u32::from(PCI_COMMAND_MEMORY_MASTER))
}

/// PCIe extended capability ID of PASID.
const EXT_CAP_PASID: u32 = 0x1b;
/// First extended capability.
const EXT_CAP_START: u64 = 0x100;
/// PASID control: enable (bit 0) and privileged mode (bit 2).
const PASID_CTRL_ENABLE: u32 = 1 << 0;
const PASID_CTRL_PRIV: u32 = 1 << 2;

/// Emits what the IOMMU driver does before SVA: find the PASID extended
/// capability (walking the list through ECAM) and enable PASID, with
/// privileged mode if `privileged`. Clobbers RAX, RBX and RCX. A function
/// without the capability stops at a HLT.
pub fn enable_pasid(
    asm: &mut CodeAssembler,
    dsa: &DsaPlacement,
    privileged: bool,
) -> Result<(), IcedError> {
    let control = PASID_CTRL_ENABLE | if privileged { PASID_CTRL_PRIV } else { 0 };
    let mut walk = asm.create_label();
    let mut found = asm.create_label();
    asm.mov(rcx, ecam_address(dsa, EXT_CAP_START))?;
    asm.set_label(&mut walk)?;
    asm.mov(eax, dword_ptr(rcx))?;
    asm.movzx(ebx, ax)?;
    asm.cmp(ebx, EXT_CAP_PASID)?;
    asm.je(found)?;
    // Next capability offset: header bits 31:20; none left stops the vCPU
    // (HLT, which the VMM reports).
    asm.shr(eax, 20)?;
    asm.test(eax, eax)?;
    let mut next = asm.create_label();
    asm.jnz(next)?;
    asm.hlt()?;
    asm.set_label(&mut next)?;
    asm.mov(rcx, ecam_address(dsa, 0))?;
    asm.add(rcx, rax)?;
    asm.jmp(walk)?;
    asm.set_label(&mut found)?;
    // PASID control is the word at +6.
    asm.mov(word_ptr(rcx + 6), control)
}

/// Emits a 64-bit store of `value` at BAR0 offset `at`.
pub fn write64(
    asm: &mut CodeAssembler,
    dsa: &DsaPlacement,
    at: u64,
    value: u64,
) -> Result<(), IcedError> {
    asm.mov(rbx, dsa.bar0 + at)?;
    asm.mov(rax, value)?;
    asm.mov(qword_ptr(rbx), rax)
}

/// Emits a 32-bit store of `value` at BAR0 offset `at`.
pub fn write32(
    asm: &mut CodeAssembler,
    dsa: &DsaPlacement,
    at: u64,
    value: u32,
) -> Result<(), IcedError> {
    asm.mov(rbx, dsa.bar0 + at)?;
    asm.mov(eax, value)?;
    asm.mov(dword_ptr(rbx), eax)
}

/// Emits GRPCFG of `group`: its WQs and engines.
pub fn configure_group(
    asm: &mut CodeAssembler,
    dsa: &DsaPlacement,
    group: u64,
    wqs: u64,
    engines: u64,
) -> Result<(), IcedError> {
    let at = layout::GRPCFG + group * layout::GRPCFG_SIZE;
    write64(asm, dsa, at, wqs)?;
    write64(asm, dsa, at + 32, engines)
}

/// Emits WQCFG of `wq`: `size` entries, dword 2 = `mode` (mode, priority,
/// PASID, PASID enable bits), the default maximum transfer and batch.
pub fn configure_wq(
    asm: &mut CodeAssembler,
    dsa: &DsaPlacement,
    wq: u64,
    size: u16,
    mode: u32,
) -> Result<(), IcedError> {
    let at = layout::WQCFG + wq * layout::WQCFG_SIZE;
    write32(asm, dsa, at, u32::from(size))?;
    write32(asm, dsa, at + 8, mode)?;
    write32(asm, dsa, at + 12, WQCFG_MAX_SHIFTS)
}

/// Emits an administrative command and the poll of CMDSTS until it is no
/// longer active; a non-zero error ends the run with `fail | err`.
pub fn command(
    asm: &mut CodeAssembler,
    dsa: &DsaPlacement,
    cmd: u32,
    operand: u32,
    fail: u32,
) -> Result<(), IcedError> {
    write32(asm, dsa, offset::CMD, (cmd << CMD_CODE_SHIFT) | operand)?;
    asm.mov(rbx, dsa.bar0 + offset::CMDSTS)?;
    let mut poll = asm.create_label();
    let mut ok = asm.create_label();
    asm.set_label(&mut poll)?;
    asm.pause()?;
    asm.mov(eax, dword_ptr(rbx))?;
    asm.test(eax, CMDSTS_ACTIVE)?;
    asm.jnz(poll)?;
    asm.test(eax, 0xff)?;
    asm.jz(ok)?;
    asm.and(eax, 0xff)?;
    asm.or(eax, fail as i32)?;
    asm.out(i32::from(crate::TEST_EXIT_PORT as u8), eax)?;
    asm.hlt()?;
    asm.set_label(&mut ok)?;
    asm.nop()
}

/// Emits the whole idxd bring-up of one WQ `wq` in group 0 with engine 0:
/// PCI enable, GRPCFG, WQCFG (`size` entries, dword 2 `mode`), Enable
/// Device, Enable WQ. Failures end the run with `fail | 0x100 | err`
/// (Enable Device) or `fail | 0x200 | err` (Enable WQ).
pub fn bring_up_wq(
    asm: &mut CodeAssembler,
    dsa: &DsaPlacement,
    wq: u64,
    size: u16,
    mode: u32,
    fail: u32,
) -> Result<(), IcedError> {
    enable_pci(asm, dsa)?;
    configure_group(asm, dsa, 0, 1 << wq, 1)?;
    configure_wq(asm, dsa, wq, size, mode)?;
    command(asm, dsa, code::ENABLE_DEVICE, 0, fail | 0x100)?;
    command(asm, dsa, code::ENABLE_WQ, wq as u32, fail | 0x200)
}

/// Emits a spin until the byte at `addr` (a completion record's status)
/// is non-zero, then ends the run with that byte.
pub fn exit_with_completion_status(asm: &mut CodeAssembler, addr: u64) -> Result<(), IcedError> {
    asm.mov(rbx, addr)?;
    let mut poll = asm.create_label();
    asm.set_label(&mut poll)?;
    asm.pause()?;
    asm.movzx(eax, byte_ptr(rbx))?;
    asm.test(eax, eax)?;
    asm.jz(poll)?;
    asm.out(i32::from(crate::TEST_EXIT_PORT as u8), eax)?;
    asm.hlt()
}
