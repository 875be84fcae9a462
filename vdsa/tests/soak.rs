//! The hostile soak: a guest that throws everything at the device. Random
//! register writes (commands, WQ and group configuration, MSI-X) between
//! descriptors of every opcode (and unknown ones), with sizes from 0 to
//! 2^32 - 1, addresses in RAM, across page boundaries, straddling RAM's end,
//! beyond RAM and non-canonical, batches of such descriptors and batches
//! whose list is the batch descriptor itself, through MOVDIR64B, ENQCMDS
//! and ENQCMD. Guest RAM outside the region the descriptors may name is a
//! canary, checked every few thousand operations and at the end; the
//! device must never panic or hang, and must still run a descriptor after
//! the storm: a MEMMOVE after every check, and at the end.
//!
//! `SOAK_OPS` sets the number of operations (default 10^6, what CI runs);
//! `SOAK_SEED` the random seed. Overnight:
//! `SOAK_OPS=100000000 cargo test --release -p vdsa --test soak -- --nocapture`

mod common;

use std::sync::Arc;
use std::time::Instant;

use testkit::{Canary, Rng, SoakSettings};

use bus::{StoreKind, StoreReply};
use common::*;
use pci::PciDevice;
use vdsa::descriptor::{flags, Descriptor, Opcode};
use vdsa::dma::IdentityDma;
use vdsa::regs::{layout, offset, SUPPORTED_OPS};
use vdsa::DsaConfig;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Far above 4 GiB, at no round address, so that no 32-bit value and no
/// small number in guest data (sizes, CRCs, counts) is an address in it.
const BASE: u64 = 0x3a5c_0000_0000;
const MIB: u64 = 1 << 20;
/// Canary RAM right below the region descriptors may name.
const CANARY_LOW: (u64, u64) = (BASE, MIB);
/// What descriptors may touch; its end is the end of RAM.
const PLAY: (u64, u64) = (BASE + MIB, 4 * MIB);
const RAM_END: u64 = PLAY.0 + PLAY.1;
/// Canary RAM after a 1 MiB hole above RAM's end.
const CANARY_HIGH: (u64, u64) = (RAM_END + MIB, MIB);
/// How often the canaries are compared.
const CHECK_EVERY: u64 = 4096;
/// Largest transfer the WQs accept (WQCFG max transfer size, log2).
const MAX_XFER_SHIFT: u32 = 16;

fn in_canary(addr: u64) -> bool {
    [CANARY_LOW, CANARY_HIGH]
        .iter()
        .any(|&(start, len)| addr.wrapping_sub(start) < len + 64 * 1024)
        || addr
            .wrapping_add(u64::from(u32::MAX))
            .wrapping_sub(CANARY_LOW.0)
            < MIB
}

/// An address a hostile guest would name.
fn address(rng: &mut Rng) -> u64 {
    loop {
        let a = match rng.below(100) {
            0..=44 => PLAY.0 + rng.below(PLAY.1),
            // Straddling RAM's end, or just before it.
            45..=59 => RAM_END - 1 - rng.below(256),
            // Just beyond RAM.
            60..=67 => RAM_END + rng.below(4096),
            // Around a page boundary inside RAM.
            68..=79 => PLAY.0 + (1 + rng.below(PLAY.1 / 4096 - 1)) * 4096 - rng.below(64),
            // Non-canonical, huge, anything.
            80..=89 => rng.next(),
            90..=94 => rng.next() | 1 << 63,
            _ => rng.below(0x1_0000),
        };
        if !in_canary(a) {
            return a;
        }
    }
}

fn size(rng: &mut Rng) -> u32 {
    match rng.below(100) {
        0..=39 => rng.below(64) as u32,
        40..=69 => rng.below(4096) as u32,
        70..=89 => rng.below(1 << MAX_XFER_SHIFT) as u32,
        90..=94 => 0,
        _ => rng.next() as u32,
    }
}

/// A descriptor with a random opcode (now and then an unknown one), random
/// flags and every address-like field from [`address`].
fn descriptor(rng: &mut Rng) -> Descriptor {
    let mut d = Descriptor::default();
    let opcode = if rng.chance(5) {
        rng.next() as u8
    } else {
        SUPPORTED_OPS[rng.below(SUPPORTED_OPS.len() as u64) as usize] as u8
    };
    let flag_bits = if rng.chance(60) {
        flags::CRAV | flags::RCR | (rng.next() as u32 & 0x3ff & !0x7)
    } else {
        rng.next() as u32 & 0x00ff_ffff
    };
    // Dword 0: PASID and privilege; dword 1: flags (bits 23:0), opcode.
    d.set_u32(0, rng.next() as u32);
    d.set_u32(4, flag_bits | u32::from(opcode) << 24);
    d.set_completion_addr(address(rng))
        .set_src(address(rng))
        .set_dst(address(rng))
        .set_xfer_size(size(rng))
        .set_u16(0x24, rng.next() as u16);
    // Operation-specific fields: second destinations, delta records and
    // their sizes, patterns, CRC seeds.
    for at in [0x28, 0x30, 0x38] {
        let v = match rng.below(3) {
            0 => address(rng),
            1 => u64::from(size(rng)),
            _ => loop {
                let v = rng.next();
                if !in_canary(v) {
                    break v;
                }
            },
        };
        d.set_u64(at, v);
    }
    d
}

struct Soak {
    g: Guest,
    rng: Rng,
    canaries: [Canary; 2],
    accepted: u64,
    register_writes: u64,
    setups: u64,
}

impl Soak {
    fn new(seed: u64) -> Self {
        let mem = Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(CANARY_LOW.0), CANARY_LOW.1 as usize),
                (GuestAddress(PLAY.0), PLAY.1 as usize),
                (GuestAddress(CANARY_HIGH.0), CANARY_HIGH.1 as usize),
            ])
            .unwrap(),
        );
        let config = DsaConfig {
            interrupt_handles: false,
            ..DsaConfig::default()
        };
        let port = Arc::new(IdentityDma::new(mem.clone()));
        let g = Guest::new(config, port, mem);
        let canaries = [
            Canary::new(CANARY_LOW.0, pattern(CANARY_LOW.1 as usize, 0xc0ffee)),
            Canary::new(CANARY_HIGH.0, pattern(CANARY_HIGH.1 as usize, 0xbadf00d)),
        ];
        for canary in &canaries {
            g.fill(canary.start(), canary.expected());
        }
        g.fill(PLAY.0, &pattern(PLAY.1 as usize, seed as u32));
        let mut soak = Self {
            g,
            rng: Rng::new(seed.wrapping_mul(2).wrapping_add(1)),
            canaries,
            accepted: 0,
            register_writes: 0,
            setups: 0,
        };
        soak.setup();
        soak
    }

    /// Reset, then WQ 0 dedicated (no PASID) and WQ 1 shared, each in a
    /// group with one engine, by polling (random writes may have masked
    /// the command interrupt).
    fn setup(&mut self) {
        let g = &mut self.g;
        g.enable_pci();
        g.enable_msix();
        g.enable_pasid_pri_ats();
        // A garbage command may still be running (a CMD write while one is
        // active is ignored): wait for it, then reset until the reset took.
        let start = Instant::now();
        while g.read32(offset::CMDSTS) & (1 << 31) != 0 {
            assert!(
                start.elapsed() < TIMEOUT,
                "a garbage command never finished"
            );
            std::thread::yield_now();
        }
        let mut tries = 0;
        while g.command_polled(5, 0, false) & 0xff != 0 || g.read32(offset::GENSTS) & 3 != 0 {
            tries += 1;
            assert!(
                tries < 100,
                "reset never took: GENSTS {:#x}",
                g.read32(offset::GENSTS)
            );
        }
        g.write32(offset::GENCTRL, 0b11);
        // The reset put every configuration register back to its default.
        let specs = [WqSpec::dedicated(0, 0), WqSpec::shared(1, 1)];
        for spec in &specs {
            g.write_wq(spec);
            g.write32(g.wqcfg(spec.wq, 3), MAX_XFER_SHIFT | (10 << 5));
        }
        for spec in &specs {
            let at = g.grpcfg(spec.group);
            g.write64(at, 1 << spec.wq);
            g.write64(at + 32, 1 << spec.group);
        }
        assert_eq!(g.command_polled(1, 0, false) & 0xff, 0, "enable device");
        for spec in &specs {
            assert_eq!(
                g.command_polled(6, spec.wq as u32, false) & 0xff,
                0,
                "enable WQ"
            );
        }
        self.setups += 1;
    }

    fn register_write(&mut self) {
        let rng = &mut self.rng;
        let at = match rng.below(4) {
            0 => offset::CMD,
            1 => layout::WQCFG + rng.below(2 * 64),
            2 => layout::GRPCFG + rng.below(2 * 64),
            _ => rng.below(layout::BAR0_SIZE),
        };
        let len = [1usize, 2, 4, 8][rng.below(4) as usize];
        let value = rng.next().to_le_bytes();
        self.g
            .dsa
            .bar_write(0, at & !(len as u64 - 1), &value[..len]);
        let mut back = [0u8; 8];
        self.g
            .dsa
            .bar_read(0, self.rng.below(layout::BAR0_SIZE) & !7, &mut back);
        self.register_writes += 1;
    }

    /// Writes `count` descriptors at `list` and returns a batch of them;
    /// one time in ten the batch's list is the batch descriptor itself.
    fn batch(&mut self) -> Descriptor {
        let count = self.rng.below(40) as u32;
        let list = PLAY.0 + self.rng.below(PLAY.1 / 64 - 64) * 64;
        for i in 0..u64::from(count.min(32)) {
            let member = descriptor(&mut self.rng);
            self.g.fill(list + i * 64, &member.0);
        }
        let mut batch = Descriptor::new(Opcode::Batch, flags::CRAV | flags::RCR);
        batch
            .set_completion_addr(address(&mut self.rng))
            .set_src(list)
            .set_xfer_size(count);
        if self.rng.chance(10) {
            batch.set_src(list);
            self.g.fill(list, &batch.0);
        }
        batch
    }

    fn submit(&mut self) {
        let desc = if self.rng.chance(10) {
            self.batch()
        } else {
            descriptor(&mut self.rng)
        };
        let reply = match self.rng.below(3) {
            0 => self
                .g
                .submit(0, self.rng.chance(50), &desc, StoreKind::Movdir64b),
            1 => self
                .g
                .submit(1, self.rng.chance(50), &desc, StoreKind::Enqcmds),
            _ => self
                .g
                .submit(1, self.rng.chance(50), &desc, StoreKind::Enqcmd),
        };
        if reply == StoreReply::Accepted {
            self.accepted += 1;
        }
    }

    /// After a fresh setup (nothing else queued or running), a MEMMOVE in
    /// RAM must complete and copy.
    fn probe(&mut self, ops: u64) {
        self.setup();
        let (src, dst, record) = (PLAY.0 + 0x1000, PLAY.0 + 0x2000, PLAY.0 + 0x3000);
        let data = pattern(256, ops as u32);
        self.g.fill(src, &data);
        self.g.fill(record, &[0; 32]);
        let mut d = Descriptor::new(Opcode::Memmove, flags::CRAV | flags::RCR);
        d.set_completion_addr(record)
            .set_src(src)
            .set_dst(dst)
            .set_xfer_size(256);
        self.g.movdir64b(0, &d);
        assert_eq!(self.g.wait_cr(record)[0], 1, "after {ops} operations");
        assert_eq!(self.g.bytes(dst, 256), data, "after {ops} operations");
    }

    fn check_canaries(&self, ops: u64) {
        for canary in &self.canaries {
            let now = self.g.bytes(canary.start(), canary.expected().len());
            canary.check(&now, ops);
        }
    }
}

#[test]
fn hostile_soak() {
    let SoakSettings { ops, seed } = SoakSettings::from_env(0x05ee_dd5a);
    let start = Instant::now();
    let mut soak = Soak::new(seed);
    let mut dirty = false;
    for op in 1..=ops {
        if soak.rng.chance(2) {
            soak.register_write();
            dirty = true;
        } else {
            soak.submit();
        }
        if op % 256 == 0 && dirty {
            soak.setup();
            dirty = false;
        }
        if op % CHECK_EVERY == 0 {
            soak.check_canaries(op);
            soak.probe(op);
            dirty = false;
        }
    }
    // A reset stops everything queued; then the last look at the canaries
    // and a descriptor that must still work.
    soak.probe(ops);
    soak.check_canaries(ops);
    println!(
        "vdsa soak: {ops} operations (seed {seed:#x}): {} descriptors accepted, {} register \
         writes, {} re-setups, in {:.1} s",
        soak.accepted,
        soak.register_writes,
        soak.setups,
        start.elapsed().as_secs_f64()
    );
}
