//! Allow and deny lists and per-source limits, on real sockets over loopback: clients bind 127.0.0.2 or
//! 127.0.0.3 (or ::1) before connecting, so that the balancer sees different sources. Each refusal is read
//! back from `ulb_connections_rejected_total{reason}` through the Prometheus recorder installed here.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{Backend, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use ulb_tcp::edge::{AcceptProxy, IpNet, NetSet};
use ulb_tcp::{BackendConfig, BalancerConfig, TcpBalancer};

/// The counters are process-wide: the tests that read them run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static RECORDER: OnceLock<metrics_exporter_prometheus::PrometheusHandle> = OnceLock::new();

fn recorder() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    RECORDER.get_or_init(|| ulb_tcp::metrics::install_prometheus().unwrap())
}

/// `ulb_connections_rejected_total{reason="…"}` now.
fn rejected(reason: &str) -> f64 {
    let needle = format!("ulb_connections_rejected_total{{reason=\"{reason}\"}} ");
    recorder()
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(|v| v.trim().parse().unwrap()))
        .unwrap_or(0.0)
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

async fn start(config: BalancerConfig) -> (Running, Backend) {
    recorder();
    let backend = Backend::echo().await;
    let mut config = config;
    config.backends = vec![BackendConfig::new(backend.addr)];
    (Running::start(config).await, backend)
}

fn config() -> BalancerConfig {
    BalancerConfig::new([BackendConfig::new("127.0.0.1:1".parse().unwrap())])
}

/// Connects from `from` (bound first, port 0).
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).await.unwrap()
}

/// True when `s` is carried: a ping comes back through the echo backend; false when the balancer
/// closes or resets it.
async fn pings(s: &mut TcpStream) -> bool {
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) => &buf == b"ping",
        Ok(Err(_)) => false,
        Err(_) => panic!("neither carried nor closed within 5 s"),
    }
}

/// Connects from `from` and says whether the connection is carried (then closed). A refused client may
/// see its reset already in the connect.
async fn carried(from: IpAddr, to: SocketAddr) -> bool {
    let socket = match from {
        IpAddr::V4(_) => TcpSocket::new_v4(),
        IpAddr::V6(_) => TcpSocket::new_v6(),
    }
    .unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    match socket.connect(to).await {
        Ok(mut s) => pings(&mut s).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
        Err(e) => panic!("connect from {from}: {e}"),
    }
}

/// Retries `carried` until it holds, for at most 5 s.
async fn carried_within(from: IpAddr, to: SocketAddr) -> bool {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if carried(from, to).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

const A: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const B: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

#[tokio::test]
async fn the_deny_list_refuses_127_0_0_3_and_lets_127_0_0_2_in() {
    let _serial = SERIAL.lock().await;
    let (lb, _backend) = start(config().deny(nets(&["127.0.0.3/32"]))).await;
    let before = rejected("acl");
    assert!(carried(A, lb.addr).await);
    assert!(!carried(B, lb.addr).await);
    assert!(!carried(B, lb.addr).await);
    assert_eq!(rejected("acl") - before, 2.0);
    lb.stop().await;
}

#[tokio::test]
async fn an_allow_list_refuses_the_rest_and_deny_wins_over_it() {
    let _serial = SERIAL.lock().await;
    let (lb, _backend) = start(
        config()
            .allow(nets(&["127.0.0.0/24"]))
            .deny(nets(&["127.0.0.3/32"])),
    )
    .await;
    let before = rejected("acl");
    assert!(carried(A, lb.addr).await);
    assert!(!carried(B, lb.addr).await, "denied although allowed");
    // 127.0.1.2 is on loopback too, but not in the allow list.
    assert!(!carried("127.0.1.2".parse().unwrap(), lb.addr).await);
    assert_eq!(rejected("acl") - before, 2.0);
    lb.stop().await;
}

#[tokio::test]
async fn ipv6_loopback_is_matched() {
    let _serial = SERIAL.lock().await;
    recorder();
    let backend = Backend::echo().await;
    let start_v6 = |config: BalancerConfig| {
        let balancer = TcpBalancer::new(config).unwrap();
        let handle = balancer.handle();
        let listener = ulb_tcp::bind("[::1]:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(balancer.serve(listener, std::future::pending()));
        Running { addr, handle, task }
    };
    let b = || BalancerConfig::new([BackendConfig::new(backend.addr)]);
    let v6: IpAddr = "::1".parse().unwrap();
    let before = rejected("acl");
    let denied = start_v6(b().deny(nets(&["::1/128"])));
    assert!(!carried(v6, denied.addr).await);
    denied.stop().await;
    let allowed = start_v6(b().allow(nets(&["::/127", "10.0.0.0/8"])));
    assert!(carried(v6, allowed.addr).await);
    allowed.stop().await;
    let other = start_v6(b().allow(nets(&["2001:db8::/32", "127.0.0.0/8"])));
    assert!(!carried(v6, other.addr).await);
    other.stop().await;
    assert_eq!(rejected("acl") - before, 2.0);
}

/// 5,000 networks of every prefix length from /8 to /32, in 10.0.0.0/8 and 2001:db8::/32, plus the
/// loopback rules: the balancer's lists still match exactly, and so does the set against a linear scan.
#[tokio::test]
async fn lists_of_5000_entries_match_correctly() {
    let _serial = SERIAL.lock().await;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut deny: Vec<IpNet> = (0..4999)
        .map(|i| {
            let r = next();
            if i % 2 == 0 {
                let len = 8 + (r % 25) as u8;
                let addr = Ipv4Addr::from(0x0a00_0000 | (r >> 32) as u32 & 0x00ff_ffff);
                IpNet::new(addr.into(), len).unwrap().trunc()
            } else {
                let len = 32 + (r % 97) as u8;
                let addr = std::net::Ipv6Addr::from(
                    (0x2001_0db8u128 << 96) | (u128::from(r) << 32) | u128::from(next() as u32),
                );
                IpNet::new(addr.into(), len).unwrap().trunc()
            }
        })
        .collect();
    deny.push("127.0.0.3/32".parse().unwrap());
    let set = NetSet::new(&deny);
    for _ in 0..20_000 {
        let r = next();
        let ip: IpAddr = if r % 2 == 0 {
            Ipv4Addr::from(0x0a00_0000 | (r >> 32) as u32 & 0x00ff_ffff).into()
        } else {
            std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) | u128::from(next())).into()
        };
        let linear = deny.iter().any(|n| n.contains(&ip));
        assert_eq!(set.contains(ip), linear, "{ip}");
        if let IpAddr::V4(v4) = ip {
            assert_eq!(
                set.contains(v4.to_ipv6_mapped().into()),
                linear,
                "{ip} mapped"
            );
        }
    }

    let mut allow = deny.clone();
    allow.push("127.0.0.2/32".parse().unwrap());
    let (lb, _backend) = start(config().allow(allow).deny(deny)).await;
    let before = rejected("acl");
    assert!(carried(A, lb.addr).await);
    assert!(!carried(B, lb.addr).await);
    assert!(!carried("127.0.0.4".parse().unwrap(), lb.addr).await);
    assert_eq!(rejected("acl") - before, 2.0);
    lb.stop().await;
}

#[tokio::test]
async fn the_per_source_cap_holds_at_n_while_another_source_gets_in() {
    let _serial = SERIAL.lock().await;
    const N: usize = 3;
    let (lb, _backend) = start(config().max_connections_per_ip(N as u32)).await;
    let before = rejected("per_ip_limit");
    let mut held = Vec::new();
    for _ in 0..N {
        let mut s = connect_from(A, lb.addr).await;
        assert!(pings(&mut s).await);
        held.push(s);
    }
    assert!(!carried(A, lb.addr).await, "source A is at its cap");
    assert!(!carried(A, lb.addr).await);
    assert_eq!(rejected("per_ip_limit") - before, 2.0);
    // Source B is not.
    let mut others = Vec::new();
    for _ in 0..N {
        let mut s = connect_from(B, lb.addr).await;
        assert!(pings(&mut s).await);
        others.push(s);
    }
    // A's count is released when one of its connections ends.
    drop(held.pop());
    assert!(carried_within(A, lb.addr).await);
    drop(held);
    drop(others);
    lb.stop().await;
}

#[tokio::test]
async fn the_per_source_rate_bursts_refuses_then_refills() {
    let _serial = SERIAL.lock().await;
    const RATE: u32 = 5;
    let (lb, _backend) = start(config().rate_per_ip(RATE)).await;
    let before = rejected("rate_limit");
    let started = Instant::now();
    let mut ok = 0;
    for _ in 0..RATE {
        ok += usize::from(carried(A, lb.addr).await);
    }
    assert_eq!(ok, RATE as usize, "the burst");
    // Within the 200 ms a token takes to come back, the next is refused (unless this was slow).
    let refused = !carried(A, lb.addr).await;
    if started.elapsed() < Duration::from_millis(150) {
        assert!(refused, "a sixth connection within the burst's second");
        assert_eq!(rejected("rate_limit") - before, 1.0);
    }
    // Another source has its own bucket.
    assert!(carried(B, lb.addr).await);
    // A's bucket refills.
    assert!(carried_within(A, lb.addr).await);
    lb.stop().await;
}

/// The ACL and the limits see the address of an accepted PROXY header, not the proxy's.
#[tokio::test]
async fn the_proxy_headers_address_is_the_one_checked() {
    let _serial = SERIAL.lock().await;
    let (lb, _backend) = start(
        config()
            .accept_proxy(AcceptProxy::new(nets(&["127.0.0.1/32"])))
            .deny(nets(&["10.0.0.0/8"]))
            .max_connections_per_ip(1),
    )
    .await;
    let from = |src: &str| format!("PROXY TCP4 {src} 127.0.0.1 40000 80\r\n");
    let acl = rejected("acl");
    let capped = rejected("per_ip_limit");
    let local: IpAddr = Ipv4Addr::LOCALHOST.into();
    let mut denied = connect_from(local, lb.addr).await;
    denied.write_all(from("10.1.2.3").as_bytes()).await.unwrap();
    assert!(!pings(&mut denied).await, "10.1.2.3 is denied");
    let mut first = connect_from(local, lb.addr).await;
    first.write_all(from("192.0.2.1").as_bytes()).await.unwrap();
    assert!(pings(&mut first).await);
    // The proxy itself (127.0.0.1) holds one connection now, but the cap is per client of the header.
    let mut second = connect_from(local, lb.addr).await;
    second
        .write_all(from("192.0.2.2").as_bytes())
        .await
        .unwrap();
    assert!(pings(&mut second).await);
    let mut third = connect_from(local, lb.addr).await;
    third.write_all(from("192.0.2.1").as_bytes()).await.unwrap();
    assert!(!pings(&mut third).await, "192.0.2.1 is at its cap of 1");
    assert_eq!(rejected("acl") - acl, 1.0);
    assert_eq!(rejected("per_ip_limit") - capped, 1.0);
    drop((first, second));
    lb.stop().await;
}

/// The rate limit holds within ±20% over 3 s: a source that tries far faster than its rate gets its
/// burst and then its rate, no more and not much less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_source_rate_holds_within_20_percent_over_3_s() {
    let _serial = SERIAL.lock().await;
    const RATE: u32 = 20;
    let (lb, _backend) = start(config().rate_per_ip(RATE)).await;
    let window = Duration::from_secs(3);
    let started = Instant::now();
    let (mut tried, mut ok) = (0u32, 0u32);
    while started.elapsed() < window {
        tried += 1;
        ok += u32::from(carried(A, lb.addr).await);
        tokio::time::sleep(Duration::from_millis(5)).await; // paces the attempts: about 150 a second
    }
    let elapsed = started.elapsed().as_secs_f64();
    let expected = f64::from(RATE) * elapsed + f64::from(RATE); // the rate, plus the burst
    eprintln!("{ok} of {tried} carried in {elapsed:.2} s; {expected:.0} expected");
    assert!(
        tried as f64 > 2.0 * expected,
        "the client did not try fast enough: {tried}"
    );
    assert!(
        (f64::from(ok) - expected).abs() <= 0.2 * expected,
        "{ok} carried, {expected:.0} expected"
    );
    lb.stop().await;
}

/// A spray from thousands of distinct 127.x.y.z sources through real sockets: every source is carried
/// once and tracked, and the table stays within its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spray_from_thousands_of_sources_stays_within_the_bound() {
    let _serial = SERIAL.lock().await;
    let (lb, _backend) = start(config().rate_per_ip(100).max_connections_per_ip(10)).await;
    const SOURCES: u32 = 3000;
    for i in 0..SOURCES {
        let from = IpAddr::V4(Ipv4Addr::new(
            127,
            1 + (i / 65_536) as u8,
            (i / 256) as u8,
            i as u8,
        ));
        assert!(carried(from, lb.addr).await, "source {from}");
    }
    let tracked = lb.handle.tracked_sources();
    eprintln!("{tracked} sources tracked after {SOURCES}");
    assert!(tracked <= ulb_tcp::edge::limits::MAX_SOURCES, "{tracked}");
    assert!(
        (SOURCES as usize / 2..=SOURCES as usize).contains(&tracked),
        "each source is tracked, none twice: {tracked}"
    );
    lb.stop().await;
}
