// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Translation costs: IOTLB hit, first-stage walk on a miss, and a 1 MiB DMA through
//! translation against a plain copy into guest memory. Prints the ratios at the end.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use criterion::Criterion;
use viommu::paging::{self, entry, AccessType, PagingLevels, WalkConfig, PAGE_SIZE_4K};
use viommu::PasidTag;
use vm_memory::{Bytes, GuestAddress};

const PASID: u32 = 5;
const TAG: Option<PasidTag> = Some(PasidTag {
    pasid: PASID,
    privileged: false,
});
/// Pages mapped for the miss benchmark: twice the IOTLB capacity, so cycling through them
/// never hits.
const MISS_PAGES: u64 = 16384;
const VA_BASE: u64 = 0x7f00_0000_0000;
/// 1 MiB buffer: guest-physical destination and its user mapping.
const BUF_PA: u64 = 0x100_0000;
const BUF_VA: u64 = 0x7e00_0000_0000;
/// The same frames mapped in reverse page order: no two neighbouring pages are physically
/// contiguous, as in a long-running process.
const SCATTERED_VA: u64 = 0x7d00_0000_0000;
const MIB: usize = 1 << 20;
/// Samples criterion takes per benchmark (the last ones recorded are the measurement).
const SAMPLES_PER_BENCH: usize = 10;

/// Per-iteration times measured inside criterion's sampling, per benchmark.
static SAMPLES: Mutex<BTreeMap<&'static str, Vec<f64>>> = Mutex::new(BTreeMap::new());

fn timed(name: &'static str, iters: u64, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    let elapsed = start.elapsed();
    SAMPLES
        .lock()
        .unwrap()
        .entry(name)
        .or_default()
        .push(elapsed.as_nanos() as f64 / iters as f64);
    elapsed
}

fn median(name: &str) -> f64 {
    let mut v = SAMPLES
        .lock()
        .unwrap()
        .get(name)
        .cloned()
        .unwrap_or_default();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn setup() -> (Guest, u64) {
    let mut g = Guest::new();
    let mem = g.mem.clone();
    let mut pt = page_tables(&mem, PagingLevels::Four, TABLES_A);
    for i in 0..MISS_PAGES {
        pt.map(
            VA_BASE + i * PAGE_SIZE_4K,
            0x80_0000 + (i % 256) * PAGE_SIZE_4K,
            PAGE_SIZE_4K,
            entry::WRITABLE | entry::USER,
        )
        .unwrap();
    }
    let pages = MIB as u64 / PAGE_SIZE_4K;
    let flags = entry::WRITABLE | entry::USER;
    for i in 0..pages {
        let va = i * PAGE_SIZE_4K;
        pt.map(BUF_VA + va, BUF_PA + va, PAGE_SIZE_4K, flags)
            .unwrap();
        let frame = BUF_PA + (pages - 1 - i) * PAGE_SIZE_4K;
        pt.map(SCATTERED_VA + va, frame, PAGE_SIZE_4K, flags)
            .unwrap();
    }
    let pgd = pt.root();
    g.set_context(RID, ContextFlags::default());
    g.set_pasid_entry(RID, PASID, first_level_entry(pgd, 1, false, false));
    (g, pgd)
}

fn main() {
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(SAMPLES_PER_BENCH)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    let (g, pgd) = setup();
    let read = AccessType::READ;

    c.bench_function("iotlb_hit", |b| {
        g.iommu.translate(DEV, TAG, VA_BASE, read).unwrap();
        b.iter_custom(|iters| {
            timed("iotlb_hit", iters, || {
                black_box(
                    g.iommu
                        .translate(DEV, TAG, black_box(VA_BASE), read)
                        .unwrap(),
                );
            })
        })
    });

    let cfg = WalkConfig::default();
    c.bench_function("first_stage_walk_4level", |b| {
        let mut i = 0u64;
        b.iter_custom(|iters| {
            timed("walk", iters, || {
                i = (i + 1) % MISS_PAGES;
                let va = VA_BASE + i * PAGE_SIZE_4K;
                black_box(paging::walk(&*g.mem, pgd, va, read.as_user(), &cfg).unwrap());
            })
        })
    });

    c.bench_function("iotlb_miss_translate_4level", |b| {
        let mut i = 0u64;
        b.iter_custom(|iters| {
            timed("miss", iters, || {
                i = (i + 1) % MISS_PAGES;
                let va = VA_BASE + i * PAGE_SIZE_4K;
                black_box(g.iommu.translate(DEV, TAG, va, read).unwrap());
            })
        })
    });

    let data = vec![0x5au8; MIB];
    let mut out = vec![0u8; MIB];
    g.iommu.dma_write(DEV, TAG, BUF_VA, &data).unwrap();
    c.bench_function("dma_write_1MiB_translated", |b| {
        b.iter_custom(|iters| {
            timed("dma_write", iters, || {
                g.iommu
                    .dma_write(DEV, TAG, BUF_VA, black_box(&data))
                    .unwrap();
            })
        })
    });
    g.iommu.dma_write(DEV, TAG, SCATTERED_VA, &data).unwrap();
    c.bench_function("dma_write_1MiB_translated_scattered", |b| {
        b.iter_custom(|iters| {
            timed("dma_write_scattered", iters, || {
                g.iommu
                    .dma_write(DEV, TAG, SCATTERED_VA, black_box(&data))
                    .unwrap();
            })
        })
    });
    c.bench_function("write_1MiB_plain", |b| {
        b.iter_custom(|iters| {
            timed("plain_write", iters, || {
                g.mem
                    .write_slice(black_box(&data), GuestAddress(BUF_PA))
                    .unwrap();
            })
        })
    });
    c.bench_function("dma_read_1MiB_translated", |b| {
        b.iter_custom(|iters| {
            timed("dma_read", iters, || {
                g.iommu
                    .dma_read(DEV, TAG, BUF_VA, black_box(&mut out))
                    .unwrap();
            })
        })
    });
    c.bench_function("read_1MiB_plain", |b| {
        b.iter_custom(|iters| {
            timed("plain_read", iters, || {
                g.mem
                    .read_slice(black_box(&mut out), GuestAddress(BUF_PA))
                    .unwrap();
            })
        })
    });
    c.final_summary();

    println!("\nviommu figures (median per operation, same run):");
    println!(
        "  IOTLB hit:                     {:8.1} ns (target < 20 ns)",
        median("iotlb_hit")
    );
    println!("  4-level first-stage walk:      {:8.1} ns", median("walk"));
    println!(
        "  IOTLB miss through the unit:   {:8.1} ns (target < 200 ns)",
        median("miss")
    );
    let (dw, pw) = (median("dma_write"), median("plain_write"));
    let ds = median("dma_write_scattered");
    let (dr, pr) = (median("dma_read"), median("plain_read"));
    println!("  1 MiB DMA write translated:    {:8.1} us vs plain {:.1} us -> {:.2}x of plain speed (target >= 0.9x)",
        dw / 1e3, pw / 1e3, pw / dw);
    println!(
        "  1 MiB DMA write, 4 KiB frames scattered: {:.1} us -> {:.2}x of plain speed",
        ds / 1e3,
        pw / ds
    );
    println!(
        "  1 MiB DMA read translated:     {:8.1} us vs plain {:.1} us -> {:.2}x of plain speed",
        dr / 1e3,
        pr / 1e3,
        pr / dr
    );
}
