//! Privacy amplification by a random Toeplitz matrix over GF(2).
//!
//! The `m × n` Toeplitz matrix with seed bits `s[0 .. n + m - 1]` has entry
//! `T[i][j] = s[i - j + n - 1]`, so output bit `i` is `XOR_j s[i + n - 1 - j] · x[j]`: the
//! coefficient of `z^(n-1+i)` in the product of the polynomials `S(z)` and `X(z)` over GF(2).
//! Toeplitz matrices with a uniformly random seed form a 2-universal family (Krawczyk,
//! CRYPTO '94), which the leftover hash lemma needs.
//!
//! The product is computed with Karatsuba's method down to blocks of
//! [`SCHOOLBOOK_WORDS`] 64-bit words, which are multiplied with the carry-less multiply
//! instruction (PCLMULQDQ) where the CPU has it and with a portable loop otherwise. Cost:
//! O(n^1.58) word operations instead of the O(n·m) of a direct matrix product.

use crate::bits::BitVec;

/// Below this many words per factor the quadratic product is faster than another
/// Karatsuba level (measured with `cargo bench -p qkd-reconcile -- toeplitz`).
const SCHOOLBOOK_WORDS: usize = 16;

type BaseMul = fn(&[u64], &[u64], &mut [u64]);

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
    let product = clmul_poly(key.words(), seed.words());
    let product = BitVec::from_words(product, (key.words().len() + seed.words().len()) * 64);
    product.slice(n - 1, m)
}

/// Multiplies two GF(2) polynomials given as words (bit `i` = coefficient of `z^i`).
/// The result has `a.len() + b.len()` words.
pub fn clmul_poly(a: &[u64], b: &[u64]) -> Vec<u64> {
    let base = base_multiplier();
    let mut out = vec![0u64; a.len() + b.len()];
    if a.is_empty() || b.is_empty() {
        return out;
    }
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    let k = short.len();
    let mut piece = vec![0u64; 2 * k];
    let mut scratch = vec![0u64; scratch_words(k)];
    let whole = long.len() / k * k;
    for (c, chunk) in long[..whole].chunks_exact(k).enumerate() {
        karatsuba(short, chunk, &mut piece, &mut scratch, base);
        for (o, p) in out[c * k..].iter_mut().zip(&piece) {
            *o ^= p;
        }
    }
    // The shorter tail is multiplied by pieces of its own length instead of being padded
    // to `k` words, which would waste most of a full k × k product.
    let tail = &long[whole..];
    if !tail.is_empty() {
        let product = clmul_poly(short, tail);
        for (o, p) in out[whole..].iter_mut().zip(&product) {
            *o ^= p;
        }
    }
    out
}

/// Writes `a · b` into `out` (`2 n` words) for factors of `n` words each; `scratch` must
/// hold at least [`scratch_words`]`(n)` words.
fn karatsuba(a: &[u64], b: &[u64], out: &mut [u64], scratch: &mut [u64], base: BaseMul) {
    let n = a.len();
    out.fill(0);
    if n <= SCHOOLBOOK_WORDS {
        base(a, b, out);
        return;
    }
    let h = n.div_ceil(2);
    let (a0, a1) = a.split_at(h);
    let (b0, b1) = b.split_at(h);
    let (sums, rest) = scratch.split_at_mut(4 * h);
    let (sum_a, sums) = sums.split_at_mut(h);
    let (sum_b, middle) = sums.split_at_mut(h);
    {
        let (low, high) = out.split_at_mut(2 * h);
        karatsuba(a0, b0, low, rest, base);
        karatsuba(a1, b1, high, rest, base);
    }
    sum_a.copy_from_slice(a0);
    sum_b.copy_from_slice(b0);
    for (x, y) in sum_a.iter_mut().zip(a1) {
        *x ^= y;
    }
    for (x, y) in sum_b.iter_mut().zip(b1) {
        *x ^= y;
    }
    karatsuba(sum_a, sum_b, middle, rest, base);
    for (m, p0) in middle.iter_mut().zip(&out[..2 * h]) {
        *m ^= p0;
    }
    for (m, p2) in middle.iter_mut().zip(&out[2 * h..]) {
        *m ^= p2;
    }
    // The middle term has fewer than 2n - h non-zero words, so the words `zip` cuts off at
    // the end of `out` are zero.
    for (o, m) in out[h..].iter_mut().zip(middle.iter()) {
        *o ^= m;
    }
}

/// Scratch words [`karatsuba`] needs for factors of `n` words: 4h per level, h = ceil(n/2).
fn scratch_words(n: usize) -> usize {
    if n <= SCHOOLBOOK_WORDS {
        0
    } else {
        let h = n.div_ceil(2);
        4 * h + scratch_words(h)
    }
}

fn base_multiplier() -> BaseMul {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("pclmulqdq") {
            return schoolbook_pclmul;
        }
    }
    schoolbook_portable
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

fn schoolbook_portable(a: &[u64], b: &[u64], out: &mut [u64]) {
    for (i, &x) in a.iter().enumerate() {
        for (j, &y) in b.iter().enumerate() {
            let (lo, hi) = clmul_portable(x, y);
            out[i + j] ^= lo;
            out[i + j + 1] ^= hi;
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn schoolbook_pclmul(a: &[u64], b: &[u64], out: &mut [u64]) {
    // SAFETY: only selected by `base_multiplier` after the CPU reported PCLMULQDQ.
    unsafe { schoolbook_pclmul_impl(a, b, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "pclmulqdq,sse2")]
unsafe fn schoolbook_pclmul_impl(a: &[u64], b: &[u64], out: &mut [u64]) {
    use std::arch::x86_64::{
        __m128i, _mm_clmulepi64_si128, _mm_loadu_si128, _mm_setzero_si128, _mm_slli_si128,
        _mm_srli_si128, _mm_storeu_si128, _mm_xor_si128,
    };
    const MAX: usize = SCHOOLBOOK_WORDS + 1;
    // Zero-padded even-length copies, so that the loops below take two words at a time.
    let mut pa = [0u64; MAX];
    let mut pb = [0u64; MAX];
    let mut acc = [0u64; 2 * MAX + 2];
    pa[..a.len()].copy_from_slice(a);
    pb[..b.len()].copy_from_slice(b);
    let (na, nb) = (a.len().div_ceil(2) * 2, b.len().div_ceil(2) * 2);
    for i in (0..na).step_by(2) {
        let x = _mm_loadu_si128(pa.as_ptr().add(i) as *const __m128i);
        // Words i + j and i + j + 1 are final for this row after step j, so the upper
        // half of each 2 x 2 block product travels in `carry` instead of through memory.
        let mut carry = _mm_setzero_si128();
        for j in (0..nb).step_by(2) {
            let y = _mm_loadu_si128(pb.as_ptr().add(j) as *const __m128i);
            let p00 = _mm_clmulepi64_si128(x, y, 0x00);
            let p11 = _mm_clmulepi64_si128(x, y, 0x11);
            let mid = _mm_xor_si128(
                _mm_clmulepi64_si128(x, y, 0x01),
                _mm_clmulepi64_si128(x, y, 0x10),
            );
            let low = _mm_xor_si128(_mm_xor_si128(p00, _mm_slli_si128(mid, 8)), carry);
            carry = _mm_xor_si128(p11, _mm_srli_si128(mid, 8));
            let slot = acc.as_mut_ptr().add(i + j) as *mut __m128i;
            _mm_storeu_si128(slot, _mm_xor_si128(_mm_loadu_si128(slot), low));
        }
        let slot = acc.as_mut_ptr().add(i + nb) as *mut __m128i;
        _mm_storeu_si128(slot, _mm_xor_si128(_mm_loadu_si128(slot), carry));
    }
    for (o, v) in out.iter_mut().zip(&acc) {
        *o ^= v;
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

    #[test]
    fn portable_and_pclmul_products_agree() {
        let mut rng = SeededRandom::new(3);
        for words in [1usize, 2, 5, 16, 17, 40, 100] {
            let a: Vec<u64> = (0..words).map(|_| rng.next_u64().unwrap()).collect();
            let b: Vec<u64> = (0..words).map(|_| rng.next_u64().unwrap()).collect();
            let mut slow = vec![0u64; 2 * words];
            schoolbook_portable(&a, &b, &mut slow);
            assert_eq!(clmul_poly(&a, &b), slow, "{words} words");
        }
    }

    #[test]
    fn uneven_factors_multiply_correctly() {
        let mut rng = SeededRandom::new(4);
        let a: Vec<u64> = (0..37).map(|_| rng.next_u64().unwrap()).collect();
        let b: Vec<u64> = (0..90).map(|_| rng.next_u64().unwrap()).collect();
        let mut slow = vec![0u64; 127];
        schoolbook_portable(&a, &b, &mut slow);
        assert_eq!(clmul_poly(&a, &b), slow);
        assert_eq!(clmul_poly(&b, &a), slow);
    }

    #[test]
    fn toeplitz_matches_matrix_product() {
        let mut rng = SeededRandom::new(5);
        for (n, m) in [
            (1, 1),
            (10, 3),
            (64, 64),
            (65, 1),
            (300, 200),
            (1000, 577),
            (2000, 1),
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
    fn toeplitz_of_empty_output_is_empty() {
        let key = BitVec::zeros(10);
        assert!(toeplitz_hash(&key, &BitVec::zeros(0), 0).is_empty());
    }
}
