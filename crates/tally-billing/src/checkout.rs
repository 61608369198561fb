//! Self-serve billing through Stripe: Checkout Sessions for a plan (mode `subscription`) or a
//! credit pack (mode `payment`), the billing portal, and what their webhook events do.
//!
//! A session is recorded in `checkout_sessions` before Stripe is asked, and its `checkout_id`
//! travels in the session's metadata, so every session Stripe holds for tally is found again,
//! even one whose answer never arrived. Webhook events act only on recorded sessions, and only
//! with what the record says (customer, pack, credits, amount): a session tally did not open,
//! or one whose customer or amount differ from the record, grants nothing.
//!
//! - A paid pack (`checkout.session.completed` with `payment_status = paid`, or
//!   `checkout.session.async_payment_succeeded`) is granted once, as a `purchased` grant under
//!   the key `checkout:<session id>`, in the event's transaction.
//! - A refund (`charge.refunded`) voids what is left of the pack's grant; one that comes before
//!   the payment's completion is kept (`stripe_refunds`), and the completion grants nothing.
//! - A plan's session records the subscription it created; `customer.subscription.*` events
//!   make it live (`stripe.rs`), ending a tally-managed subscription the customer had.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use stripe_billing::billing_portal_session::CreateBillingPortalSession;
use stripe_checkout::checkout_session::{
    CreateCheckoutSession, CreateCheckoutSessionLineItems, CreateCheckoutSessionSubscriptionData,
};
use stripe_client_core::{RequestStrategy, StripeRequest};
use stripe_shared::CheckoutSessionMode;
use tally_credits::{Actor, CreditError, CreditPack};
use tally_sink::{StripeCallError, StripeHttp};
use uuid::Uuid;

use crate::catalog::{self, PriceKind};
use crate::events::{
    CheckoutEvent, StripeCheckoutSession, StripeEvent, StripeRefund, WebhookError, WebhookOutcome,
};

/// The metadata key that carries a session's `checkout_id` (on the session and on the
/// subscription it creates).
pub const CHECKOUT_ID_KEY: &str = "tally_checkout_id";

/// Why a session or a portal could not be opened; [`CheckoutError::code`] is its stable code.
#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no plan {0:?}; add it to [[plans]] in tally.toml and run `tally plans apply`")]
    UnknownPlan(String),
    #[error("plan {0:?} has no Stripe price tally has checked; give it stripe_prices (or run `tally plans sync --create`), then `tally plans apply`")]
    PlanNotForSale(String),
    #[error("no credit pack {0:?}; add it to [[credits.packs]] in tally.toml")]
    UnknownPack(String),
    #[error("credit pack {0:?} has no Stripe price tally has checked; give it stripe_price (or run `tally plans sync --create`), then `tally plans apply`")]
    PackNotForSale(String),
    #[error("customer {0:?} has no Stripe customer; run `tally customers sync --create` or `tally customers map {0} cus_…`")]
    NoStripeCustomer(String),
    #[error("{field} {url:?} is refused: {why}")]
    BadReturnUrl {
        field: &'static str,
        url: String,
        why: String,
    },
    #[error("Stripe refused the session: {0}")]
    StripeRefused(StripeCallError),
    #[error("Stripe could not be reached ({0}); try again")]
    StripeUnavailable(StripeCallError),
    /// An earlier attempt's idempotency key, which Stripe answers only for that attempt's
    /// parameters; the attempt is closed, and a new one may be made at once.
    #[error("Stripe keeps the answer to an earlier attempt ({0}); try again")]
    AttemptClosed(StripeCallError),
    #[error(
        "no Stripe secret key: set STRIPE_SECRET_KEY for `tally serve` to sell through Checkout"
    )]
    StripeNotConfigured,
    #[error("customer {0:?} already has a Stripe subscription; change its plan in Stripe's billing portal (POST /v1/customers/{{id}}/billing-portal), not with a second Checkout")]
    AlreadySubscribed(String),
    #[error("customer {0:?} has a plan Checkout open; complete it, or open another once it expires ({PLAN_SESSION_MINUTES} minutes after it was opened)")]
    CheckoutInProgress(String),
    #[error("customer {0:?} has {MAX_OPEN_SESSIONS} Checkout Sessions open; complete them, or wait until they expire")]
    TooManyOpenSessions(String),
    #[error("customer {customer:?} is on plan {plan:?}, assigned by an operator: only an admin token may replace it through Checkout")]
    AssignedPlan { customer: String, plan: String },
    #[error("credit pack {0:?} costs {1} in tally.toml but its checked Stripe price is {2}; run `tally plans sync` (or `tally plans apply`) so they agree")]
    PackPriceChanged(String, String, String),
    #[error("plan {0:?} is not self-serve: only an admin token may open its checkout (or set self_serve = true on the plan)")]
    NotSelfServe(String),
    #[error("Postgres: {0}")]
    Store(#[from] sqlx::Error),
    #[error(transparent)]
    Plans(#[from] crate::store::BillingStoreError),
}

impl CheckoutError {
    pub fn code(&self) -> &'static str {
        match self {
            CheckoutError::UnknownPlan(_) => "UNKNOWN_PLAN",
            CheckoutError::PlanNotForSale(_) => "PLAN_NOT_FOR_SALE",
            CheckoutError::UnknownPack(_) => "UNKNOWN_PACK",
            CheckoutError::PackNotForSale(_) => "PACK_NOT_FOR_SALE",
            CheckoutError::NoStripeCustomer(_) => "NO_STRIPE_CUSTOMER",
            CheckoutError::BadReturnUrl { .. } => "INVALID_RETURN_URL",
            CheckoutError::StripeRefused(_) => "STRIPE_REFUSED",
            CheckoutError::StripeUnavailable(_) | CheckoutError::AttemptClosed(_) => {
                "STRIPE_UNAVAILABLE"
            }
            CheckoutError::StripeNotConfigured => "STRIPE_NOT_CONFIGURED",
            CheckoutError::AlreadySubscribed(_) => "ALREADY_SUBSCRIBED",
            CheckoutError::CheckoutInProgress(_) => "CHECKOUT_IN_PROGRESS",
            CheckoutError::TooManyOpenSessions(_) => "TOO_MANY_OPEN_SESSIONS",
            CheckoutError::AssignedPlan { .. } => "NOT_SELF_SERVE",
            CheckoutError::PackPriceChanged(..) => "PACK_NOT_FOR_SALE",
            CheckoutError::NotSelfServe(_) => "NOT_SELF_SERVE",
            CheckoutError::Store(_) | CheckoutError::Plans(_) => "STORE_UNAVAILABLE",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            CheckoutError::UnknownPlan(_) | CheckoutError::UnknownPack(_) => 404,
            CheckoutError::PlanNotForSale(_)
            | CheckoutError::PackNotForSale(_)
            | CheckoutError::PackPriceChanged(..)
            | CheckoutError::NoStripeCustomer(_)
            | CheckoutError::AlreadySubscribed(_)
            | CheckoutError::CheckoutInProgress(_) => 409,
            CheckoutError::AssignedPlan { .. } | CheckoutError::NotSelfServe(_) => 403,
            CheckoutError::TooManyOpenSessions(_) => 429,
            CheckoutError::BadReturnUrl { .. } => 400,
            CheckoutError::StripeRefused(_) => 502,
            CheckoutError::StripeUnavailable(_)
            | CheckoutError::AttemptClosed(_)
            | CheckoutError::StripeNotConfigured
            | CheckoutError::Store(_)
            | CheckoutError::Plans(_) => 503,
        }
    }
}

/// Where Stripe sends the customer back: https (http only to a loopback host, for local
/// development, and never with a live key: a live customer's browser must not be sent to its
/// own machine), no user name or password, at most 2,048 characters, and, when `allowed` is
/// not empty, on one of its origins (`https://app.example.com`).
pub fn check_return_url(
    field: &'static str,
    url: &str,
    allowed: &[String],
    livemode: bool,
) -> Result<(), CheckoutError> {
    let refuse = |why: &str| CheckoutError::BadReturnUrl {
        field,
        url: url.chars().take(200).collect(),
        why: why.to_owned(),
    };
    if url.len() > 2048 {
        return Err(refuse("longer than 2048 characters"));
    }
    let uri: http::Uri = url.parse().map_err(|_| refuse("not a URL"))?;
    let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
        return Err(refuse("not an absolute URL"));
    };
    if authority.as_str().contains('@') {
        return Err(refuse("a URL with a user name or password"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let host = host.trim_end_matches('.');
    let loopback = host == "localhost"
        || host.ends_with(".localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| match ip {
            std::net::IpAddr::V4(v4) => v4.is_loopback(),
            std::net::IpAddr::V6(v6) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
        });
    if loopback && livemode {
        return Err(refuse("a loopback address with a live Stripe key"));
    }
    match scheme {
        "https" => {}
        "http" if loopback => {}
        _ => return Err(refuse("must be https (http only to localhost)")),
    }
    let origin = format!("{scheme}://{}", authority.as_str()).to_ascii_lowercase();
    if !allowed.is_empty() && !allowed.iter().any(|a| a.trim_end_matches('/') == origin) {
        return Err(refuse(&format!(
            "{origin} is not one of serve.checkout_return_origins"
        )));
    }
    Ok(())
}

/// Who opens a session, and where the customer goes after.
#[derive(Debug, Clone)]
pub struct CheckoutRequest<'a> {
    pub customer: &'a str,
    pub success_url: &'a str,
    pub cancel_url: &'a str,
    /// For the record: `token:<name>`.
    pub requested_by: String,
    /// An operator (admin token): may replace a plan an operator assigned.
    pub operator: bool,
}

/// Sessions a customer may have open at once (Stripe keeps one open up to 24 hours): a
/// customer token cannot fill `checkout_sessions` or spend the account's Stripe rate.
pub const MAX_OPEN_SESSIONS: i64 = 10;

/// How long a plan's Checkout Session stays open (Stripe's shortest): a customer who leaves
/// Stripe's page may start again this soon, and no two plan sessions are open at once.
pub const PLAN_SESSION_MINUTES: i64 = 30;

/// A Checkout Session opened: send the customer to `url`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OpenedSession {
    pub id: String,
    pub url: String,
}

/// Opens a Checkout Session (mode `subscription`) for `plan`: its fee and its metered prices,
/// so usage bills on the same subscription. A customer (not an operator) may buy only a plan
/// with `self_serve = true`.
pub async fn checkout_plan(
    pool: &PgPool,
    stripe: &StripeHttp,
    plan: &str,
    request: &CheckoutRequest<'_>,
) -> Result<OpenedSession, CheckoutError> {
    let Some(definition) = crate::store::get_plan(pool, plan).await? else {
        return Err(CheckoutError::UnknownPlan(plan.to_owned()));
    };
    if !request.operator && !definition.self_serve {
        return Err(CheckoutError::NotSelfServe(plan.to_owned()));
    }
    let prices = catalog::prices_of(pool, Some(plan), None).await?;
    if prices.is_empty() {
        return Err(CheckoutError::PlanNotForSale(plan.to_owned()));
    }
    // The fee as the plan says it now, at the price Stripe was checked to charge: a plan whose
    // price changed since `tally plans apply` checked Stripe is not sold at the old one.
    let fee_now = definition
        .price
        .as_ref()
        .and_then(|p| catalog::minor_units(p.amount, &p.currency));
    let fee_checked = prices
        .iter()
        .find(|p| p.kind == PriceKind::Licensed)
        .map(|p| p.unit_amount_decimal);
    if fee_now != fee_checked {
        return Err(CheckoutError::PlanNotForSale(plan.to_owned()));
    }
    let stripe_customer = stripe_customer(pool, request.customer).await?;
    let fee: Decimal = prices
        .iter()
        .filter(|p| p.kind == PriceKind::Licensed)
        .map(|p| p.unit_amount_decimal)
        .sum();
    let record = Record {
        mode: "subscription",
        plan: Some(plan),
        pack: None,
        amount: fee.round().try_into().unwrap_or(i64::MAX),
        currency: &prices[0].currency,
    };
    // A second attempt when `open` closes the first: an earlier attempt's key that Stripe
    // answers only for that attempt's parameters (other return URLs).
    for _ in 0..2 {
        let checkout_id = record.insert(pool, request, &stripe_customer).await?;
        let metadata = HashMap::from([
            (CHECKOUT_ID_KEY.to_owned(), checkout_id.clone()),
            ("tally_customer".to_owned(), request.customer.to_owned()),
        ]);
        let mut subscription_data = CreateCheckoutSessionSubscriptionData::new();
        let mut subscription_metadata = metadata.clone();
        subscription_metadata.insert("tally_plan".to_owned(), plan.to_owned());
        subscription_data.metadata = Some(subscription_metadata);
        let line_items = prices
            .iter()
            .map(|price| {
                let mut item = CreateCheckoutSessionLineItems::new();
                item.price = Some(price.price_id.clone());
                // A metered price takes no quantity (Stripe refuses one).
                item.quantity = (price.kind == PriceKind::Licensed).then_some(1);
                item
            })
            .collect::<Vec<_>>();
        // From the checkout id's own time (UUIDv7), so that asking again under the same id sends
        // the same parameters (Stripe answers an idempotency key only for the same request).
        let opened_at = Uuid::parse_str(&checkout_id)
            .ok()
            .and_then(|id| id.get_timestamp())
            .map_or_else(|| Utc::now().timestamp(), |t| t.to_unix().0 as i64);
        let expires_at = opened_at + PLAN_SESSION_MINUTES * 60 + 60;
        let session = CreateCheckoutSession::new()
            .mode(CheckoutSessionMode::Subscription)
            .expires_at(expires_at)
            .customer(stripe_customer.as_str())
            .line_items(line_items)
            .success_url(request.success_url)
            .cancel_url(request.cancel_url)
            .client_reference_id(checkout_id.as_str())
            .metadata(metadata)
            .subscription_data(subscription_data);
        match open(pool, stripe, request.customer, checkout_id, session).await {
            Err(CheckoutError::AttemptClosed(_)) => continue,
            opened => return opened,
        }
    }
    Err(CheckoutError::CheckoutInProgress(
        request.customer.to_owned(),
    ))
}

/// Opens a Checkout Session (mode `payment`) for a credit pack.
pub async fn checkout_pack(
    pool: &PgPool,
    stripe: &StripeHttp,
    pack: &CreditPack,
    request: &CheckoutRequest<'_>,
) -> Result<OpenedSession, CheckoutError> {
    let price = catalog::prices_of(pool, None, Some(&pack.name))
        .await?
        .into_iter()
        .find(|p| p.kind == PriceKind::OneTime)
        .ok_or_else(|| CheckoutError::PackNotForSale(pack.name.clone()))?;
    // What tally.toml sells now, at the price Stripe was checked to charge: a pack changed
    // since `tally plans sync` is not sold at its old price.
    let written = catalog::minor_units(pack.price.amount, &pack.price.currency);
    if written != Some(price.unit_amount_decimal) || pack.price.currency != price.currency {
        return Err(CheckoutError::PackPriceChanged(
            pack.name.clone(),
            format!("{} {}", pack.price.amount, pack.price.currency),
            format!(
                "{} {} (smallest unit)",
                price.unit_amount_decimal, price.currency
            ),
        ));
    }
    let stripe_customer = stripe_customer(pool, request.customer).await?;
    let record = Record {
        mode: "payment",
        plan: None,
        pack: Some(pack),
        amount: price
            .unit_amount_decimal
            .round()
            .try_into()
            .unwrap_or(i64::MAX),
        currency: &price.currency,
    };
    let checkout_id = record.insert(pool, request, &stripe_customer).await?;
    let metadata = HashMap::from([
        (CHECKOUT_ID_KEY.to_owned(), checkout_id.clone()),
        ("tally_customer".to_owned(), request.customer.to_owned()),
        ("tally_pack".to_owned(), pack.name.clone()),
    ]);
    let mut item = CreateCheckoutSessionLineItems::new();
    item.price = Some(price.price_id.clone());
    item.quantity = Some(1);
    let session = CreateCheckoutSession::new()
        .mode(CheckoutSessionMode::Payment)
        .customer(stripe_customer.as_str())
        .line_items(vec![item])
        .success_url(request.success_url)
        .cancel_url(request.cancel_url)
        .client_reference_id(checkout_id.as_str())
        .metadata(metadata);
    open(pool, stripe, request.customer, checkout_id, session).await
}

/// Opens a Stripe billing portal session for the customer (cards, cancellation, invoices on
/// Stripe's side); its changes come back through the webhooks.
pub async fn billing_portal(
    pool: &PgPool,
    stripe: &StripeHttp,
    customer: &str,
    return_url: &str,
) -> Result<String, CheckoutError> {
    let stripe_customer = stripe_customer(pool, customer).await?;
    let session = CreateBillingPortalSession::new()
        .customer(stripe_customer.as_str())
        .return_url(return_url)
        .send(stripe)
        .await
        .map_err(stripe_error)?;
    Ok(session.url)
}

fn stripe_error(error: StripeCallError) -> CheckoutError {
    if error.may_have_reached_stripe() || error.is_rate_limit() {
        CheckoutError::StripeUnavailable(error)
    } else {
        CheckoutError::StripeRefused(error)
    }
}

async fn stripe_customer(pool: &PgPool, customer: &str) -> Result<String, CheckoutError> {
    sqlx::query_scalar("SELECT stripe_customer_id FROM stripe_customers WHERE customer_id = $1")
        .bind(customer)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| CheckoutError::NoStripeCustomer(customer.to_owned()))
}

/// A session about to be opened, as `checkout_sessions` records it.
struct Record<'a> {
    mode: &'static str,
    plan: Option<&'a str>,
    pack: Option<&'a CreditPack>,
    amount: i64,
    currency: &'a str,
}

impl Record<'_> {
    /// Records the session, once the customer may open it: at most [`MAX_OPEN_SESSIONS`] a
    /// day, and for a plan, no Stripe subscription already (a second would bill the same usage
    /// twice), no plan session still open, and no operator-assigned plan unless an operator
    /// asks. Checked and written under the customer's checkout lock, so two requests at once
    /// cannot both pass.
    async fn insert(
        &self,
        pool: &PgPool,
        request: &CheckoutRequest<'_>,
        stripe_customer: &str,
    ) -> Result<String, CheckoutError> {
        let customer = request.customer;
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('tally.checkout:' || $1, 0))")
            .bind(customer)
            .execute(&mut *tx)
            .await?;
        // Sessions still open (Stripe's own limit is 24 hours; plan sessions are opened for
        // PLAN_SESSION_MINUTES); a paid one no longer counts, nor, after a few minutes, one
        // whose answer never came (nobody holds its url, so nobody can pay it).
        let (open, plan_open, plan_lost): (i64, bool, Option<String>) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status = 'open' AND created_at > now() - interval '24 hours'
                                     AND (session_id IS NOT NULL
                                          OR created_at > now() - interval '5 minutes')),
                    coalesce(bool_or(mode = 'subscription' AND status = 'open'
                                     AND created_at > now() - make_interval(mins => $2)), false),
                    min(checkout_id) FILTER (WHERE mode = 'subscription' AND status = 'open'
                                             AND session_id IS NULL AND plan = $3
                                             AND created_at > now() - make_interval(mins => $2))
             FROM checkout_sessions WHERE customer_id = $1",
        )
        .bind(customer)
        .bind(PLAN_SESSION_MINUTES as i32 + 1)
        .bind(self.plan)
        .fetch_one(&mut *tx)
        .await?;
        if open >= MAX_OPEN_SESSIONS {
            return Err(CheckoutError::TooManyOpenSessions(customer.to_owned()));
        }
        if self.mode == "subscription" {
            // Stripe's answer to the last attempt was lost: ask again under the same checkout
            // id, so Stripe answers the session it may already hold (the same idempotency key).
            if let Some(checkout_id) = plan_lost {
                tx.commit().await?;
                return Ok(checkout_id);
            }
            if plan_open {
                return Err(CheckoutError::CheckoutInProgress(customer.to_owned()));
            }
            // A plan session paid whose subscription tally has not yet seen live or ended
            // (Stripe does not deliver in order): a second would bill the same usage twice.
            let paid_pending: bool = sqlx::query_scalar(
                "SELECT EXISTS (
                     SELECT 1 FROM checkout_sessions c
                     WHERE c.customer_id = $1 AND c.mode = 'subscription' AND c.status = 'complete'
                       AND NOT EXISTS (SELECT 1 FROM subscriptions s
                                       WHERE s.stripe_subscription_id = c.stripe_subscription_id
                                         AND s.status = 'canceled'))",
            )
            .bind(customer)
            .fetch_one(&mut *tx)
            .await?;
            if paid_pending {
                return Err(CheckoutError::AlreadySubscribed(customer.to_owned()));
            }
            let live: Option<(String, String, Value)> = sqlx::query_as(
                "SELECT s.source, s.plan, p.definition FROM subscriptions s
                 JOIN plans p ON p.name = s.plan
                 WHERE s.customer_id = $1 AND s.status IN ('active', 'trialing', 'past_due')
                 ORDER BY s.source = 'stripe' DESC LIMIT 1",
            )
            .bind(customer)
            .fetch_optional(&mut *tx)
            .await?;
            match live {
                Some((source, _, _)) if source == "stripe" => {
                    return Err(CheckoutError::AlreadySubscribed(customer.to_owned()))
                }
                // A customer may leave a free plan or a self-serve one for what it buys; a
                // priced plan an operator assigned (negotiated terms) only an operator replaces.
                Some((source, plan, definition))
                    if source == "tally"
                        && !request.operator
                        && !definition["self_serve"].as_bool().unwrap_or(false)
                        && !definition["price"].is_null() =>
                {
                    return Err(CheckoutError::AssignedPlan {
                        customer: customer.to_owned(),
                        plan,
                    })
                }
                _ => {}
            }
        }
        let checkout_id = Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO checkout_sessions (checkout_id, customer_id, stripe_customer_id, mode,
                    plan, pack, credits, credits_expire_after, amount, currency, requested_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7, make_interval(secs => $8), $9, $10, $11)",
        )
        .bind(&checkout_id)
        .bind(request.customer)
        .bind(stripe_customer)
        .bind(self.mode)
        .bind(self.plan)
        .bind(self.pack.map(|p| p.name.as_str()))
        .bind(self.pack.map(|p| p.credits))
        .bind(
            self.pack
                .and_then(|p| p.expires_after)
                .map(|d| d.as_secs() as f64),
        )
        .bind(self.amount)
        .bind(self.currency)
        .bind(&request.requested_by)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(checkout_id)
    }
}

/// Asks Stripe for the session (idempotently, under the checkout id) and records its id.
async fn open(
    pool: &PgPool,
    stripe: &StripeHttp,
    customer: &str,
    checkout_id: String,
    session: CreateCheckoutSession,
) -> Result<OpenedSession, CheckoutError> {
    let key = stripe_client_core::IdempotencyKey::new(format!("tally-checkout:{checkout_id}"))
        .expect("a uuid fits an idempotency key");
    let created = session
        .customize()
        .request_strategy(RequestStrategy::Idempotent(key))
        .send(stripe)
        .await;
    let created = match created {
        Ok(created) => created,
        Err(error) if error.is_key_in_use() => {
            // Another request is opening this very session (a second click while Stripe's
            // answer to the first is on its way): the record stays for the session it opens.
            return Err(CheckoutError::CheckoutInProgress(customer.to_owned()));
        }
        Err(error) if error.is_key_used_otherwise() || error.status.is_some_and(|s| s >= 500) => {
            // Stripe keeps this key's first answer (a server error, or a session for other
            // parameters) and will not give this request a session under it: the attempt is
            // closed, kept for any event that may still name it.
            sqlx::query(
                "UPDATE checkout_sessions SET status = 'expired', updated_at = now()
                 WHERE checkout_id = $1 AND session_id IS NULL AND status = 'open'",
            )
            .bind(&checkout_id)
            .execute(pool)
            .await?;
            return Err(if error.is_key_used_otherwise() {
                CheckoutError::AttemptClosed(error)
            } else {
                stripe_error(error)
            });
        }
        Err(error) => {
            if !error.may_have_reached_stripe() {
                // Stripe refused the session: it holds none, the record has nothing to wait for.
                sqlx::query("DELETE FROM checkout_sessions WHERE checkout_id = $1")
                    .bind(&checkout_id)
                    .execute(pool)
                    .await?;
            }
            return Err(stripe_error(error));
        }
    };
    let id = created.id.as_str().to_owned();
    sqlx::query(
        "UPDATE checkout_sessions SET session_id = $2, updated_at = now() WHERE checkout_id = $1",
    )
    .bind(&checkout_id)
    .bind(&id)
    .execute(pool)
    .await?;
    let url = created.url.ok_or_else(|| {
        CheckoutError::StripeRefused(StripeCallError::transport(
            "Stripe answered a session without a url",
        ))
    })?;
    Ok(OpenedSession { id, url })
}

#[derive(sqlx::FromRow)]
struct SessionRow {
    checkout_id: String,
    session_id: Option<String>,
    customer_id: String,
    stripe_customer_id: String,
    mode: String,
    pack: Option<String>,
    credits: Option<Decimal>,
    credits_expire_seconds: Option<i64>,
    amount: i64,
    currency: String,
    status: String,
    grant_id: Option<i64>,
    refunded_amount: i64,
    disputed_amount: i64,
}

const SESSION_COLUMNS: &str = "checkout_id, session_id, customer_id, stripe_customer_id, mode,
    pack, credits, extract(epoch FROM credits_expire_after)::bigint AS credits_expire_seconds,
    amount, currency, status, grant_id, refunded_amount, disputed_amount";

/// What of a pack's payment went back to the payer, in the currency's smallest unit: refunds
/// (Stripe says a charge's total refunded so far) and disputes (their amount), each the
/// largest Stripe has said, so a repeated or late event takes nothing back twice.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct TakenBack {
    refunded: i64,
    disputed: i64,
}

impl TakenBack {
    fn of(refund: &StripeRefund) -> TakenBack {
        if refund.disputed {
            TakenBack {
                refunded: 0,
                disputed: refund.amount_refunded.max(0),
            }
        } else {
            TakenBack {
                refunded: refund.amount_refunded.max(0),
                disputed: 0,
            }
        }
    }

    fn and(self, other: TakenBack) -> TakenBack {
        TakenBack {
            refunded: self.refunded.max(other.refunded),
            disputed: self.disputed.max(other.disputed),
        }
    }

    /// Whether all of `paid` went back.
    /// (A pack given away for nothing has nothing to give back.)
    fn all_of(self, paid: i64) -> bool {
        paid > 0 && self.refunded.saturating_add(self.disputed) >= paid
    }

    /// The credits of a pack of `credits` bought for `paid` that this takes back: the same
    /// share as of the money, rounded down to a millionth (the payer keeps the dust).
    fn credits(self, credits: Decimal, paid: i64) -> Decimal {
        if paid <= 0 {
            return Decimal::ZERO;
        }
        if self.all_of(paid) {
            return credits;
        }
        let back = Decimal::from(self.refunded.saturating_add(self.disputed));
        let paid = Decimal::from(paid);
        // Exact when credits × back fits a decimal; else the share first (less than one, so
        // the product cannot overflow), rounded the same way.
        let share = match credits.checked_mul(back) {
            Some(product) => product / paid,
            None => credits * (back / paid),
        };
        share.round_dp_with_strategy(6, rust_decimal::RoundingStrategy::ToZero)
    }
}

/// Applies a `checkout.session.*` event inside the webhook's transaction.
pub(crate) async fn apply_session(
    tx: &mut PgConnection,
    event: &StripeEvent,
    kind: CheckoutEvent,
    session: &StripeCheckoutSession,
) -> Result<WebhookOutcome, WebhookError> {
    // A payment's completion and its refund serialize on the payment (they may be delivered
    // at once, and neither finds the other's row before it commits); taken first, before any
    // row, in both.
    if let Some(intent) = &session.payment_intent {
        lock_payment(tx, intent).await?;
    }
    // Only a well-formed id is looked up (the metadata is Stripe's copy of what tally wrote);
    // the row with this session id wins over one found by checkout id alone.
    let checkout_id = session
        .checkout_id
        .as_deref()
        .filter(|id| Uuid::parse_str(id).is_ok());
    let row: Option<SessionRow> = sqlx::query_as(&format!(
        "SELECT {SESSION_COLUMNS} FROM checkout_sessions
         WHERE session_id = $1 OR checkout_id = $2
         ORDER BY (session_id = $1) IS TRUE DESC LIMIT 1 FOR UPDATE"
    ))
    .bind(&session.id)
    .bind(checkout_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        tracing::warn!(event = %event.id, session = %session.id, "a Checkout Session tally did not open: recorded, nothing done");
        return Ok(WebhookOutcome::NotTallys);
    };
    let mismatch = |what: String| {
        tracing::warn!(event = %event.id, session = %session.id, checkout = %row.checkout_id, "{what}: recorded, nothing granted");
        Ok(WebhookOutcome::Refused)
    };
    if row.session_id.as_deref().is_some_and(|id| id != session.id) {
        return mismatch(format!(
            "the session is not the one recorded ({:?})",
            row.session_id
        ));
    }
    if session.stripe_customer.as_deref() != Some(row.stripe_customer_id.as_str()) {
        return mismatch(format!(
            "the session's Stripe customer {:?} is not the recorded {}",
            session.stripe_customer, row.stripe_customer_id
        ));
    }
    if session.mode != row.mode {
        return mismatch(format!(
            "the session's mode {} is not the recorded {}",
            session.mode, row.mode
        ));
    }
    let customer = row.customer_id.clone();
    let next_status = match (row.mode.as_str(), kind) {
        (_, CheckoutEvent::Expired) if row.status == "open" => "expired",
        (_, CheckoutEvent::Expired) => row.status.as_str(),
        ("subscription", CheckoutEvent::Completed) if row.status == "open" => "complete",
        ("subscription", _) => row.status.as_str(),
        ("payment", CheckoutEvent::AsyncPaymentFailed)
            if row.status == "complete" || row.status == "open" =>
        {
            "payment_failed"
        }
        ("payment", CheckoutEvent::Completed | CheckoutEvent::AsyncPaymentSucceeded)
            if session.payment_status == "paid" =>
        {
            return grant_pack(tx, event, &row, session).await;
        }
        ("payment", CheckoutEvent::Completed) if row.status == "open" => "complete",
        _ => row.status.as_str(),
    };
    sqlx::query(
        "UPDATE checkout_sessions SET status = $2, session_id = $3,
                payment_intent = coalesce(payment_intent, $4),
                stripe_subscription_id = coalesce(stripe_subscription_id, $5), updated_at = now()
         WHERE checkout_id = $1",
    )
    .bind(&row.checkout_id)
    .bind(next_status)
    .bind(&session.id)
    .bind(&session.payment_intent)
    .bind(&session.subscription)
    .execute(&mut *tx)
    .await?;
    Ok(WebhookOutcome::Applied {
        customer: Some(customer),
    })
}

/// A paid pack: granted once, unless it was refunded first or the amount is not the one sold.
async fn grant_pack(
    tx: &mut PgConnection,
    event: &StripeEvent,
    row: &SessionRow,
    session: &StripeCheckoutSession,
) -> Result<WebhookOutcome, WebhookError> {
    let customer = Some(row.customer_id.clone());
    if matches!(row.status.as_str(), "granted" | "refunded") {
        // Granted by the other of the two events that say "paid", or refunded before.
        return Ok(WebhookOutcome::Applied { customer });
    }
    if session.amount_total != Some(row.amount)
        || session.currency.as_deref() != Some(row.currency.as_str())
    {
        tracing::warn!(event = %event.id, session = %session.id, paid = ?session.amount_total, currency = ?session.currency, sold = row.amount, "a pack paid at another amount than it was sold for: nothing granted");
        return Ok(WebhookOutcome::Refused);
    }
    // Refunds and disputes seen before the payment's completion.
    let before: Option<(i64, i64)> = match &session.payment_intent {
        Some(intent) => sqlx::query_as(
            "SELECT amount_refunded, disputed_amount FROM stripe_refunds WHERE payment_intent = $1",
        )
        .bind(intent)
        .fetch_optional(&mut *tx)
        .await?,
        None => None,
    };
    let taken = row.taken_back().and(
        before
            .map(|(refunded, disputed)| TakenBack { refunded, disputed })
            .unwrap_or_default(),
    );
    let (status, grant_id) = if taken.all_of(row.amount) {
        ("refunded", None)
    } else {
        let (Some(pack), Some(credits)) = (&row.pack, row.credits) else {
            return Ok(WebhookOutcome::Refused);
        };
        let expires_at = row
            .credits_expire_seconds
            .and_then(chrono::TimeDelta::try_seconds)
            .and_then(|d| Utc::now().checked_add_signed(d));
        let payment = session.payment_intent.as_deref().unwrap_or("none");
        let actor = Actor::new(
            &format!("stripe:{}", event.id),
            &format!(
                "credit pack {pack} bought through Checkout session {} (payment {payment})",
                session.id
            ),
        )
        .map_err(credit_error)?;
        let description = format!("Credit pack {pack}");
        let granted = tally_credits::grant_purchase(
            tx,
            &row.customer_id,
            &session.id,
            credits,
            expires_at,
            &description,
            &actor,
        )
        .await
        .map_err(credit_error)?;
        let grant_id = granted.grant.grant_id;
        // Partly refunded before tally saw it paid: its share goes back at once.
        let back = taken.credits(credits, row.amount);
        if back > Decimal::ZERO {
            let actor = take_back_actor(event, row, session.payment_intent.as_deref(), taken)?;
            tally_credits::take_back_in(tx, &row.customer_id, grant_id, Some(back), &actor)
                .await
                .map_err(credit_error)?;
        }
        ("granted", Some(grant_id))
    };
    sqlx::query(
        "UPDATE checkout_sessions SET status = $2, grant_id = $3, session_id = $4,
                payment_intent = coalesce(payment_intent, $5), refunded_amount = $6,
                disputed_amount = $7, updated_at = now()
         WHERE checkout_id = $1",
    )
    .bind(&row.checkout_id)
    .bind(status)
    .bind(grant_id)
    .bind(&session.id)
    .bind(&session.payment_intent)
    .bind(taken.refunded)
    .bind(taken.disputed)
    .execute(&mut *tx)
    .await?;
    Ok(WebhookOutcome::Applied { customer })
}

impl SessionRow {
    fn taken_back(&self) -> TakenBack {
        TakenBack {
            refunded: self.refunded_amount,
            disputed: self.disputed_amount,
        }
    }
}

/// Who takes a pack's credits back, and why: the event, the money that went back, the session.
fn take_back_actor(
    event: &StripeEvent,
    row: &SessionRow,
    payment: Option<&str>,
    taken: TakenBack,
) -> Result<Actor, WebhookError> {
    Actor::new(
        &format!("stripe:{}", event.id),
        &format!(
            "{} in Stripe: payment {} ({} refunded, {} disputed, of {} {}), Checkout session {}",
            if taken.disputed > 0 {
                "disputed"
            } else {
                "refunded"
            },
            payment.unwrap_or("unknown"),
            taken.refunded,
            taken.disputed,
            row.amount,
            row.currency,
            row.session_id.as_deref().unwrap_or("unknown")
        ),
    )
    .map_err(credit_error)
}

/// A refund or a dispute takes back the share of the pack its payment bought that went back
/// (what is left of it at most; all that is left when all the money went back); one of a
/// payment tally has not seen completed yet is kept for the completion to apply.
pub(crate) async fn apply_refund(
    tx: &mut PgConnection,
    event: &StripeEvent,
    refund: &StripeRefund,
) -> Result<WebhookOutcome, WebhookError> {
    let Some(intent) = &refund.payment_intent else {
        return Ok(WebhookOutcome::Ignored);
    };
    lock_payment(tx, intent).await?;
    let row: Option<SessionRow> = sqlx::query_as(&format!(
        "SELECT {SESSION_COLUMNS} FROM checkout_sessions WHERE payment_intent = $1 FOR UPDATE"
    ))
    .bind(intent)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        let taken = TakenBack::of(refund);
        sqlx::query(
            "INSERT INTO stripe_refunds (payment_intent, charge_id, amount_refunded, disputed_amount,
                    event_id)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (payment_intent) DO UPDATE SET
                 amount_refunded = greatest(stripe_refunds.amount_refunded, EXCLUDED.amount_refunded),
                 disputed_amount = greatest(stripe_refunds.disputed_amount, EXCLUDED.disputed_amount)",
        )
        .bind(intent)
        .bind(&refund.charge)
        .bind(taken.refunded)
        .bind(taken.disputed)
        .bind(&event.id)
        .execute(&mut *tx)
        .await?;
        return Ok(WebhookOutcome::NotTallys);
    };
    let before = row.taken_back();
    let taken = before.and(TakenBack::of(refund));
    if let (Some(grant_id), Some(credits)) = (
        row.grant_id.filter(|_| row.status == "granted"),
        row.credits,
    ) {
        let back = taken.credits(credits, row.amount) - before.credits(credits, row.amount);
        if back > Decimal::ZERO || taken.all_of(row.amount) {
            let actor = take_back_actor(event, &row, Some(intent), taken)?;
            // All the money back: all that is left, dust included.
            let part = (!taken.all_of(row.amount)).then_some(back);
            match tally_credits::take_back_in(tx, &row.customer_id, grant_id, part, &actor).await {
                // Expired or voided already: nothing is left to take back.
                Ok(_) | Err(CreditError::Closed { .. }) => {}
                Err(error) => return Err(credit_error(error)),
            }
        }
    }
    // A session not yet granted (a delayed payment) keeps what went back for its completion.
    let status = if taken.all_of(row.amount) {
        "refunded"
    } else {
        row.status.as_str()
    };
    sqlx::query(
        "UPDATE checkout_sessions SET status = $2, refunded_amount = $3, disputed_amount = $4,
                updated_at = now()
         WHERE checkout_id = $1",
    )
    .bind(&row.checkout_id)
    .bind(status)
    .bind(taken.refunded)
    .bind(taken.disputed)
    .execute(&mut *tx)
    .await?;
    Ok(WebhookOutcome::Applied {
        customer: Some(row.customer_id),
    })
}

/// Serializes what one payment's events do (its completion, its refunds and disputes).
async fn lock_payment(tx: &mut PgConnection, payment_intent: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('tally.payment:' || $1, 0))")
        .bind(payment_intent)
        .execute(&mut *tx)
        .await?;
    Ok(())
}

fn credit_error(error: CreditError) -> WebhookError {
    match error {
        CreditError::Store(e) => WebhookError::Store(e.into()),
        other => WebhookError::Credits(other.to_string()),
    }
}

/// A session as the API lists it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct CheckoutRecord {
    pub session_id: Option<String>,
    pub customer_id: String,
    pub mode: String,
    pub plan: Option<String>,
    pub pack: Option<String>,
    pub status: String,
    pub amount: i64,
    pub currency: String,
    pub grant_id: Option<i64>,
    pub created_at: DateTime<Utc>,
}

/// Whether the Stripe subscription came from a tally Checkout Session of this customer's for
/// a plan (its metadata names the session's checkout id): it then replaces a tally-managed
/// subscription the customer has.
pub(crate) async fn from_checkout(
    tx: &mut PgConnection,
    customer: &str,
    checkout_id: Option<&str>,
) -> Result<bool, sqlx::Error> {
    let Some(id) = checkout_id.filter(|id| Uuid::parse_str(id).is_ok()) else {
        return Ok(false);
    };
    let found: Option<i32> = sqlx::query_scalar(
        "SELECT 1 FROM checkout_sessions
         WHERE checkout_id = $1 AND customer_id = $2 AND mode = 'subscription'",
    )
    .bind(id)
    .bind(customer)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(found.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_urls_are_https_or_loopback_and_on_allowed_origins() {
        for ok in [
            "https://app.example.com/billing?done=1",
            "http://localhost:3000/ok",
            "http://127.0.0.1/ok",
            "http://[::1]:8080/ok",
        ] {
            check_return_url("success_url", ok, &[], false).unwrap();
        }
        for bad in [
            "http://app.example.com/ok",
            "javascript:alert(1)",
            "https://user:pw@app.example.com/",
            "/relative",
            "ftp://example.com/",
        ] {
            let error = check_return_url("success_url", bad, &[], false).unwrap_err();
            assert_eq!(error.code(), "INVALID_RETURN_URL", "{bad}");
        }
        let allowed = vec!["https://app.example.com".to_owned()];
        check_return_url("cancel_url", "https://app.example.com/x", &allowed, true).unwrap();
        check_return_url("cancel_url", "https://APP.example.com/x", &allowed, true).unwrap();
        assert!(
            check_return_url("cancel_url", "https://evil.example.net/x", &allowed, true).is_err()
        );
        let long = format!("https://a.com/{}", "x".repeat(3000));
        assert!(check_return_url("cancel_url", &long, &[], false).is_err());
        // Never the customer's own machine with a live key.
        assert!(check_return_url("success_url", "http://localhost:3000/ok", &[], true).is_err());
        assert!(check_return_url("success_url", "https://127.0.0.1/ok", &[], true).is_err());
        assert!(
            check_return_url("success_url", "https://[::ffff:127.0.0.1]/ok", &[], true).is_err()
        );
        assert!(check_return_url("success_url", "https://localhost./ok", &[], true).is_err());
    }

    fn taken(refunded: i64, disputed: i64) -> TakenBack {
        TakenBack { refunded, disputed }
    }

    #[test]
    fn a_refund_takes_back_its_share_once_and_never_more() {
        let credits = Decimal::from(1000);
        // 250 of 1,000 cents: a quarter.
        assert_eq!(taken(250, 0).credits(credits, 1000), Decimal::from(250));
        // Three refunds of a third: each takes what its own share adds; together all of it
        // only when all the money went back.
        let thirds = [333, 666, 1000].map(|r| taken(r, 0).credits(credits, 1000));
        assert_eq!(thirds, [Decimal::from(333), Decimal::from(666), credits]);
        let one_third = taken(1, 0).credits(Decimal::from(1), 3);
        assert_eq!(one_third, "0.333333".parse::<Decimal>().unwrap());
        // A later event that says less (out of order) takes nothing back.
        let before = taken(600, 0);
        let after = before.and(taken(300, 0));
        assert_eq!(after, before);
        // A refund and a dispute add up, at most to the whole pack.
        assert_eq!(taken(300, 200).credits(credits, 1000), Decimal::from(500));
        assert_eq!(taken(700, 700).credits(credits, 1000), credits);
        assert!(taken(700, 700).all_of(1000));
    }

    #[test]
    fn a_free_pack_has_nothing_to_give_back_and_huge_values_do_not_overflow() {
        assert!(!taken(0, 0).all_of(0));
        assert_eq!(taken(5, 0).credits(Decimal::from(10), 0), Decimal::ZERO);
        let huge = Decimal::from(10i64.pow(18));
        let back = taken(i64::MAX / 2, 0).credits(huge, i64::MAX);
        assert!(back > Decimal::ZERO && back < huge, "{back}");
    }
}
