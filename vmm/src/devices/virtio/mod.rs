//! Virtio 1.x devices on the PCI transport.
//!
//! - [`transport`]: [`VirtioPciDevice`], a modern (virtio 1.x, non-transitional)
//!   virtio-pci function: one 64-bit memory BAR holding the common
//!   configuration ([`common_config`]), ISR status ([`isr`]), device-specific
//!   configuration, notification ([`notify`]) and MSI-X structures, located by
//!   the vendor-specific capabilities of [`capabilities`].
//! - [`console`]: the virtio-console device (port 0, no multiport).
//! - [`event_loop`]: the event-manager thread that processes queue
//!   notifications and host-side input.
//!
//! Queue notifications: a driver's write to the notify region (on a vCPU
//! thread, through the MMIO bus) signals an `EventFd` that the event-manager
//! thread waits on; that thread then processes the queues. KVM ioeventfds were
//! not used: the notify address moves whenever the guest reprograms BAR0, and
//! re-registering ioeventfds on BAR moves would tie the transport to KVM,
//! while the write-kicks-an-EventFd path keeps the model testable without KVM.
//! On this project's KVM every MMIO write exits to user space anyway.
//!
//! Guest mistakes never panic the VMM. Following the virtio specification
//! (2.1.2, "the device SHOULD set DEVICE_NEEDS_RESET when it enters an error
//! state that a reset is needed"), a queue the device cannot use (rings outside
//! guest RAM when the driver sets DRIVER_OK, an available index more than a
//! queue size ahead, a descriptor chain that loops or names a descriptor
//! outside the table, a buffer outside guest RAM) marks the device
//! NEEDS_RESET: it stops processing queues and raises a configuration-change
//! interrupt, until the driver resets it by writing 0 to device_status.

pub mod capabilities;
pub mod common_config;
pub mod console;
pub mod event_loop;
pub mod fs;
pub mod isr;
pub mod notify;
pub mod transport;

#[cfg(test)]
mod tests;

use thiserror::Error;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use console::{CaptureOutput, Console, ConsoleInput};
pub use event_loop::VirtioEventLoop;
pub use fs::VhostUserFs;
pub use transport::VirtioPciDevice;

/// Virtio device IDs (virtio 1.2, 5).
pub mod device_id {
    /// Console.
    pub const CONSOLE: u16 = 3;
    /// File system (virtio-fs).
    pub const FS: u16 = 26;
}

/// device_status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest OS has found the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest OS knows how to drive the device.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready to drive the device.
    pub const DRIVER_OK: u8 = 4;
    /// The driver has acknowledged the features it understands.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error from which only a reset recovers.
    pub const DEVICE_NEEDS_RESET: u8 = 64;
    /// Something went wrong in the guest; it gave up on the device.
    pub const FAILED: u8 = 128;
}

/// Feature bits common to all devices (virtio 1.2, 6).
pub mod feature {
    /// Compliance with virtio 1.x (the modern interface).
    pub const VERSION_1: u64 = 1 << 32;
    /// Indirect descriptors (VIRTIO_F_INDIRECT_DESC).
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event/avail_event notification suppression (VIRTIO_F_EVENT_IDX).
    pub const RING_EVENT_IDX: u64 = 1 << 29;
}

/// Descriptor flags of the split virtqueue (virtio 1.2, 2.7.5).
pub mod desc_flags {
    /// The buffer continues in the descriptor named by `next`.
    pub const NEXT: u16 = 1;
    /// The buffer is device-writable (otherwise device-readable).
    pub const WRITE: u16 = 2;
}

/// The vector value meaning "no MSI-X vector" (virtio 1.2, 4.1.4.3).
pub const NO_VECTOR: u16 = 0xffff;

/// Why a device stopped using its queues.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DeviceError {
    /// virtio-queue refused the queue's state (e.g. an available index more
    /// than a queue size ahead, rings outside guest RAM).
    #[error("queue {queue}: {message}")]
    Queue {
        /// The queue index.
        queue: usize,
        /// virtio-queue's description.
        message: String,
    },
    /// A descriptor chain ended with NEXT set: it loops, or it names a
    /// descriptor outside the table, or it has no descriptor at all.
    #[error(
        "queue {queue}: descriptor chain at head {head} is malformed (loop, or index out of range)"
    )]
    MalformedChain {
        /// The queue index.
        queue: usize,
        /// The chain's head descriptor index.
        head: u16,
    },
    /// The device's external backend refused to take the queues.
    #[error("{0}")]
    Backend(String),
    /// A buffer of the chain lies (partly) outside guest RAM.
    #[error("queue {queue}: descriptor chain at head {head} has a buffer at {addr:#x}+{len:#x} outside guest RAM")]
    BufferOutsideMemory {
        /// The queue index.
        queue: usize,
        /// The chain's head descriptor index.
        head: u16,
        /// The buffer address.
        addr: u64,
        /// The buffer length.
        len: u32,
    },
}

impl DeviceError {
    fn queue(queue: usize, e: virtio_queue::Error) -> Self {
        Self::Queue {
            queue,
            message: e.to_string(),
        }
    }
}

/// The device-type-specific half of a virtio device; the transport owns
/// the queues and the common state.
pub trait VirtioDevice: Send {
    /// The virtio device ID.
    fn device_type(&self) -> u16;

    /// The maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// The feature bits the device offers (VERSION_1 included).
    fn features(&self) -> u64;

    /// Reads the device-specific configuration at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device-specific configuration at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Does whatever work the queues and host-side sources have ready.
    /// Returns a bit mask of the queues that got used buffers.
    fn process(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<u32, DeviceError>;

    /// Forgets per-driver state after a device reset.
    fn reset(&mut self) {}

    /// An EventFd signalled when host-side input is waiting, if the device
    /// has any.
    fn input_event(&self) -> Option<&EventFd> {
        None
    }

    /// The driver set DRIVER_OK having accepted `features`; the queues'
    /// rings are valid. A device whose queues an external backend serves
    /// hands them over here.
    fn activate(
        &mut self,
        _features: u64,
        _queues: &[Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceError> {
        Ok(())
    }

    /// The driver notified `queue`. Returns true when the device forwarded
    /// the notification itself; false has the transport call
    /// [`VirtioDevice::process`].
    fn notify(&mut self, _queue: usize) -> bool {
        false
    }

    /// One EventFd per queue that an external backend signals when it put
    /// buffers in the used ring; empty when the device's own
    /// [`VirtioDevice::process`] does that.
    fn call_events(&self) -> &[EventFd] {
        &[]
    }
}

/// A driver's read of `data.len()` bytes at `offset` of a device-specific
/// configuration `config`; bytes past its end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// Pops the next available chain of `queue` (index `index`), checking the
/// whole chain before the device touches any buffer: it must end properly
/// and every buffer must lie in guest RAM.
pub(crate) fn pop_checked_chain<'m>(
    queue: &mut Queue,
    index: usize,
    mem: &'m GuestMemoryMmap,
) -> Result<Option<DescriptorChain<&'m GuestMemoryMmap>>, DeviceError> {
    use virtio_queue::{QueueOwnedT, QueueT};
    if !queue.ready() {
        return Ok(None);
    }
    let chain = match queue.iter(mem) {
        Ok(mut iter) => iter.next(),
        Err(e) => return Err(DeviceError::queue(index, e)),
    };
    let Some(chain) = chain else {
        return Ok(None);
    };
    let head = chain.head_index();
    let mut last: Option<Descriptor> = None;
    for desc in chain.clone() {
        if !GuestMemoryBackend::check_range(mem, desc.addr(), desc.len() as usize) {
            return Err(DeviceError::BufferOutsideMemory {
                queue: index,
                head,
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        last = Some(desc);
    }
    match last {
        Some(desc) if !desc.has_next() => Ok(Some(chain)),
        _ => Err(DeviceError::MalformedChain { queue: index, head }),
    }
}
