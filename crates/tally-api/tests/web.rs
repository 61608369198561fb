//! tally's pages over HTTP (the browser tests are in the top-level `tests/browser.rs`): portal
//! sessions (single-use links, expiry bounds, revocation, logout), what a portal session can
//! reach, the console's login and CSRF, hostile ids on pages, and the security headers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use chrono::Utc;
use serde_json::json;
use tally_billing::testing::subscribe;
use tally_billing::{apply_plans, PlanDefinition};
use tally_quota::Quota;
use tower::ServiceExt;

mod common;
use common::{AdminApi, ACME, ADMIN};

/// A page's answer: status, headers (lowercase names, `name: value` lines) and body.
struct Page {
    status: StatusCode,
    headers: String,
    body: String,
}

impl Page {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}: ")))
    }

    /// The `name=value` of the `Set-Cookie` header.
    fn cookie(&self) -> String {
        self.header("set-cookie")
            .and_then(|c| c.split(';').next())
            .unwrap_or_default()
            .to_owned()
    }

    fn csrf(&self) -> String {
        let at = self.body.find("name=\"csrf\" value=\"").expect("a form") + 19;
        self.body[at..at + 64].to_owned()
    }
}

async fn page(
    app: &axum::Router,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
) -> Page {
    page_with(app, method, path, cookie, form, &[]).await
}

async fn page_with(
    app: &axum::Router,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    form: Option<&str>,
    headers: &[(&str, &str)],
) -> Page {
    let mut request = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if let Some(cookie) = cookie {
        request = request.header(header::COOKIE, cookie);
    }
    if form.is_some() {
        request = request.header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    }
    let request = request
        .body(Body::from(form.unwrap_or_default().to_owned()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response
        .headers()
        .iter()
        .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join("\n");
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 24)
        .await
        .unwrap();
    Page {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

const HOSTILE: &str = "x\"><img src=x onerror=alert(1)><script>alert(2)</script>";

async fn harness() -> (tally_db::testing::TestDatabase, AdminApi) {
    let db = tally_db::testing::fresh_database().await;
    sqlx::query("INSERT INTO meters (name, aggregation, stripe_event_name, group_by) VALUES ('api_calls', 'sum', 'api_calls', '{}'), ('tokens', 'sum', 'tokens', '{model}')")
        .execute(&db.pool)
        .await
        .unwrap();
    let plan: PlanDefinition = serde_json::from_value(json!({
        "name": "FREE", "features": { "api": true },
        "limits": { "api_calls": { "limit": "100", "period": "day" } }
    }))
    .unwrap();
    let pro: PlanDefinition = serde_json::from_value(json!({
        "name": "PRO", "self_serve": true, "features": { "api": true },
        "limits": { "api_calls": { "limit": "1000", "period": "day" },
                    "tokens": { "limit": "-1", "period": "billing_period" } }
    }))
    .unwrap();
    let custom: PlanDefinition = serde_json::from_value(json!({
        "name": "acme-custom", "features": { "api": true },
        "limits": { "api_calls": { "limit": "123456", "period": "day" } }
    }))
    .unwrap();
    apply_plans(&db.pool, &[plan, pro, custom], "test")
        .await
        .unwrap();
    let yesterday = Utc::now() - chrono::TimeDelta::days(1);
    for customer in ["acme", "beta", HOSTILE] {
        subscribe(&db.pool, customer, "FREE", yesterday).await;
    }
    subscribe(&db.pool, "gamma", "PRO", yesterday).await;
    sqlx::query(
        "INSERT INTO usage_daily (customer_id, meter, day, group_key, value, event_count, first_updated, last_updated)
         VALUES ('acme', 'api_calls', (now() AT TIME ZONE 'UTC')::date, '', 95, 95, now(), now()),
                ('beta', 'api_calls', (now() AT TIME ZONE 'UTC')::date, '', 7, 7, now(), now())",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let api = AdminApi::new(&db.pool, Some("FREE")).await;
    (db, api)
}

/// `DELETE /v1/portal-sessions/{id}` as the admin.
async fn revoke(api: &AdminApi, id: &str) -> (StatusCode, serde_json::Value) {
    api.call(
        "DELETE",
        "/v1/portal-sessions/{id}",
        &format!("/v1/portal-sessions/{id}"),
        ADMIN,
        None,
    )
    .await
}

/// The console's login with the admin token.
async fn console_login(api: &AdminApi) -> Page {
    page(
        &api.app,
        "POST",
        "/console/login",
        None,
        Some(&format!("token={ADMIN}")),
    )
    .await
}

/// A portal session for `customer`, opened: its cookie.
async fn open_portal(api: &AdminApi, customer: &str) -> (String, String) {
    let (status, session) = api
        .call(
            "POST",
            "/v1/customers/{id}/portal-sessions",
            &format!(
                "/v1/customers/{}/portal-sessions",
                tally_api::url_part(customer)
            ),
            ADMIN,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{session}");
    let url = session["url"].as_str().unwrap();
    let path = &url[url.find("/portal/").unwrap()..];
    // The link's page only shows a button: a GET (a link preview) uses nothing up.
    let shown = page(&api.app, "GET", path, None, None).await;
    assert_eq!(shown.status, StatusCode::OK);
    assert!(shown.header("set-cookie").is_none() && shown.body.contains("id=\"open\""));
    let opened = page_with(
        &api.app,
        "POST",
        path,
        None,
        Some(""),
        &[("origin", "http://tally.test"), ("host", "tally.test")],
    )
    .await;
    assert_eq!(opened.status, StatusCode::SEE_OTHER);
    assert_eq!(opened.header("location"), Some("/portal"));
    (opened.cookie(), path.to_owned())
}

#[tokio::test]
async fn a_portal_link_opens_once_for_one_customer_and_ends_when_asked() {
    let (db, api) = harness().await;
    let (cookie, link) = open_portal(&api, "acme").await;
    let cookie_header = cookie.clone();
    assert!(cookie.starts_with("tally_portal="), "{cookie}");
    let set = page(&api.app, "POST", &link, None, Some("")).await;
    assert_eq!(set.status, StatusCode::UNAUTHORIZED, "a link opens once");
    assert!(set.body.contains("PORTAL_LINK_USED"));
    // Another site cannot open a session in a visitor's browser (session fixation): its POST
    // carries its own Origin.
    let (status, session) = api
        .call(
            "POST",
            "/v1/customers/{id}/portal-sessions",
            "/v1/customers/acme/portal-sessions",
            ADMIN,
            Some(json!({})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let url = session["url"].as_str().unwrap();
    let fresh = &url[url.find("/portal/").unwrap()..];
    let planted = page_with(
        &api.app,
        "POST",
        fresh,
        None,
        Some(""),
        &[("origin", "https://evil.example"), ("host", "tally.test")],
    )
    .await;
    assert_eq!(planted.status, StatusCode::FORBIDDEN);
    assert!(planted.header("set-cookie").is_none());
    let planted = page_with(
        &api.app,
        "POST",
        fresh,
        None,
        Some(""),
        &[("sec-fetch-site", "cross-site")],
    )
    .await;
    assert_eq!(
        planted.status,
        StatusCode::FORBIDDEN,
        "fetch metadata says so too"
    );
    // A second cookie of the same name (set by a sibling subdomain) is trusted with nothing.
    let tossed = format!("{cookie_header}; tally_portal=0000");
    let two = page(&api.app, "GET", "/portal", Some(&tossed), None).await;
    assert_eq!(two.status, StatusCode::UNAUTHORIZED);

    let overview = page(&api.app, "GET", "/portal", Some(&cookie_header), None).await;
    assert_eq!(overview.status, StatusCode::OK, "{}", overview.body);
    assert!(overview.body.contains("data-level=\"red\"") && overview.body.contains("95 of 100"));
    // The session reads its customer only: nothing on a page names another, and the cookie is
    // no API token.
    assert!(!overview.body.contains("beta"));
    let csv = page(
        &api.app,
        "GET",
        "/portal/usage.csv?range=today",
        Some(&cookie_header),
        None,
    )
    .await;
    assert!(!csv.body.contains("\"7\""), "{}", csv.body);
    let api_call = page(
        &api.app,
        "GET",
        "/v1/customers/beta",
        Some(&cookie_header),
        None,
    )
    .await;
    assert_eq!(api_call.status, StatusCode::UNAUTHORIZED);

    // Headers: no framing (no frame origins configured), nosniff, no referrer, no caching.
    let csp = overview.header("content-security-policy").unwrap();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe-inline"), "{csp}");
    assert_eq!(overview.header("x-frame-options"), Some("DENY"));
    assert_eq!(overview.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(overview.header("referrer-policy"), Some("same-origin"));
    assert_eq!(overview.header("cache-control"), Some("no-store"));

    // Logout needs the CSRF token; then the cookie opens nothing.
    let refused = page(
        &api.app,
        "POST",
        "/portal/logout",
        Some(&cookie_header),
        Some("csrf=nope"),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let form = format!("csrf={}", overview.csrf());
    let out = page(
        &api.app,
        "POST",
        "/portal/logout",
        Some(&cookie_header),
        Some(&form),
    )
    .await;
    assert_eq!(out.status, StatusCode::OK);
    let after = page(&api.app, "GET", "/portal", Some(&cookie_header), None).await;
    assert_eq!(after.status, StatusCode::UNAUTHORIZED);

    // An admin revokes a session by id; an expired session opens nothing.
    let (cookie, _) = open_portal(&api, "acme").await;
    let id: String = sqlx::query_scalar(
        "SELECT id::text FROM web_sessions WHERE revoked_at IS NULL AND kind = 'portal' ORDER BY created_at DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    let (status, _) = revoke(&api, &id).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, body) = revoke(&api, &id).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("NO_SUCH_SESSION"))
    );
    assert_eq!(
        page(&api.app, "GET", "/portal", Some(&cookie), None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
    let (cookie, _) = open_portal(&api, "acme").await;
    sqlx::query("UPDATE web_sessions SET created_at = now() - interval '2 hours', expires_at = now() - interval '1 second' WHERE revoked_at IS NULL")
        .execute(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        page(&api.app, "GET", "/portal", Some(&cookie), None)
            .await
            .status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn portal_sessions_are_short_admin_only_and_their_secrets_are_not_kept() {
    let (db, api) = harness().await;
    let path = "/v1/customers/acme/portal-sessions";
    let template = "/v1/customers/{id}/portal-sessions";
    for (expires_in, ok) in [
        (59, false),
        (60, true),
        (4 * 3600, true),
        (4 * 3600 + 1, false),
    ] {
        let (status, body) = api
            .call(
                "POST",
                template,
                path,
                ADMIN,
                Some(json!({ "expires_in": expires_in })),
            )
            .await;
        assert_eq!(status == StatusCode::OK, ok, "{expires_in}: {body}");
        if !ok {
            assert_eq!(body["code"], "INVALID_EXPIRY");
        }
    }
    let (status, body) = api
        .call(
            "POST",
            template,
            path,
            ADMIN,
            Some(json!({ "return_url": "javascript:alert(1)" })),
        )
        .await;
    assert_eq!(
        (status, body["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("INVALID_RETURN_URL"))
    );
    // A customer's own token may not make sessions (a session outlives a token check).
    let (status, _) = api
        .call("POST", template, path, ACME, Some(json!({})))
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Only digests are stored.
    let (_, session) = api
        .call("POST", template, path, ADMIN, Some(json!({})))
        .await;
    let url = session["url"].as_str().unwrap();
    let secret = url.rsplit('/').next().unwrap();
    let stored: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM web_sessions WHERE encode(link_sha256, 'hex') = $1 OR csrf_token = $1",
    )
    .bind(secret)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored, 0, "the link's secret is not in the database");
}

#[tokio::test]
async fn hostile_ids_render_as_text_on_every_portal_and_console_page() {
    let (_db, api) = harness().await;
    let (cookie, _) = open_portal(&api, HOSTILE).await;
    for path in [
        "/portal",
        "/portal/usage",
        "/portal/credits",
        "/portal/invoices",
        "/portal/plans",
        "/portal/alerts",
    ] {
        let shown = page(&api.app, "GET", path, Some(&cookie), None).await;
        assert_eq!(shown.status, StatusCode::OK, "{path}: {}", shown.body);
        assert!(
            !shown.body.contains("<script>alert") && !shown.body.contains("<img src=x"),
            "{path}"
        );
        assert!(
            shown
                .body
                .contains("x&quot;&gt;&lt;img src=x onerror=alert(1)&gt;"),
            "{path}"
        );
    }
    let login = console_login(&api).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    let console = login.cookie();
    let customer = page(
        &api.app,
        "GET",
        &format!("/console/customers/{}", tally_api::url_part(HOSTILE)),
        Some(&console),
        None,
    )
    .await;
    assert_eq!(customer.status, StatusCode::OK, "{}", customer.body);
    assert!(!customer.body.contains("<script>alert") && !customer.body.contains("<img src=x"));
    let list = page(
        &api.app,
        "GET",
        "/console/customers?q=x%22",
        Some(&console),
        None,
    )
    .await;
    assert!(list.body.contains("x&quot;&gt;&lt;img") && !list.body.contains("<img src=x"));
    // Search takes the text literally: `%` and `_` are not wildcards.
    let none = page(
        &api.app,
        "GET",
        "/console/customers?q=%25",
        Some(&console),
        None,
    )
    .await;
    assert!(none.body.contains("No customer found."), "{}", none.body);
}

#[tokio::test]
async fn the_console_takes_admin_tokens_only_refuses_forged_changes_and_cannot_be_framed() {
    let (db, api) = harness().await;
    let refused = page(
        &api.app,
        "POST",
        "/console/login",
        None,
        Some(&format!("token={ACME}")),
    )
    .await;
    assert_eq!(
        refused.status,
        StatusCode::UNAUTHORIZED,
        "a customer token is not an admin's"
    );
    assert!(refused.header("set-cookie").is_none());
    let login = console_login(&api).await;
    let set_cookie = login.header("set-cookie").unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/console"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let cookie = login.cookie();
    let customer = page(
        &api.app,
        "GET",
        "/console/customers/acme",
        Some(&cookie),
        None,
    )
    .await;
    assert_eq!(customer.status, StatusCode::OK);
    assert_eq!(customer.header("x-frame-options"), Some("DENY"));
    assert!(customer
        .header("content-security-policy")
        .unwrap()
        .contains("frame-ancestors 'none'"));
    assert!(
        !customer.body.contains(ADMIN),
        "the token is not on the page"
    );

    // A grant without the CSRF token changes nothing; with it, it is audited under the token.
    let forged = "kind=purchased&amount=1000&idempotency_key=k1&reason=forged";
    let answer = page(
        &api.app,
        "POST",
        "/console/customers/acme/grants",
        Some(&cookie),
        Some(forged),
    )
    .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    let form = format!(
        "csrf={}&kind=purchased&amount=25&idempotency_key=console%3Ak2&reason=goodwill",
        customer.csrf()
    );
    let answer = page(
        &api.app,
        "POST",
        "/console/customers/acme/grants",
        Some(&cookie),
        Some(&form),
    )
    .await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER, "{}", answer.body);
    let (granted_by, amount): (String, String) = sqlx::query_as(
        "SELECT granted_by, amount::text FROM credit_grants WHERE customer_id = 'acme'",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((granted_by.as_str(), amount.as_str()), ("token:ops", "25"));
    // The same form twice (a double click) grants once.
    let again = page(
        &api.app,
        "POST",
        "/console/customers/acme/grants",
        Some(&cookie),
        Some(&form),
    )
    .await;
    assert_eq!(again.status, StatusCode::SEE_OTHER);
    let grants: i64 =
        sqlx::query_scalar("SELECT count(*) FROM credit_grants WHERE customer_id = 'acme'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(grants, 1);

    // A token replaced in the configuration (or removed) ends its console sessions.
    let without_ops = {
        use tally_api::{Access, ApiState, ApiToken, RateLimits, Scope};
        let state = ApiState {
            quota: Quota::new(db.pool.clone(), Duration::from_secs(3600))
                .await
                .unwrap(),
            pool: db.pool.clone(),
            reader_pool: db.pool.clone(),
            access: Access::new(
                // `ops` replaced by a new token under the same name (a rotation after a leak).
                &[ApiToken::new(
                    "ops",
                    Scope::Admin,
                    None,
                    "a-new-ops-token-0123456789abcdef",
                )],
                &RateLimits::default(),
            ),
            metrics: None,
            emitter: None,
            stripe_webhook: None,
            fallback_plan: None,
            alert_destinations: Default::default(),
            billing: Default::default(),
            pipeline: Default::default(),
        };
        let mut config = tally_api::ServeConfig::default();
        config.web.console = true;
        tally_api::router(Arc::new(state), &config)
    };
    let gone = page(&without_ops, "GET", "/console", Some(&cookie), None).await;
    assert_eq!(gone.status, StatusCode::SEE_OTHER);
    assert_eq!(gone.header("location"), Some("/console/login"));
}

#[tokio::test]
async fn pricing_is_public_and_cacheable_and_assets_are_served() {
    let (_db, api) = harness().await;
    let pricing = page(&api.app, "GET", "/pricing", None, None).await;
    assert_eq!(pricing.status, StatusCode::OK);
    assert_eq!(pricing.header("cache-control"), Some("public, max-age=300"));
    assert!(pricing.body.contains("data-plan=\"FREE\"") && pricing.body.contains("100 per day"));
    assert!(pricing.body.contains("data-plan=\"PRO\""));
    assert!(
        !pricing.body.contains("acme-custom"),
        "a plan that is neither self-serve nor the fallback is not published"
    );
    for (asset, kind) in [
        ("tally.css", "text/css"),
        ("pages.js", "text/javascript"),
        ("paywall.js", "text/javascript"),
        ("theme.css", "text/css"),
    ] {
        let served = page(&api.app, "GET", &format!("/assets/{asset}"), None, None).await;
        assert_eq!(served.status, StatusCode::OK, "{asset}");
        assert!(
            served.header("content-type").unwrap().starts_with(kind),
            "{asset}"
        );
    }
    let missing = page(&api.app, "GET", "/assets/..%2Fsecrets", None, None).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_customer_edits_its_alerts_on_a_self_serve_plan_only() {
    let (db, api) = harness().await;
    // FREE is not self-serve: no form, and a forged one is refused by the API's rule.
    let (cookie, _) = open_portal(&api, "acme").await;
    let shown = page(&api.app, "GET", "/portal/alerts", Some(&cookie), None).await;
    assert!(!shown.body.contains("Add the alert") && shown.body.contains("contact us"));
    let form = format!("csrf={}&meter=api_calls&percent=80", shown.csrf());
    let refused = page(
        &api.app,
        "POST",
        "/portal/alerts",
        Some(&cookie),
        Some(&form),
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(refused.body.contains("NOT_SELF_SERVE"), "{}", refused.body);

    // PRO is: add a rule and remove it, each with the CSRF token.
    let (cookie, _) = open_portal(&api, "gamma").await;
    let shown = page(&api.app, "GET", "/portal/alerts", Some(&cookie), None).await;
    assert!(shown.body.contains("Add the alert"));
    let forged = page(
        &api.app,
        "POST",
        "/portal/alerts",
        Some(&cookie),
        Some("meter=api_calls&percent=80"),
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let form = format!("csrf={}&meter=api_calls&percent=80", shown.csrf());
    let added = page(
        &api.app,
        "POST",
        "/portal/alerts",
        Some(&cookie),
        Some(&form),
    )
    .await;
    assert_eq!(added.status, StatusCode::SEE_OTHER, "{}", added.body);
    let (rule_id, created_by): (i64, String) =
        sqlx::query_as("SELECT rule_id, created_by FROM alert_rules WHERE customer_id = 'gamma'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(created_by.starts_with("token:portal:"), "{created_by}");
    let listed = page(&api.app, "GET", "/portal/alerts", Some(&cookie), None).await;
    assert!(listed.body.contains("api_calls reaches 80 % of its limit"));
    let form = format!("csrf={}", listed.csrf());
    let removed = page(
        &api.app,
        "POST",
        &format!("/portal/alerts/{rule_id}/delete"),
        Some(&cookie),
        Some(&form),
    )
    .await;
    assert_eq!(removed.status, StatusCode::SEE_OTHER, "{}", removed.body);
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM alert_rules WHERE customer_id = 'gamma'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(left, 0);
    // At most 20 made a day (the one above counts), and the team's rules are not the
    // customer's to delete.
    for n in 0..19 {
        let form = format!("csrf={}&credit_balance_below={n}", listed.csrf());
        let added = page(
            &api.app,
            "POST",
            "/portal/alerts",
            Some(&cookie),
            Some(&form),
        )
        .await;
        assert_eq!(added.status, StatusCode::SEE_OTHER, "{n}: {}", added.body);
    }
    let form = format!("csrf={}&credit_balance_below=99", listed.csrf());
    let refused = page(
        &api.app,
        "POST",
        "/portal/alerts",
        Some(&cookie),
        Some(&form),
    )
    .await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert!(refused.body.contains("TOO_MANY_ALERT_RULES"));
    let (status, team) = api
        .call(
            "POST",
            "/v1/customers/{id}/alerts",
            "/v1/customers/gamma/alerts",
            ADMIN,
            Some(json!({ "meter": "api_calls", "percent": 50 })),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{team}");
    let form = format!("csrf={}", listed.csrf());
    let path = format!("/portal/alerts/{}/delete", team["rule_id"]);
    let refused = page(&api.app, "POST", &path, Some(&cookie), Some(&form)).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
}

#[tokio::test]
async fn one_meter_too_large_to_chart_leaves_the_others_and_the_csv_says_which() {
    let (db, api) = harness().await;
    // 10,001 models this hour: more points than the usage API answers.
    sqlx::query(
        "INSERT INTO usage_minute (customer_id, meter, window_start, group_key, value, event_count, first_updated, last_updated)
         SELECT 'gamma', 'tokens', date_trunc('minute', now()), '{\"model\":\"m' || i || '\"}', 1, 1, now(), now()
         FROM generate_series(0, 10000) AS i",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let (cookie, _) = open_portal(&api, "gamma").await;
    let usage = page(
        &api.app,
        "GET",
        "/portal/usage?range=today",
        Some(&cookie),
        None,
    )
    .await;
    assert_eq!(usage.status, StatusCode::OK, "{}", usage.body);
    assert!(
        usage.body.contains("data-meter=\"api_calls\""),
        "the other meter is charted"
    );
    assert!(
        usage.body.contains("more than 10000 points"),
        "{}",
        usage.body
    );
    let csv = page(
        &api.app,
        "GET",
        "/portal/usage.csv?range=today",
        Some(&cookie),
        None,
    )
    .await;
    assert_eq!(csv.status, StatusCode::BAD_REQUEST);
    assert!(
        csv.body.contains("tokens: more than 10000 points"),
        "{}",
        csv.body
    );
}

#[tokio::test]
async fn a_customers_portal_sessions_share_one_rate_and_the_ledger_reads_newest_first() {
    let (db, api) = harness().await;
    let (first, _) = open_portal(&api, "acme").await;
    let (second, _) = open_portal(&api, "acme").await;
    // serve.rate_limits.customer: a burst of 60, for the customer, however many sessions.
    let mut refused = 0;
    // 100 requests, 50 a session: within a session's burst, beyond the customer's (unless the
    // loop took over 2 s, refilled at 20 a second).
    for n in 0..100 {
        let cookie = if n % 2 == 0 { &first } else { &second };
        let shown = page(&api.app, "GET", "/portal/invoices", Some(cookie), None).await;
        if shown.status == StatusCode::TOO_MANY_REQUESTS {
            refused += 1;
        }
    }
    assert!(refused > 0, "{refused} of 100 refused");
    // Another customer has its own.
    let (other, _) = open_portal(&api, "beta").await;
    let shown = page(&api.app, "GET", "/portal/invoices", Some(&other), None).await;
    assert_eq!(shown.status, StatusCode::OK);

    // The ledger newest first, paged with next_before.
    for n in 1..=3 {
        let (status, body) = api
            .call(
                "POST",
                "/v1/customers/{id}/credits/grants",
                "/v1/customers/beta/credits/grants",
                ADMIN,
                Some(json!({ "kind": "purchased", "amount": n, "idempotency_key": format!("g{n}"), "reason": "test" })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let template = "/v1/customers/{id}/credits/ledger";
    let (_, newest) = api
        .call(
            "GET",
            template,
            "/v1/customers/beta/credits/ledger?order=newest&limit=2",
            ADMIN,
            None,
        )
        .await;
    let amounts: Vec<&str> = newest["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["amount"].as_str().unwrap())
        .collect();
    assert_eq!(amounts, ["3", "2"]);
    let before = newest["next_before"].as_i64().unwrap();
    let (_, rest) = api
        .call(
            "GET",
            template,
            &format!("/v1/customers/beta/credits/ledger?order=newest&before={before}"),
            ADMIN,
            None,
        )
        .await;
    assert_eq!(rest["entries"][0]["amount"], "1");
    let (status, _) = api
        .call(
            "GET",
            template,
            "/v1/customers/beta/credits/ledger?order=newest&after=1",
            ADMIN,
            None,
        )
        .await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "after pages the other order"
    );

    // A console session is not a portal session: DELETE /v1/portal-sessions/{id} ends none.
    let login = console_login(&api).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    let console_id: String =
        sqlx::query_scalar("SELECT id::text FROM web_sessions WHERE kind = 'console'")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let (status, _) = revoke(&api, &console_id).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let still = page(&api.app, "GET", "/console", Some(&login.cookie()), None).await;
    assert_eq!(still.status, StatusCode::OK);
}
