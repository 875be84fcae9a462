//! `vmm run -- CMD` end to end with Linux and the project's init: CMD's
//! output on stdout byte for byte, its status as the VMM's exit status,
//! a guest panic as 6, a timeout as 4, init's failure as 7 and a power-off
//! without a status as 8, never 0.

mod linux;

use linux::vmm_run;

/// Generous: a Linux boot takes about a minute on this project's KVM.
const TIMEOUT: &str = "900";

#[test]
fn output_on_stdout_and_status_as_exit_status() {
    let run = vmm_run(&["--timeout", TIMEOUT], &["sh", "-c", "echo hi; exit 7"]);
    assert_eq!(run.code, 7, "stderr: {}", run.stderr);
    assert_eq!(run.stdout, b"hi\n");
}

#[test]
fn output_is_byte_exact() {
    let script = r#"printf 'a,b%%c "q" \303\251\n'; printf 'no newline' >&2"#;
    let run = vmm_run(
        &["--timeout", TIMEOUT, "--serial", "none"],
        &["sh", "-c", script],
    );
    assert_eq!(run.code, 0, "stderr: {}", run.stderr);
    assert_eq!(run.stdout, "a,b%c \"q\" é\nno newline".as_bytes());
    assert_eq!(
        run.stderr, "",
        "no kernel log with --serial none, no VMM message"
    );
}

#[test]
fn missing_program_gives_127() {
    let run = vmm_run(&["--timeout", TIMEOUT], &["/nonexistent"]);
    assert_eq!(run.code, 127, "stderr: {}", run.stderr);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "init: cannot execute /nonexistent: errno 2\n"
    );
}

#[test]
fn guest_poweroff_before_the_status_gives_8() {
    let run = vmm_run(&["--timeout", TIMEOUT], &["poweroff", "-f"]);
    assert_eq!(run.code, 8, "stderr: {}", run.stderr);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr
            .ends_with("vmm: the guest powered off before reporting the command's status\n"),
        "{}",
        run.stderr
    );
}

/// With the virtio console driver kept from loading, init finds no status
/// console: it can only write its error on the serial console and power
/// off. That is still init's failure (7, with the reason), not a clean end.
#[test]
fn init_error_on_the_serial_console_gives_7() {
    let run = vmm_run(
        &[
            "--timeout",
            TIMEOUT,
            "--cmdline",
            "console=ttyS0 noxsave initcall_blacklist=virtio_console_init",
        ],
        &["true"],
    );
    assert_eq!(run.code, 7, "stderr: {}", run.stderr);
    assert!(run.stdout.is_empty());
    assert!(
        run.stderr
            .ends_with("vmm: the guest's init could not run the command: no-status-device\n"),
        "{}",
        run.stderr
    );
}

#[test]
fn guest_panic_gives_6() {
    let run = vmm_run(
        &["--timeout", TIMEOUT],
        &["sh", "-c", "echo c > /proc/sysrq-trigger"],
    );
    assert_eq!(run.code, 6, "stderr: {}", run.stderr);
    assert!(
        run.stderr
            .contains("Kernel panic - not syncing: sysrq triggered crash"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.ends_with("vmm: the guest kernel panicked\n"));
}

#[test]
fn timeout_while_the_command_runs_gives_4() {
    let run = vmm_run(
        &["--timeout", "120", "--serial", "none"],
        &["sleep", "3600"],
    );
    assert_eq!(run.code, 4, "stderr: {}", run.stderr);
    assert_eq!(run.stdout, b"");
    assert_eq!(run.stderr, "vmm: timeout\n");
}

/// Boots in a row for each SMP soak; `SMP_SOAK_BOOTS` overrides it.
const SMP_SOAK_BOOTS: usize = 20;

/// `vmm run --cpus CPUS` boots in a row, each running a command that prints
/// which CPUs Linux brought online: every boot must end with status 0 and
/// all of them online (a lost application processor is only a kernel log
/// line, "CPU1 failed to report alive state", so the status alone would
/// not show it).
fn smp_soak(cpus: u8) {
    let boots = std::env::var("SMP_SOAK_BOOTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SMP_SOAK_BOOTS);
    let online = format!("0-{}\n", cpus - 1);
    let cpus_arg = cpus.to_string();
    let start = std::time::Instant::now();
    let mut failed = Vec::new();
    for boot in 1..=boots {
        let run = vmm_run(
            &["--timeout", TIMEOUT, "--cpus", &cpus_arg],
            &["cat", "/sys/devices/system/cpu/online"],
        );
        let ok = run.code == 0 && run.stdout == online.as_bytes();
        eprintln!(
            "smp soak: {cpus} vCPUs, boot {boot}/{boots}: {} after {:.0} s",
            if ok { "ok" } else { "FAILED" },
            start.elapsed().as_secs_f64()
        );
        if !ok {
            failed.push(format!(
                "boot {boot}: status {}, online {:?}, stderr tail: {}",
                run.code,
                String::from_utf8_lossy(&run.stdout),
                run.stderr
                    .lines()
                    .rev()
                    .take(5)
                    .collect::<Vec<_>>()
                    .join(" | ")
            ));
        }
    }
    println!(
        "{} of {boots} {cpus}-vCPU boots passed in {:.0} s",
        boots - failed.len(),
        start.elapsed().as_secs_f64()
    );
    assert!(failed.is_empty(), "failed:\n{}", failed.join("\n"));
}

#[test]
#[ignore = "soak: 20 two-vCPU boots in a row, 20-40 minutes on PVM (run with --ignored)"]
fn two_vcpu_boots_soak() {
    smp_soak(2);
}

#[test]
#[ignore = "soak: 20 four-vCPU boots in a row, 20-40 minutes on PVM (run with --ignored)"]
fn four_vcpu_boots_soak() {
    smp_soak(4);
}
