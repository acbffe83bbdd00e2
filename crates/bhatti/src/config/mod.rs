//! Configuration: the daemon's `config.yaml` and the CLI's `~/.bhatti/config.yaml`.
//!
//! Daemon config path: `--config PATH` > `$BHATTI_CONFIG` > `/var/lib/bhatti/config.yaml`.
//! Every key is optional; unknown keys and bad values are errors that name the
//! key. A missing file at the default path means "all defaults" (the caller
//! logs [`LoadedDaemonConfig::notice`]); a missing file that was named
//! explicitly (flag or environment) is an error, because that is a typo.
//!
//! CLI config resolution is exactly: flag > config file > environment >
//! default, and every resolved value remembers its [`Source`] so that an
//! error can say where a bad URL or token came from.

use std::fmt;
use std::path::PathBuf;

mod client;
mod daemon;
mod subnet;

pub use client::{ClientConfig, ClientSettings, Resolved};
pub use daemon::{daemon_config_path, Accel, DaemonConfig, LoadedDaemonConfig, UrlScheme};
pub use subnet::Ipv4Subnet;

/// Default daemon config file.
pub const DEFAULT_CONFIG_PATH: &str = "/var/lib/bhatti/config.yaml";
/// Environment variable naming the daemon config file.
pub const CONFIG_ENV: &str = "BHATTI_CONFIG";
/// Default data directory (state.db, age.key, sandboxes/).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/bhatti";
/// Default images directory, shared by every daemon on the host.
pub const DEFAULT_IMAGES_DIR: &str = "/var/lib/bhatti/images";
/// Default API address used by the CLI when nothing else is configured
/// and the default control socket is not there.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";
/// File name of the daemon's control socket inside its data dir.
pub const SOCKET_FILE: &str = "api.sock";
/// The control socket of a daemon with the default data dir: what the CLI
/// uses (as `unix:///var/lib/bhatti/api.sock`) when no URL is configured and
/// the socket is there.
pub const DEFAULT_SOCKET_PATH: &str = "/var/lib/bhatti/api.sock";
/// Environment variable with the API URL (CLI).
pub const URL_ENV: &str = "BHATTI_URL";
/// Environment variable naming the control socket the CLI uses when no URL
/// is configured (default [`DEFAULT_SOCKET_PATH`]).
pub const SOCKET_ENV: &str = "BHATTI_SOCKET";
/// Environment variable with the API key (CLI).
pub const TOKEN_ENV: &str = "BHATTI_TOKEN";

/// Errors loading or saving either config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file exists (or was named explicitly) but cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// YAML syntax error, unknown key or a value of the wrong type; the
    /// message names the key.
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// A key parsed but its value is not acceptable.
    #[error("invalid config file {path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        message: String,
    },
    /// The config file was named by a flag or the environment but is missing.
    #[error("config file {path} (from {from}) does not exist")]
    Missing { path: PathBuf, from: Source },
    /// Writing the CLI config failed.
    #[error("cannot write config file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `$HOME` is not set, so `~/.bhatti` cannot be found.
    #[error("cannot find the home directory: $HOME is not set")]
    NoHome,
}

/// Where a configuration value (or the config file path) came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A command-line flag.
    Flag,
    /// The CLI or daemon config file at this path.
    ConfigFile(PathBuf),
    /// This environment variable.
    Env(&'static str),
    /// The built-in default.
    Default,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Flag => f.write_str("command-line flag"),
            Source::ConfigFile(p) => write!(f, "config file {}", p.display()),
            Source::Env(var) => write!(f, "environment variable {var}"),
            Source::Default => f.write_str("built-in default"),
        }
    }
}
