//! Groups, WQ queues and the engines that run descriptors.
//!
//! While the device is enabled, each group with engines has one worker
//! thread per engine. The workers of a group take descriptors from the
//! group's WQs in turn and run them; a group with one engine runs each WQ
//! strictly in order. Batches run on one engine, member by member, so a
//! Fence sees every earlier member complete. A Drain descriptor waits until
//! every earlier descriptor of its WQ (of its PASID, on a shared WQ) has
//! completed. Administrative drains and aborts wait on the same state.
//!
//! Hand-off. A descriptor submitted to an idle group (nothing queued,
//! nothing running) while no engine is polling on a core runs at once on the
//! submitting thread, as the group's engine would: waking a sleeping worker
//! costs a scheduler round trip, which on a busy host is up to a time slice,
//! far longer than most descriptors take.
//!
//! Long descriptors (ones that move many bytes) depend on how the guest
//! submits them. A guest that waits for each before it submits the next
//! gains nothing from an engine: its long descriptors run on its own thread
//! (caches warm, no hand-off) even beside a polling engine, and wake none.
//! Once a submission finds the group busy, the guest keeps several in
//! flight: for the next few long descriptors that find the group idle, an
//! engine is woken before the run and polls while it goes on, so that the
//! descriptor the guest submits next goes to it and runs beside the guest
//! (after such a run, one is woken too), and a long descriptor that finds
//! an engine of a group of several awake is offered to it first and taken
//! back after a few microseconds if the engine has not taken it. So several
//! long descriptors in flight run on several engines instead of one after
//! another on the guest's thread. Every so often a long descriptor of a
//! waiting guest is handled as if the guest kept several in flight, to see
//! whether it now does.
//!
//! A run on the submitting thread never waits for the guest:
//! where it would wait for a page (block-on-fault, with page requests
//! enabled) it stops and the descriptor goes to the group's queue, ahead of
//! anything submitted since, to start over on a worker. So a run that may
//! wait is only taken by the submitter when starting over is harmless: the
//! operation reads its sources and writes its destination the same way
//! again (see [`restartable`]). Everything else is queued. An idle worker
//! polls for new work briefly (yielding the CPU between polls, one worker per
//! group at a time, checking in as it polls) before it sleeps; work goes to
//! it only while its check-ins are recent. Queued work wakes sleeping
//! engines while it outnumbers the engines awake, so descriptors kept in
//! flight spread over the group.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::access::{Access, Cause, Path};
use crate::bits::overlaps;
use crate::completion::{CompletionRecord, Status};
use crate::descriptor::{flags, Descriptor, Opcode};
use crate::device::Inner;
use crate::dma::PasidTag;
use crate::ops::{self, fault_record, Abandoned, CheckContext};
use crate::swerr::{DescInfo, SoftwareError};
use crate::wqcfg::WqCfg;

/// How often a waiter re-checks for an abort.
const POLL: Duration = Duration::from_millis(20);
/// How long an idle engine polls for new work before it sleeps: a futex
/// wake-up costs several microseconds, more than most descriptors take.
const IDLE_SPIN: Duration = Duration::from_micros(50);
/// A polling engine that has not checked in for this long lost its core
/// (the host is busy): work is not handed to it.
const LIVE: Duration = Duration::from_micros(20);
/// After a run on the submitting thread this long (longer than a wake-up
/// costs), an engine is woken to take the next descriptor while the guest
/// goes on: descriptors submitted one after another then run side by side.
const WAKE_AFTER: Duration = Duration::from_micros(20);
/// A descriptor moving at least this many bytes is long: run on the
/// submitting thread of a guest that keeps several descriptors in flight, it
/// wakes an engine first, which is ready for the next one when the run ends.
const WAKE_AHEAD_BYTES: u32 = 256 << 10;
/// How long a long descriptor offered to an awake engine waits to be taken
/// before the submitting thread runs it itself.
const HAND_OVER: Duration = Duration::from_micros(20);
/// A submission that finds the group busy shows that the guest keeps
/// several descriptors in flight: the next this many long descriptors that
/// find the group idle still go to engines (woken ahead, offered).
const OVERLAP_CREDIT: u32 = 8;
/// A guest that waits for each long descriptor before it submits the next
/// has them run on its own thread; every this many of them, one wakes an
/// engine ahead as if the guest kept several in flight, to find out whether
/// it now does.
const PROBE_EVERY: u32 = 32;
/// The longest an engine polls while a submitting thread runs a descriptor.
const SPIN_BESIDE: Duration = Duration::from_millis(1);

/// Whether running `desc` again from the start, after a run stopped part
/// way, leaves memory and the completion record as one run would: the
/// operation does not read what it wrote.
pub fn restartable(desc: &Descriptor) -> bool {
    let len = u64::from(desc.xfer_size());
    match Opcode::from_u8(desc.opcode()) {
        Some(
            Opcode::Noop
            | Opcode::Drain
            | Opcode::Cflush
            | Opcode::Memfill
            | Opcode::Compare
            | Opcode::Compval
            | Opcode::Crcgen,
        ) => true,
        Some(Opcode::Memmove) => !overlaps(desc.src(), len, desc.dst(), len),
        _ => false,
    }
}

/// A WQ's configuration, fixed when the WQ was enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WqSnapshot {
    /// WQ index.
    pub id: u8,
    /// Dedicated mode.
    pub dedicated: bool,
    /// Block-on-fault enable.
    pub bof: bool,
    /// ATS disabled for this WQ.
    pub ats_disable: bool,
    /// PASID enable.
    pub pasid_en: bool,
    /// WQ PASID (dedicated).
    pub pasid: u32,
    /// WQ privilege (dedicated).
    pub privileged: bool,
    /// WQ size.
    pub size: u16,
    /// Maximum transfer size in bytes.
    pub max_xfer: u64,
    /// Maximum batch size.
    pub max_batch: u32,
    /// Allowed operations.
    pub op_config: [u64; 4],
}

impl WqSnapshot {
    /// The snapshot of WQ `id` with configuration `cfg`.
    pub fn new(id: u8, cfg: &WqCfg) -> Self {
        Self {
            id,
            dedicated: cfg.dedicated(),
            bof: cfg.bof(),
            ats_disable: cfg.ats_disable(),
            pasid_en: cfg.pasid_en(),
            pasid: cfg.pasid(),
            privileged: cfg.privileged(),
            size: cfg.size(),
            max_xfer: 1 << cfg.max_xfer_shift(),
            max_batch: 1 << cfg.max_batch_shift(),
            op_config: cfg.op_config(),
        }
    }

    /// The PASID prefix and privilege of descriptor `desc` from this WQ.
    pub fn tag_for(&self, desc: &Descriptor) -> (Option<PasidTag>, bool) {
        if self.dedicated {
            let tag = self.pasid_en.then_some(PasidTag {
                pasid: self.pasid,
                privileged: self.privileged,
            });
            (tag, self.pasid_en && self.privileged)
        } else {
            let tag = PasidTag {
                pasid: desc.pasid(),
                privileged: desc.privileged(),
            };
            (Some(tag), tag.privileged)
        }
    }
}

/// A descriptor waiting in a WQ.
#[derive(Clone, Copy, Debug)]
pub struct Queued {
    /// Submission order within the group.
    pub ticket: u64,
    /// The descriptor.
    pub desc: Descriptor,
    /// The PASID it runs with (for Drain/Abort PASID).
    pub pasid: Option<u32>,
    /// When it was queued.
    pub at: Instant,
}

/// One WQ of a group.
#[derive(Debug)]
pub struct WqQueue {
    /// WQ index.
    pub id: u8,
    /// Taking submissions (enabled and not being disabled).
    pub accepting: bool,
    /// The configuration while enabled.
    pub snapshot: Option<WqSnapshot>,
    /// Current threshold (writable while enabled).
    pub threshold: u16,
    /// Descriptors not yet dispatched: the WQ occupancy.
    pub queue: VecDeque<Queued>,
}

/// A descriptor an engine is running.
#[derive(Clone, Copy, Debug)]
pub struct InFlight {
    /// Its ticket.
    pub ticket: u64,
    /// Its WQ.
    pub wq: u8,
    /// Its PASID.
    pub pasid: Option<u32>,
    /// The engine running it.
    pub worker: usize,
}

/// The mutable state of a group.
#[derive(Debug, Default)]
pub struct GroupState {
    /// The group's WQs.
    pub wqs: Vec<WqQueue>,
    next_wq: usize,
    /// Next submission ticket.
    pub next_ticket: u64,
    /// Descriptors being run.
    pub in_flight: Vec<InFlight>,
    shutdown: bool,
    sleepers: usize,
    /// Workers polling for work.
    spinning: usize,
    /// Workers notified and not yet back.
    woken: usize,
    idle_waiters: usize,
    /// Long descriptors that find the group idle still handed to engines
    /// (see [`OVERLAP_CREDIT`]).
    overlap: u32,
    /// Long descriptors run on the submitting thread since the last probe
    /// (see [`PROBE_EVERY`]).
    solo: u32,
}

impl GroupState {
    /// Whether any queued or running descriptor older than `ticket`
    /// matches `pred(wq, pasid)`.
    pub fn pending(&self, ticket: u64, pred: impl Fn(u8, Option<u32>) -> bool) -> bool {
        self.in_flight
            .iter()
            .any(|f| f.ticket < ticket && pred(f.wq, f.pasid))
            || self.wqs.iter().any(|q| {
                q.queue
                    .iter()
                    .any(|item| item.ticket < ticket && pred(q.id, item.pasid))
            })
    }

    /// The engines were asked to exit.
    pub fn stopped(&self) -> bool {
        self.shutdown
    }

    /// Nothing queued and nothing running.
    fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.wqs.iter().all(|q| q.queue.is_empty())
    }

    fn pick(&mut self) -> Option<(Queued, WqSnapshot)> {
        let n = self.wqs.len();
        for i in 0..n {
            let slot = (self.next_wq + i) % n;
            let q = &mut self.wqs[slot];
            if let (Some(snapshot), Some(item)) = (q.snapshot, q.queue.front().copied()) {
                q.queue.pop_front();
                self.next_wq = (slot + 1) % n;
                return Some((item, snapshot));
            }
        }
        None
    }
}

/// A group of WQs and engines.
pub struct Group {
    state: Mutex<GroupState>,
    work: Condvar,
    idle: Condvar,
    /// Abort flags for the descriptor being run: one per engine thread,
    /// then one per submitter running a descriptor itself.
    cancel: Vec<AtomicBool>,
    engines: usize,
    /// Descriptors queued in all WQs of the group (read without the lock
    /// by idle engines).
    queued: AtomicUsize,
    /// Descriptors running on submitting threads that may be followed by
    /// more soon (read without the lock by the polling engine, which goes on
    /// polling while one runs): not long ones of a guest that waits for each.
    running_here: AtomicUsize,
    /// When the polling engine last checked in, in nanoseconds since `epoch`.
    heartbeat: AtomicU64,
    epoch: Instant,
}

impl Group {
    /// A group with `wqs` (indexes) and `engines` engines.
    pub fn new(id: usize, wqs: &[u8], engines: usize) -> Self {
        let state = GroupState {
            wqs: wqs
                .iter()
                .map(|&id| WqQueue {
                    id,
                    accepting: false,
                    snapshot: None,
                    threshold: 0,
                    queue: VecDeque::new(),
                })
                .collect(),
            ..GroupState::default()
        };
        log::debug!("DSA group {id}: WQs {wqs:?}, {engines} engines");
        Self {
            state: Mutex::new(state),
            work: Condvar::new(),
            idle: Condvar::new(),
            cancel: (0..2 * engines).map(|_| AtomicBool::new(false)).collect(),
            engines,
            queued: AtomicUsize::new(0),
            running_here: AtomicUsize::new(0),
            heartbeat: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// Locks the group state.
    pub fn lock(&self) -> MutexGuard<'_, GroupState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The number of engines.
    pub fn engines(&self) -> usize {
        self.engines
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether an engine is polling for work and running right now.
    fn engine_ready(&self, state: &GroupState) -> bool {
        state.spinning > 0
            && self
                .now()
                .saturating_sub(self.heartbeat.load(Ordering::SeqCst))
                < LIVE.as_nanos() as u64
    }

    /// Wakes a sleeping engine unless engines awake or on their way are
    /// enough for the queued descriptors (and at least one).
    fn wake_one(&self, state: &mut GroupState) {
        let queued = self.queued.load(Ordering::SeqCst).max(1);
        if state.sleepers > state.woken && queued > state.spinning + state.woken {
            state.woken += 1;
            self.work.notify_one();
        }
    }

    /// Accepts `desc` on WQ slot `slot` (whose configuration is `wq`): runs
    /// it on this thread when the group is idle and may (see the module
    /// documentation), queues it for an engine otherwise.
    pub(crate) fn submit<'a>(
        &'a self,
        inner: &Inner,
        mut state: MutexGuard<'a, GroupState>,
        slot: usize,
        wq: WqSnapshot,
        desc: Descriptor,
        pasid: Option<u32>,
    ) {
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        // Stamped when it is queued: one that runs here needs no clock.
        let queued = |at| Queued {
            ticket,
            desc,
            pasid,
            at,
        };
        let long = Opcode::from_u8(desc.opcode()) != Some(Opcode::Batch)
            && desc.xfer_size() >= WAKE_AHEAD_BYTES;
        // Whether long descriptors go to engines: the guest keeps several in
        // flight (or this one probes whether it does). Otherwise a long one
        // runs here even beside a polling engine: handing it over costs the
        // waiting guest a hand-off and gains nothing.
        let spread = long && {
            if !state.idle() {
                state.overlap = OVERLAP_CREDIT;
            }
            if state.overlap > 0 {
                state.overlap -= 1;
                true
            } else {
                state.solo += 1;
                if state.solo >= PROBE_EVERY {
                    state.solo = 0;
                    // The next long one goes to the engine woken ahead.
                    state.overlap = 1;
                    true
                } else {
                    false
                }
            }
        };
        let runs_here = state.idle()
            && (!self.engine_ready(&state) || (long && !spread))
            && (!inner.pcie.page_requests() || restartable(&desc));
        if runs_here && spread && self.engines > 1 && (state.spinning > 0 || state.woken > 0) {
            // An engine is awake (woken ahead by the last long run): offer
            // the descriptor to it, so that the guest goes on and may keep
            // several in flight; take it back if the engine does not take
            // it soon (it lost its core).
            let offered = Instant::now();
            state.wqs[slot].queue.push_back(queued(offered));
            self.queued.fetch_add(1, Ordering::SeqCst);
            self.wake_one(&mut state);
            drop(state);
            loop {
                std::thread::yield_now();
                let mut again = self.lock();
                let queue = &mut again.wqs[slot].queue;
                match queue.iter().position(|q| q.ticket == ticket) {
                    // Taken (or aborted).
                    None => return,
                    Some(at) if offered.elapsed() >= HAND_OVER => {
                        queue.remove(at);
                        self.queued.fetch_sub(1, Ordering::SeqCst);
                        state = again;
                        break;
                    }
                    Some(_) => {}
                }
            }
        }
        // A cancel slot of its own, past the engines'.
        let free = (self.engines..2 * self.engines)
            .find(|&w| state.in_flight.iter().all(|f| f.worker != w));
        let (true, Some(worker)) = (runs_here, free) else {
            state.wqs[slot].queue.push_back(queued(Instant::now()));
            self.queued.fetch_add(1, Ordering::SeqCst);
            self.wake_one(&mut state);
            return;
        };
        state.in_flight.push(InFlight {
            ticket,
            wq: wq.id,
            pasid,
            worker,
        });
        self.cancel[worker].store(false, Ordering::SeqCst);
        // A long run of a guest that waits for it has no engine beside it.
        let beside = !long || spread;
        if beside {
            self.running_here.fetch_add(1, Ordering::SeqCst);
        }
        if spread {
            self.wake_one(&mut state);
        }
        drop(state);
        let deferred = AtomicBool::new(false);
        let started = Instant::now();
        let (tag, privileged) = wq.tag_for(&desc);
        let abandoned = Submission {
            inner,
            group: self,
            worker,
            wq,
            ticket,
            tag,
            privileged,
            defer: Some(&deferred),
        }
        .process(&desc)
        .is_none();
        let ran = started.elapsed();
        if beside {
            self.running_here.fetch_sub(1, Ordering::SeqCst);
        }
        log::trace!(
            "WQ {}: descriptor {ticket} (opcode {:#x}, {} bytes) ran on the submitter in {ran:?}{}",
            wq.id,
            desc.opcode(),
            desc.xfer_size(),
            if deferred.load(Ordering::SeqCst) {
                ", stopped for a page"
            } else {
                ""
            }
        );
        let mut state = self.lock();
        state.in_flight.retain(|f| f.ticket != ticket);
        if abandoned
            && deferred.load(Ordering::SeqCst)
            && !self.cancel[worker].load(Ordering::SeqCst)
            && !state.shutdown
        {
            // Earlier than anything queued since: first in line.
            state.wqs[slot].queue.push_front(queued(started));
            self.queued.fetch_add(1, Ordering::SeqCst);
        }
        if !state.idle() || (ran > WAKE_AFTER && (!long || state.overlap > 0)) {
            self.wake_one(&mut state);
        }
        let wake = state.idle_waiters > 0;
        drop(state);
        if wake {
            self.idle.notify_all();
        }
    }

    /// Waits until `done(state)` holds or `cancel` is set; returns whether
    /// the condition held.
    pub fn wait_until(
        &self,
        cancel: Option<&AtomicBool>,
        mut done: impl FnMut(&GroupState) -> bool,
    ) -> bool {
        let mut state = self.lock();
        loop {
            if done(&state) {
                return true;
            }
            if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
                return false;
            }
            state.idle_waiters += 1;
            state = self
                .idle
                .wait_timeout(state, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            state.idle_waiters -= 1;
        }
    }

    /// Abandons queued descriptors matching `pred(wq, pasid)` and flags
    /// running ones to stop at their next wait; returns the ticket limit
    /// to wait for.
    pub fn abort(&self, pred: impl Fn(u8, Option<u32>) -> bool) -> u64 {
        let mut state = self.lock();
        for q in state.wqs.iter_mut() {
            let id = q.id;
            let before = q.queue.len();
            q.queue.retain(|item| !pred(id, item.pasid));
            self.queued
                .fetch_sub(before - q.queue.len(), Ordering::SeqCst);
        }
        for f in &state.in_flight {
            if pred(f.wq, f.pasid) {
                self.cancel[f.worker].store(true, Ordering::SeqCst);
            }
        }
        state.next_ticket
    }

    /// Asks the engines to exit once their queues are empty.
    pub fn shut_down(&self) {
        self.lock().shutdown = true;
        self.work.notify_all();
    }

    /// The engine loop.
    pub(crate) fn run_engine(inner: Arc<Inner>, group: Arc<Group>, worker: usize) {
        let mut spun = false;
        loop {
            let (item, wq) = {
                let mut state = group.lock();
                loop {
                    if let Some((item, wq)) = state.pick() {
                        group.queued.fetch_sub(1, Ordering::SeqCst);
                        // In flight before the lock drops, so drains never
                        // miss it.
                        state.in_flight.push(InFlight {
                            ticket: item.ticket,
                            wq: wq.id,
                            pasid: item.pasid,
                            worker,
                        });
                        group.cancel[worker].store(false, Ordering::SeqCst);
                        break (item, wq);
                    }
                    if state.shutdown {
                        return;
                    }
                    if !spun && state.spinning == 0 {
                        // One engine of the group polls; yielding lets the
                        // submitting vCPU have the core.
                        state.spinning += 1;
                        group.heartbeat.store(group.now(), Ordering::SeqCst);
                        drop(state);
                        let start = Instant::now();
                        let mut last_busy = start;
                        while group.queued.load(Ordering::SeqCst) == 0 {
                            let now = Instant::now();
                            // While a submitting thread runs a descriptor,
                            // the guest may be about to submit the next.
                            if group.running_here.load(Ordering::SeqCst) > 0
                                && now - start < SPIN_BESIDE
                            {
                                last_busy = now;
                            } else if now - last_busy >= IDLE_SPIN {
                                break;
                            }
                            std::thread::yield_now();
                            group.heartbeat.store(group.now(), Ordering::SeqCst);
                        }
                        spun = true;
                        state = group.lock();
                        state.spinning -= 1;
                        continue;
                    }
                    spun = false;
                    state.sleepers += 1;
                    state = group.work.wait(state).unwrap_or_else(|e| e.into_inner());
                    state.sleepers -= 1;
                    state.woken = state.woken.saturating_sub(1);
                }
            };
            spun = false;
            let waited = item.at.elapsed();
            let (tag, privileged) = wq.tag_for(&item.desc);
            let submission = Submission {
                inner: &inner,
                group: &group,
                worker,
                wq,
                ticket: item.ticket,
                tag,
                privileged,
                defer: None,
            };
            submission.process(&item.desc);
            log::trace!(
                "WQ {}: descriptor {} (opcode {:#x}, {} bytes) waited {waited:?} for engine {worker}, \
                 ran in {:?}",
                wq.id,
                item.ticket,
                item.desc.opcode(),
                item.desc.xfer_size(),
                item.at.elapsed() - waited
            );
            let mut state = group.lock();
            state.in_flight.retain(|f| f.ticket != item.ticket);
            let wake = state.idle_waiters > 0;
            drop(state);
            if wake {
                group.idle.notify_all();
            }
        }
    }
}

/// One descriptor (and, for a batch, its members) being run.
struct Submission<'a> {
    inner: &'a Inner,
    group: &'a Group,
    worker: usize,
    wq: WqSnapshot,
    ticket: u64,
    tag: Option<PasidTag>,
    privileged: bool,
    /// Set where a run on the submitting thread would wait for a page.
    defer: Option<&'a AtomicBool>,
}

impl Submission<'_> {
    fn cancel(&self) -> &AtomicBool {
        &self.group.cancel[self.worker]
    }

    fn access(&self, block_on_fault: bool) -> Access<'_> {
        let pcie = &self.inner.pcie;
        Access {
            path: Path {
                port: &*self.inner.dma,
                atc: &self.inner.atc,
                prs: &self.inner.prs,
                pri_allocation: pcie.pri_alloc.load(Ordering::SeqCst),
            },
            tag: self.tag,
            ats: crate::config_space::PcieState::get(&pcie.ats) && !self.wq.ats_disable,
            block_on_fault: block_on_fault && pcie.page_requests(),
            cancel: self.cancel(),
            defer: self.defer,
        }
    }

    fn info(&self, desc: &Descriptor, batch_index: Option<u16>) -> DescInfo {
        DescInfo {
            operation: desc.opcode(),
            pasid: self.tag.map_or(0, |t| t.pasid),
            privileged: self.privileged,
            batch_index,
        }
    }

    fn software_error(
        &self,
        code: Status,
        info: DescInfo,
        fault: Option<(u64, bool)>,
        extra: Option<u32>,
    ) {
        self.inner.record_software_error(&SoftwareError {
            code: code as u8,
            wq: Some(self.wq.id),
            desc: Some(info),
            fault,
            info: extra,
        });
    }

    /// A descriptor taken from the WQ; `None` if abandoned.
    fn process(&self, desc: &Descriptor) -> Option<()> {
        if !self.wq.dedicated {
            // Trusted fields of a shared-WQ submission.
            if desc.privileged()
                && !crate::config_space::PcieState::get(&self.inner.pcie.pasid_priv)
            {
                self.software_error(Status::PrivBad, self.info(desc, None), None, None);
                return Some(());
            }
            if desc.trusted_reserved() != 0 {
                let record = CompletionRecord::new(Status::NonzeroReserve);
                return self
                    .deliver(desc, &record, true, self.info(desc, None))
                    .map(drop);
            }
        }
        self.run(desc, None).map(drop)
    }

    /// Checks, runs and completes one descriptor; `None` if abandoned.
    fn run(&self, desc: &Descriptor, batch_index: Option<u16>) -> Option<Status> {
        let info = self.info(desc, batch_index);
        if desc.has(flags::CRAV) && desc.completion_addr() & 31 != 0 {
            self.software_error(Status::CraAlign, info, None, None);
            return Some(Status::CraAlign);
        }
        let pasid_en = self.wq.pasid_en || !self.wq.dedicated;
        let ctx = CheckContext {
            caps: &self.inner.caps,
            in_batch: batch_index.is_some(),
            wq_bof: self.wq.bof,
            wq_pasid_en: pasid_en,
            privileged: self.privileged,
            user_int_en: self.inner.user_interrupts(),
            max_xfer: self.wq.max_xfer,
            max_batch: self.wq.max_batch,
            op_config: self.wq.op_config,
            int_handle_ok: !desc.has(flags::RCI)
                || self.inner.interrupt_handle_ok(
                    desc.int_handle(),
                    pasid_en,
                    self.tag.map(|t| t.pasid),
                ),
        };
        let (record, interrupt) = match ops::check(desc, &ctx) {
            Err(rejection) => (
                rejection.record(),
                rejection.status != Status::IntHandleInval,
            ),
            Ok(Opcode::Batch) => (self.batch(desc).ok()?, true),
            Ok(Opcode::Drain) => {
                if !self.drain() {
                    return None;
                }
                (CompletionRecord::new(Status::Success), true)
            }
            Ok(op) => {
                let data = self.access(desc.has(flags::BOF));
                (ops::execute(op, desc, &data).ok()?, true)
            }
        };
        self.deliver(desc, &record, interrupt, info)
    }

    /// Waits for earlier descriptors of the WQ (of the same PASID on a
    /// shared WQ); false if aborted.
    fn drain(&self) -> bool {
        let (wq, ticket) = (self.wq.id, self.ticket);
        let pasid = (!self.wq.dedicated)
            .then(|| self.tag.map(|t| t.pasid))
            .flatten();
        self.group.wait_until(Some(self.cancel()), |state| {
            !state
                .in_flight
                .iter()
                .any(|f| f.ticket < ticket && f.wq == wq && (pasid.is_none() || f.pasid == pasid))
        })
    }

    fn batch(&self, desc: &Descriptor) -> Result<CompletionRecord, Abandoned> {
        let count = desc.xfer_size();
        let list = self.access(true);
        let mut processed = 0u32;
        let mut failed = false;
        for index in 0..count {
            let mut bytes = [0u8; 64];
            let at = desc.src().wrapping_add(u64::from(index) * 64);
            if let Err(fault) = list.read(at, &mut bytes) {
                let mut record = fault_record(fault, processed as usize)?;
                if matches!(fault.cause, Cause::PageFault | Cause::PageRequestInvalid) {
                    record.status = Status::BatchPageFault;
                }
                return Ok(record);
            }
            let member = Descriptor(bytes);
            if member.has(flags::FENCE) && failed {
                // Abandon the fenced member and everything after it.
                break;
            }
            if self.cancel().load(Ordering::SeqCst) {
                return Err(Abandoned);
            }
            let status = self.run(&member, Some(index as u16)).ok_or(Abandoned)?;
            failed |= status != Status::Success;
            processed += 1;
        }
        let mut record = CompletionRecord::new(if failed {
            Status::BatchFail
        } else {
            Status::Success
        });
        record.bytes_completed = processed;
        Ok(record)
    }

    /// Writes the completion record (status byte last), reports errors that
    /// have no record in SWERROR, and raises the completion interrupt;
    /// `None` if abandoned while writing the record.
    fn deliver(
        &self,
        desc: &Descriptor,
        record: &CompletionRecord,
        interrupt: bool,
        info: DescInfo,
    ) -> Option<Status> {
        let status = record.status;
        let fault = status
            .is_fault()
            .then_some((record.fault_addr, record.fault_write));
        let invalid_flags = (status == Status::InvalidFlags).then(|| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&record.op_specific[..4]);
            u32::from_le_bytes(b)
        });
        if desc.has(flags::CRAV) {
            if desc.has(flags::RCR) || !status.is_quiet() {
                let bytes = record.to_bytes();
                let target = desc.completion_addr();
                let cr = self.access(true);
                let written = cr.write(target + 1, &bytes[1..]).and_then(|()| {
                    std::sync::atomic::fence(Ordering::Release);
                    cr.write(target, &bytes[..1])
                });
                if let Err(fault) = written {
                    if fault.cause == Cause::Aborted {
                        return None;
                    }
                    self.software_error(Status::CraXlat, info, Some((target, true)), None);
                    return Some(Status::CraXlat);
                }
            }
            if status == Status::IntHandleInval {
                self.software_error(status, info, None, Some(u32::from(desc.int_handle())));
            }
        } else if !status.is_quiet() {
            let extra = invalid_flags
                .or((status == Status::IntHandleInval).then(|| u32::from(desc.int_handle())));
            self.software_error(status, info, fault, extra);
        }
        if interrupt && desc.has(flags::RCI) {
            self.inner.completion_interrupt(desc.int_handle());
        }
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memmove(src: u64, dst: u64, len: u32) -> Descriptor {
        let mut d = Descriptor::new(Opcode::Memmove, flags::BOF);
        d.set_src(src).set_dst(dst).set_xfer_size(len);
        d
    }

    #[test]
    fn only_operations_that_never_read_their_output_start_over() {
        assert!(restartable(&memmove(0x1000, 0x3000, 0x2000)));
        assert!(!restartable(&memmove(0x1000, 0x2000, 0x2000)));
        assert!(!restartable(&memmove(0x2000, 0x1000, 0x2000)));
        assert!(restartable(&Descriptor::new(Opcode::Noop, 0)));
        assert!(restartable(&Descriptor::new(Opcode::Memfill, 0)));
        assert!(!restartable(&Descriptor::new(Opcode::Batch, 0)));
        assert!(!restartable(&Descriptor::new(Opcode::ApDelta, 0)));
        assert!(!restartable(&Descriptor::new(Opcode::Dualcast, 0)));
        let mut unknown = Descriptor::new(Opcode::Noop, 0);
        unknown.0[7] = 0x7f;
        assert!(!restartable(&unknown));
    }
}
