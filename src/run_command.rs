//! `vmm run`: one command inside a Linux guest, through the project's init
//! (guest-images/init/init.c), with its output and its exit status carried
//! by two virtio consoles, as virtme-ng does:
//!
//! - hvc0 (the first virtio-console function) carries the command's stdout
//!   and stderr, byte for byte, to the VMM's stdout as they arrive;
//! - hvc1 (the second) carries only init's status line,
//!   `VMM-EXIT-STATUS=<n>` or `VMM-INIT-ERROR=<reason>`.
//!
//! The serial port stays the kernel console; init also writes its error
//! line there, which is the only place it can when the status console never
//! appeared, so the VMM watches the console for that line too. The command
//! reaches init as
//! `vmm.cmd=` (the argv, percent-encoded; see guest-images/README.md) after
//! `--` on the kernel command line, with `vmm.out=hvc0 vmm.status=hvc1`.
//! init mounts each share (`vmm::share`, one virtio-fs device each) as
//! `vmm.share=TAG,PATH,ro|rw` says (PATH percent-encoded as `vmm.cmd=` is)
//! before it runs the command, in `vmm.cwd=` when the VMM's working
//! directory lies in a share.

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use thiserror::Error;

use vmm::devices::serial::SerialOutput;
use vmm::devices::virtio::{CaptureOutput, ConsoleInput};
use vmm::machine::{run_linux, LinuxConfig, MachineError, VirtioConsole};
use vmm::share::{tag, DaemonError, ShareSpec, Shares};
use vmm::vm::RunExit;

/// The console that carries the command's output.
pub const OUTPUT_CONSOLE: &str = "hvc0";
/// The console that carries init's status line.
pub const STATUS_CONSOLE: &str = "hvc1";
/// The longest kernel command line an x86 kernel keeps (COMMAND_LINE_SIZE
/// is 2048 with the terminating NUL); longer ones are cut, which would cut
/// the command.
pub const KERNEL_CMDLINE_MAX: usize = 2047;

const STATUS_PREFIX: &str = "VMM-EXIT-STATUS=";
const INIT_ERROR_PREFIX: &str = "VMM-INIT-ERROR=";

/// Bytes `vmm.cmd=` may carry as they are; the rest is written `%XX`.
fn is_plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"-._/:=+@^".contains(&byte)
}

/// The `vmm.cmd=` value for `argv`: elements joined by `,`, each byte
/// outside the plain set percent-encoded.
pub fn encode_argv(argv: &[OsString]) -> String {
    let mut out = String::new();
    for (i, arg) in argv.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for &b in arg.as_bytes() {
            if is_plain(b) {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    out
}

/// Problems with the command before anything boots.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RunError {
    /// The encoded command does not fit on the kernel command line.
    #[error(
        "the command is too long: the kernel command line would be {len} bytes, the limit is {max}"
    )]
    TooLong {
        /// The command line's length.
        len: usize,
        /// [`KERNEL_CMDLINE_MAX`].
        max: usize,
    },
    /// The base command line already has init arguments.
    #[error("--cmdline must not contain \"--\": vmm run adds init's settings after it")]
    DoubleDash,
}

/// The kernel command line: `base`, then init's settings after `--`
/// (`extra` ones, e.g. [`init_settings`], last).
pub fn kernel_cmdline(base: &str, argv: &[OsString], extra: &[String]) -> Result<String, RunError> {
    if base.split_whitespace().any(|word| word == "--") {
        return Err(RunError::DoubleDash);
    }
    let mut line = format!(
        "{} -- vmm.cmd={} vmm.out={OUTPUT_CONSOLE} vmm.status={STATUS_CONSOLE}",
        base.trim(),
        encode_argv(argv)
    );
    for setting in extra {
        line.push(' ');
        line.push_str(setting);
    }
    if line.len() > KERNEL_CMDLINE_MAX {
        return Err(RunError::TooLong {
            len: line.len(),
            max: KERNEL_CMDLINE_MAX,
        });
    }
    Ok(line)
}

/// Where the command runs in the guest: `cwd`'s place in the share that
/// holds it (the innermost), if one does.
pub fn guest_cwd(shares: &[ShareSpec], cwd: &Path) -> Option<PathBuf> {
    shares
        .iter()
        .filter_map(|s| Some((s, cwd.strip_prefix(&s.host).ok()?)))
        .max_by_key(|(s, _)| s.host.components().count())
        .map(|(s, rest)| s.guest.join(rest))
}

fn encode_path(path: &Path) -> String {
    encode_argv(&[OsString::from(path.as_os_str())])
}

/// init's settings for `shares`: one `vmm.share=` each, and `vmm.cwd=`
/// when `cwd` lies in one.
pub fn init_settings(shares: &[ShareSpec], cwd: Option<&Path>) -> Vec<String> {
    let mut settings: Vec<String> = shares
        .iter()
        .enumerate()
        .map(|(i, s)| {
            format!(
                "vmm.share={},{},{}",
                tag(i),
                encode_path(&s.guest),
                if s.writable { "rw" } else { "ro" }
            )
        })
        .collect();
    if let Some(dir) = cwd.and_then(|cwd| guest_cwd(shares, cwd)) {
        settings.push(format!("vmm.cwd={}", encode_path(&dir)));
    }
    settings
}

/// What init reported on the status console.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestStatus {
    /// The command ended with this status (128 + N for signal N).
    Exited(u8),
    /// init could not run the command.
    InitError(String),
}

/// The last status line in what the status console received.
pub fn parse_status(bytes: &[u8]) -> Option<GuestStatus> {
    let text = String::from_utf8_lossy(bytes);
    text.lines().rev().find_map(|line| {
        let line = line.trim();
        if let Some(n) = line.strip_prefix(STATUS_PREFIX) {
            // init reports 0-255; anything else is not a status.
            n.parse().ok().map(GuestStatus::Exited)
        } else {
            line.strip_prefix(INIT_ERROR_PREFIX)
                .map(|reason| GuestStatus::InitError(reason.to_string()))
        }
    })
}

/// Watches the serial console, passing every byte on to `inner`, for the
/// `VMM-INIT-ERROR=` line init writes there when it could not run the
/// command (the kernel's tty layer ends it with "\r\n").
struct InitErrorWatch {
    inner: SerialOutput,
    line: Vec<u8>,
    found: Arc<Mutex<Option<String>>>,
}

impl InitErrorWatch {
    /// A line longer than this is no status line; only its head is kept.
    const LINE_MAX: usize = 512;

    fn scan(&mut self, buf: &[u8]) {
        for &byte in buf {
            if byte != b'\n' {
                if self.line.len() < Self::LINE_MAX {
                    self.line.push(byte);
                }
                continue;
            }
            if let Some(GuestStatus::InitError(reason)) = parse_status(&self.line) {
                *self.found.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
            }
            self.line.clear();
        }
    }
}

impl Write for InitErrorWatch {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.scan(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// How a `vmm run` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRun {
    /// How the machine stopped.
    pub exit: RunExit,
    /// What init reported, if it got that far: the status console's last
    /// line, else an init error seen on the serial console.
    pub status: Option<GuestStatus>,
}

/// Boots `machine` with the two consoles and runs `argv` in the guest,
/// with `shares` mounted (each served by its own virtiofsd for the length
/// of the run) and the command in the guest's view of the VMM's working
/// directory if a share holds it. `machine.cmdline` is the base kernel
/// command line (init's settings are added); `machine.consoles` and
/// `machine.filesystems` are replaced.
pub fn run_command(
    mut machine: LinuxConfig,
    argv: &[OsString],
    shares: &Shares,
) -> Result<CommandRun, RunCommandError> {
    // The platform's parameters count towards the kernel's limit (the
    // machine does not repeat them).
    let base = machine.platform.with_kernel_params(&machine.cmdline);
    let cwd = std::env::current_dir().ok();
    let settings = init_settings(&shares.list, cwd.as_deref());
    machine.cmdline = kernel_cmdline(&base, argv, &settings)?;
    let console_error = Arc::new(Mutex::new(None));
    let serial = std::mem::replace(&mut machine.serial, SerialOutput::Sink);
    machine.serial = SerialOutput::Custom(Box::new(InitErrorWatch {
        inner: serial,
        line: Vec::new(),
        found: console_error.clone(),
    }));
    // Dropped after the machine: no daemon outlives the run.
    let (_daemons, filesystems) = shares.start()?;
    machine.filesystems = filesystems;
    let status = CaptureOutput::default();
    machine.consoles = vec![
        VirtioConsole {
            output: Box::new(SerialOutput::Stdout),
            input: ConsoleInput::new().map_err(MachineError::from)?,
        },
        VirtioConsole {
            output: Box::new(status.clone()),
            input: ConsoleInput::new().map_err(MachineError::from)?,
        },
    ];
    let exit = run_linux(machine)?;
    let status = parse_status(&status.contents()).or_else(|| {
        let reason = console_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        reason.map(GuestStatus::InitError)
    });
    Ok(CommandRun { exit, status })
}

/// Errors of [`run_command`].
#[derive(Debug, Error)]
pub enum RunCommandError {
    /// The command cannot be passed to the guest.
    #[error(transparent)]
    Command(#[from] RunError),
    /// A share's virtiofsd could not be started.
    #[error(transparent)]
    Share(#[from] DaemonError),
    /// The machine could not be built or booted.
    #[error(transparent)]
    Machine(#[from] MachineError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    #[test]
    fn encoding_matches_the_init_protocol() {
        assert_eq!(
            encode_argv(&args(&["sh", "-c", "echo \"hi there\"; exit 7"])),
            "sh,-c,echo%20%22hi%20there%22%3B%20exit%207"
        );
        assert_eq!(
            encode_argv(&args(&["a,b", "50%", "", "é"])),
            "a%2Cb,50%25,,%C3%A9"
        );
        let raw = OsString::from(std::ffi::OsStr::from_bytes(b"\xff\n"));
        assert_eq!(encode_argv(&[raw]), "%FF%0A");
    }

    #[test]
    fn command_line_layout_and_limits() {
        assert_eq!(
            kernel_cmdline("console=ttyS0 noxsave ", &args(&["true"]), &[]),
            Ok("console=ttyS0 noxsave -- vmm.cmd=true vmm.out=hvc0 vmm.status=hvc1".into())
        );
        assert_eq!(
            kernel_cmdline("console=ttyS0 -- x", &args(&["true"]), &[]),
            Err(RunError::DoubleDash)
        );
        assert_eq!(
            kernel_cmdline("console=ttyS0", &args(&["true"]), &["vmm.cwd=/x".into()]),
            Ok("console=ttyS0 -- vmm.cmd=true vmm.out=hvc0 vmm.status=hvc1 vmm.cwd=/x".into())
        );
        let long = "x".repeat(2000);
        assert_eq!(
            kernel_cmdline("console=ttyS0", &args(&[&long]), &[]),
            Err(RunError::TooLong {
                // "console=ttyS0", " -- vmm.cmd=", the argument, and
                // " vmm.out=hvc0 vmm.status=hvc1".
                len: 13 + 12 + 2000 + 29,
                max: 2047
            })
        );
    }

    #[test]
    fn cwd_in_the_innermost_share() {
        let outer = ShareSpec {
            host: "/home/u".into(),
            guest: "/home/u".into(),
            writable: false,
        };
        let inner = ShareSpec {
            host: "/home/u/src".into(),
            guest: "/src".into(),
            writable: true,
        };
        let shares = [outer, inner];
        assert_eq!(
            guest_cwd(&shares, Path::new("/home/u/src/t")),
            Some(PathBuf::from("/src/t"))
        );
        assert_eq!(
            guest_cwd(&shares, Path::new("/home/u")),
            Some(PathBuf::from("/home/u"))
        );
        assert_eq!(guest_cwd(&shares, Path::new("/tmp")), None);
        assert_eq!(
            init_settings(&shares, Some(Path::new("/home/u/src/a b"))),
            [
                "vmm.share=share0,/home/u,ro",
                "vmm.share=share1,/src,rw",
                "vmm.cwd=/src/a%20b"
            ]
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status(b"VMM-EXIT-STATUS=7\n"),
            Some(GuestStatus::Exited(7))
        );
        assert_eq!(
            parse_status(b"VMM-EXIT-STATUS=1\nVMM-EXIT-STATUS=137\n"),
            Some(GuestStatus::Exited(137)),
            "the last line counts"
        );
        assert_eq!(
            parse_status(b"\nVMM-INIT-ERROR=bad-vmm.cmd-encoding\n"),
            Some(GuestStatus::InitError("bad-vmm.cmd-encoding".into()))
        );
        assert_eq!(parse_status(b"VMM-EXIT-STATUS=300\n"), None);
        assert_eq!(parse_status(b"VMM-EXIT-STATUS=\n"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[test]
    fn init_errors_are_found_on_the_serial_console() {
        let found = Arc::new(Mutex::new(None));
        let mut watch = InitErrorWatch {
            inner: SerialOutput::Sink,
            line: Vec::new(),
            found: found.clone(),
        };
        // What the kernel console carries: printk lines, then init's line
        // through the tty layer, written a byte at a time as the UART does.
        let console =
            b"[   9.1] Run /init as init process\r\n\r\nVMM-INIT-ERROR=no-status-device\r\n";
        for byte in console {
            watch.write_all(std::slice::from_ref(byte)).unwrap();
        }
        assert_eq!(*found.lock().unwrap(), Some("no-status-device".into()));

        let found = Arc::new(Mutex::new(None));
        let mut watch = InitErrorWatch {
            inner: SerialOutput::Sink,
            line: Vec::new(),
            found: found.clone(),
        };
        let long = [b'x'; 4 * InitErrorWatch::LINE_MAX];
        watch.write_all(&long).unwrap();
        watch.write_all(b"VMM-INIT-ERROR=cut-off\n").unwrap();
        watch.write_all(b"VMM-EXIT-STATUS=0\r\n").unwrap();
        assert_eq!(
            *found.lock().unwrap(),
            None,
            "only a whole line counts, and only an error"
        );
    }
}
