//! Importing local images: `docker save` archives, OCI image layout
//! directories and `oci-archive` tarballs, each archive optionally gzip or
//! zstd compressed (as `docker load` accepts).
//!
//! An archive is read once, front to back: every regular file goes to a
//! numbered temporary file in the store (so no name from the archive ever
//! becomes a host path) while its SHA-256 is computed. Blobs are then
//! checked against the digests that name them and moved into the store by
//! rename. Everything is checked before any image record is written; a
//! load that fails removes the blobs it added.
//!
//! Names: a `docker save` archive names its images in `RepoTags`; an OCI
//! layout in the `io.containerd.image.name` annotation (Docker, containerd)
//! or a full reference in `org.opencontainers.image.ref.name`. A bare tag
//! (`latest`) or no name at all needs `LoadOptions::tag`.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};

use crate::Error;
use crate::digest::{Algorithm, Digest, Hasher};
use crate::manifest::{
    Descriptor, Document, Manifest, OCI_CONFIG, OCI_INDEX, OCI_LAYER_TAR, OCI_MANIFEST, Platform,
};
use crate::pull::{normalize, record_for};
use crate::spec::ImageConfig;
use crate::store::{ImageRecord, MAX_JSON_BLOB, Store, io_error};
use crate::unpack::{Compression, Limits};

/// How to load.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Name the (single) image in the archive this, instead of the names
    /// the archive gives.
    pub tag: Option<String>,
    /// The platform to choose from a multi-platform index (default: the
    /// host's).
    pub platform: Option<Platform>,
    /// Bounds on what an archive may expand to (its files' total bytes and
    /// count).
    pub limits: Limits,
}

/// Loads every image in the archive or layout directory at `path` into
/// `store`, returning their records.
pub fn load(store: &Store, path: &Path, options: &LoadOptions) -> Result<Vec<ImageRecord>, Error> {
    let mut added = Vec::new();
    let result = {
        let _adding = store.lock_shared()?;
        load_locked(store, path, options, &mut added)
    };
    // A failed load takes back the blobs it added, once no other process
    // is adding (the shared lock is released first).
    if result.is_err() && !added.is_empty() {
        let _ = store.remove_unreferenced(&added);
    }
    result
}

fn load_locked(
    store: &Store,
    path: &Path,
    options: &LoadOptions,
    added: &mut Vec<Digest>,
) -> Result<Vec<ImageRecord>, Error> {
    let label = path.display().to_string();
    let meta = fs::metadata(path).map_err(|e| io_error(format!("opening {label}"), e))?;
    let source = if meta.is_dir() {
        Source::directory(path)?
    } else {
        Source::extract(store, path, options.limits)?
    };
    let images = if source.contains("oci-layout") && source.contains("index.json") {
        source.oci_layout(options)?
    } else if source.contains("manifest.json") {
        source.docker_save()?
    } else {
        return Err(Error::Invalid(format!(
            "{label}: not a docker save archive, OCI image layout or oci-archive (it has no manifest.json, nor oci-layout and index.json)"
        )));
    };
    let images = name_images(&label, images, options.tag.as_deref())?;
    store_images(store, &source, &images, added)
}

/// One image found in the source, checked but not yet stored.
struct Found {
    /// Its names, before normalizing.
    names: Vec<String>,
    /// Why it has none, for the error asking for `--tag`.
    unnamed_because: String,
    manifest_bytes: Vec<u8>,
    manifest_digest: Digest,
    manifest: Manifest,
    /// Where each blob (config, then layers) is in the source.
    blobs: Vec<(String, Descriptor)>,
}

fn name_images(
    label: &str,
    mut images: Vec<Found>,
    tag: Option<&str>,
) -> Result<Vec<Found>, Error> {
    if images.is_empty() {
        return Err(Error::Invalid(format!("{label}: holds no image")));
    }
    if let Some(tag) = tag {
        if images.len() > 1 {
            return Err(Error::Invalid(format!(
                "{label}: holds {} images; --tag can name only one",
                images.len()
            )));
        }
        images[0].names = vec![tag.to_string()];
    }
    for image in &mut images {
        if image.names.is_empty() {
            return Err(Error::Invalid(format!(
                "{label}: image {} {}; name it with --tag NAME",
                image.manifest_digest, image.unnamed_because
            )));
        }
        image.names = image
            .names
            .iter()
            .map(|n| normalize(n))
            .collect::<Result<_, _>>()?;
    }
    Ok(images)
}

fn store_images(
    store: &Store,
    source: &Source,
    images: &[Found],
    added: &mut Vec<Digest>,
) -> Result<Vec<ImageRecord>, Error> {
    for image in images {
        for (name, desc) in &image.blobs {
            let digest = Digest::parse(&desc.digest)?;
            if !store.has_blob(&digest, desc.size) {
                source.store_blob(store, name, &digest, desc.size)?;
                added.push(digest);
            }
        }
        if !store.has_blob(&image.manifest_digest, image.manifest_bytes.len() as u64) {
            store.put_blob(&image.manifest_digest, &image.manifest_bytes)?;
            added.push(image.manifest_digest.clone());
        }
    }
    let mut records = Vec::new();
    for image in images {
        for name in &image.names {
            records.push(record_for(
                store,
                name.clone(),
                &image.manifest_digest,
                &image.manifest,
            )?);
        }
    }
    for record in &records {
        store.save_image(record)?;
    }
    Ok(records)
}

/// Where an image's files come from.
struct Source {
    label: String,
    kind: SourceKind,
}

enum SourceKind {
    /// A directory of the user's: read in place, copied into the store.
    Directory(PathBuf),
    /// An archive read into the store's temporary space.
    Extracted {
        files: HashMap<String, Extracted>,
        links: HashMap<String, String>,
        _dir: tempfile::TempDir,
    },
}

/// One regular file of an archive.
struct Extracted {
    path: PathBuf,
    sha256: Digest,
    size: u64,
}

/// Symlinks followed inside an archive before giving up.
const MAX_LINKS: usize = 8;

impl Source {
    fn directory(path: &Path) -> Result<Self, Error> {
        let root = path
            .canonicalize()
            .map_err(|e| io_error(format!("opening {}", path.display()), e))?;
        Ok(Self {
            label: path.display().to_string(),
            kind: SourceKind::Directory(root),
        })
    }

    fn extract(store: &Store, path: &Path, limits: Limits) -> Result<Self, Error> {
        let label = path.display().to_string();
        let file = File::open(path).map_err(|e| io_error(format!("opening {label}"), e))?;
        let mut input = BufReader::with_capacity(1 << 20, file);
        let magic = input
            .fill_buf()
            .map_err(|e| io_error(format!("reading {label}"), e))?
            .to_vec();
        let reader: Box<dyn Read> = match magic.as_slice() {
            [0x1f, 0x8b, ..] => Box::new(flate2::bufread::MultiGzDecoder::new(input)),
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Box::new(crate::zstd::ZstdReader::new(input)),
            [0xfd, b'7', b'z', b'X', b'Z', 0, ..] | [b'B', b'Z', b'h', ..] => {
                return Err(Error::Invalid(format!(
                    "{label}: xz and bzip2 compressed archives are not supported; decompress it first"
                )));
            }
            _ => Box::new(input),
        };
        let dir = store.temp_dir()?;
        let not_tar =
            |e: io::Error| Error::Invalid(format!("{label}: not a readable tar archive: {e}"));
        let mut files = HashMap::new();
        let mut links = HashMap::new();
        let (mut total, mut count) = (0u64, 0u64);
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(not_tar)? {
            let mut entry = entry.map_err(not_tar)?;
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let kind = entry.header().entry_type();
            if !(kind.is_file() || kind.is_symlink()) {
                continue;
            }
            let name = clean(&raw).ok_or_else(|| {
                Error::Invalid(format!("{label}: entry {raw:?} points outside the archive"))
            })?;
            if kind.is_symlink() {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                links.insert(name, target);
                continue;
            }
            count += 1;
            if count > limits.max_entries {
                return Err(Error::Invalid(format!(
                    "{label}: more than {} files",
                    limits.max_entries
                )));
            }
            let dest = dir.path().join(count.to_string());
            let mut out = File::create(&dest)
                .map_err(|e| io_error(format!("writing {}", dest.display()), e))?;
            let mut hasher = Hasher::new(Algorithm::Sha256);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = entry.read(&mut buf).map_err(not_tar)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > limits.max_bytes {
                    return Err(Error::Invalid(format!(
                        "{label}: expands past {} bytes",
                        limits.max_bytes
                    )));
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n])
                    .map_err(|e| io_error(format!("writing {}", dest.display()), e))?;
            }
            let size = hasher.len();
            files.insert(
                name,
                Extracted {
                    path: dest,
                    sha256: hasher.finish(),
                    size,
                },
            );
        }
        Ok(Self {
            label,
            kind: SourceKind::Extracted {
                files,
                links,
                _dir: dir,
            },
        })
    }

    fn contains(&self, name: &str) -> bool {
        match &self.kind {
            SourceKind::Directory(root) => root.join(name).is_file(),
            SourceKind::Extracted { .. } => self.extracted(name).is_ok(),
        }
    }

    /// The archive file `name`, following symlinks within the archive.
    fn extracted(&self, name: &str) -> Result<&Extracted, Error> {
        let SourceKind::Extracted { files, links, .. } = &self.kind else {
            return Err(Error::Invalid("not an archive".into()));
        };
        let missing = || Error::Invalid(format!("{}: has no file {name:?}", self.label));
        let mut current = clean(name).ok_or_else(missing)?;
        for _ in 0..=MAX_LINKS {
            if let Some(file) = files.get(&current) {
                return Ok(file);
            }
            let target = links.get(&current).ok_or_else(missing)?;
            let base = if target.starts_with('/') {
                String::new()
            } else {
                current.rsplit_once('/').map_or("", |(d, _)| d).to_string()
            };
            current = clean(&format!("{base}/{target}")).ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: {name:?} links outside the archive",
                    self.label
                ))
            })?;
        }
        Err(Error::Invalid(format!(
            "{}: {name:?}: too many levels of symbolic links",
            self.label
        )))
    }

    /// A file of the user's directory, refusing names and symlinks that
    /// lead out of it.
    fn in_directory(&self, root: &Path, name: &str) -> Result<PathBuf, Error> {
        let outside = || Error::Invalid(format!("{}: {name:?} is outside the layout", self.label));
        let relative = clean(name).ok_or_else(outside)?;
        let path = root
            .join(relative)
            .canonicalize()
            .map_err(|e| io_error(format!("{}: opening {name}", self.label), e))?;
        if !path.starts_with(root) {
            return Err(outside());
        }
        Ok(path)
    }

    fn open(&self, name: &str) -> Result<(File, u64), Error> {
        let path = match &self.kind {
            SourceKind::Directory(root) => self.in_directory(root, name)?,
            SourceKind::Extracted { .. } => self.extracted(name)?.path.clone(),
        };
        let file = File::open(&path)
            .map_err(|e| io_error(format!("{}: opening {name}", self.label), e))?;
        let len = file
            .metadata()
            .map_err(|e| io_error(format!("{}: opening {name}", self.label), e))?
            .len();
        Ok((file, len))
    }

    /// A manifest, index or config, at most [`MAX_JSON_BLOB`] bytes.
    fn read_small(&self, name: &str) -> Result<Vec<u8>, Error> {
        let (file, len) = self.open(name)?;
        if len > MAX_JSON_BLOB {
            return Err(Error::Invalid(format!(
                "{}: {name} is larger than {MAX_JSON_BLOB} bytes",
                self.label
            )));
        }
        let mut bytes = Vec::new();
        file.take(MAX_JSON_BLOB)
            .read_to_end(&mut bytes)
            .map_err(|e| io_error(format!("{}: reading {name}", self.label), e))?;
        Ok(bytes)
    }

    /// A small blob named by its descriptor, verified.
    fn read_blob(&self, desc: &Descriptor) -> Result<(Digest, Vec<u8>), Error> {
        let digest = Digest::parse(&desc.digest)?;
        let bytes = self.read_small(&digest.layout_path())?;
        digest.verify_bytes(Some(desc.size), &bytes)?;
        Ok((digest, bytes))
    }

    /// The SHA-256 digest and size of the file `name`.
    fn sha256(&self, name: &str) -> Result<(Digest, u64), Error> {
        if let SourceKind::Extracted { .. } = &self.kind {
            let file = self.extracted(name)?;
            return Ok((file.sha256.clone(), file.size));
        }
        let (mut file, _) = self.open(name)?;
        let mut hasher = Hasher::new(Algorithm::Sha256);
        io::copy(&mut file, &mut hasher)
            .map_err(|e| io_error(format!("{}: reading {name}", self.label), e))?;
        let size = hasher.len();
        Ok((hasher.finish(), size))
    }

    /// The first bytes of `name`, to tell how a layer is compressed.
    fn magic(&self, name: &str) -> Result<Vec<u8>, Error> {
        let (file, _) = self.open(name)?;
        let mut magic = Vec::new();
        file.take(8)
            .read_to_end(&mut magic)
            .map_err(|e| io_error(format!("{}: reading {name}", self.label), e))?;
        Ok(magic)
    }

    /// Stores the file `name` as the blob `digest` of `size` bytes, or
    /// refuses it if it is not exactly that.
    fn store_blob(
        &self,
        store: &Store,
        name: &str,
        digest: &Digest,
        size: u64,
    ) -> Result<(), Error> {
        let in_source = |e: Error| match e {
            Error::DigestMismatch { expected, got } => Error::Invalid(format!(
                "{}: {name} is {got}, not the {expected} that names it: refusing it",
                self.label
            )),
            Error::SizeMismatch { expected, got, .. } => Error::Invalid(format!(
                "{}: {name} is {got} bytes, not the {expected} its descriptor gives: refusing it",
                self.label
            )),
            other => other,
        };
        if let SourceKind::Extracted { .. } = &self.kind {
            let file = self.extracted(name)?;
            if digest.algorithm() == Algorithm::Sha256 {
                digest
                    .verify(Some(size), &file.sha256, file.size)
                    .map_err(in_source)?;
                // Already hashed, and on the store's file system: move it.
                return store.adopt(&file.path, digest);
            }
        }
        let (mut file, _) = self.open(name)?;
        let mut writer = store.blob_writer(digest, Some(size))?;
        io::copy(&mut file, &mut writer)
            .map_err(|e| io_error(format!("{}: storing {name}", self.label), e))?;
        writer.commit().map_err(in_source)
    }

    fn oci_layout(&self, options: &LoadOptions) -> Result<Vec<Found>, Error> {
        let layout: serde_json::Value = serde_json::from_slice(&self.read_small("oci-layout")?)
            .map_err(|e| Error::Invalid(format!("{}: oci-layout: {e}", self.label)))?;
        let version = layout
            .get("imageLayoutVersion")
            .and_then(|v| v.as_str())
            .unwrap_or("");
        if !version.starts_with("1.") {
            return Err(Error::Invalid(format!(
                "{}: image layout version {version:?} is not supported",
                self.label
            )));
        }
        let index = match Document::parse(&self.read_small("index.json")?, OCI_INDEX)
            .map_err(|e| Error::Invalid(format!("{}: index.json: {e}", self.label)))?
        {
            Document::Index(index) => index,
            Document::Manifest(_) => {
                return Err(Error::Invalid(format!(
                    "{}: index.json is not an index",
                    self.label
                )));
            }
        };
        let platform = options.platform.clone().unwrap_or_else(Platform::host);
        let mut found = Vec::new();
        for entry in &index.manifests {
            let (mut digest, mut bytes) = self.read_blob(entry)?;
            let mut document = Document::parse(&bytes, &entry.media_type)?;
            if let Document::Index(inner) = &document {
                let chosen = inner.select(&platform)?.clone();
                (digest, bytes) = self.read_blob(&chosen)?;
                document = Document::parse(&bytes, &chosen.media_type)?;
            }
            let Document::Manifest(manifest) = document else {
                return Err(Error::Invalid(format!(
                    "{}: an index inside an index inside index.json is not supported",
                    self.label
                )));
            };
            let (names, unnamed_because) = oci_names(entry);
            let mut blobs = vec![manifest.config.clone()];
            blobs.extend(manifest.layers.iter().cloned());
            let blobs = blobs
                .into_iter()
                .map(|d| Ok((Digest::parse(&d.digest)?.layout_path(), d)))
                .collect::<Result<_, Error>>()?;
            found.push(Found {
                names,
                unnamed_because,
                manifest_bytes: bytes,
                manifest_digest: digest,
                manifest,
                blobs,
            });
        }
        Ok(found)
    }

    fn docker_save(&self) -> Result<Vec<Found>, Error> {
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Entry {
            config: String,
            #[serde(default)]
            repo_tags: Option<Vec<String>>,
            layers: Vec<String>,
        }
        let entries: Vec<Entry> = serde_json::from_slice(&self.read_small("manifest.json")?)
            .map_err(|e| Error::Invalid(format!("{}: manifest.json: {e}", self.label)))?;
        let mut found = Vec::new();
        for entry in entries {
            let config_bytes = self.read_small(&entry.config)?;
            let config_digest = Digest::sha256_of(&config_bytes);
            let config = ImageConfig::parse(&config_bytes)?;
            let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
            if diff_ids.len() != entry.layers.len() {
                return Err(Error::Invalid(format!(
                    "{}: {} lists {} layers but its config has {} diff_ids",
                    self.label,
                    entry.config,
                    entry.layers.len(),
                    diff_ids.len()
                )));
            }
            let mut blobs = vec![(
                entry.config.clone(),
                Descriptor {
                    media_type: OCI_CONFIG.into(),
                    digest: config_digest.to_string(),
                    size: config_bytes.len() as u64,
                    platform: None,
                    annotations: Default::default(),
                },
            )];
            for (name, diff_id) in entry.layers.iter().zip(&diff_ids) {
                let (digest, size) = self.sha256(name)?;
                let compression = Compression::sniff(&self.magic(name)?);
                if compression == Compression::None && digest.to_string() != *diff_id {
                    return Err(Error::Invalid(format!(
                        "{}: layer {name} is {digest}, not the {diff_id} its config lists: refusing it",
                        self.label
                    )));
                }
                let media_type = match compression {
                    Compression::None => OCI_LAYER_TAR.to_string(),
                    Compression::Gzip => format!("{OCI_LAYER_TAR}+gzip"),
                    Compression::Zstd => format!("{OCI_LAYER_TAR}+zstd"),
                };
                blobs.push((
                    name.clone(),
                    Descriptor {
                        media_type,
                        digest: digest.to_string(),
                        size,
                        platform: None,
                        annotations: Default::default(),
                    },
                ));
            }
            let manifest = Manifest {
                schema_version: 2,
                media_type: Some(OCI_MANIFEST.into()),
                config: blobs[0].1.clone(),
                layers: blobs[1..].iter().map(|(_, d)| d.clone()).collect(),
            };
            let manifest_bytes = serde_json::to_vec(&manifest)
                .map_err(|e| Error::Invalid(format!("encoding a manifest: {e}")))?;
            found.push(Found {
                names: entry.repo_tags.unwrap_or_default(),
                unnamed_because: "has no RepoTags".into(),
                manifest_digest: Digest::sha256_of(&manifest_bytes),
                manifest_bytes,
                manifest,
                blobs,
            });
        }
        Ok(found)
    }
}

/// An index entry's names, or why it has none.
fn oci_names(entry: &Descriptor) -> (Vec<String>, String) {
    if let Some(name) = entry.annotations.get("io.containerd.image.name") {
        return (vec![name.clone()], String::new());
    }
    match entry.annotations.get("org.opencontainers.image.ref.name") {
        // A full reference, as skopeo and Docker write it.
        Some(name) if name.contains(['/', ':', '@']) => (vec![name.clone()], String::new()),
        Some(tag) => (Vec::new(), format!("is named only by the tag {tag:?}")),
        None => (Vec::new(), "has no name".into()),
    }
}

/// `name` as a plain relative path (`a/b`), resolving `.` and `..`
/// lexically; `None` when it climbs above the top. Leading `/` counts as
/// the top.
fn clean(name: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for component in Path::new(name).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_str()?),
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::CurDir | Component::RootDir => {}
            Component::Prefix(_) => return None,
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside() {
        assert_eq!(clean("./a/./b").as_deref(), Some("a/b"));
        assert_eq!(clean("a/../b").as_deref(), Some("b"));
        assert_eq!(clean("/blobs/x").as_deref(), Some("blobs/x"));
        assert_eq!(clean("../etc/passwd"), None);
        assert_eq!(clean("a/../../x"), None);
        assert_eq!(clean("."), None);
    }
}
