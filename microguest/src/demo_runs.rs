//! What `vmm micro` and `vmm bench` run and print: the built-in demos and
//! the benchmarks, on micro-guests. The command line only maps the
//! [`Outcome`] to an exit status.

use std::time::Duration;

use crate::demos::{self, DEMO_PASID};
use crate::sva_bench;
use crate::sva_demo;
use crate::MicroOptions;
use vmm::platform::Platform;
use vmm::sva::AccelConfig;
use vmm::vm::RunExit;

/// How a demo or benchmark ended (a VMM error is the `Err` beside it).
#[derive(Debug)]
pub enum Outcome {
    /// It ran and its result is right.
    Passed,
    /// It ran and its result is wrong (printed).
    Failed,
    /// The machine stopped otherwise (timeout, triple fault, a test-exit
    /// value other than the program's own).
    Stopped(RunExit),
}

impl Outcome {
    fn passed(ok: bool) -> Self {
        if ok {
            Outcome::Passed
        } else {
            Outcome::Failed
        }
    }
}

/// Assembles and runs a micro-guest; a failure to build or run it is the
/// line that says why.
fn run_micro<E: std::fmt::Display>(
    guest: Result<crate::MicroGuest, E>,
    options: MicroOptions,
) -> Result<crate::MicroRun, String> {
    guest
        .map_err(|e| e.to_string())
        .and_then(|g| crate::run(g, options).map_err(|e| e.to_string()))
}

/// `vmm micro sva-demo`: prints what the guest did and whether it is right.
pub fn sva_demo(timeout: Option<u64>, platform: Platform) -> Result<Outcome, String> {
    let program = sva_demo::program(true, 7);
    println!(
        "micro-guest: vIOMMU (VT-d scalable mode) + vDSA at 00:01.0 (8 WQs, 4 engines, 4 groups); \
         user process with guest PASID {:#x}",
        program.pasid
    );
    let options = MicroOptions {
        timeout: Duration::from_secs(timeout.unwrap_or(30)),
        platform,
        ..sva_demo::options(true)
    };
    let run = run_micro(sva_demo::sva_program(program), options)?;
    let (lines, ok) = sva_demo::describe(&run, &program);
    for line in lines {
        println!("{line}");
    }
    println!(
        "{}",
        if ok {
            "sva-demo: OK"
        } else {
            "sva-demo: FAILED"
        }
    );
    Ok(Outcome::passed(ok))
}

/// `vmm micro enqcmd-demo`: prints the #GP, the ENQCMD's answer and what
/// reached the test portal.
pub fn enqcmd_demo(
    timeout: Option<u64>,
    accel: AccelConfig,
    platform: Platform,
) -> Result<Outcome, String> {
    println!("micro-guest: user-mode ENQCMD with IA32_PASID clear, then retried after the guest's #GP handler loads PASID {DEMO_PASID:#x}");
    let options = MicroOptions {
        timeout: Duration::from_secs(timeout.unwrap_or(30)),
        accel,
        platform,
        ..Default::default()
    };
    let run = run_micro(demos::enqcmd_after_gp(), options)?;
    let RunExit::TestExit(result) = run.exit else {
        return Ok(Outcome::Stopped(run.exit));
    };
    let gps = (result >> 4) & 0xf;
    let zf = result & 1;
    println!(
        "guest: took {gps} #GP, ENQCMD returned ZF={zf} ({})",
        if zf == 0 { "accepted" } else { "retry" }
    );
    let stores = run
        .portal
        .stores
        .lock()
        .map(|s| s.clone())
        .unwrap_or_default();
    for s in &stores {
        let dword0 = u32::from_le_bytes([s.data[0], s.data[1], s.data[2], s.data[3]]);
        println!(
            "portal: {:?} at offset {:#x}, descriptor dword0 {dword0:#010x}: PASID {:#x}, privilege {}",
            s.kind,
            s.offset,
            dword0 & 0xf_ffff,
            dword0 >> 31
        );
    }
    let ok =
        gps == 1 && zf == 0 && stores.len() == 1 && stores[0].data[..4] == DEMO_PASID.to_le_bytes();
    println!(
        "{}",
        if ok {
            "ENQCMD trap demo: OK"
        } else {
            "ENQCMD trap demo: FAILED"
        }
    );
    Ok(Outcome::passed(ok))
}

/// `vmm bench`: `repeat` runs of the trap and accelerator benchmarks, each
/// printed, then a summary when there was more than one.
pub fn bench(
    iterations: u32,
    repeat: u32,
    accel: AccelConfig,
    platform: Platform,
) -> Result<Outcome, String> {
    let mut runs = Vec::new();
    for run in 1..=repeat {
        if repeat > 1 {
            println!("bench: run {run} of {repeat}");
        }
        if let Ok(load) = std::fs::read_to_string("/proc/loadavg") {
            let load: Vec<&str> = load.split_whitespace().take(3).collect();
            println!(
                "bench: host load average (1, 5, 15 min): {}",
                load.join(" ")
            );
        }
        match bench_once(iterations, accel.clone(), platform)? {
            Ok(figures) => runs.push(figures),
            Err(outcome) => return Ok(outcome),
        }
    }
    if repeat > 1 {
        for line in sva_bench::summary(&runs) {
            println!("{line}");
        }
    }
    Ok(Outcome::Passed)
}

/// What one benchmark run gives: its figures, or how it ended instead.
type BenchRun = Result<Result<sva_bench::RunFigures, Outcome>, String>;

/// One run of `vmm bench`: the trap benchmark, then the accelerator's.
fn bench_once(iterations: u32, accel: AccelConfig, platform: Platform) -> BenchRun {
    let per_round = (iterations / demos::BENCH_ROUNDS).max(1);
    let options = MicroOptions {
        timeout: Duration::from_secs(600),
        accel,
        platform,
        ..Default::default()
    };
    let run = run_micro(demos::trap_benchmark(per_round), options)?;
    if run.exit != RunExit::TestExit(0xbe) {
        return Ok(Err(Outcome::Stopped(run.exit)));
    }
    let result = demos::TrapBench::from_memory(&run.memory, per_round);
    let (pio, enq) = result.per_round_trip();
    println!(
        "bench: {} rounds of {per_round} round trips each, guest TSC ticks per round trip; \
         figures are min / median / max over the rounds",
        demos::BENCH_ROUNDS
    );
    println!("bench: bare port-I/O exit: {pio:.0}");
    println!("bench: trapped user ENQCMD: {enq:.0}");
    let test_portal = result.ratio();
    println!(
        "bench: ENQCMD / port-I/O ratio = {test_portal} (target <= {})",
        sva_bench::ENQCMD_TARGET
    );
    sva_bench(per_round, test_portal.median, platform)
}

/// The accelerator half of `vmm bench` (see [`crate::sva_bench`]).
fn sva_bench(per_round: u32, test_portal: f64, platform: Platform) -> BenchRun {
    let options = MicroOptions {
        platform,
        ..sva_bench::options()
    };
    let run = run_micro(sva_bench::program(per_round), options)?;
    if run.exit != RunExit::TestExit(sva_bench::DONE) {
        eprintln!("vmm: the accelerator benchmark ended with {:?}", run.exit);
        return Ok(Err(Outcome::Stopped(run.exit)));
    }
    let result = sva_bench::SvaBench::from_memory(&run.memory, per_round);
    if let Some(bad) = result
        .rounds
        .iter()
        .find(|r| r.status != vdsa::completion::Status::Success as u64)
    {
        eprintln!(
            "vmm: a benchmark MEMMOVE completed with status {:#x}",
            bad.status
        );
        return Ok(Err(Outcome::Failed));
    }
    let (issued, accepted) = result.submissions();
    let host = run.pasids.table().translate(sva_bench::PASID).ok();
    let tagged: Vec<String> = run
        .pasids
        .device_requests()
        .iter()
        .map(|&(rid, hpasid)| format!("{rid}/{hpasid:#x}"))
        .collect();
    println!(
        "bench: with the vIOMMU and a vDSA: guest PASID {:#x} -> host PASID {}; \
         DMA seen by the vIOMMU (function/host PASID): {}",
        sva_bench::PASID,
        host.map_or("none".into(), |h| format!("{h:#x}")),
        tagged.join(", ")
    );
    let shared_wq = result.enqcmd_spread();
    println!(
        "bench: ENQCMD to a shared WQ / port-I/O ratio = {shared_wq} (target <= {})",
        sva_bench::ENQCMD_TARGET
    );
    let memmove = result.memmove_spread();
    println!(
        "bench: 1 MiB MEMMOVE via a dedicated WQ, end to end = {memmove} of memcpy's throughput \
         (target >= {})",
        sva_bench::MEMMOVE_TARGET
    );
    let noops_per_second = (run.tsc_khz != 0).then(|| result.submissions_spread(run.tsc_khz));
    match noops_per_second {
        None => println!("bench: NOOPs per second: unknown (KVM did not give the TSC rate)"),
        Some(rate) => println!(
            "bench: NOOPs per second through a shared WQ (trapped ENQCMDs accepted, one vCPU) = \
             {rate:.0} ({accepted} of {issued} accepted)"
        ),
    }
    Ok(Ok(sva_bench::RunFigures {
        test_portal,
        shared_wq: shared_wq.median,
        memmove: memmove.median,
        noops_per_second: noops_per_second.map(|r| r.median),
    }))
}
