//! The host PASID space: 20 bits, shared by every guest.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use thiserror::Error;

/// Width of a PASID.
pub const PASID_BITS: u32 = 20;
/// Number of PASID values.
pub const PASID_COUNT: u32 = 1 << PASID_BITS;
/// PASID 0 is reserved: it stands for requests without a PASID.
pub const RESERVED_PASID: u32 = 0;

const WORDS: usize = (PASID_COUNT / 64) as usize;

/// Errors of the PASID space.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum PasidError {
    /// Every PASID the scope could use is taken.
    #[error("no free PASID left in the {0:?} scope")]
    NoSpace(Scope),
    /// The owner's limit is reached.
    #[error("owner {owner:?} is at its limit of {limit} PASIDs")]
    OverLimit {
        /// The owner.
        owner: OwnerId,
        /// Its limit.
        limit: u32,
    },
    /// The owner was never registered.
    #[error("unknown owner {0:?}")]
    UnknownOwner(OwnerId),
    /// The PASID is not allocated in that scope (never was, or freed twice).
    #[error("PASID {pasid:#x} is not allocated in the {scope:?} scope")]
    NotAllocated {
        /// The scope.
        scope: Scope,
        /// The PASID.
        pasid: u32,
    },
}

/// Where an allocated PASID must be valid.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Scope {
    /// Every device and IOMMU in the system: what ENQCMD needs, since the
    /// CPU takes the PASID from one MSR whatever the target device.
    Global,
    /// Only for one requester ID; such spaces are independent of each other.
    Device(u16),
}

/// Who an allocation is charged to: a guest, or the VMM itself.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct OwnerId(pub u32);

#[derive(Debug)]
struct Account {
    limit: Option<u32>,
    charged: u32,
}

/// A bitmap over the PASID space with a rotating search hint.
#[derive(Clone)]
struct Bitmap {
    words: Box<[u64]>,
}

impl Bitmap {
    fn new() -> Self {
        Self {
            words: vec![0; WORDS].into_boxed_slice(),
        }
    }

    fn get(&self, pasid: u32) -> bool {
        self.words[(pasid / 64) as usize] & (1 << (pasid % 64)) != 0
    }

    fn set(&mut self, pasid: u32, value: bool) {
        let word = &mut self.words[(pasid / 64) as usize];
        if value {
            *word |= 1 << (pasid % 64);
        } else {
            *word &= !(1 << (pasid % 64));
        }
    }
}

/// Finds a PASID clear in both bitmaps, starting at word `hint`.
fn find_free(a: &Bitmap, b: &Bitmap, hint: usize) -> Option<u32> {
    (hint..WORDS).chain(0..hint).find_map(|w| {
        let taken = a.words[w] | b.words[w];
        (taken != u64::MAX).then(|| w as u32 * 64 + (!taken).trailing_zeros())
    })
}

struct Inner {
    /// Globally allocated PASIDs (bit 0, the reserved PASID, always set).
    global: Bitmap,
    /// PASIDs used by at least one device-scoped space.
    any_device: Bitmap,
    /// Per requester ID, its device-scoped PASIDs.
    devices: HashMap<u16, Bitmap>,
    /// How many device spaces use each device-scoped PASID.
    device_users: HashMap<u32, u32>,
    /// Who each allocation is charged to.
    charged_to: HashMap<(Scope, u32), OwnerId>,
    accounts: HashMap<OwnerId, Account>,
    next_owner: u32,
    hint: usize,
}

/// The host PASID space.
///
/// All methods take `&self`; share it between guests with an `Arc`.
pub struct PasidSpace {
    inner: Mutex<Inner>,
}

impl Default for PasidSpace {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for PasidSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PasidSpace")
            .field("allocated", &self.allocated())
            .finish()
    }
}

impl PasidSpace {
    /// An empty space: every PASID but the reserved one is free.
    pub fn new() -> Self {
        let mut global = Bitmap::new();
        global.set(RESERVED_PASID, true);
        Self {
            inner: Mutex::new(Inner {
                global,
                any_device: Bitmap::new(),
                devices: HashMap::new(),
                device_users: HashMap::new(),
                charged_to: HashMap::new(),
                accounts: HashMap::new(),
                next_owner: 0,
                hint: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is consistent between statements: recover from a panic
        // elsewhere rather than propagating it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an owner with an optional limit on how many PASIDs it may
    /// hold at once.
    pub fn register_owner(&self, limit: Option<u32>) -> OwnerId {
        let mut inner = self.lock();
        let id = OwnerId(inner.next_owner);
        inner.next_owner += 1;
        inner.accounts.insert(id, Account { limit, charged: 0 });
        id
    }

    /// How many PASIDs `owner` holds.
    pub fn charged(&self, owner: OwnerId) -> Result<u32, PasidError> {
        let inner = self.lock();
        inner
            .accounts
            .get(&owner)
            .map(|a| a.charged)
            .ok_or(PasidError::UnknownOwner(owner))
    }

    /// Allocates a PASID in `scope`, charged to `owner`.
    ///
    /// A global PASID is free in every device space too; a device-scoped one
    /// is never a global one.
    pub fn allocate(&self, scope: Scope, owner: OwnerId) -> Result<u32, PasidError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let account = inner
            .accounts
            .get(&owner)
            .ok_or(PasidError::UnknownOwner(owner))?;
        if let Some(limit) = account.limit {
            if account.charged >= limit {
                return Err(PasidError::OverLimit { owner, limit });
            }
        }
        let pasid = match scope {
            Scope::Global => {
                let pasid = find_free(&inner.global, &inner.any_device, inner.hint)
                    .ok_or(PasidError::NoSpace(scope))?;
                inner.global.set(pasid, true);
                pasid
            }
            Scope::Device(rid) => {
                let device = inner.devices.entry(rid).or_insert_with(Bitmap::new);
                let pasid = find_free(&inner.global, device, inner.hint)
                    .ok_or(PasidError::NoSpace(scope))?;
                device.set(pasid, true);
                inner.any_device.set(pasid, true);
                *inner.device_users.entry(pasid).or_default() += 1;
                pasid
            }
        };
        inner.hint = (pasid / 64) as usize;
        inner.charged_to.insert((scope, pasid), owner);
        if let Some(account) = inner.accounts.get_mut(&owner) {
            account.charged += 1;
        }
        Ok(pasid)
    }

    /// Frees `pasid` in `scope` and returns its charge to the owner, whom it
    /// names.
    pub fn free(&self, scope: Scope, pasid: u32) -> Result<OwnerId, PasidError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let owner = inner
            .charged_to
            .remove(&(scope, pasid))
            .ok_or(PasidError::NotAllocated { scope, pasid })?;
        match scope {
            Scope::Global => inner.global.set(pasid, false),
            Scope::Device(rid) => {
                if let Some(device) = inner.devices.get_mut(&rid) {
                    device.set(pasid, false);
                }
                let users = inner.device_users.entry(pasid).or_default();
                *users = users.saturating_sub(1);
                if *users == 0 {
                    inner.device_users.remove(&pasid);
                    inner.any_device.set(pasid, false);
                }
            }
        }
        if let Some(account) = inner.accounts.get_mut(&owner) {
            account.charged -= 1;
        }
        Ok(owner)
    }

    /// Who `pasid` in `scope` is charged to, if it is allocated.
    pub fn owner_of(&self, scope: Scope, pasid: u32) -> Option<OwnerId> {
        self.lock().charged_to.get(&(scope, pasid)).copied()
    }

    /// Whether `pasid` is allocated in `scope`.
    pub fn is_allocated(&self, scope: Scope, pasid: u32) -> bool {
        if pasid >= PASID_COUNT {
            return false;
        }
        let inner = self.lock();
        match scope {
            Scope::Global => pasid != RESERVED_PASID && inner.global.get(pasid),
            Scope::Device(rid) => inner.devices.get(&rid).is_some_and(|d| d.get(pasid)),
        }
    }

    /// The number of allocations across all scopes.
    pub fn allocated(&self) -> usize {
        self.lock().charged_to.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_pasid_is_never_handed_out() {
        let space = PasidSpace::new();
        let owner = space.register_owner(None);
        assert_eq!(space.allocate(Scope::Global, owner), Ok(1));
        assert_eq!(space.allocate(Scope::Device(8), owner), Ok(2));
        assert!(!space.is_allocated(Scope::Global, RESERVED_PASID));
        assert_eq!(
            space.free(Scope::Global, RESERVED_PASID),
            Err(PasidError::NotAllocated {
                scope: Scope::Global,
                pasid: 0
            })
        );
    }

    #[test]
    fn global_never_collides_with_device_scoped() {
        let space = PasidSpace::new();
        let owner = space.register_owner(None);
        let d1 = space.allocate(Scope::Device(0x10), owner).unwrap();
        let d2 = space.allocate(Scope::Device(0x18), owner).unwrap();
        assert_eq!(d1, d2, "device spaces are independent of each other");
        let g = space.allocate(Scope::Global, owner).unwrap();
        assert_ne!(g, d1);
        let d3 = space.allocate(Scope::Device(0x10), owner).unwrap();
        assert_ne!(d3, g, "a device-scoped PASID is never a global one");
        space.free(Scope::Device(0x10), d1).unwrap();
        assert_eq!(
            space.allocate(Scope::Global, owner).unwrap(),
            4,
            "1 is still used by 0x18, 3 by 0x10"
        );
        space.free(Scope::Device(0x18), d2).unwrap();
        assert_eq!(space.allocate(Scope::Global, owner), Ok(d1));
    }

    #[test]
    fn limits_and_charges() {
        let space = PasidSpace::new();
        let guest = space.register_owner(Some(2));
        let vmm = space.register_owner(None);
        let a = space.allocate(Scope::Global, guest).unwrap();
        space.allocate(Scope::Device(1), guest).unwrap();
        assert_eq!(
            space.allocate(Scope::Global, guest),
            Err(PasidError::OverLimit {
                owner: guest,
                limit: 2
            })
        );
        assert!(
            space.allocate(Scope::Global, vmm).is_ok(),
            "limits are per owner"
        );
        assert_eq!(space.charged(guest), Ok(2));
        assert_eq!(space.free(Scope::Global, a), Ok(guest));
        assert_eq!(space.charged(guest), Ok(1));
        assert!(space.allocate(Scope::Global, guest).is_ok());
        assert_eq!(
            space.charged(OwnerId(99)),
            Err(PasidError::UnknownOwner(OwnerId(99)))
        );
        assert_eq!(
            space.allocate(Scope::Global, OwnerId(99)),
            Err(PasidError::UnknownOwner(OwnerId(99)))
        );
    }

    #[test]
    fn double_free_is_an_error() {
        let space = PasidSpace::new();
        let owner = space.register_owner(None);
        let p = space.allocate(Scope::Global, owner).unwrap();
        assert_eq!(space.free(Scope::Global, p), Ok(owner));
        assert_eq!(
            space.free(Scope::Global, p),
            Err(PasidError::NotAllocated {
                scope: Scope::Global,
                pasid: p
            })
        );
        assert_eq!(
            space.free(Scope::Device(3), p),
            Err(PasidError::NotAllocated {
                scope: Scope::Device(3),
                pasid: p
            })
        );
        assert_eq!(space.charged(owner), Ok(0));
    }

    #[test]
    fn exhaustion_global() {
        let space = PasidSpace::new();
        let owner = space.register_owner(None);
        for _ in 0..PASID_COUNT - 1 {
            space.allocate(Scope::Global, owner).unwrap();
        }
        assert_eq!(
            space.allocate(Scope::Global, owner),
            Err(PasidError::NoSpace(Scope::Global))
        );
        assert_eq!(
            space.allocate(Scope::Device(5), owner),
            Err(PasidError::NoSpace(Scope::Device(5)))
        );
        space.free(Scope::Global, 0x5_4321).unwrap();
        assert_eq!(space.allocate(Scope::Global, owner), Ok(0x5_4321));
        assert_eq!(
            space.allocate(Scope::Global, owner),
            Err(PasidError::NoSpace(Scope::Global))
        );
        assert_eq!(space.charged(owner), Ok(PASID_COUNT - 1));
    }
}
