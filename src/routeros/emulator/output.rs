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
            while line.len() + rest.len() > WIDTH && rest.contains('"') {
                let room = WIDTH.saturating_sub(line.len()).max(8);
                let cut = split_point(rest, room);
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

/// A byte offset ≤ `room` to split a pair at: after the opening quote, on a char
/// boundary, never right after a backslash, never next to a space (the parser strips the
/// continuation's indentation).
fn split_point(s: &str, room: usize) -> usize {
    let Some(open) = s.find('"') else {
        return 0;
    };
    let mut cut = room.min(s.len().saturating_sub(2));
    while cut > open + 1 {
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
