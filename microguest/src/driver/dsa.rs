//! The guest side of the vDSA: BAR0 configuration the way Linux's idxd
//! driver and accel-config do it (Reset Device, WQCFG, GRPCFG, Enable
//! Device, Enable WQ, each checked through CMDSTS), work submission to the
//! BAR2 portals and completion-record polling.

use iced_x86::code_asm::*;
use vdsa::command::code;
use vdsa::descriptor::{flags, Descriptor, Opcode};
use vdsa::grpcfg::field;
use vdsa::portal::Portal;
use vdsa::regs::{layout, offset, CmdReg, CmdSts, DeviceState, GenSts};
use vdsa::wqcfg::{dword, mode, WqState};

use super::{fail_with_eax, poll, poll_rdi, report, slot, Step, Until, Width, DSA_BAR0, DSA_BAR2};

/// WQCFG dword 3: maximum batch size shift field position (bits 8:5).
const MAX_BATCH_SHIFT_POS: u32 = 5;
/// WQCFG status dword: WQ state field shift (bits 31:30).
const WQ_STATE_SHIFT: u32 = 30;
/// How many Retry answers an enqueue loop accepts before failing.
pub const ENQUEUE_ATTEMPTS: u32 = 1000;

/// How a WQ is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WqMode {
    /// Dedicated: MOVDIR64B, the WQ's PASID (`None`: PASID disabled).
    Dedicated {
        /// WQCFG PASID (a guest PASID).
        pasid: Option<u32>,
    },
    /// Shared: ENQCMD/ENQCMDS, the PASID comes with each descriptor.
    Shared,
}

/// One WQ's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WqSetup {
    /// WQ index.
    pub wq: u8,
    /// Group the WQ joins (engine `group` serves it).
    pub group: u8,
    /// Dedicated or shared.
    pub mode: WqMode,
    /// Entries.
    pub size: u16,
    /// Shared WQ threshold (limited portal admission).
    pub threshold: u16,
    /// Block-on-fault enable.
    pub block_on_fault: bool,
}

impl WqSetup {
    /// A dedicated user WQ bound to guest PASID `pasid`.
    pub fn dedicated(wq: u8, group: u8, pasid: u32) -> Self {
        Self {
            wq,
            group,
            mode: WqMode::Dedicated { pasid: Some(pasid) },
            size: 16,
            threshold: 0,
            block_on_fault: false,
        }
    }

    /// A dedicated kernel WQ without PASID (MOVDIR64B from CPL 0, as
    /// idxd's kernel WQs without SVA).
    pub fn kernel_dedicated(wq: u8, group: u8) -> Self {
        Self {
            mode: WqMode::Dedicated { pasid: None },
            ..Self::dedicated(wq, group, 0)
        }
    }

    /// A shared WQ.
    pub fn shared(wq: u8, group: u8) -> Self {
        Self {
            wq,
            group,
            mode: WqMode::Shared,
            size: 16,
            threshold: 16,
            block_on_fault: false,
        }
    }

    /// The same WQ with block-on-fault `on`.
    pub fn with_block_on_fault(self, on: bool) -> Self {
        Self {
            block_on_fault: on,
            ..self
        }
    }

    /// WQCFG dword 2 (mode, block-on-fault, priority 1, PASID, PASID enable).
    pub fn mode_dword(&self) -> u32 {
        let mut v = 1 << mode::PRIORITY_SHIFT;
        if self.block_on_fault {
            v |= mode::BOF;
        }
        match self.mode {
            WqMode::Dedicated { pasid } => {
                v |= mode::DEDICATED;
                if let Some(p) = pasid {
                    v |= mode::PASID_EN | ((p & pasid::PASID_MASK) << mode::PASID_SHIFT);
                }
            }
            WqMode::Shared => v |= mode::PASID_EN,
        }
        v
    }
}

/// The WQCFG limits dword: maximum transfer 2^31 and batch 2^10, the
/// default vDSA's GENCAP maximums (what Linux configures unless told less).
const LIMITS: u32 = 31 | (10 << MAX_BATCH_SHIFT_POS);

/// The guest driver of one vDSA whose BARs the guest placed at
/// [`DSA_BAR0`] and [`DSA_BAR2`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsaDriver {
    /// BAR0 (registers).
    pub bar0: u64,
    /// BAR2 (portals).
    pub bar2: u64,
}

impl Default for DsaDriver {
    fn default() -> Self {
        Self {
            bar0: DSA_BAR0,
            bar2: DSA_BAR2,
        }
    }
}

impl DsaDriver {
    /// The portal of `wq` (the limited one, which Linux maps).
    pub fn portal(&self, wq: u8) -> u64 {
        self.bar2 + Portal::offset(usize::from(wq), true)
    }

    fn wqcfg(&self, wq: u8, dw: usize) -> u64 {
        self.bar0 + layout::WQCFG + u64::from(wq) * layout::WQCFG_SIZE + 4 * dw as u64
    }

    fn grpcfg(&self, group: u8, at: u64) -> u64 {
        self.bar0 + layout::GRPCFG + u64::from(group) * layout::GRPCFG_SIZE + at
    }

    /// Emits an administrative command without completion interrupt:
    /// CMD, poll CMDSTS.Active, then CMDSTS must report success.
    pub fn command(
        &self,
        asm: &mut CodeAssembler,
        cmd: u32,
        operand: u32,
    ) -> Result<(), IcedError> {
        let mut ok = asm.create_label();
        let mut value = CmdReg(0);
        value.set_cmd(cmd).set_operand(operand);
        super::write32(asm, self.bar0 + offset::CMD, value.0)?;
        let mut active = CmdSts(0);
        active.set_active(1);
        poll(
            asm,
            self.bar0 + offset::CMDSTS,
            Width::Dword,
            active.0,
            Until::Equals(0),
            Step::CommandTimeout,
        )?;
        let mut err = CmdSts(0);
        err.set_err(u32::MAX);
        asm.test(eax, err.0 as i32)?;
        asm.jz(ok)?;
        fail_with_eax(asm, Step::CommandStatus)?;
        asm.set_label(&mut ok)
    }

    /// Emits the whole bring-up: Reset Device, WQCFG of every WQ in `wqs`,
    /// GRPCFG (each group's WQs and engine `group`), Enable Device (GENSTS
    /// must say Enabled; recorded in [`slot::GENSTS`]), Enable WQ for each
    /// WQ (its WQCFG state must say Enabled).
    pub fn bring_up(&self, asm: &mut CodeAssembler, wqs: &[WqSetup]) -> Result<(), IcedError> {
        self.command(asm, code::RESET_DEVICE, 0)?;
        for wq in wqs {
            super::write32(asm, self.wqcfg(wq.wq, dword::SIZE), u32::from(wq.size))?;
            super::write32(
                asm,
                self.wqcfg(wq.wq, dword::THRESHOLD),
                u32::from(wq.threshold),
            )?;
            super::write32(asm, self.wqcfg(wq.wq, dword::MODE), wq.mode_dword())?;
            super::write32(asm, self.wqcfg(wq.wq, dword::LIMITS), LIMITS)?;
        }
        let mut groups: Vec<u8> = wqs.iter().map(|w| w.group).collect();
        groups.sort_unstable();
        groups.dedup();
        for group in groups {
            let members = wqs
                .iter()
                .filter(|w| w.group == group)
                .fold(0u64, |m, w| m | 1 << w.wq);
            super::write64(asm, self.grpcfg(group, field::WQS), members)?;
            super::write64(asm, self.grpcfg(group, field::ENGINES), 1 << group)?;
        }
        self.command(asm, code::ENABLE_DEVICE, 0)?;
        let mut enabled = GenSts(0);
        enabled.set_state(DeviceState::Enabled as u32);
        let mut state_mask = GenSts(0);
        state_mask.set_state(u32::MAX);
        poll(
            asm,
            self.bar0 + offset::GENSTS,
            Width::Dword,
            state_mask.0,
            Until::Equals(enabled.0),
            Step::DeviceState,
        )?;
        report(asm, slot::GENSTS, rax)?;
        for wq in wqs {
            self.command(asm, code::ENABLE_WQ, u32::from(wq.wq))?;
            poll(
                asm,
                self.wqcfg(wq.wq, dword::STATUS),
                Width::Dword,
                3 << WQ_STATE_SHIFT,
                Until::Equals((WqState::Enabled as u32) << WQ_STATE_SHIFT),
                Step::WqState,
            )?;
        }
        Ok(())
    }

    /// Emits a wait for SWERROR.Valid (an error with no completion record
    /// to go to), then records the register's four quadwords in
    /// [`slot::SWERROR`] and following.
    pub fn wait_for_software_error(&self, asm: &mut CodeAssembler) -> Result<(), IcedError> {
        let mut valid = vdsa::swerr::SwErrQ0(0);
        valid.set_valid(1);
        poll(
            asm,
            self.bar0 + offset::SWERR,
            Width::Dword,
            valid.0 as u32,
            Until::Equals(valid.0 as u32),
            Step::SoftwareErrorTimeout,
        )?;
        for q in 0..4u64 {
            asm.mov(rsi, self.bar0 + offset::SWERR + 8 * q)?;
            asm.mov(rax, qword_ptr(rsi))?;
            report(asm, slot::SWERROR + q as usize, rax)?;
        }
        Ok(())
    }

    /// Emits MOVDIR64B of the descriptor at `descriptor` to `wq`'s portal.
    pub fn movdir64b(
        &self,
        asm: &mut CodeAssembler,
        wq: u8,
        descriptor: u64,
    ) -> Result<(), IcedError> {
        asm.mov(rdi, self.portal(wq))?;
        asm.mov(rsi, descriptor)?;
        asm.movdir64b(rdi, zmmword_ptr(rsi))
    }

    /// Emits ENQCMD of the descriptor at `descriptor` to `wq`'s portal,
    /// repeated while the device answers Retry (ZF=1), at most
    /// [`ENQUEUE_ATTEMPTS`] times.
    pub fn enqcmd(
        &self,
        asm: &mut CodeAssembler,
        wq: u8,
        descriptor: u64,
    ) -> Result<(), IcedError> {
        let mut again = asm.create_label();
        let mut accepted = asm.create_label();
        asm.mov(ecx, ENQUEUE_ATTEMPTS)?;
        asm.set_label(&mut again)?;
        asm.mov(rdi, self.portal(wq))?;
        asm.mov(rsi, descriptor)?;
        asm.enqcmd(rdi, zmmword_ptr(rsi))?;
        asm.jnz(accepted)?;
        asm.pause()?;
        asm.dec(ecx)?;
        asm.jnz(again)?;
        asm.mov(eax, ENQUEUE_ATTEMPTS)?;
        fail_with_eax(asm, Step::EnqueueRetry)?;
        asm.set_label(&mut accepted)
    }
}

/// Emits a poll of the completion record at `record` until its status
/// byte is non-zero; leaves the status in `eax`.
pub fn wait_for_completion(asm: &mut CodeAssembler, record: u64) -> Result<(), IcedError> {
    asm.mov(rdi, record)?;
    poll_rdi(
        asm,
        Width::Byte,
        0xff,
        Until::Differs(0),
        Step::CompletionTimeout,
    )
}

/// A MEMMOVE of `len` bytes from `src` to `dst` asking for a completion
/// record at `record`; `block_on_fault` sets the descriptor's BOF flag.
/// Dword 0 (PASID, privilege) is left 0: ENQCMD fills it in, a dedicated
/// WQ uses its own PASID.
pub fn memmove(src: u64, dst: u64, len: u32, record: u64, block_on_fault: bool) -> Descriptor {
    let mut f = flags::CRAV | flags::RCR;
    if block_on_fault {
        f |= flags::BOF;
    }
    let mut d = Descriptor::new(Opcode::Memmove, f);
    d.set_completion_addr(record)
        .set_src(src)
        .set_dst(dst)
        .set_xfer_size(len);
    d
}

#[cfg(test)]
mod tests {
    use vdsa::wqcfg::WqCfg;

    use super::*;

    fn programmed(setup: WqSetup) -> WqCfg {
        let mut cfg = WqCfg::reset_value(&[0; 4]);
        cfg.write(dword::MODE, setup.mode_dword(), u32::MAX, true, true);
        cfg.write(dword::LIMITS, LIMITS, u32::MAX, true, true);
        cfg
    }

    #[test]
    fn wqcfg_images_read_back_as_intended() {
        let d = programmed(WqSetup::dedicated(0, 0, 0x4_2042).with_block_on_fault(true));
        assert!(d.dedicated() && d.pasid_en() && d.bof() && !d.privileged());
        assert_eq!((d.pasid(), d.priority()), (0x4_2042, 1));
        assert_eq!((d.max_xfer_shift(), d.max_batch_shift()), (31, 10));
        let s = programmed(WqSetup::shared(1, 1));
        assert!(!s.dedicated() && s.pasid_en() && !s.bof());
        assert_eq!(s.pasid(), 0);
        let no_pasid = WqSetup {
            mode: WqMode::Dedicated { pasid: None },
            ..WqSetup::dedicated(0, 0, 5)
        };
        assert!(!programmed(no_pasid).pasid_en());
    }

    #[test]
    fn memmove_descriptor_fields() {
        let d = memmove(0x1000, 0x2000, 0x300, 0x4000, true);
        assert_eq!(d.opcode(), Opcode::Memmove as u8);
        assert_eq!((d.src(), d.dst(), d.xfer_size()), (0x1000, 0x2000, 0x300));
        assert_eq!(d.completion_addr(), 0x4000);
        assert!(d.has(flags::CRAV | flags::RCR | flags::BOF));
        assert_eq!((d.pasid(), d.privileged()), (0, false));
        assert!(!memmove(0, 0, 1, 0, false).has(flags::BOF));
    }
}
