//! Release and blueprint references from a webhook, the form or a schedule: classification
//! (paths, the one remote form a provider fetches) and resolution under a blueprints root with
//! symlinks. Whatever the input, an accepted path is inside the root and an accepted remote
//! reference is `s3://BUCKET/KEY` for a provider that fetches `s3`.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use dryrun::reference::{self, Resolved};
use libfuzzer_sys::fuzz_target;

/// A root with a few entries, a symlink that escapes and one that stays inside.
static ROOT: LazyLock<(tempfile::TempDir, PathBuf)> = LazyLock::new(|| {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("root");
    std::fs::create_dir_all(root.join("releases/v2")).unwrap();
    std::fs::write(root.join("shop.yaml"), "name: x\n").unwrap();
    std::fs::create_dir_all(d.path().join("outside")).unwrap();
    std::os::unix::fs::symlink(d.path().join("outside"), root.join("escape")).unwrap();
    std::os::unix::fs::symlink("releases", root.join("inside")).unwrap();
    let canon = root.canonicalize().unwrap();
    (d, canon)
});

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else { return };
    let root = &ROOT.1;
    for remote in [&[][..], &["s3"][..]] {
        match reference::resolve_under(root, value, "release", remote) {
            Ok(Resolved::Local(p)) => {
                assert!(p.starts_with(root), "{value:?} resolved outside the root: {p:?}");
                assert!(!value.contains("://") && reference::scheme(value).is_none(), "{value:?}");
            }
            Ok(Resolved::Remote(r)) => {
                assert!(remote.contains(&"s3") && r.starts_with("s3://"), "{value:?} → {r:?}");
                assert!(!r.chars().any(char::is_control), "{value:?}");
            }
            Err(e) => {
                let _ = (e.to_string(), e.status());
            }
        }
        if let Ok(Resolved::Local(_)) = reference::classify(value, "--release", remote) {
            assert!(reference::scheme(value).is_none() && !value.contains("://"), "{value:?}");
        }
    }
});
