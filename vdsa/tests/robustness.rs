//! Guest-programmed garbage never crashes the model, and memory moves
//! match a reference for arbitrary overlaps.

mod common;

use bus::StoreKind;
use common::*;
use pci::PciDevice;
use proptest::prelude::*;
use vdsa::descriptor::{flags, Descriptor, Opcode};

fn working_guest() -> Guest {
    Guest::with_wqs(false, &[WqSpec::dedicated(0, 0), WqSpec::shared(1, 1)]).0
}

/// The device still executes a NOOP on the dedicated WQ.
fn still_works(g: &mut Guest) {
    let mut d = Descriptor::new(Opcode::Noop, flags::CRAV | flags::RCR);
    d.set_completion_addr(0xfe0);
    g.fill(0xfe0, &[0; 32]);
    g.movdir64b(0, &d);
    assert_eq!(g.wait_cr(0xfe0)[0], 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn register_garbage_never_panics(
        writes in proptest::collection::vec((0u64..0x2000, 0usize..6, any::<u64>()), 1..64),
    ) {
        let mut g = working_guest();
        for (offset, size, value) in writes {
            let len = [1, 2, 4, 8, 3, 16][size];
            let bytes: Vec<u8> = value.to_le_bytes().iter().copied().cycle().take(len).collect();
            g.dsa.bar_write(0, offset, &bytes);
            let mut back = vec![0u8; len];
            g.dsa.bar_read(0, offset, &mut back);
        }
        // Whatever happened, a reset brings the device back.
        g.enable_pci();
        g.enable_msix();
        let start = std::time::Instant::now();
        while g.read32(0xa8) & (1 << 31) != 0 {
            prop_assert!(start.elapsed() < TIMEOUT, "a garbage command never finished");
            std::thread::yield_now();
        }
        g.write64(0xc0, 3);
        g.setup(&[WqSpec::dedicated(0, 0)]);
        still_works(&mut g);
    }

    #[test]
    fn descriptor_garbage_never_panics(
        descs in proptest::collection::vec((proptest::array::uniform32(any::<u8>()), proptest::array::uniform32(any::<u8>()), 0usize..3), 1..16),
    ) {
        let mut g = working_guest();
        for (lo, hi, target) in descs {
            let mut desc = Descriptor::default();
            desc.0[..32].copy_from_slice(&lo);
            desc.0[32..].copy_from_slice(&hi);
            // Keep transfers small so a case runs quickly; everything else
            // stays random.
            desc.set_xfer_size(desc.xfer_size() % 0x10_0000);
            let kind = [StoreKind::Movdir64b, StoreKind::Enqcmds, StoreKind::Enqcmd][target];
            let wq = usize::from(target != 0);
            let _ = g.submit(wq, target == 1, &desc, kind);
        }
        still_works(&mut g);
    }

    #[test]
    fn memmove_matches_reference(len in 1usize..40_000, src_off in 0usize..50_000, dst_off in 0usize..50_000) {
        let mut g = working_guest();
        let base = 0x20_0000u64;
        let data = pattern(100_000, len as u32);
        g.fill(base, &data);
        let mut d = Descriptor::new(Opcode::Memmove, flags::CRAV | flags::RCR);
        d.set_completion_addr(0xfc0)
            .set_src(base + src_off as u64)
            .set_dst(base + dst_off as u64)
            .set_xfer_size(len as u32);
        g.fill(0xfc0, &[0; 32]);
        g.movdir64b(0, &d);
        prop_assert_eq!(g.wait_cr(0xfc0)[0], 1);
        let mut expected = data.clone();
        expected.copy_within(src_off..src_off + len, dst_off);
        prop_assert_eq!(g.bytes(base, 100_000), expected);
    }
}
