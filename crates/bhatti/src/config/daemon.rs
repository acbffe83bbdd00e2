//! The daemon's `config.yaml` (decision 12): every key optional, unknown
//! keys and bad values are errors that name the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize};

use super::{
    ConfigError, Ipv4Subnet, Source, CONFIG_ENV, DEFAULT_CONFIG_PATH, DEFAULT_DATA_DIR,
    DEFAULT_IMAGES_DIR,
};

/// Hardware acceleration for QEMU: the engine's own setting type.
pub use crate::engine::qemu::accel::AccelMode as Accel;

/// Scheme of published URLs (`<scheme>://<alias>.<domain>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UrlScheme {
    /// `http` with the public listener's port for the domain `localhost`
    /// (a local install: nothing terminates TLS in front of the plain-HTTP
    /// public listener, and browsers resolve `*.localhost` to loopback);
    /// `https` for any other domain (a TLS terminator is expected in front).
    #[default]
    Auto,
    Http,
    Https,
}

impl UrlScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            UrlScheme::Auto => "auto",
            UrlScheme::Http => "http",
            UrlScheme::Https => "https",
        }
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

/// `listen`: an address, or `off` / empty / null for no TCP listener.
fn de_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = Option::<String>::deserialize(d)?;
    match s.as_deref().map(str::trim) {
        None | Some("" | "off") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| {
            serde::de::Error::custom(format!(
                "{s:?} is not an IP:PORT address like 127.0.0.1:8080 (or `off`)"
            ))
        }),
    }
}

/// The daemon's configuration (`config.yaml`). All keys are optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DaemonConfig {
    /// API listen address (TCP). Default `127.0.0.1:8080`; `off` (or empty)
    /// for none: the API is then only on the control socket,
    /// [`DaemonConfig::socket_path`].
    #[serde(deserialize_with = "de_listen")]
    pub listen: Option<SocketAddr>,
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
    /// Scheme of published URLs: `auto` (default), `https` or `http`.
    pub public_url_scheme: UrlScheme,
    /// Seconds without activity before a running VM is paused (warm); 0 = never.
    /// Default 300.
    pub idle_warm_secs: u64,
    /// Seconds a warm VM stays paused before it is saved to disk (cold), so
    /// `idle_warm_secs + idle_cold_secs` after the last activity (with warm
    /// off: after `idle_cold_secs`); 0 = never. Default 1800.
    pub idle_cold_secs: u64,
    /// Cold restores (wake-ups from disk) that may run at once; beyond it the
    /// public proxy answers 503 with Retry-After. Default 4.
    pub max_concurrent_restores: u32,
    /// Seconds to wait for a booting (or restoring) guest's agent. Default 60.
    pub boot_timeout_secs: u64,
    /// Public proxy: requests per second allowed per alias; 0 = unlimited. Default 50.
    pub public_rate_per_alias: u32,
    /// Public proxy: requests per second allowed in total; 0 = unlimited. Default 500.
    pub public_rate_global: u32,
    /// Egress posture of a sandbox whose create names none: `public`
    /// (default) or `deny` (see `crate::egress`).
    pub egress_default: crate::egress::Posture,
    /// Host names (or `*.suffix`) a sandbox may reach when its create names none.
    pub egress_allow_hosts: Vec<String>,
    /// IPv4 networks a sandbox may reach when its create names none.
    pub egress_allow_cidrs: Vec<String>,
    /// Sandboxes of one user may reach each other. Default `false`; other
    /// users' sandboxes never.
    pub same_user_peers: bool,
    /// Upstream name servers of the guests' resolver (`IP` or `IP:PORT`);
    /// empty (default): those of the host's `/etc/resolv.conf`.
    pub dns_upstream: Vec<String>,
    /// Namespace that plays the host for egress (the veth's outer end and
    /// NAT go there, upstream DNS is asked from there). Default: none, the
    /// host's own namespace. For tests that keep all traffic in namespaces
    /// of their own.
    pub uplink_netns: Option<String>,
    /// Public proxy: requests per second allowed per client address (the
    /// TCP peer, or from loopback the last `X-Forwarded-For` hop); 0 =
    /// unlimited. Default 30.
    pub public_rate_per_client: u32,
    /// API: sandbox creations (create, fork, snapshot resume) per minute
    /// per user; 0 = unlimited. Default 30.
    pub api_create_per_min: u32,
    /// API: other changing requests (exec, shells, file writes, edits,
    /// deletes, ...) per minute per user; 0 = unlimited. Default 600.
    pub api_write_per_min: u32,
    /// API: reads (GET) per minute per user; 0 = unlimited. Default 1200.
    pub api_read_per_min: u32,
    /// New sandboxes are restored from a pre-booted template of their
    /// shape instead of booting (docs/templates.md). Default `true`;
    /// `$BHATTI_TEMPLATES=0` turns them off whatever the file says.
    pub templates: bool,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            images_dir: PathBuf::from(DEFAULT_IMAGES_DIR),
            accel: Accel::Auto,
            subnet: Ipv4Subnet::default(),
            bridge: "brbhatti0".to_string(),
            netns: "bhatti".to_string(),
            egress: true,
            public_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            domain: "localhost".to_string(),
            public_url_scheme: UrlScheme::Auto,
            idle_warm_secs: 300,
            idle_cold_secs: 1800,
            max_concurrent_restores: 4,
            boot_timeout_secs: 60,
            public_rate_per_alias: 50,
            public_rate_global: 500,
            egress_default: crate::egress::Posture::Public,
            egress_allow_hosts: Vec::new(),
            egress_allow_cidrs: Vec::new(),
            same_user_peers: false,
            dns_upstream: Vec::new(),
            uplink_netns: None,
            public_rate_per_client: 30,
            api_create_per_min: 30,
            api_write_per_min: 600,
            api_read_per_min: 1200,
            templates: true,
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
        let config: Self =
            serde_yaml_ng::from_value(serde_yaml_ng::Value::Mapping(map)).map_err(parse_err)?;
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
        "max_concurrent_restores",
        "boot_timeout_secs",
        "public_rate_per_alias",
        "public_rate_global",
        "egress_default",
        "egress_allow_hosts",
        "egress_allow_cidrs",
        "same_user_peers",
        "dns_upstream",
        "uplink_netns",
        "public_rate_per_client",
        "api_create_per_min",
        "api_write_per_min",
        "api_read_per_min",
        "templates",
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
        if self.listen == Some(self.public_listen) {
            return Err(invalid(
                "public_listen",
                format!("{} is the same address as listen", self.public_listen),
            ));
        }
        if self.boot_timeout_secs == 0 {
            return Err(invalid("boot_timeout_secs", "must be at least 1".into()));
        }
        if self.max_concurrent_restores == 0 {
            return Err(invalid(
                "max_concurrent_restores",
                "must be at least 1".into(),
            ));
        }
        if let Err(e) = self.default_egress() {
            return Err(invalid(e.field_key(), e.message));
        }
        if let Err(m) = self.dns_upstream_addrs() {
            return Err(invalid("dns_upstream", m));
        }
        // sockaddr_un holds 108 bytes with the terminating NUL (unix(7)).
        let sock = self.socket_path();
        if sock.as_os_str().len() > 107 {
            return Err(invalid(
                "data_dir",
                format!(
                    "too long: the control socket {} must stay under 108 bytes",
                    sock.display()
                ),
            ));
        }
        if let Some(up) = &self.uplink_netns {
            if up.is_empty() || up.len() > 64 || up.contains(['/', ' ']) || up == &self.netns {
                return Err(invalid(
                    "uplink_netns",
                    format!("{up:?} is not a usable namespace name other than netns"),
                ));
            }
        }
        Ok(())
    }

    /// The egress policy of a sandbox whose create names none.
    ///
    /// Errors: a bad `egress_allow_hosts` or `egress_allow_cidrs` entry
    /// (one overlapping `subnet` included).
    pub fn default_egress(
        &self,
    ) -> Result<crate::egress::EgressPolicy, crate::egress::PolicyError> {
        let p = crate::egress::EgressPolicy::parse(
            self.egress_default,
            &self.egress_allow_hosts,
            &self.egress_allow_cidrs,
        )?;
        p.check_subnet(self.subnet.net())?;
        Ok(p)
    }

    /// `dns_upstream` as socket addresses (port 53 unless given).
    pub fn dns_upstream_addrs(&self) -> Result<Vec<SocketAddr>, String> {
        self.dns_upstream
            .iter()
            .map(|s| {
                s.parse::<SocketAddr>()
                    .or_else(|_| {
                        s.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, 53))
                    })
                    .map_err(|_| format!("{s:?} is not an IP or IP:PORT"))
            })
            .collect()
    }

    /// The API's per-user budgets.
    pub fn api_rates(&self) -> crate::rate_limit::UserRates {
        crate::rate_limit::UserRates {
            create_per_min: self.api_create_per_min,
            write_per_min: self.api_write_per_min,
            read_per_min: self.api_read_per_min,
        }
    }

    /// The control socket: the API on a Unix socket, mode 0600,
    /// `<data_dir>/api.sock`. Always served; the local CLI uses it when no
    /// URL is configured.
    pub fn socket_path(&self) -> PathBuf {
        self.data_dir.join(super::SOCKET_FILE)
    }

    /// `<data_dir>/state.db`.
    pub fn state_db_path(&self) -> PathBuf {
        self.data_dir.join("state.db")
    }

    /// The scheme published URLs use, with `auto` resolved.
    pub fn public_scheme(&self) -> &'static str {
        match self.public_url_scheme {
            UrlScheme::Auto if self.domain == "localhost" => "http",
            UrlScheme::Auto => "https",
            s => s.as_str(),
        }
    }

    /// What follows `<alias>.` in a published URL: the domain, plus the
    /// public listener's port when the URL points straight at it.
    pub fn public_url_host_suffix(&self) -> String {
        let direct = self.public_url_scheme == UrlScheme::Auto && self.domain == "localhost";
        match self.public_listen.port() {
            80 => self.domain.clone(),
            port if direct => format!("{}:{port}", self.domain),
            _ => self.domain.clone(),
        }
    }

    /// Base URL of a published alias, e.g. `http://my-app.localhost:8081` on
    /// a local install, `https://my-app.example.com` behind a TLS terminator.
    pub fn public_url(&self, alias: &str) -> String {
        format!(
            "{}://{}.{}",
            self.public_scheme(),
            alias,
            self.public_url_host_suffix()
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

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
        assert_eq!(c.listen, Some(SocketAddr::from(([127, 0, 0, 1], 8080))));
        assert_eq!(c.socket_path(), PathBuf::from("/var/lib/bhatti/api.sock"));
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
        assert_eq!(c.public_url_scheme, UrlScheme::Auto);
        // A local install: the plain-HTTP public listener itself.
        assert_eq!(c.public_url("app"), "http://app.localhost:8081");
        let other = DaemonConfig {
            domain: "sb.example.com".into(),
            ..DaemonConfig::default()
        };
        assert_eq!(other.public_url("app"), "https://app.sb.example.com");
        let forced = DaemonConfig {
            public_url_scheme: UrlScheme::Https,
            ..DaemonConfig::default()
        };
        assert_eq!(forced.public_url("app"), "https://app.localhost");
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
                 max_concurrent_restores: 2\n\
                 boot_timeout_secs: 5\n\
                 public_rate_per_alias: 0\n\
                 public_rate_global: 7\n\
                 public_rate_per_client: 3\n\
                 api_create_per_min: 2\n\
                 api_write_per_min: 0\n\
                 api_read_per_min: 9\n";
        let c = DaemonConfig::from_yaml(y, &p()).expect("parses");
        assert_eq!(c.listen.map(|l| l.port()), Some(9000));
        assert_eq!(c.accel, Accel::Tcg);
        assert_eq!(c.max_concurrent_restores, 2);
        assert_eq!(c.subnet.prefix(), 16);
        assert!(!c.egress);
        assert_eq!(c.public_url("x"), "http://x.sb.example.com");
        assert_eq!(c.public_rate_global, 7);
        assert_eq!(c.public_rate_per_client, 3);
        assert_eq!(
            c.api_rates(),
            crate::rate_limit::UserRates {
                create_per_min: 2,
                write_per_min: 0,
                read_per_min: 9
            }
        );
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
    fn a_data_dir_too_long_for_the_control_socket_is_refused() {
        let at_limit = format!("data_dir: /{}\n", "d".repeat(107 - "/api.sock".len() - 1));
        DaemonConfig::from_yaml(&at_limit, &p()).expect("socket path of 107 bytes");
        let past = format!("data_dir: /{}\n", "d".repeat(107 - "/api.sock".len()));
        let e = DaemonConfig::from_yaml(&past, &p()).expect_err("108 bytes");
        assert!(e.to_string().contains("data_dir"), "{e}");
    }

    #[test]
    fn listen_can_be_off() {
        for y in [
            "listen: off\n",
            "listen: ''\n",
            "listen: null\n",
            "listen: ~\n",
        ] {
            let c = DaemonConfig::from_yaml(y, &p()).expect(y);
            assert_eq!(c.listen, None, "{y}");
            // And it is written back as null, which reads as off again.
            let text = serde_yaml_ng::to_string(&c).expect("yaml");
            assert_eq!(DaemonConfig::from_yaml(&text, &p()).expect("again"), c);
        }
        let e = DaemonConfig::from_yaml("listen: nope\n", &p()).expect_err("bad");
        assert!(e.to_string().contains("listen"), "{e}");
        let e = DaemonConfig::from_yaml("listen: 127.0.0.1:8081\n", &p()).expect_err("same");
        assert!(e.to_string().contains("public_listen"), "{e}");
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
}
