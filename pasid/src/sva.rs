//! Shared Virtual Addressing bindings (rule 6).
//!
//! Binding an address space to a device returns a handle. The first binding
//! of an address space gives it a PASID (global scope, so ENQCMD can use it
//! on any device), and the address space keeps that PASID for its whole
//! life: unbinding never frees it, [`SvaRegistry::release_address_space`]
//! does.
//!
//! The binding of an address space to one device goes through a domain.
//! Binding the same address space to the same device again returns a second,
//! distinct handle on the same domain and PASID; unbinding one handle leaves
//! the other working, and the domain goes away with its last handle.
//!
//! A task that loaded its address space's PASID into IA32_PASID (to use
//! ENQCMD) holds a separate per-task reference: taking it twice is
//! [`Error::TaskRefHeld`], dropping it when not held does nothing.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use crate::space::{OwnerId, PasidSpace, RequesterId, Scope};
use crate::{lock, Error, Result};

/// An address space (a guest process's page tables), as the VMM names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddressSpaceId(pub u64);

impl fmt::Display for AddressSpaceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "address space {:#x}", self.0)
    }
}

/// A task (thread) that may load its address space's PASID into its MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "task {}", self.0)
    }
}

/// One binding of an address space to a device. Never reused within a
/// registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvaHandle(u64);

impl fmt::Display for SvaHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SVA handle {}", self.0)
    }
}

/// The domain through which a device reaches an address space. Never reused
/// within a registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomainId(u64);

/// What a handle stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The handle.
    pub handle: SvaHandle,
    /// The bound address space.
    pub address_space: AddressSpaceId,
    /// The device it is bound to.
    pub device: RequesterId,
    /// The domain shared by every handle of this address space and device.
    pub domain: DomainId,
    /// The address space's PASID (global scope).
    pub pasid: u32,
}

struct Domain {
    id: DomainId,
    handles: u32,
}

#[derive(Default)]
struct State {
    /// Live address spaces and their PASIDs.
    pasids: HashMap<AddressSpaceId, u32>,
    domains: HashMap<(AddressSpaceId, RequesterId), Domain>,
    handles: HashMap<SvaHandle, (AddressSpaceId, RequesterId)>,
    /// Tasks holding their address space's PASID in the MSR.
    tasks: HashMap<TaskId, AddressSpaceId>,
    next_handle: u64,
    next_domain: u64,
}

impl State {
    fn binding(&self, handle: SvaHandle) -> Result<Binding> {
        let &(address_space, device) = self
            .handles
            .get(&handle)
            .ok_or(Error::UnknownHandle(handle))?;
        Ok(Binding {
            handle,
            address_space,
            device,
            domain: self.domains[&(address_space, device)].id,
            pasid: self.pasids[&address_space],
        })
    }
}

/// One guest's SVA bindings. Share it behind an `Arc`; every method takes
/// `&self`.
pub struct SvaRegistry {
    space: Arc<PasidSpace>,
    owner: OwnerId,
    state: Mutex<State>,
}

impl SvaRegistry {
    /// An empty registry whose PASIDs come from `space`, charged to `owner`.
    pub fn new(space: Arc<PasidSpace>, owner: OwnerId) -> Result<Self> {
        space.charged(owner)?;
        Ok(SvaRegistry {
            space,
            owner,
            state: Mutex::new(State::default()),
        })
    }

    /// The owner the PASIDs are charged to.
    pub fn owner(&self) -> OwnerId {
        self.owner
    }

    /// Binds `address_space` to `device` and returns a new handle. The first
    /// binding of the address space allocates its PASID; the first binding
    /// to this device creates the domain.
    ///
    /// Errors: the space's [`Error::OverLimit`], [`Error::NoSpace`],
    /// [`Error::UnknownOwner`]; on error nothing changes.
    pub fn bind(&self, address_space: AddressSpaceId, device: RequesterId) -> Result<Binding> {
        let mut state = lock(&self.state);
        if let Entry::Vacant(entry) = state.pasids.entry(address_space) {
            let pasid = self.space.alloc(self.owner, Scope::Global)?;
            entry.insert(pasid);
            log::debug!("SVA: {address_space} gets PASID {pasid:#x}");
        }
        let state = &mut *state;
        let domain = state
            .domains
            .entry((address_space, device))
            .or_insert_with(|| {
                state.next_domain += 1;
                Domain {
                    id: DomainId(state.next_domain),
                    handles: 0,
                }
            });
        domain.handles += 1;
        state.next_handle += 1;
        let handle = SvaHandle(state.next_handle);
        state.handles.insert(handle, (address_space, device));
        state.binding(handle)
    }

    /// Drops one handle. Returns the domain if it went away with this, its
    /// last handle. The address space keeps its PASID.
    ///
    /// Errors: [`Error::UnknownHandle`] (never issued, already unbound, or
    /// revoked when its address space was released).
    pub fn unbind(&self, handle: SvaHandle) -> Result<Option<DomainId>> {
        let mut state = lock(&self.state);
        let key = state
            .handles
            .remove(&handle)
            .ok_or(Error::UnknownHandle(handle))?;
        let Some(domain) = state.domains.get_mut(&key) else {
            return Ok(None);
        };
        domain.handles -= 1;
        if domain.handles > 0 {
            return Ok(None);
        }
        let id = domain.id;
        state.domains.remove(&key);
        log::debug!("SVA: domain {} of {} on {} released", id.0, key.0, key.1);
        Ok(Some(id))
    }

    /// What `handle` stands for.
    pub fn binding(&self, handle: SvaHandle) -> Result<Binding> {
        lock(&self.state).binding(handle)
    }

    /// The PASID of a live address space.
    pub fn pasid(&self, address_space: AddressSpaceId) -> Option<u32> {
        lock(&self.state).pasids.get(&address_space).copied()
    }

    /// The domain binding `address_space` to `device`, while it has handles.
    pub fn domain(&self, address_space: AddressSpaceId, device: RequesterId) -> Option<DomainId> {
        let state = lock(&self.state);
        state.domains.get(&(address_space, device)).map(|d| d.id)
    }

    /// The address space ended: its PASID is freed, and whatever still
    /// refers to it goes too. Returns the handles thus revoked (sorted), whose
    /// devices the VMM must stop.
    ///
    /// Errors: [`Error::UnknownAddressSpace`].
    pub fn release_address_space(&self, address_space: AddressSpaceId) -> Result<Vec<SvaHandle>> {
        let mut state = lock(&self.state);
        let pasid = state
            .pasids
            .remove(&address_space)
            .ok_or(Error::UnknownAddressSpace(address_space))?;
        let mut revoked: Vec<SvaHandle> = state
            .handles
            .iter()
            .filter(|(_, key)| key.0 == address_space)
            .map(|(&handle, _)| handle)
            .collect();
        revoked.sort_unstable();
        for handle in &revoked {
            state.handles.remove(handle);
        }
        state.domains.retain(|key, _| key.0 != address_space);
        state.tasks.retain(|_, space| *space != address_space);
        self.space.free(self.owner, Scope::Global, pasid)?;
        log::debug!(
            "SVA: {address_space} released PASID {pasid:#x}, revoked {} handles",
            revoked.len()
        );
        Ok(revoked)
    }

    /// Takes `task`'s reference on the PASID of `address_space` and returns
    /// the PASID to load into its IA32_PASID.
    ///
    /// Errors: [`Error::TaskRefHeld`] if the task already holds it,
    /// [`Error::UnknownAddressSpace`] if the address space has no PASID.
    pub fn take_task_ref(&self, task: TaskId, address_space: AddressSpaceId) -> Result<u32> {
        let mut state = lock(&self.state);
        if state.tasks.contains_key(&task) {
            return Err(Error::TaskRefHeld(task));
        }
        let pasid = *state
            .pasids
            .get(&address_space)
            .ok_or(Error::UnknownAddressSpace(address_space))?;
        state.tasks.insert(task, address_space);
        Ok(pasid)
    }

    /// Drops `task`'s reference; returns whether it held one (dropping an
    /// absent reference does nothing).
    pub fn drop_task_ref(&self, task: TaskId) -> bool {
        lock(&self.state).tasks.remove(&task).is_some()
    }

    /// The PASID `task` holds a reference on.
    pub fn task_pasid(&self, task: TaskId) -> Option<u32> {
        let state = lock(&self.state);
        state.tasks.get(&task).map(|space| state.pasids[space])
    }
}

impl Drop for SvaRegistry {
    fn drop(&mut self) {
        let state = lock(&self.state);
        for &pasid in state.pasids.values() {
            if let Err(err) = self.space.free(self.owner, Scope::Global, pasid) {
                log::error!("SVA: freeing PASID {pasid:#x} on teardown: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MM: AddressSpaceId = AddressSpaceId(0x1000);
    const MM2: AddressSpaceId = AddressSpaceId(0x2000);
    const DEV: RequesterId = RequesterId(0x0100);
    const DEV2: RequesterId = RequesterId(0x0108);

    fn registry(limit: Option<u32>) -> (Arc<PasidSpace>, SvaRegistry) {
        let space = Arc::new(PasidSpace::new());
        let guest = space.add_owner("guest", limit);
        let registry = SvaRegistry::new(space.clone(), guest).unwrap();
        (space, registry)
    }

    #[test]
    fn same_address_space_and_device_twice_gives_two_handles_one_domain_one_pasid() {
        let (space, sva) = registry(None);
        let first = sva.bind(MM, DEV).unwrap();
        let second = sva.bind(MM, DEV).unwrap();
        assert_ne!(first.handle, second.handle);
        assert_eq!(first.domain, second.domain);
        assert_eq!(first.pasid, second.pasid);
        assert_eq!(space.charged(sva.owner()), Ok(1));
        assert_eq!(
            space.owner_of(Scope::Global, first.pasid),
            Some(sva.owner())
        );
        // Unbinding one leaves the other working.
        assert_eq!(sva.unbind(first.handle), Ok(None));
        assert_eq!(sva.binding(second.handle), Ok(second));
        assert_eq!(sva.domain(MM, DEV), Some(second.domain));
        // The domain goes with its last handle, the PASID stays.
        assert_eq!(sva.unbind(second.handle), Ok(Some(second.domain)));
        assert_eq!(sva.domain(MM, DEV), None);
        assert_eq!(sva.pasid(MM), Some(first.pasid));
        assert_eq!(space.charged(sva.owner()), Ok(1));
        // A new binding reuses the PASID through a new domain.
        let third = sva.bind(MM, DEV).unwrap();
        assert_eq!(third.pasid, first.pasid);
        assert_ne!(third.domain, first.domain);
    }

    #[test]
    fn devices_get_their_own_domain_address_spaces_their_own_pasid() {
        let (_space, sva) = registry(None);
        let a = sva.bind(MM, DEV).unwrap();
        let b = sva.bind(MM, DEV2).unwrap();
        let c = sva.bind(MM2, DEV).unwrap();
        assert_eq!(a.pasid, b.pasid);
        assert_ne!(a.domain, b.domain);
        assert_ne!(a.pasid, c.pasid);
        assert_ne!(a.domain, c.domain);
        assert_eq!((b.address_space, b.device), (MM, DEV2));
    }

    #[test]
    fn pasid_dies_with_the_address_space() {
        let (space, sva) = registry(None);
        let a = sva.bind(MM, DEV).unwrap();
        let b = sva.bind(MM, DEV2).unwrap();
        let other = sva.bind(MM2, DEV).unwrap();
        sva.take_task_ref(TaskId(7), MM).unwrap();
        assert_eq!(sva.release_address_space(MM), Ok(vec![a.handle, b.handle]));
        assert_eq!(space.owner_of(Scope::Global, a.pasid), None);
        assert_eq!(space.charged(sva.owner()), Ok(1));
        assert_eq!(sva.pasid(MM), None);
        assert_eq!(sva.domain(MM, DEV), None);
        assert_eq!(sva.task_pasid(TaskId(7)), None);
        assert_eq!(sva.unbind(a.handle), Err(Error::UnknownHandle(a.handle)));
        assert_eq!(sva.binding(other.handle), Ok(other));
        assert_eq!(
            sva.release_address_space(MM),
            Err(Error::UnknownAddressSpace(MM))
        );
        // Released with no binding left: the PASID is freed all the same.
        sva.unbind(other.handle).unwrap();
        assert_eq!(sva.release_address_space(MM2), Ok(vec![]));
        assert_eq!(space.charged(sva.owner()), Ok(0));
    }

    #[test]
    fn unknown_and_double_unbind() {
        let (_space, sva) = registry(None);
        let a = sva.bind(MM, DEV).unwrap();
        let bogus = SvaHandle(999);
        assert_eq!(sva.unbind(bogus), Err(Error::UnknownHandle(bogus)));
        assert_eq!(sva.binding(bogus), Err(Error::UnknownHandle(bogus)));
        assert_eq!(sva.unbind(a.handle), Ok(Some(a.domain)));
        assert_eq!(sva.unbind(a.handle), Err(Error::UnknownHandle(a.handle)));
    }

    #[test]
    fn task_reference() {
        let (_space, sva) = registry(None);
        let task = TaskId(42);
        assert_eq!(
            sva.take_task_ref(task, MM),
            Err(Error::UnknownAddressSpace(MM))
        );
        let a = sva.bind(MM, DEV).unwrap();
        assert_eq!(sva.take_task_ref(task, MM), Ok(a.pasid));
        assert_eq!(sva.take_task_ref(task, MM), Err(Error::TaskRefHeld(task)));
        assert_eq!(sva.task_pasid(task), Some(a.pasid));
        assert!(sva.drop_task_ref(task));
        assert!(!sva.drop_task_ref(task));
        assert_eq!(sva.task_pasid(task), None);
        assert_eq!(sva.take_task_ref(task, MM), Ok(a.pasid));
    }

    #[test]
    fn bind_over_limit_changes_nothing() {
        let (space, sva) = registry(Some(1));
        sva.bind(MM, DEV).unwrap();
        assert_eq!(
            sva.bind(MM2, DEV),
            Err(Error::OverLimit {
                owner: sva.owner(),
                limit: 1
            })
        );
        assert_eq!(sva.pasid(MM2), None);
        // Binding an address space that has its PASID needs no new charge.
        assert!(sva.bind(MM, DEV2).is_ok());
        space.set_limit(sva.owner(), None).unwrap();
        assert!(sva.bind(MM2, DEV).is_ok());
    }

    #[test]
    fn dropping_the_registry_frees_its_pasids() {
        let (space, sva) = registry(None);
        sva.bind(MM, DEV).unwrap();
        sva.bind(MM2, DEV).unwrap();
        let owner = sva.owner();
        drop(sva);
        assert_eq!(space.charged(owner), Ok(0));
    }
}
