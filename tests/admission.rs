//! Who may take a connection, through real sockets: slow start with every strategy, per-backend caps
//! with the queue, backups, and the single trial connection that ends a back-off.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{wait_until, Backend, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use ulb_tcp::{BackendConfig, BalancerConfig, PassiveHealth, Strategy};

async fn tagged(n: u8) -> Vec<Backend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Backend::tagged(i).await);
    }
    v
}

/// One short connection: the tag of the backend it reached.
async fn visit(lb: &Running) -> u8 {
    lb.tag().await.0
}

/// A backend joins a running balancer with a slow start of `window`: over the first tenth of it, its
/// share of short connections is under 30% of a fair one; after it, fair.
async fn slow_start_with(strategy: Strategy, window: Duration) {
    let bs = tagged(4).await;
    let cfg = BalancerConfig::new(bs[..3].iter().map(|b| BackendConfig::new(b.addr)))
        .strategy(strategy)
        .slow_start(window)
        .seed(7);
    let lb = Running::start(cfg).await;
    lb.handle
        .add_backend(BackendConfig::new(bs[3].addr))
        .unwrap();
    let joined = Instant::now();
    let id = bs[3].addr.to_string();
    let early_weight = lb.handle.backend(&id).unwrap().effective_weight;
    assert!(
        early_weight < 0.2,
        "{strategy}: effective weight {early_weight} at the start"
    );

    let (mut early, mut early_new) = (0usize, 0usize);
    while joined.elapsed() < window / 10 {
        early += 1;
        early_new += usize::from(visit(&lb).await == 3);
    }
    wait_until("the slow start to end", window * 2, || {
        joined.elapsed() >= window
    })
    .await;
    let handle = lb.handle.clone();
    wait_until("the full weight", Duration::from_secs(5), || {
        handle
            .backend(&id)
            .is_some_and(|b| b.effective_weight == 1.0)
    })
    .await;
    let (late, mut late_new) = (800usize, 0usize);
    for _ in 0..late {
        late_new += usize::from(visit(&lb).await == 3);
    }
    let fair = 0.25;
    let early_share = early_new as f64 / early as f64;
    let late_share = late_new as f64 / late as f64;
    eprintln!(
        "{strategy}: first tenth {early_new}/{early} ({early_share:.3}), after {late_new}/{late} ({late_share:.3})"
    );
    assert!(
        early >= 20,
        "{strategy}: only {early} connections in the first tenth"
    );
    assert!(
        early_share < 0.3 * fair,
        "{strategy}: {early_share:.3} of the connections in the first tenth of the window"
    );
    assert!(
        (0.18..=0.32).contains(&late_share),
        "{strategy}: {late_share:.3} once the window is over, not its fair share"
    );
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_up_a_joining_backend_with_every_strategy() {
    let window = Duration::from_secs(3);
    let [a, b, c, d] = Strategy::ALL;
    tokio::join!(
        slow_start_with(a, window),
        slow_start_with(b, window),
        slow_start_with(c, window),
        slow_start_with(d, window),
    );
}

/// A backend that records how many connections it holds at once, and numbers them in the order it
/// accepted them (the number is the first byte it sends); each connection is held until the client
/// closes it.
struct Counting {
    addr: std::net::SocketAddr,
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Counting {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn counting() -> Counting {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, m) = (now.clone(), max.clone());
    let task = tokio::spawn(async move {
        let mut seq = 0u8;
        while let Ok((mut s, _)) = listener.accept().await {
            let open = n.fetch_add(1, SeqCst) + 1;
            m.fetch_max(open, SeqCst);
            let n = n.clone();
            let number = seq;
            seq = seq.wrapping_add(1);
            tokio::spawn(async move {
                if s.write_all(&[number]).await.is_ok() {
                    let mut sink = [0u8; 64];
                    while matches!(s.read(&mut sink).await, Ok(k) if k > 0) {}
                }
                n.fetch_sub(1, SeqCst);
            });
        }
    });
    Counting {
        addr,
        now,
        max,
        task,
    }
}

/// Connects, and reads the backend's number once it is served.
async fn served(addr: std::net::SocketAddr) -> std::io::Result<(u8, TcpStream)> {
    let mut s = TcpStream::connect(addr).await?;
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await?;
    Ok((b[0], s))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_backend_never_holds_more_than_its_cap_and_the_queue_is_served_in_order() {
    let backend = counting().await;
    let cfg = BalancerConfig::new([BackendConfig::new(backend.addr).with_max_connections(3)])
        .queue(100, Duration::from_secs(20));
    let lb = Running::start(cfg).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(served(lb.addr).await.unwrap().1);
    }
    // Five more queue, one after the other.
    let mut waiting = Vec::new();
    for i in 0..5usize {
        let addr = lb.addr;
        waiting.push(tokio::spawn(async move { served(addr).await.unwrap() }));
        let handle = lb.handle.clone();
        wait_until("the client to queue", Duration::from_secs(10), || {
            handle.queued() == i + 1
        })
        .await;
    }
    assert_eq!(backend.now.load(SeqCst), 3);
    // Each connection that ends lets the next queued one in, in the order they came.
    let mut order = Vec::new();
    for w in waiting {
        drop(held.remove(0));
        let (number, s) = tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("a queued client was not served")
            .unwrap();
        order.push(number);
        held.push(s);
        assert!(backend.now.load(SeqCst) <= 3);
    }
    assert_eq!(order, [3, 4, 5, 6, 7], "served in the order they queued");
    assert_eq!(
        backend.max.load(SeqCst),
        3,
        "the backend never held more than 3"
    );
    assert_eq!(lb.handle.queued(), 0);
    drop(held);
    lb.wait_for("every count back to 0", |s| s[0].active == 0)
        .await;
    assert_eq!(lb.stop().await.forced, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_and_a_queue_timeout_close_the_client() {
    let backend = counting().await;
    let cfg = BalancerConfig::new([BackendConfig::new(backend.addr).with_max_connections(1)])
        .queue(1, Duration::from_millis(300));
    let lb = Running::start(cfg).await;
    let (_, held) = served(lb.addr).await.unwrap();
    // One may wait; it is closed at the timeout.
    let addr = lb.addr;
    let t0 = Instant::now();
    let first = tokio::spawn(async move { served(addr).await.map(|_| ()) });
    let handle = lb.handle.clone();
    wait_until("the client to queue", Duration::from_secs(10), || {
        handle.queued() == 1
    })
    .await;
    // A second finds the queue full: closed at once.
    let refused = tokio::time::timeout(Duration::from_millis(250), served(lb.addr))
        .await
        .expect("a client that finds the queue full is closed at once");
    assert!(refused.is_err(), "a client past the queue bound was served");
    let timed_out = first.await.unwrap();
    assert!(
        timed_out.is_err(),
        "the queued client was served past its cap"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(300),
        "closed before the queue timeout"
    );
    assert_eq!(backend.max.load(SeqCst), 1);
    drop(held);
    lb.wait_for("the held connection to end", |s| s[0].active == 0)
        .await;
    assert_eq!(lb.stop().await.forced, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_take_traffic_only_while_every_primary_is_down() {
    let bs = tagged(3).await;
    let cfg = BalancerConfig::new([
        BackendConfig::new(bs[0].addr),
        BackendConfig::new(bs[1].addr),
        BackendConfig::new(bs[2].addr).with_backup(true),
    ]);
    let lb = Running::start(cfg).await;
    for _ in 0..20 {
        assert_ne!(
            visit(&lb).await,
            2,
            "a backup took traffic while primaries were up"
        );
    }
    let (a, b) = (bs[0].addr.to_string(), bs[1].addr.to_string());
    lb.handle
        .set_admin_state(&a, ulb_tcp::AdminState::Maint)
        .unwrap();
    for _ in 0..10 {
        assert_eq!(visit(&lb).await, 1, "one primary is left");
    }
    lb.handle
        .set_admin_state(&b, ulb_tcp::AdminState::Maint)
        .unwrap();
    for _ in 0..10 {
        assert_eq!(visit(&lb).await, 2, "every primary is out: the backup");
    }
    lb.handle
        .set_admin_state(&a, ulb_tcp::AdminState::Ready)
        .unwrap();
    for _ in 0..10 {
        assert_eq!(visit(&lb).await, 0, "a primary is back: the backup stops");
    }
    assert_eq!(
        lb.handle.backend(&bs[2].addr.to_string()).unwrap().total,
        10
    );
    assert!(lb.handle.backend(&bs[2].addr.to_string()).unwrap().backup);
    lb.stop().await;
}

/// After its back-off, a black-holed backend is tried by exactly one connection (the others go to the
/// good backend at once), and judged again on that one alone: no herd pays the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backoff_ends_with_one_trial_not_a_herd() {
    let (_hole, _filler, hole) = common::blackhole();
    one_trial_after_the_backoff(hole).await;
}

/// The same with the black hole made by the kernel's firewall, as a real one is: in a network namespace
/// of its own (`unshare -n`, loopback only), a listening backend whose SYNs `iptables --syn -j DROP`
/// drops. The test runs itself again inside the namespace.
#[test]
fn a_backoff_ends_with_one_trial_through_an_iptables_black_hole() {
    const INNER: &str = "ULB_TEST_IN_NETNS";
    if std::env::var_os(INNER).is_some() {
        return in_the_namespace();
    }
    let have = |tool: &str| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !(root && have("unshare") && have("iptables") && have("ip")) {
        eprintln!("skipped: needs root, unshare, ip and iptables (CI installs them)");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("unshare")
        .arg("-n")
        .arg(exe)
        .args([
            "--exact",
            "a_backoff_ends_with_one_trial_through_an_iptables_black_hole",
            "--nocapture",
        ])
        .env(INNER, "1")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(
        out.status.success(),
        "the run in the namespace failed: {text}"
    );
    assert!(text.contains("1 passed"), "{text}");
}

/// Inside the namespace: loopback up, a listening backend, and the rule that drops its SYNs.
fn in_the_namespace() {
    let run = |cmd: &str, args: &[&str]| {
        let status = std::process::Command::new(cmd).args(args).status().unwrap();
        assert!(status.success(), "{cmd} {args:?}: {status}");
    };
    run("ip", &["link", "set", "lo", "up"]);
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hole.local_addr().unwrap();
    let port = addr.port().to_string();
    run(
        "iptables",
        &[
            "-A", "INPUT", "-p", "tcp", "--dport", &port, "--syn", "-j", "DROP",
        ],
    );
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(one_trial_after_the_backoff(addr));
    drop(hole);
}

/// A black hole at `hole` and a good backend: after the hole's back-off, one connection tries it, and no
/// other client pays its connect timeout.
async fn one_trial_after_the_backoff(hole: std::net::SocketAddr) {
    let good = Backend::echo().await;
    let cfg = BalancerConfig::new([BackendConfig::new(hole), BackendConfig::new(good.addr)])
        .connect_timeout(Duration::from_millis(500))
        .health(PassiveHealth::new(
            1,
            Duration::from_millis(300),
            Duration::from_secs(60),
        ));
    let lb = Running::start(cfg).await;
    let hole_id = hole.to_string();
    // The first connection to the hole times out and takes it down.
    let got = common::echo_roundtrip(lb.addr, Arc::new(b"x".to_vec()))
        .await
        .unwrap();
    assert_eq!(got, b"x");
    let handle = lb.handle.clone();
    assert!(!handle.backend(&hole_id).unwrap().up);
    assert_eq!(handle.backend(&hole_id).unwrap().connect_failures, 1);
    wait_until("the back-off to end", Duration::from_secs(5), || {
        handle.backend(&hole_id).is_some_and(|b| b.up)
    })
    .await;

    // 40 clients at once, right after the back-off: one tries the hole, the others never wait on it.
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..40u8 {
        let addr = lb.addr;
        clients.spawn(async move {
            let t0 = Instant::now();
            let got = common::echo_roundtrip(addr, Arc::new(vec![i; 100])).await;
            (got.map(|g| g == vec![i; 100]), t0.elapsed())
        });
    }
    let mut slow = 0;
    while let Some(done) = clients.join_next().await {
        let (ok, took) = done.unwrap();
        assert!(matches!(ok, Ok(true)), "a client failed");
        slow += usize::from(took >= Duration::from_millis(450));
    }
    eprintln!("{slow} of 40 clients paid the connect timeout");
    assert!(
        slow <= 1,
        "{slow} clients waited on the black hole's connect timeout"
    );
    let stats = lb.handle.backend(&hole_id).unwrap();
    assert_eq!(
        stats.connect_failures, 2,
        "exactly one trial after the back-off: {stats:?}"
    );
    assert!(!stats.up, "the failed trial takes it down again");
    assert!(
        stats.down_for.unwrap() > Duration::from_millis(300),
        "for a longer back-off"
    );
    lb.stop().await;
}

/// Every backend down, then one comes back: without active checks, the first connection after its
/// back-off reaches it (one trial), and every client after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_backend_was_down_traffic_flows_on_the_first_connection_after_the_backoff() {
    use socket2::{Domain, Socket, Type};
    // Two backends that are bound but do not listen yet: connects to them are refused.
    let dead: Vec<Socket> = (0..2)
        .map(|_| {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            s.bind(
                &"127.0.0.1:0"
                    .parse::<std::net::SocketAddr>()
                    .unwrap()
                    .into(),
            )
            .unwrap();
            s
        })
        .collect();
    let addrs: Vec<std::net::SocketAddr> = dead
        .iter()
        .map(|s| s.local_addr().unwrap().as_socket().unwrap())
        .collect();
    let backoff = Duration::from_millis(600);
    let cfg = BalancerConfig::new(addrs.iter().map(|&a| BackendConfig::new(a)))
        .health(PassiveHealth::new(1, backoff, Duration::from_secs(60)));
    let lb = Running::start(cfg).await;
    // A client finds both refusing: both go down, and the client is closed.
    assert!(common::echo_roundtrip(lb.addr, Arc::new(b"x".to_vec()))
        .await
        .is_err());
    lb.wait_for("both down", |s| s.iter().all(|b| !b.up)).await;
    let down_at = Instant::now();

    // One of them comes back.
    dead[0].listen(128).unwrap();
    dead[0].set_nonblocking(true).unwrap();
    let listener = TcpListener::from_std(dead[0].try_clone().unwrap().into()).unwrap();
    let _back = Backend::serve(listener, common::echo);
    let came_back = Instant::now();
    let first_ok = loop {
        if common::echo_roundtrip(lb.addr, Arc::new(b"y".to_vec()))
            .await
            .is_ok_and(|got| got == b"y")
        {
            break Instant::now();
        }
        assert!(
            came_back.elapsed() < Duration::from_secs(10),
            "traffic never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let waited = first_ok - down_at;
    eprintln!(
        "first success {:?} after the backend came back, {waited:?} after it went down",
        first_ok - came_back
    );
    assert!(
        waited < backoff + Duration::from_millis(400),
        "{waited:?}: traffic came back later than the first connection after the back-off"
    );
    for _ in 0..20 {
        let got = common::echo_roundtrip(lb.addr, Arc::new(b"z".to_vec()))
            .await
            .unwrap();
        assert_eq!(got, b"z");
    }
    lb.stop().await;
}

/// `OnDown::Cut` resets the connections open on a backend when it is marked down (HAProxy's
/// `on-marked-down shutdown-sessions`); `OnDown::Keep`, the default, lets them carry on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_down_cut_resets_the_open_connections_and_keep_leaves_them() {
    for on_down in [ulb_tcp::OnDown::Keep, ulb_tcp::OnDown::Cut] {
        // A backend whose listener goes away while the connection it accepted goes on.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (conn_tx, conn_rx) = tokio::sync::oneshot::channel();
        let accept = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let _ = conn_tx.send(tokio::spawn(common::echo(s)));
            std::future::pending::<()>().await
        });
        let cfg = BalancerConfig::new([BackendConfig::new(addr)])
            .on_down(on_down)
            .health(PassiveHealth::new(
                1,
                Duration::from_secs(30),
                Duration::from_secs(60),
            ));
        let lb = Running::start(cfg).await;
        let mut open = TcpStream::connect(lb.addr).await.unwrap();
        let _echo = conn_rx.await.unwrap();
        open.write_all(b"a").await.unwrap();
        let mut one = [0u8; 1];
        open.read_exact(&mut one).await.unwrap();
        // The listener closes: the next client's connect is refused, and the backend goes down.
        accept.abort();
        let _ = accept.await;
        // (The balancer resets that client at once; its connect may already see the reset.)
        let _refused = TcpStream::connect(lb.addr).await;
        lb.wait_for("the backend down", |s| !s[0].up).await;
        let after = async {
            open.write_all(b"b").await?;
            open.read_exact(&mut one).await
        };
        let result = tokio::time::timeout(Duration::from_secs(5), after)
            .await
            .unwrap();
        match on_down {
            ulb_tcp::OnDown::Cut => assert!(
                result.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
                "cut: the open connection is reset"
            ),
            _ => {
                result.unwrap();
                assert_eq!(&one, b"b", "keep: the open connection carries on");
            }
        }
        drop(open);
        lb.wait_for("no connection left", |s| s[0].active == 0)
            .await;
        lb.stop().await;
    }
}

/// Through the command: a full queue and a queue timeout are counted by reason, and the queue's length
/// and waits are published, on the admin port's /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_s_refusals_are_counted_by_reason() {
    let backend = counting().await;
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, admin) = (free(), free());
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Reap(
        std::process::Command::new(env!("CARGO_BIN_EXE_ulb-tcp"))
            .args([
                "--listen",
                &listen.to_string(),
                "--admin",
                &admin.to_string(),
            ])
            .args([
                "--backends",
                &backend.addr.to_string(),
                "--backend-max-connections",
                "1",
            ])
            .args(["--max-queue", "1", "--queue-timeout", "300ms"])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let metrics = move || async move {
        let mut s = TcpStream::connect(admin).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    let t0 = Instant::now();
    while metrics().await.is_none() || TcpStream::connect(listen).await.is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the balancer never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The readiness probes above went through the backend's one slot: wait until none holds it any more,
    // or the held client below could find it taken and queue.
    let idle = format!("ulb_connections_active{{backend=\"{}\"}} 0", backend.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics().await.unwrap_or_default().contains(&idle) {
        assert!(Instant::now() < deadline, "the probes never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, held) = served(listen).await.unwrap();
    // One waits and times out; one finds the queue full.
    let waiting = tokio::spawn(async move { served(listen).await.is_err() });
    let deadline = Instant::now() + Duration::from_secs(10);
    while !metrics()
        .await
        .unwrap_or_default()
        .contains("ulb_queue_length 1")
    {
        assert!(Instant::now() < deadline, "the client never queued");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        served(listen).await.is_err(),
        "past the queue bound: closed"
    );
    assert!(
        waiting.await.unwrap(),
        "the queued client is closed at the timeout"
    );
    let text = metrics().await.unwrap();
    let value = |series: &str| {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(
        value("ulb_connections_rejected_total{reason=\"queue_full\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value("ulb_connections_rejected_total{reason=\"queue_timeout\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(value("ulb_queue_length"), Some(0.0), "{text}");
    assert!(
        value("ulb_queue_wait_seconds_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    drop(held);
}
