//! The machine's Linux-facing devices as an unmodified Linux 6.12 sees
//! them, before any user-space program runs: the virtio-console driver
//! binds both virtio-pci functions and its hvc0 console carries the
//! kernel's own messages to the VMM's stdout; a kernel panic reaches the
//! VMM through pvpanic (exit status 6); `--timeout` gives 4.

mod linux;

use linux::vmm_run;

#[test]
fn kernel_console_on_hvc0_and_panic_through_pvpanic() {
    // rdinit= names no file: the kernel falls back to mounting a root file
    // system it does not have, and panics before any user code runs.
    let run = vmm_run(
        &[
            "--timeout",
            "600",
            "--cmdline",
            "console=ttyS0 console=hvc0 rdinit=/nonexistent",
        ],
        &["true"],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.code, 6, "stderr: {}", run.stderr);
    assert!(
        run.stderr.contains("printk: legacy console [hvc0] enabled"),
        "the kernel registered hvc0; serial log: {}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("pci 0000:00:02.0: [1af4:1043] type 00 class 0x078000")
            && run
                .stderr
                .contains("pci 0000:00:03.0: [1af4:1043] type 00 class 0x078000"),
        "two virtio consoles enumerated: {}",
        run.stderr
    );
    assert!(
        stdout.contains("Kernel panic - not syncing: VFS: Unable to mount root fs"),
        "the panic message travelled over hvc0: {stdout}"
    );
    assert!(
        run.stderr.ends_with("vmm: the guest kernel panicked\n"),
        "{}",
        run.stderr
    );
}

#[test]
fn timeout_gives_4() {
    let run = vmm_run(&["--timeout", "2", "--serial", "none"], &["true"]);
    assert_eq!(run.code, 4, "stderr: {}", run.stderr);
    assert_eq!(run.stdout, b"", "no output from the command");
    assert_eq!(run.stderr, "vmm: timeout\n");
}
