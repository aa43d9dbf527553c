//! The RouterOS output parser on arbitrary bytes (seeded with `tests/fixtures/routeros/`):
//! - it never panics: `print` output, `/disk` and `/file` records, `monitor-traffic`
//!   output and error replies are read or refused with a typed error;
//! - every error message is one line without control characters (it reaches logs and
//!   gRPC status messages; the text comes from a remote peer);
//! - CRLF line ends (SSH through a terminal) read exactly as LF ones.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rds_csi::routeros::parse::{
    DiskInfo, FileInfo, RosError, check_reply, parse_monitor, parse_print,
};
use rds_csi_fuzz::oracle::check_message;

fn message(e: &RosError) {
    if let Err(why) = check_message(&e.to_string()) {
        panic!("{why}");
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let printed = parse_print(&text);
    match &printed {
        Ok(records) => {
            for r in records {
                if let Err(e) = DiskInfo::from_record(r) {
                    message(&e);
                }
                if let Err(e) = FileInfo::from_record(r) {
                    message(&e);
                }
            }
        }
        Err(e) => message(e),
    }
    let monitored = parse_monitor(&text);
    if let Err(e) = &monitored {
        message(e);
    }
    if let Err(e) = check_reply(&text) {
        message(&e);
    }

    let crlf = text.replace('\n', "\r\n");
    assert_eq!(parse_print(&crlf), printed, "CRLF output reads differently");
    assert_eq!(
        parse_monitor(&crlf),
        monitored,
        "CRLF output reads differently"
    );
});
