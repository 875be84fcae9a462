//! The device profile: a Sapphire Rapids (4th Gen Xeon) DSA 1.0 as Linux's
//! `idxd` reads it. [`crate::DsaConfig::default`] and
//! [`crate::regs::Capabilities::new`] take their values from here.
//!
//! Sources, per value:
//!
//! - Identity: PCI 8086:0b25, class 0x088000 (Linux `pci_ids.h`
//!   `PCI_DEVICE_ID_INTEL_DSA_SPR0`; DSA specification Appendix C), VERSION
//!   0x100 (DSA 1.0; `accel-config list` on a 4th/5th Gen Xeon shows
//!   `"version":"0x100"`).
//! - GENCAP 0x40915f0107, as `accel-config list` (`"gen_cap"`) prints it on
//!   a 5th Gen Xeon (Emerald Rapids, the same DSA 1.0 block): block on
//!   fault, overlapping copies, cache control for memory, destination
//!   readback, 2 GiB transfers (shift 31), batches of 1024 (shift 10),
//!   an IMS multiplier of 8, configuration enabled; no CMDCAP (bit 4 clear),
//!   and bit 38, which the DSA 1.0 specification leaves reserved and Linux
//!   does not read.
//! - WQCAP: 8 WQs sharing 128 entries (`"max_work_queues":8`,
//!   `"work_queue_size":128` in the same dump). Shared and dedicated modes.
//! - GRPCAP: 4 groups (`"max_groups":4`), 96 read buffers
//!   (`"max_read_buffers":96`, and every group's power-on
//!   `"read_buffers_allowed":96`), read-buffer controls in GRPCFG and the
//!   global read-buffer limit in GENCFG (the dump's `"read_buffer_limit"`
//!   and `"read_buffers_reserved"`, which Linux only offers when GRPCAP
//!   advertises them).
//! - ENGCAP: 4 engines (`"max_engines":4`).
//! - OPCAP: the DSA 1.0 operations of the specification's Table 8-1:
//!   0x00-0x09, 0x10-0x15 and 0x20 (`00000001,003f03ff`). The Emerald
//!   Rapids dump above prints `00000001,003f027d`; Linux clears bit 1
//!   (Batch) from the `op_cap` it shows on parts with the INTEL-SA-01084
//!   erratum (this model's `op_cap` reads `00000001,003f03fd` through the
//!   same code), so that part's register is `0x1_003f_027f`, without
//!   Create and Apply Delta Record (bits 7 and 8). The profile keeps the
//!   two delta operations, a departure from that dump (accel-config's
//!   runner does not test them).
//! - PCI Express: ATS with invalidate queue depth 0, PASID with 20 bits and
//!   privileged mode but no execute permission, PRI with 0x200 outstanding
//!   requests (`lspci -vvv` of the same part: `Max PASID Width: 14`
//!   (hexadecimal), `Exec- Priv+`, `Page Request Capacity: 00000200`).
//!
//! Departures, documented as such: the delta operations in OPCAP (above);
//! and from the DSA 2.0 register layout, WQCAP advertises 64-byte WQCFG entries with per-WQ operation
//! configuration, occupancy and per-WQ ATS disable, which Linux 6.12 uses
//! when present; a DSA 1.0 has 32-byte entries without them.

/// WQs (WQCAP).
pub const NUM_WQS: u8 = 8;
/// Total WQ entries (WQCAP).
pub const TOTAL_WQ_SIZE: u16 = 128;
/// Groups (GRPCAP).
pub const NUM_GROUPS: u8 = 4;
/// Engines (ENGCAP).
pub const NUM_ENGINES: u8 = 4;
/// Total read buffers (GRPCAP bits 15:8).
pub const TOTAL_READ_BUFFERS: u64 = 96;
/// Maximum transfer size shift (GENCAP bits 20:16): 2 GiB.
pub const MAX_XFER_SHIFT: u8 = 31;
/// Maximum batch size shift (GENCAP bits 24:21): 1024 descriptors.
pub const MAX_BATCH_SHIFT: u8 = 10;
/// IMS multiplier (GENCAP bits 30:25).
pub const MAX_IMS_MULT: u64 = 8;
/// GENCAP bits the real part sets outside the fields DSA 1.0 defines.
pub const GENCAP_UNDEFINED_BITS: u64 = 1 << 38;
/// The full GENCAP of the profile, for tests.
pub const GENCAP: u64 = 0x40_915f_0107;
/// The OPCAP of the profile (first qword; the rest are zero).
pub const OPCAP0: u64 = 0x1_003f_03ff;
