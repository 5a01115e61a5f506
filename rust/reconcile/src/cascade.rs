//! Cascade information reconciliation, split into the two roles of the protocol.
//!
//! The [`ParityOracle`] keeps the reference key and only returns the parities requested of it. The
//! [`Corrector`] holds the noisy key, decides what to ask, and flips its own bits until
//! every block parity of every pass agrees with the oracle's.
//!
//! Variant (after Martinez-Mateo et al., "Demystifying the information reconciliation
//! protocol Cascade", QIC 15 (2015)): every pass shuffles the key with its own public
//! permutation; pass `p` uses blocks of `k_0 · 2^p` bits (powers of two), all odd blocks are
//! bisected in parallel so that one round trip serves every open bisection; an error found
//! in one pass re-opens the blocks that contain it in every other pass (the cascade); and
//! every parity the oracle disclosed is remembered, so the parity of the second half of a
//! block (parent XOR first half) and any sub-block parity revealed earlier are never asked
//! for again. The corrector asks one parity per bisection level; each answer costs one
//! disclosed bit on both sides.

use crate::bits::BitVec;
use crate::rng::permutation;

/// Largest number of passes a request may open.
pub const MAX_PASSES: usize = 32;

/// Returns the seed of the permutation of pass `pass` derived from the block's shuffle seed.
fn pass_seed(shuffle_seed: u64, pass: usize) -> u64 {
    shuffle_seed ^ (pass as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Number of passes. With the block sizes of [`block_sizes`], four passes left no residual
/// error in any simulated block of the benchmark table (docs/benchmarks.md); a residual
/// error would still be caught by the verification hash.
pub const DEFAULT_PASSES: usize = 4;

/// Block sizes of the passes for `n` bits at an expected QBER.
///
/// The first block holds about 1.5 expected errors (`k_0 = round(1.5 / qber)`, at least 4
/// bits); each later pass triples the block size. Tuned by simulation over QBER 1-8 % and
/// blocks of 10^5 bits: first-pass sizes between 1 and 2 expected errors and a growth
/// factor of 3 gave the lowest disclosed parities with no residual errors.
pub fn block_sizes(n: usize, qber: f64, passes: usize) -> Vec<usize> {
    let q = qber.clamp(1e-6, 0.5);
    let k0 = (1.5 / q).round().clamp(4.0, (1u64 << 24) as f64) as usize;
    let mut k = k0;
    let mut out = Vec::with_capacity(passes);
    for _ in 0..passes {
        out.push(k.min(n.max(1)));
        k = k.saturating_mul(3);
    }
    out
}

/// A range of bits in the shuffled key of one pass whose oracle parity is requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParityRange {
    pub pass: u8,
    pub start: u32,
    pub len: u32,
}

/// One request of the corrector: optionally open the next pass (the oracle then returns
/// the parities of all its blocks), and the parities of individual ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParityRequest {
    /// (pass index, block size) of a pass to open.
    pub open_pass: Option<(u8, u32)>,
    pub ranges: Vec<ParityRange>,
}

impl ParityRequest {
    /// Number of parity bits the answer carries for a key of `n` bits.
    pub fn answer_len(&self, n: usize) -> usize {
        let top = self
            .open_pass
            .map_or(0, |(_, k)| n.div_ceil((k as usize).max(1)));
        top + self.ranges.len()
    }
}

/// Errors of a peer's Cascade request or answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CascadeError {
    #[error("request opens pass {pass}, but the next pass is {expected}")]
    PassOrder { pass: usize, expected: usize },
    #[error("block size {size} of pass {pass} is invalid: it must be 1 ..= {n} (the key length)")]
    BlockSize { pass: usize, size: usize, n: usize },
    #[error(
        "range {start}+{len} of pass {pass} is invalid for a {n}-bit key with {passes} open passes"
    )]
    Range {
        pass: usize,
        start: usize,
        len: usize,
        n: usize,
        passes: usize,
    },
    #[error("answer has {got} parity bits, expected {expected}")]
    AnswerLength { got: usize, expected: usize },
    #[error("no request is outstanding")]
    Unexpected,
    #[error("Cascade did not converge after {flips} bit flips in a {n}-bit key: the parities disclosed so far contradict each other")]
    Diverged { flips: u64, n: usize },
}

/// The reference side: answers parity requests on its key and counts what it discloses.
pub struct ParityOracle {
    n: usize,
    shuffle_seed: u64,
    key: BitVec,
    passes: Vec<BitVec>,
    disclosed: u64,
}

impl ParityOracle {
    pub fn new(key: BitVec, shuffle_seed: u64) -> Self {
        ParityOracle {
            n: key.len(),
            shuffle_seed,
            key,
            passes: Vec::new(),
            disclosed: 0,
        }
    }

    /// Parity bits disclosed so far.
    pub fn disclosed(&self) -> u64 {
        self.disclosed
    }

    pub fn key(&self) -> &BitVec {
        &self.key
    }

    /// Checks a request completely, then returns its parities in request order.
    pub fn answer(&mut self, request: &ParityRequest) -> Result<Vec<bool>, CascadeError> {
        let mut open_passes = self.passes.len();
        if let Some((pass, size)) = request.open_pass {
            let (pass, size) = (pass as usize, size as usize);
            if pass != self.passes.len() || pass >= MAX_PASSES {
                return Err(CascadeError::PassOrder {
                    pass,
                    expected: self.passes.len(),
                });
            }
            if size == 0 || size > self.n {
                return Err(CascadeError::BlockSize {
                    pass,
                    size,
                    n: self.n,
                });
            }
            open_passes += 1;
        }
        for r in &request.ranges {
            let (pass, start, len) = (r.pass as usize, r.start as usize, r.len as usize);
            if pass >= open_passes || len == 0 || start + len > self.n {
                return Err(CascadeError::Range {
                    pass,
                    start,
                    len,
                    n: self.n,
                    passes: open_passes,
                });
            }
        }

        let mut out = Vec::with_capacity(request.answer_len(self.n));
        if let Some((pass, size)) = request.open_pass {
            let perm = permutation(pass_seed(self.shuffle_seed, pass as usize), self.n);
            let shuffled = self.key.gather(&perm);
            let size = size as usize;
            for start in (0..self.n).step_by(size) {
                out.push(shuffled.parity(start, size.min(self.n - start)));
            }
            self.passes.push(shuffled);
        }
        for r in &request.ranges {
            out.push(self.passes[r.pass as usize].parity(r.start as usize, r.len as usize));
        }
        self.disclosed += out.len() as u64;
        Ok(out)
    }
}

struct Pass {
    k: usize,
    /// Heap indices of a block's bisection tree stay below this power of two.
    stride: usize,
    perm: Vec<u32>,
    inv: Vec<u32>,
    bits: BitVec,
    oracle_top: Vec<bool>,
    odd: Vec<bool>,
    pending: Vec<bool>,
    /// Oracle parities of bisection nodes, indexed `block · stride + heap index`.
    known: BitVec,
    known_value: BitVec,
}

impl Pass {
    fn node(&self, block: usize, heap: usize) -> usize {
        block * self.stride + heap
    }
}

/// The request awaiting its answer: the pass being opened, and the bisection node
/// (pass, block, heap index) of each requested range.
type Outstanding = (Option<usize>, Vec<(usize, usize, usize)>);

/// The corrector's next step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorrectorStep {
    Request(ParityRequest),
    Done,
}

/// The correcting side, which keeps the noisy key and drives the passes.
pub struct Corrector {
    n: usize,
    shuffle_seed: u64,
    sizes: Vec<usize>,
    key: BitVec,
    passes: Vec<Pass>,
    candidates: Vec<(usize, usize)>,
    outstanding: Option<Outstanding>,
    disclosed: u64,
    corrected: u64,
}

impl Corrector {
    /// Starts a corrector for `key` with the pass block sizes `sizes` (see [`block_sizes`]).
    pub fn new(key: BitVec, shuffle_seed: u64, sizes: Vec<usize>) -> Self {
        Corrector {
            n: key.len(),
            shuffle_seed,
            sizes,
            key,
            passes: Vec::new(),
            candidates: Vec::new(),
            outstanding: None,
            disclosed: 0,
            corrected: 0,
        }
    }

    /// Returns the first request (opening pass 0), or `Done` for an empty key.
    pub fn start(&mut self) -> CorrectorStep {
        self.advance()
            .expect("no flips happen before the first answer")
    }

    pub fn disclosed(&self) -> u64 {
        self.disclosed
    }

    /// Bits flipped so far: the number of errors found.
    pub fn corrected(&self) -> u64 {
        self.corrected
    }

    pub fn key(&self) -> &BitVec {
        &self.key
    }

    pub fn into_key(self) -> BitVec {
        self.key
    }

    /// Applies the oracle's answer to the outstanding request and returns the next step.
    pub fn handle_answer(&mut self, parities: &[bool]) -> Result<CorrectorStep, CascadeError> {
        let (opened, ranges) = self.outstanding.take().ok_or(CascadeError::Unexpected)?;
        let top = opened.map_or(0, |p| self.n.div_ceil(self.sizes[p]));
        let expected = top + ranges.len();
        if parities.len() != expected {
            self.outstanding = Some((opened, ranges));
            return Err(CascadeError::AnswerLength {
                got: parities.len(),
                expected,
            });
        }
        self.disclosed += expected as u64;
        if let Some(p) = opened {
            self.open_pass(p, parities[..top].to_vec());
        }
        for (&(p, block, heap), &value) in ranges.iter().zip(&parities[top..]) {
            let pass = &mut self.passes[p];
            let idx = pass.node(block, heap);
            pass.known.set(idx, true);
            pass.known_value.set(idx, value);
            pass.pending[block] = false;
            if pass.odd[block] {
                self.candidates.push((p, block));
            }
        }
        self.advance()
    }

    fn open_pass(&mut self, p: usize, oracle_top: Vec<bool>) {
        let k = self.sizes[p];
        let perm = permutation(pass_seed(self.shuffle_seed, p), self.n);
        let mut inv = vec![0u32; self.n];
        for (i, &src) in perm.iter().enumerate() {
            inv[src as usize] = i as u32;
        }
        let bits = self.key.gather(&perm);
        let blocks = oracle_top.len();
        let stride = 2 * k.next_power_of_two();
        let mut odd = vec![false; blocks];
        for (b, o) in odd.iter_mut().enumerate() {
            let start = b * k;
            *o = bits.parity(start, k.min(self.n - start)) != oracle_top[b];
            if *o {
                self.candidates.push((p, b));
            }
        }
        self.passes.push(Pass {
            k,
            stride,
            perm,
            inv,
            bits,
            oracle_top,
            odd,
            pending: vec![false; blocks],
            known: BitVec::zeros(blocks * stride),
            known_value: BitVec::zeros(blocks * stride),
        });
    }

    /// Runs every bisection as far as known parities allow, then asks for the rest or
    /// opens the next pass.
    fn advance(&mut self) -> Result<CorrectorStep, CascadeError> {
        let mut ranges = Vec::new();
        let mut slots = Vec::new();
        // Honest answers flip each wrong bit once, so flips never exceed the errors. Forged
        // or corrupted parities can make two passes flip one bit back and forth forever
        // without asking anything; this bound turns that into an error.
        let max_flips = (self.n / 4 + 64) as u64;
        while let Some((p, block)) = self.candidates.pop() {
            if self.corrected > max_flips {
                return Err(CascadeError::Diverged {
                    flips: self.corrected,
                    n: self.n,
                });
            }
            if !self.passes[p].odd[block] || self.passes[p].pending[block] {
                continue;
            }
            if let Some((start, len, heap)) = self.descend(p, block) {
                self.passes[p].pending[block] = true;
                ranges.push(ParityRange {
                    pass: p as u8,
                    start: start as u32,
                    len: len as u32,
                });
                slots.push((p, block, heap));
            }
        }
        if !ranges.is_empty() {
            self.outstanding = Some((None, slots));
            return Ok(CorrectorStep::Request(ParityRequest {
                open_pass: None,
                ranges,
            }));
        }
        let next = self.passes.len();
        if next < self.sizes.len() && self.n > 0 {
            self.outstanding = Some((Some(next), Vec::new()));
            return Ok(CorrectorStep::Request(ParityRequest {
                open_pass: Some((next as u8, self.sizes[next] as u32)),
                ranges: Vec::new(),
            }));
        }
        Ok(CorrectorStep::Done)
    }

    /// Walks down the odd block `block` of pass `p`. Flips the error bit when it is reached;
    /// otherwise returns the first-half range (start, len, heap index) whose oracle parity
    /// is still unknown.
    fn descend(&mut self, p: usize, block: usize) -> Option<(usize, usize, usize)> {
        let pass = &mut self.passes[p];
        let mut start = block * pass.k;
        let mut len = pass.k.min(self.n - start);
        let mut heap = 1usize;
        let mut oracle_parity = pass.oracle_top[block];
        while len > 1 {
            let half = len / 2;
            let first = pass.node(block, 2 * heap);
            if !pass.known.get(first) {
                return Some((start, half, 2 * heap));
            }
            let oracle_first = pass.known_value.get(first);
            if oracle_first != pass.bits.parity(start, half) {
                len = half;
                heap *= 2;
                oracle_parity = oracle_first;
            } else {
                start += half;
                len -= half;
                heap = 2 * heap + 1;
                oracle_parity ^= oracle_first;
                let second = pass.node(block, heap);
                pass.known.set(second, true);
                pass.known_value.set(second, oracle_parity);
            }
        }
        let original = pass.perm[start] as usize;
        self.flip(original);
        None
    }

    fn flip(&mut self, original: usize) {
        self.key.flip(original);
        self.corrected += 1;
        for (q, pass) in self.passes.iter_mut().enumerate() {
            let pos = pass.inv[original] as usize;
            pass.bits.flip(pos);
            let b = pos / pass.k;
            pass.odd[b] = !pass.odd[b];
            if pass.odd[b] {
                self.candidates.push((q, b));
            }
        }
    }
}

/// Runs both roles in memory and returns (corrected key, disclosed bits, round trips).
pub fn reconcile_in_memory(
    reference: &BitVec,
    noisy: &BitVec,
    shuffle_seed: u64,
    sizes: Vec<usize>,
) -> (BitVec, u64, usize) {
    let mut oracle = ParityOracle::new(reference.clone(), shuffle_seed);
    let mut corrector = Corrector::new(noisy.clone(), shuffle_seed, sizes);
    let mut rounds = 0;
    let mut step = corrector.start();
    while let CorrectorStep::Request(req) = step {
        rounds += 1;
        let answer = oracle.answer(&req).expect("corrector requests are valid");
        step = corrector
            .handle_answer(&answer)
            .expect("oracle answers have the requested length");
    }
    assert_eq!(oracle.disclosed(), corrector.disclosed());
    let disclosed = corrector.disclosed();
    (corrector.into_key(), disclosed, rounds)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finite_key::binary_entropy;
    use crate::rng::simulated_key_pair;

    #[test]
    fn cascade_corrects_random_errors() {
        for (n, q) in [(10_000, 0.01), (10_000, 0.05), (20_000, 0.10), (1000, 0.0)] {
            let (a, b) = simulated_key_pair(n, q, 11);
            let errors = a.hamming_distance(&b);
            let (fixed, leak, rounds) = reconcile_in_memory(&a, &b, 99, block_sizes(n, q, 6));
            assert_eq!(fixed.hamming_distance(&a), 0, "n={n} q={q}");
            assert!(rounds > 0);
            if errors > 0 {
                let f = leak as f64 / (n as f64 * binary_entropy(errors as f64 / n as f64));
                assert!(f < 1.5, "f={f} n={n} q={q}");
            }
        }
    }

    #[test]
    fn oracle_rejects_bad_requests() {
        let key = BitVec::zeros(100);
        let mut oracle = ParityOracle::new(key, 1);
        let skip = ParityRequest {
            open_pass: Some((1, 8)),
            ranges: vec![],
        };
        assert!(matches!(
            oracle.answer(&skip),
            Err(CascadeError::PassOrder { .. })
        ));
        let big = ParityRequest {
            open_pass: Some((0, 101)),
            ranges: vec![],
        };
        assert!(matches!(
            oracle.answer(&big),
            Err(CascadeError::BlockSize { .. })
        ));
        let outside = ParityRequest {
            open_pass: Some((0, 8)),
            ranges: vec![ParityRange {
                pass: 0,
                start: 95,
                len: 6,
            }],
        };
        assert!(matches!(
            oracle.answer(&outside),
            Err(CascadeError::Range { .. })
        ));
        assert_eq!(oracle.disclosed(), 0);
    }

    #[test]
    fn corrector_rejects_answer_of_wrong_length() {
        let mut c = Corrector::new(BitVec::zeros(1000), 5, vec![16]);
        assert!(matches!(c.start(), CorrectorStep::Request(_)));
        assert!(matches!(
            c.handle_answer(&[true; 3]),
            Err(CascadeError::AnswerLength { .. })
        ));
        assert!(matches!(
            c.handle_answer(&[false; 63]),
            Ok(CorrectorStep::Done)
        ));
        assert!(matches!(
            c.handle_answer(&[]),
            Err(CascadeError::Unexpected)
        ));
    }
}
