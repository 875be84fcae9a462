//! The 32-byte DSA completion record and operation status codes (DSA
//! specification §5.8.1, §8.2; Linux `struct dsa_completion_record`).

/// Operation status codes (completion record byte 0, bits 5:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Success = 0x01,
    /// Success with false predicate (Check Result).
    SuccessPred = 0x02,
    /// Partial completion: page fault without block-on-fault.
    PageFaultNobof = 0x03,
    /// Partial completion: page request answered Invalid, or retried too often.
    PageFaultIr = 0x04,
    /// A descriptor in the batch did not complete with Success.
    BatchFail = 0x05,
    /// Page fault reading the batch descriptor list.
    BatchPageFault = 0x06,
    /// Apply Delta: offsets not increasing.
    DrOffsetNoinc = 0x07,
    /// Apply Delta: offset beyond the transfer size.
    DrOffsetErange = 0x08,
    /// DIF Check, Strip or Update: a tag did not match (Result says which).
    DifError = 0x09,
    /// Unsupported operation code.
    BadOpcode = 0x10,
    /// Invalid flags.
    InvalidFlags = 0x11,
    /// Non-zero reserved field.
    NonzeroReserve = 0x12,
    /// Transfer size out of range.
    XferErange = 0x13,
    /// Batch descriptor count out of range.
    DescCntErange = 0x14,
    /// Unsupported (maximum) delta record size.
    DrErange = 0x15,
    /// Overlapping buffers.
    OverlapBuffers = 0x16,
    /// Dualcast destinations differ in bits 11:0.
    DcastErr = 0x17,
    /// Descriptor list not 64-byte aligned.
    DesclistAlign = 0x18,
    /// Invalid completion interrupt handle.
    IntHandleInval = 0x19,
    /// Completion record address could not be translated.
    CraXlat = 0x1a,
    /// Completion record address not 32-byte aligned.
    CraAlign = 0x1b,
    /// Misaligned address or size.
    AddrAlign = 0x1c,
    /// Privileged descriptor to a shared WQ without PASID privileged mode.
    PrivBad = 0x1d,
    /// Hardware error on a read (unsupported request).
    HwErr1 = 0x20,
    /// Hardware error on a write.
    HwErrDrb = 0x21,
    /// Address translation failed (or PRI response failure).
    TranslationFail = 0x22,
}

impl Status {
    /// Statuses that count as "successful" for Request Completion Record
    /// (no record is written for them unless requested).
    pub fn is_quiet(self) -> bool {
        matches!(self, Self::Success | Self::SuccessPred | Self::BatchFail)
    }

    /// Whether the status reports a translation fault (R/W bit meaningful).
    pub fn is_fault(self) -> bool {
        matches!(
            self,
            Self::PageFaultNobof | Self::PageFaultIr | Self::BatchPageFault | Self::CraXlat
        )
    }
}

/// Bit 7 of the status byte: the faulting access was a write.
pub const STATUS_WRITE: u8 = 0x80;

/// A completion record as the device writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletionRecord {
    /// Status.
    pub status: Status,
    /// The faulting access was a write (status bit 7).
    pub fault_write: bool,
    /// Operation result (byte 1).
    pub result: u8,
    /// Bytes (or descriptors, for a batch) completed (bytes 4-7).
    pub bytes_completed: u32,
    /// Fault address (bytes 8-15).
    pub fault_addr: u64,
    /// Operation-specific bytes 16-31 (invalid flags, CRC, delta size).
    pub op_specific: [u8; 16],
}

impl CompletionRecord {
    /// A record with `status` and everything else zero.
    pub fn new(status: Status) -> Self {
        Self {
            status,
            fault_write: false,
            result: 0,
            bytes_completed: 0,
            fault_addr: 0,
            op_specific: [0; 16],
        }
    }

    /// The status byte.
    pub fn status_byte(&self) -> u8 {
        self.status as u8 | if self.fault_write { STATUS_WRITE } else { 0 }
    }

    /// The 32 bytes in memory order.
    pub fn to_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0] = self.status_byte();
        b[1] = self.result;
        b[4..8].copy_from_slice(&self.bytes_completed.to_le_bytes());
        b[8..16].copy_from_slice(&self.fault_addr.to_le_bytes());
        b[16..32].copy_from_slice(&self.op_specific);
        b
    }

    /// Sets a little-endian u32 in the operation-specific bytes (offset from
    /// byte 16 of the record).
    pub fn set_op_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.op_specific[at..at + 4].copy_from_slice(&v.to_le_bytes());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_layout() {
        let mut r = CompletionRecord::new(Status::PageFaultNobof);
        r.fault_write = true;
        r.result = 1;
        r.bytes_completed = 0x1234;
        r.fault_addr = 0xdead_b000;
        r.set_op_u32(0, 0xe306_9283);
        let b = r.to_bytes();
        assert_eq!(b[0], 0x83);
        assert_eq!(b[1], 1);
        assert_eq!(&b[4..8], &[0x34, 0x12, 0, 0]);
        assert_eq!(
            u64::from_le_bytes(b[8..16].try_into().unwrap()),
            0xdead_b000
        );
        assert_eq!(
            u32::from_le_bytes(b[16..20].try_into().unwrap()),
            0xe306_9283
        );
    }
}
