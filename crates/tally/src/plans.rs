//! `tally plans`: apply `[[plans]]` from tally.toml to Postgres, list what is there, and keep
//! what plans and credit packs sell in Stripe in step with tally.toml (`sync`).

use anyhow::{bail, Context};
use tally_billing::catalog;
use tally_billing::PlanChange;

use crate::config::TallyConfig;
use crate::process::{connect, runtime};

#[derive(Debug, clap::Args)]
pub(crate) struct PlansArgs {
    #[command(subcommand)]
    command: PlansCommand,
}

#[derive(Debug, clap::Subcommand)]
enum PlansCommand {
    /// Make the plans in Postgres equal to `[[plans]]` in tally.toml (every change audited)
    ///
    /// Creates new plans, updates changed ones and deletes removed ones; refuses (changing
    /// nothing) when a removed plan still has subscriptions.
    Apply {
        /// Who applies, for the audit trail [default: $USER]
        #[arg(long, env = "USER", default_value = "unknown")]
        actor: String,
    },
    /// List the plans in Postgres
    List,
    /// Check the Stripe prices of plans and credit packs against tally.toml and record them
    /// for Checkout (what `apply` does after the plans)
    ///
    /// A plan's prices are its `stripe_prices`, or the prices with lookup keys
    /// `tally_plan_<plan>` (its fee) and `tally_plan_<plan>_<meter>` (a limited meter's usage);
    /// a pack's is its `stripe_price`, or the price with lookup key `tally_pack_<pack>`. Each
    /// fee must agree with `[plans.price]` (amount, currency, interval), each metered price
    /// must bill the Stripe meter of a tally meter, each pack's price must be one-time and
    /// agree with the pack's. Exits 1 naming each disagreement; nothing is recorded then.
    Sync {
        /// First create the prices Stripe lacks, under those lookup keys: each plan's fee
        /// (from [plans.price]), each limited meter's usage (from its unit_price; the Stripe
        /// meter must exist: `tally sink --create-meters`), each pack's price. Idempotent.
        #[arg(long)]
        create: bool,
    },
}

pub(crate) fn run(config: &TallyConfig, args: &PlansArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let pool = connect(config, 2).await?;
        tally_db::check_schema(&pool).await?;
        match &args.command {
            PlansCommand::Apply { actor } => {
                if config.plans.is_empty() {
                    bail!("no [[plans]] in the configuration; define them in tally.toml (see tally.example.toml) before applying, or every plan in Postgres would be deleted");
                }
                let actor = crate::cli::operator_name(actor)?;
                // Stripe first: a plan whose price disagrees with Stripe changes nothing.
                let checked = check_stripe(config).await?;
                let mut unchanged = Vec::new();
                for change in tally_billing::apply_plans(&pool, &config.plans, actor).await? {
                    match change {
                        PlanChange::Created(name) => println!("created   {name}"),
                        PlanChange::Updated(name) => println!("updated   {name}"),
                        PlanChange::Unchanged(name) => {
                            println!("unchanged {name}");
                            unchanged.push(name);
                        }
                        PlanChange::Deleted(name) => println!("deleted   {name}"),
                    }
                }
                // Unchecked, what changed no longer holds; what did not still does (webhooks
                // name plans by these prices).
                let forget_changed = || {
                    catalog::forget_changed(&pool, &unchanged, &config.credits.packs)
                };
                match checked {
                    StripeCatalog::Checked(checked) => record(&pool, &checked).await?,
                    StripeCatalog::NoKey => forget_changed().await?,
                    StripeCatalog::Unreachable(error) => {
                        forget_changed().await?;
                        eprintln!("warning: Stripe prices not checked ({error:#}): the plans are applied; what changed is not for sale through Checkout until `tally plans sync` reaches Stripe");
                    }
                }
            }
            PlansCommand::Sync { create } => {
                let stripe = stripe_client(config)?;
                if *create {
                    let created = catalog::create_missing(
                        &stripe,
                        &config.plans,
                        &config.credits.packs,
                        &config.meters,
                    )
                    .await
                    .context("cannot create the prices in Stripe; check stripe.api_base and the secret key, then run the sync again (it creates only what is missing)")?;
                    for key in &created.prices {
                        println!("created price {key}");
                    }
                    for skipped in &created.skipped {
                        println!("not created: {skipped}");
                    }
                }
                let checked = check_with(config, &stripe).await?;
                record(&pool, &checked).await?;
            }
            PlansCommand::List => {
                for (name, definition) in tally_billing::list_plans(&pool).await? {
                    println!("{name}: {definition}");
                }
            }
        }
        Ok(())
    })
}

fn stripe_client(config: &TallyConfig) -> anyhow::Result<tally_sink::StripeHttp> {
    tally_sink::StripeHttp::new(&config.stripe).map_err(anyhow::Error::msg)
}

/// What `plans apply` learned of the Stripe prices.
enum StripeCatalog {
    Checked(catalog::CatalogCheck),
    /// No Stripe key: nothing to check (and nothing for sale).
    NoKey,
    /// Stripe did not answer: the plans apply (an outage does not stop plan changes), and
    /// nothing is for sale until a `tally plans sync` reaches Stripe.
    Unreachable(anyhow::Error),
}

/// The Stripe prices of the plans and packs, checked. Prices that disagree with tally.toml are
/// an error: nothing is applied.
async fn check_stripe(config: &TallyConfig) -> anyhow::Result<StripeCatalog> {
    if config.stripe.secret_key.expose().is_empty() {
        eprintln!(
            "warning: Stripe prices not checked: no STRIPE_SECRET_KEY (nothing is for sale through Checkout)"
        );
        return Ok(StripeCatalog::NoKey);
    }
    let stripe = stripe_client(config)?;
    match catalog::check(&stripe, &config.plans, &config.credits.packs, &config.meters).await {
        Ok(checked) => Ok(StripeCatalog::Checked(refuse_problems(checked)?)),
        // An outage is waited out elsewhere; here the plans still apply, and nothing sells.
        Err(error) if error.is_retryable() => Ok(StripeCatalog::Unreachable(error.into())),
        // A key Stripe refuses (401, 403) is the operator's to fix: nothing is applied.
        Err(error) => Err(anyhow::Error::new(error).context(
            "Stripe refused to show the prices; check the secret key (a restricted key needs read access to prices and billing meters)",
        )),
    }
}

async fn read_catalog(
    config: &TallyConfig,
    stripe: &tally_sink::StripeHttp,
) -> anyhow::Result<catalog::CatalogCheck> {
    catalog::check(stripe, &config.plans, &config.credits.packs, &config.meters)
        .await
        .context("cannot read the prices from Stripe; check stripe.api_base and the secret key")
}

async fn check_with(
    config: &TallyConfig,
    stripe: &tally_sink::StripeHttp,
) -> anyhow::Result<catalog::CatalogCheck> {
    refuse_problems(read_catalog(config, stripe).await?)
}

fn refuse_problems(checked: catalog::CatalogCheck) -> anyhow::Result<catalog::CatalogCheck> {
    if !checked.problems.is_empty() {
        for problem in &checked.problems {
            eprintln!("error: {problem}");
        }
        bail!(
            "{} Stripe price(s) disagree with tally.toml; nothing was changed",
            checked.problems.len()
        );
    }
    Ok(checked)
}

async fn record(pool: &sqlx::PgPool, checked: &catalog::CatalogCheck) -> anyhow::Result<()> {
    catalog::record(pool, &checked.prices).await?;
    for price in &checked.prices {
        let sells = match (&price.plan, &price.pack, &price.meter) {
            (Some(plan), _, Some(meter)) => format!("plan {plan}: usage of {meter}"),
            (Some(plan), _, None) => format!("plan {plan}: fee"),
            (_, Some(pack), _) => format!("pack {pack}"),
            _ => continue,
        };
        println!(
            "for sale  {sells}: {} ({} {} smallest unit{})",
            price.price_id,
            price.unit_amount_decimal,
            price.currency,
            price
                .recurring_interval
                .as_deref()
                .map(|i| format!(" a {i}"))
                .unwrap_or_default()
        );
    }
    for name in &checked.not_for_sale {
        println!("not for sale  {name}: no Stripe price (run `tally plans sync --create`)");
    }
    Ok(())
}
