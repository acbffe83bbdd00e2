//! Machine-readable error codes: the ERROR_CODE frame that precedes an
//! ERROR frame, and the mapping of I/O errors to codes and to the short
//! lower-case POSIX phrases the agent puts in its messages.

use std::io;

use serde::{Deserialize, Serialize};

/// What kind of failure an ERROR frame reports. Travels as a snake_case
/// string; a code this build does not know decodes as [`ErrorCode::Internal`],
/// so a newer agent never breaks an older host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The path, session or other named thing does not exist.
    NotFound,
    /// A path component that must be a directory is not one.
    NotADirectory,
    /// The operation needs a file but the path is a directory.
    IsADirectory,
    /// The guest's permissions forbid it.
    PermissionDenied,
    /// The request or its data exceeds a limit.
    TooLarge,
    /// The guest's disk (or quota) is full.
    NoSpace,
    /// The request itself is malformed or names something unusable.
    Invalid,
    /// The target is in use (attached session, connection cap, busy file).
    Busy,
    /// The thing to create already exists.
    Exists,
    /// Anything else: a fault in the agent or the guest.
    #[serde(other)]
    Internal,
}

/// Payload of the ERROR_CODE frame: `{"code":"not_found"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorCodeInfo {
    pub code: ErrorCode,
}

impl ErrorCode {
    /// The code's wire name, e.g. `"not_found"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::NotFound => "not_found",
            ErrorCode::NotADirectory => "not_a_directory",
            ErrorCode::IsADirectory => "is_a_directory",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::NoSpace => "no_space",
            ErrorCode::Invalid => "invalid",
            ErrorCode::Busy => "busy",
            ErrorCode::Exists => "exists",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code for an I/O error of this kind.
    pub fn of_io(kind: io::ErrorKind) -> ErrorCode {
        use io::ErrorKind as K;
        match kind {
            K::NotFound => ErrorCode::NotFound,
            K::NotADirectory => ErrorCode::NotADirectory,
            K::IsADirectory => ErrorCode::IsADirectory,
            K::PermissionDenied | K::ReadOnlyFilesystem => ErrorCode::PermissionDenied,
            K::StorageFull | K::QuotaExceeded => ErrorCode::NoSpace,
            K::FileTooLarge => ErrorCode::TooLarge,
            K::AlreadyExists => ErrorCode::Exists,
            K::ResourceBusy | K::ExecutableFileBusy | K::WouldBlock => ErrorCode::Busy,
            K::InvalidInput | K::InvalidFilename | K::DirectoryNotEmpty => ErrorCode::Invalid,
            _ => ErrorCode::Internal,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The lower-case POSIX phrase for an I/O error ("no such file or
/// directory"), without Rust's " (os error N)" suffix.
pub fn io_phrase(e: &io::Error) -> String {
    use io::ErrorKind as K;
    let known = match e.kind() {
        K::NotFound => "no such file or directory",
        K::PermissionDenied => "permission denied",
        K::NotADirectory => "not a directory",
        K::IsADirectory => "is a directory",
        K::AlreadyExists => "file exists",
        K::StorageFull => "no space left on device",
        K::QuotaExceeded => "disk quota exceeded",
        K::ReadOnlyFilesystem => "read-only file system",
        K::FileTooLarge => "file too large",
        K::ResourceBusy => "device or resource busy",
        K::ExecutableFileBusy => "text file busy",
        K::InvalidFilename => "file name too long",
        K::DirectoryNotEmpty => "directory not empty",
        _ => "",
    };
    if !known.is_empty() {
        return known.to_string();
    }
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => &text[..i],
        _ => &text[..],
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorCode; 10] = [
        ErrorCode::NotFound,
        ErrorCode::NotADirectory,
        ErrorCode::IsADirectory,
        ErrorCode::PermissionDenied,
        ErrorCode::TooLarge,
        ErrorCode::NoSpace,
        ErrorCode::Invalid,
        ErrorCode::Busy,
        ErrorCode::Exists,
        ErrorCode::Internal,
    ];

    #[test]
    fn wire_names_are_the_serde_names() {
        for c in ALL {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), c);
        }
    }

    #[test]
    fn unknown_codes_decode_as_internal() {
        assert_eq!(
            serde_json::from_str::<ErrorCode>("\"out_of_coffee\"").unwrap(),
            ErrorCode::Internal
        );
    }

    #[test]
    fn io_errors_map_to_codes_and_phrases() {
        let e = io::Error::from_raw_os_error(2);
        assert_eq!(ErrorCode::of_io(e.kind()), ErrorCode::NotFound);
        assert_eq!(io_phrase(&e), "no such file or directory");
        let e = io::Error::from_raw_os_error(20);
        assert_eq!(ErrorCode::of_io(e.kind()), ErrorCode::NotADirectory);
        assert_eq!(io_phrase(&e), "not a directory");
        let e = io::Error::from_raw_os_error(21);
        assert_eq!(ErrorCode::of_io(e.kind()), ErrorCode::IsADirectory);
        let e = io::Error::from_raw_os_error(13);
        assert_eq!(ErrorCode::of_io(e.kind()), ErrorCode::PermissionDenied);
        assert_eq!(io_phrase(&e), "permission denied");
        let e = io::Error::from_raw_os_error(28);
        assert_eq!(ErrorCode::of_io(e.kind()), ErrorCode::NoSpace);
        assert_eq!(io_phrase(&e), "no space left on device");
        // An errno without a phrase of ours: the libc text, cleaned.
        let e = io::Error::from_raw_os_error(71); // EPROTO
        let p = io_phrase(&e);
        assert!(!p.contains("os error"), "{p}");
        assert!(p.starts_with(|c: char| c.is_lowercase()), "{p}");
        assert_eq!(ErrorCode::of_io(e.kind()), ErrorCode::Internal);
    }
}
