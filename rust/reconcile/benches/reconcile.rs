//! Benchmarks of reconciliation and privacy amplification.
//!
//! `cargo bench -p qkd-reconcile` first prints a quality table (efficiency f, frame failure
//! rate, messages per block) from repeated simulated blocks, then criterion timings:
//! - `reconcile/<qber>/<bits>`: one whole block between two in-process peers on one
//!   thread (Cascade, verification, privacy amplification of both sides).
//! - `toeplitz/<bits>`: privacy amplification of `bits` bits to `bits / 2`.
//! - `baseline/...`: the parity of every word of the same input, the cost of merely reading it.
//!
//! Set `QKD_BENCH_TRIALS` to change the number of simulated blocks per table row (default
//! 20; rows with 10^6 bits use a fifth of it, at least 2); 0 skips the table.

use criterion::{BenchmarkId, Criterion, Throughput};
use qkd_reconcile::bits::BitVec;
use qkd_reconcile::finite_key::binary_entropy;
use qkd_reconcile::message::DiscardReason;
use qkd_reconcile::protocol::run_pair;
use qkd_reconcile::rng::{simulated_key_pair, RandomSource, SeededRandom};
use qkd_reconcile::toeplitz::toeplitz_hash;
use qkd_reconcile::{BlockResult, Config, Reconciler, Role};

const QBERS: [f64; 5] = [0.01, 0.02, 0.03, 0.05, 0.08];
const SIZES: [usize; 3] = [10_000, 100_000, 1_000_000];

/// Two peers that already know the QBER, as after the first block of a run.
fn peers(seed: u64, qber: f64) -> (Reconciler, Reconciler) {
    let config = Config {
        initial_qber: Some(qber),
        ..Config::default()
    };
    let a = Reconciler::new(
        Role::Initiator,
        config.clone(),
        Box::new(SeededRandom::new(seed)),
    )
    .unwrap();
    let b = Reconciler::new(
        Role::Responder,
        config,
        Box::new(SeededRandom::new(seed ^ 0x5555)),
    )
    .unwrap();
    (a, b)
}

fn random_bits(rng: &mut SeededRandom, len: usize) -> BitVec {
    let mut bytes = vec![0u8; len.div_ceil(8)];
    rng.fill(&mut bytes).unwrap();
    BitVec::from_msb_bytes(&bytes, len).unwrap()
}

/// CPU time of this thread in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`), so that throughput
/// does not depend on what else runs on the machine.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn print_pa_table() {
    let mut rng = SeededRandom::new(5);
    println!("| key bits | final bits | Toeplitz Mbit/s (CPU time) | read-parity baseline Mbit/s | ratio |");
    println!("|---|---|---|---|---|");
    for n in [1_000_000usize, 10_000_000] {
        let m = n / 2;
        let key = random_bits(&mut rng, n);
        let seed = random_bits(&mut rng, n + m - 1);
        let reps = if n > 1_000_000 { 3 } else { 20 };
        let t0 = thread_cpu_ns();
        for _ in 0..reps {
            std::hint::black_box(toeplitz_hash(&key, &seed, m));
        }
        let pa = (reps * n) as f64 / ((thread_cpu_ns() - t0) as f64 / 1e3);
        let t0 = thread_cpu_ns();
        let base_reps = 200;
        for _ in 0..base_reps {
            std::hint::black_box(key.parity(0, n) ^ seed.parity(0, n + m - 1));
        }
        let base = (base_reps * n) as f64 / ((thread_cpu_ns() - t0).max(1) as f64 / 1e3);
        println!("| {n} | {m} | {pa:.0} | {base:.0} | {:.4} |", pa / base);
    }
}

fn print_quality_table() {
    let trials: u64 = std::env::var("QKD_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    if trials == 0 {
        return;
    }
    println!("| QBER | block bits | f (mean) | f (max) | frame failures | blocks without key | messages per block | final/raw | Mbit/s (CPU time, both peers) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for &n in &SIZES {
        for &q in &QBERS {
            let t = if n >= 1_000_000 {
                (trials / 5).max(2)
            } else {
                trials
            };
            let (mut f_sum, mut f_max, mut failures, mut messages, mut yield_sum) =
                (0.0, 0.0f64, 0, 0, 0.0);
            let mut cpu_ns = 0;
            let mut no_key = 0;
            for s in 0..t {
                let (ka, kb) = simulated_key_pair(n, q, 1000 + s);
                let (mut a, mut b) = peers(s, q);
                let t0 = thread_cpu_ns();
                let run = run_pair(&mut a, &mut b, s, ka, kb, |_, _, m| Some(m)).unwrap();
                cpu_ns += thread_cpu_ns() - t0;
                let st = &run.responder.stats;
                let f = st.leak_ec as f64 / (st.key_bits as f64 * binary_entropy(st.qber()));
                f_sum += f;
                f_max = f_max.max(f);
                messages += run.messages;
                match run.responder.result {
                    BlockResult::Verified { .. } => {
                        yield_sum += st.final_bits as f64 / st.raw_bits as f64;
                    }
                    // A frame failure: Cascade ended with keys the tags found different.
                    BlockResult::Discarded {
                        reason: DiscardReason::VerificationFailed,
                        ..
                    } => failures += 1,
                    BlockResult::Discarded { .. } => no_key += 1,
                }
            }
            println!(
                "| {:.2} | {n} | {:.3} | {:.3} | {failures}/{t} | {no_key}/{t} | {} | {:.3} | {:.1} |",
                q,
                f_sum / t as f64,
                f_max,
                messages / t as usize,
                yield_sum / t as f64,
                (n as u64 * t) as f64 / (cpu_ns.max(1) as f64 / 1e3)
            );
        }
    }
}

fn bench_reconcile(c: &mut Criterion) {
    let mut group = c.benchmark_group("reconcile");
    group.sample_size(10);
    for &n in &SIZES {
        for &q in &QBERS {
            let (ka, kb) = simulated_key_pair(n, q, 7);
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(BenchmarkId::new(format!("{q}"), n), &n, |bench, _| {
                let mut id = 0;
                let (mut a, mut b) = peers(1, q);
                bench.iter(|| {
                    id += 1;
                    run_pair(&mut a, &mut b, id, ka.clone(), kb.clone(), |_, _, m| {
                        Some(m)
                    })
                    .unwrap()
                });
            });
        }
    }
    group.finish();
}

fn bench_toeplitz(c: &mut Criterion) {
    let mut rng = SeededRandom::new(3);
    for n in [1_000_000usize, 10_000_000] {
        let m = n / 2;
        let key = random_bits(&mut rng, n);
        let seed = random_bits(&mut rng, n + m - 1);
        let mut group = c.benchmark_group("toeplitz");
        group.sample_size(10);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| toeplitz_hash(&key, &seed, m));
        });
        group.finish();
        let mut group = c.benchmark_group("baseline");
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("read_parity", n), &n, |bench, _| {
            bench.iter(|| key.parity(0, n) ^ seed.parity(0, n + m - 1));
        });
        group.finish();
    }
}

fn main() {
    print_pa_table();
    print_quality_table();
    let mut c = Criterion::default().configure_from_args();
    bench_toeplitz(&mut c);
    bench_reconcile(&mut c);
    c.final_summary();
}
