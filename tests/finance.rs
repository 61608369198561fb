//! Finance, through the built `tally` binary against Postgres: `tally finance grant|revoke`
//! gives a role the finance_* views and nothing else (checked by connecting as that role), and
//! `tally export` writes a month exactly, as CSV and JSON, per day and per month, also when run
//! by the finance role, and again after a late event.

use std::process::Output;

use sqlx::{Connection, PgConnection};
use tally_db::testing::{fresh_database, TestDatabase};
use tally_tests::{runtime, tally_command};

/// Every finance view (docs/finance.md); the catalog must hold exactly these.
const FINANCE_VIEWS: [&str; 17] = [
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

/// Tables finance must not read directly: raw payloads, event ids, the outbox, the windows, and
/// the subscriptions, their history and the audit trail behind the subscription views.
const RAW_TABLES: [&str; 17] = [
    "usage_daily",
    "usage_minute",
    "usage_daily_values",
    "rejected_events",
    "stripe_submissions",
    "stripe_webhook_events",
    "stripe_meter_error_reports",
    "event_ids",
    "billing_corrections",
    "billing_repairs",
    "stripe_invoices",
    "meters",
    "plans",
    "subscriptions",
    "subscription_history",
    "entitlement_audit",
    "_sqlx_migrations",
];

/// `tally --database-url URL <args>` in an empty directory (no tally.toml).
fn tally(url: &str, args: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    tally_command()
        .current_dir(dir.path())
        .args(["--database-url", url])
        .args(args)
        .output()
        .expect("tally runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `tally` and returns its stdout; panics with its stderr when it fails.
fn tally_ok(url: &str, args: &[&str]) -> String {
    let output = tally(url, args);
    assert!(
        output.status.success(),
        "tally {args:?} failed: {}{}",
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

/// A LOGIN role with a unique name and a password, dropped (with its rights in the test's
/// database) when the test ends, also when it fails.
struct TestRole {
    name: String,
    password: String,
    admin_url: String,
}

impl TestRole {
    fn create(db: &TestDatabase) -> TestRole {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("tally_fin_{}_{nanos}_{n}", std::process::id());
        let password = format!("pw{nanos}");
        let role = TestRole {
            name,
            password,
            admin_url: db.url.clone(),
        };
        role.admin(&format!(
            "CREATE ROLE {} LOGIN PASSWORD '{}'",
            role.name, role.password
        ));
        role
    }

    /// The test database's URL, connecting as this role.
    fn url(&self) -> String {
        let (scheme, rest) = self.admin_url.split_once("://").unwrap();
        let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}:{}@{host}", self.name, self.password)
    }

    /// One statement as the test database's superuser (names here are the test's own).
    fn admin(&self, sql: &str) {
        let url = self.admin_url.clone();
        let sql = sql.to_owned();
        // Its own thread and runtime: this also runs from Drop, inside or outside a runtime.
        std::thread::spawn(move || {
            runtime().block_on(async {
                let mut conn = PgConnection::connect(&url).await.unwrap();
                sqlx::raw_sql(&sql).execute(&mut conn).await.unwrap();
            })
        })
        .join()
        .unwrap();
    }
}

impl Drop for TestRole {
    fn drop(&mut self) {
        let name = self.name.clone();
        let drop = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.admin(&format!("DROP OWNED BY {name}; DROP ROLE {name}"))
        }));
        if drop.is_err() {
            eprintln!("could not drop test role {name}");
        }
    }
}

/// SQLSTATE of running `sql` as `url`'s user, None when it succeeds.
async fn sqlstate(url: &str, sql: &str) -> Option<String> {
    let mut conn = PgConnection::connect(url).await.unwrap();
    match sqlx::raw_sql(sql).execute(&mut conn).await {
        Ok(_) => None,
        Err(sqlx::Error::Database(db)) => Some(db.code().unwrap_or_default().into_owned()),
        Err(other) => panic!("{sql}: {other}"),
    }
}

#[test]
fn the_finance_role_reads_every_finance_view_and_no_table() {
    let runtime = runtime();
    let db = runtime.block_on(fresh_database());

    // The views the role gets are all the finance_* views there are, and none shows a payload.
    let views: Vec<String> = runtime
        .block_on(
            sqlx::query_scalar(
                "SELECT viewname::text FROM pg_views
             WHERE schemaname = current_schema() AND viewname LIKE 'finance\\_%' ORDER BY 1",
            )
            .fetch_all(&db.pool),
        )
        .unwrap();
    assert_eq!(views, FINANCE_VIEWS);
    let exposed: Vec<String> = runtime
        .block_on(
            sqlx::query_scalar(
                "SELECT table_name || '.' || column_name FROM information_schema.columns
             WHERE table_name LIKE 'finance\\_%'
               AND column_name IN ('payload', 'raw', 'kafka_key', 'event_id', 'identifier',
                                   'payload_hash', 'last_error', 'sha256')",
            )
            .fetch_all(&db.pool),
        )
        .unwrap();
    assert!(exposed.is_empty(), "finance views expose {exposed:?}");

    let role = TestRole::create(&db);
    let as_role = role.url();
    for view in FINANCE_VIEWS {
        assert_eq!(
            runtime.block_on(sqlstate(&as_role, &format!("SELECT * FROM {view} LIMIT 1"))),
            Some("42501".to_owned()),
            "{view} is readable before any grant"
        );
    }

    let granted = tally_ok(&db.url, &["finance", "grant", &role.name]);
    assert!(
        granted.contains(&format!("granted {}", role.name)),
        "{granted}"
    );
    // Idempotent, and no warning: the role reads nothing else.
    let again = tally(&db.url, &["finance", "grant", &role.name]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        !text(&again.stderr).contains("warning"),
        "{}",
        text(&again.stderr)
    );

    for view in FINANCE_VIEWS {
        assert_eq!(
            runtime.block_on(sqlstate(&as_role, &format!("SELECT * FROM {view} LIMIT 1"))),
            None,
            "the role cannot read {view}"
        );
    }
    for table in RAW_TABLES {
        assert_eq!(
            runtime.block_on(sqlstate(
                &as_role,
                &format!("SELECT * FROM {table} LIMIT 1")
            )),
            Some("42501".to_owned()),
            "the role reads {table}"
        );
    }
    // The finance role runs the export itself.
    assert_eq!(
        tally_ok(&as_role, &["export", "--month", "2026-11"]),
        "customer_id,meter,aggregation,day,usage,events,billed,corrections\n"
    );

    // Rights granted elsewhere are reported, not silently accepted.
    role.admin(&format!("GRANT SELECT ON rejected_events TO {}", role.name));
    let warned = tally(&db.url, &["finance", "grant", &role.name]);
    assert!(warned.status.success());
    assert!(
        text(&warned.stderr).contains("can also read rejected_events"),
        "{}",
        text(&warned.stderr)
    );
    role.admin(&format!(
        "REVOKE SELECT ON rejected_events FROM {}",
        role.name
    ));

    let revoked = tally_ok(&db.url, &["finance", "revoke", &role.name]);
    assert!(
        revoked.contains(&format!("revoked from {}", role.name)),
        "{revoked}"
    );
    for view in FINANCE_VIEWS {
        assert_eq!(
            runtime.block_on(sqlstate(&as_role, &format!("SELECT * FROM {view} LIMIT 1"))),
            Some("42501".to_owned()),
            "{view} is still readable after revoke"
        );
    }
    let export = tally(&as_role, &["export", "--month", "2026-11"]);
    assert!(!export.status.success());
    assert!(
        text(&export.stderr).contains("tally finance grant"),
        "{}",
        text(&export.stderr)
    );
    // Revoking again changes nothing and succeeds.
    tally_ok(&db.url, &["finance", "revoke", &role.name]);
}

#[test]
fn role_names_are_validated_and_must_name_a_role_that_is_not_the_owner() {
    let runtime = runtime();
    let db = runtime.block_on(fresh_database());
    for bad in [
        "finance\"; DROP TABLE usage_daily; --",
        "1finance",
        "fin-ance",
        "pg_read_all_data",
        "",
    ] {
        let output = tally(&db.url, &["finance", "grant", bad]);
        assert_eq!(output.status.code(), Some(2), "{bad:?} accepted");
        assert!(
            text(&output.stderr).contains("role name") || text(&output.stderr).contains("reserves"),
            "{bad:?}: {}",
            text(&output.stderr)
        );
    }
    let missing = tally(
        &db.url,
        &["finance", "grant", "no_such_role_for_tally_tests"],
    );
    assert!(!missing.status.success());
    assert!(
        text(&missing.stderr).contains("does not exist"),
        "{}",
        text(&missing.stderr)
    );
    // A user that does not own the views cannot grant: Postgres only warns, tally fails.
    let grantor = TestRole::create(&db);
    let target = TestRole::create(&db);
    let output = tally(&grantor.url(), &["finance", "grant", &target.name]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("connect as the owner of the views"),
        "{}",
        text(&output.stderr)
    );
    // The owner of the views (the test's superuser) is refused: revoking would strip tally.
    let owner: String = runtime
        .block_on(sqlx::query_scalar("SELECT current_user::text").fetch_one(&db.pool))
        .unwrap();
    let output = tally(&db.url, &["finance", "revoke", &owner]);
    assert!(!output.status.success());
    assert!(
        text(&output.stderr).contains("owns the finance views"),
        "{}",
        text(&output.stderr)
    );
}

/// A month of known usage: four aggregations, group keys, rows on either side of the month, a
/// customer whose id holds a comma, sent, canceled and pending submissions, and a correction.
async fn known_month(pool: &sqlx::PgPool) {
    sqlx::raw_sql(
        r#"
        INSERT INTO meters (name, aggregation, group_by, unique_dimension, stripe_event_name) VALUES
            ('api_calls', 'sum', '{}', NULL, 'api_calls'),
            ('storage_gb', 'max', '{region}', NULL, 'storage_gb'),
            ('seats', 'latest', '{team}', NULL, 'seats'),
            ('active_users', 'unique_count', '{}', 'user', 'active_users');

        INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count,
                                 latest_at, latest_id, first_updated, last_updated) VALUES
            ('acme', 'api_calls', '2026-10-31', '', 100, 9, NULL, NULL, now(), now()),
            ('acme', 'api_calls', '2026-11-01', '', 10.5, 3, NULL, NULL, now(), now()),
            ('acme', 'api_calls', '2026-11-02', '', 4, 2, NULL, NULL, now(), now()),
            ('acme', 'api_calls', '2026-12-01', '', 7, 1, NULL, NULL, now(), now()),
            ('acme', 'storage_gb', '2026-11-01', '{"region":"eu"}', 7, 1, NULL, NULL, now(), now()),
            ('acme', 'storage_gb', '2026-11-01', '{"region":"us"}', 9.25, 1, NULL, NULL, now(), now()),
            ('acme', 'storage_gb', '2026-11-30', '{"region":"eu"}', 3, 1, NULL, NULL, now(), now()),
            ('acme', 'seats', '2026-11-01', '{"team":"a"}', 5, 1, '2026-11-01T10:00:00Z', 'e1', now(), now()),
            ('acme', 'seats', '2026-11-02', '{"team":"a"}', 2, 1, '2026-11-02T09:00:00Z', 'e2', now(), now()),
            ('acme', 'seats', '2026-11-02', '{"team":"b"}', 4, 1, '2026-11-02T08:00:00Z', 'e3', now(), now()),
            ('beta, inc', 'active_users', '2026-11-01', '', 2, 2, NULL, NULL, now(), now()),
            ('beta, inc', 'active_users', '2026-11-02', '', 2, 2, NULL, NULL, now(), now());

        INSERT INTO usage_daily_values (customer_id, meter, day, group_key, value) VALUES
            ('beta, inc', 'active_users', '2026-11-01', '', 'u1'),
            ('beta, inc', 'active_users', '2026-11-01', '', 'u2'),
            ('beta, inc', 'active_users', '2026-11-02', '', 'u2'),
            ('beta, inc', 'active_users', '2026-11-02', '', 'u3');

        INSERT INTO stripe_submissions (identifier, customer_id, meter, slot_start, revision,
            stripe_customer_id, event_name, kind, cancels, value, event_timestamp, status, sent_at) VALUES
            ('tally:api_calls:acme:1:1', 'acme', 'api_calls', '2026-11-01T23:55:00Z', 1, 'cus_acme', 'api_calls', 'delta', NULL, 10, '2026-11-01T23:55:00Z', 'sent', '2026-11-02T00:01:00Z'),
            ('tally:api_calls:acme:2:1', 'acme', 'api_calls', '2026-11-02T00:00:00Z', 1, 'cus_acme', 'api_calls', 'delta', NULL, 5, '2026-11-02T00:00:00Z', 'sent', '2026-11-02T00:06:00Z'),
            ('tally:api_calls:acme:2:2', 'acme', 'api_calls', '2026-11-02T00:00:00Z', 2, 'cus_acme', 'api_calls', 'cancel', 'tally:api_calls:acme:2:1', 5, '2026-11-02T00:00:00Z', 'sent', '2026-11-02T01:06:00Z'),
            ('tally:api_calls:acme:2:3', 'acme', 'api_calls', '2026-11-02T00:00:00Z', 3, 'cus_acme', 'api_calls', 'delta', NULL, 4, '2026-11-02T00:00:00Z', 'sent', '2026-11-02T01:06:00Z'),
            ('tally:storage_gb:acme:1:1', 'acme', 'storage_gb', '2026-11-01T10:00:00Z', 1, 'cus_acme', 'storage_gb', 'last', NULL, 10, '2026-11-01T10:00:00Z', 'sent', '2026-11-01T10:06:00Z'),
            ('tally:storage_gb:acme:30:1', 'acme', 'storage_gb', '2026-11-30T12:00:00Z', 1, 'cus_acme', 'storage_gb', 'last', NULL, 3, '2026-11-30T12:00:00Z', 'pending', NULL);

        INSERT INTO billing_corrections (customer_id, meter, slot_start, overbilled, detail)
        VALUES ('acme', 'api_calls', '2026-11-02T00:00:00Z', 1, 'usage went down after billing');
        "#,
    )
    .execute(pool)
    .await
    .unwrap();
}

#[test]
fn export_writes_the_month_exactly() {
    let runtime = runtime();
    let db = runtime.block_on(fresh_database());
    runtime.block_on(known_month(&db.pool));

    let daily = tally_ok(&db.url, &["export", "--month", "2026-11"]);
    assert_eq!(
        daily,
        "customer_id,meter,aggregation,day,usage,events,billed,corrections\n\
         acme,api_calls,sum,2026-11-01,10.5,3,10,0\n\
         acme,api_calls,sum,2026-11-02,4,2,4,1\n\
         acme,seats,latest,2026-11-01,5,1,0,0\n\
         acme,seats,latest,2026-11-02,2,2,0,0\n\
         acme,storage_gb,max,2026-11-01,9.25,2,10,0\n\
         acme,storage_gb,max,2026-11-30,3,1,0,0\n\
         \"beta, inc\",active_users,unique_count,2026-11-01,2,2,,0\n\
         \"beta, inc\",active_users,unique_count,2026-11-02,2,2,,0\n"
    );
    assert_eq!(
        tally_ok(
            &db.url,
            &[
                "export",
                "--month",
                "2026-11",
                "--format",
                "csv",
                "--granularity",
                "day"
            ]
        ),
        daily,
        "the defaults are csv and day"
    );

    // A month: sums added, max the month's largest, latest the month's last event, distinct
    // users recounted (u1, u2, u3: 3, not 2 + 2), billed as Stripe holds it.
    let monthly = "customer_id,meter,aggregation,month,usage,events,billed,corrections\n\
         acme,api_calls,sum,2026-11,14.5,5,14,1\n\
         acme,seats,latest,2026-11,2,3,0,0\n\
         acme,storage_gb,max,2026-11,9.25,3,10,0\n\
         \"beta, inc\",active_users,unique_count,2026-11,3,4,,0\n";
    assert_eq!(
        tally_ok(
            &db.url,
            &["export", "--month", "2026-11", "--granularity", "month"]
        ),
        monthly
    );
    let json = tally_ok(
        &db.url,
        &[
            "export",
            "--month",
            "2026-11",
            "--granularity",
            "month",
            "--format",
            "json",
        ],
    );
    assert_eq!(
        json,
        "[\n\
         {\"customer_id\":\"acme\",\"meter\":\"api_calls\",\"aggregation\":\"sum\",\"month\":\"2026-11\",\"usage\":\"14.5\",\"events\":5,\"billed\":\"14\",\"corrections\":\"1\"},\n\
         {\"customer_id\":\"acme\",\"meter\":\"seats\",\"aggregation\":\"latest\",\"month\":\"2026-11\",\"usage\":\"2\",\"events\":3,\"billed\":\"0\",\"corrections\":\"0\"},\n\
         {\"customer_id\":\"acme\",\"meter\":\"storage_gb\",\"aggregation\":\"max\",\"month\":\"2026-11\",\"usage\":\"9.25\",\"events\":3,\"billed\":\"10\",\"corrections\":\"0\"},\n\
         {\"customer_id\":\"beta, inc\",\"meter\":\"active_users\",\"aggregation\":\"unique_count\",\"month\":\"2026-11\",\"usage\":\"3\",\"events\":4,\"billed\":null,\"corrections\":\"0\"}\n\
         ]\n"
    );
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(parsed.as_array().unwrap().len(), 4);

    // --output: the same bytes in the file, nothing on stdout.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("2026-11.csv");
    let stdout = tally_ok(
        &db.url,
        &[
            "export",
            "--month",
            "2026-11",
            "--granularity",
            "month",
            "--output",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(stdout, "");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), monthly);

    // An empty month: the header only (and an empty JSON array).
    assert_eq!(
        tally_ok(&db.url, &["export", "--month", "2026-09"]),
        "customer_id,meter,aggregation,day,usage,events,billed,corrections\n"
    );
    assert_eq!(
        tally_ok(
            &db.url,
            &["export", "--month", "2026-09", "--granularity", "month"]
        ),
        "customer_id,meter,aggregation,month,usage,events,billed,corrections\n"
    );
    assert_eq!(
        tally_ok(
            &db.url,
            &["export", "--month", "2026-09", "--format", "json"]
        ),
        "[]\n"
    );

    // A bad month names the format.
    for bad in ["2026-13", "2026-1", "11/2026", "2026-11-01"] {
        let output = tally(&db.url, &["export", "--month", bad]);
        assert_eq!(output.status.code(), Some(2), "{bad} accepted");
        assert!(
            text(&output.stderr).contains("YYYY-MM"),
            "{}",
            text(&output.stderr)
        );
    }

    // A late event: usage of 2026-11-02 arrives on 2026-12-03, after the month was exported.
    // It lands on its own day; the sink bills it as a new revision of the slot. A re-export
    // differs in that one line, and finance_billed_daily shows when the extra units were sent.
    runtime.block_on(async {
        sqlx::raw_sql(
            "UPDATE usage_daily SET value = value + 3, event_count = event_count + 1
             WHERE customer_id = 'acme' AND meter = 'api_calls' AND day = '2026-11-02';
             INSERT INTO stripe_submissions (identifier, customer_id, meter, slot_start, revision,
                 stripe_customer_id, event_name, kind, value, event_timestamp, status, sent_at)
             VALUES ('tally:api_calls:acme:2:4', 'acme', 'api_calls', '2026-11-02T00:00:00Z', 4,
                 'cus_acme', 'api_calls', 'delta', 3, '2026-11-02T00:00:00Z', 'sent',
                 '2026-12-03T08:00:00Z');",
        )
        .execute(&db.pool)
        .await
        .unwrap();
    });
    let again = tally_ok(&db.url, &["export", "--month", "2026-11"]);
    let changed: Vec<(&str, &str)> = daily
        .lines()
        .zip(again.lines())
        .filter(|(before, after)| before != after)
        .collect();
    assert_eq!(
        changed,
        [(
            "acme,api_calls,sum,2026-11-02,4,2,4,1",
            "acme,api_calls,sum,2026-11-02,7,3,7,1"
        )]
    );
    let (units, last_sent): (String, String) = runtime
        .block_on(
            sqlx::query_as(
                "SELECT units_sent::text, to_char(last_sent_at AT TIME ZONE 'UTC', 'YYYY-MM-DD')
                 FROM finance_billed_daily
                 WHERE customer_id = 'acme' AND meter = 'api_calls' AND period = '2026-11-02'",
            )
            .fetch_one(&db.pool),
        )
        .unwrap();
    assert_eq!((units.as_str(), last_sent.as_str()), ("7", "2026-12-03"));
}

/// Plans as `tally plans apply` writes them: PRO monthly, ENT yearly (a price that does not
/// divide by 12), FREE without a price.
async fn priced_plans(pool: &sqlx::PgPool) {
    let plans: Vec<tally_billing::PlanDefinition> = serde_json::from_value(serde_json::json!([
        { "name": "FREE" },
        { "name": "PRO", "price": { "amount": "49.00", "currency": "usd", "interval": "month" } },
        { "name": "ENT", "price": { "amount": "1000.00", "currency": "usd", "interval": "year" } },
    ]))
    .unwrap();
    tally_billing::apply_plans(pool, &plans, "test")
        .await
        .unwrap();
}

/// A subscription whose plan and status change at the given UTC times (the first is its
/// start), written as the lifecycle writes them: each step's `status_since` is when it took
/// effect, and the database keeps `subscription_history`.
async fn subscription_steps(pool: &sqlx::PgPool, customer: &str, steps: &[(&str, &str, &str)]) {
    let (plan, status, at) = steps[0];
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO subscriptions (customer_id, plan, status, billing_anchor, started_at,
             current_period_start, current_period_end, status_since)
         VALUES ($1, $2, $3, $4::timestamptz, $4::timestamptz, $4::timestamptz,
                 $4::timestamptz + interval '1 month', $4::timestamptz)
         RETURNING subscription_id",
    )
    .bind(customer)
    .bind(plan)
    .bind(status)
    .bind(at)
    .fetch_one(pool)
    .await
    .unwrap();
    for (plan, status, at) in &steps[1..] {
        sqlx::query(
            "UPDATE subscriptions SET plan = $2, status = $3, status_since = $4::timestamptz
             WHERE subscription_id = $1",
        )
        .bind(id)
        .bind(plan)
        .bind(status)
        .bind(at)
        .execute(pool)
        .await
        .unwrap();
    }
}

/// Rows of a view for 2026-11-01 to 2026-11-05, every column as text, in `order`.
async fn early_november(pool: &sqlx::PgPool, view: &str, columns: &str) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT concat_ws(' ', {columns}) FROM {view}
         WHERE day BETWEEN '2026-11-01' AND '2026-11-05' ORDER BY day, plan"
    ))
    .fetch_all(pool)
    .await
    .unwrap()
}

#[test]
fn subscription_views_count_the_end_of_each_utc_day_and_price_mrr() {
    let runtime = runtime();
    let db = runtime.block_on(fresh_database());
    runtime.block_on(async {
        priced_plans(&db.pool).await;
        // a: a PRO trial that converts at midnight, moves to ENT, and is canceled a second
        //    before the 5th ends.
        subscription_steps(
            &db.pool,
            "a",
            &[
                ("PRO", "trialing", "2026-11-01T10:00:00Z"),
                ("PRO", "active", "2026-11-03T00:00:00Z"),
                ("ENT", "active", "2026-11-04T12:00:00Z"),
                ("ENT", "canceled", "2026-11-05T23:59:59Z"),
            ],
        )
        .await;
        // b: started and canceled the same day: never live at a day's end.
        subscription_steps(
            &db.pool,
            "b",
            &[
                ("PRO", "active", "2026-11-02T08:00:00Z"),
                ("PRO", "canceled", "2026-11-02T20:00:00Z"),
            ],
        )
        .await;
        // c: ENT, past due from the 4th (Stripe's status).
        subscription_steps(
            &db.pool,
            "c",
            &[
                ("ENT", "active", "2026-11-01T00:00:00Z"),
                ("ENT", "past_due", "2026-11-04T09:00:00Z"),
            ],
        )
        .await;
        // d: the unpriced FREE plan.
        subscription_steps(&db.pool, "d", &[("FREE", "active", "2026-11-02T00:00:00Z")]).await;
        // e: an ENT trial that expires.
        subscription_steps(
            &db.pool,
            "e",
            &[
                ("ENT", "trialing", "2026-11-03T05:00:00Z"),
                ("ENT", "canceled", "2026-11-04T05:00:00Z"),
            ],
        )
        .await;
        // f: ENT throughout.
        subscription_steps(&db.pool, "f", &[("ENT", "active", "2026-11-01T06:00:00Z")]).await;
    });

    // day plan active trialing past_due, at the end of each UTC day.
    let daily = runtime.block_on(early_november(
        &db.pool,
        "finance_subscriptions_daily",
        "day, plan, active, trialing, past_due",
    ));
    assert_eq!(
        daily,
        [
            "2026-11-01 ENT 2 0 0",
            "2026-11-01 PRO 0 1 0",
            "2026-11-02 ENT 2 0 0",
            "2026-11-02 FREE 1 0 0",
            "2026-11-02 PRO 0 1 0",
            "2026-11-03 ENT 2 1 0",
            "2026-11-03 FREE 1 0 0",
            "2026-11-03 PRO 1 0 0",
            "2026-11-04 ENT 2 0 1",
            "2026-11-04 FREE 1 0 0",
            "2026-11-05 ENT 1 0 1",
            "2026-11-05 FREE 1 0 0",
        ]
    );

    // Each step counted on its UTC day, under the plan the subscription was on before it
    // (its own plan for the first step): a's move from PRO to ENT is a plan change of PRO's.
    let events = runtime.block_on(early_november(
        &db.pool,
        "finance_subscription_events_daily",
        "day, plan, started, trials_started, trials_converted, trials_expired, cancellations, plan_changes",
    ));
    assert_eq!(
        events,
        [
            "2026-11-01 ENT 2 0 0 0 0 0",
            "2026-11-01 PRO 1 1 0 0 0 0",
            "2026-11-02 FREE 1 0 0 0 0 0",
            "2026-11-02 PRO 1 0 0 0 1 0",
            "2026-11-03 ENT 1 1 0 0 0 0",
            "2026-11-03 PRO 0 0 1 0 0 0",
            "2026-11-04 ENT 0 0 0 1 0 0",
            "2026-11-04 PRO 0 0 0 0 0 1",
            "2026-11-05 ENT 0 0 0 0 1 0",
        ]
    );

    // Active (not trialing, not past due) × price: monthly exact, yearly ARR exact and MRR the
    // plan's total / 12 to 6 places (2 × 1000.00 / 12 = 166.666667, not 2 × 83.333333).
    let columns = "day, plan, currency, paying_subscriptions, mrr, arr";
    let mrr = runtime.block_on(early_november(&db.pool, "finance_mrr_daily", columns));
    assert_eq!(
        mrr,
        [
            "2026-11-01 ENT usd 2 166.666667 2000.00",
            "2026-11-02 ENT usd 2 166.666667 2000.00",
            "2026-11-03 ENT usd 2 166.666667 2000.00",
            "2026-11-03 PRO usd 1 49.00 588.00",
            "2026-11-04 ENT usd 2 166.666667 2000.00",
            "2026-11-05 ENT usd 1 83.333333 1000.00",
        ]
    );

    // The finance role reads the same rows through the views, and not the history behind them.
    let role = TestRole::create(&db);
    tally_ok(&db.url, &["finance", "grant", &role.name]);
    let as_role = runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&role.url()).await.unwrap();
        let rows = early_november(&pool, "finance_mrr_daily", columns).await;
        pool.close().await;
        rows
    });
    assert_eq!(as_role, mrr);
    for table in ["subscription_history", "subscriptions", "plans"] {
        assert_eq!(
            runtime.block_on(sqlstate(
                &role.url(),
                &format!("SELECT * FROM {table} LIMIT 1")
            )),
            Some("42501".to_owned()),
            "the role reads {table}"
        );
    }

    // Prices are the plans' as last applied: a new price restates every past day.
    runtime.block_on(async {
        let plans: Vec<tally_billing::PlanDefinition> = serde_json::from_value(serde_json::json!([
            { "name": "FREE" },
            { "name": "PRO", "price": { "amount": "59.00", "currency": "usd", "interval": "month" } },
            { "name": "ENT", "price": { "amount": "1000.00", "currency": "usd", "interval": "year" } },
        ]))
        .unwrap();
        tally_billing::apply_plans(&db.pool, &plans, "test").await.unwrap();
    });
    let repriced = runtime.block_on(early_november(&db.pool, "finance_mrr_daily", columns));
    assert!(
        repriced.contains(&"2026-11-03 PRO usd 1 59.00 708.00".to_owned()),
        "{repriced:?}"
    );
}

#[test]
fn docs_name_every_finance_view_and_column() {
    let runtime = runtime();
    let db = runtime.block_on(fresh_database());
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/finance.md"),
    )
    .unwrap();
    let columns: Vec<(String, String)> = runtime
        .block_on(
            sqlx::query_as(
                "SELECT table_name::text, column_name::text FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name LIKE 'finance\\_%'
                 ORDER BY table_name, ordinal_position",
            )
            .fetch_all(&db.pool),
        )
        .unwrap();
    assert!(columns.len() > 50, "{columns:?}");
    let missing: Vec<String> = columns
        .iter()
        .filter(|(view, column)| {
            !docs.contains(&format!("`{view}`")) || !docs.contains(&format!("`{column}`"))
        })
        .map(|(view, column)| format!("{view}.{column}"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/finance.md does not name {missing:?}"
    );
}
