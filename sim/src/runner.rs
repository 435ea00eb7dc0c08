//! The runner behind `cargo sim`: runs every scenario over a range of seeds, each seed in a fresh
//! process of this binary (`--child`, see [`child`]) with a wall-clock watchdog that kills a hung
//! run; checks determinism by running a sample of seeds twice and comparing their event traces;
//! prints progress, failures with the command that replays them, and a summary table.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant as WallInstant};

use tokio::madsim::Config;
use tokio::madsim::runtime::Runtime;

use crate::record::Violation;
use crate::scenarios::{ALL, Outcome, Scenario};

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seeds per scenario.
    pub seeds: u64,
    /// First seed.
    pub seed_start: u64,
    /// Scenarios to run (empty = all).
    pub scenarios: Vec<String>,
    /// Seeds per scenario (the first ones) also run through the determinism check.
    pub determinism: u64,
    /// Seeds run at once (each on its own thread).
    pub jobs: usize,
    /// Wall-clock limit per seed.
    pub wall_limit: Duration,
    /// Print every seed's outcome.
    pub verbose: bool,
}

const USAGE: &str = "usage: cargo sim -- [--seeds N] [--seed-start S] [--scenario NAME[,NAME..]]... \
[--determinism K] [--jobs J] [--wall-limit SECS] [--verbose] [--list]";

impl Options {
    /// Parses `args` (without the program name). `Ok(None)` for `--list` / `--help`.
    pub fn parse(args: impl IntoIterator<Item = String>) -> Result<Option<Self>, String> {
        let mut o = Options {
            seeds: 20,
            seed_start: 1,
            scenarios: Vec::new(),
            determinism: 2,
            jobs: 1,
            wall_limit: Duration::from_secs(120),
            verbose: false,
        };
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
            let num = |v: String| v.parse::<u64>().map_err(|e| format!("{v:?}: {e}"));
            match arg.as_str() {
                "--" => {}
                "--seeds" => o.seeds = num(value("--seeds")?)?,
                "--seed-start" | "--seed" => o.seed_start = num(value("--seed-start")?)?,
                "--scenario" => o
                    .scenarios
                    .extend(value("--scenario")?.split(',').map(str::to_string)),
                "--determinism" => o.determinism = num(value("--determinism")?)?,
                "--jobs" => o.jobs = num(value("--jobs")?)?.max(1) as usize,
                "--wall-limit" => o.wall_limit = Duration::from_secs(num(value("--wall-limit")?)?),
                "--verbose" | "-v" => o.verbose = true,
                "--list" => {
                    for s in ALL {
                        println!("{:<20} {}", s.name, s.about);
                    }
                    return Ok(None);
                }
                "--help" | "-h" => {
                    println!("{USAGE}");
                    return Ok(None);
                }
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
        }
        for name in &o.scenarios {
            if !ALL.iter().any(|s| s.name == name) {
                let names: Vec<_> = ALL.iter().map(|s| s.name).collect();
                return Err(format!(
                    "unknown scenario {name:?}; known: {}",
                    names.join(", ")
                ));
            }
        }
        Ok(Some(o))
    }
}

/// What came of one seed.
#[derive(Debug, Clone)]
enum SeedResult {
    Done(Outcome),
    Panicked(String),
    /// Hung (killed by the watchdog) or died without a result.
    Lost(String),
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Runs one seed in this process (the child side).
fn run_seed(scenario: &'static Scenario, seed: u64, virtual_limit: Duration) -> SeedResult {
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
        let mut rt = Runtime::with_seed_and_config(seed, Config::default());
        rt.set_time_limit(virtual_limit);
        rt.block_on((scenario.run)())
    }));
    match result {
        Ok(outcome) => SeedResult::Done(outcome),
        Err(payload) => SeedResult::Panicked(panic_message(&*payload)),
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\t', '\n', '\r'], " ")
}

const RESULT_TAG: &str = "SIM-RESULT";

/// The child side of the runner: one seed, one process, one result line on stdout.
///
/// Why a process per seed: tokio's thread-local RNG (used by `select!` and by `watch` channels,
/// which the pool uses) is seeded from a process-wide counter that madsim does not control, so
/// two runs of a seed in one process (even on fresh threads, as `MADSIM_TEST_NUM` does) can
/// diverge. In a fresh process every seed starts from the same state and replays exactly.
pub fn child(scenario: &str, seed: u64) -> i32 {
    let Some(scenario) = ALL.iter().find(|s| s.name == scenario) else {
        eprintln!("unknown scenario {scenario:?}");
        return 2;
    };
    std::panic::set_hook(Box::new(|_| {}));
    let line = match run_seed(scenario, seed, Duration::from_secs(3600)) {
        SeedResult::Done(o) => format!(
            "{RESULT_TAG}\tdone\t{}\t{:016x}\t{}\t{}\t{}\t{}\t{}",
            o.virtual_time.as_nanos(),
            o.trace.0,
            o.trace.1,
            o.violation
                .as_ref()
                .map_or("-".to_string(), |v| v.inv.to_string()),
            o.violation
                .as_ref()
                .map_or("-".to_string(), |v| one_line(&v.msg)),
            one_line(&o.info),
            one_line(&o.also)
        ),
        SeedResult::Panicked(msg) | SeedResult::Lost(msg) => {
            format!("{RESULT_TAG}\tpanic\t{}", one_line(&msg))
        }
    };
    println!("{line}");
    0
}

fn parse_result(stdout: &str) -> Option<SeedResult> {
    let line = stdout.lines().find(|l| l.starts_with(RESULT_TAG))?;
    let fields: Vec<&str> = line.split('\t').collect();
    match *fields.get(1)? {
        "panic" => Some(SeedResult::Panicked(
            fields.get(2).unwrap_or(&"").to_string(),
        )),
        "done" if fields.len() >= 8 => {
            let inv = fields[5];
            let violation = (inv != "-").then(|| Violation {
                inv: crate::scenarios::static_inv(inv),
                msg: fields[6].to_string(),
            });
            Some(SeedResult::Done(Outcome {
                violation,
                virtual_time: Duration::from_nanos(fields[2].parse().ok()?),
                trace: (
                    u64::from_str_radix(fields[3], 16).ok()?,
                    fields[4].parse().ok()?,
                ),
                info: fields[7].to_string(),
                also: fields.get(8).unwrap_or(&"").to_string(),
            }))
        }
        _ => None,
    }
}

#[derive(Default)]
struct Tally {
    seeds: u64,
    failures: u64,
    virtual_time: Duration,
    wall: Duration,
    determinism: (u64, u64),
}

struct Job {
    scenario: &'static Scenario,
    seed: u64,
    /// This run is the second run of a seed, for the determinism check.
    recheck: bool,
}

struct Running {
    job: usize,
    child: Child,
    started: WallInstant,
}

fn replay(scenario: &str, seed: u64) -> String {
    format!("cargo sim -- --scenario {scenario} --seed-start {seed} --seeds 1")
}

fn spawn_child(job: &Job) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    Command::new(exe)
        .arg("--child")
        .arg(job.scenario.name)
        .arg(job.seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("SIM_TRACE").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
}

/// Runs the scenarios; returns the process exit code.
pub fn run(opts: &Options) -> i32 {
    if !crate::BUILT_WITH_MADSIM {
        eprintln!("keyed-pool-sim was built without --cfg madsim: nothing would be simulated");
        return 2;
    }
    let scenarios: Vec<&'static Scenario> = ALL
        .iter()
        .filter(|s| opts.scenarios.is_empty() || opts.scenarios.iter().any(|n| n == s.name))
        .collect();
    let mut jobs = Vec::new();
    let mut capped = Vec::new();
    for s in &scenarios {
        // A heavy scenario in a whole-suite run: at most `seed_cap` seeds, at most 2 of them run
        // twice for the determinism check.
        let (seeds, determinism) =
            if s.seed_cap > 0 && s.seed_cap < opts.seeds && opts.scenarios.is_empty() {
                capped.push(format!("{} at {} seeds", s.name, s.seed_cap));
                (s.seed_cap, opts.determinism.min(2))
            } else {
                (opts.seeds, opts.determinism)
            };
        for i in 0..seeds {
            let seed = opts.seed_start + i;
            jobs.push(Job {
                scenario: s,
                seed,
                recheck: false,
            });
            if i < determinism {
                jobs.push(Job {
                    scenario: s,
                    seed,
                    recheck: true,
                });
            }
        }
    }
    println!(
        "keyed-pool sim: {} scenario(s) x {} seed(s) from {} ({} per scenario run twice for the \
         determinism check), {} job(s), one process per run",
        scenarios.len(),
        opts.seeds,
        opts.seed_start,
        opts.determinism.min(opts.seeds),
        opts.jobs
    );
    if !capped.is_empty() {
        println!(
            "  capped (heavy; at most 2 seeds run twice; name it with --scenario to lift the cap): {}",
            capped.join(", ")
        );
    }
    let seeds_of = |name: &str| {
        jobs.iter()
            .filter(|j: &&Job| j.scenario.name == name && !j.recheck)
            .count() as u64
    };
    let started = WallInstant::now();
    let mut tallies: BTreeMap<&str, Tally> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let mut first_runs: BTreeMap<(&str, u64), Outcome> = BTreeMap::new();
    let mut pending_recheck: BTreeMap<(&str, u64), Outcome> = BTreeMap::new();
    let mut next = 0;
    let mut running: Vec<Running> = Vec::new();
    let mut done_per: BTreeMap<&str, u64> = BTreeMap::new();
    while next < jobs.len() || !running.is_empty() {
        while next < jobs.len() && running.len() < opts.jobs {
            match spawn_child(&jobs[next]) {
                Ok(child) => running.push(Running {
                    job: next,
                    child,
                    started: WallInstant::now(),
                }),
                Err(err) => {
                    println!("cannot start a simulation process: {err}");
                    return 2;
                }
            }
            next += 1;
        }
        let mut finished = None;
        for (i, r) in running.iter_mut().enumerate() {
            match r.child.try_wait() {
                Ok(Some(_)) => {
                    finished = Some((i, None));
                    break;
                }
                Ok(None) if r.started.elapsed() > opts.wall_limit => {
                    let _ = r.child.kill();
                    let _ = r.child.wait();
                    finished = Some((
                        i,
                        Some(format!(
                            "hung: killed after the wall-clock limit of {:?}",
                            opts.wall_limit
                        )),
                    ));
                    break;
                }
                Ok(None) => {}
                Err(err) => {
                    finished = Some((i, Some(format!("lost the simulation process: {err}"))));
                    break;
                }
            }
        }
        let Some((i, hung)) = finished else {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        };
        let mut r = running.swap_remove(i);
        let wall = r.started.elapsed();
        let mut stdout = String::new();
        if let Some(mut out) = r.child.stdout.take() {
            let _ = out.read_to_string(&mut stdout);
        }
        let result = match hung {
            Some(msg) => SeedResult::Lost(msg),
            None => parse_result(&stdout).unwrap_or_else(|| {
                SeedResult::Lost("the simulation process died without a result".into())
            }),
        };
        let job = &jobs[r.job];
        let name = job.scenario.name;
        let key = (name, job.seed);
        let tally = tallies.entry(name).or_default();
        tally.wall += wall;
        let mut problem = None;
        if job.recheck {
            // The determinism check: a second process, the same seed, the same trace.
            tally.determinism.0 += 1;
            match (&result, first_runs.get(&key)) {
                (SeedResult::Done(again), Some(first)) => {
                    if again.trace == first.trace && again.virtual_time == first.virtual_time {
                        tally.determinism.1 += 1;
                    } else {
                        problem = Some(format!(
                            "non-deterministic: trace {:016x}/{} then {:016x}/{}",
                            first.trace.0, first.trace.1, again.trace.0, again.trace.1
                        ));
                    }
                }
                (SeedResult::Done(again), None) => {
                    // The first run has not reported yet (jobs > 1): compare when it does.
                    pending_recheck.insert(key, again.clone());
                }
                (SeedResult::Panicked(msg), _) => {
                    problem = Some(format!("second run panicked: {msg}"))
                }
                (SeedResult::Lost(msg), _) => problem = Some(format!("second run {msg}")),
            }
        } else {
            tally.seeds += 1;
            match &result {
                SeedResult::Done(o) => {
                    tally.virtual_time += o.virtual_time;
                    if let Some(v) = &o.violation {
                        let also = if o.also.is_empty() {
                            String::new()
                        } else {
                            format!(" (also violated: {})", o.also)
                        };
                        problem = Some(format!("{v}{also}{}", info_suffix(&o.info)));
                    }
                    if opts.verbose {
                        println!(
                            "  {name} seed {}: {} virtual {:.1}s trace {:016x}/{} {}",
                            job.seed,
                            if o.violation.is_some() { "FAIL" } else { "ok" },
                            o.virtual_time.as_secs_f64(),
                            o.trace.0,
                            o.trace.1,
                            o.info
                        );
                    }
                    if let Some(again) = pending_recheck.remove(&key) {
                        if again.trace == o.trace && again.virtual_time == o.virtual_time {
                            tally.determinism.1 += 1;
                        } else {
                            problem = Some(format!(
                                "non-deterministic: trace {:016x}/{} then {:016x}/{}",
                                o.trace.0, o.trace.1, again.trace.0, again.trace.1
                            ));
                        }
                    }
                    first_runs.insert(key, o.clone());
                }
                SeedResult::Panicked(msg) => problem = Some(format!("panicked: {msg}")),
                SeedResult::Lost(msg) => problem = Some(msg.clone()),
            }
        }
        if let Some(p) = problem {
            tally.failures += 1;
            println!(
                "\nFAIL {name} seed {}: {p}\n  replay: {}",
                job.seed,
                replay(name, job.seed)
            );
            failures.push(format!("{name} seed {}: {p}", job.seed));
        }
        if !job.recheck {
            let done = done_per.entry(name).or_default();
            *done += 1;
            let total = seeds_of(name);
            if *done == total || (*done).is_multiple_of(50) {
                println!(
                    "  {name:<20} {done:>5}/{} seeds, {} failure(s), {:.1}s wall so far",
                    total,
                    tally.failures,
                    started.elapsed().as_secs_f64()
                );
            }
        }
        let _ = std::io::stdout().flush();
    }
    print_summary(&scenarios, &tallies, started.elapsed());
    let ran: u64 = tallies.values().map(|t| t.seeds).sum();
    if ran == 0 {
        println!("FAILED: zero seeds ran");
        return 2;
    }
    if !failures.is_empty() {
        println!("FAILED: {} failing run(s):", failures.len());
        for f in &failures {
            println!("  {f}");
        }
        return 1;
    }
    println!("ok: {ran} seed(s), no failures");
    0
}

fn info_suffix(info: &str) -> String {
    if info.is_empty() {
        String::new()
    } else {
        format!("\n  config: {info}")
    }
}

fn print_summary(scenarios: &[&Scenario], tallies: &BTreeMap<&str, Tally>, wall: Duration) {
    println!();
    println!(
        "{:<20} {:>6} {:>9} {:>14} {:>10} {:>12}",
        "scenario", "seeds", "failures", "virtual time", "wall", "determinism"
    );
    let mut total = Tally::default();
    for s in scenarios {
        let Some(t) = tallies.get(s.name) else {
            continue;
        };
        println!(
            "{:<20} {:>6} {:>9} {:>13.0}s {:>9.2}s {:>12}",
            s.name,
            t.seeds,
            t.failures,
            t.virtual_time.as_secs_f64(),
            t.wall.as_secs_f64(),
            format!("{}/{}", t.determinism.1, t.determinism.0)
        );
        total.seeds += t.seeds;
        total.failures += t.failures;
        total.virtual_time += t.virtual_time;
        total.determinism.0 += t.determinism.0;
        total.determinism.1 += t.determinism.1;
    }
    println!(
        "{:<20} {:>6} {:>9} {:>13.0}s {:>9.2}s {:>12}",
        "total",
        total.seeds,
        total.failures,
        total.virtual_time.as_secs_f64(),
        wall.as_secs_f64(),
        format!("{}/{}", total.determinism.1, total.determinism.0)
    );
}
