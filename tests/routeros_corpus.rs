//! The parser on a corpus of realistic RouterOS outputs (tests/fixtures/routeros/), written
//! as devices print them: every file's parse is an insta snapshot.

use std::fmt::Write as _;

use rds_csi::routeros::parse::{DiskInfo, FileInfo, parse_monitor, parse_print};

fn describe(name: &str, text: &str) -> String {
    let mut out = String::new();
    if name.starts_with("monitor_") {
        let _ = writeln!(out, "{:#?}", parse_monitor(text));
        return out;
    }
    match parse_print(text) {
        Err(e) => {
            let _ = writeln!(out, "Err({e:?})");
        }
        Ok(records) => {
            let _ = writeln!(out, "{} record(s)", records.len());
            for r in &records {
                let _ = writeln!(out, "{r:#?}");
                if name.starts_with("disk_") {
                    let _ = writeln!(out, "=> {:#?}", DiskInfo::from_record(r));
                } else if name.starts_with("file_") {
                    let _ = writeln!(out, "=> {:#?}", FileInfo::from_record(r));
                }
            }
        }
    }
    out
}

#[test]
fn corpus_parses_as_snapshotted() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/routeros");
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".txt"))
        .collect();
    names.sort();
    assert!(names.len() >= 15, "corpus too small: {names:?}");
    for name in names {
        let text = std::fs::read_to_string(format!("{dir}/{name}")).unwrap();
        let stem = name.trim_end_matches(".txt");
        let summary = describe(stem, &text);
        insta::with_settings!({
            snapshot_path => concat!(env!("CARGO_MANIFEST_DIR"), "/snapshots"),
            prepend_module_to_snapshot => false,
            description => format!("parse of tests/fixtures/routeros/{name}"),
        }, {
            insta::assert_snapshot!(format!("routeros_parse_{stem}"), summary);
        });
    }
}

#[test]
fn error_replies_show_control_characters_escaped() {
    // Found by fuzzing (`parse_output`): the first line of an error reply went into the
    // error message raw, so a bell, an escape sequence or a carriage return from the RDS
    // reached the logs and the gRPC status as is.
    let e = parse_print("failure: not enough space\u{7} \u{1b}[31mon\rdisk\n").unwrap_err();
    let msg = e.to_string();
    assert!(!msg.chars().any(char::is_control), "{msg:?}");
    assert!(
        matches!(e, rds_csi::routeros::parse::RosError::NoSpace(ref m)
            if m == "failure: not enough space\\u{7} \\u{1b}[31mon\\rdisk"),
        "{e:?}"
    );
}
