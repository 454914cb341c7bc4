//! The floor under every operation: a unary gRPC call with an empty request
//! and response over a Unix socket, served by the same stack as the agent
//! (tonic, hyper, h2, tokio) with nothing behind it.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};

pub(crate) const PATH: &str = "/bench.Empty/Call";

/// Serves the empty call on `dir/empty.sock` on `runtime`; the socket path.
pub(crate) fn serve(runtime: &tokio::runtime::Runtime, dir: &Path) -> PathBuf {
    let path = dir.join("empty.sock");
    let listener = {
        let _guard = runtime.enter();
        tokio::net::UnixListener::bind(&path).unwrap()
    };
    runtime.spawn(
        tonic::transport::Server::builder()
            .add_service(Empty)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
    );
    path
}

#[derive(Clone)]
struct Empty;

impl tonic::server::NamedService for Empty {
    const NAME: &'static str = "bench.Empty";
}

struct Call;

impl tonic::server::UnaryService<()> for Call {
    type Response = ();
    type Future = BoxFuture<tonic::Response<()>, tonic::Status>;

    fn call(&mut self, _request: tonic::Request<()>) -> Self::Future {
        Box::pin(async { Ok(tonic::Response::new(())) })
    }
}

impl Service<http::Request<Body>> for Empty {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<(), ()>::default();
            Ok(tonic::server::Grpc::new(codec).unary(Call, request).await)
        })
    }
}
