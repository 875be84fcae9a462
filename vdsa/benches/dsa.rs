//! MEMMOVE through identity DMA against host memcpy, and NOOP descriptors
//! per second through a shared WQ.
//!
//! Besides criterion's own report, the run prints one table of ratios
//! (device time / memcpy time) measured in the same process.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Guest, WqSpec};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use pci::{PciDevice, StoreKind, StoreReply};
use vdsa::descriptor::{flags, Descriptor, Opcode};
use vdsa::dma::{AddressSpace, DmaPort, IdentityDma};
use vdsa::portal::Portal;
use vdsa::DsaConfig;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const SIZES: [usize; 5] = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20];
const SRC: u64 = 0x100_0000;
const DST: u64 = 0x200_0000;
const CR: u64 = 0x1000;

fn guest() -> Guest {
    let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap());
    let mut g = Guest::new(
        DsaConfig::default(),
        Arc::new(IdentityDma::new(mem.clone())),
        mem,
    );
    g.enable_pci();
    g.enable_pasid_pri_ats();
    g.setup(&[
        WqSpec::dedicated(0, 0),
        WqSpec {
            size: 64,
            threshold: 64,
            ..WqSpec::shared(1, 1)
        },
    ]);
    g
}

/// Polls the completion record status like a client would, yielding the
/// CPU between polls (the machines this runs on have two shared cores).
fn wait_status(g: &Guest) {
    while g.mem.read_obj::<u8>(GuestAddress(CR)).unwrap() == 0 {
        std::thread::yield_now();
    }
}

/// One MEMMOVE of `len` bytes on the dedicated WQ, waited for by polling
/// the completion record.
fn memmove(g: &mut Guest, desc: &Descriptor) {
    g.mem.write_obj(0u8, GuestAddress(CR)).unwrap();
    g.dsa
        .bar_store64(2, Portal::offset(0, true), &desc.0, StoreKind::Movdir64b);
    wait_status(g);
}

fn memmove_desc(len: usize) -> Descriptor {
    let mut d = Descriptor::new(Opcode::Memmove, flags::CRAV | flags::RCR);
    d.set_completion_addr(CR)
        .set_src(SRC)
        .set_dst(DST)
        .set_xfer_size(len as u32);
    d
}

/// `count` NOOPs through the shared WQ (retrying on a full queue), the
/// last one with a completion record to wait for.
fn noops(g: &mut Guest, count: usize) {
    let quiet = Descriptor::new(Opcode::Noop, 0);
    let mut last = Descriptor::new(Opcode::Noop, flags::CRAV | flags::RCR);
    last.set_completion_addr(CR);
    g.mem.write_obj(0u8, GuestAddress(CR)).unwrap();
    let portal = Portal::offset(1, true);
    for i in 0..count {
        let d = if i + 1 == count { &last } else { &quiet };
        while g.dsa.bar_store64(2, portal, &d.0, StoreKind::Enqcmds) == StoreReply::Retry {
            std::thread::yield_now();
        }
    }
    wait_status(g);
}

fn per_iteration(mut f: impl FnMut(), budget: Duration) -> Duration {
    f();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < budget || n < 3 {
        f();
        n += 1;
    }
    start.elapsed() / n
}

fn benches(c: &mut Criterion) {
    let mut g = guest();
    let mut group = c.benchmark_group("memmove");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for len in SIZES {
        group.throughput(Throughput::Bytes(len as u64));
        let desc = memmove_desc(len);
        group.bench_with_input(BenchmarkId::new("dsa", len), &len, |b, _| {
            b.iter(|| memmove(&mut g, &desc))
        });
        let src = vec![1u8; len];
        let mut dst = vec![0u8; len];
        group.bench_with_input(BenchmarkId::new("memcpy", len), &len, |b, _| {
            b.iter(|| dst.copy_from_slice(black_box(&src)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("noop_swq");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    group.throughput(Throughput::Elements(10_000));
    group.bench_function("10000 NOOPs via ENQCMDS", |b| {
        b.iter(|| noops(&mut g, 10_000))
    });
    group.finish();

    // One table of ratios from this run.
    println!(
        "\nMEMMOVE via identity DMA vs host memcpy (same run; speed = memcpy time / dsa time)"
    );
    println!(
        "{:>10} {:>12} {:>12} {:>12} {:>10} {:>8}",
        "size", "dsa", "memcpy", "guest copy", "dsa GB/s", "speed"
    );
    let port = IdentityDma::new(g.mem.clone());
    let space = AddressSpace::Untranslated(None);
    let budget = Duration::from_millis(400);
    for len in SIZES {
        let desc = memmove_desc(len);
        let dsa = per_iteration(|| memmove(&mut g, &desc), budget);
        let src = vec![1u8; len];
        let mut dst = vec![0u8; len];
        let host = per_iteration(|| dst.copy_from_slice(black_box(&src)), budget);
        // The same guest-to-guest copy, on this thread, without the device.
        let direct = per_iteration(|| port.copy(space, SRC, DST, len).unwrap(), budget);
        println!(
            "{:>10} {:>12?} {:>12?} {:>12?} {:>10.2} {:>8.2}",
            len,
            dsa,
            host,
            direct,
            len as f64 / dsa.as_secs_f64() / 1e9,
            host.as_secs_f64() / dsa.as_secs_f64()
        );
    }
    let count = 100_000;
    let start = Instant::now();
    noops(&mut g, count);
    let rate = count as f64 / start.elapsed().as_secs_f64();
    println!("NOOP through a shared WQ (ENQCMDS, one engine): {rate:.0} descriptors/s");
}

criterion_group!(dsa, benches);

fn main() {
    dsa();
    Criterion::default().configure_from_args().final_summary();
}
