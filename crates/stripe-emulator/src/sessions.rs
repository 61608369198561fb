//! What the emulator holds of Checkout: sessions, the payments they took, billing portal
//! sessions (`checkout.rs` is what they do).

use std::collections::BTreeMap;

#[derive(Default)]
pub(crate) struct Checkout {
    pub(crate) sessions: BTreeMap<String, Session>,
    /// Payments by payment intent id.
    pub(crate) payments: BTreeMap<String, Payment>,
    pub(crate) portal_sessions: BTreeMap<String, PortalSession>,
}

pub(crate) struct Session {
    pub(crate) id: String,
    /// `payment` or `subscription`.
    pub(crate) mode: String,
    pub(crate) customer: String,
    pub(crate) line_items: Vec<(String, Option<u64>)>,
    pub(crate) success_url: Option<String>,
    pub(crate) cancel_url: Option<String>,
    pub(crate) client_reference_id: Option<String>,
    pub(crate) metadata: BTreeMap<String, String>,
    pub(crate) subscription_metadata: BTreeMap<String, String>,
    /// `open`, `complete` or `expired`.
    pub(crate) status: String,
    /// `unpaid`, `paid` or `no_payment_required`.
    pub(crate) payment_status: String,
    pub(crate) amount_total: i64,
    pub(crate) currency: String,
    pub(crate) payment_intent: Option<String>,
    pub(crate) subscription: Option<String>,
    pub(crate) invoice: Option<String>,
    pub(crate) livemode: bool,
    pub(crate) created: i64,
    pub(crate) expires_at: i64,
}

pub(crate) struct Payment {
    pub(crate) intent: String,
    pub(crate) charge: String,
    pub(crate) customer: String,
    pub(crate) amount: i64,
    pub(crate) amount_refunded: i64,
    pub(crate) currency: String,
    /// `processing` until an asynchronous payment settles, then `succeeded` or `failed`.
    pub(crate) status: String,
    pub(crate) livemode: bool,
    pub(crate) created: i64,
}

pub(crate) struct PortalSession {
    pub(crate) id: String,
    pub(crate) customer: String,
    pub(crate) return_url: Option<String>,
    pub(crate) livemode: bool,
    pub(crate) created: i64,
}
