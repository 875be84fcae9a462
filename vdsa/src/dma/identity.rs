//! Untranslated DMA straight into guest RAM, for a DSA with no IOMMU above.

use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryBackend};

use super::{AddressSpace, DmaFault, DmaPort, FaultKind, PageRequest};

/// A [`DmaPort`] for a function without an IOMMU: every address, tagged with
/// a PASID or not, is a guest-physical address. Accesses outside guest RAM
/// fail as [`FaultKind::Unmapped`]. There is no ATS, and page requests are
/// never answered (the guest cannot enable PRI without an IOMMU).
pub struct IdentityDma<AS> {
    mem: AS,
}

impl<AS> IdentityDma<AS> {
    /// Wraps guest memory (for example `Arc<GuestMemoryMmap>` or a
    /// `GuestMemoryAtomic`).
    pub fn new(mem: AS) -> Self {
        Self { mem }
    }
}

fn unmapped(done: usize, addr: u64, write: bool) -> DmaFault {
    DmaFault {
        done,
        addr: addr.wrapping_add(done as u64),
        write,
        kind: FaultKind::Unmapped,
    }
}

impl<AS> DmaPort for IdentityDma<AS>
where
    AS: GuestAddressSpace + Send + Sync,
    AS::M: GuestMemoryBackend,
{
    fn read(&self, _space: AddressSpace, addr: u64, buf: &mut [u8]) -> Result<(), DmaFault> {
        let mem = self.mem.memory();
        let mut done = 0;
        for slice in mem.get_slices(GuestAddress(addr), buf.len()) {
            let Ok(slice) = slice else { break };
            done += slice.copy_to(&mut buf[done..]);
        }
        if done < buf.len() {
            return Err(unmapped(done, addr, false));
        }
        Ok(())
    }

    fn write(&self, _space: AddressSpace, addr: u64, data: &[u8]) -> Result<(), DmaFault> {
        let mem = self.mem.memory();
        let mut done = 0;
        for slice in mem.get_slices(GuestAddress(addr), data.len()) {
            let Ok(slice) = slice else { break };
            let n = slice.len();
            slice.copy_from(&data[done..done + n]);
            done += n;
        }
        if done < data.len() {
            return Err(unmapped(done, addr, true));
        }
        Ok(())
    }

    fn copy(&self, _space: AddressSpace, src: u64, dst: u64, len: usize) -> Result<(), DmaFault> {
        // Memory to memory, one host memcpy per pair of contiguous pieces.
        let mem = self.mem.memory();
        let mut done = 0;
        for piece in mem.get_slices(GuestAddress(src), len) {
            let Ok(piece) = piece else {
                return Err(unmapped(done, src, false));
            };
            let mut offset = 0;
            for target in mem.get_slices(GuestAddress(dst.wrapping_add(done as u64)), piece.len()) {
                let Ok(target) = target else {
                    return Err(unmapped(done, dst, true));
                };
                let n = target.len();
                let from = piece
                    .subslice(offset, n)
                    .map_err(|_| unmapped(done, src, false))?;
                from.copy_to_volatile_slice(target);
                offset += n;
                done += n;
            }
            if offset < piece.len() {
                return Err(unmapped(done, dst, true));
            }
        }
        if done < len {
            return Err(unmapped(done, src, false));
        }
        Ok(())
    }

    fn page_request(&self, request: PageRequest) {
        log::warn!("page request {request:?} on a function without an IOMMU; dropped");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestMemoryMmap};

    use super::*;

    fn memory() -> Arc<GuestMemoryMmap> {
        Arc::new(
            GuestMemoryMmap::from_ranges(&[
                (GuestAddress(0), 0x2000),
                (GuestAddress(0x2000), 0x1000),
            ])
            .unwrap(),
        )
    }

    const SPACE: AddressSpace = AddressSpace::Untranslated(None);

    #[test]
    fn copies_across_regions() {
        let mem = memory();
        let dma = IdentityDma::new(mem.clone());
        let data: Vec<u8> = (0..0x1000u32).map(|i| (i * 7) as u8).collect();
        dma.write(SPACE, 0x100, &data).unwrap();
        dma.copy(SPACE, 0x100, 0x1f00, data.len()).unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(0x1f00)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn faults_past_ram_report_progress() {
        let dma = IdentityDma::new(memory());
        let mut buf = [0u8; 0x20];
        assert_eq!(
            dma.read(SPACE, 0x2ff0, &mut buf),
            Err(DmaFault {
                done: 0x10,
                addr: 0x3000,
                write: false,
                kind: FaultKind::Unmapped
            })
        );
        assert_eq!(
            dma.copy(SPACE, 0x0, 0x2ff8, 0x10),
            Err(DmaFault {
                done: 8,
                addr: 0x3000,
                write: true,
                kind: FaultKind::Unmapped
            })
        );
        assert_eq!(
            dma.write(SPACE, u64::MAX - 3, &[1; 8]).unwrap_err().kind,
            FaultKind::Unmapped
        );
    }
}
