//! The emulator's CLI reader on arbitrary bytes: it must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = rds_csi::routeros::emulator::cli::read_command(&text);
});
