//! Micro-guests: small x86-64 programs, written with iced-x86's code
//! assembler, run as guests in 64-bit long mode on the `vmm` machine.
//!
//! This crate is the test and demo harness, never part of a production
//! machine: the program builder and [`run`] (here), the guest-side VT-d,
//! ECAM and DSA driver library ([`driver`]), the test devices
//! ([`test_devices`], with the test-exit port [`add_test_exit`] puts on a
//! machine), the demo programs ([`demos`], [`sva_demo`]), the SVA benchmark
//! ([`sva_bench`]) and what `vmm micro` and `vmm bench` print
//! ([`demo_runs`]).
//!
//! The harness gives a program:
//! - identity paging of the first 4 GiB (2 MiB pages, all user-accessible),
//!   except [`DATA_START`]..+2 MiB, mapped with 4 KiB pages whose entries a
//!   test can change ([`MicroGuest::map_page`]);
//! - a GDT laid out like Linux's (kernel 32-bit CS 0x08, CS 0x10, DS 0x18,
//!   user 32-bit CS 0x23, user DS 0x2b, user CS 0x33, TSS 0x40), entries
//!   from [`FREE_SELECTOR`] a program defines ([`MicroGuest::segment`]), and
//!   a TSS whose RSP0 is the kernel stack;
//! - an IDT whose handlers the program supplies ([`MicroGuest::handler`]);
//!   like Linux's, a #UD handler must begin with `endbr64` (or `nop`): the
//!   VMM's breakpoint there steps over it when the guest's handler should
//!   run, because this platform's KVM does not honour RFLAGS.RF;
//!   every other vector reports `0xDEAD_00vv` through the test-exit port;
//! - the test-exit port [`TEST_EXIT_PORT`]: a 4-byte OUT there ends
//!   the run and the value written is its result.
//!
//! The first GiB of the PCI 64-bit MMIO window ([`layout::PCI_MMIO64_START`])
//! is identity-mapped too (2 MiB pages, supervisor and user), so a program
//! reaches the BARs of the vDSA functions that [`MicroOptions::accel`]
//! attaches: they sit at the fixed places [`vmm::sva::dsa_placements`]
//! gives (first vDSA at 00:01.0, BAR2 at `PCI_MMIO64_START`, BAR0 after it
//! for the default 8-WQ shape; ECAM at [`layout::PCIE_ECAM_START`]); the
//! vIOMMU's registers are at [`layout::VIOMMU_START`].
//!
//! The program starts at CPL0 at its first instruction with RSP at
//! [`KERNEL_STACK_TOP`]. [`enter_user`] emits the IRETQ to CPL3 code;
//! exceptions (`ud2`, a privileged instruction) bring it back to CPL0.

#![forbid(unsafe_code)]

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vmm::devices::serial::SerialOutput;
use vmm::layout;
use vmm::machine::{Machine, MachineConfig, MachineError};

use crate::test_devices::{
    PortalLog, TestExit, TestMmio, TestPortal, TEST_MMIO_SIZE, TEST_PORTAL_SIZE,
};

pub mod demo_runs;
pub mod demos;
pub mod driver;
pub mod sva_bench;
pub mod sva_demo;
pub mod test_devices;

/// GDT base.
pub const GDT_START: u64 = 0x1000;
/// IDT base.
pub const IDT_START: u64 = 0x2000;
/// TSS base.
pub const TSS_START: u64 = 0x3000;
/// PML4 (CR3).
pub const PML4_START: u64 = 0x8000;
const PDPT_START: u64 = 0x9000;
/// Four page directories for 4 GiB.
const PD_START: u64 = 0xa000;
/// PDPT for the first 512 GiB above 512 GiB (PML4 entry 1).
const HIGH_PDPT_START: u64 = 0x4000;
/// Page directory of the first GiB of the PCI 64-bit window.
const HIGH_PD_START: u64 = 0x5000;
/// The 4 KiB page table of the data area.
pub const DATA_PT_START: u64 = 0xe000;
/// Where the program is assembled and loaded.
pub const CODE_START: u64 = 0x10_0000;
/// Largest program.
pub const CODE_SIZE: u64 = 0xe_0000;
/// Top of the CPL0 stack (also TSS.RSP0).
pub const KERNEL_STACK_TOP: u64 = 0x1f_f000;
/// Start of the 4 KiB-mapped data area (user stack, buffers, test pages).
pub const DATA_START: u64 = 0x20_0000;
/// Top of the conventional user stack, at the end of the data area.
pub const USER_STACK_TOP: u64 = 0x3f_f000;

/// Kernel 32-bit (compatibility-mode) code selector, as Linux's
/// `__KERNEL32_CS`.
pub const KERNEL32_CS: u16 = 0x08;
/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x10;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x18;
/// User 32-bit (compatibility-mode) code selector (RPL 3), as Linux's
/// `__USER32_CS`.
pub const USER32_CS: u16 = 0x23;
/// User data selector (RPL 3).
pub const USER_DS: u16 = 0x2b;
/// User code selector (RPL 3).
pub const USER_CS: u16 = 0x33;
/// TSS selector.
pub const TSS_SELECTOR: u16 = 0x40;
/// The first GDT selector a program may define ([`MicroGuest::segment`]);
/// the GDT ends at [`GDT_ENTRIES`].
pub const FREE_SELECTOR: u16 = 0x50;
/// Entries in the GDT.
pub const GDT_ENTRIES: u16 = 16;

// Page-table entry bits, under the names the programs use.
use vmm::x86::pte::PAGE_SIZE as PTE_PS;
pub use vmm::x86::pte::{PRESENT as PTE_P, USER as PTE_U, WRITABLE as PTE_W};

use vmm::x86::segment::{self, SegmentDescriptor};
use vmm::x86::{cr0, cr4, efer, rflags};

// Segment descriptors, flat as Linux's.
const KERNEL_CODE: SegmentDescriptor = segment::code64(0);
const KERNEL_DATA: SegmentDescriptor = segment::data(0);
const USER_DATA: SegmentDescriptor = segment::data(3);
const USER_CODE: SegmentDescriptor = segment::code64(3);
const KERNEL_CODE32: SegmentDescriptor = segment::code32(0);
const USER_CODE32: SegmentDescriptor = segment::code32(3);
const TSS_LIMIT: u32 = 0x67;
/// TSS.RSP0 offset.
const TSS_RSP0: u64 = 4;
/// IDT gate type: present 64-bit interrupt gate, DPL 0.
const GATE_INTERRUPT: u8 = 0x8e;
/// The test-exit port the harness adds to every micro-guest's machine: a
/// 4-byte OUT here ends the run and the value written becomes the run's
/// result ([`vmm::vm::RunExit::TestExit`]).
pub const TEST_EXIT_PORT: u16 = 0xf4;
/// Result a default handler reports: `DEFAULT_HANDLER_RESULT | vector`.
pub const DEFAULT_HANDLER_RESULT: u32 = 0xdead_0000;

/// Errors building a micro-guest.
#[derive(Debug, Error)]
pub enum MicroGuestError {
    /// The assembler rejected the program.
    #[error("assembling the micro-guest failed: {0}")]
    Assemble(#[from] IcedError),
    /// The program is larger than its area.
    #[error("the micro-guest program is {0} bytes, more than fits")]
    TooLarge(usize),
    /// Writing guest memory failed.
    #[error("writing micro-guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// A page edit outside the 4 KiB-mapped data area.
    #[error("{0:#x} is outside the micro-guest data area")]
    NotDataPage(u64),
    /// A GDT entry the harness uses, or past the GDT's end.
    #[error("GDT selector {0:#x} is not free for a program")]
    NotFreeSelector(u16),
}

/// A micro-guest program being written.
pub struct MicroGuest {
    /// The program: entry at its first instruction.
    pub asm: CodeAssembler,
    handlers: Vec<(u8, CodeLabel)>,
    page_edits: Vec<(u64, u64)>,
    data: Vec<(u64, Vec<u8>)>,
    segments: Vec<(u16, u64)>,
}

/// A program loaded into guest memory.
pub struct LoadedGuest {
    /// Registers vCPU 0 starts with.
    pub regs: kvm_regs,
    /// Segment and control registers vCPU 0 starts with.
    pub sregs: kvm_sregs,
    /// Where each handler label landed, by vector.
    pub handlers: Vec<(u8, u64)>,
}

impl Default for MicroGuest {
    fn default() -> Self {
        Self::new()
    }
}

impl MicroGuest {
    /// An empty 64-bit program.
    pub fn new() -> Self {
        // 64 is a valid bitness: this cannot fail.
        let asm = CodeAssembler::new(64).unwrap_or_else(|_| unreachable!("64-bit assembler"));
        Self {
            asm,
            handlers: Vec::new(),
            page_edits: Vec::new(),
            data: Vec::new(),
            segments: Vec::new(),
        }
    }

    /// Routes exception/interrupt `vector` to `label` (an interrupt gate,
    /// DPL 0: user code reaches it only through exceptions).
    pub fn handler(&mut self, vector: u8, label: CodeLabel) {
        self.handlers.push((vector, label));
    }

    /// Sets the 4 KiB page-table entry of `addr` (in the data area) to map
    /// `addr` itself with `flags` (0 makes it not present).
    pub fn map_page(&mut self, addr: u64, flags: u64) -> Result<(), MicroGuestError> {
        if !(DATA_START..DATA_START + 0x20_0000).contains(&addr) {
            return Err(MicroGuestError::NotDataPage(addr));
        }
        self.page_edits.push((addr & !0xfff, flags));
        Ok(())
    }

    /// Puts the 8-byte descriptor `desc` in the GDT at `selector` (from
    /// [`FREE_SELECTOR`] up; its RPL bits are ignored).
    pub fn segment(&mut self, selector: u16, desc: u64) -> Result<(), MicroGuestError> {
        if !(FREE_SELECTOR..GDT_ENTRIES * 8).contains(&selector) {
            return Err(MicroGuestError::NotFreeSelector(selector));
        }
        self.segments.push((selector & !7, desc));
        Ok(())
    }

    /// Writes `bytes` at `gpa` before the program starts.
    pub fn write(&mut self, gpa: u64, bytes: &[u8]) {
        self.data.push((gpa, bytes.to_vec()));
    }

    /// Assembles the program and writes it, the tables and the data into
    /// `memory`; returns the state vCPU 0 starts with.
    pub fn load(mut self, memory: &GuestMemoryMmap) -> Result<LoadedGuest, MicroGuestError> {
        // Default handlers report the vector through the test-exit port.
        let mut defaults = Vec::new();
        for vector in 0..=255u8 {
            if self.handlers.iter().any(|&(v, _)| v == vector) {
                continue;
            }
            let mut label = self.asm.create_label();
            self.asm.set_label(&mut label)?;
            self.asm.endbr64()?;
            self.asm
                .mov(eax, DEFAULT_HANDLER_RESULT | u32::from(vector))?;
            self.asm.out(i32::from(TEST_EXIT_PORT as u8), eax)?;
            self.asm.hlt()?;
            defaults.push((vector, label));
        }
        let result = self.asm.assemble_options(
            CODE_START,
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )?;
        let code = &result.inner.code_buffer;
        if code.len() as u64 > CODE_SIZE {
            return Err(MicroGuestError::TooLarge(code.len()));
        }
        memory.write_slice(code, GuestAddress(CODE_START))?;

        let mut handlers = Vec::new();
        for &(vector, label) in self.handlers.iter().chain(&defaults) {
            let addr = result.label_ip(&label)?;
            write_gate(memory, vector, addr)?;
            if self.handlers.iter().any(|&(v, _)| v == vector) {
                handlers.push((vector, addr));
            }
        }
        write_gdt_and_tss(memory, &self.segments)?;
        write_page_tables(memory)?;
        for (addr, flags) in &self.page_edits {
            let pte = addr | flags;
            memory.write_obj(
                pte,
                GuestAddress(DATA_PT_START + ((addr - DATA_START) >> 12) * 8),
            )?;
        }
        for (gpa, bytes) in &self.data {
            memory.write_slice(bytes, GuestAddress(*gpa))?;
        }
        let regs = kvm_regs {
            rip: CODE_START,
            rsp: KERNEL_STACK_TOP,
            rflags: rflags::FIXED,
            ..Default::default()
        };
        Ok(LoadedGuest {
            regs,
            sregs: long_mode_sregs(),
            handlers,
        })
    }
}

fn write_gate(memory: &GuestMemoryMmap, vector: u8, handler: u64) -> Result<(), MicroGuestError> {
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&KERNEL_CS.to_le_bytes());
    gate[5] = GATE_INTERRUPT;
    gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
    gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    memory.write_slice(&gate, GuestAddress(IDT_START + u64::from(vector) * 16))?;
    Ok(())
}

fn write_gdt_and_tss(
    memory: &GuestMemoryMmap,
    program_segments: &[(u16, u64)],
) -> Result<(), MicroGuestError> {
    let mut gdt = [0u64; GDT_ENTRIES as usize];
    gdt[usize::from(KERNEL32_CS >> 3)] = KERNEL_CODE32.to_u64();
    gdt[usize::from(USER32_CS >> 3)] = USER_CODE32.to_u64();
    gdt[usize::from(KERNEL_CS >> 3)] = KERNEL_CODE.to_u64();
    gdt[usize::from(KERNEL_DS >> 3)] = KERNEL_DATA.to_u64();
    gdt[usize::from(USER_DS >> 3)] = USER_DATA.to_u64();
    gdt[usize::from(USER_CS >> 3)] = USER_CODE.to_u64();
    let tss = segment::tss64(TSS_LIMIT, segment::kind::TSS64_AVAILABLE).to_system_u64(TSS_START);
    gdt[usize::from(TSS_SELECTOR >> 3)] = tss[0];
    gdt[usize::from(TSS_SELECTOR >> 3) + 1] = tss[1];
    for &(selector, desc) in program_segments {
        gdt[usize::from(selector >> 3)] = desc;
    }
    for (i, d) in gdt.iter().enumerate() {
        memory.write_obj(*d, GuestAddress(GDT_START + i as u64 * 8))?;
    }
    memory.write_obj(KERNEL_STACK_TOP, GuestAddress(TSS_START + TSS_RSP0))?;
    Ok(())
}

fn write_page_tables(memory: &GuestMemoryMmap) -> Result<(), MicroGuestError> {
    let table = PTE_P | PTE_W | PTE_U;
    memory.write_obj(PDPT_START | table, GuestAddress(PML4_START))?;
    for gib in 0..4u64 {
        let pd = PD_START + gib * 0x1000;
        memory.write_obj(pd | table, GuestAddress(PDPT_START + gib * 8))?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            let entry = if addr == DATA_START {
                DATA_PT_START | table
            } else {
                addr | table | PTE_PS
            };
            memory.write_obj(entry, GuestAddress(pd + i * 8))?;
        }
    }
    for i in 0..512u64 {
        let addr = DATA_START + (i << 12);
        memory.write_obj(addr | table, GuestAddress(DATA_PT_START + i * 8))?;
    }
    // The first GiB of the PCI 64-bit window, where vDSA BARs go.
    let window = layout::PCI_MMIO64_START;
    memory.write_obj(
        HIGH_PDPT_START | table,
        GuestAddress(PML4_START + ((window >> 39) & 0x1ff) * 8),
    )?;
    memory.write_obj(
        HIGH_PD_START | table,
        GuestAddress(HIGH_PDPT_START + ((window >> 30) & 0x1ff) * 8),
    )?;
    for i in 0..512u64 {
        let addr = window + (i << 21);
        memory.write_obj(addr | table | PTE_PS, GuestAddress(HIGH_PD_START + i * 8))?;
    }
    Ok(())
}

/// Long mode with the harness's GDT, IDT, TSS and page tables.
pub fn long_mode_sregs() -> kvm_sregs {
    let mut sregs = kvm_sregs {
        cr0: cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::PG,
        ..Default::default()
    };
    sregs.cr3 = PML4_START;
    sregs.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT;
    sregs.efer = efer::SCE | efer::LME | efer::LMA | efer::NXE;
    sregs.cs = KERNEL_CODE.to_kvm_segment(KERNEL_CS);
    let data = KERNEL_DATA.to_kvm_segment(KERNEL_DS);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: TSS_START,
        limit: TSS_LIMIT,
        selector: TSS_SELECTOR,
        type_: segment::kind::TSS64_BUSY,
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = GDT_ENTRIES * 8 - 1;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 256 * 16 - 1;
    sregs
}

/// Emits the end of a run: `value` to the test-exit port.
pub fn exit_with(asm: &mut CodeAssembler, value: u32) -> Result<(), IcedError> {
    asm.mov(eax, value)?;
    exit_with_eax(asm)
}

/// Emits the end of the run with the value in `eax` as its result.
pub fn exit_with_eax(asm: &mut CodeAssembler) -> Result<(), IcedError> {
    asm.out(i32::from(TEST_EXIT_PORT as u8), eax)?;
    asm.hlt()
}

/// Emits an IRETQ to CPL3 code at `target` with the stack at `user_rsp`
/// and IOPL 3 (so user code may use the test-exit port).
pub fn enter_user(
    asm: &mut CodeAssembler,
    target: CodeLabel,
    user_rsp: u64,
) -> Result<(), IcedError> {
    const IOPL3: u32 = 3 << 12;
    asm.push(i32::from(USER_DS))?;
    asm.mov(rax, user_rsp)?;
    asm.push(rax)?;
    asm.push((IOPL3 | rflags::FIXED as u32) as i32)?;
    asm.push(i32::from(USER_CS))?;
    asm.lea(rax, ptr(target))?;
    asm.push(rax)?;
    asm.iretq()
}

/// Where the scratch MMIO device of micro-guests lives.
pub const TEST_MMIO_START: u64 = layout::TEST_DEVICES_START;
/// Where the test portal of micro-guests lives.
pub const TEST_PORTAL_START: u64 = layout::TEST_DEVICES_START + 0x1000;
/// Guest RAM of a micro-guest.
pub const MICRO_MEMORY: u64 = 64 << 20;

/// The result of running a micro-guest.
pub struct MicroRun {
    /// How the run ended.
    pub exit: vmm::vm::RunExit,
    /// What the test portal received.
    pub portal: std::sync::Arc<crate::test_devices::PortalLog>,
    /// Guest RAM as the run left it.
    pub memory: GuestMemoryMmap,
    /// Where the vDSA functions were put (as [`vmm::sva::dsa_placements`]
    /// predicts).
    pub dsa: Vec<vmm::sva::DsaPlacement>,
    /// The vDSA functions themselves (registers, device TLB), in the same
    /// order.
    pub dsa_functions: Vec<std::sync::Arc<std::sync::Mutex<vmm::sva::DsaFunction>>>,
    /// The vIOMMU, if [`MicroOptions::accel`] asked for one.
    pub iommu: Option<std::sync::Arc<vmm::sva::Viommu>>,
    /// The guest's PASIDs (its gPASID -> hPASID table), as the run left
    /// them.
    pub pasids: std::sync::Arc<vmm::sva::GuestPasids>,
    /// The guest's TSC frequency in kHz (0 if KVM could not tell).
    pub tsc_khz: u32,
}

/// Options of a micro-guest run.
#[derive(Clone)]
pub struct MicroOptions {
    /// Answer ENQCMD/ENQCMDS at the test portal with Retry.
    pub portal_retry: bool,
    /// Give up after this long.
    pub timeout: std::time::Duration,
    /// The vIOMMU and vDSA functions (none by default). With any of them
    /// the machine gets the PCIe root complex (ECAM, BAR windows) too.
    pub accel: vmm::sva::AccelConfig,
    /// The host PASID space (the process-wide one when `None`); two runs
    /// given the same space model two guests of one host.
    pub pasid_space: Option<std::sync::Arc<pasid::PasidSpace>>,
    /// The kind of KVM to run on: the host's ([`vmm::platform::Platform::host`]) unless a
    /// test forces the other's behaviour (e.g. ordinary KVM's watch on a PVM
    /// host, to raise its routes on purpose).
    pub platform: vmm::platform::Platform,
    /// What the host CPU runs natively, if not probed (see
    /// [`vmm::vm::Vm::set_host_cpu`]).
    pub host_cpu: Option<vmm::platform::HostCpu>,
}

impl std::fmt::Debug for MicroOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroOptions")
            .field("portal_retry", &self.portal_retry)
            .field("timeout", &self.timeout)
            .field("accel", &self.accel)
            .field("shared_pasid_space", &self.pasid_space.is_some())
            .field("platform", &self.platform)
            .field("host_cpu", &self.host_cpu)
            .finish()
    }
}

impl Default for MicroOptions {
    fn default() -> Self {
        Self {
            portal_retry: false,
            timeout: std::time::Duration::from_secs(30),
            accel: vmm::sva::AccelConfig::default(),
            pasid_space: None,
            platform: vmm::platform::Platform::host(),
            host_cpu: None,
        }
    }
}

/// Errors of a micro-guest run.
#[derive(Debug, Error)]
pub enum MicroRunError {
    /// The machine could not be built or run.
    #[error(transparent)]
    Machine(#[from] vmm::machine::MachineError),
    /// The program could not be loaded.
    #[error(transparent)]
    Load(#[from] MicroGuestError),
}

/// Fails (never skips) with one line naming the problem when this machine
/// has no /dev/kvm: every test and benchmark that runs a guest calls it.
pub fn require_kvm() {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this needs /dev/kvm, which this machine lacks"
    );
}

/// Adds the test-exit port ([`TEST_EXIT_PORT`]) to `machine`: [`run`]
/// does it for every micro-guest, a test that builds its own machine calls
/// it.
pub fn add_test_exit(machine: &Machine) -> Result<(), MachineError> {
    let exit = TestExit::new(machine.exit_reporter());
    machine
        .devices()
        .add_pio_device(TEST_EXIT_PORT, 4, Arc::new(Mutex::new(exit)))
}

/// The machine of a micro-guest run with `options`: one vCPU,
/// [`MICRO_MEMORY`] of RAM, serial output discarded, the vIOMMU and vDSAs
/// of [`MicroOptions::accel`] (with the PCIe root complex when there is any)
/// and the test-exit port; no ACPI, no other PCI device.
pub fn machine(options: &MicroOptions) -> Result<Machine, MachineError> {
    let config = MachineConfig {
        host_cpu: options.host_cpu,
        pasid_space: options.pasid_space.clone(),
        accel: options.accel.clone(),
        ..MachineConfig::new(1, MICRO_MEMORY, SerialOutput::Sink, options.platform)
    };
    let machine = vmm::machine::build(config)?;
    add_test_exit(&machine)?;
    Ok(machine)
}

/// Runs `guest` on [`machine`] with the test MMIO device and the test
/// portal added, watching the exception entries `options.platform` needs.
pub fn run(guest: MicroGuest, options: MicroOptions) -> Result<MicroRun, MicroRunError> {
    run_from(guest, options, |_| {})
}

/// [`run`], with vCPU 0's initial state changed by `start` after the
/// program is loaded (e.g. to start in protected or real mode: the tables
/// the harness writes stay where they are).
pub fn run_from(
    guest: MicroGuest,
    options: MicroOptions,
    start: impl FnOnce(&mut LoadedGuest),
) -> Result<MicroRun, MicroRunError> {
    let mut machine = machine(&options)?;
    let portal = Arc::new(PortalLog::default());
    portal.retry.store(options.portal_retry, Ordering::SeqCst);
    let devices = machine.devices();
    devices.add_mmio_device(
        TEST_MMIO_START,
        TEST_MMIO_SIZE,
        Arc::new(Mutex::new(TestMmio::default())),
    )?;
    devices.add_mmio_device(
        TEST_PORTAL_START,
        TEST_PORTAL_SIZE,
        Arc::new(Mutex::new(TestPortal::new(portal.clone()))),
    )?;
    let (dsa, dsa_functions, iommu) = match devices.accelerators() {
        Some(attached) => (
            attached.dsa.clone(),
            attached.functions.clone(),
            attached.iommu.clone(),
        ),
        None => (Vec::new(), Vec::new(), None),
    };
    let mut loaded = guest.load(machine.memory())?;
    start(&mut loaded);
    machine.set_boot_state(loaded.regs, loaded.sregs);
    let memory = machine.memory().clone();
    let pasids = machine.vm().pasids().clone();
    let tsc_khz = machine.vm().tsc_khz();
    let exit = machine.run(Some(options.timeout))?;
    Ok(MicroRun {
        exit,
        portal,
        memory,
        dsa,
        dsa_functions,
        iommu,
        pasids,
        tsc_khz: tsc_khz.load(Ordering::Relaxed),
    })
}
