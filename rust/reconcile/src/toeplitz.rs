//! Privacy amplification by a random Toeplitz matrix over GF(2).
//!
//! The `m × n` Toeplitz matrix with seed bits `s[0 .. n + m - 1]` has entry
//! `T[i][j] = s[i - j + n - 1]`, so output bit `i` is `XOR_j s[i + n - 1 - j] · x[j]`: the
//! coefficient of `z^(n-1+i)` in the product of the polynomials `S(z)` and `X(z)` over GF(2).
//! Toeplitz matrices with a uniformly random seed form a 2-universal family (Krawczyk,
//! CRYPTO '94), which the leftover hash lemma needs.
//!
//! Only those `m` coefficients are computed: a *middle product*. The key is cut into chunks
//! of `L` 64-bit words, where `L` is at least the output length in words. Each chunk times
//! its `2L`-word window of the seed is an `L × L` Toeplitz product, and the chunks' results
//! are XORed. A square product splits like Karatsuba's multiplication, transposed: with the key
//! halves `x0, x1` and the seed quarters `S0 .. S3`, the two output halves are
//! `P + MP(S0S1 ^ S1S2, x1)` and `P + MP(S1S2 ^ S2S3, x0)` with `P = MP(S1S2, x0 ^ x1)`,
//! three half-size products instead of four. Below [`BASE_WORDS`] words the product is a
//! direct sum of carry-less word products, with the PCLMULQDQ instruction where the CPU has
//! it and a portable loop otherwise. Cost: O(L^1.58) word operations per chunk, about a
//! third of a full Karatsuba product of key and seed. With the `parallel` feature the
//! chunks and the three sub-products of the upper levels run on rayon's pool.
//!
//! The result is the same bit string whatever the chunking, base case or thread count.

use crate::bits::BitVec;

/// Largest square product computed directly; larger ones are split. 32 words measured
/// fastest among 16, 32 and 64 (`cargo bench -p qkd-reconcile -- toeplitz`).
const BASE_WORDS: usize = 32;

/// Sub-products of at least this many words run as separate rayon tasks.
#[cfg(feature = "parallel")]
const PARALLEL_WORDS: usize = 512;

/// Direct middle product: `out` (n words) = words `n .. 2n` of `s · x`, for `s` of `2n`
/// words and `x` of `n` words.
type BaseProduct = fn(&[u64], &[u64], &mut [u64]);

/// Returns the `m`-bit Toeplitz hash of `key` (n bits) with `seed` (n + m - 1 bits).
///
/// Panics if the seed length is not `n + m - 1` (a caller bug, checked by the protocol
/// before it gets here).
pub fn toeplitz_hash(key: &BitVec, seed: &BitVec, m: usize) -> BitVec {
    let n = key.len();
    if m == 0 || n == 0 {
        return BitVec::zeros(m);
    }
    assert_eq!(
        seed.len(),
        n + m - 1,
        "Toeplitz seed must have n + m - 1 bits"
    );
    let base = base_product();
    let key_words = key.words();
    let (chunks, l) = plan(key_words.len(), m.div_ceil(64));
    let chunk_product = |c: usize| -> Vec<u64> {
        let mut x = vec![0u64; l];
        let lo = (c * l).min(key_words.len());
        let hi = ((c + 1) * l).min(key_words.len());
        x[..hi - lo].copy_from_slice(&key_words[lo..hi]);
        // Output bit i of this chunk is bit 64 l + i of window · x, so the window starts at
        // seed bit n - 1 - 64 l (c + 1), which is negative for the last chunks (zeros).
        let start = n as i64 - 1 - (64 * l * (c + 1)) as i64;
        let window = seed_window(seed.words(), start, 2 * l);
        let mut out = vec![0u64; l];
        middle_product(&window, &x, &mut out, base);
        out
    };
    let sum = xor_chunks(chunks, l, chunk_product);
    BitVec::from_words(sum, m)
}

#[cfg(feature = "parallel")]
fn xor_chunks(
    chunks: usize,
    l: usize,
    product: impl Fn(usize) -> Vec<u64> + Sync + Send,
) -> Vec<u64> {
    use rayon::prelude::*;
    (0..chunks)
        .into_par_iter()
        .map(product)
        .reduce(|| vec![0u64; l], xor_vecs)
}

#[cfg(not(feature = "parallel"))]
fn xor_chunks(chunks: usize, l: usize, product: impl Fn(usize) -> Vec<u64>) -> Vec<u64> {
    (0..chunks).map(product).fold(vec![0u64; l], xor_vecs)
}

fn xor_vecs(mut a: Vec<u64>, b: Vec<u64>) -> Vec<u64> {
    xor_into(&mut a, &b);
    a
}

fn xor_into(a: &mut [u64], b: &[u64]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x ^= y;
    }
}

/// Chooses the number of key chunks and the chunk length `L` in words for a key of
/// `key_words` and an output of `out_words` words, minimising the estimated cost.
///
/// `L` is at least `out_words`, and of the form `b · 2^k` with an even `b <= BASE_WORDS`,
/// so that every split halves evenly down to the base case.
fn plan(key_words: usize, out_words: usize) -> (usize, usize) {
    let max_chunks = (key_words / out_words).clamp(1, 1 << 16);
    let mut best = (usize::MAX, 1, 0);
    for c in 1..=max_chunks {
        let l = split_length(key_words.div_ceil(c).max(out_words));
        let chunks = key_words.div_ceil(l);
        let cost = chunks.saturating_mul(product_cost(l));
        if cost < best.0 {
            best = (cost, chunks, l);
        }
    }
    (best.1, best.2)
}

/// Rounds `words` up to `b · 2^k` with `b` even and at most `BASE_WORDS`.
fn split_length(words: usize) -> usize {
    let mut levels = 0;
    while words.div_ceil(1 << levels) > BASE_WORDS {
        levels += 1;
    }
    let b = words.div_ceil(1 << levels);
    (b + b % 2) << levels
}

/// Word products of an `l`-word middle product: three half-size products per level, and
/// `b · (b + 1)` in a base case of `b` words.
fn product_cost(l: usize) -> usize {
    if l <= BASE_WORDS || l % 2 == 1 {
        l * (l + 1)
    } else {
        3 * product_cost(l / 2)
    }
}

/// Returns `count` words of `src` starting at bit `start` (which may be negative); bits
/// outside `src` read as zero.
fn seed_window(src: &[u64], start: i64, count: usize) -> Vec<u64> {
    let word = |w: i64| -> u64 {
        if w < 0 {
            0
        } else {
            src.get(w as usize).copied().unwrap_or(0)
        }
    };
    let (q, r) = (start.div_euclid(64), start.rem_euclid(64));
    (0..count as i64)
        .map(|k| {
            let w = q + k;
            if r == 0 {
                word(w)
            } else {
                (word(w) >> r) | (word(w + 1) << (64 - r))
            }
        })
        .collect()
}

/// Writes words `n .. 2n` of `s · x` into `out` (n words), for `s` of `2n` words.
fn middle_product(s: &[u64], x: &[u64], out: &mut [u64], base: BaseProduct) {
    let n = x.len();
    debug_assert_eq!(s.len(), 2 * n);
    debug_assert_eq!(out.len(), n);
    #[cfg(feature = "parallel")]
    if n >= PARALLEL_WORDS && n % 2 == 0 {
        return middle_product_parallel(s, x, out, base);
    }
    let mut scratch = vec![0u64; scratch_words(n)];
    middle_product_into(s, x, out, &mut scratch, base);
}

/// Splits one level and runs the three sub-products on rayon tasks, each with its own
/// buffers.
#[cfg(feature = "parallel")]
fn middle_product_parallel(s: &[u64], x: &[u64], out: &mut [u64], base: BaseProduct) {
    let h = x.len() / 2;
    let (x0, x1) = x.split_at(h);
    let mut x_sum = x0.to_vec();
    xor_into(&mut x_sum, x1);
    let mut s_low = s[..2 * h].to_vec();
    xor_into(&mut s_low, &s[h..3 * h]);
    let mut s_high = s[h..3 * h].to_vec();
    xor_into(&mut s_high, &s[2 * h..]);
    let mut p = vec![0u64; h];
    let (out0, out1) = out.split_at_mut(h);
    rayon::join(
        || middle_product(&s[h..3 * h], &x_sum, &mut p, base),
        || {
            rayon::join(
                || middle_product(&s_low, x1, out0, base),
                || middle_product(&s_high, x0, out1, base),
            )
        },
    );
    xor_into(out0, &p);
    xor_into(out1, &p);
}

/// Splits down to the base case on this thread. `scratch` has [`scratch_words`]`(n)` words.
fn middle_product_into(
    s: &[u64],
    x: &[u64],
    out: &mut [u64],
    scratch: &mut [u64],
    base: BaseProduct,
) {
    let n = x.len();
    if n <= BASE_WORDS || n % 2 == 1 {
        out.fill(0);
        base(s, x, out);
        return;
    }
    let h = n / 2;
    let (x0, x1) = x.split_at(h);
    let (x_sum, rest) = scratch.split_at_mut(h);
    let (s_sum, rest) = rest.split_at_mut(2 * h);
    let (p, rest) = rest.split_at_mut(h);
    for ((d, a), b) in x_sum.iter_mut().zip(x0).zip(x1) {
        *d = a ^ b;
    }
    middle_product_into(&s[h..3 * h], x_sum, p, rest, base);
    let (out0, out1) = out.split_at_mut(h);
    for ((d, a), b) in s_sum.iter_mut().zip(&s[..2 * h]).zip(&s[h..3 * h]) {
        *d = a ^ b;
    }
    middle_product_into(s_sum, x1, out0, rest, base);
    xor_into(out0, p);
    for ((d, a), b) in s_sum.iter_mut().zip(&s[h..3 * h]).zip(&s[2 * h..]) {
        *d = a ^ b;
    }
    middle_product_into(s_sum, x0, out1, rest, base);
    xor_into(out1, p);
}

/// Scratch words of [`middle_product_into`] for `n` words: 4h per level, h = n / 2.
fn scratch_words(n: usize) -> usize {
    if n <= BASE_WORDS || n % 2 == 1 {
        0
    } else {
        2 * n + scratch_words(n / 2)
    }
}

fn base_product() -> BaseProduct {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("pclmulqdq") {
            return middle_base_pclmul;
        }
    }
    middle_base_portable
}

/// Carry-less product of two words, (low, high) halves, without special instructions.
#[inline]
fn clmul_portable(a: u64, b: u64) -> (u64, u64) {
    let (mut lo, mut hi) = (0u64, 0u64);
    for i in 0..64 {
        if (b >> i) & 1 == 1 {
            lo ^= a << i;
            if i > 0 {
                hi ^= a >> (64 - i);
            }
        }
    }
    (lo, hi)
}

/// Direct middle product. `Q_k = XOR_j s[k + n - 1 - j] · x[j]` (128 bits) for
/// `k = 0 ..= n`; output word `k` is the high half of `Q_k` XOR the low half of `Q_(k+1)`.
fn middle_base_portable(s: &[u64], x: &[u64], out: &mut [u64]) {
    let n = x.len();
    let mut prev_high = 0u64;
    for k in 0..=n {
        let (mut lo, mut hi) = (0u64, 0u64);
        for (j, &xj) in x.iter().enumerate() {
            let (l, h) = clmul_portable(s[k + n - 1 - j], xj);
            lo ^= l;
            hi ^= h;
        }
        if k > 0 {
            out[k - 1] ^= prev_high ^ lo;
        }
        prev_high = hi;
    }
}

#[cfg(target_arch = "x86_64")]
fn middle_base_pclmul(s: &[u64], x: &[u64], out: &mut [u64]) {
    if x.len() % 2 == 1 {
        return middle_base_portable(s, x, out);
    }
    // SAFETY: only selected by `base_product` after the CPU reported PCLMULQDQ; the
    // length checks above and in `middle_product_into` keep every load inside `s` and `x`.
    unsafe { middle_base_pclmul_impl(s, x, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "pclmulqdq,sse2")]
unsafe fn middle_base_pclmul_impl(s: &[u64], x: &[u64], out: &mut [u64]) {
    use std::arch::x86_64::{
        __m128i, _mm_clmulepi64_si128, _mm_cvtsi128_si64, _mm_loadu_si128, _mm_setzero_si128,
        _mm_unpackhi_epi64, _mm_xor_si128,
    };
    let n = x.len();
    assert!(n % 2 == 0, "odd length {n}");
    assert_eq!(s.len(), 2 * n);
    assert_eq!(out.len(), n);
    let mut prev_high = 0u64;
    for k in 0..=n {
        // Two words of x and the matching two words of s per step: x[j] pairs with
        // s[t] and x[j + 1] with s[t - 1], where t = k + n - 1 - j.
        let mut acc0 = _mm_setzero_si128();
        let mut acc1 = _mm_setzero_si128();
        for j in (0..n).step_by(2) {
            let t = k + n - 1 - j;
            let xv = _mm_loadu_si128(x.as_ptr().add(j) as *const __m128i);
            let sv = _mm_loadu_si128(s.as_ptr().add(t - 1) as *const __m128i);
            acc0 = _mm_xor_si128(acc0, _mm_clmulepi64_si128(xv, sv, 0x10));
            acc1 = _mm_xor_si128(acc1, _mm_clmulepi64_si128(xv, sv, 0x01));
        }
        let q = _mm_xor_si128(acc0, acc1);
        let lo = _mm_cvtsi128_si64(q) as u64;
        let hi = _mm_cvtsi128_si64(_mm_unpackhi_epi64(q, q)) as u64;
        if k > 0 {
            out[k - 1] ^= prev_high ^ lo;
        }
        prev_high = hi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{RandomSource, SeededRandom};

    fn random_bits(rng: &mut SeededRandom, len: usize) -> BitVec {
        let mut bytes = vec![0u8; len.div_ceil(8)];
        rng.fill(&mut bytes).unwrap();
        BitVec::from_msb_bytes(&bytes, len).unwrap()
    }

    fn naive_toeplitz(key: &BitVec, seed: &BitVec, m: usize) -> BitVec {
        let n = key.len();
        let mut out = BitVec::zeros(m);
        for i in 0..m {
            let mut acc = false;
            for j in 0..n {
                acc ^= seed.get(i + n - 1 - j) & key.get(j);
            }
            out.set(i, acc);
        }
        out
    }

    /// Words `n .. 2n` of the full carry-less product, one word product at a time.
    fn naive_middle(s: &[u64], x: &[u64]) -> Vec<u64> {
        let n = x.len();
        let mut full = vec![0u64; 3 * n + 1];
        for (i, &a) in s.iter().enumerate() {
            for (j, &b) in x.iter().enumerate() {
                let (lo, hi) = clmul_portable(a, b);
                full[i + j] ^= lo;
                full[i + j + 1] ^= hi;
            }
        }
        full[n..2 * n].to_vec()
    }

    #[test]
    fn base_products_match_the_full_product() {
        let mut rng = SeededRandom::new(3);
        for words in [1usize, 2, 5, 16, 31, 32] {
            let s: Vec<u64> = (0..2 * words).map(|_| rng.next_u64().unwrap()).collect();
            let x: Vec<u64> = (0..words).map(|_| rng.next_u64().unwrap()).collect();
            let expected = naive_middle(&s, &x);
            let mut portable = vec![0u64; words];
            middle_base_portable(&s, &x, &mut portable);
            assert_eq!(portable, expected, "portable, {words} words");
            let mut fast = vec![0u64; words];
            base_product()(&s, &x, &mut fast);
            assert_eq!(fast, expected, "selected base, {words} words");
        }
    }

    #[test]
    fn split_products_match_the_full_product() {
        let mut rng = SeededRandom::new(4);
        for words in [64usize, 96, 256, 1024] {
            let s: Vec<u64> = (0..2 * words).map(|_| rng.next_u64().unwrap()).collect();
            let x: Vec<u64> = (0..words).map(|_| rng.next_u64().unwrap()).collect();
            let mut out = vec![0u64; words];
            middle_product(&s, &x, &mut out, base_product());
            assert_eq!(out, naive_middle(&s, &x), "{words} words");
        }
    }

    #[test]
    fn toeplitz_matches_matrix_product() {
        let mut rng = SeededRandom::new(5);
        for (n, m) in [
            (1, 1),
            (10, 3),
            (64, 64),
            (65, 1),
            (127, 63),
            (300, 200),
            (1000, 577),
            (2000, 1),
            (2049, 2049),
            (4099, 1031),
            (5003, 4001),
            (6000, 300),
        ] {
            let key = random_bits(&mut rng, n);
            let seed = random_bits(&mut rng, n + m - 1);
            assert_eq!(
                toeplitz_hash(&key, &seed, m),
                naive_toeplitz(&key, &seed, m),
                "n={n} m={m}"
            );
        }
    }

    #[test]
    fn large_hash_is_linear_in_the_key() {
        // Sizes that take the split and (with the feature) parallel paths, too large for
        // the naive product: T·(a ^ b) must equal T·a ^ T·b, and one key bit must select
        // the seed window of its column.
        let mut rng = SeededRandom::new(6);
        let (n, m) = (200_003, 90_001);
        let a = random_bits(&mut rng, n);
        let b = random_bits(&mut rng, n);
        let seed = random_bits(&mut rng, n + m - 1);
        let mut ab_words = a.words().to_vec();
        xor_into(&mut ab_words, b.words());
        let ab = BitVec::from_words(ab_words, n);
        let mut sum = toeplitz_hash(&a, &seed, m).words().to_vec();
        xor_into(&mut sum, toeplitz_hash(&b, &seed, m).words());
        assert_eq!(toeplitz_hash(&ab, &seed, m).words(), &sum[..]);
        for j in [0usize, 1, 777, n - 1] {
            let mut unit = BitVec::zeros(n);
            unit.set(j, true);
            // Column j of T is seed bits n - 1 - j .. n - 1 - j + m.
            assert_eq!(
                toeplitz_hash(&unit, &seed, m),
                seed.slice(n - 1 - j, m),
                "column {j}"
            );
        }
    }

    #[test]
    fn plan_covers_the_key() {
        for (kw, mw) in [(1, 1), (15625, 7813), (156250, 78125), (100, 3), (7, 100)] {
            let (chunks, l) = plan(kw, mw);
            assert!(l >= mw, "{kw} {mw}: chunks of {l} words");
            assert!(chunks * l >= kw, "{kw} {mw}: {chunks} x {l}");
            assert_eq!(split_length(l), l);
        }
    }

    #[test]
    fn toeplitz_of_empty_output_is_empty() {
        let key = BitVec::zeros(10);
        assert!(toeplitz_hash(&key, &BitVec::zeros(0), 0).is_empty());
    }
}
