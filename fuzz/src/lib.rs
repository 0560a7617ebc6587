//! What each fuzz target checks. The targets in `fuzz_targets/` are one
//! line each; the properties live here so they read as a whole and can be
//! run by hand on a single input (`scripts/fuzz.sh run TARGET FILE`).

pub mod audit_tap;
pub mod backend;
pub mod config;
pub mod das;
pub mod frame;
pub mod proof;
pub mod saml;
pub mod startup;

/// A small deterministic generator for chunk sizes, seeded from the input
/// so a crash replays exactly.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: &[u8]) -> Self {
        let mut s = 0x9e37_79b9_7f4a_7c15u64;
        for &b in seed {
            s = (s ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        Rng(s | 1)
    }

    /// xorshift64*
    pub(crate) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `1..=max`.
    pub(crate) fn size(&mut self, max: usize) -> usize {
        1 + (self.next() % max as u64) as usize
    }
}
