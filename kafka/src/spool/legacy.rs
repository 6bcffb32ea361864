//! Upgrade from the previous release's spool: a sled database (files `conf`, `db`, `blobs/`,
//! `snap.*` directly in `SPOOL_DIR`), tree `batches`, key = entry id (8 bytes big-endian), value
//! = `"MKB1"` · record count (u32 LE) · per record key length (u32 LE), key, value length
//! (u32 LE), value · CRC-32 of everything before it (u32 LE).
//!
//! At the first start of this release its entries are appended to the new log in their order
//! and fsynced; only then are sled's files removed. Entries that do not decode, and whatever
//! the old release had quarantined, are kept: the sled files are then moved to
//! `legacy-sled-<unix time>/` in the spool instead of being removed.

use std::fs;
use std::io;
use std::path::Path;

use mkb_bridge::Record;
use tokio::time::Instant;
use tracing::{error, info};

use super::Entry;
use super::log::{Log, OpenError};

const MAGIC: &[u8; 4] = b"MKB1";
/// Encoded bytes of old entries converted per append.
const GROUP_BYTES: usize = 8 << 20;

/// What an upgrade converted.
#[derive(Debug, Default)]
pub struct Migrated {
    pub entries: usize,
    pub records: usize,
    /// Old entries that did not decode, plus those the old release had quarantined.
    pub unreadable: usize,
}

/// Converts a sled spool found in the log's directory, if there is one.
pub fn migrate(log: &mut Log) -> Result<Option<Migrated>, OpenError> {
    let dir = log.dir().to_path_buf();
    if !(dir.join("conf").is_file() && dir.join("db").is_file()) {
        return Ok(None);
    }
    let db = sled::Config::new()
        .path(&dir)
        .cache_capacity(2 << 20)
        .open()
        .map_err(|e| match e {
            sled::Error::Io(e) if e.to_string().contains("could not acquire lock") => {
                OpenError::InUse { pid: None }
            }
            other => OpenError::Io(io::Error::other(format!(
                "a spool of the previous release (sled) cannot be read: {other}"
            ))),
        })?;
    let sled_error = |e: sled::Error| OpenError::Io(io::Error::other(e.to_string()));
    let batches = db.open_tree("batches").map_err(sled_error)?;
    let mut migrated = Migrated {
        unreadable: db.open_tree("quarantine").map_err(sled_error)?.len(),
        ..Migrated::default()
    };
    let mut group = Vec::new();
    let mut group_bytes = 0;
    let mut next_id = log.last_id() + 1;
    for item in batches.iter() {
        let (_, value) = item.map_err(sled_error)?;
        let Some(records) = decode(&value) else {
            migrated.unreadable += 1;
            continue;
        };
        migrated.entries += 1;
        migrated.records += records.len();
        group_bytes += value.len();
        group.push(Entry {
            id: next_id,
            records,
        });
        next_id += 1;
        if group_bytes >= GROUP_BYTES {
            log.append(&group)?;
            group.clear();
            group_bytes = 0;
        }
    }
    log.append(&group)?;
    drop((batches, db));
    set_aside_or_remove(&dir, migrated.unreadable > 0)?;
    info!(
        spool = %dir.display(), entries = migrated.entries, records = migrated.records,
        "Disk spool of the previous release converted to the current format."
    );
    if migrated.unreadable > 0 {
        error!(
            spool = %dir.display(), unreadable = migrated.unreadable,
            "Entries of the previous release's spool could not be read; its files are kept in \
             legacy-sled-* inside the spool."
        );
    }
    Ok(Some(migrated))
}

/// Removes sled's files, or moves them into `legacy-sled-<time>/` when something in them could
/// not be converted.
fn set_aside_or_remove(dir: &Path, keep: bool) -> io::Result<()> {
    let aside = dir.join(format!(
        "legacy-sled-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    ));
    if keep {
        fs::create_dir_all(&aside)?;
    }
    for item in fs::read_dir(dir)? {
        let path = item?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let sled_file = matches!(name, "conf" | "db" | "blobs") || name.starts_with("snap.");
        if !sled_file {
            continue;
        }
        match (keep, path.is_dir()) {
            (true, _) => fs::rename(&path, aside.join(name))?,
            (false, true) => fs::remove_dir_all(&path)?,
            (false, false) => fs::remove_file(&path)?,
        }
    }
    Ok(())
}

/// An old entry's records, `None` when its header or checksum is wrong.
fn decode(value: &[u8]) -> Option<Vec<Record>> {
    if value.len() < MAGIC.len() + 8 || &value[..4] != MAGIC {
        return None;
    }
    let count = u32::from_le_bytes(value[4..8].try_into().ok()?) as usize;
    let (body, crc) = value.split_at(value.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    let mut rest = &body[8..];
    let mut take = || -> Option<Vec<u8>> {
        let (length, tail) = rest.split_at_checked(4)?;
        let length = u32::from_le_bytes(length.try_into().ok()?) as usize;
        let (bytes, tail) = tail.split_at_checked(length)?;
        rest = tail;
        Some(bytes.to_vec())
    };
    let loaded_at = Instant::now();
    let mut records = Vec::with_capacity(count.min(body.len() / 8));
    for _ in 0..count {
        let key = String::from_utf8(take()?).ok()?;
        let value = take()?;
        records.push(Record::new(0, key, value, loaded_at));
    }
    rest.is_empty().then_some(records)
}
