//! The operator console: an admin token exchanged at `/console/login` for a session cookie
//! (HttpOnly, SameSite=Strict, path `/console`). Pages: the pipeline (the figures `tally
//! status` reads, from the same functions), customers (search, one customer's whole picture
//! with the admin API's actions, each asking for the audit reason), alert deliveries, and the
//! Stripe outbox. Every change carries the session's CSRF token and goes through the admin API
//! as the token that logged in, so the audit trail names it.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::{json, Value};

use super::html::{self, csrf_field, show, url_part, when, Area, Esc, Frame};
use super::portal::{csrf_refused, money, safe_link, usage_row};
use super::{
    enter, link_page, open_link, refuse, same_origin, session_cookie, sessions, store_unavailable,
    ConsoleSession, Kind, LinkRefused, Web,
};
use crate::config::Scope;

/// Seconds between refreshes of the pipeline page.
const REFRESH_SECONDS: u32 = 5;
/// Customers a search lists.
const SEARCH_LIMIT: i64 = 50;

fn frame<'a>(
    console: &'a ConsoleSession,
    title: &'a str,
    current: &'a str,
    refresh: bool,
) -> Frame<'a> {
    Frame {
        area: Area::Console,
        title,
        current,
        who: Some(console.caller.name()),
        csrf: Some(&console.session.csrf),
        refresh: refresh.then_some(REFRESH_SECONDS),
    }
}

/// `GET /console/login`.
pub(crate) async fn login_page() -> Response {
    login_form(StatusCode::OK, None)
}

fn login_form(status: StatusCode, error: Option<&str>) -> Response {
    let frame = Frame {
        area: Area::Public,
        title: "Console login",
        current: "",
        who: None,
        csrf: None,
        refresh: None,
    };
    let body = format!(
        "{}<form method=\"post\" action=\"/console/login\"><label for=\"token\">Admin API token</label>\
         <input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"off\" required size=\"48\">\
         <p><button type=\"submit\">Log in</button></p></form>\
         <p class=\"muted\">The token is exchanged for a session cookie and not kept. Make one with <code>tally tokens create --scope admin</code>.</p>",
        error.map(|e| html::message("error", e)).unwrap_or_default()
    );
    (status, Html(html::page(&frame, &body))).into_response()
}

/// `POST /console/login`: an admin token for a session cookie.
pub(crate) async fn login(
    State(web): State<Arc<Web>>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    // From this server's own login page: another site cannot log a visitor in to a session
    // of its choosing.
    if !same_origin(&web.public_url, &headers) {
        return login_form(StatusCode::FORBIDDEN, Some("Log in from this page."));
    }
    let token = form.get("token").map(|t| t.trim()).unwrap_or_default();
    let mut headers = HeaderMap::new();
    let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) else {
        return login_form(
            StatusCode::UNAUTHORIZED,
            Some("That is not an admin token of this deployment."),
        );
    };
    headers.insert(header::AUTHORIZATION, value);
    let caller = match web.state.access.authenticate(&headers) {
        Ok(caller) if caller.scope() == Scope::Admin => caller,
        _ => {
            return login_form(
                StatusCode::UNAUTHORIZED,
                Some("That is not an admin token of this deployment."),
            )
        }
    };
    let expires_at = Utc::now()
        + TimeDelta::from_std(web.config.console_session_ttl).unwrap_or(TimeDelta::hours(8));
    let (session, cookie) =
        match sessions::open_console(&web.state.pool, caller.name(), token, expires_at).await {
            Ok(opened) => opened,
            Err(error) => return store_unavailable(Area::Public, error),
        };
    enter(&web, Kind::Console, &session, &cookie)
}

/// `GET /console/session/{secret}`: the button that opens it (`link_page`).
pub(crate) async fn open_page() -> Response {
    link_page(
        "Console login",
        "A single-use login link for tally's console.",
        "Log in to the console",
    )
}

/// `POST /console/session/{secret}`: a single-use login link (`tally demo` prints one) for a
/// session cookie.
pub(crate) async fn open(
    State(web): State<Arc<Web>>,
    Path(secret): Path<String>,
    headers: HeaderMap,
) -> Response {
    match open_link(&web, Kind::Console, &secret, &headers).await {
        Ok(entered) => entered,
        Err(LinkRefused::CrossSite) => login_form(
            StatusCode::FORBIDDEN,
            Some("A login link must be opened from its own page."),
        ),
        Err(LinkRefused::Used) => login_form(
            StatusCode::UNAUTHORIZED,
            Some("This login link has been used or has expired; log in with an admin token."),
        ),
        Err(LinkRefused::Store(page)) => page,
    }
}

/// `POST /console/logout`.
pub(crate) async fn logout(
    State(web): State<Arc<Web>>,
    console: ConsoleSession,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    if !sessions::csrf_matches(&console.session, form.get("csrf").map(String::as_str)) {
        return csrf_refused(Area::Console);
    }
    if let Err(error) = sessions::revoke(&web.state.pool, Kind::Console, &console.session.id).await
    {
        return store_unavailable(Area::Console, error);
    }
    let mut response = Redirect::to("/console/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&web, Kind::Console, "", 0),
    );
    response
}

fn ago(now: DateTime<Utc>, at: DateTime<Utc>) -> String {
    let seconds = (now - at).num_seconds().max(0);
    tally_core::duration::format(std::time::Duration::from_secs(seconds as u64)) + " ago"
}

/// `GET /console`: events in, lag, freshness, rejects, the outbox, customers set aside, the
/// last reconcile and the dependencies.
pub(crate) async fn pipeline(State(web): State<Arc<Web>>, console: ConsoleSession) -> Response {
    match pipeline_body(&web).await {
        Ok(body) => Html(html::page(
            &frame(&console, "Pipeline", "/console", true),
            &body,
        ))
        .into_response(),
        Err(error) => store_unavailable(Area::Console, error),
    }
}

async fn pipeline_body(web: &Web) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let pool = &web.state.reader_pool;
    let now = Utc::now();
    let source = &web.state.pipeline;
    let mut body = String::new();
    let committed =
        tally_aggregator::committed_offsets(pool, &source.group_id, &source.topic).await?;
    let ends = web.end_offsets().await;
    let total: i64 = committed.iter().filter_map(|c| c.next_offset).sum();
    let rate = web.events_per_second(total);
    let freshest = committed.iter().map(|c| c.updated_at).max();
    let lag: Option<i64> = ends.as_ref().ok().map(|ends| {
        committed
            .iter()
            .map(|c| {
                ends.get(&c.partition)
                    .map_or(0, |end| (end - c.next_offset.unwrap_or(0)).max(0))
            })
            .sum()
    });
    let _ = write!(
        body,
        "<div class=\"cards\"><section class=\"card\"><h2>Events in</h2><p class=\"figure\" data-field=\"events-per-second\">{}</p><p class=\"muted\">per second, committed by the aggregator</p></section>\
         <section class=\"card\"><h2>Consumer lag</h2><p class=\"figure\" data-field=\"lag\">{}</p><p class=\"muted\">messages</p></section>\
         <section class=\"card\"><h2>Freshness</h2><p class=\"figure\" data-field=\"freshness\">{}</p><p class=\"muted\">since the last commit</p></section>",
        rate.map_or("–".into(), |r| format!("{r:.0}")),
        match (&lag, &ends) {
            (Some(lag), _) => lag.to_string(),
            (None, Err(why)) => format!("unknown ({})", Esc(why)),
            (None, Ok(_)) => "–".into(),
        },
        freshest.map_or("never".into(), |at| ago(now, at)),
    );
    let outbox = tally_sink::store::outbox_status(pool).await?;
    let _ = write!(
        body,
        "<section class=\"card\"><h2>Stripe outbox</h2><p><span data-field=\"outbox-pending\">{}</span> pending (<span class=\"{}\">oldest {} s</span>), <span data-field=\"outbox-failed\" class=\"{}\">{}</span> failed, {} waiting for review, {} pair(s) quarantined</p><p>{} customer(s) unmapped ({} slots)</p></section></div>",
        outbox.pending,
        if outbox.oldest_pending_seconds > tally_runtime::attention::OUTBOX_STALE.as_secs_f64() {
            "status-bad"
        } else {
            ""
        },
        outbox.oldest_pending_seconds.round(),
        if outbox.failed > 0 { "status-bad" } else { "" },
        outbox.failed,
        outbox.needs_review,
        outbox.quarantined_pairs,
        outbox.unmapped_customers,
        outbox.unmapped_slots,
    );

    body.push_str("<h2>Partitions</h2><div class=\"table-wrap\"><table><thead><tr><th scope=\"col\" class=\"num\">Partition</th><th scope=\"col\" class=\"num\">Next offset</th><th scope=\"col\" class=\"num\">End</th><th scope=\"col\" class=\"num\">Lag</th><th scope=\"col\">Last commit</th><th scope=\"col\">Owner</th></tr></thead><tbody>");
    for row in &committed {
        let end = ends
            .as_ref()
            .ok()
            .and_then(|e| e.get(&row.partition))
            .copied();
        let _ = write!(
            body,
            "<tr><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            row.partition,
            row.next_offset.map_or("–".into(), |o| o.to_string()),
            end.map_or("?".into(), |e| e.to_string()),
            end.map_or("?".into(), |e| (e - row.next_offset.unwrap_or(0)).to_string()),
            ago(now, row.updated_at),
            Esc(row.owner.as_deref().unwrap_or("–")),
        );
    }
    if committed.is_empty() {
        body.push_str("<tr><td colspan=\"6\">No partition taken yet: is <code>tally aggregate</code> running?</td></tr>");
    }
    body.push_str("</tbody></table></div>");
    if let Ok(ends) = &ends {
        let untaken: Vec<String> = ends
            .keys()
            .filter(|p| !committed.iter().any(|c| c.partition == **p))
            .map(i32::to_string)
            .collect();
        if !untaken.is_empty() {
            let _ = write!(
                body,
                "{}",
                html::message(
                    "error",
                    &format!(
                        "Partition(s) {} of the topic were never taken by an aggregator (their backlog is not in the lag above): start tally aggregate.",
                        untaken.join(", ")
                    )
                )
            );
        }
    }
    // Each running aggregator as its watchdog last wrote it (as `tally status` lists them).
    let members = tally_aggregator::members(pool, &source.group_id, &source.topic).await?;
    let silent = TimeDelta::seconds(tally_runtime::attention::MEMBER_SILENT.as_secs() as i64);
    body.push_str("<h2>Aggregators</h2><ul>");
    let mut live = 0;
    for member in members.iter().filter(|m| now - m.seen_at < silent) {
        live += 1;
        let partitions: Vec<String> = member.assigned.iter().map(i32::to_string).collect();
        let state = match &member.stall {
            Some(stall) => format!("<span class=\"status-bad\">stalled: {}</span>", Esc(stall)),
            None => "<span class=\"status-ok\">consuming</span>".to_owned(),
        };
        let _ = write!(
            body,
            "<li>{}: partitions {} · {state} · seen {}</li>",
            Esc(&member.owner),
            if partitions.is_empty() {
                "none".to_owned()
            } else {
                partitions.join(", ")
            },
            ago(now, member.seen_at)
        );
    }
    if live == 0 {
        body.push_str("<li>None running.</li>");
    }
    body.push_str("</ul>");

    let rejects = tally_db::rejects::counts_since(pool, now - TimeDelta::hours(1)).await?;
    let (dlq_pending, dlq_oldest) = tally_db::rejects::dlq_backlog(pool).await?;
    let _ = write!(body, "<h2>Rejected in the last hour</h2><p>{dlq_pending} waiting for the DLQ topic (oldest {} s).</p><div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">Reason</th><th scope=\"col\" class=\"num\">Events</th><th scope=\"col\">Latest sample</th></tr></thead><tbody>", dlq_oldest.round());
    let samples = tally_db::rejects::latest_samples(pool, now - TimeDelta::hours(1)).await?;
    for (reason, count) in &rejects {
        let sample = samples.iter().find(|s| &s.reason == reason);
        let _ = write!(
            body,
            "<tr data-reason=\"{}\"><td>{}</td><td class=\"num\">{count}</td><td>{}</td></tr>",
            Esc(reason),
            Esc(reason),
            sample.map_or(String::new(), |s| format!(
                "{}<br><code class=\"sample\">{}</code>",
                Esc(&s.detail),
                Esc(&s.raw)
            )),
        );
    }
    if rejects.is_empty() {
        body.push_str("<tr><td colspan=\"3\">None.</td></tr>");
    }
    body.push_str("</tbody></table></div>");

    let mut conn = pool.acquire().await?;
    let (set_aside, total_set_aside) = tally_db::customer_errors::list(&mut conn, 20).await?;
    drop(conn);
    let _ = write!(body, "<h2>Customers set aside</h2><p>{total_set_aside} customer(s) a background loop set aside.</p>");
    if !set_aside.is_empty() {
        body.push_str("<div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">Stage</th><th scope=\"col\">Customer</th><th scope=\"col\">Error</th><th scope=\"col\" class=\"num\">Tries</th></tr></thead><tbody>");
        for error in &set_aside {
            let _ = write!(
                body,
                "<tr><td>{}</td><td><a href=\"/console/customers/{}\">{}</a></td><td>{}</td><td class=\"num\">{}</td></tr>",
                Esc(&error.stage),
                url_part(&error.customer_id),
                Esc(&error.customer_id),
                Esc(&error.error),
                error.attempts
            );
        }
        body.push_str("</tbody></table></div>");
    }
    body.push_str("<h2>Last reconcile</h2>");
    match tally_sink::store::last_reconcile_run(pool).await? {
        None => body.push_str(
            "<p data-field=\"reconcile\">Never: run <code>tally reconcile --last 48h</code>.</p>",
        ),
        Some(run) => {
            let stale = now - run.ran_at
                > TimeDelta::seconds(tally_runtime::attention::RECONCILE_STALE.as_secs() as i64);
            if stale {
                body.push_str(&html::message(
                    "error",
                    "The last reconcile is older than 3 hours: is its timer running?",
                ));
            }
            let _ = write!(
                body,
                "<p data-field=\"reconcile\">{}: {} ok, {} not yet billed, {} unmapped, <span class=\"{}\">{} drift</span>, {} quarantined, {} waiting for review, {} Stripe error report(s).</p>",
                ago(now, run.ran_at),
                run.ok, run.unbilled, run.unmapped,
                if run.drift + run.meter_error_reports > 0 { "status-bad" } else { "" },
                run.drift, run.quarantined, run.review, run.meter_error_reports
            );
        }
    }
    body.push_str("<h2>Dependencies</h2><ul>");
    for dependency in tally_runtime::health::readiness() {
        let _ = write!(
            body,
            "<li>{}: <span class=\"{}\">{}</span>{}</li>",
            Esc(dependency.name),
            if dependency.up {
                "status-ok"
            } else {
                "status-bad"
            },
            if dependency.up { "up" } else { "down" },
            dependency
                .error
                .map(|e| format!(" ({})", Esc(&e)))
                .unwrap_or_default(),
        );
    }
    body.push_str("</ul>");
    Ok(body)
}

/// `GET /console/customers?q=`: customers whose id starts with `q`.
pub(crate) async fn customers(
    State(web): State<Arc<Web>>,
    console: ConsoleSession,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let q = query.get("q").cloned().unwrap_or_default();
    let pattern = format!(
        "{}%",
        q.replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    );
    let rows: Result<Vec<(String, String, String)>, sqlx::Error> = sqlx::query_as(
        "SELECT DISTINCT ON (customer_id) customer_id, plan, status FROM subscriptions
         WHERE customer_id LIKE $1
         ORDER BY customer_id, (status IN ('active', 'trialing', 'past_due')) DESC, started_at DESC
         LIMIT $2",
    )
    .bind(&pattern)
    .bind(SEARCH_LIMIT)
    .fetch_all(&web.state.reader_pool)
    .await;
    let rows = match rows {
        Ok(rows) => rows,
        Err(error) => return store_unavailable(Area::Console, error),
    };
    let mut body = format!(
        "<form method=\"get\" action=\"/console/customers\" role=\"search\"><label for=\"q\">Customer id starts with</label><input id=\"q\" name=\"q\" value=\"{}\"> <button type=\"submit\">Search</button></form>\
         <div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">Customer</th><th scope=\"col\">Plan</th><th scope=\"col\">Status</th></tr></thead><tbody>",
        Esc(&q)
    );
    for (customer, plan, status) in &rows {
        let _ = write!(
            body,
            "<tr><td><a href=\"/console/customers/{}\">{}</a></td><td>{}</td><td>{}</td></tr>",
            url_part(customer),
            Esc(customer),
            Esc(plan),
            Esc(status)
        );
    }
    if rows.is_empty() {
        body.push_str("<tr><td colspan=\"3\">No customer found.</td></tr>");
    }
    let _ = write!(
        body,
        "</tbody></table></div><p class=\"muted\">At most {SEARCH_LIMIT} are listed.</p>"
    );
    Html(html::page(
        &frame(&console, "Customers", "/console/customers", false),
        &body,
    ))
    .into_response()
}

fn path(customer: &str, rest: &str) -> String {
    format!("/v1/customers/{}{rest}", url_part(customer))
}

/// `GET /console/customers/{id}`: subscription and history, override, usage against limits,
/// credits and ledger, invoices, alerts, and the forms of the admin actions.
pub(crate) async fn customer(
    State(web): State<Arc<Web>>,
    console: ConsoleSession,
    Path(customer): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let caller = &console.caller;
    let call = |rest: &str| {
        let uri = path(&customer, rest);
        let web = web.clone();
        let caller = caller.clone();
        async move { web.call(&caller, Method::GET, &uri, None).await }
    };
    let picture = match call("").await {
        Ok(value) => value,
        Err(refusal) => return refusal.page(Area::Console),
    };
    let (history, credits, ledger, invoices, alerts) = tokio::join!(
        call("/subscriptions"),
        call("/credits"),
        call("/credits/ledger?order=newest&limit=200"),
        call("/invoices?limit=20"),
        call("/alerts"),
    );
    let [history, credits, ledger, invoices, alerts] =
        [history, credits, ledger, invoices, alerts].map(|answer| answer.unwrap_or(Value::Null));
    let plans = web
        .call(caller, Method::GET, "/v1/plans", None)
        .await
        .unwrap_or(Value::Null);
    let csrf = csrf_field(&console.session.csrf);
    let action = |rest: &str| format!("/console/customers/{}{rest}", url_part(&customer));
    let mut body = String::new();
    body.push_str(&html::done(query.get("done")));
    let subscription = &picture["subscription"];
    let _ = write!(
        body,
        "<p>Customer <strong data-field=\"customer\">{}</strong></p><h2>Subscription</h2><p>Plan <strong>{}</strong>, {} ({}), period {} to {}{}</p>",
        Esc(&customer),
        show(&subscription["plan"]),
        show(&subscription["status"]),
        show(&subscription["source"]),
        when(&subscription["current_period_start"]),
        when(&subscription["current_period_end"]),
        if subscription["stripe_subscription_id"].is_null() { String::new() } else { format!(", Stripe {}", show(&subscription["stripe_subscription_id"])) },
    );
    body.push_str("<div class=\"table-wrap\"><table><caption>History</caption><thead><tr><th scope=\"col\">Plan</th><th scope=\"col\">Status</th><th scope=\"col\">From</th><th scope=\"col\">To</th></tr></thead><tbody>");
    for sub in history["subscriptions"].as_array().into_iter().flatten() {
        for span in sub["history"].as_array().into_iter().flatten() {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                show(&span["plan"]),
                show(&span["status"]),
                when(&span["from"]),
                if span["to"].is_null() {
                    "now".into()
                } else {
                    when(&span["to"])
                }
            );
        }
    }
    body.push_str("</tbody></table></div>");
    let mut options = String::new();
    for plan in plans["plans"].as_array().into_iter().flatten() {
        let name = plan["name"].as_str().unwrap_or_default();
        let _ = write!(
            options,
            "<option value=\"{}\">{}</option>",
            Esc(name),
            Esc(name)
        );
    }
    let _ = write!(
        body,
        "<form method=\"post\" action=\"{}\"><fieldset><legend>Change plan (now)</legend>{csrf}\
         <label for=\"plan\">Plan</label><select id=\"plan\" name=\"plan\">{options}</select>\
         <label for=\"plan-reason\">Reason (audited)</label><input id=\"plan-reason\" name=\"reason\" required size=\"40\">\
         <p><button type=\"submit\">Change plan</button></p></fieldset></form>",
        action("/plan")
    );

    body.push_str("<h2>Usage against limits</h2>");
    for item in picture["usage"].as_array().into_iter().flatten() {
        body.push_str(&usage_row(item));
    }
    let override_json = if picture["override"].is_null() {
        "{\"features\": {}, \"limits\": {}}".to_owned()
    } else {
        serde_json::to_string_pretty(&picture["override"]).unwrap_or_default()
    };
    let _ = write!(
        body,
        "<form method=\"post\" action=\"{}\"><fieldset><legend>Override</legend>{csrf}\
         <label for=\"override\">Override (JSON: features and limits, decimals as strings)</label><textarea id=\"override\" name=\"overrides\" rows=\"6\" cols=\"60\">{}</textarea>\
         <label for=\"override-reason\">Reason (audited)</label><input id=\"override-reason\" name=\"reason\" required size=\"40\">\
         <p><button type=\"submit\">Set override</button></p></fieldset></form>",
        action("/override"),
        Esc(&override_json)
    );

    let _ = write!(body, "<h2>Credits</h2><p>Available <strong data-field=\"available\">{}</strong>, pending {}.</p>", show(&credits["available"]), show(&credits["pending"]));
    body.push_str("<div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">Grant</th><th scope=\"col\">Kind</th><th scope=\"col\" class=\"num\">Remaining</th><th scope=\"col\">Expires</th><th scope=\"col\">Reason</th><th scope=\"col\">Void</th></tr></thead><tbody>");
    for grant in credits["grants"].as_array().into_iter().flatten() {
        let id = html::text(&grant["grant_id"]);
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{} of {}</td><td>{}</td><td>{}</td><td><form method=\"post\" action=\"{}\">{csrf}<label for=\"void-{id}\">Reason</label><input id=\"void-{id}\" name=\"reason\" required> <button type=\"submit\" class=\"secondary\">Void</button></form></td></tr>",
            Esc(&id),
            show(&grant["kind"]),
            show(&grant["remaining"]),
            show(&grant["amount"]),
            if grant["expires_at"].is_null() { "never".into() } else { when(&grant["expires_at"]) },
            show(&grant["reason"]),
            action(&format!("/grants/{}/void", url_part(&id))),
            id = Esc(&id),
        );
    }
    body.push_str("</tbody></table></div>");
    let _ = write!(
        body,
        "<form method=\"post\" action=\"{}\"><fieldset><legend>Grant credits</legend>{csrf}<input type=\"hidden\" name=\"idempotency_key\" value=\"console:{}\">\
         <label for=\"kind\">Kind</label><select id=\"kind\" name=\"kind\"><option value=\"promotional\">promotional</option><option value=\"purchased\">purchased</option></select>\
         <label for=\"amount\">Amount</label><input id=\"amount\" name=\"amount\" required inputmode=\"decimal\">\
         <label for=\"expires\">Expires (RFC 3339; required for promotional)</label><input id=\"expires\" name=\"expires_at\" placeholder=\"2027-01-01T00:00:00Z\">\
         <label for=\"grant-reason\">Reason (audited)</label><input id=\"grant-reason\" name=\"reason\" required size=\"40\">\
         <p><button type=\"submit\">Grant</button></p></fieldset></form>",
        action("/grants"),
        sessions::new_secret(),
    );
    body.push_str("<details><summary>Ledger</summary><div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">When</th><th scope=\"col\">Kind</th><th scope=\"col\">Grant</th><th scope=\"col\" class=\"num\">Amount</th><th scope=\"col\">Actor</th><th scope=\"col\">Reason</th></tr></thead><tbody>");
    // Newest first (the API's order=newest): the latest 200.
    let entries = ledger["entries"].as_array().cloned().unwrap_or_default();
    for entry in &entries {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
            when(&entry["at"]),
            show(&entry["kind"]),
            show(&entry["grant_id"]),
            show(&entry["amount"]),
            show(&entry["actor"]),
            show(&entry["reason"]),
        );
    }
    body.push_str("</tbody></table></div></details><h2>Invoices</h2><div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">Number</th><th scope=\"col\">Status</th><th scope=\"col\" class=\"num\">Total</th><th scope=\"col\">Links</th></tr></thead><tbody>");
    for invoice in invoices["data"].as_array().into_iter().flatten() {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{} {}</td></tr>",
            show(&invoice["number"]),
            show(&invoice["status"]),
            money(&invoice["total"], &invoice["currency"]),
            safe_link(&invoice["hosted_invoice_url"], "View"),
            safe_link(&invoice["invoice_pdf"], "PDF"),
        );
    }
    body.push_str("</tbody></table></div><h2>Alerts fired</h2><ul>");
    for firing in alerts["firings"].as_array().into_iter().flatten() {
        let _ = write!(
            body,
            "<li>{} {} ({})</li>",
            when(&firing["fired_at"]),
            show(&firing["event_type"]),
            show(&firing["rule"])
        );
    }
    body.push_str("</ul>");
    let title = format!("Customer {customer}");
    Html(html::page(
        &frame(&console, &title, "/console/customers", false),
        &body,
    ))
    .into_response()
}

/// An admin action: the API request a console form stands for, and what to say when done.
struct Action<'a> {
    method: Method,
    uri: &'a str,
    body: Value,
    done: &'a str,
}

/// Checks the CSRF token, asks the API, and goes back to the customer's page.
async fn act(
    web: &Web,
    console: &ConsoleSession,
    customer: &str,
    form: &HashMap<String, String>,
    action: Action<'_>,
) -> Response {
    if !sessions::csrf_matches(&console.session, form.get("csrf").map(String::as_str)) {
        return csrf_refused(Area::Console);
    }
    let Action {
        method,
        uri,
        body,
        done,
    } = action;
    match web.call(&console.caller, method, uri, Some(&body)).await {
        Ok(_) => Redirect::to(&format!(
            "/console/customers/{}?done={}",
            url_part(customer),
            url_part(done)
        ))
        .into_response(),
        Err(refusal) => refusal.page(Area::Console),
    }
}

fn field(form: &HashMap<String, String>, name: &str) -> String {
    form.get(name)
        .map(|v| v.trim().to_owned())
        .unwrap_or_default()
}

/// `POST /console/customers/{id}/plan`: changes the live subscription's plan now, or starts
/// one on that plan.
pub(crate) async fn change_plan(
    State(web): State<Arc<Web>>,
    console: ConsoleSession,
    Path(customer): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let picture = web
        .call(&console.caller, Method::GET, &path(&customer, ""), None)
        .await;
    let live = picture.as_ref().ok().and_then(|p| {
        let s = &p["subscription"];
        matches!(
            s["status"].as_str(),
            Some("active" | "trialing" | "past_due")
        )
        .then(|| s["id"].clone())
    });
    let (plan, reason) = (field(&form, "plan"), field(&form, "reason"));
    let (uri, body) = match live {
        Some(id) => (
            format!("/v1/subscriptions/{}/change", url_part(&html::text(&id))),
            json!({ "plan": plan, "at": "now", "reason": reason }),
        ),
        None => (
            "/v1/subscriptions".to_owned(),
            json!({ "customer": customer, "plan": plan, "reason": reason }),
        ),
    };
    let action = Action {
        method: Method::POST,
        uri: &uri,
        body,
        done: "plan changed",
    };
    act(&web, &console, &customer, &form, action).await
}

/// `POST /console/customers/{id}/grants`.
pub(crate) async fn grant(
    State(web): State<Arc<Web>>,
    console: ConsoleSession,
    Path(customer): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut body = json!({
        "kind": field(&form, "kind"), "amount": field(&form, "amount"),
        "idempotency_key": field(&form, "idempotency_key"), "reason": field(&form, "reason"),
    });
    let expires = field(&form, "expires_at");
    if !expires.is_empty() {
        body["expires_at"] = json!(expires);
    }
    let uri = path(&customer, "/credits/grants");
    let action = Action {
        method: Method::POST,
        uri: &uri,
        body,
        done: "credits granted",
    };
    act(&web, &console, &customer, &form, action).await
}

/// `POST /console/customers/{id}/grants/{grant_id}/void`.
pub(crate) async fn void(
    State(web): State<Arc<Web>>,
    console: ConsoleSession,
    Path((customer, grant_id)): Path<(String, String)>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let uri = path(
        &customer,
        &format!("/credits/grants/{}/void", url_part(&grant_id)),
    );
    let body = json!({ "reason": field(&form, "reason") });
    let action = Action {
        method: Method::POST,
        uri: &uri,
        body,
        done: "grant voided",
    };
    act(&web, &console, &customer, &form, action).await
}

/// `POST /console/customers/{id}/override`: the override as JSON, replaced whole.
pub(crate) async fn set_override(
    State(web): State<Arc<Web>>,
    console: ConsoleSession,
    Path(customer): Path<String>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let overrides: Value = match serde_json::from_str(&field(&form, "overrides")) {
        Ok(value) => value,
        Err(error) => {
            return refuse(
                Area::Console,
                StatusCode::BAD_REQUEST,
                "INVALID_OVERRIDE",
                &format!("The override is not JSON: {error}"),
            )
        }
    };
    let body = json!({ "overrides": overrides, "reason": field(&form, "reason") });
    let uri = path(&customer, "/overrides");
    let action = Action {
        method: Method::PUT,
        uri: &uri,
        body,
        done: "override set",
    };
    act(&web, &console, &customer, &form, action).await
}

/// `GET /console/alerts`: alert deliveries, newest first (failed ones with their error).
pub(crate) async fn alerts(
    State(web): State<Arc<Web>>,
    console: ConsoleSession,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let status = query
        .get("status")
        .filter(|s| ["pending", "delivered", "failed"].contains(&s.as_str()));
    let uri = match status {
        Some(status) => format!("/v1/alerts/deliveries?limit=200&status={status}"),
        None => "/v1/alerts/deliveries?limit=200".to_owned(),
    };
    let answer = match web.call(&console.caller, Method::GET, &uri, None).await {
        Ok(value) => value,
        Err(refusal) => return refusal.page(Area::Console),
    };
    let mut body = String::from("<ul class=\"ranges\"><li><a href=\"/console/alerts\">All</a></li><li><a href=\"/console/alerts?status=failed\">Failed</a></li><li><a href=\"/console/alerts?status=pending\">Pending</a></li></ul><div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">Created</th><th scope=\"col\">Event</th><th scope=\"col\">Customer</th><th scope=\"col\">Status</th><th scope=\"col\" class=\"num\">Attempts</th><th scope=\"col\">Last error</th></tr></thead><tbody>");
    let deliveries = answer["deliveries"].as_array().cloned().unwrap_or_default();
    for delivery in &deliveries {
        let customer = html::text(&delivery["customer"]);
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td><a href=\"/console/customers/{}\">{}</a></td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            when(&delivery["created_at"]),
            show(&delivery["event_type"]),
            url_part(&customer),
            Esc(&customer),
            show(&delivery["status"]),
            show(&delivery["attempts"]),
            show(&delivery["last_error"]),
        );
    }
    if deliveries.is_empty() {
        body.push_str("<tr><td colspan=\"6\">No deliveries.</td></tr>");
    }
    body.push_str("</tbody></table></div>");
    Html(html::page(
        &frame(&console, "Alert deliveries", "/console/alerts", false),
        &body,
    ))
    .into_response()
}

/// `GET /console/stripe?status=`: submissions to Stripe, newest first, with their attempts and
/// errors; the ones waiting for review.
pub(crate) async fn stripe(
    State(web): State<Arc<Web>>,
    console: ConsoleSession,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let status = query
        .get("status")
        .filter(|s| ["pending", "sent", "failed", "needs_review"].contains(&s.as_str()))
        .cloned();
    let filter = tally_sink::store::SubmissionFilter {
        status,
        limit: 200,
        ..Default::default()
    };
    let rows = match tally_sink::store::list_submissions(&web.state.reader_pool, &filter).await {
        Ok(rows) => rows,
        Err(error) => return store_unavailable(Area::Console, error),
    };
    let mut body = String::from("<ul class=\"ranges\"><li><a href=\"/console/stripe\">All</a></li><li><a href=\"/console/stripe?status=failed\">Failed</a></li><li><a href=\"/console/stripe?status=pending\">Pending</a></li><li><a href=\"/console/stripe?status=needs_review\">Needs review</a></li></ul><p class=\"muted\">Retry failed submissions with <code>tally submissions retry --all-failed</code> once their cause is fixed.</p><div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">Created</th><th scope=\"col\">Customer</th><th scope=\"col\">Meter</th><th scope=\"col\">Slot</th><th scope=\"col\">Kind</th><th scope=\"col\" class=\"num\">Value</th><th scope=\"col\">Status</th><th scope=\"col\" class=\"num\">Attempts</th><th scope=\"col\">Last error</th></tr></thead><tbody>");
    for row in &rows {
        let _ = write!(
            body,
            "<tr><td>{}</td><td><a href=\"/console/customers/{}\">{}</a></td><td>{}</td><td>{}</td><td>{} r{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
            row.created_at.format("%Y-%m-%d %H:%M:%S"),
            url_part(&row.customer_id),
            Esc(&row.customer_id),
            Esc(&row.meter),
            row.slot_start.format("%Y-%m-%d %H:%M"),
            Esc(&row.kind),
            row.revision,
            row.value,
            Esc(&row.status),
            row.attempts,
            Esc(row.last_error.as_deref().unwrap_or("")),
        );
    }
    if rows.is_empty() {
        body.push_str("<tr><td colspan=\"9\">No submissions.</td></tr>");
    }
    body.push_str("</tbody></table></div>");
    Html(html::page(
        &frame(&console, "Stripe submissions", "/console/stripe", false),
        &body,
    ))
    .into_response()
}
