//! What serves /dev/kvm, and everything the VMM does differently because of
//! it: the one seam between the generic machine and its two kinds of KVM.
//!
//! - **Ordinary KVM** ([`kvm`]): Intel VMX or AMD SVM, what users have. The
//!   guest sees what KVM offers, plus MOVDIR64B and ENQCMD, which the VMM
//!   answers wherever the host cannot run them. No kernel parameters are
//!   added, no SYSCALL MSR is intercepted, no page fault is watched.
//! - **PVM** ([`pvm`]): the software-assisted backend (`kvm_pvm`) that runs
//!   guest kernels through KVM's instruction emulator and leaves user-mode
//!   SYSCALL half done. Everything that exists only for it is applied only
//!   there: its kernel parameters, its CPUID edits (no paravirtual
//!   feature used by hypercall), no hypercall patching, the SYSCALL completion
//!   with its SYSCALL-MSR filter and #PF watch, and the fallback emulator's
//!   instructions (CLAC, STAC, POPCNT, FWAIT, INT3, CMPXCHG16B, the XSAVE
//!   family).
//!
//! What both share, because any x86 host can produce it, is the answer to
//! a guest's ENQCMD, ENQCMDS and MOVDIR64B by each route the host takes
//! (`crate::emulator`): an emulation-failure exit, a #UD at the guest's
//! handler where the host CPU lacks the instruction (at CPL 3 and CPL 0),
//! and a #GP at the guest's handler where the host has ENQCMD but its
//! IA32_PASID is not the guest's. [`Platform::watched_vectors`] says which
//! exception handlers the vCPU watches for that.
//!
//! # Detection
//!
//! A KVM backend is a kernel module (or a built-in one) of the host kernel,
//! and the kernel lists every module that is loaded or built in with
//! parameters under `/sys/module`: `kvm_intel` (VMX), `kvm_amd` (SVM) or
//! `kvm_pvm` (PVM; on this project's machines it is built in and shows its
//! read-only parameters `pvm_native`, `pvm_emul_batch`, ...). KVM allows one
//! vendor module at a time, so at most one of them serves /dev/kvm. The
//! KVM API itself does not name the backend (PVM answers the ordinary
//! ioctls and leaves no mark in `KVM_GET_SUPPORTED_CPUID`), which is why the
//! module list is the fact used. `--platform kvm|pvm` overrides the
//! detection where it cannot tell (no module found); an override the
//! module list contradicts is refused ([`Platform::choose`]).

pub mod kvm;
pub mod pvm;

use std::fmt;
use std::path::Path;
use std::sync::OnceLock;

use kvm_bindings::kvm_cpuid_entry2;

use crate::emulator::FallbackInstruction;

/// Exception vectors the platform may watch.
pub mod vector {
    /// #UD: the host CPU lacks ENQCMD or MOVDIR64B.
    pub const UD: u8 = 6;
    /// #GP: the host CPU has ENQCMD with an IA32_PASID not the guest's.
    pub const GP: u8 = 13;
    /// #PF: PVM's half-done SYSCALL.
    pub const PF: u8 = 14;
}

/// The kind of KVM serving /dev/kvm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Platform {
    /// Ordinary KVM: Intel VMX or AMD SVM.
    Kvm,
    /// The PVM backend (`kvm_pvm`).
    Pvm,
}

/// What the user asked for with `--platform`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PlatformChoice {
    /// Detect it.
    #[default]
    Auto,
    /// Ordinary KVM.
    Kvm,
    /// PVM.
    Pvm,
}

/// The outcome of [`Platform::detect`]: the platform, if the host says, and
/// the fact it was told by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Detection {
    /// `None` when no KVM module is listed.
    pub platform: Option<Platform>,
    /// The fact, for the user ("/sys/module/kvm_pvm is present").
    pub reason: String,
}

/// A `--platform` override the host contradicts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("--platform {}: /dev/kvm is served by {detected} here ({reason})", .asked.name())]
pub struct PlatformMismatch {
    /// What was asked for.
    pub asked: Platform,
    /// What the host has.
    pub detected: Platform,
    /// Why the VMM thinks so.
    pub reason: String,
}

/// The host CPU's own support of the instructions the VMM answers for the
/// guest (CPUID.(7,0):ECX of the CPU the VMM runs on, not the guest's).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostCpu {
    /// MOVDIR64B: a guest's runs natively (to RAM) or exits as an
    /// emulation failure (to emulated MMIO).
    pub movdir64b: bool,
    /// ENQCMD/ENQCMDS: a guest's ENQCMD raises #GP where the hardware
    /// IA32_PASID is not valid, and exits as an emulation failure otherwise.
    pub enqcmd: bool,
}

/// CPUID.(EAX=7,ECX=0):ECX bits.
pub(crate) mod leaf7_ecx {
    /// MOVDIRI.
    pub const MOVDIRI: u32 = 1 << 27;
    /// MOVDIR64B.
    pub const MOVDIR64B: u32 = 1 << 28;
    /// ENQCMD and ENQCMDS.
    pub const ENQCMD: u32 = 1 << 29;
}

impl HostCpu {
    /// The CPU this process runs on.
    pub fn probe() -> Self {
        let ecx = host_cpuid_leaf7_ecx();
        Self::from_leaf7_ecx(ecx)
    }

    /// From CPUID.(7,0):ECX.
    pub fn from_leaf7_ecx(ecx: u32) -> Self {
        HostCpu {
            movdir64b: ecx & leaf7_ecx::MOVDIR64B != 0,
            enqcmd: ecx & leaf7_ecx::ENQCMD != 0,
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn host_cpuid_leaf7_ecx() -> u32 {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // SAFETY: CPUID exists on every x86-64 CPU and only reads
    // identification registers; leaf 7 is read only when leaf 0 lists it.
    #[allow(unused_unsafe)]
    unsafe {
        if __cpuid(0).eax < 7 {
            return 0;
        }
        __cpuid_count(7, 0).ecx
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn host_cpuid_leaf7_ecx() -> u32 {
    0
}

/// `/sys/module` entries that name a KVM backend, most specific first.
const BACKEND_MODULES: &[(&str, Platform)] = &[
    ("kvm_pvm", Platform::Pvm),
    ("kvm_intel", Platform::Kvm),
    ("kvm_amd", Platform::Kvm),
];

impl Platform {
    /// Reads which KVM backend the host kernel has (see the module doc).
    pub fn detect() -> Detection {
        Self::detect_in(Path::new("/sys/module"))
    }

    /// [`Platform::detect`] over another module directory (tests).
    pub fn detect_in(modules: &Path) -> Detection {
        for &(module, platform) in BACKEND_MODULES {
            let path = modules.join(module);
            if path.exists() {
                return Detection {
                    platform: Some(platform),
                    reason: format!("{} is present", path.display()),
                };
            }
        }
        Detection {
            platform: None,
            reason: format!(
                "none of {} is in {}",
                BACKEND_MODULES
                    .iter()
                    .map(|(m, _)| *m)
                    .collect::<Vec<_>>()
                    .join(", "),
                modules.display()
            ),
        }
    }

    /// The detected platform of this host, read once per process; ordinary
    /// KVM when the host does not say (what a user most likely has).
    pub fn host() -> Platform {
        static HOST: OnceLock<Platform> = OnceLock::new();
        *HOST.get_or_init(|| {
            let d = Self::detect();
            d.platform.unwrap_or_else(|| {
                log::warn!(
                    "cannot tell which KVM serves /dev/kvm ({}); assuming ordinary KVM \
                     (--platform pvm overrides)",
                    d.reason
                );
                Platform::Kvm
            })
        })
    }

    /// The platform for a `--platform` choice, checked against `detection`:
    /// an override the detection contradicts is an error; one it cannot
    /// check is taken as given.
    pub fn choose(
        choice: PlatformChoice,
        detection: &Detection,
    ) -> Result<Platform, PlatformMismatch> {
        let asked = match choice {
            PlatformChoice::Auto => return Ok(detection.platform.unwrap_or(Platform::Kvm)),
            PlatformChoice::Kvm => Platform::Kvm,
            PlatformChoice::Pvm => Platform::Pvm,
        };
        match detection.platform {
            Some(detected) if detected != asked => Err(PlatformMismatch {
                asked,
                detected,
                reason: detection.reason.clone(),
            }),
            _ => Ok(asked),
        }
    }

    /// Kernel parameters a Linux guest needs on this platform, each with
    /// its reason; the VMM puts them before the user's command line.
    pub fn kernel_params(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Platform::Kvm => &[],
            Platform::Pvm => pvm::KERNEL_PARAMS,
        }
    }

    /// `cmdline` with [`Platform::kernel_params`] in front (before any `--`:
    /// kernel parameters, not init's arguments), except those the user
    /// already gave.
    pub fn with_kernel_params(self, cmdline: &str) -> String {
        let given = |p: &str| {
            let name = p.split('=').next().unwrap_or(p);
            cmdline
                .split_whitespace()
                .take_while(|w| *w != "--")
                .any(|w| w.split('=').next() == Some(name))
        };
        let mut params: Vec<&str> = self
            .kernel_params()
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| !given(p))
            .collect();
        if !cmdline.trim().is_empty() {
            params.push(cmdline.trim());
        }
        params.join(" ")
    }

    /// Edits one entry of the CPUID table KVM_GET_SUPPORTED_CPUID gave,
    /// before KVM_SET_CPUID2.
    pub fn adjust_cpuid(self, entry: &mut kvm_cpuid_entry2) {
        kvm::adjust_cpuid(entry);
        if self == Platform::Pvm {
            pvm::adjust_cpuid(entry);
        }
    }

    /// VM-wide settings the platform needs before any vCPU exists. On PVM:
    /// KVM must not rewrite a guest's hypercall instruction
    /// ([`pvm::keep_hypercalls_unpatched`]). Ordinary KVM keeps its
    /// defaults.
    pub fn configure_vm(self, vm: &kvm_ioctls::VmFd) -> Result<(), kvm_ioctls::Error> {
        match self {
            Platform::Kvm => Ok(()),
            Platform::Pvm => pvm::keep_hypercalls_unpatched(vm),
        }
    }

    /// The guest's user-mode SYSCALL needs the VMM (PVM leaves it half
    /// done): intercept writes of STAR/LSTAR/FMASK and watch #PF.
    pub fn completes_syscall(self) -> bool {
        self == Platform::Pvm
    }

    /// Whether an emulation-failure exit of `which` is answered by the
    /// fallback emulator. Only PVM's emulator lacks these; on ordinary KVM
    /// such an exit is a bug worth stopping for.
    pub fn emulates(self, which: FallbackInstruction) -> bool {
        let _ = which;
        self == Platform::Pvm
    }

    /// The exception handlers a vCPU watches: #UD where the host CPU lacks
    /// ENQCMD or MOVDIR64B (the guest's raises #UD, at any CPL), #GP where it
    /// has ENQCMD (the hardware IA32_PASID is not the guest's), and on PVM
    /// #PF once the guest has set up SYSCALL.
    pub fn watched_vectors(self, host: HostCpu, syscall_configured: bool) -> Vec<u8> {
        let mut vectors = Vec::new();
        if !host.enqcmd || !host.movdir64b {
            vectors.push(vector::UD);
        }
        if host.enqcmd {
            vectors.push(vector::GP);
        }
        if self.completes_syscall() && syscall_configured {
            vectors.push(vector::PF);
        }
        vectors
    }

    /// Lower-case name, as `--platform` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Platform::Kvm => "kvm",
            Platform::Pvm => "pvm",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Platform::Kvm => "ordinary KVM (kvm)",
            Platform::Pvm => "PVM (pvm)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn modules(names: &[&str]) -> tempdir::Dir {
        let dir = tempdir::Dir::new();
        for n in names {
            std::fs::create_dir(dir.path().join(n)).unwrap();
        }
        dir
    }

    /// A throw-away directory (std only).
    mod tempdir {
        use std::path::{Path, PathBuf};
        use std::sync::atomic::{AtomicU32, Ordering};

        pub struct Dir(PathBuf);

        impl Dir {
            pub fn new() -> Self {
                static N: AtomicU32 = AtomicU32::new(0);
                let p = std::env::temp_dir().join(format!(
                    "vmm-platform-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
            pub fn path(&self) -> &Path {
                &self.0
            }
        }

        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    #[test]
    fn the_backend_module_names_the_platform() {
        for (names, expected) in [
            (&["kvm", "kvm_pvm"][..], Some(Platform::Pvm)),
            (&["kvm", "kvm_amd", "ccp"][..], Some(Platform::Kvm)),
            (&["kvm", "kvm_intel"][..], Some(Platform::Kvm)),
            (&["kvm"][..], None),
        ] {
            let dir = modules(names);
            let d = Platform::detect_in(dir.path());
            assert_eq!(d.platform, expected, "{names:?}: {}", d.reason);
        }
        let dir = modules(&["kvm_pvm"]);
        assert!(Platform::detect_in(dir.path())
            .reason
            .ends_with("kvm_pvm is present"));
    }

    #[test]
    fn an_override_the_host_contradicts_is_refused() {
        let pvm = Detection {
            platform: Some(Platform::Pvm),
            reason: "/sys/module/kvm_pvm is present".into(),
        };
        let unknown = Detection {
            platform: None,
            reason: "none".into(),
        };
        assert_eq!(
            Platform::choose(PlatformChoice::Auto, &pvm),
            Ok(Platform::Pvm)
        );
        assert_eq!(
            Platform::choose(PlatformChoice::Pvm, &pvm),
            Ok(Platform::Pvm)
        );
        let err = Platform::choose(PlatformChoice::Kvm, &pvm).unwrap_err();
        assert_eq!(
            err.to_string(),
            "--platform kvm: /dev/kvm is served by PVM (pvm) here \
             (/sys/module/kvm_pvm is present)"
        );
        assert_eq!(
            Platform::choose(PlatformChoice::Pvm, &unknown),
            Ok(Platform::Pvm)
        );
        assert_eq!(
            Platform::choose(PlatformChoice::Auto, &unknown),
            Ok(Platform::Kvm)
        );
    }

    #[test]
    fn ordinary_kvm_adds_no_kernel_parameter() {
        assert_eq!(
            Platform::Kvm.with_kernel_params("console=ttyS0 -- vmm.cmd=true"),
            "console=ttyS0 -- vmm.cmd=true"
        );
        assert_eq!(Platform::Kvm.with_kernel_params(""), "");
    }

    #[test]
    fn pvm_parameters_come_before_the_users_and_before_init_args() {
        assert_eq!(
            Platform::Pvm.with_kernel_params("console=ttyS0 -- vmm.cmd=true"),
            "forcecpuid=movdir64b,enqcmd clearcpuid=smap lapic=notscdeadline console=ttyS0 -- \
             vmm.cmd=true"
        );
        assert_eq!(
            Platform::Pvm.with_kernel_params(""),
            "forcecpuid=movdir64b,enqcmd clearcpuid=smap lapic=notscdeadline"
        );
    }

    #[test]
    fn a_pvm_parameter_the_user_gave_is_not_repeated() {
        assert_eq!(
            Platform::Pvm.with_kernel_params("forcecpuid=movdir64b console=ttyS0"),
            "clearcpuid=smap lapic=notscdeadline forcecpuid=movdir64b console=ttyS0"
        );
        // After `--` it is an argument of init, not a kernel parameter.
        assert_eq!(
            Platform::Pvm.with_kernel_params("console=ttyS0 -- clearcpuid=smap"),
            "forcecpuid=movdir64b,enqcmd clearcpuid=smap lapic=notscdeadline console=ttyS0 -- \
             clearcpuid=smap"
        );
    }

    #[test]
    fn watched_vectors_follow_the_host_cpu_and_the_platform() {
        let amd = HostCpu {
            movdir64b: false,
            enqcmd: false,
        };
        let icelake = HostCpu {
            movdir64b: true,
            enqcmd: false,
        };
        let sapphire_rapids = HostCpu {
            movdir64b: true,
            enqcmd: true,
        };
        assert_eq!(Platform::Kvm.watched_vectors(amd, true), vec![vector::UD]);
        assert_eq!(
            Platform::Kvm.watched_vectors(icelake, true),
            vec![vector::UD]
        );
        assert_eq!(
            Platform::Kvm.watched_vectors(sapphire_rapids, true),
            vec![vector::GP],
            "no #UD watch where the host runs both; never #PF on ordinary KVM"
        );
        assert_eq!(
            Platform::Pvm.watched_vectors(icelake, false),
            vec![vector::UD]
        );
        assert_eq!(
            Platform::Pvm.watched_vectors(icelake, true),
            vec![vector::UD, vector::PF]
        );
    }

    #[test]
    fn host_cpu_from_leaf7() {
        assert_eq!(
            HostCpu::from_leaf7_ecx(leaf7_ecx::MOVDIR64B),
            HostCpu {
                movdir64b: true,
                enqcmd: false
            }
        );
        assert_eq!(
            HostCpu::from_leaf7_ecx(leaf7_ecx::ENQCMD | leaf7_ecx::MOVDIR64B),
            HostCpu {
                movdir64b: true,
                enqcmd: true
            }
        );
    }

    #[test]
    fn only_pvm_runs_the_fallback_emulator() {
        assert!(Platform::Pvm.emulates(FallbackInstruction::Clac));
        assert!(!Platform::Kvm.emulates(FallbackInstruction::Popcnt));
        assert!(Platform::Pvm.completes_syscall());
        assert!(!Platform::Kvm.completes_syscall());
    }
}
