//! The virtio console device (virtio 1.2, 5.3), port 0 only: no
//! multiport, no console-size or emergency-write features.
//!
//! Queue 0 (receiveq) carries host input to the guest, queue 1
//! (transmitq) the guest's output. Output is written to the device's
//! [`Write`] target as it arrives, byte for byte, and flushed after every
//! buffer, so a command's output reaches the VMM's stdout live.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, PoisonError};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{device_id, pop_checked_chain, read_config_bytes, DeviceError, VirtioDevice};

/// receiveq of port 0.
pub const RECEIVEQ: usize = 0;
/// transmitq of port 0.
pub const TRANSMITQ: usize = 1;
/// Maximum size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_console_config`: cols, rows, max_nr_ports, emerg_wr.
const CONFIG_SIZE: usize = 12;
/// Offset of max_nr_ports in the configuration.
const CONFIG_MAX_NR_PORTS: usize = 4;
/// Bytes copied per step from a transmit buffer to the output.
const COPY_CHUNK: usize = 4096;

/// Host-side input waiting for the guest, shared between whoever produces
/// it (e.g. a stdin thread) and the console.
pub struct ConsoleInput {
    bytes: Mutex<VecDeque<u8>>,
    event: EventFd,
}

impl ConsoleInput {
    /// An empty input.
    pub fn new() -> io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            bytes: Mutex::new(VecDeque::new()),
            event: EventFd::new(libc::EFD_NONBLOCK)?,
        }))
    }

    /// Queues `bytes` for the guest and wakes the event loop.
    pub fn push(&self, bytes: &[u8]) {
        self.lock().extend(bytes);
        if let Err(e) = self.event.write(1) {
            log::warn!("virtio-console: input wake-up lost: {e}");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<u8>> {
        self.bytes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn take(&self, max: usize) -> Vec<u8> {
        let mut bytes = self.lock();
        let n = max.min(bytes.len());
        bytes.drain(..n).collect()
    }

    fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }
}

/// A [`Write`] target that keeps everything written, for output the VMM
/// reads after the run (e.g. the command status channel).
#[derive(Clone, Debug, Default)]
pub struct CaptureOutput(Arc<Mutex<Vec<u8>>>);

impl CaptureOutput {
    /// Everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Write for CaptureOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A single-port virtio console.
pub struct Console {
    output: Box<dyn Write + Send>,
    /// Set once an output error was logged (a closed pipe would otherwise
    /// log once per buffer).
    output_failed: bool,
    input: Arc<ConsoleInput>,
    input_event: EventFd,
    queue_sizes: [u16; 2],
}

impl Console {
    /// A console writing the guest's output to `output` and feeding it
    /// what is pushed to `input`.
    pub fn new(output: Box<dyn Write + Send>, input: Arc<ConsoleInput>) -> io::Result<Self> {
        let input_event = input.event.try_clone()?;
        Ok(Self {
            output,
            output_failed: false,
            input,
            input_event,
            queue_sizes: [QUEUE_SIZE; 2],
        })
    }

    fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut config = [0u8; CONFIG_SIZE];
        config[CONFIG_MAX_NR_PORTS..CONFIG_MAX_NR_PORTS + 4].copy_from_slice(&1u32.to_le_bytes());
        config
    }

    /// Logs the first output error; the guest's buffers are consumed anyway
    /// so that it never waits on a host that cannot write.
    fn note_output(&mut self, result: io::Result<()>) {
        if let Err(e) = result {
            if !self.output_failed {
                log::warn!("virtio-console: output lost from now on: {e}");
                self.output_failed = true;
            }
        }
    }

    /// Sends every transmit buffer to the output.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let mut used = false;
        while let Some(chain) = pop_checked_chain(queue, TRANSMITQ, mem)? {
            let head = chain.head_index();
            let mut reader = chain
                .reader(mem)
                .map_err(|e| DeviceError::queue(TRANSMITQ, e))?;
            let mut chunk = [0u8; COPY_CHUNK];
            loop {
                match reader.read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        let written = self.output.write_all(&chunk[..n]);
                        self.note_output(written);
                    }
                    Err(e) => {
                        log::warn!("virtio-console: transmit buffer unreadable: {e}");
                        break;
                    }
                }
            }
            let flushed = self.output.flush();
            self.note_output(flushed);
            // The device wrote nothing into a transmit buffer.
            queue
                .add_used(mem, head, 0)
                .map_err(|e| DeviceError::queue(TRANSMITQ, e))?;
            used = true;
        }
        Ok(used)
    }

    /// Fills receive buffers with waiting input.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceError> {
        let mut used = false;
        while !self.input.is_empty() {
            let Some(chain) = pop_checked_chain(queue, RECEIVEQ, mem)? else {
                break;
            };
            let head = chain.head_index();
            let mut writer = chain
                .writer(mem)
                .map_err(|e| DeviceError::queue(RECEIVEQ, e))?;
            let bytes = self.input.take(writer.available_bytes());
            let written = match writer.write_all(&bytes) {
                Ok(()) => bytes.len(),
                Err(e) => {
                    log::warn!("virtio-console: receive buffer unwritable: {e}");
                    writer.bytes_written()
                }
            };
            queue
                .add_used(mem, head, written as u32)
                .map_err(|e| DeviceError::queue(RECEIVEQ, e))?;
            used = true;
        }
        Ok(used)
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u16 {
        device_id::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // emerg_wr needs VIRTIO_CONSOLE_F_EMERG_WRITE, not offered.
        log::debug!("virtio-console: configuration write at {offset:#x} ignored");
    }

    fn process(&mut self, queues: &mut [Queue], mem: &GuestMemoryMmap) -> Result<u32, DeviceError> {
        let mut used = 0;
        let [rx, tx] = queues else {
            return Ok(0);
        };
        if self.transmit(tx, mem)? {
            used |= 1 << TRANSMITQ;
        }
        if self.receive(rx, mem)? {
            used |= 1 << RECEIVEQ;
        }
        Ok(used)
    }

    fn input_event(&self) -> Option<&EventFd> {
        Some(&self.input_event)
    }
}
