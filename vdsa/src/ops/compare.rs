//! Compare and Compare Pattern (DSA specification §8.3.6, §8.3.7).
//!
//! Result 0: equal; 1: different, with Bytes Completed at the first
//! difference. A difference found before a fault is reported instead of the
//! fault. Check Result compares Result with bit 0 of Expected Result.

use super::{fault_record, predicate, Abandoned, CHUNK};
use crate::access::{Access, Fault};
use crate::completion::CompletionRecord;
use crate::descriptor::{field, Descriptor};

fn finish(
    desc: &Descriptor,
    first_difference: Option<usize>,
    fault: Option<(Fault, usize)>,
) -> Result<CompletionRecord, Abandoned> {
    if let Some(at) = first_difference {
        let expected = desc.0[field::OP_SPECIFIC] & 1 == 1;
        let mut record = CompletionRecord::new(predicate(desc, expected));
        record.result = 1;
        record.bytes_completed = at as u32;
        return Ok(record);
    }
    if let Some((fault, compared)) = fault {
        return fault_record(fault, compared);
    }
    let expected = desc.0[field::OP_SPECIFIC] & 1 == 0;
    Ok(CompletionRecord::new(predicate(desc, expected)))
}

/// Compare source 1 (byte 16) with source 2 (byte 24).
pub fn compare(desc: &Descriptor, acc: &Access<'_>) -> Result<CompletionRecord, Abandoned> {
    let len = desc.xfer_size() as usize;
    let mut a = vec![0u8; len.min(CHUNK)];
    let mut b = vec![0u8; len.min(CHUNK)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let mut valid = n;
        let mut fault = None;
        if let Err(f) = acc.read(desc.src() + done as u64, &mut a[..n]) {
            valid = f.done;
            fault = Some(f);
        }
        if let Err(f) = acc.read(desc.dst() + done as u64, &mut b[..valid]) {
            valid = f.done;
            fault = Some(f);
        }
        let diff = a[..valid].iter().zip(&b[..valid]).position(|(x, y)| x != y);
        if diff.is_some() || fault.is_some() {
            return finish(
                desc,
                diff.map(|d| done + d),
                fault.map(|f| (f, done + valid)),
            );
        }
        done += n;
    }
    finish(desc, None, None)
}

/// Compare the source (byte 16) with the 8-byte pattern at byte 24.
pub fn compare_pattern(desc: &Descriptor, acc: &Access<'_>) -> Result<CompletionRecord, Abandoned> {
    let len = desc.xfer_size() as usize;
    let pattern = desc.dst().to_le_bytes();
    let mut a = vec![0u8; len.min(CHUNK)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let (valid, fault) = match acc.read(desc.src() + done as u64, &mut a[..n]) {
            Ok(()) => (n, None),
            Err(f) => (f.done, Some(f)),
        };
        // CHUNK is a multiple of 8, so the pattern phase restarts at 0.
        let diff = a[..valid]
            .iter()
            .zip(pattern.iter().cycle())
            .position(|(x, y)| x != y);
        if diff.is_some() || fault.is_some() {
            return finish(
                desc,
                diff.map(|d| done + d),
                fault.map(|f| (f, done + valid)),
            );
        }
        done += n;
    }
    finish(desc, None, None)
}
