//! Memory Move, Fill and Memory Copy with Dualcast (DSA specification
//! §8.3.4, §8.3.5, §8.3.10).

use super::{fault_record, read_partial, success, Abandoned, CHUNK};
use crate::access::Access;
use crate::bits::overlaps;
use crate::completion::CompletionRecord;
use crate::descriptor::{field, Descriptor};

/// Memory Move. Overlapping buffers are copied as if through a temporary
/// buffer: backwards when the destination starts inside the source, in
/// which case a partial completion reports Result = 1 and Bytes Completed
/// counts from the end.
pub fn memmove(desc: &Descriptor, acc: &Access<'_>) -> Result<CompletionRecord, Abandoned> {
    let (src, dst) = (desc.src(), desc.dst());
    let len = desc.xfer_size() as usize;
    if !overlaps(src, len as u64, dst, len as u64) {
        return match acc.copy(src, dst, len) {
            Ok(()) => Ok(success()),
            Err(fault) => fault_record(fault, fault.done),
        };
    }
    let mut buf = vec![0u8; len.min(CHUNK)];
    if dst > src {
        let mut remaining = len;
        while remaining > 0 {
            let n = remaining.min(CHUNK);
            let start = remaining - n;
            let chunk = &mut buf[..n];
            let moved = acc
                .read(src.wrapping_add(start as u64), chunk)
                .and_then(|()| acc.write(dst.wrapping_add(start as u64), chunk));
            if let Err(fault) = moved {
                let mut record = fault_record(fault, len - remaining)?;
                record.result = 1;
                return Ok(record);
            }
            remaining = start;
        }
        return Ok(success());
    }
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let chunk = &mut buf[..n];
        if let Err(fault) = acc.read(src.wrapping_add(done as u64), chunk) {
            if let Err(w) = acc.write(dst.wrapping_add(done as u64), &chunk[..fault.done]) {
                return fault_record(w, done + w.done);
            }
            return fault_record(fault, done + fault.done);
        }
        if let Err(fault) = acc.write(dst.wrapping_add(done as u64), chunk) {
            return fault_record(fault, done + fault.done);
        }
        done += n;
    }
    Ok(success())
}

/// Fill with the 8-byte pattern at byte 16.
pub fn fill(desc: &Descriptor, acc: &Access<'_>) -> Result<CompletionRecord, Abandoned> {
    let pattern = desc.src().to_le_bytes();
    let len = desc.xfer_size() as usize;
    let buf: Vec<u8> = pattern
        .iter()
        .copied()
        .cycle()
        .take(len.min(CHUNK))
        .collect();
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        if let Err(fault) = acc.write(desc.dst().wrapping_add(done as u64), &buf[..n]) {
            return fault_record(fault, done + fault.done);
        }
        done += n;
    }
    Ok(success())
}

/// Copy to two destinations; after a fault both hold the same number of
/// bytes.
pub fn dualcast(desc: &Descriptor, acc: &Access<'_>) -> Result<CompletionRecord, Abandoned> {
    let (src, dst1, dst2) = (desc.src(), desc.dst(), desc.u64_at(field::OP_SPECIFIC));
    let len = desc.xfer_size() as usize;
    let mut buf = vec![0u8; len.min(CHUNK)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let chunk = &mut buf[..n];
        let at = |base: u64| base.wrapping_add(done as u64);
        let (valid, read_fault) = read_partial(acc, at(src), chunk);
        if let Err(fault) = acc.write(at(dst1), &chunk[..valid]) {
            // Bring the second destination to the same point.
            if let Err(second) = acc.write(at(dst2), &chunk[..fault.done]) {
                return fault_record(second, done + second.done);
            }
            return fault_record(fault, done + fault.done);
        }
        if let Err(fault) = acc.write(at(dst2), &chunk[..valid]) {
            return fault_record(fault, done + fault.done);
        }
        if let Some(fault) = read_fault {
            return fault_record(fault, done + fault.done);
        }
        done += n;
    }
    Ok(success())
}
