//! The notification region (virtio 1.2, 4.1.4.4): queue N's doorbell is at
//! `queue_notify_off(N) * notify_off_multiplier`, with `queue_notify_off(N)
//! = N` here. A write there is the driver's "available buffers" notification.

use super::capabilities::NOTIFY_OFF_MULTIPLIER;

/// The queue a write at `offset` into the notification region notifies, if
/// it is a doorbell of one of `queues` queues. The value written (the queue
/// index, or more with VIRTIO_F_NOTIFICATION_DATA, not offered) is not
/// needed: the address names the queue.
pub fn notified_queue(offset: u64, len: usize, queues: usize) -> Option<usize> {
    let multiplier = u64::from(NOTIFY_OFF_MULTIPLIER);
    if offset % multiplier != 0 || len == 0 || len as u64 > multiplier {
        return None;
    }
    let queue = usize::try_from(offset / multiplier).ok()?;
    (queue < queues).then_some(queue)
}
