//! RouterOS-faithful text output of the emulator: `print detail` (legend, index and flag
//! columns, 80-column wrapping with indented continuation lines, long quoted values split
//! across lines, thousands separators, unit sizes), `print terse`, and `monitor-traffic`.

use crate::routeros::parse::civil_from_unix;
use crate::routeros::render::quoted;

/// Width RouterOS wraps `print detail` at (an 80-column terminal).
pub const WIDTH: usize = 80;
/// Indentation of continuation lines.
const INDENT: &str = "       ";

/// A property value, with how RouterOS prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    /// A string: quoted in `detail`, quoted in `terse` only when it needs it.
    Str(String),
    /// A keyword or number printed bare (`yes`, `file`, `4420`).
    Bare(String),
    /// A byte count printed with thousands separators in `detail` (`53 687 091 200`).
    Bytes(u64),
    /// A byte count printed with a unit when one decimal is exact (`1.5GiB`), else as
    /// [`Val::Bytes`].
    Size(u64),
    /// A timestamp, `2025-11-12 00:36:13`.
    Time(i64),
}

/// One record to print.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// Item number.
    pub index: usize,
    /// Flag letters.
    pub flags: String,
    /// The entry's comment, printed as a `;;; ` line before its properties.
    pub comment: Option<String>,
    /// Properties in print order.
    pub props: Vec<(&'static str, Val)>,
}

/// `1234567` → `1 234 567`.
pub fn group_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// A size with a binary unit when one decimal digit is exact, else grouped bytes.
pub fn unit_size(n: u64) -> String {
    for (unit, name) in [
        (1u64 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ] {
        if n >= unit && u128::from(n) * 10 % u128::from(unit) == 0 {
            let tenths = u128::from(n) * 10 / u128::from(unit);
            return format!("{}.{}{name}", tenths / 10, tenths % 10);
        }
    }
    group_thousands(n)
}

/// `2025-11-12 00:36:13`.
pub fn timestamp(unix: i64) -> String {
    let (y, mo, d, h, mi, s) = civil_from_unix(unix);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

fn detail_value(v: &Val) -> String {
    match v {
        Val::Str(s) => quoted(s),
        Val::Bare(s) => s.clone(),
        Val::Bytes(n) => group_thousands(*n),
        Val::Size(n) => unit_size(*n),
        Val::Time(t) => timestamp(*t),
    }
}

fn terse_value(v: &Val) -> String {
    match v {
        Val::Str(s) if s.is_empty() || s.contains([' ', '"', '\\', '$', ';', '=']) => quoted(s),
        Val::Str(s) | Val::Bare(s) => s.clone(),
        Val::Bytes(n) | Val::Size(n) => n.to_string(),
        Val::Time(t) => timestamp(*t),
    }
}

/// `print detail` of `items`, with the `Flags:` legend.
pub fn detail(legend: &str, items: &[Item]) -> String {
    let mut out = String::new();
    out.push_str(legend);
    out.push('\n');
    for item in items {
        let mut line = format!("{:>2} {:<3}", item.index, item.flags);
        let mut first_on_line = true;
        if let Some(c) = &item.comment {
            out.push_str(&format!("{line};;; {c}\n"));
            line = INDENT.to_string();
        }
        for (k, v) in &item.props {
            let pair = format!("{k}={}", detail_value(v));
            if !first_on_line && line.len() + 1 + pair.len() > WIDTH {
                out.push_str(line.trim_end());
                out.push('\n');
                line = INDENT.to_string();
                first_on_line = true;
            }
            if !first_on_line {
                line.push(' ');
            }
            // A pair longer than a whole line is split inside its quotes.
            let mut rest = pair.as_str();
            let mut inside = false;
            while line.len() + rest.len() > WIDTH && rest.contains('"') {
                let room = WIDTH.saturating_sub(line.len()).max(8);
                let cut = split_point(rest, room, inside);
                inside = true;
                if cut == 0 || cut >= rest.len() {
                    break;
                }
                line.push_str(&rest[..cut]);
                out.push_str(&line);
                out.push('\n');
                line = INDENT.to_string();
                rest = &rest[cut..];
            }
            line.push_str(rest);
            first_on_line = false;
        }
        out.push_str(line.trim_end());
        out.push_str("\n\n");
    }
    out
}

/// A byte offset ≤ `room` to split a pair (or, `inside` the quotes, the rest of its
/// value) at: after the opening quote, on a char
/// boundary, never right after a backslash, never next to a space (the parser strips the
/// continuation's indentation).
fn split_point(s: &str, room: usize, inside: bool) -> usize {
    // The first chunk keeps at least one character after the opening quote; later
    // chunks are already inside the quotes.
    let min = if inside {
        1
    } else {
        match s.find('"') {
            Some(open) => open + 2,
            None => return 0,
        }
    };
    let mut cut = room.min(s.len().saturating_sub(2));
    while cut >= min {
        let ok = s.is_char_boundary(cut)
            && !s[..cut].ends_with(['\\', ' '])
            && !s[cut..].starts_with([' ', '"']);
        if ok {
            return cut;
        }
        cut -= 1;
    }
    0
}

/// `print terse`: one record per line.
pub fn terse(items: &[Item]) -> String {
    let mut out = String::new();
    for item in items {
        out.push_str(&format!("{:>2} {:<2}", item.index, item.flags));
        if let Some(c) = &item.comment {
            out.push_str(" comment=");
            out.push_str(&terse_value(&Val::Str(c.clone())));
        }
        for (k, v) in &item.props {
            out.push(' ');
            out.push_str(k);
            out.push('=');
            out.push_str(&terse_value(v));
        }
        out.push('\n');
    }
    out
}

/// `monitor-traffic ... once`: `name: value` lines, names right-aligned.
pub fn monitor(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        out.push_str(&format!("{k:>w$}: {v}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detail_output_wraps_groups_and_splits_long_quoted_values() {
        let items = vec![
            Item {
                index: 0,
                flags: "M".into(),
                comment: None,
                props: vec![
                    ("slot", Val::Str("raid1".into())),
                    ("type", Val::Bare("raid".into())),
                    ("mount-point", Val::Str("storage-pool".into())),
                    ("size", Val::Bytes(7_681_501_126_656)),
                    ("free", Val::Bytes(53_687_091_200)),
                ],
            },
            Item {
                index: 1,
                flags: String::new(),
                comment: None,
                props: vec![
                    ("slot", Val::Str("pvc-3f1c2a9e-8d7b-4c1e-9a0f-1b2c3d4e5f60".into())),
                    ("type", Val::Bare("file".into())),
                    (
                        "file-path",
                        Val::Str("/storage-pool/kubernetes/pvc-3f1c2a9e-8d7b-4c1e-9a0f-1b2c3d4e5f60.img".into()),
                    ),
                    ("file-size", Val::Size(3 << 29)),
                    ("nvme-tcp-export", Val::Bare("yes".into())),
                    ("nvme-tcp-server-port", Val::Bare("4420".into())),
                    (
                        "nvme-tcp-server-nqn",
                        Val::Str(format!("nqn.2000-02.com.mikrotik:{}", "x".repeat(120))),
                    ),
                ],
            },
            Item {
                index: 2,
                flags: String::new(),
                comment: None,
                props: vec![
                    ("name", Val::Str("a \"quoted\" $name".into())),
                    ("size", Val::Size((1 << 30) + 1)),
                    ("creation-time", Val::Time(1_762_907_773)),
                ],
            },
        ];
        let text = detail("Flags: M - MOUNTED", &items);
        assert!(text.lines().all(|l| l.len() <= WIDTH), "{text}");
        let parsed = crate::routeros::parse::parse_print(&text).unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[1].get("nvme-tcp-server-nqn").map(str::len), Some(25 + 120));
        assert_eq!(parsed[2].get("name"), Some("a \"quoted\" $name"));
        let out = format!("{text}--- terse ---\n{}", terse(&items));
        insta::with_settings!({
            snapshot_path => concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"),
            prepend_module_to_snapshot => false,
        }, {
            insta::assert_snapshot!("routeros_emulator_print_output", out);
        });
    }

    #[test]
    fn sizes_print_with_units_only_when_exact() {
        assert_eq!(unit_size(3 << 29), "1.5GiB");
        assert_eq!(unit_size(50 << 30), "50.0GiB");
        assert_eq!(unit_size((1 << 30) + 1), "1 073 741 825");
        assert_eq!(group_thousands(53_687_091_200), "53 687 091 200");
        assert_eq!(timestamp(1_762_907_773), "2025-11-12 00:36:13");
    }
}
