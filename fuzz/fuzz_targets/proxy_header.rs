#![no_main]
//! The header parse must never panic, and what it says must be bounded: a header's length within the
//! input and the caps, and a partial answer only below the caps.

use libfuzzer_sys::fuzz_target;
use ulb_tcp::edge::{parse, Parsed, V1_MAX, V2_MAX};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Parsed::Header(_, len) => assert!(len <= data.len() && len <= V2_MAX.max(V1_MAX)),
        Parsed::Incomplete => assert!(data.len() < V2_MAX),
        Parsed::NotProxy | Parsed::Invalid(_) => {}
    }
});
