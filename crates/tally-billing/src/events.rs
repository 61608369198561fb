//! What tally reads from a verified Stripe webhook event, without Stripe's types: the event
//! itself, the part of it tally acts on ([`WebhookEffect`]: a subscription, an invoice, a
//! Checkout Session, a refund or dispute), and what applying it did or why it could not
//! (`stripe.rs` and `checkout.rs` apply them; `tally-api` parses Stripe's objects into these).

use chrono::{DateTime, Utc};

use crate::store::BillingStoreError;

/// A verified webhook event, as stored in `stripe_webhook_events`.
#[derive(Debug, Clone)]
pub struct StripeEvent {
    pub id: String,
    pub event_type: String,
    pub created: DateTime<Utc>,
    pub livemode: bool,
    /// The raw event as received (JSON text), kept for audit and replay by hand.
    pub payload: String,
}

/// What a `customer.subscription.*` event says about the subscription.
#[derive(Debug, Clone)]
pub struct StripeSubscription {
    pub id: String,
    pub stripe_customer: String,
    /// Stripe's status: active, trialing, past_due, unpaid, incomplete, incomplete_expired,
    /// paused or canceled.
    pub status: String,
    pub current_period_start: DateTime<Utc>,
    pub current_period_end: DateTime<Utc>,
    pub cancel_at_period_end: bool,
    pub prices: Vec<StripePrice>,
    /// `customer.subscription.deleted`: the subscription has ended.
    pub deleted: bool,
    /// `metadata.tally_checkout_id`: the tally Checkout Session that created it.
    pub checkout_id: Option<String>,
}

/// A price on a subscription item; `metadata.tally_plan` names the plan directly.
#[derive(Debug, Clone)]
pub struct StripePrice {
    pub id: String,
    pub tally_plan: Option<String>,
}

/// What an `invoice.*` event says about the invoice.
#[derive(Debug, Clone)]
pub struct StripeInvoice {
    pub id: String,
    pub stripe_customer: Option<String>,
    pub stripe_subscription: Option<String>,
    pub number: Option<String>,
    pub status: Option<String>,
    pub currency: String,
    pub amount_due: i64,
    pub amount_paid: i64,
    pub amount_remaining: i64,
    pub total: i64,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    pub attempt_count: i64,
    pub created: DateTime<Utc>,
    pub hosted_invoice_url: Option<String>,
    pub invoice_pdf: Option<String>,
    pub lines: Vec<StripeInvoiceLine>,
    /// Stripe's event carries the first lines only; `false` when it said more follow.
    pub lines_complete: bool,
}

/// One line of an invoice: a plan's fee, a meter's usage, or anything else billed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StripeInvoiceLine {
    pub id: String,
    pub price: Option<String>,
    pub description: Option<String>,
    pub quantity: Option<String>,
    pub amount: i64,
    pub period_start: i64,
    pub period_end: i64,
}

/// The part of an event tally acts on.
#[derive(Debug, Clone)]
pub enum WebhookEffect {
    Subscription(StripeSubscription),
    Invoice(StripeInvoice),
    /// `checkout.session.completed`, `.async_payment_succeeded`, `.async_payment_failed`,
    /// `.expired`.
    Checkout(CheckoutEvent, StripeCheckoutSession),
    /// `charge.refunded`.
    Refund(StripeRefund),
    /// A thin event `v1.billing.meter.*`: Stripe accepted meter events it will not bill.
    /// Recorded; `tally reconcile` fetches and shows the details.
    MeterErrorReport,
    /// A type tally does not act on; stored so a replay is recognised.
    Ignored,
}

/// What handling the event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// tally changed; `customer` is the tally customer whose entitlements may have changed.
    Applied {
        customer: Option<String>,
    },
    /// Older than the event that last changed the object: stored, not applied.
    Stale,
    /// About a Checkout Session or a payment tally did not open: stored, nothing done.
    NotTallys,
    /// About a session of tally's that does not match its record (another customer, another
    /// amount): stored, nothing granted.
    Refused,
    Ignored,
    /// The event id was handled before: nothing changed.
    Replay,
    /// Of the same second as the event that last changed the subscription, and it would move
    /// the status backwards: nothing is stored. Ask Stripe for the subscription as it is now
    /// and apply that with [`SameSecond::Current`].
    AskStripe {
        subscription: String,
    },
}

/// How an event of the same second as the one that last changed a subscription is decided.
/// Stripe's clock has whole seconds and Stripe does not deliver in order, so two events of one
/// second (`past_due`, then `active` once a retried payment succeeds) may arrive either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SameSecond {
    /// An event that would move the status backwards is not decided here: the outcome is
    /// [`WebhookOutcome::AskStripe`].
    AskStripe,
    /// The subscription given is Stripe's current object, fetched after the event: it wins a
    /// tie (only a strictly newer event stands against it).
    Current,
    /// No way to ask Stripe (no secret key): an event that would move the status backwards
    /// loses the tie.
    ByStatus,
}

impl WebhookOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            WebhookOutcome::Applied { .. } => "applied",
            WebhookOutcome::Stale => "stale",
            WebhookOutcome::NotTallys => "not_tallys",
            WebhookOutcome::Refused => "refused",
            WebhookOutcome::Ignored => "ignored",
            WebhookOutcome::Replay => "replay",
            WebhookOutcome::AskStripe { .. } => "ask_stripe",
        }
    }
}

/// Why an event could not be applied. Nothing is stored, so Stripe's retries (for up to three
/// days) apply it once the cause is fixed.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("Stripe customer {0:?} is not mapped to a tally customer; run `tally customers map <customer> {0}`")]
    UnmappedCustomer(String),
    #[error("Stripe customer {stripe_customer:?} is mapped to several tally customers ({customers}); keep one mapping")]
    AmbiguousCustomer {
        stripe_customer: String,
        customers: String,
    },
    #[error("no plan for Stripe price(s) {0}; add the price to a plan's stripe_prices in tally.toml and run `tally plans apply`, or set metadata.tally_plan on the price")]
    UnknownPrice(String),
    #[error(
        "the subscription's prices select several plans ({0}); a subscription must select one"
    )]
    AmbiguousPlan(String),
    #[error("the credits could not be granted or voided: {0}")]
    Credits(String),
    #[error(transparent)]
    Store(#[from] BillingStoreError),
}

impl WebhookError {
    /// Stable code for API errors.
    pub fn code(&self) -> &'static str {
        match self {
            WebhookError::UnmappedCustomer(_) => "UNMAPPED_STRIPE_CUSTOMER",
            WebhookError::AmbiguousCustomer { .. } => "AMBIGUOUS_STRIPE_CUSTOMER",
            WebhookError::UnknownPrice(_) => "UNKNOWN_STRIPE_PRICE",
            WebhookError::AmbiguousPlan(_) => "AMBIGUOUS_PLAN",
            WebhookError::Credits(_) => "CREDITS_NOT_APPLIED",
            WebhookError::Store(BillingStoreError::SecondLiveSubscription { .. }) => {
                "SECOND_LIVE_SUBSCRIPTION"
            }
            WebhookError::Store(BillingStoreError::UnknownPlan(_)) => "UNKNOWN_PLAN",
            WebhookError::Store(_) => "INTERNAL",
        }
    }
}

impl From<sqlx::Error> for WebhookError {
    fn from(error: sqlx::Error) -> Self {
        WebhookError::Store(error.into())
    }
}

/// What a `checkout.session.*` event says about the session.
#[derive(Debug, Clone)]
pub struct StripeCheckoutSession {
    pub id: String,
    /// `payment` or `subscription`.
    pub mode: String,
    /// `paid`, `unpaid` or `no_payment_required`.
    pub payment_status: String,
    pub stripe_customer: Option<String>,
    pub payment_intent: Option<String>,
    pub subscription: Option<String>,
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    /// `metadata.tally_checkout_id`.
    pub checkout_id: Option<String>,
}

/// Which `checkout.session.*` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckoutEvent {
    Completed,
    AsyncPaymentSucceeded,
    AsyncPaymentFailed,
    Expired,
}

/// What a `charge.refunded` or `charge.dispute.created` event says: money of a payment went
/// back to the customer (a refund, or the cardholder's bank in a dispute).
#[derive(Debug, Clone)]
pub struct StripeRefund {
    pub charge: String,
    pub payment_intent: Option<String>,
    /// The payment's amount.
    pub amount: i64,
    /// What went back so far (a dispute: its amount).
    pub amount_refunded: i64,
    /// A dispute (chargeback), not a refund.
    pub disputed: bool,
}
