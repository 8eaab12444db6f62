//! The in-memory broker passes the conformance suite every broker must pass.

use std::sync::Arc;

use resync_broker::conformance::{ConformanceConfig, run_all};
use resync_broker::{MemoryBroker, Retention};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_passes_conformance() {
    let broker = MemoryBroker::builder()
        .retention(Retention::default().with_max_events(2_000))
        .subscriber_queue(64)
        .build();
    run_all(Arc::new(broker), ConformanceConfig::new(2_000, 64)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_broker_passes_conformance_with_tiny_limits() {
    let broker = MemoryBroker::builder()
        .retention(Retention::default().with_max_events(40))
        .subscriber_queue(8)
        .build();
    run_all(Arc::new(broker), ConformanceConfig::new(40, 8)).await;
}
