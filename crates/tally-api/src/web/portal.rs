//! The customer portal: one customer's plan, usage, credits, invoices, plans and alerts. Every
//! number is the API's answer to a customer-scope caller for the session's customer
//! (`Web::call`); changes (a plan through Checkout, a credit pack) go through the same API
//! routes and rules as a customer token's, with the session's CSRF token.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, Datelike, NaiveTime, TimeDelta, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};

use super::chart::usage_chart;
use super::html::{self, csrf_field, show, url_part, when, Area, Esc, Frame};
use super::pricing::{listed_plans, plan_cards};
use tally_billing::subscriptions::period::period_containing;
use tally_billing::subscriptions::Interval;

use super::{
    link_page, open_link, refuse, session_cookie, sessions, store_unavailable, Kind, LinkRefused,
    PortalSession, Refusal, Web,
};

/// Seconds between refreshes of the pages with live numbers.
const REFRESH_SECONDS: u32 = 5;

/// `POST /portal/session/{secret}` (from `open_page`): opens a portal session once, sets its
/// cookie and goes to the overview, so the secret is not in the address bar, the history or a
/// referrer after.
pub(crate) async fn open(
    State(web): State<Arc<Web>>,
    Path(secret): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    match open_link(&web, Kind::Portal, &secret, &headers).await {
        Ok(entered) => entered,
        Err(LinkRefused::CrossSite) => refuse(
            Area::Public,
            StatusCode::FORBIDDEN,
            "CROSS_SITE_REFUSED",
            "This billing link must be opened from its own page.",
        ),
        Err(LinkRefused::Used) => link_used(),
        Err(LinkRefused::Store(page)) => page,
    }
}

/// `GET /portal/session/{secret}`: the button that opens it (`link_page`).
pub(crate) async fn open_page(State(web): State<Arc<Web>>, Path(secret): Path<String>) -> Response {
    match sessions::peek_portal_link(&web.state.pool, &secret).await {
        Ok(Some(customer)) => link_page(
            "Your billing page",
            &format!("The usage, credits, invoices and plan of {customer}, as of now."),
            &format!("Open the billing page of {customer}"),
        ),
        Ok(None) => link_used(),
        Err(error) => store_unavailable(Area::Public, error),
    }
}

fn link_used() -> Response {
    refuse(
        Area::Public,
        StatusCode::UNAUTHORIZED,
        "PORTAL_LINK_USED",
        "This billing link has been used, has expired or was revoked. Open the billing page again from the app you came from.",
    )
}

/// `POST /portal/logout`.
pub(crate) async fn logout(
    State(web): State<Arc<Web>>,
    portal: PortalSession,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !sessions::csrf_matches(&portal.session, form.get("csrf").map(String::as_str)) {
        return csrf_refused(Area::Portal);
    }
    if let Err(error) = sessions::revoke(&web.state.pool, Kind::Portal, &portal.session.id).await {
        return store_unavailable(Area::Portal, error);
    }
    let frame = Frame {
        area: Area::Public,
        title: "Signed out",
        current: "",
        who: None,
        csrf: None,
        refresh: None,
    };
    let back = portal
        .session
        .return_url
        .as_deref()
        .map(|url| format!("<p><a href=\"{}\">Back to the app</a></p>", Esc(url)))
        .unwrap_or_default();
    let body = format!(
        "{}{back}",
        html::message("ok", "You have left the billing portal.")
    );
    let mut response = Html(html::page(&frame, &body)).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&web, Kind::Portal, "", 0),
    );
    response
}

pub(crate) fn csrf_refused(area: Area) -> Response {
    refuse(
        area,
        StatusCode::FORBIDDEN,
        "CSRF_TOKEN_INVALID",
        "This form is out of date or did not come from this page; reload the page and try again.",
    )
}

fn frame<'a>(
    portal: &'a PortalSession,
    title: &'a str,
    current: &'a str,
    refresh: bool,
) -> Frame<'a> {
    Frame {
        area: Area::Portal,
        title,
        current,
        who: Some(&portal.customer),
        csrf: Some(&portal.session.csrf),
        refresh: refresh.then_some(REFRESH_SECONDS),
    }
}

fn customer_path(portal: &PortalSession, rest: &str) -> String {
    format!("/v1/customers/{}{rest}", url_part(&portal.customer))
}

async fn get(web: &Web, portal: &PortalSession, rest: &str) -> Result<Value, Response> {
    web.call(
        &portal.caller,
        Method::GET,
        &customer_path(portal, rest),
        None,
    )
    .await
    .map_err(|refusal| refusal.page(Area::Portal))
}

/// The customer's whole picture (`GET /v1/customers/{id}`); a customer without any
/// subscription yet (credits only, or new) is a picture without a plan, not an error: it may
/// still buy credits or a first self-serve plan.
async fn picture(web: &Web, portal: &PortalSession) -> Result<Value, Response> {
    match web
        .call(
            &portal.caller,
            Method::GET,
            &customer_path(portal, ""),
            None,
        )
        .await
    {
        Ok(value) => Ok(value),
        Err(refusal) if refusal.code == "NO_SUCH_CUSTOMER" => Ok(json!({
            "customer": portal.customer, "subscription": null, "override": null,
            "entitlements": null, "usage": [], "invoice_preview": null,
        })),
        Err(refusal) => Err(refusal.page(Area::Portal)),
    }
}

/// Green under 70 %, amber under 90 %, red from 90 %, decided exactly (decimals, not floats).
pub(crate) fn level(used: &Value, limit: &Value) -> Option<(&'static str, Decimal)> {
    let used: Decimal = html::text(used).parse().ok()?;
    let limit: Decimal = html::text(limit).parse().ok()?;
    if limit <= Decimal::ZERO {
        return Some(("red", Decimal::ONE_HUNDRED));
    }
    // Divided first: only a share beyond 10^26 overflows, and that is red.
    let percent = used
        .checked_div(limit)
        .and_then(|share| share.checked_mul(Decimal::ONE_HUNDRED))
        .unwrap_or(Decimal::MAX);
    let level = if percent < Decimal::from(70) {
        "green"
    } else if percent < Decimal::from(90) {
        "amber"
    } else {
        "red"
    };
    Some((level, percent))
}

/// A usage bar: an SVG whose fill's width is the share used (capped at 100 %).
pub(crate) fn usage_row(item: &Value) -> String {
    let meter = item["meter"].as_str().unwrap_or_default();
    let resets = if item["resets_at"].is_null() {
        String::new()
    } else {
        format!(" · resets {}", when(&item["resets_at"]))
    };
    match level(&item["used"], &item["limit"]) {
        None => format!(
            "<div class=\"meter-row\" data-meter=\"{m}\" data-level=\"unlimited\"><div class=\"label\"><strong>{m}</strong><span>{} used · unlimited{resets}</span></div></div>",
            show(&item["used"]),
            m = Esc(meter),
        ),
        Some((level, percent)) => {
            let shown = percent.round_dp(1).normalize();
            let width = percent.min(Decimal::ONE_HUNDRED).round_dp(2).normalize();
            format!(
                "<div class=\"meter-row\" data-meter=\"{m}\" data-level=\"{level}\" data-percent=\"{shown}\">\
                 <div class=\"label\"><strong>{m}</strong><span class=\"level-text-{level}\">{} of {} ({shown} %){resets}</span></div>\
                 <svg class=\"bar\" role=\"img\" aria-label=\"{m}: {shown} % of the limit used\" preserveAspectRatio=\"none\" viewBox=\"0 0 100 10\">\
                 <rect class=\"track\" x=\"0\" y=\"0\" width=\"100\" height=\"10\"/><rect class=\"fill level-{level}\" x=\"0\" y=\"0\" width=\"{width}\" height=\"10\"/></svg></div>",
                show(&item["used"]),
                show(&item["limit"]),
                m = Esc(meter),
            )
        }
    }
}

/// `GET /portal`: plan and status, period and days left, usage against each limit, the
/// projected invoice and the credit balance.
pub(crate) async fn overview(State(web): State<Arc<Web>>, portal: PortalSession) -> Response {
    let (customer, credits) = tokio::join!(picture(&web, &portal), get(&web, &portal, "/credits"));
    let customer = match customer {
        Ok(value) => value,
        Err(page) => return page,
    };
    let credits = credits.ok();
    let subscription = &customer["subscription"];
    let mut body = String::new();
    let period_end = subscription["current_period_end"]
        .as_str()
        .and_then(|s| s.parse::<DateTime<Utc>>().ok());
    let days_left = period_end.map(|end| {
        ((end - Utc::now()).num_hours() as f64 / 24.0)
            .ceil()
            .max(0.0) as i64
    });
    let _ = write!(
        body,
        "<div class=\"cards\"><section class=\"card\" aria-labelledby=\"c-plan\"><h2 id=\"c-plan\">Plan</h2><p class=\"figure\" data-field=\"plan\">{}</p><p>Status: <span data-field=\"status\">{}</span>{}</p></section>\
         <section class=\"card\" aria-labelledby=\"c-period\"><h2 id=\"c-period\">Billing period</h2><p>{} to {}</p><p class=\"figure\" data-field=\"days-left\">{} days left</p></section>",
        show(&subscription["plan"]),
        show(&subscription["status"]),
        if subscription["cancel_at_period_end"] == json!(true) { " · ends at the period's end" } else { "" },
        when(&subscription["current_period_start"]),
        when(&subscription["current_period_end"]),
        days_left.map_or("–".into(), |d| d.to_string()),
    );
    let preview = &customer["invoice_preview"];
    if !preview.is_null() {
        let _ = write!(
            body,
            "<section class=\"card\" aria-labelledby=\"c-preview\"><h2 id=\"c-preview\">Projected usage charges</h2><p class=\"figure\" data-field=\"projected\">{}</p><p class=\"muted\">Usage so far this period at the plan's unit prices, less what credits paid for.</p></section>",
            show(&preview["total"])
        );
    }
    if let Some(credits) = &credits {
        let _ = write!(
            body,
            "<section class=\"card\" aria-labelledby=\"c-credits\"><h2 id=\"c-credits\">Credit balance</h2><p class=\"figure\" data-field=\"credits\">{}</p><p><a href=\"/portal/credits\">Credits and history</a></p></section>",
            show(&credits["available"])
        );
    }
    body.push_str("</div><h2>Usage this period</h2>");
    let usage = customer["usage"].as_array().cloned().unwrap_or_default();
    if usage.is_empty() {
        body.push_str("<p>Your plan has no usage limits.</p>");
    }
    for item in &usage {
        body.push_str(&usage_row(item));
    }
    if let Some(url) = portal.session.return_url.as_deref() {
        let _ = write!(body, "<p><a href=\"{}\">Back to the app</a></p>", Esc(url));
    }
    Html(html::page(
        &frame(&portal, "Overview", "/portal", true),
        &body,
    ))
    .into_response()
}

/// The ranges of the usage page: (key, label).
const RANGES: [(&str, &str); 5] = [
    ("today", "Today"),
    ("7d", "7 days"),
    ("30d", "30 days"),
    ("period", "This period"),
    ("last_period", "Last period"),
];

/// A range's start, end and granularity.
fn range_of(
    range: &str,
    subscription: &Value,
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, DateTime<Utc>, &'static str)> {
    let midnight = now.date_naive().and_time(NaiveTime::MIN).and_utc();
    let period = |field: &str| {
        subscription[field]
            .as_str()
            .and_then(|s| s.parse::<DateTime<Utc>>().ok())
    };
    Some(match range {
        "today" => (midnight, now, "hour"),
        // Whole days from the daily rollup: a week of minutes is 10,080 rows a series to add
        // up per view (150 ms at p99 in the bench), a week of days is 7.
        "7d" => (midnight - TimeDelta::days(6), now, "day"),
        "30d" => (midnight - TimeDelta::days(29), now, "day"),
        "period" => (
            period("current_period_start")?,
            now.min(period("current_period_end")?),
            "day",
        ),
        // The period before the current one, as billing computes it (anchored months or
        // years); none before the first period, nor for a fixed term.
        "last_period" => {
            let current = period("current_period_start")?;
            let anchor = period("billing_anchor")?;
            let interval: Interval =
                serde_json::from_value(subscription["billing_interval"].clone()).ok()?;
            let before = current - TimeDelta::seconds(1);
            if before < anchor {
                return None;
            }
            let (start, end) = period_containing(anchor, interval, before)?;
            (start, end, "day")
        }
        _ => return None,
    })
}

/// The meters charted: the ones the customer's plan lists (its entitlements, as the API
/// answers them), so a customer sees no meter name that is not its own business.
fn meters_of(customer: &Value) -> Vec<String> {
    customer["usage"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u["meter"].as_str().map(str::to_owned))
        .collect()
}

/// Each meter's usage answer for a range (the usage API's, grouped by the meter's keys), or
/// what the API refused for that meter (too many points, say): one meter never takes the
/// others down.
async fn usage_answers(
    web: &Web,
    portal: &PortalSession,
    range: &str,
) -> Result<Vec<(String, Result<Value, Refusal>)>, Response> {
    let customer = picture(web, portal).await?;
    let Some((from, to, granularity)) = range_of(range, &customer["subscription"], Utc::now())
    else {
        return Err(refuse(
            Area::Portal,
            StatusCode::BAD_REQUEST,
            "INVALID_RANGE",
            "There is no such range for your plan (a first period has no last one); choose one of the ranges listed.",
        ));
    };
    // The meters' reads at once (the reader pool bounds how many run together).
    let reads = meters_of(&customer).into_iter().map(|meter| async move {
        let query = format!(
            "/usage?meter={}&from={}&to={}&granularity={granularity}&group_by=true",
            url_part(&meter),
            url_part(&from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            url_part(&to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        );
        let uri = customer_path(portal, &query);
        let answer = web.call(&portal.caller, Method::GET, &uri, None).await;
        (meter, answer)
    });
    Ok(futures_util::future::join_all(reads).await)
}

fn range_param(query: &HashMap<String, String>) -> String {
    query
        .get("range")
        .cloned()
        .unwrap_or_else(|| "today".into())
}

/// `GET /portal/usage?range=`: a chart per meter, the grouping keys as series.
pub(crate) async fn usage(
    State(web): State<Arc<Web>>,
    portal: PortalSession,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let range = range_param(&query);
    let answers = match usage_answers(&web, &portal, &range).await {
        Ok(answers) => answers,
        Err(page) => return page,
    };
    let mut body = String::from("<nav aria-label=\"Range\"><ul class=\"ranges\">");
    for (key, label) in RANGES {
        let current = if key == range {
            " aria-current=\"page\""
        } else {
            ""
        };
        let _ = write!(
            body,
            "<li><a href=\"/portal/usage?range={key}\"{current}>{label}</a></li>"
        );
    }
    let _ = write!(
        body,
        "</ul></nav><p class=\"muted\">Days are UTC days: a period that starts or ends within a day counts that whole day, as the invoice preview does.</p><p><a href=\"/portal/usage.csv?range={}\" download>Download these numbers (CSV)</a></p>",
        url_part(&range)
    );
    for (meter, answer) in &answers {
        let _ = write!(
            body,
            "<section aria-labelledby=\"m-{id}\"><h2 id=\"m-{id}\">{}</h2>",
            Esc(meter),
            id = url_part(meter)
        );
        let answer = match answer {
            Ok(answer) => answer,
            Err(refusal) => {
                refusal.log(meter);
                body.push_str(&html::message("error", &refusal.message));
                body.push_str("</section>");
                continue;
            }
        };
        let granularity = answer["granularity"].as_str().unwrap_or("hour").to_owned();
        let label = move |start: &str| {
            let Ok(at) = start.parse::<DateTime<Utc>>() else {
                return start.to_owned();
            };
            if granularity == "day" {
                format!("{} {}", at.format("%b"), at.day())
            } else {
                at.format("%b %-d %H:%M").to_string()
            }
        };
        body.push_str(&usage_chart(meter, answer, label));
        body.push_str("</section>");
    }
    if answers.is_empty() {
        body.push_str("<p>Your plan meters nothing yet.</p>");
    }
    Html(html::page(
        &frame(&portal, "Usage", "/portal/usage", true),
        &body,
    ))
    .into_response()
}

/// A CSV field: quoted, and a leading `= + - @` made inert for spreadsheets.
fn csv_field(value: &str) -> String {
    let guarded = if value.starts_with(['=', '+', '-', '@', '\t', '\r'])
        && value.parse::<Decimal>().is_err()
    {
        format!("'{value}")
    } else {
        value.to_owned()
    };
    format!("\"{}\"", guarded.replace('"', "\"\""))
}

/// `GET /portal/usage.csv?range=`: the chart's numbers.
pub(crate) async fn usage_csv(
    State(web): State<Arc<Web>>,
    portal: PortalSession,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let range = range_param(&query);
    let answers = match usage_answers(&web, &portal, &range).await {
        Ok(answers) => answers,
        Err(page) => return page,
    };
    let mut csv = String::from("meter,series,start,value\n");
    for (meter, answer) in &answers {
        // A file with a meter left out would pass for the whole: all or nothing.
        let answer = match answer {
            Ok(answer) => answer,
            Err(refusal) => {
                refusal.log(meter);
                let message = format!("{meter}: {}", refusal.message);
                return refuse(Area::Portal, refusal.status, &refusal.code, &message);
            }
        };
        for series in answer["series"].as_array().into_iter().flatten() {
            let group = series["group_key"].as_str().unwrap_or_default();
            for point in series["points"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    csv,
                    "{},{},{},{}",
                    csv_field(meter),
                    csv_field(group),
                    csv_field(&html::text(&point["start"])),
                    csv_field(&html::text(&point["value"]))
                );
            }
        }
    }
    let mut response = csv.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/csv; charset=utf-8"),
    );
    let name = format!("attachment; filename=\"usage-{}.csv\"", url_part(&range));
    if let Ok(value) = HeaderValue::from_str(&name) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    response
}

/// `GET /portal/credits`: balance, grants with their expiry, the ledger, and a buy button per
/// credit pack when self-serve billing is configured.
pub(crate) async fn credits(
    State(web): State<Arc<Web>>,
    portal: PortalSession,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let balance = match get(&web, &portal, "/credits").await {
        Ok(value) => value,
        Err(page) => return page,
    };
    let ledger = match get(&web, &portal, "/credits/ledger?order=newest&limit=200").await {
        Ok(value) => value,
        Err(page) => return page,
    };
    let mut body = String::new();
    if query.get("checkout").map(String::as_str) == Some("done") {
        body.push_str(&html::message(
            "ok",
            "Thank you: your credits are added as soon as Stripe confirms the payment.",
        ));
    }
    let _ = write!(
        body,
        "<div class=\"cards\"><section class=\"card\"><h2>Available</h2><p class=\"figure\" data-field=\"available\">{}</p></section>\
         <section class=\"card\"><h2>Being used</h2><p class=\"figure\">{}</p><p class=\"muted\">Usage recorded, credits not yet taken.</p></section></div>",
        show(&balance["available"]),
        show(&balance["pending"])
    );
    let billing = &web.state.billing;
    if billing.stripe.is_some() && !billing.packs.is_empty() {
        body.push_str("<h2>Buy credits</h2><div class=\"cards\">");
        for pack in &billing.packs {
            let _ = write!(
                body,
                "<form class=\"card\" method=\"post\" action=\"/portal/credits/checkout\">{}<input type=\"hidden\" name=\"pack\" value=\"{}\"><h3>{}</h3><p class=\"figure\">{} credits</p><p>{} {}</p><button type=\"submit\">Buy {} credits</button></form>",
                csrf_field(&portal.session.csrf),
                Esc(&pack.name),
                Esc(&pack.name),
                pack.credits,
                pack.price.amount,
                Esc(&pack.price.currency.to_uppercase()),
                pack.credits,
            );
        }
        body.push_str("</div>");
    }
    body.push_str("<h2>Grants</h2><div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">Kind</th><th scope=\"col\">Description</th><th scope=\"col\" class=\"num\">Granted</th><th scope=\"col\" class=\"num\">Remaining</th><th scope=\"col\">From</th><th scope=\"col\">Expires</th></tr></thead><tbody>");
    let grants = balance["grants"].as_array().cloned().unwrap_or_default();
    for grant in &grants {
        let _ = write!(
            body,
            "<tr data-grant=\"{}\"><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            show(&grant["grant_id"]),
            show(&grant["kind"]),
            show(&grant["description"]),
            show(&grant["amount"]),
            show(&grant["remaining"]),
            when(&grant["effective_at"]),
            if grant["expires_at"].is_null() { "never".into() } else { when(&grant["expires_at"]) },
        );
    }
    if grants.is_empty() {
        body.push_str("<tr><td colspan=\"6\">No open grants.</td></tr>");
    }
    body.push_str("</tbody></table></div><h2>History</h2><div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">When</th><th scope=\"col\">What</th><th scope=\"col\">Meter</th><th scope=\"col\" class=\"num\">Credits</th></tr></thead><tbody>");
    // Newest first (the API's order=newest): the latest 200.
    let entries = ledger["entries"].as_array().cloned().unwrap_or_default();
    for entry in &entries {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td></tr>",
            when(&entry["at"]),
            show(&entry["kind"]),
            if entry["meter"].is_null() {
                String::new()
            } else {
                show(&entry["meter"])
            },
            show(&entry["amount"]),
        );
    }
    if entries.is_empty() {
        body.push_str("<tr><td colspan=\"4\">Nothing yet.</td></tr>");
    }
    body.push_str("</tbody></table></div>");
    Html(html::page(
        &frame(&portal, "Credits", "/portal/credits", true),
        &body,
    ))
    .into_response()
}

/// Only http(s) links from Stripe become links: never `javascript:` or `data:`.
pub(crate) fn safe_link(url: &Value, label: &str) -> String {
    match url.as_str() {
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => {
            format!(
                "<a href=\"{}\" rel=\"noopener noreferrer\" target=\"_blank\">{label}</a>",
                Esc(u)
            )
        }
        _ => String::new(),
    }
}

/// Minor units (cents) as `49.00 USD`, with as many decimals as Stripe counts for the currency
/// (none for JPY, three for KWD).
pub(crate) fn money(minor: &Value, currency: &Value) -> String {
    let code = html::text(currency).to_lowercase();
    let Some(minor) = minor.as_i64() else {
        return "–".into();
    };
    let digits = tally_billing::catalog::minor_digits(&code);
    format!("{} {}", Decimal::new(minor, digits), code.to_uppercase())
}

/// `GET /portal/invoices`: Stripe's invoices with status and links.
pub(crate) async fn invoices(State(web): State<Arc<Web>>, portal: PortalSession) -> Response {
    let page = match get(&web, &portal, "/invoices?limit=100").await {
        Ok(value) => value,
        Err(page) => return page,
    };
    let mut body = String::from("<div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">Number</th><th scope=\"col\">Period</th><th scope=\"col\">Status</th><th scope=\"col\" class=\"num\">Total</th><th scope=\"col\" class=\"num\">Due</th><th scope=\"col\">Links</th></tr></thead><tbody>");
    let invoices = page["data"].as_array().cloned().unwrap_or_default();
    for invoice in &invoices {
        let _ = write!(
            body,
            "<tr data-invoice=\"{}\"><td>{}</td><td>{} – {}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{} {}</td></tr>",
            show(&invoice["id"]),
            show(&invoice["number"]),
            when(&invoice["period_start"]),
            when(&invoice["period_end"]),
            show(&invoice["status"]),
            money(&invoice["total"], &invoice["currency"]),
            money(&invoice["amount_remaining"], &invoice["currency"]),
            safe_link(&invoice["hosted_invoice_url"], "View"),
            safe_link(&invoice["invoice_pdf"], "PDF"),
        );
    }
    if invoices.is_empty() {
        body.push_str("<tr><td colspan=\"6\">No invoices yet.</td></tr>");
    }
    body.push_str("</tbody></table></div>");
    Html(html::page(
        &frame(&portal, "Invoices", "/portal/invoices", false),
        &body,
    ))
    .into_response()
}

/// `GET /portal/plans`: the plans side by side, the current one marked; a self-serve plan has
/// a button that goes through Checkout, another says to ask.
pub(crate) async fn plans(
    State(web): State<Arc<Web>>,
    portal: PortalSession,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let customer = match picture(&web, &portal).await {
        Ok(value) => value,
        Err(page) => return page,
    };
    let mut plans = match listed_plans(&web).await {
        Ok(plans) => plans,
        Err(page) => return page,
    };
    let subscription = &customer["subscription"];
    let current = subscription["plan"].as_str().unwrap_or_default().to_owned();
    if !plans.iter().any(|p| p["name"] == json!(current)) {
        if let Ok(plan) = web
            .call(
                &portal.caller,
                Method::GET,
                &format!("/v1/plans/{}", url_part(&current)),
                None,
            )
            .await
        {
            plans.insert(0, plan);
        }
    }
    let stripe_managed = !subscription["stripe_subscription_id"].is_null()
        && matches!(
            subscription["status"].as_str(),
            Some("active" | "trialing" | "past_due")
        );
    let can_buy = web.state.billing.stripe.is_some();
    let csrf = portal.session.csrf.clone();
    let mut body = String::new();
    if query.get("checkout").map(String::as_str) == Some("done") {
        body.push_str(&html::message(
            "ok",
            "Thank you: your plan changes as soon as Stripe confirms it.",
        ));
    }
    if stripe_managed && can_buy {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/portal/plans/checkout\">{}<input type=\"hidden\" name=\"manage\" value=\"1\"><p>Your plan is billed by Stripe. <button type=\"submit\" class=\"secondary\">Manage payment and plan at Stripe</button></p></form>",
            csrf_field(&csrf)
        );
    }
    body.push_str(&plan_cards(&plans, Some(&current), |plan| {
        let name = plan["name"].as_str().unwrap_or_default();
        if name == current {
            return String::new();
        }
        if plan["self_serve"] == json!(true) && can_buy && !stripe_managed {
            format!(
                "<form method=\"post\" action=\"/portal/plans/checkout\">{}<input type=\"hidden\" name=\"plan\" value=\"{}\"><button type=\"submit\">Switch to {}</button></form>",
                csrf_field(&csrf),
                Esc(name),
                Esc(name)
            )
        } else {
            "<p class=\"muted\">To move to this plan, contact us.</p>".into()
        }
    }));
    Html(html::page(
        &frame(&portal, "Plans", "/portal/plans", false),
        &body,
    ))
    .into_response()
}

/// Where Stripe sends the customer back: the session's return URL, else this page.
fn back_to(web: &Web, portal: &PortalSession, page: &str) -> String {
    portal
        .session
        .return_url
        .clone()
        .unwrap_or_else(|| format!("{}{page}", web.public_url))
}

/// `POST /portal/plans/checkout`: `plan` opens Checkout for it (a customer's rules: self-serve
/// plans only); `manage` opens Stripe's billing portal.
pub(crate) async fn change_plan(
    State(web): State<Arc<Web>>,
    portal: PortalSession,
    headers: axum::http::HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !sessions::csrf_matches(&portal.session, form.get("csrf").map(String::as_str)) {
        return csrf_refused(Area::Portal);
    }
    let done = back_to(&web, &portal, "/portal/plans?checkout=done");
    let back = back_to(&web, &portal, "/portal/plans");
    let answer = if form.contains_key("manage") {
        web.call(
            &portal.caller,
            Method::POST,
            &customer_path(&portal, "/billing-portal"),
            Some(&json!({ "return_url": back })),
        )
        .await
    } else {
        let Some(plan) = form.get("plan") else {
            return refuse(
                Area::Portal,
                StatusCode::BAD_REQUEST,
                "INVALID_REQUEST",
                "Choose a plan.",
            );
        };
        web.call(
            &portal.caller,
            Method::POST,
            &customer_path(&portal, "/checkout"),
            Some(&json!({ "plan": plan, "success_url": done, "cancel_url": back })),
        )
        .await
    };
    to_stripe(&web, &headers, answer)
}

/// `POST /portal/credits/checkout`: opens Checkout for a credit pack.
pub(crate) async fn buy_pack(
    State(web): State<Arc<Web>>,
    portal: PortalSession,
    headers: axum::http::HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !sessions::csrf_matches(&portal.session, form.get("csrf").map(String::as_str)) {
        return csrf_refused(Area::Portal);
    }
    let Some(pack) = form.get("pack") else {
        return refuse(
            Area::Portal,
            StatusCode::BAD_REQUEST,
            "INVALID_REQUEST",
            "Choose a pack.",
        );
    };
    let answer = web
        .call(
            &portal.caller,
            Method::POST,
            &customer_path(&portal, "/credits/checkout"),
            Some(&json!({
                "pack": pack,
                "success_url": back_to(&web, &portal, "/portal/credits?checkout=done"),
                "cancel_url": back_to(&web, &portal, "/portal/credits"),
            })),
        )
        .await;
    to_stripe(&web, &headers, answer)
}

/// Sends the browser to the Stripe page an API answer names (`url`), or shows why not.
/// In a frame (the portal inside the team's app), Stripe's pages, which refuse frames, open in
/// the whole window by a link: the frame's own session cookie may be partitioned away from the
/// top window, so the form itself stays in the frame.
fn to_stripe(
    web: &Web,
    headers: &axum::http::HeaderMap,
    answer: Result<Value, Refusal>,
) -> Response {
    // http only from a test key (the emulator); a live key's pages are https.
    let allowed = |url: &str| {
        url.starts_with("https://") || (!web.state.billing.livemode && url.starts_with("http://"))
    };
    let framed = headers
        .get("sec-fetch-dest")
        .is_some_and(|dest| dest.as_bytes() == b"iframe");
    match answer {
        Ok(opened) => match opened["url"].as_str() {
            Some(url) if allowed(url) && framed => {
                let frame = Frame {
                    area: Area::Public,
                    title: "Continue at Stripe",
                    current: "",
                    who: None,
                    csrf: None,
                    refresh: None,
                };
                let body = format!(
                    "<p>Stripe's secure page opens in the whole window.</p><p><a class=\"button\" href=\"{}\" target=\"_top\" rel=\"noopener\">Continue to Stripe</a></p>",
                    Esc(url)
                );
                Html(html::page(&frame, &body)).into_response()
            }
            Some(url) if allowed(url) => Redirect::to(url).into_response(),
            _ => refuse(
                Area::Portal,
                StatusCode::BAD_GATEWAY,
                "STRIPE_REFUSED",
                "Stripe answered without a page to go to.",
            ),
        },
        Err(refusal) => refusal.page(Area::Portal),
    }
}

/// `POST /portal/alerts`: a usage rule (`meter`, `percent`) or a balance rule
/// (`credit_balance_below`), through the API as the customer (self-serve plans only).
pub(crate) async fn add_alert(
    State(web): State<Arc<Web>>,
    portal: PortalSession,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !sessions::csrf_matches(&portal.session, form.get("csrf").map(String::as_str)) {
        return csrf_refused(Area::Portal);
    }
    let field = |name: &str| {
        form.get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    };
    let rule = match (
        field("meter"),
        field("percent"),
        field("credit_balance_below"),
    ) {
        (Some(meter), Some(percent), None) => json!({ "meter": meter, "percent": percent }),
        (None, None, Some(below)) => json!({ "credit_balance_below": below }),
        _ => {
            return refuse(
                Area::Portal,
                StatusCode::BAD_REQUEST,
                "INVALID_ALERT",
                "Give a meter and a percent, or a credit balance.",
            )
        }
    };
    let uri = customer_path(&portal, "/alerts");
    match web
        .call(&portal.caller, Method::POST, &uri, Some(&rule))
        .await
    {
        Ok(_) => Redirect::to("/portal/alerts?done=alert%20added").into_response(),
        Err(refusal) => refusal.page(Area::Portal),
    }
}

/// `POST /portal/alerts/{rule_id}/delete`.
pub(crate) async fn remove_alert(
    State(web): State<Arc<Web>>,
    portal: PortalSession,
    Path(rule_id): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !sessions::csrf_matches(&portal.session, form.get("csrf").map(String::as_str)) {
        return csrf_refused(Area::Portal);
    }
    let uri = customer_path(&portal, &format!("/alerts/{}", url_part(&rule_id)));
    match web.call(&portal.caller, Method::DELETE, &uri, None).await {
        Ok(_) => Redirect::to("/portal/alerts?done=alert%20removed").into_response(),
        Err(refusal) => refusal.page(Area::Portal),
    }
}

/// `GET /portal/alerts`: the customer's usage alert rules (editable on a self-serve plan), the
/// plan's, and what fired.
pub(crate) async fn alerts(
    State(web): State<Arc<Web>>,
    portal: PortalSession,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let answer = match get(&web, &portal, "/alerts").await {
        Ok(value) => value,
        Err(page) => return page,
    };
    let rule_text = |rule: &Value| -> String {
        if let Some(meter) = rule["meter"].as_str() {
            format!(
                "{} reaches {} % of its limit",
                Esc(meter),
                show(&rule["percent"])
            )
        } else {
            format!(
                "credit balance falls below {}",
                show(&rule["credit_balance_below"])
            )
        }
    };
    // Editable on a self-serve plan (the API decides again when a change is sent).
    let editable = match answer["plan"].as_str() {
        Some(plan) => web
            .call(
                &portal.caller,
                Method::GET,
                &format!("/v1/plans/{}", url_part(plan)),
                None,
            )
            .await
            .is_ok_and(|definition| definition["self_serve"] == json!(true)),
        None => false,
    };
    let csrf = csrf_field(&portal.session.csrf);
    let mut body = String::new();
    body.push_str(&html::done(query.get("done")));
    body.push_str(if editable {
        "<p class=\"muted\">You are told when these happen.</p>"
    } else {
        "<p class=\"muted\">You are told when these happen. To change them, contact us.</p>"
    });
    body.push_str("<h2>Your alerts</h2><ul>");
    let rules = answer["rules"].as_array().cloned().unwrap_or_default();
    for rule in &rules {
        let id = html::text(&rule["rule_id"]);
        let remove = if editable {
            format!(
                " <form class=\"inline\" method=\"post\" action=\"/portal/alerts/{}/delete\">{csrf}<button type=\"submit\" class=\"secondary\">Remove<span class=\"skip-text\"> this alert</span></button></form>",
                url_part(&id)
            )
        } else {
            String::new()
        };
        let _ = write!(
            body,
            "<li data-rule=\"{}\">When {}{remove}</li>",
            Esc(&id),
            rule_text(rule)
        );
    }
    if rules.is_empty() {
        body.push_str("<li>None of your own.</li>");
    }
    body.push_str("</ul>");
    if editable {
        // The plan's meters, as the API names them to this customer.
        let plan_meters = match picture(&web, &portal).await {
            Ok(customer) => meters_of(&customer),
            Err(page) => return page,
        };
        let mut meters = String::new();
        for meter in &plan_meters {
            let _ = write!(
                meters,
                "<option value=\"{}\">{}</option>",
                Esc(meter),
                Esc(meter)
            );
        }
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/portal/alerts\"><fieldset><legend>Tell me when usage reaches</legend>{csrf}\
             <label for=\"alert-percent\">Percent of the limit</label><input id=\"alert-percent\" name=\"percent\" inputmode=\"decimal\" required size=\"6\">\
             <label for=\"alert-meter\">of the meter</label><select id=\"alert-meter\" name=\"meter\">{meters}</select>\
             <p><button type=\"submit\">Add the alert</button></p></fieldset></form>\
             <form method=\"post\" action=\"/portal/alerts\"><fieldset><legend>Tell me when my credit balance falls below</legend>{csrf}\
             <label for=\"alert-balance\">Credits</label><input id=\"alert-balance\" name=\"credit_balance_below\" inputmode=\"decimal\" required size=\"10\">\
             <p><button type=\"submit\">Add the alert</button></p></fieldset></form>"
        );
    }
    body.push_str("<h2>Your plan's alerts</h2><ul>");
    let plan_rules = answer["plan_rules"].as_array().cloned().unwrap_or_default();
    for rule in &plan_rules {
        let _ = write!(body, "<li>When {}</li>", rule_text(rule));
    }
    if plan_rules.is_empty() {
        body.push_str("<li>None.</li>");
    }
    body.push_str("</ul><h2>Fired</h2><div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">When</th><th scope=\"col\">What</th><th scope=\"col\">Detail</th></tr></thead><tbody>");
    let firings = answer["firings"].as_array().cloned().unwrap_or_default();
    for firing in &firings {
        let data = &firing["payload"]["data"];
        let detail = if data["meter"].is_null() {
            format!(
                "balance {} below {}",
                show(&data["balance"]),
                show(&data["below"])
            )
        } else {
            format!(
                "{}: {} used of {} ({} %)",
                show(&data["meter"]),
                show(&data["usage"]),
                show(&data["limit"]),
                show(&data["percent"])
            )
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{detail}</td></tr>",
            when(&firing["fired_at"]),
            show(&firing["event_type"]),
        );
    }
    if firings.is_empty() {
        body.push_str("<tr><td colspan=\"3\">Nothing has fired.</td></tr>");
    }
    body.push_str("</tbody></table></div>");
    Html(html::page(
        &frame(&portal, "Alerts", "/portal/alerts", false),
        &body,
    ))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn money_has_the_decimals_stripe_counts_for_the_currency() {
        assert_eq!(money(&json!(4900), &json!("usd")), "49.00 USD");
        assert_eq!(money(&json!(500), &json!("jpy")), "500 JPY");
        assert_eq!(money(&json!(1500), &json!("kwd")), "1.500 KWD");
        assert_eq!(money(&Value::Null, &json!("usd")), "–");
    }

    #[test]
    fn last_period_is_the_billing_period_before_this_one() {
        // Anchored on the 31st: the period before [Feb 28, Mar 31) is [Jan 31, Feb 28).
        let subscription = json!({
            "billing_anchor": "2027-01-31T00:00:00Z", "billing_interval": "month",
            "current_period_start": "2027-02-28T00:00:00Z", "current_period_end": "2027-03-31T00:00:00Z",
        });
        let now = at("2027-03-10T12:00:00Z");
        let (from, to, granularity) = range_of("last_period", &subscription, now).unwrap();
        assert_eq!(
            (from, to, granularity),
            (
                at("2027-01-31T00:00:00Z"),
                at("2027-02-28T00:00:00Z"),
                "day"
            )
        );
        // Yearly.
        let yearly = json!({
            "billing_anchor": "2025-06-15T00:00:00Z", "billing_interval": "year",
            "current_period_start": "2026-06-15T00:00:00Z", "current_period_end": "2027-06-15T00:00:00Z",
        });
        let (from, to, _) = range_of("last_period", &yearly, now).unwrap();
        assert_eq!(
            (from, to),
            (at("2025-06-15T00:00:00Z"), at("2026-06-15T00:00:00Z"))
        );
        // The first period has none before it; a fixed term has no periods.
        let first = json!({
            "billing_anchor": "2027-02-28T00:00:00Z", "billing_interval": "month",
            "current_period_start": "2027-02-28T00:00:00Z", "current_period_end": "2027-03-28T00:00:00Z",
        });
        assert_eq!(range_of("last_period", &first, now), None);
        let fixed = json!({
            "billing_anchor": "2027-01-01T00:00:00Z", "billing_interval": "fixed",
            "current_period_start": "2027-02-01T00:00:00Z", "current_period_end": "2027-06-01T00:00:00Z",
        });
        assert_eq!(range_of("last_period", &fixed, now), None);
        assert_eq!(range_of("forever", &subscription, now), None);
    }

    #[test]
    fn bars_turn_amber_at_70_and_red_at_90_percent_exactly() {
        let level_of = |used: &str, limit: &str| level(&json!(used), &json!(limit)).map(|(l, _)| l);
        assert_eq!(level_of("69.999", "100"), Some("green"));
        assert_eq!(level_of("70", "100"), Some("amber"));
        assert_eq!(level_of("89.999", "100"), Some("amber"));
        assert_eq!(level_of("90", "100"), Some("red"));
        assert_eq!(level_of("250", "100"), Some("red"));
        // 7 of 10 is 70 % exactly, not 69.99… through a float.
        assert_eq!(level_of("7", "10"), Some("amber"));
        assert_eq!(
            level_of("5", "-1"),
            Some("red"),
            "a negative limit never reads as room"
        );
        assert_eq!(level(&json!("5"), &Value::Null), None, "unlimited: no bar");
        let huge = "79228162514264337593543950335";
        assert_eq!(
            level_of(huge, "0.0001"),
            Some("red"),
            "a share beyond a decimal is red"
        );
    }

    #[test]
    fn csv_fields_are_quoted_and_formulas_made_inert() {
        assert_eq!(csv_field("a\"b"), "\"a\"\"b\"");
        assert_eq!(csv_field("=HYPERLINK(\"x\")"), "\"'=HYPERLINK(\"\"x\"\")\"");
        assert_eq!(
            csv_field("-12.5"),
            "\"-12.5\"",
            "a negative number stays a number"
        );
        assert_eq!(csv_field("@SUM(A1)"), "\"'@SUM(A1)\"");
    }
}
