//! The write-lock watcher for SQLite.
//!
//! SQLite has no server to ask what runs: the release's own process holds the database. What
//! another process can see without taking part is the file's locks, which SQLite takes with
//! POSIX `fcntl` locks at fixed offsets (its `os_unix.c` and `wal.c` describe them):
//!
//! - rollback-journal mode: a writer holds the RESERVED byte (`0x40000001` in the database
//!   file) from its first write to its commit (other writers wait), and the PENDING byte
//!   (`0x40000000`) while it needs the EXCLUSIVE lock to write the file (readers wait too);
//! - WAL mode: a writer holds the WAL write lock (byte 120 of the `-shm` file); readers are
//!   never blocked.
//!
//! Every [`super::PERIOD`] the watcher asks the kernel (`F_GETLK`: a question, not a lock)
//! whether another process holds those bytes. A hold is one write transaction, measured from
//! the first to the last sample that saw it. When it ends, the watcher reads the schema
//! (`sqlite_master`) and compares it with the one before: the objects created, changed or
//! dropped are the statement's text, a table or index whose root page moved was rebuilt (a
//! rewrite: SQLite's "12-step" `ALTER TABLE`; with `auto_vacuum`, a root page moved by a drop
//! is a move). Reading never waits for a lock and never makes the release wait: in rollback
//! mode the file is read with `immutable=1` (no lock at all) and the read counts only if the
//! file's change counter did not move and no writer started meanwhile; in WAL mode only while
//! another connection is open (a reader then blocks no writer, and never runs recovery).
//!
//! What it cannot see: the statements inside one transaction one by one (their sum is the
//! hold), and a transaction shorter than a sampling period (the file changed between two
//! samples: its schema changes are reported on their own, with no lock and 0 ms), and a release that holds the database in `locking_mode=EXCLUSIVE` or
//! without the `-shm` file (no lock to see: reported as one change at the end).
//!
//! dryrun's own process must not hold the file open meanwhile: closing any descriptor of a file
//! drops all of the process's POSIX locks on it. The trace watches only databases that are
//! restored and masked (`engine::migrate`: masking another database can go on while a service
//! installs, and is left alone); checks start after the install.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{LockHold, Migration, TraceReport, millis};

/// Offsets of SQLite's lock bytes (`os_unix.c`: `PENDING_BYTE`, `RESERVED_BYTE`; `wal.c`:
/// `WALINDEX_LOCK_OFFSET` + `WAL_WRITE_LOCK`).
const PENDING_BYTE: i64 = 0x4000_0000;
const RESERVED_BYTE: i64 = PENDING_BYTE + 1;
const WAL_WRITE_BYTE: i64 = 120;
/// The `-shm` byte every connection holds a read lock on while it is open (`os_unix.c`:
/// `UNIX_SHM_DMS`).
const SHM_DMS_BYTE: i64 = 128;

/// After the install ends, how long a write still in progress (a release's background process)
/// is waited for before the watcher reports what it has.
const LINGER: Duration = Duration::from_secs(2);

/// Why the watcher could not work.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The database file or its lock state.
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    /// The schema could not be read.
    #[error("cannot read the schema of {0}: {1}")]
    Schema(String, String),
    /// The watcher's thread ended abnormally.
    #[error("the watcher stopped: {0}")]
    Stopped(String),
}

/// What a watcher saw: the write transactions and the trace's report.
type Seen = Result<(Vec<Migration>, TraceReport), WatchError>;

/// A running watcher; [`Watcher::stop`] ends it and returns what it saw.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Seen>>,
}

impl Drop for Watcher {
    /// A watcher dropped without [`Watcher::stop`] (its install panicked) still ends.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher").finish_non_exhaustive()
    }
}

impl Watcher {
    /// Reads the schema and starts sampling the locks of the SQLite file at `path` (resource
    /// `database`) every `period`.
    ///
    /// # Errors
    /// The file cannot be opened or its schema read.
    pub fn start(database: &str, path: &Path, period: Duration) -> Result<Watcher, WatchError> {
        let file = File::open(path).map_err(|e| WatchError::Io(path.display().to_string(), e))?;
        let before = settled_schema(path, &file, Duration::from_secs(5))?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let (database, path) = (database.to_string(), path.to_path_buf());
        let thread = std::thread::Builder::new()
            .name("sqlite-watch".into())
            .spawn(move || watch(&database, &path, &file, before, period, &s))
            .map_err(|e| WatchError::Io("cannot start the watcher's thread".into(), e))?;
        Ok(Watcher {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops sampling (a write still in progress is waited for up to 2 s) and returns the
    /// write transactions seen, worst first left to the caller, and the trace's report.
    ///
    /// # Errors
    /// The schema could not be read at the end, or the thread failed.
    pub async fn stop(mut self) -> Result<(Vec<Migration>, TraceReport), WatchError> {
        self.stop.store(true, Ordering::SeqCst);
        let Some(thread) = self.thread.take() else {
            return Err(WatchError::Stopped("stopped twice".into()));
        };
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(|e| WatchError::Stopped(e.to_string()))?
            .map_err(|_| WatchError::Stopped("its thread panicked".into()))?
    }
}

/// One object of `sqlite_master`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Object {
    kind: String,
    rootpage: i64,
    sql: Option<String>,
}

type Schema = BTreeMap<String, Object>;

/// Which kind of lock a writer holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    None,
    /// Other writers wait.
    Reserved,
    /// Readers wait too (rollback mode, while the file is written).
    Exclusive,
}

fn held_by_other(file: &File, start: i64, write_only: bool) -> std::io::Result<bool> {
    let mut fl = nix::libc::flock {
        l_type: nix::libc::F_WRLCK as i16,
        l_whence: nix::libc::SEEK_SET as i16,
        l_start: start,
        l_len: 1,
        l_pid: 0,
    };
    nix::fcntl::fcntl(file, nix::fcntl::FcntlArg::F_GETLK(&mut fl))
        .map_err(std::io::Error::from)?;
    let t = i32::from(fl.l_type);
    Ok(if write_only {
        t == nix::libc::F_WRLCK
    } else {
        t != nix::libc::F_UNLCK
    })
}

/// The database's write lock as another process holds it now.
fn writer(file: &File, shm: Option<&File>) -> std::io::Result<Writer> {
    if let Some(shm) = shm
        && held_by_other(shm, WAL_WRITE_BYTE, true)?
    {
        return Ok(Writer::Reserved);
    }
    // Readers take the PENDING byte for an instant as a read lock: only a write lock counts.
    if held_by_other(file, PENDING_BYTE, true)? {
        return Ok(Writer::Exclusive);
    }
    if held_by_other(file, RESERVED_BYTE, false)? {
        return Ok(Writer::Reserved);
    }
    Ok(Writer::None)
}

/// What the file's header says.
#[derive(Debug, Clone, Copy, Default)]
struct Header {
    /// WAL mode (byte 18 is 2).
    wal: bool,
    /// The change counter (bytes 24..28): rollback-mode commits move it.
    counter: u32,
    /// `auto_vacuum` on (bytes 52..56, the largest root page, are not 0): dropping a table
    /// moves other tables' root pages.
    auto_vacuum: bool,
}

fn header(file: &File) -> Header {
    let mut h = [0u8; 56];
    match file.read_exact_at(&mut h, 0) {
        Ok(()) => Header {
            wal: h[18] == 2,
            counter: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
            auto_vacuum: h[52..56] != [0, 0, 0, 0],
        },
        Err(_) => Header::default(),
    }
}

fn uri(path: &Path, immutable: bool) -> String {
    let mut p = String::new();
    for c in path.display().to_string().chars() {
        match c {
            '%' => p.push_str("%25"),
            '?' => p.push_str("%3f"),
            '#' => p.push_str("%23"),
            c => p.push(c),
        }
    }
    if immutable {
        format!("file:{p}?mode=ro&immutable=1")
    } else {
        format!("file:{p}?mode=ro")
    }
}

fn read_schema(path: &Path, immutable: bool) -> Result<Schema, String> {
    use rusqlite::OpenFlags;
    let c = rusqlite::Connection::open_with_flags(
        uri(path, immutable),
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
    )
    .map_err(|e| e.to_string())?;
    let mut st = c
        .prepare(
            "SELECT name, type, rootpage, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'",
        )
        .map_err(|e| e.to_string())?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                Object {
                    kind: r.get(1)?,
                    rootpage: r.get::<_, Option<i64>>(2)?.unwrap_or(0),
                    sql: r.get(3)?,
                },
            ))
        })
        .map_err(|e| e.to_string())?;
    rows.collect::<Result<Schema, _>>()
        .map_err(|e| e.to_string())
}

/// The schema, read while no writer holds the file (`None`: one was, or the read was torn;
/// `Some(Err)`: it cannot be read now).
///
/// Without a WAL file the file is complete and is read `immutable`, without any lock, and the
/// read counts only if no writer came and the change counter stayed. With one, the commits are
/// in the WAL and only an ordinary reader sees them; it blocks no writer, but the first
/// connection to a WAL database runs recovery under locks another connection would wait for.
/// So it reads only while another process is connected (holds the `-shm` file's DMS byte),
/// and never is that first connection (but for an instant's race: the release closing its
/// last connection between the check and the open).
fn schema_now(path: &Path, file: &File, shm: Option<&File>) -> Option<Result<Schema, String>> {
    let h = header(file);
    if writer(file, shm).ok()? != Writer::None {
        return None;
    }
    let immutable = !(h.wal && side_file(path, "-wal").exists());
    if !immutable {
        let connected = match shm {
            Some(f) => held_by_other(f, SHM_DMS_BYTE, false).ok()?,
            None => false,
        };
        if !connected {
            return Some(Err(
                "its commits are in a WAL no connection has open (reading it would run recovery, which the release could wait for)"
                    .into(),
            ));
        }
    }
    let s = read_schema(path, immutable);
    if immutable && (writer(file, shm).ok()? != Writer::None || header(file).counter != h.counter) {
        return None;
    }
    Some(s)
}

/// The schema, waiting up to `wait` for a moment without a writer.
fn settled_schema(path: &Path, file: &File, wait: Duration) -> Result<Schema, WatchError> {
    let t = Instant::now();
    let mut last = String::from("a writer held the file");
    loop {
        let shm = File::open(side_file(path, "-shm")).ok();
        match schema_now(path, file, shm.as_ref()) {
            Some(Ok(s)) => return Ok(s),
            Some(Err(e)) => last = e,
            None => {}
        }
        if t.elapsed() > wait {
            return Err(WatchError::Schema(path.display().to_string(), last));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What changes when a transaction commits: the file's change counter (rollback mode) and the
/// WAL file's size and time (WAL mode).
fn fingerprint(path: &Path, file: &File) -> (u32, Option<(u64, Option<std::time::SystemTime>)>) {
    let wal = std::fs::metadata(side_file(path, "-wal"))
        .ok()
        .map(|m| (m.len(), m.modified().ok()));
    (header(file).counter, wal)
}

/// `FILE-shm` or `FILE-wal`.
fn side_file(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

/// A write transaction seen: first and last sample with the write lock, and with the file's
/// exclusive lock.
#[derive(Debug, Clone, Copy)]
struct Hold {
    first: Instant,
    last: Instant,
    exclusive: Option<(Instant, Instant)>,
}

fn span(a: Instant, b: Instant) -> u64 {
    millis(b.saturating_duration_since(a))
}

/// What changed between two schemas: the text (new and changed objects' SQL as the file keeps
/// it, dropped objects as `DROP`), and the objects rebuilt (root page moved). With
/// `auto_vacuum` on, dropping an object moves another one's root page into the freed place: a
/// moved root page with an unchanged definition is then a move, not a rewrite.
fn diff(before: &Schema, after: &Schema, auto_vacuum: bool) -> (Vec<String>, Vec<String>) {
    let mut text = Vec::new();
    let mut rebuilt = Vec::new();
    let relocating = auto_vacuum && before.keys().any(|k| !after.contains_key(k));
    for (name, o) in after {
        let sql = o
            .sql
            .clone()
            .unwrap_or_else(|| format!("{} {name}", o.kind));
        match before.get(name) {
            None => text.push(sql),
            Some(b) if b.sql != o.sql => {
                text.push(format!("{name} became: {sql}"));
                if b.rootpage != o.rootpage && b.rootpage != 0 {
                    rebuilt.push(name.clone());
                }
            }
            Some(b) if b.rootpage != o.rootpage && b.rootpage != 0 && relocating => {
                text.push(format!("{name} moved (auto_vacuum)"));
            }
            Some(b) if b.rootpage != o.rootpage && b.rootpage != 0 => {
                text.push(format!("{name} rebuilt"));
                rebuilt.push(name.clone());
            }
            Some(_) => {}
        }
    }
    for (name, o) in before {
        if !after.contains_key(name) {
            text.push(format!("DROP {} {name}", o.kind.to_uppercase()));
        }
    }
    (text, rebuilt)
}

/// The sampling loop (its own thread: one `fcntl` per lock byte per sample).
fn watch(
    database: &str,
    path: &Path,
    file: &File,
    mut schema: Schema,
    period: Duration,
    stop: &AtomicBool,
) -> Result<(Vec<Migration>, TraceReport), WatchError> {
    let bytes_before = file.metadata().map(|m| m.len()).ok();
    let relation = format!("{database} (the whole database file)");
    let mut out: Vec<Migration> = Vec::new();
    let mut rewritten: BTreeSet<String> = BTreeSet::new();
    let (mut samples, mut max_gap, mut prev) = (0u64, 0u64, None::<Instant>);
    let mut hold: Option<Hold> = None;
    let mut ended: Vec<Hold> = Vec::new();
    let mut stopping: Option<Instant> = None;
    let mut seen = fingerprint(path, file);
    loop {
        if stopping.is_none() && stop.load(Ordering::SeqCst) {
            stopping = Some(Instant::now());
        }
        // Opened afresh each time: the last connection to close deletes it, the next one
        // makes a new one.
        let shm = File::open(side_file(path, "-shm")).ok();
        let now = Instant::now();
        let w = writer(file, shm.as_ref())
            .map_err(|e| WatchError::Io(path.display().to_string(), e))?;
        samples += 1;
        if let Some(p) = prev {
            max_gap = max_gap.max(span(p, now));
        }
        prev = Some(now);
        if w == Writer::None {
            ended.extend(hold.take());
        } else {
            let h = hold.get_or_insert(Hold {
                first: now,
                last: now,
                exclusive: None,
            });
            h.last = now;
            if w == Writer::Exclusive {
                h.exclusive = Some(h.exclusive.map_or((now, now), |(a, _)| (a, now)));
            }
        }
        // Between writes: the schema after the holds that ended, or after a commit no sample
        // saw (the file changed: a transaction shorter than a period).
        let fp = fingerprint(path, file);
        if hold.is_none()
            && (!ended.is_empty() || fp != seen)
            && let Some(Ok(after)) = schema_now(path, file, shm.as_ref())
        {
            let (text, rebuilt) = diff(&schema, &after, header(file).auto_vacuum);
            if !ended.is_empty() || !text.is_empty() {
                out.push(migration(
                    database,
                    &relation,
                    &ended,
                    &text,
                    &rebuilt,
                    bytes_before,
                ));
                rewritten.extend(rebuilt);
            }
            ended.clear();
            schema = after;
            seen = fp;
        }
        let quiet = hold.is_none() && ended.is_empty();
        if let Some(s) = stopping
            && (quiet || s.elapsed() > LINGER)
        {
            break;
        }
        std::thread::sleep(period.saturating_sub(now.elapsed()));
    }
    // Whatever changed without a hold the samples saw (a transaction shorter than a period),
    // and a hold still open after the linger, are one last entry. A schema that cannot be
    // read now (a writer that keeps writing, an unread WAL) loses nothing seen before: the
    // last holds are reported without their schema change.
    ended.extend(hold.take());
    let (text, rebuilt) = match settled_schema(path, file, LINGER) {
        Ok(after) => diff(&schema, &after, header(file).auto_vacuum),
        Err(e) if !ended.is_empty() => (
            vec![format!(
                "write transaction (its schema change not read: {e})"
            )],
            Vec::new(),
        ),
        Err(_) => (Vec::new(), Vec::new()),
    };
    if !text.is_empty() || !ended.is_empty() {
        out.push(migration(
            database,
            &relation,
            &ended,
            &text,
            &rebuilt,
            bytes_before,
        ));
        rewritten.extend(rebuilt);
    }
    Ok((
        out,
        TraceReport {
            database: database.to_string(),
            status: "traced".into(),
            reason: None,
            samples,
            period_ms: millis(period),
            max_gap_ms: max_gap,
            rewritten: rewritten.into_iter().collect(),
        },
    ))
}

/// One write transaction (or several a schema read could not separate) as a [`Migration`].
fn migration(
    database: &str,
    relation: &str,
    holds: &[Hold],
    text: &[String],
    rebuilt: &[String],
    bytes: Option<u64>,
) -> Migration {
    let lock = |mode: &str, blocks: &str, held_ms: u64| LockHold {
        relation: relation.to_string(),
        mode: mode.to_string(),
        held_ms,
        blocks: Some(blocks.to_string()),
        existing: true,
        rows: None,
        bytes,
    };
    let write = holds.iter().map(|h| span(h.first, h.last)).max();
    let exclusive = holds
        .iter()
        .filter_map(|h| h.exclusive.map(|(a, b)| span(a, b)))
        .max();
    let mut locks: Vec<LockHold> = write
        .map(|ms| lock("WRITE", "writes", ms))
        .into_iter()
        .collect();
    locks.extend(exclusive.map(|ms| lock("EXCLUSIVE", "reads and writes", ms)));
    let statement = if text.is_empty() {
        "write transaction (no schema change)".to_string()
    } else {
        text.join(";\n")
    };
    Migration {
        database: database.to_string(),
        statement,
        duration_ms: holds.iter().map(|h| span(h.first, h.last)).sum(),
        locks,
        rewrites: rebuilt.to_vec(),
        wal_bytes: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(kind: &str, root: i64, sql: &str) -> Object {
        Object {
            kind: kind.into(),
            rootpage: root,
            sql: Some(sql.into()),
        }
    }

    #[test]
    fn the_diff_names_new_changed_rebuilt_and_dropped_objects() {
        let before: Schema = [
            (
                "orders".to_string(),
                obj("table", 2, "CREATE TABLE orders(id)"),
            ),
            (
                "events".to_string(),
                obj("table", 3, "CREATE TABLE events(id)"),
            ),
            ("old".to_string(), obj("table", 4, "CREATE TABLE old(id)")),
            ("big".to_string(), obj("table", 5, "CREATE TABLE big(id)")),
        ]
        .into();
        let after: Schema = [
            // ADD COLUMN: the text changes, the pages stay (metadata only).
            (
                "orders".to_string(),
                obj("table", 2, "CREATE TABLE orders(id, notes)"),
            ),
            // The 12-step rebuild: new text, new root page.
            (
                "events".to_string(),
                obj("table", 9, "CREATE TABLE events(id NOT NULL)"),
            ),
            ("big".to_string(), obj("table", 12, "CREATE TABLE big(id)")),
            (
                "i".to_string(),
                obj("index", 10, "CREATE INDEX i ON orders(id)"),
            ),
        ]
        .into();
        let (text, rebuilt) = diff(&before, &after, false);
        assert_eq!(
            text,
            [
                "big rebuilt",
                "events became: CREATE TABLE events(id NOT NULL)",
                "CREATE INDEX i ON orders(id)",
                "orders became: CREATE TABLE orders(id, notes)",
                "DROP TABLE old",
            ]
        );
        assert_eq!(rebuilt, ["big", "events"]);
        // With auto_vacuum, a drop moves another table's root page: a move, not a rewrite.
        let after_drop: Schema = [
            (
                "orders".to_string(),
                obj("table", 2, "CREATE TABLE orders(id)"),
            ),
            (
                "events".to_string(),
                obj("table", 3, "CREATE TABLE events(id)"),
            ),
            ("big".to_string(), obj("table", 4, "CREATE TABLE big(id)")),
        ]
        .into();
        let (text, rebuilt) = diff(&before, &after_drop, true);
        assert_eq!(text, ["big moved (auto_vacuum)", "DROP TABLE old"]);
        assert!(rebuilt.is_empty());
        let (_, rebuilt) = diff(&before, &after_drop, false);
        assert_eq!(rebuilt, ["big"]);
    }

    #[test]
    fn paths_with_uri_characters_are_escaped() {
        assert_eq!(
            uri(Path::new("/s/a?b#c%d.sqlite"), true),
            "file:/s/a%3fb%23c%25d.sqlite?mode=ro&immutable=1"
        );
    }
}
