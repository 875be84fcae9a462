//! A guest system call on this platform's KVM, completed by the VMM at the
//! #PF entry (docs/pvm-backend.md §5.A), against the cheapest exit there is,
//! a user-mode port-I/O write. Each sample is a whole micro-guest run, so
//! both sides carry the same machine set-up; compare the slopes (per call)
//! printed at the end, as a ratio.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use microguest::demos::{port_io_round_trips, syscall_round_trips, SYSCALL_RESULT};
use microguest::{MicroGuest, MicroOptions};
use vmm::vm::RunExit;

const CALLS: u32 = 2000;

fn run(guest: MicroGuest, calls: u32) {
    let r = microguest::run(guest, MicroOptions::default()).expect("micro-guest machine");
    assert_eq!(r.exit, RunExit::TestExit(SYSCALL_RESULT | calls));
}

fn mean_time(build: fn(u32) -> MicroGuest, calls: u32, runs: u32) -> Duration {
    let start = Instant::now();
    for _ in 0..runs {
        run(build(calls), calls);
    }
    start.elapsed() / runs
}

fn syscall_vs_port_io(c: &mut Criterion) {
    let syscalls = |n| syscall_round_trips(n).unwrap();
    let ports = |n| port_io_round_trips(n).unwrap();
    let mut group = c.benchmark_group("user_round_trip");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    group.bench_function("port_io_x2000", |b| b.iter(|| run(ports(CALLS), CALLS)));
    group.bench_function("syscall_x2000", |b| b.iter(|| run(syscalls(CALLS), CALLS)));
    group.finish();

    // The per-call ratio, with the machine set-up (a run with 1 call)
    // subtracted from both, measured in one go.
    let runs = 5;
    let per_call = |build: fn(u32) -> MicroGuest| {
        let full = mean_time(build, CALLS, runs);
        let base = mean_time(build, 1, runs);
        full.saturating_sub(base).as_secs_f64() / f64::from(CALLS - 1)
    };
    let port = per_call(ports);
    let syscall = per_call(syscalls);
    println!(
        "per call: port I/O {:.1} us, system call {:.1} us, ratio {:.2}",
        port * 1e6,
        syscall * 1e6,
        syscall / port
    );
}

criterion_group!(benches, syscall_vs_port_io);
criterion_main!(benches);
