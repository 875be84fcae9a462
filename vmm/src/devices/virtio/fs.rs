//! The virtio file system device (virtio 1.2, 5.11) with its queues served
//! by a vhost-user backend (virtiofsd) over a Unix socket.
//!
//! The VMM keeps the PCI side (common configuration, the tag in the
//! device configuration, MSI-X) and hands the rings to the backend when the
//! driver sets DRIVER_OK: the memory table (the memfd-backed guest RAM, see
//! [`crate::vm::shared_guest_memory`]), each ready queue's size and ring
//! addresses, and two EventFds per queue. A doorbell write to the notify
//! region signals the queue's kick EventFd, which the backend waits on; the
//! backend signals the call EventFd when it used buffers, and the virtio
//! event loop turns that into the queue's MSI-X message
//! ([`VirtioPciDevice::used_by_backend`](super::VirtioPciDevice::used_by_backend)).
//!
//! Queue 0 is the high-priority queue (FUSE_INTERRUPT, FUSE_FORGET), queue
//! 1 the one request queue. No DAX window (no shared-memory capability).

use std::io;
use std::path::Path;

use thiserror::Error;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{device_id, feature, read_config_bytes, DeviceError, VirtioDevice};

/// The high-priority queue.
pub const HIPRIO_QUEUE: usize = 0;
/// Request queues after the high-priority one.
pub const NUM_REQUEST_QUEUES: usize = 1;
/// Queues in all.
const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES;
/// Maximum size of every queue.
pub const QUEUE_SIZE: u16 = 1024;
/// `struct virtio_fs_config`: tag[36], then num_request_queues (le32).
pub const TAG_LEN: usize = 36;
const CONFIG_SIZE: usize = TAG_LEN + 4;

/// VHOST_USER_F_PROTOCOL_FEATURES (vhost-user specification): a backend
/// feature bit that the guest never sees.
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// Virtio feature bits the transport passes to the backend: split rings
/// only (the transport's queue registers are those of split rings), no
/// notification data (the doorbell carries no value for the backend).
const GUEST_FEATURES: u64 =
    feature::VERSION_1 | feature::RING_INDIRECT_DESC | feature::RING_EVENT_IDX;

/// Errors setting up the vhost-user connection.
#[derive(Debug, Error)]
pub enum FsError {
    /// The tag is empty or longer than the configuration field.
    #[error("virtio-fs tag '{0}' must be 1 to 36 bytes")]
    Tag(String),
    /// The backend refused or broke a vhost-user request.
    #[error("vhost-user backend at {socket}: {what}: {source}")]
    VhostUser {
        /// The backend's socket.
        socket: String,
        /// The request.
        what: &'static str,
        /// The error.
        #[source]
        source: vhost::Error,
    },
    /// An EventFd could not be created.
    #[error("virtio-fs eventfd: {0}")]
    EventFd(#[from] io::Error),
}

/// A virtio-fs device whose queues a vhost-user backend serves.
pub struct VhostUserFs {
    frontend: Frontend,
    socket: String,
    tag: [u8; TAG_LEN],
    queue_sizes: [u16; NUM_QUEUES],
    backend_features: u64,
    protocol_features: bool,
    kicks: Vec<EventFd>,
    calls: Vec<EventFd>,
    /// Queues handed to the backend since the last reset.
    started: Vec<usize>,
}

impl VhostUserFs {
    /// Connects to the backend listening on `socket` and reads what it
    /// offers; the guest will see the file system as `tag`.
    pub fn connect(socket: &Path, tag: &str) -> Result<Self, FsError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsError::Tag(tag.into()));
        }
        let name = socket.display().to_string();
        let err = |what| {
            let socket = name.clone();
            move |source| FsError::VhostUser {
                socket,
                what,
                source,
            }
        };
        let mut frontend = Frontend::connect(socket, NUM_QUEUES as u64).map_err(err("connect"))?;
        frontend.set_owner().map_err(err("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(err("GET_FEATURES"))?;
        let protocol_features = backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        if protocol_features {
            let offered = frontend
                .get_protocol_features()
                .map_err(err("GET_PROTOCOL_FEATURES"))?;
            frontend
                .set_protocol_features(offered & VhostUserProtocolFeatures::MQ)
                .map_err(err("SET_PROTOCOL_FEATURES"))?;
        }
        let mut tag_bytes = [0u8; TAG_LEN];
        tag_bytes[..tag.len()].copy_from_slice(tag.as_bytes());
        let eventfds = || -> io::Result<Vec<EventFd>> {
            (0..NUM_QUEUES)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect()
        };
        Ok(Self {
            frontend,
            socket: name,
            tag: tag_bytes,
            queue_sizes: [QUEUE_SIZE; NUM_QUEUES],
            backend_features,
            protocol_features,
            kicks: eventfds()?,
            calls: eventfds()?,
            started: Vec::new(),
        })
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0u8; CONFIG_SIZE];
        config[..TAG_LEN].copy_from_slice(&self.tag);
        config[TAG_LEN..].copy_from_slice(&(NUM_REQUEST_QUEUES as u32).to_le_bytes());
        config
    }

    fn backend_error(&self, what: &str, e: vhost::Error) -> DeviceError {
        DeviceError::Backend(format!(
            "vhost-user backend at {}: {what}: {e}",
            self.socket
        ))
    }

    /// Hands queue `index` to the backend.
    fn start_queue(
        &self,
        index: usize,
        queue: &Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceError> {
        let host = |addr: u64| {
            mem.get_host_address(GuestAddress(addr))
                .map(|p| p as u64)
                .map_err(|e| DeviceError::Queue {
                    queue: index,
                    message: e.to_string(),
                })
        };
        let rings = VringConfigData {
            queue_max_size: queue.max_size(),
            queue_size: queue.size(),
            flags: 0,
            desc_table_addr: host(queue.desc_table())?,
            used_ring_addr: host(queue.used_ring())?,
            avail_ring_addr: host(queue.avail_ring())?,
            log_addr: None,
        };
        let fe = &self.frontend;
        fe.set_vring_num(index, queue.size())
            .map_err(|e| self.backend_error("SET_VRING_NUM", e))?;
        fe.set_vring_addr(index, &rings)
            .map_err(|e| self.backend_error("SET_VRING_ADDR", e))?;
        fe.set_vring_base(index, queue.next_avail())
            .map_err(|e| self.backend_error("SET_VRING_BASE", e))?;
        fe.set_vring_call(index, &self.calls[index])
            .map_err(|e| self.backend_error("SET_VRING_CALL", e))?;
        fe.set_vring_kick(index, &self.kicks[index])
            .map_err(|e| self.backend_error("SET_VRING_KICK", e))?;
        Ok(())
    }
}

impl VirtioDevice for VhostUserFs {
    fn device_type(&self) -> u16 {
        device_id::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.backend_features & GUEST_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-fs: write to the read-only configuration at {offset:#x} ignored");
    }

    fn process(
        &mut self,
        _queues: &mut [Queue],
        _mem: &GuestMemoryMmap,
    ) -> Result<u32, DeviceError> {
        // The backend processes the rings.
        Ok(0)
    }

    fn activate(
        &mut self,
        features: u64,
        queues: &[Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceError> {
        let mut backend = features & GUEST_FEATURES;
        if self.protocol_features {
            backend |= VHOST_USER_F_PROTOCOL_FEATURES;
        }
        self.frontend
            .set_features(backend)
            .map_err(|e| self.backend_error("SET_FEATURES", e))?;
        let regions = mem
            .iter()
            .map(VhostUserMemoryRegionInfo::from_guest_region)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.backend_error("guest RAM is not file-backed", e))?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(|e| self.backend_error("SET_MEM_TABLE", e))?;
        for (index, queue) in queues.iter().enumerate() {
            if !queue.ready() {
                continue;
            }
            self.start_queue(index, queue, mem)?;
            self.started.push(index);
        }
        if self.protocol_features {
            for &index in &self.started {
                self.frontend
                    .set_vring_enable(index, true)
                    .map_err(|e| self.backend_error("SET_VRING_ENABLE", e))?;
            }
        }
        Ok(())
    }

    fn notify(&mut self, queue: usize) -> bool {
        if let Some(kick) = self.kicks.get(queue) {
            if let Err(e) = kick.write(1) {
                log::warn!("virtio-fs: queue {queue} notification lost: {e}");
            }
        }
        true
    }

    fn call_events(&self) -> &[EventFd] {
        &self.calls
    }

    fn reset(&mut self) {
        // GET_VRING_BASE stops a ring (vhost-user specification).
        for index in std::mem::take(&mut self.started) {
            if self.protocol_features {
                if let Err(e) = self.frontend.set_vring_enable(index, false) {
                    log::warn!("virtio-fs: {}", self.backend_error("SET_VRING_ENABLE", e));
                }
            }
            if let Err(e) = self.frontend.get_vring_base(index) {
                log::warn!("virtio-fs: {}", self.backend_error("GET_VRING_BASE", e));
            }
        }
    }
}
