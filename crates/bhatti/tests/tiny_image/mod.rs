//! A tiny bootable image built from host files, for the image tests.
#![allow(dead_code)]

use std::path::Path;

/// A tar of entries: (path, Some(contents), mode) files or (path, None, _) directories.
pub fn tar_of(entries: &[(&str, Option<Vec<u8>>, u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_mode(*mode);
        match data {
            Some(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                h.set_cksum();
                b.append_data(&mut h, path, d.as_slice()).expect("append");
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_cksum();
                b.append_data(&mut h, path, &[][..]).expect("append");
            }
        }
    }
    b.into_inner().expect("tar")
}

fn host_file(p: &str) -> Vec<u8> {
    let real = Path::new(p).canonicalize().expect("host file");
    std::fs::read(real).expect("read host file")
}

/// Layer 1: a tiny root (dash, cat, ls and their libraries from the host,
/// /etc/removed-me); layer 2, gzipped: a whiteout of /etc/removed-me and a
/// new /etc/added ("layer-two").
pub fn layers() -> (Vec<u8>, Vec<u8>) {
    let lib = "lib/x86_64-linux-gnu";
    let mut l1: Vec<(&str, Option<Vec<u8>>, u32)> = vec![
        ("bin/", None, 0o755),
        ("bin/sh", Some(host_file("/bin/sh")), 0o755),
        ("bin/cat", Some(host_file("/bin/cat")), 0o755),
        ("bin/ls", Some(host_file("/bin/ls")), 0o755),
        ("lib/", None, 0o755),
        ("lib/x86_64-linux-gnu/", None, 0o755),
        ("lib64/", None, 0o755),
        (
            "lib64/ld-linux-x86-64.so.2",
            Some(host_file("/lib64/ld-linux-x86-64.so.2")),
            0o755,
        ),
        ("etc/", None, 0o755),
        (
            "etc/passwd",
            Some(b"root:x:0:0:root:/root:/bin/sh\n".to_vec()),
            0o644,
        ),
        ("etc/group", Some(b"root:x:0:\n".to_vec()), 0o644),
        ("etc/removed-me", Some(b"lower layer\n".to_vec()), 0o644),
    ];
    let libs: Vec<(String, Vec<u8>)> = ["libc.so.6", "libselinux.so.1", "libpcre2-8.so.0"]
        .iter()
        .map(|l| (format!("{lib}/{l}"), host_file(&format!("/{lib}/{l}"))))
        .collect();
    for (p, data) in &libs {
        l1.push((p.as_str(), Some(data.clone()), 0o755));
    }
    let layer1 = tar_of(&l1);
    let layer2 = {
        let raw = tar_of(&[
            ("etc/", None, 0o755),
            ("etc/.wh.removed-me", Some(Vec::new()), 0o644),
            ("etc/added", Some(b"layer-two\n".to_vec()), 0o644),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &raw).expect("gzip");
        gz.finish().expect("gzip")
    };
    (layer1, layer2)
}

/// A `docker save` tarball of [`layers`].
pub fn docker_save_tarball() -> Vec<u8> {
    let (layer1, layer2) = layers();
    let manifest =
        br#"[{"Config":"cfg.json","RepoTags":["tiny:1"],"Layers":["a/layer.tar","b/layer.tar"]}]"#
            .to_vec();
    tar_of(&[
        ("manifest.json", Some(manifest), 0o644),
        ("cfg.json", Some(b"{}".to_vec()), 0o644),
        ("a/", None, 0o755),
        ("a/layer.tar", Some(layer1), 0o644),
        ("b/", None, 0o755),
        ("b/layer.tar", Some(layer2), 0o644),
    ])
}
