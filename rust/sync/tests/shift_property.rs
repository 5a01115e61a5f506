//! Property: shifting side L's events by `d` ticks moves the found offset by `d`.

use proptest::prelude::*;
use qkd_sync::{OffsetFinder, PfindParams};

const PARAMS: PfindParams = PfindParams {
    buffer_order: 14,
    fine_resolution_ns: 1,
    coarse_resolution_ns: 2048,
};

/// Side H times on the fine grid (8 ticks), from a simple deterministic generator.
fn side_h(seed: u64, events: usize) -> Vec<u64> {
    let mut state = seed | 1;
    let mut t = 1u64 << 40;
    (0..events)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            t += 8 * (1 + state % 40_000);
            t
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn shift_moves_offset(seed in any::<u64>(), base in -5_000i64..5_000, shift in -20_000i64..20_000) {
        // Offsets stay well inside the fine span (2^14 bins of 8 ticks) and on the fine
        // grid, so every pair lands in one fine bin.
        let h = side_h(seed, 3000);
        let mut finder = OffsetFinder::new(PARAMS).unwrap();
        let at = |offset: i64| -> Vec<u64> { h.iter().map(|&t| t.wrapping_add_signed(8 * offset)).collect() };
        let before = finder.find(&h, &at(base)).unwrap();
        let after = finder.find(&h, &at(base + shift)).unwrap();
        prop_assert_eq!(before.offset_ticks, 8 * base);
        prop_assert_eq!(after.offset_ticks - before.offset_ticks, 8 * shift);
    }
}
