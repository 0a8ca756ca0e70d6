//! Writing OCI image layouts (what `skopeo copy oci:` and `docker save`
//! produce): the demo image, the Debian test image, the benchmark image.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::util::run;

/// Where a layer's files come from.
pub enum Layer {
    /// These entries of a directory, owned by root in the layer.
    Dir { root: PathBuf, entries: Vec<String> },
    /// A ready tar archive (mmdebstrap's output, say), used as it is.
    Tar(PathBuf),
}

/// One image to write.
pub struct Image<'a> {
    /// The full reference it is named by (`io.containerd.image.name`).
    pub name: &'a str,
    pub layers: Vec<Layer>,
    /// The config's `config` object (Entrypoint, Cmd, Env, ...).
    pub exec: serde_json::Value,
}

/// Sizes of what was written.
pub struct Written {
    pub unpacked: u64,
    pub packed: u64,
}

/// Writes `image` as an OCI layout at `layout` (created; replaced when
/// it exists), an amd64 image, layers gzip-compressed.
pub fn write(layout: &Path, image: &Image<'_>) -> Result<Written> {
    let blobs = start_layout(layout)?;
    let (manifest, written) = put_image(layout, &blobs, &image.layers, &image.exec, "amd64")?;
    write_index(layout, image.name, manifest)?;
    Ok(written)
}

/// One platform's image in a multi-platform layout.
pub struct PlatformImage {
    /// The OCI architecture (`amd64`, `arm64`).
    pub architecture: &'static str,
    pub layers: Vec<Layer>,
}

/// Writes a multi-platform image as an OCI layout: `index.json` names an
/// image index listing one manifest per platform, each with the same
/// `exec` config, as `docker buildx` pushes a multi-arch image.
pub fn write_multi_platform(
    layout: &Path,
    name: &str,
    exec: &serde_json::Value,
    platforms: &[PlatformImage],
) -> Result<()> {
    let blobs = start_layout(layout)?;
    let mut manifests = Vec::new();
    for platform in platforms {
        let (mut manifest, _) = put_image(
            layout,
            &blobs,
            &platform.layers,
            exec,
            platform.architecture,
        )?;
        manifest["platform"] =
            serde_json::json!({"architecture": platform.architecture, "os": "linux"});
        manifests.push(manifest);
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    })
    .to_string();
    let digest = put(&blobs, index.as_bytes())?;
    write_index(
        layout,
        name,
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest, "size": index.len(),
        }),
    )
}

/// Creates the layout directory (replacing one that exists); returns its
/// blob directory.
fn start_layout(layout: &Path) -> Result<PathBuf> {
    if layout.exists() {
        fs::remove_dir_all(layout)?;
    }
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs)?;
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(blobs)
}

/// Writes one image's layers, config and manifest; returns the manifest's
/// descriptor.
fn put_image(
    layout: &Path,
    blobs: &Path,
    image_layers: &[Layer],
    exec: &serde_json::Value,
    architecture: &str,
) -> Result<(serde_json::Value, Written)> {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    let (mut unpacked, mut packed) = (0, 0);
    for (i, layer) in image_layers.iter().enumerate() {
        let tar = layout.join(format!("layer{i}.tar"));
        match layer {
            Layer::Dir { root, entries } => run(Command::new("tar")
                .args([
                    "--sort=name",
                    "--mtime=@1700000000",
                    "--owner=0",
                    "--group=0",
                    "--numeric-owner",
                    "-C",
                ])
                .arg(root)
                .arg("-cf")
                .arg(&tar)
                .args(entries))?,
            Layer::Tar(path) => {
                fs::copy(path, &tar).with_context(|| format!("copying {}", path.display()))?;
            }
        }
        let (diff_id, size) = sha256_file(&tar)?;
        unpacked += size;
        run(Command::new("gzip").args(["-6", "-n", "-f"]).arg(&tar))?;
        let gz = tar.with_extension("tar.gz");
        let (digest, size) = sha256_file(&gz)?;
        packed += size;
        fs::rename(&gz, blobs.join(hex(&digest)))?;
        diff_ids.push(diff_id);
        layers.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size,
        }));
    }
    let config = serde_json::json!({
        "architecture": architecture, "os": "linux",
        "config": exec,
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
    .to_string();
    let config_digest = put(blobs, config.as_bytes())?;
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": layers,
    })
    .to_string();
    let manifest_digest = put(blobs, manifest.as_bytes())?;
    Ok((
        serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest.len(),
        }),
        Written { unpacked, packed },
    ))
}

/// Writes `index.json`: the one entry `descriptor`, named `name`.
fn write_index(layout: &Path, name: &str, mut descriptor: serde_json::Value) -> Result<()> {
    descriptor["annotations"] = serde_json::json!({
        "io.containerd.image.name": name,
        // The OCI convention: the tag alone (what `skopeo copy oci:DIR:TAG` picks).
        "org.opencontainers.image.ref.name": name.rsplit(':').next(),
    });
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [descriptor]});
    fs::write(layout.join("index.json"), index.to_string())?;
    Ok(())
}

pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut file = fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let size = std::io::copy(&mut file, &mut h)?;
    Ok((format!("sha256:{:x}", h.finalize()), size))
}

fn hex(digest: &str) -> &str {
    digest.strip_prefix("sha256:").unwrap_or(digest)
}

fn put(blobs: &Path, bytes: &[u8]) -> Result<String> {
    let digest = format!("sha256:{:x}", Sha256::digest(bytes));
    fs::write(blobs.join(hex(&digest)), bytes)?;
    Ok(digest)
}
