//! Snapshots: the whole store in one file, written atomically and read back on start.
//!
//! # Format (version 1, little-endian)
//!
//! ```text
//! magic    8 bytes  "SHMETRIC"
//! version  u32      FORMAT_VERSION
//! header   u32 length, then postcard(Header): saved_at_ms, the tiers of both lists, sketch
//!          geometry (bins per power of two, window)
//! records  per series: u32 length (> 0), then postcard(Record): key, newest_ms, kind, and
//!          per tier its head and raw bucket arrays (postcard writes integers as varints,
//!          so empty sketch bins take a byte each)
//! end      u32 0
//! trailer  u32 series count, u32 CRC-32 (IEEE) of every byte before it
//! ```
//!
//! The file is written to `<name>.tmp` beside the target, fsynced, renamed over it and the
//! directory fsynced: a crash leaves either the old snapshot or the new one. A snapshot is
//! loaded only into a store with the same tiers and sketch geometry; anything else (another
//! version, a checksum mismatch, a record that does not fit) is a [`SnapshotError`] the
//! daemon logs before starting empty.

use std::{
    borrow::Cow,
    collections::HashSet,
    fmt,
    fs::{self, File},
    io::{self, BufWriter, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{
    config::{StoreConfig, StoreConfigError, TierConfig},
    key::SeriesKey,
    ring::{CounterSlots, DistributionSlots, GaugeSlots, Slots, Tier, EMPTY_HEAD},
    series::{Series, SeriesData, Store},
    sketch::{self, EMPTY_TOP, SUB_BUCKETS, WINDOW},
    StoreHandle, MAX_TIME_MS,
};

/// The version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The snapshot's file name in the state directory.
pub const SNAPSHOT_FILE: &str = "metrics.snapshot";

const MAGIC: &[u8; 8] = b"SHMETRIC";
/// Magic, version and header length.
const PREAMBLE: usize = 8 + 4 + 4;
/// End marker, series count and checksum.
const TAIL: usize = 4 + 4 + 4;

/// The file operation that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    Read,
    Create,
    Write,
    Sync,
    Rename,
    SyncDirectory,
}

impl fmt::Display for IoOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Read => "read",
            Self::Create => "create",
            Self::Write => "write",
            Self::Sync => "fsync",
            Self::Rename => "rename",
            Self::SyncDirectory => "fsync the directory of",
        })
    }
}

/// What is wrong inside a snapshot whose checksum matched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotProblem {
    #[error("record {record} has {found} tiers, the config {expected}")]
    TierCount {
        record: u32,
        expected: usize,
        found: usize,
    },
    #[error("record {record} has an array of {found} entries where {expected} are needed")]
    ArrayLength {
        record: u32,
        expected: usize,
        found: usize,
    },
    #[error("record {record} has a ring head or timestamp out of range")]
    TimeOutOfRange { record: u32 },
    #[error("record {record} has a sketch bin out of range")]
    BinOutOfRange { record: u32 },
    #[error("record {record} repeats series {key}")]
    DuplicateSeries { record: u32, key: String },
    #[error("a record runs past the end of the file")]
    RecordPastEnd,
    #[error("the trailer counts {expected} series, the file holds {found}")]
    SeriesCount { expected: u32, found: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no snapshot at {path}")]
    Missing { path: PathBuf },
    #[error("cannot {op} {path}")]
    Io {
        op: IoOp,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a metrics snapshot")]
    NotASnapshot { path: PathBuf },
    #[error(
        "{path} is snapshot format version {found}; this build reads version {FORMAT_VERSION}"
    )]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{path} is truncated ({bytes} bytes)")]
    Truncated { path: PathBuf, bytes: u64 },
    #[error("{path} is corrupt: checksum {found:#010x}, expected {expected:#010x}")]
    ChecksumMismatch {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    #[error("{path} is corrupt: cannot decode {part}")]
    Decode {
        path: PathBuf,
        part: &'static str,
        #[source]
        source: postcard::Error,
    },
    #[error("{path} is corrupt")]
    Invalid {
        path: PathBuf,
        #[source]
        problem: SnapshotProblem,
    },
    #[error("{path} was written for other tiers or sketch geometry; its history does not map onto this config")]
    Incompatible { path: PathBuf },
    #[error("cannot encode series {key}")]
    Encode {
        key: String,
        #[source]
        source: postcard::Error,
    },
    #[error("cannot load a snapshot with this store config")]
    Config(#[source] StoreConfigError),
}

/// A snapshot written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub series: u32,
    pub duration: Duration,
}

/// A snapshot read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    pub bytes: u64,
    pub series_loaded: u32,
    /// Series that no longer fit `max_series` or `max_bytes`.
    pub series_skipped: u32,
    /// The time the saver passed in.
    pub saved_at_ms: i64,
    pub duration: Duration,
}

/// What [`StoreHandle::open`] found.
#[derive(Debug)]
pub enum LoadOutcome {
    Loaded(LoadReport),
    /// No snapshot yet: the store starts empty.
    Missing,
    /// The snapshot could not be used: the store starts empty; log the error.
    Failed(SnapshotError),
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Header {
    saved_at_ms: i64,
    tiers: Vec<TierConfig>,
    distribution_tiers: Vec<TierConfig>,
    sub_buckets: u32,
    window: u32,
}

impl Header {
    fn for_config(config: &StoreConfig, saved_at_ms: i64) -> Self {
        Self {
            saved_at_ms,
            tiers: config.tiers.clone(),
            distribution_tiers: config.distribution_tiers.clone(),
            sub_buckets: SUB_BUCKETS,
            window: WINDOW as u32,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Record<'a> {
    key: Cow<'a, SeriesKey>,
    newest_ms: i64,
    data: RecordData<'a>,
}

#[derive(Serialize, Deserialize)]
enum RecordData<'a> {
    Counter(Vec<CounterRecord<'a>>),
    Gauge(Vec<GaugeRecord<'a>>),
    Distribution(Vec<DistributionRecord<'a>>),
}

#[derive(Serialize, Deserialize)]
struct CounterRecord<'a> {
    head: i64,
    sums: Cow<'a, [f64]>,
}

#[derive(Serialize, Deserialize)]
struct GaugeRecord<'a> {
    head: i64,
    min: Cow<'a, [f32]>,
    max: Cow<'a, [f32]>,
    last: Cow<'a, [f32]>,
    count: Cow<'a, [u32]>,
    sum: Cow<'a, [f64]>,
}

#[derive(Serialize, Deserialize)]
struct DistributionRecord<'a> {
    head: i64,
    top: Cow<'a, [i16]>,
    sum: Cow<'a, [f64]>,
    bins: Cow<'a, [u32]>,
}

impl<'a> Record<'a> {
    fn borrow(series: &'a Series) -> Self {
        let data = match &series.data {
            SeriesData::Counter(tiers) => RecordData::Counter(
                tiers
                    .iter()
                    .map(|t| CounterRecord {
                        head: t.head,
                        sums: Cow::Borrowed(&t.slots.sums),
                    })
                    .collect(),
            ),
            SeriesData::Gauge(tiers) => RecordData::Gauge(
                tiers
                    .iter()
                    .map(|t| GaugeRecord {
                        head: t.head,
                        min: Cow::Borrowed(&t.slots.min),
                        max: Cow::Borrowed(&t.slots.max),
                        last: Cow::Borrowed(&t.slots.last),
                        count: Cow::Borrowed(&t.slots.count),
                        sum: Cow::Borrowed(&t.slots.sum),
                    })
                    .collect(),
            ),
            SeriesData::Distribution(tiers) => RecordData::Distribution(
                tiers
                    .iter()
                    .map(|t| DistributionRecord {
                        head: t.head,
                        top: Cow::Borrowed(&t.slots.top),
                        sum: Cow::Borrowed(&t.slots.sum),
                        bins: Cow::Borrowed(&t.slots.bins),
                    })
                    .collect(),
            ),
        };
        Self {
            key: Cow::Borrowed(&series.key),
            newest_ms: series.newest_ms,
            data,
        }
    }

    /// The series this record holds, checked against the config so that no later index can
    /// go out of bounds.
    fn into_series(self, config: &StoreConfig, record: u32) -> Result<Series, SnapshotProblem> {
        let newest_ok = self.newest_ms == i64::MIN || self.newest_ms.abs() <= MAX_TIME_MS;
        if !newest_ok {
            return Err(SnapshotProblem::TimeOutOfRange { record });
        }
        let key = self.key.into_owned();
        let data = match self.data {
            RecordData::Counter(tiers) => {
                let lens = lens(config, super::SeriesKind::Counter, tiers.len(), record)?;
                let mut out = Vec::with_capacity(tiers.len());
                for (t, len) in tiers.into_iter().zip(lens) {
                    let slots = CounterSlots {
                        sums: exact(t.sums, len, record)?,
                    };
                    out.push(tier(t.head, slots, record)?);
                }
                SeriesData::Counter(out)
            }
            RecordData::Gauge(tiers) => {
                let lens = lens(config, super::SeriesKind::Gauge, tiers.len(), record)?;
                let mut out = Vec::with_capacity(tiers.len());
                for (t, len) in tiers.into_iter().zip(lens) {
                    let slots = GaugeSlots {
                        min: exact(t.min, len, record)?,
                        max: exact(t.max, len, record)?,
                        last: exact(t.last, len, record)?,
                        count: exact(t.count, len, record)?,
                        sum: exact(t.sum, len, record)?,
                    };
                    out.push(tier(t.head, slots, record)?);
                }
                SeriesData::Gauge(out)
            }
            RecordData::Distribution(tiers) => {
                let lens = lens(config, super::SeriesKind::Distribution, tiers.len(), record)?;
                let mut out = Vec::with_capacity(tiers.len());
                for (t, len) in tiers.into_iter().zip(lens) {
                    let slots = DistributionSlots {
                        top: exact(t.top, len, record)?,
                        sum: exact(t.sum, len, record)?,
                        bins: exact(t.bins, len * WINDOW, record)?,
                    };
                    let lowest = sketch::bin_index(0.0);
                    let highest = sketch::bin_index(f64::MAX);
                    if slots
                        .top
                        .iter()
                        .any(|&top| top != EMPTY_TOP && !(lowest..=highest).contains(&top))
                    {
                        return Err(SnapshotProblem::BinOutOfRange { record });
                    }
                    out.push(tier(t.head, slots, record)?);
                }
                SeriesData::Distribution(out)
            }
        };
        let bytes = config.series_bytes(data.kind(), key.heap_bytes());
        let hash = super::key::key_hash(key.name(), key.labels());
        Ok(Series {
            key,
            hash,
            data,
            newest_ms: self.newest_ms,
            bytes,
        })
    }
}

fn lens(
    config: &StoreConfig,
    kind: super::SeriesKind,
    found: usize,
    record: u32,
) -> Result<Vec<usize>, SnapshotProblem> {
    let tiers = config.tiers_of(kind);
    if tiers.len() != found {
        return Err(SnapshotProblem::TierCount {
            record,
            expected: tiers.len(),
            found,
        });
    }
    Ok(tiers
        .iter()
        .map(|t| usize::try_from(t.slots()).unwrap_or(usize::MAX))
        .collect())
}

fn exact<T: Clone>(
    values: Cow<'_, [T]>,
    len: usize,
    record: u32,
) -> Result<Box<[T]>, SnapshotProblem> {
    if values.len() == len {
        Ok(values.into_owned().into_boxed_slice())
    } else {
        Err(SnapshotProblem::ArrayLength {
            record,
            expected: len,
            found: values.len(),
        })
    }
}

fn tier<S: Slots>(head: i64, slots: S, record: u32) -> Result<Tier<S>, SnapshotProblem> {
    if head != EMPTY_HEAD && head.abs() > MAX_TIME_MS {
        return Err(SnapshotProblem::TimeOutOfRange { record });
    }
    Ok(Tier { head, slots })
}

/// Writes the file: the temp file, its checksum, then the rename.
struct Writer {
    path: PathBuf,
    temp: PathBuf,
    file: BufWriter<File>,
    crc: crc32fast::Hasher,
    bytes: u64,
    series: u32,
    started: Instant,
}

impl Writer {
    fn create(path: &Path, header: &Header) -> Result<Self, SnapshotError> {
        let started = Instant::now();
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        let temp = path.with_file_name(name);
        let file = File::create(&temp).map_err(|source| SnapshotError::Io {
            op: IoOp::Create,
            path: temp.clone(),
            source,
        })?;
        let mut writer = Self {
            path: path.to_owned(),
            temp,
            file: BufWriter::with_capacity(1 << 16, file),
            crc: crc32fast::Hasher::new(),
            bytes: 0,
            series: 0,
            started,
        };
        let header = postcard::to_allocvec(header).map_err(|source| SnapshotError::Encode {
            key: "(header)".to_owned(),
            source,
        })?;
        writer.put(MAGIC)?;
        writer.put(&FORMAT_VERSION.to_le_bytes())?;
        writer.put(&len_u32(header.len()).to_le_bytes())?;
        writer.put(&header)?;
        Ok(writer)
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), SnapshotError> {
        self.crc.update(bytes);
        self.bytes += bytes.len() as u64;
        self.file
            .write_all(bytes)
            .map_err(|source| SnapshotError::Io {
                op: IoOp::Write,
                path: self.temp.clone(),
                source,
            })
    }

    /// Writes one encoded record.
    fn record(&mut self, encoded: &[u8]) -> Result<(), SnapshotError> {
        self.put(&len_u32(encoded.len()).to_le_bytes())?;
        self.put(encoded)?;
        self.series += 1;
        Ok(())
    }

    fn finish(mut self) -> Result<SnapshotReport, SnapshotError> {
        self.put(&0u32.to_le_bytes())?;
        self.put(&self.series.to_le_bytes())?;
        let crc = self.crc.clone().finalize();
        self.put(&crc.to_le_bytes())?;
        let io = |op, path: &Path| {
            let path = path.to_owned();
            move |source| SnapshotError::Io { op, path, source }
        };
        let file = self
            .file
            .into_inner()
            .map_err(io::IntoInnerError::into_error)
            .map_err(io(IoOp::Write, &self.temp))?;
        file.sync_all().map_err(io(IoOp::Sync, &self.temp))?;
        drop(file);
        fs::rename(&self.temp, &self.path).map_err(io(IoOp::Rename, &self.temp))?;
        let dir = match self.path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(IoOp::SyncDirectory, &self.path))?;
        Ok(SnapshotReport {
            path: self.path,
            bytes: self.bytes,
            series: self.series,
            duration: self.started.elapsed(),
        })
    }
}

/// Records are far below 4 GiB (a series is at most a few MiB); saturate rather than wrap,
/// so an impossible one fails the reader's checks instead of silently misframing.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn encode(series: &Series, buf: &mut Vec<u8>) -> Result<(), SnapshotError> {
    buf.clear();
    let encoded =
        postcard::to_extend(&Record::borrow(series), std::mem::take(buf)).map_err(|source| {
            SnapshotError::Encode {
                key: series.key.to_string(),
                source,
            }
        })?;
    *buf = encoded;
    Ok(())
}

/// Leaves no temp file behind on failure.
fn cleanup<T>(result: Result<T, SnapshotError>, path: &Path) -> Result<T, SnapshotError> {
    if result.is_err() {
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".tmp");
        // Best effort: the next snapshot truncates it anyway.
        let _ = fs::remove_file(path.with_file_name(name));
    }
    result
}

impl Store {
    /// Writes the whole store to `path` atomically. `now_ms` is recorded as the save time.
    /// Blocking I/O.
    pub fn save_snapshot(&self, path: &Path, now_ms: i64) -> Result<SnapshotReport, SnapshotError> {
        let result = (|| {
            let mut writer = Writer::create(path, &Header::for_config(&self.config, now_ms))?;
            let mut buf = Vec::new();
            for (_, series) in self.iter() {
                encode(series, &mut buf)?;
                writer.record(&buf)?;
            }
            writer.finish()
        })();
        cleanup(result, path)
    }

    /// Reads a snapshot into a new store of `config`. Series that do not fit its limits
    /// are skipped and counted. Blocking I/O; the file is read whole.
    pub fn load_snapshot(
        config: StoreConfig,
        path: &Path,
    ) -> Result<(Self, LoadReport), SnapshotError> {
        let started = Instant::now();
        let mut store = Self::new(config).map_err(SnapshotError::Config)?;
        let bytes = match fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(SnapshotError::Missing {
                    path: path.to_owned(),
                })
            }
            Err(source) => {
                return Err(SnapshotError::Io {
                    op: IoOp::Read,
                    path: path.to_owned(),
                    source,
                })
            }
        };
        let (saved_at_ms, loaded, skipped) = store.decode(&bytes, path)?;
        Ok((
            store,
            LoadReport {
                bytes: bytes.len() as u64,
                series_loaded: loaded,
                series_skipped: skipped,
                saved_at_ms,
                duration: started.elapsed(),
            },
        ))
    }

    /// Fills an empty store from a snapshot's bytes: (saved at, loaded, skipped).
    fn decode(&mut self, bytes: &[u8], path: &Path) -> Result<(i64, u32, u32), SnapshotError> {
        let truncated = || SnapshotError::Truncated {
            path: path.to_owned(),
            bytes: bytes.len() as u64,
        };
        let invalid = |problem| SnapshotError::Invalid {
            path: path.to_owned(),
            problem,
        };
        if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
            return Err(SnapshotError::NotASnapshot {
                path: path.to_owned(),
            });
        }
        if bytes.len() < PREAMBLE + TAIL {
            return Err(truncated());
        }
        let u32_at = |at: usize| {
            let mut word = [0u8; 4];
            word.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(word)
        };
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                path: path.to_owned(),
                found: version,
            });
        }
        let body_end = bytes.len() - 4;
        let expected = u32_at(body_end);
        let found = crc32fast::hash(&bytes[..body_end]);
        if found != expected {
            return Err(SnapshotError::ChecksumMismatch {
                path: path.to_owned(),
                expected,
                found,
            });
        }
        let records_end = bytes.len() - TAIL;
        let header_len = u32_at(12) as usize;
        let header_end = PREAMBLE
            .checked_add(header_len)
            .filter(|&end| end <= records_end)
            .ok_or_else(truncated)?;
        let header: Header =
            postcard::from_bytes(&bytes[PREAMBLE..header_end]).map_err(|source| {
                SnapshotError::Decode {
                    path: path.to_owned(),
                    part: "header",
                    source,
                }
            })?;
        if header != Header::for_config(&self.config, header.saved_at_ms) {
            return Err(SnapshotError::Incompatible {
                path: path.to_owned(),
            });
        }
        let (mut at, mut record, mut skipped) = (header_end, 0u32, 0u32);
        loop {
            if at + 4 > records_end + 4 {
                return Err(invalid(SnapshotProblem::RecordPastEnd));
            }
            let len = u32_at(at) as usize;
            at += 4;
            if len == 0 {
                break;
            }
            let end = at
                .checked_add(len)
                .filter(|&end| end <= records_end)
                .ok_or_else(|| invalid(SnapshotProblem::RecordPastEnd))?;
            let decoded: Record<'_> =
                postcard::from_bytes(&bytes[at..end]).map_err(|source| SnapshotError::Decode {
                    path: path.to_owned(),
                    part: "series record",
                    source,
                })?;
            let series = decoded.into_series(&self.config, record).map_err(invalid)?;
            if self.lookup_key(&series.key) {
                return Err(invalid(SnapshotProblem::DuplicateSeries {
                    record,
                    key: series.key.to_string(),
                }));
            }
            if self.fits(series.bytes) {
                self.insert(series);
            } else {
                skipped += 1;
            }
            record += 1;
            at = end;
        }
        let count = u32_at(at);
        if at != records_end + 4 || count != record {
            return Err(invalid(SnapshotProblem::SeriesCount {
                expected: count,
                found: record,
            }));
        }
        Ok((header.saved_at_ms, record - skipped, skipped))
    }

    fn lookup_key(&self, key: &SeriesKey) -> bool {
        let labels: Vec<(&str, &str)> = key.labels().collect();
        self.lookup(key.name(), &labels).is_some()
    }
}

impl StoreHandle {
    /// Writes the whole store to `path` atomically, taking the read lock once per series so
    /// writers wait at most for one series to be encoded. Each series is consistent; the
    /// file as a whole spans the few milliseconds the save takes. Blocking I/O: call it
    /// from a blocking task.
    pub fn save_snapshot(&self, path: &Path, now_ms: i64) -> Result<SnapshotReport, SnapshotError> {
        let header = self.read(|store| Header::for_config(&store.config, now_ms));
        let result = (|| {
            let mut writer = Writer::create(path, &header)?;
            let mut buf = Vec::new();
            // A series removed and registered again while the save runs can come up twice,
            // at its old and its new slot; the file holds it once.
            let mut saved = HashSet::new();
            let mut index = 0usize;
            loop {
                let step = self.read(|store| match store.entries.get(index) {
                    None => Ok(None),
                    Some(entry) => match &entry.series {
                        Some(series) if saved.insert(series.key.clone()) => {
                            encode(series, &mut buf).map(|()| Some(true))
                        }
                        _ => Ok(Some(false)),
                    },
                })?;
                match step {
                    None => break,
                    Some(true) => writer.record(&buf)?,
                    Some(false) => {}
                }
                index += 1;
            }
            writer.finish()
        })();
        cleanup(result, path)
    }
}
