//! Built-in micro-guest programs: the ENQCMD demo and the trap benchmark.

use iced_x86::code_asm::*;

use crate::microguest::{
    enter_user, exit_with, MicroGuest, MicroGuestError, DATA_START, TEST_PORTAL_START,
    USER_STACK_TOP,
};

/// MSR index of IA32_PASID.
const IA32_PASID: u32 = pasid::MSR_IA32_PASID;
/// Where the programs keep their 64-byte command.
pub const COMMAND_START: u64 = DATA_START + 0x1000;
/// Where the benchmark leaves its TSC deltas (two u64: port I/O, ENQCMD).
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

/// The trap benchmark, all at CPL3: `iterations` bare OUTs, then
/// `iterations` ENQCMDs to the test portal, each timed with RDTSC. The two
/// TSC deltas land at [`BENCH_RESULT_START`]; the result is 0xbe.
pub fn trap_benchmark(iterations: u32) -> Result<MicroGuest, MicroGuestError> {
    let mut g = MicroGuest::new();
    g.write(COMMAND_START, &demo_command());
    let mut user = g.asm.create_label();
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
    // Bare port-I/O exits.
    g.asm.rdtsc()?;
    g.asm.shl(rdx, 32)?;
    g.asm.or(rax, rdx)?;
    g.asm.mov(r8, rax)?;
    g.asm.mov(ecx, iterations)?;
    g.asm.set_label(&mut out_loop)?;
    g.asm.out(BENCH_PORT, al)?;
    g.asm.dec(ecx)?;
    g.asm.jnz(out_loop)?;
    g.asm.rdtsc()?;
    g.asm.shl(rdx, 32)?;
    g.asm.or(rax, rdx)?;
    g.asm.sub(rax, r8)?;
    g.asm.mov(qword_ptr(rbx), rax)?;
    // Trapped ENQCMDs.
    g.asm.rdtsc()?;
    g.asm.shl(rdx, 32)?;
    g.asm.or(rax, rdx)?;
    g.asm.mov(r8, rax)?;
    g.asm.mov(ecx, iterations)?;
    g.asm.set_label(&mut enq_loop)?;
    g.asm.enqcmd(rdi, zmmword_ptr(rsi))?;
    g.asm.dec(ecx)?;
    g.asm.jnz(enq_loop)?;
    g.asm.rdtsc()?;
    g.asm.shl(rdx, 32)?;
    g.asm.or(rax, rdx)?;
    g.asm.sub(rax, r8)?;
    g.asm.mov(qword_ptr(rbx + 8), rax)?;
    exit_with(&mut g.asm, 0xbe)?;
    ud_handler_exits(&mut g, 0xbad6)?;
    Ok(g)
}
