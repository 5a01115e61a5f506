//! Throughput of the link simulator, in events of both nodes per second, against the
//! time needed merely to decode the same number of raw events from a legacy byte buffer.
//!
//! Both are measured in CPU time of the benchmark thread, so that other processes on a
//! shared machine do not inflate the result; the speed target is per core.

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qkd_formats::raw::{self, Serialisation};
use qkd_sources::{LinkConfig, LinkSimulator, NodeConfig};

/// Simulated time per iteration: 0.25 s in ticks of 1/8 ns.
const RUN_TICKS: u64 = 2_000_000_000;
/// Batch length: 10 ms.
const BATCH_TICKS: u64 = 80_000_000;

fn config() -> LinkConfig {
    LinkConfig {
        seed: 1,
        pair_rate: 4e6,
        qber: 0.03,
        offset_ticks: 34_568,
        drift: 1e-9,
        high: NodeConfig {
            jitter_ps: 100.0,
            dead_time_ps: 20_000.0,
            dark_count_rate: [1e3; 4],
            ..NodeConfig::default()
        },
        low: NodeConfig {
            transmission: 0.2,
            jitter_ps: 150.0,
            dead_time_ps: 20_000.0,
            dark_count_rate: [1e3; 4],
            ..NodeConfig::default()
        },
        ..LinkConfig::default()
    }
}

fn simulate(high: &mut Vec<u64>, low: &mut Vec<u64>) -> usize {
    let mut sim = LinkSimulator::new(config()).expect("valid configuration");
    let mut total = 0;
    for _ in 0..RUN_TICKS / BATCH_TICKS {
        high.clear();
        low.clear();
        sim.next_batch_into(BATCH_TICKS, high, low);
        total += high.len() + low.len();
    }
    total
}

/// CPU time consumed by the calling thread, in nanoseconds.
struct ThreadCpuTime;

fn thread_cpu_nanos() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec and the clock id is a constant the
    // kernel supports on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

static WALL_TIME: WallTime = WallTime;

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        thread_cpu_nanos()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_nanos() - start
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, as wall time's are, so its formatter fits.
        WALL_TIME.formatter()
    }
}

fn bench(c: &mut Criterion<ThreadCpuTime>) {
    let (mut high, mut low) = (Vec::new(), Vec::new());
    let events = simulate(&mut high, &mut low) as u64;

    let mut group = c.benchmark_group("simulator");
    group.sample_size(10);
    group.throughput(Throughput::Elements(events));
    group.bench_function("link_4e6_pairs_per_s", |b| {
        b.iter(|| simulate(&mut high, &mut low))
    });

    let mut bytes = Vec::new();
    let words: Vec<u64> = (0..events).map(|k| raw::make_word(k * 1000, 1)).collect();
    raw::encode_into(&words, Serialisation::Legacy, &mut bytes);
    let mut decoded = Vec::with_capacity(words.len());
    group.bench_function("baseline_decode_same_count", |b| {
        b.iter(|| {
            decoded.clear();
            raw::decode_into(&bytes, Serialisation::Legacy, &mut decoded).expect("whole records");
            decoded.iter().fold(0u64, |a, &w| a.wrapping_add(w))
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = bench
}
criterion_main!(benches);
