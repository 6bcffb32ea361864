//! The outage spool: records Kafka could not take, kept in order until it can.
//!
//! # Tiers and order
//! A FIFO of *entries* (one batch of records each, numbered by a rising `id`) in two tiers:
//! memory up to `memory_bytes`, then disk up to `disk_bytes`. Every memory entry is older than
//! every disk entry: once anything is on disk, new entries go to disk until it is empty again.
//! Reading therefore takes memory first, then disk, in `id` order. With `persist_all` (the
//! at-least-once mode) entries skip memory and go straight to disk, because only fsynced
//! records may be acknowledged to the MQTT broker.
//!
//! Entries leave the spool only through [`Spool::remove_through`], after Kafka acknowledged
//! them, or through the full policy's `drop-oldest` (counted). A drain that fails halfway leaves
//! everything in place.
//!
//! # On disk
//! A sled database in `SPOOL_DIR`, tree `batches`: key = entry id as 8 big-endian bytes (so
//! sled's order is spool order), value =
//! `"MKB1"` · record count (u32 LE) · per record: key length (u32 LE), key, value length
//! (u32 LE), value · CRC-32 of everything before it (u32 LE).
//! Inserts are not durable until [`Spool::flush`] (sled's `flush_async`, an fsync); the Kafka
//! task flushes after each group of inserts and only then acknowledges their messages.
//! sled's page cache is capped at 2 MiB and its background flushing is off.
//!
//! # Memory
//! The memory tier counts what its entries take: each record's key and value, plus the
//! [`Record`] itself and the allocator's bookkeeping for its two buffers (about 100 bytes a
//! record), and an entry's vector is shrunk to its records (the batcher sizes it for a full
//! batch). Before both, a 300,000-message QoS 0 outage at 10,000 msg/s reached 253 MB of heap
//! (heaptrack's peak) with a 32 MiB tier, mostly vectors sized for 1,000 records that held
//! about 50; after, 80 MB.
//!
//! sled keeps in memory every page it has touched, whatever its cache limit: its LRU evicts
//! only after 64 accesses in one of 256 shards, which a spool of large entries hardly reaches
//! (measured: 360 MB spooled, 349 MB resident). So after every [`RECYCLE_BYTES`] written or
//! read, the disk tier flushes, closes the database and opens it again, which empties the
//! cache. Opening scans sled's log, about 1 ms per MB on disk here; the start-up count is done
//! in steps of the same size.
//!
//! # Recovery
//! At start-up the spool opens what a previous run left, counts it, and the Kafka task drains it
//! before new traffic. Damage never stops the bridge and is never silent:
//! - a database sled cannot open (garbage, truncated files, or a panic inside sled) is moved
//!   aside to `SPOOL_DIR.corrupt-<unix time>` for an operator, logged as an error, and a fresh
//!   spool is started;
//! - an entry whose header or checksum is wrong is moved to the `quarantine` tree of the same
//!   database, counted in `bridge_spool_corrupt_entries_total` and logged;
//! - a directory that cannot be created or opened at all, and a failed write or fsync (disk
//!   full), leave the bridge with the memory tier only, logged as an error; the disk is tried
//!   again at the next start.

use std::collections::VecDeque;
use std::ops::Bound;
use std::path::{Path, PathBuf};

use mkb_bridge::Record;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::metrics::SpoolMetrics;

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

/// See the module documentation.
pub struct Spool {
    config: SpoolConfig,
    metrics: SpoolMetrics,
    memory: VecDeque<Entry>,
    memory_bytes: usize,
    disk: Option<Disk>,
    next_id: u64,
}

struct Disk {
    dir: PathBuf,
    db: sled::Db,
    batches: sled::Tree,
    quarantine: sled::Tree,
    bytes: usize,
    records: usize,
    /// Inserts since the last fsync.
    dirty: bool,
    /// Bytes written or read since the database was opened.
    touched: usize,
}

const MAGIC: &[u8; 4] = b"MKB1";
const SLED_CACHE_BYTES: u64 = 2 * 1024 * 1024;
/// Bytes written or read after which the disk tier reopens its database; see "Memory" above.
pub const RECYCLE_BYTES: usize = 8 * 1024 * 1024;
/// How long a reopen waits for sled's threads to release the previous instance's file lock.
const REOPEN_PATIENCE: std::time::Duration = std::time::Duration::from_secs(10);

impl Spool {
    /// Opens the spool, recovering what a previous run left on disk. Never fails: damage is
    /// handled as the module documentation says.
    pub async fn open(config: SpoolConfig, metrics: SpoolMetrics) -> Self {
        let disk = match &config.dir {
            Some(dir) if config.disk_bytes > 0 => {
                Disk::open_or_recover(dir.clone(), &metrics).await
            }
            _ => None,
        };
        let next_id = disk
            .as_ref()
            .and_then(|d| d.batches.last().ok().flatten())
            .map_or(1, |(key, _)| id_of(&key) + 1);
        let spool = Self {
            config,
            metrics,
            memory: VecDeque::new(),
            memory_bytes: 0,
            disk,
            next_id,
        };
        spool.update_gauges();
        if let Some(disk) = &spool.disk
            && disk.records > 0
        {
            info!(
                records = disk.records,
                bytes = disk.bytes,
                "Disk spool from a previous run found; it drains before new traffic."
            );
        }
        spool
    }

    pub fn is_empty(&self) -> bool {
        self.memory.is_empty() && self.disk.as_ref().is_none_or(|d| d.records == 0)
    }

    /// Records held in both tiers.
    pub fn records(&self) -> usize {
        self.memory.iter().map(|e| e.records.len()).sum::<usize>()
            + self.disk.as_ref().map_or(0, |d| d.records)
    }

    /// Whether an entry of `count` records whose keys and values hold `bytes` would fit in
    /// either tier now.
    pub fn has_room_for(&self, count: usize, bytes: usize) -> bool {
        self.fits_memory(memory_size(count, bytes)) || self.fits_disk(disk_size(count, bytes))
    }

    /// Whether the disk tier is in use (open and not failed).
    pub fn has_disk(&self) -> bool {
        self.disk.is_some()
    }

    fn fits_memory(&self, bytes: usize) -> bool {
        !self.config.persist_all
            && self.disk.as_ref().is_none_or(|d| d.records == 0)
            && self.memory_bytes + bytes <= self.config.memory_bytes
    }

    fn fits_disk(&self, bytes: usize) -> bool {
        self.disk
            .as_ref()
            .is_some_and(|d| d.bytes + bytes <= self.config.disk_bytes)
    }

    /// Appends `records` as one entry. Hands them back when there is no room (the caller
    /// applies the full policy). With `persist_all` and no usable disk, memory takes them:
    /// nothing acknowledges them until Kafka has them.
    pub fn push(&mut self, records: Vec<Record>) -> Result<(), Vec<Record>> {
        if records.is_empty() {
            return Ok(());
        }
        let (count, bytes) = sizes(&records);
        let (in_memory, on_disk) = (memory_size(count, bytes), disk_size(count, bytes));
        let memory_room = self.memory_bytes + in_memory <= self.config.memory_bytes;
        let to_disk = if self.config.persist_all {
            match (self.fits_disk(on_disk), self.disk.is_none() && memory_room) {
                (true, _) => true,
                (false, true) => false,
                (false, false) => return Err(records),
            }
        } else if self.fits_memory(in_memory) {
            false
        } else if self.fits_disk(on_disk) {
            true
        } else {
            return Err(records);
        };
        let id = self.next_id;
        if to_disk {
            let disk = self.disk.as_mut().expect("fits_disk checked the disk tier");
            if let Err(e) = disk.insert(id, &records) {
                self.disk_failed("write", &e);
                return self.push(records);
            }
        } else {
            self.keep_in_memory(id, records, in_memory);
        }
        self.next_id += 1;
        self.metrics.spooled.inc_by(count as u64);
        self.update_gauges();
        Ok(())
    }

    /// Makes every insert so far durable (fsync). Returns whether everything spooled is now
    /// on disk, i.e. nothing is held in memory only.
    pub async fn flush(&mut self) -> bool {
        if let Some(disk) = &mut self.disk
            && disk.dirty
        {
            let started = Instant::now();
            match disk.db.flush_async().await {
                Ok(_) => {
                    disk.dirty = false;
                    self.metrics.fsync.observe(started.elapsed().as_secs_f64());
                }
                Err(e) => self.disk_failed("fsync", &e),
            }
        }
        self.recycle_if_due().await;
        self.memory.is_empty() && self.disk.is_some()
    }

    /// Closes and reopens the database once [`RECYCLE_BYTES`] were written or read since it
    /// was opened, which frees what sled keeps of them in memory. Flushes first.
    pub async fn recycle_if_due(&mut self) {
        // Pages sled replaced on this thread wait in its epoch garbage until collected.
        crossbeam_epoch::pin().flush();
        let Some(disk) = self.disk.take_if(|d| d.touched >= RECYCLE_BYTES) else {
            return;
        };
        let records = disk.records;
        let reopened = tokio::task::spawn_blocking(move || disk.reopen()).await;
        match reopened {
            Ok(Ok(disk)) => self.disk = Some(disk),
            Ok(Err(reason)) => error!(
                reason = %reason, records_on_disk = records,
                "Disk spool cannot be reopened; continuing with the memory tier only. \
                 Records already on disk stay there for the next start."
            ),
            Err(_panicked) => error!(
                records_on_disk = records,
                "sled panicked while reopening the disk spool; continuing with the memory \
                 tier only. Records already on disk stay there for the next start."
            ),
        }
        self.update_gauges();
    }

    /// The oldest entries after entry `after` (0 for the very first), up to `max_records`
    /// records in all but at least one entry. Corrupt disk entries met on the way are moved to
    /// quarantine and skipped.
    pub fn read_after(&mut self, after: u64, max_records: usize) -> Vec<Entry> {
        let mut chunk = Vec::new();
        let mut total = 0;
        for entry in self.memory.iter().filter(|e| e.id > after) {
            if total > 0 && total + entry.records.len() > max_records {
                return chunk;
            }
            total += entry.records.len();
            chunk.push(entry.clone());
        }
        let Some(disk) = &mut self.disk else {
            return chunk;
        };
        let mut corrupt = Vec::new();
        for item in disk
            .batches
            .range((Bound::Excluded(after.to_be_bytes()), Bound::Unbounded))
        {
            let (key, value) = match item {
                Ok(item) => item,
                Err(e) => {
                    error!(error = %e, "Cannot read the disk spool; will try again.");
                    break;
                }
            };
            let id = id_of(&key);
            disk.touched += value.len();
            match decode(&value) {
                Some(records) => {
                    if total > 0 && total + records.len() > max_records {
                        break;
                    }
                    total += records.len();
                    chunk.push(Entry { id, records });
                }
                None => corrupt.push((key, value)),
            }
            if total >= max_records {
                break;
            }
        }
        for (key, value) in corrupt {
            self.quarantine(&key, &value);
        }
        chunk
    }

    /// Forgets every entry up to and including `id` (delivered to Kafka).
    pub fn remove_through(&mut self, id: u64) {
        let removed = self.remove_entries_through(id);
        self.metrics.drained.inc_by(removed as u64);
        self.update_gauges();
    }

    /// Removes entries up to and including `id`; returns their records.
    fn remove_entries_through(&mut self, id: u64) -> usize {
        let mut removed = 0;
        while self.memory.front().is_some_and(|e| e.id <= id) {
            let entry = self.memory.pop_front().expect("front exists");
            self.memory_bytes -= memory_entry_size(&entry.records);
            removed += entry.records.len();
        }
        if let Some(disk) = &mut self.disk {
            let mut keys = Vec::new();
            for item in disk.batches.range(..=id.to_be_bytes()) {
                match item {
                    Ok((key, value)) => keys.push((key, value)),
                    Err(e) => {
                        error!(error = %e, "Cannot read the disk spool while removing.");
                        break;
                    }
                }
            }
            for (key, value) in keys {
                if let Err(e) = disk.batches.remove(&key) {
                    error!(error = %e, "Cannot remove a delivered entry from the disk spool.");
                    break;
                }
                removed += disk.removed(&value);
            }
        }
        removed
    }

    /// Drops the oldest entry (full policy `drop-oldest`); returns how many records it held.
    pub fn drop_oldest(&mut self) -> usize {
        if let Some(id) = self.memory.front().map(|e| e.id) {
            let count = self.remove_entries_through(id);
            self.update_gauges();
            return count;
        }
        let Some(disk) = &mut self.disk else {
            return 0;
        };
        match disk.batches.pop_min() {
            Ok(Some((_, value))) => {
                let count = disk.removed(&value);
                self.update_gauges();
                count
            }
            Ok(None) => 0,
            Err(e) => {
                self.disk_failed("drop", &e);
                0
            }
        }
    }

    /// Appends records whatever the quotas say: at shutdown (they have nowhere else to go), and
    /// for a batch larger than the whole spool, let in alone into an empty spool.
    pub fn push_unbounded(&mut self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.metrics.spooled.inc_by(records.len() as u64);
        let on_disk = self.memory.is_empty()
            && self
                .disk
                .as_mut()
                .is_some_and(|disk| disk.insert(id, &records).is_ok());
        if !on_disk {
            let bytes = memory_entry_size(&records);
            self.keep_in_memory(id, records, bytes);
        }
        self.update_gauges();
    }

    /// Appends an entry of `bytes` (its [`memory_entry_size`]) to the memory tier. The batch's
    /// vector was sized for a full batch: shrunk to what it holds, so that what the tier counts
    /// is what it takes.
    fn keep_in_memory(&mut self, id: u64, mut records: Vec<Record>, bytes: usize) {
        records.shrink_to_fit();
        self.memory_bytes += bytes;
        self.memory.push_back(Entry { id, records });
    }

    /// At shutdown: writes the memory tier to disk (ignoring the disk quota: these records have
    /// nowhere else to go) and fsyncs. Returns the records that could not be saved.
    pub async fn persist_memory(&mut self) -> usize {
        let Some(disk) = &mut self.disk else {
            return self.memory.iter().map(|e| e.records.len()).sum();
        };
        while let Some(entry) = self.memory.pop_front() {
            let bytes = memory_entry_size(&entry.records);
            if let Err(e) = disk.insert(entry.id, &entry.records) {
                error!(error = %e, "Cannot write the memory spool to disk at shutdown.");
                self.memory.push_front(entry);
                break;
            }
            self.memory_bytes -= bytes;
        }
        self.flush().await;
        self.update_gauges();
        self.memory.iter().map(|e| e.records.len()).sum()
    }

    fn quarantine(&mut self, key: &[u8], value: &[u8]) {
        let Some(disk) = &mut self.disk else { return };
        error!(
            entry = id_of(key),
            bytes = value.len(),
            "Corrupt entry in the disk spool (bad header or checksum); moved to quarantine."
        );
        self.metrics.corrupt.inc();
        let moved = disk
            .quarantine
            .insert(key, value)
            .and_then(|_| disk.batches.remove(key));
        if let Err(e) = moved {
            error!(error = %e, "Cannot quarantine the corrupt entry.");
        }
        disk.removed(value);
        self.update_gauges();
    }

    /// A write or fsync failed (disk full, I/O error): stop using the disk until restart.
    fn disk_failed(&mut self, what: &str, error: &sled::Error) {
        if let Some(disk) = self.disk.take() {
            error!(
                error = %error, records_on_disk = disk.records,
                "Disk spool {what} failed; continuing with the memory tier only. \
                 Records already on disk stay there for the next start."
            );
        }
        self.update_gauges();
    }

    fn update_gauges(&self) {
        self.metrics
            .memory_records
            .set(self.memory.iter().map(|e| e.records.len()).sum::<usize>() as i64);
        self.metrics.memory_bytes.set(self.memory_bytes as i64);
        let (records, bytes) = self.disk.as_ref().map_or((0, 0), |d| (d.records, d.bytes));
        self.metrics.disk_records.set(records as i64);
        self.metrics.disk_bytes.set(bytes as i64);
        self.metrics
            .disk_available
            .set(i64::from(self.disk.is_some()));
    }
}

impl Disk {
    /// Writes an entry; durable only after the next flush.
    fn insert(&mut self, id: u64, records: &[Record]) -> sled::Result<()> {
        let value = encode(records);
        let bytes = value.len();
        self.batches.insert(id.to_be_bytes(), value)?;
        self.bytes += bytes;
        self.records += records.len();
        self.dirty = true;
        self.touched += bytes;
        Ok(())
    }

    /// Accounts for an entry's value that left the tree; returns its record count.
    fn removed(&mut self, value: &[u8]) -> usize {
        let records = record_count(value).unwrap_or(0);
        self.bytes = self.bytes.saturating_sub(value.len());
        self.records = self.records.saturating_sub(records);
        self.dirty = true;
        self.touched += value.len();
        records
    }

    /// Opens the database at `dir` with empty counts.
    fn open(dir: PathBuf) -> sled::Result<Self> {
        let db = sled::Config::new()
            .path(&dir)
            .cache_capacity(SLED_CACHE_BYTES)
            .flush_every_ms(None)
            .open()?;
        let batches = db.open_tree("batches")?;
        let quarantine = db.open_tree("quarantine")?;
        Ok(Self {
            dir,
            db,
            batches,
            quarantine,
            bytes: 0,
            records: 0,
            dirty: false,
            touched: 0,
        })
    }

    /// Flushes, closes the database and opens it again, keeping the counts: this empties
    /// sled's cache (see "Memory" in the module documentation).
    fn reopen(self) -> Result<Self, String> {
        let Self {
            dir,
            db,
            batches,
            quarantine,
            bytes,
            records,
            ..
        } = self;
        db.flush().map_err(|e| e.to_string())?;
        drop((batches, quarantine, db));
        release_sled_garbage();
        let reopened =
            Self::open_when_unlocked(&dir, REOPEN_PATIENCE).map_err(|e| e.to_string())?;
        Ok(Self {
            bytes,
            records,
            ..reopened
        })
    }

    /// Opens the database at `dir`, waiting up to `patience` while another instance still
    /// holds its file lock: after a close, sled's background jobs (a log write, a file
    /// truncation) can keep the old instance alive for a moment.
    fn open_when_unlocked(dir: &Path, patience: std::time::Duration) -> sled::Result<Self> {
        let deadline = std::time::Instant::now() + patience;
        loop {
            match Self::open(dir.to_path_buf()) {
                Err(sled::Error::Io(e))
                    if is_lock_conflict(&e) && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }

    /// Opens the database at `dir`; on damage moves it aside and starts a fresh one.
    async fn open_or_recover(dir: PathBuf, metrics: &SpoolMetrics) -> Option<Self> {
        match open_blocking(dir.clone()).await {
            Ok(disk) => return Some(disk),
            Err(reason) if dir.is_dir() => {
                let aside = PathBuf::from(format!(
                    "{}.corrupt-{}",
                    dir.display(),
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs())
                ));
                match std::fs::rename(&dir, &aside) {
                    Ok(()) => {
                        metrics.corrupt.inc();
                        error!(
                            spool = %dir.display(), moved_to = %aside.display(), reason = %reason,
                            "Disk spool cannot be opened; moved aside for inspection (its \
                             records were not delivered) and starting a fresh spool."
                        );
                    }
                    Err(e) => {
                        error!(
                            spool = %dir.display(), reason = %reason, error = %e,
                            "Disk spool cannot be opened nor moved aside; running with the \
                             memory tier only."
                        );
                        return None;
                    }
                }
            }
            Err(reason) => {
                error!(
                    spool = %dir.display(), reason = %reason,
                    "Disk spool cannot be created; running with the memory tier only."
                );
                return None;
            }
        }
        match open_blocking(dir.clone()).await {
            Ok(disk) => Some(disk),
            Err(reason) => {
                error!(spool = %dir.display(), reason = %reason,
                    "Fresh disk spool cannot be created; running with the memory tier only.");
                None
            }
        }
    }
}

/// Opens and scans the database on a blocking thread, turning a panic inside sled into an error.
async fn open_blocking(dir: PathBuf) -> Result<Disk, String> {
    let opened = tokio::task::spawn_blocking(move || open_and_scan(&dir)).await;
    match opened {
        Ok(result) => result,
        Err(e) if e.is_panic() => Err("sled panicked while opening it".to_owned()),
        Err(e) => Err(e.to_string()),
    }
}

fn open_and_scan(dir: &Path) -> Result<Disk, String> {
    let mut disk = Disk::open(dir.to_path_buf()).map_err(|e| e.to_string())?;
    // Counted in steps of RECYCLE_BYTES, reopening in between, so that a large spool left by
    // a previous run is never all in memory at once.
    let mut after: Option<sled::IVec> = None;
    loop {
        let mut bad = Vec::new();
        let mut last = None;
        let mut scanned = 0;
        let range = match &after {
            Some(key) => disk
                .batches
                .range::<&[u8], _>((Bound::Excluded(key.as_ref()), Bound::Unbounded)),
            None => disk.batches.iter(),
        };
        for item in range {
            let (key, value) = item.map_err(|e| e.to_string())?;
            scanned += value.len();
            match record_count(&value) {
                Some(count) if key.len() == 8 => {
                    disk.bytes += value.len();
                    disk.records += count;
                }
                _ => bad.push((key.clone(), value)),
            }
            last = Some(key);
            if scanned >= RECYCLE_BYTES {
                break;
            }
        }
        for (key, value) in bad {
            warn!(
                bytes = value.len(),
                "Disk spool entry with a bad header; moved to quarantine."
            );
            disk.quarantine
                .insert(&key, value)
                .map_err(|e| e.to_string())?;
            disk.batches.remove(&key).map_err(|e| e.to_string())?;
        }
        if scanned < RECYCLE_BYTES {
            return Ok(disk);
        }
        after = last;
        disk = disk.reopen()?;
    }
}

/// Frees what a closed sled instance left for crossbeam-epoch to collect: its cached pages,
/// and often the handle that holds its file lock. sled defers those frees to the thread that
/// dropped the last reference, which would otherwise run them only the next time it uses sled.
fn release_sled_garbage() {
    // Garbage is freed once the global epoch has moved on twice; each flush tries one step.
    for _ in 0..4 {
        crossbeam_epoch::pin().flush();
    }
}

/// Whether opening failed only because another instance holds the database's file lock.
/// sled reports that as an `Other` I/O error whose text names the lock.
fn is_lock_conflict(e: &std::io::Error) -> bool {
    e.to_string().contains("could not acquire lock")
}

fn id_of(key: &[u8]) -> u64 {
    key.try_into().map_or(0, u64::from_be_bytes)
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

/// Bytes of the same entry encoded for disk: magic, record count and CRC, two lengths a record.
fn disk_size(count: usize, bytes: usize) -> usize {
    MAGIC.len() + 8 + count * 8 + bytes
}

/// Bytes an entry takes in the memory tier.
fn memory_entry_size(records: &[Record]) -> usize {
    let (count, bytes) = sizes(records);
    memory_size(count, bytes)
}

/// Bytes an entry takes on disk.
fn entry_size(records: &[Record]) -> usize {
    let (count, bytes) = sizes(records);
    disk_size(count, bytes)
}

fn encode(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entry_size(records));
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for record in records {
        out.extend_from_slice(&(record.key.len() as u32).to_le_bytes());
        out.extend_from_slice(record.key.as_bytes());
        out.extend_from_slice(&(record.value.len() as u32).to_le_bytes());
        out.extend_from_slice(&record.value);
    }
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// The record count from an entry's header, `None` when the header is not ours.
fn record_count(value: &[u8]) -> Option<usize> {
    if value.len() < MAGIC.len() + 8 || &value[..4] != MAGIC {
        return None;
    }
    let count = u32::from_le_bytes(value[4..8].try_into().ok()?);
    Some(count as usize)
}

fn decode(value: &[u8]) -> Option<Vec<Record>> {
    let count = record_count(value)?;
    let (body, crc) = value.split_at(value.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let mut rest = &body[8..];
    let take = |rest: &mut &[u8]| -> Option<Vec<u8>> {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let bytes = rest.get(4..4 + len)?.to_vec();
        *rest = &rest[4 + len..];
        Some(bytes)
    };
    let loaded_at = Instant::now();
    let mut records = Vec::with_capacity(count);
    for _ in 0..count {
        let key = String::from_utf8(take(&mut rest)?).ok()?;
        let value = take(&mut rest)?;
        records.push(Record {
            seq: 0,
            key,
            value,
            received_at: loaded_at,
        });
    }
    rest.is_empty().then_some(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> SpoolMetrics {
        crate::KafkaMetrics::new(&prometheus::Registry::new())
            .expect("metrics register")
            .spool
    }

    fn records(from: u64, count: u64) -> Vec<Record> {
        (from..from + count)
            .map(|n| Record {
                seq: n,
                key: format!("topic/{}", n % 3),
                value: format!("payload {n:05}").into_bytes(),
                received_at: Instant::now(),
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

    /// Pushes `batches` entries of 10 records: payloads 0 to 10 × `batches` - 1.
    fn push_batches(spool: &mut Spool, batches: u64) {
        for batch in 0..batches {
            spool.push(records(batch * 10, 10)).expect("room");
        }
    }

    /// Every payload in the spool, oldest first.
    fn contents(spool: &mut Spool) -> Vec<String> {
        spool
            .read_after(0, usize::MAX)
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

    #[test]
    fn reopening_waits_while_the_old_instance_still_holds_the_lock() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("spool");
        let old = Disk::open(path.clone()).expect("first instance");
        let released = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(old);
        });
        let started = std::time::Instant::now();
        let reopened = Disk::open_when_unlocked(&path, std::time::Duration::from_secs(10));
        assert!(reopened.is_ok(), "{:?}", reopened.err());
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));
        released.join().expect("releasing thread");
        // Without patience, a held lock is an error, not a wait.
        let Err(held) = Disk::open(path.clone()) else {
            panic!("opened a database another instance holds");
        };
        assert!(
            matches!(held, sled::Error::Io(ref e) if is_lock_conflict(e)),
            "{held:?}"
        );
        drop(reopened);
    }

    #[tokio::test]
    async fn entries_come_back_in_order_across_memory_and_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let in_memory = memory_entry_size(&records(0, 10));
        let mut spool = Spool::open(config(dir.path(), in_memory * 2, 1 << 20), metrics()).await;
        push_batches(&mut spool, 6);
        assert_eq!(spool.memory.len(), 2, "memory takes the first two");
        assert_eq!(spool.disk.as_ref().map(|d| d.records), Some(40));
        assert_eq!(contents(&mut spool), payloads(0, 60));

        // Memory frees up, but new entries still go behind the disk ones.
        let first_two = spool.read_after(0, 20);
        spool.remove_through(first_two.last().expect("entries").id);
        spool.push(records(60, 10)).expect("room");
        assert!(spool.memory.is_empty());
        assert_eq!(contents(&mut spool), payloads(20, 50));
    }

    #[tokio::test]
    async fn reads_are_chunked_and_a_cursor_continues_where_the_last_ended() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut spool = Spool::open(config(dir.path(), 0, 1 << 20), metrics()).await;
        push_batches(&mut spool, 5);
        let first = spool.read_after(0, 25);
        assert_eq!(first.iter().map(|e| e.records.len()).sum::<usize>(), 20);
        let second = spool.read_after(first.last().expect("entries").id, 25);
        assert_eq!(second.len(), 2);
        assert_eq!(second[0].records[0].value, b"payload 00020");
        // A chunk holds at least one entry, even one larger than the chunk size.
        assert_eq!(spool.read_after(0, 1).len(), 1);
    }

    #[tokio::test]
    async fn the_memory_tier_counts_what_its_entries_take_in_memory() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Room for ten records' keys and values, but not for the records around them.
        let (_, bytes) = sizes(&records(0, 10));
        let mut spool = Spool::open(config(dir.path(), bytes, 1 << 20), metrics()).await;
        spool.push(records(0, 10)).expect("room on disk");
        assert!(spool.memory.is_empty(), "the overhead was not counted");

        let mut spool = Spool::open(config(dir.path(), 1 << 20, 0), metrics()).await;
        let mut batch = Vec::with_capacity(1000);
        batch.extend(records(0, 10));
        spool.push(batch).expect("room in memory");
        let entry = spool.memory.front().expect("kept in memory");
        assert_eq!(
            entry.records.capacity(),
            10,
            "a batch keeps only what it holds"
        );
    }

    #[tokio::test]
    async fn full_spool_hands_records_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (in_memory, on_disk) = (
            memory_entry_size(&records(0, 10)),
            entry_size(&records(0, 10)),
        );
        let mut spool = Spool::open(config(dir.path(), in_memory, on_disk * 2), metrics()).await;
        push_batches(&mut spool, 3);
        let (count, bytes) = sizes(&records(0, 10));
        assert!(!spool.has_room_for(count, bytes));
        let back = spool.push(records(30, 10)).expect_err("full");
        assert_eq!(back.len(), 10);
        // As drop-oldest does: drop until there is room. Freeing memory is not enough while
        // older entries sit on disk (new ones must go behind them), so two entries go.
        let mut dropped = 0;
        let (count, bytes) = sizes(&back);
        while !spool.has_room_for(count, bytes) {
            dropped += spool.drop_oldest();
        }
        assert_eq!(dropped, 20);
        spool.push(back).expect("room after dropping the oldest");
        assert_eq!(contents(&mut spool), payloads(20, 20));
    }

    #[tokio::test]
    async fn spool_replays_records_after_restart() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut spool = Spool::open(config(dir.path(), 0, 1 << 20), metrics()).await;
            push_batches(&mut spool, 3);
            let first = spool.read_after(0, 10);
            spool.remove_through(first[0].id);
            assert!(spool.flush().await, "all on disk");
        }
        let mut reopened = Spool::open(config(dir.path(), 0, 1 << 20), metrics()).await;
        assert_eq!(reopened.records(), 20);
        assert_eq!(contents(&mut reopened), payloads(10, 20));
        // New entries are numbered after the old ones.
        reopened.push(records(30, 10)).expect("room");
        assert_eq!(contents(&mut reopened), payloads(10, 30));
    }

    #[tokio::test]
    async fn a_large_spool_reopens_its_database_and_keeps_every_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        // 40 entries of 100 records of 10 KB: 40 MB, more than two RECYCLE_BYTES.
        let entry = |n: u64| -> Vec<Record> {
            (0..100)
                .map(|i| Record {
                    seq: 0,
                    key: format!("topic/{n}"),
                    value: vec![(n * 100 + i) as u8; 10_000],
                    received_at: Instant::now(),
                })
                .collect()
        };
        // Key and value only, and an assertion that does not print 10 KB values.
        let same = |a: &[Record], b: &[Record]| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(a, b)| a.key == b.key && a.value == b.value)
        };
        let config = || SpoolConfig {
            persist_all: true,
            ..config(dir.path(), 0, 1 << 30)
        };
        {
            let mut spool = Spool::open(config(), metrics()).await;
            for n in 0..40 {
                spool.push(entry(n)).expect("room");
                assert!(spool.flush().await, "on disk");
                let touched = spool.disk.as_ref().expect("disk tier").touched;
                assert!(touched < RECYCLE_BYTES, "reopened after {touched} bytes");
            }
            let chunk = spool.read_after(0, 100);
            assert!(same(&chunk[0].records, &entry(0)));
        }
        // The start-up count runs in steps with reopens in between.
        let mut reopened = Spool::open(config(), metrics()).await;
        assert_eq!(reopened.records(), 4000);
        let mut after = 0;
        for n in 0..40 {
            let chunk = reopened.read_after(after, 100);
            assert_eq!(chunk.len(), 1);
            assert!(same(&chunk[0].records, &entry(n)), "entry {n}");
            after = chunk[0].id;
            reopened.remove_through(after);
            reopened.recycle_if_due().await;
        }
        assert!(reopened.is_empty());
    }

    #[tokio::test]
    async fn memory_tier_is_written_to_disk_at_shutdown() {
        let dir = tempfile::tempdir().expect("temp dir");
        {
            let mut spool = Spool::open(config(dir.path(), 1 << 20, 1 << 20), metrics()).await;
            spool.push(records(0, 10)).expect("room");
            assert!(!spool.flush().await, "held in memory only");
            spool.push_unbounded(records(10, 5));
            assert_eq!(spool.persist_memory().await, 0);
        }
        let mut reopened = Spool::open(config(dir.path(), 1 << 20, 1 << 20), metrics()).await;
        assert_eq!(contents(&mut reopened), payloads(0, 15));
    }

    #[tokio::test]
    async fn persist_all_skips_the_memory_tier() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = config(dir.path(), 1 << 20, 1 << 20);
        config.persist_all = true;
        let mut spool = Spool::open(config, metrics()).await;
        spool.push(records(0, 10)).expect("room");
        assert!(spool.memory.is_empty());
        assert!(spool.flush().await, "durable after the fsync");
    }

    #[tokio::test]
    async fn corrupt_entry_is_quarantined_and_the_rest_is_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut spool = Spool::open(config(dir.path(), 0, 1 << 20), metrics()).await;
        push_batches(&mut spool, 3);
        // Flip one byte of the middle entry's payload: the checksum no longer matches.
        let disk = spool.disk.as_ref().expect("disk tier");
        let mut value = disk
            .batches
            .get(2u64.to_be_bytes())
            .expect("read")
            .expect("entry")
            .to_vec();
        value[20] ^= 0xff;
        disk.batches
            .insert(2u64.to_be_bytes(), value)
            .expect("write");

        assert_eq!(
            contents(&mut spool),
            [payloads(0, 10), payloads(20, 10)].concat()
        );
        assert_eq!(spool.metrics.corrupt.get(), 1);
        assert_eq!(spool.records(), 20);
        let quarantined = spool.disk.as_ref().expect("disk").quarantine.len();
        assert_eq!(quarantined, 1, "kept for an operator, not deleted");
    }

    #[tokio::test]
    async fn unreadable_database_is_moved_aside_and_a_fresh_spool_starts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spool_dir = dir.path().join("spool");
        std::fs::create_dir(&spool_dir).expect("mkdir");
        std::fs::write(spool_dir.join("conf"), b"\x00\xffnot sled at all").expect("write");
        std::fs::write(spool_dir.join("db"), vec![0xa5; 4096]).expect("write");

        let mut spool = Spool::open(config(dir.path(), 0, 1 << 20), metrics()).await;
        assert!(spool.has_disk(), "a fresh disk tier");
        assert!(spool.is_empty());
        spool.push(records(0, 1)).expect("usable");
        let moved: Vec<_> = std::fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("spool.corrupt-"))
            .collect();
        assert_eq!(moved.len(), 1, "the damaged spool is kept aside");
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
        let mut spool = Spool::open(config, metrics()).await;
        assert!(!spool.has_disk());
        spool.push(records(0, 10)).expect("memory tier works");
        assert_eq!(spool.records(), 10);
    }

    #[test]
    fn entries_round_trip_and_damage_is_detected() {
        let original = records(0, 5);
        let encoded = encode(&original);
        let decoded = decode(&encoded).expect("valid");
        assert_eq!(decoded.len(), 5);
        for (a, b) in original.iter().zip(&decoded) {
            assert_eq!((&a.key, &a.value), (&b.key, &b.value));
        }
        assert_eq!(record_count(&encoded), Some(5));
        let mut truncated = encoded.clone();
        truncated.truncate(encoded.len() - 3);
        assert!(decode(&truncated).is_none());
        assert!(decode(b"MKB1").is_none());
        assert!(record_count(b"garbage!!!!!!").is_none());
    }
}
