//! Requests to answers: the paths the admin server knows, their methods, the token, and each endpoint.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use percent_encoding::{percent_decode_str, utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Serialize;

use super::api::{
    self, AddBackend, BackendView, ErrorBody, Healthz, PatchBackend, Removing, ServiceHealth,
    ServiceView, ServicesView,
};
use super::page;
use super::token::Token;
use super::Services;
use crate::metrics::PrometheusHandle;
use crate::{BackendConfig, BackendError, BackendSpec, BalancerHandle};

pub(super) type Body = Full<Bytes>;

/// What every request may need, shared by the connections.
#[derive(Debug)]
pub(super) struct Ctx {
    pub(super) services: Services,
    pub(super) token: Option<Token>,
    pub(super) metrics: Option<PrometheusHandle>,
    pub(super) reload: Option<super::ReloadHook>,
    pub(super) max_body: usize,
    pub(super) request_timeout: Duration,
}

/// An answer that is not a success: its status and one line saying why.
#[derive(Debug)]
pub(super) struct Failure {
    status: StatusCode,
    message: String,
    allow: Option<&'static str>,
}

impl Failure {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Failure {
            status,
            message: api::one_line(&message.into()),
            allow: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Failure::new(StatusCode::BAD_REQUEST, message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Failure::new(StatusCode::NOT_FOUND, message)
    }

    fn method_not_allowed(allow: &'static str) -> Self {
        Failure {
            allow: Some(allow),
            ..Failure::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method not allowed here (allowed: {allow})"),
            )
        }
    }

    fn into_response(self) -> Response<Body> {
        let mut res = json(
            self.status,
            &ErrorBody {
                error: &self.message,
            },
        );
        if let Some(allow) = self.allow {
            res.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"ulb-tcp admin\""),
            );
        }
        res
    }
}

impl From<BackendError> for Failure {
    fn from(e: BackendError) -> Self {
        let status = match e {
            BackendError::NotFound(_) => StatusCode::NOT_FOUND,
            BackendError::Duplicate(_) => StatusCode::CONFLICT,
            _ => StatusCode::BAD_REQUEST,
        };
        Failure::new(status, e.to_string())
    }
}

/// A JSON answer, with a line break at the end.
fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let (status, body) = match serde_json::to_vec(value) {
        Ok(mut body) => {
            body.push(b'\n');
            (status, body)
        }
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            b"{\"error\":\"cannot write the answer\"}\n".to_vec(),
        ),
    };
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

/// The routes, as path shapes.
enum Route {
    Page,
    Metrics,
    Healthz,
    Livez,
    Services,
    Service(String),
    Backends(String),
    Backend(String, String),
    Reload,
}

impl Route {
    /// The route for a path, its segments URL-decoded; `/x/` is `/x`.
    fn of(path: &str) -> Result<Route, Failure> {
        let path = path
            .strip_suffix('/')
            .filter(|p| !p.is_empty())
            .unwrap_or(path);
        let raw: Vec<&str> = path.split('/').skip(1).collect();
        let not_found = || Failure::not_found(format!("no such path {}", quote_str(path)));
        let decode = |s: &str| -> Result<String, Failure> {
            percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| {
                    Failure::bad_request(format!("{} is not URL-encoded UTF-8", quote_str(s)))
                })
        };
        Ok(match raw.as_slice() {
            [""] => Route::Page,
            ["metrics"] => Route::Metrics,
            ["healthz"] => Route::Healthz,
            ["livez"] => Route::Livez,
            ["api", "v1", "services"] => Route::Services,
            ["api", "v1", "reload"] => Route::Reload,
            ["api", "v1", "services", s] => Route::Service(decode(s)?),
            ["api", "v1", "services", s, "backends"] => Route::Backends(decode(s)?),
            ["api", "v1", "services", s, "backends", id] => Route::Backend(decode(s)?, decode(id)?),
            _ => return Err(not_found()),
        })
    }

    /// The methods allowed, for 405's `Allow`.
    fn allowed(&self) -> &'static str {
        match self {
            Route::Backends(_) => "GET, POST",
            Route::Backend(..) => "GET, PATCH, DELETE",
            Route::Reload => "POST",
            Route::Page => "GET, HEAD",
            _ => "GET",
        }
    }
}

fn quote_str(s: &str) -> String {
    api::quote(&serde_json::Value::String(s.to_string()))
}

/// Characters a backend id keeps unencoded in a `Location`.
const ID_KEEP: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// Answers one request. Never fails: every error is an answer.
pub(super) async fn handle(ctx: Arc<Ctx>, req: Request<Incoming>) -> Response<Body> {
    match route(&ctx, req).await {
        Ok(res) => res,
        Err(f) => f.into_response(),
    }
}

async fn route(ctx: &Ctx, req: Request<Incoming>) -> Result<Response<Body>, Failure> {
    let route = Route::of(req.uri().path())?;
    let method = req.method().clone();
    let mutating = match (&route, &method) {
        (Route::Reload, &Method::POST) => true,
        (Route::Reload, _) => return Err(Failure::method_not_allowed(route.allowed())),
        (_, &Method::GET) | (Route::Page, &Method::HEAD) => false,
        (Route::Backends(_), &Method::POST)
        | (Route::Backend(..), &Method::PATCH)
        | (Route::Backend(..), &Method::DELETE) => true,
        _ => return Err(Failure::method_not_allowed(route.allowed())),
    };
    if mutating {
        authorize(ctx, &req)?;
    }
    match route {
        Route::Reload => reload(ctx).await,
        Route::Page => Ok(page::page()),
        Route::Metrics => metrics(ctx),
        Route::Healthz => Ok(healthz(ctx)),
        Route::Livez => Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"}))),
        Route::Services => Ok(json(
            StatusCode::OK,
            &ServicesView {
                services: ctx
                    .services
                    .all()
                    .iter()
                    .map(|(name, h)| ServiceView::new(name, h))
                    .collect(),
            },
        )),
        Route::Service(name) => {
            let h = service(ctx, &name)?;
            Ok(json(StatusCode::OK, &ServiceView::new(&name, &h)))
        }
        Route::Backends(name) if method == Method::GET => {
            let h = service(ctx, &name)?;
            let list: Vec<BackendView> = h.backends().iter().map(BackendView::from).collect();
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "backends": list }),
            ))
        }
        Route::Backends(name) => {
            let h = service(ctx, &name)?;
            let body = read_body(ctx, req).await?;
            add_backend(&name, &h, &body).await
        }
        Route::Backend(name, id) => {
            let h = service(ctx, &name)?;
            match method {
                Method::GET => Ok(json(StatusCode::OK, &backend(&h, &name, &id)?)),
                Method::PATCH => {
                    let body = read_body(ctx, req).await?;
                    patch_backend(&name, &h, &id, &body)
                }
                _ => remove_backend(&name, &h, &id, req.uri().query()),
            }
        }
    }
}

/// `POST /api/v1/reload`: 200 with what changed, 422 with why nothing did, 409 with nothing to reload.
async fn reload(ctx: &Ctx) -> Result<Response<Body>, Failure> {
    let Some(reload) = &ctx.reload else {
        return Err(Failure::new(
            StatusCode::CONFLICT,
            "no configuration file to reload: the balancer was started with flags, not --config",
        ));
    };
    match (reload.0)().await {
        Ok(report) => Ok(json(StatusCode::OK, &report)),
        Err(why) => Err(Failure::new(StatusCode::UNPROCESSABLE_ENTITY, why)),
    }
}

/// The token check of a mutating call (none when no token is set).
fn authorize(ctx: &Ctx, req: &Request<Incoming>) -> Result<(), Failure> {
    let Some(token) = &ctx.token else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    if token.accepts(given) {
        Ok(())
    } else {
        let why = if given.is_some() {
            "the bearer token is not the admin token"
        } else {
            "this call needs Authorization: Bearer <token>"
        };
        Err(Failure::new(StatusCode::UNAUTHORIZED, why))
    }
}

fn service(ctx: &Ctx, name: &str) -> Result<BalancerHandle, Failure> {
    ctx.services
        .get(name)
        .ok_or_else(|| Failure::not_found(format!("no service {}", quote_str(name))))
}

fn backend(h: &BalancerHandle, service: &str, id: &str) -> Result<BackendView, Failure> {
    h.backend(id).map(|b| BackendView::from(&b)).ok_or_else(|| {
        Failure::not_found(format!(
            "no backend {} in service {}",
            quote_str(id),
            quote_str(service)
        ))
    })
}

/// The whole body, at most `max_body` bytes (413 past it), within the request timeout (408).
async fn read_body(ctx: &Ctx, req: Request<Incoming>) -> Result<Bytes, Failure> {
    let too_large = || {
        Failure::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body is larger than {} bytes", ctx.max_body),
        )
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > ctx.max_body as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), ctx.max_body).collect();
    match tokio::time::timeout(ctx.request_timeout, body).await {
        Err(_) => Err(Failure::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not come within {:?}", ctx.request_timeout),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Ok(Err(e)) => Err(Failure::bad_request(format!("cannot read the body: {e}"))),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

fn metrics(ctx: &Ctx) -> Result<Response<Body>, Failure> {
    let Some(handle) = &ctx.metrics else {
        return Err(Failure::not_found("metrics are not served here"));
    };
    let mut res = Response::new(Full::new(Bytes::from(handle.render())));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(res)
}

/// 200 while every service serves with a backend in rotation; 503 while one shuts down, or has no
/// backend in rotation. No service at all is 200 (a cluster that only supervises).
fn healthz(ctx: &Ctx) -> Response<Body> {
    let services: Vec<ServiceHealth> = ctx
        .services
        .all()
        .iter()
        .map(|(name, h)| {
            let backends = h.backends();
            ServiceHealth {
                name: name.clone(),
                backends: backends.len(),
                in_rotation: backends.iter().filter(|b| b.in_rotation()).count(),
                shutting_down: h.is_shutting_down(),
            }
        })
        .collect();
    let status = if services.iter().any(|s| s.shutting_down) {
        "shutting_down"
    } else if services.iter().any(|s| s.in_rotation == 0) {
        "no_backend_in_rotation"
    } else {
        "ok"
    };
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(code, &Healthz { status, services })
}

async fn add_backend(
    service: &str,
    h: &BalancerHandle,
    body: &[u8],
) -> Result<Response<Body>, Failure> {
    let add = AddBackend::parse(body).map_err(Failure::bad_request)?;
    if add.address.contains('@') {
        return Err(Failure::bad_request(format!(
            "address: {} holds a weight; give it as \"weight\"",
            quote_str(&add.address)
        )));
    }
    let spec: BackendSpec = add
        .address
        .parse()
        .map_err(|e: crate::ConfigError| Failure::bad_request(format!("address: {e}")))?;
    let mut config: BackendConfig = spec
        .resolve()
        .await
        .map_err(|e| Failure::bad_request(format!("address: {e}")))?
        .with_backup(add.backup);
    if let Some(w) = add.weight {
        config = config.with_weight(w);
    }
    if let Some(id) = add.id {
        config = config.with_id(id);
    }
    if let Some(cap) = add.max_connections {
        config = config.with_max_connections(cap);
    }
    let id = config.id.clone();
    h.add_backend(config)?;
    tracing::info!(service, backend = %id, "admin API: backend added");
    let view = backend(h, service, &id)?;
    let mut res = json(StatusCode::CREATED, &view);
    let location = format!(
        "/api/v1/services/{service}/backends/{}",
        utf8_percent_encode(&id, ID_KEEP)
    );
    if let Ok(v) = HeaderValue::from_str(&location) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    Ok(res)
}

fn patch_backend(
    service: &str,
    h: &BalancerHandle,
    id: &str,
    body: &[u8],
) -> Result<Response<Body>, Failure> {
    backend(h, service, id)?; // 404 before any complaint about the body
    let patch = PatchBackend::parse(body).map_err(Failure::bad_request)?;
    // The weight first: it is the one that may be refused, and then nothing has changed.
    if let Some(w) = patch.weight {
        let was = h.set_weight(id, w)?;
        tracing::info!(
            service,
            backend = id,
            weight = w,
            was,
            "admin API: weight set"
        );
    }
    if let Some(state) = patch.state {
        let was = h.set_admin_state(id, state.into())?;
        let state = crate::AdminState::from(state);
        tracing::info!(service, backend = id, %state, %was, "admin API: state set");
    }
    Ok(json(StatusCode::OK, &backend(h, service, id)?))
}

fn remove_backend(
    service: &str,
    h: &BalancerHandle,
    id: &str,
    query: Option<&str>,
) -> Result<Response<Body>, Failure> {
    let mut deadline = h.drain_timeout();
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode_str(value).decode_utf8_lossy();
        match key {
            "deadline" => deadline = api::parse_duration(&value).map_err(Failure::bad_request)?,
            _ => {
                return Err(Failure::bad_request(format!(
                    "unknown query parameter {} (expected deadline)",
                    quote_str(key)
                )))
            }
        }
    }
    let mut view = backend(h, service, id)?;
    let drain = h.remove_backend(id, deadline)?;
    tracing::info!(
        service,
        backend = id,
        ?deadline,
        "admin API: backend removed; draining"
    );
    match h.backend(id) {
        Some(b) => view = BackendView::from(&b),
        None => {
            view.removing = true;
            view.in_rotation = false;
        }
    }
    let (service, id) = (service.to_string(), id.to_string());
    tokio::spawn(async move {
        let report = drain.await;
        tracing::info!(
            service,
            backend = id,
            waited = ?report.waited,
            reset = report.reset,
            "admin API: removed backend drained"
        );
    });
    Ok(json(
        StatusCode::ACCEPTED,
        &Removing {
            backend: view,
            drain_deadline: deadline.as_millis() as f64 / 1000.0,
        },
    ))
}
