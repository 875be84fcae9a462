//! BAR0 register map: capability, configuration, control and status
//! registers of Intel DSA 1.0 (DSA architecture specification §9.2; Linux
//! `drivers/dma/idxd/registers.h`).

use crate::bits::bitfields;
use crate::descriptor::Opcode;
use crate::profile;
use crate::DsaConfig;

/// Register offsets in BAR0.
pub mod offset {
    /// VERSION (32).
    pub const VERSION: u64 = 0x00;
    /// GENCAP (64).
    pub const GENCAP: u64 = 0x10;
    /// WQCAP (64).
    pub const WQCAP: u64 = 0x20;
    /// GRPCAP (64).
    pub const GRPCAP: u64 = 0x30;
    /// ENGCAP (64).
    pub const ENGCAP: u64 = 0x38;
    /// OPCAP (4 x 64).
    pub const OPCAP: u64 = 0x40;
    /// OFFSETS (2 x 64).
    pub const OFFSETS: u64 = 0x60;
    /// GENCFG (32).
    pub const GENCFG: u64 = 0x80;
    /// GENCTRL (32).
    pub const GENCTRL: u64 = 0x88;
    /// GENSTS (32).
    pub const GENSTS: u64 = 0x90;
    /// INTCAUSE (32).
    pub const INTCAUSE: u64 = 0x98;
    /// CMD (32).
    pub const CMD: u64 = 0xa0;
    /// CMDSTS (32).
    pub const CMDSTS: u64 = 0xa8;
    /// CMDCAP (32).
    pub const CMDCAP: u64 = 0xb0;
    /// SWERROR (4 x 64).
    pub const SWERR: u64 = 0xc0;
}

/// VERSION of DSA 1.0.
pub const DEVICE_VERSION_1: u32 = 0x100;

/// Where the tables live in BAR0 (each a multiple of 0x100, as OFFSETS
/// encodes them), and the BAR sizes.
pub mod layout {
    /// MSI-X permissions table (8 bytes per vector).
    pub const MSIX_PERM: u64 = 0x300;
    /// Group configuration table (64 bytes per group).
    pub const GRPCFG: u64 = 0x400;
    /// WQ configuration table (64 bytes per WQ).
    pub const WQCFG: u64 = 0x800;
    /// MSI-X vector table.
    pub const MSIX_TABLE: u64 = 0x1000;
    /// MSI-X pending-bit array.
    pub const MSIX_PBA: u64 = 0x1800;
    /// Size of BAR0.
    pub const BAR0_SIZE: u64 = 0x2000;
    /// Bytes of BAR2 per WQ: four 4 KiB portals.
    pub const PORTALS_PER_WQ: u64 = 0x4000;
    /// Bytes per WQCFG entry (WQCAP.wqcfg_size = 1).
    pub const WQCFG_SIZE: u64 = 64;
    /// Bytes per GRPCFG entry.
    pub const GRPCFG_SIZE: u64 = 64;
    /// Bytes per MSI-X permissions entry.
    pub const MSIX_PERM_SIZE: u64 = 8;
}

/// General Capabilities (GENCAP, 0x10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenCap(pub u64);
impl GenCap {
    bitfields! { u64;
        /// Block-on-fault supported.
        block_on_fault / set_block_on_fault: 0, 0;
        /// Overlapping memory moves supported.
        overlap_copy / set_overlap_copy: 1, 1;
        /// Cache-control flag (write to cache) supported for memory.
        cache_control / set_cache_control: 2, 2;
        /// Cache-control flag supported for cache-line flushes.
        cache_control_cache / set_cache_control_cache: 3, 3;
        /// CMDCAP register present.
        cmd_cap / set_cmd_cap: 4, 4;
        /// Destination readback supported.
        dest_readback / set_dest_readback: 8, 8;
        /// Drain descriptor readback addresses supported.
        drain_readback / set_drain_readback: 9, 9;
        /// Maximum transfer size is 2^shift.
        max_xfer_shift / set_max_xfer_shift: 20, 16;
        /// Maximum batch size is 2^shift.
        max_batch_shift / set_max_batch_shift: 24, 21;
        /// Interrupt message storage entries, in units of 256.
        max_ims_mult / set_max_ims_mult: 30, 25;
        /// Configuration registers are writable.
        config_en / set_config_en: 31, 31;
    }
}

/// WQ Capabilities (WQCAP, 0x20).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WqCap(pub u64);
impl WqCap {
    bitfields! { u64;
        /// Total WQ entries to share among WQs.
        total_wq_size / set_total_wq_size: 15, 0;
        /// Number of WQs.
        num_wqs / set_num_wqs: 23, 16;
        /// WQCFG stride is 2^(field + 5) bytes.
        wqcfg_size / set_wqcfg_size: 27, 24;
        /// Shared mode supported.
        shared_mode / set_shared_mode: 48, 48;
        /// Dedicated mode supported.
        dedicated_mode / set_dedicated_mode: 49, 49;
        /// Per-WQ ATS disable supported.
        wq_ats_support / set_wq_ats_support: 50, 50;
        /// WQ priorities supported.
        priority / set_priority: 51, 51;
        /// WQCFG reports occupancy.
        occupancy / set_occupancy: 52, 52;
        /// Occupancy interrupts supported.
        occupancy_int / set_occupancy_int: 53, 53;
        /// Per-WQ operation configuration (WQCFG bytes 32-63).
        op_config / set_op_config: 54, 54;
    }
}

/// Group Capabilities (GRPCAP, 0x30).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrpCap(pub u64);
impl GrpCap {
    bitfields! { u64;
        /// Number of groups.
        num_groups / set_num_groups: 7, 0;
        /// Total read buffers.
        total_rdbufs / set_total_rdbufs: 15, 8;
        /// Read-buffer controls in GRPCFG supported.
        rdbuf_ctrl / set_rdbuf_ctrl: 16, 16;
        /// Global read-buffer limit supported.
        rdbuf_limit / set_rdbuf_limit: 17, 17;
    }
}

/// Engine Capabilities (ENGCAP, 0x38).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngCap(pub u64);
impl EngCap {
    bitfields! { u64;
        /// Number of engines.
        num_engines / set_num_engines: 7, 0;
    }
}

/// Table Offsets (OFFSETS, 0x60), in units of 0x100 bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets(pub u64);
impl Offsets {
    bitfields! { u64;
        /// GRPCFG table offset / 0x100.
        grpcfg / set_grpcfg: 15, 0;
        /// WQCFG table offset / 0x100.
        wqcfg / set_wqcfg: 31, 16;
        /// MSI-X permissions offset / 0x100.
        msix_perm / set_msix_perm: 47, 32;
        /// IMS offset / 0x100 (0: none).
        ims / set_ims: 63, 48;
    }
}

/// General Configuration (GENCFG, 0x80).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenCfg(pub u32);
impl GenCfg {
    bitfields! { u32;
        /// Global read-buffer limit.
        rdbuf_limit / set_rdbuf_limit: 7, 0;
        /// User-mode descriptors may request completion interrupts.
        user_int_en / set_user_int_en: 12, 12;
    }
    /// Bits software may write (while the device is disabled): the
    /// read-buffer limit (GRPCAP.rdbuf_limit) and user interrupts.
    pub const WRITABLE: u32 = 0xff | (1 << 12);
}

/// General Control (GENCTRL, 0x88).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenCtrl(pub u32);
impl GenCtrl {
    bitfields! { u32;
        /// Interrupt on a new software error.
        softerr_int_en / set_softerr_int_en: 0, 0;
        /// Interrupt on entering the halt state.
        halt_int_en / set_halt_int_en: 1, 1;
    }
    /// Bits software may write.
    pub const WRITABLE: u32 = 0b11;
}

/// The device state in GENSTS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceState {
    /// Disabled: configuration writable, no work.
    Disabled = 0,
    /// Enabled.
    Enabled = 1,
    /// A Disable Device or Reset Device command is in progress.
    Draining = 2,
    /// Halted after an unsupported change; needs a reset.
    Halted = 3,
}

/// General Status (GENSTS, 0x90).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenSts(pub u32);
impl GenSts {
    bitfields! { u32;
        /// The device state (see [`DeviceState`]).
        state / set_state: 1, 0;
        /// Reset type required to leave the halt state (0: Reset Device).
        reset_type / set_reset_type: 3, 2;
    }
}

/// Interrupt Cause (INTCAUSE, 0x98) bits; all write-1-to-clear.
pub mod intcause {
    /// A software error was recorded in SWERROR.
    pub const ERR: u32 = 1 << 0;
    /// An administrative command completed.
    pub const CMD: u32 = 1 << 1;
    /// WQ occupancy below limit.
    pub const OCCUPY: u32 = 1 << 2;
    /// Perfmon counter overflow.
    pub const PERFMON_OVFL: u32 = 1 << 3;
    /// The device entered the halt state.
    pub const HALT_STATE: u32 = 1 << 4;
    /// Interrupt handles were revoked.
    pub const INT_HANDLE_REVOKED: u32 = 1 << 31;
    /// All defined bits.
    pub const ALL: u32 = ERR | CMD | OCCUPY | PERFMON_OVFL | HALT_STATE | INT_HANDLE_REVOKED;
}

/// Command (CMD, 0xa0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdReg(pub u32);
impl CmdReg {
    bitfields! { u32;
        /// The command's operand.
        operand / set_operand: 19, 0;
        /// The command code.
        cmd / set_cmd: 24, 20;
        /// Request a completion interrupt (vector 0, INTCAUSE.CMD).
        int_req / set_int_req: 31, 31;
    }
}

/// Command Status (CMDSTS, 0xa8).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CmdSts(pub u32);
impl CmdSts {
    bitfields! { u32;
        /// Error code (0: success).
        err / set_err: 7, 0;
        /// Command result (interrupt handle).
        result / set_result: 23, 8;
        /// A command is in progress.
        active / set_active: 31, 31;
    }
}

/// MSI-X permissions entry (low dword of each 8-byte slot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixPerm(pub u32);
impl MsixPerm {
    bitfields! { u32;
        /// Suppress completion interrupts through this entry.
        ignore / set_ignore: 2, 2;
        /// The entry is bound to a PASID.
        pasid_en / set_pasid_en: 3, 3;
        /// The PASID allowed to use the entry.
        pasid / set_pasid: 31, 12;
    }
    /// Bits software may write.
    pub const WRITABLE: u32 = 0xffff_f00c;
}

/// The read-only register values derived from a [`DsaConfig`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// GENCAP.
    pub gencap: GenCap,
    /// WQCAP.
    pub wqcap: WqCap,
    /// GRPCAP.
    pub grpcap: GrpCap,
    /// ENGCAP.
    pub engcap: EngCap,
    /// OPCAP.
    pub opcap: [u64; 4],
    /// OFFSETS.
    pub offsets: [u64; 2],
    /// CMDCAP (meaningful when GENCAP.cmd_cap is set).
    pub cmdcap: u32,
}

/// The operations this model executes: every DSA 1.0 operation.
pub const SUPPORTED_OPS: [Opcode; 17] = [
    Opcode::Noop,
    Opcode::Batch,
    Opcode::Drain,
    Opcode::Memmove,
    Opcode::Memfill,
    Opcode::Compare,
    Opcode::Compval,
    Opcode::CrDelta,
    Opcode::ApDelta,
    Opcode::Dualcast,
    Opcode::Crcgen,
    Opcode::CopyCrc,
    Opcode::DifCheck,
    Opcode::DifInsert,
    Opcode::DifStrip,
    Opcode::DifUpdate,
    Opcode::Cflush,
];

impl Capabilities {
    /// The capability registers of a device built from `config`. With
    /// [`DsaConfig::default`] they are those of a Sapphire Rapids DSA 1.0
    /// ([`crate::profile`]).
    pub fn new(config: &DsaConfig) -> Self {
        let mut gencap = GenCap(profile::GENCAP_UNDEFINED_BITS);
        gencap
            .set_block_on_fault(1)
            .set_overlap_copy(1)
            .set_cache_control(1)
            .set_cmd_cap(u64::from(config.interrupt_handles))
            .set_dest_readback(1)
            .set_max_xfer_shift(u64::from(config.max_xfer_shift))
            .set_max_batch_shift(u64::from(config.max_batch_shift))
            .set_max_ims_mult(profile::MAX_IMS_MULT)
            .set_config_en(1);
        let mut wqcap = WqCap(0);
        wqcap
            .set_total_wq_size(u64::from(config.total_wq_size))
            .set_num_wqs(u64::from(config.num_wqs))
            .set_wqcfg_size(1)
            .set_shared_mode(1)
            .set_dedicated_mode(1)
            .set_wq_ats_support(1)
            .set_occupancy(1)
            .set_op_config(1);
        let mut grpcap = GrpCap(0);
        grpcap
            .set_num_groups(u64::from(config.num_groups))
            .set_total_rdbufs(profile::TOTAL_READ_BUFFERS)
            .set_rdbuf_ctrl(1)
            .set_rdbuf_limit(1);
        let mut engcap = EngCap(0);
        engcap.set_num_engines(u64::from(config.num_engines));
        let mut opcap = [0u64; 4];
        for op in SUPPORTED_OPS {
            let bit = op as usize;
            opcap[bit / 64] |= 1 << (bit % 64);
        }
        let mut offsets = Offsets(0);
        offsets
            .set_grpcfg(layout::GRPCFG / 0x100)
            .set_wqcfg(layout::WQCFG / 0x100)
            .set_msix_perm(layout::MSIX_PERM / 0x100);
        // Commands 1 (Enable Device) to 14 (Release Interrupt Handle).
        let cmdcap = if config.interrupt_handles {
            0x7ffe
        } else {
            0x1ffe
        };
        Self {
            gencap,
            wqcap,
            grpcap,
            engcap,
            opcap,
            offsets: [offsets.0, 0],
            cmdcap,
        }
    }

    /// Whether OPCAP lists `opcode`.
    pub fn supports(&self, opcode: u8) -> bool {
        self.opcap[usize::from(opcode) / 64] & (1 << (opcode % 64)) != 0
    }
}
