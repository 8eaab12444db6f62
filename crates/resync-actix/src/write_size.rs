//! How many bytes a connection hands actix-http per write, shared by the SSE stream (its
//! chunks) and the WebSocket outbox (what waits before a send waits for room).
//!
//! actix-http copies every body chunk into a per-connection write buffer that never
//! shrinks, and pulls chunks until that buffer holds 32 KiB, so what a chunk weighs is what
//! every connection keeps after its first burst. 64 KiB left ~85-100 KB per connection;
//! 7-16 KiB cost more CPU per delivery in write calls; ~30 KiB, one chunk per write, cost
//! the least of the sizes tried (the figures: docs/decisions.md, "About 30 KiB per write").

/// About this many bytes of ready frames or events make one write.
pub(crate) const WRITE_BYTES: usize = 30 * 1024;

/// Room for a typical last frame or event past [`WRITE_BYTES`].
const SLACK: usize = 1024;

/// What to reserve in a buffer holding `len` bytes when a burst begins (a second frame
/// or event before the writer came round, which will likely fill the write): room for the
/// whole write at once, since growing by doubling from one event cost five reallocations
/// and copies per write. An idle connection's lone event still gets exactly its size.
pub(crate) fn burst_room(len: usize) -> usize {
    (WRITE_BYTES + SLACK).saturating_sub(len)
}
