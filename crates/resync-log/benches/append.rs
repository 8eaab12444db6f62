//! Micro-benchmarks of the log: appends per second at steady state (the log full, so every
//! append also trims), and reads of a page of history.

use std::sync::Arc;
use std::time::Instant;

use resync_log::{ChannelLog, Retention};
use resync_protocol::{Epoch, Position, Seq};

fn main() {
    divan::main();
}

#[divan::bench(args = [1_000, 10_000, 100_000])]
fn append_to_full_log(bencher: divan::Bencher<'_, '_>, max_events: usize) {
    let epoch = Epoch::new("bench").expect("valid epoch");
    let retention = Retention::default().with_max_events(max_events);
    let mut log = ChannelLog::new(epoch, retention);
    let item: Arc<str> = Arc::from(
        "{\"payload\":\"a hundred bytes or so of json data for the benchmark, shared by reference\"}",
    );
    let now = Instant::now();
    for _ in 0..max_events {
        log.append(item.clone(), now);
    }
    bencher
        .counter(divan::counter::ItemsCount::new(1usize))
        .bench_local(|| log.append(item.clone(), now));
}

#[divan::bench(args = [10, 100, 1_000])]
fn read_page(bencher: divan::Bencher<'_, '_>, page: usize) {
    let epoch = Epoch::new("bench").expect("valid epoch");
    let mut log = ChannelLog::new(epoch.clone(), Retention::default());
    let item: Arc<str> = Arc::from("{}");
    let now = Instant::now();
    for _ in 0..10_000 {
        log.append(item.clone(), now);
    }
    let since = Position::new(epoch, Seq::new(10_000 - page as u64));
    bencher
        .counter(divan::counter::ItemsCount::new(page))
        .bench_local(|| log.read_since(&since, page, now));
}
