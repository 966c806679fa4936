//! The secrets a step uses, on the host: in memory only.
//!
//! A `RunStep` carries the values of the secrets its step uses
//! (`RunStep.secrets`); the session takes them out before the step is
//! journaled, so `<id>.run` never holds them. Then, for the step only:
//! - [`Secrets::fill`] puts each value where the step holds its
//!   `<secret NAME>` placeholder (argv, env, stdin, `interact` sends, file
//!   content) and adds `MODI_SECRET_NAME` to the step's environment, which
//!   its `run` command reads (`"$MODI_SECRET_NAME"`): no value is ever in
//!   a command line the agent starts.
//! - A [`Mask`] per output stream replaces every occurrence of a value in
//!   what the step prints with `<secret NAME>` before it is kept, streamed
//!   or sent, holding back the few bytes that may be the start of a value
//!   cut by a chunk boundary.

use std::sync::Arc;

use modi_proto::v1 as pb;

/// The secrets of one step. Its `Debug` never shows a value.
#[derive(Clone, Default)]
pub struct Secrets {
    /// (name, value), longest value first.
    values: Arc<[(String, String)]>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.values.iter().map(|(n, _)| n.as_str()).collect();
        write!(f, "Secrets({names:?})")
    }
}

impl Secrets {
    /// Takes the secrets out of `step` (which can then be journaled).
    /// Empty values are dropped: there is nothing to hide or fill in.
    pub fn take(step: &mut pb::RunStep) -> Secrets {
        let mut values: Vec<(String, String)> = std::mem::take(&mut step.secrets)
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect();
        values.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then_with(|| a.0.cmp(&b.0)));
        Secrets {
            values: values.into(),
        }
    }

    /// Does the step have none?
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Puts the values into `step`, in memory: every `<secret NAME>` in
    /// argv, env values, stdin, `interact` sends and file content becomes
    /// the value, and `MODI_SECRET_NAME` is added to its environment.
    pub fn fill(&self, step: &mut pb::Step) {
        if self.is_empty() {
            return;
        }
        let text = |s: &mut String| *s = self.substitute(s);
        for value in step.env.values_mut() {
            text(value);
        }
        if let Some(stdin) = &mut step.stdin {
            let filled = self.substitute(&String::from_utf8_lossy(stdin));
            *stdin = filled.into_bytes();
        }
        match &mut step.action {
            Some(pb::step::Action::Argv(argv)) => argv.args.iter_mut().for_each(text),
            Some(pb::step::Action::File(f)) => {
                let filled = self.substitute(&String::from_utf8_lossy(&f.content));
                f.content = filled.into_bytes();
            }
            Some(pb::step::Action::Interact(i)) => {
                i.script.iter_mut().for_each(|x| text(&mut x.send));
            }
            _ => {}
        }
        for (name, value) in self.values.iter() {
            step.env.insert(modi_proto::secret_env(name), value.clone());
        }
    }

    /// `text` with every placeholder of one of these secrets replaced by
    /// its value, in one pass (a value that looks like a placeholder is
    /// not expanded again).
    fn substitute(&self, text: &str) -> String {
        const OPEN: &str = "<secret ";
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find(OPEN) {
            let after = &rest[start + OPEN.len()..];
            let value = after.find('>').and_then(|end| {
                let name = &after[..end];
                self.values
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| (v, end))
            });
            match value {
                Some((value, end)) => {
                    out.push_str(&rest[..start]);
                    out.push_str(value);
                    rest = &after[end + 1..];
                }
                None => {
                    out.push_str(&rest[..start + 1]);
                    rest = &rest[start + 1..];
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// A fresh mask for one output stream.
    pub fn mask(&self) -> Mask {
        let values: Vec<(Vec<u8>, Vec<u8>)> = self
            .values
            .iter()
            .map(|(name, value)| {
                (
                    value.as_bytes().to_vec(),
                    modi_proto::secret_placeholder(name).into_bytes(),
                )
            })
            .collect();
        let mut first = [false; 256];
        for (v, _) in &values {
            first[v[0] as usize] = true;
        }
        Mask {
            values: values.into(),
            first,
            held: Vec::new(),
        }
    }
}

/// Replaces secrets' values in one output stream, chunk by chunk.
pub struct Mask {
    /// (value, placeholder), longest value first.
    values: Arc<[(Vec<u8>, Vec<u8>)]>,
    /// Bytes a value can start with.
    first: [bool; 256],
    /// The end of the last chunk that may be the start of a value.
    held: Vec<u8>,
}

impl Mask {
    /// The next chunk of the stream, masked: what can be kept and sent
    /// now. The end of it that may be the start of a value cut by the
    /// chunk boundary is held back for the next call (or [`Mask::finish`]).
    pub fn feed(&mut self, data: &[u8]) -> Vec<u8> {
        if self.values.is_empty() {
            return data.to_vec();
        }
        let mut buf = std::mem::take(&mut self.held);
        buf.extend_from_slice(data);
        self.scan(&buf, false)
    }

    /// The rest of the stream, masked.
    pub fn finish(&mut self) -> Vec<u8> {
        let buf = std::mem::take(&mut self.held);
        self.scan(&buf, true)
    }

    fn scan(&mut self, buf: &[u8], last: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'bytes: while i < buf.len() {
            if !self.first[buf[i] as usize] {
                out.push(buf[i]);
                i += 1;
                continue;
            }
            let rest = &buf[i..];
            // A value the chunk may have cut: wait for more (a longer value
            // wins over a shorter one that also starts here).
            if !last
                && self
                    .values
                    .iter()
                    .any(|(v, _)| v.len() > rest.len() && v.starts_with(rest))
            {
                self.held = rest.to_vec();
                return out;
            }
            for (value, placeholder) in self.values.iter() {
                if rest.starts_with(value) {
                    out.extend_from_slice(placeholder);
                    i += value.len();
                    continue 'bytes;
                }
            }
            out.push(buf[i]);
            i += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(pairs: &[(&str, &str)]) -> Secrets {
        let mut step = pb::RunStep {
            secrets: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        };
        let s = Secrets::take(&mut step);
        assert!(step.secrets.is_empty(), "taken out of the step");
        s
    }

    fn masked(s: &Secrets, chunks: &[&[u8]]) -> String {
        let mut mask = s.mask();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(mask.feed(c));
        }
        out.extend(mask.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn every_occurrence_is_masked_even_across_chunks() {
        let s = secrets(&[("pw", "hunter2")]);
        assert_eq!(
            masked(&s, &[b"a hunter2 b hunter2"]),
            "a <secret pw> b <secret pw>"
        );
        // Cut at every position of two chunks.
        let text = b"x hunter2 y hunter2hunter2 z hunt";
        for cut in 0..=text.len() {
            let (a, b) = text.split_at(cut);
            assert_eq!(
                masked(&s, &[a, b]),
                "x <secret pw> y <secret pw><secret pw> z hunt",
                "cut at {cut}"
            );
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(
            masked(&s, &bytes),
            "x <secret pw> y <secret pw><secret pw> z hunt"
        );
    }

    #[test]
    fn held_back_bytes_are_only_those_that_may_start_a_value() {
        let s = secrets(&[("pw", "hunter2")]);
        let mut mask = s.mask();
        assert_eq!(mask.feed(b"hello hun"), b"hello ");
        assert_eq!(mask.feed(b"gry"), b"hungry");
        assert_eq!(mask.feed(b"done\n"), b"done\n");
        assert_eq!(mask.finish(), b"");
    }

    #[test]
    fn the_longest_value_wins_and_none_leaks_in_part() {
        let s = secrets(&[("short", "abc"), ("long", "abcdef")]);
        assert_eq!(masked(&s, &[b"abcdef abc"]), "<secret long> <secret short>");
        assert_eq!(masked(&s, &[b"abc", b"def"]), "<secret long>");
        assert_eq!(masked(&s, &[b"abc", b"de"]), "<secret short>de");
    }

    #[test]
    fn fill_puts_values_where_the_placeholders_are_and_into_the_environment() {
        let s = secrets(&[("pw", "s3cr'et"), ("tok", "t0k")]);
        let mut step = pb::Step {
            action: Some(pb::step::Action::Argv(pb::Argv {
                args: vec!["tool".into(), "--token=<secret tok>".into()],
            })),
            env: [("PW".to_string(), "<secret pw>".to_string())].into(),
            stdin: Some(b"<secret pw>\n".to_vec()),
            ..Default::default()
        };
        s.fill(&mut step);
        let Some(pb::step::Action::Argv(argv)) = &step.action else {
            panic!("argv")
        };
        assert_eq!(argv.args[1], "--token=t0k");
        assert_eq!(step.env["PW"], "s3cr'et");
        assert_eq!(step.env["MODI_SECRET_pw"], "s3cr'et");
        assert_eq!(step.env["MODI_SECRET_tok"], "t0k");
        assert_eq!(step.stdin.as_deref(), Some(&b"s3cr'et\n"[..]));

        let mut file = pb::Step {
            action: Some(pb::step::Action::File(pb::FileWrite {
                path: "/etc/app.conf".into(),
                content: b"password=<secret pw>\n".to_vec(),
                ..Default::default()
            })),
            ..Default::default()
        };
        s.fill(&mut file);
        let Some(pb::step::Action::File(f)) = &file.action else {
            panic!("file")
        };
        assert_eq!(f.content, b"password=s3cr'et\n");
        assert_eq!(f.path, "/etc/app.conf");
    }

    #[test]
    fn placeholders_are_filled_in_one_pass() {
        let s = secrets(&[("a", "<secret b>"), ("b", "B")]);
        assert_eq!(
            s.substitute("<secret a>|<secret b>|<secret c>|<secret"),
            "<secret b>|B|<secret c>|<secret"
        );
    }

    #[test]
    fn debug_shows_names_only() {
        let s = secrets(&[("pw", "hunter2")]);
        assert_eq!(format!("{s:?}"), r#"Secrets(["pw"])"#);
    }
}
