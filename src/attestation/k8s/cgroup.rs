//! `/proc/<pid>/cgroup` to the pod and container a process runs in: a pure
//! parser of what the kernel writes, for every layout the kubelet creates.
//!
//! The kubelet names a pod's cgroup after its UID and the runtime names the
//! container's after its ID, under a QoS level or not, with either cgroup
//! driver:
//!
//! ```text
//! cgroupfs (v1 and v2):  /kubepods/burstable/pod<uid>/<id>
//!                        /kubepods/pod<uid>/<id>                                   (guaranteed)
//! systemd:               /kubepods.slice/kubepods-besteffort.slice/
//!                          kubepods-besteffort-pod<uid_with_underscores>.slice/
//!                          cri-containerd-<id>.scope | crio-<id>.scope | docker-<id>.scope
//! nested (kind, k3d):    /docker/<host id>/kubepods/...  or  /kubelet.slice/kubelet-kubepods.slice/...
//! ```
//!
//! v1 has one line per hierarchy (`3:cpu,cpuacct:/...`), v2 one line
//! (`0::/...`); every line that names a pod must name the same one. A line
//! that names no pod (a host process, a systemd service) is not an error:
//! the process is simply not in a pod.

/// The pod and container a process runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodContainer {
    /// The pod's UID, in its canonical form (`2c48913c-b29f-11e7-...`).
    pub pod_uid: String,
    /// The container's ID as the runtime reports it (64 hex digits). Always
    /// set in what [`pod_container`] returns; `None` only for a v1
    /// hierarchy line that stops at the pod level, while merging lines.
    pub container_id: Option<String>,
}

/// The cgroup file is not one a process of one pod has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    /// Two hierarchies place the process in different pods or containers.
    #[error("cgroup hierarchies disagree: {0:?} and {1:?}")]
    Conflict(String, String),
}

/// Longest cgroup file read; the kernel writes a few hundred bytes a line.
pub const MAX_CGROUP_FILE: u64 = 64 * 1024;

/// The pod and container named by a `/proc/<pid>/cgroup` file, if any.
pub fn pod_container(file: &str) -> Result<Option<PodContainer>, CgroupError> {
    let mut found: Option<PodContainer> = None;
    for line in file.lines() {
        // hierarchy-ID:controller-list:cgroup-path; the path may hold ':'.
        let mut fields = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let Some(here) = in_path(path) else {
            continue;
        };
        match &found {
            None => found = Some(here),
            Some(seen) if *seen == here => {}
            // A v1 hierarchy can stop at the pod level (no container) while
            // another names the container: the more precise one wins.
            Some(seen) if seen.pod_uid == here.pod_uid && seen.container_id.is_none() => {
                found = Some(here);
            }
            Some(seen) if seen.pod_uid == here.pod_uid && here.container_id.is_none() => {}
            Some(seen) => {
                return Err(CgroupError::Conflict(describe(seen), describe(&here)));
            }
        }
    }
    // A process at the pod level belongs to no container: workloads never
    // run there, so it is no pod's workload.
    Ok(found.filter(|pc| pc.container_id.is_some()))
}

fn describe(pc: &PodContainer) -> String {
    match &pc.container_id {
        Some(id) => format!("pod {} container {id}", pc.pod_uid),
        None => format!("pod {}", pc.pod_uid),
    }
}

/// The pod (the one path segment naming one) and the container below it.
///
/// A path naming two pods is no pod's: a container allowed to create
/// cgroups could otherwise make `.../pod<its own>/<id>/pod<another>` and
/// move in, to be taken for the other pod.
fn in_path(path: &str) -> Option<PodContainer> {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let mut pods = segments
        .iter()
        .enumerate()
        .filter_map(|(i, segment)| pod_uid_in(segment).map(|uid| (i, uid)));
    let (at, pod_uid) = pods.next()?;
    if pods.next().is_some() {
        return None;
    }
    let container_id = match segments.get(at + 1..) {
        Some([container]) => Some(container_id_in(container)?),
        Some([]) | None => None,
        // Deeper than pod/container: not a layout the kubelet makes.
        Some(_) => return None,
    };
    Some(PodContainer {
        pod_uid,
        container_id,
    })
}

/// `pod<uid>` (cgroupfs) or `kubepods[-<qos>]-pod<uid_>.slice` (systemd).
fn pod_uid_in(segment: &str) -> Option<String> {
    let rest = segment.strip_suffix(".slice").unwrap_or(segment);
    let start = rest.rfind("pod")? + "pod".len();
    let prefix = &rest[..start - "pod".len()];
    // Only what the kubelet writes before it: nothing (cgroupfs), or
    // [<root slice>-]kubepods[-<qos>]- (systemd; kind's root is `kubelet`).
    let known_prefix = prefix.is_empty()
        || ["kubepods-", "kubepods-burstable-", "kubepods-besteffort-"]
            .iter()
            .any(|tail| prefix == *tail || prefix.ends_with(&format!("-{tail}")));
    if !known_prefix {
        return None;
    }
    let uid = rest[start..].replace('_', "-");
    is_uuid(&uid).then_some(uid)
}

/// The container's ID in its cgroup's name: bare (cgroupfs), or in a
/// runtime's systemd scope.
fn container_id_in(segment: &str) -> Option<String> {
    let name = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = ["cri-containerd-", "crio-", "docker-", "containerd-"]
        .iter()
        .find_map(|prefix| name.strip_prefix(prefix))
        .unwrap_or(name);
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// 8-4-4-4-12 hex digits.
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(group, len)| group.len() == len && group.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const UID_: &str = "2c48913c_b29f_11e7_9350_020968147796";
    const ID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

    fn found(file: &str) -> PodContainer {
        pod_container(file)
            .unwrap()
            .unwrap_or_else(|| panic!("no pod in {file:?}"))
    }

    fn expect_container(file: &str) {
        assert_eq!(
            found(file),
            PodContainer {
                pod_uid: UID.into(),
                container_id: Some(ID.into())
            },
            "{file}"
        );
    }

    #[test]
    fn cgroup_v1_cgroupfs_every_qos() {
        for qos in ["burstable/", "besteffort/", ""] {
            let file = format!(
                "12:pids:/kubepods/{qos}pod{UID}/{ID}\n11:memory:/kubepods/{qos}pod{UID}/{ID}\n1:name=systemd:/kubepods/{qos}pod{UID}/{ID}\n0::/\n"
            );
            expect_container(&file);
        }
    }

    #[test]
    fn cgroup_v1_systemd_with_each_runtime() {
        for scope in [
            format!("docker-{ID}.scope"),
            format!("cri-containerd-{ID}.scope"),
            format!("crio-{ID}.scope"),
        ] {
            let file = format!(
                "4:cpu,cpuacct:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/{scope}\n"
            );
            expect_container(&file);
        }
    }

    #[test]
    fn cgroup_v2_systemd_and_cgroupfs() {
        expect_container(&format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        ));
        // Guaranteed QoS has no QoS slice.
        expect_container(&format!(
            "0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-{ID}.scope\n"
        ));
        expect_container(&format!("0::/kubepods/burstable/pod{UID}/{ID}\n"));
    }

    #[test]
    fn nested_clusters_name_the_pod() {
        let host = "f".repeat(64);
        expect_container(&format!(
            "0::/docker/{host}/kubepods/besteffort/pod{UID}/{ID}\n"
        ));
        expect_container(&format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        ));
    }

    #[test]
    fn paths_relative_to_the_agents_own_cgroup_namespace() {
        // An agent in a container of its own (cgroup v2, private cgroup
        // namespace) sees other pods' paths relative to its own cgroup.
        expect_container(&format!(
            "0::/../../kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        ));
        expect_container(&format!("0::/../../../burstable/pod{UID}/{ID}\n"));
    }

    #[test]
    fn the_pod_level_is_no_workload_and_a_precise_line_wins() {
        assert_eq!(
            pod_container(&format!("0::/kubepods/burstable/pod{UID}\n")),
            Ok(None)
        );
        expect_container(&format!(
            "3:cpu:/kubepods/burstable/pod{UID}\n2:memory:/kubepods/burstable/pod{UID}/{ID}\n"
        ));
    }

    #[test]
    fn processes_outside_pods_have_none() {
        for file in [
            "0::/init.scope\n",
            "0::/system.slice/sshd.service\n",
            "0::/user.slice/user-1000.slice/session-3.scope\n",
            "12:pids:/docker/9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961\n",
            "0::/\n",
            "",
        ] {
            assert_eq!(pod_container(file), Ok(None), "{file:?}");
        }
    }

    #[test]
    fn garbage_is_no_pod_and_never_a_panic() {
        for file in [
            "no colons at all",
            "0:/only-two-fields",
            "0::/kubepods/podnot-a-uid/abc",
            "0::/kubepods/burstable/pod2c48913c-b29f-11e7-9350-02096814779/x",
            "0::/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/not-hex-id",
            "0::/kubepods/burstable/pod2c48913c-b29f-11e7-9350-020968147796/a/b/c",
            "0::/mypod2c48913c-b29f-11e7-9350-020968147796/x",
            "\u{0}\u{1}::::::pod",
        ] {
            assert_eq!(pod_container(file), Ok(None), "{file:?}");
        }
    }

    #[test]
    fn a_pod_nested_in_another_pods_container_is_no_pod() {
        let other = "3f0c2c5e-1111-2222-3333-444455556666";
        for file in [
            format!("0::/kubepods/burstable/pod{UID}/{ID}/pod{other}\n"),
            format!("0::/kubepods/burstable/pod{UID}/{ID}/pod{other}/{ID}\n"),
            format!("0::/kubepods/burstable/pod{UID}/{ID}/{ID}\n"),
        ] {
            assert_eq!(pod_container(&file), Ok(None), "{file}");
        }
    }

    #[test]
    fn hierarchies_that_disagree_are_refused() {
        let other = "3f0c2c5e-1111-2222-3333-444455556666";
        let file = format!("2:memory:/kubepods/pod{UID}/{ID}\n1:cpu:/kubepods/pod{other}/{ID}\n");
        assert!(matches!(
            pod_container(&file),
            Err(CgroupError::Conflict(..))
        ));
    }
}
