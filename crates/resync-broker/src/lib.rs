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

mod broker;
#[cfg(feature = "testing")]
pub mod conformance;
mod error;
mod event;
mod hub;
mod memory;
mod resume;

pub use broker::{Broker, HistoryRead, Publish};
pub use error::{Error, Result};
pub use event::EncodedEvent;
pub use hub::{Hub, Live, LiveError, LiveSubscription};
pub use memory::{DEFAULT_SUBSCRIBER_QUEUE, MemoryBroker, MemoryBrokerBuilder};
pub use resume::{
    REPLAY_PAGE, ResumeOptions, Subscription, SubscriptionError, SubscriptionItem, resume,
};
pub use resync_log::{ReadDecision, ReadOutcome, Retention, decide_read};
