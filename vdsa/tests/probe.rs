//! What Linux's idxd driver sees and does at probe, configuration and
//! teardown: configuration space, capability registers, commands with their
//! CMDSTS codes, the sticky configuration rules and SWERROR.

mod common;

use std::sync::Arc;

use bus::{StoreKind, StoreReply};
use common::*;
use pci::{cap_id, PciDevice};
use vdsa::descriptor::{flags, Descriptor, Opcode};
use vdsa::dma::IdentityDma;
use vdsa::regs::{layout, offset};
use vdsa::DsaConfig;

fn identity_guest(config: DsaConfig) -> Guest {
    let mem = memory();
    Guest::new(config, Arc::new(IdentityDma::new(mem.clone())), mem)
}

#[test]
fn configuration_space_is_what_linux_checks() {
    let mut g = identity_guest(DsaConfig::default());
    assert_eq!(g.cfg_read32(0x00), 0x0b25_8086);
    assert_eq!(
        g.cfg_read32(0x08) >> 8,
        0x08_8000,
        "class: other system peripheral"
    );
    assert_eq!(g.cfg_read32(0x10), 0xfe00_000c, "BAR0: 64-bit prefetchable");
    assert_eq!(g.cfg_read32(0x18), 0xfd00_000c, "BAR2: 64-bit prefetchable");
    let pcie = g.find_cap(cap_id::PCI_EXPRESS);
    assert_eq!(
        g.cfg_read16(pcie + 2),
        0x0092,
        "PCIe v2, root complex integrated endpoint"
    );
    assert_eq!(
        g.cfg_read32(pcie + 0x24) & (1 << 21),
        1 << 21,
        "end-end TLP prefix"
    );
    let msix = g.find_cap(cap_id::MSIX);
    assert_eq!(
        g.cfg_read16(msix + 2) & 0x7ff,
        8,
        "9 vectors: one per WQ plus misc"
    );
    assert_eq!(g.cfg_read32(msix + 4), 0x1000, "table in BAR0 at 0x1000");
    assert_eq!(g.cfg_read32(msix + 8), 0x1800, "PBA in BAR0 at 0x1800");
    let ext = g.dsa.extended_capabilities();
    assert_eq!(g.cfg_read32(ext.ats) & 0xf_ffff, 0x1_000f);
    assert_eq!(
        g.cfg_read16(ext.ats + 4),
        0x0060,
        "page-aligned requests, global invalidate"
    );
    assert_eq!(g.cfg_read32(ext.pasid) & 0xf_ffff, 0x1_001b);
    assert_eq!(
        g.cfg_read16(ext.pasid + 4),
        0x1404,
        "20-bit PASID, privileged, no exec (as on Sapphire Rapids)"
    );
    assert_eq!(g.cfg_read32(ext.pri) & 0xf_ffff, 0x1_0013);
    assert_eq!(
        g.cfg_read16(ext.pri + 6),
        0x8100,
        "PRG response PASID required, stopped"
    );
    assert_eq!(g.cfg_read32(ext.pri + 8), 0x200);
    g.enable_pasid_pri_ats();
    assert_eq!(g.cfg_read16(ext.pasid + 6), 0b101);
    assert_eq!(
        g.cfg_read16(ext.pri + 6),
        0x8000,
        "enabled PRI is not stopped"
    );
    assert_eq!(g.cfg_read16(ext.ats + 6), 0x8000);
}

#[test]
fn capability_registers() {
    let mut g = identity_guest(DsaConfig::default());
    assert_eq!(g.read32(offset::VERSION), 0x100);
    // The Sapphire Rapids DSA 1.0 profile (vdsa::profile).
    assert_eq!(g.read64(offset::GENCAP), 0x40_915f_0107);
    assert_eq!(g.read64(offset::GENCAP), vdsa::profile::GENCAP);
    assert_eq!(g.read64(offset::WQCAP), 0x0057_0000_0108_0080);
    assert_eq!(
        g.read64(offset::GRPCAP),
        0x3_6004,
        "96 read buffers, controls"
    );
    assert_eq!(g.read64(offset::ENGCAP), 4);
    assert_eq!(g.read64(offset::OPCAP), 0x0000_0001_003f_03ff);
    assert_eq!(g.read64(offset::OPCAP + 8), 0);
    assert_eq!(g.read64(offset::OFFSETS), 0x0000_0003_0008_0004);
    assert_eq!(g.read64(offset::OFFSETS + 8), 0, "no perfmon");
    assert_eq!(g.read32(offset::CMDCAP), 0, "no CMDCAP");
    assert_eq!(g.read32(offset::GENSTS), 0);
    // 4-byte reads of 64-bit registers, as ioread32 would do them.
    assert_eq!(g.read32(offset::WQCAP + 4), 0x0057_0000);
    assert_eq!(g.read32(offset::GENCAP + 4), 0x40);
    // Portals read as all ones.
    let mut b = [0u8; 8];
    g.dsa.bar_read(2, 0x1000, &mut b);
    assert_eq!(b, [0xff; 8]);

    let mut g = identity_guest(DsaConfig {
        interrupt_handles: true,
        ..DsaConfig::default()
    });
    assert_eq!(g.read64(offset::GENCAP), 0x40_915f_0117, "cmd_cap");
    assert_eq!(g.read32(offset::CMDCAP), 0x7ffe);
}

/// idxd_pci_probe -> idxd_probe -> idxd_device_drv_probe -> drv_enable_wq,
/// then a dmaengine memcpy with an interrupt, then unbind.
#[test]
fn linux_probe_sequence() {
    let mut g = identity_guest(DsaConfig {
        interrupt_handles: true,
        ..DsaConfig::default()
    });
    g.enable_pci();
    assert_eq!(g.read32(offset::VERSION), 0x100);
    assert_eq!(g.read32(offset::GENSTS) & 3, 0, "not halted");
    // idxd_device_init_reset: RESET_DEVICE without int_req, busy-polled.
    assert_eq!(g.command_polled(5, 0, false), 0);
    assert!(g.msi.is_empty(), "polled reset raises no interrupt");
    let gencap = g.read64(offset::GENCAP);
    assert_eq!(gencap >> 31 & 1, 1, "configurable");
    let offsets = g.read64(offset::OFFSETS);
    let (grpcfg, wqcfg, perm) = (
        (offsets & 0xffff) * 0x100,
        (offsets >> 16 & 0xffff) * 0x100,
        (offsets >> 32 & 0xffff) * 0x100,
    );
    assert_eq!((grpcfg, wqcfg, perm), (0x400, 0x800, 0x300));

    // idxd_setup_interrupts.
    g.enable_msix();
    g.write32(offset::GENCTRL, 0b11);
    for v in 1..=8u32 {
        assert_eq!(
            g.command(13, v),
            v << 8,
            "handle of vector {v} is its index"
        );
    }

    // idxd_device_config with wq0 as a kernel dedicated WQ in group 0.
    let spec = WqSpec::dedicated(0, 0);
    for wq in 0..8 {
        let s = if wq == 0 {
            spec
        } else {
            WqSpec {
                size: 0,
                ..WqSpec::dedicated(wq, 0)
            }
        };
        if wq == 0 {
            g.write_wq(&s);
        }
    }
    for grp in 0..4usize {
        let at = g.grpcfg(grp);
        g.write64(at, u64::from(grp == 0));
        g.write64(at + 8, 0);
        g.write64(at + 16, 0);
        g.write64(at + 24, 0);
        g.write64(at + 32, u64::from(grp == 0));
        g.write64(at + 40, (0x60 << 20) | (1 << 3) | 1);
    }
    assert_eq!(g.command(1, 0), 0, "ENABLE_DEVICE");
    assert_eq!(g.read32(offset::GENSTS), 1);
    assert_eq!(
        g.read32(offset::INTCAUSE),
        0,
        "INTCAUSE is write-1-to-clear"
    );
    assert_eq!(g.command(6, 0), 0, "ENABLE_WQ 0");
    assert_eq!(g.read32(g.wqcfg(0, 6)), 1 << 30, "WQ enabled, empty");
    // The config rewrite drv_enable_wq does for other WQs while enabled.
    g.write_wq(&spec);
    assert_eq!(g.read32(g.wqcfg(0, 0)), 16);

    // dmaengine memcpy with DMA_PREP_INTERRUPT: MEMMOVE, CRAV|RCR|RCI|CC.
    let data = pattern(4096, 1);
    g.fill(0x10_0000, &data);
    let mut desc = Descriptor::new(
        Opcode::Memmove,
        flags::CRAV | flags::RCR | flags::RCI | flags::CC,
    );
    desc.set_pasid(0, true)
        .set_completion_addr(0x8000)
        .set_src(0x10_0000)
        .set_dst(0x20_0000)
        .set_xfer_size(4096)
        .set_int_handle(1);
    g.movdir64b(0, &desc);
    let cr = g.wait_cr(0x8000);
    assert_eq!(cr, {
        let mut c = [0u8; 32];
        c[0] = 1;
        c
    });
    assert_eq!(g.bytes(0x20_0000, 4096), data);
    assert_eq!(
        g.wait_msis(1),
        vec![msi(1)],
        "completion on the WQ's vector"
    );

    // Unbind: drain, release handle (polled), reset WQ, disable, reset.
    assert_eq!(g.command(8, 1), 0, "DRAIN_WQ bitmask form");
    assert_eq!(
        g.command_polled(14, 1, false),
        0,
        "RELEASE_INT_HANDLE polled"
    );
    assert_eq!(g.command(10, 1), 0, "RESET_WQ");
    assert_eq!(g.read32(g.wqcfg(0, 6)), 0, "WQ disabled");
    assert_eq!(g.read32(g.wqcfg(0, 0)), 16, "Reset WQ keeps the size");
    assert_eq!(g.read32(g.wqcfg(0, 2)), 0, "and clears the rest");
    assert_eq!(g.read32(g.wqcfg(0, 8)), 0x003f_03ff, "OPCFG back to OPCAP");
    assert_eq!(g.command(2, 0), 0, "DISABLE_DEVICE");
    assert_eq!(g.read32(offset::GENSTS), 0);
    assert_eq!(g.command(5, 0), 0, "RESET_DEVICE");
    assert_eq!(g.read32(g.wqcfg(0, 0)), 0, "Reset Device clears sizes");
    assert_eq!(g.read32(offset::GENCTRL), 0);
}

#[test]
fn sticky_configuration_rules() {
    let mut g = identity_guest(DsaConfig::default());
    g.setup(&[WqSpec::dedicated(0, 0)]);
    // While the device is enabled: GENCFG and GRPCFG are read-only.
    g.write32(offset::GENCFG, 1 << 12);
    assert_eq!(g.read32(offset::GENCFG), 0);
    let at = g.grpcfg(0);
    g.write64(at, 0b11);
    assert_eq!(g.read64(at), 1);
    // WQ sizes are fixed while the device is enabled, even for disabled WQs.
    g.write32(g.wqcfg(1, 0), 8);
    assert_eq!(g.read32(g.wqcfg(1, 0)), 0);
    // A disabled WQ's mode and PASID can change while the device is enabled.
    g.write32(g.wqcfg(1, 2), 0x1000_0701);
    assert_eq!(g.read32(g.wqcfg(1, 2)), 0x1000_0701);
    // An enabled WQ's mode cannot; its threshold can.
    g.write32(g.wqcfg(0, 2), 0);
    assert_eq!(g.read32(g.wqcfg(0, 2)) & 1, 1);
    g.write32(g.wqcfg(0, 1), 5);
    assert_eq!(g.read32(g.wqcfg(0, 1)), 5);
    // Read-only status dword and reserved bits ignore writes.
    g.write32(g.wqcfg(0, 6), 0xffff_ffff);
    assert_eq!(g.read32(g.wqcfg(0, 6)), 1 << 30);
    // MSI-X permissions: PASID, PASID enable, ignore writable.
    g.write64(layout::MSIX_PERM + 8, 0xffff_ffff_ffff_ffff);
    assert_eq!(g.read64(layout::MSIX_PERM + 8), 0xffff_f00c);
}

#[test]
fn cmdsts_error_codes() {
    let mut g = identity_guest(DsaConfig {
        interrupt_handles: true,
        ..DsaConfig::default()
    });
    g.enable_msix();
    // Enable Device without bus mastering.
    g.cfg_write16(0x04, 0x0002);
    assert_eq!(g.command_polled(1, 0, true), 0x12, "BUSMASTER_EN");
    assert_eq!(g.read32(offset::INTCAUSE), 2, "INTCAUSE.CMD set...");
    assert!(g.msi.is_empty(), "...but no MSI without bus mastering");
    g.write32(offset::INTCAUSE, 2);
    g.enable_pci();
    // WQ sizes over the total.
    g.write32(g.wqcfg(0, 0), 100);
    g.write32(g.wqcfg(1, 0), 29);
    assert_eq!(g.command(1, 0), 0x14, "WQ_SIZE_ERANGE");
    g.write32(g.wqcfg(1, 0), 0);
    // A group with WQs but no engine.
    g.write64(g.grpcfg(0), 1);
    assert_eq!(g.command(1, 0), 0x15, "GRP_CONFIG");
    // An active WQ in no group, an inactive WQ in a group.
    g.write64(g.grpcfg(0), 0);
    g.set_group(1, 2, 2);
    assert_eq!(
        g.command(1, 0),
        0x16,
        "GRP_CONFIG2: WQ 0 has a size but no group, WQ 1 the reverse"
    );
    g.set_group(1, 0, 0);
    g.set_group(0, 1, 1);
    // Engines without WQs.
    g.write64(g.grpcfg(1) + 32, 2);
    assert_eq!(g.command(1, 0), 0x15, "GRP_CONFIG: engines without WQs");
    // An engine in two groups, and an engine that does not exist.
    g.write32(g.wqcfg(1, 0), 4);
    g.set_group(1, 2, 1);
    assert_eq!(g.command(1, 0), 0x17, "GRP_CONFIG3: engine 0 in two groups");
    g.write64(g.grpcfg(1) + 32, 1 << 9);
    assert_eq!(
        g.command(1, 0),
        0x17,
        "GRP_CONFIG3: engine 9 does not exist"
    );
    g.set_group(1, 0, 0);
    g.write32(g.wqcfg(1, 0), 0);
    // Enable WQ before the device.
    assert_eq!(g.command(6, 0), 0x20, "DEV_NOTEN");
    assert_eq!(g.command(2, 0), 0x31, "DIS_DEV_EN: not enabled");
    assert_eq!(g.command(1, 0), 0, "enable device");
    assert_eq!(g.command(1, 0), 0x10, "DEV_ENABLED");
    assert_eq!(g.command(6, 9), 0x02, "INVAL_WQIDX");
    assert_eq!(g.command(6, 1), 0x22, "WQ_SIZE");
    // WQ 0 is shared without PASID.
    g.write32(g.wqcfg(0, 3), 31 | (10 << 5));
    assert_eq!(g.command(6, 0), 0x26, "PASID_EN: shared WQ needs PASID");
    g.write32(g.wqcfg(0, 2), 1 << 28);
    assert_eq!(g.command(6, 0), 0x26, "PASID_EN: PASID capability disabled");
    g.write32(g.wqcfg(0, 2), 1 | (1 << 1));
    assert_eq!(g.command(6, 0), 0x25, "BOF_EN without PRI");
    g.write32(g.wqcfg(0, 2), 1);
    g.write32(g.wqcfg(0, 3), 31);
    assert_eq!(g.command(6, 0), 0x27, "MAX_BATCH_SIZE 0");
    g.write32(g.wqcfg(0, 3), 11 << 5);
    assert_eq!(g.command(6, 0), 0x27, "MAX_BATCH_SIZE over GENCAP");
    g.write32(g.wqcfg(0, 3), (10 << 5) | 31);
    // OPCAP has every DSA 1.0 operation, so OPCFG cannot name one it
    // lacks: a bit of an undefined operation does not stick.
    g.write32(g.wqcfg(0, 8), 0x003f_03ff | (1 << 0x16));
    assert_eq!(g.read32(g.wqcfg(0, 8)), 0x003f_03ff);
    let ext = g.dsa.extended_capabilities();
    g.cfg_write16(ext.pasid + 6, 1);
    g.write32(g.wqcfg(0, 2), 1 | (1 << 28) | (1 << 29));
    assert_eq!(
        g.command(6, 0),
        0x2a,
        "privileged DWQ without PASID privileged mode"
    );
    g.cfg_write16(ext.pasid + 6, 0b101);
    assert_eq!(g.command(6, 0), 0, "enable WQ");
    assert_eq!(g.command(6, 0), 0x21, "WQ_ENABLED");
    assert_eq!(g.command(7, 0b10), 0x32, "Disable WQ 1: not enabled");
    assert_eq!(
        g.command(8, 0b11),
        0x32,
        "Drain WQ 0 and 1: WQ 1 not enabled"
    );
    assert_eq!(g.command(9, 1 << 9), 0x02, "Abort WQ 9: no such WQ");
    assert_eq!(g.command(13, 9), 0x41, "INVAL_INT_IDX");
    assert_eq!(g.command(13, 1 | (1 << 16)), 0x42, "NO_HANDLE: no IMS");
    assert_eq!(g.command(14, 20), 0x41, "release: INVAL_INT_IDX");
    assert_eq!(g.command(0x1f, 0), 0x01, "INVAL_CMD");
    assert_eq!(g.command(7, 1), 0, "disable WQ 0");
    assert_eq!(g.command(2, 0), 0, "disable device");

    let mut g = identity_guest(DsaConfig {
        interrupt_handles: false,
        ..DsaConfig::default()
    });
    g.enable_pci();
    g.enable_msix();
    assert_eq!(
        g.command(13, 1),
        0x01,
        "no Request Interrupt Handle without CMDCAP"
    );
}

#[test]
fn pri_allocation_checked_at_enable() {
    let mut g = identity_guest(DsaConfig::default());
    g.enable_pci();
    g.enable_msix();
    let ext = g.dsa.extended_capabilities();
    g.cfg_write16(ext.pri + 4, 1);
    assert_eq!(g.command(1, 0), 0x13, "PRI enabled with no allocation");
    g.cfg_write32(ext.pri + 0xc, 0x400);
    assert_eq!(g.command(1, 0), 0x13, "allocation over capacity");
    g.cfg_write32(ext.pri + 0xc, 0x200);
    g.write32(g.wqcfg(0, 0), 4);
    g.set_group(0, 1, 1);
    assert_eq!(g.command(1, 0), 0);
}

#[test]
fn swerror_rules() {
    let mut g = identity_guest(DsaConfig::default());
    g.setup(&[WqSpec::dedicated(0, 0)]);
    // A misaligned completion record address: SWERROR 0x1b, no record.
    let mut desc = Descriptor::new(Opcode::Noop, flags::CRAV | flags::RCR);
    desc.set_completion_addr(0x8010);
    g.movdir64b(0, &desc);
    let err = g.wait_swerr();
    assert_eq!(
        err[0], 0x0000_0000_0000_1b0d,
        "valid, desc valid, WQ 0 valid, code 0x1b, NOOP"
    );
    assert_eq!(g.wait_msis(1), vec![msi(0)], "software error interrupt");
    assert_eq!(g.read32(offset::INTCAUSE), 1, "INTCAUSE.ERR");
    // A second error while Valid: Overflow.
    let mut bad = Descriptor::new(Opcode::Memmove, flags::FENCE);
    bad.set_xfer_size(8);
    g.movdir64b(0, &bad);
    let start = std::time::Instant::now();
    while g.read64(offset::SWERR) & 2 == 0 {
        assert!(start.elapsed() < TIMEOUT);
        std::thread::yield_now();
    }
    assert_eq!(
        g.read64(offset::SWERR),
        0x1b0f,
        "first error kept, overflow set"
    );
    assert!(g.msi.is_empty(), "overflow raises no interrupt");
    // The driver's ack: write back q0 & 3.
    g.write64(offset::SWERR, 3);
    assert_eq!(g.read64(offset::SWERR) & 3, 0);
    g.write32(offset::INTCAUSE, 1);
    assert_eq!(g.read32(offset::INTCAUSE), 0);
    // An invalid descriptor without a completion record: SWERROR with the
    // invalid flags in the error information.
    g.movdir64b(0, &bad);
    let err = g.wait_swerr();
    assert_eq!(
        err[0], 0x0000_0003_0000_118d,
        "code 0x11, MEMMOVE, info valid"
    );
    assert_eq!(
        err[1] >> 32,
        u64::from(flags::FENCE),
        "invalid flag: FENCE outside a batch"
    );
    g.write64(offset::SWERR, 3);
    // The full dedicated WQ (0x53) and the command written while active
    // (0x52) are in the submission tests.
    assert_eq!(g.read64(offset::SWERR) & 1, 0);
}

#[test]
fn halt_when_bus_mastering_is_turned_off() {
    let mut g = identity_guest(DsaConfig::default());
    g.setup(&[WqSpec::dedicated(0, 0)]);
    g.msi.take();
    g.cfg_write16(0x04, 0x0002);
    assert_eq!(
        g.read32(offset::GENSTS),
        3,
        "halted, software reset suffices"
    );
    assert_eq!(g.read64(offset::SWERR) & 0xff01, 0x5101, "SWERROR 0x51");
    assert_eq!(g.read32(offset::INTCAUSE), 0x11, "ERR and HALT_STATE");
    assert!(g.msi.is_empty(), "no MSI without bus mastering");
    let desc = Descriptor::new(Opcode::Noop, 0);
    assert_eq!(
        g.submit(0, true, &desc, StoreKind::Enqcmds),
        StoreReply::Retry
    );
    g.enable_pci();
    assert_eq!(
        g.command(6, 0),
        0x05,
        "commands other than reset fail while halted"
    );
    assert_eq!(g.command(5, 0), 0, "reset recovers");
    assert_eq!(g.read32(offset::GENSTS), 0);
}

/// The read-buffer controls accel-config sets (GENCFG read-buffer limit,
/// GRPCFG reserved/allowed/use-limit) are writable while the device is
/// disabled and checked against the 96 read buffers at Enable Device.
#[test]
fn read_buffer_controls() {
    let mut g = identity_guest(DsaConfig::default());
    g.enable_pci();
    g.enable_msix();
    g.write32(offset::GENCTRL, 0b11);
    let flags = |group: u64| layout::GRPCFG + group * layout::GRPCFG_SIZE + 40;
    assert_eq!(g.read64(flags(0)), 96 << 20, "power-on: all 96 allowed");
    let use_limit = |v: u64| v << 7;
    let reserved = |v: u64| v << 8;
    let allowed = |v: u64| v << 20;
    // 2g2q_user_1.conf: limit 0, nothing reserved, 8 allowed.
    for group in 0..4 {
        g.write64(flags(group), allowed(8));
        assert_eq!(g.read64(flags(group)), 8 << 20);
    }
    g.write32(offset::GENCFG, 97);
    assert_eq!(g.read32(offset::GENCFG), 97);
    assert_eq!(g.command(1, 0), 0x11, "limit above the total");
    g.write32(offset::GENCFG, 0);
    g.write64(flags(1), allowed(8) | reserved(9));
    assert_eq!(g.command(1, 0), 0x15, "fewer allowed than reserved");
    g.write64(flags(1), allowed(97));
    assert_eq!(g.command(1, 0), 0x15, "more allowed than the total");
    g.write64(flags(1), allowed(60) | reserved(50));
    g.write64(flags(2), allowed(60) | reserved(50));
    assert_eq!(g.command(1, 0), 0x15, "reservations above the total");
    g.write64(flags(2), allowed(8) | use_limit(1));
    assert_eq!(g.command(1, 0), 0x15, "group uses a zero limit");
    g.write32(offset::GENCFG, 16);
    assert_eq!(g.command(1, 0), 0, "enable device");
    // Enabled: the controls are read-only.
    g.write32(offset::GENCFG, 0);
    g.write64(flags(2), 0);
    assert_eq!(g.read32(offset::GENCFG), 16);
    assert_eq!(g.read64(flags(2)), (8 << 20) | (1 << 7));
}
