//! Matching normalised DNS names against exact names and `*.suffix` wildcards.
//!
//! Two hash maps: exact names, and wildcard suffixes. A lookup hashes the name
//! once and then each proper suffix at a label boundary, most specific first,
//! so its cost grows with the number of labels, not the number of rules, and
//! it borrows slices of the name instead of allocating.

use std::collections::HashMap;
use std::fmt;

use crate::target::{DomainName, TargetError};

/// A domain rule as written in config: `example.com` or `*.example.com`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DomainPattern {
    /// Exactly this name.
    Exact(DomainName),
    /// Any name strictly below this suffix (not the suffix itself).
    Wildcard(DomainName),
}

impl DomainPattern {
    /// Parses `name` or `*.suffix`, normalising the name part.
    pub fn parse(input: &str) -> Result<Self, TargetError> {
        match input.strip_prefix("*.") {
            Some(suffix) => DomainName::parse(suffix).map(DomainPattern::Wildcard),
            None if input.contains('*') => Err(TargetError::BadName("'*' is only allowed as a leading '*.' label")),
            None => DomainName::parse(input).map(DomainPattern::Exact),
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DomainPattern::Exact(n) => write!(f, "{n}"),
            DomainPattern::Wildcard(n) => write!(f, "*.{n}"),
        }
    }
}

/// Which rule matched a name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainMatch<'a, V> {
    Exact(&'a V),
    Wildcard(&'a V),
}

impl<'a, V> DomainMatch<'a, V> {
    /// The value attached to the matching rule.
    pub fn value(self) -> &'a V {
        match self {
            DomainMatch::Exact(v) | DomainMatch::Wildcard(v) => v,
        }
    }
}

/// An immutable set of domain rules with a value per rule.
#[derive(Debug, Clone)]
pub struct DomainMatcher<V> {
    exact: HashMap<Box<str>, V>,
    wildcard: HashMap<Box<str>, V>,
}

impl<V> Default for DomainMatcher<V> {
    fn default() -> Self {
        DomainMatcher { exact: HashMap::new(), wildcard: HashMap::new() }
    }
}

impl<V> DomainMatcher<V> {
    /// Builds a matcher; a repeated pattern keeps the last value.
    pub fn new(rules: impl IntoIterator<Item = (DomainPattern, V)>) -> Self {
        let mut m = DomainMatcher::default();
        for (pattern, value) in rules {
            match pattern {
                DomainPattern::Exact(n) => m.exact.insert(n.as_str().into(), value),
                DomainPattern::Wildcard(n) => m.wildcard.insert(n.as_str().into(), value),
            };
        }
        m
    }

    /// The most specific rule matching `name`: an exact rule, else the
    /// longest wildcard suffix.
    pub fn lookup(&self, name: &str) -> Option<DomainMatch<'_, V>> {
        if let Some(v) = self.exact.get(name) {
            return Some(DomainMatch::Exact(v));
        }
        if self.wildcard.is_empty() {
            return None;
        }
        let mut rest = name;
        while let Some((_, suffix)) = rest.split_once('.') {
            if let Some(v) = self.wildcard.get(suffix) {
                return Some(DomainMatch::Wildcard(v));
            }
            rest = suffix;
        }
        None
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_wildcard() {
        let rules = ["example.com", "*.github.com", "*.api.github.com", "API.Stripe.com."];
        let m = DomainMatcher::new(
            rules.iter().enumerate().map(|(i, r)| (DomainPattern::parse(r).unwrap(), i)),
        );
        let cases: &[(&str, Option<DomainMatch<usize>>)] = &[
            ("example.com", Some(DomainMatch::Exact(&0))),
            ("www.example.com", None),
            ("github.com", None),
            ("raw.github.com", Some(DomainMatch::Wildcard(&1))),
            ("a.b.github.com", Some(DomainMatch::Wildcard(&1))),
            ("x.api.github.com", Some(DomainMatch::Wildcard(&2))),
            ("api.stripe.com", Some(DomainMatch::Exact(&3))),
            ("evilgithub.com", None),
            ("github.com.evil.net", None),
            ("com", None),
        ];
        for (name, want) in cases {
            assert_eq!(m.lookup(name), *want, "{name}");
        }
    }

    #[test]
    fn bad_patterns() {
        for p in ["*", "*.", "a.*.com", "*example.com", "**.example.com", "exa mple.com", "127.1"] {
            assert!(DomainPattern::parse(p).is_err(), "{p}");
        }
    }
}
