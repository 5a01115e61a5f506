//! Destinations of the epoch files a chopper writes, and the sink that writes them.
//!
//! A chopper hands each epoch file to its [`Sink`] in pieces. `begin` gives the epoch and
//! the header size. `append` passes data in chunks of up to [`CHUNK_BYTES`], so memory
//! stays bounded by a few chunks whatever the epoch size. `finish` passes the header, now
//! that the length is known, and the trailer. `settle` waits until every finished file
//! is on disk and returns where each went.
//!
//! In a folder the file grows under a temporary name (`.<epoch>.tmp<pid>`), gets its
//! header written at offset 0 when finished, and is renamed to its epoch name, so a
//! reader never sees a partial file. By default a writer thread per folder does this,
//! so the kernel's copy into the page cache runs on the other core while the chopper
//! builds the next epoch: chopper2 writes as many bytes as it reads.
//! [`Destination::in_caller_thread`] is the switch that writes in the chopper's own
//! thread instead.

use std::fs::{self, File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::JoinHandle;

use qkd_formats::epoch::file_path;
use qkd_formats::FormatError;

/// Size in bytes of the data chunks a chopper passes to its sink.
pub(crate) const CHUNK_BYTES: usize = 1 << 20;

/// Chunks queued for the writer thread before the chopper waits for it: the bound on
/// the memory in flight (about this many times [`CHUNK_BYTES`]).
const QUEUED_JOBS: usize = 4;

/// Destination of one kind of epoch file.
pub enum Destination {
    /// One file per epoch in this folder, named by the epoch in 8 hex digits and written
    /// through a temporary file and a rename, so readers never see a partial file. The
    /// files are not fsynced (see [`qkd_formats::epoch::write_replace`]). With
    /// `background` a writer thread writes them (see the module documentation).
    Directory { dir: PathBuf, background: bool },
    /// Every packet appended to one stream (file or FIFO), as the reference's `-O`/`-o`.
    Stream(Box<dyn Write + Send>),
    /// Packets are built and counted but not stored (benchmarks, dry runs).
    Discard,
}

impl std::fmt::Debug for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Directory { dir, background } => {
                write!(f, "Directory({}, background: {background})", dir.display())
            }
            Destination::Stream(_) => f.write_str("Stream"),
            Destination::Discard => f.write_str("Discard"),
        }
    }
}

impl Destination {
    /// Checks that `dir` is an existing folder we can create files in; the files are
    /// written by a writer thread.
    pub fn directory(dir: impl Into<PathBuf>) -> Result<Self, FormatError> {
        let dir = dir.into();
        if !dir.is_dir() {
            return Err(FormatError::Invalid {
                what: "output folder",
                detail: format!(
                    "{} is not an existing folder; create it first",
                    dir.display()
                ),
            });
        }
        let probe = dir.join(format!(".qkd-write-test.{}", std::process::id()));
        fs::write(&probe, b"").map_err(|e| FormatError::io(&dir, e))?;
        let _ = fs::remove_file(&probe);
        Ok(Destination::Directory {
            dir,
            background: true,
        })
    }

    /// Writes a folder's files in the chopper's own thread instead of a writer thread.
    /// Other destinations are returned unchanged.
    pub fn in_caller_thread(self) -> Self {
        match self {
            Destination::Directory { dir, .. } => Destination::Directory {
                dir,
                background: false,
            },
            other => other,
        }
    }

    /// Opens (creating or truncating) one file that receives every packet.
    pub fn single_file(path: &Path) -> Result<Self, FormatError> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|e| FormatError::io(path, e))?;
        Ok(Destination::Stream(Box::new(file)))
    }
}

/// Writes one epoch file at a time into a folder, under a temporary name until it is
/// finished. Errors are kept until `finish`, which reports them and removes the
/// temporary file.
struct FileWriter {
    dir: PathBuf,
    open: Option<OpenFile>,
}

struct OpenFile {
    epoch: u32,
    tmp: PathBuf,
    file: Result<File, FormatError>,
}

impl FileWriter {
    fn begin(&mut self, epoch: u32, header_bytes: usize) {
        self.abandon();
        let name = qkd_formats::epoch::file_name(epoch);
        let tmp = self.dir.join(format!(".{name}.tmp{}", std::process::id()));
        let file = File::create(&tmp)
            .and_then(|mut f| f.write_all(&vec![0u8; header_bytes]).map(|_| f))
            .map_err(|e| FormatError::io(&tmp, e));
        self.open = Some(OpenFile { epoch, tmp, file });
    }

    fn append(&mut self, bytes: &[u8]) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        if let Ok(file) = &mut open.file {
            if let Err(e) = file.write_all(bytes) {
                open.file = Err(FormatError::io(&open.tmp, e));
            }
        }
    }

    fn finish(&mut self, header: &[u8], trailer: &[u8]) -> Result<Option<PathBuf>, FormatError> {
        let Some(open) = self.open.take() else {
            return Err(FormatError::Invalid {
                what: "epoch file writer",
                detail: "finish without begin; this is a bug in the chopper".into(),
            });
        };
        let path = file_path(&self.dir, open.epoch);
        let result = open.file.and_then(|mut file| {
            // The trailer goes at the end, then the header over the placeholder at the
            // start, because only now is the epoch's length known.
            let io = file
                .write_all(trailer)
                .and_then(|_| file.seek(SeekFrom::Start(0)))
                .and_then(|_| file.write_all(header));
            drop(file);
            io.and_then(|_| fs::rename(&open.tmp, &path))
                .map_err(|e| FormatError::io(&path, e))
        });
        match result {
            Ok(()) => Ok(Some(path)),
            Err(e) => {
                let _ = fs::remove_file(&open.tmp);
                Err(e)
            }
        }
    }

    /// Removes the file in progress, if any (an epoch that was never finished).
    fn abandon(&mut self) {
        if let Some(open) = self.open.take() {
            drop(open.file);
            let _ = fs::remove_file(&open.tmp);
        }
    }
}

impl Drop for FileWriter {
    fn drop(&mut self) {
        self.abandon();
    }
}

enum Job {
    Begin { epoch: u32, header_bytes: usize },
    Append(Vec<u8>),
    Finish { header: Vec<u8>, trailer: Vec<u8> },
}

/// The writer thread of one folder and the channels to it.
struct Worker {
    jobs: Option<SyncSender<Job>>,
    finished: Receiver<Result<Option<PathBuf>, FormatError>>,
    /// Chunk buffers the thread has written, returned for reuse.
    spare: Receiver<Vec<u8>>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    fn start(dir: PathBuf) -> std::io::Result<Worker> {
        let (jobs, job_queue) = mpsc::sync_channel::<Job>(QUEUED_JOBS);
        let (finished_tx, finished) = mpsc::channel();
        let (spare_tx, spare) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("epoch-file-writer".into())
            .spawn(move || {
                let mut writer = FileWriter { dir, open: None };
                for job in job_queue {
                    match job {
                        Job::Begin {
                            epoch,
                            header_bytes,
                        } => writer.begin(epoch, header_bytes),
                        Job::Append(mut chunk) => {
                            writer.append(&chunk);
                            chunk.clear();
                            let _ = spare_tx.send(chunk);
                        }
                        Job::Finish { header, trailer } => {
                            if finished_tx.send(writer.finish(&header, &trailer)).is_err() {
                                return;
                            }
                        }
                    }
                }
            })?;
        Ok(Worker {
            jobs: Some(jobs),
            finished,
            spare,
            thread: Some(thread),
        })
    }

    /// Queues a job; false when the thread is gone.
    fn send(&self, job: Job) -> bool {
        self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the queue ends the thread, which removes an unfinished file.
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

enum Target {
    Folder(FileWriter),
    Background {
        worker: Worker,
        dir: PathBuf,
    },
    Stream {
        out: Box<dyn Write + Send>,
        packet: Vec<u8>,
    },
    Discard,
}

/// Writes the epoch files of one [`Destination`]; see the module documentation.
pub(crate) struct Sink {
    target: Target,
    /// Epoch of the file in progress, for error messages.
    epoch: u32,
    /// Results of finished files not yet returned by `settle`, in order.
    ready: Vec<Result<Option<PathBuf>, FormatError>>,
    /// Files finished on the writer thread whose results are still to come.
    in_flight: usize,
    /// Chunk buffers ready for reuse when there is no writer thread.
    spare: Vec<Vec<u8>>,
}

impl Sink {
    pub(crate) fn new(destination: Destination) -> Sink {
        let target = match destination {
            Destination::Directory { dir, background } => {
                let worker = if background {
                    // Without a thread (resource limits) the files are written inline.
                    Worker::start(dir.clone()).ok()
                } else {
                    None
                };
                match worker {
                    Some(worker) => Target::Background { worker, dir },
                    None => Target::Folder(FileWriter { dir, open: None }),
                }
            }
            Destination::Stream(out) => Target::Stream {
                out,
                packet: Vec::new(),
            },
            Destination::Discard => Target::Discard,
        };
        Sink {
            target,
            epoch: 0,
            ready: Vec::new(),
            in_flight: 0,
            spare: Vec::new(),
        }
    }

    /// Returns an empty buffer for the next chunk, reusing written ones, so that large
    /// epochs do not allocate (and page-fault) fresh memory every time.
    pub(crate) fn take_buffer(&mut self) -> Vec<u8> {
        let reused = match &self.target {
            Target::Background { worker, .. } => worker.spare.try_recv().ok(),
            _ => self.spare.pop(),
        };
        reused.unwrap_or_else(|| Vec::with_capacity(CHUNK_BYTES))
    }

    /// Starts the file of `epoch` with `header_bytes` placeholder bytes.
    pub(crate) fn begin(&mut self, epoch: u32, header_bytes: usize) {
        self.epoch = epoch;
        match &mut self.target {
            Target::Folder(writer) => writer.begin(epoch, header_bytes),
            Target::Background { worker, .. } => {
                // A thread that is gone is reported by `finish`.
                worker.send(Job::Begin {
                    epoch,
                    header_bytes,
                });
            }
            Target::Stream { packet, .. } => {
                packet.clear();
                packet.resize(header_bytes, 0);
            }
            Target::Discard => {}
        }
    }

    /// Appends `chunk` to the file in progress and takes the buffer (it comes back,
    /// emptied, from [`Sink::take_buffer`]).
    pub(crate) fn append(&mut self, mut chunk: Vec<u8>) {
        match &mut self.target {
            Target::Folder(writer) => writer.append(&chunk),
            Target::Background { worker, .. } => {
                worker.send(Job::Append(chunk));
                return;
            }
            Target::Stream { packet, .. } => packet.extend_from_slice(&chunk),
            Target::Discard => {}
        }
        chunk.clear();
        self.spare.push(chunk);
    }

    /// Ends the file in progress: `header` replaces the placeholder at its start and
    /// `trailer` follows the data. The result comes from [`Sink::settle`].
    pub(crate) fn finish(&mut self, header: &[u8], trailer: &[u8]) {
        let result = match &mut self.target {
            Target::Folder(writer) => writer.finish(header, trailer),
            Target::Background { worker, dir } => {
                if worker.send(Job::Finish {
                    header: header.to_vec(),
                    trailer: trailer.to_vec(),
                }) {
                    self.in_flight += 1;
                    return;
                }
                Err(writer_gone(&file_path(dir, self.epoch)))
            }
            Target::Stream { out, packet } => {
                packet[..header.len()].copy_from_slice(header);
                packet.extend_from_slice(trailer);
                let epoch = self.epoch;
                out.write_all(packet)
                    .and_then(|_| out.flush())
                    .map(|_| None)
                    .map_err(|e| FormatError::io(format!("output stream (epoch {epoch:08x})"), e))
            }
            Target::Discard => Ok(None),
        };
        self.ready.push(result);
    }

    /// Waits until every finished file is written; returns their results in order: the
    /// path in a folder, `None` for a stream or discarded output.
    pub(crate) fn settle(&mut self) -> Vec<Result<Option<PathBuf>, FormatError>> {
        if let Target::Background { worker, dir } = &self.target {
            while self.in_flight > 0 {
                self.in_flight -= 1;
                let result = worker
                    .finished
                    .recv()
                    .unwrap_or_else(|_| Err(writer_gone(dir)));
                self.ready.push(result);
            }
        }
        std::mem::take(&mut self.ready)
    }
}

fn writer_gone(path: &Path) -> FormatError {
    FormatError::io(
        path,
        std::io::Error::other("the epoch file writer thread stopped; create a new chopper"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_two(destination: Destination) -> Vec<Result<Option<PathBuf>, FormatError>> {
        let mut sink = Sink::new(destination);
        for epoch in [7u32, 8] {
            sink.begin(epoch, 4);
            for part in [b"ab".as_slice(), b"cd"] {
                let mut chunk = sink.take_buffer();
                chunk.extend_from_slice(part);
                sink.append(chunk);
            }
            sink.finish(&epoch.to_le_bytes(), b"!");
        }
        sink.settle()
    }

    #[test]
    fn folder_files_equal_in_both_threads() {
        for background in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut destination = Destination::directory(dir.path()).unwrap();
            if !background {
                destination = destination.in_caller_thread();
            }
            let results = write_two(destination);
            let paths: Vec<PathBuf> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
            assert_eq!(
                paths,
                vec![dir.path().join("00000007"), dir.path().join("00000008")]
            );
            assert_eq!(fs::read(&paths[0]).unwrap(), b"\x07\0\0\0abcd!");
            // Only the two finished files: no temporary file is left.
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 2);
        }
    }

    #[test]
    fn dropped_sink_removes_unfinished_file() {
        for background in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let mut destination = Destination::directory(dir.path()).unwrap();
            if !background {
                destination = destination.in_caller_thread();
            }
            let mut sink = Sink::new(destination);
            sink.begin(9, 20);
            let mut chunk = sink.take_buffer();
            chunk.extend_from_slice(b"partial");
            sink.append(chunk);
            drop(sink);
            assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        }
    }

    #[test]
    fn vanished_folder_fails_cleanly() {
        for background in [true, false] {
            let root = tempfile::tempdir().unwrap();
            let dir = root.path().join("t1");
            fs::create_dir(&dir).unwrap();
            let mut destination = Destination::directory(&dir).unwrap();
            if !background {
                destination = destination.in_caller_thread();
            }
            fs::remove_dir(&dir).unwrap();
            let results = write_two(destination);
            assert_eq!(results.len(), 2);
            let err = results.into_iter().next().unwrap().unwrap_err();
            assert!(err.to_string().contains("t1"), "{err}");
            assert!(!dir.exists());
        }
    }

    #[test]
    fn stream_gets_whole_packets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("all");
        let results = write_two(Destination::single_file(&path).unwrap());
        assert!(results.iter().all(|r| matches!(r, Ok(None))));
        assert_eq!(fs::read(&path).unwrap(), b"\x07\0\0\0abcd!\x08\0\0\0abcd!");
    }
}
