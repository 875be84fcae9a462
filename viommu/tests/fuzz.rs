// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Guest-programmed garbage never panics the unit.

mod common;

use common::*;
use proptest::prelude::*;
use viommu::regs::*;
use viommu::{AccessType, PageRequest, PasidTag};
use vm_memory::{Bytes, GuestAddress};

#[derive(Clone, Debug)]
enum Op {
    Write {
        offset: u64,
        value: u64,
        wide: bool,
    },
    Read {
        offset: u64,
        wide: bool,
    },
    Poke {
        addr: u64,
        value: u64,
    },
    Translate {
        rid: u16,
        pasid: Option<(u32, bool)>,
        iova: u64,
        write: bool,
    },
    Ats {
        rid: u16,
        iova: u64,
    },
    PageRequest {
        rid: u16,
        pasid: u32,
        addr: u64,
        lpig: bool,
    },
}

/// Offsets near real registers, plus anything in the window.
fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        prop::sample::select(GARBAGE_TARGETS.to_vec()),
        (0u64..REG_WINDOW_SIZE / 4).prop_map(|i| i * 4),
    ]
}

/// Values that are often small addresses inside the test memory.
fn value() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        (0u64..MEM_SIZE).prop_map(|a| a & !0xfff),
        (0u64..MEM_SIZE).prop_map(|a| (a & !0xfff) | (1 << 10)),
        (0u64..0x1000).prop_map(|a| a << 5),
        Just(u64::from(gcmd::TE | gcmd::SRTP | gcmd::QIE)),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (offset(), value(), any::<bool>())
            .prop_map(|(offset, value, wide)| Op::Write { offset, value, wide }),
        1 => (offset(), any::<bool>()).prop_map(|(offset, wide)| Op::Read { offset, wide }),
        3 => ((0u64..MEM_SIZE / 8).prop_map(|a| a * 8), value())
            .prop_map(|(addr, value)| Op::Poke { addr, value }),
        3 => (any::<u16>(), proptest::option::of((0u32..(1 << 20), any::<bool>())), any::<u64>(), any::<bool>())
            .prop_map(|(rid, pasid, iova, write)| Op::Translate { rid, pasid, iova, write }),
        1 => (any::<u16>(), any::<u64>()).prop_map(|(rid, iova)| Op::Ats { rid, iova }),
        1 => (any::<u16>(), 0u32..(1 << 20), any::<u64>(), any::<bool>())
            .prop_map(|(rid, pasid, addr, lpig)| Op::PageRequest { rid, pasid, addr, lpig }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn garbage_never_panics(ops in proptest::collection::vec(op(), 1..120), init: bool) {
        let g = if init { Guest::new() } else { Guest::bare() };
        for op in ops {
            match op {
                Op::Write { offset, value, wide } => {
                    if wide {
                        g.iommu.mmio_write(offset & !7, &value.to_le_bytes());
                    } else {
                        g.iommu.mmio_write(offset, &(value as u32).to_le_bytes());
                    }
                }
                Op::Read { offset, wide } => {
                    let mut b = [0u8; 8];
                    let len = if wide { 8 } else { 4 };
                    g.iommu.mmio_read(offset & !(len as u64 - 1), &mut b[..len]);
                }
                Op::Poke { addr, value } => {
                    g.mem.write_obj(value, GuestAddress(addr)).unwrap();
                }
                Op::Translate { rid, pasid, iova, write } => {
                    let rid = PciAddress::from_rid(rid);
                    let tag = pasid.map(|(pasid, privileged)| PasidTag { pasid, privileged });
                    let access = AccessType { write, user: false, execute: false };
                    let _ = g.iommu.translate(rid, tag, iova, access);
                    let mut buf = [0u8; 64];
                    let _ = g.iommu.dma_read(rid, tag, iova, &mut buf);
                }
                Op::Ats { rid, iova } => {
                    let rid = PciAddress::from_rid(rid);
                    let _ = g.iommu.ats_translate(rid, None, iova, AccessType::READ);
                }
                Op::PageRequest { rid, pasid, addr, lpig } => {
                    let rid = PciAddress::from_rid(rid);
                    let _ = g.iommu.page_request(&PageRequest {
                        requester_id: rid,
                        pasid: Some(PasidTag { pasid, privileged: false }),
                        address: addr,
                        read: true,
                        write: false,
                        execute: false,
                        last_in_group: lpig,
                        prg_index: 1,
                        private_data: None,
                    });
                }
            }
        }
        // CAP/ECAP survive anything.
        prop_assert_eq!(g.read64(CAP), CAP_VALUE);
        prop_assert_eq!(g.read64(ECAP), ECAP_VALUE);
    }
}
