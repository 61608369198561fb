//! `GET /openapi.json`: the API described in OpenAPI 3.1, written by hand next to the routes
//! (a test checks that every route is in it).

use serde_json::{json, Value};

/// The paths this document describes; the router serves exactly these (tested).
pub const PATHS: [&str; 9] = [
    "/v1/quota/check",
    "/v1/events",
    "/v1/webhooks/stripe",
    "/v1/customers/{id}/entitlements",
    "/v1/customers/{id}/usage",
    "/v1/customers/{id}/invoice-preview",
    "/healthz",
    "/readyz",
    "/metrics",
];

fn error_response(description: &str) -> Value {
    json!({ "description": description, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } } })
}

fn customer_parameter() -> Value {
    json!({ "name": "id", "in": "path", "required": true, "schema": { "type": "string" }, "description": "The customer id events carry" })
}

pub fn document() -> Value {
    let decimal = json!({ "type": "string", "description": "An exact decimal, e.g. \"12.5\"" });
    json!({
        "openapi": "3.1.0",
        "info": { "title": "tally", "version": env!("CARGO_PKG_VERSION"),
                  "description": "Usage metering: quota checks, entitlements, usage, event ingest and Stripe webhooks. Errors are JSON with a stable `code`." },
        "security": [{ "bearer": [] }],
        "components": {
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer",
                "description": "An admin token, or a customer token that reads only its own customer ([[serve.tokens]])" } },
            "schemas": {
                "Error": { "type": "object", "required": ["code", "message"], "properties": {
                    "code": { "type": "string", "enum": ["UNAUTHORIZED", "FORBIDDEN", "INVALID_REQUEST", "UNKNOWN_METER",
                        "UNSUPPORTED", "NO_ACTIVE_SUBSCRIPTION", "FEATURE_DISABLED", "PAYLOAD_TOO_LARGE", "NOT_READY", "INTERNAL",
                        "INGEST_DISABLED", "STORE_UNAVAILABLE", "WEBHOOKS_DISABLED", "MISSING_SIGNATURE", "BAD_SIGNATURE",
                        "STALE_SIGNATURE", "MALFORMED_EVENT", "UNMAPPED_STRIPE_CUSTOMER", "AMBIGUOUS_STRIPE_CUSTOMER",
                        "UNKNOWN_STRIPE_PRICE", "AMBIGUOUS_PLAN", "SECOND_LIVE_SUBSCRIPTION", "UNKNOWN_PLAN"] },
                    "message": { "type": "string" } } },
                "LimitExceeded": { "type": "object", "properties": {
                    "code": { "const": "LIMIT_EXCEEDED" }, "metric": { "type": "string" }, "limit": decimal,
                    "current": decimal, "resets_at": { "type": ["string", "null"], "format": "date-time" },
                    "upgrade_hint": { "type": "boolean" } } },
                "CheckRequest": { "type": "object", "required": ["customer", "meter"], "properties": {
                    "customer": { "type": "string" }, "meter": { "type": "string" },
                    "quantity": { "description": "Decimal number or string; default 1" },
                    "feature": { "type": "string", "description": "Also require this feature" } } },
                "CheckAnswer": { "type": "object", "properties": {
                    "decision": { "enum": ["allow", "warn"] }, "metric": { "type": "string" },
                    "current": decimal, "limit": { "type": ["string", "null"] }, "remaining": { "type": ["string", "null"] },
                    "resets_at": { "type": ["string", "null"], "format": "date-time" },
                    "enforcement": { "enum": ["soft", "grace"] } } }
            }
        },
        "paths": {
            "/v1/quota/check": { "post": {
                "summary": "May the customer use `quantity` more of `meter`?",
                "requestBody": { "required": true, "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CheckRequest" } } } },
                "responses": {
                    "200": { "description": "Allowed (or allowed with a warning)", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/CheckAnswer" } } } },
                    "429": { "description": "Limit exceeded", "content": { "application/json": { "schema": { "$ref": "#/components/schemas/LimitExceeded" } } } },
                    "400": error_response("INVALID_REQUEST, UNKNOWN_METER, or INVALID_QUANTITY (usage plus quantity beyond a 28-digit decimal)"),
                    "401": error_response("UNAUTHORIZED"),
                    "403": error_response("FEATURE_DISABLED, or FORBIDDEN for another customer's token"),
                    "404": error_response("NO_ACTIVE_SUBSCRIPTION"),
                    "413": error_response("PAYLOAD_TOO_LARGE") } } },
            "/v1/events": { "post": {
                "summary": "Report usage: up to 1,000 events (native or CloudEvents 1.0), each answered on its own; admin tokens only",
                "requestBody": { "required": true, "content": { "application/json": { "schema": {
                    "type": "object", "required": ["events"], "properties": { "events": { "type": "array", "maxItems": 1000, "items": { "type": "object" } } } } } } },
                "responses": {
                    "200": { "description": "Every event accepted (durable: acknowledged by Kafka or fsynced in the spool)" },
                    "207": { "description": "Some events rejected (stored in rejected_events, with the event-contract code) or unavailable (EMITTER_OVERLOADED, SPOOL_FAILED, DURABILITY_TIMEOUT or SHUTTING_DOWN: retry with the same id); see `results`" },
                    "400": error_response("INVALID_REQUEST (not a batch, or more than 1,000 events)"),
                    "401": error_response("UNAUTHORIZED"),
                    "403": error_response("FORBIDDEN: a customer token"),
                    "413": error_response("PAYLOAD_TOO_LARGE"),
                    "503": error_response("INGEST_DISABLED or STORE_UNAVAILABLE: nothing was emitted") } } },
            "/v1/webhooks/stripe": { "post": {
                "summary": "Stripe's signed events (Stripe-Signature); subscriptions and invoices",
                "security": [],
                "parameters": [{ "name": "Stripe-Signature", "in": "header", "required": true, "schema": { "type": "string" } }],
                "responses": {
                    "200": { "description": "Handled: outcome applied, stale, ignored or replay" },
                    "400": error_response("MISSING_SIGNATURE, BAD_SIGNATURE, STALE_SIGNATURE or MALFORMED_EVENT"),
                    "422": error_response("Not applicable yet (UNMAPPED_STRIPE_CUSTOMER, UNKNOWN_STRIPE_PRICE, ...): nothing stored, Stripe retries"),
                    "503": error_response("WEBHOOKS_DISABLED, or Postgres unavailable") } } },
            "/v1/customers/{id}/entitlements": { "get": {
                "summary": "The customer's plan, subscription, features and limits (overrides merged in)",
                "parameters": [customer_parameter()],
                "responses": { "200": { "description": "Entitlements" }, "404": error_response("NO_ACTIVE_SUBSCRIPTION") } } },
            "/v1/customers/{id}/usage": { "get": {
                "summary": "Usage of one meter in minute, hour or day buckets",
                "parameters": [customer_parameter(),
                    { "name": "meter", "in": "query", "required": true, "schema": { "type": "string" } },
                    { "name": "from", "in": "query", "required": true, "schema": { "type": "string", "format": "date-time" } },
                    { "name": "to", "in": "query", "required": true, "schema": { "type": "string", "format": "date-time" } },
                    { "name": "granularity", "in": "query", "schema": { "enum": ["minute", "hour", "day"], "default": "hour" } },
                    { "name": "group_by", "in": "query", "schema": { "type": "boolean", "default": false } }],
                "responses": { "200": { "description": "Series of buckets per group key" }, "400": error_response("INVALID_REQUEST or UNKNOWN_METER") } } },
            "/v1/customers/{id}/invoice-preview": { "get": {
                "summary": "Usage in the current billing period × the plan's unit prices",
                "parameters": [customer_parameter()],
                "responses": { "200": { "description": "Lines and total" }, "404": error_response("NO_ACTIVE_SUBSCRIPTION"), "422": error_response("USAGE_OUT_OF_RANGE: usage × price beyond a 28-digit decimal") } } },
            "/healthz": { "get": { "summary": "The process is up", "security": [], "responses": { "200": { "description": "ok" } } } },
            "/readyz": { "get": { "summary": "Postgres answers and every dependency of this process is reachable", "security": [], "responses": { "200": { "description": "ready: {ready, dependencies: [{name, up, down_seconds, error}]}" }, "503": { "description": "not ready: the same body, naming the dependency that is away" } } } },
            "/metrics": { "get": { "summary": "Prometheus metrics", "security": [], "responses": { "200": { "description": "text exposition format" } } } }
        }
    })
}
