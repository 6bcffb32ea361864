//! The outage spool: records Kafka could not take, kept in order until it can.
//!
//! # Tiers and order
//! A FIFO of *entries* (one batch of records each, numbered by a rising `id`) in three places,
//! read in this order:
//! - `front`: the memory tier, up to `memory_bytes`, used while nothing is on disk;
//! - the disk tier (`log`), up to `disk_bytes`;
//! - `back`: entries bound for the disk that wait in memory for the next write (a group commit),
//!   or for the disk to work again after an error.
//!
//! When the memory tier overflows, its entries move to `back` ahead of the new one (a spill), so
//! everything on disk is always newer than everything in `front`. With `persist_all` (the
//! at-least-once mode) entries skip `front`, because only fsynced records may be acknowledged to
//! the MQTT broker. Entries leave the spool only through [`Spool::remove_through`], after Kafka
//! acknowledged them, or through the full policy's `drop-oldest` (counted).
//!
//! # On disk (format version 2)
//! `SPOOL_DIR` holds:
//! - `lock`: locked (`flock`) by the process using the spool, which writes its pid in it. A second
//!   process finds it locked and refuses to start, naming that pid; it touches nothing.
//! - `NNNNNNNNNNNNNNNNNNNN.seg`: segments, numbered in order. Each starts with a 16-byte header
//!   (`"MKBSPOOL"`, format version u32 LE, CRC-32 of both), then frames, one per entry (layout in
//!   the `frame` module: magic, length, CRC-32, then the entry id and per record its receipt time,
//!   Kafka topic, key, value and headers). A segment is closed at about 4 MiB (less for a small
//!   `disk_bytes`) and deleted once all its entries are delivered. Each run starts a new segment
//!   and never appends to an old one.
//! - `head`: the id through which entries are delivered (u64 LE, CRC-32), replaced by rename
//!   after each delivered chunk and not fsynced: losing it sends records again, never loses any.
//! - `quarantine/`: damaged bytes set aside, one file per damaged range.
//!
//! A write appends the frames of a group of entries and fsyncs (`fdatasync`); a new segment's
//! directory entry is fsynced too. Only then are their messages acknowledged. A failed write
//! or fsync (disk full, I/O error) cuts off what it wrote and starts a new segment next time.
//!
//! # Recovery at start-up
//! Every segment is read through once (memory: one segment at a time):
//! - frames at or below the `head` id are delivered: skipped, and a segment holding nothing else
//!   is deleted;
//! - a frame whose declared length runs past the end of its segment is a write cut short by a
//!   crash (never acknowledged): cut off, and reported in a WARN line;
//! - any other bytes that are not an intact frame (bad magic, length, CRC or layout) are damage:
//!   copied to `quarantine/`, counted in `bridge_spool_corrupt_entries_total`, and the segment is
//!   rewritten without them. The scanner finds the next intact frame by its magic and CRC, so
//!   records before **and after** the damage are delivered. One ERROR line at start-up gives the
//!   counts. Damage met later while reading is handled the same way;
//! - a frame whose id is not above the one before it is a stale copy of a write that was undone
//!   and is skipped;
//! - a spool written by a newer format version is refused; a directory that cannot be read at all
//!   is moved aside to `SPOOL_DIR.corrupt-<unix time>` and a fresh spool starts;
//! - a spool of the previous release (sled, format 1) is converted (the `legacy` module).
//!
//! # Threads and memory
//! All disk I/O runs on tokio's blocking threads; the async side never waits on the disk except
//! by awaiting those calls, so a slow or stuck disk cannot stop MQTT keep-alive, HTTP or the
//! shutdown timer. Memory does not grow with what is on disk: the log keeps a few numbers per
//! segment, the marks of entries read but not yet delivered, and the segment it is reading.
//!
//! The memory tier counts what its entries take: each record's key and value, plus the
//! [`Record`] itself and the allocator's bookkeeping for its two buffers (about 100 bytes a
//! record), and an entry's vector is shrunk to its records (the batcher sizes it for a full
//! batch).

mod frame;
mod legacy;
mod log;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use mkb_bridge::Record;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::metrics::SpoolMetrics;
use log::Log;
pub use log::OpenError;

/// What to do when both tiers are full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FullPolicy {
    /// Take nothing more: the MQTT broker keeps the messages.
    Block,
    /// Drop the oldest spooled entries to make room.
    DropOldest,
    /// Drop what arrives.
    DropNewest,
}

/// Limits and place of the spool.
#[derive(Clone, Debug)]
pub struct SpoolConfig {
    /// Where the disk tier lives; `None` disables it.
    pub dir: Option<PathBuf>,
    pub memory_bytes: usize,
    pub disk_bytes: usize,
    pub full_policy: FullPolicy,
    /// Every entry goes to disk, none is kept in memory only (at-least-once).
    pub persist_all: bool,
}

/// One spooled batch.
#[derive(Clone, Debug)]
pub struct Entry {
    pub id: u64,
    pub records: Vec<Record>,
}

/// What became of records pushed into the spool.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Spooled; the full policy may have dropped older records (`dropped_oldest`) to make room,
    /// or dropped the new ones (`dropped_newest`).
    Taken {
        dropped_oldest: usize,
        dropped_newest: usize,
    },
    /// No room under the `block` policy: handed back, to be pushed again once there is room.
    Held(Vec<Record>),
}

/// Why the spool cannot be used at all.
#[derive(Debug, thiserror::Error)]
#[error("disk spool {dir}: {reason}")]
pub struct SpoolError {
    pub dir: PathBuf,
    pub reason: OpenError,
}

/// A disk that failed a write: entries wait in memory until `retry_at`.
#[derive(Debug)]
struct DiskError {
    reason: String,
    retry_at: Instant,
}

/// See the module documentation.
pub struct Spool {
    config: SpoolConfig,
    metrics: SpoolMetrics,
    front: Tier,
    /// The disk tier; `None` when off or unusable, and while a blocking call has it.
    log: Option<Log>,
    back: Tier,
    disk_error: Option<DiskError>,
    next_id: u64,
    /// The buffer disk reads come back in, reused from read to read.
    raw: log::RawChunk,
}

/// Where a new entry goes.
enum Place {
    Front,
    Back,
}

/// Entries held in memory (`front` or `back`), with what they take there and would take on
/// disk, kept as they come and go so that no check walks the records.
#[derive(Default)]
struct Tier {
    entries: VecDeque<Entry>,
    records: usize,
    memory_bytes: usize,
    disk_bytes: usize,
}

impl Tier {
    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn push(&mut self, entry: Entry, in_memory: usize, on_disk: usize) {
        self.records += entry.records.len();
        self.memory_bytes += in_memory;
        self.disk_bytes += on_disk;
        self.entries.push_back(entry);
    }

    /// Moves every entry of `other` behind this tier's.
    fn append(&mut self, other: &mut Tier) {
        let other = std::mem::take(other);
        self.records += other.records;
        self.memory_bytes += other.memory_bytes;
        self.disk_bytes += other.disk_bytes;
        self.entries.extend(other.entries);
    }

    /// Adds copies of the entries after `after` to `chunk`, up to `max_records` records in it
    /// (`total` so far) but at least one entry; returns whether the chunk is full.
    fn copy_after(
        &self,
        after: u64,
        max_records: usize,
        chunk: &mut Vec<Entry>,
        total: &mut usize,
    ) -> bool {
        for entry in self.entries.iter().filter(|e| e.id > after) {
            if *total > 0 && *total + entry.records.len() > max_records {
                return true;
            }
            *total += entry.records.len();
            chunk.push(entry.clone());
            if *total >= max_records {
                return true;
            }
        }
        false
    }

    /// Forgets the entries up to and including `id`; returns their records.
    fn remove_through(&mut self, id: u64) -> usize {
        let mut removed = 0;
        while self.entries.front().is_some_and(|e| e.id <= id) {
            let entry = self.entries.pop_front().expect("front exists");
            let (count, bytes) = sizes(&entry.records);
            self.memory_bytes -= memory_size(count, bytes);
            self.disk_bytes -= frame::frame_size(count, bytes);
            removed += count;
        }
        self.records -= removed;
        removed
    }
}

/// Segment size: 4 MiB, or less when the disk quota is small, so that `drop-oldest` (which
/// drops whole segments) never drops most of the spool at once.
const SEGMENT_BYTES: usize = 4 << 20;
/// How long after a failed write the disk is tried again.
pub const DISK_RETRY: Duration = Duration::from_secs(1);

impl Spool {
    /// Opens the spool, recovering what a previous run left on disk. Damage is handled as the
    /// module documentation says; only a spool in use by another process, or one written by a
    /// newer release, is an error.
    pub async fn open(config: SpoolConfig, metrics: SpoolMetrics) -> Result<Self, SpoolError> {
        let log = match &config.dir {
            Some(dir) if config.disk_bytes > 0 => {
                let segment_bytes = SEGMENT_BYTES.min(config.disk_bytes / 8).max(64 << 10);
                open_or_recover(dir.clone(), segment_bytes as u64, &metrics).await?
            }
            _ => None,
        };
        let next_id = log.as_ref().map_or(0, Log::last_id) + 1;
        let disk_limit = if log.is_some() { config.disk_bytes } else { 0 };
        for (gauge, limit) in [
            (&metrics.memory_limit, config.memory_bytes),
            (&metrics.disk_limit, disk_limit),
        ] {
            gauge.set(i64::try_from(limit).unwrap_or(i64::MAX));
        }
        let spool = Self {
            config,
            metrics,
            front: Tier::default(),
            log,
            back: Tier::default(),
            disk_error: None,
            next_id,
            raw: log::RawChunk::default(),
        };
        spool.update_gauges();
        if let Some(log) = &spool.log
            && log.records() > 0
        {
            info!(
                records = log.records(),
                bytes = log.bytes(),
                "Disk spool from a previous run found; it drains before new traffic."
            );
        }
        Ok(spool)
    }

    pub fn is_empty(&self) -> bool {
        self.records() == 0
    }

    /// Records held in all tiers.
    pub fn records(&self) -> usize {
        self.memory_records() + self.log.as_ref().map_or(0, Log::records)
    }

    fn memory_records(&self) -> usize {
        self.front.records + self.back.records
    }

    /// What `front` and `back` take in memory.
    fn memory_bytes(&self) -> usize {
        self.front.memory_bytes + self.back.memory_bytes
    }

    /// Whether an entry of `count` records whose keys and values hold `bytes` would fit now.
    pub fn has_room_for(&self, count: usize, bytes: usize) -> bool {
        self.place(memory_size(count, bytes), frame::frame_size(count, bytes))
            .is_some()
    }

    /// Unit tests: the next `count` disk writes fail as on a full disk.
    #[cfg(test)]
    pub(crate) fn fail_next_writes(&mut self, count: usize) {
        if let Some(log) = &mut self.log {
            log.fail_writes = count;
        }
    }

    /// Whether the disk tier is in use (open and writing).
    pub fn has_disk(&self) -> bool {
        self.log.is_some() && self.disk_error.is_none()
    }

    /// Why the disk tier cannot be written, while it cannot.
    pub fn disk_error(&self) -> Option<&str> {
        self.disk_error.as_ref().map(|e| e.reason.as_str())
    }

    /// When a failed disk is to be tried again, while entries wait for it.
    pub fn disk_retry_at(&self) -> Option<Instant> {
        self.disk_error
            .as_ref()
            .filter(|_| !self.back.is_empty())
            .map(|e| e.retry_at)
    }

    fn place(&self, in_memory: usize, on_disk: usize) -> Option<Place> {
        let memory_room = self.memory_bytes() + in_memory <= self.config.memory_bytes;
        let Some(log) = &self.log else {
            return memory_room.then_some(Place::Front);
        };
        let behind_disk = log.records() > 0 || !self.back.is_empty();
        if !self.config.persist_all && !behind_disk && memory_room {
            return Some(Place::Front);
        }
        let disk_room = log.bytes() + self.back.disk_bytes + self.front.disk_bytes + on_disk
            <= self.config.disk_bytes;
        // While the disk fails, what waits for it waits in memory.
        (disk_room && (self.disk_error.is_none() || memory_room)).then_some(Place::Back)
    }

    /// Appends `records` as one entry, applying the full policy when there is no room.
    pub fn push(&mut self, records: Vec<Record>) -> Pushed {
        let mut dropped_oldest = 0;
        if records.is_empty() {
            return Pushed::Taken {
                dropped_oldest,
                dropped_newest: 0,
            };
        }
        let (count, bytes) = sizes(&records);
        let (in_memory, on_disk) = (memory_size(count, bytes), frame::frame_size(count, bytes));
        let mut place = self.place(in_memory, on_disk);
        match self.config.full_policy {
            _ if place.is_some() => {}
            // Larger than the whole spool, it would never find room: it goes in alone, over
            // the limit by that one batch, rather than blocking forever.
            FullPolicy::Block if self.is_empty() => place = Some(self.unbounded_place()),
            FullPolicy::Block => return Pushed::Held(records),
            FullPolicy::DropOldest => {
                while place.is_none() {
                    let dropped = self.drop_oldest();
                    if dropped == 0 {
                        break;
                    }
                    dropped_oldest += dropped;
                    place = self.place(in_memory, on_disk);
                }
            }
            FullPolicy::DropNewest => {}
        }
        let dropped_newest = match place {
            Some(place) => {
                self.insert(place, records, in_memory, on_disk);
                0
            }
            None => count,
        };
        Pushed::Taken {
            dropped_oldest,
            dropped_newest,
        }
    }

    /// Appends records whatever the quotas say: at shutdown, where they have nowhere else to go.
    pub fn push_unbounded(&mut self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let (count, bytes) = sizes(&records);
        let place = self.unbounded_place();
        self.insert(
            place,
            records,
            memory_size(count, bytes),
            frame::frame_size(count, bytes),
        );
    }

    fn unbounded_place(&self) -> Place {
        if self.log.is_some() {
            Place::Back
        } else {
            Place::Front
        }
    }

    fn insert(&mut self, place: Place, mut records: Vec<Record>, in_memory: usize, on_disk: usize) {
        let id = self.next_id;
        self.next_id += 1;
        self.metrics.spooled.inc_by(records.len() as u64);
        // The batch's vector was sized for a full batch: shrunk to what it holds, so that what
        // the memory tier counts is what it takes.
        records.shrink_to_fit();
        let entry = Entry { id, records };
        match place {
            Place::Front => self.front.push(entry, in_memory, on_disk),
            Place::Back => {
                self.spill();
                self.back.push(entry, in_memory, on_disk);
            }
        }
        self.update_gauges();
    }

    /// Everything in the memory tier goes to disk, ahead of whatever comes next (`front` is
    /// only used while nothing is on disk or waiting for it, so order holds).
    fn spill(&mut self) {
        self.back.append(&mut self.front);
    }

    /// Writes what waits for the disk and fsyncs, unless the disk failed less than
    /// [`DISK_RETRY`] ago. Returns whether everything spooled is durable, i.e. nothing is held
    /// in memory only.
    pub async fn flush(&mut self) -> bool {
        let due = self
            .disk_error
            .as_ref()
            .is_none_or(|e| Instant::now() >= e.retry_at);
        if !self.back.is_empty() && self.log.is_some() && due {
            let mut waiting = std::mem::take(&mut self.back);
            let started = Instant::now();
            let written = self
                .with_log(move |log| {
                    let written = log.append(waiting.entries.make_contiguous());
                    (written, waiting)
                })
                .await;
            match written {
                Some((Ok(()), written)) => {
                    // Freed here, on the thread that allocated them.
                    drop(written);
                    self.metrics.fsync.observe(started.elapsed().as_secs_f64());
                    if let Some(error) = self.disk_error.take() {
                        info!(
                            was = %error.reason,
                            "Disk spool writable again; held records are on disk."
                        );
                    }
                }
                Some((Err(e), waiting)) => {
                    self.back = waiting;
                    self.disk_failed(&e);
                }
                // The blocking call panicked and took the log and the entries with it: they
                // were never acknowledged.
                None => {}
            }
            self.update_gauges();
        }
        self.all_durable()
    }

    /// Whether nothing spooled is held in memory only.
    pub fn all_durable(&self) -> bool {
        self.front.is_empty() && self.back.is_empty()
    }

    /// Runs `call` on the log on a blocking thread. `None` when there is no log or the call
    /// panicked (the disk tier is then off until the next start).
    async fn with_log<R: Send + 'static>(
        &mut self,
        call: impl FnOnce(&mut Log) -> R + Send + 'static,
    ) -> Option<R> {
        let mut log = self.log.take()?;
        let ran = tokio::task::spawn_blocking(move || {
            let result = call(&mut log);
            (log, result)
        })
        .await;
        match ran {
            Ok((log, result)) => {
                self.log = Some(log);
                Some(result)
            }
            Err(e) => {
                error!(error = %e, "The disk spool failed; continuing with the memory tier only. Records on disk stay there for the next start.");
                self.update_gauges();
                None
            }
        }
    }

    fn disk_failed(&mut self, e: &std::io::Error) {
        let reason = e.to_string();
        if self.disk_error.is_none() {
            error!(
                error = %reason, retry_in = ?DISK_RETRY,
                "Disk spool write failed; nothing more is acknowledged until it works again \
                 (the MQTT broker keeps the messages)."
            );
        }
        self.disk_error = Some(DiskError {
            reason,
            retry_at: Instant::now() + DISK_RETRY,
        });
    }

    /// The oldest entries after entry `after` (0 for the very first), up to `max_records`
    /// records in all but at least one entry. A disk that cannot be read is an error (and
    /// counts as a failed disk).
    pub async fn read_after(
        &mut self,
        after: u64,
        max_records: usize,
    ) -> Result<Vec<Entry>, std::io::Error> {
        let mut chunk = Vec::new();
        let mut total = 0;
        if self
            .front
            .copy_after(after, max_records, &mut chunk, &mut total)
        {
            return Ok(chunk);
        }
        if self.log.as_ref().is_some_and(|l| l.records() > 0) {
            let mut raw = std::mem::take(&mut self.raw);
            let read = self
                .with_log(move |log| {
                    let read = log.read_after(after, max_records, total, &mut raw);
                    (read, raw, log.take_damage())
                })
                .await;
            if let Some((read, raw, damage)) = read {
                self.metrics.corrupt.inc_by(damage);
                self.raw = raw;
                if let Err(e) = read {
                    error!(error = %e, "Cannot read the disk spool; trying again later.");
                    self.disk_failed(&e);
                    return Err(e);
                }
                for (id, count, body) in &self.raw.entries {
                    let records = frame::decode(&self.raw.bytes[body.clone()])
                        .expect("the log checked the body's layout when it read it");
                    debug_assert_eq!(records.len(), *count);
                    total += records.len();
                    chunk.push(Entry { id: *id, records });
                }
            }
            if total >= max_records {
                return Ok(chunk);
            }
        }
        self.back
            .copy_after(after, max_records, &mut chunk, &mut total);
        Ok(chunk)
    }

    /// Forgets every entry up to and including `id` (delivered to Kafka).
    pub async fn remove_through(&mut self, id: u64) {
        let mut removed = self.front.remove_through(id) + self.back.remove_through(id);
        if self.log.as_ref().is_some_and(|l| l.records() > 0) {
            match self.with_log(move |log| log.remove_through(id)).await {
                Some(Ok(records)) => removed += records,
                Some(Err(e)) => {
                    warn!(error = %e, "Cannot update the disk spool after a delivery; those records may be sent again.")
                }
                None => {}
            }
        }
        self.metrics.drained.inc_by(removed as u64);
        self.update_gauges();
    }

    /// Drops the oldest entry, or on disk the oldest segment (full policy `drop-oldest`);
    /// returns how many records went.
    fn drop_oldest(&mut self) -> usize {
        let dropped = if let Some(id) = self.front.entries.front().map(|e| e.id) {
            self.front.remove_through(id)
        } else if let Some(log) = self.log.as_mut().filter(|l| l.records() > 0) {
            log.drop_oldest_segment()
        } else if let Some(id) = self.back.entries.front().map(|e| e.id) {
            self.back.remove_through(id)
        } else {
            0
        };
        self.update_gauges();
        dropped
    }

    /// At shutdown: writes what is in memory to disk (ignoring the disk quota: these records
    /// have nowhere else to go) and fsyncs. Returns the records that could not be saved.
    pub async fn persist_memory(&mut self) -> usize {
        if self.log.is_some() {
            self.spill();
        }
        // No waiting for the retry time: this is the last chance.
        self.disk_error = None;
        self.flush().await;
        self.update_gauges();
        self.memory_records()
    }

    fn update_gauges(&self) {
        self.metrics
            .memory_records
            .set(self.memory_records() as i64);
        self.metrics.memory_bytes.set(self.memory_bytes() as i64);
        let (records, bytes) = self
            .log
            .as_ref()
            .map_or((0, 0), |l| (l.records(), l.bytes()));
        self.metrics.disk_records.set(records as i64);
        self.metrics.disk_bytes.set(bytes as i64);
        self.metrics.disk_available.set(i64::from(self.has_disk()));
    }
}

/// Opens the log at `dir` on a blocking thread. A directory that cannot be read is moved aside
/// and a fresh one started; one that cannot be created leaves the memory tier only.
async fn open_or_recover(
    dir: PathBuf,
    segment_bytes: u64,
    metrics: &SpoolMetrics,
) -> Result<Option<Log>, SpoolError> {
    let open = |dir: PathBuf| async move {
        let path = dir.clone();
        tokio::task::spawn_blocking(move || Log::open(&path, segment_bytes))
            .await
            .unwrap_or_else(|e| Err(OpenError::Io(std::io::Error::other(e.to_string()))))
    };
    let reason = match open(dir.clone()).await {
        Ok((log, recovery)) => {
            report(&dir, &recovery, metrics);
            return Ok(Some(log));
        }
        Err(reason @ (OpenError::InUse { .. } | OpenError::NewerFormat(_))) => {
            return Err(SpoolError { dir, reason });
        }
        Err(OpenError::Io(e)) => e,
    };
    let aside = PathBuf::from(format!(
        "{}.corrupt-{}",
        dir.display(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    ));
    let (from, to) = (dir.clone(), aside.clone());
    let moved = tokio::task::spawn_blocking(move || {
        if !from.is_dir() {
            return Err(None);
        }
        std::fs::rename(&from, &to).map_err(Some)
    })
    .await
    .unwrap_or_else(|e| Err(Some(std::io::Error::other(e.to_string()))));
    match moved {
        Ok(()) => {}
        Err(None) => {
            error!(
                spool = %dir.display(), reason = %reason,
                "Disk spool cannot be created; running with the memory tier only."
            );
            return Ok(None);
        }
        Err(Some(e)) => {
            error!(
                spool = %dir.display(), reason = %reason, error = %e,
                "Disk spool cannot be read nor moved aside; running with the memory tier only."
            );
            return Ok(None);
        }
    }
    metrics.corrupt.inc();
    error!(
        spool = %dir.display(), moved_to = %aside.display(), reason = %reason,
        "Disk spool cannot be read; moved aside for inspection (its records were not \
         delivered) and starting a fresh spool."
    );
    match open(dir.clone()).await {
        Ok((log, _)) => Ok(Some(log)),
        Err(reason @ OpenError::InUse { .. }) => Err(SpoolError { dir, reason }),
        Err(reason) => {
            error!(spool = %dir.display(), reason = %reason,
                "Fresh disk spool cannot be created; running with the memory tier only.");
            Ok(None)
        }
    }
}

/// Start-up report of what recovery found: one ERROR line for damage, one WARN line for a
/// write cut short.
fn report(dir: &std::path::Path, recovery: &log::Recovery, metrics: &SpoolMetrics) {
    if recovery.damaged > 0 {
        metrics.corrupt.inc_by(recovery.damaged);
        error!(
            spool = %dir.display(), damaged_ranges = recovery.damaged,
            damaged_bytes = recovery.damaged_bytes,
            quarantine = %dir.join("quarantine").display(),
            "Disk spool damaged: the damaged bytes are set aside in quarantine; every intact \
             record before and after them is kept and will be delivered."
        );
    }
    if recovery.torn_bytes > 0 {
        warn!(
            spool = %dir.display(), bytes = recovery.torn_bytes,
            "Disk spool: cut off a write interrupted by a crash (never acknowledged)."
        );
    }
    if let Some(migrated) = &recovery.migrated
        && migrated.unreadable > 0
    {
        metrics.corrupt.inc_by(migrated.unreadable as u64);
    }
}

/// What a record costs in the memory tier besides its key and value: the [`Record`] itself and
/// the allocator's bookkeeping for its two buffers (about 16 bytes each with glibc).
const MEMORY_OVERHEAD_PER_RECORD: usize = std::mem::size_of::<Record>() + 2 * 16;

/// How many records, and the bytes of their keys and values: what [`Spool::has_room_for`] takes.
pub fn sizes(records: &[Record]) -> (usize, usize) {
    (records.len(), records.iter().map(Record::size).sum())
}

/// Bytes an entry of `count` records (keys and values `bytes`) takes in the memory tier.
fn memory_size(count: usize, bytes: usize) -> usize {
    count * MEMORY_OVERHEAD_PER_RECORD + bytes
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;

    use super::*;

    fn metrics() -> SpoolMetrics {
        crate::KafkaMetrics::new(&prometheus::Registry::new())
            .expect("metrics register")
            .spool
    }

    /// 100 records keyed `topic/n`, each value `value_bytes` bytes of `n`.
    fn large_entry(n: u64, value_bytes: usize) -> Vec<Record> {
        (0..100)
            .map(|i| {
                Record::new(
                    n * 100 + i,
                    format!("topic/{n}"),
                    vec![n as u8; value_bytes],
                    Instant::now(),
                )
            })
            .collect()
    }

    /// Records `from` to `from + count - 1`, valued `payload NNNNN`.
    pub(super) fn records(from: u64, count: u64) -> Vec<Record> {
        (from..from + count)
            .map(|n| {
                Record::new(
                    n,
                    format!("topic/{}", n % 3),
                    format!("payload {n:05}").into_bytes(),
                    Instant::now(),
                )
            })
            .collect()
    }

    fn config(dir: &Path, memory_bytes: usize, disk_bytes: usize) -> SpoolConfig {
        SpoolConfig {
            dir: Some(dir.join("spool")),
            memory_bytes,
            disk_bytes,
            full_policy: FullPolicy::Block,
            persist_all: false,
        }
    }

    async fn open(config: SpoolConfig) -> Spool {
        Spool::open(config, metrics()).await.expect("spool opens")
    }

    fn taken(pushed: Pushed) {
        assert_eq!(
            pushed,
            Pushed::Taken {
                dropped_oldest: 0,
                dropped_newest: 0
            }
        );
    }

    /// Pushes `batches` entries of 10 records, payloads 0 to 10 × `batches` - 1, each flushed.
    async fn push_batches(spool: &mut Spool, batches: u64) {
        for batch in 0..batches {
            taken(spool.push(records(batch * 10, 10)));
            spool.flush().await;
        }
    }

    /// Every payload in the spool, oldest first.
    pub(crate) async fn contents(spool: &mut Spool) -> Vec<String> {
        spool
            .read_after(0, usize::MAX)
            .await
            .expect("readable")
            .into_iter()
            .flat_map(|e| e.records)
            .map(|r| String::from_utf8(r.value).expect("utf-8"))
            .collect()
    }

    fn payloads(from: u64, count: u64) -> Vec<String> {
        (from..from + count)
            .map(|n| format!("payload {n:05}"))
            .collect()
    }

    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir.join("spool"))
            .expect("list")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        found.sort();
        found
    }

    #[tokio::test]
    async fn memory_spills_to_disk_and_order_holds_across_tiers() {
        let dir = tempfile::tempdir().expect("temp dir");
        let in_memory = memory_size(10, sizes(&records(0, 10)).1);
        let mut spool = open(config(dir.path(), in_memory * 2, 1 << 20)).await;
        taken(spool.push(records(0, 10)));
        taken(spool.push(records(10, 10)));
        assert!(!spool.flush().await, "two entries in memory only");
        assert_eq!(spool.front.entries.len(), 2);
        // The third does not fit: memory spills to disk ahead of it.
        taken(spool.push(records(20, 10)));
        assert!(spool.flush().await, "everything on disk");
        assert_eq!(spool.log.as_ref().map(Log::records), Some(30));
        push_batches(&mut spool, 0).await;
        taken(spool.push(records(30, 10)));
        assert!(
            spool.front.is_empty(),
            "behind the disk, never in front of it"
        );
        spool.flush().await;
        assert_eq!(contents(&mut spool).await, payloads(0, 40));
    }

    #[tokio::test]
    async fn reads_are_chunked_and_a_cursor_continues_where_the_last_ended() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut spool = open(config(dir.path(), 0, 1 << 20)).await;
        push_batches(&mut spool, 5).await;
        let first = spool.read_after(0, 25).await.expect("readable");
        assert_eq!(first.iter().map(|e| e.records.len()).sum::<usize>(), 20);
        let second = spool
            .read_after(first.last().expect("entries").id, 25)
            .await
            .expect("readable");
        assert_eq!(second.len(), 2);
        assert_eq!(second[0].records[0].value, b"payload 00020");
        // A chunk holds at least one entry, even one larger than the chunk size.
        assert_eq!(spool.read_after(0, 1).await.expect("readable").len(), 1);
    }

    #[tokio::test]
    async fn the_memory_tier_counts_what_its_entries_take_in_memory() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Room for ten records' keys and values, but not for the records around them.
        let (_, bytes) = sizes(&records(0, 10));
        let mut spool = open(config(dir.path(), bytes, 1 << 20)).await;
        taken(spool.push(records(0, 10)));
        assert!(spool.front.is_empty(), "the overhead was not counted");

        let mut spool = open(SpoolConfig {
            dir: None,
            ..config(dir.path(), 1 << 20, 0)
        })
        .await;
        let mut batch = Vec::with_capacity(1000);
        batch.extend(records(0, 10));
        taken(spool.push(batch));
        let entry = spool.front.entries.front().expect("kept in memory");
        assert_eq!(
            entry.records.capacity(),
            10,
            "a batch keeps only what it holds"
        );
    }

    #[tokio::test]
    async fn a_full_spool_holds_under_block_and_drops_under_the_drop_policies() {
        let dir = tempfile::tempdir().expect("temp dir");
        let on_disk = frame::frame_size(10, sizes(&records(0, 10)).1);
        let mut spool = open(config(dir.path(), 0, on_disk * 2)).await;
        push_batches(&mut spool, 2).await;
        let (count, bytes) = sizes(&records(0, 10));
        assert!(!spool.has_room_for(count, bytes));
        let Pushed::Held(back) = spool.push(records(20, 10)) else {
            panic!("a full spool under block takes nothing");
        };
        assert_eq!(back.len(), 10);

        let mut newest = open(SpoolConfig {
            full_policy: FullPolicy::DropNewest,
            dir: Some(dir.path().join("newest")),
            ..config(dir.path(), 0, on_disk * 2)
        })
        .await;
        push_batches(&mut newest, 2).await;
        assert_eq!(
            newest.push(records(20, 10)),
            Pushed::Taken {
                dropped_oldest: 0,
                dropped_newest: 10
            }
        );
        assert_eq!(contents(&mut newest).await, payloads(0, 20));
    }

    #[tokio::test]
    async fn drop_oldest_drops_whole_segments_from_the_front() {
        let dir = tempfile::tempdir().expect("temp dir");
        // 64 KiB segments (the smallest); entries of 100 records of 1 KB: one per segment.
        let entry = |n| large_entry(n, 1000);
        let one = frame::frame_size(100, sizes(&entry(0)).1);
        let mut spool = open(SpoolConfig {
            full_policy: FullPolicy::DropOldest,
            ..config(dir.path(), 0, one * 3)
        })
        .await;
        for n in 0..3 {
            taken(spool.push(entry(n)));
            spool.flush().await;
        }
        assert_eq!(
            spool.push(entry(3)),
            Pushed::Taken {
                dropped_oldest: 100,
                dropped_newest: 0
            }
        );
        spool.flush().await;
        let kept: Vec<u8> = spool
            .read_after(0, usize::MAX)
            .await
            .expect("readable")
            .iter()
            .map(|e| e.records[0].value[0])
            .collect();
        assert_eq!(kept, [1, 2, 3]);
        assert_eq!(spool.records(), 300);
    }

    #[tokio::test]
    async fn spool_replays_only_undelivered_records_after_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut spool = open(config(dir.path(), 0, 1 << 20)).await;
            push_batches(&mut spool, 3).await;
            let first = spool.read_after(0, 10).await.expect("readable");
            spool.remove_through(first[0].id).await;
            assert_eq!(spool.records(), 20);
        }
        let mut reopened = open(config(dir.path(), 0, 1 << 20)).await;
        assert_eq!(reopened.records(), 20);
        assert_eq!(contents(&mut reopened).await, payloads(10, 20));
        // New entries are numbered after the old ones, and come after them.
        taken(reopened.push(records(30, 10)));
        reopened.flush().await;
        assert_eq!(contents(&mut reopened).await, payloads(10, 30));
    }

    #[tokio::test]
    async fn a_large_spool_spans_segments_deleted_once_delivered() {
        let dir = tempfile::tempdir().expect("temp dir");
        // 40 entries of 100 records of 10 KB: 40 MB, ten 4 MiB segments.
        let entry = |n| large_entry(n, 10_000);
        let same = |a: &[Record], b: &[Record]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(a, b)| a.mqtt_topic == b.mqtt_topic && a.value == b.value)
        };
        let config = || SpoolConfig {
            persist_all: true,
            ..config(dir.path(), 0, 1 << 30)
        };
        {
            let mut spool = open(config()).await;
            for n in 0..40 {
                taken(spool.push(entry(n)));
                assert!(spool.flush().await, "on disk");
            }
        }
        assert!(
            segments(dir.path()).len() >= 8,
            "{:?}",
            segments(dir.path())
        );
        let mut reopened = open(config()).await;
        assert_eq!(reopened.records(), 4000);
        let mut after = 0;
        for n in 0..40 {
            let chunk = reopened.read_after(after, 100).await.expect("readable");
            assert_eq!(chunk.len(), 1);
            assert!(same(&chunk[0].records, &entry(n)), "entry {n}");
            after = chunk[0].id;
            reopened.remove_through(after).await;
        }
        assert!(reopened.is_empty());
        assert!(
            segments(dir.path()).len() <= 1,
            "delivered segments deleted"
        );
    }

    #[tokio::test]
    async fn memory_tier_is_written_to_disk_at_shutdown() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut spool = open(config(dir.path(), 1 << 20, 1 << 20)).await;
            taken(spool.push(records(0, 10)));
            assert!(!spool.flush().await, "held in memory only");
            spool.push_unbounded(records(10, 5));
            assert_eq!(spool.persist_memory().await, 0);
        }
        let mut reopened = open(config(dir.path(), 1 << 20, 1 << 20)).await;
        assert_eq!(contents(&mut reopened).await, payloads(0, 15));
    }

    #[tokio::test]
    async fn persist_all_skips_the_memory_tier() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config(dir.path(), 1 << 20, 1 << 20);
        config.persist_all = true;
        let mut spool = open(config).await;
        taken(spool.push(records(0, 10)));
        assert!(spool.front.is_empty());
        assert!(spool.flush().await, "durable after the fsync");
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_write_holds_records_in_memory_until_the_disk_works_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config(dir.path(), 1 << 20, 1 << 20);
        config.persist_all = true;
        let mut spool = open(config).await;
        push_batches(&mut spool, 1).await;
        spool.fail_next_writes(2);
        taken(spool.push(records(10, 10)));
        assert!(!spool.flush().await, "not durable: the write failed");
        assert!(spool.disk_error().is_some_and(|e| e.contains("No space")));
        assert!(!spool.has_disk());
        assert_eq!(spool.metrics.disk_available.get(), 0);
        // Before the retry time nothing is tried; new records wait behind the failed ones.
        taken(spool.push(records(20, 10)));
        assert!(!spool.flush().await);
        let retry_at = spool.disk_retry_at().expect("a retry is due");
        tokio::time::sleep_until(retry_at).await;
        assert!(!spool.flush().await, "the second write fails too");
        tokio::time::sleep(DISK_RETRY).await;
        assert!(spool.flush().await, "durable once the disk works");
        assert!(spool.disk_error().is_none() && spool.disk_retry_at().is_none());
        assert_eq!(contents(&mut spool).await, payloads(0, 30));
        // And after a restart, every record is there once, in order.
        drop(spool);
        let mut reopened = open(SpoolConfig {
            persist_all: true,
            ..self::config(dir.path(), 1 << 20, 1 << 20)
        })
        .await;
        assert_eq!(contents(&mut reopened).await, payloads(0, 30));
    }

    /// Flips one byte at `offset` from the start of the first segment's frames.
    fn damage(dir: &Path, offset: usize) {
        let path = &segments(dir)[0];
        let mut bytes = std::fs::read(path).expect("read");
        bytes[16 + offset] ^= 0xff;
        std::fs::write(path, bytes).expect("write");
    }

    #[tokio::test]
    async fn damage_is_quarantined_and_records_before_and_after_it_are_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let frame_bytes = frame::frame_size(10, sizes(&records(0, 10)).1);
        {
            let mut spool = open(config(dir.path(), 0, 1 << 20)).await;
            push_batches(&mut spool, 3).await;
        }
        damage(dir.path(), frame_bytes + 40); // inside the second entry
        let metrics = metrics();
        let mut spool = Spool::open(config(dir.path(), 0, 1 << 20), metrics.clone())
            .await
            .expect("opens");
        assert_eq!(metrics.corrupt.get(), 1);
        assert_eq!(spool.records(), 20);
        assert_eq!(
            contents(&mut spool).await,
            [payloads(0, 10), payloads(20, 10)].concat()
        );
        let quarantined = std::fs::read_dir(dir.path().join("spool/quarantine"))
            .expect("quarantine")
            .count();
        assert_eq!(quarantined, 1, "kept for an operator, not deleted");
        // The segment was rewritten: the next start finds no damage.
        drop(spool);
        let again = metrics_after_open(dir.path()).await;
        assert_eq!(again, 0);
    }

    #[tokio::test]
    async fn damage_found_while_running_is_skipped_counted_and_not_counted_as_records() {
        let dir = tempfile::tempdir().expect("temp dir");
        let frame_bytes = frame::frame_size(10, sizes(&records(0, 10)).1);
        let mut spool = open(config(dir.path(), 0, 1 << 20)).await;
        push_batches(&mut spool, 3).await;
        damage(dir.path(), frame_bytes + 40);
        assert_eq!(
            contents(&mut spool).await,
            [payloads(0, 10), payloads(20, 10)].concat()
        );
        assert_eq!(spool.metrics.corrupt.get(), 1);
        assert_eq!(
            spool.records(),
            20,
            "the damaged entry is no longer counted"
        );
        let first = spool.read_after(0, 10).await.expect("readable");
        spool.remove_through(first[0].id).await;
        let rest = spool.read_after(first[0].id, 100).await.expect("readable");
        spool
            .remove_through(rest.last().expect("the third entry").id)
            .await;
        assert!(spool.is_empty());
    }

    #[tokio::test]
    async fn reading_in_windows_handles_large_entries_and_damage_at_a_window_edge() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Entries of 100 KB (frames cross every 1 MiB window edge) and one of 3 MB (larger
        // than a window), all in one segment of the 4 MiB kind.
        let sizes_written: Vec<usize> = (0..30)
            .map(|n| if n == 12 { 30_000 } else { 1_000 })
            .collect();
        let mut spool = open(SpoolConfig {
            persist_all: true,
            ..config(dir.path(), 0, 1 << 30)
        })
        .await;
        for (n, size) in sizes_written.iter().enumerate() {
            taken(spool.push(large_entry(n as u64, *size)));
            assert!(spool.flush().await);
        }
        // Which entries a read returned: each one's values are its number.
        let numbers = |entries: Vec<Entry>| -> Vec<u8> {
            entries.iter().map(|e| e.records[0].value[0]).collect()
        };
        let first = numbers(spool.read_after(0, usize::MAX).await.expect("readable"));
        assert_eq!(first, (0..30).collect::<Vec<u8>>());
        // Damage the entry that crosses the first window edge (1 MiB) and the large one.
        let path = segments(dir.path())[0].clone();
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[(1 << 20) + 10] ^= 0xff;
        bytes[1_300_000 + 1_500_000] ^= 0xff;
        std::fs::write(&path, bytes).expect("write");
        let read = numbers(spool.read_after(0, usize::MAX).await.expect("readable"));
        let expected: Vec<u8> = (0..30).filter(|n| *n != 10 && *n != 12).collect();
        assert_eq!(
            read, expected,
            "entries 10 (across 1 MiB) and 12 (the large one)"
        );
        assert_eq!(spool.metrics.corrupt.get(), 2);
        drop(spool);
        let mut reopened = open(SpoolConfig {
            persist_all: true,
            ..config(dir.path(), 0, 1 << 30)
        })
        .await;
        assert_eq!(
            numbers(reopened.read_after(0, usize::MAX).await.expect("readable")),
            expected
        );
    }

    async fn metrics_after_open(dir: &Path) -> u64 {
        let metrics = metrics();
        let spool = Spool::open(config(dir, 0, 1 << 20), metrics.clone())
            .await
            .expect("opens");
        drop(spool);
        metrics.corrupt.get()
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_not_counted_as_damage() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut spool = open(config(dir.path(), 0, 1 << 20)).await;
            push_batches(&mut spool, 3).await;
        }
        let path = segments(dir.path())[0].clone();
        let length = std::fs::metadata(&path).expect("stat").len();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_len(length - 30).expect("cut");
        let metrics = metrics();
        let mut spool = Spool::open(config(dir.path(), 0, 1 << 20), metrics.clone())
            .await
            .expect("opens");
        assert_eq!(metrics.corrupt.get(), 0);
        assert_eq!(contents(&mut spool).await, payloads(0, 20));
    }

    #[tokio::test]
    async fn random_damage_never_invents_reorders_or_duplicates_records() {
        let mut rng = fastrand::Rng::with_seed(7);
        for round in 0..40 {
            let dir = tempfile::tempdir().expect("temp dir");
            {
                let mut spool = open(config(dir.path(), 0, 1 << 20)).await;
                push_batches(&mut spool, 8).await;
            }
            let path = segments(dir.path())[0].clone();
            let mut bytes = std::fs::read(&path).expect("read");
            for _ in 0..rng.usize(1..6) {
                let at = rng.usize(..bytes.len());
                bytes[at] = rng.u8(..);
            }
            if round % 3 == 0 {
                bytes.truncate(rng.usize(..bytes.len()));
            }
            std::fs::write(&path, &bytes).expect("write");
            let mut spool = open(config(dir.path(), 0, 1 << 20)).await;
            let found = contents(&mut spool).await;
            let written = payloads(0, 80);
            let mut position = 0;
            for payload in &found {
                let index = written[position..]
                    .iter()
                    .position(|p| p == payload)
                    .unwrap_or_else(|| panic!("round {round}: {payload} invented or reordered"));
                position += index + 1;
            }
            assert_eq!(spool.records(), found.len(), "round {round}");
        }
    }

    #[tokio::test]
    async fn a_spool_that_cannot_be_read_is_moved_aside_and_a_fresh_one_starts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool_dir = dir.path().join("spool");
        // A segment that is a directory cannot be read at all.
        std::fs::create_dir_all(spool_dir.join("00000000000000000001.seg")).expect("mkdir");
        let mut spool = open(config(dir.path(), 0, 1 << 20)).await;
        assert!(spool.has_disk(), "a fresh disk tier");
        assert!(spool.is_empty());
        taken(spool.push(records(0, 1)));
        assert!(spool.flush().await, "usable");
        let moved: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("spool.corrupt-"))
            .collect();
        assert_eq!(moved.len(), 1, "the unreadable spool is kept aside");
        assert_eq!(spool.metrics.corrupt.get(), 1);
    }

    #[tokio::test]
    async fn spool_dir_that_cannot_be_created_leaves_the_memory_tier() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("a-file");
        std::fs::write(&file, b"x").expect("write");
        let config = SpoolConfig {
            dir: Some(file.join("spool")),
            ..config(dir.path(), 1 << 20, 1 << 20)
        };
        let mut spool = open(config).await;
        assert!(!spool.has_disk());
        taken(spool.push(records(0, 10)));
        assert_eq!(spool.records(), 10);
    }

    #[tokio::test]
    async fn a_spool_in_use_is_refused_with_its_holders_pid_and_left_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut first = open(config(dir.path(), 0, 1 << 20)).await;
        push_batches(&mut first, 2).await;
        let before = segments(dir.path());
        let Err(refused) = Spool::open(config(dir.path(), 0, 1 << 20), metrics()).await else {
            panic!("a second spool opened on a live one");
        };
        let text = refused.to_string();
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        assert_eq!(segments(dir.path()), before, "nothing touched");
        assert_eq!(contents(&mut first).await, payloads(0, 20));
    }

    #[tokio::test]
    async fn a_spool_of_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut spool = open(config(dir.path(), 0, 1 << 20)).await;
            push_batches(&mut spool, 1).await;
        }
        let path = &segments(dir.path())[0];
        let mut bytes = std::fs::read(path).expect("read");
        bytes[8..12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32fast::hash(&bytes[..12]);
        bytes[12..16].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(path, bytes).expect("write");
        let Err(refused) = Spool::open(config(dir.path(), 0, 1 << 20), metrics()).await else {
            panic!("opened a newer format");
        };
        assert!(
            refused.to_string().contains("format version 3"),
            "{refused}"
        );
    }

    /// `fixtures/sled-spool-v1` was written by the previous release (sled): 5 entries of 10
    /// records ("sensors/N" keys, payloads 0 to 49), the first one delivered.
    #[tokio::test]
    async fn a_spool_of_the_previous_release_is_converted_at_first_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool_dir = dir.path().join("spool");
        std::fs::create_dir(&spool_dir).expect("mkdir");
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sled-spool-v1");
        for name in ["conf", "db"] {
            std::fs::copy(fixture.join(name), spool_dir.join(name)).expect("copy fixture");
        }
        let mut spool = open(config(dir.path(), 0, 1 << 20)).await;
        assert_eq!(spool.records(), 40);
        let found = spool.read_after(0, usize::MAX).await.expect("readable");
        let values: Vec<String> = found
            .iter()
            .flat_map(|e| &e.records)
            .map(|r| String::from_utf8(r.value.clone()).expect("utf-8"))
            .collect();
        let expected: Vec<String> = (10..50)
            .map(|n| format!("{{\"topic\":\"sensors/{}\",\"content\":\"{n:05}\"}}", n % 3))
            .collect();
        assert_eq!(values, expected);
        assert_eq!(found[0].records[0].mqtt_topic, "sensors/1");
        assert!(!spool_dir.join("db").exists(), "sled's files are gone");
        // Converted for good: the next start reads the new format.
        drop(spool);
        let mut again = open(config(dir.path(), 0, 1 << 20)).await;
        assert_eq!(again.records(), 40);
        assert_eq!(contents(&mut again).await.len(), 40);
    }
}
