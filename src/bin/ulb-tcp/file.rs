//! The configuration file (`--config FILE`, `ulb-tcp check FILE`): TOML, an `[admin]` table, process
//! keys at the top, and one `[[services]]` table per service.
//!
//! Every key of a service is a flag of the balancer, spelled with `_` (`connect_timeout = "3s"` is
//! `--connect-timeout 3s`), and a service goes through the flags' own parser, defaults and validation:
//! the file and the command line cannot disagree on a name, a default or a range, and a flag added
//! later has its key at once. What has more shape in a file than on a command line is read here:
//! `listen` (one address or several), `backends` and `backup` (a list of `"HOST:PORT[@WEIGHT]"` strings
//! or `{ address, weight, id, backup, max_connections }` tables) and `check` (a mode, or a table of the
//! `--check-*` flags without their prefix).
//!
//! Errors are one line, `FILE:LINE: message`, naming the key.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};

use clap::{CommandFactory, Parser};
use toml::de::{DeArray, DeTable, DeValue};
use toml::Spanned;
use ulb_tcp::config::BackendSpec;
use ulb_tcp::{BalancerConfig, ConfigError};

use crate::cli::{self, AdminArgs, BalancerArgs, LogFormat, RuntimeArg};

/// A whole configuration file, read and validated.
#[derive(Debug)]
pub struct FileConfig {
    pub path: PathBuf,
    /// FNV-1a of the file's bytes: `ulb_config_hash`, and what a reload reports.
    pub hash: u32,
    pub admin: AdminArgs,
    pub log_format: Option<LogFormat>,
    pub threads: Option<NonZeroUsize>,
    pub runtime: Option<RuntimeArg>,
    pub services: Vec<ServiceFile>,
}

/// One `[[services]]` table.
#[derive(Debug)]
pub struct ServiceFile {
    pub name: String,
    pub listen: Vec<SocketAddr>,
    /// Its settings as flags, backends and listeners left out: two services with the same settings
    /// differ only in what a running balancer can change in place.
    pub settings: Vec<String>,
    pub config: BalancerConfig,
}

/// What is wrong with a file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for FileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// The balancer's flags alone: what a service table is parsed with.
#[derive(Debug, Parser)]
#[command(name = "service", no_binary_name = true)]
struct ServiceFlags {
    #[command(flatten)]
    args: BalancerArgs,
}

/// Keys of a service that are flags of the whole process, not of one service.
const PROCESS_KEYS: &[&str] = &[
    "admin",
    "metrics",
    "admin_token_file",
    "log_format",
    "runtime",
    "threads",
];

/// Reads and validates `path`. Host names are resolved, as at start; nothing is bound.
pub async fn load(path: &Path, fd_limit: Option<u64>) -> Result<FileConfig, FileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| FileError {
        path: shown.clone(),
        line: None,
        message: format!("cannot read it: {e}"),
    })?;
    parse(&shown, &text, fd_limit).await.map(|mut c| {
        c.path = path.to_path_buf();
        c
    })
}

/// Parses and validates `text`, the content of the file `path`.
pub async fn parse(path: &str, text: &str, fd_limit: Option<u64>) -> Result<FileConfig, FileError> {
    let doc = Doc { path, text };
    let root = DeTable::parse(text).map_err(|e| FileError {
        path: path.to_string(),
        line: e.span().map(|s| doc.line_of(s.start)),
        message: one_line(e.message()),
    })?;
    let mut config = FileConfig {
        path: PathBuf::from(path),
        hash: fnv1a(text.as_bytes()),
        admin: AdminArgs {
            admin: None,
            metrics: None,
            admin_token_file: None,
        },
        log_format: None,
        threads: None,
        runtime: None,
        services: Vec::new(),
    };
    let mut services = None;
    for (key, value) in root.get_ref().iter() {
        match key.get_ref().as_ref() {
            "admin" => config.admin = doc.admin(value)?,
            "log_format" => {
                let s = doc.string(key, value)?;
                config.log_format = Some(
                    <LogFormat as clap::ValueEnum>::from_str(s, false).map_err(|_| {
                        doc.err(value, format!("log_format: '{s}' is not text or json"))
                    })?,
                );
            }
            "threads" => {
                let n = doc.integer(key, value)?;
                let n = usize::try_from(n)
                    .ok()
                    .filter(|n| (1..=ulb_tcp::MAX_THREADS).contains(n))
                    .and_then(NonZeroUsize::new)
                    .ok_or_else(|| {
                        doc.err(
                            value,
                            format!(
                                "threads: {n} is out of range (1..={})",
                                ulb_tcp::MAX_THREADS
                            ),
                        )
                    })?;
                config.threads = Some(n);
            }
            "runtime" => {
                let s = doc.string(key, value)?;
                config.runtime = Some(
                    <RuntimeArg as clap::ValueEnum>::from_str(s, false).map_err(|_| {
                        doc.err(
                            value,
                            format!("runtime: '{s}' is not per-core or work-stealing"),
                        )
                    })?,
                );
            }
            "services" => services = Some(value),
            other => {
                return Err(doc.err(
                    key,
                    format!(
                        "unknown key '{}' at the top level (expected admin, services, log_format, \
                         threads or runtime)",
                        other.escape_debug()
                    ),
                ))
            }
        }
    }
    let Some(services) = services else {
        return Err(FileError {
            path: path.to_string(),
            line: None,
            message: "no [[services]]: a file names at least one service".into(),
        });
    };
    let DeValue::Array(list) = services.get_ref() else {
        return Err(doc.err(services, "services: expected [[services]] tables".into()));
    };
    let mut names = HashSet::new();
    let mut listening: Vec<(SocketAddr, String)> = Vec::new();
    for entry in list.iter() {
        let DeValue::Table(table) = entry.get_ref() else {
            return Err(doc.err(entry, "services: expected [[services]] tables".into()));
        };
        let service = doc.service(entry, table, fd_limit).await?;
        if !names.insert(service.name.clone()) {
            return Err(doc.err(
                entry,
                format!("service '{}' is defined twice", service.name),
            ));
        }
        for addr in &service.listen {
            if let Some((_, other)) = listening.iter().find(|(a, _)| a == addr) {
                let at = doc
                    .find(table, "listen")
                    .map_or(entry.span(), |(_, v)| v.span());
                return Err(doc.err_at(
                    at,
                    format!("listen: {addr} is already a listener of service '{other}'"),
                ));
            }
            listening.push((*addr, service.name.clone()));
        }
        config.services.push(service);
    }
    if config.services.is_empty() {
        return Err(doc.err(
            services,
            "no [[services]]: a file names at least one service".into(),
        ));
    }
    Ok(config)
}

/// The file being read, for error positions.
struct Doc<'a> {
    path: &'a str,
    text: &'a str,
}

/// A setting of a service: its key, the flags it stands for, and where it is in the file.
type Setting = (String, Vec<String>, Range<usize>);

/// One entry of `backends` or `backup`.
struct BackendEntry {
    spec: String,
    span: Range<usize>,
    id: Option<String>,
    backup: bool,
    max_connections: Option<u32>,
}

impl Doc<'_> {
    fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err_at(&self, span: Range<usize>, message: String) -> FileError {
        FileError {
            path: self.path.to_string(),
            line: Some(self.line_of(span.start)),
            message: one_line(&message),
        }
    }

    fn err<T>(&self, at: &Spanned<T>, message: String) -> FileError {
        self.err_at(at.span(), message)
    }

    fn find<'t, 'i>(
        &self,
        table: &'t DeTable<'i>,
        key: &str,
    ) -> Option<(
        &'t Spanned<std::borrow::Cow<'i, str>>,
        &'t Spanned<DeValue<'i>>,
    )> {
        table.iter().find(|(k, _)| k.get_ref().as_ref() == key)
    }

    fn string<'v>(
        &self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &'v Spanned<DeValue<'_>>,
    ) -> Result<&'v str, FileError> {
        match value.get_ref() {
            DeValue::String(s) => Ok(s.as_ref()),
            _ => Err(self.err(value, format!("{}: expected a string", key.get_ref()))),
        }
    }

    fn integer(
        &self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<i64, FileError> {
        match value.get_ref() {
            DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix())
                .map_err(|_| self.err(value, format!("{}: {} is too large", key.get_ref(), i))),
            _ => Err(self.err(value, format!("{}: expected an integer", key.get_ref()))),
        }
    }

    /// `[admin]`: `listen` and `token_file`.
    fn admin(&self, value: &Spanned<DeValue<'_>>) -> Result<AdminArgs, FileError> {
        let DeValue::Table(table) = value.get_ref() else {
            return Err(self.err(value, "admin: expected a table ([admin])".into()));
        };
        let mut admin = AdminArgs {
            admin: None,
            metrics: None,
            admin_token_file: None,
        };
        for (key, value) in table.iter() {
            match key.get_ref().as_ref() {
                "listen" => {
                    let s = self.string(key, value)?;
                    admin.admin = Some(s.trim().parse().map_err(|_| {
                        self.err(
                            value,
                            format!("admin.listen: '{s}' is not an IP:PORT address"),
                        )
                    })?);
                }
                "token_file" => {
                    admin.admin_token_file = Some(PathBuf::from(self.string(key, value)?));
                }
                other => {
                    return Err(self.err(
                        key,
                        format!(
                            "unknown key '{}' in [admin] (expected listen or token_file)",
                            other.escape_debug()
                        ),
                    ))
                }
            }
        }
        if admin.admin_token_file.is_some() && admin.admin.is_none() {
            return Err(self.err(value, "admin.token_file needs admin.listen".into()));
        }
        // What the admin server would refuse at start, refused here with its line.
        if let Some((k, v)) = self.find(table, "token_file") {
            if let Some(path) = &admin.admin_token_file {
                if let Err(e) = ulb_tcp::admin::AdminOptions::new().token_file(path) {
                    return Err(self.err_at(
                        k.span().start..v.span().end,
                        format!("admin.token_file: {e}"),
                    ));
                }
            }
        }
        if let (Some(addr), None) = (admin.admin, &admin.admin_token_file) {
            let ip = addr.ip();
            let loopback = ip.is_loopback()
                || matches!(ip, std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()));
            if !loopback {
                let at = self
                    .find(table, "listen")
                    .map_or(value.span(), |(_, v)| v.span());
                return Err(self.err_at(
                    at,
                    format!(
                        "admin.listen {addr} is not a loopback address: the admin API is not served \
                         there without a token (set admin.token_file, or use 127.0.0.1)"
                    ),
                ));
            }
        }
        Ok(admin)
    }

    /// One `[[services]]` table, through the balancer's flag parser.
    async fn service(
        &self,
        at: &Spanned<DeValue<'_>>,
        table: &DeTable<'_>,
        fd_limit: Option<u64>,
    ) -> Result<ServiceFile, FileError> {
        let command = ServiceFlags::command();
        let mut name = None;
        let mut listen = Vec::new();
        let mut entries: Vec<BackendEntry> = Vec::new();
        // Each setting as flags, with where it came from.
        let mut settings: Vec<Setting> = Vec::new();
        for (key, value) in table.iter() {
            let k = key.get_ref().as_ref();
            match k {
                "name" => {
                    let s = self.string(key, value)?;
                    ulb_tcp::admin::Services::check_name(s)
                        .map_err(|e| self.err(value, format!("name: {e}")))?;
                    name = Some(s.to_string());
                }
                "listen" => listen = self.addresses(key, value)?,
                "backends" | "backup" => {
                    entries.extend(self.backends(key, value, k == "backup")?);
                }
                "check" => settings.extend(self.check(&command, key, value)?),
                k if PROCESS_KEYS.contains(&k) => {
                    return Err(self.err(
                        key,
                        format!(
                            "'{k}' applies to the whole process, not to one service: set it {}",
                            if k == "admin" || k == "metrics" || k == "admin_token_file" {
                                "in [admin]"
                            } else {
                                "at the top level of the file"
                            }
                        ),
                    ))
                }
                _ => settings.push(self.setting(&command, key, value, k)?),
            }
        }
        let name =
            name.ok_or_else(|| self.err(at, "a service needs a name (name = \"web\")".into()))?;
        if listen.is_empty() {
            return Err(self.err(
                at,
                format!("service '{name}' needs listen = \"IP:PORT\" (or a list of them)"),
            ));
        }
        if entries.iter().all(|e| e.backup) {
            return Err(self.err(
                at,
                format!("service '{name}' has no backends (backends = [\"HOST:PORT\", ...])"),
            ));
        }
        // Each setting alone first, so that an error names its own key and line.
        for (_, flags, span) in &settings {
            let mut argv = vec!["--backends".to_string(), "127.0.0.1:1".to_string()];
            argv.extend(flags.iter().cloned());
            if let Err(e) = ServiceFlags::try_parse_from(&argv) {
                if e.kind() != clap::error::ErrorKind::MissingRequiredArgument
                    && e.kind() != clap::error::ErrorKind::ArgumentConflict
                {
                    return Err(
                        self.err_at(span.clone(), keys_for_flags(&cli::usage_error_line(&e)))
                    );
                }
            }
        }
        // Then all together, with the backends: a conflict between two keys, a key another needs.
        let mut argv = Vec::new();
        for e in entries.iter().filter(|e| !e.backup) {
            argv.extend(["--backends".to_string(), e.spec.clone()]);
        }
        for e in entries.iter().filter(|e| e.backup) {
            argv.extend(["--backup".to_string(), e.spec.clone()]);
        }
        let mut flags: Vec<String> = settings.iter().flat_map(|(_, f, _)| f.clone()).collect();
        argv.append(&mut flags.clone());
        let parsed = ServiceFlags::try_parse_from(&argv).map_err(|e| {
            let line = cli::usage_error_line(&e);
            let span = settings
                .iter()
                .find(|(k, _, _)| line.contains(&format!("--{}", k.replace('_', "-"))))
                .map_or(at.span(), |(_, _, s)| s.clone());
            self.err_at(span, keys_for_flags(&line))
        })?;
        // The backends in the order `into_config` lists them: primaries, then backups.
        let ordered: Vec<&BackendEntry> = entries
            .iter()
            .filter(|e| !e.backup)
            .chain(entries.iter().filter(|e| e.backup))
            .collect();
        // A backend's id is its id key, or its HOST:PORT as written.
        let mut ids = HashSet::new();
        for e in &ordered {
            let id = e.id.clone().unwrap_or_else(|| {
                e.spec
                    .rsplit_once('@')
                    .map_or(e.spec.as_str(), |(hp, _)| hp)
                    .trim()
                    .to_string()
            });
            if !ids.insert(id.clone()) {
                return Err(self.err_at(
                    e.span.clone(),
                    format!(
                        "service '{name}': backend '{id}' is listed twice (list it once, or give \
                         each an id = \"...\")"
                    ),
                ));
            }
        }
        let mut config = parsed.args.into_config(fd_limit).await.map_err(|e| {
            let words = keys_for_flags(&cli::in_flag_words(&e));
            let span = match &e {
                ConfigError::BadBackend { value, .. } => ordered
                    .iter()
                    .find(|b| b.spec == *value)
                    .map(|b| b.span.clone()),
                ConfigError::OutOfRange { field, .. } => settings
                    .iter()
                    .find(|(k, _, _)| k == field)
                    .map(|(_, _, s)| s.clone()),
                ConfigError::Unsupported { field, .. } => settings
                    .iter()
                    .find(|(k, _, _)| k == field)
                    .map(|(_, _, s)| s.clone()),
                _ => None,
            }
            // Else the key the message names first.
            .or_else(|| {
                settings
                    .iter()
                    .filter_map(|(k, _, s)| words.find(k.as_str()).map(|i| (i, s)))
                    .min_by_key(|(i, _)| *i)
                    .map(|(_, s)| s.clone())
            });
            self.err_at(
                span.unwrap_or(at.span()),
                format!("service '{name}': {words}"),
            )
        })?;
        let mut ids = HashSet::new();
        for (backend, entry) in config.backends.iter_mut().zip(&ordered) {
            if let Some(id) = &entry.id {
                backend.id = id.clone();
            }
            if let Some(cap) = entry.max_connections {
                backend.max_connections = Some(cap);
            }
            if !ids.insert(backend.id.clone()) {
                return Err(self.err_at(
                    entry.span.clone(),
                    format!(
                        "service '{name}': backend id '{}' is used twice (give one of them an id = \"...\")",
                        backend.id
                    ),
                ));
            }
            backend.validate().map_err(|e| {
                self.err_at(
                    entry.span.clone(),
                    format!(
                        "service '{name}': {}",
                        keys_for_flags(&cli::in_flag_words(&e))
                    ),
                )
            })?;
        }
        config.service = Some(name.clone());
        config.validate().map_err(|e| {
            self.err(
                at,
                format!(
                    "service '{name}': {}",
                    keys_for_flags(&cli::in_flag_words(&e))
                ),
            )
        })?;
        flags.sort();
        Ok(ServiceFile {
            name,
            listen,
            settings: flags,
            config,
        })
    }

    /// `listen`: one address or a list.
    fn addresses(
        &self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<Vec<SocketAddr>, FileError> {
        let one = |v: &Spanned<DeValue<'_>>| -> Result<SocketAddr, FileError> {
            let s = self.string(key, v)?;
            s.trim()
                .parse()
                .map_err(|_| self.err(v, format!("listen: '{s}' is not an IP:PORT address")))
        };
        let list = match value.get_ref() {
            DeValue::Array(items) => items.iter().map(one).collect::<Result<Vec<_>, _>>()?,
            _ => vec![one(value)?],
        };
        if list.is_empty() {
            return Err(self.err(value, "listen: the list is empty".into()));
        }
        for (i, a) in list.iter().enumerate() {
            if list[..i].contains(a) {
                return Err(self.err(value, format!("listen: {a} is listed twice")));
            }
        }
        Ok(list)
    }

    /// `backends` or `backup`: strings or tables.
    fn backends(
        &self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
        backup: bool,
    ) -> Result<Vec<BackendEntry>, FileError> {
        let k = key.get_ref();
        let DeValue::Array(items) = value.get_ref() else {
            return Err(self.err(
                value,
                format!("{k}: expected a list ([\"HOST:PORT\", {{ address = \"HOST:PORT\", weight = 2 }}])"),
            ));
        };
        items
            .iter()
            .map(|item| self.backend(k, item, backup))
            .collect()
    }

    fn backend(
        &self,
        list: &str,
        item: &Spanned<DeValue<'_>>,
        backup: bool,
    ) -> Result<BackendEntry, FileError> {
        let mut entry = BackendEntry {
            spec: String::new(),
            span: item.span(),
            id: None,
            backup,
            max_connections: None,
        };
        match item.get_ref() {
            DeValue::String(s) => entry.spec = s.to_string(),
            DeValue::Table(t) => {
                let mut weight = None;
                for (key, value) in t.iter() {
                    match key.get_ref().as_ref() {
                        "address" => entry.spec = self.string(key, value)?.to_string(),
                        "weight" => weight = Some(self.integer(key, value)?),
                        "id" | "name" => entry.id = Some(self.string(key, value)?.to_string()),
                        "backup" => match value.get_ref() {
                            DeValue::Boolean(b) => entry.backup = *b || backup,
                            _ => {
                                return Err(self.err(value, "backup: expected true or false".into()))
                            }
                        },
                        "max_connections" => {
                            let n = self.integer(key, value)?;
                            entry.max_connections = Some(
                                u32::try_from(n).ok().filter(|&n| n > 0).ok_or_else(|| {
                                    self.err(
                                        value,
                                        format!(
                                            "max_connections: {n} is out of range (1..={})",
                                            ulb_tcp::config::MAX_CONNECTIONS
                                        ),
                                    )
                                })?,
                            );
                        }
                        other => {
                            return Err(self.err(
                                key,
                                format!(
                                    "unknown key '{}' in a backend of {list} (expected address, \
                                     weight, id, backup or max_connections)",
                                    other.escape_debug()
                                ),
                            ))
                        }
                    }
                }
                if entry.spec.is_empty() {
                    return Err(self.err(item, format!("a backend of {list} needs an address")));
                }
                if let Some(w) = weight {
                    if entry.spec.contains('@') {
                        return Err(self.err(
                            item,
                            format!(
                                "backend '{}' has a weight twice (in address and weight)",
                                entry.spec
                            ),
                        ));
                    }
                    entry.spec = format!("{}@{w}", entry.spec);
                }
            }
            _ => {
                return Err(self.err(
                    item,
                    format!("{list}: expected \"HOST:PORT[@WEIGHT]\" or {{ address = ... }}"),
                ))
            }
        }
        // The spec's own syntax, here, so that its error has its line.
        entry.spec.parse::<BackendSpec>().map_err(|e| {
            self.err_at(
                entry.span.clone(),
                format!("{list}: {}", cli::in_flag_words(&e)),
            )
        })?;
        Ok(entry)
    }

    /// `check = "http"`, or `check = { mode = "http", path = "/health", interval = "1s", ... }`: the
    /// table's keys are the `--check-*` flags without their prefix, and `rise`, `fall`.
    fn check(
        &self,
        command: &clap::Command,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Result<Vec<Setting>, FileError> {
        let DeValue::Table(table) = value.get_ref() else {
            return Ok(vec![self.setting(command, key, value, "check")?]);
        };
        let mut out = Vec::new();
        for (k, v) in table.iter() {
            let name = k.get_ref().as_ref();
            let flag = match name {
                "mode" => "check".to_string(),
                "rise" | "fall" | "on_down" => name.to_string(),
                _ => format!("check_{name}"),
            };
            if name.starts_with("check") || long(command, &flag).is_none() {
                return Err(self.err(
                    k,
                    format!(
                        "unknown key '{}' in check (expected mode, send, expect, contains, path, host, \
                         status, port, interval, timeout, rise, fall or on_down)",
                        name.escape_debug()
                    ),
                ));
            }
            out.push(self.setting(command, k, v, &flag)?);
        }
        Ok(out)
    }

    /// A key that is a flag: its value as the flag's arguments.
    fn setting(
        &self,
        command: &clap::Command,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        value: &Spanned<DeValue<'_>>,
        name: &str,
    ) -> Result<Setting, FileError> {
        let shown = key.get_ref();
        let Some(arg) = long(command, name) else {
            return Err(self.err(
                key,
                format!(
                    "unknown key '{}' in a service (every flag of `ulb-tcp --help` is a key, with _ for -)",
                    shown.escape_debug()
                ),
            ));
        };
        let flag = format!("--{}", arg.get_long().unwrap_or(name));
        let takes_values = arg.get_action().takes_values();
        let scalar = |v: &Spanned<DeValue<'_>>| -> Result<String, FileError> {
            match v.get_ref() {
                DeValue::String(s) => Ok(s.to_string()),
                DeValue::Integer(_) => Ok(self.integer(key, v)?.to_string()),
                DeValue::Float(f) => Ok(f.as_str().to_string()),
                _ => Err(self.err(v, format!("{shown}: expected a string or a number"))),
            }
        };
        let flags = match value.get_ref() {
            DeValue::Boolean(b) if !takes_values => {
                if *b {
                    vec![flag]
                } else {
                    Vec::new()
                }
            }
            _ if !takes_values => {
                return Err(self.err(value, format!("{shown}: expected true or false")))
            }
            DeValue::Array(items) if arg.get_value_delimiter().is_some() => {
                let items: &DeArray<'_> = items;
                let parts = items.iter().map(scalar).collect::<Result<Vec<_>, _>>()?;
                if parts.is_empty() {
                    Vec::new()
                } else {
                    vec![flag, parts.join(",")]
                }
            }
            DeValue::Array(_) => {
                return Err(self.err(value, format!("{shown}: expected one value, not a list")))
            }
            _ => vec![flag, scalar(value)?],
        };
        Ok((name.to_string(), flags, key.span().start..value.span().end))
    }
}

/// The flag `--name` (with `_` for `-`) of the balancer, if there is one.
fn long<'c>(command: &'c clap::Command, name: &str) -> Option<&'c clap::Arg> {
    let want = name.replace('_', "-");
    command
        .get_arguments()
        .find(|a| a.get_long() == Some(want.as_str()))
}

/// `--connect-timeout` in a message becomes `connect_timeout`, the key that sets it.
fn keys_for_flags(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find("--") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or(after.len());
        if end == 0 {
            out.push_str("--");
        } else {
            out.push_str(&after[..end].replace('-', "_"));
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |h, &b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}
