//! Work submission through the BAR2 portals (DSA specification §5.3,
//! §9.3, Table 9-11).
//!
//! Each WQ owns four 4 KiB pages: unlimited and limited MSI-X portals, then
//! the IMS portals (absent here: IMS is not supported). Any 64-byte-aligned
//! offset in a page is the same portal.

use bus::{StoreKind, StoreReply};

use crate::descriptor::Descriptor;
use crate::device::Inner;
use crate::regs::layout;
use crate::swerr::{self, DescInfo, SoftwareError};

/// A decoded portal address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Portal {
    /// WQ index.
    pub wq: usize,
    /// Limited portal (admission up to the WQ threshold).
    pub limited: bool,
    /// IMS portal.
    pub ims: bool,
}

impl Portal {
    /// Decodes a BAR2 offset; `None` unless 64-byte aligned.
    pub fn decode(offset: u64) -> Option<Self> {
        if offset % 64 != 0 {
            return None;
        }
        let page = (offset / 0x1000) % 4;
        Some(Self {
            wq: usize::try_from(offset / layout::PORTALS_PER_WQ).ok()?,
            limited: page % 2 == 1,
            ims: page >= 2,
        })
    }

    /// The BAR2 offset of a portal.
    pub fn offset(wq: usize, limited: bool) -> u64 {
        wq as u64 * layout::PORTALS_PER_WQ + if limited { 0x1000 } else { 0 }
    }
}

impl Inner {
    /// A 64-byte store to BAR2. Descriptors that are not accepted are
    /// dropped; enqueue stores get Retry, posted ones get no answer.
    pub(crate) fn submit(&self, offset: u64, data: &[u8; 64], kind: StoreKind) -> StoreReply {
        let enqueue = kind != StoreKind::Movdir64b;
        let rejected = if enqueue {
            StoreReply::Retry
        } else {
            StoreReply::Accepted
        };
        let Some(portal) = Portal::decode(offset) else {
            return rejected;
        };
        if portal.ims || portal.wq >= usize::from(self.config.num_wqs) {
            return rejected;
        }
        // The route is not held while the descriptor is accepted: it may
        // run on this thread (a group stopped meanwhile takes nothing).
        let Some((group, slot)) = self.routes.read().unwrap_or_else(|e| e.into_inner())[portal.wq]
            .as_ref()
            .map(|route| (route.group.clone(), route.slot))
        else {
            return rejected;
        };
        let state = group.lock();
        let queue = &state.wqs[slot];
        let Some(wq) = queue
            .snapshot
            .filter(|_| queue.accepting && !state.stopped())
        else {
            return rejected;
        };
        let desc = Descriptor(*data);
        let occupancy = queue.queue.len();
        if wq.dedicated {
            if enqueue {
                return StoreReply::Retry;
            }
            if occupancy >= usize::from(wq.size) {
                drop(state);
                let (tag, privileged) = wq.tag_for(&desc);
                self.record_software_error(&SoftwareError {
                    code: swerr::code::DWQ_FULL,
                    wq: Some(wq.id),
                    desc: Some(DescInfo {
                        operation: desc.opcode(),
                        pasid: tag.map_or(0, |t| t.pasid),
                        privileged,
                        batch_index: None,
                    }),
                    ..SoftwareError::default()
                });
                return StoreReply::Accepted;
            }
        } else {
            if !enqueue {
                // A posted write to a shared WQ is ignored.
                return StoreReply::Accepted;
            }
            let limit = if portal.limited {
                queue.threshold.min(wq.size)
            } else {
                wq.size
            };
            if occupancy >= usize::from(limit) {
                return StoreReply::Retry;
            }
        }
        let pasid = wq.tag_for(&desc).0.map(|t| t.pasid);
        group.submit(self, state, slot, wq, desc, pasid);
        StoreReply::Accepted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_portals() {
        assert_eq!(
            Portal::decode(0x1000),
            Some(Portal {
                wq: 0,
                limited: true,
                ims: false
            })
        );
        assert_eq!(
            Portal::decode(0x4fc0),
            Some(Portal {
                wq: 1,
                limited: false,
                ims: false
            })
        );
        assert_eq!(
            Portal::decode(0x7040),
            Some(Portal {
                wq: 1,
                limited: true,
                ims: true
            })
        );
        assert_eq!(Portal::decode(0x1020), None);
        assert_eq!(Portal::offset(3, true), 0xd000);
    }
}
