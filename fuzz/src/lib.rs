//! What the fuzz targets share: [`Text`], a structured string generator that lands in and
//! around the driver's alphabets, and [`oracle`], checks written from the rules (not from
//! the code under test) that a target compares the code's answers against.

pub mod oracle;

use arbitrary::{Arbitrary, Result, Unstructured};

/// Characters a [`Text`] is drawn from: the driver's alphabets (repeated, so most draws
/// stay in them), then everything RouterOS, a shell, a path or a CSV-ish annotation could
/// read as syntax, whitespace and control characters, and non-ASCII.
const ALPHABET: &[char] = &[
    'a', 'b', 'c', 'd', 'e', 'k', 'n', 'p', 'q', 'r', 's', 'v', 'x', 'z', '0', '1', '2', '9', '-',
    '-', '.', '.', '_', ':', '/', 'A', 'Z', 'a', 'e', 'o', '1', '5', '-', '.', ':', '/',
    // syntax of RouterOS, shells, paths, annotations
    '"', '\'', ';', '[', ']', '$', '\\', '?', '{', '}', '=', '~', '^', '`', '(', ')', '*', ',', '#',
    '!', '&', '|', '<', '>', '@', '%', '+', // whitespace and control characters
    ' ', '\t', '\n', '\r', '\0', '\u{7}', '\u{1b}', '\u{7f}', '\u{85}', '\u{2028}',
    // non-ASCII
    'ä', 'ß', '\u{ff0f}', '\u{202e}', '\u{fffd}',
];

/// A string for a field of a request or a command: mostly characters of the driver's
/// alphabets with syntax mixed in; sometimes raw UTF-8 from the input; sometimes a short
/// text repeated to pass a length limit.
#[derive(Clone, PartialEq, Eq)]
pub struct Text(pub String);

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl Text {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'a> Arbitrary<'a> for Text {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        match u.int_in_range(0u8..=15)? {
            0 => Ok(Text(String::arbitrary(u)?)),
            1 => {
                let unit = picked(u, 8)?;
                let times = usize::from(u.arbitrary::<u8>()?) + 1;
                Ok(Text(unit.repeat(times)))
            }
            _ => Ok(Text(picked(u, 64)?)),
        }
    }
}

fn picked(u: &mut Unstructured<'_>, max: usize) -> Result<String> {
    let len = u.int_in_range(0..=max)?;
    let mut s = String::with_capacity(len);
    for _ in 0..len {
        s.push(ALPHABET[usize::from(u.arbitrary::<u8>()?) % ALPHABET.len()]);
    }
    Ok(s)
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a tokio runtime");
}

/// Runs `f` to completion on this thread's runtime (the cores are async; the targets are
/// not).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(f))
}

/// A fresh controller core over an in-memory RDS (the real adapter, renderer, parser and
/// emulator; 64 TiB pool), a memory attachment store and an empty cluster, with the
/// data-path fence on; `cfg` as given. Fresh per input, so every run is deterministic.
pub fn controller(
    cfg: rds_csi::controller::ControllerConfig,
) -> (
    rds_csi::controller::Controller,
    std::sync::Arc<rds_csi::routeros::InMemoryRds>,
) {
    use rds_csi::attachment::{AttachmentConfig, AttachmentManager};
    use std::sync::Arc;
    let rds = rds_csi::routeros::in_memory_rds(64 << 40);
    let attachments = Arc::new(AttachmentManager::new(
        rds.clone(),
        Arc::new(rds_csi::backend::mem_store::MemStore::new()),
        Arc::new(rds_csi::backend::local_cluster::LocalCluster::new([])),
        Arc::new(rds_csi::ports::time::SystemClock),
        AttachmentConfig {
            data_path_fence: true,
            ..AttachmentConfig::default()
        },
    ));
    (
        rds_csi::controller::Controller::new(cfg, rds.clone(), attachments),
        rds,
    )
}
