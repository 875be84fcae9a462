//! Page requests (PCIe PRI): the device side of block-on-fault.
//!
//! An engine that faults with block-on-fault posts a page request through
//! the [`DmaPort`] and sleeps until the IOMMU answers with the same page
//! request group index. Aborts and resets wake it up and abandon the work.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::dma::{DmaPort, PageRequest, PageResponseCode, PasidTag};

/// Page request group indexes are 9 bits wide.
const PRG_INDEXES: u16 = 512;
/// How often a waiting engine re-checks for an abort.
const ABORT_POLL: Duration = Duration::from_millis(20);

/// How a page request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestOutcome {
    /// The IOMMU answered.
    Answered(PageResponseCode),
    /// The work was aborted while waiting.
    Aborted,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Waiting,
    Answered(PageResponseCode),
    /// The waiter gave up (abort); swallow the late response.
    Abandoned,
}

#[derive(Debug, Default)]
struct State {
    outstanding: HashMap<u16, Slot>,
    next: u16,
    response_failure: bool,
    unexpected_index: bool,
}

/// Outstanding page requests of the function.
#[derive(Debug, Default)]
pub struct PageRequester {
    state: Mutex<State>,
    cv: Condvar,
}

impl PageRequester {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.cv
            .wait_timeout(guard, ABORT_POLL)
            .unwrap_or_else(|e| e.into_inner())
            .0
    }

    /// Requests the page holding `addr` and waits for the answer.
    /// `allocation` is the PRI Outstanding Page Request Allocation.
    pub fn request(
        &self,
        port: &dyn DmaPort,
        pasid: Option<PasidTag>,
        addr: u64,
        write: bool,
        allocation: u32,
        cancel: &AtomicBool,
    ) -> RequestOutcome {
        let allocation = allocation.clamp(1, u32::from(PRG_INDEXES)) as usize;
        let mut state = self.lock();
        let index = loop {
            if cancel.load(Ordering::SeqCst) {
                return RequestOutcome::Aborted;
            }
            if state.outstanding.len() < allocation {
                let free = (0..PRG_INDEXES)
                    .map(|i| (state.next + i) % PRG_INDEXES)
                    .find(|i| !state.outstanding.contains_key(i));
                if let Some(index) = free {
                    break index;
                }
            }
            state = self.wait(state);
        };
        state.next = (index + 1) % PRG_INDEXES;
        state.outstanding.insert(index, Slot::Waiting);
        drop(state);
        port.page_request(PageRequest {
            pasid,
            addr: addr & !0xfff,
            read: !write,
            write,
            prg_index: index,
            last: true,
        });
        let mut state = self.lock();
        loop {
            match state.outstanding.get(&index).copied() {
                Some(Slot::Answered(code)) => {
                    state.outstanding.remove(&index);
                    self.cv.notify_all();
                    return RequestOutcome::Answered(code);
                }
                // Cleared by a PRI reset: the request is gone.
                None | Some(Slot::Abandoned) => {
                    return RequestOutcome::Answered(PageResponseCode::InvalidRequest)
                }
                Some(Slot::Waiting) => {}
            }
            if cancel.load(Ordering::SeqCst) {
                state.outstanding.insert(index, Slot::Abandoned);
                return RequestOutcome::Aborted;
            }
            state = self.wait(state);
        }
    }

    /// A PRG response message arrived.
    pub fn respond(&self, index: u16, code: PageResponseCode) {
        let mut state = self.lock();
        if code == PageResponseCode::ResponseFailure {
            state.response_failure = true;
        }
        match state.outstanding.get(&index).copied() {
            Some(Slot::Waiting) => {
                state.outstanding.insert(index, Slot::Answered(code));
            }
            Some(Slot::Abandoned) => {
                state.outstanding.remove(&index);
            }
            _ => {
                log::warn!("page response for unknown PRG index {index}");
                state.unexpected_index = true;
            }
        }
        self.cv.notify_all();
    }

    /// PRI reset: forget every outstanding request (waiters see Invalid).
    pub fn reset(&self) {
        self.lock().outstanding.clear();
        self.cv.notify_all();
    }

    /// Wakes waiters so they notice an abort.
    pub fn wake(&self) {
        self.cv.notify_all();
    }

    /// The PRI status bits: (response failure, unexpected index, stopped).
    /// Stopped means no request is outstanding.
    pub fn status(&self) -> (bool, bool, bool) {
        let state = self.lock();
        let live = state
            .outstanding
            .values()
            .any(|slot| *slot != Slot::Abandoned);
        (state.response_failure, state.unexpected_index, !live)
    }

    /// Software cleared the write-1-to-clear status bits.
    pub fn clear_status(&self, response_failure: bool, unexpected_index: bool) {
        let mut state = self.lock();
        state.response_failure &= !response_failure;
        state.unexpected_index &= !unexpected_index;
    }
}
