//! The base root filesystem: Debian bookworm from `mmdebstrap`, turned into
//! an ext4 image with `mke2fs -d` (no loop mounts, no root-only tricks
//! beyond what mmdebstrap itself needs).

use std::path::Path;
use std::process::Command;

use super::run::{run_checked, run_streaming};
use super::ImageError;

pub const SUITE: &str = "bookworm";
pub const VARIANT: &str = "minbase";

/// What a coding agent expects to find, and is cheap.
pub const PACKAGES: &[&str] = &[
    "bash",
    "coreutils",
    "ca-certificates",
    "curl",
    "wget",
    "git",
    "python3",
    "python3-venv",
    "procps",
    "psmisc",
    "lsof",
    "iproute2",
    "iputils-ping",
    "netbase",
    "less",
    "ripgrep",
    "fd-find",
    "sudo",
    "openssh-client",
    "xz-utils",
    "bzip2",
    "zstd",
    "unzip",
    "zip",
    "file",
    "jq",
    "make",
    "patch",
    "tree",
    "vim-tiny",
    "nano",
    "tzdata",
    "locales",
];

/// The unprivileged user commands run as.
pub const USER: &str = "lohar";
pub const USER_UID: u32 = 1000;
/// Hostname baked into the image; lohar sets the real one at boot.
pub const PLACEHOLDER_HOSTNAME: &str = "bhatti";

/// Smallest image; it is a sparse file, so unused space costs nothing.
const MIN_IMAGE_BYTES: u64 = 4 << 30;
/// Free space the image keeps beyond its contents, at least.
const HEADROOM_BYTES: u64 = 2 << 30;

/// Run by mmdebstrap inside the finished tree (`$1` is its path).
fn customize_hook() -> String {
    format!(
        r#"set -e
r="$1"
chroot "$r" groupadd -g {uid} {user}
chroot "$r" useradd -m -u {uid} -g {uid} -G sudo -s /bin/bash {user}
printf '%s ALL=(ALL:ALL) NOPASSWD:ALL\n' {user} > "$r/etc/sudoers.d/{user}"
chmod 0440 "$r/etc/sudoers.d/{user}"
mkdir -p "$r/workspace"
chown {uid}:{uid} "$r/workspace"
echo {host} > "$r/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\t{host}\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$r/etc/hosts"
: > "$r/etc/fstab"
echo 'en_US.UTF-8 UTF-8' > "$r/etc/locale.gen"
chroot "$r" locale-gen
echo 'LANG=en_US.UTF-8' > "$r/etc/default/locale"
rm -f "$r/etc/resolv.conf"
: > "$r/etc/resolv.conf"
"#,
        uid = USER_UID,
        user = USER,
        host = PLACEHOLDER_HOSTNAME,
    )
}

/// Paths dpkg skips: docs, man pages and translations (no man-db in the image).
const DPKG_EXCLUDES: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/info/*",
];

/// Everything that decides the content of the rootfs, for the cache key.
pub fn recipe() -> String {
    format!(
        "suite={SUITE}\nvariant={VARIANT}\npackages={}\nuser={USER}:{USER_UID}\nexcludes={}\nhook={}",
        PACKAGES.join(","),
        DPKG_EXCLUDES.join(","),
        customize_hook()
    )
}

/// The Debian archive entries of this host's apt configuration (deb822
/// `.sources` or one-line `.list`) for `suite` and its -updates/-security
/// companions, as a deb822 text for mmdebstrap; `None` when there are none
/// (then mmdebstrap picks its own default mirror).
pub fn host_sources(apt_dir: &Path, suite: &str) -> Option<String> {
    let mut files = Vec::new();
    let main = apt_dir.join("sources.list");
    if main.is_file() {
        files.push(main);
    }
    if let Ok(rd) = std::fs::read_dir(apt_dir.join("sources.list.d")) {
        let mut more: Vec<_> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "list" || x == "sources"))
            .collect();
        more.sort();
        files.extend(more);
    }
    let wanted = |s: &str| {
        s == suite
            || s.strip_prefix(suite)
                .is_some_and(|r| r == "-updates" || r == "-security")
    };
    let mut out = String::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        let entries = if f.extension().is_some_and(|x| x == "sources") {
            parse_deb822(&text)
        } else {
            parse_one_line(&text)
        };
        for (uris, suites, components) in entries {
            let suites: Vec<_> = suites.into_iter().filter(|s| wanted(s)).collect();
            if suites.is_empty() || !components.iter().any(|c| c == "main") {
                continue;
            }
            out.push_str(&format!(
                "Types: deb\nURIs: {}\nSuites: {}\nComponents: {}\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n",
                uris.join(" "),
                suites.join(" "),
                components.join(" ")
            ));
        }
    }
    (!out.is_empty()).then_some(out)
}

type Entry = (Vec<String>, Vec<String>, Vec<String>);

fn parse_deb822(text: &str) -> Vec<Entry> {
    text.split("\n\n")
        .filter_map(|stanza| {
            let mut types = Vec::new();
            let (mut uris, mut suites, mut comps) = (Vec::new(), Vec::new(), Vec::new());
            let mut enabled = true;
            for line in stanza.lines().filter(|l| !l.trim_start().starts_with('#')) {
                let Some((k, v)) = line.split_once(':') else {
                    continue;
                };
                let words = || v.split_whitespace().map(str::to_string).collect::<Vec<_>>();
                match k.trim().to_ascii_lowercase().as_str() {
                    "types" => types = words(),
                    "uris" => uris = words(),
                    "suites" => suites = words(),
                    "components" => comps = words(),
                    "enabled" => enabled = v.trim() != "no",
                    _ => {}
                }
            }
            (enabled && types.iter().any(|t| t == "deb") && !uris.is_empty())
                .then_some((uris, suites, comps))
        })
        .collect()
}

fn parse_one_line(text: &str) -> Vec<Entry> {
    text.lines()
        .filter_map(|line| {
            let line = line.split('#').next()?.trim();
            let mut words = line.split_whitespace();
            if words.next()? != "deb" {
                return None;
            }
            let mut uri = words.next()?;
            if uri.starts_with('[') {
                // Options like [arch=amd64 signed-by=...]: skip to after ']'.
                while !uri.ends_with(']') {
                    uri = words.next()?;
                }
                uri = words.next()?;
            }
            let suite = words.next()?.to_string();
            Some((
                vec![uri.to_string()],
                vec![suite],
                words.map(str::to_string).collect(),
            ))
        })
        .collect()
}

/// Builds the Debian tree in `tree` (must not exist yet) with mmdebstrap.
pub fn debootstrap(
    tree: &Path,
    sources: Option<&Path>,
    on_line: &mut dyn FnMut(&str),
) -> Result<(), ImageError> {
    let mut cmd = Command::new("mmdebstrap");
    cmd.arg(format!("--variant={VARIANT}"))
        .arg("--mode=root")
        .arg("--format=directory")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .arg("--customize-hook")
        .arg(customize_hook());
    for ex in DPKG_EXCLUDES {
        cmd.arg(format!("--dpkgopt={ex}"));
    }
    cmd.arg(SUITE).arg(tree);
    if let Some(s) = sources {
        cmd.arg(s);
    }
    // Never let a host locale or a debconf frontend leak in.
    cmd.env("LC_ALL", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive");
    run_streaming(&mut cmd, "mmdebstrap", on_line).map_err(|e| ImageError::Rootfs(e.to_string()))
}

/// Apparent size of everything under `dir`, each file rounded up to 4 KiB.
pub fn tree_size(dir: &Path) -> Result<u64, ImageError> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).map_err(|e| ImageError::io(&d, e))? {
            let entry = entry.map_err(|e| ImageError::io(&d, e))?;
            let md = entry
                .metadata()
                .map_err(|e| ImageError::io(&entry.path(), e))?;
            if md.is_dir() {
                stack.push(entry.path());
            }
            total += md.len().div_ceil(4096) * 4096 + 4096;
        }
    }
    Ok(total)
}

/// Size of the sparse image file for contents of `used` bytes: whole GiB.
pub fn image_size(used: u64) -> u64 {
    let want = (used + HEADROOM_BYTES).max(MIN_IMAGE_BYTES);
    want.div_ceil(1 << 30) << 30
}

/// Makes the sparse ext4 image `image` from the tree `tree`.
pub fn make_ext4(tree: &Path, image: &Path) -> Result<u64, ImageError> {
    let size = image_size(tree_size(tree)?);
    let f = std::fs::File::create(image).map_err(|e| ImageError::io(image, e))?;
    f.set_len(size).map_err(|e| ImageError::io(image, e))?;
    drop(f);
    run_checked(
        Command::new("mke2fs")
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-b",
                "4096",
                "-m",
                "0",
                "-L",
                "bhatti-root",
            ])
            // Zero inode tables and journal now (as holes in the sparse file), so
            // a guest never spends its first minutes, and its overlay, doing it.
            .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
            .arg("-d")
            .arg(tree)
            .arg(image),
        "mke2fs",
    )
    .map_err(|e| ImageError::Rootfs(e.to_string()))?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_debian_entries_from_host_sources() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("sources.list.d")).expect("mkdir");
        std::fs::write(
            dir.path().join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
             Components: main\nSigned-By: /k.gpg\n\n\
             Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\
             Components: main\n\n\
             Types: deb\nURIs: https://other.example\nSuites: nodistro\nComponents: main\n",
        )
        .expect("write");
        std::fs::write(
            dir.path().join("sources.list"),
            "deb [arch=amd64] http://old.example/debian bookworm main contrib # c\ndeb-src http://x bookworm main\n",
        )
        .expect("write");
        let s = host_sources(dir.path(), "bookworm").expect("entries found");
        assert!(
            s.contains("URIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates"),
            "{s}"
        );
        assert!(s.contains("Suites: bookworm-security"), "{s}");
        assert!(
            s.contains(
                "URIs: http://old.example/debian\nSuites: bookworm\nComponents: main contrib"
            ),
            "{s}"
        );
        assert!(
            !s.contains("other.example") && !s.contains("http://x"),
            "{s}"
        );
    }

    #[test]
    fn no_matching_sources_means_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(host_sources(dir.path(), "bookworm"), None);
    }

    #[test]
    fn image_sizes() {
        assert_eq!(image_size(300 << 20), 4 << 30);
        assert_eq!(image_size(3 << 30), 5 << 30);
    }
}
