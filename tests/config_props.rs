//! Property tests of `BalancerConfig::validate`: whatever the values of its fields, it answers without
//! panicking, and a configuration it accepts has every value within its documented range (no duration
//! above `MAX_DURATION`, which no timer could overflow).

use std::net::SocketAddr;
use std::time::Duration;

use proptest::prelude::*;
use ulb_tcp::config::{
    BUFFER_SIZES, MAX_BACKENDS, MAX_CONNECTIONS, MAX_CONNECT_ATTEMPTS, MAX_DURATION,
    MAX_FAILURE_THRESHOLD, MAX_ID_LEN, MAX_REPLAY, MAX_WEIGHT,
};
use ulb_tcp::{BackendConfig, BalancerConfig, CopyMode, PassiveHealth, Strategy as Pick};

/// Durations: mostly within range (so that whole configurations pass), else at and around every limit,
/// else anything up to `Duration::MAX`.
fn duration() -> impl Strategy<Value = Duration> {
    let ns = Duration::from_nanos(1);
    let ms = Duration::from_millis(1);
    prop_oneof![
        30 => (0..=MAX_DURATION.as_nanos() as u64).prop_map(Duration::from_nanos),
        2 => proptest::sample::select(vec![
            Duration::ZERO,
            ns,
            ms - ns,
            ms,
            ms + ns,
            MAX_DURATION - ns,
            MAX_DURATION,
            MAX_DURATION + ns,
            Duration::from_secs(u64::MAX / 2),
            Duration::MAX - ns,
            Duration::MAX,
        ]),
        1 => (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

/// A size or count: mostly within `lo..=hi`, else just outside it or at the type's ends, else anything.
fn around(lo: usize, hi: usize) -> impl Strategy<Value = usize> {
    prop_oneof![
        30 => lo..=hi,
        2 => proptest::sample::select(vec![0, 1, lo.saturating_sub(1), hi + 1, usize::MAX]),
        1 => any::<usize>(),
    ]
}

fn count(lo: u32, hi: u32) -> impl Strategy<Value = u32> {
    around(lo as usize, hi as usize).prop_map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

/// Backends with ids and weights of every kind, the same id now and then twice.
fn backends() -> impl Strategy<Value = Vec<BackendConfig>> {
    let id = prop_oneof![
        20 => "[a-z0-9.:-]{1,12}",
        2 => proptest::sample::select(vec!["a", "127.0.0.1:1"]).prop_map(String::from),
        1 => Just(String::new()),
        1 => Just("x".repeat(MAX_ID_LEN)),
        1 => Just("x".repeat(MAX_ID_LEN + 1)),
        1 => any::<String>(),
    ];
    let backend = (id, any::<u16>(), count(1, MAX_WEIGHT)).prop_map(|(id, port, weight)| {
        BackendConfig::new(SocketAddr::from(([127, 0, 0, 1], port)))
            .with_id(id)
            .with_weight(weight)
    });
    let backend = backend.boxed();
    prop_oneof![
        12 => proptest::collection::vec(backend.clone(), 1..5),
        1 => proptest::collection::vec(backend, 0..2),
    ]
}

fn copy_mode() -> impl Strategy<Value = CopyMode> {
    proptest::sample::select(vec![
        CopyMode::Auto,
        CopyMode::Pooled,
        CopyMode::Splice,
        CopyMode::Plain,
    ])
}

fn strategy() -> impl Strategy<Value = Pick> {
    proptest::sample::select(vec![
        Pick::RoundRobin,
        Pick::LeastConnections,
        Pick::Random,
        Pick::PowerOfTwoChoices,
    ])
}

fn config() -> impl Strategy<Value = BalancerConfig> {
    (
        (backends(), strategy(), copy_mode()),
        (duration(), duration(), duration(), duration()),
        (
            duration(),
            duration(),
            count(1, MAX_CONNECT_ATTEMPTS),
            count(1, MAX_FAILURE_THRESHOLD),
        ),
        (
            around(1, MAX_CONNECTIONS),
            around(*BUFFER_SIZES.start(), *BUFFER_SIZES.end()),
            prop_oneof![1 => Just(0), 3 => around(0, MAX_REPLAY)],
            any::<Option<u64>>(),
        ),
    )
        .prop_map(
            |(
                (backends, pick, mode),
                (connect, idle, half_close, drain),
                (backoff, max_backoff, attempts, threshold),
                (max_connections, buffer, replay, seed),
            )| {
                let mut c = BalancerConfig::new(backends)
                    .strategy(pick)
                    .copy_mode(mode)
                    .connect_timeout(connect)
                    .idle_timeout(idle)
                    .half_close_timeout(half_close)
                    .drain_timeout(drain)
                    .health(PassiveHealth::new(threshold, backoff, max_backoff))
                    .connect_attempts(attempts)
                    .max_connections(max_connections)
                    .buffer_size(buffer)
                    .replay_limit(replay);
                c.seed = seed;
                c
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1024,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn validate_never_panics_and_accepts_only_values_in_range(c in config()) {
        let Ok(()) = c.validate() else {
            // Refused: the error names something, on one line.
            let e = c.validate().unwrap_err().to_string();
            prop_assert!(!e.is_empty() && !e.contains('\n'), "{e:?}");
            return Ok(());
        };
        for (field, d) in [
            ("connect_timeout", c.connect_timeout),
            ("idle_timeout", c.idle_timeout),
            ("half_close_timeout", c.half_close_timeout),
            ("drain_timeout", c.drain_timeout),
            ("health.backoff", c.health.backoff),
            ("health.max_backoff", c.health.max_backoff),
        ] {
            prop_assert!(d <= MAX_DURATION, "{field} {d:?} accepted");
        }
        for d in [c.connect_timeout, c.idle_timeout, c.half_close_timeout] {
            prop_assert!(d >= Duration::from_millis(1), "{d:?} accepted");
        }
        prop_assert!((1..=MAX_BACKENDS).contains(&c.backends.len()));
        prop_assert!((1..=MAX_CONNECT_ATTEMPTS).contains(&c.connect_attempts));
        prop_assert!((1..=MAX_CONNECTIONS).contains(&c.max_connections));
        prop_assert!((1..=MAX_FAILURE_THRESHOLD).contains(&c.health.failure_threshold));
        prop_assert!(BUFFER_SIZES.contains(&c.buffer_size));
        prop_assert!(c.replay_limit <= MAX_REPLAY);
        prop_assert!(!(c.replay_limit > 0 && c.copy_mode == CopyMode::Plain));
        let mut ids = std::collections::HashSet::new();
        for b in &c.backends {
            prop_assert!((1..=MAX_WEIGHT).contains(&b.weight));
            prop_assert!(!b.id.is_empty() && b.id.len() <= MAX_ID_LEN);
            prop_assert!(ids.insert(b.id.as_str()), "{} twice", b.id);
        }
        // What the running balancer computes from an accepted configuration: a timer this far out, and
        // every back-off, stay representable.
        let now = std::time::Instant::now();
        for d in [c.connect_timeout, c.idle_timeout, c.half_close_timeout, c.drain_timeout] {
            prop_assert!(now.checked_add(d).is_some());
            prop_assert!(tokio::time::Instant::now().checked_add(d).is_some());
        }
        for downs in [0, 1, 5, 16, 17, u32::MAX] {
            let b = c.health.backoff_after(downs);
            prop_assert!(b <= MAX_DURATION, "back-off {b:?} after {downs} downs");
        }
    }
}
