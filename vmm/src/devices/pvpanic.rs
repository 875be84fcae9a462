//! The pvpanic PCI device (QEMU's `pvpanic-pci`, 1B36:0011): the guest
//! kernel's pvpanic driver writes an event byte to BAR0 when it panics, so
//! the VMM can end the run with a distinct status instead of seeing the
//! reset that follows.
//!
//! BAR0 (16 bytes of memory) byte 0: reads give the supported events,
//! writes report events.

use pci::{BarKind, ConfigError, MappedBar, PciConfiguration, PciDevice, PciHeader};

/// Red Hat's QEMU vendor ID.
pub const PVPANIC_VENDOR_ID: u16 = 0x1b36;
/// The pvpanic PCI device ID.
pub const PVPANIC_DEVICE_ID: u16 = 0x0011;
/// Class: system peripheral (0x08), other (0x80).
const CLASS_SYSTEM_OTHER: u32 = 0x08_80_00;
/// BAR0 size (the minimum a memory BAR can have).
const BAR_SIZE: u64 = 16;
/// Event: the guest panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event: a crash kernel is loaded (kdump will run).
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
/// The events this device reports.
const SUPPORTED_EVENTS: u8 = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;

/// The pvpanic function; `on_panic` runs when the guest reports a panic.
pub struct PvPanic {
    config: PciConfiguration,
    on_panic: Box<dyn Fn() + Send>,
}

impl PvPanic {
    /// A pvpanic device calling `on_panic` on the guest's panic event.
    pub fn new(on_panic: Box<dyn Fn() + Send>) -> Result<Self, ConfigError> {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: PVPANIC_VENDOR_ID,
            device_id: PVPANIC_DEVICE_ID,
            revision_id: 1,
            class_code: CLASS_SYSTEM_OTHER,
            subsystem_vendor_id: PVPANIC_VENDOR_ID,
            subsystem_id: PVPANIC_DEVICE_ID,
        });
        config.add_bar(
            0,
            BAR_SIZE,
            BarKind::Memory32 {
                prefetchable: false,
            },
        )?;
        Ok(Self { config, on_panic })
    }
}

impl PciDevice for PvPanic {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn mapped_bars(&self) -> Vec<MappedBar> {
        self.config.mapped_bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar == 0 && offset == 0 {
            if let Some(first) = data.first_mut() {
                *first = SUPPORTED_EVENTS;
            }
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let Some(&events) = data.first().filter(|_| bar == 0 && offset == 0) else {
            return;
        };
        if events & PVPANIC_CRASH_LOADED != 0 {
            log::info!("pvpanic: the guest loaded a crash kernel");
        }
        if events & PVPANIC_PANICKED != 0 {
            log::warn!("pvpanic: the guest kernel panicked");
            (self.on_panic)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    fn device() -> (PvPanic, Arc<AtomicU32>) {
        let count = Arc::new(AtomicU32::new(0));
        let c = count.clone();
        let dev = PvPanic::new(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }))
        .unwrap();
        (dev, count)
    }

    #[test]
    fn identity_and_bar() {
        let (mut dev, _) = device();
        let mut id = [0u8; 4];
        dev.config_read(0, &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0011_1b36);
        let mut class = [0u8; 4];
        dev.config_read(8, &mut class);
        assert_eq!(u32::from_le_bytes(class), 0x0880_0001);
        dev.config_write(0x10, &u32::MAX.to_le_bytes());
        let mut bar = [0u8; 4];
        dev.config_read(0x10, &mut bar);
        assert_eq!(u32::from_le_bytes(bar), 0xffff_fff0, "16-byte 32-bit BAR");
    }

    #[test]
    fn reports_supported_events() {
        let (mut dev, _) = device();
        let mut b = [0xaa];
        dev.bar_read(0, 0, &mut b);
        assert_eq!(b, [3]);
        let mut b = [0xaa];
        dev.bar_read(0, 1, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn panic_event_calls_back_once_per_write() {
        let (mut dev, count) = device();
        dev.bar_write(0, 0, &[PVPANIC_CRASH_LOADED]);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        dev.bar_write(0, 4, &[PVPANIC_PANICKED]);
        assert_eq!(count.load(Ordering::SeqCst), 0, "not the event register");
        dev.bar_write(0, 0, &[PVPANIC_PANICKED]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }
}
