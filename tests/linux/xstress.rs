//! `xstress`, a guest program written for the register tests: it fills
//! every vector register it has (ZMM0-31 and k0-7 where the host CPU has
//! AVX-512, else YMM0-15) with values drawn from its process ID, then
//! yields the CPU again and again (so another copy of itself runs on the
//! same vCPU in between) and after each yield checks that every register
//! still holds its value. A difference prints `xstress-corrupt` on stderr
//! and exits 1. Guest user code runs natively on the host CPU, so these are
//! the host's registers, which only the guest kernel's XSAVE state
//! management keeps apart per process.
//!
//! It is a static x86-64 ELF executable without libc, assembled here, and
//! reaches the guest as a second initramfs archive ([`initramfs`]).

use iced_x86::code_asm::*;

/// Where the guest finds it.
pub const PATH: &str = "xstress";
/// Load address of its one segment.
const BASE: u64 = 0x40_0000;
/// The values it loads and the values it reads back (in the segment's
/// zero-filled tail).
const EXPECTED: u64 = 0x60_0000;
const ACTUAL: u64 = 0x60_1000;
const SEGMENT_END: u64 = 0x60_2000;
const ELF_HEADER: usize = 64;
const PROGRAM_HEADER: usize = 56;

const SYS_WRITE: u32 = 1;
const SYS_SCHED_YIELD: u32 = 24;
const SYS_GETPID: u32 = 39;
const SYS_EXIT: u32 = 60;

/// Which registers it uses.
#[derive(Clone, Copy, Debug)]
pub enum Registers {
    /// ZMM0-31 and k0-7.
    Avx512,
    /// YMM0-15.
    Avx2,
}

impl Registers {
    /// The widest the host CPU has.
    pub fn host() -> Self {
        if std::arch::is_x86_feature_detected!("avx512f") {
            Registers::Avx512
        } else {
            Registers::Avx2
        }
    }

    /// Bytes of register state checked.
    fn bytes(self) -> u32 {
        match self {
            Registers::Avx512 => 32 * 64 + 8 * 8,
            Registers::Avx2 => 16 * 32,
        }
    }
}

const ZMM: [AsmRegisterZmm; 32] = [
    zmm0, zmm1, zmm2, zmm3, zmm4, zmm5, zmm6, zmm7, zmm8, zmm9, zmm10, zmm11, zmm12, zmm13, zmm14,
    zmm15, zmm16, zmm17, zmm18, zmm19, zmm20, zmm21, zmm22, zmm23, zmm24, zmm25, zmm26, zmm27,
    zmm28, zmm29, zmm30, zmm31,
];
const YMM: [AsmRegisterYmm; 16] = [
    ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13, ymm14,
    ymm15,
];
const K: [AsmRegisterK; 8] = [k0, k1, k2, k3, k4, k5, k6, k7];

/// Moves every register to (`store`) or from memory at `at`.
fn move_all(a: &mut CodeAssembler, regs: Registers, at: u64, store: bool) -> Result<(), IcedError> {
    match regs {
        Registers::Avx512 => {
            for (i, z) in ZMM.iter().enumerate() {
                let m = zmmword_ptr(at + 64 * i as u64);
                if store {
                    a.vmovdqu64(m, *z)?;
                } else {
                    a.vmovdqu64(*z, m)?;
                }
            }
            for (i, k) in K.iter().enumerate() {
                let m = qword_ptr(at + 32 * 64 + 8 * i as u64);
                if store {
                    a.kmovq(m, *k)?;
                } else {
                    a.kmovq(*k, m)?;
                }
            }
        }
        Registers::Avx2 => {
            for (i, y) in YMM.iter().enumerate() {
                let m = ymmword_ptr(at + 32 * i as u64);
                if store {
                    a.vmovdqu(m, *y)?;
                } else {
                    a.vmovdqu(*y, m)?;
                }
            }
        }
    }
    Ok(())
}

fn code(regs: Registers, rounds: u32, ip: u64) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut fill = a.create_label();
    let mut round = a.create_label();
    let mut corrupt = a.create_label();
    let mut message = a.create_label();
    let qwords = regs.bytes() / 8;
    // Values: pid << 32 | 0xa5a5 << 16 | index.
    a.mov(eax, SYS_GETPID)?;
    a.syscall()?;
    a.mov(rbx, rax)?;
    a.shl(rbx, 32)?;
    a.or(rbx, 0xa5a5_0000u32 as i32 & 0x7fff_ffff)?;
    a.mov(rdi, EXPECTED)?;
    a.xor(ecx, ecx)?;
    a.set_label(&mut fill)?;
    a.lea(rax, qword_ptr(rbx + rcx))?;
    a.mov(qword_ptr(rdi + rcx * 8), rax)?;
    a.inc(ecx)?;
    a.cmp(ecx, qwords)?;
    a.jb(fill)?;
    move_all(&mut a, regs, EXPECTED, false)?;
    a.mov(r14d, rounds)?;
    a.set_label(&mut round)?;
    a.mov(eax, SYS_SCHED_YIELD)?;
    a.syscall()?;
    move_all(&mut a, regs, ACTUAL, true)?;
    a.mov(rsi, EXPECTED)?;
    a.mov(rdi, ACTUAL)?;
    a.mov(ecx, qwords)?;
    a.repe().cmpsq()?;
    a.jne(corrupt)?;
    a.dec(r14d)?;
    a.jnz(round)?;
    a.mov(eax, SYS_EXIT)?;
    a.xor(edi, edi)?;
    a.syscall()?;
    a.set_label(&mut corrupt)?;
    a.mov(eax, SYS_WRITE)?;
    a.mov(edi, 2)?;
    a.lea(rsi, ptr(message))?;
    a.mov(edx, MESSAGE.len() as u32)?;
    a.syscall()?;
    a.mov(eax, SYS_EXIT)?;
    a.mov(edi, 1)?;
    a.syscall()?;
    a.set_label(&mut message)?;
    a.db(MESSAGE)?;
    a.assemble(ip)
}

/// What it prints when a register lost its value.
pub const MESSAGE: &[u8] = b"xstress-corrupt\n";

/// The ELF executable: `rounds` yields and checks.
pub fn program(regs: Registers, rounds: u32) -> Vec<u8> {
    let entry = BASE + (ELF_HEADER + PROGRAM_HEADER) as u64;
    let code = code(regs, rounds, entry).expect("assemble xstress");
    let file_size = (ELF_HEADER + PROGRAM_HEADER + code.len()) as u64;
    let mut elf = Vec::new();
    elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
    elf.extend_from_slice(&[0; 8]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&entry.to_le_bytes());
    elf.extend_from_slice(&(ELF_HEADER as u64).to_le_bytes()); // e_phoff
    elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    elf.extend_from_slice(&0u32.to_le_bytes());
    elf.extend_from_slice(&(ELF_HEADER as u16).to_le_bytes());
    elf.extend_from_slice(&(PROGRAM_HEADER as u16).to_le_bytes());
    elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    elf.extend_from_slice(&[0; 6]);
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&7u32.to_le_bytes()); // RWX
    elf.extend_from_slice(&0u64.to_le_bytes());
    elf.extend_from_slice(&BASE.to_le_bytes());
    elf.extend_from_slice(&BASE.to_le_bytes());
    elf.extend_from_slice(&file_size.to_le_bytes());
    elf.extend_from_slice(&(SEGMENT_END - BASE).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    elf.extend_from_slice(&code);
    elf
}

/// `initramfs` followed by a second archive holding `/xstress`.
pub fn initramfs(base: &std::path::Path, regs: Registers, rounds: u32) -> Vec<u8> {
    let mut bytes = std::fs::read(base).expect("read the initramfs");
    let mut cpio = vmm::modules::Cpio::new();
    cpio.entry(PATH, vmm::modules::Cpio::EXECUTABLE, &program(regs, rounds));
    bytes.extend_from_slice(&cpio.finish());
    bytes
}
