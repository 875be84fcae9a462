//! Where guest PASIDs become host PASIDs inside a device.
//!
//! A device model (the vDSA) works in host PASIDs: every PASID it carries in a queued
//! descriptor, a WQ snapshot, the device TLB or a DMA request is a host
//! PASID. Guest software programs guest PASIDs in four places, and the
//! device asks its [`PasidTranslator`] at each:
//!
//! - WQCFG.PASID of a dedicated WQ: translated to a host PASID once, when
//!   Enable WQ takes the WQ's snapshot ([`PasidTranslator::to_host`]);
//! - the operand of Drain PASID and Abort PASID, and MSIXPERM.PASID (checked
//!   when a completion interrupt handle is used): compared with the guest
//!   PASID of the host PASIDs the device holds
//!   ([`PasidTranslator::to_guest`]), so that nothing is allocated for them;
//! - and the PASID field of SWERROR, which the guest reads back in its own
//!   PASID space ([`PasidTranslator::to_guest`]).
//!
//! Descriptors submitted with ENQCMD or ENQCMDS arrive with their PASID
//! already translated by the VMM's trap path.
//!
//! [`IdentityPasids`], the default, makes both spaces the same (a device
//! used without a VMM-level PASID table, as in the device's own tests).

/// Translation between the guest's PASIDs and the host PASIDs the device
/// works in. Called from the device's command, engine and vCPU threads.
pub trait PasidTranslator: Send + Sync {
    /// The host PASID for guest PASID `guest`. A guest PASID that has no
    /// host PASID (the guest never set it up) must map to a host PASID that
    /// no DMA can use, so that work tagged with it fails translation.
    fn to_host(&self, guest: u32) -> u32;

    /// The guest PASID of host PASID `host`, if it belongs to this guest.
    fn to_guest(&self, host: u32) -> Option<u32>;
}

/// Guest PASIDs are host PASIDs.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityPasids;

impl PasidTranslator for IdentityPasids {
    fn to_host(&self, guest: u32) -> u32 {
        guest
    }

    fn to_guest(&self, host: u32) -> Option<u32> {
        Some(host)
    }
}
