//! Sessions of the portal and the console, in `web_sessions` (migration 0018).
//!
//! - A **portal session** is made by an admin (`POST /v1/customers/{id}/portal-sessions`) for
//!   one customer. Its link carries a secret that opens it once: the first visit trades it
//!   for a cookie with a secret of its own, so the link in a browser's history or a log opens
//!   nothing afterwards. The session reads its customer only (a customer-scope caller).
//! - A **console session** is an admin token exchanged at `/console/login` for a cookie
//!   (HttpOnly, SameSite=Strict); the token is not kept, only its name, and a session ends
//!   when it expires, at logout, or when that token leaves the configuration.
//!
//! Secrets are 256 random bits, stored as SHA-256 digests. Every change a page makes carries
//! the session's CSRF token.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

/// Which pages a session opens: its row's `kind`, its cookie, and where it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Portal,
    Console,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Portal => "portal",
            Kind::Console => "console",
        }
    }

    /// Its cookie's name.
    pub(crate) fn cookie(self) -> &'static str {
        match self {
            Kind::Portal => "tally_portal",
            Kind::Console => "tally_console",
        }
    }

    /// Its pages' path: the cookie's `Path`, and the first page a session opens on.
    pub(crate) fn home(self) -> &'static str {
        match self {
            Kind::Portal => "/portal",
            Kind::Console => "/console",
        }
    }
}

/// A live session, as a page needs it.
#[derive(Debug, Clone)]
pub(crate) struct Session {
    /// A UUID, as text.
    pub(crate) id: String,
    /// Portal: its customer.
    pub(crate) customer: Option<String>,
    /// Console: the SHA-256 of the admin token that logged in.
    pub(crate) token_sha256: Option<Vec<u8>>,
    pub(crate) csrf: String,
    pub(crate) return_url: Option<String>,
    pub(crate) expires_at: DateTime<Utc>,
}

/// A new secret: 256 random bits as 64 hex digits.
pub(crate) fn new_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn digest(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A new portal session for `customer`: its id, the link's secret and when it ends.
pub(crate) async fn create_portal(
    pool: &PgPool,
    customer: &str,
    expires_at: DateTime<Utc>,
    return_url: Option<&str>,
    created_by: &str,
) -> Result<(String, String), sqlx::Error> {
    let id = Uuid::now_v7().to_string();
    let link = new_secret();
    sqlx::query(
        "INSERT INTO web_sessions (id, kind, customer_id, link_sha256, csrf_token, return_url, created_by, expires_at)
         VALUES ($1::uuid, 'portal', $2, $3, $4, $5, $6, $7)",
    )
    .bind(&id)
    .bind(customer)
    .bind(digest(&link))
    .bind(new_secret())
    .bind(return_url)
    .bind(created_by)
    .bind(expires_at)
    .execute(pool)
    .await?;
    Ok((id, link))
}

/// A console session for the admin token `token_name`, opened by a single-use link (`tally
/// demo` prints one): the link's secret.
pub(crate) async fn create_console_link(
    pool: &PgPool,
    token_name: &str,
    token: &str,
    expires_at: DateTime<Utc>,
    created_by: &str,
) -> Result<String, sqlx::Error> {
    let link = new_secret();
    sqlx::query(
        "INSERT INTO web_sessions (id, kind, token_name, token_sha256, link_sha256, csrf_token, created_by, expires_at)
         VALUES ($1::uuid, 'console', $2, $3, $4, $5, $6, $7)",
    )
    .bind(Uuid::now_v7().to_string())
    .bind(token_name)
    .bind(digest(token))
    .bind(digest(&link))
    .bind(new_secret())
    .bind(created_by)
    .bind(expires_at)
    .execute(pool)
    .await?;
    Ok(link)
}

/// The customer a portal link (still unused and live) opens, without using it up.
pub(crate) async fn peek_portal_link(
    pool: &PgPool,
    link: &str,
) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT customer_id FROM web_sessions
         WHERE link_sha256 = $1 AND kind = 'portal' AND exchanged_at IS NULL
           AND revoked_at IS NULL AND expires_at > now()",
    )
    .bind(digest(link))
    .fetch_optional(pool)
    .await
}

/// Trades a link's secret for the session of `kind` and its cookie's secret, once: a link
/// already used, expired or revoked opens nothing.
pub(crate) async fn exchange_link(
    pool: &PgPool,
    kind: Kind,
    link: &str,
) -> Result<Option<(Session, String)>, sqlx::Error> {
    let cookie = new_secret();
    let row: Option<SessionRow> = sqlx::query_as(
        "UPDATE web_sessions SET exchanged_at = now(), cookie_sha256 = $2
         WHERE link_sha256 = $1 AND kind = $3 AND exchanged_at IS NULL
           AND revoked_at IS NULL AND expires_at > now()
         RETURNING id::text AS id, customer_id, token_sha256, csrf_token, return_url, expires_at",
    )
    .bind(digest(link))
    .bind(digest(&cookie))
    .bind(kind.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|row| (row.into(), cookie)))
}

/// A console session for the admin token `token` (named `token_name`), and its cookie's
/// secret. The token itself is not kept: its SHA-256 is.
pub(crate) async fn open_console(
    pool: &PgPool,
    token_name: &str,
    token: &str,
    expires_at: DateTime<Utc>,
) -> Result<(Session, String), sqlx::Error> {
    let cookie = new_secret();
    let row: SessionRow = sqlx::query_as(
        "INSERT INTO web_sessions (id, kind, token_name, token_sha256, cookie_sha256, csrf_token, created_by, expires_at, exchanged_at)
         VALUES ($1::uuid, 'console', $2, $3, $4, $5, $6, $7, now())
         RETURNING id::text AS id, customer_id, token_sha256, csrf_token, return_url, expires_at",
    )
    .bind(Uuid::now_v7().to_string())
    .bind(token_name)
    .bind(digest(token))
    .bind(digest(&cookie))
    .bind(new_secret())
    .bind(format!("token:{token_name}"))
    .bind(expires_at)
    .fetch_one(pool)
    .await?;
    Ok((row.into(), cookie))
}

/// The live session of `kind` a cookie's secret opens.
pub(crate) async fn find(
    pool: &PgPool,
    kind: Kind,
    cookie: &str,
) -> Result<Option<Session>, sqlx::Error> {
    let row: Option<SessionRow> = sqlx::query_as(
        "SELECT id::text AS id, customer_id, token_sha256, csrf_token, return_url, expires_at
         FROM web_sessions
         WHERE cookie_sha256 = $1 AND kind = $2 AND revoked_at IS NULL AND expires_at > now()",
    )
    .bind(digest(cookie))
    .bind(kind.as_str())
    .fetch_optional(pool)
    .await?;
    Ok(row.map(Session::from))
}

/// Ends a session (logout, or an admin's revocation). Whether there was a live one.
pub(crate) async fn revoke(pool: &PgPool, kind: Kind, id: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE web_sessions SET revoked_at = now()
         WHERE id = $1::uuid AND kind = $2 AND revoked_at IS NULL AND expires_at > now()",
    )
    .bind(id)
    .bind(kind.as_str())
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Deletes sessions that ended more than a day ago (called now and then by new sessions).
pub(crate) async fn forget_ended(pool: &PgPool) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM web_sessions WHERE expires_at < now() - interval '1 day'
            OR revoked_at < now() - interval '1 day'",
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

#[derive(sqlx::FromRow)]
struct SessionRow {
    id: String,
    customer_id: Option<String>,
    token_sha256: Option<Vec<u8>>,
    csrf_token: String,
    return_url: Option<String>,
    expires_at: DateTime<Utc>,
}

impl From<SessionRow> for Session {
    fn from(row: SessionRow) -> Session {
        Session {
            id: row.id,
            customer: row.customer_id,
            token_sha256: row.token_sha256,
            csrf: row.csrf_token,
            return_url: row.return_url,
            expires_at: row.expires_at,
        }
    }
}

/// The value of cookie `name` in a `Cookie` header; none when it is there twice (a sibling
/// subdomain can set a cookie of the same name for this host: which one is ours is unknown).
pub(crate) fn cookie<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    let mut found = headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(key, _)| *key == name)
        .map(|(_, value)| value);
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// Whether a form's CSRF token is the session's: compared in constant time.
pub(crate) fn csrf_matches(session: &Session, presented: Option<&str>) -> bool {
    let Some(presented) = presented else {
        return false;
    };
    let (a, b) = (
        Sha256::digest(presented.as_bytes()),
        Sha256::digest(session.csrf.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{header, HeaderMap, HeaderValue};

    #[test]
    fn a_cookie_is_found_by_its_exact_name() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("x_tally_portal=no; tally_portal=yes; other=1"),
        );
        assert_eq!(cookie(&headers, Kind::Portal.cookie()), Some("yes"));
        assert_eq!(cookie(&headers, Kind::Console.cookie()), None);
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("tally_portal=mine; tally_portal=tossed"),
        );
        assert_eq!(
            cookie(&headers, Kind::Portal.cookie()),
            None,
            "two: neither is trusted"
        );
    }

    #[test]
    fn csrf_tokens_must_match_exactly() {
        let session = Session {
            id: String::new(),
            customer: None,
            token_sha256: None,
            csrf: "abc".into(),
            return_url: None,
            expires_at: Utc::now(),
        };
        assert!(csrf_matches(&session, Some("abc")));
        assert!(!csrf_matches(&session, Some("abd")));
        assert!(!csrf_matches(&session, Some("")));
        assert!(!csrf_matches(&session, None));
    }
}
