//! Data-error isolation: when Postgres refuses a batch's data, the batch is bisected in
//! transactions that are rolled back until each event Postgres refuses on its own is found;
//! those become `unprocessable` rejects, so the rest of the batch can be committed.

use std::collections::{BTreeSet, HashMap};

use sqlx::PgPool;
use tally_core::{RejectReason, Rejection};

use super::commit::apply;
use super::AggregatorStoreError;
use crate::batch::{Batch, Candidate, Reject};

/// One item Postgres refuses on its own, and what it said.
struct Refused {
    /// The item's index in what was searched.
    index: usize,
    error: sqlx::Error,
}

/// Runs [`apply`] on a part of a batch in a transaction that is always rolled back: does
/// Postgres take this part?
async fn probe(
    pool: &PgPool,
    topic: &str,
    candidates: &[&Candidate],
    rejects: &[&Reject],
    priced_meters: &BTreeSet<String>,
    versions: &HashMap<String, i64>,
) -> Result<(), AggregatorStoreError> {
    let mut tx = pool.begin().await?;
    let result = apply(&mut tx, topic, candidates, rejects, priced_meters, versions)
        .await
        .map(drop);
    tx.rollback().await?;
    result
}

/// After a batch failed with a data error (see [`AggregatorStoreError::Data`]): finds, by halving it in
/// transactions that are rolled back, each event Postgres refuses on its own, and turns it into
/// an `unprocessable` reject holding the database's message (its text fields left out, since
/// they may be what Postgres refused; the raw bytes are kept). Everything else in the batch is
/// then committed as usual. Returns how many were found; none means the failure is not one
/// event's, and the batch is retried as it is.
pub(crate) async fn isolate_unprocessable(
    pool: &PgPool,
    topic: &str,
    batch: &mut Batch,
    priced_meters: &BTreeSet<String>,
) -> Result<usize, AggregatorStoreError> {
    let versions = batch.versions.clone();
    let candidates: Vec<&Candidate> = batch.candidates.iter().collect();
    let bad_candidates = bisect(candidates.len(), |range| {
        probe(
            pool,
            topic,
            &candidates[range],
            &[],
            priced_meters,
            &versions,
        )
    })
    .await?;
    let rejects: Vec<&Reject> = batch.rejects.iter().collect();
    let bad_rejects = bisect(rejects.len(), |range| {
        probe(pool, topic, &[], &rejects[range], priced_meters, &versions)
    })
    .await?;
    let found = bad_candidates.len() + bad_rejects.len();

    let unprocessable = |message, error: &sqlx::Error| Reject {
        rejection: Rejection::new(
            RejectReason::Unprocessable,
            format!("valid by the event contract, but Postgres refused to store it: {error}"),
        ),
        event_id: None,
        customer: None,
        meter: None,
        message,
    };
    for refused in bad_rejects.iter().rev() {
        let message = batch.rejects[refused.index].message.clone();
        batch.rejects[refused.index] = unprocessable(message, &refused.error);
    }
    for refused in bad_candidates.iter().rev() {
        let candidate = batch.candidates.remove(refused.index);
        batch
            .rejects
            .push(unprocessable(candidate.message, &refused.error));
    }
    Ok(found)
}

/// The items among `0..len` that fail on their own, with their errors: halves every failing
/// range until single items are left. Only data errors count as failing; any other error ends
/// the search.
async fn bisect<F, Fut>(len: usize, mut probe: F) -> Result<Vec<Refused>, AggregatorStoreError>
where
    F: FnMut(std::ops::Range<usize>) -> Fut,
    Fut: std::future::Future<Output = Result<(), AggregatorStoreError>>,
{
    let mut failing = Vec::new();
    let mut ranges = Vec::new();
    ranges.push(0..len);
    while let Some(range) = ranges.pop() {
        if range.is_empty() {
            continue;
        }
        match probe(range.clone()).await {
            Ok(()) => {}
            Err(AggregatorStoreError::Data(error)) if range.len() == 1 => failing.push(Refused {
                index: range.start,
                error,
            }),
            Err(AggregatorStoreError::Data(_)) => {
                let middle = range.start + range.len() / 2;
                ranges.push(middle..range.end);
                ranges.push(range.start..middle);
            }
            Err(other) => return Err(other),
        }
    }
    failing.sort_by_key(|refused| refused.index);
    Ok(failing)
}
