// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Page request queue (VT-d 7.5): page requests (PCIe PRI) from devices are written as
//! 32-byte descriptors into a ring in guest memory, with PQH/PQT/PQA/PRS registers and the
//! page request event.

use pci::PciAddress;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::device::PasidTag;
use crate::interrupt::{EventInterrupt, Msi};
use crate::regs::{pqa, prs, PQ_OFFSET_MASK};

/// A page request (PCIe Page Request Message) from a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Requester ID.
    pub requester_id: PciAddress,
    /// PASID prefix of the request, if any.
    pub pasid: Option<PasidTag>,
    /// Page address (bits 11:0 ignored).
    pub address: u64,
    /// Read access requested.
    pub read: bool,
    /// Write access requested.
    pub write: bool,
    /// Execute access requested.
    pub execute: bool,
    /// Last request in its page request group (LPIG).
    pub last_in_group: bool,
    /// Page request group index (9 bits).
    pub prg_index: u16,
    /// Private data, echoed back in the response.
    pub private_data: Option<[u64; 2]>,
}

/// Descriptor type of a page request in the queue.
pub const PAGE_REQUEST_TYPE: u64 = 1;

impl PageRequest {
    /// The 32-byte page request descriptor.
    pub fn encode(&self) -> [u64; 4] {
        let mut qw0 = PAGE_REQUEST_TYPE | (u64::from(self.requester_id.rid()) << 16);
        if let Some(tag) = self.pasid {
            qw0 |= (1 << 8) | (u64::from(tag.pasid & pasid::PASID_MASK) << 32);
            if tag.privileged {
                qw0 |= 1 << 53;
            }
            if self.execute {
                qw0 |= 1 << 52;
            }
        }
        if self.private_data.is_some() {
            qw0 |= 1 << 9;
        }
        let qw1 = (self.address & !0xfff)
            | (u64::from(self.prg_index & 0x1ff) << 3)
            | (u64::from(self.last_in_group) << 2)
            | (u64::from(self.write) << 1)
            | u64::from(self.read);
        let [qw2, qw3] = self.private_data.unwrap_or([0, 0]);
        [qw0, qw1, qw2, qw3]
    }

    /// Whether software (or the unit, when it drops the request) owes the device a page group
    /// response: last request of a group or private data present. A stop marker (last, no
    /// read/write) needs none.
    pub fn needs_response(&self) -> bool {
        (self.last_in_group || self.private_data.is_some()) && (self.read || self.write)
    }
}

/// Result of posting a page request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PostOutcome {
    /// Written to the queue.
    Queued,
    /// The queue was full: PRO set, request discarded.
    Overflow,
    /// The queue is not set up (PQA=0) or its memory is not guest RAM: request discarded.
    Unavailable,
}

/// Page request queue registers and event.
#[derive(Clone, Debug, Default)]
pub struct PageRequestQueue {
    /// PQA value.
    pub pqa: u64,
    /// PQH: byte offset of the oldest unprocessed descriptor (written by software).
    pub head: u64,
    /// PQT: byte offset where the next descriptor goes.
    pub tail: u64,
    /// PRS bits (PPR, PRO).
    pub status: u32,
    /// Page request event interrupt.
    pub event: EventInterrupt,
}

impl PageRequestQueue {
    /// Queue size in bytes.
    pub fn size(&self) -> u64 {
        0x1000 << pqa::pqs(self.pqa)
    }

    /// Write PQH.
    pub fn set_head(&mut self, value: u64) {
        self.head = value & PQ_OFFSET_MASK;
    }

    /// Write PQT.
    pub fn set_tail(&mut self, value: u64) {
        self.tail = value & PQ_OFFSET_MASK;
    }

    /// Write PQA.
    pub fn set_address(&mut self, value: u64) {
        self.pqa = value & pqa::WRITABLE;
    }

    /// Software wrote PRS: PPR and PRO are RW1C. Returns true if no condition is left, so a
    /// pending event can be forgotten.
    pub fn write_status(&mut self, value: u32) -> bool {
        self.status &= !(value & (prs::PPR | prs::PRO));
        self.status == 0
    }

    /// Append a descriptor; returns the outcome and the event MSI to send, if any.
    pub fn post<M: GuestMemory + ?Sized>(
        &mut self,
        mem: &M,
        descriptor: &[u64; 4],
    ) -> (PostOutcome, Option<Msi>) {
        let base = self.pqa & pqa::BASE_MASK;
        if base == 0 {
            return (PostOutcome::Unavailable, None);
        }
        let size = self.size();
        let tail = self.tail % size;
        let next = (tail + 32) % size;
        if next == self.head % size {
            let first = self.status & prs::PRO == 0;
            self.status |= prs::PRO;
            let msi = if first { self.event.raise() } else { None };
            return (PostOutcome::Overflow, msi);
        }
        if mem
            .write_obj(*descriptor, GuestAddress(base + tail))
            .is_err()
        {
            return (PostOutcome::Unavailable, None);
        }
        self.tail = next;
        let first = self.status & prs::PPR == 0;
        self.status |= prs::PPR;
        let msi = if first { self.event.raise() } else { None };
        (PostOutcome::Queued, msi)
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    fn request(prg: u16) -> PageRequest {
        PageRequest {
            requester_id: PciAddress::from_rid(0x0810),
            pasid: Some(PasidTag {
                pasid: 7,
                privileged: false,
            }),
            address: 0x7fff_1234_5678,
            read: true,
            write: true,
            execute: false,
            last_in_group: true,
            prg_index: prg,
            private_data: None,
        }
    }

    #[test]
    fn descriptor_layout_matches_linux_page_req_dsc() {
        let [qw0, qw1, qw2, qw3] = request(0x1ab).encode();
        assert_eq!(qw0 & 0xff, 1, "type");
        assert_eq!((qw0 >> 8) & 1, 1, "pasid_present");
        assert_eq!((qw0 >> 16) & 0xffff, 0x0810, "rid");
        assert_eq!((qw0 >> 32) & 0xf_ffff, 7, "pasid");
        assert_eq!((qw0 >> 52) & 3, 0, "exe/pm");
        assert_eq!(qw1 & 7, 0b111, "rd, wr, lpig");
        assert_eq!((qw1 >> 3) & 0x1ff, 0x1ab, "prg_index");
        assert_eq!(qw1 & !0xfff, 0x7fff_1234_5000, "addr");
        assert_eq!((qw2, qw3), (0, 0));
    }

    #[test]
    fn queue_fills_up_and_overflows() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut q = PageRequestQueue::default();
        assert_eq!(
            q.post(&mem, &request(0).encode()).0,
            PostOutcome::Unavailable
        );
        q.set_address(0x8000); // one page: 128 slots, 127 usable
        q.event.write(0, 0); // unmask
        let (outcome, msi) = q.post(&mem, &request(0).encode());
        assert_eq!(outcome, PostOutcome::Queued);
        assert!(msi.is_some(), "PPR 0->1 raises the event");
        assert_eq!(
            q.post(&mem, &request(1).encode()),
            (PostOutcome::Queued, None)
        );
        for i in 2..127 {
            assert_eq!(q.post(&mem, &request(i).encode()).0, PostOutcome::Queued);
        }
        assert_eq!(q.tail, 127 * 32);
        let (outcome, msi) = q.post(&mem, &request(200).encode());
        assert_eq!(outcome, PostOutcome::Overflow);
        assert!(msi.is_some(), "PRO 0->1 raises the event");
        assert_eq!(q.status, prs::PPR | prs::PRO);
        // The descriptor in the last slot is request 126.
        let qw1: u64 = mem.read_obj(GuestAddress(0x8000 + 126 * 32 + 8)).unwrap();
        assert_eq!((qw1 >> 3) & 0x1ff, 126);
        // Software consumes everything; the queue wraps.
        q.set_head(127 * 32);
        assert!(!q.write_status(prs::PPR));
        assert!(q.write_status(prs::PRO));
        assert_eq!(q.post(&mem, &request(5).encode()).0, PostOutcome::Queued);
        assert_eq!(q.tail, 0);
    }
}
