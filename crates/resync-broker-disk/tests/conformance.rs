//! The disk broker passes the conformance suite every broker must pass, under each
//! durability.

use std::sync::Arc;

use resync_broker::Retention;
use resync_broker::conformance::{ConformanceConfig, run_all};
use resync_broker_disk::{DiskBroker, Durability};

async fn passes(durability: Durability, max_events: usize, queue: usize) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = DiskBroker::builder(dir.path())
        .durability(durability)
        .retention(Retention::default().with_max_events(max_events))
        .subscriber_queue(queue)
        .open()
        .expect("the store opens");
    run_all(Arc::new(broker), ConformanceConfig::new(max_events, queue)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_broker_passes_conformance_syncing_every_second() {
    passes(Durability::EverySecond, 2_000, 64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_broker_passes_conformance_syncing_every_publish() {
    passes(Durability::Always, 2_000, 64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_broker_passes_conformance_with_tiny_limits() {
    passes(Durability::Never, 40, 8).await;
}
