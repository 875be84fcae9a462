//! Guest-programmed PASIDs become host PASIDs inside the device, and the
//! guest reads its own PASIDs back.

mod common;

use std::sync::Arc;

use common::{memory, Guest, WqSpec};
use vdsa::descriptor::{flags, Descriptor, Opcode};
use vdsa::dma::{AddressSpace, MockIommu, PasidTag};
use vdsa::pasid::PasidTranslator;
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
    let wq = WqSpec {
        pasid_en: true,
        pasid: 5,
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
        privileged: false,
    };
    let spaces = mock.spaces();
    assert!(spaces.contains(&AddressSpace::Untranslated(Some(host))));
    assert!(spaces
        .iter()
        .all(|s| matches!(s, AddressSpace::Untranslated(Some(t)) if t.pasid == 5 | HOST_BIT)));

    // The host PASID refused: SWERROR (0x1a, the record address), with
    // the guest's PASID in it.
    mock.refuse_pasid(5 | HOST_BIT);
    d.set_completion_addr(0x3040);
    g.movdir64b(0, &d);
    let err = g.wait_swerr();
    assert_eq!(err[0] & 0xff00, 0x1a00, "completion record fault");
    assert_eq!((err[0] >> 40) & 0xf_ffff, 5, "guest PASID");
    assert_eq!(err[2], 0x3040);
}
