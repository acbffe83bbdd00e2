//! Everything that differs between a VM and test mode, in one place. The
//! server is handed an [`AgentConfig`] and never asks which mode it is in.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bhatti_proto::{BootConfig, CONTROL_PORT, FORWARD_PORT};

/// The unprivileged user every child runs as inside a VM.
pub const GUEST_UID: u32 = 1000;
pub const GUEST_GID: u32 = 1000;

/// Every child's default locale; the rootfs generates it (see the image
/// builder's rootfs recipe).
const DEFAULT_LANG: &str = "en_US.UTF-8";
const STD_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How the agent runs its children and whom it lets in.
#[derive(Debug, Clone, Default)]
pub struct AgentConfig {
    /// AUTH token; `None` means no AUTH is required. Shared and replaceable:
    /// IDENTITY gives a restored copy a token of its own.
    pub token: Arc<RwLock<Option<Vec<u8>>>>,
    /// The defaults every child starts from (PATH, HOME, TERM, LANG, USER).
    pub default_env: BTreeMap<String, String>,
    /// The sandbox env (secrets included), over the defaults; replaced by IDENTITY.
    pub sandbox_env: Arc<RwLock<BTreeMap<String, String>>>,
    /// uid/gid children run as; `None` keeps the agent's own.
    pub run_as: Option<(u32, u32)>,
    /// Owner given to files and directories the agent creates.
    pub file_owner: Option<(u32, u32)>,
    /// cwd of children that ask for none; `None` keeps the agent's own.
    pub default_cwd: Option<PathBuf>,
    /// Script run as TTY session "init".
    pub init_script: Option<String>,
    /// Whether SET_TIME sets CLOCK_REALTIME: in a VM the guest clock is
    /// ours; in test mode it is the host's and must stay untouched.
    pub owns_clock: bool,
    /// Whether IDENTITY may change the machine (hostname, machine-id, RNG,
    /// eth0): in a VM yes; in test mode only token and env change.
    pub owns_machine: bool,
}

/// Where the two protocols listen.
#[derive(Debug, Clone)]
pub enum Endpoints {
    Unix {
        control: PathBuf,
        forward: PathBuf,
    },
    Tcp {
        control: SocketAddr,
        forward: SocketAddr,
    },
}

fn token_of(s: &str) -> Option<Vec<u8>> {
    (!s.is_empty()).then(|| s.as_bytes().to_vec())
}

impl AgentConfig {
    /// Inside a VM: children run as `lohar` (uid 1000) in /workspace.
    pub fn vm(boot: &BootConfig) -> (AgentConfig, Endpoints) {
        let default_env = [
            ("PATH", STD_PATH),
            ("HOME", "/home/lohar"),
            ("TERM", "xterm-256color"),
            ("LANG", DEFAULT_LANG),
            ("USER", "lohar"),
        ];
        let cfg = AgentConfig {
            token: Arc::new(RwLock::new(token_of(&boot.token))),
            default_env: default_env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            sandbox_env: Arc::new(RwLock::new(boot.env.clone())),
            run_as: Some((GUEST_UID, GUEST_GID)),
            file_owner: Some((GUEST_UID, GUEST_GID)),
            default_cwd: Some(PathBuf::from("/workspace")),
            init_script: boot.init.clone().filter(|s| !s.trim().is_empty()),
            owns_clock: true,
            owns_machine: true,
        };
        let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
        (
            cfg,
            Endpoints::Tcp {
                control: any(CONTROL_PORT),
                forward: any(FORWARD_PORT),
            },
        )
    }

    /// Test mode: Unix sockets from `LOHAR_SOCK` / `LOHAR_FWD_SOCK`, children
    /// run as the current user in the agent's cwd. `LOHAR_TOKEN` turns on
    /// AUTH; `LOHAR_ENV` (a JSON object) plays the sandbox env and
    /// `LOHAR_INIT` the init script, so those paths are testable too.
    pub fn test_from_env() -> Result<(AgentConfig, Endpoints), String> {
        let var = |k: &str| std::env::var(k).ok();
        let control = var("LOHAR_SOCK").ok_or("LOHAR_SOCK is not set")?;
        let forward = var("LOHAR_FWD_SOCK").ok_or("LOHAR_FWD_SOCK is not set")?;
        let sandbox_env = match var("LOHAR_ENV") {
            Some(j) => serde_json::from_str(&j)
                .map_err(|e| format!("LOHAR_ENV is not a JSON object of strings: {e}"))?,
            None => BTreeMap::new(),
        };
        let mut default_env = BTreeMap::new();
        // The same PATH and LANG as inside a VM, whatever the agent's own
        // environment: the reference agent's test suite relies on it.
        default_env.insert("PATH".into(), STD_PATH.into());
        default_env.insert("TERM".into(), "xterm-256color".into());
        default_env.insert("LANG".into(), DEFAULT_LANG.into());
        for k in ["HOME", "USER"] {
            if let Some(v) = var(k) {
                default_env.insert(k.into(), v);
            }
        }
        let cfg = AgentConfig {
            token: Arc::new(RwLock::new(
                var("LOHAR_TOKEN").as_deref().and_then(token_of),
            )),
            default_env,
            sandbox_env: Arc::new(RwLock::new(sandbox_env)),
            run_as: None,
            file_owner: None,
            default_cwd: None,
            init_script: var("LOHAR_INIT").filter(|s| !s.trim().is_empty()),
            owns_clock: false,
            owns_machine: false,
        };
        Ok((
            cfg,
            Endpoints::Unix {
                control: control.into(),
                forward: forward.into(),
            },
        ))
    }

    /// The environment of a child: defaults < sandbox env < request env.
    pub fn child_env(
        &self,
        request: Option<&BTreeMap<String, String>>,
    ) -> BTreeMap<String, String> {
        let mut env = self.default_env.clone();
        let sandbox = self.sandbox_env.read().unwrap_or_else(|p| p.into_inner());
        env.extend(sandbox.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(r) = request {
            env.extend(r.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        env
    }

    /// The AUTH token in effect.
    pub fn current_token(&self) -> Option<Vec<u8>> {
        self.token.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A request path made absolute against the default cwd.
    pub fn resolve(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        match (&self.default_cwd, p.is_absolute()) {
            (Some(base), false) => base.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// argv of the init session: a login shell running the script.
    pub fn init_argv(&self) -> Option<Vec<String>> {
        self.init_script.as_deref().map(init_argv_for)
    }
}

/// argv of an init session running `script`: a login shell.
pub fn init_argv_for(script: &str) -> Vec<String> {
    let shell = if Path::new("/bin/bash").exists() {
        "/bin/bash"
    } else {
        "/bin/sh"
    };
    vec![shell.into(), "-lc".into(), script.to_string()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_merge_order() {
        let mut boot = BootConfig {
            token: "t".into(),
            ..Default::default()
        };
        boot.env.insert("HOME".into(), "/sandbox".into());
        boot.env.insert("A".into(), "sandbox".into());
        let (cfg, _) = AgentConfig::vm(&boot);
        let req: BTreeMap<String, String> = [("A".to_string(), "req".to_string())].into();
        let env = cfg.child_env(Some(&req));
        assert_eq!(env["HOME"], "/sandbox");
        assert_eq!(env["A"], "req");
        assert_eq!(env["USER"], "lohar");
        assert_eq!(cfg.current_token().as_deref(), Some(&b"t"[..]));
    }

    #[test]
    fn empty_token_means_no_auth_and_relative_paths_resolve() {
        let (cfg, _) = AgentConfig::vm(&BootConfig::default());
        assert!(cfg.current_token().is_none());
        assert_eq!(cfg.resolve("a/b"), PathBuf::from("/workspace/a/b"));
        assert_eq!(cfg.resolve("/x"), PathBuf::from("/x"));
    }
}
