//! The coordinator as an OAuth 2.1 authorization server for its own resource (`/mcp`), for the
//! client-credentials grant only. All public (on [`heist_proto::scopes::PUBLIC`]):
//!
//! - `GET /.well-known/oauth-protected-resource[/mcp]` (RFC 9728): the resource, its
//!   authorization server (this coordinator) and scopes. A 401 from `/mcp` points here in
//!   `WWW-Authenticate: Bearer resource_metadata="…"` ([`challenge`]).
//! - `GET /.well-known/oauth-authorization-server` (RFC 8414): the token endpoint and grants.
//! - `POST /oauth/token` (RFC 6749 §4.4): form-encoded `grant_type=client_credentials`, the
//!   client authenticated by HTTP Basic or `client_id`/`client_secret` in the body; the same
//!   clients, secrets and scopes as AuthService.IssueToken. Errors are RFC 6749 §5.2 JSON.
//!
//! Tokens are bound to the audience the coordinator verifies; a `resource` parameter
//! (RFC 8707) naming another resource is refused with `invalid_target`.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use heist_proto::scopes;
use serde_json::{Value, json};
use tonic::Code;

use super::PATH;
use crate::{app::App, error::Error};

/// RFC 9728 metadata path.
pub const RESOURCE_METADATA: &str = "/.well-known/oauth-protected-resource";
/// RFC 9728 metadata path for the `/mcp` resource (the path-suffixed form clients try first).
pub const RESOURCE_METADATA_MCP: &str = "/.well-known/oauth-protected-resource/mcp";
/// RFC 8414 metadata path.
pub const SERVER_METADATA: &str = "/.well-known/oauth-authorization-server";
/// The token endpoint.
pub const TOKEN: &str = "/oauth/token";

/// The discovery documents and the token endpoint.
pub fn routes(app: Arc<App>) -> Router {
    Router::new()
        .route(RESOURCE_METADATA, get(resource_metadata))
        .route(RESOURCE_METADATA_MCP, get(resource_metadata))
        .route(SERVER_METADATA, get(server_metadata))
        .route(TOKEN, post(token))
        .with_state(app)
}

/// The `WWW-Authenticate` value of a 401 from a protected HTTP path (RFC 6750 + RFC 9728).
pub fn challenge(base_url: &str) -> String {
    format!("Bearer resource_metadata=\"{base_url}{RESOURCE_METADATA_MCP}\"")
}

async fn resource_metadata(
    State(app): State<Arc<App>>,
    uri: Uri,
    headers: HeaderMap,
) -> Json<Value> {
    let base = app.config.mcp.base_url(&uri, &headers);
    Json(json!({
        "resource": format!("{base}{PATH}"),
        "authorization_servers": [base],
        "scopes_supported": scopes::ALL,
        "bearer_methods_supported": ["header"],
        "resource_name": "heist coordinator",
    }))
}

async fn server_metadata(State(app): State<Arc<App>>, uri: Uri, headers: HeaderMap) -> Json<Value> {
    let base = app.config.mcp.base_url(&uri, &headers);
    Json(json!({
        "issuer": base,
        "token_endpoint": format!("{base}{TOKEN}"),
        "jwks_uri": format!("{base}/.well-known/jwks.json"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "response_types_supported": [],
        "scopes_supported": scopes::ALL,
    }))
}

/// An RFC 6749 §5.2 error response.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let mut response = (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    no_store(response.headers_mut());
    response
}

fn no_store(headers: &mut HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
}

async fn token(State(app): State<Arc<App>>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !form_type {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "send the parameters form-encoded (application/x-www-form-urlencoded)",
        );
    }
    let form = parse_form(&body);
    let param = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if param("grant_type") != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "only grant_type=client_credentials is supported",
        );
    }
    let basic = basic_credentials(&headers);
    let (id, secret) = match (&basic, param("client_id"), param("client_secret")) {
        (Some((id, secret)), _, _) => (id.clone(), secret.clone()),
        (None, Some(id), Some(secret)) => (id.to_owned(), secret.to_owned()),
        _ => {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "authenticate with HTTP Basic or client_id and client_secret",
            );
        }
    };
    if let Some(resource) = param("resource") {
        let base = app.config.mcp.base_url(&uri, &headers);
        let known = [base.clone(), format!("{base}{PATH}")];
        if !known
            .iter()
            .any(|k| k.trim_end_matches('/') == resource.trim_end_matches('/'))
        {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                &format!("this server issues tokens for {base}{PATH} only"),
            );
        }
    }
    let requested: Vec<String> = param("scope")
        .unwrap_or_default()
        .split_ascii_whitespace()
        .map(str::to_owned)
        .collect();
    match app.auth.issue_token(&id, &secret, &requested).await {
        Ok(issued) => {
            let mut response = Json(json!({
                "access_token": issued.access_token,
                "token_type": issued.token_type,
                "expires_in": issued.expires_in_s,
                "scope": issued.scopes.join(" "),
            }))
            .into_response();
            no_store(response.headers_mut());
            response
        }
        Err(Error::BadClientCredentials) => {
            let mut response = oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "unknown client or wrong secret",
            );
            if basic.is_some() {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Basic realm=\"heist\""),
                );
            }
            response
        }
        Err(err @ Error::ClientRevoked(_)) => {
            oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &err.to_string())
        }
        // RFC 6749 §5.2: a scope the client may not have is `invalid_scope`, a 400.
        Err(err @ Error::ScopeNotHeld(_)) => {
            oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", &err.to_string())
        }
        Err(err) => {
            let status = tonic::Status::from(err);
            if status.code() == Code::InvalidArgument {
                oauth_error(StatusCode::BAD_REQUEST, "invalid_scope", status.message())
            } else {
                oauth_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    status.message(),
                )
            }
        }
    }
}

/// `Authorization: Basic` credentials, each form-url-decoded (RFC 6749 §2.3.1).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((url_decode(id)?, url_decode(secret)?))
}

/// The pairs of an `application/x-www-form-urlencoded` body (malformed pairs are skipped).
fn parse_form(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Some((url_decode(k)?, url_decode(v)?))
        })
        .collect()
}

/// Percent-decoding with `+` as space; `None` for a malformed escape or invalid UTF-8.
fn url_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode() {
        let form = parse_form(b"grant_type=client_credentials&scope=tools%3Aread+tools%3Acall&x");
        assert_eq!(form[0], ("grant_type".into(), "client_credentials".into()));
        assert_eq!(form[1], ("scope".into(), "tools:read tools:call".into()));
        assert_eq!(form[2], ("x".into(), String::new()));
        assert_eq!(url_decode("%zz"), None);
        assert_eq!(url_decode("%4"), None);
    }

    #[test]
    fn basic_credentials_are_url_decoded() {
        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode("my%20app:s%3Acret");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).expect("ascii"),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("my app".to_owned(), "s:cret".to_owned()))
        );
    }
}
