//! Concurrency: vCPU-like reader threads translate while the VMM installs
//! and removes entries.

use std::collections::HashMap;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier};
use std::thread;

use pasid::{Error, PasidSpace, PasidTable, PASID_MAX};

/// Guest PASIDs the writer toggles, spread over several directory slots
/// (leaves get created while readers run).
const GPASIDS: [u32; 16] = [
    1, 2, 3, 1023, 1024, 1025, 4096, 5000, 65_536, 70_000, 300_000, 524_288, 700_001, 999_999,
    1_048_000, PASID_MAX,
];
const CYCLES: usize = 1_000_000;
const READERS: usize = 2;

/// What the writer publishes around every change: `seq` is odd while a
/// change is in flight (a seqlock), `current[i]` the host PASID of
/// `GPASIDS[i]` (0 when absent) once the change is done.
struct Published {
    seq: AtomicU64,
    current: [AtomicU32; GPASIDS.len()],
    done: AtomicBool,
}

/// A mapping seen while a change was in flight that was neither the
/// published mapping before nor after the read: checked against the
/// writer's log at the end.
#[derive(PartialEq)]
struct Unexplained {
    index: usize,
    hpasid: u32,
    /// `seq` before and after the read.
    window: (u64, u64),
}

struct ReaderReport {
    reads: u64,
    /// Reads during which nothing changed, checked on the spot.
    exact: u64,
    unexplained: Vec<Unexplained>,
}

fn reader(table: &PasidTable, published: &Published, seed: u64) -> ReaderReport {
    let mut report = ReaderReport {
        reads: 0,
        exact: 0,
        unexplained: Vec::new(),
    };
    let mut rng = seed | 1;
    while !published.done.load(SeqCst) {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let i = (rng % GPASIDS.len() as u64) as usize;
        let gpasid = GPASIDS[i];
        let before_seq = published.seq.load(SeqCst);
        let before = published.current[i].load(SeqCst);
        let got = table.translate(gpasid);
        fence(SeqCst);
        let after = published.current[i].load(SeqCst);
        let after_seq = published.seq.load(SeqCst);
        report.reads += 1;
        let hpasid = match got {
            Ok(h) => {
                assert!(h != 0 && h <= PASID_MAX, "garbage host PASID {h:#x}");
                h
            }
            Err(Error::TranslationFault(g)) => {
                assert_eq!(g, gpasid);
                0
            }
            Err(err) => panic!("translate({gpasid:#x}): {err}"),
        };
        if before_seq == after_seq && before_seq % 2 == 0 {
            // Nothing changed during the read: exactly the published mapping.
            assert_eq!(hpasid, before, "guest PASID {gpasid:#x}");
            report.exact += 1;
        } else if hpasid != 0 && hpasid != before && hpasid != after {
            let seen = Unexplained {
                index: i,
                hpasid,
                window: (before_seq, after_seq),
            };
            // The same read repeated within one window proves nothing more.
            if report.unexplained.last() != Some(&seen) {
                report.unexplained.push(seen);
            }
        }
    }
    report
}

#[test]
fn readers_see_old_or_new_mapping_and_nothing_leaks() {
    let space = Arc::new(PasidSpace::new());
    let guest = space.add_owner("guest", Some(GPASIDS.len() as u32));
    let table = Arc::new(PasidTable::new(space.clone(), guest).unwrap());
    let published = Arc::new(Published {
        seq: AtomicU64::new(0),
        current: Default::default(),
        done: AtomicBool::new(false),
    });
    let start = Arc::new(Barrier::new(READERS + 1));
    let readers: Vec<_> = (0..READERS)
        .map(|n| {
            let (table, published, start) = (table.clone(), published.clone(), start.clone());
            thread::spawn(move || {
                start.wait();
                reader(
                    &table,
                    &published,
                    0x9e37_79b9_7f4a_7c15u64.wrapping_mul(n as u64 + 1),
                )
            })
        })
        .collect();

    // Host PASID -> (index of the guest PASID, seq of the install, seq of
    // the removal): the mapping was in the table within that seq range.
    // Next-fit allocation does not wrap in 10^6 installs, so every install
    // gets a new host PASID.
    let mut log: HashMap<u32, (usize, u64, u64)> = HashMap::with_capacity(CYCLES);
    start.wait();
    for step in 0..2 * CYCLES {
        let i = step % GPASIDS.len();
        let seq = published.seq.fetch_add(1, SeqCst) + 1;
        fence(SeqCst);
        let current = published.current[i].load(SeqCst);
        let now = if current == 0 {
            table.install(GPASIDS[i]).unwrap()
        } else {
            assert_eq!(table.remove(GPASIDS[i]), Ok(current));
            0
        };
        published.current[i].store(now, SeqCst);
        published.seq.fetch_add(1, SeqCst);
        if now != 0 {
            assert!(log.insert(now, (i, seq, u64::MAX)).is_none());
        } else {
            log.get_mut(&current).unwrap().2 = seq;
        }
    }
    published.done.store(true, SeqCst);
    let reports: Vec<ReaderReport> = readers.into_iter().map(|r| r.join().unwrap()).collect();

    // 2 * CYCLES toggles over an even number of guest PASIDs: all removed.
    assert!(table.is_empty());
    assert_eq!(log.len(), CYCLES);
    assert_eq!(space.charged(guest), Ok(0));
    assert_eq!(space.allocated(), 0);

    for report in &reports {
        eprintln!(
            "reader: {} reads, {} while quiescent, {} checked against the log",
            report.reads,
            report.exact,
            report.unexplained.len()
        );
        assert!(report.reads > 0, "reader never ran");
        for seen in &report.unexplained {
            let gpasid = GPASIDS[seen.index];
            let Some(&(i, installed, removed)) = log.get(&seen.hpasid) else {
                panic!("{gpasid:#x} read as {:#x}, never installed", seen.hpasid);
            };
            assert_eq!(GPASIDS[i], gpasid, "read another guest PASID's mapping");
            assert!(
                installed <= seen.window.1 && removed >= seen.window.0,
                "{gpasid:#x} read as {:#x} in seq {:?}, mapped in {installed}..={removed}",
                seen.hpasid,
                seen.window
            );
        }
    }
}

#[test]
fn concurrent_faults_on_one_guest_pasid_install_it_once() {
    let space = Arc::new(PasidSpace::new());
    let guest = space.add_owner("guest", None);
    let table = Arc::new(PasidTable::new(space.clone(), guest).unwrap());
    for gpasid in 1..=200 {
        let start = Arc::new(Barrier::new(4));
        let got: Vec<u32> = (0..4)
            .map(|_| {
                let (table, start) = (table.clone(), start.clone());
                thread::spawn(move || {
                    start.wait();
                    table.install(gpasid).unwrap()
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(got.iter().all(|&h| h == got[0]), "{got:?}");
    }
    assert_eq!(space.charged(guest), Ok(200));
}
