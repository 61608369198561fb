//! Finding the one row that fails a batch: a batched read or write that Postgres refuses
//! because of one item's data (a sum beyond a 28-digit decimal, a value that does not fit) is
//! run again on halves of the batch until each item at fault is found alone. The others get
//! their answers; the items at fault are returned apart with their errors. A batch that fails
//! for another reason (Postgres away) fails as a whole: that is not one item's fault.

use std::future::Future;

/// Runs `run` on `items`, then on halves of a part that fails with a data error, down to
/// single items. Returns every answer of the parts that succeeded, and each item that fails
/// alone with its error. Costs one call when nothing fails, about 2·log2(n) per item at fault.
pub async fn isolate<T, R, F, Fut>(
    items: &[T],
    mut run: F,
) -> Result<(Vec<R>, Vec<(T, sqlx::Error)>), sqlx::Error>
where
    T: Clone,
    F: FnMut(Vec<T>) -> Fut,
    Fut: Future<Output = Result<Vec<R>, sqlx::Error>>,
{
    let mut answers = Vec::new();
    let mut failed = Vec::new();
    let mut pending: Vec<Vec<T>> = vec![items.to_vec()];
    while let Some(part) = pending.pop() {
        if part.is_empty() {
            continue;
        }
        match run(part.clone()).await {
            Ok(mut answer) => answers.append(&mut answer),
            Err(error) if crate::is_data_error(&error) => {
                if part.len() == 1 {
                    failed.push((part[0].clone(), error));
                } else {
                    let (left, right) = part.split_at(part.len() / 2);
                    pending.push(right.to_vec());
                    pending.push(left.to_vec());
                }
            }
            Err(other) => return Err(other),
        }
    }
    Ok((answers, failed))
}
