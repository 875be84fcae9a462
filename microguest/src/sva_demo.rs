//! The end-to-end SVA micro-guest program (issue 7): the guest's kernel
//! builds scalable-mode VT-d structures whose PASID entry points at its own
//! page tables, brings the vDSA up with WQ 0 dedicated to the process's
//! PASID and WQ 1 shared, and at CPL3 the process submits a MEMMOVE with
//! MOVDIR64B to WQ 0 and one with ENQCMD to WQ 1 (IA32_PASID clear: #GP,
//! the kernel's fixup loads the MSR, the ENQCMD is retried), then polls
//! both completion records. `vmm micro sva-demo` runs it; the end-to-end
//! tests run it and its variants.

use iced_x86::code_asm::*;
use vdsa::DsaConfig;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::driver::dsa::{memmove, wait_for_completion, DsaDriver, WqSetup};
use crate::driver::kernel::{BringUpError, SvaSetup};
use crate::driver::{report, slot, store_bytes};
use crate::{enter_user, exit_with, MicroGuest, MicroOptions, DATA_START, USER_STACK_TOP};
use iced_x86::IcedError;
use vmm::sva::{dsa_placements, AccelConfig};

/// What every program ends with when all its checks passed.
pub const DONE: u32 = 0x5a0d;

/// One MEMMOVE of the program: buffers and records in the data area.
#[derive(Clone, Copy, Debug)]
pub struct Copy {
    /// Source buffer.
    pub src: u64,
    /// Destination buffer.
    pub dst: u64,
    /// Bytes.
    pub len: u32,
    /// Completion record.
    pub record: u64,
    /// Where the guest stores the descriptor.
    pub descriptor: u64,
}

/// The dedicated-WQ copy (MOVDIR64B).
pub const COPY_DWQ: Copy = Copy {
    src: DATA_START + 0x1_0000,
    dst: DATA_START + 0x1_2000,
    len: 0x1800,
    record: DATA_START + 0x1_4000,
    descriptor: DATA_START + 0x1_4040,
};
/// The shared-WQ copy (ENQCMD).
pub const COPY_SWQ: Copy = Copy {
    src: DATA_START + 0x2_0000,
    dst: DATA_START + 0x2_2000,
    len: 0x1000,
    record: DATA_START + 0x2_4000,
    descriptor: DATA_START + 0x2_4040,
};
/// Report slot of the number of #GPs the user program took.
pub const SLOT_GP: usize = slot::USER;
/// Report slot of the dedicated copy's completion status.
pub const SLOT_DWQ_STATUS: usize = slot::USER + 1;
/// Report slot of the shared copy's completion status.
pub const SLOT_SWQ_STATUS: usize = slot::USER + 2;

/// A recognisable pattern for guest `seed`'s buffers.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8)
        .collect()
}

/// What the SVA program does and where its devices are.
#[derive(Clone, Copy, Debug)]
pub struct SvaProgram {
    /// The vDSA's requester ID.
    pub dsa_rid: pci::PciAddress,
    /// The guest PASID of the user process.
    pub pasid: u32,
    /// Domain ID of the process's PASID entry.
    pub did: u16,
    /// Build VT-d structures and turn translation on.
    pub iommu: bool,
    /// Seed of the source patterns (tells two guests' data apart).
    pub seed: u8,
}

impl SvaProgram {
    /// The bring-up parameters.
    pub fn setup(&self) -> SvaSetup {
        SvaSetup {
            dsa_rid: self.dsa_rid,
            pasid: self.pasid,
            did: self.did,
            iommu: self.iommu,
        }
    }
}

/// The kernel's bring-up at CPL0 ([`SvaSetup::bring_up`]).
pub fn bring_up(
    a: &mut CodeAssembler,
    p: &SvaProgram,
    wqs: &[WqSetup],
) -> Result<(), BringUpError> {
    p.setup().bring_up(a, wqs)
}

/// Installs the kernel's ENQCMD #GP fixup ([`SvaSetup::install_gp_fixup`]).
pub fn install_gp_fixup(g: &mut MicroGuest, p: &SvaProgram) -> Result<(), IcedError> {
    p.setup().install_gp_fixup(g)
}

/// Emits the guest's store of `c`'s MEMMOVE descriptor.
pub fn store_descriptor(
    a: &mut CodeAssembler,
    c: &Copy,
    block_on_fault: bool,
) -> Result<(), IcedError> {
    let d = memmove(c.src, c.dst, c.len, c.record, block_on_fault);
    store_bytes(a, c.descriptor, &d.0)
}

/// The main end-to-end program: [`bring_up`] with WQ 0 dedicated to the
/// PASID and WQ 1 shared, then at CPL3: MOVDIR64B to WQ 0, ENQCMD to WQ 1
/// with IA32_PASID clear (#GP, the fixup loads the MSR, the ENQCMD is
/// retried), then polling of both completion records.
pub fn sva_program(p: SvaProgram) -> Result<MicroGuest, BringUpError> {
    let mut g = MicroGuest::new();
    for (i, c) in [COPY_DWQ, COPY_SWQ].iter().enumerate() {
        g.write(
            c.src,
            &pattern(c.len as usize, p.seed.wrapping_add(i as u8)),
        );
    }
    let dsa = DsaDriver::default();
    let a = &mut g.asm;
    bring_up(
        a,
        &p,
        &[WqSetup::dedicated(0, 0, p.pasid), WqSetup::shared(1, 1)],
    )?;
    store_descriptor(a, &COPY_DWQ, false)?;
    store_descriptor(a, &COPY_SWQ, false)?;
    let mut user = a.create_label();
    a.xor(r15d, r15d)?;
    enter_user(a, user, USER_STACK_TOP)?;

    a.set_label(&mut user)?;
    dsa.movdir64b(a, 0, COPY_DWQ.descriptor)?;
    dsa.enqcmd(a, 1, COPY_SWQ.descriptor)?;
    for (c, s) in [(COPY_DWQ, SLOT_DWQ_STATUS), (COPY_SWQ, SLOT_SWQ_STATUS)] {
        wait_for_completion(a, c.record)?;
        report(a, s, rax)?;
    }
    report(a, SLOT_GP, r15)?;
    exit_with(a, DONE)?;
    install_gp_fixup(&mut g, &p)?;
    Ok(g)
}

/// The guest PASID the programs use: far from the host PASIDs a fresh
/// host space hands out first, so a device that used the guest's number
/// instead of its host PASID could not go unnoticed.
pub const GUEST_PASID: u32 = 0x1234;

/// One vDSA (DSA 1.0 defaults), with or without the vIOMMU.
pub fn accel(iommu: bool) -> AccelConfig {
    AccelConfig {
        iommu,
        dsa: vec![DsaConfig::default()],
    }
}

/// Micro-guest options for the machine of [`accel`].
pub fn options(iommu: bool) -> MicroOptions {
    MicroOptions {
        accel: accel(iommu),
        ..Default::default()
    }
}

/// The program's parameters for the machine of [`accel`].
pub fn program(iommu: bool, seed: u8) -> SvaProgram {
    SvaProgram {
        dsa_rid: dsa_placements(&accel(iommu).dsa)[0].bdf,
        pasid: GUEST_PASID,
        did: 1,
        iommu,
        seed,
    }
}

/// Guest memory at `addr`, `len` bytes.
pub fn bytes(memory: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // An address outside RAM reads as zeros here; callers compare contents.
    let _ = memory.read_slice(&mut v, GuestAddress(addr));
    v
}

/// What a run of [`sva_program`] showed, as lines for a user, and whether
/// every check passed.
pub fn describe(run: &crate::MicroRun, p: &SvaProgram) -> (Vec<String>, bool) {
    use crate::driver::{read_report, GuestFailure};
    use vdsa::completion::Status;
    use vmm::vm::RunExit;

    let mut lines = Vec::new();
    if let RunExit::TestExit(v) = run.exit {
        if let Some(failure) = GuestFailure::decode(v) {
            lines.push(format!("guest: a check failed: {failure:?}"));
            return (lines, false);
        }
    }
    if run.exit != RunExit::TestExit(DONE) {
        lines.push(format!("guest: the run ended with {:?}", run.exit));
        return (lines, false);
    }
    let m = &run.memory;
    let mut ok = true;
    let status_name = |s: u64| match s {
        s if s == Status::Success as u64 => "Success".to_string(),
        s => format!("{s:#x}"),
    };
    for (i, (c, slot_status, how)) in [
        (COPY_DWQ, SLOT_DWQ_STATUS, "MOVDIR64B to dedicated WQ 0"),
        (COPY_SWQ, SLOT_SWQ_STATUS, "ENQCMD to shared WQ 1"),
    ]
    .iter()
    .enumerate()
    {
        let expected = pattern(c.len as usize, p.seed.wrapping_add(i as u8));
        let copied = bytes(m, c.dst, c.len as usize) == expected;
        let status = read_report(m, *slot_status);
        ok &= copied && status == Status::Success as u64;
        lines.push(format!(
            "user process: {how}: MEMMOVE of {} bytes {:#x} -> {:#x}, completion {}, destination {}",
            c.len,
            c.src,
            c.dst,
            status_name(status),
            if copied { "matches the source" } else { "DIFFERS from the source" }
        ));
    }
    let gps = read_report(m, SLOT_GP);
    ok &= gps == 1;
    lines.push(format!(
        "user process: the first ENQCMD took {gps} #GP (IA32_PASID clear); the kernel's fixup loaded PASID {:#x}, the retry was accepted",
        p.pasid
    ));
    match run.pasids.table().translate(p.pasid) {
        Ok(host) => {
            let requests = run.pasids.device_requests();
            let tagged: Vec<String> = requests
                .iter()
                .map(|&(rid, h)| format!("{rid} with host PASID {h:#x}"))
                .collect();
            ok &= requests.iter().all(|&(_, h)| h == host);
            lines.push(format!(
                "VMM: guest PASID {:#x} -> host PASID {host:#x} (one guest-wide table; filled when the guest enabled the dedicated WQ, then used for every ENQCMD)",
                p.pasid
            ));
            lines.push(format!(
                "vDSA: DMA tagged {}; {}",
                tagged.join(", "),
                if p.iommu {
                    format!("the vIOMMU translated it back to guest PASID {:#x} and walked the process's page tables", p.pasid)
                } else {
                    "no vIOMMU: untranslated DMA into guest RAM".to_string()
                }
            ));
        }
        Err(_) => {
            ok = false;
            lines.push(format!("VMM: guest PASID {:#x} has no host PASID", p.pasid));
        }
    }
    (lines, ok)
}
