//! The high-count side chopper: type-1 files holding each epoch's raw events verbatim.

use log::{info, warn};
use qkd_formats::type1::{Type1Header, HEADER_BYTES};

use crate::common::{
    extended_epoch, suspicious_change, ChopError, ChopStats, Clock, EpochSummary, Order,
    OrderFilter, SystemClock, MAX_SUSPICIOUS_EVENTS, TICKS_PER_MICROSECOND,
};
use crate::output::{Destination, Sink, CHUNK_BYTES};

/// Options of [`Chopper2`], named after the reference's command-line options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Chopper2Config {
    /// Maximum allowed gap between consecutive events in microseconds (`-m`); 0 disables the check.
    pub max_gap_us: u64,
    /// Extended epochs from the wall clock (`-U`) instead of local 17-bit epochs (`-L`).
    pub extended: bool,
    /// Four-detector sums in the verbosity-3 log line (`-4`) instead of seven columns.
    pub four_detectors: bool,
    /// Log verbosity (`-V`): which line [`EpochSummary::log_line`] carries.
    pub verbosity: i32,
    /// Record the reference's per-event diagnostics (dropped events, epoch jumps) for
    /// [`Chopper2::take_messages`]; the command-line tool prints them on stderr.
    pub reference_messages: bool,
}

/// Stage object of the high-count side: feed raw event words, get finished epochs.
pub struct Chopper2 {
    config: Chopper2Config,
    out: Sink,
    clock: Box<dyn Clock>,
    order: OrderFilter,
    current: u32,
    suspicious: u32,
    header_epoch: u32,
    /// Legacy-serialised events of the open epoch not yet passed to the sink, at most
    /// [`CHUNK_BYTES`]. The header space is in the sink's file.
    buffer: Vec<u8>,
    events: u32,
    /// Epochs finished and passed to the sink, reported once their files are written.
    unsettled: Vec<EpochSummary>,
    /// Set by [`Chopper2::flush`]: later events of the same epoch are dropped.
    flushed: bool,
    histogram: [u32; 16],
    stats: ChopStats,
    /// Drop counts at the last written epoch, to report drops per epoch.
    stats_at_last_epoch: ChopStats,
    messages: Vec<String>,
    failed: bool,
}

impl Chopper2 {
    /// Creates a chopper writing type-1 files to `out`.
    pub fn new(config: Chopper2Config, out: Destination) -> Result<Self, ChopError> {
        let mut out = Sink::new(out);
        let buffer = out.take_buffer();
        let mut chopper = Chopper2 {
            config,
            out,
            clock: Box::new(SystemClock),
            order: OrderFilter {
                last: 0,
                max_gap: config.max_gap_us.saturating_mul(TICKS_PER_MICROSECOND),
            },
            current: 0,
            suspicious: 0,
            header_epoch: 0,
            buffer,
            events: 0,
            unsettled: Vec::new(),
            flushed: false,
            histogram: [0; 16],
            stats: ChopStats::default(),
            stats_at_last_epoch: ChopStats::default(),
            messages: Vec::new(),
            failed: false,
        };
        chopper.header_epoch = chopper.header_for(0);
        Ok(chopper)
    }

    /// Replaces the wall clock used for extended epochs. Before the first event it also
    /// recomputes the epoch that the reference prepares at start-up (epoch 0).
    pub fn set_clock(&mut self, clock: Box<dyn Clock>) {
        self.clock = clock;
        if self.stats.events_in == 0 {
            self.header_epoch = self.header_for(0);
        }
    }

    fn header_for(&mut self, epoch17: u32) -> u32 {
        if self.config.extended {
            extended_epoch(epoch17, self.clock.unix_seconds())
        } else {
            epoch17
        }
    }

    /// Event counts since creation.
    pub fn stats(&self) -> ChopStats {
        self.stats
    }

    /// Number of accepted events in the epoch in progress.
    pub fn pending_events(&self) -> u32 {
        self.events
    }

    /// Returns and clears the reference diagnostics recorded so far (each with its own
    /// line ending, some without one, exactly as the reference prints them).
    pub fn take_messages(&mut self) -> Vec<String> {
        std::mem::take(&mut self.messages)
    }

    /// Processes event words; returns the epochs finished and written during this call.
    ///
    /// After an error the chopper stops: epochs finished before the failing event are on
    /// disk, and every later call returns [`ChopError::Stopped`].
    pub fn feed(&mut self, words: &[u64]) -> Result<Vec<EpochSummary>, ChopError> {
        let mut finished = Vec::new();
        let mut bytes = Vec::with_capacity(8 * RUN_EVENTS.min(words.len()));
        for block in words.chunks(RUN_EVENTS) {
            bytes.clear();
            for &word in block {
                bytes.extend_from_slice(&legacy_bytes(word));
            }
            finished.extend(self.feed_legacy_bytes(&bytes)?);
        }
        if words.is_empty() && self.failed {
            return Err(ChopError::Stopped);
        }
        Ok(finished)
    }

    /// Like [`Chopper2::feed`] for events in the legacy byte serialisation (high word
    /// first); `bytes` must hold whole 8-byte records, which are copied verbatim.
    pub fn feed_legacy_bytes(&mut self, bytes: &[u8]) -> Result<Vec<EpochSummary>, ChopError> {
        if bytes.len() % 8 != 0 {
            return Err(qkd_formats::FormatError::Truncated {
                what: "raw event stream",
                record_bytes: 8,
                len: bytes.len(),
            }
            .into());
        }
        if self.failed {
            return Err(ChopError::Stopped);
        }
        let mut i = 0;
        while i < bytes.len() {
            if self.buffer.len() >= CHUNK_BYTES {
                self.pass_chunk();
            }
            let room = (CHUNK_BYTES - self.buffer.len()) / 8;
            let end = bytes.len().min(i + 8 * room.max(1));
            i += 8 * self.accept_run(&bytes[i..end]);
            if let Some(c) = bytes.get(i..i + 8) {
                let record: [u8; 8] = c.try_into().expect("8-byte record");
                if let Err(e) = self.process(legacy_word(record), record) {
                    // The epochs finished before the failing event go to disk first.
                    let _ = self.settle();
                    self.failed = true;
                    return Err(e);
                }
                i += 8;
            }
        }
        self.settle()
    }

    /// Passes the buffered events to the sink, which writes them while we go on.
    fn pass_chunk(&mut self) {
        let next = self.out.take_buffer();
        let chunk = std::mem::replace(&mut self.buffer, next);
        self.out.append(chunk);
    }

    /// Waits until the files of the finished epochs are written and returns their
    /// summaries; a failed write stops the chopper.
    fn settle(&mut self) -> Result<Vec<EpochSummary>, ChopError> {
        if self.unsettled.is_empty() {
            return Ok(Vec::new());
        }
        let summaries = std::mem::take(&mut self.unsettled);
        for (result, summary) in self.out.settle().into_iter().zip(&summaries) {
            if let Err(e) = result {
                self.failed = true;
                return Err(e.into());
            }
            self.stats.epochs_written += 1;
            info!(
                "epoch {:08x}: {} events written",
                summary.epoch, summary.events
            );
        }
        Ok(summaries)
    }

    /// Copies the leading records that need none of the rules' special cases (same epoch
    /// as the open one, later than the previous event by at most the maximum gap) in one
    /// go. Returns how many it took; the caller handles the next record on its own.
    fn accept_run(&mut self, bytes: &[u8]) -> usize {
        if self.flushed {
            return 0;
        }
        let current = u64::from(self.current);
        let max_gap = self.order.max_gap;
        let mut last = self.order.last;
        let mut counts = [0u32; 16];
        let mut n = 0;
        for c in bytes.chunks_exact(8) {
            let word = legacy_word(c.try_into().expect("8-byte record"));
            let time = word >> 15;
            if (word >> 47) != current || time < last || (max_gap > 0 && time - last > max_gap) {
                break;
            }
            counts[(word & 0xF) as usize] += 1;
            last = time;
            n += 1;
        }
        if n == 0 {
            return 0;
        }
        self.begin_file();
        self.buffer.extend_from_slice(&bytes[..8 * n]);
        for (bin, count) in self.histogram.iter_mut().zip(counts) {
            *bin += count;
        }
        self.order.last = last;
        self.events += n as u32;
        self.stats.events_in += n as u64;
        self.stats.accepted += n as u64;
        n
    }

    #[inline]
    fn process(&mut self, word: u64, record: [u8; 8]) -> Result<(), ChopError> {
        self.stats.events_in += 1;
        let time = word >> 15;
        let epoch = (word >> 47) as u32;
        let last = self.order.last;

        match self.order.check(time) {
            Order::Accept => {}
            Order::Backward => {
                self.stats.dropped_backward += 1;
                if self.config.reference_messages {
                    self.messages.push(format!(
                        "got negative difference: new: {time:x} old: {last:x}\n"
                    ));
                }
                return Ok(());
            }
            Order::Gap => {
                self.stats.dropped_gap += 1;
                if self.config.reference_messages {
                    self.messages.push(format!(
                        "got pos difference: new: {time:016x} old: {last:016x}\n"
                    ));
                }
                return Ok(());
            }
        }

        if epoch != self.current {
            // While the current epoch value is 0 (start-up, or after the 49-bit time
            // wrapped) every change is accepted, as in the reference.
            if self.current != 0 {
                if let Some(kind) = suspicious_change(self.current, epoch) {
                    return self.suspicious_event(epoch, kind);
                }
            }
            self.suspicious = 0;
            self.close_epoch();
            self.current = epoch;
            self.header_epoch = self.header_for(epoch);
            self.histogram = [0; 16];
            self.flushed = false;
        }
        if self.flushed {
            self.stats.dropped_after_flush += 1;
            return Ok(());
        }

        self.begin_file();
        self.buffer.extend_from_slice(&record);
        self.histogram[(word & 0xF) as usize] += 1;
        self.events += 1;
        self.stats.accepted += 1;
        Ok(())
    }

    fn suspicious_event(&mut self, epoch: u32, kind: &'static str) -> Result<(), ChopError> {
        self.suspicious += 1;
        self.stats.dropped_epoch_jump += 1;
        let (short, tag) = if kind == "backward" {
            ("neg", "negdt")
        } else {
            ("pos", "posdt")
        };
        if self.config.reference_messages {
            self.messages.push(format!(
                "got {short} tepoc: old: {:08x} new: {epoch:08x}",
                self.current
            ));
        }
        if self.suspicious > MAX_SUSPICIOUS_EVENTS {
            if self.config.reference_messages {
                self.messages.push(format!(
                    "({tag}): tepoch: {epoch:08x}, old: {:08x}\n",
                    self.current
                ));
            }
            return Err(ChopError::EpochJump {
                old: self.current,
                new: epoch,
                kind,
            });
        }
        Ok(())
    }

    /// Writes the epoch in progress now (the reference never does; it waits for the first
    /// event of the next epoch). Returns its summary, or `None` when it has no events.
    pub fn flush(&mut self) -> Result<Option<EpochSummary>, ChopError> {
        if self.failed {
            return Err(ChopError::Stopped);
        }
        self.close_epoch();
        self.flushed = true;
        Ok(self.settle()?.pop())
    }

    /// Starts the open epoch's file in the sink with its first event.
    #[inline]
    fn begin_file(&mut self) {
        if self.events == 0 {
            self.out.begin(self.header_epoch, HEADER_BYTES);
        }
    }

    /// Passes the open epoch's last events, header and terminator to the sink; its
    /// summary waits in `unsettled` until the file is written.
    fn close_epoch(&mut self) {
        let events = self.events;
        if events == 0 {
            return;
        }
        let header = Type1Header {
            extended: self.config.extended,
            epoch: self.header_epoch,
            length: events,
        };
        self.pass_chunk();
        self.out.finish(&header.to_bytes(), &[0u8; 8]);
        self.events = 0;

        self.unsettled.push(EpochSummary {
            epoch: self.header_epoch,
            events,
            time_order: None,
            patterns: self.histogram,
            log_line: self.log_line(events),
        });
        let backward = self.stats.dropped_backward - self.stats_at_last_epoch.dropped_backward;
        let gap = self.stats.dropped_gap - self.stats_at_last_epoch.dropped_gap;
        let jump = self.stats.dropped_epoch_jump - self.stats_at_last_epoch.dropped_epoch_jump;
        if backward + gap + jump > 0 {
            warn!(
                "epoch {:08x}: dropped {backward} events earlier than a previous one, {gap} after a gap above {} us, {jump} in a skipped epoch",
                self.header_epoch, self.config.max_gap_us
            );
        }
        self.stats_at_last_epoch = self.stats;
    }

    fn log_line(&self, events: u32) -> Option<String> {
        let e = self.header_epoch;
        let h = &self.histogram;
        match self.config.verbosity {
            v if v < 0 => None,
            0 => Some(format!("{e:08x}\n")),
            1 => Some(format!("{e:08x}\t{events}\n")),
            2 => Some(format!("epoch: {e:08x} \t entries: {events}\n")),
            3 if self.config.four_detectors => {
                let mut sums = [0u32; 5];
                for (pattern, &count) in h.iter().enumerate().skip(1) {
                    sums[0] += count;
                    for (bit, sum) in sums[1..].iter_mut().enumerate() {
                        if pattern & (1 << bit) != 0 {
                            *sum += count;
                        }
                    }
                }
                Some(format!(
                    "{e:08x}\t{}\t{}\t{}\t{}\t{}\n",
                    sums[0], sums[1], sums[2], sums[3], sums[4]
                ))
            }
            3 => Some(format!(
                "{e:08x}\t{events}\t{}\t{}\t{}\t{}\t{}\t{}\n",
                h[1], h[2], h[4], h[8], h[3], h[6]
            )),
            v => Some(format!("Undefined verbosity level {v}\n")),
        }
    }
}

/// Events converted per step when fed as words.
const RUN_EVENTS: usize = 1 << 16;

#[inline]
fn legacy_word(record: [u8; 8]) -> u64 {
    let high = u32::from_le_bytes([record[0], record[1], record[2], record[3]]);
    let low = u32::from_le_bytes([record[4], record[5], record[6], record[7]]);
    (u64::from(high) << 32) | u64::from(low)
}

#[inline]
fn legacy_bytes(word: u64) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&((word >> 32) as u32).to_le_bytes());
    out[4..].copy_from_slice(&(word as u32).to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::{file_listing, messy_events};
    use std::fs;

    fn event(high: u32, low: u32) -> u64 {
        (u64::from(high) << 32) | u64::from(low)
    }

    fn example() -> Vec<u64> {
        vec![
            event(0x0021_0000, 0x0800_0301),
            event(0x0021_0000, 0x0800_8304),
            event(0x0021_0000, 0x0800_8302),
            event(0x0021_0001, 0x8000_0308),
            event(0x0021_0001, 0x8008_0322),
            event(0x0021_8000, 0x0002_8301),
        ]
    }

    fn words(bytes: &[u8]) -> Vec<u32> {
        bytes
            .chunks(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn chopper2(config: Chopper2Config, dir: &std::path::Path) -> Chopper2 {
        Chopper2::new(config, Destination::directory(dir).unwrap()).unwrap()
    }

    /// Runs `config` on `input` twice: through `feed`, which copies ordinary events in
    /// blocks, and through `process` alone. Both must write the same files and return
    /// the same summaries and counts; returns those of the first run.
    fn check_fast_path_equals_process(
        config: Chopper2Config,
        input: &[u64],
    ) -> (Vec<EpochSummary>, ChopStats) {
        let mut outcomes = Vec::new();
        for fast in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut c = chopper2(config, dir.path());
            let mut summaries = Vec::new();
            if fast {
                summaries.extend(c.feed(input).unwrap());
            } else {
                for &word in input {
                    c.process(word, legacy_bytes(word)).unwrap();
                    summaries.extend(c.settle().unwrap());
                }
            }
            summaries.extend(c.flush().unwrap());
            let stats = c.stats();
            drop(c);
            outcomes.push((summaries, stats, file_listing(dir.path())));
        }
        assert!(outcomes[0].0 == outcomes[1].0, "summaries differ");
        assert_eq!(outcomes[0].1, outcomes[1].1);
        assert!(outcomes[0].2 == outcomes[1].2, "type-1 files differ");
        let (summaries, stats, _) = outcomes.swap_remove(0);
        assert!(stats.dropped_backward > 0);
        (summaries, stats)
    }

    #[test]
    fn fast_path_equals_process() {
        let config = Chopper2Config {
            verbosity: 4,
            ..Default::default()
        };
        let (summaries, _) = check_fast_path_equals_process(config, &messy_events(1, 100_000, 0));
        assert!(summaries.len() > 50, "only {} epochs", summaries.len());
    }

    #[test]
    fn fast_path_equals_process_with_max_gap() {
        let config = Chopper2Config {
            max_gap_us: 25,
            verbosity: 4,
            ..Default::default()
        };
        let input = messy_events(2, 200_000, 25 * TICKS_PER_MICROSECOND);
        let (summaries, stats) = check_fast_path_equals_process(config, &input);
        assert!(summaries.len() > 3, "only {} epochs", summaries.len());
        assert!(stats.dropped_gap > 0);
    }

    #[test]
    fn worked_example() {
        let dir = tempfile::tempdir().unwrap();
        let config = Chopper2Config {
            verbosity: 3,
            four_detectors: true,
            ..Default::default()
        };
        let s = chopper2(config, dir.path()).feed(&example()).unwrap();
        assert_eq!(s[0].log_line.as_deref(), Some("00000042\t5\t1\t2\t1\t1\n"));
        let bytes = fs::read(dir.path().join("00000042")).unwrap();
        let mut expected = vec![1, 0x42, 5, 49, 4];
        for w in &example()[..5] {
            expected.push((w >> 32) as u32);
            expected.push(*w as u32);
        }
        expected.extend([0, 0]);
        assert_eq!(words(&bytes), expected);
    }

    #[test]
    fn log_line_templates() {
        let cases = [
            (0, "00000042\n"),
            (1, "00000042\t5\n"),
            (2, "epoch: 00000042 \t entries: 5\n"),
            (3, "00000042\t5\t1\t2\t1\t1\t0\t0\n"),
            (4, "Undefined verbosity level 4\n"),
        ];
        for (verbosity, line) in cases {
            let dir = tempfile::tempdir().unwrap();
            let config = Chopper2Config {
                verbosity,
                ..Default::default()
            };
            let s = chopper2(config, dir.path()).feed(&example()).unwrap();
            assert_eq!(s[0].log_line.as_deref(), Some(line));
        }
    }

    #[test]
    fn backward_events_are_reported_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let config = Chopper2Config {
            reference_messages: true,
            ..Default::default()
        };
        let mut c = chopper2(config, dir.path());
        let mk = |t: u64| t << 15;
        c.feed(&[mk(0x1_0000_0100), mk(0x1_0000_0050), mk(0x1_0000_0100)])
            .unwrap();
        assert_eq!(
            c.take_messages(),
            vec!["got negative difference: new: 100000050 old: 100000100\n"]
        );
        assert_eq!(c.pending_events(), 2);
    }

    #[test]
    fn epoch_zero_accepts_any_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = chopper2(Chopper2Config::default(), dir.path());
        let mk = |e: u64, off: u64| ((e << 32) | off) << 15;
        // Events of epoch 0 belong to the initial epoch; the jump to 9 is accepted.
        let s = c.feed(&[mk(0, 5), mk(0, 6), mk(9, 1), mk(10, 1)]).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].epoch, s[0].events), (0, 2));
        assert_eq!((s[1].epoch, s[1].events), (9, 1));
    }

    #[test]
    fn sixth_epoch_jump_is_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let config = Chopper2Config {
            reference_messages: true,
            ..Default::default()
        };
        let mut c = chopper2(config, dir.path());
        let mk = |e: u64, off: u64| ((e << 32) | off) << 15;
        let mut input = vec![mk(10, 5)];
        input.extend((1..=6).map(|i| mk(12, i)));
        let err = c.feed(&input).unwrap_err();
        assert!(matches!(
            err,
            ChopError::EpochJump {
                old: 10,
                new: 12,
                ..
            }
        ));
        let messages = c.take_messages();
        assert_eq!(messages.len(), 7);
        assert_eq!(messages[0], "got pos tepoc: old: 0000000a new: 0000000c");
        assert_eq!(messages[6], "(posdt): tepoch: 0000000c, old: 0000000a\n");
    }

    #[test]
    fn extended_epoch_at_start_uses_clock() {
        let dir = tempfile::tempdir().unwrap();
        let config = Chopper2Config {
            extended: true,
            ..Default::default()
        };
        let now = 1_767_225_600u64;
        let host = ((now * 1_953_125) >> 20) as u32;
        let mut c = chopper2(config, dir.path());
        c.set_clock(Box::new(now));
        let e = u64::from(host & 0x1_FFFF);
        let s = c
            .feed(&[((e << 32) | 5) << 15, (((e + 1) << 32) | 5) << 15])
            .unwrap();
        assert_eq!(s[0].epoch, host);
        let bytes = fs::read(dir.path().join(format!("{host:08x}"))).unwrap();
        assert_eq!(words(&bytes[..8]), vec![0x101, host]);
    }

    #[test]
    fn flush_then_more_events_of_same_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = chopper2(Chopper2Config::default(), dir.path());
        let mk = |off: u64| ((3u64 << 32) | off) << 15;
        c.feed(&[mk(1), mk(2)]).unwrap();
        assert_eq!(c.flush().unwrap().unwrap().events, 2);
        assert!(c.flush().unwrap().is_none());
        // The epoch's file is final: a late event of it is dropped, not written again.
        assert!(c
            .feed(&[mk(3), (4u64 << 32) << 15 | 1 << 15])
            .unwrap()
            .is_empty());
        assert_eq!(c.stats().dropped_after_flush, 1);
        let file = qkd_formats::type1::read(&dir.path().join("00000003")).unwrap();
        assert_eq!(file.events, vec![mk(1), mk(2)]);
    }
}
