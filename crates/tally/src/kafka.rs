//! `tally kafka`: librdkafka's mock cluster served as a process of its own, so that the real
//! topology (broker, emulator, aggregator, sink, server, each in its own terminal) runs on a
//! laptop with nothing to install. In memory, for development and tests: not for production.
//!
//! The mock's brokers listen on ports the OS picks; `--port` is a plain TCP relay to the first
//! of them, for clients to bootstrap from. The cluster's metadata then points clients at the
//! brokers themselves, on 127.0.0.1, so every client must run on this machine.

use anyhow::Context;
use rdkafka::mocking::MockCluster;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::TallyConfig;
use crate::process::{cancel_on_signal, runtime};

#[derive(Debug, clap::Args)]
pub(crate) struct KafkaArgs {
    /// Port clients bootstrap from (kafka.brokers = "127.0.0.1:PORT")
    #[arg(long, default_value_t = 9092)]
    port: u16,
    /// Brokers in the cluster
    #[arg(long, default_value_t = 3)]
    brokers: i32,
    /// Partitions of the usage topic (kafka.topic); the DLQ topic gets one
    #[arg(long, default_value_t = 8)]
    partitions: i32,
}

pub(crate) fn run(config: &TallyConfig, args: &KafkaArgs) -> anyhow::Result<()> {
    if args.brokers < 1 || args.partitions < 1 {
        anyhow::bail!("--brokers and --partitions must be at least 1");
    }
    let cluster = MockCluster::new(args.brokers).context("starting librdkafka's mock cluster")?;
    let replication = args.brokers.min(3);
    cluster
        .create_topic(&config.kafka.topic, args.partitions, replication)
        .context("creating the usage topic")?;
    cluster
        .create_topic(&config.kafka.dlq_topic, 1, replication)
        .context("creating the DLQ topic")?;
    let upstream = cluster
        .bootstrap_servers()
        .split(',')
        .next()
        .map(str::to_owned)
        .context("the mock cluster has no broker")?;
    runtime()?.block_on(async {
        let listener = TcpListener::bind(("127.0.0.1", args.port))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on 127.0.0.1:{}; pick a free --port (is a Kafka already running?)",
                    args.port
                )
            })?;
        let address = listener.local_addr()?;
        println!("tally kafka: an in-memory Kafka (librdkafka's mock cluster) for development and tests; NOT for production, it keeps nothing on disk");
        println!(
            "  {} broker(s); topic {:?} with {} partitions, DLQ topic {:?}",
            args.brokers, config.kafka.topic, args.partitions, config.kafka.dlq_topic
        );
        println!("  point tally at it: TALLY_KAFKA_BROKERS={address}");
        let stop = CancellationToken::new();
        tokio::spawn(cancel_on_signal(stop.clone()));
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.cancelled() => break,
            };
            let Ok((client, _)) = accepted else { continue };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut broker) = TcpStream::connect(&upstream).await {
                    let mut client = client;
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                }
            });
        }
        anyhow::Ok(())
    })?;
    drop(cluster);
    Ok(())
}
