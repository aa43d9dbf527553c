//! Property: for arbitrary valid inputs, render → emulator → print → parse gives back
//! exactly what was asked for (sizes to the byte, long values wrapped and re-joined,
//! thousands separators and units read back), in both `detail` and `terse` output.

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;
use rds_csi::ports::time::SystemClock;
use rds_csi::routeros::command::{Command, DiskAdd, DiskFilter, ExportSpec, PrintStyle};
use rds_csi::routeros::emulator::cli::read_command;
use rds_csi::routeros::emulator::{Emulator, Outcome, PoolConfig};
use rds_csi::routeros::parse::{DiskInfo, FileInfo, parse_print};
use rds_csi::routeros::render::Renderer;

#[derive(Debug, Clone)]
struct Wanted {
    slot: String,
    size: u64,
    export: Option<ExportSpec>,
}

fn export() -> impl Strategy<Value = Option<ExportSpec>> {
    proptest::option::of(
        (
            1u16..=u16::MAX,
            "nqn\\.[0-9]{4}-[0-9]{2}\\.[a-z][a-z.]{0,20}:[a-z0-9][a-z0-9:._-]{0,150}",
            proptest::option::of("nqn\\.2014-08\\.org\\.nvmexpress:uuid:[0-9a-f-]{1,60}"),
        )
            .prop_map(|(port, nqn, allow_host)| ExportSpec {
                port,
                nqn,
                allow_host,
            }),
    )
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        1u64..=(1 << 44),
        (1u64..=4096).prop_map(|g| g << 30),
        (1u64..=40960).prop_map(|m| m << 20),
        (1u64..=100).prop_map(|t| (t << 30) + (t << 29)),
    ]
}

fn disks() -> impl Strategy<Value = Vec<Wanted>> {
    proptest::collection::btree_map("[a-z0-9][a-z0-9._-]{0,120}", (size(), export()), 1..5)
        .prop_map(|m: BTreeMap<String, (u64, Option<ExportSpec>)>| {
            m.into_iter()
                .map(|(slot, (size, export))| Wanted { slot, size, export })
                .collect()
        })
}

fn run(rt: &tokio::runtime::Runtime, emu: &Emulator, line: &str) -> String {
    match rt.block_on(emu.execute(line)) {
        Outcome::Reply(r) => {
            assert!(r.ok, "{line}: {}", r.output);
            r.output
        }
        Outcome::Dropped => panic!("no faults queued"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn render_emulate_print_parse_round_trips(disks in disks(), terse in any::<bool>()) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let renderer = Renderer::new("raid1/rds-csi").unwrap();
        let emu = Emulator::in_memory(
            PoolConfig { slot: "raid1".into(), mount_point: "raid1".into(), size_bytes: 1 << 50 },
            Arc::new(SystemClock),
        );
        for w in &disks {
            let cmd = Command::DiskAdd(DiskAdd {
                slot: w.slot.clone(),
                file_path: renderer.file_path_for(&w.slot),
                size_bytes: Some(w.size),
                copy_from: None,
                comment: None,
                export: w.export.clone(),
            });
            let line = renderer.render(&cmd).unwrap();
            prop_assert_eq!(read_command(line.as_str()).unwrap(), cmd);
            run(&rt, &emu, line.as_str());
        }
        let style = if terse { PrintStyle::Terse } else { PrintStyle::Detail };
        let list = renderer
            .render(&Command::DiskPrint { filter: DiskFilter::All, style })
            .unwrap();
        let records = parse_print(&run(&rt, &emu, list.as_str())).unwrap();
        let parsed: Vec<DiskInfo> = records.iter().map(|r| DiskInfo::from_record(r).unwrap()).collect();
        prop_assert_eq!(parsed.len(), disks.len() + 1);
        let pool = &parsed[0];
        let used: u64 = disks.iter().map(|w| w.size).sum();
        prop_assert_eq!(pool.size, Some(1u64 << 50));
        prop_assert_eq!(pool.free, Some((1u64 << 50) - used));
        for (w, d) in disks.iter().zip(&parsed[1..]) {
            prop_assert_eq!(&d.slot, &w.slot);
            prop_assert_eq!(d.file_path.clone(), Some(renderer.file_path_for(&w.slot)));
            prop_assert_eq!(d.file_size, Some(w.size));
            prop_assert_eq!(d.nvme_export, w.export.is_some());
            prop_assert_eq!(d.nvme_port, w.export.as_ref().map(|e| e.port));
            prop_assert_eq!(d.nvme_nqn.clone(), w.export.as_ref().map(|e| e.nqn.clone()));
            prop_assert_eq!(d.allow_host.clone(), w.export.as_ref().and_then(|e| e.allow_host.clone()));
            // The single-disk query agrees.
            let get = renderer
                .render(&Command::DiskPrint { filter: DiskFilter::Slot(w.slot.clone()), style })
                .unwrap();
            let one = parse_print(&run(&rt, &emu, get.as_str())).unwrap();
            prop_assert_eq!(one.len(), 1);
            prop_assert_eq!(&DiskInfo::from_record(&one[0]).unwrap(), d);
            // And the backing file is reported with its exact size.
            let file = renderer
                .render(&Command::FilePrint { name: renderer.file_path_for(&w.slot), exact: true })
                .unwrap();
            let f = parse_print(&run(&rt, &emu, file.as_str())).unwrap();
            prop_assert_eq!(f.len(), 1);
            let f = FileInfo::from_record(&f[0]).unwrap();
            prop_assert_eq!(f.size, Some(w.size));
            prop_assert!(f.created_unix.is_some());
        }
    }

    #[test]
    fn parser_never_panics_on_arbitrary_text(text in "(?s).{0,400}") {
        let _ = parse_print(&text);
        let _ = rds_csi::routeros::parse::parse_monitor(&text);
    }

    #[test]
    fn cli_reader_never_panics_on_arbitrary_text(text in "(?s).{0,200}") {
        let _ = read_command(&text);
    }
}
