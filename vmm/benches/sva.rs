//! What the ENQCMD trap adds for PASIDs: the address-space record of the
//! running CR3 and the gPASID -> hPASID replacement in the command, against
//! the MSR-only path (read IA32_PASID, put it in dword 0).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use pasid::{Ia32Pasid, PasidSpace};
use vmm::sva::{translate_enqueue, GuestPasids};

const CR3: u64 = 0x1234_6000;
const GPASID: u32 = 0x42;
const RID: pci::PciAddress = pci::PciAddress::from_rid(0x08);

fn enqcmd_pasid(c: &mut Criterion) {
    let pasids = GuestPasids::new(Arc::new(PasidSpace::new()), "bench").unwrap();
    // Other address spaces of the guest, so the map is not trivially small.
    for i in 0..64u64 {
        pasids.record_msr_write(0x100_0000 + i * 0x2000, Ia32Pasid::VALID | (100 + i));
    }
    pasids.record_msr_write(CR3, Ia32Pasid::VALID | u64::from(GPASID));
    pasids.host_pasid(Some(RID), GPASID).unwrap();
    let mut msr = Ia32Pasid::new();
    msr.write(Ia32Pasid::VALID | u64::from(GPASID)).unwrap();
    let source = [0xa5u8; 64];

    let mut group = c.benchmark_group("enqcmd_pasid");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    group.bench_function("msr_only", |b| {
        b.iter(|| {
            let mut cmd = black_box(source);
            let pasid = (black_box(&msr).read() & Ia32Pasid::PASID_MASK) as u32;
            cmd[..4].copy_from_slice(&pasid.to_le_bytes());
            cmd
        })
    });
    group.bench_function("cr3_record_and_host_pasid", |b| {
        b.iter(|| {
            let mut cmd = black_box(source);
            let value = pasids.enqcmd_pasid(black_box(CR3));
            let pasid = (value & Ia32Pasid::PASID_MASK) as u32;
            cmd[..4].copy_from_slice(&pasid.to_le_bytes());
            translate_enqueue(&pasids, RID, &cmd)
        })
    });
    group.finish();
}

criterion_group!(benches, enqcmd_pasid);
criterion_main!(benches);
