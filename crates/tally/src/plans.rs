//! `tally plans`: apply `[[plans]]` from tally.toml to Postgres, list what is there.

use anyhow::bail;
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
                for change in tally_billing::apply_plans(&pool, &config.plans, actor).await? {
                    match change {
                        PlanChange::Created(name) => println!("created   {name}"),
                        PlanChange::Updated(name) => println!("updated   {name}"),
                        PlanChange::Unchanged(name) => println!("unchanged {name}"),
                        PlanChange::Deleted(name) => println!("deleted   {name}"),
                    }
                }
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
