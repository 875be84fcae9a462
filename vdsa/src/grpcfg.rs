//! The Group Configuration table (GRPCFG, 64 bytes per group; DSA
//! specification §9.2.23): which WQs feed which engines.
//!
//! The table is read-write only while the device is disabled.

use crate::bits::bitfields;

/// Byte offsets inside one GRPCFG entry.
pub mod field {
    /// GRPWQCFG: 256-bit WQ membership bitmap.
    pub const WQS: u64 = 0;
    /// GRPENGCFG: 64-bit engine bitmap.
    pub const ENGINES: u64 = 32;
    /// GRPFLAGS.
    pub const FLAGS: u64 = 40;
}

/// GRPFLAGS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GroupFlags(pub u64);
impl GroupFlags {
    bitfields! { u64;
        /// Traffic class A.
        tc_a / set_tc_a: 2, 0;
        /// Traffic class B.
        tc_b / set_tc_b: 5, 3;
        /// Apply the global read-buffer limit (GENCFG) to the group.
        use_rdbuf_limit / set_use_rdbuf_limit: 7, 7;
        /// Read buffers reserved for the group.
        rdbufs_reserved / set_rdbufs_reserved: 15, 8;
        /// Read buffers the group may use.
        rdbufs_allowed / set_rdbufs_allowed: 27, 20;
    }
    /// Bits software may write: the traffic classes and the read-buffer
    /// controls (GRPCAP.rdbuf_ctrl). The progress limits are DSA 2.0
    /// fields and read-only here.
    pub const WRITABLE: u64 = 0x3f | (1 << 7) | (0xff << 8) | (0xff << 20);
}

/// One group's configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrpCfg {
    /// WQ membership bitmap.
    pub wqs: [u64; 4],
    /// Engine bitmap.
    pub engines: u64,
    /// GRPFLAGS.
    pub flags: GroupFlags,
}

impl GrpCfg {
    /// The power-on value: Read Buffers Allowed = total read buffers.
    pub fn reset_value(total_rdbufs: u64) -> Self {
        let mut flags = GroupFlags(0);
        flags.set_rdbufs_allowed(total_rdbufs);
        Self {
            flags,
            ..Self::default()
        }
    }

    /// The qword at byte offset `at` (0..64, 8-aligned).
    pub fn qword(&self, at: u64) -> u64 {
        match at {
            0..=31 => self.wqs[(at / 8) as usize],
            field::ENGINES => self.engines,
            field::FLAGS => self.flags.0,
            _ => 0,
        }
    }

    /// A guest write to the qword at byte offset `at`, `mask` selecting the
    /// bytes written. Callers drop writes while the device is enabled.
    pub fn write_qword(&mut self, at: u64, value: u64, mask: u64) {
        let merge =
            |old: u64, writable: u64| (old & !(mask & writable)) | (value & mask & writable);
        match at {
            0..=31 => {
                let slot = &mut self.wqs[(at / 8) as usize];
                *slot = merge(*slot, u64::MAX);
            }
            field::ENGINES => self.engines = merge(self.engines, u64::MAX),
            field::FLAGS => self.flags.0 = merge(self.flags.0, GroupFlags::WRITABLE),
            _ => {}
        }
    }

    /// Whether WQ `wq` is in the group.
    pub fn has_wq(&self, wq: usize) -> bool {
        wq < 256 && self.wqs[wq / 64] & (1 << (wq % 64)) != 0
    }

    /// Whether the group has any WQ.
    pub fn any_wq(&self) -> bool {
        self.wqs.iter().any(|&w| w != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_masks() {
        let mut g = GrpCfg::reset_value(0x60);
        g.write_qword(0, 0b101, u64::MAX);
        g.write_qword(field::ENGINES, 0b1, u64::MAX);
        // Linux writes tc_a=tc_b=1 and the read-buffer controls; the
        // progress limits (bits 33:32, 37:36) do not stick.
        g.write_qword(
            field::FLAGS,
            (3 << 36) | (0x30 << 20) | (4 << 8) | (1 << 3) | 1,
            u64::MAX,
        );
        assert!(g.has_wq(0) && !g.has_wq(1) && g.has_wq(2));
        assert_eq!(g.engines, 1);
        assert_eq!(g.flags.0, (0x30 << 20) | (4 << 8) | (1 << 3) | 1);
        assert_eq!(g.flags.rdbufs_reserved(), 4);
        // A 4-byte write of the high half of the first qword.
        g.write_qword(0, 1 << 32, 0xffff_ffff_0000_0000);
        assert_eq!(g.wqs[0], (1 << 32) | 0b101);
    }
}
