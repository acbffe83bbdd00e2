//! HTTP client for the bhatti API, as the CLI uses it.
//!
//! It knows the base URL and the API key, and where each came from, so that
//! every failure can be turned into a message a user can act on: an
//! unreachable daemon names the URL tried and its source, a 401 says to check
//! the key or run `bhatti setup`, a 404 on a sandbox route says
//! "no sandbox named X".

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use reqwest::{header, Method, RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::config::{
    ClientConfig, ClientSettings, ConfigError, Resolved, Source, DEFAULT_SOCKET_PATH, SOCKET_ENV,
};

use super::GlobalArgs;

/// How long to wait for a TCP (and TLS) connection to the API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte stream to the API: TCP or the control socket.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A WebSocket to the API (shell, exec), over TCP (maybe TLS) or the
/// control socket.
pub type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<Box<dyn Io>>>;

/// What a request is about, to explain a 404.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// Not about one sandbox (secrets, the sandbox list).
    None,
    /// A route under `/sandboxes/<name or id>`.
    Sandbox(&'a str),
}

/// The CLI's connection to the API.
#[derive(Debug, Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    base: Url,
    url: Resolved<String>,
    token: Option<Resolved<String>>,
    /// Set for https URLs; the shell's WebSocket uses it too.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Set for `unix://` URLs: every connection goes to this socket.
    socket: Option<std::path::PathBuf>,
}

/// Resolves the connection settings from the global flags, the config file
/// (`$HOME/.bhatti/config.yaml`) and the environment.
pub fn resolve_settings(global: &GlobalArgs) -> anyhow::Result<ClientSettings> {
    let (url, token) = (global.url.as_deref(), global.token.as_deref());
    let settings = match ClientConfig::default_path() {
        Ok(path) => ClientSettings::resolve(url, token, Some(&path))?,
        // No home directory: there is no config file, but flags and the
        // environment still work.
        Err(ConfigError::NoHome) => {
            ClientSettings::resolve_with(url, token, None, |k| std::env::var(k).ok())
        }
        Err(e) => return Err(e.into()),
    };
    let socket = std::env::var_os(SOCKET_ENV)
        .filter(|v| !v.is_empty())
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| DEFAULT_SOCKET_PATH.into());
    Ok(settings.prefer_socket(&socket))
}

impl ApiClient {
    /// A client for the settings resolved from the global flags.
    pub fn from_global(global: &GlobalArgs) -> anyhow::Result<Self> {
        Self::new(resolve_settings(global)?)
    }

    /// A client for already-resolved settings; fails when the URL is not an
    /// http(s) URL (the message says where it came from).
    pub fn new(settings: ClientSettings) -> anyhow::Result<Self> {
        let ClientSettings {
            api_url,
            auth_token,
        } = settings;
        let (base, socket) = parse_base_url(&api_url)?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("bhatti-cli/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &socket {
            builder = builder.unix_socket(path.as_path());
        }
        let tls = if base.scheme() == "https" {
            let config = super::tls::client_config()?;
            builder = builder.use_preconfigured_tls((*config).clone());
            Some(config)
        } else {
            None
        };
        let http = builder.build().context("cannot set up the HTTP client")?;
        Ok(Self {
            http,
            base,
            url: api_url,
            token: auth_token,
            tls,
            socket,
        })
    }

    /// The API base URL as configured (no trailing slash).
    pub fn api_url(&self) -> &str {
        &self.url.value
    }

    /// Where the API URL came from.
    pub fn api_url_source(&self) -> &Source {
        &self.url.source
    }

    /// The API key, if one is configured.
    pub fn token(&self) -> Option<&str> {
        self.token.as_ref().map(|t| t.value.as_str())
    }

    /// `base` + the given path segments, each percent-encoded.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http(s) URL always has path segments (checked in parse_base_url)")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// The TLS settings for https URLs (`None` for http).
    pub fn tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// `url(segments)` with `ws`/`wss` instead of `http`/`https`.
    pub fn ws_url(&self, segments: &[&str]) -> Url {
        let mut url = self.url(segments);
        let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
        url.set_scheme(scheme)
            .expect("http(s) and ws(s) are both special schemes, so switching is allowed");
        url
    }

    /// A request to `segments` with the API key as a bearer token.
    pub fn request(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        self.request_url(method, self.url(segments))
    }

    /// An authenticated request to `url` (one of [`url`](Self::url)'s, with a query).
    pub fn request_url(&self, method: Method, url: Url) -> RequestBuilder {
        let rb = self.http.request(method, url);
        match self.token() {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Sends a request; any failure (transport or non-2xx status) becomes a
    /// clear error.
    pub async fn send(&self, rb: RequestBuilder, target: Target<'_>) -> anyhow::Result<Response> {
        let resp = rb.send().await.map_err(|e| self.transport_error(&e))?;
        self.check(resp, target).await
    }

    /// Turns a non-2xx response into an error; passes a 2xx through.
    pub async fn check(&self, resp: Response, target: Target<'_>) -> anyhow::Result<Response> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let path = resp.url().path().to_string();
        let body = resp.bytes().await.unwrap_or_default();
        Err(self.status_error(status, &body, target, &path).await)
    }

    /// `GET` and decode the JSON answer.
    pub async fn get_json<T: DeserializeOwned>(
        &self,
        segments: &[&str],
        target: Target<'_>,
    ) -> anyhow::Result<T> {
        let resp = self
            .send(self.request(Method::GET, segments), target)
            .await?;
        self.decode(resp).await
    }

    /// `POST` a JSON body and decode the JSON answer.
    pub async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        segments: &[&str],
        body: &B,
        target: Target<'_>,
    ) -> anyhow::Result<T> {
        let rb = self.request(Method::POST, segments).json(body);
        let resp = self.send(rb, target).await?;
        self.decode(resp).await
    }

    /// `DELETE`; the answer body is ignored.
    pub async fn delete(&self, segments: &[&str], target: Target<'_>) -> anyhow::Result<()> {
        self.send(self.request(Method::DELETE, segments), target)
            .await
            .map(drop)
    }

    /// Decodes a JSON answer; a body that does not parse is reported with
    /// the URL it came from.
    pub async fn decode<T: DeserializeOwned>(&self, resp: Response) -> anyhow::Result<T> {
        let url = resp.url().clone();
        let bytes = resp.bytes().await.map_err(|e| self.transport_error(&e))?;
        serde_json::from_slice(&bytes).with_context(|| {
            format!(
                "unexpected answer from {url} (is {} a bhatti API?)",
                self.url.value
            )
        })
    }

    /// The message for a request that got no HTTP answer at all.
    pub fn transport_error(&self, e: &reqwest::Error) -> anyhow::Error {
        let cause = root_cause(e);
        if e.is_timeout() {
            anyhow!(
                "timed out talking to {} (from {}): {cause}",
                self.url.value,
                self.url.source
            )
        } else if e.is_connect() {
            self.unreachable(&cause)
        } else if e.is_body() || e.is_decode() {
            anyhow!(
                "the connection to {} (from {}) broke: {cause}",
                self.url.value,
                self.url.source
            )
        } else {
            anyhow!(
                "request to {} (from {}) failed: {cause}",
                self.url.value,
                self.url.source
            )
        }
    }

    /// "cannot reach <url> (from <source>)", with a hint how to fix it.
    pub fn unreachable(&self, cause: &str) -> anyhow::Error {
        // The control socket is the daemon's root-only door (mode 0600):
        // "is the daemon running?" would send a non-root user the wrong way.
        if self.socket.is_some() && cause.to_ascii_lowercase().contains("permission denied") {
            return anyhow!(
                "cannot use the control socket {} (from {}): {cause}; it is for root only. \
                 Run the CLI as root, or point it at the daemon's HTTP API with --url and an \
                 API key (`bhatti setup`, or {} and {})",
                self.url.value,
                self.url.source,
                crate::config::URL_ENV,
                crate::config::TOKEN_ENV
            );
        }
        anyhow!(
            "cannot reach {} (from {}): {cause}; is the daemon running? \
             Point the CLI at it with --url, `bhatti setup` or {}",
            self.url.value,
            self.url.source,
            crate::config::URL_ENV
        )
    }

    /// The message for a non-2xx answer. A 404 on a sandbox route checks
    /// whether the sandbox itself exists, to say "no sandbox named X"
    /// instead of a bare "not found". `path` is the request's URL path.
    pub async fn status_error(
        &self,
        status: StatusCode,
        body: &[u8],
        target: Target<'_>,
        path: &str,
    ) -> anyhow::Error {
        let server_msg = server_message(body);
        match status {
            StatusCode::UNAUTHORIZED => self.unauthorized(),
            StatusCode::NOT_FOUND => {
                if let Target::Sandbox(name) = target {
                    if !self.sandbox_exists(name).await.unwrap_or(true) {
                        return anyhow!("no sandbox named {name}");
                    }
                }
                anyhow!(server_msg.unwrap_or_else(|| format!(
                    "{} has no {path} (404); is the daemon older than this CLI?",
                    self.url.value
                )))
            }
            _ => match server_msg {
                Some(m) => anyhow!(m),
                None => anyhow!(
                    "{} answered {status}{}",
                    self.url.value,
                    if status.is_server_error() {
                        "; check the daemon's log"
                    } else {
                        ""
                    }
                ),
            },
        }
    }

    /// A 401: no key configured, or the key was rejected. The server's own
    /// wording is not repeated; the hint here covers it.
    fn unauthorized(&self) -> anyhow::Error {
        match &self.token {
            None => anyhow!(
                "{} requires an API key and none is configured; run `bhatti setup`, \
                 pass --token or set {}",
                self.url.value,
                crate::config::TOKEN_ENV
            ),
            Some(t) => anyhow!(
                "{} rejected the API key (from {}); check the key or run `bhatti setup`",
                self.url.value,
                t.source
            ),
        }
    }

    /// `Ok(false)` only when the API says 404 for the sandbox itself.
    async fn sandbox_exists(&self, name: &str) -> anyhow::Result<bool> {
        let resp = self
            .request(Method::GET, &["sandboxes", name])
            .send()
            .await?;
        Ok(resp.status() != StatusCode::NOT_FOUND)
    }

    /// A plain request without the API key (for `/health`).
    /// Opens a WebSocket to `url` with bearer auth; an HTTP refusal becomes
    /// the same message as for a plain request.
    pub async fn websocket(&self, url: Url, target: Target<'_>) -> anyhow::Result<WsStream> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::http::{header as ws_header, HeaderValue};
        use tokio_tungstenite::tungstenite::Error as WsError;
        let mut req = url
            .as_str()
            .into_client_request()
            .with_context(|| format!("cannot open a WebSocket to {url}"))?;
        if let Some(t) = self.token() {
            let value = HeaderValue::from_str(&format!("Bearer {t}")).map_err(|_| {
                anyhow!("the API key contains characters that cannot be sent in a header")
            })?;
            req.headers_mut().insert(ws_header::AUTHORIZATION, value);
        }
        let connector = self.tls().map(tokio_tungstenite::Connector::Rustls);
        let stream = match self.connect().await {
            Ok(s) => s,
            Err(e) => return Err(self.unreachable(&e.to_string())),
        };
        match tokio_tungstenite::client_async_tls_with_config(req, stream, None, connector).await {
            Ok((ws, _)) => Ok(ws),
            Err(WsError::Http(resp)) => {
                let status =
                    StatusCode::from_u16(resp.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
                let body = resp.body().clone().unwrap_or_default();
                Err(self.status_error(status, &body, target, url.path()).await)
            }
            Err(WsError::Io(e)) => Err(self.unreachable(&e.to_string())),
            Err(WsError::Url(e)) => Err(anyhow!("cannot open a WebSocket to {url}: {e}")),
            Err(e) => Err(anyhow!(
                "cannot open a WebSocket to {} via {}: {e}",
                url.path(),
                self.api_url()
            )),
        }
    }

    /// A connection to the API: the control socket, or TCP to the URL's
    /// host and port (with TCP_NODELAY; TLS, if any, is the caller's).
    async fn connect(&self) -> std::io::Result<Box<dyn Io>> {
        let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out");
        if let Some(path) = &self.socket {
            let s = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::UnixStream::connect(path))
                .await
                .map_err(|_| timed_out())??;
            return Ok(Box::new(s));
        }
        let host = self.base.host_str().unwrap_or("localhost");
        // IPv6 literals come bracketed in URLs.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = self.base.port_or_known_default().unwrap_or(80);
        let s = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((host, port)),
        )
        .await
        .map_err(|_| timed_out())??;
        let _ = s.set_nodelay(true);
        Ok(Box::new(s))
    }

    pub fn request_unauthenticated(&self, method: Method, segments: &[&str]) -> RequestBuilder {
        self.http.request(method, self.url(segments))
    }

    /// Adds `Accept` for NDJSON streams.
    pub fn accept_ndjson(rb: RequestBuilder) -> RequestBuilder {
        rb.header(header::ACCEPT, "application/x-ndjson")
    }
}

/// Parses and checks the configured base URL. `unix:///path/to/api.sock`
/// is the control socket: requests then go to `http://localhost` over it.
fn parse_base_url(url: &Resolved<String>) -> anyhow::Result<(Url, Option<std::path::PathBuf>)> {
    if let Some(path) = url.value.strip_prefix("unix://") {
        if !path.starts_with('/') {
            return Err(anyhow!(
                "invalid API URL {:?} (from {}): a control socket is unix:// and an absolute path, like unix:///var/lib/bhatti/api.sock",
                url.value,
                url.source
            ));
        }
        let base = Url::parse("http://localhost/").expect("a valid constant URL");
        return Ok((base, Some(std::path::PathBuf::from(path))));
    }
    parse_http_url(url).map(|u| (u, None))
}

fn parse_http_url(url: &Resolved<String>) -> anyhow::Result<Url> {
    let parsed = Url::parse(&url.value).map_err(|e| {
        anyhow!(
            "invalid API URL {:?} (from {}): {e}; use a URL like http://127.0.0.1:8080",
            url.value,
            url.source
        )
    })?;
    match parsed.scheme() {
        "http" | "https" if parsed.host().is_some() => Ok(parsed),
        _ => Err(anyhow!(
            "invalid API URL {:?} (from {}): use an http:// or https:// URL like http://127.0.0.1:8080",
            url.value,
            url.source
        )),
    }
}

/// The `error` field of a JSON error body, or a short plain-text body.
pub fn server_message(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    if let Ok(e) = serde_json::from_slice::<ErrorBody>(body) {
        return Some(e.error);
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    (!text.is_empty() && text.len() <= 300 && !text.starts_with('<')).then(|| text.to_string())
}

/// The innermost cause of an error chain ("Connection refused (os error 111)").
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(url: &str, source: Source) -> ApiClient {
        ApiClient::new(ClientSettings {
            api_url: Resolved {
                value: url.to_string(),
                source,
            },
            auth_token: None,
        })
        .expect("client")
    }

    #[test]
    fn urls_are_percent_encoded_and_keep_a_base_path() {
        let c = client("http://127.0.0.1:8080", Source::Default);
        assert_eq!(
            c.url(&["sandboxes", "dev", "files"]).as_str(),
            "http://127.0.0.1:8080/sandboxes/dev/files"
        );
        assert_eq!(
            c.url(&["sandboxes", "a b/c"]).as_str(),
            "http://127.0.0.1:8080/sandboxes/a%20b%2Fc"
        );
        let c = client("https://example.com/api/", Source::Flag);
        assert_eq!(
            c.url(&["health"]).as_str(),
            "https://example.com/api/health"
        );
        assert_eq!(
            c.ws_url(&["sandboxes", "dev", "ws"]).as_str(),
            "wss://example.com/api/sandboxes/dev/ws"
        );
        let c = client("http://127.0.0.1:1", Source::Flag);
        assert_eq!(c.ws_url(&["x"]).as_str(), "ws://127.0.0.1:1/x");
    }

    #[test]
    fn bad_urls_name_their_source() {
        for bad in ["localhost:8080", "ftp://x", "nonsense", "http://"] {
            let e = ApiClient::new(ClientSettings {
                api_url: Resolved {
                    value: bad.to_string(),
                    source: Source::Env("BHATTI_URL"),
                },
                auth_token: None,
            })
            .expect_err(bad)
            .to_string();
            assert!(e.contains("BHATTI_URL"), "{bad}: {e}");
            assert!(e.contains("invalid API URL"), "{bad}: {e}");
        }
    }

    #[test]
    fn server_messages() {
        assert_eq!(
            server_message(br#"{"error":"name taken"}"#).as_deref(),
            Some("name taken")
        );
        assert_eq!(
            server_message(b"plain words\n").as_deref(),
            Some("plain words")
        );
        assert_eq!(server_message(b"<html>nope</html>"), None);
        assert_eq!(server_message(b""), None);
    }
}
