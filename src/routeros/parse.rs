//! Parser of RouterOS `print detail` / `print terse` output and of RouterOS error replies.
//!
//! Robust to what RouterOS really prints (samples in `tests/fixtures/routeros/`): the
//! `Flags:` legend, index and flag prefixes, `;;;` comments, quoted strings with escapes,
//! continuation lines indented with spaces or tabs, long values wrapped across lines,
//! thousands separators (`53 687 091 200`), unit sizes with decimals (`1.5GiB`,
//! `512.0KiB`), both timestamp formats, values printed unquoted although they hold spaces
//! (`type=.img file size=10.0GiB last-modified=2025-11-11 14:32:41`: a bare word after an
//! unquoted value belongs to that value), and empty results. It never panics, whatever the
//! bytes (fuzzed in `fuzz/`); what it cannot read is a [`RosError::Protocol`].
//!
//! What stays malformed: a bare word before any property of a record, a bare word after a
//! quoted value (the quotes closed it), a quote inside a bare word, `=value` without a key,
//! a quoted value still open at the end of the output.

use std::collections::BTreeMap;

/// A RouterOS error reply (or output we cannot read), typed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RosError {
    /// `no such item`, or a `failure:` naming a missing object.
    #[error("not found: {0}")]
    NotFound(String),
    /// A `failure:` saying the object already exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// `syntax error`, `input does not match any value of ...`, other `failure:`s.
    #[error("invalid: {0}")]
    Invalid(String),
    /// A `failure:` saying there is not enough space.
    #[error("not enough space: {0}")]
    NoSpace(String),
    /// A `failure:` saying the device is busy or an action timed out.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Output we could not read.
    #[error("unreadable output: {0}")]
    Protocol(String),
}

/// One record of a `print`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The item number RouterOS printed, if any.
    pub index: Option<u32>,
    /// Flag letters (e.g. `X` disabled), in printed order.
    pub flags: String,
    /// A `;;; comment`, if any.
    pub comment: Option<String>,
    /// Properties, by name.
    pub props: BTreeMap<String, String>,
}

impl Record {
    /// A property's raw value.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.props.get(key).map(String::as_str)
    }
}

/// Longest output we try to read (a guard for the fuzzer and hostile peers).
pub const MAX_OUTPUT_BYTES: usize = 64 << 20;

/// Checks `text` for a RouterOS error reply: the first non-empty line decides.
pub fn check_reply(text: &str) -> Result<(), RosError> {
    let Some(first) = text.lines().map(str::trim).find(|l| !l.is_empty()) else {
        return Ok(());
    };
    let msg = shown(first);
    let lower = msg.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("failure:") {
        return Err(classify_failure(rest, msg));
    }
    if lower.starts_with("no such item") {
        return Err(RosError::NotFound(msg));
    }
    if lower.starts_with("syntax error")
        || lower.starts_with("expected ")
        || lower.starts_with("bad command name")
        || lower.starts_with("input does not match any value of")
        || lower.starts_with("invalid value")
        || lower.starts_with("value of ")
        || lower.starts_with("ambiguous value")
    {
        return Err(RosError::Invalid(msg));
    }
    if lower.starts_with("action timed out") || lower.starts_with("interrupted") {
        return Err(RosError::Unavailable(msg));
    }
    Ok(())
}

/// Remote text as it may appear in a message (logs, gRPC status): at most 300 characters,
/// control characters escaped (found by fuzzing: a reply's bell or escape sequence reached
/// the message raw).
fn shown(line: &str) -> String {
    let mut out = String::new();
    for c in line.chars().take(300) {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

fn classify_failure(rest: &str, msg: String) -> RosError {
    if rest.contains("already") || rest.contains("exists") && !rest.contains("not exist") {
        RosError::AlreadyExists(msg)
    } else if rest.contains("space") {
        RosError::NoSpace(msg)
    } else if rest.contains("no such")
        || rest.contains("not found")
        || rest.contains("does not exist")
        || rest.contains("not exist")
    {
        RosError::NotFound(msg)
    } else if rest.contains("busy") || rest.contains("timed out") || rest.contains("try again") {
        RosError::Unavailable(msg)
    } else {
        RosError::Invalid(msg)
    }
}

/// Parses the output of a `print detail` or `print terse` (error replies included).
pub fn parse_print(text: &str) -> Result<Vec<Record>, RosError> {
    if text.len() > MAX_OUTPUT_BYTES {
        return Err(RosError::Protocol(format!(
            "output of {} bytes is larger than {MAX_OUTPUT_BYTES}",
            text.len()
        )));
    }
    check_reply(text)?;
    let mut p = Parser::default();
    for (n, raw) in text.lines().enumerate() {
        p.line(raw.trim_end_matches('\r'))
            .map_err(|e| RosError::Protocol(format!("line {}: {e}", n + 1)))?;
    }
    p.finish().map_err(RosError::Protocol)
}

#[derive(Default)]
struct Parser {
    records: Vec<Record>,
    cur: Option<Record>,
    /// A quoted value still open at the end of the previous line: (key, text so far).
    open_quote: Option<(String, String)>,
    /// Last key read (for values wrapped without quotes).
    last_key: Option<String>,
    /// Whether the last value was printed without quotes on the current line, so a bare
    /// word after it continues it (`type=.img file`).
    open_bare: bool,
    prev_blank: bool,
}

impl Parser {
    fn line(&mut self, line: &str) -> Result<(), String> {
        // A bare word at the start of a line is a wrapped value's tail (joined without a
        // space), never a second word of a value: that rule holds within a line only.
        self.open_bare = false;
        if let Some((key, mut acc)) = self.open_quote.take() {
            // A wrapped quoted value: the indentation is layout, not content.
            let rest = line.trim_start();
            return match read_quoted_tail(rest, &mut acc) {
                Some(used) => {
                    self.put(key, acc)?;
                    self.pairs(&rest[used..])
                }
                None => {
                    self.open_quote = Some((key, acc));
                    Ok(())
                }
            };
        }
        let t = line.trim();
        if t.is_empty() {
            self.prev_blank = true;
            return Ok(());
        }
        let blank_before = std::mem::replace(&mut self.prev_blank, false);
        if t.starts_with("Flags:") || t.starts_with("Columns:") {
            return Ok(());
        }
        let (first, after) = split_token(t);
        let lead = &line[..line.len() - line.trim_start().len()];
        // `size=53 687` wrapped before `091 200`: deep indentation and a digit group
        // continue the number; an item number sits in the first few columns.
        let wrapped_number = (lead.contains('\t') || lead.len() >= 4)
            && is_group(first)
            && self.last_value_is_grouped_number();
        if !wrapped_number && !first.is_empty() && first.bytes().all(|b| b.is_ascii_digit()) {
            let index = first
                .parse::<u32>()
                .map_err(|_| format!("item number {first:?} is too large"))?;
            self.start(Some(index));
            return self.prefix_then_pairs(after);
        }
        let indented = line.starts_with([' ', '\t']);
        if self.cur.is_none() || (blank_before && !indented) {
            self.start(None);
            return self.prefix_then_pairs(t);
        }
        if blank_before && indented && self.cur.as_ref().is_some_and(|r| !r.props.is_empty()) {
            // A blank line ends a record; an indented block after it is a new one.
            self.start(None);
            return self.prefix_then_pairs(t);
        }
        // A continuation line: maybe the tail of a value wrapped without quotes.
        if !first.contains('=') && !first.starts_with(";;;") {
            self.continue_bare(first)?;
            let mut rest = after;
            loop {
                let (tok, r) = split_token(rest);
                if !is_group(tok) || !self.last_value_is_grouped_number() {
                    break;
                }
                self.continue_bare(tok)?;
                rest = r;
            }
            return self.pairs(rest);
        }
        self.pairs(t)
    }

    fn start(&mut self, index: Option<u32>) {
        if let Some(r) = self.cur.take() {
            self.records.push(r);
        }
        self.cur = Some(Record {
            index,
            ..Record::default()
        });
        self.last_key = None;
        self.open_bare = false;
    }

    /// Flag letters and a `;;;` comment may precede the properties.
    fn prefix_then_pairs(&mut self, mut s: &str) -> Result<(), String> {
        loop {
            let t = s.trim_start();
            if t.starts_with(";;;") {
                let c = t.trim_start_matches(';').trim().to_string();
                if let Some(r) = self.cur.as_mut() {
                    r.comment = Some(c);
                }
                return Ok(());
            }
            let (tok, after) = split_token(t);
            // Flags are capital letters (`X`, `M`, `R`) or `*`; any other bare word before
            // the first property is not something RouterOS prints.
            if !tok.is_empty()
                && !tok.contains('=')
                && tok.chars().all(|c| c.is_ascii_uppercase() || c == '*')
            {
                if let Some(r) = self.cur.as_mut() {
                    r.flags.push_str(tok);
                }
                s = after;
                continue;
            }
            return self.pairs(t);
        }
    }

    fn continue_bare(&mut self, tok: &str) -> Result<(), String> {
        let Some(key) = self.last_key.clone() else {
            return Err(format!("unexpected {:?} before any property", trunc(tok)));
        };
        let Some(r) = self.cur.as_mut() else {
            return Err("continuation line outside a record".into());
        };
        let Some(v) = r.props.get_mut(&key) else {
            return Err(format!("unexpected {:?}", trunc(tok)));
        };
        if is_group(tok) && v.bytes().all(|b| b.is_ascii_digit() || b == b' ') {
            v.push(' ');
        }
        v.push_str(tok);
        Ok(())
    }

    fn last_value_is_grouped_number(&self) -> bool {
        let (Some(r), Some(k)) = (self.cur.as_ref(), self.last_key.as_ref()) else {
            return false;
        };
        r.props
            .get(k)
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit() || b == b' '))
    }

    fn put(&mut self, key: String, value: String) -> Result<(), String> {
        let Some(r) = self.cur.as_mut() else {
            return Err("property outside a record".into());
        };
        self.last_key = Some(key.clone());
        r.props.insert(key, value);
        Ok(())
    }

    fn pairs(&mut self, mut s: &str) -> Result<(), String> {
        loop {
            s = s.trim_start();
            if s.is_empty() {
                return Ok(());
            }
            if s.starts_with(";;;") {
                let c = s.trim_start_matches(';').trim().to_string();
                if let Some(r) = self.cur.as_mut() {
                    r.comment = Some(c);
                }
                return Ok(());
            }
            let key_end = s
                .find(|c: char| c == '=' || c.is_whitespace())
                .unwrap_or(s.len());
            let key = &s[..key_end];
            if !s[key_end..].starts_with('=') {
                // RouterOS prints some values that hold spaces without quotes: `type=.img
                // file`, a multi-word file type. A bare word after an unquoted value on the
                // same line is the rest of that value.
                self.extend_bare(key)?;
                s = &s[key_end..];
                continue;
            }
            if key.is_empty() {
                return Err("a value without a key".into());
            }
            let key = key.to_string();
            s = &s[key_end + 1..];
            if let Some(q) = s.strip_prefix('"') {
                let mut acc = String::new();
                match read_quoted_tail(q, &mut acc) {
                    Some(used) => {
                        self.put(key, acc)?;
                        s = &q[used..];
                    }
                    None => {
                        self.last_key = Some(key.clone());
                        self.open_quote = Some((key, acc));
                        return Ok(());
                    }
                }
                self.open_bare = false;
            } else {
                let (tok, mut after) = split_token(s);
                let mut value = tok.to_string();
                if !tok.is_empty() && tok.len() <= 3 && tok.bytes().all(|b| b.is_ascii_digit()) {
                    // Thousands separators: `53 687 091 200`.
                    loop {
                        let (next, rest) = split_token(after);
                        if !is_group(next) {
                            break;
                        }
                        value.push(' ');
                        value.push_str(next);
                        after = rest;
                    }
                }
                if looks_like_date(tok) {
                    // Timestamps are printed unquoted with a space: `2025-11-12 00:36:13`.
                    let (next, rest) = split_token(after);
                    if looks_like_time(next) {
                        value.push(' ');
                        value.push_str(next);
                        after = rest;
                    }
                }
                if value.contains('"') {
                    return Err(format!("a quote inside the bare value {:?}", trunc(&value)));
                }
                self.put(key, value)?;
                self.open_bare = true;
                s = after;
            }
        }
    }

    /// Appends the bare word `word` (and a space) to the unquoted value just read on this
    /// line; anything else is malformed.
    fn extend_bare(&mut self, word: &str) -> Result<(), String> {
        let value = match (&self.last_key, self.cur.as_mut()) {
            (Some(k), Some(r)) if self.open_bare => r.props.get_mut(k),
            _ => None,
        };
        let Some(value) = value else {
            return Err(format!("expected key=value, found {:?}", trunc(word)));
        };
        if word.contains('"') {
            return Err(format!("a quote inside the bare word {:?}", trunc(word)));
        }
        value.push(' ');
        value.push_str(word);
        Ok(())
    }

    fn finish(mut self) -> Result<Vec<Record>, String> {
        if let Some((key, _)) = &self.open_quote {
            return Err(format!("unterminated quoted value of {key:?}"));
        }
        if let Some(r) = self.cur.take() {
            self.records.push(r);
        }
        Ok(self.records)
    }
}

fn trunc(s: &str) -> String {
    s.chars().take(40).collect()
}

fn looks_like_date(tok: &str) -> bool {
    let b = tok.as_bytes();
    (b.len() == 10 && b[4] == b'-' && b[7] == b'-' && b[..4].iter().all(u8::is_ascii_digit))
        || (b.len() == 11
            && b[3] == b'/'
            && b[6] == b'/'
            && b[..3].iter().all(u8::is_ascii_alphabetic))
}

fn looks_like_time(tok: &str) -> bool {
    let b = tok.as_bytes();
    b.len() == 8 && b[2] == b':' && b[5] == b':'
}

fn is_group(tok: &str) -> bool {
    tok.len() == 3 && tok.bytes().all(|b| b.is_ascii_digit())
}

/// The first whitespace-separated token of `s` (after leading whitespace) and the rest.
fn split_token(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// Reads a quoted value's text up to the closing quote, unescaping into `acc`. Returns
/// the bytes used (closing quote included), or `None` when the line ends first.
fn read_quoted_tail(s: &str, acc: &mut String) -> Option<usize> {
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some(i + 1),
            '\\' => match chars.next() {
                Some((_, e)) => acc.push(e),
                None => return None,
            },
            c => acc.push(c),
        }
    }
    None
}

/// A `monitor-traffic` rate (`0bps`, `96.0kbps`, `1.2Mbps`, `3Gbps`: bits per second,
/// decimal prefixes) in bytes per second.
pub fn parse_rate(v: &str) -> Option<f64> {
    let v = v.trim();
    let number = v.strip_suffix("bps")?;
    let (digits, scale) = match number.chars().last()? {
        'k' => (&number[..number.len() - 1], 1e3),
        'M' => (&number[..number.len() - 1], 1e6),
        'G' => (&number[..number.len() - 1], 1e9),
        'T' => (&number[..number.len() - 1], 1e12),
        _ => (number, 1.0),
    };
    let bits: f64 = digits.parse().ok()?;
    (bits.is_finite() && bits >= 0.0).then_some(bits * scale / 8.0)
}

/// Parses `monitor-traffic ... once` output: `name: value` lines (error replies included).
pub fn parse_monitor(text: &str) -> Result<BTreeMap<String, String>, RosError> {
    check_reply(text)?;
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let (k, v) = t
            .split_once(':')
            .ok_or_else(|| RosError::Protocol(format!("line {}: expected name: value", n + 1)))?;
        out.insert(k.trim().to_string(), v.trim().to_string());
    }
    Ok(out)
}

/// Parses a RouterOS size: plain bytes (with or without thousands separators) or a value
/// with a binary unit (`50.0GiB`, `1.5 TiB`, `512M`). Decimals are exact where the unit
/// makes them exact; `None` when unreadable or over `u64`.
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let digits_end = v
        .find(|c: char| !(c.is_ascii_digit() || c == ' ' || c == '.'))
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(digits_end);
    let num: String = num.chars().filter(|c| *c != ' ').collect();
    let unit = unit.trim();
    let mult: u64 = match unit {
        "" | "B" => 1,
        "k" | "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "P" | "PiB" => 1 << 50,
        _ => return None,
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num.as_str(), ""),
    };
    if int.is_empty() || frac.contains('.') || frac.len() > 9 {
        return None;
    }
    let int: u64 = int.parse().ok()?;
    let mut total = int.checked_mul(mult)?;
    if !frac.is_empty() {
        if mult == 1 {
            return None;
        }
        let f: u64 = frac.parse().ok()?;
        let scale = 10u64.checked_pow(u32::try_from(frac.len()).ok()?)?;
        let part = u128::from(f) * u128::from(mult) / u128::from(scale);
        total = total.checked_add(u64::try_from(part).ok()?)?;
    }
    Some(total)
}

/// Parses `yes`/`no` (and `true`/`false`).
pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "yes" | "true" => Some(true),
        "no" | "false" => Some(false),
        _ => None,
    }
}

/// Parses a RouterOS timestamp, `2025-11-12 00:36:13` or `jan/02/2025 10:30:45`, as
/// seconds since the Unix epoch (RouterOS prints the router's local time; we read it as
/// UTC, which is what the RDS is normally set to).
pub fn parse_timestamp(v: &str) -> Option<i64> {
    let (date, time) = v.trim().split_once(' ')?;
    let (y, m, d) = if let Some((mon, rest)) = date.split_once('/') {
        let (day, year) = rest.split_once('/')?;
        let m = [
            "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
        ]
        .iter()
        .position(|n| n.eq_ignore_ascii_case(mon))?
            + 1;
        (
            year.parse::<i64>().ok()?,
            m as i64,
            day.parse::<i64>().ok()?,
        )
    } else {
        let mut it = date.split('-');
        let y = it.next()?.parse::<i64>().ok()?;
        let m = it.next()?.parse::<i64>().ok()?;
        let d = it.next()?.parse::<i64>().ok()?;
        if it.next().is_some() {
            return None;
        }
        (y, m, d)
    };
    let mut t = time.trim().split(':');
    let hh = t.next()?.parse::<i64>().ok()?;
    let mm = t.next()?.parse::<i64>().ok()?;
    let ss = t.next()?.parse::<i64>().ok()?;
    if t.next().is_some()
        || !(1..=12).contains(&m)
        || !(1..=31).contains(&d)
        || !(0..24).contains(&hh)
        || !(0..60).contains(&mm)
        || !(0..61).contains(&ss)
        || !(1970..=9999).contains(&y)
    {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date and time of `unix` seconds: (year, month, day, hour, minute, second).
pub fn civil_from_unix(unix: i64) -> (i64, i64, i64, i64, i64, i64) {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, secs / 3600, secs % 3600 / 60, secs % 60)
}

/// A `/disk` record in typed form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// `slot`.
    pub slot: String,
    /// `type` (`file` for file-backed disks).
    pub kind: Option<String>,
    /// `file-path` (file-backed disks), without a leading `/` (as `/file` names it).
    pub file_path: Option<String>,
    /// `file-size` in bytes (file-backed disks).
    pub file_size: Option<u64>,
    /// `size` in bytes (pools and drives).
    pub size: Option<u64>,
    /// `free` in bytes (mounted pools).
    pub free: Option<u64>,
    /// `mount-point`.
    pub mount_point: Option<String>,
    /// `nvme-tcp-export`.
    pub nvme_export: bool,
    /// `nvme-tcp-server-port`.
    pub nvme_port: Option<u16>,
    /// `nvme-tcp-server-nqn` (defaults to the slot when exported without one).
    pub nvme_nqn: Option<String>,
    /// `nvme-tcp-server-allow-host-name`.
    pub allow_host: Option<String>,
    /// The entry's comment (`;;; ` line in `print detail`, `comment=` in `print terse`).
    pub comment: Option<String>,
}

fn size_prop(r: &Record, key: &str) -> Result<Option<u64>, RosError> {
    match r.get(key) {
        None | Some("") => Ok(None),
        Some(v) => parse_size(v)
            .map(Some)
            .ok_or_else(|| RosError::Protocol(format!("{key}={v:?} is not a size"))),
    }
}

fn time_prop(r: &Record, key: &str) -> Result<Option<i64>, RosError> {
    match r.get(key) {
        None | Some("") => Ok(None),
        Some(v) => parse_timestamp(v)
            .map(Some)
            .ok_or_else(|| RosError::Protocol(format!("{key}={v:?} is not a timestamp"))),
    }
}

fn nonempty(r: &Record, key: &str) -> Option<String> {
    r.get(key).filter(|v| !v.is_empty()).map(str::to_string)
}

impl DiskInfo {
    /// Reads a `/disk` record.
    pub fn from_record(r: &Record) -> Result<Self, RosError> {
        let slot = nonempty(r, "slot")
            .ok_or_else(|| RosError::Protocol("a /disk record without slot".into()))?;
        let nvme_export = match r.get("nvme-tcp-export") {
            None => false,
            Some(v) => parse_bool(v).ok_or_else(|| {
                RosError::Protocol(format!("nvme-tcp-export={v:?} is not yes/no"))
            })?,
        };
        let nvme_port = match r.get("nvme-tcp-server-port") {
            None | Some("") => None,
            Some(v) => Some(v.parse::<u16>().map_err(|_| {
                RosError::Protocol(format!("nvme-tcp-server-port={v:?} is not a port"))
            })?),
        };
        let nvme_nqn =
            nonempty(r, "nvme-tcp-server-nqn").or_else(|| nvme_export.then(|| slot.clone()));
        Ok(Self {
            kind: nonempty(r, "type"),
            // Kept as the `/file` name: `/disk` prints the path as given, usually with `/`.
            file_path: nonempty(r, "file-path").map(|p| match p.strip_prefix('/') {
                Some(rest) => rest.to_string(),
                None => p,
            }),
            file_size: size_prop(r, "file-size")?,
            size: size_prop(r, "size")?,
            free: size_prop(r, "free")?,
            mount_point: nonempty(r, "mount-point"),
            nvme_export,
            nvme_port,
            nvme_nqn,
            allow_host: nonempty(r, "nvme-tcp-server-allow-host-name"),
            comment: r.comment.clone().or_else(|| nonempty(r, "comment")),
            slot,
        })
    }
}

/// A `/file` record in typed form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// `name` (no leading `/`).
    pub name: String,
    /// `type`, e.g. `.img file`, `directory` (printed unquoted although it may hold spaces).
    pub kind: Option<String>,
    /// `size` in bytes.
    pub size: Option<u64>,
    /// `creation-time`, seconds since the Unix epoch.
    pub created_unix: Option<i64>,
    /// `last-modified`, seconds since the Unix epoch.
    pub modified_unix: Option<i64>,
}

impl FileInfo {
    /// Reads a `/file` record.
    pub fn from_record(r: &Record) -> Result<Self, RosError> {
        let name = nonempty(r, "name")
            .ok_or_else(|| RosError::Protocol("a /file record without name".into()))?;
        Ok(Self {
            name,
            kind: nonempty(r, "type"),
            size: size_prop(r, "size")?,
            created_unix: time_prop(r, "creation-time")?,
            modified_unix: time_prop(r, "last-modified")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &str) -> Record {
        let mut records = parse_print(text).unwrap();
        assert_eq!(records.len(), 1, "{records:?}");
        records.remove(0)
    }

    #[test]
    fn unquoted_values_with_spaces_keep_their_words() {
        let r = one(
            " 0   name=\"pool/v/pvc-a.img\"\n     type=.img file size=10.0GiB last-modified=2025-11-11 14:32:41\n",
        );
        assert_eq!(r.get("type"), Some(".img file"));
        assert_eq!(r.get("size"), Some("10.0GiB"));
        assert_eq!(r.get("last-modified"), Some("2025-11-11 14:32:41"));
        let f = FileInfo::from_record(&r).unwrap();
        assert_eq!(f.kind.as_deref(), Some(".img file"));
        assert_eq!(f.size, Some(10 << 30));
        assert_eq!(f.modified_unix, parse_timestamp("2025-11-11 14:32:41"));
        // Three words, and a size printed with a space before its unit.
        let r = one(" 1   name=\"a.npk\" type=.npk package file size=512.5 KiB\n");
        assert_eq!(r.get("type"), Some(".npk package file"));
        assert_eq!(parse_size(r.get("size").unwrap()), Some(524_800));
    }

    #[test]
    fn what_is_really_malformed_is_still_refused() {
        for bad in [
            // A bare word after a quoted value: the quotes ended it.
            " 0   slot=\"pvc-a\" stray type=file\n",
            // A bare word before any property.
            " 0   stray slot=\"pvc-a\"\n",
            "stray\n",
            // A quote inside a bare word or value.
            " 0   type=.img fi\"le\n",
            " 0   type=.i\"mg\n",
            // No key.
            " 0   =file\n",
            // Open quote at the end.
            " 0   slot=\"pvc-a\n",
        ] {
            assert!(
                matches!(parse_print(bad), Err(RosError::Protocol(_))),
                "{bad:?} -> {:?}",
                parse_print(bad)
            );
        }
    }

    #[test]
    fn binary_units_with_one_decimal_are_read() {
        for (text, want) in [
            ("512.0KiB", 512 << 10),
            ("1.5MiB", 3 << 19),
            ("10.0GiB", 10 << 30),
            ("2.5TiB", 5 << 39),
            ("1 073 741 824", 1 << 30),
            ("0B", 0),
        ] {
            assert_eq!(parse_size(text), Some(want), "{text}");
        }
        for bad in ["1.5", "GiB", "1.2.3GiB", "10XB", "-1GiB"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }
}
