//! The event-manager thread of the virtio devices: it waits on every
//! device's notification EventFd (signalled by the driver's doorbell
//! writes) and input EventFd (signalled when host-side input arrives), and
//! processes the device's queues when one fires.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use super::VirtioPciDevice;

/// A virtio device shared between the PCI root complex and the event loop.
pub type SharedVirtioDevice = Arc<Mutex<VirtioPciDevice>>;

/// Errors starting the event loop.
#[derive(Debug, Error)]
pub enum EventLoopError {
    /// An EventFd could not be created or duplicated.
    #[error("virtio event loop: eventfd: {0}")]
    EventFd(#[from] std::io::Error),
    /// epoll could not be set up.
    #[error("virtio event loop: {0}")]
    EventManager(#[from] event_manager::Error),
}

const KICK: u32 = 0;
const INPUT: u32 = 1;
/// Call EventFd of queue N: `CALL + N`.
const CALL: u32 = 2;

/// Processes one device when its notification or input EventFd fires.
struct DeviceWorker {
    device: SharedVirtioDevice,
    kick: EventFd,
    input: Option<EventFd>,
    /// An external backend's used-buffer signals, by queue.
    calls: Vec<EventFd>,
}

impl MutEventSubscriber for DeviceWorker {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        if let Err(e) = ops.add(Events::with_data(&self.kick, KICK, EventSet::IN)) {
            log::error!("virtio event loop: cannot watch queue notifications: {e}");
        }
        if let Some(input) = &self.input {
            if let Err(e) = ops.add(Events::with_data(input, INPUT, EventSet::IN)) {
                log::error!("virtio event loop: cannot watch console input: {e}");
            }
        }
        for (queue, call) in self.calls.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(call, CALL + queue as u32, EventSet::IN)) {
                log::error!("virtio event loop: cannot watch queue {queue}'s backend: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps<'_>) {
        if let Some(queue) = events.data().checked_sub(CALL) {
            if let Some(call) = self.calls.get(queue as usize) {
                let _ = call.read();
            }
            self.device
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .used_by_backend(queue as usize);
            return;
        }
        let fd = match events.data() {
            KICK => Some(&self.kick),
            _ => self.input.as_ref(),
        };
        // Reading resets the counter; several signals need one pass.
        if let Some(fd) = fd {
            let _ = fd.read();
        }
        self.device
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .process();
    }
}

/// Wakes the loop so that it sees the stop flag.
struct Waker(EventFd);

impl MutEventSubscriber for Waker {
    fn init(&mut self, ops: &mut EventOps<'_>) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            log::error!("virtio event loop: cannot watch the stop event: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps<'_>) {
        let _ = self.0.read();
    }
}

/// The running event loop thread.
pub struct VirtioEventLoop {
    stop: Arc<AtomicBool>,
    wake: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl VirtioEventLoop {
    /// Starts the thread serving `devices`.
    pub fn start(devices: &[SharedVirtioDevice]) -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()?;
        for device in devices {
            let (kick, input, calls) = {
                let dev = device.lock().unwrap_or_else(PoisonError::into_inner);
                let input = dev.input_event().map(EventFd::try_clone).transpose()?;
                let calls = dev
                    .call_events()
                    .iter()
                    .map(EventFd::try_clone)
                    .collect::<Result<_, _>>()?;
                (dev.kick_event().try_clone()?, input, calls)
            };
            manager.add_subscriber(Box::new(DeviceWorker {
                device: device.clone(),
                kick,
                input,
                calls,
            }));
        }
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        manager.add_subscriber(Box::new(Waker(wake.try_clone()?)));
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let devices = devices.to_vec();
        let thread = thread::Builder::new()
            .name("virtio".into())
            .spawn(move || {
                while !flag.load(Ordering::Acquire) {
                    if let Err(e) = manager.run() {
                        log::error!("virtio event loop: {e}");
                        break;
                    }
                }
                // Output the guest queued just before the machine stopped.
                for device in &devices {
                    device
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .process();
                }
            })?;
        Ok(Self {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Stops the thread after a last pass over every device.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for VirtioEventLoop {
    fn drop(&mut self) {
        self.shutdown();
    }
}
