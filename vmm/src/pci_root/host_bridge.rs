//! The host bridge at 00:00.0.

use pci::{MappedBar, PciConfiguration, PciDevice, PciHeader};

/// Intel's vendor ID.
const VENDOR_ID_INTEL: u16 = 0x8086;
/// A plain Intel host-bridge device ID with no chipset-specific quirks in
/// Linux (not one of the MCH IDs whose MMCONFIG registers Linux probes).
const DEVICE_ID_HOST_BRIDGE: u16 = 0x0d57;
/// Class code: bridge device (0x06), host bridge (0x00), prog-if 0.
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

/// The host bridge: identity only, no BARs, no capabilities.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfiguration,
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl HostBridge {
    /// A host bridge with the fixed identity above.
    pub fn new() -> Self {
        Self {
            config: PciConfiguration::new(&PciHeader {
                vendor_id: VENDOR_ID_INTEL,
                device_id: DEVICE_ID_HOST_BRIDGE,
                revision_id: 0,
                class_code: CLASS_HOST_BRIDGE,
                subsystem_vendor_id: VENDOR_ID_INTEL,
                subsystem_id: DEVICE_ID_HOST_BRIDGE,
            }),
        }
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn mapped_bars(&self) -> Vec<MappedBar> {
        Vec::new()
    }

    fn bar_read(&mut self, _bar: u8, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}
}
