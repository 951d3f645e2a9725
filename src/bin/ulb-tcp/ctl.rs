//! `ulb-tcp ctl`: a thin client for a running balancer's admin API (`src/admin/`).
//!
//! One HTTP/1.1 request per command, on hyper's low-level client connection over a Tokio `TcpStream`;
//! the answer's JSON is read leniently (a field the server does not send shows as `-`), so the client
//! keeps working against a server of another version.
//!
//! Exit status: 0 when the server did it; 1 when it answered an error (`ulb-tcp: <its error line> (HTTP
//! 404)`), or could not be reached, or did not answer within `--timeout`; 2 for bad usage (a bad address,
//! a target without its `/`, a weight that is not a number), before anything is sent.

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::{json, Value as Json};

use crate::cli::{escape_controls, parse_count, parse_duration};
use crate::{EXIT_FAILURE, EXIT_USAGE};

/// The admin address without `--admin` or `ULB_ADMIN`.
pub const DEFAULT_ADMIN: &str = "127.0.0.1:9100";
/// The environment variable that gives the admin address.
const ENV_ADMIN: &str = "ULB_ADMIN";
/// The environment variable that gives the token file.
const ENV_TOKEN_FILE: &str = "ULB_ADMIN_TOKEN_FILE";
/// The largest answer read.
const MAX_ANSWER: usize = 16 * 1024 * 1024;

pub const CTL_EXAMPLES: &str = "\
Examples:
  ulb-tcp ctl status
  ulb-tcp ctl --json status
  ulb-tcp ctl drain default/127.0.0.1:8081
  ulb-tcp ctl weight default/127.0.0.1:8082 3
  ulb-tcp ctl add default 127.0.0.1:8083 --weight 2 --id app-3
  ulb-tcp ctl remove default/app-3 --deadline 10s
  ULB_ADMIN=127.0.0.1:9200 ULB_ADMIN_TOKEN_FILE=/etc/ulb/token ulb-tcp ctl reload

A backend is SERVICE/ID: the service's name (`default` for a balancer started from flags), a
'/', and the backend's id (its address as written, unless it was added with --id). The admin
address defaults to $ULB_ADMIN, else 127.0.0.1:9100; the token file to $ULB_ADMIN_TOKEN_FILE
(only changes need the token). Exit status: 0 done, 1 when the server refuses (its error is
printed) or cannot be reached, 2 for bad usage.";

/// `ulb-tcp ctl` flags. They may come after the command too (`global`); their ids are their own, as clap
/// hands a global's value to the parent command as well, which has an `--admin` of another type.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// The admin server's address, HOST:PORT. Default: $ULB_ADMIN, else 127.0.0.1:9100.
    #[arg(id = "ctl_admin", long = "admin", value_name = "ADDR", global = true)]
    pub admin: Option<String>,

    /// A file holding the admin token (trimmed), for the commands that change something. Default:
    /// $ULB_ADMIN_TOKEN_FILE.
    #[arg(
        id = "ctl_token_file",
        long = "token-file",
        value_name = "FILE",
        global = true
    )]
    pub token_file: Option<PathBuf>,

    /// Print the server's JSON answer as it came, instead of a table or a line.
    #[arg(id = "ctl_json", long = "json", global = true)]
    pub json: bool,

    /// How long the whole call may take: connecting, sending and the answer.
    #[arg(id = "ctl_timeout", long = "timeout", value_name = "DURATION", default_value = "5s", value_parser = parse_timeout, global = true)]
    pub timeout: Duration,

    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// `ulb-tcp ctl` commands.
#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// Every service and its backends, as a table (one service with SERVICE).
    Status {
        /// Only this service.
        service: Option<String>,
    },
    /// Take a backend out of rotation: no new connections, the open ones carry on.
    Drain {
        /// The backend, SERVICE/ID.
        #[arg(value_name = "SERVICE/ID", value_parser = parse_target)]
        target: Target,
    },
    /// Put a backend back in rotation.
    Ready {
        /// The backend, SERVICE/ID.
        #[arg(value_name = "SERVICE/ID", value_parser = parse_target)]
        target: Target,
    },
    /// Take a backend out of rotation for maintenance (as drain).
    Maint {
        /// The backend, SERVICE/ID.
        #[arg(value_name = "SERVICE/ID", value_parser = parse_target)]
        target: Target,
    },
    /// Set a backend's weight (1-256).
    Weight {
        /// The backend, SERVICE/ID.
        #[arg(value_name = "SERVICE/ID", value_parser = parse_target)]
        target: Target,
        /// The new weight.
        #[arg(value_name = "N", value_parser = parse_count::<u32>, allow_hyphen_values = true)]
        weight: u32,
    },
    /// Add a backend to a service.
    Add {
        /// The service.
        service: String,
        /// The backend's address, HOST:PORT (a name is resolved by the server, once).
        #[arg(value_name = "ADDR")]
        address: String,
        /// Its weight (1-256). Default: 1.
        #[arg(long, value_name = "N", value_parser = parse_count::<u32>, allow_hyphen_values = true)]
        weight: Option<u32>,
        /// Its id. Default: the address as written.
        #[arg(long, value_name = "NAME")]
        id: Option<String>,
        /// A backup backend: used only while no other may be picked.
        #[arg(long)]
        backup: bool,
    },
    /// Remove a backend: out of rotation at once, gone once its connections end (reset at the deadline).
    Remove {
        /// The backend, SERVICE/ID.
        #[arg(value_name = "SERVICE/ID", value_parser = parse_target)]
        target: Target,
        /// When its connections still open are reset. Default: the service's drain timeout.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, allow_hyphen_values = true)]
        deadline: Option<Duration>,
    },
    /// Reload the configuration file the balancer was started with.
    Reload,
}

/// A backend: `SERVICE/ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    service: String,
    id: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.service, self.id)
    }
}

/// `SERVICE/ID`, split at the first `/` (an id such as `127.0.0.1:8081` has `:` but no `/`).
fn parse_target(s: &str) -> Result<Target, String> {
    match s.split_once('/') {
        Some((service, id)) if !service.is_empty() && !id.is_empty() => Ok(Target {
            service: service.to_string(),
            id: id.to_string(),
        }),
        Some(_) => Err(format!(
            "'{s}' is not SERVICE/ID: both sides of the '/' must be given (for example default/127.0.0.1:8081)"
        )),
        None => Err(format!(
            "'{s}' has no '/': give SERVICE/ID (for example default/{s})"
        )),
    }
}

/// A `--timeout`: a duration above 0.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("'{s}' is no time at all (give more than 0)")),
        d => Ok(d),
    }
}

/// Why a command failed, and how it exits.
#[derive(Debug)]
enum Failure {
    /// Bad usage: exit 2.
    Usage(String),
    /// The server answered an error, or could not be reached: exit 1.
    Failed(String),
}

/// Characters kept as they are in a path segment.
const SEGMENT_KEEP: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT_KEEP).to_string()
}

fn backend_path(t: &Target) -> String {
    format!(
        "/api/v1/services/{}/backends/{}",
        segment(&t.service),
        segment(&t.id)
    )
}

/// One request: what, where, and its JSON body.
#[derive(Debug, PartialEq)]
struct Call {
    method: Method,
    path: String,
    body: Option<Json>,
}

impl Call {
    fn new(method: Method, path: String, body: Option<Json>) -> Self {
        Call { method, path, body }
    }
}

/// The request a command makes.
fn call_for(command: &CtlCommand) -> Call {
    let state = |t: &Target, state: &str| {
        Call::new(
            Method::PATCH,
            backend_path(t),
            Some(json!({ "state": state })),
        )
    };
    match command {
        CtlCommand::Status { service: None } => {
            Call::new(Method::GET, "/api/v1/services".into(), None)
        }
        CtlCommand::Status { service: Some(s) } => Call::new(
            Method::GET,
            format!("/api/v1/services/{}", segment(s)),
            None,
        ),
        CtlCommand::Drain { target } => state(target, "drain"),
        CtlCommand::Ready { target } => state(target, "ready"),
        CtlCommand::Maint { target } => state(target, "maint"),
        CtlCommand::Weight { target, weight } => Call::new(
            Method::PATCH,
            backend_path(target),
            Some(json!({ "weight": weight })),
        ),
        CtlCommand::Add {
            service,
            address,
            weight,
            id,
            backup,
        } => {
            let mut body = json!({ "address": address });
            if let Some(w) = weight {
                body["weight"] = json!(w);
            }
            if let Some(id) = id {
                body["id"] = json!(id);
            }
            if *backup {
                body["backup"] = json!(true);
            }
            Call::new(
                Method::POST,
                format!("/api/v1/services/{}/backends", segment(service)),
                Some(body),
            )
        }
        CtlCommand::Remove { target, deadline } => {
            let mut path = backend_path(target);
            if let Some(d) = deadline {
                let _ = write!(path, "?deadline={}ms", d.as_millis());
            }
            Call::new(Method::DELETE, path, None)
        }
        CtlCommand::Reload => Call::new(Method::POST, "/api/v1/reload".into(), None),
    }
}

/// `ulb-tcp ctl`: the exit status, after printing the answer or the error.
pub fn main(args: CtlArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(line)) => {
            eprintln!("ulb-tcp: {}", one_line(&line));
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Failed(line)) => {
            eprintln!("ulb-tcp: {}", one_line(&line));
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn run(args: CtlArgs) -> Result<(), Failure> {
    let admin = match args.admin {
        Some(a) => Admin::parse(&a, "--admin")?,
        None => match std::env::var(ENV_ADMIN) {
            Ok(a) if !a.trim().is_empty() => Admin::parse(&a, ENV_ADMIN)?,
            _ => Admin::parse(DEFAULT_ADMIN, "the default admin address")?,
        },
    };
    let token_file = args.token_file.or_else(|| {
        std::env::var_os(ENV_TOKEN_FILE)
            .filter(|f| !f.is_empty())
            .map(PathBuf::from)
    });
    let token = token_file.as_deref().map(read_token).transpose()?;
    let call = call_for(&args.command);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Failed(format!("cannot start the runtime: {e}")))?;
    let answer = runtime.block_on(async {
        match tokio::time::timeout(args.timeout, send(&admin, &call, token.as_deref())).await {
            Ok(answer) => answer,
            Err(_) => Err(Failure::Failed(format!(
                "the admin server at {} did not answer within {:?}",
                admin.given, args.timeout
            ))),
        }
    })?;
    if !answer.status.is_success() {
        let mut line = format!("{} (HTTP {})", answer.error_line(), answer.status.as_u16());
        if answer.status == StatusCode::UNAUTHORIZED && token.is_none() {
            line.push_str("; give the token file with --token-file F or ULB_ADMIN_TOKEN_FILE");
        }
        return Err(Failure::Failed(line));
    }
    if args.json {
        let mut text = String::from_utf8_lossy(&answer.body).into_owned();
        if !text.ends_with('\n') {
            text.push('\n');
        }
        print!("{text}");
        return Ok(());
    }
    let value: Json = serde_json::from_slice(&answer.body).map_err(|e| {
        Failure::Failed(format!(
            "the admin server's answer is not JSON ({e}): {}",
            cut(&String::from_utf8_lossy(&answer.body), 200)
        ))
    })?;
    print!("{}", render(&args.command, &value));
    Ok(())
}

/// The admin server's address: as given (for messages and `Host`), and resolved.
#[derive(Debug)]
struct Admin {
    given: String,
    addr: SocketAddr,
}

impl Admin {
    /// `HOST:PORT` (`127.0.0.1:9100`, `[::1]:9100`, `localhost:9100`); `source` names where it came from.
    fn parse(s: &str, source: &str) -> Result<Admin, Failure> {
        let given = s.trim().to_string();
        if let Ok(addr) = given.parse::<SocketAddr>() {
            return Ok(Admin { given, addr });
        }
        let bad = |why: &str| Failure::Usage(format!("{source} '{given}' {why}"));
        let Some((host, port)) = given.rsplit_once(':') else {
            return Err(bad("is not HOST:PORT (for example 127.0.0.1:9100)"));
        };
        if host.is_empty() || host.contains(['/', ' ']) {
            return Err(bad("is not HOST:PORT (for example 127.0.0.1:9100)"));
        }
        if port.parse::<u16>().is_err() {
            return Err(bad("has no valid port (1-65535)"));
        }
        match given.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(addr)) => Ok(Admin { given, addr }),
            Ok(None) => Err(Failure::Failed(format!(
                "cannot reach the admin server at {given}: {host} has no address"
            ))),
            Err(e) => Err(Failure::Failed(format!(
                "cannot reach the admin server at {given}: cannot resolve {host}: {}",
                io_words(&e)
            ))),
        }
    }
}

/// The token in `path`, trimmed.
fn read_token(path: &std::path::Path) -> Result<String, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Failure::Usage(format!(
            "cannot read the token file {}: {}",
            path.display(),
            io_words(&e)
        ))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(Failure::Usage(format!(
            "the token file {} is empty",
            path.display()
        )));
    }
    if HeaderValue::from_str(&format!("Bearer {token}")).is_err() {
        return Err(Failure::Usage(format!(
            "the token file {} holds characters a header cannot carry",
            path.display()
        )));
    }
    Ok(token.to_string())
}

/// The server's answer.
#[derive(Debug)]
struct Answer {
    status: StatusCode,
    body: Bytes,
}

impl Answer {
    /// The error of a failed answer: its `{"error": ...}`, else the status's words and the start of the
    /// body.
    fn error_line(&self) -> String {
        let error = serde_json::from_slice::<Json>(&self.body)
            .ok()
            .and_then(|v| v.get("error").and_then(Json::as_str).map(str::to_string));
        match error {
            Some(e) => e,
            None => {
                let reason = self.status.canonical_reason().unwrap_or("error");
                let body = String::from_utf8_lossy(&self.body);
                match body.trim() {
                    "" => reason.to_lowercase(),
                    body => format!("{}: {}", reason.to_lowercase(), cut(body, 200)),
                }
            }
        }
    }
}

/// Sends `call` and reads the whole answer.
async fn send(admin: &Admin, call: &Call, token: Option<&str>) -> Result<Answer, Failure> {
    let unreachable = |e: &std::io::Error| {
        Failure::Failed(format!(
            "cannot reach the admin server at {}: {}",
            admin.given,
            io_words(e)
        ))
    };
    let broken = |e: hyper::Error| {
        let mut why = e.to_string();
        if let Some(source) = std::error::Error::source(&e) {
            let _ = write!(why, ": {source}");
        }
        Failure::Failed(format!("the admin server at {}: {why}", admin.given))
    };
    let stream = tokio::net::TcpStream::connect(admin.addr)
        .await
        .map_err(|e| unreachable(&e))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(broken)?;
    // The connection's I/O; it ends when the answer is read and `sender` dropped.
    tokio::spawn(conn);

    let body = match &call.body {
        Some(v) => Bytes::from(v.to_string()),
        None => Bytes::new(),
    };
    let mut req = Request::builder()
        .method(call.method.clone())
        .uri(&call.path)
        .header(header::ACCEPT, "application/json")
        .header(header::CONNECTION, "close")
        .header(
            header::USER_AGENT,
            concat!("ulb-tcp-ctl/", env!("CARGO_PKG_VERSION")),
        );
    if let Ok(host) = HeaderValue::from_str(&admin.given) {
        req = req.header(header::HOST, host);
    }
    if call.body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    if let Some(token) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| Failure::Failed(format!("cannot build the request: {e}")))?;
    let res = sender.send_request(req).await.map_err(broken)?;
    let status = res.status();
    let body = Limited::new(res.into_body(), MAX_ANSWER)
        .collect()
        .await
        .map_err(|e| {
            Failure::Failed(format!(
                "the admin server at {}: cannot read the answer: {e}",
                admin.given
            ))
        })?
        .to_bytes();
    Ok(Answer { status, body })
}

/// An I/O error in words: `connection refused`, without the `(os error 111)`.
fn io_words(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match text.rfind(" (os error ") {
        Some(i) => &text[..i],
        None => &text,
    };
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => format!("{:?}", e.kind()),
    }
}

/// `s` with every control character escaped, so that what the server sent cannot break a line or send
/// the terminal a command.
fn one_line(s: &str) -> String {
    escape_controls(s)
}

/// At most `n` characters of `s`, on one line.
fn cut(s: &str, n: usize) -> String {
    let line = one_line(s);
    if line.chars().count() > n {
        let head: String = line.chars().take(n.saturating_sub(3)).collect();
        format!("{head}...")
    } else {
        line
    }
}

// ---------------------------------------------------------------------------------------------------------
// Output for people
// ---------------------------------------------------------------------------------------------------------

/// A field of `v` as text, `-` when absent.
fn text(v: &Json, key: &str) -> String {
    match v.get(key) {
        Some(Json::String(s)) => one_line(s),
        Some(Json::Null) | None => "-".to_string(),
        Some(other) => one_line(&other.to_string()),
    }
}

fn uint(v: &Json, key: &str) -> Option<u64> {
    v.get(key).and_then(Json::as_u64)
}

/// A count, `-` when absent.
fn count(v: &Json, key: &str) -> String {
    uint(v, key).map_or_else(|| "-".to_string(), |n| n.to_string())
}

/// Bytes for people, in powers of 1024: `512B`, `5.0KiB`, `96KiB`, `1.2MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n}B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1023.95 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value < 9.95 {
        format!("{value:.1}{}", UNITS[unit])
    } else {
        format!("{value:.0}{}", UNITS[unit])
    }
}

/// A weight: whole numbers as such, others with up to two decimals.
fn weight_text(w: f64) -> String {
    if (w - w.round()).abs() < 0.005 {
        format!("{}", w.round() as i64)
    } else {
        let s = format!("{w:.2}");
        s.trim_end_matches('0').to_string()
    }
}

/// What a command prints for people, from the server's answer.
fn render(command: &CtlCommand, v: &Json) -> String {
    match command {
        CtlCommand::Status { .. } => status_table(v),
        CtlCommand::Drain { target }
        | CtlCommand::Ready { target }
        | CtlCommand::Maint { target } => format!(
            "{}: state {}{}\n",
            one_line(&target.to_string()),
            text(v, "state"),
            rotation(v)
        ),
        CtlCommand::Weight { target, .. } => format!(
            "{}: weight {}{}\n",
            one_line(&target.to_string()),
            text(v, "weight"),
            match v.get("effective_weight").and_then(Json::as_f64) {
                Some(e) if Some(e) != v.get("weight").and_then(Json::as_f64) =>
                    format!(" (effective {} while it ramps up)", weight_text(e)),
                _ => String::new(),
            }
        ),
        CtlCommand::Add { service, .. } => format!(
            "{}/{}: added {}, weight {}{}\n",
            one_line(service),
            text(v, "id"),
            text(v, "address"),
            text(v, "weight"),
            if v.get("backup") == Some(&Json::Bool(true)) {
                ", backup"
            } else {
                ""
            }
        ),
        CtlCommand::Remove { target, .. } => {
            let deadline = v
                .get("drain_deadline")
                .and_then(Json::as_f64)
                .map_or_else(|| "-".to_string(), |d| format!("{}s", weight_text(d)));
            let open = match uint(v, "active") {
                Some(0) => "no connection open".to_string(),
                Some(1) => format!("its 1 connection is reset if still open after {deadline}"),
                Some(n) => format!("its {n} connections are reset if still open after {deadline}"),
                None => format!("connections still open after {deadline} are reset"),
            };
            format!(
                "{}: removing: out of rotation, gone once drained; {open}\n",
                one_line(&target.to_string()),
            )
        }
        CtlCommand::Reload => {
            let mut line = format!("reload: {}", text(v, "result"));
            if let Some(fields) = v.as_object() {
                for (k, field) in fields.iter().filter(|(k, _)| k.as_str() != "result") {
                    let shown = match field {
                        Json::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let _ = write!(line, ", {k}: {}", cut(&shown, 200));
                }
            }
            format!("{}\n", one_line(&line))
        }
    }
}

/// `, not in rotation (health down)` and the like, for a state change; empty when in rotation.
fn rotation(v: &Json) -> String {
    if v.get("in_rotation") != Some(&Json::Bool(false)) {
        return String::new();
    }
    let health = v
        .get("health")
        .map_or("-".to_string(), |h| text(h, "status"));
    match (text(v, "state").as_str(), health.as_str()) {
        ("ready", "down") => " (not in rotation: health down)".to_string(),
        ("ready", _) if v.get("removing") == Some(&Json::Bool(true)) => {
            " (not in rotation: removing)".to_string()
        }
        _ => match uint(v, "active") {
            Some(n) => format!(" ({n} active connection{})", if n == 1 { "" } else { "s" }),
            None => String::new(),
        },
    }
}

const COLUMNS: [&str; 10] = [
    "ID", "ADDRESS", "STATE", "HEALTH", "WEIGHT", "ACTIVE", "TOTAL", "IN", "OUT", "ERRORS",
];
/// Columns aligned right: the numbers, from WEIGHT on.
const RIGHT_FROM: usize = 4;

/// `GET /api/v1/services` (or one service) as a table per service.
fn status_table(v: &Json) -> String {
    let services: Vec<&Json> = match v.get("services").and_then(Json::as_array) {
        Some(list) => list.iter().collect(),
        None => vec![v],
    };
    if services.is_empty() {
        return "no services\n".to_string();
    }
    let mut out = String::new();
    for (i, service) in services.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&service_header(service));
        let backends = service
            .get("backends")
            .and_then(Json::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if backends.is_empty() {
            out.push_str("  (no backends)\n");
            continue;
        }
        let rows: Vec<[String; 10]> = backends.iter().map(backend_row).collect();
        out.push_str(&table(&rows));
    }
    out
}

/// `default  listen 127.0.0.1:3000  round-robin  queue 0  active 3`.
fn service_header(s: &Json) -> String {
    let listen = match s.get("listen").and_then(Json::as_array) {
        Some(l) if !l.is_empty() => l
            .iter()
            .map(|a| a.as_str().map_or_else(|| a.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".to_string(),
    };
    let mut line = format!(
        "{}  listen {}  {}  queue {}  active {}",
        text(s, "name"),
        one_line(&listen),
        text(s, "strategy"),
        count(s, "queue"),
        count(s, "active"),
    );
    if s.get("shutting_down") == Some(&Json::Bool(true)) {
        line.push_str("  SHUTTING DOWN");
    }
    line.push('\n');
    line
}

fn backend_row(b: &Json) -> [String; 10] {
    let mut state = text(b, "state");
    if b.get("removing") == Some(&Json::Bool(true)) {
        state.push_str(",removing");
    }
    if b.get("backup") == Some(&Json::Bool(true)) {
        state.push_str(",backup");
    }
    let health = b
        .get("health")
        .map_or("-".to_string(), |h| text(h, "status"));
    let weight = format!(
        "{}/{}",
        b.get("effective_weight")
            .and_then(Json::as_f64)
            .map_or("-".to_string(), weight_text),
        count(b, "weight")
    );
    let bytes = |key| uint(b, key).map_or("-".to_string(), human_bytes);
    [
        text(b, "id"),
        text(b, "address"),
        state,
        health,
        weight,
        count(b, "active"),
        count(b, "total"),
        bytes("bytes_to_backend"),
        bytes("bytes_to_client"),
        count(b, "connect_errors"),
    ]
}

/// The rows under the column heads, two spaces apart, numbers aligned right; no trailing spaces.
fn table(rows: &[[String; 10]]) -> String {
    let mut widths = COLUMNS.map(|c| c.chars().count());
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let heads = COLUMNS.map(str::to_string);
    for row in std::iter::once(&heads).chain(rows) {
        let mut line = String::from("  ");
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            if i >= RIGHT_FROM {
                let _ = write!(line, "{cell:>w$}");
            } else {
                let _ = write!(line, "{cell:<w$}");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_split_at_the_first_slash() {
        let t = parse_target("default/127.0.0.1:8081").unwrap();
        assert_eq!(
            (t.service.as_str(), t.id.as_str()),
            ("default", "127.0.0.1:8081")
        );
        let t = parse_target("web/a/b").unwrap();
        assert_eq!((t.service.as_str(), t.id.as_str()), ("web", "a/b"));
        assert!(parse_target("127.0.0.1:8081")
            .unwrap_err()
            .contains("'127.0.0.1:8081' has no '/'"));
        for bad in ["/x", "x/", "/"] {
            assert!(
                parse_target(bad).unwrap_err().contains("both sides"),
                "{bad}"
            );
        }
    }

    #[test]
    fn ids_are_url_encoded() {
        let t = parse_target("my svc/127.0.0.1:8081").unwrap();
        assert_eq!(
            backend_path(&t),
            "/api/v1/services/my%20svc/backends/127.0.0.1%3A8081"
        );
        let call = call_for(&CtlCommand::Remove {
            target: parse_target("default/a/b").unwrap(),
            deadline: Some(Duration::from_millis(1500)),
        });
        assert_eq!(call.method, Method::DELETE);
        assert_eq!(
            call.path,
            "/api/v1/services/default/backends/a%2Fb?deadline=1500ms"
        );
    }

    #[test]
    fn bodies() {
        let call = call_for(&CtlCommand::Add {
            service: "default".into(),
            address: "127.0.0.1:8083".into(),
            weight: Some(2),
            id: Some("app-3".into()),
            backup: true,
        });
        assert_eq!(call.path, "/api/v1/services/default/backends");
        assert_eq!(
            call.body,
            Some(json!({"address": "127.0.0.1:8083", "weight": 2, "id": "app-3", "backup": true}))
        );
        let call = call_for(&CtlCommand::Weight {
            target: parse_target("default/x").unwrap(),
            weight: 5,
        });
        assert_eq!(
            (call.method, call.body),
            (Method::PATCH, Some(json!({"weight": 5})))
        );
    }

    #[test]
    fn admin_addresses() {
        assert_eq!(
            Admin::parse("127.0.0.1:9100", "--admin").unwrap().addr,
            "127.0.0.1:9100".parse().unwrap()
        );
        assert!(Admin::parse("[::1]:9100", "--admin").is_ok());
        for (bad, want) in [
            ("nonsense", "'nonsense' is not HOST:PORT"),
            ("127.0.0.1:99999", "has no valid port"),
            ("127.0.0.1:", "has no valid port"),
            (":9100", "is not HOST:PORT"),
        ] {
            match Admin::parse(bad, "--admin") {
                Err(Failure::Usage(e)) => assert!(e.contains(want), "{bad}: {e}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn bytes_and_weights_for_people() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1023), "1023B");
        assert_eq!(human_bytes(5120), "5.0KiB");
        assert_eq!(human_bytes(98304), "96KiB");
        assert_eq!(human_bytes(1024 * 1024 - 1), "1.0MiB");
        assert_eq!(human_bytes(1_300_000), "1.2MiB");
        assert_eq!(human_bytes(u64::MAX), "16EiB");
        assert_eq!(weight_text(1.0), "1");
        assert_eq!(weight_text(0.35), "0.35");
        assert_eq!(weight_text(2.5), "2.5");
    }

    #[test]
    fn the_table() {
        let v = json!({"services": [{"name": "default", "listen": ["127.0.0.1:3000"],
            "strategy": "round-robin", "queue": 0, "active": 1, "shutting_down": false,
            "backends": [
                {"id": "127.0.0.1:8081", "address": "127.0.0.1:8081", "weight": 1,
                 "effective_weight": 1.0, "state": "ready", "removing": false, "backup": false,
                 "in_rotation": true, "health": {"status": "up", "since": 1.0, "last_check": ""},
                 "active": 1, "total": 42, "bytes_to_backend": 5120, "bytes_to_client": 98304,
                 "connect_errors": 0},
                {"id": "app-\u{1b}[2J", "address": "127.0.0.1:8082", "weight": 12,
                 "effective_weight": 0.5, "state": "drain", "backup": true,
                 "health": {"status": "down"}, "active": 0, "total": 1234567,
                 "bytes_to_backend": 0, "bytes_to_client": 0, "connect_errors": 3}]}]});
        let table = status_table(&v);
        let want = "\
default  listen 127.0.0.1:3000  round-robin  queue 0  active 1
  ID              ADDRESS         STATE         HEALTH  WEIGHT  ACTIVE    TOTAL      IN    OUT  ERRORS
  127.0.0.1:8081  127.0.0.1:8081  ready         up         1/1       1       42  5.0KiB  96KiB       0
  app-\\u{1b}[2J   127.0.0.1:8082  drain,backup  down    0.5/12       0  1234567      0B     0B       3
";
        assert_eq!(table, want, "\n{table}");
        // A field the server does not send shows as `-`; no backends says so.
        let table = status_table(&json!({"name": "x", "backends": []}));
        assert_eq!(
            table,
            "x  listen -  -  queue -  active -\n  (no backends)\n"
        );
    }

    #[test]
    fn error_lines() {
        let a = Answer {
            status: StatusCode::NOT_FOUND,
            body: Bytes::from_static(b"{\"error\":\"no service \\\"x\\\"\"}\n"),
        };
        assert_eq!(a.error_line(), "no service \"x\"");
        let a = Answer {
            status: StatusCode::BAD_GATEWAY,
            body: Bytes::from_static(b"<html>\nbad</html>"),
        };
        assert_eq!(a.error_line(), "bad gateway: <html>\\nbad</html>");
        let e = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_words(&e), "connection refused");
    }
}
