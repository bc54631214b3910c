//! Bearer-token checks for every public RPC, as a tower layer on the whole server (a tonic
//! interceptor cannot see the method path, which decides the scope).
//!
//! It fails closed: only the paths on the allow-list [`heist_proto::scopes::PUBLIC`] pass
//! without a token (IssueToken, health, reflection, the HTTP probes, and WorkerControl and
//! BlobService, which check the workers' join token themselves). Every other path, gRPC or
//! HTTP, known or not, needs a token that verifies and carries the path's scope
//! ([`heist_proto::scopes::access`]), and whose client was neither revoked nor rotated since
//! the token was issued ([`ClientStates::check`], an in-memory lookup); the caller becomes a
//! [`Principal`] in the request extensions, read by handlers with [`principal`].

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use heist_proto::{metadata, scopes, token::TokenVerifier};
use tonic::Status;
use tower::{Layer, Service};
use tracing::info;

use crate::{
    auth::ClientStates,
    error::Error,
    mcp::{McpConfig, oauth},
};

/// The authenticated caller of an RPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Token subject: the client id.
    pub id: String,
    /// Scopes the token carries.
    pub scopes: Vec<String>,
}

impl Principal {
    /// Whether the principal holds `scope` (`admin` holds everything).
    pub fn has(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope || s == scopes::ADMIN)
    }
}

/// The caller of a handler, as put there by [`AuthLayer`].
pub fn principal<T>(request: &tonic::Request<T>) -> Result<&Principal, Status> {
    request
        .extensions()
        .get::<Principal>()
        .ok_or_else(|| Status::from(Error::TokenMissing))
}

/// Decides one call: `Ok(None)` when the path needs no token, `Ok(Some(principal))` when the
/// token is valid, still current for its client and carries the scope, the reason otherwise.
pub fn authorize(
    verifier: &TokenVerifier,
    clients: &ClientStates,
    path: &str,
    headers: &http::HeaderMap,
) -> Result<Option<Principal>, Error> {
    let access = scopes::access(path);
    if access == scopes::Access::Public {
        return Ok(None);
    }
    let token = metadata::bearer(headers).ok_or(Error::TokenMissing)?;
    let claims = verifier.verify(token)?;
    clients.check(&claims)?;
    let holds = |needed: &str| scopes::grants(&claims.scope, needed);
    match access {
        scopes::Access::Scope(needed) if !holds(needed) => {
            return Err(Error::ScopeMissing(needed));
        }
        // Tool calls: any tool scope passes here; the gate checks the tool's own.
        scopes::Access::AnyScope(any) if !any.iter().any(|n| holds(n)) => {
            return Err(Error::ScopeMissing(scopes::TOOLS_CALL));
        }
        _ => {}
    }
    Ok(Some(Principal {
        id: claims.sub,
        scopes: claims
            .scope
            .split_ascii_whitespace()
            .map(str::to_owned)
            .collect(),
    }))
}

/// The answer to a refused request: a gRPC status for a gRPC call, and for plain HTTP a 401
/// (with `WWW-Authenticate: Bearer resource_metadata="…"`, RFC 9728, naming where to get a
/// token) or 403 with an empty body.
fn refusal<ReqBody, ResBody: Default>(
    request: &http::Request<ReqBody>,
    err: Error,
    mcp: &McpConfig,
) -> http::Response<ResBody> {
    let status = Status::from(err);
    let grpc = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"));
    if grpc {
        return status.into_http();
    }
    let mut response = http::Response::new(ResBody::default());
    if status.code() == tonic::Code::PermissionDenied {
        *response.status_mut() = http::StatusCode::FORBIDDEN;
    } else {
        *response.status_mut() = http::StatusCode::UNAUTHORIZED;
        let base = mcp.base_url(request.uri(), request.headers());
        let challenge = http::HeaderValue::from_str(&oauth::challenge(&base))
            .unwrap_or_else(|_| http::HeaderValue::from_static("Bearer"));
        response
            .headers_mut()
            .insert(http::header::WWW_AUTHENTICATE, challenge);
    }
    response
}

/// Layer that wraps the server's routes in [`AuthMiddleware`].
#[derive(Clone)]
pub struct AuthLayer {
    verifier: Arc<TokenVerifier>,
    clients: ClientStates,
    mcp: Arc<McpConfig>,
}

impl AuthLayer {
    /// A layer verifying tokens with `verifier` and checking them against `clients`.
    pub fn new(verifier: Arc<TokenVerifier>, clients: ClientStates) -> Self {
        Self {
            verifier,
            clients,
            mcp: Arc::new(McpConfig::default()),
        }
    }

    /// Names `mcp`'s public URL in 401 challenges.
    pub fn with_mcp(mut self, mcp: McpConfig) -> Self {
        self.mcp = Arc::new(mcp);
        self
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthMiddleware<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthMiddleware {
            inner,
            verifier: self.verifier.clone(),
            clients: self.clients.clone(),
            mcp: self.mcp.clone(),
        }
    }
}

/// Checks the bearer token before the inner service sees the request.
#[derive(Clone)]
pub struct AuthMiddleware<S> {
    inner: S,
    verifier: Arc<TokenVerifier>,
    clients: ClientStates,
    mcp: Arc<McpConfig>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthMiddleware<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    ResBody: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        match authorize(
            &self.verifier,
            &self.clients,
            request.uri().path(),
            request.headers(),
        ) {
            Ok(Some(principal)) => {
                request.extensions_mut().insert(principal);
                Either::Left(self.inner.call(request))
            }
            Ok(None) => Either::Left(self.inner.call(request)),
            Err(err) => {
                info!(path = request.uri().path(), error = %err, "call refused");
                Either::Right(ready(Ok(refusal(&request, err, &self.mcp))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use heist_proto::{
        errors::{reason, reason_of},
        token::{TokenSigner, unix_now},
    };

    use super::*;

    const CREATE: &str = "/heist.v1.SessionService/CreateSession";

    fn signer() -> TokenSigner {
        TokenSigner::from_seed(&TokenSigner::generate_seed().expect("seed")).expect("signer")
    }

    fn headers(token: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert(
            "authorization",
            format!("Bearer {token}").parse().expect("ascii"),
        );
        h
    }

    fn reason(err: Error) -> String {
        reason_of(&Status::from(err)).expect("reason")
    }

    #[test]
    fn open_paths_need_no_token() {
        let s = signer();
        let v = TokenVerifier::new(&s.public_key(), "heist", "heist");
        let empty = http::HeaderMap::new();
        for path in [
            "/heist.v1.AuthService/IssueToken",
            "/grpc.health.v1.Health/Check",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/heist.v1.WorkerControl/Join",
            "/heist.v1.BlobService/PutBlobs",
            "/healthz",
            "/readyz",
        ] {
            assert_eq!(
                authorize(&v, &ClientStates::default(), path, &empty).expect(path),
                None
            );
        }
    }

    #[test]
    fn unknown_paths_need_a_token() {
        let s = signer();
        let v = TokenVerifier::new(&s.public_key(), "heist", "heist");
        for path in ["/heist.v1.NewService/Call", "/metrics/other", "/mcp"] {
            let err = authorize(&v, &ClientStates::default(), path, &http::HeaderMap::new())
                .expect_err(path);
            assert_eq!(reason(err), reason::TOKEN_MISSING, "{path}");
        }
    }

    #[test]
    fn refuses_missing_forged_expired_and_unscoped_tokens() {
        let s = signer();
        let v = TokenVerifier::new(&s.public_key(), "heist", "heist");
        let ttl = Duration::from_secs(60);

        let missing = authorize(
            &v,
            &ClientStates::default(),
            CREATE,
            &http::HeaderMap::new(),
        )
        .expect_err("missing");
        assert_eq!(reason(missing), reason::TOKEN_MISSING);

        let forged = signer()
            .sign(&TokenSigner::claims("heist", "heist", "eve", "admin", ttl))
            .expect("sign");
        let err =
            authorize(&v, &ClientStates::default(), CREATE, &headers(&forged)).expect_err("forged");
        assert_eq!(reason(err), reason::TOKEN_INVALID);

        let wrong_aud = s
            .sign(&TokenSigner::claims("heist", "other", "eve", "admin", ttl))
            .expect("sign");
        let err =
            authorize(&v, &ClientStates::default(), CREATE, &headers(&wrong_aud)).expect_err("aud");
        assert_eq!(reason(err), reason::TOKEN_INVALID);

        let mut old = TokenSigner::claims("heist", "heist", "alice", "admin", ttl);
        old.exp = unix_now() - 3600;
        let expired = s.sign(&old).expect("sign");
        let err = authorize(&v, &ClientStates::default(), CREATE, &headers(&expired))
            .expect_err("expired");
        assert_eq!(reason(err), reason::TOKEN_EXPIRED);

        let read_only = s
            .sign(&TokenSigner::claims(
                "heist",
                "heist",
                "bob",
                "sessions:read",
                ttl,
            ))
            .expect("sign");
        let err = authorize(&v, &ClientStates::default(), CREATE, &headers(&read_only))
            .expect_err("scope");
        assert_eq!(Status::from(err).code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn valid_tokens_become_principals() {
        let s = signer();
        let v = TokenVerifier::new(&s.public_key(), "heist", "heist");
        let token = s
            .sign(&TokenSigner::claims(
                "heist",
                "heist",
                "alice",
                "sessions:read sessions:write",
                Duration::from_secs(60),
            ))
            .expect("sign");
        let p = authorize(&v, &ClientStates::default(), CREATE, &headers(&token))
            .expect("ok")
            .expect("principal");
        assert_eq!(p.id, "alice");
        assert!(p.has("sessions:write"));
        assert!(!p.has("tools:call"));
    }

    #[test]
    fn bearer_parsing_is_strict() {
        let mut h = http::HeaderMap::new();
        h.insert("authorization", "Basic abc".parse().expect("ascii"));
        assert_eq!(metadata::bearer(&h), None);
        h.insert("authorization", "bearer   ".parse().expect("ascii"));
        assert_eq!(metadata::bearer(&h), None);
        h.insert("authorization", "Bearer a.b.c".parse().expect("ascii"));
        assert_eq!(metadata::bearer(&h), Some("a.b.c"));
    }
}
