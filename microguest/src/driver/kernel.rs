//! The guest kernel's SVA bring-up in one call: the process's VT-d
//! structures and the unit's enable sequence (with a vIOMMU), the vDSA's
//! PCI setup through ECAM and its WQs, and the ENQCMD #GP fixup.

use iced_x86::code_asm::*;

use super::dsa::{DsaDriver, WqSetup};
use super::ecam::PciFunction;
use super::vtd::{ContextControls, FirstStageBinding, ScalableTables, TablesError, Vtd};
use super::{slot, DSA_BAR0, DSA_BAR2};
use crate::{MicroGuest, PML4_START};

/// IA32_PASID valid bit.
const PASID_VALID: u32 = pasid::Ia32Pasid::VALID as u32;
/// #GP vector.
const GP_VECTOR: u8 = 13;

/// Errors emitting a bring-up.
#[derive(Debug, thiserror::Error)]
pub enum BringUpError {
    /// The assembler refused an instruction.
    #[error("assembling the bring-up: {0}")]
    Assemble(#[from] IcedError),
    /// The VT-d structures could not be planned.
    #[error(transparent)]
    Tables(#[from] TablesError),
}

/// One user process using one vDSA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SvaSetup {
    /// The vDSA's requester ID.
    pub dsa_rid: pci::PciAddress,
    /// The process's guest PASID.
    pub pasid: u32,
    /// Domain ID of the process's PASID entry.
    pub did: u16,
    /// Build the VT-d structures and turn translation on (a machine with
    /// the vIOMMU).
    pub iommu: bool,
}

impl SvaSetup {
    /// The process's VT-d structures: the vDSA's context entry and a PASID
    /// entry on the micro-guest's own page tables ([`PML4_START`]); also
    /// returns the PASID entry's address (for a teardown).
    pub fn tables(&self) -> Result<(ScalableTables, u64), TablesError> {
        let mut tables = ScalableTables::default();
        tables.add_device(self.dsa_rid, ContextControls::default())?;
        let entry = tables.bind(
            self.dsa_rid,
            FirstStageBinding {
                pasid: self.pasid,
                flptr: PML4_START,
                did: self.did,
            },
        )?;
        Ok((tables, entry))
    }

    /// Emits the bring-up at CPL0: (with the vIOMMU) [`SvaSetup::tables`]
    /// and [`Vtd::enable`]; the vDSA's identity check, BAR sizing and
    /// assignment at [`DSA_BAR0`]/[`DSA_BAR2`], memory decode and bus
    /// master, PASID/PRI/ATS; then [`DsaDriver::bring_up`] with `wqs`.
    pub fn bring_up(&self, asm: &mut CodeAssembler, wqs: &[WqSetup]) -> Result<(), BringUpError> {
        if self.iommu {
            let (tables, _) = self.tables()?;
            tables.emit(asm)?;
            Vtd::default().enable(asm, tables.root_table())?;
        }
        let function = PciFunction::at(self.dsa_rid);
        function.check_identity(
            asm,
            vdsa::config_space::VENDOR_ID,
            vdsa::config_space::DEVICE_ID,
        )?;
        function.size_and_assign_bar64(asm, 0, DSA_BAR0, slot::BAR0_SIZE)?;
        function.size_and_assign_bar64(asm, 2, DSA_BAR2, slot::BAR2_SIZE)?;
        function.enable_memory_and_bus_master(asm)?;
        function.enable_pasid_pri_ats(asm)?;
        DsaDriver::default().bring_up(asm, wqs)?;
        Ok(())
    }

    /// Installs the kernel's ENQCMD #GP fixup as `g`'s #GP handler: count
    /// the #GP in `r15`, load the process's PASID into IA32_PASID, return
    /// to the ENQCMD, which runs again.
    pub fn install_gp_fixup(&self, g: &mut MicroGuest) -> Result<(), IcedError> {
        let a = &mut g.asm;
        let mut gp = a.create_label();
        a.set_label(&mut gp)?;
        a.inc(r15d)?;
        a.push(rax)?;
        a.push(rcx)?;
        a.push(rdx)?;
        a.mov(ecx, pasid::MSR_IA32_PASID)?;
        a.mov(eax, PASID_VALID | self.pasid)?;
        a.xor(edx, edx)?;
        a.wrmsr()?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rax)?;
        a.add(rsp, 8)?; // the error code
        a.iretq()?;
        g.handler(GP_VECTOR, gp);
        Ok(())
    }
}
