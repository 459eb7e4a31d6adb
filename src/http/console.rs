//! The console's routes: its files under `/ui/`, and signing in and out (`/ui/session`).
//! The pages themselves read and change everything through the JSON API.

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Json};
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::{json_body, JsonBody, Path};
use super::serve::ListenerScheme;
use super::AppState;
use crate::auth::{AuditEvent, AuthError};
use crate::console::session::{cookie, COOKIE, LIFETIME};
use crate::console::{asset, CSP};

/// Headers every console answer carries.
fn harden(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

/// `GET /ui`: to the console's page.
pub async fn root() -> Response {
    harden(Redirect::permanent("/ui/").into_response())
}

/// `GET /ui/`: the console's one HTML page.
pub async fn index(headers: HeaderMap) -> Response {
    file("index.html", &headers)
}

/// `GET /ui/{asset}`: a script or the stylesheet.
pub async fn file_named(Path(name): Path<String>, headers: HeaderMap) -> Response {
    file(&name, &headers)
}

fn file(name: &str, headers: &HeaderMap) -> Response {
    let Some((a, etag)) = asset(name) else {
        return harden(ApiError::not_found().into_response());
    };
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, a.content_type)], a.bytes).into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::ETAG, HeaderValue::from_static(etag));
    // Revalidated every time: an upgrade changes the files under the same names.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    harden(resp)
}

fn now_secs() -> u64 {
    crate::firmware::now_ms() as u64 / 1000
}

/// `GET /ui/session`: who the console is signed in as (or that it runs open), and the CSRF
/// value its changes carry.
pub async fn whoami(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let access = &app.access;
    if access.open_allowed && access.tokens.is_empty().await? {
        return Ok(Json(
            json!({"open": true, "signedIn": false, "name": "anonymous", "role": "admin", "csrf": ""}),
        ));
    }
    let signed_in = match cookie(&headers) {
        Some(c) => match crate::http::access::session_token(access, &Method::GET, &headers).await {
            Ok(info) => Some((
                info,
                access.sessions.csrf(c),
                access.sessions.verify(c, now_secs()),
            )),
            Err(AuthError::Unknown | AuthError::Missing) => None,
            Err(e) => return Err(e.into()),
        },
        None => None,
    };
    Ok(Json(match signed_in {
        Some((info, csrf, Some(session))) => json!({
            "open": false,
            "signedIn": true,
            "name": info.name,
            "role": info.role,
            "csrf": csrf,
            "expiresAt": crate::fota::view::rfc3339(session.expires_secs as i64 * 1000),
        }),
        _ => json!({"open": false, "signedIn": false, "name": "", "role": "", "csrf": ""}),
    }))
}

/// The Set-Cookie value: HttpOnly, SameSite=Strict, Secure when the request came over HTTPS.
fn set_cookie(value: &str, max_age: u64, scheme: Option<&ListenerScheme>) -> HeaderValue {
    let secure = if scheme.is_some_and(|s| s.0 == "https") {
        "; Secure"
    } else {
        ""
    };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("fwrepo_session=; Max-Age=0"))
}

/// `POST /ui/session` `{"token": ...}`: signs in; the token is checked and not kept.
pub async fn sign_in(
    State(app): State<AppState>,
    scheme: Option<Extension<ListenerScheme>>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let v = json_body(&body)?;
    let token = v
        .get("token")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("invalid-parameter", "token: the access token"))?;
    let access = &app.access;
    let info = match access.tokens.check(token).await {
        Ok(info) => info,
        Err(e) => {
            let mut event =
                AuditEvent::now("invalid-token", None, "POST /ui/session", "/ui/session");
            event.status = Some(401);
            access.audit.record(&event);
            // Not the access layer's `invalid-token`: this route is public, the refusal is its own.
            return Err(match e {
                AuthError::Unknown => ApiError::new(
                    crate::error::Kind::Unauthorized,
                    "sign-in-refused",
                    "that token is not valid",
                ),
                other => other.into(),
            });
        }
    };
    let value = access.sessions.issue(&info.id, now_secs());
    let mut event = AuditEvent::now(
        &info.name,
        Some(info.role.as_str()),
        "POST /ui/session",
        "/ui/session",
    );
    event.status = Some(200);
    access.audit.record(&event);
    let mut resp = Json(json!({
        "open": false,
        "signedIn": true,
        "name": info.name,
        "role": info.role,
        "csrf": access.sessions.csrf(&value),
    }))
    .into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        set_cookie(&value, LIFETIME.as_secs(), scheme.as_deref()),
    );
    Ok(harden(resp))
}

/// `DELETE /ui/session`: signs out (the cookie is cleared).
pub async fn sign_out(scheme: Option<Extension<ListenerScheme>>) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, set_cookie("", 0, scheme.as_deref()));
    harden(resp)
}
