//! Replays every file of the fuzz corpus (`fuzz/corpus/proxy_header/`, seeds and every crash the fuzzer
//! ever found, which are added there) through the header parse, as the fuzz target does: no panic, and
//! a bounded answer. Then every prefix of each, and a few thousand random inputs, the same way.

use std::path::Path;

use ulb_tcp::edge::{parse, Parsed, V1_MAX, V2_MAX};

fn check(data: &[u8]) -> Parsed {
    let parsed = parse(data);
    match &parsed {
        Parsed::Header(_, len) => assert!(*len <= data.len() && *len <= V2_MAX.max(V1_MAX)),
        Parsed::Incomplete => assert!(data.len() < V2_MAX, "incomplete at {} bytes", data.len()),
        Parsed::NotProxy | Parsed::Invalid(_) => {}
    }
    parsed
}

#[test]
fn the_fuzz_corpus_replays_without_a_panic_and_with_bounded_answers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/proxy_header");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let parsed = check(&data);
        for i in 0..data.len() {
            check(&data[..i]);
        }
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        // The seeds say what they are: valid ones parse, broken ones are refused.
        let header = matches!(parsed, Parsed::Header(..));
        if name.starts_with("v1-tcp") || name.starts_with("v1-unknown") || name == "v2-tcp4" {
            assert!(header, "{name}: {parsed:?}");
        }
        // A bad signature is no header at all (refused as such where one is required).
        if name == "bad-signature" || name == "not-proxy" {
            assert_eq!(parsed, Parsed::NotProxy, "{name}");
        } else if ["bad", "above-cap", "no-crlf", "short"]
            .iter()
            .any(|w| name.contains(w))
        {
            assert!(matches!(parsed, Parsed::Invalid(_)), "{name}: {parsed:?}");
        }
        n += 1;
    }
    assert!(n >= 20, "only {n} corpus files");
}

#[test]
fn random_inputs_near_the_signatures_are_bounded() {
    // A small xorshift: reproducible, no dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..20_000 {
        let len = (next() % 300) as usize;
        let mut data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let prefix: &[u8] = match next() % 3 {
            0 => b"\r\n\r\n\0\r\nQUIT\n",
            1 => b"PROXY TCP4 ",
            _ => b"",
        };
        data.splice(0..0, prefix.iter().copied());
        check(&data);
    }
}
