//! Built-in micro-guest programs: the ENQCMD demo and the trap benchmark.

use iced_x86::code_asm::*;
use iced_x86::IcedError;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::{
    enter_user, exit_with, MicroGuest, MicroGuestError, DATA_START, TEST_PORTAL_START,
    USER_STACK_TOP,
};

use pasid::MSR_IA32_PASID as IA32_PASID;
/// Where the programs keep their 64-byte command.
pub const COMMAND_START: u64 = DATA_START + 0x1000;
/// Where the benchmark leaves its TSC deltas (per round two u64: port
/// I/O, ENQCMD).
pub const BENCH_RESULT_START: u64 = DATA_START + 0x2000;
/// The PASID the demo's #GP handler loads into IA32_PASID.
pub const DEMO_PASID: u32 = 0x1234;
/// Port the benchmark's bare exits go to (nothing decodes it).
const BENCH_PORT: i32 = 0x80;
const UD_VECTOR: u8 = 6;
const GP_VECTOR: u8 = 13;

/// A 64-byte command: `dword0` (PASID and privilege), then a
/// recognisable pattern.
pub fn command(dword0: u32) -> [u8; 64] {
    let mut c = [0u8; 64];
    for (i, b) in c.iter_mut().enumerate() {
        *b = i as u8 ^ 0xa5;
    }
    c[..4].copy_from_slice(&dword0.to_le_bytes());
    c
}

/// The demo's command: dword 0 all ones, which ENQCMD overwrites.
pub fn demo_command() -> [u8; 64] {
    command(u32::MAX)
}

/// A #UD handler that ends the run with `value` (it begins with endbr64,
/// as the #UD breakpoint requires).
fn ud_handler_exits(g: &mut MicroGuest, value: u32) -> Result<(), MicroGuestError> {
    let mut l = g.asm.create_label();
    g.asm.set_label(&mut l)?;
    g.asm.endbr64()?;
    exit_with(&mut g.asm, value)?;
    g.handler(UD_VECTOR, l);
    Ok(())
}

/// User ENQCMD of [`demo_command`] to the test portal with IA32_PASID
/// clear: the guest takes #GP, its handler loads [`DEMO_PASID`] into the MSR
/// and returns, and the retried ENQCMD reaches the portal. The run's result
/// is `0x600 | (number of #GPs << 4) | ZF`.
pub fn enqcmd_after_gp() -> Result<MicroGuest, MicroGuestError> {
    let mut g = MicroGuest::new();
    g.write(COMMAND_START, &demo_command());
    let mut user = g.asm.create_label();
    let mut gp = g.asm.create_label();
    g.asm.xor(r15d, r15d)?;
    enter_user(&mut g.asm, user, USER_STACK_TOP)?;

    g.asm.set_label(&mut user)?;
    g.asm.mov(rdi, TEST_PORTAL_START)?;
    g.asm.mov(rsi, COMMAND_START)?;
    g.asm.enqcmd(rdi, zmmword_ptr(rsi))?;
    g.asm.setz(al)?;
    g.asm.movzx(eax, al)?;
    g.asm.shl(r15d, 4)?;
    g.asm.or(eax, r15d)?;
    g.asm.or(eax, 0x600)?;
    g.asm.out(0xf4, eax)?;
    g.asm.hlt()?;

    // #GP: count it, load IA32_PASID and retry the ENQCMD.
    g.asm.set_label(&mut gp)?;
    g.asm.inc(r15d)?;
    g.asm.mov(ecx, IA32_PASID)?;
    g.asm.mov(eax, 0x8000_0000 | DEMO_PASID)?;
    g.asm.xor(edx, edx)?;
    g.asm.wrmsr()?;
    g.asm.add(rsp, 8)?; // the error code
    g.asm.iretq()?;
    g.handler(GP_VECTOR, gp);
    ud_handler_exits(&mut g, 0xbad6)?;
    Ok(g)
}

/// Rounds of the trap benchmark: each times a batch of port-I/O exits and
/// then a batch of ENQCMDs, so that both kinds see the same machine load.
pub const BENCH_ROUNDS: u32 = 10;

/// The trap benchmark, all at CPL3: [`BENCH_ROUNDS`] rounds, each of
/// `per_round` bare OUTs then `per_round` ENQCMDs to the test portal,
/// each batch timed with RDTSC. Round `i` leaves its two TSC deltas (port
/// I/O, ENQCMD) at [`BENCH_RESULT_START`] + 16 * i; the result is 0xbe.
pub fn trap_benchmark(per_round: u32) -> Result<MicroGuest, MicroGuestError> {
    let mut g = MicroGuest::new();
    g.write(COMMAND_START, &demo_command());
    let mut user = g.asm.create_label();
    let mut round = g.asm.create_label();
    let mut out_loop = g.asm.create_label();
    let mut enq_loop = g.asm.create_label();
    g.asm.mov(ecx, IA32_PASID)?;
    g.asm.mov(eax, 0x8000_0000 | DEMO_PASID)?;
    g.asm.xor(edx, edx)?;
    g.asm.wrmsr()?;
    enter_user(&mut g.asm, user, USER_STACK_TOP)?;

    g.asm.set_label(&mut user)?;
    g.asm.mov(rdi, TEST_PORTAL_START)?;
    g.asm.mov(rsi, COMMAND_START)?;
    g.asm.mov(rbx, BENCH_RESULT_START)?;
    g.asm.mov(r12d, BENCH_ROUNDS)?;
    g.asm.set_label(&mut round)?;
    // Bare port-I/O exits.
    tsc_start(&mut g.asm)?;
    g.asm.mov(ecx, per_round)?;
    g.asm.set_label(&mut out_loop)?;
    g.asm.out(BENCH_PORT, al)?;
    g.asm.dec(ecx)?;
    g.asm.jnz(out_loop)?;
    tsc_store(&mut g.asm, qword_ptr(rbx))?;
    // Trapped ENQCMDs.
    tsc_start(&mut g.asm)?;
    g.asm.mov(ecx, per_round)?;
    g.asm.set_label(&mut enq_loop)?;
    g.asm.enqcmd(rdi, zmmword_ptr(rsi))?;
    g.asm.dec(ecx)?;
    g.asm.jnz(enq_loop)?;
    tsc_store(&mut g.asm, qword_ptr(rbx + 8))?;
    g.asm.add(rbx, 16)?;
    g.asm.dec(r12d)?;
    g.asm.jnz(round)?;
    exit_with(&mut g.asm, 0xbe)?;
    ud_handler_exits(&mut g, 0xbad6)?;
    Ok(g)
}

/// `r13` = TSC (r13: the micro-guest driver's polls keep their deadline
/// in r8).
pub(crate) fn tsc_start(asm: &mut CodeAssembler) -> Result<(), IcedError> {
    asm.rdtsc()?;
    asm.shl(rdx, 32)?;
    asm.or(rax, rdx)?;
    asm.mov(r13, rax)
}

/// `dst` = TSC - `r13`.
pub(crate) fn tsc_store(asm: &mut CodeAssembler, dst: AsmMemoryOperand) -> Result<(), IcedError> {
    asm.rdtsc()?;
    asm.shl(rdx, 32)?;
    asm.or(rax, rdx)?;
    asm.sub(rax, r13)?;
    asm.mov(dst, rax)
}

/// The median of `values` (the mean of the middle two for an even count;
/// 0 for none): the benchmarks' per-round figures are summarised with it.
pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The lowest, middle and highest of a benchmark figure over its rounds
/// (or over runs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spread {
    /// The lowest value.
    pub min: f64,
    /// The median.
    pub median: f64,
    /// The highest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values` (all zero when there are none).
    pub fn of(values: Vec<f64>) -> Self {
        let min = values.iter().copied().reduce(f64::min).unwrap_or(0.0);
        let max = values.iter().copied().reduce(f64::max).unwrap_or(0.0);
        Self {
            min,
            median: median(values),
            max,
        }
    }
}

impl std::fmt::Display for Spread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = f.precision().unwrap_or(2);
        write!(
            f,
            "{:.p$} / {:.p$} / {:.p$}",
            self.min, self.median, self.max
        )
    }
}

/// What the trap benchmark measured, in guest TSC ticks.
#[derive(Clone, Debug, PartialEq)]
pub struct TrapBench {
    /// Round trips of each kind per round.
    pub per_round: u32,
    /// Per round: (port-I/O batch, ENQCMD batch).
    pub rounds: Vec<(u64, u64)>,
}

impl TrapBench {
    /// Reads the rounds the benchmark left in guest memory.
    pub fn from_memory(memory: &GuestMemoryMmap, per_round: u32) -> Self {
        let read = |at: u64| {
            memory
                .read_obj::<u64>(GuestAddress(BENCH_RESULT_START + at))
                .unwrap_or(0)
        };
        let rounds = (0..u64::from(BENCH_ROUNDS))
            .map(|i| (read(16 * i), read(16 * i + 8)))
            .collect();
        Self { per_round, rounds }
    }

    /// Ticks per round trip over all rounds: (port I/O, ENQCMD).
    pub fn per_round_trip(&self) -> (f64, f64) {
        let n = f64::from(self.per_round) * self.rounds.len() as f64;
        let (pio, enq) = self
            .rounds
            .iter()
            .fold((0u64, 0u64), |(p, e), &(rp, re)| (p + rp, e + re));
        (pio as f64 / n, enq as f64 / n)
    }

    /// The median over rounds of ENQCMD time / port-I/O time: a round's two
    /// batches run back to back, so a load change between rounds cancels.
    pub fn median_ratio(&self) -> f64 {
        self.ratio().median
    }

    /// ENQCMD time / port-I/O time over the rounds.
    pub fn ratio(&self) -> Spread {
        Spread::of(
            self.rounds
                .iter()
                .map(|&(pio, enq)| enq as f64 / pio.max(1) as f64)
                .collect(),
        )
    }
}

/// Where [`syscall_round_trips`]'s kernel entry lives: a supervisor-only
/// page, as Linux's (the harness maps everything else user-accessible).
pub const SYSCALL_ENTRY: u64 = DATA_START + 0x10_0000;
/// Where its entry code records, per call, CS (bits 63:32) and RFLAGS
/// (bits 31:0) as it found them.
pub const SYSCALL_LOG: u64 = DATA_START + 0x8000;
/// Its STAR: SYSCALL loads CS 0x10 / SS 0x18; SYSRET returns to 0x33 / 0x2b.
pub const SYSCALL_STAR: u64 = (0x23 << 48) | ((crate::KERNEL_CS as u64) << 32);
/// Its FMASK, Linux's: TF, DF, IF, IOPL, AC, NT.
pub const SYSCALL_FMASK: u64 = 0x47700;
/// Result of a run: `SYSCALL_RESULT | calls that returned after themselves`.
pub const SYSCALL_RESULT: u32 = 0x5c00_0000;
/// Calls [`syscall_round_trips`] logs (the first ones).
pub const SYSCALL_LOGGED: u32 = 16;

fn wrmsr(a: &mut CodeAssembler, index: u32, value: u64) -> Result<(), IcedError> {
    a.mov(ecx, index)?;
    a.mov(eax, value as u32)?;
    a.mov(edx, (value >> 32) as u32)?;
    a.wrmsr()
}

/// The kernel entry: logs CS and RFLAGS for the first calls (RDI = call
/// number), then SYSRETQ.
fn syscall_entry_code() -> Result<Vec<u8>, MicroGuestError> {
    let mut a = CodeAssembler::new(64)?;
    let mut done = a.create_label();
    a.cmp(rdi, SYSCALL_LOGGED as i32)?;
    a.jae(done)?;
    a.mov(rbx, SYSCALL_LOG)?;
    a.mov(rax, rdi)?;
    a.shl(rax, 3)?;
    a.add(rbx, rax)?;
    a.mov(rax, cs)?;
    a.shl(rax, 32)?;
    a.pushfq()?;
    a.pop(rdx)?;
    a.or(rax, rdx)?;
    a.mov(qword_ptr(rbx), rax)?;
    a.set_label(&mut done)?;
    a.sysretq()?;
    Ok(a.assemble(SYSCALL_ENTRY)?)
}

/// User code making `calls` system calls to a CPL 0 entry that returns with
/// SYSRETQ, the backend's half-done SYSCALL completed by the VMM each time.
/// The run's result is [`SYSCALL_RESULT`] | the number of calls that came
/// back with RCX after the SYSCALL. A run the VMM did not fix ends with the
/// default #PF handler's `DEFAULT_HANDLER_RESULT | 14`.
pub fn syscall_round_trips(calls: u32) -> Result<MicroGuest, MicroGuestError> {
    use crate::{PTE_P, PTE_W};
    use vmm::emulator::syscall_msr::{FMASK, LSTAR, STAR};

    let mut g = MicroGuest::new();
    g.map_page(SYSCALL_ENTRY, PTE_P | PTE_W)?;
    g.write(SYSCALL_ENTRY, &syscall_entry_code()?);
    let mut user = g.asm.create_label();
    let mut again = g.asm.create_label();
    let mut after = g.asm.create_label();
    let mut gp = g.asm.create_label();
    wrmsr(&mut g.asm, STAR, SYSCALL_STAR)?;
    wrmsr(&mut g.asm, LSTAR, SYSCALL_ENTRY)?;
    wrmsr(&mut g.asm, FMASK, SYSCALL_FMASK)?;
    enter_user(&mut g.asm, user, USER_STACK_TOP)?;

    g.asm.set_label(&mut user)?;
    g.asm.xor(edi, edi)?;
    g.asm.xor(esi, esi)?;
    g.asm.set_label(&mut again)?;
    g.asm.syscall()?;
    g.asm.set_label(&mut after)?;
    g.asm.lea(rax, ptr(after))?;
    g.asm.cmp(rax, rcx)?;
    g.asm.sete(al)?;
    g.asm.movzx(eax, al)?;
    g.asm.add(esi, eax)?;
    g.asm.inc(edi)?;
    g.asm.cmp(edi, calls)?;
    g.asm.jne(again)?;
    g.asm.mov(eax, SYSCALL_RESULT)?;
    g.asm.or(eax, esi)?;
    // SYSRETQ takes RFLAGS from R11, in which the backend drops IOPL: the
    // user cannot use the port itself. HLT raises #GP; its handler reports.
    g.asm.hlt()?;
    g.asm.set_label(&mut gp)?;
    g.asm.out(0xf4, eax)?;
    g.asm.hlt()?;
    g.handler(GP_VECTOR, gp);
    Ok(g)
}

/// User code making `count` bare port-I/O exits: the yardstick for
/// [`syscall_round_trips`]. The result is [`SYSCALL_RESULT`] | `count`.
pub fn port_io_round_trips(count: u32) -> Result<MicroGuest, MicroGuestError> {
    let mut g = MicroGuest::new();
    let mut user = g.asm.create_label();
    let mut again = g.asm.create_label();
    enter_user(&mut g.asm, user, USER_STACK_TOP)?;
    g.asm.set_label(&mut user)?;
    g.asm.mov(ecx, count)?;
    g.asm.set_label(&mut again)?;
    g.asm.out(BENCH_PORT, al)?;
    g.asm.dec(ecx)?;
    g.asm.jnz(again)?;
    exit_with(&mut g.asm, SYSCALL_RESULT | count)?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trap_bench_ratio_is_the_median_of_rounds() {
        // A load spike in one round (the third) moves the mean, not the median.
        let bench = TrapBench {
            per_round: 10,
            rounds: vec![(100, 140), (100, 150), (100, 900), (200, 260), (100, 145)],
        };
        assert_eq!(bench.median_ratio(), 1.45);
        assert_eq!(bench.per_round_trip(), (12.0, 31.9));
        let even = TrapBench {
            per_round: 1,
            rounds: vec![(10, 12), (10, 16)],
        };
        assert_eq!(even.median_ratio(), 1.4);
    }
}
