//! The project's Linux 6.12 guest (guest-images/) boots on this machine's
//! KVM with one and with two vCPUs, runs a shell command through its init
//! and powers off. These tests need /dev/kvm and the guest images (built
//! with guest-images/build.sh when they are missing).

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// One guest at a time: a boot keeps both of the machine's cores busy.
static ONE_GUEST: Mutex<()> = Mutex::new(());

/// Seconds a boot may take before the VMM gives up (a 1-vCPU boot takes
/// about a minute on a quiet machine).
const TIMEOUT_SECS: u32 = 900;

mod linux;
#[path = "linux/xstress.rs"]
mod xstress;

struct Images {
    /// The ELF kernel: loading it directly spares the guest the bzImage
    /// decompression (about 20 s of emulated code here).
    vmlinux: PathBuf,
    initramfs: PathBuf,
}

/// The guest images, from `$VMM_GUEST_IMAGES` or guest-images/ (built there
/// when missing).
fn images() -> Images {
    let (vmlinux, initramfs) = linux::guest_images();
    Images { vmlinux, initramfs }
}

/// What the user sees of one boot: the serial console and the VMM's exit.
struct Boot {
    console: String,
    status: std::process::ExitStatus,
    stderr: String,
}

fn boot(cpus: u8, shell_command: &str) -> Boot {
    boot_with(cpus, shell_command, &images().initramfs)
}

/// [`boot`] with another initramfs.
fn boot_with(cpus: u8, shell_command: &str, initramfs: &std::path::Path) -> Boot {
    microguest::require_kvm();
    let _one = ONE_GUEST.lock().unwrap_or_else(|e| e.into_inner());
    let images = images();
    // vmm.cmd encoding (guest-images/README.md): elements joined by ',',
    // every byte outside the safe set as %XX.
    let encode = |s: &str| -> String {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._/:=+@^".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    let cmdline = format!(
        "console=ttyS0 -- vmm.cmd=sh,-c,{} vmm.out=console",
        encode(shell_command)
    );
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--kernel")
        .arg(&images.vmlinux)
        .arg("--initramfs")
        .arg(initramfs)
        .args(["--memory", "128M", "--cpus", &cpus.to_string()])
        .args(["--timeout", &TIMEOUT_SECS.to_string()])
        .arg("--cmdline")
        .arg(&cmdline)
        .output()
        .expect("run the vmm");
    Boot {
        console: String::from_utf8_lossy(&out.stdout).replace('\r', ""),
        status: out.status,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_command_ran(b: &Boot) {
    let log = format!("console:\n{}\nvmm stderr:\n{}", b.console, b.stderr);
    assert!(
        b.console.contains("Linux version 6.12"),
        "kernel banner missing\n{log}"
    );
    assert!(
        b.console.lines().any(|l| l == "linux-boot-42"),
        "the command's output line is missing\n{log}"
    );
    assert!(
        b.console.lines().any(|l| l == "idxd-registered")
            && !b.console.contains("without MOVDIR64B"),
        "idxd did not load (the guest must take MOVDIR64B from forcecpuid=)\n{log}"
    );
    assert!(
        b.console.contains("\nVMM-EXIT-STATUS=0\n"),
        "init reported no exit status 0\n{log}"
    );
    assert_eq!(
        b.status.code(),
        Some(0),
        "the VMM ends with 0 when the guest powers off\n{log}"
    );
}

/// The shell computes the line, so it shows a process that made system
/// calls (fork, exec, write) and did work of its own; then it looks for the
/// idxd driver on the dsa bus.
const COMMAND: &str =
    "echo linux-boot-$((6 * 7)); test -d /sys/bus/dsa/drivers/idxd && echo idxd-registered";

#[test]
fn boots_and_runs_a_command_with_one_vcpu() {
    assert_command_ran(&boot(1, COMMAND));
}

#[test]
fn boots_and_runs_a_command_with_two_vcpus() {
    let b = boot(2, COMMAND);
    assert!(
        b.console.contains("smp: Brought up 1 node, 2 CPUs"),
        "the second vCPU did not come up\n{}",
        b.console
    );
    assert_command_ran(&b);
}

/// Two processes alive at once, switching on one vCPU, each keeping every
/// vector register full of its own values (`xstress`: ZMM0-31 and k0-7 on
/// this project's AVX-512 machines); then `dmesg | tail`, whose busybox
/// startup copies its TLS image with glibc's AVX-512 memcpy (ymm16).
/// Guest user code runs natively on the host CPU, so only the guest
/// kernel's XSAVE state management keeps the processes' registers apart.
/// On PVM that needs the VMM's XSAVE-family emulation. With `noxsave` (the
/// kernel then switches only x87/SSE state) one xstress of each pair
/// printed `xstress-corrupt` in each of 3 rounds (measured, 300 rounds
/// each), and before the glibc workaround 3-5 of 10 `dmesg | tail`
/// pipelines died with "Segmentation fault" ("segfault at 0 ip 4a4d02").
/// Yields and register checks per xstress process.
const XSTRESS_ROUNDS: u32 = 300;

#[test]
fn pipelines_keep_each_processes_registers() {
    // Cargo makes this directory when it builds the tests; in the bed's L1
    // only the executable is there.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(dir).expect("create the tests' temporary directory");
    let initramfs = dir.join("xstress.cpio");
    let regs = xstress::Registers::host();
    std::fs::write(
        &initramfs,
        xstress::initramfs(&images().initramfs, regs, XSTRESS_ROUNDS),
    )
    .expect("write the initramfs");
    let b = boot_with(
        1,
        "for i in 1 2 3 4 5; do /xstress | /xstress || echo pipeline-failed-$i; done; \
         for i in 1 2 3 4 5 6 7 8 9 10; do \
         dmesg | tail -n 1 >/dev/null || echo pipeline-failed-$i; done; echo pipelines-done",
        &initramfs,
    );
    let log = format!("console:\n{}\nvmm stderr:\n{}", b.console, b.stderr);
    assert!(
        b.console.lines().any(|l| l == "pipelines-done"),
        "the loop did not finish\n{log}"
    );
    assert!(
        // Line starts: the kernel echoes the command line, loop text included.
        !b.console.lines().any(|l| l.starts_with("pipeline-failed-")
            || l.starts_with("Segmentation fault")
            || l.starts_with("xstress-corrupt")),
        "a process of a pipeline died\n{log}"
    );
    assert_eq!(b.status.code(), Some(0), "the guest powers off\n{log}");
}
