//! DIF Check, DIF Insert, DIF Strip and DIF Update (DSA specification
//! §8.3.14-8.3.17): T10 protection information, 8 bytes after each block of
//! 512, 520, 4096 or 4104 bytes, big-endian: the guard tag (CRC-16/T10-DIF
//! of the block, polynomial 0x8BB7), the application tag and the reference
//! tag.
//!
//! Blocks are processed whole: a fault stops the operation at a block
//! boundary, and the completion record's tag fields then hold the seeds for
//! the next block, so software can resubmit the rest. A tag mismatch ends
//! the operation with [`Status::DifError`], the failing checks in Result
//! and Bytes Completed counting the source bytes of the good blocks before.

use super::{fault_record, Abandoned};
use crate::access::{Access, Fault};
use crate::completion::{CompletionRecord, Status};
use crate::descriptor::{Descriptor, Opcode};

/// Bytes of protection information per block.
pub const PI_SIZE: usize = 8;

/// Byte offsets of the DIF fields in the descriptor.
pub mod field {
    /// Source DIF flags (Check, Strip, Update).
    pub const SRC_FLAGS: usize = 40;
    /// Destination DIF flags (Insert, Update).
    pub const DEST_FLAGS: usize = 41;
    /// DIF flags: block size and CRC inversions.
    pub const DIF_FLAGS: usize = 42;
    /// Source reference tag seed (Check, Strip, Update).
    pub const SRC_REF_TAG: usize = 48;
    /// Source application tag mask.
    pub const SRC_APP_MASK: usize = 52;
    /// Source application tag seed.
    pub const SRC_APP_TAG: usize = 54;
    /// Destination reference tag seed (Insert, Update).
    pub const DEST_REF_TAG: usize = 56;
    /// Destination application tag mask.
    pub const DEST_APP_MASK: usize = 60;
    /// Destination application tag seed.
    pub const DEST_APP_TAG: usize = 62;
}

/// Source DIF flags (byte 40).
pub mod src_flags {
    /// The reference tag is fixed (clear: it increments per block).
    pub const REF_TAG_FIXED: u8 = 1 << 7;
    /// Do not check reference tags.
    pub const REF_TAG_CHECK_DISABLE: u8 = 1 << 6;
    /// Do not check guard tags.
    pub const GUARD_CHECK_DISABLE: u8 = 1 << 5;
    /// The application tag increments per block (clear: fixed).
    pub const APP_TAG_INCREMENTING: u8 = 1 << 4;
    /// Skip a block's checks when its application tag is 0xFFFF and its
    /// reference tag 0xFFFFFFFF.
    pub const APP_AND_REF_TAG_F_DETECT: u8 = 1 << 3;
    /// Skip a block's checks when its application tag is 0xFFFF.
    pub const APP_TAG_F_DETECT: u8 = 1 << 2;
    /// Skip a block's checks when all 8 bytes of its tags are 0xFF.
    pub const ALL_F_DETECT: u8 = 1 << 1;
    /// With [`ALL_F_DETECT`], report such a block as an error instead.
    pub const ALL_F_DETECT_ERROR: u8 = 1 << 0;
}

/// Destination DIF flags (byte 41).
pub mod dest_flags {
    /// The reference tag is fixed (clear: it increments per block).
    pub const REF_TAG_FIXED: u8 = 1 << 7;
    /// Update: copy the source reference tag.
    pub const REF_TAG_PASS_THROUGH: u8 = 1 << 6;
    /// Update: copy the source guard tag.
    pub const GUARD_PASS_THROUGH: u8 = 1 << 5;
    /// The application tag increments per block (clear: fixed).
    pub const APP_TAG_INCREMENTING: u8 = 1 << 4;
    /// Update: copy the source application tag.
    pub const APP_TAG_PASS_THROUGH: u8 = 1 << 3;
    /// Bits defined for Insert.
    pub const INSERT: u8 = REF_TAG_FIXED | APP_TAG_INCREMENTING;
    /// Bits defined for Update.
    pub const UPDATE: u8 = 0xf8;
}

/// DIF flags (byte 42).
pub mod dif_flags {
    /// Block size: 0 = 512, 1 = 520, 2 = 4096, 3 = 4104.
    pub const BLOCK_SIZE: u8 = 0b11;
    /// Start the guard CRC from 0xFFFF instead of 0.
    pub const INVERT_CRC_SEED: u8 = 1 << 2;
    /// Invert the guard CRC.
    pub const INVERT_CRC_RESULT: u8 = 1 << 3;
    /// Defined bits.
    pub const DEFINED: u8 = BLOCK_SIZE | INVERT_CRC_SEED | INVERT_CRC_RESULT;
}

/// Result bits of a [`Status::DifError`] completion.
pub mod result {
    /// A guard tag did not match.
    pub const GUARD: u8 = 1 << 0;
    /// An application tag did not match.
    pub const APP_TAG: u8 = 1 << 1;
    /// A reference tag did not match.
    pub const REF_TAG: u8 = 1 << 2;
    /// All-F detected with the all-F error enabled.
    pub const ALL_F: u8 = 1 << 3;
}

/// The block sizes selected by DIF flags bits 1:0.
pub const BLOCK_SIZES: [usize; 4] = [512, 520, 4096, 4104];

const fn crc16_table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x8bb7
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

static CRC16_T10DIF: [u16; 256] = crc16_table();

/// CRC-16/T10-DIF (polynomial 0x8BB7, not reflected) continuing from `crc`.
pub fn crc16_t10dif(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc = (crc << 8) ^ CRC16_T10DIF[usize::from((crc >> 8) as u8 ^ b)];
    }
    crc
}

/// The 8 bytes of protection information of one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pi {
    /// Guard tag.
    pub guard: u16,
    /// Application tag.
    pub app: u16,
    /// Reference tag.
    pub reference: u32,
}

impl Pi {
    /// Decodes the big-endian tags.
    pub fn from_bytes(b: &[u8]) -> Self {
        Self {
            guard: u16::from_be_bytes([b[0], b[1]]),
            app: u16::from_be_bytes([b[2], b[3]]),
            reference: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    /// Encodes the big-endian tags.
    pub fn to_bytes(self) -> [u8; PI_SIZE] {
        let mut b = [0u8; PI_SIZE];
        b[..2].copy_from_slice(&self.guard.to_be_bytes());
        b[2..4].copy_from_slice(&self.app.to_be_bytes());
        b[4..].copy_from_slice(&self.reference.to_be_bytes());
        b
    }
}

/// Tag generation or checking state: seeds advanced per block.
#[derive(Clone, Copy, Debug)]
struct Tags {
    reference: u32,
    app: u16,
    app_mask: u16,
    ref_fixed: bool,
    app_incrementing: bool,
}

impl Tags {
    /// The seeds at `at` (reference tag, application tag mask, application
    /// tag) with the tag types of `flags`; source and destination flags
    /// place the types at the same bits.
    fn seeds(desc: &Descriptor, at: usize, flags: u8) -> Self {
        Self {
            reference: desc.u32_at(at),
            app_mask: desc.u16_at(at + 4),
            app: desc.u16_at(at + 6),
            ref_fixed: flags & src_flags::REF_TAG_FIXED != 0,
            app_incrementing: flags & src_flags::APP_TAG_INCREMENTING != 0,
        }
    }

    fn advance(&mut self) {
        if !self.ref_fixed {
            self.reference = self.reference.wrapping_add(1);
        }
        if self.app_incrementing {
            self.app = self.app.wrapping_add(1);
        }
    }
}

/// The decoded DIF parameters of a descriptor.
#[derive(Clone, Copy, Debug)]
struct Params {
    block: usize,
    invert_seed: bool,
    invert_result: bool,
    src_flags: u8,
    dest_flags: u8,
    src: Tags,
    dest: Tags,
}

impl Params {
    fn new(desc: &Descriptor) -> Self {
        let f = desc.0[field::DIF_FLAGS];
        let src_flags = desc.0[field::SRC_FLAGS];
        let dest_flags = desc.0[field::DEST_FLAGS];
        Self {
            block: BLOCK_SIZES[usize::from(f & dif_flags::BLOCK_SIZE)],
            invert_seed: f & dif_flags::INVERT_CRC_SEED != 0,
            invert_result: f & dif_flags::INVERT_CRC_RESULT != 0,
            src_flags,
            dest_flags,
            src: Tags::seeds(desc, field::SRC_REF_TAG, src_flags),
            dest: Tags::seeds(desc, field::DEST_REF_TAG, dest_flags),
        }
    }

    fn guard(&self, data: &[u8]) -> u16 {
        let seed = if self.invert_seed { 0xffff } else { 0 };
        let crc = crc16_t10dif(seed, data);
        if self.invert_result {
            !crc
        } else {
            crc
        }
    }

    /// The Result bits of checking `pi` of block `data` against `expected`
    /// (0: the block passes).
    fn check(&self, data: &[u8], pi: Pi, expected: &Tags) -> u8 {
        let f = self.src_flags;
        let all_f = pi.guard == 0xffff && pi.app == 0xffff && pi.reference == u32::MAX;
        if f & src_flags::ALL_F_DETECT != 0 && all_f {
            return if f & src_flags::ALL_F_DETECT_ERROR != 0 {
                result::ALL_F
            } else {
                0
            };
        }
        if f & src_flags::APP_TAG_F_DETECT != 0 && pi.app == 0xffff {
            return 0;
        }
        if f & src_flags::APP_AND_REF_TAG_F_DETECT != 0
            && pi.app == 0xffff
            && pi.reference == u32::MAX
        {
            return 0;
        }
        let mut errors = 0;
        if f & src_flags::GUARD_CHECK_DISABLE == 0 && pi.guard != self.guard(data) {
            errors |= result::GUARD;
        }
        if (pi.app ^ expected.app) & !expected.app_mask != 0 {
            errors |= result::APP_TAG;
        }
        if f & src_flags::REF_TAG_CHECK_DISABLE == 0 && pi.reference != expected.reference {
            errors |= result::REF_TAG;
        }
        errors
    }

    /// The protection information written after block `data`; `source` is
    /// the block's source PI for Update's pass-through flags.
    fn generate(&self, data: &[u8], source: Option<Pi>) -> Pi {
        let f = self.dest_flags;
        let pass = |bit: u8| source.filter(|_| f & bit != 0);
        Pi {
            guard: pass(dest_flags::GUARD_PASS_THROUGH)
                .map_or_else(|| self.guard(data), |s| s.guard),
            app: pass(dest_flags::APP_TAG_PASS_THROUGH).map_or(self.dest.app, |s| s.app),
            reference: pass(dest_flags::REF_TAG_PASS_THROUGH)
                .map_or(self.dest.reference, |s| s.reference),
        }
    }
}

/// The bytes each block occupies in the source and the destination.
fn strides(op: Opcode, block: usize) -> (usize, usize) {
    let with_pi = block + PI_SIZE;
    match op {
        Opcode::DifInsert => (block, with_pi),
        Opcode::DifStrip => (with_pi, block),
        Opcode::DifUpdate => (with_pi, with_pi),
        _ => (with_pi, 0),
    }
}

/// The block size of a descriptor, if its transfer size is a whole number
/// of blocks (with or without PI, as the operation reads them).
pub fn source_block(op: Opcode, desc: &Descriptor) -> Option<usize> {
    let block = BLOCK_SIZES[usize::from(desc.0[field::DIF_FLAGS] & dif_flags::BLOCK_SIZE)];
    let (src, _) = strides(op, block);
    let size = desc.xfer_size() as usize;
    (size > 0 && size % src == 0).then_some(src)
}

/// Bytes written to the destination by a valid descriptor.
pub fn dest_len(op: Opcode, desc: &Descriptor) -> u64 {
    let block = BLOCK_SIZES[usize::from(desc.0[field::DIF_FLAGS] & dif_flags::BLOCK_SIZE)];
    let (src, dst) = strides(op, block);
    (desc.xfer_size() as usize / src * dst) as u64
}

/// The completion record with the tag fields the operation reports: the
/// seeds of the next unprocessed block.
fn with_tags(mut record: CompletionRecord, op: Opcode, p: &Params) -> CompletionRecord {
    let put_tags = |r: &mut CompletionRecord, at: usize, t: &Tags| {
        r.set_op_u32(at, t.reference);
        r.op_specific[at + 4..at + 6].copy_from_slice(&t.app_mask.to_le_bytes());
        r.op_specific[at + 6..at + 8].copy_from_slice(&t.app.to_le_bytes());
    };
    match op {
        Opcode::DifInsert => put_tags(&mut record, 8, &p.dest),
        Opcode::DifUpdate => {
            put_tags(&mut record, 0, &p.src);
            put_tags(&mut record, 8, &p.dest);
        }
        _ => put_tags(&mut record, 0, &p.src),
    }
    record
}

fn faulted(
    fault: Fault,
    done: usize,
    op: Opcode,
    p: &Params,
) -> Result<CompletionRecord, Abandoned> {
    Ok(with_tags(fault_record(fault, done)?, op, p))
}

/// Runs one of the four DIF operations on a checked descriptor.
pub fn execute(
    op: Opcode,
    desc: &Descriptor,
    acc: &Access<'_>,
) -> Result<CompletionRecord, Abandoned> {
    let mut p = Params::new(desc);
    let (src_stride, dst_stride) = strides(op, p.block);
    let blocks = desc.xfer_size() as usize / src_stride;
    let mut buf = vec![0u8; p.block + PI_SIZE];
    for i in 0..blocks {
        let src_at = desc.src().wrapping_add((i * src_stride) as u64);
        let done = i * src_stride;
        let block = &mut buf[..src_stride];
        if let Err(fault) = acc.read(src_at, block) {
            return faulted(fault, done, op, &p);
        }
        let source_pi = (op != Opcode::DifInsert).then(|| Pi::from_bytes(&block[p.block..]));
        if let Some(pi) = source_pi {
            let errors = p.check(&block[..p.block], pi, &p.src);
            if errors != 0 {
                let mut record = with_tags(CompletionRecord::new(Status::DifError), op, &p);
                record.result = errors;
                record.bytes_completed = done as u32;
                return Ok(record);
            }
        }
        if op != Opcode::DifCheck {
            if matches!(op, Opcode::DifInsert | Opcode::DifUpdate) {
                let pi = p.generate(&buf[..p.block], source_pi);
                buf[p.block..].copy_from_slice(&pi.to_bytes());
            }
            let dst_at = desc.dst().wrapping_add((i * dst_stride) as u64);
            if let Err(fault) = acc.write(dst_at, &buf[..dst_stride]) {
                return faulted(fault, done, op, &p);
            }
        }
        p.src.advance();
        p.dest.advance();
    }
    Ok(with_tags(CompletionRecord::new(Status::Success), op, &p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_check_value() {
        // The catalogue check value of CRC-16/T10-DIF.
        assert_eq!(crc16_t10dif(0, b"123456789"), 0xd0db);
    }

    #[test]
    fn pi_is_big_endian() {
        let pi = Pi {
            guard: 0x1234,
            app: 0xface,
            reference: 0xabba_0001,
        };
        assert_eq!(pi.to_bytes(), [0x12, 0x34, 0xfa, 0xce, 0xab, 0xba, 0, 1]);
        assert_eq!(Pi::from_bytes(&pi.to_bytes()), pi);
    }
}
