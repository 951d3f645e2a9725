//! The JSON of the admin API: what the server answers (derived `Serialize` views of the library's stats)
//! and what it takes (request bodies checked field by field, so that an error names the field and the
//! value).

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::{AdminState, BackendStats, BalancerHandle};

/// `GET /api/v1/services`.
#[derive(Debug, Serialize)]
pub(super) struct ServicesView {
    pub(super) services: Vec<ServiceView>,
}

/// One service: `GET /api/v1/services/{service}`, and each item of the list.
#[derive(Debug, Serialize)]
pub(super) struct ServiceView {
    pub(super) name: String,
    /// The addresses it accepts clients on (empty before it serves).
    pub(super) listen: Vec<String>,
    pub(super) strategy: &'static str,
    /// Clients waiting now for a backend below its cap.
    pub(super) queue: usize,
    /// Client connections carried now.
    pub(super) active: usize,
    pub(super) shutting_down: bool,
    pub(super) backends: Vec<BackendView>,
}

impl ServiceView {
    pub(super) fn new(name: &str, handle: &BalancerHandle) -> Self {
        ServiceView {
            name: name.to_string(),
            listen: handle
                .listen_addrs()
                .iter()
                .map(ToString::to_string)
                .collect(),
            strategy: handle.strategy().as_str(),
            queue: handle.queued(),
            active: handle.active_connections(),
            shutting_down: handle.is_shutting_down(),
            backends: handle.backends().iter().map(BackendView::from).collect(),
        }
    }
}

/// One backend.
#[derive(Debug, Serialize)]
pub(super) struct BackendView {
    pub(super) id: String,
    pub(super) address: String,
    pub(super) weight: u32,
    /// What the strategies use now: the weight, or less while slow start ramps it up.
    pub(super) effective_weight: f64,
    /// `ready`, `drain` or `maint`.
    pub(super) state: &'static str,
    /// Removed, and draining its last connections.
    pub(super) removing: bool,
    pub(super) backup: bool,
    /// Ready, not removed, and up: it may be given new connections.
    pub(super) in_rotation: bool,
    pub(super) health: HealthView,
    pub(super) active: usize,
    pub(super) total: u64,
    pub(super) bytes_to_backend: u64,
    pub(super) bytes_to_client: u64,
    pub(super) connect_errors: u64,
    pub(super) max_connections: Option<u32>,
}

/// A backend's health.
#[derive(Debug, Serialize)]
pub(super) struct HealthView {
    /// `up` or `down`.
    pub(super) status: &'static str,
    /// Seconds since it became what it is.
    pub(super) since: f64,
    /// The last verdict, in words (`connect: refused`, ...); empty before any.
    pub(super) last_check: String,
    /// Seconds its back-off still runs, while down.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) down_for: Option<f64>,
}

/// Seconds, to the millisecond.
fn seconds(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

impl From<&BackendStats> for BackendView {
    fn from(b: &BackendStats) -> Self {
        BackendView {
            id: b.id.clone(),
            address: b.addr.to_string(),
            weight: b.weight,
            effective_weight: (b.effective_weight * 1000.0).round() / 1000.0,
            state: b.admin.as_str(),
            removing: b.removing,
            backup: b.backup,
            in_rotation: b.in_rotation(),
            health: HealthView {
                status: if b.up { "up" } else { "down" },
                since: seconds(b.health_for),
                last_check: b.health_reason.clone(),
                down_for: b.down_for.map(seconds),
            },
            active: b.active,
            total: b.total,
            bytes_to_backend: b.bytes_to_backend,
            bytes_to_client: b.bytes_to_client,
            connect_errors: b.connect_failures,
            max_connections: b.max_connections,
        }
    }
}

/// `GET /healthz`.
#[derive(Debug, Serialize)]
pub(super) struct Healthz {
    /// `ok`, `shutting_down` or `no_backend_in_rotation`.
    pub(super) status: &'static str,
    pub(super) services: Vec<ServiceHealth>,
}

/// One service's part of `/healthz`.
#[derive(Debug, Serialize)]
pub(super) struct ServiceHealth {
    pub(super) name: String,
    pub(super) backends: usize,
    pub(super) in_rotation: usize,
    pub(super) shutting_down: bool,
}

/// `{"error": "..."}`, with every error status.
#[derive(Debug, Serialize)]
pub(super) struct ErrorBody<'a> {
    pub(super) error: &'a str,
}

/// `DELETE`'s answer: the backend, now removing, and the deadline of its drain.
#[derive(Debug, Serialize)]
pub(super) struct Removing {
    #[serde(flatten)]
    pub(super) backend: BackendView,
    pub(super) drain_deadline: f64,
}

/// An admin state as the API writes it.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum StateArg {
    Ready,
    Drain,
    Maint,
}

impl From<StateArg> for AdminState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Ready => AdminState::Ready,
            StateArg::Drain => AdminState::Drain,
            StateArg::Maint => AdminState::Maint,
        }
    }
}

/// `POST /api/v1/services/{service}/backends`.
#[derive(Debug)]
pub(super) struct AddBackend {
    pub(super) address: String,
    pub(super) weight: Option<u32>,
    pub(super) id: Option<String>,
    pub(super) backup: bool,
    pub(super) max_connections: Option<u32>,
}

impl AddBackend {
    pub(super) fn parse(body: &[u8]) -> Result<Self, String> {
        let f = Fields::parse(
            body,
            &["address", "weight", "id", "backup", "max_connections"],
        )?;
        Ok(AddBackend {
            address: f
                .get::<String>("address", "a string HOST:PORT")?
                .ok_or("address: missing (give \"address\": \"HOST:PORT\")")?,
            weight: f.get("weight", "a whole number 1-256")?,
            id: f.get("id", "a string")?,
            backup: f.get("backup", "true or false")?.unwrap_or(false),
            max_connections: f.get("max_connections", "a whole number, or null")?,
        })
    }
}

/// `PATCH /api/v1/services/{service}/backends/{id}`.
#[derive(Debug)]
pub(super) struct PatchBackend {
    pub(super) state: Option<StateArg>,
    pub(super) weight: Option<u32>,
}

impl PatchBackend {
    pub(super) fn parse(body: &[u8]) -> Result<Self, String> {
        let f = Fields::parse(body, &["state", "weight"])?;
        let patch = PatchBackend {
            state: f.get("state", "\"ready\", \"drain\" or \"maint\"")?,
            weight: f.get("weight", "a whole number 1-256")?,
        };
        if patch.state.is_none() && patch.weight.is_none() {
            return Err("nothing to change: give \"state\" and/or \"weight\"".into());
        }
        Ok(patch)
    }
}

/// A JSON object's fields, each taken with a message that names it and its value when it is not of
/// the right type.
struct Fields(Map<String, Json>);

impl Fields {
    fn parse(body: &[u8], known: &[&str]) -> Result<Fields, String> {
        let value: Json = serde_json::from_slice(body)
            .map_err(|e| format!("the body is not JSON: {}", one_line(&e.to_string())))?;
        let Json::Object(map) = value else {
            return Err(format!(
                "the body must be a JSON object, not {}",
                quote(&value)
            ));
        };
        if let Some(k) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(format!(
                "unknown field {} (expected {})",
                quote(&Json::String(k.clone())),
                known.join(", ")
            ));
        }
        Ok(Fields(map))
    }

    /// The field `key` as a `T`; `None` when absent or `null`.
    fn get<T: DeserializeOwned>(&self, key: &str, expected: &str) -> Result<Option<T>, String> {
        match self.0.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|_| format!("{key}: expected {expected}, got {}", quote(v))),
        }
    }
}

/// A JSON value as compact JSON on one line (strings quoted and escaped), cut at 80 characters.
pub(super) fn quote(v: &Json) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        let cut: String = s.chars().take(77).collect();
        format!("{cut}...")
    } else {
        s
    }
}

/// `s` with every control character (line breaks included) escaped.
pub(super) fn one_line(s: &str) -> String {
    s.chars()
        .fold(String::with_capacity(s.len()), |mut out, c| {
            if c.is_control() {
                out.extend(c.escape_default());
            } else {
                out.push(c);
            }
            out
        })
}

/// Parses a drain deadline: `250ms`, `30s`, `5m`, `1h`, `2d`, or a bare number of seconds, at most
/// [`MAX_DURATION`](crate::config::MAX_DURATION).
pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "deadline: {} is not a duration (try 250ms, 30s or 5m)",
            quote(&Json::String(s.to_string()))
        )
    };
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num.parse().map_err(|_| bad())?;
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(bad()),
    };
    match Duration::try_from_secs_f64(value * scale) {
        Ok(d) if d <= crate::config::MAX_DURATION => Ok(d),
        _ => Err(format!(
            "deadline: {} is too long (at most 24 days)",
            quote(&Json::String(s.to_string()))
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_backend_bodies() {
        let a = AddBackend::parse(br#"{"address": "127.0.0.1:8081", "weight": 2}"#).unwrap();
        assert_eq!(a.address, "127.0.0.1:8081");
        assert_eq!(a.weight, Some(2));
        assert!(!a.backup);
        let a = AddBackend::parse(
            br#"{"address": "h:1", "id": "x", "backup": true, "max_connections": null}"#,
        )
        .unwrap();
        assert_eq!(
            (a.id.as_deref(), a.backup, a.max_connections),
            (Some("x"), true, None)
        );
        for (body, want) in [
            (&br#"{"weight": 2}"#[..], "address: missing"),
            (
                br#"{"address": 5}"#,
                "address: expected a string HOST:PORT, got 5",
            ),
            (
                br#"{"address": "h:1", "weight": "x"}"#,
                r#"weight: expected a whole number 1-256, got "x""#,
            ),
            (br#"{"address": "h:1", "weight": -1}"#, "got -1"),
            (
                br#"{"address": "h:1", "weight": 4294967296}"#,
                "got 4294967296",
            ),
            (
                br#"{"address": "h:1", "backup": "yes"}"#,
                r#"backup: expected true or false, got "yes""#,
            ),
            (
                br#"{"address": "h:1", "colour": 1}"#,
                r#"unknown field "colour" (expected address,"#,
            ),
            (br#"[1]"#, "must be a JSON object, not [1]"),
            (b"{", "the body is not JSON"),
            (b"", "the body is not JSON"),
        ] {
            let e = AddBackend::parse(body).unwrap_err();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(body));
            assert!(!e.chars().any(char::is_control), "{e:?}");
        }
    }

    #[test]
    fn patch_bodies() {
        let p = PatchBackend::parse(br#"{"state": "drain"}"#).unwrap();
        assert!(matches!(p.state, Some(StateArg::Drain)));
        let p = PatchBackend::parse(br#"{"weight": 3}"#).unwrap();
        assert_eq!(p.weight, Some(3));
        let e = PatchBackend::parse(br#"{"state": "down"}"#).unwrap_err();
        assert_eq!(
            e,
            r#"state: expected "ready", "drain" or "maint", got "down""#
        );
        assert!(PatchBackend::parse(b"{}")
            .unwrap_err()
            .contains("nothing to change"));
        // A value with a line break in it stays on one line.
        let e = PatchBackend::parse(b"{\"state\": \"a\\nb\"}").unwrap_err();
        assert!(!e.contains('\n'), "{e:?}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert!(parse_duration("-1s").unwrap_err().contains(r#""-1s""#));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("30d").unwrap_err().contains("too long"));
    }

    #[test]
    fn long_values_are_cut() {
        let v = Json::String("x".repeat(500));
        assert_eq!(quote(&v).chars().count(), 80);
    }
}
