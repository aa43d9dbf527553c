//! The RouterOS output parser on arbitrary bytes: it must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rds_csi::routeros::parse::{DiskInfo, FileInfo, parse_monitor, parse_print};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(records) = parse_print(&text) {
        for r in &records {
            let _ = DiskInfo::from_record(r);
            let _ = FileInfo::from_record(r);
        }
    }
    let _ = parse_monitor(&text);
});
