//! Output for people (aligned tables) and for programs (`--json`).

use std::io::{self, Write};

use anyhow::Context;
use serde::Serialize;

/// Formats rows under headers, each column as wide as its widest cell,
/// separated by two spaces; no trailing spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths
                .get(i)
                .copied()
                .unwrap_or(0)
                .saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Prints a table to stdout.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    write_stdout(table(headers, rows).as_bytes())
}

/// Prints a value as pretty JSON (one document, newline-terminated).
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value).context("cannot encode JSON output")?;
    text.push('\n');
    write_stdout(text.as_bytes())
}

/// Prints a line to stdout.
pub fn println(line: &str) -> anyhow::Result<()> {
    write_stdout(format!("{line}\n").as_bytes())
}

fn write_stdout(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        // The reader went away (`bhatti list | head -1`): not an error.
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}

/// Unix seconds as `2024-05-01 12:00:00 UTC`; the raw number if out of range.
pub fn unix_time(secs: i64) -> String {
    let fmt =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| secs.to_string())
}

/// An RFC 3339 time as `2024-05-01 12:00:00 UTC`; unchanged if it does not parse.
pub fn rfc3339(s: &str) -> String {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| unix_time(t.unix_timestamp()))
        .unwrap_or_else(|_| s.to_string())
}

/// Bytes for people: `512 B`, `1.5 KiB`, `3.0 MiB`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let t = table(
            &["NAME", "ID", "STATUS"],
            &[
                vec!["dev".into(), "abc123".into(), "running".into()],
                vec!["a-longer-name".into(), "x".into(), "stopped".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME           ID      STATUS\n\
             dev            abc123  running\n\
             a-longer-name  x       stopped\n"
        );
        assert_eq!(table(&["A", "B"], &[]), "A  B\n");
        assert_eq!(
            table(&["A", "B"], &[vec!["x".into(), String::new()]]),
            "A  B\nx\n"
        );
    }

    #[test]
    fn times_and_sizes() {
        assert_eq!(unix_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(rfc3339("2024-05-01T12:00:00Z"), "2024-05-01 12:00:00 UTC");
        assert_eq!(rfc3339("yesterday"), "yesterday");
        assert_eq!(human_size(0), "0 B");
        assert_eq!(human_size(1023), "1023 B");
        assert_eq!(human_size(1536), "1.5 KiB");
        assert_eq!(human_size(100 * 1024 * 1024), "100.0 MiB");
    }
}
