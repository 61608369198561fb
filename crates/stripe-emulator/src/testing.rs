//! Plain HTTP calls to the emulator, for tests that need what a typed client hides (status
//! codes, headers) or endpoints the typed client does not have compiled in.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

/// A response: status, headers and the JSON body (`Null` when it is not JSON).
pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Value,
}

/// Sends `form` as a form body to `path` on the emulator at `addr`.
pub async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    form: &[(&str, String)],
    idempotency_key: Option<&str>,
) -> Result<Answer, String> {
    let body = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
        .finish();
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/x-www-form-urlencoded");
    if let Some(key) = key {
        request = request.header("authorization", format!("Bearer {key}"));
    }
    if let Some(idempotency_key) = idempotency_key {
        request = request.header("idempotency-key", idempotency_key);
    }
    let request = request
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    send(request).await
}

/// `POST /_emulator/{path}` with a JSON body: what a paying customer does on Stripe's hosted
/// pages (`checkout/{id}/complete`, `checkout/{id}/async_payment`, `portal/{id}/cancel`), the
/// clock, invoices' later changes.
pub async fn control(addr: SocketAddr, path: &str, body: &Value) -> Result<Answer, String> {
    let request = hyper::Request::post(format!("http://{addr}/_emulator/{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    send(request).await
}

/// Sends the request and reads the whole answer.
async fn send(request: hyper::Request<Full<Bytes>>) -> Result<Answer, String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok(Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    })
}
