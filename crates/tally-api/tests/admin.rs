//! The admin API, driven in process through the router: plans, subscriptions, overrides and
//! customers; auth, audit, validation errors with stable codes, and every answer checked
//! against the OpenAPI document.

use axum::http::StatusCode;
use serde_json::{json, Value};
use tally_billing::{apply_plans, PlanDefinition};
mod common;
use common::{ACME, ADMIN, GATEWAY};

struct Api {
    _db: tally_db::testing::TestDatabase,
    pool: sqlx::PgPool,
    api: common::AdminApi,
}

impl Api {
    async fn start(fallback_plan: Option<&str>) -> Api {
        let db = tally_db::testing::fresh_database().await;
        sqlx::query("INSERT INTO meters (name, aggregation, stripe_event_name) VALUES ('api_calls', 'sum', 'api_calls')")
            .execute(&db.pool)
            .await
            .unwrap();
        let plans: Vec<PlanDefinition> = serde_json::from_value(json!([
            { "name": "FREE", "features": { "api": true },
              "limits": { "api_calls": { "limit": "2", "period": "day" } } },
            { "name": "PRO", "features": { "api": true, "sso": true },
              "price": { "amount": "49", "currency": "usd", "interval": "month" },
              "limits": { "api_calls": { "limit": "1000", "period": "day", "unit_price": "0.01" } } }
        ]))
        .unwrap();
        apply_plans(&db.pool, &plans, "test").await.unwrap();
        let api = common::AdminApi::new(&db.pool, fallback_plan).await;
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

    async fn create(&self, body: Value) -> (StatusCode, Value) {
        self.call(
            "POST",
            "/v1/subscriptions",
            "/v1/subscriptions",
            ADMIN,
            Some(body),
        )
        .await
    }

    async fn act(&self, id: i64, action: &str, body: Value) -> (StatusCode, Value) {
        let template = format!("/v1/subscriptions/{{id}}/{action}");
        let path = format!("/v1/subscriptions/{id}/{action}");
        let method = if action == "payment-method" {
            "PUT"
        } else {
            "POST"
        };
        self.call(method, &template, &path, ADMIN, Some(body)).await
    }

    async fn check(&self, customer: &str) -> (StatusCode, Value) {
        let body = json!({ "customer": customer, "meter": "api_calls", "quantity": 1 });
        self.call(
            "POST",
            "/v1/quota/check",
            "/v1/quota/check",
            GATEWAY,
            Some(body),
        )
        .await
    }
}

#[tokio::test]
async fn from_plans_to_an_allowed_and_a_denied_check_without_stripe_or_sql() {
    let api = Api::start(None).await;
    let (status, plans) = api.call("GET", "/v1/plans", "/v1/plans", ADMIN, None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(plans["plans"].as_array().unwrap().len(), 2);
    let (status, pro) = api
        .call("GET", "/v1/plans/{name}", "/v1/plans/PRO", GATEWAY, None)
        .await;
    assert_eq!(
        (status, pro["price"]["amount"].as_str()),
        (StatusCode::OK, Some("49"))
    );

    let (status, created) = api
        .create(json!({ "customer": "acme", "plan": "FREE", "reason": "signed up" }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    assert_eq!(
        (created["status"].as_str(), created["source"].as_str()),
        (Some("active"), Some("tally"))
    );
    for _ in 0..2 {
        assert_eq!(api.check("acme").await.0, StatusCode::OK);
    }
    let (status, denied) = api.check("acme").await;
    assert_eq!(
        (status, denied["code"].as_str()),
        (StatusCode::TOO_MANY_REQUESTS, Some("LIMIT_EXCEEDED"))
    );

    // An upgrade takes effect for the very next check.
    let id = created["id"].as_i64().unwrap();
    let (status, changed) = api
        .act(id, "change", json!({ "plan": "PRO", "reason": "upgraded" }))
        .await;
    assert_eq!(
        (status, changed["plan"].as_str()),
        (StatusCode::OK, Some("PRO"))
    );
    assert_eq!(api.check("acme").await.0, StatusCode::OK);

    let audit: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT action, actor, reason FROM entitlement_audit WHERE entity = 'subscription' ORDER BY audit_id",
    )
    .fetch_all(&api.pool)
    .await
    .unwrap();
    assert_eq!(
        audit,
        [
            (
                "create".into(),
                "token:ops".into(),
                Some("signed up".into())
            ),
            (
                "change_plan".into(),
                "token:ops".into(),
                Some("upgraded".into())
            )
        ]
    );
}

#[tokio::test]
async fn cancel_reactivate_and_the_fallback_plan() {
    let api = Api::start(Some("FREE")).await;
    let (_, created) = api
        .create(json!({ "customer": "acme", "plan": "PRO", "billing_period": "year", "reason": "deal" }))
        .await;
    assert_eq!(created["billing_interval"], "year");
    let id = created["id"].as_i64().unwrap();
    let (status, pending) = api
        .act(id, "cancel", json!({ "reason": "asked to leave" }))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            pending["cancel_at_period_end"].as_bool(),
            pending["status"].as_str()
        ),
        (Some(true), Some("active"))
    );
    let (_, kept) = api
        .act(id, "reactivate", json!({ "reason": "stays" }))
        .await;
    assert_eq!(kept["cancel_at_period_end"], false);
    let (status, again) = api
        .act(id, "reactivate", json!({ "reason": "stays" }))
        .await;
    assert_eq!(
        (status, again["code"].as_str()),
        (StatusCode::CONFLICT, Some("NOTHING_TO_REACTIVATE"))
    );
    let (status, scheduled) = api
        .act(
            id,
            "change",
            json!({ "plan": "FREE", "at": "period_end", "reason": "downgrade at renewal" }),
        )
        .await;
    assert_eq!(
        (status, scheduled["pending_plan"].as_str()),
        (StatusCode::OK, Some("FREE"))
    );
    let (_, card) = api
        .act(
            id,
            "payment-method",
            json!({ "on_record": true, "reason": "card added" }),
        )
        .await;
    assert_eq!(card["payment_method"], true);

    let (status, canceled) = api
        .act(id, "cancel", json!({ "at": "now", "reason": "fraud" }))
        .await;
    assert_eq!(
        (status, canceled["status"].as_str()),
        (StatusCode::OK, Some("canceled"))
    );
    let (status, ended) = api
        .act(id, "change", json!({ "plan": "PRO", "reason": "undo" }))
        .await;
    assert_eq!(
        (status, ended["code"].as_str()),
        (StatusCode::CONFLICT, Some("SUBSCRIPTION_ENDED"))
    );
    // The fallback plan, right away: FREE allows two calls a day.
    assert_eq!(api.check("acme").await.0, StatusCode::OK);
    let (status, history) = api
        .call(
            "GET",
            "/v1/customers/{id}/subscriptions",
            "/v1/customers/acme/subscriptions",
            ACME,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let subscriptions = history["subscriptions"].as_array().unwrap();
    assert_eq!(
        subscriptions
            .iter()
            .map(|s| (s["plan"].as_str().unwrap(), s["source"].as_str().unwrap()))
            .collect::<Vec<_>>(),
        [("FREE", "fallback"), ("PRO", "tally")]
    );
    assert_eq!(
        subscriptions[1]["history"].as_array().unwrap().len(),
        2,
        "active, then canceled"
    );

    // A new subscription replaces the fallback.
    let (status, upgraded) = api
        .create(json!({ "customer": "acme", "plan": "PRO", "reason": "came back" }))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{upgraded}");
    let (status, second) = api
        .create(json!({ "customer": "acme", "plan": "FREE", "reason": "twice" }))
        .await;
    assert_eq!(
        (status, second["code"].as_str()),
        (StatusCode::CONFLICT, Some("SECOND_LIVE_SUBSCRIPTION"))
    );
}

#[tokio::test]
async fn tokens_scopes_and_validation_answer_with_stable_codes() {
    let api = Api::start(None).await;
    let create = json!({ "customer": "acme", "plan": "FREE", "reason": "x" });
    let no_token = common::call(
        &api.api.app,
        "POST",
        "/v1/subscriptions",
        None,
        Some(create.to_string()),
    )
    .await;
    assert_eq!(no_token.status, StatusCode::UNAUTHORIZED);
    for token in [GATEWAY, ACME] {
        let (status, body) = api
            .call(
                "POST",
                "/v1/subscriptions",
                "/v1/subscriptions",
                token,
                Some(create.clone()),
            )
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (StatusCode::FORBIDDEN, Some("FORBIDDEN"))
        );
    }
    let (status, _) = api
        .call(
            "GET",
            "/v1/customers/{id}/subscriptions",
            "/v1/customers/beta/subscriptions",
            ACME,
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "a customer token reads only its own customer"
    );

    let cases = [
        (
            json!({ "customer": "acme", "plan": "FREE", "reason": "  " }),
            StatusCode::BAD_REQUEST,
            "REASON_REQUIRED",
        ),
        (
            json!({ "customer": "acme", "plan": "FREE" }),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
        (
            json!({ "customer": "acme", "plan": "FREE", "reason": "x", "billing_period": "week" }),
            StatusCode::BAD_REQUEST,
            "INVALID_SUBSCRIPTION",
        ),
        (
            json!({ "customer": "acme", "plan": "FREE", "reason": "x", "start": "2999-01-01T00:00:00Z" }),
            StatusCode::BAD_REQUEST,
            "INVALID_SUBSCRIPTION",
        ),
        (
            json!({ "customer": "acme", "plan": "FREE", "reason": "x", "trial_end": "2020-01-01T00:00:00Z" }),
            StatusCode::BAD_REQUEST,
            "INVALID_SUBSCRIPTION",
        ),
        (
            json!({ "customer": "", "plan": "FREE", "reason": "x" }),
            StatusCode::BAD_REQUEST,
            "INVALID_SUBSCRIPTION",
        ),
        (
            json!({ "customer": "acme", "plan": "GOLD", "reason": "x" }),
            StatusCode::NOT_FOUND,
            "UNKNOWN_PLAN",
        ),
        (
            json!({ "customer": "acme", "plan": "FREE", "reason": "x", "extra": 1 }),
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
        ),
    ];
    for (body, status, code) in cases {
        let (got, answer) = api.create(body.clone()).await;
        assert_eq!(
            (got, answer["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    let (status, body) = api
        .call(
            "GET",
            "/v1/subscriptions/{id}",
            "/v1/subscriptions/abc",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST"))
    );
    let (status, body) = api
        .call(
            "GET",
            "/v1/subscriptions/{id}",
            "/v1/subscriptions/42",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NO_SUCH_SUBSCRIPTION"))
    );

    // A subscription that follows Stripe is shown, not changed.
    sqlx::query(
        "INSERT INTO subscriptions (customer_id, plan, status, source, stripe_subscription_id,
                current_period_start, current_period_end, billing_anchor, started_at)
         VALUES ('beta', 'PRO', 'active', 'stripe', 'sub_1', now(), now() + interval '30 days', now(), now())",
    )
    .execute(&api.pool)
    .await
    .unwrap();
    let id: i64 =
        sqlx::query_scalar("SELECT subscription_id FROM subscriptions WHERE customer_id = 'beta'")
            .fetch_one(&api.pool)
            .await
            .unwrap();
    let (status, shown) = api
        .call(
            "GET",
            "/v1/subscriptions/{id}",
            &format!("/v1/subscriptions/{id}"),
            ADMIN,
            None,
        )
        .await;
    assert_eq!(
        (status, shown["source"].as_str()),
        (StatusCode::OK, Some("stripe"))
    );
    let (status, refused) = api
        .act(id, "cancel", json!({ "at": "now", "reason": "x" }))
        .await;
    assert_eq!(
        (status, refused["code"].as_str()),
        (StatusCode::CONFLICT, Some("STRIPE_MANAGED"))
    );
    assert!(refused["message"]
        .as_str()
        .unwrap()
        .contains("change it in Stripe"));
}

#[tokio::test]
async fn overrides_previews_and_the_customer_picture() {
    let api = Api::start(None).await;
    let (status, _) = api
        .create(json!({ "customer": "acme", "plan": "FREE", "reason": "x" }))
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let put = |overrides: Value, reason: &str| json!({ "overrides": overrides, "reason": reason });
    let path = "/v1/customers/acme/overrides";
    let template = "/v1/customers/{id}/overrides";
    let (status, body) = api
        .call(
            "PUT",
            template,
            path,
            ADMIN,
            Some(put(
                json!({ "limits": { "storage": { "limit": "5", "period": "day" } } }),
                "x",
            )),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_OVERRIDE"))
    );
    let (status, body) = api
        .call(
            "PUT",
            template,
            path,
            ADMIN,
            Some(put(
                json!({ "features": { "sso": true }, "limits": { "api_calls": { "limit": "3" } } }),
                "pilot",
            )),
        )
        .await;
    assert_eq!(
        (status, body["set_by"].as_str()),
        (StatusCode::OK, Some("token:ops")),
        "{body}"
    );
    for _ in 0..3 {
        assert_eq!(
            api.check("acme").await.0,
            StatusCode::OK,
            "the override's limit, at once"
        );
    }
    assert_eq!(api.check("acme").await.0, StatusCode::TOO_MANY_REQUESTS);

    let (status, preview) = api
        .call(
            "GET",
            "/v1/customers/{id}/entitlements",
            "/v1/customers/acme/entitlements?preview=PRO",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{preview}");
    assert_eq!(
        (preview["plan"].as_str(), preview["preview"].as_bool()),
        (Some("PRO"), Some(true))
    );
    assert_eq!(
        preview["limits"]["api_calls"]["limit"], "3",
        "the override wins on the previewed plan too"
    );
    assert_eq!(preview["features"]["sso"], true);
    let (status, unknown) = api
        .call(
            "GET",
            "/v1/customers/{id}/entitlements",
            "/v1/customers/acme/entitlements?preview=GOLD",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(
        (status, unknown["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("UNKNOWN_PLAN"))
    );

    let (status, picture) = api
        .call(
            "GET",
            "/v1/customers/{id}",
            "/v1/customers/acme",
            ACME,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{picture}");
    assert_eq!(picture["subscription"]["plan"], "FREE");
    assert_eq!(picture["override"]["features"]["sso"], true);
    let usage = &picture["usage"][0];
    assert_eq!(
        (
            usage["meter"].as_str(),
            usage["used"].as_str(),
            usage["limit"].as_str(),
            usage["remaining"].as_str()
        ),
        (Some("api_calls"), Some("3"), Some("3"), Some("0"))
    );
    assert!(picture["invoice_preview"]["total"].is_string());
    let (status, none) = api
        .call(
            "GET",
            "/v1/customers/{id}",
            "/v1/customers/nobody",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(
        (status, none["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NO_SUCH_CUSTOMER"))
    );

    let (status, body) = api.call("DELETE", template, path, ADMIN, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("REASON_REQUIRED"))
    );
    let delete = format!("{path}?reason=pilot%20over");
    assert_eq!(
        api.call("DELETE", template, &delete, ADMIN, None).await.0,
        StatusCode::NO_CONTENT
    );
    let (status, body) = api.call("DELETE", template, &delete, ADMIN, None).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NO_OVERRIDE"))
    );
    let reasons: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT action, reason FROM entitlement_audit WHERE entity = 'override' ORDER BY audit_id",
    )
    .fetch_all(&api.pool)
    .await
    .unwrap();
    assert_eq!(
        reasons,
        [
            ("create".into(), Some("pilot".into())),
            ("delete".into(), Some("pilot over".into()))
        ]
    );
}

#[tokio::test]
async fn customers_are_listed_by_plan_and_status_in_pages() {
    let api = Api::start(None).await;
    for (customer, plan) in [
        ("a", "FREE"),
        ("b", "PRO"),
        ("c", "PRO"),
        ("d", "PRO"),
        ("e", "FREE"),
    ] {
        let (status, _) = api
            .create(json!({ "customer": customer, "plan": plan, "reason": "x" }))
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    let mut path = "/v1/customers?plan=PRO&status=active&limit=2".to_owned();
    loop {
        let (status, page) = api.call("GET", "/v1/customers", &path, ADMIN, None).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        seen.extend(
            page["customers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["customer"].as_str().unwrap().to_owned()),
        );
        match page["next"].as_str() {
            Some(next) => {
                path = format!("/v1/customers?plan=PRO&status=active&limit=2&after={next}")
            }
            None => break,
        }
    }
    assert_eq!(seen, ["b", "c", "d"]);
    let (status, body) = api
        .call(
            "GET",
            "/v1/customers",
            "/v1/customers?status=sleeping",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_REQUEST"))
    );
    let (status, _) = api
        .call(
            "GET",
            "/v1/customers",
            "/v1/customers?limit=100000",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
