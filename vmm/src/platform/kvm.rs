//! Ordinary KVM (Intel VMX, AMD SVM): the baseline every platform starts
//! from. The guest gets what `KVM_GET_SUPPORTED_CPUID` offers (XSAVE, AVX,
//! SMAP, CX16 as the host has them) and two instructions more, MOVDIR64B
//! and ENQCMD, which the VMM answers by every route a host produces:
//!
//! - the host lacks the instruction (every AMD CPU lacks ENQCMD, most CPUs
//!   lack MOVDIR64B): the guest's raises #UD at any CPL, which the vCPU
//!   sees at the guest's #UD handler (`crate::entry_watch`);
//! - the host has it and the destination is emulated MMIO: KVM cannot
//!   complete the store and exits with an emulation failure;
//! - the host has ENQCMD: the hardware IA32_PASID is the VMM thread's, not
//!   the guest's, so the guest's ENQCMD raises #GP, seen at the guest's #GP
//!   handler.
//!
//! KVM honours KVM_SET_CPUID2 for leaf 7, so an unpatched guest kernel sees
//! both bits: Linux's idxd loads (it needs MOVDIR64B) and offers shared
//! work queues (with ENQCMD, which Linux also ties to XSAVES).
//! MOVDIRI is left as KVM reports it: the VMM does not emulate it, and a
//! host that runs it natively is already listed.

use kvm_bindings::kvm_cpuid_entry2;

use super::leaf7_ecx;

/// CPUID.1:ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

/// The baseline CPUID edits (every platform).
pub(super) fn adjust_cpuid(entry: &mut kvm_cpuid_entry2) {
    match (entry.function, entry.index) {
        (1, _) => entry.ecx |= LEAF1_ECX_HYPERVISOR,
        (7, 0) => entry.ecx |= leaf7_ecx::MOVDIR64B | leaf7_ecx::ENQCMD,
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::super::Platform;
    use super::*;

    fn entry(function: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ebx,
            ecx,
            ..Default::default()
        }
    }

    #[test]
    fn ordinary_kvm_adds_movdir64b_and_enqcmd_and_keeps_the_rest() {
        const SMAP: u32 = 1 << 20;
        const CX16: u32 = 1 << 13;
        let mut leaf7 = entry(7, SMAP, 0);
        Platform::Kvm.adjust_cpuid(&mut leaf7);
        assert_eq!(leaf7.ecx, leaf7_ecx::MOVDIR64B | leaf7_ecx::ENQCMD);
        assert_eq!(leaf7.ebx, SMAP, "SMAP as KVM offers it");
        let mut leaf1 = entry(1, 0, CX16);
        Platform::Kvm.adjust_cpuid(&mut leaf1);
        assert_eq!(leaf1.ecx, CX16 | LEAF1_ECX_HYPERVISOR, "CX16 kept");
    }
}
