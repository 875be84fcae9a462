//! Guest-programmed PASIDs become host PASIDs inside the device, and the
//! guest reads its own PASIDs back.

mod common;

use std::sync::Arc;

use common::{memory, msi, Guest, WqSpec};
use pasid::PasidTranslator;
use vdsa::command::code;
use vdsa::descriptor::{flags, Descriptor, Opcode};
use vdsa::dma::{AddressSpace, MockIommu, PasidTag};
use vdsa::regs::{layout, offset};
use vdsa::DsaConfig;

/// Host PASIDs are guest PASIDs with bit 19 set.
struct HighBit;

const HOST_BIT: u32 = 1 << 19;

impl PasidTranslator for HighBit {
    fn to_host(&self, guest: u32) -> u32 {
        guest | HOST_BIT
    }

    fn to_guest(&self, host: u32) -> Option<u32> {
        (host & HOST_BIT != 0).then_some(host & !HOST_BIT)
    }
}

#[test]
fn dedicated_wq_pasid_is_translated_and_swerror_reports_the_guest_pasid() {
    let mem = memory();
    let mock = Arc::new(MockIommu::new(mem.clone()));
    let mut g = Guest::with_translator(DsaConfig::default(), mock.clone(), mem, Arc::new(HighBit));
    g.enable_pci();
    g.enable_pasid_pri_ats();
    // Linux's kernel DWQ: PASID-enabled and privileged.
    let wq = WqSpec {
        pasid_en: true,
        pasid: 5,
        privileged: true,
        ..WqSpec::dedicated(0, 0)
    };
    g.setup(&[wq]);
    // WQCFG still reads back the guest's PASID.
    assert_eq!((g.read32(g.wqcfg(0, 2)) >> 8) & 0xf_ffff, 5);

    g.fill(0x1000, &[0x77; 64]);
    let mut d = Descriptor::new(Opcode::Memmove, flags::CRAV | flags::RCR);
    d.set_completion_addr(0x3000)
        .set_src(0x1000)
        .set_dst(0x2000)
        .set_xfer_size(64);
    g.movdir64b(0, &d);
    assert_eq!(g.wait_cr(0x3000)[0], 1);
    assert_eq!(g.bytes(0x2000, 64), vec![0x77; 64]);
    let host = PasidTag {
        pasid: 5 | HOST_BIT,
        privileged: true,
    };
    let spaces = mock.spaces();
    assert!(spaces.contains(&AddressSpace::Untranslated(Some(host))));
    assert!(spaces
        .iter()
        .all(|s| matches!(s, AddressSpace::Untranslated(Some(t)) if t.pasid == 5 | HOST_BIT)));

    // MSIXPERM names guest PASIDs: an entry bound to PASID 5 lets the WQ's
    // descriptors (host PASID 5 | HOST_BIT) use handle 1; bound to 6 it
    // does not (0x19, invalid interrupt handle).
    g.msi.take();
    let perm = |pasid: u32| (pasid << 12) | (1 << 3);
    g.write32(layout::MSIX_PERM + 8, perm(5));
    d.set_u32(4, d.u32_at(4) | flags::RCI);
    d.set_int_handle(1).set_completion_addr(0x3020);
    g.movdir64b(0, &d);
    assert_eq!(g.wait_cr(0x3020)[0], 1);
    assert_eq!(g.wait_msis(1), vec![msi(1)]);
    g.write32(layout::MSIX_PERM + 8, perm(6));
    d.set_completion_addr(0x3060);
    g.movdir64b(0, &d);
    assert_eq!(g.wait_cr(0x3060)[0], 0x19);
    g.write64(offset::SWERR, 3);
    // Drain PASID takes the guest PASID.
    assert_eq!(g.command(code::DRAIN_PASID, 5), 0);

    // The host PASID refused: SWERROR (0x1a, the record address), with
    // the guest's PASID in it.
    mock.refuse_pasid(5 | HOST_BIT);
    let mut d = Descriptor::new(Opcode::Memmove, flags::CRAV | flags::RCR);
    d.set_src(0x1000)
        .set_dst(0x2000)
        .set_xfer_size(64)
        .set_completion_addr(0x3040);
    g.movdir64b(0, &d);
    let err = g.wait_swerr();
    assert_eq!(err[0] & 0xff00, 0x1a00, "completion record fault");
    assert_eq!((err[0] >> 40) & 0xf_ffff, 5, "guest PASID");
    assert_eq!(err[2], 0x3040);
}
