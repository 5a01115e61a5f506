//! Bit strings packed into `u64` words, and conversions to the external packings.
//!
//! Inside this crate bit `i` of a string lives in word `i / 64` at bit `i % 64` (least
//! significant bit first), which keeps parity and polynomial arithmetic word-parallel.
//! Outside, keys travel as bytes with the first bit in the most significant bit of the first
//! byte (numpy `packbits` order); unused trailing bits are zero in both packings.

/// A fixed-length string of bits.
#[derive(Clone, PartialEq, Eq)]
pub struct BitVec {
    words: Vec<u64>,
    len: usize,
}

impl std::fmt::Debug for BitVec {
    // Never print key material, only its size.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BitVec({} bits)", self.len)
    }
}

impl BitVec {
    /// Creates a string of `len` zero bits.
    pub fn zeros(len: usize) -> Self {
        BitVec {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    /// Builds a string from one bit per element (0 or 1); any non-zero element counts as 1.
    pub fn from_bits(bits: &[u8]) -> Self {
        let mut v = BitVec::zeros(bits.len());
        for (w, chunk) in v.words.iter_mut().zip(bits.chunks(64)) {
            let mut word = 0u64;
            for (i, &b) in chunk.iter().enumerate() {
                word |= u64::from(b != 0) << i;
            }
            *w = word;
        }
        v
    }

    /// Builds a string from words in this crate's packing; bits beyond `len` are cleared.
    pub fn from_words(mut words: Vec<u64>, len: usize) -> Self {
        words.resize(len.div_ceil(64), 0);
        let mut v = BitVec { words, len };
        v.clear_tail();
        v
    }

    /// Unpacks `len` bits from bytes packed most significant bit first.
    ///
    /// Returns `None` when `bytes` is shorter than `len` bits need.
    pub fn from_msb_bytes(bytes: &[u8], len: usize) -> Option<Self> {
        if bytes.len() < len.div_ceil(8) {
            return None;
        }
        let mut v = BitVec::zeros(len);
        for (w, chunk) in v.words.iter_mut().zip(bytes.chunks(8)) {
            let mut be = [0u8; 8];
            be[..chunk.len()].copy_from_slice(chunk);
            // Bit 7 of byte 0 (the first bit) becomes bit 0 of the word.
            *w = u64::from_be_bytes(be).reverse_bits();
        }
        v.clear_tail();
        Some(v)
    }

    /// Packs the bits into bytes, most significant bit first, trailing bits zero.
    pub fn to_msb_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len.div_ceil(8));
        for &w in &self.words {
            out.extend_from_slice(&w.reverse_bits().to_be_bytes());
        }
        out.truncate(self.len.div_ceil(8));
        out
    }

    /// Returns one element per bit (0 or 1).
    pub fn to_bits(&self) -> Vec<u8> {
        (0..self.len).map(|i| u8::from(self.get(i))).collect()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn words(&self) -> &[u64] {
        &self.words
    }

    #[inline]
    pub fn get(&self, i: usize) -> bool {
        (self.words[i >> 6] >> (i & 63)) & 1 == 1
    }

    #[inline]
    pub fn set(&mut self, i: usize, value: bool) {
        let mask = 1u64 << (i & 63);
        if value {
            self.words[i >> 6] |= mask;
        } else {
            self.words[i >> 6] &= !mask;
        }
    }

    #[inline]
    pub fn flip(&mut self, i: usize) {
        self.words[i >> 6] ^= 1u64 << (i & 63);
    }

    /// Returns the parity (XOR) of bits `start .. start + len`.
    #[inline]
    pub fn parity(&self, start: usize, len: usize) -> bool {
        if len == 0 {
            return false;
        }
        let end = start + len; // exclusive
        let (first, last) = (start >> 6, (end - 1) >> 6);
        let low_mask = !0u64 << (start & 63);
        let high_mask = !0u64 >> (63 - ((end - 1) & 63));
        if first == last {
            return (self.words[first] & low_mask & high_mask).count_ones() & 1 == 1;
        }
        let mut acc = (self.words[first] & low_mask) ^ (self.words[last] & high_mask);
        for &w in &self.words[first + 1..last] {
            acc ^= w;
        }
        acc.count_ones() & 1 == 1
    }

    /// Returns the number of positions where `self` and `other` differ (equal lengths).
    pub fn hamming_distance(&self, other: &BitVec) -> usize {
        assert_eq!(
            self.len, other.len,
            "hamming distance of strings of different lengths"
        );
        self.words
            .iter()
            .zip(&other.words)
            .map(|(a, b)| (a ^ b).count_ones() as usize)
            .sum()
    }

    /// Returns bits `start .. start + len` as a new string.
    pub fn slice(&self, start: usize, len: usize) -> BitVec {
        let mut out = BitVec::zeros(len);
        let shift = start & 63;
        let base = start >> 6;
        for (k, w) in out.words.iter_mut().enumerate() {
            let lo = self.words.get(base + k).copied().unwrap_or(0) >> shift;
            let hi = if shift == 0 {
                0
            } else {
                self.words.get(base + k + 1).copied().unwrap_or(0) << (64 - shift)
            };
            *w = lo | hi;
        }
        out.clear_tail();
        out
    }

    /// Returns the string with the bits at the sorted positions `removed` left out.
    pub fn without_positions(&self, removed: &[usize]) -> BitVec {
        if removed.is_empty() {
            return self.clone();
        }
        let mut out = BitVec::zeros(self.len - removed.len());
        let mut r = removed.iter().peekable();
        let mut j = 0;
        for i in 0..self.len {
            if r.peek() == Some(&&i) {
                r.next();
                continue;
            }
            if self.get(i) {
                out.set(j, true);
            }
            j += 1;
        }
        out
    }

    fn clear_tail(&mut self) {
        let r = self.len & 63;
        if r != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << r) - 1;
            }
        }
    }
}

impl BitVec {
    /// Returns the string `out[i] = self[order[i]]` (a gather through a permutation).
    pub fn gather(&self, order: &[u32]) -> BitVec {
        let mut words = Vec::with_capacity(order.len().div_ceil(64));
        for chunk in order.chunks(64) {
            let mut w = 0u64;
            for (i, &src) in chunk.iter().enumerate() {
                w |= u64::from(self.get(src as usize)) << i;
            }
            words.push(w);
        }
        BitVec {
            words,
            len: order.len(),
        }
    }
}

/// Packs booleans into bytes, most significant bit first.
pub fn pack_flags(flags: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; flags.len().div_ceil(8)];
    for (i, &f) in flags.iter().enumerate() {
        if f {
            out[i >> 3] |= 0x80 >> (i & 7);
        }
    }
    out
}

/// Unpacks `count` booleans from bytes packed most significant bit first.
pub fn unpack_flags(bytes: &[u8], count: usize) -> Vec<bool> {
    (0..count)
        .map(|i| bytes[i >> 3] & (0x80 >> (i & 7)) != 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_parity(v: &BitVec, start: usize, len: usize) -> bool {
        (start..start + len).filter(|&i| v.get(i)).count() % 2 == 1
    }

    #[test]
    fn parity_matches_naive_on_all_ranges() {
        let bits: Vec<u8> = (0..300u32).map(|i| ((i * 7919) % 13 % 2) as u8).collect();
        let v = BitVec::from_bits(&bits);
        for start in 0..300 {
            for len in 0..(300 - start).min(140) {
                assert_eq!(
                    v.parity(start, len),
                    naive_parity(&v, start, len),
                    "{start} {len}"
                );
            }
        }
    }

    #[test]
    fn msb_bytes_round_trip() {
        let bits: Vec<u8> = (0..77u32).map(|i| ((i * 31) % 5 % 2) as u8).collect();
        let v = BitVec::from_bits(&bits);
        let bytes = v.to_msb_bytes();
        assert_eq!(bytes.len(), 10);
        assert_eq!(bytes[0] >> 7, bits[0]);
        assert_eq!(BitVec::from_msb_bytes(&bytes, 77).unwrap(), v);
        assert!(BitVec::from_msb_bytes(&bytes, 81).is_none());
    }

    #[test]
    fn gather_follows_the_order() {
        let bits: Vec<u8> = (0..130u32).map(|i| ((i * 11) % 3 % 2) as u8).collect();
        let v = BitVec::from_bits(&bits);
        let order: Vec<u32> = (0..130u32).rev().collect();
        let expected: Vec<u8> = bits.iter().rev().copied().collect();
        assert_eq!(v.gather(&order).to_bits(), expected);
        assert_eq!(v.without_positions(&[]), v);
    }

    #[test]
    fn slice_and_removal_keep_order() {
        let bits: Vec<u8> = (0..200u32).map(|i| ((i * 13) % 7 % 2) as u8).collect();
        let v = BitVec::from_bits(&bits);
        let s = v.slice(37, 130);
        assert_eq!(s.to_bits(), bits[37..167].to_vec());
        let r = v.without_positions(&[0, 5, 199]);
        let mut expected = bits.clone();
        expected.remove(199);
        expected.remove(5);
        expected.remove(0);
        assert_eq!(r.to_bits(), expected);
    }
}
