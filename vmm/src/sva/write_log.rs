//! The last writes the guest's devices made through the vIOMMU adapter:
//! where, how long, in which address space. A triple-fault report lists
//! them beside the guest's top-level page table, so a device write that
//! landed on memory the guest no longer gave the device shows up by
//! address. Recording is a few relaxed atomics per write: a racing record
//! may tear one slot, which a diagnostic can afford.

use std::fmt::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};

use pci::PciAddress;
use vdsa::dma::AddressSpace;

/// Writes kept.
const SLOTS: usize = 128;
/// A slot's `len_rid`: the length in bits 0-31, the requester ID above.
const LEN_MASK: u64 = 0xffff_ffff;
const RID_SHIFT: u32 = 32;
/// A slot's `space`: bit 63 for a translated (guest-physical) address, else
/// the PASID + 1 (0: no PASID).
const TRANSLATED: u64 = 1 << 63;

#[derive(Default)]
struct Slot {
    addr: AtomicU64,
    len_rid: AtomicU64,
    space: AtomicU64,
}

/// A ring of the most recent device writes.
pub struct DeviceWriteLog {
    next: AtomicU64,
    slots: [Slot; SLOTS],
}

impl Default for DeviceWriteLog {
    fn default() -> Self {
        Self {
            next: AtomicU64::new(0),
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }
}

/// One recorded write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceWrite {
    /// Order of the write among all recorded (1 = first).
    pub seq: u64,
    pub rid: PciAddress,
    /// A guest-physical address when `translated`, else an address in
    /// `pasid`'s space (or untagged).
    pub addr: u64,
    pub len: u32,
    pub translated: bool,
    pub pasid: Option<u32>,
}

impl DeviceWrite {
    /// Whether a guest-physical write covers any byte of `[gpa, gpa + len)`.
    pub fn hits(&self, gpa: u64, len: u64) -> bool {
        self.translated
            && self.addr < gpa.saturating_add(len)
            && gpa < self.addr.saturating_add(u64::from(self.len))
    }
}

impl fmt::Display for DeviceWrite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} {} ", self.seq, self.rid)?;
        match (self.translated, self.pasid) {
            (true, _) => write!(f, "GPA {:#x}", self.addr)?,
            (false, Some(p)) => write!(f, "PASID {p:#x} address {:#x}", self.addr)?,
            (false, None) => write!(f, "IOVA {:#x}", self.addr)?,
        }
        write!(f, " len {:#x}", self.len)
    }
}

impl DeviceWriteLog {
    /// Records a write of `len` bytes at `addr` in `space` by `rid`.
    pub fn record(&self, rid: PciAddress, space: AddressSpace, addr: u64, len: usize) {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let slot = &self.slots[(n % SLOTS as u64) as usize];
        let space = match space {
            AddressSpace::Translated => TRANSLATED,
            AddressSpace::Untranslated(tag) => tag.map_or(0, |t| u64::from(t.pasid) + 1),
        };
        let len = (len as u64).min(LEN_MASK);
        slot.addr.store(addr, Ordering::Relaxed);
        slot.len_rid
            .store(len | (u64::from(rid.rid()) << RID_SHIFT), Ordering::Relaxed);
        slot.space.store(space, Ordering::Relaxed);
    }

    /// The recorded writes still in the ring, oldest first.
    pub fn recent(&self) -> Vec<DeviceWrite> {
        let end = self.next.load(Ordering::Relaxed);
        let start = end.saturating_sub(SLOTS as u64);
        (start..end)
            .map(|n| {
                let slot = &self.slots[(n % SLOTS as u64) as usize];
                let len_rid = slot.len_rid.load(Ordering::Relaxed);
                let space = slot.space.load(Ordering::Relaxed);
                DeviceWrite {
                    seq: n + 1,
                    rid: PciAddress::from_rid((len_rid >> RID_SHIFT) as u16),
                    addr: slot.addr.load(Ordering::Relaxed),
                    len: (len_rid & LEN_MASK) as u32,
                    translated: space & TRANSLATED != 0,
                    pasid: (space & !TRANSLATED).checked_sub(1).map(|p| p as u32),
                }
            })
            .collect()
    }

    /// A report section: the recorded writes, oldest first, each
    /// guest-physical one that touches a watched range `(gpa, len, name)`
    /// marked with that range's name.
    pub fn report(&self, watched: &[(u64, u64, String)]) -> String {
        let writes = self.recent();
        let mut s = format!(
            "last {} device writes through the vIOMMU adapter (oldest first):",
            writes.len()
        );
        for w in &writes {
            let _ = write!(s, "\n  {w}");
            for (gpa, len, name) in watched {
                if w.hits(*gpa, *len) {
                    let _ = write!(s, "  <-- writes {name}");
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdsa::dma::PasidTag;

    const RID: PciAddress = PciAddress::new(0, 1, 0);

    #[test]
    fn the_ring_keeps_the_newest_writes_oldest_first_and_marks_a_watched_page() {
        let log = DeviceWriteLog::default();
        for i in 0..(SLOTS as u64 + 3) {
            log.record(RID, AddressSpace::Translated, 0x10_0000 + i * 0x20, 0x20);
        }
        log.record(
            RID,
            AddressSpace::Untranslated(Some(PasidTag {
                pasid: 0x42,
                privileged: false,
            })),
            0x7f00_0000,
            64,
        );
        let writes = log.recent();
        assert_eq!(writes.len(), SLOTS);
        assert_eq!(writes[0].seq, 5);
        assert_eq!(writes[0].addr, 0x10_0000 + 4 * 0x20);
        let last = writes[SLOTS - 1];
        assert_eq!(
            (last.seq, last.translated, last.pasid, last.addr, last.len),
            (SLOTS as u64 + 4, false, Some(0x42), 0x7f00_0000, 64)
        );
        let report = log.report(&[
            (0x10_0fe0, 0x20, "the page table".to_string()),
            (0x20_0000, 0x1000, "another page".to_string()),
        ]);
        assert!(
            report.contains(&format!(
                "#{} 00:01.0 GPA 0x100fe0 len 0x20  <-- writes the page table",
                0x7f + 1
            )),
            "{report}"
        );
        assert_eq!(report.matches("<--").count(), 1, "{report}");
        assert!(
            report.ends_with("PASID 0x42 address 0x7f000000 len 0x40"),
            "{report}"
        );
    }
}
