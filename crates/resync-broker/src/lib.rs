//! Brokers carry resync's channels: they number events, keep history, and deliver live
//! events, and this crate says what that means.
//!
//! - [`Broker`] is the trait a backend implements. [`MemoryBroker`] implements it in this
//!   process (the reference server's default); `resync-broker-redis` implements it over Redis
//!   for many processes; users implement it for their own backends.
//! - [`Hub`] is local fan-out, shared by every broker: each event is encoded once
//!   ([`EncodedEvent`]) and queued for each local subscriber by reference, and a subscriber
//!   whose bounded queue overflows is told it lagged instead of silently losing events.
//! - [`resume`] is the gap-free resume algorithm every transport uses: given a channel and a
//!   client's position, it yields the missed events, then live ones, with no gap and no
//!   duplicate, or a typed reset.
//! - With the `testing` feature, `conformance` is a test suite any `Broker` can run.
//!
//! ```
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! use std::sync::Arc;
//! use resync_broker::{Broker, MemoryBroker, Publish, ResumeOptions, SubscriptionItem, resume};
//! use resync_protocol::{Channel, Payload, RecoveryOutcome};
//!
//! let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::default());
//! let channel = Channel::new("orders").unwrap();
//! let payload = |n: u32| Payload::from_value(&n).unwrap();
//!
//! // A client saw the first event, then went away while two more were published.
//! let seen = broker.publish(Publish::new(channel.clone(), payload(1))).await.unwrap();
//! broker.publish(Publish::new(channel.clone(), payload(2))).await.unwrap();
//! broker.publish(Publish::new(channel.clone(), payload(3))).await.unwrap();
//!
//! // It comes back with its position: the two missed events are replayed, then live ones.
//! let (outcome, mut stream) =
//!     resume(broker.clone(), channel.clone(), Some(seen), ResumeOptions::default()).await.unwrap();
//! assert_eq!(outcome, RecoveryOutcome::Replayed { count: 2 });
//! broker.publish(Publish::new(channel.clone(), payload(4))).await.unwrap();
//! for expected in 2..=4 {
//!     let SubscriptionItem::Event(event) = stream.next().await.unwrap() else { panic!() };
//!     assert_eq!(event.position().seq.get(), expected);
//! }
//! # });
//! ```
//!
//! # Writing a broker
//!
//! A broker for another backend (NATS JetStream, Postgres, Kafka) implements [`Broker`] and
//! gets the rest from this crate: [`Hub`] for local fan-out, [`resume`] for catching clients
//! up, [`decide_read`] for answering history reads, [`EncodedEvent`] so each event is encoded
//! once. What it must get right:
//!
//! - **Atomic in the backend**: a publish assigns the channel's next seq, stores the event in
//!   history and makes it visible to other processes as one step (Redis does it in one Lua
//!   script). Two processes publishing at once must never give out the same seq, and a
//!   publish that returns an error must not have stored the event.
//! - **Epochs**: whenever a channel's seqs may start over (its metadata expired, the backend
//!   lost data), the channel must get an epoch it never had, so old positions reset instead
//!   of resuming into a different history. A channel never published stands at seq 0 of an
//!   epoch that its first publish keeps, and asking its position must create nothing in the
//!   backend (a client can name any channel).
//! - **Reads decide with [`decide_read`]**: from the reader's position, the newest position
//!   and the oldest seq still readable; return the events it allows, oldest first,
//!   contiguous.
//! - **Live delivery** goes through a [`Hub`]: deliver each event once per process with
//!   [`Hub::deliver`], in seq order per channel. Gaps and duplicates are allowed (the resume
//!   algorithm repairs them from history); reordering is not. When the link to the backend
//!   breaks and comes back, call [`Hub::request_resync`] for every channel so subscribers
//!   check history for what they missed.
//! - **Bounded**: history by count, bytes and age ([`Retention`]); the hub's queues are
//!   bounded already.
//! - **Lifecycle**: [`Broker::health`] for readiness, [`Broker::close`] ends subscriptions
//!   and background tasks at shutdown.
//!
//! The conformance suite (feature `testing`) checks all of it that can be seen from outside:
//! consecutive seqs from 1, in-order live delivery, every history outcome (replay,
//! up-to-date, reset by epoch, by truncation, position ahead), idempotent publishes, every
//! resume outcome, unsubscribe on drop, a lagging subscriber told and able to resume,
//! concurrent publishers with resuming subscribers seeing no gap, and `close`. Run it against
//! your broker built as in production, from a multi-threaded tokio test:
//!
//! ```no_run
//! # async fn run(my_broker: resync_broker::MemoryBroker) {
//! use std::sync::Arc;
//! use resync_broker::conformance::{ConformanceConfig, run_all};
//! // History of 2,000 events per channel, subscriber queues of 64 events.
//! run_all(Arc::new(my_broker), ConformanceConfig::new(2_000, 64)).await;
//! # }
//! ```
//!
//! `resync-broker-redis` is the worked example: its `scripts.rs` holds the atomic parts, its
//! `pubsub.rs` the delivery and the reconnect, and its tests run this suite against a real
//! `redis-server`.

mod broker;
#[cfg(feature = "testing")]
pub mod conformance;
mod error;
mod event;
mod hub;
mod keyed;
mod memory;
pub mod presence;
mod resume;
mod user_commands;

pub use broker::{Broker, HistoryRead, Publish, PublishOrigin};
pub use error::{Error, Result};
pub use event::{EVENT_OVERHEAD_BYTES, EncodedEvent};
pub use hub::{DeliveryLag, Hub, Live, LiveError, LiveSubscription};
pub use keyed::{
    KeyedLimits, KeyedMap, KeyedState, STATE_ENTRY_OVERHEAD_BYTES, STATE_PAGE_BYTES, StateEntry,
    StatePage, StatePageCache,
};
pub use memory::{DEFAULT_SUBSCRIBER_QUEUE, MemoryBroker, MemoryBrokerBuilder};
pub use presence::{
    MemoryPresence, Presence, PresenceEvent, PresenceFanout, PresenceLagged, PresenceWatch,
};
pub use resume::{
    REPLAY_PAGE, ResumeOptions, STATE_PAGE, Subscription, SubscriptionError, SubscriptionItem,
    resume, resume_state,
};
pub use resync_log::{ReadDecision, ReadOutcome, Retention, decide_read};
pub use user_commands::{
    USER_COMMAND_QUEUE, UserCommandBus, UserCommandFanout, UserCommands, UserCommandsLagged,
};
