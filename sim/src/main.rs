//! `sim`: run seed ranges, replay one seed, check determinism.
//!
//! ```text
//! sim run [--seeds A..B] [--jobs N] [--check-determinism] [--bug KIND] [--stepping S]
//! sim replay SEED [--bug KIND] [--check-determinism] [--stepping S]
//! ```
//!
//! `--stepping` (`skip-idle`, the default, or `every-tick`): how virtual time advances
//! ([`sim::Stepping`]).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sim::{Bug, Options, Report, Stepping};

const USAGE: &str =
    "usage: sim run [--seeds A..B] [--jobs N] [--check-determinism] [--bug KIND] [--stepping S]
       sim replay SEED [--bug KIND] [--check-determinism] [--stepping S]
  KIND: AckBeforePersist | DropPrecondition | NodeGoneWhileAlive | BlindRdsRetry |
        UnpublishOpensExport | DeleteSkipsHolders | ReissuedPublishSkipsLock |
        KernelReconnectDefaults | RememberedDevicePath | ThirdNodeAttaches |
        NamelessRds | AttachedEventDropped | OrphanReferencesLost
  S: skip-idle (default) | every-tick";

fn parse_range(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once("..")?;
    let a: u64 = a.parse().ok()?;
    let b: u64 = b.trim_start_matches('=').parse().ok()?;
    (a < b || (s.contains("..=") && a <= b))
        .then_some((a, if s.contains("..=") { b + 1 } else { b }))
}

fn parse_stepping(s: &str) -> Option<Stepping> {
    match s {
        "skip-idle" => Some(Stepping::SkipIdle),
        "every-tick" => Some(Stepping::EveryTick),
        _ => None,
    }
}

fn parse_bug(s: &str) -> Option<Bug> {
    Bug::ALL
        .into_iter()
        .find(|b| format!("{b:?}").eq_ignore_ascii_case(s))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let determinism = args.iter().any(|a| a == "--check-determinism");
    let stepping = match flag("--stepping").map(|s| (s, parse_stepping(s))) {
        None => Stepping::SkipIdle,
        Some((_, Some(s))) => s,
        Some((s, None)) => {
            eprintln!("unknown --stepping {s}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match args.first().map(String::as_str) {
        Some("replay") => {
            let Some(seed) = args.get(1).and_then(|s| s.parse::<u64>().ok()) else {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            };
            let mut opts = Options::from_seed(seed);
            if let Some(b) = flag("--bug") {
                match parse_bug(b) {
                    Some(b) => opts = opts.with_bug(b),
                    None => {
                        eprintln!("unknown --bug {b}\n{USAGE}");
                        return ExitCode::from(2);
                    }
                }
            }
            let r = sim::run_stepping(opts.clone(), stepping);
            print!("{}", r.trace);
            println!("hash={:016x}", r.hash);
            let mut ok = r.passed();
            if determinism {
                let again = sim::run_stepping(opts, stepping);
                if again.hash == r.hash {
                    println!("determinism: OK (second run hash={:016x})", again.hash);
                } else {
                    println!("determinism: FAILED (second run hash={:016x})", again.hash);
                    let first = r
                        .trace
                        .lines()
                        .zip(again.trace.lines())
                        .find(|(a, b)| a != b);
                    if let Some((a, b)) = first {
                        println!("first difference:\n  run 1: {a}\n  run 2: {b}");
                    }
                    ok = false;
                }
            }
            for f in &r.failures {
                println!("FAILURE: {f}");
            }
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Some("run") => {
            let (from, to) = match flag("--seeds") {
                Some(s) => match parse_range(s) {
                    Some(r) => r,
                    None => {
                        eprintln!("--seeds wants A..B, got {s}\n{USAGE}");
                        return ExitCode::from(2);
                    }
                },
                None => (1, 101),
            };
            let bug = match flag("--bug").map(|b| (b, parse_bug(b))) {
                None => None,
                Some((_, Some(b))) => Some(b),
                Some((b, None)) => {
                    eprintln!("unknown --bug {b}\n{USAGE}");
                    return ExitCode::from(2);
                }
            };
            let jobs: u64 = flag("--jobs")
                .and_then(|j| j.parse().ok())
                .unwrap_or(1)
                .max(1);
            run_many(from, to, jobs, determinism, bug, stepping)
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[derive(Default)]
struct Totals {
    scenarios: u64,
    sim_time: Duration,
    checks: u64,
    steps: u64,
    op_checks: u64,
    op_refused: u64,
    writes: u64,
    faults: BTreeMap<&'static str, u64>,
    failures: Vec<(u64, String, String)>,
    nondeterministic: Vec<u64>,
}

fn run_many(
    from: u64,
    to: u64,
    jobs: u64,
    determinism: bool,
    bug: Option<Bug>,
    stepping: Stepping,
) -> ExitCode {
    let opts = |seed: u64| {
        let o = Options::from_seed(seed);
        match bug {
            Some(b) => o.with_bug(b),
            None => o,
        }
    };
    let next = AtomicU64::new(from);
    let totals = Mutex::new(Totals::default());
    let total = to - from;
    let started = Instant::now();
    // On a terminal a bar; otherwise (CI logs) a line every 50 scenarios.
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} scenarios, {per_sec}, ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let tty = !bar.is_hidden();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= to {
                        break;
                    }
                    let r: Report = sim::run_stepping(opts(seed), stepping);
                    let nondet =
                        determinism && sim::run_stepping(opts(seed), stepping).hash != r.hash;
                    let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                    t.scenarios += 1;
                    t.sim_time += r.sim_time;
                    t.checks += r.checks;
                    t.steps += r.steps;
                    t.op_checks += r.op_checks;
                    t.op_refused += r.op_refused;
                    t.writes += r.writes;
                    for (k, v) in &r.faults {
                        *t.faults.entry(k).or_default() += v;
                    }
                    if let Some(f) = r.failures.first() {
                        t.failures.push((seed, f.clone(), r.replay_command()));
                        bar.println(format!(
                            "FAIL seed {seed}: {f}\n  replay: {}",
                            r.replay_command()
                        ));
                    }
                    if nondet {
                        t.nondeterministic.push(seed);
                        bar.println(format!("NONDETERMINISTIC seed {seed}"));
                    }
                    bar.inc(1);
                    if !t.failures.is_empty() {
                        bar.set_message(format!("{} failing", t.failures.len()));
                    }
                    if !tty && (t.scenarios % 50 == 0 || t.scenarios == total) {
                        eprintln!(
                            "[{}/{total}] {:.1}s, {} failing",
                            t.scenarios,
                            started.elapsed().as_secs_f64(),
                            t.failures.len()
                        );
                    }
                }
            });
        }
    });
    bar.finish_and_clear();
    let wall = started.elapsed().as_secs_f64();
    let mut t = totals.into_inner().unwrap_or_else(|p| p.into_inner());
    t.failures.sort();
    let injected: u64 = t.faults.values().sum();
    println!("seeds {from}..{to}, {jobs} job(s)");
    println!("{:<28} {:>12}", "scenarios", t.scenarios);
    println!("{:<28} {:>12}", "checks", t.checks);
    println!("{:<28} {:>12}", "turmoil steps", t.steps);
    println!(
        "{:<28} {:>12.1}",
        "  simulated ms per step",
        t.sim_time.as_secs_f64() * 1000.0 / t.steps.max(1) as f64
    );
    println!(
        "{:<28} {:>12}",
        "  overlap checks (port calls)", t.op_checks
    );
    println!(
        "{:<28} {:>12}",
        "  overlapping calls kept out", t.op_refused
    );
    println!("{:<28} {:>12}", "  data-path writes judged", t.writes);
    println!("{:<28} {:>12}", "faults injected", injected);
    for (k, v) in &t.faults {
        println!("  {k:<26} {v:>12}");
    }
    println!(
        "{:<28} {:>12.2}",
        "faults per scenario",
        injected as f64 / t.scenarios.max(1) as f64
    );
    println!("{:<28} {:>12.1}", "wall seconds", wall);
    println!(
        "{:<28} {:>12.2}",
        "scenarios per second",
        t.scenarios as f64 / wall
    );
    println!(
        "{:<28} {:>12.1}",
        "simulated s per wall s",
        t.sim_time.as_secs_f64() / wall
    );
    println!("{:<28} {:>12}", "failures", t.failures.len());
    for (seed, f, cmd) in &t.failures {
        println!("  seed {seed}: {f}\n    {cmd}");
    }
    if determinism {
        println!(
            "{:<28} {:>12}",
            "nondeterministic seeds",
            t.nondeterministic.len()
        );
    }
    if t.failures.is_empty() && t.nondeterministic.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
