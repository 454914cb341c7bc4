//! Process-bound X.509-SVIDs: one per process, revoked and listed in a CRL
//! when the process exits.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::{PATIENCE, TestAgent, uid};
use tether::proto::workload as pb;
use x509_parser::prelude::*;

fn serial_of(der: &[u8]) -> String {
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
#[ignore = "child process of a_process_bound_svid_is_revoked_when_its_process_exits"]
async fn child_fetch_x509() {
    let socket = std::env::var("TETHER_TEST_SOCKET").unwrap();
    let mut raw = common::raw_client(Path::new(&socket), true).await;
    let mut stream = raw
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    println!("SERIAL {}", serial_of(&first.svids[0].x509_svid));
}

#[tokio::test]
async fn a_process_bound_svid_is_revoked_when_its_process_exits() {
    let agent = TestAgent::start(&format!(
        "[[entries]]\nspiffe_id = \"spiffe://example.org/bound\"\nselectors = [\"unix:uid:{}\"]\nprocess_bound = true\n",
        uid()
    ))
    .await;
    let mut raw = agent.raw_client(true).await;
    let mut mine = raw
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    let first = mine.message().await.unwrap().unwrap();
    let my_serial = serial_of(&first.svids[0].x509_svid);
    assert!(first.crl.is_empty(), "nothing revoked yet");

    // Another process matching the same entry gets its own SVID.
    let out = tokio::task::spawn_blocking({
        let socket = agent.socket.clone();
        move || {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "process_bound::child_fetch_x509",
                    "--ignored",
                    "--nocapture",
                ])
                .env("TETHER_TEST_SOCKET", socket)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let child_serial = stdout
        .lines()
        .find_map(|l| l.strip_prefix("SERIAL "))
        .expect("the child printed its serial")
        .to_owned();
    assert_ne!(child_serial, my_serial, "one SVID per process");

    // The child has exited: its serial appears in a CRL on our open stream,
    // signed by the CA in the bundle; ours does not.
    let update = tokio::time::timeout(PATIENCE, async {
        loop {
            let msg = mine.message().await.unwrap().unwrap();
            if !msg.crl.is_empty() {
                return msg;
            }
        }
    })
    .await
    .expect("a CRL is pushed");
    assert_eq!(
        serial_of(&update.svids[0].x509_svid),
        my_serial,
        "our own SVID stays"
    );
    let (_, crl) = parse_x509_crl(&update.crl[0]).unwrap();
    let revoked: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| r.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    assert!(
        revoked.contains(&child_serial),
        "{revoked:?} lacks {child_serial}"
    );
    assert!(!revoked.contains(&my_serial));
    let bundle = &update.svids[0].bundle;
    let (_, ca) = X509Certificate::from_der(bundle).unwrap();
    crl.verify_signature(ca.public_key())
        .expect("the CRL is signed by the bundle's CA");

    // Bundle streams carry it too.
    let mut bundles = raw
        .fetch_x509_bundles(pb::X509BundlesRequest {})
        .await
        .unwrap()
        .into_inner();
    let b = bundles.message().await.unwrap().unwrap();
    assert_eq!(b.crl, update.crl);
    agent.stop().await;
}
