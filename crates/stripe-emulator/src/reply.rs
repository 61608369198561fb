//! Responses, kept as plain data so that an idempotency key can replay them byte for byte.

use bytes::Bytes;
use http_body_util::Full;
use hyper::Response;
use serde_json::{json, Value};

#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) body: Bytes,
    /// `Stripe-Should-Retry`, when Stripe would send it.
    pub(crate) should_retry: Option<bool>,
    pub(crate) replayed: bool,
    pub(crate) content_type: &'static str,
}

impl Reply {
    pub(crate) fn json(status: u16, value: &Value) -> Reply {
        Reply {
            status,
            body: Bytes::from(value.to_string()),
            should_retry: None,
            replayed: false,
            content_type: "application/json",
        }
    }

    /// A page or a file: the hosted pages (Checkout, the invoice, the portal) and PDFs.
    pub(crate) fn document(content_type: &'static str, body: impl Into<Bytes>) -> Reply {
        Reply {
            status: 200,
            body: body.into(),
            should_retry: None,
            replayed: false,
            content_type,
        }
    }

    /// Stripe's error shape: `{"error":{"type","code","message","param"}}`.
    pub(crate) fn error(
        status: u16,
        kind: &str,
        code: Option<&str>,
        message: impl Into<String>,
        param: Option<&str>,
    ) -> Reply {
        let mut error = json!({ "type": kind, "message": message.into() });
        if let Some(code) = code {
            error["code"] = json!(code);
        }
        if let Some(param) = param {
            error["param"] = json!(param);
        }
        Reply::json(status, &json!({ "error": error }))
    }

    /// A 400 for bad parameters: Stripe marks these as not worth retrying.
    pub(crate) fn invalid(message: impl Into<String>, param: Option<&str>) -> Reply {
        let code = param.map(|_| "parameter_invalid_string");
        Reply::error(400, "invalid_request_error", code, message, param).should_retry(false)
    }

    pub(crate) fn missing(param: &str) -> Reply {
        Reply::error(
            400,
            "invalid_request_error",
            Some("parameter_missing"),
            format!("Missing required param: {param}."),
            Some(param),
        )
        .should_retry(false)
    }

    pub(crate) fn rate_limited(message: &str) -> Reply {
        Reply::error(
            429,
            "invalid_request_error",
            Some("rate_limit"),
            message,
            None,
        )
    }

    pub(crate) fn not_found(message: impl Into<String>, param: Option<&str>) -> Reply {
        Reply::error(
            404,
            "invalid_request_error",
            Some("resource_missing"),
            message,
            param,
        )
    }

    /// A field of an error reply's `error` object (`message`, `param`, `code`).
    pub(crate) fn error_field(&self, name: &str) -> Option<String> {
        let body: Value = serde_json::from_slice(&self.body).ok()?;
        body["error"][name].as_str().map(str::to_owned)
    }

    pub(crate) fn should_retry(mut self, retry: bool) -> Reply {
        self.should_retry = Some(retry);
        self
    }

    pub(crate) fn into_response(self) -> Response<Full<Bytes>> {
        let mut builder = Response::builder()
            .status(self.status)
            .header("content-type", self.content_type)
            .header(
                "request-id",
                format!("req_emu{:016x}", rand::random::<u64>()),
            );
        if let Some(retry) = self.should_retry {
            builder = builder.header("stripe-should-retry", if retry { "true" } else { "false" });
        }
        if self.replayed {
            builder = builder.header("idempotent-replayed", "true");
        }
        builder
            .body(Full::new(self.body))
            .expect("static headers are valid")
    }
}
