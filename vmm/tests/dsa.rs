//! The vDSA in the real machine, driven by micro-guests through ECAM and
//! BAR0 MMIO as idxd would. These tests need /dev/kvm.

use iced_x86::code_asm::*;
use vdsa::completion::Status;
use vdsa::descriptor::{flags, Descriptor, Opcode};
use vdsa::DsaConfig;
use vm_memory::{Bytes, GuestAddress};
use vmm::microguest::{self, MicroGuest, MicroOptions, MicroRun, DATA_START};
use vmm::sva::micro::{
    bring_up_wq, exit_with_completion_status, WQCFG_MODE_DEDICATED, WQCFG_PRIORITY_1,
};
use vmm::sva::{dsa_placements, AccelConfig};
use vmm::vm::RunExit;

const DESC: u64 = DATA_START + 0x1000;
const COMPLETION: u64 = DATA_START + 0x2000;
const SRC: u64 = DATA_START + 0x10_000;
const DST: u64 = DATA_START + 0x20_000;
const LEN: usize = 0x3000;
/// Run result when bring-up fails (low bits: which step and CMDSTS.err).
const BRING_UP_FAILED: u32 = 0xe000;

fn run(guest: MicroGuest, accel: AccelConfig) -> MicroRun {
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "these tests need /dev/kvm, which this machine lacks"
    );
    microguest::run(
        guest,
        MicroOptions {
            accel,
            ..Default::default()
        },
    )
    .expect("micro-guest machine")
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 256) as u8).collect()
}

#[test]
fn kernel_movdir64b_memmove_through_a_dedicated_wq() {
    let accel = AccelConfig {
        iommu: false,
        dsa: vec![DsaConfig::default()],
    };
    let dsa = dsa_placements(&accel.dsa)[0];
    let mut g = MicroGuest::new();
    let mut desc = Descriptor::new(Opcode::Memmove, flags::CRAV | flags::RCR);
    desc.set_completion_addr(COMPLETION)
        .set_src(SRC)
        .set_dst(DST)
        .set_xfer_size(LEN as u32);
    g.write(DESC, &desc.0);
    g.write(SRC, &pattern(LEN));
    bring_up_wq(
        &mut g.asm,
        &dsa,
        0,
        16,
        WQCFG_MODE_DEDICATED | WQCFG_PRIORITY_1,
        BRING_UP_FAILED,
    )
    .unwrap();
    // MOVDIR64B the descriptor to WQ 0's unlimited portal.
    g.asm.mov(rdi, dsa.bar2).unwrap();
    g.asm.mov(rsi, DESC).unwrap();
    g.asm.movdir64b(rdi, ptr(rsi)).unwrap();
    exit_with_completion_status(&mut g.asm, COMPLETION).unwrap();

    let r = run(g, accel);
    assert_eq!(r.dsa, vec![dsa], "the vDSA is where the guest looked");
    assert_eq!(r.exit, RunExit::TestExit(Status::Success as u32));
    let mut copied = vec![0u8; LEN];
    r.memory.read_slice(&mut copied, GuestAddress(DST)).unwrap();
    assert_eq!(copied, pattern(LEN));
    // The completion record: status Success, bytes completed 0 (only
    // meaningful for partial completions), fault address 0.
    let mut record = [0u8; 32];
    r.memory
        .read_slice(&mut record, GuestAddress(COMPLETION))
        .unwrap();
    assert_eq!(record[0], Status::Success as u8);
}
