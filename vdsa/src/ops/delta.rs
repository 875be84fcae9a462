//! Create Delta Record and Apply Delta Record (DSA specification §8.3.8,
//! §8.3.9).
//!
//! A delta record is an array of 10-byte entries: a little-endian 16-bit
//! offset, in 8-byte words, followed by the 8 bytes of source 2 at that
//! word.

use super::{fault_record, predicate, read_pair, read_partial, Abandoned, CHUNK, DELTA_ENTRY};
use crate::access::{Access, Fault};
use crate::completion::{CompletionRecord, Status};
use crate::descriptor::{field, Descriptor};

/// Entries a Create Delta Record collects before writing them out.
const FLUSH_ENTRIES: usize = 256;

struct Writer<'a, 'b> {
    acc: &'a Access<'b>,
    base: u64,
    written: usize,
    pending: Vec<u8>,
    /// Byte offset (in the sources) of each pending entry's word.
    words: Vec<usize>,
}

impl Writer<'_, '_> {
    fn size(&self) -> usize {
        self.written + self.pending.len()
    }

    fn push(&mut self, word_offset: usize, data: &[u8]) {
        self.pending
            .extend_from_slice(&((word_offset / 8) as u16).to_le_bytes());
        self.pending.extend_from_slice(data);
        self.words.push(word_offset);
    }

    /// Writes the pending entries; on a fault returns it with the source
    /// offset of the first entry not fully written.
    fn flush(&mut self) -> Result<(), (Fault, usize)> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let at = self.base.wrapping_add(self.written as u64);
        if let Err(fault) = self.acc.write(at, &self.pending) {
            let entries = fault.done / DELTA_ENTRY;
            self.written += entries * DELTA_ENTRY;
            return Err((fault, self.words[entries]));
        }
        self.written += self.pending.len();
        self.pending.clear();
        self.words.clear();
        Ok(())
    }
}

fn create_record(status: Status, result: u8, bytes: usize, delta_size: usize) -> CompletionRecord {
    let mut record = CompletionRecord::new(status);
    record.result = result;
    record.bytes_completed = bytes as u32;
    record.set_op_u32(0, delta_size as u32);
    record
}

/// Create Delta Record: source 1 at byte 16, source 2 at byte 24, record at
/// byte 40, maximum record size at byte 48, expected-result mask at byte 56.
pub fn create(desc: &Descriptor, acc: &Access<'_>) -> Result<CompletionRecord, Abandoned> {
    let len = desc.xfer_size() as usize;
    let max = desc.u32_at(48) as usize;
    let mask = desc.0[56];
    let mut writer = Writer {
        acc,
        base: desc.u64_at(field::OP_SPECIFIC),
        written: 0,
        pending: Vec::new(),
        words: Vec::new(),
    };
    let finish = |status: Status, result: u8, bytes: usize, size: usize| {
        let status = if status == Status::Success {
            predicate(desc, mask >> result & 1 == 1)
        } else {
            status
        };
        create_record(status, result, bytes, size)
    };
    let faulted =
        |fault: Fault, bytes: usize, size: usize| -> Result<CompletionRecord, Abandoned> {
            let mut record = fault_record(fault, bytes)?;
            record.result = u8::from(size > 0);
            record.set_op_u32(0, size as u32);
            Ok(record)
        };
    let mut a = vec![0u8; len.min(CHUNK)];
    let mut b = vec![0u8; len.min(CHUNK)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let (valid, read_fault) = read_pair(
            acc,
            (desc.src(), desc.dst()),
            done,
            &mut a[..n],
            &mut b[..n],
        );
        let words = valid / 8;
        for w in 0..words {
            let (x, y) = (&a[w * 8..w * 8 + 8], &b[w * 8..w * 8 + 8]);
            if x == y {
                continue;
            }
            let offset = done + w * 8;
            if writer.size() + DELTA_ENTRY > max {
                if let Err((fault, at)) = writer.flush() {
                    return faulted(fault, at, writer.written);
                }
                return Ok(finish(Status::Success, 2, offset, writer.written));
            }
            writer.push(offset, y);
            if writer.words.len() >= FLUSH_ENTRIES {
                if let Err((fault, at)) = writer.flush() {
                    return faulted(fault, at, writer.written);
                }
            }
        }
        if let Err((fault, at)) = writer.flush() {
            return faulted(fault, at, writer.written);
        }
        if let Some(fault) = read_fault {
            return faulted(fault, done + words * 8, writer.written);
        }
        done += n;
    }
    let result = u8::from(writer.written > 0);
    Ok(finish(Status::Success, result, 0, writer.written))
}

/// Apply Delta Record: record at byte 16, destination at byte 24, record
/// size at byte 40. Bytes Completed counts record bytes applied.
pub fn apply(desc: &Descriptor, acc: &Access<'_>) -> Result<CompletionRecord, Abandoned> {
    let len = u64::from(desc.xfer_size());
    let size = desc.u32_at(field::OP_SPECIFIC) as usize;
    let step = (CHUNK / DELTA_ENTRY) * DELTA_ENTRY;
    let mut buf = vec![0u8; size.min(step)];
    let mut applied = 0;
    let mut previous: Option<u16> = None;
    while applied < size {
        let n = (size - applied).min(step);
        let (valid, read_fault) =
            read_partial(acc, desc.src().wrapping_add(applied as u64), &mut buf[..n]);
        for entry in buf[..valid].chunks_exact(DELTA_ENTRY) {
            let offset = u16::from_le_bytes([entry[0], entry[1]]);
            let status = if previous.is_some_and(|p| offset <= p) {
                Some(Status::DrOffsetNoinc)
            } else if u64::from(offset) * 8 >= len {
                Some(Status::DrOffsetErange)
            } else {
                None
            };
            if let Some(status) = status {
                let mut record = CompletionRecord::new(status);
                record.bytes_completed = applied as u32;
                return Ok(record);
            }
            if let Err(fault) =
                acc.write(desc.dst().wrapping_add(u64::from(offset) * 8), &entry[2..])
            {
                return fault_record(fault, applied);
            }
            previous = Some(offset);
            applied += DELTA_ENTRY;
        }
        if let Some(fault) = read_fault {
            return fault_record(fault, applied);
        }
    }
    Ok(CompletionRecord::new(Status::Success))
}
