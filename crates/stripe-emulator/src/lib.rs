//! A local Stripe Billing API for tests and the demo.
//!
//! Stripe cannot be reached from our machines, so the sink is tested against this: a real HTTP
//! server that answers the endpoints tally uses the way Stripe documents them (form bodies,
//! bearer keys, Stripe's error JSON, identifier uniqueness, the timestamp window, idempotency
//! keys, per-account rate limits and one concurrent call per customer and meter), and that can
//! be told to fail: 500s, 503s, delays, and the ambiguous failure where the event is committed
//! and the connection is dropped before the response.
//!
//! It also holds products, prices and subscriptions (`POST /v1/prices`, `/v1/subscriptions`),
//! invoices their periods (licensed fees ahead, metered usage in arrears), sells through
//! Checkout Sessions (`/v1/checkout/sessions`, completed by `/_emulator/checkout/{id}/complete`
//! as a paying customer would), refunds, opens billing portal sessions, and sends the signed
//! events all of these produce (`customer.subscription.*`, `invoice.*`, `checkout.session.*`,
//! `charge.*`) to the URLs registered with `POST /v1/webhook_endpoints`, so tally's webhook
//! endpoint is tested end to end.
//!
//! - `config.rs`: rates and fault probabilities.
//! - `server.rs`: the listener, the request pipeline (auth, limits, idempotency, faults), routes.
//! - `store.rs`: customers, meters, meter events and their summaries.
//! - `stream.rs`: v2 meter events: sessions, the stream (validated afterwards, errors reported
//!   as thin events), v2 adjustments.
//! - `limits.rs`: the per-account rate window and the per-customer-and-meter lock.
//! - `idempotency.rs`: `Idempotency-Key` replay, mismatch and in-flight rules.
//! - `reply.rs`: responses and Stripe's error JSON.
//! - `billing.rs`: products, prices, subscriptions, invoices, and the events their changes
//!   produce.
//! - `checkout.rs`: Checkout Sessions, payments and refunds, billing portal sessions, and the
//!   hosted pages (Checkout, invoices and their PDFs, the portal).
//! - `sessions.rs`: what it holds of Checkout Sessions, payments and portal sessions.
//! - `webhooks.rs`: webhook endpoints, Stripe's signature, delivery with retries.
//! - `testing.rs`: plain HTTP calls for tests.

mod billing;
mod checkout;
mod config;
mod idempotency;
mod limits;
mod reply;
mod server;
mod sessions;
mod store;
mod stream;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod webhooks;

pub use config::{EmulatorConfig, Faults};
pub use server::{Emulator, EmulatorError};
pub use store::{MeterTotal, Stats};
pub use webhooks::{signature_header, EventRecord};
