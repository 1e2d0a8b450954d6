//! Bounds on the text that the config loader and the CLIs parse (config,
//! policy test cases, an imported ACL, a decision log): a size cap, checked
//! while reading, and a nesting-depth cap, checked in one linear pass before
//! the YAML or JSON parser sees the text. The YAML parser's cost grows with
//! the square of the nesting (a 200 KB case file of 100,000 `[` took 22 s
//! in the red team's run, N10), and no input here needs more than a handful
//! of levels.

use std::io::Read;
use std::path::Path;

/// What one kind of input may be.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// What the input is, for errors.
    pub what: &'static str,
    /// The largest input, in bytes.
    pub max_bytes: u64,
    /// The deepest nesting of collections (block and flow alike).
    pub max_depth: usize,
}

/// A config file: a million CIDR rules take about 25 MB.
pub const CONFIG: Bounds = Bounds { what: "a config file", max_bytes: 128 << 20, max_depth: 32 };
/// A file of `portcullis test` cases.
pub const CASES: Bounds = Bounds { what: "a case file", max_bytes: 16 << 20, max_depth: 32 };
/// A policy imported from another proxy.
pub const IMPORT: Bounds = Bounds { what: "an imported policy", max_bytes: 16 << 20, max_depth: 32 };
/// A decision log (JSON lines) for `portcullis suggest`; the depth is per line.
pub const DECISION_LOG: Bounds = Bounds { what: "a decision log", max_bytes: 1 << 30, max_depth: 32 };

/// Input refused before it was parsed: `file:line: reason`.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {reason}", line.map_or(String::new(), |l| format!(":{l}")))]
pub struct InputError {
    pub file: String,
    /// The 1-based line the refusal is about, when there is one.
    pub line: Option<usize>,
    /// Why.
    pub reason: String,
}

impl InputError {
    fn too_large(file: &str, bounds: Bounds) -> Self {
        let reason = format!("larger than the {} bytes allowed for {}", bounds.max_bytes, bounds.what);
        InputError { file: file.to_string(), line: None, reason }
    }
}

/// Reads the file at `path` as text, refusing it once it is larger than
/// `bounds` allows (without reading further: `/dev/zero` ends too).
pub fn read(path: &Path, bounds: Bounds) -> Result<String, InputError> {
    let file = path.display().to_string();
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(bounds.max_bytes + 1).read_to_end(&mut bytes))
        .map_err(|e| InputError { file: file.clone(), line: None, reason: format!("cannot read: {e}") })?;
    if bytes.len() as u64 > bounds.max_bytes {
        return Err(InputError::too_large(&file, bounds));
    }
    String::from_utf8(bytes).map_err(|e| {
        let line = e.as_bytes()[..e.utf8_error().valid_up_to()].iter().filter(|b| **b == b'\n').count() + 1;
        InputError { file, line: Some(line), reason: format!("not UTF-8 text: {}", e.utf8_error()) }
    })
}

/// True when one line of JSON (or YAML) nests deeper than `bounds` allows.
pub fn line_too_deep(line: &str, bounds: Bounds) -> bool {
    too_deep(line, bounds.max_depth).is_some()
}

/// Checks YAML (or JSON) text against `bounds`: its size, and its nesting.
pub fn check(text: &str, file: &str, bounds: Bounds) -> Result<(), InputError> {
    if text.len() as u64 > bounds.max_bytes {
        return Err(InputError::too_large(file, bounds));
    }
    match too_deep(text, bounds.max_depth) {
        Some(line) => Err(InputError {
            file: file.to_string(),
            line: Some(line),
            reason: format!("nested deeper than the {} levels allowed for {}", bounds.max_depth, bounds.what),
        }),
        None => Ok(()),
    }
}

/// The first line where the nesting goes past `max`, counting block
/// levels (by indentation and `- ` entries) and flow levels (`[`, `{`
/// outside quotes and comments). Errs on the side of counting: a level it
/// cannot close is still counted, which only matters past `max`.
fn too_deep(text: &str, max: usize) -> Option<usize> {
    let mut scan = Scan::default();
    for (i, line) in text.lines().enumerate() {
        if scan.line(line) > max {
            return Some(i + 1);
        }
    }
    None
}

/// The state of [`too_deep`] between lines.
#[derive(Default)]
struct Scan {
    /// Indentation of the open block collections.
    block: Vec<usize>,
    /// Open flow collections.
    flow: usize,
    /// Inside a quoted scalar that runs on: `'` or `"`.
    quote: Option<char>,
    /// Inside a block scalar (`|`, `>`) whose key sits at this indentation.
    literal: Option<usize>,
}

impl Scan {
    /// Takes one line; returns the deepest nesting on it.
    fn line(&mut self, line: &str) -> usize {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let mut body = &line[indent..];
        if let Some(key) = self.literal {
            if body.is_empty() || indent > key {
                return 0;
            }
            self.literal = None;
        }
        let mut value_start = self.flow > 0;
        if self.flow == 0 && self.quote.is_none() {
            if body.is_empty() || body.starts_with('#') {
                return 0;
            }
            if body.starts_with("---") || body.starts_with("...") || body.starts_with('%') {
                self.block.clear();
                return 0;
            }
            while self.block.last().is_some_and(|&open| open >= indent) {
                self.block.pop();
            }
            self.block.push(indent);
            // `- - x`: each entry indicator opens a collection of its own.
            let mut column = indent;
            while let Some(rest) = body.strip_prefix("- ").or((body == "-").then_some("")) {
                let rest_trimmed = rest.trim_start_matches(' ');
                column += body.len() - rest_trimmed.len();
                self.block.push(column);
                body = rest_trimmed;
            }
            value_start = true;
        }
        let mut deepest = self.block.len() + self.flow;
        let (mut escaped, mut prev) = (false, ' ');
        for c in body.chars() {
            if let Some(quote) = self.quote {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quote == '"' => escaped = true,
                    _ if c == quote => self.quote = None,
                    _ => {}
                }
                prev = c;
                continue;
            }
            match c {
                '#' if prev == ' ' || prev == '\t' => break,
                ' ' | '\t' => {}
                '"' | '\'' if value_start => {
                    self.quote = Some(c);
                    value_start = false;
                }
                // In block context a bracket opens a collection only where a
                // value starts (`a[b` is a plain scalar); in flow context always.
                '[' | '{' if value_start || self.flow > 0 => {
                    self.flow += 1;
                    deepest = deepest.max(self.block.len() + self.flow);
                    value_start = true;
                }
                ']' | '}' if self.flow > 0 => {
                    self.flow -= 1;
                    value_start = false;
                }
                ',' if self.flow > 0 => value_start = true,
                ':' => value_start = true,
                _ => value_start = false,
            }
            prev = c;
        }
        if self.flow == 0 && self.quote.is_none() && block_scalar(body) {
            self.literal = Some(indent);
        }
        deepest
    }
}

/// True when the line ends with a block scalar indicator (`key: |`,
/// `- >-`, `key: |2`), after which the more indented lines are text.
fn block_scalar(body: &str) -> bool {
    let text = match body.find(" #") {
        Some(at) => &body[..at],
        None => body,
    };
    let last = text.trim_end().rsplit([' ', '\t']).next().unwrap_or("");
    last.starts_with(['|', '>']) && last[1..].chars().all(|c| matches!(c, '+' | '-' | '1'..='9'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nesting_is_counted_in_block_and_flow() {
        let cases: &[(&str, usize)] = &[
            ("a: 1\n", 1),
            ("roles:\n  default:\n    allow:\n      domains: [a.example, \"b[\"]\n", 5),
            ("cases:\n  - {url: https://a.example/, client: {user: u}}\n", 5),
            // The entry after the last `- ` counts as a level of its own.
            ("- - - x\n", 4),
            ("a: [[[[1]]]]\n", 5),
            ("a: \"[[[[\"\nb: '{{{{'\n", 1),
            ("a: x[[[[\nb: don't [[[\n", 1),
            ("msg: |\n  [[[[[[\n  {{{{\nb: 1 # [[[[\n", 1),
            ("a: [1,\n  [2,\n    [3]]]\n", 4),
            ("{\"a\": {\"b\": [1, {\"c\": 2}]}}\n", 5),
        ];
        for (text, want) in cases {
            let mut scan = Scan::default();
            let got = text.lines().map(|l| scan.line(l)).max().unwrap_or(0);
            assert_eq!(got, *want, "{text:?}");
        }
    }

    #[test]
    fn deep_or_large_input_is_refused_with_file_line_and_reason() {
        let deep = format!("cases: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let err = check(&deep, "deep.yaml", CASES).unwrap_err().to_string();
        assert_eq!(err, "deep.yaml:1: nested deeper than the 32 levels allowed for a case file");
        let map = format!("{}1{}\n", "{a: ".repeat(50_000), "}".repeat(50_000));
        assert!(check(&map, "map.yaml", IMPORT).unwrap_err().to_string().starts_with("map.yaml:1: nested deeper"));
        let block: String = (0..40).map(|i| format!("{}k{i}:\n", " ".repeat(i))).collect();
        assert_eq!(check(&block, "b.yaml", CONFIG).unwrap_err().line, Some(33));
        let small = Bounds { what: "a test input", max_bytes: 8, max_depth: 32 };
        assert_eq!(check("a: 123456\n", "s.yaml", small).unwrap_err().to_string(), "s.yaml: larger than the 8 bytes allowed for a test input");
        assert!(check("a: [1, 2]\n", "ok.yaml", CASES).is_ok());
    }

    #[test]
    fn reading_stops_at_the_bound() {
        let small = Bounds { what: "a test input", max_bytes: 4096, max_depth: 32 };
        let err = read(Path::new("/dev/zero"), small).unwrap_err().to_string();
        assert_eq!(err, "/dev/zero: larger than the 4096 bytes allowed for a test input");
        assert!(read(Path::new("/nonexistent/x.yaml"), small).unwrap_err().to_string().starts_with("/nonexistent/x.yaml: cannot read"));
    }
}
