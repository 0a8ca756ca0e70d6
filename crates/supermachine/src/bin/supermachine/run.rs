//! `supermachine run IMAGE [COMMAND...]`: an image's program in a fresh
//! VM, behaving as `docker run` does.
// On Windows `run` refuses before preparing anything (main.rs): the
// preparation is built there, and only the parts that attach a session
// are left out.
#![cfg_attr(not(unix), allow(dead_code))]

use std::net::TcpListener;
use std::path::PathBuf;
#[cfg(unix)]
use std::sync::Arc;
use std::time::Duration;
#[cfg(unix)]
use std::time::Instant;

use supermachine::images::{Overrides, PullOptions, manifest::Platform};
use supermachine::{Error, Image, PortMapping, Result, Share, Vm, VmConfig};

#[cfg(unix)]
use crate::session;
use crate::{parse_platform, parse_size};

/// Exit status for a failure of supermachine itself (as Docker's 125).
pub const EXIT_OWN_FAILURE: u8 = 125;
/// The program exists but could not be run.
pub const EXIT_CANNOT_RUN: u8 = 126;
/// The program does not exist.
pub const EXIT_NOT_FOUND: u8 = 127;

#[derive(clap::Args, Clone, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub network: crate::netargs::NetworkArgs,
    /// Set an environment variable (NAME=VALUE, or NAME for this
    /// shell's value). Repeatable.
    #[arg(short = 'e', long = "env", value_name = "NAME[=VALUE]")]
    pub env: Vec<String>,
    /// Read environment variables from a file (NAME=VALUE lines; `#`
    /// comments). Repeatable.
    #[arg(long = "env-file", value_name = "PATH")]
    pub env_files: Vec<PathBuf>,
    /// Working directory inside the VM.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// Run as USER[:GROUP] (names or ids of the image's accounts).
    #[arg(short = 'u', long)]
    pub user: Option<String>,
    /// Replace the image's entrypoint ("" clears it).
    #[arg(long, value_name = "PROGRAM")]
    pub entrypoint: Option<String>,
    /// Keep stdin open and feed it to the workload.
    #[arg(short = 'i', long)]
    pub interactive: bool,
    /// Give the workload a pseudo-terminal.
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Publish a guest TCP port on the host. Repeatable.
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT"
    )]
    pub publish: Vec<PortMapping>,
    /// Share a host directory live with the guest (virtio-fs, served by
    /// virtiofsd); `:ro` makes it read-only. Repeatable.
    #[arg(short = 'v', long = "volume", value_name = "HOST_DIR:GUEST_DIR[:ro]")]
    pub volumes: Vec<Share>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest RAM, e.g. 512M or 2G.
    #[arg(short = 'm', long, default_value = "512M", value_parser = parse_size)]
    pub memory: u64,
    /// The VM's name (for `ps`, `logs`, `exec`, `stop`, `rm`).
    #[arg(long)]
    pub name: Option<String>,
    /// The guest's hostname (default: the VM's ID).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Remove the VM when it exits (a foreground run always leaves
    /// nothing behind; with -d, the stopped VM is removed too).
    #[arg(long)]
    pub rm: bool,
    /// Run in the background and print the VM's name.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Seconds the workload gets to exit after SIGINT/SIGTERM (or `stop`)
    /// before the VM is stopped.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub stop_timeout: u64,
    /// Boot the VM even when a baked snapshot of the image (`snapshot
    /// create`) matches this run.
    #[arg(long)]
    pub no_snapshot: bool,
    /// The platform to pick from a multi-platform image, as os/arch.
    #[arg(long, value_parser = parse_platform)]
    pub platform: Option<Platform>,
    /// Talk plain HTTP to this registry when pulling. Repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    pub insecure_registries: Vec<String>,
    /// The image: a name, an image ID, or a path to an archive or OCI
    /// layout directory.
    pub image: String,
    /// The command, replacing the image's Cmd.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Everything checked and gathered before any VM exists.
pub struct Prepared {
    pub image: Image,
    pub spec: supermachine::images::ProcessSpec,
    pub listeners: Vec<(TcpListener, u16)>,
    pub config: VmConfig,
}

/// `run`'s arguments alone, for the VMM process to read them back.
#[derive(clap::Parser)]
#[command(name = "run")]
struct RunOnly {
    #[command(flatten)]
    args: RunArgs,
}

impl RunArgs {
    /// Parses `run`'s arguments (without the `run` word).
    pub fn parse_from_argv(argv: &[String]) -> Result<RunArgs> {
        use clap::Parser;
        RunOnly::try_parse_from(std::iter::once("run".to_string()).chain(argv.iter().cloned()))
            .map(|r| r.args)
            .map_err(|e| Error::InvalidOption(format!("run arguments: {e}")))
    }

    /// How to pull the image when it is not stored.
    pub fn pull_options(&self) -> PullOptions {
        PullOptions {
            platform: self.platform.clone(),
            insecure_registries: self.insecure_registries.clone(),
            progress: true,
            ..PullOptions::default()
        }
    }

    /// The user's overrides of the image config.
    pub fn overrides(&self) -> Result<Overrides> {
        let mut env = Vec::new();
        for file in &self.env_files {
            env.extend(read_env_file(file)?);
        }
        for item in &self.env {
            env.extend(env_item(item));
        }
        Ok(Overrides {
            entrypoint: self.entrypoint.as_ref().map(|e| {
                if e.is_empty() {
                    Vec::new()
                } else {
                    vec![e.clone()]
                }
            }),
            args: self.command.clone(),
            env,
            working_dir: self.workdir.clone(),
            user: self.user.clone(),
        })
    }

    /// Checks the arguments, binds the published ports, resolves the image
    /// (pulling or loading it) and its command.
    pub fn prepare(&self, id: &str) -> Result<Prepared> {
        if self.interactive && self.tty && !std::io::IsTerminal::is_terminal(&std::io::stdin()) {
            return Err(Error::InvalidOption(
                "-it needs a terminal on stdin (use -i alone to pipe input)".into(),
            ));
        }
        let overrides = self.overrides()?;
        // Shares resolve against this directory, and must exist.
        let mut shares = Vec::new();
        for share in &self.volumes {
            shares.push(Share {
                host: share.host_dir()?,
                ..share.clone()
            });
        }
        if !shares.is_empty() {
            supermachine::find_virtiofsd()?;
        }
        let listeners = self
            .publish
            .iter()
            .map(|m| m.bind().map(|l| (l, m.guest_port)))
            .collect::<Result<Vec<_>>>()?;
        let image = Image::resolve(&self.image, &self.pull_options())?;
        let spec = image.command(&overrides)?;
        let config = VmConfig {
            cpus: self.cpus,
            memory_bytes: self.memory,
            hostname: self.hostname.clone().unwrap_or_else(|| id.to_string()),
            stop_grace: Duration::from_secs(self.stop_timeout),
            shares,
            network: self.network.network()?,
            ..VmConfig::default()
        };
        Ok(Prepared {
            image,
            spec,
            listeners,
            config,
        })
    }
}

/// `NAME=VALUE` as given; `NAME` alone takes this process's value (and is
/// skipped when unset, as Docker does).
fn env_item(item: &str) -> Option<String> {
    if item.contains('=') {
        return Some(item.to_string());
    }
    std::env::var(item).ok().map(|v| format!("{item}={v}"))
}

fn read_env_file(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        what: format!("env file {}", path.display()),
        source: e,
    })?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name = line.split('=').next().unwrap_or("");
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(Error::InvalidOption(format!(
                "env file {} line {}: {line:?} is not NAME=VALUE",
                path.display(),
                n + 1
            )));
        }
        out.extend(env_item(line));
    }
    Ok(out)
}

/// A new VM's ID: 12 hex digits (also its default hostname).
pub fn new_id() -> String {
    let mut bytes = [0u8; 6];
    let _ = getrandom::fill(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs in the foreground; returns the exit status to exit with.
#[cfg(unix)]
pub fn foreground(args: &RunArgs) -> Result<u8> {
    let started = Instant::now();
    let id = new_id();
    let prepared = args.prepare(&id)?;
    // The root disk too: building it (first run only) is resolving.
    prepared.image.rootfs()?;
    let resolved = started.elapsed();
    let (vm, restored_workload) = start_vm(&prepared, args)?;
    let vm = Arc::new(vm);
    let mut forwards = Vec::new();
    for (listener, guest_port) in prepared.listeners {
        forwards.push(vm.forward_port(listener, guest_port)?);
    }
    let workload_started = Instant::now();
    let status = run_workload(&vm, &prepared.spec, restored_workload, args);
    let workload = workload_started.elapsed();
    if std::env::var_os("SUPERMACHINE_TIMINGS").is_some() {
        let t = vm.start_timings();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        eprintln!(
            "supermachine: timings restored={} resolve_ms={:.1} create_ms={:.1} kernel_boot_ms={:.1} agent_ready_ms={:.1} workload_ms={:.1} total_ms={:.1}",
            u8::from(vm.is_restored()),
            ms(resolved),
            ms(t.create),
            ms(t.kernel_boot),
            ms(t.ready
                .saturating_sub(t.create)
                .saturating_sub(t.kernel_boot)),
            ms(workload),
            ms(started.elapsed()),
        );
    }
    drop(forwards);
    // Nothing of the guest outlives its workload: its writable layer is
    // RAM, so no shutdown is owed to it.
    if let Ok(vm) = Arc::try_unwrap(vm) {
        let _ = vm.kill();
    }
    status
}

/// The VM for a run: restored from a baked snapshot that matches it
/// (its image, size and command; no -i, -t or -v), else booted. Returns
/// the restored workload's pid when the snapshot holds one.
pub fn start_vm(prepared: &Prepared, args: &RunArgs) -> Result<(Vm, Option<i32>)> {
    let config = &prepared.config;
    let eligible = !args.no_snapshot && !args.interactive && !args.tty && config.shares.is_empty();
    if eligible && let Some(snapshot) = prepared.image.baked_snapshot(&prepared.spec, config)? {
        match snapshot.start(config) {
            Ok(vm) => {
                let pid = vm.workload().map(|w| w.pid);
                return Ok((vm, pid));
            }
            // A snapshot this host cannot take (another CPU, say) is not
            // worth failing the run for.
            Err(e) => eprintln!(
                "supermachine: not restoring snapshot {}: {e}; booting instead",
                snapshot.id()
            ),
        }
    }
    Ok((prepared.image.start(config)?, None))
}

/// Spawns the workload (or, restored from a snapshot, attaches to it),
/// streams it, and maps how it ended to an exit status.
#[cfg(unix)]
pub fn run_workload(
    vm: &Arc<Vm>,
    spec: &supermachine::images::ProcessSpec,
    restored: Option<i32>,
    args: &RunArgs,
) -> Result<u8> {
    let watchdog = {
        let vm = Arc::downgrade(vm);
        let grace = Duration::from_secs(args.stop_timeout);
        move || {
            // The workload was asked to stop; if it has not within the
            // grace period, the VM goes (and the workload with it).
            std::thread::spawn(move || {
                std::thread::sleep(grace);
                if let Some(vm) = vm.upgrade() {
                    vm.force_stop();
                }
            });
        }
    };
    let ran = match restored {
        Some(pid) => vm
            .attach_process(pid)
            .and_then(|p| session::attach_status(p, watchdog)),
        None => session::run(vm.exec_spec(spec), args.interactive, args.tty, watchdog),
    };
    match ran {
        Ok(status) => Ok(status),
        // Stopped by the watchdog: as if SIGKILLed.
        Err(Error::AgentGone | Error::VmEnded) if vm.has_ended() => Ok(128 + 9),
        Err(e) => Err(e),
    }
}

/// The exit status for a failure before or around the workload.
pub fn failure_status(e: &Error) -> u8 {
    match e {
        Error::Exec {
            not_found: true, ..
        } => EXIT_NOT_FOUND,
        Error::Exec { .. } => EXIT_CANNOT_RUN,
        _ => EXIT_OWN_FAILURE,
    }
}
