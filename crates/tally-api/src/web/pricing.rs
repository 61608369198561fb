//! `/pricing`: the plans from tally.toml (`serve.web.pricing_plans`, else the self-serve plans
//! and the fallback plan) with
//! their price, features and limits (∞ for unlimited). Public and cacheable; themed by the
//! CSS custom properties of `[serve.web.theme]`. The portal's plans page draws the same cards.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use serde_json::Value;

use super::html::{self, Area, Esc, Frame};
use super::{store_unavailable, Web};

/// `GET /pricing`.
pub(crate) async fn page(State(web): State<Arc<Web>>) -> Response {
    let plans = match listed_plans(&web).await {
        Ok(plans) => plans,
        Err(error) => return error,
    };
    let cards = plan_cards(&plans, None, |_| String::new());
    let frame = Frame {
        area: Area::Public,
        title: "Pricing",
        current: "/pricing",
        who: None,
        csrf: None,
        refresh: None,
    };
    let mut response = Html(html::page(&frame, &cards)).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}

/// The plans the pricing page lists, in its order.
pub(crate) async fn listed_plans(web: &Web) -> Result<Vec<Value>, Response> {
    let stored = tally_billing::list_plans(&web.state.pool)
        .await
        .map_err(|e| store_unavailable(Area::Public, e))?;
    let chosen = &web.config.pricing_plans;
    if chosen.is_empty() {
        // Only what a customer could be on by itself: self-serve plans and the fallback plan.
        // A plan made for one customer is not published unless listed.
        let fallback = web.state.fallback_plan.as_deref();
        return Ok(stored
            .into_iter()
            .filter(|(name, plan)| plan["self_serve"] == true || Some(name.as_str()) == fallback)
            .map(|(_, plan)| plan)
            .collect());
    }
    Ok(chosen
        .iter()
        .filter_map(|name| {
            stored
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, p)| p.clone())
        })
        .collect())
}

/// A plan's price as people read it: `49.00 USD / month`, or "Free".
pub(crate) fn price_text(plan: &Value) -> String {
    let price = &plan["price"];
    if price.is_null() {
        return "Free".into();
    }
    format!(
        "{} {} / {}",
        html::text(&price["amount"]),
        html::text(&price["currency"]).to_uppercase(),
        html::text(&price["interval"])
    )
}

/// A limit as people read it: `100,000 per day`, `∞`.
pub(crate) fn limit_text(limit: &Value) -> String {
    let amount = html::text(&limit["limit"]);
    if amount == "-1" {
        return "∞ (unlimited)".into();
    }
    let period = match limit["period"].as_str() {
        Some("day") => "per day",
        Some("month") => "per month",
        Some("billing_period") => "per billing period",
        _ => "",
    };
    let mut text = format!("{amount} {period}");
    if let Some(unit) = limit["unit_price"].as_str() {
        let _ = write!(text, ", then {unit} each");
    }
    text.trim().to_owned()
}

/// The cards of `plans`; `current` is marked; `action` gives each plan's button (HTML).
pub(crate) fn plan_cards(
    plans: &[Value],
    current: Option<&str>,
    action: impl Fn(&Value) -> String,
) -> String {
    let mut out = String::from("<div class=\"plans\">");
    if plans.is_empty() {
        out.push_str("<p>No plans are published yet.</p>");
    }
    for plan in plans {
        let name = plan["name"].as_str().unwrap_or_default();
        let is_current = current == Some(name);
        let _ = write!(
            out,
            "<section class=\"card plan{}\" data-plan=\"{}\" aria-labelledby=\"plan-{}\"><h2 id=\"plan-{}\">{}{}</h2><p class=\"price\">{}</p>",
            if is_current { " current" } else { "" },
            Esc(name),
            html::url_part(name),
            html::url_part(name),
            Esc(name),
            if is_current { " <span class=\"badge\">Your plan</span>" } else { "" },
            Esc(&price_text(plan)),
        );
        if let Some(limits) = plan["limits"].as_object() {
            out.push_str("<h3>Limits</h3><ul>");
            for (meter, limit) in limits {
                let _ = write!(
                    out,
                    "<li data-meter=\"{}\"><strong>{}</strong>: {}</li>",
                    Esc(meter),
                    Esc(meter),
                    Esc(&limit_text(limit))
                );
            }
            out.push_str("</ul>");
        }
        if let Some(features) = plan["features"].as_object().filter(|f| !f.is_empty()) {
            out.push_str("<h3>Features</h3><ul>");
            for (feature, on) in features {
                let (mark, words) = if on.as_bool() == Some(true) {
                    ("✓", "included")
                } else {
                    ("✗", "not included")
                };
                let _ = write!(
                    out,
                    "<li><span aria-hidden=\"true\">{mark}</span> {} <span class=\"skip-text muted\">({words})</span></li>",
                    Esc(feature)
                );
            }
            out.push_str("</ul>");
        }
        out.push_str(&action(plan));
        out.push_str("</section>");
    }
    out.push_str("</div>");
    out
}
