//! One guest's PASIDs: its gPASID -> hPASID table, the check with the
//! vIOMMU that fills it lazily, its teardown, and the map that keeps
//! IA32_PASID following the guest's address spaces.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard};

use super::write_log::DeviceWriteLog;
use pasid::{Ia32Pasid, OwnerId, PasidSpace, PasidTable, Scope, PASID_MAX, RESERVED_PASID};
use pci::PciAddress;
use thiserror::Error;
use viommu::{Generation, PasidCacheScope, PasidObserver};

/// CR3 bits that name the page-table root of an address space: PCID
/// (bits 11:0) and bit 12, which tells Linux's PTI user PGD from its kernel
/// PGD (the pair is one address space), are left out; so are bits 63:52.
pub const ADDRESS_SPACE_MASK: u64 = 0x000f_ffff_ffff_e000;

/// The address-space key of a CR3 value (or of a first-stage page-table
/// pointer).
pub fn address_space_key(cr3: u64) -> u64 {
    cr3 & ADDRESS_SPACE_MASK
}

/// Most host PASIDs one guest may hold: a guest filling its table with
/// garbage PASIDs (possible without a vIOMMU) cannot take the host's space.
pub const GUEST_PASID_LIMIT: u32 = 1 << 16;

/// What the vIOMMU says about a guest PASID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PasidSetup {
    /// The address-space key of the entry's first-stage page-table pointer
    /// when it translates through a first stage (first-stage or nested),
    /// `None` for second-stage-only and pass-through entries.
    pub first_stage_root: Option<u64>,
}

/// Who knows whether the guest set a PASID up: the vIOMMU's PASID tables.
pub trait PasidAuthority: Send + Sync {
    /// The guest's PASID-table entry for `gpasid`, as device `rid` would
    /// use it (any device behind the unit when `rid` is `None`); `None` when
    /// the guest has no present entry for it.
    fn pasid_setup(&self, rid: Option<PciAddress>, gpasid: u32) -> Option<PasidSetup>;

    /// A count that moves on whenever an answer of
    /// [`PasidAuthority::lasting_setup`] that was lasting may change (the
    /// vIOMMU's invalidation generation); `None` when no answer lasts.
    fn generation(&self) -> Option<Generation> {
        None
    }

    /// [`PasidAuthority::pasid_setup`] for any device, and whether the
    /// answer lasts until [`PasidAuthority::generation`] moves on (a present
    /// entry the vIOMMU caches: only an invalidation or a translation-mode
    /// change replaces it).
    fn lasting_setup(&self, gpasid: u32) -> (Option<PasidSetup>, bool) {
        (self.pasid_setup(None, gpasid), false)
    }
}

/// A vCPU's memo of its last [`GuestPasids::enqcmd_pasid_hinted`] answer:
/// a hint, re-validated at every use against the generations it was made
/// in, never trusted past a change of the address-space records or of the
/// authority's cached entries.
#[derive(Clone, Copy, Debug, Default)]
pub struct EnqcmdPasidHint {
    memo: Option<EnqcmdPasidMemo>,
}

#[derive(Clone, Copy, Debug)]
struct EnqcmdPasidMemo {
    key: u64,
    records: u64,
    authority: Option<u64>,
    value: u64,
}

/// Why a guest PASID has no host PASID.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Error)]
pub enum PasidMiss {
    /// The vIOMMU has no PASID-table entry for it: the guest never set it
    /// up, or tore it down.
    #[error("guest PASID {0:#x} is not set up in the vIOMMU")]
    NotSetUp(u32),
    /// PASID 0 or a value wider than 20 bits.
    #[error("guest PASID {0:#x} cannot be translated")]
    Invalid(u32),
    /// The host space, or this guest's share of it, is exhausted.
    #[error("no host PASID for guest PASID {gpasid:#x}: {error}")]
    NoHostPasid {
        /// The guest PASID.
        gpasid: u32,
        /// The host space's answer.
        error: pasid::Error,
    },
}

/// Called with each host PASID whose translations went away (its mapping
/// was removed, or the guest tore down the guest PASID it stands for):
/// devices drop what they cached under it.
pub type HostPasidFreed = Arc<dyn Fn(u32) + Send + Sync>;

/// Asked, for a host PASID the guest tore down, whether a device still
/// holds work or configuration tagged with it.
pub type HostPasidInUse = Arc<dyn Fn(u32) -> bool + Send + Sync>;

/// One guest's PASID state, shared by its vCPUs, its devices and the vIOMMU
/// (as a [`PasidObserver`]).
///
/// - Host PASIDs come from the process-wide [`PasidSpace`], charged to the
///   guest, so two guests never hold the same host PASID.
/// - [`GuestPasids::host_pasid`] fills the table lazily: a miss asks the
///   [`PasidAuthority`] (the vIOMMU) whether the guest has that PASID set
///   up, and only then allocates. Without an authority (no vIOMMU) every
///   guest PASID in 1..2^20 is accepted: there is no table to check against
///   and no teardown signal, so mappings live until the guest goes away,
///   bounded by [`GUEST_PASID_LIMIT`].
/// - A PASID-cache invalidation re-checks the PASIDs it covers and removes
///   those the guest no longer has. A removed mapping's host PASID goes
///   back to the space only once no device of the guest can use it:
///   after every enqueue that translated the guest PASID before the
///   removal has reached its device ([`GuestPasids::submission`]), and
///   after no device holds a queued or running descriptor, or an enabled
///   dedicated WQ, with it ([`GuestPasids::on_host_pasid_in_use`]). Until
///   then it is *retired*: charged to the guest, mapping back to nothing
///   (the device's requests with it fail translation, as they would on
///   hardware once the guest's PASID entry is gone). Retired host PASIDs
///   are freed at the next removal, on a miss, or when the guest goes
///   away.
/// - Where the device must be handed some PASID for a guest PASID the
///   vIOMMU does not confirm (WQCFG.PASID at Enable WQ), the guest PASID
///   gets an *unverified* host PASID, kept
///   apart from the table (ENQCMD never uses it): it maps back to its guest
///   PASID, so the device's requests reach the vIOMMU with the guest's
///   PASID and fail (or succeed, once the guest sets it up) exactly as the
///   guest's tables say, and SWERROR names the guest PASID. PASID 0 and
///   values wider than 20 bits get the quarantine host PASID, which maps
///   back to nothing.
pub struct GuestPasids {
    table: PasidTable,
    quarantine: u32,
    unverified: Mutex<Unverified>,
    authority: OnceLock<Authority>,
    /// Address-space key -> guest PASID (see [`GuestPasids::enqcmd_pasid`]).
    address_spaces: Mutex<HashMap<u64, u32>>,
    /// Moves on with every change of `address_spaces` (under its lock):
    /// what an [`EnqcmdPasidHint`] is re-validated against.
    records: AtomicU64,
    freed: RwLock<Vec<HostPasidFreed>>,
    /// (requester ID, host PASID) of the DMA requests devices made through
    /// the vIOMMU (see [`GuestPasids::device_requests`]).
    device_requests: RwLock<BTreeSet<(PciAddress, u32)>>,
    /// The devices' last writes (see [`GuestPasids::device_writes`]).
    device_writes: DeviceWriteLog,
    /// Held shared by each enqueue from its translation to its arrival in
    /// the device, exclusively by a removal between unmapping and retiring.
    submissions: RwLock<()>,
    in_use: RwLock<Vec<HostPasidInUse>>,
    /// Unmapped host PASIDs a device may still use; charged to the guest.
    retired: Mutex<Vec<u32>>,
    /// Device requests tagged with a host PASID charged to another owner.
    foreign_requests: AtomicU64,
}

/// The judge of which guest PASIDs exist, and its generation.
struct Authority {
    judge: Arc<dyn PasidAuthority>,
    generation: Option<Generation>,
}

/// Host PASIDs of guest PASIDs the vIOMMU did not confirm, both ways.
#[derive(Default)]
struct Unverified {
    by_guest: HashMap<u32, u32>,
    by_host: HashMap<u32, u32>,
}

fn read<T: ?Sized>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T: ?Sized>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

impl GuestPasids {
    /// The PASID state of a new guest called `name`, charged in `space`.
    pub fn new(space: Arc<PasidSpace>, name: &str) -> Result<Self, pasid::Error> {
        let owner = space.add_owner(name, Some(GUEST_PASID_LIMIT));
        let quarantine = space.alloc(owner, Scope::Global)?;
        let table = PasidTable::new(space, owner)?;
        Ok(Self {
            table,
            quarantine,
            unverified: Mutex::new(Unverified::default()),
            authority: OnceLock::new(),
            address_spaces: Mutex::new(HashMap::new()),
            records: AtomicU64::new(0),
            freed: RwLock::new(Vec::new()),
            device_requests: RwLock::new(BTreeSet::new()),
            device_writes: DeviceWriteLog::default(),
            submissions: RwLock::new(()),
            in_use: RwLock::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            foreign_requests: AtomicU64::new(0),
        })
    }

    /// The last writes this guest's devices made through the vIOMMU
    /// adapter, for a triple-fault report.
    pub fn device_writes(&self) -> &DeviceWriteLog {
        &self.device_writes
    }

    /// The guest's owner in the host space.
    pub fn owner(&self) -> OwnerId {
        self.table.owner()
    }

    /// The guest's gPASID -> hPASID table.
    pub fn table(&self) -> &PasidTable {
        &self.table
    }

    /// The host PASID that stands for "no host PASID": charged to this
    /// guest, never mapped back to a guest PASID.
    pub fn quarantine(&self) -> u32 {
        self.quarantine
    }

    /// Makes `authority` (the vIOMMU) the judge of which guest PASIDs exist.
    /// A guest has one vIOMMU for its life: a second authority is refused
    /// (logged) and the first stays.
    pub fn set_authority(&self, authority: Arc<dyn PasidAuthority>) {
        let generation = authority.generation();
        let authority = Authority {
            judge: authority,
            generation,
        };
        if self.authority.set(authority).is_err() {
            log::error!("{}: a second PASID authority ignored", self.owner());
        }
    }

    /// Calls `f` with every host PASID the table gives up.
    pub fn on_host_pasid_freed(&self, f: HostPasidFreed) {
        write(&self.freed).push(f);
    }

    /// Registers `f` to be asked whether a device still uses a host PASID
    /// the guest tore down (one per device).
    pub fn on_host_pasid_in_use(&self, f: HostPasidInUse) {
        write(&self.in_use).push(f);
    }

    /// Held by an enqueue (ENQCMD/ENQCMDS at a portal) from the guest
    /// PASID's translation until the descriptor is in the device's queue: a
    /// removal of the mapping waits for it before the host PASID can be
    /// freed.
    pub fn submission(&self) -> RwLockReadGuard<'_, ()> {
        read(&self.submissions)
    }

    /// Host PASIDs unmapped but not yet freed (a device may still use them).
    pub fn retired(&self) -> Vec<u32> {
        self.lock_retired().clone()
    }

    fn lock_retired(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.retired.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Frees the retired host PASIDs no device uses any more.
    pub fn reap_retired(&self) {
        let users = read(&self.in_use).clone();
        let mut retired = self.lock_retired();
        if retired.is_empty() {
            return;
        }
        let space = self.table.space();
        let owner = self.table.owner();
        retired.retain(|&hpasid| {
            if users.iter().any(|in_use| in_use(hpasid)) {
                return true;
            }
            if let Err(e) = space.free(owner, Scope::Global, hpasid) {
                log::error!("{owner}: freeing retired host PASID {hpasid:#x}: {e}");
            }
            false
        });
    }

    /// How many device requests carried a host PASID charged to another
    /// owner when they were made: what the teardown order rules out.
    pub fn foreign_requests(&self) -> u64 {
        self.foreign_requests.load(Ordering::Relaxed)
    }

    fn authority(&self) -> Option<&Arc<dyn PasidAuthority>> {
        self.authority.get().map(|a| &a.judge)
    }

    /// The authority's generation now, if its answers can last.
    fn authority_generation(&self) -> Option<u64> {
        self.authority
            .get()
            .and_then(|a| a.generation.as_ref())
            .map(Generation::get)
    }

    /// The host PASID of `gpasid` for device `rid`, filling the table on a
    /// miss once the vIOMMU confirms the guest set the PASID up.
    pub fn host_pasid(&self, rid: Option<PciAddress>, gpasid: u32) -> Result<u32, PasidMiss> {
        if gpasid == RESERVED_PASID || gpasid > PASID_MAX {
            return Err(PasidMiss::Invalid(gpasid));
        }
        if let Ok(hpasid) = self.table.translate(gpasid) {
            return Ok(hpasid);
        }
        if let Some(authority) = self.authority() {
            if authority.pasid_setup(rid, gpasid).is_none() {
                log::debug!("guest PASID {gpasid:#x}: no PASID-table entry, not mapped");
                return Err(PasidMiss::NotSetUp(gpasid));
            }
        }
        self.reap_retired();
        let hpasid = self
            .table
            .install(gpasid)
            .map_err(|error| PasidMiss::NoHostPasid { gpasid, error })?;
        log::info!("guest PASID {gpasid:#x} -> host PASID {hpasid:#x}");
        Ok(hpasid)
    }

    /// The host PASID a device gets for a PASID the guest programmed into
    /// it: [`GuestPasids::host_pasid`]; for a guest PASID the vIOMMU does
    /// not confirm, its unverified host PASID (allocated on first use); the
    /// quarantine PASID for PASID 0, values wider than 20 bits and an
    /// exhausted space.
    pub fn host_pasid_for_device(&self, rid: Option<PciAddress>, gpasid: u32) -> u32 {
        match self.host_pasid(rid, gpasid) {
            Ok(hpasid) => hpasid,
            Err(PasidMiss::NotSetUp(_)) => self.unverified_host_pasid(gpasid),
            Err(miss) => {
                log::debug!(
                    "{miss}; the device gets quarantine PASID {:#x}",
                    self.quarantine
                );
                self.quarantine
            }
        }
    }

    fn lock_unverified(&self) -> std::sync::MutexGuard<'_, Unverified> {
        self.unverified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn unverified_host_pasid(&self, gpasid: u32) -> u32 {
        let mut unverified = self.lock_unverified();
        if let Some(&hpasid) = unverified.by_guest.get(&gpasid) {
            return hpasid;
        }
        let space = self.table.space();
        match space.alloc(self.table.owner(), Scope::Global) {
            Ok(hpasid) => {
                log::debug!(
                    "guest PASID {gpasid:#x} not set up: unverified host PASID {hpasid:#x}"
                );
                unverified.by_guest.insert(gpasid, hpasid);
                unverified.by_host.insert(hpasid, gpasid);
                hpasid
            }
            Err(e) => {
                log::debug!("guest PASID {gpasid:#x}: {e}; quarantine PASID");
                self.quarantine
            }
        }
    }

    /// The guest PASID of host PASID `hpasid`, if it is one of this guest's
    /// (mapped, or unverified).
    pub fn guest_pasid(&self, hpasid: u32) -> Option<u32> {
        self.table
            .guest_of(hpasid)
            .or_else(|| self.lock_unverified().by_host.get(&hpasid).copied())
    }

    /// [`GuestPasids::guest_pasid`] for a DMA request of device `rid`:
    /// records the request ([`GuestPasids::device_requests`]) and, when the
    /// host PASID maps back to nothing, checks that it is not another
    /// owner's.
    pub fn guest_pasid_of_request(&self, rid: PciAddress, hpasid: u32) -> Option<u32> {
        self.note_device_request(rid, hpasid);
        let gpasid = self.guest_pasid(hpasid);
        if gpasid.is_none() {
            self.check_unmapped_request(rid, hpasid);
        }
        gpasid
    }

    /// Every host PASID that stands for `gpasid`: its mapping and its
    /// unverified host PASID, if any.
    pub fn host_pasids_of(&self, gpasid: u32) -> Vec<u32> {
        let mut all: Vec<u32> = self.table.translate(gpasid).into_iter().collect();
        all.extend(self.lock_unverified().by_guest.get(&gpasid));
        all
    }

    /// Notes that device `rid` made a DMA request tagged with host PASID
    /// `hpasid` (the vIOMMU adapter calls it for every PASID-tagged request).
    pub fn note_device_request(&self, rid: PciAddress, hpasid: u32) {
        if !read(&self.device_requests).contains(&(rid, hpasid)) {
            write(&self.device_requests).insert((rid, hpasid));
        }
    }

    /// Checks a device request's host PASID that maps back to no guest
    /// PASID: it must still be this guest's (retired, unverified or the
    /// quarantine) or free, never another owner's.
    fn check_unmapped_request(&self, rid: PciAddress, hpasid: u32) {
        let owner = self.table.space().owner_of(Scope::Global, hpasid);
        if owner.is_some_and(|o| o != self.table.owner()) {
            self.foreign_requests.fetch_add(1, Ordering::Relaxed);
            log::error!(
                "{rid}: a request with host PASID {hpasid:#x}, which is {}'s",
                owner.map_or_else(String::new, |o| o.to_string())
            );
        }
    }

    /// Every (device, host PASID) a device of this guest tagged a DMA
    /// request with, through the vIOMMU: what tests check to see that the
    /// devices work in host PASIDs.
    pub fn device_requests(&self) -> Vec<(PciAddress, u32)> {
        read(&self.device_requests).iter().copied().collect()
    }

    /// Removes the mapping of `gpasid` and returns its host PASID, which
    /// is freed once no device can use it (see the type's notes); devices
    /// drop what they cached under it through the
    /// [`GuestPasids::on_host_pasid_freed`] callbacks.
    pub fn remove(&self, gpasid: u32) -> Option<u32> {
        let hpasid = self.table.unmap(gpasid).ok()?;
        // An enqueue that translated `gpasid` before the unmap has its
        // descriptor in the device once this lock is taken; later ones
        // miss.
        drop(write(&self.submissions));
        log::debug!("guest PASID {gpasid:#x} torn down; host PASID {hpasid:#x} retired");
        self.forget_address_spaces(|_, g| g == gpasid);
        let unverified = self.lock_unverified().by_guest.get(&gpasid).copied();
        for f in read(&self.freed).iter() {
            f(hpasid);
            // What was cached through the guest's entry is gone too.
            if let Some(h) = unverified {
                f(h);
            }
        }
        self.lock_retired().push(hpasid);
        self.reap_retired();
        Some(hpasid)
    }

    /// A guest WRMSR to IA32_PASID (already checked for reserved bits) with
    /// CR3 `cr3`: the running address space now uses that PASID, or none
    /// when the valid bit is clear.
    pub fn record_msr_write(&self, cr3: u64, value: u64) {
        let key = address_space_key(cr3);
        let mut spaces = self
            .address_spaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if value & Ia32Pasid::VALID != 0 {
            spaces.insert(key, (value & Ia32Pasid::PASID_MASK) as u32);
        } else {
            spaces.remove(&key);
        }
        self.records.fetch_add(1, Ordering::Release);
    }

    /// The IA32_PASID value an ENQCMD executed with CR3 `cr3` uses: the
    /// PASID recorded for that address space, or 0 (not valid: the ENQCMD
    /// takes #GP) when it has none.
    ///
    /// With a vIOMMU the recorded PASID is checked first: if the guest's
    /// PASID-table entry for it now translates through another address
    /// space's page tables, the record is stale (the page-table root was
    /// reused) and is dropped. A PASID with no entry at all keeps its
    /// record: the ENQCMD goes out with it and the portal refuses it, as
    /// hardware would send it and fail it.
    pub fn enqcmd_pasid(&self, cr3: u64) -> u64 {
        self.enqcmd_pasid_lasting(cr3).0
    }

    /// [`GuestPasids::enqcmd_pasid`] for a vCPU that keeps `hint`: the
    /// vCPU's last answer when it was for the same address space and
    /// neither the address-space records nor the authority's cached entries
    /// changed since (two atomic loads instead of a locked map and a
    /// vIOMMU lookup on every trapped ENQCMD); else looked up and
    /// remembered where it lasts.
    pub fn enqcmd_pasid_hinted(&self, cr3: u64, hint: &mut EnqcmdPasidHint) -> u64 {
        let key = address_space_key(cr3);
        // Read before the lookup: a change racing with it leaves the memo
        // stale from birth.
        let records = self.records.load(Ordering::Acquire);
        let authority = self.authority_generation();
        if let Some(m) = hint.memo {
            if m.key == key && m.records == records && m.authority == authority {
                return m.value;
            }
        }
        let (value, lasting) = self.enqcmd_pasid_lasting(cr3);
        hint.memo = lasting.then_some(EnqcmdPasidMemo {
            key,
            records,
            authority,
            value,
        });
        value
    }

    /// [`GuestPasids::enqcmd_pasid`], and whether the answer lasts until
    /// the records or the authority's generation change.
    fn enqcmd_pasid_lasting(&self, cr3: u64) -> (u64, bool) {
        let key = address_space_key(cr3);
        let recorded = self
            .address_spaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .copied();
        let Some(gpasid) = recorded else {
            return (0, true);
        };
        let Some(authority) = self.authority() else {
            return (Ia32Pasid::VALID | u64::from(gpasid), true);
        };
        let (setup, lasting) = authority.lasting_setup(gpasid);
        let root = setup.and_then(|s| s.first_stage_root);
        if root.is_some_and(|root| root != key) {
            log::debug!(
                "address space {key:#x}: guest PASID {gpasid:#x} now translates through \
                 {:#x}; dropped",
                root.unwrap_or(0)
            );
            self.forget_address_spaces(|space, _| space == key);
            return (0, false);
        }
        // A PASID with no entry may get one without an invalidation.
        (
            Ia32Pasid::VALID | u64::from(gpasid),
            setup.is_some() && lasting && self.authority_generation().is_some(),
        )
    }

    fn forget_address_spaces(&self, pred: impl Fn(u64, u32) -> bool) {
        let mut spaces = self
            .address_spaces
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        spaces.retain(|&space, &mut gpasid| !pred(space, gpasid));
        self.records.fetch_add(1, Ordering::Release);
    }

    /// Re-checks the guest PASIDs that `scope` covers (mapped, or recorded
    /// for an address space) against the authority; those the guest no
    /// longer has lose their mapping, their host PASID and their address
    /// spaces.
    fn revalidate(&self, scope: PasidCacheScope) {
        let Some(authority) = self.authority() else {
            return;
        };
        let mut candidates: Vec<u32> = match scope {
            PasidCacheScope::Pasid { pasid, .. } => vec![pasid],
            PasidCacheScope::Domain { .. } | PasidCacheScope::Global => {
                let mut all: Vec<u32> = self.table.entries().into_iter().map(|(g, _)| g).collect();
                all.extend(
                    self.address_spaces
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .values(),
                );
                all
            }
        };
        candidates.sort_unstable();
        candidates.dedup();
        for gpasid in candidates {
            if authority.pasid_setup(None, gpasid).is_none() {
                self.remove(gpasid);
                self.forget_address_spaces(|_, g| g == gpasid);
            }
        }
    }
}

impl PasidObserver for GuestPasids {
    fn pasid_cache_invalidated(&self, scope: PasidCacheScope) {
        self.revalidate(scope);
    }
}

impl Drop for GuestPasids {
    fn drop(&mut self) {
        self.table.clear();
        // The devices are gone with the last reference to the guest.
        let retired = std::mem::take(&mut *self.lock_retired());
        let space = self.table.space().clone();
        let owner = self.table.owner();
        let unverified = std::mem::take(&mut *self.lock_unverified());
        let held = std::iter::once(self.quarantine)
            .chain(unverified.by_host.into_keys())
            .chain(retired);
        for hpasid in held {
            if let Err(e) = space.free(owner, Scope::Global, hpasid) {
                log::error!("{owner}: freeing host PASID {hpasid:#x}: {e}");
            }
        }
        // Nothing is charged any more (the table's own drop finds it empty).
        if let Err(e) = space.remove_owner(owner) {
            log::error!("{owner}: leaving the host PASID space: {e}");
        }
    }
}
