//! `GET /openapi.json`: the API described in OpenAPI 3.1, written by hand next to the routes
//! (a test checks that every route is in it).

use serde_json::{json, Value};

/// The paths this document describes; the router serves exactly these (tested).
pub const PATHS: [&str; 39] = [
    "/v1/quota/check",
    "/v1/plans",
    "/v1/plans/{name}",
    "/v1/subscriptions",
    "/v1/subscriptions/{id}",
    "/v1/subscriptions/{id}/change",
    "/v1/subscriptions/{id}/cancel",
    "/v1/subscriptions/{id}/reactivate",
    "/v1/subscriptions/{id}/payment-method",
    "/v1/customers",
    "/v1/customers/{id}",
    "/v1/customers/{id}/subscriptions",
    "/v1/customers/{id}/overrides",
    "/v1/events",
    "/v1/webhooks/stripe",
    "/v1/customers/{id}/entitlements",
    "/v1/customers/{id}/usage",
    "/v1/customers/{id}/invoice-preview",
    "/v1/customers/{id}/credits",
    "/v1/customers/{id}/credits/ledger",
    "/v1/customers/{id}/credits/grants",
    "/v1/customers/{id}/credits/grants/{grant_id}/void",
    "/v1/customers/{id}/checkout",
    "/v1/customers/{id}/credits/checkout",
    "/v1/customers/{id}/billing-portal",
    "/v1/customers/{id}/invoices",
    "/v1/invoices/{id}",
    "/v1/customers/{id}/alerts",
    "/v1/customers/{id}/alerts/{rule_id}",
    "/v1/alerts/endpoints",
    "/v1/alerts/endpoints/{endpoint_id}",
    "/v1/alerts/endpoints/{endpoint_id}/rotate-secret",
    "/v1/alerts/deliveries",
    "/v1/customers/{id}/portal-sessions",
    "/v1/portal-sessions/{id}",
    "/healthz",
    "/readyz",
    "/metrics",
    "/openapi.json",
];

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn json_response(description: &str, schema: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } })
}

fn customer_parameter() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string" }, "description": "The customer id events carry" })
}

fn subscription_parameter() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "integer" }, "description": "The subscription id" })
}

/// A JSON body with these properties and a required `reason` (written to the audit trail).
fn reason_body(mut properties: Value, required: &[&str]) -> Value {
    properties["reason"] = json!({ "type": "string", "description": "Why; written to the audit trail with the token's name" });
    let mut required: Vec<&str> = required.to_vec();
    required.push("reason");
    json!({ "required": true, "content": { "application/json": { "schema": {
        "type": "object", "required": required, "properties": properties } } } })
}

/// What a change to one subscription may answer.
fn subscription_change_responses() -> Value {
    with_gate(json!({
        "200": json_response("The subscription after the change (unchanged when there was nothing to change)", "Subscription"),
        "400": error_response("INVALID_REQUEST (the id, `at`) or REASON_REQUIRED"),
        "404": error_response("NO_SUCH_SUBSCRIPTION, or UNKNOWN_PLAN"),
        "409": error_response("STRIPE_MANAGED (change it in Stripe), SUBSCRIPTION_ENDED, NOTHING_TO_REACTIVATE, NO_NEXT_PERIOD (a fixed term), or OVERRIDE_CONFLICT (the customer's override does not fit the new plan)"),
        "503": error_response("STORE_UNAVAILABLE or OVERLOADED") }))
}

/// The answers every route behind a token may give besides its own: the gate's and the edge's.
fn with_gate(responses: Value) -> Value {
    let gate = [
        ("401", "UNAUTHORIZED: no token, or an unknown one"),
        ("403", "FORBIDDEN: the token's scope may not call this route, or a customer token names another customer"),
        ("413", "PAYLOAD_TOO_LARGE: the body (or its Content-Length) is larger than this route accepts; refused before it is read"),
        ("429", "RATE_LIMITED: this token's requests per second are used up; retry after `Retry-After` seconds"),
    ];
    with_edge(with_errors(responses, &gate))
}

/// The answers any route may give under load or on a bug.
fn with_edge(responses: Value) -> Value {
    let edge = [
        ("408", "REQUEST_TIMEOUT: the request (its body included) took longer than serve.limits.request_timeout"),
        ("500", "INTERNAL: a bug; report the request id"),
        ("503", "OVERLOADED: too many requests or connections at once; retry after `Retry-After` seconds"),
    ];
    with_errors(responses, &edge)
}

/// Adds an error response for each status the route does not describe itself.
fn with_errors(mut responses: Value, errors: &[(&str, &str)]) -> Value {
    for (status, description) in errors {
        let entry = &mut responses[*status];
        if entry.is_null() {
            *entry = error_response(description);
        }
    }
    responses
}

/// Every error `code` the API answers with.
pub const ERROR_CODES: [&str; 68] = [
    "TOO_MANY_ALERT_RULES",
    "INVALID_EXPIRY",
    "NO_SUCH_SESSION",
    "UNAUTHORIZED",
    "FORBIDDEN",
    "RATE_LIMITED",
    "PAYLOAD_TOO_LARGE",
    "REQUEST_TIMEOUT",
    "OVERLOADED",
    "NOT_FOUND",
    "METHOD_NOT_ALLOWED",
    "INTERNAL",
    "INVALID_REQUEST",
    "INVALID_QUANTITY",
    "UNKNOWN_METER",
    "UNSUPPORTED",
    "NO_ACTIVE_SUBSCRIPTION",
    "FEATURE_DISABLED",
    "STORE_UNAVAILABLE",
    "RESULT_TOO_LARGE",
    "QUERY_TOO_EXPENSIVE",
    "USAGE_OUT_OF_RANGE",
    "NO_METRICS",
    "INGEST_DISABLED",
    "WEBHOOKS_DISABLED",
    "MISSING_SIGNATURE",
    "BAD_SIGNATURE",
    "STALE_SIGNATURE",
    "MALFORMED_EVENT",
    "WRONG_MODE",
    "UNMAPPED_STRIPE_CUSTOMER",
    "AMBIGUOUS_STRIPE_CUSTOMER",
    "UNKNOWN_STRIPE_PRICE",
    "AMBIGUOUS_PLAN",
    "SECOND_LIVE_SUBSCRIPTION",
    "UNKNOWN_PLAN",
    "NO_SUCH_SUBSCRIPTION",
    "STRIPE_MANAGED",
    "SUBSCRIPTION_ENDED",
    "NOTHING_TO_REACTIVATE",
    "NO_NEXT_PERIOD",
    "INVALID_SUBSCRIPTION",
    "REASON_REQUIRED",
    "INVALID_OVERRIDE",
    "NO_OVERRIDE",
    "OVERRIDE_CONFLICT",
    "NO_SUCH_CUSTOMER",
    "INSUFFICIENT_CREDITS",
    "INVALID_GRANT",
    "IDEMPOTENCY_CONFLICT",
    "NO_SUCH_GRANT",
    "GRANT_CLOSED",
    "CREDITS_OUT_OF_RANGE",
    "INVALID_ALERT",
    "NO_SUCH_ALERT_RULE",
    "NO_SUCH_ENDPOINT",
    "TOO_MANY_ENDPOINTS",
    "PLAN_NOT_FOR_SALE",
    "UNKNOWN_PACK",
    "PACK_NOT_FOR_SALE",
    "NO_STRIPE_CUSTOMER",
    "INVALID_RETURN_URL",
    "STRIPE_REFUSED",
    "STRIPE_UNAVAILABLE",
    "STRIPE_NOT_CONFIGURED",
    "NOT_SELF_SERVE",
    "NO_SUCH_INVOICE",
    "CREDITS_NOT_APPLIED",
];

pub fn document() -> Value {
    let decimal = json!({ "type": "string", "description": "An exact decimal, e.g. \"12.5\"" });
    let nullable_decimal = json!({ "type": ["string", "null"], "description": "An exact decimal, or null when unlimited" });
    let time = json!({ "type": "string", "format": "date-time" });
    let nullable_time = json!({ "type": ["string", "null"], "format": "date-time" });
    let mut document = json!({
        "openapi": "3.1.0",
        "info": { "title": "tally", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Usage metering: quota checks, entitlements, usage, event ingest, Stripe webhooks, and the admin API for plans, subscriptions, overrides, customers, prepaid credits and usage alerts (delivered as signed webhooks: see `webhooks.alert` and POST /v1/alerts/endpoints). Errors are JSON with a stable `code`, a message for the client and the `request_id` (also in the `x-request-id` header) under which the server logged what happened." },
        "security": [{ "bearer": [] }],
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer",
                "description": "A token from `tally tokens create`, of scope admin (everything), ingest (POST /v1/events), check (quota checks, entitlements and credit balances for any customer) or customer (one customer's own reads; its checks count nothing)" } },
            "schemas": {
                "Error": { "type": "object", "required": ["code", "message", "request_id"], "properties": {
                    "code": { "type": "string", "enum": ERROR_CODES.as_slice() },
                    "message": { "type": "string" },
                    "request_id": { "type": "string" } } },
                "LimitExceeded": { "type": "object", "required": ["code", "metric", "limit", "current"], "properties": {
                    "code": { "const": "LIMIT_EXCEEDED" }, "metric": { "type": "string" }, "limit": decimal,
                    "current": decimal, "resets_at": nullable_time, "upgrade_hint": { "type": "boolean" } } },
                "CheckRequest": { "type": "object", "required": ["customer", "meter"], "properties": {
                    "customer": { "type": "string" }, "meter": { "type": "string" },
                    "quantity": { "description": "Decimal number or string, 0 or more; default 1" },
                    "feature": { "type": "string", "description": "Also require this feature" },
                    "dimensions": { "type": "object", "additionalProperties": { "type": "string" }, "description": "The usage's dimensions (e.g. {\"model\": \"large\"}), for a meter under `credits` enforcement priced per group-by value" } } },
                "CheckAnswer": { "type": "object", "required": ["decision", "metric", "current"], "properties": {
                    "decision": { "enum": ["allow", "warn"] }, "metric": { "type": "string" },
                    "current": decimal, "limit": nullable_decimal, "remaining": nullable_decimal,
                    "resets_at": nullable_time, "enforcement": { "enum": ["soft", "grace"] },
                    "credits_remaining": { "type": ["string", "null"], "description": "An exact decimal: for a meter under `credits` enforcement, the projected credit balance left after this quantity; null otherwise" } } },
                "IngestAnswer": { "type": "object", "required": ["accepted", "rejected", "unavailable", "results"], "properties": {
                    "accepted": { "type": "integer" }, "rejected": { "type": "integer" }, "unavailable": { "type": "integer" },
                    "results": { "type": "array", "items": { "type": "object", "required": ["index", "status"], "properties": {
                        "index": { "type": "integer" }, "id": { "type": "string" },
                        "status": { "enum": ["accepted", "rejected", "unavailable"] },
                        "durability": { "enum": ["published", "spooled"] },
                        "code": { "type": "string" }, "message": { "type": "string" } } } } } },
                "WebhookAnswer": { "type": "object", "required": ["received", "event", "outcome"], "properties": {
                    "received": { "const": true }, "event": { "type": "string" },
                    "outcome": { "enum": ["applied", "stale", "ignored", "replay", "recorded", "not_tallys", "refused"] } } },
                "Entitlements": { "type": "object", "required": ["customer", "plan", "status", "features", "limits"], "properties": {
                    "customer": { "type": "string" }, "plan": { "type": "string" }, "status": { "type": "string" },
                    "current_period_start": time, "current_period_end": time,
                    "cancel_at_period_end": { "type": "boolean" },
                    "features": { "type": "object", "additionalProperties": { "type": "boolean" } },
                    "limits": { "type": "object", "additionalProperties": { "type": "object" } } } },
                "Usage": { "type": "object", "required": ["customer", "meter", "aggregation", "granularity", "from", "to", "series"], "properties": {
                    "customer": { "type": "string" }, "meter": { "type": "string" }, "aggregation": { "type": "string" },
                    "granularity": { "enum": ["minute", "hour", "day"] }, "from": time, "to": time,
                    "series": { "type": "array", "items": { "type": "object", "required": ["group_key", "points"], "properties": {
                        "group_key": { "type": "string" },
                        "points": { "type": "array", "items": { "type": "object", "required": ["start", "value"], "properties": {
                            "start": time, "value": decimal } } } } } } } },
                "InvoicePreview": { "type": "object", "required": ["customer", "plan", "period_start", "period_end", "lines", "total", "credits"], "properties": {
                    "customer": { "type": "string" }, "plan": { "type": "string" }, "period_start": time, "period_end": time,
                    "lines": { "type": "array", "items": { "type": "object", "required": ["meter", "quantity", "credited_quantity", "unit_price", "amount"], "properties": {
                        "meter": { "type": "string" }, "quantity": decimal,
                        "credited_quantity": { "type": "string", "description": "An exact decimal: the part of `quantity` prepaid credits paid for (drawn from grants), not billed" },
                        "unit_price": decimal,
                        "amount": { "type": "string", "description": "An exact decimal: (quantity - credited_quantity) × unit_price" } } } },
                    "total": decimal,
                    "credits": { "type": "object", "required": ["applied", "uncovered", "balance"], "properties": {
                        "applied": { "type": "string", "description": "An exact decimal: credits drawn from grants for usage in the period" },
                        "uncovered": { "type": "string", "description": "An exact decimal: credits of usage in the period no grant covered" },
                        "balance": { "type": "string", "description": "An exact decimal: the projected balance now (open grants less usage not yet burned)" } } } } },
                "Readiness": { "type": "object", "required": ["ready", "dependencies"], "properties": {
                    "ready": { "type": "boolean" },
                    "dependencies": { "type": "array", "items": { "type": "object", "required": ["name", "up"], "properties": {
                        "name": { "type": "string" }, "up": { "type": "boolean" },
                        "down_seconds": { "type": ["number", "null"] }, "error": { "type": ["string", "null"] } } } } } }
            }
        },
        "paths": {
            "/v1/quota/check": { "post": {
                "summary": "May the customer use `quantity` more of `meter`? Tokens: admin, check, customer (own customer; counts nothing)",
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CheckRequest" } } } },
                "responses": with_gate(json!({
                    "200": json_response("Allowed (or allowed with a warning)", "CheckAnswer"),
                    "429": { "description": "LIMIT_EXCEEDED (the customer's quota; LimitExceeded body), or RATE_LIMITED (this token's request rate; Error body, Retry-After)",
                             "content": { "application/json": { "schema": { "oneOf": [{ "$ref": "#/components/schemas/LimitExceeded" }, { "$ref": "#/components/schemas/Error" }] } } } },
                    "400": error_response("INVALID_REQUEST, UNKNOWN_METER, UNSUPPORTED, or INVALID_QUANTITY (not a decimal, negative, or usage plus quantity beyond a 28-digit decimal)"),
                    "402": { "description": "INSUFFICIENT_CREDITS: the meter has `credits` enforcement and the customer's projected credit balance cannot cover the quantity at the meter's rate; grant credits (POST /v1/customers/{id}/credits/grants). 402, not 429: retrying does not help until credits are added",
                             "content": { "application/json": { "schema": { "oneOf": [{ "$ref": "#/components/schemas/InsufficientCredits" }, { "$ref": "#/components/schemas/Error" }] } } } },
                    "403": error_response("FEATURE_DISABLED, or FORBIDDEN (scope, or another customer's token)"),
                    "404": error_response("NO_ACTIVE_SUBSCRIPTION"),
                    "409": error_response("OVERRIDE_CONFLICT: the customer's override does not fit its plan (the plan changed under it); an operator changes the override"),
                    "503": error_response("STORE_UNAVAILABLE (Postgres unavailable; retry) or OVERLOADED") })) } },
            "/v1/events": { "post": {
                "summary": "Report usage: up to 1,000 events (native or CloudEvents 1.0), each answered on its own. Tokens: admin, ingest",
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "required": ["events"], "properties": { "events": { "type": "array", "maxItems": 1000, "items": { "type": "object" } } } } } } },
                "responses": with_gate(json!({
                    "200": json_response("Every event accepted (durable: acknowledged by Kafka or fsynced in the spool)", "IngestAnswer"),
                    "207": json_response("Some events rejected (stored in rejected_events, with the event-contract code) or unavailable (EMITTER_OVERLOADED, SPOOL_FAILED, DURABILITY_TIMEOUT or SHUTTING_DOWN: retry with the same id); see `results`", "IngestAnswer"),
                    "400": error_response("INVALID_REQUEST (not a batch, or more than 1,000 events)"),
                    "503": error_response("INGEST_DISABLED or STORE_UNAVAILABLE: nothing was emitted; or OVERLOADED") })) } },
            "/v1/webhooks/stripe": { "post": {
                "summary": "Stripe's signed events (Stripe-Signature); subscriptions and invoices. No token: the signature is the proof",
                "security": [],
                "parameters": [{ "name": "Stripe-Signature", "in": "header", "required": true, "schema": { "type": "string" } }],
                "responses": with_edge(json!({
                    "200": json_response("Handled: outcome applied, stale, ignored, replay or recorded", "WebhookAnswer"),
                    "400": error_response("MISSING_SIGNATURE, BAD_SIGNATURE, STALE_SIGNATURE, MALFORMED_EVENT, or WRONG_MODE (a live event at a test deployment or the reverse)"),
                    "413": error_response("PAYLOAD_TOO_LARGE"),
                    "422": error_response("Not applicable yet (UNMAPPED_STRIPE_CUSTOMER, UNKNOWN_STRIPE_PRICE, ...): nothing stored, Stripe retries"),
                    "503": error_response("WEBHOOKS_DISABLED, Postgres unavailable, or OVERLOADED") })) } },
            "/v1/customers/{id}/entitlements": { "get": {
                "summary": "The customer's plan, subscription, features and limits (overrides merged in); with `preview=PLAN`, what they would get on that plan. Tokens: admin, check, customer (own)",
                "parameters": [customer_parameter(),
                    { "name": "preview", "in": "query", "schema": { "type": "string" }, "description": "A plan: its entitlements with the customer's override merged in" }],
                "responses": with_gate(json!({
                    "200": { "description": "Entitlements, or with `preview`, what the customer would get on that plan",
                             "content": { "application/json": { "schema": { "oneOf": [{ "$ref": "#/components/schemas/Entitlements" }, { "$ref": "#/components/schemas/EntitlementsPreview" }] } } } },
                    "404": error_response("NO_ACTIVE_SUBSCRIPTION, or UNKNOWN_PLAN (preview)"),
                    "409": error_response("OVERRIDE_CONFLICT: the customer's override does not fit its plan, or the previewed plan"),
                    "503": error_response("STORE_UNAVAILABLE (Postgres unavailable) or OVERLOADED") })) } },
            "/v1/customers/{id}/usage": { "get": {
                "summary": "Usage of one meter in minute, hour or day buckets (at most 10,000 buckets × group keys). Tokens: admin, customer (own)",
                "parameters": [customer_parameter(),
                    { "name": "meter", "in": "query", "required": true, "schema": { "type": "string" } },
                    { "name": "from", "in": "query", "required": true, "schema": { "type": "string", "format": "date-time" } },
                    { "name": "to", "in": "query", "required": true, "schema": { "type": "string", "format": "date-time" } },
                    { "name": "granularity", "in": "query", "schema": { "enum": ["minute", "hour", "day"], "default": "hour" } },
                    { "name": "group_by", "in": "query", "schema": { "type": "boolean", "default": false } }],
                "responses": with_gate(json!({
                    "200": json_response("Series of buckets per group key", "Usage"),
                    "400": error_response("INVALID_REQUEST, UNKNOWN_METER, or RESULT_TOO_LARGE (more than 10,000 points)"),
                    "422": error_response("USAGE_OUT_OF_RANGE: stored usage beyond a 28-digit decimal"),
                    "503": error_response("STORE_UNAVAILABLE, QUERY_TOO_EXPENSIVE (cut by the server's statement timeout) or OVERLOADED") })) } },
            "/v1/customers/{id}/invoice-preview": { "get": {
                "summary": "Usage in the current billing period × the plan's unit prices, less the usage prepaid credits paid for; with the credits applied in the period and the balance. Tokens: admin, customer (own)",
                "parameters": [customer_parameter()],
                "responses": with_gate(json!({
                    "200": json_response("Lines and total", "InvoicePreview"),
                    "404": error_response("NO_ACTIVE_SUBSCRIPTION"),
                    "409": error_response("OVERRIDE_CONFLICT: the customer's override does not fit its plan"),
                    "422": error_response("USAGE_OUT_OF_RANGE (usage × price beyond a 28-digit decimal) or CREDITS_OUT_OF_RANGE (credits beyond one)"),
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
            "/healthz": { "get": { "summary": "The process is up", "security": [],
                "responses": with_edge(json!({ "200": { "description": "ok", "content": { "text/plain": { "schema": { "const": "ok" } } } } })) } },
            "/readyz": { "get": { "summary": "Postgres answers and every dependency of this process is reachable. Admin token (or the admin listener, serve.admin_listen, without one)",
                "responses": with_gate(json!({
                    "200": json_response("Ready", "Readiness"),
                    "503": json_response("Not ready: the same body, naming the dependency that is away (or OVERLOADED: Error)", "Readiness") })) } },
            "/metrics": { "get": { "summary": "Prometheus metrics. Admin token (or the admin listener, serve.admin_listen, without one)",
                "responses": with_gate(json!({
                    "200": { "description": "Prometheus text exposition format", "content": { "text/plain": { "schema": { "type": "string" } } } },
                    "404": error_response("NO_METRICS: this process has no metrics recorder") })) } },
            "/openapi.json": { "get": { "summary": "This document", "security": [],
                "responses": with_edge(json!({ "200": { "description": "OpenAPI 3.1", "content": { "application/json": { "schema": { "type": "object" } } } } })) } }
        }
    });
    for (section, entries) in [
        ("/components/schemas", admin_schemas()),
        ("/components/schemas", credit_schemas()),
        ("/paths", admin_paths()),
        ("/paths", credit_paths()),
        ("/components/schemas", alert_schemas()),
        ("/paths", alert_paths()),
        ("/components/schemas", billing_schemas()),
        ("/paths", billing_paths()),
    ] {
        if let (Some(section), Value::Object(entries)) = (document.pointer_mut(section), entries) {
            if let Some(section) = section.as_object_mut() {
                section.extend(entries);
            }
        }
    }
    document["webhooks"] = alert_webhooks();
    document
}

/// The admin API's schemas: plans, subscriptions, customers, overrides.
fn admin_schemas() -> Value {
    let decimal = json!({ "type": "string", "description": "An exact decimal, e.g. \"12.5\"" });
    let nullable_decimal = json!({ "type": ["string", "null"], "description": "An exact decimal, or null when unlimited" });
    let time = json!({ "type": "string", "format": "date-time" });
    let nullable_time = json!({ "type": ["string", "null"], "format": "date-time" });
    json!({
                "Plan": { "type": "object", "required": ["name"], "description": "A [[plans]] entry of tally.toml as `tally plans apply` stored it", "properties": {
                    "name": { "type": "string" }, "features": { "type": "object", "additionalProperties": { "type": "boolean" } },
                    "limits": { "type": "object", "additionalProperties": { "type": "object" } },
                    "stripe_prices": { "type": "array", "items": { "type": "string" } },
                    "price": { "type": "object", "properties": { "amount": decimal, "currency": { "type": "string" }, "interval": { "enum": ["month", "year"] } } },
                    "requires_payment_method": { "type": "boolean" } } },
                "Subscription": { "type": "object", "required": ["id", "customer", "plan", "status", "source", "billing_interval", "current_period_start", "current_period_end"], "properties": {
                    "id": { "type": "integer" }, "customer": { "type": "string" }, "plan": { "type": "string" },
                    "status": { "enum": ["trialing", "active", "past_due", "canceled"] },
                    "source": { "enum": ["tally", "stripe", "fallback"], "description": "stripe: changed only in Stripe; fallback: put there by the scheduler after a cancellation" },
                    "billing_interval": { "enum": ["month", "year", "fixed"] }, "billing_anchor": time, "started_at": time,
                    "trial_end": nullable_time, "current_period_start": time, "current_period_end": time,
                    "cancel_at_period_end": { "type": "boolean" }, "pending_plan": { "type": ["string", "null"] },
                    "payment_method": { "type": "boolean" }, "ended_at": nullable_time, "status_since": time,
                    "stripe_subscription_id": { "type": ["string", "null"] }, "stripe_status": { "type": ["string", "null"] },
                    "created_at": time, "updated_at": time } },
                "CustomerSubscriptions": { "type": "object", "required": ["customer", "subscriptions"], "properties": {
                    "customer": { "type": "string" },
                    "subscriptions": { "type": "array", "items": { "allOf": [{ "$ref": "#/components/schemas/Subscription" }, { "type": "object", "properties": {
                        "history": { "type": "array", "items": { "type": "object", "required": ["plan", "status", "from"], "properties": {
                            "plan": { "type": "string" }, "status": { "type": "string" }, "from": time, "to": nullable_time } } } } }] } } } },
                "CustomerPage": { "type": "object", "required": ["customers"], "properties": {
                    "customers": { "type": "array", "items": { "type": "object", "required": ["customer", "subscription_id", "plan", "status"], "properties": {
                        "customer": { "type": "string" }, "subscription_id": { "type": "integer" }, "plan": { "type": "string" },
                        "status": { "type": "string" }, "source": { "type": "string" }, "current_period_end": time,
                        "cancel_at_period_end": { "type": "boolean" } } } },
                    "next": { "type": ["string", "null"], "description": "Pass as `after` for the next page; null on the last" } } },
                "Customer": { "type": "object", "required": ["customer", "subscription"], "properties": {
                    "customer": { "type": "string" }, "subscription": { "$ref": "#/components/schemas/Subscription" },
                    "override": { "type": ["object", "null"] },
                    "entitlements": { "type": ["object", "null"], "description": "null when the subscription has ended" },
                    "usage": { "type": "array", "items": { "type": "object", "required": ["meter", "used"], "properties": {
                        "meter": { "type": "string" }, "used": decimal, "limit": nullable_decimal, "remaining": nullable_decimal,
                        "period": { "type": "string" }, "enforcement": { "type": "string" }, "resets_at": nullable_time } } },
                    "invoice_preview": { "oneOf": [{ "$ref": "#/components/schemas/InvoicePreview" }, { "type": "null" }] } } },
                "EntitlementsPreview": { "type": "object", "required": ["customer", "plan", "preview", "features", "limits"], "properties": {
                    "customer": { "type": "string" }, "plan": { "type": "string" }, "preview": { "const": true },
                    "features": { "type": "object", "additionalProperties": { "type": "boolean" } },
                    "limits": { "type": "object", "additionalProperties": { "type": "object" } } } },
                "Override": { "type": "object", "required": ["customer", "overrides", "reason", "set_by"], "properties": {
                    "customer": { "type": "string" }, "overrides": { "type": "object" }, "reason": { "type": "string" }, "set_by": { "type": "string" } } }
    })
}

/// The admin API's paths (`admin.rs`): every change audited with the token's name and a reason.
fn admin_paths() -> Value {
    let decimal = json!({ "type": "string", "description": "An exact decimal, e.g. \"12.5\"" });
    let time = json!({ "type": "string", "format": "date-time" });
    json!({
            "/v1/plans": { "get": {
                "summary": "The plans, as `tally plans apply` last wrote them from tally.toml (the one way to change them). Tokens: admin, check, customer",
                "responses": with_gate(json!({
                    "200": { "description": "Every plan", "content": { "application/json": { "schema": { "type": "object", "required": ["plans"], "properties": {
                        "plans": { "type": "array", "items": { "$ref": "#/components/schemas/Plan" } } } } } } },
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
            "/v1/plans/{name}": { "get": {
                "summary": "One plan. Tokens: admin, check, customer",
                "parameters": [{ "name": "name", "in": "path", "required": true, "schema": { "type": "string" } }],
                "responses": with_gate(json!({
                    "200": json_response("The plan", "Plan"),
                    "404": error_response("UNKNOWN_PLAN"),
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
            "/v1/subscriptions": { "post": {
                "summary": "Start a subscription tally manages (no payment provider). Replaces a fallback subscription; refuses a second live one. Audited with the token's name and `reason`. Admin token",
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "type": "object", "required": ["customer", "plan", "reason"], "properties": {
                    "customer": { "type": "string" }, "plan": { "type": "string" },
                    "start": { "type": "string", "format": "date-time", "description": "Default now; may be up to 366 days in the past (finance's figures for those days then count it, restating their MRR), not in the future" },
                    "trial_end": { "type": "string", "format": "date-time", "description": "Trialing until then; paid periods start at the trial's end" },
                    "billing_period": { "description": "\"month\" (default), \"year\", or {\"end\": time}: one fixed term that ends the subscription",
                        "oneOf": [{ "enum": ["month", "year"] }, { "type": "object", "required": ["end"], "properties": { "end": time } }] },
                    "payment_method": { "type": "boolean", "description": "A payment method is on record (plans with requires_payment_method need one for a trial to convert)" },
                    "reason": { "type": "string" } } } } } },
                "responses": with_gate(json!({
                    "201": json_response("Created", "Subscription"),
                    "400": error_response("INVALID_REQUEST, INVALID_SUBSCRIPTION (dates, customer id) or REASON_REQUIRED"),
                    "404": error_response("UNKNOWN_PLAN"),
                    "409": error_response("SECOND_LIVE_SUBSCRIPTION (cancel the customer's live subscription first) or OVERRIDE_CONFLICT (the customer's override does not fit the plan: change the override first)"),
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
            "/v1/subscriptions/{id}": { "get": {
                "summary": "One subscription (tally- or Stripe-managed). Admin token",
                "parameters": [subscription_parameter()],
                "responses": with_gate(json!({
                    "200": json_response("The subscription", "Subscription"),
                    "400": error_response("INVALID_REQUEST: the id is not a whole number"),
                    "404": error_response("NO_SUCH_SUBSCRIPTION"),
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
            "/v1/subscriptions/{id}/change": { "post": {
                "summary": "Move to another plan now (default) or at the period's end (the same plan at period end withdraws a scheduled change). Admin token",
                "parameters": [subscription_parameter()],
                "requestBody": reason_body(json!({ "plan": { "type": "string" }, "at": { "enum": ["now", "period_end"], "default": "now" } }), &["plan"]),
                "responses": subscription_change_responses() } },
            "/v1/subscriptions/{id}/cancel": { "post": {
                "summary": "Cancel at the period's end (default) or now (the customer then moves to [subscriptions] fallback_plan, when set). Admin token",
                "parameters": [subscription_parameter()],
                "requestBody": reason_body(json!({ "at": { "enum": ["now", "period_end"], "default": "period_end" } }), &[]),
                "responses": subscription_change_responses() } },
            "/v1/subscriptions/{id}/reactivate": { "post": {
                "summary": "Withdraw a cancellation scheduled for the period's end. Admin token",
                "parameters": [subscription_parameter()],
                "requestBody": reason_body(json!({}), &[]),
                "responses": subscription_change_responses() } },
            "/v1/subscriptions/{id}/payment-method": { "put": {
                "summary": "Whether a payment method is on record (tally takes no payments; a trial on a plan with requires_payment_method converts only with one). Admin token",
                "parameters": [subscription_parameter()],
                "requestBody": reason_body(json!({ "on_record": { "type": "boolean" } }), &["on_record"]),
                "responses": subscription_change_responses() } },
            "/v1/customers": { "get": {
                "summary": "Customers with a subscription, by id, with their live (else latest) subscription; filtered by its plan and status; paged. Admin token",
                "parameters": [
                    { "name": "plan", "in": "query", "schema": { "type": "string" } },
                    { "name": "status", "in": "query", "schema": { "enum": ["trialing", "active", "past_due", "canceled"] } },
                    { "name": "after", "in": "query", "schema": { "type": "string" }, "description": "The previous page's `next`" },
                    { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 500, "default": 100 } }],
                "responses": with_gate(json!({
                    "200": json_response("A page of customers", "CustomerPage"),
                    "400": error_response("INVALID_REQUEST (status, limit)"),
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
            "/v1/customers/{id}": { "get": {
                "summary": "One customer: the live (else latest) subscription, the override, entitlements, usage against each limit and the invoice preview. Tokens: admin, customer (own)",
                "parameters": [customer_parameter()],
                "responses": with_gate(json!({
                    "200": json_response("The customer", "Customer"),
                    "404": error_response("NO_SUCH_CUSTOMER: no subscription was ever recorded"),
                    "422": error_response("USAGE_OUT_OF_RANGE or CREDITS_OUT_OF_RANGE (the invoice preview)"),
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
            "/v1/customers/{id}/subscriptions": { "get": {
                "summary": "Every subscription the customer had, newest first, each with its plan and status history. Tokens: admin, customer (own)",
                "parameters": [customer_parameter()],
                "responses": with_gate(json!({
                    "200": json_response("Subscriptions with history", "CustomerSubscriptions"),
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
            "/v1/customers/{id}/overrides": {
                "put": {
                    "summary": "Replace the customer's override (deep-merged over the plan; the override wins). Its limits must name known meters and fit the customer's plan. Audited. Admin token",
                    "parameters": [customer_parameter()],
                    "requestBody": reason_body(json!({ "overrides": { "type": "object", "properties": {
                        "features": { "type": "object", "additionalProperties": { "type": "boolean" } },
                        "limits": { "type": "object", "additionalProperties": { "type": "object", "properties": {
                            "limit": decimal, "period": { "enum": ["day", "month", "billing_period"] },
                            "enforcement": { "enum": ["hard", "soft", "grace", "credits"] }, "grace_percent": decimal, "unit_price": decimal } } } } } }), &["overrides"]),
                    "responses": with_gate(json!({
                        "200": json_response("The override as stored", "Override"),
                        "400": error_response("INVALID_REQUEST, INVALID_OVERRIDE (unknown meter, does not fit the plan) or REASON_REQUIRED"),
                        "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) },
                "delete": {
                    "summary": "Remove the customer's override. Audited (`reason` in the query). Admin token",
                    "parameters": [customer_parameter(), { "name": "reason", "in": "query", "required": true, "schema": { "type": "string" } }],
                    "responses": with_gate(json!({
                        "204": { "description": "Removed" },
                        "400": error_response("REASON_REQUIRED"),
                        "404": error_response("NO_OVERRIDE"),
                        "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } }
    })
}

/// Prepaid credits' schemas: a grant, a balance, a page of the ledger.
fn credit_schemas() -> Value {
    let decimal = json!({ "type": "string", "description": "An exact decimal, e.g. \"12.5\"" });
    let time = json!({ "type": "string", "format": "date-time" });
    let nullable_time = json!({ "type": ["string", "null"], "format": "date-time" });
    json!({
        "InsufficientCredits": { "type": "object", "required": ["code", "message", "metric", "balance", "required"], "properties": {
            "code": { "const": "INSUFFICIENT_CREDITS" }, "message": { "type": "string" }, "metric": { "type": "string" },
            "balance": { "type": "string", "description": "An exact decimal: the projected credit balance left" },
            "required": { "type": "string", "description": "An exact decimal: the credits the quantity costs at the meter's rate" } } },
        "CreditGrant": { "type": "object", "required": ["grant_id", "customer", "kind", "amount", "remaining", "priority", "effective_at", "created_at"],
            "description": "`idempotency_key`, `granted_by` and `reason` are the operators': answered to admin tokens only (a customer's or a gateway's token does not see them)", "properties": {
            "grant_id": { "type": "integer" }, "customer": { "type": "string" },
            "kind": { "enum": ["purchased", "subscription", "promotional"] },
            "amount": decimal, "remaining": decimal,
            "priority": { "type": "integer", "description": "Lower draws first (the kind's default when none was given: purchased 10, subscription 20, promotional 30)" },
            "effective_at": time, "expires_at": nullable_time, "idempotency_key": { "type": "string" },
            "subscription_id": { "type": ["integer", "null"], "description": "For a plan's period grant: its subscription" },
            "description": { "type": ["string", "null"] },
            "granted_by": { "type": "string", "description": "`token:<name>`, a CLI user, or `burner` for plan grants" },
            "reason": { "type": "string" }, "created_at": time,
            "closed_as": { "enum": ["expired", "voided", null] }, "closed_at": nullable_time } },
        "CreditBalance": { "type": "object", "required": ["customer", "available", "pending", "projected", "uncovered", "grants"], "properties": {
            "customer": { "type": "string" },
            "available": { "type": "string", "description": "An exact decimal: what open grants in effect now hold" },
            "pending": { "type": "string", "description": "An exact decimal: committed usage not yet burned, at the rate card (drawn within about a second)" },
            "projected": { "type": "string", "description": "An exact decimal: available - pending, what a quota check counts on" },
            "uncovered": { "type": "string", "description": "An exact decimal: usage no grant covered, since the first grant" },
            "grants": { "type": "array", "description": "Open grants, in the order they are drawn", "items": { "$ref": "#/components/schemas/CreditGrant" } } } },
        "CreditLedger": { "type": "object", "required": ["customer", "entries"], "properties": {
            "customer": { "type": "string" },
            "entries": { "type": "array", "items": { "type": "object", "required": ["transaction_id", "kind", "amount", "at"],
                "description": "`actor` and `reason` are the operators': answered to admin tokens only", "properties": {
                "transaction_id": { "type": "integer" }, "grant_id": { "type": ["integer", "null"], "description": "null for a consume no grant covered" },
                "kind": { "enum": ["grant", "consume", "expire", "void"] },
                "amount": { "type": "string", "description": "An exact decimal, signed: positive for a grant, negative for the rest" },
                "meter": { "type": ["string", "null"] }, "group_key": { "type": ["string", "null"] },
                "window_start": nullable_time,
                "quantity": { "type": ["string", "null"], "description": "For a consume: the usage of the window this entry paid for" },
                "credits_per_unit": { "type": ["string", "null"] },
                "actor": { "type": "string" }, "reason": { "type": ["string", "null"] }, "at": time } } },
            "next_after": { "type": ["integer", "null"], "description": "Oldest first (the default): the last entry's id: pass as `after` for the next page (the ledger only grows, so poll with it); null when this page is empty" },
            "next_before": { "type": ["integer", "null"], "description": "With order=newest: the last (oldest) entry's id: pass as `before` for the next page; null when this page is empty" } } }
    })
}

/// Prepaid credits' paths (`admin/credits.rs`): grants and voids written to the credit ledger
/// with the token's name and a reason.
fn credit_paths() -> Value {
    let decimal_or_number = json!({ "type": ["string", "number"], "description": "An exact decimal as a string (\"12.5\") or a plain JSON number (100); more than 0, at most 10^18, at most 9 decimal places" });
    let time = json!({ "type": "string", "format": "date-time" });
    let grant_parameter = json!({ "name": "grant_id", "in": "path", "required": true, "schema": { "type": "integer" } });
    json!({
        "/v1/customers/{id}/credits/grants": { "post": {
            "summary": "Grant credits, once per idempotency key: the same key with the same grant answers the first grant (200); with a different grant, 409. Written to the credit ledger with the token's name and `reason`. Admin token",
            "parameters": [customer_parameter(),
                { "name": "Idempotency-Key", "in": "header", "schema": { "type": "string" }, "description": "Instead of `idempotency_key` in the body; when both are given they must be equal" }],
            "requestBody": reason_body(json!({
                "kind": { "enum": ["purchased", "subscription", "promotional"], "description": "purchased: never expires unless given expires_at, drawn first; subscription: drawn second; promotional: drawn last. subscription and promotional need expires_at" },
                "amount": decimal_or_number,
                "priority": { "type": "integer", "minimum": 0, "maximum": 1000, "description": "Lower draws first; default by kind (10, 20, 30)" },
                "effective_at": { "type": "string", "format": "date-time", "description": "From when usage draws from it; default now" },
                "expires_at": time,
                "idempotency_key": { "type": "string", "description": "1 to 200 printable characters; or the Idempotency-Key header. Required (one or the other)" },
                "description": { "type": "string" } }), &["kind", "amount"]),
            "responses": with_gate(json!({
                "201": json_response("Granted", "CreditGrant"),
                "200": json_response("The key was used before for this same grant: nothing new was granted; the first grant", "CreditGrant"),
                "400": error_response("INVALID_REQUEST (not JSON, an unknown field or kind, or a customer id events could not carry), INVALID_GRANT (amount, priority, dates, the idempotency key missing or differing from the header) or REASON_REQUIRED"),
                "409": error_response("IDEMPOTENCY_CONFLICT: the key was used for a different grant; use a new key for a new grant"),
                "422": error_response("CREDITS_OUT_OF_RANGE"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/customers/{id}/credits/grants/{grant_id}/void": { "post": {
            "summary": "Void what is left of a grant (a `void` entry in the ledger; what was consumed stays consumed). Audited with the token's name and `reason`. Admin token",
            "parameters": [customer_parameter(), grant_parameter],
            "requestBody": reason_body(json!({}), &[]),
            "responses": with_gate(json!({
                "200": json_response("The grant, closed as voided", "CreditGrant"),
                "400": error_response("INVALID_REQUEST (the grant id is not a whole number, the customer id, or the body) or REASON_REQUIRED"),
                "404": error_response("NO_SUCH_GRANT: the customer has no such grant"),
                "409": error_response("GRANT_CLOSED: already voided or expired"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/customers/{id}/credits": { "get": {
            "summary": "The customer's credit balance (available, pending usage, projected, uncovered) and open grants in draw order. Tokens: admin, check, customer (own)",
            "parameters": [customer_parameter()],
            "responses": with_gate(json!({
                "200": json_response("The balance", "CreditBalance"),
                "400": error_response("INVALID_REQUEST: a customer id events could not carry"),
                "422": error_response("CREDITS_OUT_OF_RANGE: the balance is beyond a 28-digit decimal"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/customers/{id}/credits/ledger": { "get": {
            "summary": "Every movement of the customer's credits (grant, consume, expire, void), oldest first (or newest first with order=newest), paged. Tokens: admin, customer (own)",
            "parameters": [customer_parameter(),
                { "name": "order", "in": "query", "schema": { "enum": ["oldest", "newest"], "default": "oldest" } },
                { "name": "after", "in": "query", "schema": { "type": "integer", "minimum": 0 }, "description": "Oldest first: the previous page's `next_after`" },
                { "name": "before", "in": "query", "schema": { "type": "integer" }, "description": "Newest first: the previous page's `next_before`" },
                { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 } }],
            "responses": with_gate(json!({
                "200": json_response("A page of the ledger", "CreditLedger"),
                "400": error_response("INVALID_REQUEST (after, limit, the customer id)"),
                "422": error_response("CREDITS_OUT_OF_RANGE: a stored amount beyond a 28-digit decimal"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } }
    })
}

/// Self-serve billing's schemas: sessions, the portal, invoices.
fn billing_schemas() -> Value {
    let time = json!({ "type": "string", "format": "date-time" });
    let nullable_time = json!({ "type": ["string", "null"], "format": "date-time" });
    let line = json!({ "type": "object", "properties": {
        "id": { "type": "string" }, "price": { "type": ["string", "null"] },
        "meter": { "type": ["string", "null"], "description": "The tally meter a plan's metered price bills" },
        "description": { "type": ["string", "null"] }, "quantity": { "type": ["string", "null"] },
        "amount": { "type": "integer" }, "period_start": { "type": "integer" }, "period_end": { "type": "integer" } } });
    let invoice = json!({ "type": "object", "required": ["id", "currency", "amount_due", "amount_paid", "amount_remaining", "total", "period_start", "period_end", "lines"], "properties": {
        "id": { "type": "string" }, "customer": { "type": ["string", "null"] },
        "stripe_customer": { "type": ["string", "null"] }, "stripe_subscription": { "type": ["string", "null"] },
        "number": { "type": ["string", "null"] },
        "status": { "type": ["string", "null"], "description": "draft, open, paid, uncollectible or void" },
        "currency": { "type": "string" },
        "amount_due": { "type": "integer", "description": "In the currency's smallest unit" },
        "amount_paid": { "type": "integer" }, "amount_remaining": { "type": "integer" }, "total": { "type": "integer" },
        "period_start": time, "period_end": time, "created": nullable_time, "updated_at": time,
        "hosted_invoice_url": { "type": ["string", "null"] }, "invoice_pdf": { "type": ["string", "null"] },
        "lines": { "type": "array", "items": line },
        "lines_complete": { "type": "boolean", "description": "false when Stripe's event carried only the first lines (the hosted invoice has them all)" } } });
    let url = json!({ "type": "string", "format": "uri", "description": "https (http only to localhost); on one of serve.checkout_return_origins when set" });
    json!({
        "PlanCheckout": { "type": "object", "required": ["plan", "success_url", "cancel_url"], "properties": {
            "plan": { "type": "string" }, "success_url": url, "cancel_url": url } },
        "PackCheckout": { "type": "object", "required": ["pack", "success_url", "cancel_url"], "properties": {
            "pack": { "type": "string", "description": "A [[credits.packs]] name" }, "success_url": url, "cancel_url": url } },
        "CheckoutSession": { "type": "object", "required": ["id", "url"], "properties": {
            "id": { "type": "string", "description": "The Stripe Checkout Session (cs_…)" },
            "url": { "type": "string", "description": "Send the customer here to pay" } } },
        "PortalRequest": { "type": "object", "required": ["return_url"], "properties": { "return_url": url } },
        "PortalSessionRequest": { "type": "object", "properties": {
            "expires_in": { "type": "integer", "minimum": 60, "description": "Seconds; default serve.web.portal_session_ttl (1 h), at most serve.web.portal_session_max_ttl (4 h)" },
            "return_url": url } },
        "TallyPortalSession": { "type": "object", "required": ["id", "customer", "url", "expires_at"], "properties": {
            "id": { "type": "string", "format": "uuid", "description": "For DELETE /v1/portal-sessions/{id}" },
            "customer": { "type": "string" },
            "url": { "type": "string", "description": "Opens tally's portal for the customer once (the first visit trades it for a cookie); show it in an iframe or send the customer to it" },
            "expires_at": { "type": "string", "format": "date-time" } } },
        "PortalSession": { "type": "object", "required": ["url"], "properties": {
            "url": { "type": "string", "description": "Stripe's billing portal for the customer" } } },
        "Invoice": invoice,
        "InvoicePage": { "type": "object", "required": ["data", "has_more"], "properties": {
            "data": { "type": "array", "items": { "$ref": "#/components/schemas/Invoice" } },
            "has_more": { "type": "boolean" } } }
    })
}

fn billing_paths() -> Value {
    let checkout_errors = |extra: Value| {
        let mut responses = json!({
            "200": json_response("The session: send the customer to its url", "CheckoutSession"),
            "400": error_response("INVALID_REQUEST or INVALID_RETURN_URL"),
            "409": error_response("PLAN_NOT_FOR_SALE / PACK_NOT_FOR_SALE (no checked Stripe price: `tally plans sync --create`, `tally plans apply`) or NO_STRIPE_CUSTOMER (`tally customers sync --create`)"),
            "502": error_response("STRIPE_REFUSED: Stripe refused the session (its answer is in the log under the request id)"),
            "503": error_response("STRIPE_UNAVAILABLE, STRIPE_NOT_CONFIGURED, STORE_UNAVAILABLE or OVERLOADED") });
        if let (Some(responses), Value::Object(extra)) = (responses.as_object_mut(), extra) {
            responses.extend(extra);
        }
        with_gate(responses)
    };
    let body = |schema: &str| json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } });
    json!({
        "/v1/customers/{id}/checkout": { "post": {
            "summary": "Open a Stripe Checkout Session (mode subscription) for a plan: its fee and its metered prices. Once paid, Stripe's webhooks make the subscription live (replacing a tally-managed one at that moment). Tokens: admin, customer (own, for a plan with self_serve = true)",
            "parameters": [customer_parameter()], "requestBody": body("PlanCheckout"),
            "responses": checkout_errors(json!({
                "403": error_response("FORBIDDEN (another customer) or NOT_SELF_SERVE (a customer token, a plan without self_serve)"),
                "404": error_response("UNKNOWN_PLAN") })) } },
        "/v1/customers/{id}/credits/checkout": { "post": {
            "summary": "Open a Stripe Checkout Session (mode payment) for a credit pack; once paid, the pack is granted once as purchased credits (idempotency key checkout:<session id>), and a refund voids what is left of it. Tokens: admin, customer (own)",
            "parameters": [customer_parameter()], "requestBody": body("PackCheckout"),
            "responses": checkout_errors(json!({ "404": error_response("UNKNOWN_PACK") })) } },
        "/v1/customers/{id}/billing-portal": { "post": {
            "summary": "Open Stripe's billing portal for the customer (cards, cancellation, invoices); its changes come back through the webhooks. Tokens: admin, customer (own)",
            "parameters": [customer_parameter()], "requestBody": body("PortalRequest"),
            "responses": with_gate(json!({
                "200": json_response("The portal session", "PortalSession"),
                "400": error_response("INVALID_REQUEST or INVALID_RETURN_URL"),
                "409": error_response("NO_STRIPE_CUSTOMER"),
                "502": error_response("STRIPE_REFUSED"),
                "503": error_response("STRIPE_UNAVAILABLE, STRIPE_NOT_CONFIGURED, STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/customers/{id}/invoices": { "get": {
            "summary": "The customer's Stripe invoices as the webhooks described them, newest first, paged. Tokens: admin, customer (own)",
            "parameters": [customer_parameter(),
                { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 100, "default": 20 } },
                { "name": "starting_after", "in": "query", "schema": { "type": "string" }, "description": "The last invoice id of the previous page" }],
            "responses": with_gate(json!({
                "200": json_response("A page of invoices", "InvoicePage"),
                "400": error_response("INVALID_REQUEST (limit, the customer id)"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/customers/{id}/portal-sessions": { "post": {
            "summary": "A session of tally's customer portal for one customer: a link that opens it once. Older sessions stay open. Tokens: admin",
            "parameters": [customer_parameter()], "requestBody": body("PortalSessionRequest"),
            "responses": with_gate(json!({
                "200": json_response("The session's link", "TallyPortalSession"),
                "400": error_response("INVALID_REQUEST, INVALID_EXPIRY or INVALID_RETURN_URL"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/portal-sessions/{id}": { "delete": {
            "summary": "Ends a portal session now. Tokens: admin",
            "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string", "format": "uuid" } }],
            "responses": with_gate(json!({
                "204": { "description": "Ended" },
                "404": error_response("NO_SUCH_SESSION (unknown, or ended already)"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/invoices/{id}": { "get": {
            "summary": "One invoice. Tokens: admin, customer (its own invoices; another's is not found)",
            "parameters": [{ "name": "id", "in": "path", "required": true, "schema": { "type": "string" }, "description": "The Stripe invoice id (in_…)" }],
            "responses": with_gate(json!({
                "200": json_response("The invoice", "Invoice"),
                "404": error_response("NO_SUCH_INVOICE"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } }
    })
}

/// How a delivery to an alert endpoint is signed and identified (also in `webhooks.alert`).
const ALERT_DELIVERY: &str = "Each alert is POSTed to every endpoint it concerns (all, or the `customers` and `event_types` the endpoint was limited to) as JSON (an `AlertEvent`: `{id, type, created, customer, data}`, `type` `usage.threshold_crossed` or `credits.balance_below`) with two headers. `Tally-Event-Id`: the event's `id`, stable across retries and restarts (the same rule, customer and period give the same id): dedupe on it. `Tally-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, \"<t>.<raw body>\")>`, signed the way Stripe signs: compute the HMAC over the timestamp, a dot and the body exactly as received (before parsing it), compare it in constant time with each `v1` (during a secret's rotation there are two: one per secret), and refuse a `t` more than a few minutes from now (a replay). Any 2xx answer is delivered (only the first 2 KiB of an answer is read); anything else (or no answer in time) is retried with jittered backoff for `alerts.retry_for` (a day by default), then the delivery is `failed` (see GET /v1/alerts/deliveries). After 5 failures in a row the endpoint rests (30 s, doubling up to an hour) and is then tried one delivery at a time";

/// Usage alerts' schemas: rules, firings, the event endpoints receive, endpoints, deliveries.
fn alert_schemas() -> Value {
    let decimal = json!({ "type": "string", "description": "An exact decimal, e.g. \"12.5\"" });
    let time = json!({ "type": "string", "format": "date-time" });
    let nullable_time = json!({ "type": ["string", "null"], "format": "date-time" });
    let rule_properties = json!({
        "meter": { "type": "string", "description": "A usage rule: the meter whose usage is compared with its limit" },
        "percent": { "type": "string", "description": "A usage rule, an exact decimal: fires once per limit period when usage reaches this share of the limit (more than 0, at most 1000)" },
        "credit_balance_below": { "type": "string", "description": "A balance rule, an exact decimal: fires when the projected credit balance falls below it, and again only after it was back at or above it" } });
    let mut customer_rule = rule_properties.clone();
    customer_rule["rule_id"] = json!({ "type": "integer" });
    customer_rule["customer"] = json!({ "type": "string" });
    customer_rule["created_by"] =
        json!({ "type": "string", "description": "`token:<name>`; answered to admin tokens only" });
    customer_rule["created_at"] = time.clone();
    let mut plan_rule = rule_properties;
    plan_rule["key"] = json!({ "type": "string", "description": "`plan:<plan>:<rule>`, what this rule's firings name as `rule`" });
    let endpoint = json!({
        "endpoint_id": { "type": "integer" }, "url": { "type": "string" },
        "description": { "type": ["string", "null"] },
        "customers": { "type": ["array", "null"], "items": { "type": "string" }, "description": "Only these customers' alerts; null: every customer's" },
        "event_types": { "type": ["array", "null"], "items": { "enum": ["usage.threshold_crossed", "credits.balance_below"] }, "description": "Only these event types; null: both" },
        "previous_secret_expires_at": { "type": ["string", "null"], "format": "date-time", "description": "After a rotation: until when the replaced secret signs every delivery too" },
        "consecutive_failures": { "type": "integer", "description": "Deliveries that failed in a row (5 or more: the circuit breaker is open or half-open)" },
        "open_until": { "type": ["string", "null"], "format": "date-time", "description": "While the circuit breaker is open: when the endpoint is tried again" },
        "created_by": { "type": "string", "description": "`token:<name>`" }, "created_at": time });
    let mut created_endpoint = endpoint.clone();
    created_endpoint["secret"] = json!({ "type": "string", "description": "`whsec_…`: the key of every delivery's Tally-Signature. Shown in this answer only: store it now; it cannot be read again (POST …/rotate-secret gives a new one)" });
    json!({
        "CustomerAlertRule": { "type": "object", "required": ["rule_id", "customer", "created_at"],
            "description": "A customer's own rule: `meter` + `percent`, or `credit_balance_below`", "properties": customer_rule },
        "PlanAlertRule": { "type": "object", "required": ["key"],
            "description": "A `[[plans.alerts]]` rule of the customer's plan (tally.toml): `meter` + `percent`, or `credit_balance_below`", "properties": plan_rule },
        "AlertEvent": { "type": "object", "required": ["id", "type", "created", "customer", "data"],
            "description": ALERT_DELIVERY,
            "properties": {
                "id": { "type": "string", "description": "`evt_…`, stable: receivers dedupe on it (also the Tally-Event-Id header)" },
                "type": { "enum": ["usage.threshold_crossed", "credits.balance_below"] },
                "created": { "type": "integer", "description": "Unix seconds: when the crossing was recorded" },
                "customer": { "type": "string" },
                "data": { "oneOf": [
                    { "type": "object", "title": "usage.threshold_crossed", "required": ["rule", "meter", "percent", "limit", "threshold", "usage", "period", "period_start", "period_end", "plan"], "properties": {
                        "rule": { "type": "string", "description": "`plan:<plan>:<rule>` or `customer:<rule_id>`" },
                        "meter": { "type": "string" }, "percent": decimal, "limit": decimal,
                        "threshold": { "type": "string", "description": "An exact decimal: limit × percent / 100, the usage that fired the rule" },
                        "usage": { "type": "string", "description": "An exact decimal: the usage in the period when the crossing was recorded" },
                        "period": { "enum": ["day", "month", "billing_period"] },
                        "period_start": time, "period_end": time, "plan": { "type": "string" } } },
                    { "type": "object", "title": "credits.balance_below", "required": ["rule", "below", "balance"], "properties": {
                        "rule": { "type": "string", "description": "`plan:<plan>:<rule>` or `customer:<rule_id>`" },
                        "below": decimal,
                        "balance": { "type": "string", "description": "An exact decimal: the projected credit balance when the crossing was recorded" } } }] } } },
        "AlertFiring": { "type": "object", "required": ["event_id", "event_type", "rule", "customer", "period_start", "fired_at", "payload"], "properties": {
            "event_id": { "type": "string" },
            "event_type": { "enum": ["usage.threshold_crossed", "credits.balance_below"] },
            "rule": { "type": "string", "description": "`plan:<plan>:<rule>` (a `plan_rules` key) or `customer:<rule_id>`" },
            "customer": { "type": "string" },
            "period_start": { "type": "string", "format": "date-time", "description": "A usage rule's limit period; for a balance rule, when it fired" },
            "fired_at": time,
            "payload": { "$ref": "#/components/schemas/AlertEvent" } } },
        "CustomerAlerts": { "type": "object", "required": ["customer", "rules", "plan_rules", "firings"], "properties": {
            "customer": { "type": "string" },
            "plan": { "type": ["string", "null"], "description": "The live subscription's plan; null without one (its rules then do not apply)" },
            "rules": { "type": "array", "items": { "$ref": "#/components/schemas/CustomerAlertRule" } },
            "plan_rules": { "type": "array", "items": { "$ref": "#/components/schemas/PlanAlertRule" } },
            "firings": { "type": "array", "description": "The latest 50, newest first", "items": { "$ref": "#/components/schemas/AlertFiring" } } } },
        "AlertEndpoint": { "type": "object", "required": ["endpoint_id", "url", "consecutive_failures", "created_by", "created_at"], "properties": endpoint },
        "AlertEndpointCreated": { "type": "object", "required": ["endpoint_id", "url", "consecutive_failures", "created_by", "created_at", "secret"], "properties": created_endpoint },
        "AlertDeliveries": { "type": "object", "required": ["deliveries"], "properties": {
            "deliveries": { "type": "array", "items": { "type": "object", "required": ["delivery_id", "event_id", "event_type", "customer", "endpoint_id", "status", "attempts", "created_at"], "properties": {
                "delivery_id": { "type": "integer" }, "event_id": { "type": "string" },
                "event_type": { "enum": ["usage.threshold_crossed", "credits.balance_below"] },
                "customer": { "type": "string" }, "endpoint_id": { "type": "integer" },
                "status": { "enum": ["pending", "delivered", "failed"] },
                "attempts": { "type": "integer" },
                "next_attempt_at": { "type": ["string", "null"], "format": "date-time", "description": "When a pending delivery is tried next; null otherwise" },
                "last_status": { "type": ["integer", "null"], "description": "The HTTP status of the last attempt; null when it got no answer" },
                "last_error": { "type": ["string", "null"] },
                "created_at": time, "delivered_at": nullable_time } } },
            "next_before": { "type": ["integer", "null"], "description": "The last delivery's id: pass as `before` for the next (older) page; null when this page is empty" } } }
    })
}

/// Usage alerts' paths (`admin/alerts.rs`).
fn alert_paths() -> Value {
    let decimal_or_number = json!({ "type": ["string", "number"], "description": "An exact decimal as a string (\"80\") or a plain JSON number (80)" });
    let rule_parameter = json!({ "name": "rule_id", "in": "path", "required": true, "schema": { "type": "integer" } });
    let endpoint_parameter = json!({ "name": "endpoint_id", "in": "path", "required": true, "schema": { "type": "integer" } });
    json!({
        "/v1/customers/{id}/alerts": {
            "get": {
                "summary": "The customer's own alert rules, its plan's (`[[plans.alerts]]` of the live subscription's plan; none without one) and its latest 50 firings. Tokens: admin, customer (own)",
                "parameters": [customer_parameter()],
                "responses": with_gate(json!({
                    "200": json_response("Rules and firings", "CustomerAlerts"),
                    "400": error_response("INVALID_REQUEST: a customer id events could not carry"),
                    "409": error_response("OVERRIDE_CONFLICT: the customer's override does not fit its plan"),
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) },
            "post": {
                "summary": "Add an alert rule for the customer: usage of `meter` reaching `percent` of its limit (once per limit period), or the projected credit balance falling below `credit_balance_below` (again only after it was back at or above it). Evaluated at once. Alerts go to every endpoint (POST /v1/alerts/endpoints). Tokens: admin, customer (own, on a plan with self_serve, at most 20 rules)",
                "parameters": [customer_parameter()],
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "description": "Either `meter` + `percent` or `credit_balance_below`",
                    "properties": {
                        "meter": { "type": "string", "description": "A meter of [[meters]]" },
                        "percent": { "type": ["string", "number"], "description": "An exact decimal as a string (\"80\") or a plain JSON number (80): more than 0, at most 1000" },
                        "credit_balance_below": decimal_or_number } } } } },
                "responses": with_gate(json!({
                    "201": json_response("The rule", "CustomerAlertRule"),
                    "400": error_response("INVALID_REQUEST (not JSON, an unknown field, or a customer id events could not carry) or INVALID_ALERT (neither or both kinds, an unknown meter, percent out of range, a decimal not written plainly)"),
                    "409": error_response("TOO_MANY_ALERT_RULES: a customer token, and the customer holds 20 rules"),
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/customers/{id}/alerts/{rule_id}": { "delete": {
            "summary": "Remove one of the customer's own rules (a plan's rules change in tally.toml); what it fired stays listed. Tokens: admin, customer (own, on a plan with self_serve)",
            "parameters": [customer_parameter(), rule_parameter],
            "responses": with_gate(json!({
                "204": { "description": "Removed" },
                "400": error_response("INVALID_REQUEST: the rule id is not a whole number, or the customer id"),
                "404": error_response("NO_SUCH_ALERT_RULE: the customer has no such rule"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/alerts/endpoints": {
            "post": {
                "summary": "Register a URL alerts are delivered to (every alert, or those of some customers and event types), signed with the secret in this answer: the only time the secret is shown. At most 50 endpoints. Admin token",
                "description": ALERT_DELIVERY,
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "required": ["url"], "properties": {
                        "url": { "type": "string", "description": "https:// with a public host, at most 2000 characters, no user name or password. Refused: http:// (unless alerts.allow_http), and hosts that are not public (loopback, private ranges, link-local such as 169.254.169.254, carrier-grade NAT, unique local, internal names such as localhost or *.internal, numbers resolvers read as addresses) unless alerts.allow_private_networks. The address a name resolves to is checked again at every delivery" },
                        "description": { "type": "string", "description": "At most 1000 printable characters" },
                        "customers": { "type": "array", "items": { "type": "string" }, "minItems": 1, "maxItems": 1000, "description": "Only these customers' alerts (default: every customer's)" },
                        "event_types": { "type": "array", "items": { "enum": ["usage.threshold_crossed", "credits.balance_below"] }, "minItems": 1, "description": "Only these event types (default: both)" } } } } } },
                "responses": with_gate(json!({
                    "201": json_response("The endpoint and its signing secret (shown this once)", "AlertEndpointCreated"),
                    "400": error_response("INVALID_REQUEST (not JSON, an unknown field, no url) or INVALID_ALERT (the url's scheme or host, an address or name that is not public, the description, customers, event_types)"),
                    "409": error_response("TOO_MANY_ENDPOINTS: 50 endpoints exist already"),
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) },
            "get": {
                "summary": "The endpoints alerts are delivered to (never their secrets). Admin token",
                "responses": with_gate(json!({
                    "200": { "description": "Every endpoint in use", "content": { "application/json": { "schema": { "type": "object", "required": ["endpoints"], "properties": {
                        "endpoints": { "type": "array", "items": { "$ref": "#/components/schemas/AlertEndpoint" } } } } } } },
                    "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/alerts/endpoints/{endpoint_id}/rotate-secret": { "post": {
            "summary": "Give an endpoint a new signing secret (in this answer, the only time it is shown). The replaced secret signs every delivery too (a second `v1`) until `previous_secret_expires_at`, so receivers switch without missing a delivery. Admin token",
            "parameters": [endpoint_parameter.clone()],
            "requestBody": { "required": false, "content": { "application/json": { "schema": {
                "type": "object", "properties": {
                    "previous_secret_valid_seconds": { "type": "integer", "minimum": 0, "maximum": 604800, "description": "How long the replaced secret keeps signing (default 86400: a day)" } } } } } },
            "responses": with_gate(json!({
                "200": json_response("The endpoint and its new signing secret (shown this once)", "AlertEndpointCreated"),
                "400": error_response("INVALID_REQUEST (the endpoint id, the body) or INVALID_ALERT (more than 7 days)"),
                "404": error_response("NO_SUCH_ENDPOINT: no such endpoint, or deleted"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/alerts/endpoints/{endpoint_id}": { "delete": {
            "summary": "Stop delivering to an endpoint: its pending deliveries become `failed`. Admin token",
            "parameters": [endpoint_parameter],
            "responses": with_gate(json!({
                "204": { "description": "Deleted" },
                "400": error_response("INVALID_REQUEST: the endpoint id is not a whole number"),
                "404": error_response("NO_SUCH_ENDPOINT: no such endpoint, or deleted already"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } },
        "/v1/alerts/deliveries": { "get": {
            "summary": "Each alert's delivery to each endpoint (status, attempts, the last answer), newest first, paged. Admin token",
            "parameters": [
                { "name": "status", "in": "query", "schema": { "enum": ["pending", "delivered", "failed"] } },
                { "name": "before", "in": "query", "schema": { "type": "integer", "minimum": 1 }, "description": "The previous page's `next_before`" },
                { "name": "limit", "in": "query", "schema": { "type": "integer", "minimum": 1, "maximum": 1000, "default": 100 } }],
            "responses": with_gate(json!({
                "200": json_response("A page of deliveries", "AlertDeliveries"),
                "400": error_response("INVALID_REQUEST (status, before, limit, an unknown parameter)"),
                "503": error_response("STORE_UNAVAILABLE or OVERLOADED") })) } }
    })
}

/// What tally sends to alert endpoints (OpenAPI 3.1 `webhooks`).
fn alert_webhooks() -> Value {
    json!({
        "alert": { "post": {
            "summary": "An alert, delivered to every endpoint registered with POST /v1/alerts/endpoints",
            "description": ALERT_DELIVERY,
            "security": [],
            "parameters": [
                { "name": "Tally-Signature", "in": "header", "required": true, "schema": { "type": "string" },
                  "description": "`t=<unix seconds>,v1=<hex HMAC-SHA256(secret, \"<t>.<raw body>\")>`, with a second `v1` (by the replaced secret) for a while after a rotation" },
                { "name": "Tally-Event-Id", "in": "header", "required": true, "schema": { "type": "string" },
                  "description": "The event's `id`: the same on every retry; dedupe on it" }],
            "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/AlertEvent" } } } },
            "responses": {
                "2XX": { "description": "Delivered" },
                "default": { "description": "Not delivered: retried with backoff for alerts.retry_for" } } } }
    })
}

/// Whether `document` describes this answer of `method template`: its status is listed, and a
/// JSON body has the required fields of (one of) the schemas given for it, with a documented
/// error `code`. For tests, and for anyone checking a client against the document.
pub fn check_answer(
    document: &Value,
    template: &str,
    method: &str,
    status: u16,
    body: &Value,
) -> Result<(), String> {
    let operation = &document["paths"][template][method.to_lowercase()];
    if !operation.is_object() {
        return Err(format!("{method} {template} is not described"));
    }
    let response = &operation["responses"][status.to_string()];
    if !response.is_object() {
        return Err(format!(
            "{method} {template} answered {status}, which the document does not describe: {body}"
        ));
    }
    let Some(schema) = response.pointer("/content/application~1json/schema") else {
        return Ok(());
    };
    let resolve = |schema: &Value| -> Option<Value> {
        match schema["$ref"].as_str() {
            Some(reference) => document.pointer(&reference.replace("#/", "/")).cloned(),
            None => Some(schema.clone()),
        }
    };
    let candidates: Vec<Value> = match schema["oneOf"].as_array() {
        Some(one_of) => one_of.iter().filter_map(resolve).collect(),
        None => resolve(schema).into_iter().collect(),
    };
    let fits = |schema: &Value| {
        let required = schema["required"].as_array().cloned().unwrap_or_default();
        let has_fields = required
            .iter()
            .all(|field| field.as_str().is_some_and(|name| !body[name].is_null()));
        let code_ok = match (
            schema.pointer("/properties/code/enum"),
            schema.pointer("/properties/code/const"),
        ) {
            (Some(codes), _) => codes
                .as_array()
                .is_some_and(|codes| codes.contains(&body["code"])),
            (_, Some(code)) => &body["code"] == code,
            _ => true,
        };
        has_fields && code_ok
    };
    if candidates.iter().any(fits) {
        Ok(())
    } else {
        Err(format!(
            "{method} {template} {status}: the body does not fit what the document describes: {body}"
        ))
    }
}
