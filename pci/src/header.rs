//! The type-0 configuration header: register offsets and the bits of its
//! registers that more than one crate reads or programs (PCI Local Bus 3.0,
//! 6.1 and 6.2).

/// Register offsets.
pub mod offset {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: u16 = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: u16 = 0x02;
    /// Command register (16 bits).
    pub const COMMAND: u16 = 0x04;
    /// Status register (16 bits).
    pub const STATUS: u16 = 0x06;
    /// Revision ID (8 bits).
    pub const REVISION_ID: u16 = 0x08;
    /// Class code (24 bits).
    pub const CLASS_CODE: u16 = 0x09;
    /// Cache line size (8 bits).
    pub const CACHE_LINE_SIZE: u16 = 0x0c;
    /// Header type (8 bits).
    pub const HEADER_TYPE: u16 = 0x0e;
    /// The first BAR; BAR n is at `BAR0 + 4 * n`.
    pub const BAR0: u16 = 0x10;
    /// Subsystem vendor ID (16 bits).
    pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
    /// Subsystem ID (16 bits).
    pub const SUBSYSTEM_ID: u16 = 0x2e;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES_POINTER: u16 = 0x34;
    /// Interrupt line (8 bits).
    pub const INTERRUPT_LINE: u16 = 0x3c;
}

/// Command register bits.
pub mod command {
    /// I/O space decode.
    pub const IO_SPACE: u16 = 1 << 0;
    /// Memory space decode.
    pub const MEMORY_SPACE: u16 = 1 << 1;
    /// Bus master: the function may issue DMA.
    pub const BUS_MASTER: u16 = 1 << 2;
    /// Parity error response.
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    /// SERR# enable.
    pub const SERR: u16 = 1 << 8;
    /// INTx emulation disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Status register bits.
pub mod status {
    /// The function has a capability list.
    pub const CAPABILITIES_LIST: u16 = 1 << 4;
    /// Bits 8 and 11..15: write-1-to-clear error flags.
    pub const W1C: u16 = 0xf900;
}

/// BAR low-dword fields.
pub mod bar {
    /// An I/O BAR.
    pub const IO_SPACE: u32 = 1 << 0;
    /// Memory BAR type (bits 2:1).
    pub const MEM_TYPE_MASK: u32 = 0b11 << 1;
    /// Memory BAR type 64-bit.
    pub const MEM_TYPE_64: u32 = 0b10 << 1;
    /// Prefetchable memory.
    pub const PREFETCHABLE: u32 = 1 << 3;
    /// The address bits of a memory BAR's low dword.
    pub const MEM_ADDRESS_MASK: u32 = !0xf;
}
