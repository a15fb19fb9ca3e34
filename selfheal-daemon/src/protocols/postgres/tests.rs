//! Wire messages written by hand, as `tokio-postgres`, libpq and the server send them.

use super::*;
use crate::protocols::testing::{
    assert_every_split_matches, feed_capped, feed_whole, sys, Syscall,
};

use Direction::{Received as In, Sent as Out};

// Frontend messages.

pub(in crate::protocols) fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty];
    m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstring(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn untyped(body: &[u8]) -> Vec<u8> {
    let mut m = (body.len() as u32 + 4).to_be_bytes().to_vec();
    m.extend_from_slice(body);
    m
}

pub(in crate::protocols) fn startup(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (key, value) in params {
        body.extend(cstring(key));
        body.extend(cstring(value));
    }
    body.push(0);
    untyped(&body)
}

pub(in crate::protocols) fn ssl_request() -> Vec<u8> {
    untyped(&SSL_REQUEST.to_be_bytes())
}

fn gssenc_request() -> Vec<u8> {
    untyped(&GSSENC_REQUEST.to_be_bytes())
}

fn cancel_request(pid: u32, key: u32) -> Vec<u8> {
    let mut body = CANCEL_REQUEST.to_be_bytes().to_vec();
    body.extend(pid.to_be_bytes());
    body.extend(key.to_be_bytes());
    untyped(&body)
}

pub(in crate::protocols) fn password(text: &str) -> Vec<u8> {
    msg(b'p', &cstring(text))
}

pub(in crate::protocols) fn query(sql: &str) -> Vec<u8> {
    msg(b'Q', &cstring(sql))
}

pub(in crate::protocols) fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut body = cstring(name);
    body.extend(cstring(sql));
    body.extend((types.len() as u16).to_be_bytes());
    for t in types {
        body.extend(t.to_be_bytes());
    }
    msg(b'P', &body)
}

/// Binary parameters and results, as tokio-postgres binds.
pub(in crate::protocols) fn bind(
    portal: &str,
    statement: &str,
    params: &[Option<&[u8]>],
) -> Vec<u8> {
    let mut body = cstring(portal);
    body.extend(cstring(statement));
    body.extend(1u16.to_be_bytes());
    body.extend(1u16.to_be_bytes());
    body.extend((params.len() as u16).to_be_bytes());
    for param in params {
        match param {
            Some(value) => {
                body.extend((value.len() as i32).to_be_bytes());
                body.extend_from_slice(value);
            }
            None => body.extend((-1i32).to_be_bytes()),
        }
    }
    body.extend(1u16.to_be_bytes());
    body.extend(1u16.to_be_bytes());
    msg(b'B', &body)
}

pub(in crate::protocols) fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    body.extend(cstring(name));
    msg(b'D', &body)
}

pub(in crate::protocols) fn execute(portal: &str, max_rows: u32) -> Vec<u8> {
    let mut body = cstring(portal);
    body.extend(max_rows.to_be_bytes());
    msg(b'E', &body)
}

pub(in crate::protocols) fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut body = vec![kind];
    body.extend(cstring(name));
    msg(b'C', &body)
}

pub(in crate::protocols) fn sync() -> Vec<u8> {
    msg(b'S', &[])
}

fn flush() -> Vec<u8> {
    msg(b'H', &[])
}

fn terminate() -> Vec<u8> {
    msg(b'X', &[])
}

// Backend messages.

pub(in crate::protocols) fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
    let mut body = code.to_be_bytes().to_vec();
    body.extend_from_slice(extra);
    msg(b'R', &body)
}

pub(in crate::protocols) fn param_status(key: &str, value: &str) -> Vec<u8> {
    let mut body = cstring(key);
    body.extend(cstring(value));
    msg(b'S', &body)
}

pub(in crate::protocols) fn key_data(pid: u32, key: u32) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    body.extend(key.to_be_bytes());
    msg(b'K', &body)
}

pub(in crate::protocols) fn ready(status: u8) -> Vec<u8> {
    msg(b'Z', &[status])
}

pub(in crate::protocols) fn row_description(names: &[&str]) -> Vec<u8> {
    let mut body = (names.len() as u16).to_be_bytes().to_vec();
    for name in names {
        body.extend(cstring(name));
        body.extend(16_384u32.to_be_bytes()); // table oid
        body.extend(1u16.to_be_bytes()); // column number
        body.extend(23u32.to_be_bytes()); // int4
        body.extend(4u16.to_be_bytes());
        body.extend((-1i32).to_be_bytes());
        body.extend(1u16.to_be_bytes());
    }
    msg(b'T', &body)
}

pub(in crate::protocols) fn data_row(columns: &[Option<&[u8]>]) -> Vec<u8> {
    let mut body = (columns.len() as u16).to_be_bytes().to_vec();
    for column in columns {
        match column {
            Some(value) => {
                body.extend((value.len() as i32).to_be_bytes());
                body.extend_from_slice(value);
            }
            None => body.extend((-1i32).to_be_bytes()),
        }
    }
    msg(b'D', &body)
}

pub(in crate::protocols) fn command_complete(tag: &str) -> Vec<u8> {
    msg(b'C', &cstring(tag))
}

pub(in crate::protocols) fn error_response(severity: &str, code: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend(cstring(value));
    }
    body.extend(b"Fpostgres.c\0L1234\0Rexec_simple_query\0");
    body.push(0);
    msg(b'E', &body)
}

fn notice(message: &str) -> Vec<u8> {
    let mut body = b"SNOTICE\0VNOTICE\0C00000\0M".to_vec();
    body.extend(cstring(message));
    body.push(0);
    msg(b'N', &body)
}

fn notification(pid: u32, channel: &str, payload: &str) -> Vec<u8> {
    let mut body = pid.to_be_bytes().to_vec();
    body.extend(cstring(channel));
    body.extend(cstring(payload));
    msg(b'A', &body)
}

pub(in crate::protocols) fn simple(ty: u8) -> Vec<u8> {
    msg(ty, &[])
}

fn param_description(types: &[u32]) -> Vec<u8> {
    let mut body = (types.len() as u16).to_be_bytes().to_vec();
    for t in types {
        body.extend(t.to_be_bytes());
    }
    msg(b't', &body)
}

fn copy_response(ty: u8, columns: u16) -> Vec<u8> {
    let mut body = vec![0];
    body.extend(columns.to_be_bytes());
    for _ in 0..columns {
        body.extend(0u16.to_be_bytes());
    }
    msg(ty, &body)
}

fn cat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}

const LEAD_SQL: &str = "SELECT id, name FROM leads WHERE id = $1";

/// Startup with md5 authentication, as libpq and tokio-postgres do it.
fn connect() -> Vec<Syscall> {
    vec![
        sys(
            Out,
            startup(&[
                ("user", "app"),
                ("database", "crm"),
                ("application_name", "api"),
                ("client_encoding", "UTF8"),
            ]),
            1,
        ),
        sys(In, auth(5, &[1, 2, 3, 4]), 2),
        sys(Out, password("md5d41d8cd98f00b204e9800998ecf8427e"), 3),
        sys(
            In,
            cat(&[
                auth(0, &[]),
                param_status("server_version", "15.4"),
                param_status("TimeZone", "UTC"),
                key_data(4242, 99),
                ready(b'I'),
            ]),
            4,
        ),
    ]
}

/// tokio-postgres `prepare` then `query`: Parse/Describe/Sync, then Bind/Execute/Sync.
fn prepared_query() -> Vec<Syscall> {
    vec![
        sys(
            Out,
            cat(&[parse("s0", LEAD_SQL, &[23]), describe(b'S', "s0"), sync()]),
            10,
        ),
        sys(
            In,
            cat(&[
                simple(b'1'),
                param_description(&[23]),
                row_description(&["id", "name"]),
                ready(b'I'),
            ]),
            11,
        ),
        sys(
            Out,
            cat(&[
                bind("", "s0", &[Some(&42i32.to_be_bytes())]),
                execute("", 0),
                sync(),
            ]),
            20,
        ),
        sys(
            In,
            cat(&[
                simple(b'2'),
                data_row(&[Some(b"\0\0\0\x2a"), Some(b"Acme")]),
                data_row(&[Some(b"\0\0\0\x2b"), None]),
                command_complete("SELECT 2"),
                ready(b'I'),
            ]),
            25,
        ),
    ]
}

fn queries(events: &[PgEvent]) -> Vec<&PgQuery> {
    events
        .iter()
        .filter_map(|e| match e {
            PgEvent::Query(q) => Some(q),
            _ => None,
        })
        .collect()
}

fn sql(query: &PgQuery) -> &str {
    query.statement.as_ref().map_or("", |s| &s.sql)
}

#[test]
fn startup_and_md5_authentication() {
    let mut parser = PgParser::new();
    let events = feed_whole(&mut parser, &connect());
    let startup = StartupInfo {
        user: Some("app".into()),
        database: Some("crm".into()),
        application_name: Some("api".into()),
    };
    assert_eq!(
        events,
        vec![PgEvent::Authenticated {
            ts_ns: 4,
            startup: startup.clone()
        }]
    );
    assert_eq!(parser.startup(), &startup);
    assert_eq!(parser.transaction_status(), Some((TxStatus::Idle, 4)));
    assert_eq!(parser.stats(), PgStats::default());
}

#[test]
fn a_bad_password_is_an_auth_failure() {
    let mut parser = PgParser::new();
    let conversation = vec![
        sys(Out, startup(&[("user", "app"), ("database", "crm")]), 1),
        sys(In, auth(10, b"SCRAM-SHA-256\0\0"), 2),
        sys(Out, password("n,,n=,r=nonce"), 3),
        sys(
            In,
            error_response(
                "FATAL",
                "28P01",
                "password authentication failed for user \"app\"",
            ),
            4,
        ),
    ];
    let events = feed_whole(&mut parser, &conversation);
    let [PgEvent::AuthFailed {
        ts_ns,
        startup,
        error,
    }] = events.as_slice()
    else {
        panic!("{events:?}");
    };
    assert_eq!(*ts_ns, 4);
    assert_eq!(startup.user.as_deref(), Some("app"));
    assert_eq!(error.sqlstate, "28P01");
    assert_eq!(error.severity, "FATAL");
    assert!(error.message.starts_with("password authentication failed"));
}

#[test]
fn ssl_accepted_stops_parsing_and_refused_goes_on() {
    let mut parser = PgParser::new();
    let mut events = feed_whole(
        &mut parser,
        &[
            sys(Out, ssl_request(), 1),
            sys(In, b"S", 2),
            sys(Out, [0x16, 0x03, 0x01, 0x00, 0xf0], 3),
        ],
    );
    assert_eq!(events, vec![PgEvent::Encrypted { ts_ns: 2 }]);
    assert_eq!(parser.stopped(), Some(Stopped::Encrypted));

    let mut parser = PgParser::new();
    let mut conversation = vec![
        sys(Out, gssenc_request(), 1),
        sys(In, b"N", 1),
        sys(Out, ssl_request(), 1),
        sys(In, b"N", 1),
    ];
    conversation.extend(connect());
    events = feed_whole(&mut parser, &conversation);
    assert!(
        matches!(events.as_slice(), [PgEvent::Authenticated { .. }]),
        "{events:?}"
    );
    assert_eq!(parser.stats().desyncs, 0);
}

#[test]
fn direct_tls_is_recognised() {
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    parser.feed(Out, &[0x16, 0x03, 0x01, 0x02, 0x00], 517, 1, &mut out);
    assert_eq!(out, vec![PgEvent::Encrypted { ts_ns: 1 }]);
}

#[test]
fn a_cancel_request_is_recognised_and_skipped() {
    let mut parser = PgParser::new();
    let events = feed_whole(&mut parser, &[sys(Out, cancel_request(4242, 99), 7)]);
    assert_eq!(events, vec![PgEvent::Cancel { ts_ns: 7 }]);
    assert_eq!(parser.stopped(), Some(Stopped::Cancel));
}

#[test]
fn prepare_then_execute_like_tokio_postgres() {
    let mut conversation = connect();
    conversation.extend(prepared_query());
    let mut parser = PgParser::new();
    let events = feed_whole(&mut parser, &conversation);
    let queries = queries(&events);
    assert_eq!(queries.len(), 1, "the prepare is not a query: {events:?}");
    let query = queries[0];
    assert_eq!(sql(query), LEAD_SQL);
    assert_eq!(
        query.statement.as_ref().map(|s| &*s.fingerprint),
        Some("SELECT id, name FROM leads WHERE id = $1")
    );
    assert_eq!(query.protocol, QueryProtocol::Extended);
    assert_eq!(
        (query.start_ns, query.end_ns, query.duration_ns()),
        (20, 25, 5)
    );
    assert_eq!(query.rows, 2);
    assert_eq!(query.command.as_deref(), Some("SELECT"));
    assert_eq!(query.completion, Completion::Command);
    assert_eq!(query.tx_status, Some(TxStatus::Idle));
    assert_eq!(query.error, None);
    assert_eq!(parser.stats().queries, 1);
    assert_eq!(parser.stats().unmatched, 0);
}

/// Two Executes before one Sync; their answers arrive in two reads.
fn pipeline() -> Vec<Syscall> {
    vec![
        sys(
            Out,
            cat(&[
                bind("", "s0", &[Some(&1i32.to_be_bytes())]),
                execute("", 0),
                parse("", "UPDATE leads SET seen = true WHERE owner = $1", &[23]),
                bind("", "", &[Some(&7i32.to_be_bytes())]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ]),
            30,
        ),
        sys(
            In,
            cat(&[
                simple(b'2'),
                data_row(&[Some(b"1"), Some(b"x")]),
                command_complete("SELECT 1"),
            ]),
            31,
        ),
        sys(
            In,
            cat(&[
                simple(b'1'),
                simple(b'2'),
                simple(b'n'),
                command_complete("UPDATE 3"),
                ready(b'T'),
            ]),
            35,
        ),
    ]
}

#[test]
fn pipelined_executes_keep_their_own_end_times() {
    let mut conversation = prepared_query();
    conversation.extend(pipeline());
    let mut parser = PgParser::new();
    let events = feed_whole(&mut parser, &conversation);
    let queries = queries(&events);
    assert_eq!(queries.len(), 3);
    let (first, second) = (queries[1], queries[2]);
    assert_eq!(sql(first), LEAD_SQL);
    assert_eq!((first.start_ns, first.end_ns, first.rows), (30, 31, 1));
    assert_eq!(sql(second), "UPDATE leads SET seen = true WHERE owner = $1");
    assert_eq!((second.start_ns, second.end_ns, second.rows), (30, 35, 3));
    assert_eq!(second.command.as_deref(), Some("UPDATE"));
    for query in [first, second] {
        assert_eq!(query.tx_status, Some(TxStatus::InTransaction));
    }
}

#[test]
fn events_wait_for_ready_for_query() {
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    let conversation = pipeline();
    for s in &conversation[..2] {
        parser.feed(s.direction, &s.data, s.data.len(), s.ts, &mut out);
    }
    assert!(
        out.is_empty(),
        "completed but not reported before ReadyForQuery"
    );
    let s = &conversation[2];
    parser.feed(s.direction, &s.data, s.data.len(), s.ts, &mut out);
    assert_eq!(out.len(), 2);
}

fn transaction() -> Vec<Syscall> {
    vec![
        sys(
            Out,
            query("BEGIN; UPDATE leads SET x = 1 WHERE id = 5; SELECT 1"),
            100,
        ),
        sys(
            In,
            cat(&[
                command_complete("BEGIN"),
                command_complete("UPDATE 1"),
                row_description(&["?column?"]),
                data_row(&[Some(b"1")]),
                command_complete("SELECT 1"),
                ready(b'T'),
            ]),
            105,
        ),
    ]
}

#[test]
fn a_simple_query_with_several_statements_and_idle_in_transaction() {
    let mut parser = PgParser::new();
    let events = feed_whole(&mut parser, &transaction());
    let queries = queries(&events);
    assert_eq!(queries.len(), 1);
    let query = queries[0];
    assert_eq!(query.protocol, QueryProtocol::Simple);
    assert_eq!((query.start_ns, query.end_ns), (100, 105));
    assert_eq!(query.rows, 2);
    assert_eq!(query.command.as_deref(), Some("SELECT"));
    assert_eq!(query.tx_status, Some(TxStatus::InTransaction));
    assert_eq!(
        query.statement.as_ref().map(|s| &*s.fingerprint),
        Some("BEGIN; UPDATE leads SET x = ? WHERE id = ?; SELECT ?")
    );
    assert_eq!(
        parser.idle_in_transaction(),
        Some(IdleInTransaction {
            since_ns: 105,
            status: TxStatus::InTransaction
        })
    );
    let mut out = Vec::new();
    let commit = query_text("COMMIT");
    parser.feed(Out, &commit, commit.len(), 200, &mut out);
    assert_eq!(parser.idle_in_transaction(), None, "a query is running");
    assert_eq!(parser.in_flight().count(), 1);
    let answer = cat(&[command_complete("COMMIT"), ready(b'I')]);
    parser.feed(In, &answer, answer.len(), 201, &mut out);
    assert_eq!(parser.idle_in_transaction(), None);
    assert_eq!(parser.in_flight().count(), 0);
    assert_eq!(queries_of(&out)[0].command.as_deref(), Some("COMMIT"));
}

fn query_text(sql: &str) -> Vec<u8> {
    query(sql)
}

fn queries_of(events: &[PgEvent]) -> Vec<PgQuery> {
    queries(events).into_iter().cloned().collect()
}

#[test]
fn a_failed_transaction_reports_e() {
    let mut parser = PgParser::new();
    let conversation = vec![
        sys(Out, query("BEGIN"), 1),
        sys(In, cat(&[command_complete("BEGIN"), ready(b'T')]), 2),
        sys(Out, query("SELECT 1/0"), 3),
        sys(
            In,
            cat(&[
                error_response("ERROR", "22012", "division by zero"),
                ready(b'E'),
            ]),
            4,
        ),
    ];
    let events = feed_whole(&mut parser, &conversation);
    let queries = queries(&events);
    assert_eq!(queries.len(), 2);
    assert_eq!(queries[1].completion, Completion::Error);
    assert_eq!(
        queries[1].error.as_ref().map(|e| e.sqlstate.as_str()),
        Some("22012")
    );
    assert_eq!(queries[1].tx_status, Some(TxStatus::Failed));
    assert_eq!(
        parser.idle_in_transaction(),
        Some(IdleInTransaction {
            since_ns: 4,
            status: TxStatus::Failed
        })
    );
}

#[test]
fn a_parse_error_reports_the_statement_and_skips_to_sync() {
    let mut parser = PgParser::new();
    let conversation = vec![
        sys(
            Out,
            cat(&[
                parse("", "SELEC 1", &[]),
                bind("", "", &[]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ]),
            1,
        ),
        sys(
            In,
            cat(&[
                error_response("ERROR", "42601", "syntax error at or near \"SELEC\""),
                ready(b'I'),
            ]),
            2,
        ),
        sys(Out, query("SELECT 1"), 3),
        sys(
            In,
            cat(&[
                row_description(&["x"]),
                data_row(&[Some(b"1")]),
                command_complete("SELECT 1"),
                ready(b'I'),
            ]),
            4,
        ),
    ];
    let events = feed_whole(&mut parser, &conversation);
    let queries = queries(&events);
    assert_eq!(queries.len(), 2);
    assert_eq!(sql(queries[0]), "SELEC 1");
    assert_eq!(queries[0].completion, Completion::Error);
    assert_eq!(
        queries[0].error.as_ref().map(|e| e.sqlstate.as_str()),
        Some("42601")
    );
    assert_eq!(queries[1].rows, 1);
    assert_eq!(parser.stats().unmatched, 0);
}

#[test]
fn an_error_mid_pipeline_reports_the_failed_execute_and_not_the_skipped_ones() {
    let mut parser = PgParser::new();
    let insert = "INSERT INTO leads (email) VALUES ($1)";
    let conversation = vec![
        sys(Out, cat(&[parse("ins", insert, &[25]), sync()]), 1),
        sys(In, cat(&[simple(b'1'), ready(b'I')]), 2),
        sys(
            Out,
            cat(&[
                bind("", "ins", &[Some(b"a@x.io")]),
                execute("", 0),
                bind("", "ins", &[Some(b"a@x.io")]),
                execute("", 0),
                bind("", "ins", &[Some(b"b@x.io")]),
                execute("", 0),
                sync(),
            ]),
            3,
        ),
        sys(
            In,
            cat(&[
                simple(b'2'),
                command_complete("INSERT 0 1"),
                simple(b'2'),
                error_response(
                    "ERROR",
                    "23505",
                    "duplicate key value violates unique constraint",
                ),
                ready(b'I'),
            ]),
            4,
        ),
    ];
    let events = feed_whole(&mut parser, &conversation);
    let queries = queries(&events);
    assert_eq!(queries.len(), 2, "{events:?}");
    assert_eq!(
        (queries[0].rows, queries[0].completion),
        (1, Completion::Command)
    );
    assert_eq!(queries[0].command.as_deref(), Some("INSERT"));
    assert_eq!(queries[1].completion, Completion::Error);
    assert_eq!(sql(queries[1]), insert);
    assert!(parser.in_flight().next().is_none());
}

#[test]
fn an_error_at_sync_fails_the_last_query() {
    let mut parser = PgParser::new();
    let conversation = vec![
        sys(
            Out,
            cat(&[
                parse("", "INSERT INTO child VALUES (1)", &[]),
                bind("", "", &[]),
                execute("", 0),
                sync(),
            ]),
            1,
        ),
        sys(
            In,
            cat(&[
                simple(b'1'),
                simple(b'2'),
                command_complete("INSERT 0 1"),
                error_response(
                    "ERROR",
                    "23503",
                    "insert or update violates foreign key constraint",
                ),
                ready(b'I'),
            ]),
            2,
        ),
    ];
    let events = feed_whole(&mut parser, &conversation);
    let queries = queries(&events);
    assert_eq!(queries.len(), 1);
    assert_eq!(
        queries[0].error.as_ref().map(|e| e.sqlstate.as_str()),
        Some("23503")
    );
    assert_eq!(queries[0].completion, Completion::Error);
}

fn copies() -> Vec<Syscall> {
    vec![
        sys(Out, query("COPY leads (id, name) FROM STDIN"), 1),
        sys(In, copy_response(b'G', 2), 2),
        sys(
            Out,
            cat(&[
                msg(b'd', b"1\tAcme\n"),
                msg(b'd', b"2\tInitech\n"),
                simple(b'c'),
            ]),
            3,
        ),
        sys(In, cat(&[command_complete("COPY 2"), ready(b'I')]), 4),
        sys(Out, query("COPY leads TO STDOUT"), 5),
        sys(
            In,
            cat(&[
                copy_response(b'H', 2),
                msg(b'd', b"1\tAcme\n"),
                msg(b'd', b"2\tInitech\n"),
                msg(b'd', b"3\tHooli\n"),
                simple(b'c'),
                command_complete("COPY 3"),
                ready(b'I'),
            ]),
            6,
        ),
    ]
}

#[test]
fn copy_in_and_out_are_skipped_by_length() {
    let mut parser = PgParser::new();
    let events = feed_whole(&mut parser, &copies());
    let queries = queries(&events);
    assert_eq!(queries.len(), 2);
    assert_eq!((queries[0].rows, queries[0].end_ns), (2, 4));
    assert_eq!((queries[1].rows, queries[1].end_ns), (3, 6));
    assert_eq!(queries[1].command.as_deref(), Some("COPY"));
    assert_eq!(parser.stats().unmatched, 0);
}

#[test]
fn notices_notifications_and_parameter_statuses_are_ignored() {
    let mut parser = PgParser::new();
    let conversation = vec![
        sys(Out, query("LISTEN jobs; SELECT 1"), 1),
        sys(
            In,
            cat(&[
                command_complete("LISTEN"),
                notice("relation exists, skipping"),
                row_description(&["x"]),
                notification(7, "jobs", "42"),
                data_row(&[Some(b"1")]),
                param_status("application_name", "x"),
                command_complete("SELECT 1"),
                ready(b'I'),
            ]),
            2,
        ),
        sys(In, notification(7, "jobs", "43"), 3),
    ];
    let events = feed_whole(&mut parser, &conversation);
    assert_eq!(queries(&events).len(), 1);
    assert_eq!(queries(&events)[0].rows, 1);
    assert_eq!(
        parser.stats(),
        PgStats {
            queries: 1,
            ..PgStats::default()
        }
    );
}

#[test]
fn empty_queries_and_suspended_portals() {
    let mut parser = PgParser::new();
    let conversation = vec![
        sys(Out, query(""), 1),
        sys(In, cat(&[simple(b'I'), ready(b'I')]), 2),
        sys(
            Out,
            cat(&[
                parse("", "SELECT * FROM leads", &[]),
                bind("cur", "", &[]),
                execute("cur", 2),
                flush(),
            ]),
            3,
        ),
        sys(
            In,
            cat(&[
                simple(b'1'),
                simple(b'2'),
                data_row(&[Some(b"1")]),
                data_row(&[Some(b"2")]),
                simple(b's'),
            ]),
            4,
        ),
        sys(
            Out,
            cat(&[execute("cur", 2), close(b'P', "cur"), sync()]),
            5,
        ),
        sys(
            In,
            cat(&[
                data_row(&[Some(b"3")]),
                command_complete("SELECT 1"),
                simple(b'3'),
                ready(b'I'),
            ]),
            6,
        ),
        sys(Out, terminate(), 7),
    ];
    let events = feed_whole(&mut parser, &conversation);
    let queries = queries(&events);
    assert_eq!(queries.len(), 3);
    assert_eq!(queries[0].completion, Completion::EmptyQuery);
    assert_eq!(
        (queries[1].completion, queries[1].rows),
        (Completion::Suspended, 2)
    );
    assert_eq!(sql(queries[1]), "SELECT * FROM leads");
    assert_eq!(
        (queries[2].completion, queries[2].rows),
        (Completion::Command, 1)
    );
    assert_eq!(sql(queries[2]), "SELECT * FROM leads");
    assert_eq!(parser.stats().unmatched, 0);
}

#[test]
fn splitting_at_every_byte_gives_the_same_events() {
    let mut everything = connect();
    everything.extend(prepared_query());
    everything.extend(pipeline());
    everything.extend(transaction());
    assert_every_split_matches::<PgParser>(&everything);
    assert_every_split_matches::<PgParser>(&copies());
}

#[test]
fn joining_an_established_connection() {
    let mut parser = PgParser::new();
    let events = feed_whole(&mut parser, &transaction());
    assert_eq!(queries(&events).len(), 1);
    // Joining in the middle of an answer: skipped until a plausible start.
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    parser.feed(In, b"\0\0\0\x04Acme\0\0\0\x07Initech", 19, 1, &mut out);
    let events = feed_whole(&mut parser, &transaction());
    assert_eq!(queries(&events).len(), 1);
    assert_eq!(parser.stats().desyncs, 1);
}

#[test]
fn long_sql_cut_by_the_capture_is_kept_truncated() {
    let long = format!(
        "SELECT * FROM leads WHERE note = '{}' AND id = 5",
        "n".repeat(2000)
    );
    let mut parser = PgParser::new();
    let conversation = vec![
        sys(Out, query(&long), 1),
        sys(
            In,
            cat(&[
                row_description(&["id"]),
                command_complete("SELECT 0"),
                ready(b'I'),
            ]),
            2,
        ),
    ];
    let events = feed_capped(&mut parser, &conversation, 512);
    let queries = queries(&events);
    assert_eq!(queries.len(), 1);
    let statement = queries[0].statement.as_ref().expect("statement");
    assert!(statement.truncated);
    assert!(statement.sql.len() < 512);
    assert_eq!(
        &*statement.fingerprint,
        "SELECT * FROM leads WHERE note = ?"
    );
    assert_eq!(parser.stats().desyncs, 0);
}

#[test]
fn a_batch_cut_by_the_capture_becomes_an_unseen_batch() {
    let long = format!(
        "SELECT * FROM leads WHERE name = $1 /* {} */",
        "c".repeat(900)
    );
    let mut parser = PgParser::new();
    let conversation = vec![
        sys(
            Out,
            cat(&[
                parse("", &long, &[25]),
                bind("", "", &[Some(b"Acme")]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ]),
            10,
        ),
        sys(
            In,
            cat(&[
                simple(b'1'),
                simple(b'2'),
                row_description(&["id"]),
                data_row(&[Some(b"1")]),
                command_complete("SELECT 1"),
                ready(b'I'),
            ]),
            15,
        ),
        sys(Out, query("SELECT 2"), 20),
        sys(
            In,
            cat(&[
                row_description(&["x"]),
                data_row(&[Some(b"2")]),
                command_complete("SELECT 1"),
                ready(b'I'),
            ]),
            21,
        ),
    ];
    let events = feed_capped(&mut parser, &conversation, 512);
    let queries = queries(&events);
    assert_eq!(queries.len(), 2, "{events:?}");
    assert_eq!(queries[0].protocol, QueryProtocol::Unknown);
    assert_eq!(
        (queries[0].start_ns, queries[0].end_ns, queries[0].rows),
        (10, 15, 1)
    );
    assert!(sql(queries[0]).starts_with("SELECT * FROM leads WHERE name = $1"));
    assert_eq!(queries[0].tx_status, Some(TxStatus::Idle));
    assert_eq!(queries[1].protocol, QueryProtocol::Simple);
    assert_eq!(sql(queries[1]), "SELECT 2");
    let stats = parser.stats();
    assert_eq!((stats.desyncs, stats.unmatched), (1, 0));
}

#[test]
fn results_read_past_the_capture_end_by_inference() {
    let mut rows = vec![row_description(&["id", "payload"])];
    for i in 0..200u32 {
        rows.push(data_row(&[Some(&i.to_be_bytes()), Some(&[b'p'; 40])]));
    }
    rows.push(command_complete("SELECT 200"));
    rows.push(ready(b'I'));
    let answer = cat(&rows);
    let (first_read, second_read) = answer.split_at(8192);
    let mut parser = PgParser::new();
    let conversation = vec![
        sys(Out, query("SELECT id, payload FROM big"), 1),
        sys(In, first_read, 2),
        sys(In, second_read, 3),
        sys(Out, query("SELECT 1"), 10),
        sys(
            In,
            cat(&[
                row_description(&["x"]),
                data_row(&[Some(b"1")]),
                command_complete("SELECT 1"),
                ready(b'I'),
            ]),
            11,
        ),
    ];
    let events = feed_capped(&mut parser, &conversation, 512);
    let queries = queries(&events);
    assert_eq!(queries.len(), 2, "{events:?}");
    assert_eq!(queries[0].completion, Completion::Inferred);
    assert_eq!((queries[0].start_ns, queries[0].end_ns), (1, 3));
    assert!(
        queries[0].rows > 0,
        "rows seen before the gap are a lower bound"
    );
    assert_eq!(queries[0].tx_status, None);
    assert_eq!(
        (queries[1].completion, queries[1].end_ns),
        (Completion::Command, 11)
    );
    assert_eq!(queries[1].tx_status, Some(TxStatus::Idle));
    let stats = parser.stats();
    assert_eq!((stats.inferred, stats.desyncs, stats.queries), (1, 1, 2));
}

#[test]
fn close_infers_a_query_whose_answer_was_not_captured() {
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    let q = query("SELECT pg_sleep(10)");
    parser.feed(Out, &q, q.len(), 1, &mut out);
    parser.feed(In, &[], 9000, 5, &mut out);
    assert!(out.is_empty());
    parser.close(&mut out);
    let queries = queries(&out);
    assert_eq!(queries.len(), 1);
    assert_eq!(
        (queries[0].completion, queries[0].end_ns),
        (Completion::Inferred, 5)
    );
}

#[test]
fn a_corrupt_length_desyncs_without_allocating_it() {
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    let mut bad = vec![b'Q'];
    bad.extend(0x7fff_fff0u32.to_be_bytes());
    bad.extend(b"SELECT");
    parser.feed(Out, &bad, bad.len(), 1, &mut out);
    assert!(parser.heap_bytes() < 4096);
    assert_eq!(parser.stats().desyncs, 1);
    let events = feed_whole(&mut parser, &transaction());
    assert_eq!(queries(&events).len(), 1);
    assert_eq!(parser.stats().unmatched, 0);
    // A large but legal length is skipped by length, not stored.
    let mut parser = PgParser::new();
    let mut huge = vec![b'd'];
    huge.extend(0x3fff_0000u32.to_be_bytes());
    parser.feed(Out, &huge, huge.len(), 1, &mut out);
    parser.feed(Out, &[0; 512], 0x3fff_0000 - 4, 2, &mut out);
    assert!(parser.heap_bytes() < 4096);
    assert_eq!(parser.stats().desyncs, 0);
}

#[test]
fn answers_to_unseen_messages_do_not_consume_waiting_ones() {
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    // An answer arrives for something sent before the parser existed.
    let stale = cat(&[command_complete("UPDATE 1"), ready(b'I')]);
    parser.feed(In, &stale, stale.len(), 1, &mut out);
    let events = feed_whole(&mut parser, &transaction());
    assert_eq!(queries(&events).len(), 1);
    assert_eq!(parser.stats().unmatched, 1);
}

#[test]
fn prepared_statements_are_bounded_and_closable() {
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    for i in 0..1000 {
        let sql = format!("SELECT {i} FROM t{i}");
        let batch = cat(&[parse(&format!("s{i}"), &sql, &[]), sync()]);
        parser.feed(Out, &batch, batch.len(), i, &mut out);
        let answer = cat(&[simple(b'1'), ready(b'I')]);
        parser.feed(In, &answer, answer.len(), i, &mut out);
    }
    assert_eq!(parser.session.statements.map.len(), MAX_STATEMENTS);
    assert!(parser.session.statements.order.len() <= MAX_STATEMENTS);
    assert!(parser.heap_bytes() <= MAX_HEAP_BYTES);
    let run = |parser: &mut PgParser, name: &str, ts| {
        let mut out = Vec::new();
        let batch = cat(&[bind("", name, &[]), execute("", 0), sync()]);
        parser.feed(Out, &batch, batch.len(), ts, &mut out);
        let answer = cat(&[simple(b'2'), command_complete("SELECT 1"), ready(b'I')]);
        parser.feed(In, &answer, answer.len(), ts, &mut out);
        queries_of(&out).remove(0)
    };
    assert_eq!(sql(&run(&mut parser, "s999", 2000)), "SELECT 999 FROM t999");
    assert!(
        run(&mut parser, "s0", 2001).statement.is_none(),
        "forgotten"
    );
    let closing = cat(&[close(b'S', "s999"), sync()]);
    parser.feed(Out, &closing, closing.len(), 2002, &mut out);
    let answer = cat(&[simple(b'3'), ready(b'I')]);
    parser.feed(In, &answer, answer.len(), 2002, &mut out);
    assert!(run(&mut parser, "s999", 2003).statement.is_none(), "closed");
    assert_eq!(parser.stats().unmatched, 0);
}

#[test]
fn command_tags_and_error_fields() {
    let cases: [(&[u8], &str, Option<u64>); 8] = [
        (b"SELECT 5\0", "SELECT", Some(5)),
        (b"INSERT 0 12\0", "INSERT", Some(12)),
        (b"UPDATE 0", "UPDATE", Some(0)),
        (b"COPY 7", "COPY", Some(7)),
        (b"CREATE TABLE", "CREATE TABLE", None),
        (b"BEGIN", "BEGIN", None),
        (b"SELECT", "SELECT", None),
        (b"ALTER EXTENSION", "ALTER EXTENSION", None),
    ];
    for (tag, command, rows) in cases {
        let (got, got_rows) = command_tag(tag);
        assert_eq!((got.as_ref(), got_rows), (command, rows));
    }
    assert!(matches!(command_tag(b"SELECT 1").0, Cow::Borrowed(_)));
    let body = &error_response("ERROR", "57014", "canceling statement due to user request")[5..];
    let error = parse_error(body);
    assert_eq!(
        (error.severity.as_str(), error.sqlstate.as_str()),
        ("ERROR", "57014")
    );
    let truncated = parse_error(b"SERR");
    assert_eq!(truncated.severity, "ERR");
}

/// A row of one text column `width` bytes wide.
fn wide_row(width: usize) -> Vec<u8> {
    data_row(&[Some(&vec![b'r'; width])])
}

/// The answer to tokio-postgres' Bind/Execute/Sync of a four-row result: 533 bytes, so a
/// 512-byte capture ends in the last row and the gap holds the `CommandComplete` and
/// `ReadyForQuery` headers.
fn four_wide_rows() -> Vec<u8> {
    let mut answer = vec![simple(b'2')];
    answer.extend((0..4).map(|_| wide_row(116)));
    answer.push(command_complete("SELECT 4"));
    answer.push(ready(b'I'));
    cat(&answer)
}

const NO_SUCH_TABLE: &str = "SELECT * FROM no_such_table";

fn no_such_table() -> Vec<u8> {
    error_response(
        "ERROR",
        "42P01",
        "relation \"no_such_table\" does not exist",
    )
}

/// Captured as in the end-to-end test (tokio-postgres through a pool, 512-byte capture): a
/// result read past the capture loses the backend framing; the client then closes the
/// statement without waiting for the answer (`Close`, `Sync`) and sends a failing simple
/// query. The next read holds the close's answer, then the error. The close must not be taken
/// as answered in the lost bytes, or its `ReadyForQuery` ends the failing query first.
#[test]
fn an_error_after_a_lost_answer_and_an_unawaited_close_keeps_its_sqlstate() {
    let answer = four_wide_rows();
    assert_eq!(answer.len(), 533);
    let conversation = vec![
        sys(
            Out,
            cat(&[bind("", "s1", &[Some(b"1")]), execute("", 0), sync()]),
            10,
        ),
        sys(In, &answer, 20),
        sys(Out, cat(&[close(b'S', "s1"), sync()]), 30),
        sys(Out, query(NO_SUCH_TABLE), 40),
        sys(In, cat(&[simple(b'3'), ready(b'I'), no_such_table()]), 50),
        sys(In, ready(b'I'), 60),
    ];
    let mut parser = PgParser::new();
    let events = feed_capped(&mut parser, &conversation, 512);
    let queries = queries(&events);
    assert_eq!(queries.len(), 2, "{events:?}");
    assert_eq!(
        (
            queries[0].completion,
            queries[0].end_ns,
            queries[0].tx_status
        ),
        (Completion::Inferred, 20, None)
    );
    assert_eq!(queries[1].completion, Completion::Error);
    assert_eq!(sql(queries[1]), NO_SUCH_TABLE);
    assert_eq!(
        queries[1].error.as_ref().map(|e| &*e.sqlstate),
        Some("42P01")
    );
    assert_eq!(
        (queries[1].end_ns, queries[1].tx_status),
        (60, Some(TxStatus::Idle))
    );
    let stats = parser.stats();
    assert_eq!((stats.desyncs, stats.unmatched, stats.inferred), (1, 0, 1));
}

/// The same, the capture ending inside the `CommandComplete` (its tag cut, so not read) and
/// the gap holding the `ReadyForQuery`: the close's answer and the whole error answer come in
/// the next read.
#[test]
fn a_tag_cut_by_the_capture_is_not_read_and_the_next_error_is_kept() {
    let mut answer = vec![simple(b'2')];
    answer.extend((0..4).map(|_| wide_row(112)));
    answer.push(command_complete("SELECT 4"));
    answer.push(ready(b'I'));
    let answer = cat(&answer);
    // 5 + 4 * 123 = 497: the capture ends 1 byte before the tag ends.
    assert_eq!(answer.len(), 497 + 14 + 6);
    let conversation = vec![
        sys(
            Out,
            cat(&[bind("", "s1", &[Some(b"1")]), execute("", 0), sync()]),
            10,
        ),
        sys(In, &answer, 20),
        sys(Out, cat(&[close(b'S', "s1"), sync()]), 30),
        sys(Out, query(NO_SUCH_TABLE), 40),
        sys(
            In,
            cat(&[simple(b'3'), ready(b'I'), no_such_table(), ready(b'T')]),
            50,
        ),
    ];
    let mut parser = PgParser::new();
    let events = feed_capped(&mut parser, &conversation, 510);
    let queries = queries(&events);
    assert_eq!(queries.len(), 2, "{events:?}");
    assert_eq!(
        (queries[0].completion, queries[0].end_ns, queries[0].rows),
        (Completion::Command, 20, 4),
        "ended by its CommandComplete, rows counted"
    );
    assert_eq!(queries[0].command, None, "the cut tag is not guessed");
    assert_eq!(
        queries[1].error.as_ref().map(|e| &*e.sqlstate),
        Some("42P01")
    );
    assert_eq!(queries[1].tx_status, Some(TxStatus::InTransaction));
    assert_eq!(parser.stats().unmatched, 0);
}

/// tokio-postgres ends a query at its `CommandComplete` and may send the next one before it
/// reads the `ReadyForQuery`: the next read then starts with the rest of it (all of it, or
/// its last 1 to 5 bytes when the previous read stopped inside it). That rest belongs to the
/// query whose answer was lost, not to the failing one.
#[test]
fn the_rest_of_a_ready_for_query_read_after_the_next_query_is_the_earlier_ones() {
    let answer = four_wide_rows();
    for left in 1..=6 {
        let (first, rest) = answer.split_at(answer.len() - left);
        let conversation = vec![
            sys(
                Out,
                cat(&[bind("", "s1", &[Some(b"1")]), execute("", 0), sync()]),
                10,
            ),
            sys(In, first, 20),
            sys(Out, query(NO_SUCH_TABLE), 30),
            sys(In, cat(&[rest.to_vec(), no_such_table(), ready(b'I')]), 40),
        ];
        let mut parser = PgParser::new();
        let events = feed_capped(&mut parser, &conversation, 512);
        let queries = queries(&events);
        assert_eq!(queries.len(), 2, "{left} bytes left: {events:?}");
        assert_eq!(
            (queries[0].completion, queries[0].end_ns),
            (Completion::Inferred, 20),
            "{left} bytes left"
        );
        assert_eq!(
            queries[0].tx_status,
            Some(TxStatus::Idle),
            "{left} bytes left: the rest of the ReadyForQuery ends the first query's batch"
        );
        assert_eq!(
            (
                queries[1].error.as_ref().map(|e| &*e.sqlstate),
                queries[1].end_ns
            ),
            (Some("42P01"), 40),
            "{left} bytes left"
        );
        assert_eq!(parser.stats().unmatched, 0, "{left} bytes left");
    }
}

/// libpq (pgbench, psql) reads a whole answer before it sends again: after a result read
/// past the capture, the next query's answer starts the next read.
#[test]
fn an_error_after_a_lost_simple_result_keeps_its_sqlstate() {
    let mut rows = vec![row_description(&["id", "payload"])];
    for i in 0..200u32 {
        rows.push(data_row(&[Some(&i.to_be_bytes()), Some(&[b'p'; 40])]));
    }
    rows.push(command_complete("SELECT 200"));
    rows.push(ready(b'I'));
    let answer = cat(&rows);
    let (first_read, second_read) = answer.split_at(8192);
    let conversation = vec![
        sys(Out, query("SELECT id, payload FROM big"), 1),
        sys(In, first_read, 2),
        sys(In, second_read, 3),
        sys(Out, query(NO_SUCH_TABLE), 10),
        sys(In, cat(&[no_such_table(), ready(b'I')]), 11),
    ];
    let mut parser = PgParser::new();
    let events = feed_capped(&mut parser, &conversation, 512);
    let queries = queries(&events);
    assert_eq!(queries.len(), 2, "{events:?}");
    assert_eq!(
        (queries[0].completion, queries[0].end_ns),
        (Completion::Inferred, 3)
    );
    assert_eq!(
        queries[1].error.as_ref().map(|e| &*e.sqlstate),
        Some("42P01")
    );
    assert_eq!(parser.stats().unmatched, 0);
}

/// A pipelining client sends the next batch before reading the earlier answers: when the
/// read that resynchronises can only continue the earlier batch, it does, and the later
/// batch's error is still its own.
#[test]
fn a_resynchronised_read_that_continues_an_earlier_batch_is_matched_to_it() {
    let mut first = vec![simple(b'1'), simple(b'2'), row_description(&["x"])];
    first.extend((0..8).map(|_| wide_row(100)));
    let first = cat(&first);
    let tail = cat(&[
        wide_row(100),
        command_complete("SELECT 9"),
        ready(b'I'),
        no_such_table(),
        ready(b'I'),
    ]);
    let conversation = vec![
        sys(
            Out,
            cat(&[
                parse("", LEAD_SQL, &[]),
                bind("", "", &[]),
                describe(b'P', ""),
                execute("", 0),
                sync(),
            ]),
            10,
        ),
        sys(Out, query(NO_SUCH_TABLE), 11),
        // The capture ends inside a row and the gap hides where the next one starts.
        sys(In, &first[..first.len() - 60], 20),
        sys(In, &first[first.len() - 60..], 21),
        // The next read starts at a row boundary: the rest of the first answer.
        sys(In, tail, 30),
    ];
    let mut parser = PgParser::new();
    let events = feed_capped(&mut parser, &conversation, 300);
    let queries = queries(&events);
    assert_eq!(queries.len(), 2, "{events:?}");
    assert_eq!(
        (queries[0].completion, queries[0].end_ns, queries[0].rows),
        (Completion::Command, 30, 9)
    );
    assert_eq!(
        queries[1].error.as_ref().map(|e| &*e.sqlstate),
        Some("42P01")
    );
    assert_eq!(parser.stats().unmatched, 0);
}

#[test]
fn resynchronising_recognises_message_starts_and_rejects_text() {
    use Side::Backend;
    // The middle of a command tag ("SELECT 3") read as a RowDescription of 540 MB.
    assert!(!plausible(b"T 3\0Z\0\0\0\x05I", Backend));
    // The middle of a row's text read as a row of 0x7273_7475 bytes.
    assert!(!plausible(b"Drstuvwxyz", Backend));
    // An error whose body the capture cut: its fields, as far as they go, are fields.
    let error = no_such_table();
    assert!(plausible(&error[..20], Backend));
    let mut bad_field = error.clone();
    bad_field[5] = b'#';
    assert!(!plausible(&bad_field, Backend));
    assert!(!plausible(&bad_field[..20], Backend));
    // A row cut by the capture whose column lengths overrun it.
    let mut row = wide_row(100);
    assert!(plausible(&row[..50], Backend));
    row[7..11].copy_from_slice(&200i32.to_be_bytes());
    assert!(!plausible(&row[..50], Backend));
    // The end of a ReadyForQuery, then messages.
    let mut rest = b"\0\x05I".to_vec();
    rest.extend(no_such_table());
    assert_eq!(message_starts(&rest).collect::<Vec<_>>(), [3]);
    assert_eq!(
        message_starts(&rest[..4]).count(),
        0,
        "nothing after it to check"
    );
    assert_eq!(message_starts(b"\0\x05Xabcdefgh").count(), 0);
    // Where no answer starts: authentication, COPY data.
    assert!(!plausible(&auth(0, &[]), Backend));
    assert!(!plausible(&msg(b'd', b"1\tx\n"), Backend));
}

#[test]
fn close_reports_a_simple_query_whose_results_completed() {
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    let q = query("SELECT 1");
    parser.feed(Out, &q, q.len(), 1, &mut out);
    // The connection closes between the CommandComplete and the ReadyForQuery.
    let answer = cat(&[
        row_description(&["x"]),
        data_row(&[Some(b"1")]),
        command_complete("SELECT 1"),
    ]);
    parser.feed(In, &answer, answer.len(), 2, &mut out);
    let q = query("SELECT pg_sleep(10)");
    parser.feed(Out, &q, q.len(), 3, &mut out);
    assert!(out.is_empty());
    parser.close(&mut out);
    let queries = queries(&out);
    assert_eq!(queries.len(), 1, "{out:?}");
    assert_eq!(
        (
            queries[0].completion,
            queries[0].end_ns,
            queries[0].rows,
            queries[0].tx_status
        ),
        (Completion::Command, 2, 1, None)
    );
    assert_eq!(parser.stats().dropped, 1, "the unanswered one");
}
