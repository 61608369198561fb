//! `tally stripe-emulator`: the local Stripe Billing API, for trying the sink without Stripe.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use stripe_emulator::{Emulator, EmulatorConfig, Faults};
use tokio_util::sync::CancellationToken;

use crate::process::{cancel_on_signal, runtime};

#[derive(Debug, clap::Args)]
pub(crate) struct EmulatorArgs {
    /// Port to listen on (0 picks a free one)
    #[arg(long, default_value_t = 12111)]
    port: u16,
    /// Address to listen on
    #[arg(long, default_value = "127.0.0.1")]
    listen: IpAddr,
    /// Calls per second allowed for sk_test_ keys (Stripe: 25)
    #[arg(long, default_value_t = 25)]
    test_rate: u32,
    /// Calls per second allowed for sk_live_ keys (Stripe: 1000)
    #[arg(long, default_value_t = 1000)]
    live_rate: u32,
    /// Meter events per second the v2 meter event stream takes per account (Stripe: 10000)
    #[arg(long, default_value_t = 10_000)]
    stream_rate: u32,
    /// Probability of answering 500 without doing anything
    #[arg(long, default_value_t = 0.0)]
    error_500: f64,
    /// Probability of answering 503 without doing anything
    #[arg(long, default_value_t = 0.0)]
    error_503: f64,
    /// Probability of committing a call and then dropping the connection without an answer
    #[arg(long, default_value_t = 0.0)]
    drop_after_commit: f64,
    /// Probability of holding a call for --delay-ms first
    #[arg(long, default_value_t = 0.0)]
    delay: f64,
    #[arg(long, default_value_t = 500)]
    delay_ms: u64,
}

pub(crate) fn run(args: &EmulatorArgs) -> anyhow::Result<()> {
    let config = EmulatorConfig {
        test_rate_per_second: args.test_rate,
        live_rate_per_second: args.live_rate,
        stream_events_per_second: args.stream_rate,
        faults: Faults {
            error_500: args.error_500,
            error_503: args.error_503,
            delay: args.delay,
            delay_ms: args.delay_ms,
            drop_after_commit: args.drop_after_commit,
        },
        ..EmulatorConfig::default()
    };
    runtime()?.block_on(async {
        let emulator = Emulator::start(SocketAddr::new(args.listen, args.port), config)
            .await
            .context("cannot start the Stripe emulator")?;
        println!("stripe-emulator listening on {}", emulator.url());
        println!(
            "  point tally at it: TALLY_STRIPE_API_BASE={} STRIPE_SECRET_KEY=sk_test_anything",
            emulator.url()
        );
        println!(
            "  state: GET {}_emulator/state; faults: POST {}_emulator/faults (JSON)",
            emulator.url(),
            emulator.url()
        );
        let stop = CancellationToken::new();
        cancel_on_signal(stop.clone()).await;
        emulator.shutdown().await;
        Ok(())
    })
}
