//! The fleet across two nodes (issue 17, check 1): one `tether server`,
//! two agents (node-a and node-b), each in its own network namespace with
//! its own join token, and an entry scoped to each node for this test
//! process's uid. What one node's workload is given, the other node's
//! workload accepts: a JWT-SVID (through node-b's ValidateJWTSVID and
//! offline against node-b's JWT bundles), an X.509-SVID (an mTLS handshake
//! with spiffe-rustls, each side authorizing the other's SPIFFE ID), a task
//! token (ValidateJWTSVID and ValidateTaskToken on node-b), until its task
//! ends on node-a, after which node-b refuses it too. And node-a's
//! JWT-SVID cache: a second FetchJWTSVID for the same audience is the same
//! token, signed once by the server. The server's `[oidc]`: both token
//! kinds carry its issuer (node-a learned it on the sync stream), and its
//! discovery endpoint serves the key that signed them.

use std::sync::Arc;

use spiffe::{JwtSvid, SpiffeId};
use tether::audit::{AuditRecord, EventKind, Outcome, ReadFilter};
use tether::proto::task as task_pb;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::common::fleet::{FleetAgent, FleetServer, Netns};
use crate::common::{claims_of, eventually, require_root, spec, task_client, uid};

const A: &str = "spiffe://fleet.test/node-a/agent";
const B: &str = "spiffe://fleet.test/node-b/notes";
const ISSUER: &str = "https://oidc.fleet.test";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn what_node_a_issues_node_b_accepts() {
    require_root("network namespaces");
    let (ns_a, ns_b) = (Netns::new(), Netns::new());
    // The server listens on node-a's link; node-b reaches it through the
    // root namespace.
    // With [oidc]: the fleet's issuer, in every token the nodes have the
    // server sign, and its keys served for relying parties.
    let server = FleetServer::start(
        &ns_a.host_ip,
        &format!("[oidc]\nlisten = \"127.0.0.1:0\"\nissuer = \"{ISSUER}\"\n"),
    )
    .await;
    let me = format!("unix:uid:{}", uid());
    server.create_entry(spec(A, &[&me]), &["node-a"]).await;
    server.create_entry(spec(B, &[&me]), &["node-b"]).await;
    let token_a = server.join_token("node-a").await;
    let token_b = server.join_token("node-b").await;
    let node_a = FleetAgent::start(&ns_a, &server, &token_a).await;
    let node_b = FleetAgent::start(&ns_b, &server, &token_b).await;
    let on_a = spiffe_client(&node_a).await;
    let on_b = spiffe_client(&node_b).await;
    // Each node has joined and serves its own entry, and only that.
    for (client, id) in [(&on_a, A), (&on_b, B)] {
        let svids = eventually(format!("the X.509-SVID of {id}"), async || {
            client.fetch_all_x509_svids().await
        })
        .await;
        let ids: Vec<String> = svids.iter().map(|s| s.spiffe_id().to_string()).collect();
        assert_eq!(ids, [id]);
    }

    // (a) A JWT-SVID fetched on node-a, for node-b's workload.
    let jwt = on_a
        .fetch_jwt_svid([B], None)
        .await
        .expect("a JWT-SVID on node-a");
    assert_eq!(jwt.spiffe_id().to_string(), A);
    // The server's issuer, learned on node-a's sync stream; the key that
    // signed it is on the server's OIDC endpoint.
    assert_eq!(claims_of(jwt.token())["iss"], ISSUER);
    let kid = jsonwebtoken::decode_header(jwt.token())
        .expect("a header")
        .kid
        .expect("a kid");
    let jwks = oidc_keys(&server).await;
    let served = jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .find(|k| k["kid"] == kid.as_str())
        .expect("the server's OIDC endpoint serves the key that signed");
    assert_eq!(served["use"], "sig");
    // Through node-b's ValidateJWTSVID...
    let validated = on_b
        .validate_jwt_token(B, jwt.token())
        .await
        .expect("node-b validates node-a's JWT-SVID");
    assert_eq!(validated.spiffe_id().to_string(), A);
    // ...and offline, with the JWT bundles node-b serves.
    let bundles = on_b
        .fetch_jwt_bundles()
        .await
        .expect("node-b's JWT bundles");
    let offline = JwtSvid::parse_and_validate(jwt.token(), &bundles, &[B])
        .expect("node-a's JWT-SVID validates offline against node-b's bundles");
    assert_eq!(offline.spiffe_id().to_string(), A);
    let wrong = JwtSvid::parse_and_validate(jwt.token(), &bundles, &["spiffe://fleet.test/x"]);
    assert!(wrong.is_err(), "the audience is checked offline too");

    // (d) node-a's JWT-SVID cache: the same audience again is the same
    // token, served without a second signature.
    let again = on_a.fetch_jwt_svid([B], None).await.expect("again");
    assert_eq!(again.token(), jwt.token(), "served from node-a's cache");
    let jti = claims_of(jwt.token())["jti"]
        .as_str()
        .expect("jti")
        .to_owned();
    // Both serves are in node-a's trail, the second marked as cached.
    let served = eventually("both serves in node-a's trail", async || {
        let served = issued_jwt(&node_a.audit_dir(), &jti)?;
        if served.len() == 2 {
            Ok(served)
        } else {
            Err(format!("{} records", served.len()))
        }
    })
    .await;
    assert_eq!(served[0].event.reason, None);
    assert_eq!(
        served[1].event.reason.as_deref(),
        Some("served from the JWT-SVID cache")
    );
    assert_eq!(served[1].event.uid, Some(uid()), "with the caller, as ever");
    // The server signed it once: one allow record with its `jti`, node-a's.
    let signed = eventually("the signature in the server's trail", async || {
        let signed = issued_jwt(&server.audit_dir(), &jti)?;
        if signed.is_empty() {
            Err("not yet".to_owned())
        } else {
            Ok(signed)
        }
    })
    .await;
    assert_eq!(signed.len(), 1, "one signature for two serves");
    assert_eq!(
        signed[0].event.node.as_deref(),
        Some("spiffe://fleet.test/tether/node/node-a")
    );
    // Another audience is another token.
    let other = on_a
        .fetch_jwt_svid(["spiffe://fleet.test/other"], None)
        .await
        .expect("another audience");
    assert_ne!(other.token(), jwt.token());

    // (b) The X.509-SVIDs of node-a and node-b complete an mTLS handshake,
    // each side authorizing exactly the other's SPIFFE ID.
    let (server_saw, client_saw) = mtls_handshake(&node_b, A, &node_a, B).await;
    assert_eq!(server_saw, A, "node-b's workload saw node-a's");
    assert_eq!(client_saw, B, "node-a's workload saw node-b's");

    // (c) A task token begun on node-a, for node-b's workload.
    let mut tasks_a = task_client(&node_a.socket).await;
    let mut tasks_b = task_client(&node_b.socket).await;
    let begun = tasks_a
        .begin_task(task_pb::BeginTaskRequest {
            audience: B.into(),
            intent: "read the meeting notes".into(),
            tools: vec!["notes.read".into()],
            ..Default::default()
        })
        .await
        .expect("a task begun on node-a")
        .into_inner();
    let task_token = begun.token.expect("a task token").token;
    assert_eq!(claims_of(&task_token)["txn"], begun.task_id.as_str());
    assert_eq!(claims_of(&task_token)["iss"], ISSUER);
    // node-b accepts it: the standard ValidateJWTSVID...
    let validated = on_b
        .validate_jwt_token(B, &task_token)
        .await
        .expect("node-b's ValidateJWTSVID accepts node-a's task token");
    assert_eq!(validated.spiffe_id().to_string(), A);
    // ...and ValidateTaskToken with the task's rules (a tool in scope).
    let on_b_check = validate_task(&mut tasks_b, &task_token, "notes.read").await;
    assert!(on_b_check.valid, "{}", on_b_check.reason);
    assert_eq!(on_b_check.task_id, begun.task_id);
    let out_of_scope = validate_task(&mut tasks_b, &task_token, "notes.delete").await;
    assert!(!out_of_scope.valid);
    assert!(
        out_of_scope.reason.contains("notes.delete"),
        "{}",
        out_of_scope.reason
    );

    // The task ends on node-a: node-a refuses its token at once.
    tasks_a
        .end_task(task_pb::EndTaskRequest {
            task_id: begun.task_id.clone(),
        })
        .await
        .expect("end the task");
    let on_a_check = validate_task(&mut tasks_a, &task_token, "notes.read").await;
    assert!(!on_a_check.valid);
    assert!(on_a_check.reason.contains("ended"), "{}", on_a_check.reason);
    // node-b refuses it too: node-a reported the end to the server, which
    // sent it down every node's sync stream (issue 18).
    let on_b_after = eventually("node-b refuses the ended task's token", async || {
        let check = validate_task(&mut tasks_b, &task_token, "notes.read").await;
        if check.valid {
            Err("still valid on node-b".to_owned())
        } else {
            Ok(check)
        }
    })
    .await;
    assert!(
        on_b_after.reason.contains("has ended: completed"),
        "{}",
        on_b_after.reason
    );
    let refused = on_b
        .validate_jwt_token(B, &task_token)
        .await
        .expect_err("node-b's ValidateJWTSVID refuses it too");
    assert!(refused.to_string().contains("ended"), "{refused}");

    drop((node_a, node_b));
    server.stop().await;
}

/// The JWKS the server's OIDC endpoint serves (plain HTTP).
async fn oidc_keys(server: &FleetServer) -> serde_json::Value {
    let addr = server.running().oidc_addr().expect("the server's [oidc]");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(b"GET /keys HTTP/1.1\r\nHost: oidc.fleet.test\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("answer");
    let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    serde_json::from_str(body).expect("a JWKS")
}

async fn spiffe_client(agent: &FleetAgent) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .expect("spiffe client")
}

/// The `issue-jwt` allow records of the token `jti` in the trail in `dir`.
fn issued_jwt(dir: &std::path::Path, jti: &str) -> Result<Vec<AuditRecord>, String> {
    let trail = tether::audit::read(dir, &ReadFilter::default()).map_err(|e| e.to_string())?;
    Ok(trail
        .into_iter()
        .filter(|r| {
            r.event.event == EventKind::IssueJwt
                && r.event.decision == Outcome::Allow
                && r.event.token_id.as_deref() == Some(jti)
        })
        .collect())
}

async fn validate_task(
    client: &mut crate::common::TaskClient,
    token: &str,
    tool: &str,
) -> task_pb::ValidateTaskTokenResponse {
    client
        .validate_task_token(task_pb::ValidateTaskTokenRequest {
            token: token.into(),
            audience: B.into(),
            tool: tool.into(),
            presenter_certificate: Vec::new(),
        })
        .await
        .expect("ValidateTaskToken answers")
        .into_inner()
}

/// An mTLS connection over loopback between a TLS server holding the
/// X.509-SVID `server_node` serves (and accepting only `client_id`) and a
/// client holding the one `client_node` serves (and accepting only
/// `server_id`), both from the `spiffe` crate's X509Source through
/// spiffe-rustls. Returns the SPIFFE ID each side saw of the other, after
/// a byte each way.
async fn mtls_handshake(
    server_node: &FleetAgent,
    client_id: &str,
    client_node: &FleetAgent,
    server_id: &str,
) -> (String, String) {
    let server_source = x509_source(server_node).await;
    let client_source = x509_source(client_node).await;
    let server_config = spiffe_rustls::mtls_server(server_source)
        .authorize(spiffe_rustls::authorizer::exact([client_id]).expect("authorizer"))
        .build()
        .expect("server TLS config");
    let client_config = spiffe_rustls::mtls_client(client_source)
        .authorize(spiffe_rustls::authorizer::exact([server_id]).expect("authorizer"))
        .build()
        .expect("client TLS config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("listen");
    let address = listener.local_addr().expect("address");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));
    let accepting = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut tls = acceptor.accept(tcp).await.expect("server handshake");
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.expect("read");
        tls.write_all(&byte).await.expect("write");
        tls.flush().await.expect("flush");
        peer_id(tls.get_ref().1.peer_certificates())
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .expect("connect");
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("client handshake");
    tls.write_all(b"x").await.expect("write");
    tls.flush().await.expect("flush");
    let mut byte = [0u8; 1];
    tls.read_exact(&mut byte).await.expect("read the echo");
    assert_eq!(&byte, b"x");
    let client_saw = peer_id(tls.get_ref().1.peer_certificates());
    let server_saw = accepting.await.expect("the server side");
    (server_saw, client_saw)
}

async fn x509_source(agent: &FleetAgent) -> spiffe::X509Source {
    spiffe::X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .expect("an X509Source on the agent's socket")
}

/// The SPIFFE ID (URI SAN) of the peer's leaf certificate.
fn peer_id(certificates: Option<&[tokio_rustls::rustls::pki_types::CertificateDer<'_>]>) -> String {
    let leaf = certificates
        .and_then(<[_]>::first)
        .expect("the peer presented a certificate");
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).expect("certificate");
    let san = cert
        .subject_alternative_name()
        .expect("SAN extension")
        .expect("a SAN");
    let ids: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Some((*uri).to_owned()),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 1, "one URI SAN: {ids:?}");
    SpiffeId::new(&ids[0]).expect("a SPIFFE ID").to_string()
}
