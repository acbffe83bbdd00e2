//! Command-line interface: one file per command.
//!
//! `Cli` is parsed in main.rs; each subcommand's work lives in its own file.
//! Client commands talk to the daemon's HTTP API through [`client::ApiClient`];
//! they run on a small tokio runtime built here.

use std::future::Future;

use clap::{Parser, Subcommand};

pub mod client;
pub mod completion;
pub mod create;
pub mod destroy;
pub mod doctor;
pub mod edit;
pub mod exec;
pub mod file;
pub mod image;
pub mod image_client;
pub mod inspect;
pub mod list;
pub mod output;
pub mod ports;
pub mod ps;
pub mod publish;
pub mod secret;
pub mod serve;
pub mod setup;
pub mod share;
pub mod shell;
pub mod snapshot;
pub mod terminal;
pub mod thermal;
pub mod tls;
pub mod unpublish;
pub mod user;
pub mod version;
pub mod volume;

/// bhatti: self-hosted microVM sandboxes.
#[derive(Debug, Parser)]
#[command(name = "bhatti", version, about, propagate_version = true)]
pub struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// API endpoint, e.g. https://api.bhatti.sh [priority: this flag >
    /// ~/.bhatti/config.yaml > $BHATTI_URL > http://127.0.0.1:8080]
    #[arg(long, global = true, value_name = "URL")]
    pub url: Option<String>,
    /// API key [priority: this flag > ~/.bhatti/config.yaml > $BHATTI_TOKEN]
    #[arg(long, global = true, value_name = "KEY")]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// The global flags every client command sees.
#[derive(Debug, Clone, Default)]
pub struct GlobalArgs {
    pub url: Option<String>,
    pub token: Option<String>,
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the CLI version and the API endpoint in use.
    Version,
    /// Start the daemon (needs root; config at /var/lib/bhatti/config.yaml).
    Serve(serve::ServeArgs),
    /// Create a sandbox and wait until it is ready.
    Create(create::CreateArgs),
    /// Show everything about one sandbox (without waking it).
    Inspect(inspect::InspectArgs),
    /// List your sandboxes.
    #[command(visible_alias = "ls")]
    List(list::ListArgs),
    /// Destroy a sandbox: its VM, disk, sessions and published ports.
    #[command(visible_alias = "rm")]
    Destroy(destroy::DestroyArgs),
    /// Save a sandbox to disk and free its memory (any later command wakes it).
    Stop(thermal::ThermalArgs),
    /// Restore a stopped sandbox.
    Start(thermal::ThermalArgs),
    /// Change a sandbox: --keep-hot (never cool down when idle) or --allow-cold.
    Edit(edit::EditArgs),
    /// Run a command in a sandbox; everything after `--` is the command.
    Exec(exec::ExecArgs),
    /// Interactive terminal inside a sandbox (Ctrl+\ detaches).
    #[command(visible_alias = "sh")]
    Shell(shell::ShellArgs),
    /// List the TCP ports listening inside a sandbox.
    Ports(ports::PortsArgs),
    /// List the sessions (shells, init script) in a sandbox.
    Ps(ps::PsArgs),
    /// Read, write and list files in a sandbox.
    #[command(subcommand)]
    File(file::FileCommand),
    /// Manage your secrets (encrypted at rest, injected as env vars).
    #[command(subcommand)]
    Secret(secret::SecretCommand),
    /// Named snapshots of a sandbox's memory and disk
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Persistent volumes: disks of their own that outlive sandboxes
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// Manage users and API keys on this host (operator only; works on the
    /// local database directly).
    User(user::UserArgs),
    /// Publish a sandbox port at a public URL.
    Publish(publish::PublishArgs),
    /// Print a link that opens the sandbox's terminal in a browser, no API
    /// key needed (a new link replaces the old one; --revoke ends it).
    Share(share::ShareArgs),
    /// Remove a published port; its URL stops working at once.
    Unpublish(unpublish::UnpublishArgs),
    /// Configure the API endpoint and key (~/.bhatti/config.yaml) and test them.
    Setup,
    /// Print a shell completion script (bash, zsh, fish, ...).
    Completion(completion::CompletionArgs),
    /// Check this host's prerequisites for `bhatti serve` (accelerator, QEMU,
    /// qemu-img, nft, network namespaces, images, free disk) and print the fix
    /// for each one missing.
    Doctor(doctor::DoctorArgs),
    /// Build the guest images (operator), or manage custom images (save, import, list, delete).
    #[command(subcommand)]
    Image(image::ImageCommand),
}

/// Runs the parsed command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    let global = GlobalArgs {
        url: cli.url,
        token: cli.token,
        json: cli.json,
    };
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Image(cmd) => match cmd.remote() {
            Ok(remote) => with_client(global, |c| image_client::run(c, remote)),
            Err(local) => image::run(local),
        },
        Command::Doctor(args) => doctor::run(args, cli.json),
        Command::User(args) => user::run(args, cli.json),
        Command::Completion(args) => completion::run(args),
        Command::Version => block_on(version::run(global)),
        Command::Setup => block_on(setup::run(global)),
        Command::Create(args) => with_client(global, |c| create::run(c, args)),
        Command::List(args) => with_client(global, |c| list::run(c, args)),
        Command::Destroy(args) => with_client(global, |c| destroy::run(c, args)),
        Command::Stop(args) => {
            with_client(global, |c| thermal::run(c, args, thermal::Action::Stop))
        }
        Command::Start(args) => {
            with_client(global, |c| thermal::run(c, args, thermal::Action::Start))
        }
        Command::Edit(args) => with_client(global, |c| edit::run(c, args)),
        Command::Exec(args) => with_client(global, |c| exec::run(c, args)),
        Command::Shell(args) => with_client(global, |c| shell::run(c, args)),
        Command::Ps(args) => with_client(global, |c| ps::run(c, args)),
        Command::Ports(args) => with_client(global, |c| ports::run(c, args)),
        Command::Inspect(args) => with_client(global, |c| inspect::run(c, args)),
        Command::File(cmd) => with_client(global, |c| file::run(c, cmd)),
        Command::Secret(cmd) => with_client(global, |c| secret::run(c, cmd)),
        Command::Snapshot(cmd) => with_client(global, |c| snapshot::run(c, cmd)),
        Command::Volume(cmd) => with_client(global, |c| volume::run(c, cmd)),
        Command::Publish(args) => with_client(global, |c| publish::run(c, args)),
        Command::Share(args) => with_client(global, |c| share::run(c, args)),
        Command::Unpublish(args) => with_client(global, |c| unpublish::run(c, args)),
    }
}

/// What a client command gets: the API client and the output mode.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub client: client::ApiClient,
    pub json: bool,
}

fn with_client<F, Fut>(global: GlobalArgs, f: F) -> anyhow::Result<i32>
where
    F: FnOnce(Ctx) -> Fut,
    Fut: Future<Output = anyhow::Result<i32>>,
{
    let ctx = Ctx {
        client: client::ApiClient::from_global(&global)?,
        json: global.json,
    };
    block_on(f(ctx))
}

/// Runs a future on a single-threaded runtime (the CLI does one thing at a time).
fn block_on<Fut: Future<Output = anyhow::Result<i32>>>(fut: Fut) -> anyhow::Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    rt.block_on(fut)
}
