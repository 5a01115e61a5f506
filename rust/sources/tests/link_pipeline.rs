//! Simulated link streams through the real chopping, costream and splicer stages: the
//! sifted raw keys of the two nodes differ at the configured QBER.

use std::path::Path;

use qkd_chopping::{Chopper, Chopper2, Chopper2Config, ChopperConfig, Destination};
use qkd_coincidences::{splice, Costream, CostreamConfig, Need, SplicerProtocol};
use qkd_formats::type3::Type3File;
use qkd_sources::{LinkConfig, LinkSimulator, NodeConfig};

/// Epoch numbers of the files in a folder, sorted.
fn epochs_in(dir: &Path) -> Vec<u32> {
    let mut epochs: Vec<u32> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| u32::from_str_radix(&e.unwrap().file_name().to_string_lossy(), 16).ok())
        .collect();
    epochs.sort_unstable();
    epochs
}

/// Runs the whole sifting pipeline and returns (sifted bits, bits that differ).
fn sifted_errors(config: LinkConfig, seconds: u64) -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let [t1, t2, t3] = ["t1", "t2", "t3"].map(|d| dir.path().join(d));
    for d in [&t1, &t2, &t3] {
        std::fs::create_dir(d).unwrap();
    }
    let offset = config.offset_ticks;

    let mut chopper2 = Chopper2::new(
        Chopper2Config::default(),
        Destination::directory(&t1).unwrap(),
    )
    .unwrap();
    let mut chopper = Chopper::new(
        ChopperConfig::default(),
        Destination::directory(&t2).unwrap(),
        Destination::directory(&t3).unwrap(),
    )
    .unwrap();
    let mut sim = LinkSimulator::new(config).unwrap();
    let (mut high, mut low) = (Vec::new(), Vec::new());
    for _ in 0..seconds * 10 {
        high.clear();
        low.clear();
        sim.next_batch_into(800_000_000, &mut high, &mut low);
        chopper2.feed(&high).unwrap();
        chopper.feed(&low).unwrap();
    }
    chopper2.flush().unwrap();
    chopper.flush().unwrap();

    let common: Vec<u32> = epochs_in(&t1)
        .into_iter()
        .filter(|e| epochs_in(&t2).contains(e))
        .collect();
    assert!(common.len() >= 4, "common epochs {common:x?}");
    let mut costream = Costream::new(CostreamConfig {
        start_epoch: common[1],
        epoch_count: common.len() as u32 - 2,
        time_offset: offset,
        protocol: 1,
        ..CostreamConfig::default()
    })
    .unwrap();
    let splicer_protocol = SplicerProtocol::new(1).unwrap();

    let (mut bits, mut errors) = (0, 0);
    let mut closed = Vec::new();
    loop {
        match costream.advance(&mut closed).unwrap() {
            Need::Type1(e) => costream
                .push_type1(&std::fs::read(t1.join(format!("{e:08x}"))).unwrap())
                .unwrap(),
            Need::Type2(e) => costream
                .push_type2(&std::fs::read(t2.join(format!("{e:08x}"))).unwrap())
                .unwrap(),
            Need::Done => break,
        }
    }
    assert!(!closed.is_empty());
    for epoch in &closed {
        let (Some(key_high), Some(type4)) = (&epoch.type3, &epoch.type4) else {
            continue;
        };
        let local = std::fs::read(t3.join(format!("{:08x}", epoch.epoch))).unwrap();
        let spliced = splice(epoch.epoch, &local, type4, &splicer_protocol, false).unwrap();
        let high_bits = Type3File::parse(key_high).unwrap().values;
        let low_bits = Type3File::parse(&spliced.type3).unwrap().values;
        assert_eq!(high_bits.len(), low_bits.len(), "epoch {:08x}", epoch.epoch);
        bits += high_bits.len();
        errors += high_bits
            .iter()
            .zip(&low_bits)
            .filter(|(a, b)| a != b)
            .count();
    }
    (bits, errors)
}

fn link(qber: f64) -> LinkConfig {
    LinkConfig {
        seed: 99,
        pair_rate: 1e5,
        qber,
        offset_ticks: 34_568,
        high: NodeConfig {
            jitter_ps: 100.0,
            dark_count_rate: [200.0; 4],
            ..NodeConfig::default()
        },
        low: NodeConfig {
            transmission: 0.5,
            jitter_ps: 100.0,
            dark_count_rate: [200.0; 4],
            ..NodeConfig::default()
        },
        ..LinkConfig::default()
    }
}

#[test]
fn pipeline_reproduces_configured_qber() {
    for qber in [0.0, 0.03, 0.08] {
        let (bits, errors) = sifted_errors(link(qber), 3);
        assert!(bits > 30_000, "only {bits} sifted bits");
        let measured = errors as f64 / bits as f64;
        eprintln!("QBER {qber}: measured {measured} over {bits} bits");
        let sigma = (qber.max(1e-3) * (1.0 - qber) / bits as f64).sqrt();
        // Dark counts add a few accidental coincidences on top of the configured QBER.
        assert!(
            (measured - qber).abs() < 5.0 * sigma + 2e-3,
            "QBER {qber}: measured {measured} over {bits} bits"
        );
    }
}
