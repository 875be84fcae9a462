//! The CPUID template: what KVM supports, adjusted for this platform.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// CPUID.(EAX=7,ECX=0):ECX bits.
const LEAF7_ECX_MOVDIRI: u32 = 1 << 27;
const LEAF7_ECX_MOVDIR64B: u32 = 1 << 28;
const LEAF7_ECX_ENQCMD: u32 = 1 << 29;
/// CPUID.(EAX=7,ECX=0):EBX bit 20: SMAP.
const LEAF7_EBX_SMAP: u32 = 1 << 20;
/// CPUID.1:ECX bit 13: CMPXCHG16B.
const LEAF1_ECX_CX16: u32 = 1 << 13;
/// CPUID.1:ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;

/// Builds the CPUID for vCPU `cpu_id` of `num_cpus`.
pub fn template(kvm: &Kvm, cpu_id: u8, num_cpus: u8) -> Result<CpuId, kvm_ioctls::Error> {
    let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for entry in cpuid.as_mut_slice() {
        match (entry.function, entry.index) {
            (1, _) => {
                // Initial APIC ID and logical processor count.
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(cpu_id) << 24)
                    | (u32::from(num_cpus) << 16);
                // The backend's emulator cannot run `lock cmpxchg16b` at CPL0
                // (PLATFORM.md); without CX16 Linux's SLUB avoids it.
                entry.ecx &= !LEAF1_ECX_CX16;
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
            }
            (7, 0) => {
                // MOVDIRI and MOVDIR64B: the host executes them natively in
                // guest user mode, and the VMM emulates them where the
                // backend traps (CPL0, or an MMIO destination).
                // ENQCMD: no CPU here has it; the VMM emulates it (both the
                // CPL0 emulation-failure route and the CPL3 #UD route).
                // Linux's idxd refuses to load without MOVDIR64B and offers
                // shared work queues only with ENQCMD.
                entry.ecx |= LEAF7_ECX_MOVDIRI | LEAF7_ECX_MOVDIR64B | LEAF7_ECX_ENQCMD;
                // SMAP would make every `clac`/`stac` of a Linux guest an
                // emulation-failure exit (about 30 us each); hiding it lets
                // the kernel patch them out. This backend ignores leaf 7
                // here (measured: a Linux guest still saw SMAP), so the Linux
                // machine also puts `clearcpuid=smap` on the command line
                // (crate::machine::PLATFORM_PARAMS).
                entry.ebx &= !LEAF7_EBX_SMAP;
            }
            (0xb, _) | (0x1f, _) => entry.edx = u32::from(cpu_id),
            _ => {}
        }
    }
    Ok(cpuid)
}
