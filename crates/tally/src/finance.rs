//! `tally finance grant|revoke ROLE` and `tally export`: what finance reads, and who may read it.
//!
//! Finance reads the `finance_*` views (migrations 0001 and 0009, docs/finance.md) and nothing
//! else. The views run with their owner's rights, so a finance role needs only SELECT on them
//! and USAGE on their schema: no right on a table, hence none on raw payloads, event ids or the
//! outbox. `tally export` reads only `finance_statement_daily` or `finance_statement_monthly`,
//! so the finance role itself can run it.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context};
use chrono::{Months, NaiveDate};
use sqlx::PgConnection;

use crate::config::TallyConfig;
use crate::process::{connect, runtime};

/// Every finance view, in the order `grant` lists them. A view added to a migration under the
/// `finance_` prefix belongs here (tests/finance.rs compares this list with the catalog).
pub(crate) const FINANCE_VIEWS: [&str; 17] = [
    "finance_billed_daily",
    "finance_billed_monthly",
    "finance_corrections",
    "finance_credit_balances",
    "finance_credit_usage_daily",
    "finance_customers",
    "finance_invoice_lines",
    "finance_invoices",
    "finance_meters",
    "finance_mrr_daily",
    "finance_repairs",
    "finance_statement_daily",
    "finance_statement_monthly",
    "finance_subscription_events_daily",
    "finance_subscriptions_daily",
    "finance_usage_daily",
    "finance_usage_monthly",
];

#[derive(Debug, clap::Args)]
pub(crate) struct FinanceArgs {
    #[command(subcommand)]
    command: FinanceCommand,
}

#[derive(Debug, clap::Subcommand)]
enum FinanceCommand {
    /// Let an existing Postgres role read the finance_* views, and nothing else of tally's
    ///
    /// Grants USAGE on the views' schema and SELECT on each finance_* view; creates nothing
    /// (make the role first: CREATE ROLE finance LOGIN PASSWORD '…'). Run it as the owner of
    /// the views (the user that ran `tally migrate`) or a superuser, again after a `tally
    /// migrate` that adds finance views. Idempotent. Warns when the role can read other tables
    /// through rights granted elsewhere.
    Grant {
        /// The role: an SQL identifier (a letter or _, then letters, digits, _ or $; at most
        /// 63 characters), matched exactly, case included
        #[arg(value_parser = parse_role, value_name = "ROLE")]
        role: String,
    },
    /// Take back what `tally finance grant` gave: SELECT on the finance_* views and USAGE on
    /// their schema
    Revoke {
        /// The role, as for `grant`
        #[arg(value_parser = parse_role, value_name = "ROLE")]
        role: String,
    },
}

#[derive(Debug, clap::Args)]
pub(crate) struct ExportArgs {
    /// The UTC calendar month to export, as YYYY-MM (e.g. 2026-11)
    #[arg(long, value_parser = parse_month, value_name = "YYYY-MM")]
    month: NaiveDate,
    /// csv (a header line, then one line per row) or json (an array of objects)
    #[arg(long, value_enum, default_value = "csv")]
    format: Format,
    /// One row per customer, meter and UTC day, or per customer and meter for the month
    #[arg(long, value_enum, default_value = "day")]
    granularity: Granularity,
    /// Write here instead of stdout (the file appears only once the export is complete)
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Csv,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Granularity {
    Day,
    Month,
}

/// A Postgres role name as SQL writes an identifier: an ASCII letter or underscore, then ASCII
/// letters, digits, underscores or dollar signs, 63 bytes at most (Postgres's NAMEDATALEN).
/// `pg_` names are Postgres's own roles. The name is matched exactly (it is always quoted).
fn parse_role(text: &str) -> Result<String, String> {
    let mut chars = text.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
        && text.len() <= 63;
    if !valid {
        return Err(format!(
            "{text:?} is not a role name tally accepts: 1 to 63 characters, an ASCII letter or _ first, then letters, digits, _ or $"
        ));
    }
    if text.to_ascii_lowercase().starts_with("pg_") {
        return Err(format!(
            "{text:?} is a name Postgres reserves for its own roles (pg_…); grant to a role of your own"
        ));
    }
    Ok(text.to_owned())
}

/// `YYYY-MM` as the month's first day.
fn parse_month(text: &str) -> Result<NaiveDate, String> {
    let bad = || format!("{text:?} is not a month: use YYYY-MM, e.g. 2026-11");
    let (year, month) = text.split_once('-').ok_or_else(bad)?;
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(year, 4) || !digits(month, 2) {
        return Err(bad());
    }
    let (year, month) = (
        year.parse().map_err(|_| bad())?,
        month.parse().map_err(|_| bad())?,
    );
    NaiveDate::from_ymd_opt(year, month, 1).ok_or_else(bad)
}

/// The finance views as `"schema"."view", …`: named in their schema, never found through the
/// search path (where a temporary view of the same name would come first).
fn qualified_views(schema: &str) -> String {
    FINANCE_VIEWS
        .map(|view| format!("{}.{}", quote_ident(schema), quote_ident(view)))
        .join(", ")
}

/// An identifier quoted for SQL (inner double quotes doubled), whatever it holds.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) fn run(config: &TallyConfig, args: &FinanceArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        // No check_schema: `prepare` checks the finance views themselves, with a message that
        // also fits a user who may not read `_sqlx_migrations`.
        let pool = connect(config, 1).await?;
        let mut conn = pool.acquire().await?;
        match &args.command {
            FinanceCommand::Grant { role } => grant(&mut conn, role).await,
            FinanceCommand::Revoke { role } => revoke(&mut conn, role).await,
        }
    })
}

/// What granting and revoking need to know: the schema of the finance views, and whether the
/// role is a superuser (which reads everything, whatever it is granted).
struct Target {
    schema: String,
    superuser: bool,
}

/// Checks that the role exists and does not own the finance views (revoking from the owner
/// would take the views from tally's own user), and finds their schema.
async fn prepare(conn: &mut PgConnection, role: &str) -> anyhow::Result<Target> {
    let superuser: Option<bool> =
        sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = $1")
            .bind(role)
            .fetch_optional(&mut *conn)
            .await
            .context("looking the role up")?;
    let Some(superuser) = superuser else {
        let folded: Option<String> =
            sqlx::query_scalar("SELECT rolname::text FROM pg_roles WHERE rolname = lower($1)")
                .bind(role)
                .fetch_optional(&mut *conn)
                .await
                .context("looking the role up")?;
        let hint = match folded {
            Some(folded) if folded != role => {
                format!(" (role names are matched exactly: did you mean {folded}?)")
            }
            _ => String::new(),
        };
        bail!("role {role} does not exist{hint}; tally creates no roles: create it first (CREATE ROLE {role} LOGIN PASSWORD '…'), then grant");
    };
    let schema: Option<String> = sqlx::query_scalar("SELECT current_schema()::text")
        .fetch_one(&mut *conn)
        .await
        .context("reading the current schema")?;
    let schema = schema.context(
        "no current schema (search_path is empty); set search_path to the schema tally migrated",
    )?;
    let views: Vec<(String, String)> = sqlx::query_as(
        "SELECT viewname::text, viewowner::text FROM pg_views
         WHERE schemaname = current_schema() AND viewname = ANY($1)",
    )
    .bind(&FINANCE_VIEWS[..])
    .fetch_all(&mut *conn)
    .await
    .context("listing the finance views")?;
    let missing: Vec<&str> = FINANCE_VIEWS
        .into_iter()
        .filter(|v| !views.iter().any(|(name, _)| name == v))
        .collect();
    if !missing.is_empty() {
        bail!(
            "schema {schema} lacks the finance views {}; run `tally migrate` (search_path must name the schema tally migrated)",
            missing.join(", ")
        );
    }
    if views.iter().any(|(_, owner)| owner == role) {
        bail!("role {role} owns the finance views (it is the user that ran `tally migrate`); grant to a separate read-only role");
    }
    Ok(Target { schema, superuser })
}

async fn grant(conn: &mut PgConnection, role: &str) -> anyhow::Result<()> {
    let Target { schema, superuser } = prepare(conn, role).await?;
    let views = qualified_views(&schema);
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(&format!(
        "GRANT USAGE ON SCHEMA {} TO {}",
        quote_ident(&schema),
        quote_ident(role)
    ))
    .execute(&mut *tx)
    .await
    .map_err(|e| not_owner(e, "granting USAGE on the schema"))?;
    sqlx::query(&format!("GRANT SELECT ON {views} TO {}", quote_ident(role)))
        .execute(&mut *tx)
        .await
        .map_err(|e| not_owner(e, "granting SELECT on the finance views"))?;
    tx.commit().await?;

    // A GRANT by a user without the right to give it is only a warning in Postgres: check.
    let unreadable = readable_views(conn, role, false).await?;
    if !unreadable.is_empty() {
        bail!(
            "role {role} still cannot read {}: connect as the owner of the views (the user that ran `tally migrate`) or a superuser",
            unreadable.join(", ")
        );
    }
    println!(
        "granted {role}: USAGE on schema {schema}; SELECT on {}",
        FINANCE_VIEWS.join(", ")
    );
    let others: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema()
           AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
           AND NOT c.relname = ANY($2)
           AND has_table_privilege($1::text::name, c.oid, 'SELECT')
         ORDER BY 1",
    )
    .bind(role)
    .bind(&FINANCE_VIEWS[..])
    .fetch_all(&mut *conn)
    .await
    .context("checking what else the role can read")?;
    if superuser {
        eprintln!("warning: {role} is a superuser: it can read every table, raw payloads included; a finance role should be a plain LOGIN role");
    } else if !others.is_empty() {
        eprintln!(
            "warning: {role} can also read {} through rights granted elsewhere (not by tally); revoke them (REVOKE ALL ON <table> FROM {role}) to keep it to the finance views",
            others.join(", ")
        );
    }
    Ok(())
}

async fn revoke(conn: &mut PgConnection, role: &str) -> anyhow::Result<()> {
    let Target { schema, .. } = prepare(conn, role).await?;
    let views = qualified_views(&schema);
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    sqlx::query(&format!(
        "REVOKE SELECT ON {views} FROM {}",
        quote_ident(role)
    ))
    .execute(&mut *tx)
    .await
    .map_err(|e| not_owner(e, "revoking SELECT on the finance views"))?;
    sqlx::query(&format!(
        "REVOKE USAGE ON SCHEMA {} FROM {}",
        quote_ident(&schema),
        quote_ident(role)
    ))
    .execute(&mut *tx)
    .await
    .map_err(|e| not_owner(e, "revoking USAGE on the schema"))?;
    tx.commit().await?;
    let still = readable_views(conn, role, true).await?;
    if !still.is_empty() {
        bail!(
            "role {role} can still read {} (granted by another user, to PUBLIC, or to a role it is a member of); revoke those grants too",
            still.join(", ")
        );
    }
    println!(
        "revoked from {role}: SELECT on {}; USAGE on schema {schema}",
        FINANCE_VIEWS.join(", ")
    );
    Ok(())
}

/// A GRANT or REVOKE that failed, with what to do when the connected user lacks the right.
fn not_owner(error: sqlx::Error, what: &str) -> anyhow::Error {
    let denied =
        matches!(&error, sqlx::Error::Database(db) if db.code().as_deref() == Some("42501"));
    let advice = if denied {
        format!("{what}: the connected user may not; connect as the owner of the views (the user that ran `tally migrate`) or a superuser")
    } else {
        what.to_owned()
    };
    anyhow::Error::new(error).context(advice)
}

/// The finance views the role can (`readable`) or cannot read.
async fn readable_views(
    conn: &mut PgConnection,
    role: &str,
    readable: bool,
) -> anyhow::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_class c
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = current_schema() AND c.relname = ANY($2)
           AND has_table_privilege($1::text::name, c.oid, 'SELECT') = $3
         ORDER BY 1",
    )
    .bind(role)
    .bind(&FINANCE_VIEWS[..])
    .bind(readable)
    .fetch_all(&mut *conn)
    .await
    .context("checking the role's rights on the finance views")
}

/// Rows fetched from the export cursor at a time: the export's memory stays bounded whatever
/// the month holds.
const EXPORT_BATCH: u32 = 1000;

/// One row of `finance_statement_daily` / `_monthly`, numbers as Postgres's exact text.
type StatementRow = (
    String,
    String,
    Option<String>,
    String,
    String,
    i64,
    Option<String>,
    String,
);

pub(crate) fn export(config: &TallyConfig, args: &ExportArgs) -> anyhow::Result<()> {
    let from = args.month;
    let to = from
        .checked_add_months(Months::new(1))
        .context("the month after --month is beyond the calendar")?;
    let period = match args.granularity {
        Granularity::Day => "day",
        Granularity::Month => "month",
    };
    // Into a temporary file beside the target, renamed once complete: a failed export never
    // leaves a file that looks whole.
    let mut file = match &args.output {
        Some(path) => {
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            Some(
                tempfile::NamedTempFile::new_in(dir)
                    .with_context(|| format!("cannot write in {} for --output", dir.display()))?,
            )
        }
        None => None,
    };
    let stdout = std::io::stdout();
    let mut out: Box<dyn Write + '_> = match &mut file {
        Some(file) => Box::new(std::io::BufWriter::new(file.as_file_mut())),
        None => Box::new(std::io::BufWriter::new(stdout.lock())),
    };
    let rows = runtime()?.block_on(async {
        let pool = connect(config, 1).await?;
        let mut conn = pool.acquire().await?;
        write_export(&mut conn, args, from, to, period, &mut out).await
    })?;
    out.flush().context("writing the export")?;
    drop(out);
    if let (Some(file), Some(path)) = (file, &args.output) {
        file.persist(path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!(
            "exported {rows} rows ({period}s of {}) to {}",
            from.format("%Y-%m"),
            path.display()
        );
    }
    Ok(())
}

/// Streams the month's statement rows through a cursor, in one read-only snapshot, and writes
/// them; returns how many.
async fn write_export(
    conn: &mut PgConnection,
    args: &ExportArgs,
    from: NaiveDate,
    to: NaiveDate,
    period: &str,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    // One snapshot for the whole export: rows committed meanwhile are in none of its lines.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .execute(&mut *tx)
        .await?;
    let (view, declare) = match args.granularity {
        Granularity::Day => (
            "finance_statement_daily",
            sqlx::query(
                "DECLARE finance_export NO SCROLL CURSOR FOR
                 SELECT customer_id, meter, aggregation, to_char(period, 'YYYY-MM-DD'), usage::text,
                        events, billed::text, corrections::text
                 FROM finance_statement_daily
                 WHERE period >= $1 AND period < $2
                 ORDER BY customer_id, meter, period",
            ),
        ),
        Granularity::Month => (
            "finance_statement_monthly",
            sqlx::query(
                "DECLARE finance_export NO SCROLL CURSOR FOR
                 SELECT customer_id, meter, aggregation, to_char(period, 'YYYY-MM'), usage::text,
                        events, billed::text, corrections::text
                 FROM finance_statement_monthly
                 WHERE period >= $1 AND period < $2
                 ORDER BY customer_id, meter, period",
            ),
        ),
    };
    declare
        .bind(from)
        .bind(to)
        .execute(&mut *tx)
        .await
        .map_err(|error| explain(error, view))?;
    let header = [
        "customer_id",
        "meter",
        "aggregation",
        period,
        "usage",
        "events",
        "billed",
        "corrections",
    ];
    match args.format {
        Format::Csv => writeln!(out, "{}", header.join(","))?,
        Format::Json => write!(out, "[")?,
    }
    // Built at run time, not a literal: a FETCH prepares only while its cursor is open, so the
    // schema check of tests/sql.rs cannot prepare it (tests/finance.rs runs it).
    let fetch = format!("FETCH {EXPORT_BATCH} FROM finance_export");
    let mut written = 0u64;
    loop {
        let rows: Vec<StatementRow> = sqlx::query_as(&fetch)
            .fetch_all(&mut *tx)
            .await
            .map_err(|error| explain(error, view))?;
        for row in &rows {
            match args.format {
                Format::Csv => write_csv(out, row)?,
                Format::Json => write_json(out, &header, row, written == 0)?,
            }
            written += 1;
        }
        if rows.len() < EXPORT_BATCH as usize {
            break;
        }
    }
    if args.format == Format::Json {
        writeln!(out, "{}]", if written == 0 { "" } else { "\n" })?;
    }
    tx.commit().await?;
    Ok(written)
}

/// What to do about a query on the finance views that failed.
fn explain(error: sqlx::Error, view: &str) -> anyhow::Error {
    let code = match &error {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    };
    let advice = match code.as_deref() {
        Some("42P01") => format!("{view} does not exist: run `tally migrate` (as the owner of tally's schema)"),
        Some("42501") => format!("the connected role may not read {view}: run `tally finance grant ROLE` as the owner of the views"),
        _ => format!("reading {view}"),
    };
    anyhow::Error::new(error).context(advice)
}

/// A text field as RFC 4180 writes it. A field a spreadsheet would run as a formula (it starts
/// with `=`, `+`, `-`, `@`, a tab or a carriage return: customer ids come from events, so from
/// anyone) gets a leading `'`, which spreadsheets show as text. A field that starts with `'`
/// gets one more, so taking the first `'` off always gives the id back.
fn csv_field(text: &str) -> std::borrow::Cow<'_, str> {
    let text: std::borrow::Cow<'_, str> =
        if text.starts_with(['=', '+', '-', '@', '\t', '\r', '\'']) {
            format!("'{text}").into()
        } else {
            text.into()
        };
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\"")).into()
    } else {
        text
    }
}

fn write_csv(out: &mut dyn Write, row: &StatementRow) -> std::io::Result<()> {
    let (customer, meter, aggregation, period, usage, events, billed, corrections) = row;
    writeln!(
        out,
        "{},{},{},{period},{usage},{events},{},{corrections}",
        csv_field(customer),
        csv_field(meter),
        aggregation.as_deref().unwrap_or(""),
        billed.as_deref().unwrap_or("")
    )
}

/// One object per line; decimals as JSON strings (exact), `events` as a number, a missing
/// value (aggregation of an unknown meter, billed of an unbilled one) as null.
fn write_json(
    out: &mut dyn Write,
    header: &[&str; 8],
    row: &StatementRow,
    first: bool,
) -> std::io::Result<()> {
    let (customer, meter, aggregation, period, usage, events, billed, corrections) = row;
    let text = |s: &str| serde_json::Value::from(s).to_string();
    let optional = |s: &Option<String>| s.as_deref().map_or_else(|| "null".to_owned(), text);
    let values = [
        text(customer),
        text(meter),
        optional(aggregation),
        text(period),
        text(usage),
        events.to_string(),
        optional(billed),
        text(corrections),
    ];
    let fields: Vec<String> = header
        .iter()
        .zip(values)
        .map(|(name, value)| format!("{}:{value}", text(name)))
        .collect();
    write!(
        out,
        "{}\n{{{}}}",
        if first { "" } else { "," },
        fields.join(",")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Datelike;

    #[test]
    fn role_names_follow_identifier_rules() {
        for good in ["finance", "Finance_RO", "_x", "a$1", &"a".repeat(63)] {
            assert_eq!(parse_role(good).as_deref(), Ok(good), "{good}");
        }
        for bad in [
            "",
            "1finance",
            "fin-ance",
            "fin ance",
            "finance\"; DROP TABLE usage_daily; --",
            "financé",
            "pg_read_all_data",
            "PG_x",
            &"a".repeat(64),
        ] {
            assert!(parse_role(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn months_are_yyyy_mm() {
        assert_eq!(
            parse_month("2026-11"),
            Ok(NaiveDate::from_ymd_opt(2026, 11, 1).unwrap())
        );
        for bad in [
            "2026-13",
            "2026-00",
            "2026-1",
            "26-11",
            "2026/11",
            "2026-11-01",
            "november",
            "",
        ] {
            let error = parse_month(bad).unwrap_err();
            assert!(error.contains("YYYY-MM"), "{bad}: {error}");
        }
        assert_eq!(parse_month("2026-12").unwrap().month(), 12);
    }

    #[test]
    fn identifiers_are_quoted_and_csv_fields_escaped() {
        assert_eq!(quote_ident("fin\"x"), "\"fin\"\"x\"");
        assert!(qualified_views("public").starts_with("\"public\".\"finance_billed_daily\", "));
        assert_eq!(csv_field("acme"), "acme");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(csv_field("@sum"), "'@sum");
        assert_eq!(csv_field("'quoted"), "''quoted");
    }
}
