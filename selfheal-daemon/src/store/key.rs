//! Series identity: a metric name and a small, bounded set of label pairs; and selectors
//! that pick series by name and labels.

use std::{
    fmt,
    hash::{DefaultHasher, Hash, Hasher},
};

use serde::{Deserialize, Serialize};

/// Labels a series may carry.
pub const MAX_LABELS: usize = 8;
/// Bytes of a metric or label name.
pub const MAX_NAME_BYTES: usize = 128;
/// Bytes of a label value (a route template or a query fingerprint fits).
pub const MAX_LABEL_VALUE_BYTES: usize = 256;

/// Why a key is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "metric name {name:?} is not [a-zA-Z_:][a-zA-Z0-9_:]* of at most {MAX_NAME_BYTES} bytes"
    )]
    InvalidName { name: String },
    #[error(
        "label name {label:?} is not [a-zA-Z_][a-zA-Z0-9_]* of at most {MAX_NAME_BYTES} bytes"
    )]
    InvalidLabelName { label: String },
    #[error("label {label} has a value of {bytes} bytes, more than {MAX_LABEL_VALUE_BYTES}")]
    LabelValueTooLong { label: String, bytes: usize },
    #[error("{count} labels, more than {MAX_LABELS}")]
    TooManyLabels { count: usize },
    #[error("label {label} is given twice")]
    DuplicateLabel { label: String },
}

/// A series' identity. Labels are kept sorted by name, so the order they are given in does
/// not matter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SeriesKey {
    name: Box<str>,
    labels: Box<[(Box<str>, Box<str>)]>,
}

impl SeriesKey {
    /// A validated key.
    pub fn new<I, K, V>(name: &str, labels: I) -> Result<Self, KeyError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        if !valid_name(name, true) {
            return Err(KeyError::InvalidName {
                name: name.to_owned(),
            });
        }
        let mut pairs: Vec<(Box<str>, Box<str>)> = Vec::new();
        for (label, value) in labels {
            let (label, value) = (label.as_ref(), value.as_ref());
            if pairs.len() == MAX_LABELS {
                return Err(KeyError::TooManyLabels {
                    count: MAX_LABELS + 1,
                });
            }
            if !valid_name(label, false) {
                return Err(KeyError::InvalidLabelName {
                    label: label.to_owned(),
                });
            }
            if value.len() > MAX_LABEL_VALUE_BYTES {
                return Err(KeyError::LabelValueTooLong {
                    label: label.to_owned(),
                    bytes: value.len(),
                });
            }
            pairs.push((label.into(), value.into()));
        }
        pairs.sort();
        if let Some(pair) = pairs.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(KeyError::DuplicateLabel {
                label: pair[0].0.to_string(),
            });
        }
        Ok(Self {
            name: name.into(),
            labels: pairs.into_boxed_slice(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The labels, sorted by name.
    pub fn labels(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.labels.iter().map(|(k, v)| (&**k, &**v))
    }

    /// The value of one label.
    pub fn label(&self, label: &str) -> Option<&str> {
        self.labels
            .binary_search_by(|(k, _)| (**k).cmp(label))
            .ok()
            .map(|i| &*self.labels[i].1)
    }

    /// Bytes of its strings, as charged against the memory budget.
    pub(crate) fn heap_bytes(&self) -> u64 {
        let labels: usize = self
            .labels
            .iter()
            .map(|(k, v)| k.len() + v.len() + 32)
            .sum();
        (self.name.len() + labels) as u64
    }

    /// Whether this is the key `name` with exactly the labels `labels` (in any order).
    pub(crate) fn is(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        *self.name == *name
            && self.labels.len() == labels.len()
            && labels.iter().all(|(k, v)| self.label(k) == Some(v))
            && self
                .labels()
                .all(|(k, v)| labels.iter().any(|&(gk, gv)| gk == k && gv == v))
    }
}

impl<'de> Deserialize<'de> for SeriesKey {
    /// Validated like [`SeriesKey::new`]: a snapshot cannot bring in a key the API refuses.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            name: String,
            labels: Vec<(String, String)>,
        }
        let raw = Raw::deserialize(deserializer)?;
        Self::new(&raw.name, raw.labels).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for SeriesKey {
    /// `name{label="value",…}`, as Prometheus writes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if !self.labels.is_empty() {
            f.write_str("{")?;
            for (i, (k, v)) in self.labels.iter().enumerate() {
                if i > 0 {
                    f.write_str(",")?;
                }
                write!(f, "{k}={v:?}")?;
            }
            f.write_str("}")?;
        }
        Ok(())
    }
}

fn valid_name(name: &str, metric: bool) -> bool {
    let bytes = name.as_bytes();
    let ok = |b: u8, first: bool| {
        b.is_ascii_alphabetic()
            || b == b'_'
            || (metric && b == b':')
            || (!first && b.is_ascii_digit())
    };
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME_BYTES
        && bytes.iter().enumerate().all(|(i, &b)| ok(b, i == 0))
}

/// The index hash of a key, independent of the labels' order, computed without allocating.
pub(crate) fn key_hash<'a>(name: &str, labels: impl Iterator<Item = (&'a str, &'a str)>) -> u64 {
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    let mut combined = hasher.finish();
    for (k, v) in labels {
        let mut hasher = DefaultHasher::new();
        k.hash(&mut hasher);
        v.hash(&mut hasher);
        combined = combined.wrapping_add(hasher.finish());
    }
    combined
}

/// One condition on a label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelMatcher {
    /// The label is present with this value.
    Equal { label: String, value: String },
    /// The label is absent or has another value.
    NotEqual { label: String, value: String },
    /// The label is present.
    Present { label: String },
}

/// Which series a query is about: a metric name (or any) and label conditions, all of
/// which must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    name: Option<String>,
    matchers: Vec<LabelMatcher>,
}

impl Selector {
    /// Series of one metric name.
    pub fn name(name: impl Into<String>) -> Self {
        Self {
            name: Some(name.into()),
            matchers: Vec::new(),
        }
    }

    /// Every series.
    pub fn any() -> Self {
        Self::default()
    }

    /// …whose `label` is `value`.
    #[must_use]
    pub fn with(mut self, label: impl Into<String>, value: impl Into<String>) -> Self {
        self.matchers.push(LabelMatcher::Equal {
            label: label.into(),
            value: value.into(),
        });
        self
    }

    /// …whose `label` is not `value` (or is absent).
    #[must_use]
    pub fn without(mut self, label: impl Into<String>, value: impl Into<String>) -> Self {
        self.matchers.push(LabelMatcher::NotEqual {
            label: label.into(),
            value: value.into(),
        });
        self
    }

    /// …that carry `label`.
    #[must_use]
    pub fn has(mut self, label: impl Into<String>) -> Self {
        self.matchers.push(LabelMatcher::Present {
            label: label.into(),
        });
        self
    }

    pub fn matches(&self, key: &SeriesKey) -> bool {
        if self.name.as_deref().is_some_and(|name| name != key.name()) {
            return false;
        }
        self.matchers.iter().all(|matcher| match matcher {
            LabelMatcher::Equal { label, value } => key.label(label) == Some(value.as_str()),
            LabelMatcher::NotEqual { label, value } => key.label(label) != Some(value.as_str()),
            LabelMatcher::Present { label } => key.label(label).is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, labels: &[(&str, &str)]) -> SeriesKey {
        SeriesKey::new(name, labels.iter().copied()).expect("valid key")
    }

    #[test]
    fn labels_are_sorted_and_order_does_not_matter() {
        let a = key("http", &[("route", "/a"), ("platform", "x")]);
        let b = key("http", &[("platform", "x"), ("route", "/a")]);
        assert_eq!(a, b);
        assert_eq!(a.to_string(), r#"http{platform="x",route="/a"}"#);
        assert_eq!(
            key_hash("http", [("route", "/a"), ("platform", "x")].into_iter()),
            key_hash("http", a.labels())
        );
        assert!(a.is("http", &[("route", "/a"), ("platform", "x")]));
        assert!(!a.is("http", &[("route", "/a"), ("route", "/a")]));
        assert!(!a.is("http", &[("route", "/a")]));
        assert!(!a.is("http", &[("platform", "x"), ("platform", "x")]));
    }

    #[test]
    fn invalid_keys_are_refused() {
        assert!(matches!(
            SeriesKey::new("", [("a", "b")]),
            Err(KeyError::InvalidName { .. })
        ));
        assert!(matches!(
            SeriesKey::new("9x", [("a", "b")]),
            Err(KeyError::InvalidName { .. })
        ));
        assert!(matches!(
            SeriesKey::new("x", [("a-b", "b")]),
            Err(KeyError::InvalidLabelName { .. })
        ));
        assert!(matches!(
            SeriesKey::new("x", [("a", "1"), ("a", "2")]),
            Err(KeyError::DuplicateLabel { .. })
        ));
        let long = "v".repeat(MAX_LABEL_VALUE_BYTES + 1);
        assert!(matches!(
            SeriesKey::new("x", [("a", long.as_str())]),
            Err(KeyError::LabelValueTooLong { .. })
        ));
        let many: Vec<(String, &str)> = (0..=MAX_LABELS).map(|i| (format!("l{i}"), "v")).collect();
        assert!(matches!(
            SeriesKey::new("x", many),
            Err(KeyError::TooManyLabels { .. })
        ));
    }

    #[test]
    fn selectors_match_by_name_and_labels() {
        let k = key("http", &[("platform", "tackle.io"), ("route", "/a")]);
        assert!(Selector::name("http").matches(&k));
        assert!(!Selector::name("db").matches(&k));
        assert!(Selector::any().with("platform", "tackle.io").matches(&k));
        assert!(!Selector::any().with("platform", "other").matches(&k));
        assert!(Selector::any().without("platform", "other").matches(&k));
        assert!(Selector::any().without("method", "GET").matches(&k));
        assert!(Selector::any().has("route").matches(&k));
        assert!(!Selector::any().has("method").matches(&k));
    }
}
