//! The guest's boot configuration as a file for QEMU's fw_cfg
//! (`-fw_cfg name=opt/bhatti/config,file=…`).
//!
//! QEMU reads the file into memory when it starts, so once the VM runs the
//! file is scrubbed: token, env (secrets included) and init script are
//! removed, while the entry itself stays so that a later restore can be
//! started with the very same argv.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use bhatti_proto::BootConfig;

/// Errors of writing the config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigDriveError {
    #[error("cannot write boot config {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// The fw_cfg option for this file.
pub fn qemu_arg(path: &Path) -> String {
    format!(
        "name={},file={}",
        bhatti_proto::boot::FW_CFG_NAME,
        path.display()
    )
}

/// Writes `cfg` as JSON to `path`, mode 0600, atomically.
pub fn write(path: &Path, cfg: &BootConfig) -> Result<(), ConfigDriveError> {
    let err = |source| ConfigDriveError::Write {
        path: path.display().to_string(),
        source,
    };
    // Plain strings and maps: serializing cannot fail.
    let json = serde_json::to_vec(cfg).expect("BootConfig always serializes");
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(&json).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(err)
}

/// The config without anything secret: no token, env, init script or RNG seed.
pub fn scrubbed(cfg: &BootConfig) -> BootConfig {
    BootConfig {
        token: String::new(),
        env: Default::default(),
        init: None,
        entropy_hex: String::new(),
        ..cfg.clone()
    }
}

/// Rewrites the file at `path` without secrets.
pub fn scrub(path: &Path, cfg: &BootConfig) -> Result<(), ConfigDriveError> {
    write(path, &scrubbed(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn written_private_then_scrubbed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.json");
        let cfg = BootConfig {
            hostname: "box".into(),
            token: "tok-secret".into(),
            ip: "192.168.137.5/24".into(),
            gateway: "192.168.137.1".into(),
            dns: vec!["1.1.1.1".into()],
            env: [("API_KEY".to_string(), "sk-secret".to_string())].into(),
            init: Some("echo secret-init".into()),
            time_unix_ms: 1,
            volumes: Vec::new(),
            entropy_hex: "5eed".repeat(32),
        };
        write(&path, &cfg).expect("write");
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let back: BootConfig =
            serde_json::from_slice(&std::fs::read(&path).expect("read")).expect("json");
        assert_eq!(back, cfg);
        scrub(&path, &cfg).expect("scrub");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains("secret"), "{text}");
        assert!(!text.contains("5eed"), "the RNG seed stays: {text}");
        assert!(text.contains("192.168.137.5/24"));
        assert_eq!(
            std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert!(qemu_arg(&path).starts_with("name=opt/bhatti/config,file=/"));
    }
}
