//! Tasks across the fleet (issue 18): a task begun on one node is
//! validated and exchanged on the others, and its end, however it comes,
//! is refused on every node. One `tether server` (in this process) and
//! agents in their own network namespaces, as in `fleet_nodes.rs`: node-a
//! serves the task's owner, node-b the MCP server it addresses, node-c the
//! API the MCP server exchanges the token for.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tether::audit::{EventKind, ReadFilter};
use tether::proto::admin as admin_pb;
use tether::proto::server as pb;
use tether::proto::task as task_pb;

use crate::common::fleet::{FleetAgent, FleetServer, Netns, node_client, server_bundle};
use crate::common::{
    TaskClient, admin_client, claims_of, eventually, require_root, spec, task_client, uid,
};

const A: &str = "spiffe://fleet.test/a/agent";
const B: &str = "spiffe://fleet.test/b/notes";
const C: &str = "spiffe://fleet.test/c/api";
/// Agents here give up on the server after 2 s of silence (the least
/// allowed), so the staleness test is short.
const STALENESS: &str = "revocation_staleness = \"2s\"\n";

/// A fleet of three nodes, each serving one identity to this process's uid.
struct Fleet {
    server: FleetServer,
    a: FleetAgent,
    b: FleetAgent,
    c: FleetAgent,
    _netns: [Netns; 3],
}

impl Fleet {
    async fn start() -> Self {
        Self::start_with("").await
    }

    /// [`Self::start`], with `server_extra` in the server's config.
    async fn start_with(server_extra: &str) -> Self {
        let netns = [Netns::new(), Netns::new(), Netns::new()];
        let server = FleetServer::start(&netns[0].host_ip, server_extra).await;
        let me = format!("unix:uid:{}", uid());
        for (id, node) in [(A, "node-a"), (B, "node-b"), (C, "node-c")] {
            server.create_entry(spec(id, &[&me]), &[node]).await;
        }
        let mut agents = Vec::new();
        for (ns, node) in netns.iter().zip(["node-a", "node-b", "node-c"]) {
            let token = server.join_token(node).await;
            agents.push(FleetAgent::start_with(ns, &server, &token, STALENESS).await);
        }
        let [a, b, c] = <[FleetAgent; 3]>::try_from(agents)
            .ok()
            .expect("three agents");
        for (agent, id) in [(&a, A), (&b, B), (&c, C)] {
            agent.until_serves(&[id]).await;
        }
        Self {
            server,
            a,
            b,
            c,
            _netns: netns,
        }
    }

    /// Stops the agents, then the server.
    async fn stop(self) {
        drop((self.a, self.b, self.c));
        self.server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn a_task_is_exchanged_on_another_node_and_revoked_on_every_node() {
    require_root("network namespaces");
    let fleet = Fleet::start().await;
    let (mut on_a, mut on_b, mut on_c) = (
        task_client(&fleet.a.socket).await,
        task_client(&fleet.b.socket).await,
        task_client(&fleet.c.socket).await,
    );
    let begun = begin(&mut on_a, &["notes.read", "notes.publish"]).await;
    let token = begun.token.expect("a token").token;

    // 1. Validation anywhere: node-b and node-c check it locally.
    assert!(validate(&mut on_b, &token, B, "notes.read").await.valid);
    let wrong_tool = validate(&mut on_b, &token, B, "notes.delete").await;
    assert!(!wrong_tool.valid && wrong_tool.reason.contains("notes.delete"));

    // 2. Exchange anywhere: node-b's workload, the audience, exchanges it
    //    for node-c's API, narrowing the tools.
    let exchanged = on_b
        .exchange_token(task_pb::ExchangeTokenRequest {
            subject_token: token.clone(),
            audience: C.into(),
            tools: vec!["notes.publish".into()],
            ..Default::default()
        })
        .await
        .expect("node-b exchanges node-a's task token")
        .into_inner()
        .token
        .expect("a token")
        .token;
    let (subject, next) = (claims_of(&token), claims_of(&exchanged));
    assert_eq!(next["sub"], A, "the subject stays node-a's workload");
    assert_eq!(next["txn"], subject["txn"]);
    assert_eq!(next["act"]["sub"], B, "node-b's workload acted");
    assert_eq!(next["scope"], "notes.publish");
    assert!(next["exp"].as_u64() <= subject["exp"].as_u64());
    let on_c_check = validate(&mut on_c, &exchanged, C, "notes.publish").await;
    assert!(on_c_check.valid, "{}", on_c_check.reason);
    assert_eq!(on_c_check.actors, [B]);
    // Only narrowing, and only the audience may exchange.
    let widened = on_b
        .exchange_token(task_pb::ExchangeTokenRequest {
            subject_token: token.clone(),
            audience: C.into(),
            tools: vec!["notes.delete".into()],
            ..Default::default()
        })
        .await
        .expect_err("a tool the subject lacks");
    assert!(widened.message().contains("only narrow"), "{widened:?}");
    let not_audience = on_c
        .exchange_token(task_pb::ExchangeTokenRequest {
            subject_token: token.clone(),
            audience: A.into(),
            ..Default::default()
        })
        .await
        .expect_err("node-c's workload is not the token's audience");
    assert!(
        not_audience.message().contains("only a token's audience"),
        "{not_audience:?}"
    );

    // The server's index knows the task, owned by node-a.
    let task_id = begun.task_id.clone();
    let mut admin = fleet.server.admin().await;
    let indexed = index_row(&fleet.server, task_id.clone()).await;
    assert_eq!(indexed.owner_node, "node-a");
    assert_eq!(indexed.spiffe_id, A);
    assert!(indexed.ended_reason.is_empty());

    // 3. `tether server task revoke`: every token of the task, the
    //    exchanged one too, is refused on every node, node-a included.
    let revoked = admin
        .revoke_task(pb::RevokeFleetTaskRequest {
            id: task_id.clone(),
        })
        .await
        .expect("revoke")
        .into_inner();
    assert_eq!(revoked.ended_reason, "revoked");
    for (client, t, aud, tool, node) in [
        (&mut on_a, &token, B, "notes.read", "node-a"),
        (&mut on_b, &token, B, "notes.read", "node-b"),
        (&mut on_c, &exchanged, C, "notes.publish", "node-c"),
    ] {
        let refused = until_refused(client, t, aud, tool, node).await;
        assert!(
            refused.reason.contains("revoked"),
            "{node}: {}",
            refused.reason
        );
    }
    // node-a ended the task itself, for its owner.
    let a_admin = admin_client(&fleet.a.dir.path().join("admin/admin.sock")).await;
    let on_a_list = eventually("node-a ends the revoked task", async || {
        let tasks = a_admin
            .clone()
            .list_tasks(admin_pb::ListTasksRequest {
                include_ended: true,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner()
            .tasks;
        match tasks.iter().find(|t| t.id == task_id) {
            Some(t) if !t.end_reason.is_empty() => Ok(t.end_reason.clone()),
            _ => Err("still active on node-a".to_owned()),
        }
    })
    .await;
    assert_eq!(on_a_list, "revoked");
    // A revoke again shows the first end.
    let again = admin
        .revoke_task(pb::RevokeFleetTaskRequest { id: task_id })
        .await
        .expect("revoke again")
        .into_inner();
    assert_eq!(again.ended_at_ms, revoked.ended_at_ms);

    // The server's trail: the begin and the exchange signed (with their
    // nodes), the revoke and its fan-out.
    let trail = tether::audit::read(&fleet.server.audit_dir(), &ReadFilter::default())
        .expect("the server's trail");
    let of_task: Vec<_> = trail
        .iter()
        .filter(|r| r.event.task_id.as_deref() == Some(begun.task_id.as_str()))
        .map(|r| (r.event.event, r.event.node.clone().unwrap_or_default()))
        .collect();
    let node = |n: &str| format!("spiffe://fleet.test/tether/node/{n}");
    assert!(
        of_task.contains(&(EventKind::TaskBegin, node("node-a"))),
        "{of_task:?}"
    );
    assert!(
        of_task.contains(&(EventKind::Exchange, node("node-b"))),
        "{of_task:?}"
    );
    assert!(
        of_task.contains(&(EventKind::Revoke, node("node-a"))),
        "{of_task:?}"
    );
    assert!(
        of_task
            .iter()
            .any(|(kind, _)| *kind == EventKind::TaskFanOut),
        "{of_task:?}"
    );
    for dir in [
        fleet.server.audit_dir(),
        fleet.a.audit_dir(),
        fleet.b.audit_dir(),
    ] {
        audit_verifies(&dir);
    }
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn every_way_a_task_ends_on_its_node_reaches_the_others() {
    require_root("network namespaces");
    let fleet = Fleet::start().await;
    let (mut on_a, mut on_b) = (
        task_client(&fleet.a.socket).await,
        task_client(&fleet.b.socket).await,
    );

    // The owner process is killed (kill -9): node-a sees it exit (pidfd),
    // node-b refuses the token it copied.
    let owner_dir = tempfile::tempdir().expect("tempdir");
    let token_file = owner_dir.path().join("token");
    let mut owner = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["task", "run", "--socket"])
        .arg(&fleet.a.socket)
        .args(["--audience", B, "--intent", "hold", "--tool", "notes.read"])
        .arg("--token-file")
        .arg(&token_file)
        .args(["--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("tether task run");
    let copied = eventually("the owner's token file", async || {
        std::fs::read_to_string(&token_file).map_err(|e| e.to_string())
    })
    .await;
    let copied = copied.trim().to_owned();
    assert!(validate(&mut on_b, &copied, B, "notes.read").await.valid);
    owner.kill().expect("kill -9 the owner");
    let _ = owner.wait();
    let refused = until_refused(&mut on_b, &copied, B, "notes.read", "node-b").await;
    assert!(
        refused.reason.contains("owner exited"),
        "{}",
        refused.reason
    );

    // `tether task revoke` on node-a's admin API.
    let begun = begin(&mut on_a, &["notes.read"]).await;
    let token = begun.token.expect("token").token;
    assert!(validate(&mut on_b, &token, B, "notes.read").await.valid);
    admin_client(&fleet.a.dir.path().join("admin/admin.sock"))
        .await
        .revoke_task(admin_pb::RevokeTaskRequest { id: begun.task_id })
        .await
        .expect("revoke on node-a");
    let refused = until_refused(&mut on_b, &token, B, "notes.read", "node-b").await;
    assert!(refused.reason.contains("revoked"), "{}", refused.reason);

    // The deadline passes: node-a ends the task, and the fleet's index
    // says so (its tokens expire at the deadline anyway).
    let short = on_a
        .begin_task(task_pb::BeginTaskRequest {
            audience: B.into(),
            intent: "a short one".into(),
            tools: vec!["notes.read".into()],
            ttl_ms: 2000,
            ..Default::default()
        })
        .await
        .expect("a two-second task")
        .into_inner();
    let mut admin = fleet.server.admin().await;
    let reason = eventually("the deadline end in the fleet's index", async || {
        let task = admin
            .get_task(pb::GetFleetTaskRequest {
                id: short.task_id.clone(),
            })
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        if task.ended_reason.is_empty() {
            Err("still live".to_owned())
        } else {
            Ok(task.ended_reason)
        }
    })
    .await;
    assert_eq!(reason, "deadline");

    // The owner's entry is removed on the server: node-a ends its tasks.
    let begun = begin(&mut on_a, &["notes.read"]).await;
    let token = begun.token.expect("token").token;
    let entries = admin
        .list_entries(pb::ListServerEntriesRequest {})
        .await
        .expect("entries")
        .into_inner()
        .entries;
    let a_entry = entries
        .iter()
        .filter_map(|e| e.entry.as_ref())
        .find(|e| e.spec.as_ref().is_some_and(|s| s.spiffe_id == A))
        .expect("node-a's entry")
        .id
        .clone();
    admin
        .delete_entry(pb::DeleteServerEntryRequest { id: a_entry })
        .await
        .expect("delete node-a's entry");
    let refused = until_refused(&mut on_b, &token, B, "notes.read", "node-b").await;
    assert!(
        refused.reason.contains("entry removed"),
        "{}",
        refused.reason
    );
    let indexed = index_row(&fleet.server, begun.task_id).await;
    assert_eq!(indexed.ended_reason, "entry removed");

    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn a_silent_server_fails_other_nodes_tasks_closed_and_restarts_resurrect_nothing() {
    require_root("network namespaces");
    let Fleet {
        server,
        a,
        mut b,
        c,
        _netns,
    } = Fleet::start().await;
    let (mut on_a, mut on_b) = (task_client(&a.socket).await, task_client(&b.socket).await);
    let ended = begin(&mut on_a, &["notes.read"]).await;
    let ended_token = ended.token.expect("token").token;
    on_a.end_task(task_pb::EndTaskRequest {
        task_id: ended.task_id,
    })
    .await
    .expect("end");
    until_refused(&mut on_b, &ended_token, B, "notes.read", "node-b").await;

    // 5. node-b restarts: it refuses the ended task's token as soon as it
    //    serves (not caught up yet, or caught up and knowing the end),
    //    never accepting it.
    b.restart().await;
    let mut on_b = task_client(&b.socket).await;
    let after_restart = validate(&mut on_b, &ended_token, B, "notes.read").await;
    assert!(!after_restart.valid, "an ended task is never valid again");
    let caught_up = until_refused(&mut on_b, &ended_token, B, "notes.read", "node-b").await;
    let reason = eventually("node-b catches up on the end", async || {
        let check = validate(&mut on_b, &ended_token, B, "notes.read").await;
        if check.reason.contains("has ended") {
            Ok(check.reason)
        } else {
            Err(format!("{} / {}", check.valid, check.reason))
        }
    })
    .await;
    assert!(!caught_up.valid);
    assert!(reason.contains("completed"), "{reason}");

    // 4. Staleness: a live task of node-a, and one of node-b's own.
    let live = begin(&mut on_a, &["notes.read"])
        .await
        .token
        .expect("token")
        .token;
    let own = on_b
        .begin_task(task_pb::BeginTaskRequest {
            audience: A.into(),
            intent: "node-b's own".into(),
            tools: vec!["notes.read".into()],
            ..Default::default()
        })
        .await
        .expect("a task of node-b")
        .into_inner()
        .token
        .expect("token")
        .token;
    let _ = eventually(
        "node-b accepts node-a's live task once caught up",
        async || {
            let check = validate(&mut on_b, &live, B, "notes.read").await;
            if check.valid {
                Ok(())
            } else {
                Err(check.reason)
            }
        },
    )
    .await;
    server.stop().await;
    let stale = eventually(
        "node-b refuses node-a's task once the server is silent",
        async || {
            let check = validate(&mut on_b, &live, B, "notes.read").await;
            if check.valid {
                Err("still accepted".to_owned())
            } else {
                Ok(check.reason)
            }
        },
    )
    .await;
    assert!(stale.contains("another node's"), "{stale}");
    assert!(
        stale.contains("server.revocation_staleness") || stale.contains("reconnected"),
        "{stale}"
    );
    let own_check = validate(&mut on_b, &own, A, "notes.read").await;
    assert!(
        own_check.valid,
        "node-b's own task still validates: {}",
        own_check.reason
    );
    // Health says so.
    let health = admin_client(&b.dir.path().join("admin/admin.sock"))
        .await
        .health(admin_pb::HealthRequest {})
        .await
        .expect("health")
        .into_inner();
    assert!(
        health.server.contains("other nodes' tasks refused"),
        "{}",
        health.server
    );
    drop((a, b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn a_rooted_node_cannot_sign_into_end_or_widen_another_nodes_task() {
    require_root("network namespaces");
    let fleet = Fleet::start().await;
    let mut on_a = task_client(&fleet.a.socket).await;
    let begun = begin(&mut on_a, &["notes.read"]).await;
    let token = begun.token.expect("token").token;
    let subject = claims_of(&token);
    let bundle = server_bundle(&fleet.server).await;
    // Whoever roots node-b or node-c holds its node SVID.
    let mut node_b = node_client(&fleet.b, &fleet.server, &bundle).await;
    let mut node_c = node_client(&fleet.c, &fleet.server, &bundle).await;
    let sign = |claims: &serde_json::Value, subject_token: &str| pb::SignJwtRequest {
        claims_json: claims.to_string(),
        not_after_ms: not_after_ms(60),
        subject_token: subject_token.to_owned(),
    };
    // The exchange node-b's agent would ask for, as a template.
    let mut exchange = subject.clone();
    let fields = exchange.as_object_mut().expect("claims");
    fields.remove("exp");
    fields.insert("aud".into(), C.into());
    fields.insert("act".into(), serde_json::json!({"sub": B}));
    fields.insert("jti".into(), "forged-1".into());

    // A token of node-a's task, signed for node-b's own workload: refused.
    let mut own = subject.clone();
    let fields = own.as_object_mut().expect("claims");
    fields.remove("exp");
    fields.insert("sub".into(), B.into());
    let refused = node_b
        .sign_jwt(sign(&own, ""))
        .await
        .expect_err("node-b signs into node-a's task");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("begun on node node-a"),
        "{refused:?}"
    );

    // A task of its own whose deadline is ten years away: refused by the
    // server's max_task_ttl, so no index row outlives it.
    let mut far = own.clone();
    far["txn"] = "forged-far-task".into();
    far["tctx"]["deadline"] = (not_after_ms(10 * 365 * 86_400) / 1000).into();
    let refused = node_b
        .sign_jwt(sign(&far, ""))
        .await
        .expect_err("a deadline beyond max_task_ttl");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("max_task_ttl"), "{refused:?}");

    // An exchange without the subject token, by a node whose workload is
    // not the audience, widening the tools, or changing the subject.
    let missing = node_b
        .sign_jwt(sign(&exchange, ""))
        .await
        .expect_err("no subject token");
    assert_eq!(missing.code(), tonic::Code::InvalidArgument, "{missing:?}");
    let mut by_c = exchange.clone();
    by_c["act"] = serde_json::json!({"sub": C});
    let not_audience = node_c
        .sign_jwt(sign(&by_c, &token))
        .await
        .expect_err("node-c's workload is not the audience");
    assert_eq!(not_audience.code(), tonic::Code::PermissionDenied);
    assert!(
        not_audience.message().contains("only a token's audience"),
        "{not_audience:?}"
    );
    let mut wider = exchange.clone();
    wider["scope"] = "notes.read notes.delete".into();
    let widened = node_b
        .sign_jwt(sign(&wider, &token))
        .await
        .expect_err("a wider scope");
    assert!(widened.message().contains("only narrow"), "{widened:?}");
    let mut other_sub = exchange.clone();
    other_sub["sub"] = C.into();
    let swapped = node_b
        .sign_jwt(sign(&other_sub, &token))
        .await
        .expect_err("another subject");
    assert!(swapped.message().contains("sub differs"), "{swapped:?}");
    // The honest exchange is signed.
    node_b
        .sign_jwt(sign(&exchange, &token))
        .await
        .expect("node-b's honest exchange");

    // node-b cannot end node-a's task.
    let ended = node_b
        .end_tasks(pb::EndTasksRequest {
            ends: vec![pb::EndedTask {
                txn: begun.task_id.clone(),
                reason: "revoked".into(),
                ended_at_ms: not_after_ms(0),
            }],
        })
        .await
        .expect("EndTasks answers")
        .into_inner();
    assert_eq!(ended.recorded, 0, "not node-b's task");
    let indexed = index_row(&fleet.server, begun.task_id.clone()).await;
    assert!(indexed.ended_reason.is_empty(), "still live");
    // Bad input is refused with the field named.
    let bad = node_b
        .end_tasks(pb::EndTasksRequest {
            ends: vec![pb::EndedTask {
                txn: begun.task_id.clone(),
                reason: "because".into(),
                ended_at_ms: 0,
            }],
        })
        .await
        .expect_err("an unknown reason");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().starts_with("reason"), "{bad:?}");

    // Once the task ends, no exchange is signed for it.
    on_a.end_task(task_pb::EndTaskRequest {
        task_id: begun.task_id,
    })
    .await
    .expect("end");
    let late = eventually(
        "the server refuses an exchange of the ended task",
        async || match node_b.sign_jwt(sign(&exchange, &token)).await {
            Ok(_) => Err("signed".to_owned()),
            Err(status) => Ok(status),
        },
    )
    .await;
    assert!(late.message().contains("has ended"), "{late:?}");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn an_end_while_the_server_is_down_reaches_every_node_after_it_restarts() {
    require_root("network namespaces");
    let mut fleet = Fleet::start().await;
    let (mut on_a, mut on_b) = (
        task_client(&fleet.a.socket).await,
        task_client(&fleet.b.socket).await,
    );
    let before = begin(&mut on_a, &["notes.read"]).await;
    let before_token = before.token.expect("token").token;
    on_a.end_task(task_pb::EndTaskRequest {
        task_id: before.task_id,
    })
    .await
    .expect("end");
    until_refused(&mut on_b, &before_token, B, "notes.read", "node-b").await;
    let during = begin(&mut on_a, &["notes.read"]).await;
    let during_token = during.token.expect("token").token;
    assert!(
        validate(&mut on_b, &during_token, B, "notes.read")
            .await
            .valid
    );

    // The server stops; the task ends on node-a meanwhile (stored there,
    // refused there at once; its report waits for the server).
    let address = fleet.server.pause().await;
    on_a.end_task(task_pb::EndTaskRequest {
        task_id: during.task_id.clone(),
    })
    .await
    .expect("end while the server is down");
    assert!(
        !validate(&mut on_a, &during_token, B, "notes.read")
            .await
            .valid
    );

    // The server comes back (same store): node-a sends the end, node-b
    // catches up, and neither task is ever valid again on node-b.
    fleet.server.start_again(&address).await;
    let reason = eventually("node-b learns the end sent after the restart", async || {
        let check = validate(&mut on_b, &during_token, B, "notes.read").await;
        if check.reason.contains("has ended") {
            Ok(check.reason)
        } else {
            Err(format!("{} / {}", check.valid, check.reason))
        }
    })
    .await;
    assert!(reason.contains("completed"), "{reason}");
    let before_check = validate(&mut on_b, &before_token, B, "notes.read").await;
    assert!(
        !before_check.valid && before_check.reason.contains("has ended"),
        "{}",
        before_check.reason
    );
    let indexed = index_row(&fleet.server, during.task_id).await;
    assert_eq!(indexed.ended_reason, "completed");
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn a_node_at_its_task_quota_begins_no_more_and_the_others_are_untouched() {
    require_root("network namespaces");
    let fleet = Fleet::start_with("max_tasks_per_node = 2\n").await;
    let (mut on_a, mut on_b) = (
        task_client(&fleet.a.socket).await,
        task_client(&fleet.b.socket).await,
    );
    let first = begin(&mut on_a, &["notes.read"]).await;
    let _second = begin(&mut on_a, &["notes.read"]).await;
    let refused = on_a
        .begin_task(task_pb::BeginTaskRequest {
            audience: B.into(),
            intent: "one too many".into(),
            tools: vec!["notes.read".into()],
            ..Default::default()
        })
        .await
        .expect_err("node-a is at its quota");
    assert!(
        refused.message().contains("max_tasks_per_node"),
        "{refused:?}"
    );
    // Its tasks still renew, and another node still begins.
    on_a.renew_task(task_pb::RenewTaskRequest {
        task_id: first.task_id,
    })
    .await
    .expect("a task at the quota still renews");
    begin(&mut on_b, &["notes.read"]).await;
    fleet.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): scripts/test runs it"]
async fn evicting_a_node_ends_its_tasks_on_every_node() {
    require_root("network namespaces");
    let fleet = Fleet::start().await;
    let (mut on_a, mut on_b) = (
        task_client(&fleet.a.socket).await,
        task_client(&fleet.b.socket).await,
    );
    let begun = begin(&mut on_a, &["notes.read"]).await;
    let token = begun.token.expect("token").token;
    assert!(validate(&mut on_b, &token, B, "notes.read").await.valid);
    // node-b's own task lives on.
    let own = on_b
        .begin_task(task_pb::BeginTaskRequest {
            audience: A.into(),
            intent: "node-b's own".into(),
            tools: vec!["notes.read".into()],
            ..Default::default()
        })
        .await
        .expect("a task of node-b")
        .into_inner();
    let mut admin = fleet.server.admin().await;
    admin
        .evict_node(pb::EvictNodeRequest {
            name: "node-a".into(),
        })
        .await
        .expect("evict node-a");
    let refused = until_refused(&mut on_b, &token, B, "notes.read", "node-b").await;
    assert!(refused.reason.contains("revoked"), "{}", refused.reason);
    let indexed = index_row(&fleet.server, begun.task_id).await;
    assert_eq!(indexed.ended_reason, "revoked");
    let untouched = index_row(&fleet.server, own.task_id).await;
    assert!(untouched.ended_reason.is_empty(), "node-b's task lives");
    fleet.stop().await;
}

/// The task `id` as the fleet's index has it.
async fn index_row(server: &FleetServer, id: impl Into<String>) -> pb::FleetTask {
    server
        .admin()
        .await
        .get_task(pb::GetFleetTaskRequest { id: id.into() })
        .await
        .expect("the task is in the fleet's index")
        .into_inner()
}

/// Begins a task on `client`'s node for node-b's workload.
async fn begin(client: &mut TaskClient, tools: &[&str]) -> task_pb::BeginTaskResponse {
    client
        .begin_task(task_pb::BeginTaskRequest {
            audience: B.into(),
            intent: "read the notes".into(),
            tools: tools.iter().map(|t| (*t).to_owned()).collect(),
            ..Default::default()
        })
        .await
        .expect("a task begins")
        .into_inner()
}

async fn validate(
    client: &mut TaskClient,
    token: &str,
    audience: &str,
    tool: &str,
) -> task_pb::ValidateTaskTokenResponse {
    client
        .validate_task_token(task_pb::ValidateTaskTokenRequest {
            token: token.into(),
            audience: audience.into(),
            tool: tool.into(),
            presenter_certificate: Vec::new(),
        })
        .await
        .expect("ValidateTaskToken answers")
        .into_inner()
}

/// Waits until `node` refuses `token` (the end crossing the fleet: no
/// timing is asserted), and returns the refusal.
async fn until_refused(
    client: &mut TaskClient,
    token: &str,
    audience: &str,
    tool: &str,
    node: &str,
) -> task_pb::ValidateTaskTokenResponse {
    eventually(format!("{node} refuses the token"), async || {
        let check = validate(client, token, audience, tool).await;
        if check.valid {
            Err("still valid".to_owned())
        } else {
            Ok(check)
        }
    })
    .await
}

/// `tether audit verify` on a trail.
fn audit_verifies(dir: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["audit", "verify", "--dir"])
        .arg(dir)
        .output()
        .expect("tether audit verify");
    assert!(
        out.status.success(),
        "audit verify {}: {}{}",
        dir.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn not_after_ms(secs: u64) -> i64 {
    i64::try_from(
        (SystemTime::now() + Duration::from_secs(secs))
            .duration_since(UNIX_EPOCH)
            .expect("after the epoch")
            .as_millis(),
    )
    .expect("fits")
}
