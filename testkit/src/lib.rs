//! What the device crates' hostile soaks (`vdsa/tests/soak.rs`,
//! `viommu/tests/soak.rs`) share: a seeded, reproducible random number
//! generator, their settings from the environment (`SOAK_OPS`,
//! `SOAK_SEED`), and canary memory that must come through the storm
//! unchanged. A dev-dependency only: never part of a machine.

#![forbid(unsafe_code)]

/// Operations a soak runs unless `SOAK_OPS` says otherwise (what CI runs).
pub const DEFAULT_SOAK_OPS: u64 = 1_000_000;

/// xorshift64*: fast, reproducible from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator started at `seed` (which must not be 0: xorshift stays
    /// at 0).
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// True `percent` times in 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// `len` pseudo-random bytes from `seed`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed | 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// How long a soak runs and from which seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoakSettings {
    /// Operations: `SOAK_OPS`, else [`DEFAULT_SOAK_OPS`].
    pub ops: u64,
    /// The random seed: `SOAK_SEED`, else the soak's own default.
    pub seed: u64,
}

impl SoakSettings {
    /// The settings from the environment, `default_seed` when `SOAK_SEED`
    /// is not set (or not a number).
    pub fn from_env(default_seed: u64) -> Self {
        let var = |name| std::env::var(name).ok().and_then(|v| v.parse().ok());
        Self {
            ops: var("SOAK_OPS").unwrap_or(DEFAULT_SOAK_OPS),
            seed: var("SOAK_SEED").unwrap_or(default_seed),
        }
    }
}

/// Guest memory no operation of the soak may touch, and what it must hold.
#[derive(Clone, Debug)]
pub struct Canary {
    start: u64,
    expected: Vec<u8>,
}

impl Canary {
    /// The canary at guest address `start` holding `expected`.
    pub fn new(start: u64, expected: Vec<u8>) -> Self {
        Self { start, expected }
    }

    /// Its guest address.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// What it must hold (the soak writes it to memory first).
    pub fn expected(&self) -> &[u8] {
        &self.expected
    }

    /// Panics, naming the first changed byte's address, unless `now` (the
    /// canary's memory after `ops` operations) still holds what it must.
    pub fn check(&self, now: &[u8], ops: u64) {
        if let Some(at) = now
            .iter()
            .zip(self.expected.iter())
            .position(|(a, b)| a != b)
        {
            panic!(
                "after {ops} operations the canary at {:#x} changed",
                self.start + at as u64
            );
        }
        assert_eq!(now.len(), self.expected.len(), "canary length");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_reproducible_and_in_range() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let first: Vec<u64> = (0..4).map(|_| a.next()).collect();
        assert_eq!(first, (0..4).map(|_| b.next()).collect::<Vec<_>>());
        assert_ne!(first[0], first[1]);
        assert!((0..1000).all(|_| a.below(10) < 10));
        assert!(!(0..1000).any(|_| a.chance(0)));
        assert_eq!(pattern(16, 3), pattern(16, 3));
        assert_ne!(pattern(16, 3), pattern(16, 5));
    }

    #[test]
    #[should_panic(expected = "after 9 operations the canary at 0x1002 changed")]
    fn a_changed_canary_names_its_address() {
        let canary = Canary::new(0x1000, vec![1, 2, 3, 4]);
        canary.check(&[1, 2, 3, 4], 8);
        canary.check(&[1, 2, 0, 4], 9);
    }
}
