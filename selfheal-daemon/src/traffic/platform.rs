//! Platforms: which product a request belongs to, from `[[platforms]]`.

use std::sync::Arc;

use crate::config::PlatformConfig;

/// The platform of requests no `[[platforms]]` entry matches.
pub const OTHER: &str = "other";

/// The configured platforms, in a form cheap to match against.
#[derive(Debug, Clone)]
pub struct Platforms {
    names: Vec<Arc<str>>,
    /// `(host, platform index)`, hosts lower case.
    hosts: Vec<(String, usize)>,
    /// `(prefix, platform index)`, longest first.
    prefixes: Vec<(String, usize)>,
    other: Arc<str>,
}

impl Platforms {
    pub fn new(platforms: &[PlatformConfig]) -> Self {
        let mut hosts = Vec::new();
        let mut prefixes = Vec::new();
        for (index, platform) in platforms.iter().enumerate() {
            hosts.extend(
                platform
                    .hosts
                    .iter()
                    .map(|h| (h.trim().to_ascii_lowercase(), index)),
            );
            prefixes.extend(platform.path_prefixes.iter().map(|p| (p.clone(), index)));
        }
        prefixes.sort_by_key(|(prefix, _)| std::cmp::Reverse(prefix.len()));
        Self {
            names: platforms
                .iter()
                .map(|p| Arc::from(p.name.as_str()))
                .collect(),
            hosts,
            prefixes,
            other: Arc::from(OTHER),
        }
    }

    /// The platform's name: the first whose `hosts` holds the request's host (with or
    /// without its port), else the one with the longest `path_prefixes` entry the path starts
    /// with (at a segment boundary), else [`OTHER`].
    pub fn classify(&self, host: Option<&str>, path: &str) -> &Arc<str> {
        if let Some(host) = host {
            let bare = strip_port(host);
            if let Some((_, index)) = self
                .hosts
                .iter()
                .find(|(h, _)| h.eq_ignore_ascii_case(host) || h.eq_ignore_ascii_case(bare))
            {
                return &self.names[*index];
            }
        }
        self.prefixes
            .iter()
            .find(|(prefix, _)| has_prefix(path, prefix))
            .map_or(&self.other, |(_, index)| &self.names[*index])
    }

    /// Every configured name, in config order.
    pub fn names(&self) -> &[Arc<str>] {
        &self.names
    }

    /// Whether `name` is a configured platform or [`OTHER`].
    pub fn knows(&self, name: &str) -> bool {
        name == OTHER || self.names.iter().any(|n| &**n == name)
    }
}

fn strip_port(host: &str) -> &str {
    // `[::1]:8080` → `[::1]`; `example.com:80` → `example.com`; a bare IPv6 stays.
    match host.rsplit_once(':') {
        Some((name, port))
            if port.bytes().all(|b| b.is_ascii_digit())
                && (!name.contains(':') || name.ends_with(']')) =>
        {
            name
        }
        _ => host,
    }
}

/// `/api/v1/tackle` matches `/api/v1/tackle` and `/api/v1/tackle/deals`, not
/// `/api/v1/tackles`.
fn has_prefix(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix).is_some_and(|rest| {
        rest.is_empty() || prefix.ends_with('/') || rest.starts_with(['/', '?'])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(name: &str, hosts: &[&str], prefixes: &[&str]) -> PlatformConfig {
        PlatformConfig::new(name, hosts, prefixes)
    }

    #[test]
    fn hosts_win_then_the_longest_prefix_then_other() {
        let platforms = Platforms::new(&[
            platform("api", &[], &["/api"]),
            platform("tackle.io", &["api.tackle.io"], &["/api/v1/tackle"]),
            platform("crm", &["crm.example.com"], &[]),
        ]);
        let name = |host, path| platforms.classify(host, path).to_string();
        assert_eq!(name(Some("API.tackle.io:8080"), "/x"), "tackle.io");
        assert_eq!(name(Some("crm.example.com"), "/api/v1/tackle/deals"), "crm");
        assert_eq!(name(None, "/api/v1/tackle/deals"), "tackle.io");
        assert_eq!(name(None, "/api/v1/tackle"), "tackle.io");
        assert_eq!(name(None, "/api/v1/tackles"), "api");
        assert_eq!(name(Some("unknown"), "/health"), "other");
        assert!(platforms.knows("other") && platforms.knows("crm") && !platforms.knows("x"));
    }

    #[test]
    fn ports_are_stripped_only_where_they_are_ports() {
        assert_eq!(strip_port("a.b:80"), "a.b");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        assert_eq!(strip_port("::1"), "::1");
        assert_eq!(strip_port("a.b"), "a.b");
    }
}
