//! Behaviour of the trap layer on a mock vCPU over real guest memory with
//! hand-built IA-32e page tables, GDT and IDT.

use bus::{StoreKind, StoreReply};
use iced_x86::code_asm::*;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::emulator::test_cpu::register_and_memory_accessors;
use crate::x86::rflags;
use viommu::paging::pf_error;

// ---------------------------------------------------------------------------
// The machine
// ---------------------------------------------------------------------------

const RAM_SIZE: usize = 16 << 20;

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_NX: u64 = 1 << 63;
const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// Kernel code (supervisor, executable).
const KCODE: u64 = 0xffff_ffff_8100_0000;
const KCODE_PA: u64 = 0x10_0000;
/// Two pages of kernel data (supervisor, NX).
const KDATA: u64 = 0xffff_8880_0020_0000;
const KDATA_PA: u64 = 0x20_0000;
/// User code (user, executable).
const UCODE: u64 = 0x40_0000;
const UCODE_PA: u64 = 0x30_0000;
/// Two pages of user data (user, NX).
const UDATA: u64 = 0x60_0000;
const UDATA_PA: u64 = 0x31_0000;
/// A user page of RAM used as a MOVDIR64B destination.
const URAM: u64 = 0x70_0000;
const URAM_PA: u64 = 0x32_0000;
/// A user mapping of the device portal.
const PORTAL: u64 = 0x7f00_0000;
const PORTAL_PA: u64 = crate::layout::TEST_DEVICES_START;
/// A supervisor mapping of the same portal (SMAP forbids CPL 0 stores to
/// the user mapping).
const KPORTAL: u64 = 0xffff_c900_0010_0000;
/// Kernel stack page.
const KSTACK: u64 = 0xffff_c900_0000_0000;
const KSTACK_PA: u64 = 0x40_0000;
/// GDT and IDT pages.
const GDT: u64 = 0xffff_fe00_0000_0000;
const GDT_PA: u64 = 0x41_0000;
const IDT: u64 = 0xffff_fe00_0000_1000;
const IDT_PA: u64 = 0x41_1000;
/// The #UD handler.
const UD_HANDLER: u64 = KCODE + 0x800;

const KERNEL_CS: u16 = 0x10;
const KERNEL_SS: u16 = 0x18;
const USER_SS: u16 = 0x2b;
const USER_CS: u16 = 0x33;
const USER_RSP: u64 = 0x7fff_f000;

const PASID_VALID: u64 = 1 << 31;

#[derive(Clone, Debug, PartialEq)]
struct Injected {
    vector: u8,
    error_code: Option<u32>,
    cr2: Option<u64>,
    /// RIP and CS selector of the vCPU when the exception was injected.
    rip: u64,
    cs: u16,
}

impl Injected {
    fn at(e: Exception, rip: u64, selector: u16) -> Self {
        Injected {
            vector: e.vector,
            error_code: e.error_code,
            cr2: e.cr2,
            rip,
            cs: selector,
        }
    }
}

struct MockCpu {
    mem: GuestMemoryMmap,
    regs: kvm_regs,
    sregs: kvm_sregs,
    pasid: u64,
    /// What the device answers to ENQCMD/ENQCMDS.
    device_reply: StoreReply,
    stores: Vec<(u64, [u8; 64], StoreKind)>,
    injected: Vec<Injected>,
    next_table: u64,
    /// MAXPHYADDR reported to the emulator.
    phys_bits: u8,
    /// Whether the platform answers the fallback instructions (PVM).
    fallback: bool,
    /// Device reads the emulator made: (GPA, length).
    device_reads: Vec<(u64, usize)>,
    /// Device writes the emulator made: (GPA, bytes).
    device_writes: Vec<(u64, Vec<u8>)>,
    /// The XSAVE family's view of the vCPU (IA32_PASID lives in `pasid`):
    /// a mock that answers the fallback instructions answers these too.
    xsave_image: Vec<u8>,
}

/// XCR0 of the mock: x87, SSE, AVX.
const MOCK_XCR0: u64 = 0b111;

/// What the mock portal device's registers read as: each byte its
/// guest-physical address's low byte, inverted.
fn portal_byte(gpa: u64) -> u8 {
    !(gpa as u8)
}

impl GuestCpu for MockCpu {
    register_and_memory_accessors!();
    fn ia32_pasid(&self) -> u64 {
        self.pasid
    }
    fn max_phys_addr_bits(&self) -> u8 {
        self.phys_bits
    }
    fn emulates(&self, _which: FallbackInstruction) -> bool {
        self.fallback
    }
    fn xstate(&mut self) -> Result<XState, EmulatorError> {
        Ok(XState {
            image: self.xsave_image.clone(),
            xcr0: MOCK_XCR0,
            xss: 0,
            pasid: self.pasid,
            // AVX at its standard offset, 256 bytes; PASID supervisor state.
            layout: XStateLayout::from_cpuid(|i| match i {
                2 => (256, 576, 0),
                10 => (8, 0, 1),
                _ => (0, 0, 0),
            }),
            features: XsaveFeatures::from_leaf_d1_eax(0b1111),
        })
    }
    fn set_xstate(&mut self, state: &XState) -> Result<(), EmulatorError> {
        self.xsave_image = state.image.clone();
        self.pasid = state.pasid;
        Ok(())
    }
    fn inject_exception(
        &mut self,
        vector: u8,
        error_code: Option<u32>,
        address: Option<u64>,
    ) -> Result<(), EmulatorError> {
        self.injected.push(Injected {
            vector,
            error_code,
            cr2: address,
            rip: self.regs.rip,
            cs: self.sregs.cs.selector,
        });
        Ok(())
    }
    fn store64(
        &mut self,
        gpa: u64,
        data: &[u8; 64],
        kind: StoreKind,
    ) -> Result<StoreReply, EmulatorError> {
        self.stores.push((gpa, *data, kind));
        if (PORTAL_PA..PORTAL_PA + 0x1000).contains(&gpa) {
            return Ok(match kind {
                StoreKind::Movdir64b => StoreReply::Accepted,
                _ => self.device_reply,
            });
        }
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| EmulatorError::Store {
                gpa,
                message: e.to_string(),
            })?;
        // RAM is no enqueue register: it never accepts a command.
        Ok(match kind {
            StoreKind::Movdir64b => StoreReply::Accepted,
            _ => StoreReply::Retry,
        })
    }
    fn write_device(&mut self, gpa: u64, data: &[u8]) {
        self.device_writes.push((gpa, data.to_vec()));
    }
    fn read_device(&mut self, gpa: u64, data: &mut [u8]) {
        self.device_reads.push((gpa, data.len()));
        for (i, b) in data.iter_mut().enumerate() {
            let at = gpa + i as u64;
            *b = if (PORTAL_PA..PORTAL_PA + 0x1000).contains(&at) {
                portal_byte(at)
            } else {
                0xff
            };
        }
    }
}

fn segment(selector: u16, dpl: u8, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl MockCpu {
    /// 64-bit mode, CPL 0, 4-level paging with SMEP/SMAP/NXE/WP on, the
    /// mappings above, a GDT with Linux's selectors and an IDT with #UD.
    fn new() -> Self {
        Self::with_levels(4)
    }

    fn with_levels(levels: u8) -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM_SIZE)]).unwrap();
        let mut sregs = kvm_sregs {
            cr0: 0x8001_0033, // PG, WP, NE, ET, MP, PE
            cr3: 0x1000,
            cr4: 0x30_06a0 | if levels == 5 { 1 << 12 } else { 0 }, // SMAP, SMEP, PAE, ...
            efer: 0xd00,                                            // NXE, LMA, LME
            cs: segment(KERNEL_CS, 0, true),
            ss: segment(KERNEL_SS, 0, false),
            ..Default::default()
        };
        sregs.ds = segment(0, 0, false);
        sregs.es = sregs.ds;
        sregs.gdt.base = GDT;
        sregs.gdt.limit = 0x7f;
        sregs.idt.base = IDT;
        sregs.idt.limit = 0xfff;
        let regs = kvm_regs {
            rflags: 0x2,
            rip: KCODE,
            ..Default::default()
        };
        let mut cpu = MockCpu {
            mem,
            regs,
            sregs,
            pasid: PASID_VALID | 0x1234,
            device_reply: StoreReply::Accepted,
            stores: Vec::new(),
            injected: Vec::new(),
            next_table: 0x2000,
            phys_bits: 52,
            fallback: true,
            device_reads: Vec::new(),
            device_writes: Vec::new(),
            xsave_image: vec![0; 4096],
        };
        let kernel_rw = PTE_P | PTE_RW | PTE_NX;
        let user_rw = kernel_rw | PTE_US;
        cpu.map(KCODE, KCODE_PA, PTE_P);
        cpu.map(KDATA, KDATA_PA, kernel_rw);
        cpu.map(KDATA + 0x1000, KDATA_PA + 0x1000, kernel_rw);
        cpu.map(UCODE, UCODE_PA, PTE_P | PTE_US);
        cpu.map(UDATA, UDATA_PA, user_rw);
        cpu.map(UDATA + 0x1000, UDATA_PA + 0x1000, user_rw);
        cpu.map(URAM, URAM_PA, user_rw);
        cpu.map(PORTAL, PORTAL_PA, user_rw);
        cpu.map(KPORTAL, PORTAL_PA, kernel_rw);
        cpu.map(KSTACK, KSTACK_PA, kernel_rw);
        cpu.map(GDT, GDT_PA, PTE_P | PTE_NX);
        cpu.map(IDT, IDT_PA, PTE_P | PTE_NX);
        // Linux's GDT layout: kernel CS 0x10, kernel DS 0x18, user DS 0x2b,
        // user CS 0x33.
        for (index, desc) in [
            (2u64, 0x00af_9b00_0000_ffffu64),
            (3, 0x00cf_9300_0000_ffff),
            (5, 0x00cf_f300_0000_ffff),
            (6, 0x00af_fb00_0000_ffff),
            // Linux's __USER32_CS 0x23 and __KERNEL32_CS 0x08: 32-bit code.
            (4, 0x00cf_fb00_0000_ffff),
            (1, 0x00cf_9b00_0000_ffff),
        ] {
            cpu.mem
                .write_obj(desc, GuestAddress(GDT_PA + index * 8))
                .unwrap();
        }
        cpu.set_gate(6, UD_HANDLER);
        cpu
    }

    fn alloc_table(&mut self) -> u64 {
        let t = self.next_table;
        self.next_table += 0x1000;
        assert!(t < KCODE_PA, "page-table area full");
        t
    }

    /// Maps the 4 KiB page at `va` to `pa` with leaf `flags`; intermediate
    /// entries allow everything, so the leaf decides.
    fn map(&mut self, va: u64, pa: u64, flags: u64) {
        let levels = if self.sregs.cr4 & (1 << 12) != 0 {
            5
        } else {
            4
        };
        let mut table = self.sregs.cr3 & PTE_ADDR;
        for level in (2..=levels).rev() {
            let index = (va >> (12 + 9 * (level - 1))) & 0x1ff;
            let at = GuestAddress(table + index * 8);
            let mut entry: u64 = self.mem.read_obj(at).unwrap();
            if entry & PTE_P == 0 {
                entry = self.alloc_table() | PTE_P | PTE_RW | PTE_US;
                self.mem.write_obj(entry, at).unwrap();
            }
            table = entry & PTE_ADDR;
        }
        let index = (va >> 12) & 0x1ff;
        self.mem
            .write_obj(pa | flags, GuestAddress(table + index * 8))
            .unwrap();
    }

    fn unmap(&mut self, va: u64) {
        self.map(va, 0, 0);
    }

    /// Address of the entry at `level` (4 = PML4 ... 1 = PTE) that maps
    /// `va`, which must be mapped down to that level.
    fn entry_addr(&self, va: u64, level: u64) -> u64 {
        let mut table = self.sregs.cr3 & PTE_ADDR;
        for l in (level + 1..=4).rev() {
            let index = (va >> (12 + 9 * (l - 1))) & 0x1ff;
            let entry: u64 = self.mem.read_obj(GuestAddress(table + index * 8)).unwrap();
            table = entry & PTE_ADDR;
        }
        table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8
    }

    fn pte(&self, va: u64) -> u64 {
        self.mem
            .read_obj(GuestAddress(self.entry_addr(va, 1)))
            .unwrap()
    }

    fn set_gate(&mut self, vector: u64, handler: u64) {
        let lo = (handler & 0xffff)
            | (u64::from(KERNEL_CS) << 16)
            | (0x8e << 40) // present, DPL 0, 64-bit interrupt gate
            | ((handler & 0xffff_0000) << 32);
        let hi = handler >> 32;
        self.mem
            .write_obj(lo, GuestAddress(IDT_PA + vector * 16))
            .unwrap();
        self.mem
            .write_obj(hi, GuestAddress(IDT_PA + vector * 16 + 8))
            .unwrap();
    }

    /// Guest-physical address of `va` in this machine's fixed mappings.
    fn pa(va: u64) -> u64 {
        for (base, pa, len) in [
            (KCODE, KCODE_PA, 0x1000),
            (KDATA, KDATA_PA, 0x2000),
            (UCODE, UCODE_PA, 0x1000),
            (UDATA, UDATA_PA, 0x2000),
            (URAM, URAM_PA, 0x1000),
            (KSTACK, KSTACK_PA, 0x1000),
        ] {
            if (base..base + len).contains(&va) {
                return pa + (va - base);
            }
        }
        panic!("{va:#x} is not a test mapping");
    }

    fn write(&self, va: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(Self::pa(va)))
            .unwrap();
    }

    fn read<const N: usize>(&self, va: u64) -> [u8; N] {
        let mut b = [0u8; N];
        self.mem
            .read_slice(&mut b, GuestAddress(Self::pa(va)))
            .unwrap();
        b
    }

    /// Switches to CPL 3 (the context a user-mode MOVDIR64B to MMIO traps
    /// in), with the usual operands: RAX = the user portal mapping, RDX = a
    /// descriptor in user data.
    fn enter_user(&mut self) {
        self.regs.rax = PORTAL;
        self.regs.rdx = UDATA;
        self.write(UDATA, &descriptor());
        self.sregs.cs = segment(USER_CS, 3, true);
        self.sregs.ss = segment(USER_SS, 3, false);
        self.regs.rip = UCODE;
        self.regs.rsp = USER_RSP;
        self.regs.rflags = 0x202;
    }

    /// Places code at the current RIP and returns its bytes.
    fn place(&mut self, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
        let bytes = assemble(self.regs.rip, f);
        self.write(self.regs.rip, &bytes);
        bytes
    }
}

/// A test instruction, written with the code assembler.
type Asm = fn(&mut CodeAssembler) -> Result<(), IcedError>;

fn assemble(ip: u64, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    f(&mut a).unwrap();
    a.assemble(ip).unwrap()
}

/// A recognisable 64-byte descriptor whose dword 0 is all ones (so every
/// bit ENQCMD/ENQCMDS must rewrite is visible).
fn descriptor() -> [u8; 64] {
    let mut d = [0u8; 64];
    for (i, b) in d.iter_mut().enumerate() {
        *b = 0x40 + i as u8;
    }
    d[..4].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
    d
}

/// Runs the emulation-failure path on `bytes` and checks that it raised
/// `expected` as a fault: injected once, with the vCPU still at the
/// instruction and no store made.
fn assert_raises(cpu: &mut MockCpu, bytes: &[u8], expected: Exception) {
    let (rip, selector) = (cpu.regs.rip, cpu.sregs.cs.selector);
    let outcome = handle_emulation_failure(cpu, bytes).unwrap();
    assert_eq!(outcome, Outcome::Exception(expected));
    assert_eq!(cpu.regs.rip, rip, "RIP stays at the faulting instruction");
    assert_eq!(cpu.injected, vec![Injected::at(expected, rip, selector)]);
    assert!(cpu.stores.is_empty());
}

fn dword0(data: &[u8; 64]) -> u32 {
    u32::from_le_bytes([data[0], data[1], data[2], data[3]])
}

// ---------------------------------------------------------------------------
// ENQCMD / ENQCMDS / MOVDIR64B through the emulation-failure exit
// ---------------------------------------------------------------------------

/// CPL 0 `enqcmd rax, [rdx]` to the portal with the source in kernel data.
fn enqcmd_machine() -> (MockCpu, Vec<u8>) {
    let mut cpu = MockCpu::new();
    cpu.regs.rax = KPORTAL;
    cpu.regs.rdx = KDATA + 0x100;
    cpu.write(KDATA + 0x100, &descriptor());
    let bytes = cpu.place(|a| a.enqcmd(rax, ptr(rdx)));
    (cpu, bytes)
}

#[test]
fn enqcmd_accepted_clears_zf_and_carries_the_msr_pasid() {
    let (mut cpu, bytes) = enqcmd_machine();
    cpu.pasid = PASID_VALID | 0xabcde;
    cpu.regs.rflags =
        0x2 | rflags::ZF | rflags::CF | rflags::OF | rflags::SF | rflags::AF | rflags::PF;

    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();

    assert_eq!(
        outcome,
        Outcome::Store(StoreRecord {
            kind: StoreKind::Enqcmd,
            linear: KPORTAL,
            gpa: PORTAL_PA,
            reply: StoreReply::Accepted,
        })
    );
    assert_eq!(cpu.regs.rip, KCODE + bytes.len() as u64);
    assert_eq!(
        cpu.regs.rflags, 0x2,
        "ZF=0 on accept, other status flags cleared"
    );
    assert_eq!(cpu.stores.len(), 1);
    let (gpa, data, kind) = cpu.stores[0];
    assert_eq!((gpa, kind), (PORTAL_PA, StoreKind::Enqcmd));
    assert_eq!(
        dword0(&data),
        0xabcde,
        "PASID from the MSR, bits 30:20 and privilege 31 clear"
    );
    assert_eq!(data[4..], descriptor()[4..]);
    assert!(cpu.injected.is_empty());
}

#[test]
fn enqcmd_retry_sets_zf() {
    let (mut cpu, bytes) = enqcmd_machine();
    cpu.device_reply = StoreReply::Retry;
    cpu.regs.rflags = 0x2 | rflags::CF;

    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();

    assert!(matches!(
        outcome,
        Outcome::Store(StoreRecord {
            reply: StoreReply::Retry,
            ..
        })
    ));
    assert_eq!(cpu.regs.rflags, 0x2 | rflags::ZF);
    assert_eq!(cpu.regs.rip, KCODE + bytes.len() as u64);
    assert_eq!(dword0(&cpu.stores[0].1), 0x1234);
}

#[test]
fn enqcmd_with_invalid_pasid_msr_is_gp0_and_rip_stays() {
    let (mut cpu, bytes) = enqcmd_machine();
    cpu.pasid = 0x1234; // valid bit clear
    let before = cpu.regs;

    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();

    assert_eq!(outcome, Outcome::Exception(Exception::gp0()));
    assert_eq!(cpu.regs, before);
    assert!(cpu.stores.is_empty());
    assert_eq!(
        cpu.injected,
        vec![Injected::at(Exception::gp0(), KCODE, KERNEL_CS)]
    );
}

#[test]
fn enqcmd_with_invalid_msr_faults_before_touching_memory() {
    // Source unmapped too: the MSR check comes first, so #GP, not #PF.
    let (mut cpu, bytes) = enqcmd_machine();
    cpu.pasid = 0;
    cpu.unmap(KDATA);
    assert_raises(&mut cpu, &bytes, Exception::gp0());
}

#[test]
fn enqcmds_keeps_source_pasid_and_privilege() {
    let mut cpu = MockCpu::new();
    cpu.pasid = 0; // not used by ENQCMDS
    let mut desc = descriptor();
    desc[..4].copy_from_slice(&(0x8000_0000u32 | 0x7ff0_0000 | 0x4_2042).to_le_bytes());
    cpu.write(KDATA, &desc);
    cpu.regs.rsi = KPORTAL + 0x40;
    cpu.regs.rdi = KDATA;
    let bytes = cpu.place(|a| a.enqcmds(rsi, ptr(rdi)));
    cpu.device_reply = StoreReply::Retry;

    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();

    assert_eq!(
        outcome,
        Outcome::Store(StoreRecord {
            kind: StoreKind::Enqcmds,
            linear: KPORTAL + 0x40,
            gpa: PORTAL_PA + 0x40,
            reply: StoreReply::Retry,
        })
    );
    let data = cpu.stores[0].1;
    assert_eq!(
        dword0(&data),
        0x8004_2042,
        "source PASID and privilege kept, bits 30:20 cleared"
    );
    assert_eq!(data[4..], desc[4..]);
    assert_eq!(cpu.regs.rflags & rflags::ZF, rflags::ZF);
}

#[test]
fn enqcmds_at_cpl3_is_gp0() {
    let mut cpu = MockCpu::new();
    cpu.enter_user();
    let bytes = cpu.place(|a| a.enqcmds(rax, ptr(rdx)));

    assert_raises(&mut cpu, &bytes, Exception::gp0());
}

#[test]
fn movdir64b_to_device_is_verbatim_and_leaves_flags() {
    let mut cpu = MockCpu::new();
    cpu.write(KDATA + 0x10, &descriptor());
    cpu.regs.rcx = KPORTAL + 0xc0;
    cpu.regs.rbx = KDATA;
    cpu.regs.rflags = 0x2 | rflags::ZF | rflags::CF;
    let bytes = cpu.place(|a| a.movdir64b(rcx, ptr(rbx + 0x10)));

    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();

    assert_eq!(
        outcome,
        Outcome::Store(StoreRecord {
            kind: StoreKind::Movdir64b,
            linear: KPORTAL + 0xc0,
            gpa: PORTAL_PA + 0xc0,
            reply: StoreReply::Accepted,
        })
    );
    assert_eq!(cpu.stores[0].1, descriptor());
    assert_eq!(
        cpu.regs.rflags,
        0x2 | rflags::ZF | rflags::CF,
        "MOVDIR64B changes no flag"
    );
    assert_eq!(cpu.regs.rip, KCODE + bytes.len() as u64);
}

#[test]
fn movdir64b_at_cpl3_to_ram_writes_ram() {
    let mut cpu = MockCpu::new();
    cpu.enter_user();
    cpu.write(UDATA + 0xff0, &descriptor()); // crosses into the second page
    cpu.regs.r8 = URAM + 0x80;
    cpu.regs.r9 = UDATA + 0xff0;
    let bytes = cpu.place(|a| a.movdir64b(r8, ptr(r9)));

    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();

    assert!(matches!(outcome, Outcome::Store(StoreRecord { gpa, .. }) if gpa == URAM_PA + 0x80));
    assert_eq!(cpu.read::<64>(URAM + 0x80), descriptor());
    assert_eq!(cpu.regs.rip, UCODE + bytes.len() as u64);
}

#[test]
fn misaligned_destination_is_gp0() {
    for offset in [1u64, 8, 32, 63] {
        let (mut cpu, bytes) = enqcmd_machine();
        cpu.regs.rax = KPORTAL + offset;
        assert_eq!(
            handle_emulation_failure(&mut cpu, &bytes).unwrap(),
            Outcome::Exception(Exception::gp0()),
            "destination offset {offset}"
        );
        assert_eq!(cpu.regs.rip, KCODE);
        assert!(cpu.stores.is_empty());
    }
}

#[test]
fn non_canonical_source_is_gp0_or_ss0() {
    let mut cpu = MockCpu::new();
    cpu.regs.rax = KPORTAL;
    cpu.regs.rdx = 0x8000_0000_0000;
    let bytes = cpu.place(|a| a.movdir64b(rax, ptr(rdx)));
    assert_raises(&mut cpu, &bytes, Exception::gp0());

    let mut cpu = MockCpu::new();
    cpu.regs.rax = KPORTAL;
    cpu.regs.rbp = 0x7fff_ffff_fff0; // the 64 bytes run past the canonical end
    let bytes = cpu.place(|a| a.movdir64b(rax, ptr(rbp)));
    assert_raises(&mut cpu, &bytes, Exception::ss0());
    assert_eq!(cpu.injected[0].error_code, Some(0));
    assert_eq!(cpu.injected[0].vector, 12);
}

#[test]
fn non_canonical_destination_is_gp0() {
    let (mut cpu, bytes) = enqcmd_machine();
    cpu.regs.rax = 0x1234_5678_0000_0000;
    assert_raises(&mut cpu, &bytes, Exception::gp0());
}

#[test]
fn source_not_present_is_pf_with_error_code_and_cr2() {
    let (mut cpu, bytes) = enqcmd_machine();
    cpu.unmap(KDATA);
    // Supervisor read of a not-present page: error code 0.
    assert_raises(&mut cpu, &bytes, Exception::page_fault(0, KDATA + 0x100));
}

#[test]
fn source_split_over_a_missing_second_page_faults_on_that_page() {
    let (mut cpu, bytes) = enqcmd_machine();
    cpu.regs.rdx = KDATA + 0xfe0;
    cpu.unmap(KDATA + 0x1000);
    assert_raises(&mut cpu, &bytes, Exception::page_fault(0, KDATA + 0x1000));
}

#[test]
fn user_source_on_supervisor_page_is_pf_present_user() {
    let mut cpu = MockCpu::new();
    cpu.enter_user();
    cpu.regs.rdx = KDATA + 0x40;
    let bytes = cpu.place(|a| a.movdir64b(rax, ptr(rdx)));

    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();

    assert_eq!(
        outcome,
        Outcome::Exception(Exception::page_fault(
            pf_error::PRESENT | pf_error::USER,
            KDATA + 0x40
        ))
    );
    assert_eq!(cpu.injected[0].error_code, Some(5));
    assert_eq!(cpu.injected[0].rip, UCODE);
}

#[test]
fn read_only_destination_is_pf_write() {
    let mut cpu = MockCpu::new();
    cpu.map(PORTAL, PORTAL_PA, PTE_P | PTE_US | PTE_NX);
    cpu.enter_user();
    let bytes = cpu.place(|a| a.enqcmd(rax, ptr(rdx)));

    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();

    assert_eq!(
        outcome,
        Outcome::Exception(Exception::page_fault(
            pf_error::PRESENT | pf_error::WRITE | pf_error::USER,
            PORTAL
        ))
    );
}

#[test]
fn smap_blocks_supervisor_source_on_user_page_unless_ac() {
    let (mut cpu, bytes) = enqcmd_machine();
    cpu.regs.rdx = UDATA;
    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();
    assert_eq!(
        outcome,
        Outcome::Exception(Exception::page_fault(pf_error::PRESENT, UDATA))
    );

    let (mut cpu, bytes) = enqcmd_machine();
    cpu.regs.rdx = UDATA;
    cpu.regs.rflags |= rflags::AC;
    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();
    assert!(matches!(outcome, Outcome::Store(_)));
}

#[test]
fn address_size_prefix_truncates_source_and_destination() {
    let mut cpu = MockCpu::new();
    cpu.enter_user();
    // Only the low 32 bits of both registers count under 0x67.
    cpu.regs.rax = 0xdead_0000_0000_0000 | PORTAL;
    cpu.regs.rdx = 0xbeef_0000_0000_0000 | UDATA;
    cpu.write(UDATA, &descriptor());
    let bytes = cpu.place(|a| a.enqcmd(eax, ptr(edx)));
    assert_eq!(bytes[0], 0x67);

    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();

    assert_eq!(
        outcome,
        Outcome::Store(StoreRecord {
            kind: StoreKind::Enqcmd,
            linear: PORTAL,
            gpa: PORTAL_PA,
            reply: StoreReply::Accepted,
        })
    );
    assert_eq!(cpu.stores[0].1[4..], descriptor()[4..]);
}

#[test]
fn segment_override_uses_the_fs_or_gs_base() {
    let mut cpu = MockCpu::new();
    cpu.sregs.gs.base = KDATA;
    cpu.regs.rdx = 0x200;
    cpu.regs.rax = KPORTAL;
    cpu.write(KDATA + 0x200, &descriptor());
    let bytes = cpu.place(|a| a.movdir64b(rax, ptr(rdx).gs()));
    assert_eq!(bytes[0], 0x65);

    assert!(matches!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Store(_)
    ));
    assert_eq!(cpu.stores[0].1, descriptor());
}

#[test]
fn rip_relative_source() {
    let mut cpu = MockCpu::new();
    cpu.regs.rax = KPORTAL;
    cpu.regs.rip = KCODE + 0x100;
    cpu.write(KCODE + 0x400, &descriptor());
    // The assembler resolves the label to a RIP-relative displacement.
    let bytes = cpu.place(|a| {
        let mut data = a.create_label();
        a.movdir64b(rax, ptr(data))?;
        // Pad up to KCODE + 0x400.
        let pad = 0x300 - 9;
        a.db(&vec![0x90; pad])?;
        a.set_label(&mut data)?;
        a.db(&descriptor())
    });
    let insn = &bytes[..9];

    assert!(matches!(
        handle_emulation_failure(&mut cpu, insn).unwrap(),
        Outcome::Store(_)
    ));
    assert_eq!(cpu.stores[0].1, descriptor());
}

#[test]
fn five_level_paging() {
    let mut cpu = MockCpu::with_levels(5);
    let high_user = 0x00ff_0000_0000_0000u64; // needs 57-bit addresses
    cpu.map(high_user, UDATA_PA, PTE_P | PTE_RW | PTE_US | PTE_NX);
    cpu.write(UDATA, &descriptor());
    cpu.enter_user();
    cpu.regs.rdx = high_user;
    let bytes = cpu.place(|a| a.enqcmd(rax, ptr(rdx)));

    assert!(matches!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Store(_)
    ));
    assert_eq!(cpu.stores[0].1[4..], descriptor()[4..]);

    // The same address is non-canonical with 4-level paging.
    let mut cpu = MockCpu::new();
    cpu.enter_user();
    cpu.regs.rdx = high_user;
    let bytes = cpu.place(|a| a.enqcmd(rax, ptr(rdx)));
    assert_raises(&mut cpu, &bytes, Exception::gp0());
}

#[test]
fn bytes_missing_from_the_exit_are_fetched_at_rip() {
    let (mut cpu, _) = enqcmd_machine();
    assert!(matches!(
        handle_emulation_failure(&mut cpu, &[]).unwrap(),
        Outcome::Store(_)
    ));
}

#[test]
fn source_in_device_memory_is_read_from_the_device() {
    // The portal page itself as the source: its registers answer, in
    // aligned 8-byte reads, and the store carries what they returned.
    let mut cpu = MockCpu::new();
    cpu.regs.rax = KPORTAL;
    cpu.regs.rdx = KPORTAL + 0x40;
    let bytes = cpu.place(|a| a.movdir64b(rax, ptr(rdx)));
    let rip = cpu.regs.rip;

    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();

    assert!(matches!(outcome, Outcome::Store(_)), "{outcome:?}");
    let expected: Vec<u8> = (0..64).map(|i| portal_byte(PORTAL_PA + 0x40 + i)).collect();
    assert_eq!(cpu.stores.len(), 1);
    assert_eq!(cpu.stores[0].1.to_vec(), expected);
    assert_eq!(
        cpu.device_reads,
        (0..8)
            .map(|i| (PORTAL_PA + 0x40 + 8 * i, 8))
            .collect::<Vec<_>>()
    );
    assert_eq!(cpu.regs.rip, rip + bytes.len() as u64);
    assert!(cpu.injected.is_empty());
}

#[test]
fn misaligned_device_source_is_read_in_aligned_pieces() {
    let mut cpu = MockCpu::new();
    cpu.regs.rax = KPORTAL;
    cpu.regs.rdx = KPORTAL + 0x43;
    let bytes = cpu.place(|a| a.movdir64b(rax, ptr(rdx)));
    assert!(matches!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Store(_)
    ));
    let expected: Vec<u8> = (0..64).map(|i| portal_byte(PORTAL_PA + 0x43 + i)).collect();
    assert_eq!(cpu.stores[0].1.to_vec(), expected);
    let base = PORTAL_PA + 0x40;
    let mut pieces = vec![(base + 3, 1), (base + 4, 4)];
    pieces.extend((1..8).map(|i| (base + 8 * i, 8)));
    pieces.extend([(base + 64, 2), (base + 66, 1)]);
    assert_eq!(cpu.device_reads, pieces);
}

#[test]
fn source_straddling_the_end_of_ram_reads_ones_past_it() {
    // Two kernel pages: the last page of RAM, then the first page past it
    // (nothing there); the source's first 32 bytes are RAM.
    const VA: u64 = 0xffff_8880_0800_0000;
    let mut cpu = MockCpu::new();
    cpu.map(VA, RAM_SIZE as u64 - 0x1000, PTE_P | PTE_RW | PTE_NX);
    cpu.map(VA + 0x1000, RAM_SIZE as u64, PTE_P | PTE_RW | PTE_NX);
    let ram: Vec<u8> = (0..32).map(|i| 0x80 | i as u8).collect();
    cpu.mem
        .write_slice(&ram, GuestAddress(RAM_SIZE as u64 - 32))
        .unwrap();
    cpu.regs.rax = KPORTAL;
    cpu.regs.rdx = VA + 0x1000 - 32;
    let bytes = cpu.place(|a| a.movdir64b(rax, ptr(rdx)));

    assert!(matches!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Store(_)
    ));
    let mut expected = ram.clone();
    expected.extend([0xff; 32]);
    assert_eq!(cpu.stores[0].1.to_vec(), expected);
    assert_eq!(
        cpu.device_reads,
        (0..4)
            .map(|i| (RAM_SIZE as u64 + 8 * i, 8))
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------
// The #UD handler entry: user-mode ENQCMD
// ---------------------------------------------------------------------------

/// The user ran `code` at UCODE; it raised #UD; the vCPU is at the entry of
/// the #UD handler (`rip_offset` 0: breakpoint route; 4: after ENDBR64)
/// with the hardware frame on the kernel stack. General registers are the
/// user's.
fn at_ud_entry(
    rip_offset: u64,
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> (MockCpu, Vec<u8>) {
    let mut cpu = MockCpu::new();
    let user_code = assemble(UCODE, code);
    cpu.write(UCODE, &user_code);
    cpu.write(
        UD_HANDLER,
        &assemble(UD_HANDLER, |a| {
            a.endbr64()?;
            a.clac()?;
            a.ud2()
        }),
    );
    cpu.write(UDATA, &descriptor());
    cpu.regs.rax = PORTAL;
    cpu.regs.rdx = UDATA;
    let frame_rsp = KSTACK + 0x1000 - 40;
    let frame = [
        UCODE,
        u64::from(USER_CS),
        0x202 | rflags::CF | rflags::SF,
        USER_RSP,
        u64::from(USER_SS),
    ];
    for (i, v) in frame.iter().enumerate() {
        cpu.write(frame_rsp + 8 * i as u64, &v.to_le_bytes());
    }
    cpu.regs.rsp = frame_rsp;
    cpu.regs.rip = UD_HANDLER + rip_offset;
    cpu.regs.rflags = 0x2;
    (cpu, user_code)
}

fn assert_back_in_user(cpu: &MockCpu, rip: u64) {
    assert_eq!(cpu.regs.rip, rip);
    assert_eq!(cpu.regs.rsp, USER_RSP);
    assert_eq!(cpu.sregs.cs.selector, USER_CS);
    assert_eq!(
        (cpu.sregs.cs.dpl, cpu.sregs.cs.l, cpu.sregs.cs.present),
        (3, 1, 1)
    );
    assert_eq!(cpu.sregs.ss.selector, USER_SS);
    assert_eq!((cpu.sregs.ss.dpl, cpu.sregs.ss.present), (3, 1));
}

/// A user ENQCMD at the #UD entry (the host lacks ENQCMD) or at the #GP
/// entry with error code 0 (the host has it; its IA32_PASID is not the
/// guest's): both are answered the same way.
#[test]
fn user_enqcmd_at_ud_or_gp_entry_is_emulated_and_returns_to_user() {
    let cases = [(StoreReply::Accepted, 0), (StoreReply::Retry, rflags::ZF)];
    for ((reply, zf), vector) in cases.into_iter().flat_map(|c| [(c, 6), (c, 13)]) {
        let enqcmd: Asm = |a| a.enqcmd(rax, ptr(rdx));
        let (mut cpu, code) = if vector == 6 {
            at_ud_entry(0, enqcmd)
        } else {
            at_user_gp_entry(0, enqcmd)
        };
        cpu.device_reply = reply;
        cpu.pasid = PASID_VALID | 0x5_4321;

        let action = handle_exception_entry(&mut cpu, vector).unwrap();

        assert_eq!(
            action,
            EntryAction::Emulated(StoreRecord {
                kind: StoreKind::Enqcmd,
                linear: PORTAL,
                gpa: PORTAL_PA,
                reply,
            })
        );
        assert_back_in_user(&cpu, UCODE + code.len() as u64);
        // User RFLAGS from the frame with the status flags from the answer.
        assert_eq!(cpu.regs.rflags, 0x202 | zf);
        assert_eq!(
            (cpu.regs.rax, cpu.regs.rdx),
            (PORTAL, UDATA),
            "user registers kept"
        );
        assert_eq!(dword0(&cpu.stores[0].1), 0x5_4321);
        assert!(cpu.injected.is_empty());
    }
}

/// The user CS and SS descriptors come each from where the guest's page
/// tables put their bytes, on two GDT pages that map to physical pages far
/// apart: SS at the end of the first page and CS at the start of the
/// second, then SS straddling the two.
#[test]
fn user_descriptors_on_two_pages_are_each_read_through_their_own_page() {
    const GDT2: u64 = 0xffff_fe00_0001_0000;
    const PAGE_A_PA: u64 = 0x42_0000;
    const PAGE_B_PA: u64 = 0x44_0000;
    // SS (0x2b) is at offset 0x28, CS (0x33) at 0x30.
    for base in [GDT2 + 0x1000 - 0x30, GDT2 + 0x1000 - 0x2c] {
        let (mut cpu, code) = at_ud_entry(0, |a| a.enqcmd(rax, ptr(rdx)));
        cpu.map(GDT2, PAGE_A_PA, PTE_P | PTE_NX);
        cpu.map(GDT2 + 0x1000, PAGE_B_PA, PTE_P | PTE_NX);
        for index in 0..8u64 {
            let desc: u64 = cpu.mem.read_obj(GuestAddress(GDT_PA + index * 8)).unwrap();
            for (i, byte) in desc.to_le_bytes().into_iter().enumerate() {
                let linear = base + index * 8 + i as u64;
                let pa = if linear < GDT2 + 0x1000 {
                    PAGE_A_PA + (linear - GDT2)
                } else {
                    PAGE_B_PA + (linear - GDT2 - 0x1000)
                };
                cpu.mem.write_obj(byte, GuestAddress(pa)).unwrap();
            }
        }
        cpu.sregs.gdt.base = base;

        let action = handle_exception_entry(&mut cpu, 6).unwrap();

        assert!(
            matches!(action, EntryAction::Emulated(_)),
            "GDT at {base:#x}: {action:?}"
        );
        assert_back_in_user(&cpu, UCODE + code.len() as u64);
    }
}

#[test]
fn user_enqcmd_through_the_clac_at_linux_entry() {
    let (mut cpu, code) = at_ud_entry(4, |a| a.enqcmd(rax, ptr(rdx)));
    let clac = cpu.read::<3>(UD_HANDLER + 4);
    assert_eq!(clac, [0x0f, 0x01, 0xca]);

    let outcome = handle_emulation_failure(&mut cpu, &clac).unwrap();

    assert_eq!(
        outcome,
        Outcome::ExceptionEntry {
            vector: 6,
            action: EntryAction::Emulated(StoreRecord {
                kind: StoreKind::Enqcmd,
                linear: PORTAL,
                gpa: PORTAL_PA,
                reply: StoreReply::Accepted,
            })
        }
    );
    assert_back_in_user(&cpu, UCODE + code.len() as u64);
    assert_eq!(cpu.regs.rflags, 0x202);
}

#[test]
fn user_enqcmd_with_invalid_msr_gets_gp0_in_user_context() {
    let (mut cpu, _) = at_ud_entry(0, |a| a.enqcmd(rax, ptr(rdx)));
    cpu.pasid = 0x77;

    let action = handle_exception_entry(&mut cpu, 6).unwrap();

    assert_eq!(action, EntryAction::Faulted(Exception::gp0()));
    assert_back_in_user(&cpu, UCODE);
    assert_eq!(
        cpu.regs.rflags,
        0x202 | rflags::CF | rflags::SF,
        "flags as the user left them"
    );
    assert_eq!(
        cpu.injected,
        vec![Injected::at(Exception::gp0(), UCODE, USER_CS)]
    );
    assert!(cpu.stores.is_empty());
}

#[test]
fn user_enqcmds_is_gp0_in_user_context() {
    let (mut cpu, _) = at_ud_entry(0, |a| a.enqcmds(rax, ptr(rdx)));
    assert_eq!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::Faulted(Exception::gp0())
    );
    assert_back_in_user(&cpu, UCODE);
    assert_eq!(cpu.injected[0].cs, USER_CS);
}

#[test]
fn user_enqcmd_source_page_fault_is_delivered_from_user_context() {
    // Source on a supervisor page.
    let (mut cpu, _) = at_ud_entry(0, |a| a.enqcmd(rax, ptr(rdx)));
    cpu.regs.rdx = KDATA + 8;
    assert_eq!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::Faulted(Exception::page_fault(5, KDATA + 8))
    );
    assert_back_in_user(&cpu, UCODE);
    assert_eq!(
        cpu.injected,
        vec![Injected::at(
            Exception::page_fault(5, KDATA + 8),
            UCODE,
            USER_CS
        )]
    );

    // Source not present: user read, error code 4.
    let (mut cpu, _) = at_ud_entry(0, |a| a.enqcmd(rax, ptr(rdx)));
    cpu.unmap(UDATA);
    assert_eq!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::Faulted(Exception::page_fault(pf_error::USER, UDATA))
    );
}

#[test]
fn user_movdir64b_at_ud_entry_is_emulated() {
    let (mut cpu, code) = at_ud_entry(0, |a| a.movdir64b(rax, ptr(rdx)));
    let action = handle_exception_entry(&mut cpu, 6).unwrap();
    assert!(matches!(
        action,
        EntryAction::Emulated(StoreRecord {
            kind: StoreKind::Movdir64b,
            ..
        })
    ));
    assert_back_in_user(&cpu, UCODE + code.len() as u64);
    assert_eq!(
        cpu.regs.rflags,
        0x202 | rflags::CF | rflags::SF,
        "MOVDIR64B keeps the user's flags"
    );
}

/// The entry of `vector`'s handler is left to the guest: nothing changes,
/// nothing is stored or injected.
fn assert_passes_through(cpu: &mut MockCpu, vector: u8) {
    let before = (cpu.regs, cpu.sregs);
    assert_eq!(
        handle_exception_entry(cpu, vector).unwrap(),
        EntryAction::PassThrough
    );
    assert_eq!((cpu.regs, cpu.sregs), before);
    assert!(cpu.injected.is_empty() && cpu.stores.is_empty());
}

#[test]
fn ud2_at_ud_entry_passes_through_untouched() {
    let (mut cpu, _) = at_ud_entry(0, |a| a.ud2());
    assert_passes_through(&mut cpu, 6);
}

#[test]
fn ud2_through_the_clac_route_runs_the_clac() {
    let (mut cpu, _) = at_ud_entry(4, |a| a.ud2());
    cpu.regs.rflags = 0x2 | rflags::AC;
    let outcome = handle_emulation_failure(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap();
    assert_eq!(outcome, Outcome::Emulated(FallbackInstruction::Clac));
    assert_eq!(cpu.regs.rip, UD_HANDLER + 7);
    assert_eq!(cpu.regs.rflags, 0x2);
    assert_eq!(cpu.sregs.cs.selector, KERNEL_CS);
}

#[test]
fn a_frame_mixing_kernel_cs_and_user_ss_passes_through() {
    let (mut cpu, _) = at_ud_entry(0, |a| a.enqcmd(rax, ptr(rdx)));
    cpu.write(KSTACK + 0x1000 - 32, &u64::from(KERNEL_CS).to_le_bytes());
    assert_eq!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::PassThrough
    );
    assert!(cpu.stores.is_empty() && cpu.injected.is_empty());
}

#[test]
fn other_vectors_pass_through() {
    for v in [0, 1, 3, 14, 20] {
        let (mut cpu, _) = at_ud_entry(0, |a| a.enqcmd(rax, ptr(rdx)));
        let before = (cpu.regs, cpu.sregs);
        assert_eq!(
            handle_exception_entry(&mut cpu, v).unwrap(),
            EntryAction::PassThrough
        );
        assert_eq!((cpu.regs, cpu.sregs), before);
        assert!(cpu.stores.is_empty());
    }
}

// ---------------------------------------------------------------------------
// Kernel-mode ENQCMDS / MOVDIR64B / ENQCMD at the #UD entry (host lacks them)
// ---------------------------------------------------------------------------

/// Where the interrupted kernel code runs.
const KERNEL_INSN: u64 = KCODE + 0x100;
/// The interrupted kernel context's stack pointer (above the frame).
const KERNEL_RSP: u64 = KSTACK + 0xf00;
/// The interrupted kernel context's RFLAGS (IF set, some status flags).
const KERNEL_RFLAGS: u64 = 0x246 | rflags::CF;

/// The kernel ran `code` at KERNEL_INSN (RAX = the kernel portal mapping,
/// RDX = a descriptor in kernel data); the host CPU raised `vector`
/// (with `error_code` if any); the vCPU is at the entry of its handler,
/// RSP at the frame the CPU pushed without a privilege change (RIP, CS,
/// RFLAGS, RSP, SS = the kernel's, 16-byte aligned stack).
fn at_kernel_entry(
    vector: u8,
    error_code: Option<u64>,
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> (MockCpu, Vec<u8>) {
    let mut cpu = MockCpu::new();
    let handler = UD_HANDLER + 0x100 * u64::from(vector != 6);
    cpu.set_gate(u64::from(vector), handler);
    let kernel_code = assemble(KERNEL_INSN, code);
    cpu.write(KERNEL_INSN, &kernel_code);
    cpu.write(handler, &assemble(handler, |a| a.endbr64()));
    cpu.write(KDATA + 0x100, &descriptor());
    cpu.regs.rax = KPORTAL;
    cpu.regs.rdx = KDATA + 0x100;
    let mut frame = vec![
        KERNEL_INSN,
        u64::from(KERNEL_CS),
        KERNEL_RFLAGS,
        KERNEL_RSP,
        u64::from(KERNEL_SS),
    ];
    if let Some(e) = error_code {
        frame.insert(0, e);
    }
    let frame_rsp = (KERNEL_RSP & !0xf) - 8 * frame.len() as u64;
    for (i, v) in frame.iter().enumerate() {
        cpu.write(frame_rsp + 8 * i as u64, &v.to_le_bytes());
    }
    cpu.regs.rsp = frame_rsp;
    cpu.regs.rip = handler;
    cpu.regs.rflags = 0x2;
    (cpu, kernel_code)
}

fn assert_back_in_kernel(cpu: &MockCpu, rip: u64) {
    assert_eq!(cpu.regs.rip, rip);
    assert_eq!(cpu.regs.rsp, KERNEL_RSP, "the frame is popped, as IRETQ");
    assert_eq!(cpu.sregs.cs, segment(KERNEL_CS, 0, true));
    assert_eq!(cpu.sregs.ss, segment(KERNEL_SS, 0, false));
}

#[test]
fn kernel_enqcmds_at_ud_entry_is_emulated_and_returns_to_the_kernel() {
    for (reply, zf) in [(StoreReply::Accepted, 0), (StoreReply::Retry, rflags::ZF)] {
        let (mut cpu, code) = at_kernel_entry(6, None, |a| a.enqcmds(rax, ptr(rdx)));
        cpu.device_reply = reply;
        let mut source = descriptor();
        source[..4].copy_from_slice(&(0x8000_0000u32 | 0x7_7777).to_le_bytes());
        cpu.write(KDATA + 0x100, &source);

        let action = handle_exception_entry(&mut cpu, 6).unwrap();

        assert_eq!(
            action,
            EntryAction::Emulated(StoreRecord {
                kind: StoreKind::Enqcmds,
                linear: KPORTAL,
                gpa: PORTAL_PA,
                reply,
            })
        );
        assert_back_in_kernel(&cpu, KERNEL_INSN + code.len() as u64);
        // The kernel's RFLAGS (IF included) with ZF from the answer and the
        // other status flags cleared.
        assert_eq!(cpu.regs.rflags, 0x202 | zf);
        assert_eq!(
            dword0(&cpu.stores[0].1),
            0x8000_0000 | 0x7_7777,
            "source PASID and supervisor privilege"
        );
        assert_eq!(cpu.stores[0].1[4..], source[4..]);
        assert!(cpu.injected.is_empty());
    }
}

#[test]
fn kernel_movdir64b_at_ud_entry_is_emulated_and_keeps_the_flags() {
    let (mut cpu, code) = at_kernel_entry(6, None, |a| a.movdir64b(rax, ptr(rdx)));
    let action = handle_exception_entry(&mut cpu, 6).unwrap();
    assert!(
        matches!(
            action,
            EntryAction::Emulated(StoreRecord {
                kind: StoreKind::Movdir64b,
                gpa: PORTAL_PA,
                ..
            })
        ),
        "{action:?}"
    );
    assert_back_in_kernel(&cpu, KERNEL_INSN + code.len() as u64);
    assert_eq!(cpu.regs.rflags, KERNEL_RFLAGS);
    assert_eq!(cpu.stores[0].1, descriptor(), "verbatim");
}

#[test]
fn kernel_enqcmd_at_ud_entry_uses_the_guest_pasid() {
    let (mut cpu, _) = at_kernel_entry(6, None, |a| a.enqcmd(rax, ptr(rdx)));
    cpu.pasid = PASID_VALID | 0x4_2424;
    assert!(matches!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::Emulated(StoreRecord {
            kind: StoreKind::Enqcmd,
            ..
        })
    ));
    assert_eq!(dword0(&cpu.stores[0].1), 0x4_2424, "user privilege");
}

#[test]
fn kernel_source_fault_is_delivered_from_the_kernel_context() {
    let (mut cpu, _) = at_kernel_entry(6, None, |a| a.enqcmds(rax, ptr(rdx)));
    cpu.unmap(KDATA);
    let expected = Exception::page_fault(0, KDATA + 0x100);

    let action = handle_exception_entry(&mut cpu, 6).unwrap();

    assert_eq!(action, EntryAction::Faulted(expected));
    assert_back_in_kernel(&cpu, KERNEL_INSN);
    assert_eq!(
        cpu.regs.rflags, KERNEL_RFLAGS,
        "flags as the kernel left them"
    );
    assert_eq!(
        cpu.injected,
        vec![Injected::at(expected, KERNEL_INSN, KERNEL_CS)]
    );
    assert!(cpu.stores.is_empty());
}

#[test]
fn kernel_misaligned_destination_is_gp0_from_the_kernel_context() {
    let (mut cpu, _) = at_kernel_entry(6, None, |a| a.movdir64b(rax, ptr(rdx)));
    cpu.regs.rax = KPORTAL + 8;
    assert_eq!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::Faulted(Exception::gp0())
    );
    assert_back_in_kernel(&cpu, KERNEL_INSN);
    assert_eq!(
        cpu.injected,
        vec![Injected::at(Exception::gp0(), KERNEL_INSN, KERNEL_CS)]
    );
}

#[test]
fn kernel_frame_with_a_null_ss_returns_with_a_null_ss() {
    // After a user-to-kernel interrupt 64-bit mode runs the kernel with a
    // null SS; a later #UD pushes it.
    let (mut cpu, code) = at_kernel_entry(6, None, |a| a.enqcmds(rax, ptr(rdx)));
    cpu.sregs.ss = kvm_segment {
        selector: 0,
        unusable: 1,
        ..Default::default()
    };
    let frame_ss_slot = cpu.regs.rsp + 32;
    cpu.write(frame_ss_slot, &0u64.to_le_bytes());
    assert!(matches!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::Emulated(_)
    ));
    assert_eq!(cpu.regs.rip, KERNEL_INSN + code.len() as u64);
    assert_eq!(cpu.sregs.ss.selector, 0);
    assert_eq!((cpu.sregs.ss.unusable, cpu.sregs.ss.dpl), (1, 0));

    // A null SS the handler does not have (it was given another one) is
    // loaded unusable at CPL 0 too.
    let (mut cpu, _) = at_kernel_entry(6, None, |a| a.enqcmds(rax, ptr(rdx)));
    let frame_ss_slot = cpu.regs.rsp + 32;
    cpu.write(frame_ss_slot, &0u64.to_le_bytes());
    assert!(matches!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::Emulated(_)
    ));
    assert_eq!(
        (
            cpu.sregs.ss.selector,
            cpu.sregs.ss.unusable,
            cpu.sregs.ss.dpl
        ),
        (0, 1, 0)
    );
    assert_eq!(cpu.sregs.cs.selector, KERNEL_CS);
}

#[test]
fn kernel_ud2_and_kernel_frames_with_odd_selectors_pass_through() {
    let (mut cpu, _) = at_kernel_entry(6, None, |a| a.ud2());
    let before = (cpu.regs, cpu.sregs);
    assert_eq!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::PassThrough
    );
    assert_eq!((cpu.regs, cpu.sregs), before);

    // RPL 1 code selector, a user data segment as SS, a CS selector with
    // no descriptor.
    for (slot, value) in [(8, 0x11u64), (32, u64::from(USER_SS)), (8, 0x38)] {
        let (mut cpu, _) = at_kernel_entry(6, None, |a| a.enqcmds(rax, ptr(rdx)));
        let at = cpu.regs.rsp + slot;
        cpu.write(at, &value.to_le_bytes());
        let before = (cpu.regs, cpu.sregs);
        assert_eq!(
            handle_exception_entry(&mut cpu, 6).unwrap(),
            EntryAction::PassThrough,
            "frame slot {slot} = {value:#x}"
        );
        assert_eq!((cpu.regs, cpu.sregs), before);
        assert!(cpu.stores.is_empty() && cpu.injected.is_empty());
    }
}

#[test]
fn kernel_enqcmds_through_the_clac_at_linux_entry() {
    // PVM with SMAP visible: the `clac` after ENDBR64 at the #UD entry.
    let (mut cpu, code) = at_kernel_entry(6, None, |a| a.enqcmds(rax, ptr(rdx)));
    cpu.write(
        UD_HANDLER,
        &assemble(UD_HANDLER, |a| {
            a.endbr64()?;
            a.clac()
        }),
    );
    cpu.regs.rip = UD_HANDLER + 4;
    let outcome = handle_emulation_failure(&mut cpu, &[0x0f, 0x01, 0xca]).unwrap();
    assert!(
        matches!(
            outcome,
            Outcome::ExceptionEntry {
                vector: 6,
                action: EntryAction::Emulated(_)
            }
        ),
        "{outcome:?}"
    );
    assert_back_in_kernel(&cpu, KERNEL_INSN + code.len() as u64);
}

// ---------------------------------------------------------------------------
// ENQCMD at the #GP entry (the host has ENQCMD; its IA32_PASID is not the
// guest's)
// ---------------------------------------------------------------------------

/// The user ran `code`; the host raised #GP(`error_code`); the vCPU is at
/// the entry of the #GP handler.
fn at_user_gp_entry(
    error_code: u64,
    code: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> (MockCpu, Vec<u8>) {
    let (mut cpu, user_code) = at_ud_entry(0, code);
    let gp_handler = UD_HANDLER + 0x100;
    cpu.set_gate(13, gp_handler);
    cpu.write(gp_handler, &assemble(gp_handler, |a| a.endbr64()));
    cpu.regs.rsp -= 8;
    let frame = cpu.regs.rsp;
    cpu.write(frame, &error_code.to_le_bytes());
    cpu.regs.rip = gp_handler;
    (cpu, user_code)
}

#[test]
fn kernel_enqcmd_at_gp_entry_is_answered_too() {
    let (mut cpu, code) = at_kernel_entry(13, Some(0), |a| a.enqcmd(rax, ptr(rdx)));
    cpu.pasid = PASID_VALID | 0x99;
    assert!(matches!(
        handle_exception_entry(&mut cpu, 13).unwrap(),
        EntryAction::Emulated(StoreRecord {
            kind: StoreKind::Enqcmd,
            ..
        })
    ));
    assert_back_in_kernel(&cpu, KERNEL_INSN + code.len() as u64);
    assert_eq!(dword0(&cpu.stores[0].1), 0x99);
}

#[test]
fn gp_entry_the_guest_would_take_anyway_runs_the_guests_handler() {
    // The guest's own IA32_PASID is not valid: #GP(0) is its answer too,
    // and the guest's handler (Linux: the PASID fixup) runs untouched.
    let (mut cpu, _) = at_user_gp_entry(0, |a| a.enqcmd(rax, ptr(rdx)));
    cpu.pasid = 0x77;
    assert_passes_through(&mut cpu, 13);
}

#[test]
fn other_gp_entries_pass_through() {
    type Case = (u64, Asm);
    let cases: [Case; 4] = [
        // A #GP with a selector error code.
        (0x18, |a| a.enqcmd(rax, ptr(rdx))),
        // Only ENQCMD depends on IA32_PASID: other #GPs are the guest's.
        (0, |a| a.enqcmds(rax, ptr(rdx))),
        (0, |a| a.movdir64b(rax, ptr(rdx))),
        (0, |a| a.hlt()),
    ];
    for (error_code, code) in cases {
        let (mut cpu, _) = at_user_gp_entry(error_code, code);
        assert_passes_through(&mut cpu, 13);
    }
}

#[test]
fn without_the_platforms_fallback_a_clac_exit_is_not_handled() {
    // Ordinary KVM: its emulator knows CLAC; such an exit stops the VMM
    // with the diagnostic rather than being papered over.
    let mut cpu = MockCpu::new();
    cpu.fallback = false;
    let bytes = cpu.place(|a| a.clac());
    let before = cpu.regs;
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::NotHandled(Unhandled {
            rip: KCODE,
            bytes: bytes.clone(),
            reason: UnhandledReason::UnknownInstruction(iced_x86::Mnemonic::Clac),
        })
    );
    assert_eq!(cpu.regs, before);
    // The 64-byte stores are every platform's.
    let (mut cpu, bytes) = enqcmd_machine();
    cpu.fallback = false;
    assert!(matches!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Store(_)
    ));
}

#[test]
fn unreadable_frame_passes_through() {
    let (mut cpu, _) = at_ud_entry(0, |a| a.enqcmd(rax, ptr(rdx)));
    cpu.regs.rsp = 0xffff_d000_0000_0000; // unmapped
    assert_eq!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::PassThrough
    );
}

#[test]
fn frame_and_idt_readers() {
    let (mut cpu, _) = at_ud_entry(0, |a| a.enqcmd(rax, ptr(rdx)));
    assert_eq!(idt_handler(&mut cpu, 6).unwrap(), Some(UD_HANDLER));
    assert_eq!(idt_handler(&mut cpu, 7).unwrap(), None, "gate not present");
    assert!(is_exception_entry(&mut cpu, 6).unwrap());
    assert!(!is_exception_entry(&mut cpu, 14).unwrap());
    assert_eq!(
        read_exception_frame(&mut cpu, 6).unwrap(),
        Some(ExceptionFrame {
            error_code: None,
            rip: UCODE,
            cs: USER_CS,
            rflags: 0x202 | rflags::CF | rflags::SF,
            rsp: USER_RSP,
            ss: USER_SS,
        })
    );
    // With an error code (#GP, #PF) the frame starts one slot higher.
    cpu.regs.rsp -= 8;
    cpu.write(cpu.regs.rsp, &0x18u64.to_le_bytes());
    let f = read_exception_frame(&mut cpu, 14).unwrap().unwrap();
    assert_eq!((f.error_code, f.rip, f.cs), (Some(0x18), UCODE, USER_CS));
}

// ---------------------------------------------------------------------------
// Fallback instructions
// ---------------------------------------------------------------------------

#[test]
fn clac_and_stac_toggle_ac_at_cpl0_and_raise_ud_at_cpl3() {
    let mut cpu = MockCpu::new();
    let bytes = cpu.place(|a| a.stac());
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Emulated(FallbackInstruction::Stac)
    );
    assert_eq!(cpu.regs.rflags, 0x2 | rflags::AC);
    assert_eq!(cpu.regs.rip, KCODE + 3);
    let bytes = cpu.place(|a| a.clac());
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Emulated(FallbackInstruction::Clac)
    );
    assert_eq!(cpu.regs.rflags, 0x2);
    assert_eq!(cpu.regs.rip, KCODE + 6);

    let mut cpu = MockCpu::new();
    cpu.enter_user();
    let bytes = cpu.place(|a| a.clac());
    assert_raises(&mut cpu, &bytes, Exception::ud());
    assert_eq!(cpu.regs.rip, UCODE);
}

#[test]
fn fwait_is_a_no_op_unless_mp_and_ts() {
    let mut cpu = MockCpu::new();
    cpu.regs.rflags = 0x2 | rflags::CF;
    let bytes = cpu.place(|a| a.wait());
    assert_eq!(bytes, [0x9b]);
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Emulated(FallbackInstruction::Fwait)
    );
    assert_eq!(
        (cpu.regs.rip, cpu.regs.rflags),
        (KCODE + 1, 0x2 | rflags::CF)
    );

    let mut cpu = MockCpu::new();
    cpu.sregs.cr0 |= 1 << 3; // TS, with MP set
    assert_raises(&mut cpu, &[0x9b], Exception::nm());
    assert_eq!(cpu.regs.rip, KCODE);
}

#[test]
fn popcnt_register_forms_and_flags() {
    let cases: [(u64, Asm, u64, u64); 4] = [
        // (RBX, instruction, expected RAX, expected ZF)
        (0xf0f0_0000_0000_0003, |a| a.popcnt(rax, rbx), 10, 0),
        (0xffff_ffff_0000_0007, |a| a.popcnt(eax, ebx), 3, 0),
        (
            0xffff_ffff_ffff_0000,
            |a| a.popcnt(ax, bx),
            0x1111_2222_3333_0000,
            rflags::ZF,
        ),
        (0, |a| a.popcnt(rax, rbx), 0, rflags::ZF),
    ];
    for (source, insn, result, zf) in cases {
        let mut cpu = MockCpu::new();
        cpu.regs.rax = 0x1111_2222_3333_4444;
        cpu.regs.rbx = source;
        cpu.regs.rflags = 0x2 | rflags::STATUS;
        let bytes = cpu.place(insn);
        assert_eq!(
            handle_emulation_failure(&mut cpu, &bytes).unwrap(),
            Outcome::Emulated(FallbackInstruction::Popcnt)
        );
        assert_eq!(cpu.regs.rax, result, "source {source:#x}");
        assert_eq!(cpu.regs.rflags, 0x2 | zf, "only ZF may stay set");
        assert_eq!(cpu.regs.rip, KCODE + bytes.len() as u64);
    }
}

#[test]
fn popcnt_memory_form_and_its_page_fault() {
    let mut cpu = MockCpu::new();
    cpu.write(KDATA + 0x18, &0x8000_0000_0000_0001u64.to_le_bytes());
    cpu.regs.rsi = KDATA;
    let bytes = cpu.place(|a| a.popcnt(r12, qword_ptr(rsi + 0x18)));
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Emulated(FallbackInstruction::Popcnt)
    );
    assert_eq!(cpu.regs.r12, 2);

    let mut cpu = MockCpu::new();
    cpu.regs.rsi = 0x5000_0000; // unmapped
    let bytes = cpu.place(|a| a.popcnt(ecx, dword_ptr(rsi)));
    assert_raises(&mut cpu, &bytes, Exception::page_fault(0, 0x5000_0000));
}

#[test]
fn popcnt_of_device_memory_reads_the_device() {
    // The portal's registers read as the inverted low address byte:
    // 0x3f, 0x3e, ... at portal offset 0xc0.
    let mut cpu = MockCpu::new();
    cpu.regs.rsi = KPORTAL + 0xc0;
    let bytes = cpu.place(|a| a.popcnt(r12, qword_ptr(rsi)));
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Emulated(FallbackInstruction::Popcnt)
    );
    let value = u64::from_le_bytes(std::array::from_fn(|i| {
        portal_byte(PORTAL_PA + 0xc0 + i as u64)
    }));
    assert_eq!(cpu.regs.r12, u64::from(value.count_ones()));
    assert_eq!(cpu.device_reads, vec![(PORTAL_PA + 0xc0, 8)]);
}

#[test]
fn lock_cmpxchg16b_on_device_memory_reads_then_writes_the_device() {
    let mut cpu = MockCpu::new();
    cpu.regs.rdi = KPORTAL + 0x80;
    (cpu.regs.rdx, cpu.regs.rax) = (0x1111, 0x2222);
    (cpu.regs.rcx, cpu.regs.rbx) = (0x3333, 0x4444);
    let bytes = cpu.place(|a| a.lock().cmpxchg16b(xmmword_ptr(rdi)));
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Emulated(FallbackInstruction::Cmpxchg16b)
    );
    // Not equal: the device's value is loaded and written back.
    let read: Vec<u8> = (0..16).map(|i| portal_byte(PORTAL_PA + 0x80 + i)).collect();
    let lo = u64::from_le_bytes(read[..8].try_into().unwrap());
    let hi = u64::from_le_bytes(read[8..].try_into().unwrap());
    assert_eq!((cpu.regs.rdx, cpu.regs.rax), (hi, lo));
    assert_eq!(cpu.regs.rflags & rflags::ZF, 0);
    assert_eq!(
        cpu.device_writes,
        vec![
            (PORTAL_PA + 0x80, read[..8].to_vec()),
            (PORTAL_PA + 0x88, read[8..].to_vec())
        ]
    );

    // Equal: RCX:RBX is written, ZF=1.
    let mut cpu = MockCpu::new();
    cpu.regs.rdi = KPORTAL + 0x80;
    (cpu.regs.rdx, cpu.regs.rax) = (hi, lo);
    (cpu.regs.rcx, cpu.regs.rbx) = (0x3333, 0x4444);
    let bytes = cpu.place(|a| a.lock().cmpxchg16b(xmmword_ptr(rdi)));
    handle_emulation_failure(&mut cpu, &bytes).unwrap();
    assert_ne!(cpu.regs.rflags & rflags::ZF, 0);
    assert_eq!(
        cpu.device_writes,
        vec![
            (PORTAL_PA + 0x80, 0x4444u64.to_le_bytes().to_vec()),
            (PORTAL_PA + 0x88, 0x3333u64.to_le_bytes().to_vec())
        ]
    );
}

#[test]
fn int3_reflects_bp_with_rip_after_it() {
    let mut cpu = MockCpu::new();
    let bytes = cpu.place(|a| a.int3());
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Exception(Exception::bp())
    );
    assert_eq!(cpu.regs.rip, KCODE + 1);
    assert_eq!(
        cpu.injected,
        vec![Injected::at(Exception::bp(), KCODE + 1, KERNEL_CS)]
    );
}

#[test]
fn int1_reflects_db_with_rip_after_it() {
    let mut cpu = MockCpu::new();
    let bytes = cpu.place(|a| a.int1());
    assert_eq!(bytes, [0xf1]);
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Exception(Exception::db())
    );
    assert_eq!(cpu.regs.rip, KCODE + 1);
    assert_eq!(
        cpu.injected,
        vec![Injected::at(Exception::db(), KCODE + 1, KERNEL_CS)]
    );
}

#[test]
fn lock_cmpxchg16b_exchanges_or_loads() {
    let target = KDATA + 0x40;
    let setup = |memory: u128| {
        let mut cpu = MockCpu::new();
        cpu.write(target, &memory.to_le_bytes());
        cpu.regs.rdi = target;
        (cpu.regs.rdx, cpu.regs.rax) = (0x1111, 0x2222);
        (cpu.regs.rcx, cpu.regs.rbx) = (0x3333, 0x4444);
        cpu.regs.rflags = 0x2 | rflags::CF;
        let bytes = cpu.place(|a| a.lock().cmpxchg16b(xmmword_ptr(rdi)));
        assert_eq!(bytes[0], 0xf0);
        (cpu, bytes)
    };

    // Equal: RCX:RBX stored, ZF=1, other flags kept.
    let (mut cpu, bytes) = setup((0x1111u128 << 64) | 0x2222);
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Emulated(FallbackInstruction::Cmpxchg16b)
    );
    assert_eq!(
        u128::from_le_bytes(cpu.read::<16>(target)),
        (0x3333u128 << 64) | 0x4444
    );
    assert_eq!(cpu.regs.rflags, 0x2 | rflags::CF | rflags::ZF);
    assert_eq!(cpu.regs.rip, KCODE + bytes.len() as u64);

    // Different: memory loaded into RDX:RAX, ZF=0, memory unchanged.
    let (mut cpu, bytes) = setup((0x5555u128 << 64) | 0x6666);
    cpu.regs.rflags |= rflags::ZF;
    handle_emulation_failure(&mut cpu, &bytes).unwrap();
    assert_eq!((cpu.regs.rdx, cpu.regs.rax), (0x5555, 0x6666));
    assert_eq!(cpu.regs.rflags, 0x2 | rflags::CF);
    assert_eq!(
        u128::from_le_bytes(cpu.read::<16>(target)),
        (0x5555u128 << 64) | 0x6666
    );

    // Misaligned: #GP(0).
    let (mut cpu, bytes) = setup(0);
    cpu.regs.rdi = target + 8;
    assert_raises(&mut cpu, &bytes, Exception::gp0());
    assert_eq!(cpu.regs.rip, KCODE);
}

#[test]
fn unknown_instruction_gives_a_one_line_diagnostic() {
    let mut cpu = MockCpu::new();
    cpu.regs.rsi = KDATA;
    let bytes = cpu.place(|a| a.fxrstor(ptr(rsi)));
    let before = (cpu.regs, cpu.sregs);

    let outcome = handle_emulation_failure(&mut cpu, &bytes).unwrap();

    let Outcome::NotHandled(u) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(
        u.to_string(),
        "RIP 0xffffffff81000000 bytes [0f ae 0e]: no emulation for fxrstor"
    );
    assert_eq!((cpu.regs, cpu.sregs), before);

    let mut cpu = MockCpu::new();
    let Outcome::NotHandled(u) = handle_emulation_failure(&mut cpu, &[0x0f, 0xff]).unwrap() else {
        panic!()
    };
    assert_eq!(
        u.to_string(),
        "RIP 0xffffffff81000000 bytes [0f ff]: not a whole instruction"
    );
}

#[test]
fn bytes_that_are_no_instruction_get_ud() {
    // An undefined opcode in 64-bit mode (PUSH ES), a LOCK prefix on an
    // instruction that takes none, and MOVDIR64B with a register source:
    // the CPU raises #UD, and so does the emulator, RIP at the bytes.
    for bytes in [
        vec![0x06],
        vec![0xf0, 0x90],
        vec![0x66, 0x0f, 0x38, 0xf8, 0xc2],
        // UD2, and UD0 and UD1, defined to raise it.
        vec![0x0f, 0x0b],
        vec![0x0f, 0xff, 0x00],
        vec![0x0f, 0xb9, 0x00],
    ] {
        let mut cpu = MockCpu::new();
        let before = cpu.regs;
        assert_raises(&mut cpu, &bytes, Exception::ud());
        assert_eq!(cpu.regs, before, "{bytes:02x?}: nothing else changed");
    }
}

// ---------------------------------------------------------------------------
// Outside 64-bit mode: compatibility, protected and real mode
// ---------------------------------------------------------------------------

const CR4_SMEP: u64 = 1 << 20;
const CR4_SMAP: u64 = 1 << 21;
/// A 32-bit user code descriptor (GDT index 4, Linux's `__USER32_CS`).
const USER32_CS: u16 = 0x23;
/// Linux's `__KERNEL32_CS`.
const KERNEL32_CS: u16 = 0x08;

/// Puts the mock vCPU in compatibility mode at `dpl` with `bits`-bit code
/// (CS.D) at UCODE; SMEP and SMAP off, so CPL 0 code may use the user
/// mappings below 4 GiB.
fn compat(cpu: &mut MockCpu, dpl: u8, bits: u32) {
    cpu.sregs.cr4 &= !(CR4_SMEP | CR4_SMAP);
    let selector = if dpl == 3 { USER32_CS } else { KERNEL32_CS };
    cpu.sregs.cs = kvm_segment {
        l: 0,
        db: u8::from(bits == 32),
        ..segment(selector, dpl, true)
    };
    let stack = if dpl == 3 { USER_SS } else { KERNEL_SS };
    cpu.sregs.ss = segment(stack, dpl, false);
    cpu.regs.rip = UCODE;
}

/// Assembles `bits`-bit code at the vCPU's RIP (which must be UCODE) and
/// returns its bytes.
fn place_bits(
    cpu: &mut MockCpu,
    bits: u32,
    f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Vec<u8> {
    let mut a = CodeAssembler::new(bits).unwrap();
    f(&mut a).unwrap();
    let bytes = a.assemble(cpu.regs.rip).unwrap();
    cpu.write(cpu.sregs.cs.base + cpu.regs.rip, &bytes);
    bytes
}

/// A compatibility-mode CPL 0 MOVDIR64B of [`descriptor`] at UDATA to the
/// portal: `edi` and `esi` hold the two offsets (their upper halves are
/// garbage the 32-bit address size ignores).
fn compat_movdir64b(bits: u32) -> (MockCpu, Vec<u8>) {
    let mut cpu = MockCpu::new();
    compat(&mut cpu, 0, bits);
    cpu.write(UDATA, &descriptor());
    cpu.regs.rdi = 0xdead_beef_0000_0000 | PORTAL;
    cpu.regs.rsi = 0x1234_5678_0000_0000 | UDATA;
    let bytes = place_bits(&mut cpu, bits, |a| a.movdir64b(edi, ptr(esi)));
    (cpu, bytes)
}

fn store_at(kind: StoreKind, linear: u64, gpa: u64) -> Outcome {
    Outcome::Store(StoreRecord {
        kind,
        linear,
        gpa,
        reply: StoreReply::Accepted,
    })
}

/// Runs the emulation-failure path on `bytes` and checks that it made one
/// MOVDIR64B of [`descriptor`] to `linear` (guest-physical `gpa`).
fn assert_stores_descriptor(cpu: &mut MockCpu, bytes: &[u8], linear: u64, gpa: u64) {
    assert_eq!(
        handle_emulation_failure(cpu, bytes).unwrap(),
        store_at(StoreKind::Movdir64b, linear, gpa)
    );
    assert_eq!(cpu.stores.len(), 1);
    assert_eq!(cpu.stores[0].1, descriptor());
}

#[test]
fn compat_mode_movdir64b_to_the_portal_completes() {
    let (mut cpu, bytes) = compat_movdir64b(32);
    assert_stores_descriptor(&mut cpu, &bytes, PORTAL, PORTAL_PA);
    assert_eq!(cpu.regs.rip, UCODE + bytes.len() as u64);
    assert!(cpu.injected.is_empty());
}

#[test]
fn compat_mode_bytes_missing_from_the_exit_are_fetched_at_cs_base_plus_eip() {
    let (mut cpu, bytes) = compat_movdir64b(32);
    // The same code, reached through a CS based 0x1000 below it.
    cpu.sregs.cs.base = 0x1000;
    cpu.regs.rip = UCODE - 0x1000;
    assert_eq!(
        handle_emulation_failure(&mut cpu, &[]).unwrap(),
        store_at(StoreKind::Movdir64b, PORTAL, PORTAL_PA)
    );
    assert_eq!(cpu.regs.rip, UCODE - 0x1000 + bytes.len() as u64);
}

#[test]
fn compat_mode_segment_bases_apply_to_every_segment() {
    // DS, ES and an SS override have their bases, as in protected mode.
    let mut cpu = MockCpu::new();
    compat(&mut cpu, 0, 32);
    cpu.write(UDATA + 0x80, &descriptor());
    cpu.sregs.ds.base = 0x100;
    cpu.sregs.es.base = 0x1000;
    cpu.sregs.ss.base = 0x80;
    cpu.regs.rdi = PORTAL + 0x40 - 0x1000;
    cpu.regs.rsi = UDATA + 0x80 - 0x100;
    let bytes = place_bits(&mut cpu, 32, |a| a.enqcmds(edi, ptr(esi)));
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        store_at(StoreKind::Enqcmds, PORTAL + 0x40, PORTAL_PA + 0x40)
    );
    assert_eq!(cpu.stores[0].1[4..], descriptor()[4..]);

    let mut cpu = MockCpu::new();
    compat(&mut cpu, 0, 32);
    cpu.write(UDATA + 0x80, &descriptor());
    cpu.sregs.ss.base = 0x80;
    cpu.regs.rdi = PORTAL;
    cpu.regs.rsi = UDATA;
    let bytes = place_bits(&mut cpu, 32, |a| a.movdir64b(edi, ptr(esi).ss()));
    assert_stores_descriptor(&mut cpu, &bytes, PORTAL, PORTAL_PA);
}

#[test]
fn compat_mode_linear_addresses_wrap_at_4_gib() {
    let (mut cpu, bytes) = compat_movdir64b(32);
    cpu.sregs.ds.base = 0xffff_0000;
    cpu.regs.rsi = UDATA + 0x1_0000;
    assert_stores_descriptor(&mut cpu, &bytes, PORTAL, PORTAL_PA);
}

#[test]
fn compat_mode_limit_violations_are_gp0_and_ss0() {
    // The source's last byte one past DS's limit: #GP(0).
    let (mut cpu, bytes) = compat_movdir64b(32);
    cpu.sregs.ds.limit = (UDATA + 0x3e) as u32;
    assert_raises(&mut cpu, &bytes, Exception::gp0());

    // The destination past ES's limit: #GP(0).
    let (mut cpu, bytes) = compat_movdir64b(32);
    cpu.sregs.es.limit = (PORTAL + 0x3e) as u32;
    assert_raises(&mut cpu, &bytes, Exception::gp0());

    // An EBP-based source past SS's limit: #SS(0).
    let mut cpu = MockCpu::new();
    compat(&mut cpu, 0, 32);
    cpu.sregs.ss.limit = (UDATA + 0x20) as u32;
    cpu.regs.rdi = PORTAL;
    cpu.regs.rbp = UDATA;
    let bytes = place_bits(&mut cpu, 32, |a| a.movdir64b(edi, ptr(ebp)));
    assert_raises(&mut cpu, &bytes, Exception::ss0());
}

#[test]
fn compat_mode_segment_types_are_checked() {
    // A read-only ES cannot be stored to.
    let (mut cpu, bytes) = compat_movdir64b(32);
    cpu.sregs.es.type_ = 0x1;
    assert_raises(&mut cpu, &bytes, Exception::gp0());
    // An unusable (null) DS cannot be read.
    let (mut cpu, bytes) = compat_movdir64b(32);
    cpu.sregs.ds.unusable = 1;
    assert_raises(&mut cpu, &bytes, Exception::gp0());
    // An execute-only CS cannot be read through a CS override.
    let (mut cpu, _) = compat_movdir64b(32);
    cpu.sregs.cs.type_ = 0x9;
    let bytes = place_bits(&mut cpu, 32, |a| a.movdir64b(edi, ptr(esi).cs()));
    assert_raises(&mut cpu, &bytes, Exception::gp0());
    // An expand-down DS: offsets up to the limit are outside it.
    let (mut cpu, bytes) = compat_movdir64b(32);
    cpu.sregs.ds.type_ = 0x7;
    cpu.sregs.ds.limit = UDATA as u32;
    assert_raises(&mut cpu, &bytes, Exception::gp0());
    cpu.sregs.ds.limit = (UDATA - 1) as u32;
    cpu.injected.clear();
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        store_at(StoreKind::Movdir64b, PORTAL, PORTAL_PA)
    );
}

#[test]
fn compat_mode_16bit_address_size_wraps_the_offsets_at_64_kib() {
    // 32-bit code with a 0x67 prefix, and 16-bit code without one: SI +
    // 0x10 wraps to 8, the destination is DI, not EDI.
    for bits in [32, 16] {
        let mut cpu = MockCpu::new();
        compat(&mut cpu, 0, bits);
        // 16-bit code's IP is 16 bits: the code is at CS's base.
        cpu.sregs.cs.base = UCODE;
        cpu.regs.rip = 0;
        cpu.write(UDATA, &descriptor());
        cpu.sregs.ds.base = UDATA - 8;
        cpu.sregs.es.base = PORTAL;
        cpu.regs.rsi = 0xfff8;
        cpu.regs.rdi = 0x1234_0040;
        let bytes = place_bits(&mut cpu, bits, |a| a.movdir64b(di, ptr(si + 0x10)));
        assert_eq!(bytes[0] == 0x67, bits == 32, "{bits}-bit code");
        assert_eq!(
            handle_emulation_failure(&mut cpu, &bytes).unwrap(),
            store_at(StoreKind::Movdir64b, PORTAL + 0x40, PORTAL_PA + 0x40),
            "{bits}-bit code"
        );
        assert_eq!(cpu.stores[0].1, descriptor());
        assert_eq!(cpu.regs.rip, bytes.len() as u64);
    }
}

#[test]
fn compat_mode_misaligned_destination_is_gp0() {
    let (mut cpu, bytes) = compat_movdir64b(32);
    cpu.regs.rdi = PORTAL + 0x20;
    assert_raises(&mut cpu, &bytes, Exception::gp0());
    // An aligned offset in an ES whose base is not aligned: the linear
    // address is not, and the store is refused the same way.
    let (mut cpu, bytes) = compat_movdir64b(32);
    cpu.sregs.es.base = 0x20;
    cpu.regs.rdi = PORTAL - 0x40;
    assert_raises(&mut cpu, &bytes, Exception::gp0());
}

#[test]
fn compat_mode_page_faults_have_the_error_code_and_cr2() {
    // Not present at CPL 0: error code 0, CR2 the linear address.
    let (mut cpu, bytes) = compat_movdir64b(32);
    cpu.unmap(UDATA);
    cpu.sregs.ds.base = 0x10;
    cpu.regs.rsi = UDATA - 0x10 + 8;
    assert_raises(&mut cpu, &bytes, Exception::page_fault(0, UDATA + 8));

    // A CPL 3 store to a supervisor page: present, write, user.
    let mut cpu = MockCpu::new();
    compat(&mut cpu, 3, 32);
    cpu.write(UDATA, &descriptor());
    cpu.regs.rdi = KSTACK & 0xffff_ffff;
    cpu.map(KSTACK & 0xffff_ffff, KSTACK_PA, PTE_P | PTE_RW);
    cpu.regs.rsi = UDATA;
    let bytes = place_bits(&mut cpu, 32, |a| a.movdir64b(edi, ptr(esi)));
    assert_raises(
        &mut cpu,
        &bytes,
        Exception::page_fault(
            pf_error::PRESENT | pf_error::WRITE | pf_error::USER,
            KSTACK & 0xffff_ffff,
        ),
    );
}

#[test]
fn compat_mode_user_enqcmd_carries_the_msr_pasid() {
    let mut cpu = MockCpu::new();
    compat(&mut cpu, 3, 32);
    cpu.write(UDATA, &descriptor());
    cpu.pasid = PASID_VALID | 0x777;
    cpu.regs.rdi = PORTAL;
    cpu.regs.rsi = UDATA;
    let bytes = place_bits(&mut cpu, 32, |a| a.enqcmd(edi, ptr(esi)));
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        store_at(StoreKind::Enqcmd, PORTAL, PORTAL_PA)
    );
    assert_eq!(dword0(&cpu.stores[0].1), 0x777);
}

#[test]
fn compat_mode_fallback_instructions_use_the_segments() {
    // POPCNT eax, [esi] through DS's base; CLAC at CPL 0.
    let mut cpu = MockCpu::new();
    compat(&mut cpu, 0, 32);
    cpu.write(UDATA, &0x0f0fu32.to_le_bytes());
    cpu.sregs.ds.base = 0x1000;
    cpu.regs.rsi = UDATA - 0x1000;
    let bytes = place_bits(&mut cpu, 32, |a| a.popcnt(eax, dword_ptr(esi)));
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Emulated(FallbackInstruction::Popcnt)
    );
    assert_eq!(cpu.regs.rax, 8);
    cpu.sregs.ds.limit = (UDATA - 0x1000 + 2) as u32;
    cpu.regs.rip = UCODE;
    assert_raises(&mut cpu, &bytes, Exception::gp0());

    let mut cpu = MockCpu::new();
    compat(&mut cpu, 0, 32);
    cpu.regs.rflags |= rflags::AC;
    let bytes = place_bits(&mut cpu, 32, |a| a.clac());
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Emulated(FallbackInstruction::Clac)
    );
    assert_eq!(cpu.regs.rflags & rflags::AC, 0);
    assert_eq!(cpu.regs.rip, UCODE + 3);
}

#[test]
fn compat_mode_user_enqcmd_at_ud_entry_returns_to_the_32bit_process() {
    let (mut cpu, _) = at_ud_entry(0, |a| a.nop());
    let code = {
        let mut a = CodeAssembler::new(32).unwrap();
        a.enqcmd(edi, ptr(esi)).unwrap();
        a.assemble(UCODE).unwrap()
    };
    cpu.write(UCODE, &code);
    cpu.write(KSTACK + 0x1000 - 32, &u64::from(USER32_CS).to_le_bytes());
    cpu.regs.rdi = PORTAL;
    cpu.regs.rsi = UDATA;
    cpu.pasid = PASID_VALID | 0x32;

    let action = handle_exception_entry(&mut cpu, 6).unwrap();

    assert_eq!(
        action,
        EntryAction::Emulated(StoreRecord {
            kind: StoreKind::Enqcmd,
            linear: PORTAL,
            gpa: PORTAL_PA,
            reply: StoreReply::Accepted,
        })
    );
    assert_eq!(cpu.regs.rip, UCODE + code.len() as u64);
    assert_eq!(cpu.regs.rsp, USER_RSP);
    assert_eq!(cpu.sregs.cs.selector, USER32_CS);
    assert_eq!(
        (cpu.sregs.cs.dpl, cpu.sregs.cs.l, cpu.sregs.cs.db),
        (3, 0, 1)
    );
    assert_eq!(dword0(&cpu.stores[0].1), 0x32);
}

#[test]
fn compat_mode_kernel_movdir64b_at_ud_entry_returns_to_the_32bit_kernel_code() {
    // A host without MOVDIR64B: 32-bit kernel code (CS 0x08) took #UD; the
    // frame is the 64-bit one, its CS the compatibility-mode segment.
    let (mut cpu, _) = at_kernel_entry(6, None, |a| a.nop());
    cpu.sregs.cr4 &= !(CR4_SMEP | CR4_SMAP);
    let code = {
        let mut a = CodeAssembler::new(32).unwrap();
        a.movdir64b(edi, ptr(esi)).unwrap();
        a.assemble(UCODE).unwrap()
    };
    cpu.write(UCODE, &code);
    cpu.write(UDATA, &descriptor());
    cpu.write(cpu.regs.rsp, &UCODE.to_le_bytes());
    cpu.write(cpu.regs.rsp + 8, &u64::from(KERNEL32_CS).to_le_bytes());
    cpu.regs.rdi = PORTAL;
    cpu.regs.rsi = UDATA;

    let action = handle_exception_entry(&mut cpu, 6).unwrap();

    assert_eq!(
        action,
        EntryAction::Emulated(StoreRecord {
            kind: StoreKind::Movdir64b,
            linear: PORTAL,
            gpa: PORTAL_PA,
            reply: StoreReply::Accepted,
        })
    );
    assert_eq!(cpu.stores[0].1, descriptor());
    assert_eq!(cpu.regs.rip, UCODE + code.len() as u64);
    assert_eq!(cpu.regs.rsp, KERNEL_RSP, "the frame is popped, as IRETQ");
    assert_eq!(cpu.sregs.cs.selector, KERNEL32_CS);
    assert_eq!(
        (cpu.sregs.cs.dpl, cpu.sregs.cs.l, cpu.sregs.cs.db),
        (0, 0, 1)
    );
}

#[test]
fn compat_mode_user_code_segment_from_the_ldt() {
    // A 32-bit process whose CS is its own LDT's entry 0 (selector 0x7,
    // TI set, RPL 3): the entry logic reads it there.
    let (mut cpu, _) = at_ud_entry(0, |a| a.nop());
    let ldt = KDATA + 0x800;
    cpu.write(ldt, &0x00cf_fb00_0000_ffffu64.to_le_bytes());
    cpu.sregs.ldt = kvm_segment {
        base: ldt,
        limit: 7,
        selector: 0x48,
        type_: 2,
        present: 1,
        ..Default::default()
    };
    let code = {
        let mut a = CodeAssembler::new(32).unwrap();
        a.movdir64b(edi, ptr(esi)).unwrap();
        a.assemble(UCODE).unwrap()
    };
    cpu.write(UCODE, &code);
    cpu.write(KSTACK + 0x1000 - 32, &0x7u64.to_le_bytes());
    cpu.regs.rdi = PORTAL;
    cpu.regs.rsi = UDATA;

    assert!(matches!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::Emulated(StoreRecord { linear: PORTAL, .. })
    ));
    assert_eq!(cpu.stores[0].1, descriptor());
    assert_eq!(
        (cpu.sregs.cs.selector, cpu.sregs.cs.l, cpu.sregs.cs.db),
        (0x7, 0, 1)
    );
    assert_eq!(cpu.regs.rip, UCODE + code.len() as u64);

    // Past the LDT's limit: left to the guest.
    let (mut cpu, _) = at_ud_entry(0, |a| a.nop());
    cpu.sregs.ldt = kvm_segment {
        base: ldt,
        limit: 7,
        present: 1,
        ..Default::default()
    };
    cpu.write(UCODE, &code);
    cpu.write(KSTACK + 0x1000 - 32, &0xfu64.to_le_bytes());
    assert_eq!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::PassThrough
    );
}

/// Protected mode without long mode, paging off, CPL 0, flat 32-bit code
/// at guest-physical UCODE_PA (linear is physical).
fn protected_mode(cpu: &mut MockCpu) {
    cpu.sregs.cr0 = 0x11; // PE, ET
    cpu.sregs.cr4 = 0;
    cpu.sregs.efer = 0;
    cpu.sregs.cs = kvm_segment {
        l: 0,
        db: 1,
        ..segment(KERNEL32_CS, 0, true)
    };
    cpu.regs.rip = UCODE_PA;
}

#[test]
fn protected_mode_without_paging_stores_to_the_physical_address() {
    let mut cpu = MockCpu::new();
    protected_mode(&mut cpu);
    cpu.mem
        .write_slice(&descriptor(), GuestAddress(URAM_PA))
        .unwrap();
    cpu.regs.rdi = PORTAL_PA + 0x80;
    cpu.regs.rsi = URAM_PA;
    let mut a = CodeAssembler::new(32).unwrap();
    a.movdir64b(edi, ptr(esi)).unwrap();
    let bytes = a.assemble(UCODE_PA).unwrap();
    assert_eq!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        store_at(StoreKind::Movdir64b, PORTAL_PA + 0x80, PORTAL_PA + 0x80)
    );
    assert_eq!(cpu.stores[0].1, descriptor());
    assert_eq!(cpu.regs.rip, UCODE_PA + bytes.len() as u64);
}

/// Page-table pages of the 32-bit and PAE tests (guest-physical).
const LEGACY_TABLES: u64 = 0x60_0000;
/// The linear address whose 4 KiB page maps URAM_PA, and the one after it
/// (read-only), in both legacy paging tests.
const LEGACY_DATA: u64 = 0x41_0000;
const LEGACY_RO: u64 = 0x41_1000;
/// The portal's linear address: a 4 MiB or 2 MiB page at PORTAL_PA.
const LEGACY_PORTAL: u64 = 0xf000_0000;

fn write_u32(cpu: &MockCpu, pa: u64, v: u32) {
    cpu.mem.write_obj(v, GuestAddress(pa)).unwrap();
}

fn write_u64(cpu: &MockCpu, pa: u64, v: u64) {
    cpu.mem.write_obj(v, GuestAddress(pa)).unwrap();
}

/// Protected mode with 32-bit paging (CR4.PSE): the page directory at
/// LEGACY_TABLES maps the portal with a 4 MiB page and LEGACY_DATA /
/// LEGACY_RO through a page table.
fn paging32() -> MockCpu {
    let mut cpu = MockCpu::new();
    protected_mode(&mut cpu);
    cpu.sregs.cr0 = 0x8001_0011; // PG, WP, ET, PE
    cpu.sregs.cr4 = 1 << 4; // PSE
    cpu.sregs.cr3 = LEGACY_TABLES;
    let pd = LEGACY_TABLES;
    let pt = LEGACY_TABLES + 0x1000;
    let rw = (PTE_P | PTE_RW) as u32;
    write_u32(
        &cpu,
        pd + (LEGACY_PORTAL >> 22) * 4,
        PORTAL_PA as u32 | rw | 0x80,
    );
    write_u32(&cpu, pd + (LEGACY_DATA >> 22) * 4, pt as u32 | rw);
    write_u32(
        &cpu,
        pt + ((LEGACY_DATA >> 12) & 0x3ff) * 4,
        URAM_PA as u32 | rw,
    );
    write_u32(
        &cpu,
        pt + ((LEGACY_RO >> 12) & 0x3ff) * 4,
        URAM_PA as u32 | PTE_P as u32,
    );
    cpu.mem
        .write_slice(&descriptor(), GuestAddress(URAM_PA))
        .unwrap();
    cpu
}

/// Protected mode with PAE paging (EFER.NXE): PDPTEs at LEGACY_TABLES,
/// the portal in a 2 MiB page, LEGACY_DATA / LEGACY_RO through a page table
/// (execute-disable).
fn paging_pae() -> MockCpu {
    let mut cpu = MockCpu::new();
    protected_mode(&mut cpu);
    cpu.sregs.cr0 = 0x8001_0011;
    cpu.sregs.cr4 = 1 << 5; // PAE
    cpu.sregs.efer = 1 << 11; // NXE
    cpu.sregs.cr3 = LEGACY_TABLES;
    let (pdpt, pd0, pd3, pt) = (
        LEGACY_TABLES,
        LEGACY_TABLES + 0x1000,
        LEGACY_TABLES + 0x2000,
        LEGACY_TABLES + 0x3000,
    );
    let rw = PTE_P | PTE_RW;
    write_u64(&cpu, pdpt, pd0 | PTE_P);
    write_u64(&cpu, pdpt + 3 * 8, pd3 | PTE_P);
    write_u64(
        &cpu,
        pd3 + ((LEGACY_PORTAL >> 21) & 0x1ff) * 8,
        PORTAL_PA | rw | 0x80,
    );
    write_u64(&cpu, pd0 + (LEGACY_DATA >> 21) * 8, pt | rw);
    write_u64(
        &cpu,
        pt + ((LEGACY_DATA >> 12) & 0x1ff) * 8,
        URAM_PA | rw | PTE_NX,
    );
    write_u64(
        &cpu,
        pt + ((LEGACY_RO >> 12) & 0x1ff) * 8,
        URAM_PA | PTE_P | PTE_NX,
    );
    cpu.mem
        .write_slice(&descriptor(), GuestAddress(URAM_PA))
        .unwrap();
    cpu
}

/// `movdir64b edi, [esi]` assembled for 32-bit code at UCODE_PA.
fn movdir64b32() -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    a.movdir64b(edi, ptr(esi)).unwrap();
    a.assemble(UCODE_PA).unwrap()
}

#[test]
fn legacy_paging_translates_both_operands_and_sets_accessed_dirty() {
    for (name, mut cpu) in [("32-bit", paging32()), ("PAE", paging_pae())] {
        cpu.regs.rdi = LEGACY_PORTAL + 0x80;
        cpu.regs.rsi = LEGACY_DATA;
        let bytes = movdir64b32();
        assert_eq!(
            handle_emulation_failure(&mut cpu, &bytes).unwrap(),
            store_at(StoreKind::Movdir64b, LEGACY_PORTAL + 0x80, PORTAL_PA + 0x80),
            "{name}"
        );
        assert_eq!(cpu.stores[0].1, descriptor(), "{name}");
        assert!(cpu.injected.is_empty(), "{name}");
    }
    // The 32-bit entries: accessed on the path of the read, accessed and
    // dirty on the 4 MiB page written.
    let mut cpu = paging32();
    cpu.regs.rdi = LEGACY_PORTAL;
    cpu.regs.rsi = LEGACY_DATA;
    handle_emulation_failure(&mut cpu, &movdir64b32()).unwrap();
    let entry = |pa: u64| -> u32 { cpu.mem.read_obj(GuestAddress(pa)).unwrap() };
    let pd = LEGACY_TABLES;
    let pt = LEGACY_TABLES + 0x1000;
    assert_eq!(entry(pd + (LEGACY_DATA >> 22) * 4) & 0x60, 0x20);
    assert_eq!(entry(pt + ((LEGACY_DATA >> 12) & 0x3ff) * 4) & 0x60, 0x20);
    assert_eq!(entry(pd + (LEGACY_PORTAL >> 22) * 4) & 0x60, 0x60);
    assert_eq!(
        entry(pt + ((LEGACY_RO >> 12) & 0x3ff) * 4) & 0x60,
        0,
        "an entry not used is left alone"
    );
}

#[test]
fn legacy_paging_faults_have_the_error_code_and_cr2() {
    for (name, make) in [("32-bit", paging32 as fn() -> MockCpu), ("PAE", paging_pae)] {
        // Not present: a read at CPL 0, error code 0.
        let mut cpu = make();
        cpu.regs.rdi = LEGACY_PORTAL;
        cpu.regs.rsi = LEGACY_DATA + 0x2000;
        let bytes = movdir64b32();
        assert_raises(
            &mut cpu,
            &bytes,
            Exception::page_fault(0, LEGACY_DATA + 0x2000),
        );
        // A supervisor write to a read-only page with CR0.WP: P | W.
        let mut cpu = make();
        cpu.regs.rdi = LEGACY_RO + 0x40;
        cpu.regs.rsi = LEGACY_DATA;
        assert_raises(
            &mut cpu,
            &bytes,
            Exception::page_fault(pf_error::PRESENT | pf_error::WRITE, LEGACY_RO + 0x40),
        );
        // CPL 3 (a 32-bit user segment) on supervisor pages: P | U.
        let mut cpu = make();
        cpu.sregs.cs.dpl = 3;
        cpu.regs.rdi = LEGACY_PORTAL;
        cpu.regs.rsi = LEGACY_DATA;
        assert_raises(
            &mut cpu,
            &bytes,
            Exception::page_fault(pf_error::PRESENT | pf_error::USER, LEGACY_DATA),
        );
        let _ = name;
    }
    // A reserved bit: bit 21 of a 4 MiB page, bit 1 of a PDPTE.
    let mut cpu = paging32();
    let pde = LEGACY_TABLES + (LEGACY_PORTAL >> 22) * 4;
    write_u32(&cpu, pde, PORTAL_PA as u32 | 0x83 | (1 << 21));
    cpu.regs.rdi = LEGACY_PORTAL;
    cpu.regs.rsi = LEGACY_DATA;
    assert_raises(
        &mut cpu,
        &movdir64b32(),
        Exception::page_fault(
            pf_error::PRESENT | pf_error::WRITE | pf_error::RESERVED,
            LEGACY_PORTAL,
        ),
    );
    let cpu = paging_pae();
    let pdpte: u64 = cpu.mem.read_obj(GuestAddress(LEGACY_TABLES)).unwrap();
    write_u64(&cpu, LEGACY_TABLES, pdpte | PTE_RW);
    assert_reserved_bit_reading_legacy_data(cpu);
}

/// A MOVDIR64B from LEGACY_DATA to the portal raises a reserved-bit #PF
/// (a supervisor read) at LEGACY_DATA.
fn assert_reserved_bit_reading_legacy_data(mut cpu: MockCpu) {
    cpu.regs.rdi = LEGACY_PORTAL;
    cpu.regs.rsi = LEGACY_DATA;
    assert_raises(
        &mut cpu,
        &movdir64b32(),
        Exception::page_fault(pf_error::PRESENT | pf_error::RESERVED, LEGACY_DATA),
    );
}

#[test]
fn pae_paging_execute_disable_stops_a_fetch() {
    // The instruction bytes are not in the exit: they are fetched at RIP,
    // which is on an execute-disable page: nothing to decode.
    let mut cpu = paging_pae();
    cpu.regs.rip = LEGACY_DATA;
    let outcome = handle_emulation_failure(&mut cpu, &[]).unwrap();
    assert!(matches!(
        outcome,
        Outcome::NotHandled(Unhandled {
            reason: UnhandledReason::Undecodable,
            ..
        })
    ));
    // Without NXE, bit 63 is reserved: a data read through that entry is
    // a reserved-bit #PF.
    let mut cpu = paging_pae();
    cpu.sregs.efer = 0;
    assert_reserved_bit_reading_legacy_data(cpu);
}

#[test]
fn virtual_8086_mode_is_cpl3_with_16bit_addresses() {
    // RFLAGS.VM in protected mode: 16-bit code at CPL 3, segment bases as
    // the selectors give them. MOVDIR64B stores to ES:DI; ENQCMDS is
    // #GP(0), with its error code (protected-mode delivery).
    let mut cpu = MockCpu::new();
    protected_mode(&mut cpu);
    cpu.regs.rflags = 0x2 | rflags::VM;
    let seg = |selector: u16| kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_: 0x3,
        present: 1,
        dpl: 3,
        s: 1,
        ..Default::default()
    };
    cpu.sregs.cs = kvm_segment {
        type_: 0xb,
        ..seg(0x3000)
    };
    cpu.sregs.ds = seg(0x3100);
    cpu.sregs.es = seg(0x3200);
    cpu.regs.rip = 0x10;
    cpu.mem
        .write_slice(&descriptor(), GuestAddress(0x31000))
        .unwrap();
    cpu.regs.rsi = 0x1_0000;
    cpu.regs.rdi = 0x1_0040;
    let bytes = real_mode_code(&mut cpu, |a| a.movdir64b(di, ptr(si)));
    assert_stores_descriptor(&mut cpu, &bytes, 0x32040, 0x32040);

    cpu.regs.rip = 0x10;
    cpu.stores.clear();
    let bytes = real_mode_code(&mut cpu, |a| a.enqcmds(di, ptr(si)));
    assert_raises(&mut cpu, &bytes, Exception::gp0());
}

/// Real mode: 16-bit code at CS = 0x3000 (base 0x30000), data in DS =
/// 0x3100, destination in ES = 0x3200, 64 KiB limits.
fn real_mode() -> MockCpu {
    let mut cpu = MockCpu::new();
    cpu.sregs.cr0 = 0x10;
    cpu.sregs.cr4 = 0;
    cpu.sregs.efer = 0;
    let seg = |selector: u16, type_: u8| kvm_segment {
        base: u64::from(selector) << 4,
        limit: 0xffff,
        selector,
        type_,
        present: 1,
        s: 1,
        ..Default::default()
    };
    cpu.sregs.cs = seg(0x3000, 0xb);
    cpu.sregs.ds = seg(0x3100, 0x3);
    cpu.sregs.es = seg(0x3200, 0x3);
    cpu.sregs.ss = seg(0x3300, 0x3);
    cpu.regs.rip = 0x10;
    cpu
}

fn real_mode_code(cpu: &mut MockCpu, f: Asm) -> Vec<u8> {
    let mut a = CodeAssembler::new(16).unwrap();
    f(&mut a).unwrap();
    let bytes = a.assemble(0x10).unwrap();
    cpu.mem.write_slice(&bytes, GuestAddress(0x30010)).unwrap();
    bytes
}

#[test]
fn real_mode_movdir64b_stores_to_es_di() {
    let mut cpu = real_mode();
    cpu.mem
        .write_slice(&descriptor(), GuestAddress(0x31000 + 0x20))
        .unwrap();
    cpu.regs.rsi = 0x20;
    cpu.regs.rdi = 0xffff_0000_0000_0080;
    let bytes = real_mode_code(&mut cpu, |a| a.movdir64b(di, ptr(si)));
    assert_eq!(
        handle_emulation_failure(&mut cpu, &[]).unwrap(),
        store_at(StoreKind::Movdir64b, 0x32080, 0x32080)
    );
    assert_eq!(cpu.stores[0].1, descriptor());
    assert_eq!(cpu.regs.rip, 0x10 + bytes.len() as u64);
}

#[test]
fn real_mode_faults_push_no_error_code() {
    // The source runs past DS's 64 KiB: #GP; a BP-based one past SS's:
    // #SS; neither with an error code.
    type SetSource = fn(&mut MockCpu);
    let cases: [(SetSource, Asm, Exception); 2] = [
        (
            |cpu| cpu.regs.rsi = 0xffe0,
            |a| a.movdir64b(di, ptr(si)),
            Exception::gp0(),
        ),
        (
            |cpu| cpu.regs.rbp = 0xfff0,
            |a| a.movdir64b(di, ptr(bp)),
            Exception::ss0(),
        ),
    ];
    for (set_source, insn, fault) in cases {
        let mut cpu = real_mode();
        set_source(&mut cpu);
        cpu.regs.rdi = 0x80;
        let bytes = real_mode_code(&mut cpu, insn);
        let expected = Exception {
            error_code: None,
            ..fault
        };
        assert_raises(&mut cpu, &bytes, expected);
    }
}

// ---------------------------------------------------------------------------
// The #UD/#GP entry outside IA-32e mode: IVT, 8-byte gates, 16/32-bit frames
// ---------------------------------------------------------------------------

/// An 8-byte protected-mode gate: present, DPL 0, of type `type_`.
fn legacy_gate(offset: u32, selector: u16, type_: u8) -> u64 {
    u64::from(offset & 0xffff)
        | (u64::from(selector) << 16)
        | (u64::from(0x80 | type_) << 40)
        | (u64::from(offset >> 16) << 48)
}

/// Where the protected-mode tests' handler is, and their IDT.
const LEGACY_HANDLER: u64 = KCODE_PA + 0x800;
const LEGACY_IDT: u64 = IDT_PA;

/// Protected mode (paging off) at the entry of the handler for `vector`,
/// reached through a 32-bit interrupt gate to kernel CS 0x08, with `frame`
/// (doublewords, lowest address first) on the kernel stack.
fn at_protected_entry(vector: u8, frame: &[u32]) -> MockCpu {
    let mut cpu = MockCpu::new();
    protected_mode(&mut cpu);
    cpu.sregs.gdt.base = GDT_PA;
    cpu.sregs.idt.base = LEGACY_IDT;
    cpu.sregs.idt.limit = 0x7ff;
    cpu.sregs.ss = segment(KERNEL_SS, 0, false);
    cpu.mem
        .write_obj(
            legacy_gate(LEGACY_HANDLER as u32, KERNEL32_CS, 0xe),
            GuestAddress(LEGACY_IDT + u64::from(vector) * 8),
        )
        .unwrap();
    let bytes: Vec<u8> = frame.iter().flat_map(|d| d.to_le_bytes()).collect();
    let stack = KSTACK_PA + 0x1000 - bytes.len() as u64;
    cpu.mem.write_slice(&bytes, GuestAddress(stack)).unwrap();
    cpu.regs.rsp = stack;
    cpu.regs.rip = LEGACY_HANDLER;
    cpu.regs.rflags = 0x2;
    cpu
}

fn assemble32(at: u64, f: Asm) -> Vec<u8> {
    let mut a = CodeAssembler::new(32).unwrap();
    f(&mut a).unwrap();
    a.assemble(at).unwrap()
}

#[test]
fn legacy_gates_give_the_handler_per_mode() {
    // Real mode: IVT entry 6 is offset 0x0123, segment 0x2000.
    let mut cpu = real_mode();
    cpu.sregs.idt.base = 0;
    cpu.sregs.idt.limit = 0x3ff;
    cpu.mem
        .write_slice(&[0x23, 0x01, 0x00, 0x20], GuestAddress(6 * 4))
        .unwrap();
    assert_eq!(idt_handler(&mut cpu, 6).unwrap(), Some(0x20123));
    cpu.sregs.idt.limit = 6 * 4 + 2;
    assert_eq!(idt_handler(&mut cpu, 6).unwrap(), None, "past IDTR.limit");

    // Protected mode: the gate's offset on the base of its code segment
    // (0x38, based at 0x1000).
    let mut cpu = MockCpu::new();
    protected_mode(&mut cpu);
    cpu.sregs.gdt.base = GDT_PA;
    cpu.sregs.idt.base = LEGACY_IDT;
    cpu.sregs.idt.limit = 0x7ff;
    cpu.mem
        .write_obj(0x00cf_9b00_1000_ffffu64, GuestAddress(GDT_PA + 7 * 8))
        .unwrap();
    let cases = [
        (
            legacy_gate(0x0012_3456, 0x38, 0xe),
            Some(0x12_4456),
            "32-bit interrupt gate",
        ),
        (
            legacy_gate(0x0012_3456, 0x38, 0xf),
            Some(0x12_4456),
            "32-bit trap gate",
        ),
        (
            legacy_gate(0xffff_3456, 0x38, 0x7),
            Some(0x4456),
            "16-bit gate: 16-bit offset",
        ),
        (legacy_gate(0x0012_3456, 0x38, 0x5), None, "task gate"),
        (
            legacy_gate(0x0012_3456, 0x38, 0xe) & !(1 << 47),
            None,
            "not present",
        ),
        (
            legacy_gate(0x0012_3456, KERNEL_SS, 0xe),
            None,
            "data segment",
        ),
        (legacy_gate(0x0012_3456, 0x78, 0xe), None, "past the GDT"),
    ];
    for (gate, handler, what) in cases {
        cpu.mem
            .write_obj(gate, GuestAddress(LEGACY_IDT + 6 * 8))
            .unwrap();
        assert_eq!(idt_handler(&mut cpu, 6).unwrap(), handler, "{what}");
    }
    cpu.sregs.idt.limit = 6 * 8 + 6;
    assert_eq!(idt_handler(&mut cpu, 6).unwrap(), None, "past IDTR.limit");
}

/// Real mode at the #UD entry (IVT entry 6: 0x0000:0x0500) for the
/// instruction at CS:IP 0x3000:0x10: FLAGS, CS, IP pushed on SS:SP
/// 0x3300:0xfff0.
fn at_real_mode_ud_entry(f: Asm) -> (MockCpu, Vec<u8>) {
    let mut cpu = real_mode();
    let bytes = real_mode_code(&mut cpu, f);
    cpu.sregs.idt.base = 0;
    cpu.sregs.idt.limit = 0x3ff;
    cpu.mem
        .write_slice(&[0x00, 0x05, 0x00, 0x00], GuestAddress(6 * 4))
        .unwrap();
    let frame: Vec<u8> = [0x10u16, 0x3000, 0x0202]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    cpu.mem
        .write_slice(&frame, GuestAddress(0x33000 + 0xfff0 - 6))
        .unwrap();
    cpu.regs.rsp = 0xfff0 - 6;
    cpu.regs.rip = 0x500;
    cpu.regs.rflags = 0x2;
    cpu.sregs.cs.selector = 0;
    cpu.sregs.cs.base = 0;
    (cpu, bytes)
}

#[test]
fn real_mode_ud_entry_emulates_and_returns_as_iret() {
    let (mut cpu, bytes) = at_real_mode_ud_entry(|a| a.movdir64b(di, ptr(si)));
    cpu.mem
        .write_slice(&descriptor(), GuestAddress(0x31000 + 0x20))
        .unwrap();
    cpu.regs.rsi = 0x20;
    cpu.regs.rdi = 0x80;
    assert_eq!(
        read_exception_frame(&mut cpu, 6).unwrap(),
        Some(ExceptionFrame {
            error_code: None,
            rip: 0x10,
            cs: 0x3000,
            rflags: 0x202,
            rsp: 0xfff0,
            ss: 0x3300,
        })
    );

    let action = handle_exception_entry(&mut cpu, 6).unwrap();

    assert_eq!(
        action,
        EntryAction::Emulated(StoreRecord {
            kind: StoreKind::Movdir64b,
            linear: 0x32080,
            gpa: 0x32080,
            reply: StoreReply::Accepted,
        })
    );
    assert_eq!(cpu.stores[0].1, descriptor());
    assert_eq!(
        (cpu.regs.rip, cpu.sregs.cs.selector, cpu.sregs.cs.base),
        (0x10 + bytes.len() as u64, 0x3000, 0x30000)
    );
    assert_eq!((cpu.regs.rsp, cpu.regs.rflags), (0xfff0, 0x202));
    assert!(cpu.injected.is_empty());
}

#[test]
fn real_mode_ud_entry_fault_is_delivered_from_the_instruction_without_error_code() {
    let (mut cpu, _) = at_real_mode_ud_entry(|a| a.movdir64b(di, ptr(si)));
    cpu.regs.rsi = 0xffe0;

    let action = handle_exception_entry(&mut cpu, 6).unwrap();

    let gp = Exception {
        error_code: None,
        ..Exception::gp0()
    };
    assert_eq!(action, EntryAction::Faulted(gp));
    assert_eq!(cpu.injected, vec![Injected::at(gp, 0x10, 0x3000)]);
    assert_eq!((cpu.regs.rsp, cpu.sregs.cs.base), (0xfff0, 0x30000));
    assert!(cpu.stores.is_empty());
}

#[test]
fn protected_mode_user_ud_entry_returns_to_the_outer_stack() {
    let user_esp = 0x7_0000;
    let code = assemble32(UCODE_PA, |a| a.movdir64b(edi, ptr(esi)));
    let frame = [
        UCODE_PA as u32,
        u32::from(USER32_CS),
        0x202,
        user_esp,
        u32::from(USER_SS),
    ];
    let mut cpu = at_protected_entry(6, &frame);
    cpu.mem.write_slice(&code, GuestAddress(UCODE_PA)).unwrap();
    cpu.mem
        .write_slice(&descriptor(), GuestAddress(URAM_PA))
        .unwrap();
    cpu.regs.rsi = URAM_PA;
    cpu.regs.rdi = PORTAL_PA + 0x40;

    let action = handle_exception_entry(&mut cpu, 6).unwrap();

    assert_eq!(
        action,
        EntryAction::Emulated(StoreRecord {
            kind: StoreKind::Movdir64b,
            linear: PORTAL_PA + 0x40,
            gpa: PORTAL_PA + 0x40,
            reply: StoreReply::Accepted,
        })
    );
    assert_eq!(cpu.regs.rip, UCODE_PA + code.len() as u64);
    assert_eq!(
        (cpu.regs.rsp, cpu.regs.rflags),
        (u64::from(user_esp), 0x202)
    );
    assert_eq!(
        (cpu.sregs.cs.selector, cpu.sregs.cs.dpl, cpu.sregs.cs.db),
        (USER32_CS, 3, 1)
    );
    assert_eq!((cpu.sregs.ss.selector, cpu.sregs.ss.dpl), (USER_SS, 3));

    // The same frame from virtual-8086 mode is left to the guest.
    let mut v86 = frame;
    v86[2] |= rflags::VM as u32;
    let mut cpu = at_protected_entry(6, &v86);
    cpu.mem.write_slice(&code, GuestAddress(UCODE_PA)).unwrap();
    assert_eq!(
        handle_exception_entry(&mut cpu, 6).unwrap(),
        EntryAction::PassThrough
    );
}

#[test]
fn protected_mode_kernel_gp0_entry_pops_the_error_code() {
    let code = assemble32(UCODE_PA, |a| a.enqcmd(edi, ptr(esi)));
    let sp_before = KSTACK_PA + 0x1000;
    for (error_code, handled) in [(0, true), (0x18, false)] {
        let mut cpu = at_protected_entry(
            13,
            &[error_code, UCODE_PA as u32, u32::from(KERNEL32_CS), 0x202],
        );
        cpu.mem.write_slice(&code, GuestAddress(UCODE_PA)).unwrap();
        cpu.mem
            .write_slice(&descriptor(), GuestAddress(URAM_PA))
            .unwrap();
        cpu.regs.rsi = URAM_PA;
        cpu.regs.rdi = PORTAL_PA;
        cpu.device_reply = StoreReply::Retry;

        let action = handle_exception_entry(&mut cpu, 13).unwrap();

        if !handled {
            assert_eq!(action, EntryAction::PassThrough, "#GP({error_code:#x})");
            assert_eq!(cpu.regs.rip, LEGACY_HANDLER);
            continue;
        }
        assert!(matches!(action, EntryAction::Emulated(_)), "{action:?}");
        assert_eq!(cpu.regs.rip, UCODE_PA + code.len() as u64);
        assert_eq!(cpu.regs.rsp, sp_before);
        assert_eq!(cpu.regs.rflags, 0x202 | rflags::ZF);
        assert_eq!(cpu.sregs.cs.selector, KERNEL32_CS);
    }
}

#[test]
fn step_over_outside_long_mode_skips_only_no_ops() {
    let (mut cpu, _) = at_real_mode_ud_entry(|a| a.nop());
    cpu.mem.write_slice(&[0x90], GuestAddress(0x500)).unwrap();
    assert_eq!(
        step_over_handler_entry(&mut cpu).unwrap(),
        StepOver::Skipped(1)
    );
    assert_eq!(cpu.regs.rip, 0x501);

    cpu.regs.rip = 0x500;
    cpu.mem.write_slice(&[0x50], GuestAddress(0x500)).unwrap(); // push ax
    assert_eq!(
        step_over_handler_entry(&mut cpu).unwrap(),
        StepOver::NotHandled(Unhandled {
            rip: 0x500,
            bytes: vec![0x50],
            reason: UnhandledReason::NotLongMode,
        })
    );
    assert_eq!(cpu.regs.rip, 0x500);
}

// ---------------------------------------------------------------------------
// Garbage never panics
// ---------------------------------------------------------------------------

#[test]
fn xsave_with_cr4_osxsave_clear_is_ud() {
    // The random-bytes property's first find: `xsave [rax]` (0f ae 20) at
    // CPL 0. Without CR4.OSXSAVE the family is #UD, before its operand.
    let mut cpu = MockCpu::new();
    assert_eq!(cpu.sregs.cr4 & crate::x86::cr4::OSXSAVE, 0);
    cpu.regs.rip = KCODE;
    assert_raises(&mut cpu, &[0x0f, 0xae, 0x20], Exception::ud());
}

#[test]
fn xsave_to_an_unmapped_area_is_a_page_fault_at_its_header() {
    // With OSXSAVE the same bytes reach the area: the standard form reads
    // XSTATE_BV (offset 512) first to keep its bits outside RFBM, so an
    // area at unmapped VA 0 faults there, a read of a page not present.
    let mut cpu = MockCpu::new();
    cpu.sregs.cr4 |= crate::x86::cr4::OSXSAVE;
    cpu.regs.rax = 0;
    assert_raises(&mut cpu, &[0x0f, 0xae, 0x20], Exception::page_fault(0, 512));
    assert_eq!(cpu.xsave_image, vec![0; 4096], "a fault changes no state");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_instruction_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..=15),
        regs in proptest::array::uniform8(any::<u64>()),
        user in any::<bool>(),
    ) {
        let mut cpu = MockCpu::new();
        if user {
            cpu.enter_user();
        }
        cpu.regs.rax = regs[0];
        cpu.regs.rbx = regs[1];
        cpu.regs.rcx = regs[2];
        cpu.regs.rdx = regs[3];
        cpu.regs.rsi = regs[4];
        cpu.regs.rdi = regs[5];
        cpu.regs.rbp = regs[6];
        cpu.regs.rsp = regs[7];
        let _ = handle_emulation_failure(&mut cpu, &bytes).unwrap();
    }

    #[test]
    fn random_user_code_and_frame_at_ud_entry_never_panic(
        code in proptest::collection::vec(any::<u8>(), 15),
        frame in proptest::array::uniform5(any::<u64>()),
        stack in prop_oneof![Just(KSTACK + 0x1000 - 40), any::<u64>()],
        source in prop_oneof![Just(UDATA), any::<u64>()],
    ) {
        let (mut cpu, _) = at_ud_entry(0, |a| a.nop());
        cpu.write(UCODE, &code);
        cpu.regs.rdx = source;
        for (i, v) in frame.iter().enumerate() {
            // Keep RIP and CS valid half of the time to reach decoding.
            let v = match i {
                0 if v & 1 == 0 => UCODE,
                1 if v & 1 == 0 => u64::from(USER_CS),
                _ => *v,
            };
            cpu.write(KSTACK + 0x1000 - 40 + 8 * i as u64, &v.to_le_bytes());
        }
        cpu.regs.rsp = stack;
        let _ = handle_exception_entry(&mut cpu, 6).unwrap();
    }
}

#[test]
fn user_enqcmd_with_device_source_completes() {
    // A CPL 3 ENQCMD whose source is the portal page: emulated at the #UD
    // entry like any other, the source read from the device, and the user
    // gets the device's answer in ZF instead of a #UD.
    let (mut cpu, code) = at_ud_entry(0, |a| a.enqcmd(rax, ptr(rdx)));
    cpu.regs.rdx = PORTAL + 0x40;
    cpu.pasid = PASID_VALID | 0x77;
    cpu.device_reply = StoreReply::Retry;
    let action = handle_exception_entry(&mut cpu, 6).unwrap();
    assert_eq!(
        action,
        EntryAction::Emulated(StoreRecord {
            kind: StoreKind::Enqcmd,
            linear: PORTAL,
            gpa: PORTAL_PA,
            reply: StoreReply::Retry,
        })
    );
    assert_back_in_user(&cpu, UCODE + code.len() as u64);
    assert_eq!(cpu.regs.rflags, 0x202 | rflags::ZF);
    assert_eq!(dword0(&cpu.stores[0].1), 0x77);
    let rest: Vec<u8> = (4..64).map(|i| portal_byte(PORTAL_PA + 0x40 + i)).collect();
    assert_eq!(cpu.stores[0].1[4..].to_vec(), rest);
    assert!(cpu.injected.is_empty());
}

#[test]
fn reserved_bits_and_tables_outside_ram_are_pf_rsvd() {
    // An address bit above MAXPHYADDR in the source's PTE.
    let (mut cpu, bytes) = enqcmd_machine();
    cpu.phys_bits = 46;
    cpu.map(KDATA, KDATA_PA | (1 << 47), PTE_P | PTE_RW | PTE_NX);
    assert_raises(
        &mut cpu,
        &bytes,
        Exception::page_fault(pf_error::PRESENT | pf_error::RESERVED, KDATA + 0x100),
    );

    // The same entry is fine with 52-bit physical addresses... and then
    // points where nothing answers: the source reads as all ones.
    let (mut cpu, bytes) = enqcmd_machine();
    cpu.map(KDATA, KDATA_PA | (1 << 47), PTE_P | PTE_RW | PTE_NX);
    assert!(matches!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Store(_)
    ));
    assert_eq!(cpu.stores[0].1[4..], [0xff; 60]);

    // A page-directory entry pointing outside guest RAM reads as all ones.
    let (mut cpu, bytes) = enqcmd_machine();
    let pde = cpu.entry_addr(KDATA, 2);
    cpu.mem
        .write_obj(0x40_0000_0000u64 | PTE_P | PTE_RW, GuestAddress(pde))
        .unwrap();
    assert_raises(
        &mut cpu,
        &bytes,
        Exception::page_fault(pf_error::PRESENT | pf_error::RESERVED, KDATA + 0x100),
    );
}

#[test]
fn emulated_accesses_set_accessed_and_dirty_flags() {
    const ACCESSED: u64 = 1 << 5;
    const DIRTY: u64 = 1 << 6;
    let mut cpu = MockCpu::new();
    cpu.enter_user();
    cpu.regs.rax = URAM;
    let bytes = cpu.place(|a| a.movdir64b(rax, ptr(rdx)));
    assert_eq!(cpu.pte(UDATA) & (ACCESSED | DIRTY), 0);
    assert_eq!(cpu.pte(URAM) & (ACCESSED | DIRTY), 0);

    assert!(matches!(
        handle_emulation_failure(&mut cpu, &bytes).unwrap(),
        Outcome::Store(_)
    ));

    assert_eq!(cpu.pte(UDATA) & (ACCESSED | DIRTY), ACCESSED, "source read");
    assert_eq!(
        cpu.pte(URAM) & (ACCESSED | DIRTY),
        ACCESSED | DIRTY,
        "destination written"
    );
}

// ---------------------------------------------------------------------------
// SYSCALL completion at the #PF entry, and stepping over a handler's first
// instruction
// ---------------------------------------------------------------------------

/// Linux's entry_SYSCALL_64 in the test kernel's image.
const LSTAR_VALUE: u64 = KCODE + 0x40;
/// The #PF handler.
const PF_HANDLER: u64 = KCODE + 0xa00;
/// Linux's STAR: kernel CS 0x10, SYSRET base 0x23.
const LINUX_STAR: u64 = (0x23 << 48) | (0x10 << 32);
/// Linux's FMASK: TF, DF, IF, IOPL, AC, NT.
const LINUX_FMASK: u64 = 0x47700;
/// The user's RFLAGS that SYSCALL saved in R11: RF, IF, ZF, PF, bit 1.
const USER_RFLAGS: u64 = 0x1_0246;

fn linux_msrs() -> SyscallMsrs {
    SyscallMsrs {
        star: LINUX_STAR,
        lstar: LSTAR_VALUE,
        fmask: LINUX_FMASK,
    }
}

/// The frame the backend's half-done SYSCALL leaves at the #PF entry
/// (measured: error code 15 in Linux, 5 in a small guest).
fn broken_syscall_frame() -> ExceptionFrame {
    ExceptionFrame {
        error_code: Some(0xf),
        rip: LSTAR_VALUE,
        cs: USER_CS,
        rflags: (USER_RFLAGS & !LINUX_FMASK) | 2,
        rsp: USER_RSP,
        ss: USER_SS,
    }
}

#[test]
fn broken_syscall_frame_gives_the_architectural_syscall_state() {
    let entry = broken_syscall_entry(
        &broken_syscall_frame(),
        LSTAR_VALUE,
        USER_RFLAGS,
        &linux_msrs(),
    )
    .expect("recognised");
    assert_eq!(
        entry,
        SyscallEntry {
            rip: LSTAR_VALUE,
            rsp: USER_RSP,
            // R11 & ~FMASK (IF gone), RF cleared, bit 1 set.
            rflags: 0x46,
            cs: 0x10,
            ss: 0x18,
        }
    );
    let code = entry.cs_segment();
    assert_eq!(
        (
            code.selector,
            code.dpl,
            code.l,
            code.db,
            code.type_,
            code.present,
            code.s
        ),
        (0x10, 0, 1, 0, 0xb, 1, 1)
    );
    let stack = entry.ss_segment();
    assert_eq!(
        (
            stack.selector,
            stack.dpl,
            stack.db,
            stack.type_,
            stack.present,
            stack.limit
        ),
        (0x18, 0, 1, 0x3, 1, 0xffff_ffff)
    );
    // STAR with an RPL in its CS field still loads RPL 0.
    let msrs = SyscallMsrs {
        star: LINUX_STAR | (3 << 32),
        ..linux_msrs()
    };
    let entry = broken_syscall_entry(&broken_syscall_frame(), LSTAR_VALUE, USER_RFLAGS, &msrs)
        .expect("recognised");
    assert_eq!((entry.cs, entry.ss), (0x10, 0x18));
}

#[test]
fn other_page_faults_are_not_taken_for_a_syscall() {
    let msrs = linux_msrs();
    let f = broken_syscall_frame();
    let cases: [(&str, ExceptionFrame, u64, SyscallMsrs); 7] = [
        (
            "kernel-mode fault",
            ExceptionFrame {
                cs: KERNEL_CS,
                error_code: Some(0xb),
                ..f
            },
            LSTAR_VALUE,
            msrs,
        ),
        (
            "user fault at another address",
            ExceptionFrame {
                rip: LSTAR_VALUE + 1,
                ..f
            },
            LSTAR_VALUE + 1,
            msrs,
        ),
        ("CR2 elsewhere", f, UDATA, msrs),
        (
            "user code with IF set jumping to LSTAR",
            ExceptionFrame { rflags: 0x202, ..f },
            LSTAR_VALUE,
            msrs,
        ),
        (
            "error code without the user bit",
            ExceptionFrame {
                error_code: Some(0x1),
                ..f
            },
            LSTAR_VALUE,
            msrs,
        ),
        (
            "no error code",
            ExceptionFrame {
                error_code: None,
                ..f
            },
            LSTAR_VALUE,
            msrs,
        ),
        (
            "SYSCALL not configured",
            f,
            LSTAR_VALUE,
            SyscallMsrs::default(),
        ),
    ];
    for (what, frame, fault_address, msrs) in cases {
        assert_eq!(
            broken_syscall_entry(&frame, fault_address, USER_RFLAGS, &msrs),
            None,
            "{what}"
        );
    }
}

/// The vCPU at the #PF entry with `frame` on the kernel stack, CR2 `cr2`,
/// the user's RCX/R11 as SYSCALL left them.
fn at_pf_entry(frame: &ExceptionFrame, fault_address: u64) -> MockCpu {
    let mut cpu = MockCpu::new();
    cpu.set_gate(14, PF_HANDLER);
    let words = [
        frame.error_code.unwrap_or(0),
        frame.rip,
        u64::from(frame.cs),
        frame.rflags,
        frame.rsp,
        u64::from(frame.ss),
    ];
    let frame_rsp = KSTACK + 0x1000 - 48;
    for (i, v) in words.iter().enumerate() {
        cpu.write(frame_rsp + 8 * i as u64, &v.to_le_bytes());
    }
    cpu.regs.rsp = frame_rsp;
    cpu.regs.rip = PF_HANDLER;
    cpu.regs.rflags = 0x2;
    cpu.regs.rcx = UCODE + 2;
    cpu.regs.r11 = USER_RFLAGS;
    cpu.regs.rax = 39; // getpid
    cpu.sregs.cr2 = fault_address;
    cpu
}

#[test]
fn complete_syscall_puts_the_vcpu_at_lstar_in_kernel_mode() {
    let mut cpu = at_pf_entry(&broken_syscall_frame(), LSTAR_VALUE);
    let before = cpu.regs;
    let entry = complete_syscall(&mut cpu, &linux_msrs()).unwrap();
    assert!(entry.is_some());
    assert_eq!(cpu.regs.rip, LSTAR_VALUE);
    assert_eq!(cpu.regs.rsp, USER_RSP, "SYSCALL keeps the user stack");
    assert_eq!(cpu.regs.rflags, 0x46);
    assert_eq!(
        (cpu.regs.rcx, cpu.regs.r11, cpu.regs.rax),
        (before.rcx, before.r11, before.rax),
        "return RIP, saved RFLAGS and the call number are SYSCALL's"
    );
    assert_eq!((cpu.sregs.cs.selector, cpu.sregs.cs.dpl), (0x10, 0));
    assert_eq!((cpu.sregs.ss.selector, cpu.sregs.ss.dpl), (0x18, 0));
    assert!(cpu.injected.is_empty());
}

#[test]
fn complete_syscall_leaves_an_ordinary_fault_to_the_guest() {
    let frame = ExceptionFrame {
        error_code: Some(0x6),
        rip: UCODE,
        rflags: 0x202,
        ..broken_syscall_frame()
    };
    let mut cpu = at_pf_entry(&frame, UDATA);
    let (regs, sregs) = (cpu.regs, cpu.sregs);
    assert_eq!(complete_syscall(&mut cpu, &linux_msrs()).unwrap(), None);
    assert_eq!(cpu.regs, regs);
    assert_eq!(cpu.sregs.cs.selector, sregs.cs.selector);
    assert_eq!(cpu.sregs.ss.selector, sregs.ss.selector);
}

#[test]
fn syscall_msrs_are_recorded_by_index() {
    let mut m = SyscallMsrs::default();
    assert!(!m.configured());
    assert!(m.record(0xc000_0081, LINUX_STAR));
    assert!(m.record(0xc000_0082, LSTAR_VALUE));
    assert!(m.record(0xc000_0084, LINUX_FMASK));
    assert!(!m.record(0xc000_0083, 1), "CSTAR is not kept");
    assert_eq!(m, linux_msrs());
    assert!(m.configured());
    assert_eq!(m.kernel_cs(), 0x10);
}

/// Writes `first` at the #PF handler, puts the vCPU there and steps over.
fn step_over_at_handler(first: &[u8], rflags: u64) -> (MockCpu, StepOver) {
    let mut cpu = MockCpu::new();
    cpu.write(PF_HANDLER, first);
    cpu.regs.rip = PF_HANDLER;
    cpu.regs.rflags = rflags;
    let result = step_over_handler_entry(&mut cpu).unwrap();
    (cpu, result)
}

#[test]
fn step_over_skips_the_nops_linux_entry_points_begin_with() {
    for (bytes, len) in [
        (&[0x0f, 0x1f, 0x00][..], 3),  // the clac slot with SMAP off
        (&[0x90, 0x90, 0x90][..], 1),  // the same slot before alternatives
        (&crate::x86::ENDBR64[..], 4), // IBT kernels
        (&[0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00][..], 6),
    ] {
        let (cpu, result) = step_over_at_handler(bytes, 0x2);
        assert_eq!(result, StepOver::Skipped(len), "{bytes:02x?}");
        assert_eq!(cpu.regs.rip, PF_HANDLER + len);
        assert_eq!(cpu.regs.rflags, 0x2);
    }
}

#[test]
fn step_over_emulates_a_clac_at_the_entry() {
    let (cpu, result) = step_over_at_handler(&[0x0f, 0x01, 0xca], 0x2 | rflags::AC);
    assert_eq!(result, StepOver::Emulated(FallbackInstruction::Clac));
    assert_eq!(cpu.regs.rip, PF_HANDLER + 3);
    assert_eq!(cpu.regs.rflags, 0x2, "AC cleared, nothing else");
}

#[test]
fn step_over_refuses_an_instruction_with_effects() {
    let (cpu, result) = step_over_at_handler(&[0x50], 0x2); // push rax
    assert_eq!(
        result,
        StepOver::NotHandled(Unhandled {
            rip: PF_HANDLER,
            bytes: vec![0x50],
            reason: UnhandledReason::UnknownInstruction(iced_x86::Mnemonic::Push),
        })
    );
    assert_eq!(cpu.regs.rip, PF_HANDLER, "the vCPU is unchanged");
}

// ---------------------------------------------------------------------------
// LSL (Linux's paranoid entries read their CPU number with it)
// ---------------------------------------------------------------------------

/// Linux's per-CPU segment (GDT entry 15, selector 0x7b): a DPL 3
/// read-only data segment whose byte-granular limit holds CPU 3, node 1.
const CPUNODE_DESCRIPTOR: u64 = 0x0040_f100_0000_1003;
const CPUNODE_SELECTOR: u64 = 0x7b;
/// `lsl rax, eax`, as Linux's entry code has it.
const LSL_RAX_EAX: [u8; 4] = [0x48, 0x0f, 0x03, 0xc0];

fn with_descriptor(index: u64, desc: u64) -> MockCpu {
    let cpu = MockCpu::new();
    cpu.mem
        .write_obj(desc, GuestAddress(GDT_PA + index * 8))
        .unwrap();
    cpu
}

/// Runs `bytes` at the current RIP and checks it completed as LSL.
fn run_lsl(cpu: &mut MockCpu, bytes: &[u8]) {
    cpu.write(cpu.regs.rip, bytes);
    let rip = cpu.regs.rip;
    assert_eq!(
        handle_emulation_failure(cpu, bytes).unwrap(),
        Outcome::Emulated(FallbackInstruction::Lsl)
    );
    assert_eq!(cpu.regs.rip, rip + bytes.len() as u64);
}

#[test]
fn lsl_reads_the_limit_of_linuxs_cpu_number_segment() {
    let mut cpu = with_descriptor(15, CPUNODE_DESCRIPTOR);
    cpu.regs.rax = CPUNODE_SELECTOR;
    cpu.regs.rflags = 0x2 | rflags::CF;
    run_lsl(&mut cpu, &LSL_RAX_EAX);
    assert_eq!(cpu.regs.rax, 0x1003);
    assert_eq!(
        cpu.regs.rflags,
        0x2 | rflags::CF | rflags::ZF,
        "only ZF changes"
    );
}

#[test]
fn lsl_scales_a_page_granular_limit_and_writes_the_operand_size() {
    // Kernel CS: limit 0xfffff in 4-KiB units.
    let mut cpu = MockCpu::new();
    cpu.regs.rbx = u64::from(KERNEL_CS);
    cpu.regs.rcx = 0xdead_beef_dead_beef;
    let bytes = cpu.place(|a| a.lsl(ecx, ebx));
    run_lsl(&mut cpu, &bytes);
    assert_eq!(
        cpu.regs.rcx, 0xffff_ffff,
        "a 32-bit destination zero-extends"
    );
    // A 16-bit destination keeps the rest of the register.
    let mut cpu = MockCpu::new();
    cpu.regs.rbx = u64::from(KERNEL_CS);
    cpu.regs.rcx = 0xdead_beef_dead_0000;
    let bytes = cpu.place(|a| a.lsl(cx, bx));
    run_lsl(&mut cpu, &bytes);
    assert_eq!(cpu.regs.rcx, 0xdead_beef_dead_ffff);
    assert_ne!(cpu.regs.rflags & rflags::ZF, 0);
}

#[test]
fn lsl_clears_zf_and_keeps_the_destination_where_the_selector_is_refused() {
    let call_gate = 0x0000_ec00_0010_0000; // type 0xc, DPL 3
    let conforming_code = 0x00af_9f00_0000_ffff; // DPL 0, type 0xf
    let busy_tss = 0x0000_8b00_0000_0067; // DPL 0, 64-bit busy TSS
    let cases: [(&str, u64, u64, bool, Option<u64>); 8] = [
        // (what, GDT entry 15, selector, at CPL 3, limit if accepted)
        ("null selector", CPUNODE_DESCRIPTOR, 0x3, false, None),
        ("past the GDT limit", CPUNODE_DESCRIPTOR, 0x83, false, None),
        (
            "LDT selector, no LDT",
            CPUNODE_DESCRIPTOR,
            0x7f,
            false,
            None,
        ),
        ("call gate", call_gate, 0x7b, false, None),
        (
            "DPL 0 data from CPL 3",
            0x00cf_9300_0000_ffff,
            0x78,
            true,
            None,
        ),
        (
            "RPL 3 above DPL 0",
            0x00cf_9300_0000_ffff,
            0x7b,
            false,
            None,
        ),
        (
            "conforming code, any privilege",
            conforming_code,
            0x7b,
            true,
            Some(0xffff_ffff),
        ),
        ("64-bit busy TSS", busy_tss, 0x78, false, Some(0x67)),
    ];
    for (what, desc, selector, user, limit) in cases {
        let mut cpu = with_descriptor(15, desc);
        if user {
            cpu.enter_user();
        }
        cpu.regs.rax = selector;
        cpu.regs.rflags |= rflags::ZF;
        run_lsl(&mut cpu, &LSL_RAX_EAX);
        match limit {
            Some(l) => assert_eq!(cpu.regs.rax, l, "{what}"),
            None => {
                assert_eq!(cpu.regs.rax, selector, "{what}: destination kept");
                assert_eq!(cpu.regs.rflags & rflags::ZF, 0, "{what}: ZF clear");
            }
        }
    }
}

#[test]
fn lsl_from_memory_and_its_page_fault() {
    let mut cpu = with_descriptor(15, CPUNODE_DESCRIPTOR);
    cpu.write(KDATA + 0x10, &(CPUNODE_SELECTOR as u16).to_le_bytes());
    cpu.regs.rsi = KDATA;
    let bytes = cpu.place(|a| a.lsl(edx, word_ptr(rsi + 0x10)));
    run_lsl(&mut cpu, &bytes);
    assert_eq!(cpu.regs.rdx, 0x1003);

    let mut cpu = MockCpu::new();
    cpu.regs.rsi = 0x5000_0000; // unmapped
    let bytes = cpu.place(|a| a.lsl(edx, word_ptr(rsi)));
    assert_raises(&mut cpu, &bytes, Exception::page_fault(0, 0x5000_0000));
}
