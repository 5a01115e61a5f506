"""The link simulator: its output measured against its parameters."""

import numpy as np
import pytest

import qkd_core

TICKS_PER_SECOND = 8e9

# H detector d pairs with L detector d ^ 2 in matching bases (anti-correlation).
PARTNER = {1: 4, 2: 8, 4: 1, 8: 2}


def collect(sim, seconds, batch=0.1):
    parts = [sim.next_batch(batch) for _ in range(int(round(seconds / batch)))]
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(4))


def coincidences(high_times, low_times, offset, window):
    """Indices (i_high, i_low) of L events with an H event within `window` ticks of
    the L time minus `offset`."""
    shifted = low_times.astype(np.int64) - offset
    h = high_times.astype(np.int64)
    idx = np.clip(np.searchsorted(h, shifted), 1, len(h) - 1)
    left, right = h[idx - 1], h[idx]
    nearest = np.where(np.abs(shifted - left) <= np.abs(right - shifted), idx - 1, idx)
    ok = np.abs(h[nearest] - shifted) <= window
    return nearest[ok], np.nonzero(ok)[0]


def test_batch_dtypes_and_order():
    sim = qkd_core.LinkSimulator(seed=3, pair_rate=1e5, jitter_ps=200, dark_count_rate=1e3)
    ht, hp, lt, lp = sim.next_batch(0.05)
    assert ht.dtype == np.uint64
    assert lt.dtype == np.uint64
    assert hp.dtype == np.uint8
    assert lp.dtype == np.uint8
    assert len(ht) == len(hp)
    assert len(lt) == len(lp)
    assert np.all(np.diff(ht.astype(np.int64)) >= 0)
    assert np.all(np.diff(lt.astype(np.int64)) >= 0)
    assert set(np.unique(hp)) <= {1, 2, 4, 8}


def test_pair_rate_and_loss_match_parameters():
    rate, t_high, t_low, seconds = 2e5, 0.9, 0.2, 1.0
    sim = qkd_core.LinkSimulator(seed=11, pair_rate=rate, transmission=(t_high, t_low))
    ht, _, lt, _ = collect(sim, seconds)
    pairs = rate * seconds
    # Poisson and binomial counts: 5 standard deviations.
    for measured, p in [(len(ht), t_high), (len(lt), t_low)]:
        expected = pairs * p
        assert abs(measured - expected) < 5 * np.sqrt(expected), (measured, expected)
    stats = sim.stats()
    assert abs(stats["pairs"] - pairs) < 5 * np.sqrt(pairs)


def test_offset_and_qber_match_parameters():
    offset, qber = 34_568, 0.04
    sim = qkd_core.LinkSimulator(
        seed=5, pair_rate=1e5, qber=qber, offset_ticks=offset, transmission=(1.0, 0.5),
        jitter_ps=(100, 150), dark_count_rate=200,
    )
    ht, hp, lt, lp = collect(sim, 1.0)

    # The offset: the peak of the L-minus-H time difference of nearest neighbours.
    i_h, i_l = coincidences(ht, lt, offset, window=16)
    diffs = lt[i_l].astype(np.int64) - ht[i_h].astype(np.int64)
    assert abs(np.median(diffs) - offset) <= 1
    assert len(i_h) > 0.95 * len(lt)
    # Nothing near a wrong offset: the peak is real.
    i_wrong, _ = coincidences(ht, lt, offset + 4000, window=16)
    assert len(i_wrong) < 0.01 * len(lt)

    ph, pl = hp[i_h], lp[i_l]
    basis_h = np.isin(ph, [2, 8])
    basis_l = np.isin(pl, [2, 8])
    sifted = basis_h == basis_l
    partner = np.vectorize(PARTNER.get)(ph[sifted])
    errors = np.count_nonzero(partner != pl[sifted])
    n = np.count_nonzero(sifted)
    measured = errors / n
    sigma = np.sqrt(qber * (1 - qber) / n)
    assert abs(measured - qber) < 5 * sigma + 2e-3, (measured, qber, n)
    # About half of the coincidences survive sifting.
    assert abs(n / len(ph) - 0.5) < 0.02


@pytest.mark.parametrize("drift", [1e-5, -1e-5])
def test_drift_both_signs(drift):
    offset = 1000
    sim = qkd_core.LinkSimulator(seed=2, pair_rate=5e4, offset_ticks=offset, drift=drift)
    ht, _, lt, _ = collect(sim, 0.5)
    assert len(ht) == len(lt)  # lossless and noiseless: one L event per H event
    elapsed = (ht.astype(np.int64) - int(ht[0])).astype(np.float64)
    diffs = lt.astype(np.int64) - ht.astype(np.int64) - offset
    slope = np.polyfit(elapsed, diffs, 1)[0]
    assert slope == pytest.approx(drift, rel=1e-3)


def test_same_seed_same_streams_any_batching():
    kwargs = dict(seed=9, pair_rate=1e5, jitter_ps=300, dark_count_rate=500, qber=0.02)
    a = collect(qkd_core.LinkSimulator(**kwargs), 0.4, batch=0.2)
    b = collect(qkd_core.LinkSimulator(**kwargs), 0.4, batch=0.01)
    for x, y in zip(a, b):
        n = min(len(x), len(y)) - 50
        np.testing.assert_array_equal(x[:n], y[:n])


def test_pair_limit_finishes():
    sim = qkd_core.LinkSimulator(seed=1, pair_rate=1e3, pair_limit=500)
    ht, _, lt, _ = sim.next_batch(10.0)
    assert len(ht) == 500
    assert len(lt) == 500
    assert sim.finished
    assert all(len(a) == 0 for a in sim.next_batch(1.0))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(qber=0.6), "qber"),
        (dict(pair_rate=0), "pair_rate"),
        (dict(drift=0.1), "drift"),
        (dict(transmission=(1.0, 1.5)), "transmission"),
        (dict(dark_count_rate=-1.0), "dark_count_rate"),
    ],
)
def test_invalid_parameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        qkd_core.LinkSimulator(**kwargs)


def test_invalid_duration_raises():
    sim = qkd_core.LinkSimulator()
    with pytest.raises(ValueError, match="duration"):
        sim.next_batch(-1.0)
    with pytest.raises(TypeError):
        qkd_core.LinkSimulator(efficiency="high")
