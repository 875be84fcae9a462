//! The accelerator benchmark of `vmm bench`: one micro-guest on a machine
//! with the vIOMMU and one vDSA, whose user process (bound to the vDSA
//! through its own page tables, as SVA does) measures, in interleaved
//! rounds and with its TSC:
//!
//! - a batch of bare port-I/O exits (the unit every trap is compared to);
//! - a batch of ENQCMDs of NOOP descriptors to a shared WQ: each is trapped,
//!   its PASID translated from IA32_PASID through the guest-wide table, and
//!   handed to the portal (the submission round trip);
//! - a 1 MiB `rep movsb` in user mode, which runs natively: the host's memcpy;
//! - a 1 MiB MEMMOVE through a dedicated WQ: MOVDIR64B (trapped), the copy
//!   through the vIOMMU's first-stage translation, the completion record
//!   polled, end to end.

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use vdsa::descriptor::{Descriptor, Opcode};
use vdsa::DsaConfig;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::demos::{tsc_start, tsc_store, Spread};
use crate::driver::dsa::{memmove, wait_for_completion, DsaDriver, WqSetup};
use crate::driver::kernel::{BringUpError, SvaSetup};
use crate::driver::store_bytes;
use crate::{enter_user, exit_with, MicroGuest, MicroOptions, USER_STACK_TOP};
use vmm::sva::{dsa_placements, AccelConfig};

/// Rounds; each times one batch of every kind back to back.
pub const ROUNDS: u32 = 10;
/// Bytes of each copy.
pub const COPY_LEN: u32 = 1 << 20;
/// The process's guest PASID.
pub const PASID: u32 = 0x42;
/// What the guest writes to the test-exit port when it is done.
pub const DONE: u32 = 0xbe;

const DEDICATED_WQ: u8 = 0;
const SHARED_WQ: u8 = 1;
const BENCH_PORT: i32 = 0x80;
/// Buffers, in the identity-mapped 2 MiB pages above the data area.
const SRC: u64 = 0x100_0000;
/// Where the vDSA's copy goes.
pub const DST_DSA: u64 = 0x120_0000;
/// The qword the guest fills the source with.
pub const PATTERN: u64 = 0x5a5a_1234_a5a5_4321;
const DST_MEMCPY: u64 = 0x140_0000;
const NOOP_DESCRIPTOR: u64 = 0x160_0000;
const COPY_DESCRIPTOR: u64 = 0x160_0040;
const RECORD: u64 = 0x160_0080;
/// Per round, [`Round::QWORDS`] u64 results.
const RESULTS: u64 = 0x161_0000;

/// The machine the benchmark runs on: the vIOMMU and one vDSA with the
/// defaults of a DSA 1.0.
pub fn machine() -> AccelConfig {
    AccelConfig {
        iommu: true,
        dsa: vec![DsaConfig::default()],
    }
}

/// The benchmark program with `per_round` port-I/O exits and ENQCMDs per
/// round.
pub fn program(per_round: u32) -> Result<MicroGuest, BringUpError> {
    let setup = SvaSetup {
        dsa_rid: dsa_placements(&machine().dsa)[0].bdf,
        pasid: PASID,
        did: 1,
        iommu: true,
    };
    let dsa = DsaDriver::default();
    let mut g = MicroGuest::new();
    let a = &mut g.asm;
    setup.bring_up(
        a,
        &[
            WqSetup::dedicated(DEDICATED_WQ, 0, PASID),
            WqSetup::shared(SHARED_WQ, 0),
        ],
    )?;
    // A NOOP asking for nothing back: the engine retires it at once, so the
    // shared WQ does not fill and every ENQCMD measures a submission.
    store_bytes(a, NOOP_DESCRIPTOR, &Descriptor::new(Opcode::Noop, 0).0)?;
    store_bytes(
        a,
        COPY_DESCRIPTOR,
        &memmove(SRC, DST_DSA, COPY_LEN, RECORD, false).0,
    )?;
    a.mov(rdi, SRC)?;
    a.mov(ecx, COPY_LEN / 8)?;
    a.mov(rax, PATTERN)?;
    a.rep().stosq()?;
    // The kernel has bound the process: its PASID is in IA32_PASID (the
    // VMM records it for this address space).
    a.mov(ecx, pasid::MSR_IA32_PASID)?;
    a.mov(eax, pasid::Ia32Pasid::VALID as u32 | PASID)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    let mut user = a.create_label();
    enter_user(a, user, USER_STACK_TOP)?;
    a.set_label(&mut user)?;
    emit_rounds(a, &dsa, per_round)?;
    exit_with(a, DONE)?;
    Ok(g)
}

fn emit_rounds(a: &mut CodeAssembler, dsa: &DsaDriver, per_round: u32) -> Result<(), IcedError> {
    let mut round = a.create_label();
    a.mov(rbx, RESULTS)?;
    a.mov(r12d, ROUNDS)?;
    a.set_label(&mut round)?;

    // Bare port-I/O exits.
    let mut out_loop = a.create_label();
    tsc_start(a)?;
    a.mov(ecx, per_round)?;
    a.set_label(&mut out_loop)?;
    a.out(BENCH_PORT, al)?;
    a.dec(ecx)?;
    a.jnz(out_loop)?;
    tsc_store(a, slot(Round::PORT_IO))?;

    // ENQCMDs to the shared WQ, counting the accepted ones (ZF=0) in r14.
    let (mut enq_loop, mut retried) = (a.create_label(), a.create_label());
    a.xor(r14d, r14d)?;
    a.mov(rdi, dsa.portal(SHARED_WQ))?;
    a.mov(rsi, NOOP_DESCRIPTOR)?;
    tsc_start(a)?;
    a.mov(ecx, per_round)?;
    a.set_label(&mut enq_loop)?;
    a.enqcmd(rdi, zmmword_ptr(rsi))?;
    a.jz(retried)?;
    a.inc(r14d)?;
    a.set_label(&mut retried)?;
    a.dec(ecx)?;
    a.jnz(enq_loop)?;
    tsc_store(a, slot(Round::ENQCMD))?;
    a.mov(slot(Round::ACCEPTED), r14)?;

    // The host's memcpy: user code runs natively.
    tsc_start(a)?;
    a.mov(rsi, SRC)?;
    a.mov(rdi, DST_MEMCPY)?;
    a.mov(ecx, COPY_LEN)?;
    a.rep().movsb()?;
    tsc_store(a, slot(Round::MEMCPY))?;

    // The same copy by the vDSA, submitted and waited for.
    a.mov(rax, RECORD)?;
    a.mov(byte_ptr(rax), 0)?;
    tsc_start(a)?;
    dsa.movdir64b(a, DEDICATED_WQ, COPY_DESCRIPTOR)?;
    wait_for_completion(a, RECORD)?;
    a.mov(slot(Round::STATUS), rax)?;
    tsc_store(a, slot(Round::MEMMOVE))?;

    a.add(rbx, 8 * Round::QWORDS)?;
    a.dec(r12d)?;
    a.jnz(round)
}

/// Result qword `index` of this round (at `rbx`).
fn slot(index: i32) -> AsmMemoryOperand {
    qword_ptr(rbx + 8 * index)
}

/// One round's results, TSC ticks unless said otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Round {
    /// The port-I/O batch.
    pub port_io: u64,
    /// The ENQCMD batch.
    pub enqcmd: u64,
    /// ENQCMDs the device accepted (ZF=0).
    pub accepted: u64,
    /// The 1 MiB `rep movsb`.
    pub memcpy: u64,
    /// The 1 MiB MEMMOVE, submission to completion record.
    pub memmove: u64,
    /// The MEMMOVE's completion status.
    pub status: u64,
}

impl Round {
    const PORT_IO: i32 = 0;
    const ENQCMD: i32 = 1;
    const ACCEPTED: i32 = 2;
    const MEMCPY: i32 = 3;
    const MEMMOVE: i32 = 4;
    const STATUS: i32 = 5;
    const QWORDS: i32 = 6;
}

/// What the benchmark measured.
#[derive(Clone, Debug, PartialEq)]
pub struct SvaBench {
    /// Port-I/O exits and ENQCMDs per round.
    pub per_round: u32,
    /// Every round.
    pub rounds: Vec<Round>,
}

impl SvaBench {
    /// Reads the rounds the program left in guest memory.
    pub fn from_memory(memory: &GuestMemoryMmap, per_round: u32) -> Self {
        let rounds = (0..u64::from(ROUNDS))
            .map(|r| {
                let base = RESULTS + r * 8 * Round::QWORDS as u64;
                let q = |slot: i32| {
                    memory
                        .read_obj::<u64>(GuestAddress(base + 8 * slot as u64))
                        .unwrap_or(0)
                };
                Round {
                    port_io: q(Round::PORT_IO),
                    enqcmd: q(Round::ENQCMD),
                    accepted: q(Round::ACCEPTED),
                    memcpy: q(Round::MEMCPY),
                    memmove: q(Round::MEMMOVE),
                    status: q(Round::STATUS),
                }
            })
            .collect();
        Self { per_round, rounds }
    }

    /// Median over rounds of the ENQCMD round trip / port-I/O round trip.
    pub fn enqcmd_ratio(&self) -> f64 {
        self.enqcmd_spread().median
    }

    /// The ENQCMD round trip / port-I/O round trip over the rounds.
    pub fn enqcmd_spread(&self) -> Spread {
        Spread::of(
            self.rounds
                .iter()
                .map(|r| r.enqcmd as f64 / r.port_io.max(1) as f64)
                .collect(),
        )
    }

    /// Median over rounds of the MEMMOVE's throughput relative to memcpy's
    /// (memcpy time / MEMMOVE time: 1.0 is as fast as memcpy).
    pub fn memmove_vs_memcpy(&self) -> f64 {
        self.memmove_spread().median
    }

    /// The MEMMOVE's throughput relative to memcpy's over the rounds.
    pub fn memmove_spread(&self) -> Spread {
        Spread::of(
            self.rounds
                .iter()
                .map(|r| r.memcpy as f64 / r.memmove.max(1) as f64)
                .collect(),
        )
    }

    /// Accepted ENQCMDs per second on one vCPU, at `tsc_khz`.
    pub fn submissions_per_second(&self, tsc_khz: u32) -> f64 {
        let accepted: u64 = self.rounds.iter().map(|r| r.accepted).sum();
        let ticks: u64 = self.rounds.iter().map(|r| r.enqcmd).sum();
        accepted as f64 * f64::from(tsc_khz) * 1000.0 / ticks.max(1) as f64
    }

    /// Accepted ENQCMDs (NOOPs) per second on one vCPU over the rounds, at
    /// `tsc_khz`.
    pub fn submissions_spread(&self, tsc_khz: u32) -> Spread {
        Spread::of(
            self.rounds
                .iter()
                .map(|r| r.accepted as f64 * f64::from(tsc_khz) * 1000.0 / r.enqcmd.max(1) as f64)
                .collect(),
        )
    }

    /// ENQCMDs issued and accepted over all rounds.
    pub fn submissions(&self) -> (u64, u64) {
        let issued = u64::from(self.per_round) * self.rounds.len() as u64;
        (issued, self.rounds.iter().map(|r| r.accepted).sum())
    }
}

/// The target for ENQCMD round trip / port-I/O round trip (at most).
pub const ENQCMD_TARGET: f64 = 1.5;
/// The target for the 1 MiB MEMMOVE's throughput / memcpy's (at least).
pub const MEMMOVE_TARGET: f64 = 0.5;

/// The figures of one `vmm bench` run: medians over its rounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RunFigures {
    /// ENQCMD to the test portal / port-I/O exit.
    pub test_portal: f64,
    /// ENQCMD to a shared WQ / port-I/O exit.
    pub shared_wq: f64,
    /// 1 MiB MEMMOVE via a dedicated WQ, end to end / memcpy.
    pub memmove: f64,
    /// NOOPs per second through the shared WQ, when the TSC rate is known.
    pub noops_per_second: Option<f64>,
}

/// The summary of several runs: each figure's spread over the runs' medians
/// and how many runs met its target.
pub fn summary(runs: &[RunFigures]) -> Vec<String> {
    let n = runs.len();
    let figure = |name: &str, of: fn(&RunFigures) -> f64, met: Option<fn(f64) -> bool>| {
        let values: Vec<f64> = runs.iter().map(of).collect();
        let target = met.map_or(String::new(), |met| {
            let count = values.iter().filter(|&&v| met(v)).count();
            format!("; target met in {count} of {n} runs")
        });
        format!("{name}: {}{target}", Spread::of(values))
    };
    let mut lines = vec![
        format!("bench summary over {n} runs (min / median / max of the runs' medians):"),
        figure(
            "  ENQCMD to the test portal / port-I/O",
            |r| r.test_portal,
            Some(|v| v <= ENQCMD_TARGET),
        ),
        figure(
            "  ENQCMD to a shared WQ / port-I/O",
            |r| r.shared_wq,
            Some(|v| v <= ENQCMD_TARGET),
        ),
        figure(
            "  1 MiB MEMMOVE via a dedicated WQ / memcpy",
            |r| r.memmove,
            Some(|v| v >= MEMMOVE_TARGET),
        ),
    ];
    let rates: Vec<f64> = runs.iter().filter_map(|r| r.noops_per_second).collect();
    if !rates.is_empty() {
        lines.push(format!(
            "  NOOPs per second through a shared WQ: {:.0}",
            Spread::of(rates)
        ));
    }
    lines
}

/// Options for running [`program`].
pub fn options() -> MicroOptions {
    MicroOptions {
        accel: machine(),
        timeout: std::time::Duration::from_secs(600),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(port_io: u64, enqcmd: u64, memcpy: u64, memmove: u64) -> Round {
        Round {
            port_io,
            enqcmd,
            accepted: 10,
            memcpy,
            memmove,
            status: 1,
        }
    }

    #[test]
    fn summary_counts_runs_that_met_each_target() {
        let run = |shared_wq, memmove| RunFigures {
            test_portal: 1.2,
            shared_wq,
            memmove,
            noops_per_second: Some(1000.0),
        };
        let lines = summary(&[run(1.4, 0.6), run(1.6, 0.4), run(1.5, 0.7)]);
        assert_eq!(
            lines,
            [
                "bench summary over 3 runs (min / median / max of the runs' medians):",
                "  ENQCMD to the test portal / port-I/O: 1.20 / 1.20 / 1.20; target met in 3 of 3 runs",
                "  ENQCMD to a shared WQ / port-I/O: 1.40 / 1.50 / 1.60; target met in 2 of 3 runs",
                "  1 MiB MEMMOVE via a dedicated WQ / memcpy: 0.40 / 0.60 / 0.70; target met in 2 of 3 runs",
                "  NOOPs per second through a shared WQ: 1000 / 1000 / 1000",
            ]
        );
    }

    #[test]
    fn figures_are_medians_of_rounds() {
        let bench = SvaBench {
            per_round: 10,
            rounds: vec![
                round(100, 120, 50, 100),
                round(100, 900, 50, 400),
                round(100, 130, 50, 80),
            ],
        };
        assert_eq!(bench.enqcmd_ratio(), 1.3);
        assert_eq!(bench.memmove_vs_memcpy(), 0.5);
        assert_eq!(
            bench.memmove_spread(),
            Spread {
                min: 0.125,
                median: 0.5,
                max: 0.625
            }
        );
        assert_eq!(bench.enqcmd_spread().max, 9.0);
        // 10 accepted in 120 ticks at 1,200 kHz: 100,000 per second.
        assert_eq!(bench.submissions_spread(1200).max, 100_000.0);
        assert_eq!(bench.submissions(), (30, 30));
        // 30 accepted in 1150 ticks at 1,150 kHz: 30,000 per second.
        assert_eq!(bench.submissions_per_second(1150), 30_000.0);
    }
}
