//! The host PASID space (rules 1 to 3 of the PASID design).
//!
//! * 20 bits; PASID 0 ([`RESERVED_PASID`]) is reserved for requests without
//!   PASID and is never handed out.
//! * A request is either [`Scope::Global`] (valid for every device and IOMMU
//!   in the system: ENQCMD takes the PASID from one MSR, not per device) or
//!   [`Scope::Device`] (valid for one requester ID). A global PASID never
//!   collides with a PASID allocated to any device; device spaces are
//!   independent of each other, so two devices may hold the same number.
//! * Every allocation is charged to an [`OwnerId`]; an owner may have a limit,
//!   past which allocation fails with [`Error::OverLimit`]. Freeing returns the
//!   charge.
//!
//! The space does no reference counting: a PASID is freed exactly once, by
//! whoever holds it (a guest's [`PasidTable`](crate::PasidTable) when the
//! guest tears the PASID down). Running out is only possible by abuse, and then fails
//! cleanly with [`Error::NoSpace`].
//!
//! Allocation is next-fit over bitmaps: the search resumes after the last
//! PASID handed out, so a freed PASID is handed out again only after the
//! allocator has gone round the whole space, and an alloc+free pair costs a
//! few word operations.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use pci::PciAddress;

use crate::bitmap::{find_clear, Bitmap};
use crate::{lock, Error, Result};

/// Width of a PASID in bits.
pub const PASID_BITS: u32 = 20;
/// Number of PASID values, the reserved one included.
pub const PASID_SPACE_SIZE: u32 = 1 << PASID_BITS;
/// Largest PASID value.
pub const PASID_MAX: u32 = PASID_SPACE_SIZE - 1;
/// The PASID bits of a field that carries one in its low bits (a DMA
/// request's PASID prefix, a descriptor's dword 0, IA32_PASID, a fault or
/// page-request record).
pub const PASID_MASK: u32 = PASID_SPACE_SIZE - 1;
/// PASID of requests without PASID (RID_PASID); never allocated.
pub const RESERVED_PASID: u32 = 0;

/// Where an allocated PASID must be valid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Valid for every device and IOMMU in the system (ENQCMD, SVA).
    Global,
    /// Valid only for DMA from this function.
    Device(PciAddress),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => write!(f, "global"),
            Scope::Device(rid) => write!(f, "device {rid}"),
        }
    }
}

/// Who an allocation is charged to: a guest, or the VMM itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OwnerId(u32);

impl OwnerId {
    /// The VMM's own owner, present in every space with no limit.
    pub const VMM: OwnerId = OwnerId(0);

    /// The owner's number within its space.
    pub fn raw(self) -> u32 {
        self.0
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "owner {}", self.0)
    }
}

struct Owner {
    name: String,
    limit: Option<u32>,
    charged: u32,
    removed: bool,
}

/// The PASIDs one requester ID holds in device scope.
struct DeviceSpace {
    map: Bitmap,
    owners: HashMap<u32, OwnerId>,
    hint: u32,
}

struct Inner {
    /// Words per bitmap.
    words: usize,
    /// Globally allocated PASIDs, plus PASID 0 and the values past the
    /// space's width, which stay set forever.
    global: Bitmap,
    /// Owner of each globally allocated PASID (meaningful where `global` is
    /// set).
    global_owner: Box<[u32]>,
    /// `global` plus every PASID some device holds: what a global allocation
    /// must avoid.
    any: Bitmap,
    global_hint: u32,
    devices: HashMap<PciAddress, DeviceSpace>,
    owners: Vec<Owner>,
    allocated: u32,
}

impl Inner {
    fn owner_mut(&mut self, owner: OwnerId) -> Result<&mut Owner> {
        match self.owners.get_mut(owner.0 as usize) {
            Some(record) if !record.removed => Ok(record),
            _ => Err(Error::UnknownOwner(owner)),
        }
    }

    fn check_pasid(&self, pasid: u32) -> Result<()> {
        if pasid == RESERVED_PASID {
            Err(Error::Reserved)
        } else if pasid as usize >= self.global_owner.len() {
            Err(Error::OutOfRange(pasid))
        } else {
            Ok(())
        }
    }

    fn owner_of(&self, scope: Scope, pasid: u32) -> Option<OwnerId> {
        self.check_pasid(pasid).ok()?;
        match scope {
            Scope::Global => self
                .global
                .get(pasid)
                .then(|| OwnerId(self.global_owner[pasid as usize])),
            Scope::Device(rid) => self.devices.get(&rid)?.owners.get(&pasid).copied(),
        }
    }

    fn alloc(&mut self, owner: OwnerId, scope: Scope) -> Result<u32> {
        let record = self.owner_mut(owner)?;
        if let Some(limit) = record.limit {
            if record.charged >= limit {
                return Err(Error::OverLimit { owner, limit });
            }
        }
        let words = self.words;
        let pasid = match scope {
            Scope::Global => {
                let pasid = find_clear(words, self.global_hint, |w| self.any.word(w))
                    .ok_or(Error::NoSpace(scope))?;
                self.global.set(pasid);
                self.global_owner[pasid as usize] = owner.0;
                self.global_hint = pasid + 1;
                pasid
            }
            Scope::Device(rid) => {
                let global = &self.global;
                let device = self.devices.entry(rid).or_insert_with(|| DeviceSpace {
                    map: Bitmap::with_words(words),
                    owners: HashMap::new(),
                    hint: 0,
                });
                let found = find_clear(words, device.hint, |w| global.word(w) | device.map.word(w));
                let Some(pasid) = found else {
                    if device.owners.is_empty() {
                        self.devices.remove(&rid);
                    }
                    return Err(Error::NoSpace(scope));
                };
                device.map.set(pasid);
                device.owners.insert(pasid, owner);
                device.hint = pasid + 1;
                pasid
            }
        };
        self.any.set(pasid);
        self.allocated += 1;
        self.owners[owner.0 as usize].charged += 1;
        Ok(pasid)
    }

    fn free(&mut self, owner: OwnerId, scope: Scope, pasid: u32) -> Result<()> {
        self.owner_mut(owner)?;
        self.check_pasid(pasid)?;
        match self.owner_of(scope, pasid) {
            None => return Err(Error::NotAllocated { pasid, scope }),
            Some(holder) if holder != owner => return Err(Error::NotOwner { pasid, owner }),
            Some(_) => {}
        }
        match scope {
            Scope::Global => {
                // No device holds a globally allocated PASID.
                self.global.clear(pasid);
                self.any.clear(pasid);
            }
            Scope::Device(rid) => {
                if let Some(device) = self.devices.get_mut(&rid) {
                    device.map.clear(pasid);
                    device.owners.remove(&pasid);
                    if device.owners.is_empty() {
                        self.devices.remove(&rid);
                    }
                }
                if !self.devices.values().any(|device| device.map.get(pasid)) {
                    self.any.clear(pasid);
                }
            }
        }
        self.allocated -= 1;
        self.owners[owner.0 as usize].charged -= 1;
        Ok(())
    }
}

/// The host's PASID space. Share one between guests behind an `Arc`; every
/// method takes `&self`.
pub struct PasidSpace {
    bits: u32,
    inner: Mutex<Inner>,
}

impl Default for PasidSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl PasidSpace {
    /// A full 20-bit space with only the [`OwnerId::VMM`] owner.
    pub fn new() -> Self {
        Self::build(PASID_BITS)
    }

    /// A space of `bits` bits (1..=20), for hosts whose IOMMU supports fewer
    /// PASIDs (VT-d ECAP.PSS).
    pub fn with_bits(bits: u32) -> Result<Self> {
        if (1..=PASID_BITS).contains(&bits) {
            Ok(Self::build(bits))
        } else {
            Err(Error::InvalidWidth(bits))
        }
    }

    fn build(bits: u32) -> Self {
        let size = 1u32 << bits;
        let words = size.div_ceil(64) as usize;
        // PASID 0 and the values past the width are busy forever.
        let reserved = || {
            let mut map = Bitmap::with_words(words);
            map.set(RESERVED_PASID);
            for bit in size..words as u32 * 64 {
                map.set(bit);
            }
            map
        };
        let inner = Inner {
            words,
            global: reserved(),
            any: reserved(),
            global_owner: vec![0; size as usize].into_boxed_slice(),
            global_hint: 1,
            devices: HashMap::new(),
            owners: vec![Owner {
                name: "vmm".to_string(),
                limit: None,
                charged: 0,
                removed: false,
            }],
            allocated: 0,
        };
        PasidSpace {
            bits,
            inner: Mutex::new(inner),
        }
    }

    /// Width of the space in bits.
    pub fn bits(&self) -> u32 {
        self.bits
    }

    /// How many PASIDs can be allocated in global scope when nothing is
    /// allocated: every value but the reserved one.
    pub fn capacity(&self) -> u32 {
        (1 << self.bits) - 1
    }

    /// PASIDs currently allocated, all scopes together.
    pub fn allocated(&self) -> u32 {
        lock(&self.inner).allocated
    }

    /// Registers an owner (typically a guest) with an optional limit on how
    /// many PASIDs may be charged to it at once.
    pub fn add_owner(&self, name: &str, limit: Option<u32>) -> OwnerId {
        let mut inner = lock(&self.inner);
        let id = OwnerId(inner.owners.len() as u32);
        inner.owners.push(Owner {
            name: name.to_string(),
            limit,
            charged: 0,
            removed: false,
        });
        log::debug!("PASID space: added {id} ({name}), limit {limit:?}");
        id
    }

    /// Removes an owner that has nothing charged. Its id is never reused.
    pub fn remove_owner(&self, owner: OwnerId) -> Result<()> {
        let mut inner = lock(&self.inner);
        let record = inner.owner_mut(owner)?;
        if record.charged != 0 {
            return Err(Error::OwnerBusy {
                owner,
                charged: record.charged,
            });
        }
        record.removed = true;
        log::debug!("PASID space: removed {owner} ({})", record.name);
        Ok(())
    }

    /// Changes an owner's limit. Lowering it below the current charge makes
    /// further allocations fail until enough PASIDs are freed.
    pub fn set_limit(&self, owner: OwnerId, limit: Option<u32>) -> Result<()> {
        lock(&self.inner).owner_mut(owner)?.limit = limit;
        Ok(())
    }

    /// An owner's limit.
    pub fn limit(&self, owner: OwnerId) -> Result<Option<u32>> {
        Ok(lock(&self.inner).owner_mut(owner)?.limit)
    }

    /// How many PASIDs are charged to an owner.
    pub fn charged(&self, owner: OwnerId) -> Result<u32> {
        Ok(lock(&self.inner).owner_mut(owner)?.charged)
    }

    /// Allocates a PASID valid in `scope`, charged to `owner`.
    ///
    /// Errors: [`Error::UnknownOwner`], [`Error::OverLimit`] (checked first),
    /// [`Error::NoSpace`].
    pub fn alloc(&self, owner: OwnerId, scope: Scope) -> Result<u32> {
        let result = lock(&self.inner).alloc(owner, scope);
        match result {
            Ok(pasid) => log::trace!("PASID space: {pasid:#x} ({scope}) to {owner}"),
            Err(err) => log::debug!("PASID space: allocation for {owner} ({scope}) failed: {err}"),
        }
        result
    }

    /// Frees a PASID that `owner` allocated in `scope`, returning the charge.
    ///
    /// Errors: [`Error::UnknownOwner`], [`Error::Reserved`],
    /// [`Error::OutOfRange`], [`Error::NotAllocated`] (double free or wrong
    /// scope), [`Error::NotOwner`].
    ///
    /// PASIDs that a [`PasidTable`](crate::PasidTable) allocated are its to
    /// free:
    /// freeing one behind its back would let the space hand it to another
    /// owner while the table still maps it.
    pub fn free(&self, owner: OwnerId, scope: Scope, pasid: u32) -> Result<()> {
        let result = lock(&self.inner).free(owner, scope, pasid);
        match result {
            Ok(()) => log::trace!("PASID space: {pasid:#x} ({scope}) freed by {owner}"),
            Err(err) => log::debug!("PASID space: free by {owner} failed: {err}"),
        }
        result
    }

    /// Who `pasid` is charged to in `scope`, if it is allocated there.
    pub fn owner_of(&self, scope: Scope, pasid: u32) -> Option<OwnerId> {
        lock(&self.inner).owner_of(scope, pasid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RID_A: Scope = Scope::Device(PciAddress::from_rid(0x0010));
    const RID_B: Scope = Scope::Device(PciAddress::from_rid(0x0018));

    #[test]
    fn pasid_zero_is_never_allocated_and_cannot_be_freed() {
        let space = PasidSpace::with_bits(2).unwrap();
        let got: Vec<u32> = (0..3)
            .map(|_| space.alloc(OwnerId::VMM, Scope::Global).unwrap())
            .collect();
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!(space.alloc(OwnerId::VMM, RID_A), Err(Error::NoSpace(RID_A)));
        assert_eq!(
            space.free(OwnerId::VMM, Scope::Global, 0),
            Err(Error::Reserved)
        );
        assert_eq!(space.owner_of(Scope::Global, 0), None);
    }

    #[test]
    fn width_is_checked() {
        assert_eq!(PasidSpace::with_bits(0).err(), Some(Error::InvalidWidth(0)));
        assert_eq!(
            PasidSpace::with_bits(21).err(),
            Some(Error::InvalidWidth(21))
        );
        let space = PasidSpace::with_bits(20).unwrap();
        assert_eq!((space.bits(), space.capacity()), (20, PASID_MAX));
        let small = PasidSpace::with_bits(4).unwrap();
        assert_eq!(
            small.free(OwnerId::VMM, Scope::Global, 16),
            Err(Error::OutOfRange(16))
        );
        assert_eq!(
            space.free(OwnerId::VMM, Scope::Global, PASID_SPACE_SIZE),
            Err(Error::OutOfRange(PASID_SPACE_SIZE))
        );
    }

    #[test]
    fn next_fit_does_not_reuse_a_freed_pasid_at_once() {
        let space = PasidSpace::new();
        let first = space.alloc(OwnerId::VMM, Scope::Global).unwrap();
        space.free(OwnerId::VMM, Scope::Global, first).unwrap();
        let second = space.alloc(OwnerId::VMM, Scope::Global).unwrap();
        assert_eq!((first, second), (1, 2));
    }

    #[test]
    fn device_spaces_are_independent() {
        let space = PasidSpace::with_bits(2).unwrap();
        let a: Vec<u32> = (0..3)
            .map(|_| space.alloc(OwnerId::VMM, RID_A).unwrap())
            .collect();
        let b: Vec<u32> = (0..3)
            .map(|_| space.alloc(OwnerId::VMM, RID_B).unwrap())
            .collect();
        assert_eq!(a, b);
        assert_eq!(space.alloc(OwnerId::VMM, RID_A), Err(Error::NoSpace(RID_A)));
        assert_eq!(space.owner_of(RID_B, 2), Some(OwnerId::VMM));
        assert_eq!(
            space.free(OwnerId::VMM, Scope::Global, 2),
            Err(Error::NotAllocated {
                pasid: 2,
                scope: Scope::Global
            })
        );
    }

    #[test]
    fn global_never_collides_with_any_device_pasid() {
        let space = PasidSpace::with_bits(3).unwrap();
        let on_a = space.alloc(OwnerId::VMM, RID_A).unwrap();
        let on_b = [
            space.alloc(OwnerId::VMM, RID_B).unwrap(),
            space.alloc(OwnerId::VMM, RID_B).unwrap(),
        ];
        assert_eq!((on_a, on_b), (1, [1, 2]));
        // 1 and 2 are used by some device: global allocation skips them.
        let global: Vec<u32> = (0..5)
            .map(|_| space.alloc(OwnerId::VMM, Scope::Global).unwrap())
            .collect();
        assert_eq!(global, vec![3, 4, 5, 6, 7]);
        assert_eq!(
            space.alloc(OwnerId::VMM, Scope::Global),
            Err(Error::NoSpace(Scope::Global))
        );
        // Device allocations avoid the global ones too.
        assert_eq!(space.alloc(OwnerId::VMM, RID_A), Ok(2));
        assert_eq!(space.alloc(OwnerId::VMM, RID_A), Err(Error::NoSpace(RID_A)));
        // PASID 1 stays busy for global use until both devices dropped it.
        space.free(OwnerId::VMM, RID_A, 1).unwrap();
        assert_eq!(
            space.alloc(OwnerId::VMM, Scope::Global),
            Err(Error::NoSpace(Scope::Global))
        );
        space.free(OwnerId::VMM, RID_B, 1).unwrap();
        assert_eq!(space.alloc(OwnerId::VMM, Scope::Global), Ok(1));
    }

    #[test]
    fn owners_are_charged_and_limited() {
        let space = PasidSpace::new();
        let guest = space.add_owner("guest0", Some(2));
        let p1 = space.alloc(guest, Scope::Global).unwrap();
        let p2 = space.alloc(guest, RID_A).unwrap();
        assert_eq!(space.charged(guest), Ok(2));
        assert_eq!(
            space.alloc(guest, RID_B),
            Err(Error::OverLimit {
                owner: guest,
                limit: 2
            })
        );
        // Other owners are not affected by the guest's limit.
        assert!(space.alloc(OwnerId::VMM, Scope::Global).is_ok());
        space.free(guest, RID_A, p2).unwrap();
        assert_eq!(space.charged(guest), Ok(1));
        let p3 = space.alloc(guest, Scope::Global).unwrap();
        space.set_limit(guest, None).unwrap();
        assert_eq!(space.limit(guest), Ok(None));
        let p4 = space.alloc(guest, Scope::Global).unwrap();
        assert_eq!(space.owner_of(Scope::Global, p1), Some(guest));
        assert_eq!(
            space.remove_owner(guest),
            Err(Error::OwnerBusy {
                owner: guest,
                charged: 3
            })
        );
        for pasid in [p1, p3, p4] {
            space.free(guest, Scope::Global, pasid).unwrap();
        }
        assert_eq!(space.charged(guest), Ok(0));
        assert_eq!(space.allocated(), 1);
        space.remove_owner(guest).unwrap();
        assert_eq!(space.charged(guest), Err(Error::UnknownOwner(guest)));
        assert_eq!(
            space.alloc(guest, Scope::Global),
            Err(Error::UnknownOwner(guest))
        );
    }

    #[test]
    fn free_checks_owner_scope_and_double_free() {
        let space = PasidSpace::new();
        let guest = space.add_owner("guest0", None);
        let other = space.add_owner("guest1", None);
        let pasid = space.alloc(guest, RID_A).unwrap();
        assert_eq!(
            space.free(other, RID_A, pasid),
            Err(Error::NotOwner {
                pasid,
                owner: other
            })
        );
        assert_eq!(
            space.free(guest, RID_B, pasid),
            Err(Error::NotAllocated {
                pasid,
                scope: RID_B
            })
        );
        assert_eq!(space.free(guest, RID_A, pasid), Ok(()));
        assert_eq!(
            space.free(guest, RID_A, pasid),
            Err(Error::NotAllocated {
                pasid,
                scope: RID_A
            })
        );
        assert_eq!(space.charged(guest), Ok(0));
        assert_eq!(space.charged(other), Ok(0));
    }
}
