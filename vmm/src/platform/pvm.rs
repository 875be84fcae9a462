//! PVM (`kvm_pvm`), the backend of this project's own machines, and what
//! the VMM does only for it. Its behaviour, measured (docs/pvm-backend.md):
//!
//! - An unmodified guest's CPL 0 code always runs through KVM's instruction
//!   emulator, which lacks CLAC, STAC, POPCNT, FWAIT, INT3, LOCK CMPXCHG16B
//!   and the XSAVE family but XSETBV: each ends KVM_RUN as an emulation
//!   failure. The VMM's fallback emulator
//!   (`crate::emulator::FallbackInstruction`) answers them
//!   ([`super::Platform::emulates`]); the XSAVE family on the state KVM
//!   keeps ([`xsave_cpuid`], [`xstate_image`], [`kvm_xsave_of`]), so the
//!   guest kernel manages XSAVE state as on hardware: guest user code runs
//!   natively on the host CPU with AVX, AVX2 and AVX-512 (the backend's
//!   CPUID), and each process keeps its YMM/ZMM/opmask registers.
//! - A user-mode SYSCALL reaches LSTAR without switching to CPL 0 and
//!   faults there. The VMM intercepts writes of STAR/LSTAR/FMASK
//!   ([`SYSCALL_MSR_WRITES`]), watches the guest's #PF handler once LSTAR is
//!   set, and completes the SYSCALL there
//!   (`crate::emulator::complete_syscall`). Every guest page fault then
//!   costs a debug exit: 88 per iteration of a shell loop running
//!   `/bin/true` (fork, exec, exit), 105 for a whole boot to `true`
//!   (measured, `RUST_LOG=vmm=info vmm run`, one vCPU).
//! - Leaf 7 of KVM_SET_CPUID2 is ignored: MOVDIR64B and ENQCMD reach the
//!   guest kernel through its `forcecpuid=` parameter (the project's guest
//!   kernel patch), SMAP is hidden by `clearcpuid=smap`. Leaf 0xD is
//!   ignored too (XSAVES added to sub-leaf 1 did not reach the guest), so
//!   the guest has no XSAVES and no PASID state component: IA32_PASID is
//!   kept per address space (`crate::sva::GuestPasids`), not by XRSTORS.
//! - A hypercall (VMCALL or VMMCALL) at CPL 0 never reaches KVM's hypercall
//!   handler: KVM's emulator treats it as the wrong vendor's instruction
//!   and "fixes" it, writing the backend's preferred instruction (VMCALL,
//!   measured) over the guest's three bytes and running it again, which
//!   does the same: the vCPU spins there forever, or, once the kernel
//!   text is read-only, the write is a #PF the guest cannot handle (a
//!   4-vCPU Linux sends its IPIs by hypercall and hung or panicked at
//!   boot). The VMM turns that patching off
//!   ([`keep_hypercalls_unpatched`]: the guest gets #UD at the instruction,
//!   its text intact) and hides the paravirtual features a Linux guest
//!   would use by hypercall ([`HYPERCALL_FEATURES`]); the guest then sends
//!   IPIs through its x2APIC, as with two vCPUs.

use kvm_bindings::{kvm_cpuid_entry2, kvm_xcrs, kvm_xsave};
use kvm_bindings::{kvm_enable_cap, KVM_CAP_DISABLE_QUIRKS2, KVM_X86_QUIRK_FIX_HYPERCALL_INSN};
use kvm_ioctls::{MsrFilterRange, MsrFilterRangeFlags, VmFd};

use super::leaf7_ecx;
use crate::emulator::{syscall_msr, XStateLayout, XsaveFeatures};

/// CPUID.(EAX=7,ECX=0):EBX bit 20: SMAP.
const LEAF7_EBX_SMAP: u32 = 1 << 20;
/// CPUID.1:ECX bit 13: CMPXCHG16B.
const LEAF1_ECX_CX16: u32 = 1 << 13;

/// CPUID leaf of KVM's paravirtual features (EAX), KVM_CPUID_FEATURES.
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// KVM's paravirtual features (CPUID 0x4000_0001 EAX) whose use is a
/// hypercall.
pub mod kvm_feature {
    /// KVM_FEATURE_PV_UNHALT: paravirtual spinlocks, woken by
    /// KVM_HC_KICK_CPU.
    pub const PV_UNHALT: u32 = 1 << 7;
    /// KVM_FEATURE_PV_SEND_IPI: IPIs to several CPUs by KVM_HC_SEND_IPI.
    pub const PV_SEND_IPI: u32 = 1 << 11;
    /// KVM_FEATURE_PV_SCHED_YIELD: KVM_HC_SCHED_YIELD to a preempted
    /// IPI target.
    pub const PV_SCHED_YIELD: u32 = 1 << 13;
}

/// The features PVM hides: a hypercall at CPL 0 cannot be made there (see
/// the module doc), so the guest must not be told to make one. Linux then
/// sends IPIs through x2APIC ICR writes, uses ordinary spinlocks and does
/// not yield to preempted vCPUs.
pub const HYPERCALL_FEATURES: u32 =
    kvm_feature::PV_UNHALT | kvm_feature::PV_SEND_IPI | kvm_feature::PV_SCHED_YIELD;

/// PVM's CPUID edits, after the baseline's.
pub(super) fn adjust_cpuid(entry: &mut kvm_cpuid_entry2) {
    match (entry.function, entry.index) {
        (KVM_CPUID_FEATURES, _) => {
            // The backend takes this leaf from KVM_SET_CPUID2 (measured:
            // a guest's CPUID no longer showed a cleared bit).
            entry.eax &= !HYPERCALL_FEATURES;
        }
        (1, _) => {
            // The backend's emulator cannot run `lock cmpxchg16b` at CPL0;
            // without CX16 Linux's SLUB avoids it.
            entry.ecx &= !LEAF1_ECX_CX16;
        }
        (7, 0) => {
            // The host executes MOVDIRI natively in guest user mode and
            // KVM's emulator knows it at CPL 0.
            entry.ecx |= leaf7_ecx::MOVDIRI;
            // SMAP would make every `clac`/`stac` of a Linux guest an
            // emulation-failure exit (about 30 us each). The backend ignores
            // leaf 7 here (a Linux guest still saw SMAP), so the Linux
            // machine also passes `clearcpuid=smap` (KERNEL_PARAMS).
            entry.ebx &= !LEAF7_EBX_SMAP;
        }
        _ => {}
    }
}

/// Turns off KVM's rewriting of a guest hypercall instruction
/// (KVM_X86_QUIRK_FIX_HYPERCALL_INSN): a VMCALL or VMMCALL at CPL 0 then
/// raises #UD in the guest, as on a machine without a hypervisor, instead
/// of rewriting the guest's code and spinning on it.
pub fn keep_hypercalls_unpatched(vm: &VmFd) -> Result<(), kvm_ioctls::Error> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_DISABLE_QUIRKS2,
        ..Default::default()
    };
    cap.args[0] = u64::from(KVM_X86_QUIRK_FIX_HYPERCALL_INSN);
    vm.enable_cap(&cap)
}

/// Writes of STAR (bit 0), LSTAR (bit 1) and FMASK (bit 3) exit to the VMM;
/// CSTAR (bit 2) stays with KVM.
const SYSCALL_WRITE_BITMAP: [u8; 1] = [0b0100];

/// The MSR-filter range that makes the guest's writes of its SYSCALL
/// configuration exit, so the vCPU keeps them for the SYSCALL completion
/// and (re)arms its #PF watch.
pub const SYSCALL_MSR_WRITES: MsrFilterRange<'static> = MsrFilterRange {
    flags: MsrFilterRangeFlags::WRITE,
    base: syscall_msr::STAR,
    msr_count: 4,
    bitmap: &SYSCALL_WRITE_BITMAP,
};

/// Kernel parameters every Linux guest needs on PVM, each with the reason.
pub const KERNEL_PARAMS: &[(&str, &str)] = &[
    (
        "forcecpuid=movdir64b,enqcmd",
        // What the guest does: idxd refuses to load without MOVDIR64B and
        // offers shared work queues only with ENQCMD. The backend ignores
        // KVM_SET_CPUID2 for leaf 7, so the VMM cannot advertise them; the
        // guest kernel's forcecpuid= (guest-images/patches/0002) takes them
        // from here. The VMM emulates both where the backend traps them.
        "CPUID leaf 7 cannot advertise MOVDIR64B and ENQCMD on this backend",
    ),
    (
        "clearcpuid=smap",
        // What the guest does: with SMAP it brackets every user-memory access
        // with STAC/CLAC and enters every exception with CLAC. The backend's
        // emulator lacks both, so each is an emulation-failure exit (7,136
        // of them in a boot to `echo hi`, measured). The backend shows SMAP
        // in CPUID leaf 7 whatever KVM_SET_CPUID2 says; without it the
        // kernel leaves both instructions out.
        "every STAC/CLAC would be an emulation-failure exit",
    ),
    (
        "lapic=notscdeadline",
        // What the guest does: with the TSC-deadline timer its LAPIC
        // clockevent is one-shot only, and until a CPU switches to
        // high-resolution mode its periodic tick is emulated: a late tick's
        // handler runs tick_periodic() again for every period it missed
        // before it returns. An emulated tick costs milliseconds, so a vCPU
        // that shares a host core with others never catches up; with 4
        // vCPUs on 2 cores a CPU sat in that loop for minutes (its task at
        // one RIP, RCU stall reports) while the others waited for it in
        // stop_machine. The LAPIC's own periodic mode has no catch-up loop
        // (one run of 4 vCPUs got past that point with it; see
        // docs/pvm-backend.md).
        "a periodic tick emulated by the one-shot TSC-deadline timer never catches up on a shared core",
    ),
];

/// The XSAVE family's view of a vCPU's CPUID (leaf 0xD): where the state
/// components live and which instructions are offered. The backend's KVM
/// emulator runs XSETBV at CPL 0 but not XGETBV, XSAVE, XSAVEOPT, XSAVEC,
/// XRSTOR (each an emulation-failure exit, measured with a micro-guest), so
/// the VMM's fallback emulator executes them on the state KVM keeps
/// ([`xstate_image`], [`kvm_xsave_of`]).
pub fn xsave_cpuid(entries: &[kvm_cpuid_entry2]) -> (XStateLayout, XsaveFeatures) {
    let leaf = |index: u32| {
        entries
            .iter()
            .find(|e| e.function == 0xd && e.index == index)
            .map_or((0, 0, 0), |e| (e.eax, e.ebx, e.ecx))
    };
    let features = XsaveFeatures::from_leaf_d1_eax(leaf(1).0);
    (XStateLayout::from_cpuid(leaf), features)
}

/// The standard-format image of `KVM_GET_XSAVE`'s answer.
pub fn xstate_image(xsave: &kvm_xsave) -> Vec<u8> {
    xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// The `KVM_SET_XSAVE` argument holding `image` (at most 4096 bytes: the
/// guest's standard-format area, 2,696 bytes with AVX-512 and PKRU).
pub fn kvm_xsave_of(image: &[u8]) -> kvm_xsave {
    let mut xsave = kvm_xsave::default();
    for (word, bytes) in xsave.region.iter_mut().zip(image.chunks(4)) {
        let mut w = [0u8; 4];
        w[..bytes.len()].copy_from_slice(bytes);
        *word = u32::from_le_bytes(w);
    }
    xsave
}

/// XCR0 from `KVM_GET_XCRS` (1, x87 only, if KVM lists none).
pub fn xcr0_of(xcrs: &kvm_xcrs) -> u64 {
    let n = (xcrs.nr_xcrs as usize).min(xcrs.xcrs.len());
    xcrs.xcrs[..n]
        .iter()
        .find(|x| x.xcr == 0)
        .map_or(1, |x| x.value)
}

#[cfg(test)]
mod tests {
    use super::super::Platform;
    use super::*;

    #[test]
    fn pvm_hides_cx16_and_smap_and_adds_the_store_instructions() {
        let mut leaf1 = kvm_cpuid_entry2 {
            function: 1,
            ecx: LEAF1_ECX_CX16 | 1,
            ..Default::default()
        };
        Platform::Pvm.adjust_cpuid(&mut leaf1);
        assert_eq!(leaf1.ecx, 1 | (1 << 31));
        let mut leaf7 = kvm_cpuid_entry2 {
            function: 7,
            ebx: LEAF7_EBX_SMAP | 1,
            ..Default::default()
        };
        Platform::Pvm.adjust_cpuid(&mut leaf7);
        assert_eq!(leaf7.ebx, 1);
        assert_eq!(
            leaf7.ecx,
            leaf7_ecx::MOVDIRI | leaf7_ecx::MOVDIR64B | leaf7_ecx::ENQCMD
        );
    }

    #[test]
    fn pvm_hides_the_features_a_guest_uses_by_hypercall() {
        // KVM's leaf as a 6.18 host offers it (measured on this machine).
        let offered = 0x0100_7efb;
        let mut leaf = kvm_cpuid_entry2 {
            function: KVM_CPUID_FEATURES,
            eax: offered,
            ..Default::default()
        };
        Platform::Pvm.adjust_cpuid(&mut leaf);
        assert_eq!(leaf.eax, 0x0100_567b);
        let mut leaf = kvm_cpuid_entry2 {
            function: KVM_CPUID_FEATURES,
            eax: offered,
            ..Default::default()
        };
        Platform::Kvm.adjust_cpuid(&mut leaf);
        assert_eq!(leaf.eax, offered, "ordinary KVM keeps every feature");
    }

    #[test]
    fn syscall_filter_covers_star_lstar_fmask_not_cstar() {
        let r = SYSCALL_MSR_WRITES;
        assert_eq!((r.base, r.msr_count), (0xc000_0081, 4));
        // A 0 bit denies the write (it exits to the VMM).
        for (msr, exits) in [(0, true), (1, true), (2, false), (3, true)] {
            assert_eq!(r.bitmap[0] & (1 << msr) == 0, exits, "MSR +{msr}");
        }
    }
}
