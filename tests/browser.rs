//! tally's pages in a real browser: Debian's Chromium, headless, driven through chromedriver
//! (WebDriver, the `fantoccini` client) against the built `tally serve` on Postgres, with the
//! windows written by `tally aggregate --once` from events sent through the (mock) broker.
//!
//! What a person sees is checked against the API: the overview's figures, the usage bar's
//! colour at 69, 70, 89 and 90 % (its computed fill), the chart's points and the CSV. Every
//! page is checked by axe-core (no serious or critical violation), the browser's console must
//! stay free of errors (a CSP violation is one), and every page is photographed at desktop and
//! phone widths (target/browser-screenshots/). The attacks: a customer id and a dimension value
//! carrying `<script>` and `"><img onerror>` render as text; a portal session opens nothing of
//! the API; a console change without the CSRF token is refused; pages cannot be framed. The
//! paywall opens on a real 429 and 402 from tally-quota's middleware in a team's app on another
//! origin, and is used with the keyboard.
//!
//! Needs `chromium`, `chromedriver` and axe-core: scripts/test.sh installs them
//! (scripts/lib/tools.sh) and exports TALLY_AXE_JS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::http;
use axum::routing::{get, post};
use axum::{Extension, Router};
use fantoccini::wd::WebDriverCompatibleCommand;
use fantoccini::{Client, ClientBuilder, Locator};
use rust_decimal::Decimal;
use serde_json::{json, Value};
use tally_core::UsageEvent;
use tally_quota::layer::{AuthenticatedCustomer, QuotaLayer, UsageQuantity};
use tally_quota::Quota;
use tally_tests::*;

const ADMIN: &str = "browser-admin-token-0123456789abcdef";
/// A customer id and a dimension value an attacker chose.
const HOSTILE: &str = "evil\"><img src=x onerror=alert(1)><script>alert(2)</script>";
const HOSTILE_MODEL: &str = "<script>alert(3)</script>\"><img src=y onerror=alert(4)>";

const PLANS: &str = r#"
[subscriptions]
fallback_plan = "FREE"

[[credits.rates]]
meter = "tokens"
credits_per_unit = "1"

[[plans]]
name = "FREE"
features = { api = true, sso = false }
[plans.limits.api_calls]
limit = "100"
period = "day"
[plans.limits.tokens]
limit = "-1"
period = "month"

[[plans]]
name = "PRO"
self_serve = true
features = { api = true, sso = true }
price = { amount = "49.00", currency = "usd", interval = "month" }
[plans.limits.api_calls]
limit = "100000"
period = "billing_period"
unit_price = "0.002"

[[plans]]
name = "PREPAID"
features = { api = true }
[plans.limits.tokens]
enforcement = "credits"
"#;

/// chromedriver and one Chromium session.
struct Browser {
    client: Client,
    _driver: KillOnDrop,
    shots: PathBuf,
    axe: String,
}

/// chromedriver's log endpoint (not in W3C WebDriver; Selenium's clients use it too).
#[derive(Debug)]
struct BrowserLog;

impl WebDriverCompatibleCommand for BrowserLog {
    fn endpoint(
        &self,
        base: &url::Url,
        session: Option<&str>,
    ) -> Result<url::Url, url::ParseError> {
        base.join(&format!("session/{}/se/log", session.unwrap_or_default()))
    }

    fn method_and_body(&self, _: &url::Url) -> (http::Method, Option<String>) {
        (http::Method::POST, Some(r#"{"type":"browser"}"#.into()))
    }
}

impl Browser {
    async fn start() -> Browser {
        let driver_binary = which("chromedriver");
        let port = free_port();
        let driver = KillOnDrop(
            std::process::Command::new(driver_binary)
                .arg(format!("--port={port}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("chromedriver starts"),
        );
        wait_until("chromedriver listens", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let profile = tempfile::tempdir().unwrap().keep();
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": which("chromium"),
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--disable-quic", "--no-first-run", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.display()),
                ],
            }),
        );
        capabilities.insert("goog:loggingPrefs".into(), json!({ "browser": "ALL" }));
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .expect("a Chromium session");
        let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/browser-screenshots");
        std::fs::create_dir_all(&shots).unwrap();
        Browser {
            client,
            _driver: driver,
            shots,
            axe: std::fs::read_to_string(axe_path()).expect("axe-core (scripts/lib/tools.sh)"),
        }
    }

    /// A single-use link (portal or console): its page, then its button, as a person does.
    async fn open_link(&self, url: &str) {
        self.goto(url).await;
        self.client
            .find(Locator::Id("open"))
            .await
            .unwrap_or_else(|e| panic!("{url}: the link's button: {e}"))
            .click()
            .await
            .unwrap();
        let start = std::time::Instant::now();
        while self
            .client
            .current_url()
            .await
            .unwrap()
            .path()
            .contains("/session/")
        {
            if start.elapsed() > Duration::from_secs(10) {
                let page = self.client.source().await.unwrap_or_default();
                let errors = self.console_errors().await;
                panic!("{url} opened nothing: {page}\n{errors:#?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn goto(&self, url: &str) {
        self.client
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}"));
    }

    async fn js(&self, script: &str) -> Value {
        self.client
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("{script}: {e}"))
    }

    async fn attr(&self, css: &str, name: &str) -> Option<String> {
        let element = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        element.attr(name).await.unwrap()
    }

    /// What the page shows of `css` (its text).
    async fn text(&self, css: &str) -> String {
        let element = self
            .client
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        element.text().await.unwrap()
    }

    /// axe-core's serious and critical violations on the page as it is now.
    async fn accessible(&self, page: &str) {
        self.js(&self.axe).await;
        let result = self
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1];
                 axe.run(document, { resultTypes: ['violations'] })
                    .then(r => done(r.violations.map(v => ({ id: v.id, impact: v.impact, help: v.help,
                        nodes: v.nodes.slice(0, 3).map(n => n.html) }))))
                    .catch(e => done([{ id: 'axe-error', impact: 'critical', help: String(e), nodes: [] }]));",
                vec![],
            )
            .await
            .unwrap();
        let serious: Vec<&Value> = result
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| matches!(v["impact"].as_str(), Some("serious" | "critical")))
            .collect();
        assert!(
            serious.is_empty(),
            "{page}: accessibility violations: {serious:#?}"
        );
    }

    /// The browser's console errors since the last call (CSP violations, script errors,
    /// failed loads).
    async fn console_errors(&self) -> Vec<String> {
        let log = self
            .client
            .issue_cmd(BrowserLog)
            .await
            .expect("chromedriver's browser log");
        log.as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["level"] == "SEVERE")
            .map(|entry| entry["message"].as_str().unwrap_or_default().to_owned())
            // The browser asks every site for its icon; tally serves none.
            .filter(|message| !message.contains("favicon.ico"))
            .collect()
    }

    /// Screenshots at desktop and phone widths; then axe and the console.
    async fn check(&self, name: &str) {
        for (label, width, height) in [("desktop", 1280u32, 900u32), ("phone", 390, 844)] {
            self.client.set_window_size(width, height).await.unwrap();
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(self.shots.join(format!("{name}-{label}.png")), png).unwrap();
        }
        self.client.set_window_size(1280, 900).await.unwrap();
        self.accessible(name).await;
        let errors = self.console_errors().await;
        assert!(errors.is_empty(), "{name}: console errors: {errors:#?}");
        let inline: Value = self
            .js("return [document.querySelectorAll('script:not([src])').length, document.querySelectorAll('[onerror], [onclick], [onload]').length, !!window.__pwned];")
            .await;
        assert_eq!(
            inline,
            json!([0, 0, false]),
            "{name}: markup a page never writes"
        );
    }
}

fn which(binary: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{binary} is not installed: run scripts/test.sh (it installs Debian's chromium and chromium-driver), or apt-get install chromium chromium-driver"))
}

fn axe_path() -> PathBuf {
    if let Some(path) = std::env::var_os("TALLY_AXE_JS") {
        return path.into();
    }
    let tools = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/tools");
    std::fs::read_dir(&tools)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path().join("node_modules/axe-core/axe.min.js"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("axe-core is missing: run scripts/test.sh (scripts/lib/tools.sh fetches it into target/tools)"))
}

/// The API as the admin token.
struct Api(JsonApi);

impl Api {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.0.call(method, path, ADMIN, body)
    }

    fn get(&self, path: &str) -> Value {
        let (status, body) = self.call("GET", path, None);
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    /// A portal link for `customer`.
    fn portal(&self, customer: &str) -> String {
        let (status, session) = self.call(
            "POST",
            &format!(
                "/v1/customers/{}/portal-sessions",
                tally_api::url_part(customer)
            ),
            Some(json!({})),
        );
        assert_eq!(status, 200, "{session}");
        session["url"].as_str().unwrap().to_owned()
    }
}

/// A team's app on an origin of its own, behind tally-quota's middleware, with the paywall
/// script: `/search` counts `api_calls` (hard limit), `/generate` `tokens` (paid by credits).
async fn team_app(
    quota: Arc<Quota>,
    emitter: Arc<tally_emitter::Emitter>,
    tally: String,
) -> String {
    let page = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Team app</title>\
         <script src=\"{tally}/assets/paywall.js\" data-upgrade-url=\"/upgrade\" data-credits-url=\"/credits\" defer></script>\
         <script src=\"/app.js\" defer></script></head><body><main><h1>Team app</h1>\
         <button id=\"search\" type=\"button\">Search</button> <button id=\"generate\" type=\"button\">Generate</button>\
         <p id=\"out\" role=\"status\"></p></main></body></html>"
    );
    let script = "document.getElementById('search').addEventListener('click', () => fetch('/search?customer=paywalled').then(r => { document.getElementById('out').textContent = 'search ' + r.status; }));\n\
                  document.getElementById('generate').addEventListener('click', () => fetch('/generate?customer=broke', { method: 'POST' }).then(r => { document.getElementById('out').textContent = 'generate ' + r.status; }));";
    async fn authenticate(
        mut request: axum::extract::Request,
        next: axum::middleware::Next,
    ) -> axum::response::Response {
        // A toy: the test's app trusts its query; a real one its session.
        let customer = request
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("customer="))
            .map(str::to_owned);
        if let Some(customer) = customer {
            request
                .extensions_mut()
                .insert(AuthenticatedCustomer(customer));
        }
        next.run(request).await
    }
    let app = Router::new()
        .route("/", get(move || async move { axum::response::Html(page) }))
        .route(
            "/app.js",
            get(move || async move { ([("content-type", "text/javascript")], script) }),
        )
        .route(
            "/search",
            get(|| async { "ok" }).layer(QuotaLayer::new(
                quota.clone(),
                emitter.clone(),
                "api_calls",
            )),
        )
        .route(
            "/generate",
            post(|| async { (Extension(UsageQuantity(Decimal::from(10))), "ok") })
                .layer(QuotaLayer::new(quota, emitter, "tokens").quantity(Decimal::from(10))),
        )
        .layer(axum::middleware::from_fn(authenticate));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

#[test]
fn tallys_pages_in_a_real_browser() {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let broker = Broker::start();
    let address = format!("127.0.0.1:{}", free_port());
    let base = format!("http://{address}");
    let work = Workdir::new(
        &broker.kafka,
        "http://127.0.0.1:9/",
        &format!(
            "[serve]\nlisten = \"{address}\"\n\n[serve.web]\nconsole = true\n\n[[serve.tokens]]\nname = \"ops\"\nscope = \"admin\"\nsha256 = \"{}\"\n\n\
             [aggregator]\nbatch_max_wait = \"100ms\"\n{PLANS}",
            tally_api::token_hash(ADMIN),
        ),
    );
    let tally = |args: &[&str]| {
        let (ok, out) = work.run(&db.url, args);
        assert!(ok, "tally {args:?}:\n{out}");
        out
    };
    tally(&["migrate"]);
    tally(&["plans", "apply"]);
    let customers = ["c69", "c70", "c89", "c90", "paywalled", HOSTILE];
    for customer in customers {
        tally(&[
            "subscriptions",
            "create",
            customer,
            "FREE",
            "--reason",
            "signed up",
        ]);
    }
    tally(&[
        "subscriptions",
        "create",
        "broke",
        "PREPAID",
        "--reason",
        "prepaid",
    ]);

    // Usage through the broker and the aggregator: 69, 70, 89, 90 and 100 of 100 calls.
    let emitter = TestEmitter::start(&broker.kafka);
    let mut n = 0;
    let mut send = |customer: &str, meter: &str, quantity: i64, model: Option<&str>| {
        n += 1;
        let mut event = UsageEvent::new(customer, meter, Decimal::from(quantity))
            .with_id(format!("browser-{n}"))
            .at(chrono::Utc::now() - chrono::TimeDelta::seconds(5));
        if let Some(model) = model {
            event = event.with_dimension("model", model);
        }
        emitter.emit(event).unwrap();
    };
    for (customer, calls) in [
        ("c69", 69),
        ("c70", 70),
        ("c89", 89),
        ("c90", 90),
        ("paywalled", 100),
    ] {
        send(customer, "api_calls", calls, None);
    }
    send(HOSTILE, "api_calls", 12, None);
    send(HOSTILE, "tokens", 700, Some(HOSTILE_MODEL));
    send(HOSTILE, "tokens", 300, Some("small"));
    emitter.flush(Duration::from_secs(30)).unwrap();
    tally(&["aggregate", "--once"]);

    let _serve = work.spawn("serve", &db.url, &["serve"]);
    wait_until("tally serve listens", Duration::from_secs(30), || {
        std::net::TcpStream::connect(&address).is_ok()
    });
    let api = Api(JsonApi {
        address: address.clone(),
    });

    runtime.block_on(async {
        let browser = Browser::start().await;

        // Usage bars: green under 70 %, amber under 90 %, red from 90 % (the colour the
        // browser paints, not only the class).
        for (customer, level, colour) in [
            ("c69", "green", "rgb(26, 127, 55)"),
            ("c70", "amber", "rgb(191, 135, 0)"),
            ("c89", "amber", "rgb(191, 135, 0)"),
            ("c90", "red", "rgb(207, 34, 46)"),
        ] {
            browser.open_link(&api.portal(customer)).await;
            let row = "[data-meter=\"api_calls\"]";
            assert_eq!(browser.attr(row, "data-level").await.as_deref(), Some(level), "{customer}");
            let fill = browser
                .js("return getComputedStyle(document.querySelector('[data-meter=\"api_calls\"] .fill')).fill;")
                .await;
            assert_eq!(fill, json!(colour), "{customer}");
            // Unlimited is said, not drawn.
            assert_eq!(browser.attr("[data-meter=\"tokens\"]", "data-level").await.as_deref(), Some("unlimited"));
            if customer == "c90" {
                browser.check("portal-overview").await;
            }
        }

        // The hostile customer's portal: every page, its numbers against the API's.
        browser.open_link(&api.portal(HOSTILE)).await;
        assert_eq!(browser.client.current_url().await.unwrap().path(), "/portal", "the link's secret leaves the address bar");
        let picture = api.get(&format!("/v1/customers/{}", tally_api::url_part(HOSTILE)));
        assert_eq!(browser.text("[data-field=plan]").await, picture["subscription"]["plan"].as_str().unwrap());
        assert_eq!(browser.text("[data-field=projected]").await, picture["invoice_preview"]["total"].as_str().unwrap());
        let credits = api.get(&format!("/v1/customers/{}/credits", tally_api::url_part(HOSTILE)));
        assert_eq!(browser.text("[data-field=credits]").await, credits["available"].as_str().unwrap());
        assert!(browser.text(".who").await.contains(HOSTILE), "the id is shown as text");
        browser.check("portal-overview-hostile").await;

        browser.goto(&format!("{base}/portal/usage?range=today")).await;
        let points = browser
            .js("return Array.from(document.querySelectorAll('svg.chart[data-meter=\"tokens\"] g')).map(g => [g.getAttribute('data-series'), Array.from(g.querySelectorAll('circle')).map(c => c.getAttribute('data-value'))]);")
            .await;
        let midnight = chrono::Utc::now().date_naive().and_time(chrono::NaiveTime::MIN).and_utc();
        let usage = api.get(&format!(
            "/v1/customers/{}/usage?meter=tokens&from={}&to={}&granularity=hour&group_by=true",
            tally_api::url_part(HOSTILE),
            tally_api::url_part(&midnight.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            tally_api::url_part(&(chrono::Utc::now() + chrono::TimeDelta::minutes(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        ));
        let expected: Vec<Value> = usage["series"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| json!([s["group_key"], s["points"].as_array().unwrap().iter().map(|p| p["value"].clone()).collect::<Vec<_>>()]))
            .collect();
        assert_eq!(points, json!(expected), "the chart's points are the API's");
        assert_eq!(expected.len(), 2, "a series per model: {expected:?}");
        let legend = browser.text(".legend").await;
        assert!(legend.contains(&format!("model={HOSTILE_MODEL}")), "the dimension value is text: {legend}");
        let csv = browser
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1]; fetch('/portal/usage.csv?range=today').then(r => r.text()).then(done);",
                vec![],
            )
            .await
            .unwrap();
        let csv = csv.as_str().unwrap();
        assert!(csv.contains("\"tokens\",\"{\"\"model\"\":\"\"small\"\"}\""), "{csv}");
        for value in ["\"700\"", "\"300\"", "\"12\""] {
            assert!(csv.contains(value), "{value} in {csv}");
        }
        browser.check("portal-usage").await;
        for page in ["credits", "invoices", "plans", "alerts"] {
            browser.goto(&format!("{base}/portal/{page}")).await;
            browser.check(&format!("portal-{page}")).await;
        }
        // A portal session opens nothing of the API: cookies are not tokens.
        let status = browser
            .client
            .execute_async(
                "const done = arguments[arguments.length - 1]; fetch('/v1/customers/c70').then(r => done(r.status));",
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(status, json!(401));
        // A used link opens nothing; logging out ends the session.
        let link = api.portal("c70");
        browser.open_link(&link).await;
        browser.goto(&link).await;
        let page = browser.client.source().await.unwrap();
        assert!(page.contains("PORTAL_LINK_USED"), "a used link is refused: {page}");
        browser.goto(&format!("{base}/portal")).await;
        browser.client.find(Locator::Css("form.logout button")).await.unwrap().click().await.unwrap();
        wait_until_async(&browser, "the portal says goodbye", || async {
            browser.client.source().await.unwrap().contains("You have left the billing portal")
        })
        .await;
        browser.goto(&format!("{base}/portal")).await;
        assert!(browser.client.source().await.unwrap().contains("PORTAL_SESSION_ENDED"));
        // The 401s just seen are in the console: the console is really read.
        let seen = browser.console_errors().await;
        assert!(seen.iter().any(|e| e.contains("401")), "{seen:#?}");

        browser.goto(&format!("{base}/pricing")).await;
        assert!(browser.text("[data-plan=FREE] [data-meter=tokens]").await.contains('∞'));
        assert!(browser.text("[data-plan=PRO] .price").await.contains("49.00 USD / month"));
        browser.check("pricing").await;

        // The console, used with the keyboard: the token typed, Enter.
        browser.goto(&format!("{base}/console")).await;
        assert_eq!(browser.client.current_url().await.unwrap().path(), "/console/login");
        browser.check("console-login").await;
        let field = browser.client.find(Locator::Id("token")).await.unwrap();
        field.send_keys(&format!("{ADMIN}{}", char::from(fantoccini::key::Key::Enter))).await.unwrap();
        wait_for_path(&browser, "/console").await;
        let source = browser.client.source().await.unwrap();
        assert!(!source.contains(ADMIN), "the token is not in the page");
        browser.check("console-pipeline").await;
        browser.goto(&format!("{base}/console/customers?q=c")).await;
        browser.check("console-customers").await;
        browser.goto(&format!("{base}/console/customers/{}", tally_api::url_part(HOSTILE))).await;
        assert_eq!(browser.text("[data-field=customer]").await, HOSTILE);
        browser.check("console-customer").await;
        // Grant credits from the form, by keyboard, with the reason the audit keeps.
        browser.client.find(Locator::Id("amount")).await.unwrap().send_keys("25").await.unwrap();
        let reason = browser.client.find(Locator::Id("grant-reason")).await.unwrap();
        reason.send_keys("goodwill").await.unwrap();
        browser.js("document.getElementById('kind').value = 'purchased';").await;
        reason.send_keys(&char::from(fantoccini::key::Key::Enter).to_string()).await.unwrap();
        wait_until_async(&browser, "the grant is shown", || async {
            browser.client.source().await.unwrap().contains("Done: credits granted")
        })
        .await;
        let credits = api.get(&format!("/v1/customers/{}/credits", tally_api::url_part(HOSTILE)));
        assert_eq!(credits["available"], json!("25"), "{credits}");
        assert_eq!(browser.text("[data-field=available]").await, "25");
        // A change without the CSRF token is refused, and nothing changes.
        let status = browser
            .client
            .execute_async(
                &format!(
                    "const done = arguments[arguments.length - 1];
                     fetch('/console/customers/{}/grants', {{ method: 'POST', headers: {{ 'content-type': 'application/x-www-form-urlencoded' }},
                       body: 'kind=purchased&amount=1000&idempotency_key=forged&reason=forged' }}).then(r => done(r.status));",
                    tally_api::url_part(HOSTILE)
                ),
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(status, json!(403));
        let credits = api.get(&format!("/v1/customers/{}/credits", tally_api::url_part(HOSTILE)));
        assert_eq!(credits["available"], json!("25"));
        let _ = browser.console_errors().await; // the 403 just seen is expected
        for page in ["alerts", "stripe"] {
            browser.goto(&format!("{base}/console/{page}")).await;
            browser.check(&format!("console-{page}")).await;
        }

        // The paywall, in the team's app, on a real 429 and 402 from the middleware.
        let quota = Arc::new(Quota::new(db.pool.clone(), Duration::from_millis(250)).await.unwrap());
        let app = team_app(quota, emitter.emitter.clone(), base.clone()).await;
        browser.goto(&app).await;
        for (button, code, words) in [
            ("search", "LIMIT_EXCEEDED", "You have used 100 of 100 api_calls."),
            ("generate", "INSUFFICIENT_CREDITS", "Your balance is 0 credits; this needs 10."),
        ] {
            let trigger = browser.client.find(Locator::Id(button)).await.unwrap();
            browser.js(&format!("document.getElementById('{button}').focus();")).await;
            trigger.send_keys(&char::from(fantoccini::key::Key::Enter).to_string()).await.unwrap();
            let dialog = browser
                .client
                .wait()
                .at_most(Duration::from_secs(10))
                .for_element(Locator::Css("dialog.tally-paywall[open]"))
                .await
                .unwrap_or_else(|e| panic!("{button}: the paywall opens: {e}"));
            assert_eq!(dialog.attr("data-code").await.unwrap().as_deref(), Some(code));
            let text = dialog.text().await.unwrap();
            assert!(text.contains(words), "{button}: {text}");
            let focused = browser.js("return document.activeElement.className;").await;
            assert_eq!(focused, json!("tally-paywall-action"), "the action has the focus");
            browser.accessible(&format!("paywall-{button}")).await;
            let png = browser.client.screenshot().await.unwrap();
            std::fs::write(browser.shots.join(format!("paywall-{button}-desktop.png")), png).unwrap();
            browser
                .client
                .active_element()
                .await
                .unwrap()
                .send_keys(&char::from(fantoccini::key::Key::Escape).to_string())
                .await
                .unwrap();
            wait_until_async(&browser, "Escape closes the paywall", || async {
                browser.js("return document.querySelector('dialog.tally-paywall') === null;").await == json!(true)
            })
            .await;
            let focused = browser.js("return document.activeElement.id;").await;
            assert_eq!(focused, json!(button), "the focus returns to the button");
        }
        // The 429 and 402 are what the page's fetches got; nothing else went wrong.
        let errors: Vec<String> = browser
            .console_errors()
            .await
            .into_iter()
            .filter(|e| !e.contains("429") && !e.contains("402"))
            .collect();
        assert!(errors.is_empty(), "{errors:#?}");
        browser.client.close().await.unwrap();
    });

    // Framing: the console never, the portal and the pricing page only for configured origins
    // (none here); every page with nosniff and no referrer to other sites.
    for path in ["/console/login", "/pricing", "/portal"] {
        let (_, head) = http_head(&address, path);
        assert!(head.contains("frame-ancestors 'none'"), "{path}: {head}");
        assert!(head.contains("x-frame-options: DENY"), "{path}: {head}");
        assert!(
            head.contains("x-content-type-options: nosniff"),
            "{path}: {head}"
        );
        assert!(
            head.contains("referrer-policy: same-origin"),
            "{path}: {head}"
        );
        assert!(
            head.contains("script-src 'self'") && !head.contains("unsafe-inline"),
            "{path}: {head}"
        );
    }
    let log = work.log("serve");
    assert!(!log.contains(ADMIN), "the admin token is never logged");
}

/// The status line and headers of a GET (lowercase names).
fn http_head(address: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    let head = text.split("\r\n\r\n").next().unwrap_or_default().to_owned();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head)
}

async fn wait_for_path(browser: &Browser, path: &str) {
    wait_until_async(browser, &format!("the browser is at {path}"), || async {
        browser
            .client
            .current_url()
            .await
            .map(|u| u.path() == path)
            .unwrap_or(false)
    })
    .await;
}

async fn wait_until_async<F, Fut>(_browser: &Browser, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < deadline {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting until {what}");
}
