//! Guest-wide guest-PASID to host-PASID translation table (rule 4).
//!
//! One table per guest, shared by all its devices and vCPUs. Like the VMX
//! PASID-translation structure it has two levels: a directory of
//! [`DIR_ENTRIES`] slots indexed by guest PASID bits 19:10, each pointing to a
//! leaf of [`LEAF_ENTRIES`] entries indexed by bits 9:0. A leaf is created the
//! first time a guest PASID in its range is installed, so memory grows with
//! the directory slots in use: 4 bytes per entry in a full leaf, plus the
//! fixed directory.
//!
//! Reads take no lock: a directory slot is a [`OnceLock`] and an entry an
//! [`AtomicU32`] holding `host PASID | ENTRY_VALID`, stored with `Release`
//! and loaded with `Acquire`, so a vCPU thread translating while the VMM
//! updates sees either the old or the new mapping. Writers are serialized by
//! a mutex.
//!
//! The table allocates the host PASIDs itself, in global scope (ENQCMD takes
//! the PASID from the MSR, not per device) and charged to the guest's owner,
//! and frees them when the entry goes. There is no way to put another
//! owner's host PASID in a table, so one guest's table never names a host
//! PASID charged to another guest.
//!
//! A second table of the same shape maps each host PASID back to its guest
//! PASID ([`PasidTable::guest_of`]): the accelerator works in host PASIDs and
//! its DMA must reach the guest's PASID-table entry, which the guest indexes
//! by its own PASID. Both directions change under the writer mutex, the
//! reverse entry written before the forward one on install and cleared after
//! it on remove, so a host PASID a reader got from [`PasidTable::translate`]
//! always resolves back while the mapping lives.
//!
//! Removing an entry does not wait for readers that loaded it just before:
//! like a hardware translation cache, the VMM must flush what it derived
//! from the old mapping before the host PASID can go to someone else.
//! [`PasidTable::unmap`] removes the entry and leaves the host PASID
//! allocated for that: the caller frees it once no reader or device can
//! still use it ([`PasidTable::remove`] frees at once, for callers with no
//! such readers).

use std::mem::size_of;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::space::{OwnerId, PasidSpace, Scope, PASID_MAX, RESERVED_PASID};
use crate::{lock, Error, Result};

/// Guest PASID bits that index a leaf.
pub const LEAF_BITS: u32 = 10;
/// Entries in a leaf (guest PASID bits 9:0).
pub const LEAF_ENTRIES: usize = 1 << LEAF_BITS;
/// Slots in the directory (guest PASID bits 19:10).
pub const DIR_ENTRIES: usize = 1 << (crate::space::PASID_BITS - LEAF_BITS);
/// Valid bit of a table entry; bits 19:0 hold the host PASID.
pub const ENTRY_VALID: u32 = 1 << 31;

type Leaf = [AtomicU32; LEAF_ENTRIES];

fn new_leaf() -> Box<Leaf> {
    Box::new(std::array::from_fn(|_| AtomicU32::new(0)))
}

/// A two-level array of 2^20 entries, each `value | ENTRY_VALID` or 0,
/// indexed by a PASID; leaves appear on first use.
struct Levels(Box<[OnceLock<Box<Leaf>>; DIR_ENTRIES]>);

impl Levels {
    fn new() -> Self {
        Levels(Box::new(std::array::from_fn(|_| OnceLock::new())))
    }

    /// The entry for `pasid` (at most PASID_MAX), 0 when absent.
    #[inline]
    fn load(&self, pasid: u32) -> u32 {
        let (dir, index) = split(pasid);
        self.0[dir]
            .get()
            .map_or(0, |leaf| leaf[index].load(Ordering::Acquire))
    }

    /// The slot of `pasid` if its leaf exists.
    fn slot(&self, pasid: u32) -> Option<&AtomicU32> {
        let (dir, index) = split(pasid);
        self.0[dir].get().map(|leaf| &leaf[index])
    }

    /// The slot of `pasid`, creating its leaf.
    fn slot_or_init(&self, pasid: u32) -> &AtomicU32 {
        let (dir, index) = split(pasid);
        &self.0[dir].get_or_init(new_leaf)[index]
    }

    fn leaves(&self) -> impl Iterator<Item = (usize, &Leaf)> {
        self.0
            .iter()
            .enumerate()
            .filter_map(|(dir, slot)| slot.get().map(|leaf| (dir, &**leaf)))
    }
}

#[inline]
fn split(gpasid: u32) -> (usize, usize) {
    (
        (gpasid >> LEAF_BITS) as usize,
        (gpasid as usize) & (LEAF_ENTRIES - 1),
    )
}

/// One guest's gPASID -> hPASID table. Share it between the guest's vCPU
/// and device threads behind an `Arc`; every method takes `&self`.
pub struct PasidTable {
    space: Arc<PasidSpace>,
    owner: OwnerId,
    /// Guest PASID -> host PASID.
    directory: Levels,
    /// Host PASID -> guest PASID.
    reverse: Levels,
    /// Serializes writers; counts the valid entries.
    writer: Mutex<u32>,
}

impl PasidTable {
    /// An empty table whose host PASIDs come from `space`, charged to
    /// `owner` (the guest).
    pub fn new(space: Arc<PasidSpace>, owner: OwnerId) -> Result<Self> {
        space.charged(owner)?;
        Ok(PasidTable {
            space,
            owner,
            directory: Levels::new(),
            reverse: Levels::new(),
            writer: Mutex::new(0),
        })
    }

    /// The owner (guest) the table's host PASIDs are charged to.
    pub fn owner(&self) -> OwnerId {
        self.owner
    }

    /// The host PASID space the table allocates from.
    pub fn space(&self) -> &Arc<PasidSpace> {
        &self.space
    }

    /// Translates a guest PASID, without locking.
    ///
    /// Errors: [`Error::OutOfRange`] for `gpasid` >= 2^20,
    /// [`Error::TranslationFault`] when no host PASID is installed (guest
    /// PASID 0 never is).
    #[inline]
    pub fn translate(&self, gpasid: u32) -> Result<u32> {
        if gpasid > PASID_MAX {
            return Err(Error::OutOfRange(gpasid));
        }
        let entry = self.directory.load(gpasid);
        if entry & ENTRY_VALID != 0 {
            Ok(entry & PASID_MAX)
        } else {
            Err(Error::TranslationFault(gpasid))
        }
    }

    /// The guest PASID whose host PASID is `hpasid`, without locking; `None`
    /// when no guest PASID of this table maps to it (another guest's host
    /// PASID, a freed one, or one out of range).
    #[inline]
    pub fn guest_of(&self, hpasid: u32) -> Option<u32> {
        if hpasid > PASID_MAX {
            return None;
        }
        let entry = self.reverse.load(hpasid);
        (entry & ENTRY_VALID != 0).then_some(entry & PASID_MAX)
    }

    /// Resolves a translation fault: gives `gpasid` a host PASID (global
    /// scope, charged to the table's owner) and returns it. If the entry is
    /// already there (another thread resolved the same fault first) its host
    /// PASID is returned and nothing is allocated.
    ///
    /// Errors: [`Error::OutOfRange`], [`Error::Reserved`] for guest PASID 0,
    /// and the space's [`Error::OverLimit`], [`Error::NoSpace`],
    /// [`Error::UnknownOwner`].
    pub fn install(&self, gpasid: u32) -> Result<u32> {
        if gpasid > PASID_MAX {
            return Err(Error::OutOfRange(gpasid));
        }
        if gpasid == RESERVED_PASID {
            return Err(Error::Reserved);
        }
        let mut populated = lock(&self.writer);
        // Only writers store entries, and we are the writer.
        let entry = self.directory.load(gpasid);
        if entry & ENTRY_VALID != 0 {
            return Ok(entry & PASID_MAX);
        }
        let hpasid = self.space.alloc(self.owner, Scope::Global)?;
        self.reverse
            .slot_or_init(hpasid)
            .store(gpasid | ENTRY_VALID, Ordering::Release);
        self.directory
            .slot_or_init(gpasid)
            .store(hpasid | ENTRY_VALID, Ordering::Release);
        *populated += 1;
        log::trace!("{}: guest PASID {gpasid:#x} -> {hpasid:#x}", self.owner);
        Ok(hpasid)
    }

    /// Removes the entry of `gpasid` (the guest tore that PASID down), frees
    /// its host PASID back to the space and returns it.
    ///
    /// Errors: [`Error::OutOfRange`], [`Error::NotInstalled`].
    pub fn remove(&self, gpasid: u32) -> Result<u32> {
        let hpasid = self.unmap(gpasid)?;
        self.space.free(self.owner, Scope::Global, hpasid)?;
        Ok(hpasid)
    }

    /// Removes the entry of `gpasid` in both directions and returns its host
    /// PASID, which stays allocated and charged to the table's owner: the
    /// caller frees it ([`PasidSpace::free`] in global scope) once nothing
    /// that translated it before the removal can still use it.
    ///
    /// Errors: [`Error::OutOfRange`], [`Error::NotInstalled`].
    pub fn unmap(&self, gpasid: u32) -> Result<u32> {
        if gpasid > PASID_MAX {
            return Err(Error::OutOfRange(gpasid));
        }
        let mut populated = lock(&self.writer);
        let Some(slot) = self.directory.slot(gpasid) else {
            return Err(Error::NotInstalled(gpasid));
        };
        let entry = slot.load(Ordering::Relaxed);
        if entry & ENTRY_VALID == 0 {
            return Err(Error::NotInstalled(gpasid));
        }
        slot.store(0, Ordering::Release);
        *populated -= 1;
        let hpasid = entry & PASID_MAX;
        if let Some(back) = self.reverse.slot(hpasid) {
            back.store(0, Ordering::Release);
        }
        log::trace!("{}: guest PASID {gpasid:#x} unmapped", self.owner);
        Ok(hpasid)
    }

    /// Removes every entry, freeing their host PASIDs (guest reset), and
    /// returns how many there were.
    pub fn clear(&self) -> u32 {
        let mut populated = lock(&self.writer);
        let mut removed = 0;
        for (_, leaf) in self.directory.leaves() {
            for slot in leaf.iter() {
                let entry = slot.swap(0, Ordering::AcqRel);
                if entry & ENTRY_VALID != 0 {
                    removed += 1;
                    if let Some(back) = self.reverse.slot(entry & PASID_MAX) {
                        back.store(0, Ordering::Release);
                    }
                    if let Err(err) = self
                        .space
                        .free(self.owner, Scope::Global, entry & PASID_MAX)
                    {
                        log::error!("{}: freeing host PASID on clear: {err}", self.owner);
                    }
                }
            }
        }
        *populated = 0;
        removed
    }

    /// Number of installed entries.
    pub fn len(&self) -> u32 {
        *lock(&self.writer)
    }

    /// Whether no entry is installed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every installed `(guest PASID, host PASID)` pair, by guest PASID.
    pub fn entries(&self) -> Vec<(u32, u32)> {
        let _writer = lock(&self.writer);
        let mut entries = Vec::new();
        for (dir, leaf) in self.directory.leaves() {
            for (index, entry) in leaf.iter().enumerate() {
                let entry = entry.load(Ordering::Relaxed);
                if entry & ENTRY_VALID != 0 {
                    entries.push(((dir << LEAF_BITS | index) as u32, entry & PASID_MAX));
                }
            }
        }
        entries
    }

    /// Directory slots of the guest-to-host direction that have a leaf.
    pub fn leaves(&self) -> usize {
        self.directory.leaves().count()
    }

    /// Bytes the table occupies: the structure, both directories and the
    /// leaves in use in both directions.
    pub fn memory_bytes(&self) -> usize {
        size_of::<Self>()
            + 2 * size_of::<[OnceLock<Box<Leaf>>; DIR_ENTRIES]>()
            + (self.leaves() + self.reverse.leaves().count()) * size_of::<Leaf>()
    }
}

impl Drop for PasidTable {
    fn drop(&mut self) {
        self.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_table(limit: Option<u32>) -> PasidTable {
        let space = Arc::new(PasidSpace::new());
        let guest = space.add_owner("guest", limit);
        PasidTable::new(space, guest).unwrap()
    }

    #[test]
    fn miss_is_a_translation_fault_then_install_resolves_it() {
        let table = guest_table(None);
        assert_eq!(table.translate(0x42), Err(Error::TranslationFault(0x42)));
        let hpasid = table.install(0x42).unwrap();
        assert_eq!(table.translate(0x42), Ok(hpasid));
        // A second fault on the same PASID gets the same host PASID.
        assert_eq!(table.install(0x42), Ok(hpasid));
        assert_eq!(table.len(), 1);
        assert_eq!(table.space().charged(table.owner()), Ok(1));
        assert_eq!(
            table.space().owner_of(Scope::Global, hpasid),
            Some(table.owner())
        );
    }

    #[test]
    fn remove_frees_the_host_pasid() {
        let table = guest_table(None);
        let hpasid = table.install(PASID_MAX).unwrap();
        assert_eq!(table.remove(PASID_MAX), Ok(hpasid));
        assert_eq!(
            table.translate(PASID_MAX),
            Err(Error::TranslationFault(PASID_MAX))
        );
        assert_eq!(table.space().charged(table.owner()), Ok(0));
        assert_eq!(table.space().owner_of(Scope::Global, hpasid), None);
        assert_eq!(table.remove(PASID_MAX), Err(Error::NotInstalled(PASID_MAX)));
    }

    #[test]
    fn host_pasids_resolve_back_while_installed() {
        let space = Arc::new(PasidSpace::new());
        let a = PasidTable::new(space.clone(), space.add_owner("a", None)).unwrap();
        let b = PasidTable::new(space.clone(), space.add_owner("b", None)).unwrap();
        let ha = a.install(5).unwrap();
        let hb = b.install(5).unwrap();
        assert_ne!(ha, hb);
        assert_eq!((a.guest_of(ha), b.guest_of(hb)), (Some(5), Some(5)));
        // Another guest's host PASID never resolves in this table.
        assert_eq!((a.guest_of(hb), b.guest_of(ha)), (None, None));
        assert_eq!(a.guest_of(PASID_MAX + 1), None);
        assert_eq!(a.guest_of(0), None);
        a.remove(5).unwrap();
        assert_eq!(a.guest_of(ha), None);
        let h7 = b.install(7).unwrap();
        assert_eq!(b.clear(), 2);
        assert_eq!((b.guest_of(hb), b.guest_of(h7)), (None, None));
    }

    #[test]
    fn bad_guest_pasids() {
        let table = guest_table(None);
        let big = PASID_MAX + 1;
        assert_eq!(table.translate(big), Err(Error::OutOfRange(big)));
        assert_eq!(table.install(big), Err(Error::OutOfRange(big)));
        assert_eq!(table.remove(u32::MAX), Err(Error::OutOfRange(u32::MAX)));
        assert_eq!(table.install(0), Err(Error::Reserved));
        assert_eq!(table.translate(0), Err(Error::TranslationFault(0)));
        assert_eq!(table.remove(0), Err(Error::NotInstalled(0)));
        // Absent in an existing leaf and in a missing leaf.
        table.install(1).unwrap();
        assert_eq!(table.remove(2), Err(Error::NotInstalled(2)));
        assert_eq!(table.remove(5000), Err(Error::NotInstalled(5000)));
    }

    #[test]
    fn install_reports_the_owner_limit() {
        let table = guest_table(Some(1));
        table.install(7).unwrap();
        assert_eq!(
            table.install(8),
            Err(Error::OverLimit {
                owner: table.owner(),
                limit: 1
            })
        );
        assert_eq!(table.translate(8), Err(Error::TranslationFault(8)));
    }

    #[test]
    fn unknown_owner_is_refused() {
        let space = Arc::new(PasidSpace::new());
        let guest = space.add_owner("gone", None);
        space.remove_owner(guest).unwrap();
        assert_eq!(
            PasidTable::new(space, guest).err(),
            Some(Error::UnknownOwner(guest))
        );
    }

    #[test]
    fn memory_follows_directory_slots_in_use() {
        let table = guest_table(None);
        let empty = table.memory_bytes();
        assert_eq!(table.leaves(), 0);
        for gpasid in [1, 2, 1023] {
            table.install(gpasid).unwrap();
        }
        assert_eq!(table.leaves(), 1);
        table.install(1024).unwrap();
        table.install(PASID_MAX).unwrap();
        assert_eq!(table.leaves(), 3);
        // The five host PASIDs (1..=5, next fit) share one reverse leaf.
        assert_eq!(table.memory_bytes(), empty + (3 + 1) * LEAF_ENTRIES * 4);
    }

    #[test]
    fn clear_and_drop_return_every_charge() {
        let space = Arc::new(PasidSpace::new());
        let guest = space.add_owner("guest", None);
        let table = PasidTable::new(space.clone(), guest).unwrap();
        for gpasid in [3, 4000, 70000] {
            table.install(gpasid).unwrap();
        }
        let entries = table.entries();
        assert_eq!(
            entries.iter().map(|&(g, _)| g).collect::<Vec<_>>(),
            vec![3, 4000, 70000]
        );
        assert_eq!(table.clear(), 3);
        assert!(table.is_empty());
        assert_eq!(space.charged(guest), Ok(0));
        table.install(9).unwrap();
        drop(table);
        assert_eq!(space.charged(guest), Ok(0));
        assert_eq!(space.allocated(), 0);
    }
}
