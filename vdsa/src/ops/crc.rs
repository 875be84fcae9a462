//! CRC Generation and Copy with CRC Generation (DSA specification
//! §8.3.12-8.3.13, Appendix A): CRC-32C (iSCSI, polynomial 0x1EDC6F41).
//!
//! By default the seed and result are inverted and the data bits reflected,
//! so a zero seed gives the standard CRC-32C (0xE3069283 for "123456789")
//! and a partial result seeds the continuation. The Bypass flags skip the
//! inversion (the seed and result are then bit-reversed instead) and the
//! data reflection, as accel-config's reference implementation does.

use super::{fault_record, read_partial, Abandoned, CHUNK};
use crate::access::{Access, Fault};
use crate::completion::{CompletionRecord, Status};
use crate::descriptor::{field, flags, Descriptor};

/// A CRC-32C computation with the DSA seed and data conventions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crc32c {
    /// The CRC register in reflected bit order, without inversion.
    register: u32,
    bypass_inversion: bool,
    bypass_data_reflection: bool,
}

impl Crc32c {
    /// Starts from `seed` with the CRC operation-specific `flags`.
    pub fn new(seed: u32, flags: u32) -> Self {
        let bypass_inversion = flags & flags::CRC_BYPASS_INVERSION != 0;
        Self {
            register: if bypass_inversion {
                seed.reverse_bits()
            } else {
                !seed
            },
            bypass_inversion,
            bypass_data_reflection: flags & flags::CRC_BYPASS_DATA_REFLECTION != 0,
        }
    }

    /// Feeds `data`.
    pub fn update(&mut self, data: &[u8]) {
        // crc32c_append inverts on entry and exit; undo that around the
        // raw register.
        if self.bypass_data_reflection {
            let mut reflected = [0u8; 4096];
            for chunk in data.chunks(reflected.len()) {
                for (r, b) in reflected.iter_mut().zip(chunk) {
                    *r = b.reverse_bits();
                }
                self.register = !crc32c::crc32c_append(!self.register, &reflected[..chunk.len()]);
            }
        } else {
            self.register = !crc32c::crc32c_append(!self.register, data);
        }
    }

    /// The CRC value (usable as the seed of a continuation).
    pub fn value(&self) -> u32 {
        if self.bypass_inversion {
            self.register.reverse_bits()
        } else {
            !self.register
        }
    }
}

fn record(status: Status, crc: &Crc32c) -> CompletionRecord {
    let mut record = CompletionRecord::new(status);
    record.set_op_u32(0, crc.value());
    record
}

fn faulted(fault: Fault, bytes: usize, crc: &Crc32c) -> Result<CompletionRecord, Abandoned> {
    let mut r = fault_record(fault, bytes)?;
    r.set_op_u32(0, crc.value());
    Ok(r)
}

/// CRC Generation over the source; with `copy`, Copy with CRC Generation
/// to the destination at byte 24. The seed is at byte 40, or read from the
/// address at byte 48 with Read CRC Seed.
pub fn generate(
    desc: &Descriptor,
    acc: &Access<'_>,
    copy: bool,
) -> Result<CompletionRecord, Abandoned> {
    let seed = if desc.has(flags::CRC_READ_SEED) {
        let mut seed = [0u8; 4];
        if let Err(fault) = acc.read(desc.u64_at(48), &mut seed) {
            return fault_record(fault, 0);
        }
        u32::from_le_bytes(seed)
    } else {
        desc.u32_at(field::OP_SPECIFIC)
    };
    let mut crc = Crc32c::new(seed, desc.flags());
    let len = desc.xfer_size() as usize;
    let mut buf = vec![0u8; len.min(CHUNK)];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(CHUNK);
        let chunk = &mut buf[..n];
        let (valid, read_fault) = read_partial(acc, desc.src().wrapping_add(done as u64), chunk);
        if copy {
            if let Err(fault) = acc.write(desc.dst().wrapping_add(done as u64), &chunk[..valid]) {
                crc.update(&chunk[..fault.done]);
                return faulted(fault, done + fault.done, &crc);
            }
        }
        crc.update(&chunk[..valid]);
        if let Some(fault) = read_fault {
            return faulted(fault, done + valid, &crc);
        }
        done += n;
    }
    Ok(record(Status::Success, &crc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value_and_continuation() {
        let mut crc = Crc32c::new(0, 0);
        crc.update(b"123456789");
        assert_eq!(crc.value(), 0xe306_9283);
        let mut first = Crc32c::new(0, 0);
        first.update(b"12345");
        let mut second = Crc32c::new(first.value(), 0);
        second.update(b"6789");
        assert_eq!(second.value(), 0xe306_9283);
    }

    /// Bitwise CRC-32C over data with the given seed and flags, as the
    /// DSA specification's Appendix A describes it.
    fn reference(seed: u32, data: &[u8], flags: u32) -> u32 {
        let bypass_inv = flags & flags::CRC_BYPASS_INVERSION != 0;
        let bypass_ref = flags & flags::CRC_BYPASS_DATA_REFLECTION != 0;
        let mut reg = if bypass_inv {
            seed.reverse_bits()
        } else {
            !seed
        };
        for &byte in data {
            let byte = if bypass_ref {
                byte.reverse_bits()
            } else {
                byte
            };
            reg ^= u32::from(byte);
            for _ in 0..8 {
                reg = if reg & 1 != 0 {
                    (reg >> 1) ^ 0x82f6_3b78
                } else {
                    reg >> 1
                };
            }
        }
        if bypass_inv {
            reg.reverse_bits()
        } else {
            !reg
        }
    }

    #[test]
    fn bypass_flags_match_bitwise_reference() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 31 + 7) as u8).collect();
        for flags in [
            0,
            flags::CRC_BYPASS_INVERSION,
            flags::CRC_BYPASS_DATA_REFLECTION,
            flags::CRC_BYPASS_INVERSION | flags::CRC_BYPASS_DATA_REFLECTION,
        ] {
            let mut crc = Crc32c::new(0x1234_5678, flags);
            crc.update(&data);
            assert_eq!(
                crc.value(),
                reference(0x1234_5678, &data, flags),
                "flags {flags:#x}"
            );
        }
        // Known vector with both bypasses: the register starts at 0.
        let mut crc = Crc32c::new(0, flags::CRC_BYPASS_INVERSION);
        crc.update(b"123456789");
        assert_eq!(
            crc.value(),
            reference(0, b"123456789", flags::CRC_BYPASS_INVERSION)
        );
    }
}
