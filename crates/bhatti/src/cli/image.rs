//! `bhatti image build` (local, the operator's); the other subcommands go
//! through the API (`image_client.rs`).

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use clap::Subcommand;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::config::DaemonConfig;
use crate::engine::qemu::image::{self, BuildOptions, Progress, Step};

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the guest images (kernel, initramfs, rootfs) if missing or out of date.
    ///
    /// Needs root. The initramfs carries the static lohar binary, found via
    /// --lohar, else $BHATTI_LOHAR, else lohar-static or lohar next to the bhatti
    /// executable, else the
    /// workspace's target/x86_64-unknown-linux-gnu/release/lohar (build it with
    /// RUSTFLAGS="-C target-feature=+crt-static" cargo build --release -p lohar
    /// --target x86_64-unknown-linux-gnu).
    Build {
        /// Where the images live, shared by every daemon on the host
        /// [default: images_dir of the daemon config, /var/lib/bhatti/images]
        #[arg(long, value_name = "DIR", conflicts_with = "config")]
        images_dir: Option<PathBuf>,
        /// Daemon config file to read images_dir from [default: $BHATTI_CONFIG,
        /// /var/lib/bhatti/config.yaml]
        #[arg(long, value_name = "PATH")]
        config: Option<PathBuf>,
        /// Rebuild everything even if the cached images are current.
        #[arg(long)]
        force: bool,
        /// The static lohar binary to put in the initramfs.
        #[arg(long, value_name = "PATH", env = image::LOHAR_ENV)]
        lohar: Option<PathBuf>,
    },
    /// Operator: make a user's image an operator image, visible to every user
    /// (works on the local database, like `bhatti user`)
    Promote {
        /// Image name
        name: String,
        /// The user who has it
        #[arg(long)]
        user: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// Operator: give an operator image to a user (who can then delete it)
    Demote {
        /// Operator image name
        name: String,
        /// The user who gets it
        #[arg(long)]
        user: String,
        #[command(flatten)]
        db: DbArgs,
    },
    /// List your custom images and the operator's
    #[command(visible_alias = "ls")]
    List,
    /// Save a sandbox's disk as a new image (the sandbox keeps running)
    Save {
        /// Sandbox name or id
        sandbox: String,
        /// Image name
        #[arg(long)]
        name: String,
    },
    /// Import a `docker save` tarball or an OCI image layout (as a tar)
    Import {
        /// Image name
        #[arg(long)]
        name: String,
        /// The tarball
        #[arg(long, value_name = "FILE")]
        tar: PathBuf,
    },
    /// Pull an image from a registry (OCI distribution API over HTTPS) and import it
    Pull {
        /// `[registry/]repository[:tag|@sha256:…]` (no registry: Docker Hub)
        reference: String,
        /// Image name [default: the repository's last part, plus -TAG unless latest]
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete one of your images (refused while a sandbox or snapshot uses it)
    #[command(visible_alias = "rm")]
    Delete {
        /// Image name or id
        name: String,
    },
}

/// Where the database is, for the operator's image commands.
#[derive(Debug, clap::Args)]
pub struct DbArgs {
    /// Data directory holding state.db [default: data_dir of the daemon config]
    #[arg(long, value_name = "DIR", conflicts_with = "db_config")]
    pub data_dir: Option<PathBuf>,
    /// Daemon config file to read data_dir from
    #[arg(long = "config", id = "db_config", value_name = "PATH")]
    pub config: Option<PathBuf>,
}

impl DbArgs {
    fn store(&self) -> anyhow::Result<crate::store::Store> {
        let dir = match &self.data_dir {
            Some(d) => d.clone(),
            None => DaemonConfig::load(self.config.as_deref())?.config.data_dir,
        };
        Ok(crate::store::Store::open_existing(&dir)?)
    }
}

impl ImageCommand {
    /// The API side of the command, if it has one (everything but `build`).
    pub fn remote(self) -> Result<super::image_client::Remote, ImageCommand> {
        use super::image_client::Remote;
        match self {
            ImageCommand::List => Ok(Remote::List),
            ImageCommand::Save { sandbox, name } => Ok(Remote::Save { sandbox, name }),
            ImageCommand::Import { name, tar } => Ok(Remote::Import { name, tar }),
            ImageCommand::Delete { name } => Ok(Remote::Delete { name }),
            ImageCommand::Pull { reference, name } => Ok(Remote::Pull { reference, name }),
            other => Err(other),
        }
    }
}

pub fn run(cmd: ImageCommand) -> anyhow::Result<i32> {
    match cmd {
        ImageCommand::Build {
            images_dir,
            config,
            force,
            lohar,
        } => {
            let images_dir = match images_dir {
                Some(dir) => dir,
                None => DaemonConfig::load(config.as_deref())?.config.images_dir,
            };
            let opts = BuildOptions {
                images_dir,
                lohar,
                force,
            };
            let started = Instant::now();
            let paths = if std::io::stderr().is_terminal() {
                image::build_images(&opts, &BarProgress::new())?
            } else {
                image::build_images(&opts, &LineProgress)?
            };
            println!("kernel     {}", paths.kernel.display());
            println!("initramfs  {}", paths.initramfs.display());
            println!("rootfs     {}", paths.rootfs.display());
            eprintln!("images ready in {:.1?}", started.elapsed());
            Ok(0)
        }
        ImageCommand::Promote { name, user, db } => {
            let store = db.store()?;
            let u = store.get_user_by_name(&user)?;
            let img = store.promote_image(u.id, &name)?;
            println!(
                "image {} ({}) is now an operator image, visible to every user",
                img.name, img.id
            );
            Ok(0)
        }
        ImageCommand::Demote { name, user, db } => {
            let store = db.store()?;
            let u = store.get_user_by_name(&user)?;
            store.demote_image(&name, u.id)?;
            println!("operator image {name} now belongs to {user}");
            Ok(0)
        }
        other => anyhow::bail!("`bhatti image {other:?}` goes through the API"),
    }
}

/// One spinner per step on a terminal.
struct BarProgress {
    multi: MultiProgress,
    bars: Mutex<HashMap<&'static str, (ProgressBar, Instant)>>,
}

impl BarProgress {
    fn new() -> Self {
        BarProgress {
            multi: MultiProgress::new(),
            bars: Mutex::new(HashMap::new()),
        }
    }

    fn with_bar(&self, step: Step, f: impl FnOnce(&ProgressBar, Instant)) {
        let bars = self.bars.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((bar, t)) = bars.get(step.name()) {
            f(bar, *t);
        }
    }
}

fn step_label(step: Step) -> String {
    format!("{:<20}", step.name())
}

impl Progress for BarProgress {
    fn start(&self, step: Step) {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {prefix} {elapsed:>4} {wide_msg}")
                .expect("static template is valid"),
        );
        bar.set_prefix(step_label(step));
        bar.enable_steady_tick(Duration::from_millis(120));
        self.bars
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(step.name(), (bar, Instant::now()));
    }

    fn detail(&self, step: Step, line: &str) {
        let line = line.trim().to_string();
        self.with_bar(step, |bar, _| bar.set_message(line));
    }

    fn finish(&self, step: Step, summary: &str) {
        let summary = summary.to_string();
        self.with_bar(step, |bar, t| {
            bar.set_style(
                ProgressStyle::with_template("✓ {prefix} {msg}").expect("static template is valid"),
            );
            bar.finish_with_message(format!("{:>5.1?}  {summary}", t.elapsed()));
        });
    }

    fn cached(&self, step: Step, path: &Path) {
        let bar = self.multi.add(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("✓ {prefix} {msg}").expect("static template is valid"),
        );
        bar.set_prefix(step_label(step));
        bar.finish_with_message(format!("cached  {}", path.display()));
    }

    fn note(&self, msg: &str) {
        // Printing through MultiProgress keeps the bars intact.
        let _ = self.multi.println(format!("note: {msg}"));
    }
}

/// Plain lines when stderr is not a terminal (CI logs, pipes).
struct LineProgress;

impl Progress for LineProgress {
    fn start(&self, step: Step) {
        eprintln!("image: {} ...", step.name());
    }
    fn detail(&self, _step: Step, _line: &str) {}
    fn finish(&self, step: Step, summary: &str) {
        eprintln!("image: {} done: {summary}", step.name());
    }
    fn cached(&self, step: Step, path: &Path) {
        eprintln!("image: {} cached: {}", step.name(), path.display());
    }
    fn note(&self, msg: &str) {
        eprintln!("image: note: {msg}");
    }
}
