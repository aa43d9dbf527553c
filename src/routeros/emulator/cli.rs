//! The emulator's reader of RouterOS CLI text: turns a command line back into a typed
//! [`Command`], or into the error RouterOS would print (`syntax error`, `bad command name`,
//! `expected end of command`, `input does not match any value of ...`).
//!
//! It accepts the grammar the renderer produces (and a little more: bare values,
//! arguments in any order), so the parser and renderer are exercised for real in tests and
//! in the simulation. Values are taken literally: there is no variable expansion, no
//! nested commands beyond `[find k=v]`, and nothing is ever executed from a value.

use crate::routeros::command::{Command, DiskAdd, DiskFilter, ExportSpec, PrintStyle};
use crate::routeros::parse::parse_size;

/// A value of an argument: text, or a `[find key=value]` selection.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Text(String),
    Find(String, String),
}

/// One token of a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    Arg(String, char, Value),
    Find(String, String),
}

/// Why a line is not a command the emulator knows; the text is what RouterOS prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliError(pub String);

fn syntax(col: usize) -> CliError {
    CliError(format!("syntax error (line 1 column {})", col + 1))
}

struct Lexer<'a> {
    s: &'a [u8],
    text: &'a str,
    pos: usize,
}

impl Lexer<'_> {
    fn skip_ws(&mut self) {
        while self.pos < self.s.len() && (self.s[self.pos] == b' ' || self.s[self.pos] == b'\t') {
            self.pos += 1;
        }
    }

    fn quoted(&mut self) -> Result<String, CliError> {
        let start = self.pos;
        self.pos += 1; // opening quote
        let mut out = String::new();
        let rest = &self.text[self.pos..];
        let mut chars = rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.pos += i + 1;
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, e)) => out.push(e),
                    None => return Err(syntax(start)),
                },
                '\n' | '\r' => return Err(syntax(self.pos + i)),
                c => out.push(c),
            }
        }
        Err(syntax(start))
    }

    fn bare(&mut self) -> String {
        let start = self.pos;
        while self.pos < self.s.len()
            && !matches!(
                self.s[self.pos],
                b' ' | b'\t' | b'=' | b'~' | b'[' | b']' | b'"'
            )
        {
            self.pos += 1;
        }
        self.text[start..self.pos].to_string()
    }

    /// `[find key=value]`, the opening bracket under the cursor.
    fn find(&mut self) -> Result<(String, String), CliError> {
        let start = self.pos;
        self.pos += 1;
        self.skip_ws();
        if self.bare() != "find" {
            return Err(syntax(start + 1));
        }
        self.skip_ws();
        let key = self.bare();
        if key.is_empty() || self.s.get(self.pos) != Some(&b'=') {
            return Err(syntax(self.pos));
        }
        self.pos += 1;
        let value = self.value_text()?;
        self.skip_ws();
        if self.s.get(self.pos) != Some(&b']') {
            return Err(syntax(self.pos));
        }
        self.pos += 1;
        Ok((key, value))
    }

    fn value_text(&mut self) -> Result<String, CliError> {
        match self.s.get(self.pos) {
            Some(b'"') => self.quoted(),
            Some(b'[') | Some(b']') => Err(syntax(self.pos)),
            _ => Ok(self.bare()),
        }
    }

    fn tokens(mut self) -> Result<Vec<Tok>, CliError> {
        let mut out = Vec::new();
        loop {
            self.skip_ws();
            let Some(&b) = self.s.get(self.pos) else {
                return Ok(out);
            };
            match b {
                b'[' => {
                    let (k, v) = self.find()?;
                    out.push(Tok::Find(k, v));
                }
                b'"' | b']' | b'=' | b'~' | b';' | b'$' | b'\\' | b'{' | b'}' | b'\n' | b'\r' => {
                    return Err(syntax(self.pos));
                }
                _ => {
                    let word = self.bare();
                    match self.s.get(self.pos) {
                        Some(&op @ (b'=' | b'~')) => {
                            self.pos += 1;
                            let value = if self.s.get(self.pos) == Some(&b'[') {
                                let (k, v) = self.find()?;
                                Value::Find(k, v)
                            } else {
                                Value::Text(self.value_text()?)
                            };
                            out.push(Tok::Arg(word, op as char, value));
                        }
                        _ => out.push(Tok::Word(word)),
                    }
                }
            }
        }
    }
}

fn no_match(arg: &str) -> CliError {
    CliError(format!("input does not match any value of {arg}"))
}

fn expected_end(toks: &[Tok]) -> CliError {
    CliError(format!(
        "expected end of command (near {})",
        match toks.first() {
            Some(Tok::Word(w)) => w.clone(),
            Some(Tok::Arg(k, _, _)) => k.clone(),
            Some(Tok::Find(k, _)) => format!("[find {k}]"),
            None => String::new(),
        }
    ))
}

fn text(v: &Value, arg: &str) -> Result<String, CliError> {
    match v {
        Value::Text(t) => Ok(t.clone()),
        Value::Find(..) => Err(no_match(arg)),
    }
}

fn size_arg(v: &Value, arg: &str) -> Result<u64, CliError> {
    let t = text(v, arg)?;
    parse_size(&t)
        .filter(|n| *n > 0)
        .ok_or_else(|| CliError(format!("invalid value for argument {arg}: {t}")))
}

fn find_slot(tok: Option<&Tok>) -> Result<String, CliError> {
    match tok {
        Some(Tok::Find(k, v)) if k == "slot" => Ok(v.clone()),
        Some(Tok::Word(w)) => Ok(w.clone()),
        _ => Err(CliError("expected item number or [find slot=...]".into())),
    }
}

/// Reads one command line.
pub fn read_command(line: &str) -> Result<Command, CliError> {
    let line = line.trim();
    let toks = Lexer {
        s: line.as_bytes(),
        text: line,
        pos: 0,
    }
    .tokens()?;
    let words: Vec<&str> = toks
        .iter()
        .take(2)
        .map(|t| match t {
            Tok::Word(w) => w.as_str(),
            _ => "",
        })
        .collect();
    let rest = toks.get(2..).unwrap_or(&[]);
    match words.as_slice() {
        ["/disk", "add"] => disk_add(rest),
        ["/disk", "set"] => disk_set(rest),
        ["/disk", "unset"] => {
            let slot = find_slot(rest.first())?;
            match rest.get(1..) {
                Some([Tok::Word(w)]) if w == "nvme-tcp-server-allow-host-name" => {
                    Ok(Command::DiskUnsetAllowHost { slot })
                }
                Some([Tok::Word(w)]) => Err(no_match(w)),
                Some(more) => Err(expected_end(more)),
                None => Err(expected_end(&[])),
            }
        }
        ["/disk", "print"] => {
            let (style, filter) = print_args(rest, "slot")?;
            Ok(Command::DiskPrint { filter, style })
        }
        ["/disk", "remove"] => match rest {
            [t] => Ok(Command::DiskRemove {
                slot: find_slot(Some(t))?,
            }),
            _ => Err(expected_end(rest.get(1..).unwrap_or(&[]))),
        },
        ["/disk", "monitor-traffic"] => match rest {
            [t, Tok::Word(once)] if once == "once" => Ok(Command::MonitorTraffic {
                slot: find_slot(Some(t))?,
            }),
            _ => Err(CliError("monitor-traffic needs <slot> once".into())),
        },
        ["/file", "print"] => {
            let (_, filter) = print_args(rest, "name")?;
            match filter {
                DiskFilter::Slot(name) => Ok(Command::FilePrint { name, exact: true }),
                DiskFilter::SlotPrefix(name) => Ok(Command::FilePrint { name, exact: false }),
                _ => Err(CliError(
                    "file print needs where name=... or name~...".into(),
                )),
            }
        }
        ["/file", "remove"] => match rest {
            [Tok::Find(k, v)] if k == "name" => Ok(Command::FileRemove { name: v.clone() }),
            _ => Err(CliError("expected [find name=...]".into())),
        },
        [dir, cmd] if *dir == "/disk" || *dir == "/file" => Err(CliError(format!(
            "bad command name {cmd} (line 1 column {})",
            dir.len() + 2
        ))),
        _ => Err(CliError("bad command name (line 1 column 1)".into())),
    }
}

fn print_args(rest: &[Tok], key: &str) -> Result<(PrintStyle, DiskFilter), CliError> {
    let (style, rest) = match rest.first() {
        Some(Tok::Word(w)) if w == "detail" => (PrintStyle::Detail, &rest[1..]),
        Some(Tok::Word(w)) if w == "terse" => (PrintStyle::Terse, &rest[1..]),
        _ => (PrintStyle::Terse, rest),
    };
    let filter = match rest {
        [] => DiskFilter::All,
        // `where slot="a" or slot="b" ...`: terms at even places, `or` between them.
        [Tok::Word(w), terms @ ..] if w == "where" && terms.len() > 1 => {
            if terms.len() % 2 == 0 {
                return Err(expected_end(&[]));
            }
            let mut slots = Vec::new();
            for (i, t) in terms.iter().enumerate() {
                match (i % 2, t) {
                    (1, Tok::Word(o)) if o == "or" => {}
                    (0, Tok::Arg(k, '=', v)) if k == key && key == "slot" => {
                        slots.push(text(v, k)?)
                    }
                    (0, Tok::Arg(k, ..)) => return Err(no_match(k)),
                    _ => return Err(expected_end(&terms[i..])),
                }
            }
            DiskFilter::Slots(slots)
        }
        [Tok::Word(w), Tok::Arg(k, op, v)] if w == "where" => {
            let v = text(v, k)?;
            match (k.as_str(), op) {
                (k2, '=') if k2 == key => DiskFilter::Slot(v),
                (k2, '~') if k2 == key => match v.strip_prefix('^') {
                    Some(p) => DiskFilter::SlotPrefix(p.to_string()),
                    None => return Err(CliError("the emulator supports only ~\"^prefix\"".into())),
                },
                ("mount-point", '=') if key == "slot" => DiskFilter::MountPoint(v),
                _ => return Err(no_match(k)),
            }
        }
        _ => return Err(expected_end(rest)),
    };
    Ok((style, filter))
}

fn disk_add(rest: &[Tok]) -> Result<Command, CliError> {
    let mut add = DiskAdd {
        slot: String::new(),
        file_path: String::new(),
        size_bytes: None,
        copy_from: None,
        comment: None,
        export: None,
    };
    let mut export = false;
    let mut port = None;
    let mut nqn = None;
    let mut allow = None;
    for t in rest {
        let Tok::Arg(k, '=', v) = t else {
            return Err(expected_end(std::slice::from_ref(t)));
        };
        match k.as_str() {
            "type" => {
                if text(v, k)? != "file" {
                    return Err(CliError(
                        "failure: only type=file disks can be added".into(),
                    ));
                }
            }
            "slot" => add.slot = text(v, k)?,
            // RouterOS resolves the absolute path to the `/file` name (no leading `/`).
            "file-path" => {
                let p = text(v, k)?;
                add.file_path = p.strip_prefix('/').unwrap_or(&p).to_string();
            }
            "comment" => add.comment = Some(text(v, k)?),
            "file-size" => add.size_bytes = Some(size_arg(v, k)?),
            "copy-from" => match v {
                Value::Find(fk, fv) if fk == "slot" => add.copy_from = Some(fv.clone()),
                _ => return Err(no_match(k)),
            },
            "nvme-tcp-export" => {
                export = match text(v, k)?.as_str() {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(no_match(k)),
                }
            }
            "nvme-tcp-server-port" => {
                port = Some(
                    text(v, k)?
                        .parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| no_match(k))?,
                )
            }
            "nvme-tcp-server-nqn" => nqn = Some(text(v, k)?),
            "nvme-tcp-server-allow-host-name" => allow = Some(text(v, k)?),
            other => return Err(CliError(format!("expected end of command (near {other})"))),
        }
    }
    if add.slot.is_empty() || add.file_path.is_empty() {
        return Err(CliError("failure: slot and file-path are required".into()));
    }
    if export {
        add.export = Some(ExportSpec {
            port: port.unwrap_or(crate::types::defaults::DEFAULT_NVME_PORT),
            nqn: nqn.unwrap_or_else(|| add.slot.clone()),
            allow_host: allow,
        });
    }
    Ok(Command::DiskAdd(add))
}

fn disk_set(rest: &[Tok]) -> Result<Command, CliError> {
    let slot = find_slot(rest.first())?;
    match rest.get(1..) {
        Some([Tok::Arg(k, '=', v)]) if k == "file-size" => Ok(Command::DiskSetSize {
            slot,
            size_bytes: size_arg(v, k)?,
        }),
        Some([Tok::Arg(k, '=', v)]) if k == "nvme-tcp-server-allow-host-name" => {
            let host_nqn = text(v, k)?;
            if host_nqn.is_empty() {
                Ok(Command::DiskUnsetAllowHost { slot })
            } else {
                Ok(Command::DiskSetAllowHost { slot, host_nqn })
            }
        }
        Some([Tok::Arg(k, '=', v)]) if k == "comment" => Ok(Command::DiskSetComment {
            slot,
            comment: text(v, k)?,
        }),
        Some([Tok::Arg(k, ..)]) => Err(CliError(format!("expected end of command (near {k})"))),
        Some(more) => Err(expected_end(more)),
        None => Err(expected_end(&[])),
    }
}
