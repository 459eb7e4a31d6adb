//! Access control at the HTTP edge: each route's rule (declared with the route in `routes()`),
//! bearer tokens checked against the token store, and an audit event for every change.

use std::collections::HashMap;

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::auth::{AuditEvent, AuditLog, AuthError, Caller, Role, Rule, TokenInfo, TokenStore};

/// What the access layer needs, shared by every request.
pub struct Access {
    pub tokens: TokenStore,
    pub audit: AuditLog,
    /// Every listener is on loopback, or the operator passed `--insecure`: with no tokens
    /// at all, the service runs open.
    pub open_allowed: bool,
    /// `auth.package_tokens`: downloads by name need a reader token.
    pub package_tokens: bool,
    /// Console sessions: a session cookie stands for its token.
    pub sessions: crate::console::session::Sessions,
}

/// A short description of what a change did, set by handlers whose path alone does not say
/// (token operations), for the audit event.
#[derive(Clone)]
pub struct AuditDetail(pub String);

/// The rules of the served routes, by matched path then method.
pub type Rules = HashMap<&'static str, Vec<(Method, Rule)>>;

/// The credential of `Authorization: Bearer <credential>`: an access token here, a device
/// token on device routes.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The rule for `method`: its own, or for HEAD the GET rule (HEAD is a GET without the body,
/// so it reveals what GET reveals and is judged alike).
fn rule_for(by_method: &[(Method, Rule)], method: &Method) -> Option<Rule> {
    let find = |m: &Method| {
        by_method
            .iter()
            .find(|(r, _)| r == m)
            .map(|(_, rule)| *rule)
    };
    find(method).or_else(|| {
        (method == Method::HEAD)
            .then(|| find(&Method::GET))
            .flatten()
    })
}

/// 405 with the methods the rules name in `Allow` (HEAD wherever GET is).
fn method_not_allowed(by_method: &[(Method, Rule)]) -> Response {
    let mut allow: Vec<&str> = by_method.iter().map(|(m, _)| m.as_str()).collect();
    if allow.contains(&"GET") && !allow.contains(&"HEAD") {
        allow.push("HEAD");
    }
    let mut resp = ApiError::method_not_allowed().into_response();
    if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
        resp.headers_mut().insert(header::ALLOW, v);
    }
    resp
}

/// Who the caller is, or why they may not go on.
pub async fn decide(
    access: &Access,
    rule: Rule,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
) -> Result<Caller, AuthError> {
    let need = match rule {
        Rule::Public | Rule::Device => return Ok(Caller::Anonymous),
        Rule::DeviceByName if !access.package_tokens => return Ok(Caller::Anonymous),
        Rule::DeviceByName => Role::Reader,
        Rule::Role(role) => role,
    };
    if access.open_allowed && access.tokens.is_empty().await? {
        return Ok(Caller::Anonymous);
    }
    let info = match bearer(headers) {
        Some(token) => access.tokens.check(token).await?,
        None => session_token(access, method, headers).await?,
    };
    if !info.role.covers(need) {
        return Err(AuthError::Forbidden {
            name: info.name,
            have: info.role,
            need,
            action: format!("{method} {path}"),
        });
    }
    Ok(Caller::Token {
        name: info.name,
        role: info.role,
    })
}

/// The token a console session stands for. A change needs the session's CSRF value too.
pub async fn session_token(
    access: &Access,
    method: &Method,
    headers: &HeaderMap,
) -> Result<TokenInfo, AuthError> {
    let cookie = crate::console::session::cookie(headers).ok_or(AuthError::Missing)?;
    let session = access
        .sessions
        .verify(cookie, crate::firmware::now_ms() as u64 / 1000)
        .ok_or(AuthError::Unknown)?;
    if !matches!(*method, Method::GET | Method::HEAD) {
        let sent = headers
            .get("x-fwrepo-csrf")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if !access.sessions.csrf_matches(cookie, sent) {
            return Err(AuthError::Csrf);
        }
    }
    access.tokens.by_id(&session.token_id).await
}

/// The access half of the envelope (`http::answer`): the decision before the handler, so a
/// refusal never depends on whether the resource exists; the audit event after it.
/// `route` is the matched route (`/fw/{name}`), `None` when no route matched; `next` runs
/// the handler.
pub async fn enforce<F, Fut>(
    app: &AppState,
    rules: &Rules,
    route: Option<&str>,
    mut req: Request,
    next: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    // Deny by default: a path no route serves, or a method no rule names, is answered here
    // and never reaches a handler (axum would route HEAD to the GET handler, for one).
    let Some(path) = route else {
        return ApiError::not_found().into_response();
    };
    let Some(by_method) = rules.get(path) else {
        return ApiError::not_found().into_response();
    };
    let Some(rule) = rule_for(by_method, req.method()) else {
        return method_not_allowed(by_method);
    };
    let access = &app.access;
    let method = req.method().clone();
    let caller = match decide(access, rule, &method, path, req.headers()).await {
        Ok(c) => c,
        Err(e) => {
            let unauthenticated = matches!(e, AuthError::Missing | AuthError::Unknown);
            let refused = match &e {
                AuthError::Missing => Some(("anonymous".to_owned(), None)),
                AuthError::Unknown => Some(("invalid-token".to_owned(), None)),
                AuthError::Forbidden { name, have, .. } => {
                    Some((name.clone(), Some(have.as_str())))
                }
                _ => None,
            };
            let mut resp = ApiError::from(e).into_response();
            // Refusals are audited too, reads included, so probing shows in the trail.
            if let Some((actor, role)) = refused {
                let action = format!("{method} {path}");
                let mut event = AuditEvent::now(&actor, role, &action, req.uri().path());
                event.status = Some(resp.status().as_u16());
                access.audit.record(&event);
            }
            if unauthenticated {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"fwrepo\""),
                );
            }
            return resp;
        }
    };
    let audited = matches!(rule, Rule::Role(_)) && !matches!(method, Method::GET | Method::HEAD);
    let target = audited.then(|| req.uri().path().to_owned());
    req.extensions_mut().insert(caller.clone());
    let resp = next(req).await;
    if let Some(target) = target {
        let role = match &caller {
            Caller::Token { role, .. } => Some(role.as_str()),
            Caller::Anonymous => None,
        };
        let mut event = AuditEvent::now(caller.name(), role, &format!("{method} {path}"), &target);
        if let Some(AuditDetail(detail)) = resp.extensions().get::<AuditDetail>() {
            event.target = format!("{target} ({detail})");
        }
        event.status = Some(resp.status().as_u16());
        access.audit.record(&event);
    }
    resp
}
