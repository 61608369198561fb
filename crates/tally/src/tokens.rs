//! `tally tokens create`: a new API token, printed once, and the `[[serve.tokens]]` lines that
//! hold only its hash.

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use rand::RngCore;
use tally_api::{ApiToken, Scope};

#[derive(Debug, Args)]
pub(crate) struct TokensArgs {
    #[command(subcommand)]
    command: TokensCommand,
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Make a new token: prints the token once (give it to the caller; tally keeps only its
    /// SHA-256) and the [[serve.tokens]] entry to add to tally.toml
    Create {
        /// What the token may do: admin (everything), ingest (POST /v1/events only), check
        /// (quota checks and entitlements for any customer, for gateways), customer (one
        /// customer's own reads; its checks count nothing)
        #[arg(long, value_enum)]
        scope: ScopeArg,
        /// The customer a `--scope customer` token reads
        #[arg(long)]
        customer: Option<String>,
        /// A name for logs and metrics (default: the scope, or the customer)
        #[arg(long)]
        name: Option<String>,
        /// Append the [[serve.tokens]] entry to this file (e.g. tally.toml) and print only the
        /// token, for scripts: TOKEN=$(tally tokens create --scope admin --append-to tally.toml)
        #[arg(long, value_name = "FILE")]
        append_to: Option<std::path::PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ScopeArg {
    Admin,
    Ingest,
    Check,
    Customer,
}

impl From<ScopeArg> for Scope {
    fn from(scope: ScopeArg) -> Scope {
        match scope {
            ScopeArg::Admin => Scope::Admin,
            ScopeArg::Ingest => Scope::Ingest,
            ScopeArg::Check => Scope::Check,
            ScopeArg::Customer => Scope::Customer,
        }
    }
}

pub(crate) fn run(args: &TokensArgs) -> anyhow::Result<()> {
    let TokensCommand::Create {
        scope,
        customer,
        name,
        append_to,
    } = &args.command;
    let scope = Scope::from(*scope);
    match (scope, customer) {
        (Scope::Customer, None) => {
            bail!("a customer token reads one customer: add --customer <id>")
        }
        (Scope::Customer, Some(_)) | (_, None) => {}
        (_, Some(_)) => bail!(
            "--customer is only for --scope customer; a {} token is not tied to a customer",
            scope.as_str()
        ),
    }
    let name = name
        .clone()
        .or_else(|| customer.clone())
        .unwrap_or_else(|| scope.as_str().to_owned());
    let mut random = [0u8; 32];
    rand::rng().fill_bytes(&mut random);
    // A prefix says what the string is (and lets secret scanners find a leaked one).
    let token = format!("tly_{}", hex::encode(random));
    let entry = ApiToken::new(&name, scope, customer.as_deref(), &token);
    let mut lines = format!(
        "[[serve.tokens]]\nname = {:?}\nscope = {:?}\n",
        entry.name,
        scope.as_str()
    );
    if let Some(customer) = &entry.customer {
        lines.push_str(&format!("customer = {customer:?}\n"));
    }
    lines.push_str(&format!("sha256 = {:?}\n", entry.sha256.expose()));
    match append_to {
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(path)
                .with_context(|| {
                    format!(
                        "cannot append to {}; pass --append-to with an existing, writable tally.toml",
                        path.display()
                    )
                })?;
            std::io::Write::write_all(&mut file, format!("\n{lines}").as_bytes())
                .with_context(|| format!("writing to {}", path.display()))?;
            println!("{token}");
        }
        None => {
            println!("token (shown once; tally keeps only its hash):\n\n  {token}\n");
            println!("add to tally.toml:\n\n{lines}");
        }
    }
    Ok(())
}
