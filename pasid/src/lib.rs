//! PASID bookkeeping shared by the vIOMMU, the accelerator and the ENQCMD
//! trap.
//!
//! - [`PasidSpace`]: the host's 20-bit PASID space, shared by every guest.
//!   Allocations are global (valid for every device, as ENQCMD needs) or
//!   scoped to one requester ID, and are charged to an owner with an
//!   optional limit.
//! - [`GuestPasidTable`]: one per guest, translating guest PASIDs to host
//!   PASIDs for all of that guest's devices and vCPUs, with a lock-free read
//!   path.
//! - [`PasidMsr`]: the IA32_PASID MSR of one vCPU.
//! - [`SvaRegistry`]: bindings of address spaces to devices (handles,
//!   domains, the address space's PASID) and per-task MSR references.
//!
//! The rules follow where Linux settled: a PASID belongs to an address space
//! for its whole life (no refcounted free on unbind), ENQCMD PASIDs are
//! global, the guest-wide table is one per guest, allocation is charged to
//! whoever asked, and binding the same address space to the same device
//! twice gives two handles on one domain and one PASID.

mod msr;
mod space;
mod sva;
mod table;

pub use msr::{MsrError, PasidMsr, IA32_PASID, IA32_PASID_VALID};
pub use space::{OwnerId, PasidError, PasidSpace, Scope, PASID_BITS, PASID_COUNT, RESERVED_PASID};
pub use sva::{DeviceId, DomainId, HandleId, MmId, SvaError, SvaHandle, SvaRegistry, TaskId};
pub use table::{GuestPasidTable, TableError, LEAF_ENTRIES};
