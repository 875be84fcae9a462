//! Tests of the root complex with a fake PCI function.

use std::sync::{Arc, Mutex};

use bus::{BusDevice, StoreKind, StoreReply};

use pci::{BarKind, MappedBar, PciConfiguration, PciDevice, PciHeader};

use super::*;
use crate::layout::{
    PCIE_ECAM_START, PCI_CONFIG_ADDRESS_PORT, PCI_MMIO32_SIZE, PCI_MMIO32_START, PCI_MMIO64_START,
};

const FAKE_ID: u32 = 0x0b25_8086;
const BAR0_SIZE: u64 = 0x1000;
const BAR2_SIZE: u64 = 0x4000;

/// A function with a 32-bit BAR0 and a 64-bit BAR2 backed by plain memory;
/// it records 64-byte stores and answers ENQCMD with `enqcmd_reply`.
struct FakeFunction {
    config: PciConfiguration,
    bar0: Vec<u8>,
    bar2: Vec<u8>,
    stores: Vec<(u8, u64, StoreKind, [u8; 64])>,
    enqcmd_reply: StoreReply,
}

impl FakeFunction {
    fn new() -> Self {
        let mut config = PciConfiguration::new(&PciHeader {
            vendor_id: 0x8086,
            device_id: 0x0b25,
            revision_id: 0,
            class_code: 0x08_80_00,
            subsystem_vendor_id: 0x8086,
            subsystem_id: 0,
        });
        config
            .add_bar(
                0,
                BAR0_SIZE,
                BarKind::Memory32 {
                    prefetchable: false,
                },
            )
            .unwrap();
        config
            .add_bar(
                2,
                BAR2_SIZE,
                BarKind::Memory64 {
                    prefetchable: false,
                },
            )
            .unwrap();
        Self {
            config,
            bar0: vec![0; BAR0_SIZE as usize],
            bar2: vec![0; BAR2_SIZE as usize],
            stores: Vec::new(),
            enqcmd_reply: StoreReply::Accepted,
        }
    }

    fn bar_mut(&mut self, bar: u8) -> &mut Vec<u8> {
        match bar {
            0 => &mut self.bar0,
            2 => &mut self.bar2,
            _ => panic!("no BAR {bar}"),
        }
    }
}

impl PciDevice for FakeFunction {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.config.write(offset, data);
    }

    fn mapped_bars(&self) -> Vec<MappedBar> {
        self.config.mapped_bars()
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let o = offset as usize;
        data.copy_from_slice(&self.bar_mut(bar)[o..o + data.len()]);
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let o = offset as usize;
        self.bar_mut(bar)[o..o + data.len()].copy_from_slice(data);
    }

    fn bar_store64(
        &mut self,
        bar: u8,
        offset: u64,
        data: &[u8; 64],
        kind: StoreKind,
    ) -> StoreReply {
        self.stores.push((bar, offset, kind, *data));
        match kind {
            StoreKind::Movdir64b => StoreReply::Accepted,
            StoreKind::Enqcmd | StoreKind::Enqcmds => self.enqcmd_reply,
        }
    }
}

/// A root with one fake function added.
fn root_with_fake() -> (PciRoot, Arc<Mutex<FakeFunction>>, PciAddress) {
    let root = PciRoot::new();
    let fake = Arc::new(Mutex::new(FakeFunction::new()));
    let bdf = root.add_device(fake.clone()).unwrap();
    (root, fake, bdf)
}

fn ecam_offset(bdf: PciAddress, register: u16) -> u64 {
    (u64::from(bdf.bus) << 20) | (u64::from(bdf.devfn()) << 12) | u64::from(register)
}

fn ecam_read32(ecam: &mut PciEcam, bdf: PciAddress, register: u16) -> u32 {
    let mut b = [0; 4];
    ecam.read(PCIE_ECAM_START, ecam_offset(bdf, register), &mut b);
    u32::from_le_bytes(b)
}

fn ecam_write32(ecam: &mut PciEcam, bdf: PciAddress, register: u16, value: u32) {
    ecam.write(
        PCIE_ECAM_START,
        ecam_offset(bdf, register),
        &value.to_le_bytes(),
    );
}

fn cf8_select(io: &mut PciConfigIo, address: u32) {
    io.write(
        u64::from(PCI_CONFIG_ADDRESS_PORT),
        0,
        &address.to_le_bytes(),
    );
}

fn cfc_read(io: &mut PciConfigIo, port_offset: u64, len: usize) -> u32 {
    let mut b = [0; 4];
    io.read(
        u64::from(PCI_CONFIG_ADDRESS_PORT),
        4 + port_offset,
        &mut b[..len],
    );
    u32::from_le_bytes(b)
}

/// An absolute-address read through the MMIO windows device.
fn mmio_read(windows: &mut PciMmioWindows, addr: u64, len: usize) -> u64 {
    let (base, offset) = window_split(addr);
    let mut b = [0; 8];
    windows.read(base, offset, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn mmio_write(windows: &mut PciMmioWindows, addr: u64, data: &[u8]) {
    let (base, offset) = window_split(addr);
    windows.write(base, offset, data);
}

/// A 64-byte store at an absolute address through the MMIO windows device.
fn mmio_store64(
    windows: &mut PciMmioWindows,
    addr: u64,
    data: &[u8; 64],
    kind: StoreKind,
) -> StoreReply {
    let (base, offset) = window_split(addr);
    windows.store64(base, offset, data, kind)
}

/// The registration base and offset the MMIO bus would pass for `addr`.
fn window_split(addr: u64) -> (u64, u64) {
    if addr >= PCI_MMIO64_START {
        (PCI_MMIO64_START, addr - PCI_MMIO64_START)
    } else {
        (PCI_MMIO32_START, addr - PCI_MMIO32_START)
    }
}

const HOST_BRIDGE: PciAddress = PciAddress {
    bus: 0,
    device: 0,
    function: 0,
};

#[test]
fn ecam_reads_ids_of_host_bridge_and_function() {
    let (root, _fake, bdf) = root_with_fake();
    assert_eq!(bdf.to_string(), "00:01.0");
    let mut ecam = root.ecam();
    assert_eq!(ecam_read32(&mut ecam, HOST_BRIDGE, 0), 0x0d57_8086);
    assert_eq!(
        ecam_read32(&mut ecam, HOST_BRIDGE, 0x08) >> 8,
        0x06_00_00,
        "host bridge class"
    );
    assert_eq!(ecam_read32(&mut ecam, bdf, 0), FAKE_ID);
    let mut half = [0; 2];
    ecam.read(PCIE_ECAM_START, ecam_offset(bdf, 2), &mut half);
    assert_eq!(u16::from_le_bytes(half), 0x0b25);
}

#[test]
fn ecam_reaches_extended_configuration_space() {
    let (root, fake, bdf) = root_with_fake();
    fake.lock()
        .unwrap()
        .config
        .add_extended_capability(0x1b, 1, &[0x04, 0x14, 0, 0], &[])
        .unwrap();
    let mut ecam = root.ecam();
    assert_eq!(ecam_read32(&mut ecam, bdf, 0x100), 0x0001_001b);
    assert_eq!(ecam_read32(&mut ecam, bdf, 0x104), 0x1404);
}

#[test]
fn ecam_unaligned_or_odd_sized_access_reads_all_ones() {
    let (root, _fake, bdf) = root_with_fake();
    let mut ecam = root.ecam();
    let mut b = [0; 4];
    ecam.read(PCIE_ECAM_START, ecam_offset(bdf, 1), &mut b[..2]);
    assert_eq!(b[..2], [0xff, 0xff]);
    let mut b8 = [0; 8];
    ecam.read(PCIE_ECAM_START, ecam_offset(bdf, 0), &mut b8);
    assert_eq!(b8, [0xff; 8]);
}

#[test]
fn config_ports_read_ids_and_honour_enable_bit() {
    let (root, _fake, bdf) = root_with_fake();
    let mut io = root.config_io();
    let select = |bdf: PciAddress, reg: u32| 0x8000_0000 | (u32::from(bdf.devfn()) << 8) | reg;

    cf8_select(&mut io, select(HOST_BRIDGE, 0));
    assert_eq!(cfc_read(&mut io, 0, 4), 0x0d57_8086);
    cf8_select(&mut io, select(bdf, 0));
    assert_eq!(cfc_read(&mut io, 0, 4), FAKE_ID);
    assert_eq!(cfc_read(&mut io, 2, 2), 0x0b25, "word at 0xCFE");
    assert_eq!(cfc_read(&mut io, 3, 1), 0x0b, "byte at 0xCFF");

    // CONFIG_ADDRESS reads back what was written, bits 1:0 and 30:24 clear.
    cf8_select(&mut io, 0xffff_ffff);
    let mut b = [0; 4];
    io.read(u64::from(PCI_CONFIG_ADDRESS_PORT), 0, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);

    // Enable bit clear: data reads all ones, writes are dropped.
    cf8_select(&mut io, select(bdf, 0x04) & !0x8000_0000);
    assert_eq!(cfc_read(&mut io, 0, 4), 0xffff_ffff);
    io.write(u64::from(PCI_CONFIG_ADDRESS_PORT), 4, &[0, 0]);
    cf8_select(&mut io, select(bdf, 0x04));
    assert_eq!(cfc_read(&mut io, 0, 2) & 0x2, 0x2, "memory decode still on");
}

#[test]
fn config_ports_ignore_byte_accesses_to_address_register() {
    let (root, _fake, bdf) = root_with_fake();
    let mut io = root.config_io();
    cf8_select(&mut io, 0x8000_0000 | (u32::from(bdf.devfn()) << 8));
    // Linux's type-1 probe writes a byte at 0xCFB; CONFIG_ADDRESS keeps its value.
    io.write(u64::from(PCI_CONFIG_ADDRESS_PORT), 3, &[0x01]);
    let mut b = [0; 1];
    io.read(u64::from(PCI_CONFIG_ADDRESS_PORT), 3, &mut b);
    assert_eq!(b, [0xff]);
    assert_eq!(cfc_read(&mut io, 0, 4), FAKE_ID);
}

#[test]
fn absent_functions_and_other_buses_read_all_ones() {
    let (root, _fake, _bdf) = root_with_fake();
    let mut ecam = root.ecam();
    let absent = PciAddress {
        bus: 0,
        device: 2,
        function: 0,
    };
    assert_eq!(ecam_read32(&mut ecam, absent, 0), 0xffff_ffff);
    assert_eq!(
        ecam_read32(&mut ecam, PciAddress::from_devfn(0x09), 0),
        0xffff_ffff,
        "function 1 of the fake device"
    );
    ecam_write32(&mut ecam, absent, 0x10, 0x1234_5000);
    let other_bus = PciAddress {
        bus: 1,
        device: 0,
        function: 0,
    };
    assert_eq!(ecam_read32(&mut ecam, other_bus, 0), 0xffff_ffff);

    let mut io = root.config_io();
    cf8_select(&mut io, 0x8000_0000 | (5 << 11));
    assert_eq!(cfc_read(&mut io, 0, 4), 0xffff_ffff);
    cf8_select(&mut io, 0x8001_0000);
    assert_eq!(cfc_read(&mut io, 0, 4), 0xffff_ffff, "bus 1");
}

#[test]
fn add_device_assigns_bars_and_enables_memory_decode() {
    let (root, fake, bdf) = root_with_fake();
    let mut ecam = root.ecam();
    assert_eq!(ecam_read32(&mut ecam, bdf, 0x04) & 0x2, 0x2);
    let bars = fake.lock().unwrap().mapped_bars();
    assert_eq!(
        bars,
        vec![
            MappedBar {
                index: 0,
                base: PCI_MMIO32_START,
                size: BAR0_SIZE
            },
            MappedBar {
                index: 2,
                base: PCI_MMIO64_START,
                size: BAR2_SIZE
            },
        ]
    );
    assert_eq!(ecam_read32(&mut ecam, bdf, 0x10), PCI_MMIO32_START as u32);
    assert_eq!(
        ecam_read32(&mut ecam, bdf, 0x18),
        0x4,
        "64-bit, low dword 0"
    );
    assert_eq!(
        ecam_read32(&mut ecam, bdf, 0x1c),
        (PCI_MMIO64_START >> 32) as u32
    );

    // A second function's BARs follow, size-aligned.
    let second = Arc::new(Mutex::new(FakeFunction::new()));
    let bdf2 = root.add_device(second.clone()).unwrap();
    assert_eq!(bdf2.device, 2);
    let bars2 = second.lock().unwrap().mapped_bars();
    assert_eq!(bars2[0].base, PCI_MMIO32_START + BAR0_SIZE);
    assert_eq!(bars2[1].base, PCI_MMIO64_START + BAR2_SIZE);
}

#[test]
fn guest_bar_sizing_probe_through_ecam() {
    let (root, _fake, bdf) = root_with_fake();
    let mut ecam = root.ecam();
    // As Linux does: decode off, write all ones, read the mask, restore.
    ecam_write32(&mut ecam, bdf, 0x04, 0);
    let original = ecam_read32(&mut ecam, bdf, 0x10);
    ecam_write32(&mut ecam, bdf, 0x10, 0xffff_ffff);
    assert_eq!(ecam_read32(&mut ecam, bdf, 0x10), 0xffff_f000);
    ecam_write32(&mut ecam, bdf, 0x10, original);
    ecam_write32(&mut ecam, bdf, 0x18, 0xffff_ffff);
    ecam_write32(&mut ecam, bdf, 0x1c, 0xffff_ffff);
    assert_eq!(ecam_read32(&mut ecam, bdf, 0x18), 0xffff_c004);
    assert_eq!(ecam_read32(&mut ecam, bdf, 0x1c), 0xffff_ffff);
    // BAR4 is not implemented: its mask reads 0.
    ecam_write32(&mut ecam, bdf, 0x20, 0xffff_ffff);
    assert_eq!(ecam_read32(&mut ecam, bdf, 0x20), 0);
}

#[test]
fn dispatch_reads_writes_and_64_byte_stores_to_the_bar() {
    let (root, fake, _bdf) = root_with_fake();
    let mut windows = root.mmio_windows();
    mmio_write(
        &mut windows,
        PCI_MMIO32_START + 0x10,
        &0xdead_beefu32.to_le_bytes(),
    );
    assert_eq!(
        fake.lock().unwrap().bar0[0x10..0x14],
        [0xef, 0xbe, 0xad, 0xde]
    );
    assert_eq!(
        mmio_read(&mut windows, PCI_MMIO32_START + 0x10, 4),
        0xdead_beef
    );
    fake.lock().unwrap().bar2[0x3ff8..].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    assert_eq!(
        mmio_read(&mut windows, PCI_MMIO64_START + 0x3ff8, 8),
        0x0807_0605_0403_0201
    );

    let desc = [0x5a; 64];
    let portal = PCI_MMIO64_START + 0x2000;
    let replies = [StoreKind::Movdir64b, StoreKind::Enqcmd]
        .map(|kind| mmio_store64(&mut windows, portal, &desc, kind));
    assert_eq!(replies, [StoreReply::Accepted, StoreReply::Accepted]);
    fake.lock().unwrap().enqcmd_reply = StoreReply::Retry;
    assert_eq!(
        mmio_store64(&mut windows, portal, &desc, StoreKind::Enqcmds),
        StoreReply::Retry,
        "the device's answer is passed back"
    );
    let stores = fake.lock().unwrap().stores.clone();
    assert_eq!(
        stores,
        vec![
            (2, 0x2000, StoreKind::Movdir64b, desc),
            (2, 0x2000, StoreKind::Enqcmd, desc),
            (2, 0x2000, StoreKind::Enqcmds, desc),
        ]
    );
}

#[test]
fn unclaimed_window_accesses() {
    let (root, fake, _bdf) = root_with_fake();
    let mut windows = root.mmio_windows();
    let hole = PCI_MMIO32_START + 0x10_0000;
    assert_eq!(mmio_read(&mut windows, hole, 4), 0xffff_ffff);
    mmio_write(&mut windows, hole, &[1, 2, 3, 4]);
    let desc = [0x11; 64];
    let replies = [StoreKind::Enqcmd, StoreKind::Enqcmds, StoreKind::Movdir64b]
        .map(|kind| mmio_store64(&mut windows, hole, &desc, kind));
    assert_eq!(
        replies,
        [StoreReply::Retry, StoreReply::Retry, StoreReply::Accepted]
    );
    // An access that starts in BAR0 and runs past its end is unclaimed too.
    assert_eq!(
        mmio_read(&mut windows, PCI_MMIO32_START + BAR0_SIZE - 4, 8),
        u64::MAX
    );
    assert_eq!(
        mmio_store64(
            &mut windows,
            PCI_MMIO64_START + BAR2_SIZE - 32,
            &desc,
            StoreKind::Movdir64b
        ),
        StoreReply::Accepted
    );
    let fake = fake.lock().unwrap();
    assert!(fake.stores.is_empty(), "no store reached the device");
    assert!(fake.bar0.iter().all(|&b| b == 0), "no write reached BAR0");
}

#[test]
fn guest_moves_a_bar_and_disables_decode() {
    let (root, fake, bdf) = root_with_fake();
    let mut ecam = root.ecam();
    let mut windows = root.mmio_windows();
    fake.lock().unwrap().bar0[0..4].copy_from_slice(&[0x78, 0x56, 0x34, 0x12]);
    assert_eq!(mmio_read(&mut windows, PCI_MMIO32_START, 4), 0x1234_5678);

    let new_base = PCI_MMIO32_START + 0x80_0000;
    ecam_write32(&mut ecam, bdf, 0x10, new_base as u32);
    assert_eq!(mmio_read(&mut windows, new_base, 4), 0x1234_5678);
    assert_eq!(
        mmio_read(&mut windows, PCI_MMIO32_START, 4),
        0xffff_ffff,
        "old address no longer decodes"
    );

    // Memory space disabled: nothing decodes.
    ecam_write32(&mut ecam, bdf, 0x04, 0);
    assert_eq!(mmio_read(&mut windows, new_base, 4), 0xffff_ffff);
    assert_eq!(
        mmio_store64(&mut windows, new_base, &[0; 64], StoreKind::Enqcmd),
        StoreReply::Retry
    );
    ecam_write32(&mut ecam, bdf, 0x04, 0x2);
    assert_eq!(mmio_read(&mut windows, new_base, 4), 0x1234_5678);

    // The same move through the legacy ports.
    let mut io = root.config_io();
    cf8_select(&mut io, 0x8000_0010 | (u32::from(bdf.devfn()) << 8));
    io.write(
        u64::from(PCI_CONFIG_ADDRESS_PORT),
        4,
        &(PCI_MMIO32_START as u32 + 0x4000).to_le_bytes(),
    );
    assert_eq!(
        mmio_read(&mut windows, PCI_MMIO32_START + 0x4000, 4),
        0x1234_5678
    );
    assert_eq!(mmio_read(&mut windows, new_base, 4), 0xffff_ffff);
}

#[test]
fn bus_full_after_31_devices() {
    let root = PciRoot::new();
    for device in 1..32 {
        let bdf = root
            .add_device(Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        assert_eq!(bdf.device, device);
    }
    assert_eq!(
        root.add_device(Arc::new(Mutex::new(HostBridge::new()))),
        Err(PciRootError::BusFull)
    );
}

#[test]
fn bar_larger_than_the_window_is_refused() {
    let root = PciRoot::new();
    let mut big = FakeFunction::new();
    big.config = PciConfiguration::new(&PciHeader::default());
    big.config
        .add_bar(
            1,
            PCI_MMIO32_SIZE * 2,
            BarKind::Memory32 {
                prefetchable: false,
            },
        )
        .unwrap();
    let err = root.add_device(Arc::new(Mutex::new(big))).unwrap_err();
    assert_eq!(
        err.to_string(),
        "no room for BAR 1 (0x40000000 bytes) of 00:01.0 in the 32-bit MMIO window"
    );
    assert!(
        root.device(PciAddress::from_devfn(8)).is_none(),
        "not added"
    );
}

#[test]
fn concurrent_config_and_bar_accesses() {
    let (root, fake, bdf) = root_with_fake();
    fake.lock().unwrap().bar0[0..4].copy_from_slice(&[0x78, 0x56, 0x34, 0x12]);
    let mover = {
        let mut ecam = root.ecam();
        std::thread::spawn(move || {
            for i in 0..2000u32 {
                let base = PCI_MMIO32_START as u32 + (i % 2) * 0x1000;
                ecam_write32(&mut ecam, bdf, 0x10, base);
            }
            ecam_write32(&mut ecam, bdf, 0x10, PCI_MMIO32_START as u32);
        })
    };
    let mut windows = root.mmio_windows();
    for _ in 0..2000 {
        let v = mmio_read(&mut windows, PCI_MMIO32_START, 4);
        assert!(v == 0x1234_5678 || v == 0xffff_ffff, "read {v:#x}");
    }
    mover.join().unwrap();
    assert_eq!(mmio_read(&mut windows, PCI_MMIO32_START, 4), 0x1234_5678);
}
