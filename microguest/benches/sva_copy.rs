//! What a user SVA copy costs through the vIOMMU against the same copy with
//! untranslated DMA: a micro-guest brings the vDSA up (with or without
//! scalable-mode translation) and at CPL3 submits one MEMMOVE after the
//! other with MOVDIR64B to a dedicated WQ, polling each completion record,
//! timing the loop with its TSC. Prints the translated/untranslated ratios
//! at the end.
//!
//! Criterion's times here are guest TSC ticks (reported as nanoseconds):
//! only their ratios mean anything across machines.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use criterion::Criterion;
use iced_x86::code_asm::*;
use microguest::driver::dsa::{memmove, DsaDriver, WqSetup};
use microguest::driver::kernel::SvaSetup;
use microguest::driver::{read_report, report, slot, store_bytes, GuestFailure};
use microguest::USER_STACK_TOP;
use microguest::{enter_user, exit_with, MicroGuest, MicroOptions, DATA_START};
use vdsa::completion::Status;
use vdsa::DsaConfig;
use vmm::sva::{dsa_placements, AccelConfig};
use vmm::vm::RunExit;

const SRC: u64 = DATA_START + 0x1_0000;
const DST: u64 = DATA_START + 0x4_0000;
const RECORD: u64 = DATA_START + 0x8_0000;
const DESCRIPTOR: u64 = DATA_START + 0x8_0040;
const DONE: u32 = 0xbe5a;
const SLOT_TICKS: usize = slot::USER;
const SLOT_LAST_STATUS: usize = slot::USER + 1;
const SAMPLES: usize = 10;

/// Guest TSC ticks for `copies` MEMMOVEs of `len` bytes.
fn run_copies(iommu: bool, len: u32, copies: u64) -> u64 {
    let accel = AccelConfig {
        iommu,
        dsa: vec![DsaConfig::default()],
    };
    let setup = SvaSetup {
        dsa_rid: dsa_placements(&accel.dsa)[0].bdf,
        pasid: 0x77,
        did: 1,
        iommu,
    };
    let dsa = DsaDriver::default();
    let mut g = MicroGuest::new();
    let a = &mut g.asm;
    setup
        .bring_up(a, &[WqSetup::dedicated(0, 0, setup.pasid)])
        .unwrap();
    store_bytes(a, DESCRIPTOR, &memmove(SRC, DST, len, RECORD, false).0).unwrap();
    let mut user = a.create_label();
    enter_user(a, user, USER_STACK_TOP).unwrap();
    a.set_label(&mut user).unwrap();
    let (mut next, mut wait, mut done) = (a.create_label(), a.create_label(), a.create_label());
    a.mov(r12, copies).unwrap();
    a.rdtsc().unwrap();
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.mov(r13, rax).unwrap();
    a.set_label(&mut next).unwrap();
    a.mov(rdi, RECORD).unwrap();
    a.mov(byte_ptr(rdi), 0).unwrap();
    dsa.movdir64b(a, 0, DESCRIPTOR).unwrap();
    a.mov(rdi, RECORD).unwrap();
    a.set_label(&mut wait).unwrap();
    a.cmp(byte_ptr(rdi), 0).unwrap();
    a.jne(done).unwrap();
    a.pause().unwrap();
    a.jmp(wait).unwrap();
    a.set_label(&mut done).unwrap();
    a.dec(r12).unwrap();
    a.jnz(next).unwrap();
    a.rdtsc().unwrap();
    a.shl(rdx, 32).unwrap();
    a.or(rax, rdx).unwrap();
    a.sub(rax, r13).unwrap();
    report(a, SLOT_TICKS, rax).unwrap();
    a.mov(rdi, RECORD).unwrap();
    a.movzx(eax, byte_ptr(rdi)).unwrap();
    report(a, SLOT_LAST_STATUS, rax).unwrap();
    exit_with(a, DONE).unwrap();
    let run = microguest::run(
        g,
        MicroOptions {
            accel,
            timeout: Duration::from_secs(120),
            ..Default::default()
        },
    )
    .expect("micro-guest machine");
    if let RunExit::TestExit(v) = run.exit {
        if let Some(f) = GuestFailure::decode(v) {
            panic!("guest check failed: {f:?}");
        }
    }
    assert_eq!(run.exit, RunExit::TestExit(DONE));
    assert_eq!(
        read_report(&run.memory, SLOT_LAST_STATUS),
        Status::Success as u64
    );
    read_report(&run.memory, SLOT_TICKS)
}

fn main() {
    microguest::require_kvm();
    let mut c = Criterion::default()
        .sample_size(SAMPLES)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    // Ticks per copy of each sample, by benchmark name.
    let per_copy: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::default();
    let mut group = c.benchmark_group("sva_memmove");
    for len in [0x1000u32, 0x1_0000] {
        for (name, iommu) in [("untranslated", false), ("viommu", true)] {
            let id = format!("{name}/{}KiB", len / 1024);
            group.bench_function(&id, |b| {
                b.iter_custom(|copies| {
                    let ticks = run_copies(iommu, len, copies);
                    per_copy
                        .lock()
                        .unwrap()
                        .entry(id.clone())
                        .or_default()
                        .push(ticks as f64 / copies as f64);
                    Duration::from_nanos(ticks)
                })
            });
        }
    }
    group.finish();
    c.final_summary();

    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let per_copy = per_copy.into_inner().unwrap();
    for len in ["4KiB", "64KiB"] {
        let get = |name: &str| {
            let samples = &per_copy[&format!("{name}/{len}")];
            median(&samples[samples.len().saturating_sub(SAMPLES)..])
        };
        let (plain, translated) = (get("untranslated"), get("viommu"));
        println!(
            "sva_memmove {len}: {plain:.0} ticks untranslated, {translated:.0} through the vIOMMU: \
             ratio {:.2}",
            translated / plain
        );
    }
}
