//! The virtio-pci transport (virtio 1.2, 4.1): a modern, non-transitional
//! PCI function exposing one [`VirtioDevice`].
//!
//! Identity: vendor 0x1AF4, device 0x1040 + device type, revision 1,
//! subsystem 0x1AF4:0x1100. BAR0 (64-bit memory) holds the common
//! configuration, ISR status, device configuration, notification region,
//! MSI-X table and PBA at the offsets of [`layout`]; a VIRTIO_PCI_CAP_PCI_CFG
//! capability gives configuration-space access to them too. Interrupts are MSI-X
//! only (one vector per queue plus one for configuration changes); INTx is
//! not offered.

use std::sync::Arc;

use pci::{
    BarKind, ConfigError, MappedBar, MsiSink, MsixConfig, PciConfiguration, PciDevice, PciHeader,
};
use thiserror::Error;
use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::capabilities::{
    add_virtio_capabilities, layout, notify_region, PciCfgWindow, VIRTIO_BAR,
};
use super::common_config::{CommonConfig, CommonWrite};
use super::isr::{IsrStatus, ISR_CONFIG, ISR_QUEUE};
use super::notify::notified_queue;
use super::{device_id, feature, status, DeviceError, VirtioDevice, NO_VECTOR};

/// Red Hat's virtio vendor ID.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem ID of modern devices (at least 0x40, as the spec asks).
const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x1100;
/// Revision 1: a modern-only device.
const VIRTIO_PCI_REVISION: u8 = 1;
/// Class: communication controller (0x07), other (0x80).
const CLASS_COMMUNICATION_OTHER: u32 = 0x07_80_00;
/// Class: unassigned (0xFF).
const CLASS_OTHER: u32 = 0xff_00_00;

/// Errors building the transport.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The configuration space could not be laid out.
    #[error("virtio-pci configuration space: {0}")]
    Config(#[from] ConfigError),
    /// The notification EventFd could not be created.
    #[error("virtio-pci notification eventfd: {0}")]
    EventFd(#[from] std::io::Error),
}

/// A virtio device on the PCI transport.
pub struct VirtioPciDevice {
    config: PciConfiguration,
    window: PciCfgWindow,
    msix: MsixConfig,
    common: CommonConfig,
    isr: IsrStatus,
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    msi: Arc<dyn MsiSink>,
    kick: EventFd,
}

impl VirtioPciDevice {
    /// Wraps `device`; its DMA goes to `memory`, its interrupts to `msi`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        msi: Arc<dyn MsiSink>,
    ) -> Result<Self, TransportError> {
        let device_type = device.device_type();
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + device_type,
            revision_id: VIRTIO_PCI_REVISION,
            class_code: match device_type {
                device_id::CONSOLE => CLASS_COMMUNICATION_OTHER,
                _ => CLASS_OTHER,
            },
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
        });
        config.add_bar(
            usize::from(VIRTIO_BAR),
            layout::BAR_SIZE,
            BarKind::Memory64 {
                prefetchable: false,
            },
        )?;
        let queues = device.queue_max_sizes().len();
        add_virtio_capabilities(&mut config, queues)?;
        let window = PciCfgWindow::add_to(&mut config)?;
        let mut msix = MsixConfig::new(queues as u16 + 1);
        msix.add_capability(
            &mut config,
            VIRTIO_BAR,
            layout::MSIX_TABLE_OFFSET as u32,
            VIRTIO_BAR,
            layout::MSIX_PBA_OFFSET as u32,
        )?;
        let common = CommonConfig::new(
            device.features() | feature::VERSION_1,
            device.queue_max_sizes(),
        );
        Ok(Self {
            config,
            window,
            msix,
            common,
            isr: IsrStatus::default(),
            device,
            memory,
            msi,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Signalled when the driver notifies a queue; whoever waits on it
    /// calls [`VirtioPciDevice::process`].
    pub fn kick_event(&self) -> &EventFd {
        &self.kick
    }

    /// Signalled when the device has host-side input waiting.
    pub fn input_event(&self) -> Option<&EventFd> {
        self.device.input_event()
    }

    /// device_status as the driver would read it.
    pub fn status(&self) -> u8 {
        self.common.status
    }

    /// Whether the device may use its queues: the driver is ready, nothing
    /// is broken, and bus mastering (DMA) is enabled.
    fn active(&self) -> bool {
        let s = self.common.status;
        s & status::DRIVER_OK != 0
            && s & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0
            && self.config.bus_master_enabled()
    }

    /// Processes the queues once: called on every notification and input
    /// event. Does nothing until DRIVER_OK, nothing after NEEDS_RESET, and
    /// nothing while bus mastering is off.
    pub fn process(&mut self) {
        if !self.active() {
            return;
        }
        match self.device.process(&mut self.common.queues, &self.memory) {
            Ok(used) => {
                for queue in 0..self.common.queues.len() {
                    if used & (1 << queue) != 0 {
                        self.signal_queue(queue);
                    }
                }
            }
            Err(e) => self.needs_reset(e),
        }
    }

    /// An external backend put buffers in `queue`'s used ring and asked for
    /// an interrupt (it applies the driver's suppression itself).
    pub fn used_by_backend(&mut self, queue: usize) {
        if !self.active() || queue >= self.common.queues.len() {
            return;
        }
        self.isr.raise(ISR_QUEUE);
        let vector = self.common.queue_vectors[queue];
        self.trigger(vector);
    }

    /// The EventFds an external backend signals, one per queue (see
    /// [`VirtioDevice::call_events`]).
    pub fn call_events(&self) -> &[EventFd] {
        self.device.call_events()
    }

    fn signal_queue(&mut self, index: usize) {
        let Some(queue) = self.common.queues.get_mut(index) else {
            return;
        };
        match queue.needs_notification(&self.memory) {
            Ok(true) => {
                self.isr.raise(ISR_QUEUE);
                let vector = self.common.queue_vectors[index];
                self.trigger(vector);
            }
            Ok(false) => {}
            Err(e) => self.needs_reset(DeviceError::queue(index, e)),
        }
    }

    fn trigger(&mut self, vector: u16) {
        if vector == NO_VECTOR {
            log::debug!("virtio: interrupt with no MSI-X vector mapped dropped (no INTx)");
            return;
        }
        self.msix.trigger(vector, &*self.msi);
    }

    /// Enters the error state: DEVICE_NEEDS_RESET and a configuration
    /// change interrupt (virtio 1.2, 2.1.2).
    fn needs_reset(&mut self, error: DeviceError) {
        log::warn!(
            "virtio device type {}: {error}; the device needs a reset",
            self.device.device_type()
        );
        self.common.status |= status::DEVICE_NEEDS_RESET;
        self.isr.raise(ISR_CONFIG);
        self.trigger(self.common.msix_config);
    }

    fn reset(&mut self) {
        self.common.reset();
        self.isr.reset();
        self.device.reset();
    }

    /// The driver's write to device_status.
    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.common.status;
        // The driver cannot set or clear DEVICE_NEEDS_RESET.
        let mut new = (value & !status::DEVICE_NEEDS_RESET) | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let features = self.common.driver_features;
            let unknown = features & !self.common.device_features;
            if unknown != 0 || features & feature::VERSION_1 == 0 {
                log::warn!(
                    "virtio: driver features {features:#x} refused (unknown bits {unknown:#x}, or no VERSION_1)"
                );
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::FEATURES_OK == 0 {
            // DRIVER_OK before a successful negotiation is a driver bug.
            new &= !status::DRIVER_OK;
        }
        self.common.status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            let bad = (0..self.common.queues.len()).find(|&i| {
                let q = &self.common.queues[i];
                q.ready() && !q.is_valid(&self.memory)
            });
            if let Some(queue) = bad {
                self.needs_reset(DeviceError::Queue {
                    queue,
                    message: "rings outside guest RAM or misaligned".into(),
                });
                return;
            }
            if let Err(e) = self.device.activate(
                self.common.driver_features,
                &self.common.queues,
                &self.memory,
            ) {
                self.needs_reset(e);
                return;
            }
            log::info!(
                "virtio device type {}: driver ready, features {:#x}",
                self.device.device_type(),
                self.common.driver_features
            );
            self.process();
        }
    }

    fn region_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let queues = self.common.queues.len();
        if let Some(o) = layout::COMMON.contains(offset, data.len()) {
            self.common.read(o, data);
        } else if layout::ISR.contains(offset, data.len()).is_some() {
            self.isr.read_and_clear(data);
        } else if let Some(o) = layout::DEVICE.contains(offset, data.len()) {
            self.device.read_config(o, data);
        } else if notify_region(queues).contains(offset, data.len()).is_some() {
            // Doorbells read as zero.
        } else if let Some(o) = offset.checked_sub(layout::MSIX_TABLE_OFFSET) {
            if o < self.msix.table_size() {
                self.msix.table_read(o, data);
            } else if let Some(o) = offset.checked_sub(layout::MSIX_PBA_OFFSET) {
                if o < self.msix.pba_size() {
                    self.msix.pba_read(o, data);
                }
            }
        }
    }

    fn region_write(&mut self, offset: u64, data: &[u8]) {
        let queues = self.common.queues.len();
        if let Some(o) = layout::COMMON.contains(offset, data.len()) {
            let vectors = self.msix.vectors();
            if let CommonWrite::Status(value) = self.common.write(o, data, vectors) {
                self.write_status(value);
            }
        } else if let Some(o) = layout::DEVICE.contains(offset, data.len()) {
            self.device.write_config(o, data);
        } else if let Some(o) = notify_region(queues).contains(offset, data.len()) {
            if let Some(queue) = notified_queue(o, data.len(), queues) {
                if self.active() && self.device.notify(queue) {
                    return;
                }
                if let Err(e) = self.kick.write(1) {
                    log::warn!("virtio: queue notification lost: {e}");
                }
            }
        } else if let Some(o) = offset.checked_sub(layout::MSIX_TABLE_OFFSET) {
            if o < self.msix.table_size() {
                self.msix.table_write(o, data, &*self.msi);
            }
        }
        // The ISR and the PBA are read-only.
    }
}

impl PciDevice for VirtioPciDevice {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        if self.window.hits_data(offset, data.len()) {
            // Fill pci_cfg_data from the BAR first.
            if let Some(access) = self.window.access(&self.config) {
                let mut value = [0u8; 4];
                self.bar_read(access.bar, access.offset, &mut value[..access.len]);
                self.config.set_bytes(self.window.data_offset(), &value);
            }
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
        self.msix.update(&self.config, &*self.msi);
        if self.window.hits_data(offset, data.len()) {
            if let Some(access) = self.window.access(&self.config) {
                let value = self
                    .config
                    .read_u32(self.window.data_offset())
                    .to_le_bytes();
                self.bar_write(access.bar, access.offset, &value[..access.len]);
            }
        }
    }

    fn mapped_bars(&self) -> Vec<MappedBar> {
        self.config.mapped_bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        if bar == VIRTIO_BAR {
            self.region_read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar == VIRTIO_BAR {
            self.region_write(offset, data);
        }
    }
}
