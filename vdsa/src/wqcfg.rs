//! The WQ Configuration table (WQCFG, 64 bytes per WQ; DSA specification
//! §9.2.24, Table 9-7; Linux `union wqcfg`).
//!
//! Which fields software may write depends on the device and WQ state:
//! the size only while the device is disabled, the threshold at any time,
//! everything else only while the WQ is disabled. Writes to read-only
//! fields are dropped, so Linux's habit of OR-ing the current register
//! contents into its shadow and writing everything back is harmless.

/// Dword indices of WQCFG fields.
pub mod dword {
    /// WQ size (15:0).
    pub const SIZE: usize = 0;
    /// WQ threshold (15:0).
    pub const THRESHOLD: usize = 1;
    /// Mode, block-on-fault, ATS disable, priority, PASID, PASID enable, priv.
    pub const MODE: usize = 2;
    /// Maximum transfer and batch sizes.
    pub const LIMITS: usize = 3;
    /// Occupancy and WQ state (read-only).
    pub const STATUS: usize = 6;
    /// First dword of the 256-bit operation configuration.
    pub const OP_CONFIG: usize = 8;
}

/// Bit positions in dword 2.
pub mod mode {
    /// 1: dedicated, 0: shared.
    pub const DEDICATED: u32 = 1 << 0;
    /// Block-on-fault enable.
    pub const BOF: u32 = 1 << 1;
    /// WQ ATS disable.
    pub const ATS_DISABLE: u32 = 1 << 2;
    /// PASID enable.
    pub const PASID_EN: u32 = 1 << 28;
    /// Privileged (dedicated WQs).
    pub const PRIV: u32 = 1 << 29;
    /// Shift of the priority field (bits 7:4).
    pub const PRIORITY_SHIFT: u32 = 4;
    /// Shift of the WQ PASID field (bits 27:8, dedicated WQs).
    pub const PASID_SHIFT: u32 = 8;
    /// Bits software may write while the WQ is disabled (WQ PRS disable,
    /// bit 3, is hardwired to 0: WQCAP.wq_prs_support is 0).
    pub const WRITABLE: u32 = 0x3fff_fff7;
}

/// WQ state (dword 6 bits 31:30).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WqState {
    /// Disabled.
    Disabled = 0,
    /// Enabled.
    Enabled = 1,
    /// A disable or reset is in progress.
    Disabling = 2,
}

/// Operation codes DSA 1.0 defines (bits of OPCFG that exist).
pub const DEFINED_OPS: [u64; 4] = [0x0000_0001_003f_03ff, 0, 0, 0];

/// One WQ's configuration register image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WqCfg(pub [u32; 16]);

impl WqCfg {
    /// The power-on value: everything 0 except OPCFG, which equals OPCAP.
    pub fn reset_value(opcap: &[u64; 4]) -> Self {
        let mut cfg = Self([0; 16]);
        cfg.set_op_config(opcap);
        cfg
    }

    fn field(&self, dw: usize, hi: u32, lo: u32) -> u32 {
        (self.0[dw] >> lo) & crate::bits::mask::<u32>(hi - lo + 1)
    }

    /// WQ size.
    pub fn size(&self) -> u16 {
        self.field(dword::SIZE, 15, 0) as u16
    }

    /// WQ threshold (limited-portal admission limit of a shared WQ).
    pub fn threshold(&self) -> u16 {
        self.field(dword::THRESHOLD, 15, 0) as u16
    }

    /// Dedicated mode.
    pub fn dedicated(&self) -> bool {
        self.0[dword::MODE] & mode::DEDICATED != 0
    }

    /// Block-on-fault enable.
    pub fn bof(&self) -> bool {
        self.0[dword::MODE] & mode::BOF != 0
    }

    /// WQ ATS disable.
    pub fn ats_disable(&self) -> bool {
        self.0[dword::MODE] & mode::ATS_DISABLE != 0
    }

    /// Priority.
    pub fn priority(&self) -> u8 {
        self.field(dword::MODE, 7, mode::PRIORITY_SHIFT) as u8
    }

    /// WQ PASID (dedicated WQs).
    pub fn pasid(&self) -> u32 {
        self.field(dword::MODE, 27, mode::PASID_SHIFT)
    }

    /// PASID enable.
    pub fn pasid_en(&self) -> bool {
        self.0[dword::MODE] & mode::PASID_EN != 0
    }

    /// Privileged (dedicated WQs with PASID).
    pub fn privileged(&self) -> bool {
        self.0[dword::MODE] & mode::PRIV != 0
    }

    /// Maximum transfer size shift.
    pub fn max_xfer_shift(&self) -> u32 {
        self.field(dword::LIMITS, 4, 0)
    }

    /// Maximum batch size shift.
    pub fn max_batch_shift(&self) -> u32 {
        self.field(dword::LIMITS, 8, 5)
    }

    /// The 256-bit operation configuration.
    pub fn op_config(&self) -> [u64; 4] {
        let mut ops = [0u64; 4];
        for (i, op) in ops.iter_mut().enumerate() {
            let lo = self.0[dword::OP_CONFIG + 2 * i];
            let hi = self.0[dword::OP_CONFIG + 2 * i + 1];
            *op = u64::from(lo) | (u64::from(hi) << 32);
        }
        ops
    }

    /// Sets the 256-bit operation configuration.
    pub fn set_op_config(&mut self, ops: &[u64; 4]) {
        for (i, op) in ops.iter().enumerate() {
            self.0[dword::OP_CONFIG + 2 * i] = *op as u32;
            self.0[dword::OP_CONFIG + 2 * i + 1] = (*op >> 32) as u32;
        }
    }

    /// The bits of dword `dw` software may write in the given state.
    pub fn writable(dw: usize, device_disabled: bool, wq_disabled: bool) -> u32 {
        match dw {
            dword::SIZE if device_disabled => 0xffff,
            dword::THRESHOLD => 0xffff,
            dword::MODE if wq_disabled => mode::WRITABLE,
            dword::LIMITS if wq_disabled => 0x1ff,
            d if d >= dword::OP_CONFIG && wq_disabled => {
                let i = d - dword::OP_CONFIG;
                (DEFINED_OPS[i / 2] >> (32 * (i % 2))) as u32
            }
            _ => 0,
        }
    }

    /// Applies a guest write of `value` (bytes selected by `byte_mask`) to
    /// dword `dw`; returns whether the threshold changed.
    pub fn write(
        &mut self,
        dw: usize,
        value: u32,
        byte_mask: u32,
        device_disabled: bool,
        wq_disabled: bool,
    ) -> bool {
        let Some(slot) = self.0.get_mut(dw) else {
            return false;
        };
        let mask = byte_mask & Self::writable(dw, device_disabled, wq_disabled);
        let old = *slot;
        *slot = (old & !mask) | (value & mask);
        dw == dword::THRESHOLD && old != *slot
    }

    /// The value of dword 6 for a WQ in `state` holding `occupancy` entries.
    pub fn status_dword(state: WqState, occupancy: u16) -> u32 {
        u32::from(occupancy) | ((state as u32) << 30)
    }

    /// Reset WQ: every field back to its initial value except the size.
    pub fn reset_keep_size(&mut self, opcap: &[u64; 4]) {
        let size = self.0[dword::SIZE];
        *self = Self::reset_value(opcap);
        self.0[dword::SIZE] = size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_and_write_rules() {
        let mut cfg = WqCfg::reset_value(&[0x3ff, 0, 0, 0]);
        assert_eq!(cfg.op_config(), [0x3ff, 0, 0, 0]);
        // Linux's kernel DWQ: dedicated, pasid 5 enabled, priv, priority 1.
        cfg.write(2, 0x3000_0511, u32::MAX, true, true);
        cfg.write(3, 31 | (10 << 5), u32::MAX, true, true);
        assert!(cfg.dedicated() && cfg.pasid_en() && cfg.privileged());
        assert_eq!((cfg.pasid(), cfg.priority()), (5, 1));
        assert_eq!((cfg.max_xfer_shift(), cfg.max_batch_shift()), (31, 10));
        // Size writes need the device disabled, mode writes the WQ disabled.
        cfg.write(0, 16, u32::MAX, false, true);
        assert_eq!(cfg.size(), 0);
        cfg.write(0, 16, u32::MAX, true, true);
        cfg.write(2, 0, u32::MAX, false, false);
        assert!(cfg.dedicated(), "mode is read-only while the WQ is enabled");
        assert!(
            cfg.write(1, 8, u32::MAX, false, false),
            "threshold always writable"
        );
        assert_eq!(cfg.threshold(), 8);
        // PRS disable (bit 3) is hardwired to 0; status dword is read-only.
        cfg.write(2, 0x8, u32::MAX, true, true);
        assert_eq!(cfg.0[2] & 0x8, 0);
        cfg.write(6, u32::MAX, u32::MAX, true, true);
        assert_eq!(cfg.0[6], 0);
        cfg.write(8, u32::MAX, u32::MAX, true, true);
        assert_eq!(cfg.0[8], 0x003f_03ff, "undefined opcodes read as 0");
        cfg.reset_keep_size(&[0x3ff, 0, 0, 0]);
        assert_eq!((cfg.size(), cfg.0[2], cfg.0[8]), (16, 0, 0x3ff));
    }
}
