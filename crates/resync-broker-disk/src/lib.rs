//! A durable resync broker for one process: what a channel has published outlives the
//! process, so a restart or a deploy resumes every client exactly, with no reset.
//!
//! [`DiskBroker`] keeps each channel's history, its position and epoch, and its recent
//! idempotency keys in a data directory (an LSM store, fjall: `docs/decisions.md` says why
//! it and not another), and passes the same conformance suite as every broker. The layout is
//! in `layout.rs`; the rules it keeps:
//!
//! - **Nothing acknowledged is lost to a killed process**: a publish is written to the
//!   operating system before its answer. [`Durability`] decides when it reaches the disk:
//!   `Always` acknowledges after a sync shared by concurrent publishes (group commit), the
//!   default syncs every second, `Never` leaves it to the operating system.
//! - **A lost tail is never silent**: a store that was not closed, reopened after the
//!   machine restarted under a durability that acknowledges before syncing, cannot know what
//!   the power cut took, so the channels it held start over in new epochs when next used
//!   (`open.rs`): their clients get resets, never seqs reused for other events. A clean
//!   close and a killed process (the machine still up) resume with no reset at all.
//! - **Live fan-out from memory**: each active channel's recent events stay in memory and
//!   are delivered through a [`Hub`](resync_broker::Hub) as the memory broker does; older
//!   events are read from the disk, in one range read per resume.
//! - **Bounded**: history per channel by count, bytes and age, and over the store by bytes;
//!   a bounded number of idle channels in memory; opening reads each channel's metadata once
//!   and no event.
//! - **One process per data directory**: a second one gets [`OpenError::InUse`].
//!
//! Presence and user commands describe live connections: they stay in memory.

mod broker;
mod durability;
mod layout;
mod open;
mod pages;

pub use broker::{DiskBroker, DiskBrokerBuilder};
pub use durability::Durability;
pub use open::OpenError;
