//! The `vmm` command.
//!
//! Exit status: 0 when the guest powered off (or a demo/benchmark
//! succeeded), 1 when the VMM hit an error it could not answer, 2 for bad
//! command-line input, 3 when the guest triple-faulted, 4 on `--timeout`,
//! 5 when the guest reset itself, 6 when the guest kernel panicked
//! (pvpanic). `vmm micro PROGRAM` exits with the low 8 bits of the value
//! the program wrote to the test-exit port unless the program is a
//! built-in demo, which checks its own result. `vmm run ... -- CMD` exits
//! with CMD's status once the guest reported it; before that, the codes
//! above apply, never 0: 7 when init could not run CMD (its reason on
//! stderr), 8 when the guest powered off before reporting a status (CMD
//! ran `poweroff`). SIGINT and SIGTERM end any run with 128 + the signal's
//! number (130, 143) after the guest and every VMM thread have stopped.

#![forbid(unsafe_code)]

mod run_command;

use std::ffi::OsString;
use std::fs::File;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use microguest::demo_runs::{self, Outcome};
use vdsa::DsaConfig;
use vmm::devices::serial::SerialOutput;
use vmm::guest_images::{default_images, ImagesError};
use vmm::machine::{run_linux, LinuxConfig, MachineError};
use vmm::modules;
use vmm::platform::{Platform, PlatformChoice};

use vmm::share::{check_shares, find_virtiofsd, parse_share, Shares};
use vmm::stop_signal;

use crate::run_command::{run_command, CommandRun, GuestStatus, RunCommandError};
use vmm::sva::AccelConfig;
use vmm::vm::{RunExit, MIN_MEMORY};

const EXIT_ERROR: u8 = 1;
const EXIT_USAGE: u8 = 2;
const EXIT_TRIPLE_FAULT: u8 = 3;
const EXIT_TIMEOUT: u8 = 4;
const EXIT_RESET: u8 = 5;
const EXIT_GUEST_PANIC: u8 = 6;
const EXIT_NO_STATUS: u8 = 7;
/// `vmm run`: the guest powered off (or the kernel halted it) before init
/// reported the command's status.
const EXIT_POWEROFF_NO_STATUS: u8 = 8;
/// SIGINT or SIGTERM ended the run: 128 + the signal's number (130, 143).
const EXIT_SIGNAL_BASE: u8 = 128;
/// Device numbers 1 to 31 of bus 0 (00:00.0 is the host bridge), less
/// the pvpanic function and the two virtio consoles of `vmm run`: room for
/// the vDSAs and `vmm run`'s virtio-fs devices together.
const MAX_DSA: usize = 28;

/// A KVM VMM with an emulated VT-d IOMMU (scalable mode) and a DSA-like
/// accelerator with ENQCMD portals.
#[derive(Parser, Debug)]
#[command(name = "vmm", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Linux kernel to boot (ELF vmlinux or bzImage).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Number of vCPUs (1-255).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    cpus: u8,
    /// Guest RAM, e.g. 256M or 1G (K, M, G suffixes; at least 16M).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Where the serial console goes: stdout, stderr, none or file:PATH.
    #[arg(long, default_value = "stdout", value_parser = parse_serial)]
    serial: SerialTarget,
    /// Stop the guest after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// Add the vIOMMU (VT-d, scalable mode) with every PCI device behind
    /// it and its DMAR in the ACPI tables; without it devices do
    /// untranslated DMA into guest RAM.
    #[arg(long, global = true)]
    iommu: bool,
    /// Add a vDSA (repeatable; at 00:01.0, 00:02.0, ...). Without SPEC it is
    /// a Sapphire Rapids DSA 1.0:
    /// wqs=8,engines=4,groups=4,wq-size=128,max-batch=1024,int-handles=off.
    /// SPEC is a comma list of wqs=1-16,
    /// engines=1-8, groups=1-8, wq-size=1-65535 (WQ entries in total),
    /// max-batch=2-32768 (a power of two), int-handles=on|off (CMDCAP with
    /// the interrupt-handle commands); a value other than the default
    /// departs from the real device's registers.
    #[arg(
        long,
        global = true,
        value_name = "SPEC",
        num_args = 0..=1,
        default_missing_value = "",
        value_parser = parse_dsa
    )]
    dsa: Vec<DsaConfig>,
    /// Which kind of KVM serves /dev/kvm: auto (detected from the host's
    /// KVM module), kvm (ordinary KVM: Intel VMX, AMD SVM) or pvm (the PVM
    /// backend, with its workarounds). An override the host contradicts is
    /// refused.
    #[arg(long, global = true, value_enum, default_value_t = PlatformArg::Auto)]
    platform: PlatformArg,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PlatformArg {
    Auto,
    Kvm,
    Pvm,
}

impl From<PlatformArg> for PlatformChoice {
    fn from(a: PlatformArg) -> Self {
        match a {
            PlatformArg::Auto => PlatformChoice::Auto,
            PlatformArg::Kvm => PlatformChoice::Kvm,
            PlatformArg::Pvm => PlatformChoice::Pvm,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a built-in micro-guest program.
    Micro {
        /// The program.
        program: MicroProgram,
    },
    /// Measure a trapped user ENQCMD against a bare port-I/O exit, and the
    /// accelerator's submissions and copies.
    Bench {
        /// Round trips of each kind.
        #[arg(long, default_value_t = 20_000)]
        iterations: u32,
        /// Run the benchmark this many times in a row, then print a summary.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        repeat: u32,
    },
    /// Boot Linux, run CMD in it through the project's init and exit with
    /// CMD's status. CMD's output (stdout and stderr) goes to stdout, over a
    /// virtio console; the kernel log goes to stderr (see --serial).
    Run(Box<RunArgs>),
}

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Exit status: CMD's own (0-255) once the guest reported it. \
Otherwise 1 VMM error, 2 bad input, 3 triple fault, 4 --timeout, 5 guest reset, \
6 guest kernel panic, 7 init could not run the command (reason on stderr), \
8 the guest powered off before reporting a status (CMD ran poweroff), \
130/143 SIGINT/SIGTERM stopped the run."
)]
struct RunArgs {
    /// Linux kernel to boot (ELF vmlinux or bzImage); default: the
    /// project's (guest-images/out/vmlinux, built if missing).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs whose /init is the project's; default:
    /// guest-images/out/initramfs-base.cpio (built if missing).
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Share a host directory with the guest over virtio-fs (repeatable):
    /// HOST_DIR[:GUEST_PATH][,ro|rw]. GUEST_PATH defaults to HOST_DIR's
    /// absolute path; read-only unless ",rw". CMD runs in the guest's view
    /// of the current directory when a share holds it.
    #[arg(long, value_name = "HOST_DIR[:GUEST_PATH][,ro|rw]")]
    share: Vec<String>,
    /// The kernel's module tree (lib/modules/RELEASE), for a kernel whose
    /// virtio drivers are modules; default: lib/modules/RELEASE beside the
    /// kernel, else the host's /lib/modules/RELEASE.
    #[arg(long, value_name = "DIR")]
    modules: Option<PathBuf>,
    /// The virtiofsd binary that serves --share (default: $VMM_VIRTIOFSD,
    /// else the one tools/virtiofsd.sh installed, else virtiofsd on PATH).
    #[arg(long, value_name = "PATH")]
    virtiofsd: Option<PathBuf>,
    /// Kernel command line; init's settings are added after "--".
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// Number of vCPUs (1-255).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    cpus: u8,
    /// Guest RAM, e.g. 256M or 1G (K, M, G suffixes; at least 16M).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    memory: u64,
    /// Where the kernel's serial console goes: stderr, stdout, none or file:PATH.
    #[arg(long, default_value = "stderr", value_parser = parse_serial)]
    serial: SerialTarget,
    /// Stop the guest after this many seconds (exit status 4).
    #[arg(long)]
    timeout: Option<u64>,
    /// The command and its arguments, after "--".
    #[arg(last = true, value_name = "CMD")]
    command: Vec<OsString>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MicroProgram {
    /// User ENQCMD: #GP with IA32_PASID clear, the guest loads the MSR, the
    /// retried ENQCMD reaches a portal with that PASID.
    EnqcmdDemo,
    /// SVA end to end on the vIOMMU and a vDSA: the guest builds its VT-d
    /// tables and brings the vDSA up; its user process copies with
    /// MOVDIR64B (dedicated WQ) and ENQCMD (shared WQ, after the #GP fixup).
    SvaDemo,
}

#[derive(Clone, Debug)]
enum SerialTarget {
    Stdout,
    Stderr,
    None,
    File(PathBuf),
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 10),
        Some((i, 'M' | 'm')) => (&t[..i], 20),
        Some((i, 'G' | 'g')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| "expected a number with an optional K, M or G suffix".to_string())?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| "size too large".to_string())
}

/// Parses a `--dsa` SPEC: `key=value` pairs separated by commas, each key
/// at most once; an empty SPEC is the default device.
fn parse_dsa(spec: &str) -> Result<DsaConfig, String> {
    let mut config = DsaConfig::default();
    let mut seen = Vec::new();
    for item in spec.split(',').filter(|item| !item.is_empty()) {
        let Some((key, value)) = item.split_once('=') else {
            return Err(format!("expected key=value, got '{item}'"));
        };
        if seen.contains(&key) {
            return Err(format!("{key} given twice"));
        }
        seen.push(key);
        let number = |min: u32, max: u32| -> Result<u32, String> {
            value
                .parse::<u32>()
                .ok()
                .filter(|n| (min..=max).contains(n))
                .ok_or_else(|| format!("{key} must be a number from {min} to {max}, got '{value}'"))
        };
        match key {
            "wqs" => config.num_wqs = number(1, 16)? as u8,
            "engines" => config.num_engines = number(1, 8)? as u8,
            "groups" => config.num_groups = number(1, 8)? as u8,
            "wq-size" => config.total_wq_size = number(1, u32::from(u16::MAX))? as u16,
            "max-batch" => {
                let n = number(2, 1 << 15)?;
                if !n.is_power_of_two() {
                    return Err(format!("max-batch must be a power of two, got {n}"));
                }
                config.max_batch_shift = n.trailing_zeros() as u8;
            }
            "int-handles" => {
                config.interrupt_handles = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(format!("int-handles must be on or off, got '{value}'")),
                }
            }
            _ => {
                return Err(format!(
                    "unknown key '{key}' (expected wqs, engines, groups, wq-size, max-batch, \
                     int-handles)"
                ))
            }
        }
    }
    Ok(config)
}

fn parse_serial(s: &str) -> Result<SerialTarget, String> {
    match s {
        "stdout" => Ok(SerialTarget::Stdout),
        "stderr" => Ok(SerialTarget::Stderr),
        "none" => Ok(SerialTarget::None),
        _ => match s.strip_prefix("file:") {
            Some(path) if !path.is_empty() => Ok(SerialTarget::File(path.into())),
            _ => Err("expected stdout, stderr, none or file:PATH".into()),
        },
    }
}

/// Prints one line naming the problem and returns the usage exit code.
fn usage_error(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn exit_code(exit: &RunExit) -> ExitCode {
    match exit {
        RunExit::PowerOff => ExitCode::SUCCESS,
        RunExit::TestExit(v) => ExitCode::from(*v as u8),
        RunExit::TripleFault => {
            eprintln!("vmm: the guest triple-faulted");
            ExitCode::from(EXIT_TRIPLE_FAULT)
        }
        RunExit::Timeout => {
            eprintln!("vmm: timeout");
            ExitCode::from(EXIT_TIMEOUT)
        }
        RunExit::Reset => {
            eprintln!("vmm: the guest reset the machine");
            ExitCode::from(EXIT_RESET)
        }
        RunExit::GuestPanic => {
            eprintln!("vmm: the guest kernel panicked");
            ExitCode::from(EXIT_GUEST_PANIC)
        }
        RunExit::Error(line) => {
            eprintln!("vmm: {line}");
            ExitCode::from(EXIT_ERROR)
        }
        RunExit::Signal(num) => {
            eprintln!("vmm: stopped by {}", stop_signal::name(*num));
            ExitCode::from(EXIT_SIGNAL_BASE.wrapping_add(*num as u8))
        }
    }
}

/// Puts /dev/null on whichever of the standard descriptors 0-2 the VMM was
/// started without, so that no file, KVM or eventfd descriptor the VMM opens
/// later becomes "stdin" (read by the serial input thread) or "stdout".
fn fill_standard_fds() {
    use std::os::fd::{AsRawFd, IntoRawFd};
    while let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        if null.as_raw_fd() > 2 {
            break;
        }
        // Kept open for the life of the process.
        let _ = null.into_raw_fd();
    }
}

fn main() -> ExitCode {
    fill_standard_fds();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e)
            if matches!(
                e.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) =>
        {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // clap's first line names the problem; the usage lines after it
            // are left out.
            let text = e.render().to_string();
            let line = text.lines().next().unwrap_or("invalid command line");
            eprintln!("{}", line.trim());
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if cli.dsa.len() > MAX_DSA {
        return usage_error(format_args!(
            "{} --dsa devices given; PCI bus 0 has room for {MAX_DSA}",
            cli.dsa.len()
        ));
    }
    let detection = Platform::detect();
    let platform = match Platform::choose(cli.platform.into(), &detection) {
        Ok(p) => p,
        Err(e) => return usage_error(e),
    };
    log::info!("platform: {platform} ({})", detection.reason);
    let accel = AccelConfig {
        iommu: cli.iommu,
        dsa: cli.dsa.clone(),
    };
    if let Err(e) = stop_signal::install() {
        eprintln!("vmm: cannot handle SIGINT and SIGTERM: {e}");
        return ExitCode::from(EXIT_ERROR);
    }
    match cli.command {
        Some(Command::Micro {
            program: MicroProgram::EnqcmdDemo,
        }) => outcome_code(demo_runs::enqcmd_demo(cli.timeout, accel, platform)),
        Some(Command::Micro {
            program: MicroProgram::SvaDemo,
        }) => outcome_code(demo_runs::sva_demo(cli.timeout, platform)),
        Some(Command::Bench { iterations, repeat }) => {
            outcome_code(demo_runs::bench(iterations, repeat, accel, platform))
        }
        Some(Command::Run(args)) => run(*args, accel, platform),
        None => boot(cli, accel, platform),
    }
}

fn boot(cli: Cli, accel: AccelConfig, platform: Platform) -> ExitCode {
    let config = match machine_config(
        MachineArgs {
            kernel: cli.kernel,
            initramfs: cli.initramfs,
            cmdline: cli.cmdline,
            cpus: cli.cpus,
            memory: cli.memory,
            serial: cli.serial,
            timeout: cli.timeout,
        },
        accel,
        platform,
    ) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match run_linux(config) {
        Ok(exit) => exit_code(&exit),
        // Kernel/initramfs problems found while loading are input errors.
        Err(MachineError::Boot(e)) => usage_error(e),
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The options every Linux boot takes.
struct MachineArgs {
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    cmdline: String,
    cpus: u8,
    memory: u64,
    serial: SerialTarget,
    timeout: Option<u64>,
}

/// Checks the options of a Linux boot; a bad one gets its usage error.
fn machine_config(
    args: MachineArgs,
    accel: AccelConfig,
    platform: Platform,
) -> Result<LinuxConfig, ExitCode> {
    let Some(kernel) = args.kernel else {
        return Err(usage_error(
            "--kernel is required (or use a subcommand: micro, bench)",
        ));
    };
    if let Err(e) = File::open(&kernel) {
        return Err(usage_error(format_args!(
            "cannot read kernel '{}': {e}",
            kernel.display()
        )));
    }
    if let Some(initramfs) = &args.initramfs {
        if let Err(e) = File::open(initramfs) {
            return Err(usage_error(format_args!(
                "cannot read initramfs '{}': {e}",
                initramfs.display()
            )));
        }
    }
    if args.memory < MIN_MEMORY {
        return Err(usage_error(format_args!(
            "--memory {} bytes is below the minimum of {} MiB",
            args.memory,
            MIN_MEMORY >> 20
        )));
    }
    let serial = match args.serial {
        SerialTarget::Stdout => SerialOutput::Stdout,
        SerialTarget::Stderr => SerialOutput::Stderr,
        SerialTarget::None => SerialOutput::Sink,
        SerialTarget::File(path) => match File::create(&path) {
            Ok(f) => SerialOutput::file(f),
            Err(e) => {
                return Err(usage_error(format_args!(
                    "cannot write serial file '{}': {e}",
                    path.display()
                )))
            }
        },
    };
    Ok(LinuxConfig {
        kernel,
        initramfs: args.initramfs,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory: args.memory,
        serial,
        timeout: args.timeout.map(Duration::from_secs),
        accel,
        platform,
        consoles: Vec::new(),
        filesystems: Vec::new(),
    })
}

fn run(args: RunArgs, accel: AccelConfig, platform: Platform) -> ExitCode {
    if args.command.is_empty() {
        return usage_error("no command: give it after \"--\", as in vmm run -- sh -c 'echo hi'");
    }
    let shares = match run_shares(&args) {
        Ok(shares) => shares,
        Err(line) => return usage_error(line),
    };
    if accel.dsa.len() + shares.list.len() > MAX_DSA {
        return usage_error(format_args!(
            "{} --dsa devices and {} --share directories given; PCI bus 0 has room for {MAX_DSA} in all",
            accel.dsa.len(),
            shares.list.len()
        ));
    }
    let (kernel, initramfs) = if args.kernel.is_none() || args.initramfs.is_none() {
        match default_images() {
            Ok((kernel, initramfs)) => (
                args.kernel.or(Some(kernel)),
                args.initramfs.or(Some(initramfs)),
            ),
            Err(e @ ImagesError::NotInDirectory(_)) => return usage_error(e),
            Err(e) => {
                eprintln!("vmm: {e}");
                return ExitCode::from(EXIT_ERROR);
            }
        }
    } else {
        (args.kernel, args.initramfs)
    };
    // A modular kernel gets its virtio modules appended to the initramfs.
    let carried = match (&kernel, &initramfs) {
        (Some(k), Some(i)) => {
            let mut wanted = modules::CONSOLE_MODULES.to_vec();
            if !shares.list.is_empty() {
                wanted.extend_from_slice(modules::SHARE_MODULES);
            }
            match modules::carry(k, i, args.modules.as_deref(), &wanted) {
                Ok(carried) => carried,
                Err(e) => return usage_error(e),
            }
        }
        _ => None,
    };
    let initramfs = carried
        .as_ref()
        .map(|c| c.path().to_path_buf())
        .or(initramfs);
    let config = match machine_config(
        MachineArgs {
            kernel,
            initramfs,
            cmdline: args.cmdline,
            cpus: args.cpus,
            memory: args.memory,
            serial: args.serial,
            timeout: args.timeout,
        },
        accel,
        platform,
    ) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match run_command(config, &args.command, &shares) {
        Ok(run) => command_exit_code(&run),
        Err(RunCommandError::Command(e)) => usage_error(e),
        Err(RunCommandError::Machine(MachineError::Boot(e))) => usage_error(e),
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The checked `--share` options and the virtiofsd to serve them.
fn run_shares(args: &RunArgs) -> Result<Shares, String> {
    let list = args
        .share
        .iter()
        .map(|s| parse_share(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    check_shares(&list).map_err(|e| e.to_string())?;
    let virtiofsd = if list.is_empty() {
        PathBuf::new()
    } else {
        find_virtiofsd(args.virtiofsd.as_deref())?
    };
    Ok(Shares { list, virtiofsd })
}

/// CMD's status if the guest reported one, else how the machine stopped.
fn command_exit_code(run: &CommandRun) -> ExitCode {
    match &run.status {
        Some(GuestStatus::Exited(status)) => {
            if run.exit != RunExit::PowerOff {
                log::warn!(
                    "the guest reported the command's status, then stopped with {:?}",
                    run.exit
                );
            }
            ExitCode::from(*status)
        }
        Some(GuestStatus::InitError(reason)) => {
            eprintln!("vmm: the guest's init could not run the command: {reason}");
            ExitCode::from(EXIT_NO_STATUS)
        }
        None if run.exit == RunExit::PowerOff => {
            // Never 0: exit status 0 says the command ran and returned 0.
            eprintln!("vmm: the guest powered off before reporting the command's status");
            ExitCode::from(EXIT_POWEROFF_NO_STATUS)
        }
        None => exit_code(&run.exit),
    }
}

/// The exit status of a demo or benchmark: 0 when it passed, the machine's
/// own when it stopped otherwise, else a VMM error (its line on stderr).
fn outcome_code(outcome: Result<Outcome, String>) -> ExitCode {
    match outcome {
        Ok(Outcome::Passed) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(EXIT_ERROR),
        Ok(Outcome::Stopped(exit)) => exit_code(&exit),
        Err(line) => {
            eprintln!("vmm: {line}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
