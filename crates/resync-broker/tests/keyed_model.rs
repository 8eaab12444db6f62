//! Keyed channels against a model: for any sequence of keyed publishes and deletes, and any
//! page size, a reader that pages the state and follows from its position ends with exactly
//! the model's latest value of each key (issue 27's property test), whatever the history keeps.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use resync_broker::conformance::keyed_catch_up;
use resync_broker::{Broker, MemoryBroker, Publish, Retention};
use resync_protocol::{Channel, Key, Payload};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn a_reader_of_the_state_ends_with_the_models_values(
        ops in prop::collection::vec((0u8..12, prop::option::of(0u32..1_000)), 1..120),
        history in 1usize..30,
        page in 1usize..8,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        runtime.block_on(async {
            let broker: Arc<dyn Broker> = Arc::new(
                MemoryBroker::builder()
                    .retention(Retention::default().with_max_events(history))
                    .build(),
            );
            let channel = Channel::new("prices:model").expect("valid channel");
            let mut model = BTreeMap::new();
            for (key, value) in &ops {
                let key = Key::new(format!("k{key}")).expect("valid key");
                let data = match value {
                    Some(value) => Payload::from_value(value).expect("json"),
                    None => Payload::from_json("null").expect("json"),
                };
                broker
                    .publish(Publish::new(channel.clone(), data.clone()).with_key(Some(key.clone())))
                    .await
                    .expect("keyed publish");
                match value {
                    Some(_) => model.insert(key, data.as_str().to_owned()),
                    None => model.remove(&key),
                };
            }
            let values: BTreeMap<Key, String> = keyed_catch_up(&broker, &channel, page)
                .await
                .into_iter()
                .map(|(key, (_, data))| (key, data))
                .collect();
            assert_eq!(values, model);
        });
    }
}
