//! `cargo xtask bench snapshot`, the Linux-guest half, inside the test
//! host: the same guest (our kernel, our initramfs with the agent as
//! PID 1, the test image's root disk, 256 MiB, 1 vCPU) booted, saved and
//! restored by supermachine and by Firecracker, side by side in one run.
//!
//! Restore time is measured the same way for both, from outside: from
//! spawning the VMM process to the agent's first answer, a `Ping`
//! answered over vsock through the VMM's Unix socket (both VMMs speak the
//! same `CONNECT <port>` host protocol, and the agent does not know which
//! one runs it). Firecracker's includes its API round trips (socket
//! ready, `PUT /snapshot/load` with `resume_vm`); ours is `supermachine
//! boot --restore DIR --vsock SOCKET`. Runs alternate. A connection whose
//! ping gets no answer after the guest accepted it is given up after a
//! short, growing wait and made again (a guest resets the connections it
//! has when it handles the restore's transport reset, and one accepted
//! just before that is never answered; supermachine's device closes such
//! a connection itself, Firecracker's leaves it to the client).
//!
//! Also: the library's `Vm::restore` in a running process (restore, then
//! the agent's `Restored` exchange: clock, reseed, identity), a warm
//! `Pool`'s `acquire` of a ready VM, snapshot creation for both, and the
//! host memory each extra restored VM adds when 20 run from one snapshot.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use supermachine::{Pool, PoolConfig, Snapshot, Vm, VmConfig};
use supermachine_agent_protocol::{
    self as proto, AGENT_PORT, AgentMessage, Clock, HostMessage, READY_PORT, Request,
};

use crate::Env;
use crate::bench_run::ms;
use crate::bench_snapshot::{drain, median_p99, pss_kib};
use crate::firecracker::Firecracker;

const MEMORY_MIB: u64 = 256;
const SHARERS: usize = 20;

/// The kernel command line both VMMs boot the agent with.
fn boot_args() -> String {
    format!(
        "{} quiet supermachine.root=/dev/vda supermachine.hostname=bench",
        supermachine::DEFAULT_CMDLINE
    )
}

/// One `Ping` to the agent through a VMM's vsock socket, retried (with a
/// growing per-attempt wait) until it is answered or `patience` passes.
fn ping_agent(socket: &Path, patience: Duration) -> Result<(), String> {
    let deadline = Instant::now() + patience;
    let mut wait = Duration::from_millis(50);
    let mut last = String::new();
    while Instant::now() < deadline {
        match ping_once(socket, wait) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
        wait = (wait * 2).min(Duration::from_secs(2));
        std::thread::sleep(Duration::from_micros(200));
    }
    Err(format!("the agent did not answer a ping: {last}"))
}

/// The `OK` line comes once the guest accepted the connection (however
/// long the VMM takes to get there); only the agent's answer after it is
/// waited for at most `wait`.
fn ping_once(socket: &Path, wait: Duration) -> Result<(), String> {
    let mut s = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {AGENT_PORT}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    let mut reader = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
    reader
        .read_line(&mut line)
        .map_err(|e| format!("CONNECT: {e}"))?;
    if !line.starts_with("OK ") {
        return Err(format!("CONNECT answered {line:?}"));
    }
    s.set_read_timeout(Some(wait)).map_err(|e| e.to_string())?;
    proto::send_handshake(&mut s).map_err(|e| e.to_string())?;
    proto::write_frame(&mut s, &HostMessage::Request(Request::Ping)).map_err(|e| e.to_string())?;
    proto::expect_handshake(&mut reader).map_err(|e| e.to_string())?;
    match proto::read_frame::<_, AgentMessage>(&mut reader) {
        Ok(Some(AgentMessage::Ok)) => Ok(()),
        other => Err(format!("ping answered {other:?}")),
    }
}

/// Answers the agent's hello on `<socket>_<READY_PORT>` as a host must.
fn welcome_agent(ready: &UnixListener, patience: Duration) -> Result<(), String> {
    ready.set_nonblocking(true).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + patience;
    let mut conn = loop {
        match ready.accept() {
            Ok((c, _)) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(format!("the agent never said hello: {e}")),
        }
    };
    conn.set_nonblocking(false).map_err(|e| e.to_string())?;
    proto::expect_handshake(&mut conn).map_err(|e| e.to_string())?;
    match proto::read_frame::<_, AgentMessage>(&mut conn) {
        Ok(Some(AgentMessage::Hello { .. })) => {}
        other => return Err(format!("expected Hello, got {other:?}")),
    }
    proto::send_handshake(&mut conn).map_err(|e| e.to_string())?;
    proto::write_frame(
        &mut conn,
        &HostMessage::Welcome {
            clock: Clock::now(),
            entropy: vec![7; 64],
        },
    )
    .map_err(|e| e.to_string())
}

fn vm_config(env: &Env, hostname: &str) -> VmConfig {
    VmConfig {
        guest: Some(env.guest_image()),
        memory_bytes: MEMORY_MIB << 20,
        hostname: hostname.into(),
        // Firecracker's guest has no network card: neither has ours (and
        // `boot --restore` gives a restored NIC no backend).
        network: supermachine::Network::none(),
        ..VmConfig::default()
    }
}

/// Our snapshot: the library boots the agent VM and saves it with
/// `snapshot_and_stop`; the time the save took.
fn ours_snapshot(env: &Env, dir: &Path) -> Result<Duration, String> {
    let vm = Vm::start(&env.asset("rootfs.erofs"), &vm_config(env, "bench"))
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    vm.snapshot_and_stop(dir).map_err(|e| e.to_string())?;
    Ok(started.elapsed())
}

/// Firecracker's Full snapshot of the same guest, its agent welcomed and
/// answering; the time `PUT /snapshot/create` took.
fn firecracker_snapshot(binary: &Path, env: &Env, dir: &Path) -> Result<Duration, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let vsock = dir.join("v.sock");
    let ready = UnixListener::bind(format!("{}_{READY_PORT}", vsock.display()))
        .map_err(|e| e.to_string())?;
    let mut fc = Firecracker::start(binary, &dir.join("api.sock"))?;
    let console = fc.stdout.take().ok_or("no console")?;
    let _drain = drain(console);
    fc.request(
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path":"{}","initrd_path":"{}","boot_args":"{}"}}"#,
            env.asset(crate::KERNEL).display(),
            env.asset("initramfs.cpio").display(),
            boot_args()
        ),
    )?;
    fc.request(
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count":1,"mem_size_mib":{MEMORY_MIB}}}"#),
    )?;
    fc.request(
        "PUT",
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id":"rootfs","path_on_host":"{}","is_root_device":false,"is_read_only":true}}"#,
            env.asset("rootfs.erofs").display()
        ),
    )?;
    fc.request(
        "PUT",
        "/vsock",
        &format!(r#"{{"guest_cid":3,"uds_path":"{}"}}"#, vsock.display()),
    )?;
    fc.request("PUT", "/entropy", "{}")?;
    fc.request("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#)?;
    welcome_agent(&ready, Duration::from_secs(120))?;
    ping_agent(&vsock, Duration::from_secs(30))?;
    let took = fc.snapshot(dir)?;
    drop(fc);
    let _ = std::fs::remove_file(&vsock);
    Ok(took)
}

/// A restored VMM process, killed when dropped.
enum Restored {
    Ours(Child),
    Firecracker(Firecracker),
}

impl Restored {
    fn pid(&self) -> u32 {
        match self {
            Restored::Ours(c) => c.id(),
            Restored::Firecracker(f) => f.pid(),
        }
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Restored::Ours(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `supermachine boot --restore DIR --vsock SOCKET`, then a ping.
fn ours_restore(
    bin: &Path,
    snapshot: &Path,
    socket: &Path,
) -> Result<(Duration, Restored), String> {
    let started = Instant::now();
    let child = Command::new(bin)
        .args(["boot", "--restore"])
        .arg(snapshot)
        .arg("--vsock")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let vm = Restored::Ours(child);
    // The socket exists once the VMM listens.
    while !socket.exists() {
        if started.elapsed() > Duration::from_secs(30) {
            return Err("supermachine never made its vsock socket".into());
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    ping_agent(socket, Duration::from_secs(60))?;
    Ok((started.elapsed(), vm))
}

/// Firecracker: process, API socket, `PUT /snapshot/load` with resume
/// and its vsock socket moved to `vsock` (`vsock_override`), then a ping
/// through it.
fn firecracker_restore(
    binary: &Path,
    snapshot: &Path,
    api: &Path,
    vsock: &Path,
) -> Result<(Duration, Restored), String> {
    let _ = std::fs::remove_file(vsock);
    let started = Instant::now();
    let mut fc = Firecracker::start(binary, api)?;
    if let Some(out) = fc.stdout.take() {
        drain(out);
    }
    fc.restore(snapshot, Some(vsock))?;
    ping_agent(vsock, Duration::from_secs(60))?;
    Ok((started.elapsed(), Restored::Firecracker(fc)))
}

pub(crate) fn run(env: &Env, firecracker: Option<&Path>, runs: usize) -> ExitCode {
    match bench(env, firecracker, runs.max(1)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-snapshot-linux: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bench(env: &Env, firecracker: Option<&Path>, runs: usize) -> Result<(), String> {
    let work = std::env::temp_dir().join(format!("sm-bench-snap-linux-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(work.clone());
    let (ours_dir, fc_dir) = (work.join("ours"), work.join("fc"));
    let ours_create = ours_snapshot(env, &ours_dir)?;
    let fc_create = firecracker
        .map(|fc| firecracker_snapshot(fc, env, &fc_dir))
        .transpose()?;
    println!(
        "probe snapshots made: ours {:.0} ms, Firecracker {}",
        ms(ours_create),
        fc_create.map_or("-".into(), |t| format!("{:.0} ms", ms(t)))
    );

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let socket = work.join(format!("r{i}.sock"));
        let (t, vm) = ours_restore(&env.supermachine, &ours_dir, &socket)?;
        ours.push(ms(t));
        drop(vm);
        if let Some(fc) = firecracker {
            let (t, vm) = firecracker_restore(
                fc,
                &fc_dir,
                &work.join("fc-api.sock"),
                &work.join(format!("f{i}.sock")),
            )?;
            theirs.push(ms(t));
            drop(vm);
        }
    }

    // The library in a running process, and a warm pool.
    let snapshot = Snapshot::open(&ours_dir).map_err(|e| e.to_string())?;
    let mut in_process = Vec::new();
    for i in 0..runs {
        let started = Instant::now();
        let vm = snapshot
            .start(&vm_config(env, &format!("copy-{i}")))
            .map_err(|e| e.to_string())?;
        in_process.push(ms(started.elapsed()));
        drop(vm);
    }
    let pool = Pool::new(
        snapshot,
        PoolConfig {
            min_ready: 2,
            max_vms: 4,
            vm: vm_config(env, "pooled"),
            ..PoolConfig::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let mut acquire = Vec::new();
    for _ in 0..runs {
        if !pool.wait_ready(1, Duration::from_secs(120)) {
            return Err(format!("the pool did not refill: {:?}", pool.stats()));
        }
        let started = Instant::now();
        let vm = pool.acquire().map_err(|e| e.to_string())?;
        acquire.push(started.elapsed().as_secs_f64() * 1e6);
        vm.ping().map_err(|e| e.to_string())?;
        drop(vm);
    }
    drop(pool);

    // Host memory per extra VM, 20 restores of one snapshot.
    let shared = |start: &mut dyn FnMut(usize) -> Result<Restored, String>| {
        let one = start(0)?;
        std::thread::sleep(Duration::from_millis(500));
        let alone = pss_kib(one.pid())?;
        let mut all = vec![one];
        for i in 1..SHARERS {
            all.push(start(i)?);
        }
        std::thread::sleep(Duration::from_millis(500));
        let total: u64 = all
            .iter()
            .map(|v| pss_kib(v.pid()))
            .sum::<Result<u64, _>>()?;
        Ok::<f64, String>((total as f64 - alone as f64) / (SHARERS - 1) as f64)
    };
    let ours_pss = shared(&mut |i| {
        ours_restore(
            &env.supermachine,
            &ours_dir,
            &work.join(format!("s{i}.sock")),
        )
        .map(|r| r.1)
    })?;
    let fc_pss = firecracker.map(|fc| {
        shared(&mut |i| {
            firecracker_restore(
                fc,
                &fc_dir,
                &work.join(format!("fc-api{i}.sock")),
                &work.join(format!("fs{i}.sock")),
            )
            .map(|r| r.1)
        })
    });

    let (o50, o99) = median_p99(&ours);
    let (l50, l99) = median_p99(&in_process);
    let (a50, a99) = median_p99(&acquire);
    println!(
        "snapshot-linux: {runs} runs, {MEMORY_MIB} MiB, 1 vCPU, agent guest, {} guest in the test host",
        std::env::consts::ARCH
    );
    println!("| measure | supermachine p50 / p99 | Firecracker p50 / p99 | ratio p50 |");
    println!("|---|---|---|---|");
    if theirs.is_empty() {
        println!(
            "| restore in a fresh process to the agent's first answer | {o50:.1} / {o99:.1} ms | - | - |"
        );
    } else {
        let (f50, f99) = median_p99(&theirs);
        println!(
            "| restore in a fresh process to the agent's first answer | {o50:.1} / {o99:.1} ms | {f50:.1} / {f99:.1} ms | {:.2}x |",
            o50 / f50
        );
    }
    println!(
        "| `Vm::restore` in a running process (restore + `Restored`) | {l50:.1} / {l99:.1} ms | - | - |"
    );
    println!("| warm `Pool::acquire` of a ready VM | {a50:.0} / {a99:.0} us | - | - |");
    match fc_create {
        Some(fc) => println!(
            "| snapshot creation | {:.0} ms | {:.0} ms | {:.2}x |",
            ms(ours_create),
            ms(fc),
            ms(ours_create) / ms(fc)
        ),
        None => println!("| snapshot creation | {:.0} ms | - | - |", ms(ours_create)),
    }
    match fc_pss {
        None => println!(
            "| host memory per extra VM, {SHARERS} sharing one snapshot (PSS) | {ours_pss:.0} KiB | - | - |"
        ),
        Some(Ok(fc)) => println!(
            "| host memory per extra VM, {SHARERS} sharing one snapshot (PSS) | {ours_pss:.0} KiB | {fc:.0} KiB | {:.2}x |",
            ours_pss / fc
        ),
        Some(Err(e)) => println!(
            "| host memory per extra VM, {SHARERS} sharing one snapshot (PSS) | {ours_pss:.0} KiB | failed: {e} | - |"
        ),
    }
    Ok(())
}
