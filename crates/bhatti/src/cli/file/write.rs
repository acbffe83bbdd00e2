//! `bhatti file write <sandbox> <path>`: stdin (or `--from FILE`) to a file.
//!
//! The server refuses writes over 100 MiB; the CLI checks first so that an
//! oversized write is refused before anything is sent.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::path::PathBuf;

use anyhow::{bail, Context};
use reqwest::{header, Method};
use serde_json::json;

use super::MAX_WRITE_BYTES;
use crate::cli::client::Target;
use crate::cli::{output, Ctx};

#[derive(Debug, clap::Args)]
pub struct WriteArgs {
    /// Sandbox name or ID
    pub sandbox: String,
    /// Absolute path inside the sandbox
    pub path: String,
    /// Read the content from this local file instead of stdin
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// File mode in octal, e.g. 0755 [default: the server's]
    #[arg(long, value_parser = parse_mode)]
    pub mode: Option<String>,
}

pub async fn run(ctx: Ctx, args: WriteArgs) -> anyhow::Result<i32> {
    let content = match &args.from {
        Some(path) => {
            let file =
                File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
            read_capped(file, &path.display().to_string())?
        }
        None => {
            let stdin = io::stdin();
            let fd = stdin
                .as_fd()
                .try_clone_to_owned()
                .context("cannot use stdin")?;
            read_capped(File::from(fd), "stdin")?
        }
    };
    let name = args.sandbox.as_str();
    let mut query = vec![("path", args.path.as_str())];
    if let Some(m) = &args.mode {
        query.push(("mode", m.as_str()));
    }
    let size = content.len();
    let rb = ctx
        .client
        .request(Method::PUT, &["sandboxes", name, "files"])
        .query(&query)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, size)
        .body(content);
    ctx.client.send(rb, Target::Sandbox(name)).await?;
    if ctx.json {
        output::print_json(&json!({"sandbox": name, "path": args.path, "size": size}))?;
    } else {
        output::println(&format!("wrote {size} bytes to {} in {name}", args.path))?;
    }
    Ok(0)
}

/// Reads everything, refusing more than [`MAX_WRITE_BYTES`]: a regular file
/// is checked by its size before reading, a pipe by reading one byte past
/// the limit.
pub fn read_capped(mut input: File, what: &str) -> anyhow::Result<Vec<u8>> {
    let meta = input
        .metadata()
        .with_context(|| format!("cannot inspect {what}"))?;
    if meta.is_dir() {
        bail!("{what} is a directory");
    }
    if meta.is_file() && meta.len() > MAX_WRITE_BYTES {
        bail!(too_big(what, Some(meta.len())));
    }
    let mut buf = Vec::new();
    (&mut input)
        .take(MAX_WRITE_BYTES + 1)
        .read_to_end(&mut buf)
        .with_context(|| format!("cannot read {what}"))?;
    if buf.len() as u64 > MAX_WRITE_BYTES {
        bail!(too_big(what, None));
    }
    Ok(buf)
}

fn too_big(what: &str, size: Option<u64>) -> String {
    let size = match size {
        Some(s) => format!("{s} bytes"),
        None => "more than that".to_string(),
    };
    format!(
        "{what} is too large to write: file writes are capped at 100 MiB ({MAX_WRITE_BYTES} bytes) \
         and {what} has {size}; nothing was sent"
    )
}

/// Accepts an octal mode like `644` or `0755`.
fn parse_mode(s: &str) -> Result<String, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o7777 && !digits.is_empty() => Ok(format!("{m:04o}")),
        _ => Err(format!("{s:?} is not an octal file mode like 0644")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes() {
        assert_eq!(parse_mode("644").as_deref(), Ok("0644"));
        assert_eq!(parse_mode("0755").as_deref(), Ok("0755"));
        assert!(parse_mode("999").is_err());
        assert!(parse_mode("").is_err());
        assert!(parse_mode("rwx").is_err());
    }

    #[test]
    fn oversized_regular_file_is_refused_without_reading() {
        let f = tempfile::tempfile().expect("tempfile");
        f.set_len(MAX_WRITE_BYTES + 1).expect("sparse");
        let e = read_capped(f, "big.bin").expect_err("too big").to_string();
        assert!(e.contains("100 MiB"), "{e}");
        assert!(e.contains("nothing was sent"), "{e}");
        let f = tempfile::tempfile().expect("tempfile");
        f.set_len(MAX_WRITE_BYTES).expect("sparse");
        // Exactly the limit is allowed (not read here: 100 MiB of zeros is fine but slow).
        assert!(f.metadata().expect("meta").len() <= MAX_WRITE_BYTES);
    }
}
