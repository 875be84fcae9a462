//! How the DSA reaches memory: the device's side of the IOMMU.
//!
//! Every memory access the device makes goes through a [`DmaPort`]. The
//! port stands for the path from the function to memory: the IOMMU that
//! translates requests (tagged with a PASID or not), answers PCIe ATS
//! translation requests and takes PRI page requests. Two ports come with
//! this crate:
//!
//! - [`IdentityDma`]: a function with no IOMMU above it; addresses are
//!   guest-physical and reach guest RAM directly.
//! - [`MockIommu`]: a test IOMMU over guest RAM that can fault chosen pages,
//!   remap pages, refuse PASIDs and records the page requests it receives.
//!
//! The answers to page requests and the device-TLB invalidations travel the
//! other way, through [`crate::DsaIommuHandle`].

mod identity;
mod mock;

pub use identity::IdentityDma;
pub use mock::MockIommu;

/// The PASID TLP prefix of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PasidTag {
    /// The 20-bit process address space ID.
    pub pasid: u32,
    /// Privileged Mode Requested (supervisor access).
    pub privileged: bool,
}

/// Which addresses a memory request carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressSpace {
    /// An untranslated address (IOVA, guest virtual address...) that the
    /// IOMMU translates, in the address space of the PASID if there is one.
    Untranslated(Option<PasidTag>),
    /// An address the IOMMU returned earlier for an ATS translation request.
    Translated,
}

/// Why an access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// No translation, or one without the needed permission: a page request
    /// may resolve it.
    PageFault,
    /// The IOMMU refused the request outright (for example a PASID with no
    /// valid table entry); no page request can help.
    TranslationError,
    /// The address translated, but nothing answers there (an unsupported
    /// request on the fabric).
    Unmapped,
}

/// A failed memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("DMA {kind:?} at {addr:#x} ({}) after {done} bytes", if *.write { "write" } else { "read" })]
pub struct DmaFault {
    /// Bytes of the access that completed before the fault.
    pub done: usize,
    /// The (untranslated, for untranslated requests) address that faulted.
    pub addr: u64,
    /// Whether the faulting access was a write.
    pub write: bool,
    /// What went wrong.
    pub kind: FaultKind,
}

/// The answer to an ATS translation request: one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The translated address of the start of the page.
    pub addr: u64,
    /// The page size (a power of two, at least 4 KiB).
    pub size: u64,
    /// Reads are allowed.
    pub read: bool,
    /// Writes are allowed.
    pub write: bool,
}

/// A PCIe PRI page request (always the last of its page request group).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// The PASID prefix of the request, if any.
    pub pasid: Option<PasidTag>,
    /// The 4 KiB-aligned untranslated address.
    pub addr: u64,
    /// Read access requested.
    pub read: bool,
    /// Write access requested.
    pub write: bool,
    /// The 9-bit page request group index the response must carry.
    pub prg_index: u16,
    /// Last request in the group.
    pub last: bool,
}

/// The response code of a PRG response message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageResponseCode {
    /// The pages were made present: retry the access.
    Success,
    /// The request cannot be satisfied: report the fault.
    InvalidRequest,
    /// The IOMMU failed; the function stops using PRI until reset.
    ResponseFailure,
}

/// Bytes moved per bounce-buffer step by the default [`DmaPort::copy`].
pub const BOUNCE_CHUNK: usize = 64 * 1024;

/// The IOMMU side of the device: translate-and-access, ATS and PRI.
///
/// Implementations must be cheap to call concurrently: the device's engines
/// run on their own threads.
pub trait DmaPort: Send + Sync {
    /// Reads `buf.len()` bytes at `addr`.
    fn read(&self, space: AddressSpace, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault>;

    /// Writes `data` at `addr`.
    fn write(&self, space: AddressSpace, addr: u64, data: &[u8]) -> Result<(), DmaFault>;

    /// Copies `len` bytes from `src` to `dst`; the device never passes
    /// overlapping ranges. On a fault, `done` counts bytes written to `dst`.
    ///
    /// The default moves the data through a bounce buffer; ports that can
    /// reach memory directly should copy memory to memory.
    fn copy(&self, space: AddressSpace, src: u64, dst: u64, len: usize) -> Result<(), DmaFault> {
        let mut buf = vec![0u8; len.min(BOUNCE_CHUNK)];
        let mut done = 0usize;
        while done < len {
            let n = (len - done).min(buf.len());
            let chunk = &mut buf[..n];
            let at = |base: u64| base.wrapping_add(done as u64);
            if let Err(fault) = self.read(space, at(src), chunk) {
                if fault.done > 0 {
                    self.write(space, at(dst), &chunk[..fault.done])
                        .map_err(|w| DmaFault {
                            done: done + w.done,
                            ..w
                        })?;
                }
                return Err(DmaFault {
                    done: done + fault.done,
                    ..fault
                });
            }
            self.write(space, at(dst), chunk).map_err(|w| DmaFault {
                done: done + w.done,
                ..w
            })?;
            done += n;
        }
        Ok(())
    }

    /// An ATS translation request for the page holding `addr`.
    ///
    /// `None` means the port does not implement ATS; the device then makes
    /// untranslated requests even when the guest enabled ATS.
    fn translate(
        &self,
        pasid: Option<PasidTag>,
        addr: u64,
    ) -> Option<Result<Translation, DmaFault>> {
        let _ = (pasid, addr);
        None
    }

    /// Posts a page request. The answer comes back later through
    /// [`crate::DsaIommuHandle::page_response`].
    fn page_request(&self, request: PageRequest);
}
