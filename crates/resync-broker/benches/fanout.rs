//! Micro-benchmarks of local fan-out: delivering one event to N subscribers (queue and
//! dequeue, the work the broker does per delivery), and publishing through the memory broker.

use std::sync::Arc;

use resync_broker::{Broker, EncodedEvent, Hub, MemoryBroker, Publish};
use resync_protocol::{Channel, Epoch, Event, Payload, Position, Seq};

fn main() {
    divan::main();
}

fn hundred_byte_payload() -> Payload {
    Payload::from_json(format!("{{\"data\":\"{}\"}}", "x".repeat(89))).expect("valid json")
}

#[divan::bench(args = [1_000, 10_000])]
fn deliver_to_subscribers(bencher: divan::Bencher<'_, '_>, subscribers: usize) {
    let hub = Hub::new(16);
    let channel = Channel::new("bench").expect("valid channel");
    let mut subscriptions: Vec<_> = (0..subscribers).map(|_| hub.subscribe(&channel)).collect();
    let event = EncodedEvent::new(Event {
        channel: channel.clone(),
        position: Position::new(Epoch::new("bench").expect("valid epoch"), Seq::new(1)),
        key: None,
        data: hundred_byte_payload(),
    });
    bencher
        .counter(divan::counter::ItemsCount::new(subscribers))
        .bench_local(|| {
            hub.deliver(&event);
            for subscription in &mut subscriptions {
                let _ = subscription.try_recv();
            }
        });
}

#[divan::bench]
fn memory_broker_publish(bencher: divan::Bencher<'_, '_>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let broker = Arc::new(MemoryBroker::default());
    let channel = Channel::new("bench").expect("valid channel");
    let payload = hundred_byte_payload();
    bencher
        .counter(divan::counter::ItemsCount::new(1usize))
        .bench_local(|| {
            runtime.block_on(broker.publish(Publish::new(channel.clone(), payload.clone())))
        });
}
