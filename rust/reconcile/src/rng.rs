//! Random numbers: the secret-seed source (OS CSPRNG or an injected seeded generator) and
//! the public, deterministic generator both peers use to derive shuffles from a shared seed.

use crate::ReconcileError;

/// Source of the seeds a peer chooses: verification-hash keys, Cascade shuffle seeds,
/// sample seeds and privacy-amplification seeds.
///
/// Production uses [`OsRandom`]; tests inject [`SeededRandom`] so that runs repeat.
pub trait RandomSource: Send {
    /// Fills `dest` with random bytes.
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), ReconcileError>;

    /// Returns a random `u64`.
    fn next_u64(&mut self) -> Result<u64, ReconcileError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

/// The operating system's CSPRNG (`getrandom`).
#[derive(Debug, Default, Clone, Copy)]
pub struct OsRandom;

impl RandomSource for OsRandom {
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), ReconcileError> {
        getrandom::fill(dest).map_err(|e| ReconcileError::Random(e.to_string()))
    }
}

/// A seeded, repeatable generator for tests and benchmarks. Not a CSPRNG: never use it
/// for keys that protect data.
#[derive(Debug, Clone)]
pub struct SeededRandom(Xoshiro256);

impl SeededRandom {
    pub fn new(seed: u64) -> Self {
        SeededRandom(Xoshiro256::new(seed))
    }
}

impl RandomSource for SeededRandom {
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), ReconcileError> {
        for chunk in dest.chunks_mut(8) {
            let w = self.0.next_u64().to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
        Ok(())
    }
}

/// xoshiro256** (Blackman and Vigna), seeded through SplitMix64. Fast and statistically
/// good, but predictable: it only expands public seeds, never secret ones.
#[derive(Debug, Clone)]
pub struct Xoshiro256 {
    s: [u64; 4],
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Xoshiro256 {
    pub fn new(seed: u64) -> Self {
        let mut st = seed;
        Xoshiro256 {
            s: [
                splitmix64(&mut st),
                splitmix64(&mut st),
                splitmix64(&mut st),
                splitmix64(&mut st),
            ],
        }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Returns a uniform integer in `0 .. bound` (Lemire's multiply-and-reject method; the
    /// division that sets the rejection threshold runs only in the rare candidate case).
    #[inline]
    pub fn below(&mut self, bound: u64) -> u64 {
        debug_assert!(bound > 0);
        let mut m = u128::from(self.next_u64()) * u128::from(bound);
        if (m as u64) < bound {
            let threshold = bound.wrapping_neg() % bound;
            while (m as u64) < threshold {
                m = u128::from(self.next_u64()) * u128::from(bound);
            }
        }
        (m >> 64) as u64
    }
}

/// Elements per bucket of [`permutation`]: 32 KiB of `u32`, so that each bucket's shuffle
/// stays in the L1/L2 cache.
const PERMUTATION_BUCKET: usize = 8192;

/// Returns a uniformly random permutation of `0 .. n` derived from `seed`: entry `i` is the
/// original position placed at position `i`.
///
/// Each element first goes to a uniformly random bucket (in order), then every bucket is
/// shuffled with Fisher-Yates and the buckets are concatenated. Every arrangement is equally
/// likely, as with one Fisher-Yates shuffle of the whole range, but the random swaps stay in
/// the cache: about 3 times faster at 10^6 elements than one shuffle of 4 MB.
pub fn permutation(seed: u64, n: usize) -> Vec<u32> {
    assert!(
        n.div_ceil(PERMUTATION_BUCKET) <= 1 << 16,
        "permutation of {n} elements"
    );
    let mut rng = Draws32::new(seed);
    let buckets = n.div_ceil(PERMUTATION_BUCKET).max(1) as u32;
    // At most 2^26 / 8192 buckets for the largest block, so an id fits 16 bits.
    let bucket_of: Vec<u16> = (0..n).map(|_| rng.below(buckets) as u16).collect();
    let mut offsets = vec![0usize; buckets as usize + 1];
    for &b in &bucket_of {
        offsets[b as usize + 1] += 1;
    }
    for b in 0..buckets as usize {
        offsets[b + 1] += offsets[b];
    }
    let mut cursor = offsets.clone();
    let mut p = vec![0u32; n];
    for (i, &b) in bucket_of.iter().enumerate() {
        p[cursor[b as usize]] = i as u32;
        cursor[b as usize] += 1;
    }
    for b in 0..buckets as usize {
        let slice = &mut p[offsets[b]..offsets[b + 1]];
        for i in (1..slice.len()).rev() {
            let j = rng.below(i as u32 + 1) as usize;
            slice.swap(i, j);
        }
    }
    p
}

/// 32-bit draws, two per xoshiro256** output, for bounds below 2^32.
struct Draws32 {
    rng: Xoshiro256,
    spare: Option<u32>,
}

impl Draws32 {
    fn new(seed: u64) -> Self {
        Draws32 {
            rng: Xoshiro256::new(seed),
            spare: None,
        }
    }

    #[inline]
    fn next_u32(&mut self) -> u32 {
        match self.spare.take() {
            Some(v) => v,
            None => {
                let w = self.rng.next_u64();
                self.spare = Some((w >> 32) as u32);
                w as u32
            }
        }
    }

    /// Uniform integer in `0 .. bound` (Lemire's method, 32-bit).
    #[inline]
    fn below(&mut self, bound: u32) -> u32 {
        debug_assert!(bound > 0);
        let mut m = u64::from(self.next_u32()) * u64::from(bound);
        if (m as u32) < bound {
            let threshold = bound.wrapping_neg() % bound;
            while (m as u32) < threshold {
                m = u64::from(self.next_u32()) * u64::from(bound);
            }
        }
        (m >> 32) as u32
    }
}

/// Returns `count` distinct positions in `0 .. n`, sorted, derived from `seed`.
pub fn sample_positions(seed: u64, n: usize, count: usize) -> Vec<usize> {
    assert!(count <= n, "sample of {count} positions from {n}");
    let mut rng = Xoshiro256::new(seed);
    // Floyd's algorithm: `count` draws, no rejection loop, no O(n) table.
    let mut chosen = std::collections::HashSet::with_capacity(count);
    for j in (n - count)..n {
        let t = rng.below(j as u64 + 1) as usize;
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    let mut v: Vec<usize> = chosen.into_iter().collect();
    v.sort_unstable();
    v
}

/// Simulates a raw-key pair for tests and benchmarks: `n` uniformly random bits and a
/// copy in which each bit is flipped independently with probability `qber`.
pub fn simulated_key_pair(
    n: usize,
    qber: f64,
    seed: u64,
) -> (crate::bits::BitVec, crate::bits::BitVec) {
    let mut rng = Xoshiro256::new(seed);
    let mut reference = crate::bits::BitVec::zeros(n);
    for i in 0..n {
        reference.set(i, rng.next_u64() & 1 == 1);
    }
    let mut noisy = reference.clone();
    // Compare 53 random bits with qber · 2^53: an exact Bernoulli(qber) draw.
    let threshold = (qber.clamp(0.0, 1.0) * 2f64.powi(53)) as u64;
    for i in 0..n {
        if rng.next_u64() >> 11 < threshold {
            noisy.flip(i);
        }
    }
    (reference, noisy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_is_a_bijection() {
        let p = permutation(42, 1000);
        let mut seen = vec![false; 1000];
        for &x in &p {
            assert!(!seen[x as usize]);
            seen[x as usize] = true;
        }
        assert_ne!(p, (0..1000).collect::<Vec<u32>>());
        assert_eq!(p, permutation(42, 1000));
    }

    #[test]
    fn sample_positions_are_distinct_and_in_range() {
        let s = sample_positions(7, 500, 120);
        assert_eq!(s.len(), 120);
        assert!(s.windows(2).all(|w| w[0] < w[1]));
        assert!(*s.last().unwrap() < 500);
        assert_eq!(sample_positions(7, 10, 10), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn below_stays_in_bound() {
        let mut r = Xoshiro256::new(1);
        let mut counts = [0usize; 3];
        for _ in 0..3000 {
            counts[r.below(3) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 900), "{counts:?}");
    }
}
