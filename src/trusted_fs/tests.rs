use std::os::unix::fs::{PermissionsExt as _, symlink};

use super::*;

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Gives `path` to uid/gid 65534 (nobody): another user's file.
fn give_away(path: &Path) {
    nix::unistd::chown(
        path,
        Some(nix::unistd::Uid::from_raw(65534)),
        Some(nix::unistd::Gid::from_raw(65534)),
    )
    .unwrap();
}

/// Gives the symlink `link` itself (not what it leads to) to uid 65534.
fn give_link_away(link: &Path) {
    nix::unistd::fchownat(
        AT_FDCWD,
        link,
        Some(nix::unistd::Uid::from_raw(65534)),
        None,
        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "prerequisite missing: giving a file to another uid needs root"
    );
}

#[test]
fn missing_directories_are_created_with_the_mode_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let private = tmp.path().join("a/b/data");
    dir(&private, 0o700).unwrap();
    for path in [tmp.path().join("a"), tmp.path().join("a/b"), private] {
        assert_eq!(mode_of(&path), 0o700, "{}", path.display());
    }
    // The umask does not narrow a public socket directory.
    let public = tmp.path().join("sockets");
    dir(&public, 0o755).unwrap();
    assert_eq!(mode_of(&public), 0o755);
    // Again: an existing trusted directory is accepted as it is.
    dir(&public, 0o700).unwrap();
    assert_eq!(mode_of(&public), 0o755);
}

#[test]
fn a_directory_others_may_write_is_refused_and_left_as_found() {
    let tmp = tempfile::tempdir().unwrap();
    let open = tmp.path().join("open");
    fs::create_dir(&open).unwrap();
    fs::write(open.join("something"), b"").unwrap();
    chmod(&open, 0o777);
    let err = dir(&open, 0o700).unwrap_err();
    assert!(
        matches!(err, TrustedFsError::Mode { mode: 0o777, .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains(&open.display().to_string()), "{message}");
    assert!(message.contains("0777"), "{message}");
    assert_eq!(mode_of(&open), 0o777);
    // Sticky does not make the agent's own directory shareable.
    chmod(&open, 0o1777);
    assert!(dir(&open, 0o700).is_err());
    assert!(check_dir(&open, agent_uid()).is_err());
}

#[test]
fn an_empty_directory_of_its_own_that_others_may_write_is_made_private() {
    // As a Kubernetes emptyDir arrives: the agent's (root's, there), 0777.
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    chmod(&empty, 0o777);
    dir(&empty, 0o700).unwrap();
    assert_eq!(mode_of(&empty), 0o700);
    // With anything in it, it is refused and left as found.
    chmod(&empty, 0o777);
    fs::write(empty.join("planted"), b"").unwrap();
    assert!(matches!(
        dir(&empty, 0o700),
        Err(TrustedFsError::Mode { mode: 0o777, .. })
    ));
    assert_eq!(mode_of(&empty), 0o777);
    // A sticky one (/tmp, /dev/shm) is shared on purpose: never changed.
    fs::remove_file(empty.join("planted")).unwrap();
    chmod(&empty, 0o1777);
    assert!(dir(&empty, 0o700).is_err());
    assert_eq!(mode_of(&empty), 0o1777);
}

#[test]
fn a_directory_under_a_parent_others_may_write_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let open = tmp.path().join("open");
    fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let err = dir(&open.join("data"), 0o700).unwrap_err();
    assert!(
        matches!(&err, TrustedFsError::Mode { path, .. } if *path == open),
        "{err}"
    );
    assert!(!open.join("data").exists(), "nothing is created");
}

#[test]
fn a_sticky_parent_like_tmp_is_fine_for_what_the_agent_owns() {
    let tmp = tempfile::tempdir().unwrap();
    let sticky = tmp.path().join("tmp");
    fs::create_dir(&sticky).unwrap();
    chmod(&sticky, 0o1777);
    dir(&sticky.join("tether-1000"), 0o700).unwrap();
    check_dir(&sticky.join("tether-1000"), agent_uid()).unwrap();
}

#[test]
fn symlinks_are_refused_as_the_directory_and_followed_with_care_above_it() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    fs::create_dir(&real).unwrap();
    let link = tmp.path().join("link");
    symlink(&real, &link).unwrap();
    let err = dir(&link, 0o700).unwrap_err();
    assert!(matches!(err, TrustedFsError::Symlink(_)), "{err}");
    // Above the directory, a link to a trusted place is fine ...
    dir(&link.join("data"), 0o700).unwrap();
    assert!(real.join("data").is_dir());
    // ... and a link to a place others may write is not.
    let open = tmp.path().join("open");
    fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let to_open = tmp.path().join("to-open");
    symlink(&open, &to_open).unwrap();
    let err = dir(&to_open.join("data"), 0o700).unwrap_err();
    assert!(
        matches!(&err, TrustedFsError::Mode { path, .. } if *path == open),
        "{err}"
    );
}

#[test]
fn a_file_where_a_directory_belongs_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(
        dir(&file, 0o700),
        Err(TrustedFsError::Kind { .. })
    ));
    assert!(matches!(
        dir(&file.join("below"), 0o700),
        Err(TrustedFsError::Kind { .. })
    ));
}

#[test]
fn files_are_checked_for_kind_and_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let key = tmp.path().join("key");
    fs::write(&key, b"secret").unwrap();
    chmod(&key, 0o600);
    let meta = |p: &Path| fs::symlink_metadata(p).unwrap();
    check_file(&key, &meta(&key), true).unwrap();
    chmod(&key, 0o640);
    let err = check_file(&key, &meta(&key), true).unwrap_err();
    assert!(
        err.to_string().contains("readable by its owner only"),
        "{err}"
    );
    check_file(&key, &meta(&key), false).unwrap();
    chmod(&key, 0o662);
    assert!(check_file(&key, &meta(&key), false).is_err());
    let link = tmp.path().join("link");
    symlink(&key, &link).unwrap();
    assert!(matches!(
        check_file(&link, &meta(&link), false),
        Err(TrustedFsError::Symlink(_))
    ));
    assert!(matches!(
        check_file(tmp.path(), &meta(tmp.path()), false),
        Err(TrustedFsError::Kind { .. })
    ));
}

#[test]
#[ignore = "needs root (gives files to another uid): scripts/test runs it"]
fn what_another_user_owns_is_refused_naming_the_owner() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    // Their directory, however closed.
    let theirs = tmp.path().join("theirs");
    fs::create_dir(&theirs).unwrap();
    chmod(&theirs, 0o700);
    give_away(&theirs);
    let err = dir(&theirs, 0o700).unwrap_err();
    assert!(
        matches!(
            err,
            TrustedFsError::Owner {
                owner: 65534,
                mode: 0o700,
                uid: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    // A parent of theirs: they could rename ours away.
    chmod(&theirs, 0o755);
    assert!(matches!(
        dir(&theirs.join("data"), 0o700),
        Err(TrustedFsError::Owner { .. })
    ));
    // Their file among ours.
    let key = tmp.path().join("key");
    fs::write(&key, b"planted").unwrap();
    chmod(&key, 0o600);
    give_away(&key);
    let meta = fs::symlink_metadata(&key).unwrap();
    assert!(matches!(
        check_file(&key, &meta, true),
        Err(TrustedFsError::Owner { owner: 65534, .. })
    ));
    // Their symlink above ours, even to a trusted place.
    let real = tmp.path().join("real");
    fs::create_dir(&real).unwrap();
    let link = tmp.path().join("link");
    symlink(&real, &link).unwrap();
    give_link_away(&link);
    assert!(matches!(
        dir(&link.join("data"), 0o700),
        Err(TrustedFsError::Owner { owner: 65534, .. })
    ));
    // Theirs in the middle of a chain of links: ours -> theirs -> real.
    let theirs_link = tmp.path().join("theirs-link");
    symlink(&real, &theirs_link).unwrap();
    give_link_away(&theirs_link);
    let ours = tmp.path().join("ours");
    symlink("theirs-link", &ours).unwrap();
    assert!(matches!(
        dir(&ours.join("data"), 0o700),
        Err(TrustedFsError::Owner { owner: 65534, .. })
    ));
}
