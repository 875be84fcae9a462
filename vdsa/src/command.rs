//! Administrative commands (CMD 0xa0 / CMDSTS 0xa8; DSA specification
//! §3.15, §5.1-5.2, §9.2.12-13, Table 5-8).
//!
//! Commands run on their own thread: a write to CMD sets CMDSTS.Active and
//! queues the command; when it finishes, CMDSTS gets the error code and
//! result, and with int_req INTCAUSE.CMD is set and MSI-X vector 0 fires.
//! Drains and disables may wait a long time (for page responses, for big
//! transfers) without holding up the vCPU that wrote the command.

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;

use crate::config_space::{PcieState, PRI_CAPACITY};
use crate::device::{Inner, RegFile, Route};
use crate::engine::{Group, WqSnapshot};
use crate::regs::{intcause, CmdReg, CmdSts, DeviceState};
use crate::wqcfg::WqState;

/// Command codes.
pub mod code {
    /// Enable Device.
    pub const ENABLE_DEVICE: u32 = 1;
    /// Disable Device.
    pub const DISABLE_DEVICE: u32 = 2;
    /// Drain All.
    pub const DRAIN_ALL: u32 = 3;
    /// Abort All.
    pub const ABORT_ALL: u32 = 4;
    /// Reset Device.
    pub const RESET_DEVICE: u32 = 5;
    /// Enable WQ (operand: WQ index).
    pub const ENABLE_WQ: u32 = 6;
    /// Disable WQ (operand: 16-WQ group in 19:16, bitmap in 15:0).
    pub const DISABLE_WQ: u32 = 7;
    /// Drain WQ.
    pub const DRAIN_WQ: u32 = 8;
    /// Abort WQ.
    pub const ABORT_WQ: u32 = 9;
    /// Reset WQ.
    pub const RESET_WQ: u32 = 10;
    /// Drain PASID (operand: PASID).
    pub const DRAIN_PASID: u32 = 11;
    /// Abort PASID.
    pub const ABORT_PASID: u32 = 12;
    /// Request Interrupt Handle (operand: 16 IMS, 15:0 index).
    pub const REQUEST_INT_HANDLE: u32 = 13;
    /// Release Interrupt Handle.
    pub const RELEASE_INT_HANDLE: u32 = 14;
}

/// CMDSTS error codes.
pub mod status {
    /// Success.
    pub const SUCCESS: u32 = 0x00;
    /// Undefined or unsupported command.
    pub const INVAL_CMD: u32 = 0x01;
    /// Invalid WQ index.
    pub const INVAL_WQIDX: u32 = 0x02;
    /// Hardware error.
    pub const HW_ERR: u32 = 0x03;
    /// Command submitted while the device is halted.
    pub const HALTED: u32 = 0x05;
    /// Enable Device: the device is not disabled.
    pub const DEV_ENABLED: u32 = 0x10;
    /// Enable Device: unspecified configuration error.
    pub const CONFIG: u32 = 0x11;
    /// Enable Device: bus master enable is 0.
    pub const BUSMASTER_EN: u32 = 0x12;
    /// Enable Device: unsupported PRI allocation (Linux: PASID_INVAL).
    pub const PRI_ALLOCATION: u32 = 0x13;
    /// Enable Device: WQ sizes exceed the total.
    pub const WQ_SIZE_ERANGE: u32 = 0x14;
    /// Enable Device: a group has WQs without engines or the reverse.
    pub const GRP_CONFIG: u32 = 0x15;
    /// Enable Device: bad WQ membership.
    pub const GRP_CONFIG2: u32 = 0x16;
    /// Enable Device: bad engine membership.
    pub const GRP_CONFIG3: u32 = 0x17;
    /// Enable WQ: the device is not enabled.
    pub const DEV_NOTEN: u32 = 0x20;
    /// Enable WQ: the WQ is not disabled.
    pub const WQ_ENABLED: u32 = 0x21;
    /// Enable WQ: size 0.
    pub const WQ_SIZE: u32 = 0x22;
    /// Enable WQ: unsupported mode.
    pub const WQ_MODE: u32 = 0x24;
    /// Enable WQ: block on fault without support or PRI.
    pub const BOF_EN: u32 = 0x25;
    /// Enable WQ: bad PASID enable.
    pub const PASID_EN: u32 = 0x26;
    /// Enable WQ: bad maximum batch size.
    pub const MAX_BATCH_SIZE: u32 = 0x27;
    /// Enable WQ: bad maximum transfer size.
    pub const MAX_XFER_SIZE: u32 = 0x28;
    /// Enable WQ: privileged dedicated WQ without PASID privileged mode.
    pub const WQ_PRIV: u32 = 0x2a;
    /// Enable WQ: OPCFG has operations OPCAP lacks.
    pub const OP_CONFIG: u32 = 0x2d;
    /// Disable Device: the device is not enabled.
    pub const DIS_DEV_EN: u32 = 0x31;
    /// Disable/Drain/Abort WQ: a WQ is not enabled.
    pub const WQ_NOT_EN: u32 = 0x32;
    /// Interrupt handle: invalid table index.
    pub const INVAL_INT_IDX: u32 = 0x41;
    /// Interrupt handle: none available.
    pub const NO_HANDLE: u32 = 0x42;
}

/// Interrupt handle operand bit 16: IMS rather than MSI-X.
const INT_HANDLE_IMS: u32 = 1 << 16;

/// The command thread.
pub(crate) fn run(inner: Arc<Inner>, commands: Receiver<CmdReg>) {
    while let Ok(cmd) = commands.recv() {
        let (err, result) = inner.execute(cmd);
        log::debug!(
            "DSA command {:#x} operand {:#x}: status {err:#x}",
            cmd.cmd(),
            cmd.operand()
        );
        let mut regs = inner.regs();
        let mut sts = CmdSts(0);
        sts.set_err(err).set_result(result);
        regs.cmdsts = sts;
        if cmd.int_req() == 1 {
            inner.raise_misc(&mut regs, intcause::CMD);
        }
    }
}

type Outcome = (u32, u32);
const OK: Outcome = (status::SUCCESS, 0);

impl Inner {
    fn execute(&self, cmd: CmdReg) -> Outcome {
        let operand = cmd.operand();
        if self.regs().state() == DeviceState::Halted && cmd.cmd() != code::RESET_DEVICE {
            return (status::HALTED, 0);
        }
        let handles = self.config.interrupt_handles;
        match cmd.cmd() {
            code::ENABLE_DEVICE => self.enable_device(),
            code::DISABLE_DEVICE => self.disable_device(),
            code::DRAIN_ALL => self.drain_where(|_, _| true),
            code::ABORT_ALL => self.abort_where(|_, _| true),
            code::RESET_DEVICE => self.reset_device(),
            code::ENABLE_WQ => self.enable_wq(operand),
            code::DISABLE_WQ => self.wq_command(operand, WqCommand::Disable),
            code::DRAIN_WQ => self.wq_command(operand, WqCommand::Drain),
            code::ABORT_WQ => self.wq_command(operand, WqCommand::Abort),
            code::RESET_WQ => self.wq_command(operand, WqCommand::Reset),
            // Work of the guest PASID `operand`, whatever host PASID it runs
            // with; nothing is allocated for a PASID the device never saw.
            code::DRAIN_PASID => {
                let pasids = &self.pasids;
                self.drain_where(|_, pasid| pasid.and_then(|h| pasids.to_guest(h)) == Some(operand))
            }
            code::ABORT_PASID => {
                let pasids = &self.pasids;
                self.abort_where(|_, pasid| pasid.and_then(|h| pasids.to_guest(h)) == Some(operand))
            }
            code::REQUEST_INT_HANDLE if handles => self.interrupt_handle(operand, true),
            code::RELEASE_INT_HANDLE if handles => self.interrupt_handle(operand, false),
            _ => (status::INVAL_CMD, 0),
        }
    }

    /// Whether host PASID `pasid` is still in use by the device: a queued
    /// or running descriptor carries it, or an enabled WQ's configuration
    /// names it (a dedicated WQ tags every descriptor with it).
    pub(crate) fn pasid_in_use(&self, pasid: u32) -> bool {
        self.groups().iter().any(|group| {
            let state = group.lock();
            state.pending(u64::MAX, |_, p| p == Some(pasid))
                || state.wqs.iter().any(|q| {
                    q.snapshot
                        .is_some_and(|s| s.dedicated && s.pasid_en && s.pasid == pasid)
                })
        })
    }

    fn groups(&self) -> Vec<Arc<Group>> {
        self.runtime
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .groups
            .clone()
    }

    fn route(&self, wq: usize) -> Option<(Arc<Group>, usize)> {
        self.routes.read().unwrap_or_else(|e| e.into_inner())[wq]
            .as_ref()
            .map(|r| (r.group.clone(), r.slot))
    }

    /// Waits for every queued or running descriptor submitted so far that
    /// matches `pred(wq, pasid)`.
    fn drain_where(&self, pred: impl Fn(u8, Option<u32>) -> bool + Copy) -> Outcome {
        for group in self.groups() {
            let limit = group.lock().next_ticket;
            group.wait_until(None, |state| !state.pending(limit, pred));
        }
        OK
    }

    /// Abandons queued and running descriptors matching `pred` and waits
    /// for the running ones to stop.
    fn abort_where(&self, pred: impl Fn(u8, Option<u32>) -> bool + Copy) -> Outcome {
        let groups = self.groups();
        let limits: Vec<u64> = groups.iter().map(|g| g.abort(pred)).collect();
        self.prs.wake();
        for (group, limit) in groups.iter().zip(limits) {
            group.wait_until(None, |state| !state.pending(limit, pred));
        }
        OK
    }

    fn enable_device(&self) -> Outcome {
        let mut regs = self.regs();
        if regs.state() != DeviceState::Disabled {
            return (status::DEV_ENABLED, 0);
        }
        if !PcieState::get(&self.pcie.bus_master) {
            return (status::BUSMASTER_EN, 0);
        }
        let alloc = self.pcie.pri_alloc.load(Ordering::SeqCst);
        if PcieState::get(&self.pcie.pri) && (alloc == 0 || alloc > PRI_CAPACITY) {
            return (status::PRI_ALLOCATION, 0);
        }
        let total: u32 = regs.wqcfg.iter().map(|c| u32::from(c.size())).sum();
        if total > u32::from(self.config.total_wq_size) {
            return (status::WQ_SIZE_ERANGE, 0);
        }
        let num_wqs = usize::from(self.config.num_wqs);
        let engine_bits = crate::bits::mask::<u64>(u32::from(self.config.num_engines));
        let mut engine_seen = 0u64;
        for g in &regs.grpcfg {
            if g.any_wq() != (g.engines != 0) {
                return (status::GRP_CONFIG, 0);
            }
            let beyond = (num_wqs..256).any(|wq| g.has_wq(wq));
            if beyond {
                return (status::GRP_CONFIG2, 0);
            }
            if g.engines & !engine_bits != 0 || g.engines & engine_seen != 0 {
                return (status::GRP_CONFIG3, 0);
            }
            engine_seen |= g.engines;
        }
        if let Err(code) = check_read_buffers(&regs, self.caps.grpcap.total_rdbufs()) {
            return (code, 0);
        }
        for (wq, cfg) in regs.wqcfg.iter().enumerate() {
            let groups = regs.grpcfg.iter().filter(|g| g.has_wq(wq)).count();
            let expected = usize::from(cfg.size() > 0);
            if groups != expected {
                return (status::GRP_CONFIG2, 0);
            }
        }

        let mut runtime = self.runtime.lock().unwrap_or_else(|e| e.into_inner());
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        for (id, g) in regs.grpcfg.iter().enumerate() {
            if g.engines == 0 {
                continue;
            }
            let wqs: Vec<u8> = (0..num_wqs)
                .filter(|&wq| g.has_wq(wq))
                .map(|wq| wq as u8)
                .collect();
            let group = Arc::new(Group::new(id, &wqs, g.engines.count_ones() as usize));
            for (slot, &wq) in wqs.iter().enumerate() {
                routes[usize::from(wq)] = Some(Route {
                    group: group.clone(),
                    slot,
                });
            }
            for worker in 0..group.engines() {
                let (inner, group) = (self.self_arc(), group.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("dsa-engine{id}.{worker}"))
                    .spawn(move || Group::run_engine(inner, group, worker));
                match spawned {
                    Ok(thread) => runtime.threads.push(thread),
                    Err(e) => {
                        log::error!("DSA: cannot start an engine thread: {e}");
                        drop((runtime, routes, regs));
                        self.stop_engines(true);
                        return (status::HW_ERR, 0);
                    }
                }
            }
            runtime.groups.push(group);
        }
        self.user_int_en
            .store(regs.gencfg.user_int_en() == 1, Ordering::SeqCst);
        regs.set_state(DeviceState::Enabled);
        OK
    }

    fn disable_device(&self) -> Outcome {
        {
            let mut regs = self.regs();
            if regs.state() != DeviceState::Enabled {
                return (status::DIS_DEV_EN, 0);
            }
            regs.set_state(DeviceState::Draining);
            for state in regs.wq_state.iter_mut().filter(|s| **s == WqState::Enabled) {
                *state = WqState::Disabling;
            }
        }
        for group in self.groups() {
            group
                .lock()
                .wqs
                .iter_mut()
                .for_each(|q| q.accepting = false);
            group.wait_until(None, |state| !state.pending(u64::MAX, |_, _| true));
        }
        self.stop_engines(false);
        let mut regs = self.regs();
        regs.wq_state
            .iter_mut()
            .for_each(|s| *s = WqState::Disabled);
        regs.set_state(DeviceState::Disabled);
        OK
    }

    fn reset_device(&self) -> Outcome {
        self.regs().set_state(DeviceState::Draining);
        self.stop_engines(true);
        let mut regs = self.regs();
        regs.reset(&self.config, &self.caps);
        for perm in &self.msix_perm {
            perm.store(0, Ordering::SeqCst);
        }
        for handle in &self.int_handles {
            handle.store(false, Ordering::SeqCst);
        }
        self.user_int_en.store(false, Ordering::SeqCst);
        self.atc.clear();
        OK
    }

    /// Stops the engine threads: after their queues drain, or at once,
    /// abandoning queued descriptors, when `abort`.
    pub(crate) fn stop_engines(&self, abort: bool) {
        let runtime = std::mem::take(&mut *self.runtime.lock().unwrap_or_else(|e| e.into_inner()));
        self.routes
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .iter_mut()
            .for_each(|r| *r = None);
        for group in &runtime.groups {
            group
                .lock()
                .wqs
                .iter_mut()
                .for_each(|q| q.accepting = false);
            if abort {
                group.abort(|_, _| true);
            }
            group.shut_down();
        }
        self.prs.wake();
        for thread in runtime.threads {
            if thread.join().is_err() {
                log::error!("DSA: an engine thread panicked");
            }
        }
        // Descriptors a submitter was running on its own thread.
        for group in &runtime.groups {
            group.wait_until(None, |state| state.in_flight.is_empty());
        }
    }

    fn enable_wq(&self, operand: u32) -> Outcome {
        let mut regs = self.regs();
        if regs.state() != DeviceState::Enabled {
            return (status::DEV_NOTEN, 0);
        }
        let wq = (operand & 0xff) as usize;
        if wq >= regs.wqcfg.len() {
            return (status::INVAL_WQIDX, 0);
        }
        if regs.wq_state[wq] != WqState::Disabled {
            return (status::WQ_ENABLED, 0);
        }
        let cfg = regs.wqcfg[wq];
        let gencap = self.caps.gencap;
        let pcie = &self.pcie;
        let opcap = self.caps.opcap;
        let checks = [
            (cfg.size() == 0, status::WQ_SIZE),
            (
                (cfg.dedicated() && self.caps.wqcap.dedicated_mode() == 0)
                    || (!cfg.dedicated() && self.caps.wqcap.shared_mode() == 0),
                status::WQ_MODE,
            ),
            (
                cfg.bof() && (gencap.block_on_fault() == 0 || !PcieState::get(&pcie.pri)),
                status::BOF_EN,
            ),
            (
                (!cfg.dedicated() && !cfg.pasid_en())
                    || (cfg.pasid_en() && !PcieState::get(&pcie.pasid)),
                status::PASID_EN,
            ),
            (
                cfg.max_batch_shift() == 0
                    || u64::from(cfg.max_batch_shift()) > gencap.max_batch_shift(),
                status::MAX_BATCH_SIZE,
            ),
            (
                u64::from(cfg.max_xfer_shift()) > gencap.max_xfer_shift(),
                status::MAX_XFER_SIZE,
            ),
            (
                cfg.dedicated()
                    && cfg.pasid_en()
                    && cfg.privileged()
                    && !PcieState::get(&pcie.pasid_priv),
                status::WQ_PRIV,
            ),
            (
                cfg.op_config().iter().zip(opcap).any(|(c, o)| c & !o != 0),
                status::OP_CONFIG,
            ),
        ];
        if let Some((_, err)) = checks.iter().find(|(failed, _)| *failed) {
            return (*err, 0);
        }
        let Some((group, slot)) = self.route(wq) else {
            return (status::CONFIG, 0);
        };
        // The WQ PASID becomes a host PASID here, before any device lock is
        // taken (the translator may consult the IOMMU).
        let mut snapshot = WqSnapshot::new(wq as u8, &cfg);
        if snapshot.pasid_en {
            snapshot.pasid = self.pasids.to_host(snapshot.pasid);
        }
        let mut state = group.lock();
        let queue = &mut state.wqs[slot];
        queue.snapshot = Some(snapshot);
        queue.threshold = cfg.threshold();
        queue.accepting = true;
        drop(state);
        regs.wq_state[wq] = WqState::Enabled;
        OK
    }

    fn wq_command(&self, operand: u32, command: WqCommand) -> Outcome {
        let num_wqs = usize::from(self.config.num_wqs);
        let base = ((operand >> 16) & 0xf) as usize * 16;
        let wqs: Vec<usize> = (0..16)
            .filter(|bit| operand & (1 << bit) != 0)
            .map(|bit| base + bit)
            .collect();
        if wqs.iter().any(|&wq| wq >= num_wqs) {
            return (status::INVAL_WQIDX, 0);
        }
        let enabled: Vec<usize> = {
            let mut regs = self.regs();
            let enabled: Vec<usize> = wqs
                .iter()
                .copied()
                .filter(|&wq| regs.wq_state[wq] == WqState::Enabled)
                .collect();
            if command != WqCommand::Reset && enabled.len() != wqs.len() {
                return (status::WQ_NOT_EN, 0);
            }
            if matches!(command, WqCommand::Disable | WqCommand::Reset) {
                for &wq in &enabled {
                    regs.wq_state[wq] = WqState::Disabling;
                }
            }
            enabled
        };
        let selected = |wq: u8, _pasid: Option<u32>| enabled.contains(&usize::from(wq));
        for &wq in &enabled {
            let Some((group, slot)) = self.route(wq) else {
                continue;
            };
            if matches!(command, WqCommand::Disable | WqCommand::Reset) {
                group.lock().wqs[slot].accepting = false;
            }
            let limit = if matches!(command, WqCommand::Abort | WqCommand::Reset) {
                let limit = group.abort(selected);
                self.prs.wake();
                limit
            } else {
                group.lock().next_ticket
            };
            let id = wq as u8;
            group.wait_until(None, |state| !state.pending(limit, |w, _| w == id));
            if matches!(command, WqCommand::Disable | WqCommand::Reset) {
                group.lock().wqs[slot].snapshot = None;
            }
        }
        let mut regs = self.regs();
        if matches!(command, WqCommand::Disable | WqCommand::Reset) {
            for &wq in &enabled {
                regs.wq_state[wq] = WqState::Disabled;
            }
        }
        if command == WqCommand::Reset {
            for &wq in &wqs {
                regs.wqcfg[wq].reset_keep_size(&self.caps.opcap);
            }
        }
        OK
    }

    fn interrupt_handle(&self, operand: u32, request: bool) -> Outcome {
        let index = (operand & 0xffff) as usize;
        if operand & INT_HANDLE_IMS != 0 {
            // No interrupt message storage: no IMS handle exists.
            return (
                if request {
                    status::NO_HANDLE
                } else {
                    status::INVAL_INT_IDX
                },
                0,
            );
        }
        let Some(handle) = self.int_handles.get(index) else {
            return (status::INVAL_INT_IDX, 0);
        };
        handle.store(request, Ordering::SeqCst);
        // The handle of an MSI-X entry is its index.
        (status::SUCCESS, if request { index as u32 } else { 0 })
    }
}

/// The read-buffer controls (DSA specification §9.2: GENCFG read-buffer
/// limit, GRPCFG reserved/allowed/use-limit) must fit the device's total:
/// the limit and each group's allowance at most the total, the reservations
/// together at most the total, each group allowed at least what it
/// reserves, and a group using the limit needs a non-zero limit. A
/// violation fails Enable Device with a group configuration error. Read
/// buffers only pace a real engine's reads, so the model keeps the values
/// and does not throttle.
fn check_read_buffers(regs: &RegFile, total: u64) -> Result<(), u32> {
    let limit = u64::from(regs.gencfg.rdbuf_limit());
    if limit > total {
        return Err(status::CONFIG);
    }
    let mut reserved = 0;
    for g in &regs.grpcfg {
        let f = g.flags;
        reserved += f.rdbufs_reserved();
        let bad_allowance = f.rdbufs_allowed() > total || f.rdbufs_allowed() < f.rdbufs_reserved();
        if bad_allowance || (f.use_rdbuf_limit() == 1 && limit == 0) {
            return Err(status::GRP_CONFIG);
        }
    }
    if reserved > total {
        return Err(status::GRP_CONFIG);
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WqCommand {
    Disable,
    Drain,
    Abort,
    Reset,
}
