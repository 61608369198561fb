//! HTML out of strings, safely: every value a page shows passes through [`Esc`] (text and
//! attribute values alike), and every page has the same frame ([`page`]): no inline script or
//! style, so the Content-Security-Policy can forbid both.

use std::fmt::{self, Display, Write};

/// A value escaped for HTML text and quoted attribute values.
pub(crate) struct Esc<'a>(pub(crate) &'a str);

impl Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '&' => f.write_str("&amp;")?,
                '<' => f.write_str("&lt;")?,
                '>' => f.write_str("&gt;")?,
                '"' => f.write_str("&quot;")?,
                '\'' => f.write_str("&#39;")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// A JSON value as the text a page shows: strings as they are, numbers as written, null as "–".
pub(crate) fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "–".into(),
        other => other.to_string(),
    }
}

/// `text` escaped.
pub(crate) fn show(value: &serde_json::Value) -> String {
    Esc(&text(value)).to_string()
}

/// A timestamp (RFC 3339) as `2026-12-07 14:05 UTC`; anything else as it is.
pub(crate) fn when(value: &serde_json::Value) -> String {
    let raw = text(value);
    match chrono::DateTime::parse_from_rfc3339(&raw) {
        Ok(at) => at
            .with_timezone(&chrono::Utc)
            .format("%Y-%m-%d %H:%M UTC")
            .to_string(),
        Err(_) => Esc(&raw).to_string(),
    }
}

/// Percent-encodes a path segment or query value: only unreserved characters stay.
pub fn url_part(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// Which set of pages a page belongs to: its navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Area {
    Portal,
    Console,
    Public,
}

const PORTAL_NAV: [(&str, &str); 6] = [
    ("/portal", "Overview"),
    ("/portal/usage", "Usage"),
    ("/portal/credits", "Credits"),
    ("/portal/invoices", "Invoices"),
    ("/portal/plans", "Plans"),
    ("/portal/alerts", "Alerts"),
];

const CONSOLE_NAV: [(&str, &str); 4] = [
    ("/console", "Pipeline"),
    ("/console/customers", "Customers"),
    ("/console/alerts", "Alerts"),
    ("/console/stripe", "Stripe"),
];

/// What frames a page: its title, where it is, and the session's CSRF token for its forms.
pub(crate) struct Frame<'a> {
    pub(crate) area: Area,
    pub(crate) title: &'a str,
    /// The navigation link that is current.
    pub(crate) current: &'a str,
    /// Who the page is for (the portal's customer, the console's token), shown in the header.
    pub(crate) who: Option<&'a str>,
    /// For the logout form.
    pub(crate) csrf: Option<&'a str>,
    /// Seconds between refreshes of `<main>` (pages.js), for pages that show live numbers.
    pub(crate) refresh: Option<u32>,
}

/// A whole page around `body` (already escaped HTML).
pub(crate) fn page(frame: &Frame<'_>, body: &str) -> String {
    let mut html = String::with_capacity(body.len() + 2048);
    let refresh = frame
        .refresh
        .map(|s| format!(" data-refresh=\"{s}\""))
        .unwrap_or_default();
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · tally</title>\
         <link rel=\"stylesheet\" href=\"/assets/tally.css\">\
         <link rel=\"stylesheet\" href=\"/assets/theme.css\">\
         <script src=\"/assets/pages.js\" defer></script></head>\
         <body class=\"area-{}\"{refresh}><a class=\"skip\" href=\"#main\">Skip to content</a><header class=\"top\">\
         <span class=\"brand\">tally</span>",
        Esc(frame.title),
        match frame.area {
            Area::Portal => "portal",
            Area::Console => "console",
            Area::Public => "public",
        }
    );
    let nav: &[(&str, &str)] = match frame.area {
        Area::Portal => &PORTAL_NAV,
        Area::Console => &CONSOLE_NAV,
        Area::Public => &[],
    };
    if !nav.is_empty() {
        html.push_str("<nav aria-label=\"Sections\"><ul>");
        for (href, label) in nav {
            let current = if *href == frame.current {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = write!(html, "<li><a href=\"{href}\"{current}>{label}</a></li>");
        }
        html.push_str("</ul></nav>");
    }
    if let Some(who) = frame.who {
        let _ = write!(html, "<span class=\"who\">{}</span>", Esc(who));
    }
    if let (Some(csrf), Area::Portal | Area::Console) = (frame.csrf, frame.area) {
        let action = if frame.area == Area::Console {
            "/console/logout"
        } else {
            "/portal/logout"
        };
        let _ = write!(
            html,
            "<form method=\"post\" action=\"{action}\" class=\"logout\">{}<button type=\"submit\">Log out</button></form>",
            csrf_field(csrf)
        );
    }
    let _ = write!(
        html,
        "</header><main id=\"main\"><h1>{}</h1>{body}</main></body></html>",
        Esc(frame.title)
    );
    html
}

/// The hidden field every form carries.
pub(crate) fn csrf_field(csrf: &str) -> String {
    format!(
        "<input type=\"hidden\" name=\"csrf\" value=\"{}\">",
        Esc(csrf)
    )
}

/// What a page says after a change went through (`?done=`): only these words, so a link
/// cannot make a page say something of its own choosing.
const DONE: [&str; 6] = [
    "alert added",
    "alert removed",
    "plan changed",
    "credits granted",
    "grant voided",
    "override set",
];

/// The "Done" message for `?done=`, when it is one of ours.
pub(crate) fn done(said: Option<&String>) -> String {
    match said.and_then(|said| DONE.iter().find(|known| **known == said.as_str())) {
        Some(known) => message("ok", &format!("Done: {known}.")),
        None => String::new(),
    }
}

/// A message box: `kind` is `error`, `notice` or `ok`.
pub(crate) fn message(kind: &str, text: &str) -> String {
    let role = if kind == "error" { "alert" } else { "status" };
    format!(
        "<p class=\"message {kind}\" role=\"{role}\">{}</p>",
        Esc(text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_text_is_inert() {
        let hostile = "\"><img src=x onerror=alert(1)><script>alert('x')</script>&";
        let escaped = Esc(hostile).to_string();
        assert!(!escaped.contains('<') && !escaped.contains('>') && !escaped.contains('"'));
        assert!(!escaped.contains('\''));
        assert_eq!(
            escaped,
            "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;"
        );
    }

    #[test]
    fn done_says_only_our_words() {
        assert!(done(Some(&"alert added".to_owned())).contains("Done: alert added."));
        assert_eq!(done(Some(&"your account is closed".to_owned())), "");
        assert_eq!(done(None), "");
    }

    #[test]
    fn url_parts_keep_only_unreserved_characters() {
        assert_eq!(url_part("acme-1_x.y~"), "acme-1_x.y~");
        assert_eq!(url_part("a/b?c#d e<"), "a%2Fb%3Fc%23d%20e%3C");
        assert_eq!(url_part("é"), "%C3%A9");
    }
}
