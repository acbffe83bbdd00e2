//! `bhatti ps <sandbox>`: the sessions (shells, init script) in a sandbox.

use crate::model::Session;

use super::client::Target;
use super::{output, Ctx};

#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// Sandbox name or ID
    pub sandbox: String,
}

pub async fn run(ctx: Ctx, args: PsArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    let sessions: Vec<Session> = ctx
        .client
        .get_json(&["sandboxes", name, "sessions"], Target::Sandbox(name))
        .await?;
    if ctx.json {
        output::print_json(&sessions)?;
        return Ok(0);
    }
    if sessions.is_empty() {
        eprintln!("no sessions in {name}");
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = sessions
        .iter()
        .map(|s| {
            let status = match (s.running, s.exit_code) {
                (true, _) => "running".to_string(),
                (false, Some(c)) => format!("exited ({c})"),
                (false, None) => "exited".to_string(),
            };
            vec![
                s.session_id.clone(),
                status,
                if s.attached { "yes" } else { "no" }.to_string(),
                if s.tty { "yes" } else { "no" }.to_string(),
                output::unix_time(s.created_at),
                s.argv.clone(),
            ]
        })
        .collect();
    output::print_table(
        &["SESSION", "STATUS", "ATTACHED", "TTY", "CREATED", "COMMAND"],
        &rows,
    )?;
    Ok(0)
}
