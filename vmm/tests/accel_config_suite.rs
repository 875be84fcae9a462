//! accel-config's own DSA test suite in the default Linux guest (issue 12):
//! `dsa_user_test_runner.sh` exactly as Debian's accel-config-test ships
//! it, with `--iommu --dsa` (a Sapphire Rapids DSA 1.0 by default). It
//! loads its own configuration (read-buffer controls included), runs every
//! operation it knows, DIF included, alone and in batches, with
//! block-on-fault on and off, and must exit 0, not 77 (skip).
//!
//! The full runner is about 470 dsa_test runs. Where KVM is the PVM
//! backend each run costs about 10 s of emulated work (about 90 minutes in
//! all), so there the test runs a smoke subset instead: the runner's own
//! helpers (`common`: its cleanup with `modprobe idxd`, its configuration
//! file) and a few of the runner's own dsa_test invocations per operation
//! family, and says that the full runner runs on ordinary KVM.
//! Needs /dev/kvm and the guest images.

use std::path::Path;

mod linux;

const TEST_DIR: &str = "/usr/libexec/accel-config/test";
const RUNNER: &str = "/usr/libexec/accel-config/test/dsa_user_test_runner.sh";

/// Every section the runner prints: (operation, batched) for the opcodes
/// it tests; it skips batched Drain.
fn sections() -> Vec<(&'static str, bool)> {
    let ops = [
        "NOOP",
        "DRAIN",
        "MEMMOVE",
        "MEMFILL",
        "COMPARE",
        "COMPVAL",
        "DUALCAST",
        "CRCGEN",
        "COPY_CRC",
        "CFLUSH",
        "DIF_CHECK",
        "DIF_INS",
        "DIF_STRP",
        "DIF_UPDT",
    ];
    let mut all = Vec::new();
    for op in ops {
        all.push((op, false));
        if op != "DRAIN" {
            all.push((op, true));
        }
    }
    all
}

fn section_line(mode: &str, op: &str, batched: bool) -> String {
    let batched = if batched { "batched " } else { "" };
    format!("Performing {mode} WQ {batched}{op} testing")
}

/// Whether /dev/kvm is the PVM backend (guest instructions emulated at
/// every exit: far slower per dsa_test than ordinary KVM).
fn on_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The runner-equivalent subset: the runner's helpers (`common`: cleanup,
/// configuration file, opcode and WQ-mode names) and its own dsa_test
/// command lines (test_op, test_op_batch, test_dif_op, test_dif_op_batch),
/// one transfer size each, printing the runner's section lines.
fn smoke_script() -> String {
    // opcode, WQ mode, size, flag (block on fault), s(ingle) or b(atched)
    const RUNS: [&str; 16] = [
        "0x0 0 4096 0x1 s",
        "0x2 1 4096 0x0 s",
        "0x3 0 65536 0x1 s",
        "0x3 1 4096 0x0 b",
        "0x4 1 4096 0x1 s",
        "0x9 0 4096 0x0 b",
        "0x5 1 4096 0x1 b",
        "0x6 0 4096 0x0 s",
        "0x10 0 4096 0x1 s",
        "0x11 1 4096 0x0 b",
        "0x20 1 4096 0x1 s",
        "0x12 0 512 0x1 s",
        "0x13 1 4096 0x0 s",
        "0x14 0 1024 0x0 b",
        "0x15 1 4096 0x1 b",
        "0x13 0 1024 0x1 b",
    ];
    let mut s = format!(
        "cd {TEST_DIR} && . ./common || exit 90\n\
         trap 'echo failed at line $LINENO; exit 1' ERR\n\
         _cleanup\n\
         $ACCFG load-config -c $CONFIG1\n\
         $ACCFG enable-device dsa0\n\
         $ACCFG enable-wq dsa0/wq0.0 dsa0/wq0.1\n\
         r(){{ m=$(wq_mode2name $2); n=$(opcode2name $1)\n\
         if [ $5 = b ]; then echo \"Performing $m WQ batched $n testing\"\n\
         a=\"-o 0x1 -b $1 -c 16 -f $4 t2000\"\n\
         else echo \"Performing $m WQ $n testing\"; a=\"-o $1 -f $4 t200\"; fi\n\
         $DSATEST -w $2 -l $3 $a -v >/tmp/o 2>&1 || {{ tail -20 /tmp/o; exit 1; }}; }}\n"
    );
    for run in RUNS {
        s += &format!("r {run}\n");
    }
    s += "$ACCFG disable-wq dsa0/wq0.0 dsa0/wq0.1\necho smoke-done\n";
    s
}

#[test]
fn accel_config_dsa_user_test_runner() {
    let options = [
        "--iommu",
        "--dsa",
        "--memory",
        "1G",
        "--timeout",
        "3000",
        "--serial",
        "none",
    ];
    if on_pvm() {
        let script = smoke_script();
        let out = linux::vmm_run_with(
            &linux::full_initramfs(),
            &[],
            &options,
            &["bash", "-E", "-c", &script],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.code, 0, "stdout:\n{stdout}\nstderr:\n{}", out.stderr);
        assert!(stdout.ends_with("smoke-done\n"), "{stdout}");
        let ran = stdout
            .lines()
            .filter(|l| l.starts_with("Performing "))
            .count();
        assert_eq!(ran, 16, "{stdout}");
        println!(
            "PVM: ran the runner-equivalent smoke subset ({ran} dsa_test runs, every operation \
             family, DIF included); the full {RUNNER} runs where KVM is ordinary (the \
             ordinary-KVM bed)"
        );
        return;
    }
    let out = linux::vmm_run_with(&linux::full_initramfs(), &[], &options, &[RUNNER]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.code, 0,
        "the runner failed (77 is its skip)\nstdout:\n{stdout}\nstderr:\n{}",
        out.stderr
    );
    for (op, batched) in sections() {
        for mode in ["dedicated", "shared"] {
            let line = section_line(mode, op, batched);
            // Each section runs twice: block-on-fault on, then off.
            let count = stdout.lines().filter(|l| *l == line).count();
            assert_eq!(count, 2, "'{line}' ran {count} times:\n{stdout}");
        }
    }
}
