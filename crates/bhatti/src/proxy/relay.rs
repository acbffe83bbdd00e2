//! The one relay both proxies use: an HTTP/1.1 request, rewritten as a
//! reverse proxy should, sent to a guest port over the agent's forward
//! channel, with the response streamed back. WebSocket (any `Upgrade`)
//! requests are answered with the app's 101 and then relayed byte for byte.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Request, Response, StatusCode, Uri, Version};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use hyper_util::rt::TokioIo;

use super::{ProxyError, Target, UpstreamPool, MAX_REQUEST_BODY};
pub use crate::service::upstream::{BoxError, UpstreamBody};

/// How the request reached the proxy, for `X-Forwarded-*` and `Host`.
#[derive(Debug, Clone, Default)]
pub struct Forwarded {
    /// The client's address.
    pub client: Option<SocketAddr>,
    /// `http` or `https`, as the client sees the proxy.
    pub proto: &'static str,
    /// Replaces the `Host` header sent to the app (the original goes in
    /// `X-Forwarded-Host`); `None` keeps the client's.
    pub host: Option<String>,
    /// Drop the client's `Authorization` header (it carried our API key).
    pub strip_authorization: bool,
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Sends `req` to `target` and returns the app's response, streaming.
/// `path_and_query` is what the app sees as the request target.
pub async fn relay<B>(
    pool: &UpstreamPool,
    target: &Target,
    mut req: Request<B>,
    path_and_query: &str,
    fwd: &Forwarded,
) -> Result<Response<Body>, ProxyError>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    if content_length(req.headers()).is_some_and(|n| n > MAX_REQUEST_BODY) {
        return Err(ProxyError::TooLarge);
    }
    let upgrade = upgrade_protocol(req.headers());
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));

    let (parts, body) = req.into_parts();
    let mut headers = parts.headers;
    let original_host = headers.get(header::HOST).cloned();
    strip_hop_by_hop(&mut headers);
    if fwd.strip_authorization {
        headers.remove(header::AUTHORIZATION);
    }
    if let Some(proto) = &upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto.clone());
    }
    let host = match &fwd.host {
        Some(h) => HeaderValue::from_str(h).ok(),
        None => original_host.clone(),
    }
    .unwrap_or_else(|| HeaderValue::from_static("localhost"));
    headers.insert(header::HOST, host);
    add_forwarded(&mut headers, fwd, original_host);

    let exceeded = Arc::new(AtomicBool::new(false));
    let body = CappedBody {
        inner: body.map_err(Into::into).boxed_unsync(),
        seen: 0,
        limit: MAX_REQUEST_BODY,
        exceeded: exceeded.clone(),
    }
    .boxed_unsync();
    let uri: Uri = path_and_query.parse().map_err(|_| ProxyError::Upstream {
        port: target.port,
        detail: format!("invalid request target {path_and_query:?}"),
    })?;
    let mut up = Request::new(body);
    *up.method_mut() = parts.method;
    *up.uri_mut() = uri;
    *up.version_mut() = Version::HTTP_11;
    *up.headers_mut() = headers;

    let mut resp = pool.send(target, up).await.map_err(|e| {
        if exceeded.load(Ordering::Relaxed) {
            ProxyError::TooLarge
        } else {
            e
        }
    })?;

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The connection now belongs to the upgraded protocol: the pool
        // never hands it out again.
        let Some(client_upgrade) = client_upgrade else {
            return Err(ProxyError::Upstream {
                port: target.port,
                detail: "the app switched protocols without being asked to".into(),
            });
        };
        let upstream_upgrade = hyper::upgrade::on(&mut resp);
        let port = target.port;
        tokio::spawn(async move {
            let (client, upstream) = match tokio::try_join!(client_upgrade, upstream_upgrade) {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::debug!(port, error = %e, "upgrade did not complete");
                    return;
                }
            };
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(port, error = %e, "upgraded connection ended");
            }
        });
        let (parts, _) = resp.into_parts();
        return Ok(Response::from_parts(parts, Body::empty()));
    }

    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Ok(Response::from_parts(parts, Body::new(body)))
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The protocol asked for by `Connection: upgrade` + `Upgrade: <proto>`.
fn upgrade_protocol(h: &HeaderMap) -> Option<HeaderValue> {
    let wants = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    if wants {
        h.get(header::UPGRADE).cloned()
    } else {
        None
    }
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

fn add_forwarded(h: &mut HeaderMap, fwd: &Forwarded, original_host: Option<HeaderValue>) {
    if let Some(addr) = fwd.client {
        let ip = addr.ip().to_string();
        let value = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert("x-forwarded-for", v);
        }
    }
    if let Some(host) = original_host {
        h.insert("x-forwarded-host", host);
    }
    if !fwd.proto.is_empty() {
        h.insert("x-forwarded-proto", HeaderValue::from_static(fwd.proto));
    }
}

/// A request body that fails once more than `limit` bytes went through,
/// and says so in `exceeded` (so the caller can answer 413, not 502).
struct CappedBody {
    inner: UpstreamBody,
    seen: u64,
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl hyper::body::Body for CappedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen += data.len() as u64;
                    if this.seen > this.limit {
                        this.exceeded.store(true, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(ProxyError::TooLarge.to_string().into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn upgrade_detection() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(
            upgrade_protocol(&h).is_none(),
            "Upgrade alone is not a request"
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert_eq!(
            upgrade_protocol(&h).as_ref().map(|v| v.as_bytes()),
            Some(&b"websocket"[..])
        );
    }

    #[tokio::test]
    async fn capped_body_flags_the_excess() {
        let chunks: Vec<Result<Frame<Bytes>, BoxError>> = (0..4)
            .map(|_| Ok(Frame::data(Bytes::from(vec![0u8; 10]))))
            .collect();
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(chunks));
        let exceeded = Arc::new(AtomicBool::new(false));
        let body = CappedBody {
            inner: inner.boxed_unsync(),
            seen: 0,
            limit: 25,
            exceeded: exceeded.clone(),
        };
        assert!(body.collect().await.is_err());
        assert!(exceeded.load(Ordering::Relaxed));
    }

    #[test]
    fn forwarded_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.1.1.1"));
        let fwd = Forwarded {
            client: Some("127.0.0.1:5555".parse().expect("addr")),
            proto: "https",
            ..Default::default()
        };
        add_forwarded(&mut h, &fwd, Some(HeaderValue::from_static("app.example")));
        assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h["x-forwarded-proto"], "https");
    }
}
