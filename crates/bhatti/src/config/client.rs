//! The CLI's `~/.bhatti/config.yaml` and the resolution of its settings:
//! flag > config file > environment > default, each value with its [`Source`].

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ConfigError, Source, DEFAULT_API_URL, TOKEN_ENV, URL_ENV};

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

impl ClientSettings {
    /// With no URL configured (flag, file, environment), the control socket
    /// at `socket` when this process may use it (it exists, is a socket and
    /// is writable: root's 0600 socket is not for other users, who keep
    /// the TCP default). A configured URL always wins.
    pub fn prefer_socket(mut self, socket: &Path) -> Self {
        use std::os::unix::fs::FileTypeExt;
        let usable = std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket())
            && nix::unistd::access(socket, nix::unistd::AccessFlags::W_OK).is_ok();
        if self.api_url.source == Source::Default && usable {
            self.api_url.value = format!("unix://{}", socket.display());
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

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

    #[test]
    fn socket_is_the_default_only_when_usable_and_nothing_is_configured() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("api.sock");
        let none = || ClientSettings::resolve_with(None, None, None, env_of(&[]));
        // Missing, or a plain file: the TCP default stays.
        assert_eq!(none().prefer_socket(&sock).api_url.value, DEFAULT_API_URL);
        std::fs::write(&sock, "").expect("file");
        assert_eq!(none().prefer_socket(&sock).api_url.value, DEFAULT_API_URL);
        std::fs::remove_file(&sock).expect("rm");
        let _l = std::os::unix::net::UnixListener::bind(&sock).expect("bind");
        let s = none().prefer_socket(&sock);
        assert_eq!(s.api_url.value, format!("unix://{}", sock.display()));
        assert_eq!(s.api_url.source, Source::Default);
        // Any configured URL wins over the socket.
        let flag = ClientSettings::resolve_with(Some("http://h:1"), None, None, env_of(&[]));
        assert_eq!(flag.prefer_socket(&sock).api_url.value, "http://h:1");
        let env =
            ClientSettings::resolve_with(None, None, None, env_of(&[(URL_ENV, "http://e:1")]));
        assert_eq!(env.prefer_socket(&sock).api_url.value, "http://e:1");
    }
}
