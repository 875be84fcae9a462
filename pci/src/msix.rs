//! The MSI-X capability, vector table and pending-bit array.

use crate::{cap_id, ConfigError, MsiMessage, MsiSink, PciConfiguration};

/// Bytes per MSI-X table entry.
pub const MSIX_TABLE_ENTRY_SIZE: u64 = 16;
/// Bytes per pending-bit-array qword.
pub const MSIX_PBA_ENTRY_SIZE: u64 = 8;

// Message Control register fields.
const MSG_CTL_TABLE_SIZE_MASK: u16 = 0x7ff;
const MSG_CTL_FUNCTION_MASK: u16 = 1 << 14;
const MSG_CTL_ENABLE: u16 = 1 << 15;
// Vector Control register field.
const VECTOR_CTL_MASK: u32 = 1;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TableEntry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    vector_control: u32,
}

impl TableEntry {
    fn masked(&self) -> bool {
        self.vector_control & VECTOR_CTL_MASK != 0
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.addr_hi) << 32 | u64::from(self.addr_lo),
            data: self.data,
        }
    }

    fn dword(&mut self, index: u64) -> &mut u32 {
        match index {
            0 => &mut self.addr_lo,
            1 => &mut self.addr_hi,
            2 => &mut self.data,
            _ => &mut self.vector_control,
        }
    }
}

/// MSI-X state of one function.
///
/// The owner adds the capability with [`MsixConfig::add_capability`], calls
/// [`MsixConfig::update`] after every configuration write, routes accesses
/// to the table and PBA ranges of its BAR here, and raises vectors with
/// [`MsixConfig::trigger`].
#[derive(Clone, Debug)]
pub struct MsixConfig {
    table: Vec<TableEntry>,
    pending: Vec<u64>,
    cap_offset: u16,
    enabled: bool,
    function_masked: bool,
}

impl MsixConfig {
    /// Creates the state for `vectors` vectors (1 to 2048), all masked.
    pub fn new(vectors: u16) -> Self {
        let vectors = vectors.clamp(1, 2048);
        let entry = TableEntry {
            vector_control: VECTOR_CTL_MASK,
            ..Default::default()
        };
        Self {
            table: vec![entry; usize::from(vectors)],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            cap_offset: 0,
            enabled: false,
            function_masked: false,
        }
    }

    /// The number of vectors.
    pub fn vectors(&self) -> u16 {
        self.table.len() as u16
    }

    /// Bytes the vector table takes in its BAR.
    pub fn table_size(&self) -> u64 {
        self.table.len() as u64 * MSIX_TABLE_ENTRY_SIZE
    }

    /// Bytes the pending-bit array takes in its BAR.
    pub fn pba_size(&self) -> u64 {
        self.pending.len() as u64 * MSIX_PBA_ENTRY_SIZE
    }

    /// Adds the MSI-X capability to `config`, naming the BARs and offsets
    /// where the table and the PBA live. Returns the capability offset.
    pub fn add_capability(
        &mut self,
        config: &mut PciConfiguration,
        table_bar: u8,
        table_offset: u32,
        pba_bar: u8,
        pba_offset: u32,
    ) -> Result<u16, ConfigError> {
        let control = (self.vectors() - 1) & MSG_CTL_TABLE_SIZE_MASK;
        let mut body = [0u8; 10];
        body[0..2].copy_from_slice(&control.to_le_bytes());
        body[2..6].copy_from_slice(&((table_offset & !7) | u32::from(table_bar & 7)).to_le_bytes());
        body[6..10].copy_from_slice(&((pba_offset & !7) | u32::from(pba_bar & 7)).to_le_bytes());
        let writable = (MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK).to_le_bytes();
        self.cap_offset = config.add_capability(cap_id::MSIX, &body, &writable)?;
        Ok(self.cap_offset)
    }

    /// Whether MSI-X is enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Picks up Enable and Function Mask from `config` after a guest write,
    /// delivering vectors that became deliverable.
    pub fn update(&mut self, config: &PciConfiguration, sink: &dyn MsiSink) {
        if self.cap_offset == 0 {
            return;
        }
        let control = config.read_u16(self.cap_offset + 2);
        self.enabled = control & MSG_CTL_ENABLE != 0;
        self.function_masked = control & MSG_CTL_FUNCTION_MASK != 0;
        for vector in 0..self.vectors() {
            self.deliver_if_pending(vector, sink);
        }
    }

    /// Reads the vector table at `offset` (4- or 8-byte accesses).
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let mut dwords = [0u32; 2];
        let count = data.len() / 4;
        for (i, slot) in dwords.iter_mut().enumerate().take(count) {
            let at = offset + 4 * i as u64;
            let Some(entry) = self.table.get((at / MSIX_TABLE_ENTRY_SIZE) as usize) else {
                return;
            };
            let mut entry = *entry;
            *slot = *entry.dword((at % MSIX_TABLE_ENTRY_SIZE) / 4);
        }
        for (chunk, value) in data.chunks_exact_mut(4).zip(dwords) {
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Writes the vector table at `offset` (4- or 8-byte accesses);
    /// unmasking a vector with its pending bit set delivers it.
    pub fn table_write(&mut self, offset: u64, data: &[u8], sink: &dyn MsiSink) {
        if offset % 4 != 0 {
            return;
        }
        for (i, chunk) in data.chunks_exact(4).enumerate() {
            let at = offset + 4 * i as u64;
            let vector = at / MSIX_TABLE_ENTRY_SIZE;
            let Some(entry) = self.table.get_mut(vector as usize) else {
                return;
            };
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let index = (at % MSIX_TABLE_ENTRY_SIZE) / 4;
            // Only the mask bit of Vector Control is defined.
            *entry.dword(index) = if index == 3 {
                value & VECTOR_CTL_MASK
            } else {
                value
            };
            self.deliver_if_pending(vector as u16, sink);
        }
    }

    /// Reads the pending-bit array at `offset`; it is read-only.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *byte = self
                .pending
                .get((at / MSIX_PBA_ENTRY_SIZE) as usize)
                .map_or(0, |q| (q >> (8 * (at % MSIX_PBA_ENTRY_SIZE))) as u8);
        }
    }

    /// Raises `vector`: delivered now if enabled and unmasked, remembered in
    /// the PBA if masked, dropped if MSI-X is disabled or the vector does not
    /// exist. Returns whether a message was sent.
    pub fn trigger(&mut self, vector: u16, sink: &dyn MsiSink) -> bool {
        let Some(entry) = self.table.get(usize::from(vector)) else {
            log::warn!("MSI-X vector {vector} does not exist");
            return false;
        };
        if !self.enabled {
            log::debug!("MSI-X vector {vector} raised while MSI-X is disabled");
            return false;
        }
        if self.function_masked || entry.masked() {
            self.pending[usize::from(vector) / 64] |= 1 << (vector % 64);
            return false;
        }
        sink.send_msi(entry.message());
        true
    }

    /// Whether `vector` is pending.
    pub fn is_pending(&self, vector: u16) -> bool {
        self.pending
            .get(usize::from(vector) / 64)
            .is_some_and(|q| q & (1 << (vector % 64)) != 0)
    }

    fn deliver_if_pending(&mut self, vector: u16, sink: &dyn MsiSink) {
        let entry = self.table[usize::from(vector)];
        if self.enabled && !self.function_masked && !entry.masked() && self.is_pending(vector) {
            self.pending[usize::from(vector) / 64] &= !(1 << (vector % 64));
            sink.send_msi(entry.message());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{MsiRecorder, PciHeader};

    fn setup() -> (PciConfiguration, MsixConfig, MsiRecorder) {
        let mut cfg = PciConfiguration::new(&PciHeader::default());
        let mut msix = MsixConfig::new(3);
        assert_eq!(msix.add_capability(&mut cfg, 0, 0x600, 0, 0x700), Ok(0x40));
        (cfg, msix, MsiRecorder::new())
    }

    fn program(msix: &mut MsixConfig, vector: u64, sink: &MsiRecorder, masked: bool) {
        let base = vector * MSIX_TABLE_ENTRY_SIZE;
        msix.table_write(base, &0xfee0_1000u32.to_le_bytes(), sink);
        msix.table_write(base + 4, &0u32.to_le_bytes(), sink);
        msix.table_write(base + 8, &(0x40 + vector as u32).to_le_bytes(), sink);
        msix.table_write(base + 12, &u32::from(masked).to_le_bytes(), sink);
    }

    fn enable(cfg: &mut PciConfiguration, msix: &mut MsixConfig, sink: &MsiRecorder, control: u16) {
        cfg.write(0x42, &control.to_le_bytes());
        msix.update(cfg, sink);
    }

    #[test]
    fn capability_layout() {
        let (cfg, msix, _) = setup();
        assert_eq!(
            cfg.read_u32(0x40),
            0x0002_0011,
            "ID 0x11, table size 3 (encoded 2)"
        );
        assert_eq!(cfg.read_u32(0x44), 0x600);
        assert_eq!(cfg.read_u32(0x48), 0x700);
        assert_eq!((msix.table_size(), msix.pba_size()), (48, 8));
    }

    #[test]
    fn delivers_when_enabled_and_unmasked() {
        let (mut cfg, mut msix, sink) = setup();
        program(&mut msix, 1, &sink, false);
        assert!(
            !msix.trigger(1, &sink),
            "MSI-X disabled drops the interrupt"
        );
        enable(&mut cfg, &mut msix, &sink, MSG_CTL_ENABLE);
        assert!(msix.trigger(1, &sink));
        assert_eq!(
            sink.take(),
            vec![MsiMessage {
                address: 0xfee0_1000,
                data: 0x41
            }]
        );
    }

    #[test]
    fn masked_vector_is_pending_until_unmasked() {
        let (mut cfg, mut msix, sink) = setup();
        enable(&mut cfg, &mut msix, &sink, MSG_CTL_ENABLE);
        program(&mut msix, 2, &sink, true);
        assert!(!msix.trigger(2, &sink));
        let mut pba = [0u8; 8];
        msix.pba_read(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b100);
        msix.table_write(2 * 16 + 12, &0u32.to_le_bytes(), &sink);
        assert_eq!(
            sink.take(),
            vec![MsiMessage {
                address: 0xfee0_1000,
                data: 0x42
            }]
        );
        assert!(!msix.is_pending(2));
    }

    #[test]
    fn function_mask_defers_delivery() {
        let (mut cfg, mut msix, sink) = setup();
        program(&mut msix, 0, &sink, false);
        enable(
            &mut cfg,
            &mut msix,
            &sink,
            MSG_CTL_ENABLE | MSG_CTL_FUNCTION_MASK,
        );
        assert!(!msix.trigger(0, &sink));
        assert!(sink.is_empty());
        enable(&mut cfg, &mut msix, &sink, MSG_CTL_ENABLE);
        assert_eq!(sink.len(), 1);
    }

    #[test]
    fn table_reads_back_and_ignores_bad_accesses() {
        let (_, mut msix, sink) = setup();
        program(&mut msix, 0, &sink, true);
        let mut q = [0u8; 8];
        msix.table_read(8, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_0000_0040);
        msix.table_write(3 * 16, &[0xff; 4], &sink);
        let mut d = [0u8; 4];
        msix.table_read(3 * 16, &mut d);
        assert_eq!(d, [0xff; 4], "beyond the table reads as ones");
        assert!(!msix.trigger(7, &sink));
    }
}
