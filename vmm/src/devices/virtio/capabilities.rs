//! The virtio-pci vendor-specific capabilities (virtio 1.2, 4.1.4) and where
//! the structures they point at live in BAR0.

use pci::{ConfigError, PciConfiguration};

/// PCI capability ID of vendor-specific capabilities.
pub const CAP_ID_VENDOR_SPECIFIC: u8 = 0x09;

/// cfg_type values of `struct virtio_pci_cap`.
pub mod cfg_type {
    /// Common configuration.
    pub const COMMON: u8 = 1;
    /// Notifications.
    pub const NOTIFY: u8 = 2;
    /// ISR status.
    pub const ISR: u8 = 3;
    /// Device-specific configuration.
    pub const DEVICE: u8 = 4;
    /// A window in configuration space onto the BARs.
    pub const PCI_CFG: u8 = 5;
}

/// The BAR holding every virtio structure and the MSI-X table.
pub const VIRTIO_BAR: u8 = 0;

/// A structure in BAR0: its offset and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    /// Offset in the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

impl BarRegion {
    /// The offset of `[offset, offset + len)` inside this region.
    pub fn contains(&self, offset: u64, len: usize) -> Option<u64> {
        let inner = offset.checked_sub(self.offset)?;
        (inner.checked_add(len as u64)? <= self.len).then_some(inner)
    }
}

/// BAR0 layout: each structure in its own 4 KiB page.
pub mod layout {
    use super::BarRegion;

    /// `struct virtio_pci_common_cfg` (without the 1.2 notification-data and
    /// queue-reset fields: those features are not offered).
    pub const COMMON: BarRegion = BarRegion {
        offset: 0x0000,
        len: 0x38,
    };
    /// The ISR status byte.
    pub const ISR: BarRegion = BarRegion {
        offset: 0x1000,
        len: 4,
    };
    /// Device-specific configuration.
    pub const DEVICE: BarRegion = BarRegion {
        offset: 0x2000,
        len: 0x1000,
    };
    /// Start of the notification region (its length depends on the number
    /// of queues).
    pub const NOTIFY_OFFSET: u64 = 0x3000;
    /// MSI-X vector table.
    pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
    /// MSI-X pending-bit array.
    pub const MSIX_PBA_OFFSET: u64 = 0x5000;
    /// Size of BAR0.
    pub const BAR_SIZE: u64 = 0x8000;
}

/// Bytes between the notify addresses of consecutive queues
/// (`notify_off_multiplier`); queue N's `queue_notify_off` is N.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;

/// `struct virtio_pci_cap` after the capability ID and next pointer.
#[derive(Clone, Copy, Debug)]
pub struct VirtioPciCap {
    /// Which structure.
    pub cfg_type: u8,
    /// Where it lives in BAR [`VIRTIO_BAR`].
    pub region: BarRegion,
}

impl VirtioPciCap {
    /// cap_len: the whole capability including ID and next pointer.
    const LEN: u8 = 16;
    /// cap_len of `struct virtio_pci_notify_cap` and of
    /// `struct virtio_pci_cfg_cap`.
    const LONG_LEN: u8 = 20;

    /// The capability body (cap_len onwards).
    fn body(&self) -> Vec<u8> {
        let notify = self.cfg_type == cfg_type::NOTIFY;
        let long = notify || self.cfg_type == cfg_type::PCI_CFG;
        let mut body = vec![
            if long { Self::LONG_LEN } else { Self::LEN },
            self.cfg_type,
            VIRTIO_BAR,
            0, // id: only one structure of each type
            0,
            0, // padding
        ];
        body.extend_from_slice(&(self.region.offset as u32).to_le_bytes());
        body.extend_from_slice(&(self.region.len as u32).to_le_bytes());
        if notify {
            body.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        } else if long {
            body.extend_from_slice(&[0; 4]); // pci_cfg_data
        }
        body
    }

    /// Appends this capability (read-only) to `config`.
    pub fn add_to(&self, config: &mut PciConfiguration) -> Result<u16, ConfigError> {
        config.add_capability(CAP_ID_VENDOR_SPECIFIC, &self.body(), &[])
    }
}

/// The notification region for `queues` queues.
pub fn notify_region(queues: usize) -> BarRegion {
    BarRegion {
        offset: layout::NOTIFY_OFFSET,
        len: (queues.max(1) as u64) * u64::from(NOTIFY_OFF_MULTIPLIER),
    }
}

/// The VIRTIO_PCI_CAP_PCI_CFG window (virtio 1.2, 4.1.4.9): the driver
/// sets bar, offset and length in the capability, then reads or writes
/// `pci_cfg_data` to access that BAR through configuration space.
#[derive(Clone, Copy, Debug)]
pub struct PciCfgWindow {
    cap: u16,
}

/// One access the window asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowAccess {
    /// The BAR.
    pub bar: u8,
    /// The offset in it.
    pub offset: u64,
    /// 1, 2 or 4 bytes.
    pub len: usize,
}

impl PciCfgWindow {
    const BAR: u16 = 4;
    const OFFSET: u16 = 8;
    const LENGTH: u16 = 12;
    /// Offset of pci_cfg_data in the capability.
    const DATA: u16 = 16;

    /// Appends the capability; bar, offset, length and data are writable.
    pub fn add_to(config: &mut PciConfiguration) -> Result<Self, ConfigError> {
        let cap = VirtioPciCap {
            cfg_type: cfg_type::PCI_CFG,
            region: BarRegion { offset: 0, len: 0 },
        };
        // Masks start at cap_len: bar, then offset, length and data.
        let mut writable = [0u8; 18];
        writable[2] = 0xff;
        writable[6..].fill(0xff);
        let cap = config.add_capability(CAP_ID_VENDOR_SPECIFIC, &cap.body(), &writable)?;
        Ok(Self { cap })
    }

    /// Whether a configuration access at `offset` of `len` bytes touches
    /// pci_cfg_data.
    pub fn hits_data(&self, offset: u16, len: usize) -> bool {
        let data = self.cap + Self::DATA;
        offset < data + 4 && offset + len as u16 > data
    }

    /// The access the window is programmed for, if it is a valid one: a
    /// length of 1, 2 or 4 and an offset aligned to it.
    pub fn access(&self, config: &PciConfiguration) -> Option<WindowAccess> {
        let bar = config.read_u32(self.cap + Self::BAR) as u8;
        let offset = config.read_u32(self.cap + Self::OFFSET);
        let len = config.read_u32(self.cap + Self::LENGTH);
        (matches!(len, 1 | 2 | 4) && offset % len == 0).then_some(WindowAccess {
            bar,
            offset: offset.into(),
            len: len as usize,
        })
    }

    /// Where pci_cfg_data lives in configuration space.
    pub fn data_offset(&self) -> u16 {
        self.cap + Self::DATA
    }
}

/// Adds the four capabilities (common, notify, ISR, device) to `config`.
pub fn add_virtio_capabilities(
    config: &mut PciConfiguration,
    queues: usize,
) -> Result<(), ConfigError> {
    for cap in [
        VirtioPciCap {
            cfg_type: cfg_type::COMMON,
            region: layout::COMMON,
        },
        VirtioPciCap {
            cfg_type: cfg_type::NOTIFY,
            region: notify_region(queues),
        },
        VirtioPciCap {
            cfg_type: cfg_type::ISR,
            region: layout::ISR,
        },
        VirtioPciCap {
            cfg_type: cfg_type::DEVICE,
            region: layout::DEVICE,
        },
    ] {
        cap.add_to(config)?;
    }
    Ok(())
}
