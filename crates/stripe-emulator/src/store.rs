//! Customers, meters and meter events: what Stripe holds, and what it reports back.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::{json, Value};

use crate::reply::Reply;

const DAY: i64 = 24 * 3600;
/// Meter event timestamps may be this far in the past...
const MAX_PAST_SECONDS: i64 = 35 * DAY;
/// ...and this far in the future.
const MAX_FUTURE_SECONDS: i64 = 5 * 60;
/// An event can be canceled this long after Stripe received it.
const CANCEL_WINDOW_SECONDS: i64 = DAY;
const MAX_IDENTIFIER_LEN: usize = 100;

/// A form body (`a=1&payload[value]=2`) as ordered pairs.
pub(crate) struct Form(Vec<(String, String)>);

impl Form {
    pub(crate) fn parse(bytes: &[u8]) -> Form {
        Form(form_urlencoded::parse(bytes).into_owned().collect())
    }

    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of an array parameter, written `key[]=a&key[]=b` or `key[0]=a&key[1]=b`
    /// (Stripe's libraries write the second).
    pub(crate) fn array(&self, key: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(key)
                    .and_then(|rest| rest.strip_prefix('['))
                    .and_then(|rest| rest.strip_suffix(']'))
                    .is_some_and(|index| {
                        index.is_empty() || index.bytes().all(|b| b.is_ascii_digit())
                    })
            })
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The entries `prefix[key]=value`, as `key → value`.
    pub(crate) fn nested(&self, prefix: &str) -> BTreeMap<String, String> {
        self.0
            .iter()
            .filter_map(|(k, v)| {
                let inner = k
                    .strip_prefix(prefix)?
                    .strip_prefix('[')?
                    .strip_suffix(']')?;
                Some((inner.to_owned(), v.clone()))
            })
            .collect()
    }
}

struct Meter {
    id: String,
    display_name: String,
    event_name: String,
    formula: String,
    customer_key: String,
    value_key: String,
    livemode: bool,
    created: i64,
}

struct MeterEvent {
    identifier: String,
    event_name: String,
    customer: String,
    value: i64,
    timestamp: i64,
    received: i64,
    payload: BTreeMap<String, String>,
    canceled: bool,
}

/// A meter event that passed validation and may be committed.
pub(crate) struct NewEvent {
    pub(crate) identifier: Option<String>,
    pub(crate) event_name: String,
    pub(crate) customer: String,
    value: i64,
    timestamp: i64,
    payload: BTreeMap<String, String>,
}

/// What Stripe holds for one customer and event name (non-canceled events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MeterTotal {
    pub customer: String,
    pub event_name: String,
    pub events: u64,
    pub canceled: u64,
    pub sum: i64,
    /// Value of the latest event by timestamp (ties: the one received last).
    pub last: Option<i64>,
}

/// Counters of what the emulator did, for tests and `GET /_emulator/state`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub requests: u64,
    pub meter_events_created: u64,
    pub duplicate_identifiers: u64,
    pub adjustments: u64,
    pub rate_limited: u64,
    pub concurrency_limited: u64,
    pub injected_500: u64,
    pub injected_503: u64,
    pub delayed: u64,
    pub dropped_after_commit: u64,
    pub idempotent_replays: u64,
    /// `POST /v1/customers` calls that created a customer (replays not counted).
    pub customers_created: u64,
    /// `POST /v2/billing/meter_event_stream` requests taken (their events count in
    /// `meter_events_created` and `duplicate_identifiers`).
    pub stream_requests: u64,
    /// Stream events dropped by the validation that follows acceptance (each reported).
    pub stream_events_refused: u64,
    /// Meter event sessions created (`POST /v2/billing/meter_event_session`).
    pub meter_event_sessions: u64,
}

#[derive(Default)]
pub(crate) struct Store {
    customers: BTreeMap<String, Value>,
    meters: Vec<Meter>,
    events: Vec<MeterEvent>,
    by_identifier: HashMap<String, usize>,
    next_id: u64,
}

impl Store {
    fn new_id(&mut self, prefix: &str) -> String {
        self.next_id += 1;
        format!("{prefix}_emu{:010}", self.next_id)
    }

    /// `POST /v1/customers`: `name`, `email`, `description`, `metadata[…]` (Stripe's metadata
    /// limits: 50 keys, keys up to 40 characters without brackets, values up to 500).
    pub(crate) fn create_customer(&mut self, form: &Form, livemode: bool, now: i64) -> Reply {
        if let Err(reply) = check_metadata(&form.nested("metadata")) {
            return reply;
        }
        let id = self.new_id("cus");
        let customer = json!({
            "id": id,
            "object": "customer",
            "created": now,
            "livemode": livemode,
            "name": form.get("name"),
            "email": form.get("email"),
            "description": form.get("description"),
            "metadata": form.nested("metadata"),
            "balance": 0,
            "delinquent": false,
            "preferred_locales": [],
            "tax_exempt": "none",
        });
        self.customers.insert(id, customer.clone());
        Reply::json(200, &customer)
    }

    /// `GET /v1/customers`: newest first, as Stripe lists them, with `limit` and
    /// `starting_after`; `email` filters (exact, case-sensitive, as Stripe's).
    pub(crate) fn list_customers(&self, query: &Form) -> Reply {
        let email = query.get("email");
        let items = self
            .customers
            .values()
            .rev()
            .filter(|c| email.is_none_or(|e| c["email"] == e))
            .cloned()
            .collect();
        list_page(items, query, "/v1/customers")
    }

    /// `GET /v1/customers/search?query=…`: Stripe's search query language for the clauses
    /// tally needs (`metadata['key']:'value'`, `name:'…'`, `email:'…'`, joined by `AND` or by
    /// `OR`), newest first, paged with `limit` and `page` (the `next_page` of the last answer).
    /// Unlike Stripe, whose search index lags writes by up to a minute, it sees every customer
    /// at once.
    pub(crate) fn search_customers(&self, query: &Form) -> Reply {
        let Some(text) = query.get("query") else {
            return Reply::missing("query");
        };
        let search = match Search::parse(text) {
            Ok(search) => search,
            Err(message) => return Reply::invalid(message, Some("query")),
        };
        let limit = match query.get("limit").map(str::parse::<usize>) {
            None => 10,
            Some(Ok(limit)) if (1..=100).contains(&limit) => limit,
            Some(_) => return Reply::invalid("limit must be between 1 and 100.", Some("limit")),
        };
        let start = match query.get("page") {
            None => 0,
            Some(page) => match page.strip_prefix("page_").and_then(|n| n.parse().ok()) {
                Some(start) => start,
                None => {
                    return Reply::invalid(format!("Invalid page: {page:?}."), Some("page"));
                }
            },
        };
        let matching: Vec<&Value> = self
            .customers
            .values()
            .rev()
            .filter(|c| search.matches(c))
            .collect();
        let page: Vec<Value> = matching
            .iter()
            .skip(start)
            .take(limit)
            .map(|c| (*c).clone())
            .collect();
        let has_more = start + page.len() < matching.len();
        let next_page = has_more.then(|| format!("page_{}", start + page.len()));
        Reply::json(
            200,
            &json!({
                "object": "search_result",
                "url": "/v1/customers/search",
                "has_more": has_more,
                "next_page": next_page,
                "data": page,
            }),
        )
    }

    pub(crate) fn has_meter(&self, event_name: &str) -> bool {
        self.meters.iter().any(|m| m.event_name == event_name)
    }

    pub(crate) fn customers(&self) -> Vec<Value> {
        self.customers.values().cloned().collect()
    }

    pub(crate) fn has_customer(&self, id: &str) -> bool {
        self.customers.contains_key(id)
    }

    pub(crate) fn get_customer(&self, id: &str) -> Reply {
        match self.customers.get(id) {
            Some(customer) => Reply::json(200, customer),
            None => Reply::not_found(format!("No such customer: '{id}'"), Some("id")),
        }
    }

    pub(crate) fn create_meter(&mut self, form: &Form, livemode: bool, now: i64) -> Reply {
        let Some(display_name) = form.get("display_name") else {
            return Reply::missing("display_name");
        };
        let Some(event_name) = form.get("event_name") else {
            return Reply::missing("event_name");
        };
        if event_name.is_empty() || event_name.len() > 100 {
            return Reply::invalid(
                "event_name must be 1 to 100 characters.",
                Some("event_name"),
            );
        }
        let Some(formula) = form.get("default_aggregation[formula]") else {
            return Reply::missing("default_aggregation[formula]");
        };
        if !matches!(formula, "sum" | "count" | "last") {
            return Reply::invalid(
                format!("Invalid default_aggregation[formula]: must be one of sum, count or last; got {formula}."),
                Some("default_aggregation[formula]"),
            );
        }
        if self.meters.iter().any(|m| m.event_name == event_name) {
            return Reply::invalid(
                format!("An active meter with event_name `{event_name}` already exists."),
                Some("event_name"),
            );
        }
        let meter = Meter {
            id: self.new_id("mtr"),
            display_name: display_name.to_owned(),
            event_name: event_name.to_owned(),
            formula: formula.to_owned(),
            customer_key: form
                .get("customer_mapping[event_payload_key]")
                .unwrap_or("stripe_customer_id")
                .to_owned(),
            value_key: form
                .get("value_settings[event_payload_key]")
                .unwrap_or("value")
                .to_owned(),
            livemode,
            created: now,
        };
        let reply = Reply::json(200, &meter_json(&meter));
        self.meters.push(meter);
        reply
    }

    pub(crate) fn list_meters(&self, query: &Form) -> Reply {
        let items = self.meters.iter().map(meter_json).collect();
        list_page(items, query, "/v1/billing/meters")
    }

    /// Checks a meter event's parameters, as Stripe does before it accepts one.
    pub(crate) fn validate_meter_event(&self, form: &Form, now: i64) -> Result<NewEvent, Reply> {
        let timestamp = match form.get("timestamp") {
            None => None,
            Some(text) => match text.parse::<i64>() {
                Ok(ts) => Some(ts),
                Err(_) => {
                    return Err(Reply::invalid(
                        format!("Invalid timestamp: {text:?} is not an integer."),
                        Some("timestamp"),
                    ))
                }
            },
        };
        self.check_meter_event(
            form.get("event_name"),
            form.nested("payload"),
            form.get("identifier").map(str::to_owned),
            timestamp,
            now,
        )
    }

    /// A meter event's values checked against its meter (payload keys, a whole number) and
    /// the timestamp window: at once for v1, afterwards for the v2 stream.
    pub(crate) fn check_meter_event(
        &self,
        event_name: Option<&str>,
        payload: BTreeMap<String, String>,
        identifier: Option<String>,
        timestamp: Option<i64>,
        now: i64,
    ) -> Result<NewEvent, Reply> {
        let Some(event_name) = event_name else {
            return Err(Reply::missing("event_name"));
        };
        if event_name.is_empty() || event_name.len() > 100 {
            return Err(Reply::invalid(
                "event_name must be 1 to 100 characters.",
                Some("event_name"),
            ));
        }
        let meter = self.meters.iter().find(|m| m.event_name == event_name);
        let customer_key = meter.map_or("stripe_customer_id", |m| &m.customer_key);
        let value_key = meter.map_or("value", |m| &m.value_key);
        let Some(customer) = payload.get(customer_key) else {
            return Err(Reply::missing(&format!("payload[{customer_key}]")));
        };
        let Some(value_text) = payload.get(value_key) else {
            return Err(Reply::missing(&format!("payload[{value_key}]")));
        };
        let value = match value_text.parse::<i64>() {
            Ok(value) => value,
            Err(_) => {
                return Err(Reply::invalid(
                    format!("Invalid value for payload[{value_key}]: {value_text:?}. The value must be a whole number."),
                    Some(&format!("payload[{value_key}]")),
                ))
            }
        };
        if identifier
            .as_ref()
            .is_some_and(|id| id.is_empty() || id.len() > MAX_IDENTIFIER_LEN)
        {
            return Err(Reply::invalid(
                "identifier must be 1 to 100 characters.",
                Some("identifier"),
            ));
        }
        let timestamp = timestamp.unwrap_or(now);
        if timestamp < now - MAX_PAST_SECONDS || timestamp > now + MAX_FUTURE_SECONDS {
            return Err(Reply::invalid(
                "Timestamp must be within the past 35 days and not more than 5 minutes in the future.",
                Some("timestamp"),
            ));
        }
        Ok(NewEvent {
            identifier,
            event_name: event_name.to_owned(),
            customer: customer.clone(),
            value,
            timestamp,
            payload,
        })
    }

    /// Records a validated event, unless its identifier is already taken. Returns the reply
    /// and whether the event was new.
    pub(crate) fn commit_meter_event(
        &mut self,
        event: NewEvent,
        livemode: bool,
        now: i64,
    ) -> (Reply, bool) {
        let identifier = match event.identifier {
            Some(identifier) => identifier,
            None => self.new_id("mev"),
        };
        if self.by_identifier.contains_key(&identifier) {
            let reply = Reply::error(
                400,
                "invalid_request_error",
                None,
                format!("An event already exists with identifier {identifier}."),
                Some("identifier"),
            )
            .should_retry(false);
            return (reply, false);
        }
        let stored = MeterEvent {
            identifier: identifier.clone(),
            event_name: event.event_name,
            customer: event.customer,
            value: event.value,
            timestamp: event.timestamp,
            received: now,
            payload: event.payload,
            canceled: false,
        };
        let reply = Reply::json(
            200,
            &json!({
                "object": "billing.meter_event",
                "created": now,
                "event_name": stored.event_name,
                "identifier": stored.identifier,
                "livemode": livemode,
                "payload": stored.payload,
                "timestamp": stored.timestamp,
            }),
        );
        self.by_identifier.insert(identifier, self.events.len());
        self.events.push(stored);
        (reply, true)
    }

    /// `type=cancel`: withdraws an event received less than 24 h ago.
    pub(crate) fn adjust(&mut self, form: &Form, livemode: bool, now: i64) -> Reply {
        let Some(event_name) = form.get("event_name") else {
            return Reply::missing("event_name");
        };
        match form.get("type") {
            Some("cancel") => {}
            None => return Reply::missing("type"),
            Some(other) => {
                return Reply::invalid(
                    format!("Invalid type: must be cancel; got {other}."),
                    Some("type"),
                )
            }
        }
        let Some(identifier) = form.get("cancel[identifier]") else {
            return Reply::missing("cancel[identifier]");
        };
        if let Err(reply) = self.cancel(event_name, identifier, now) {
            return reply;
        }
        Reply::json(
            200,
            &json!({
                "object": "billing.meter_event_adjustment",
                "cancel": { "identifier": identifier },
                "event_name": event_name,
                "livemode": livemode,
                "status": "complete",
                "type": "cancel",
            }),
        )
    }

    /// Cancels the event `identifier` of `event_name`, if it was received less than 24 h ago
    /// and is not canceled yet.
    pub(crate) fn cancel(
        &mut self,
        event_name: &str,
        identifier: &str,
        now: i64,
    ) -> Result<(), Reply> {
        let Some(&index) = self.by_identifier.get(identifier) else {
            return Err(Reply::invalid(
                format!("No meter event with identifier {identifier} was found."),
                Some("cancel[identifier]"),
            ));
        };
        let event = &mut self.events[index];
        if event.event_name != event_name {
            return Err(Reply::invalid(
                format!("The meter event with identifier {identifier} belongs to event_name {}, not {event_name}.", event.event_name),
                Some("event_name"),
            ));
        }
        if now - event.received > CANCEL_WINDOW_SECONDS {
            return Err(Reply::invalid(
                format!("The meter event with identifier {identifier} can no longer be canceled: events can only be canceled within 24 hours of being received."),
                Some("cancel[identifier]"),
            ));
        }
        if event.canceled {
            return Err(Reply::invalid(
                format!("The meter event with identifier {identifier} has already been canceled."),
                Some("cancel[identifier]"),
            ));
        }
        event.canceled = true;
        Ok(())
    }

    /// `GET /v1/billing/meters/{id}/event_summaries`.
    pub(crate) fn summaries(&self, meter_id: &str, query: &Form) -> Reply {
        let Some(meter) = self.meters.iter().find(|m| m.id == meter_id) else {
            return Reply::not_found(format!("No such billing meter: '{meter_id}'"), Some("id"));
        };
        let Some(customer) = query.get("customer") else {
            return Reply::missing("customer");
        };
        let mut bounds = [0i64; 2];
        for (slot, name) in bounds.iter_mut().zip(["start_time", "end_time"]) {
            let Some(text) = query.get(name) else {
                return Reply::missing(name);
            };
            match text.parse::<i64>() {
                Ok(value) if value % 60 == 0 => *slot = value,
                _ => {
                    return Reply::invalid(
                        format!("{name} must be a unix timestamp aligned with minute boundaries."),
                        Some(name),
                    )
                }
            }
        }
        let [start, end] = bounds;
        if end <= start {
            return Reply::invalid("end_time must be after start_time.", Some("end_time"));
        }
        let step = match query.get("value_grouping_window") {
            None => end - start,
            Some("hour") => 3600,
            Some("day") => DAY,
            Some(other) => {
                return Reply::invalid(
                    format!("Invalid value_grouping_window: must be hour or day; got {other}."),
                    Some("value_grouping_window"),
                )
            }
        };
        if start % step != 0 && query.get("value_grouping_window").is_some() {
            return Reply::invalid(
                "start_time and end_time must be aligned with value_grouping_window boundaries.",
                Some("start_time"),
            );
        }
        let mut items = Vec::new();
        let mut bucket = start;
        while bucket < end {
            let bucket_end = (bucket + step).min(end);
            let value = self.aggregate(meter, customer, bucket, bucket_end);
            items.push(json!({
                "id": format!("mtrusg_{}_{}_{bucket}", meter.id, customer),
                "object": "billing.meter_event_summary",
                "aggregated_value": value,
                "start_time": bucket,
                "end_time": bucket_end,
                "livemode": meter.livemode,
                "meter": meter.id,
            }));
            bucket = bucket_end;
        }
        list_page(
            items,
            query,
            &format!("/v1/billing/meters/{meter_id}/event_summaries"),
        )
    }

    /// The usage a metered price bills: its meter's aggregate for `customer` over
    /// `[start, end)` (0 for a meter the emulator does not know).
    pub(crate) fn metered_usage(
        &self,
        meter_id: &str,
        customer: &str,
        start: i64,
        end: i64,
    ) -> f64 {
        self.meters
            .iter()
            .find(|m| m.id == meter_id)
            .map_or(0.0, |meter| self.aggregate(meter, customer, start, end))
    }

    fn aggregate(&self, meter: &Meter, customer: &str, start: i64, end: i64) -> f64 {
        let events = self.events.iter().filter(|e| {
            !e.canceled
                && e.event_name == meter.event_name
                && e.customer == customer
                && (start..end).contains(&e.timestamp)
        });
        match meter.formula.as_str() {
            "count" => events.count() as f64,
            // Ties on timestamp go to the event received last (the later position).
            "last" => events
                .enumerate()
                .max_by_key(|(position, e)| (e.timestamp, *position))
                .map_or(0.0, |(_, e)| e.value as f64),
            _ => events.map(|e| e.value as f64).sum(),
        }
    }

    pub(crate) fn totals(&self) -> Vec<MeterTotal> {
        let mut totals: BTreeMap<(String, String), MeterTotal> = BTreeMap::new();
        let mut latest: HashMap<(String, String), (i64, usize)> = HashMap::new();
        for (position, event) in self.events.iter().enumerate() {
            let key = (event.customer.clone(), event.event_name.clone());
            let total = totals.entry(key.clone()).or_insert_with(|| MeterTotal {
                customer: event.customer.clone(),
                event_name: event.event_name.clone(),
                events: 0,
                canceled: 0,
                sum: 0,
                last: None,
            });
            if event.canceled {
                total.canceled += 1;
                continue;
            }
            total.events += 1;
            total.sum += event.value;
            let newest = latest.entry(key).or_insert((event.timestamp, position));
            if (event.timestamp, position) >= *newest {
                *newest = (event.timestamp, position);
                total.last = Some(event.value);
            }
        }
        totals.into_values().collect()
    }
}

/// Stripe's metadata rules: at most 50 keys, keys of 1 to 40 characters without square
/// brackets, values of at most 500 characters.
fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), Reply> {
    if metadata.len() > 50 {
        return Err(Reply::invalid(
            "Invalid metadata: metadata can have up to 50 keys.",
            Some("metadata"),
        ));
    }
    for (key, value) in metadata {
        let param = format!("metadata[{key}]");
        if key.is_empty() || key.chars().count() > 40 || key.contains(['[', ']']) {
            return Err(Reply::invalid(
                format!("Invalid metadata: keys must be 1 to 40 characters without square brackets; got {key:?}."),
                Some(&param),
            ));
        }
        if value.chars().count() > 500 {
            return Err(Reply::invalid(
                format!("Invalid metadata[{key}]: values can be up to 500 characters long."),
                Some(&param),
            ));
        }
    }
    Ok(())
}

/// A customer search query: clauses joined by one kind of connective.
struct Search {
    clauses: Vec<(SearchField, String)>,
    any: bool,
}

enum SearchField {
    Metadata(String),
    Name,
    Email,
}

impl Search {
    fn parse(text: &str) -> Result<Search, String> {
        let mut clauses = Vec::new();
        let mut connectives = Vec::new();
        let mut rest = text.trim();
        loop {
            let (field, after) = if let Some(after) = rest.strip_prefix("metadata[") {
                let (key, after) = quoted(after)
                    .ok_or_else(|| format!("Invalid search query {text:?}: metadata keys are quoted, as in metadata['key']:'value'."))?;
                let after = after.strip_prefix(']').ok_or_else(|| {
                    format!("Invalid search query {text:?}: expected ] after the metadata key.")
                })?;
                (SearchField::Metadata(key), after)
            } else if let Some(after) = rest.strip_prefix("name") {
                (SearchField::Name, after)
            } else if let Some(after) = rest.strip_prefix("email") {
                (SearchField::Email, after)
            } else {
                return Err(format!("Invalid search query {text:?}: the emulator searches customers by metadata['key'], name and email."));
            };
            let after = after.strip_prefix(':').ok_or_else(|| {
                format!("Invalid search query {text:?}: only exact matches (field:'value') are supported.")
            })?;
            let (value, after) = quoted(after).ok_or_else(|| {
                format!("Invalid search query {text:?}: values are quoted, as in name:'acme'.")
            })?;
            clauses.push((field, value));
            rest = after.trim_start();
            if rest.is_empty() {
                break;
            }
            let (connective, after) = rest.split_once(char::is_whitespace).ok_or_else(|| {
                format!("Invalid search query {text:?}: expected AND or OR between clauses.")
            })?;
            if connective != "AND" && connective != "OR" {
                return Err(format!("Invalid search query {text:?}: expected AND or OR between clauses, got {connective:?}."));
            }
            connectives.push(connective);
            rest = after.trim_start();
        }
        if connectives.windows(2).any(|pair| pair[0] != pair[1]) {
            return Err(format!(
                "Invalid search query {text:?}: AND and OR cannot be combined in one query."
            ));
        }
        Ok(Search {
            clauses,
            any: connectives.first() == Some(&"OR"),
        })
    }

    fn matches(&self, customer: &Value) -> bool {
        let hit = |(field, value): &(SearchField, String)| match field {
            SearchField::Metadata(key) => customer["metadata"][key.as_str()] == value.as_str(),
            SearchField::Name => customer["name"] == value.as_str(),
            SearchField::Email => customer["email"] == value.as_str(),
        };
        if self.any {
            self.clauses.iter().any(hit)
        } else {
            self.clauses.iter().all(hit)
        }
    }
}

/// A string in single or double quotes at the start of `text` (a backslash escapes the next
/// character), and what follows it.
fn quoted(text: &str) -> Option<(String, &str)> {
    let mut chars = text.char_indices();
    let (_, quote) = chars.next().filter(|(_, c)| *c == '\'' || *c == '"')?;
    let mut value = String::new();
    let mut escaped = false;
    for (at, c) in chars {
        if escaped {
            value.push(c);
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if c == quote {
            return Some((value, &text[at + c.len_utf8()..]));
        } else {
            value.push(c);
        }
    }
    None
}

fn meter_json(meter: &Meter) -> Value {
    json!({
        "id": meter.id,
        "object": "billing.meter",
        "created": meter.created,
        "customer_mapping": { "event_payload_key": meter.customer_key, "type": "by_id" },
        "default_aggregation": { "formula": meter.formula },
        "display_name": meter.display_name,
        "event_name": meter.event_name,
        "event_time_window": null,
        "livemode": meter.livemode,
        "status": "active",
        "status_transitions": { "deactivated_at": null },
        "updated": meter.created,
        "value_settings": { "event_payload_key": meter.value_key },
    })
}

/// Stripe's list envelope with `limit` (1 to 100, default 10) and `starting_after`.
fn list_page(items: Vec<Value>, query: &Form, url: &str) -> Reply {
    let limit = match query.get("limit").map(str::parse::<usize>) {
        None => 10,
        Some(Ok(limit)) if (1..=100).contains(&limit) => limit,
        Some(_) => {
            return Reply::invalid("limit must be between 1 and 100.", Some("limit"));
        }
    };
    let start = match query.get("starting_after") {
        None => 0,
        Some(after) => match items.iter().position(|item| item["id"] == after) {
            Some(position) => position + 1,
            None => {
                return Reply::invalid(
                    format!("starting_after {after} is not an object of this list."),
                    Some("starting_after"),
                )
            }
        },
    };
    let page: Vec<Value> = items.iter().skip(start).take(limit).cloned().collect();
    let has_more = start + page.len() < items.len();
    Reply::json(
        200,
        &json!({ "object": "list", "data": page, "has_more": has_more, "url": url }),
    )
}
