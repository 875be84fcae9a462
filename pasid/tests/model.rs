//! Property tests: the host PASID space and the translation table against
//! simple models, over random sequences of operations.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use pasid::{Error, OwnerId, PasidSpace, PasidTable, Scope, PASID_MAX};
use pci::PciAddress;
use proptest::prelude::*;

// ---- allocator ----

const BITS: u32 = 3;
const SIZE: u32 = 1 << BITS;
const OWNERS: usize = 3;
const DEVICES: u16 = 3;

#[derive(Clone, Copy, Debug)]
enum Op {
    Alloc {
        owner: usize,
        scope: Option<u16>,
    },
    Free {
        owner: usize,
        scope: Option<u16>,
        pasid: u32,
    },
    /// Free something the model says is held, by `owner` (right or wrong).
    FreeHeld {
        pick: usize,
        owner: Option<usize>,
    },
    SetLimit {
        owner: usize,
        limit: Option<u32>,
    },
}

fn scope_strategy() -> impl Strategy<Value = Option<u16>> {
    prop_oneof![Just(None), (0..DEVICES).prop_map(Some)]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..OWNERS, scope_strategy()).prop_map(|(owner, scope)| Op::Alloc { owner, scope }),
        1 => (0..OWNERS, scope_strategy(), 0..SIZE + 2)
            .prop_map(|(owner, scope, pasid)| Op::Free { owner, scope, pasid }),
        3 => (any::<usize>(), proptest::option::weighted(0.2, 0..OWNERS))
            .prop_map(|(pick, owner)| Op::FreeHeld { pick, owner }),
        1 => (0..OWNERS, proptest::option::of(0..5u32))
            .prop_map(|(owner, limit)| Op::SetLimit { owner, limit }),
    ]
}

fn to_scope(scope: Option<u16>) -> Scope {
    match scope {
        None => Scope::Global,
        Some(dev) => Scope::Device(PciAddress::from_rid(0x100 + dev * 8)),
    }
}

/// Which owner holds each PASID, per scope.
#[derive(Default)]
struct SpaceModel {
    held: BTreeMap<(Option<u16>, u32), usize>,
    limits: [Option<u32>; OWNERS],
}

impl SpaceModel {
    fn charged(&self, owner: usize) -> u32 {
        self.held.values().filter(|&&o| o == owner).count() as u32
    }

    fn busy(&self, scope: Option<u16>, pasid: u32) -> bool {
        self.held
            .keys()
            .any(|&(s, p)| p == pasid && (s.is_none() || scope.is_none() || s == scope))
    }

    fn alloc(&self, owner: usize, scope: Option<u16>) -> Result<BTreeSet<u32>, Error> {
        if let Some(limit) = self.limits[owner] {
            if self.charged(owner) >= limit {
                return Err(Error::OverLimit {
                    owner: OwnerId::VMM,
                    limit,
                });
            }
        }
        let free: BTreeSet<u32> = (1..SIZE).filter(|&p| !self.busy(scope, p)).collect();
        if free.is_empty() {
            Err(Error::NoSpace(to_scope(scope)))
        } else {
            Ok(free)
        }
    }

    fn free(&self, owner: usize, scope: Option<u16>, pasid: u32) -> Result<(), Error> {
        if pasid == 0 {
            return Err(Error::Reserved);
        }
        if pasid >= SIZE {
            return Err(Error::OutOfRange(pasid));
        }
        match self.held.get(&(scope, pasid)) {
            None => Err(Error::NotAllocated {
                pasid,
                scope: to_scope(scope),
            }),
            Some(&holder) if holder != owner => Err(Error::NotOwner {
                pasid,
                owner: OwnerId::VMM,
            }),
            Some(_) => Ok(()),
        }
    }
}

/// Errors carry owner ids the model does not know: compare with the owner
/// put back in.
fn with_owner(err: Error, owner: OwnerId) -> Error {
    match err {
        Error::OverLimit { limit, .. } => Error::OverLimit { owner, limit },
        Error::NotOwner { pasid, .. } => Error::NotOwner { pasid, owner },
        other => other,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn allocator_matches_model(ops in proptest::collection::vec(op_strategy(), 1..120)) {
        let space = PasidSpace::with_bits(BITS).unwrap();
        let owners: Vec<OwnerId> = std::iter::once(OwnerId::VMM)
            .chain((1..OWNERS).map(|i| space.add_owner(&format!("guest{i}"), None)))
            .collect();
        let mut model = SpaceModel::default();
        for op in ops {
            match op {
                Op::Alloc { owner, scope } => {
                    let got = space.alloc(owners[owner], to_scope(scope));
                    match (model.alloc(owner, scope), got) {
                        (Ok(free), Ok(pasid)) => {
                            prop_assert!(free.contains(&pasid), "{pasid} not free in {free:?}");
                            model.held.insert((scope, pasid), owner);
                        }
                        (Err(want), got) => prop_assert_eq!(Err(with_owner(want, owners[owner])), got),
                        (Ok(_), Err(err)) => prop_assert!(false, "unexpected {err}"),
                    }
                }
                Op::Free { owner, scope, pasid } => {
                    let want = model.free(owner, scope, pasid).map_err(|e| with_owner(e, owners[owner]));
                    prop_assert_eq!(space.free(owners[owner], to_scope(scope), pasid), want);
                    if want.is_ok() {
                        model.held.remove(&(scope, pasid));
                    }
                }
                Op::FreeHeld { pick, owner } => {
                    if model.held.is_empty() {
                        continue;
                    }
                    let (&(scope, pasid), &holder) = model.held.iter().nth(pick % model.held.len()).unwrap();
                    let owner = owner.unwrap_or(holder);
                    let want = model.free(owner, scope, pasid).map_err(|e| with_owner(e, owners[owner]));
                    prop_assert_eq!(space.free(owners[owner], to_scope(scope), pasid), want);
                    if want.is_ok() {
                        model.held.remove(&(scope, pasid));
                    }
                }
                Op::SetLimit { owner, limit } => {
                    space.set_limit(owners[owner], limit).unwrap();
                    model.limits[owner] = limit;
                }
            }
            prop_assert_eq!(space.allocated(), model.held.len() as u32);
            for (i, &owner) in owners.iter().enumerate() {
                prop_assert_eq!(space.charged(owner), Ok(model.charged(i)));
            }
            for scope in std::iter::once(None).chain((0..DEVICES).map(Some)) {
                for pasid in 0..SIZE + 1 {
                    let want = model.held.get(&(scope, pasid)).map(|&o| owners[o]);
                    prop_assert_eq!(space.owner_of(to_scope(scope), pasid), want);
                }
            }
        }
    }
}

// ---- translation table ----

#[derive(Clone, Copy, Debug)]
enum TableOp {
    Install(u32),
    Remove(u32),
    Translate(u32),
    /// The VMM takes (or gives back) a host PASID of its own, competing
    /// with the guest for the space.
    VmmAlloc,
    VmmFree,
    SetLimit(Option<u32>),
    Clear,
}

fn gpasid_strategy() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => 0..8u32,
        3 => prop::sample::select(vec![1023, 1024, 1025, 0x8_0000, PASID_MAX]),
        1 => prop::sample::select(vec![PASID_MAX + 1, 0x7fff_ffff, u32::MAX]),
    ]
}

fn table_op_strategy() -> impl Strategy<Value = TableOp> {
    prop_oneof![
        6 => gpasid_strategy().prop_map(TableOp::Install),
        4 => gpasid_strategy().prop_map(TableOp::Remove),
        4 => gpasid_strategy().prop_map(TableOp::Translate),
        1 => Just(TableOp::VmmAlloc),
        1 => Just(TableOp::VmmFree),
        1 => proptest::option::of(0..6u32).prop_map(TableOp::SetLimit),
        1 => Just(TableOp::Clear),
    ]
}

const TABLE_BITS: u32 = 4;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn table_matches_model(ops in proptest::collection::vec(table_op_strategy(), 1..150)) {
        let space = Arc::new(PasidSpace::with_bits(TABLE_BITS).unwrap());
        let guest = space.add_owner("guest", None);
        let table = PasidTable::new(space.clone(), guest).unwrap();
        let mut model: BTreeMap<u32, u32> = BTreeMap::new();
        let mut vmm_held: Vec<u32> = Vec::new();
        let mut limit = None;
        for op in ops {
            match op {
                TableOp::Install(g) => {
                    let got = table.install(g);
                    if g > PASID_MAX {
                        prop_assert_eq!(got, Err(Error::OutOfRange(g)));
                    } else if g == 0 {
                        prop_assert_eq!(got, Err(Error::Reserved));
                    } else if let Some(&h) = model.get(&g) {
                        prop_assert_eq!(got, Ok(h));
                    } else if limit.is_some_and(|l| model.len() as u32 >= l) {
                        prop_assert_eq!(got, Err(Error::OverLimit { owner: guest, limit: limit.unwrap() }));
                    } else if model.len() + vmm_held.len() == (1 << TABLE_BITS) - 1 {
                        prop_assert_eq!(got, Err(Error::NoSpace(Scope::Global)));
                    } else {
                        let h = got.unwrap();
                        prop_assert!(h != 0 && h < 1 << TABLE_BITS);
                        prop_assert!(!model.values().any(|&v| v == h) && !vmm_held.contains(&h));
                        model.insert(g, h);
                    }
                }
                TableOp::Remove(g) => {
                    let want = if g > PASID_MAX {
                        Err(Error::OutOfRange(g))
                    } else {
                        model.remove(&g).ok_or(Error::NotInstalled(g))
                    };
                    prop_assert_eq!(table.remove(g), want);
                }
                TableOp::Translate(g) => {
                    let want = if g > PASID_MAX {
                        Err(Error::OutOfRange(g))
                    } else {
                        model.get(&g).copied().ok_or(Error::TranslationFault(g))
                    };
                    prop_assert_eq!(table.translate(g), want);
                }
                TableOp::VmmAlloc => {
                    if let Ok(h) = space.alloc(OwnerId::VMM, Scope::Global) {
                        vmm_held.push(h);
                    }
                }
                TableOp::VmmFree => {
                    if let Some(h) = vmm_held.pop() {
                        space.free(OwnerId::VMM, Scope::Global, h).unwrap();
                    }
                }
                TableOp::SetLimit(l) => {
                    space.set_limit(guest, l).unwrap();
                    limit = l;
                }
                TableOp::Clear => {
                    prop_assert_eq!(table.clear(), model.len() as u32);
                    model.clear();
                }
            }
            let entries: Vec<(u32, u32)> = model.iter().map(|(&g, &h)| (g, h)).collect();
            prop_assert_eq!(table.entries(), entries);
            prop_assert_eq!(table.len(), model.len() as u32);
            prop_assert_eq!(space.charged(guest), Ok(model.len() as u32));
            for &h in model.values() {
                prop_assert_eq!(space.owner_of(Scope::Global, h), Some(guest));
            }
        }
        drop(table);
        prop_assert_eq!(space.charged(guest), Ok(0));
    }
}
