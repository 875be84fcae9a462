//! The machine: KVM VM, guest memory, interrupt chip, buses, platform
//! devices and vCPU threads.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_regs, kvm_sregs, kvm_userspace_memory_region,
    KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM_CAP_X86_USER_SPACE_MSR, KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_EXIT_REASON_UNKNOWN, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use thiserror::Error;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::entry_watch::SharedHandlers;
use crate::layout;
use crate::platform::{pvm, HostCpu, Platform};
use crate::stop_signal;
use crate::sva::GuestPasids;
use crate::vcpu::{Vcpu, VcpuStop};
use bus::Bus;
use pasid::PasidSpace;

/// What a vCPU thread tells the thread that runs the machine.
enum VcpuMsg {
    /// The vCPU left its run loop.
    Stopped(VcpuStop),
    /// It published new exception handlers: kick the others out of
    /// KVM_RUN so they watch them too (crate::entry_watch::SharedHandlers).
    KickOthers,
}

/// When the vCPUs are kicked a second time after new handlers.
const REKICK_DELAY: Duration = Duration::from_millis(20);

/// Where KVM on Intel puts its real-mode TSS; harmless elsewhere.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Smallest machine: room for page tables, a kernel and its stack.
pub const MIN_MEMORY: u64 = 16 << 20;

/// Errors building the machine.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0} (this VMM needs KVM)")]
    NoKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be mapped.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A thread could not be started.
    #[error("cannot start a vCPU thread: {0}")]
    Thread(#[from] std::io::Error),
    /// The host PASID space has no room for this guest.
    #[error("host PASID space: {0}")]
    Pasid(#[from] pasid::Error),
}

/// The host PASID space every VM of this process shares unless told
/// otherwise ([`VmConfig::pasid_space`]): two VMs never get the same host
/// PASID.
pub fn host_pasid_space() -> Arc<PasidSpace> {
    static SPACE: std::sync::OnceLock<Arc<PasidSpace>> = std::sync::OnceLock::new();
    SPACE.get_or_init(|| Arc::new(PasidSpace::new())).clone()
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunExit {
    /// A device ended the run with this value through
    /// [`Vm::exit_reporter`] (a micro-guest wrote it to the harness's
    /// test-exit port).
    TestExit(u32),
    /// The guest powered off.
    PowerOff,
    /// The guest asked for a reset (i8042 or KVM system event).
    Reset,
    /// The guest triple-faulted.
    TripleFault,
    /// The guest kernel reported a panic (pvpanic).
    GuestPanic,
    /// `--timeout` expired.
    Timeout,
    /// A stop signal (SIGINT, SIGTERM) ended the run; see
    /// [`crate::stop_signal`].
    Signal(i32),
    /// The VMM could not go on; the line says why.
    Error(String),
}

/// How long the thread waiting for a run sleeps between looks at
/// [`stop_signal::received`].
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// What ended the wait for a run.
enum Waited {
    Vcpu(VcpuStop),
    Timeout,
    Signal(i32),
    NoVcpu,
}

/// What the machine is made of.
pub struct VmConfig {
    /// Number of vCPUs (1 to 255).
    pub cpus: u8,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The kind of KVM serving /dev/kvm: which workarounds apply
    /// ([`crate::platform`]); usually [`Platform::host`].
    pub platform: Platform,
    /// The host PASID space the guest's host PASIDs come from;
    /// [`host_pasid_space`] when `None`.
    pub pasid_space: Option<Arc<PasidSpace>>,
}

/// How vCPU 0's segment and control registers are set up from KVM's reset
/// values.
pub type SregsSetup = Box<dyn Fn(&mut kvm_sregs) + Send>;

/// The machine before it runs.
pub struct Vm {
    kvm: Kvm,
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    mmio: Arc<Bus>,
    pio: Arc<Bus>,
    cpus: u8,
    platform: Platform,
    host_cpu: HostCpu,
    boot: Option<(kvm_regs, SregsSetup)>,
    power_off: Arc<AtomicBool>,
    panicked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    test_done: Arc<AtomicBool>,
    test_result: Arc<AtomicU32>,
    reset: Arc<AtomicBool>,
    pasids: Arc<GuestPasids>,
    tsc_khz: Arc<AtomicU32>,
}

/// The guest RAM ranges for `size` bytes: below the 32-bit MMIO hole, then
/// above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(layout::MMIO_HOLE_START);
    let mut ranges = vec![(GuestAddress(layout::RAM_START), low as usize)];
    if size > low {
        ranges.push((GuestAddress(layout::HIGH_RAM_START), (size - low) as usize));
    }
    ranges
}

/// Guest RAM of `size` bytes backed by one memfd, each range of
/// [`ram_ranges`] at its own offset and mapped shared, so that a vhost-user
/// backend (virtiofsd) can map the same pages from the file descriptors in
/// the regions' [`FileOffset`]s.
pub fn shared_guest_memory(size: u64) -> Result<GuestMemoryMmap, VmError> {
    let memory_error = |e: std::io::Error| VmError::Memory(e.to_string());
    // SAFETY: memfd_create takes a NUL-terminated name and flags and
    // returns a new descriptor or -1; nothing else is touched.
    let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(memory_error(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and is owned by nothing else.
    let file = Arc::new(unsafe { File::from_raw_fd(fd) });
    file.set_len(size).map_err(memory_error)?;
    let mut offset = 0u64;
    let ranges: Vec<_> = ram_ranges(size)
        .into_iter()
        .map(|(start, len)| {
            let range = (start, len, Some(FileOffset::from_arc(file.clone(), offset)));
            offset += len as u64;
            range
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| VmError::Memory(e.to_string()))
}

impl Vm {
    /// Creates the VM, its memory, interrupt chip and PIT; its vCPUs will
    /// dispatch MMIO and port I/O to `mmio` and `pio`, whose devices the
    /// machine's device manager puts there
    /// ([`crate::machine::DeviceManager`]).
    pub fn new(config: VmConfig, mmio: Arc<Bus>, pio: Arc<Bus>) -> Result<Self, VmError> {
        static NEXT_VM: AtomicU32 = AtomicU32::new(0);
        let space = config.pasid_space.clone().unwrap_or_else(host_pasid_space);
        let name = format!("vm{}", NEXT_VM.fetch_add(1, Ordering::Relaxed));
        let pasids = Arc::new(GuestPasids::new(space, &name)?);
        let kvm = Kvm::new().map_err(VmError::NoKvm)?;
        let fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        let memory = shared_guest_memory(config.memory)?;
        for (slot, region) in memory.iter().enumerate() {
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `memory`, which the
            // Vm keeps for as long as the KVM VM exists; the slot ranges do
            // not overlap.
            unsafe { fd.set_user_memory_region(mem_region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        // Instructions KVM's emulator cannot run come to us with their bytes.
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE,
            ..Default::default()
        };
        cap.args[0] = 1;
        fd.enable_cap(&cap)
            .map_err(kvm_err("KVM_CAP_EXIT_ON_EMULATION_FAILURE"))?;
        config.platform.configure_vm(&fd).map_err(kvm_err(
            "KVM_CAP_DISABLE_QUIRKS2 (the platform's KVM quirks)",
        ))?;
        // IA32_PASID accesses exit to us: KVM does not know the MSR, and the
        // filter makes sure of it.
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_X86_USER_SPACE_MSR,
            ..Default::default()
        };
        cap.args[0] = u64::from(KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER);
        fd.enable_cap(&cap)
            .map_err(kvm_err("KVM_CAP_X86_USER_SPACE_MSR"))?;
        let deny = [0u8];
        let range = MsrFilterRange {
            flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
            base: pasid::MSR_IA32_PASID,
            msr_count: 1,
            bitmap: &deny,
        };
        let mut ranges = vec![range];
        if config.platform.completes_syscall() {
            // Writes of STAR, LSTAR and FMASK exit too: the vCPU keeps them
            // for the SYSCALL completion and arms its #PF watch then.
            ranges.push(pvm::SYSCALL_MSR_WRITES);
        }
        fd.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges)
            .map_err(kvm_err("KVM_X86_SET_MSR_FILTER"))?;

        Ok(Self {
            kvm,
            fd: Arc::new(fd),
            memory,
            mmio,
            pio,
            cpus: config.cpus.max(1),
            platform: config.platform,
            host_cpu: HostCpu::probe(),
            boot: None,
            power_off: Arc::new(AtomicBool::new(false)),
            panicked: Arc::new(AtomicBool::new(false)),
            stop: Arc::new(AtomicBool::new(false)),
            test_done: Arc::new(AtomicBool::new(false)),
            test_result: Arc::new(AtomicU32::new(0)),
            reset: Arc::new(AtomicBool::new(false)),
            pasids,
            tsc_khz: Arc::new(AtomicU32::new(0)),
        })
    }

    /// The kind of KVM the machine runs on.
    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// Takes `host` as what the host CPU runs natively instead of probing
    /// it: which exception entries the vCPUs watch
    /// ([`Platform::watched_vectors`]). Lets a test raise the #GP route a
    /// host with ENQCMD produces on one without it.
    pub fn set_host_cpu(&mut self, host: HostCpu) {
        self.host_cpu = host;
    }

    /// The guest's TSC frequency in kHz (KVM_GET_TSC_KHZ), known once the
    /// run has created vCPU 0; 0 until then or if KVM cannot tell.
    pub fn tsc_khz(&self) -> Arc<AtomicU32> {
        self.tsc_khz.clone()
    }

    /// The guest's PASIDs: its gPASID -> hPASID table and the IA32_PASID
    /// state that follows its address spaces.
    pub fn pasids(&self) -> &Arc<GuestPasids> {
        &self.pasids
    }

    /// Guest RAM.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The KVM VM (for MSI delivery and irqfds).
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The registers vCPU 0 starts with. The APIC base keeps KVM's reset
    /// value (LAPIC enabled, BSP): a zero there would disable the LAPIC.
    pub fn set_boot_state(&mut self, regs: kvm_regs, sregs: kvm_sregs) {
        self.boot = Some((
            regs,
            Box::new(move |s: &mut kvm_sregs| {
                let apic_base = s.apic_base;
                *s = sregs;
                s.apic_base = apic_base;
            }),
        ));
    }

    /// The registers vCPU 0 starts with, its segment and control registers
    /// derived from KVM's reset values by `setup`.
    pub fn set_boot_state_with(&mut self, regs: kvm_regs, setup: SregsSetup) {
        self.boot = Some((regs, setup));
    }

    /// A flag a power-off device raises; the run then ends as
    /// [`RunExit::PowerOff`].
    pub fn power_off_flag(&self) -> Arc<AtomicBool> {
        self.power_off.clone()
    }

    /// A flag a reset device (the i8042's reset command) raises; the run
    /// then ends as [`RunExit::Reset`].
    pub fn reset_flag(&self) -> Arc<AtomicBool> {
        self.reset.clone()
    }

    /// A flag a panic-notification device raises; the run then ends as
    /// [`RunExit::GuestPanic`], whatever the guest does next.
    pub fn panic_flag(&self) -> Arc<AtomicBool> {
        self.panicked.clone()
    }

    fn create_vcpu(&self, id: u8) -> Result<Vcpu, VmError> {
        let fd = self
            .fd
            .create_vcpu(id.into())
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = crate::cpuid::template(&self.kvm, id, self.cpus, self.platform)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        if id == 0 {
            if let Ok(khz) = fd.get_tsc_khz() {
                self.tsc_khz.store(khz, Ordering::Relaxed);
            }
            if let Some((regs, setup)) = &self.boot {
                let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
                setup(&mut sregs);
                fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
                fd.set_regs(regs).map_err(kvm_err("KVM_SET_REGS"))?;
            }
        }
        Ok(Vcpu::new(
            fd,
            id,
            self.memory.clone(),
            self.mmio.clone(),
            self.pio.clone(),
            self.pasids.clone(),
        )
        .with_platform(self.platform, self.host_cpu))
    }

    /// Runs every vCPU on its own thread until the guest or `timeout` ends
    /// the run.
    pub fn run(self, timeout: Option<Duration>) -> RunExit {
        // KVM_RUN returns EINTR when a vCPU thread gets this signal.
        extern "C" fn kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        if let Err(e) = register_signal_handler(SIGRTMIN(), kick) {
            return RunExit::Error(format!("cannot register the vCPU kick signal: {e}"));
        }
        // Every vCPU, and so every local APIC, exists before any runs: KVM
        // drops an IPI to an APIC ID it does not know, so an INIT/SIPI that
        // vCPU 0 sends before its target is created never arrives and the
        // guest gives the CPU up ("CPU1 failed to report alive state").
        let mut vcpus = Vec::with_capacity(self.cpus.into());
        for id in 0..self.cpus {
            match self.create_vcpu(id) {
                Ok(v) => vcpus.push(v),
                Err(e) => return RunExit::Error(e.to_string()),
            }
        }
        let (tx, rx) = mpsc::channel();
        let mut threads = Vec::new();
        let shared = Arc::new(SharedHandlers::default());
        // The APs first: they wait in KVM_RUN for their INIT/SIPI.
        for vcpu in vcpus.into_iter().rev() {
            let id = vcpu.id;
            let kicker = tx.clone();
            let mut vcpu = vcpu.with_shared_watch(
                shared.clone(),
                Arc::new(move || {
                    let _ = kicker.send(VcpuMsg::KickOthers);
                }),
            );
            let (tx, stop) = (tx.clone(), self.stop.clone());
            let spawned = thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let why = vcpu.run(&stop);
                    let _ = tx.send(VcpuMsg::Stopped(why));
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => return RunExit::Error(format!("cannot start vCPU {id}: {e}")),
            }
        }
        drop(tx);
        let deadline = timeout.map(|t| Instant::now() + t);
        // A kick that lands while a vCPU is between exits is lost: kick
        // again a little later.
        let mut rekick: Option<Instant> = None;
        let waited = loop {
            if let Some(num) = stop_signal::received() {
                break Waited::Signal(num);
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                break Waited::Timeout;
            }
            // Wake at the deadline, the re-kick or the next signal poll,
            // whichever comes first.
            let mut wake = now + SIGNAL_POLL;
            for t in [deadline, rekick].into_iter().flatten() {
                wake = wake.min(t);
            }
            match rx.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(VcpuMsg::Stopped(why)) => break Waited::Vcpu(why),
                Ok(VcpuMsg::KickOthers) => {
                    for t in &threads {
                        let _ = t.kill(SIGRTMIN());
                    }
                    rekick = Some(Instant::now() + REKICK_DELAY);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if rekick.is_some_and(|r| Instant::now() >= r) {
                        for t in &threads {
                            let _ = t.kill(SIGRTMIN());
                        }
                        rekick = None;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break Waited::NoVcpu,
            }
        };
        let exit = match waited {
            Waited::Vcpu(why) => self.classify(why),
            Waited::Timeout => RunExit::Timeout,
            Waited::Signal(num) => RunExit::Signal(num),
            Waited::NoVcpu => RunExit::Error("every vCPU thread ended without a reason".into()),
        };
        self.stop.store(true, Ordering::Release);
        for t in &threads {
            let _ = t.kill(SIGRTMIN());
        }
        for t in threads {
            // Kick until the thread leaves KVM_RUN, in case a kick landed
            // before it entered.
            while !t.is_finished() {
                let _ = t.kill(SIGRTMIN());
                thread::sleep(Duration::from_millis(5));
            }
            let _ = t.join();
        }
        exit
    }

    fn classify(&self, why: VcpuStop) -> RunExit {
        if self.test_done.load(Ordering::Acquire) {
            return RunExit::TestExit(self.test_result.load(Ordering::Acquire));
        }
        if self.panicked.load(Ordering::Acquire) {
            return RunExit::GuestPanic;
        }
        if self.reset.load(Ordering::Acquire) {
            return RunExit::Reset;
        }
        if self.power_off.load(Ordering::Acquire) {
            return RunExit::PowerOff;
        }
        match why {
            VcpuStop::TripleFault => RunExit::TripleFault,
            VcpuStop::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN) => RunExit::PowerOff,
            VcpuStop::SystemEvent(_) => RunExit::Reset,
            VcpuStop::Fatal(line) => RunExit::Error(line),
            VcpuStop::Requested | VcpuStop::DeviceRequest => {
                RunExit::Error("the run ended with no reason recorded".into())
            }
        }
    }

    /// The flag that makes every vCPU leave its run loop; devices that end
    /// the run (test exit, reset, power-off) raise it.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// What a device uses to end the run with a value
    /// ([`RunExit::TestExit`]); the micro-guest harness's test-exit port is
    /// one. A production machine has no such device.
    pub fn exit_reporter(&self) -> ExitReporter {
        ExitReporter {
            result: self.test_result.clone(),
            done: self.test_done.clone(),
            stop: self.stop.clone(),
        }
    }
}

/// Ends a run with a value: [`Vm::run`] returns [`RunExit::TestExit`] with
/// it.
#[derive(Clone)]
pub struct ExitReporter {
    result: Arc<AtomicU32>,
    done: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl ExitReporter {
    /// Records `value` as the run's result and makes every vCPU leave its
    /// run loop.
    pub fn report(&self, value: u32) {
        self.result.store(value, Ordering::SeqCst);
        self.done.store(true, Ordering::SeqCst);
        self.stop.store(true, Ordering::SeqCst);
    }
}
