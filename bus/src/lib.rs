//! The MMIO and port-I/O buses: address ranges mapped to bus devices, and
//! the interface those devices implement.
//!
//! - [`BusDevice`]: a device on a bus: reads, writes and the 64-byte atomic
//!   stores of MOVDIR64B, ENQCMD and ENQCMDS ([`StoreKind`], answered with a
//!   [`StoreReply`]).
//! - [`Bus`]: non-overlapping address ranges, each served by one device.
//!
//! The device crates (`vdsa`, `viommu`, `pci`'s functions behind the root
//! complex) implement [`BusDevice`] without KVM; the `vmm` crate owns the
//! buses and dispatches the vCPUs' exits to them.

#![forbid(unsafe_code)]

mod device;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

use thiserror::Error;

pub use device::{BusDevice, StoreKind, StoreReply};

/// A device shared between the bus and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors of bus registration.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps a registered one, or is empty.
    #[error("bus range {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// Start of the rejected range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A bus: non-overlapping ranges, each served by one device.
#[derive(Default)]
pub struct Bus {
    ranges: RwLock<BTreeMap<u64, Entry>>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Maps `len` bytes at `base` to `device`.
    pub fn insert(&self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::Overlap { base, len })?;
        let before = ranges.range(..end).next_back();
        if before.is_some_and(|(&b, e)| b + e.len > base) {
            return Err(BusError::Overlap { base, len });
        }
        ranges.insert(base, Entry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64) -> Option<(u64, SharedDevice)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        let (&base, entry) = ranges.range(..=addr).next_back()?;
        (addr - base < entry.len).then(|| (base, entry.device.clone()))
    }

    /// Reads from the device at `addr`; false if nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                lock(&dev).read(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false if nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((base, dev)) => {
                lock(&dev).write(base, addr - base, data);
                true
            }
            None => false,
        }
    }

    /// A 64-byte store to the device at `addr`; `None` if nothing is mapped.
    pub fn store64(&self, addr: u64, data: &[u8; 64], kind: StoreKind) -> Option<StoreReply> {
        let (base, dev) = self.resolve(addr)?;
        let reply = lock(&dev).store64(base, addr - base, data, kind);
        Some(reply)
    }
}

fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<u8>);
    impl BusDevice for Echo {
        fn read(&mut self, _: u64, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, _: u64, _: u64, data: &[u8]) {
            self.0.extend_from_slice(data);
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let bus = Bus::new();
        bus.insert(0x1000, 0x100, Arc::new(Mutex::new(Echo(vec![]))))
            .unwrap();
        assert_eq!(
            bus.insert(0x10ff, 1, Arc::new(Mutex::new(Echo(vec![])))),
            Err(BusError::Overlap {
                base: 0x10ff,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(0xf80, 0x81, Arc::new(Mutex::new(Echo(vec![])))),
            Err(BusError::Overlap {
                base: 0xf80,
                len: 0x81
            })
        );
        bus.insert(0x1100, 0x100, Arc::new(Mutex::new(Echo(vec![]))))
            .unwrap();
        let mut b = [0u8; 2];
        assert!(bus.read(0x1010, &mut b));
        assert_eq!(b, [0x10, 0x10]);
        assert!(!bus.read(0x1200, &mut b));
        assert!(!bus.write(0xfff, &b));
        assert_eq!(
            bus.store64(0x1100, &[0; 64], StoreKind::Enqcmd),
            Some(StoreReply::Retry)
        );
        assert_eq!(
            bus.store64(0x1100, &[0; 64], StoreKind::Movdir64b),
            Some(StoreReply::Accepted)
        );
    }
}
