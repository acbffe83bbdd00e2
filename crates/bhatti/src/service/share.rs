//! Web terminal shares: a revocable per-sandbox token that opens the
//! sandbox's terminal in a browser without an API key.
//!
//! The token lives in the store as a hash ([`crate::store::ShareRecord`]);
//! [`ShareHub`] holds what only the running daemon knows: which web
//! terminals are open (a few per sandbox at most), how to close them when
//! the share is revoked or replaced, and the per-address budget of
//! connection attempts.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::ToSchema;

use super::{rfc3339, Result, Service, ServiceError};
use crate::rate_limit::KeyedLimit;
use crate::store::User;

/// Web terminals open at once on one sandbox.
pub const MAX_WEB_TERMINALS: usize = 4;
/// WebSocket connection attempts per second from one client address
/// (bursting to this many after an idle second).
pub const SHARE_ATTEMPTS_PER_SEC: u32 = 3;

/// A new share, as `POST /sandboxes/{id}/share` returns it. The token is
/// shown only here; the server keeps its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ShareInfo {
    pub sandbox_id: String,
    /// `bsh_…`; whoever holds it can use the sandbox's terminal.
    pub token: String,
    /// Path and fragment of the web terminal, to append to the API URL:
    /// `/_shell/<id>#token=<token>` (a fragment never reaches the server's logs).
    pub path: String,
    /// RFC 3339.
    pub created_at: String,
}

/// Whether a sandbox is shared, as `GET /sandboxes/{id}/share` returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ShareStatus {
    pub sandbox_id: String,
    /// RFC 3339.
    pub created_at: String,
    /// Web terminals open now.
    pub open_terminals: usize,
}

/// Why a web terminal was refused after its token was checked.
#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    /// Unknown sandbox, wrong token, or a revoked or replaced share.
    #[error("this share link is invalid or has been revoked")]
    Invalid,
    /// [`MAX_WEB_TERMINALS`] are open already.
    #[error("too many web terminals are open on this sandbox (at most {MAX_WEB_TERMINALS})")]
    TooMany,
    #[error(transparent)]
    Service(#[from] ServiceError),
}

#[derive(Default)]
struct Entry {
    /// Bumped when the share is revoked or replaced; open terminals watch it.
    generation: Option<watch::Sender<u64>>,
    open: usize,
}

/// In-memory side of shares: open terminals and attempt budgets.
pub struct ShareHub {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    attempts: KeyedLimit<IpAddr>,
}

impl Default for ShareHub {
    fn default() -> Self {
        ShareHub {
            entries: Arc::default(),
            attempts: KeyedLimit::per_second(SHARE_ATTEMPTS_PER_SEC),
        }
    }
}

impl ShareHub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one connection attempt from `addr`; false when over budget.
    pub fn allow_attempt(&self, addr: IpAddr) -> bool {
        self.attempts.allow(&addr)
    }

    /// Closes every web terminal open on the sandbox.
    fn close_all(&self, sandbox_id: &str) {
        if let Some(tx) = self
            .lock()
            .get(sandbox_id)
            .and_then(|e| e.generation.as_ref())
        {
            tx.send_modify(|g| *g += 1);
        }
    }

    fn open_count(&self, sandbox_id: &str) -> usize {
        self.lock().get(sandbox_id).map_or(0, |e| e.open)
    }

    /// Takes one of the sandbox's terminal slots.
    fn acquire(&self, sandbox_id: &str) -> std::result::Result<TerminalSlot, ShareError> {
        let mut map = self.lock();
        let entry = map.entry(sandbox_id.to_string()).or_default();
        if entry.open >= MAX_WEB_TERMINALS {
            return Err(ShareError::TooMany);
        }
        entry.open += 1;
        let tx = entry.generation.get_or_insert_with(|| watch::channel(0).0);
        Ok(TerminalSlot {
            entries: self.entries.clone(),
            sandbox_id: sandbox_id.to_string(),
            closed: tx.subscribe(),
        })
    }
}

/// One open web terminal: frees its slot when dropped.
pub struct TerminalSlot {
    entries: Arc<Mutex<HashMap<String, Entry>>>,
    sandbox_id: String,
    closed: watch::Receiver<u64>,
}

impl TerminalSlot {
    /// Completes when the share this terminal was opened with is revoked
    /// or replaced.
    pub async fn revoked(&mut self) {
        // An error means the hub dropped the sender: nothing will revoke it.
        if self.closed.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for TerminalSlot {
    fn drop(&mut self) {
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = map.get_mut(&self.sandbox_id) {
            e.open = e.open.saturating_sub(1);
            if e.open == 0 {
                map.remove(&self.sandbox_id);
            }
        }
    }
}

impl Service {
    /// Mints a share for the sandbox, replacing (and disconnecting) any
    /// previous one. 404 for an unknown sandbox.
    pub async fn share(&self, user: &User, id: &str) -> Result<ShareInfo> {
        let rec = self.find(user, id).await?;
        let sid = rec.id.clone();
        let (token, share) = self.store.call(move |s| s.create_share(&sid)).await?;
        self.shares.close_all(&rec.id);
        tracing::info!(sandbox = %rec.id, "web terminal shared");
        Ok(ShareInfo {
            path: format!("/_shell/{}#token={token}", rec.id),
            sandbox_id: rec.id,
            token,
            created_at: rfc3339(share.created_at),
        })
    }

    /// The sandbox's share; 404 when it has none.
    pub async fn share_status(&self, user: &User, id: &str) -> Result<ShareStatus> {
        let rec = self.find(user, id).await?;
        let sid = rec.id.clone();
        let share = self
            .store
            .call(move |s| s.get_share(&sid))
            .await?
            .ok_or_else(|| ServiceError::NotFound(format!("sandbox {} is not shared", rec.name)))?;
        Ok(ShareStatus {
            open_terminals: self.shares.open_count(&rec.id),
            sandbox_id: rec.id,
            created_at: rfc3339(share.created_at),
        })
    }

    /// Ends the sandbox's share (if any) and closes its open web terminals.
    pub async fn revoke_share(&self, user: &User, id: &str) -> Result<()> {
        let rec = self.find(user, id).await?;
        let sid = rec.id.clone();
        let had = self.store.call(move |s| s.delete_share(&sid)).await?;
        self.shares.close_all(&rec.id);
        tracing::info!(sandbox = %rec.id, had_share = had, "web terminal share revoked");
        Ok(())
    }

    /// Counts a web terminal connection attempt from `addr`; false when it
    /// is over [`SHARE_ATTEMPTS_PER_SEC`].
    pub fn allow_share_attempt(&self, addr: IpAddr) -> bool {
        self.shares.allow_attempt(addr)
    }

    async fn check_share_token(
        &self,
        sandbox_id: &str,
        token: &str,
    ) -> std::result::Result<(), ShareError> {
        let (sid, tok) = (sandbox_id.to_string(), token.to_string());
        let valid = self
            .store
            .call(move |s| s.share_token_valid(&sid, &tok))
            .await
            .map_err(ServiceError::from)?;
        if valid {
            Ok(())
        } else {
            Err(ShareError::Invalid)
        }
    }

    /// Checks a share token and opens a terminal slot: the agent of the
    /// sandbox (woken if stopped) and the slot, which ends when the share
    /// is revoked.
    pub async fn open_shared_terminal(
        &self,
        sandbox_id: &str,
        token: &str,
        open: &super::sessions::ShellOpen,
    ) -> std::result::Result<(super::sessions::Shell, TerminalSlot), ShareError> {
        self.check_share_token(sandbox_id, token).await?;
        let slot = self.shares.acquire(sandbox_id)?;
        // Again, now that the slot watches for revocations: a revoke that
        // landed between the first check and the slot is caught here.
        self.check_share_token(sandbox_id, token).await?;
        let sid = sandbox_id.to_string();
        let rec = self
            .store
            .call(move |s| s.get_sandbox(&sid))
            .await
            .map_err(|_| ShareError::Invalid)?;
        let uid = rec.user_id;
        let user = self
            .store
            .call(move |s| s.get_user(uid))
            .await
            .map_err(ServiceError::from)?;
        let shell = self.open_shell(&user, &rec.id, open).await?;
        Ok((shell, slot))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn slots_are_limited_freed_and_revoked() {
        let hub = ShareHub::default();
        let mut slots: Vec<_> = (0..MAX_WEB_TERMINALS)
            .map(|_| hub.acquire("sb_a").expect("slot"))
            .collect();
        assert!(matches!(hub.acquire("sb_a"), Err(ShareError::TooMany)));
        assert_eq!(hub.open_count("sb_a"), MAX_WEB_TERMINALS);
        // Another sandbox has its own slots.
        let mut other = hub.acquire("sb_b").expect("other sandbox");
        slots.pop();
        assert_eq!(hub.open_count("sb_a"), MAX_WEB_TERMINALS - 1);
        let mut late = hub.acquire("sb_a").expect("a freed slot");

        hub.close_all("sb_a");
        for s in slots.iter_mut().chain(std::iter::once(&mut late)) {
            tokio::time::timeout(Duration::from_secs(1), s.revoked())
                .await
                .expect("revoked");
        }
        let not_revoked = tokio::time::timeout(Duration::from_millis(50), other.revoked()).await;
        assert!(not_revoked.is_err(), "sb_b was not revoked");
        drop(slots);
        drop(late);
        assert_eq!(hub.open_count("sb_a"), 0);
        assert!(hub.lock().get("sb_a").is_none(), "no entry left behind");
    }

    #[test]
    fn attempts_are_limited_per_address() {
        let hub = ShareHub::default();
        let a: IpAddr = "192.0.2.1".parse().expect("ip");
        let b: IpAddr = "192.0.2.2".parse().expect("ip");
        let allowed = (0..10).filter(|_| hub.allow_attempt(a)).count();
        assert_eq!(allowed, SHARE_ATTEMPTS_PER_SEC as usize);
        assert!(hub.allow_attempt(b), "another address has its own budget");
    }
}
