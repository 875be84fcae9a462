//! MEMMOVE through the vIOMMU's first-stage translation (a process's SVA
//! copy: PASID-tagged, ATS and page requests on) against memcpy of the same
//! buffers, a stream of MEMMOVEs kept in flight on 1, 2 and 4 engines, and NOOP
//! descriptors per second through a shared WQ.
//!
//! Besides criterion's own report, the run prints tables of ratios measured
//! in the same process, in interleaved rounds (min / median / max over the
//! rounds): on a shared machine only ratios mean something.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../viommu/tests/common/mod.rs"]
mod viommu_guest;

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bus::{StoreKind, StoreReply};
use common::{Guest, WqSpec};
use criterion::{criterion_group, BenchmarkId, Criterion, Throughput};
use pci::PciDevice;
use vdsa::descriptor::{flags, Descriptor, Opcode};
use vdsa::dma::{
    AddressSpace, DmaFault, DmaPort, FaultKind, IdentityDma, PageRequest, PasidTag, Translation,
};
use vdsa::portal::Portal;
use vdsa::DsaConfig;
use viommu::paging::builder::PageTableBuilder;
use viommu::paging::{entry, PagingLevels, PAGE_SIZE_4K};
use viommu::AccessType;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

const SIZES: [usize; 5] = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20];
const MIB: u64 = 1 << 20;
/// Guest memory: the vIOMMU's structures below 64 MiB, the process's
/// buffers above.
const MEM_SIZE: u64 = 128 * MIB;
/// The process's page tables.
const TABLES: u64 = 48 * MIB;
/// Where the buffers are, and where the process sees them (4 KiB pages).
const BUF_PA: u64 = 64 * MIB;
const BUF_VA: u64 = 0x7f12_0000_0000;
const BUF_LEN: u64 = 48 * MIB;
/// Offsets in the buffer area.
const SRC: u64 = 0;
const DST: u64 = 16 * MIB;
const RECORDS: u64 = 32 * MIB;
/// Destinations of the copies in flight, 1 MiB each.
const IN_FLIGHT_DST: u64 = 33 * MIB;
const IN_FLIGHT: usize = 8;
const IN_FLIGHT_LEN: usize = 1 << 20;
/// MEMMOVEs completed per measurement of the stream.
const STREAMED: usize = 64;
const PASID: u32 = 5;
const RID: u16 = viommu_guest::RID;
const DEV: pci::PciAddress = viommu_guest::DEV;
/// Interleaved rounds of the ratio tables.
const ROUNDS: usize = 7;

/// The vIOMMU as the device's port, as the VMM's adapter uses it.
struct ViommuPort {
    g: viommu_guest::Guest,
    direct: IdentityDma<Arc<GuestMemoryMmap>>,
}

fn guest_tag(tag: Option<PasidTag>) -> Option<viommu::PasidTag> {
    tag.map(|t| viommu::PasidTag {
        pasid: t.pasid,
        privileged: t.privileged,
    })
}

fn failed(done: usize, addr: u64, write: bool) -> DmaFault {
    DmaFault {
        done,
        addr,
        write,
        kind: FaultKind::TranslationError,
    }
}

impl DmaPort for ViommuPort {
    fn read(&self, space: AddressSpace, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        match space {
            AddressSpace::Translated => self.direct.read(space, addr, buf),
            AddressSpace::Untranslated(tag) => self
                .g
                .iommu
                .dma_read(DEV, guest_tag(tag), addr, buf)
                .map_err(|e| failed(e.completed, e.address, false)),
        }
    }

    fn write(&self, space: AddressSpace, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        match space {
            AddressSpace::Translated => self.direct.write(space, addr, data),
            AddressSpace::Untranslated(tag) => self
                .g
                .iommu
                .dma_write(DEV, guest_tag(tag), addr, data)
                .map_err(|e| failed(e.completed, e.address, true)),
        }
    }

    fn copy(&self, space: AddressSpace, src: u64, dst: u64, len: usize) -> Result<(), DmaFault> {
        match space {
            AddressSpace::Translated => self.direct.copy(space, src, dst, len),
            AddressSpace::Untranslated(tag) => self
                .g
                .iommu
                .dma_copy(DEV, guest_tag(tag), src, dst, len)
                .map_err(|e| failed(e.error.completed, e.error.address, e.write)),
        }
    }

    fn translate(
        &self,
        pasid: Option<PasidTag>,
        addr: u64,
    ) -> Option<Result<Translation, DmaFault>> {
        let ask = |write| {
            let access = AccessType {
                write,
                user: true,
                execute: false,
            };
            self.g
                .iommu
                .ats_translate(DEV, guest_tag(pasid), addr, access)
        };
        let answer = match ask(true) {
            Ok(c) if !c.read => ask(false),
            other => other,
        };
        Some(
            answer
                .map(|c| Translation {
                    addr: c.translated_addr,
                    size: c.size,
                    read: c.read,
                    write: c.write,
                })
                .map_err(|_| failed(0, addr, false)),
        )
    }

    fn page_request(&self, request: PageRequest) {
        panic!("every buffer is mapped: unexpected {request:?}");
    }
}

/// A vIOMMU with the process's buffers mapped for PASID [`PASID`].
fn port() -> (Arc<ViommuPort>, Arc<GuestMemoryMmap>) {
    let mut g = viommu_guest::Guest::bare_sized(MEM_SIZE);
    g.linux_init(1);
    let mem = g.mem.clone();
    let mut pt = PageTableBuilder::new(&*mem, PagingLevels::Four, TABLES, TABLES + 4 * MIB)
        .expect("table area");
    for page in 0..BUF_LEN / PAGE_SIZE_4K {
        let off = page * PAGE_SIZE_4K;
        pt.map(
            BUF_VA + off,
            BUF_PA + off,
            PAGE_SIZE_4K,
            entry::WRITABLE | entry::USER,
        )
        .expect("map");
    }
    let root = pt.root();
    g.set_context(RID, viommu_guest::ContextFlags::default());
    g.set_pasid_entry(
        RID,
        PASID,
        viommu_guest::first_level_entry(root, 1, false, false),
    );
    let direct = IdentityDma::new(mem.clone());
    (Arc::new(ViommuPort { g, direct }), mem)
}

/// A device with a dedicated WQ 0 (PASID [`PASID`]) and a shared WQ 1 in
/// group 0, which has `engines` engines.
fn device(port: &Arc<ViommuPort>, mem: &Arc<GuestMemoryMmap>, engines: u32) -> Guest {
    let config = DsaConfig {
        num_engines: 4,
        ..DsaConfig::default()
    };
    let mut g = Guest::new(config, port.clone(), mem.clone());
    g.enable_pci();
    g.enable_pasid_pri_ats();
    g.setup_engines(
        &[
            WqSpec {
                pasid_en: true,
                pasid: PASID,
                ..WqSpec::dedicated(0, 0)
            },
            WqSpec {
                size: 64,
                threshold: 64,
                ..WqSpec::shared(1, 0)
            },
        ],
        |_| (1 << engines) - 1,
    );
    g
}

fn va(off: u64) -> u64 {
    BUF_VA + off
}

fn record(slot: usize) -> u64 {
    RECORDS + 64 * slot as u64
}

fn memmove_desc(src: u64, dst: u64, len: usize, slot: usize) -> Descriptor {
    let mut d = Descriptor::new(Opcode::Memmove, flags::CRAV | flags::RCR);
    d.set_completion_addr(va(record(slot)))
        .set_src(va(src))
        .set_dst(va(dst))
        .set_xfer_size(len as u32);
    d
}

/// Polls a completion record's status like a client would, yielding the
/// CPU between polls (the machines this runs on have two shared cores).
fn wait_status(g: &Guest, slot: usize) {
    let at = GuestAddress(BUF_PA + record(slot));
    while g.mem.read_obj::<u8>(at).unwrap() == 0 {
        std::thread::yield_now();
    }
    assert_eq!(g.mem.read_obj::<u8>(at).unwrap(), 1, "completion status");
}

fn clear_status(g: &Guest, slot: usize) {
    g.mem
        .write_obj(0u8, GuestAddress(BUF_PA + record(slot)))
        .unwrap();
}

fn submit_dwq(g: &mut Guest, d: &Descriptor) {
    g.dsa
        .bar_store64(2, Portal::offset(0, true), &d.0, StoreKind::Movdir64b);
}

/// Submits MEMMOVEs on the dedicated WQ, then waits for all of them.
fn memmoves(g: &mut Guest, descs: &[Descriptor]) {
    for slot in 0..descs.len() {
        clear_status(g, slot);
    }
    for d in descs {
        submit_dwq(g, d);
    }
    for slot in 0..descs.len() {
        wait_status(g, slot);
    }
}

/// Keeps `descs.len()` MEMMOVEs in flight on the dedicated WQ, as a client
/// with a ring of completion records does: each one that completes is
/// submitted again, until `count` have completed.
fn stream(g: &mut Guest, descs: &[Descriptor], count: usize) {
    let n = descs.len();
    for (slot, d) in descs.iter().enumerate() {
        clear_status(g, slot);
        submit_dwq(g, d);
    }
    for i in 0..count {
        let slot = i % n;
        wait_status(g, slot);
        if i + n < count {
            clear_status(g, slot);
            submit_dwq(g, &descs[slot]);
        }
    }
}

/// memcpy between the same guest buffers the device copies.
fn memcpy(mem: &GuestMemoryMmap, src: u64, dst: u64, len: usize) {
    let slice = |off: u64, access| {
        mem.get_slices(GuestAddress(BUF_PA + off), len, access)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
    };
    slice(src, Permissions::Read).copy_to_volatile_slice(slice(dst, Permissions::Write));
}

/// `count` NOOPs through the shared WQ (retrying on a full queue), the
/// last one with a completion record to wait for.
fn noops(g: &mut Guest, count: usize) {
    let mut quiet = Descriptor::new(Opcode::Noop, 0);
    quiet.set_pasid(PASID, false);
    let mut last = Descriptor::new(Opcode::Noop, flags::CRAV | flags::RCR);
    last.set_completion_addr(va(record(0)))
        .set_pasid(PASID, false);
    clear_status(g, 0);
    let portal = Portal::offset(1, true);
    for i in 0..count {
        let d = if i + 1 == count { &last } else { &quiet };
        while g.dsa.bar_store64(2, portal, &d.0, StoreKind::Enqcmds) == StoreReply::Retry {
            std::thread::yield_now();
        }
    }
    wait_status(g, 0);
}

/// Mean time of `f` over at least `budget` (and 3 calls), after one call.
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

/// Min, median and max.
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

fn in_flight_descs() -> Vec<Descriptor> {
    (0..IN_FLIGHT)
        .map(|i| {
            let dst = IN_FLIGHT_DST + (i * IN_FLIGHT_LEN) as u64;
            memmove_desc(SRC, dst, IN_FLIGHT_LEN, i)
        })
        .collect()
}

fn benches(c: &mut Criterion) {
    let (port, mem) = port();
    let mut g = device(&port, &mem, 1);
    let mut group = c.benchmark_group("memmove_viommu");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    for len in SIZES {
        group.throughput(Throughput::Bytes(len as u64));
        let desc = [memmove_desc(SRC, DST, len, 0)];
        group.bench_with_input(BenchmarkId::new("dsa", len), &len, |b, _| {
            b.iter(|| memmoves(&mut g, &desc))
        });
        group.bench_with_input(BenchmarkId::new("memcpy", len), &len, |b, _| {
            b.iter(|| memcpy(&mem, SRC, DST, black_box(len)))
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
    drop(g);

    let descs = in_flight_descs();
    let mut group = c.benchmark_group("memmove_in_flight");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .throughput(Throughput::Bytes((STREAMED * IN_FLIGHT_LEN) as u64));
    for engines in [1, 2, 4] {
        let mut g = device(&port, &mem, engines);
        group.bench_with_input(
            BenchmarkId::new(format!("{IN_FLIGHT} x 1 MiB"), engines),
            &engines,
            |b, _| b.iter(|| stream(&mut g, &descs, STREAMED)),
        );
    }
    group.finish();

    tables(&port, &mem);
}

/// The ratio tables, from interleaved rounds.
fn tables(port: &Arc<ViommuPort>, mem: &Arc<GuestMemoryMmap>) {
    let budget = Duration::from_millis(60);
    let mut g = device(port, mem, 1);
    println!(
        "\nMEMMOVE through the vIOMMU (PASID, first-stage 4 KiB pages, ATS) vs memcpy of the \
         same buffers; speed = memcpy time / dsa time, min / median / max of {ROUNDS} rounds"
    );
    println!(
        "{:>10} {:>12} {:>12} {:>10} {:>20}",
        "size", "dsa", "memcpy", "dsa GB/s", "speed"
    );
    for len in SIZES {
        let desc = [memmove_desc(SRC, DST, len, 0)];
        let (mut dsa, mut host, mut speed) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let d = per_iteration(|| memmoves(&mut g, &desc), budget).as_secs_f64();
            let h = per_iteration(|| memcpy(mem, SRC, DST, len), budget).as_secs_f64();
            dsa.push(d);
            host.push(h);
            speed.push(h / d);
        }
        let (d, h) = (spread(dsa).1, spread(host).1);
        let (lo, mid, hi) = spread(speed);
        println!(
            "{:>10} {:>10.1}us {:>10.1}us {:>10.2} {:>6.2} {:>6.2} {:>6.2}",
            len,
            d * 1e6,
            h * 1e6,
            len as f64 / d / 1e9,
            lo,
            mid,
            hi
        );
    }
    let mut rates = Vec::new();
    for _ in 0..ROUNDS {
        let count = 20_000;
        let start = Instant::now();
        noops(&mut g, count);
        rates.push(count as f64 / start.elapsed().as_secs_f64());
    }
    let (lo, mid, hi) = spread(rates);
    println!(
        "NOOPs through a shared WQ (ENQCMDS, one engine): {lo:.0} / {mid:.0} / {hi:.0} \
         descriptors/s"
    );
    drop(g);

    let descs = in_flight_descs();
    let bytes = (STREAMED * IN_FLIGHT_LEN) as f64;
    println!(
        "\n{STREAMED} MEMMOVEs of 1 MiB with {IN_FLIGHT} kept in flight on a dedicated WQ, by \
         engines in the group; GB/s min / median / max of {ROUNDS} rounds; speed = memcpy of \
         the same bytes on one thread / dsa"
    );
    println!(
        "{:>8} {:>22} {:>8} {:>10}",
        "engines", "GB/s", "speed", "vs 1"
    );
    let mut first = None;
    for engines in [1, 2, 4] {
        let mut g = device(port, mem, engines);
        let (mut rate, mut speed) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            let d = per_iteration(|| stream(&mut g, &descs, STREAMED), budget).as_secs_f64();
            let h = per_iteration(
                || {
                    for i in 0..STREAMED {
                        let dst = IN_FLIGHT_DST + ((i % IN_FLIGHT) * IN_FLIGHT_LEN) as u64;
                        memcpy(mem, SRC, dst, IN_FLIGHT_LEN);
                    }
                },
                budget,
            )
            .as_secs_f64();
            rate.push(bytes / d / 1e9);
            speed.push(h / d);
        }
        let (lo, mid, hi) = spread(rate);
        let base = *first.get_or_insert(mid);
        println!(
            "{:>8} {:>6.2} {:>6.2} {:>6.2} {:>8.2} {:>10.2}",
            engines,
            lo,
            mid,
            hi,
            spread(speed).1,
            mid / base
        );
    }
}

criterion_group!(dsa, benches);

fn main() {
    dsa();
    Criterion::default().configure_from_args().final_summary();
}
