//! PCI configuration through ECAM, as firmware and Linux's PCI core do it:
//! identity, BAR sizing and assignment, memory decode and bus master, and
//! the PASID, ATS and PRI enables the IOMMU driver performs for SVA.

use iced_x86::code_asm::*;

use super::{fail_with_eax, report, Step};
use pci::PciAddress;
use vmm::layout;

use pci::header::offset::{BAR0, COMMAND, VENDOR_ID};
use pci::header::{bar, command};
/// BAR low bits: memory type (2:1) and prefetchable (3).
const BAR_FLAGS: u32 = !bar::MEM_ADDRESS_MASK;
/// BAR bits 2:0: I/O space (0) and type (2:1).
const BAR_TYPE_MASK: u32 = 0b111;
/// First extended capability.
const EXTENDED_CAPABILITIES: u32 = 0x100;

/// PASID control (capability + 6): enable and privileged mode.
const PASID_CTRL: u16 = 6;
/// PASID control: enable.
const PASID_ENABLE: u16 = 1 << 0;
/// PASID control: privileged mode enable.
const PASID_PRIVILEGED: u16 = 1 << 2;
/// ATS control (capability + 6).
const ATS_CTRL: u16 = 6;
/// PRI control (capability + 4).
const PRI_CTRL: u16 = 4;
/// PRI outstanding page request allocation (capability + 0xc).
const PRI_ALLOC: u16 = 0xc;
/// Outstanding page requests the guest allocates to the function (PRI
/// allocation register): plenty for these programs, within the vDSA's
/// capacity.
pub const PRI_REQUESTS: u32 = 32;

/// One function's 4 KiB configuration space in the ECAM window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Address of configuration register 0.
    pub base: u64,
}

impl PciFunction {
    /// The function at `address`.
    pub fn at(address: PciAddress) -> Self {
        // ECAM: bus in bits 27:20, device/function in 19:12.
        Self {
            base: layout::PCIE_ECAM_START + (u64::from(address.rid()) << 12),
        }
    }

    /// The function at `bus:device.function`.
    pub fn new(bus: u8, device: u8, function: u8) -> Self {
        Self::at(PciAddress::new(bus, device, function))
    }

    fn reg(&self, offset: u16) -> u64 {
        self.base + u64::from(offset)
    }

    /// Emits a 16-bit configuration write.
    pub fn write16(
        &self,
        asm: &mut CodeAssembler,
        offset: u16,
        value: u16,
    ) -> Result<(), IcedError> {
        asm.mov(rdi, self.reg(offset))?;
        asm.mov(word_ptr(rdi), u32::from(value))
    }

    /// Emits a 32-bit configuration write.
    pub fn write32(
        &self,
        asm: &mut CodeAssembler,
        offset: u16,
        value: u32,
    ) -> Result<(), IcedError> {
        asm.mov(rdi, self.reg(offset))?;
        asm.mov(dword_ptr(rdi), value)
    }

    /// Emits a 32-bit configuration read into `eax`.
    pub fn read32(&self, asm: &mut CodeAssembler, offset: u16) -> Result<(), IcedError> {
        asm.mov(rdi, self.reg(offset))?;
        asm.mov(eax, dword_ptr(rdi))
    }

    /// Emits a check that the function is `vendor:device`.
    pub fn check_identity(
        &self,
        asm: &mut CodeAssembler,
        vendor: u16,
        device: u16,
    ) -> Result<(), IcedError> {
        let mut ok = asm.create_label();
        self.read32(asm, VENDOR_ID)?;
        asm.cmp(eax, ((u32::from(device) << 16) | u32::from(vendor)) as i32)?;
        asm.je(ok)?;
        asm.shr(eax, 16)?;
        fail_with_eax(asm, Step::PciIdentity)?;
        asm.set_label(&mut ok)
    }

    /// Emits the sizing of 64-bit memory BAR `bar` (memory decode off,
    /// all ones written to both halves, size read back into report slot
    /// `size_slot`) and its assignment to `address`.
    pub fn size_and_assign_bar64(
        &self,
        asm: &mut CodeAssembler,
        bar: u8,
        address: u64,
        size_slot: usize,
    ) -> Result<(), IcedError> {
        let mut is_64 = asm.create_label();
        let reg = BAR0 + 4 * u16::from(bar);
        // Memory decode off while the BAR moves.
        asm.mov(rdi, self.reg(COMMAND))?;
        asm.movzx(eax, word_ptr(rdi))?;
        asm.and(eax, !i32::from(command::MEMORY_SPACE))?;
        asm.mov(word_ptr(rdi), ax)?;
        self.read32(asm, reg)?;
        asm.mov(ecx, eax)?;
        asm.and(ecx, BAR_TYPE_MASK as i32)?;
        asm.cmp(ecx, bar::MEM_TYPE_64 as i32)?;
        asm.je(is_64)?;
        fail_with_eax(asm, Step::BarType)?;
        asm.set_label(&mut is_64)?;
        asm.mov(rdi, self.reg(reg))?;
        asm.mov(dword_ptr(rdi), u32::MAX)?;
        asm.mov(dword_ptr(rdi + 4), u32::MAX)?;
        asm.mov(eax, dword_ptr(rdi))?;
        asm.mov(edx, dword_ptr(rdi + 4))?;
        asm.and(eax, !(BAR_FLAGS as i32))?;
        asm.shl(rdx, 32)?;
        asm.or(rax, rdx)?;
        asm.neg(rax)?;
        report(asm, size_slot, rax)?;
        asm.mov(rdi, self.reg(reg))?;
        asm.mov(dword_ptr(rdi), address as u32)?;
        asm.mov(dword_ptr(rdi + 4), (address >> 32) as u32)
    }

    /// Emits the enable Linux's pci_enable_device + pci_set_master do:
    /// memory decode and bus master.
    pub fn enable_memory_and_bus_master(&self, asm: &mut CodeAssembler) -> Result<(), IcedError> {
        asm.mov(rdi, self.reg(COMMAND))?;
        asm.movzx(eax, word_ptr(rdi))?;
        asm.or(eax, i32::from(command::MEMORY_SPACE | command::BUS_MASTER))?;
        asm.mov(word_ptr(rdi), ax)
    }

    /// Emits a walk of the extended capability list for `id`
    /// (pci_find_ext_capability); leaves the offset in `esi` and records
    /// it in report slot `slot`. A missing capability fails the run.
    pub fn find_extended_capability(
        &self,
        asm: &mut CodeAssembler,
        id: u16,
        slot: usize,
    ) -> Result<(), IcedError> {
        let mut next = asm.create_label();
        let mut found = asm.create_label();
        let mut missing = asm.create_label();
        asm.mov(esi, EXTENDED_CAPABILITIES)?;
        asm.set_label(&mut next)?;
        asm.mov(rdi, self.base)?;
        asm.mov(eax, dword_ptr(rdi + rsi))?;
        asm.mov(edx, eax)?;
        asm.and(edx, 0xffff)?;
        asm.cmp(edx, i32::from(id))?;
        asm.je(found)?;
        asm.shr(eax, 20)?;
        asm.and(eax, 0xffc)?;
        asm.jz(missing)?;
        asm.mov(esi, eax)?;
        asm.jmp(next)?;
        asm.set_label(&mut missing)?;
        asm.mov(eax, u32::from(id))?;
        fail_with_eax(asm, Step::ExtendedCapability)?;
        asm.set_label(&mut found)?;
        asm.mov(rax, rsi)?;
        report(asm, slot, rax)
    }

    /// Emits what intel-iommu does before binding a device for SVA:
    /// PASID enable with privileged mode, PRI reset, allocation and
    /// enable, ATS enable (STU 0: 4 KiB). Capability offsets land in
    /// [`super::slot::PASID_CAP`], `PRI_CAP` and `ATS_CAP`.
    pub fn enable_pasid_pri_ats(&self, asm: &mut CodeAssembler) -> Result<(), IcedError> {
        use super::slot;
        use pci::ext_cap_id;
        const PRI_ENABLE: u16 = 1 << 0;
        const PRI_RESET: u16 = 1 << 1;
        const ATS_ENABLE: u16 = 1 << 15;

        self.enable_pasid(asm, true)?;
        self.find_extended_capability(asm, ext_cap_id::PRI, slot::PRI_CAP)?;
        self.write_at_esi16(asm, PRI_CTRL, PRI_RESET)?;
        asm.mov(rdi, self.base)?;
        asm.mov(dword_ptr(rdi + rsi + i32::from(PRI_ALLOC)), PRI_REQUESTS)?;
        self.write_at_esi16(asm, PRI_CTRL, PRI_ENABLE)?;
        self.find_extended_capability(asm, ext_cap_id::ATS, slot::ATS_CAP)?;
        self.write_at_esi16(asm, ATS_CTRL, ATS_ENABLE)
    }

    /// Emits the PASID enable alone (pci_enable_pasid), with privileged
    /// mode if `privileged`; the capability's offset lands in
    /// [`super::slot::PASID_CAP`].
    pub fn enable_pasid(&self, asm: &mut CodeAssembler, privileged: bool) -> Result<(), IcedError> {
        self.find_extended_capability(asm, pci::ext_cap_id::PASID, super::slot::PASID_CAP)?;
        let privileged = if privileged { PASID_PRIVILEGED } else { 0 };
        self.write_at_esi16(asm, PASID_CTRL, PASID_ENABLE | privileged)
    }

    /// Emits a 16-bit write at capability offset `esi` + `offset`.
    fn write_at_esi16(
        &self,
        asm: &mut CodeAssembler,
        offset: u16,
        value: u16,
    ) -> Result<(), IcedError> {
        asm.mov(rdi, self.base)?;
        asm.mov(word_ptr(rdi + rsi + i32::from(offset)), u32::from(value))
    }
}
