//! The CPUID table a vCPU gets: what KVM supports, its topology fields,
//! and the platform's edits ([`crate::platform::Platform::adjust_cpuid`]).

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

use crate::platform::Platform;

/// Builds the CPUID for vCPU `cpu_id` of `num_cpus` on `platform`.
pub fn template(
    kvm: &Kvm,
    cpu_id: u8,
    num_cpus: u8,
    platform: Platform,
) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for entry in cpuid.as_mut_slice() {
        match (entry.function, entry.index) {
            (1, _) => {
                // Initial APIC ID and logical processor count.
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(cpu_id) << 24)
                    | (u32::from(num_cpus) << 16);
            }
            (0xb, _) | (0x1f, _) => entry.edx = u32::from(cpu_id),
            _ => {}
        }
        platform.adjust_cpuid(entry);
    }
    Ok(cpuid)
}
