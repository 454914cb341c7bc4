//! Issue 15, finding 10: the audit trail's end is sealed by the agent.
//!
//! Before, cutting the tail and rewriting `HEAD` with the new last line's
//! hash verified as intact. Now `HEAD` carries the agent's Ed25519 seal;
//! `tether audit verify --public-key` with the published `audit.pub`
//! refuses a rewritten `HEAD`, a made-up `audit-recovered` record, and a
//! key that is not the agent's. A real agent writes the trail; the real
//! binary verifies it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{self, TestAgent};

/// `tether audit verify --dir DIR [--public-key KEY]...`.
fn verify(dir: &Path, keys: &[&Path]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
    command.args(["audit", "verify", "--dir"]).arg(dir);
    for key in keys {
        command.arg("--public-key").arg(key);
    }
    command.env_remove("TETHER_CONFIG").output().unwrap()
}

fn entries() -> String {
    common::entry_for_me("sealed", "sealed")
}

fn said(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The agent's trail with a few records, the agent stopped; the directory,
/// the trail and the public key copied "off the node".
async fn a_stopped_agents_trail() -> (TestAgent, PathBuf, PathBuf) {
    let mut agent = TestAgent::start(&entries()).await;
    let client = agent.spiffe_client().await;
    for audience in [
        "https://one.example",
        "https://two.example",
        "https://three.example",
    ] {
        client.fetch_jwt_svid(&[audience], None).await.unwrap();
    }
    if let Some(running) = agent.running.take() {
        running.stop().await.unwrap();
    }
    let data = agent.dir.path().join("data");
    let published = agent.dir.path().join("off-node.pub");
    std::fs::copy(data.join("audit.pub"), &published).unwrap();
    (agent, data.join("audit"), published)
}

#[tokio::test]
async fn a_cut_tail_with_a_rewritten_head_is_caught_by_the_published_key() {
    let (_agent, dir, key) = a_stopped_agents_trail().await;
    let out = verify(&dir, &[&key]);
    assert!(out.status.success(), "{out:?}");
    assert!(said(&out).contains("seals verified"), "{}", said(&out));
    let unchecked = verify(&dir, &[]);
    assert!(unchecked.status.success(), "{unchecked:?}");
    assert!(
        said(&unchecked).contains("not checked: pass --public-key"),
        "{}",
        said(&unchecked)
    );

    let segment = dir.join("audit-000001.jsonl");
    let original = std::fs::read_to_string(&segment).unwrap();
    let original_head = std::fs::read_to_string(dir.join("HEAD")).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert!(lines.len() >= 3, "{original}");
    let kept = &lines[..lines.len() - 2];
    let last = kept.last().unwrap();
    let cut = kept.join("\n") + "\n";

    // The attack of the finding: cut the tail, rewrite HEAD to name the
    // new last record. The chain alone holds...
    std::fs::write(&segment, &cut).unwrap();
    std::fs::write(
        dir.join("HEAD"),
        format!(
            "{{\"seq\":{},\"hash\":\"{}\"}}\n",
            kept.len(),
            sha256_hex(last.as_bytes())
        ),
    )
    .unwrap();
    let out = verify(&dir, &[]);
    assert!(out.status.success(), "{out:?}");
    assert!(said(&out).contains("HEAD is not sealed"), "{}", said(&out));
    // ...and the published key does not.
    let out = verify(&dir, &[&key]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        said(&out).contains("HEAD does not hold: it is not sealed"),
        "{}",
        said(&out)
    );

    // The agent's own seal moved to the rewritten HEAD.
    let mut head: serde_json::Value = serde_json::from_str(&original_head).unwrap();
    head["seq"] = kept.len().into();
    head["hash"] = sha256_hex(last.as_bytes()).into();
    std::fs::write(dir.join("HEAD"), format!("{head}\n")).unwrap();
    let out = verify(&dir, &[&key]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        said(&out).contains("signature does not verify"),
        "{}",
        said(&out)
    );

    // A made-up recovery record explaining the gap away, HEAD naming it.
    let forged = format!(
        "{{\"seq\":{},\"time\":\"2026-12-07T00:00:00.000000Z\",\"prev\":\"{}\",\"event\":\"audit-recovered\",\"decision\":\"info\",\"reason\":\"nothing happened\"}}",
        kept.len() + 1,
        sha256_hex(last.as_bytes())
    );
    std::fs::write(&segment, format!("{cut}{forged}\n")).unwrap();
    std::fs::write(
        dir.join("HEAD"),
        format!(
            "{{\"seq\":{},\"hash\":\"{}\"}}\n",
            kept.len() + 1,
            sha256_hex(forged.as_bytes())
        ),
    )
    .unwrap();
    let out = verify(&dir, &[&key]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        said(&out).contains(&format!(
            "audit-recovered record seq {} does not hold: it is not sealed",
            kept.len() + 1
        )),
        "{}",
        said(&out)
    );

    // Someone else's key is not the agent's.
    let stranger = tether::audit::SigningKey::generate().unwrap().0;
    let stranger_pub = dir.parent().unwrap().join("stranger.pub");
    std::fs::write(&stranger_pub, stranger.public_key().to_pem()).unwrap();
    std::fs::write(&segment, &original).unwrap();
    std::fs::write(dir.join("HEAD"), &original_head).unwrap();
    let out = verify(&dir, &[&stranger_pub]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        said(&out).contains("not among the public keys given"),
        "{}",
        said(&out)
    );

    // Put back as the agent wrote it: intact and sealed.
    let out = verify(&dir, &[&stranger_pub, &key]);
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn the_agent_seals_what_it_found_at_start_and_a_new_key_is_recorded() {
    let (mut agent, dir, key) = a_stopped_agents_trail().await;
    let segment = dir.join("audit-000001.jsonl");
    let original = std::fs::read_to_string(&segment).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    let kept = &lines[..lines.len() - 1];
    std::fs::write(&segment, kept.join("\n") + "\n").unwrap();
    std::fs::write(
        dir.join("HEAD"),
        format!(
            "{{\"seq\":{},\"hash\":\"{}\"}}\n",
            kept.len(),
            sha256_hex(kept.last().unwrap().as_bytes())
        ),
    )
    .unwrap();

    // The agent starts on the rewritten HEAD: it says so in a record it
    // seals, and seals HEAD again. That record breaks the trail for good,
    // whoever verifies, with or without the key: a restart does not turn a
    // rewritten trail into an intact one.
    agent.restart(&entries()).await;
    agent.running().audit().flush().await;
    let data = agent.dir.path().join("data");
    if let Some(running) = agent.running.take() {
        running.stop().await.unwrap();
    }
    for keys in [vec![], vec![key.as_path()]] {
        let out = verify(&dir, &keys);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        assert!(
            said(&out).contains(&format!(
                "audit-000001.jsonl:{}: the agent found the trail damaged when it started (its record seq {}): HEAD was not sealed",
                kept.len() + 1,
                kept.len() + 1
            )),
            "{}",
            said(&out)
        );
    }

    // A replaced key is recorded by the next start the same way, sealed
    // with the new key: the old key alone does not verify the new seals.
    std::fs::remove_file(data.join("audit.key")).unwrap();
    agent.restart(&entries()).await;
    let new_key = agent.dir.path().join("new.pub");
    std::fs::copy(data.join("audit.pub"), &new_key).unwrap();
    if let Some(running) = agent.running.take() {
        running.stop().await.unwrap();
    }
    let records = tether::audit::read(&dir, &tether::audit::ReadFilter::default()).unwrap();
    let last_recovery = records
        .iter()
        .rev()
        .find(|r| r.event.event == tether::audit::EventKind::AuditRecovered)
        .unwrap();
    assert!(
        last_recovery
            .event
            .reason
            .as_deref()
            .unwrap()
            .contains("not by the key of this agent"),
        "{last_recovery:?}"
    );
    let out = verify(&dir, &[&key]);
    assert!(
        said(&out).contains("not among the public keys given"),
        "{}",
        said(&out)
    );
}
