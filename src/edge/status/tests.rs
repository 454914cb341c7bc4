//! One table per domain error: each variant's code, whichever API it
//! surfaces through.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::errno::Errno;
use tonic::Code;

use super::*;
use crate::attestation::ProcfsError;
use crate::attestation::k8s::{CgroupError, K8sError};
use crate::audit::AuditError;

use crate::registration::{EntryError, EntryId};
use crate::store::StoreError;
use crate::task::JournalError;

fn io() -> std::io::Error {
    std::io::Error::from_raw_os_error(28) // ENOSPC
}

fn store() -> StoreError {
    StoreError::Io {
        path: PathBuf::from("/var/lib/tether/tether.db"),
        source: io(),
    }
}

/// A JoinError, as a blocking job cancelled by runtime shutdown gives.
async fn join_error() -> tokio::task::JoinError {
    let job = tokio::spawn(std::future::pending::<()>());
    job.abort();
    match job.await {
        Err(error) => error,
        Ok(()) => unreachable!("an aborted pending job cannot finish"),
    }
}

fn audit_failures() -> Vec<(AuditUnavailable, Code)> {
    vec![
        (
            AuditUnavailable::QueueFull { capacity: 8 },
            Code::Unavailable,
        ),
        (
            AuditUnavailable::Failed {
                source: Arc::new(AuditError::Io {
                    path: PathBuf::from("/var/log/tether"),
                    source: io(),
                }),
            },
            Code::Unavailable,
        ),
        (AuditUnavailable::Stopped, Code::Unavailable),
        (
            AuditUnavailable::OverBudget {
                uid: 1000,
                rate: 10,
            },
            Code::ResourceExhausted,
        ),
        (
            AuditUnavailable::Stalled {
                waited: Duration::from_secs(10),
            },
            Code::Unavailable,
        ),
    ]
}

#[test]
fn audit_trouble_is_unavailable_and_a_spent_budget_exhausted() {
    for (error, code) in audit_failures() {
        let status = audit(&error);
        assert_eq!(status.code(), code, "{error:?}");
        assert!(status.message().contains(&error.to_string()), "{status:?}");
    }
    // The OS error under a failed write reaches the status text.
    let (failed, _) = audit_failures().swap_remove(1);
    assert!(audit(&failed).message().contains("No space left on device"));
}

#[tokio::test]
async fn every_task_error_has_one_code() {
    let table: Vec<(TaskError, Code)> = vec![
        (
            TaskError::Invalid {
                field: "audience",
                problem: "is required".into(),
            },
            Code::InvalidArgument,
        ),
        (TaskError::NotOwner("t1".into()), Code::PermissionDenied),
        (
            TaskError::Ended {
                id: "t1".into(),
                reason: "revoked".into(),
            },
            Code::FailedPrecondition,
        ),
        (TaskError::TooMany(64), Code::ResourceExhausted),
        (TaskError::Exchange("widens".into()), Code::PermissionDenied),
        (
            TaskError::Token(TokenRejection::UnknownTask("t9".into())),
            Code::InvalidArgument,
        ),
        (
            TaskError::Token(TokenRejection::Stale {
                txn: "t9".into(),
                detail: "this agent has not heard from the tether server for 7s".into(),
            }),
            Code::Unavailable,
        ),
        (TaskError::NotFound("t1".into()), Code::NotFound),
        (
            TaskError::Sign(AuthorityError::NoActiveKey("JWT")),
            Code::Unavailable,
        ),
        (TaskError::Store(store()), Code::Unavailable),
        (TaskError::Job(join_error().await), Code::Unavailable),
        (
            TaskError::Audit(AuditUnavailable::Stopped),
            Code::Unavailable,
        ),
        (
            TaskError::Audit(AuditUnavailable::OverBudget { uid: 1, rate: 1 }),
            Code::ResourceExhausted,
        ),
        (TaskError::Journal(JournalError::Closed), Code::Unavailable),
        (
            TaskError::Journal(JournalError::Store(store())),
            Code::Unavailable,
        ),
    ];
    for (error, code) in table {
        assert_eq!(task(&error).code(), code, "{error:?}");
    }
    // An agent-side failure names its cause, down to the OS error.
    let status = task(&TaskError::Store(store()));
    assert!(
        status.message().contains("No space left on device"),
        "{status:?}"
    );
}

#[tokio::test]
async fn every_svid_error_has_one_code() {
    let table: Vec<(SvidError, Code)> = vec![
        (
            SvidError::Authority(AuthorityError::NoActiveKey("X.509")),
            Code::Unavailable,
        ),
        (
            SvidError::KeyGeneration(rcgen::Error::KeyGenerationUnavailable),
            Code::Unavailable,
        ),
        (SvidError::SigningJob(join_error().await), Code::Unavailable),
        (
            SvidError::Audit(AuditUnavailable::QueueFull { capacity: 1 }),
            Code::Unavailable,
        ),
        (
            SvidError::Audit(AuditUnavailable::OverBudget { uid: 1, rate: 1 }),
            Code::ResourceExhausted,
        ),
    ];
    for (error, code) in table {
        assert_eq!(svid(&error).code(), code, "{error:?}");
    }
}

#[tokio::test]
async fn every_attestation_error_has_one_code() {
    let table: Vec<(AttestationError, Code)> = vec![
        (
            AttestationError::PeerCredentials(Errno::EBADF),
            Code::Unavailable,
        ),
        (AttestationError::NoPeerPid, Code::Unavailable),
        (
            AttestationError::PeerPidfd(Errno::EINVAL),
            Code::Unavailable,
        ),
        (
            AttestationError::PidfdOpen {
                pid: 7,
                source: io(),
            },
            Code::Unavailable,
        ),
        (
            AttestationError::PollPidfd {
                pid: 7,
                source: Errno::EINVAL,
            },
            Code::Unavailable,
        ),
        (
            AttestationError::CallerExited { pid: 7 },
            Code::Unauthenticated,
        ),
        (
            AttestationError::CredentialsChanged {
                pid: 7,
                peer_uid: 1,
                peer_gid: 1,
                proc_uid: 0,
                proc_gid: 0,
            },
            Code::Unauthenticated,
        ),
        (
            AttestationError::ExecutableChanged { pid: 7 },
            Code::Unauthenticated,
        ),
        (
            AttestationError::ReadProc {
                path: PathBuf::from("/proc/7/status"),
                source: io(),
            },
            Code::Unavailable,
        ),
        (
            AttestationError::ParseProc {
                path: PathBuf::from("/proc/7/status"),
                source: ProcfsError::MissingLine("Uid"),
            },
            Code::Unavailable,
        ),
        (
            AttestationError::Blocking(join_error().await),
            Code::Unavailable,
        ),
        (
            AttestationError::Cgroup {
                pid: 7,
                source: CgroupError::Conflict("a".into(), "b".into()),
            },
            Code::PermissionDenied,
        ),
        (
            AttestationError::Kubernetes {
                pid: 7,
                source: K8sError::PodNotListed {
                    pod_uid: "p".into(),
                    node: "n".into(),
                    attempts: 3,
                },
            },
            Code::Unavailable,
        ),
    ];
    for (error, code) in table {
        assert_eq!(attestation(&error).code(), code, "{error:?}");
    }
    // The caller's own doing, and the kubelet's answer, carry the reason.
    let pod = attestation(&AttestationError::Kubernetes {
        pid: 7,
        source: K8sError::PodNotListed {
            pod_uid: "p".into(),
            node: "n".into(),
            attempts: 3,
        },
    });
    assert!(
        pod.message()
            .contains("pod p is not among the pods of node n"),
        "{pod:?}"
    );
}

#[tokio::test]
async fn every_registration_error_has_one_code() {
    let id = EntryId::parse("ent-e1").unwrap();
    let table: Vec<(RegistrationError, Code)> = vec![
        (
            RegistrationError::Invalid(EntryError::NotCanonical {
                value: "spiffe://A/x".into(),
                canonical: "spiffe://a/x".into(),
            }),
            Code::InvalidArgument,
        ),
        (
            RegistrationError::Duplicate {
                existing: id.clone(),
            },
            Code::AlreadyExists,
        ),
        (RegistrationError::NotFound(id.clone()), Code::NotFound),
        (
            RegistrationError::FromConfig(id.clone()),
            Code::FailedPrecondition,
        ),
        (
            RegistrationError::Conflict {
                id,
                expected: 1,
                found: 2,
            },
            Code::Aborted,
        ),
        (
            RegistrationError::Stored {
                id: "e1".into(),
                source: EntryError::NotCanonical {
                    value: "spiffe://A/x".into(),
                    canonical: "spiffe://a/x".into(),
                },
            },
            Code::Internal,
        ),
        (
            RegistrationError::DuplicateInConfig {
                first: 1,
                second: 2,
                spiffe_id: "spiffe://a/x".into(),
            },
            Code::Internal,
        ),
        (RegistrationError::Store(store()), Code::Unavailable),
        (
            RegistrationError::Job(join_error().await),
            Code::Unavailable,
        ),
        (
            RegistrationError::Audit(AuditUnavailable::Stopped),
            Code::Unavailable,
        ),
    ];
    for (error, code) in table {
        assert_eq!(registration(&error).code(), code, "{error:?}");
    }
}

#[test]
fn caller_input_is_invalid_argument_with_the_reason() {
    let rejected = [
        JwtValidationError::TooLong(99_999),
        JwtValidationError::Malformed("two segments"),
        JwtValidationError::MissingKid,
        JwtValidationError::BadSubject,
        JwtValidationError::Invalid("expired".into()),
    ];
    for error in rejected {
        let status = jwt_validation(&error);
        assert_eq!(status.code(), Code::InvalidArgument, "{error:?}");
        assert_eq!(status.message(), error.to_string());
    }
    for error in [
        TokenRejection::UnknownTask("t".into()),
        TokenRejection::TooLong(600, 300),
        TokenRejection::ToolNotAllowed("rm".into()),
        TokenRejection::Binding("no certificate presented"),
        TokenRejection::Jwt(JwtValidationError::MissingKid),
        TokenRejection::NotATaskToken("no txn".into()),
        TokenRejection::Ended {
            txn: "t".into(),
            reason: "revoked".into(),
        },
    ] {
        assert_eq!(token(&error).code(), Code::InvalidArgument, "{error:?}");
    }
    assert_eq!(invalid("id", "is required").message(), "id: is required");
}

#[test]
fn another_nodes_task_the_agent_cannot_vouch_for_is_unavailable() {
    // The agent's own trouble (it has not heard from the server), which
    // may pass: retried, with the reason.
    let stale = TokenRejection::Stale {
        txn: "t".into(),
        detail: "this agent has not heard from the tether server for 7s".into(),
    };
    let status = token(&stale);
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), stale.to_string());
}

#[test]
fn denials_and_budgets() {
    assert_eq!(no_identity().code(), Code::PermissionDenied);
    assert_eq!(identity_lost().code(), Code::PermissionDenied);
    assert_eq!(denied("by policy").code(), Code::PermissionDenied);
    let spent = exhausted(
        "too many open streams",
        &Exhausted {
            limit: 2,
            setting: "max_streams_per_process",
        },
    );
    assert_eq!(spent.code(), Code::ResourceExhausted);
    assert_eq!(
        spent.message(),
        "too many open streams: this process already holds 2 (limits.max_streams_per_process)"
    );
    assert_eq!(task_ended("t", EndReason::Completed).code(), Code::Ok);
    assert_eq!(
        task_ended("t", EndReason::Deadline).code(),
        Code::DeadlineExceeded
    );
    for reason in [
        EndReason::OwnerExited,
        EndReason::EntryRemoved,
        EndReason::Revoked,
    ] {
        assert_eq!(task_ended("t", reason).code(), Code::PermissionDenied);
    }
}

#[test]
fn a_refused_signing_request_is_the_callers_and_a_signer_fault_unavailable() {
    let table = [
        (
            AuthorityError::BadRequest("CSR signature".into()),
            Code::InvalidArgument,
        ),
        (AuthorityError::NoActiveKey("JWT"), Code::Unavailable),
        (AuthorityError::Random, Code::Unavailable),
    ];
    for (error, code) in table {
        assert_eq!(authority(&error).code(), code, "{error}");
    }
    assert_eq!(
        unauthenticated("no node SVID").code(),
        Code::Unauthenticated
    );
    // A fleet agent's caller learns why the server did not sign.
    let remote = SvidError::Authority(AuthorityError::Remote(Box::new(Status::unavailable(
        "not connected to the tether server",
    ))));
    let status = svid(&remote);
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status
            .message()
            .contains("not connected to the tether server"),
        "{status:?}"
    );
}

fn server_store_unavailable() -> ServerStoreError {
    ServerStoreError::Unavailable {
        what: "reading entries",
        source: Box::new(io()),
    }
}

#[test]
fn every_server_store_error_has_one_code() {
    let table: Vec<(ServerStoreError, Code)> = vec![
        (
            ServerStoreError::Duplicate("ent-e1".into()),
            Code::AlreadyExists,
        ),
        (server_store_unavailable(), Code::Unavailable),
        (
            ServerStoreError::Unstorable {
                table: "entries",
                detail: "a time after 9999".into(),
            },
            Code::InvalidArgument,
        ),
        (
            ServerStoreError::Corrupt {
                table: "entries",
                detail: "bad spec".into(),
            },
            Code::Internal,
        ),
        (ServerStoreError::Open(Box::new(io())), Code::Internal),
    ];
    for (error, code) in table {
        let status = server_store("listing the nodes", &error);
        assert_eq!(status.code(), code, "{error:?}");
        assert!(
            status.message().starts_with("listing the nodes: "),
            "{status:?}"
        );
    }
    // The OS error under an unreachable store reaches the status text.
    let status = server_store("x", &server_store_unavailable());
    assert!(status.message().contains(&io().to_string()), "{status:?}");
}

#[test]
fn every_server_registry_error_has_one_code() {
    let id = EntryId::parse("ent-e1").unwrap();
    let invalid = || EntryError::NotCanonical {
        value: "spiffe://A/x".into(),
        canonical: "spiffe://a/x".into(),
    };
    let table: Vec<(ServerRegistryError, Code)> = vec![
        (
            ServerRegistryError::Invalid(invalid()),
            Code::InvalidArgument,
        ),
        (
            ServerRegistryError::Duplicate {
                existing: id.clone(),
            },
            Code::AlreadyExists,
        ),
        (
            ServerRegistryError::NotFound("ent-e1".into()),
            Code::NotFound,
        ),
        (
            ServerRegistryError::FromConfig(id),
            Code::FailedPrecondition,
        ),
        (
            ServerRegistryError::Stored {
                id: "ent-e1".into(),
                source: invalid(),
            },
            Code::Internal,
        ),
        (
            ServerRegistryError::Store {
                what: "storing the entry",
                source: server_store_unavailable(),
            },
            Code::Unavailable,
        ),
        (
            ServerRegistryError::Random(EntryError::BadId("<rng>".into())),
            Code::Unavailable,
        ),
        (
            ServerRegistryError::Audit(AuditUnavailable::Stopped),
            Code::Unavailable,
        ),
        (
            ServerRegistryError::Audit(AuditUnavailable::OverBudget { uid: 0, rate: 1 }),
            Code::ResourceExhausted,
        ),
    ];
    for (error, code) in table {
        let status = server_registry(&error);
        assert_eq!(status.code(), code, "{error:?}");
        assert!(!status.message().is_empty(), "{error:?}");
    }
    // What was being done leads the store's failure.
    let status = server_registry(&ServerRegistryError::Store {
        what: "storing the entry",
        source: server_store_unavailable(),
    });
    assert!(
        status.message().starts_with("storing the entry: "),
        "{status:?}"
    );
}

#[test]
fn join_token_refusals_and_node_names_have_one_code() {
    for (error, code) in [
        (TokenRefusal::Malformed, Code::Unauthenticated),
        (TokenRefusal::Unknown, Code::Unauthenticated),
        (TokenRefusal::Expired, Code::Unauthenticated),
        (TokenRefusal::Used, Code::Unauthenticated),
        (
            TokenRefusal::BadTtl(Duration::from_secs(8 * 24 * 3600)),
            Code::InvalidArgument,
        ),
        (TokenRefusal::Random, Code::Unavailable),
    ] {
        assert_eq!(join_token(&error).code(), code, "{error:?}");
    }
    assert!(
        join_token(&TokenRefusal::BadTtl(Duration::ZERO))
            .message()
            .starts_with("ttl_ms: ")
    );
    let status = node_name("nodes", &BadNodeName("Bad_Node".into()));
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("nodes: "), "{status:?}");
    assert!(status.message().contains("Bad_Node"), "{status:?}");
}
