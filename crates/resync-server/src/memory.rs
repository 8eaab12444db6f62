//! Gives the system back the memory a burst of connections freed.
//!
//! glibc's allocator keeps freed memory in its per-thread arenas and returns only the free top
//! of each heap. A server's memory is a burst of connections' buffers freed in no order, so
//! without help it stays resident at its high-water mark: after a flood of non-reading long
//! polls closed, 62 of the process's 74 MiB were free memory glibc kept (`malloc_trim` gave it
//! back: docs/decisions.md, where mimalloc, tried instead, held more). `docs/security.md`
//! promises memory back after the clients go; this keeps it.

use std::time::Duration;

/// How often the allocator is asked to give free memory back. A trim walks every arena and
/// holds each one's lock briefly, so it runs on a thread of its own, rarely enough to cost
/// nothing measurable and often enough that memory comes back within seconds of a flood.
/// At its peak in the flood bench (75 MiB resident), one trim took about a millisecond.
const TRIM_INTERVAL: Duration = Duration::from_secs(2);

/// Starts the thread that trims the allocator every [`TRIM_INTERVAL`] (where the allocator is
/// glibc's; elsewhere there is nothing to do). It lives as long as the process.
pub(crate) fn start_trimming() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("resync-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(TRIM_INTERVAL);
                trim();
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "no thread to give freed memory back: it stays with the allocator");
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    let started = std::time::Instant::now();
    // SAFETY: malloc_trim takes no pointer and has no precondition; glibc serializes it with
    // every other allocator call by the arenas' own locks.
    unsafe {
        libc::malloc_trim(0);
    }
    tracing::trace!(target: "resync::memory", elapsed = ?started.elapsed(), "allocator trimmed");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
