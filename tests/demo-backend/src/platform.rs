//! The five product platforms served by the one API, told apart by the `Host` header.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::header::HOST;
use axum::http::request::Parts;
use serde::Serialize;

/// One of the company's product platforms. Every row in the database belongs to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub(crate) enum Platform {
    #[serde(rename = "leadsite.ai")]
    LeadSiteAi,
    #[serde(rename = "leadsite.io")]
    LeadSiteIo,
    #[serde(rename = "clientcontact.io")]
    ClientContactIo,
    #[serde(rename = "videosite.io")]
    VideoSiteIo,
    #[serde(rename = "tackle.io")]
    TackleIo,
}

impl Platform {
    /// Every platform, in a stable order (used for seeding).
    pub(crate) const ALL: [Platform; 5] = [
        Platform::LeadSiteAi,
        Platform::LeadSiteIo,
        Platform::ClientContactIo,
        Platform::VideoSiteIo,
        Platform::TackleIo,
    ];

    /// The platform an unknown or missing `Host` maps to.
    pub(crate) const DEFAULT: Platform = Platform::LeadSiteAi;

    /// The platform's domain; also the value stored in the `platform` column.
    pub(crate) fn domain(self) -> &'static str {
        match self {
            Platform::LeadSiteAi => "leadsite.ai",
            Platform::LeadSiteIo => "leadsite.io",
            Platform::ClientContactIo => "clientcontact.io",
            Platform::VideoSiteIo => "videosite.io",
            Platform::TackleIo => "tackle.io",
        }
    }

    /// The product's display name.
    pub(crate) fn display_name(self) -> &'static str {
        match self {
            Platform::LeadSiteAi => "LeadSite.AI",
            Platform::LeadSiteIo => "LeadSite.IO",
            Platform::ClientContactIo => "ClientContact.IO",
            Platform::VideoSiteIo => "VideoSite.IO",
            Platform::TackleIo => "Tackle.IO",
        }
    }

    /// Maps a `Host` header value to a platform.
    ///
    /// Case-insensitive; a port (`tackle.io:8080`, `[::1]:8080`) and a trailing dot are ignored;
    /// the platform's domain and any subdomain of it (`api.tackle.io`) match. Anything else,
    /// including an empty host or an IP address, maps to [`Platform::DEFAULT`].
    pub(crate) fn from_host(host: &str) -> Platform {
        let name = strip_port(host.trim())
            .trim_end_matches('.')
            .to_ascii_lowercase();
        Platform::ALL
            .into_iter()
            .find(|p| {
                let domain = p.domain();
                name == domain
                    || name
                        .strip_suffix(domain)
                        .is_some_and(|prefix| prefix.ends_with('.'))
            })
            .unwrap_or(Platform::DEFAULT)
    }
}

/// `host:port` → `host`; `[v6]:port` and `[v6]` → `v6`; a bare IPv6 address is kept whole.
fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(addr, _)| addr);
    }
    match host.rsplit_once(':') {
        // More than one colon and no brackets: a bare IPv6 address, not host:port.
        Some((name, _)) if !name.contains(':') => name,
        _ => host,
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Platform {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // HTTP/1.1 sends the Host header; an absolute-form request target carries it in the URI.
        let host = parts
            .headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| parts.uri.host())
            .unwrap_or("");
        Ok(Platform::from_host(host))
    }
}

#[cfg(test)]
mod tests {
    use super::Platform;

    #[test]
    fn exact_domains_map_to_their_platform() {
        for p in Platform::ALL {
            assert_eq!(Platform::from_host(p.domain()), p, "{}", p.domain());
        }
    }

    #[test]
    fn subdomains_ports_case_and_trailing_dot() {
        assert_eq!(Platform::from_host("api.tackle.io"), Platform::TackleIo);
        assert_eq!(Platform::from_host("tackle.io:8080"), Platform::TackleIo);
        assert_eq!(Platform::from_host("API.Tackle.IO:443"), Platform::TackleIo);
        assert_eq!(
            Platform::from_host("www.videosite.io."),
            Platform::VideoSiteIo
        );
        assert_eq!(
            Platform::from_host("a.b.clientcontact.io"),
            Platform::ClientContactIo
        );
        assert_eq!(Platform::from_host(" leadsite.io "), Platform::LeadSiteIo);
        assert_eq!(
            Platform::from_host("app.leadsite.ai:80"),
            Platform::LeadSiteAi
        );
    }

    #[test]
    fn leadsite_ai_and_io_are_distinct() {
        assert_eq!(Platform::from_host("leadsite.io"), Platform::LeadSiteIo);
        assert_eq!(
            Platform::from_host("api.leadsite.io:8080"),
            Platform::LeadSiteIo
        );
        assert_eq!(Platform::from_host("leadsite.ai"), Platform::LeadSiteAi);
    }

    #[test]
    fn unknown_hosts_map_to_default() {
        for host in [
            "",
            "localhost",
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "::1",
            "example.com",
            "nottackle.io",
            "tackle.io.evil.com",
            "tackle.iox",
            ".",
        ] {
            assert_eq!(Platform::from_host(host), Platform::DEFAULT, "{host:?}");
        }
        assert_eq!(Platform::DEFAULT, Platform::LeadSiteAi);
    }

    #[test]
    fn bracketed_ipv6_port_is_stripped() {
        assert_eq!(super::strip_port("[::1]:8080"), "::1");
        assert_eq!(super::strip_port("[::1]"), "::1");
        assert_eq!(super::strip_port("::1"), "::1");
        assert_eq!(super::strip_port("tackle.io:1"), "tackle.io");
    }

    #[test]
    fn serializes_as_domain() {
        assert_eq!(
            serde_json::to_string(&Platform::TackleIo).unwrap(),
            "\"tackle.io\""
        );
        assert_eq!(Platform::ClientContactIo.display_name(), "ClientContact.IO");
    }
}
