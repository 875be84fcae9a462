//! Devices used by micro-guest programs: the test-exit port, a scratch MMIO
//! register file, and a portal that records 64-byte stores.

use std::sync::atomic::{AtomicBool, Ordering};

use std::sync::{Arc, Mutex};
use vmm::vm::ExitReporter;

use bus::{BusDevice, StoreKind, StoreReply};

/// A 4-byte OUT to [`crate::TEST_EXIT_PORT`] ends the run with
/// the value written as its result.
pub struct TestExit {
    reporter: ExitReporter,
}

impl TestExit {
    /// Reports through the machine's `reporter`.
    pub fn new(reporter: ExitReporter) -> Self {
        Self { reporter }
    }
}

impl BusDevice for TestExit {
    fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _: u64, _: u64, data: &[u8]) {
        let mut value = [0u8; 4];
        let n = data.len().min(4);
        value[..n].copy_from_slice(&data[..n]);
        self.reporter.report(u32::from_le_bytes(value));
    }
}

/// Size of the scratch MMIO device.
pub const TEST_MMIO_SIZE: u64 = 0x1000;
/// Value of the scratch device's first register at reset ("TEST").
pub const TEST_MMIO_MAGIC: u32 = 0x5453_4554;

/// Scratch MMIO registers: reads return what was last written; offset 0
/// starts as [`TEST_MMIO_MAGIC`].
pub struct TestMmio {
    regs: Vec<u8>,
}

impl Default for TestMmio {
    fn default() -> Self {
        let mut regs = vec![0; TEST_MMIO_SIZE as usize];
        regs[..4].copy_from_slice(&TEST_MMIO_MAGIC.to_le_bytes());
        Self { regs }
    }
}

impl BusDevice for TestMmio {
    fn read(&mut self, _: u64, offset: u64, data: &mut [u8]) {
        match self.regs.get(offset as usize..offset as usize + data.len()) {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _: u64, offset: u64, data: &[u8]) {
        if let Some(dst) = self
            .regs
            .get_mut(offset as usize..offset as usize + data.len())
        {
            dst.copy_from_slice(data);
        }
    }
}

/// A 64-byte store the test portal received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortalStore {
    /// Which instruction made it.
    pub kind: StoreKind,
    /// Offset in the portal page.
    pub offset: u64,
    /// The 64 bytes.
    pub data: [u8; 64],
}

/// Size of the test portal.
pub const TEST_PORTAL_SIZE: u64 = 0x1000;

/// What the test portal saw, shared with the test.
#[derive(Default)]
pub struct PortalLog {
    /// Every 64-byte store, in order.
    pub stores: Mutex<Vec<PortalStore>>,
    /// Answer ENQCMD/ENQCMDS with Retry instead of Accepted.
    pub retry: AtomicBool,
}

/// A portal answering 64-byte stores: MOVDIR64B is always accepted; ENQCMD
/// and ENQCMDS are accepted or retried as [`PortalLog::retry`] says.
pub struct TestPortal {
    log: Arc<PortalLog>,
}

impl TestPortal {
    /// A portal recording into `log`.
    pub fn new(log: Arc<PortalLog>) -> Self {
        Self { log }
    }
}

impl BusDevice for TestPortal {
    fn read(&mut self, _: u64, _: u64, data: &mut [u8]) {
        let count = self.log.stores.lock().map_or(0, |s| s.len() as u64);
        for (i, b) in data.iter_mut().enumerate() {
            *b = count.to_le_bytes().get(i).copied().unwrap_or(0);
        }
    }

    fn write(&mut self, _: u64, _: u64, _: &[u8]) {}

    fn store64(&mut self, _: u64, offset: u64, data: &[u8; 64], kind: StoreKind) -> StoreReply {
        let reply = match kind {
            StoreKind::Movdir64b => StoreReply::Accepted,
            _ if self.log.retry.load(Ordering::SeqCst) => StoreReply::Retry,
            _ => StoreReply::Accepted,
        };
        if let Ok(mut stores) = self.log.stores.lock() {
            stores.push(PortalStore {
                kind,
                offset,
                data: *data,
            });
        }
        reply
    }
}
