//! Opening a store: the lock, the run records, and what an unclean end before this one means.

use std::path::{Path, PathBuf};

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use resync_protocol::Epoch;

use crate::layout::{RunRecord, decode_number};

/// Why a [`DiskBroker`](crate::DiskBroker) could not open its data directory.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Another process has the data directory open: one process per directory.
    #[error(
        "the data directory {path} is in use by another process (one resync process per data directory)"
    )]
    InUse {
        /// The data directory.
        path: PathBuf,
    },
    /// The data directory could not be made, read or synced.
    #[error("cannot use the data directory {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The store refused to open (its files are damaged or of another version).
    #[error("the store in {path} cannot be opened: {message}")]
    Store {
        /// The data directory.
        path: PathBuf,
        /// What the store said.
        message: String,
    },
    /// The broker runs background tasks (syncs) and must be opened inside a tokio runtime.
    #[error("a DiskBroker must be opened inside a tokio runtime")]
    NoRuntime,
}

/// The keyspaces of an open store (see `layout.rs`).
pub(crate) struct Store {
    pub(crate) db: Database,
    pub(crate) events: Keyspace,
    pub(crate) channels: Keyspace,
    pub(crate) keys: Keyspace,
    pub(crate) records: Keyspace,
    /// The latest event of each key of keyed channels (layout 2).
    pub(crate) state: Keyspace,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Store").finish_non_exhaustive()
    }
}

/// What opening found and decided.
pub(crate) struct Opened {
    pub(crate) store: Store,
    /// This run's number.
    pub(crate) run: u64,
    /// Channels last written in a run up to this one may have lost the tail of their history
    /// to a power cut: they start over in a new epoch when next touched.
    pub(crate) lost_through: Option<u64>,
    /// The epoch of channels never published.
    pub(crate) shared_epoch: Epoch,
    /// Where the store's files are (see `RunRecord::place`).
    pub(crate) place: String,
}

const RUN: &str = "run";
const LAYOUT: &str = "layout";
/// The version of `layout.rs` this build reads and writes. A build that changes the layout
/// raises it and converts older stores at opening; a store of another version is refused,
/// never misread.
const LAYOUT_VERSION: u64 = 2;
const LOST_THROUGH: &str = "lost_through";
pub(crate) const SHARED_EPOCH: &str = "shared_epoch";

pub(crate) fn new_epoch() -> Epoch {
    Epoch::from_random_bits(fastrand::u64(..))
}

/// The boot this machine is in: changed by a reboot, a power cut, an operating-system crash
/// (Linux's `boot_id`); empty where it cannot be read, which counts as a different boot.
pub(crate) fn current_boot() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|text| text.trim().to_owned())
        .unwrap_or_default()
}

pub(crate) fn open(
    dir: &Path,
    boot: &str,
    acknowledges_unsynced: bool,
) -> Result<Opened, OpenError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| OpenError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let store_error = |error: fjall::Error| match error {
        fjall::Error::Locked => OpenError::InUse {
            path: dir.to_owned(),
        },
        other => OpenError::Store {
            path: dir.to_owned(),
            message: other.to_string(),
        },
    };
    // Bounded memory and a bounded replay at opening: a block cache of 16 MiB, write buffers
    // of 16 MiB for events and 4 MiB for the rest, and at most 64 MiB of journal (what an
    // opening after a crash replays) before the write buffers are flushed to tables.
    let db = Database::builder(dir.join("store"))
        .worker_threads(1)
        .cache_size(16 * 1024 * 1024)
        .max_journaling_size(64 * 1024 * 1024)
        .open()
        .map_err(store_error)?;
    let keyspace = |name: &str, memtable: u64| {
        db.keyspace(name, || {
            KeyspaceCreateOptions::default().max_memtable_size(memtable)
        })
        .map_err(store_error)
    };
    let store = Store {
        events: keyspace("events", 16 * 1024 * 1024)?,
        channels: keyspace("channels", 4 * 1024 * 1024)?,
        keys: keyspace("keys", 4 * 1024 * 1024)?,
        records: keyspace("store", 4 * 1024 * 1024)?,
        state: keyspace("state", 4 * 1024 * 1024)?,
        db: db.clone(),
    };
    let read = |key: &str| store.records.get(key).map_err(store_error);
    let corrupt = |what: &str| OpenError::Store {
        path: dir.to_owned(),
        message: format!("its {what} record cannot be read"),
    };
    match read(LAYOUT)?.map(|value| decode_number(&value)) {
        // Layout 1 is layout 2 without keyed channels: it opens as it is (and is recorded as
        // 2 below, so an older build refuses it once keyed events may be in it).
        None | Some(Some(1 | LAYOUT_VERSION)) => {}
        Some(other) => {
            return Err(OpenError::Store {
                path: dir.to_owned(),
                message: format!(
                    "its layout is version {}, and this build reads version {LAYOUT_VERSION}",
                    other.map_or_else(|| "unreadable".to_owned(), |version| version.to_string())
                ),
            });
        }
    }
    let previous = match read(RUN)? {
        Some(value) => Some(RunRecord::decode(&value).ok_or_else(|| corrupt(RUN))?),
        None => None,
    };
    let mut lost_through = match read(LOST_THROUGH)? {
        Some(value) => Some(decode_number(&value).ok_or_else(|| corrupt(LOST_THROUGH))?),
        None => None,
    };
    let mut shared_epoch = match read(SHARED_EPOCH)? {
        Some(value) => std::str::from_utf8(&value)
            .ok()
            .and_then(|text| Epoch::new(text).ok())
            .ok_or_else(|| corrupt(SHARED_EPOCH))?,
        None => new_epoch(),
    };
    // The directory's own identity: a marker file made anew (a new inode) at every opening,
    // whose inode the run record keeps. A copy, a restore over the directory (rsync, tar,
    // cp over the files) or a directory without it does not match the record.
    let marker = dir.join(MARKER);
    let pending = dir.join(MARKER_PENDING);
    if let (Some(previous), Ok(pending_place)) = (previous.as_ref(), inode_of(&pending))
        && previous.place == pending_place
    {
        // The last opening stopped between recording its marker and putting it in place.
        std::fs::rename(&pending, &marker).map_err(io(&marker))?;
    }
    let moved = previous
        .as_ref()
        .is_some_and(|previous| inode_of(&marker).ok().as_ref() != Some(&previous.place));
    if moved {
        // A copy or a restored backup: it is behind what clients saw, by any amount.
        tracing::warn!(
            "the store's files are not where its last run left them (copied or restored from a \
             backup): channels written before now start over in new epochs, and their clients \
             get resets"
        );
        lost_through = previous.as_ref().map(|previous| previous.run);
        shared_epoch = new_epoch();
    } else if let Some(previous) = previous.as_ref().filter(|previous| !previous.clean) {
        let machine_went_down = boot.is_empty() || previous.boot != boot;
        if previous.acknowledged_unsynced && machine_went_down {
            // The operating system went down with the process: what it had not written
            // back may be gone, and clients may hold positions of it.
            tracing::warn!(
                run = previous.run,
                "the store was not closed and the machine restarted since: channels written \
                 before now start over in new epochs, and their clients get resets"
            );
            lost_through = Some(previous.run);
            shared_epoch = new_epoch();
        } else {
            // Killed with the operating system alive: everything it wrote is in the
            // operating system's buffers. Sync it now, so a later power cut cannot take it.
            sync_tree(dir)?;
        }
    }
    let run = previous.map_or(1, |previous| previous.run + 1);
    std::fs::write(
        &pending,
        "resync's data directory marker: a copy of this directory is not this directory\n",
    )
    .and_then(|()| std::fs::File::open(&pending)?.sync_all())
    .map_err(io(&pending))?;
    let place = inode_of(&pending).map_err(io(&pending))?;
    let record = RunRecord {
        run,
        clean: false,
        acknowledged_unsynced: acknowledges_unsynced,
        boot: boot.to_owned(),
        place: place.clone(),
    };
    let mut batch = db.batch();
    batch.insert(&store.records, LAYOUT, LAYOUT_VERSION.to_le_bytes());
    batch.insert(&store.records, RUN, record.encode());
    batch.insert(
        &store.records,
        SHARED_EPOCH,
        shared_epoch.as_str().as_bytes(),
    );
    if let Some(lost_through) = lost_through {
        batch.insert(&store.records, LOST_THROUGH, lost_through.to_le_bytes());
    }
    batch.commit().map_err(store_error)?;
    db.persist(PersistMode::SyncAll).map_err(store_error)?;
    std::fs::rename(&pending, &marker).map_err(io(&marker))?;
    std::fs::File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(io(dir))?;
    Ok(Opened {
        store,
        run,
        lost_through,
        shared_epoch,
        place,
    })
}

/// Marks the run clean, after everything it wrote is synced.
pub(crate) fn close_clean(store: &Store, record: RunRecord) {
    let record = RunRecord {
        clean: true,
        ..record
    };
    let synced = store
        .db
        .persist(PersistMode::SyncAll)
        .and_then(|()| store.records.insert(RUN, record.encode()))
        .and_then(|()| store.db.persist(PersistMode::SyncAll));
    if let Err(error) = synced {
        tracing::error!(%error, "the store could not be closed cleanly; the next start treats this run as killed");
    }
}

/// The marker file of a data directory, made anew at every opening (`RunRecord::place`).
const MARKER: &str = "instance";
const MARKER_PENDING: &str = "instance.pending";

/// The inode of `path`: a new file has a new one; a rename keeps it, and so do a remount and
/// a reboot (the device number may change there, so it is not used).
fn inode_of(path: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(path)?.ino().to_string())
}

/// Syncs every file and directory under `dir` to the disk.
fn sync_tree(dir: &Path) -> Result<(), OpenError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| OpenError::Io { path, source }
    };
    let mut pending = vec![dir.to_owned()];
    while let Some(path) = pending.pop() {
        let metadata = std::fs::metadata(&path).map_err(io(&path))?;
        if metadata.is_dir() {
            for entry in std::fs::read_dir(&path).map_err(io(&path))? {
                pending.push(entry.map_err(io(&path))?.path());
            }
        }
        if metadata.is_dir() || metadata.is_file() {
            std::fs::File::open(&path)
                .and_then(|file| file.sync_all())
                .map_err(io(&path))?;
        }
    }
    Ok(())
}
