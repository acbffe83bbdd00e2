//! `bhatti user list`.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::store::{Store, UserSummary};

const HEADERS: [&str; 6] = [
    "NAME",
    "MAX SANDBOXES",
    "MAX CPUS",
    "MAX MEMORY",
    "SANDBOXES",
    "CREATED",
];

pub fn run(store: &Store, json: bool) -> anyhow::Result<i32> {
    let users = store.list_users()?;
    if json {
        let out: Vec<_> = users
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.user.id,
                    "name": s.user.name,
                    "max_sandboxes": s.user.max_sandboxes,
                    "max_cpus": s.user.max_cpus,
                    "max_memory_mb": s.user.max_memory_mb,
                    "sandboxes": s.sandboxes,
                    "created_at": format_time(s.user.created_at),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(0);
    }
    if users.is_empty() {
        eprintln!("no users yet; create one with: bhatti user create --name NAME");
        return Ok(0);
    }
    print!("{}", render_table(&users));
    Ok(0)
}

/// RFC 3339, UTC, whole seconds.
pub(crate) fn format_time(t: OffsetDateTime) -> String {
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

fn render_table(users: &[UserSummary]) -> String {
    let rows: Vec<[String; 6]> = users
        .iter()
        .map(|s| {
            [
                s.user.name.clone(),
                s.user.max_sandboxes.to_string(),
                s.user.max_cpus.to_string(),
                format!("{} MB", s.user.max_memory_mb),
                s.sandboxes.to_string(),
                format_time(s.user.created_at),
            ]
        })
        .collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                l.push_str(&format!("{cell:<w$}   "));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&HEADERS);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::User;

    #[test]
    fn table_is_aligned() {
        let t = OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("time");
        let mk = |name: &str, n| UserSummary {
            user: User {
                id: 1,
                name: name.into(),
                max_sandboxes: 5,
                max_cpus: 4,
                max_memory_mb: 4096,
                created_at: t,
            },
            sandboxes: n,
        };
        let out = render_table(&[mk("alice", 2), mk("a-much-longer-name", 0)]);
        let lines: Vec<_> = out.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("NAME"));
        let col = lines[0].find("MAX SANDBOXES").expect("header");
        assert_eq!(lines[1].find('5'), Some(col));
        assert_eq!(lines[2].find('5'), Some(col));
        assert!(lines[1].contains("4096 MB"));
        assert!(lines[1].ends_with("2023-11-14T22:13:20Z"));
    }
}
