//! The `supermachine` command-line tool.

#[cfg(unix)]
mod detached;
mod netargs;
mod run;
#[cfg(unix)]
mod session;
mod snapshot;
#[cfg(unix)]
mod terminal;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use supermachine::images::{self as oci, ImageRecord, LoadOptions, PullOptions, Store};
use supermachine::{Console, DEFAULT_CMDLINE, DiskConfig, Machine, MachineConfig, VsockConfig};

#[derive(Parser)]
#[command(name = "supermachine", version, about = "Run Linux microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// What `exec` runs, with its flags.
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Feed stdin to the process.
    #[arg(short = 'i', long)]
    pub(crate) interactive: bool,
    /// Give the process a pseudo-terminal.
    #[arg(short = 't', long)]
    pub(crate) tty: bool,
    /// Set an environment variable (NAME=VALUE). Repeatable.
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
    pub(crate) env: Vec<String>,
    /// Working directory (default: the workload's).
    #[arg(short = 'w', long = "workdir")]
    pub(crate) workdir: Option<String>,
    /// Run as USER[:GROUP] (default: the workload's user).
    #[arg(short = 'u', long)]
    pub(crate) user: Option<String>,
    /// The VM's name or ID.
    pub(crate) name: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub(crate) command: Vec<String>,
}

/// Each subcommand's arguments are built only when it is the one given:
/// that takes a third off parsing, which is a fresh-process restore's
/// largest user-space cost (see docs/snapshot.md).
#[derive(Subcommand)]
#[command(defer = true)]
enum Command {
    /// Run an image's program in a new VM (as `docker run` does).
    Run(Box<run::RunArgs>),
    /// List detached VMs (running ones; -a for all).
    Ps {
        /// Also VMs that have exited.
        #[arg(short = 'a', long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print a detached VM's workload output.
    Logs {
        /// Keep printing new output until the VM exits.
        #[arg(short = 'f', long)]
        follow: bool,
        /// The VM's name or ID.
        name: String,
    },
    /// Run a command in a running detached VM.
    Exec(ExecArgs),
    /// Stop detached VMs: their workload gets its stop signal, then the VM
    /// is ended after the timeout.
    Stop {
        /// Seconds to wait before ending the VM.
        #[arg(short = 't', long = "time", value_name = "SECONDS")]
        time: Option<u64>,
        /// VM names or IDs.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Remove stopped detached VMs (their logs and state).
    Rm {
        /// Also stop running ones, at once.
        #[arg(short = 'f', long)]
        force: bool,
        /// VM names or IDs.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// The VMM process of a detached VM (started by `run -d`).
    #[command(name = "__vmm", hide = true)]
    Vmm { dir: PathBuf },
    /// Boot a kernel directly (low level): no image, no agent.
    Boot {
        /// Kernel: an ELF vmlinux or a bzImage (x86_64), an Image (aarch64).
        #[arg(long, required_unless_present = "restore")]
        kernel: Option<PathBuf>,
        /// Restore the machine saved in this snapshot directory instead of
        /// booting a kernel (its console goes to standard output or
        /// --console-file; --vsock gives it a new vsock socket).
        #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "append", "memory", "cpus", "disks", "no_entropy"])]
        restore: Option<PathBuf>,
        /// Initial ramdisk (cpio archive).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line, replacing the default.
        #[arg(long, default_value = DEFAULT_CMDLINE)]
        cmdline: String,
        /// Extra kernel command-line arguments, appended.
        #[arg(long)]
        append: Option<String>,
        /// Guest RAM, e.g. 256M or 1G (a bare number means MiB).
        #[arg(long, default_value = "256M", value_parser = parse_size)]
        memory: u64,
        /// Number of vCPUs.
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Write the guest console to this file instead of standard output.
        #[arg(long)]
        console_file: Option<PathBuf>,
        /// A raw disk image for the guest (vda, vdb, ... in order); append
        /// ",ro" to make it read-only. Repeatable.
        #[arg(long = "disk", value_name = "PATH[,ro]", value_parser = parse_disk)]
        disks: Vec<DiskConfig>,
        /// Give the guest no virtio-rng entropy device.
        #[arg(long)]
        no_entropy: bool,
        /// Give the guest a vsock device whose host side is this Unix
        /// socket (host programs connect here and send "CONNECT <port>";
        /// guest connections to host port N go to PATH_N).
        #[arg(long, value_name = "PATH")]
        vsock: Option<PathBuf>,
        /// The guest's vsock context ID.
        #[arg(long, default_value_t = 3, requires = "vsock")]
        vsock_cid: u64,
    },
    /// Pull an image from a registry and prepare its root disk
    /// (`alpine` means docker.io/library/alpine:latest).
    Pull {
        /// The image reference.
        image: String,
        /// The platform to pick from a multi-platform image, as os/arch.
        #[arg(long, value_parser = parse_platform)]
        platform: Option<oci::manifest::Platform>,
        /// Talk plain HTTP to this registry (loopback ones always are).
        /// Repeatable.
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure_registries: Vec<String>,
    },
    /// Load images from a `docker save` archive, an oci-archive tarball or
    /// an OCI image layout directory, and prepare their root disks.
    Load {
        /// The archive or directory.
        archive: PathBuf,
        /// Name the image this instead of the name the archive gives.
        #[arg(long)]
        tag: Option<String>,
        /// The platform to pick from a multi-platform image, as os/arch.
        #[arg(long, value_parser = parse_platform)]
        platform: Option<oci::manifest::Platform>,
    },
    /// List stored images.
    Images {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Baked snapshots: create, ls, rm.
    #[command(subcommand)]
    Snapshot(snapshot::SnapshotCommand),
    /// Remove images, and every blob, disk and snapshot no other image
    /// uses.
    Rmi {
        /// The image references.
        #[arg(required = true)]
        images: Vec<String>,
    },
}

pub(crate) fn parse_platform(s: &str) -> Result<oci::manifest::Platform, String> {
    let mut parts = s.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(os), Some(arch), variant, None) if !os.is_empty() && !arch.is_empty() => {
            Ok(oci::manifest::Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: variant.filter(|v| !v.is_empty()).map(Into::into),
            })
        }
        _ => Err(format!(
            "'{s}' is not a platform like linux/amd64 or linux/arm64/v8"
        )),
    }
}

pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        _ => (s, 20),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size like 512M or 2G"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

fn parse_disk(s: &str) -> Result<DiskConfig, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        _ => (s, false),
    };
    if path.is_empty() {
        return Err("a disk needs a path".into());
    }
    Ok(DiskConfig {
        path: PathBuf::from(path),
        read_only,
    })
}

/// Lets this process use as many descriptors as the hard limit allows: a
/// published port holds two per client connection, and a burst of clients
/// must not be cut short by the 1024 soft default (Go's runtime does the
/// same for the same reason).
#[cfg(unix)]
fn raise_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        let _ = setrlimit(Resource::Nofile, limit);
    }
}

/// How `run` and `exec` end: the workload's status, or one line and the
/// status `docker run` gives for the failure.
fn workload_exit(result: supermachine::Result<u8>) -> ExitCode {
    match result {
        Ok(status) => ExitCode::from(status),
        Err(e) => {
            eprintln!("supermachine: {e}");
            ExitCode::from(run::failure_status(&e))
        }
    }
}

#[cfg(unix)]
fn run_image(args: &run::RunArgs) -> supermachine::Result<u8> {
    if args.detach {
        let argv: Vec<String> = std::env::args().skip(2).collect();
        detached::start(args, argv).map(|()| 0)
    } else {
        run::foreground(args)
    }
}

#[cfg(unix)]
fn exec_in_vm(args: &ExecArgs) -> supermachine::Result<u8> {
    detached::exec(args)
}

#[cfg(unix)]
fn vmm_process(dir: &std::path::Path) -> ExitCode {
    ExitCode::from(detached::serve(dir))
}

#[cfg(unix)]
use detached as detached_vms;

/// Why this build for Windows runs no image's program yet.
#[cfg(not(unix))]
fn no_agent(what: &str) -> supermachine::Error {
    supermachine::Error::Unsupported(format!(
        "{what}: an image's program runs through its guest agent, reached over virtio-vsock, \
         whose host side (Unix sockets) this build for Windows does not have yet"
    ))
}

#[cfg(not(unix))]
fn run_image(_args: &run::RunArgs) -> supermachine::Result<u8> {
    Err(no_agent("run"))
}

#[cfg(not(unix))]
fn exec_in_vm(_args: &ExecArgs) -> supermachine::Result<u8> {
    Err(no_agent("exec"))
}

#[cfg(not(unix))]
fn vmm_process(_dir: &std::path::Path) -> ExitCode {
    eprintln!("supermachine: {}", no_agent("a detached VM"));
    ExitCode::from(run::EXIT_OWN_FAILURE)
}

/// `ps`, `logs`, `stop` and `rm` on Windows: there are no detached VMs.
#[cfg(not(unix))]
mod detached_vms {
    use supermachine::Result;

    pub fn ps(_all: bool, _json: bool) -> Result<()> {
        Err(super::no_agent("ps"))
    }
    pub fn logs(_name: &str, _follow: bool) -> Result<()> {
        Err(super::no_agent("logs"))
    }
    pub fn stop(_names: &[String], _time: Option<u64>) -> Result<()> {
        Err(super::no_agent("stop"))
    }
    pub fn rm(_names: &[String], _force: bool) -> Result<()> {
        Err(super::no_agent("rm"))
    }
}

fn main() -> ExitCode {
    #[cfg(unix)]
    raise_descriptor_limit();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            // One line, like every other error; --help has the usage.
            let text = e.to_string();
            let message: Vec<&str> = text
                .lines()
                .map(str::trim)
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                .filter(|l| !l.is_empty())
                .collect();
            let message = message.join(" ");
            eprintln!(
                "supermachine: {} (see --help)",
                message.strip_prefix("error: ").unwrap_or(&message)
            );
            return ExitCode::from(2);
        }
    };
    let result = match cli.command {
        Command::Run(args) => return workload_exit(run_image(&args)),
        Command::Exec(args) => return workload_exit(exec_in_vm(&args)),
        Command::Vmm { dir } => return vmm_process(&dir),
        Command::Ps { all, json } => detached_vms::ps(all, json),
        Command::Logs { follow, name } => detached_vms::logs(&name, follow),
        Command::Stop { time, names } => detached_vms::stop(&names, time),
        Command::Rm { force, names } => detached_vms::rm(&names, force),
        Command::Boot {
            restore: Some(snapshot),
            console_file,
            vsock,
            ..
        } => {
            let mut config = supermachine::RestoreConfig::new(snapshot);
            config.console = match console_file {
                Some(path) => Console::File(path),
                None => Console::Stdout,
            };
            config.forward_stdin = true;
            config.vsock_socket = vsock;
            Machine::restore(config)
                .and_then(Machine::wait)
                .map(|exit| log::info!("guest ended: {exit:?}"))
        }
        Command::Boot {
            kernel: Some(kernel),
            restore: None,
            initrd,
            cmdline,
            append,
            memory,
            cpus,
            console_file,
            disks,
            no_entropy,
            vsock,
            vsock_cid,
        } => {
            let mut config = MachineConfig::new(kernel);
            config.initrd = initrd;
            config.cmdline = match append {
                Some(extra) => format!("{cmdline} {extra}"),
                None => cmdline,
            };
            config.memory_bytes = memory;
            config.vcpus = cpus;
            config.console = match console_file {
                Some(path) => Console::File(path),
                None => Console::Stdout,
            };
            config.forward_stdin = true;
            config.disks = disks;
            config.entropy = !no_entropy;
            config.vsock = vsock.map(|socket| VsockConfig {
                cid: vsock_cid,
                socket,
            });
            Machine::start(config)
                .and_then(Machine::wait)
                .map(|exit| log::info!("guest ended: {exit:?}"))
        }
        Command::Boot { .. } => Err(supermachine::Error::InvalidOption(
            "boot needs --kernel or --restore".into(),
        )),
        Command::Pull {
            image,
            platform,
            insecure_registries,
        } => pull(&image, platform, insecure_registries),
        Command::Load {
            archive,
            tag,
            platform,
        } => load(&archive, tag, platform),
        Command::Images { json } => images(json),
        Command::Rmi { images } => rmi(&images),
        Command::Snapshot(command) => snapshot::main(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("supermachine: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pull(
    image: &str,
    platform: Option<oci::manifest::Platform>,
    insecure_registries: Vec<String>,
) -> supermachine::Result<()> {
    let store = Store::open_default()?;
    let options = PullOptions {
        platform,
        insecure_registries,
        progress: true,
        ..PullOptions::default()
    };
    let record = oci::pull(&store, image, &options)?;
    prepare(&store, &record)?;
    println!("{} {}", record.reference, record.manifest_digest);
    Ok(())
}

fn load(
    archive: &std::path::Path,
    tag: Option<String>,
    platform: Option<oci::manifest::Platform>,
) -> supermachine::Result<()> {
    let store = Store::open_default()?;
    let options = LoadOptions {
        tag,
        platform,
        ..LoadOptions::default()
    };
    for record in oci::load(&store, archive, &options)? {
        prepare(&store, &record)?;
        println!("{} {}", record.reference, record.manifest_digest);
    }
    Ok(())
}

/// Builds the image's root disk now, so the first run does not wait.
/// (Windows builds none yet: the image is stored, and `run` refuses.)
fn prepare(store: &Store, record: &ImageRecord) -> supermachine::Result<()> {
    if cfg!(windows) {
        return Ok(());
    }
    oci::rootfs::build(store, record, oci::Limits::default())?;
    Ok(())
}

fn images(json: bool) -> supermachine::Result<()> {
    let store = Store::open_default()?;
    let records = store.images()?;
    let mut rows = Vec::new();
    for record in &records {
        let disk = oci::rootfs::built_disk(&store, record)?;
        let disk_size = disk
            .as_ref()
            .and_then(|d| std::fs::metadata(d).ok())
            .map(|m| m.len());
        rows.push((record, disk, disk_size));
    }
    if json {
        let list: Vec<serde_json::Value> = rows
            .iter()
            .map(|(r, disk, disk_size)| {
                serde_json::json!({
                    "reference": r.reference,
                    "id": r.manifest_digest,
                    "config": r.config_digest,
                    "platform": r.platform,
                    "size": r.size(),
                    "layers": r.layers.len(),
                    "disk": disk,
                    "disk_size": disk_size,
                    "stored_at": r.stored_at,
                })
            })
            .collect();
        let text = serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".into());
        println!("{text}");
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut table = vec![[
        "IMAGE".to_string(),
        "ID".into(),
        "PLATFORM".into(),
        "SIZE".into(),
        "DISK".into(),
        "STORED".into(),
    ]];
    for (r, _, disk_size) in &rows {
        let id = r.manifest_digest.split_once(':').map_or("", |(_, h)| h);
        table.push([
            r.reference.clone(),
            id.chars().take(12).collect(),
            r.platform.clone(),
            human_size(r.size()),
            disk_size.map_or_else(|| "-".into(), human_size),
            human_age(now.saturating_sub(r.stored_at)),
        ]);
    }
    print_table(&table);
    Ok(())
}

fn rmi(images: &[String]) -> supermachine::Result<()> {
    let store = Store::open_default()?;
    for image in images {
        let reference = oci::normalize(image)?;
        let record = store.remove_image(&reference)?;
        println!("removed {} {}", record.reference, record.manifest_digest);
    }
    snapshot::remove_orphans(&store)
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit < UNITS.len() - 1 {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn human_age(seconds: u64) -> String {
    match seconds {
        0..60 => "just now".into(),
        _ => format!("{} ago", human_duration(seconds)),
    }
}

/// "5 seconds", "3 minutes", "2 hours", "4 days".
pub(crate) fn human_duration(seconds: u64) -> String {
    let (n, unit) = match seconds {
        0..60 => (seconds, "second"),
        60..3600 => (seconds / 60, "minute"),
        3600..86400 => (seconds / 3600, "hour"),
        _ => (seconds / 86400, "day"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

/// Prints rows in columns, the first row being the heading.
pub(crate) fn print_table<const N: usize>(table: &[[String; N]]) {
    let widths: Vec<usize> = (0..N)
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in table {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
