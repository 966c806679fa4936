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

/// A left-aligned text table, fitted to the terminal's width when stdout
/// is one (a pipe gets every character).
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    table_within(headers, rows, terminal_width())
}

/// The terminal's width in columns, when stdout is a terminal.
pub fn terminal_width() -> Option<usize> {
    let term = console::Term::stdout();
    if !term.is_term() {
        return None;
    }
    term.size_checked().map(|(_, cols)| usize::from(cols))
}

/// The narrowest a column is cut to when a table is too wide.
const MIN_COLUMN: usize = 12;

/// [`table`] within `width` columns (`None`: no limit). When the table is
/// wider, the widest columns are cut first, down to their header or
/// [`MIN_COLUMN`]; a cut cell ends with `…`.
pub fn table_within(headers: &[&str], rows: &[Vec<String>], width: Option<usize>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    if let Some(width) = width {
        let floor: Vec<usize> = headers
            .iter()
            .map(|h| h.chars().count().max(MIN_COLUMN))
            .collect();
        let gaps = 2 * widths.len().saturating_sub(1);
        while widths.iter().sum::<usize>() + gaps > width {
            let over = widths.iter().sum::<usize>() + gaps - width;
            // The widest column that may still shrink.
            let Some(i) = (0..widths.len())
                .filter(|&i| widths[i] > floor[i])
                .max_by_key(|&i| (widths[i], i))
            else {
                break;
            };
            widths[i] -= over.min(widths[i] - floor[i]);
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let last = cells.len().saturating_sub(1);
        for (i, cell) in cells.iter().enumerate() {
            let w = widths.get(i).copied().unwrap_or(usize::MAX);
            let shown = fit(cell, w);
            out.push_str(&shown);
            if i < last {
                let pad = w.saturating_sub(shown.chars().count()) + 2;
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

/// `text` in at most `width` characters, ending with `…` when cut.
fn fit(text: &str, width: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(width) {
        Some(_) if width == 0 => "".into(),
        Some(_) => {
            let keep = text
                .char_indices()
                .nth(width - 1)
                .map_or(text.len(), |(i, _)| i);
            format!("{}…", &text[..keep]).into()
        }
        None => text.into(),
    }
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

    #[test]
    fn a_table_wider_than_the_terminal_cuts_its_widest_column() {
        let rows = vec![vec![
            "web-1".to_string(),
            "role=web,zone=eu-west-1a,rack=17,tier=frontend".to_string(),
            "ok".to_string(),
        ]];
        let headers = ["NAME", "LABELS", "STATE"];
        let wide = table_within(&headers, &rows, None);
        assert!(wide.contains("tier=frontend"), "{wide}");
        let narrow = table_within(&headers, &rows, Some(40));
        for line in narrow.lines() {
            assert!(line.chars().count() <= 40, "{line:?} in\n{narrow}");
        }
        assert!(narrow.contains("role=web,zone"), "{narrow}");
        assert!(narrow.contains("…  ok"), "{narrow}");
        // Too narrow for anything: columns stop at their floor.
        let tiny = table_within(&headers, &rows, Some(5));
        assert!(tiny.lines().nth(1).unwrap().starts_with("web-1"), "{tiny}");
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
