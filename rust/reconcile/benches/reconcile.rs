//! Benchmarks of reconciliation and privacy amplification.
//!
//! `cargo bench -p qkd-reconcile` first prints a privacy-amplification table and a quality
//! table (efficiency f, frame failure rate, messages per block, CPU time of both peers and
//! of each peer) from repeated simulated blocks, then criterion timings:
//! - `reconcile/<qber>/<bits>`: one whole block between two in-process peers on one
//!   thread (Cascade, verification, privacy amplification of both sides; the Toeplitz hash
//!   runs on rayon's pool).
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
use qkd_reconcile::ReconcileError;
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

/// CPU time of the whole process in nanoseconds (`CLOCK_PROCESS_CPUTIME_ID`): this thread
/// plus rayon's workers, so that throughput per core does not depend on what else runs on
/// the machine.
fn process_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn print_pa_table() {
    let mut rng = SeededRandom::new(5);
    let single = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .expect("one-thread pool");
    println!("| key bits | final bits | Toeplitz Mbit/s (wall, rayon pool) | Toeplitz Mbit/s (CPU) | Toeplitz Mbit/s (one thread) | read-parity baseline Mbit/s | CPU ratio |");
    println!("|---|---|---|---|---|---|---|");
    for n in [1_000_000usize, 10_000_000] {
        let m = n / 2;
        let key = random_bits(&mut rng, n);
        let seed = random_bits(&mut rng, n + m - 1);
        let reps = if n > 1_000_000 { 4 } else { 40 };
        let (w0, t0) = (std::time::Instant::now(), process_cpu_ns());
        for _ in 0..reps {
            std::hint::black_box(toeplitz_hash(&key, &seed, m));
        }
        let cpu = (reps * n) as f64 / ((process_cpu_ns() - t0) as f64 / 1e3);
        let wall = (reps * n) as f64 / (w0.elapsed().as_secs_f64() * 1e6);
        let t0 = process_cpu_ns();
        single.install(|| {
            for _ in 0..reps {
                std::hint::black_box(toeplitz_hash(&key, &seed, m));
            }
        });
        let one = (reps * n) as f64 / ((process_cpu_ns() - t0) as f64 / 1e3);
        let t0 = process_cpu_ns();
        let base_reps = 200;
        for _ in 0..base_reps {
            std::hint::black_box(key.parity(0, n) ^ seed.parity(0, n + m - 1));
        }
        let base = (base_reps * n) as f64 / ((process_cpu_ns() - t0).max(1) as f64 / 1e3);
        println!(
            "| {n} | {m} | {wall:.0} | {cpu:.0} | {one:.0} | {base:.0} | {:.4} |",
            cpu / base
        );
    }
}

/// One block between two in-process peers, as [`run_pair`] does it, with the CPU time of
/// each peer's calls measured separately.
struct TimedRun {
    initiator: qkd_reconcile::BlockOutcome,
    responder: qkd_reconcile::BlockOutcome,
    messages: usize,
    initiator_ns: u64,
    responder_ns: u64,
}

fn timed_pair(
    a: &mut Reconciler,
    b: &mut Reconciler,
    id: u64,
    ka: BitVec,
    kb: BitVec,
) -> Result<TimedRun, ReconcileError> {
    let (mut ta, mut tb) = (0u64, 0u64);
    let t = process_cpu_ns();
    let mut out_b = b.start_block(id, kb)?.outcome;
    tb += process_cpu_ns() - t;
    let t = process_cpu_ns();
    let first = a.start_block(id, ka)?;
    ta += process_cpu_ns() - t;
    let mut out_a = None;
    let mut queue: std::collections::VecDeque<(bool, Vec<u8>)> =
        first.messages.into_iter().map(|m| (true, m)).collect();
    let mut messages = 0;
    while let Some((to_b, bytes)) = queue.pop_front() {
        messages += 1;
        let t = process_cpu_ns();
        let step = if to_b {
            b.handle_message(&bytes)
        } else {
            a.handle_message(&bytes)
        };
        let dt = process_cpu_ns() - t;
        if to_b {
            tb += dt;
        } else {
            ta += dt;
        }
        let step = match step {
            Ok(s) => s,
            Err(ReconcileError::FinishedBlock(_)) => continue,
            Err(e) => return Err(e),
        };
        queue.extend(step.messages.into_iter().map(|m| (!to_b, m)));
        if let Some(o) = step.outcome {
            if to_b {
                out_b = Some(o);
            } else {
                out_a = Some(o);
            }
        }
    }
    Ok(TimedRun {
        initiator: out_a.expect("initiator outcome"),
        responder: out_b.expect("responder outcome"),
        messages,
        initiator_ns: ta,
        responder_ns: tb,
    })
}

fn print_quality_table() {
    let trials: u64 = std::env::var("QKD_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    if trials == 0 {
        return;
    }
    println!("| QBER | block bits | f (mean) | f (max) | frame failures | blocks without key | messages per block | final/raw | Mbit/s (CPU, both peers) | Mbit/s (CPU, initiator) | Mbit/s (CPU, responder) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &n in &SIZES {
        for &q in &QBERS {
            let t = if n >= 1_000_000 {
                (trials / 5).max(2)
            } else {
                trials
            };
            let (mut f_sum, mut f_max, mut failures, mut messages, mut yield_sum) =
                (0.0, 0.0f64, 0, 0, 0.0);
            let (mut ns_a, mut ns_b) = (0u64, 0u64);
            let mut no_key = 0;
            for s in 0..t {
                let (ka, kb) = simulated_key_pair(n, q, 1000 + s);
                let (mut a, mut b) = peers(s, q);
                let run = timed_pair(&mut a, &mut b, s, ka, kb).unwrap();
                ns_a += run.initiator_ns;
                ns_b += run.responder_ns;
                let st = &run.responder.stats;
                let f = st.leak_ec as f64 / (st.key_bits as f64 * binary_entropy(st.qber()));
                f_sum += f;
                f_max = f_max.max(f);
                messages += run.messages;
                assert_eq!(
                    matches!(run.initiator.result, BlockResult::Verified { .. }),
                    matches!(run.responder.result, BlockResult::Verified { .. }),
                    "both peers end a block alike"
                );
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
            let bits = (n as u64 * t) as f64;
            let rate = |ns: u64| bits / (ns.max(1) as f64 / 1e3);
            println!(
                "| {:.2} | {n} | {:.3} | {:.3} | {failures}/{t} | {no_key}/{t} | {} | {:.3} | {:.1} | {:.1} | {:.1} |",
                q,
                f_sum / t as f64,
                f_max,
                messages / t as usize,
                yield_sum / t as f64,
                rate(ns_a + ns_b),
                rate(ns_a),
                rate(ns_b),
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
