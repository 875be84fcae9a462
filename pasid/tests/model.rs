//! Property tests: the allocator and the translation table against simple
//! models over random sequences of operations, and isolation between guests.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use pasid::{GuestPasidTable, PasidError, PasidSpace, Scope, TableError};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum SpaceOp {
    Alloc(Option<u16>),
    /// Free the n-th live allocation (modulo), or a PASID never given out.
    Free(usize),
    FreeBogus(Option<u16>, u32),
}

fn space_op() -> impl Strategy<Value = SpaceOp> {
    let scope = prop_oneof![Just(None), (0u16..3).prop_map(Some)];
    prop_oneof![
        4 => scope.clone().prop_map(SpaceOp::Alloc),
        2 => any::<usize>().prop_map(SpaceOp::Free),
        1 => (scope, 1u32..64).prop_map(|(s, p)| SpaceOp::FreeBogus(s, p)),
    ]
}

fn to_scope(s: Option<u16>) -> Scope {
    s.map_or(Scope::Global, Scope::Device)
}

proptest! {
    #[test]
    fn allocator_matches_model(ops in prop::collection::vec(space_op(), 1..200)) {
        let space = PasidSpace::new();
        let owner = space.register_owner(None);
        // Model: live allocations per scope.
        let mut live: Vec<(Scope, u32)> = Vec::new();
        for op in ops {
            match op {
                SpaceOp::Alloc(s) => {
                    let scope = to_scope(s);
                    let p = space.allocate(scope, owner).unwrap();
                    prop_assert_ne!(p, 0);
                    for &(other, q) in &live {
                        let conflicts = match (scope, other) {
                            (Scope::Device(a), Scope::Device(b)) => a == b,
                            _ => true,
                        };
                        prop_assert!(!(conflicts && q == p), "{:?} {} collides with {:?}", scope, p, other);
                    }
                    live.push((scope, p));
                }
                SpaceOp::Free(n) if !live.is_empty() => {
                    let (scope, p) = live.swap_remove(n % live.len());
                    prop_assert_eq!(space.free(scope, p), Ok(owner));
                }
                SpaceOp::Free(_) => {}
                SpaceOp::FreeBogus(s, p) => {
                    let scope = to_scope(s);
                    if !live.contains(&(scope, p)) {
                        prop_assert_eq!(space.free(scope, p), Err(PasidError::NotAllocated { scope, pasid: p }));
                    }
                }
            }
            prop_assert_eq!(space.charged(owner).unwrap() as usize, live.len());
            prop_assert_eq!(space.allocated(), live.len());
        }
    }

    #[test]
    fn table_matches_model(ops in prop::collection::vec((0u8..3, 0u32..2048), 1..300)) {
        let space = Arc::new(PasidSpace::new());
        let owner = space.register_owner(None);
        let table = GuestPasidTable::new(space.clone(), owner);
        let mut model: HashMap<u32, u32> = HashMap::new();
        for (kind, g) in ops {
            match kind {
                0 => {
                    let h = table.install(g).unwrap();
                    prop_assert_eq!(*model.entry(g).or_insert(h), h);
                }
                1 => match model.remove(&g) {
                    Some(h) => prop_assert_eq!(table.remove(g), Ok(h)),
                    None => prop_assert_eq!(table.remove(g), Err(TableError::NotMapped(g))),
                },
                _ => match model.get(&g) {
                    Some(&h) => prop_assert_eq!(table.lookup(g), Ok(h)),
                    None => prop_assert_eq!(table.lookup(g), Err(TableError::TranslationFault(g))),
                },
            }
            let distinct: HashSet<u32> = model.values().copied().collect();
            prop_assert_eq!(distinct.len(), model.len(), "host PASIDs are distinct");
            prop_assert_eq!(table.len(), model.len());
            prop_assert_eq!(space.charged(owner).unwrap() as usize, model.len());
        }
    }

    #[test]
    fn guests_are_isolated(ops in prop::collection::vec((any::<bool>(), any::<bool>(), 0u32..64), 1..300)) {
        let space = Arc::new(PasidSpace::new());
        let guests: Vec<GuestPasidTable> = (0..2)
            .map(|_| GuestPasidTable::new(space.clone(), space.register_owner(None)))
            .collect();
        for (which, install, g) in ops {
            let table = &guests[usize::from(which)];
            if install {
                table.install(g).unwrap();
            } else {
                let _ = table.remove(g);
            }
            let mut seen = BTreeSet::new();
            for table in &guests {
                for g in 0..64 {
                    if let Ok(h) = table.lookup(g) {
                        prop_assert_eq!(space.owner_of(Scope::Global, h), Some(table.owner()));
                        prop_assert!(seen.insert(h), "host PASID {} in two places", h);
                    }
                }
            }
        }
    }
}
