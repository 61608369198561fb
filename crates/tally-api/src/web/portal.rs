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

use super::chart::{series_label, usage_chart};
use super::html::{self, csrf_field, show, url_part, when, Area, Esc, Frame};
use super::pricing::{limit_text, listed_plans, plan_cards};
use super::{
    portal_same_site, refuse, sessions, set_cookie, store_unavailable, PortalSession, Refusal, Web,
};

/// Seconds between refreshes of the pages with live numbers.
const REFRESH_SECONDS: u32 = 5;

/// `GET /portal/session/{secret}`: opens a portal session once, sets its cookie and goes to
/// the overview, so the secret is not in the address bar, the history or a referrer after.
pub(crate) async fn open(State(web): State<Arc<Web>>, Path(secret): Path<String>) -> Response {
    let opened = match sessions::exchange_link(&web.state.pool, &secret).await {
        Ok(opened) => opened,
        Err(error) => return store_unavailable(Area::Public, error),
    };
    let Some((session, cookie)) = opened else {
        return refuse(
            Area::Public,
            StatusCode::UNAUTHORIZED,
            "PORTAL_LINK_USED",
            "This billing link has been used, has expired or was revoked. Open the billing page again from the app you came from.",
        );
    };
    let max_age = (session.expires_at - Utc::now()).num_seconds().max(0);
    let mut response = Redirect::to("/portal").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(
            &web,
            sessions::PORTAL_COOKIE,
            &cookie,
            "/portal",
            portal_same_site(&web),
            max_age,
        ),
    );
    response
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
    if let Err(error) =
        sessions::revoke(&web.state.pool, &portal.session.id, Some(&portal.customer)).await
    {
        return store_unavailable(Area::Portal, error);
    }
    let mut response = refuse(
        Area::Public,
        StatusCode::OK,
        "LOGGED_OUT",
        "You have left the billing portal.",
    );
    response.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(
            &web,
            sessions::PORTAL_COOKIE,
            "",
            "/portal",
            portal_same_site(&web),
            0,
        ),
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

/// Green under 70 %, amber under 90 %, red from 90 %, decided exactly (decimals, not floats).
pub(crate) fn level(used: &Value, limit: &Value) -> Option<(&'static str, Decimal)> {
    let used: Decimal = html::text(used).parse().ok()?;
    let limit: Decimal = html::text(limit).parse().ok()?;
    if limit <= Decimal::ZERO {
        return Some(("red", Decimal::ONE_HUNDRED));
    }
    let percent = used.checked_mul(Decimal::ONE_HUNDRED)?.checked_div(limit)?;
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
    let customer = match get(&web, &portal, "").await {
        Ok(value) => value,
        Err(page) => return page,
    };
    let credits = get(&web, &portal, "/credits").await.ok();
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
        "7d" => (now - TimeDelta::days(7), now, "hour"),
        "30d" => (midnight - TimeDelta::days(29), now, "day"),
        "period" => (
            period("current_period_start")?,
            now.min(period("current_period_end")?),
            "day",
        ),
        "last_period" => {
            let start = period("current_period_start")?;
            let end = period("current_period_end")?;
            let previous = if (end - start) >= TimeDelta::days(28) {
                let months = if (end - start) >= TimeDelta::days(360) {
                    12
                } else {
                    1
                };
                start.checked_sub_months(chrono::Months::new(months))?
            } else {
                start - (end - start)
            };
            (previous, start, "day")
        }
        _ => return None,
    })
}

/// The meters charted: the customer's limited meters first, then every other meter.
async fn meters_of(web: &Web, customer: &Value) -> Result<Vec<String>, Response> {
    let mut meters: Vec<String> = customer["usage"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|u| u["meter"].as_str().map(str::to_owned))
        .collect();
    let all = tally_db::meters::all(&web.state.reader_pool)
        .await
        .map_err(|e| store_unavailable(Area::Portal, e))?;
    for meter in all {
        if !meters.contains(&meter.name) {
            meters.push(meter.name);
        }
    }
    Ok(meters)
}

/// Each meter's usage answer for a range (the usage API's, grouped by the meter's keys).
async fn usage_answers(
    web: &Web,
    portal: &PortalSession,
    range: &str,
) -> Result<Vec<(String, Value)>, Response> {
    let customer = get(web, portal, "").await?;
    let Some((from, to, granularity)) = range_of(range, &customer["subscription"], Utc::now())
    else {
        return Err(refuse(
            Area::Portal,
            StatusCode::BAD_REQUEST,
            "INVALID_RANGE",
            "Choose one of the ranges listed.",
        ));
    };
    let mut answers = Vec::new();
    for meter in meters_of(web, &customer).await? {
        let query = format!(
            "/usage?meter={}&from={}&to={}&granularity={granularity}&group_by=true",
            url_part(&meter),
            url_part(&from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            url_part(&to.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        );
        let answer = get(web, portal, &query).await?;
        answers.push((meter, answer));
    }
    Ok(answers)
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
        "</ul></nav><p><a href=\"/portal/usage.csv?range={}\" download>Download these numbers (CSV)</a></p>",
        url_part(&range)
    );
    for (meter, answer) in &answers {
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
        let _ = write!(
            body,
            "<section aria-labelledby=\"m-{id}\"><h2 id=\"m-{id}\">{}</h2>",
            Esc(meter),
            id = url_part(meter)
        );
        body.push_str(&usage_chart(meter, answer, label));
        body.push_str("</section>");
    }
    if answers.is_empty() {
        body.push_str("<p>No meters are defined yet.</p>");
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
    let ledger = match get(&web, &portal, "/credits/ledger?limit=1000").await {
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
    let mut entries = ledger["entries"].as_array().cloned().unwrap_or_default();
    entries.reverse();
    for entry in entries.iter().take(200) {
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

/// Minor units (cents) as `49.00 USD`, for the currencies with two decimals; Stripe's
/// zero-decimal currencies as they are.
pub(crate) fn money(minor: &Value, currency: &Value) -> String {
    let currency = html::text(currency).to_uppercase();
    let Some(minor) = minor.as_i64() else {
        return "–".into();
    };
    let zero_decimal = [
        "BIF", "CLP", "DJF", "GNF", "JPY", "KMF", "KRW", "MGA", "PYG", "RWF", "UGX", "VND", "VUV",
        "XAF", "XOF", "XPF",
    ];
    if zero_decimal.contains(&currency.as_str()) {
        return format!("{minor} {currency}");
    }
    format!("{} {currency}", Decimal::new(minor, 2))
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
    let customer = match get(&web, &portal, "").await {
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
    to_stripe(answer)
}

/// `POST /portal/credits/checkout`: opens Checkout for a credit pack.
pub(crate) async fn buy_pack(
    State(web): State<Arc<Web>>,
    portal: PortalSession,
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
    to_stripe(answer)
}

/// Sends the browser to the Stripe page an API answer names (`url`), or shows why not.
fn to_stripe(answer: Result<Value, Refusal>) -> Response {
    match answer {
        Ok(opened) => match opened["url"].as_str() {
            Some(url) if url.starts_with("https://") || url.starts_with("http://") => {
                Redirect::to(url).into_response()
            }
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

/// `GET /portal/alerts`: the customer's usage alert rules, the plan's, and what fired.
pub(crate) async fn alerts(State(web): State<Arc<Web>>, portal: PortalSession) -> Response {
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
    let mut body = String::from("<p class=\"muted\">You are told when these happen. To change them, contact us.</p><h2>Your alerts</h2><ul>");
    let rules = answer["rules"].as_array().cloned().unwrap_or_default();
    for rule in &rules {
        let _ = write!(
            body,
            "<li data-rule=\"{}\">When {}</li>",
            show(&rule["rule_id"]),
            rule_text(rule)
        );
    }
    if rules.is_empty() {
        body.push_str("<li>None of your own.</li>");
    }
    body.push_str("</ul><h2>Your plan's alerts</h2><ul>");
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
    let _ = limit_text;
    let _ = series_label;
    Html(html::page(
        &frame(&portal, "Alerts", "/portal/alerts", false),
        &body,
    ))
    .into_response()
}
