//! Descriptor checks (DSA specification §5.4-5.5, Tables 5-3 to 5-5) and
//! execution of the data operations.
//!
//! Batch and Drain need the WQ and group state and run in the engine; the
//! rest are here, one file per family.

mod compare;
mod crc;
mod delta;
pub mod dif;
mod memory;

use std::ops::Range;

use crate::access::{Access, Cause, Fault};
use crate::bits::overlaps;
use crate::completion::{CompletionRecord, Status};
use crate::descriptor::{field, flags, Descriptor, Opcode};
use crate::regs::Capabilities;

pub use crc::Crc32c;

/// Bytes an operation moves per step through its bounce buffers.
pub const CHUNK: usize = 64 * 1024;
/// Largest Create/Apply Delta transfer: 16-bit offsets of 8-byte words.
pub const MAX_DELTA_XFER: u32 = 0x8_0000;
/// Bytes per delta record entry: 2-byte offset and 8 bytes of data.
pub const DELTA_ENTRY: usize = 10;
/// Smallest Maximum Delta Record Size (the deltas of one cache line).
pub const MIN_MAX_DELTA: u32 = 80;

/// The descriptor was abandoned (aborted): no completion record, no
/// interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Abandoned;

/// A failed descriptor check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// The status to report.
    pub status: Status,
    /// Invalid (or missing required) flag bits, for [`Status::InvalidFlags`].
    pub invalid_flags: u32,
}

impl Rejection {
    fn new(status: Status) -> Self {
        Self {
            status,
            invalid_flags: 0,
        }
    }

    /// The completion record reporting the rejection.
    pub fn record(&self) -> CompletionRecord {
        let mut record = CompletionRecord::new(self.status);
        if self.status == Status::InvalidFlags {
            record.set_op_u32(0, self.invalid_flags & 0x00ff_ffff);
        }
        record
    }
}

/// What the checks need to know about where the descriptor came from.
#[derive(Clone, Copy, Debug)]
pub struct CheckContext<'a> {
    /// Capability registers.
    pub caps: &'a Capabilities,
    /// The descriptor is a batch member.
    pub in_batch: bool,
    /// WQ block-on-fault enable.
    pub wq_bof: bool,
    /// WQ PASID enable (always set for shared WQs).
    pub wq_pasid_en: bool,
    /// Privilege the descriptor runs with.
    pub privileged: bool,
    /// GENCFG user-mode interrupts enable.
    pub user_int_en: bool,
    /// WQ maximum transfer size.
    pub max_xfer: u64,
    /// WQ maximum batch size.
    pub max_batch: u32,
    /// WQ operation configuration.
    pub op_config: [u64; 4],
    /// Whether the completion interrupt handle passes Table 5-2 and the
    /// MSI-X permission check.
    pub int_handle_ok: bool,
}

/// Flags and reserved bytes of one operation (Table 5-3).
struct Spec {
    allowed: u32,
    reserved: &'static [Range<usize>],
    required: u32,
    has_size: bool,
}

const BOF: u32 = flags::BOF;
const CR: u32 = flags::CR;
const CC: u32 = flags::CC;
const STORD: u32 = flags::STORD;
const A1: u32 = flags::ADDR1_TCS;
const A2: u32 = flags::ADDR2_TCS;
const A3: u32 = flags::ADDR3_TCS;
const DRB: u32 = flags::DEST_READBACK;
const CRC_FLAGS: u32 =
    flags::CRC_READ_SEED | flags::CRC_BYPASS_INVERSION | flags::CRC_BYPASS_DATA_REFLECTION;
const RESULT: u32 = flags::CRAV | flags::RCR;

// Reserved bytes are lists of ranges; some operations have just one.
#[allow(clippy::single_range_in_vec_init)]
fn spec(op: Opcode, desc: &Descriptor) -> Spec {
    let read_seed = desc.has(flags::CRC_READ_SEED);
    let s = |allowed, reserved, required, has_size| Spec {
        allowed,
        reserved,
        required,
        has_size,
    };
    match op {
        Opcode::Noop => s(0, &[16..36, 38..64], 0, false),
        Opcode::Batch => s(A1, &[24..32, 38..64], 0, false),
        // Readback addresses are unsupported (GENCAP.drain_readback = 0),
        // so they and their TC selectors are reserved.
        Opcode::Drain => s(
            flags::DRAIN_SUPPRESS_TCA | flags::DRAIN_SUPPRESS_TCB,
            &[16..36, 38..64],
            0,
            false,
        ),
        Opcode::Memmove => s(BOF | CC | STORD | A1 | A2 | DRB, &[38..64], 0, true),
        Opcode::Memfill => s(BOF | CC | STORD | A2 | DRB, &[38..64], 0, true),
        Opcode::Compare => s(BOF | CR | A1 | A2, &[38..40, 41..64], RESULT, true),
        Opcode::Compval => s(BOF | CR | A1, &[38..40, 41..64], RESULT, true),
        Opcode::CrDelta => s(
            BOF | CR | CC | STORD | A1 | A2 | A3,
            &[38..40, 52..56, 57..64],
            RESULT,
            true,
        ),
        Opcode::ApDelta => s(BOF | CC | STORD | A1 | A2 | DRB, &[38..40, 44..64], 0, true),
        Opcode::Dualcast => s(
            BOF | CC | STORD | A1 | A2 | A3 | DRB,
            &[38..40, 48..64],
            0,
            true,
        ),
        Opcode::Crcgen if read_seed => s(
            BOF | A1 | A3 | CRC_FLAGS,
            &[24..32, 38..44, 56..64],
            RESULT,
            true,
        ),
        Opcode::Crcgen => s(
            BOF | A1 | CRC_FLAGS,
            &[24..32, 38..40, 44..64],
            RESULT,
            true,
        ),
        Opcode::CopyCrc if read_seed => s(
            BOF | CC | STORD | A1 | A2 | A3 | CRC_FLAGS,
            &[38..44, 56..64],
            RESULT,
            true,
        ),
        Opcode::CopyCrc => s(
            BOF | CC | STORD | A1 | A2 | CRC_FLAGS,
            &[38..40, 44..64],
            RESULT,
            true,
        ),
        Opcode::Cflush => s(BOF | CC | STORD | A2, &[16..24, 38..64], 0, true),
        // DIF: byte 40 source flags, 41 destination flags, 42 DIF flags,
        // 48-55 source tags, 56-63 destination tags.
        Opcode::DifCheck => s(BOF | A1, &[38..40, 41..42, 43..48, 56..64], 0, true),
        Opcode::DifStrip => s(
            BOF | CC | STORD | A1 | A2 | DRB,
            &[38..40, 41..42, 43..48, 56..64],
            0,
            true,
        ),
        Opcode::DifInsert => s(BOF | CC | STORD | A1 | A2 | DRB, &[38..41, 43..56], 0, true),
        Opcode::DifUpdate => s(BOF | CC | STORD | A1 | A2 | DRB, &[38..40, 43..48], 0, true),
    }
}

/// Checks a descriptor before it runs; returns its operation.
pub fn check(desc: &Descriptor, ctx: &CheckContext<'_>) -> Result<Opcode, Rejection> {
    let code = desc.opcode();
    let op_allowed =
        ctx.caps.supports(code) && ctx.op_config[usize::from(code) / 64] & (1 << (code % 64)) != 0;
    let op = Opcode::from_u8(code)
        .filter(|_| op_allowed)
        .filter(|op| !(ctx.in_batch && matches!(op, Opcode::Batch | Opcode::Drain)))
        .ok_or(Rejection::new(Status::BadOpcode))?;
    let spec = spec(op, desc);
    let f = desc.flags();
    let crav = f & flags::CRAV != 0;
    let rci = f & flags::RCI != 0;

    let mut allowed = spec.allowed | flags::CRAV | flags::RCI;
    if crav {
        allowed |= flags::RCR | flags::CR_TCS;
    }
    if ctx.in_batch {
        allowed |= flags::FENCE;
    }
    if !ctx.wq_bof || ctx.caps.gencap.block_on_fault() == 0 {
        allowed &= !BOF;
    }
    if ctx.caps.gencap.cache_control() == 0 {
        allowed &= !CC;
    }
    if ctx.caps.gencap.dest_readback() == 0 {
        allowed &= !DRB;
    }
    if !ctx.user_int_en && ctx.wq_pasid_en && !ctx.privileged {
        allowed &= !flags::RCI;
    }
    let invalid = f & !allowed;
    if invalid != 0 {
        return Err(Rejection {
            status: Status::InvalidFlags,
            invalid_flags: invalid,
        });
    }
    let missing = spec.required & !f;
    if missing != 0 {
        return Err(Rejection {
            status: Status::InvalidFlags,
            invalid_flags: missing,
        });
    }
    if op == Opcode::Drain && f & (flags::RCR | flags::RCI) == 0 {
        return Err(Rejection {
            status: Status::InvalidFlags,
            invalid_flags: flags::RCR,
        });
    }

    // Reserved unless their flag is set; checked without an allocation:
    // every descriptor of every submission passes here.
    let completion_addr = field::COMPLETION_ADDR..field::COMPLETION_ADDR + 8;
    let int_handle = field::INT_HANDLE..field::INT_HANDLE + 2;
    let conditional = [(!crav, completion_addr), (!rci, int_handle)];
    if desc.first_nonzero(spec.reserved).is_some()
        || conditional
            .into_iter()
            .any(|(reserved, range)| reserved && desc.first_nonzero(&[range]).is_some())
    {
        return Err(Rejection::new(Status::NonzeroReserve));
    }

    let size = desc.xfer_size();
    if spec.has_size && (size == 0 || u64::from(size) > ctx.max_xfer) {
        return Err(Rejection::new(Status::XferErange));
    }
    check_operands(op, desc, ctx)?;
    if rci && !ctx.int_handle_ok {
        return Err(Rejection::new(Status::IntHandleInval));
    }
    Ok(op)
}

fn check_operands(op: Opcode, desc: &Descriptor, ctx: &CheckContext<'_>) -> Result<(), Rejection> {
    let size = u64::from(desc.xfer_size());
    let reject = |status| Err(Rejection::new(status));
    match op {
        Opcode::Batch => {
            let count = desc.xfer_size();
            if count < 2 || count > ctx.max_batch {
                return reject(Status::DescCntErange);
            }
            if desc.src() & 63 != 0 {
                return reject(Status::DesclistAlign);
            }
        }
        Opcode::Memmove
            if ctx.caps.gencap.overlap_copy() == 0
                && overlaps(desc.src(), size, desc.dst(), size) =>
        {
            return reject(Status::OverlapBuffers);
        }
        Opcode::Dualcast => {
            let (src, d1, d2) = (desc.src(), desc.dst(), desc.u64_at(field::OP_SPECIFIC));
            if (d1 ^ d2) & 0xfff != 0 {
                return reject(Status::DcastErr);
            }
            if overlaps(src, size, d1, size)
                || overlaps(src, size, d2, size)
                || overlaps(d1, size, d2, size)
            {
                return reject(Status::OverlapBuffers);
            }
        }
        Opcode::CrDelta => {
            let max_delta = desc.u32_at(48);
            if size > u64::from(MAX_DELTA_XFER) {
                return reject(Status::XferErange);
            }
            if (desc.src() | desc.dst() | size) & 7 != 0 {
                return reject(Status::AddrAlign);
            }
            if max_delta < MIN_MAX_DELTA || u64::from(max_delta) > ctx.max_xfer {
                return reject(Status::DrErange);
            }
            let record = desc.u64_at(field::OP_SPECIFIC);
            let max = u64::from(max_delta);
            if overlaps(record, max, desc.src(), size) || overlaps(record, max, desc.dst(), size) {
                return reject(Status::OverlapBuffers);
            }
        }
        Opcode::ApDelta => {
            let record_size = desc.u32_at(40);
            if size > u64::from(MAX_DELTA_XFER) {
                return reject(Status::XferErange);
            }
            if (desc.dst() | size) & 7 != 0 {
                return reject(Status::AddrAlign);
            }
            if record_size < DELTA_ENTRY as u32
                || record_size as usize % DELTA_ENTRY != 0
                || u64::from(record_size) > ctx.max_xfer
            {
                return reject(Status::DrErange);
            }
            if overlaps(desc.src(), u64::from(record_size), desc.dst(), size) {
                return reject(Status::OverlapBuffers);
            }
        }
        Opcode::Crcgen | Opcode::CopyCrc => {
            if desc.has(flags::CRC_READ_SEED) && desc.u64_at(48) & 3 != 0 {
                return reject(Status::AddrAlign);
            }
            if op == Opcode::CopyCrc && overlaps(desc.src(), size, desc.dst(), size) {
                return reject(Status::OverlapBuffers);
            }
        }
        Opcode::DifCheck | Opcode::DifInsert | Opcode::DifStrip | Opcode::DifUpdate => {
            check_dif(op, desc)?;
        }
        _ => {}
    }
    Ok(())
}

/// DIF operands: defined flag bits only, a whole number of blocks, and no
/// overlap between source and destination.
fn check_dif(op: Opcode, desc: &Descriptor) -> Result<(), Rejection> {
    let reject = |status| Err(Rejection::new(status));
    let defined_dest = match op {
        Opcode::DifInsert => dif::dest_flags::INSERT,
        Opcode::DifUpdate => dif::dest_flags::UPDATE,
        _ => 0,
    };
    if desc.0[dif::field::DIF_FLAGS] & !dif::dif_flags::DEFINED != 0
        || desc.0[dif::field::DEST_FLAGS] & !defined_dest != 0
    {
        return reject(Status::NonzeroReserve);
    }
    if dif::source_block(op, desc).is_none() {
        return reject(Status::XferErange);
    }
    let size = u64::from(desc.xfer_size());
    if op != Opcode::DifCheck && overlaps(desc.src(), size, desc.dst(), dif::dest_len(op, desc)) {
        return reject(Status::OverlapBuffers);
    }
    Ok(())
}

/// Reads as much of `buf` at `addr` as possible: the bytes read and the
/// fault that stopped the read, if any.
fn read_partial(acc: &Access<'_>, addr: u64, buf: &mut [u8]) -> (usize, Option<Fault>) {
    match acc.read(addr, buf) {
        Ok(()) => (buf.len(), None),
        Err(fault) => (fault.done, Some(fault)),
    }
}

/// Reads `a.len()` bytes of two sources at `offset`: the bytes valid in
/// both and the first fault.
fn read_pair(
    acc: &Access<'_>,
    (src1, src2): (u64, u64),
    offset: usize,
    a: &mut [u8],
    b: &mut [u8],
) -> (usize, Option<Fault>) {
    let (valid, fault) = read_partial(acc, src1.wrapping_add(offset as u64), a);
    match read_partial(acc, src2.wrapping_add(offset as u64), &mut b[..valid]) {
        (valid, Some(second)) => (valid, Some(second)),
        (valid, None) => (valid, fault),
    }
}

/// A successful completion record.
fn success() -> CompletionRecord {
    CompletionRecord::new(Status::Success)
}

/// The completion record of an operation stopped by `fault` after
/// `bytes_completed`.
pub fn fault_record(fault: Fault, bytes_completed: usize) -> Result<CompletionRecord, Abandoned> {
    let status = match fault.cause {
        Cause::PageFault => Status::PageFaultNobof,
        Cause::PageRequestInvalid => Status::PageFaultIr,
        Cause::PageRequestFailure | Cause::TranslationError => Status::TranslationFail,
        Cause::Unmapped if fault.write => Status::HwErrDrb,
        Cause::Unmapped => Status::HwErr1,
        Cause::Aborted => return Err(Abandoned),
    };
    let mut record = CompletionRecord::new(status);
    // The R/W bit is defined only for translation faults.
    record.fault_write = fault.write && status.is_fault();
    record.fault_addr = fault.addr;
    record.bytes_completed = bytes_completed as u32;
    Ok(record)
}

/// Status after Check Result: `Success` when `expected`, else
/// `SuccessPred`; always `Success` without the flag.
fn predicate(desc: &Descriptor, expected: bool) -> Status {
    if desc.has(flags::CR) && !expected {
        Status::SuccessPred
    } else {
        Status::Success
    }
}

/// Runs a data operation (not Batch or Drain).
pub fn execute(
    op: Opcode,
    desc: &Descriptor,
    data: &Access<'_>,
) -> Result<CompletionRecord, Abandoned> {
    match op {
        Opcode::Noop | Opcode::Cflush => Ok(success()),
        Opcode::Memmove => memory::memmove(desc, data),
        Opcode::Memfill => memory::fill(desc, data),
        Opcode::Dualcast => memory::dualcast(desc, data),
        Opcode::Compare => compare::compare(desc, data),
        Opcode::Compval => compare::compare_pattern(desc, data),
        Opcode::CrDelta => delta::create(desc, data),
        Opcode::ApDelta => delta::apply(desc, data),
        Opcode::Crcgen => crc::generate(desc, data, false),
        Opcode::CopyCrc => crc::generate(desc, data, true),
        Opcode::DifCheck | Opcode::DifInsert | Opcode::DifStrip | Opcode::DifUpdate => {
            dif::execute(op, desc, data)
        }
        Opcode::Batch | Opcode::Drain => Ok(success()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DsaConfig;

    fn ctx(caps: &Capabilities) -> CheckContext<'_> {
        CheckContext {
            caps,
            in_batch: false,
            wq_bof: false,
            wq_pasid_en: false,
            privileged: true,
            user_int_en: false,
            max_xfer: 1 << 20,
            max_batch: 32,
            op_config: caps.opcap,
            int_handle_ok: true,
        }
    }

    fn memmove() -> Descriptor {
        let mut d = Descriptor::new(Opcode::Memmove, flags::CRAV | flags::RCR);
        d.set_completion_addr(0x1000)
            .set_src(0x2000)
            .set_dst(0x3000)
            .set_xfer_size(64);
        d
    }

    #[test]
    fn flag_and_field_checks() {
        let caps = Capabilities::new(&DsaConfig::default());
        let c = ctx(&caps);
        assert_eq!(check(&memmove(), &c), Ok(Opcode::Memmove));
        let fence = {
            let mut d = memmove();
            d.set_u32(4, d.u32_at(4) | flags::FENCE | flags::BOF);
            d
        };
        assert_eq!(
            check(&fence, &c),
            Err(Rejection {
                status: Status::InvalidFlags,
                invalid_flags: flags::FENCE | flags::BOF
            })
        );
        let mut bad = memmove();
        bad.0[40] = 1;
        assert_eq!(check(&bad, &c), Err(Rejection::new(Status::NonzeroReserve)));
        let mut bad = memmove();
        bad.set_xfer_size(0);
        assert_eq!(check(&bad, &c), Err(Rejection::new(Status::XferErange)));
        bad.set_xfer_size((1 << 20) + 1);
        assert_eq!(check(&bad, &c), Err(Rejection::new(Status::XferErange)));
        let mut d = Descriptor::new(Opcode::Compare, flags::CRAV);
        d.set_completion_addr(0x40).set_xfer_size(8);
        assert_eq!(
            check(&d, &c),
            Err(Rejection {
                status: Status::InvalidFlags,
                invalid_flags: flags::RCR
            })
        );
        let batch_in_batch = Descriptor::new(Opcode::Batch, 0);
        let in_batch = CheckContext {
            in_batch: true,
            ..c
        };
        assert_eq!(
            check(&batch_in_batch, &in_batch),
            Err(Rejection::new(Status::BadOpcode))
        );
        assert_eq!(
            check(&Descriptor::new(Opcode::Noop, 0).tap_opcode(0x0a), &c),
            Err(Rejection::new(Status::BadOpcode))
        );
    }

    #[test]
    fn wq_operation_configuration_is_respected() {
        let caps = Capabilities::new(&DsaConfig::default());
        let mut op_config = caps.opcap;
        op_config[0] &= !(1 << Opcode::Memmove as u8);
        let c = CheckContext {
            op_config,
            ..ctx(&caps)
        };
        assert_eq!(
            check(&memmove(), &c),
            Err(Rejection::new(Status::BadOpcode))
        );
        let mut noop = Descriptor::new(Opcode::Noop, flags::CRAV);
        noop.set_completion_addr(0x40);
        assert_eq!(check(&noop, &c), Ok(Opcode::Noop));
        // Interrupt requests from user-mode descriptors on a PASID WQ need
        // GENCFG.user_int_en; the handle must pass the permission check.
        let user = CheckContext {
            wq_pasid_en: true,
            privileged: false,
            ..ctx(&caps)
        };
        let mut rci = Descriptor::new(Opcode::Noop, flags::RCI);
        rci.set_int_handle(1);
        assert_eq!(
            check(&rci, &user),
            Err(Rejection {
                status: Status::InvalidFlags,
                invalid_flags: flags::RCI
            })
        );
        assert_eq!(
            check(
                &rci,
                &CheckContext {
                    user_int_en: true,
                    ..user
                }
            ),
            Ok(Opcode::Noop)
        );
        let refused = CheckContext {
            int_handle_ok: false,
            ..ctx(&caps)
        };
        assert_eq!(
            check(&rci, &refused),
            Err(Rejection::new(Status::IntHandleInval))
        );
    }

    trait Tap {
        fn tap_opcode(self, op: u8) -> Self;
    }
    impl Tap for Descriptor {
        fn tap_opcode(mut self, op: u8) -> Self {
            self.0[7] = op;
            self
        }
    }
}
