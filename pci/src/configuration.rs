//! A PCI type-0 configuration space with BARs and capability lists.

use thiserror::Error;

use crate::header::{bar, command, offset, status};

/// Size of a PCIe function's configuration space.
pub const CONFIG_SPACE_SIZE: usize = 4096;
/// Size of the part reachable through the legacy 0xCF8/0xCFC mechanism.
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;
/// Number of BAR registers in a type-0 header.
pub const BAR_COUNT: usize = 6;

// Type-0 header register offsets, as indexes into the space.
const VENDOR_ID: usize = offset::VENDOR_ID as usize;
const DEVICE_ID: usize = offset::DEVICE_ID as usize;
const COMMAND: usize = offset::COMMAND as usize;
const STATUS: usize = offset::STATUS as usize;
const REVISION_ID: usize = offset::REVISION_ID as usize;
const CLASS_CODE: usize = offset::CLASS_CODE as usize;
const CACHE_LINE_SIZE: usize = offset::CACHE_LINE_SIZE as usize;
const HEADER_TYPE: usize = offset::HEADER_TYPE as usize;
const BAR0: usize = offset::BAR0 as usize;
const SUBSYSTEM_VENDOR_ID: usize = offset::SUBSYSTEM_VENDOR_ID as usize;
const SUBSYSTEM_ID: usize = offset::SUBSYSTEM_ID as usize;
const CAPABILITIES_POINTER: usize = offset::CAPABILITIES_POINTER as usize;
const INTERRUPT_LINE: usize = offset::INTERRUPT_LINE as usize;

/// First offset of the standard capability list.
const CAPABILITY_START: usize = 0x40;
/// First offset of the extended capability list.
const EXT_CAPABILITY_START: usize = 0x100;

/// Errors building a configuration space.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The BAR index is 6 or more, or a 64-bit BAR would not fit.
    #[error("BAR index {0} is out of range")]
    InvalidBarIndex(usize),
    /// The BAR size is not a power of two of at least 16 bytes.
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes")]
    InvalidBarSize(u64),
    /// The BAR register is already used.
    #[error("BAR {0} is already in use")]
    BarInUse(usize),
    /// The address is not aligned to the BAR's size or does not fit its width.
    #[error("address {addr:#x} does not suit BAR {index}")]
    InvalidBarAddress {
        /// The BAR.
        index: usize,
        /// The rejected address.
        addr: u64,
    },
    /// The capability does not fit in what is left of its list's area.
    #[error("no room for a capability of {0} bytes")]
    NoRoom(usize),
    /// The write mask is longer than the capability body.
    #[error("write mask longer than the capability body")]
    MaskTooLong,
}

/// The identity of a function, written into its header at creation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PciHeader {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// Class code: base class in bits 23:16, subclass in 15:8, prog-if in 7:0.
    pub class_code: u32,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
}

/// The type of a memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// A 32-bit memory BAR.
    Memory32 {
        /// Whether reads have no side effects.
        prefetchable: bool,
    },
    /// A 64-bit memory BAR; it also takes the next BAR register.
    Memory64 {
        /// Whether reads have no side effects.
        prefetchable: bool,
    },
}

/// A memory BAR that currently decodes accesses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappedBar {
    /// The BAR register index (the lower one for a 64-bit BAR).
    pub index: u8,
    /// The guest-physical base address.
    pub base: u64,
    /// The size in bytes.
    pub size: u64,
}

#[derive(Clone, Copy, Debug)]
struct Bar {
    size: u64,
    kind: BarKind,
}

/// A type-0 configuration space of 4 KiB.
///
/// Every byte has a write mask (bits the guest may change) and a
/// write-1-to-clear mask; everything else is read-only to the guest. The
/// owning device changes read-only state with the `set_*` methods.
#[derive(Clone)]
pub struct PciConfiguration {
    regs: Box<[u8; CONFIG_SPACE_SIZE]>,
    writable: Box<[u8; CONFIG_SPACE_SIZE]>,
    write_one_to_clear: Box<[u8; CONFIG_SPACE_SIZE]>,
    bars: [Option<Bar>; BAR_COUNT],
    last_capability: Option<usize>,
    next_capability: usize,
    last_ext_capability: Option<usize>,
    next_ext_capability: usize,
}

impl std::fmt::Debug for PciConfiguration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciConfiguration")
            .field("vendor_id", &self.read_u16(VENDOR_ID as u16))
            .field("device_id", &self.read_u16(DEVICE_ID as u16))
            .field("bars", &self.bars)
            .finish_non_exhaustive()
    }
}

impl PciConfiguration {
    /// Creates a configuration space with the given identity, no BARs and
    /// no capabilities.
    pub fn new(header: &PciHeader) -> Self {
        let mut cfg = Self {
            regs: Box::new([0; CONFIG_SPACE_SIZE]),
            writable: Box::new([0; CONFIG_SPACE_SIZE]),
            write_one_to_clear: Box::new([0; CONFIG_SPACE_SIZE]),
            bars: [None; BAR_COUNT],
            last_capability: None,
            next_capability: CAPABILITY_START,
            last_ext_capability: None,
            next_ext_capability: EXT_CAPABILITY_START,
        };
        cfg.put(VENDOR_ID, &header.vendor_id.to_le_bytes());
        cfg.put(DEVICE_ID, &header.device_id.to_le_bytes());
        cfg.put(REVISION_ID, &[header.revision_id]);
        cfg.put(CLASS_CODE, &header.class_code.to_le_bytes()[..3]);
        cfg.put(
            SUBSYSTEM_VENDOR_ID,
            &header.subsystem_vendor_id.to_le_bytes(),
        );
        cfg.put(SUBSYSTEM_ID, &header.subsystem_id.to_le_bytes());
        cfg.put(HEADER_TYPE, &[0]);
        let command_mask = command::IO_SPACE
            | command::MEMORY_SPACE
            | command::BUS_MASTER
            | command::PARITY_ERROR_RESPONSE
            | command::SERR
            | command::INTX_DISABLE;
        cfg.set_writable(COMMAND as u16, &command_mask.to_le_bytes());
        cfg.set_write_one_to_clear(STATUS as u16, &status::W1C.to_le_bytes());
        cfg.set_writable(CACHE_LINE_SIZE as u16, &[0xff]);
        cfg.set_writable(INTERRUPT_LINE as u16, &[0xff]);
        cfg
    }

    /// Declares BAR `index` with a power-of-two `size` (at least 16 bytes).
    pub fn add_bar(&mut self, index: usize, size: u64, kind: BarKind) -> Result<(), ConfigError> {
        let wide = matches!(kind, BarKind::Memory64 { .. });
        if index >= BAR_COUNT || (wide && index + 1 >= BAR_COUNT) {
            return Err(ConfigError::InvalidBarIndex(index));
        }
        if size < 16 || !size.is_power_of_two() || (!wide && size > 1 << 31) {
            return Err(ConfigError::InvalidBarSize(size));
        }
        let taken = |i: usize| {
            self.bars[i].is_some()
                || (i > 0
                    && matches!(
                        self.bars[i - 1],
                        Some(Bar {
                            kind: BarKind::Memory64 { .. },
                            ..
                        })
                    ))
        };
        if taken(index) || (wide && taken(index + 1)) {
            return Err(ConfigError::BarInUse(index));
        }
        let (flags, prefetchable) = match kind {
            BarKind::Memory32 { prefetchable } => (0, prefetchable),
            BarKind::Memory64 { prefetchable } => (bar::MEM_TYPE_64, prefetchable),
        };
        let flags = flags | if prefetchable { bar::PREFETCHABLE } else { 0 };
        let mask = !(size - 1);
        let reg = (BAR0 + 4 * index) as u16;
        self.put(reg.into(), &flags.to_le_bytes());
        self.set_writable(reg, &((mask as u32) & !0xf).to_le_bytes());
        if wide {
            self.set_writable(reg + 4, &((mask >> 32) as u32).to_le_bytes());
        }
        self.bars[index] = Some(Bar { size, kind });
        Ok(())
    }

    /// Assigns BAR `index` an address, as firmware would before the OS runs.
    pub fn set_bar_address(&mut self, index: usize, addr: u64) -> Result<(), ConfigError> {
        let bar = self.bar(index).ok_or(ConfigError::InvalidBarIndex(index))?;
        let wide = matches!(bar.kind, BarKind::Memory64 { .. });
        if addr & (bar.size - 1) != 0 || (!wide && addr > u64::from(u32::MAX)) {
            return Err(ConfigError::InvalidBarAddress { index, addr });
        }
        let reg = BAR0 + 4 * index;
        let flags = self.read_u32(reg as u16) & 0xf;
        self.put(reg, &((addr as u32) | flags).to_le_bytes());
        if wide {
            self.put(reg + 4, &((addr >> 32) as u32).to_le_bytes());
        }
        Ok(())
    }

    /// The address BAR `index` is programmed with (0 when unassigned).
    pub fn bar_address(&self, index: usize) -> u64 {
        let Some(bar) = self.bar(index) else {
            return 0;
        };
        let reg = (BAR0 + 4 * index) as u16;
        let low = u64::from(self.read_u32(reg) & !0xf);
        match bar.kind {
            BarKind::Memory32 { .. } => low,
            BarKind::Memory64 { .. } => low | (u64::from(self.read_u32(reg + 4)) << 32),
        }
    }

    /// The size of BAR `index`, if it exists.
    pub fn bar_size(&self, index: usize) -> Option<u64> {
        self.bar(index).map(|b| b.size)
    }

    fn bar(&self, index: usize) -> Option<Bar> {
        self.bars.get(index).copied().flatten()
    }

    /// The BARs that decode memory now: memory space enabled, address set.
    pub fn mapped_bars(&self) -> Vec<MappedBar> {
        if !self.memory_enabled() {
            return Vec::new();
        }
        (0..BAR_COUNT)
            .filter_map(|i| {
                let bar = self.bar(i)?;
                let base = self.bar_address(i);
                (base != 0).then_some(MappedBar {
                    index: i as u8,
                    base,
                    size: bar.size,
                })
            })
            .collect()
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read_u16(COMMAND as u16)
    }

    /// Whether memory-space decoding is enabled.
    pub fn memory_enabled(&self) -> bool {
        self.command() & command::MEMORY_SPACE != 0
    }

    /// Whether the function may master the bus (issue DMA and MSIs).
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & command::BUS_MASTER != 0
    }

    /// Appends a standard capability with ID `id`.
    ///
    /// `body` is everything after the two-byte ID/next header; `writable`
    /// (at most as long as `body`) gives the bits of the body the guest may
    /// write. Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<u16, ConfigError> {
        if writable.len() > body.len() {
            return Err(ConfigError::MaskTooLong);
        }
        let len = (2 + body.len()).next_multiple_of(4);
        let offset = self.next_capability;
        if offset + len > LEGACY_CONFIG_SPACE_SIZE {
            return Err(ConfigError::NoRoom(len));
        }
        self.put(offset, &[id, 0]);
        self.put(offset + 2, body);
        self.set_writable((offset + 2) as u16, writable);
        match self.last_capability {
            Some(last) => self.put(last + 1, &[offset as u8]),
            None => {
                self.put(CAPABILITIES_POINTER, &[offset as u8]);
                let status = self.read_u16(STATUS as u16) | status::CAPABILITIES_LIST;
                self.put(STATUS, &status.to_le_bytes());
            }
        }
        self.last_capability = Some(offset);
        self.next_capability = offset + len;
        Ok(offset as u16)
    }

    /// Appends a PCIe extended capability with ID `id` and version `version`.
    ///
    /// `body` is everything after the four-byte header; `writable` as for
    /// [`PciConfiguration::add_capability`]. Returns the capability's offset.
    pub fn add_extended_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<u16, ConfigError> {
        if writable.len() > body.len() {
            return Err(ConfigError::MaskTooLong);
        }
        let len = (4 + body.len()).next_multiple_of(4);
        let offset = self.next_ext_capability;
        if offset + len > CONFIG_SPACE_SIZE {
            return Err(ConfigError::NoRoom(len));
        }
        let header = u32::from(id) | (u32::from(version & 0xf) << 16);
        self.put(offset, &header.to_le_bytes());
        self.put(offset + 4, body);
        self.set_writable((offset + 4) as u16, writable);
        if let Some(last) = self.last_ext_capability {
            let prev = self.read_u32(last as u16) | ((offset as u32) << 20);
            self.put(last, &prev.to_le_bytes());
        }
        self.last_ext_capability = Some(offset);
        self.next_ext_capability = offset + len;
        Ok(offset as u16)
    }

    /// The offset of the first standard capability with ID `id`.
    pub fn find_capability(&self, id: u8) -> Option<u16> {
        let mut offset = usize::from(self.regs[CAPABILITIES_POINTER]);
        // A list can hold at most 48 capabilities; bound the walk anyway.
        for _ in 0..48 {
            if offset < CAPABILITY_START {
                return None;
            }
            if self.regs[offset] == id {
                return Some(offset as u16);
            }
            offset = usize::from(self.regs[offset + 1]);
        }
        None
    }

    /// The offset of the first extended capability with ID `id`.
    pub fn find_extended_capability(&self, id: u16) -> Option<u16> {
        let mut offset = EXT_CAPABILITY_START;
        for _ in 0..(CONFIG_SPACE_SIZE - EXT_CAPABILITY_START) / 4 {
            let header = self.read_u32(offset as u16);
            if header == 0 {
                return None;
            }
            if header & 0xffff == u32::from(id) {
                return Some(offset as u16);
            }
            offset = (header >> 20) as usize;
            if offset < EXT_CAPABILITY_START {
                return None;
            }
        }
        None
    }

    /// Makes the bits set in `mask` at `offset` writable by the guest.
    pub fn set_writable(&mut self, offset: u16, mask: &[u8]) {
        if let Some(range) = Self::range(offset, mask.len()) {
            self.writable[range].copy_from_slice(mask);
        }
    }

    /// Makes the bits set in `mask` at `offset` write-1-to-clear.
    pub fn set_write_one_to_clear(&mut self, offset: u16, mask: &[u8]) {
        if let Some(range) = Self::range(offset, mask.len()) {
            self.write_one_to_clear[range].copy_from_slice(mask);
        }
    }

    /// Sets bytes at `offset` regardless of the guest write masks (device
    /// state the guest cannot write, such as status bits).
    pub fn set_bytes(&mut self, offset: u16, data: &[u8]) {
        self.put(offset.into(), data);
    }

    /// Sets a 16-bit register regardless of the guest write masks.
    pub fn set_u16(&mut self, offset: u16, value: u16) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Sets a 32-bit register regardless of the guest write masks.
    pub fn set_u32(&mut self, offset: u16, value: u32) {
        self.set_bytes(offset, &value.to_le_bytes());
    }

    /// Reads a 16-bit register (0 outside the space).
    pub fn read_u16(&self, offset: u16) -> u16 {
        let mut b = [0; 2];
        self.read_inner(offset, &mut b, 0);
        u16::from_le_bytes(b)
    }

    /// Reads a 32-bit register (0 outside the space).
    pub fn read_u32(&self, offset: u16) -> u32 {
        let mut b = [0; 4];
        self.read_inner(offset, &mut b, 0);
        u32::from_le_bytes(b)
    }

    /// A guest read: out-of-range bytes read as all ones.
    pub fn read(&self, offset: u16, data: &mut [u8]) {
        self.read_inner(offset, data, 0xff);
    }

    fn read_inner(&self, offset: u16, data: &mut [u8], fill: u8) {
        match Self::range(offset, data.len()) {
            Some(range) => data.copy_from_slice(&self.regs[range]),
            None => data.fill(fill),
        }
    }

    /// A guest write: only writable bits change, write-1-to-clear bits
    /// clear where `data` has ones, and out-of-range writes are dropped.
    pub fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(range) = Self::range(offset, data.len()) else {
            return;
        };
        for (i, &value) in range.zip(data) {
            let wmask = self.writable[i];
            let w1c = self.write_one_to_clear[i];
            self.regs[i] = ((self.regs[i] & !wmask) | (value & wmask)) & !(value & w1c);
        }
    }

    fn put(&mut self, offset: usize, data: &[u8]) {
        if let Some(range) = Self::range(offset as u16, data.len()) {
            self.regs[range].copy_from_slice(data);
        }
    }

    fn range(offset: u16, len: usize) -> Option<std::ops::Range<usize>> {
        let start = usize::from(offset);
        let end = start.checked_add(len)?;
        (end <= CONFIG_SPACE_SIZE).then_some(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> PciHeader {
        PciHeader {
            vendor_id: 0x8086,
            device_id: 0x0b25,
            revision_id: 1,
            class_code: 0x08_80_00,
            subsystem_vendor_id: 0x8086,
            subsystem_id: 0x2010,
        }
    }

    #[test]
    fn identity_is_read_only() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.write(0, &[0xff; 4]);
        assert_eq!(cfg.read_u32(0), 0x0b25_8086);
        assert_eq!(cfg.read_u32(0x08), 0x0880_0001);
        assert_eq!(cfg.read_u32(0x2c), 0x2010_8086);
    }

    #[test]
    fn bar_sizing_and_assignment_64bit() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.add_bar(
            0,
            0x4000,
            BarKind::Memory64 {
                prefetchable: false,
            },
        )
        .unwrap();
        cfg.write(0x10, &u32::MAX.to_le_bytes());
        cfg.write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(cfg.read_u32(0x10), 0xffff_c004);
        assert_eq!(cfg.read_u32(0x14), 0xffff_ffff);
        cfg.write(0x10, &0xfe00_0000u32.to_le_bytes());
        cfg.write(0x14, &1u32.to_le_bytes());
        assert_eq!(cfg.bar_address(0), 0x1_fe00_0000);
        assert!(cfg.mapped_bars().is_empty(), "memory decode is off");
        cfg.write(0x04, &command::MEMORY_SPACE.to_le_bytes());
        assert_eq!(
            cfg.mapped_bars(),
            vec![MappedBar {
                index: 0,
                base: 0x1_fe00_0000,
                size: 0x4000
            }]
        );
    }

    #[test]
    fn bar_errors() {
        let mut cfg = PciConfiguration::new(&header());
        assert_eq!(
            cfg.add_bar(
                5,
                0x1000,
                BarKind::Memory64 {
                    prefetchable: false
                }
            ),
            Err(ConfigError::InvalidBarIndex(5))
        );
        assert_eq!(
            cfg.add_bar(
                0,
                0x1800,
                BarKind::Memory32 {
                    prefetchable: false
                }
            ),
            Err(ConfigError::InvalidBarSize(0x1800))
        );
        cfg.add_bar(0, 0x1000, BarKind::Memory64 { prefetchable: true })
            .unwrap();
        assert_eq!(
            cfg.add_bar(
                1,
                0x1000,
                BarKind::Memory32 {
                    prefetchable: false
                }
            ),
            Err(ConfigError::BarInUse(1))
        );
        assert_eq!(
            cfg.set_bar_address(0, 0x1800),
            Err(ConfigError::InvalidBarAddress {
                index: 0,
                addr: 0x1800
            })
        );
        assert_eq!(
            cfg.set_bar_address(2, 0x1000),
            Err(ConfigError::InvalidBarIndex(2))
        );
    }

    #[test]
    fn capability_lists() {
        let mut cfg = PciConfiguration::new(&header());
        let a = cfg.add_capability(0x10, &[1, 2, 3, 4, 5, 6], &[]).unwrap();
        let b = cfg.add_capability(0x11, &[0; 10], &[0, 0xc0]).unwrap();
        assert_eq!((a, b), (0x40, 0x48));
        assert_eq!(
            cfg.read_u16(0x06) & status::CAPABILITIES_LIST,
            status::CAPABILITIES_LIST
        );
        assert_eq!(cfg.find_capability(0x11), Some(0x48));
        assert_eq!(cfg.find_capability(0x05), None);
        cfg.write(0x4a, &[0xff, 0xff]);
        assert_eq!(cfg.read_u16(0x4a), 0xc000);

        let x = cfg.add_extended_capability(0x1b, 1, &[0; 4], &[]).unwrap();
        let y = cfg.add_extended_capability(0x0f, 1, &[0; 4], &[]).unwrap();
        assert_eq!((x, y), (0x100, 0x108));
        assert_eq!(cfg.read_u32(0x100), 0x1081_001b);
        assert_eq!(cfg.find_extended_capability(0x0f), Some(0x108));
        assert_eq!(cfg.find_extended_capability(0x13), None);
    }

    #[test]
    fn status_errors_are_write_one_to_clear() {
        let mut cfg = PciConfiguration::new(&header());
        cfg.set_u16(0x06, 0x8000 | status::CAPABILITIES_LIST);
        cfg.write(0x06, &0x8010u16.to_le_bytes());
        assert_eq!(cfg.read_u16(0x06), status::CAPABILITIES_LIST);
    }

    #[test]
    fn out_of_range_access_is_harmless() {
        let mut cfg = PciConfiguration::new(&header());
        let mut data = [0u8; 4];
        cfg.read(4094, &mut data);
        assert_eq!(data, [0xff; 4]);
        cfg.write(4094, &[1, 2, 3, 4]);
        assert_eq!(cfg.read_u16(4094), 0);
    }
}
