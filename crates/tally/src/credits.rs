//! `tally credits`: prepaid credits from a terminal. The same operations as the admin API
//! (`/v1/customers/{id}/credits…`), through the same `tally_credits` functions, against
//! Postgres directly: a grant or a void is one transaction with its ledger entry, written with
//! `--actor` and `--reason`. Text by default, `--json` for scripts (the objects the admin API
//! answers with).

use anyhow::bail;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use tally_credits::ledger::MAX_LEDGER_PAGE;
use tally_credits::{
    Actor, Balance, CreditError, Grant, GrantKind, LedgerEntry, NewGrant, RateCard,
};

use crate::cli::{parse_time, print_json, time, AuditArgs};
use crate::config::TallyConfig;
use crate::process::{connect, runtime};

#[derive(Debug, clap::Args)]
pub(crate) struct CreditsArgs {
    /// Print JSON (the objects the admin API answers with) instead of text
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CreditsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CreditsCommand {
    /// Grant credits to a customer, once per idempotency key
    ///
    /// The same --idempotency-key for the same customer is the same grant: sending a top-up
    /// twice grants once (the second run prints the first grant, `exists`); the same key with
    /// a different amount, kind, priority or dates is refused (IDEMPOTENCY_CONFLICT). Usage
    /// draws from grants by priority (default by kind: purchased 10, subscription 20,
    /// promotional 30), then the one expiring first.
    Grant {
        /// The customer id events carry
        #[arg(long)]
        customer: String,
        /// Credits to grant: more than 0, at most 10^18, at most 9 decimal places
        #[arg(long, value_parser = parse_amount)]
        amount: Decimal,
        /// purchased (never expires unless --expires-at), subscription or promotional (both
        /// need --expires-at)
        #[arg(long, value_enum)]
        kind: Kind,
        /// Lower draws first (0 to 1000) [default: by kind]
        #[arg(long, value_name = "N")]
        priority: Option<i32>,
        /// From when usage draws from it (RFC 3339) [default: now]
        #[arg(long, value_parser = parse_time, value_name = "RFC3339")]
        effective_at: Option<DateTime<Utc>>,
        /// When what is left of it expires (RFC 3339)
        #[arg(long, value_parser = parse_time, value_name = "RFC3339")]
        expires_at: Option<DateTime<Utc>>,
        /// Names this grant for the customer: e.g. the order or invoice it pays for
        #[arg(long, value_name = "KEY")]
        idempotency_key: String,
        /// Shown with the grant
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// Void what is left of a grant (a refund, a mistake); what was consumed stays consumed
    Void {
        /// The customer id events carry
        #[arg(long)]
        customer: String,
        /// The grant id (`tally credits balance` lists the open ones)
        #[arg(long, value_name = "ID")]
        grant: i64,
        #[command(flatten)]
        audit: AuditArgs,
    },
    /// A customer's balance and open grants, in the order usage draws from them
    ///
    /// available: what open grants in effect now hold; pending: committed usage the burner
    /// (in `tally aggregate`) has not drawn yet, priced at the rate card as the daemons last
    /// recorded it; projected: available - pending, what quota checks count on; uncovered:
    /// usage no grant covered since the first grant.
    Balance {
        /// The customer id events carry
        #[arg(long)]
        customer: String,
    },
    /// Every movement of a customer's credits (grant, consume, expire, void), oldest first
    ///
    /// When the page is full the last line is `next: --after N`: pass it for the next page.
    Ledger {
        /// The customer id events carry
        #[arg(long)]
        customer: String,
        /// Entries after this one (the previous page's `next`)
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(0..))]
        after: Option<i64>,
        /// Entries on one page
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(1..=MAX_LEDGER_PAGE))]
        limit: i64,
    },
}

/// The actor of a change, from `--actor` and `--reason`.
fn actor(audit: &AuditArgs) -> anyhow::Result<Actor> {
    Actor::new(audit.actor_name()?, &audit.reason).map_err(refused)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Kind {
    Purchased,
    Subscription,
    Promotional,
}

impl From<Kind> for GrantKind {
    fn from(kind: Kind) -> GrantKind {
        match kind {
            Kind::Purchased => GrantKind::Purchased,
            Kind::Subscription => GrantKind::Subscription,
            Kind::Promotional => GrantKind::Promotional,
        }
    }
}

/// Exactly as written: more digits than a decimal holds is refused, not rounded.
fn parse_amount(text: &str) -> Result<Decimal, String> {
    Decimal::from_str_exact(text.trim()).map_err(|_| {
        format!("{text:?} is not a decimal of at most 28 digits; write e.g. 100 or 12.5")
    })
}

/// A refused operation as the CLI reports it: the stable code, then the cause and the fix.
fn refused(error: CreditError) -> anyhow::Error {
    anyhow::anyhow!("{}: {error}", error.code())
}

impl CreditsCommand {
    /// The actor and reason of a command that changes something.
    fn audit(&self) -> Option<&AuditArgs> {
        match self {
            CreditsCommand::Grant { audit, .. } | CreditsCommand::Void { audit, .. } => Some(audit),
            CreditsCommand::Balance { .. } | CreditsCommand::Ledger { .. } => None,
        }
    }

    fn customer(&self) -> &str {
        match self {
            CreditsCommand::Grant { customer, .. }
            | CreditsCommand::Void { customer, .. }
            | CreditsCommand::Balance { customer }
            | CreditsCommand::Ledger { customer, .. } => customer,
        }
    }
}

pub(crate) fn run(config: &TallyConfig, args: &CreditsArgs) -> anyhow::Result<()> {
    // Checked before anything connects: a missing reason or a malformed id needs no database.
    if let Some(audit) = args.command.audit() {
        actor(audit)?;
    }
    let customer = args.command.customer();
    if let Err(rejection) = tally_core::event::validate_customer(customer) {
        bail!(
            "--customer {customer:?}: {}; no event could carry it, so it has no credits",
            rejection.detail
        );
    }
    runtime()?.block_on(async {
        let pool = connect(config, 2).await?;
        tally_db::check_schema(&pool).await?;
        let out = Output { json: args.json };
        match &args.command {
            CreditsCommand::Grant {
                customer,
                amount,
                kind,
                priority,
                effective_at,
                expires_at,
                idempotency_key,
                description,
                audit,
            } => {
                let new = NewGrant {
                    customer: customer.clone(),
                    kind: (*kind).into(),
                    amount: *amount,
                    priority: *priority,
                    effective_at: *effective_at,
                    expires_at: *expires_at,
                    idempotency_key: idempotency_key.clone(),
                    description: description.clone(),
                };
                let granted = tally_credits::grant(&pool, &new, &actor(audit)?)
                    .await
                    .map_err(refused)?;
                // `exists`: the key was used before for this grant; nothing new was granted.
                let verb = if granted.created { "granted" } else { "exists" };
                out.grant(verb, &granted.grant)
            }
            CreditsCommand::Void {
                customer,
                grant,
                audit,
            } => {
                let voided = tally_credits::void(&pool, customer, *grant, &actor(audit)?)
                    .await
                    .map_err(refused)?;
                out.grant("voided", &voided)
            }
            CreditsCommand::Balance { customer } => {
                let rates = RateCard::load(&pool)
                    .await
                    .map_err(|e| refused(CreditError::Store(e)))?;
                let balance = tally_credits::balance(&pool, customer, &rates, Utc::now())
                    .await
                    .map_err(refused)?;
                out.balance(&balance)
            }
            CreditsCommand::Ledger {
                customer,
                after,
                limit,
            } => {
                let entries = tally_credits::ledger(
                    &pool,
                    customer,
                    tally_credits::LedgerPage::After(after.unwrap_or(0)),
                    *limit,
                )
                .await
                .map_err(refused)?;
                out.ledger(customer, &entries, *after, *limit)
            }
        }
    })
}

/// Text or JSON on stdout.
struct Output {
    json: bool,
}

impl Output {
    fn print(&self, value: &impl serde::Serialize) -> anyhow::Result<()> {
        print_json(value)
    }

    fn grant(&self, verb: &str, grant: &Grant) -> anyhow::Result<()> {
        if self.json {
            return self.print(grant);
        }
        println!("{}", grant_line(verb, grant));
        Ok(())
    }

    fn balance(&self, balance: &Balance) -> anyhow::Result<()> {
        if self.json {
            return self.print(balance);
        }
        println!(
            "{}: {} available, {} pending usage, {} projected; uncovered usage {}",
            balance.customer,
            balance.available,
            balance.pending,
            balance.projected,
            balance.uncovered
        );
        if balance.grants.is_empty() {
            println!(
                "no open grants; grant some with `tally credits grant --customer {}`",
                balance.customer
            );
        }
        for grant in &balance.grants {
            println!("{}", grant_line("", grant));
        }
        Ok(())
    }

    fn ledger(
        &self,
        customer: &str,
        entries: &[LedgerEntry],
        after: Option<i64>,
        limit: i64,
    ) -> anyhow::Result<()> {
        let next_after = entries.last().map(|entry| entry.transaction_id);
        if self.json {
            // As `GET /v1/customers/{id}/credits/ledger` answers.
            return self.print(&serde_json::json!({
                "customer": customer,
                "entries": entries,
                "next_after": next_after,
            }));
        }
        if entries.is_empty() {
            let after = after.map_or_else(String::new, |after| format!(" after {after}"));
            println!("{customer} has no ledger entries{after}");
        }
        for entry in entries {
            println!("{}", entry_line(entry));
        }
        if let Some(last) = next_after.filter(|_| entries.len() as i64 >= limit) {
            println!("next: --after {last}");
        }
        Ok(())
    }
}

/// One grant on one line: id, customer, kind, what is left of it, priority, when it holds,
/// then how it closed and its key.
fn grant_line(verb: &str, g: &Grant) -> String {
    let verb = if verb.is_empty() {
        String::new()
    } else {
        format!("{verb:<8} ")
    };
    let until = g.expires_at.map_or_else(
        || "never expires".to_owned(),
        |at| format!("expires {}", time(at)),
    );
    let mut notes = vec![format!("key {}", g.idempotency_key)];
    if let (Some(closed_as), Some(at)) = (&g.closed_as, g.closed_at) {
        notes.insert(0, format!("{closed_as} {}", time(at)));
    }
    if let Some(description) = &g.description {
        notes.push(description.clone());
    }
    format!(
        "{verb}grant {:<6} {:<20} {:<12} {} left of {}  priority {}  from {}, {until}  ({})",
        g.grant_id,
        g.customer,
        g.kind.as_str(),
        g.remaining,
        g.amount,
        g.priority,
        time(g.effective_at),
        notes.join("; ")
    )
}

/// One ledger entry: id, when, kind, the signed amount, the grant, then what it was for.
fn entry_line(e: &LedgerEntry) -> String {
    let grant = e
        .grant_id
        .map_or_else(|| "uncovered".to_owned(), |id| format!("grant {id}"));
    let detail = match (&e.meter, e.window_start, e.quantity) {
        (Some(meter), Some(window), Some(quantity)) => {
            let rate = e
                .credits_per_unit
                .map_or_else(String::new, |rate| format!(" at {rate}"));
            format!("{quantity} {meter} in {}{rate}", time(window))
        }
        _ => format!(
            "by {}{}",
            e.actor,
            e.reason
                .as_ref()
                .map_or_else(String::new, |reason| format!(": {reason}"))
        ),
    };
    format!(
        "{:>8}  {}  {:<8} {:>16}  {:<12} {detail}",
        e.transaction_id,
        time(e.at),
        e.kind,
        e.amount,
        grant
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(day: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2027, 1, day, 0, 0, 0).unwrap()
    }

    fn grant() -> Grant {
        Grant {
            grant_id: 12,
            customer: "acme".into(),
            kind: GrantKind::Purchased,
            amount: Decimal::from(100),
            remaining: "97.5".parse().unwrap(),
            priority: 10,
            effective_at: at(1),
            expires_at: None,
            idempotency_key: "order-1".into(),
            subscription_id: None,
            description: None,
            granted_by: "alice".into(),
            reason: "paid".into(),
            created_at: at(1),
            closed_as: None,
            closed_at: None,
        }
    }

    #[test]
    fn a_grant_line_shows_what_is_left_when_it_holds_and_how_it_closed() {
        let mut g = grant();
        assert_eq!(
            grant_line("granted", &g),
            "granted  grant 12     acme                 purchased    97.5 left of 100  priority 10  from 2027-01-01T00:00:00Z, never expires  (key order-1)"
        );
        g.expires_at = Some(at(31));
        g.closed_as = Some("voided".into());
        g.closed_at = Some(at(2));
        g.description = Some("launch".into());
        assert!(grant_line("", &g).ends_with(
            "expires 2027-01-31T00:00:00Z  (voided 2027-01-02T00:00:00Z; key order-1; launch)"
        ));
    }

    #[test]
    fn a_ledger_line_says_what_usage_a_consume_paid_for() {
        let consume = LedgerEntry {
            transaction_id: 7,
            grant_id: None,
            kind: "consume".into(),
            amount: "-2.5".parse().unwrap(),
            meter: Some("tokens".into()),
            group_key: Some(String::new()),
            window_start: Some(at(3)),
            quantity: Some(Decimal::from(250)),
            credits_per_unit: Some("0.01".parse().unwrap()),
            actor: "burner".into(),
            reason: None,
            at: at(3),
        };
        let line = entry_line(&consume);
        assert!(line.contains("consume"), "{line}");
        assert!(
            line.ends_with("uncovered    250 tokens in 2027-01-03T00:00:00Z at 0.01"),
            "{line}"
        );
        let void = LedgerEntry {
            grant_id: Some(12),
            kind: "void".into(),
            meter: None,
            group_key: None,
            window_start: None,
            quantity: None,
            credits_per_unit: None,
            actor: "alice".into(),
            reason: Some("refund".into()),
            ..consume
        };
        assert!(entry_line(&void).ends_with("grant 12     by alice: refund"));
    }

    #[test]
    fn amounts_are_exact_and_refusals_carry_their_code() {
        assert_eq!(parse_amount("12.5"), Ok("12.5".parse().unwrap()));
        assert!(parse_amount("1e3").unwrap_err().contains("e.g. 100"));
        assert!(parse_amount("79228162514264337593543950336").is_err());
        let error = refused(CreditError::Closed {
            grant_id: 12,
            closed_as: "voided".into(),
        });
        assert_eq!(
            error.to_string(),
            "GRANT_CLOSED: grant 12 is already closed (voided); nothing is left to void"
        );
    }
}
