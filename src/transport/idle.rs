//! Idle connections: a connection with no request in flight for
//! `limits.idle_connection_timeout` is closed, so connections that only
//! sit on their slots (a valid HTTP/2 preface, then nothing) give them back
//! (issue 15, finding 4).
//!
//! Each accepted connection gets an [`Activity`]: how many requests are in
//! flight on it, and since when none has been. [`InFlightLayer`], on both
//! servers, counts a request from the call until its response body has
//! ended or is dropped, so a long-lived stream (FetchX509SVID, WatchTask)
//! keeps its connection busy for as long as it is open. The connection's
//! IO ([`PeerStream`](super::PeerStream)) reads the record and ends the
//! connection once it has been idle for the timeout.
//!
//! Invariant: only requests move the idle clock. Bytes do not: HTTP/2
//! PINGs, SETTINGS or WINDOW_UPDATEs on a connection with nothing in flight
//! keep nothing open.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::future::BoxFuture;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;
use tower::{Layer, Service};

use super::PeerInfo;

/// What one connection is doing: requests in flight, and since when it has
/// had none. Shared by the connection's IO and the requests on it.
#[derive(Debug)]
pub struct Activity {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    in_flight: usize,
    /// When `in_flight` last fell to zero (or the connection was accepted).
    idle_since: Instant,
}

/// One request in flight; the connection is idle again once every one has
/// dropped.
#[derive(Debug)]
pub struct Busy(Arc<Activity>);

/// Counts each request as in flight on its connection (the [`PeerInfo`]
/// extension) until its response body ends or is dropped.
#[derive(Debug, Clone, Copy, Default)]
pub struct InFlightLayer;

/// The service [`InFlightLayer`] makes.
#[derive(Debug, Clone)]
pub struct InFlight<S> {
    inner: S,
}

/// A response body that keeps its request in flight until it ends.
#[derive(Debug)]
pub struct InFlightBody<B> {
    body: B,
    busy: Option<Busy>,
}

// === impl Activity ===

impl Activity {
    /// A connection accepted now, with nothing in flight: idle from here.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                in_flight: 0,
                idle_since: Instant::now(),
            }),
        })
    }

    /// Counts one more request in flight until the returned guard drops.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.state().in_flight += 1;
        Busy(Arc::clone(self))
    }

    /// Since when nothing has been in flight; `None` while something is.
    pub fn idle_since(&self) -> Option<Instant> {
        let state = self.state();
        (state.in_flight == 0).then_some(state.idle_since)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

// === impl Busy ===

impl Drop for Busy {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.in_flight = state.in_flight.saturating_sub(1);
        if state.in_flight == 0 {
            state.idle_since = Instant::now();
        }
    }
}

// === impl InFlightLayer ===

impl<S> Layer<S> for InFlightLayer {
    type Service = InFlight<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlight { inner }
    }
}

// === impl InFlight ===

impl<S, B, ResBody> Service<http::Request<B>> for InFlight<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<InFlightBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // A server not fed by `transport::incoming` has no record to keep.
        let busy = request
            .extensions()
            .get::<PeerInfo>()
            .map(|peer| peer.activity.busy());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| InFlightBody { body, busy }))
        })
    }
}

// === impl InFlightBody ===

impl<B: Body + Unpin> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        // Ended (or failed): no longer in flight, even if the server keeps
        // the body a while before dropping it.
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.busy = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use http_body_util::BodyExt as _;
    use tower::ServiceExt as _;

    use super::*;

    /// A request on a connection with `activity`, as the listener's peer
    /// extension carries it.
    fn request_on(activity: &Arc<Activity>) -> http::Request<()> {
        let mut request = http::Request::new(());
        request.extensions_mut().insert(PeerInfo {
            caller: Err(Arc::new(crate::attestation::AttestationError::NoPeerPid)),
            activity: Arc::clone(activity),
        });
        request
    }

    #[tokio::test]
    async fn idle_from_accept_until_a_request_and_again_once_it_ends() {
        let before = Instant::now();
        let activity = Activity::new();
        let accepted = activity.idle_since().unwrap();
        assert!(accepted >= before);
        let first = activity.busy();
        let second = activity.busy();
        assert_eq!(activity.idle_since(), None);
        drop(first);
        assert_eq!(activity.idle_since(), None, "one still in flight");
        tokio::time::sleep(Duration::from_millis(2)).await;
        drop(second);
        let idle_again = activity.idle_since().unwrap();
        assert!(idle_again > accepted, "the clock restarts at the end");
    }

    #[tokio::test]
    async fn a_request_is_in_flight_until_its_response_body_ends() {
        let activity = Activity::new();
        // A streamed response: a message, then the end.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<bytes::Bytes>, Infallible>>(2);
        let mut rx = Some(rx);
        let service = InFlightLayer.layer(tower::service_fn(move |_: http::Request<()>| {
            let stream = rx.take().map(tokio_stream::wrappers::ReceiverStream::new);
            async move {
                let stream = stream.ok_or("called twice")?;
                Ok::<_, &str>(http::Response::new(http_body_util::StreamBody::new(stream)))
            }
        }));
        let response = service.oneshot(request_on(&activity)).await.unwrap();
        assert_eq!(activity.idle_since(), None, "the stream is open");
        let mut body = response.into_body();
        tx.send(Ok(Frame::data(bytes::Bytes::from_static(b"a"))))
            .await
            .unwrap();
        assert!(body.frame().await.is_some());
        assert_eq!(activity.idle_since(), None, "still open after a message");
        drop(tx);
        assert!(body.frame().await.is_none());
        assert!(activity.idle_since().is_some(), "ended: idle");
    }

    #[tokio::test]
    async fn a_dropped_call_or_body_is_no_longer_in_flight() {
        let activity = Activity::new();
        // The call given up before it answered (a client reset, the
        // request timeout).
        let never = InFlightLayer.layer(tower::service_fn(|_: http::Request<()>| {
            std::future::pending::<
                Result<http::Response<http_body_util::Empty<bytes::Bytes>>, Infallible>,
            >()
        }));
        let mut call = Box::pin(never.oneshot(request_on(&activity)));
        let given_up = tokio::time::timeout(Duration::from_millis(10), &mut call).await;
        assert!(given_up.is_err());
        assert_eq!(activity.idle_since(), None, "called, not answered");
        drop(call);
        assert!(activity.idle_since().is_some());
        // The answer's body never read, then dropped.
        let empty = InFlightLayer.layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(
                http_body_util::Empty::<bytes::Bytes>::new(),
            ))
        }));
        let response = empty.oneshot(request_on(&activity)).await.unwrap();
        assert_eq!(activity.idle_since(), None);
        drop(response);
        assert!(activity.idle_since().is_some());
    }

    #[tokio::test]
    async fn a_request_without_a_peer_is_served_uncounted() {
        let service = InFlightLayer.layer(tower::service_fn(|_: http::Request<()>| async {
            Ok::<_, Infallible>(http::Response::new(
                http_body_util::Empty::<bytes::Bytes>::new(),
            ))
        }));
        let response = service.oneshot(http::Request::new(())).await.unwrap();
        assert!(response.into_body().is_end_stream());
    }
}
