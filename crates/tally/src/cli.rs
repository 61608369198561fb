//! What the admin commands (`tally subscriptions`, `tally credits`) share: who makes a change and
//! why, times as flags and as output, JSON output.

use anyhow::bail;
use chrono::{DateTime, SecondsFormat, Utc};

/// Who makes a change and why: written with it (to `entitlement_audit`, or the credit ledger).
#[derive(Debug, clap::Args)]
pub(crate) struct AuditArgs {
    /// Who makes the change, for the audit trail [default: $USER]
    #[arg(long, env = "USER", default_value = "unknown")]
    actor: String,
    /// Why, for the audit trail (1 to 1,000 characters)
    #[arg(long)]
    pub(crate) reason: String,
}

impl AuditArgs {
    /// `--actor`, which must name someone, and not tally itself.
    pub(crate) fn actor_name(&self) -> anyhow::Result<&str> {
        operator_name(&self.actor)
    }
}

/// The names tally's own changes are recorded under (the scheduler, the burner, a Stripe
/// webhook, an API token): an operator may not pose as one of them in the audit trail.
const RESERVED_ACTORS: [&str; 4] = [
    tally_billing::subscriptions::SCHEDULER_ACTOR,
    tally_credits::burn::ACTOR,
    "system",
    "tally",
];
const RESERVED_PREFIXES: [&str; 3] = ["stripe:", "token:", "tally:"];

/// An operator's name for the audit trail (`--actor`): someone, printable, at most 200
/// characters, and not one of the names tally's own changes carry.
pub(crate) fn operator_name(actor: &str) -> anyhow::Result<&str> {
    let name = actor.trim();
    if name.is_empty() {
        bail!("--actor must name who makes the change (it is written to the audit trail)");
    }
    if name.chars().count() > 200 || name.chars().any(char::is_control) {
        bail!("--actor must be at most 200 printable characters");
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_ACTORS.contains(&lower.as_str())
        || RESERVED_PREFIXES.iter().any(|p| lower.starts_with(p))
    {
        bail!("--actor {name:?} is a name tally records its own changes under (the scheduler, the burner, Stripe's webhooks, API tokens); give your own name");
    }
    Ok(name)
}

/// A time flag: RFC 3339.
pub(crate) fn parse_time(text: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(text)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|error| {
            format!("{text:?} is not an RFC 3339 time ({error}); write e.g. 2027-01-31T00:00:00Z")
        })
}

/// A time in text output, to the second.
pub(crate) fn time(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// `--json` output: pretty-printed, one document.
pub(crate) fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}
