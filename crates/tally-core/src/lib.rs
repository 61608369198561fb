//! tally's domain: what a usage event is, how it travels on the wire, which meters exist, how
//! time is cut into windows, and how configuration is read. Nothing here does I/O, so every
//! rule can be tested in isolation and shared by the emitter, the aggregator and the HTTP API.

pub mod config;
pub mod duration;
pub mod event;
pub mod meter;
pub mod reject;
pub mod window;
pub mod wire;

pub use event::{UsageEvent, MAX_EVENT_BYTES};
pub use meter::{Aggregation, BillingKind, MeterDefinition, Meters};
pub use reject::{RejectReason, Rejection};
