//! PASID bookkeeping shared by the vIOMMU, the accelerator and the ENQCMD trap.
//!
//! A PASID (Process Address Space ID, 20 bits, PCIe) tags a DMA request with
//! the address space it targets. This crate keeps the host-side accounting of
//! PASIDs for the VMM; it is a plain library with no KVM dependency and no
//! `unsafe`.
//!
//! How the VMM wires it:
//!
//! * one [`PasidSpace`] for the whole host, shared between guests behind an
//!   [`Arc`](std::sync::Arc). It hands out host PASIDs (PASID 0 reserved),
//!   either [`Scope::Global`] (valid on every device and IOMMU, what ENQCMD
//!   needs) or [`Scope::Device`] (valid for one requester ID only), and charges
//!   each one to an [`OwnerId`] (a guest, or [`OwnerId::VMM`]) that may carry a
//!   limit;
//! * one [`PasidTable`] per guest, shared by all its devices and vCPUs, that
//!   translates guest PASIDs to host PASIDs without taking a lock. A miss is
//!   [`Error::TranslationFault`]: the VMM resolves it (asks the vIOMMU whether
//!   the guest set that PASID up), calls [`PasidTable::install`] and retries;
//! * one [`Ia32Pasid`] per vCPU, the `IA32_PASID` MSR (0xD93). A write with
//!   reserved bits set returns [`Error::MsrReservedBits`], which the VMM turns
//!   into #GP;
//! * [`PasidTranslator`], the hook through which a device model that works
//!   in host PASIDs (the vDSA) meets the guest's PASIDs.
//!
//! Every fallible call returns a distinct [`Error`] variant; none panics on
//! bad input.
//!
//! ```
//! use std::sync::Arc;
//! use pasid::{Error, Ia32Pasid, PasidSpace, PasidTable};
//!
//! let space = Arc::new(PasidSpace::new());
//! let guest = space.add_owner("guest0", Some(4096));
//! let table = PasidTable::new(space.clone(), guest).unwrap();
//!
//! // ENQCMD trap: the guest's IA32_PASID names guest PASID 5.
//! let mut msr = Ia32Pasid::new();
//! msr.write(Ia32Pasid::VALID | 5).unwrap();
//! let gpasid = msr.active_pasid().unwrap();
//! let hpasid = match table.translate(gpasid) {
//!     Ok(hpasid) => hpasid,
//!     // The guest did set PASID 5 up (the vIOMMU says so): install, retry.
//!     Err(Error::TranslationFault(_)) => table.install(gpasid).unwrap(),
//!     Err(err) => panic!("{err}"),
//! };
//! assert_eq!(table.translate(gpasid), Ok(hpasid));
//! assert_eq!(msr.write(1 << 40), Err(Error::MsrReservedBits(1 << 40))); // #GP
//! assert_eq!(space.charged(guest), Ok(1));
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod bitmap;
pub mod msr;
pub mod space;
pub mod table;
pub mod translator;

use std::sync::{Mutex, MutexGuard, PoisonError};

pub use msr::{Ia32Pasid, MSR_IA32_PASID};
pub use space::{
    OwnerId, PasidSpace, Scope, PASID_BITS, PASID_MASK, PASID_MAX, PASID_SPACE_SIZE, RESERVED_PASID,
};
pub use table::PasidTable;
pub use translator::{IdentityPasids, PasidTranslator};

/// Everything that can go wrong in this crate. Each case is a distinct
/// variant so that callers can map it to the architectural answer (fault
/// record, completion status, #GP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Every PASID that the request's scope could use is taken.
    #[error("no free PASID left for {0} scope")]
    NoSpace(Scope),
    /// The owner already holds as many PASIDs as its limit allows.
    #[error("{owner} is at its limit of {limit} PASIDs")]
    OverLimit {
        /// Owner the allocation was to be charged to.
        owner: OwnerId,
        /// Its limit.
        limit: u32,
    },
    /// A PASID (guest or host) outside the 20-bit range, or beyond the width
    /// of a narrower host space.
    #[error("PASID {0:#x} is out of range")]
    OutOfRange(u32),
    /// PASID 0 is reserved for requests without PASID and is never handed
    /// out, installed or freed.
    #[error("PASID 0 is reserved")]
    Reserved,
    /// The owner was never registered with this space, or was removed.
    #[error("unknown {0}")]
    UnknownOwner(OwnerId),
    /// An owner cannot be removed while PASIDs are still charged to it.
    #[error("{owner} still has {charged} PASIDs charged")]
    OwnerBusy {
        /// The owner.
        owner: OwnerId,
        /// How many PASIDs are still charged to it.
        charged: u32,
    },
    /// Freeing a PASID that is not allocated in that scope (double free).
    #[error("PASID {pasid:#x} is not allocated in {scope} scope")]
    NotAllocated {
        /// The PASID.
        pasid: u32,
        /// The scope it was looked up in.
        scope: Scope,
    },
    /// Freeing a PASID that is charged to another owner.
    #[error("PASID {pasid:#x} is not charged to {owner}")]
    NotOwner {
        /// The PASID.
        pasid: u32,
        /// The owner that asked for the free.
        owner: OwnerId,
    },
    /// The guest PASID has no host PASID in the translation table yet: the
    /// caller resolves the fault and retries.
    #[error("translation fault on guest PASID {0:#x}")]
    TranslationFault(u32),
    /// Removing a guest PASID that is not in the translation table.
    #[error("guest PASID {0:#x} is not installed")]
    NotInstalled(u32),
    /// A write to IA32_PASID with reserved bits set (the VMM injects #GP).
    #[error("IA32_PASID value {0:#x} sets reserved bits")]
    MsrReservedBits(u64),
    /// A host PASID width outside 1..=20 bits.
    #[error("PASID width of {0} bits is not in 1..=20")]
    InvalidWidth(u32),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Locks a mutex, ignoring poisoning: the state behind every mutex here is
/// consistent between statements, so a panic elsewhere cannot leave it torn.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
