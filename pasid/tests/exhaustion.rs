//! Exhaustion of the full 20-bit space: exactly 2^20 - 1 allocations succeed.

use std::sync::Arc;

use pasid::{Error, OwnerId, PasidSpace, PasidTable, Scope, PASID_MAX};
use pci::PciAddress;

#[test]
fn global_scope_allocates_every_pasid_but_zero_exactly_once() {
    let space = PasidSpace::new();
    let mut seen = vec![false; PASID_MAX as usize + 1];
    for _ in 0..PASID_MAX {
        let pasid = space.alloc(OwnerId::VMM, Scope::Global).unwrap();
        assert!(!std::mem::replace(&mut seen[pasid as usize], true));
    }
    assert!(!seen[0]);
    assert_eq!(space.allocated(), PASID_MAX);
    assert_eq!(
        space.alloc(OwnerId::VMM, Scope::Global),
        Err(Error::NoSpace(Scope::Global))
    );
    // No device can get one either: every value is global.
    let rid = Scope::Device(PciAddress::from_rid(0x100));
    assert_eq!(space.alloc(OwnerId::VMM, rid), Err(Error::NoSpace(rid)));

    space.free(OwnerId::VMM, Scope::Global, 0x5_5555).unwrap();
    assert_eq!(space.alloc(OwnerId::VMM, Scope::Global), Ok(0x5_5555));
    assert_eq!(
        space.alloc(OwnerId::VMM, Scope::Global),
        Err(Error::NoSpace(Scope::Global))
    );
}

#[test]
fn device_scope_exhausts_per_requester_id() {
    let space = PasidSpace::new();
    let guest = space.add_owner("guest", None);
    let a = Scope::Device(PciAddress::new(0, 1, 0));
    let b = Scope::Device(PciAddress::new(0, 2, 0));
    for _ in 0..PASID_MAX {
        space.alloc(guest, a).unwrap();
    }
    assert_eq!(space.alloc(guest, a), Err(Error::NoSpace(a)));
    assert_eq!(
        space.alloc(guest, Scope::Global),
        Err(Error::NoSpace(Scope::Global))
    );
    // Another requester ID has its own full space.
    assert_eq!(space.alloc(guest, b), Ok(1));
    space.free(guest, a, 77).unwrap();
    assert_eq!(space.alloc(guest, a), Ok(77));
    assert_eq!(space.charged(guest), Ok(PASID_MAX + 1));
}

#[test]
fn a_full_guest_table_exhausts_the_space_at_8_bytes_per_entry() {
    let space = Arc::new(PasidSpace::new());
    let greedy = PasidTable::new(space.clone(), space.add_owner("greedy", None)).unwrap();
    let other = PasidTable::new(space.clone(), space.add_owner("other", None)).unwrap();
    for gpasid in 1..=PASID_MAX {
        greedy.install(gpasid).unwrap();
    }
    assert_eq!(greedy.len(), PASID_MAX);
    assert_eq!(greedy.leaves(), 1024);
    let bytes_per_entry = greedy.memory_bytes() as f64 / f64::from(greedy.len());
    // 4 bytes each way (guest -> host and host -> guest), plus the two
    // fixed directories.
    assert!(bytes_per_entry <= 8.1, "{bytes_per_entry} bytes per entry");
    assert_eq!(other.install(5), Err(Error::NoSpace(Scope::Global)));
    assert_eq!(other.translate(5), Err(Error::TranslationFault(5)));

    let freed = greedy.remove(0x8_0000).unwrap();
    assert_eq!(other.install(5), Ok(freed));
    assert_eq!(space.charged(greedy.owner()), Ok(PASID_MAX - 1));
    drop(greedy);
    drop(other);
    assert_eq!(space.allocated(), 0);
}
