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
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// Default daemon config file.
pub const DEFAULT_CONFIG_PATH: &str = "/var/lib/bhatti/config.yaml";
/// Environment variable naming the daemon config file.
pub const CONFIG_ENV: &str = "BHATTI_CONFIG";
/// Default data directory (state.db, age.key, sandboxes/).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/bhatti";
/// Default images directory, shared by every daemon on the host.
pub const DEFAULT_IMAGES_DIR: &str = "/var/lib/bhatti/images";
/// Default API address used by the CLI when nothing else is configured.
pub const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";
/// Environment variable with the API URL (CLI).
pub const URL_ENV: &str = "BHATTI_URL";
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

// ---------------------------------------------------------------------------
// Daemon config
// ---------------------------------------------------------------------------

/// Hardware acceleration for QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when it can really run a guest, TCG otherwise.
    #[default]
    Auto,
    Kvm,
    Tcg,
}

/// Scheme of published URLs (`<scheme>://<alias>.<domain>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UrlScheme {
    Http,
    #[default]
    Https,
}

impl UrlScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            UrlScheme::Http => "http",
            UrlScheme::Https => "https",
        }
    }
}

/// An IPv4 network such as `192.168.137.0/24`.
///
/// The first host address (`.1`) is the bridge/gateway; guests get the
/// addresses from the second host address up to the one before broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

impl Ipv4Subnet {
    /// Builds a subnet; `network` must have no host bits set and the prefix
    /// must leave room for the gateway and at least one guest (`/8`..=`/30`).
    pub fn new(network: Ipv4Addr, prefix: u8) -> Result<Self, String> {
        if !(8..=30).contains(&prefix) {
            return Err(format!(
                "prefix /{prefix} is out of range (use /8 to /30, e.g. 192.168.137.0/24)"
            ));
        }
        let mask = Self::mask_of(prefix);
        let net = u32::from(network);
        if net & !mask != 0 {
            let fixed = Ipv4Addr::from(net & mask);
            return Err(format!(
                "{network}/{prefix} has host bits set; did you mean {fixed}/{prefix}?"
            ));
        }
        Ok(Self { network, prefix })
    }

    fn mask_of(prefix: u8) -> u32 {
        u32::MAX << (32 - u32::from(prefix))
    }

    pub fn network(&self) -> Ipv4Addr {
        self.network
    }

    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// The netmask, e.g. 255.255.255.0.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(Self::mask_of(self.prefix))
    }

    /// The bridge's address: the first host address (`192.168.137.1`).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !Self::mask_of(self.prefix))
    }

    /// Whether `ip` lies inside this network.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & Self::mask_of(self.prefix) == u32::from(self.network)
    }

    /// Addresses that may be given to guests, lowest first (excludes the
    /// network, gateway and broadcast addresses).
    pub fn guest_hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }
}

impl fmt::Display for Ipv4Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl FromStr for Ipv4Subnet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR network like 192.168.137.0/24"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{prefix:?} is not a prefix length"))?;
        Self::new(addr, prefix)
    }
}

impl<'de> Deserialize<'de> for Ipv4Subnet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for Ipv4Subnet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn de_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "{s:?} is not an IP:PORT address like 127.0.0.1:8080"
        ))
    })
}

/// The daemon's configuration (`config.yaml`). All keys are optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// API listen address. Default `127.0.0.1:8080`.
    #[serde(deserialize_with = "de_socket_addr")]
    pub listen: SocketAddr,
    /// State directory: state.db, age.key, sandboxes/. Default `/var/lib/bhatti`.
    pub data_dir: PathBuf,
    /// Guest images, shared by all daemons on the host. Default `/var/lib/bhatti/images`.
    pub images_dir: PathBuf,
    /// `auto` (default), `kvm` or `tcg`.
    pub accel: Accel,
    /// Sandbox network; the bridge takes the first host address. Default `192.168.137.0/24`.
    pub subnet: Ipv4Subnet,
    /// Bridge interface name inside the namespace. Default `brbhatti0`.
    pub bridge: String,
    /// Network namespace owned by this daemon. Default `bhatti`.
    pub netns: String,
    /// Give guests outbound access (NAT through the host). Default `true`.
    pub egress: bool,
    /// Public (unauthenticated) proxy for published ports. Default `127.0.0.1:8081`.
    #[serde(deserialize_with = "de_socket_addr")]
    pub public_listen: SocketAddr,
    /// Published URLs are `<alias>.<domain>`. Default `localhost`.
    pub domain: String,
    /// Scheme of published URLs: `https` (default) or `http`.
    pub public_url_scheme: UrlScheme,
    /// Seconds without activity before a running VM is paused (warm); 0 = never.
    /// Default 300.
    pub idle_warm_secs: u64,
    /// Seconds without activity before a VM is saved to disk (cold); 0 = never.
    /// Default 1800.
    pub idle_cold_secs: u64,
    /// Seconds to wait for a booting (or restoring) guest's agent. Default 60.
    pub boot_timeout_secs: u64,
    /// Public proxy: requests per second allowed per alias; 0 = unlimited. Default 50.
    pub public_rate_per_alias: u32,
    /// Public proxy: requests per second allowed in total; 0 = unlimited. Default 500.
    pub public_rate_global: u32,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            images_dir: PathBuf::from(DEFAULT_IMAGES_DIR),
            accel: Accel::Auto,
            subnet: Ipv4Subnet {
                network: Ipv4Addr::new(192, 168, 137, 0),
                prefix: 24,
            },
            bridge: "brbhatti0".to_string(),
            netns: "bhatti".to_string(),
            egress: true,
            public_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            domain: "localhost".to_string(),
            public_url_scheme: UrlScheme::Https,
            idle_warm_secs: 300,
            idle_cold_secs: 1800,
            boot_timeout_secs: 60,
            public_rate_per_alias: 50,
            public_rate_global: 500,
        }
    }
}

/// A loaded daemon config and how it was found.
#[derive(Debug, Clone)]
pub struct LoadedDaemonConfig {
    pub config: DaemonConfig,
    /// The config file path that was used (or looked for).
    pub path: PathBuf,
    /// Where the path came from (flag, `$BHATTI_CONFIG`, default).
    pub path_source: Source,
    /// Whether the file existed.
    pub file_found: bool,
}

impl LoadedDaemonConfig {
    /// One log line for the daemon: which file was used, or that defaults apply.
    pub fn notice(&self) -> String {
        if self.file_found {
            format!(
                "using config file {} (from {})",
                self.path.display(),
                self.path_source
            )
        } else {
            format!(
                "no config file at {}; using built-in defaults",
                self.path.display()
            )
        }
    }
}

/// Chooses the daemon config path: flag > `$BHATTI_CONFIG` > default.
pub fn daemon_config_path(flag: Option<&Path>) -> (PathBuf, Source) {
    daemon_config_path_with(flag, |k| std::env::var(k).ok())
}

fn daemon_config_path_with(
    flag: Option<&Path>,
    env: impl Fn(&str) -> Option<String>,
) -> (PathBuf, Source) {
    if let Some(p) = flag {
        return (p.to_path_buf(), Source::Flag);
    }
    match env(CONFIG_ENV) {
        Some(p) if !p.is_empty() => (PathBuf::from(p), Source::Env(CONFIG_ENV)),
        _ => (PathBuf::from(DEFAULT_CONFIG_PATH), Source::Default),
    }
}

impl DaemonConfig {
    /// Resolves the path (flag > `$BHATTI_CONFIG` > default) and loads it.
    pub fn load(flag: Option<&Path>) -> Result<LoadedDaemonConfig, ConfigError> {
        let (path, source) = daemon_config_path(flag);
        Self::load_from(path, source)
    }

    /// Loads the config at `path`. Missing file: defaults when `source` is
    /// [`Source::Default`], an error otherwise.
    pub fn load_from(path: PathBuf, source: Source) -> Result<LoadedDaemonConfig, ConfigError> {
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let config = Self::from_yaml(&text, &path)?;
                Ok(LoadedDaemonConfig {
                    config,
                    path,
                    path_source: source,
                    file_found: true,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if source != Source::Default {
                    return Err(ConfigError::Missing { path, from: source });
                }
                Ok(LoadedDaemonConfig {
                    config: Self::default(),
                    path,
                    path_source: source,
                    file_found: false,
                })
            }
            Err(source) => Err(ConfigError::Read { path, source }),
        }
    }

    /// Parses and validates YAML text; `path` is only used in messages.
    pub fn from_yaml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let parse_err = |e: serde_yaml_ng::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        // An empty file (or one holding only comments) means "all defaults".
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(parse_err)?;
        let map = match value {
            serde_yaml_ng::Value::Null => return Ok(Self::default()),
            serde_yaml_ng::Value::Mapping(m) => m,
            _ => {
                return Err(ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: "expected a mapping of keys to values".into(),
                })
            }
        };
        // Check key by key so that every error names its key (serde_yaml
        // does not always say which field a bad value belongs to).
        for (k, v) in &map {
            let name = k.as_str().unwrap_or_default();
            let Some(key) = Self::KEYS.iter().copied().find(|f| *f == name) else {
                return Err(ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: format!(
                        "unknown key `{}` (known keys: {})",
                        serde_yaml_ng::to_string(k)
                            .map(|s| s.trim().to_string())
                            .unwrap_or_default(),
                        Self::KEYS.join(", ")
                    ),
                });
            };
            let mut single = serde_yaml_ng::Mapping::new();
            single.insert(k.clone(), v.clone());
            if let Err(e) = serde_yaml_ng::from_value::<Self>(serde_yaml_ng::Value::Mapping(single))
            {
                let msg = e.to_string();
                let msg = msg
                    .strip_prefix(&format!("{key}: "))
                    .unwrap_or(&msg)
                    .to_string();
                return Err(invalid(key, msg));
            }
        }
        let config: Self = serde_yaml_ng::from_value(serde_yaml_ng::Value::Mapping(map))
            .map_err(parse_err)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Every key the daemon config accepts.
    pub const KEYS: &'static [&'static str] = &[
        "listen",
        "data_dir",
        "images_dir",
        "accel",
        "subnet",
        "bridge",
        "netns",
        "egress",
        "public_listen",
        "domain",
        "public_url_scheme",
        "idle_warm_secs",
        "idle_cold_secs",
        "boot_timeout_secs",
        "public_rate_per_alias",
        "public_rate_global",
    ];

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            key,
            message,
        };
        if !self.data_dir.is_absolute() {
            return Err(invalid(
                "data_dir",
                format!("{} must be an absolute path", self.data_dir.display()),
            ));
        }
        if !self.images_dir.is_absolute() {
            return Err(invalid(
                "images_dir",
                format!("{} must be an absolute path", self.images_dir.display()),
            ));
        }
        // Linux interface names: at most 15 bytes, no '/', no whitespace.
        if let Err(m) = check_ifname(&self.bridge) {
            return Err(invalid("bridge", m));
        }
        if self.netns.is_empty()
            || self.netns.len() > 64
            || self.netns.contains('/')
            || self.netns.starts_with('.')
            || self
                .netns
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "netns",
                format!("{:?} is not a usable namespace name", self.netns),
            ));
        }
        if let Err(m) = check_domain(&self.domain) {
            return Err(invalid("domain", m));
        }
        if self.listen == self.public_listen {
            return Err(invalid(
                "public_listen",
                format!("{} is the same address as listen", self.public_listen),
            ));
        }
        if self.boot_timeout_secs == 0 {
            return Err(invalid("boot_timeout_secs", "must be at least 1".into()));
        }
        if self.idle_warm_secs != 0
            && self.idle_cold_secs != 0
            && self.idle_cold_secs < self.idle_warm_secs
        {
            return Err(invalid(
                "idle_cold_secs",
                format!(
                    "{} is shorter than idle_warm_secs ({})",
                    self.idle_cold_secs, self.idle_warm_secs
                ),
            ));
        }
        Ok(())
    }

    /// `<data_dir>/state.db`.
    pub fn state_db_path(&self) -> PathBuf {
        self.data_dir.join("state.db")
    }

    /// Base URL of a published alias, e.g. `https://my-app.localhost`.
    pub fn public_url(&self, alias: &str) -> String {
        format!(
            "{}://{}.{}",
            self.public_url_scheme.as_str(),
            alias,
            self.domain
        )
    }
}

fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 15 {
        return Err(format!(
            "{name:?} must be 1 to 15 characters (a Linux interface name)"
        ));
    }
    if name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || !c.is_ascii_graphic())
    {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    Ok(())
}

fn check_domain(domain: &str) -> Result<(), String> {
    let ok = !domain.is_empty()
        && domain.len() <= 253
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{domain:?} is not a DNS name like bhatti.example.com"
        ))
    }
}

// ---------------------------------------------------------------------------
// CLI config
// ---------------------------------------------------------------------------

/// The CLI's `~/.bhatti/config.yaml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_token: Option<String>,
}

impl ClientConfig {
    /// `$HOME/.bhatti/config.yaml`.
    pub fn default_path() -> Result<PathBuf, ConfigError> {
        match std::env::var_os("HOME") {
            Some(h) if !h.is_empty() => Ok(PathBuf::from(h).join(".bhatti").join("config.yaml")),
            _ => Err(ConfigError::NoHome),
        }
    }

    /// Loads the file; `Ok(None)` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<Self>, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let parse_err = |e: serde_yaml_ng::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let value: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).map_err(parse_err)?;
        if value.is_null() {
            return Ok(Some(Self::default()));
        }
        serde_yaml_ng::from_str(&text).map(Some).map_err(parse_err)
    }

    /// Writes the file atomically with mode 0600, creating its directory
    /// with mode 0700 when missing.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        use std::os::unix::fs::DirBuilderExt;
        let werr = |source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(werr)?;
        let text = serde_yaml_ng::to_string(self)
            .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
        // NamedTempFile is created with O_EXCL and mode 0600.
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(werr)?;
        tmp.write_all(text.as_bytes()).map_err(werr)?;
        tmp.as_file().sync_all().map_err(werr)?;
        tmp.persist(path).map_err(|e| werr(e.error))?;
        Ok(())
    }
}

/// A value and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved<T> {
    pub value: T,
    pub source: Source,
}

/// The CLI's effective connection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    /// API base URL without a trailing slash.
    pub api_url: Resolved<String>,
    /// API key, if any source provides one.
    pub auth_token: Option<Resolved<String>>,
}

impl ClientSettings {
    /// Resolves from flags, the CLI config file at `config_path` (default
    /// `~/.bhatti/config.yaml`) and the process environment.
    pub fn resolve(
        flag_url: Option<&str>,
        flag_token: Option<&str>,
        config_path: Option<&Path>,
    ) -> Result<Self, ConfigError> {
        let path = match config_path {
            Some(p) => p.to_path_buf(),
            None => ClientConfig::default_path()?,
        };
        let file = ClientConfig::load(&path)?;
        Ok(Self::resolve_with(
            flag_url,
            flag_token,
            file.as_ref().map(|c| (path.as_path(), c)),
            |k| std::env::var(k).ok(),
        ))
    }

    /// Pure resolution: flag > config file > environment > default.
    /// Empty strings count as unset.
    pub fn resolve_with(
        flag_url: Option<&str>,
        flag_token: Option<&str>,
        file: Option<(&Path, &ClientConfig)>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Self {
        fn pick(
            flag: Option<&str>,
            file: Option<(&Path, Option<&String>)>,
            env_var: &'static str,
            env: &dyn Fn(&str) -> Option<String>,
        ) -> Option<Resolved<String>> {
            let set = |s: &str| !s.trim().is_empty();
            if let Some(v) = flag.filter(|v| set(v)) {
                return Some(Resolved {
                    value: v.trim().to_string(),
                    source: Source::Flag,
                });
            }
            if let Some((path, Some(v))) = file {
                if set(v) {
                    return Some(Resolved {
                        value: v.trim().to_string(),
                        source: Source::ConfigFile(path.to_path_buf()),
                    });
                }
            }
            env(env_var).filter(|v| set(v)).map(|v| Resolved {
                value: v.trim().to_string(),
                source: Source::Env(env_var),
            })
        }
        let url = pick(
            flag_url,
            file.map(|(p, c)| (p, c.api_url.as_ref())),
            URL_ENV,
            &env,
        )
        .unwrap_or(Resolved {
            value: DEFAULT_API_URL.to_string(),
            source: Source::Default,
        });
        let api_url = Resolved {
            value: url.value.trim_end_matches('/').to_string(),
            source: url.source,
        };
        let auth_token = pick(
            flag_token,
            file.map(|(p, c)| (p, c.auth_token.as_ref())),
            TOKEN_ENV,
            &env,
        );
        Self {
            api_url,
            auth_token,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    fn p() -> PathBuf {
        PathBuf::from("/etc/test.yaml")
    }

    #[test]
    fn empty_and_comment_only_files_are_defaults() {
        assert_eq!(
            DaemonConfig::from_yaml("", &p()).expect("empty"),
            DaemonConfig::default()
        );
        assert_eq!(
            DaemonConfig::from_yaml("# nothing\n", &p()).expect("comment"),
            DaemonConfig::default()
        );
        assert_eq!(
            DaemonConfig::from_yaml("{}", &p()).expect("map"),
            DaemonConfig::default()
        );
    }

    #[test]
    fn defaults() {
        let c = DaemonConfig::default();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.public_listen.to_string(), "127.0.0.1:8081");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/bhatti"));
        assert_eq!(c.images_dir, PathBuf::from("/var/lib/bhatti/images"));
        assert_eq!(c.accel, Accel::Auto);
        assert_eq!(c.subnet.to_string(), "192.168.137.0/24");
        assert_eq!(c.subnet.gateway(), Ipv4Addr::new(192, 168, 137, 1));
        assert_eq!(c.bridge, "brbhatti0");
        assert_eq!(c.netns, "bhatti");
        assert!(c.egress);
        assert_eq!(c.domain, "localhost");
        assert_eq!(c.public_url_scheme, UrlScheme::Https);
        assert_eq!(c.public_url("app"), "https://app.localhost");
        assert_eq!(c.state_db_path(), PathBuf::from("/var/lib/bhatti/state.db"));
    }

    #[test]
    fn full_file_parses() {
        let y = "listen: 127.0.0.1:9000\n\
                 data_dir: /tmp/d\n\
                 images_dir: /tmp/i\n\
                 accel: tcg\n\
                 subnet: 10.99.0.0/16\n\
                 bridge: brtest1\n\
                 netns: test1\n\
                 egress: false\n\
                 public_listen: 127.0.0.1:9001\n\
                 domain: sb.example.com\n\
                 public_url_scheme: http\n\
                 idle_warm_secs: 10\n\
                 idle_cold_secs: 0\n\
                 boot_timeout_secs: 5\n\
                 public_rate_per_alias: 0\n\
                 public_rate_global: 7\n";
        let c = DaemonConfig::from_yaml(y, &p()).expect("parses");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(c.subnet.prefix(), 16);
        assert!(!c.egress);
        assert_eq!(c.public_url("x"), "http://x.sb.example.com");
        assert_eq!(c.public_rate_global, 7);
    }

    #[test]
    fn keys_list_matches_struct() {
        let v = serde_yaml_ng::to_value(DaemonConfig::default()).expect("serialize");
        let keys: Vec<String> = v
            .as_mapping()
            .expect("mapping")
            .keys()
            .map(|k| k.as_str().expect("str").to_string())
            .collect();
        assert_eq!(keys, DaemonConfig::KEYS);
        // And the serialized defaults parse back to the defaults.
        let text = serde_yaml_ng::to_string(&DaemonConfig::default()).expect("yaml");
        assert_eq!(
            DaemonConfig::from_yaml(&text, &p()).expect("roundtrip"),
            DaemonConfig::default()
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let e = DaemonConfig::from_yaml("listen: 127.0.0.1:1\nlisten_addr: x\n", &p())
            .expect_err("unknown key");
        let msg = e.to_string();
        assert!(msg.contains("listen_addr"), "{msg}");
        assert!(msg.contains("/etc/test.yaml"), "{msg}");
    }

    #[test]
    fn bad_values_name_the_key() {
        for (yaml, key) in [
            ("listen: nowhere\n", "listen"),
            ("public_listen: 1.2.3.4\n", "public_listen"),
            ("accel: hvf\n", "accel"),
            ("egress: maybe\n", "egress"),
            ("subnet: 192.168.137.5/24\n", "subnet"),
            ("subnet: 10.0.0.0/31\n", "subnet"),
            ("idle_warm_secs: -1\n", "idle_warm_secs"),
            ("bridge: a-very-long-bridge-name\n", "bridge"),
            ("netns: a/b\n", "netns"),
            ("domain: 'bad domain'\n", "domain"),
            ("data_dir: relative/dir\n", "data_dir"),
            ("public_url_scheme: ftp\n", "public_url_scheme"),
            ("boot_timeout_secs: 0\n", "boot_timeout_secs"),
            ("public_listen: 127.0.0.1:8080\n", "public_listen"),
        ] {
            let msg = DaemonConfig::from_yaml(yaml, &p())
                .expect_err(yaml)
                .to_string();
            assert!(msg.contains(&format!(": {key}: ")), "{yaml:?} → {msg}");
        }
    }

    #[test]
    fn subnet_math() {
        let s: Ipv4Subnet = "10.1.2.0/30".parse().expect("subnet");
        assert_eq!(s.gateway(), Ipv4Addr::new(10, 1, 2, 1));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 1, 2, 3));
        assert_eq!(
            s.guest_hosts().collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 1, 2, 2)]
        );
        assert!(s.contains(Ipv4Addr::new(10, 1, 2, 3)));
        assert!(!s.contains(Ipv4Addr::new(10, 1, 2, 4)));
        assert_eq!(s.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        let d = DaemonConfig::default().subnet;
        assert_eq!(d.guest_hosts().count(), 253);
    }

    #[test]
    fn missing_default_file_gives_defaults_but_explicit_missing_is_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nope.yaml");
        let loaded = DaemonConfig::load_from(path.clone(), Source::Default).expect("defaults");
        assert!(!loaded.file_found);
        assert_eq!(loaded.config, DaemonConfig::default());
        assert!(loaded.notice().contains("defaults"), "{}", loaded.notice());
        let e = DaemonConfig::load_from(path, Source::Flag).expect_err("missing");
        assert!(e.to_string().contains("does not exist"), "{e}");
    }

    #[test]
    fn daemon_config_path_priority() {
        let env_set = |k: &str| (k == CONFIG_ENV).then(|| "/env.yaml".to_string());
        let env_none = |_: &str| None;
        assert_eq!(
            daemon_config_path_with(Some(Path::new("/flag.yaml")), env_set),
            (PathBuf::from("/flag.yaml"), Source::Flag)
        );
        assert_eq!(
            daemon_config_path_with(None, env_set),
            (PathBuf::from("/env.yaml"), Source::Env(CONFIG_ENV))
        );
        assert_eq!(
            daemon_config_path_with(None, env_none),
            (PathBuf::from(DEFAULT_CONFIG_PATH), Source::Default)
        );
    }

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn client_priority_flag_wins() {
        let path = Path::new("/home/u/.bhatti/config.yaml");
        let file = ClientConfig {
            api_url: Some("http://file:1".into()),
            auth_token: Some("bht_file".into()),
        };
        let env = env_of(&[(URL_ENV, "http://env:1"), (TOKEN_ENV, "bht_env")]);
        let s = ClientSettings::resolve_with(
            Some("http://flag:1/"),
            Some("bht_flag"),
            Some((path, &file)),
            env,
        );
        assert_eq!(s.api_url.value, "http://flag:1");
        assert_eq!(s.api_url.source, Source::Flag);
        let t = s.auth_token.expect("token");
        assert_eq!((t.value.as_str(), t.source), ("bht_flag", Source::Flag));
    }

    #[test]
    fn client_priority_file_beats_env() {
        let path = Path::new("/home/u/.bhatti/config.yaml");
        let file = ClientConfig {
            api_url: Some("http://file:1".into()),
            auth_token: Some("bht_file".into()),
        };
        let env = env_of(&[(URL_ENV, "http://env:1"), (TOKEN_ENV, "bht_env")]);
        let s = ClientSettings::resolve_with(None, None, Some((path, &file)), env);
        assert_eq!(s.api_url.value, "http://file:1");
        assert_eq!(s.api_url.source, Source::ConfigFile(path.to_path_buf()));
        let t = s.auth_token.expect("token");
        assert_eq!(t.value, "bht_file");
        assert!(t.source.to_string().contains("config.yaml"));
    }

    #[test]
    fn client_priority_env_when_file_lacks_key() {
        let path = Path::new("/home/u/.bhatti/config.yaml");
        let file = ClientConfig {
            api_url: Some("http://file:1".into()),
            auth_token: None,
        };
        let env = env_of(&[(URL_ENV, "http://env:1"), (TOKEN_ENV, "bht_env")]);
        let s = ClientSettings::resolve_with(None, None, Some((path, &file)), &env);
        assert_eq!(s.api_url.source, Source::ConfigFile(path.to_path_buf()));
        let t = s.auth_token.expect("token");
        assert_eq!(
            (t.value.as_str(), t.source),
            ("bht_env", Source::Env(TOKEN_ENV))
        );
        // No file at all: both from env.
        let s = ClientSettings::resolve_with(None, None, None, &env);
        assert_eq!(s.api_url.value, "http://env:1");
        assert_eq!(s.api_url.source, Source::Env(URL_ENV));
        assert_eq!(
            s.api_url.source.to_string(),
            "environment variable BHATTI_URL"
        );
    }

    #[test]
    fn client_priority_default() {
        let s = ClientSettings::resolve_with(None, None, None, env_of(&[(URL_ENV, "")]));
        assert_eq!(s.api_url.value, DEFAULT_API_URL);
        assert_eq!(s.api_url.source, Source::Default);
        assert!(s.auth_token.is_none());
    }

    #[test]
    fn client_config_save_load_roundtrip_and_modes() {
        let home = tempfile::tempdir().expect("tempdir");
        let path = home.path().join(".bhatti").join("config.yaml");
        assert_eq!(ClientConfig::load(&path).expect("load"), None);
        let c = ClientConfig {
            api_url: Some("http://127.0.0.1:9".into()),
            auth_token: Some("bht_abc".into()),
        };
        c.save(&path).expect("save");
        let file_mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(file_mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(path.parent().expect("parent"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(ClientConfig::load(&path).expect("load"), Some(c.clone()));
        // Overwrite keeps 0600.
        c.save(&path).expect("save again");
        let file_mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(file_mode & 0o777, 0o600);
    }

    #[test]
    fn client_config_unknown_key_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, "api_url: http://x\nauth-token: bht_x\n").expect("write");
        let e = ClientConfig::load(&path).expect_err("unknown key");
        assert!(e.to_string().contains("auth-token"), "{e}");
    }
}
