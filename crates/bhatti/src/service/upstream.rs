//! Keep-alive HTTP/1.1 connections to guest ports, shared by both proxies
//! (the service owns the pool and hands it to them at start-up):
//! hyper-util's pooled client over a connector that opens a forward through
//! the sandbox's agent (a TCP connect, an AUTH frame and a dial inside the
//! guest), so an app that keeps connections alive is reused.
//!
//! The client pools by URI authority, `<sandbox id>.<generation>:<port>`.
//! Forgetting a sandbox starts a new generation: its idle connections are
//! never handed out again and close when the idle timeout reaps them (the
//! client can evict no single host at once).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::uri::{Authority, Scheme};
use axum::http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;

use crate::engine::agent_client::{AgentClient, AgentError, BoxStream};

/// Error type of upstream request bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request body type of upstream connections.
pub type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

/// Largest request body either proxy forwards.
pub const MAX_REQUEST_BODY: u64 = 50 * 1024 * 1024;

/// A port inside one sandbox, and how to reach it.
#[derive(Clone)]
pub struct Target {
    pub sandbox_id: String,
    pub port: u16,
    agent: AgentClient,
}

impl Target {
    /// `port` of sandbox `sandbox_id`, reached through `agent`.
    pub fn new(sandbox_id: String, port: u16, agent: AgentClient) -> Target {
        Target {
            sandbox_id,
            port,
            agent,
        }
    }
}

/// Route cache and upstream connections of the proxies, owned by the
/// service so that sandbox lifecycle changes (unpublish, destroy) can
/// invalidate them at once.
#[derive(Default)]
pub struct ProxyState {
    /// `alias` → published target, for the public proxy.
    pub routes: super::routes::RouteCache,
    /// Idle keep-alive connections to guest ports.
    pub pool: Arc<UpstreamPool>,
}

impl ProxyState {
    /// Forgets every route and idle connection of a sandbox.
    pub fn forget_sandbox(&self, sandbox_id: &str) {
        self.routes.forget_sandbox(sandbox_id);
        self.pool.forget_sandbox(sandbox_id);
    }
}

/// Why a request could not be relayed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    /// Nothing accepts connections on the port inside the guest.
    #[error("the app is not listening on port {port} in the sandbox")]
    NotListening { port: u16 },
    /// The sandbox's agent could not be reached.
    #[error("the sandbox cannot be reached: {0}")]
    Unreachable(String),
    /// The request body is over [`MAX_REQUEST_BODY`].
    #[error("request body is larger than {} MiB", MAX_REQUEST_BODY >> 20)]
    TooLarge,
    /// The app accepted the connection but did not answer with valid HTTP.
    #[error("the app on port {port} did not answer: {detail}")]
    Upstream { port: u16, detail: String },
}

impl ProxyError {
    /// The kind of this failure (its status: [`crate::status::status_of`]).
    pub fn kind(&self) -> super::ErrorKind {
        use super::ErrorKind as K;
        match self {
            ProxyError::NotListening { .. } | ProxyError::Upstream { .. } => K::BadGateway,
            ProxyError::Unreachable(_) => K::Unavailable,
            ProxyError::TooLarge => K::TooLarge,
        }
    }
}

/// An idle connection older than this is closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle connections kept per (sandbox, port).
const MAX_IDLE_PER_TARGET: usize = 8;

/// The agent of each sandbox the proxies sent to, under the generation its
/// pooled connections are keyed by.
#[derive(Default)]
struct Agents {
    by_sandbox: Mutex<HashMap<String, (u64, AgentClient)>>,
    next_generation: std::sync::atomic::AtomicU64,
}

impl Agents {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (u64, AgentClient)>> {
        // The map holds no invariant a panic could break.
        self.by_sandbox.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pool host of `target`'s sandbox, remembering its agent (the
    /// latest one: new connections use it).
    fn host_of(&self, target: &Target) -> String {
        let mut map = self.lock();
        let entry = map.entry(target.sandbox_id.clone()).or_insert_with(|| {
            let generation = self
                .next_generation
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (generation, target.agent.clone())
        });
        entry.1 = target.agent.clone();
        format!("{}.{}", target.sandbox_id, entry.0)
    }

    /// The agent for a pool host of the current generation.
    fn agent_for(&self, host: &str) -> Option<AgentClient> {
        let (id, generation) = host.rsplit_once('.')?;
        let generation: u64 = generation.parse().ok()?;
        match self.lock().get(id) {
            Some((g, agent)) if *g == generation => Some(agent.clone()),
            _ => None,
        }
    }
}

/// Opens a new upstream connection: a forward to the URI's port inside the
/// sandbox its host names.
#[derive(Clone)]
struct ForwardConnector {
    agents: Arc<Agents>,
}

impl tower::Service<Uri> for ForwardConnector {
    type Response = TokioIo<ForwardStream>;
    type Error = ProxyError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ProxyError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let port = uri.port_u16().unwrap_or(80);
        let agent = uri.host().and_then(|h| self.agents.agent_for(h));
        Box::pin(async move {
            let agent = agent.ok_or_else(|| {
                ProxyError::Unreachable("the sandbox was stopped or removed".into())
            })?;
            let stream = agent.forward(port).await.map_err(|e| match e {
                AgentError::Remote { .. } => ProxyError::NotListening { port },
                other => ProxyError::Unreachable(other.to_string()),
            })?;
            Ok(TokioIo::new(ForwardStream(stream)))
        })
    }
}

/// A forward as the pooled client's transport.
struct ForwardStream(BoxStream);

impl Connection for ForwardStream {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl AsyncRead for ForwardStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ForwardStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Keep-alive connections by (sandbox, port).
pub struct UpstreamPool {
    client: Client<ForwardConnector, UpstreamBody>,
    agents: Arc<Agents>,
}

impl Default for UpstreamPool {
    fn default() -> Self {
        let agents = Arc::new(Agents::default());
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_PER_TARGET)
            .build(ForwardConnector {
                agents: agents.clone(),
            });
        UpstreamPool { client, agents }
    }
}

impl UpstreamPool {
    /// Sends `req`, whose URI is the origin-form target the app sees, to
    /// `target`: on an idle connection when one is ready, else on a new one.
    /// A request whose pooled connection closed before it was written goes
    /// out again on another.
    ///
    /// Errors: [`ProxyError::NotListening`] and [`ProxyError::Unreachable`]
    /// when no forward could be opened, [`ProxyError::Upstream`] when the
    /// app's answer was not HTTP.
    pub async fn send(
        &self,
        target: &Target,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let port = target.port;
        let host = self.agents.host_of(target);
        let bad_target = |detail: String| ProxyError::Upstream { port, detail };
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(
            Authority::try_from(format!("{host}:{port}"))
                .map_err(|e| bad_target(format!("sandbox id {:?}: {e}", target.sandbox_id)))?,
        );
        *req.uri_mut() =
            Uri::from_parts(parts).map_err(|e| bad_target(format!("request target: {e}")))?;
        self.client.request(req).await.map_err(|e| {
            use std::error::Error;
            // The connector's own error comes back as the source.
            if let Some(pe) = e.source().and_then(|s| s.downcast_ref::<ProxyError>()) {
                return pe.clone();
            }
            // hyper's error says what was wrong with the answer.
            let mut detail = e.to_string();
            let mut cause = e.source();
            while let Some(c) = cause {
                if let Some(h) = c.downcast_ref::<hyper::Error>() {
                    detail = h.to_string();
                    break;
                }
                cause = c.source();
            }
            ProxyError::Upstream { port, detail }
        })
    }

    /// Stops handing out the idle connections to a sandbox (they close
    /// within the idle timeout).
    pub fn forget_sandbox(&self, sandbox_id: &str) {
        self.agents.lock().remove(sandbox_id);
    }
}
