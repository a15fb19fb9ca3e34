//! Any syscall sequence: no panic, memory within its bound, exchanges that make sense.

#![no_main]

use libfuzzer_sys::fuzz_target;
use selfheal_fuzz::{
    protocols::{
        http::{HttpParser, MAX_HEAP_BYTES, MAX_PATH_BYTES},
        route::{route_template, MAX_TEMPLATE_BYTES},
    },
    syscalls,
};

fuzz_target!(|data: &[u8]| {
    let mut parser = HttpParser::new();
    let mut out = Vec::new();
    for s in syscalls(data) {
        parser.feed(s.direction, s.captured, s.total_len, s.ts_ns, &mut out);
        assert!(parser.heap_bytes() <= MAX_HEAP_BYTES);
        let _ = parser.in_flight().count();
    }
    parser.close(&mut out);
    for exchange in &out {
        assert!(exchange.response_start_ns >= exchange.request.start_ns);
        assert!(exchange.request.path.len() <= MAX_PATH_BYTES);
        assert!(route_template(&exchange.request.path).len() <= MAX_TEMPLATE_BYTES);
    }
    let stats = parser.stats();
    assert_eq!(stats.exchanges, out.len() as u64);
    assert!(stats.truncated <= stats.exchanges);
});
