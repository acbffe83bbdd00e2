//! `bhatti file read <sandbox> <path>`: raw bytes to stdout.

use std::io::{self, Write};

use anyhow::Context;
use futures_util::StreamExt;
use reqwest::Method;

use crate::cli::client::Target;
use crate::cli::Ctx;

#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// Absolute path inside the sandbox
    pub path: String,
}

pub async fn run(ctx: Ctx, args: ReadArgs) -> anyhow::Result<i32> {
    let name = args.sandbox.as_str();
    let rb = ctx
        .client
        .request(Method::GET, &["sandboxes", name, "files"])
        .query(&[("path", args.path.as_str())]);
    let resp = ctx.client.send(rb, Target::Sandbox(name)).await?;
    let mut body = resp.bytes_stream();
    let mut out = io::stdout().lock();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| ctx.client.transport_error(&e))?;
        match out.write_all(&chunk) {
            // `bhatti file read … | head`: the reader has all it wants.
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Ok(0),
            r => r.context("cannot write to stdout")?,
        }
    }
    match out.flush() {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(0),
        r => r.context("cannot write to stdout").map(|()| 0),
    }
}
