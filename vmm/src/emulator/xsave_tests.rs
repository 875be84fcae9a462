//! The XSAVE family against hand-computed save areas, on a mock vCPU over
//! guest memory with 4 KiB identity-mapped pages.
//!
//! The layout is this project's host's (CPUID leaf 0xD, AVX-512 without
//! PKRU) plus PASID: AVX 256 bytes at 576, opmask 64 at 1088, ZMM_Hi256 512
//! at 1152, Hi16_ZMM 1024 at 1664 (standard offsets); compacted over all of
//! them, as Linux printed for the guest: 576, 832, 896, 1408.

use bus::{StoreKind, StoreReply};
use iced_x86::code_asm::*;
use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::super::{
    handle_emulation_failure, EmulatorError, Exception, FallbackInstruction, GuestCpu, Outcome,
};
use super::*;
use crate::emulator::test_cpu::register_and_memory_accessors;
use crate::x86::vector;

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const PT: u64 = 0x4000;
/// The save area (64-byte aligned) and a second one near a page end.
const AREA: u64 = 0x10000;
const CODE: u64 = 0x8000;
const P: u64 = 1;
const W: u64 = 2;

const XCR0: u64 = 0xe7;
const OPMASK: usize = 5;
const ZMM_HI256: usize = 6;
const HI16_ZMM: usize = 7;

fn layout() -> XStateLayout {
    XStateLayout::from_cpuid(|i| match i {
        2 => (256, 576, 0),
        5 => (64, 1088, 0),
        6 => (512, 1152, 0),
        7 => (1024, 1664, 0),
        10 => (8, 0, 1),
        _ => (0, 0, 0),
    })
}

struct Cpu {
    mem: GuestMemoryMmap,
    regs: kvm_regs,
    sregs: kvm_sregs,
    state: XState,
    injected: Vec<Exception>,
    state_writes: usize,
}

/// A recognisable byte pattern for component `i`.
fn fill(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i as u8) << 4 | (k as u8 & 0xf)).collect()
}

impl Cpu {
    /// CPL 0 in 64-bit mode, paging on with CR0.WP, CR4.OSXSAVE, XCR0 =
    /// 0xe7; the first 2 MiB identity-mapped with writable 4 KiB pages.
    /// The vCPU's image has x87 (FCW 0x37f, ST0 bytes), XMM0, MXCSR 0x1f80
    /// and every extended component filled with its pattern, XINUSE = all.
    fn new() -> Self {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let w = |at: u64, v: u64| mem.write_obj(v, GuestAddress(at)).unwrap();
        w(PML4, PDPT | P | W);
        w(PDPT, PD | P | W);
        w(PD, PT | P | W);
        for page in 0..512 {
            w(PT + page * 8, (page << 12) | P | W);
        }
        let mut sregs = kvm_sregs {
            cr0: 1 | (1 << 16) | (1 << 31),
            cr3: PML4,
            cr4: (1 << 5) | cr4::OSXSAVE,
            efer: (1 << 8) | (1 << 10),
            ..Default::default()
        };
        sregs.cs = kvm_segment {
            selector: 0x10,
            l: 1,
            present: 1,
            s: 1,
            type_: 0xb,
            ..Default::default()
        };
        let layout = layout();
        let mut image = vec![0u8; 4096];
        image[0..2].copy_from_slice(&0x037fu16.to_le_bytes());
        image[32..42].copy_from_slice(&fill(0, 10));
        image[24..28].copy_from_slice(&MXCSR_INIT.to_le_bytes());
        image[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        image[160..176].copy_from_slice(&fill(1, 16));
        for i in [component::AVX, OPMASK, ZMM_HI256, HI16_ZMM] {
            let c = layout.component(i);
            image[c.offset as usize..(c.offset + c.size) as usize]
                .copy_from_slice(&fill(i, c.size as usize));
        }
        image[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&XCR0.to_le_bytes());
        Cpu {
            mem,
            regs: kvm_regs {
                rip: CODE,
                rdi: AREA,
                rax: u64::from(u32::MAX),
                rdx: u64::from(u32::MAX),
                rflags: 2,
                ..Default::default()
            },
            sregs,
            state: XState {
                image,
                xcr0: XCR0,
                xss: 0,
                pasid: 0,
                layout,
                features: XsaveFeatures::from_leaf_d1_eax(0b1111),
            },
            injected: Vec::new(),
            state_writes: 0,
        }
    }

    fn set_pte(&mut self, va: u64, flags: u64) {
        let at = PT + (va >> 12) * 8;
        self.mem
            .write_obj((va & !0xfff) | flags, GuestAddress(at))
            .unwrap();
    }

    fn area(&self, offset: usize, len: usize) -> Vec<u8> {
        self.at(AREA + offset as u64, len)
    }

    fn at(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(gpa)).unwrap();
        v
    }

    fn area_u64(&self, offset: usize) -> u64 {
        read_u64(&self.area(offset, 8), 0)
    }

    fn put(&self, offset: usize, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(AREA + offset as u64))
            .unwrap();
    }

    fn run(&mut self, f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Outcome {
        let mut a = CodeAssembler::new(64).unwrap();
        f(&mut a).unwrap();
        let bytes = a.assemble(CODE).unwrap();
        handle_emulation_failure(self, &bytes).unwrap()
    }

    /// Runs an instruction that must fault with `e`, and checks that it
    /// changed nothing: RIP, the vCPU's XSAVE state.
    fn assert_faults(
        &mut self,
        f: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
        e: Exception,
    ) {
        let before = self.state.clone();
        assert_eq!(self.run(f), Outcome::Exception(e));
        assert_eq!(self.injected.last(), Some(&e));
        assert_eq!(self.regs.rip, CODE, "a fault leaves RIP at the instruction");
        assert_eq!(self.state, before, "a fault changes no register");
        assert_eq!(self.state_writes, 0);
    }
}

impl GuestCpu for Cpu {
    register_and_memory_accessors!();
    fn ia32_pasid(&self) -> u64 {
        self.state.pasid
    }
    fn xstate(&mut self) -> Result<XState, EmulatorError> {
        Ok(self.state.clone())
    }
    fn set_xstate(&mut self, state: &XState) -> Result<(), EmulatorError> {
        self.state = state.clone();
        self.state_writes += 1;
        Ok(())
    }
    fn inject_exception(
        &mut self,
        vector: u8,
        error_code: Option<u32>,
        fault_address: Option<u64>,
    ) -> Result<(), EmulatorError> {
        self.injected.push(Exception {
            vector,
            error_code,
            cr2: fault_address,
        });
        Ok(())
    }
    fn store64(&mut self, _: u64, _: &[u8; 64], _: StoreKind) -> Result<StoreReply, EmulatorError> {
        unreachable!("no 64-byte store here")
    }
}

fn completed(o: Outcome, which: FallbackInstruction) {
    assert_eq!(o, Outcome::Emulated(which));
}

// --- XSAVE, XSAVEOPT -------------------------------------------------------

#[test]
fn xsave_writes_the_requested_components_at_standard_offsets() {
    let mut cpu = Cpu::new();
    cpu.put(0, &[0xcc; 4096]);
    // EDX:EAX = SSE | AVX | Hi16_ZMM | bit 9 (not in XCR0).
    cpu.regs.rax = 0b1000_0110 | (1 << 9);
    cpu.regs.rdx = 0;
    completed(cpu.run(|a| a.xsave64(ptr(rdi))), FallbackInstruction::Xsave);
    assert_eq!(cpu.regs.rip, CODE + 4, "RIP after `xsave64 [rdi]`");
    assert_eq!(cpu.area(0, 24), vec![0xcc; 24], "x87 not requested");
    assert_eq!(cpu.area(32, 128), vec![0xcc; 128], "ST0-7 not requested");
    // MXCSR and MXCSR_MASK with RFBM[1] (or RFBM[2]).
    assert_eq!(cpu.area(24, 8), [0x80, 0x1f, 0, 0, 0xff, 0xff, 0, 0]);
    assert_eq!(cpu.area(160, 16), fill(1, 16));
    assert_eq!(
        cpu.area(176, 240),
        vec![0; 240],
        "XMM1-15 as the vCPU has them"
    );
    assert_eq!(
        cpu.area(416, 96),
        vec![0xcc; 96],
        "reserved bytes untouched"
    );
    assert_eq!(cpu.area(576, 256), fill(2, 256));
    assert_eq!(
        cpu.area(1088, 64 + 512),
        vec![0xcc; 576],
        "opmask, ZMM_Hi256"
    );
    assert_eq!(cpu.area(1664, 1024), fill(7, 1024));
    // XSTATE_BV: RFBM's bits from XINUSE, the others as they were.
    assert_eq!(cpu.area_u64(512), 0xcccc_cccc_cccc_cccc & !0x86 | 0x86);
    assert_eq!(
        cpu.area(520, 56),
        vec![0xcc; 56],
        "rest of the header untouched"
    );
    assert_eq!(cpu.state_writes, 0, "XSAVE changes no register");
}

#[test]
fn xsave_writes_components_in_their_initial_configuration_too() {
    let mut cpu = Cpu::new();
    // Only x87 and SSE in use: AVX holds its initial zeros.
    cpu.state.image[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&3u64.to_le_bytes());
    cpu.state.image[576..832].fill(0);
    cpu.put(0, &[0xcc; 1024]);
    cpu.regs.rax = 0b111;
    cpu.regs.rdx = 0;
    completed(
        cpu.run(|a| a.xsaveopt64(ptr(rdi))),
        FallbackInstruction::Xsaveopt,
    );
    assert_eq!(cpu.area(0, 2), [0x7f, 0x03], "FCW");
    assert_eq!(cpu.area(32, 10), fill(0, 10), "ST0");
    assert_eq!(cpu.area(576, 256), vec![0; 256], "AVX written as zeros");
    assert_eq!(cpu.area_u64(512), 0xcccc_cccc_cccc_cccc & !7 | 3);
}

#[test]
fn xsave_without_rex_w_stores_32_bit_fpu_pointers() {
    let mut cpu = Cpu::new();
    cpu.state.image[8..24].copy_from_slice(&[0x11; 16]); // FIP, FDP
    cpu.regs.rax = 1;
    cpu.regs.rdx = 0;
    completed(cpu.run(|a| a.xsave(ptr(rdi))), FallbackInstruction::Xsave);
    assert_eq!(
        cpu.area(8, 16),
        [[0x11; 4], [0; 4], [0x11; 4], [0; 4]].concat(),
        "offsets, and zero selectors"
    );
}

// --- XSAVEC, XSAVES --------------------------------------------------------

#[test]
fn xsavec_compacts_and_leaves_out_components_not_in_use() {
    let mut cpu = Cpu::new();
    // In use: x87, SSE, opmask, Hi16_ZMM; AVX and ZMM_Hi256 initial.
    let inuse: u64 = 0b1010_0011;
    cpu.state.image[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&inuse.to_le_bytes());
    cpu.put(0, &[0xcc; 4096]);
    completed(
        cpu.run(|a| a.xsavec64(ptr(rdi))),
        FallbackInstruction::Xsavec,
    );
    assert_eq!(cpu.area_u64(512), inuse, "XSTATE_BV = RFBM & XINUSE");
    assert_eq!(cpu.area_u64(520), (1 << 63) | XCR0, "XCOMP_BV");
    assert_eq!(cpu.area(528, 48), vec![0xcc; 48]);
    assert_eq!(cpu.area(160, 16), fill(1, 16));
    // Offsets compact over RFBM (0xe7): AVX 576, opmask 832, ZMM_Hi256
    // 896, Hi16_ZMM 1408; the init optimisation skips AVX and ZMM_Hi256.
    assert_eq!(cpu.area(576, 256), vec![0xcc; 256]);
    assert_eq!(cpu.area(832, 64), fill(OPMASK, 64));
    assert_eq!(cpu.area(896, 512), vec![0xcc; 512]);
    assert_eq!(cpu.area(1408, 1024), fill(HI16_ZMM, 1024));
    assert_eq!(cpu.area(2432, 8), vec![0xcc; 8], "nothing past the end");
}

#[test]
fn xsavec_offsets_compact_over_the_requested_components_only() {
    let mut cpu = Cpu::new();
    cpu.put(0, &[0xcc; 4096]);
    // x87 | SSE | Hi16_ZMM: Hi16_ZMM right after the header.
    cpu.regs.rax = 0b1000_0011;
    cpu.regs.rdx = 0;
    completed(
        cpu.run(|a| a.xsavec64(ptr(rdi))),
        FallbackInstruction::Xsavec,
    );
    assert_eq!(cpu.area_u64(520), (1 << 63) | 0x83);
    assert_eq!(cpu.area(576, 1024), fill(HI16_ZMM, 1024));
    assert_eq!(cpu.area(1600, 8), vec![0xcc; 8]);
}

#[test]
fn xsaves_saves_the_pasid_component_after_the_user_ones() {
    let mut cpu = Cpu::new();
    cpu.state.xss = 1 << component::PASID;
    cpu.state.pasid = 0x8000_0005;
    cpu.put(0, &[0xcc; 4096]);
    completed(
        cpu.run(|a| a.xsaves64(ptr(rdi))),
        FallbackInstruction::Xsaves,
    );
    let rfbm = XCR0 | (1 << component::PASID);
    assert_eq!(cpu.area_u64(520), (1 << 63) | rfbm);
    assert_eq!(cpu.area_u64(512), rfbm);
    assert_eq!(cpu.area_u64(2432), 0x8000_0005, "PASID after Hi16_ZMM");
}

#[test]
fn xsaves_leaves_out_an_unused_pasid() {
    let mut cpu = Cpu::new();
    cpu.state.xss = 1 << component::PASID;
    cpu.put(0, &[0xcc; 4096]);
    completed(
        cpu.run(|a| a.xsaves64(ptr(rdi))),
        FallbackInstruction::Xsaves,
    );
    assert_eq!(cpu.area_u64(512), XCR0);
    assert_eq!(cpu.area(2432, 8), vec![0xcc; 8]);
}

#[test]
fn xsaves_needs_cpl0_and_the_cpuid_bit() {
    let mut cpu = Cpu::new();
    cpu.sregs.cs.dpl = 3;
    cpu.sregs.cs.selector = 0x33;
    cpu.assert_faults(|a| a.xsaves64(ptr(rdi)), Exception::gp0());
    let mut cpu = Cpu::new();
    cpu.state.features.xsaves = false;
    cpu.assert_faults(|a| a.xrstors64(ptr(rdi)), Exception::ud());
    let mut cpu = Cpu::new();
    cpu.state.features.xsavec = false;
    cpu.assert_faults(|a| a.xsavec64(ptr(rdi)), Exception::ud());
}

// --- XRSTOR, XRSTORS -------------------------------------------------------

/// An image with every byte of every component 0xee, XINUSE = all.
fn dirty(cpu: &mut Cpu) {
    let bv = cpu.state.image[XSTATE_BV..XSTATE_BV + 8].to_vec();
    cpu.state.image[..512].fill(0xee);
    cpu.state.image[24..32].copy_from_slice(&[0x80, 0x1f, 0, 0, 0xff, 0xff, 0, 0]);
    cpu.state.image[576..2688].fill(0xee);
    cpu.state.image[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&bv);
}

#[test]
fn xrstor_standard_form_loads_initialises_and_keeps() {
    let mut cpu = Cpu::new();
    dirty(&mut cpu);
    let mut area = vec![0u8; 4096];
    area[0..2].copy_from_slice(&0x0123u16.to_le_bytes()); // FCW
    area[32..48].copy_from_slice(&fill(0, 16));
    area[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes()); // MXCSR
    area[160..176].copy_from_slice(&[0x77; 16]); // XMM0, not loaded
    area[576..832].copy_from_slice(&fill(9, 256)); // AVX
    area[512..520].copy_from_slice(&0b101u64.to_le_bytes()); // x87, AVX
    cpu.put(0, &area);
    // RFBM: x87, SSE, AVX; opmask and beyond are not requested.
    cpu.regs.rax = 0b111;
    cpu.regs.rdx = 0;
    completed(
        cpu.run(|a| a.xrstor64(ptr(rdi))),
        FallbackInstruction::Xrstor,
    );
    let img = &cpu.state.image;
    assert_eq!(img[0..2], [0x23, 0x01], "x87 loaded");
    assert_eq!(img[32..48], fill(0, 16));
    assert_eq!(img[160..416], vec![0; 256], "SSE initialised: XMM zero");
    assert_eq!(read_u32(img, 24), 0x1fa0, "standard form loads MXCSR");
    assert_eq!(img[576..832], fill(9, 256), "AVX loaded");
    assert_eq!(img[1088..1152], vec![0xee; 64], "opmask kept");
    // XINUSE: x87 and AVX loaded; SSE in use because MXCSR is not 0x1f80;
    // the others as they were.
    assert_eq!(read_u64(img, XSTATE_BV), XCR0);
    assert_eq!(cpu.regs.rip, CODE + 4);
}

#[test]
fn xrstor_standard_form_initialises_x87_and_avx() {
    let mut cpu = Cpu::new();
    dirty(&mut cpu);
    let mut area = vec![0u8; 1024];
    area[24..28].copy_from_slice(&MXCSR_INIT.to_le_bytes());
    cpu.put(0, &area);
    cpu.regs.rax = 0b111;
    cpu.regs.rdx = 0;
    completed(
        cpu.run(|a| a.xrstor64(ptr(rdi))),
        FallbackInstruction::Xrstor,
    );
    let img = &cpu.state.image;
    assert_eq!(img[0..2], [0x7f, 0x03], "FCW 0x37f");
    assert_eq!(img[2..24], vec![0; 22]);
    assert_eq!(img[32..160], vec![0; 128]);
    assert_eq!(img[576..832], vec![0; 256]);
    assert_eq!(read_u64(img, XSTATE_BV), XCR0 & !0b111);
}

#[test]
fn xrstor_compacted_form_reads_at_compacted_offsets() {
    let mut cpu = Cpu::new();
    dirty(&mut cpu);
    let mut area = vec![0u8; 4096];
    // XCOMP_BV: x87, SSE, opmask, Hi16_ZMM; XSTATE_BV: SSE, opmask, Hi16.
    area[520..528].copy_from_slice(&((1u64 << 63) | 0xa3).to_le_bytes());
    area[512..520].copy_from_slice(&0xa2u64.to_le_bytes());
    area[24..28].copy_from_slice(&0x1f80u32.to_le_bytes());
    area[160..176].copy_from_slice(&[0x55; 16]);
    area[576..640].copy_from_slice(&fill(3, 64)); // opmask at 576
    area[640..1664].copy_from_slice(&fill(4, 1024)); // Hi16_ZMM at 640
    cpu.put(0, &area);
    completed(
        cpu.run(|a| a.xrstor64(ptr(rdi))),
        FallbackInstruction::Xrstor,
    );
    let img = &cpu.state.image;
    assert_eq!(img[0..2], [0x7f, 0x03], "x87 initialised");
    assert_eq!(img[160..176], [0x55; 16]);
    assert_eq!(
        img[1088..1152],
        fill(3, 64),
        "opmask at its standard offset"
    );
    assert_eq!(img[1664..2688], fill(4, 1024));
    assert_eq!(
        img[576..832],
        vec![0; 256],
        "AVX (in RFBM, not in XCOMP_BV) initialised"
    );
    assert_eq!(img[1152..1664], vec![0; 512], "ZMM_Hi256 initialised");
    assert_eq!(read_u64(img, XSTATE_BV), 0xa2);
}

#[test]
fn xrstor_compacted_form_without_sse_sets_mxcsr_to_its_initial_value() {
    let mut cpu = Cpu::new();
    cpu.state.image[24..28].copy_from_slice(&0x1fa0u32.to_le_bytes());
    let mut area = vec![0u8; 1024];
    area[520..528].copy_from_slice(&((1u64 << 63) | 3).to_le_bytes());
    area[24..28].copy_from_slice(&0x1fc0u32.to_le_bytes());
    cpu.put(0, &area);
    cpu.regs.rax = 0b10;
    cpu.regs.rdx = 0;
    completed(
        cpu.run(|a| a.xrstor64(ptr(rdi))),
        FallbackInstruction::Xrstor,
    );
    assert_eq!(read_u32(&cpu.state.image, 24), MXCSR_INIT);
}

/// A change to a valid save area.
type HeaderEdit = fn(&mut [u8]);

#[test]
fn xrstor_header_and_mxcsr_checks_are_gp0() {
    let gp = Exception::gp0();
    let cases: Vec<(&str, HeaderEdit)> = vec![
        (
            "XSTATE_BV names a component not in XCR0",
            (|h: &mut [u8]| h[512..520].copy_from_slice(&(1u64 << 9).to_le_bytes())),
        ),
        (
            "standard form with XCOMP_BV[62:0] set",
            (|h: &mut [u8]| h[520] = 1),
        ),
        (
            "standard form, header bytes 23:16 set",
            (|h: &mut [u8]| h[528] = 1),
        ),
        (
            "compacted XCOMP_BV names a component not in XCR0",
            (|h: &mut [u8]| h[520..528].copy_from_slice(&((1u64 << 63) | (1 << 9)).to_le_bytes())),
        ),
        (
            "compacted XSTATE_BV not within XCOMP_BV",
            (|h: &mut [u8]| {
                h[520..528].copy_from_slice(&((1u64 << 63) | 3).to_le_bytes());
                h[512..520].copy_from_slice(&4u64.to_le_bytes());
            }),
        ),
        (
            "compacted, reserved header bytes set",
            (|h: &mut [u8]| {
                h[520..528].copy_from_slice(&((1u64 << 63) | 3).to_le_bytes());
                h[575] = 1;
            }),
        ),
        (
            "MXCSR reserved bits",
            (|h: &mut [u8]| h[24..28].copy_from_slice(&0x1_1f80u32.to_le_bytes())),
        ),
    ];
    for (what, edit) in cases {
        let mut cpu = Cpu::new();
        let mut area = vec![0u8; 1024];
        area[24..28].copy_from_slice(&MXCSR_INIT.to_le_bytes());
        edit(&mut area);
        cpu.put(0, &area);
        let before = cpu.state.clone();
        assert_eq!(
            cpu.run(|a| a.xrstor64(ptr(rdi))),
            Outcome::Exception(gp),
            "{what}"
        );
        assert_eq!(cpu.state, before, "{what}");
        assert_eq!(cpu.regs.rip, CODE, "{what}");
    }
}

#[test]
fn xrstors_loads_ia32_pasid_and_refuses_the_standard_form() {
    let mut cpu = Cpu::new();
    cpu.state.xss = 1 << component::PASID;
    cpu.state.pasid = 0x8000_0001;
    let mut area = vec![0u8; 1024];
    let bv = 1u64 << component::PASID;
    area[520..528].copy_from_slice(&((1u64 << 63) | bv).to_le_bytes());
    area[512..520].copy_from_slice(&bv.to_le_bytes());
    area[576..584].copy_from_slice(&0x8000_0007u64.to_le_bytes());
    cpu.put(0, &area);
    completed(
        cpu.run(|a| a.xrstors64(ptr(rdi))),
        FallbackInstruction::Xrstors,
    );
    assert_eq!(cpu.state.pasid, 0x8000_0007);
    assert_eq!(cpu.state.image[0..2], [0x7f, 0x03], "x87 initialised");

    // XSTATE_BV[10] = 0: IA32_PASID initialised to 0.
    let mut cpu = Cpu::new();
    cpu.state.xss = 1 << component::PASID;
    cpu.state.pasid = 0x8000_0001;
    area[512..520].fill(0);
    cpu.put(0, &area);
    cpu.run(|a| a.xrstors64(ptr(rdi)));
    assert_eq!(cpu.state.pasid, 0);

    // Reserved IA32_PASID bits.
    let mut cpu = Cpu::new();
    cpu.state.xss = 1 << component::PASID;
    area[512..520].copy_from_slice(&bv.to_le_bytes());
    area[576..584].copy_from_slice(&(1u64 << 40).to_le_bytes());
    cpu.put(0, &area);
    cpu.assert_faults(|a| a.xrstors64(ptr(rdi)), Exception::gp0());

    let mut cpu = Cpu::new();
    cpu.put(0, &[0u8; 1024]);
    cpu.assert_faults(|a| a.xrstors64(ptr(rdi)), Exception::gp0());
}

// --- Common faults ---------------------------------------------------------

#[test]
fn without_cr4_osxsave_the_family_is_ud() {
    let mut cpu = Cpu::new();
    cpu.sregs.cr4 &= !cr4::OSXSAVE;
    cpu.assert_faults(|a| a.xsave64(ptr(rdi)), Exception::ud());
    cpu.assert_faults(|a| a.xrstor64(ptr(rdi)), Exception::ud());
    cpu.assert_faults(|a| a.xgetbv(), Exception::ud());
}

#[test]
fn cr0_ts_is_nm() {
    let mut cpu = Cpu::new();
    cpu.sregs.cr0 |= cr0::TS;
    cpu.assert_faults(|a| a.xsaveopt64(ptr(rdi)), Exception::nm());
}

#[test]
fn misaligned_or_non_canonical_area_is_gp0() {
    let mut cpu = Cpu::new();
    cpu.regs.rdi = AREA + 32;
    cpu.assert_faults(|a| a.xsave64(ptr(rdi)), Exception::gp0());
    cpu.regs.rdi = 0x8000_0000_0000;
    cpu.assert_faults(|a| a.xrstor64(ptr(rdi)), Exception::gp0());
    cpu.regs.rsp = 0x8000_0000_0000;
    cpu.assert_faults(|a| a.xsave64(ptr(rsp)), Exception::ss0());
}

#[test]
fn xsave_page_fault_names_the_page_and_writes_nothing() {
    let mut cpu = Cpu::new();
    // The area's last 64 bytes of its first page, AVX on the next page.
    let area = 0x20000 - 576;
    cpu.regs.rdi = area;
    cpu.set_pte(0x20000, 0);
    cpu.mem
        .write_slice(&[0xcc; 576], GuestAddress(area))
        .unwrap();
    cpu.regs.rax = 0b111;
    cpu.regs.rdx = 0;
    cpu.assert_faults(
        |a| a.xsave64(ptr(rdi)),
        Exception::page_fault(0b10, 0x20000),
    );
    assert_eq!(cpu.at(area, 576), vec![0xcc; 576], "nothing written");
    // Read-only: a protection fault on write.
    cpu.set_pte(0x20000, P);
    cpu.injected.clear();
    cpu.assert_faults(
        |a| a.xsave64(ptr(rdi)),
        Exception::page_fault(0b11, 0x20000),
    );
}

#[test]
fn xrstor_page_fault_is_a_read_fault() {
    let mut cpu = Cpu::new();
    cpu.set_pte(AREA, 0);
    cpu.assert_faults(
        |a| a.xrstor64(ptr(rdi)),
        Exception::page_fault(0, AREA + 512),
    );
    assert_eq!(cpu.injected.last().unwrap().vector, vector::PF);
}

// --- XGETBV ----------------------------------------------------------------

#[test]
fn xgetbv_reads_xcr0_and_xinuse() {
    let mut cpu = Cpu::new();
    cpu.state.image[XSTATE_BV..XSTATE_BV + 8].copy_from_slice(&0x23u64.to_le_bytes());
    cpu.regs.rcx = 0;
    completed(cpu.run(|a| a.xgetbv()), FallbackInstruction::Xgetbv);
    assert_eq!((cpu.regs.rdx, cpu.regs.rax), (0, XCR0));
    assert_eq!(cpu.regs.rip, CODE + 3);
    cpu.regs.rip = CODE;
    cpu.regs.rcx = 1;
    completed(cpu.run(|a| a.xgetbv()), FallbackInstruction::Xgetbv);
    assert_eq!(cpu.regs.rax, 0x23);
    cpu.regs.rip = CODE;
    cpu.regs.rcx = 2;
    cpu.assert_faults(|a| a.xgetbv(), Exception::gp0());
}
