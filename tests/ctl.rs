//! `ulb-tcp ctl` end to end: the real `ulb-tcp` binary runs a balancer started from flags
//! (`--backends A,B --admin ... --admin-token-file F`), and `ulb-tcp ctl` runs as a subprocess against
//! its admin port:
//!
//! * `status` prints a row per backend, `--json` the server's JSON;
//! * `drain`, `ready` and `weight` change the backend, as the status table and the API itself then say;
//! * `add` adds a backend that then takes connections through the balancer, `remove` takes it away;
//! * errors: no token (exit 1, the 401 named), an unknown backend (404), an admin address where nothing
//!   listens (exit 1, one line), bad usage (exit 2, the bad value named, nothing sent);
//! * `reload` against a balancer started without a config file: 409, once the server has the endpoint.
//!
//! Everything is on 127.0.0.1; every process is killed and reaped on drop; every wait has a deadline.
#![cfg(target_os = "linux")]

mod common;

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{refusing_addr, unique_port, wait_until, Backend, Proc, TempDir};
use serde_json::Value as Json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_ulb-tcp");
/// How long any one wait may take.
const DEADLINE: Duration = Duration::from_secs(20);
const TOKEN: &str = "ctl-test-token";

/// A balancer started from flags, with its admin port and a token file; killed and reaped on drop.
struct Balancer {
    proc: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
    token_file: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl Balancer {
    async fn start(backends: &[SocketAddr]) -> Balancer {
        let list: Vec<String> = backends.iter().map(ToString::to_string).collect();
        let mut last_log = String::new();
        for _attempt in 0..3 {
            let dir = TempDir::new("ctl");
            let token_file = dir.path().join("token");
            std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write the token file");
            let log = dir.path().join("ulb-tcp.log");
            let out = File::create(&log).expect("create the log");
            let listen: SocketAddr = ([127, 0, 0, 1], unique_port()).into();
            let admin: SocketAddr = ([127, 0, 0, 1], unique_port()).into();
            let mut cmd = Command::new(BIN);
            cmd.args(["--listen", &listen.to_string()])
                .args(["--backends", &list.join(",")])
                .args(["--admin", &admin.to_string()])
                .arg("--admin-token-file")
                .arg(&token_file)
                .env("RUST_LOG", "info")
                .env("NO_COLOR", "1")
                .stdout(out.try_clone().expect("clone the log"))
                .stderr(out);
            let mut b = Balancer {
                proc: Proc::spawn(&mut cmd, "ulb-tcp"),
                listen,
                admin,
                token_file,
                log,
                _dir: dir,
            };
            let mut exited = false;
            wait_until("the balancer to serve", DEADLINE, || {
                exited = b.proc.exited();
                exited
                    || (b.log_text().contains("balancer accepting connections")
                        && std::net::TcpStream::connect(admin).is_ok())
            })
            .await;
            if !exited {
                return b;
            }
            // A port taken in the meantime: again, on others.
            last_log = b.log_text();
        }
        panic!("ulb-tcp did not start:\n{last_log}");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `ulb-tcp ctl --admin ADMIN <args>`, without the token.
    async fn ctl(&self, args: &[&str]) -> Ctl {
        let admin = self.admin.to_string();
        let mut all = vec!["--admin", &admin];
        all.extend_from_slice(args);
        ctl(&all, &[]).await
    }

    /// `ulb-tcp ctl --admin ADMIN --token-file F <args>`.
    async fn ctl_with_token(&self, args: &[&str]) -> Ctl {
        let (admin, file) = (
            self.admin.to_string(),
            self.token_file.display().to_string(),
        );
        let mut all = vec!["--admin", &admin, "--token-file", &file];
        all.extend_from_slice(args);
        ctl(&all, &[]).await
    }

    /// The API's own word on backend `id` of `default`, read without `ctl`: `None` on a 404.
    fn api_backend(&self, id: &str) -> Option<Json> {
        let path = format!(
            "/api/v1/services/default/backends/{}",
            id.replace(':', "%3A")
        );
        let (status, body) = http_get(self.admin, &path);
        match status {
            200 => Some(serde_json::from_str(&body).expect("the API's answer is JSON")),
            404 => None,
            _ => panic!("GET {path}: {status} {body}"),
        }
    }

    /// Connects through the balancer and reads the tag of the backend that answers.
    async fn tag(&self) -> u8 {
        let go = async {
            let mut s = TcpStream::connect(self.listen).await?;
            let mut tag = [0u8; 1];
            s.read_exact(&mut tag).await?;
            Ok::<u8, std::io::Error>(tag[0])
        };
        tokio::time::timeout(DEADLINE, go)
            .await
            .expect("no answer through the balancer in time")
            .expect("a connection through the balancer")
    }
}

/// A `GET` on the admin port, blocking, with a deadline: the status and the body.
fn http_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(admin).expect("connect to the admin port");
    s.set_read_timeout(Some(DEADLINE)).expect("read timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("read the answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    (status, body.to_string())
}

/// What a `ulb-tcp ctl` run did.
#[derive(Debug)]
struct Ctl {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ctl {
    /// Exit 0 with nothing on stderr; stdout.
    fn ok(&self) -> &str {
        assert_eq!(self.code, Some(0), "{self:#?}");
        assert_eq!(self.stderr, "", "{self:#?}");
        &self.stdout
    }

    /// Exit `code` with one line on stderr, nothing on stdout; the line.
    fn fails(&self, code: i32) -> &str {
        assert_eq!(self.code, Some(code), "{self:#?}");
        assert_eq!(self.stdout, "", "{self:#?}");
        let line = self
            .stderr
            .strip_suffix('\n')
            .unwrap_or_else(|| panic!("stderr is not one line: {self:#?}"));
        assert!(!line.contains('\n'), "stderr is not one line: {self:#?}");
        assert!(line.starts_with("ulb-tcp: "), "{self:#?}");
        assert!(!self.stderr.contains("panicked"), "{self:#?}");
        line
    }
}

/// Runs `ulb-tcp ctl <args>` with the environment's ctl variables cleared, then `env`; waits at most
/// the deadline (the child is killed and reaped if it takes longer).
async fn ctl(args: &[&str], env: &[(&str, &str)]) -> Ctl {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.arg("ctl")
        .args(args)
        .env_remove("ULB_ADMIN")
        .env_remove("ULB_ADMIN_TOKEN_FILE")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(DEADLINE, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("ulb-tcp ctl {args:?} took over {DEADLINE:?}"))
        .expect("run ulb-tcp ctl");
    Ctl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The table row of backend `id` in `status` output, split into its columns.
fn row<'a>(table: &'a str, id: &str) -> Option<Vec<&'a str>> {
    table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cols| cols.first() == Some(&id))
}

const STATE: usize = 2;
const HEALTH: usize = 3;
const WEIGHT: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_drain_ready_and_weight() {
    let (a, b) = (Backend::tagged(1).await, Backend::tagged(2).await);
    let ulb = Balancer::start(&[a.addr, b.addr]).await;
    let (id_a, id_b) = (a.addr.to_string(), b.addr.to_string());

    // The table: the service's line, the heads, a row per backend, ready and up.
    let out = ulb.ctl(&["status"]).await;
    let table = out.ok();
    let mut lines = table.lines();
    let header = lines.next().expect("a service line");
    assert!(header.starts_with("default  listen "), "{table}");
    assert!(header.contains(&ulb.listen.to_string()), "{table}");
    assert!(
        header.contains("round-robin") && header.contains("queue 0"),
        "{table}"
    );
    let heads: Vec<&str> = lines.next().expect("heads").split_whitespace().collect();
    assert_eq!(
        heads,
        ["ID", "ADDRESS", "STATE", "HEALTH", "WEIGHT", "ACTIVE", "TOTAL", "IN", "OUT", "ERRORS"]
    );
    assert_eq!(lines.count(), 2, "{table}");
    for id in [&id_a, &id_b] {
        let r = row(table, id).unwrap_or_else(|| panic!("no row for {id}:\n{table}"));
        assert_eq!(r.len(), 10, "{table}");
        assert_eq!(
            (r[1], r[STATE], r[HEALTH], r[WEIGHT]),
            (id.as_str(), "ready", "up", "1/1")
        );
    }

    // --json: the server's JSON, with the backends; also after the command.
    for args in [&["--json", "status"][..], &["status", "--json"]] {
        let out = ulb.ctl(args).await;
        let v: Json = serde_json::from_str(out.ok()).expect("--json prints JSON");
        let ids: Vec<&str> = v["services"][0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .filter_map(|b| b["id"].as_str())
            .collect();
        assert_eq!(ids, [id_a.as_str(), id_b.as_str()], "{args:?}");
    }

    // drain: the table and the API say drain, and new connections go to the other backend.
    let target_a = format!("default/{id_a}");
    let out = ulb.ctl_with_token(&["drain", &target_a]).await;
    assert!(
        out.ok().starts_with(&format!("{target_a}: state drain")),
        "{out:#?}"
    );
    let status = ulb.ctl(&["status"]).await;
    assert_eq!(row(status.ok(), &id_a).expect("row")[STATE], "drain");
    assert_eq!(row(status.ok(), &id_b).expect("row")[STATE], "ready");
    let api = ulb.api_backend(&id_a).expect("backend a");
    assert_eq!(api["state"], "drain");
    assert_eq!(api["in_rotation"], false);
    for _ in 0..4 {
        assert_eq!(ulb.tag().await, 2, "a drained backend took a connection");
    }

    // ready: back.
    let out = ulb.ctl_with_token(&["ready", &target_a]).await;
    assert_eq!(out.ok(), format!("{target_a}: state ready\n"));
    let status = ulb.ctl(&["status"]).await;
    assert_eq!(row(status.ok(), &id_a).expect("row")[STATE], "ready");
    assert_eq!(ulb.api_backend(&id_a).expect("backend a")["state"], "ready");

    // maint, then ready again.
    let out = ulb.ctl_with_token(&["maint", &target_a]).await;
    assert!(out.ok().starts_with(&format!("{target_a}: state maint")));
    assert_eq!(ulb.api_backend(&id_a).expect("backend a")["state"], "maint");
    ulb.ctl_with_token(&["ready", &target_a]).await.ok();

    // weight: 5, in the table (effective/configured) and in the API.
    let target_b = format!("default/{id_b}");
    let out = ulb.ctl_with_token(&["weight", &target_b, "5"]).await;
    assert_eq!(out.ok(), format!("{target_b}: weight 5\n"));
    let status = ulb.ctl(&["status"]).await;
    assert_eq!(row(status.ok(), &id_b).expect("row")[WEIGHT], "5/5");
    assert_eq!(row(status.ok(), &id_a).expect("row")[WEIGHT], "1/1");
    assert_eq!(ulb.api_backend(&id_b).expect("backend b")["weight"], 5);

    // --json on a change prints the server's answer: the backend.
    let out = ulb
        .ctl_with_token(&["--json", "weight", &target_b, "2"])
        .await;
    let v: Json = serde_json::from_str(out.ok()).expect("JSON");
    assert_eq!(
        (v["id"].as_str(), v["weight"].as_u64()),
        (Some(id_b.as_str()), Some(2))
    );

    // The address and the token file from the environment.
    let (admin, file) = (ulb.admin.to_string(), ulb.token_file.display().to_string());
    let out = ctl(
        &["drain", &target_b],
        &[("ULB_ADMIN", &admin), ("ULB_ADMIN_TOKEN_FILE", &file)],
    )
    .await;
    assert!(out.ok().starts_with(&format!("{target_b}: state drain")));
    assert_eq!(ulb.api_backend(&id_b).expect("backend b")["state"], "drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_takes_traffic_and_remove_takes_it_away() {
    let (a, b, c) = (
        Backend::tagged(1).await,
        Backend::tagged(2).await,
        Backend::tagged(3).await,
    );
    let ulb = Balancer::start(&[a.addr, b.addr]).await;
    let new = c.addr.to_string();

    let out = ulb
        .ctl_with_token(&["add", "default", &new, "--weight", "2", "--id", "app-3"])
        .await;
    assert_eq!(out.ok(), format!("default/app-3: added {new}, weight 2\n"));
    let status = ulb.ctl(&["status"]).await;
    let r = row(status.ok(), "app-3").expect("a row for the new backend");
    assert_eq!((r[1], r[STATE], r[WEIGHT]), (new.as_str(), "ready", "2/2"));
    assert_eq!(ulb.api_backend("app-3").expect("added")["address"], new);

    // It takes connections: with weights 1, 1 and 2, among the next few one reaches it.
    let mut tags = Vec::new();
    while !tags.contains(&3) {
        assert!(
            tags.len() < 20,
            "the added backend took no connection: {tags:?}"
        );
        tags.push(ulb.tag().await);
    }
    assert!(c.accepted() >= 1);
    let status = ulb.ctl(&["status"]).await;
    let total: u64 = row(status.ok(), "app-3").expect("row")[6]
        .parse()
        .expect("TOTAL is a number");
    assert!(total >= 1, "{}", status.stdout);

    // remove: gone from the table and the API, and it takes no more connections.
    let out = ulb
        .ctl_with_token(&["remove", "default/app-3", "--deadline", "1s"])
        .await;
    assert!(
        out.ok()
            .starts_with("default/app-3: removing: out of rotation"),
        "{out:#?}"
    );
    wait_until("the removed backend to go", DEADLINE, || {
        ulb.api_backend("app-3").is_none()
    })
    .await;
    let status = ulb.ctl(&["status"]).await;
    assert!(row(status.ok(), "app-3").is_none(), "{}", status.stdout);
    assert!(row(status.ok(), &a.addr.to_string()).is_some());
    let before = c.accepted();
    for _ in 0..6 {
        assert_ne!(ulb.tag().await, 3, "a removed backend took a connection");
    }
    assert_eq!(c.accepted(), before);

    // Adding one whose id is there already: the server's 409, exit 1.
    let e = ulb
        .ctl_with_token(&["add", "default", &a.addr.to_string()])
        .await;
    assert!(e.fails(1).ends_with("(HTTP 409)"), "{e:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_exit_1_with_their_line() {
    let a = Backend::tagged(1).await;
    let ulb = Balancer::start(&[a.addr]).await;
    let target = format!("default/{}", a.addr);

    // Without the token: 401, nothing changed.
    for args in [
        &["drain", &target][..],
        &["weight", &target, "3"],
        &["add", "default", "127.0.0.1:1"],
        &["remove", &target],
    ] {
        let out = ulb.ctl(args).await;
        let line = out.fails(1);
        assert!(line.contains("(HTTP 401)"), "{args:?}: {line}");
        assert!(line.contains("--token-file"), "{args:?}: {line}");
    }
    let api = ulb.api_backend(&a.addr.to_string()).expect("still there");
    assert_eq!(
        (api["state"].as_str(), api["weight"].as_u64()),
        (Some("ready"), Some(1))
    );
    assert!(ulb.api_backend("127.0.0.1:1").is_none());

    // A wrong token: 401 too, without the hint about giving one.
    let dir = TempDir::new("ctl-wrong");
    let wrong = dir.path().join("token");
    std::fs::write(&wrong, "not-the-token").expect("write");
    let wrong = wrong.display().to_string();
    let out = ulb.ctl(&["--token-file", &wrong, "drain", &target]).await;
    assert_eq!(
        out.fails(1),
        "ulb-tcp: the bearer token is not the admin token (HTTP 401)"
    );

    // No such backend, no such service: the server's line and 404.
    let out = ulb.ctl_with_token(&["drain", "default/nosuch"]).await;
    assert_eq!(
        out.fails(1),
        r#"ulb-tcp: no backend "nosuch" in service "default" (HTTP 404)"#
    );
    let out = ulb.ctl(&["status", "web"]).await;
    assert_eq!(out.fails(1), r#"ulb-tcp: no service "web" (HTTP 404)"#);
    // A value the server refuses: its 400, naming it.
    let out = ulb.ctl_with_token(&["weight", &target, "999"]).await;
    let line = out.fails(1);
    assert!(
        line.contains("999") && line.ends_with("(HTTP 400)"),
        "{line}"
    );
    // Reading needs no token; one service by name.
    let out = ulb.ctl(&["status", "default"]).await;
    assert!(row(out.ok(), &a.addr.to_string()).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_without_a_config_file_is_refused() {
    let a = Backend::tagged(1).await;
    let ulb = Balancer::start(&[a.addr]).await;
    let out = ulb.ctl_with_token(&["reload"]).await;
    let line = out.fails(1).to_string();
    assert!(line.ends_with("(HTTP 409)"), "{line}");
    assert!(line.contains("--config"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_address_where_nothing_listens() {
    let nobody = refusing_addr().to_string();
    let out = ctl(&["--admin", &nobody, "status"], &[]).await;
    assert_eq!(
        out.fails(1),
        format!("ulb-tcp: cannot reach the admin server at {nobody}: connection refused")
    );
    let out = ctl(&["drain", "default/x"], &[("ULB_ADMIN", &nobody)]).await;
    assert!(out.fails(1).contains(&nobody), "{out:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_usage_exits_2_naming_the_value() {
    // Against an address where nothing listens: a usage error must come before anything is sent
    // (else these would be "cannot reach", exit 1).
    let nobody = refusing_addr().to_string();
    for (args, want) in [
        (&["--admin", "nonsense", "status"][..], "'nonsense'"),
        (
            &["--admin", "127.0.0.1:99999", "status"],
            "'127.0.0.1:99999'",
        ),
        (
            &["--admin", &nobody, "drain", "127.0.0.1:8081"],
            "'127.0.0.1:8081' has no '/'",
        ),
        (&["--admin", &nobody, "ready", "default/"], "'default/'"),
        (&["--admin", &nobody, "weight", "default/x", "abc"], "'abc'"),
        (&["--admin", &nobody, "weight", "default/x", "-1"], "'-1'"),
        (
            &["--admin", &nobody, "add", "default", "h:1", "--weight", "w"],
            "'w'",
        ),
        (
            &[
                "--admin",
                &nobody,
                "remove",
                "default/x",
                "--deadline",
                "soon",
            ],
            "'soon'",
        ),
        (&["--admin", &nobody, "--timeout", "0s", "status"], "'0s'"),
        (
            &[
                "--admin",
                &nobody,
                "--token-file",
                "/nonexistent/t",
                "status",
            ],
            "/nonexistent/t",
        ),
        (&["--admin", &nobody, "frobnicate"], "'frobnicate'"),
        (&["--admin", &nobody], "requires a subcommand"),
        (&[], "requires a subcommand"),
    ] {
        let out = ctl(args, &[]).await;
        let line = out.fails(2);
        assert!(line.contains(want), "{args:?}: {line}");
    }
    let out = ctl(&["status"], &[("ULB_ADMIN", "nope")]).await;
    assert!(out.fails(2).contains("ULB_ADMIN 'nope'"), "{out:#?}");
}
