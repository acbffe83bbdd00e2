//! `bhatti image list|save|import|delete`: custom base images through the
//! API (`bhatti image build` is the operator's local command, in `image.rs`).

use std::io::IsTerminal;
use std::path::PathBuf;

use futures_util::TryStreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::model::images::{Image, Task};

use super::client::Target;
use super::{output, Ctx};

/// The API side of `bhatti image`.
#[derive(Debug)]
pub enum Remote {
    List,
    Save {
        sandbox: String,
        name: String,
    },
    Import {
        name: String,
        tar: PathBuf,
    },
    Delete {
        name: String,
    },
    Pull {
        reference: String,
        name: Option<String>,
    },
}

#[derive(Serialize)]
struct PullBody<'a> {
    reference: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

#[derive(Serialize)]
struct SaveBody<'a> {
    sandbox: &'a str,
    name: &'a str,
}

fn bar(len: Option<u64>, msg: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = match len {
        Some(n) => {
            let pb = ProgressBar::new(n);
            pb.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            pb
        }
        None => {
            let pb = ProgressBar::new_spinner();
            pb.enable_steady_tick(std::time::Duration::from_millis(120));
            pb
        }
    };
    pb.set_message(msg.to_string());
    Some(pb)
}

fn print_one(ctx: &Ctx, img: &Image, verb: &str) -> anyhow::Result<()> {
    if ctx.json {
        output::print_json(img)
    } else {
        output::println(&format!(
            "image {} {verb} ({}); boot it with `bhatti create --image {}`",
            img.name,
            output::human_size(img.size_bytes),
            img.name
        ))
    }
}

pub async fn run(ctx: Ctx, cmd: Remote) -> anyhow::Result<i32> {
    match cmd {
        Remote::List => {
            let list: Vec<Image> = ctx.client.get_json(&["images"], Target::None).await?;
            if ctx.json {
                output::print_json(&list)?;
                return Ok(0);
            }
            if list.is_empty() {
                eprintln!("no images; make one with `bhatti image save SANDBOX --name NAME` or `bhatti image import`");
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = list
                .iter()
                .map(|i| {
                    vec![
                        i.name.clone(),
                        i.owner.clone(),
                        i.source.clone(),
                        output::human_size(i.size_bytes),
                        output::rfc3339(&i.created_at),
                    ]
                })
                .collect();
            output::print_table(&["NAME", "OWNER", "SOURCE", "SIZE", "CREATED"], &rows)?;
        }
        Remote::Save { sandbox, name } => {
            let pb = bar(None, &format!("saving {sandbox} as {name}"));
            let r: anyhow::Result<Image> = ctx
                .client
                .post_json(
                    &["images", "save"],
                    &SaveBody {
                        sandbox: &sandbox,
                        name: &name,
                    },
                    Target::Sandbox(&sandbox),
                )
                .await;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            print_one(&ctx, &r?, "saved")?;
        }
        Remote::Import { name, tar } => {
            let file = tokio::fs::File::open(&tar)
                .await
                .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", tar.display()))?;
            let len = file.metadata().await?.len();
            let pb = bar(Some(len), &format!("uploading {}", tar.display()));
            let counter = pb.clone();
            let stream = tokio_util::io::ReaderStream::new(file).inspect_ok(move |chunk| {
                if let Some(pb) = &counter {
                    pb.inc(chunk.len() as u64);
                }
            });
            let mut url = ctx.client.url(&["images", "import"]);
            url.query_pairs_mut().append_pair("name", &name);
            let rb = ctx
                .client
                .request_url(reqwest::Method::POST, url)
                .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
                .header(reqwest::header::CONTENT_LENGTH, len)
                .body(reqwest::Body::wrap_stream(stream));
            let result = async {
                let resp = ctx.client.send(rb, Target::None).await?;
                ctx.client.decode::<Image>(resp).await
            };
            // Unpacking takes a while after the last byte: say so.
            let r = result.await;
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            print_one(&ctx, &r?, "imported")?;
        }
        Remote::Pull { reference, name } => {
            let mut task: Task = ctx
                .client
                .post_json(
                    &["images", "pull"],
                    &PullBody {
                        reference: &reference,
                        name: name.as_deref(),
                    },
                    Target::None,
                )
                .await?;
            let pb = bar(Some(0), &format!("pulling {reference}"));
            while task.state == "running" {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                task = ctx
                    .client
                    .get_json(&["tasks", &task.id], Target::None)
                    .await?;
                if let Some(pb) = &pb {
                    pb.set_length(task.bytes_total);
                    pb.set_position(task.bytes_done);
                    if task.bytes_total > 0 && task.bytes_done >= task.bytes_total {
                        pb.set_message(format!("importing {reference}"));
                    }
                }
            }
            if let Some(pb) = pb {
                pb.finish_and_clear();
            }
            match (task.image, task.error) {
                (Some(img), _) => print_one(&ctx, &img, "pulled")?,
                (None, e) => anyhow::bail!(
                    "pull of {reference} failed: {}",
                    e.unwrap_or_else(|| "no reason given".into())
                ),
            }
        }
        Remote::Delete { name } => {
            ctx.client.delete(&["images", &name], Target::None).await?;
            if !ctx.json {
                output::println(&format!("image {name} deleted"))?;
            }
        }
    }
    Ok(0)
}
