//! The public listener: `Host: <alias>.<domain>` → the published port of a
//! sandbox, without authentication, rate limited in total, per client
//! address and per alias.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use super::relay::{relay, Forwarded};
use super::{ProxyError, UpstreamPool};
use crate::rate_limit::{KeyedLimit, Limit};
use crate::service::{ErrorKind, Service, ServiceError};
use crate::status::status_of;

/// A client must send its request headers within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What the public listener needs from the daemon config.
#[derive(Debug, Clone)]
pub struct PublicConfig {
    /// Published hosts are `<alias>.<domain>`.
    pub domain: String,
    /// `http` or `https`: what clients use in front of us (for X-Forwarded-Proto).
    pub scheme: &'static str,
    /// Requests per second per alias; 0 = unlimited.
    pub rate_per_alias: u32,
    /// Requests per second in total; 0 = unlimited.
    pub rate_global: u32,
    /// Requests per second per client address (see [`client_key`]); 0 = unlimited.
    pub rate_per_client: u32,
}

/// The public proxy's limits: in total, per client and per alias
/// (requests per second; 0 = unlimited).
pub struct RateLimiter {
    global: Limit,
    clients: KeyedLimit<IpAddr>,
    aliases: KeyedLimit<String>,
}

impl RateLimiter {
    pub fn new(per_alias: u32, global: u32, per_client: u32) -> RateLimiter {
        RateLimiter {
            global: Limit::per_second(global),
            clients: KeyedLimit::per_second(per_client),
            aliases: KeyedLimit::per_second(per_alias),
        }
    }

    /// One request against the global limit.
    pub fn allow_global(&self) -> bool {
        self.global.allow()
    }

    /// One request against `client`'s limit.
    pub fn allow_client(&self, client: IpAddr) -> bool {
        self.clients.allow(&client)
    }

    /// One request against `alias`'s limit.
    pub fn allow_alias(&self, alias: &str) -> bool {
        // The key is owned: governor clones it into its map for new keys.
        self.aliases.allow(&alias.to_string())
    }

    /// Forgets clients and aliases whose budget is full again.
    pub fn forget_idle(&self) {
        self.clients.forget_idle();
        self.aliases.forget_idle();
    }
}

/// The client a request is counted against: its TCP peer, except that a
/// request from loopback carrying `X-Forwarded-For` (a TLS terminator on
/// this host, in front of the listener) counts against the address the
/// terminator appended last. A loopback client can claim any address this
/// way, but not get past the per-alias and global limits.
pub fn client_key<B>(peer: IpAddr, req: &Request<B>) -> IpAddr {
    if !peer.is_loopback() {
        return peer;
    }
    req.headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .next_back()
        .and_then(|last| last.trim().parse().ok())
        .unwrap_or(peer)
}

struct State {
    service: Arc<Service>,
    /// The service's upstream connections, taken once at start-up.
    pool: Arc<UpstreamPool>,
    domain_suffix: String,
    scheme: &'static str,
    limiter: RateLimiter,
}

/// Serves the public proxy on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    service: Arc<Service>,
    cfg: PublicConfig,
    shutdown: impl Future<Output = ()>,
) {
    let state = Arc::new(State {
        pool: service.upstream(),
        service,
        domain_suffix: format!(".{}", cfg.domain.trim_end_matches('.').to_ascii_lowercase()),
        scheme: cfg.scheme,
        limiter: RateLimiter::new(cfg.rate_per_alias, cfg.rate_global, cfg.rate_per_client),
    });
    let sweeper = {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            loop {
                tick.tick().await;
                state.limiter.forget_idle();
            }
        })
    };
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "public proxy: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move {
                    let mut resp = handle(&state, peer, req).await;
                    // Every answer names the server, as the API's do.
                    resp.headers_mut().insert(
                        crate::model::VERSION_HEADER,
                        hyper::header::HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
                    );
                    Ok::<_, Infallible>(resp)
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "public proxy connection ended");
            }
        });
    }
    sweeper.abort();
}

async fn handle(state: &State, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
    let Some(alias) = alias_of(&req, &state.domain_suffix) else {
        return page(
            StatusCode::NOT_FOUND,
            "Not found",
            "No app is published at this address.",
        );
    };
    if !state.limiter.allow_client(client_key(peer.ip(), &req)) {
        return too_many(TooMany::Client);
    }
    if !state.limiter.allow_global() {
        return too_many(TooMany::Server);
    }
    let route = match state.service.public_route(&alias).await {
        Ok(r) => r,
        Err(e) => {
            if e.kind() == ErrorKind::Internal {
                tracing::warn!(%alias, error = %e, "public proxy: route lookup failed");
            }
            return route_error_page(&e);
        }
    };
    if !state.limiter.allow_alias(&route.alias) {
        return too_many(TooMany::App);
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let fwd = Forwarded {
        client: Some(peer),
        proto: state.scheme,
        host: None,
        strip_authorization: false,
    };
    match relay(&state.pool, &route.target, req, &path, &fwd).await {
        Ok(resp) => route.hold_until_sent(resp),
        Err(e) => error_page(&e),
    }
}

/// The alias a request is for: its Host (port stripped, any case) must be
/// exactly one label followed by `.<domain>`.
fn alias_of<B>(req: &Request<B>, domain_suffix: &str) -> Option<String> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().host().map(str::to_string))?;
    alias_from_host(&host, domain_suffix)
}

fn alias_from_host(host: &str, domain_suffix: &str) -> Option<String> {
    let host = host.trim();
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let alias = name.strip_suffix(domain_suffix)?;
    let valid =
        !alias.is_empty() && !alias.contains('.') && crate::store::validate_alias(alias).is_ok();
    valid.then(|| alias.to_string())
}

/// A small HTML page for errors of the public proxy.
fn page(status: StatusCode, title: &str, text: &str) -> Response<Body> {
    let html = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{code} {title}</title></head>\n<body><h1>{code} {title}</h1>\n<p>{text}</p>\n<hr><p>bhatti</p></body></html>\n",
        code = status.as_u16(),
        title = escape(title),
        text = escape(text),
    );
    let mut resp = Response::new(Body::from(html));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Whose budget a refused request was over: the page says whom it is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TooMany {
    /// This client's own (`public_rate_per_client`).
    Client,
    /// The app's (`public_rate_per_alias`).
    App,
    /// The whole proxy's (`public_rate_global`).
    Server,
}

fn too_many(who: TooMany) -> Response<Body> {
    let text = match who {
        TooMany::Client => {
            "You have sent more requests than one client may; try again in a moment."
        }
        TooMany::App => "This app gets more requests than it may; try again in a moment.",
        TooMany::Server => {
            "This server gets more requests than it can take; try again in a moment."
        }
    };
    let mut resp = page(StatusCode::TOO_MANY_REQUESTS, "Too many requests", text);
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// The page of a route lookup that failed; its status is the API's for the
/// same failure ([`status_of`]).
fn route_error_page(e: &ServiceError) -> Response<Body> {
    let status = status_of(e.kind());
    match e {
        ServiceError::NotFound(_) => {
            page(status, "Not found", "No app is published at this address.")
        }
        ServiceError::Unavailable(m) => page(status, "Sandbox not ready", m),
        ServiceError::Busy {
            retry_after_secs,
            message,
        } => {
            let mut resp = page(status, "Waking up", message);
            resp.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from(*retry_after_secs),
            );
            resp
        }
        // The details stay in the daemon's log: this page is public.
        _ => page(
            status,
            status.canonical_reason().unwrap_or("Error"),
            "This app cannot be reached right now.",
        ),
    }
}

fn error_page(e: &ProxyError) -> Response<Body> {
    let status = status_of(e.kind());
    match e {
        ProxyError::NotListening { port } => page(
            status,
            "Bad gateway",
            &format!(
                "The app is not listening on port {port}. Start it inside the sandbox (listening on 0.0.0.0 or 127.0.0.1:{port}) and reload."
            ),
        ),
        ProxyError::TooLarge => page(status, "Payload too large", &e.to_string()),
        ProxyError::Unreachable(_) => page(
            status,
            "Unavailable",
            "The sandbox cannot be reached right now.",
        ),
        ProxyError::Upstream { .. } => page(status, "Bad gateway", &e.to_string()),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_per_alias_client_and_global() {
        let l = RateLimiter::new(3, 0, 0);
        assert_eq!((0..10).filter(|_| l.allow_alias("a")).count(), 3);
        assert!(l.allow_alias("b"), "other aliases are unaffected");
        assert!((0..1000).all(|_| l.allow_global()), "0 = unlimited");
        let g = RateLimiter::new(0, 4, 0);
        assert_eq!((0..10).filter(|_| g.allow_global()).count(), 4);
        assert!((0..1000).all(|_| g.allow_alias("a")));
        assert_eq!(g.aliases.keys(), 0, "unlimited keeps no state");
        let c = RateLimiter::new(0, 0, 2);
        let one: IpAddr = [192, 0, 2, 1].into();
        assert_eq!((0..10).filter(|_| c.allow_client(one)).count(), 2);
        assert!(
            c.allow_client([192, 0, 2, 2].into()),
            "other clients are unaffected"
        );
    }

    #[test]
    fn client_key_trusts_forwarded_for_only_from_loopback() {
        let req = |xff: &[&str]| {
            let mut b = Request::builder().uri("/");
            for v in xff {
                b = b.header("x-forwarded-for", *v);
            }
            b.body(()).expect("request")
        };
        let lo: IpAddr = [127, 0, 0, 1].into();
        let remote: IpAddr = [198, 51, 100, 7].into();
        assert_eq!(client_key(lo, &req(&[])), lo);
        assert_eq!(
            client_key(lo, &req(&["203.0.113.9, 203.0.113.5"])),
            IpAddr::from([203, 0, 113, 5]),
            "the last hop the terminator appended"
        );
        assert_eq!(
            client_key(lo, &req(&["203.0.113.9", "2001:db8::1"])),
            "2001:db8::1".parse::<IpAddr>().expect("ip")
        );
        assert_eq!(client_key(lo, &req(&["not an ip"])), lo);
        assert_eq!(
            client_key(remote, &req(&["203.0.113.5"])),
            remote,
            "a remote client cannot choose its key"
        );
    }

    #[test]
    fn hosts_to_aliases() {
        let d = ".bhatti.test";
        assert_eq!(
            alias_from_host("my-app.bhatti.test", d).as_deref(),
            Some("my-app")
        );
        assert_eq!(
            alias_from_host("My-App.Bhatti.Test:8081", d).as_deref(),
            Some("my-app")
        );
        assert_eq!(
            alias_from_host("my-app.bhatti.test.", d).as_deref(),
            Some("my-app")
        );
        for bad in [
            "bhatti.test",
            ".bhatti.test",
            "a.b.bhatti.test",
            "my-app.other.test",
            "my-appbhatti.test",
            "-x.bhatti.test",
            "127.0.0.1:8081",
            "[::1]:8081",
            "",
        ] {
            assert_eq!(alias_from_host(bad, d), None, "{bad:?}");
        }
    }

    #[test]
    fn error_pages_say_what_happened() {
        let r = error_page(&ProxyError::NotListening { port: 3000 });
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            error_page(&ProxyError::TooLarge).status(),
            StatusCode::PAYLOAD_TOO_LARGE
        );
        for who in [TooMany::Client, TooMany::App, TooMany::Server] {
            assert_eq!(too_many(who).headers()[header::RETRY_AFTER], "1");
        }
        // A failed route lookup answers as the API would for that failure.
        for e in [
            ServiceError::NotFound("x".into()),
            ServiceError::Unavailable("x".into()),
            ServiceError::Invalid("x".into()),
            ServiceError::Conflict("x".into()),
            ServiceError::Secrets(crate::secrets::SecretsError::Decrypt("x".into())),
            ServiceError::Store(crate::store::StoreError::Invalid("x".into())),
            ServiceError::Busy {
                retry_after_secs: 2,
                message: "x".into(),
            },
        ] {
            let r = route_error_page(&e);
            assert_eq!(r.status(), status_of(e.kind()), "{e:?}");
            assert_eq!(
                crate::api::error::ApiError::from(e).status,
                r.status(),
                "same status as the API"
            );
        }
        assert_eq!(
            route_error_page(&ServiceError::Secrets(
                crate::secrets::SecretsError::Decrypt("x".into())
            ))
            .status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert!(escape("<a&b>").contains("&lt;a&amp;b&gt;"));
    }
}
