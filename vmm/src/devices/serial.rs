//! The 16550 UART on COM1 (vm-superio), its interrupt through an irqfd, and
//! where its output goes.

use std::fs::File;
use std::io::{self, Write};

use bus::BusDevice;
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

/// Raises the UART's interrupt by signalling the irqfd KVM routes to it.
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
pub enum SerialOutput {
    /// The VMM's standard output.
    Stdout,
    /// The VMM's standard error (the kernel log of `vmm run`, whose stdout
    /// carries the command's output).
    Stderr,
    /// A file.
    File(OutputFile),
    /// Nowhere.
    Sink,
    /// Anything else (e.g. a watcher that passes the bytes on).
    Custom(Box<dyn Write + Send>),
}

impl SerialOutput {
    /// Output to `file`.
    pub fn file(file: File) -> Self {
        Self::File(OutputFile {
            file,
            failing: false,
        })
    }
}

/// A file that takes the guest's console output. A write that fails (a full
/// disk, a file system gone read-only) is reported once, the bytes are
/// dropped and the guest goes on; a later write that succeeds is reported
/// too.
pub struct OutputFile {
    file: File,
    failing: bool,
}

impl OutputFile {
    fn write_or_drop(&mut self, buf: &[u8]) {
        match self.file.write_all(buf) {
            Ok(()) if self.failing => {
                self.failing = false;
                log::warn!("serial output file: writing again");
            }
            Ok(()) => {}
            Err(e) if !self.failing => {
                self.failing = true;
                log::warn!("serial output file: {e}; the guest's console output is dropped until writes succeed again");
            }
            Err(_) => {}
        }
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()?;
                Ok(buf.len())
            }
            Self::Stderr => {
                let mut err = io::stderr().lock();
                err.write_all(buf)?;
                Ok(buf.len())
            }
            Self::File(f) => {
                f.write_or_drop(buf);
                Ok(buf.len())
            }
            Self::Sink => Ok(buf.len()),
            Self::Custom(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Stdout => io::stdout().flush(),
            Self::Stderr => io::stderr().flush(),
            Self::File(_) | Self::Sink => Ok(()),
            Self::Custom(w) => w.flush(),
        }
    }
}

/// COM1 as a port-I/O bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, SerialOutput>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        Self {
            serial: Serial::new(EventFdTrigger(irq), out),
        }
    }

    /// Feeds bytes typed on the VMM's stdin to the guest.
    pub fn enqueue_input(&mut self, bytes: &[u8]) {
        if let Err(e) = self.serial.enqueue_raw_bytes(bytes) {
            log::debug!("serial input dropped: {e:?}");
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        if let (Some(byte), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *byte = self.serial.read(off);
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let (Some(&byte), Ok(off)) = (data.first(), u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, byte) {
                log::debug!("serial write: {e:?}");
            }
        }
    }
}
