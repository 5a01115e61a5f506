//! Recorded files and pipes (FIFOs, standard input) of timestamp events, as event sources.
//!
//! The content is read in chunks of up to 1 MiB and decoded as it arrives, so a file of any
//! size streams in constant memory and a record split across two reads is joined. The
//! source ends at end of file; a pipe ends when its last writer closes it. A trailing
//! incomplete record is a [`FormatError::Truncated`] error.
//!
//! On a pipe, each `read_batch` waits at most 100 ms for data (poll), so a caller can stop
//! a source whose writer has gone quiet.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use qkd_formats::raw::{self, Serialisation};
use qkd_formats::skew::DetectorSkew;
use qkd_formats::tdc1::Tdc1Decoder;
use qkd_formats::{timestamp7, FormatError};

use crate::{EventSource, SourceError};

/// Bytes read per call.
const CHUNK_BYTES: usize = 1 << 20;
/// Maximum wait for pipe data in one `read_batch`, in ms.
const PIPE_POLL_MS: i32 = 100;

/// Content format of a file or pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamFormat {
    /// 64-bit raw events in the given byte order (what readevents `-a 1` writes).
    Raw(Serialisation),
    /// timestamp7 binary recording (`a1`, or `a1X` for legacy order), converted with short
    /// mode; skews in fine ticks of 1/256 ns.
    Timestamp7(Serialisation),
    /// TDC1 stream of 32-bit words in 2 ns units; skews in ticks.
    Tdc1,
}

impl StreamFormat {
    /// Parses a format name: "raw" or "raw-legacy", "raw-native", "a1", "a1X", "tdc1".
    pub fn parse(name: &str) -> Result<Self, SourceError> {
        match name {
            "raw" | "raw-legacy" => Ok(StreamFormat::Raw(Serialisation::Legacy)),
            "raw-native" => Ok(StreamFormat::Raw(Serialisation::Native)),
            "a1" => Ok(StreamFormat::Timestamp7(Serialisation::Native)),
            "a1X" | "a1x" => Ok(StreamFormat::Timestamp7(Serialisation::Legacy)),
            "tdc1" => Ok(StreamFormat::Tdc1),
            other => Err(SourceError::invalid(
                "format",
                format!("{other:?}"),
                "\"raw\" (legacy raw events), \"raw-native\", \"a1\", \"a1X\" (timestamp7) or \"tdc1\"",
            )),
        }
    }

    fn record_bytes(self) -> usize {
        match self {
            StreamFormat::Tdc1 => 4,
            _ => raw::EVENT_BYTES,
        }
    }
}

/// Events read from any byte stream: a file, a FIFO or standard input.
pub struct StreamSource<R: Read + Send> {
    reader: R,
    name: PathBuf,
    format: StreamFormat,
    skew: DetectorSkew,
    tdc1: Option<Tdc1Decoder>,
    /// Bytes of an incomplete record left over from the previous read.
    partial: Vec<u8>,
    buffer: Vec<u8>,
    words: Vec<u64>,
    /// Poll before reading, for pipes.
    poll_fd: Option<i32>,
    ended: bool,
}

impl<R: Read + Send> std::fmt::Debug for StreamSource<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamSource")
            .field("name", &self.name)
            .field("format", &self.format)
            .field("ended", &self.ended)
            .finish()
    }
}

impl StreamSource<File> {
    /// Opens a file or FIFO by path. `skew` contains detector skews in the format's unit
    /// (fine ticks for timestamp7, ticks otherwise).
    ///
    /// A FIFO is opened for reading and writing, as the reference server keeps its FIFOs
    /// open: the open does not wait for a writer and the source never sees end of file
    /// when writers come and go, so it runs until stopped.
    pub fn open(path: &Path, format: StreamFormat, skew: [i64; 4]) -> Result<Self, SourceError> {
        use std::os::unix::fs::FileTypeExt;
        let is_pipe = std::fs::metadata(path)
            .map_err(|e| SourceError::io(path, e))?
            .file_type()
            .is_fifo();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(is_pipe)
            .open(path)
            .map_err(|e| SourceError::io(path, e))?;
        let fd = file.as_raw_fd();
        let mut source = StreamSource::from_reader(file, path, format, skew);
        if is_pipe {
            source.poll_fd = Some(fd);
        }
        Ok(source)
    }
}

impl<R: Read + Send> StreamSource<R> {
    /// Wraps a reader; `name` appears in error messages.
    pub fn from_reader(reader: R, name: &Path, format: StreamFormat, skew: [i64; 4]) -> Self {
        let skew = match format {
            StreamFormat::Timestamp7(_) => DetectorSkew::from_fine_ticks(skew),
            _ => DetectorSkew::from_ticks(skew),
        };
        let tdc1 = (format == StreamFormat::Tdc1).then(|| Tdc1Decoder::new(0, skew, false));
        StreamSource {
            reader,
            name: name.to_path_buf(),
            format,
            skew,
            tdc1,
            partial: Vec::new(),
            buffer: vec![0; CHUNK_BYTES],
            words: Vec::new(),
            poll_fd: None,
            ended: false,
        }
    }

    /// Waits up to the poll interval for pipe data; false when none arrived.
    fn wait_readable(&self) -> Result<bool, SourceError> {
        let Some(fd) = self.poll_fd else {
            return Ok(true);
        };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd and `fd` stays open while `self.reader` lives.
        let rc = unsafe { libc::poll(&mut pfd, 1, PIPE_POLL_MS) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(SourceError::io(&self.name, err));
        }
        // POLLHUP without data means the writer closed: the read returns end of file.
        Ok(rc > 0)
    }

    fn decode(&mut self, bytes: &[u8], out: &mut Vec<u64>) -> Result<(), SourceError> {
        if let Some(decoder) = self.tdc1.as_mut() {
            return decoder.push_bytes(bytes, out).map_err(SourceError::from);
        }
        let record = self.format.record_bytes();
        let mut data = std::mem::take(&mut self.partial);
        data.extend_from_slice(bytes);
        let whole = data.len() / record * record;
        self.words.clear();
        let order = match self.format {
            StreamFormat::Raw(order) | StreamFormat::Timestamp7(order) => order,
            StreamFormat::Tdc1 => unreachable!("handled by the TDC1 decoder"),
        };
        raw::decode_into(&data[..whole], order, &mut self.words)?;
        let convert = matches!(self.format, StreamFormat::Timestamp7(_));
        out.reserve(self.words.len());
        for &w in &self.words {
            let w = if convert { timestamp7::to_raw(w) } else { w };
            out.push(self.skew.apply(w));
        }
        self.partial = data[whole..].to_vec();
        Ok(())
    }

    fn truncated(&self, leftover: usize) -> SourceError {
        SourceError::Format(FormatError::Invalid {
            what: "event stream",
            detail: format!(
                "{} ends inside a record: {leftover} bytes left over, records are {} bytes; the recording is truncated",
                self.name.display(),
                self.format.record_bytes()
            ),
        })
    }
}

impl<R: Read + Send> EventSource for StreamSource<R> {
    fn read_batch(&mut self, out: &mut Vec<u64>) -> Result<bool, SourceError> {
        if self.ended {
            return Ok(false);
        }
        if !self.wait_readable()? {
            return Ok(true);
        }
        let n = loop {
            match self.reader.read(&mut self.buffer) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(SourceError::io(&self.name, e)),
            }
        };
        if n == 0 {
            self.ended = true;
            let leftover = match &self.tdc1 {
                Some(decoder) => match decoder.finish() {
                    Ok(()) => 0,
                    Err(_) => 1,
                },
                None => self.partial.len(),
            };
            if leftover > 0 {
                return Err(self.truncated(self.partial.len().max(leftover)));
            }
            return Ok(false);
        }
        let chunk = self.buffer[..n].to_vec();
        self.decode(&chunk, out)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn read_all<R: Read + Send>(source: &mut StreamSource<R>) -> Result<Vec<u64>, SourceError> {
        let mut out = Vec::new();
        while source.read_batch(&mut out)? {}
        Ok(out)
    }

    #[test]
    fn raw_events_across_chunks() {
        let words: Vec<u64> = (1..=1000u64).map(|k| raw::make_word(k * 10, 1)).collect();
        let mut bytes = Vec::new();
        raw::encode_into(&words, Serialisation::Legacy, &mut bytes);
        // A reader that returns 3 bytes at a time splits every record.
        struct Trickle(Cursor<Vec<u8>>);
        impl Read for Trickle {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(3);
                self.0.read(&mut buf[..n])
            }
        }
        let mut source = StreamSource::from_reader(
            Trickle(Cursor::new(bytes)),
            Path::new("trickle"),
            StreamFormat::Raw(Serialisation::Legacy),
            [0; 4],
        );
        assert_eq!(read_all(&mut source).unwrap(), words);
    }

    #[test]
    fn truncated_recording_is_an_error() {
        let mut source = StreamSource::from_reader(
            Cursor::new(vec![0u8; 13]),
            Path::new("short.raw"),
            StreamFormat::Raw(Serialisation::Legacy),
            [0; 4],
        );
        let err = read_all(&mut source).unwrap_err().to_string();
        assert!(err.contains("short.raw"), "{err}");
        assert!(err.contains("5 bytes left over"), "{err}");
    }

    #[test]
    fn skew_in_unit_of_format() {
        let word = raw::make_word(100, 2);
        let mut source = StreamSource::from_reader(
            Cursor::new(word.to_le_bytes().to_vec()),
            Path::new("x"),
            StreamFormat::Raw(Serialisation::Native),
            [0, 5, 0, 0],
        );
        let events = read_all(&mut source).unwrap();
        assert_eq!(raw::time_ticks(events[0]), 105);
    }

    #[test]
    fn unknown_format_is_named() {
        let err = StreamFormat::parse("csv").unwrap_err().to_string();
        assert!(err.contains("\"csv\""), "{err}");
    }

    #[test]
    fn missing_file_names_path() {
        let err = StreamSource::open(
            Path::new("/nonexistent/events.raw"),
            StreamFormat::Tdc1,
            [0; 4],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/nonexistent/events.raw"), "{err}");
    }
}
