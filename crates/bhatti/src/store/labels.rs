//! Sandbox labels: `key=value` pairs an owner attaches to find and group
//! sandboxes (`bhatti list --label team=ml`).
//!
//! Rules (checked here, once, for create, edit and filters):
//! - at most [`MAX_LABELS`] per sandbox;
//! - a key is 1-63 characters of `a-z A-Z 0-9 . _ - /`, starting with a
//!   letter or digit;
//! - a value is 0-255 characters, none of them a control character.

use std::collections::BTreeMap;

use super::StoreError;

/// Labels a sandbox may carry.
pub const MAX_LABELS: usize = 16;
/// Longest key, in characters.
pub const MAX_KEY_LEN: usize = 63;
/// Longest value, in characters.
pub const MAX_VALUE_LEN: usize = 255;

/// A sandbox's labels, ordered by key.
pub type Labels = BTreeMap<String, String>;

/// Checks one key. Errors: `Invalid` naming the key and the rule.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let ok_first = key
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    let ok_rest = key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if !ok_first || !ok_rest || key.chars().count() > MAX_KEY_LEN {
        return Err(StoreError::Invalid(format!(
            "invalid label key {key:?}: 1-{MAX_KEY_LEN} characters of a-z A-Z 0-9 . _ - /, starting with a letter or digit"
        )));
    }
    Ok(())
}

/// Checks one pair. Errors: `Invalid` naming the key and the rule.
pub fn validate_pair(key: &str, value: &str) -> Result<(), StoreError> {
    validate_key(key)?;
    if value.chars().count() > MAX_VALUE_LEN || value.chars().any(char::is_control) {
        return Err(StoreError::Invalid(format!(
            "invalid value of label {key:?}: at most {MAX_VALUE_LEN} characters, no control characters"
        )));
    }
    Ok(())
}

/// Checks a whole set. Errors: `Invalid` for a bad pair or more than
/// [`MAX_LABELS`].
pub fn validate(labels: &Labels) -> Result<(), StoreError> {
    if labels.len() > MAX_LABELS {
        return Err(StoreError::Invalid(format!(
            "too many labels: {} given, at most {MAX_LABELS}",
            labels.len()
        )));
    }
    labels.iter().try_for_each(|(k, v)| validate_pair(k, v))
}

/// Parses `key=value` (as the CLI and the list filter take them).
/// Errors: `Invalid` when there is no `=` or the pair breaks a rule.
pub fn parse_pair(s: &str) -> Result<(String, String), StoreError> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| StoreError::Invalid(format!("invalid label {s:?}: expected key=value")))?;
    validate_pair(k, v)?;
    Ok((k.to_string(), v.to_string()))
}

/// Whether `labels` holds every pair of `filter` (AND).
pub fn matches(labels: &Labels, filter: &[(String, String)]) -> bool {
    filter
        .iter()
        .all(|(k, v)| labels.get(k).is_some_and(|have| have == v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_at_and_past_the_limits() {
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN)).is_ok());
        assert!(validate_key(&"k".repeat(MAX_KEY_LEN + 1)).is_err());
        assert!(validate_key("team").is_ok());
        assert!(validate_key("app.kubernetes.io/name").is_ok());
        for bad in ["", "-x", ".x", "a b", "a=b", "ü"] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn values_at_and_past_the_limits() {
        assert!(validate_pair("k", "").is_ok());
        assert!(validate_pair("k", &"v".repeat(MAX_VALUE_LEN)).is_ok());
        assert!(validate_pair("k", &"v".repeat(MAX_VALUE_LEN + 1)).is_err());
        assert!(validate_pair("k", "a\nb").is_err());
    }

    #[test]
    fn count_at_and_past_the_limit() {
        let mut l: Labels = (0..MAX_LABELS)
            .map(|i| (format!("k{i}"), "v".into()))
            .collect();
        assert!(validate(&l).is_ok());
        l.insert("one-more".into(), "v".into());
        let e = validate(&l).expect_err("17 labels");
        assert!(e.to_string().contains("at most 16"), "{e}");
    }

    #[test]
    fn pairs_and_filters() {
        assert_eq!(
            parse_pair("team=ml=x").expect("pair"),
            ("team".into(), "ml=x".into())
        );
        assert!(parse_pair("team").is_err());
        let l: Labels = [("team".into(), "ml".into()), ("env".into(), "dev".into())].into();
        assert!(matches(&l, &[]));
        assert!(matches(&l, &[("team".into(), "ml".into())]));
        assert!(!matches(
            &l,
            &[("team".into(), "ml".into()), ("env".into(), "prod".into())]
        ));
    }
}
