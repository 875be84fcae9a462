//! What a user's environment does to `vmm`: a stop signal in the middle of
//! a run, a serial log file on a full disk, stdin closed or at its end.

mod linux;

use std::fs;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use linux::{guest_images, one_guest_at_a_time, vmm_run};

/// Generous: a Linux boot takes about a minute on this project's KVM.
const TIMEOUT: &str = "900";
/// The longest wait for the guest kernel's first console line.
const BOOT_START: Duration = Duration::from_secs(180);
/// The longest a stopped run may take to tear down.
const TEARDOWN: Duration = Duration::from_secs(20);

/// `vmm` with `args`, in a process group of its own (so that anything it
/// left running would be found), its stdout and stderr piped.
fn spawn_vmm(args: &[&str], stdin: Stdio) -> Child {
    microguest::require_kvm();
    Command::new(env!("CARGO_BIN_EXE_vmm"))
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start vmm")
}

/// Waits until `file` holds `text`.
fn wait_for_text(file: &Path, text: &str, child: &mut Child) {
    let start = Instant::now();
    loop {
        if fs::read_to_string(file).is_ok_and(|log| log.contains(text)) {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("vmm ended ({status}) before the guest printed {text:?}");
        }
        assert!(start.elapsed() < BOOT_START, "no {text:?} in {file:?}");
        thread::sleep(Duration::from_millis(200));
    }
}

/// The names of `pid`'s threads.
fn thread_names(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    for task in fs::read_dir(format!("/proc/{pid}/task")).expect("list threads") {
        let comm = task.expect("thread").path().join("comm");
        if let Ok(name) = fs::read_to_string(comm) {
            names.push(name.trim().to_string());
        }
    }
    names
}

fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill")
        .args(["-s", name, &pid.to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -s {name} {pid}");
}

/// Whether any process is left in process group `pgid`.
fn group_alive(pgid: u32) -> bool {
    Command::new("kill")
        .args(["-0", "--", &format!("-{pgid}")])
        .stderr(Stdio::null())
        .status()
        .expect("run kill")
        .success()
}

/// Waits (bounded) for `child` to exit; returns its code and stderr.
fn wait_exit(mut child: Child) -> (i32, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for vmm") {
            break status;
        }
        if start.elapsed() > TEARDOWN {
            let _ = child.kill();
            panic!("vmm did not exit within {TEARDOWN:?} of the signal");
        }
        thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    (status.code().unwrap_or(-1), stderr)
}

#[test]
fn sigint_during_a_run_stops_guest_and_vmm_with_130() {
    let (kernel, initramfs) = guest_images();
    let _guard = one_guest_at_a_time();
    let dir = tempdir("sigint");
    let log = dir.join("serial.log");
    let serial = format!("file:{}", log.display());
    let mut child = spawn_vmm(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--initramfs",
            initramfs.to_str().unwrap(),
            "--timeout",
            TIMEOUT,
            "--serial",
            &serial,
            "--",
            "sleep",
            "3600",
        ],
        Stdio::null(),
    );
    let pid = child.id();
    wait_for_text(&log, "Linux version", &mut child);
    assert!(thread_names(pid).iter().any(|t| t == "vcpu0"));
    signal(pid, "INT");
    let (code, stderr) = wait_exit(child);
    assert_eq!(code, 130, "stderr: {stderr}");
    assert_eq!(stderr, "vmm: stopped by SIGINT\n");
    assert!(!group_alive(pid), "a process of vmm's group outlived it");
}

/// A plain boot on a terminal reads stdin for the serial port. With stdin
/// closed or at its end there is nothing to read: no thread may be left
/// reading it (spinning on end of input), and SIGTERM ends the run with 143.
#[test]
fn closed_stdin_leaves_no_reader_and_sigterm_gives_143() {
    let (kernel, initramfs) = guest_images();
    let _guard = one_guest_at_a_time();
    let dir = tempdir("stdin");
    let log = dir.join("serial.log");
    // `<&-` starts vmm with descriptor 0 closed; the serial port writes to
    // stdout (which makes the boot interactive), redirected to the log.
    let script = format!(
        "exec \"$0\" --kernel \"$1\" --initramfs \"$2\" --timeout {TIMEOUT} --serial stdout <&- >\"$3\""
    );
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_vmm"))
        .arg(&kernel)
        .arg(&initramfs)
        .arg(&log)
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start vmm");
    let pid = child.id();
    wait_for_text(&log, "Linux version", &mut child);
    // The reader, if one was started, had all the time it needed to see
    // that there is no input.
    thread::sleep(Duration::from_secs(2));
    let threads = thread_names(pid);
    assert!(threads.iter().any(|t| t == "vcpu0"), "{threads:?}");
    assert!(
        !threads.iter().any(|t| t == "stdin"),
        "a thread still reads the closed stdin: {threads:?}"
    );
    signal(pid, "TERM");
    let (code, stderr) = wait_exit(child);
    assert_eq!(code, 143, "stderr: {stderr}");
    assert!(stderr.ends_with("vmm: stopped by SIGTERM\n"), "{stderr}");
    assert!(!group_alive(pid), "a process of vmm's group outlived it");
}

/// The same with stdin at its end (/dev/null, as CI runs it).
#[test]
fn stdin_at_its_end_leaves_no_reader() {
    let (kernel, initramfs) = guest_images();
    let _guard = one_guest_at_a_time();
    let child = Command::new(env!("CARGO_BIN_EXE_vmm"))
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initramfs")
        .arg(&initramfs)
        .args(["--timeout", TIMEOUT, "--serial", "stdout"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start vmm");
    let pid = child.id();
    let start = Instant::now();
    while !thread_names(pid).iter().any(|t| t == "vcpu0") {
        assert!(start.elapsed() < BOOT_START, "no vCPU thread");
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_secs(2));
    let threads = thread_names(pid);
    assert!(
        !threads.iter().any(|t| t == "stdin"),
        "a thread still reads stdin at its end: {threads:?}"
    );
    signal(pid, "TERM");
    let (code, stderr) = wait_exit(child);
    assert_eq!(code, 143, "stderr: {stderr}");
}

/// A serial log on a full disk (/dev/full fails every write with ENOSPC):
/// one warning, and the run goes on to the command's status.
#[test]
fn full_disk_for_the_serial_log_is_reported_once_and_the_run_goes_on() {
    let run = vmm_run(
        &["--timeout", TIMEOUT, "--serial", "file:/dev/full"],
        &["sh", "-c", "echo hi; exit 3"],
    );
    assert_eq!(run.code, 3, "stderr: {}", run.stderr);
    assert_eq!(run.stdout, b"hi\n");
    let warning = "serial output file: No space left on device (os error 28); \
the guest's console output is dropped until writes succeed again";
    assert_eq!(run.stderr.matches(warning).count(), 1, "{}", run.stderr);
}

/// A fresh directory for one test's files.
fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("environment-{name}"));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("create a test directory");
    dir
}
