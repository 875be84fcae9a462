//! Shared by the tests that boot Linux: the project's guest images and a
//! way to run `vmm` on them, one guest at a time.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// Runs the repository's script `path` with `args`; its stdout, or a panic
/// with its stderr.
fn project_script(path: &str, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    let out = Command::new(&script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {path}: {e}"));
    assert!(
        out.status.success(),
        "{path} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("{path} printed non-UTF-8: {e}"))
}

/// The kernel and the small initramfs (init and busybox) from
/// `guest-images/out`, or from `$VMM_GUEST_IMAGES` when set. Missing images
/// are built with `guest-images/build.sh` (cached; the first build takes
/// about 15 minutes).
pub fn guest_images() -> (PathBuf, PathBuf) {
    static IMAGES: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    IMAGES
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let dir = std::env::var_os("VMM_GUEST_IMAGES")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("guest-images/out"));
            let kernel = dir.join("vmlinux");
            let initramfs = dir.join("initramfs-base.cpio");
            if !kernel.exists() || !initramfs.exists() {
                // These tests need the guest images.
                project_script("guest-images/build.sh", &["--quiet"]);
            }
            (kernel, initramfs)
        })
        .clone()
}

/// Serialises guest boots within one test binary.
pub fn one_guest_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a `vmm` process left.
#[allow(dead_code)] // Not every test binary that includes this module reads it.
pub struct Outcome {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs `vmm run --kernel K --initramfs I <options> -- <command>`.
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub fn vmm_run(options: &[&str], command: &[&str]) -> Outcome {
    let (_, initramfs) = guest_images();
    vmm_run_with(&initramfs, &[], options, command)
}

/// The full initramfs: the small one plus accel-config, its libraries and
/// accel-config-test.
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub fn full_initramfs() -> PathBuf {
    let (kernel, _) = guest_images();
    kernel.with_file_name("initramfs.cpio")
}

/// Runs `vmm run` on `initramfs` with `env` set for the VMM.
pub fn vmm_run_with(
    initramfs: &Path,
    env: &[(&str, &str)],
    options: &[&str],
    command: &[&str],
) -> Outcome {
    let (kernel, _) = guest_images();
    vmm_run_in(Path::new("."), &kernel, initramfs, env, options, command)
}

/// [`vmm_run_with`] with the VMM started in `cwd`, on `kernel`.
pub fn vmm_run_in(
    cwd: &Path,
    kernel: &Path,
    initramfs: &Path,
    env: &[(&str, &str)],
    options: &[&str],
    command: &[&str],
) -> Outcome {
    vmm::microguest::require_kvm();
    let _guard = one_guest_at_a_time();
    let out = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .current_dir(cwd)
        .envs(env.iter().copied())
        .arg("run")
        .arg("--kernel")
        .arg(kernel)
        .arg("--initramfs")
        .arg(initramfs)
        .args(options)
        .arg("--")
        .args(command)
        .output()
        .expect("run vmm");
    Outcome {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into(),
    }
}

/// The pinned virtiofsd that `vmm run --share` starts: `$VMM_VIRTIOFSD`
/// when set (as for `vmm run` itself; the nested bed sets it), else the one
/// tools/virtiofsd.sh installs on first use (cached).
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub fn virtiofsd() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(path) = std::env::var_os("VMM_VIRTIOFSD") {
            return PathBuf::from(path);
        }
        PathBuf::from(project_script("tools/virtiofsd.sh", &["--quiet"]).trim())
    })
    .clone()
}

/// Debian's distribution kernel, fetched and unpacked (not installed) by
/// tools/debian-kernel.sh, cached.
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub struct DebianKernel {
    /// The bzImage as Debian ships it (`.../boot/vmlinuz-RELEASE`).
    pub vmlinuz: PathBuf,
    /// Its module tree (`.../lib/modules/RELEASE`, beside the kernel).
    pub modules: PathBuf,
}

/// Runs tools/debian-kernel.sh (apt-get download on first use).
#[allow(dead_code)] // Not every test binary that includes this module uses it.
pub fn debian_kernel() -> DebianKernel {
    let text = project_script("tools/debian-kernel.sh", &[]);
    let value = |key: &str| {
        let prefix = format!("{key}=");
        PathBuf::from(
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("tools/debian-kernel.sh printed no {prefix}")),
        )
    };
    DebianKernel {
        vmlinuz: value("vmlinuz"),
        modules: value("modules"),
    }
}
