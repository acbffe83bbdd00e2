//! `bhatti secret set NAME [VALUE]`.

use std::io::{self, IsTerminal, Read};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::json;

use crate::cli::client::Target;
use crate::cli::{output, terminal, Ctx};

#[derive(Debug, clap::Args)]
pub struct SetArgs {
    /// Secret name (an environment variable name, e.g. API_KEY)
    pub name: String,
    /// The value; when omitted it is read from stdin (prompted without echo on a terminal)
    pub value: Option<String>,
}

#[derive(Serialize)]
struct SecretBody<'a> {
    name: &'a str,
    value: &'a str,
}

pub async fn run(ctx: Ctx, args: SetArgs) -> anyhow::Result<i32> {
    let value = match args.value {
        Some(v) => v,
        None if io::stdin().is_terminal() => {
            match terminal::prompt_hidden(&format!("value for {} (input hidden): ", args.name))? {
                Some(v) => v,
                None => bail!("no value given for secret {}", args.name),
            }
        }
        None => {
            let mut v = String::new();
            io::stdin()
                .read_to_string(&mut v)
                .context("cannot read the secret value from stdin (it must be UTF-8 text)")?;
            // `echo value | bhatti secret set X` should not store the newline.
            let trimmed = v.strip_suffix('\n').unwrap_or(&v);
            trimmed.strip_suffix('\r').unwrap_or(trimmed).to_string()
        }
    };
    let body = SecretBody {
        name: &args.name,
        value: &value,
    };
    let resp = ctx
        .client
        .send(
            ctx.client
                .request(reqwest::Method::POST, &["secrets"])
                .json(&body),
            Target::None,
        )
        .await?;
    drop(resp);
    if ctx.json {
        output::print_json(&json!({"name": args.name, "set": true}))?;
    } else {
        output::println(&format!("secret {} set", args.name))?;
    }
    Ok(0)
}
