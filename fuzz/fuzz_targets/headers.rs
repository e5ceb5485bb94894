//! The credentials in a call's headers, on arbitrary header names and values: the coordinator's
//! gate (`authenticate`, through `elbo_coordinator::fuzzing::check_authentication`, which
//! asserts that only the right token or session credential passes) and the ring stream's
//! `elbo_worker::ring_credentials`. No panic, and what they read is what the headers say.
#![no_main]

use arbitrary::Arbitrary;
use elbo_coordinator::fuzzing::check_authentication;
use elbo_proto::auth;
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 6] = [
    "Session",
    "Report",
    "SaveCheckpoint",
    "Halt",
    "Fail",
    "Other",
];

#[derive(Debug, Arbitrary)]
struct Input {
    method: u8,
    headers: Vec<(u8, Vec<u8>)>,
}

/// Mostly the names the protocol reads, sometimes another.
fn name(n: u8) -> http::HeaderName {
    match n % 5 {
        0 | 1 => http::header::AUTHORIZATION,
        2 => http::HeaderName::from_static(auth::SESSION),
        3 => http::HeaderName::from_static(auth::GENERATION),
        _ => http::HeaderName::from_static("x-other"),
    }
}

fuzz_target!(|input: Input| {
    let mut headers = http::HeaderMap::new();
    for (n, value) in &input.headers {
        // hyper refuses values with control characters before a service sees them.
        if let Ok(value) = http::HeaderValue::from_bytes(value) {
            headers.append(name(*n), value);
        }
    }
    check_authentication(METHODS[usize::from(input.method) % METHODS.len()], &headers);
    if let Ok((generation, tag)) = elbo_worker::ring_credentials(&headers) {
        assert_eq!(
            auth::number_of(&headers, auth::GENERATION),
            Some(generation)
        );
        let bearer = auth::bearer_of(&headers).expect("a tag without a bearer credential");
        assert_eq!(tag.to_hex(), bearer.to_ascii_lowercase());
    }
});
