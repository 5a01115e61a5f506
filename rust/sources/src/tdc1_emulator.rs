//! An emulated TDC1 on a pseudo-terminal, for tests and demonstrations without hardware.
//!
//! The emulator opens a pseudo-terminal pair and serves the TDC1 command set on its master
//! side from a background thread; [`Tdc1Emulator::path`] is the slave device path, which
//! [`crate::tdc1_device::Tdc1Device`] opens like a real `/dev/ttyACM0`. In timestamp mode,
//! `counts?` starts streaming the given TDC1 byte stream (a recording, or simulated events
//! encoded with `qkd_formats::tdc1::encode`) in chunks; after its end the emulator sends a
//! dummy word every 100 ms, as an idle device does. Faults can be injected: garbage bytes,
//! a hang (silence, commands ignored) or an unplug (the pseudo-terminal closes).
//!
//! Supported commands (case-insensitive, joined by `;`, lines ending in `\r\n` or `\n`):
//! `*IDN?`, `*RST`, `help`, `singles`, `pairs`, `timestamp`, `mode?`, `time N`, `time?`,
//! `NIM`, `TTL`, `counts?`, `INPKT`, `abort`, `status?`. Others are recorded and ignored.

use std::io::{ErrorKind, Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serialport::{SerialPort, TTYPort};

use qkd_formats::tdc1::PERIOD_UNITS;

use crate::SourceError;

/// Interval of the dummy words an idle device sends.
const IDLE_DUMMY_INTERVAL: Duration = Duration::from_millis(100);

/// A fault to inject once `after_bytes` bytes of the stream have been sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Insert two garbage bytes, which misaligns every later word.
    Garbage { after_bytes: usize },
    /// Stop sending and ignore every later command.
    Hang { after_bytes: usize },
    /// Close the pseudo-terminal, as when the USB cable is pulled.
    Unplug { after_bytes: usize },
}

/// Configuration of the emulated device: its stream, pacing, faults and replies.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// TDC1 byte stream sent after `counts?` in timestamp mode.
    pub stream: Vec<u8>,
    /// Bytes per write to the pseudo-terminal.
    pub bytes_per_write: usize,
    /// Pause after each write.
    pub write_interval: Duration,
    /// Injected fault, if any.
    pub fault: Option<Fault>,
    /// Report a FIFO overflow (status flag 0x10) on `status?`.
    pub overflow: bool,
    /// Reply to `*IDN?`.
    pub identification: String,
    /// Stream from the start, as a device that an earlier run left acquiring.
    pub streaming_at_start: bool,
}

impl EmulatorConfig {
    /// Configures a well-behaved device streaming `stream` in 4 KiB writes every millisecond.
    pub fn new(stream: Vec<u8>) -> Self {
        EmulatorConfig {
            stream,
            bytes_per_write: 4096,
            write_interval: Duration::from_millis(1),
            fault: None,
            overflow: false,
            identification: "S-Fifteen Instruments TDC1 emulator".into(),
            streaming_at_start: false,
        }
    }
}

/// A running emulator; stops when dropped.
#[derive(Debug)]
pub struct Tdc1Emulator {
    path: String,
    stop: Arc<AtomicBool>,
    commands: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Tdc1Emulator {
    /// Opens a pseudo-terminal pair and starts serving commands on it.
    pub fn start(config: EmulatorConfig) -> Result<Self, SourceError> {
        let (master, slave) = TTYPort::pair().map_err(|e| SourceError::Device {
            path: "pseudo-terminal".into(),
            detail: format!("cannot open a pseudo-terminal pair for the emulator: {e}"),
        })?;
        let path = slave.name().ok_or_else(|| SourceError::Device {
            path: "pseudo-terminal".into(),
            detail: "the pseudo-terminal has no slave path".into(),
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let commands = Arc::new(Mutex::new(Vec::new()));
        let streaming = config.streaming_at_start;
        let worker = Worker {
            config,
            master: Some(master),
            slave: Some(slave),
            stop: Arc::clone(&stop),
            commands: Arc::clone(&commands),
            input: Vec::new(),
            mode: 3,
            gate_ms: 1000,
            streaming,
            sent: 0,
            fault_done: false,
            hung: false,
            idle_units: None,
            last_idle: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("tdc1-emulator".into())
            .spawn(move || worker.run())
            .map_err(|e| SourceError::Device {
                path: path.clone(),
                detail: format!("cannot start the emulator thread: {e}"),
            })?;
        Ok(Tdc1Emulator {
            path,
            stop,
            commands,
            thread: Some(thread),
        })
    }

    /// Device path of the emulated TDC1 (a `/dev/pts/N`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Returns every command received so far, in order, as sent (without line ends).
    pub fn commands(&self) -> Vec<String> {
        self.commands.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Stops the emulator thread and closes the pseudo-terminal.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Tdc1Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Worker {
    config: EmulatorConfig,
    master: Option<TTYPort>,
    /// Kept open so that the master side reads no hang-up before a client opens the path.
    slave: Option<TTYPort>,
    stop: Arc<AtomicBool>,
    commands: Arc<Mutex<Vec<String>>>,
    input: Vec<u8>,
    mode: u8,
    gate_ms: u32,
    streaming: bool,
    sent: usize,
    fault_done: bool,
    hung: bool,
    /// Counter time of the last idle dummy, in 2 ns units.
    idle_units: Option<u64>,
    last_idle: Instant,
}

impl Worker {
    fn run(mut self) {
        if let Some(m) = self.master.as_mut() {
            let _ = m.set_timeout(Duration::from_millis(5));
        }
        while !self.stop.load(Ordering::Relaxed) && self.master.is_some() {
            self.read_commands();
            if !self.hung && self.streaming {
                self.stream_step();
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        drop(self.slave.take());
    }

    fn write(&mut self, bytes: &[u8]) -> usize {
        let Some(master) = self.master.as_mut() else {
            return 0;
        };
        let mut written = 0;
        let deadline = Instant::now() + Duration::from_millis(200);
        while written < bytes.len() && Instant::now() < deadline {
            match master.write(&bytes[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::Interrupted => {
                    if self.stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        written
    }

    fn reply(&mut self, text: &str) {
        let line = format!("{text}\r\n");
        self.write(line.as_bytes());
    }

    fn read_commands(&mut self) {
        let mut buf = [0u8; 1024];
        let n = match self.master.as_mut().map(|m| m.read(&mut buf)) {
            Some(Ok(n)) => n,
            _ => 0,
        };
        self.input.extend_from_slice(&buf[..n]);
        while let Some(end) = self.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=end).collect();
            let text = String::from_utf8_lossy(&line).trim().to_string();
            for command in text.split(';').map(str::trim).filter(|c| !c.is_empty()) {
                if let Ok(mut c) = self.commands.lock() {
                    c.push(command.to_string());
                }
                // A hung device receives commands but no longer acts on them.
                if !self.hung {
                    self.execute(command);
                }
            }
        }
    }

    fn execute(&mut self, command: &str) {
        let lower = command.to_ascii_lowercase();
        let mut words = lower.split_whitespace();
        match (words.next().unwrap_or(""), words.next()) {
            ("*idn?", _) => {
                let idn = self.config.identification.clone();
                self.reply(&idn);
            }
            ("*rst", _) => {
                self.streaming = false;
                self.mode = 0;
                self.gate_ms = 1000;
            }
            ("help", _) => self.reply("TDC1 emulator: *IDN? *RST singles pairs timestamp mode? time N time? NIM TTL counts? INPKT abort status?"),
            ("singles", _) => self.mode = 0,
            ("pairs", _) => self.mode = 1,
            ("timestamp", _) => self.mode = 3,
            ("mode?", _) => {
                let mode = self.mode.to_string();
                self.reply(&mode);
            }
            ("time", Some(value)) => {
                if let Ok(ms) = value.parse() {
                    self.gate_ms = ms;
                }
            }
            ("time?", _) => {
                let gate = self.gate_ms.to_string();
                self.reply(&gate);
            }
            ("counts?", _) => {
                if self.mode == 3 {
                    // A new acquisition sends the recording from its start.
                    self.streaming = true;
                    self.sent = 0;
                    self.idle_units = None;
                } else {
                    self.reply("0 0 0 0");
                }
            }
            ("abort", _) => self.streaming = false,
            ("status?", _) => {
                let flags = if self.config.overflow { 0x10 } else { 0 };
                self.reply(&format!("{flags:04X} "));
            }
            _ => {}
        }
    }

    /// Sends the next chunk of the stream, applies a due fault, or sends an idle dummy.
    fn stream_step(&mut self) {
        let total = self.config.stream.len();
        if self.sent < total {
            let mut end = (self.sent + self.config.bytes_per_write.max(1)).min(total);
            if let Some(fault) = self.config.fault.filter(|_| !self.fault_done) {
                let at = match fault {
                    Fault::Garbage { after_bytes }
                    | Fault::Hang { after_bytes }
                    | Fault::Unplug { after_bytes } => after_bytes,
                };
                if self.sent >= at {
                    self.fault_done = true;
                    match fault {
                        Fault::Garbage { .. } => {
                            self.write(&[0xFF, 0xFF]);
                        }
                        Fault::Hang { .. } => self.hung = true,
                        Fault::Unplug { .. } => {
                            self.master = None;
                            self.slave = None;
                        }
                    }
                    return;
                }
                end = end.min(at.max(self.sent + 1));
            }
            let chunk = self.config.stream[self.sent..end].to_vec();
            self.sent += self.write(&chunk);
            std::thread::sleep(self.config.write_interval);
            return;
        }
        if self.last_idle.elapsed() >= IDLE_DUMMY_INTERVAL {
            self.last_idle = Instant::now();
            let half = PERIOD_UNITS / 2;
            let last = self
                .idle_units
                .unwrap_or_else(|| last_units(&self.config.stream));
            let next = (last / half + 1) * half;
            self.idle_units = Some(next);
            let word = (((next % PERIOD_UNITS) as u32) << 5) | 0x10;
            self.write(&word.to_le_bytes());
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Counter time in 2 ns units of the last whole word of a stream (0 for an empty one).
fn last_units(stream: &[u8]) -> u64 {
    let whole = stream.len() / 4 * 4;
    if whole == 0 {
        return 0;
    }
    let w = u32::from_le_bytes(stream[whole - 4..whole].try_into().expect("4 bytes"));
    u64::from(w >> 5)
}
