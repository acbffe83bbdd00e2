//! `bhatti user create --name NAME [--max-sandboxes N] [--max-cpus N] [--max-memory MB] [--max-storage MB]`.

use clap::Args;

use crate::store::{validate_user_name, Store, UserLimits};

use super::list::format_time;

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// User name (must be unique; [a-zA-Z0-9][a-zA-Z0-9._-]{0,62})
    #[arg(long)]
    pub name: String,
    /// Maximum concurrent sandboxes
    #[arg(long, default_value_t = 5)]
    pub max_sandboxes: u32,
    /// Maximum vCPUs per sandbox
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_cpus: u32,
    /// Maximum memory (MB) per sandbox
    #[arg(long, default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_memory: u32,
    /// Storage quota (MB): the total size of the user's volumes
    #[arg(long, default_value_t = 20480)]
    pub max_storage: u64,
}

pub fn run(store: &Store, args: CreateArgs, json: bool) -> anyhow::Result<i32> {
    validate_user_name(&args.name)?;
    let limits = UserLimits {
        max_sandboxes: args.max_sandboxes,
        max_cpus: args.max_cpus,
        max_memory_mb: args.max_memory,
    };
    let (user, key) = store.create_user(&args.name, limits)?;
    store.set_storage_quota(user.id, args.max_storage)?;
    if json {
        let out = serde_json::json!({
            "id": user.id,
            "name": user.name,
            "api_key": key,
            "max_sandboxes": user.max_sandboxes,
            "max_cpus": user.max_cpus,
            "max_memory_mb": user.max_memory_mb,
            "max_storage_mb": args.max_storage,
            "created_at": format_time(user.created_at),
        });
        println!("{out}");
    } else {
        println!(
            "created user {} (up to {} sandboxes, {} vCPUs and {} MB each)",
            user.name, user.max_sandboxes, user.max_cpus, user.max_memory_mb
        );
        println!("API key: {key}  (shown once)");
    }
    Ok(0)
}
