//! Any text: bounded route templates and fingerprints, and a fingerprint of a fingerprint.

#![no_main]

use libfuzzer_sys::fuzz_target;
use selfheal_fuzz::protocols::{
    fingerprint::{fingerprint, MAX_FINGERPRINT_BYTES},
    route::{route_template, MAX_TEMPLATE_BYTES},
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    assert!(route_template(&text).len() <= MAX_TEMPLATE_BYTES);
    let once = fingerprint(&text);
    assert!(once.len() <= MAX_FINGERPRINT_BYTES);
    assert!(fingerprint(&once).len() <= MAX_FINGERPRINT_BYTES);
});
