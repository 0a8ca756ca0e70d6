//! `supermachine-agent`: PID 1 of every supermachine guest.
//!
//! It sets up the machine ([`system::boot`]), starts reaping, tells the
//! host it is ready over vsock and serves the host's connections until the
//! host asks it to power off. It never exits: a failure to set up the
//! machine is printed on the console and powers the guest off, so the
//! host learns at once instead of waiting for a timeout.

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use supermachine_agent_protocol::{
    self as proto, AGENT_PORT, AgentMessage, HostMessage, READY_PORT,
};
use supermachine_guest_agent::{Agent, Reaper, system};
use vsock::{VMADDR_CID_ANY, VMADDR_CID_HOST, VsockListener, VsockStream};

/// Signals PID 1 passes on to the process groups it started.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

struct ConsoleLog;

impl log::Log for ConsoleLog {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            let _ = writeln!(
                std::io::stderr(),
                "supermachine-agent: {}: {}",
                r.level().as_str().to_lowercase(),
                r.args()
            );
        }
    }
    fn flush(&self) {}
}

fn forwarded_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in FORWARDED {
            libc::sigaddset(&mut set, s);
        }
    }
    set
}

/// Passes signals sent to PID 1 on to every process group it started.
fn forward_signals(reaper: Arc<Reaper>) {
    let set = forwarded_set();
    loop {
        let mut sig: libc::c_int = 0;
        // SAFETY: valid pointers; the set is blocked in every thread.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            continue;
        }
        for pid in reaper.session_pids() {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(-pid, sig) };
        }
    }
}

/// Tells the host the agent is ready: handshake, `Hello`, then the host's
/// `Welcome` (its clock and entropy). The connection then serves requests
/// like any other.
fn announce(agent: &Agent, started_at: Duration) -> Result<VsockStream, String> {
    let mut conn = VsockStream::connect_with_cid_port(VMADDR_CID_HOST, READY_PORT)
        .map_err(|e| format!("connecting to the host's ready port: {e}"))?;
    proto::send_handshake(&mut conn).map_err(|e| e.to_string())?;
    proto::write_frame(
        &mut conn,
        &AgentMessage::Hello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            kernel_boot_us: micros(started_at),
            setup_us: micros(since_boot().saturating_sub(started_at)),
        },
    )
    .map_err(|e| e.to_string())?;
    proto::expect_handshake(&mut conn).map_err(|e| e.to_string())?;
    match proto::read_frame::<_, HostMessage>(&mut conn).map_err(|e| e.to_string())? {
        Some(HostMessage::Welcome { clock, entropy }) => {
            if agent.owns_system() {
                if let Err(e) = system::set_clock(clock) {
                    log::warn!("setting the clock: {e}");
                }
                if let Err(e) = system::add_entropy(&entropy) {
                    log::warn!("adding entropy: {e}");
                }
            }
            Ok(conn)
        }
        other => Err(format!("expected Welcome from the host, got {other:?}")),
    }
}

/// Pending host connections the agent's listener queues.
const AGENT_BACKLOG: i32 = 4096;

/// Time since the guest kernel started (CLOCK_BOOTTIME: needs no /proc).
fn since_boot() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    Duration::new(
        t.tv_sec.max(0) as u64,
        t.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn main() {
    let started_at = since_boot();
    let pid1 = std::process::id() == 1;
    let _ = log::set_logger(&ConsoleLog);
    log::set_max_level(log::LevelFilter::Warn);
    if pid1 {
        let set = forwarded_set();
        // SAFETY: a valid set; blocking before any thread starts makes
        // every thread inherit it (children get a clean mask from std).
        unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    }
    let hostname = if pid1 {
        match system::boot() {
            Ok(h) => h,
            Err(e) => {
                log::error!("setting up the guest failed: {e}");
                system::power_off();
            }
        }
    } else {
        "supermachine".to_string()
    };
    let reaper = match Reaper::start() {
        Ok(r) => r,
        Err(e) => {
            log::error!("starting the reaper: {e}");
            system::power_off();
        }
    };
    if pid1 {
        let r = reaper.clone();
        let _ = std::thread::Builder::new()
            .name("signals".into())
            .stack_size(64 << 10)
            .spawn(move || forward_signals(r));
    }
    let agent = Arc::new(Agent::new(reaper, "/".into(), hostname, pid1));
    let listener = match VsockListener::bind_with_cid_port(VMADDR_CID_ANY, AGENT_PORT) {
        Ok(l) => l,
        Err(e) => {
            log::error!("listening on vsock port {AGENT_PORT}: {e}");
            system::power_off();
        }
    };
    // A burst of host connections (a published port under load opens
    // one per client) must queue, not be refused: the vsock crate
    // listens with a backlog of 128.
    if let Err(e) = rustix::net::listen(&listener, AGENT_BACKLOG) {
        log::warn!("raising the vsock backlog: {e}");
    }
    match announce(&agent, started_at) {
        Ok(conn) => {
            let a = agent.clone();
            let _ = std::thread::Builder::new()
                .name("conn-ready".into())
                .spawn(move || a.serve_requests(conn));
        }
        Err(e) => log::warn!("{e}; serving vsock port {AGENT_PORT} anyway"),
    }
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                let a = agent.clone();
                let spawned = std::thread::Builder::new()
                    .name("conn".into())
                    .spawn(move || a.serve(conn));
                if let Err(e) = spawned {
                    log::error!("starting a connection thread: {e}");
                }
            }
            Err(e) => {
                log::warn!("accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}
