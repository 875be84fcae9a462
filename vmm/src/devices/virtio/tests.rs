//! The transport and the console driven as a guest driver would: through
//! configuration space and BAR0, with split virtqueues in guest memory
//! built by virtio-queue's MockSplitQueue.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pci::{MsiMessage, MsiRecorder, PciDevice};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::capabilities::{cfg_type, layout, CAP_ID_VENDOR_SPECIFIC};
use super::common_config::{
    CONFIG_MSIX_VECTOR, DEVICE_FEATURE, DEVICE_FEATURE_SELECT, DEVICE_STATUS, DRIVER_FEATURE,
    DRIVER_FEATURE_SELECT, NUM_QUEUES, QUEUE_DESC, QUEUE_DEVICE, QUEUE_DRIVER, QUEUE_ENABLE,
    QUEUE_MSIX_VECTOR, QUEUE_NOTIFY_OFF, QUEUE_SELECT, QUEUE_SIZE,
};
use super::console::{RECEIVEQ, TRANSMITQ};
use super::desc_flags::{NEXT, WRITE};
use super::*;

const MEM_SIZE: usize = 0x10_0000;
const RXQ_ADDR: u64 = 0x1000;
const TXQ_ADDR: u64 = 0x2000;
const BUF: u64 = 0x1_0000;
const QSIZE: u16 = 16;
const MSI_ADDR: u64 = 0xfee0_0000;
/// MSI data of vector v: 0x40 + v.
const fn msi(v: u16) -> MsiMessage {
    MsiMessage {
        address: MSI_ADDR,
        data: 0x40 + v as u32,
    }
}

const S_DRIVER_READY: u8 = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
const S_LIVE: u8 = S_DRIVER_READY | status::DRIVER_OK;

struct Guest {
    dev: event_loop::SharedVirtioDevice,
    msi: Arc<MsiRecorder>,
    mem: GuestMemoryMmap,
    out: CaptureOutput,
    input: Arc<ConsoleInput>,
    /// Descriptor table, available ring and used ring of each queue, laid
    /// out (and zeroed) once by MockSplitQueue.
    rings: [Rings; 2],
}

#[derive(Clone, Copy)]
struct Rings {
    desc: u64,
    avail: u64,
    used: u64,
}

impl Rings {
    fn new(mem: &GuestMemoryMmap, base: u64) -> Self {
        let q = MockSplitQueue::create(mem, GuestAddress(base), QSIZE);
        Self {
            desc: q.desc_table_addr().0,
            avail: q.avail_addr().0,
            used: q.used_addr().0,
        }
    }
}

impl Guest {
    fn dev(&self) -> std::sync::MutexGuard<'_, VirtioPciDevice> {
        self.dev.lock().unwrap()
    }

    fn new() -> Self {
        let out = CaptureOutput::default();
        Self::with_output(Box::new(out.clone()), out)
    }

    /// A guest whose console writes to `output`; `out` is what the tests
    /// read back.
    fn with_output(output: Box<dyn std::io::Write + Send>, out: CaptureOutput) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let input = ConsoleInput::new().unwrap();
        let console = Console::new(output, input.clone()).unwrap();
        let msi = Arc::new(MsiRecorder::new());
        let dev = Arc::new(Mutex::new(
            VirtioPciDevice::new(Box::new(console), mem.clone(), msi.clone()).unwrap(),
        ));
        let rings = [Rings::new(&mem, RXQ_ADDR), Rings::new(&mem, TXQ_ADDR)];
        let mut guest = Self {
            dev,
            msi,
            mem,
            out,
            input,
            rings,
        };
        // Memory decode, bus master, MSI-X enabled.
        guest.dev().config_write(0x04, &6u16.to_le_bytes());
        let msix = guest.find_cap(0x11)[0];
        guest.dev().config_write(msix + 2, &0x8000u16.to_le_bytes());
        guest
    }

    /// Offsets of every capability with ID `id`.
    fn find_cap(&mut self, id: u8) -> Vec<u16> {
        let mut found = Vec::new();
        let mut ptr = self.cfg8(0x34);
        while ptr != 0 {
            if self.cfg8(ptr.into()) == id {
                found.push(u16::from(ptr));
            }
            ptr = self.cfg8(u16::from(ptr) + 1);
        }
        found
    }

    fn cfg8(&mut self, offset: u16) -> u8 {
        let mut b = [0];
        self.dev().config_read(offset, &mut b);
        b[0]
    }

    fn cfg32(&mut self, offset: u16) -> u32 {
        let mut b = [0; 4];
        self.dev().config_read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev().bar_read(0, offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    fn write(&mut self, offset: u64, len: usize, value: u64) {
        self.dev().bar_write(0, offset, &value.to_le_bytes()[..len]);
    }

    fn common(&mut self, offset: u64, len: usize) -> u64 {
        self.read(layout::COMMON.offset + offset, len)
    }

    fn set_common(&mut self, offset: u64, len: usize, value: u64) {
        self.write(layout::COMMON.offset + offset, len, value);
    }

    fn status(&mut self) -> u8 {
        self.common(DEVICE_STATUS, 1) as u8
    }

    fn set_status(&mut self, value: u8) {
        self.set_common(DEVICE_STATUS, 1, value.into());
    }

    fn negotiate(&mut self, high_features: u32) {
        self.set_status(status::ACKNOWLEDGE | status::DRIVER);
        self.set_common(DRIVER_FEATURE_SELECT, 4, 1);
        self.set_common(DRIVER_FEATURE, 4, high_features.into());
        self.set_status(S_DRIVER_READY);
    }

    fn program_vector(&mut self, vector: u16) {
        let entry = layout::MSIX_TABLE_OFFSET + 16 * u64::from(vector);
        self.write(entry, 4, MSI_ADDR);
        self.write(entry + 4, 4, 0);
        self.write(entry + 8, 4, u64::from(msi(vector).data));
        self.write(entry + 12, 4, 0);
    }

    /// Sets queue `index` up at `base` with vector `index + 1`, 32-bit
    /// halves for the addresses as Linux writes them.
    fn setup_queue(&mut self, index: u16, base: u64) {
        let r = self.rings[usize::from(index)];
        assert_eq!(r.desc, base);
        let (desc, avail, used) = (r.desc, r.avail, r.used);
        self.set_common(QUEUE_SELECT, 2, index.into());
        self.set_common(QUEUE_SIZE, 2, QSIZE.into());
        self.program_vector(index + 1);
        self.set_common(QUEUE_MSIX_VECTOR, 2, u64::from(index) + 1);
        for (reg, addr) in [
            (QUEUE_DESC, desc),
            (QUEUE_DRIVER, avail),
            (QUEUE_DEVICE, used),
        ] {
            self.set_common(reg, 4, addr & 0xffff_ffff);
            self.set_common(reg + 4, 4, addr >> 32);
        }
        self.set_common(QUEUE_ENABLE, 2, 1);
    }

    /// The usual bring-up: features, config vector 0, both queues, DRIVER_OK.
    fn bring_up(&mut self) {
        self.negotiate(1);
        self.program_vector(0);
        self.set_common(CONFIG_MSIX_VECTOR, 2, 0);
        self.setup_queue(RECEIVEQ as u16, RXQ_ADDR);
        self.setup_queue(TRANSMITQ as u16, TXQ_ADDR);
        self.set_status(S_LIVE);
        assert_eq!(self.status(), S_LIVE);
    }

    fn avail_idx(&self, queue: usize) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.rings[queue].avail + 2))
            .unwrap()
    }

    fn set_avail_idx(&self, queue: usize, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.rings[queue].avail + 2))
            .unwrap();
    }

    /// Writes descriptors (index, addr, len, flags, next) and makes `heads`
    /// available, in order.
    fn offer(&self, queue: usize, descs: &[(u16, u64, u32, u16, u16)], heads: &[u16]) {
        let r = self.rings[queue];
        for &(i, addr, len, flags, next) in descs {
            let desc = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            self.mem
                .write_obj(desc, GuestAddress(r.desc + 16 * u64::from(i)))
                .unwrap();
        }
        let idx = self.avail_idx(queue);
        for (n, &head) in heads.iter().enumerate() {
            let slot = (usize::from(idx) + n) % usize::from(QSIZE);
            self.mem
                .write_obj(head, GuestAddress(r.avail + 4 + 2 * slot as u64))
                .unwrap();
        }
        self.set_avail_idx(queue, idx.wrapping_add(heads.len() as u16));
    }

    /// The used ring: its index and its first `idx` elements (id, len).
    fn used(&self, queue: usize) -> (u16, Vec<(u32, u32)>) {
        let used = self.rings[queue].used;
        let read = |at: u64| self.mem.read_obj::<u32>(GuestAddress(at)).unwrap();
        let idx: u16 = self.mem.read_obj(GuestAddress(used + 2)).unwrap();
        let elems = (0..u64::from(idx))
            .map(|i| (read(used + 4 + 8 * i), read(used + 8 + 8 * i)))
            .collect();
        (idx, elems)
    }

    fn notify(&mut self, queue: u16) {
        self.write(
            layout::NOTIFY_OFFSET + 4 * u64::from(queue),
            2,
            queue.into(),
        );
    }

    fn notify_and_process(&mut self, queue: u16) {
        self.notify(queue);
        assert_eq!(self.dev().kick_event().read().unwrap(), 1, "doorbell kicks");
        self.dev().process();
    }
}

#[test]
fn identity_and_virtio_capabilities() {
    let mut g = Guest::new();
    assert_eq!(g.cfg32(0x00), 0x1043_1af4, "1AF4:1043, modern console");
    assert_eq!(g.cfg32(0x08), 0x0780_0001, "class 07/80, revision 1");
    assert_eq!(g.cfg32(0x2c), 0x1100_1af4);
    let caps = g.find_cap(CAP_ID_VENDOR_SPECIFIC);
    let described: Vec<(u8, u8, u8, u32, u32)> = caps
        .iter()
        .map(|&c| {
            let (len, ty, bar) = (g.cfg8(c + 2), g.cfg8(c + 3), g.cfg8(c + 4));
            (len, ty, bar, g.cfg32(c + 8), g.cfg32(c + 12))
        })
        .collect();
    assert_eq!(
        described,
        vec![
            (16, cfg_type::COMMON, 0, 0x0000, 0x38),
            (20, cfg_type::NOTIFY, 0, 0x3000, 8),
            (16, cfg_type::ISR, 0, 0x1000, 4),
            (16, cfg_type::DEVICE, 0, 0x2000, 0x1000),
            (20, cfg_type::PCI_CFG, 0, 0, 0),
        ]
    );
    assert_eq!(g.cfg32(caps[1] + 16), 4, "notify_off_multiplier");
    let msix = g.find_cap(0x11)[0];
    assert_eq!(g.cfg32(msix) >> 16, 0x8002, "enabled, 3 vectors");
    // BAR0: 64-bit, 32 KiB.
    g.dev().config_write(0x10, &u32::MAX.to_le_bytes());
    assert_eq!(g.cfg32(0x10), 0xffff_8004);
}

#[test]
fn pci_cfg_window_reaches_bar0() {
    let mut g = Guest::new();
    let cap = g.find_cap(CAP_ID_VENDOR_SPECIFIC)[4];
    let (bar, offset, length, data) = (cap + 4, cap + 8, cap + 12, cap + 16);
    g.dev().config_write(bar, &[0]);
    g.dev()
        .config_write(offset, &(layout::COMMON.offset as u32 + 0x14).to_le_bytes());
    g.dev().config_write(length, &1u32.to_le_bytes());
    g.dev().config_write(data, &[status::ACKNOWLEDGE, 0, 0, 0]);
    assert_eq!(
        g.status(),
        status::ACKNOWLEDGE,
        "written through the window"
    );
    g.set_status(status::ACKNOWLEDGE | status::DRIVER);
    assert_eq!(g.cfg8(data), status::ACKNOWLEDGE | status::DRIVER);
    // num_queues, 2 bytes.
    g.dev()
        .config_write(offset, &(layout::COMMON.offset as u32 + 0x12).to_le_bytes());
    g.dev().config_write(length, &2u32.to_le_bytes());
    assert_eq!(g.cfg32(data) & 0xffff, 2);
    // A length of 3, or an offset not aligned to the length: no access.
    g.dev().config_write(length, &3u32.to_le_bytes());
    g.dev().config_write(data, &[0; 4]);
    g.dev().config_write(length, &4u32.to_le_bytes());
    g.dev().config_write(offset, &0x16u32.to_le_bytes());
    g.dev().config_write(data, &[0; 4]);
    assert_eq!(g.status(), status::ACKNOWLEDGE | status::DRIVER);
}

#[test]
fn common_configuration_reads() {
    let mut g = Guest::new();
    assert_eq!(g.common(NUM_QUEUES, 2), 2);
    assert_eq!(g.common(DEVICE_FEATURE, 4), 0, "page 0: no feature");
    g.set_common(DEVICE_FEATURE_SELECT, 4, 1);
    assert_eq!(g.common(DEVICE_FEATURE, 4), 1, "page 1: VERSION_1");
    g.set_common(DEVICE_FEATURE_SELECT, 4, 7);
    assert_eq!(g.common(DEVICE_FEATURE, 4), 0);
    g.set_common(QUEUE_SELECT, 2, 1);
    assert_eq!(
        g.common(QUEUE_SIZE, 2),
        256,
        "maximum size before the driver picks"
    );
    assert_eq!(g.common(QUEUE_NOTIFY_OFF, 2), 1);
    assert_eq!(g.common(QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    g.set_common(QUEUE_SELECT, 2, 2);
    assert_eq!(g.common(QUEUE_SIZE, 2), 0, "no queue 2");
    assert_eq!(g.common(QUEUE_ENABLE, 2), 0);
    // Device configuration: max_nr_ports = 1 at offset 4.
    assert_eq!(g.read(layout::DEVICE.offset + 4, 4), 1);
    assert_eq!(g.read(layout::DEVICE.offset + 0x800, 4), 0);
}

#[test]
fn feature_negotiation_needs_version_1_and_known_bits() {
    let mut g = Guest::new();
    g.negotiate(0);
    assert_eq!(
        g.status(),
        status::ACKNOWLEDGE | status::DRIVER,
        "FEATURES_OK refused without VERSION_1"
    );
    g.set_status(0);
    g.negotiate(1 | 2);
    assert_eq!(
        g.status(),
        status::ACKNOWLEDGE | status::DRIVER,
        "unknown bit 33"
    );
    g.set_status(0);
    g.negotiate(1);
    assert_eq!(g.status(), S_DRIVER_READY);
    g.set_common(DRIVER_FEATURE, 4, 3);
    g.set_common(DRIVER_FEATURE_SELECT, 4, 1);
    assert_eq!(
        g.common(DRIVER_FEATURE, 4),
        1,
        "features frozen after FEATURES_OK"
    );
}

#[test]
fn driver_ok_without_features_ok_is_ignored() {
    let mut g = Guest::new();
    g.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
    assert_eq!(g.status(), status::ACKNOWLEDGE | status::DRIVER);
}

#[test]
fn vector_beyond_the_table_reads_no_vector() {
    let mut g = Guest::new();
    g.set_common(CONFIG_MSIX_VECTOR, 2, 3);
    assert_eq!(g.common(CONFIG_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
    g.set_common(QUEUE_SELECT, 2, 0);
    g.set_common(QUEUE_MSIX_VECTOR, 2, 2);
    assert_eq!(g.common(QUEUE_MSIX_VECTOR, 2), 2);
    g.set_common(QUEUE_MSIX_VECTOR, 2, 0x7ff);
    assert_eq!(g.common(QUEUE_MSIX_VECTOR, 2), u64::from(NO_VECTOR));
}

#[test]
fn transmit_reaches_the_output_and_interrupts() {
    let mut g = Guest::new();
    g.bring_up();
    g.mem.write_slice(b"hello ", GuestAddress(BUF)).unwrap();
    g.mem
        .write_slice(b"world\n", GuestAddress(BUF + 0x100))
        .unwrap();
    g.offer(
        TRANSMITQ,
        &[(3, BUF, 6, NEXT, 5), (5, BUF + 0x100, 6, 0, 0)],
        &[3],
    );
    g.notify_and_process(TRANSMITQ as u16);
    assert_eq!(g.out.contents(), b"hello world\n");
    assert_eq!(g.used(TRANSMITQ), (1, vec![(3, 0)]));
    assert_eq!(g.msi.take(), vec![msi(2)], "transmitq's vector");
    let isr = g.read(layout::ISR.offset, 1);
    assert_eq!(isr, 1, "queue interrupt");
    assert_eq!(g.read(layout::ISR.offset, 1), 0, "read clears");
}

#[test]
fn receive_fills_buffers_with_input() {
    let mut g = Guest::new();
    g.bring_up();
    g.offer(
        RECEIVEQ,
        &[(0, BUF, 2, WRITE, 0), (1, BUF + 0x10, 8, WRITE, 0)],
        &[0, 1],
    );
    g.notify_and_process(RECEIVEQ as u16);
    assert_eq!(g.used(RECEIVEQ), (0, vec![]), "no input yet");
    assert!(g.msi.is_empty());
    g.input.push(b"abc");
    g.dev().process();
    assert_eq!(g.used(RECEIVEQ), (2, vec![(0, 2), (1, 1)]));
    let mut got = [0u8; 3];
    g.mem.read_slice(&mut got[..2], GuestAddress(BUF)).unwrap();
    g.mem
        .read_slice(&mut got[2..], GuestAddress(BUF + 0x10))
        .unwrap();
    assert_eq!(&got, b"abc");
    assert_eq!(g.msi.take(), vec![msi(1)], "one interrupt for the pass");
}

/// Output that fails like a closed pipe.
struct BrokenPipe;

impl std::io::Write for BrokenPipe {
    fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
        Err(std::io::ErrorKind::BrokenPipe.into())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Err(std::io::ErrorKind::BrokenPipe.into())
    }
}

#[test]
fn failing_output_still_returns_the_buffers() {
    let mut g = Guest::with_output(Box::new(BrokenPipe), CaptureOutput::default());
    g.bring_up();
    g.offer(TRANSMITQ, &[(0, BUF, 4, 0, 0), (1, BUF, 4, 0, 0)], &[0, 1]);
    g.notify_and_process(TRANSMITQ as u16);
    assert_eq!(g.used(TRANSMITQ), (2, vec![(0, 0), (1, 0)]));
    assert_eq!(g.status(), S_LIVE, "the host's problem is not the guest's");
    assert_eq!(g.msi.take(), vec![msi(2)]);
}

#[test]
fn nothing_is_processed_before_driver_ok() {
    let mut g = Guest::new();
    g.negotiate(1);
    g.setup_queue(TRANSMITQ as u16, TXQ_ADDR);
    g.mem.write_slice(b"early", GuestAddress(BUF)).unwrap();
    g.offer(TRANSMITQ, &[(0, BUF, 5, 0, 0)], &[0]);
    g.notify_and_process(TRANSMITQ as u16);
    assert_eq!(g.out.contents(), b"");
    g.set_status(S_LIVE);
    assert_eq!(g.out.contents(), b"early", "DRIVER_OK processes what waits");
}

#[test]
fn no_dma_without_bus_mastering() {
    let mut g = Guest::new();
    g.bring_up();
    g.dev().config_write(0x04, &2u16.to_le_bytes());
    g.mem.write_slice(b"dma", GuestAddress(BUF)).unwrap();
    g.offer(TRANSMITQ, &[(0, BUF, 3, 0, 0)], &[0]);
    g.notify_and_process(TRANSMITQ as u16);
    assert_eq!((g.out.contents(), g.used(TRANSMITQ).0), (vec![], 0));
    assert!(g.msi.is_empty());
    g.dev().config_write(0x04, &6u16.to_le_bytes());
    g.notify_and_process(TRANSMITQ as u16);
    assert_eq!(
        (g.out.contents(), g.used(TRANSMITQ).0),
        (b"dma".to_vec(), 1)
    );
}

#[test]
fn queue_registers_are_frozen_once_enabled() {
    let mut g = Guest::new();
    g.negotiate(1);
    g.setup_queue(0, RXQ_ADDR);
    g.set_common(QUEUE_SIZE, 2, 4);
    g.set_common(QUEUE_DESC, 4, 0x8000);
    assert_eq!(g.common(QUEUE_SIZE, 2), u64::from(QSIZE));
    assert_eq!(g.common(QUEUE_DESC, 8), RXQ_ADDR);
    g.set_common(QUEUE_ENABLE, 2, 0);
    assert_eq!(g.common(QUEUE_ENABLE, 2), 1);
}

/// The answer to every malformed-queue case: DEVICE_NEEDS_RESET, one
/// configuration-change interrupt on vector 0, nothing sent, nothing used;
/// later notifications are ignored until the driver resets the device.
fn assert_needs_reset(g: &mut Guest, queue: usize) {
    assert_eq!(g.status(), S_LIVE | status::DEVICE_NEEDS_RESET);
    assert_eq!(g.msi.take(), vec![msi(0)]);
    assert_eq!(g.read(layout::ISR.offset, 1), 2, "configuration change");
    assert_eq!(g.used(queue).0, 0);
    assert_eq!(g.out.contents(), b"");
    // A driver cannot clear the bit by writing the status.
    g.set_status(S_LIVE);
    assert_eq!(g.status(), S_LIVE | status::DEVICE_NEEDS_RESET);
    g.notify_and_process(queue as u16);
    assert!(g.msi.is_empty(), "a broken device stays quiet");
    g.set_status(0);
    assert_eq!(g.status(), 0);
    g.set_common(QUEUE_SELECT, 2, queue as u64);
    assert_eq!(
        (g.common(QUEUE_ENABLE, 2), g.common(QUEUE_SIZE, 2)),
        (0, 256),
        "reset forgets the queues"
    );
}

#[test]
fn descriptor_loop_needs_reset() {
    let mut g = Guest::new();
    g.bring_up();
    g.offer(
        TRANSMITQ,
        &[(0, BUF, 4, NEXT, 1), (1, BUF + 4, 4, NEXT, 0)],
        &[0],
    );
    g.notify_and_process(TRANSMITQ as u16);
    assert_needs_reset(&mut g, TRANSMITQ);
}

#[test]
fn next_index_beyond_the_table_needs_reset() {
    let mut g = Guest::new();
    g.bring_up();
    g.offer(TRANSMITQ, &[(0, BUF, 4, NEXT, 200)], &[0]);
    g.notify_and_process(TRANSMITQ as u16);
    assert_needs_reset(&mut g, TRANSMITQ);
}

#[test]
fn head_index_beyond_the_table_needs_reset() {
    let mut g = Guest::new();
    g.bring_up();
    g.offer(TRANSMITQ, &[], &[QSIZE + 3]);
    g.notify_and_process(TRANSMITQ as u16);
    assert_needs_reset(&mut g, TRANSMITQ);
}

#[test]
fn buffer_outside_guest_ram_needs_reset() {
    let mut g = Guest::new();
    g.bring_up();
    g.offer(TRANSMITQ, &[(0, MEM_SIZE as u64 - 2, 4, 0, 0)], &[0]);
    g.notify_and_process(TRANSMITQ as u16);
    assert_needs_reset(&mut g, TRANSMITQ);
}

#[test]
fn receive_buffer_outside_guest_ram_needs_reset() {
    let mut g = Guest::new();
    g.bring_up();
    g.offer(RECEIVEQ, &[(0, 0xffff_ffff_0000, 16, WRITE, 0)], &[0]);
    g.input.push(b"x");
    g.notify_and_process(RECEIVEQ as u16);
    assert_needs_reset(&mut g, RECEIVEQ);
}

#[test]
fn available_index_too_far_ahead_needs_reset() {
    let mut g = Guest::new();
    g.bring_up();
    g.set_avail_idx(TRANSMITQ, QSIZE + 1);
    g.notify_and_process(TRANSMITQ as u16);
    assert_needs_reset(&mut g, TRANSMITQ);
}

#[test]
fn rings_outside_guest_ram_need_reset_at_driver_ok() {
    let mut g = Guest::new();
    g.negotiate(1);
    g.program_vector(0);
    g.set_common(CONFIG_MSIX_VECTOR, 2, 0);
    g.setup_queue(RECEIVEQ as u16, RXQ_ADDR);
    g.set_common(QUEUE_SELECT, 2, TRANSMITQ as u64);
    g.set_common(QUEUE_DESC, 8, 0x10_0000_0000);
    g.set_common(QUEUE_DRIVER, 8, TXQ_ADDR);
    g.set_common(QUEUE_DEVICE, 8, TXQ_ADDR + 0x800);
    g.set_common(QUEUE_ENABLE, 2, 1);
    g.set_status(S_LIVE);
    assert_needs_reset(&mut g, TRANSMITQ);
}

#[test]
fn odd_accesses_are_harmless() {
    let mut g = Guest::new();
    g.bring_up();
    // Wrong widths: ignored, read as zero.
    g.set_common(DEVICE_STATUS, 4, 0);
    assert_eq!(g.status(), S_LIVE);
    assert_eq!(g.common(DEVICE_STATUS, 2), 0);
    assert_eq!(g.common(QUEUE_SELECT, 1), 0);
    // Straddling the end of a region, beyond every region, the PBA.
    g.write(layout::COMMON.offset + 0x36, 4, u64::MAX);
    g.write(layout::NOTIFY_OFFSET + 2, 2, 1);
    g.write(layout::NOTIFY_OFFSET + 8, 4, 2);
    assert!(g.dev().kick_event().read().is_err(), "no doorbell there");
    g.write(0x7ff8, 8, u64::MAX);
    assert_eq!(g.read(0x7ff8, 8), 0);
    g.write(layout::MSIX_PBA_OFFSET, 8, u64::MAX);
    assert_eq!(g.read(layout::MSIX_PBA_OFFSET, 8), 0);
    g.dev().bar_write(2, 0, &[1, 2, 3, 4]);
    let mut b = [0u8; 4];
    g.dev().bar_read(2, 0, &mut b);
    assert_eq!(b, [0xff; 4]);
    assert_eq!(g.status(), S_LIVE);
}

#[test]
fn masked_vector_is_delivered_when_unmasked() {
    let mut g = Guest::new();
    g.bring_up();
    g.write(layout::MSIX_TABLE_OFFSET + 2 * 16 + 12, 4, 1);
    g.mem.write_slice(b"m", GuestAddress(BUF)).unwrap();
    g.offer(TRANSMITQ, &[(0, BUF, 1, 0, 0)], &[0]);
    g.notify_and_process(TRANSMITQ as u16);
    assert!(g.msi.is_empty());
    assert_eq!(g.read(layout::MSIX_PBA_OFFSET, 8), 0b100);
    g.write(layout::MSIX_TABLE_OFFSET + 2 * 16 + 12, 4, 0);
    assert_eq!(g.msi.take(), vec![msi(2)]);
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn event_loop_serves_doorbells_and_input() {
    let mut g = Guest::new();
    g.bring_up();
    let event_loop = VirtioEventLoop::start(&[g.dev.clone()]).unwrap();
    g.mem.write_slice(b"via epoll", GuestAddress(BUF)).unwrap();
    g.offer(TRANSMITQ, &[(0, BUF, 9, 0, 0)], &[0]);
    g.notify(TRANSMITQ as u16);
    wait_for("the transmit buffer", || g.used(TRANSMITQ).0 == 1);
    assert_eq!(g.out.contents(), b"via epoll");

    g.offer(RECEIVEQ, &[(0, BUF + 0x100, 16, WRITE, 0)], &[0]);
    g.notify(RECEIVEQ as u16);
    g.input.push(b"typed");
    wait_for("the receive buffer", || g.used(RECEIVEQ).0 == 1);
    assert_eq!(g.used(RECEIVEQ).1, vec![(0, 5)]);
    event_loop.stop();
    assert_eq!(g.msi.take(), vec![msi(2), msi(1)]);
}
