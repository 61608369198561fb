//! A batch, before and after Postgres has its say. [`Batch::push`] decodes and checks each
//! Kafka message (refusing bad ones with a reason) and drops same-payload copies within the
//! batch; [`fold()`] then adds the events whose ids Postgres let us claim into window deltas.
//! No I/O here, so every rule is tested beside the code.
//!
//! - `check`: the "is this event acceptable" side: wire decoding, meter lookup, the
//!   aggregator's own rules, in-batch duplicates, and the rejects for what is refused.
//! - `fold`: combining accepted events into one delta per window and aggregation.

mod check;
#[cfg(test)]
mod fixtures;
mod fold;

pub(crate) use check::{
    conflict, counted_as, Batch, Candidate, ConsumedMessage, Message, Reject, Rules,
};
pub(crate) use fold::{fold, Granularity, WindowDelta};
