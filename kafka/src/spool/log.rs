//! The disk tier: an append-only log of [`frame`]s in numbered segment files, with the lock,
//! the delivered mark and the recovery rules the module documentation of `spool` describes.
//!
//! Everything here blocks: the spool calls it only from tokio's blocking threads. Memory does
//! not depend on what is on disk: the log keeps a few numbers per segment, the marks of entries
//! read but not yet delivered, and the rest of the segment being read.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tracing::{error, warn};

use super::Entry;
use super::frame::{self, Scan};

/// Entries as read from disk: their frame bodies, checked but not decoded, in one buffer that
/// the caller hands back for the next read. The caller decodes them on its own thread, so that
/// records are allocated and freed by one thread and the disk thread allocates nothing per read.
#[derive(Default)]
pub struct RawChunk {
    pub bytes: Vec<u8>,
    /// Each entry's id, record count and body in `bytes`.
    pub entries: Vec<(u64, usize, std::ops::Range<usize>)>,
}

/// What the reader found next.
enum Next {
    /// An entry, its body appended to the chunk, its mark pushed.
    Entry {
        id: u64,
        records: usize,
    },
    /// An entry that the caller did not want yet; the reader stays before it.
    NotTaken,
    End,
}

/// Bytes of a segment read at once: the reader's buffer, reused from read to read.
const READ_WINDOW: u64 = 1 << 20;

/// First bytes of every segment file: magic, format version, CRC-32 of both.
const SEGMENT_MAGIC: &[u8; 8] = b"MKBSPOOL";
pub const FORMAT_VERSION: u32 = 2;
const SEGMENT_HEADER: u64 = 16;
const SEGMENT_SUFFIX: &str = "seg";
const LOCK_FILE: &str = "lock";
const HEAD_FILE: &str = "head";
const QUARANTINE_DIR: &str = "quarantine";
/// Encoded bytes gathered before one write call.
const WRITE_BUFFER: usize = 1 << 20;

/// Why the log cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("in use by another process{}", pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    InUse { pid: Option<u32> },
    #[error("written by a newer release (format version {0}, this release reads {FORMAT_VERSION})")]
    NewerFormat(u32),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// What opening found: the caller reports it.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Damaged byte ranges skipped (each held at least part of one entry), and their bytes.
    pub damaged: u64,
    pub damaged_bytes: u64,
    /// Bytes cut off the end of the newest segment: a write that a crash interrupted.
    pub torn_bytes: u64,
    /// Entries converted from a spool of the previous release (sled), if there was one.
    pub migrated: Option<super::legacy::Migrated>,
}

#[derive(Clone)]
struct Segment {
    seq: u64,
    path: PathBuf,
    /// File length.
    size: u64,
    /// Live (undelivered) records and frame bytes.
    records: usize,
    bytes: usize,
    /// The highest entry id in it.
    last_id: u64,
}

/// An entry read but not yet delivered: where it ends, and what it counts.
struct Mark {
    id: u64,
    seq: u64,
    end: u64,
    records: usize,
    bytes: usize,
}

/// The segment being read: its bytes from `base` on.
struct Reader {
    seq: u64,
    pos: u64,
    base: u64,
    buf: Vec<u8>,
    /// The highest id met: frames at or below it are stale copies.
    last_id: u64,
}

/// See the module documentation.
pub struct Log {
    dir: PathBuf,
    /// Held for the life of the log; the kernel releases it when the process dies.
    _lock: File,
    segments: VecDeque<Segment>,
    /// Offset of the first live frame in the first segment.
    head: u64,
    /// Every entry up to this id is delivered; the `head` file keeps it across restarts.
    delivered: u64,
    head_written: u64,
    next_segment: u64,
    /// Append handle of the last segment; `None` starts a new segment at the next append.
    active: Option<File>,
    reader: Option<Reader>,
    marks: VecDeque<Mark>,
    unlink: Vec<PathBuf>,
    segment_bytes: u64,
    last_id: u64,
    /// Damaged ranges met while reading, not yet reported.
    damaged_unreported: u64,
    /// Unit tests: the next writes fail as on a full disk.
    #[cfg(test)]
    pub fail_writes: usize,
}

impl Log {
    /// Takes the lock, recovers what is on disk and converts a previous release's spool.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<(Self, Recovery), OpenError> {
        fs::create_dir_all(dir)?;
        let lock = take_lock(dir)?;
        let delivered = read_head(dir);
        let mut log = Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            segments: VecDeque::new(),
            head: SEGMENT_HEADER,
            delivered,
            head_written: delivered,
            next_segment: 1,
            active: None,
            reader: None,
            marks: VecDeque::new(),
            unlink: Vec::new(),
            segment_bytes: segment_bytes.max(SEGMENT_HEADER + 1),
            last_id: delivered,
            damaged_unreported: 0,
            #[cfg(test)]
            fail_writes: 0,
        };
        let mut recovery = Recovery::default();
        for (seq, path) in segment_files(dir)? {
            log.next_segment = seq + 1;
            log.recover_segment(seq, path, &mut recovery)?;
        }
        // Segments holding nothing undelivered go.
        log.segments.retain(|s| {
            let keep = s.records > 0;
            if !keep {
                log.unlink.push(s.path.clone());
            }
            keep
        });
        log.unlink_pending();
        recovery.migrated = super::legacy::migrate(&mut log)?;
        Ok((log, recovery))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Live records, summed over the segments (a few hundred at most).
    pub fn records(&self) -> usize {
        self.segments.iter().map(|s| s.records).sum()
    }

    /// Live frame bytes, summed over the segments.
    pub fn bytes(&self) -> usize {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// The id of the last entry read (its mark is in `marks`).
    fn cursor(&self) -> u64 {
        self.reader.as_ref().map_or(self.delivered, |r| r.last_id)
    }

    /// The highest entry id this log has seen, delivered ones included.
    pub fn last_id(&self) -> u64 {
        self.last_id
    }

    /// Damaged ranges met while reading since the last call.
    pub fn take_damage(&mut self) -> u64 {
        std::mem::take(&mut self.damaged_unreported)
    }

    /// Scans one segment: counts its live frames, cuts a torn tail, and when anything else is
    /// damaged, moves the damaged ranges to quarantine and rewrites the segment without them.
    fn recover_segment(
        &mut self,
        seq: u64,
        path: PathBuf,
        recovery: &mut Recovery,
    ) -> Result<(), OpenError> {
        let bytes = fs::read(&path)?;
        let header_ok = match check_segment_header(&bytes) {
            Ok(()) => true,
            Err(Some(version)) => return Err(OpenError::NewerFormat(version)),
            Err(None) => false,
        };
        let mut at = if header_ok {
            SEGMENT_HEADER as usize
        } else {
            0
        };
        let mut intact: Vec<(usize, usize)> = Vec::new();
        let mut damage: Vec<(usize, usize)> = Vec::new();
        let mut torn = None;
        let mut segment = Segment {
            seq,
            path,
            size: bytes.len() as u64,
            records: 0,
            bytes: 0,
            last_id: 0,
        };
        loop {
            let (start, end) = match frame::next(&bytes, at) {
                Scan::Frame(f) if frame::check(f.body).is_some() => {
                    // A frame at or below the highest id so far is a stale copy (a write that
                    // was undone but not cut off); it is left out.
                    if f.id > self.last_id {
                        self.last_id = f.id;
                        segment.last_id = f.id;
                        if f.id > self.delivered {
                            segment.records += f.count as usize;
                            segment.bytes += f.end - at;
                        }
                        intact.push((at, f.end));
                    }
                    at = f.end;
                    continue;
                }
                Scan::Frame(f) => (at, f.end),
                Scan::Damage { start, end } => (start, end),
                Scan::End => break,
            };
            at = end;
            if end == bytes.len() && is_torn_write(&bytes[start..]) {
                torn = Some(start);
            } else if end > SEGMENT_HEADER as usize {
                damage.push((start.max(SEGMENT_HEADER as usize).min(end), end));
            }
        }
        if let Some(start) = torn {
            // Never acknowledged: a write cut short by a crash.
            truncate(&segment.path, start as u64)?;
            segment.size = start as u64;
            recovery.torn_bytes += (bytes.len() - start) as u64;
        }
        if !damage.is_empty() || !header_ok {
            for &(start, end) in &damage {
                quarantine(&self.dir, seq, start, &bytes[start..end])?;
                recovery.damaged += 1;
                recovery.damaged_bytes += (end - start) as u64;
            }
            segment.size = rewrite(&segment.path, &bytes, &intact)?;
        }
        self.segments.push_back(segment);
        Ok(())
    }

    /// Writes `entries` after everything in the log and fsyncs. On error nothing of them is
    /// kept (what was written is cut off again) and the next append starts a new segment.
    pub fn append(&mut self, entries: &[Entry]) -> io::Result<()> {
        self.unlink_pending();
        let (count, last, last_id) = (
            self.segments.len(),
            self.segments.back().cloned(),
            self.last_id,
        );
        let result = self.try_append(entries);
        if result.is_err() {
            while self.segments.len() > count {
                let created = self.segments.pop_back().expect("more than before");
                let _ = fs::remove_file(&created.path);
            }
            if let (Some(segment), Some(last)) = (self.segments.back_mut(), last) {
                // If even this fails, recovery finds the frames and skips them as stale.
                let _ = truncate(&last.path, last.size);
                *segment = last;
            }
            self.last_id = last_id;
            self.active = None;
        }
        result
    }

    fn try_append(&mut self, entries: &[Entry]) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_writes > 0 {
            self.fail_writes -= 1;
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        let mut buf = Vec::new();
        for entry in entries {
            let full = match self.segments.back() {
                Some(s) if self.active.is_some() => s.size + buf.len() as u64 >= self.segment_bytes,
                _ => true,
            };
            if full {
                self.write_out(&mut buf)?;
                self.sync_active()?;
                self.roll()?;
            }
            let start = buf.len();
            frame::encode(entry.id, &entry.records, &mut buf);
            let size = buf.len() - start;
            let segment = self.segments.back_mut().expect("a segment was rolled");
            segment.records += entry.records.len();
            segment.bytes += size;
            segment.last_id = entry.id;
            self.last_id = self.last_id.max(entry.id);
            if buf.len() >= WRITE_BUFFER {
                self.write_out(&mut buf)?;
            }
        }
        self.write_out(&mut buf)?;
        self.sync_active()
    }

    fn write_out(&mut self, buf: &mut Vec<u8>) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let file = self.active.as_mut().expect("a segment is open for appends");
        file.write_all(buf)?;
        self.segments.back_mut().expect("active segment").size += buf.len() as u64;
        buf.clear();
        Ok(())
    }

    fn sync_active(&mut self) -> io::Result<()> {
        match &self.active {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }

    /// Starts a new segment file (header written and fsynced, and its directory entry too).
    fn roll(&mut self) -> io::Result<()> {
        let seq = self.next_segment;
        self.next_segment += 1;
        let path = self.dir.join(format!("{seq:020}.{SEGMENT_SUFFIX}"));
        let mut file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        self.segments.push_back(Segment {
            seq,
            path,
            size: 0,
            records: 0,
            bytes: 0,
            last_id: 0,
        });
        self.active = None;
        file.write_all(&segment_header())?;
        file.sync_data()?;
        File::open(&self.dir)?.sync_all()?;
        self.segments.back_mut().expect("just pushed").size = SEGMENT_HEADER;
        self.active = Some(file);
        Ok(())
    }

    /// The live entries after entry `after` (0: from the start), up to `max_records` records
    /// with the `already` records the caller holds, but at least one entry in all. Reading goes
    /// on where the last read ended when `after` is where it ended. Damage met on the way is
    /// skipped, quarantined and counted.
    pub fn read_after(
        &mut self,
        after: u64,
        max_records: usize,
        already: usize,
        chunk: &mut RawChunk,
    ) -> io::Result<()> {
        self.unlink_pending();
        chunk.bytes.clear();
        chunk.entries.clear();
        if after == 0 || self.reader.is_none() || self.cursor() > after {
            self.reset_reader();
        }
        let mut total = already;
        while total < max_records {
            let fits = |id: u64, records: usize| {
                id <= after || total == 0 || total + records <= max_records
            };
            match self.next_entry(&mut chunk.bytes, fits)? {
                Next::Entry { id, records } => {
                    let body = chunk.entries.last().map_or(0, |e| e.2.end)..chunk.bytes.len();
                    if id > after {
                        total += records;
                        chunk.entries.push((id, records, body));
                    } else {
                        chunk.bytes.truncate(body.start);
                    }
                }
                Next::NotTaken => break,
                Next::End => {
                    self.recount();
                    break;
                }
            }
        }
        Ok(())
    }

    /// At the end of the log every live entry has a mark: the counts are recomputed from them,
    /// so that records lost to damage found while reading stop being counted.
    fn recount(&mut self) {
        for segment in &mut self.segments {
            (segment.records, segment.bytes) = (0, 0);
        }
        for mark in &self.marks {
            if let Some(segment) = self.segments.iter_mut().find(|s| s.seq == mark.seq) {
                segment.records += mark.records;
                segment.bytes += mark.bytes;
            }
        }
    }

    fn reset_reader(&mut self) {
        self.marks.clear();
        self.reader = self.segments.front().map(|s| Reader {
            seq: s.seq,
            pos: self.head,
            base: self.head,
            buf: Vec::new(),
            last_id: self.delivered,
        });
    }

    /// Reads the next live entry: when `take(id, records)` agrees, appends its body to `out`,
    /// pushes its mark and moves on; otherwise stays before it. Stale frames and damage are
    /// passed over (their marks pushed at once, so that delivering what comes before them moves
    /// the head past them).
    fn next_entry(
        &mut self,
        out: &mut Vec<u8>,
        take: impl Fn(u64, usize) -> bool,
    ) -> io::Result<Next> {
        loop {
            let Some(reader) = self.reader.as_mut() else {
                return Ok(Next::End);
            };
            let Some(index) = self.segments.iter().position(|s| s.seq >= reader.seq) else {
                return Ok(Next::End);
            };
            let segment = &self.segments[index];
            if segment.seq != reader.seq {
                reader.move_to(segment.seq);
            }
            if reader.pos >= segment.size {
                match self.segments.get(index + 1) {
                    Some(next) => {
                        reader.move_to(next.seq);
                        continue;
                    }
                    None => return Ok(Next::End),
                }
            }
            if let Some(to) = reader.load_needed(segment.size) {
                reader.load(&segment.path, to)?;
            }
            let view_end = (reader.base + reader.buf.len() as u64).min(segment.size);
            let view = &reader.buf[..(view_end - reader.base) as usize];
            let at = (reader.pos - reader.base) as usize;
            let (seq, base) = (reader.seq, reader.base);
            let damaged_end = match frame::next(view, at) {
                Scan::Frame(f) => {
                    let end = base + f.end as u64;
                    if f.id <= reader.last_id {
                        reader.pos = end;
                        self.marks.push_back(Mark::passed(reader.last_id, seq, end));
                        continue;
                    }
                    match frame::check(f.body) {
                        Some(records) if !take(f.id, records) => return Ok(Next::NotTaken),
                        Some(records) => {
                            out.extend_from_slice(f.body);
                            reader.pos = end;
                            reader.last_id = f.id;
                            self.marks.push_back(Mark {
                                id: f.id,
                                seq,
                                end,
                                records,
                                bytes: f.end - at,
                            });
                            return Ok(Next::Entry { id: f.id, records });
                        }
                        None => f.end,
                    }
                }
                Scan::Damage { end, .. } if end == view.len() && view_end < segment.size => {
                    // The search for the next intact frame reached the end of the window: it
                    // may lie across it. Read the rest of the segment and look again.
                    let size = segment.size;
                    reader.load(&segment.path, size)?;
                    continue;
                }
                Scan::Damage { end, .. } => end,
                Scan::End => view.len(),
            };
            let damaged = &view[at..damaged_end];
            if !damaged.is_empty() {
                error!(
                    spool = %self.dir.display(), segment = seq, offset = base + at as u64,
                    bytes = damaged.len(),
                    "Damaged bytes in the disk spool (bad frame or checksum); set aside in \
                     quarantine, reading on after them."
                );
                quarantine(&self.dir, seq, (base + at as u64) as usize, damaged)?;
                self.damaged_unreported += 1;
            }
            reader.pos = base + damaged_end as u64;
            self.marks
                .push_back(Mark::passed(reader.last_id, seq, reader.pos));
        }
    }

    /// Forgets every entry up to and including `id` (delivered): moves the head past them,
    /// deletes segments left with nothing, and keeps the delivered mark for the next start.
    pub fn remove_through(&mut self, id: u64) -> io::Result<usize> {
        // Entries not read yet (rare: after a drop) are read now so that their end is known.
        if self.cursor() < id && self.marks.back().is_none_or(|m| m.id < id) {
            if self.reader.is_none() {
                self.reset_reader();
            }
            let mut scratch = Vec::new();
            while self.cursor() < id {
                scratch.clear();
                match self.next_entry(&mut scratch, |next, _| next <= id)? {
                    Next::Entry { .. } => {}
                    Next::NotTaken | Next::End => break,
                }
            }
        }
        let mut removed = 0;
        let mut head = None;
        while self.marks.front().is_some_and(|m| m.id <= id) {
            let mark = self.marks.pop_front().expect("front exists");
            if let Some(segment) = self.segments.iter_mut().find(|s| s.seq == mark.seq) {
                segment.records = segment.records.saturating_sub(mark.records);
                segment.bytes = segment.bytes.saturating_sub(mark.bytes);
            }
            removed += mark.records;
            head = Some((mark.seq, mark.end));
        }
        if let Some((seq, end)) = head {
            while self.segments.front().is_some_and(|s| s.seq < seq) {
                self.forget_first_segment();
            }
            self.head = end;
            let last = self.segments.len() == 1;
            if self.segments.front().is_some_and(|s| s.size <= end)
                && !(last && self.active.is_some())
            {
                self.forget_first_segment();
            }
        }
        self.delivered = self.delivered.max(id.min(self.last_id));
        self.write_head();
        self.unlink_pending();
        Ok(removed)
    }

    /// Drops the oldest segment whole (full policy `drop-oldest`); returns its live records.
    pub fn drop_oldest_segment(&mut self) -> usize {
        let Some(first) = self.segments.front() else {
            return 0;
        };
        let (records, last_id) = (first.records, first.last_id);
        self.forget_first_segment();
        self.delivered = self.delivered.max(last_id);
        self.reader = None;
        self.marks.clear();
        records
    }

    /// Removes the first segment from the log; its file is deleted at the next I/O call.
    fn forget_first_segment(&mut self) {
        let Some(segment) = self.segments.pop_front() else {
            return;
        };
        if self.segments.is_empty() {
            self.active = None;
        }
        self.head = SEGMENT_HEADER;
        self.unlink.push(segment.path);
    }

    fn unlink_pending(&mut self) {
        self.write_head();
        for path in self.unlink.drain(..) {
            if let Err(e) = fs::remove_file(&path)
                && e.kind() != io::ErrorKind::NotFound
            {
                warn!(path = %path.display(), error = %e, "Cannot delete a delivered spool segment.");
            }
        }
    }

    /// Keeps the delivered mark in the `head` file (atomically, by rename). Not fsynced: losing
    /// it sends delivered records again, which at-least-once allows.
    fn write_head(&mut self) {
        if self.delivered == self.head_written {
            return;
        }
        let mut bytes = self.delivered.to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
        let temporary = self.dir.join(format!("{HEAD_FILE}.new"));
        let written = fs::write(&temporary, &bytes)
            .and_then(|()| fs::rename(&temporary, self.dir.join(HEAD_FILE)));
        match written {
            Ok(()) => self.head_written = self.delivered,
            Err(e) => {
                warn!(error = %e, "Cannot record the spool's delivered mark; delivered records may be sent again after a restart.")
            }
        }
    }
}

impl Mark {
    /// The mark of bytes passed over (damage, stale copies): no records, no live bytes.
    fn passed(id: u64, seq: u64, end: u64) -> Self {
        Self {
            id,
            seq,
            end,
            records: 0,
            bytes: 0,
        }
    }
}

impl Reader {
    fn move_to(&mut self, seq: u64) {
        self.seq = seq;
        self.pos = SEGMENT_HEADER;
        self.base = SEGMENT_HEADER;
        self.buf.clear();
    }

    /// Where the buffer must reach for the frame at `pos`, when it does not: a window from
    /// `pos`, or the whole frame when its header says it is longer.
    fn load_needed(&self, size: u64) -> Option<u64> {
        let loaded_end = (self.base + self.buf.len() as u64).min(size);
        let window = size.min(self.pos + READ_WINDOW);
        if self.pos < self.base || self.pos + frame::HEADER_BYTES as u64 > loaded_end {
            return (loaded_end < size || self.pos < self.base).then_some(window);
        }
        let (length, _) = frame::header(&self.buf[(self.pos - self.base) as usize..])?;
        let frame_end = self.pos + (frame::HEADER_BYTES + length) as u64;
        (frame_end <= size && frame_end > loaded_end).then_some(frame_end.max(window))
    }

    /// Reads the segment at `path` from `pos` to `to` into the buffer, reusing its memory.
    fn load(&mut self, path: &Path, to: u64) -> io::Result<()> {
        if self.buf.capacity() > 2 * READ_WINDOW as usize && to - self.pos <= READ_WINDOW {
            // A large entry grew the buffer; windows do not need that much.
            self.buf = Vec::new();
        }
        self.buf.clear();
        self.buf.resize((to - self.pos) as usize, 0);
        let mut file = File::open(path)?;
        file.seek(SeekFrom::Start(self.pos))?;
        file.read_exact(&mut self.buf)?;
        self.base = self.pos;
        Ok(())
    }
}

/// Takes the spool's lock, or says who holds it.
fn take_lock(dir: &Path) -> Result<File, OpenError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(OpenError::InUse {
                pid: text.trim().parse().ok(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(e.into()),
    }
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    writeln!(file, "{}", std::process::id())?;
    Ok(file)
}

/// The delivered mark a previous run left; 0 (everything is sent again) when missing or bad.
fn read_head(dir: &Path) -> u64 {
    let Ok(bytes) = fs::read(dir.join(HEAD_FILE)) else {
        return 0;
    };
    let valid = bytes.len() == 12 && crc32fast::hash(&bytes[..8]).to_le_bytes() == bytes[8..12];
    if !valid {
        warn!(spool = %dir.display(), "The spool's delivered mark is damaged; records delivered before the last stop may be sent again.");
        return 0;
    }
    u64::from_le_bytes(bytes[..8].try_into().expect("eight bytes"))
}

/// Segment files in order.
fn segment_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for item in fs::read_dir(dir)? {
        let path = item?.path();
        let seq = path
            .extension()
            .filter(|e| *e == SEGMENT_SUFFIX)
            .and(path.file_stem())
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(seq) = seq {
            files.push((seq, path));
        }
    }
    files.sort_unstable();
    Ok(files)
}

fn segment_header() -> [u8; SEGMENT_HEADER as usize] {
    let mut header = [0; SEGMENT_HEADER as usize];
    header[..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    let crc = crc32fast::hash(&header[..12]);
    header[12..].copy_from_slice(&crc.to_le_bytes());
    header
}

/// `Err(Some(version))` for an intact header of another version, `Err(None)` for damage.
fn check_segment_header(bytes: &[u8]) -> Result<(), Option<u32>> {
    let header = bytes.get(..SEGMENT_HEADER as usize).ok_or(None)?;
    let crc = u32::from_le_bytes(header[12..].try_into().map_err(|_| None)?);
    if &header[..8] != SEGMENT_MAGIC || crc32fast::hash(&header[..12]) != crc {
        return Err(None);
    }
    match u32::from_le_bytes(header[8..12].try_into().map_err(|_| None)?) {
        FORMAT_VERSION => Ok(()),
        other => Err(Some(other)),
    }
}

/// Whether damage reaching the end of a segment is a write cut short: the start of a frame
/// whose declared length runs past the end of the file.
fn is_torn_write(tail: &[u8]) -> bool {
    if tail.len() < frame::HEADER_BYTES {
        return frame::MAGIC.starts_with(&tail[..tail.len().min(4)]);
    }
    frame::header(tail).is_some_and(|(length, _)| frame::HEADER_BYTES + length > tail.len())
}

/// Keeps damaged bytes for an operator: `quarantine/<segment>-<offset>.bin` in the spool.
fn quarantine(dir: &Path, seq: u64, offset: usize, bytes: &[u8]) -> io::Result<()> {
    let folder = dir.join(QUARANTINE_DIR);
    fs::create_dir_all(&folder)?;
    fs::write(folder.join(format!("{seq:020}-{offset}.bin")), bytes)
}

/// Replaces a segment by a fresh header and its intact frames; returns the new length.
fn rewrite(path: &Path, bytes: &[u8], intact: &[(usize, usize)]) -> io::Result<u64> {
    let temporary = path.with_extension("rewrite");
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&segment_header());
    for &(start, end) in intact {
        out.extend_from_slice(&bytes[start..end]);
    }
    let mut file = File::create(&temporary)?;
    file.write_all(&out)?;
    file.sync_data()?;
    fs::rename(&temporary, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(out.len() as u64)
}

fn truncate(path: &Path, length: u64) -> io::Result<()> {
    let file = OpenOptions::new().write(true).open(path)?;
    file.set_len(length)?;
    file.sync_data()
}
