//! SIGINT and SIGTERM end a run the way `--timeout` does: the vCPU threads
//! leave KVM_RUN and are joined, the device threads stop, the VM is closed
//! and `vmm` exits with 128 + the signal's number, as a shell reports a
//! process that signal ended. The handler only records the signal; the
//! thread waiting for the run ([`crate::vm::Vm::run`]) looks at it.

use std::sync::atomic::{AtomicI32, Ordering};

use vmm_sys_util::errno;
use vmm_sys_util::signal::register_signal_handler;

/// The signals that end a run.
pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// The first stop signal received, or 0.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Async-signal-safe: one atomic store. The first signal wins.
    let _ = RECEIVED.compare_exchange(0, num, Ordering::AcqRel, Ordering::Acquire);
}

/// Makes SIGINT and SIGTERM end the current (or next) run instead of the
/// process. Threads that are in a blocking system call when a signal lands
/// see EINTR: KVM_RUN and the virtio event loop resume, the stdin thread
/// retries.
pub fn install() -> Result<(), errno::Error> {
    for num in STOP_SIGNALS {
        register_signal_handler(num, on_stop_signal)?;
    }
    Ok(())
}

/// The stop signal received since [`install`], if any.
pub fn received() -> Option<libc::c_int> {
    match RECEIVED.load(Ordering::Acquire) {
        0 => None,
        num => Some(num),
    }
}

/// The signal's name for messages.
pub fn name(num: libc::c_int) -> String {
    match num {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        _ => format!("signal {num}"),
    }
}
