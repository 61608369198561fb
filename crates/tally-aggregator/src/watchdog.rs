//! The watchdog: notices a member that makes no progress, says so, and has it join again.
//!
//! Group membership is where Kafka-protocol brokers differ most (static membership, rebalance
//! timing), and a member the broker does not serve well can hold partitions it never reads
//! from, or be left with none while partitions nobody reads pile up, without any error.
//! Every few seconds ([`look_every`]) the watchdog reads where each partition ends (Kafka) and where the
//! group stands on it (Postgres's `kafka_offsets`), and keeps, per partition, since when it
//! has lag without moving: neither its stored offset nor the count of messages this member
//! consumed from it. A member with a batch being committed is making progress however long Postgres takes
//! (a slow commit is Postgres's to report, and a rejoin would only throw the commit away).
//! Then:
//!
//! - a partition this member was assigned that has been stuck for `stall_timeout` (counted
//!   from the assignment at the earliest): "assigned but not consuming";
//! - no assignment for `stall_timeout` while a partition has been stuck that long and no other
//!   live member that is making progress holds it: "assigned nothing while partitions nobody
//!   consumes have lag".
//!
//! Either way `/readyz` says so (check `consumption`), `tally_aggregator_stalled_seconds`
//! grows, the member's row in `aggregator_members` (what `tally status` shows) carries it,
//! and the loop is asked to leave the group and join again with a fresh consumer (as a
//! dynamic member from then on: static membership is what brokers implement worst). A member
//! that has just joined gets `stall_timeout` again before the next rejoin.
//!
//! The watchdog runs beside the loop, never in it: reading the offsets may wait for a slow
//! broker, and the loop must keep polling.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tally_core::config::KafkaConfig;
use tokio_util::sync::CancellationToken;

use crate::kafka::{list, Watermarks};
use crate::membership::{Membership, Progress};
use crate::store;
use crate::telemetry;

/// How often the watchdog looks: every 5 s, or four times per `stall_timeout` when that is
/// shorter.
pub(crate) fn look_every(stall_timeout: Duration) -> Duration {
    (stall_timeout / 4).min(Duration::from_secs(5))
}
/// How long one look at Kafka's offsets may take.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(5);

/// One partition as a look found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PartitionView {
    pub(crate) partition: i32,
    /// The first offset Kafka still holds, and the end (the next offset to be written).
    pub(crate) first: i64,
    pub(crate) end: i64,
    /// The next offset the group will consume, as stored in Postgres (`None`: never consumed).
    pub(crate) next: Option<i64>,
}

impl PartitionView {
    pub(crate) fn lag(&self) -> i64 {
        (self.end - self.next.unwrap_or(self.first).max(self.first)).max(0)
    }
}

/// The watchdog's verdict on this member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    Consuming,
    Stalled {
        /// How long it has made no progress.
        stalled_for: Duration,
        /// What an operator reads in `/readyz` and `tally status`.
        detail: String,
        /// Whether joining again may help: not when the member waits for Postgres to finish
        /// a commit (a rejoin would only throw the commit away).
        rejoin: bool,
    },
}

/// What this member does besides what Postgres shows (what its loop published), and which
/// partitions other members that make progress hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct Activity {
    pub(crate) progress: Progress,
    pub(crate) covered_by_others: Vec<i32>,
}

/// Where a partition stands: the offset stored in Postgres and the messages consumed from it.
type Position = (Option<i64>, Option<u64>);

/// Since when each partition has had lag at the same stored offset and polled position.
#[derive(Debug, Default)]
pub(crate) struct Watch {
    lagging: HashMap<i32, (Position, Instant)>,
}

impl Watch {
    /// Takes one look's findings and judges the member. Pure, for the unit tests.
    pub(crate) fn observe(
        &mut self,
        now: Instant,
        partitions: &[PartitionView],
        assigned: &[i32],
        assigned_since: Instant,
        stall_timeout: Duration,
        activity: &Activity,
    ) -> Verdict {
        let mut stuck: BTreeMap<i32, (Instant, i64)> = BTreeMap::new();
        for view in partitions {
            if view.lag() == 0 {
                self.lagging.remove(&view.partition);
                continue;
            }
            let position = (
                view.next,
                activity.progress.consumed.get(&view.partition).copied(),
            );
            let entry = self
                .lagging
                .entry(view.partition)
                .or_insert((position, now));
            // Its lane's commit under way, for as long as a commit may take.
            let committing = assigned.contains(&view.partition)
                && activity
                    .progress
                    .committing_since(view.partition)
                    .is_some_and(|since| now.saturating_duration_since(since) < stall_timeout);
            if entry.0 != position || committing {
                *entry = (position, now); // it moved, or is being committed: progress
            }
            stuck.insert(view.partition, (entry.1, view.lag()));
        }
        self.lagging
            .retain(|p, _| partitions.iter().any(|v| v.partition == *p));

        // Assigned but not consuming: counted from the assignment at the earliest.
        let mine: Vec<(i32, Duration, i64)> = stuck
            .iter()
            .filter(|(p, _)| assigned.contains(p))
            .map(|(&p, &(since, lag))| (p, now.duration_since(since.max(assigned_since)), lag))
            .filter(|(_, stalled, _)| *stalled >= stall_timeout)
            .collect();
        if !mine.is_empty() {
            let stalled_for = mine.iter().map(|m| m.1).max().unwrap_or_default();
            let lag: i64 = mine.iter().map(|m| m.2).sum();
            let names: Vec<i32> = mine.iter().map(|m| m.0).collect();
            // Stuck behind a commit Postgres holds up, every one of them: say so, and stay.
            let committing: Option<Vec<Instant>> = names
                .iter()
                .map(|&p| activity.progress.committing_since(p))
                .collect();
            if let Some(since) = committing {
                let longest = since
                    .into_iter()
                    .map(|since| now.saturating_duration_since(since))
                    .max()
                    .unwrap_or_default();
                return Verdict::Stalled {
                    stalled_for,
                    detail: format!(
                        "assigned partitions {} with {lag} messages of lag, but a batch of theirs has been committing for {}: Postgres holds it up (a lock, a full disk, a lost connection)",
                        list(&names),
                        seconds(longest)
                    ),
                    rejoin: false,
                };
            }
            return Verdict::Stalled {
                stalled_for,
                detail: format!(
                    "assigned partitions {} but consumed nothing from them for {} while they have {lag} messages of lag",
                    list(&names),
                    seconds(stalled_for)
                ),
                rejoin: true,
            };
        }
        // Assigned nothing while partitions nobody consumes have lag.
        let unassigned_for = now.duration_since(assigned_since);
        if assigned.is_empty() && unassigned_for >= stall_timeout {
            let orphaned: Vec<(i32, Duration, i64)> = stuck
                .iter()
                .filter(|(p, _)| !activity.covered_by_others.contains(p))
                .map(|(&p, &(since, lag))| (p, now.duration_since(since), lag))
                .filter(|(_, stalled, _)| *stalled >= stall_timeout)
                .collect();
            if !orphaned.is_empty() {
                let stalled_for =
                    unassigned_for.min(orphaned.iter().map(|o| o.1).max().unwrap_or_default());
                let lag: i64 = orphaned.iter().map(|o| o.2).sum();
                let names: Vec<i32> = orphaned.iter().map(|o| o.0).collect();
                return Verdict::Stalled {
                    stalled_for,
                    detail: format!(
                        "assigned no partition for {} while partitions {} have {lag} messages of lag that no aggregator consumes",
                        seconds(unassigned_for),
                        list(&names)
                    ),
                    rejoin: true,
                };
            }
        }
        Verdict::Consuming
    }

    /// Whether a partition that concerns this member (its own; any, when it has none) had lag
    /// and did not move for `interval` (since the look before last).
    pub(crate) fn stuck(&self, assigned: &[i32], interval: Duration) -> bool {
        self.lagging.iter().any(|(p, (_, since))| {
            (assigned.is_empty() || assigned.contains(p)) && since.elapsed() >= interval
        })
    }
}

fn seconds(duration: Duration) -> String {
    format!("{} s", duration.as_secs())
}

/// Who this member is, for its row in `aggregator_members`.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub(crate) owner: String,
    pub(crate) group: String,
    pub(crate) instance_id: Option<String>,
}

/// Runs the watchdog until `stop`: a look every [`look_every`]. A look that cannot be made
/// (Kafka or Postgres away) judges nothing: the dependency checks say that already.
pub(crate) async fn run(
    pool: PgPool,
    kafka: KafkaConfig,
    member: Member,
    membership: Arc<Membership>,
    stall_timeout: Duration,
    stop: CancellationToken,
) -> Result<(), String> {
    let consumption = tally_runtime::check("consumption");
    let client_id = format!("tally-watchdog-{}", member.owner);
    let watermarks = {
        let kafka = kafka.clone();
        tokio::task::spawn_blocking(move || Watermarks::new(&kafka, &client_id))
            .await
            .map_err(|e| e.to_string())??
    };
    let watermarks = Arc::new(watermarks);
    let interval = look_every(stall_timeout);
    let mut watch = Watch::default();
    // The stall under way: since when, and what it is.
    let mut episode: Option<(Instant, String)> = None;
    // The assignment a rejoin was asked for (once per assignment: the fresh consumer gets its
    // own stall_timeout).
    let mut asked_for: Option<Instant> = None;
    consumption.ok();
    loop {
        if tally_runtime::sleep_unless_stopped(interval, &stop).await {
            return Ok(());
        }
        let ends = {
            let watermarks = watermarks.clone();
            tokio::task::spawn_blocking(move || watermarks.read(KAFKA_TIMEOUT))
                .await
                .map_err(|e| e.to_string())?
        };
        let Ok(ends) = ends else {
            continue;
        };
        let Ok(stored) = store::committed_offsets(&pool, &member.group, &kafka.topic).await else {
            continue;
        };
        let views: Vec<PartitionView> = ends
            .iter()
            .map(|(&partition, &(first, end))| PartitionView {
                partition,
                first,
                end,
                next: stored
                    .iter()
                    .find(|row| row.partition == partition)
                    .and_then(|row| row.next_offset),
            })
            .collect();
        let assignment = membership.snapshot();
        let progress = membership.progress();
        // Members not seen for three looks have stopped, or stalled without saying so.
        let covered_by_others = store::covered_by_others(
            &pool,
            &member.owner,
            &member.group,
            &kafka.topic,
            interval * 3,
        )
        .await
        .unwrap_or_default();
        let activity = Activity {
            progress,
            covered_by_others,
        };
        let now = Instant::now();
        let verdict = watch.observe(
            now,
            &views,
            &assignment.partitions,
            assignment.since,
            stall_timeout,
            &activity,
        );
        match verdict {
            Verdict::Stalled {
                detail,
                stalled_for,
                rejoin,
            } => {
                if episode.is_none() {
                    if rejoin {
                        tracing::error!(%detail, "the aggregator is stalled; leaving the group and joining again with a fresh consumer");
                    } else {
                        tracing::error!(%detail, "the aggregator is stalled, waiting for Postgres");
                    }
                }
                let since = episode
                    .as_ref()
                    .map_or_else(|| now.checked_sub(stalled_for).unwrap_or(now), |e| e.0);
                episode = Some((since, detail));
                if rejoin && asked_for != Some(assignment.since) {
                    asked_for = Some(assignment.since);
                    membership.ask_rejoin();
                }
            }
            // Within a fresh assignment's grace: the stall lasts until something moves.
            Verdict::Consuming
                if episode.is_some() && watch.stuck(&assignment.partitions, interval) => {}
            Verdict::Consuming => {
                if episode.take().is_some() {
                    tracing::info!("the aggregator consumes again");
                }
            }
        }
        let stall = episode
            .as_ref()
            .map(|(since, detail)| (detail.as_str(), now.duration_since(*since)));
        match stall {
            Some((detail, stalled_for)) => {
                telemetry::record_stalled(stalled_for);
                consumption.failing(&format!("{detail} (stalled for {})", seconds(stalled_for)));
            }
            None => {
                telemetry::record_stalled(Duration::ZERO);
                consumption.ok();
            }
        }
        let record = store::MemberRecord {
            owner: &member.owner,
            group: &member.group,
            topic: &kafka.topic,
            instance_id: member.instance_id.as_deref(),
            assigned: &assignment.partitions,
            stall,
        };
        if let Err(error) = store::record_member(&pool, &record).await {
            tracing::debug!(%error, "recording this aggregator in aggregator_members failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(partition: i32, end: i64, next: Option<i64>) -> PartitionView {
        PartitionView {
            partition,
            first: 0,
            end,
            next,
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(60);

    /// Nothing polled, nothing committing, nothing held by others.
    fn idle() -> Activity {
        Activity::default()
    }

    #[test]
    fn an_assigned_partition_with_lag_that_never_moves_is_a_stall() {
        let start = Instant::now();
        let mut watch = Watch::default();
        let views = [view(0, 100, Some(10)), view(1, 50, Some(50))];
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(
            watch.observe(at(0), &views, &[0, 1], start, TIMEOUT, &idle()),
            Verdict::Consuming
        );
        assert_eq!(
            watch.observe(at(59), &views, &[0, 1], start, TIMEOUT, &idle()),
            Verdict::Consuming
        );
        match watch.observe(at(61), &views, &[0, 1], start, TIMEOUT, &idle()) {
            Verdict::Stalled {
                stalled_for,
                detail,
                rejoin,
            } => {
                assert!(rejoin);
                assert_eq!(stalled_for, Duration::from_secs(61));
                assert_eq!(detail, "assigned partitions 0 but consumed nothing from them for 61 s while they have 90 messages of lag");
            }
            other => panic!("{other:?}"),
        }
        // Progress clears it.
        let moved = [view(0, 100, Some(20)), view(1, 50, Some(50))];
        assert_eq!(
            watch.observe(at(62), &moved, &[0, 1], start, TIMEOUT, &idle()),
            Verdict::Consuming
        );
        // A fresh assignment gets its own stall_timeout, however long the lag has stood.
        assert_eq!(
            watch.observe(at(150), &moved, &[0, 1], at(100), TIMEOUT, &idle()),
            Verdict::Consuming
        );
        assert!(matches!(
            watch.observe(at(161), &moved, &[0, 1], at(100), TIMEOUT, &idle()),
            Verdict::Stalled { .. }
        ));
    }

    #[test]
    fn caught_up_or_slow_but_moving_is_no_stall() {
        let start = Instant::now();
        let mut watch = Watch::default();
        for s in 0..10 {
            let views = [view(0, 1000 + s * 100, Some(s * 10)), view(1, 5, Some(5))];
            let at = start + Duration::from_secs(s as u64 * 30);
            assert_eq!(
                watch.observe(at, &views, &[0, 1], start, TIMEOUT, &idle()),
                Verdict::Consuming
            );
        }
    }

    #[test]
    fn no_assignment_while_nobody_consumes_a_lagging_partition_is_a_stall() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut watch = Watch::default();
        // Never consumed: the lag counts from the first offset Kafka holds.
        let views = [PartitionView {
            partition: 3,
            first: 40,
            end: 100,
            next: None,
        }];
        assert_eq!(views[0].lag(), 60);
        assert_eq!(
            watch.observe(at(0), &views, &[], start, TIMEOUT, &idle()),
            Verdict::Consuming
        );
        match watch.observe(at(70), &views, &[], start, TIMEOUT, &idle()) {
            Verdict::Stalled { detail, .. } => assert_eq!(
                detail,
                "assigned no partition for 70 s while partitions 3 have 60 messages of lag that no aggregator consumes"
            ),
            other => panic!("{other:?}"),
        }
        // Another member holds it and consumes: not this member's stall.
        let consumed = [PartitionView {
            partition: 3,
            first: 40,
            end: 100,
            next: Some(50),
        }];
        assert_eq!(
            watch.observe(at(71), &consumed, &[], start, TIMEOUT, &idle()),
            Verdict::Consuming
        );
        // A member with partitions of its own is not judged on the others'.
        assert_eq!(
            watch.observe(at(200), &consumed, &[1], start, TIMEOUT, &idle()),
            Verdict::Consuming
        );
    }

    /// A commit Postgres takes its time over (for up to `stall_timeout`), or consuming while
    /// nothing commits, is progress, partition by partition; a partition another member holds
    /// while making progress is not orphaned.
    #[test]
    fn committing_consuming_or_held_by_a_live_member_is_no_stall() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let views = [view(0, 100, Some(10)), view(1, 100, Some(10))];
        // Two lanes: partition 0 in lane 0, partition 1 in lane 1.
        let committing = |since: u64| Activity {
            progress: Progress {
                committing_since: vec![Some(at(since)), None],
                ..Progress::default()
            },
            ..idle()
        };
        let mut watch = Watch::default();
        for s in [0, 30, 50] {
            assert_eq!(
                watch.observe(at(s), &views[..1], &[0], start, TIMEOUT, &committing(0)),
                Verdict::Consuming
            );
        }
        // The commit has been under way for longer than a commit may take: a stall, said to
        // be Postgres's, with no rejoin (it would only throw the commit away).
        match watch.observe(at(111), &views[..1], &[0], start, TIMEOUT, &committing(0)) {
            Verdict::Stalled { detail, rejoin, .. } => {
                assert!(!rejoin);
                assert!(detail.contains("has been committing for 111 s"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // Lane 0 committing says nothing of partition 1, which nothing moves.
        let mut watch = Watch::default();
        watch.observe(at(0), &views, &[0, 1], start, TIMEOUT, &committing(0));
        match watch.observe(at(61), &views, &[0, 1], start, TIMEOUT, &committing(59)) {
            Verdict::Stalled { detail, .. } => {
                assert!(detail.starts_with("assigned partitions 1 but"), "{detail}")
            }
            other => panic!("{other:?}"),
        }

        let mut watch = Watch::default();
        for s in 0..10u64 {
            let consuming = Activity {
                progress: Progress {
                    consumed: [(0, s)].into(),
                    ..Progress::default()
                },
                ..idle()
            };
            assert_eq!(
                watch.observe(at(s * 30), &views[..1], &[0], start, TIMEOUT, &consuming),
                Verdict::Consuming
            );
        }

        let mut watch = Watch::default();
        let held = Activity {
            covered_by_others: vec![0],
            ..idle()
        };
        for s in [0, 70, 200] {
            assert_eq!(
                watch.observe(at(s), &views[..1], &[], start, TIMEOUT, &held),
                Verdict::Consuming
            );
        }
    }
}
