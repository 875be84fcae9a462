//! The PCI function interface the root complex drives.

use bus::{StoreKind, StoreReply};

use crate::MappedBar;

/// A PCI(e) function on the VMM's root complex.
///
/// Configuration accesses reach [`PciDevice::config_read`] and
/// [`PciDevice::config_write`] with byte offsets into the 4 KiB
/// configuration space (legacy port access reaches only the first 256
/// bytes). Memory accesses that hit one of the function's BARs, as reported
/// by [`PciDevice::mapped_bars`], reach the BAR methods with the offset into
/// that BAR. The root complex calls `mapped_bars` again after every
/// configuration write, so BAR moves and memory-decode changes take effect
/// at once.
pub trait PciDevice: Send {
    /// Reads `data.len()` (1, 2 or 4) bytes of configuration space.
    fn config_read(&mut self, offset: u16, data: &mut [u8]);

    /// Writes `data.len()` (1, 2 or 4) bytes of configuration space.
    fn config_write(&mut self, offset: u16, data: &[u8]);

    /// The memory BARs currently decoded (memory space enabled, assigned).
    fn mapped_bars(&self) -> Vec<MappedBar>;

    /// Reads from memory BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]);

    /// Writes to memory BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]);

    /// A 64-byte atomic store to memory BAR `bar` at `offset`.
    ///
    /// See [`crate::BusDevice::store64`] for the default's meaning.
    fn bar_store64(
        &mut self,
        bar: u8,
        offset: u64,
        data: &[u8; 64],
        kind: StoreKind,
    ) -> StoreReply {
        if kind == StoreKind::Movdir64b {
            self.bar_write(bar, offset, data);
        }
        kind.reply_without_enqueue_target()
    }
}
