//! An image ready to run: found in the store, pulled, or loaded from a
//! local archive, with its root disk built (once, then cached) and its
//! config turned into the process `docker run` would start.
//!
//! ```no_run
//! use supermachine::{Image, VmConfig};
//! let image = Image::open("demo")?;
//! let vm = image.start(&VmConfig::default())?;
//! let out = vm.exec(["echo", "hello"]).output()?;
//! print!("{}", String::from_utf8_lossy(&out.stdout));
//! vm.stop()?;
//! # Ok::<(), supermachine::Error>(())
//! ```

use std::path::Path;
use std::sync::OnceLock;

use crate::exec::ExecBuilder;
use crate::images::{self, ImageConfig, ImageRecord, Overrides, ProcessSpec, Store};
use crate::{Error, Result, Snapshot, Vm, VmConfig};

/// A stored image.
#[derive(Debug)]
pub struct Image {
    store: Store,
    record: ImageRecord,
    config: ImageConfig,
    rootfs: OnceLock<images::rootfs::RootFs>,
    /// Set by [`Image::from_snapshot`]: `start` restores it.
    snapshot: Option<Snapshot>,
}

impl Image {
    /// The image stored under `name` (`alpine`, a full reference, an
    /// image ID or a unique prefix of one) in the default store.
    pub fn open(name: &str) -> Result<Image> {
        Self::open_in(Store::open_default()?, name)
    }

    /// [`Image::open`] in a given store.
    pub fn open_in(store: Store, name: &str) -> Result<Image> {
        let record =
            find(&store, name)?.ok_or_else(|| images::Error::NoSuchImage(name.to_string()))?;
        Self::from_record(store, record)
    }

    /// Pulls `reference` from its registry into the default store (layers
    /// already stored are not fetched again).
    pub fn pull(reference: &str) -> Result<Image> {
        Self::pull_with(
            Store::open_default()?,
            reference,
            &images::PullOptions::default(),
        )
    }

    /// [`Image::pull`] into a given store, with options.
    pub fn pull_with(
        store: Store,
        reference: &str,
        options: &images::PullOptions,
    ) -> Result<Image> {
        let record = images::pull(&store, reference, options)?;
        Self::from_record(store, record)
    }

    /// Loads the image in a `docker save` archive, an oci-archive tarball
    /// or an OCI layout directory into the default store. An archive that
    /// holds several images is refused: [`images::load`] takes them all.
    pub fn load(path: &Path) -> Result<Image> {
        Self::load_with(
            Store::open_default()?,
            path,
            &images::LoadOptions::default(),
        )
    }

    /// [`Image::load`] into a given store, with options.
    pub fn load_with(store: Store, path: &Path, options: &images::LoadOptions) -> Result<Image> {
        let mut records = images::load(&store, path, options)?;
        if records.len() != 1 {
            return Err(Error::InvalidOption(format!(
                "{} holds {} images; load it and run one by name",
                path.display(),
                records.len()
            )));
        }
        Self::from_record(store, records.remove(0))
    }

    /// The image named `name` in the default store, else pulled; or, when
    /// `name` is a path that exists, loaded from there (what `run` does).
    pub fn resolve(name: &str, pull: &images::PullOptions) -> Result<Image> {
        let store = Store::open_default()?;
        let path = Path::new(name);
        if looks_like_path(name) && path.exists() {
            return Self::load_with(store, path, &images::LoadOptions::default());
        }
        match find(&store, name)? {
            Some(record) => Self::from_record(store, record),
            None if is_id(name) => Err(images::Error::NoSuchImage(name.to_string()).into()),
            None => Self::pull_with(store, name, pull),
        }
    }

    fn from_record(store: Store, record: ImageRecord) -> Result<Image> {
        let digest = images::Digest::parse(&record.config_digest)?;
        let config = ImageConfig::parse(&store.read_small_blob(&digest)?)?;
        Ok(Image {
            store,
            record,
            config,
            rootfs: OnceLock::new(),
            snapshot: None,
        })
    }

    /// The image a snapshot (baked, or taken of one of its VMs) was made
    /// of, in the default store; its [`Image::start`] restores the
    /// snapshot instead of booting.
    pub fn from_snapshot(path: impl AsRef<Path>) -> Result<Image> {
        let snapshot = Snapshot::open(path)?;
        let id = snapshot
            .info()
            .image_id
            .clone()
            .ok_or_else(|| Error::Snapshot {
                path: snapshot.path().to_path_buf(),
                why: "it is not of an image's VM".into(),
            })?;
        let mut image = Self::open(&id)?;
        image.snapshot = Some(snapshot);
        Ok(image)
    }

    /// The store it is in.
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The normalized reference (`docker.io/library/alpine:latest`).
    pub fn reference(&self) -> &str {
        &self.record.reference
    }

    /// The image ID (its manifest's digest).
    pub fn id(&self) -> &str {
        &self.record.manifest_digest
    }

    /// What the store knows of it.
    pub fn record(&self) -> &ImageRecord {
        &self.record
    }

    /// Its config (entrypoint, cmd, env, user, ports, ...).
    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// The root disk, built now unless it is cached.
    pub fn rootfs(&self) -> Result<&images::rootfs::RootFs> {
        if let Some(r) = self.rootfs.get() {
            return Ok(r);
        }
        let built = images::rootfs::build(&self.store, &self.record, images::Limits::default())?;
        Ok(self.rootfs.get_or_init(|| built))
    }

    /// The process `docker run` would start: the image's entrypoint, cmd,
    /// env, working directory and user with `overrides` applied.
    pub fn command(&self, overrides: &Overrides) -> Result<ProcessSpec> {
        let rootfs = self.rootfs()?;
        Ok(ProcessSpec::new(
            &self.config,
            overrides,
            &rootfs.passwd,
            &rootfs.group,
        )?)
    }

    /// Boots a VM of this image and waits until its agent is ready; for
    /// an image from [`Image::from_snapshot`], restores the snapshot.
    pub fn start(&self, config: &VmConfig) -> Result<Vm> {
        match &self.snapshot {
            Some(s) => Vm::restore(s, config),
            None => Vm::start(&self.rootfs()?.disk, config),
        }
    }
}

impl Vm {
    /// An exec of `spec` (from [`Image::command`]): its argv, environment,
    /// working directory and user.
    pub fn exec_spec(&self, spec: &ProcessSpec) -> ExecBuilder<'_> {
        self.exec(spec.args.iter().cloned())
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .cwd(spec.cwd.clone())
            .user_ids(spec.uid, spec.gid, spec.groups.clone())
    }
}

/// A path rather than an image name: `./x`, `/x`, `x.tar`, `dir/`.
fn looks_like_path(name: &str) -> bool {
    name.starts_with(['.', '/'])
        || name.ends_with('/')
        || [".tar", ".tar.gz", ".tgz", ".tar.zst"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

/// An image ID or a prefix of one: `sha256:<hex>` or 12+ hex digits.
fn is_id(name: &str) -> bool {
    let hex = name.strip_prefix("sha256:").unwrap_or(name);
    hex.len() >= 12 && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The record `name` refers to: by ID (or a unique prefix) or reference.
fn find(store: &Store, name: &str) -> Result<Option<ImageRecord>> {
    if is_id(name) {
        let hex = name.strip_prefix("sha256:").unwrap_or(name).to_lowercase();
        let mut matching: Vec<ImageRecord> = store
            .images()?
            .into_iter()
            .filter(|r| {
                r.manifest_digest
                    .strip_prefix("sha256:")
                    .is_some_and(|h| h.starts_with(&hex))
            })
            .collect();
        matching.dedup_by(|a, b| a.manifest_digest == b.manifest_digest);
        return match matching.len() {
            0 => Ok(None),
            1 => Ok(matching.pop()),
            _ => Err(Error::InvalidOption(format!(
                "image ID {name} is ambiguous: it starts {} images",
                matching.len()
            ))),
        };
    }
    Ok(store.image(&images::normalize(name)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_ids_are_told_apart_from_names() {
        for path in [
            "./demo",
            "/srv/img.tar",
            "img.tar.gz",
            "layout/",
            "x.tar.zst",
        ] {
            assert!(looks_like_path(path), "{path}");
        }
        for name in [
            "alpine",
            "demo:latest",
            "localhost:5000/a/b:1",
            "sha256:abc",
        ] {
            assert!(!looks_like_path(name), "{name}");
        }
        assert!(is_id("0123456789ab"));
        assert!(is_id(&format!("sha256:{}", "a".repeat(64))));
        assert!(!is_id("0123456789a"));
        assert!(!is_id("alpine"));
        assert!(!is_id(&"a".repeat(65)));
    }
}
