//! All printing goes through [`Output`], so `--output json` is one switch:
//! data goes to stdout as text (tables, sentences) or JSON, and notes for
//! people go to stderr.

use std::io::{IsTerminal, Write};

use serde::Serialize;

use super::Format;

/// Where and how the CLI prints.
#[derive(Clone, Debug)]
pub struct Output {
    format: Format,
    tty: bool,
}

impl Output {
    /// Prints in `format`; progress bars only when stdout is a terminal.
    pub fn new(format: Format) -> Output {
        Output {
            format,
            tty: std::io::stdout().is_terminal(),
        }
    }

    /// `--output json`?
    pub fn is_json(&self) -> bool {
        self.format == Format::Json
    }

    /// Is stdout a terminal (and the output text)?
    pub fn is_tty(&self) -> bool {
        self.tty && !self.is_json()
    }

    /// Prints a data document: JSON, or the text `text` makes.
    pub fn data<T: Serialize>(&self, value: &T, text: impl FnOnce() -> String) {
        let mut stdout = std::io::stdout().lock();
        if self.is_json() {
            let json =
                serde_json::to_string(value).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
            let _ = writeln!(stdout, "{json}");
        } else {
            let text = text();
            let _ = write!(stdout, "{text}");
            if !text.ends_with('\n') && !text.is_empty() {
                let _ = writeln!(stdout);
            }
        }
        let _ = stdout.flush();
    }

    /// A line of text output (nothing in JSON mode).
    pub fn line(&self, text: impl std::fmt::Display) {
        if !self.is_json() {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{text}");
            let _ = stdout.flush();
        }
    }

    /// One JSON event line (stream output in JSON mode).
    pub fn event<T: Serialize>(&self, value: &T) {
        if let Ok(json) = serde_json::to_string(value) {
            let mut stdout = std::io::stdout().lock();
            let _ = writeln!(stdout, "{json}");
            let _ = stdout.flush();
        }
    }

    /// A note for people, on stderr.
    pub fn note(&self, text: impl std::fmt::Display) {
        eprintln!("{text}");
    }
}

/// A left-aligned text table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            out.push_str(cell);
            if i < last {
                let pad = widths[i] - cell.chars().count() + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for row in rows {
        line(row.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

/// `at` (ms since the epoch) as a short UTC time, or `-`.
pub fn when(at: u64) -> String {
    if at == 0 {
        return "-".into();
    }
    let text = crate::clock::rfc3339(at);
    text.get(..19).map(|s| s.replace('T', " ")).unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["NAME", "STATE"],
            &[
                vec!["web-1".into(), "success".into()],
                vec!["db".into(), "failed".into()],
            ],
        );
        assert_eq!(t, "NAME   STATE\nweb-1  success\ndb     failed\n");
    }
}

/// Text from a host, safe for a terminal: control characters (escape
/// sequences among them) are shown escaped (`\x1b`), never sent raw; tabs
/// stay. `--output json` carries the raw text.
pub fn escape_controls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\t' | '\n' => out.push(c),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod escape_tests {
    #[test]
    fn terminal_escapes_from_hosts_are_shown_not_obeyed() {
        assert_eq!(
            super::escape_controls("ok\u{1b}[2J\u{7}\tdone\r"),
            "ok\\x1b[2J\\x07\tdone\\x0d"
        );
    }
}
