//! TTY sessions inside a sandbox and the shells attached to them: list,
//! kill, and [`Service::open_shell`], which decides which session a new
//! shell connection attaches to.

use bhatti_proto::{ExecRequest, SessionInfo};

use super::{Result, Service, ServiceError};
use crate::engine::agent_client::{AgentClient, ExecEvent, ExecReader, ExecWriter};
use crate::model::Session;
use crate::store::User;

/// The login shell every new shell session runs.
pub const SHELL_ARGV: [&str; 2] = ["/bin/bash", "-l"];

/// The API view of an agent's session.
pub(super) fn session(s: SessionInfo) -> Session {
    Session {
        session_id: s.session_id,
        argv: s.argv,
        tty: s.tty,
        running: s.running,
        exit_code: s.exit_code,
        attached: s.attached,
        created_at: s.created_at,
    }
}

/// What a shell connection asks for.
#[derive(Debug, Clone, Default)]
pub struct ShellOpen {
    /// Attach to this session; `None`: the newest detached login shell, else a new one.
    pub session: Option<String>,
    /// Terminal size (0 counts as not given).
    pub rows: Option<u16>,
    pub cols: Option<u16>,
}

/// A shell attached to a TTY session. Dropping it detaches: the session
/// runs on with its scrollback. The sandbox stays hot while it lives.
pub struct Shell {
    /// The session, when the agent named it (a new or attached TTY session).
    pub session_id: Option<String>,
    pub output: ShellOutput,
    pub input: ShellInput,
}

/// What the session sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellEvent {
    /// Terminal bytes.
    Output(Vec<u8>),
    /// The session's process ended with this code.
    Exit(i32),
}

/// The terminal output of a [`Shell`].
pub struct ShellOutput(ExecReader);

impl ShellOutput {
    /// The next bytes or the exit.
    ///
    /// Errors: the connection to the agent broke (`Unavailable`).
    pub async fn next(&mut self) -> Result<ShellEvent> {
        Ok(match self.0.next().await? {
            ExecEvent::Stdout(b) | ExecEvent::Stderr(b) => ShellEvent::Output(b),
            ExecEvent::Exit(c) => ShellEvent::Exit(c),
        })
    }
}

/// The keyboard and window of a [`Shell`].
pub struct ShellInput(ExecWriter);

impl ShellInput {
    /// Sends keystrokes.
    pub async fn write(&mut self, data: &[u8]) -> Result<()> {
        Ok(self.0.stdin(data).await?)
    }

    /// Resizes the terminal.
    pub async fn resize(&mut self, rows: u16, cols: u16) -> Result<()> {
        Ok(self.0.resize(rows, cols).await?)
    }
}

impl Service {
    /// The sessions in the sandbox (TTY and piped), as the agent lists them.
    pub async fn list_sessions(&self, user: &User, id: &str) -> Result<Vec<Session>> {
        let agent = self.agent(user, id).await?;
        Ok(agent.sessions().await?.into_iter().map(session).collect())
    }

    /// Ends session `session_id` (SIGTERM, then SIGKILL in the agent).
    ///
    /// Errors: `NotFound` for an unknown sandbox or session.
    pub async fn kill_session(&self, user: &User, id: &str, session_id: &str) -> Result<()> {
        let agent = self.agent(user, id).await?;
        if !agent
            .sessions()
            .await?
            .iter()
            .any(|s| s.session_id == session_id)
        {
            return Err(ServiceError::NotFound(format!(
                "no session {session_id} in sandbox {id}"
            )));
        }
        agent.kill_session(session_id).await?;
        Ok(())
    }

    /// A shell in the sandbox: attached to the requested session, else to
    /// the newest detached login shell, else a new login shell.
    ///
    /// Errors: `NotFound` for an unknown sandbox, or (the agent's refusal)
    /// an explicitly requested session that does not exist.
    pub async fn open_shell(&self, user: &User, id: &str, open: &ShellOpen) -> Result<Shell> {
        let agent = self.agent(user, id).await?;
        attach_shell(&agent, open).await
    }
}

/// [`Service::open_shell`] on an agent the caller holds (also web terminals).
pub(super) async fn attach_shell(agent: &AgentClient, open: &ShellOpen) -> Result<Shell> {
    let (rows, cols) = (open.rows.filter(|r| *r > 0), open.cols.filter(|c| *c > 0));
    let shell_line = SHELL_ARGV.join(" ");
    let mut attach = open.session.clone();
    let explicit = attach.is_some();
    if attach.is_none() {
        let mut detached: Vec<_> = agent
            .sessions()
            .await?
            .into_iter()
            .filter(|s| s.tty && s.running && !s.attached && s.argv == shell_line)
            .collect();
        detached.sort_by_key(|s| s.created_at);
        attach = detached.pop().map(|s| s.session_id);
    }
    if let Some(session_id) = attach {
        let req = ExecRequest {
            argv: vec![],
            tty: true,
            rows,
            cols,
            session_id: Some(session_id),
            if_detached: !explicit,
            ..Default::default()
        };
        match agent.exec(req).await {
            Ok(s) => return Ok(shell_of(s)),
            Err(e) if explicit => return Err(e.into()),
            // Someone attached first: fall through to a new shell.
            Err(_) => {}
        }
    }
    let req = ExecRequest {
        argv: SHELL_ARGV.iter().map(|s| s.to_string()).collect(),
        tty: true,
        rows,
        cols,
        ..Default::default()
    };
    Ok(shell_of(agent.exec(req).await?))
}

fn shell_of(s: crate::engine::agent_client::ExecStream) -> Shell {
    Shell {
        session_id: s.session.map(|s| s.session_id),
        output: ShellOutput(s.reader),
        input: ShellInput(s.writer),
    }
}
