//! Atomic read-modify-write on guest RAM: the mmap boundary of the emulator.
//!
//! Other vCPUs run concurrently on the same memory (natively, or through
//! KVM's emulator, which uses locked host instructions), so an emulated
//! LOCK CMPXCHG16B must be one host 128-bit compare-and-exchange on the
//! mapping, not a read followed by a write.

use portable_atomic::AtomicU128;
use std::sync::atomic::Ordering;
use vm_memory::{GuestAddress, GuestMemoryBackend};

/// Why an atomic access could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AtomicAccessError {
    /// The 16 bytes are not all in one RAM region.
    NotRam,
    /// The host address is not 16-byte aligned (a RAM region whose guest
    /// base is not 16-byte aligned).
    Misaligned,
}

/// 128-bit compare-and-exchange at `gpa`: `Ok(current)` if the memory held
/// `current` and now holds `new`, `Err(actual)` with what it held otherwise.
pub(crate) fn compare_exchange_u128<M: GuestMemoryBackend>(
    mem: &M,
    gpa: u64,
    current: u128,
    new: u128,
) -> Result<Result<u128, u128>, AtomicAccessError> {
    let slice = mem
        .get_slice(GuestAddress(gpa), std::mem::size_of::<u128>())
        .map_err(|_| AtomicAccessError::NotRam)?;
    let guard = slice.ptr_guard_mut();
    let ptr = guard.as_ptr();
    if ptr.align_offset(std::mem::align_of::<AtomicU128>()) != 0 {
        return Err(AtomicAccessError::Misaligned);
    }
    // SAFETY: `get_slice` checked that the 16 bytes at `ptr` lie inside one
    // mapped guest-memory region, which stays mapped while `mem` and the
    // guard are borrowed; the pointer is 16-byte aligned (checked above).
    // Other threads (vCPUs) only access this memory through atomic or
    // volatile accesses or from the guest, never through Rust references.
    let atomic = unsafe { AtomicU128::from_ptr(ptr.cast::<u128>()) };
    Ok(atomic.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn exchanges_only_when_equal() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        mem.write_obj(5u128, GuestAddress(0x100)).unwrap();
        assert_eq!(compare_exchange_u128(&mem, 0x100, 4, 9), Ok(Err(5)));
        assert_eq!(mem.read_obj::<u128>(GuestAddress(0x100)).unwrap(), 5);
        assert_eq!(compare_exchange_u128(&mem, 0x100, 5, 9), Ok(Ok(5)));
        assert_eq!(mem.read_obj::<u128>(GuestAddress(0x100)).unwrap(), 9);
    }

    #[test]
    fn outside_ram_and_misaligned_are_refused() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert_eq!(
            compare_exchange_u128(&mem, 0x2000, 0, 1),
            Err(AtomicAccessError::NotRam)
        );
        assert_eq!(
            compare_exchange_u128(&mem, 0xff8, 0, 1),
            Err(AtomicAccessError::NotRam)
        );
        assert_eq!(
            compare_exchange_u128(&mem, 0x108, 0, 1),
            Err(AtomicAccessError::Misaligned)
        );
    }
}
