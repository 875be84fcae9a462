//! Shared Virtual Addressing in the machine: the vIOMMU, the vDSA
//! functions and the PASID plumbing between the guest, the devices and the
//! host PASID space.
//!
//! ```text
//!  vCPU: WRMSR IA32_PASID ──► GuestPasids: address space (CR3) -> gPASID
//!  vCPU: ENQCMD ─(gPASID of the running CR3)─► DsaFunction::bar_store64
//!            gPASID -> hPASID (lazy fill after the vIOMMU confirms) ─► vDSA
//!  vDSA (host PASIDs) ─► ViommuDma: hPASID -> gPASID ─► vIOMMU (guest tables)
//!  vIOMMU PASID-cache invalidation ─► GuestPasids: unmap, wait for enqueues
//!            in flight, vDSA drops its device-TLB entries of that hPASID,
//!            free the hPASID once no vDSA holds work or a WQ with it
//! ```
//!
//! - One [`GuestPasids`] per VM (its gPASID -> hPASID table, shared by every
//!   device and vCPU of the VM); host PASIDs come from a [`pasid::PasidSpace`]
//!   shared by every VM of the process.
//! - Inside the vDSA every PASID is a host PASID. The guest PASIDs enter
//!   it at the VMM boundary: ENQCMD/ENQCMDS commands in
//!   [`DsaFunction`], WQCFG.PASID (Enable WQ), Drain/Abort PASID,
//!   MSIXPERM and SWERROR through [`DevicePasids`].
//! - Without a vIOMMU the vDSA does untranslated DMA into guest RAM
//!   ([`vdsa::dma::IdentityDma`]), and PASIDs still go through the guest's
//!   table, filled without a check (there are no PASID tables to check).
//!
//! `crate::machine::DeviceManager::attach_accelerators` builds all of it for a machine.
//!
//! # Decisions
//!
//! - **Host PASIDs inside the vDSA.** Queued descriptors, WQ snapshots, the
//!   device TLB and every DMA request carry host PASIDs. The guest's PASIDs
//!   cross into the device at the VMM boundary only: the portal store
//!   ([`DsaFunction::bar_store64`], ENQCMD and ENQCMDS), and the
//!   [`pasid::PasidTranslator`] hook the device calls at Enable WQ
//!   (WQCFG.PASID becomes a host PASID) and, the other way, to compare
//!   guest PASIDs (Drain/Abort PASID, MSIXPERM) with the host PASIDs it
//!   holds and to report SWERROR's PASID field.
//! - **One table per VM, one space per process.** [`GuestPasids`] is per
//!   VM, shared by its vCPUs and devices; host PASIDs come from a
//!   [`pasid::PasidSpace`] shared by every VM of the process
//!   ([`crate::vm::host_pasid_space`] unless the VM is given one), each guest
//!   charged for what it holds, at most [`GUEST_PASID_LIMIT`].
//! - **Lazy fill.** A guest PASID gets a host PASID the first time it is
//!   used, once the vIOMMU resolves a present PASID-table entry for it (for
//!   the device asking). A PASID-cache invalidation re-checks the PASIDs it
//!   covers; those the guest no longer has are unmapped, their host PASID
//!   freed, and the vDSAs drop their device-TLB entries of that host PASID.
//! - **A PASID the guest never set up.** ENQCMD/ENQCMDS with it are not
//!   enqueued: the instruction answers Retry (ZF=1) and the device never
//!   sees the descriptor; no host PASID is allocated. ZF=1 is the one
//!   answer ENQCMD has for "not accepted" short of a fault; Linux's
//!   ENQCMDS path gives up with -EAGAIN after its bounded retries, and a
//!   user submitter sees its ENQCMD refused.
//! - **A PASID the guest programs into the device without setting it up**
//!   (WQCFG.PASID of a dedicated WQ at Enable WQ) gets an *unverified*
//!   host PASID, outside the gPASID -> hPASID
//!   table (ENQCMD never uses it) but mapping back to the guest PASID. The
//!   device's requests with it reach the vIOMMU with the guest's PASID, so
//!   they fail as on hardware (the vIOMMU records "PASID-table entry not
//!   present"; the descriptor gets completion status 0x22, or SWERROR 0x1a
//!   naming the WQ's guest PASID when the record cannot be written either)
//!   and start working if the guest sets the PASID up later. PASID 0 gets
//!   the quarantine host PASID, which maps back to nothing.
//! - **Without a vIOMMU** the vDSA does untranslated DMA into guest RAM and
//!   PASIDs still go through the guest's table, filled without a check
//!   (there are no PASID tables to check) and never torn down before the VM
//!   ends.
//! - **ATS.** The adapter asks the vIOMMU for write permission first, so a
//!   writable page comes back writable (and is marked dirty, as the device
//!   may write it); read-only pages come back read-only.
//! - **IA32_PASID** follows the guest's address spaces: see
//!   `docs/ia32-pasid-follows-address-space.md` and
//!   [`GuestPasids::enqcmd_pasid`].

mod dma;
mod function;
mod guest_pasids;
#[cfg(test)]
mod tests;
mod write_log;

use std::sync::{Arc, Mutex};

use bus::{Bus, BusDevice, BusError};

use pci::{MsiSink, PciAddress, PciDevice};
use thiserror::Error;
use vdsa::dma::{DmaPort, IdentityDma};
use vdsa::{Dsa, DsaConfig, DsaError};
use viommu::dmar::{build_dmar_table, DmarConfig};

use crate::layout;
use crate::pci_root::{PciRoot, PciRootError, SharedPciDevice};

pub use dma::{DsaAtsBridge, GuestMem, Viommu, ViommuAuthority, ViommuDma};
pub use function::{translate_enqueue, DevicePasids, DsaFunction};
pub use guest_pasids::{
    address_space_key, EnqcmdPasidHint, GuestPasids, HostPasidFreed, HostPasidInUse,
    PasidAuthority, PasidMiss, PasidSetup, ADDRESS_SPACE_MASK, GUEST_PASID_LIMIT,
};
pub use write_log::{DeviceWrite, DeviceWriteLog};

/// The accelerator devices of a machine.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccelConfig {
    /// Put the vIOMMU at [`layout::VIOMMU_START`] with every PCI device
    /// behind it, and its DMAR in the ACPI tables.
    pub iommu: bool,
    /// One vDSA function per entry, at 00:01.0, 00:02.0, ... in this order
    /// (the first free device numbers of bus 0).
    pub dsa: Vec<DsaConfig>,
}

/// Where a vDSA landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsaPlacement {
    /// Its PCI address.
    pub bdf: PciAddress,
    /// BAR0 (registers) base.
    pub bar0: u64,
    /// BAR2 (portals) base.
    pub bar2: u64,
}

/// Size of a vDSA's BAR2: four 4 KiB portals per WQ, rounded up to a power
/// of two.
pub fn dsa_bar2_size(config: &DsaConfig) -> u64 {
    (u64::from(config.num_wqs) * vdsa::regs::layout::PORTALS_PER_WQ).next_power_of_two()
}

/// Where [`attach_devices`] puts the vDSAs of `configs` on a root complex that has
/// nothing but its host bridge: device numbers from 1, both 64-bit BARs in
/// the 64-bit window from [`layout::PCI_MMIO64_START`], naturally aligned,
/// each function's larger BAR first (BAR2 unless it is smaller than BAR0).
/// Micro-guests use it to find the devices without enumerating them.
pub fn dsa_placements(configs: &[DsaConfig]) -> Vec<DsaPlacement> {
    let mut next = layout::PCI_MMIO64_START;
    let mut take = |size: u64| {
        let base = next.next_multiple_of(size);
        next = base + size;
        base
    };
    configs
        .iter()
        .enumerate()
        .map(|(i, config)| {
            let bar0_size = vdsa::regs::layout::BAR0_SIZE;
            let bar2_size = dsa_bar2_size(config);
            let (bar0, bar2) = if bar2_size >= bar0_size {
                let bar2 = take(bar2_size);
                (take(bar0_size), bar2)
            } else {
                let bar0 = take(bar0_size);
                (bar0, take(bar2_size))
            };
            DsaPlacement {
                bdf: PciAddress {
                    bus: 0,
                    device: i as u8 + 1,
                    function: 0,
                },
                bar0,
                bar2,
            }
        })
        .collect()
}

/// Errors attaching the accelerators; each prints as one line.
#[derive(Debug, Error)]
pub enum AccelError {
    /// A vDSA could not be created.
    #[error("vDSA {index}: {source}")]
    Dsa {
        /// Its position in [`AccelConfig::dsa`].
        index: usize,
        /// Why.
        #[source]
        source: DsaError,
    },
    /// The PCI bus has no room.
    #[error(transparent)]
    Pci(#[from] PciRootError),
    /// The vIOMMU window overlaps another device.
    #[error(transparent)]
    Bus(#[from] BusError),
}

/// The accelerators of a running machine.
pub struct Accelerators {
    /// The vIOMMU, if there is one.
    pub iommu: Option<Arc<Viommu>>,
    /// The vDSA functions, in [`AccelConfig::dsa`] order.
    pub dsa: Vec<DsaPlacement>,
    /// The same functions, for the host to inspect.
    pub functions: Vec<Arc<Mutex<DsaFunction>>>,
    /// The DMAR table to put in the ACPI tables (with the vIOMMU).
    pub dmar: Option<Vec<u8>>,
}

/// The vIOMMU's register window on the MMIO bus.
struct IommuWindow(Arc<Viommu>);

impl BusDevice for IommuWindow {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.0.mmio_read(offset, data)
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.0.mmio_write(offset, data)
    }
}

/// Puts a vIOMMU on `mmio` at its place ([`layout::VIOMMU_START`]), its
/// table walks in `memory`, its interrupts to `msi`.
pub fn attach_viommu(
    mmio: &Bus,
    memory: GuestMem,
    msi: Arc<dyn MsiSink>,
) -> Result<Arc<Viommu>, AccelError> {
    let iommu = Arc::new(Viommu::new(memory, msi));
    mmio.insert(
        layout::VIOMMU_START,
        layout::VIOMMU_SIZE,
        Arc::new(Mutex::new(IommuWindow(iommu.clone()))),
    )?;
    Ok(iommu)
}

/// The vDSAs of `configs` on `root`, their DMA into `memory` (through
/// `iommu` if given), their interrupts to `msi`, their PASIDs through
/// `pasids`. A machine gets them with
/// `crate::machine::DeviceManager::attach_accelerators`.
pub fn attach_devices(
    pasids: &Arc<GuestPasids>,
    memory: GuestMem,
    msi: Arc<dyn MsiSink>,
    iommu: Option<Arc<Viommu>>,
    root: &PciRoot,
    configs: &[DsaConfig],
) -> Result<Accelerators, AccelError> {
    let mut placements = Vec::new();
    let mut functions = Vec::new();
    for (index, dsa_config) in configs.iter().enumerate() {
        let bdf = root.first_free_device().ok_or(PciRootError::BusFull)?;
        let rid = bdf;
        let (dma, viommu_dma): (Arc<dyn DmaPort>, _) = match &iommu {
            Some(iommu) => {
                let port = Arc::new(ViommuDma::new(
                    iommu.clone(),
                    memory.clone(),
                    bdf,
                    pasids.clone(),
                ));
                (port.clone(), Some(port))
            }
            None => (Arc::new(IdentityDma::new(memory.clone())), None),
        };
        let dsa = Dsa::with_pasid_translator(
            *dsa_config,
            dma,
            msi.clone(),
            Arc::new(DevicePasids::new(pasids.clone(), rid)),
        )
        .map_err(|source| AccelError::Dsa { index, source })?;
        let handle = dsa.iommu_handle();
        if let (Some(iommu), Some(port)) = (&iommu, viommu_dma) {
            port.connect(handle.clone());
            iommu.register_device(
                bdf,
                Arc::new(DsaAtsBridge::new(handle.clone(), pasids.clone())),
            );
        }
        // What the device cached under a host PASID goes with the mapping.
        let freed = handle.clone();
        pasids.on_host_pasid_freed(Arc::new(move |hpasid| {
            freed.invalidate_device_tlb(Some(hpasid), 0, u64::MAX)
        }));
        // A torn-down host PASID is freed once no descriptor or WQ of the
        // device carries it.
        let user = handle.clone();
        pasids.on_host_pasid_in_use(Arc::new(move |hpasid| user.pasid_in_use(hpasid)));
        let function = Arc::new(Mutex::new(DsaFunction::new(dsa, rid, pasids.clone())));
        let added = root.add_device(function.clone() as SharedPciDevice)?;
        debug_assert_eq!(added, bdf);
        let bars = function
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .mapped_bars();
        let base = |index| bars.iter().find(|b| b.index == index).map_or(0, |b| b.base);
        log::info!(
            "vDSA {index} at {bdf}: BAR0 {:#x}, BAR2 {:#x}",
            base(0),
            base(2)
        );
        placements.push(DsaPlacement {
            bdf: added,
            bar0: base(0),
            bar2: base(2),
        });
        functions.push(function);
    }
    let dmar = iommu.as_ref().map(|iommu| {
        iommu.add_pasid_observer(pasids.clone());
        let rids = placements.iter().map(|p| p.bdf).collect();
        pasids.set_authority(Arc::new(ViommuAuthority::new(iommu, rids)));
        build_dmar_table(&DmarConfig::include_all(layout::VIOMMU_START))
    });
    Ok(Accelerators {
        iommu,
        dsa: placements,
        functions,
        dmar,
    })
}
