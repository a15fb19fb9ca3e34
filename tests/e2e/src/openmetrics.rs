//! Reading the daemon's `/metrics` text (Prometheus / OpenMetrics exposition) into samples,
//! so tests can compare whole label sets instead of string-matching single lines.

use std::collections::BTreeMap;

/// One sample line: `name{label="value",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    /// In the order the exposition wrote them.
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `key`.
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The labels as a map (order forgotten).
    pub fn label_map(&self) -> BTreeMap<String, String> {
        self.labels.iter().cloned().collect()
    }
}

/// Every sample in `text`; comments, `# EOF` and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

/// The samples of metric `name` exactly (`selfheal_http_requests_total`, or a histogram's
/// `…_bucket`, `…_sum`, `…_count`).
pub fn samples(text: &str, name: &str) -> Vec<Sample> {
    parse(text).into_iter().filter(|s| s.name == name).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim_end();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after_brace) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after_brace)?;
        labels = parsed;
        rest = after;
    }
    // The value is the first field; a timestamp or an exemplar may follow.
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Parses `a="x",b="y\"z"}` and returns the labels and the text after the `}`.
fn parse_labels(mut text: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(after) = text.strip_prefix('}') {
            return Some((labels, after));
        }
        let (key, after_key) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after_key.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.push((key.trim().to_owned(), value));
        text = &after_key[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_with_escapes_and_skips_comments() {
        let text = "# HELP x y\n# TYPE x counter\n\
                    x_total{a=\"1\",b=\"q\\\"uo\\\\te\"} 3\n\
                    h_bucket{le=\"+Inf\"} 7 # {trace=\"t\"} 1.0\n\
                    plain 2.5e-3\n# EOF\n";
        let all = parse(text);
        assert_eq!(all.len(), 3, "{all:?}");
        assert_eq!(all[0].name, "x_total");
        assert_eq!(all[0].label("b"), Some("q\"uo\\te"));
        assert!((all[0].value - 3.0).abs() < f64::EPSILON);
        assert_eq!(all[1].label("le"), Some("+Inf"));
        assert!((all[1].value - 7.0).abs() < f64::EPSILON);
        assert!(all[2].labels.is_empty());
        assert!((all[2].value - 0.0025).abs() < 1e-12);
        assert_eq!(samples(text, "plain").len(), 1);
    }
}
