//! `bhatti user rotate-key NAME`.

use clap::Args;

use crate::store::Store;

#[derive(Debug, Args)]
pub struct RotateKeyArgs {
    /// User whose key to replace
    pub name: String,
}

pub fn run(store: &Store, args: RotateKeyArgs, json: bool) -> anyhow::Result<i32> {
    let key = store.rotate_key(&args.name)?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "name": args.name, "api_key": key })
        );
    } else {
        println!(
            "rotated the API key of {}; the old key no longer works",
            args.name
        );
        println!("API key: {key}  (shown once)");
    }
    Ok(0)
}
