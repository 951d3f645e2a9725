//! Runtime changes to the backends through real sockets: replace, add, remove with a drain, weights,
//! admin states, resets, events, and churn under load. Every count must survive every change.

mod common;

use std::io::ErrorKind;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{echo_roundtrip, fnv, pattern, wait_until, Backend, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use ulb_tcp::{
    AdminState, BackendConfig, BackendError, BackendEvent, BackendEvents, BalancerConfig, Strategy,
};

async fn tagged(n: u8) -> Vec<Backend> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(Backend::tagged(i).await);
    }
    v
}

fn backend(b: &Backend) -> BackendConfig {
    BackendConfig::new(b.addr)
}

fn id(b: &Backend) -> String {
    b.addr.to_string()
}

/// Active connections per backend, in the order of `bs`.
fn active(lb: &Running, bs: &[Backend]) -> Vec<usize> {
    bs.iter()
        .map(|b| lb.handle.backend(&id(b)).map_or(usize::MAX, |s| s.active))
        .collect()
}

/// The next event that is not `HealthChanged` (none expected here, but a slow machine may lag the stream).
async fn next_event(events: &mut BackendEvents) -> BackendEvent {
    let next = tokio::time::timeout(Duration::from_secs(10), events.recv()).await;
    match next {
        Ok(Some(Ok(e))) => e,
        other => panic!("no event: {other:?}"),
    }
}

/// Reads until the connection ends: `Ok(bytes)` on a clean EOF, the error otherwise.
async fn read_to_end(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.map(|_| got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_counts_survive_a_replace_and_the_new_backend_gets_the_next_connections()
{
    let bs = tagged(4).await;
    let cfg = BalancerConfig::new(bs[..3].iter().map(backend)).strategy(Strategy::LeastConnections);
    let lb = Running::start(cfg).await;
    let mut held = Vec::new();
    let mut seen = [0usize; 4];
    for _ in 0..30 {
        let (tag, s) = lb.tag().await;
        seen[tag as usize] += 1;
        held.push(s);
    }
    assert_eq!(seen, [10, 10, 10, 0], "30 held connections over 3 backends");
    assert_eq!(active(&lb, &bs[..3]), [10, 10, 10]);

    // A fourth backend joins, and the second one's weight goes to 2.
    let list = vec![
        backend(&bs[0]),
        backend(&bs[1]).with_weight(2),
        backend(&bs[2]),
        backend(&bs[3]),
    ];
    let (replaced, drain) = lb
        .handle
        .replace_backends(list, Duration::from_secs(5))
        .unwrap();
    let ids = |v: &[ulb_tcp::BackendId]| v.iter().map(|i| i.to_string()).collect::<Vec<_>>();
    assert_eq!(ids(&replaced.added), [id(&bs[3])]);
    assert_eq!(ids(&replaced.changed), [id(&bs[1])]);
    assert_eq!(ids(&replaced.unchanged), [id(&bs[0]), id(&bs[2])]);
    assert!(replaced.removed.is_empty());
    assert_eq!(drain.await.reset, 0, "nothing was removed");
    assert_eq!(
        active(&lb, &bs),
        [10, 10, 10, 0],
        "the counts are those from before the replace"
    );
    let stats = lb.handle.backend(&id(&bs[1])).unwrap();
    assert_eq!(
        (stats.weight, stats.effective_weight, stats.total),
        (2, 2.0, 10)
    );

    // Loads per weight are now 10, 5, 10 and 0: the next five go to the new backend.
    for i in 0..5 {
        let (tag, s) = lb.tag().await;
        assert_eq!(tag, 3, "connection {i} after the replace");
        held.push(s);
    }
    drop(held);
    lb.wait_for("every count back to 0", |s| s.iter().all(|b| b.active == 0))
        .await;
    assert_eq!(lb.stop().await.forced, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_keeps_its_position_through_an_unrelated_change() {
    let bs = tagged(4).await;
    let lb = Running::start(BalancerConfig::new(bs[..3].iter().map(backend))).await;
    let mut tags = Vec::new();
    for _ in 0..2 {
        tags.push(lb.tag().await.0);
    }
    assert_eq!(tags, [0, 1]);
    // A backend joins: the rotation goes on with the third, it does not start over at the first.
    lb.handle.add_backend(backend(&bs[3])).unwrap();
    let mut next = Vec::new();
    for _ in 0..4 {
        next.push(lb.tag().await.0);
    }
    assert_eq!(next, [2, 3, 0, 1]);
    // A weight changes elsewhere: the rotation still goes on from where it stood.
    lb.handle.set_weight(&id(&bs[0]), 1).unwrap(); // unchanged: no rebuild
    lb.handle.set_weight(&id(&bs[3]), 1).unwrap();
    assert_eq!(lb.tag().await.0, 2);
    // A duplicate id is refused and changes nothing.
    assert_eq!(
        lb.handle.add_backend(backend(&bs[0])),
        Err(BackendError::Duplicate(id(&bs[0])))
    );
    assert_eq!(lb.tag().await.0, 3);
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_backend_drains_an_inflight_transfer_byte_exact() {
    let (a, b) = (Backend::echo().await, Backend::echo().await);
    let lb = Running::start(BalancerConfig::new([backend(&a), backend(&b)])).await;

    // Round robin sends the first connection to `a`. Send the first half of 20 MiB through it, and remove
    // `a` while the second half is held back.
    let data = Arc::new(pattern(7, 20 << 20));
    let (go_on, hold) = tokio::sync::oneshot::channel::<()>();
    let s = TcpStream::connect(lb.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        let (first, second) = sent.split_at(sent.len() / 2);
        w.write_all(first).await?;
        let _ = hold.await;
        w.write_all(second).await?;
        w.shutdown().await
    });
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.map(|_| got)
    });
    let handle = lb.handle.clone();
    let half = data.len() as u64 / 2;
    wait_until(
        "the first half to be echoed",
        Duration::from_secs(10),
        || {
            handle
                .backend(&id(&a))
                .is_some_and(|s| s.bytes_to_client >= half)
        },
    )
    .await;
    let drain = tokio::spawn(
        lb.handle
            .remove_backend(&id(&a), Duration::from_secs(60))
            .unwrap(),
    );
    let stats = lb.handle.backend(&id(&a)).unwrap();
    assert!(stats.removing && stats.active == 1, "{stats:?}");
    assert_eq!(
        lb.handle.backends().len(),
        2,
        "the removed backend is listed until it has drained"
    );

    // No new connection reaches it.
    let before = a.accepted();
    for _ in 0..10 {
        let got = echo_roundtrip(lb.addr, Arc::new(b"ping".to_vec()))
            .await
            .unwrap();
        assert_eq!(got, b"ping");
    }
    assert_eq!(a.accepted(), before, "a removed backend got a connection");
    assert!(!drain.is_finished(), "the drain waits for the transfer");

    go_on.send(()).unwrap();
    writer.await.unwrap().unwrap();
    let got = reader.await.unwrap().unwrap();
    assert_eq!(
        (got.len(), fnv(&got)),
        (data.len(), fnv(&data)),
        "byte-exact"
    );
    let report = tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the drain resolves once the transfer has ended")
        .unwrap();
    assert_eq!(report.reset, 0);
    assert_eq!(report.ids, [ulb_tcp::BackendId::from(id(&a))]);
    assert!(
        lb.handle.backend(&id(&a)).is_none(),
        "forgotten once drained"
    );
    assert_eq!(lb.handle.backends().len(), 1);
    assert_eq!(lb.stop().await.forced, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_deadline_resets_the_connections_still_open() {
    let bs = tagged(2).await;
    let lb = Running::start(BalancerConfig::new(bs.iter().map(backend))).await;
    let (tag, mut open) = lb.tag().await;
    assert_eq!(tag, 0);
    let t0 = Instant::now();
    let report = lb
        .handle
        .remove_backend(&id(&bs[0]), Duration::from_millis(300))
        .unwrap()
        .await;
    assert!(t0.elapsed() >= Duration::from_millis(300), "{report:?}");
    assert_eq!(report.reset, 1);
    let end = read_to_end(&mut open).await;
    assert_eq!(
        end.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "a cut connection ends with a reset, never a clean EOF"
    );
    // The other backend is untouched.
    assert_eq!(lb.tag().await.0, 1);
    assert_eq!(
        lb.handle.remove_backend(&id(&bs[0]), Duration::ZERO).err(),
        Some(BackendError::NotFound(id(&bs[0])))
    );
    lb.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maint_takes_a_backend_out_and_reset_ends_its_connections() {
    let bs = tagged(2).await;
    let lb = Running::start(BalancerConfig::new(bs.iter().map(backend))).await;
    let (tag, mut open) = lb.tag().await;
    assert_eq!(tag, 0);
    let first = id(&bs[0]);
    assert_eq!(
        lb.handle.set_admin_state(&first, AdminState::Maint),
        Ok(AdminState::Ready)
    );
    for _ in 0..6 {
        assert_eq!(
            lb.tag().await.0,
            1,
            "a backend in maintenance got a connection"
        );
    }
    // Its open connection still works until it is reset.
    open.write_all(b"x").await.unwrap();
    let mut one = [0u8; 1];
    open.read_exact(&mut one).await.unwrap();
    assert_eq!(lb.handle.reset_connections(&first), Ok(1));
    assert_eq!(
        read_to_end(&mut open).await.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset)
    );
    lb.wait_for("the reset connection to be gone", |s| s[0].active == 0)
        .await;
    // Back to ready: it takes connections again, and later ones are not reset.
    lb.handle
        .set_admin_state(&first, AdminState::Ready)
        .unwrap();
    let mut tags = [0usize; 2];
    let mut held = Vec::new();
    for _ in 0..4 {
        let (tag, s) = lb.tag().await;
        tags[tag as usize] += 1;
        held.push(s);
    }
    assert_eq!(tags, [2, 2]);
    for s in &mut held {
        s.write_all(b"y").await.unwrap();
        s.read_exact(&mut one).await.unwrap();
        assert_eq!(&one, b"y");
    }
    drop(held);
    assert_eq!(lb.stop().await.forced, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_tells_every_change() {
    let bs = tagged(2).await;
    let lb = Running::start(BalancerConfig::new([backend(&bs[0])])).await;
    let mut events = lb.handle.events();
    let (a, b) = (id(&bs[0]), id(&bs[1]));
    // `a`, alone, takes a connection.
    let (tag, open) = lb.tag().await;
    assert_eq!(tag, 0);

    lb.handle
        .add_backend(backend(&bs[1]).with_weight(3))
        .unwrap();
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::Added {
            id: b.as_str().into(),
            addr: bs[1].addr,
            weight: 3
        }
    );
    lb.handle.set_weight(&b, 2).unwrap();
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::WeightChanged {
            id: b.as_str().into(),
            from: 3,
            to: 2
        }
    );
    // `a` is drained, and tells when its last connection has ended.
    lb.handle.set_admin_state(&a, AdminState::Drain).unwrap();
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::AdminChanged {
            id: a.as_str().into(),
            from: AdminState::Ready,
            to: AdminState::Drain
        }
    );
    drop(open);
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::Drained {
            id: a.as_str().into()
        }
    );
    let drain = lb
        .handle
        .remove_backend(&b, Duration::from_secs(1))
        .unwrap();
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::Removed {
            id: b.as_str().into()
        }
    );
    assert_eq!(
        next_event(&mut events).await,
        BackendEvent::Drained {
            id: b.as_str().into()
        },
        "removed with no connection open: drained at once"
    );
    let report = drain.await;
    assert_eq!(report.reset, 0, "{report:?} {:?}", lb.handle.backends());
    lb.stop().await;
}

/// A task adds, removes and re-weights backends a thousand times a second while 50 clients run echo
/// exchanges: no client sees a failure, and every count returns to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_under_load_loses_no_client_and_no_count() {
    let mut pool = Vec::new();
    for _ in 0..8 {
        pool.push(Backend::echo().await);
    }
    // The first three stay; the other five come and go.
    let lb = Running::start(
        BalancerConfig::new(pool[..3].iter().map(backend)).strategy(Strategy::LeastConnections),
    )
    .await;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (exchanges, failures) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = tokio::task::JoinSet::new();
    for c in 0..50u64 {
        let (addr, done) = (lb.addr, done.clone());
        let (exchanges, failures) = (exchanges.clone(), failures.clone());
        clients.spawn(async move {
            let msg = Arc::new(pattern(c, 1024 + c as usize * 37));
            while !done.load(SeqCst) {
                match echo_roundtrip(addr, msg.clone()).await {
                    Ok(got) if got == *msg => exchanges.fetch_add(1, SeqCst),
                    other => {
                        let got = other.map(|g| g.len());
                        eprintln!("client {c}: {got:?} instead of {} bytes echoed", msg.len());
                        failures.fetch_add(1, SeqCst)
                    }
                };
            }
        });
    }

    let handle = lb.handle.clone();
    let extra: Vec<BackendConfig> = pool[3..].iter().map(backend).collect();
    let stable: Vec<String> = pool[..3].iter().map(id).collect();
    let churn = tokio::spawn(async move {
        let mut drains = tokio::task::JoinSet::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(10));
        let (mut ops, mut step) = (0usize, 0usize);
        let started = Instant::now();
        while ops < 3000 {
            ticker.tick().await;
            for _ in 0..10 {
                step += 1;
                let e = &extra[step % extra.len()];
                let result = match step % 4 {
                    0 | 1 => match handle.add_backend(e.clone()) {
                        Err(BackendError::Duplicate(_)) => {
                            let drain = handle.remove_backend(&e.id, Duration::from_secs(30));
                            drains.spawn(drain.unwrap());
                            Ok(())
                        }
                        other => other,
                    },
                    2 => handle
                        .set_weight(&stable[step % 3], 1 + (step % 5) as u32)
                        .map(drop),
                    _ => match handle.set_weight(&e.id, 1 + (step % 7) as u32) {
                        Err(BackendError::NotFound(_)) => Ok(()),
                        other => other.map(drop),
                    },
                };
                result.expect("a change was refused");
                ops += 1;
            }
        }
        let elapsed = started.elapsed();
        let mut reset = 0;
        while let Some(report) = drains.join_next().await {
            reset += report.unwrap().reset;
        }
        (ops, elapsed, reset)
    });
    let (ops, elapsed, reset) = churn.await.unwrap();
    done.store(true, SeqCst);
    while clients.join_next().await.is_some() {}

    let (n, failed) = (exchanges.load(SeqCst), failures.load(SeqCst));
    eprintln!("{ops} changes in {elapsed:?}; {n} exchanges by 50 clients meanwhile");
    assert!(n >= 50, "the clients made only {n} exchanges");
    assert_eq!(failed, 0, "client failures during the churn");
    assert_eq!(reset, 0, "no drain needed its deadline");
    lb.wait_for("every count back to 0", |s| s.iter().all(|b| b.active == 0))
        .await;
    let total: u64 = lb.handle.backends().iter().map(|b| b.total).sum();
    assert!(total > 0);
    let handle = lb.handle.clone();
    wait_until(
        "every connection task to end",
        Duration::from_secs(10),
        || handle.active_connections() == 0,
    )
    .await;
    assert_eq!(lb.stop().await.forced, 0);
}
