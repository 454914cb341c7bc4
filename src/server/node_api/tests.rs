//! The names the node API gives and reads: node SVIDs and the server's.

use spiffe::{SpiffeId, TrustDomain};

use super::*;

fn td() -> TrustDomain {
    TrustDomain::new("fleet.test").unwrap()
}

#[test]
fn a_node_svid_names_its_node_and_nothing_else_does() {
    let name = NodeName::new("node-a.rack1").unwrap();
    let id = node_spiffe_id(&td(), &name).unwrap();
    assert_eq!(
        id.to_string(),
        "spiffe://fleet.test/tether/node/node-a.rack1"
    );
    assert_eq!(node_name_of(&td(), &id), Some(name));
    for other in [
        "spiffe://fleet.test/tether/server",
        "spiffe://fleet.test/tether/node/",
        "spiffe://fleet.test/tether/node/a/b",
        "spiffe://fleet.test/tether/node/Node_A",
        "spiffe://fleet.test/web",
        "spiffe://other.test/tether/node/node-a",
    ] {
        let id =
            SpiffeId::new(other).unwrap_or_else(|_| SpiffeId::new("spiffe://x.test/y").unwrap());
        assert_eq!(node_name_of(&td(), &id), None, "{other}");
    }
    assert_eq!(
        server_spiffe_id(&td()).unwrap().to_string(),
        "spiffe://fleet.test/tether/server"
    );
}

#[test]
fn times_are_milliseconds_since_the_epoch() {
    assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1500)), 1500);
    assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
}

#[test]
fn a_connections_svid_is_admitted_only_while_the_node_row_says_so() {
    // Review finding: an open sync stream checked only `evicted`, so a
    // stream outlived its SVID's expiry and the node's re-admission.
    let t0 = UNIX_EPOCH + Duration::from_secs(1_000_000);
    let name = NodeName::new("node-a").expect("name");
    let node = CallingNode {
        spiffe_id: node_spiffe_id(&td(), &name).expect("id"),
        name: name.clone(),
        not_before: t0,
        not_after: t0 + crate::server::config::DEFAULT_NODE_SVID_TTL,
    };
    let row = NodeRow {
        name,
        attestation: "join_token".into(),
        attested_at: t0,
        svid_serial: "0a".into(),
        svid_expires_at: t0 + crate::server::config::DEFAULT_NODE_SVID_TTL,
        evicted: false,
    };
    let during = t0 + Duration::from_secs(60);
    assert!(node.still_admitted(&row, during).is_ok());
    let refused = |row: &NodeRow, now| {
        let status = node.still_admitted(row, now).expect_err("refused");
        assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
        status.message().to_owned()
    };
    let evicted = NodeRow {
        evicted: true,
        ..row.clone()
    };
    assert!(refused(&evicted, during).contains("evicted"));
    assert!(refused(&row, t0 + crate::server::config::DEFAULT_NODE_SVID_TTL).contains("expired"));
    let again = NodeRow {
        attested_at: t0 + Duration::from_secs(30),
        ..row.clone()
    };
    assert!(refused(&again, during).contains("predates"));
}

#[test]
fn a_task_deadline_is_in_the_future_and_within_max_task_ttl() {
    // Review finding: the server took any tctx.deadline a node claimed, so
    // a rooted node could begin tasks whose index rows (and whose ends on
    // every agent) were never pruned, and tokens the server signed for
    // them were capped by the entry's TTL alone.
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let max = Duration::from_secs(24 * 3600);
    assert!(tasks::check_deadline(now + Duration::from_secs(60), now, max).is_ok());
    assert!(tasks::check_deadline(now + max, now, max).is_ok());
    for (deadline, words) in [
        (now, "in the past"),
        (now - Duration::from_secs(1), "in the past"),
        (now + max + Duration::from_secs(1), "more than 1day away"),
        (now + Duration::from_secs(10 * 365 * 86_400), "max_task_ttl"),
    ] {
        let refused = tasks::check_deadline(deadline, now, max).expect_err("refused");
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(refused.message().contains(words), "{refused:?}");
    }
}
