//! Portals and WQs: accept and retry, dropped submissions, PASIDs and
//! privileges, drains and aborts, completion interrupts.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bus::{StoreKind, StoreReply};
use common::*;
use pci::PciDevice;
use vdsa::descriptor::{flags, Descriptor, Opcode};
use vdsa::dma::{AddressSpace, MockIommu, PageRequest, PageResponseCode, PasidTag};
use vdsa::portal::Portal;
use vdsa::regs::{layout, offset};

/// WQ 0 dedicated (block-on-fault), WQ 1 shared (block-on-fault, size 16,
/// threshold 4), one engine each.
fn guest() -> (Guest, Arc<MockIommu>) {
    Guest::with_wqs(
        false,
        &[
            WqSpec {
                bof: true,
                ..WqSpec::dedicated(0, 0)
            },
            WqSpec {
                bof: true,
                threshold: 4,
                ..WqSpec::shared(1, 1)
            },
        ],
    )
}

fn noop(cr: u64) -> Descriptor {
    let mut d = Descriptor::new(Opcode::Noop, flags::CRAV | flags::RCR);
    d.set_completion_addr(cr);
    d
}

/// Blocks the engine of `wq` on a block-on-fault memmove; returns the page
/// request it posted and its completion record address.
fn block_engine(g: &mut Guest, mock: &MockIommu, wq: usize, kind: StoreKind) -> (PageRequest, u64) {
    mock.fault_page(0x60_0000);
    let mut d = Descriptor::new(Opcode::Memmove, flags::CRAV | flags::RCR | flags::BOF);
    d.set_pasid(7, false)
        .set_completion_addr(0x2000)
        .set_src(0x50_0000)
        .set_dst(0x60_0000)
        .set_xfer_size(64);
    g.fill(0x2000, &[0; 32]);
    assert_eq!(g.submit(wq, true, &d, kind), StoreReply::Accepted);
    (
        mock.wait_page_request(TIMEOUT)
            .expect("the engine blocks on a page request"),
        0x2000,
    )
}

fn release(g: &mut Guest, mock: &MockIommu, request: PageRequest, cr: u64) {
    mock.resolve_page(request.addr);
    g.iommu
        .page_response(request.prg_index, PageResponseCode::Success);
    assert_eq!(g.wait_cr(cr)[0], 1);
}

#[test]
fn shared_wq_retries_when_full() {
    let (mut g, mock) = guest();
    let (request, blocked) = block_engine(&mut g, &mock, 1, StoreKind::Enqcmds);
    assert_eq!(
        request.pasid,
        Some(PasidTag {
            pasid: 7,
            privileged: false
        })
    );
    let mut accepted = Vec::new();
    // Limited portal: up to the threshold (4).
    for i in 0..5u64 {
        let mut d = noop(0x3000 + i * 32);
        d.set_pasid(7, false);
        let reply = g.submit(1, true, &d, StoreKind::Enqcmd);
        assert_eq!(
            reply,
            if i < 4 {
                StoreReply::Accepted
            } else {
                StoreReply::Retry
            },
            "limited #{i}"
        );
        if reply == StoreReply::Accepted {
            accepted.push(0x3000 + i * 32);
        }
    }
    // Unlimited portal: up to the size (16).
    for i in 0..13u64 {
        let mut d = noop(0x4000 + i * 32);
        d.set_pasid(7, false);
        let reply = g.submit(1, false, &d, StoreKind::Enqcmds);
        assert_eq!(
            reply,
            if i < 12 {
                StoreReply::Accepted
            } else {
                StoreReply::Retry
            },
            "unlimited #{i}"
        );
        if reply == StoreReply::Accepted {
            accepted.push(0x4000 + i * 32);
        }
    }
    assert_eq!(g.read32(g.wqcfg(1, 6)), (1 << 30) | 16, "occupancy 16");
    // The threshold may change while the WQ is enabled.
    g.write32(g.wqcfg(1, 1), 20);
    let d = noop(0x5000);
    assert_eq!(
        g.submit(1, true, &d, StoreKind::Enqcmds),
        StoreReply::Retry,
        "still full at its size"
    );
    release(&mut g, &mock, request, blocked);
    for cr in accepted {
        assert_eq!(g.wait_cr(cr)[0], 1);
    }
    assert_eq!(g.read32(g.wqcfg(1, 6)), 1 << 30);
}

#[test]
fn portal_rules() {
    let (mut g, _) = guest();
    g.fill(0x3000, &[0; 32 * 8]);
    let d = noop(0x3000);
    // Enqueue to a dedicated WQ, to a disabled WQ, to an IMS portal, to a
    // misaligned address, and with the device disabled: Retry.
    assert_eq!(g.submit(0, true, &d, StoreKind::Enqcmds), StoreReply::Retry);
    assert_eq!(g.submit(2, true, &d, StoreKind::Enqcmds), StoreReply::Retry);
    assert_eq!(
        g.dsa
            .bar_store64(2, 0x4000 + 0x3000, &d.0, StoreKind::Enqcmds),
        StoreReply::Retry
    );
    assert_eq!(
        g.dsa
            .bar_store64(2, 0x4000 + 0x1020, &d.0, StoreKind::Enqcmds),
        StoreReply::Retry
    );
    // Enqueue to a BAR0 address.
    assert_eq!(
        g.dsa.bar_store64(0, 0x100, &d.0, StoreKind::Enqcmd),
        StoreReply::Retry
    );
    // MOVDIR64B to a shared WQ is ignored.
    g.submit(1, true, &noop(0x3020), StoreKind::Movdir64b);
    // Any 64-byte-aligned slot of the page is the portal; a plain 64-byte
    // write reaches a dedicated WQ too.
    g.dsa
        .bar_write(2, Portal::offset(0, true) + 0xfc0, &noop(0x3040).0);
    g.dsa
        .bar_write(2, Portal::offset(0, false) + 0x40, &noop(0x3060).0);
    assert_eq!(g.wait_cr(0x3040)[0], 1);
    assert_eq!(g.wait_cr(0x3060)[0], 1);
    // A non-64-byte write is ignored.
    g.dsa.bar_write(2, Portal::offset(0, true), &[0; 8]);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.bytes(0x3000, 1)[0], 0);
    assert_eq!(
        g.bytes(0x3020, 1)[0],
        0,
        "the posted write to the shared WQ did nothing"
    );
    assert_eq!(
        g.read64(offset::SWERR),
        0,
        "none of this is a software error"
    );
    assert_eq!(g.command(2, 0), 0);
    assert_eq!(
        g.submit(1, true, &d, StoreKind::Enqcmds),
        StoreReply::Retry,
        "device disabled"
    );
}

#[test]
fn full_dedicated_wq_drops_with_swerror() {
    let (mut g, mock) = Guest::with_wqs(
        false,
        &[WqSpec {
            bof: true,
            size: 2,
            ..WqSpec::dedicated(0, 0)
        }],
    );
    let (request, blocked) = block_engine(&mut g, &mock, 0, StoreKind::Movdir64b);
    g.fill(0x3000, &[0; 96]);
    for i in 0..3 {
        g.movdir64b(0, &noop(0x3000 + 32 * i));
    }
    let err = g.wait_swerr();
    assert_eq!(err[0], 0x0000_0000_0000_530d, "code 0x53, WQ 0, NOOP");
    release(&mut g, &mock, request, blocked);
    assert_eq!((g.wait_cr(0x3000)[0], g.wait_cr(0x3020)[0]), (1, 1));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.bytes(0x3040, 1)[0], 0, "the third descriptor was dropped");
}

#[test]
fn pasid_and_privilege_of_requests() {
    let (mut g, mock) = Guest::with_wqs(
        false,
        &[
            WqSpec {
                pasid_en: true,
                pasid: 0x42,
                privileged: true,
                ..WqSpec::dedicated(0, 0)
            },
            WqSpec::shared(1, 1),
        ],
    );
    // Dedicated: the WQCFG PASID and privilege; the descriptor's are ignored.
    let mut d = Descriptor::new(Opcode::Memfill, flags::CRAV | flags::RCR);
    d.set_pasid(0x99, false)
        .set_completion_addr(0x3000)
        .set_dst(0x10_0000)
        .set_xfer_size(8);
    g.fill(0x3000, &[0; 64]);
    g.movdir64b(0, &d);
    assert_eq!(g.wait_cr(0x3000)[0], 1);
    assert_eq!(
        mock.spaces(),
        vec![AddressSpace::Untranslated(Some(PasidTag {
            pasid: 0x42,
            privileged: true
        }))]
    );
    // Shared: the descriptor's PASID (from ENQCMD: host PASID, user).
    d.set_pasid(0x1234, false).set_completion_addr(0x3020);
    assert_eq!(
        g.submit(1, true, &d, StoreKind::Enqcmd),
        StoreReply::Accepted
    );
    assert_eq!(g.wait_cr(0x3020)[0], 1);
    assert!(mock
        .spaces()
        .contains(&AddressSpace::Untranslated(Some(PasidTag {
            pasid: 0x1234,
            privileged: false
        }))));
    // A PASID the IOMMU refuses: not even the completion record can be
    // written, so the error goes to SWERROR (0x1a, the record address).
    mock.refuse_pasid(0x666);
    d.set_pasid(0x666, false).set_completion_addr(0x3040);
    g.fill(0x3040, &[0; 32]);
    assert_eq!(
        g.submit(1, true, &d, StoreKind::Enqcmds),
        StoreReply::Accepted
    );
    let err = g.wait_swerr();
    assert_eq!((err[0] & 0xff_ff00, err[2]), (0x01_1a00, 0x3040));
    assert_eq!(g.bytes(0x3040, 1)[0], 0);
    g.write64(offset::SWERR, 3);
    // Reserved bits in the trusted dword of a shared-WQ descriptor.
    d.set_pasid(0x1234, false).set_completion_addr(0x3060);
    d.set_u32(0, d.u32_at(0) | (1 << 25));
    g.fill(0x3060, &[0; 32]);
    assert_eq!(
        g.submit(1, true, &d, StoreKind::Enqcmds),
        StoreReply::Accepted
    );
    assert_eq!(g.wait_cr(0x3060)[0], 0x12);
    // Privileged ENQCMDS while PASID privileged mode is off: SWERROR 0x1d,
    // no completion record.
    let ext = g.dsa.extended_capabilities();
    g.cfg_write16(ext.pasid + 6, 0b001);
    d.set_pasid(0x1234, true).set_completion_addr(0x3080);
    g.fill(0x3080, &[0; 32]);
    assert_eq!(
        g.submit(1, true, &d, StoreKind::Enqcmds),
        StoreReply::Accepted
    );
    let err = g.wait_swerr();
    assert_eq!(
        err[0], 0x0012_3404_0001_1d4d,
        "0x1d, WQ 1, FILL, PASID 0x1234, priv"
    );
    assert_eq!(g.bytes(0x3080, 1)[0], 0);
}

#[test]
fn completion_interrupts() {
    let (mut g, _) = guest();
    g.msi.take();
    let mut d = noop(0x3000);
    d.set_u32(4, d.u32_at(4) | flags::RCI);
    d.set_int_handle(1);
    g.fill(0x3000, &[0; 128]);
    g.movdir64b(0, &d);
    assert_eq!(g.wait_cr(0x3000)[0], 1);
    assert_eq!(g.wait_msis(1), vec![msi(1)]);
    // MSI-X permission Ignore suppresses it.
    g.write32(layout::MSIX_PERM + 8, 1 << 2);
    d.set_completion_addr(0x3020);
    g.movdir64b(0, &d);
    assert_eq!(g.wait_cr(0x3020)[0], 1);
    std::thread::sleep(Duration::from_millis(20));
    assert!(g.msi.is_empty());
    // A handle beyond the MSI-X table (9 vectors; without CMDCAP a
    // handle is a vector index): 0x19 in the record and SWERROR, no
    // interrupt.
    d.set_completion_addr(0x3040).set_int_handle(12);
    g.movdir64b(0, &d);
    assert_eq!(g.wait_cr(0x3040)[0], 0x19);
    let err = g.wait_swerr();
    assert_eq!((err[0] & 0xff_ff00, err[1] >> 32), (0x00_1900, 12));
    // A masked vector becomes pending and fires when unmasked.
    g.write32(layout::MSIX_PERM + 8, 0);
    g.write32(layout::MSIX_TABLE + 16 + 12, 1);
    d.set_completion_addr(0x3060).set_int_handle(1);
    g.movdir64b(0, &d);
    assert_eq!(g.wait_cr(0x3060)[0], 1);
    std::thread::sleep(Duration::from_millis(20));
    g.msi.take();
    assert_eq!(g.read64(layout::MSIX_PBA), 0b10);
    g.write32(layout::MSIX_TABLE + 16 + 12, 0);
    assert_eq!(g.msi.take(), vec![msi(1)]);
}

#[test]
fn drain_descriptor_and_commands_wait_for_blocked_work() {
    let (mut g, mock) = Guest::with_wqs(
        false,
        &[WqSpec {
            bof: true,
            ..WqSpec::dedicated(0, 0)
        }],
    );
    // Two engines in group 0, so the drain runs beside the blocked copy.
    assert_eq!(g.command(2, 0), 0);
    g.write64(g.grpcfg(0) + 32, 0b11);
    assert_eq!(g.command(1, 0), 0);
    assert_eq!(g.command(6, 0), 0);
    let (request, blocked) = block_engine(&mut g, &mock, 0, StoreKind::Movdir64b);
    let mut drain = Descriptor::new(Opcode::Drain, flags::CRAV | flags::RCR);
    drain.set_completion_addr(0x3000);
    g.fill(0x3000, &[0; 32]);
    g.movdir64b(0, &drain);
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        g.bytes(0x3000, 1)[0],
        0,
        "the drain waits for the blocked copy"
    );
    // A Drain WQ command waits too; writing CMD meanwhile is an error.
    g.write32(offset::CMD, (8 << 20) | 1 | (1 << 31));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.read32(offset::CMDSTS), 1 << 31, "active");
    g.msi.take();
    g.write32(offset::CMD, 1 << 20);
    let err = g.wait_swerr();
    assert_eq!(err[0] & 0xffff, 0x5201, "command written while active");
    release(&mut g, &mock, request, blocked);
    assert_eq!(g.wait_cr(0x3000)[0], 1);
    let start = std::time::Instant::now();
    while g.read32(offset::CMDSTS) & (1 << 31) != 0 {
        assert!(start.elapsed() < TIMEOUT);
        std::thread::yield_now();
    }
    assert_eq!(g.read32(offset::CMDSTS), 0);
}

#[test]
fn abort_abandons_blocked_work() {
    let (mut g, mock) = guest();
    let (request, blocked) = block_engine(&mut g, &mock, 1, StoreKind::Enqcmds);
    let mut queued = noop(0x3000);
    queued.set_pasid(7, false);
    g.fill(0x3000, &[0; 32]);
    assert_eq!(
        g.submit(1, true, &queued, StoreKind::Enqcmds),
        StoreReply::Accepted
    );
    assert_eq!(g.command(12, 7), 0, "ABORT_PASID 7");
    assert_eq!(g.read32(g.wqcfg(1, 6)), 1 << 30, "queue emptied");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(g.bytes(blocked, 1)[0], 0, "abandoned: no completion record");
    assert_eq!(g.bytes(0x3000, 1)[0], 0);
    // A late response is swallowed.
    g.iommu
        .page_response(request.prg_index, PageResponseCode::Success);
    let ext = g.dsa.extended_capabilities();
    assert_eq!(
        g.cfg_read16(ext.pri + 6) & 3,
        0,
        "not an unexpected PRG index"
    );
    g.iommu.page_response(300, PageResponseCode::Success);
    assert_eq!(
        g.cfg_read16(ext.pri + 6) & 3,
        2,
        "UPRGI for an unknown index"
    );
    g.cfg_write16(ext.pri + 6, 2);
    assert_eq!(g.cfg_read16(ext.pri + 6) & 3, 0, "write-1-to-clear");
    // The WQ still works, and Reset WQ of a busy WQ abandons its work.
    g.fill(0x3020, &[0; 32]);
    let mut after = noop(0x3020);
    after.set_pasid(7, false);
    assert_eq!(
        g.submit(1, true, &after, StoreKind::Enqcmds),
        StoreReply::Accepted
    );
    assert_eq!(g.wait_cr(0x3020)[0], 1);
    let (_, blocked) = block_engine(&mut g, &mock, 1, StoreKind::Enqcmds);
    assert_eq!(g.command(10, 0b10), 0, "RESET_WQ 1");
    assert_eq!(g.read32(g.wqcfg(1, 6)), 0, "disabled");
    assert_eq!(g.read32(g.wqcfg(1, 0)), 16, "size kept");
    assert_eq!(g.bytes(blocked, 1)[0], 0);
}

#[test]
fn dropping_the_device_ends_blocked_work_and_commands() {
    let (mut g, mock) = guest();
    let _ = block_engine(&mut g, &mock, 0, StoreKind::Movdir64b);
    // A Drain WQ command now waits for the blocked descriptor...
    g.write32(offset::CMD, (8 << 20) | 1 | (1 << 31));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(g.read32(offset::CMDSTS), 1 << 31);
    // ...and dropping the device (VM shutdown) does not hang.
    drop(g);
}
