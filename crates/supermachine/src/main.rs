//! The `supermachine` command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use supermachine::{Console, DEFAULT_CMDLINE, DiskConfig, Machine, VmConfig, VsockConfig};

#[derive(Parser)]
#[command(name = "supermachine", version, about = "Run Linux microVMs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel directly (low level): no image, no agent.
    Boot {
        /// Kernel: an ELF vmlinux or a bzImage.
        #[arg(long)]
        kernel: PathBuf,
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
}

fn parse_size(s: &str) -> Result<u64, String> {
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

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp(None)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Boot {
            kernel,
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
            let mut config = VmConfig::new(kernel);
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
            Machine::start(config).and_then(Machine::wait)
        }
    };
    match result {
        Ok(exit) => {
            log::info!("guest ended: {exit:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("supermachine: {e}");
            ExitCode::FAILURE
        }
    }
}
