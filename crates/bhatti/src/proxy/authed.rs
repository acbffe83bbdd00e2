//! The authenticated proxy, `ANY /sandboxes/:id/proxy/:port/*path`: the
//! same relay as the public proxy, for API users. The app sees `/<path>`
//! with the original query (minus our `token`), `Host: localhost:<port>`
//! (dev servers accept it), and never the caller's API key.

use std::net::SocketAddr;

use axum::body::Body;
use axum::http::{Request, Response};

use super::relay::{relay, Forwarded};
use super::{ProxyError, Target, UpstreamPool};

/// Relays an API request to `target`; `path` is the part after the port.
pub async fn forward(
    pool: &UpstreamPool,
    target: &Target,
    req: Request<Body>,
    path: &str,
    client: Option<SocketAddr>,
) -> Result<Response<Body>, ProxyError> {
    let upstream = upstream_target(path, req.uri().query());
    let fwd = Forwarded {
        client,
        proto: "http",
        host: Some(format!("localhost:{}", target.port)),
        strip_authorization: true,
    };
    relay(pool, target, req, &upstream, &fwd).await
}

/// `/<path>?<query without token=…>`.
pub fn upstream_target(path: &str, query: Option<&str>) -> String {
    let mut out = format!("/{}", path.trim_start_matches('/'));
    let kept: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty() && *kv != "token" && !kv.starts_with("token="))
        .collect();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(upstream_target("", None), "/");
        assert_eq!(
            upstream_target("a/b.html", Some("x=1&y=2")),
            "/a/b.html?x=1&y=2"
        );
        assert_eq!(
            upstream_target("ws", Some("token=bht_x&room=1")),
            "/ws?room=1"
        );
        assert_eq!(upstream_target("dir/", Some("token=bht_x")), "/dir/");
    }
}
