//! `tally customers`: which Stripe customer each tally customer's usage is billed to.
//!
//! - `map`: one customer, by hand.
//! - `import FILE`: a CSV file of mappings, all or nothing, in one transaction.
//! - `sync`: the Stripe customers whose metadata names a tally customer (and, with
//!   `--create`, new Stripe customers for the rest).
//! - `list`: the mappings, and the customers whose usage waits for one.
//!
//! Every path ends in the sink store's mapping functions; usage that waited for a mapping is
//! billed on the sink's next pass.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use rust_decimal::Decimal;
use tally_core::reject::printable;
use tally_core::{RejectReason, UsageEvent};
use tally_sink::{StripeCustomers, StripeHttp, DEFAULT_CUSTOMER_METADATA_KEY};

use crate::config::TallyConfig;
use crate::process::{connect, runtime};

/// The header an import file starts with.
const HEADER: &str = "customer,stripe_customer_id";
/// Most data lines an import takes (the file is read whole, and written in one statement).
const MAX_IMPORT_ROWS: usize = 1_000_000;
/// Most problems an import lists before it counts the rest.
const MAX_LISTED_PROBLEMS: usize = 20;

#[derive(Debug, clap::Args)]
pub(crate) struct CustomersArgs {
    #[command(subcommand)]
    command: CustomersCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CustomersCommand {
    /// Bill a tally customer to a Stripe customer (usage that waited is billed on the next pass)
    Map {
        /// The customer id events carry
        customer: String,
        /// The Stripe customer id, `cus_…`
        stripe_customer_id: String,
    },
    /// Map many customers from a CSV file, all or nothing
    ///
    /// The file starts with the header `customer,stripe_customer_id`, then one line per
    /// customer (RFC 4180: quote a field that holds a comma or a quote, doubling the quote).
    /// Every line is checked first: a customer id events cannot carry, a Stripe id that is not
    /// `cus_…`, or a customer given two different Stripe ids refuses the whole file, naming
    /// each line and the fix, and nothing is written. Otherwise every mapping is set in one
    /// transaction, as `tally customers map` sets one; importing the same file again changes
    /// nothing. Prints how many were added, changed (each with old → new) and unchanged.
    Import {
        /// The CSV file, or `-` for standard input
        file: PathBuf,
    },
    /// Map unmapped customers to the Stripe customers whose metadata names them
    ///
    /// For every tally customer with usage waiting for a mapping, or a subscription, and no
    /// mapping: lists the account's Stripe customers (all pages, under
    /// stripe.max_requests_per_second) and maps the customer to the one whose metadata
    /// `--metadata-key` holds its id. Two Stripe customers naming the same id: refused and
    /// listed (ambiguous). With --create, a Stripe customer is created for each customer still
    /// unmatched (`name` and the metadata key set to the id), with an Idempotency-Key derived
    /// from the id, so a sync that is retried or run again never creates two. A mapping made
    /// meanwhile (`tally customers map`) is kept. Exits 1 if a customer is ambiguous or a
    /// create failed.
    Sync {
        /// Create a Stripe customer for each customer no Stripe customer names
        #[arg(long)]
        create: bool,
        /// The Stripe metadata key whose value is the tally customer id
        #[arg(long, default_value = DEFAULT_CUSTOMER_METADATA_KEY, value_name = "KEY")]
        metadata_key: String,
        /// Report what would be matched and created; write and create nothing
        #[arg(long)]
        dry_run: bool,
    },
    /// List the mappings, and customers whose usage waits for one
    List,
}

pub(crate) fn run(config: &TallyConfig, args: &CustomersArgs) -> anyhow::Result<()> {
    match &args.command {
        CustomersCommand::Import { file } => {
            // Read and checked before anything connects: a bad file needs no database.
            let started = Instant::now();
            let text = read_import(file)?;
            let mappings = parse_import(&text).map_err(|problems| refusal(file, &problems))?;
            runtime()?.block_on(async {
                let pool = connect(config, 2).await?;
                tally_db::check_schema(&pool).await?;
                import(&pool, file, &mappings, started).await
            })
        }
        CustomersCommand::Sync {
            create,
            metadata_key,
            dry_run,
        } => {
            config.stripe.validate().map_err(anyhow::Error::msg)?;
            runtime()?.block_on(async {
                let pool = connect(config, 2).await?;
                tally_db::check_schema(&pool).await?;
                let stripe = StripeHttp::new(&config.stripe).map_err(anyhow::Error::msg)?;
                let customers = StripeCustomers::new(
                    &stripe,
                    config.stripe.requests_per_second(),
                    metadata_key,
                )
                .map_err(anyhow::Error::msg)?;
                sync(&pool, &customers, metadata_key, *create, *dry_run).await
            })
        }
        CustomersCommand::Map {
            customer,
            stripe_customer_id,
        } => {
            check_customer(customer).map_err(anyhow::Error::msg)?;
            check_stripe_customer_id(stripe_customer_id).map_err(anyhow::Error::msg)?;
            runtime()?.block_on(async {
                let pool = connect(config, 2).await?;
                tally_db::check_schema(&pool).await?;
                tally_sink::store::map_customer(&pool, customer, stripe_customer_id).await?;
                println!("{customer} is billed to Stripe customer {stripe_customer_id}");
                Ok(())
            })
        }
        CustomersCommand::List => runtime()?.block_on(async {
            let pool = connect(config, 2).await?;
            tally_db::check_schema(&pool).await?;
            for mapping in tally_sink::store::customer_mappings(&pool).await? {
                println!("{:<32} {}", mapping.customer_id, mapping.stripe_customer_id);
            }
            for waiting in tally_sink::store::unmapped_usage(&pool).await? {
                let customer = &waiting.customer_id;
                println!(
                    "{customer:<32} UNMAPPED: {} slot(s) of {} wait; run `tally customers map {customer} cus_…` (or `tally customers sync`)",
                    waiting.slots, waiting.meter
                );
            }
            Ok(())
        }),
    }
}

/// A customer id as tally's event contract takes it (`tally_core`'s rules for the `customer`
/// of an event): a mapping for an id no event can carry would never bill anything.
fn check_customer(customer: &str) -> Result<(), String> {
    let probe = UsageEvent::new(customer, "probe", Decimal::ONE).with_id("probe");
    match probe.validate(chrono::Utc::now()) {
        Err(rejection) if rejection.reason == RejectReason::InvalidCustomer => Err(format!(
            "customer \"{}\" is not an id events can carry: {}",
            printable(customer.to_owned()),
            rejection.detail
        )),
        _ => Ok(()),
    }
}

/// A Stripe customer id: `cus_` then letters, digits or underscores, as the Stripe dashboard
/// shows it.
fn check_stripe_customer_id(id: &str) -> Result<(), String> {
    let shown = printable(id.to_owned());
    if id.trim() != id {
        return Err(format!(
            "Stripe customer id \"{shown}\" has spaces around it; remove them"
        ));
    }
    let well_formed = id.len() <= 255
        && id.strip_prefix("cus_").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
    if well_formed {
        Ok(())
    } else {
        Err(format!(
            "\"{shown}\" is not a Stripe customer id; they start with cus_ followed by letters and digits (copy it from the customer's page in the Stripe dashboard)"
        ))
    }
}

fn read_import(file: &Path) -> anyhow::Result<String> {
    let mut bytes = Vec::new();
    if file.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .context("cannot read the mappings from standard input")?;
    } else {
        bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    }
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{} is not UTF-8 text (byte {} is not); save it as UTF-8 CSV",
            shown_name(file),
            e.utf8_error().valid_up_to()
        )
    })
}

fn shown_name(file: &Path) -> String {
    if file.as_os_str() == "-" {
        "standard input".to_owned()
    } else {
        file.display().to_string()
    }
}

/// The mappings of an import file, one per customer, in file order; or every problem found,
/// each naming its line and the fix.
fn parse_import(text: &str) -> Result<Vec<(String, String)>, Vec<String>> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text); // a BOM, as spreadsheets write
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let header = lines.next().unwrap_or_default();
    let header_ok = parse_csv_line(header).is_ok_and(|fields| {
        fields
            .iter()
            .map(|f| f.trim())
            .eq(["customer", "stripe_customer_id"])
    });
    if !header_ok {
        let looks_like_data = header.contains("cus_");
        return Err(vec![if header.trim().is_empty() {
            format!("line 1: the file must start with the header `{HEADER}`, then one line per customer")
        } else if looks_like_data {
            format!("line 1: no header: the first line must be `{HEADER}`; add it above the first mapping")
        } else {
            format!(
                "line 1: the header must be `{HEADER}`, not \"{}\"",
                printable(header.to_owned())
            )
        }]);
    }
    let mut problems = Vec::new();
    let mut seen: HashMap<String, (usize, String)> = HashMap::new();
    let mut mappings = Vec::new();
    for (index, line) in lines.enumerate() {
        let number = index + 2;
        if line.trim().is_empty() {
            continue;
        }
        if mappings.len() == MAX_IMPORT_ROWS {
            problems.push(format!(
                "line {number}: the file holds more than {MAX_IMPORT_ROWS} mappings; split it into several files"
            ));
            break;
        }
        let fields = match parse_csv_line(line) {
            Ok(fields) => fields,
            Err(problem) => {
                problems.push(format!("line {number}: {problem}"));
                continue;
            }
        };
        let (customer, stripe_id) = match <[String; 2]>::try_from(fields) {
            Ok([customer, stripe_id]) => (customer, stripe_id),
            Err(fields) => {
                problems.push(format!(
                    "line {number}: {} field(s); a line is `customer,stripe_customer_id` (quote a customer id that holds a comma: \"a,b\",cus_…)",
                    fields.len()
                ));
                continue;
            }
        };
        let mut line_ok = true;
        if let Err(problem) = check_customer(&customer) {
            problems.push(format!(
                "line {number}: {problem}; write the id exactly as your events carry it"
            ));
            line_ok = false;
        } else if customer.trim() != customer {
            problems.push(format!(
                "line {number}: customer {customer:?} has spaces around it; remove them (a customer whose events really carry them: `tally customers map`)"
            ));
            line_ok = false;
        }
        if let Err(problem) = check_stripe_customer_id(&stripe_id) {
            problems.push(format!("line {number}: {problem}"));
            line_ok = false;
        }
        if !line_ok {
            continue;
        }
        match seen.get(&customer) {
            Some((_, first_id)) if *first_id == stripe_id => {} // the same line twice: harmless
            Some((first_line, first_id)) => problems.push(format!(
                "line {number}: customer {customer:?} is mapped to {stripe_id} here and to {first_id} on line {first_line}; keep the one line that is right"
            )),
            None => {
                seen.insert(customer.clone(), (number, stripe_id.clone()));
                mappings.push((customer, stripe_id));
            }
        }
    }
    if problems.is_empty() {
        Ok(mappings)
    } else {
        Err(problems)
    }
}

/// One CSV line's fields (RFC 4180, within one line: customer ids hold no line breaks).
fn parse_csv_line(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                    None => return Err("a quoted field is not closed; end it with \"".into()),
                }
            }
            match chars.next() {
                None => {
                    fields.push(field);
                    return Ok(fields);
                }
                Some(',') => fields.push(field),
                Some(_) => {
                    return Err(
                        "text after a closing quote; a quote inside a quoted field is written \"\""
                            .into(),
                    )
                }
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        fields.push(field);
                        return Ok(fields);
                    }
                    Some(',') => break,
                    Some('"') => {
                        return Err(
                            "a quote inside an unquoted field; quote the whole field and double the quote (\"a\"\"b\")"
                                .into(),
                        )
                    }
                    Some(c) => field.push(c),
                }
            }
            fields.push(field);
        }
    }
}

fn refusal(file: &Path, problems: &[String]) -> anyhow::Error {
    let mut text = String::new();
    for problem in problems.iter().take(MAX_LISTED_PROBLEMS) {
        text.push_str(problem);
        text.push('\n');
    }
    if problems.len() > MAX_LISTED_PROBLEMS {
        text.push_str(&format!(
            "… and {} more problem(s)\n",
            problems.len() - MAX_LISTED_PROBLEMS
        ));
    }
    anyhow::anyhow!(
        "{text}{} refused: {} problem(s), nothing imported; fix the lines above and import it again",
        shown_name(file),
        problems.len()
    )
}

async fn import(
    pool: &sqlx::PgPool,
    file: &Path,
    mappings: &[(String, String)],
    started: Instant,
) -> anyhow::Result<()> {
    let writing = Instant::now();
    let report = tally_sink::store::import_mappings(pool, mappings).await?;
    let write_ms = writing.elapsed().as_millis();
    for change in &report.changed {
        println!(
            "changed  {}: {} → {}",
            printable(change.customer_id.clone()),
            change.old_stripe_customer_id,
            change.new_stripe_customer_id
        );
    }
    println!(
        "{}: {} added, {} changed, {} unchanged ({} mappings; one transaction, {write_ms} ms; {} ms in all)",
        shown_name(file),
        report.added,
        report.changed.len(),
        report.unchanged,
        mappings.len(),
        started.elapsed().as_millis()
    );
    if report.added + report.changed.len() > 0 {
        println!("usage that waited for these customers is billed on the sink's next pass");
    }
    Ok(())
}

/// What a sync found for the customers it looked for.
#[derive(Debug, Default)]
struct SyncPlan {
    /// Customer → the one Stripe customer that names it.
    matched: Vec<(String, String)>,
    /// Customer → every Stripe customer that names it.
    ambiguous: Vec<(String, Vec<String>)>,
    /// Customers no Stripe customer names.
    unmatched: Vec<String>,
}

fn plan_sync(unmapped: Vec<String>, stripe: &[tally_sink::StripeCustomer]) -> SyncPlan {
    let mut claims: HashMap<&str, Vec<String>> = HashMap::new();
    for customer in stripe {
        if let Some(tally_customer) = &customer.tally_customer {
            claims
                .entry(tally_customer.as_str())
                .or_default()
                .push(customer.id.clone());
        }
    }
    let mut plan = SyncPlan::default();
    for customer in unmapped {
        match claims.get(customer.as_str()).map(Vec::as_slice) {
            None | Some([]) => plan.unmatched.push(customer),
            Some([one]) => plan.matched.push((customer, one.clone())),
            Some(many) => {
                let mut ids = many.to_vec();
                ids.sort();
                plan.ambiguous.push((customer, ids));
            }
        }
    }
    plan
}

async fn sync(
    pool: &sqlx::PgPool,
    stripe: &StripeCustomers<'_>,
    metadata_key: &str,
    create: bool,
    dry_run: bool,
) -> anyhow::Result<()> {
    let unmapped = tally_sink::store::unmapped_customers(pool).await?;
    if unmapped.is_empty() {
        println!("every customer with usage or a subscription is mapped; nothing to sync");
        return Ok(());
    }
    let (stripe_customers, pages) = stripe.list().await.context(
        "cannot list the Stripe customers; check stripe.api_base and the secret key, then run the sync again",
    )?;
    let plan = plan_sync(unmapped, &stripe_customers);
    let would = if dry_run { "would map " } else { "" };

    let mut matched = 0;
    let mut mapped_meanwhile = Vec::new();
    if !plan.matched.is_empty() {
        let mapped: HashSet<String> = if dry_run {
            plan.matched.iter().map(|m| m.0.clone()).collect()
        } else {
            tally_sink::store::map_unmapped_customers(pool, &plan.matched)
                .await?
                .into_iter()
                .collect()
        };
        for (customer, stripe_id) in &plan.matched {
            if mapped.contains(customer) {
                matched += 1;
                println!(
                    "matched  {}{} → {stripe_id} (metadata {metadata_key})",
                    would,
                    printable(customer.clone())
                );
            } else {
                mapped_meanwhile.push(customer.clone());
            }
        }
    }
    for customer in &mapped_meanwhile {
        println!(
            "kept     {}: mapped meanwhile (tally customers map); left as it is",
            printable(customer.clone())
        );
    }
    for (customer, ids) in &plan.ambiguous {
        println!(
            "AMBIGUOUS {}: Stripe customers {} all have metadata {metadata_key}={}; not mapped. Remove the key from all but one of them, or `tally customers map` by hand",
            printable(customer.clone()),
            ids.join(", "),
            printable(customer.clone())
        );
    }

    let mut created = 0;
    let mut failed: Vec<(String, String)> = Vec::new();
    let mut left: Vec<&String> = Vec::new();
    let mut unmatched = plan.unmatched.iter();
    if create {
        for customer in unmatched.by_ref() {
            if dry_run {
                created += 1;
                println!(
                    "created  would create a Stripe customer for {} (name and metadata {metadata_key} = the id)",
                    printable(customer.clone())
                );
                continue;
            }
            match stripe.create(customer).await {
                Ok(stripe_id) => {
                    let pair = [(customer.clone(), stripe_id.clone())];
                    let mapped = tally_sink::store::map_unmapped_customers(pool, &pair).await?;
                    created += 1;
                    if mapped.is_empty() {
                        println!(
                            "created  {} → {stripe_id}, but it was mapped meanwhile (tally customers map); its mapping is left as it is",
                            printable(customer.clone())
                        );
                    } else {
                        println!("created  {} → {stripe_id}", printable(customer.clone()));
                    }
                }
                Err(error) if error.is_retryable() => {
                    // Stripe is away or overloaded past our retries: stop, the rest are left.
                    failed.push((customer.clone(), error.to_string()));
                    println!(
                        "FAILED   {}: {error}; stopping, run the sync again later (it creates nothing twice)",
                        printable(customer.clone())
                    );
                    break;
                }
                Err(error) => {
                    failed.push((customer.clone(), error.to_string()));
                    println!("FAILED   {}: {error}", printable(customer.clone()));
                }
            }
        }
    }
    left.extend(unmatched);
    for customer in &left {
        println!(
            "left     {}: no Stripe customer has metadata {metadata_key}={}; run with --create, or `tally customers map {} cus_…`",
            printable((*customer).clone()),
            printable((*customer).clone()),
            printable((*customer).clone())
        );
    }
    let customers_read = stripe_customers.len();
    let verb = if dry_run { "would be " } else { "" };
    println!(
        "{matched} {verb}matched, {created} {verb}created, {} ambiguous, {} failed, {} left, {} mapped meanwhile ({customers_read} Stripe customer(s) read in {pages} page(s)){}",
        plan.ambiguous.len(),
        failed.len(),
        left.len(),
        mapped_meanwhile.len(),
        if dry_run { "; dry run: nothing written or created" } else { "" }
    );
    if !plan.ambiguous.is_empty() || !failed.is_empty() {
        bail!(
            "{} customer(s) ambiguous and {} create(s) failed: see the lines above",
            plan.ambiguous.len(),
            failed.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(text: &str) -> Vec<(String, String)> {
        parse_import(text).unwrap_or_else(|problems| panic!("{problems:#?}"))
    }

    fn problems(text: &str) -> Vec<String> {
        parse_import(text).expect_err("refused")
    }

    #[test]
    fn reads_quoted_fields_crlf_bom_and_blank_lines() {
        let text = "\u{feff}customer,stripe_customer_id\r\nacme,cus_1\r\n\r\n\"a,b\",cus_2\r\n\"say \"\"hi\"\"\",cus_3\n";
        assert_eq!(
            parsed(text),
            [
                ("acme".to_owned(), "cus_1".to_owned()),
                ("a,b".to_owned(), "cus_2".to_owned()),
                ("say \"hi\"".to_owned(), "cus_3".to_owned()),
            ]
        );
    }

    #[test]
    fn the_same_line_twice_counts_once() {
        assert_eq!(
            parsed("customer,stripe_customer_id\nacme,cus_1\nacme,cus_1\n").len(),
            1
        );
    }

    #[test]
    fn the_header_is_required() {
        let p = problems("acme,cus_1\n");
        assert!(p[0].contains("no header"), "{p:?}");
        let p = problems("");
        assert!(p[0].contains("must start with the header"), "{p:?}");
        let p = problems("id,stripe\nacme,cus_1\n");
        assert!(p[0].contains("the header must be"), "{p:?}");
    }

    #[test]
    fn every_bad_line_is_named_with_its_fix() {
        let text = "customer,stripe_customer_id\n\
                    acme,cus_1\n\
                    beta,acct_1\n\
                    ,cus_2\n\
                    acme,cus_9\n\
                    gamma\n\
                    \"open,cus_3\n\
                    delta, cus_4\n";
        let p = problems(text);
        assert_eq!(p.len(), 6, "{p:#?}");
        assert!(
            p[0].starts_with("line 3:") && p[0].contains("start with cus_"),
            "{p:?}"
        );
        assert!(
            p[1].starts_with("line 4:") && p[1].contains("1 to 256"),
            "{p:?}"
        );
        assert!(
            p[2].starts_with("line 5:") && p[2].contains("on line 2"),
            "{p:?}"
        );
        assert!(
            p[3].starts_with("line 6:") && p[3].contains("1 field(s)"),
            "{p:?}"
        );
        assert!(
            p[4].starts_with("line 7:") && p[4].contains("not closed"),
            "{p:?}"
        );
        assert!(
            p[5].starts_with("line 8:") && p[5].contains("spaces"),
            "{p:?}"
        );
    }

    #[test]
    fn customer_ids_follow_the_event_contract() {
        assert!(check_customer("acme").is_ok());
        assert!(check_customer(&"x".repeat(256)).is_ok());
        assert!(check_customer(&"x".repeat(257)).is_err());
        assert!(check_customer("a\tb").is_err());
        assert!(check_customer("").is_err());
    }

    #[test]
    fn stripe_ids_are_cus_ids() {
        assert!(check_stripe_customer_id("cus_NffrFeUfNV2Hib").is_ok());
        assert!(check_stripe_customer_id("cus_emu0000000001").is_ok());
        for bad in ["cus_", "acct_1", "cus_a-b", " cus_1", "CUS_1", "cus_1\n"] {
            assert!(check_stripe_customer_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sync_plans_one_claim_as_a_match_and_two_as_ambiguous() {
        let stripe = |id: &str, claim: Option<&str>| tally_sink::StripeCustomer {
            id: id.into(),
            tally_customer: claim.map(str::to_owned),
        };
        let plan = plan_sync(
            vec!["a".into(), "b".into(), "c".into()],
            &[
                stripe("cus_1", Some("a")),
                stripe("cus_2", Some("b")),
                stripe("cus_3", Some("b")),
                stripe("cus_4", None),
                stripe("cus_5", Some("z")),
            ],
        );
        assert_eq!(plan.matched, [("a".to_owned(), "cus_1".to_owned())]);
        assert_eq!(
            plan.ambiguous,
            [("b".to_owned(), vec!["cus_2".to_owned(), "cus_3".to_owned()])]
        );
        assert_eq!(plan.unmatched, ["c".to_owned()]);
    }
}
