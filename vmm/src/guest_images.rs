//! The project's default guest images for `vmm run` without `--kernel` or
//! `--initramfs`: `guest-images/out/vmlinux` and `initramfs-base.cpio` of
//! the checkout the VMM was built from, or of `$VMM_GUEST_IMAGES`, built
//! with `guest-images/build.sh` when missing (its progress on stderr).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use thiserror::Error;

/// Environment variable naming a directory of prebuilt images.
pub const IMAGES_ENV: &str = "VMM_GUEST_IMAGES";
/// The kernel in an images directory.
pub const KERNEL: &str = "vmlinux";
/// The small initramfs (init and busybox) in an images directory.
pub const INITRAMFS: &str = "initramfs-base.cpio";

/// The guest-images directory of the checkout this binary was built from.
fn source_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-images")
}

/// The default images directory.
pub fn images_dir() -> PathBuf {
    std::env::var_os(IMAGES_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| source_dir().join("out"))
}

/// Why the default images are not there.
#[derive(Debug, Error)]
pub enum ImagesError {
    /// `$VMM_GUEST_IMAGES` names a directory without them (bad input).
    #[error("${IMAGES_ENV} is {0} but it holds no {KERNEL} and {INITRAMFS}")]
    NotInDirectory(String),
    /// guest-images/build.sh failed.
    #[error("{0}")]
    Build(String),
}

/// The default kernel and initramfs, building them first if either is
/// missing.
pub fn default_images() -> Result<(PathBuf, PathBuf), ImagesError> {
    let dir = images_dir();
    let (kernel, initramfs) = (dir.join(KERNEL), dir.join(INITRAMFS));
    if kernel.exists() && initramfs.exists() {
        return Ok((kernel, initramfs));
    }
    if std::env::var_os(IMAGES_ENV).is_some() {
        return Err(ImagesError::NotInDirectory(dir.display().to_string()));
    }
    let script = source_dir().join("build.sh");
    eprintln!(
        "vmm: building the default guest images with {} (cached; the first build takes about 15 minutes)",
        script.display()
    );
    // The build's own progress goes to stderr; stdout stays the command's.
    let status = Command::new(&script)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .map_err(|e| ImagesError::Build(format!("cannot run {}: {e}", script.display())))?;
    if !status.success() || !kernel.exists() || !initramfs.exists() {
        return Err(ImagesError::Build(format!(
            "{} failed ({status})",
            script.display()
        )));
    }
    Ok((kernel, initramfs))
}
