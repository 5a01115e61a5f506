//! Cascade information reconciliation, split into the two roles of the protocol.
//!
//! The [`ParityOracle`] keeps the reference key and only returns the parities requested of
//! it. The [`Corrector`] holds the noisy key, decides what to ask, and flips its own bits
//! until every block parity of every pass agrees with the oracle's.
//!
//! Variant (after Martinez-Mateo, Pacher, Peev, Ciurana and Martin, "Demystifying the
//! information reconciliation protocol Cascade", QIC 15 (2015), block sizes after their
//! "Cascade opt. (8)", see [`block_sizes`]):
//! - Three passes of fixed-size blocks: the first in key order, the second and third in
//!   the order of a public random permutation.
//! - Then *half* passes: a public random mask splits the key into two blocks of about
//!   `n / 2` bits each (the larger side first, each side in key order). Half passes are
//!   opened [`CONFIRM_PASSES`] at a time, and the correction ends once that many half
//!   passes in a row found no error, or after `max_passes` passes.
//! - The odd blocks of the lowest pass that has any, and of the pass after it, are bisected
//!   in parallel, so one round trip serves all of them. Later passes wait until the lower
//!   ones are even again.
//! - An error found in one pass re-opens the block that contains it in every other pass
//!   (the cascade).
//! - Every parity the oracle disclosed is remembered, so the parity of a second half
//!   (parent XOR first half) and any sub-block parity revealed earlier are never asked for
//!   again (sub-block reuse).
//! - The parity of the whole key is known after the first pass (the XOR of its block
//!   parities), so the last block parity of every later pass is inferred, not disclosed.
//!
//! The corrector requests one parity per bisection level, and each reply costs one
//! disclosed bit on both sides.

use std::collections::HashMap;

use crate::bits::BitVec;
use crate::rng::{permutation, Xoshiro256};

/// Largest number of passes a block may use. Every pass keeps `n` bits on each side, so
/// this bounds the memory a peer's requests can make the other side allocate: 512 MiB for
/// the largest block of 2^26 bits.
pub const MAX_PASSES: usize = 64;

/// Passes of fixed-size blocks before the half passes. Only these may be permuted, which
/// costs 8 bytes per key bit on the corrector's side.
pub const FIXED_PASSES: usize = 3;

/// Default largest number of passes: three passes of fixed-size blocks and up to 61 half
/// passes. Blocks of the benchmark table (docs/benchmarks.md) used 19 to 31.
pub const DEFAULT_PASSES: usize = 64;

/// Half passes in a row without an error that end the correction. A residual error pattern
/// survives each half pass with probability 1/2. So at most `2^-16` of the blocks with an
/// error left after the fixed-size passes reach the verification hash with it, which then
/// discards the block. Each such pass discloses one parity bit.
pub const CONFIRM_PASSES: usize = 16;

/// Block size that marks a half pass in a request.
pub const HALF_PASS: u32 = 0;

/// Returns the seed of the permutation or mask of pass `pass`, derived from the block's
/// shuffle seed.
fn pass_seed(shuffle_seed: u64, pass: usize) -> u64 {
    shuffle_seed ^ (pass as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Block size of the third pass: large enough that few of its blocks are odd, small enough
/// that a bisection costs 13 parities instead of the ~17 of a half pass at 10^5 bits.
const THIRD_BLOCK: usize = 8192;

/// Block sizes of the three passes before the half passes, for `n` bits at an expected
/// QBER (at most `passes` of them).
///
/// With `a = log2(1 / QBER) - 0.5`: `k_1 = 2^ceil(a)`, `k_2 = 2^ceil((a + 10) / 2)` and
/// `k_3 = 8192`. This is Martinez-Mateo et al.'s "Cascade opt. (8)" (which has 12 where
/// we have 10, and `k_3 = 4096`), tuned by simulation on 10^5- and 10^6-bit blocks at QBER
/// 1-5 %: it lowered the mean efficiency f by about 0.01. Powers of two make every
/// bisection exactly `log2 k` requests deep; each size is at least twice the one before.
pub fn block_sizes(n: usize, qber: f64, passes: usize) -> Vec<usize> {
    let q = qber.clamp(1e-6, 0.5);
    let a = (1.0 / q).log2() - 0.5;
    let k1 = 1usize << a.ceil().clamp(1.0, 20.0) as u32;
    let k2 = (1usize << ((a + 10.0) / 2.0).ceil().clamp(1.0, 20.0) as u32).max(2 * k1);
    let k3 = THIRD_BLOCK.max(2 * k2);
    [k1, k2, k3]
        .into_iter()
        .take(passes)
        .map(|k| k.min(n.max(1)))
        .collect()
}

/// A range of bits in the shuffled key of one pass whose oracle parity is requested.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParityRange {
    pub pass: u8,
    pub start: u32,
    pub len: u32,
}

/// One request of the corrector: passes to open, as (pass index, block size, or
/// [`HALF_PASS`]), whose block parities the oracle returns, and the parities of ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParityRequest {
    pub open: Vec<(u8, u32)>,
    pub ranges: Vec<ParityRange>,
}

/// Errors of a peer's Cascade request or answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CascadeError {
    #[error("request opens pass {pass}, but the next pass is {expected}")]
    PassOrder { pass: usize, expected: usize },
    #[error("block size {size} of pass {pass} is invalid: passes 0 to 2 need 1 ..= {n} (the key length), later passes 0 (a half pass)")]
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

/// The order of the key bits in one pass.
enum Order {
    /// Key order: the first pass. Errors of a raw key are independent of their position
    /// (sifted detections seconds apart), so a shuffle would change nothing but cost two
    /// permutations of the whole key per block.
    Identity,
    /// A random permutation: position `i` contains original bit `perm[i]`. Only the
    /// corrector needs the inverse `inv`.
    Shuffled { perm: Vec<u32>, inv: Vec<u32> },
    /// A random half: the bits set in `mask` first, then the others, each in key order.
    /// `rank[w]` counts the mask bits in words `0 .. w`.
    Split {
        mask: Vec<u64>,
        rank: Vec<u32>,
        members: usize,
    },
}

impl Order {
    fn shuffled(seed: u64, n: usize, with_inverse: bool) -> Order {
        let perm = permutation(seed, n);
        let inv = if with_inverse {
            let mut inv = vec![0u32; n];
            for (i, &src) in perm.iter().enumerate() {
                inv[src as usize] = i as u32;
            }
            inv
        } else {
            Vec::new()
        };
        Order::Shuffled { perm, inv }
    }

    fn split(seed: u64, n: usize) -> Order {
        let mut rng = Xoshiro256::new(seed);
        let tail = tail_mask(n);
        let mut mask: Vec<u64> = (0..n.div_ceil(64)).map(|_| rng.next_u64()).collect();
        if let Some(last) = mask.last_mut() {
            *last &= tail;
        }
        let ones: usize = mask.iter().map(|w| w.count_ones() as usize).sum();
        // The larger side comes first, so that the block size is at least n / 2 and the
        // pass has exactly two blocks (one when a side is empty).
        if 2 * ones < n {
            for w in mask.iter_mut() {
                *w = !*w;
            }
            if let Some(last) = mask.last_mut() {
                *last &= tail;
            }
        }
        let mut rank = Vec::with_capacity(mask.len() + 1);
        let mut count = 0u32;
        for w in &mask {
            rank.push(count);
            count += w.count_ones();
        }
        rank.push(count);
        Order::Split {
            mask,
            rank,
            members: count as usize,
        }
    }

    /// Returns the key in this pass's order.
    fn gather(&self, key: &BitVec) -> BitVec {
        match self {
            Order::Identity => key.clone(),
            Order::Shuffled { perm, .. } => key.gather(perm),
            Order::Split { mask, members, .. } => split_gather(key, mask, *members),
        }
    }

    /// Position in this pass of original bit `original`.
    fn position(&self, original: usize) -> usize {
        match self {
            Order::Identity => original,
            Order::Shuffled { inv, .. } => inv[original] as usize,
            Order::Split {
                mask,
                rank,
                members,
            } => {
                let (w, b) = (original >> 6, original & 63);
                let below = (1u64 << b) - 1;
                if (mask[w] >> b) & 1 == 1 {
                    rank[w] as usize + (mask[w] & below).count_ones() as usize
                } else {
                    members + (64 * w - rank[w] as usize) + (!mask[w] & below).count_ones() as usize
                }
            }
        }
    }

    /// Original position of the bit at `position` in this pass.
    fn original(&self, position: usize) -> usize {
        match self {
            Order::Identity => position,
            Order::Shuffled { perm, .. } => perm[position] as usize,
            Order::Split {
                mask,
                rank,
                members,
            } => {
                let words = mask.len();
                if position < *members {
                    // Last word whose preceding members are at most `position`.
                    let w = rank[..words].partition_point(|&r| r as usize <= position) - 1;
                    64 * w + select(mask[w], position - rank[w] as usize)
                } else {
                    let p = position - members;
                    let zeros = |w: usize| 64 * w - rank[w] as usize;
                    let (mut lo, mut hi) = (0usize, words);
                    while hi - lo > 1 {
                        let mid = (lo + hi) / 2;
                        if zeros(mid) <= p {
                            lo = mid;
                        } else {
                            hi = mid;
                        }
                    }
                    64 * lo + select(!mask[lo], p - zeros(lo))
                }
            }
        }
    }

    /// Returns the block size of this pass: `k` as requested, or the larger side of a half.
    fn block_size(&self, k: usize, n: usize) -> usize {
        match self {
            Order::Identity | Order::Shuffled { .. } => k,
            Order::Split { members, .. } => (*members).clamp(1, n.max(1)),
        }
    }
}

fn tail_mask(n: usize) -> u64 {
    if n % 64 == 0 {
        !0
    } else {
        (1u64 << (n % 64)) - 1
    }
}

/// Position of the `r`-th set bit (from 0) of `word`.
fn select(mut word: u64, r: usize) -> usize {
    for _ in 0..r {
        word &= word - 1;
    }
    word.trailing_zeros() as usize
}

/// Gathers the bits of `key` selected by `mask` into positions `0 .. members` and the
/// others into `members .. n`, both in key order.
fn split_gather(key: &BitVec, mask: &[u64], members: usize) -> BitVec {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("bmi2") {
            // SAFETY: the CPU reported BMI2, the only feature the function enables.
            return unsafe { split_gather_bmi2(key, mask, members) };
        }
    }
    split_gather_with(key, mask, members, extract_portable)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "bmi2")]
unsafe fn split_gather_bmi2(key: &BitVec, mask: &[u64], members: usize) -> BitVec {
    // The closure inherits this function's target features, so PEXT is inlined.
    split_gather_with(key, mask, members, |x, m| {
        std::arch::x86_64::_pext_u64(x, m)
    })
}

#[inline(always)]
fn split_gather_with(
    key: &BitVec,
    mask: &[u64],
    members: usize,
    extract: impl Fn(u64, u64) -> u64,
) -> BitVec {
    let n = key.len();
    let mut out = vec![0u64; n.div_ceil(64)];
    let (mut first, mut second) = (0usize, members);
    let last = mask.len().saturating_sub(1);
    for (w, (&x, &m)) in key.words().iter().zip(mask).enumerate() {
        let valid = if w == last { tail_mask(n) } else { !0 };
        let rest = !m & valid;
        append_bits(&mut out, first, extract(x, m), m.count_ones() as usize);
        first += m.count_ones() as usize;
        append_bits(
            &mut out,
            second,
            extract(x, rest),
            rest.count_ones() as usize,
        );
        second += rest.count_ones() as usize;
    }
    BitVec::from_words(out, n)
}

/// Packs the bits of `x` selected by `m` into the low bits (what BMI2's PEXT does).
fn extract_portable(x: u64, mut m: u64) -> u64 {
    let mut out = 0u64;
    let mut i = 0;
    while m != 0 {
        let low = m & m.wrapping_neg();
        if x & low != 0 {
            out |= 1 << i;
        }
        i += 1;
        m ^= low;
    }
    out
}

/// ORs the low `count` bits of `value` into `words` at bit `pos`.
#[inline]
fn append_bits(words: &mut [u64], pos: usize, value: u64, count: usize) {
    if count == 0 {
        return;
    }
    let (w, b) = (pos >> 6, pos & 63);
    words[w] |= value << b;
    if b + count > 64 {
        words[w + 1] |= value >> (64 - b);
    }
}

/// Number of top-level parities the oracle discloses when it opens pass `pass` with
/// `blocks` blocks: every one for the first pass, all but the last (inferred from the key
/// parity) for later passes.
fn disclosed_tops(pass: usize, blocks: usize) -> usize {
    if pass == 0 {
        blocks
    } else {
        blocks.saturating_sub(1)
    }
}

/// Checks the passes a request opens (consecutive from `next`, valid sizes) and returns the
/// number of passes open after it.
fn check_open(open: &[(u8, u32)], next: usize, n: usize) -> Result<usize, CascadeError> {
    let mut expected = next;
    for &(pass, size) in open {
        let (pass, size) = (pass as usize, size as usize);
        if pass != expected || pass >= MAX_PASSES {
            return Err(CascadeError::PassOrder { pass, expected });
        }
        let fixed = pass < FIXED_PASSES;
        if (fixed && (size == HALF_PASS as usize || size > n)) || (!fixed && size != 0) {
            return Err(CascadeError::BlockSize { pass, size, n });
        }
        expected += 1;
    }
    Ok(expected)
}

fn make_order(shuffle_seed: u64, pass: usize, size: u32, n: usize, inverse: bool) -> Order {
    if pass == 0 {
        Order::Identity
    } else if size == HALF_PASS {
        Order::split(pass_seed(shuffle_seed, pass), n)
    } else {
        Order::shuffled(pass_seed(shuffle_seed, pass), n, inverse)
    }
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
        let open_passes = check_open(&request.open, self.passes.len(), self.n)?;
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

        let mut out = Vec::new();
        for &(pass, size) in &request.open {
            let pass = pass as usize;
            let order = make_order(self.shuffle_seed, pass, size, self.n, false);
            let k = order.block_size(size as usize, self.n);
            let bits = order.gather(&self.key);
            let blocks = self.n.div_ceil(k);
            for b in 0..disclosed_tops(pass, blocks) {
                let start = b * k;
                out.push(bits.parity(start, k.min(self.n - start)));
            }
            self.passes.push(bits);
        }
        for r in &request.ranges {
            out.push(self.passes[r.pass as usize].parity(r.start as usize, r.len as usize));
        }
        self.disclosed += out.len() as u64;
        Ok(out)
    }
}

/// Oracle parities of bisection nodes, indexed `block · stride + heap index`: dense for
/// passes of small blocks, a hash map for half passes, whose trees are huge and sparse.
enum Known {
    Dense { known: BitVec, value: BitVec },
    Sparse(HashMap<usize, bool>),
}

impl Known {
    fn new(nodes: usize, n: usize) -> Known {
        if nodes <= 4 * n.max(64) {
            Known::Dense {
                known: BitVec::zeros(nodes),
                value: BitVec::zeros(nodes),
            }
        } else {
            Known::Sparse(HashMap::new())
        }
    }

    fn get(&self, node: usize) -> Option<bool> {
        match self {
            Known::Dense { known, value } => known.get(node).then(|| value.get(node)),
            Known::Sparse(map) => map.get(&node).copied(),
        }
    }

    fn set(&mut self, node: usize, parity: bool) {
        match self {
            Known::Dense { known, value } => {
                known.set(node, true);
                value.set(node, parity);
            }
            Known::Sparse(map) => {
                map.insert(node, parity);
            }
        }
    }
}

struct Pass {
    k: usize,
    /// Heap indices of a block's bisection tree stay below this power of two.
    stride: usize,
    order: Order,
    bits: BitVec,
    oracle_top: Vec<bool>,
    odd: Vec<bool>,
    pending: Vec<bool>,
    known: Known,
}

impl Pass {
    fn node(&self, block: usize, heap: usize) -> usize {
        block * self.stride + heap
    }
}

/// The request awaiting its reply: the passes being opened (index, block size, order), and
/// the bisection node (pass, block, heap index) of each requested range.
struct Outstanding {
    open: Vec<(usize, usize, Order)>,
    ranges: Vec<(usize, usize, usize)>,
}

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
    max_passes: usize,
    key: BitVec,
    passes: Vec<Pass>,
    candidates: Vec<(usize, usize)>,
    outstanding: Option<Outstanding>,
    /// Parity of the oracle's whole key, known once the first pass is open.
    key_parity: bool,
    /// Half passes opened since the last flip whose blocks were all even.
    clean_streak: usize,
    disclosed: u64,
    corrected: u64,
}

impl Corrector {
    /// Starts a corrector for `key` with the block sizes `sizes` of the fixed-size passes
    /// (see [`block_sizes`]) followed by half passes, at most `max_passes` passes in all.
    pub fn new(key: BitVec, shuffle_seed: u64, sizes: Vec<usize>, max_passes: usize) -> Self {
        Corrector {
            n: key.len(),
            shuffle_seed,
            max_passes: max_passes.clamp(sizes.len().min(1), MAX_PASSES),
            sizes,
            key,
            passes: Vec::new(),
            candidates: Vec::new(),
            outstanding: None,
            key_parity: false,
            clean_streak: 0,
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

    /// Passes opened so far.
    pub fn passes(&self) -> usize {
        self.passes.len()
    }

    pub fn key(&self) -> &BitVec {
        &self.key
    }

    pub fn into_key(self) -> BitVec {
        self.key
    }

    /// Applies the oracle's answer to the outstanding request and returns the next step.
    pub fn handle_answer(&mut self, parities: &[bool]) -> Result<CorrectorStep, CascadeError> {
        let out = self.outstanding.take().ok_or(CascadeError::Unexpected)?;
        let tops: usize = out
            .open
            .iter()
            .map(|(p, k, _)| disclosed_tops(*p, self.n.div_ceil(*k)))
            .sum();
        let expected = tops + out.ranges.len();
        if parities.len() != expected {
            self.outstanding = Some(out);
            return Err(CascadeError::AnswerLength {
                got: parities.len(),
                expected,
            });
        }
        self.disclosed += expected as u64;
        let mut at = 0;
        for (p, k, order) in out.open {
            let count = disclosed_tops(p, self.n.div_ceil(k));
            self.open_pass(p, k, order, &parities[at..at + count]);
            at += count;
        }
        for (&(p, block, heap), &value) in out.ranges.iter().zip(&parities[at..]) {
            let pass = &mut self.passes[p];
            let idx = pass.node(block, heap);
            pass.known.set(idx, value);
            pass.pending[block] = false;
            if pass.odd[block] {
                self.candidates.push((p, block));
            }
        }
        self.advance()
    }

    fn open_pass(&mut self, p: usize, k: usize, order: Order, disclosed: &[bool]) {
        let bits = order.gather(&self.key);
        let blocks = self.n.div_ceil(k);
        let mut oracle_top = disclosed.to_vec();
        if p == 0 {
            self.key_parity = oracle_top.iter().fold(false, |a, &b| a ^ b);
        } else if blocks > 0 {
            let others = oracle_top.iter().fold(false, |a, &b| a ^ b);
            oracle_top.push(self.key_parity ^ others);
        }
        let stride = 2 * k.next_power_of_two();
        let mut odd = vec![false; blocks];
        for (b, o) in odd.iter_mut().enumerate() {
            let start = b * k;
            *o = bits.parity(start, k.min(self.n - start)) != oracle_top[b];
            if *o {
                self.candidates.push((p, b));
            }
        }
        if p >= self.sizes.len() && !odd.iter().any(|&o| o) {
            self.clean_streak += 1;
        }
        self.passes.push(Pass {
            k,
            stride,
            order,
            bits,
            oracle_top,
            odd,
            pending: vec![false; blocks],
            known: Known::new(blocks * stride, self.n),
        });
    }

    /// Runs every bisection as far as known parities allow, then asks for the rest or
    /// opens the next passes.
    fn advance(&mut self) -> Result<CorrectorStep, CascadeError> {
        let mut ranges = Vec::new();
        let mut slots = Vec::new();
        // Honest answers flip each wrong bit once, so flips never exceed the errors. Forged
        // or corrupted parities can make two passes flip one bit back and forth forever
        // without asking anything; this bound turns that into an error.
        let max_flips = (self.n / 4 + 64) as u64;
        // Odd blocks of the lowest pass that has any, and of the pass after it, go first;
        // the others wait. A flip found there often makes an odd block of a later pass even
        // again, and bisecting that block in the same round would disclose parities for
        // nothing. Letting only the lowest pass run gave the same efficiency with 2.5 times
        // the round trips. Letting all run at once cost about 0.002 in f at 10^5 bits.
        while ranges.is_empty() {
            self.candidates
                .retain(|&(p, b)| self.passes[p].odd[b] && !self.passes[p].pending[b]);
            let Some(lowest) = self.candidates.iter().map(|&(p, _)| p).min() else {
                break;
            };
            let (now, later): (Vec<_>, Vec<_>) = self
                .candidates
                .drain(..)
                .partition(|&(p, _)| p <= lowest + 1);
            self.candidates = later;
            for (p, block) in now {
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
        }
        if !ranges.is_empty() {
            self.outstanding = Some(Outstanding {
                open: Vec::new(),
                ranges: slots,
            });
            return Ok(CorrectorStep::Request(ParityRequest {
                open: Vec::new(),
                ranges,
            }));
        }
        let next = self.passes.len();
        if self.n == 0 || next >= self.max_passes {
            return Ok(CorrectorStep::Done);
        }
        let open: Vec<(usize, u32)> = if next < self.sizes.len() {
            vec![(next, self.sizes[next] as u32)]
        } else if self.clean_streak < CONFIRM_PASSES {
            let count = CONFIRM_PASSES.min(self.max_passes - next);
            (next..next + count).map(|p| (p, HALF_PASS)).collect()
        } else {
            return Ok(CorrectorStep::Done);
        };
        let mut outstanding = Outstanding {
            open: Vec::with_capacity(open.len()),
            ranges: Vec::new(),
        };
        for &(p, size) in &open {
            let order = make_order(self.shuffle_seed, p, size, self.n, true);
            let k = order.block_size(size as usize, self.n);
            outstanding.open.push((p, k, order));
        }
        self.outstanding = Some(outstanding);
        Ok(CorrectorStep::Request(ParityRequest {
            open: open.into_iter().map(|(p, s)| (p as u8, s)).collect(),
            ranges: Vec::new(),
        }))
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
            let Some(oracle_first) = pass.known.get(first) else {
                return Some((start, half, 2 * heap));
            };
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
                pass.known.set(second, oracle_parity);
            }
        }
        let original = pass.order.original(start);
        self.flip(original);
        None
    }

    fn flip(&mut self, original: usize) {
        self.key.flip(original);
        self.corrected += 1;
        self.clean_streak = 0;
        for (q, pass) in self.passes.iter_mut().enumerate() {
            let pos = pass.order.position(original);
            pass.bits.flip(pos);
            let b = pos / pass.k;
            pass.odd[b] = !pass.odd[b];
            if pass.odd[b] {
                self.candidates.push((q, b));
            }
        }
    }
}

/// Result of [`reconcile_in_memory`].
#[derive(Debug)]
pub struct InMemoryRun {
    pub key: BitVec,
    pub disclosed: u64,
    pub round_trips: usize,
    pub passes: usize,
}

/// Runs both roles in memory with the shuffled block sizes `sizes` and at most
/// `max_passes` passes.
pub fn reconcile_in_memory(
    reference: &BitVec,
    noisy: &BitVec,
    shuffle_seed: u64,
    sizes: Vec<usize>,
    max_passes: usize,
) -> InMemoryRun {
    let mut oracle = ParityOracle::new(reference.clone(), shuffle_seed);
    let mut corrector = Corrector::new(noisy.clone(), shuffle_seed, sizes, max_passes);
    let mut round_trips = 0;
    let mut step = corrector.start();
    while let CorrectorStep::Request(req) = step {
        round_trips += 1;
        let answer = oracle.answer(&req).expect("corrector requests are valid");
        step = corrector
            .handle_answer(&answer)
            .expect("oracle answers have the requested length");
    }
    assert_eq!(oracle.disclosed(), corrector.disclosed());
    InMemoryRun {
        disclosed: corrector.disclosed(),
        passes: corrector.passes(),
        key: corrector.into_key(),
        round_trips,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finite_key::binary_entropy;
    use crate::rng::simulated_key_pair;

    #[test]
    fn cascade_corrects_random_errors() {
        for (n, q) in [
            (10_000, 0.01),
            (10_000, 0.05),
            (20_000, 0.10),
            (1000, 0.0),
            (777, 0.03),
            (100_001, 0.02),
        ] {
            let (a, b) = simulated_key_pair(n, q, 11);
            let errors = a.hamming_distance(&b);
            let run = reconcile_in_memory(&a, &b, 99, block_sizes(n, q, 3), DEFAULT_PASSES);
            assert_eq!(run.key.hamming_distance(&a), 0, "n={n} q={q}");
            assert!(run.round_trips > 0);
            assert!(run.passes >= 3 + CONFIRM_PASSES, "n={n} q={q}");
            if errors > 0 && n >= 10_000 {
                let h = binary_entropy(errors as f64 / n as f64);
                let f = run.disclosed as f64 / (n as f64 * h);
                assert!(
                    f < if n >= 100_000 { 1.07 } else { 1.3 },
                    "f={f} n={n} q={q}"
                );
            }
        }
    }

    #[test]
    fn split_order_round_trips_positions() {
        for n in [1usize, 2, 63, 64, 65, 1000, 4097] {
            let order = Order::split(5, n);
            let Order::Split { members, .. } = &order else {
                unreachable!()
            };
            assert!(2 * members >= n, "n={n}");
            let mut seen = vec![false; n];
            for i in 0..n {
                let p = order.position(i);
                assert!(!seen[p], "n={n} i={i}");
                seen[p] = true;
                assert_eq!(order.original(p), i, "n={n} p={p}");
            }
            let bits: Vec<u8> = (0..n).map(|i| ((i * 7) % 3 % 2) as u8).collect();
            let key = BitVec::from_bits(&bits);
            let gathered = order.gather(&key);
            for p in 0..n {
                assert_eq!(gathered.get(p), key.get(order.original(p)), "n={n} p={p}");
            }
            assert_eq!(
                split_gather_with(
                    &key,
                    match &order {
                        Order::Split { mask, .. } => mask,
                        _ => unreachable!(),
                    },
                    *members,
                    extract_portable
                ),
                gathered
            );
        }
    }

    #[test]
    fn block_sizes_are_powers_of_two() {
        assert_eq!(block_sizes(1_000_000, 0.01, 3), vec![128, 512, 8192]);
        assert_eq!(block_sizes(1_000_000, 0.03, 3), vec![32, 256, 8192]);
        assert_eq!(block_sizes(1_000_000, 0.05, 1), vec![16]);
        assert_eq!(
            block_sizes(1_000_000, 1e-5, 3),
            vec![1 << 17, 1 << 18, 1 << 19]
        );
        assert_eq!(block_sizes(100, 0.001, 3), vec![100, 100, 100]);
    }

    #[test]
    fn oracle_rejects_bad_requests() {
        let key = BitVec::zeros(100);
        let mut oracle = ParityOracle::new(key, 1);
        let skip = ParityRequest {
            open: vec![(1, 8)],
            ranges: vec![],
        };
        assert!(matches!(
            oracle.answer(&skip),
            Err(CascadeError::PassOrder { .. })
        ));
        let big = ParityRequest {
            open: vec![(0, 101)],
            ranges: vec![],
        };
        assert!(matches!(
            oracle.answer(&big),
            Err(CascadeError::BlockSize { .. })
        ));
        let half_too_early = ParityRequest {
            open: vec![(0, HALF_PASS)],
            ranges: vec![],
        };
        assert!(matches!(
            oracle.answer(&half_too_early),
            Err(CascadeError::BlockSize { .. })
        ));
        let fixed_too_late = ParityRequest {
            open: vec![(0, 8), (1, 16), (2, 32), (3, 64)],
            ranges: vec![],
        };
        assert!(matches!(
            oracle.answer(&fixed_too_late),
            Err(CascadeError::BlockSize { .. })
        ));
        let too_many = ParityRequest {
            open: (0..=MAX_PASSES as u8)
                .map(|p| (p, if p < 3 { 8 } else { HALF_PASS }))
                .collect(),
            ranges: vec![],
        };
        assert!(matches!(
            oracle.answer(&too_many),
            Err(CascadeError::PassOrder { .. })
        ));
        let outside = ParityRequest {
            open: vec![(0, 8)],
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
    fn later_passes_infer_their_last_block_parity() {
        let key = BitVec::zeros(100);
        let mut oracle = ParityOracle::new(key, 1);
        let first = ParityRequest {
            open: vec![(0, 10)],
            ranges: vec![],
        };
        assert_eq!(oracle.answer(&first).unwrap().len(), 10);
        let more = ParityRequest {
            open: vec![(1, 30), (2, 50), (3, HALF_PASS), (4, HALF_PASS)],
            ranges: vec![],
        };
        // 4 blocks of pass 1, 2 of pass 2 and 2 of each half pass, all but the last of each
        // disclosed.
        assert_eq!(oracle.answer(&more).unwrap().len(), 3 + 1 + 1 + 1);
        assert_eq!(oracle.disclosed(), 16);
    }

    #[test]
    fn corrector_rejects_answer_of_wrong_length() {
        let mut c = Corrector::new(BitVec::zeros(1000), 5, vec![16], 1);
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
