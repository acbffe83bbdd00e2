//! age encryption of user secrets.
//!
//! The daemon owns one X25519 identity at `<data_dir>/age.key` (mode 0600,
//! created on first start). Secret values are encrypted to it before they
//! reach the store, so `state.db` never holds a plaintext value.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use zeroize::Zeroizing;

/// File name of the identity inside the data dir.
pub const KEY_FILE: &str = "age.key";
/// Longest secret name accepted.
pub const MAX_SECRET_NAME_LEN: usize = 128;
/// Largest secret value accepted, in bytes.
pub const MAX_SECRET_VALUE_LEN: usize = 64 * 1024;

/// Errors of the secrets module.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// Reading or creating the key file failed.
    #[error("age key {path}: {source}")]
    KeyIo {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The key file holds no valid age identity.
    #[error("age key {path} is not a valid age X25519 identity: {reason}")]
    KeyInvalid { path: PathBuf, reason: String },
    /// The secret name is not an environment variable name.
    #[error("invalid secret name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// The value is too large.
    #[error("secret value is {len} bytes; the limit is {MAX_SECRET_VALUE_LEN}")]
    ValueTooLarge { len: usize },
    /// The value holds a NUL byte, which an environment variable cannot.
    #[error("secret value holds a NUL byte, which an environment variable cannot carry")]
    ValueHasNul,
    #[error("encrypting secret failed: {0}")]
    Encrypt(String),
    /// Wrong key, or corrupted ciphertext.
    #[error("decrypting secret failed: {0}")]
    Decrypt(String),
}

/// Checks that `name` can be an environment variable name:
/// `[A-Za-z_][A-Za-z0-9_]*`, at most [`MAX_SECRET_NAME_LEN`] characters.
pub fn validate_secret_name(name: &str) -> Result<(), SecretsError> {
    let bad = |reason| {
        Err(SecretsError::InvalidName {
            name: name.chars().take(MAX_SECRET_NAME_LEN + 8).collect(),
            reason,
        })
    };
    let mut chars = name.chars();
    match chars.next() {
        None => return bad("must not be empty"),
        Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
            return bad("must start with a letter or '_'")
        }
        Some(_) => {}
    }
    if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return bad("may contain only letters, digits and '_'");
    }
    if name.len() > MAX_SECRET_NAME_LEN {
        return bad("longer than 128 characters");
    }
    Ok(())
}

/// Checks a secret value's size.
pub fn validate_secret_value(value: &str) -> Result<(), SecretsError> {
    if value.len() > MAX_SECRET_VALUE_LEN {
        return Err(SecretsError::ValueTooLarge { len: value.len() });
    }
    if value.contains('\0') {
        return Err(SecretsError::ValueHasNul);
    }
    Ok(())
}

/// Encrypts and decrypts secret values with the daemon's age identity.
#[derive(Clone)]
pub struct SecretCipher {
    identity: age::x25519::Identity,
    recipient: age::x25519::Recipient,
}

impl std::fmt::Debug for SecretCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the identity.
        f.debug_struct("SecretCipher")
            .field("recipient", &self.recipient.to_string())
            .finish()
    }
}

impl SecretCipher {
    /// Loads `<data_dir>/age.key`, creating it (mode 0600) when missing.
    ///
    /// Creation is atomic: the key is written to a temporary file that is
    /// born with mode 0600, synced, then hard-linked into place, so the file
    /// is never visible half-written or with wider permissions, and two
    /// processes starting at once agree on one key (the loser reads the
    /// winner's).
    pub fn load_or_create(data_dir: &Path) -> Result<Self, SecretsError> {
        let path = data_dir.join(KEY_FILE);
        match Self::load(&path) {
            Err(SecretsError::KeyIo { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        let io = |source| SecretsError::KeyIo {
            path: path.clone(),
            source,
        };
        let identity = age::x25519::Identity::generate();
        let recipient = identity.to_public();
        let created = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let text = Zeroizing::new(format!(
            "# bhatti secrets key: losing it makes every stored secret unreadable.\n\
             # created: {created}\n# public key: {recipient}\n{}\n",
            identity.to_string().expose_secret()
        ));
        // tempfile creates the file with O_EXCL and mode 0600.
        let mut tmp = tempfile::Builder::new()
            .prefix(".age.key.")
            .tempfile_in(data_dir)
            .map_err(io)?;
        tmp.write_all(text.as_bytes()).map_err(io)?;
        tmp.as_file().sync_all().map_err(io)?;
        match std::fs::hard_link(tmp.path(), &path) {
            Ok(()) => {
                if let Ok(dir) = std::fs::File::open(data_dir) {
                    let _ = dir.sync_all();
                }
                tracing::info!(path = %path.display(), "created a new age key for secrets");
                Ok(Self {
                    identity,
                    recipient,
                })
            }
            // Another process created it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Self::load(&path),
            Err(e) => Err(io(e)),
        }
    }

    /// Loads an existing key file.
    pub fn load(path: &Path) -> Result<Self, SecretsError> {
        let io = |source| SecretsError::KeyIo {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{:o}", meta.permissions().mode() & 0o777),
                "age key is readable by group or others; chmod 600 it"
            );
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'))
            .ok_or_else(|| SecretsError::KeyInvalid {
                path: path.to_path_buf(),
                reason: "no key line found".into(),
            })?;
        let identity =
            age::x25519::Identity::from_str(line).map_err(|reason| SecretsError::KeyInvalid {
                path: path.to_path_buf(),
                reason: reason.to_string(),
            })?;
        let recipient = identity.to_public();
        Ok(Self {
            identity,
            recipient,
        })
    }

    /// The public key (`age1…`), safe to log.
    pub fn public_key(&self) -> String {
        self.recipient.to_string()
    }

    /// Encrypts a secret value (binary age format, no armor).
    pub fn encrypt(&self, plaintext: &str) -> Result<Vec<u8>, SecretsError> {
        validate_secret_value(plaintext)?;
        age::encrypt(&self.recipient, plaintext.as_bytes())
            .map_err(|e| SecretsError::Encrypt(e.to_string()))
    }

    /// Decrypts a value produced by [`SecretCipher::encrypt`].
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Zeroizing<String>, SecretsError> {
        let bytes = Zeroizing::new(
            age::decrypt(&self.identity, ciphertext)
                .map_err(|e| SecretsError::Decrypt(e.to_string()))?,
        );
        match std::str::from_utf8(&bytes) {
            Ok(s) => Ok(Zeroizing::new(s.to_string())),
            Err(_) => Err(SecretsError::Decrypt("value is not UTF-8".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["A", "_", "API_KEY", "a1", "_x_9", &"A".repeat(128)] {
            validate_secret_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in ["", "1A", "A-B", "A B", "Ä", "A=B", "a.b", &"A".repeat(129)] {
            assert!(validate_secret_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn key_created_with_0600_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c1 = SecretCipher::load_or_create(dir.path()).expect("create");
        let path = dir.path().join(KEY_FILE);
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("readdir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from(KEY_FILE)]);
        let c2 = SecretCipher::load_or_create(dir.path()).expect("load");
        assert_eq!(c1.public_key(), c2.public_key());
        let ct = c1.encrypt("hunter2").expect("encrypt");
        assert_eq!(c2.decrypt(&ct).expect("decrypt").as_str(), "hunter2");
        assert!(!format!("{c1:?}").contains("AGE-SECRET-KEY"));
    }

    #[test]
    fn wrong_key_and_garbage_fail() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        let ca = SecretCipher::load_or_create(a.path()).expect("a");
        let cb = SecretCipher::load_or_create(b.path()).expect("b");
        let ct = ca.encrypt("v").expect("encrypt");
        assert!(matches!(cb.decrypt(&ct), Err(SecretsError::Decrypt(_))));
        assert!(matches!(
            ca.decrypt(b"garbage"),
            Err(SecretsError::Decrypt(_))
        ));
    }

    #[test]
    fn bad_key_file_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(KEY_FILE), "# only a comment\n").expect("write");
        let e = SecretCipher::load_or_create(dir.path()).expect_err("invalid");
        assert!(matches!(e, SecretsError::KeyInvalid { .. }), "{e}");
    }

    #[test]
    fn oversized_value_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let c = SecretCipher::load_or_create(dir.path()).expect("create");
        let big = "x".repeat(MAX_SECRET_VALUE_LEN + 1);
        assert!(matches!(
            c.encrypt(&big),
            Err(SecretsError::ValueTooLarge { .. })
        ));
    }
}
