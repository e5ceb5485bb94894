//! Who may call the `Coordinator` service, decided from a call's path and headers before its
//! body is read: `Session` needs the run token, every other call its session's credential
//! (see [`elbo_proto::auth`]). [`authenticate`] is the decision, a pure function tested in a
//! table; [`Gate`] wraps the service with it and hands the verified caller to the handlers in
//! the request's extensions.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use elbo_proto::auth::{self, Key, Secret};
use elbo_proto::v1::coordinator_server::SERVICE_NAME;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::Status;

/// Who a call was authenticated as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    /// A worker holding the run token (it opens a session).
    Worker,
    /// The holder of this session's credential.
    Session(u64),
}

impl Caller {
    /// The session a call speaks for, which must be the one it was authenticated as.
    pub(crate) fn check_session<T>(
        request: &tonic::Request<T>,
        session: u64,
    ) -> Result<(), Status> {
        match request.extensions().get::<Caller>() {
            Some(Caller::Session(id)) if *id == session => Ok(()),
            Some(Caller::Session(id)) => Err(Status::permission_denied(format!(
                "session {id}'s credential cannot speak for session {session}"
            ))),
            _ => Err(Status::unauthenticated(
                "this call needs a session credential",
            )),
        }
    }
}

fn session_path(method: &str) -> String {
    format!("/{SERVICE_NAME}/{method}")
}

/// Who the call to `path` with `headers` comes from, or why it is refused: `Session` needs
/// `authorization: Bearer <token>`; the service's other methods `elbo-session` and the
/// session's credential. (The gate wraps only the `Coordinator` service: health and reflection
/// never reach it.)
pub(crate) fn authenticate(
    path: &str,
    headers: &http::HeaderMap,
    token: &str,
    secret: &Secret,
) -> Result<Caller, Status> {
    let credential = auth::bearer_of(headers).ok_or_else(|| {
        Status::unauthenticated("no bearer credential in the call's authorization header")
    })?;
    if path == session_path("Session") {
        return if auth::same_secret(credential.as_bytes(), token.as_bytes()) {
            Ok(Caller::Worker)
        } else {
            Err(Status::unauthenticated(
                "wrong token: the worker's --token (ELBO_TOKEN) differs from the coordinator's",
            ))
        };
    }
    let session = auth::number_of(headers, auth::SESSION).ok_or_else(|| {
        Status::unauthenticated(format!(
            "no session id in the call's {} header",
            auth::SESSION
        ))
    })?;
    let presented = Key::from_hex(credential)
        .ok_or_else(|| Status::unauthenticated("the session credential is not 64 hex digits"))?;
    if presented.matches(&secret.session_credential(session)) {
        Ok(Caller::Session(session))
    } else {
        Err(Status::unauthenticated(format!(
            "wrong credential for session {session}"
        )))
    }
}

/// The `Coordinator` service behind [`authenticate`].
#[derive(Clone)]
pub(crate) struct Gate<S> {
    inner: S,
    token: String,
    secret: Secret,
}

impl<S> Gate<S> {
    pub(crate) fn new(inner: S, token: String, secret: Secret) -> Self {
        Gate {
            inner,
            token,
            secret,
        }
    }
}

impl<S: NamedService> NamedService for Gate<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> tower_service::Service<http::Request<Body>> for Gate<S>
where
    S: tower_service::Service<
            http::Request<Body>,
            Response = http::Response<Body>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        match authenticate(
            request.uri().path(),
            request.headers(),
            &self.token,
            &self.secret,
        ) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                // Call the instance that was polled ready; keep a fresh clone for the next call.
                let clone = self.inner.clone();
                let mut ready = std::mem::replace(&mut self.inner, clone);
                Box::pin(async move { ready.call(request).await })
            }
            Err(status) => {
                let remote = request
                    .extensions()
                    .get::<tonic::transport::server::TcpConnectInfo>()
                    .and_then(|i| i.remote_addr());
                tracing::warn!(path = %request.uri().path(), ?remote, %status, "refused a call");
                Box::pin(async move { Ok(status.into_http()) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    /// Call headers: (name, value).
    type Headers = Vec<(&'static str, String)>;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().unwrap());
        }
        map
    }

    #[test]
    fn calls_are_admitted_only_with_the_credential_their_method_needs() {
        let secret = Secret::from_bytes([3; 32]);
        let other = Secret::from_bytes([4; 32]);
        let cred = |s: &Secret, id: u64| auth::bearer(&s.session_credential(id).to_hex());
        let session = session_path("Session");
        let report = session_path("Report");
        let table: Vec<(&str, &str, Headers, Result<Caller, Code>)> = vec![
            (
                "token opens a session",
                &session,
                vec![("authorization", auth::bearer("tok"))],
                Ok(Caller::Worker),
            ),
            (
                "wrong token",
                &session,
                vec![("authorization", auth::bearer("tak"))],
                Err(Code::Unauthenticated),
            ),
            ("no header", &session, vec![], Err(Code::Unauthenticated)),
            (
                "not a bearer",
                &session,
                vec![("authorization", "Basic tok".into())],
                Err(Code::Unauthenticated),
            ),
            (
                "session credential",
                &report,
                vec![
                    ("authorization", cred(&secret, 7)),
                    ("elbo-session", "7".into()),
                ],
                Ok(Caller::Session(7)),
            ),
            (
                "another session's credential",
                &report,
                vec![
                    ("authorization", cred(&secret, 7)),
                    ("elbo-session", "8".into()),
                ],
                Err(Code::Unauthenticated),
            ),
            (
                "a previous coordinator's credential",
                &report,
                vec![
                    ("authorization", cred(&other, 7)),
                    ("elbo-session", "7".into()),
                ],
                Err(Code::Unauthenticated),
            ),
            (
                "the token is no session credential",
                &report,
                vec![
                    ("authorization", auth::bearer("tok")),
                    ("elbo-session", "7".into()),
                ],
                Err(Code::Unauthenticated),
            ),
            (
                "no session id",
                &report,
                vec![("authorization", cred(&secret, 7))],
                Err(Code::Unauthenticated),
            ),
            (
                "session id not a number",
                &report,
                vec![
                    ("authorization", cred(&secret, 7)),
                    ("elbo-session", "x7".into()),
                ],
                Err(Code::Unauthenticated),
            ),
            (
                "a session credential does not open a session",
                &session,
                vec![
                    ("authorization", cred(&secret, 7)),
                    ("elbo-session", "7".into()),
                ],
                Err(Code::Unauthenticated),
            ),
        ];
        for (what, path, pairs, want) in table {
            let pairs: Vec<(&'static str, &str)> =
                pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let got = authenticate(path, &headers(&pairs), "tok", &secret).map_err(|s| s.code());
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn a_call_speaks_only_for_its_own_session() {
        let mut request = tonic::Request::new(());
        assert_eq!(
            Caller::check_session(&request, 1).unwrap_err().code(),
            Code::Unauthenticated
        );
        request.extensions_mut().insert(Caller::Worker);
        assert_eq!(
            Caller::check_session(&request, 1).unwrap_err().code(),
            Code::Unauthenticated
        );
        request.extensions_mut().insert(Caller::Session(2));
        assert_eq!(
            Caller::check_session(&request, 1).unwrap_err().code(),
            Code::PermissionDenied
        );
        assert!(Caller::check_session(&request, 2).is_ok());
    }
}
