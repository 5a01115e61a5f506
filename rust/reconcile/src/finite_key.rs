//! Final key length from a finite-key bound in which every disclosed bit is counted.
//!
//! For a block of `n` reconciled bits with `e` bit errors (counted exactly during the
//! correction and confirmed by the verification hash), `Q = e / n`:
//!
//! ```text
//! mu  = sqrt( (n + k) / (n k) · (k + 1) / k · ln(4 / eps_sec) )        with k = n
//! len = floor( n · (1 - h(Q + mu)) - leak_ec - tag_bits - 2 log2(1 / eps_sec) - 1 )
//! ```
//!
//! Source: Tomamichel, Lim, Gisin and Renner, "Tight finite-key analysis for quantum
//! cryptography", Nat. Commun. 3, 634 (2012), Theorem 2, Eq. (2):
//! `l <= n (q - h(Q_tol + mu)) - leak_EC - log2(2 / (eps_sec^2 eps_cor))` with
//! `mu = sqrt((n + k) / (n k) · (k + 1) / k · ln(4 / eps_sec))`, for a source of
//! preparation quality `q = 1` (BB84 and BBM92 with ideal bases). The term
//! `log2(2 / (eps_sec^2 eps_cor)) = 1 + 2 log2(1 / eps_sec) + log2(1 / eps_cor)`; its last
//! part is the length of the paper's verification hash, so it is replaced by the number of
//! tag bits actually disclosed (never fewer, since a `t`-bit tag cannot give
//! `eps_cor < 2^-t`). `h` is the binary entropy, `leak_ec` every parity bit the
//! reconciliation disclosed; sample bits disclosed for the QBER estimate are removed from
//! the block before `n` is counted.
//!
//! Deviations from the theorem, both assumptions of this code and not covered by the paper:
//! - `k = n` and the error count of the key itself: the paper estimates the phase errors of
//!   the `n` key bits from `k` bits measured in the other basis. That rests on the
//!   symmetric basis choice of BBM92, where the raw key holds both bases and the errors of
//!   each basis bound the phase errors of the other. A link with biased basis choice needs
//!   a separate parameter-estimation sample.
//! - The measured QBER `Q` takes the place of the tolerated error rate `Q_tol`, which the
//!   paper fixes before the protocol runs and aborts above.

/// Security parameters of the final key length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecurityParams {
    /// Secrecy: distance of the final key from a uniform key independent of the adversary.
    pub eps_sec: f64,
    /// Correctness: maximum probability that the two final keys differ unnoticed.
    pub eps_cor: f64,
}

impl Default for SecurityParams {
    fn default() -> Self {
        SecurityParams {
            eps_sec: 1e-10,
            eps_cor: 1e-10,
        }
    }
}

/// Binary entropy in bits; `h(q) = 1` for `q >= 0.5`.
pub fn binary_entropy(q: f64) -> f64 {
    if q <= 0.0 {
        return 0.0;
    }
    if q >= 0.5 {
        return 1.0;
    }
    -q * q.log2() - (1.0 - q) * (1.0 - q).log2()
}

/// Statistical margin `mu` added to the observed QBER for `n` bits.
pub fn qber_margin(n: u64, eps_sec: f64) -> f64 {
    if n == 0 {
        return 0.5;
    }
    let n = n as f64;
    let k = n;
    ((n + k) / (n * k) * (k + 1.0) / k * (4.0 / eps_sec).ln()).sqrt()
}

/// Returns the final key length in bits (0 when no secret key can be extracted).
pub fn final_key_length(
    n: u64,
    errors: u64,
    leak_ec: u64,
    tag_bits: u64,
    params: &SecurityParams,
) -> u64 {
    if n == 0 {
        return 0;
    }
    let q = errors as f64 / n as f64;
    let mu = qber_margin(n, params.eps_sec);
    let secret = n as f64 * (1.0 - binary_entropy(q + mu));
    let len = secret - leak_ec as f64 - tag_bits as f64 - 2.0 * (1.0 / params.eps_sec).log2() - 1.0;
    if len <= 0.0 {
        0
    } else {
        len.floor() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entropy_values() {
        assert_eq!(binary_entropy(0.0), 0.0);
        assert!((binary_entropy(0.11) - 0.4999).abs() < 1e-3);
        assert_eq!(binary_entropy(0.7), 1.0);
    }

    #[test]
    fn length_shrinks_with_errors_and_leak() {
        let p = SecurityParams::default();
        let n = 1_000_000;
        let clean = final_key_length(n, 0, 0, 128, &p);
        let noisy = final_key_length(n, 30_000, 200_000, 128, &p);
        assert!(clean > noisy && noisy > 0, "{clean} {noisy}");
        assert!(clean < n);
        assert_eq!(final_key_length(n, 150_000, 700_000, 128, &p), 0);
    }

    #[test]
    fn length_exact_for_known_inputs() {
        // n = 1e6, Q = 3 %, leak 1.05 n h(0.03), 128 tag bits, eps_sec = 1e-10.
        let p = SecurityParams::default();
        let n = 1_000_000u64;
        let leak = (1.05 * n as f64 * binary_entropy(0.03)).round() as u64;
        let mu = qber_margin(n, 1e-10);
        // sqrt(2 / n · (n + 1) / n · ln(4e10)) for n = 10^6.
        assert!((mu - 0.006_987).abs() < 1e-6, "{mu}");
        let expected = n as f64 * (1.0 - binary_entropy(0.03 + mu))
            - leak as f64
            - 128.0
            - 2.0 * 1e10f64.log2()
            - 1.0;
        assert_eq!(
            final_key_length(n, 30_000, leak, 128, &p),
            expected.floor() as u64
        );
    }

    #[test]
    fn smaller_epsilon_gives_shorter_key() {
        let loose = SecurityParams {
            eps_sec: 1e-6,
            eps_cor: 1e-10,
        };
        let tight = SecurityParams {
            eps_sec: 1e-12,
            eps_cor: 1e-10,
        };
        assert!(
            final_key_length(100_000, 2000, 20_000, 128, &loose)
                > final_key_length(100_000, 2000, 20_000, 128, &tight)
        );
    }
}
