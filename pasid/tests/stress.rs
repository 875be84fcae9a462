//! Readers translate while a writer installs and removes entries.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use pasid::{GuestPasidTable, PasidSpace, TableError, PASID_COUNT};

#[test]
fn readers_see_old_or_new_mapping_and_nothing_leaks() {
    let space = Arc::new(PasidSpace::new());
    let owner = space.register_owner(None);
    let table = Arc::new(GuestPasidTable::new(space.clone(), owner));
    // Stable entries never change: readers must always see exactly these.
    let stable: Vec<(u32, u32)> = (0..64)
        .map(|g| (g * 16_411, table.install(g * 16_411).unwrap()))
        .collect();
    // Churned entries flip between absent and some host PASID.
    let churn: Vec<u32> = (0..8).map(|i| 1000 + i).collect();
    let done = Arc::new(AtomicBool::new(false));

    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (table, stable, churn, done) =
                (table.clone(), stable.clone(), churn.clone(), done.clone());
            thread::spawn(move || {
                let mut observed = 0u64;
                while !done.load(Ordering::Relaxed) {
                    for &(g, h) in &stable {
                        assert_eq!(table.lookup(g), Ok(h));
                    }
                    for &g in &churn {
                        match table.lookup(g) {
                            Ok(h) => {
                                assert!(h != 0 && h < PASID_COUNT, "garbage host PASID {h:#x}");
                                observed += 1;
                            }
                            Err(e) => assert_eq!(e, TableError::TranslationFault(g)),
                        }
                    }
                }
                observed
            })
        })
        .collect();

    const CYCLES: usize = 1_000_000;
    for i in 0..CYCLES {
        let g = churn[i % churn.len()];
        table.install(g).unwrap();
        table.remove(g).unwrap();
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("reader saw a torn or foreign mapping");
    }

    assert_eq!(space.charged(owner), Ok(stable.len() as u32));
    for &(g, _) in &stable {
        table.remove(g).unwrap();
    }
    assert_eq!(space.charged(owner), Ok(0), "every charge came back");
    assert_eq!(space.allocated(), 0);
}
