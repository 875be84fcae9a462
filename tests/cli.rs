//! The command line: every bad input gets one line naming the problem and
//! exit status 2; the micro-guest demo works end to end.

use std::path::PathBuf;
use std::process::Command;

fn vmm(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .output()
        .expect("run vmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn assert_usage_error(args: &[&str], line: &str) {
    let (code, _, err) = vmm(args);
    assert_eq!(err, format!("{line}\n"), "args {args:?}");
    assert_eq!(code, 2, "args {args:?}");
}

/// An ELF64 x86-64 kernel whose one segment needs RAM up to 80 MiB.
fn big_kernel() -> PathBuf {
    let mut elf = Vec::new();
    let mut ident = [0u8; 16];
    ident[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
    elf.extend_from_slice(&ident);
    for (v, n) in [
        (2u64, 2),
        (0x3e, 2),
        (1, 4),
        (0x100_0000, 8),
        (64, 8),
        (0, 8),
        (0, 4),
        (64, 2),
        (56, 2),
        (1, 2),
        (64, 2),
        (0, 2),
        (0, 2),
    ] {
        elf.extend_from_slice(&v.to_le_bytes()[..n]);
    }
    for (v, n) in [
        (1u64, 4),
        (7, 4),
        (0, 8),
        (0xffff_ffff_8100_0000, 8),
        (0x100_0000, 8),
        (0, 8),
        (64 << 20, 8),
        (0x1000, 8),
    ] {
        elf.extend_from_slice(&v.to_le_bytes()[..n]);
    }
    // Tests run in parallel: each call writes its own file, so that no test
    // reads one another is still writing.
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("vmm-cli-big-{}-{n}.elf", std::process::id()));
    std::fs::write(&path, elf).unwrap();
    path
}

#[test]
fn missing_kernel_option() {
    assert_usage_error(
        &[],
        "error: --kernel is required (or use a subcommand: micro, bench)",
    );
}

#[test]
fn missing_kernel_file() {
    assert_usage_error(
        &["--kernel", "/nonexistent/vmlinux"],
        "error: cannot read kernel '/nonexistent/vmlinux': No such file or directory (os error 2)",
    );
}

#[test]
fn unreadable_kernel() {
    let dir = std::env::temp_dir();
    let line = format!(
        "error: cannot read kernel image {}: Is a directory (os error 21)",
        dir.display()
    );
    assert_usage_error(&["--kernel", dir.to_str().unwrap()], &line);
}

#[test]
fn missing_initramfs() {
    let k = big_kernel();
    assert_usage_error(&["--kernel", k.to_str().unwrap(), "--initramfs", "/nonexistent/initrd"], "error: cannot read initramfs '/nonexistent/initrd': No such file or directory (os error 2)");
}

#[test]
fn unparseable_memory_size() {
    let k = big_kernel();
    assert_usage_error(&["--kernel", k.to_str().unwrap(), "--memory", "12X"], "error: invalid value '12X' for '--memory <MEMORY>': expected a number with an optional K, M or G suffix");
}

#[test]
fn memory_below_minimum() {
    let k = big_kernel();
    assert_usage_error(
        &["--kernel", k.to_str().unwrap(), "--memory", "1M"],
        "error: --memory 1048576 bytes is below the minimum of 16 MiB",
    );
}

#[test]
fn memory_too_small_for_the_image() {
    let k = big_kernel();
    let line = format!("error: guest memory is too small for {}: it needs RAM up to 80 MiB, the guest has 16 MiB below the PCI hole", k.display());
    assert_usage_error(&["--kernel", k.to_str().unwrap(), "--memory", "16M"], &line);
}

#[test]
fn zero_cpus() {
    let k = big_kernel();
    assert_usage_error(
        &["--kernel", k.to_str().unwrap(), "--cpus", "0"],
        "error: invalid value '0' for '--cpus <CPUS>': 0 is not in 1..=255",
    );
}

#[test]
fn bad_serial_target() {
    assert_usage_error(
        &["--serial", "tty9"],
        "error: invalid value 'tty9' for '--serial <SERIAL>': expected stdout, stderr, none or file:PATH",
    );
}

#[test]
fn unknown_micro_program() {
    assert_usage_error(
        &["micro", "nosuch"],
        "error: invalid value 'nosuch' for '<PROGRAM>'",
    );
}

#[test]
fn enqcmd_demo_runs() {
    microguest::require_kvm();
    let (code, out, err) = vmm(&["micro", "enqcmd-demo"]);
    assert_eq!(code, 0, "stderr: {err}");
    assert!(
        out.contains("guest: took 1 #GP, ENQCMD returned ZF=0 (accepted)"),
        "{out}"
    );
    assert!(
        out.contains(
            "portal: Enqcmd at offset 0x0, descriptor dword0 0x00001234: PASID 0x1234, privilege 0"
        ),
        "{out}"
    );
    assert!(out.ends_with("ENQCMD trap demo: OK\n"), "{out}");
}

#[test]
fn unknown_platform() {
    assert_usage_error(
        &["--platform", "xen", "micro", "enqcmd-demo"],
        "error: invalid value 'xen' for '--platform <PLATFORM>'",
    );
}

#[test]
fn a_platform_override_the_host_contradicts_is_refused() {
    use vmm::platform::Platform;
    let detection = Platform::detect();
    let Some(detected) = detection.platform else {
        println!(
            "skipped: this host does not say which KVM it has ({}), so no override \
             contradicts it",
            detection.reason
        );
        return;
    };
    let (wrong, right) = match detected {
        Platform::Kvm => ("pvm", "kvm"),
        Platform::Pvm => ("kvm", "pvm"),
    };
    for args in [
        vec!["--platform", wrong, "micro", "enqcmd-demo"],
        vec!["micro", "enqcmd-demo", "--platform", wrong],
        vec!["--platform", wrong, "--kernel", "/nonexistent"],
    ] {
        assert_usage_error(
            &args,
            &format!(
                "error: --platform {wrong}: /dev/kvm is served by {detected} here ({})",
                detection.reason
            ),
        );
    }
    microguest::require_kvm();
    for platform in ["auto", right] {
        let (code, out, err) = vmm(&["--platform", platform, "micro", "enqcmd-demo"]);
        assert_eq!(code, 0, "--platform {platform}: {err}");
        assert!(out.ends_with("ENQCMD trap demo: OK\n"), "{out}");
    }
}

// `vmm run`: every bad input is refused before anything boots.

/// `vmm run --kernel K --initramfs K` followed by `rest` (any readable file
/// passes the initramfs check).
fn run_args<'a>(kernel: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["run", "--kernel", kernel, "--initramfs", kernel];
    args.extend_from_slice(rest);
    args
}

#[test]
fn run_default_images_from_a_wrong_directory() {
    // Without --kernel or --initramfs the default images are used; a
    // $VMM_GUEST_IMAGES without them is refused before anything boots.
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .env("VMM_GUEST_IMAGES", "/nonexistent")
        .args(["run", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: $VMM_GUEST_IMAGES is /nonexistent but it holds no vmlinux and initramfs-base.cpio\n"
    );
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn run_without_command() {
    let k = big_kernel();
    let k = k.to_str().unwrap();
    let expected = "error: no command: give it after \"--\", as in vmm run -- sh -c 'echo hi'";
    assert_usage_error(&run_args(k, &[]), expected);
    assert_usage_error(&run_args(k, &["--"]), expected);
}

#[test]
fn run_command_without_double_dash() {
    let k = big_kernel();
    assert_usage_error(
        &run_args(k.to_str().unwrap(), &["true"]),
        "error: unexpected argument 'true' found",
    );
}

#[test]
fn run_missing_files() {
    assert_usage_error(
        &run_args("/nonexistent/vmlinux", &["--", "true"]),
        "error: cannot read kernel '/nonexistent/vmlinux': No such file or directory (os error 2)",
    );
    let k = big_kernel();
    assert_usage_error(
        &[
            "run",
            "--kernel",
            k.to_str().unwrap(),
            "--initramfs",
            "/nonexistent/i",
            "--",
            "true",
        ],
        "error: cannot read initramfs '/nonexistent/i': No such file or directory (os error 2)",
    );
}

#[test]
fn run_bad_serial_target() {
    assert_usage_error(
        &["run", "--serial", "file:", "--", "true"],
        "error: invalid value 'file:' for '--serial <SERIAL>': expected stdout, stderr, none or file:PATH",
    );
}

#[test]
fn run_bad_memory_and_cpus() {
    let k = big_kernel();
    assert_usage_error(
        &run_args(k.to_str().unwrap(), &["--memory", "4M", "--", "true"]),
        "error: --memory 4194304 bytes is below the minimum of 16 MiB",
    );
    assert_usage_error(
        &["run", "--cpus", "300", "--", "true"],
        "error: invalid value '300' for '--cpus <CPUS>': 300 is not in 1..=255",
    );
}

#[test]
fn run_cmdline_with_double_dash() {
    let k = big_kernel();
    assert_usage_error(
        &run_args(
            k.to_str().unwrap(),
            &["--cmdline", "console=ttyS0 -- x", "--", "true"],
        ),
        "error: --cmdline must not contain \"--\": vmm run adds init's settings after it",
    );
}

#[test]
fn run_command_too_long_for_the_kernel() {
    let k = big_kernel();
    // 1000 spaces encode as 3000 bytes of %20.
    let long = " ".repeat(1000);
    // The platform's own kernel parameters (PVM's) count too.
    let base = "console=ttyS0";
    let added = vmm::platform::Platform::host()
        .with_kernel_params(base)
        .len()
        - base.len();
    assert_usage_error(
        &run_args(k.to_str().unwrap(), &["--", "echo", &long]),
        &format!(
            "error: the command is too long: the kernel command line would be {} bytes, \
             the limit is 2047",
            3059 + added
        ),
    );
}

#[test]
fn run_help_names_the_exit_statuses() {
    let (code, out, _) = vmm(&["run", "--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("[default: stderr]"), "{out}");
    assert!(
        out.contains("6 guest kernel panic, 7 init could not run the command"),
        "{out}"
    );
    assert!(
        out.contains("8 the guest powered off before reporting a status"),
        "{out}"
    );
}

/// The README's main job: SVA end to end in a micro-guest.
#[test]
fn sva_demo_copies_through_the_viommu_with_pasid_translation() {
    microguest::require_kvm();
    let (code, out, err) = vmm(&["micro", "sva-demo"]);
    assert_eq!(code, 0, "stdout: {out}\nstderr: {err}");
    for line in [
        "user process: MOVDIR64B to dedicated WQ 0: MEMMOVE of 6144 bytes 0x210000 -> 0x212000, completion Success, destination matches the source",
        "user process: ENQCMD to shared WQ 1: MEMMOVE of 4096 bytes 0x220000 -> 0x222000, completion Success, destination matches the source",
        "user process: the first ENQCMD took 1 #GP (IA32_PASID clear); the kernel's fixup loaded PASID 0x1234, the retry was accepted",
    ] {
        assert!(out.contains(line), "missing '{line}' in:\n{out}");
    }
    let host = out
        .split("VMM: guest PASID 0x1234 -> host PASID ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no PASID translation line in:\n{out}"));
    assert_ne!(host, "0x1234", "{out}");
    assert!(
        out.contains(&format!("vDSA: DMA tagged 00:01.0 with host PASID {host}; the vIOMMU translated it back to guest PASID 0x1234")),
        "{out}"
    );
    assert!(out.ends_with("sva-demo: OK\n"), "{out}");
}

#[test]
fn bad_dsa_specs() {
    let bad = |spec: &str, why: &str| {
        assert_usage_error(
            &["--dsa", spec],
            &format!("error: invalid value '{spec}' for '--dsa [<SPEC>]': {why}"),
        )
    };
    bad("wqs=0", "wqs must be a number from 1 to 16, got '0'");
    bad("wqs=17", "wqs must be a number from 1 to 16, got '17'");
    bad("engines=9", "engines must be a number from 1 to 8, got '9'");
    bad("groups=0", "groups must be a number from 1 to 8, got '0'");
    bad("groups=x", "groups must be a number from 1 to 8, got 'x'");
    bad(
        "wq-size=0",
        "wq-size must be a number from 1 to 65535, got '0'",
    );
    bad(
        "wq-size=65536",
        "wq-size must be a number from 1 to 65535, got '65536'",
    );
    bad(
        "max-batch=1",
        "max-batch must be a number from 2 to 32768, got '1'",
    );
    bad(
        "max-batch=1000",
        "max-batch must be a power of two, got 1000",
    );
    bad(
        "queues=2",
        "unknown key 'queues' (expected wqs, engines, groups, wq-size, max-batch, int-handles)",
    );
    bad(
        "int-handles=yes",
        "int-handles must be on or off, got 'yes'",
    );
    bad("wqs", "expected key=value, got 'wqs'");
    bad("wqs=2,wqs=3", "wqs given twice");
}

#[test]
fn more_dsa_devices_than_bus_0_holds() {
    let mut args = Vec::new();
    for _ in 0..29 {
        args.extend(["--dsa", "wqs=1"]);
    }
    assert_usage_error(
        &args,
        "error: 29 --dsa devices given; PCI bus 0 has room for 28",
    );
}

#[test]
fn iommu_and_dsa_options_attach_to_micro_guests() {
    microguest::require_kvm();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args([
            "--iommu",
            "--dsa",
            "--dsa",
            "wqs=2,engines=1,groups=1,wq-size=32,max-batch=64",
            "micro",
            "enqcmd-demo",
        ])
        .env("RUST_LOG", "vmm::sva=info")
        .output()
        .expect("run vmm");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    assert!(stdout.ends_with("ENQCMD trap demo: OK\n"), "{stdout}");
    // Default vDSA: 128 KiB of portals first, then its registers; the
    // 2-WQ one after them.
    assert!(
        stderr.contains("vDSA 0 at 00:01.0: BAR0 0x8000020000, BAR2 0x8000000000"),
        "{stderr}"
    );
    assert!(
        stderr.contains("vDSA 1 at 00:02.0: BAR0 0x8000030000, BAR2 0x8000028000"),
        "{stderr}"
    );
}

#[test]
fn help_documents_the_dsa_defaults() {
    let (code, out, _) = vmm(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--iommu"), "{out}");
    assert!(
        out.contains("wqs=8,engines=4,groups=4,wq-size=128,max-batch=1024"),
        "{out}"
    );
}

#[test]
fn run_takes_the_accelerator_options() {
    assert_usage_error(
        &["run", "--iommu", "--dsa", "wqs=0", "--", "true"],
        "error: invalid value 'wqs=0' for '--dsa [<SPEC>]': wqs must be a number from 1 to 16, got '0'",
    );
}
