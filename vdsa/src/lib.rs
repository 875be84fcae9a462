//! A virtual Intel Data Streaming Accelerator (DSA 1.0) that Linux's
//! unmodified `idxd` driver and accel-config drive. By default it shows the
//! capability registers of a Sapphire Rapids DSA ([`profile`]).
//!
//! [`Dsa`] is a PCI Express function (8086:0b25, a root-complex integrated
//! endpoint with PASID, ATS and PRI) implementing [`pci::PciDevice`]:
//!
//! - BAR0 holds the registers ([`regs`]), the WQ and group configuration
//!   tables ([`wqcfg`], [`grpcfg`]), the MSI-X permissions table and the
//!   MSI-X vector table and PBA; administrative commands ([`command`]) run
//!   on their own thread and complete through INTCAUSE and MSI-X vector 0.
//! - BAR2 holds the portals ([`portal`]): MOVDIR64B to dedicated WQs,
//!   ENQCMD/ENQCMDS to shared WQs with accept/retry.
//! - Engines ([`engine`]) run descriptors ([`descriptor`], [`ops`]) on
//!   worker threads per group and write completion records
//!   ([`completion`]); errors without a record land in SWERROR ([`swerr`]).
//! - Every memory access goes through a [`dma::DmaPort`] with the WQ's or
//!   descriptor's PASID; page faults either complete the descriptor
//!   partially or, with block-on-fault, become PRI page requests answered
//!   through [`DsaIommuHandle::page_response`]. With ATS enabled the device
//!   caches translations until [`DsaIommuHandle::invalidate_device_tlb`].
//! - PASIDs inside the device are host PASIDs; the guest-programmed ones
//!   (WQCFG, Drain/Abort PASID, MSIXPERM, SWERROR) go through a
//!   [`pasid::PasidTranslator`] ([`Dsa::with_pasid_translator`]).

#![forbid(unsafe_code)]

mod access;
mod atc;
mod bits;
pub mod command;
pub mod completion;
pub mod config_space;
pub mod descriptor;
mod device;
pub mod dma;
mod engine;
pub mod grpcfg;
pub mod ops;
pub mod portal;
pub mod profile;
mod prs;
pub mod regs;
pub mod swerr;
pub mod wqcfg;

pub use device::{Dsa, DsaConfig, DsaError, DsaIommuHandle};
