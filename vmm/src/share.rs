//! Host directories shared with a `vmm run` guest (`--share
//! HOST_DIR[:GUEST_PATH][,ro|rw]`): one virtio-fs device per share, served
//! by its own virtiofsd, the vhost-user daemon QEMU, cloud-hypervisor and
//! virtme-ng drive. The VMM starts each daemon before the guest boots and
//! kills it when the run ends, whichever way it ends ([`Virtiofsd`]'s
//! `Drop`; a daemon whose VMM died without unwinding exits when its
//! vhost-user connection closes).
//!
//! The guest finds each share by its [`tag`]; telling the guest's init
//! where to mount it is `vmm run`'s business (the command's
//! `src/run_command.rs`).

use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::machine::VirtioFs;

/// The virtiofsd release `tools/virtiofsd.sh` installs.
pub const VIRTIOFSD_VERSION: &str = "1.14.0";
/// Environment variable naming the virtiofsd binary.
pub const VIRTIOFSD_ENV: &str = "VMM_VIRTIOFSD";
/// How long a new virtiofsd may take to create its socket.
const SOCKET_WAIT: Duration = Duration::from_secs(10);
const SOCKET_POLL: Duration = Duration::from_millis(10);

/// One `--share` option, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShareSpec {
    /// The host directory (canonical).
    pub host: PathBuf,
    /// Where the guest mounts it (absolute).
    pub guest: PathBuf,
    /// Whether the guest may write.
    pub writable: bool,
}

/// Bad `--share` values; each prints as one line.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ShareError {
    /// HOST_DIR is missing or not a directory.
    #[error("--share: host directory '{path}' {problem}")]
    HostDir {
        /// The path given.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// GUEST_PATH is relative.
    #[error("--share: guest path '{0}' is not absolute")]
    RelativeGuestPath(String),
    /// GUEST_PATH is `/`, or has `.` or `..` components.
    #[error("--share: guest path '{0}' must name a directory below / without . or .. components")]
    BadGuestPath(String),
    /// The mode after the comma is neither `ro` nor `rw`.
    #[error("--share: unknown mode '{0}' (expected ro or rw)")]
    Mode(String),
    /// Two shares at the same guest path.
    #[error("--share: two shares at guest path '{0}'")]
    Duplicate(String),
}

/// Parses `HOST_DIR[:GUEST_PATH][,ro|rw]`: read-only unless `rw`; the
/// guest path defaults to the host directory's absolute path.
pub fn parse_share(value: &str) -> Result<ShareSpec, ShareError> {
    let (paths, writable) = match value.rsplit_once(',') {
        Some((paths, "ro")) => (paths, false),
        Some((paths, "rw")) => (paths, true),
        Some((_, mode)) => return Err(ShareError::Mode(mode.into())),
        None => (value, false),
    };
    let (host, guest) = match paths.split_once(':') {
        Some((host, guest)) => (host, Some(guest)),
        None => (paths, None),
    };
    let host_error = |problem: String| ShareError::HostDir {
        path: host.into(),
        problem,
    };
    let canonical = Path::new(host)
        .canonicalize()
        .map_err(|e| host_error(format!("cannot be opened: {e}")))?;
    if !canonical.is_dir() {
        return Err(host_error("is not a directory".into()));
    }
    let guest = match guest {
        None => canonical.clone(),
        Some(g) => {
            let path = PathBuf::from(g);
            if !path.is_absolute() {
                return Err(ShareError::RelativeGuestPath(g.into()));
            }
            path
        }
    };
    let normal = guest
        .components()
        .skip(1)
        .all(|c| matches!(c, Component::Normal(_)));
    if guest.parent().is_none() || !normal {
        return Err(ShareError::BadGuestPath(guest.display().to_string()));
    }
    Ok(ShareSpec {
        host: canonical,
        guest,
        writable,
    })
}

/// Checks that no two shares have the same guest path.
pub fn check_shares(shares: &[ShareSpec]) -> Result<(), ShareError> {
    for (i, share) in shares.iter().enumerate() {
        if shares[..i].iter().any(|s| s.guest == share.guest) {
            return Err(ShareError::Duplicate(share.guest.display().to_string()));
        }
    }
    Ok(())
}

/// The tag of the `index`th share.
pub fn tag(index: usize) -> String {
    format!("share{index}")
}

/// The directory `tools/virtiofsd.sh` installs into.
pub fn virtiofsd_cache_path() -> Option<PathBuf> {
    let cache = std::env::var_os("VMM_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("vmm")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/vmm")))?;
    Some(cache.join(format!("virtiofsd-{VIRTIOFSD_VERSION}/bin/virtiofsd")))
}

/// The virtiofsd to start: `given` (`--virtiofsd`), else `$VMM_VIRTIOFSD`,
/// else the one `tools/virtiofsd.sh` installed, else one on `PATH` or in
/// /usr/libexec (Debian's package).
pub fn find_virtiofsd(given: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(path) = given
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(VIRTIOFSD_ENV).map(PathBuf::from))
    {
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(format!(
                "virtiofsd '{}' is not an executable file",
                path.display()
            ))
        };
    }
    let path_dirs = std::env::var_os("PATH").unwrap_or_default();
    let candidates = virtiofsd_cache_path()
        .into_iter()
        .chain(std::env::split_paths(&path_dirs).map(|d| d.join("virtiofsd")))
        .chain([PathBuf::from("/usr/libexec/virtiofsd")]);
    for candidate in candidates {
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(format!(
        "virtiofsd not found (not in {}, PATH or /usr/libexec): install it with tools/virtiofsd.sh, \
         or give --virtiofsd PATH",
        virtiofsd_cache_path().map_or("the cache".into(), |p| p.display().to_string())
    ))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Errors starting a virtiofsd.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// The socket directory could not be made.
    #[error("virtiofsd socket directory {path}: {source}")]
    SocketDir {
        /// The directory.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("cannot start virtiofsd '{path}': {source}")]
    Spawn {
        /// The binary.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// It exited before it listened.
    #[error("virtiofsd for '{dir}' exited before listening ({status})")]
    Exited {
        /// The shared directory.
        dir: String,
        /// Its exit status.
        status: std::process::ExitStatus,
    },
    /// It did not listen in time.
    #[error("virtiofsd for '{0}' did not create its socket within 10 s")]
    Timeout(String),
}

/// A running virtiofsd serving one share, killed (and its socket
/// directory removed) when dropped.
pub struct Virtiofsd {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Virtiofsd {
    /// Starts `binary` for `share` and waits until it listens.
    pub fn start(binary: &Path, share: &ShareSpec) -> Result<Self, DaemonError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "vmm-{}-virtiofsd-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|source| DaemonError::SocketDir {
                path: dir.display().to_string(),
                source,
            })?;
        let socket = dir.join("vhost-user.sock");
        let mut command = Command::new(binary);
        command
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&share.host)
            // The daemon has the VMM's own rights on the host; a namespace
            // sandbox needs privileges a user (or a container) may lack.
            .args(["--sandbox", "none", "--log-level", "error"])
            // Its log level is --log-level's, not the VMM's RUST_LOG.
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if !share.writable {
            command.arg("--readonly");
        }
        let child = command.spawn().map_err(|source| {
            let _ = std::fs::remove_dir(&dir);
            DaemonError::Spawn {
                path: binary.display().to_string(),
                source,
            }
        })?;
        let mut daemon = Self { child, dir, socket };
        daemon.wait_for_socket(&share.host)?;
        log::debug!(
            "virtiofsd (pid {}) serves {} on {}",
            daemon.child.id(),
            share.host.display(),
            daemon.socket.display()
        );
        Ok(daemon)
    }

    fn wait_for_socket(&mut self, host: &Path) -> Result<(), DaemonError> {
        let start = Instant::now();
        loop {
            if self.socket.exists() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(DaemonError::Exited {
                    dir: host.display().to_string(),
                    status,
                });
            }
            if start.elapsed() > SOCKET_WAIT {
                return Err(DaemonError::Timeout(host.display().to_string()));
            }
            std::thread::sleep(SOCKET_POLL);
        }
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The shares of one `vmm run` and the virtiofsd that serves them.
#[derive(Clone, Debug, Default)]
pub struct Shares {
    /// The shares, in tag order.
    pub list: Vec<ShareSpec>,
    /// The daemon binary (needed when `list` is not empty).
    pub virtiofsd: PathBuf,
}

impl Shares {
    /// Starts one daemon per share; returns them (the run must keep them)
    /// and the devices the machine needs.
    pub fn start(&self) -> Result<(Vec<Virtiofsd>, Vec<VirtioFs>), DaemonError> {
        let mut daemons = Vec::new();
        let mut devices = Vec::new();
        for (i, share) in self.list.iter().enumerate() {
            let daemon = Virtiofsd::start(&self.virtiofsd, share)?;
            devices.push(VirtioFs {
                tag: tag(i),
                socket: daemon.socket().to_path_buf(),
            });
            daemons.push(daemon);
        }
        Ok((daemons, devices))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_syntax() {
        let tmp = std::env::temp_dir().canonicalize().unwrap();
        let t = tmp.display().to_string();
        assert_eq!(
            parse_share(&t),
            Ok(ShareSpec {
                host: tmp.clone(),
                guest: tmp.clone(),
                writable: false
            })
        );
        assert_eq!(
            parse_share(&format!("{t}:/mnt/x,rw")),
            Ok(ShareSpec {
                host: tmp.clone(),
                guest: "/mnt/x".into(),
                writable: true
            })
        );
        assert_eq!(
            parse_share(&format!("{t},ro")).map(|s| s.writable),
            Ok(false)
        );
        assert_eq!(
            parse_share(&format!("{t}:mnt")),
            Err(ShareError::RelativeGuestPath("mnt".into()))
        );
        assert_eq!(
            parse_share(&format!("{t}:/")),
            Err(ShareError::BadGuestPath("/".into()))
        );
        assert_eq!(
            parse_share(&format!("{t}:/a/../b")),
            Err(ShareError::BadGuestPath("/a/../b".into()))
        );
        assert_eq!(
            parse_share(&format!("{t},rx")),
            Err(ShareError::Mode("rx".into()))
        );
        assert!(matches!(
            parse_share("/nonexistent/dir"),
            Err(ShareError::HostDir { .. })
        ));
    }

    #[test]
    fn pinned_version_matches_the_install_script() {
        let script = include_str!("../../tools/virtiofsd.sh");
        assert!(script.contains(&format!("\nversion={VIRTIOFSD_VERSION}\n")));
    }
}
