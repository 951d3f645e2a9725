//! `--defer-accept` (Linux `TCP_DEFER_ACCEPT`): a client that has connected but sent nothing is not
//! carried (no backend connection is opened for it) until its first bytes arrive; with it off, it is.
#![cfg(target_os = "linux")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{wait_until, Backend, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ulb_tcp::{BackendConfig, BalancerConfig, TcpBalancer};

/// Long enough that the deferral never expires while a test runs.
const DEFER: Duration = Duration::from_secs(30);

async fn exchange(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .expect("no echo within 10 s")
        .unwrap();
    assert_eq!(got, msg);
}

/// With the deferral on: a silent client and a speaking one connect; once the speaking one has had its
/// echo, the backend has seen exactly one connection. The silent one is carried as soon as it speaks.
async fn silent_client_waits(balancer: &Running, backend: &Backend) {
    // The option is set when the balancer starts accepting; a client queued before that is not deferred.
    let handle = balancer.handle.clone();
    wait_until("the balancer accepting", Duration::from_secs(10), || {
        !handle.listen_addrs().is_empty()
    })
    .await;
    let mut silent = TcpStream::connect(balancer.addr).await.unwrap();
    let mut speaking = TcpStream::connect(balancer.addr).await.unwrap();
    exchange(&mut speaking, b"first").await;
    assert_eq!(
        backend.accepted(),
        1,
        "the silent client reached the backend"
    );
    assert_eq!(balancer.handle.backends()[0].total, 1);
    exchange(&mut silent, b"late but carried").await;
    assert_eq!(backend.accepted(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_client_is_not_carried_until_it_speaks() {
    let backend = Backend::echo().await;
    let config = BalancerConfig::new([BackendConfig::new(backend.addr)]).defer_accept(DEFER);
    let balancer = Running::start(config.clone()).await;
    silent_client_waits(&balancer, &backend).await;
    let report = balancer.stop().await;
    assert_eq!(report.forced, 0, "{report:?}");

    let backend = Backend::echo().await;
    let config = BalancerConfig::new([BackendConfig::new(backend.addr)]).defer_accept(DEFER);
    let balancer = Running::start_per_core(config, 2).await;
    silent_client_waits(&balancer, &backend).await;
    let report = balancer.stop().await;
    assert_eq!(report.forced, 0, "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_deferral_a_silent_client_is_carried_at_once() {
    let backend = Backend::echo().await;
    let balancer = Running::start(BalancerConfig::new([BackendConfig::new(backend.addr)])).await;
    let silent = TcpStream::connect(balancer.addr).await.unwrap();
    wait_until(
        "the silent client's backend connection",
        Duration::from_secs(10),
        || backend.accepted() == 1,
    )
    .await;
    drop(silent);
    balancer.stop().await;
}

/// A listener handed from a balancer with the deferral to one without (a reload that turns it off)
/// loses the deferral: the option is set, to 0 too, whenever a balancer starts accepting on a listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_handed_over_takes_the_new_balancers_setting() {
    let backend = Backend::echo().await;
    let listener = Arc::new(ulb_tcp::bind("127.0.0.1:0".parse().unwrap()).unwrap());
    let addr = listener.local_addr().unwrap();
    let config = BalancerConfig::new([BackendConfig::new(backend.addr)]);

    let deferring = TcpBalancer::new(config.clone().defer_accept(DEFER)).unwrap();
    let (handle, stop) = (
        deferring.handle(),
        tokio_util::sync::CancellationToken::new(),
    );
    let stopped = stop.clone();
    let first = tokio::spawn(deferring.run(async move { stopped.cancelled().await }));
    let listening = handle.accept_on(listener.clone()).unwrap();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    let mut speaking = TcpStream::connect(addr).await.unwrap();
    exchange(&mut speaking, b"first").await;
    assert_eq!(
        backend.accepted(),
        1,
        "the silent client reached the backend"
    );
    listening.close().await;

    let plain = TcpBalancer::new(config).unwrap();
    let handle2 = plain.handle();
    let second = tokio::spawn(plain.run(std::future::pending()));
    let _listening = handle2.accept_on(listener.clone()).unwrap();
    let silent2 = TcpStream::connect(addr).await.unwrap();
    wait_until(
        "the new silent client's backend connection",
        Duration::from_secs(10),
        || backend.accepted() == 2,
    )
    .await;
    // The client that connected under the deferral is still carried once it speaks.
    exchange(&mut silent, b"late").await;
    assert_eq!(backend.accepted(), 3);

    drop((silent, silent2, speaking));
    stop.cancel();
    handle2.shutdown();
    for task in [first, second] {
        tokio::time::timeout(Duration::from_secs(40), task)
            .await
            .unwrap()
            .unwrap();
    }
}
