"""The link simulator: its output measured against its parameters."""

import time

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


def test_skip_ticks_matches_run_from_zero():
    # Dead time and dark counts make the state at the skip depend on earlier events.
    kwargs = dict(seed=4, pair_rate=3e5, jitter_ps=(200, 400), dark_count_rate=2e4, qber=0.03,
                  dead_time_ps=5e6, offset_ticks=123_456, start_ticks=0)
    full = collect(qkd_core.LinkSimulator(**kwargs), 1.0)
    skip = 4_400_000_000
    skipped = qkd_core.LinkSimulator(skip_ticks=skip, **kwargs)
    assert skipped.elapsed_ticks == skip
    # Both runs end at 8e9 ticks, so both hold back the same events at the end.
    part = skipped.next_batch(0.45)
    cuts = {"high": skip, "low": skip + kwargs["offset_ticks"]}
    for side, (times, patterns) in (("high", (0, 1)), ("low", (2, 3))):
        after_cut = full[times] >= cuts[side]
        assert len(part[times]) > 100_000, side
        np.testing.assert_array_equal(part[times], full[times][after_cut], err_msg=side)
        np.testing.assert_array_equal(part[patterns], full[patterns][after_cut], err_msg=side)


def test_skip_ticks_simulates_little_before():
    skip = 3600 * 8_000_000_000
    sim = qkd_core.LinkSimulator(seed=2, pair_rate=1e6, skip_ticks=skip)
    sim.next_batch(0.1)
    stats = sim.stats()
    # The state at the skip needs at most two segments of 2^29 ticks (134 ms) before it.
    assert 0 < stats["warmup_pairs"] < 1e6 * 0.15
    assert stats["pairs"] < 1e6 * 0.11
    assert sim.elapsed_ticks == skip + 800_000_000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(skip_ticks=10, pair_limit=5), "skip_ticks = 10.*pair_limit"),
        (dict(skip_ticks=(1 << 52) + 1), "skip_ticks"),
    ],
)
def test_invalid_skip_raises_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        qkd_core.LinkSimulator(**kwargs)


def node_source_config(start_time: float):
    from S15qkd.config import Config

    return Config({"source": {"kind": "simulator", "real_time": True, "epochs": 0,
                              "start_time": start_time, "pair_rate": 2e4,
                              "background_rate": 5e4, "jitter_ps": 300.0}})


@pytest.mark.parametrize("role", ["high", "low"])
def test_node_source_skips_to_start_time(role):
    from S15qkd import stages

    config = node_source_config(time.time() - 120)
    source = stages.open_source(config, role)
    skip = source._simulator.elapsed_ticks
    assert 119 * 8e9 < skip < 130 * 8e9
    # Opening simulated only what the state at the skip depends on, not the 120 s before.
    stats = source._simulator.stats()
    assert stats["pairs"] < 100
    assert stats["warmup_pairs"] < 2e4 * 0.15
    # Read without the real-time pacing of next_batch.
    batches = [source._read() for _ in range(8)]
    times = np.concatenate([b[0] for b in batches])
    patterns = np.concatenate([b[1] for b in batches])

    # The same link from its start, as a node without source.start_time runs it.
    arguments = stages.simulator_arguments(config)
    reference = qkd_core.LinkSimulator(**arguments)
    parts = [reference.next_batch(10.0) for _ in range(int(skip / TICKS_PER_SECOND / 10) + 2)]
    column = 0 if role == "high" else 2
    full_times = np.concatenate([p[column] for p in parts])
    full_patterns = np.concatenate([p[column + 1] for p in parts])

    # Times relative to the simulator's start, undoing the 49-bit wrap of the event time.
    def relative(t):
        return (t.astype(np.int64) - qkd_core.DEFAULT_START_TICKS % (1 << 49)) % (1 << 49)

    cut = skip + (arguments["offset_ticks"] if role == "low" else 0)
    # Compare up to well before the end of the skipped run, whose last events wait.
    last = int(relative(times)[-1]) - 1_000_000
    assert last - cut > 0.5 * TICKS_PER_SECOND
    window = (relative(full_times) >= cut) & (relative(full_times) <= last)
    mine = relative(times) <= last
    assert relative(times)[0] >= cut
    np.testing.assert_array_equal(times[mine], full_times[window])
    np.testing.assert_array_equal(patterns[mine], full_patterns[window])


def test_node_source_start_time_too_old():
    from S15qkd import stages

    config = node_source_config(time.time() - 7 * 86400)
    with pytest.raises(ValueError, match=r"invalid source.start_time .* 7\.0 days ago"):
        stages.open_source(config, "high")
