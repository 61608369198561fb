//! tally's pages, served by `tally serve` beside the API: the customer portal (`/portal`), the
//! pricing page (`/pricing`), the paywall script (`/assets/paywall.js`) and the operator
//! console (`/console`).
//!
//! Server-rendered HTML with a little dependency-free JavaScript, all compiled into the binary:
//! no build step, no second server, and a page is one round trip. A page's numbers are the
//! API's: each page asks the API in-process (`Web::call`, as the session's caller: a
//! customer-scope caller for the portal, the logged-in admin token for the console), so a page
//! can show nothing the same caller could not read, and nothing computed differently.
//!
//! - `html.rs`: escaping and the page frame. `chart.rs`: usage charts as SVG.
//! - `sessions.rs`: portal and console sessions, cookies, CSRF tokens.
//! - `portal.rs`, `pricing.rs`, `console.rs`: the pages and their forms.
//! - `assets.rs`: the stylesheet and scripts (`assets/`).
//! - `portal_sessions.rs`: `POST /v1/customers/{id}/portal-sessions` and its revocation (API).
//!
//! Every answer carries a strict Content-Security-Policy (scripts and styles from tally only,
//! no inline script or style), `nosniff`, a same-origin referrer policy and `frame-ancestors`:
//! none for the console, `serve.web.frame_origins` for the portal and the pricing page.

mod assets;
mod chart;
mod console;
pub(crate) mod html;
mod portal;
pub(crate) mod portal_sessions;
mod pricing;
pub(crate) mod sessions;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tower::ServiceExt;

use crate::auth::{Caller, OnBehalf};
use crate::config::{Rate, ServeConfig, WebConfig};
use crate::error::ErrorReport;
use crate::{telemetry, ApiState};
use html::{Area, Esc, Frame};
use sessions::{Kind, Session};

/// Largest API answer a page reads (the usage API's answers are bounded well below).
const MAX_API_ANSWER: usize = 8 << 20;

/// A single-use link to the console for the admin token `token` named `token_name` (`tally
/// demo` prints one), valid for `ttl`, at most a day.
pub async fn console_link(
    pool: &sqlx::PgPool,
    public_url: &str,
    token_name: &str,
    token: &str,
    ttl: std::time::Duration,
) -> Result<String, sqlx::Error> {
    let ttl = chrono::TimeDelta::from_std(ttl)
        .unwrap_or(chrono::TimeDelta::hours(1))
        .min(chrono::TimeDelta::days(1));
    let expires_at = chrono::Utc::now() + ttl;
    let link =
        sessions::create_console_link(pool, token_name, token, expires_at, "tally demo").await?;
    Ok(format!(
        "{}/console/session/{link}",
        public_url.trim_end_matches('/')
    ))
}

/// A portal link for `customer`, valid for `ttl` (`tally demo` prints one; the API's
/// `POST /v1/customers/{id}/portal-sessions` is the way for an app).
pub async fn portal_link(
    pool: &sqlx::PgPool,
    public_url: &str,
    customer: &str,
    ttl: std::time::Duration,
) -> Result<String, sqlx::Error> {
    let ttl = chrono::TimeDelta::from_std(ttl)
        .unwrap_or(chrono::TimeDelta::hours(1))
        .min(chrono::TimeDelta::days(1));
    let expires_at = chrono::Utc::now() + ttl;
    let (_, link) = sessions::create_portal(pool, customer, expires_at, None, "tally demo").await?;
    Ok(format!(
        "{}/portal/session/{link}",
        public_url.trim_end_matches('/')
    ))
}

/// What the pages share.
pub(crate) struct Web {
    pub(crate) state: Arc<ApiState>,
    /// The API's routes, with their state: what `call` asks.
    api: Router,
    pub(crate) config: WebConfig,
    /// Where links to tally point: `serve.web.public_url`, else `http://` + `serve.listen`.
    pub(crate) public_url: String,
    /// `Content-Security-Policy` of the portal and the pricing page, and of the console.
    portal_policy: HeaderValue,
    console_policy: HeaderValue,
    /// Requests per second of one customer's portal sessions together
    /// (`serve.rate_limits.customer`).
    portal_rate: Rate,
    portal_buckets: Mutex<HashMap<String, (f64, Instant)>>,
    /// The last (committed offsets, when) the pipeline page saw: its events per second.
    last_committed: Mutex<Option<(i64, Instant)>>,
    /// Kafka's end offsets as last asked, kept a few seconds: one question at a time, however
    /// many console tabs refresh.
    end_offsets: tokio::sync::Mutex<Option<(Instant, EndOffsets)>>,
    /// A question to Kafka still running (librdkafka's call cannot be cancelled).
    asking_kafka: Arc<std::sync::atomic::AtomicBool>,
}

/// Kafka's end offsets by partition, or why they are unknown.
pub(crate) type EndOffsets = Result<std::collections::BTreeMap<i32, i64>, String>;

/// How long the console trusts the end offsets it asked for.
const END_OFFSETS_FRESH: std::time::Duration = std::time::Duration::from_secs(4);

/// Most customers whose portal rate is remembered; beyond, the memory starts again.
const MAX_RATE_BUCKETS: usize = 100_000;

impl Web {
    pub(crate) fn new(state: Arc<ApiState>, api: Router, config: &ServeConfig) -> Web {
        let web = &config.web;
        let public_url = if web.public_url.is_empty() {
            // A listener on every address is reached locally at loopback; anything else needs
            // serve.web.public_url (`tally serve` warns).
            let listen = config
                .listen
                .replacen("0.0.0.0:", "127.0.0.1:", 1)
                .replacen("[::]:", "[::1]:", 1);
            format!("http://{listen}")
        } else {
            web.public_url.trim_end_matches('/').to_owned()
        };
        let frames = if web.frame_origins.is_empty() {
            "'none'".to_owned()
        } else {
            web.frame_origins.join(" ")
        };
        // Forms post to tally, which may send the browser on to Stripe's hosted pages
        // (Checkout, the billing portal): a form's redirects are held to `form-action` too.
        let mut form_action = vec!["'self'".to_owned()];
        form_action.extend(state.billing.page_origins.iter().cloned());
        let policy = |frame_ancestors: &str| {
            let text = format!(
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                 connect-src 'self'; form-action {}; base-uri 'none'; frame-ancestors {frame_ancestors}",
                form_action.join(" ")
            );
            HeaderValue::from_str(&text).unwrap_or_else(|_| {
                HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'")
            })
        };
        Web {
            portal_policy: policy(&frames),
            console_policy: policy("'none'"),
            portal_rate: config.rate_limits.customer,
            portal_buckets: Mutex::new(HashMap::new()),
            last_committed: Mutex::new(None),
            end_offsets: tokio::sync::Mutex::new(None),
            asking_kafka: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            state,
            api,
            config: web.clone(),
            public_url,
        }
    }

    /// Asks the API, in-process, as `caller`: the answer's JSON, or what refused it.
    pub(crate) async fn call(
        &self,
        caller: &Caller,
        method: Method,
        uri: &str,
        body: Option<&Value>,
    ) -> Result<Value, Refusal> {
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Body::from(body.map(Value::to_string).unwrap_or_default()))
            .map_err(|e| Refusal::internal(format!("building {uri}: {e}")))?;
        request.extensions_mut().insert(OnBehalf(caller.clone()));
        let response = match self.api.clone().oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let status = response.status();
        let report = response.extensions().get::<ErrorReport>().cloned();
        let bytes = axum::body::to_bytes(response.into_body(), MAX_API_ANSWER)
            .await
            .map_err(|e| Refusal::internal(format!("reading {uri}: {e}")))?;
        let value: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        Err(Refusal {
            status,
            code: value["code"].as_str().unwrap_or("INTERNAL").to_owned(),
            message: value["message"]
                .as_str()
                .unwrap_or("the request failed")
                .to_owned(),
            report,
        })
    }

    /// Each partition's end offset, asked of Kafka at most every few seconds and waited for at
    /// most 3 s; a question still running is not asked again.
    pub(crate) async fn end_offsets(&self) -> EndOffsets {
        use std::sync::atomic::Ordering;
        let mut cached = self.end_offsets.lock().await;
        if let Some((at, offsets)) = cached.as_ref() {
            if at.elapsed() < END_OFFSETS_FRESH {
                return offsets.clone();
            }
        }
        let Some(kafka) = self.state.pipeline.kafka.clone() else {
            return Err("kafka.brokers is not set".into());
        };
        if self.asking_kafka.swap(true, Ordering::AcqRel) {
            return Err("still waiting for Kafka's answer to the last question".into());
        }
        let asking = self.asking_kafka.clone();
        // librdkafka's call blocks: a thread of its own, which clears the flag when done.
        let question = tokio::task::spawn_blocking(move || {
            // Cleared however the call ends, a panic included.
            struct Asked(Arc<std::sync::atomic::AtomicBool>);
            impl Drop for Asked {
                fn drop(&mut self) {
                    self.0.store(false, Ordering::Release);
                }
            }
            let _asked = Asked(asking);
            tally_aggregator::end_offsets(&kafka, std::time::Duration::from_secs(2))
        });
        let answer = match tokio::time::timeout(std::time::Duration::from_secs(3), question).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(failed)) => Err(failed.to_string()),
            Err(_) => Err("Kafka did not answer within 3 s".into()),
        };
        *cached = Some((Instant::now(), answer.clone()));
        answer
    }

    /// Events per second committed since the pipeline page last looked (`None` the first
    /// time, or when the last look is over a minute old).
    pub(crate) fn events_per_second(&self, committed: i64) -> Option<f64> {
        let now = Instant::now();
        let mut last = self
            .last_committed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let elapsed = last.map(|(_, at)| now.duration_since(at).as_secs_f64());
        // Two looks within half a second: keep the older one, so the rate spans a while.
        if elapsed.is_some_and(|seconds| seconds <= 0.5) {
            return None;
        }
        let rate = match (*last, elapsed) {
            (Some((before, _)), Some(seconds)) if seconds < 60.0 => {
                Some((committed - before).max(0) as f64 / seconds)
            }
            _ => None,
        };
        *last = Some((committed, now));
        rate
    }

    /// Takes one request from a customer's portal bucket.
    fn take(&self, customer: &str) -> bool {
        let now = Instant::now();
        let mut buckets = self
            .portal_buckets
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if buckets.len() >= MAX_RATE_BUCKETS && !buckets.contains_key(customer) {
            buckets.clear();
        }
        let (burst, per_second) = (
            f64::from(self.portal_rate.burst),
            f64::from(self.portal_rate.per_second),
        );
        let (available, at) = buckets.entry(customer.to_owned()).or_insert((burst, now));
        *available = (*available + now.duration_since(*at).as_secs_f64() * per_second).min(burst);
        *at = now;
        if *available >= 1.0 {
            *available -= 1.0;
            true
        } else {
            false
        }
    }
}

/// What an in-process API call answered instead of 2xx.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) code: String,
    pub(crate) message: String,
    report: Option<ErrorReport>,
}

impl Refusal {
    fn internal(detail: String) -> Refusal {
        Refusal {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "INTERNAL".into(),
            message: "internal error; report the request id".into(),
            report: Some(ErrorReport {
                code: "INTERNAL",
                message: "internal error".into(),
                detail: Some(detail),
                keep_body: true,
            }),
        }
    }

    /// Logs what went wrong inside, for a refusal a page shows in part (one meter's chart)
    /// rather than as its answer.
    pub(crate) fn log(&self, what: &str) {
        if let Some(report) = &self.report {
            let detail = report.detail.as_deref().unwrap_or("");
            if self.status.is_server_error() {
                tracing::error!(code = report.code, detail, what, "a page's read failed");
            } else {
                tracing::warn!(
                    code = report.code,
                    detail,
                    what,
                    "a page's read was refused"
                );
            }
        }
    }

    /// An error page in `area`, with the API's status and message (what went wrong inside is
    /// logged under the request id, as for the API).
    pub(crate) fn page(self, area: Area) -> Response {
        let body = format!(
            "{}<p>Code <code>{}</code>.</p>",
            html::message("error", &self.message),
            Esc(&self.code)
        );
        let frame = Frame {
            area,
            title: "Something went wrong",
            current: "",
            who: None,
            csrf: None,
            refresh: None,
        };
        let mut response = (self.status, Html(html::page(&frame, &body))).into_response();
        if let Some(mut report) = self.report {
            report.keep_body = true;
            response.extensions_mut().insert(report);
        }
        response
    }
}

/// `GET …/session/{secret}`: a page with one button that opens the session by POST. A link
/// preview or a browser's prefetch (both GET) does not use the link up, and another site
/// cannot open a session of its choosing in a visitor's browser (the POST must come from this
/// page: [`same_origin`]).
pub(crate) fn link_page(title: &str, explanation: &str, button: &str) -> Response {
    // No autofocus: one held key must not open a link another person sent.
    let frame = Frame {
        area: Area::Public,
        title,
        current: "",
        who: None,
        csrf: None,
        refresh: None,
    };
    // An empty action posts to this same address, secret and all.
    let body = format!(
        "<p>{}</p><form method=\"post\"><button type=\"submit\" id=\"open\">{}</button></form>",
        Esc(explanation),
        Esc(button)
    );
    Html(html::page(&frame, &body)).into_response()
}

/// Whether a POST comes from a page of this server: the browser's `Sec-Fetch-Site` says
/// `same-origin`, or (browsers send it over https and to localhost only) its `Origin` is
/// `serve.web.public_url`'s, or names the host the request was sent to (a proxy may rewrite
/// `Host`: set `public_url`). Neither header: not a browser's form from another site.
pub(crate) fn same_origin(public_url: &str, headers: &axum::http::HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return site.as_bytes() == b"same-origin";
    }
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    let origin = origin.to_ascii_lowercase();
    if origin == public_url.to_ascii_lowercase() {
        return true;
    }
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .parse::<axum::http::Uri>()
        .ok()
        .and_then(|u| u.authority().map(|a| a.as_str().to_owned()));
    matches!((origin_host, host), (Some(o), Some(h)) if o == h.to_ascii_lowercase())
}

/// A page's own refusal (no session, a bad form): status, code and message.
pub(crate) fn refuse(area: Area, status: StatusCode, code: &str, message: &str) -> Response {
    Refusal {
        status,
        code: code.into(),
        message: message.into(),
        report: None,
    }
    .page(area)
}

/// The portal session a request's cookie opens; without one, 401 and a page saying how to get
/// a new one.
pub(crate) struct PortalSession {
    pub(crate) session: Session,
    pub(crate) customer: String,
    pub(crate) caller: Caller,
}

impl FromRequestParts<Arc<Web>> for PortalSession {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, web: &Arc<Web>) -> Result<Self, Response> {
        let ended = || {
            refuse(
                Area::Public,
                StatusCode::UNAUTHORIZED,
                "PORTAL_SESSION_ENDED",
                "This portal session has ended or was never opened here. Open the billing page again from the app you came from.",
            )
        };
        let Some(cookie) = sessions::cookie(&parts.headers, Kind::Portal.cookie()) else {
            return Err(ended());
        };
        let session = sessions::find(&web.state.pool, Kind::Portal, cookie)
            .await
            .map_err(|e| store_unavailable(Area::Public, e))?
            .ok_or_else(ended)?;
        let customer = session.customer.clone().ok_or_else(ended)?;
        // One bucket per customer: more sessions (one per page view, as apps make them) do
        // not buy more requests.
        if !web.take(&customer) {
            let mut response = refuse(
                Area::Portal,
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
                "Too many requests from this page; wait a moment and reload.",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            return Err(response);
        }
        Ok(PortalSession {
            caller: Caller::portal(&customer, &session.id),
            customer,
            session,
        })
    }
}

/// The console session a request's cookie opens, and the admin token it stands for; without
/// one, to the login page.
pub(crate) struct ConsoleSession {
    pub(crate) session: Session,
    pub(crate) caller: Caller,
}

impl FromRequestParts<Arc<Web>> for ConsoleSession {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, web: &Arc<Web>) -> Result<Self, Response> {
        let login = || Redirect::to("/console/login").into_response();
        let Some(cookie) = sessions::cookie(&parts.headers, Kind::Console.cookie()) else {
            return Err(login());
        };
        let session = sessions::find(&web.state.pool, Kind::Console, cookie)
            .await
            .map_err(|e| store_unavailable(Area::Console, e))?
            .ok_or_else(login)?;
        let caller = session
            .token_sha256
            .as_deref()
            .and_then(|digest| web.state.access.admin_by_digest(digest))
            .ok_or_else(login)?;
        Ok(ConsoleSession { session, caller })
    }
}

pub(crate) fn store_unavailable(area: Area, error: impl std::fmt::Display) -> Response {
    let mut response = refuse(
        area,
        StatusCode::SERVICE_UNAVAILABLE,
        "STORE_UNAVAILABLE",
        "A store this page needs is unavailable; try again in a moment.",
    );
    response.extensions_mut().insert(ErrorReport {
        code: "STORE_UNAVAILABLE",
        message: "store unavailable".into(),
        detail: Some(format!("web session: {error}")),
        keep_body: true,
    });
    response
}

/// A session's `Set-Cookie`: its kind's name and path, HttpOnly, `Secure` when people reach
/// tally over https; `SameSite=Strict` for the console, for the portal `None` (with
/// `Partitioned`) when another site may frame it over https, else `Lax`. `max_age` 0 clears it.
pub(crate) fn session_cookie(web: &Web, kind: Kind, value: &str, max_age: i64) -> HeaderValue {
    let https = web.public_url.starts_with("https://");
    let same_site = match kind {
        Kind::Console => "Strict",
        Kind::Portal if https && !web.config.frame_origins.is_empty() => "None; Partitioned",
        Kind::Portal => "Lax",
    };
    let secure = if https { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{}={value}; Path={}; HttpOnly; SameSite={same_site}; Max-Age={max_age}{secure}",
        kind.cookie(),
        kind.home()
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("tally_invalid=; Max-Age=0"))
}

/// Into a session just opened: its first page, with its cookie.
pub(crate) fn enter(web: &Web, kind: Kind, session: &Session, cookie: &str) -> Response {
    let max_age = (session.expires_at - chrono::Utc::now())
        .num_seconds()
        .max(0);
    let mut response = Redirect::to(kind.home()).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(web, kind, cookie, max_age),
    );
    response
}

/// Why a session link opened nothing.
pub(crate) enum LinkRefused {
    /// The POST came from another site's page.
    CrossSite,
    /// Used, expired or revoked.
    Used,
    /// Postgres is away (the page to answer).
    Store(Response),
}

/// `POST …/session/{secret}` (from [`link_page`]): opens the session the link stands for, once.
pub(crate) async fn open_link(
    web: &Web,
    kind: Kind,
    secret: &str,
    headers: &axum::http::HeaderMap,
) -> Result<Response, LinkRefused> {
    if !same_origin(&web.public_url, headers) {
        return Err(LinkRefused::CrossSite);
    }
    match sessions::exchange_link(&web.state.pool, kind, secret).await {
        Ok(Some((session, cookie))) => Ok(enter(web, kind, &session, &cookie)),
        Ok(None) => Err(LinkRefused::Used),
        Err(error) => Err(LinkRefused::Store(store_unavailable(Area::Public, error))),
    }
}

/// The security headers of every page and asset.
async fn secure(State(web): State<Arc<Web>>, request: Request, next: Next) -> Response {
    let console = request.uri().path().starts_with("/console");
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    let policy = if console {
        web.console_policy.clone()
    } else {
        web.portal_policy.clone()
    };
    headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // No referrer leaves for another site (a portal link's secret is in its page's address);
    // same-origin requests keep theirs, so browsers send a true `Origin` with our own forms.
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if console || web.config.frame_origins.is_empty() {
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// The pages' routes, with their headers.
pub(crate) fn router(web: Arc<Web>) -> Router {
    let mut router = Router::new()
        .route("/assets/{file}", get(assets::asset))
        .route("/pricing", get(pricing::page))
        .route(
            "/portal/session/{secret}",
            get(portal::open_page).post(portal::open),
        )
        .route("/portal", get(portal::overview))
        .route("/portal/usage", get(portal::usage))
        .route("/portal/usage.csv", get(portal::usage_csv))
        .route("/portal/credits", get(portal::credits))
        .route("/portal/credits/checkout", post(portal::buy_pack))
        .route("/portal/invoices", get(portal::invoices))
        .route("/portal/plans", get(portal::plans))
        .route("/portal/plans/checkout", post(portal::change_plan))
        .route(
            "/portal/alerts",
            get(portal::alerts).post(portal::add_alert),
        )
        .route(
            "/portal/alerts/{rule_id}/delete",
            post(portal::remove_alert),
        )
        .route("/portal/logout", post(portal::logout));
    if web.config.console {
        router = router
            .route(
                "/console/login",
                get(console::login_page).post(console::login),
            )
            .route("/console/logout", post(console::logout))
            .route(
                "/console/session/{secret}",
                get(console::open_page).post(console::open),
            )
            .route("/console", get(console::pipeline))
            .route("/console/customers", get(console::customers))
            .route("/console/customers/{id}", get(console::customer))
            .route("/console/customers/{id}/plan", post(console::change_plan))
            .route("/console/customers/{id}/grants", post(console::grant))
            .route(
                "/console/customers/{id}/grants/{grant_id}/void",
                post(console::void),
            )
            .route(
                "/console/customers/{id}/override",
                post(console::set_override),
            )
            .route("/console/alerts", get(console::alerts))
            .route("/console/stripe", get(console::stripe));
    }
    router
        .route_layer(from_fn(telemetry::track))
        .layer(from_fn_with_state(web.clone(), secure))
        .with_state(web)
}

#[cfg(test)]
mod tests {
    use super::same_origin;
    use axum::http::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn a_post_from_another_site_is_told_apart() {
        let public = "https://billing.example.com";
        // Fetch metadata decides when the browser sends it.
        assert!(same_origin(
            public,
            &headers(&[("sec-fetch-site", "same-origin")])
        ));
        for site in ["same-site", "cross-site", "none"] {
            let sent = headers(&[
                ("sec-fetch-site", site),
                ("origin", "https://billing.example.com"),
            ]);
            assert!(!same_origin(public, &sent), "{site}");
        }
        // Else the Origin: public_url's (behind a proxy that rewrites Host), or the Host's.
        let proxied = headers(&[
            ("origin", "https://billing.example.com"),
            ("host", "10.0.0.7:8080"),
        ]);
        assert!(same_origin(public, &proxied));
        let direct = headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080"),
        ]);
        assert!(same_origin(public, &direct));
        let evil = headers(&[
            ("origin", "https://evil.example"),
            ("host", "billing.example.com"),
        ]);
        assert!(!same_origin(public, &evil));
        let sandboxed = headers(&[("origin", "null"), ("host", "billing.example.com")]);
        assert!(!same_origin(public, &sandboxed));
        // No Origin at all: no browser's cross-site form.
        assert!(same_origin(
            public,
            &headers(&[("host", "billing.example.com")])
        ));
    }
}
