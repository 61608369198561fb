//! `Idempotency-Key`: the first response (status and body, 5xx included) is replayed for 24 h;
//! the same key with other parameters is a 400 `idempotency_error`; the same key while the
//! first request runs is a 409 `idempotency_key_in_use`. Validation failures and 429s are not
//! stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::reply::Reply;

const RETENTION_SECONDS: i64 = 24 * 3600;

enum Entry {
    InFlight {
        fingerprint: u64,
    },
    Done {
        fingerprint: u64,
        reply: Reply,
        at: i64,
    },
}

#[derive(Clone, Default)]
pub(crate) struct IdempotencyKeys {
    entries: Arc<Mutex<HashMap<(String, String), Entry>>>,
}

pub(crate) enum Begin {
    New(KeyGuard),
    Replay(Reply),
    Conflict(Reply),
}

/// Holds a key in flight; dropped without `finish`, it frees the key (nothing was stored).
pub(crate) struct KeyGuard {
    keys: IdempotencyKeys,
    key: (String, String),
    finished: bool,
}

impl IdempotencyKeys {
    pub(crate) fn begin(&self, api_key: &str, key: &str, fingerprint: u64, now: i64) -> Begin {
        let id = (api_key.to_owned(), key.to_owned());
        let mut entries = self.entries.lock().expect("idempotency lock poisoned");
        match entries.get(&id) {
            Some(Entry::InFlight { .. }) => {
                return Begin::Conflict(
                    Reply::error(
                        409,
                        "idempotency_error",
                        Some("idempotency_key_in_use"),
                        "There is currently another in-progress request using this Idempotent Key (that probably means you submitted twice, and the other request is still going through). Please try again later.",
                        None,
                    )
                    .should_retry(true),
                )
            }
            Some(Entry::Done {
                fingerprint: first,
                reply,
                at,
            }) if now - at < RETENTION_SECONDS => {
                if *first != fingerprint {
                    return Begin::Conflict(
                        Reply::error(
                            400,
                            "idempotency_error",
                            None,
                            format!("Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key}' if you meant to execute a different request."),
                            None,
                        )
                        .should_retry(false),
                    );
                }
                let mut replay = reply.clone();
                replay.replayed = true;
                return Begin::Replay(replay);
            }
            _ => {}
        }
        entries.insert(id.clone(), Entry::InFlight { fingerprint });
        Begin::New(KeyGuard {
            keys: self.clone(),
            key: id,
            finished: false,
        })
    }
}

impl KeyGuard {
    /// Stores the reply for replay: successes and 500s (the API began executing), not 4xx
    /// validation failures, 429s or 503s (the request never reached the API).
    pub(crate) fn finish(mut self, reply: &Reply, now: i64) {
        self.finished = true;
        let mut entries = self.keys.entries.lock().expect("idempotency lock poisoned");
        let stored = matches!(reply.status, 200..=399 | 500);
        let fingerprint = match entries.remove(&self.key) {
            Some(Entry::InFlight { fingerprint }) => fingerprint,
            _ => return,
        };
        if stored {
            entries.insert(
                self.key.clone(),
                Entry::Done {
                    fingerprint,
                    reply: reply.clone(),
                    at: now,
                },
            );
        }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        if !self.finished {
            if let Ok(mut entries) = self.keys.entries.lock() {
                entries.remove(&self.key);
            }
        }
    }
}
