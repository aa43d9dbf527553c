//! The command renderer on structured commands (every kind, every field from [`Text`]):
//! - it renders exactly the commands the oracle's alphabets allow, refuses the rest with a
//!   one-line message, and never panics;
//! - every line it renders is one safe RouterOS command (`oracle::check_command_line`):
//!   nothing RouterOS would read as a second command, an unquoted string argument, a
//!   variable, an escape or a nested command;
//! - the emulator's CLI reader reads each rendered line back as the same command.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use rds_csi::routeros::command::{Command, DiskAdd, DiskFilter, ExportSpec, PrintStyle};
use rds_csi::routeros::emulator::cli::read_command;
use rds_csi::routeros::render::Renderer;
use rds_csi_fuzz::{Text, oracle};

const BASE: &str = "raid1/rds-csi";

#[derive(Arbitrary, Debug)]
struct Input {
    /// The renderer's base path: the production default shape, or any text.
    base: Option<Text>,
    cmd: Cmd,
}

/// A file name: under the base path (the common case), the base itself, or any text.
#[derive(Arbitrary, Debug)]
enum PathIn {
    Under(Text),
    Base,
    Raw(Text),
}

/// Sizes: units (what volumes usually are), and any u64.
#[derive(Arbitrary, Debug)]
enum Size {
    Units(u32, u8),
    Raw(u64),
}

#[derive(Arbitrary, Debug)]
struct Export {
    port: u16,
    nqn: Text,
    allow_host: Option<Text>,
}

#[derive(Arbitrary, Debug)]
enum Filter {
    All,
    Slot(Text),
    Slots(Vec<Text>),
    SlotPrefix(Text),
    MountPoint(Text),
}

#[derive(Arbitrary, Debug)]
enum Cmd {
    DiskAdd {
        slot: Text,
        file: PathIn,
        size: Option<Size>,
        copy_from: Option<Text>,
        comment: Option<Text>,
        export: Option<Export>,
    },
    DiskSetSize {
        slot: Text,
        size: Size,
    },
    DiskSetAllowHost {
        slot: Text,
        host: Text,
    },
    DiskSetComment {
        slot: Text,
        comment: Text,
    },
    DiskUnsetAllowHost {
        slot: Text,
    },
    DiskPrint {
        filter: Filter,
        terse: bool,
    },
    DiskRemove {
        slot: Text,
    },
    FilePrint {
        name: PathIn,
        exact: bool,
    },
    FileRemove {
        name: PathIn,
    },
    MonitorTraffic {
        slot: Text,
    },
}

fn size(s: Size) -> u64 {
    match s {
        Size::Units(n, unit) => u64::from(n) << (10 * u32::from(unit % 5)),
        Size::Raw(n) => n,
    }
}

fn path(base: &str, p: PathIn) -> String {
    match p {
        PathIn::Under(name) => format!("{base}/{}", name.0),
        PathIn::Base => base.to_string(),
        PathIn::Raw(t) => t.0,
    }
}

fn command(base: &str, cmd: Cmd) -> Command {
    match cmd {
        Cmd::DiskAdd {
            slot,
            file,
            size: sz,
            copy_from,
            comment,
            export,
        } => Command::DiskAdd(DiskAdd {
            slot: slot.0,
            file_path: path(base, file),
            size_bytes: sz.map(size),
            copy_from: copy_from.map(|t| t.0),
            comment: comment.map(|t| t.0),
            export: export.map(|e| ExportSpec {
                port: e.port,
                nqn: e.nqn.0,
                allow_host: e.allow_host.map(|t| t.0),
            }),
        }),
        Cmd::DiskSetSize { slot, size: sz } => Command::DiskSetSize {
            slot: slot.0,
            size_bytes: size(sz),
        },
        Cmd::DiskSetAllowHost { slot, host } => Command::DiskSetAllowHost {
            slot: slot.0,
            host_nqn: host.0,
        },
        Cmd::DiskSetComment { slot, comment } => Command::DiskSetComment {
            slot: slot.0,
            comment: comment.0,
        },
        Cmd::DiskUnsetAllowHost { slot } => Command::DiskUnsetAllowHost { slot: slot.0 },
        Cmd::DiskPrint { filter, terse } => Command::DiskPrint {
            filter: match filter {
                Filter::All => DiskFilter::All,
                Filter::Slot(t) => DiskFilter::Slot(t.0),
                Filter::Slots(v) => DiskFilter::Slots(v.into_iter().map(|t| t.0).collect()),
                Filter::SlotPrefix(t) => DiskFilter::SlotPrefix(t.0),
                Filter::MountPoint(t) => DiskFilter::MountPoint(t.0),
            },
            style: if terse {
                PrintStyle::Terse
            } else {
                PrintStyle::Detail
            },
        },
        Cmd::DiskRemove { slot } => Command::DiskRemove { slot: slot.0 },
        Cmd::FilePrint { name, exact } => Command::FilePrint {
            name: path(base, name),
            exact,
        },
        Cmd::FileRemove { name } => Command::FileRemove {
            name: path(base, name),
        },
        Cmd::MonitorTraffic { slot } => Command::MonitorTraffic { slot: slot.0 },
    }
}

/// `cmd` with a selection of one slot by list written as the one slot: both render as the
/// same line (`where slot="a"`), so reading it back cannot tell them apart.
fn same_selection(cmd: Command) -> Command {
    match cmd {
        Command::DiskPrint {
            filter: DiskFilter::Slots(mut slots),
            style,
        } if slots.len() == 1 => Command::DiskPrint {
            filter: DiskFilter::Slot(slots.remove(0)),
            style,
        },
        other => other,
    }
}

fuzz_target!(|input: Input| {
    let given = input.base.map_or_else(|| BASE.to_string(), |t| t.0);
    let renderer = match Renderer::new(&given) {
        Ok(r) => r,
        Err(e) => {
            assert!(
                oracle::base_of(&given).is_none(),
                "base path {given:?} refused: {e}"
            );
            oracle::check_message(&e.to_string()).unwrap();
            return;
        }
    };
    let base = oracle::base_of(&given)
        .unwrap_or_else(|| panic!("base path {given:?} accepted as {:?}", renderer.base_path()));
    assert_eq!(renderer.base_path(), base);

    let cmd = command(&base, input.cmd);
    let must = oracle::must_render(&base, &cmd);
    match renderer.render(&cmd) {
        Ok(line) => {
            assert!(
                must,
                "rendered a command the rules refuse: {cmd:?} as {line}"
            );
            if let Err(e) = oracle::check_command_line(line.as_str()) {
                panic!("unsafe command line {line}: {e}");
            }
            assert_eq!(line.is_read(), cmd.is_read());
            match read_command(line.as_str()) {
                Ok(back) => assert_eq!(
                    same_selection(back),
                    same_selection(cmd),
                    "read back differently: {line}"
                ),
                Err(e) => panic!("the emulator cannot read {line}: {e:?}"),
            }
        }
        Err(e) => {
            assert!(!must, "refused a command the rules allow: {cmd:?}: {e}");
            oracle::check_message(&e.to_string()).unwrap();
        }
    }
});
