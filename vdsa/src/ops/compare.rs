//! Compare and Compare Pattern (DSA specification §8.3.6, §8.3.7).
//!
//! Result 0: equal; 1: different, with Bytes Completed at the first
//! difference. A difference found before a fault is reported instead of the
//! fault. Check Result compares Result with bit 0 of Expected Result.

use super::{fault_record, predicate, read_pair, read_partial, Abandoned, CHUNK};
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

/// Compares the source at byte 16 with what `second` produces for each
/// chunk (source 2, or the repeated pattern).
fn scan(
    desc: &Descriptor,
    mut second: impl FnMut(usize, &mut [u8], &mut [u8]) -> (usize, Option<Fault>),
) -> Result<CompletionRecord, Abandoned> {
    let len = desc.xfer_size() as usize;
    let mut a = vec![0u8; len.min(CHUNK)];
    let mut b = vec![0u8; len.min(CHUNK)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let (valid, fault) = second(done, &mut a[..n], &mut b[..n]);
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

/// Compare source 1 (byte 16) with source 2 (byte 24).
pub fn compare(desc: &Descriptor, acc: &Access<'_>) -> Result<CompletionRecord, Abandoned> {
    scan(desc, |done, a, b| {
        read_pair(acc, (desc.src(), desc.dst()), done, a, b)
    })
}

/// Compare the source (byte 16) with the 8-byte pattern at byte 24.
pub fn compare_pattern(desc: &Descriptor, acc: &Access<'_>) -> Result<CompletionRecord, Abandoned> {
    let pattern = desc.dst().to_le_bytes();
    scan(desc, |done, a, b| {
        // CHUNK is a multiple of 8, so the pattern phase restarts at 0.
        for (x, y) in b.iter_mut().zip(pattern.iter().cycle()) {
            *x = *y;
        }
        read_partial(acc, desc.src().wrapping_add(done as u64), a)
    })
}
