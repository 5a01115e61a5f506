//! The TDC1 source against an emulated device on a pseudo-terminal: the real serial path.

use std::time::{Duration, Instant};

use qkd_formats::raw;
use qkd_formats::skew::DetectorSkew;
use qkd_formats::tdc1;
use qkd_sources::tdc1_device::{Tdc1Config, Tdc1Device};
use qkd_sources::tdc1_emulator::{EmulatorConfig, Fault, Tdc1Emulator};
use qkd_sources::{EventSource, LinkConfig, LinkSimulator, SourceError};

/// A TDC1 stream of about 0.6 s of simulated detections at the high-count node.
fn simulated_stream() -> Vec<u8> {
    let config = LinkConfig {
        seed: 21,
        pair_rate: 2e4,
        start_ticks: 0,
        ..LinkConfig::default()
    };
    let mut sim = LinkSimulator::new(config).unwrap();
    let (mut high, mut low) = (Vec::new(), Vec::new());
    sim.next_batch_into(5_000_000_000, &mut high, &mut low);
    let times: Vec<u64> = high.iter().map(|&w| raw::time_ticks(w)).collect();
    let patterns: Vec<u8> = high.iter().map(|&w| raw::pattern(w)).collect();
    tdc1::encode(&times, &patterns).unwrap()
}

fn fast_config(path: &str) -> Tdc1Config {
    Tdc1Config {
        stall_timeout: Duration::from_millis(800),
        ..Tdc1Config::new(path)
    }
}

/// Reads until `count` events arrived or the source fails.
fn read_events(device: &mut Tdc1Device, count: usize) -> Result<Vec<u64>, SourceError> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while out.len() < count {
        assert!(
            Instant::now() < deadline,
            "no progress: {} of {count} events",
            out.len()
        );
        device.read_batch(&mut out)?;
    }
    Ok(out)
}

#[test]
fn streams_recorded_events_with_skew() {
    let stream = simulated_stream();
    let skew = [3, -2, 0, 7];
    let expected = tdc1::decode(&stream, 0, DetectorSkew::from_ticks(skew), false).unwrap();
    assert!(expected.len() > 5_000);
    let emulator = Tdc1Emulator::start(EmulatorConfig::new(stream)).unwrap();

    let mut device = Tdc1Device::open(Tdc1Config {
        skew_ticks: skew,
        ..fast_config(emulator.path())
    })
    .unwrap();
    assert!(device.identification().contains("TDC1"));
    let events = read_events(&mut device, expected.len()).unwrap();
    assert_eq!(events[..expected.len()], expected[..]);

    // After the recording the idle device sends only dummies, which are dropped.
    let mut more = Vec::new();
    for _ in 0..5 {
        assert!(device.read_batch(&mut more).unwrap());
    }
    assert!(more.is_empty());
    device.stop().unwrap();
    assert!(!device.read_batch(&mut more).unwrap());

    let commands = emulator.commands();
    assert_eq!(commands[0], "abort");
    for expected in [
        "*IDN?",
        "*RST",
        "NIM",
        "time 0",
        "timestamp",
        "counts?",
        "abort",
        "status?",
    ] {
        assert!(
            commands.iter().any(|c| c == expected),
            "{expected} missing from {commands:?}"
        );
    }
}

#[test]
fn missing_port_names_the_path() {
    let err = Tdc1Device::open(Tdc1Config::new("/dev/serial/by-id/no-such-tdc1")).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("/dev/serial/by-id/no-such-tdc1"), "{text}");
    assert!(text.contains("not found"), "{text}");
}

#[test]
fn other_device_is_rejected() {
    let config = EmulatorConfig {
        identification: "Arduino Uno".into(),
        ..EmulatorConfig::new(Vec::new())
    };
    let emulator = Tdc1Emulator::start(config).unwrap();
    let err = Tdc1Device::open(fast_config(emulator.path())).unwrap_err();
    assert!(err.to_string().contains("not as a TDC1"), "{err}");
}

#[test]
fn garbage_bytes_end_the_source() {
    let config = EmulatorConfig {
        fault: Some(Fault::Garbage { after_bytes: 4000 }),
        ..EmulatorConfig::new(simulated_stream())
    };
    let emulator = Tdc1Emulator::start(config).unwrap();
    let mut device = Tdc1Device::open(fast_config(emulator.path())).unwrap();
    let err = read_events(&mut device, usize::MAX).unwrap_err();
    assert!(matches!(err, SourceError::Device { .. }), "{err:?}");
    assert!(err.to_string().contains("corrupt or misaligned"), "{err}");
}

#[test]
fn silent_device_times_out() {
    let config = EmulatorConfig {
        fault: Some(Fault::Hang { after_bytes: 4000 }),
        ..EmulatorConfig::new(simulated_stream())
    };
    let emulator = Tdc1Emulator::start(config).unwrap();
    let mut device = Tdc1Device::open(fast_config(emulator.path())).unwrap();
    let started = Instant::now();
    let err = read_events(&mut device, usize::MAX).unwrap_err();
    assert!(matches!(err, SourceError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The source asked for a partial packet before giving up.
    assert!(emulator.commands().iter().any(|c| c == "INPKT"));
}

#[test]
fn unplugged_device_ends_the_source() {
    let config = EmulatorConfig {
        fault: Some(Fault::Unplug { after_bytes: 8000 }),
        ..EmulatorConfig::new(simulated_stream())
    };
    let emulator = Tdc1Emulator::start(config).unwrap();
    let mut device = Tdc1Device::open(fast_config(emulator.path())).unwrap();
    let err = read_events(&mut device, usize::MAX).unwrap_err();
    assert!(matches!(err, SourceError::Device { .. }), "{err:?}");
    assert!(err.to_string().contains("unplugged"), "{err}");
}

#[test]
fn fifo_overflow_reported_on_stop() {
    let config = EmulatorConfig {
        overflow: true,
        ..EmulatorConfig::new(simulated_stream())
    };
    let emulator = Tdc1Emulator::start(config).unwrap();
    let mut device = Tdc1Device::open(fast_config(emulator.path())).unwrap();
    read_events(&mut device, 100).unwrap();
    let err = device.stop().unwrap_err();
    assert!(err.to_string().contains("FIFO overflow"), "{err}");
}

#[test]
fn device_left_streaming_is_stopped_and_opens() {
    let stream = simulated_stream();
    let config = EmulatorConfig {
        streaming_at_start: true,
        ..EmulatorConfig::new(stream.clone())
    };
    let emulator = Tdc1Emulator::start(config).unwrap();
    // Let the stale acquisition fill the port before the source opens it.
    std::thread::sleep(Duration::from_millis(50));
    let mut device = Tdc1Device::open(fast_config(emulator.path())).unwrap();
    assert!(device.identification().contains("TDC1"));
    // The new acquisition starts the recording again from its first word.
    let expected = tdc1::decode(&stream, 0, DetectorSkew::NONE, false).unwrap();
    let events = read_events(&mut device, 1000).unwrap();
    assert_eq!(events[..1000], expected[..1000]);
}
