//! Parsing of `POST /__fault/{name}?k=v…` into a [`FaultRequest`]: pure, no I/O.

use std::fmt;
use std::str::FromStr;

/// One fault switch request, with its parameters checked and defaults filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FaultRequest {
    /// Turn every fault off.
    Clear,
    Crash(CrashMode),
    Hang,
    Leak {
        mb_per_sec: u64,
        max_mb: u64,
    },
    /// Open `/dev/null` `per_sec` times a second and keep every descriptor, after lowering
    /// the soft `RLIMIT_NOFILE` to `nofile` when given.
    FdLeak {
        per_sec: u64,
        nofile: Option<u64>,
    },
    Spin {
        threads: usize,
    },
    SlowQuery {
        ms: u64,
        /// Only requests whose path starts with one of these; every data request when empty.
        paths: Vec<String>,
    },
    Lock {
        table: Table,
        secs: u64,
    },
    IdleTx {
        n: usize,
    },
    NPlusOne,
    Errors(ErrorsSpec),
    /// The next `count` data requests first run a query on a table that does not exist.
    BadQuery {
        count: u64,
    },
    /// Try `n` logins with the pool's settings but a wrong password, now.
    BadPassword {
        n: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CrashMode {
    /// `abort()`: the process dies with SIGABRT.
    Abort,
    /// `exit(code)`.
    Exit(i32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ErrorsSpec {
    /// The next N data requests answer 500.
    Count(u64),
    /// Data requests answer 500 for N seconds.
    Secs(u64),
}

/// A table of the demo schema; `lock` only accepts these (the name is spliced into SQL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Table {
    Users,
    Campaigns,
    Leads,
    Websites,
    Videos,
    Conversations,
    TackleDeals,
}

impl Table {
    pub(crate) const ALL: [Table; 7] = [
        Table::Users,
        Table::Campaigns,
        Table::Leads,
        Table::Websites,
        Table::Videos,
        Table::Conversations,
        Table::TackleDeals,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Table::Users => "users",
            Table::Campaigns => "campaigns",
            Table::Leads => "leads",
            Table::Websites => "websites",
            Table::Videos => "videos",
            Table::Conversations => "conversations",
            Table::TackleDeals => "tackle_deals",
        }
    }
}

impl FromStr for Table {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        Table::ALL
            .into_iter()
            .find(|t| t.as_str() == s || (*t == Table::TackleDeals && s == "deals"))
            .ok_or(())
    }
}

/// Why a fault request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ParseError {
    /// No such fault (→ 404).
    UnknownFault(String),
    /// A parameter is unknown, repeated, malformed or out of range (→ 400).
    BadParam(String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::UnknownFault(name) => write!(
                f,
                "unknown fault {name:?}; known: {}",
                FAULT_NAMES.join(", ")
            ),
            ParseError::BadParam(msg) => f.write_str(msg),
        }
    }
}

/// Every name accepted after `/__fault/`.
pub(crate) const FAULT_NAMES: [&str; 13] = [
    "clear",
    "crash",
    "hang",
    "leak",
    "fd_leak",
    "spin",
    "slow_query",
    "lock",
    "idle_tx",
    "n_plus_one",
    "errors",
    "bad_query",
    "bad_password",
];

/// Limits, so a typo cannot take the machine down.
pub(crate) const MAX_LEAK_MB_PER_SEC: u64 = 1024;
pub(crate) const DEFAULT_LEAK_MAX_MB: u64 = 4096;
pub(crate) const MAX_LEAK_MAX_MB: u64 = 65_536;
pub(crate) const MAX_SPIN_THREADS: usize = 64;
pub(crate) const MAX_FD_LEAK_PER_SEC: u64 = 10_000;
/// `fd_leak?nofile=`: at least this many descriptors stay allowed (the server's own).
pub(crate) const MIN_FD_LEAK_NOFILE: u64 = 64;
pub(crate) const MAX_SLOW_QUERY_MS: u64 = 600_000;
pub(crate) const MAX_LOCK_SECS: u64 = 3600;
pub(crate) const MAX_IDLE_TX: usize = 50;
pub(crate) const MAX_ERRORS_COUNT: u64 = 1_000_000;
pub(crate) const MAX_ERRORS_SECS: u64 = 86_400;
pub(crate) const MAX_BAD_QUERY_COUNT: u64 = 1_000_000;
pub(crate) const MAX_BAD_PASSWORD: usize = 50;
/// `slow_query?path=`: at most this many comma-separated prefixes.
pub(crate) const MAX_SLOW_QUERY_PATHS: usize = 16;

/// Parses the fault `name` with its query-string `params` (in order, repeats kept).
pub(crate) fn parse_fault(
    name: &str,
    params: &[(String, String)],
) -> Result<FaultRequest, ParseError> {
    let p = Params::new(name, params)?;
    match name {
        "clear" => p.only(&[]).map(|()| FaultRequest::Clear),
        "hang" => p.only(&[]).map(|()| FaultRequest::Hang),
        "n_plus_one" => p.only(&[]).map(|()| FaultRequest::NPlusOne),
        "crash" => {
            p.only(&["mode", "code"])?;
            let code = p.num::<i32>("code", 0, 255)?;
            let mode = match (p.get("mode"), code) {
                (None | Some("abort"), None) => CrashMode::Abort,
                (Some("abort"), Some(_)) => {
                    return Err(bad("crash: `code` only goes with mode=exit".into()))
                }
                (None | Some("exit"), code) => CrashMode::Exit(code.unwrap_or(1)),
                (Some(other), _) => {
                    return Err(bad(format!(
                        "crash: mode must be abort or exit, not {other:?}"
                    )))
                }
            };
            Ok(FaultRequest::Crash(mode))
        }
        "leak" => {
            p.only(&["mb_per_sec", "max_mb"])?;
            Ok(FaultRequest::Leak {
                mb_per_sec: p.num("mb_per_sec", 1, MAX_LEAK_MB_PER_SEC)?.unwrap_or(10),
                max_mb: p
                    .num("max_mb", 1, MAX_LEAK_MAX_MB)?
                    .unwrap_or(DEFAULT_LEAK_MAX_MB),
            })
        }
        "fd_leak" => {
            p.only(&["per_sec", "nofile"])?;
            Ok(FaultRequest::FdLeak {
                per_sec: p.num("per_sec", 1, MAX_FD_LEAK_PER_SEC)?.unwrap_or(100),
                nofile: p.num("nofile", MIN_FD_LEAK_NOFILE, u64::from(u32::MAX))?,
            })
        }
        "spin" => {
            p.only(&["threads"])?;
            Ok(FaultRequest::Spin {
                threads: p.num("threads", 1, MAX_SPIN_THREADS)?.unwrap_or(1),
            })
        }
        "slow_query" => {
            p.only(&["ms", "path"])?;
            Ok(FaultRequest::SlowQuery {
                ms: p.num("ms", 1, MAX_SLOW_QUERY_MS)?.unwrap_or(2000),
                paths: p.get("path").map_or(Ok(Vec::new()), path_prefixes)?,
            })
        }
        "lock" => {
            p.only(&["table", "secs"])?;
            let table = match p.get("table") {
                None => Table::Leads,
                Some(t) => t.parse().map_err(|()| {
                    let known: Vec<_> = Table::ALL.iter().map(|t| t.as_str()).collect();
                    bad(format!(
                        "lock: unknown table {t:?}; known: {}",
                        known.join(", ")
                    ))
                })?,
            };
            Ok(FaultRequest::Lock {
                table,
                secs: p.num("secs", 1, MAX_LOCK_SECS)?.unwrap_or(30),
            })
        }
        "idle_tx" => {
            p.only(&["n"])?;
            Ok(FaultRequest::IdleTx {
                n: p.num("n", 1, MAX_IDLE_TX)?.unwrap_or(3),
            })
        }
        "errors" => {
            p.only(&["count", "secs"])?;
            let count = p.num("count", 1, MAX_ERRORS_COUNT)?;
            let secs = p.num("secs", 1, MAX_ERRORS_SECS)?;
            let spec = match (count, secs) {
                (Some(_), Some(_)) => {
                    return Err(bad("errors: give `count` or `secs`, not both".into()))
                }
                (None, Some(s)) => ErrorsSpec::Secs(s),
                (c, None) => ErrorsSpec::Count(c.unwrap_or(50)),
            };
            Ok(FaultRequest::Errors(spec))
        }
        "bad_query" => {
            p.only(&["count"])?;
            Ok(FaultRequest::BadQuery {
                count: p.num("count", 1, MAX_BAD_QUERY_COUNT)?.unwrap_or(10),
            })
        }
        "bad_password" => {
            p.only(&["n"])?;
            Ok(FaultRequest::BadPassword {
                n: p.num("n", 1, MAX_BAD_PASSWORD)?.unwrap_or(1),
            })
        }
        other => Err(ParseError::UnknownFault(other.to_owned())),
    }
}

fn bad(msg: String) -> ParseError {
    ParseError::BadParam(msg)
}

/// `slow_query?path=/a,/b`: comma-separated path prefixes, each starting with `/`.
fn path_prefixes(raw: &str) -> Result<Vec<String>, ParseError> {
    let prefixes: Vec<String> = raw.split(',').map(|p| p.trim().to_owned()).collect();
    if prefixes.len() > MAX_SLOW_QUERY_PATHS {
        return Err(bad(format!(
            "slow_query: at most {MAX_SLOW_QUERY_PATHS} path prefixes, got {}",
            prefixes.len()
        )));
    }
    match prefixes.iter().find(|p| !p.starts_with('/')) {
        Some(p) => Err(bad(format!(
            "slow_query: each `path` prefix must start with `/`, got {p:?}"
        ))),
        None => Ok(prefixes),
    }
}

/// The query parameters of one request, with repeats already refused.
struct Params<'a> {
    fault: &'a str,
    pairs: &'a [(String, String)],
}

impl<'a> Params<'a> {
    fn new(fault: &'a str, pairs: &'a [(String, String)]) -> Result<Self, ParseError> {
        if !FAULT_NAMES.contains(&fault) {
            return Err(ParseError::UnknownFault(fault.to_owned()));
        }
        for (i, (k, _)) in pairs.iter().enumerate() {
            if pairs[..i].iter().any(|(prev, _)| prev == k) {
                return Err(bad(format!("{fault}: parameter `{k}` given twice")));
            }
        }
        Ok(Params { fault, pairs })
    }

    /// Refuses any parameter not in `allowed`.
    fn only(&self, allowed: &[&str]) -> Result<(), ParseError> {
        match self
            .pairs
            .iter()
            .find(|(k, _)| !allowed.contains(&k.as_str()))
        {
            None => Ok(()),
            Some((k, _)) if allowed.is_empty() => Err(bad(format!(
                "{}: takes no parameters, got `{k}`",
                self.fault
            ))),
            Some((k, _)) => Err(bad(format!(
                "{}: unknown parameter `{k}`; accepted: {}",
                self.fault,
                allowed.join(", ")
            ))),
        }
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// An integer parameter within `min..=max`, if given.
    fn num<T>(&self, key: &str, min: T, max: T) -> Result<Option<T>, ParseError>
    where
        T: FromStr + PartialOrd + fmt::Display + Copy,
    {
        let Some(raw) = self.get(key) else {
            return Ok(None);
        };
        let value: T = raw.trim().parse().map_err(|_| {
            bad(format!(
                "{}: `{key}` must be an integer in {min}..={max}, got {raw:?}",
                self.fault
            ))
        })?;
        if value < min || value > max {
            return Err(bad(format!(
                "{}: `{key}` must be in {min}..={max}, got {value}",
                self.fault
            )));
        }
        Ok(Some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str, query: &[(&str, &str)]) -> Result<FaultRequest, ParseError> {
        let pairs: Vec<(String, String)> = query
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        parse_fault(name, &pairs)
    }

    fn is_bad(r: &Result<FaultRequest, ParseError>) -> bool {
        matches!(r, Err(ParseError::BadParam(_)))
    }

    #[test]
    fn defaults() {
        assert_eq!(
            parse("crash", &[]),
            Ok(FaultRequest::Crash(CrashMode::Abort))
        );
        assert_eq!(parse("hang", &[]), Ok(FaultRequest::Hang));
        assert_eq!(
            parse("leak", &[]),
            Ok(FaultRequest::Leak {
                mb_per_sec: 10,
                max_mb: DEFAULT_LEAK_MAX_MB
            })
        );
        assert_eq!(parse("spin", &[]), Ok(FaultRequest::Spin { threads: 1 }));
        assert_eq!(
            parse("slow_query", &[]),
            Ok(FaultRequest::SlowQuery {
                ms: 2000,
                paths: Vec::new()
            })
        );
        assert_eq!(
            parse("lock", &[]),
            Ok(FaultRequest::Lock {
                table: Table::Leads,
                secs: 30
            })
        );
        assert_eq!(parse("idle_tx", &[]), Ok(FaultRequest::IdleTx { n: 3 }));
        assert_eq!(parse("n_plus_one", &[]), Ok(FaultRequest::NPlusOne));
        assert_eq!(
            parse("errors", &[]),
            Ok(FaultRequest::Errors(ErrorsSpec::Count(50)))
        );
        assert_eq!(
            parse("bad_query", &[]),
            Ok(FaultRequest::BadQuery { count: 10 })
        );
        assert_eq!(
            parse("bad_password", &[]),
            Ok(FaultRequest::BadPassword { n: 1 })
        );
        assert_eq!(parse("clear", &[]), Ok(FaultRequest::Clear));
    }

    #[test]
    fn explicit_values() {
        assert_eq!(
            parse("crash", &[("mode", "exit"), ("code", "3")]),
            Ok(FaultRequest::Crash(CrashMode::Exit(3)))
        );
        assert_eq!(
            parse("crash", &[("mode", "exit")]),
            Ok(FaultRequest::Crash(CrashMode::Exit(1)))
        );
        assert_eq!(
            parse("crash", &[("code", "0")]),
            Ok(FaultRequest::Crash(CrashMode::Exit(0)))
        );
        assert_eq!(
            parse("crash", &[("mode", "abort")]),
            Ok(FaultRequest::Crash(CrashMode::Abort))
        );
        assert_eq!(
            parse("leak", &[("mb_per_sec", "50"), ("max_mb", "512")]),
            Ok(FaultRequest::Leak {
                mb_per_sec: 50,
                max_mb: 512
            })
        );
        assert_eq!(
            parse("spin", &[("threads", "2")]),
            Ok(FaultRequest::Spin { threads: 2 })
        );
        assert_eq!(
            parse("slow_query", &[("ms", "150")]),
            Ok(FaultRequest::SlowQuery {
                ms: 150,
                paths: Vec::new()
            })
        );
        assert_eq!(
            parse(
                "slow_query",
                &[("ms", "20"), ("path", "/api/v1/tackle, /api/v1/campaigns")]
            ),
            Ok(FaultRequest::SlowQuery {
                ms: 20,
                paths: vec!["/api/v1/tackle".into(), "/api/v1/campaigns".into()]
            })
        );
        assert_eq!(
            parse("bad_query", &[("count", "25")]),
            Ok(FaultRequest::BadQuery { count: 25 })
        );
        assert_eq!(
            parse("bad_password", &[("n", "3")]),
            Ok(FaultRequest::BadPassword { n: 3 })
        );
        assert_eq!(
            parse("lock", &[("table", "campaigns"), ("secs", "5")]),
            Ok(FaultRequest::Lock {
                table: Table::Campaigns,
                secs: 5
            })
        );
        assert_eq!(
            parse("lock", &[("table", "deals")]),
            Ok(FaultRequest::Lock {
                table: Table::TackleDeals,
                secs: 30
            })
        );
        assert_eq!(
            parse("lock", &[("table", "TACKLE_DEALS")]),
            Ok(FaultRequest::Lock {
                table: Table::TackleDeals,
                secs: 30
            })
        );
        assert_eq!(
            parse("idle_tx", &[("n", "7")]),
            Ok(FaultRequest::IdleTx { n: 7 })
        );
        assert_eq!(
            parse("errors", &[("count", "5")]),
            Ok(FaultRequest::Errors(ErrorsSpec::Count(5)))
        );
        assert_eq!(
            parse("errors", &[("secs", "10")]),
            Ok(FaultRequest::Errors(ErrorsSpec::Secs(10)))
        );
    }

    #[test]
    fn unknown_fault() {
        assert_eq!(
            parse("explode", &[]),
            Err(ParseError::UnknownFault("explode".into()))
        );
        assert!(matches!(parse("", &[]), Err(ParseError::UnknownFault(_))));
        assert!(parse("explode", &[])
            .unwrap_err()
            .to_string()
            .contains("slow_query"));
    }

    #[test]
    fn bad_params() {
        assert!(is_bad(&parse("crash", &[("mode", "kaboom")])));
        assert!(is_bad(&parse("crash", &[("mode", "abort"), ("code", "2")])));
        assert!(is_bad(&parse(
            "crash",
            &[("mode", "exit"), ("code", "256")]
        )));
        assert!(is_bad(&parse("crash", &[("mode", "exit"), ("code", "-1")])));
        assert!(is_bad(&parse("leak", &[("mb_per_sec", "0")])));
        assert_eq!(
            parse("fd_leak", &[]),
            Ok(FaultRequest::FdLeak {
                per_sec: 100,
                nofile: None
            })
        );
        assert_eq!(
            parse("fd_leak", &[("per_sec", "50"), ("nofile", "1024")]),
            Ok(FaultRequest::FdLeak {
                per_sec: 50,
                nofile: Some(1024)
            })
        );
        assert!(is_bad(&parse("fd_leak", &[("nofile", "10")])));
        assert!(is_bad(&parse("fd_leak", &[("per_sec", "0")])));
        assert!(is_bad(&parse("leak", &[("mb_per_sec", "ten")])));
        assert!(is_bad(&parse("leak", &[("mb_per_sec", "99999")])));
        assert!(is_bad(&parse("spin", &[("threads", "0")])));
        assert!(is_bad(&parse("spin", &[("threads", "1000")])));
        assert!(is_bad(&parse("slow_query", &[("ms", "")])));
        assert!(is_bad(&parse("lock", &[("table", "pg_class")])));
        assert!(is_bad(&parse(
            "lock",
            &[("table", "leads; DROP TABLE users")]
        )));
        assert!(is_bad(&parse("lock", &[("secs", "0")])));
        assert!(is_bad(&parse("idle_tx", &[("n", "51")])));
        assert!(is_bad(&parse("errors", &[("count", "5"), ("secs", "5")])));
        assert!(is_bad(&parse("errors", &[("count", "0")])));
        assert!(is_bad(&parse("slow_query", &[("path", "api/v1")])));
        assert!(is_bad(&parse("slow_query", &[("path", "/a,,/b")])));
        assert!(is_bad(&parse("bad_query", &[("count", "0")])));
        assert!(is_bad(&parse("bad_query", &[("secs", "5")])));
        assert!(is_bad(&parse("bad_password", &[("n", "0")])));
        assert!(is_bad(&parse("bad_password", &[("n", "51")])));
    }

    #[test]
    fn unknown_and_repeated_params_are_refused() {
        assert!(is_bad(&parse("hang", &[("secs", "5")])));
        assert!(is_bad(&parse("clear", &[("x", "1")])));
        assert!(is_bad(&parse("leak", &[("mb", "5")])));
        assert!(is_bad(&parse(
            "spin",
            &[("threads", "1"), ("threads", "2")]
        )));
        let msg = parse("leak", &[("mb", "5")]).unwrap_err().to_string();
        assert!(msg.contains("mb_per_sec"), "{msg}");
    }

    #[test]
    fn whitespace_around_numbers_is_tolerated() {
        assert_eq!(
            parse("spin", &[("threads", " 3 ")]),
            Ok(FaultRequest::Spin { threads: 3 })
        );
    }
}
