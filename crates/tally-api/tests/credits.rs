//! Prepaid credits through the API, in process through the router: grants (idempotent per
//! key, by body or `Idempotency-Key`), voids, the balance, the paged ledger, the invoice
//! preview's credited usage, who may call what, and a check under `credits` enforcement that
//! sees a grant at once. Every answer is checked against the OpenAPI document.

use axum::http::StatusCode;
use chrono::{DurationRound, TimeDelta, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tally_billing::testing::subscribe;
use tally_billing::{apply_plans, PlanDefinition};
use tally_credits::queue::CountedUsage;
use tally_credits::{RateCard, RateDefinition};
mod common;
use common::{ACME, ADMIN, BETA, GATEWAY};

const GRANTS: &str = "/v1/customers/{id}/credits/grants";
const VOID: &str = "/v1/customers/{id}/credits/grants/{grant_id}/void";
const BALANCE: &str = "/v1/customers/{id}/credits";
const LEDGER: &str = "/v1/customers/{id}/credits/ledger";

struct Api {
    _db: tally_db::testing::TestDatabase,
    pool: sqlx::PgPool,
    api: common::AdminApi,
}

impl Api {
    /// Meters `api_calls` (priced on the invoice and in credits, 0.5 credits a call) and
    /// `tokens` (credits enforcement, 0.01 credits a token); acme on PRO, gamma on METERED.
    async fn start() -> Api {
        let db = tally_db::testing::fresh_database().await;
        sqlx::query(
            "INSERT INTO meters (name, aggregation, stripe_event_name) VALUES
                ('api_calls', 'sum', 'api_calls'), ('tokens', 'sum', 'tokens')",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        let plans: Vec<PlanDefinition> = serde_json::from_value(json!([
            { "name": "PRO", "features": { "api": true },
              "limits": { "api_calls": { "limit": "1000000", "period": "month", "unit_price": "0.01" } } },
            { "name": "METERED", "limits": { "tokens": { "enforcement": "credits" } } }
        ]))
        .unwrap();
        apply_plans(&db.pool, &plans, "test").await.unwrap();
        let rate = |meter: &str, per_unit: &str| RateDefinition {
            meter: meter.into(),
            credits_per_unit: per_unit.parse().unwrap(),
            dimensions: Default::default(),
        };
        tally_credits::rates::record(
            &db.pool,
            &[rate("api_calls", "0.5"), rate("tokens", "0.01")],
        )
        .await
        .unwrap();
        let period_start = Utc::now() - TimeDelta::days(1);
        subscribe(&db.pool, "acme", "PRO", period_start).await;
        subscribe(&db.pool, "gamma", "METERED", period_start).await;
        let api = common::AdminApi::new(&db.pool, None).await;
        let pool = db.pool.clone();
        Api { _db: db, pool, api }
    }

    async fn call_with(
        &self,
        method: &str,
        template: &str,
        path: &str,
        token: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.api
            .call_with(method, template, path, token, headers, body)
            .await
    }

    async fn call(
        &self,
        method: &str,
        template: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        self.api.call(method, template, path, token, body).await
    }

    async fn grant(&self, customer: &str, body: Value) -> (StatusCode, Value) {
        let path = format!("/v1/customers/{customer}/credits/grants");
        self.call("POST", GRANTS, &path, ADMIN, Some(body)).await
    }

    async fn void(&self, customer: &str, grant_id: &str, body: Value) -> (StatusCode, Value) {
        let path = format!("/v1/customers/{customer}/credits/grants/{grant_id}/void");
        self.call("POST", VOID, &path, ADMIN, Some(body)).await
    }

    async fn balance(&self, customer: &str, token: &str) -> (StatusCode, Value) {
        let path = format!("/v1/customers/{customer}/credits");
        self.call("GET", BALANCE, &path, token, None).await
    }

    async fn ledger(&self, customer: &str, query: &str, token: &str) -> (StatusCode, Value) {
        let path = format!("/v1/customers/{customer}/credits/ledger{query}");
        self.call("GET", LEDGER, &path, token, None).await
    }

    /// Usage the aggregator would have committed this minute, burned as the burner does.
    async fn burn(&self, customer: &str, meter: &str, quantity: i64) {
        let usage = [CountedUsage {
            customer,
            meter,
            group_key: "",
            window_start: Utc::now().duration_trunc(TimeDelta::minutes(1)).unwrap(),
            quantity: Decimal::from(quantity),
        }];
        let mut tx = self.pool.begin().await.unwrap();
        tally_credits::queue::enqueue(&mut tx, &usage)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let rates = RateCard::load(&self.pool).await.unwrap();
        let (report, _) = tally_credits::burn_once(&self.pool, &rates).await.unwrap();
        assert_eq!(report.queued, 1, "{report:?}");
    }
}

fn decimal(value: &Value) -> Decimal {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{value} is not a decimal string"))
        .parse()
        .unwrap()
}

fn code(answer: &(StatusCode, Value)) -> (StatusCode, Option<&str>) {
    (answer.0, answer.1["code"].as_str())
}

#[tokio::test]
async fn a_grant_is_made_once_per_idempotency_key() {
    let api = Api::start().await;
    let top_up = json!({ "kind": "purchased", "amount": "100", "idempotency_key": "order-1",
                         "description": "order 1", "reason": "paid invoice 1" });
    let (status, first) = api.grant("acme", top_up.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    assert_eq!(
        (
            first["customer"].as_str(),
            first["kind"].as_str(),
            first["priority"].as_i64()
        ),
        (Some("acme"), Some("purchased"), Some(10))
    );
    assert_eq!(decimal(&first["amount"]), Decimal::from(100));
    assert_eq!(decimal(&first["remaining"]), Decimal::from(100));
    assert_eq!(first["granted_by"], "token:ops");
    assert_eq!(first["reason"], "paid invoice 1");

    // The same top-up sent again: the first grant, nothing new.
    let (status, again) = api.grant("acme", top_up.clone()).await;
    assert_eq!(status, StatusCode::OK, "{again}");
    assert_eq!(again["grant_id"], first["grant_id"]);
    // The same key for a different grant is refused, naming the fix.
    let mut other = top_up.clone();
    other["amount"] = json!("50");
    let conflict = api.grant("acme", other).await;
    assert_eq!(
        code(&conflict),
        (StatusCode::CONFLICT, Some("IDEMPOTENCY_CONFLICT"))
    );
    assert!(
        conflict.1["message"]
            .as_str()
            .unwrap()
            .contains("use a new key"),
        "{}",
        conflict.1
    );
    // The same key for another customer is another grant.
    let (status, beta) = api.grant("beta", top_up.clone()).await;
    assert_eq!(status, StatusCode::CREATED, "{beta}");
    assert_ne!(beta["grant_id"], first["grant_id"]);

    // The key in the Idempotency-Key header instead, and a JSON number read exactly.
    let by_header = json!({ "kind": "promotional", "amount": 12.345678901,
                            "expires_at": (Utc::now() + TimeDelta::days(30)).to_rfc3339(),
                            "reason": "launch promotion" });
    let headers = [("idempotency-key", "promo-1")];
    let path = "/v1/customers/acme/credits/grants";
    let (status, promo) = api
        .call_with(
            "POST",
            GRANTS,
            path,
            ADMIN,
            &headers,
            Some(by_header.clone()),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{promo}");
    assert_eq!(promo["idempotency_key"], "promo-1");
    assert_eq!(promo["amount"], "12.345678901");
    let (status, repeat) = api
        .call_with(
            "POST",
            GRANTS,
            path,
            ADMIN,
            &headers,
            Some(by_header.clone()),
        )
        .await;
    assert_eq!(
        (status, &repeat["grant_id"]),
        (StatusCode::OK, &promo["grant_id"])
    );
    let mut both = by_header.clone();
    both["idempotency_key"] = json!("promo-2");
    let differ = api
        .call_with("POST", GRANTS, path, ADMIN, &headers, Some(both))
        .await;
    assert_eq!(
        code(&differ),
        (StatusCode::BAD_REQUEST, Some("INVALID_GRANT"))
    );

    // The balance holds both acme grants, in draw order (purchased before promotional).
    let (status, balance) = api.balance("acme", ADMIN).await;
    assert_eq!(status, StatusCode::OK, "{balance}");
    assert_eq!(
        decimal(&balance["available"]),
        "112.345678901".parse::<Decimal>().unwrap()
    );
    assert_eq!(
        decimal(&balance["projected"]),
        decimal(&balance["available"])
    );
    let kinds: Vec<&str> = balance["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["purchased", "promotional"]);
    // The ledger holds one grant entry per grant made, repeats and refusals none.
    let (_, ledger) = api.ledger("acme", "", ADMIN).await;
    let entries: Vec<(&str, &str)> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap(), e["actor"].as_str().unwrap()))
        .collect();
    assert_eq!(entries, [("grant", "token:ops"), ("grant", "token:ops")]);
}

#[tokio::test]
async fn invalid_grants_are_refused_with_stable_codes() {
    let api = Api::start().await;
    let valid =
        json!({ "kind": "purchased", "amount": "10", "idempotency_key": "k", "reason": "r" });
    let with = |field: &str, value: Value| {
        let mut body = valid.clone();
        body[field] = value;
        body
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(field);
        body
    };
    let refused = StatusCode::BAD_REQUEST;
    let cases = [
        (with("amount", json!("0")), refused, "INVALID_GRANT"),
        (with("amount", json!("-5")), refused, "INVALID_GRANT"),
        (with("amount", json!("1e3")), refused, "INVALID_GRANT"),
        (
            with("amount", json!("0.0000000001")),
            refused,
            "INVALID_GRANT",
        ),
        (
            with("amount", json!("79228162514264337593543950336")),
            refused,
            "INVALID_GRANT",
        ),
        (with("amount", json!(true)), refused, "INVALID_GRANT"),
        (with("priority", json!(1001)), refused, "INVALID_GRANT"),
        (
            with("expires_at", json!("2020-01-01T00:00:00Z")),
            refused,
            "INVALID_GRANT",
        ),
        // Only purchased credits may never expire.
        (with("kind", json!("promotional")), refused, "INVALID_GRANT"),
        (without("idempotency_key"), refused, "INVALID_GRANT"),
        (with("idempotency_key", json!("")), refused, "INVALID_GRANT"),
        (with("reason", json!("  ")), refused, "REASON_REQUIRED"),
        (
            without("reason"),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            with("kind", json!("gold")),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            with("extra", json!(1)),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
    ];
    for (body, status, expected) in cases {
        let answer = api.grant("acme", body.clone()).await;
        assert_eq!(code(&answer), (status, Some(expected)), "{body}");
    }
    // A customer id events could never carry.
    let answer = api
        .call(
            "POST",
            GRANTS,
            "/v1/customers/a%01b/credits/grants",
            ADMIN,
            Some(valid.clone()),
        )
        .await;
    assert_eq!(
        code(&answer),
        (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST"))
    );
    let answer = api.balance("a%01b", ADMIN).await;
    assert_eq!(
        code(&answer),
        (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST"))
    );
    // Nothing of it was granted.
    let (_, ledger) = api.ledger("acme", "", ADMIN).await;
    assert_eq!(ledger["entries"], json!([]));
    assert_eq!(ledger["next_after"], Value::Null);
}

#[tokio::test]
async fn a_grant_is_voided_once_and_what_was_consumed_stays_consumed() {
    let api = Api::start().await;
    let (_, grant) = api
        .grant(
            "acme",
            json!({ "kind": "purchased", "amount": "10", "idempotency_key": "k1", "reason": "r" }),
        )
        .await;
    let id = grant["grant_id"].as_i64().unwrap().to_string();
    // 6 calls at 0.5 credits: 3 credits drawn.
    api.burn("acme", "api_calls", 6).await;

    let (status, voided) = api.void("acme", &id, json!({ "reason": "refunded" })).await;
    assert_eq!(status, StatusCode::OK, "{voided}");
    assert_eq!(voided["closed_as"], "voided");
    assert_eq!(decimal(&voided["remaining"]), Decimal::ZERO);
    let again = api.void("acme", &id, json!({ "reason": "twice" })).await;
    assert_eq!(code(&again), (StatusCode::CONFLICT, Some("GRANT_CLOSED")));

    let unknown = api.void("acme", "999999", json!({ "reason": "r" })).await;
    assert_eq!(
        code(&unknown),
        (StatusCode::NOT_FOUND, Some("NO_SUCH_GRANT"))
    );
    // Another customer's grant is not found under this one.
    let (_, beta) = api
        .grant(
            "beta",
            json!({ "kind": "purchased", "amount": "5", "idempotency_key": "k1", "reason": "r" }),
        )
        .await;
    let beta_id = beta["grant_id"].as_i64().unwrap().to_string();
    let elsewhere = api.void("acme", &beta_id, json!({ "reason": "r" })).await;
    assert_eq!(
        code(&elsewhere),
        (StatusCode::NOT_FOUND, Some("NO_SUCH_GRANT"))
    );
    let not_a_number = api.void("acme", "abc", json!({ "reason": "r" })).await;
    assert_eq!(
        code(&not_a_number),
        (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST"))
    );
    let no_reason = api.void("beta", &beta_id, json!({ "reason": "" })).await;
    assert_eq!(
        code(&no_reason),
        (StatusCode::BAD_REQUEST, Some("REASON_REQUIRED"))
    );

    // The ledger: +10 granted, -3 consumed for the calls, -7 voided by the token, with why.
    let (_, ledger) = api.ledger("acme", "", ADMIN).await;
    let entries: Vec<(&str, Decimal, &str)> = ledger["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap(),
                decimal(&e["amount"]),
                e["actor"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("grant", Decimal::from(10), "token:ops"),
            ("consume", Decimal::from(-3), "burner"),
            ("void", Decimal::from(-7), "token:ops"),
        ]
    );
    assert_eq!(ledger["entries"][1]["quantity"], "6");
    assert_eq!(ledger["entries"][2]["reason"], "refunded");
    let (_, balance) = api.balance("acme", ADMIN).await;
    assert_eq!(decimal(&balance["available"]), Decimal::ZERO);
    assert_eq!(balance["grants"], json!([]));
}

#[tokio::test]
async fn the_ledger_is_read_in_pages() {
    let api = Api::start().await;
    for n in 1..=5 {
        let (status, _) = api
            .grant(
                "acme",
                json!({ "kind": "purchased", "amount": n.to_string(), "idempotency_key": format!("k{n}"), "reason": "r" }),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let mut amounts = Vec::new();
    let mut after: Option<i64> = None;
    let mut pages = 0;
    loop {
        let query = match after {
            Some(after) => format!("?limit=2&after={after}"),
            None => "?limit=2".to_owned(),
        };
        let (status, page) = api.ledger("acme", &query, ADMIN).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let entries = page["entries"].as_array().unwrap();
        assert!(entries.len() <= 2);
        if entries.is_empty() {
            assert_eq!(page["next_after"], Value::Null);
            break;
        }
        assert_eq!(
            page["next_after"],
            entries.last().unwrap()["transaction_id"]
        );
        amounts.extend(entries.iter().map(|e| decimal(&e["amount"])));
        after = page["next_after"].as_i64();
        pages += 1;
    }
    assert_eq!(pages, 3);
    let expected: Vec<Decimal> = (1..=5).map(Decimal::from).collect();
    assert_eq!(amounts, expected, "every entry once, oldest first");

    for query in [
        "?limit=0",
        "?limit=1001",
        "?after=-1",
        "?after=x",
        "?page=2",
    ] {
        let answer = api.ledger("acme", query, ADMIN).await;
        assert_eq!(
            code(&answer),
            (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST")),
            "{query}"
        );
    }
}

#[tokio::test]
async fn admins_grant_and_void_customers_read_their_own_credits() {
    let api = Api::start().await;
    let body =
        json!({ "kind": "purchased", "amount": "10", "idempotency_key": "k", "reason": "r" });
    for token in [GATEWAY, ACME] {
        let answer = api
            .call(
                "POST",
                GRANTS,
                "/v1/customers/acme/credits/grants",
                token,
                Some(body.clone()),
            )
            .await;
        assert_eq!(code(&answer), (StatusCode::FORBIDDEN, Some("FORBIDDEN")));
        let answer = api
            .call(
                "POST",
                VOID,
                "/v1/customers/acme/credits/grants/1/void",
                token,
                Some(json!({ "reason": "r" })),
            )
            .await;
        assert_eq!(code(&answer), (StatusCode::FORBIDDEN, Some("FORBIDDEN")));
    }
    let no_token = common::call(
        &api.api.app,
        "GET",
        "/v1/customers/acme/credits",
        None,
        None,
    )
    .await;
    assert_eq!(no_token.status, StatusCode::UNAUTHORIZED);
    let (status, _) = api.grant("acme", body).await;
    assert_eq!(status, StatusCode::CREATED);

    // acme's own token reads acme's balance and ledger, and not beta's; not the operators'
    // side of them (who granted, why, under which idempotency key), which the admin reads.
    let (status, own) = api.balance("acme", ACME).await;
    assert_eq!(status, StatusCode::OK, "{own}");
    assert_eq!(decimal(&own["available"]), Decimal::from(10));
    for field in ["idempotency_key", "granted_by", "reason"] {
        assert!(own["grants"][0].get(field).is_none(), "{field}: {own}");
    }
    let (_, by_admin) = api.balance("acme", ADMIN).await;
    assert!(
        by_admin["grants"][0]["granted_by"].is_string(),
        "{by_admin}"
    );
    let (status, own) = api.ledger("acme", "", ACME).await;
    assert_eq!(status, StatusCode::OK, "{own}");
    assert_eq!(own["entries"].as_array().unwrap().len(), 1);
    for field in ["actor", "reason"] {
        assert!(own["entries"][0].get(field).is_none(), "{field}: {own}");
    }
    let (_, by_admin) = api.ledger("acme", "", ADMIN).await;
    assert!(by_admin["entries"][0]["actor"].is_string(), "{by_admin}");
    for answer in [
        api.balance("acme", BETA).await,
        api.ledger("acme", "", BETA).await,
        api.balance("beta", ACME).await,
    ] {
        assert_eq!(code(&answer), (StatusCode::FORBIDDEN, Some("FORBIDDEN")));
    }
    // A gateway shows balances where it checks; the ledger is the customer's and the admin's.
    let (status, by_gateway) = api.balance("acme", GATEWAY).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        by_gateway["grants"][0].get("reason").is_none(),
        "{by_gateway}"
    );
    let answer = api.ledger("acme", "", GATEWAY).await;
    assert_eq!(code(&answer), (StatusCode::FORBIDDEN, Some("FORBIDDEN")));
}

#[tokio::test]
async fn the_invoice_preview_bills_only_the_usage_credits_did_not_pay_for() {
    let api = Api::start().await;
    // 30 calls today on the invoice (0.01 each); a grant of 10 credits pays for 20 of them
    // (0.5 credits a call), the other 10 are uncovered (5 credits).
    sqlx::query(
        "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
         VALUES ('acme', 'api_calls', (now() AT TIME ZONE 'UTC')::date, '', 30, 30, now(), now())",
    )
    .execute(&api.pool)
    .await
    .unwrap();
    let (status, _) = api
        .grant(
            "acme",
            json!({ "kind": "purchased", "amount": "10", "idempotency_key": "k", "reason": "r" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    api.burn("acme", "api_calls", 30).await;

    let template = "/v1/customers/{id}/invoice-preview";
    let (status, preview) = api
        .call(
            "GET",
            template,
            "/v1/customers/acme/invoice-preview",
            ACME,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    let line = &preview["lines"][0];
    assert_eq!(line["meter"], "api_calls");
    assert_eq!(decimal(&line["quantity"]), Decimal::from(30));
    assert_eq!(decimal(&line["credited_quantity"]), Decimal::from(20));
    assert_eq!(decimal(&line["amount"]), "0.10".parse::<Decimal>().unwrap());
    assert_eq!(
        decimal(&preview["total"]),
        "0.10".parse::<Decimal>().unwrap()
    );
    let credits = &preview["credits"];
    assert_eq!(decimal(&credits["applied"]), Decimal::from(10));
    assert_eq!(decimal(&credits["uncovered"]), Decimal::from(5));
    assert_eq!(decimal(&credits["balance"]), Decimal::ZERO);

    // Committed but not yet burned usage lowers the projected balance, not `applied`.
    let (_, grant) = api
        .grant(
            "acme",
            json!({ "kind": "purchased", "amount": "4", "idempotency_key": "k2", "reason": "r" }),
        )
        .await;
    assert_eq!(grant["amount"], "4");
    let mut tx = api.pool.begin().await.unwrap();
    let window_start = Utc::now().duration_trunc(TimeDelta::minutes(1)).unwrap();
    let usage = [CountedUsage {
        customer: "acme",
        meter: "api_calls",
        group_key: "",
        window_start,
        quantity: Decimal::from(2),
    }];
    tally_credits::queue::enqueue(&mut tx, &usage)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let (_, balance) = api.balance("acme", ADMIN).await;
    assert_eq!(
        (
            decimal(&balance["available"]),
            decimal(&balance["pending"]),
            decimal(&balance["projected"]),
            decimal(&balance["uncovered"]),
        ),
        (
            Decimal::from(4),
            Decimal::from(1),
            Decimal::from(3),
            Decimal::from(5)
        )
    );
    // The customer's whole picture carries the same preview.
    let (status, customer) = api
        .call(
            "GET",
            "/v1/customers/{id}",
            "/v1/customers/acme",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{customer}");
    let preview = &customer["invoice_preview"];
    assert_eq!(decimal(&preview["credits"]["applied"]), Decimal::from(10));
    assert_eq!(decimal(&preview["credits"]["balance"]), Decimal::from(3));
    assert_eq!(
        decimal(&preview["lines"][0]["credited_quantity"]),
        Decimal::from(20)
    );
}

#[tokio::test]
async fn a_check_under_credits_enforcement_sees_a_grant_at_once() {
    let api = Api::start().await;
    let check = || json!({ "customer": "gamma", "meter": "tokens", "quantity": 500 });
    let refused = api
        .call(
            "POST",
            "/v1/quota/check",
            "/v1/quota/check",
            GATEWAY,
            Some(check()),
        )
        .await;
    assert_eq!(
        code(&refused),
        (StatusCode::PAYMENT_REQUIRED, Some("INSUFFICIENT_CREDITS")),
        "{}",
        refused.1
    );
    // 500 tokens cost 5 credits. The quota cache refreshes hourly here: only the grant's
    // invalidation lets this server see the new balance.
    let (status, _) = api
        .grant(
            "gamma",
            json!({ "kind": "purchased", "amount": "5", "idempotency_key": "k", "reason": "r" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, allowed) = api
        .call(
            "POST",
            "/v1/quota/check",
            "/v1/quota/check",
            GATEWAY,
            Some(check()),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{allowed}");
    // Counted locally: the next 500 are not covered.
    let refused = api
        .call(
            "POST",
            "/v1/quota/check",
            "/v1/quota/check",
            GATEWAY,
            Some(check()),
        )
        .await;
    assert_eq!(
        code(&refused),
        (StatusCode::PAYMENT_REQUIRED, Some("INSUFFICIENT_CREDITS"))
    );
    // A void takes the credits away on this server at once too.
    let (_, balance) = api.balance("gamma", GATEWAY).await;
    let id = balance["grants"][0]["grant_id"]
        .as_i64()
        .unwrap()
        .to_string();
    let (status, _) = api
        .void("gamma", &id, json!({ "reason": "chargeback" }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let small = json!({ "customer": "gamma", "meter": "tokens", "quantity": 1 });
    let refused = api
        .call(
            "POST",
            "/v1/quota/check",
            "/v1/quota/check",
            GATEWAY,
            Some(small),
        )
        .await;
    assert_eq!(
        code(&refused),
        (StatusCode::PAYMENT_REQUIRED, Some("INSUFFICIENT_CREDITS"))
    );
}
