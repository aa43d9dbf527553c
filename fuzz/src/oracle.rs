//! Checks written from the driver's documented rules, independently of the code they judge:
//! a fuzz target asks the code, asks the oracle, and fails when they disagree.
//!
//! - the renderer's alphabets and limits (`src/routeros/render.rs` module doc): which values
//!   may reach RouterOS at all;
//! - the shape of a safe RouterOS command line: exactly one command, every string value
//!   inside double quotes, `[find ...]` only as a whole selector, nothing RouterOS expands
//!   or escapes;
//! - messages that reach logs and gRPC status: one line, no control characters.

use rds_csi::routeros::command::{Command, DiskFilter};

/// Longest identifier (slot, NQN, comment, mount point) the renderer may accept.
pub const IDENT_MAX: usize = 223;
/// Longest file path the renderer may accept.
pub const PATH_MAX: usize = 512;
/// Longest disk comment (the driver's note) the renderer may accept.
pub const COMMENT_MAX: usize = 1024;

fn ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')
}

/// Whether `v` may be sent as an identifier: 1..=223 bytes of letters, digits, `-_.:`.
pub fn ident_ok(v: &str) -> bool {
    !v.is_empty() && v.len() <= IDENT_MAX && v.chars().all(ident_char)
}

/// Whether `v` may be sent as a disk comment: the identifier alphabet, 1..=1024 bytes.
pub fn comment_ok(v: &str) -> bool {
    !v.is_empty() && v.len() <= COMMENT_MAX && v.chars().all(ident_char)
}

/// Whether `p` is a RouterOS `/file` name the renderer may send: 1..=512 bytes of letters,
/// digits, `-_./`, no leading `/`, no empty, `.` or `..` segment.
pub fn path_ok(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= PATH_MAX
        && p.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
        && p.split('/').all(|s| !s.is_empty() && s != "." && s != "..")
}

/// The base path a renderer for `base` works under, or `None` when it must refuse it
/// (trailing `/`s and one leading `/` are dropped first).
pub fn base_of(base: &str) -> Option<String> {
    let t = base.trim_end_matches('/');
    let t = t.strip_prefix('/').unwrap_or(t);
    path_ok(t).then(|| t.to_string())
}

/// `p` lies under `base` (or is it, when `itself`).
fn under(base: &str, p: &str, itself: bool) -> bool {
    path_ok(p)
        && ((itself && p == base)
            || p.strip_prefix(base)
                .is_some_and(|r| r.starts_with('/') && r.len() > 1))
}

/// Whether a renderer working under `base` must render `cmd` (true) or refuse it.
pub fn must_render(base: &str, cmd: &Command) -> bool {
    match cmd {
        Command::DiskAdd(a) => {
            a.copy_from.as_deref().is_none_or(ident_ok)
                && under(base, &a.file_path, false)
                && match a.size_bytes {
                    Some(n) => n > 0,
                    None => a.copy_from.is_some(),
                }
                && ident_ok(&a.slot)
                && a.comment.as_deref().is_none_or(comment_ok)
                && a.export.as_ref().is_none_or(|e| {
                    e.port != 0 && ident_ok(&e.nqn) && e.allow_host.as_deref().is_none_or(ident_ok)
                })
        }
        Command::DiskSetSize { slot, size_bytes } => ident_ok(slot) && *size_bytes > 0,
        Command::DiskSetAllowHost { slot, host_nqn } => ident_ok(slot) && ident_ok(host_nqn),
        Command::DiskSetComment { slot, comment } => ident_ok(slot) && comment_ok(comment),
        Command::DiskUnsetAllowHost { slot }
        | Command::DiskRemove { slot }
        | Command::MonitorTraffic { slot } => ident_ok(slot),
        Command::DiskPrint { filter, .. } => match filter {
            DiskFilter::All => true,
            DiskFilter::Slots(slots) => !slots.is_empty() && slots.iter().all(|s| ident_ok(s)),
            DiskFilter::Slot(s) | DiskFilter::SlotPrefix(s) | DiskFilter::MountPoint(s) => {
                ident_ok(s)
            }
        },
        Command::FilePrint { name, .. } => under(base, name, true),
        Command::FileRemove { name } => under(base, name, false),
    }
}

/// Checks a rendered line is one safe RouterOS command: printable ASCII on one line;
/// `/disk` or `/file`, a verb, then words (`where`, `detail`, ...), `[find key="..."]`
/// selectors and `key=value` / `key~value` arguments whose value is a quoted string of the
/// identifier/path alphabet (nothing to escape, nothing RouterOS expands), a selector, or
/// a bare number/keyword. Tokens are separated by single spaces.
pub fn check_command_line(line: &str) -> Result<(), String> {
    if let Some(c) = line.chars().find(|c| !matches!(c, ' '..='~')) {
        return Err(format!("contains {c:?}: not one line of printable ASCII"));
    }
    let mut rest = line;
    let mut n = 0;
    loop {
        let (tok, after) = next_token(rest)?;
        check_token(tok, n)?;
        n += 1;
        if after.is_empty() {
            break;
        }
        rest = after
            .strip_prefix(' ')
            .filter(|r| !r.is_empty() && !r.starts_with(' '))
            .ok_or_else(|| format!("tokens not separated by one space near {after:?}"))?;
    }
    if n < 2 {
        return Err("no verb".into());
    }
    Ok(())
}

/// The token at the start of `s` (a space ends it outside quotes and brackets).
fn next_token(s: &str) -> Result<(&str, &str), String> {
    let (mut quote, mut bracket) = (false, false);
    for (i, c) in s.char_indices() {
        match c {
            '"' => quote = !quote,
            '[' if !quote => {
                if bracket {
                    return Err("nested '['".into());
                }
                bracket = true;
            }
            ']' if !quote => {
                if !bracket {
                    return Err("']' without '['".into());
                }
                bracket = false;
            }
            ' ' if !quote && !bracket => return Ok((&s[..i], &s[i..])),
            _ => {}
        }
    }
    if quote || bracket {
        return Err(format!("unterminated quote or bracket in {s:?}"));
    }
    Ok((s, ""))
}

fn is_word(t: &str) -> bool {
    !t.is_empty() && t.chars().all(|c| c.is_ascii_lowercase() || c == '-')
}

fn check_quoted(v: &str) -> Result<(), String> {
    let inner = v
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .filter(|_| v.len() >= 2)
        .ok_or_else(|| format!("{v:?} is not a quoted string"))?;
    let inner = inner.strip_prefix('^').unwrap_or(inner);
    if let Some(c) = inner
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/')))
    {
        return Err(format!("quoted value {v:?} contains {c:?}"));
    }
    Ok(())
}

fn check_selector(t: &str) -> Result<(), String> {
    let inner = t
        .strip_prefix("[find ")
        .and_then(|t| t.strip_suffix(']'))
        .ok_or_else(|| format!("{t:?} is not a [find key=\"value\"] selector"))?;
    let (key, value) = inner
        .split_once('=')
        .ok_or_else(|| format!("selector {t:?} without key=value"))?;
    if !is_word(key) {
        return Err(format!("selector key {key:?}"));
    }
    check_quoted(value)
}

fn check_token(t: &str, n: usize) -> Result<(), String> {
    match n {
        0 if t == "/disk" || t == "/file" => Ok(()),
        0 => Err(format!("{t:?} is not /disk or /file")),
        1 if is_word(t) => Ok(()),
        1 => Err(format!("verb {t:?}")),
        _ if is_word(t) => Ok(()),
        _ if t.starts_with('[') => check_selector(t),
        _ => {
            let op = t
                .find(['=', '~'])
                .ok_or_else(|| format!("{t:?} is neither a word, a selector nor an argument"))?;
            let (key, value) = (&t[..op], &t[op + 1..]);
            if !is_word(key) {
                return Err(format!("argument name {key:?}"));
            }
            if value.starts_with('"') {
                check_quoted(value)
            } else if value.starts_with('[') {
                check_selector(value)
            } else if !value.is_empty() && value.chars().all(|c| c.is_ascii_alphanumeric()) {
                Ok(())
            } else {
                Err(format!("bare value {value:?}"))
            }
        }
    }
}

/// Checks a message meant for a log line or a gRPC status is one line without control
/// characters (hostile input shown with `{:?}`, never raw).
pub fn check_message(msg: &str) -> Result<(), String> {
    match msg.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!("message contains {c:?}: {msg:?}")),
        None => Ok(()),
    }
}
