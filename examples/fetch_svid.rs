//! A minimal workload: fetch its identity from a running tether with the
//! unmodified Rust `spiffe` crate, as any SPIFFE workload would.
//!
//! ```text
//! SPIFFE_ENDPOINT_SOCKET=unix:///tmp/tether-$(id -u)/agent.sock cargo run --example fetch_svid
//! ```

use spiffe::WorkloadApiClient;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = WorkloadApiClient::connect_env().await?;

    let svid = client.fetch_x509_svid().await?;
    println!("X.509-SVID: {} (hint: {:?})", svid.spiffe_id(), svid.hint());

    let jwt = client.fetch_jwt_svid(["example-audience"], None).await?;
    println!("JWT-SVID for example-audience: {}", jwt.spiffe_id());

    let checked = client
        .validate_jwt_token("example-audience", jwt.token())
        .await?;
    println!("validated by the agent: {}", checked.spiffe_id());
    Ok(())
}
