//! A usage chart as inline SVG, drawn on the server: one line per series (the meter's group
//! keys), a point per bucket with its exact value in `data-value` and a `<title>`, and the same
//! numbers as a table for screen readers and for reading off. Positions are SVG attributes, not
//! styles, so the Content-Security-Policy needs no inline style.

use std::fmt::Write;

use serde_json::Value;

use super::html::{show, Esc};

const WIDTH: f64 = 720.0;
const HEIGHT: f64 = 220.0;
const LEFT: f64 = 56.0;
const RIGHT: f64 = 12.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 28.0;
/// Series drawn in their own colour; more share the last ones' classes.
const COLOURS: usize = 8;
/// Series drawn at most (the busiest first); the rest are in the table and the CSV, so a meter
/// grouped by a key of many values cannot make a page of megabytes.
const DRAWN: usize = COLOURS;

/// The chart of one meter's usage answer (`GET /v1/customers/{id}/usage`): `series` of
/// `{group_key, points: [{start, value}]}`.
pub(crate) fn usage_chart(
    meter: &str,
    answer: &Value,
    label_of: impl Fn(&str) -> String,
) -> String {
    let all_series = answer["series"].as_array().cloned().unwrap_or_default();
    let total = |one: &Value| -> f64 {
        one["points"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                p["value"]
                    .as_str()
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or(0.0)
            })
            .sum()
    };
    let mut series = all_series.clone();
    if series.len() > DRAWN {
        series.sort_by(|a, b| total(b).total_cmp(&total(a)));
        series.truncate(DRAWN);
    }
    let mut starts: Vec<String> = series
        .iter()
        .flat_map(|s| s["points"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p["start"].as_str().map(str::to_owned))
        .collect();
    starts.sort();
    starts.dedup();
    let value_of = |point: &Value| -> f64 {
        match &point["value"] {
            Value::String(s) => s.parse().unwrap_or(0.0),
            Value::Number(n) => n.as_f64().unwrap_or(0.0),
            _ => 0.0,
        }
    };
    let max = series
        .iter()
        .flat_map(|s| s["points"].as_array().cloned().unwrap_or_default())
        .map(|p| value_of(&p))
        .fold(0.0_f64, f64::max);
    let top = if max > 0.0 { max } else { 1.0 };
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    // Points stand at their time within the range asked for, so a quiet stretch looks quiet.
    let time = |field: &Value| {
        field
            .as_str()
            .and_then(|s| s.parse::<chrono::DateTime<chrono::Utc>>().ok())
    };
    let from = time(&answer["from"]).or_else(|| starts.first().and_then(|s| s.parse().ok()));
    let to = time(&answer["to"]).or_else(|| starts.last().and_then(|s| s.parse().ok()));
    let x_of = |start: &str| -> f64 {
        let (Some(from), Some(to), Ok(at)) =
            (from, to, start.parse::<chrono::DateTime<chrono::Utc>>())
        else {
            return LEFT;
        };
        let span = (to - from).num_seconds().max(1) as f64;
        let offset = (at - from)
            .num_seconds()
            .clamp(0, (to - from).num_seconds().max(0)) as f64;
        LEFT + plot_w * offset / span
    };
    let y_of = |value: f64| -> f64 { TOP + plot_h - plot_h * (value / top) };

    let mut svg = String::new();
    let name = Esc(meter);
    let _ = write!(
        svg,
        "<svg class=\"chart\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" aria-label=\"{name} usage, {} series, highest {}\" data-meter=\"{name}\">",
        series.len(),
        Esc(&format_number(max))
    );
    let _ = write!(
        svg,
        "<line class=\"axis\" x1=\"{LEFT}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\"/><line class=\"axis\" x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{y0}\"/>\
         <text x=\"{tx}\" y=\"{ty}\" text-anchor=\"end\">{}</text><text x=\"{tx}\" y=\"{y0}\" text-anchor=\"end\">0</text>",
        Esc(&format_number(max)),
        y0 = TOP + plot_h,
        x1 = WIDTH - RIGHT,
        tx = LEFT - 6.0,
        ty = TOP + 10.0,
    );
    let edge = |at: Option<chrono::DateTime<chrono::Utc>>| {
        at.map(|a| a.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    };
    if let (Some(first), Some(last)) = (edge(from), edge(to)) {
        let _ = write!(
            svg,
            "<text x=\"{LEFT}\" y=\"{y}\">{}</text><text x=\"{x}\" y=\"{y}\" text-anchor=\"end\">{}</text>",
            Esc(&label_of(&first)),
            Esc(&label_of(&last)),
            y = HEIGHT - 8.0,
            x = WIDTH - RIGHT,
        );
    }
    for (index, one) in series.iter().enumerate() {
        let class = format!("series-{}", index.min(COLOURS - 1));
        let group = one["group_key"].as_str().unwrap_or_default();
        let points = one["points"].as_array().cloned().unwrap_or_default();
        let coordinates: Vec<String> = points
            .iter()
            .map(|p| {
                format!(
                    "{:.1},{:.1}",
                    x_of(p["start"].as_str().unwrap_or_default()),
                    y_of(value_of(p))
                )
            })
            .collect();
        let _ = write!(
            svg,
            "<g class=\"{class}\" data-series=\"{}\"><polyline points=\"{}\"/>",
            Esc(group),
            coordinates.join(" ")
        );
        for point in &points {
            let start = point["start"].as_str().unwrap_or_default();
            let _ = write!(
                svg,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" data-start=\"{}\" data-value=\"{}\"><title>{}{}: {}</title></circle>",
                x_of(start),
                y_of(value_of(point)),
                Esc(start),
                show(&point["value"]),
                if group.is_empty() { String::new() } else { format!("{} · ", Esc(group)) },
                Esc(&label_of(start)),
                show(&point["value"]),
            );
        }
        svg.push_str("</g>");
    }
    svg.push_str("</svg>");

    let mut html = format!("<figure class=\"chart\">{svg}");
    if series.len() > 1
        || series
            .first()
            .is_some_and(|s| s["group_key"].as_str() != Some(""))
    {
        html.push_str("<ul class=\"legend\">");
        for (index, one) in series.iter().enumerate() {
            let _ = write!(
                html,
                "<li><svg viewBox=\"0 0 12 12\" aria-hidden=\"true\"><rect class=\"series-{}\" width=\"12\" height=\"12\"/></svg> {}</li>",
                index.min(COLOURS - 1),
                series_label(one["group_key"].as_str().unwrap_or_default())
            );
        }
        html.push_str("</ul>");
    }
    if all_series.len() > series.len() {
        let _ = write!(
            html,
            "<p class=\"muted\">The {DRAWN} busiest of {} series are drawn; all are in the table and the CSV.</p>",
            all_series.len()
        );
    }
    let _ = write!(
        html,
        "<figcaption><details class=\"data\"><summary>{name} as a table</summary><div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">Period</th><th scope=\"col\">Series</th><th scope=\"col\" class=\"num\">Usage</th></tr></thead><tbody>"
    );
    for one in &all_series {
        let group = series_label(one["group_key"].as_str().unwrap_or_default());
        for point in one["points"].as_array().cloned().unwrap_or_default() {
            let start = point["start"].as_str().unwrap_or_default();
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{group}</td><td class=\"num\">{}</td></tr>",
                Esc(&label_of(start)),
                show(&point["value"])
            );
        }
    }
    if all_series.is_empty() {
        html.push_str("<tr><td colspan=\"3\">No usage in this range.</td></tr>");
    }
    html.push_str("</tbody></table></div></details></figcaption></figure>");
    html
}

/// A group key as people read it: `{"model":"gpt"}` → `model=gpt`; the empty key → "all".
fn series_label(group_key: &str) -> String {
    if group_key.is_empty() {
        return "all".into();
    }
    match serde_json::from_str::<serde_json::Map<String, Value>>(group_key) {
        Ok(map) => Esc(&map
            .iter()
            .map(|(k, v)| format!("{k}={}", super::html::text(v)))
            .collect::<Vec<_>>()
            .join(", "))
        .to_string(),
        Err(_) => Esc(group_key).to_string(),
    }
}

fn format_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn points_carry_their_exact_values_and_hostile_keys_are_text() {
        let answer = json!({ "series": [
            { "group_key": "{\"model\":\"<script>x</script>\"}", "points": [
                { "start": "2026-12-07T10:00:00Z", "value": "1.5" },
                { "start": "2026-12-07T11:00:00Z", "value": "3" } ] },
        ]});
        let html = usage_chart("api\"><img onerror=x>", &answer, |s| s.to_owned());
        assert!(html.contains("data-value=\"1.5\"") && html.contains("data-value=\"3\""));
        assert!(!html.contains("<script>") && !html.contains("<img"));
        assert!(html.contains("model=&lt;script&gt;x&lt;/script&gt;"));
    }
}
