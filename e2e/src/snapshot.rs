//! Tier 3 of baked snapshots, through the CLI: a Python HTTP server on
//! the Debian image baked once, then restored by 20 `run -d` at once,
//! each answering, each with its own entropy and hostname, and the file
//! the workload wrote before the snapshot; an agent-only snapshot
//! restored by a foreground `run` of any command, its clock stepped;
//! damaged and unknown snapshots.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::run::{Cli, http_get, ok_with, one_line_failure};
use crate::{Check, Env, expect};

/// Writes a random token (a cold start would write another), then serves
/// HTTP on port 8000 with a backlog for many clients.
const SERVER: &str = "import uuid, http.server as s; \
     open('/tmp/token', 'w').write(uuid.uuid4().hex); \
     s.ThreadingHTTPServer.request_queue_size = 256; \
     s.test(HandlerClass=s.SimpleHTTPRequestHandler, port=8000)";
const RESTORES: usize = 20;

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub fn baked_server_restores_twenty_at_once(env: &Env) -> Check {
    let cli = Cli::with_debian(env)?;
    let names: Vec<String> = (0..RESTORES).map(|i| format!("snap{i}")).collect();
    let result = baked_server(cli, &names);
    if result.is_err() {
        for n in &names {
            let _ = cli.run(&["rm", "-f", n]);
        }
    }
    result
}

fn baked_server(cli: &'static Cli, names: &[String]) -> Check {
    let bake = cli.run(&[
        "snapshot",
        "create",
        "--name",
        "pyweb",
        "-m",
        "256M",
        "--ready-cmd",
        "bash -c 'exec 3<>/dev/tcp/127.0.0.1/8000'",
        "debian-python:bookworm",
        "python3",
        "-c",
        SERVER,
    ]);
    ok_with(&bake, 0, "debian-python")?;
    let baked_at = Instant::now();
    println!("  baked: {}", bake.stdout.trim());
    let ls = cli.run(&["snapshot", "ls"]);
    ok_with(&ls, 0, "pyweb")?;
    // Long enough that a clock not stepped after the restore shows.
    std::thread::sleep(Duration::from_secs(6).saturating_sub(baked_at.elapsed()));

    // Held until all are chosen, so that no port is picked twice.
    let held: Vec<std::net::TcpListener> = (0..names.len())
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("finding free ports: {e}"))?;
    let ports: Vec<u16> = held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    drop(held);
    let started = Instant::now();
    let runs: Vec<_> = names
        .iter()
        .zip(&ports)
        .map(|(name, port)| {
            let (name, publish) = (name.clone(), format!("127.0.0.1:{port}:8000"));
            std::thread::spawn(move || {
                cli.run(&[
                    "run",
                    "-d",
                    "--name",
                    &name,
                    "-m",
                    "256M",
                    "-p",
                    &publish,
                    "debian-python:bookworm",
                    "python3",
                    "-c",
                    SERVER,
                ])
            })
        })
        .collect();
    for (run, name) in runs.into_iter().zip(names) {
        let r = run
            .join()
            .map_err(|_| "a run thread panicked".to_string())?;
        ok_with(&r, 0, name)?;
    }
    println!(
        "  {} restored VMs started in {:.1?}",
        names.len(),
        started.elapsed()
    );
    let clients: Vec<_> = ports
        .iter()
        .map(|&port| std::thread::spawn(move || http_get(port, "/tmp/token")))
        .collect();
    let answers: Vec<Result<String, String>> = clients
        .into_iter()
        .map(|c| c.join().unwrap_or_else(|_| Err("client panicked".into())))
        .collect();
    let ok = answers
        .iter()
        .filter(|a| a.as_deref().is_ok_and(|s| s.contains(" 200 ")))
        .count();
    println!(
        "  {ok} of {} answered within {:.1?} of the first restore",
        names.len(),
        started.elapsed()
    );
    let ps = cli.run(&["ps"]);
    expect(
        ok == names.len(),
        &format!("expected every restore to answer: {answers:?}"),
        &ps,
    )?;

    let exec = |name: &str, script: &str| cli.run(&["exec", name, "sh", "-c", script]);
    // The workload's file from before the snapshot, the same in every
    // restore: none of them booted and started it afresh.
    let token0 = exec(&names[0], "cat /tmp/token");
    let token1 = exec(&names[1], "cat /tmp/token");
    expect(
        token0.code == Some(0)
            && token0.stdout.trim().len() == 32
            && token0.stdout == token1.stdout,
        &format!(
            "expected the baked workload's token in both restores, second said {:?}",
            token1.stdout
        ),
        &token0,
    )?;
    // Fresh entropy and its own hostname in each.
    let random = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; hostname; date +%s";
    let a = exec(&names[0], random);
    let b = exec(&names[1], random);
    let host_now = unix_now();
    let lines = |r: &crate::Run| -> Vec<String> { r.stdout.lines().map(str::to_string).collect() };
    let (la, lb) = (lines(&a), lines(&b));
    expect(
        a.code == Some(0) && la.len() == 3 && lb.len() == 3,
        "expected random bytes, hostname and time",
        &a,
    )?;
    expect(
        la[0].len() == 32 && la[0] != lb[0],
        &format!("expected different random bytes, both read {}", la[0]),
        &b,
    )?;
    expect(
        la[1] != lb[1],
        &format!("expected each restore its own hostname, both are {}", la[1]),
        &b,
    )?;
    // The clock is checked where one VM runs (`agent_snapshot_serves_any_run`
    // and the agent tests): with 20 guests on the test host's one
    // emulated CPU, their clocks fall behind it by seconds, restored or
    // not, so here it is only reported.
    let guest_now: i64 = la[2].trim().parse().unwrap_or(0);
    println!(
        "  {}'s clock is {:+} s from the host's",
        names[0],
        guest_now - host_now
    );
    for name in names {
        ok_with(&cli.run(&["rm", "-f", name]), 0, name)?;
    }
    let rm = cli.run(&["snapshot", "rm", "pyweb"]);
    ok_with(&rm, 0, "removed")?;
    let left = cli.leftovers(&[]);
    expect(left.is_empty(), &format!("left behind: {left:?}"), &rm)
}

/// An agent-only snapshot serves any command's `run`; `--no-snapshot`
/// boots; a damaged snapshot is passed over with one warning line; an
/// unknown one is refused in one line.
pub fn agent_snapshot_serves_any_run(env: &Env) -> Check {
    let cli = Cli::shared(env)?;
    let bake = cli.run(&["snapshot", "create", "--no-workload", "-m", "256M", "demo"]);
    ok_with(&bake, 0, "demo")?;
    let id = bake
        .stdout
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    let run = |extra: &[&str]| {
        let mut args = vec!["run", "-m", "256M"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["demo", "sh", "-c", "echo hi from $(hostname)"]);
        cli.run_timed(&args)
    };
    // Long enough that a wall clock not stepped after the restore shows.
    std::thread::sleep(Duration::from_secs(5));
    let before = unix_now();
    let restored = cli.run_timed(&[
        "run",
        "-m",
        "256M",
        "--hostname",
        "restored-one",
        "demo",
        "sh",
        "-c",
        "echo hi from $(hostname) at $(date +%s)",
    ]);
    let after = unix_now();
    ok_with(&restored, 0, "hi from restored-one at ")?;
    let guest_now: i64 = restored
        .stdout
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    expect(
        guest_now >= before - 1 && guest_now <= after + 1,
        &format!("expected the restored guest's clock stepped to the host's ({before}..{after})"),
        &restored,
    )?;
    expect(
        restored.stderr.contains("restored=1"),
        "expected the run to restore the snapshot",
        &restored,
    )?;
    let cold = run(&["--no-snapshot"]);
    ok_with(&cold, 0, "hi from")?;
    expect(
        cold.stderr.contains("restored=0"),
        "expected --no-snapshot to boot",
        &cold,
    )?;
    // A flipped byte in the state file: refused by its checksum, and the
    // run boots instead, saying so.
    let state = cli.snapshots().join(&id).join("state");
    let mut bytes = std::fs::read(&state).map_err(|e| format!("{}: {e}", state.display()))?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&state, &bytes).map_err(|e| e.to_string())?;
    let damaged = run(&[]);
    ok_with(&damaged, 0, "hi from")?;
    expect(
        damaged.stderr.contains("not restoring snapshot")
            && damaged.stderr.contains("restored=0")
            && damaged.stderr.lines().count() == 2,
        "expected one warning line, then a boot",
        &damaged,
    )?;
    one_line_failure(
        cli,
        &cli.run(&["snapshot", "rm", "no-such-snapshot"]),
        "no snapshot named",
    )?;
    ok_with(&cli.run(&["snapshot", "rm", &id]), 0, "removed")?;
    let ls = cli.run(&["snapshot", "ls"]);
    expect(!ls.stdout.contains(&id), "expected the snapshot gone", &ls)?;
    let left = cli.leftovers(&[]);
    expect(left.is_empty(), &format!("left behind: {left:?}"), &ls)
}
