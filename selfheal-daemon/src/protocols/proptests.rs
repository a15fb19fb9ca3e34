//! Property tests of the protocol layer: no input panics a parser or grows its memory past
//! its bound; cutting a valid stream anywhere changes no event; fingerprints ignore layout.

use proptest::prelude::*;

use super::{
    fingerprint::{fingerprint, MAX_FINGERPRINT_BYTES},
    http::{self, HttpParser},
    postgres::{self, tests as pg, PgEvent, PgParser},
    route::{route_template, MAX_TEMPLATE_BYTES},
    testing::{feed_capped, feed_split, feed_whole, sys, Parser, Syscall},
    Direction,
};

use Direction::{Received as In, Sent as Out};

/// Pieces that look like the protocols, so random input gets past the first checks.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    let fragments: Vec<Vec<u8>> = vec![
        b"GET /a/1?x HTTP/1.1\r\n".to_vec(),
        b"POST / HTTP/1.0\r\n".to_vec(),
        b"HEAD /h HTTP/1.1\r\n".to_vec(),
        b"HTTP/1.1 200 OK\r\n".to_vec(),
        b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
        b"HTTP/1.1 101 Switching\r\n".to_vec(),
        b"HTTP/1.1 304 x\r\n".to_vec(),
        b"Host: h\r\n".to_vec(),
        b"Content-Length: 5\r\n".to_vec(),
        b"Content-Length: 99999999999\r\n".to_vec(),
        b"Transfer-Encoding: chunked\r\n".to_vec(),
        b"\r\n".to_vec(),
        b"5\r\nhello\r\n0\r\n\r\n".to_vec(),
        b"ffffffffffff\r\n".to_vec(),
        pg::startup(&[("user", "u"), ("database", "d")]),
        pg::ssl_request(),
        pg::query("SELECT 1"),
        pg::parse("s1", "SELECT $1", &[23]),
        pg::bind("", "s1", &[Some(b"1")]),
        pg::execute("", 0),
        pg::sync(),
        pg::auth(0, &[]),
        pg::ready(b'T'),
        pg::data_row(&[Some(b"x"), None]),
        pg::command_complete("SELECT 1"),
        pg::error_response("ERROR", "42P01", "nope"),
        pg::simple(b'1'),
        pg::simple(b'2'),
        vec![b'D', 0x7f, 0xff, 0xff, 0xff],
        vec![b'd', 0x3f, 0, 0, 0],
        vec![0, 0, 0, 8],
    ];
    prop_oneof![
        3 => prop::collection::vec(any::<u8>(), 0..64),
        4 => prop::sample::select(fragments),
    ]
}

fn chunk() -> impl Strategy<Value = (Direction, Vec<u8>, usize, u64)> {
    (
        prop_oneof![Just(In), Just(Out)],
        prop::collection::vec(piece(), 0..6).prop_map(|pieces| pieces.concat()),
        prop_oneof![3 => Just(0usize), 1 => 0usize..100_000],
        0u64..50,
    )
}

/// Feeds arbitrary chunks (timestamps moving forward by random steps); returns the events.
fn feed_arbitrary<P: Parser>(
    parser: &mut P,
    chunks: &[(Direction, Vec<u8>, usize, u64)],
    bound: usize,
) -> Vec<P::Event> {
    let mut out = Vec::new();
    let mut ts = 0;
    for (direction, bytes, extra, step) in chunks {
        ts += step;
        parser.feed_one(*direction, bytes, bytes.len() + extra, ts, &mut out);
        assert!(parser.heap() <= bound, "{} > {bound}", parser.heap());
    }
    out
}

proptest! {
    // Cases: 256, or `PROPTEST_CASES`.

    #[test]
    fn http_survives_anything_within_its_memory_bound(
        chunks in prop::collection::vec(chunk(), 0..40),
    ) {
        let mut parser = HttpParser::new();
        let exchanges = feed_arbitrary(&mut parser, &chunks, http::MAX_HEAP_BYTES);
        for exchange in &exchanges {
            prop_assert!(exchange.response_start_ns >= exchange.request.start_ns);
            prop_assert!(exchange.request.path.len() <= http::MAX_PATH_BYTES);
        }
        let mut out = Vec::new();
        parser.close(&mut out);
        prop_assert!(parser.heap_bytes() <= http::MAX_HEAP_BYTES);
    }

    #[test]
    fn postgres_survives_anything_within_its_memory_bound(
        chunks in prop::collection::vec(chunk(), 0..40),
    ) {
        let mut parser = PgParser::new();
        let events = feed_arbitrary(&mut parser, &chunks, postgres::MAX_HEAP_BYTES);
        for event in &events {
            if let PgEvent::Query(query) = event {
                prop_assert!(query.end_ns >= query.start_ns);
            }
        }
        let mut out = Vec::new();
        parser.close(&mut out);
    }

    #[test]
    fn labels_are_bounded_for_any_text(text in ".{0,3000}") {
        prop_assert!(route_template(&text).len() <= MAX_TEMPLATE_BYTES);
        prop_assert!(fingerprint(&text).len() <= MAX_FINGERPRINT_BYTES);
    }

    #[test]
    fn fingerprints_ignore_layout_comments_case_and_literal_values(
        tokens in prop::collection::vec(sql_token(), 1..30),
        separators in prop::collection::vec(separator(), 30),
    ) {
        let plain: Vec<String> = tokens.iter().map(|(plain, _)| plain.clone()).collect();
        let mut varied = String::new();
        for (i, (_, other)) in tokens.iter().enumerate() {
            varied.push_str(other);
            varied.push_str(&separators[i % separators.len()]);
        }
        prop_assert_eq!(fingerprint(&plain.join(" ")), fingerprint(&varied));
    }

    #[test]
    fn a_valid_http_stream_cut_anywhere_gives_the_same_exchanges(
        exchanges in prop::collection::vec(exchange_spec(), 1..12),
        depth in 1usize..4,
        cuts in prop::collection::vec(0usize..200, 1..20),
    ) {
        let (conversation, statuses) = http_conversation(&exchanges, depth);
        let whole = feed_whole(&mut HttpParser::new(), &conversation);
        prop_assert_eq!(whole.iter().map(|e| e.status).collect::<Vec<_>>(), statuses);
        prop_assert!(whole.iter().all(|e| !e.truncated));
        let split = feed_split(&mut HttpParser::new(), &conversation, &cuts);
        prop_assert_eq!(split, whole);
    }

    #[test]
    fn a_valid_postgres_stream_cut_anywhere_gives_the_same_events(
        batches in prop::collection::vec(batch_spec(), 1..10),
        cuts in prop::collection::vec(0usize..200, 1..20),
    ) {
        let (conversation, expected) = pg_conversation(&batches);
        let whole = feed_whole(&mut PgParser::new(), &conversation);
        let queries = whole.iter().filter(|e| matches!(e, PgEvent::Query(_))).count();
        prop_assert_eq!(queries, expected);
        let split = feed_split(&mut PgParser::new(), &conversation, &cuts);
        prop_assert_eq!(split, whole);
    }

    #[test]
    fn capped_answers_and_unawaited_closes_lose_no_error(
        requests in prop::collection::vec(request(), 1..24),
        reads in prop::collection::vec(1usize..3000, 1..16),
        leftovers in prop::collection::vec(0usize..=6, 1..8),
        // The client's messages are captured whole (frontend bytes hidden by a gap are another
        // matter: how many queries they held is unknowable); the answers are cut anywhere.
        cap in 96usize..600,
    ) {
        let (conversation, expected_errors) =
            tokio_postgres_conversation(&requests, &reads, &leftovers);
        let mut parser = PgParser::new();
        let mut events = feed_capped(&mut parser, &conversation, cap);
        parser.close(&mut events);
        let queries: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                PgEvent::Query(q) => Some(q),
                _ => None,
            })
            .collect();
        // Exactly one event per query, every error with its SQLSTATE, nothing else failed.
        prop_assert_eq!(queries.len(), requests.len(), "{:?}", events);
        let errors: Vec<_> = queries.iter().filter_map(|q| q.error.as_ref()).collect();
        prop_assert_eq!(errors.len(), expected_errors, "{:?}", events);
        prop_assert!(errors.iter().all(|e| e.sqlstate == "42P01"));
        for query in &queries {
            prop_assert_eq!(
                query.error.is_some(),
                query.statement.as_ref().is_some_and(|s| &*s.sql == FAILING_SQL),
                "{:?}", query
            );
            prop_assert!(query.end_ns >= query.start_ns);
        }
        prop_assert_eq!(parser.stats().unmatched, 0);
    }

    #[test]
    fn capture_bounds_never_break_the_parsers(
        exchanges in prop::collection::vec(exchange_spec(), 1..8),
        batches in prop::collection::vec(batch_spec(), 1..8),
        cap in 0usize..600,
    ) {
        let (conversation, _) = http_conversation(&exchanges, 2);
        let mut parser = HttpParser::new();
        for exchange in feed_capped(&mut parser, &conversation, cap) {
            prop_assert!(exchange.response_start_ns >= exchange.request.start_ns);
        }
        prop_assert!(parser.heap_bytes() <= http::MAX_HEAP_BYTES);
        let (conversation, expected) = pg_conversation(&batches);
        let mut parser = PgParser::new();
        let events = feed_capped(&mut parser, &conversation, cap);
        let queries = events.iter().filter(|e| matches!(e, PgEvent::Query(_))).count();
        // Nothing invented: at most one event per query sent, each ending after it started.
        prop_assert!(queries <= expected, "{} > {}", queries, expected);
        for event in &events {
            if let PgEvent::Query(query) = event {
                prop_assert!(query.end_ns >= query.start_ns);
            }
        }
        prop_assert!(parser.heap_bytes() <= postgres::MAX_HEAP_BYTES);
    }
}

/// A SQL token: its plain form and an equivalent one (another literal value, other case).
fn sql_token() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        prop::sample::select(vec![
            "select", "from", "where", "and", "leads", "id", "=", "<>", "(", ")", ",", "$1", "$2",
            "in", "order", "by", "limit", "::", "int", "is", "null",
        ])
        .prop_flat_map(|t| {
            // Unquoted names and keywords in any case.
            (Just(t), any::<bool>()).prop_map(|(t, upper)| {
                (
                    t.to_owned(),
                    if upper {
                        t.to_uppercase()
                    } else {
                        t.to_owned()
                    },
                )
            })
        }),
        // A quoted name is case-sensitive and kept.
        Just(("\"Quoted\"".to_owned(), "\"Quoted\"".to_owned())),
        (0u32..100_000, 0u32..100_000).prop_map(|(a, b)| (a.to_string(), b.to_string())),
        ("[a-z ]{0,8}", "[a-z']{0,8}")
            .prop_map(|(a, b)| (format!("'{a}'"), format!("'{}'", b.replace('\'', "''")))),
    ]
}

fn separator() -> impl Strategy<Value = String> {
    prop::sample::select(vec![" ", "  ", "\n", "\t ", " /* note */ ", " -- note\n"])
        .prop_map(str::to_owned)
}

#[derive(Debug, Clone)]
enum BodySpec {
    Empty,
    Length(usize),
    Chunked(Vec<usize>),
}

#[derive(Debug, Clone)]
struct ExchangeSpec {
    method: &'static str,
    request_body: BodySpec,
    status: u16,
    response_body: BodySpec,
}

fn body_spec() -> impl Strategy<Value = BodySpec> {
    prop_oneof![
        Just(BodySpec::Empty),
        (1usize..3000).prop_map(BodySpec::Length),
        prop::collection::vec(1usize..300, 0..4).prop_map(BodySpec::Chunked),
    ]
}

fn exchange_spec() -> impl Strategy<Value = ExchangeSpec> {
    (
        prop::sample::select(vec!["GET", "HEAD", "POST", "DELETE"]),
        body_spec(),
        prop::sample::select(vec![200u16, 201, 204, 304, 404, 500]),
        body_spec(),
    )
        .prop_map(
            |(method, request_body, status, response_body)| ExchangeSpec {
                method,
                request_body: if method == "POST" {
                    request_body
                } else {
                    BodySpec::Empty
                },
                status,
                response_body,
            },
        )
}

fn render_message(head: &str, body: &BodySpec, has_body: bool) -> Vec<u8> {
    let mut out = head.as_bytes().to_vec();
    match body {
        BodySpec::Length(n) => {
            out.extend(format!("Content-Length: {n}\r\n\r\n").bytes());
            if has_body {
                out.resize(out.len() + n, b'b');
            }
        }
        BodySpec::Chunked(chunks) if has_body => {
            out.extend(b"Transfer-Encoding: chunked\r\n\r\n");
            for n in chunks {
                out.extend(format!("{n:x}\r\n").bytes());
                out.resize(out.len() + n, b'c');
                out.extend(b"\r\n");
            }
            out.extend(b"0\r\n\r\n");
        }
        _ => out.extend(b"\r\n"),
    }
    out
}

/// Requests pipelined `depth` at a time, each group answered in one write.
fn http_conversation(exchanges: &[ExchangeSpec], depth: usize) -> (Vec<Syscall>, Vec<u16>) {
    let mut conversation = Vec::new();
    let mut ts = 0;
    for group in exchanges.chunks(depth) {
        let mut requests = Vec::new();
        let mut responses = Vec::new();
        for (i, exchange) in group.iter().enumerate() {
            let head = format!(
                "{} /items/{}?q=1 HTTP/1.1\r\nHost: h{}\r\n",
                exchange.method,
                ts + i as u64,
                i % 3
            );
            requests.extend(render_message(&head, &exchange.request_body, true));
            let has_body =
                exchange.method != "HEAD" && exchange.status != 204 && exchange.status != 304;
            let body = match (&exchange.response_body, has_body) {
                // Without a length a response runs to the close; keep the stream going.
                (BodySpec::Empty, true) => &BodySpec::Length(0),
                (body, _) => body,
            };
            let head = format!("HTTP/1.1 {} Whatever\r\nServer: t\r\n", exchange.status);
            responses.extend(render_message(&head, body, has_body));
        }
        ts += 10;
        conversation.push(sys(In, requests, ts));
        ts += 10;
        conversation.push(sys(Out, responses, ts));
    }
    (conversation, exchanges.iter().map(|e| e.status).collect())
}

#[derive(Debug, Clone)]
enum BatchSpec {
    Simple { rows: u8, error: bool },
    Prepared { statement: u8, rows: u8 },
    Pipeline(Vec<(u8, u8)>),
    Copy { rows: u8 },
}

fn batch_spec() -> impl Strategy<Value = BatchSpec> {
    prop_oneof![
        (0u8..5, any::<bool>()).prop_map(|(rows, error)| BatchSpec::Simple { rows, error }),
        (0u8..4, 0u8..5).prop_map(|(statement, rows)| BatchSpec::Prepared { statement, rows }),
        prop::collection::vec((0u8..4, 0u8..4), 1..5).prop_map(BatchSpec::Pipeline),
        (0u8..5).prop_map(|rows| BatchSpec::Copy { rows }),
    ]
}

/// A connection: startup, then the batches; and how many query events it must give.
fn pg_conversation(batches: &[BatchSpec]) -> (Vec<Syscall>, usize) {
    let mut conversation = vec![
        sys(Out, pg::startup(&[("user", "u"), ("database", "d")]), 1),
        sys(
            In,
            [pg::auth(0, &[]), pg::key_data(1, 2), pg::ready(b'I')].concat(),
            2,
        ),
    ];
    let mut ts = 2;
    let mut prepared = [false; 4];
    let mut expected = 0;
    let mut push = |conversation: &mut Vec<Syscall>, direction, bytes: Vec<u8>| {
        ts += 1;
        conversation.push(sys(direction, bytes, ts));
    };
    let rows_of = |rows: u8| -> Vec<u8> {
        (0..rows)
            .map(|i| pg::data_row(&[Some(&[b'0' + i]), None]))
            .collect::<Vec<_>>()
            .concat()
    };
    for batch in batches {
        let mut needs: Vec<u8> = match batch {
            BatchSpec::Prepared { statement, .. } => vec![*statement],
            BatchSpec::Pipeline(execs) => execs.iter().map(|(s, _)| *s).collect(),
            _ => Vec::new(),
        };
        needs.sort_unstable();
        needs.dedup();
        for statement in needs {
            if !prepared[statement as usize] {
                prepared[statement as usize] = true;
                let sql = format!("SELECT * FROM t{statement} WHERE a = $1");
                push(
                    &mut conversation,
                    Out,
                    [
                        pg::parse(&format!("s{statement}"), &sql, &[23]),
                        pg::describe(b'S', &format!("s{statement}")),
                        pg::sync(),
                    ]
                    .concat(),
                );
                push(
                    &mut conversation,
                    In,
                    [
                        pg::simple(b'1'),
                        pg::row_description(&["a"]),
                        pg::ready(b'I'),
                    ]
                    .concat(),
                );
            }
        }
        match batch {
            BatchSpec::Simple { rows, error } => {
                push(
                    &mut conversation,
                    Out,
                    pg::query("SELECT * FROM t WHERE x = 1"),
                );
                let answer = if *error {
                    [
                        pg::error_response("ERROR", "42P01", "no such table"),
                        pg::ready(b'I'),
                    ]
                    .concat()
                } else {
                    [
                        pg::row_description(&["x"]),
                        rows_of(*rows),
                        pg::command_complete(&format!("SELECT {rows}")),
                        pg::ready(b'I'),
                    ]
                    .concat()
                };
                push(&mut conversation, In, answer);
                expected += 1;
            }
            BatchSpec::Prepared { statement, rows } => {
                let name = format!("s{statement}");
                push(
                    &mut conversation,
                    Out,
                    [
                        pg::bind("", &name, &[Some(b"1")]),
                        pg::execute("", 0),
                        pg::sync(),
                    ]
                    .concat(),
                );
                push(
                    &mut conversation,
                    In,
                    [
                        pg::simple(b'2'),
                        rows_of(*rows),
                        pg::command_complete(&format!("SELECT {rows}")),
                        pg::ready(b'T'),
                    ]
                    .concat(),
                );
                expected += 1;
            }
            BatchSpec::Pipeline(execs) => {
                let mut sent = Vec::new();
                let mut answer = Vec::new();
                for (statement, rows) in execs {
                    sent.extend(pg::bind("", &format!("s{statement}"), &[None]));
                    sent.extend(pg::execute("", 0));
                    answer.extend(pg::simple(b'2'));
                    answer.extend(rows_of(*rows));
                    answer.extend(pg::command_complete(&format!("SELECT {rows}")));
                }
                sent.extend(pg::sync());
                answer.extend(pg::ready(b'I'));
                push(&mut conversation, Out, sent);
                push(&mut conversation, In, answer);
                expected += execs.len();
            }
            BatchSpec::Copy { rows } => {
                push(&mut conversation, Out, pg::query("COPY t FROM STDIN"));
                push(&mut conversation, In, pg::msg(b'G', &[0, 0, 1, 0, 0]));
                let mut data = Vec::new();
                for i in 0..*rows {
                    data.extend(pg::msg(b'd', format!("{i}\n").as_bytes()));
                }
                data.extend(pg::simple(b'c'));
                push(&mut conversation, Out, data);
                push(
                    &mut conversation,
                    In,
                    [
                        pg::command_complete(&format!("COPY {rows}")),
                        pg::ready(b'I'),
                    ]
                    .concat(),
                );
                expected += 1;
            }
        }
    }
    (conversation, expected)
}

/// One request of a tokio-postgres client: an extended query returning rows (then, when
/// `close`, the `Close` of its statement, which the client does not wait for), or a simple
/// query that fails.
#[derive(Debug, Clone)]
enum Request {
    Rows { rows: u8, width: u16, close: bool },
    Failing,
}

const FAILING_SQL: &str = "SELECT * FROM no_such_table";

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        3 => (0u8..12, 1u16..300, any::<bool>())
            .prop_map(|(rows, width, close)| Request::Rows { rows, width, close }),
        1 => Just(Request::Failing),
    ]
}

/// The syscalls of `requests` as tokio-postgres makes them, and how many fail. Each request is
/// sent once the previous answer was read up to its completion (`CommandComplete` or
/// `ErrorResponse`) and `leftovers` more bytes (the next is taken each time; under 6 leaves
/// part of the `ReadyForQuery` for the next read); a close is sent right after its query's
/// answer was read that far, and its answer read with the next one. Reads are cut at the
/// `reads` sizes (taken in turn), as a client reading into whatever room its buffer has.
fn tokio_postgres_conversation(
    requests: &[Request],
    reads: &[usize],
    leftovers: &[usize],
) -> (Vec<Syscall>, usize) {
    let mut conversation = Vec::new();
    let mut ts = 0;
    let mut server = Vec::new();
    let mut read_to = 0;
    let mut reads = reads.iter().cycle();
    let mut leftovers = leftovers.iter().cycle();
    let mut errors = 0;
    let mut read = |conversation: &mut Vec<Syscall>, server: &[u8], until: usize, ts: &mut u64| {
        while read_to < until {
            let size = reads.next().copied().unwrap_or(1);
            let end = (read_to + size).min(until);
            *ts += 1;
            conversation.push(sys(In, &server[read_to..end], *ts));
            read_to = end;
        }
    };
    for (i, request) in requests.iter().enumerate() {
        ts += 1;
        let completed = match request {
            Request::Rows { rows, width, close } => {
                let sql = format!("SELECT payload FROM t{i} WHERE n < $1");
                conversation.push(sys(
                    Out,
                    [
                        pg::parse("", &sql, &[]),
                        pg::bind("", "", &[Some(b"1")]),
                        pg::describe(b'P', ""),
                        pg::execute("", 0),
                        pg::sync(),
                    ]
                    .concat(),
                    ts,
                ));
                server.extend(pg::simple(b'1'));
                server.extend(pg::simple(b'2'));
                server.extend(pg::row_description(&["payload"]));
                let text = format!("row {i} ").repeat(usize::from(*width) / 6 + 1);
                for _ in 0..*rows {
                    server.extend(pg::data_row(&[Some(text.as_bytes())]));
                }
                server.extend(pg::command_complete(&format!("SELECT {rows}")));
                let completed = server.len();
                server.extend(pg::ready(b'I'));
                if *close {
                    let leftover = leftovers.next().copied().unwrap_or(6);
                    read(&mut conversation, &server, completed + leftover, &mut ts);
                    ts += 1;
                    conversation.push(sys(Out, [pg::close(b'S', "s"), pg::sync()].concat(), ts));
                    server.extend(pg::simple(b'3'));
                    server.extend(pg::ready(b'I'));
                    continue;
                }
                completed
            }
            Request::Failing => {
                errors += 1;
                conversation.push(sys(Out, pg::query(FAILING_SQL), ts));
                server.extend(pg::error_response("ERROR", "42P01", "no such table"));
                let completed = server.len();
                server.extend(pg::ready(b'I'));
                completed
            }
        };
        let leftover = leftovers.next().copied().unwrap_or(6);
        read(&mut conversation, &server, completed + leftover, &mut ts);
    }
    read(&mut conversation, &server, server.len(), &mut ts);
    (conversation, errors)
}
