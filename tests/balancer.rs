//! The balancer through real sockets on loopback: distribution, integrity, half-close, resets, failover,
//! passive health, timeouts, the connection limit and graceful shutdown.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{echo_roundtrip, fnv, pattern, refusing_addr, wait_until, Backend, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ulb_tcp::{AdminState, BackendConfig, BalancerConfig, CopyMode, PassiveHealth, Strategy};

/// A data path: how bytes are copied, and whether the replay phase (which carries every connection's
/// first bytes before the backend answers) runs first.
#[derive(Debug, Clone, Copy)]
struct Path {
    mode: CopyMode,
    replay_limit: usize,
}

const fn path(mode: CopyMode) -> Path {
    Path {
        mode,
        replay_limit: 0,
    }
}

/// Every data path must pass the integrity, half-close and reset tests unchanged. The replay path keeps
/// 64 KiB, so the larger transfers also cross its commit point.
#[cfg(target_os = "linux")]
const MODES: [Path; 5] = [
    path(CopyMode::Auto),
    path(CopyMode::Pooled),
    path(CopyMode::Splice),
    path(CopyMode::Plain),
    Path {
        mode: CopyMode::Pooled,
        replay_limit: 64 << 10,
    },
];
#[cfg(not(target_os = "linux"))]
const MODES: [Path; 3] = [
    path(CopyMode::Pooled),
    path(CopyMode::Plain),
    Path {
        mode: CopyMode::Pooled,
        replay_limit: 64 << 10,
    },
];

trait OnPath {
    fn on(self, path: Path) -> Self;
}

impl OnPath for BalancerConfig {
    fn on(self, path: Path) -> Self {
        self.copy_mode(path.mode).replay_limit(path.replay_limit)
    }
}

fn config(addrs: &[std::net::SocketAddr]) -> BalancerConfig {
    BalancerConfig::new(addrs.iter().map(|&a| BackendConfig::new(a)))
}

async fn tagged(n: u8) -> Vec<Backend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Backend::tagged(i).await);
    }
    v
}

fn addrs(bs: &[Backend]) -> Vec<std::net::SocketAddr> {
    bs.iter().map(|b| b.addr).collect()
}

// ---------------------------------------------------------------------------------------------------------
// Distribution

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_gives_exactly_equal_shares() {
    let bs = tagged(3).await;
    let lb = Running::start(config(&addrs(&bs))).await;
    let mut counts = [0usize; 3];
    for _ in 0..300 {
        let (tag, _s) = lb.tag().await;
        counts[tag as usize] += 1;
    }
    assert_eq!(counts, [100, 100, 100]);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_round_robin_is_exact_and_smooth() {
    let bs = tagged(3).await;
    let cfg = BalancerConfig::new(
        bs.iter()
            .zip([1, 2, 3])
            .map(|(b, w)| BackendConfig::new(b.addr).with_weight(w)),
    );
    let lb = Running::start(cfg).await;
    let mut seq = Vec::new();
    for _ in 0..600 {
        seq.push(lb.tag().await.0);
    }
    let count = |s: &[u8], t: u8| s.iter().filter(|&&x| x == t).count();
    assert_eq!(
        [count(&seq, 0), count(&seq, 1), count(&seq, 2)],
        [100, 200, 300]
    );
    // Smooth: every aligned window of one period (6) holds exactly 1, 2 and 3 picks, and no backend gets
    // more than two in a row.
    for w in seq.chunks(6) {
        assert_eq!(
            [count(w, 0), count(w, 1), count(w, 2)],
            [1, 2, 3],
            "window {w:?}"
        );
    }
    let longest_run = seq.chunk_by(|a, b| a == b).map(<[u8]>::len).max().unwrap();
    assert!(longest_run <= 2, "bursty sequence: run of {longest_run}");
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_sends_new_connections_to_the_least_loaded() {
    // 3 backends: the table is scanned; 20: the load tree answers.
    for n in [3u8, 20] {
        least_connections(n).await;
    }
}

async fn least_connections(n: u8) {
    let bs = tagged(n).await;
    let lb = Running::start(config(&addrs(&bs)).strategy(Strategy::LeastConnections)).await;
    // Two held connections per backend: idle backends share evenly.
    let mut held: Vec<(u8, TcpStream)> = Vec::new();
    for _ in 0..2 * usize::from(n) {
        held.push(lb.tag().await);
    }
    let mut per = vec![0; usize::from(n)];
    held.iter().for_each(|(t, _)| per[*t as usize] += 1);
    assert_eq!(
        per,
        vec![2; usize::from(n)],
        "{n} backends: ties must rotate"
    );

    // Close both connections held on backend 1; once the balancer has seen them end, the next two
    // connections must go to backend 1.
    held.retain(|(t, _)| *t != 1);
    lb.wait_for("backend 1 to drain", |s| s[1].active == 0)
        .await;
    let (a, sa) = lb.tag().await;
    let (b, sb) = lb.tag().await;
    assert_eq!(
        (a, b),
        (1, 1),
        "{n} backends: the least loaded backend must get the new connections"
    );
    held.push((a, sa));
    held.push((b, sb));
    // Now all hold two again: the next n go one to each.
    let mut next: Vec<u8> = Vec::new();
    for _ in 0..n {
        let (t, s) = lb.tag().await;
        next.push(t);
        held.push((t, s));
    }
    next.sort();
    assert_eq!(next, (0..n).collect::<Vec<_>>(), "{n} backends");
    drop(held);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_random_stays_within_statistical_bounds() {
    let bs = tagged(3).await;
    let run = |seed| {
        let cfg = config(&addrs(&bs)).strategy(Strategy::Random).seed(seed);
        async move {
            let lb = Running::start(cfg).await;
            let mut seq = Vec::new();
            for _ in 0..1500 {
                seq.push(lb.tag().await.0);
            }
            lb.stop().await;
            seq
        }
    };
    let seq = run(1234).await;
    for t in 0..3u8 {
        let n = seq.iter().filter(|&&x| x == t).count();
        // Expected 500, σ ≈ 18.3: ±100 is more than five σ.
        assert!((400..=600).contains(&n), "backend {t} got {n} of 1500");
    }
    assert_eq!(
        seq,
        run(1234).await,
        "the same seed must give the same sequence"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_strategy_picks_a_backend_that_is_down() {
    for strategy in [
        Strategy::RoundRobin,
        Strategy::LeastConnections,
        Strategy::Random,
        Strategy::PowerOfTwoChoices,
    ] {
        let bs = tagged(2).await;
        let dead = refusing_addr();
        let cfg = config(&[bs[0].addr, dead, bs[1].addr])
            .strategy(strategy)
            .health(PassiveHealth::new(
                1,
                Duration::from_secs(60),
                Duration::from_secs(60),
            ));
        let lb = Running::start(cfg).await;
        for i in 0..100 {
            let (tag, _s) = lb.tag().await;
            assert!(tag < 2, "{strategy}: connection {i} got tag {tag}");
        }
        let stats = lb.handle.backends();
        assert!(
            !stats[1].up,
            "{strategy}: the refusing backend must be marked down"
        );
        assert!(
            stats[1].connect_failures <= 1,
            "{strategy}: a down backend was tried again: {:?}",
            stats[1]
        );
        assert_eq!(stats[0].total + stats[2].total, 100);
        lb.stop().await;
    }
}

// ---------------------------------------------------------------------------------------------------------
// Integrity

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_size_arrives_byte_exact_both_ways() {
    for mode in MODES {
        every_size(mode).await;
    }
}

async fn every_size(mode: Path) {
    let backend = Backend::echo().await;
    let lb = Running::start(config(&[backend.addr]).on(mode)).await;
    for (i, len) in [0, 1, 8191, 8192, 8193, 65535, 1 << 20, 64 << 20]
        .into_iter()
        .enumerate()
    {
        let data = Arc::new(pattern(i as u64, len));
        let got = echo_roundtrip(lb.addr, data.clone()).await.unwrap();
        assert_eq!(got.len(), len, "{mode:?}: length for {len} bytes");
        assert_eq!(fnv(&got), fnv(&data), "{mode:?}: content for {len} bytes");
    }
    lb.wait_for("connections to close", |s| s[0].active == 0)
        .await;
    assert_eq!(lb.handle.backends()[0].total, 8);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_clients_each_get_their_own_bytes() {
    for mode in MODES {
        a_hundred_concurrent_clients(mode).await;
    }
}

async fn a_hundred_concurrent_clients(mode: Path) {
    let backend = Backend::echo().await;
    let lb = Running::start(config(&[backend.addr]).on(mode)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..100u64 {
        let addr = lb.addr;
        tasks.spawn(async move {
            let data = Arc::new(pattern(1000 + i, 100_000 + i as usize * 997));
            let got = echo_roundtrip(addr, data.clone()).await?;
            Ok::<_, std::io::Error>((i, got == *data))
        });
    }
    let mut ok = 0;
    while let Some(r) = tasks.join_next().await {
        let (i, same) = r.unwrap().unwrap();
        assert!(same, "{mode:?}: client {i} got bytes that are not its own");
        ok += 1;
    }
    assert_eq!(ok, 100);
    lb.stop().await;
}

/// A backend that reads until the client's FIN, then answers with the length and fingerprint of what it
/// read, followed by 1 MiB, and closes.
async fn summarising_backend() -> Backend {
    Backend::spawn(|mut s| async move {
        let mut got = Vec::new();
        if s.read_to_end(&mut got).await.is_err() {
            return;
        }
        let mut answer = format!("{} {:016x}\n", got.len(), fnv(&got)).into_bytes();
        answer.extend(pattern(77, 1 << 20));
        let _ = s.write_all(&answer).await;
        let _ = s.shutdown().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_half_close_reaches_the_backend_and_the_answer_still_flows() {
    for mode in MODES {
        client_half_close(mode).await;
    }
}

async fn client_half_close(mode: Path) {
    let backend = summarising_backend().await;
    let lb = Running::start(config(&[backend.addr]).on(mode)).await;
    let data = pattern(5, 300_000);
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(&data).await.unwrap();
    s.shutdown().await.unwrap(); // FIN: the backend only answers once it sees it
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let header = format!("{} {:016x}\n", data.len(), fnv(&data));
    assert!(
        answer.starts_with(header.as_bytes()),
        "{mode:?}: backend saw something else"
    );
    assert_eq!(&answer[header.len()..], &pattern(77, 1 << 20)[..]);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_half_close_reaches_the_client_and_the_client_can_still_send() {
    for mode in MODES {
        backend_half_close(mode).await;
    }
}

async fn backend_half_close(mode: Path) {
    let (tx, rx) = tokio::sync::oneshot::channel::<Vec<u8>>();
    let tx = Arc::new(std::sync::Mutex::new(Some(tx)));
    let backend = Backend::spawn(move |mut s| {
        let tx = tx.clone();
        async move {
            s.write_all(b"greeting").await.unwrap();
            s.shutdown().await.unwrap(); // FIN towards the client, but keep reading
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            if let Some(tx) = tx.lock().unwrap().take() {
                let _ = tx.send(got);
            }
        }
    })
    .await;
    let lb = Running::start(config(&[backend.addr]).on(mode)).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let mut greeting = Vec::new();
    s.read_to_end(&mut greeting).await.unwrap(); // ends with the backend's FIN
    assert_eq!(greeting, b"greeting");
    let late = pattern(9, 200_000);
    s.write_all(&late).await.unwrap();
    s.shutdown().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        got, late,
        "{mode:?}: bytes sent after the backend's FIN must still arrive"
    );
    lb.stop().await;
}

/// The direction that ends last passes its FIN on with the close of the connection (no `shutdown`):
/// whichever side ends first, the bytes the other side sends after that arrive whole and end with a clean
/// FIN, never a reset, also when the receiver reads slowly, so that the balancer closes with megabytes
/// still queued in its send buffer. Through the per-core runtime too, whose accept loop differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fin_of_the_last_direction_follows_every_byte() {
    for mode in MODES {
        for per_core in [false, true] {
            last_fin(mode, per_core, true).await;
            last_fin(mode, per_core, false).await;
        }
    }
}

/// `backend_first`: the backend greets and ends, then the client sends 8 MiB and ends; else the client
/// asks and ends, then the backend sends 8 MiB and ends. The receiver of the 8 MiB waits 300 ms before
/// reading them.
async fn last_fin(mode: Path, per_core: bool, backend_first: bool) {
    const LEN: usize = 8 << 20;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::spawn(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut got = Vec::new();
            let r = if backend_first {
                s.write_all(b"hello").await.unwrap();
                s.shutdown().await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
                s.read_to_end(&mut got).await
            } else {
                let r = s.read_to_end(&mut got).await;
                s.write_all(&pattern(31, LEN)).await.unwrap();
                s.shutdown().await.unwrap();
                r
            };
            let _ = tx.send(r.map(|_| got).map_err(|e| e.kind()));
        }
    })
    .await;
    let cfg = config(&[backend.addr]).on(mode);
    let lb = if per_core {
        Running::start_per_core(cfg, 2).await
    } else {
        Running::start(cfg).await
    };
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    let what = format!("{mode:?}, per-core {per_core}, backend first {backend_first}");
    let mut got = Vec::new();
    if backend_first {
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .unwrap_or_else(|_| panic!("{what}: the backend's FIN never came"))
            .unwrap();
        assert_eq!(got, b"hello", "{what}");
        s.write_all(&pattern(32, LEN)).await.unwrap();
        s.shutdown().await.unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .unwrap()
            .unwrap();
        let seen = seen.unwrap_or_else(|e| panic!("{what}: the backend read {e:?}"));
        assert_eq!(seen.len(), LEN, "{what}");
        assert_eq!(fnv(&seen), fnv(&pattern(32, LEN)), "{what}");
    } else {
        s.write_all(b"request").await.unwrap();
        s.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut got))
            .await
            .unwrap();
        r.unwrap_or_else(|e| panic!("{what}: the client read {e}"));
        assert_eq!(got.len(), LEN, "{what}");
        assert_eq!(fnv(&got), fnv(&pattern(31, LEN)), "{what}");
        let seen = rx.recv().await.unwrap();
        assert_eq!(seen, Ok(b"request".to_vec()), "{what}");
    }
    lb.stop().await;
}

// ---------------------------------------------------------------------------------------------------------
// Resets

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_reset_mid_stream_reaches_the_client_as_an_error() {
    for mode in MODES {
        backend_reset(mode).await;
    }
}

async fn backend_reset(mode: Path) {
    let backend = Backend::spawn(|mut s| async move {
        let _ = s.write_all(&pattern(1, 200_000)).await;
        let _ = s.set_zero_linger();
        drop(s); // RST
    })
    .await;
    let lb = Running::start(config(&[backend.addr]).on(mode)).await;
    for _ in 0..10 {
        // The reset can arrive before the connect has even been reported: that too is an error.
        let r = match TcpStream::connect(lb.addr).await {
            Ok(mut s) => {
                let mut buf = Vec::new();
                tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
                    .await
                    .unwrap()
            }
            Err(e) => Err(e),
        };
        let err = r.expect_err("a reset must not look like a clean end of stream");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset,
            "{mode:?}: {err}"
        );
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reset_reaches_the_backend_as_an_error() {
    for mode in MODES {
        client_reset(mode).await;
    }
}

async fn client_reset(mode: Path) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::spawn(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = Vec::new();
            let _ = tx.send(s.read_to_end(&mut buf).await.map_err(|e| e.kind()));
        }
    })
    .await;
    let lb = Running::start(config(&[backend.addr]).on(mode)).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"partial request").await.unwrap();
    lb.wait_for("the backend connection", |st| st[0].total == 1)
        .await;
    s.set_zero_linger().unwrap();
    drop(s);
    let r = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(r, Err(std::io::ErrorKind::ConnectionReset), "{mode:?}");
    lb.stop().await;
}

// ---------------------------------------------------------------------------------------------------------
// Failover and passive health

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_refusing_backend_of_three_costs_clients_nothing() {
    let good = [Backend::echo().await, Backend::echo().await];
    let cfg = config(&[good[0].addr, refusing_addr(), good[1].addr]);
    let lb = Running::start(cfg).await;
    let mut failures = 0;
    for i in 0..300u64 {
        let data = Arc::new(pattern(i, 100));
        match echo_roundtrip(lb.addr, data.clone()).await {
            Ok(got) if got == *data => {}
            _ => failures += 1,
        }
    }
    assert_eq!(failures, 0, "client-visible failures");
    let s = lb.handle.backends();
    assert_eq!(s[0].total + s[2].total, 300);
    assert!(!s[1].up, "three refusals in a row mark the backend down");
    assert_eq!(
        s[1].connect_failures, 3,
        "down backends are skipped until the back-off ends"
    );
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_down_closes_clients_within_the_connect_budget_and_recovers() {
    let dead = [refusing_addr(), refusing_addr()];
    let cfg = config(&dead)
        .connect_timeout(Duration::from_millis(500))
        .health(PassiveHealth::new(
            1,
            Duration::from_millis(300),
            Duration::from_millis(300),
        ));
    let lb = Running::start(cfg).await;
    let budget = Duration::from_millis(500 * 3) + Duration::from_millis(500);
    for _ in 0..20 {
        let t0 = Instant::now();
        // The reset may come so fast that the connect itself reports it.
        if let Ok(mut s) = TcpStream::connect(lb.addr).await {
            let mut buf = [0u8; 1];
            let r = tokio::time::timeout(budget, s.read(&mut buf))
                .await
                .expect("client left hanging");
            assert!(matches!(r, Ok(0) | Err(_)), "client must be closed");
        }
        assert!(t0.elapsed() < budget);
    }
    assert!(!lb.task.is_finished(), "the balancer keeps running");

    // Bring the first backend back on its port: after its back-off it gets traffic again.
    let listener = tokio::net::TcpListener::bind(dead[0]).await.unwrap();
    let back = Backend::serve(listener, common::echo);
    let start = Instant::now();
    loop {
        let data = Arc::new(pattern(3, 1000));
        if let Ok(got) = echo_roundtrip(lb.addr, data.clone()).await {
            if got == *data {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the backend never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back.accepted() >= 1);
    lb.wait_for("backend up", |s| s[0].up).await;
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_times_out_is_retried_elsewhere_and_marked_down() {
    let (_hole, _filler, hole_addr) = common::blackhole();
    let good = Backend::echo().await;
    let cfg = config(&[hole_addr, good.addr])
        .connect_timeout(Duration::from_millis(200))
        .health(PassiveHealth::new(
            2,
            Duration::from_secs(5),
            Duration::from_secs(60),
        ));
    let lb = Running::start(cfg).await;
    for i in 0..20u64 {
        let data = Arc::new(pattern(i, 5000));
        let got = echo_roundtrip(lb.addr, data.clone()).await.unwrap();
        assert_eq!(got, *data);
    }
    let s = lb.handle.backends();
    assert!(!s[0].up, "two timeouts in a row mark it down: {:?}", s[0]);
    assert_eq!(s[0].connect_failures, 2);
    assert_eq!(s[1].total, 20);
    lb.stop().await;
}

// ---------------------------------------------------------------------------------------------------------
// Timeouts and limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_closes_both_sides() {
    // The plain path does not enforce idle timeouts (documented); the two pump paths must.
    idle_timeout(path(CopyMode::Auto)).await;
    idle_timeout(path(CopyMode::Pooled)).await;
    #[cfg(target_os = "linux")]
    idle_timeout(path(CopyMode::Splice)).await;
    idle_timeout(MODES[MODES.len() - 1]).await;
}

async fn idle_timeout(mode: Path) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let backend = Backend::spawn(move |mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = [0u8; 64];
            let n = s.read(&mut buf).await.unwrap_or(0);
            let _ = s.write_all(&buf[..n]).await;
            // Now silent; report how the balancer ends the connection.
            let t0 = Instant::now();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            let _ = tx.send(t0.elapsed());
        }
    })
    .await;
    let cfg = config(&[backend.addr])
        .idle_timeout(Duration::from_millis(400))
        .on(mode);
    let lb = Running::start(cfg).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).await.unwrap();
    let t0 = Instant::now();
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("idle connection not closed");
    assert!(r.is_err() || rest.is_empty());
    let client_side = t0.elapsed();
    let backend_side = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("backend side not closed")
        .unwrap();
    for (side, d) in [("client", client_side), ("backend", backend_side)] {
        assert!(
            d >= Duration::from_millis(300) && d < Duration::from_secs(3),
            "{mode:?}: {side} closed after {d:?}"
        );
    }
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_timeout_bounds_a_silent_half_closed_connection() {
    // The backend never answers and never closes.
    let backend = Backend::spawn(|mut s| async move {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
        std::future::pending::<()>().await;
    })
    .await;
    let cfg = config(&[backend.addr])
        .idle_timeout(Duration::from_secs(60))
        .half_close_timeout(Duration::from_millis(300));
    let lb = Running::start(cfg).await;
    let mut s = TcpStream::connect(lb.addr).await.unwrap();
    s.write_all(b"request").await.unwrap();
    s.shutdown().await.unwrap();
    let t0 = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("half-closed connection was not bounded");
    assert!(t0.elapsed() >= Duration::from_millis(200));
    lb.wait_for("connection gone", |st| st[0].active == 0).await;
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_limit_holds_and_waiting_clients_are_served_later() {
    let backend = Backend::tagged(0).await;
    let lb = Running::start(config(&[backend.addr]).max_connections(2)).await;
    let (_, a) = lb.tag().await;
    let (_, _b) = lb.tag().await;
    // The third client's TCP handshake completes in the kernel backlog, but it is not served.
    let mut c = TcpStream::connect(lb.addr).await.unwrap();
    let mut tag = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut tag)).await;
    assert!(
        early.is_err(),
        "a third connection was served over the limit"
    );
    assert_eq!(backend.accepted(), 2);
    assert_eq!(lb.handle.active_connections(), 2);
    drop(a);
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut tag))
        .await
        .expect("the waiting client was never served")
        .unwrap();
    assert_eq!(backend.accepted(), 3);
    drop((_b, c));
    assert_eq!(lb.stop().await.forced, 0);
}

// ---------------------------------------------------------------------------------------------------------
// Shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_refuses_new_clients_and_lets_transfers_finish() {
    let backend = Backend::echo().await;
    let lb = Running::start(config(&[backend.addr])).await;
    shutdown_during_a_transfer(lb, 11).await;
}

/// Starts an 8 MiB echo transfer through `lb`, shuts `lb` down in the middle of it, and checks that new
/// connects are refused (on every listener: none is left) while the transfer completes byte-exact.
async fn shutdown_during_a_transfer(lb: Running, seed: u64) {
    let addr = lb.addr;
    let data = Arc::new(pattern(seed, 8 << 20));
    let s = TcpStream::connect(addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in sent.chunks(64 * 1024) {
            w.write_all(chunk).await.unwrap();
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        w.shutdown().await.unwrap();
    });
    let mut got = vec![0u8; 1 << 20];
    r.read_exact(&mut got).await.unwrap();
    lb.handle.shutdown();
    // Every listener closes, and new connects are refused. Both are waited for: with per-core
    // (`SO_REUSEPORT`) listeners, a SYN that the kernel steers to a member of the group while that member
    // is being closed is answered with a reset even though others still listen, so one refused connect
    // does not yet mean that no listener is left (CI saw 1 listening after a refusal, once).
    #[cfg(target_os = "linux")]
    wait_until("every listener closed", Duration::from_secs(5), || {
        common::listening_sockets(addr.port()) == 0
    })
    .await;
    wait_until("connects refused", Duration::from_secs(5), || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got == *data, "the in-flight transfer was corrupted");
    let report = lb.stop().await;
    // (A probe connect that raced the shutdown may have been accepted too; it ends at once.)
    assert!(report.in_flight >= 1, "{report:?}");
    assert_eq!(report.forced, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_deadline_cuts_what_is_left_with_a_reset() {
    let backend = Backend::tagged(0).await;
    let cfg = config(&[backend.addr]).drain_timeout(Duration::from_millis(300));
    let lb = Running::start(cfg).await;
    let (_, mut held) = lb.tag().await;
    let t0 = Instant::now();
    let report = lb.stop().await;
    assert!(t0.elapsed() >= Duration::from_millis(250));
    assert_eq!((report.in_flight, report.forced), (1, 1), "{report:?}");
    let mut buf = Vec::new();
    let r = held.read_to_end(&mut buf).await;
    assert_eq!(
        r.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_every_connection_and_no_count_leaks() {
    let good = Backend::echo().await;
    let lb = Running::start(config(&[good.addr, refusing_addr()])).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50u64 {
        let addr = lb.addr;
        tasks.spawn(async move { echo_roundtrip(addr, Arc::new(pattern(i, 10_000))).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    lb.wait_for("every count back to zero", |s| {
        s.iter().all(|b| b.active == 0)
    })
    .await;
    let s = lb.handle.backends();
    let by_name: HashMap<_, _> = s.iter().map(|b| (b.addr, b.total)).collect();
    assert_eq!(by_name[&good.addr], 50);
    let handle = lb.handle.clone();
    wait_until(
        "the connection limit's permits to return",
        Duration::from_secs(5),
        || handle.active_connections() == 0,
    )
    .await;
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backend_takes_no_new_connections_but_keeps_its_open_ones() {
    let bs = tagged(2).await;
    let lb = Running::start(config(&addrs(&bs))).await;
    let (first, mut open) = lb.tag().await;
    assert_eq!(first, 0);
    let id = bs[0].addr.to_string();
    assert_eq!(
        lb.handle.set_admin_state(&id, AdminState::Drain),
        Ok(AdminState::Ready)
    );
    let unknown = common::refusing_addr().to_string();
    assert_eq!(
        lb.handle.set_admin_state(&unknown, AdminState::Drain),
        Err(ulb_tcp::BackendError::NotFound(unknown.clone()))
    );
    for _ in 0..20 {
        assert_eq!(lb.tag().await.0, 1, "a drained backend got a connection");
    }
    // The connection opened before still works.
    open.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"still here");
    let stats = lb.handle.backend(&id).unwrap();
    assert!(
        stats.admin == AdminState::Drain && stats.up && stats.active == 1,
        "{stats:?}"
    );

    lb.handle.set_admin_state(&id, AdminState::Ready).unwrap();
    let mut seen = [0; 2];
    for _ in 0..10 {
        seen[lb.tag().await.0 as usize] += 1;
    }
    assert_eq!(seen, [5, 5]);
    drop(open);
    assert_eq!(lb.stop().await.forced, 0);
}

// ---------------------------------------------------------------------------------------------------------
// Replay: a backend that goes away before answering

/// How a backend that never answers goes away.
#[derive(Debug, Clone, Copy)]
enum Death {
    /// Reset at once, reading nothing (like a connection still in a dead process's listen queue).
    ResetAtOnce,
    /// Reads the whole request, then closes with a FIN (a crash with nothing left unread).
    CloseAfterRequest,
    /// Reads the whole request, then resets.
    ResetAfterRequest,
}

const REQUEST: usize = 10_000;

/// A backend that accepts and goes away as `death` says, without sending a byte.
async fn dying(death: Death) -> Backend {
    Backend::spawn(move |mut s| async move {
        if !matches!(death, Death::ResetAtOnce) {
            let mut got = vec![0; REQUEST];
            let _ = s.read_exact(&mut got).await;
        }
        if !matches!(death, Death::CloseAfterRequest) {
            let _ = s.set_zero_linger();
        }
    })
    .await
}

/// A backend that reads a `REQUEST`-byte request and answers with its length and fingerprint.
async fn answering() -> Backend {
    Backend::spawn(|mut s| async move {
        let mut got = vec![0; REQUEST];
        if s.read_exact(&mut got).await.is_ok() {
            let _ = s
                .write_all(format!("{:016x}\n", fnv(&got)).as_bytes())
                .await;
        }
    })
    .await
}

/// Sends a request (and a FIN after it, if `fin`), returns the answer up to EOF.
async fn request(addr: std::net::SocketAddr, seed: u64, fin: bool) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&pattern(seed, REQUEST)).await?;
    if fin {
        s.shutdown().await?;
    }
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer))
        .await
        .map_err(|_| std::io::Error::other("no answer in 10 s"))??;
    Ok(answer)
}

fn replaying(addrs: &[std::net::SocketAddr]) -> BalancerConfig {
    config(addrs).replay_limit(64 << 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_dies_before_answering_is_replaced_without_the_client_knowing() {
    let deaths = [
        Death::ResetAtOnce,
        Death::CloseAfterRequest,
        Death::ResetAfterRequest,
    ];
    for death in deaths {
        // With the client's FIN sent before the death, a backend's FIN is an answer (an empty one), so
        // only resets are replayed then.
        let fins: &[bool] = match death {
            Death::CloseAfterRequest => &[false],
            _ => &[false, true],
        };
        for &fin in fins {
            let (bad, good) = (dying(death).await, answering().await);
            let lb = Running::start(replaying(&[bad.addr, good.addr])).await;
            for i in 0..10u64 {
                let answer = request(lb.addr, i, fin).await;
                let expected = format!("{:016x}\n", fnv(&pattern(i, REQUEST)));
                assert_eq!(
                    answer.ok().as_deref(),
                    Some(expected.as_bytes()),
                    "{death:?}, fin {fin}, request {i}"
                );
            }
            let stats = lb.handle.backend(&bad.addr.to_string()).unwrap();
            assert!(bad.accepted() >= 1, "{death:?}: round robin starts with it");
            assert_eq!(stats.connect_failures as usize, bad.accepted(), "{death:?}");
            assert_eq!(good.accepted(), 10, "{death:?}, fin {fin}");
            lb.stop().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_replay_or_past_its_limit_the_close_reaches_the_client() {
    // 0 is the default (off); 4 KiB is less than the request, so the connection is committed first.
    for limit in [0, 4096] {
        let (bad, good) = (dying(Death::CloseAfterRequest).await, answering().await);
        let lb = Running::start(config(&[bad.addr, good.addr]).replay_limit(limit)).await;
        let first = request(lb.addr, 1, false).await; // round robin: the dying one
        assert!(
            first.as_ref().is_ok_and(|a| a.is_empty()),
            "limit {limit}: {first:?}"
        );
        let second = request(lb.addr, 2, false).await.unwrap();
        assert_eq!(second.len(), 17, "limit {limit}");
        assert_eq!(good.accepted(), 1, "limit {limit}: nothing was replayed");
        lb.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_no_backend_answers_the_client_is_closed_after_every_one_was_tried() {
    let bad = [
        dying(Death::ResetAfterRequest).await,
        dying(Death::CloseAfterRequest).await,
    ];
    let lb = Running::start(replaying(&addrs(&bad))).await;
    let answer = request(lb.addr, 3, false).await;
    assert!(answer.as_ref().map_or(true, |a| a.is_empty()), "{answer:?}");
    assert_eq!([bad[0].accepted(), bad[1].accepted()], [1, 1]);
    lb.wait_for("the guards to be released", |s| {
        s.iter().all(|b| b.active == 0)
    })
    .await;
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_silent_before_answering_is_cut_at_the_idle_timeout() {
    let silent = Backend::spawn(|mut s| async move {
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    })
    .await;
    let cfg = replaying(&[silent.addr]).idle_timeout(Duration::from_millis(300));
    let lb = Running::start(cfg).await;
    let t0 = Instant::now();
    let answer = request(lb.addr, 4, false).await;
    assert!(answer.as_ref().map_or(true, |a| a.is_empty()), "{answer:?}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "{took:?}"
    );
    lb.stop().await;
}

// ---------------------------------------------------------------------------------------------------------
// Per-core runtimes (one current-thread runtime and one SO_REUSEPORT listener per thread)

/// The kernel picks a client's listener by a hash of its addresses and ports, so with 4 listeners and 200
/// clients every listener gets clients (a listener left out has probability 4 · (3/4)^200 ≈ 1e-25). A
/// thread that did not serve its listener would leave its quarter of the clients hanging, and this test
/// would time out naming them.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_threads_all_carry_clients_byte_exact() {
    for mode in MODES {
        let backend = Backend::echo().await;
        let lb = Running::start_per_core(config(&[backend.addr]).on(mode), 4).await;
        assert_eq!(
            common::listening_sockets(lb.addr.port()),
            4,
            "one listener per thread"
        );
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..200u64 {
            let addr = lb.addr;
            tasks.spawn(async move {
                let data = Arc::new(pattern(5000 + i, 20_000 + i as usize * 331));
                let got = tokio::time::timeout(
                    Duration::from_secs(20),
                    echo_roundtrip(addr, data.clone()),
                )
                .await;
                (i, got.map(|r| r.map(|got| got == *data)))
            });
        }
        while let Some(r) = tasks.join_next().await {
            let (i, got) = r.unwrap();
            let same = got
                .unwrap_or_else(|_| panic!("{mode:?}: client {i} was never served"))
                .unwrap_or_else(|e| panic!("{mode:?}: client {i}: {e}"));
            assert!(same, "{mode:?}: client {i} got bytes that are not its own");
        }
        lb.wait_for("connections to close", |s| s[0].active == 0)
            .await;
        assert_eq!(lb.handle.backends()[0].total, 200, "{mode:?}");
        assert_eq!(lb.stop().await.forced, 0, "{mode:?}");
    }
}

/// With 4 threads and a limit of 2, a thread must not hold a permit while its own backlog is empty: both
/// first clients are served wherever the kernel queued them, the third waits, and is served when one
/// leaves.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_threads_share_one_connection_limit() {
    let backend = Backend::tagged(0).await;
    let lb = Running::start_per_core(config(&[backend.addr]).max_connections(2), 4).await;
    let mut open = Vec::new();
    for n in 1..=2 {
        let tagged = tokio::time::timeout(Duration::from_secs(5), lb.tag()).await;
        let (_, s) = tagged.unwrap_or_else(|_| panic!("client {n} was not served under the limit"));
        open.push(s);
    }
    let mut c = TcpStream::connect(lb.addr).await.unwrap();
    let mut tag = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), c.read_exact(&mut tag)).await;
    assert!(
        early.is_err(),
        "a third connection was served over the limit"
    );
    assert_eq!(lb.handle.active_connections(), 2);
    open.pop();
    tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut tag))
        .await
        .expect("the waiting client was never served")
        .unwrap();
    assert_eq!(backend.accepted(), 3);
    drop((open, c));
    assert_eq!(lb.stop().await.forced, 0);
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_shutdown_closes_every_listener_and_lets_transfers_finish() {
    let backend = Backend::echo().await;
    let lb = Running::start_per_core(config(&[backend.addr]), 3).await;
    shutdown_during_a_transfer(lb, 12).await;
}

#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_drain_deadline_cuts_connections_on_every_thread() {
    let backend = Backend::tagged(0).await;
    let cfg = config(&[backend.addr]).drain_timeout(Duration::from_millis(300));
    let lb = Running::start_per_core(cfg, 2).await;
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(lb.tag().await.1);
    }
    let report = lb.stop().await;
    assert_eq!((report.in_flight, report.forced), (20, 20), "{report:?}");
    for mut s in held {
        let r = s.read_to_end(&mut Vec::new()).await;
        assert_eq!(
            r.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionReset)
        );
    }
}

#[cfg(target_os = "linux")]
#[test]
fn per_core_listeners_refuse_an_address_in_use() {
    use std::num::NonZeroUsize;
    use ulb_tcp::PerCoreListeners;
    let two = NonZeroUsize::new(2).unwrap();
    let first = PerCoreListeners::bind("127.0.0.1:0".parse().unwrap(), two).unwrap();
    let addr = first.local_addr();
    assert_ne!(addr.port(), 0);
    assert_eq!(first.threads(), 2);
    // Another SO_REUSEPORT group on the same address would silently take a share of the clients.
    let again = PerCoreListeners::bind(addr, two).unwrap_err();
    assert_eq!(again.kind(), std::io::ErrorKind::AddrInUse, "{again}");
    let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = PerCoreListeners::bind(plain.local_addr().unwrap(), two).unwrap_err();
    assert_eq!(taken.kind(), std::io::ErrorKind::AddrInUse, "{taken}");
    let too_many = NonZeroUsize::new(ulb_tcp::MAX_THREADS + 1).unwrap();
    let e = PerCoreListeners::bind("127.0.0.1:0".parse().unwrap(), too_many).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{e}");
}

/// The data path counts on it: on Linux an accepted socket inherits TCP_NODELAY from the listener, so the
/// balancer sets it once on the listener instead of once per connection.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn accepted_sockets_inherit_nodelay_from_the_listener() {
    let listener = ulb_tcp::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let _client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, _) = listener.accept().await.unwrap();
    assert!(accepted.nodelay().unwrap());
}
