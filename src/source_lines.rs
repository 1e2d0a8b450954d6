//! Where things sit in a YAML config text: the lines of list items and
//! keys (for a rule's `file:line` in provenance and in refusals). A leaf:
//! `config/` indexes the text it parsed, `policy/` prints the lines, and
//! neither depends on the other through it.

use std::collections::HashMap;

/// The lines of a config file on which list items and keys sit, so that a
/// rule can be printed with its `file:line`.
#[derive(Debug, Clone, Default)]
pub struct SourceLines {
    file: String,
    /// `roles.ci.allow.domains` → the 1-based line of each item (a flow
    /// list `[a, b]` gives every item the key's line).
    items: HashMap<String, Vec<u32>>,
    /// `roles.ci.mode` → the 1-based line of the key.
    keys: HashMap<String, u32>,
}

impl SourceLines {
    /// Indexes a YAML config text: one pass over its lines, following block
    /// mappings by indentation. Good for the config's shape (mappings of
    /// mappings, lists of scalars or of small mappings), not for YAML at large.
    pub fn index(file: &str, text: &str) -> Self {
        let mut out = SourceLines { file: file.to_string(), ..Default::default() };
        // (indent of the key, path of the key)
        let mut stack: Vec<(usize, String)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = (i + 1) as u32;
            let content = strip_comment(raw);
            let trimmed = content.trim_start();
            if trimmed.is_empty() || trimmed.starts_with("---") {
                continue;
            }
            let indent = content.len() - trimmed.len();
            if let Some(item) = trimmed.strip_prefix('-').filter(|r| r.is_empty() || r.starts_with(' ')) {
                // A list item belongs to the nearest key indented less, or
                // at the same indent (YAML allows `key:\n- item`).
                while stack.last().is_some_and(|(k, _)| *k > indent) {
                    stack.pop();
                }
                let Some((_, parent)) = stack.last() else { continue };
                let parent = parent.clone();
                let items = out.items.entry(parent.clone()).or_default();
                let index = items.len();
                items.push(line);
                let rest = item.trim_start();
                let item_indent = indent + (item.len() - rest.len()) + 1;
                if let Some((key, _)) = mapping_key(rest) {
                    let path = format!("{parent}[{index}].{key}");
                    out.keys.insert(path.clone(), line);
                    stack.push((item_indent, path));
                }
                continue;
            }
            let Some((key, value)) = mapping_key(trimmed) else { continue };
            while stack.last().is_some_and(|(k, _)| *k >= indent) {
                stack.pop();
            }
            // Keys inside a list item's mapping continue that item's path.
            let path = match stack.last() {
                Some((_, parent)) => format!("{parent}.{key}"),
                None => key.to_string(),
            };
            out.keys.insert(path.clone(), line);
            if value.starts_with('[') {
                let count = flow_items(value);
                out.items.insert(path.clone(), vec![line; count]);
            }
            stack.push((indent, path));
        }
        out
    }

    /// The line of item `index` of the list at `path`.
    pub fn item(&self, path: &str, index: usize) -> Option<u32> {
        self.items.get(path).and_then(|lines| lines.get(index)).copied()
    }

    /// The line of the key at `path`.
    pub fn key(&self, path: &str) -> Option<u32> {
        self.keys.get(path).copied()
    }

    /// The file name the lines refer to.
    pub fn file(&self) -> &str {
        &self.file
    }
}

/// The text before a `#` comment that is outside quotes.
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev == ' ' || prev == '\t' => return line[..i].trim_end(),
            _ => {}
        }
        prev = c;
    }
    line.trim_end()
}

/// `key: value` → (`key`, `value`); quotes around the key are dropped.
fn mapping_key(text: &str) -> Option<(&str, &str)> {
    if text.starts_with('{') || text.starts_with('[') || text.starts_with('"') && !text.contains("\":") {
        return None;
    }
    let colon = text.find(": ").or_else(|| text.strip_suffix(':').map(|k| k.len()))?;
    let key = text[..colon].trim().trim_matches('"').trim_matches('\'');
    (!key.is_empty()).then(|| (key, text[colon + 1..].trim()))
}

/// The number of items in a one-line flow list `[a, "b", c]`.
fn flow_items(value: &str) -> usize {
    let inner = value.trim_start_matches('[').trim_end_matches(']').trim();
    if inner.is_empty() {
        return 0;
    }
    let mut depth = 0i32;
    let mut count = 1;
    let mut quote: Option<char> = None;
    for c in inner.chars() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '{' | '[') => depth += 1,
            (None, '}' | ']') => depth -= 1,
            (None, ',') if depth == 0 => count += 1,
            _ => {}
        }
    }
    count
}

/// The 1-based line of `value` under the field `path` (`roles.ci.allow.cidrs[1]`):
/// each key of the path is looked for in turn, then the value after the last.
pub fn line_of(text: &str, path: &str, value: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    // A key at the start of a line, or inside a flow mapping (`{cidr: .., roles: ..}`).
    let has_key = |line: &str, key: &str| {
        line.match_indices(key).any(|(at, _)| {
            let before = line[..at].trim_end_matches(' ');
            line[at + key.len()..].starts_with(':') && (before.is_empty() || before.ends_with(['{', ',', '-']))
        })
    };
    let mut from = 0;
    for key in path.split('.').map(|k| k.split('[').next().unwrap_or(k)) {
        from += lines[from..].iter().position(|l| has_key(l, key))?;
    }
    lines[from..].iter().position(|l| l.contains(value)).map(|i| from + i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_lines_follow_the_config_shape() {
        let text = "\
listen: 127.0.0.1:3128  # comment
internal_ranges: [10.0.0.0/8, \"fd00::/8\"]
allow_ranges:
  - 10.1.0.0/16
  - {cidr: 10.2.0.0/16, roles: [ci]}
roles:
  default:
    mode: enforce
    allow:
      domains:        # names
        - example.com
        - \"*.example.com\"   # any below
      cidrs: []
  ci:
    mode: report
    allow:
      domains:
      - pkg.example
      - \"*.pkg.example\"
      connect_ports: [443, 8443]
    deny:
      cidrs:
        - 8.8.8.8/32
";
        let s = SourceLines::index("p.yaml", text);
        let cases: &[(&str, usize, Option<u32>)] = &[
            ("internal_ranges", 0, Some(2)),
            ("internal_ranges", 1, Some(2)),
            ("internal_ranges", 2, None),
            ("allow_ranges", 0, Some(4)),
            ("allow_ranges", 1, Some(5)),
            ("roles.default.allow.domains", 0, Some(11)),
            ("roles.default.allow.domains", 1, Some(12)),
            ("roles.default.allow.cidrs", 0, None),
            ("roles.ci.allow.domains", 0, Some(18)),
            ("roles.ci.allow.domains", 1, Some(19)),
            ("roles.ci.allow.connect_ports", 1, Some(20)),
            ("roles.ci.deny.cidrs", 0, Some(23)),
        ];
        for (path, index, want) in cases {
            assert_eq!(s.item(path, *index), *want, "{path}[{index}]");
        }
        assert_eq!(s.key("roles.ci.mode"), Some(15));
        assert_eq!(s.key("roles.default.mode"), Some(8));
        assert_eq!(s.key("roles.ci.allow.connect_ports"), Some(20));
        assert_eq!(s.key("listen"), Some(1));
    }
}
