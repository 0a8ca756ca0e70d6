//! `supermachine snapshot create|ls|rm`: baked snapshots of images' VMs,
//! which `run` restores instead of booting.

use std::time::Duration;

use supermachine::images::Store;
use supermachine::{BakeOptions, Error, Image, Result, Snapshot, VmConfig, baked_snapshots};

use crate::{human_age, human_size, parse_size, print_table};

#[derive(clap::Subcommand)]
pub enum SnapshotCommand {
    /// Boot an image, start its command, wait until it is ready, and keep
    /// a snapshot of the VM that `run` then restores in milliseconds.
    Create(Box<CreateArgs>),
    /// List baked snapshots.
    Ls {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove baked snapshots (by name or ID).
    Rm {
        /// Names or IDs.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// A name for `snapshot ls` and `snapshot rm`.
    #[arg(long)]
    name: Option<String>,
    /// Ready when this command (run in the guest through `sh -c`) exits
    /// 0. Default: the command has started and every TCP port the image
    /// exposes accepts connections.
    #[arg(long, value_name = "COMMAND")]
    ready_cmd: Option<String>,
    /// Seconds the workload may take to become ready.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    ready_timeout: u64,
    /// Start nothing: snapshot the VM with just its agent up (`run` uses
    /// it for any command).
    #[arg(long)]
    no_workload: bool,
    /// Set an environment variable of the workload. Repeatable.
    #[arg(short = 'e', long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest RAM, e.g. 512M or 2G.
    #[arg(short = 'm', long, default_value = "512M", value_parser = parse_size)]
    memory: u64,
    /// The guest's network as `run` will give it (the snapshot is found
    /// by these settings; a policy applies per restore).
    #[command(flatten)]
    network: crate::netargs::NetworkArgs,
    /// The image (name or ID; pulled when not stored).
    image: String,
    /// The command, replacing the image's Cmd.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

pub fn main(command: SnapshotCommand) -> Result<()> {
    match command {
        SnapshotCommand::Create(args) => create(&args),
        SnapshotCommand::Ls { json } => list(json),
        SnapshotCommand::Rm { names } => remove(&names),
    }
}

fn create(args: &CreateArgs) -> Result<()> {
    if args.no_workload && (!args.command.is_empty() || !args.env.is_empty()) {
        return Err(Error::InvalidOption(
            "--no-workload starts nothing: it takes no command or -e".into(),
        ));
    }
    if let Some(name) = &args.name {
        check_name(name)?;
    }
    let image = Image::resolve(&args.image, &Default::default())?;
    let options = BakeOptions {
        vm: VmConfig {
            cpus: args.cpus,
            memory_bytes: args.memory,
            network: args.network.network()?,
            ..VmConfig::default()
        },
        start_workload: !args.no_workload,
        overrides: supermachine::images::Overrides {
            args: args.command.clone(),
            env: args.env.clone(),
            ..Default::default()
        },
        ready_cmd: args
            .ready_cmd
            .as_ref()
            .map(|c| vec!["sh".into(), "-c".into(), c.clone()]),
        ready_timeout: Duration::from_secs(args.ready_timeout),
        name: args.name.clone(),
    };
    let snapshot = image.bake(&options)?;
    println!(
        "{} {} ({} on disk, baked in {:.1} s)",
        snapshot.id(),
        image.reference(),
        human_size(snapshot.disk_usage()),
        snapshot.info().bake_ms as f64 / 1e3
    );
    Ok(())
}

/// Names as `run --name` takes them.
fn check_name(name: &str) -> Result<()> {
    let ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !ok {
        return Err(Error::InvalidOption(format!(
            "snapshot name {name:?} must be letters, digits, '_', '.' or '-', starting with a letter or digit"
        )));
    }
    Ok(())
}

fn list(json: bool) -> Result<()> {
    let all = baked_snapshots(&Store::open_default()?)?;
    if json {
        let rows: Vec<serde_json::Value> = all
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id(),
                    "path": s.path(),
                    "disk_usage": s.disk_usage(),
                    "info": s.info(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&rows).unwrap_or_else(|_| "[]".into())
        );
        return Ok(());
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut table = vec![
        [
            "ID", "NAME", "IMAGE", "WORKLOAD", "CPUS", "MEMORY", "SIZE", "CREATED",
        ]
        .map(String::from),
    ];
    for s in &all {
        let i = s.info();
        table.push([
            s.id(),
            i.name.clone().unwrap_or_default(),
            i.image_reference.clone().unwrap_or_default(),
            i.workload
                .as_ref()
                .map_or_else(|| "-".into(), |w| truncate(&w.spec.args.join(" "), 30)),
            i.cpus.to_string(),
            format!("{}M", i.memory_bytes >> 20),
            human_size(s.disk_usage()),
            human_age(now.saturating_sub(i.created)),
        ]);
    }
    print_table(&table);
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let cut: String = s.chars().take(max - 1).collect();
    format!("{cut}…")
}

/// The snapshots `name` means: its name, its ID, or a unique ID prefix.
fn find(all: &[Snapshot], name: &str) -> Result<Vec<Snapshot>> {
    let by_name: Vec<Snapshot> = all
        .iter()
        .filter(|s| s.info().name.as_deref() == Some(name))
        .cloned()
        .collect();
    if !by_name.is_empty() {
        return Ok(by_name);
    }
    let by_id: Vec<Snapshot> = all
        .iter()
        .filter(|s| s.id().starts_with(name))
        .cloned()
        .collect();
    match by_id.len() {
        0 => Err(Error::InvalidOption(format!("no snapshot named {name}"))),
        1 => Ok(by_id),
        n => Err(Error::InvalidOption(format!(
            "snapshot ID {name} is ambiguous: it starts {n} snapshots"
        ))),
    }
}

fn remove(names: &[String]) -> Result<()> {
    let all = baked_snapshots(&Store::open_default()?)?;
    // Every name is checked before anything is removed.
    let mut chosen = Vec::new();
    for name in names {
        chosen.extend(find(&all, name)?);
    }
    for s in chosen {
        let id = s.id();
        if s.path().exists() {
            s.remove()?;
            println!("removed {id}");
        }
    }
    Ok(())
}

/// Removes the baked snapshots of images no longer stored (after `rmi`).
pub fn remove_orphans(store: &Store) -> Result<()> {
    let stored: Vec<String> = store
        .images()?
        .into_iter()
        .map(|r| r.manifest_digest)
        .collect();
    for s in baked_snapshots(store)? {
        if s.info()
            .image_id
            .as_ref()
            .is_some_and(|id| !stored.contains(id))
        {
            s.remove()?;
        }
    }
    Ok(())
}
