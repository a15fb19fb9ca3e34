//! Any syscall sequence: no panic, memory within its bound, events that make sense.

#![no_main]

use libfuzzer_sys::fuzz_target;
use selfheal_fuzz::{
    protocols::{
        fingerprint::MAX_FINGERPRINT_BYTES,
        postgres::{PgEvent, PgParser, MAX_HEAP_BYTES, MAX_SQL_BYTES},
    },
    syscalls,
};

fuzz_target!(|data: &[u8]| {
    let mut parser = PgParser::new();
    let mut out = Vec::new();
    for s in syscalls(data) {
        parser.feed(s.direction, s.captured, s.total_len, s.ts_ns, &mut out);
        assert!(parser.heap_bytes() <= MAX_HEAP_BYTES);
        let _ = parser.in_flight().count();
        let _ = parser.idle_in_transaction();
    }
    parser.close(&mut out);
    let mut queries = 0;
    for event in &out {
        if let PgEvent::Query(query) = event {
            queries += 1;
            assert!(query.end_ns >= query.start_ns);
            if let Some(statement) = &query.statement {
                assert!(statement.sql.len() <= MAX_SQL_BYTES);
                assert!(statement.fingerprint.len() <= MAX_FINGERPRINT_BYTES);
            }
        }
    }
    let stats = parser.stats();
    assert_eq!(stats.queries, queries);
    assert!(stats.inferred <= stats.queries);
});
