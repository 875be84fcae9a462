//! The common configuration structure (`struct virtio_pci_common_cfg`,
//! virtio 1.2, 4.1.4.3): feature negotiation, device status, MSI-X vector
//! mapping and the per-queue registers behind `queue_select`.

use virtio_queue::{Queue, QueueT};

use super::{status, NO_VECTOR};

// Register offsets (the tests drive the device through them too).
pub(super) const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub(super) const DEVICE_FEATURE: u64 = 0x04;
pub(super) const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub(super) const DRIVER_FEATURE: u64 = 0x0c;
pub(super) const CONFIG_MSIX_VECTOR: u64 = 0x10;
pub(super) const NUM_QUEUES: u64 = 0x12;
pub(super) const DEVICE_STATUS: u64 = 0x14;
pub(super) const CONFIG_GENERATION: u64 = 0x15;
pub(super) const QUEUE_SELECT: u64 = 0x16;
pub(super) const QUEUE_SIZE: u64 = 0x18;
pub(super) const QUEUE_MSIX_VECTOR: u64 = 0x1a;
pub(super) const QUEUE_ENABLE: u64 = 0x1c;
pub(super) const QUEUE_NOTIFY_OFF: u64 = 0x1e;
pub(super) const QUEUE_DESC: u64 = 0x20;
pub(super) const QUEUE_DESC_HI: u64 = 0x24;
pub(super) const QUEUE_DRIVER: u64 = 0x28;
pub(super) const QUEUE_DRIVER_HI: u64 = 0x2c;
pub(super) const QUEUE_DEVICE: u64 = 0x30;
pub(super) const QUEUE_DEVICE_HI: u64 = 0x34;

/// Which 64-bit queue address a register names.
#[derive(Clone, Copy)]
enum QueueAddress {
    Desc,
    Driver,
    Device,
}

/// What a guest write asks of the transport beyond updating registers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommonWrite {
    /// Nothing more.
    Done,
    /// The driver wrote this value to device_status; the transport decides
    /// what the new status is (reset, FEATURES_OK check, DRIVER_OK).
    Status(u8),
}

/// The state behind the common configuration structure.
pub struct CommonConfig {
    /// Features the device offers.
    pub device_features: u64,
    /// Features the driver accepted so far.
    pub driver_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    /// MSI-X vector for configuration changes.
    pub msix_config: u16,
    /// device_status.
    pub status: u8,
    config_generation: u8,
    queue_select: u16,
    /// The virtqueues.
    pub queues: Vec<Queue>,
    /// MSI-X vector of each queue.
    pub queue_vectors: Vec<u16>,
}

impl CommonConfig {
    /// State for a device offering `device_features` with queues of the
    /// given maximum sizes (powers of two, at most 32768).
    pub fn new(device_features: u64, queue_max_sizes: &[u16]) -> Self {
        let queues = queue_max_sizes
            .iter()
            .map(|&max| Queue::new(max).unwrap_or_default())
            .collect();
        Self {
            device_features,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            msix_config: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues,
            queue_vectors: vec![NO_VECTOR; queue_max_sizes.len()],
        }
    }

    /// Back to the state after power-on (device reset, virtio 1.2, 2.4).
    pub fn reset(&mut self) {
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.msix_config = NO_VECTOR;
        self.status = 0;
        self.queue_select = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_vectors.fill(NO_VECTOR);
    }

    /// Whether the driver finished feature negotiation.
    pub fn features_ok(&self) -> bool {
        self.status & status::FEATURES_OK != 0
    }

    fn selected(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn feature_page(features: u64, select: u32) -> u32 {
        match select {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        }
    }

    fn queue_address(&self, which: QueueAddress) -> u64 {
        self.selected().map_or(0, |q| match which {
            QueueAddress::Desc => q.desc_table(),
            QueueAddress::Driver => q.avail_ring(),
            QueueAddress::Device => q.used_ring(),
        })
    }

    /// A guest read of `data.len()` bytes at `offset`; registers are read
    /// with their own width (64-bit addresses also as two 32-bit halves),
    /// anything else reads as zero.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        let queue = self.selected();
        let value: u64 = match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select.into(),
            (DEVICE_FEATURE, 4) => {
                Self::feature_page(self.device_features, self.device_feature_select).into()
            }
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select.into(),
            (DRIVER_FEATURE, 4) => {
                Self::feature_page(self.driver_features, self.driver_feature_select).into()
            }
            (CONFIG_MSIX_VECTOR, 2) => self.msix_config.into(),
            (NUM_QUEUES, 2) => self.queues.len() as u64,
            (DEVICE_STATUS, 1) => self.status.into(),
            (CONFIG_GENERATION, 1) => self.config_generation.into(),
            (QUEUE_SELECT, 2) => self.queue_select.into(),
            (QUEUE_SIZE, 2) => queue.map_or(0, |q| q.size().into()),
            (QUEUE_MSIX_VECTOR, 2) => self
                .queue_vectors
                .get(usize::from(self.queue_select))
                .map_or(NO_VECTOR, |&v| v)
                .into(),
            (QUEUE_ENABLE, 2) => queue.map_or(0, |q| q.ready().into()),
            (QUEUE_NOTIFY_OFF, 2) => queue.map_or(0, |_| self.queue_select.into()),
            (o @ (QUEUE_DESC | QUEUE_DRIVER | QUEUE_DEVICE), 8) => {
                self.queue_address(Self::address_register(o))
            }
            (o, 4) if (QUEUE_DESC..QUEUE_DEVICE + 8).contains(&o) => {
                let full = self.queue_address(Self::address_register(o & !7));
                if o % 8 == 0 {
                    full & 0xffff_ffff
                } else {
                    full >> 32
                }
            }
            _ => 0,
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(8);
        data[..n].copy_from_slice(&bytes[..n]);
        data[n..].fill(0);
    }

    fn address_register(offset: u64) -> QueueAddress {
        match offset {
            QUEUE_DESC => QueueAddress::Desc,
            QUEUE_DRIVER => QueueAddress::Driver,
            _ => QueueAddress::Device,
        }
    }

    /// A guest write. `msix_vectors` is the number of MSI-X vectors: a
    /// vector beyond it is not mapped and reads back as NO_VECTOR.
    pub fn write(&mut self, offset: u64, data: &[u8], msix_vectors: u16) -> CommonWrite {
        let mut bytes = [0u8; 8];
        let n = data.len().min(8);
        bytes[..n].copy_from_slice(&data[..n]);
        let value = u64::from_le_bytes(bytes);
        let vector = |v: u64| {
            let v = v as u16;
            if v < msix_vectors {
                v
            } else {
                NO_VECTOR
            }
        };
        let select = usize::from(self.queue_select);
        match (offset, data.len()) {
            (DEVICE_FEATURE_SELECT, 4) => self.device_feature_select = value as u32,
            (DRIVER_FEATURE_SELECT, 4) => self.driver_feature_select = value as u32,
            (DRIVER_FEATURE, 4) if !self.features_ok() => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return CommonWrite::Done,
                };
                self.driver_features =
                    (self.driver_features & !(0xffff_ffff << shift)) | (value << shift);
            }
            (CONFIG_MSIX_VECTOR, 2) => self.msix_config = vector(value),
            (DEVICE_STATUS, 1) => return CommonWrite::Status(value as u8),
            (QUEUE_SELECT, 2) => self.queue_select = value as u16,
            (QUEUE_MSIX_VECTOR, 2) => {
                if let Some(v) = self.queue_vectors.get_mut(select) {
                    *v = vector(value);
                }
            }
            (o, len) => {
                // The remaining registers belong to the selected queue and
                // may not change once it is enabled (virtio 1.2, 4.1.4.3.2).
                let Some(q) = self.queues.get_mut(select).filter(|q| !q.ready()) else {
                    return CommonWrite::Done;
                };
                let (lo, hi) = (Some(value as u32), Some((value >> 32) as u32));
                match (o, len) {
                    (QUEUE_SIZE, 2) => q.set_size(value as u16),
                    (QUEUE_ENABLE, 2) if value == 1 => q.set_ready(true),
                    (QUEUE_DESC, 8) => q.set_desc_table_address(lo, hi),
                    (QUEUE_DESC, 4) => q.set_desc_table_address(lo, None),
                    (QUEUE_DESC_HI, 4) => q.set_desc_table_address(None, lo),
                    (QUEUE_DRIVER, 8) => q.set_avail_ring_address(lo, hi),
                    (QUEUE_DRIVER, 4) => q.set_avail_ring_address(lo, None),
                    (QUEUE_DRIVER_HI, 4) => q.set_avail_ring_address(None, lo),
                    (QUEUE_DEVICE, 8) => q.set_used_ring_address(lo, hi),
                    (QUEUE_DEVICE, 4) => q.set_used_ring_address(lo, None),
                    (QUEUE_DEVICE_HI, 4) => q.set_used_ring_address(None, lo),
                    _ => log::debug!("virtio: write of {len} bytes at common+{o:#x} ignored"),
                }
            }
        }
        CommonWrite::Done
    }
}
