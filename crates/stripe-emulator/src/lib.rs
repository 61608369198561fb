//! A local Stripe Billing API for tests and the demo.
//!
//! Stripe cannot be reached from our machines, so the sink is tested against this: a real HTTP
//! server that answers the endpoints tally uses the way Stripe documents them (form bodies,
//! bearer keys, Stripe's error JSON, identifier uniqueness, the timestamp window, idempotency
//! keys, per-account rate limits and one concurrent call per customer and meter), and that can
//! be told to fail: 500s, 503s, delays, and the ambiguous failure where the event is committed
//! and the connection is dropped before the response.
//!
//! - `config.rs`: rates and fault probabilities.
//! - `server.rs`: the listener, the request pipeline (auth, limits, idempotency, faults), routes.
//! - `store.rs`: customers, meters, meter events and their summaries.
//! - `limits.rs`: the per-account rate window and the per-customer-and-meter lock.
//! - `idempotency.rs`: `Idempotency-Key` replay, mismatch and in-flight rules.
//! - `reply.rs`: responses and Stripe's error JSON.

mod config;
mod idempotency;
mod limits;
mod reply;
mod server;
mod store;

pub use config::{EmulatorConfig, Faults};
pub use server::{Emulator, EmulatorError};
pub use store::{MeterTotal, Stats};
