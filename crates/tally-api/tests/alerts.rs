//! Usage alerts through the API, in process through the router: a customer's own rules (added,
//! listed, removed) beside its plan's, endpoints whose secret is shown once, the deliveries of
//! real firings (evaluated by `tally_alerts`, sent to a receiver in this test that verifies
//! every signature) listed by status in pages, who may call what, and validation. Every answer
//! is checked against the OpenAPI document.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tally_alerts::{AlertsConfig, Sender};
use tally_billing::testing::subscribe;
use tally_billing::{apply_plans, PlanDefinition};
use tally_credits::RateCard;
mod common;
use common::{ACME, ADMIN, BETA, GATEWAY};

const RULES: &str = "/v1/customers/{id}/alerts";
const RULE: &str = "/v1/customers/{id}/alerts/{rule_id}";
const ENDPOINTS: &str = "/v1/alerts/endpoints";
const ENDPOINT: &str = "/v1/alerts/endpoints/{endpoint_id}";
const DELIVERIES: &str = "/v1/alerts/deliveries";

const ON_PREMISES: tally_alerts::Destinations = tally_alerts::Destinations {
    allow_http: true,
    allow_private_networks: true,
};

/// The sender as `tally aggregate` runs it with `ON_PREMISES`.
fn on_premises_sender() -> Sender {
    Sender::new(&AlertsConfig {
        allow_http: true,
        allow_private_networks: true,
        ..AlertsConfig::default()
    })
}

struct Api {
    _db: tally_db::testing::TestDatabase,
    pool: sqlx::PgPool,
    api: common::AdminApi,
}

impl Api {
    /// Meters `api_calls` and `tokens`; plan PRO limits `api_calls` to 100 a day and alerts at
    /// 80 % of it and below 10 credits; acme is on PRO, beta has no subscription. Endpoints
    /// must be https and public (the defaults).
    async fn start() -> Api {
        Api::with_destinations(tally_alerts::Destinations::default()).await
    }

    /// [`Api::start`] for receivers on this machine (loopback, plain HTTP), as an operator
    /// allows with `alerts.allow_http` and `alerts.allow_private_networks`.
    async fn on_premises() -> Api {
        Api::with_destinations(ON_PREMISES).await
    }

    async fn with_destinations(destinations: tally_alerts::Destinations) -> Api {
        let db = tally_db::testing::fresh_database().await;
        sqlx::query(
            "INSERT INTO meters (name, aggregation, stripe_event_name) VALUES
                ('api_calls', 'sum', 'api_calls'), ('tokens', 'sum', 'tokens')",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        let plans: Vec<PlanDefinition> = serde_json::from_value(json!([
            { "name": "PRO", "limits": { "api_calls": { "limit": "100", "period": "day" } },
              "alerts": [{ "meter": "api_calls", "percent": "80" }, { "credit_balance_below": "10" }] }
        ]))
        .unwrap();
        apply_plans(&db.pool, &plans, "test").await.unwrap();
        subscribe(
            &db.pool,
            "acme",
            "PRO",
            Utc::now() - chrono::TimeDelta::days(1),
        )
        .await;
        let api = common::AdminApi::with_destinations(&db.pool, None, destinations).await;
        let pool = db.pool.clone();
        Api { _db: db, pool, api }
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

    async fn alerts(&self, customer: &str, token: &str) -> (StatusCode, Value) {
        let path = format!("/v1/customers/{customer}/alerts");
        self.call("GET", RULES, &path, token, None).await
    }

    async fn add_rule(&self, customer: &str, body: Value) -> (StatusCode, Value) {
        let path = format!("/v1/customers/{customer}/alerts");
        self.call("POST", RULES, &path, ADMIN, Some(body)).await
    }

    async fn delete_rule(&self, customer: &str, rule_id: &str) -> (StatusCode, Value) {
        let path = format!("/v1/customers/{customer}/alerts/{rule_id}");
        self.call("DELETE", RULE, &path, ADMIN, None).await
    }

    async fn add_endpoint(&self, body: Value) -> (StatusCode, Value) {
        self.call("POST", ENDPOINTS, ENDPOINTS, ADMIN, Some(body))
            .await
    }

    async fn delete_endpoint(&self, endpoint_id: &str) -> (StatusCode, Value) {
        let path = format!("/v1/alerts/endpoints/{endpoint_id}");
        self.call("DELETE", ENDPOINT, &path, ADMIN, None).await
    }

    async fn deliveries(&self, query: &str) -> (StatusCode, Value) {
        let path = format!("/v1/alerts/deliveries{query}");
        self.call("GET", DELIVERIES, &path, ADMIN, None).await
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

fn message(answer: &(StatusCode, Value)) -> &str {
    answer.1["message"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn own_rules_are_added_listed_and_removed_beside_the_plans() {
    let api = Api::start().await;
    // Before any rule of its own: the plan's, keyed as their firings will name them.
    let (status, alerts) = api.alerts("acme", ACME).await;
    assert_eq!(status, StatusCode::OK, "{alerts}");
    assert_eq!(alerts["customer"], "acme");
    assert_eq!(alerts["plan"], "PRO");
    assert_eq!(alerts["rules"], json!([]));
    assert_eq!(alerts["firings"], json!([]));
    assert_eq!(
        alerts["plan_rules"],
        json!([
            { "key": "plan:PRO:usage:api_calls:80", "meter": "api_calls", "percent": "80" },
            { "key": "plan:PRO:credit_balance:10", "credit_balance_below": "10" }
        ])
    );

    // A usage rule with a JSON number, a balance rule with a string, a percent read exactly.
    let (status, usage) = api
        .add_rule("acme", json!({ "meter": "api_calls", "percent": 50 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{usage}");
    assert_eq!(
        (
            usage["customer"].as_str(),
            usage["meter"].as_str(),
            usage["created_by"].as_str()
        ),
        (Some("acme"), Some("api_calls"), Some("token:ops"))
    );
    assert_eq!(decimal(&usage["percent"]), Decimal::from(50));
    assert!(usage.get("credit_balance_below").is_none(), "{usage}");
    let (status, balance) = api
        .add_rule("acme", json!({ "credit_balance_below": "12.5" }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{balance}");
    assert_eq!(balance["credit_balance_below"], "12.5");
    assert!(balance.get("meter").is_none(), "{balance}");
    let (status, exact) = api
        .add_rule(
            "acme",
            json!({ "meter": "tokens", "percent": 99.123456789 }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{exact}");
    assert_eq!(exact["percent"], "99.123456789");

    let (_, alerts) = api.alerts("acme", ADMIN).await;
    let ids: Vec<&Value> = alerts["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["rule_id"])
        .collect();
    assert_eq!(
        ids,
        [&usage["rule_id"], &balance["rule_id"], &exact["rule_id"]]
    );
    assert_eq!(alerts["plan_rules"].as_array().unwrap().len(), 2);

    // A customer without a live subscription has its own rules and no plan's.
    let (status, beta_rule) = api
        .add_rule("beta", json!({ "credit_balance_below": 0 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{beta_rule}");
    let (status, beta) = api.alerts("beta", BETA).await;
    assert_eq!(status, StatusCode::OK, "{beta}");
    assert_eq!(beta["plan"], Value::Null);
    assert_eq!(beta["plan_rules"], json!([]));
    assert_eq!(beta["rules"].as_array().unwrap().len(), 1);
    assert_eq!(beta["rules"][0]["rule_id"], beta_rule["rule_id"]);
    assert_eq!(beta["rules"][0]["credit_balance_below"], "0");

    // Removed once; a second time, or under another customer, it is not found.
    let id = usage["rule_id"].as_i64().unwrap().to_string();
    let (status, _) = api.delete_rule("acme", &id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let again = api.delete_rule("acme", &id).await;
    assert_eq!(
        code(&again),
        (StatusCode::NOT_FOUND, Some("NO_SUCH_ALERT_RULE"))
    );
    assert!(message(&again).contains("GET /v1/customers/{id}/alerts"));
    let beta_id = beta_rule["rule_id"].as_i64().unwrap().to_string();
    let elsewhere = api.delete_rule("acme", &beta_id).await;
    assert_eq!(
        code(&elsewhere),
        (StatusCode::NOT_FOUND, Some("NO_SUCH_ALERT_RULE"))
    );
    let not_a_number = api.delete_rule("acme", "abc").await;
    assert_eq!(
        code(&not_a_number),
        (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST"))
    );
    let (_, alerts) = api.alerts("acme", ADMIN).await;
    let ids: Vec<&Value> = alerts["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| &r["rule_id"])
        .collect();
    assert_eq!(ids, [&balance["rule_id"], &exact["rule_id"]]);
    let (_, beta) = api.alerts("beta", ADMIN).await;
    assert_eq!(beta["rules"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn invalid_rules_and_endpoints_are_refused_with_stable_codes() {
    let api = Api::start().await;
    let refused = StatusCode::BAD_REQUEST;
    let rules = [
        (
            json!({ "meter": "api_calls", "percent": 0 }),
            "INVALID_ALERT",
        ),
        (
            json!({ "meter": "api_calls", "percent": 1001 }),
            "INVALID_ALERT",
        ),
        (
            json!({ "meter": "api_calls", "percent": "-5" }),
            "INVALID_ALERT",
        ),
        (
            json!({ "meter": "api_calls", "percent": "1e3" }),
            "INVALID_ALERT",
        ),
        (
            json!({ "meter": "api_calls", "percent": true }),
            "INVALID_ALERT",
        ),
        (
            json!({ "meter": "api_calls", "percent": "79228162514264337593543950336" }),
            "INVALID_ALERT",
        ),
        // Both kinds at once, neither, half of one.
        (
            json!({ "meter": "api_calls", "percent": 80, "credit_balance_below": 10 }),
            "INVALID_ALERT",
        ),
        (json!({}), "INVALID_ALERT"),
        (json!({ "meter": "api_calls" }), "INVALID_ALERT"),
        (json!({ "percent": 80 }), "INVALID_ALERT"),
        (json!({ "meter": "nope", "percent": 80 }), "INVALID_ALERT"),
        (json!({ "credit_balance_below": "ten" }), "INVALID_ALERT"),
        (
            json!({ "credit_balance_below": "10000000000000000001" }),
            "INVALID_ALERT",
        ),
        (
            json!({ "credit_balance_below": 10, "extra": 1 }),
            "INVALID_REQUEST",
        ),
        (json!({ "meter": 5, "percent": 80 }), "INVALID_REQUEST"),
    ];
    for (body, expected) in rules {
        let answer = api.add_rule("acme", body.clone()).await;
        assert_eq!(code(&answer), (refused, Some(expected)), "{body}");
    }
    // The errors name the cause and the fix.
    let zero = api
        .add_rule("acme", json!({ "meter": "api_calls", "percent": 0 }))
        .await;
    assert!(
        message(&zero).contains("more than 0 and at most 1000"),
        "{}",
        zero.1
    );
    let unknown = api
        .add_rule("acme", json!({ "meter": "nope", "percent": 80 }))
        .await;
    assert!(message(&unknown).contains("\"nope\""), "{}", unknown.1);
    assert!(message(&unknown).contains("[[meters]]"), "{}", unknown.1);
    let both = api
        .add_rule(
            "acme",
            json!({ "meter": "api_calls", "percent": 80, "credit_balance_below": 1 }),
        )
        .await;
    assert!(message(&both).contains("give one of the two"), "{}", both.1);
    let not_plain = api
        .add_rule("acme", json!({ "meter": "api_calls", "percent": "1e3" }))
        .await;
    assert!(
        message(&not_plain).contains("percent \"1e3\""),
        "{}",
        not_plain.1
    );
    // A customer id events could never carry.
    let answer = api
        .call(
            "POST",
            RULES,
            "/v1/customers/a%01b/alerts",
            ADMIN,
            Some(json!({ "credit_balance_below": 1 })),
        )
        .await;
    assert_eq!(code(&answer), (refused, Some("INVALID_REQUEST")));
    let answer = api.alerts("a%01b", ADMIN).await;
    assert_eq!(code(&answer), (refused, Some("INVALID_REQUEST")));

    let endpoints = [
        (json!({ "url": "ftp://example.com/hook" }), "INVALID_ALERT"),
        (json!({ "url": "http://" }), "INVALID_ALERT"),
        (json!({ "url": "/hook" }), "INVALID_ALERT"),
        (json!({ "url": "not a url" }), "INVALID_ALERT"),
        (
            json!({ "url": format!("https://example.com/{}", "a".repeat(2000)) }),
            "INVALID_ALERT",
        ),
        (
            json!({ "url": "https://example.com/hook", "description": "x".repeat(1001) }),
            "INVALID_ALERT",
        ),
        (
            json!({ "url": "https://example.com/hook", "description": "a\u{7}b" }),
            "INVALID_ALERT",
        ),
        (json!({ "description": "no url" }), "INVALID_REQUEST"),
        (
            json!({ "url": "https://example.com/hook", "secret": "mine" }),
            "INVALID_REQUEST",
        ),
    ];
    for (body, expected) in endpoints {
        let answer = api.add_endpoint(body.clone()).await;
        assert_eq!(code(&answer), (refused, Some(expected)), "{body}");
    }
    let ftp = api
        .add_endpoint(json!({ "url": "ftp://example.com/hook" }))
        .await;
    assert!(
        message(&ftp).contains("must be an https:// URL with a host"),
        "{}",
        ftp.1
    );
    let not_a_number = api.delete_endpoint("abc").await;
    assert_eq!(code(&not_a_number), (refused, Some("INVALID_REQUEST")));

    // Nothing of it was stored.
    let (_, alerts) = api.alerts("acme", ADMIN).await;
    assert_eq!(alerts["rules"], json!([]));
    let (status, listed) = api.call("GET", ENDPOINTS, ENDPOINTS, ADMIN, None).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    assert_eq!(listed["endpoints"], json!([]));
}

#[tokio::test]
async fn an_endpoints_secret_is_shown_once() {
    let api = Api::start().await;
    let (status, created) = api
        .add_endpoint(
            json!({ "url": "https://hooks.example.com/tally", "description": "ops pager" }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let secret = created["secret"].as_str().unwrap().to_owned();
    let hex = secret.strip_prefix("whsec_").expect("a whsec_ secret");
    assert!(
        hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()),
        "{secret}"
    );
    assert_eq!(
        (
            created["url"].as_str(),
            created["description"].as_str(),
            created["created_by"].as_str()
        ),
        (
            Some("https://hooks.example.com/tally"),
            Some("ops pager"),
            Some("token:ops")
        )
    );
    // The secret shown is the one deliveries are signed with.
    let stored: String =
        sqlx::query_scalar("SELECT secret FROM alert_endpoints WHERE endpoint_id = $1")
            .bind(created["endpoint_id"].as_i64().unwrap())
            .fetch_one(&api.pool)
            .await
            .unwrap();
    assert_eq!(stored, secret);
    let (_, second) = api
        .add_endpoint(json!({ "url": "https://second.example.com/hook" }))
        .await;
    assert_ne!(second["secret"], created["secret"]);
    assert_eq!(second["description"], Value::Null);

    // Listed without it, ever.
    let (status, listed) = api.call("GET", ENDPOINTS, ENDPOINTS, ADMIN, None).await;
    assert_eq!(status, StatusCode::OK, "{listed}");
    let endpoints = listed["endpoints"].as_array().unwrap();
    assert_eq!(endpoints.len(), 2);
    assert_eq!(endpoints[0]["endpoint_id"], created["endpoint_id"]);
    assert_eq!(endpoints[0]["url"], "https://hooks.example.com/tally");
    assert_eq!(endpoints[1]["endpoint_id"], second["endpoint_id"]);
    for endpoint in endpoints {
        assert!(endpoint.get("secret").is_none(), "{endpoint}");
    }
    let text = listed.to_string();
    assert!(
        !text.contains(&secret) && !text.contains("whsec_"),
        "{text}"
    );

    // Deleted once; then not found, and no longer listed.
    let id = created["endpoint_id"].as_i64().unwrap().to_string();
    let (status, _) = api.delete_endpoint(&id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let again = api.delete_endpoint(&id).await;
    assert_eq!(
        code(&again),
        (StatusCode::NOT_FOUND, Some("NO_SUCH_ENDPOINT"))
    );
    assert!(message(&again).contains("GET /v1/alerts/endpoints"));
    let unknown = api.delete_endpoint("999999").await;
    assert_eq!(
        code(&unknown),
        (StatusCode::NOT_FOUND, Some("NO_SUCH_ENDPOINT"))
    );
    let (_, listed) = api.call("GET", ENDPOINTS, ENDPOINTS, ADMIN, None).await;
    let ids: Vec<&Value> = listed["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| &e["endpoint_id"])
        .collect();
    assert_eq!(ids, [&second["endpoint_id"]]);
}

/// One request a receiver took: its path, `Tally-Signature`, `Tally-Event-Id` and raw body.
type Taken = (String, String, String, Bytes);

/// A webhook receiver: `/ok` answers 200, `/down` 500; both keep what they were sent.
async fn receiver() -> (String, Arc<Mutex<Vec<Taken>>>) {
    async fn take(
        State((taken, answer)): State<(Arc<Mutex<Vec<Taken>>>, StatusCode)>,
        uri: axum::http::Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> StatusCode {
        let header = |name: &str| {
            headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default()
        };
        taken.lock().unwrap().push((
            uri.path().to_owned(),
            header("tally-signature"),
            header("tally-event-id"),
            body,
        ));
        answer
    }
    let taken = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new()
        .route(
            "/ok",
            axum::routing::post(take).with_state((taken.clone(), StatusCode::OK)),
        )
        .route(
            "/down",
            axum::routing::post(take)
                .with_state((taken.clone(), StatusCode::INTERNAL_SERVER_ERROR)),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{address}"), taken)
}

#[tokio::test]
async fn deliveries_of_real_firings_are_listed_by_status_in_pages() {
    let api = Api::on_premises().await;
    let (base, taken) = receiver().await;
    let (status, ok) = api
        .add_endpoint(json!({ "url": format!("{base}/ok") }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{ok}");
    let (status, down) = api
        .add_endpoint(json!({ "url": format!("{base}/down") }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{down}");
    // acme's own rule at 50 %, beside the plan's at 80 % and below 10 credits (it has none).
    let (status, own) = api
        .add_rule("acme", json!({ "meter": "api_calls", "percent": 50 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{own}");
    let own_key = format!("customer:{}", own["rule_id"]);

    // 85 calls of 100 today, as the aggregator commits them: usage, and the customer changed.
    let mut tx = api.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
         VALUES ('acme', 'api_calls', (now() AT TIME ZONE 'UTC')::date, '', 85, 85, now(), now())",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tally_db::changes::record(&mut tx, &["acme"]).await.unwrap();
    tx.commit().await.unwrap();
    let rates = RateCard::load(&api.pool).await.unwrap();
    let evaluation = tally_alerts::evaluate_once(&api.pool, &rates, Utc::now())
        .await
        .unwrap();
    assert_eq!(evaluation.fired.len(), 3, "{evaluation:?}");
    let round = tally_alerts::deliver_due(&api.pool, &on_premises_sender())
        .await
        .unwrap();
    assert_eq!((round.delivered, round.retrying), (3, 3), "{round:?}");

    // The firings, as the customer reads them.
    let (status, alerts) = api.alerts("acme", ACME).await;
    assert_eq!(status, StatusCode::OK, "{alerts}");
    let firings = alerts["firings"].as_array().unwrap();
    let mut rules: Vec<&str> = firings
        .iter()
        .map(|f| f["rule"].as_str().unwrap())
        .collect();
    rules.sort_unstable();
    let mut expected = vec![
        own_key.as_str(),
        "plan:PRO:credit_balance:10",
        "plan:PRO:usage:api_calls:80",
    ];
    expected.sort_unstable();
    assert_eq!(rules, expected);
    let mut fired: Vec<&str> = firings
        .iter()
        .map(|f| f["event_id"].as_str().unwrap())
        .collect();
    fired.sort_unstable();
    let mut evaluated: Vec<&str> = evaluation.fired.iter().map(String::as_str).collect();
    evaluated.sort_unstable();
    assert_eq!(fired, evaluated);
    let usage = firings
        .iter()
        .find(|f| f["rule"] == "plan:PRO:usage:api_calls:80")
        .unwrap();
    assert_eq!(usage["event_type"], "usage.threshold_crossed");
    let data = &usage["payload"]["data"];
    assert_eq!(
        (
            decimal(&data["usage"]),
            decimal(&data["limit"]),
            decimal(&data["threshold"])
        ),
        (Decimal::from(85), Decimal::from(100), Decimal::from(80))
    );
    assert_eq!(usage["payload"]["id"], usage["event_id"]);
    let below = firings
        .iter()
        .find(|f| f["rule"] == "plan:PRO:credit_balance:10")
        .unwrap();
    assert_eq!(below["event_type"], "credits.balance_below");
    assert_eq!(decimal(&below["payload"]["data"]["balance"]), Decimal::ZERO);

    // Every request the receiver took is signed with its endpoint's secret, shown at creation.
    let requests = taken.lock().unwrap().clone();
    assert_eq!(requests.len(), 6);
    for (path, signature, event_id, body) in &requests {
        let endpoint = if path == "/ok" { &ok } else { &down };
        let secret = endpoint["secret"].as_str().unwrap();
        tally_alerts::signature::verify(signature, secret, body, Utc::now().timestamp(), 300)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        let event: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(&event["id"], event_id.as_str());
        assert!(evaluation.fired.contains(event_id), "{event_id}");
    }

    // By status: delivered to /ok, pending for /down (500, to be retried).
    let (status, delivered) = api.deliveries("?status=delivered").await;
    assert_eq!(status, StatusCode::OK, "{delivered}");
    let delivered = delivered["deliveries"].as_array().unwrap().clone();
    assert_eq!(delivered.len(), 3);
    for delivery in &delivered {
        assert_eq!(delivery["endpoint_id"], ok["endpoint_id"]);
        assert_eq!(
            (
                delivery["status"].as_str(),
                delivery["attempts"].as_i64(),
                delivery["last_status"].as_i64()
            ),
            (Some("delivered"), Some(1), Some(200))
        );
        assert!(delivery["delivered_at"].is_string(), "{delivery}");
        assert_eq!(delivery["next_attempt_at"], Value::Null);
        assert_eq!(delivery["customer"], "acme");
    }
    let (_, pending) = api.deliveries("?status=pending").await;
    let pending = pending["deliveries"].as_array().unwrap().clone();
    assert_eq!(pending.len(), 3);
    for delivery in &pending {
        assert_eq!(delivery["endpoint_id"], down["endpoint_id"]);
        assert_eq!(
            (
                delivery["attempts"].as_i64(),
                delivery["last_status"].as_i64()
            ),
            (Some(1), Some(500))
        );
        assert!(delivery["next_attempt_at"].is_string(), "{delivery}");
        assert!(
            delivery["last_error"].as_str().unwrap().contains("500"),
            "{delivery}"
        );
    }
    let (_, failed) = api.deliveries("?status=failed").await;
    assert_eq!(failed["deliveries"], json!([]));
    assert_eq!(failed["next_before"], Value::Null);

    // Deleting /down gives its pending deliveries up.
    let down_id = down["endpoint_id"].as_i64().unwrap().to_string();
    let (status, _) = api.delete_endpoint(&down_id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (_, failed) = api.deliveries("?status=failed").await;
    let failed = failed["deliveries"].as_array().unwrap();
    assert_eq!(failed.len(), 3);
    for delivery in failed {
        assert_eq!(delivery["endpoint_id"], down["endpoint_id"]);
        assert_eq!(delivery["last_error"], "the endpoint was deleted");
    }
    let (_, pending) = api.deliveries("?status=pending").await;
    assert_eq!(pending["deliveries"], json!([]));

    // Pages, newest first: every delivery once.
    let mut ids = Vec::new();
    let mut before: Option<i64> = None;
    let mut pages = 0;
    loop {
        let query = match before {
            Some(before) => format!("?limit=4&before={before}"),
            None => "?limit=4".to_owned(),
        };
        let (status, page) = api.deliveries(&query).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let deliveries = page["deliveries"].as_array().unwrap();
        if deliveries.is_empty() {
            assert_eq!(page["next_before"], Value::Null);
            break;
        }
        assert_eq!(
            page["next_before"],
            deliveries.last().unwrap()["delivery_id"]
        );
        ids.extend(
            deliveries
                .iter()
                .map(|d| d["delivery_id"].as_i64().unwrap()),
        );
        before = page["next_before"].as_i64();
        pages += 1;
    }
    assert_eq!(pages, 2);
    assert_eq!(ids.len(), 6);
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");

    for query in [
        "?status=sent",
        "?limit=0",
        "?limit=1001",
        "?before=0",
        "?before=x",
        "?page=2",
    ] {
        let answer = api.deliveries(query).await;
        assert_eq!(
            code(&answer),
            (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST")),
            "{query}"
        );
    }
}

#[tokio::test]
async fn customers_read_their_own_alerts_and_only_admins_change_or_see_delivery() {
    let api = Api::start().await;
    let (status, rule) = api
        .add_rule("acme", json!({ "credit_balance_below": 5 }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{rule}");
    let (status, endpoint) = api
        .add_endpoint(json!({ "url": "https://example.com/hook" }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{endpoint}");

    // acme's own token reads acme's alerts, and not beta's; beta's token not acme's.
    let (status, own) = api.alerts("acme", ACME).await;
    assert_eq!(status, StatusCode::OK, "{own}");
    assert_eq!(own["rules"][0]["rule_id"], rule["rule_id"]);
    for answer in [
        api.alerts("beta", ACME).await,
        api.alerts("acme", BETA).await,
        // A gateway checks quotas; alerts are the customer's and the admin's.
        api.alerts("acme", GATEWAY).await,
    ] {
        assert_eq!(code(&answer), (StatusCode::FORBIDDEN, Some("FORBIDDEN")));
    }

    // Every other route is the admin's, even for the customer's own rules.
    let rule_path = format!("/v1/customers/acme/alerts/{}", rule["rule_id"]);
    let endpoint_path = format!("/v1/alerts/endpoints/{}", endpoint["endpoint_id"]);
    let admin_only = [
        (
            "POST",
            RULES,
            "/v1/customers/acme/alerts".to_owned(),
            Some(json!({ "credit_balance_below": 1 })),
        ),
        ("DELETE", RULE, rule_path.clone(), None),
        (
            "POST",
            ENDPOINTS,
            ENDPOINTS.to_owned(),
            Some(json!({ "url": "https://attacker.example/hook" })),
        ),
        ("GET", ENDPOINTS, ENDPOINTS.to_owned(), None),
        ("DELETE", ENDPOINT, endpoint_path.clone(), None),
        ("GET", DELIVERIES, DELIVERIES.to_owned(), None),
    ];
    for token in [ACME, GATEWAY] {
        for (method, template, path, body) in &admin_only {
            let answer = api.call(method, template, path, token, body.clone()).await;
            // The customer's own rules: its token passes the gate, and is refused because its
            // plan is not self-serve (tests/web.rs: on a self-serve plan it may).
            let expected = if token == ACME && (*template == RULES || *template == RULE) {
                "NOT_SELF_SERVE"
            } else {
                "FORBIDDEN"
            };
            assert_eq!(
                code(&answer),
                (StatusCode::FORBIDDEN, Some(expected)),
                "{method} {path}"
            );
        }
    }
    for (method, _, path, body) in &admin_only {
        let answer = common::call(
            &api.api.app,
            method,
            path,
            None,
            body.as_ref().map(Value::to_string),
        )
        .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{method} {path}");
    }
    // Nothing the refused calls asked for happened.
    let (_, own) = api.alerts("acme", ADMIN).await;
    assert_eq!(own["rules"].as_array().unwrap().len(), 1);
    let (_, listed) = api.call("GET", ENDPOINTS, ENDPOINTS, ADMIN, None).await;
    assert_eq!(listed["endpoints"].as_array().unwrap().len(), 1);
    // The admin may do all of it.
    let (status, _) = api.call("DELETE", RULE, &rule_path, ADMIN, None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = api
        .call("DELETE", ENDPOINT, &endpoint_path, ADMIN, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn endpoints_get_only_their_customers_and_types_and_a_rotated_secret_signs_beside_the_old() {
    let api = Api::on_premises().await;
    let (base, taken) = receiver().await;
    let (status, everything) = api
        .add_endpoint(json!({ "url": format!("{base}/ok?to=everything") }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{everything}");
    let (status, beta_only) = api
        .add_endpoint(json!({ "url": format!("{base}/ok?to=beta"), "customers": ["beta"] }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{beta_only}");
    assert_eq!(beta_only["customers"], json!(["beta"]));
    let (status, balances) = api
        .add_endpoint(json!({ "url": format!("{base}/ok?to=balances"), "event_types": ["credits.balance_below"] }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{balances}");
    for (body, expected) in [
        (
            json!({ "url": format!("{base}/ok"), "customers": [] }),
            "customers",
        ),
        (
            json!({ "url": format!("{base}/ok"), "customers": ["a\u{1}b"] }),
            "customers",
        ),
        (
            json!({ "url": format!("{base}/ok"), "event_types": ["usage.everything"] }),
            "event_types",
        ),
    ] {
        let answer = api.add_endpoint(body.clone()).await;
        assert_eq!(
            code(&answer),
            (StatusCode::BAD_REQUEST, Some("INVALID_ALERT")),
            "{body}"
        );
        assert!(message(&answer).contains(expected), "{}", answer.1);
    }

    // A rotation: the new secret is shown once; the old one keeps signing for a while.
    let old_secret = everything["secret"].as_str().unwrap().to_owned();
    let path = format!(
        "/v1/alerts/endpoints/{}/rotate-secret",
        everything["endpoint_id"]
    );
    let (status, rotated) = api
        .call(
            "POST",
            "/v1/alerts/endpoints/{endpoint_id}/rotate-secret",
            &path,
            ADMIN,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap().to_owned();
    assert_ne!(new_secret, old_secret);
    assert!(
        rotated["previous_secret_expires_at"].is_string(),
        "{rotated}"
    );
    let unknown = api
        .call(
            "POST",
            "/v1/alerts/endpoints/{endpoint_id}/rotate-secret",
            "/v1/alerts/endpoints/999/rotate-secret",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(
        code(&unknown),
        (StatusCode::NOT_FOUND, Some("NO_SUCH_ENDPOINT"))
    );

    // acme crosses two usage rules and one balance rule.
    api.add_rule("acme", json!({ "meter": "api_calls", "percent": 50 }))
        .await;
    let mut tx = api.pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
         VALUES ('acme', 'api_calls', (now() AT TIME ZONE 'UTC')::date, '', 85, 85, now(), now())",
    )
    .execute(&mut *tx)
    .await
    .unwrap();
    tally_db::changes::record(&mut tx, &["acme"]).await.unwrap();
    tx.commit().await.unwrap();
    let rates = RateCard::load(&api.pool).await.unwrap();
    let evaluation = tally_alerts::evaluate_once(&api.pool, &rates, Utc::now())
        .await
        .unwrap();
    assert_eq!(evaluation.fired.len(), 3, "{evaluation:?}");
    let round = tally_alerts::deliver_due(&api.pool, &on_premises_sender())
        .await
        .unwrap();
    assert_eq!(round.delivered, 4, "{round:?}");
    let requests = taken.lock().unwrap().clone();
    assert_eq!(requests.len(), 4);
    let (_, listed) = api.deliveries("").await;
    let mut per_endpoint: Vec<i64> = listed["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["endpoint_id"].as_i64().unwrap())
        .collect();
    per_endpoint.sort_unstable();
    let id = |e: &Value| e["endpoint_id"].as_i64().unwrap();
    let mut expected = vec![
        id(&everything),
        id(&everything),
        id(&everything),
        id(&balances),
    ];
    expected.sort_unstable();
    assert_eq!(
        per_endpoint, expected,
        "beta's endpoint gets none of acme's"
    );
    // Each delivery to the rotated endpoint verifies with the new secret and with the old.
    let now = Utc::now().timestamp();
    let mut rotated_deliveries = 0;
    for (_, signature, _, body) in &requests {
        if signature.matches("v1=").count() == 2 {
            rotated_deliveries += 1;
            tally_alerts::signature::verify(signature, &new_secret, body, now, 300).unwrap();
            tally_alerts::signature::verify(signature, &old_secret, body, now, 300).unwrap();
        } else {
            let secret = balances["secret"].as_str().unwrap();
            tally_alerts::signature::verify(signature, secret, body, now, 300).unwrap();
        }
    }
    assert_eq!(rotated_deliveries, 3);
}

/// A customer whose override no longer fits its plan (its plan changed under it: in Stripe,
/// or to the fallback plan) cannot be evaluated: it is set aside in `customer_errors` and
/// tried again later, while every other customer's alerts fire and the changes are taken
/// (they used to fail the whole batch, for ever, while `customer_changes` grew). Its quota
/// checks answer 409 OVERRIDE_CONFLICT; the others' are unaffected.
#[tokio::test]
async fn a_customer_whose_override_no_longer_fits_is_set_aside_and_the_others_go_on() {
    let api = Api::start().await;
    subscribe(
        &api.pool,
        "beta",
        "PRO",
        Utc::now() - chrono::TimeDelta::days(1),
    )
    .await;
    // beta's override limits a meter PRO does not limit, without a period: it does not fit.
    sqlx::query(
        "INSERT INTO customer_overrides (customer_id, overrides, reason, set_by)
         VALUES ('beta', '{\"limits\":{\"tokens\":{\"limit\":\"5\"}}}', 'test', 'test')",
    )
    .execute(&api.pool)
    .await
    .unwrap();
    let mut tx = api.pool.begin().await.unwrap();
    for customer in ["acme", "beta"] {
        sqlx::query(
            "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
             VALUES ($1, 'api_calls', (now() AT TIME ZONE 'UTC')::date, '', 85, 85, now(), now())",
        )
        .bind(customer)
        .execute(&mut *tx)
        .await
        .unwrap();
        tally_db::changes::record(&mut tx, &[customer])
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    let rates = RateCard::load(&api.pool).await.unwrap();
    let evaluation = tally_alerts::evaluate_once(&api.pool, &rates, Utc::now())
        .await
        .unwrap();
    assert_eq!(evaluation.set_aside, ["beta"], "{evaluation:?}");
    assert_eq!(
        evaluation.fired.len(),
        2,
        "acme's usage and balance rules: {evaluation:?}"
    );
    let (changes, errors): (i64, Vec<(String, String, String)>) = (
        sqlx::query_scalar("SELECT count(*) FROM customer_changes")
            .fetch_one(&api.pool)
            .await
            .unwrap(),
        sqlx::query_as("SELECT stage, customer_id, error FROM customer_errors")
            .fetch_all(&api.pool)
            .await
            .unwrap(),
    );
    assert_eq!(changes, 0, "the changes were taken");
    assert_eq!(errors.len(), 1);
    assert_eq!(
        (errors[0].0.as_str(), errors[0].1.as_str()),
        ("alerts", "beta")
    );
    assert!(
        errors[0].2.contains("does not fit its plan \"PRO\""),
        "{errors:?}"
    );
    // Its checks say why; acme's are unaffected.
    let check = |customer: &'static str| {
        let body = json!({ "customer": customer, "meter": "api_calls" });
        api.call(
            "POST",
            "/v1/quota/check",
            "/v1/quota/check",
            ADMIN,
            Some(body),
        )
    };
    let (status, answer) = check("beta").await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (StatusCode::CONFLICT, Some("OVERRIDE_CONFLICT")),
        "{answer}"
    );
    let (status, answer) = check("acme").await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // Not tried again before its retry; fixed, it is evaluated and forgotten.
    let again = tally_alerts::evaluate_once(&api.pool, &rates, Utc::now())
        .await
        .unwrap();
    assert_eq!(again.customers, 0);
    sqlx::query("DELETE FROM customer_overrides WHERE customer_id = 'beta'")
        .execute(&api.pool)
        .await
        .unwrap();
    sqlx::query("UPDATE customer_errors SET retry_at = now() - interval '1 second'")
        .execute(&api.pool)
        .await
        .unwrap();
    let retried = tally_alerts::evaluate_once(&api.pool, &rates, Utc::now())
        .await
        .unwrap();
    assert_eq!(retried.fired.len(), 2, "{retried:?}");
    assert!(retried.set_aside.is_empty());
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM customer_errors")
        .fetch_one(&api.pool)
        .await
        .unwrap();
    assert_eq!(left, 0);
}
