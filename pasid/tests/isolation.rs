//! Isolation: whatever the guests and the VMM do, one guest's table never
//! returns a host PASID charged to another guest.

use std::collections::HashMap;
use std::sync::Arc;

use pasid::{Error, OwnerId, PasidSpace, PasidTable, Scope, PASID_MAX};
use pci::PciAddress;
use proptest::prelude::*;

const GUESTS: usize = 3;
const BITS: u32 = 5;
/// Global PASIDs each guest may hold outside its table.
const SLOTS: usize = 4;

#[derive(Clone, Copy, Debug)]
enum Op {
    Install {
        guest: usize,
        gpasid: u32,
    },
    Remove {
        guest: usize,
        gpasid: u32,
    },
    /// Guest teardown and a new table for the same owner.
    Recreate {
        guest: usize,
    },
    /// Guest `by` (or the VMM on its behalf) tries to free a host PASID
    /// that guest `victim` maps.
    ForeignFree {
        by: usize,
        victim: usize,
        pick: usize,
    },
    /// A global PASID charged to the guest outside its table (as an
    /// address-space binding would take one), from the same space.
    Alloc {
        guest: usize,
        slot: usize,
    },
    Free {
        guest: usize,
        slot: usize,
    },
    /// The VMM's own device-scoped allocations.
    VmmDevice {
        rid: u16,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let guest = 0..GUESTS;
    let gpasid = prop_oneof![0..12u32, Just(PASID_MAX), Just(PASID_MAX + 1)];
    prop_oneof![
        6 => (guest.clone(), gpasid.clone()).prop_map(|(guest, gpasid)| Op::Install { guest, gpasid }),
        3 => (guest.clone(), gpasid).prop_map(|(guest, gpasid)| Op::Remove { guest, gpasid }),
        1 => guest.clone().prop_map(|guest| Op::Recreate { guest }),
        2 => (guest.clone(), guest.clone(), any::<usize>())
            .prop_map(|(by, victim, pick)| Op::ForeignFree { by, victim, pick }),
        2 => (guest.clone(), 0..SLOTS).prop_map(|(guest, slot)| Op::Alloc { guest, slot }),
        1 => (guest, 0..SLOTS).prop_map(|(guest, slot)| Op::Free { guest, slot }),
        1 => (0..3u16).prop_map(|rid| Op::VmmDevice { rid }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn no_table_returns_another_guests_host_pasid(ops in proptest::collection::vec(op_strategy(), 1..150)) {
        let space = Arc::new(PasidSpace::with_bits(BITS).unwrap());
        let owners: Vec<OwnerId> = (0..GUESTS)
            .map(|i| space.add_owner(&format!("guest{i}"), Some(12)))
            .collect();
        let mut tables: Vec<PasidTable> = owners
            .iter()
            .map(|&owner| PasidTable::new(space.clone(), owner).unwrap())
            .collect();
        let mut held: Vec<[Option<u32>; SLOTS]> = vec![[None; SLOTS]; GUESTS];
        for op in ops {
            match op {
                Op::Install { guest, gpasid } => {
                    let _ = tables[guest].install(gpasid);
                }
                Op::Remove { guest, gpasid } => {
                    let _ = tables[guest].remove(gpasid);
                }
                Op::Recreate { guest } => {
                    tables[guest] = PasidTable::new(space.clone(), owners[guest]).unwrap();
                }
                Op::ForeignFree { by, victim, pick } => {
                    let entries = tables[victim].entries();
                    if by != victim && !entries.is_empty() {
                        let (_, h) = entries[pick % entries.len()];
                        prop_assert_eq!(
                            space.free(owners[by], Scope::Global, h),
                            Err(Error::NotOwner { pasid: h, owner: owners[by] })
                        );
                        prop_assert_eq!(
                            space.free(OwnerId::VMM, Scope::Global, h),
                            Err(Error::NotOwner { pasid: h, owner: OwnerId::VMM })
                        );
                    }
                }
                Op::Alloc { guest, slot } => {
                    if held[guest][slot].is_none() {
                        held[guest][slot] = space.alloc(owners[guest], Scope::Global).ok();
                    }
                }
                Op::Free { guest, slot } => {
                    if let Some(h) = held[guest][slot].take() {
                        prop_assert_eq!(space.free(owners[guest], Scope::Global, h), Ok(()));
                    }
                }
                Op::VmmDevice { rid } => {
                    let _ = space.alloc(OwnerId::VMM, Scope::Device(PciAddress::from_rid(rid)));
                }
            }
            // Every translation any table can give, against the space's
            // charges.
            let mut mapped_by: HashMap<u32, usize> = HashMap::new();
            for (guest, table) in tables.iter().enumerate() {
                for gpasid in (0..12).chain([PASID_MAX]) {
                    if let Ok(h) = table.translate(gpasid) {
                        prop_assert_eq!(space.owner_of(Scope::Global, h), Some(owners[guest]));
                        if let Some(&other) = mapped_by.get(&h) {
                            prop_assert_eq!(other, guest, "host PASID {} in two guests", h);
                        }
                        mapped_by.insert(h, guest);
                    }
                }
            }
            for (guest, slots) in held.iter().enumerate() {
                for &h in slots.iter().flatten() {
                    prop_assert_eq!(space.owner_of(Scope::Global, h), Some(owners[guest]));
                    prop_assert!(!mapped_by.contains_key(&h), "held PASID {} also in a table", h);
                }
            }
        }
    }
}
