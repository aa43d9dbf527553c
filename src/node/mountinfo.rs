//! Parser of `/proc/self/mountinfo` (proc(5)), the kernel's own view of the mount table.
//!
//! Line format: `id parent major:minor root mount-point options [optional...] - fstype
//! source super-options`. Paths escape space, tab, newline and backslash as octal
//! (`\040`, `\011`, `\012`, `\134`). A malformed line is an error naming the line, never a
//! silently skipped mount (a skipped mount could make an unmount look done).

use std::path::PathBuf;

use crate::ports::mounter::{MountEntry, MountError};

/// Decodes the octal escapes the kernel uses in mountinfo fields.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            if let Ok(b) = u8::try_from(v) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the whole table, in kernel order.
pub fn parse(text: &str) -> Result<Vec<MountEntry>, MountError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Result<MountEntry, MountError> {
    let bad = || MountError::Io(format!("malformed mountinfo line: {line:?}"));
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().position(|f| *f == "-").ok_or_else(bad)?;
    if sep < 6 || fields.len() < sep + 3 {
        return Err(bad());
    }
    let dev = fields[2];
    if !dev.contains(':') {
        return Err(bad());
    }
    Ok(MountEntry {
        dev: dev.to_string(),
        root: unescape(fields[3]),
        target: PathBuf::from(unescape(fields[4])),
        options: fields[5].split(',').map(str::to_string).collect(),
        fs_type: unescape(fields[sep + 1]),
        source: unescape(fields[sep + 2]),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
25 1 7:0 / /var/lib/kubelet/plugins/kubernetes.io/csi/rds.csi.srvlab.io/abc/globalmount rw,relatime shared:1 - ext4 /dev/loop0 rw
26 1 7:0 / /var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc\\0401/mount ro,relatime shared:1 - ext4 /dev/loop0 rw
27 1 0:5 /loop1 /var/lib/kubelet/pods/p2/volumeDevices/x/pvc-2 rw,nosuid master:2 - devtmpfs udev rw,size=1k
";

    #[test]
    fn parses_mounts_binds_and_block_binds_with_escapes() {
        let m = parse(SAMPLE).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(m[1].dev, "7:0");
        assert_eq!(m[1].source, "/dev/loop0");
        assert_eq!(m[1].fs_type, "ext4");
        assert_eq!(
            m[2].target,
            PathBuf::from("/var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc 1/mount")
        );
        assert!(m[2].options.iter().any(|o| o == "ro"));
        assert_eq!(m[3].root, "/loop1");
        assert_eq!(m[3].fs_type, "devtmpfs");
        // No optional fields at all is valid too.
        let m = parse("30 1 8:1 / /mnt rw - xfs /dev/sda1 rw\n").unwrap();
        assert_eq!(m[0].source, "/dev/sda1");
    }

    #[test]
    fn unescape_decodes_octal_and_leaves_other_backslashes() {
        assert_eq!(unescape("a\\040b\\011c\\012d\\134e"), "a b\tc\nd\\e");
        assert_eq!(unescape("x\\9y\\04"), "x\\9y\\04");
    }

    #[test]
    fn malformed_lines_are_errors_not_skipped_mounts() {
        for bad in [
            "garbage",
            "1 2 3 4 5 6 7 8",
            "22 1 0-21 / /proc rw - proc proc rw",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
