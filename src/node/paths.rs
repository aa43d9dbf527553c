//! Validation of the staging and target paths the CO hands the node.
//!
//! A path must be absolute and normalized (no `.` or `..` component, no doubled or trailing
//! `/`, no NUL) and, when an allowed root is configured (`--kubelet-root`), strictly below
//! it. The node mounts and removes things at these paths as root, so anything else is
//! INVALID_ARGUMENT naming the field, before any effect.

use std::path::{Component, Path, PathBuf};

use crate::error::Error;

/// Checks `value` (the request field `field`) and returns it as a path.
pub fn validate_path(
    field: &str,
    value: &str,
    allowed_root: Option<&Path>,
) -> Result<PathBuf, Error> {
    if value.is_empty() {
        return Err(Error::InvalidArgument(format!("{field} is required")));
    }
    if value.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{field} {value:?} contains a NUL byte"
        )));
    }
    if !value.starts_with('/') {
        return Err(Error::InvalidArgument(format!(
            "{field} {value:?} must be an absolute path"
        )));
    }
    let path = Path::new(value);
    let mut normalized = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(part) => normalized.push(part),
            Component::CurDir | Component::ParentDir | Component::Prefix(_) => {
                return Err(Error::InvalidArgument(format!(
                    "{field} {value:?} must be normalized: no '.' or '..' components"
                )));
            }
        }
    }
    if normalized.as_os_str() != path.as_os_str() || normalized == Path::new("/") {
        return Err(Error::InvalidArgument(format!(
            "{field} {value:?} must be a normalized absolute path below / (no '//', '/./' or trailing '/')"
        )));
    }
    if let Some(root) = allowed_root
        && (!normalized.starts_with(root) || normalized == root)
    {
        return Err(Error::InvalidArgument(format!(
            "{field} {value:?} is not below the allowed root {} (--kubelet-root)",
            root.display()
        )));
    }
    Ok(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_kubelet_paths_below_the_root() {
        let root = Path::new("/var/lib/kubelet");
        let p = "/var/lib/kubelet/pods/5d1c/volumes/kubernetes.io~csi/pvc-1/mount";
        assert_eq!(
            validate_path("target_path", p, Some(root)).unwrap(),
            PathBuf::from(p)
        );
        assert!(validate_path("target_path", "/tmp/csi-sanity/x", None).is_ok());
    }

    #[test]
    fn rejects_relative_unnormalized_and_escaping_paths() {
        let root = Some(Path::new("/var/lib/kubelet"));
        for bad in [
            "",
            "relative/path",
            "/var/lib/kubelet/../../etc",
            "/var/lib/kubelet/./x",
            "/var/lib/kubelet//x",
            "/var/lib/kubelet/x/",
            "/var/lib/kubelet",
            "/var/lib/kubeletx/y",
            "/etc/passwd",
            "/",
            "/var/lib/kubelet/a\0b",
        ] {
            let err = validate_path("staging_target_path", bad, root).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidArgument(m) if m.contains("staging_target_path")),
                "{bad:?}: {err:?}"
            );
        }
        assert!(validate_path("target_path", "/a/../b", None).is_err());
    }
}
