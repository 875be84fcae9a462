//! Shared Virtual Addressing bindings of address spaces to devices.
//!
//! An address space gets its PASID at its first bind and keeps it until the
//! address space ends ([`SvaRegistry::mm_exit`]), however often it is bound
//! and unbound: no reference count decides when the PASID itself is freed.
//! Each (address space, device) pair has one domain, alive while at least
//! one handle on it is; every bind returns a new handle, so binding the same
//! address space to the same device twice gives two handles on one domain
//! and one PASID, and unbinding one leaves the other working.
//!
//! A task that loaded the PASID into its IA32_PASID MSR for ENQCMD holds a
//! separate per-task reference: taking it twice is an error, dropping it
//! when absent is a no-op.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use thiserror::Error;

use crate::{OwnerId, PasidError, PasidSpace, Scope};

/// An address space (a process's mm), named by the caller.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct MmId(pub u64);
/// A device, named by the caller (e.g. its requester ID).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeviceId(pub u32);
/// A task (thread), named by the caller.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct TaskId(pub u64);
/// An SVA domain: one per bound (address space, device) pair.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct DomainId(pub u64);
/// One bind's handle.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub struct HandleId(pub u64);

/// What a bind returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvaHandle {
    /// This bind's handle.
    pub id: HandleId,
    /// The domain of the (address space, device) pair.
    pub domain: DomainId,
    /// The address space's PASID.
    pub pasid: u32,
}

/// Errors of the SVA registry.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum SvaError {
    /// No such handle (never returned, already unbound, or its address space
    /// ended).
    #[error("unknown SVA handle {0:?}")]
    UnknownHandle(HandleId),
    /// The address space has no PASID (never bound, or ended).
    #[error("address space {0:?} has no PASID")]
    UnknownMm(MmId),
    /// The task already holds its reference on the address space's PASID.
    #[error("task {task:?} already holds the PASID of {mm:?}")]
    TaskReferenceHeld {
        /// The address space.
        mm: MmId,
        /// The task.
        task: TaskId,
    },
    /// The PASID space refused the allocation.
    #[error(transparent)]
    Space(#[from] PasidError),
}

#[derive(Debug)]
struct Domain {
    id: DomainId,
    handles: usize,
}

#[derive(Debug)]
struct AddressSpace {
    pasid: u32,
    domains: HashMap<DeviceId, Domain>,
    tasks: HashSet<TaskId>,
}

#[derive(Debug, Default)]
struct Inner {
    spaces: HashMap<MmId, AddressSpace>,
    handles: HashMap<HandleId, (MmId, DeviceId)>,
    next_handle: u64,
    next_domain: u64,
}

/// One guest's SVA bindings; PASIDs are global and charged to the guest.
#[derive(Debug)]
pub struct SvaRegistry {
    space: Arc<PasidSpace>,
    owner: OwnerId,
    inner: Mutex<Inner>,
}

impl SvaRegistry {
    /// An empty registry allocating from `space` on behalf of `owner`.
    pub fn new(space: Arc<PasidSpace>, owner: OwnerId) -> Self {
        Self {
            space,
            owner,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Binds address space `mm` to `device`.
    pub fn bind(&self, mm: MmId, device: DeviceId) -> Result<SvaHandle, SvaError> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let space = match inner.spaces.entry(mm) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                // The address space's PASID: allocated at its first bind.
                let pasid = self.space.allocate(Scope::Global, self.owner)?;
                entry.insert(AddressSpace {
                    pasid,
                    domains: HashMap::new(),
                    tasks: HashSet::new(),
                })
            }
        };
        let next_domain = &mut inner.next_domain;
        let domain = space.domains.entry(device).or_insert_with(|| {
            *next_domain += 1;
            Domain {
                id: DomainId(*next_domain),
                handles: 0,
            }
        });
        domain.handles += 1;
        inner.next_handle += 1;
        let id = HandleId(inner.next_handle);
        inner.handles.insert(id, (mm, device));
        Ok(SvaHandle {
            id,
            domain: domain.id,
            pasid: space.pasid,
        })
    }

    /// Drops one handle; the domain goes with its last handle, the PASID
    /// stays with the address space.
    pub fn unbind(&self, handle: HandleId) -> Result<(), SvaError> {
        let mut inner = self.lock();
        let (mm, device) = inner
            .handles
            .remove(&handle)
            .ok_or(SvaError::UnknownHandle(handle))?;
        if let Some(space) = inner.spaces.get_mut(&mm) {
            if let Some(domain) = space.domains.get_mut(&device) {
                domain.handles -= 1;
                if domain.handles == 0 {
                    space.domains.remove(&device);
                }
            }
        }
        Ok(())
    }

    /// The domain of (`mm`, `device`), while a handle on it exists.
    pub fn domain(&self, mm: MmId, device: DeviceId) -> Option<DomainId> {
        self.lock()
            .spaces
            .get(&mm)?
            .domains
            .get(&device)
            .map(|d| d.id)
    }

    /// The PASID of `mm`, from its first bind until it ends.
    pub fn pasid(&self, mm: MmId) -> Option<u32> {
        self.lock().spaces.get(&mm).map(|s| s.pasid)
    }

    /// The address space ended: its PASID is freed, and any handles, domains
    /// and task references left on it go too. Returns the freed PASID.
    pub fn mm_exit(&self, mm: MmId) -> Result<u32, SvaError> {
        let mut inner = self.lock();
        let space = inner.spaces.remove(&mm).ok_or(SvaError::UnknownMm(mm))?;
        inner.handles.retain(|_, (m, _)| *m != mm);
        self.space.free(Scope::Global, space.pasid)?;
        Ok(space.pasid)
    }

    /// `task` loads `mm`'s PASID into its IA32_PASID. Returns the PASID.
    pub fn task_get(&self, mm: MmId, task: TaskId) -> Result<u32, SvaError> {
        let mut inner = self.lock();
        let space = inner.spaces.get_mut(&mm).ok_or(SvaError::UnknownMm(mm))?;
        if !space.tasks.insert(task) {
            return Err(SvaError::TaskReferenceHeld { mm, task });
        }
        Ok(space.pasid)
    }

    /// `task` drops its reference; a no-op if it holds none.
    pub fn task_put(&self, mm: MmId, task: TaskId) {
        if let Some(space) = self.lock().spaces.get_mut(&mm) {
            space.tasks.remove(&task);
        }
    }

    /// Whether `task` holds a reference on `mm`'s PASID.
    pub fn task_holds(&self, mm: MmId, task: TaskId) -> bool {
        self.lock()
            .spaces
            .get(&mm)
            .is_some_and(|s| s.tasks.contains(&task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry() -> (Arc<PasidSpace>, SvaRegistry) {
        let space = Arc::new(PasidSpace::new());
        let owner = space.register_owner(None);
        (space.clone(), SvaRegistry::new(space, owner))
    }

    const MM: MmId = MmId(1);
    const DEV: DeviceId = DeviceId(0x10);

    #[test]
    fn double_bind_gives_two_handles_one_domain_one_pasid() {
        let (_, sva) = registry();
        let a = sva.bind(MM, DEV).unwrap();
        let b = sva.bind(MM, DEV).unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(a.domain, b.domain);
        assert_eq!(a.pasid, b.pasid);
        sva.unbind(a.id).unwrap();
        assert_eq!(
            sva.domain(MM, DEV),
            Some(b.domain),
            "the other handle keeps the domain"
        );
        sva.unbind(b.id).unwrap();
        assert_eq!(
            sva.domain(MM, DEV),
            None,
            "the domain goes with its last handle"
        );
        assert_eq!(
            sva.pasid(MM),
            Some(a.pasid),
            "the PASID stays with the address space"
        );
        let c = sva.bind(MM, DEV).unwrap();
        assert_eq!(c.pasid, a.pasid);
        assert_ne!(
            c.domain, a.domain,
            "a new domain after the old one went away"
        );
    }

    #[test]
    fn one_pasid_per_address_space_across_devices() {
        let (_, sva) = registry();
        let a = sva.bind(MM, DeviceId(1)).unwrap();
        let b = sva.bind(MM, DeviceId(2)).unwrap();
        let c = sva.bind(MmId(2), DeviceId(1)).unwrap();
        assert_eq!(a.pasid, b.pasid);
        assert_ne!(a.domain, b.domain);
        assert_ne!(a.pasid, c.pasid);
    }

    #[test]
    fn pasid_freed_when_address_space_ends() {
        let (space, sva) = registry();
        let a = sva.bind(MM, DEV).unwrap();
        assert_eq!(sva.mm_exit(MM), Ok(a.pasid));
        assert!(!space.is_allocated(Scope::Global, a.pasid));
        assert_eq!(sva.unbind(a.id), Err(SvaError::UnknownHandle(a.id)));
        assert_eq!(sva.mm_exit(MM), Err(SvaError::UnknownMm(MM)));
        assert_eq!(sva.pasid(MM), None);
    }

    #[test]
    fn unknown_handle() {
        let (_, sva) = registry();
        assert_eq!(
            sva.unbind(HandleId(42)),
            Err(SvaError::UnknownHandle(HandleId(42)))
        );
        let a = sva.bind(MM, DEV).unwrap();
        sva.unbind(a.id).unwrap();
        assert_eq!(sva.unbind(a.id), Err(SvaError::UnknownHandle(a.id)));
    }

    #[test]
    fn task_references() {
        let (_, sva) = registry();
        let task = TaskId(7);
        assert_eq!(sva.task_get(MM, task), Err(SvaError::UnknownMm(MM)));
        let a = sva.bind(MM, DEV).unwrap();
        assert_eq!(sva.task_get(MM, task), Ok(a.pasid));
        assert_eq!(
            sva.task_get(MM, task),
            Err(SvaError::TaskReferenceHeld { mm: MM, task })
        );
        sva.task_put(MM, task);
        assert!(!sva.task_holds(MM, task));
        sva.task_put(MM, task);
        sva.task_put(MmId(99), task);
        assert_eq!(sva.task_get(MM, task), Ok(a.pasid));
    }

    #[test]
    fn charged_to_the_guest() {
        let space = Arc::new(PasidSpace::new());
        let guest = space.register_owner(Some(1));
        let sva = SvaRegistry::new(space.clone(), guest);
        sva.bind(MM, DEV).unwrap();
        sva.bind(MM, DeviceId(2)).unwrap();
        assert_eq!(
            sva.bind(MmId(2), DEV),
            Err(SvaError::Space(PasidError::OverLimit {
                owner: guest,
                limit: 1
            }))
        );
        assert_eq!(space.charged(guest), Ok(1));
    }
}
