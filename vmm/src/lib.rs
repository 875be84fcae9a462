//! The VMM: the only crate that talks to KVM.
//!
//! It builds the machine in one place ([`machine::build`]: guest memory,
//! vCPUs, interrupt chip, buses, PCIe root complex, vIOMMU, vDSAs, ACPI
//! tables), loads a Linux kernel (or, through the
//! `microguest` harness crate, a micro-guest program), runs the vCPUs and
//! answers their exits. The `vmm` command (the root package's
//! `src/main.rs`, with `vmm run` in `src/run_command.rs`) sits on top of
//! it. Instruction emulation that the
//! platform's KVM lacks (MOVDIR64B, ENQCMD, ENQCMDS, and a fallback for
//! others) lives in [`emulator`].

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod devices;
pub mod emulator;
pub mod entry_watch;
pub mod guest_images;
pub mod layout;
pub mod machine;
pub mod modules;
pub mod msi;
pub mod pci_root;
pub mod platform;
pub mod share;
pub mod stop_signal;
pub mod sva;
pub mod vcpu;
pub mod vcpu_trace;
pub mod vm;
pub mod x86;
