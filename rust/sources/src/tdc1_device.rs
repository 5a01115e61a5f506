//! The S-Fifteen TDC1 time tagger over its USB serial port, as an event source.
//!
//! Protocol: ASCII commands ending in `\r\n`, several joined by `;`; replies are text lines
//! ending in `\r\n`, except the event stream. Opening stops any acquisition an earlier
//! run left going (`abort`), identifies the device (the `*IDN?` reply
//! must contain `TDC1`), then starts endless timestamping with
//! `*RST;NIM;time 0;timestamp;counts?` (or `TTL`). The device then streams little-endian
//! 32-bit words in 2 ns units (`qkd_formats::tdc1`), which become raw event words with the
//! configured detector skews. Stopping sends `abort`, drains the stream, checks `status?`
//! for the FIFO overflow flag (0x10) and resets the device with `*RST`.
//!
//! Nothing blocks for ever: every read and write has a timeout. When no byte arrives for
//! 200 ms the source sends `INPKT` (which makes the device ship a partly filled USB
//! packet); a device that stays silent for `stall_timeout` ends the source with a
//! [`SourceError::Timeout`]. A missing port, a permission problem, an unplugged device and
//! bytes that do not decode as a TDC1 stream end it with a [`SourceError::Device`].

use std::io::{ErrorKind, Read, Write};
use std::time::{Duration, Instant};

use log::{info, warn};
use serialport::SerialPort;

use qkd_formats::skew::DetectorSkew;
use qkd_formats::tdc1::Tdc1Decoder;

use crate::{EventSource, SourceError};

/// Poll interval of serial reads.
const READ_POLL: Duration = Duration::from_millis(10);
/// Silence after which `INPKT` makes the device ship a partial USB packet.
const FLUSH_AFTER: Duration = Duration::from_millis(200);
/// Maximum time one `read_batch` call collects bytes before returning.
const BATCH_WAIT: Duration = Duration::from_millis(50);
/// Bytes read from the port per system call.
const READ_CHUNK: usize = 1 << 16;
/// FIFO overflow flag of the `status?` reply.
const STATUS_OVERFLOW: u16 = 0x10;

/// Input signal standard of the four inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputLevel {
    /// Negative NIM pulses.
    Nim,
    /// TTL pulses.
    Ttl,
}

/// How to open and run the device.
#[derive(Debug, Clone, PartialEq)]
pub struct Tdc1Config {
    /// Serial device path, such as `/dev/ttyACM0` or `/dev/serial/by-id/...`.
    pub path: String,
    /// Input signal standard.
    pub input_level: InputLevel,
    /// Skews of detectors 1..4 in ticks of 1/8 ns, added to single-detector events.
    pub skew_ticks: [i64; 4],
    /// Time of the first counter period in ticks (0, or a wall-clock reading).
    pub start_ticks: u64,
    /// Maximum wait for a text reply.
    pub reply_timeout: Duration,
    /// Maximum silence of the event stream before the source fails.
    pub stall_timeout: Duration,
}

impl Tdc1Config {
    /// Defaults for the device at `path`: NIM inputs, no skew, times from 0, 1 s reply and
    /// 2 s stall timeouts.
    pub fn new(path: impl Into<String>) -> Self {
        Tdc1Config {
            path: path.into(),
            input_level: InputLevel::Nim,
            skew_ticks: [0; 4],
            start_ticks: 0,
            reply_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(2),
        }
    }
}

/// A running TDC1 acquisition.
pub struct Tdc1Device {
    config: Tdc1Config,
    port: Box<dyn SerialPort>,
    decoder: Tdc1Decoder,
    buffer: Vec<u8>,
    last_data: Instant,
    flush_sent: bool,
    stopped: bool,
    identification: String,
}

impl std::fmt::Debug for Tdc1Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tdc1Device")
            .field("path", &self.config.path)
            .field("identification", &self.identification)
            .field("stopped", &self.stopped)
            .finish()
    }
}

fn device_error(path: &str, detail: impl Into<String>) -> SourceError {
    SourceError::Device {
        path: path.to_string(),
        detail: detail.into(),
    }
}

/// Explains a failed open with what the operator can do about it.
fn open_error(path: &str, err: serialport::Error) -> SourceError {
    let detail = match err.kind() {
        serialport::ErrorKind::Io(ErrorKind::NotFound) => format!(
            "not found ({err}); check that the TDC1 is plugged in and the path is right (ls /dev/serial/by-id/)"
        ),
        serialport::ErrorKind::Io(ErrorKind::PermissionDenied) => format!(
            "permission denied ({err}); add the user to the group that owns the device (often dialout) or fix the udev rule"
        ),
        serialport::ErrorKind::NoDevice => format!(
            "cannot be opened ({err}); another program may hold it, stop it first"
        ),
        _ => format!("cannot be opened: {err}"),
    };
    device_error(path, detail)
}

/// Describes a read or write failure of an open port.
fn io_failure(path: &str, action: &str, err: &std::io::Error) -> SourceError {
    device_error(
        path,
        format!("{action} failed ({err}); the device was unplugged or reset, reconnect it and restart the source"),
    )
}

impl Tdc1Device {
    /// Opens the port, checks the identification and starts endless timestamping.
    pub fn open(config: Tdc1Config) -> Result<Self, SourceError> {
        let path = config.path.clone();
        let port = serialport::new(&path, 115_200)
            .timeout(READ_POLL)
            .open()
            .map_err(|e| open_error(&path, e))?;
        let skew = DetectorSkew::from_ticks(config.skew_ticks);
        let mut device = Tdc1Device {
            decoder: Tdc1Decoder::new(config.start_ticks, skew, false),
            config,
            port,
            buffer: vec![0; READ_CHUNK],
            last_data: Instant::now(),
            flush_sent: false,
            stopped: false,
            identification: String::new(),
        };
        // A device left streaming by an earlier run would bury the reply in event data.
        device.send("abort")?;
        device.drain(Duration::from_millis(50))?;
        device.send("*IDN?")?;
        let idn = device.read_line("the *IDN? reply")?;
        if !idn.to_ascii_uppercase().contains("TDC1") {
            return Err(device_error(
                &path,
                format!("identifies as {idn:?}, not as a TDC1; check the device path"),
            ));
        }
        device.identification = idn;
        let level = match device.config.input_level {
            InputLevel::Nim => "NIM",
            InputLevel::Ttl => "TTL",
        };
        device.send(&format!("*RST;{level};time 0;timestamp;counts?"))?;
        device.last_data = Instant::now();
        info!(
            "TDC1 {path} ({}) streaming timestamps, {level} inputs",
            device.identification
        );
        Ok(device)
    }

    /// Returns the identification line of the device.
    pub fn identification(&self) -> &str {
        &self.identification
    }

    fn send(&mut self, command: &str) -> Result<(), SourceError> {
        let line = format!("{command}\r\n");
        let path = self.config.path.clone();
        let deadline = Instant::now() + self.config.reply_timeout;
        let mut rest = line.as_bytes();
        while !rest.is_empty() {
            match self.port.write(rest) {
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::Interrupted => {
                    if Instant::now() >= deadline {
                        return Err(SourceError::Timeout {
                            path,
                            what: "the device to accept a command",
                            millis: self.config.reply_timeout.as_millis() as u64,
                        });
                    }
                }
                Err(e) => return Err(io_failure(&path, "write", &e)),
            }
        }
        self.port
            .flush()
            .map_err(|e| io_failure(&path, "write", &e))
    }

    /// Reads some bytes; `Ok(0)` when nothing arrived within one poll interval.
    fn read_some(&mut self) -> Result<usize, SourceError> {
        match self.port.read(&mut self.buffer) {
            Ok(0) => Err(device_error(
                &self.config.path,
                "end of file on the serial port; the device was unplugged, reconnect it and restart the source",
            )),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == ErrorKind::TimedOut || e.kind() == ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(io_failure(&self.config.path, "read", &e)),
        }
    }

    /// Discards input until the port has been quiet for `quiet`, or for at most the reply
    /// timeout.
    fn drain(&mut self, quiet: Duration) -> Result<(), SourceError> {
        let deadline = Instant::now() + self.config.reply_timeout;
        let mut last = Instant::now();
        while Instant::now() < deadline && last.elapsed() < quiet {
            if self.read_some()? > 0 {
                last = Instant::now();
            }
        }
        Ok(())
    }

    /// Reads one text reply line (without `\r\n`).
    fn read_line(&mut self, what: &'static str) -> Result<String, SourceError> {
        let deadline = Instant::now() + self.config.reply_timeout;
        let mut line = Vec::new();
        loop {
            if Instant::now() >= deadline {
                return Err(SourceError::Timeout {
                    path: self.config.path.clone(),
                    what,
                    millis: self.config.reply_timeout.as_millis() as u64,
                });
            }
            let n = self.read_some()?;
            line.extend_from_slice(&self.buffer[..n]);
            if let Some(end) = line.windows(2).position(|w| w == b"\r\n") {
                let text = &line[..end];
                if text.len() > 200 || !text.iter().all(|b| b.is_ascii() && !b.is_ascii_control()) {
                    return Err(device_error(
                        &self.config.path,
                        format!(
                            "sent {} bytes that are not a text reply while waiting for {what}; check that the path is a TDC1",
                            text.len()
                        ),
                    ));
                }
                return Ok(String::from_utf8_lossy(text).trim().to_string());
            }
            if line.len() > 4096 {
                return Err(device_error(
                    &self.config.path,
                    format!("sent 4096 bytes without a line end while waiting for {what}; check that the path is a TDC1"),
                ));
            }
        }
    }

    /// Stops the acquisition: `abort`, drain, `status?` (fails on FIFO overflow), `*RST`.
    /// Later `read_batch` calls return `Ok(false)`.
    pub fn stop(&mut self) -> Result<(), SourceError> {
        self.stop_acquisition()
    }

    fn stop_acquisition(&mut self) -> Result<(), SourceError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        self.send("abort")?;
        self.drain(Duration::from_millis(50))?;
        self.send("status?")?;
        let status = self.read_line("the status? reply")?;
        let flags = u16::from_str_radix(status.trim(), 16).map_err(|_| {
            device_error(
                &self.config.path,
                format!("status reply {status:?} is not 4 hex digits"),
            )
        })?;
        self.send("*RST")?;
        if flags & STATUS_OVERFLOW != 0 {
            return Err(device_error(
                &self.config.path,
                format!("reported a FIFO overflow (status {status}): events were lost; lower the event rate"),
            ));
        }
        info!(
            "TDC1 {} stopped after {} words",
            self.config.path,
            self.decoder.words_read()
        );
        Ok(())
    }
}

impl EventSource for Tdc1Device {
    fn read_batch(&mut self, out: &mut Vec<u64>) -> Result<bool, SourceError> {
        if self.stopped {
            return Ok(false);
        }
        let start = Instant::now();
        let before = out.len();
        while start.elapsed() < BATCH_WAIT {
            let n = self.read_some()?;
            if n == 0 {
                if out.len() > before {
                    break;
                }
                let silent = self.last_data.elapsed();
                if silent >= self.config.stall_timeout {
                    return Err(SourceError::Timeout {
                        path: self.config.path.clone(),
                        what: "timestamp data",
                        millis: self.config.stall_timeout.as_millis() as u64,
                    });
                }
                if silent >= FLUSH_AFTER && !self.flush_sent {
                    self.send("INPKT")?;
                    self.flush_sent = true;
                }
                continue;
            }
            self.last_data = Instant::now();
            self.flush_sent = false;
            let chunk = &self.buffer[..n];
            if let Err(e) = self.decoder.push_bytes(chunk, out) {
                return Err(device_error(&self.config.path, e.to_string()));
            }
        }
        Ok(true)
    }

    fn stop(&mut self) -> Result<(), SourceError> {
        self.stop_acquisition()
    }
}

impl Drop for Tdc1Device {
    fn drop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            // Best effort: leave the device idle for the next user.
            if let Err(e) = self.send("abort").and_then(|_| self.send("*RST")) {
                warn!(
                    "TDC1 {}: could not stop the acquisition: {e}",
                    self.config.path
                );
            }
        }
    }
}
