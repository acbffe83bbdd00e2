//! `bhatti secret delete NAME`.

use serde_json::json;

use crate::cli::client::Target;
use crate::cli::{output, Ctx};

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Secret name
    pub name: String,
}

pub async fn run(ctx: Ctx, args: DeleteArgs) -> anyhow::Result<i32> {
    ctx.client
        .delete(&["secrets", &args.name], Target::None)
        .await?;
    if ctx.json {
        output::print_json(&json!({"name": args.name, "deleted": true}))?;
    } else {
        output::println(&format!("secret {} deleted", args.name))?;
    }
    Ok(0)
}
