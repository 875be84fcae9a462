//! Every operation on known vectors, batches, fences, page faults with and
//! without block-on-fault, and the device TLB.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::*;
use vdsa::descriptor::{flags, Descriptor, Opcode};
use vdsa::dma::{AddressSpace, MockIommu, PageResponseCode};

const RESULT: u32 = flags::CRAV | flags::RCR;

/// WQ 0: dedicated, block-on-fault enabled, group 0. WQ 1: shared, group 1.
/// PASID, PRI and ATS enabled.
fn guest_with(ats: bool) -> (Guest, Arc<MockIommu>) {
    Guest::with_wqs(
        ats,
        &[
            WqSpec {
                bof: true,
                ..WqSpec::dedicated(0, 0)
            },
            WqSpec::shared(1, 1),
        ],
    )
}

fn guest() -> (Guest, Arc<MockIommu>) {
    guest_with(false)
}

static NEXT_CR: AtomicU64 = AtomicU64::new(0);

/// A fresh, zeroed completion record slot.
fn cr_slot(g: &Guest) -> u64 {
    let addr = 0x1000 + (NEXT_CR.fetch_add(1, Ordering::SeqCst) % 1000) * 32;
    g.fill(addr, &[0; 32]);
    addr
}

/// Runs `desc` on the dedicated WQ with a fresh completion record.
fn run(g: &mut Guest, mut desc: Descriptor) -> [u8; 32] {
    let cr = cr_slot(g);
    desc.set_completion_addr(cr);
    g.movdir64b(0, &desc);
    g.wait_cr(cr)
}

fn op(opcode: Opcode, extra: u32) -> Descriptor {
    Descriptor::new(opcode, RESULT | extra)
}

fn success() -> [u8; 32] {
    let mut cr = [0u8; 32];
    cr[0] = 1;
    cr
}

#[test]
fn noop_and_cache_flush() {
    let (mut g, _) = guest();
    assert_eq!(run(&mut g, op(Opcode::Noop, 0)), success());
    let mut d = op(Opcode::Cflush, 0);
    d.set_dst(0x40_0000).set_xfer_size(8192);
    assert_eq!(run(&mut g, d), success());
}

#[test]
fn memmove_and_fill() {
    let (mut g, _) = guest();
    let data = pattern(1 << 20, 7);
    g.fill(0x10_0000, &data);
    let mut d = op(Opcode::Memmove, 0);
    d.set_src(0x10_0000)
        .set_dst(0x30_0001)
        .set_xfer_size(1 << 20);
    assert_eq!(run(&mut g, d), success());
    assert_eq!(g.bytes(0x30_0001, 1 << 20), data);

    let mut d = op(Opcode::Memfill, 0);
    d.set_src(0x0123_4567_89ab_cdef)
        .set_dst(0x50_0003)
        .set_xfer_size(21);
    assert_eq!(run(&mut g, d), success());
    assert_eq!(
        g.bytes(0x50_0003, 21),
        [0xef, 0xcd, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01].repeat(3)[..21].to_vec()
    );
}

#[test]
fn memmove_overlapping_both_directions() {
    let (mut g, _) = guest();
    for (len, shift) in [
        (10_000usize, 100i64),
        (10_000, -100),
        (200_000, 70_001),
        (200_000, -3),
    ] {
        let data = pattern(len + 160_000, len as u32);
        let base = 0x40_0000u64;
        g.fill(base, &data);
        let src = base + 75_000;
        let dst = (src as i64 + shift) as u64;
        let mut d = op(Opcode::Memmove, 0);
        d.set_src(src).set_dst(dst).set_xfer_size(len as u32);
        assert_eq!(run(&mut g, d), success(), "len {len} shift {shift}");
        let mut expected = data.clone();
        let from = (src - base) as usize;
        let to = (dst - base) as usize;
        expected.copy_within(from..from + len, to);
        assert_eq!(
            g.bytes(base, data.len()),
            expected,
            "len {len} shift {shift}"
        );
    }
}

#[test]
fn compare_and_compare_pattern() {
    let (mut g, _) = guest();
    let data = pattern(5000, 3);
    g.fill(0x10_0000, &data);
    g.fill(0x20_0000, &data);
    let mut d = op(Opcode::Compare, 0);
    d.set_src(0x10_0000).set_dst(0x20_0000).set_xfer_size(5000);
    assert_eq!(run(&mut g, d), success(), "equal: result 0");
    g.fill(0x20_0000 + 777, &[!data[777]]);
    let cr = run(&mut g, d);
    assert_eq!(
        (cr[0], cr[1], u32_at(&cr, 4)),
        (1, 1, 777),
        "different at 777"
    );
    // Check Result: expected 0 (equal) but different -> false predicate.
    let mut checked = op(Opcode::Compare, flags::CR);
    checked
        .set_src(0x10_0000)
        .set_dst(0x20_0000)
        .set_xfer_size(5000);
    assert_eq!(run(&mut g, checked)[0], 2);
    checked.0[40] = 1;
    assert_eq!(run(&mut g, checked)[0], 1, "expected different");

    g.fill(0x30_0000, &[0x5a; 64]);
    g.fill(0x30_0000 + 13, &[0]);
    let mut d = op(Opcode::Compval, 0);
    d.set_src(0x30_0000)
        .set_dst(0x5a5a_5a5a_5a5a_5a5a)
        .set_xfer_size(13);
    assert_eq!(run(&mut g, d), success());
    d.set_xfer_size(64);
    let cr = run(&mut g, d);
    assert_eq!((cr[0], cr[1], u32_at(&cr, 4)), (1, 1, 13));
}

#[test]
fn create_and_apply_delta_record() {
    let (mut g, _) = guest();
    let original = pattern(4096, 11);
    let mut modified = original.clone();
    for word in [3usize, 100, 511] {
        modified[word * 8] ^= 0xff;
    }
    g.fill(0x10_0000, &original);
    g.fill(0x20_0000, &modified);
    let mut d = op(Opcode::CrDelta, 0);
    d.set_src(0x10_0000).set_dst(0x20_0000).set_xfer_size(4096);
    d.set_u64(40, 0x30_0000).set_u32(48, 80);
    let cr = run(&mut g, d);
    assert_eq!(
        (cr[0], cr[1], u32_at(&cr, 4), u32_at(&cr, 16)),
        (1, 1, 0, 30)
    );
    let mut expected = Vec::new();
    for word in [3u16, 100, 511] {
        expected.extend_from_slice(&word.to_le_bytes());
        expected.extend_from_slice(&modified[usize::from(word) * 8..usize::from(word) * 8 + 8]);
    }
    assert_eq!(g.bytes(0x30_0000, 30), expected);

    g.fill(0x40_0000, &original);
    let mut a = op(Opcode::ApDelta, 0);
    a.set_src(0x30_0000)
        .set_dst(0x40_0000)
        .set_xfer_size(4096)
        .set_u32(40, 30);
    assert_eq!(run(&mut g, a), success());
    assert_eq!(g.bytes(0x40_0000, 4096), modified);

    // Equal sources: result 0, no deltas; with Check Result and mask 0b010
    // (only "different" expected), a false predicate.
    let mut same = op(Opcode::CrDelta, flags::CR);
    same.set_src(0x10_0000)
        .set_dst(0x50_0000)
        .set_xfer_size(4096);
    g.fill(0x50_0000, &original);
    same.set_u64(40, 0x30_0000)
        .set_u32(48, 80)
        .set_u32(56, 0b010);
    let cr = run(&mut g, same);
    assert_eq!((cr[0], cr[1], u32_at(&cr, 16)), (2, 0, 0));

    // Ten differences, room for eight: result 2 at the ninth.
    let mut many = original.clone();
    for word in 0..10usize {
        many[word * 16] ^= 1;
    }
    g.fill(0x20_0000, &many);
    let cr = run(&mut g, d);
    assert_eq!(
        (cr[0], cr[1], u32_at(&cr, 4), u32_at(&cr, 16)),
        (1, 2, 8 * 16, 80)
    );

    // Apply with offsets out of order, and beyond the transfer size.
    let mut bad = Vec::new();
    for word in [5u16, 2] {
        bad.extend_from_slice(&word.to_le_bytes());
        bad.extend_from_slice(&[0xee; 8]);
    }
    g.fill(0x60_0000, &bad);
    a.set_src(0x60_0000).set_u32(40, 20);
    let cr = run(&mut g, a);
    assert_eq!((cr[0], u32_at(&cr, 4)), (7, 10));
    a.set_xfer_size(40);
    let cr = run(&mut g, a);
    assert_eq!((cr[0], u32_at(&cr, 4)), (8, 0));
}

#[test]
fn dualcast() {
    let (mut g, _) = guest();
    let data = pattern(10_000, 5);
    g.fill(0x10_0000, &data);
    let mut d = op(Opcode::Dualcast, 0);
    d.set_src(0x10_0000)
        .set_dst(0x20_0123)
        .set_xfer_size(10_000)
        .set_u64(40, 0x40_0123);
    assert_eq!(run(&mut g, d), success());
    assert_eq!(g.bytes(0x20_0123, 10_000), data);
    assert_eq!(g.bytes(0x40_0123, 10_000), data);
    d.set_u64(40, 0x40_0124);
    assert_eq!(run(&mut g, d)[0], 0x17, "destinations differ in bits 11:0");
}

#[test]
fn crc_generation() {
    let (mut g, _) = guest();
    g.fill(0x10_0000, b"123456789");
    let mut d = op(Opcode::Crcgen, 0);
    d.set_src(0x10_0000).set_xfer_size(9);
    let cr = run(&mut g, d);
    assert_eq!(
        (cr[0], u32_at(&cr, 16)),
        (1, 0xe306_9283),
        "CRC-32C check value"
    );

    let data = pattern(100_000, 9);
    g.fill(0x20_0000, &data);
    d.set_src(0x20_0000)
        .set_xfer_size(100_000)
        .set_u32(40, 0x1234_5678);
    assert_eq!(
        u32_at(&run(&mut g, d), 16),
        crc32c::crc32c_append(0x1234_5678, &data)
    );

    // The seed read from memory (accel-config's READ_CRC_SEED test).
    g.fill(0x30_0000, &0x1234_5678u32.to_le_bytes());
    let mut from_memory = op(Opcode::Crcgen, flags::CRC_READ_SEED);
    from_memory
        .set_src(0x20_0000)
        .set_xfer_size(100_000)
        .set_u64(48, 0x30_0000);
    assert_eq!(
        u32_at(&run(&mut g, from_memory), 16),
        crc32c::crc32c_append(0x1234_5678, &data)
    );
    from_memory.set_u64(48, 0x30_0002);
    assert_eq!(
        run(&mut g, from_memory)[0],
        0x1c,
        "seed address must be 4-byte aligned"
    );

    let mut copy = op(Opcode::CopyCrc, 0);
    copy.set_src(0x20_0000)
        .set_dst(0x40_0000)
        .set_xfer_size(100_000);
    let cr = run(&mut g, copy);
    assert_eq!((cr[0], u32_at(&cr, 16)), (1, crc32c::crc32c(&data)));
    assert_eq!(g.bytes(0x40_0000, 100_000), data);
    copy.set_dst(0x20_0000 + 50_000);
    assert_eq!(run(&mut g, copy)[0], 0x16, "overlapping copy with CRC");
}

/// A batch whose descriptor list is at `list`, with completion records at
/// `crs + 32 * i`.
fn batch(g: &mut Guest, list: u64, members: &[Descriptor], crs: u64) -> [u8; 32] {
    let mut bytes = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let mut m = *m;
        if m.has(flags::CRAV) {
            m.set_completion_addr(crs + 32 * i as u64);
        }
        bytes.extend_from_slice(&m.0);
    }
    g.fill(list, &bytes);
    g.fill(crs, &vec![0; 32 * members.len()]);
    let mut b = op(Opcode::Batch, 0);
    b.set_src(list).set_xfer_size(members.len() as u32);
    run(g, b)
}

#[test]
fn batch_with_one_failing_member() {
    let (mut g, _) = guest();
    let data = pattern(4096, 2);
    g.fill(0x10_0000, &data);
    let mut copy = op(Opcode::Memmove, 0);
    copy.set_src(0x10_0000)
        .set_dst(0x20_0000)
        .set_xfer_size(4096);
    let mut broken = copy;
    broken.0[50] = 1;
    let members = [op(Opcode::Noop, 0), copy, broken, op(Opcode::Noop, 0)];
    let cr = batch(&mut g, 0x8_0000, &members, 0x9_0000);
    assert_eq!(
        (cr[0], u32_at(&cr, 4)),
        (5, 4),
        "batch fail, all four processed"
    );
    let statuses: Vec<u8> = (0..4).map(|i| g.bytes(0x9_0000 + 32 * i, 1)[0]).collect();
    assert_eq!(statuses, [1, 1, 0x12, 1]);
    assert_eq!(g.bytes(0x20_0000, 4096), data);

    // Batch limits.
    let mut b = op(Opcode::Batch, 0);
    b.set_src(0x8_0000).set_xfer_size(1);
    assert_eq!(run(&mut g, b)[0], 0x14, "a batch needs two descriptors");
    b.set_xfer_size(1025);
    assert_eq!(
        run(&mut g, b)[0],
        0x14,
        "more than the WQ maximum batch size"
    );
    b.set_src(0x8_0020).set_xfer_size(2);
    assert_eq!(
        run(&mut g, b)[0],
        0x18,
        "descriptor list not 64-byte aligned"
    );
    // Batch and Drain are not allowed inside a batch.
    let cr = batch(
        &mut g,
        0x8_0000,
        &[op(Opcode::Batch, 0), op(Opcode::Drain, 0)],
        0x9_0000,
    );
    assert_eq!(cr[0], 5);
    assert_eq!(
        (g.bytes(0x9_0000, 1)[0], g.bytes(0x9_0020, 1)[0]),
        (0x10, 0x10)
    );
}

#[test]
fn fence_orders_batch_members() {
    let (mut g, _) = guest();
    let data = pattern(256 << 10, 4);
    g.fill(0x10_0000, &data);
    let mut first = op(Opcode::Memmove, 0);
    first
        .set_src(0x10_0000)
        .set_dst(0x20_0000)
        .set_xfer_size(256 << 10);
    let mut second = op(Opcode::Memmove, flags::FENCE);
    second
        .set_src(0x20_0000)
        .set_dst(0x30_0000)
        .set_xfer_size(256 << 10);
    let cr = batch(&mut g, 0x8_0000, &[first, second], 0x9_0000);
    assert_eq!((cr[0], u32_at(&cr, 4)), (1, 2));
    assert_eq!(
        g.bytes(0x30_0000, 256 << 10),
        data,
        "the fenced copy saw the first"
    );

    // A fence after a false predicate abandons the rest of the batch.
    g.fill(0x40_0000, &[1; 64]);
    g.fill(0x50_0000, &[2; 64]);
    let mut check = op(Opcode::Compare, flags::CR);
    check
        .set_src(0x40_0000)
        .set_dst(0x50_0000)
        .set_xfer_size(64);
    let fenced = op(Opcode::Noop, flags::FENCE);
    let cr = batch(
        &mut g,
        0x8_0000,
        &[check, fenced, op(Opcode::Noop, 0)],
        0x9_0000,
    );
    assert_eq!(
        (cr[0], u32_at(&cr, 4)),
        (5, 1),
        "one processed, two abandoned"
    );
    assert_eq!(g.bytes(0x9_0000, 1)[0], 2);
    assert_eq!(
        g.bytes(0x9_0020, 64),
        vec![0; 64],
        "abandoned members write nothing"
    );
}

#[test]
fn page_fault_without_block_on_fault() {
    let (mut g, mock) = guest();
    g.fill(0x10_0000, &pattern(16384, 1));
    mock.fault_page(0x20_2000);
    let mut d = op(Opcode::Memmove, 0);
    d.set_src(0x10_0000).set_dst(0x20_0000).set_xfer_size(16384);
    let cr = run(&mut g, d);
    assert_eq!(cr[0], 0x83, "page fault, on a write");
    assert_eq!(u32_at(&cr, 4), 0x2000, "bytes completed");
    assert_eq!(u64_at(&cr, 8), 0x20_2000, "fault address");
    assert_eq!(g.bytes(0x20_0000, 0x2000), pattern(16384, 1)[..0x2000]);
    assert!(mock.take_page_requests().is_empty());

    // Backwards overlapping move faulting on a read: result 1 (direction),
    // bytes completed counted from the end.
    mock.fault_page(0x60_0000);
    let mut back = op(Opcode::Memmove, 0);
    back.set_src(0x60_0000)
        .set_dst(0x60_0100)
        .set_xfer_size(0x3000);
    let cr = run(&mut g, back);
    assert_eq!((cr[0], cr[1], u64_at(&cr, 8)), (3, 1, 0x60_0000));
    assert_eq!(u32_at(&cr, 4) % 0x1000, 0, "whole chunks from the end");

    // A compare finds the difference before the fault.
    mock.fault_page(0x70_1000);
    g.fill(0x70_0000, &[1; 0x1000]);
    g.fill(0x71_0000, &[1; 0x1000]);
    g.fill(0x71_0010, &[2]);
    let mut c = op(Opcode::Compare, 0);
    c.set_src(0x70_0000)
        .set_dst(0x71_0000)
        .set_xfer_size(0x2000);
    let cr = run(&mut g, c);
    assert_eq!((cr[0], cr[1], u32_at(&cr, 4)), (1, 1, 0x10));
    g.fill(0x71_0010, &[1]);
    let cr = run(&mut g, c);
    assert_eq!(
        (cr[0], cr[1], u32_at(&cr, 4), u64_at(&cr, 8)),
        (3, 0, 0x1000, 0x70_1000)
    );

    // A partial CRC continues from its reported value.
    g.fill(0x72_0000, &pattern(0x2000, 8));
    mock.fault_page(0x72_1000);
    let mut crc = op(Opcode::Crcgen, 0);
    crc.set_src(0x72_0000).set_xfer_size(0x2000);
    let cr = run(&mut g, crc);
    assert_eq!((cr[0], u32_at(&cr, 4)), (3, 0x1000));
    mock.resolve_page(0x72_1000);
    crc.set_src(0x72_1000)
        .set_xfer_size(0x1000)
        .set_u32(40, u32_at(&cr, 16));
    assert_eq!(
        u32_at(&run(&mut g, crc), 16),
        crc32c::crc32c(&pattern(0x2000, 8))
    );
}

#[test]
fn block_on_fault_resumes_after_page_response() {
    let (mut g, mock) = guest();
    let data = pattern(16384, 21);
    g.fill(0x10_0000, &data);
    mock.fault_page(0x20_1000);
    let mut d = op(Opcode::Memmove, flags::BOF);
    d.set_src(0x10_0000).set_dst(0x20_0000).set_xfer_size(16384);
    let cr = cr_slot(&g);
    d.set_completion_addr(cr);
    g.movdir64b(0, &d);
    let request = mock.wait_page_request(TIMEOUT).expect("a page request");
    assert_eq!(
        (
            request.pasid,
            request.addr,
            request.read,
            request.write,
            request.last
        ),
        (None, 0x20_1000, false, true, true)
    );
    assert_eq!(g.bytes(cr, 1)[0], 0, "still blocked");
    mock.resolve_page(0x20_1000);
    g.iommu
        .page_response(request.prg_index, PageResponseCode::Success);
    assert_eq!(g.wait_cr(cr), success());
    assert_eq!(g.bytes(0x20_0000, 16384), data);

    // An Invalid Request response completes with status 0x04.
    mock.fault_page(0x40_1000);
    d.set_dst(0x40_0000);
    let cr = cr_slot(&g);
    d.set_completion_addr(cr);
    g.movdir64b(0, &d);
    let request = mock.wait_page_request(TIMEOUT).expect("a page request");
    g.iommu
        .page_response(request.prg_index, PageResponseCode::InvalidRequest);
    let record = g.wait_cr(cr);
    assert_eq!(
        (record[0], u32_at(&record, 4), u64_at(&record, 8)),
        (0x84, 0x1000, 0x40_1000)
    );

    // Without the flag, the same WQ reports the fault.
    let mut no_bof = d;
    no_bof.set_u32(4, d.u32_at(4) & !flags::BOF);
    assert_eq!(run(&mut g, no_bof)[0], 0x83);
    // The flag on a WQ without block-on-fault is invalid.
    let cr = cr_slot(&g);
    let mut swq = d;
    swq.set_completion_addr(cr).set_pasid(1, false);
    assert_eq!(
        g.submit(1, true, &swq, bus::StoreKind::Enqcmds),
        bus::StoreReply::Accepted
    );
    let record = g.wait_cr(cr);
    assert_eq!((record[0], u32_at(&record, 16)), (0x11, flags::BOF));
}

#[test]
fn completion_record_fault_goes_to_swerror() {
    let (mut g, mock) = guest();
    mock.fault_page(0x7000);
    let mut d = op(Opcode::Noop, 0);
    d.set_completion_addr(0x7040);
    g.movdir64b(0, &d);
    // Completion records always block on fault when PRI is on.
    let request = mock
        .wait_page_request(TIMEOUT)
        .expect("a page request for the record");
    assert_eq!((request.addr, request.write), (0x7000, true));
    g.iommu
        .page_response(request.prg_index, PageResponseCode::InvalidRequest);
    let err = g.wait_swerr();
    assert_eq!(
        err[0] & 0xff_ff2f,
        0x00_1a2d,
        "code 0x1a, write fault, WQ 0, descriptor valid"
    );
    assert_eq!(err[2], 0x7040, "the record address");
}

#[test]
fn batch_descriptor_list_fault() {
    let (mut g, mock) = guest();
    // Without PRI the list fault completes the batch with status 0x06.
    let ext = g.dsa.extended_capabilities();
    g.cfg_write16(ext.pri + 4, 0);
    let members = [op(Opcode::Noop, 0); 4];
    let mut list = Vec::new();
    for (i, m) in members.iter().enumerate() {
        let mut m = *m;
        m.set_completion_addr(0x9_0000 + 32 * i as u64);
        list.extend_from_slice(&m.0);
    }
    g.fill(0xa_0f80, &list);
    mock.fault_page(0xa_1000);
    let mut b = op(Opcode::Batch, 0);
    b.set_src(0xa_0f80).set_xfer_size(4);
    let cr = run(&mut g, b);
    assert_eq!((cr[0], u32_at(&cr, 4), u64_at(&cr, 8)), (6, 2, 0xa_1000));
}

#[test]
fn ats_translations_are_cached_until_invalidated() {
    let (mut g, mock) = guest_with(true);
    let a = pattern(8192, 1);
    let b = pattern(8192, 2);
    g.fill(0x10_0000, &a);
    g.fill(0x50_0000, &b);
    let mut d = op(Opcode::Memmove, 0);
    d.set_src(0x10_0000).set_dst(0x20_0000).set_xfer_size(8192);
    assert_eq!(run(&mut g, d), success());
    let after_first = mock.translations();
    assert!(after_first >= 4, "source and destination pages translated");
    assert_eq!(run(&mut g, d), success());
    assert_eq!(
        mock.translations(),
        after_first,
        "served from the device TLB"
    );
    // Remap the source: the stale translation is still used...
    mock.remap_page(0x10_0000, 0x50_0000);
    mock.remap_page(0x10_1000, 0x50_1000);
    assert_eq!(run(&mut g, d), success());
    assert_eq!(g.bytes(0x20_0000, 8192), a);
    // ...until the IOMMU invalidates it.
    g.iommu.invalidate_device_tlb(None, 0x10_0000, 0x2000);
    assert_eq!(run(&mut g, d), success());
    assert_eq!(g.bytes(0x20_0000, 8192), b);
    assert_eq!(mock.translations(), after_first + 2);
    assert!(mock.spaces().contains(&AddressSpace::Translated));
    // Turning ATS off empties the device TLB.
    let ext = g.dsa.extended_capabilities();
    assert!(g.iommu.cached_translations() > 0);
    g.cfg_write16(ext.ats + 6, 0);
    assert_eq!(g.iommu.cached_translations(), 0);
}

#[test]
fn translation_errors_and_unmapped_addresses() {
    let (mut g, mock) = guest();
    mock.refuse_page(0x20_1000);
    let mut d = op(Opcode::Memmove, flags::BOF);
    d.set_src(0x10_0000)
        .set_dst(0x20_0000)
        .set_xfer_size(0x2000);
    let cr = run(&mut g, d);
    assert_eq!(
        (cr[0], u32_at(&cr, 4), u64_at(&cr, 8)),
        (0x22, 0x1000, 0x20_1000),
        "no page request can help"
    );
    assert!(mock.take_page_requests().is_empty());
    // Past the end of guest RAM: an unsupported request, read or write.
    let beyond = MEM_SIZE as u64;
    d.set_src(beyond - 0x800)
        .set_dst(0x30_0000)
        .set_xfer_size(0x1000);
    let cr = run(&mut g, d);
    assert_eq!(
        (cr[0], u32_at(&cr, 4), u64_at(&cr, 8)),
        (0x20, 0x800, beyond)
    );
    d.set_src(0x30_0000).set_dst(beyond - 0x100);
    let cr = run(&mut g, d);
    assert_eq!(
        (cr[0], u32_at(&cr, 4), u64_at(&cr, 8)),
        (0x21, 0x100, beyond)
    );
}

/// Reference CRC-16/T10-DIF (polynomial 0x8BB7, MSB first), bit by bit.
fn crc16_t10dif_bitwise(seed: u16, data: &[u8]) -> u16 {
    let mut crc = seed;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x8bb7
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The 8 bytes of T10 protection information, big-endian.
fn pi(guard: u16, app: u16, reference: u32) -> Vec<u8> {
    let mut b = guard.to_be_bytes().to_vec();
    b.extend_from_slice(&app.to_be_bytes());
    b.extend_from_slice(&reference.to_be_bytes());
    b
}

/// `data` in blocks of `block` bytes, each followed by PI with an
/// incrementing reference tag from `reference`.
fn with_pi(data: &[u8], block: usize, app: u16, reference: u32) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, b) in data.chunks(block).enumerate() {
        out.extend_from_slice(b);
        out.extend(pi(crc16_t10dif_bitwise(0, b), app, reference + i as u32));
    }
    out
}

/// accel-config dsa_test's buffer: the 8-byte pattern 0x0123456789abcdef.
fn dsa_test_pattern(len: usize) -> Vec<u8> {
    0x0123_4567_89ab_cdef_u64
        .to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

const DIF_CHECK_TAGS: usize = 48;

/// A DIF Check/Strip descriptor: block size code `bs`, source tags seeds.
fn dif_source(opcode: Opcode, bs: u8, src: u64, len: u32, app: u16, reference: u32) -> Descriptor {
    let mut d = op(opcode, 0);
    d.set_src(src).set_xfer_size(len);
    d.0[42] = bs;
    d.set_u32(DIF_CHECK_TAGS, reference).set_u16(54, app);
    d
}

#[test]
fn crc16_t10dif_known_vectors() {
    assert_eq!(crc16_t10dif_bitwise(0, b"123456789"), 0xd0db);
    assert_eq!(crc16_t10dif_bitwise(0, &dsa_test_pattern(512)), 0x03c7);
    assert_eq!(crc16_t10dif_bitwise(0, &dsa_test_pattern(4096)), 0xa083);
    assert_eq!(crc16_t10dif_bitwise(0xffff, &[0; 512]) ^ 0xffff, 0x8d44);
    assert_eq!(vdsa::ops::dif::crc16_t10dif(0, b"123456789"), 0xd0db);
}

/// Insert, Check, Strip and Update at every block size, on the guard tags
/// computed here.
#[test]
fn dif_insert_check_strip_update() {
    let (mut g, _) = guest();
    for (bs, block) in [(0u8, 512usize), (1, 520), (2, 4096), (3, 4104)] {
        let blocks = 3;
        let data = pattern(block * blocks, bs.into());
        let protected = with_pi(&data, block, 0xface, 0xabba);
        let len = (block * blocks) as u32;
        g.fill(0x10_0000, &data);

        // Insert: application tag fixed, reference tag incrementing.
        let mut ins = op(Opcode::DifInsert, 0);
        ins.set_src(0x10_0000).set_dst(0x20_0000).set_xfer_size(len);
        ins.0[42] = bs;
        ins.set_u32(56, 0xabba).set_u16(62, 0xface);
        let cr = run(&mut g, ins);
        assert_eq!(cr[0], 1, "insert, block {block}");
        assert_eq!(g.bytes(0x20_0000, protected.len()), protected);
        assert_eq!(
            (u32_at(&cr, 24), u16::from_le_bytes([cr[30], cr[31]])),
            (0xabba + 3, 0xface),
            "insert record: the next block's tags"
        );

        // Check what Insert wrote.
        let plen = protected.len() as u32;
        let check = dif_source(Opcode::DifCheck, bs, 0x20_0000, plen, 0xface, 0xabba);
        let cr = run(&mut g, check);
        assert_eq!(cr[0], 1, "check, block {block}");
        assert_eq!(u32_at(&cr, 16), 0xabba + 3);

        // Strip gives the data back.
        let mut strip = dif_source(Opcode::DifStrip, bs, 0x20_0000, plen, 0xface, 0xabba);
        strip.set_dst(0x30_0000);
        assert_eq!(run(&mut g, strip)[0], 1, "strip, block {block}");
        assert_eq!(g.bytes(0x30_0000, data.len()), data);

        // Update to a fixed reference tag (destination flags bit 7) and a
        // new application tag, as dsa_test's update does with its seeds.
        let mut upd = dif_source(Opcode::DifUpdate, bs, 0x20_0000, plen, 0xface, 0xabba);
        upd.set_dst(0x40_0000);
        upd.0[41] = 0x80;
        upd.set_u32(56, 0x1234_5678).set_u16(62, 0xbeef);
        assert_eq!(run(&mut g, upd)[0], 1, "update, block {block}");
        let mut expected = Vec::new();
        for b in data.chunks(block) {
            expected.extend_from_slice(b);
            expected.extend(pi(crc16_t10dif_bitwise(0, b), 0xbeef, 0x1234_5678));
        }
        assert_eq!(g.bytes(0x40_0000, expected.len()), expected);
    }
}

/// dsa_test's own buffers and guard tags: 0xABBA/0xFACE seeds on its
/// 8-byte pattern.
#[test]
fn dif_check_on_dsa_test_buffers() {
    let (mut g, _) = guest();
    let data = dsa_test_pattern(1024);
    let mut protected = Vec::new();
    for (i, b) in data.chunks(512).enumerate() {
        protected.extend_from_slice(b);
        protected.extend(pi(0x03c7, 0xface, 0xabba + i as u32));
    }
    g.fill(0x10_0000, &protected);
    let check = dif_source(Opcode::DifCheck, 0, 0x10_0000, 1040, 0xface, 0xabba);
    assert_eq!(run(&mut g, check)[0], 1);
}

/// Tag mismatches: DIF error (0x09) with the failing checks in Result and
/// the good blocks in Bytes Completed; the flags that disable checks.
#[test]
fn dif_errors_and_check_flags() {
    let (mut g, _) = guest();
    let data = pattern(512 * 4, 9);
    let good = with_pi(&data, 512, 0x0001, 100);
    let at = |block: usize, byte: usize| 0x10_0000 + (block * 520 + 512 + byte) as u64;
    let check = dif_source(Opcode::DifCheck, 0, 0x10_0000, 2080, 0x0001, 100);
    let status = |g: &mut Guest, d: Descriptor| {
        let cr = run(g, d);
        (cr[0], cr[1], u32_at(&cr, 4), u32_at(&cr, 16))
    };

    g.fill(0x10_0000, &good);
    g.fill(at(2, 0), &[0x00, 0x00]);
    assert_eq!(
        status(&mut g, check),
        (0x09, 0b001, 1040, 102),
        "guard of block 2; record holds block 2's reference tag"
    );
    let mut no_guard = check;
    no_guard.0[40] = 0x20; // Guard Check Disable
    assert_eq!(status(&mut g, no_guard).0, 1);

    g.fill(0x10_0000, &good);
    g.fill(at(1, 4), &0xdead_u32.to_be_bytes());
    assert_eq!(status(&mut g, check), (0x09, 0b100, 520, 101), "ref tag");
    let mut no_ref = check;
    no_ref.0[40] = 0x40; // Reference Tag Check Disable
    assert_eq!(status(&mut g, no_ref).0, 1);

    g.fill(0x10_0000, &good);
    g.fill(at(3, 2), &0x0081_u16.to_be_bytes());
    assert_eq!(status(&mut g, check), (0x09, 0b010, 1560, 103), "app tag");
    let mut masked = check;
    masked.set_u16(52, 0x0080); // application tag mask: bit 7 not checked
    assert_eq!(status(&mut g, masked).0, 1);

    // Application Tag F Detect skips a block whose application tag is
    // 0xFFFF, whatever its guard.
    g.fill(0x10_0000, &good);
    g.fill(at(0, 0), &pi(0, 0xffff, 0));
    assert_eq!(status(&mut g, check).0, 0x09);
    let mut f_detect = check;
    f_detect.0[40] = 0x04;
    assert_eq!(status(&mut g, f_detect).0, 1);
    // All F Detect with its error enabled reports an all-ones PI.
    g.fill(at(0, 0), &[0xff; 8]);
    let mut all_f = check;
    all_f.0[40] = 0x03;
    assert_eq!(status(&mut g, all_f), (0x09, 0b1000, 0, 100));
    all_f.0[40] = 0x02;
    assert_eq!(status(&mut g, all_f).0, 1);

    // Invert CRC Seed and Invert CRC Result (DIF flags bits 2 and 3).
    let zeros = [0u8; 512];
    let mut inverted = zeros.to_vec();
    inverted.extend(pi(0x8d44, 0, 7));
    g.fill(0x50_0000, &inverted);
    let mut inv = dif_source(Opcode::DifCheck, 0b1100, 0x50_0000, 520, 0, 7);
    assert_eq!(status(&mut g, inv).0, 1);
    inv.0[42] = 0;
    assert_eq!(status(&mut g, inv).1, 0b001);

    // Operand checks.
    let mut bad = check;
    bad.set_xfer_size(2079);
    assert_eq!(status(&mut g, bad).0, 0x13, "not whole blocks with PI");
    let mut bad = check;
    bad.0[42] = 0x10;
    assert_eq!(status(&mut g, bad).0, 0x12, "reserved DIF flag");
    let mut bad = check;
    bad.0[41] = 0x80;
    assert_eq!(status(&mut g, bad).0, 0x12, "destination flags in a check");
    let mut overlap = dif_source(Opcode::DifStrip, 0, 0x10_0000, 2080, 1, 100);
    overlap.set_dst(0x10_0100);
    assert_eq!(status(&mut g, overlap).0, 0x16);
}

/// DIF operations in a batch, and a partial completion whose record seeds
/// the rest, as dsa_test resubmits it.
#[test]
fn dif_in_batches_and_partial_completion() {
    let (mut g, mock) = guest();
    let data = pattern(4096 * 2, 3);
    g.fill(0x10_0000, &data);
    let mut ins = op(Opcode::DifInsert, 0);
    ins.set_src(0x10_0000)
        .set_dst(0x20_0000)
        .set_xfer_size(8192);
    ins.0[42] = 2;
    ins.set_u32(56, 0xabba).set_u16(62, 0xface);
    let mut fenced_check = dif_source(Opcode::DifCheck, 2, 0x20_0000, 8208, 0xface, 0xabba);
    fenced_check.set_u32(4, fenced_check.u32_at(4) | flags::FENCE);
    let cr = batch(&mut g, 0x8_0000, &[ins, fenced_check], 0x9_0000);
    assert_eq!(cr[0], 1, "batch");
    assert_eq!((g.bytes(0x9_0000, 1)[0], g.bytes(0x9_0020, 1)[0]), (1, 1));
    assert_eq!(
        g.bytes(0x20_0000, 8208),
        with_pi(&data, 4096, 0xface, 0xabba)
    );

    // Insert faulting inside the second block's destination (which starts
    // at 0x60_0000), without block-on-fault: one block done, the record's
    // tags seed the rest.
    let mut partial = ins;
    partial.set_dst(0x5f_eff8);
    mock.fault_page(0x60_1000);
    let cr = run(&mut g, partial);
    assert_eq!((cr[0], u32_at(&cr, 4)), (0x83, 4096), "one block inserted");
    assert_eq!(u64_at(&cr, 8), 0x60_1000);
    assert_eq!(u32_at(&cr, 24), 0xabba + 1, "next reference tag");
    mock.resolve_page(0x60_1000);
    let mut rest = ins;
    rest.set_src(0x10_1000)
        .set_dst(0x5f_eff8 + 4104)
        .set_xfer_size(4096)
        .set_u32(56, u32_at(&cr, 24));
    assert_eq!(run(&mut g, rest)[0], 1);
    let out = g.bytes(0x5f_eff8, 8208);
    let expected = with_pi(&data, 4096, 0xface, 0xabba);
    let first_difference = out.iter().zip(&expected).position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "resumed insert");
}
