use super::*;
use crate::protocols::testing::{
    assert_every_split_matches, feed_capped, feed_whole, sys, Syscall,
};

use Direction::{Received as In, Sent as Out};

const REQ_GET: &str = "GET /api/v1/leads/42?expand=owner HTTP/1.1\r\nHost: API.tackle.io\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n";
const RESP_200: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello";
const REQ_POST: &str = "POST /api/v1/leads HTTP/1.1\r\nHost: api.tackle.io\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}";
const RESP_CHUNKED: &str = "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nTrailer: x\r\n\r\n";

fn keep_alive() -> Vec<Syscall> {
    vec![
        sys(In, REQ_GET, 1_000),
        sys(Out, RESP_200, 5_000),
        sys(In, REQ_POST, 9_000),
        sys(Out, RESP_CHUNKED, 12_000),
    ]
}

/// Four pipelined requests in one read: a GET, a HEAD (its response has a length but no
/// body), a conditional GET (304) and a POST that waits for `100 Continue`.
fn pipelined() -> Vec<Syscall> {
    let requests = concat!(
        "GET /a HTTP/1.1\r\nHost: h\r\n\r\n",
        "HEAD /b HTTP/1.1\r\nHost: h\r\n\r\n",
        "GET /c HTTP/1.1\r\nHost: h\r\nIf-None-Match: \"x\"\r\n\r\n",
        "POST /d HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
    );
    let responses = concat!(
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",
        "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n",
        "HTTP/1.1 100 Continue\r\n\r\n",
    );
    vec![
        sys(In, requests, 10),
        sys(Out, responses, 20),
        sys(In, "xyz", 30),
        sys(Out, "HTTP/1.1 204 No Content\r\n\r\n", 40),
    ]
}

fn summary(exchanges: &[HttpExchange]) -> Vec<(Method, &str, u16, u64, u64)> {
    exchanges
        .iter()
        .map(|e| {
            (
                e.request.method,
                e.request.path.as_str(),
                e.status,
                e.request.start_ns,
                e.response_start_ns,
            )
        })
        .collect()
}

#[test]
fn keep_alive_exchanges_pair_in_order_with_exact_counts() {
    let mut parser = HttpParser::new();
    let exchanges = feed_whole(&mut parser, &keep_alive());
    assert_eq!(exchanges.len(), 2);
    let first = &exchanges[0];
    assert_eq!(first.request.method, Method::Get);
    assert_eq!(first.request.path, "/api/v1/leads/42");
    assert_eq!(first.request.host.as_deref(), Some("api.tackle.io"));
    assert_eq!(first.request.version, Version::Http11);
    assert_eq!(first.status, 200);
    assert_eq!(first.latency_ns(), 4_000);
    assert_eq!(first.request.bytes, REQ_GET.len() as u64);
    assert_eq!(first.response_bytes, RESP_200.len() as u64);
    assert!(!first.truncated);
    let second = &exchanges[1];
    assert_eq!(second.request.method, Method::Post);
    assert_eq!(second.status, 201);
    assert_eq!(second.request.bytes, REQ_POST.len() as u64);
    assert_eq!(second.response_bytes, RESP_CHUNKED.len() as u64);
    assert_eq!(parser.in_flight().count(), 0);
    assert_eq!(
        parser.stats(),
        HttpStats {
            exchanges: 2,
            ..HttpStats::default()
        }
    );
}

#[test]
fn pipelined_requests_head_304_and_100_continue() {
    let conversation = pipelined();
    let mut parser = HttpParser::new();
    let exchanges = feed_whole(&mut parser, &conversation);
    assert_eq!(
        summary(&exchanges),
        vec![
            (Method::Get, "/a", 200, 10, 20),
            (Method::Head, "/b", 200, 10, 20),
            (Method::Get, "/c", 304, 10, 20),
            (Method::Post, "/d", 204, 10, 40),
        ]
    );
    let post = &exchanges[3];
    assert_eq!(
        post.response_bytes,
        ("HTTP/1.1 100 Continue\r\n\r\n".len() + "HTTP/1.1 204 No Content\r\n\r\n".len()) as u64
    );
    assert_eq!(
        post.request.bytes,
        ("POST /d HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n".len()
            + 3) as u64
    );
    assert_eq!(parser.stats().desyncs, 0);
}

#[test]
fn splitting_at_every_byte_gives_the_same_exchanges() {
    assert_every_split_matches::<HttpParser>(&keep_alive());
    assert_every_split_matches::<HttpParser>(&pipelined());
}

#[test]
fn in_flight_lists_requests_until_their_response() {
    let mut parser = HttpParser::new();
    let mut out = Vec::new();
    parser.feed(In, REQ_GET.as_bytes(), REQ_GET.len(), 7, &mut out);
    let waiting: Vec<_> = parser
        .in_flight()
        .map(|r| (r.path.clone(), r.start_ns))
        .collect();
    assert_eq!(waiting, vec![("/api/v1/leads/42".to_owned(), 7)]);
    parser.feed(Out, RESP_200.as_bytes(), RESP_200.len(), 9, &mut out);
    assert_eq!(parser.in_flight().count(), 0);
    assert_eq!(out.len(), 1);
}

#[test]
fn large_bodies_are_skipped_by_length_across_capture_gaps() {
    let request_head = "PUT /files/7 HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n";
    let response_head = "HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n";
    let mut request = request_head.as_bytes().to_vec();
    request.resize(request_head.len() + 100_000, b'x');
    let mut response = response_head.as_bytes().to_vec();
    response.resize(response_head.len() + 50_000, b'y');
    let conversation = vec![
        sys(In, &request, 100),
        sys(Out, &response, 200),
        sys(In, REQ_GET, 300),
        sys(Out, RESP_200, 400),
    ];
    let mut parser = HttpParser::new();
    let exchanges = feed_capped(&mut parser, &conversation, 512);
    assert_eq!(exchanges.len(), 2);
    assert_eq!(exchanges[0].request.bytes, request.len() as u64);
    assert_eq!(exchanges[0].response_bytes, response.len() as u64);
    assert!(!exchanges[0].truncated);
    assert_eq!(exchanges[1].request.path, "/api/v1/leads/42");
    assert_eq!(parser.stats().desyncs, 0);
}

#[test]
fn a_body_sent_without_capture_is_skipped() {
    // sendfile(2): the head is written, then the body moves with nothing captured.
    let mut parser = HttpParser::new();
    let mut out = Vec::new();
    parser.feed(In, REQ_GET.as_bytes(), REQ_GET.len(), 1, &mut out);
    let head = "HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n";
    parser.feed(Out, head.as_bytes(), head.len(), 2, &mut out);
    parser.feed(Out, &[], 4096, 3, &mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].response_bytes, (head.len() + 4096) as u64);
}

#[test]
fn a_gap_inside_the_headers_reports_a_truncated_exchange() {
    let cookie = "c".repeat(2000);
    let request =
        format!("GET /dashboard HTTP/1.1\r\nHost: app.example\r\nCookie: {cookie}\r\n\r\n");
    let conversation = vec![
        sys(In, &request, 10),
        sys(Out, RESP_200, 20),
        sys(In, REQ_GET, 30),
        sys(Out, RESP_200, 40),
    ];
    let mut parser = HttpParser::new();
    let exchanges = feed_capped(&mut parser, &conversation, 512);
    assert_eq!(
        summary(&exchanges),
        vec![
            (Method::Get, "/dashboard", 200, 10, 20),
            (Method::Get, "/api/v1/leads/42", 200, 30, 40),
        ]
    );
    assert!(exchanges[0].truncated);
    assert_eq!(exchanges[0].request.host.as_deref(), Some("app.example"));
    assert!(!exchanges[1].truncated);
    let stats = parser.stats();
    assert_eq!(
        (stats.exchanges, stats.truncated, stats.unparsed),
        (2, 1, 0)
    );
}

#[test]
fn a_gap_inside_the_request_line_loses_the_exchange_and_its_response() {
    let long = format!(
        "GET /search/{} HTTP/1.1\r\nHost: h\r\n\r\n",
        "q".repeat(600)
    );
    let mut parser = HttpParser::new();
    let mut out = Vec::new();
    // Only "GE" was captured: not even the method.
    parser.feed(In, &long.as_bytes()[..2], long.len(), 10, &mut out);
    parser.feed(Out, RESP_200.as_bytes(), RESP_200.len(), 20, &mut out);
    parser.feed(In, REQ_GET.as_bytes(), REQ_GET.len(), 30, &mut out);
    parser.feed(Out, RESP_200.as_bytes(), RESP_200.len(), 40, &mut out);
    assert_eq!(
        summary(&out),
        vec![(Method::Get, "/api/v1/leads/42", 200, 30, 40)]
    );
    let stats = parser.stats();
    assert_eq!(stats.unparsed, 1);
    assert_eq!(stats.unmatched_responses, 0);
    assert_eq!(stats.desyncs, 1);
}

#[test]
fn lost_chunk_framing_reports_the_exchange_and_resyncs_on_a_status_line() {
    let mut body = String::new();
    for _ in 0..100 {
        body.push_str("a\r\n0123456789\r\n");
    }
    let response = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{body}0\r\n\r\n");
    let conversation = vec![
        sys(In, REQ_GET, 1),
        sys(Out, &response, 2),
        sys(In, REQ_POST, 3),
        sys(Out, RESP_200, 4),
    ];
    let mut parser = HttpParser::new();
    let exchanges = feed_capped(&mut parser, &conversation, 512);
    assert_eq!(exchanges.len(), 2);
    assert!(exchanges[0].truncated);
    assert_eq!(exchanges[0].response_bytes, response.len() as u64);
    assert_eq!(exchanges[1].request.method, Method::Post);
    assert!(!exchanges[1].truncated);
    assert_eq!(parser.stats().desyncs, 1);
}

#[test]
fn a_response_without_length_ends_when_the_connection_closes() {
    let mut parser = HttpParser::new();
    let mut out = Vec::new();
    let request = "GET /legacy HTTP/1.0\r\n\r\n";
    parser.feed(In, request.as_bytes(), request.len(), 1, &mut out);
    let head = "HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n";
    parser.feed(Out, head.as_bytes(), head.len(), 2, &mut out);
    parser.feed(Out, b"some", 1000, 3, &mut out);
    assert!(out.is_empty());
    parser.close(&mut out);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].request.version, Version::Http10);
    assert_eq!(out[0].response_bytes, (head.len() + 1000) as u64);
    assert!(!out[0].truncated);
}

#[test]
fn close_counts_unanswered_requests_and_resets() {
    let mut parser = HttpParser::new();
    let mut out = Vec::new();
    parser.feed(In, REQ_GET.as_bytes(), REQ_GET.len(), 1, &mut out);
    parser.close(&mut out);
    assert!(out.is_empty());
    assert_eq!(parser.stats().unanswered, 1);
    assert_eq!(parser.in_flight().count(), 0);
    let exchanges = feed_whole(&mut parser, &keep_alive());
    assert_eq!(exchanges.len(), 2);
}

#[test]
fn an_upgrade_stops_parsing_without_desync() {
    let mut parser = HttpParser::new();
    let request =
        "GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
    let response: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello";
    let conversation = vec![
        sys(In, request, 1),
        sys(Out, response, 2),
        sys(In, b"\x81\x85\x00\x00\x00\x00hello", 3),
    ];
    let exchanges = feed_whole(&mut parser, &conversation);
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].status, 101);
    assert_eq!(parser.not_http(), Some(NotHttp::Upgraded));
    assert_eq!(parser.stats().desyncs, 0);
}

#[test]
fn tls_is_recognised_and_left_alone() {
    let mut parser = HttpParser::new();
    let mut out = Vec::new();
    let client_hello = [
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    parser.feed(In, &client_hello, 517, 1, &mut out);
    parser.feed(Out, &[0x16, 0x03, 0x03, 0x00, 0x7a], 4000, 2, &mut out);
    assert_eq!(parser.not_http(), Some(NotHttp::Encrypted));
    assert_eq!(parser.stats(), HttpStats::default());
}

#[test]
fn joining_mid_connection_skips_to_the_next_request_line() {
    let mut parser = HttpParser::new();
    let mut out = Vec::new();
    parser.feed(In, b"\"rest\": \"of a json body\"}", 26, 1, &mut out);
    parser.feed(Out, b"tail of a response body", 23, 2, &mut out);
    let exchanges = feed_whole(&mut parser, &keep_alive());
    assert_eq!(exchanges.len(), 2);
    let stats = parser.stats();
    assert_eq!(stats.exchanges, 2);
    assert_eq!(stats.desyncs, 2);
    assert!(stats.skipped_bytes > 0);
}

#[test]
fn a_malformed_request_is_unparsed_and_its_response_discarded() {
    let mut parser = HttpParser::new();
    let conversation = vec![
        sys(In, "get /lower HTTP/1.1\r\n\r\n", 1),
        sys(Out, RESP_200, 2),
        sys(In, REQ_GET, 3),
        sys(Out, RESP_200, 4),
    ];
    let exchanges = feed_whole(&mut parser, &conversation);
    assert_eq!(
        summary(&exchanges),
        vec![(Method::Get, "/api/v1/leads/42", 200, 3, 4)]
    );
    assert_eq!(parser.stats().unparsed, 1);
    assert_eq!(parser.stats().unmatched_responses, 0);
}

#[test]
fn a_response_before_any_request_is_unmatched() {
    let mut parser = HttpParser::new();
    let mut out = Vec::new();
    parser.feed(Out, RESP_200.as_bytes(), RESP_200.len(), 1, &mut out);
    assert!(out.is_empty());
    assert_eq!(parser.stats().unmatched_responses, 1);
}

#[test]
fn deep_pipelines_drop_the_oldest_request() {
    let mut parser = HttpParser::new();
    let mut out = Vec::new();
    let requests = "GET /x HTTP/1.1\r\nHost: h\r\n\r\n".repeat(MAX_PIPELINE + 4);
    parser.feed(In, requests.as_bytes(), requests.len(), 1, &mut out);
    assert_eq!(parser.in_flight().count(), MAX_PIPELINE);
    assert_eq!(parser.stats().unanswered, 4);
}

#[test]
fn request_targets_in_every_form() {
    let cases = [
        ("GET http://api.example:8080/v1/x?q=1 HTTP/1.1", "/v1/x"),
        ("GET http://api.example HTTP/1.1", "/"),
        ("OPTIONS * HTTP/1.1", "*"),
        ("GET /a#frag HTTP/1.1", "/a"),
        ("PROPFIND /dav/ HTTP/1.1", "/dav/"),
    ];
    for (line, path) in cases {
        let parsed = parse_request_line(line.as_bytes(), false).expect(line);
        assert_eq!(parsed.path, path, "{line}");
    }
    assert_eq!(
        parse_request_line(b"PROPFIND /dav/ HTTP/1.1", false).map(|l| l.method),
        Some(Method::Other)
    );
    for bad in [
        "GET /a HTTP/2.0",
        "GET",
        "GET /a",
        "G@T /a HTTP/1.1",
        "GET a HTTP/1.1",
    ] {
        assert!(parse_request_line(bad.as_bytes(), false).is_none(), "{bad}");
    }
    let long_path = format!("GET /{} HTTP/1.1", "p".repeat(1000));
    let parsed = parse_request_line(long_path.as_bytes(), false).expect("long path");
    assert_eq!(parsed.path.len(), MAX_PATH_BYTES);
}

#[test]
fn an_unframeable_request_keeps_the_exchange_and_resyncs() {
    let mut parser = HttpParser::new();
    let bad = "POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!";
    let conversation = vec![
        sys(In, bad, 1),
        sys(
            Out,
            "HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            2,
        ),
        sys(In, REQ_GET, 3),
        sys(Out, RESP_200, 4),
    ];
    let exchanges = feed_whole(&mut parser, &conversation);
    assert_eq!(
        summary(&exchanges),
        vec![
            (Method::Post, "/x", 400, 1, 2),
            (Method::Get, "/api/v1/leads/42", 200, 3, 4),
        ]
    );
    assert_eq!(parser.stats().desyncs, 1);
}

#[test]
fn chunked_request_bodies_and_bad_chunk_sizes() {
    let request = "POST /upload HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let mut parser = HttpParser::new();
    let exchanges = feed_whole(&mut parser, &[sys(In, request, 1), sys(Out, RESP_200, 2)]);
    assert_eq!(exchanges.len(), 1);
    assert_eq!(exchanges[0].request.bytes, request.len() as u64);
    let bad = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
    let mut parser = HttpParser::new();
    let exchanges = feed_whole(&mut parser, &[sys(In, REQ_GET, 1), sys(Out, bad, 2)]);
    assert_eq!(exchanges.len(), 1);
    assert!(exchanges[0].truncated);
    assert_eq!(parser.stats().desyncs, 1);
}

#[test]
fn an_overlong_head_is_malformed_not_buffered() {
    let mut parser = HttpParser::new();
    let mut out = Vec::new();
    parser.feed(In, b"GET / HTTP/1.1\r\n", 16, 1, &mut out);
    let junk_line = format!("X-Junk: {}\r\n", "j".repeat(1000));
    for _ in 0..100 {
        parser.feed(In, junk_line.as_bytes(), junk_line.len(), 2, &mut out);
        assert!(parser.heap_bytes() < 16 * 1024);
    }
    assert_eq!(parser.stats().unparsed, 1);
    assert_eq!(parser.stats().desyncs, 1);
}
