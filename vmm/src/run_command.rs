//! `vmm run`: one command inside a Linux guest, through the project's init
//! (guest-images/init/init.c), with its output and its exit status carried
//! by two virtio consoles, as virtme-ng does:
//!
//! - hvc0 (the first virtio-console function) carries the command's stdout
//!   and stderr, byte for byte, to the VMM's stdout as they arrive;
//! - hvc1 (the second) carries only init's status line,
//!   `VMM-EXIT-STATUS=<n>` or `VMM-INIT-ERROR=<reason>`.
//!
//! The serial port stays the kernel console. The command reaches init as
//! `vmm.cmd=` (the argv, percent-encoded; see guest-images/README.md) after
//! `--` on the kernel command line, with `vmm.out=hvc0 vmm.status=hvc1`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;

use thiserror::Error;

use crate::devices::serial::SerialOutput;
use crate::devices::virtio::{CaptureOutput, ConsoleInput};
use crate::machine::{run_linux, LinuxConfig, MachineError, VirtioConsole};
use crate::share::{self, DaemonError, Shares};
use crate::vm::RunExit;

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
/// (`extra` ones, e.g. [`crate::share::init_settings`], last).
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

/// How a `vmm run` ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommandRun {
    /// How the machine stopped.
    pub exit: RunExit,
    /// What init reported, if it got that far.
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
    let cwd = std::env::current_dir().ok();
    let settings = share::init_settings(&shares.list, cwd.as_deref());
    machine.cmdline = kernel_cmdline(&machine.cmdline, argv, &settings)?;
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
    Ok(CommandRun {
        exit,
        status: parse_status(&status.contents()),
    })
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
}
