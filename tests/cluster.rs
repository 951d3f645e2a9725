//! The cluster supervisor with real worker processes (small Python servers): identity, restarts with
//! back-off, crash loops, rolling restarts under load, signals to the supervisor, bad input.
#![cfg(target_os = "linux")]

use std::collections::{BTreeSet, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use ulb_tcp::cluster::{
    Cluster, ClusterConfig, ClusterHandle, ReadyCheck, WorkerCommand, WorkerState,
};

const BIN: &str = env!("CARGO_BIN_EXE_ulb-tcp");

/// A worker: listens on 127.0.0.1:$PORT and answers every connection with one header line
/// (`id pid env-port cluster-size argv-id argv-port`) and `argv[3]` bytes of `x`, then closes.
const WORKER: &str = r#"
import os, socket, sys, threading
port = int(os.environ["PORT"])
hdr = " ".join([os.environ["ULB_WORKER_ID"], str(os.getpid()), os.environ["ULB_WORKER_PORT"],
                os.environ["ULB_CLUSTER_SIZE"], sys.argv[1], sys.argv[2]]) + "\n"
msg = hdr.encode() + b"x" * int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(128)
print("listening on", port, file=sys.stderr, flush=True)
def serve(c):
    try:
        c.sendall(msg)
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// The real Python interpreter (not a version-manager shim), for fast starts.
fn python() -> String {
    static PY: OnceLock<String> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys; print(sys.executable)"])
            .output()
            .expect("python3 is needed for these tests");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
    .clone()
}

fn worker_args(body: usize) -> Vec<String> {
    vec![
        "-c".into(),
        WORKER.into(),
        "{id}".into(),
        "{port}".into(),
        body.to_string(),
    ]
}

fn worker_command(body: usize) -> WorkerCommand {
    WorkerCommand::new(python()).args(worker_args(body))
}

/// `n` consecutive free ports on 127.0.0.1, below the ephemeral range (so that client sockets of the
/// tests never take a worker's port between two of its lives).
fn free_ports(n: u16) -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 500) as u16 * 20,
        SeqCst,
        SeqCst,
    );
    loop {
        let base = NEXT.fetch_add(n + 1, SeqCst);
        assert!(base < 32_000, "no free port range found");
        let held: Result<Vec<_>, _> = (base..base + n)
            .map(|p| std::net::TcpListener::bind(("127.0.0.1", p)))
            .collect();
        if held.is_ok() {
            return base;
        }
    }
}

fn port_is_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// One answer from a worker.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    id: usize,
    pid: u32,
    env_port: u16,
    size: usize,
    arg_id: usize,
    arg_port: u16,
}

/// Connects, reads to the end, checks the body's length; `Err` says what went wrong.
async fn fetch(addr: SocketAddr, body: usize) -> Result<Reply, String> {
    let io = async {
        let mut s = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)
            .await
            .map_err(|e| format!("read after {} bytes: {e}", buf.len()))?;
        Ok::<_, String>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| "timed out".to_string())??;
    let nl = buf
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| format!("no header in {} bytes", buf.len()))?;
    let header = String::from_utf8_lossy(&buf[..nl]).to_string();
    let rest = &buf[nl + 1..];
    if rest.len() != body || rest.iter().any(|&b| b != b'x') {
        return Err(format!("truncated: {} of {body} bytes", rest.len()));
    }
    let f: Vec<&str> = header.split(' ').collect();
    let p = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or(header.clone())
    };
    Ok(Reply {
        id: p(0)? as usize,
        pid: p(1)? as u32,
        env_port: p(2)? as u16,
        size: p(3)? as usize,
        arg_id: p(4)? as usize,
        arg_port: p(5)? as u16,
    })
}

async fn fetch_until(addr: SocketAddr, body: usize, limit: Duration) -> Reply {
    let start = Instant::now();
    loop {
        match fetch(addr, body).await {
            Ok(r) => return r,
            Err(e) if start.elapsed() > limit => panic!("{addr} never answered: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Polls the balancer's view of one backend until `f` holds (or 10 s pass, then panics naming `what`).
async fn wait_for_backend(
    b: &ulb_tcp::BalancerHandle,
    addr: SocketAddr,
    what: &str,
    f: impl Fn(&ulb_tcp::BackendStats) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !b.backend(&addr.to_string()).is_some_and(|s| f(&s)) {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_for(
    handle: &ClusterHandle,
    limit: Duration,
    what: &str,
    f: impl FnMut(&[ulb_tcp::cluster::WorkerStatus]) -> bool,
) {
    if tokio::time::timeout(limit, handle.wait_for(f))
        .await
        .is_err()
    {
        panic!("timed out waiting for {what}: {:?}", handle.workers());
    }
}

fn all_running(w: &[ulb_tcp::cluster::WorkerStatus]) -> bool {
    w.iter().all(|w| w.state == WorkerState::Running)
}

/// Starts `config` running `worker_command(body)` and waits until every worker runs.
async fn start_running(
    config: ClusterConfig,
    body: usize,
) -> (
    ClusterHandle,
    tokio::task::JoinHandle<Result<(), ulb_tcp::cluster::ClusterError>>,
) {
    start_running_command(config, worker_command(body)).await
}

/// Starts `config` running `command` and waits until every worker runs.
async fn start_running_command(
    config: ClusterConfig,
    command: WorkerCommand,
) -> (
    ClusterHandle,
    tokio::task::JoinHandle<Result<(), ulb_tcp::cluster::ClusterError>>,
) {
    let cluster = Cluster::new(config, command).unwrap();
    let handle = cluster.handle();
    let run = tokio::spawn(cluster.run(std::future::pending()));
    wait_for(
        &handle,
        Duration::from_secs(10),
        "every worker running",
        all_running,
    )
    .await;
    (handle, run)
}

/// A steady client load through `addr`: `clients` loops of connect, read all, check.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<(Instant, String)>>>,
    pids: Arc<Mutex<HashSet<u32>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: usize, body: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let pids = Arc::new(Mutex::new(HashSet::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, ok, failures, pids) =
                    (stop.clone(), ok.clone(), failures.clone(), pids.clone());
                tokio::spawn(async move {
                    while !stop.load(SeqCst) {
                        let began = Instant::now();
                        match fetch(addr, body).await {
                            Ok(r) => {
                                ok.fetch_add(1, SeqCst);
                                pids.lock().unwrap().insert(r.pid);
                            }
                            Err(e) => failures.lock().unwrap().push((began, e)),
                        }
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            pids,
            tasks,
        }
    }

    /// Successes, failures (with the instant each connection began) and the worker pids that answered.
    async fn finish(self) -> (usize, Vec<(Instant, String)>, HashSet<u32>) {
        self.stop.store(true, SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        let pids = self.pids.lock().unwrap().clone();
        (self.ok.load(SeqCst), failures, pids)
    }
}

fn alive(pid: u32) -> bool {
    // A zombie that init has not reaped yet is not alive: it holds no port and runs no code.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 2..].chars().next())
            .is_some_and(|state| state != 'Z'),
        Err(_) => false,
    }
}

/// Kills stray workers (grandchildren of the test) if a test fails half-way.
struct KillPids(Vec<u32>);

impl Drop for KillPids {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if alive(pid) {
                // SAFETY: kill(2) with plain integers.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The library

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_get_their_identity_and_all_take_connections() {
    let base = free_ports(3);
    let config = ClusterConfig::new()
        .processes(3)
        .base_port(base)
        .balancer("127.0.0.1:0".parse().unwrap());
    let (handle, run) = start_running(config, 16).await;
    let pids: Vec<u32> = handle.workers().iter().map(|w| w.pid.unwrap()).collect();
    let _guard = KillPids(pids.clone());
    let addr = handle.balancer_addr().unwrap();

    let mut seen = BTreeSet::new();
    for _ in 0..30 {
        let r = fetch(addr, 16).await.unwrap();
        assert!(r.id < 3, "{r:?}");
        assert_eq!(r.env_port, base + r.id as u16, "{r:?}");
        assert_eq!((r.arg_id, r.arg_port), (r.id, r.env_port), "{r:?}");
        assert_eq!(r.size, 3);
        assert_eq!(r.pid, pids[r.id]);
        seen.insert(r.id);
    }
    assert_eq!(seen, BTreeSet::from([0, 1, 2]));
    let b = handle.balancer().unwrap();
    assert!(
        b.backends()
            .iter()
            .all(|b| b.admin == ulb_tcp::AdminState::Ready && b.total >= 5),
        "{:?}",
        b.backends()
    );

    let t = Instant::now();
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("shutdown hung")
        .unwrap()
        .unwrap();
    eprintln!("shutdown took {:?}", t.elapsed());
    for pid in pids {
        // We are their parent: a worker that was not reaped would still be listed, as a zombie.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "worker {pid} still exists (zombie?)"
        );
    }
    assert!((base..base + 3).all(port_is_free));
    assert!(handle
        .workers()
        .iter()
        .all(|w| w.state == WorkerState::Stopped));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_under_load_costs_clients_nothing() {
    let base = free_ports(3);
    let config = ClusterConfig::new()
        .processes(3)
        .base_port(base)
        .balancer("127.0.0.1:0".parse().unwrap());
    let (handle, run) = start_running(config, 1024).await;
    let victim = handle.workers()[1].clone();
    let old_pid = victim.pid.unwrap();
    let _guard = KillPids(handle.workers().iter().filter_map(|w| w.pid).collect());
    let addr = handle.balancer_addr().unwrap();
    let backend: SocketAddr = ([127, 0, 0, 1], victim.port).into();

    let load = Load::start(addr, 4, 1024, Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The worst moment to die: stop the victim first, so that connections the balancer hands it pile up
    // unanswered in its listen queue, then kill it with those in flight. The kernel resets them, and
    // the balancer must carry each one to another worker without the client noticing.
    let b = handle.balancer().unwrap();
    // SAFETY: kill(2) with plain integers; the pid is our own running child.
    assert_eq!(unsafe { libc::kill(old_pid as i32, libc::SIGSTOP) }, 0);
    wait_for_backend(
        &b,
        backend,
        "two connections stuck on the stopped worker",
        |s| s.active >= 2,
    )
    .await;
    // A connection the victim had answered just before it stopped can still be on its way out; 200 ms
    // later every connection still open on it is one it will never answer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stuck = b.backend(&backend.to_string()).unwrap().active;
    assert!(stuck >= 1, "{stuck}");
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(old_pid as i32, libc::SIGKILL) }, 0);
    let killed = Instant::now();
    wait_for(&handle, Duration::from_secs(5), "a replacement", |w| {
        w[1].state == WorkerState::Running && w[1].pid != Some(old_pid)
    })
    .await;
    let replaced_in = killed.elapsed();
    let new_pid = handle.workers()[1].pid.unwrap();
    let _guard2 = KillPids(vec![new_pid]);
    tokio::time::sleep(Duration::from_millis(1500)).await; // the new one takes traffic
    let (ok, failures, pids) = load.finish().await;
    let replayed = b.backend(&backend.to_string()).unwrap().connect_failures;
    eprintln!(
        "replacement up {replaced_in:?} after the kill; {stuck} connections stuck on the victim, \
         {replayed} replayed; {ok} requests, failures {failures:?}"
    );
    assert!(failures.is_empty(), "client-visible failures: {failures:?}");
    assert!(replayed >= stuck as u64, "{replayed} < {stuck}");
    assert!(replaced_in < Duration::from_secs(1), "{replaced_in:?}");
    assert!(pids.contains(&new_pid), "the replacement took no traffic");
    assert_eq!(handle.workers()[1].restarts, 1);
    assert!(ok > 100, "{ok}");
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_through_the_handle_and_supervise_only_mode() {
    let base = free_ports(2);
    let config = ClusterConfig::new()
        .processes(2)
        .base_port(base)
        .ready_check(ReadyCheck::Port);
    let (handle, run) = start_running(config, 0).await;
    assert!(handle.balancer().is_none());
    let before: Vec<u32> = handle.workers().iter().map(|w| w.pid.unwrap()).collect();
    let _guard = KillPids(before.clone());
    let t = Instant::now();
    handle.rolling_restart().await.unwrap();
    eprintln!("rolling restart of 2 took {:?}", t.elapsed());
    let after: Vec<u32> = handle.workers().iter().map(|w| w.pid.unwrap()).collect();
    let _guard2 = KillPids(after.clone());
    assert!(
        before.iter().all(|p| !after.contains(p)),
        "{before:?} {after:?}"
    );
    for (id, pid) in after.iter().enumerate() {
        let r = fetch(([127, 0, 0, 1], base + id as u16).into(), 0)
            .await
            .unwrap();
        assert_eq!(r.pid, *pid);
    }
    assert!(handle
        .workers()
        .iter()
        .all(|w| w.restarts == 0 && w.starts == 2));
    handle.shutdown();
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// ---------------------------------------------------------------------------------------------------------
// The command

/// A child process that is killed and reaped when dropped.
struct Proc(Child);

impl Proc {
    fn spawn(args: &[String]) -> Proc {
        Proc(
            Command::new(BIN)
                .args(args)
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        )
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        assert_eq!(unsafe { libc::kill(self.0.id() as libc::pid_t, sig) }, 0);
    }

    fn wait_for(&mut self, limit: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(start.elapsed() < limit, "the supervisor did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Collects stderr in the background.
    fn stderr_lines(&mut self) -> Arc<Mutex<String>> {
        let text = Arc::new(Mutex::new(String::new()));
        let err = self.0.stderr.take().unwrap();
        let t = text.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut t = t.lock().unwrap();
                t.push_str(&line);
                t.push('\n');
            }
        });
        text
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn cluster_args(processes: u16, base: u16, listen: Option<SocketAddr>, body: usize) -> Vec<String> {
    let mut args = vec![
        "cluster".to_string(),
        "-p".into(),
        processes.to_string(),
        "--base-port".into(),
        base.to_string(),
    ];
    if let Some(l) = listen {
        args.extend(["--listen".to_string(), l.to_string()]);
    }
    args.extend(["--".to_string(), python()]);
    args.extend(worker_args(body));
    args
}

/// The pid of every worker, once each answers on its own port.
async fn worker_pids(base: u16, n: u16, body: usize) -> Vec<u32> {
    let mut pids = Vec::new();
    for id in 0..n {
        let addr = ([127, 0, 0, 1], base + id).into();
        pids.push(fetch_until(addr, body, Duration::from_secs(10)).await.pid);
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_supervisor_stops_and_reaps_every_worker() {
    let base = free_ports(4);
    let listen: SocketAddr = ([127, 0, 0, 1], base + 3).into();
    let mut sup = Proc::spawn(&cluster_args(3, base, Some(listen), 0));
    let log = sup.stderr_lines();
    let pids = worker_pids(base, 3, 0).await;
    let _guard = KillPids(pids.clone());
    fetch_until(listen, 0, Duration::from_secs(10)).await;

    let t = Instant::now();
    sup.signal(libc::SIGTERM);
    let status = sup.wait_for(Duration::from_secs(20));
    eprintln!("stopped in {:?}", t.elapsed());
    assert_eq!(status.code(), Some(0), "{}", log.lock().unwrap());
    for pid in &pids {
        assert!(!alive(*pid), "worker {pid} outlived the supervisor");
    }
    assert!((base..base + 4).all(port_is_free));
    std::thread::sleep(Duration::from_millis(100)); // the stderr thread reads the last lines
    let log = log.lock().unwrap();
    assert_eq!(log.matches("worker stopped").count(), 3, "{log}");
    assert!(log.contains("every worker exited and was reaped"), "{log}");
    assert!(log.contains("[worker 0] listening on"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_to_the_supervisor_takes_the_workers_down() {
    let base = free_ports(2);
    let mut sup = Proc::spawn(&cluster_args(2, base, None, 0));
    let pids = worker_pids(base, 2, 0).await;
    let _guard = KillPids(pids.clone());

    sup.signal(libc::SIGKILL);
    sup.wait_for(Duration::from_secs(5));
    let t = Instant::now();
    while pids.iter().any(|p| alive(*p)) || !(base..base + 2).all(port_is_free) {
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "workers still alive 2 s after the supervisor was killed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("workers gone {:?} after SIGKILL", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rolls_every_worker_under_load_without_a_failure() {
    const BODY: usize = 64 * 1024;
    let base = free_ports(4);
    let listen: SocketAddr = ([127, 0, 0, 1], base + 3).into();
    let mut sup = Proc::spawn(&cluster_args(3, base, Some(listen), BODY));
    let log = sup.stderr_lines();
    let before = worker_pids(base, 3, BODY).await;
    let _guard = KillPids(before.clone());
    fetch_until(listen, BODY, Duration::from_secs(10)).await;

    let load = Load::start(listen, 4, BODY, Duration::from_millis(2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    sup.signal(libc::SIGHUP);
    while !log.lock().unwrap().contains("rolling restart done") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rolled_in = t.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failures, seen) = load.finish().await;
    let failures: Vec<String> = failures.into_iter().map(|(_, e)| e).collect();
    let after = worker_pids(base, 3, BODY).await;
    let _guard2 = KillPids(after.clone());
    eprintln!("rolling restart of 3 took {rolled_in:?}; {ok} transfers of {BODY} bytes; failures {failures:?}");
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        before.iter().all(|p| !after.contains(p)),
        "{before:?} {after:?}"
    );
    assert!(
        after.iter().all(|p| seen.contains(p)),
        "new workers took no traffic"
    );
    assert!(ok > 50, "{ok}");
    sup.signal(libc::SIGTERM);
    assert_eq!(sup.wait_for(Duration::from_secs(20)).code(), Some(0));
}

#[test]
fn a_worker_that_exits_at_once_backs_off_then_is_given_up() {
    let base = free_ports(1);
    let dir = std::env::temp_dir().join(format!("ulb-cluster-{}-{base}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stamps = dir.join("starts");
    let _ = std::fs::remove_file(&stamps);
    let args: Vec<String> = [
        "cluster",
        "-p",
        "1",
        "--base-port",
        &base.to_string(),
        "--",
        "sh",
        "-c",
        "date +%s%N >> \"$0\"; exit 3",
        stamps.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = Instant::now();
    let mut sup = Proc::spawn(&args);
    let log = sup.stderr_lines();
    // Wait until it has exited but is not reaped yet, to read its CPU time.
    let pid = sup.pid();
    let cpu = loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = after.split(' ').collect();
        if f[0] == "Z" {
            let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
            break Duration::from_millis(ticks * 10); // USER_HZ is 100 on Linux
        }
        assert!(started.elapsed() < Duration::from_secs(20), "still running");
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let status = sup.wait_for(Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(100));
    let log = log.lock().unwrap().clone();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains("WORKER GIVEN UP"), "{log}");
    assert!(log.contains("ERROR"), "{log}");
    assert!(
        log.trim_end()
            .ends_with("ulb-tcp: every worker (1) was given up after crashing repeatedly"),
        "{log}"
    );

    let times: Vec<u128> = std::fs::read_to_string(&stamps)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    // The first start and 5 restarts; the 6th crash within the window gives it up.
    assert_eq!(times.len(), 6, "{times:?}");
    let gaps: Vec<u128> = times
        .windows(2)
        .map(|w| (w[1] - w[0]) / 1_000_000)
        .collect();
    eprintln!("gaps between starts (ms): {gaps:?}; CPU {cpu:?} over {elapsed:?}");
    for (gap, backoff) in gaps.iter().zip([100u128, 200, 400, 800, 1600]) {
        assert!(*gap >= backoff - 5 && *gap < backoff + 500, "{gaps:?}");
    }
    assert!(
        cpu < Duration::from_millis(500),
        "supervisor used {cpu:?} of CPU"
    );
}

// ---------------------------------------------------------------------------------------------------------
// Bad input

fn one_line_error(args: &[&str], names: &str) {
    let out = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{args:?}: {err}");
    assert!(lines[0].starts_with("ulb-tcp: "), "{err}");
    assert!(
        lines[0].contains(names),
        "{args:?}: {err:?} should name {names:?}"
    );
}

#[test]
fn bad_input_is_one_line_and_exit_code_two_before_any_worker_starts() {
    let dir = std::env::temp_dir().join(format!("ulb-cluster-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let marker = dir.join("started");
    let marker_s = marker.to_str().unwrap();
    let touch = ["sh", "-c", "touch \"$0\"", marker_s];
    let with = |flags: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = ["cluster"]
            .iter()
            .chain(flags)
            .map(|s| s.to_string())
            .collect();
        v.push("--".into());
        v.extend(touch.iter().map(|s| s.to_string()));
        v
    };
    let run = |args: Vec<String>, names: &str| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        one_line_error(&a, names);
    };
    run(with(&["-p", "0"]), "processes");
    run(with(&["-p", "4", "--base-port", "65534"]), "65534");
    run(with(&["-p", "2", "--base-port", "70000"]), "70000");
    run(
        with(&[
            "-p",
            "4",
            "--base-port",
            "8081",
            "--listen",
            "127.0.0.1:8083",
        ]),
        "127.0.0.1:8083",
    );
    run(with(&["-p", "1", "--drain-timeout", "3x"]), "3x");
    assert!(!marker.exists(), "a worker was started");

    one_line_error(
        &["cluster", "-p", "1", "--", "no-such-command-ulb"],
        "no-such-command-ulb",
    );
    let script = dir.join("not-executable.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    let script_s = script.to_str().unwrap();
    one_line_error(&["cluster", "-p", "1", "--", script_s], script_s);
    one_line_error(&["cluster", "-p", "1"], "COMMAND");
    one_line_error(
        &["cluster", "--backends", "127.0.0.1:1", "--", "sh"],
        "--backends",
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------------------
// Ports that are really the workers'

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_listener_on_a_worker_port_is_a_clear_start_error() {
    let base = free_ports(3);
    let foreign = std::net::TcpListener::bind(("127.0.0.1", base + 1)).unwrap();
    let config = ClusterConfig::new()
        .processes(2)
        .base_port(base)
        .balancer(SocketAddr::from(([127, 0, 0, 1], base + 2)));
    let cluster = Cluster::new(config, worker_command(0)).unwrap();
    let handle = cluster.handle();
    let err = cluster.run(std::future::pending()).await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            ulb_tcp::cluster::ClusterError::PortTaken { port, holder: Some((pid, _)) }
                if port == base + 1 && pid == std::process::id()
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!("worker port {} is already in use by ", base + 1)),
        "{text}"
    );
    assert!(
        handle.workers().iter().all(|w| w.starts == 0),
        "no worker was started: {:?}",
        handle.workers()
    );

    // The command says the same on one line, and exits 1.
    let listen = format!("127.0.0.1:{}", base + 2);
    let mut args = vec!["cluster".to_string(), "-p".into(), "2".into()];
    args.extend([
        "--base-port".into(),
        base.to_string(),
        "--listen".into(),
        listen,
    ]);
    args.extend(["--".into(), python()]);
    args.extend(worker_args(0));
    let out = Command::new(BIN)
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("ulb-tcp: ")).collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains(&format!("worker port {} is already in use by", base + 1)),
        "{err}"
    );
    assert!(
        lines[0].contains(&format!("(pid {})", std::process::id())),
        "{err}"
    );
    drop(foreign);
}

/// A worker that retries its bind while a foreign process holds its port (as some servers do) is not
/// put in rotation until the port is its own: no client ever reaches the foreign process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_binds_late_never_sends_client_traffic_to_a_foreign_process() {
    let base = free_ports(3);
    let listen = SocketAddr::from(([127, 0, 0, 1], base + 2));
    let retrying = WORKER.replace(
        "s.bind((\"127.0.0.1\", port))",
        "import time\nwhile True:\n    try:\n        s.bind((\"127.0.0.1\", port)); break\n    except OSError:\n        time.sleep(0.02)",
    );
    assert_ne!(retrying, WORKER);
    let config = ClusterConfig::new()
        .processes(2)
        .base_port(base)
        .balancer(listen);
    let command = WorkerCommand::new(python()).args(["-c", &retrying, "{id}", "{port}", "0"]);
    let (handle, run) = start_running_command(config, command).await;
    let victim = handle.workers()[1].pid.unwrap();
    let _guard = KillPids(handle.workers().iter().filter_map(|w| w.pid).collect());

    // Worker 1 dies; a foreign process takes its port before the restart.
    // SAFETY: kill(2) with plain integers.
    unsafe { libc::kill(victim as libc::pid_t, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let foreign = loop {
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", base + 1)) {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "the worker's port never came free"
        );
        std::thread::yield_now();
    };
    foreign.set_nonblocking(true).unwrap();
    let foreign = tokio::net::TcpListener::from_std(foreign).unwrap();
    let taken = Arc::new(AtomicUsize::new(0));
    let counter = taken.clone();
    let thief = tokio::spawn(async move {
        while let Ok((s, _)) = foreign.accept().await {
            counter.fetch_add(1, SeqCst);
            drop(s);
        }
    });
    wait_for(
        &handle,
        Duration::from_secs(10),
        "the replacement to start",
        |w| w[1].starts >= 2 && w[1].pid.is_some_and(|p| p != victim),
    )
    .await;
    // While the foreign process holds the port, every client goes to worker 0.
    for i in 0..100 {
        let reply = fetch(listen, 0)
            .await
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_eq!(reply.id, 0, "client {i}");
    }
    assert_eq!(
        taken.load(SeqCst),
        0,
        "the foreign process got client traffic"
    );
    assert_ne!(handle.workers()[1].state, WorkerState::Running);

    // The port comes free: the worker binds it and is put back.
    thief.abort();
    let _ = thief.await;
    wait_for(
        &handle,
        Duration::from_secs(10),
        "worker 1 running again",
        all_running,
    )
    .await;
    let back = fetch_until(listen, 0, Duration::from_secs(5)).await;
    let mut seen = HashSet::from([back.id]);
    for _ in 0..20 {
        seen.insert(fetch(listen, 0).await.unwrap().id);
    }
    assert_eq!(
        seen,
        HashSet::from([0, 1]),
        "both workers take traffic again"
    );
    handle.shutdown();
    run.await.unwrap().unwrap();
}

/// With health checks, a worker that hangs (SIGSTOP: its kernel still accepts connections) leaves the
/// rotation within the checks' bounds and is reported; after SIGCONT it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigstopped_worker_leaves_the_rotation_with_checks() {
    let base = free_ports(4);
    let listen = SocketAddr::from(([127, 0, 0, 1], base + 3));
    // The workers speak first (a header line with spaces): a check reads it, and a stopped worker
    // never sends it.
    let check = ulb_tcp::HealthCheck::send_expect(Vec::new(), b" ".to_vec())
        .contains(true)
        .interval(Duration::from_millis(200))
        .timeout(Duration::from_millis(200))
        .rise(1)
        .fall(2);
    let config = ClusterConfig::new()
        .processes(3)
        .base_port(base)
        .balancer(listen)
        .check(check);
    let (handle, run) = start_running(config, 0).await;
    wait_for(
        &handle,
        Duration::from_secs(10),
        "every worker healthy",
        |w| w.iter().all(|w| w.healthy == Some(true)),
    )
    .await;
    let _guard = KillPids(handle.workers().iter().filter_map(|w| w.pid).collect());
    let victim = handle.workers()[1].pid.unwrap();
    let b = handle.balancer().unwrap();
    let id = SocketAddr::from(([127, 0, 0, 1], base + 1)).to_string();

    // SAFETY: kill(2) with plain integers.
    unsafe { libc::kill(victim as libc::pid_t, libc::SIGSTOP) };
    let stopped = Instant::now();
    wait_for(
        &handle,
        Duration::from_secs(5),
        "the stopped worker reported",
        |w| w[1].healthy == Some(false),
    )
    .await;
    let detected = stopped.elapsed();
    // fall × (interval + timeout) + interval, and some slack for a loaded machine.
    assert!(detected < Duration::from_millis(2000), "{detected:?}");
    assert_eq!(
        handle.workers()[1].state,
        WorkerState::Running,
        "its process still runs"
    );
    let before = b.backend(&id).unwrap().total;
    for i in 0..50 {
        let reply = fetch(listen, 0)
            .await
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        assert_ne!(reply.id, 1, "client {i} reached the stopped worker");
    }
    assert_eq!(b.backend(&id).unwrap().total, before);

    // SAFETY: as above.
    unsafe { libc::kill(victim as libc::pid_t, libc::SIGCONT) };
    wait_for(&handle, Duration::from_secs(5), "the worker back", |w| {
        w[1].healthy == Some(true)
    })
    .await;
    eprintln!(
        "detected after {detected:?}; back {:?} after SIGCONT",
        stopped.elapsed() - detected
    );
    let mut seen = HashSet::new();
    for _ in 0..30 {
        seen.insert(fetch(listen, 0).await.unwrap().id);
    }
    assert!(
        seen.contains(&1),
        "the worker takes traffic again: {seen:?}"
    );
    handle.shutdown();
    run.await.unwrap().unwrap();
}
