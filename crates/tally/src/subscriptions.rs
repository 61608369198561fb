//! `tally subscriptions`: the subscriptions tally manages itself, from a terminal. The same
//! operations as the admin API (`/v1/subscriptions…`), through the same `tally_quota`
//! functions, against Postgres directly: each change is one transaction audited with
//! `--actor` and `--reason`. Text (one line per subscription) by default, `--json` for scripts
//! (the objects the admin API answers with).

use chrono::{DateTime, TimeDelta, Utc};
use tally_billing::subscriptions::{
    self as lifecycle, Actor, CustomerPage, CustomerRow, Interval, NewSubscription, Source, Status,
    SubscriptionError, SubscriptionHistory, SubscriptionRecord, Term, When, MAX_PAGE,
};

use crate::cli::{parse_time, print_json, time, AuditArgs};
use crate::config::TallyConfig;
use crate::process::{connect, runtime};

#[derive(Debug, clap::Args)]
pub(crate) struct SubscriptionsArgs {
    /// Print JSON (the objects the admin API answers with) instead of text
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: SubscriptionsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum SubscriptionsCommand {
    /// Start a subscription for a customer (a fallback subscription is replaced; any other
    /// active or trialing one is refused: one per customer)
    ///
    /// Monthly from --start (now by default) unless --period year or --until gives a fixed
    /// term that ends the subscription. With --trial-end or --trial-days it is trialing until
    /// then and its paid periods start at the trial's end; a trial on a plan with
    /// `requires_payment_method` converts only if --payment-method (or a later
    /// `payment-method --on-record true`) says one is on record.
    Create {
        /// The customer id events carry
        customer: String,
        /// A plan in Postgres (`tally plans apply`)
        plan: String,
        /// When it started (RFC 3339, e.g. 2027-01-31T00:00:00Z); may be in the past, periods
        /// are counted from it [default: now]
        #[arg(long, value_parser = parse_time, value_name = "RFC3339")]
        start: Option<DateTime<Utc>>,
        /// Trialing until then (RFC 3339, in the future)
        #[arg(long, value_parser = parse_time, value_name = "RFC3339", conflicts_with = "trial_days")]
        trial_end: Option<DateTime<Utc>>,
        /// Trialing for this many days from the start
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=3660), value_name = "N")]
        trial_days: Option<u32>,
        /// How long each period is; the subscription renews at each period's end
        #[arg(long, value_enum, default_value = "month", conflicts_with = "until")]
        period: Period,
        /// One fixed term ending then (RFC 3339); the subscription ends with it (no trial)
        #[arg(long, value_parser = parse_time, value_name = "RFC3339", conflicts_with_all = ["trial_end", "trial_days"])]
        until: Option<DateTime<Utc>>,
        /// A payment method is on record (tally takes no payments: you say so)
        #[arg(long)]
        payment_method: bool,
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// List customers with a subscription (a page), or one customer's subscriptions with
    /// their history (--customer)
    ///
    /// Without --customer: one line per customer, their active or trialing subscription, else
    /// their latest, in customer id order; --plan and --status filter on that subscription.
    /// When the page is full the last line is `next: CURSOR`: pass it as --after for the next
    /// page.
    List {
        /// Every subscription of this customer, newest first, each with every plan and status
        /// it had and when
        #[arg(long, conflicts_with_all = ["plan", "status", "after", "limit"])]
        customer: Option<String>,
        /// Only customers on this plan
        #[arg(long)]
        plan: Option<String>,
        /// Only customers whose subscription has this status: trialing, active, past_due or
        /// canceled
        #[arg(long, value_parser = parse_status)]
        status: Option<Status>,
        /// The cursor `next` of the previous page
        #[arg(long, value_name = "CURSOR")]
        after: Option<String>,
        /// Customers on one page
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=MAX_PAGE))]
        limit: i64,
    },
    /// Show one subscription
    Get {
        /// The subscription id
        id: i64,
    },
    /// Move a subscription to another plan, now or at the end of its period
    ///
    /// Now: the new plan's entitlements hold from now on. At period end: the change is
    /// scheduled (shown as `→ PLAN at period end`) and `tally serve` applies it when the period
    /// ends; changing to the current plan at period end withdraws a scheduled change. A fixed
    /// term has no next period: change it now.
    Change {
        /// The subscription id
        id: i64,
        /// A plan in Postgres (`tally plans apply`)
        plan: String,
        /// When it takes effect
        #[arg(long, value_enum, default_value = "now")]
        at: At,
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// Cancel a subscription at the end of its period (the default) or now
    ///
    /// At period end: it stays active until then (`reactivate` withdraws the cancellation), and
    /// `tally serve` ends it when the period ends. Now: it ends at once; with
    /// `[subscriptions] fallback_plan` set, the customer is put on that plan in the same
    /// transaction (monthly, from now); without it, the customer has no subscription and quota
    /// checks refuse them (NO_ACTIVE_SUBSCRIPTION).
    Cancel {
        /// The subscription id
        id: i64,
        /// When it ends
        #[arg(long, value_enum, default_value = "period-end")]
        at: At,
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// Withdraw a cancellation scheduled for the end of the period
    Reactivate {
        /// The subscription id
        id: i64,
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// Record whether a payment method is on record (a trial on a plan with
    /// `requires_payment_method` converts only with one; tally takes no payments)
    PaymentMethod {
        /// The subscription id
        id: i64,
        /// true or false
        #[arg(long, required = true, action = clap::ArgAction::Set, value_name = "true|false")]
        on_record: bool,
        #[command(flatten)]
        audit: AuditArgs,
    },
}

/// The actor of a change, from `--actor` and `--reason`.
fn actor(audit: &AuditArgs) -> anyhow::Result<Actor> {
    Actor::new(audit.actor_name()?, &audit.reason).map_err(refused)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Period {
    Month,
    Year,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum At {
    Now,
    PeriodEnd,
}

impl From<At> for When {
    fn from(at: At) -> When {
        match at {
            At::Now => When::Now,
            At::PeriodEnd => When::PeriodEnd,
        }
    }
}

fn parse_status(text: &str) -> Result<Status, String> {
    text.parse()
}

/// A refused operation as the CLI reports it: the stable code, then the cause and the fix.
fn refused(error: SubscriptionError) -> anyhow::Error {
    anyhow::anyhow!("{}: {error}", error.code())
}

impl SubscriptionsCommand {
    /// The actor and reason of a command that changes something.
    fn audit(&self) -> Option<&AuditArgs> {
        match self {
            SubscriptionsCommand::Create { audit, .. }
            | SubscriptionsCommand::Change { audit, .. }
            | SubscriptionsCommand::Cancel { audit, .. }
            | SubscriptionsCommand::Reactivate { audit, .. }
            | SubscriptionsCommand::PaymentMethod { audit, .. } => Some(audit),
            SubscriptionsCommand::List { .. } | SubscriptionsCommand::Get { .. } => None,
        }
    }
}

pub(crate) fn run(config: &TallyConfig, args: &SubscriptionsArgs) -> anyhow::Result<()> {
    // Checked before anything connects: a missing reason needs no database.
    if let Some(audit) = args.command.audit() {
        actor(audit)?;
    }
    runtime()?.block_on(async {
        let pool = connect(config, 2).await?;
        tally_db::check_schema(&pool).await?;
        let out = Output { json: args.json };
        match &args.command {
            SubscriptionsCommand::Create {
                customer,
                plan,
                start,
                trial_end,
                trial_days,
                period,
                until,
                payment_method,
                audit,
            } => {
                let trial_end = match trial_days {
                    Some(days) => {
                        let from = start.unwrap_or_else(Utc::now);
                        Some(from + TimeDelta::days((*days).into()))
                    }
                    None => *trial_end,
                };
                let term = match (until, period) {
                    (Some(end), _) => Term::Until(*end),
                    (None, Period::Month) => Term::Month,
                    (None, Period::Year) => Term::Year,
                };
                let new = NewSubscription {
                    customer: customer.clone(),
                    plan: plan.clone(),
                    start: *start,
                    trial_end,
                    term,
                    payment_method: *payment_method,
                };
                let created = lifecycle::create(&pool, &new, &actor(audit)?)
                    .await
                    .map_err(refused)?;
                out.subscription("created", &created)
            }
            SubscriptionsCommand::List {
                customer: Some(customer),
                ..
            } => {
                let listed = lifecycle::customer_subscriptions(&pool, customer)
                    .await
                    .map_err(refused)?;
                out.history(customer, &listed)
            }
            SubscriptionsCommand::List {
                customer: None,
                plan,
                status,
                after,
                limit,
            } => {
                let page = lifecycle::list_customers(
                    &pool,
                    plan.as_deref(),
                    *status,
                    after.as_deref(),
                    *limit,
                )
                .await
                .map_err(refused)?;
                out.page(&page)
            }
            SubscriptionsCommand::Get { id } => {
                let subscription = lifecycle::get(&pool, *id).await.map_err(refused)?;
                out.subscription("", &subscription)
            }
            SubscriptionsCommand::Change {
                id,
                plan,
                at,
                audit,
            } => {
                let actor = actor(audit)?;
                let before = lifecycle::get(&pool, *id).await.map_err(refused)?;
                let after = lifecycle::change_plan(&pool, *id, plan, (*at).into(), &actor)
                    .await
                    .map_err(refused)?;
                let verb = match at {
                    At::Now => "changed",
                    At::PeriodEnd if after.pending_plan.is_some() => "scheduled",
                    At::PeriodEnd => "withdrawn",
                };
                out.subscription(unless_unchanged(verb, &before, &after), &after)
            }
            SubscriptionsCommand::Cancel { id, at, audit } => {
                let actor = actor(audit)?;
                let before = lifecycle::get(&pool, *id).await.map_err(refused)?;
                let fallback = config.subscriptions.fallback_plan.as_deref();
                let after = lifecycle::cancel(&pool, *id, (*at).into(), fallback, &actor)
                    .await
                    .map_err(refused)?;
                let verb = match at {
                    At::Now => "canceled",
                    At::PeriodEnd => "scheduled",
                };
                out.subscription(unless_unchanged(verb, &before, &after), &after)?;
                if *at == At::Now && !out.json {
                    // The fallback, if any, was created in the cancellation's transaction.
                    let live = lifecycle::live_subscription(&pool, &after.customer)
                        .await
                        .map_err(refused)?;
                    match live {
                        Some(live) => println!("{}", line("fallback", &live)),
                        None => println!(
                            "{} has no subscription now: quota checks refuse them (NO_ACTIVE_SUBSCRIPTION){}",
                            after.customer,
                            if fallback.is_none() {
                                "; [subscriptions] fallback_plan is not set"
                            } else {
                                ""
                            }
                        ),
                    }
                }
                Ok(())
            }
            SubscriptionsCommand::Reactivate { id, audit } => {
                let reactivated = lifecycle::reactivate(&pool, *id, &actor(audit)?)
                    .await
                    .map_err(refused)?;
                out.subscription("reactivated", &reactivated)
            }
            SubscriptionsCommand::PaymentMethod {
                id,
                on_record,
                audit,
            } => {
                let actor = actor(audit)?;
                let before = lifecycle::get(&pool, *id).await.map_err(refused)?;
                let after = lifecycle::set_payment_method(&pool, *id, *on_record, &actor)
                    .await
                    .map_err(refused)?;
                out.subscription(unless_unchanged("updated", &before, &after), &after)
            }
        }
    })
}

/// `verb`, or `unchanged` when the operation asked for what already held (nothing was written
/// and nothing audited).
fn unless_unchanged<'a>(
    verb: &'a str,
    before: &SubscriptionRecord,
    after: &SubscriptionRecord,
) -> &'a str {
    if before == after {
        "unchanged"
    } else {
        verb
    }
}

/// Text or JSON on stdout.
struct Output {
    json: bool,
}

impl Output {
    fn print(&self, value: &impl serde::Serialize) -> anyhow::Result<()> {
        print_json(value)
    }

    /// One subscription, after `verb` (empty for `get`).
    fn subscription(&self, verb: &str, subscription: &SubscriptionRecord) -> anyhow::Result<()> {
        if self.json {
            return self.print(subscription);
        }
        println!("{}", line(verb, subscription));
        Ok(())
    }

    fn history(&self, customer: &str, listed: &[SubscriptionHistory]) -> anyhow::Result<()> {
        if self.json {
            return self.print(&serde_json::json!({
                "customer": customer,
                "subscriptions": listed,
            }));
        }
        if listed.is_empty() {
            println!("{customer} has no subscriptions");
        }
        for entry in listed {
            println!("{}", line("", &entry.subscription));
            for span in &entry.history {
                let to = span.to.map_or_else(|| "now".to_owned(), time);
                println!(
                    "        {} → {to:<20}  {} {}",
                    time(span.from),
                    span.plan,
                    span.status.as_str()
                );
            }
        }
        Ok(())
    }

    fn page(&self, page: &CustomerPage) -> anyhow::Result<()> {
        if self.json {
            return self.print(page);
        }
        if page.customers.is_empty() {
            println!("no customers with a subscription match");
        }
        for row in &page.customers {
            println!("{}", customer_line(row));
        }
        if let Some(next) = &page.next {
            println!("next: {next}");
        }
        Ok(())
    }
}

/// One subscription on one line: id, customer, plan, status, its period, then what is pending.
fn line(verb: &str, s: &SubscriptionRecord) -> String {
    let verb = if verb.is_empty() {
        String::new()
    } else {
        format!("{verb:<11} ")
    };
    let span = |from, to| format!("{} → {}", time(from), time(to));
    let period = match (s.status, s.billing_interval) {
        (status, _) if !status.is_live() => {
            format!("ended {}", s.ended_at.map_or_else(|| "-".to_owned(), time))
        }
        (_, Interval::Fixed) => format!(
            "term {}",
            span(s.current_period_start, s.current_period_end)
        ),
        (Status::Trialing, interval) => format!(
            "trial {}, then {}ly",
            span(s.current_period_start, s.current_period_end),
            interval.as_str()
        ),
        (_, interval) => format!(
            "{} {}",
            interval.as_str(),
            span(s.current_period_start, s.current_period_end)
        ),
    };
    let mut notes = Vec::new();
    if let Some(pending) = &s.pending_plan {
        notes.push(format!("→ {pending} at period end"));
    }
    if s.cancel_at_period_end {
        notes.push("cancels at period end".to_owned());
    }
    if s.payment_method {
        notes.push("payment method on record".to_owned());
    }
    match s.source {
        Source::Tally => {}
        Source::Fallback => notes.push("fallback plan".to_owned()),
        Source::Stripe => notes.push("managed by Stripe".to_owned()),
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!("  ({})", notes.join("; "))
    };
    format!(
        "{verb}{:>6}  {:<20} {:<12} {:<9} {period}{notes}",
        s.id,
        s.customer,
        s.plan,
        s.status.as_str()
    )
}

/// One customer of a page: their live (else latest) subscription.
fn customer_line(row: &CustomerRow) -> String {
    let mut notes = Vec::new();
    if row.cancel_at_period_end {
        notes.push("cancels at period end");
    }
    match row.source {
        Source::Tally => {}
        Source::Fallback => notes.push("fallback plan"),
        Source::Stripe => notes.push("managed by Stripe"),
    }
    let notes = if notes.is_empty() {
        String::new()
    } else {
        format!("  ({})", notes.join("; "))
    };
    let end = if row.status.is_live() {
        "period ends"
    } else {
        "last period ended"
    };
    format!(
        "{:<20} {:>6}  {:<12} {:<9} {end} {}{notes}",
        row.customer,
        row.subscription_id,
        row.plan,
        row.status.as_str(),
        time(row.current_period_end)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn record() -> SubscriptionRecord {
        let at = |d| Utc.with_ymd_and_hms(2027, 1, d, 0, 0, 0).unwrap();
        SubscriptionRecord {
            id: 4,
            customer: "acme".into(),
            plan: "PRO".into(),
            status: Status::Active,
            source: Source::Tally,
            billing_interval: Interval::Month,
            billing_anchor: at(1),
            started_at: at(1),
            trial_end: None,
            current_period_start: at(1),
            current_period_end: at(31),
            cancel_at_period_end: false,
            pending_plan: None,
            payment_method: false,
            ended_at: None,
            status_since: at(1),
            stripe_subscription_id: None,
            stripe_status: None,
            created_at: at(1),
            updated_at: at(1),
        }
    }

    #[test]
    fn a_line_shows_the_period_and_what_is_pending() {
        let mut s = record();
        assert_eq!(
            line("", &s),
            "     4  acme                 PRO          active    month 2027-01-01T00:00:00Z → 2027-01-31T00:00:00Z"
        );
        s.pending_plan = Some("ENTERPRISE".into());
        s.cancel_at_period_end = true;
        s.source = Source::Fallback;
        assert!(line("scheduled", &s).starts_with("scheduled        4  acme"));
        assert!(line("", &s)
            .ends_with("(→ ENTERPRISE at period end; cancels at period end; fallback plan)"));
        s.status = Status::Trialing;
        s.pending_plan = None;
        s.cancel_at_period_end = false;
        s.source = Source::Tally;
        assert!(line("", &s).ends_with(
            "trialing  trial 2027-01-01T00:00:00Z → 2027-01-31T00:00:00Z, then monthly"
        ));
        s.status = Status::Canceled;
        s.ended_at = Some(s.current_period_end);
        assert!(line("", &s).contains("canceled  ended 2027-01-31T00:00:00Z"));
    }

    #[test]
    fn times_are_rfc3339_and_statuses_named() {
        assert_eq!(
            parse_time("2027-01-31T01:00:00+01:00").unwrap(),
            Utc.with_ymd_and_hms(2027, 1, 31, 0, 0, 0).unwrap()
        );
        let error = parse_time("2027-01-31").unwrap_err();
        assert!(error.contains("RFC 3339"), "{error}");
        assert_eq!(parse_status("past_due"), Ok(Status::PastDue));
        assert!(parse_status("live")
            .unwrap_err()
            .contains("trialing, active"));
    }

    #[test]
    fn refusals_carry_their_code_and_the_fix() {
        let error = refused(SubscriptionError::Ended {
            id: 4,
            status: "canceled",
        });
        assert_eq!(
            error.to_string(),
            "SUBSCRIPTION_ENDED: subscription 4 has ended (canceled); create a new subscription instead"
        );
    }
}
