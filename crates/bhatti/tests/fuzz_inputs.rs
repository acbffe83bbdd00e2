//! Property tests (proptest, stable Rust) of the daemon's input parsers:
//! the config files (daemon and CLI), the subnet syntax, and the name,
//! label, alias and secret-name validators. Arbitrary input never panics;
//! what is accepted obeys the documented rule and survives a round trip.

use std::collections::BTreeMap;
use std::path::Path;

use bhatti::config::{ClientConfig, DaemonConfig, Ipv4Subnet};
use bhatti::secrets::validate_secret_name;
use bhatti::store::labels::{self, MAX_KEY_LEN, MAX_LABELS, MAX_VALUE_LEN};
use bhatti::store::{generate_alias, validate_alias, validate_sandbox_name, validate_user_name};
use proptest::prelude::*;

/// Characters that matter to the rules, and any others.
fn tricky_string(max: usize) -> impl Strategy<Value = String> {
    let ch = prop_oneof![
        6 => prop::sample::select(
            "abcXYZ019.-_/ =:\n\t\u{0}\u{7f}é\u{200b}#{}[]\"'*&!|>%@`,?"
                .chars()
                .collect::<Vec<_>>()
        ),
        1 => any::<char>(),
    ];
    prop::collection::vec(ch, 0..max).prop_map(|v| v.into_iter().collect())
}

/// `[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}`, written out as the reference.
fn is_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// A DNS label of 1-63 characters, no leading or trailing '-'.
fn is_alias(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
}

/// Values for every daemon config key: mostly plausible, some hostile.
fn config_value() -> impl Strategy<Value = serde_yaml_ng::Value> {
    use serde_yaml_ng::Value;
    prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (0u32..100_000).prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        Just(Value::Null),
        prop::sample::select(vec![
            "127.0.0.1:8080",
            "127.0.0.1:8081",
            "[::1]:9",
            "0.0.0.0:0",
            "/var/lib/x",
            "rel/dir",
            "/",
            "tcg",
            "kvm",
            "auto",
            "http",
            "https",
            "10.0.0.0/8",
            "192.168.1.0/31",
            "10.0.0.1/24",
            "0.0.0.0/0",
            "brx",
            "a-very-long-bridge-name",
            "ns",
            "../ns",
            "localhost",
            "sb.example.com",
            "-bad.example",
            "",
            "~",
            "yes",
        ])
        .prop_map(|s| Value::String(s.into())),
        tricky_string(40).prop_map(Value::String),
        prop::collection::vec(any::<u8>().prop_map(Value::from), 0..3).prop_map(Value::Sequence),
    ]
}

fn config_key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(DaemonConfig::KEYS.to_vec()).prop_map(String::from),
        1 => tricky_string(12),
    ]
}

proptest! {
    /// Arbitrary text as a daemon config: a config or an error, never a
    /// panic.
    #[test]
    fn daemon_config_takes_arbitrary_text(text in tricky_string(200)) {
        let _ = DaemonConfig::from_yaml(&text, Path::new("/fuzz.yaml"));
    }

    /// Mappings of real keys to arbitrary values: an accepted config is
    /// valid (absolute dirs, distinct listeners, non-zero timeouts) and
    /// reads back the same after being written out; a refused one names a
    /// key or the file.
    #[test]
    fn daemon_config_mappings(entries in prop::collection::vec((config_key(), config_value()), 0..10)) {
        let mut map = serde_yaml_ng::Mapping::new();
        for (k, v) in entries {
            map.insert(serde_yaml_ng::Value::String(k), v);
        }
        let text = serde_yaml_ng::to_string(&map).expect("yaml");
        match DaemonConfig::from_yaml(&text, Path::new("/fuzz.yaml")) {
            Ok(c) => {
                prop_assert!(c.data_dir.is_absolute() && c.images_dir.is_absolute());
                prop_assert!(c.listen != Some(c.public_listen));
                prop_assert!(c.boot_timeout_secs >= 1 && c.max_concurrent_restores >= 1);
                let again = serde_yaml_ng::to_string(&c).expect("yaml");
                let back = DaemonConfig::from_yaml(&again, Path::new("/fuzz.yaml"));
                prop_assert_eq!(back.ok(), Some(c));
            }
            Err(e) => prop_assert!(e.to_string().contains("/fuzz.yaml"), "{}", e),
        }
    }

    /// The CLI's config file: anything in it is a config or an error.
    #[test]
    fn client_config_takes_arbitrary_text(text in tricky_string(120)) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, &text).expect("write");
        if let Ok(Some(c)) = ClientConfig::load(&path) {
            c.save(&path).expect("save");
            prop_assert_eq!(ClientConfig::load(&path).expect("reload"), Some(c));
        }
    }

    /// Subnets: arbitrary text never panics; an accepted one prints back to
    /// itself and its gateway is inside it.
    #[test]
    fn subnets(text in prop_oneof![
        tricky_string(24),
        (any::<[u8; 4]>(), 0u8..40).prop_map(|(a, p)| format!("{}.{}.{}.{}/{p}", a[0], a[1], a[2], a[3])),
    ]) {
        if let Ok(s) = text.parse::<Ipv4Subnet>() {
            prop_assert_eq!(s.to_string().parse::<Ipv4Subnet>().ok(), Some(s));
            prop_assert!(s.contains(s.gateway()));
        }
    }

    /// Sandbox and user names follow `[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}`
    /// exactly.
    #[test]
    fn names_follow_the_rule(s in prop_oneof![tricky_string(70), "[a-zA-Z0-9._-]{0,70}".prop_map(|s| s)]) {
        prop_assert_eq!(validate_sandbox_name(&s).is_ok(), is_name(&s), "{:?}", s);
        prop_assert_eq!(validate_user_name(&s).is_ok(), is_name(&s), "{:?}", s);
    }

    /// Aliases are DNS labels, and the alias generated for any valid
    /// sandbox name is one.
    #[test]
    fn aliases(s in tricky_string(70), name in "[a-zA-Z0-9][a-zA-Z0-9._-]{0,62}") {
        prop_assert_eq!(validate_alias(&s).is_ok(), is_alias(&s), "{:?}", s);
        let generated = generate_alias(&name);
        prop_assert!(validate_alias(&generated).is_ok(), "{:?} from {:?}", generated, name);
        prop_assert_eq!(generated.to_ascii_lowercase(), generated);
    }

    /// Labels: the key and value rules, the count limit, and `key=value`
    /// parsing agree with each other.
    #[test]
    fn labels(
        pairs in prop::collection::btree_map(tricky_string(70), tricky_string(300), 0..20),
    ) {
        for (k, v) in &pairs {
            let key_ok = k.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
                && k.chars().count() <= MAX_KEY_LEN
                && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
            prop_assert_eq!(labels::validate_key(k).is_ok(), key_ok, "{:?}", k);
            let value_ok = v.chars().count() <= MAX_VALUE_LEN && !v.chars().any(char::is_control);
            prop_assert_eq!(labels::validate_pair(k, v).is_ok(), key_ok && value_ok);
            // A valid key has no '=': `k=v` parses back to the pair.
            if key_ok && value_ok {
                prop_assert_eq!(labels::parse_pair(&format!("{k}={v}")).ok(), Some((k.clone(), v.clone())));
            }
        }
        let all_ok = pairs.iter().all(|(k, v)| labels::validate_pair(k, v).is_ok());
        let set: BTreeMap<String, String> = pairs.clone();
        prop_assert_eq!(labels::validate(&set).is_ok(), all_ok && pairs.len() <= MAX_LABELS);
    }

    /// Secret names are environment variable names of at most 128 bytes;
    /// the error message never echoes an unbounded name.
    #[test]
    fn secret_names(s in prop_oneof![tricky_string(200), "[A-Za-z_][A-Za-z0-9_]{0,140}".prop_map(|s| s)]) {
        let want = s.len() <= 128
            && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        match validate_secret_name(&s) {
            Ok(()) => prop_assert!(want, "{:?}", s),
            Err(e) => {
                prop_assert!(!want, "{:?}: {}", s, e);
                prop_assert!(e.to_string().len() < 400);
            }
        }
    }
}
