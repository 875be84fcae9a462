//! PCI and PCI Express: the interfaces between the VMM's PCIe root complex
//! and its device models.
//!
//! The device crates (`vdsa`, `viommu`) implement these traits; the `vmm`
//! crate, the only one that talks to KVM, owns the root complex and drives
//! functions through it. Keeping the interfaces here lets the device models
//! build and test without KVM. (Devices on the plain MMIO and port-I/O buses
//! implement the `bus` crate's `BusDevice`.)
//!
//! - [`PciAddress`]: a function's bus/device/function, and its requester ID.
//! - [`header`]: the type-0 header's register offsets and bits.
//! - [`PciDevice`]: a PCI(e) function: 4 KiB configuration space and BARs.
//! - [`PciConfiguration`]: a configuration-space model with BARs, capability
//!   and extended-capability lists and write masks.
//! - [`MsixConfig`]: the MSI-X capability, vector table and pending-bit array.
//! - [`MsiSink`]: where a device sends its message-signalled interrupts.

#![forbid(unsafe_code)]

mod address;
mod configuration;
mod device;
pub mod header;
mod msi;
mod msix;
mod pcie;

// Until every user imports them from `bus` (they are not PCI).
pub use address::{PciAddress, DEVICES_PER_BUS, FUNCTIONS_PER_DEVICE};
pub use bus::{BusDevice, StoreKind, StoreReply};
pub use configuration::{
    BarKind, ConfigError, MappedBar, PciConfiguration, PciHeader, BAR_COUNT, CONFIG_SPACE_SIZE,
    LEGACY_CONFIG_SPACE_SIZE,
};
pub use device::PciDevice;
pub use msi::{MsiMessage, MsiRecorder, MsiSink};
pub use msix::{MsixConfig, MSIX_PBA_ENTRY_SIZE, MSIX_TABLE_ENTRY_SIZE};
pub use pcie::{cap_id, ext_cap_id, PcieCapability, PcieDeviceType};
