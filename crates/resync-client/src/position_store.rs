//! Where a follower keeps its channels' positions, so that a restarted process continues
//! where it stopped instead of from now.
//!
//! A [`Subscription`](crate::Subscription) of a client built with
//! [`ClientBuilder::position_store`](crate::ClientBuilder::position_store) starts from the
//! position kept for its channel (unless [`since`](crate::Subscription::since) says
//! otherwise), and keeps the position of each update once the application has handled it:
//! when it asks for the next update, or drops the subscription. A process that stops between
//! two updates continues with the next one; one killed while handling an update gets that
//! update again (at least once). An application that needs exactly once keeps the position
//! in the same transaction as its own state instead, and passes it to `since`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use resync_protocol::{Channel, Cursor, Position};

use crate::{Error, Result};

/// Keeps channel positions across processes. Called from the task that polls the
/// subscription, so keep it quick (the [`FileStore`] writes one small file).
pub trait PositionStore: Send + Sync {
    /// The position kept for `channel`, if any.
    fn load(&self, channel: &Channel) -> Option<Position>;

    /// Keeps `position` as where `channel` stands now.
    fn save(&self, channel: &Channel, position: &Position) -> Result<()>;
}

/// Positions kept in one file, as a cursor (`channel:epoch:seq,…`, the format of
/// `docs/protocol.md`). Each save replaces the file atomically (a temporary file beside it,
/// then a rename), so a crash leaves the previous positions or the new ones, never a torn
/// file. One process per file.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    cursor: Mutex<Cursor>,
}

impl FileStore {
    /// Opens the positions kept at `path` (none yet when the file does not exist). An
    /// unreadable file is an error, not an empty store: starting from now would skip events.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let cursor = match std::fs::read_to_string(&path) {
            Ok(text) => Cursor::parse(text.trim()).map_err(|error| {
                Error::PositionStore(format!("{}: not a cursor: {error}", path.display()))
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Cursor::new(),
            Err(error) => {
                return Err(Error::PositionStore(format!(
                    "reading {}: {error}",
                    path.display()
                )));
            }
        };
        Ok(Self {
            path,
            cursor: Mutex::new(cursor),
        })
    }

    /// Where the positions are kept.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl PositionStore for FileStore {
    fn load(&self, channel: &Channel) -> Option<Position> {
        self.cursor
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(channel)
            .cloned()
    }

    fn save(&self, channel: &Channel, position: &Position) -> Result<()> {
        let mut cursor = self.cursor.lock().unwrap_or_else(PoisonError::into_inner);
        if cursor.get(channel) == Some(position) {
            return Ok(());
        }
        // Kept in memory only once written: a failed write is tried again at the next save.
        let mut next = cursor.clone();
        next.set(channel.clone(), position.clone());
        let mut temporary = self.path.clone().into_os_string();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let written = write_new(&temporary, format!("{next}\n").as_bytes())
            .and_then(|()| std::fs::rename(&temporary, &self.path));
        written.map_err(|error| {
            Error::PositionStore(format!("writing {}: {error}", self.path.display()))
        })?;
        *cursor = next;
        Ok(())
    }
}

/// Writes `bytes` to a file `path` that this call creates: never through a file or link
/// already there (a directory others can write to may hold one put there to be overwritten).
/// A leftover of a crash is removed first; if another appears meanwhile, the write fails.
fn write_new(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
    };
    let mut file = match create() {
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(path)?;
            create()?
        }
        other => other?,
    };
    file.write_all(bytes)?;
    // On the disk before the rename: a power cut leaves the old file or the whole new one.
    file.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

    use super::*;

    fn position(epoch: &str, seq: u64) -> Position {
        Position::new(epoch.parse().unwrap(), resync_protocol::Seq::new(seq))
    }

    #[test]
    fn positions_saved_are_loaded_by_the_next_process() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("positions");
        let news: Channel = "news".parse().unwrap();
        let orders: Channel = "orders".parse().unwrap();
        let store = FileStore::open(&path).unwrap();
        assert_eq!(store.load(&news), None, "a new file holds nothing");
        store.save(&news, &position("e1", 4)).unwrap();
        store.save(&orders, &position("e2", 9)).unwrap();
        store.save(&news, &position("e1", 5)).unwrap();
        let next = FileStore::open(&path).unwrap();
        assert_eq!(next.load(&news), Some(position("e1", 5)));
        assert_eq!(next.load(&orders), Some(position("e2", 9)));
        assert!(
            !directory.path().join("positions.tmp").exists(),
            "renamed into place"
        );
    }

    #[test]
    fn an_unreadable_file_is_an_error_not_a_fresh_start() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("positions");
        std::fs::write(&path, "not a cursor").unwrap();
        let error = FileStore::open(&path).unwrap_err();
        assert!(matches!(error, Error::PositionStore(_)), "{error}");
        assert!(error.to_string().contains("not a cursor"), "{error}");
    }

    #[cfg(unix)]
    #[test]
    fn a_link_left_where_the_temporary_file_goes_is_not_written_through() {
        let directory = tempfile::tempdir().unwrap();
        let victim = directory.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let path = directory.path().join("positions");
        std::os::unix::fs::symlink(&victim, directory.path().join("positions.tmp")).unwrap();
        let store = FileStore::open(&path).unwrap();
        store
            .save(&"news".parse().unwrap(), &position("e1", 1))
            .unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(
            FileStore::open(&path)
                .unwrap()
                .load(&"news".parse().unwrap()),
            Some(position("e1", 1))
        );
    }

    #[test]
    fn a_save_that_cannot_be_written_says_why() {
        let directory = tempfile::tempdir().unwrap();
        let store = FileStore::open(directory.path().join("missing/positions")).unwrap();
        let error = store
            .save(&"news".parse().unwrap(), &position("e1", 1))
            .unwrap_err();
        assert!(error.to_string().contains("writing"), "{error}");
    }
}
