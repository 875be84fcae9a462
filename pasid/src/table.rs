//! The guest-wide guest-PASID to host-PASID translation table.
//!
//! Two levels, like the VMX PASID-translation structure: a directory of 1024
//! slots indexed by guest PASID bits 19:10, each naming a table of 1024
//! entries indexed by bits 9:0. Leaves are created on first use and live as
//! long as the table, so memory grows with the directory slots in use (4
//! bytes per entry in a full leaf). Lookups are two loads with no lock;
//! installs and removals are serialized by a writer lock.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use thiserror::Error;

use crate::{OwnerId, PasidError, PasidSpace, Scope, PASID_BITS, PASID_COUNT};

/// Entries per leaf table.
pub const LEAF_ENTRIES: usize = 1024;
const DIRECTORY_ENTRIES: usize = (PASID_COUNT as usize) / LEAF_ENTRIES;
const LEAF_SHIFT: u32 = PASID_BITS / 2;
/// Bit 31 of an entry: the host PASID in bits 19:0 is valid.
const ENTRY_VALID: u32 = 1 << 31;
const ENTRY_PASID: u32 = PASID_COUNT - 1;

/// Errors of the translation table.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum TableError {
    /// The guest PASID does not fit in 20 bits.
    #[error("guest PASID {0:#x} is out of range")]
    OutOfRange(u32),
    /// No translation: the caller resolves it (asks the vIOMMU whether the
    /// guest set that PASID up, then installs) and retries.
    #[error("no translation for guest PASID {0:#x}")]
    TranslationFault(u32),
    /// Removal of a guest PASID that has no translation.
    #[error("guest PASID {0:#x} is not mapped")]
    NotMapped(u32),
    /// The host space refused an allocation.
    #[error(transparent)]
    Space(#[from] PasidError),
}

type Leaf = Box<[AtomicU32]>;

/// One guest's gPASID to hPASID table, shared by all its devices and vCPUs.
///
/// Every host PASID it holds is a global one charged to the guest that owns
/// the table; removing an entry or dropping the table frees them.
pub struct GuestPasidTable {
    space: Arc<PasidSpace>,
    owner: OwnerId,
    directory: Box<[OnceLock<Leaf>]>,
    writer: Mutex<()>,
    entries: AtomicUsize,
}

impl std::fmt::Debug for GuestPasidTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestPasidTable")
            .field("owner", &self.owner)
            .field("entries", &self.len())
            .finish()
    }
}

fn split(gpasid: u32) -> Result<(usize, usize), TableError> {
    if gpasid >= PASID_COUNT {
        return Err(TableError::OutOfRange(gpasid));
    }
    Ok((
        (gpasid >> LEAF_SHIFT) as usize,
        gpasid as usize % LEAF_ENTRIES,
    ))
}

impl GuestPasidTable {
    /// An empty table for `owner`, allocating from `space`.
    pub fn new(space: Arc<PasidSpace>, owner: OwnerId) -> Self {
        Self {
            space,
            owner,
            directory: (0..DIRECTORY_ENTRIES).map(|_| OnceLock::new()).collect(),
            writer: Mutex::new(()),
            entries: AtomicUsize::new(0),
        }
    }

    /// The guest this table belongs to.
    pub fn owner(&self) -> OwnerId {
        self.owner
    }

    /// Translates a guest PASID. Lock-free; safe against concurrent updates
    /// (a reader sees the old or the new mapping).
    #[inline]
    pub fn lookup(&self, gpasid: u32) -> Result<u32, TableError> {
        let (dir, index) = split(gpasid)?;
        let entry = match self.directory[dir].get() {
            Some(leaf) => leaf[index].load(Ordering::Acquire),
            None => 0,
        };
        if entry & ENTRY_VALID == 0 {
            return Err(TableError::TranslationFault(gpasid));
        }
        Ok(entry & ENTRY_PASID)
    }

    /// Gives `gpasid` a host PASID: a new global one charged to the owner,
    /// or the one it already has (two vCPUs may resolve the same miss).
    pub fn install(&self, gpasid: u32) -> Result<u32, TableError> {
        let (dir, index) = split(gpasid)?;
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let leaf = self.directory[dir]
            .get_or_init(|| (0..LEAF_ENTRIES).map(|_| AtomicU32::new(0)).collect());
        let entry = leaf[index].load(Ordering::Acquire);
        if entry & ENTRY_VALID != 0 {
            return Ok(entry & ENTRY_PASID);
        }
        let hpasid = self.space.allocate(Scope::Global, self.owner)?;
        leaf[index].store(ENTRY_VALID | hpasid, Ordering::Release);
        self.entries.fetch_add(1, Ordering::Relaxed);
        Ok(hpasid)
    }

    /// Removes `gpasid`'s translation (the guest tore its PASID down) and
    /// frees the host PASID. Returns the host PASID that was freed.
    pub fn remove(&self, gpasid: u32) -> Result<u32, TableError> {
        let (dir, index) = split(gpasid)?;
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let leaf = self.directory[dir]
            .get()
            .ok_or(TableError::NotMapped(gpasid))?;
        let entry = leaf[index].load(Ordering::Acquire);
        if entry & ENTRY_VALID == 0 {
            return Err(TableError::NotMapped(gpasid));
        }
        leaf[index].store(0, Ordering::Release);
        self.entries.fetch_sub(1, Ordering::Relaxed);
        let hpasid = entry & ENTRY_PASID;
        self.space.free(Scope::Global, hpasid)?;
        Ok(hpasid)
    }

    /// The number of guest PASIDs with a translation.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    /// Whether no guest PASID has a translation.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the table's structure takes: the directory plus the leaves in
    /// use.
    pub fn memory_bytes(&self) -> usize {
        let leaves = self
            .directory
            .iter()
            .filter(|slot| slot.get().is_some())
            .count();
        std::mem::size_of_val(&*self.directory)
            + leaves * LEAF_ENTRIES * std::mem::size_of::<AtomicU32>()
    }
}

impl Drop for GuestPasidTable {
    fn drop(&mut self) {
        for leaf in self.directory.iter().filter_map(OnceLock::get) {
            for entry in leaf.iter() {
                let entry = entry.load(Ordering::Acquire);
                if entry & ENTRY_VALID != 0 {
                    if let Err(e) = self.space.free(Scope::Global, entry & ENTRY_PASID) {
                        log::error!("guest PASID table teardown: {e}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> (Arc<PasidSpace>, GuestPasidTable) {
        let space = Arc::new(PasidSpace::new());
        let owner = space.register_owner(None);
        let table = GuestPasidTable::new(space.clone(), owner);
        (space, table)
    }

    #[test]
    fn miss_install_hit_remove() {
        let (space, table) = table();
        assert_eq!(table.lookup(0x42), Err(TableError::TranslationFault(0x42)));
        let h = table.install(0x42).unwrap();
        assert_eq!(table.lookup(0x42), Ok(h));
        assert_eq!(
            table.install(0x42),
            Ok(h),
            "installing again keeps the mapping"
        );
        assert_eq!(space.owner_of(Scope::Global, h), Some(table.owner()));
        assert_eq!(table.remove(0x42), Ok(h));
        assert_eq!(table.lookup(0x42), Err(TableError::TranslationFault(0x42)));
        assert!(
            !space.is_allocated(Scope::Global, h),
            "removal frees the host PASID"
        );
        assert_eq!(space.charged(table.owner()), Ok(0));
    }

    #[test]
    fn bad_inputs() {
        let (_, table) = table();
        assert_eq!(table.lookup(1 << 20), Err(TableError::OutOfRange(1 << 20)));
        assert_eq!(
            table.install(u32::MAX),
            Err(TableError::OutOfRange(u32::MAX))
        );
        assert_eq!(table.remove(7), Err(TableError::NotMapped(7)));
        table.install(8).unwrap();
        assert_eq!(
            table.remove(7),
            Err(TableError::NotMapped(7)),
            "same leaf, absent entry"
        );
    }

    #[test]
    fn limit_surfaces_as_space_error() {
        let space = Arc::new(PasidSpace::new());
        let owner = space.register_owner(Some(1));
        let table = GuestPasidTable::new(space, owner);
        table.install(1).unwrap();
        assert_eq!(
            table.install(2),
            Err(TableError::Space(PasidError::OverLimit { owner, limit: 1 }))
        );
    }

    #[test]
    fn memory_follows_directory_slots_in_use() {
        let (_, table) = table();
        let empty = table.memory_bytes();
        table.install(0).unwrap();
        table.install(1023).unwrap();
        assert_eq!(table.memory_bytes(), empty + 4096, "one leaf");
        table.install(0xf_ffff).unwrap();
        assert_eq!(table.memory_bytes(), empty + 8192, "two leaves");
    }

    #[test]
    fn drop_frees_host_pasids() {
        let (space, table) = table();
        let owner = table.owner();
        for g in 0..100 {
            table.install(g * 977).unwrap();
        }
        assert_eq!(space.charged(owner), Ok(100));
        drop(table);
        assert_eq!(space.charged(owner), Ok(0));
        assert_eq!(space.allocated(), 0);
    }
}
