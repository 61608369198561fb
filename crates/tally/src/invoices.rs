//! `tally invoices`: the Stripe invoices tally keeps (as Stripe's webhooks described them).

use anyhow::bail;
use tally_billing::invoices::{self, Invoice};

use crate::cli::{print_json, time};
use crate::config::TallyConfig;
use crate::process::{connect, runtime};

#[derive(Debug, clap::Args)]
pub(crate) struct InvoicesArgs {
    #[command(subcommand)]
    command: InvoicesCommand,
    /// Print JSON instead of text
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Debug, clap::Subcommand)]
enum InvoicesCommand {
    /// A customer's invoices, newest first
    List {
        #[arg(long)]
        customer: String,
        /// At most this many (1 to 100)
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// The last invoice id of the previous page
        #[arg(long)]
        starting_after: Option<String>,
    },
    /// One invoice with its lines
    Show {
        /// The Stripe invoice id (`in_…`)
        id: String,
    },
}

pub(crate) fn run(config: &TallyConfig, args: &InvoicesArgs) -> anyhow::Result<()> {
    if let InvoicesCommand::List { limit, .. } = &args.command {
        if !(1..=invoices::MAX_PAGE).contains(limit) {
            bail!("--limit {limit}: between 1 and {}", invoices::MAX_PAGE);
        }
    }
    runtime()?.block_on(async {
        let pool = connect(config, 2).await?;
        tally_db::check_schema(&pool).await?;
        match &args.command {
            InvoicesCommand::List {
                customer,
                limit,
                starting_after,
            } => {
                let (page, more) =
                    invoices::list(&pool, customer, *limit, starting_after.as_deref()).await?;
                if args.json {
                    return print_json(&serde_json::json!({ "data": page, "has_more": more }));
                }
                if page.is_empty() {
                    println!("no invoices of customer {customer:?} (they arrive through Stripe's invoice.* webhooks)");
                }
                for invoice in &page {
                    println!("{}", summary(invoice));
                }
                if more {
                    let last = page.last().map(|i| i.id.as_str()).unwrap_or_default();
                    println!("more: --starting-after {last}");
                }
            }
            InvoicesCommand::Show { id } => {
                let Some(invoice) = invoices::get(&pool, id).await? else {
                    bail!("no invoice {id:?}; list a customer's with `tally invoices list --customer C`");
                };
                if args.json {
                    return print_json(&invoice);
                }
                println!("{}", summary(&invoice));
                println!(
                    "  period {} – {}",
                    time(invoice.period_start),
                    time(invoice.period_end)
                );
                for (label, url) in [
                    ("page", &invoice.hosted_invoice_url),
                    ("pdf", &invoice.invoice_pdf),
                ] {
                    if let Some(url) = url {
                        println!("  {label:4} {url}");
                    }
                }
                for line in invoice.lines.as_array().into_iter().flatten() {
                    println!(
                        "  line {} × {}{}: {} {}",
                        line["quantity"].as_str().unwrap_or("-"),
                        line["description"].as_str().unwrap_or(""),
                        line["meter"]
                            .as_str()
                            .map(|m| format!(" (meter {m})"))
                            .unwrap_or_default(),
                        line["amount"],
                        invoice.currency
                    );
                }
            }
        }
        Ok(())
    })
}

fn summary(invoice: &Invoice) -> String {
    format!(
        "{}  {:8} {:>10} {}  due {} paid {}  {}",
        invoice.id,
        invoice.status.as_deref().unwrap_or("-"),
        invoice.total,
        invoice.currency,
        invoice.amount_due,
        invoice.amount_paid,
        invoice.number.as_deref().unwrap_or("")
    )
}
