//! The bus-device interface shared by the MMIO and port-I/O buses.

/// The kind of 64-byte atomic store a vCPU performed.
///
/// All three write 64 bytes as one non-torn access. MOVDIR64B is a posted
/// write; ENQCMD and ENQCMDS are non-posted and the target answers whether it
/// accepted the command (the CPU reports that answer in RFLAGS.ZF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    /// MOVDIR64B: posted 64-byte direct store.
    Movdir64b,
    /// ENQCMD: user enqueue; the PASID came from IA32_PASID, privilege is user.
    Enqcmd,
    /// ENQCMDS: supervisor enqueue; PASID and privilege come from the source.
    Enqcmds,
}

impl StoreKind {
    /// The answer when the store reaches no enqueue target (ordinary
    /// memory, an unclaimed address, a device without enqueue support): a
    /// posted MOVDIR64B completes, a non-posted enqueue is not accepted.
    pub const fn reply_without_enqueue_target(self) -> StoreReply {
        match self {
            StoreKind::Movdir64b => StoreReply::Accepted,
            StoreKind::Enqcmd | StoreKind::Enqcmds => StoreReply::Retry,
        }
    }
}

/// The target's answer to a 64-byte store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreReply {
    /// The device took the command (ENQCMD: ZF=0).
    Accepted,
    /// The device did not take the command and software should retry
    /// (ENQCMD: ZF=1).
    Retry,
}

/// A device on the MMIO or port-I/O bus.
///
/// `base` is the start of the range the device was registered at and
/// `offset` is relative to it. Reads and writes never fail: an access the
/// device does not decode reads as the device chooses (usually all ones) and
/// writes are dropped, as on real buses.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes at `offset`.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);

    /// Writes `data` at `offset`.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);

    /// A 64-byte atomic store (MOVDIR64B, ENQCMD, ENQCMDS) at `offset`.
    ///
    /// The default treats MOVDIR64B as an ordinary 64-byte write and answers
    /// ENQCMD/ENQCMDS with [`StoreReply::Retry`]: a target that does not
    /// implement enqueue stores never accepts a command.
    fn store64(&mut self, base: u64, offset: u64, data: &[u8; 64], kind: StoreKind) -> StoreReply {
        if kind == StoreKind::Movdir64b {
            self.write(base, offset, data);
        }
        kind.reply_without_enqueue_target()
    }
}
