//! `vmm run --share`: host directories in the guest over virtio-fs, each
//! served by its own virtiofsd (installed by tools/virtiofsd.sh, cached).
//! A host-compiled program runs from a share with its status coming back,
//! an rw share receives the guest's file, an ro share refuses a write with
//! EROFS inside the guest, a share that cannot be mounted ends the run as
//! an init failure, and bad --share input is refused before anything boots.

mod linux;

use std::path::{Path, PathBuf};
use std::process::Command;

use linux::{guest_images, virtiofsd, vmm_run_in, Outcome};

/// Generous: a Linux boot takes one to three minutes on this project's KVM.
const TIMEOUT: &str = "900";
/// init's status when it could not run the command.
const EXIT_INIT_FAILED: i32 = 7;
/// strerror(EROFS) as the guest's busybox prints it.
const EROFS_TEXT: &str = "Read-only file system";

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-share-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

/// `vmm run` in `cwd` with the default kernel and small initramfs.
fn run_in(cwd: &Path, options: &[&str], command: &[&str]) -> Outcome {
    let (kernel, _) = guest_images();
    run_kernel_in(cwd, &kernel, options, command)
}

/// `vmm run --kernel KERNEL` in `cwd` with the default small initramfs.
fn run_kernel_in(cwd: &Path, kernel: &Path, options: &[&str], command: &[&str]) -> Outcome {
    let (_, initramfs) = guest_images();
    let vfsd = virtiofsd();
    let mut all = vec!["--timeout", TIMEOUT, "--virtiofsd", vfsd.to_str().unwrap()];
    all.extend_from_slice(options);
    vmm_run_in(cwd, kernel, &initramfs, &[], &all, command)
}

/// `vmm` with `args`, expecting a one-line usage error before any boot.
fn assert_refused(cwd: &Path, args: &[&str], env: &[(&str, &str)], line: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .current_dir(cwd)
        .envs(env.iter().copied())
        .args(args)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("{line}\n"),
        "{args:?}"
    );
    assert_eq!(out.status.code(), Some(2), "{args:?}");
    assert!(out.stdout.is_empty());
}

#[test]
fn host_program_from_a_share_with_an_rw_and_an_ro_share() {
    let src = scratch("prog");
    let out = scratch("out");
    let data = scratch("data");
    std::fs::write(data.join("input.txt"), "from the host\n").unwrap();
    // The small initramfs has no C library: a static program.
    std::fs::write(
        src.join("probe.c"),
        r#"#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	char cwd[256];
	printf("probe: %s in %s\n", argc > 1 ? argv[1] : "-", getcwd(cwd, sizeof cwd));
	return 42;
}
"#,
    )
    .unwrap();
    let cc = Command::new("cc")
        .args(["-static", "-O2", "-o", "probe", "probe.c"])
        .current_dir(&src)
        .status()
        .expect("run cc");
    assert!(cc.success());

    let out_share = format!("{}:/results,rw", out.display());
    let data_share = format!("{}:/data", data.display());
    let src_share = src.display().to_string();
    let script = "echo written > /results/guest.txt; \
                  cat /data/input.txt; \
                  touch /data/new.txt; \
                  ./probe arg";
    let run = run_in(
        &src,
        &[
            "--share",
            &src_share,
            "--share",
            &out_share,
            "--share",
            &data_share,
        ],
        &["sh", "-c", script],
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.code, 42, "stdout: {stdout}\nstderr: {}", run.stderr);
    assert_eq!(
        stdout,
        format!(
            "from the host\ntouch: /data/new.txt: {EROFS_TEXT}\nprobe: arg in {}\n",
            src.display()
        )
    );
    assert_eq!(
        std::fs::read_to_string(out.join("guest.txt")).unwrap(),
        "written\n",
        "the rw share holds what the guest wrote"
    );
    assert!(!data.join("new.txt").exists());
}

#[test]
fn a_share_that_cannot_be_mounted_ends_the_run_as_an_init_failure() {
    let dir = scratch("unmountable");
    // /proc is the guest's procfs: init cannot make the mount point there.
    let share = format!("{}:/proc/host", dir.display());
    let run = run_in(&dir, &["--share", &share, "--serial", "none"], &["true"]);
    assert_eq!(run.code, EXIT_INIT_FAILED, "stderr: {}", run.stderr);
    assert_eq!(
        run.stderr,
        "vmm: the guest's init could not run the command: \
         share-mount-failed tag=share0 path=/proc/host step=mkdir errno=2\n"
    );
}

#[test]
fn bad_share_input_is_refused_before_boot() {
    let dir = scratch("bad");
    let d = dir.display().to_string();
    let run = |share: &str| {
        vec!["run", "--share", share, "--", "true"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    let check = |args: Vec<String>, env: &[(&str, &str)], line: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_refused(&dir, &args, env, line);
    };
    check(
        run("/nonexistent/dir"),
        &[],
        "error: --share: host directory '/nonexistent/dir' cannot be opened: No such file or directory (os error 2)",
    );
    std::fs::write(dir.join("file"), "").unwrap();
    check(
        run(&format!("{d}/file")),
        &[],
        &format!("error: --share: host directory '{d}/file' is not a directory"),
    );
    check(
        run(&format!("{d}:mnt/x")),
        &[],
        "error: --share: guest path 'mnt/x' is not absolute",
    );
    check(
        run(&format!("{d},wr")),
        &[],
        "error: --share: unknown mode 'wr' (expected ro or rw)",
    );
    let mut two = run(&d);
    two.splice(1..1, ["--share".to_string(), format!("{d}:{d}")]);
    check(
        two,
        &[],
        &format!("error: --share: two shares at guest path '{d}'"),
    );
    check(
        run(&d),
        &[("VMM_VIRTIOFSD", "/nonexistent/virtiofsd")],
        "error: virtiofsd '/nonexistent/virtiofsd' is not an executable file",
    );
    let mut missing = run(&d);
    missing.splice(1..1, ["--virtiofsd".to_string(), format!("{d}/file")]);
    check(
        missing,
        &[],
        &format!("error: virtiofsd '{d}/file' is not an executable file"),
    );
    // Shares and vDSAs share bus 0.
    let mut crowded: Vec<String> = vec!["run".into()];
    crowded.extend(std::iter::repeat_n("--dsa".to_string(), 20));
    for i in 0..9 {
        crowded.extend(["--share".to_string(), format!("{d}:/m{i}")]);
    }
    crowded.extend(["--".to_string(), "true".to_string()]);
    check(
        crowded,
        &[],
        "error: 20 --dsa devices and 9 --share directories given; PCI bus 0 has room for 28 in all",
    );
    // Nothing found anywhere.
    check(
        run(&d),
        &[("VMM_CACHE_DIR", &d), ("PATH", &d)],
        &format!(
            "error: virtiofsd not found (not in {d}/virtiofsd-1.14.0/bin/virtiofsd, PATH or /usr/libexec): \
             install it with tools/virtiofsd.sh, or give --virtiofsd PATH"
        ),
    );
}

/// Debian's kernel (bzImage) as tools/debian-kernel.sh unpacked it, its
/// module tree beside it (`../lib/modules/RELEASE`), where `vmm run` finds
/// it; `$VMM_DEBIAN_KERNEL` names another such bzImage (the nested bed
/// brings in one with only the modules `vmm run` carries).
fn debian_kernel() -> PathBuf {
    std::env::var_os("VMM_DEBIAN_KERNEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| linux::debian_kernel().vmlinuz)
}

/// Debian's own kernel, whose virtio-pci, virtio-console, FUSE and
/// virtio-fs drivers are all modules: `vmm run` carries them in from the
/// kernel's module tree, and the command's output, its status and a share
/// all work. On this project's PVM machines Debian's kernel printed nothing
/// in 10 minutes; tests/bed.rs runs this test on ordinary KVM in the
/// nested bed.
#[test]
#[ignore = "ordinary KVM only (tests/bed.rs runs it in the nested bed)"]
fn debian_kernel_with_modular_virtio_runs_the_command_and_mounts_a_share() {
    let kernel = debian_kernel();
    let started = std::time::Instant::now();
    let dir = scratch("debian");
    std::fs::write(dir.join("hello.txt"), "hello from the host\n").unwrap();
    let share = dir.display().to_string();
    let run = run_kernel_in(
        &dir,
        &kernel,
        &["--share", &share],
        &["sh", "-c", "cat hello.txt; uname -r; exit 3"],
    );
    let release = kernel
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .trim_start_matches("vmlinuz-");
    assert_eq!(run.code, 3, "stderr: {}", run.stderr);
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        format!("hello from the host\n{release}\n")
    );
    println!(
        "Debian {release}: modules carried in, share read, status 3 back in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
