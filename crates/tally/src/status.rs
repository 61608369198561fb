//! `tally status`: one screen for an operator. Where each partition stands (lag and last
//! commit), the outbox, customers waiting for a Stripe mapping, the last hour's rejects, and the
//! last reconcile's verdict; exit code 1 when something needs a person.

use std::time::Duration;

use anyhow::bail;
use chrono::{DateTime, TimeDelta, Utc};

use crate::config::TallyConfig;
use crate::process::{connect, runtime};

use tally_runtime::attention;

/// The bounds, as this module compares them.
const OUTBOX_STALE_SECONDS: f64 = attention::OUTBOX_STALE.as_secs_f64();
const DLQ_STUCK_SECONDS: f64 = attention::DLQ_STUCK.as_secs_f64();
const MEMBER_SILENT: TimeDelta = TimeDelta::seconds(attention::MEMBER_SILENT.as_secs() as i64);
const RECONCILE_STALE: TimeDelta = TimeDelta::seconds(attention::RECONCILE_STALE.as_secs() as i64);

#[derive(Debug, clap::Args)]
pub(crate) struct StatusArgs {
    /// How long to wait for Kafka's end offsets (lag); without kafka.brokers, lag is not shown
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    kafka_timeout: Duration,
}

pub(crate) fn run(config: &TallyConfig, args: &StatusArgs) -> anyhow::Result<()> {
    let runtime = runtime()?;
    // Kafka first, on this thread: librdkafka's calls block.
    let ends = if config.kafka.brokers.trim().is_empty() {
        Err("kafka.brokers is not set".to_owned())
    } else {
        tally_aggregator::end_offsets(&config.kafka, args.kafka_timeout)
    };
    let mut attention: Vec<String> = Vec::new();
    runtime.block_on(async {
        let pool = connect(config, 2).await?;
        tally_db::check_schema(&pool).await?;
        let now = Utc::now();

        let group = &config.aggregator.group_id;
        let topic = &config.kafka.topic;
        println!("aggregator  group {group}, topic {topic}");
        let committed = tally_aggregator::committed_offsets(&pool, group, topic).await?;
        println!(
            "  {:>9}  {:>12}  {:>12}  {:>10}  {:>12}  owner",
            "partition", "next offset", "end offset", "lag", "last commit"
        );
        let mut total_lag = 0i64;
        for row in &committed {
            let end = ends.as_ref().ok().and_then(|ends| ends.get(&row.partition));
            let lag = end.map(|end| end - row.next_offset.unwrap_or(0));
            total_lag += lag.unwrap_or(0).max(0);
            println!(
                "  {:>9}  {:>12}  {:>12}  {:>10}  {:>12}  {}",
                row.partition,
                row.next_offset.map_or("-".into(), |o| o.to_string()),
                end.map_or("?".into(), |e| e.to_string()),
                lag.map_or("?".into(), |l| l.to_string()),
                ago(now, row.updated_at),
                row.owner.as_deref().unwrap_or("-"),
            );
        }
        if committed.is_empty() {
            println!("  no partition taken yet: is `tally aggregate` running?");
        }
        // Each running aggregator, as its watchdog last saw it (every few seconds).
        let members = tally_aggregator::members(&pool, group, topic).await?;
        let live: Vec<_> = members
            .iter()
            .filter(|m| now - m.seen_at < MEMBER_SILENT)
            .collect();
        for member in &live {
            let partitions: Vec<String> = member.assigned.iter().map(i32::to_string).collect();
            let assigned = if partitions.is_empty() {
                "no partition".to_owned()
            } else {
                format!("partitions {}", partitions.join(","))
            };
            match (&member.stall, member.stalled_since) {
                (Some(stall), since) => {
                    let stalled = since.map_or(String::new(), |at| format!(" (stalled {})", ago(now, at)));
                    println!("  member {}: {assigned}: STALLED{stalled}: {stall}", member.owner);
                    attention.push(format!(
                        "aggregator {} is stalled: {stall}; held up by Postgres, check what blocks it (pg_stat_activity, pg_locks); not served by the broker, it joins the group again by itself after aggregator.stall_timeout, and if that does not help, check the brokers' group coordinator (aggregator.static_membership off?) and restart it",
                        member.owner
                    ));
                }
                (None, _) => println!("  member {}: {assigned}, consuming (seen {})", member.owner, ago(now, member.seen_at)),
            }
        }
        match &ends {
            Ok(ends) => {
                let untaken = ends
                    .keys()
                    .filter(|p| !committed.iter().any(|c| c.partition == **p))
                    .count();
                if untaken > 0 {
                    attention.push(format!(
                        "{untaken} partition(s) of {topic} never taken by an aggregator: start `tally aggregate`"
                    ));
                }
                println!("  total lag {total_lag} messages");
            }
            Err(error) => println!("  lag unknown: {error}"),
        }

        let (dlq_pending, dlq_oldest) = tally_db::rejects::dlq_backlog(&pool).await?;
        let rejects = tally_db::rejects::counts_since(&pool, now - TimeDelta::hours(1)).await?;
        let listed: Vec<String> = rejects.iter().map(|(r, n)| format!("{r} {n}")).collect();
        println!(
            "\nrejects in the last hour: {}",
            if listed.is_empty() { "none".to_owned() } else { listed.join(", ") }
        );
        println!("  waiting for the DLQ topic: {dlq_pending} (oldest {})", seconds(dlq_oldest));
        if dlq_oldest > DLQ_STUCK_SECONDS {
            attention.push(format!(
                "{dlq_pending} rejected event(s) not copied to the DLQ topic for {}: check the aggregator's Kafka access to kafka.dlq_topic",
                seconds(dlq_oldest)
            ));
        }

        let outbox = tally_sink::store::outbox_status(&pool).await?;
        println!(
            "\noutbox: {} pending (oldest {}), {} failed, {} waiting for review, {} pair(s) quarantined",
            outbox.pending,
            seconds(outbox.oldest_pending_seconds),
            outbox.failed,
            outbox.needs_review,
            outbox.quarantined_pairs
        );
        println!(
            "unmapped: {} customer(s) with usage waiting for a Stripe customer id ({} slots)",
            outbox.unmapped_customers, outbox.unmapped_slots
        );
        if outbox.oldest_pending_seconds > OUTBOX_STALE_SECONDS {
            attention.push(format!(
                "the oldest submission has waited {} for Stripe: is `tally sink` running, is Stripe reachable?",
                seconds(outbox.oldest_pending_seconds)
            ));
        }
        if outbox.failed > 0 {
            attention.push(format!(
                "{} submission(s) refused by Stripe: `tally submissions list --status failed`, fix the cause, `tally submissions retry --all-failed`",
                outbox.failed
            ));
        }
        if outbox.needs_review > 0 {
            attention.push(format!(
                "{} submission(s) wait for review: `tally submissions review`",
                outbox.needs_review
            ));
        }
        if outbox.quarantined_pairs > 0 {
            attention.push(format!(
                "{} pair(s) quarantined: `tally quarantine list`",
                outbox.quarantined_pairs
            ));
        }
        if outbox.unmapped_customers > 0 {
            attention.push(format!(
                "{} customer(s) without a Stripe customer id: `tally customers list`, then map them",
                outbox.unmapped_customers
            ));
        }

        // Customers a background loop set aside (each with its error), while the others go on.
        let mut conn = pool.acquire().await?;
        let (set_aside, total) = tally_db::customer_errors::list(&mut conn, 10).await?;
        drop(conn);
        if total > 0 {
            println!("\ncustomers set aside: {total}");
            for error in &set_aside {
                println!(
                    "  {:<14} {}: {} ({} tries since {}; next try {})",
                    error.stage,
                    error.customer_id,
                    error.error,
                    error.attempts,
                    ago(now, error.first_at),
                    if error.retry_at <= now { "now".to_owned() } else { format!("in {}", seconds((error.retry_at - now).num_seconds() as f64)) }
                );
            }
            attention.push(format!(
                "{total} customer(s) set aside by the alert evaluator, the credit burner or the subscription scheduler (listed above): fix the cause each names (an override that no longer fits its plan: PUT /v1/customers/{{id}}/overrides); they are tried again by themselves"
            ));
        }

        match tally_sink::store::last_reconcile_run(&pool).await? {
            None => {
                println!("\nlast reconcile: never");
                attention.push("tally has never been reconciled with Stripe: `tally reconcile --last 48h` (deploy/systemd/tally-reconcile.timer runs it hourly)".into());
            }
            Some(run) => {
                println!(
                    "\nlast reconcile: {} ({} to {}): {} ok, {} not yet billed, {} unmapped, {} drift, {} quarantined, {} waiting for review, {} Stripe error report(s)",
                    ago(now, run.ran_at),
                    run.range_from.format("%Y-%m-%dT%H:%MZ"),
                    run.range_to.format("%Y-%m-%dT%H:%MZ"),
                    run.ok, run.unbilled, run.unmapped, run.drift, run.quarantined, run.review,
                    run.meter_error_reports
                );
                if run.drift + run.meter_error_reports > 0 {
                    attention.push("the last reconcile found Stripe disagreeing with tally: run `tally reconcile` for the rows".into());
                }
                if now - run.ran_at > RECONCILE_STALE {
                    attention.push(format!("the last reconcile ran {}: is its timer running?", ago(now, run.ran_at)));
                }
            }
        }
        anyhow::Ok(())
    })?;
    if attention.is_empty() {
        println!("\nnothing needs a person");
        return Ok(());
    }
    println!("\nneeds a person:");
    for item in &attention {
        println!("  - {item}");
    }
    bail!("{} thing(s) need a person (listed above)", attention.len())
}

fn ago(now: DateTime<Utc>, at: DateTime<Utc>) -> String {
    format!(
        "{} ago",
        seconds((now - at).num_milliseconds().max(0) as f64 / 1000.0)
    )
}

fn seconds(seconds: f64) -> String {
    let whole = seconds.round() as u64;
    tally_core::duration::format(Duration::from_secs(whole))
}
