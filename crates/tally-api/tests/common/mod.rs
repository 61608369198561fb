//! The ingest side of the pipeline for API tests and the freshness benchmark: a fresh
//! database, librdkafka's mock cluster, an aggregator on its own thread, and an emitter.

use std::collections::BTreeMap;
use std::time::Duration;

use tally_aggregator::{Aggregator, AggregatorConfig, Mode};
use tally_core::config::KafkaConfig;
use tally_core::MeterDefinition;
use tally_emitter::{Emitter, EmitterConfig, SpoolConfig};
use tokio_util::sync::CancellationToken;

pub(crate) struct Pipeline {
    pub(crate) db: tally_db::testing::TestDatabase,
    pub(crate) emitter: std::sync::Arc<Emitter>,
    stop: CancellationToken,
    aggregator: Option<std::thread::JoinHandle<()>>,
    _cluster: rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>,
    _spool: tempfile::TempDir,
}

pub(crate) fn meters() -> Vec<MeterDefinition> {
    tally_core::meter::meters_from_toml(
        r#"
        [[meters]]
        name = "api_calls"
        aggregation = "sum"
        "#,
    )
    .unwrap()
}

impl Pipeline {
    /// Must run inside a multi-threaded tokio runtime (the aggregator uses its handle).
    pub(crate) async fn start(batch_max_wait: Duration) -> Pipeline {
        let db = tally_db::testing::fresh_database().await;
        tally_aggregator::sync_meters(&db.pool, &meters())
            .await
            .unwrap();
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        let topic = format!("usage-{}", uuid::Uuid::now_v7().simple());
        cluster.create_topic(&topic, 2, 1).unwrap();
        cluster.create_topic(&format!("{topic}-dlq"), 1, 1).unwrap();
        let kafka = KafkaConfig {
            brokers: cluster.bootstrap_servers(),
            topic: topic.clone(),
            dlq_topic: format!("{topic}-dlq"),
            options: BTreeMap::from([
                ("session.timeout.ms".into(), "6000".into()),
                ("heartbeat.interval.ms".into(), "500".into()),
            ]),
        };
        let aggregator = Aggregator::new(
            AggregatorConfig {
                group_id: format!("agg-{topic}"),
                batch_max_wait,
                ..AggregatorConfig::default()
            },
            kafka.clone(),
            meters(),
            db.pool.clone(),
            tokio::runtime::Handle::current(),
        )
        .unwrap();
        let stop = CancellationToken::new();
        let aggregator = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                aggregator.run(Mode::Daemon, &stop).unwrap();
            })
        };
        let spool = tempfile::tempdir().unwrap();
        let emitter = Emitter::start(
            &kafka,
            &EmitterConfig {
                spool: SpoolConfig {
                    dir: spool.path().to_owned(),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .unwrap();
        Pipeline {
            db,
            emitter: std::sync::Arc::new(emitter),
            stop,
            aggregator: Some(aggregator),
            _cluster: cluster,
            _spool: spool,
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.cancel();
        if let Some(thread) = self.aggregator.take() {
            let _ = thread.join();
        }
    }
}
