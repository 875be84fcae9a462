//! MOVDIR64B, ENQCMD and ENQCMDS: 64-byte stores to a device portal.
//!
//! All three read a 64-byte source from memory (ModRM.rm, any alignment),
//! and write it as one 64-byte store to the address held in the ModRM.reg
//! register: an offset in ES, which cannot be overridden, as wide as the
//! address size (64, 32 or 16 bits: the mode's, or the other under a 0x67
//! prefix); the offset must be 64-byte aligned (SDM Vol. 2A, "MOVDIR64B",
//! "ENQCMD", "ENQCMDS"). Outside 64-bit mode both operands go through their
//! segments' bases and limits ([`super::decode::check_access`]):
//!
//! - MOVDIR64B stores the source as is; no flags change.
//! - ENQCMD needs IA32_PASID.valid (bit 31), else #GP(0) before any memory
//!   access. Dword 0 of the command becomes IA32_PASID[19:0] with bits 30:20
//!   and the privilege bit 31 cleared (user, whatever the CPL).
//! - ENQCMDS runs at CPL 0 only (#GP(0) otherwise); the PASID (bits 19:0)
//!   and privilege (bit 31) come from the source, bits 30:20 are cleared.
//! - ENQCMD and ENQCMDS set ZF when the device answers "retry", clear it
//!   when it accepts, and clear CF, PF, AF, SF and OF.
//!
//! The source may be anywhere the guest's page tables point: RAM, device
//! registers (the portal page itself, any MMIO BAR), guest-physical space
//! nobody claims (reads as all ones) or a range straddling the end of RAM;
//! every case completes as on hardware.

use bus::{StoreKind, StoreReply};
use iced_x86::{Code, Instruction, Register};

use super::context::CpuContext;
use super::decode::{check_access, memory_operand, MemoryOperand};
use super::exception::Exception;
use super::mmu::{read_linear_any, translate, AccessKind, Privilege};
use super::{EmulatorError, GuestCpu, Step, StoreRecord, UnhandledReason};
use crate::x86::rflags;
use pasid::Ia32Pasid;

/// Size of the store and of its source.
pub(crate) const STORE_SIZE: usize = 64;

/// Command dword 0: bits 19:0, the PASID.
const CMD_PASID_MASK: u32 = pasid::PASID_MASK;
/// Command dword 0: bit 31, the privilege (1 = supervisor).
const CMD_PRIV: u32 = 1 << 31;

/// The kind of 64-byte store `instr` performs, if it is one of the three.
pub(crate) fn store_kind(instr: &Instruction) -> Option<StoreKind> {
    match instr.code() {
        Code::Movdir64b_r16_m512 | Code::Movdir64b_r32_m512 | Code::Movdir64b_r64_m512 => {
            Some(StoreKind::Movdir64b)
        }
        Code::Enqcmd_r16_m512 | Code::Enqcmd_r32_m512 | Code::Enqcmd_r64_m512 => {
            Some(StoreKind::Enqcmd)
        }
        Code::Enqcmds_r16_m512 | Code::Enqcmds_r32_m512 | Code::Enqcmds_r64_m512 => {
            Some(StoreKind::Enqcmds)
        }
        _ => None,
    }
}

/// Builds the command the store writes from the 64-byte source.
pub(crate) fn format_command(
    kind: StoreKind,
    source: &[u8; STORE_SIZE],
    ia32_pasid_msr: u64,
) -> [u8; STORE_SIZE] {
    let mut cmd = *source;
    let dword0 = u32::from_le_bytes([source[0], source[1], source[2], source[3]]);
    let new_dword0 = match kind {
        StoreKind::Movdir64b => return cmd,
        // The MSR's PASID, user privilege, reserved bits zero.
        StoreKind::Enqcmd => (ia32_pasid_msr & Ia32Pasid::PASID_MASK) as u32,
        // The source's PASID and privilege, reserved bits zero.
        StoreKind::Enqcmds => dword0 & (CMD_PASID_MASK | CMD_PRIV),
    };
    cmd[..4].copy_from_slice(&new_dword0.to_le_bytes());
    cmd
}

/// Executes one of the three on `ctx`. On completion `ctx` holds the new
/// RIP and flags; on a fault it is unchanged.
pub(crate) fn execute<C: GuestCpu + ?Sized>(
    cpu: &mut C,
    ctx: &mut CpuContext,
    instr: &Instruction,
    kind: StoreKind,
) -> Result<Step<StoreRecord>, EmulatorError> {
    let msr = match kind {
        StoreKind::Enqcmd => cpu.enqcmd_pasid(ctx.sregs.cr3),
        _ => 0,
    };
    match kind {
        StoreKind::Enqcmds if ctx.cpl() != 0 => return Ok(Step::Fault(Exception::gp0())),
        StoreKind::Enqcmd if msr & Ia32Pasid::VALID == 0 => {
            return Ok(Step::Fault(Exception::gp0()))
        }
        _ => {}
    }

    let Some(src) = memory_operand(ctx, instr, 1) else {
        return Ok(Step::Unsupported(UnhandledReason::BadOperand));
    };
    if let Err(e) = check_access(ctx, &src, STORE_SIZE as u64, false) {
        return Ok(Step::Fault(e));
    }
    // ES-relative (the ES base is 0 in 64-bit mode); the register is as
    // wide as the address size.
    let Some(offset) = ctx.gpr(instr.op0_register()) else {
        return Ok(Step::Unsupported(UnhandledReason::BadOperand));
    };
    let Some(dest) = MemoryOperand::in_segment(ctx, Register::ES, offset) else {
        return Ok(Step::Unsupported(UnhandledReason::BadOperand));
    };
    // The SDM names the register's offset; an ES base that is not 64-byte
    // aligned (possible only outside 64-bit mode) would misalign the store
    // itself, and is refused the same way.
    if offset % STORE_SIZE as u64 != 0 || dest.linear % STORE_SIZE as u64 != 0 {
        return Ok(Step::Fault(Exception::gp0()));
    }
    if let Err(e) = check_access(ctx, &dest, STORE_SIZE as u64, true) {
        return Ok(Step::Fault(e));
    }
    let dest = dest.linear;

    let privilege = Privilege::of(ctx);
    // The source is read as the CPU reads it: RAM, a device's registers
    // (the portal itself included), or all ones where nothing answers.
    let mut source = [0u8; STORE_SIZE];
    if let Err(e) = read_linear_any(cpu, ctx, src.linear, &mut source, privilege) {
        return Ok(e.into());
    }
    let gpa = match translate(cpu.memory(), ctx, dest, AccessKind::Write, privilege) {
        Ok(gpa) => gpa,
        Err(e) => return Ok(e.into()),
    };

    let command = format_command(kind, &source, msr);
    let reply = cpu.store64(gpa, &command, kind)?;
    let pasid =
        u32::from_le_bytes([command[0], command[1], command[2], command[3]]) & CMD_PASID_MASK;
    log::trace!("{kind:?} to {dest:#x} (GPA {gpa:#x}), command PASID {pasid:#x}: {reply:?}");

    if kind != StoreKind::Movdir64b {
        ctx.set_status_flags(if reply == StoreReply::Retry {
            rflags::ZF
        } else {
            0
        });
    }
    ctx.regs.rip = ctx.next_ip(instr);
    Ok(Step::Completed(StoreRecord {
        kind,
        linear: dest,
        gpa,
        reply,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source() -> [u8; STORE_SIZE] {
        let mut s = [0u8; STORE_SIZE];
        for (i, b) in s.iter_mut().enumerate() {
            *b = i as u8 ^ 0xa5;
        }
        s
    }

    #[test]
    fn movdir64b_copies_the_source_verbatim() {
        let s = source();
        assert_eq!(format_command(StoreKind::Movdir64b, &s, 0x8000_1234), s);
    }

    #[test]
    fn enqcmd_puts_msr_pasid_in_dword0_with_user_privilege() {
        let mut s = source();
        s[..4].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        let cmd = format_command(StoreKind::Enqcmd, &s, 0xffff_ffff_8abc_def1);
        assert_eq!(
            u32::from_le_bytes(cmd[..4].try_into().unwrap()),
            0x000c_def1
        );
        assert_eq!(cmd[4..], s[4..]);
    }

    #[test]
    fn enqcmds_keeps_source_pasid_and_privilege_clears_reserved() {
        let mut s = source();
        s[..4].copy_from_slice(&0xfff1_2345u32.to_le_bytes());
        let cmd = format_command(StoreKind::Enqcmds, &s, 0x8000_0001);
        assert_eq!(
            u32::from_le_bytes(cmd[..4].try_into().unwrap()),
            0x8001_2345
        );
        assert_eq!(cmd[4..], s[4..]);
    }

    #[test]
    fn kinds_from_codes() {
        let d = |b: &[u8]| super::super::decode::decode(b, 64, 0).unwrap();
        assert_eq!(
            store_kind(&d(&[0x66, 0x0f, 0x38, 0xf8, 0x02])),
            Some(StoreKind::Movdir64b)
        );
        assert_eq!(
            store_kind(&d(&[0xf2, 0x0f, 0x38, 0xf8, 0x02])),
            Some(StoreKind::Enqcmd)
        );
        assert_eq!(
            store_kind(&d(&[0xf3, 0x0f, 0x38, 0xf8, 0x02])),
            Some(StoreKind::Enqcmds)
        );
        assert_eq!(store_kind(&d(&[0x0f, 0x01, 0xca])), None);
    }
}
