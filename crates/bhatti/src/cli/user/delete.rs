//! `bhatti user delete NAME`.

use clap::Args;

use crate::store::{Store, StoreError};

#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// User to delete (with their secrets); refused while they have sandboxes
    pub name: String,
}

pub fn run(store: &Store, args: DeleteArgs, json: bool) -> anyhow::Result<i32> {
    match store.delete_user(&args.name) {
        Ok(()) => {}
        Err(StoreError::Conflict(msg)) => {
            anyhow::bail!("cannot delete user {}: {msg}", args.name)
        }
        Err(e) => return Err(e.into()),
    }
    if json {
        println!(
            "{}",
            serde_json::json!({ "name": args.name, "deleted": true })
        );
    } else {
        println!("deleted user {}", args.name);
    }
    Ok(0)
}
