//! Key verification: a polynomial hash modulo the Mersenne prime 2^61 - 1.
//!
//! The key is cut into `L` chunks of 32 bits `c_1 .. c_L` (its length in bits is appended as
//! one more chunk) and hashed as `h = sum c_i · r^(L + 1 - i) mod p` with a secret random
//! `r`. Two different inputs of equal length collide for at most `L + 1` of the `p - 1`
//! non-zero values of `r` (a non-zero polynomial of degree at most `L + 1` has at most that
//! many roots), so a tag of two hashes under independent keys collides with probability at
//! most `((L + 1) / (p - 1))^2`: about 2^-94 for a block of 10^6 bits.

use crate::bits::BitVec;

/// The Mersenne prime 2^61 - 1.
pub const P61: u64 = (1 << 61) - 1;

/// Number of tag bits a peer discloses: two 64-bit fields on the wire. Only 122 of them
/// carry information, but all 128 are counted as disclosed.
pub const TAG_BITS: u64 = 128;

/// Keys of the verification hash; each must lie in `1 .. P61`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct HashKeys(pub [u64; 2]);

impl std::fmt::Debug for HashKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HashKeys(..)")
    }
}

impl HashKeys {
    /// Maps two random words to valid keys (uniform up to a bias below 2^-60).
    pub fn from_random(a: u64, b: u64) -> Self {
        HashKeys([1 + a % (P61 - 1), 1 + b % (P61 - 1)])
    }

    pub fn is_valid(&self) -> bool {
        self.0.iter().all(|&k| (1..P61).contains(&k))
    }
}

#[inline]
fn mul_mod(a: u64, b: u64) -> u64 {
    let prod = u128::from(a) * u128::from(b);
    let lo = (prod as u64) & P61;
    let hi = (prod >> 61) as u64;
    let s = lo + hi;
    if s >= P61 {
        s - P61
    } else {
        s
    }
}

#[inline]
fn add_mod(a: u64, b: u64) -> u64 {
    let s = a + b;
    if s >= P61 {
        s - P61
    } else {
        s
    }
}

/// Returns the 2 × 61-bit verification tag of `key` under `keys`.
pub fn tag(key: &BitVec, keys: HashKeys) -> [u64; 2] {
    let mut h = [0u64; 2];
    let mut absorb = |chunk: u64| {
        for (hv, &r) in h.iter_mut().zip(&keys.0) {
            *hv = mul_mod(add_mod(*hv, chunk), r);
        }
    };
    for &w in key.words() {
        absorb(w & 0xffff_ffff);
        absorb(w >> 32);
    }
    absorb(key.len() as u64 % P61);
    h
}

/// Returns the collision probability bound of [`tag`] for keys of `n` bits.
pub fn collision_bound(n: usize) -> f64 {
    let chunks = (2 * n.div_ceil(64) + 1) as f64;
    (chunks / (P61 - 1) as f64).powi(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_mod_matches_u128_reference() {
        for &(a, b) in &[(P61 - 1, P61 - 1), (12345, 67890), (1 << 60, 3), (0, 5)] {
            let expected = ((u128::from(a) * u128::from(b)) % u128::from(P61)) as u64;
            assert_eq!(mul_mod(a, b), expected);
        }
    }

    #[test]
    fn one_flipped_bit_changes_tag() {
        let bits: Vec<u8> = (0..10_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 31) as u8)
            .collect();
        let key = BitVec::from_bits(&bits);
        let keys = HashKeys::from_random(0x1234_5678_9abc, 0xfeed_beef_cafe);
        let t = tag(&key, keys);
        for pos in [0, 1, 63, 64, 5000, 9999] {
            let mut other = key.clone();
            other.flip(pos);
            assert_ne!(tag(&other, keys), t, "flip at {pos}");
        }
        assert_eq!(tag(&key.clone(), keys), t);
    }

    #[test]
    fn length_is_part_of_the_tag() {
        let keys = HashKeys::from_random(1, 2);
        assert_ne!(tag(&BitVec::zeros(10), keys), tag(&BitVec::zeros(11), keys));
    }

    #[test]
    fn keys_are_validated() {
        assert!(HashKeys::from_random(u64::MAX, 0).is_valid());
        assert!(!HashKeys([0, 1]).is_valid());
        assert!(collision_bound(1_000_000) < 1e-25);
    }
}
