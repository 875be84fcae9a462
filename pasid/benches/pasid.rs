//! Benchmarks of the PASID crate, figures as ratios from one run:
//!
//! * guest PASID translation with every guest PASID installed
//!   (2^20 - 1 entries, PASID 0 being reserved) against a
//!   `HashMap<u32, u32>` holding the same mappings;
//! * host PASID alloc+free pairs per second;
//! * bytes per populated translation-table entry, from the structure.
//!
//! Run with `cargo bench -p pasid`.

use std::collections::HashMap;
use std::hint::black_box;
use std::mem::size_of;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use pasid::{OwnerId, PasidSpace, PasidTable, Scope, PASID_MAX};
use pci::PciAddress;

/// Guest PASIDs looked up, in a fixed pseudo-random order that defeats the
/// prefetcher equally for both structures.
const KEYS: usize = 4096;

/// Total time and iterations of every measured routine, by name, so that
/// the summary compares figures from this very run.
static TOTALS: Mutex<Vec<(&'static str, Duration, u64)>> = Mutex::new(Vec::new());

fn record(name: &'static str, elapsed: Duration, iters: u64) {
    let mut totals = TOTALS.lock().unwrap();
    match totals.iter_mut().find(|(n, _, _)| *n == name) {
        Some((_, total, count)) => {
            *total += elapsed;
            *count += iters;
        }
        None => totals.push((name, elapsed, iters)),
    }
}

/// Runs `op(i)` for `i` in `0..iters`, records the time under `name` and
/// returns it to criterion.
#[inline(always)]
fn timed(name: &'static str, iters: u64, mut op: impl FnMut(u64)) -> Duration {
    let start = Instant::now();
    for i in 0..iters {
        op(i);
    }
    let elapsed = start.elapsed();
    record(name, elapsed, iters);
    elapsed
}

fn keys() -> Vec<u32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..KEYS)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % u64::from(PASID_MAX)) as u32 + 1
        })
        .collect()
}

fn lookup(c: &mut Criterion) {
    let space = Arc::new(PasidSpace::new());
    let guest = space.add_owner("guest", None);
    let table = PasidTable::new(space, guest).unwrap();
    for gpasid in 1..=PASID_MAX {
        table.install(gpasid).unwrap();
    }
    let map: HashMap<u32, u32> = table.entries().into_iter().collect();
    let keys = keys();
    for &key in &keys {
        assert_eq!(table.translate(key).ok(), map.get(&key).copied());
    }

    let mut group = c.benchmark_group("lookup_2^20_entries");
    group.throughput(Throughput::Elements(1));
    group.bench_function("pasid_table", |b| {
        b.iter_custom(|iters| {
            timed("table", iters, |i| {
                let key = keys[i as usize % KEYS];
                let _ = black_box(table.translate(black_box(key)));
            })
        })
    });
    group.bench_function("hashmap_u32_u32", |b| {
        b.iter_custom(|iters| {
            timed("hashmap", iters, |i| {
                let key = keys[i as usize % KEYS];
                black_box(map.get(&black_box(key)));
            })
        })
    });
    group.finish();

    let table_bytes = table.memory_bytes() as f64 / f64::from(table.len());
    // hashbrown: one (u32, u32) slot and one control byte per bucket, with
    // buckets = capacity * 8 / 7.
    let buckets = map.capacity() * 8 / 7;
    let map_bytes = (buckets * (size_of::<(u32, u32)>() + 1)) as f64 / map.len() as f64;
    println!(
        "memory: PasidTable {table_bytes:.3} bytes per populated entry \
         ({} entries, {} leaves, {} bytes); HashMap<u32, u32> about {map_bytes:.1}",
        table.len(),
        table.leaves(),
        table.memory_bytes()
    );
}

fn alloc_free(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc_free_pair");
    group.throughput(Throughput::Elements(1));

    let empty = PasidSpace::new();
    group.bench_function("global_empty_space", |b| {
        b.iter_custom(|iters| {
            timed("alloc_empty", iters, |_| {
                let pasid = empty.alloc(OwnerId::VMM, Scope::Global).unwrap();
                empty
                    .free(OwnerId::VMM, Scope::Global, black_box(pasid))
                    .unwrap();
            })
        })
    });

    // Half the space taken at random, some of it by devices.
    let half = PasidSpace::new();
    let guest = half.add_owner("guest", None);
    let all: Vec<u32> = (0..PASID_MAX)
        .map(|_| half.alloc(guest, Scope::Global).unwrap())
        .collect();
    for (pasid, key) in all.iter().zip(keys().iter().cycle()) {
        if key % 2 == 0 {
            half.free(guest, Scope::Global, *pasid).unwrap();
        }
    }
    let rid = Scope::Device(PciAddress::new(0, 3, 0));
    for _ in 0..1000 {
        half.alloc(guest, rid).unwrap();
    }
    group.bench_function("global_half_full_space", |b| {
        b.iter_custom(|iters| {
            timed("alloc_half", iters, |_| {
                let pasid = half.alloc(OwnerId::VMM, Scope::Global).unwrap();
                half.free(OwnerId::VMM, Scope::Global, black_box(pasid))
                    .unwrap();
            })
        })
    });
    group.bench_function("device_half_full_space", |b| {
        b.iter_custom(|iters| {
            timed("alloc_device", iters, |_| {
                let pasid = half.alloc(OwnerId::VMM, rid).unwrap();
                half.free(OwnerId::VMM, rid, black_box(pasid)).unwrap();
            })
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    lookup(&mut c);
    alloc_free(&mut c);
    c.final_summary();

    let totals = TOTALS.lock().unwrap().clone();
    let summary = |name| {
        totals
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, total, iters)| total.as_nanos() as f64 / *iters as f64)
    };
    if let (Some(table), Some(map)) = (summary("table"), summary("hashmap")) {
        println!(
            "lookup: PasidTable {table:.2} ns, HashMap<u32, u32> {map:.2} ns: {:.1}x faster",
            map / table
        );
    }
    for (name, label) in [
        ("alloc_empty", "global, empty space"),
        ("alloc_half", "global, half-full space"),
        ("alloc_device", "device scope, half-full space"),
    ] {
        if let Some(ns) = summary(name) {
            println!(
                "alloc+free ({label}): {ns:.1} ns per pair, {:.1} M pairs/s",
                1e3 / ns
            );
        }
    }
}
