//! The pages' stylesheet and scripts, compiled into the binary (`assets/`, written for tally,
//! no third-party code), and `theme.css` from `[serve.web.theme]`.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::html::Area;
use super::{refuse, Web};

/// name, content type, content.
const FILES: [(&str, &str, &str); 4] = [
    (
        "tally.css",
        "text/css; charset=utf-8",
        include_str!("assets/tally.css"),
    ),
    (
        "pages.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/pages.js"),
    ),
    (
        "paywall.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/paywall.js"),
    ),
    (
        "paywall.css",
        "text/css; charset=utf-8",
        include_str!("assets/paywall.css"),
    ),
];

/// `GET /assets/{file}`.
pub(crate) async fn asset(State(web): State<Arc<Web>>, Path(file): Path<String>) -> Response {
    let (content_type, body) = if file == "theme.css" {
        ("text/css; charset=utf-8", theme_css(&web))
    } else {
        match FILES.iter().find(|(name, _, _)| *name == file) {
            Some((_, content_type, body)) => (*content_type, (*body).to_owned()),
            None => {
                return refuse(
                    Area::Public,
                    StatusCode::NOT_FOUND,
                    "NOT_FOUND",
                    "No such file.",
                )
            }
        }
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    // The paywall script is loaded by the team's own app, on its origin.
    if file.starts_with("paywall") {
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    response
}

/// The theme's custom properties (validated by `WebConfig::validate`: plain CSS values).
fn theme_css(web: &Web) -> String {
    let mut css = String::from(":root {\n");
    for (name, value) in web.config.theme.properties() {
        let _ = writeln!(css, "  {name}: {value};");
    }
    css.push_str("}\n");
    css
}
