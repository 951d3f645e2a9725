//! The status page at `/`: one self-contained HTML page (its CSS and script inline, nothing fetched
//! from elsewhere) that shows every service and backend from `/api/v1/services` and refreshes itself.
//! The token for its buttons is typed into the page and kept in the browser's session storage; the
//! server never puts it in the page.

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};

use super::routes::Body;

/// The page, as written in `page.html`.
const PAGE: &str = include_str!("page.html");

/// What the page may do: its own inline script and style, requests to this server only, nothing
/// else (no frames, forms, plugins, or other origins).
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

/// `GET /` and `HEAD /` (hyper leaves the body out of a `HEAD` answer).
pub(super) fn page() -> Response<Body> {
    let mut res = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    *res.status_mut() = StatusCode::OK;
    let headers = res.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained() {
        // Nothing is loaded from another origin, and API strings never go through innerHTML.
        for banned in [
            "http://",
            "https://",
            "src=",
            "innerHTML",
            "@import",
            "url(",
        ] {
            assert!(!PAGE.contains(banned), "page.html holds {banned:?}");
        }
        let res = page();
        let h = res.headers();
        assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
        assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert!(h[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .is_ok_and(|v| v.starts_with("default-src 'none'")));
    }
}
