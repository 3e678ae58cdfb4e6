//! What the mock binaries (`mock-apns`, `mock-fcm`) share: their JSON lines on stdout, `TOKEN=BEHAVIOUR`
//! arguments, and the small plain-HTTP answers of their control and read-only listeners.

use std::io::Write as _;
use std::str::FromStr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

/// Parse `TOKEN=BEHAVIOUR` (a token never holds `=`; an FCM token may hold `:`).
pub fn parse_token_behaviour<B>(s: &str) -> Result<(String, B), String>
where
    B: FromStr,
    B::Err: std::fmt::Display,
{
    let (token, name) = s
        .split_once('=')
        .ok_or_else(|| format!("expected TOKEN=BEHAVIOUR, got {s:?}"))?;
    let behaviour = name.parse().map_err(|e: B::Err| e.to_string())?;
    Ok((token.to_string(), behaviour))
}

/// One JSON line on stdout, flushed (a test reads it as it comes).
pub fn print_line(v: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

/// A plain-text answer.
pub fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// A JSON answer (500 with the reason if it cannot be serialised).
pub fn json<T: serde::Serialize>(value: &T) -> Response<Full<Bytes>> {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &format!("{e}\n")),
    }
}
