//! The 64-byte DSA work descriptor (DSA specification §8.1; Linux
//! `include/uapi/linux/idxd.h`, `struct dsa_hw_desc`).

/// Operation codes (byte 7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// No-op.
    Noop = 0x00,
    /// Batch.
    Batch = 0x01,
    /// Drain.
    Drain = 0x02,
    /// Memory Move.
    Memmove = 0x03,
    /// Fill.
    Memfill = 0x04,
    /// Compare.
    Compare = 0x05,
    /// Compare Pattern.
    Compval = 0x06,
    /// Create Delta Record.
    CrDelta = 0x07,
    /// Apply Delta Record.
    ApDelta = 0x08,
    /// Memory Copy with Dualcast.
    Dualcast = 0x09,
    /// CRC Generation.
    Crcgen = 0x10,
    /// Copy with CRC Generation.
    CopyCrc = 0x11,
    /// DIF Check.
    DifCheck = 0x12,
    /// DIF Insert.
    DifInsert = 0x13,
    /// DIF Strip.
    DifStrip = 0x14,
    /// DIF Update.
    DifUpdate = 0x15,
    /// Cache Flush.
    Cflush = 0x20,
}

impl Opcode {
    /// Decodes an operation code this model knows.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0x00 => Self::Noop,
            0x01 => Self::Batch,
            0x02 => Self::Drain,
            0x03 => Self::Memmove,
            0x04 => Self::Memfill,
            0x05 => Self::Compare,
            0x06 => Self::Compval,
            0x07 => Self::CrDelta,
            0x08 => Self::ApDelta,
            0x09 => Self::Dualcast,
            0x10 => Self::Crcgen,
            0x11 => Self::CopyCrc,
            0x12 => Self::DifCheck,
            0x13 => Self::DifInsert,
            0x14 => Self::DifStrip,
            0x15 => Self::DifUpdate,
            0x20 => Self::Cflush,
            _ => return None,
        })
    }
}

/// Descriptor flags (bytes 4-6).
pub mod flags {
    /// Wait for earlier descriptors of the batch.
    pub const FENCE: u32 = 1 << 0;
    /// Block on fault.
    pub const BOF: u32 = 1 << 1;
    /// Completion record address valid.
    pub const CRAV: u32 = 1 << 2;
    /// Request completion record.
    pub const RCR: u32 = 1 << 3;
    /// Request completion interrupt.
    pub const RCI: u32 = 1 << 4;
    /// Check result.
    pub const CR: u32 = 1 << 7;
    /// Cache control 1 (write to cache).
    pub const CC: u32 = 1 << 8;
    /// Address 1 traffic-class selector.
    pub const ADDR1_TCS: u32 = 1 << 9;
    /// Address 2 traffic-class selector.
    pub const ADDR2_TCS: u32 = 1 << 10;
    /// Address 3 traffic-class selector.
    pub const ADDR3_TCS: u32 = 1 << 11;
    /// Completion record traffic-class selector.
    pub const CR_TCS: u32 = 1 << 12;
    /// Strict ordering.
    pub const STORD: u32 = 1 << 13;
    /// Read the destination back before completing (GENCAP.dest_readback).
    pub const DEST_READBACK: u32 = 1 << 14;
    /// CRC: read the seed from memory.
    pub const CRC_READ_SEED: u32 = 1 << 16;
    /// CRC: bypass seed/result inversion and reflection.
    pub const CRC_BYPASS_INVERSION: u32 = 1 << 17;
    /// CRC: bypass data reflection.
    pub const CRC_BYPASS_DATA_REFLECTION: u32 = 1 << 18;
    /// Drain: suppress the TC-A implicit readback.
    pub const DRAIN_SUPPRESS_TCA: u32 = 1 << 18;
    /// Drain: suppress the TC-B implicit readback.
    pub const DRAIN_SUPPRESS_TCB: u32 = 1 << 19;
}

/// Byte offsets of descriptor fields.
pub mod field {
    /// Completion record address.
    pub const COMPLETION_ADDR: usize = 8;
    /// Source / pattern / descriptor list address.
    pub const SRC: usize = 16;
    /// Destination / second source / compare pattern.
    pub const DST: usize = 24;
    /// Transfer size / descriptor count.
    pub const XFER_SIZE: usize = 32;
    /// Completion interrupt handle.
    pub const INT_HANDLE: usize = 36;
    /// First operation-specific byte.
    pub const OP_SPECIFIC: usize = 40;
}

/// A 64-byte descriptor.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Descriptor(pub [u8; 64]);

impl std::fmt::Debug for Descriptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Descriptor")
            .field("opcode", &self.opcode())
            .field("flags", &format_args!("{:#x}", self.flags()))
            .field("pasid", &self.pasid())
            .field("priv", &self.privileged())
            .field("completion", &format_args!("{:#x}", self.completion_addr()))
            .field("src", &format_args!("{:#x}", self.src()))
            .field("dst", &format_args!("{:#x}", self.dst()))
            .field("size", &self.xfer_size())
            .finish()
    }
}

impl Default for Descriptor {
    fn default() -> Self {
        Self([0; 64])
    }
}

impl Descriptor {
    /// A descriptor with `opcode` and `flags`, all other fields zero.
    pub fn new(opcode: Opcode, flags: u32) -> Self {
        let mut d = Self::default();
        d.set_u32(4, (flags & 0x00ff_ffff) | (u32::from(opcode as u8) << 24));
        d
    }

    /// Little-endian u16 at `at`.
    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_le_bytes([self.0[at], self.0[at + 1]])
    }

    /// Little-endian u32 at `at`.
    pub fn u32_at(&self, at: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.0[at..at + 4]);
        u32::from_le_bytes(b)
    }

    /// Little-endian u64 at `at`.
    pub fn u64_at(&self, at: usize) -> u64 {
        let mut b = [0; 8];
        b.copy_from_slice(&self.0[at..at + 8]);
        u64::from_le_bytes(b)
    }

    /// Stores a little-endian u16 at `at`.
    pub fn set_u16(&mut self, at: usize, v: u16) -> &mut Self {
        self.0[at..at + 2].copy_from_slice(&v.to_le_bytes());
        self
    }

    /// Stores a little-endian u32 at `at`.
    pub fn set_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.0[at..at + 4].copy_from_slice(&v.to_le_bytes());
        self
    }

    /// Stores a little-endian u64 at `at`.
    pub fn set_u64(&mut self, at: usize, v: u64) -> &mut Self {
        self.0[at..at + 8].copy_from_slice(&v.to_le_bytes());
        self
    }

    /// PASID (dword 0 bits 19:0).
    pub fn pasid(&self) -> u32 {
        self.u32_at(0) & pasid::PASID_MASK
    }

    /// Privilege (dword 0 bit 31).
    pub fn privileged(&self) -> bool {
        self.u32_at(0) & (1 << 31) != 0
    }

    /// Reserved bits 30:20 of dword 0.
    pub fn trusted_reserved(&self) -> u32 {
        self.u32_at(0) & 0x7ff0_0000
    }

    /// Sets the PASID and privilege (dword 0).
    pub fn set_pasid(&mut self, pasid: u32, privileged: bool) -> &mut Self {
        self.set_u32(
            0,
            (pasid & ::pasid::PASID_MASK) | (u32::from(privileged) << 31),
        )
    }

    /// The 24 flag bits.
    pub fn flags(&self) -> u32 {
        self.u32_at(4) & 0x00ff_ffff
    }

    /// Whether all of `mask` is set in the flags.
    pub fn has(&self, mask: u32) -> bool {
        self.flags() & mask == mask
    }

    /// The raw operation code.
    pub fn opcode(&self) -> u8 {
        self.0[7]
    }

    /// Completion record address.
    pub fn completion_addr(&self) -> u64 {
        self.u64_at(field::COMPLETION_ADDR)
    }

    /// Sets the completion record address.
    pub fn set_completion_addr(&mut self, addr: u64) -> &mut Self {
        self.set_u64(field::COMPLETION_ADDR, addr)
    }

    /// Source (or pattern, or descriptor list) at byte 16.
    pub fn src(&self) -> u64 {
        self.u64_at(field::SRC)
    }

    /// Sets byte 16-23.
    pub fn set_src(&mut self, v: u64) -> &mut Self {
        self.set_u64(field::SRC, v)
    }

    /// Destination (or second source, or compare pattern) at byte 24.
    pub fn dst(&self) -> u64 {
        self.u64_at(field::DST)
    }

    /// Sets bytes 24-31.
    pub fn set_dst(&mut self, v: u64) -> &mut Self {
        self.set_u64(field::DST, v)
    }

    /// Transfer size (descriptor count for a batch).
    pub fn xfer_size(&self) -> u32 {
        self.u32_at(field::XFER_SIZE)
    }

    /// Sets the transfer size.
    pub fn set_xfer_size(&mut self, v: u32) -> &mut Self {
        self.set_u32(field::XFER_SIZE, v)
    }

    /// Completion interrupt handle.
    pub fn int_handle(&self) -> u16 {
        self.u16_at(field::INT_HANDLE)
    }

    /// Sets the completion interrupt handle.
    pub fn set_int_handle(&mut self, v: u16) -> &mut Self {
        self.set_u16(field::INT_HANDLE, v)
    }

    /// The first byte index in `ranges` that holds a non-zero byte.
    pub fn first_nonzero(&self, ranges: &[std::ops::Range<usize>]) -> Option<usize> {
        ranges.iter().find_map(|r| {
            let bytes = self.0.get(r.clone())?;
            bytes.iter().position(|&b| b != 0).map(|i| r.start + i)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_linux() {
        let mut d = Descriptor::new(Opcode::Memmove, flags::CRAV | flags::RCR | flags::RCI);
        d.set_pasid(0x12345, true)
            .set_completion_addr(0x1000)
            .set_src(0x2000)
            .set_dst(0x3000)
            .set_xfer_size(4096)
            .set_int_handle(3);
        assert_eq!(d.u64_at(0), 0x0300_001c_8001_2345);
        assert_eq!((d.pasid(), d.privileged()), (0x12345, true));
        assert_eq!(d.opcode(), 3);
        assert_eq!(d.flags(), 0x1c);
        assert_eq!(d.u32_at(32), 4096);
        assert_eq!(d.u16_at(36), 3);
        assert_eq!(Opcode::from_u8(0x20), Some(Opcode::Cflush));
        assert_eq!(Opcode::from_u8(0x15), Some(Opcode::DifUpdate));
        assert_eq!(Opcode::from_u8(0x0a), None);
    }
}
