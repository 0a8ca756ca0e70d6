//! Pulling from an OCI distribution registry with `oci-client`: the
//! reference normalized as Docker does (`alpine` is
//! `docker.io/library/alpine:latest`), credentials from the Docker config,
//! an index resolved to the host's platform, every blob verified (size and
//! digest) before it is stored, layers fetched concurrently with a
//! progress bar each on a terminal.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use futures_util::{StreamExt, TryStreamExt};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

use crate::Error;
use crate::digest::Digest;
use crate::manifest::{
    DOCKER_LIST, DOCKER_MANIFEST, Descriptor, Document, Manifest, OCI_INDEX, OCI_MANIFEST, Platform,
};
use crate::spec::ImageConfig;
use crate::store::{ImageRecord, LayerRecord, MAX_JSON_BLOB, Store};

/// Layers fetched at once.
const CONCURRENT_LAYERS: usize = 4;

/// How to pull.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// Credentials; `None` looks in the Docker config, else anonymous.
    pub credentials: Option<(String, String)>,
    /// The Docker config file (default: `$DOCKER_CONFIG/config.json`, else
    /// `~/.docker/config.json`). Only `auths` entries are read; credential
    /// helpers are not supported.
    pub docker_config: Option<PathBuf>,
    /// Registries spoken to over plain HTTP besides the loopback ones
    /// (`localhost`, `127.0.0.0/8`, `[::1]`, which Docker also trusts).
    pub insecure_registries: Vec<String>,
    /// Progress bars on stderr (only drawn when it is a terminal).
    pub progress: bool,
    /// The platform to choose from an index (default: the host's).
    pub platform: Option<Platform>,
    /// Where per-registry CA certificates live, as Docker keeps them:
    /// `<dir>/<host[:port]>/ca.crt` (default `/etc/docker/certs.d`). A
    /// registry with one is spoken to over HTTPS trusting it, loopback
    /// ones included.
    pub certs_dir: Option<PathBuf>,
}

/// Docker's directory of per-registry CA certificates.
pub const DOCKER_CERTS_DIR: &str = "/etc/docker/certs.d";

/// Normalizes a user's reference: `alpine` →
/// `docker.io/library/alpine:latest`.
pub fn normalize(reference: &str) -> Result<String, Error> {
    // The full grammar is a large regular expression whose compilation
    // costs tens of milliseconds per process; every `run` normalizes, and
    // the common shapes need none of it.
    if let Some(whole) = normalize_common(reference) {
        return Ok(whole);
    }
    parse_reference(reference).map(|r| r.whole())
}

/// `[DOMAIN/]PATH[:TAG]` in its plain form, normalized as Docker does;
/// `None` for anything else (digests, unusual characters), which the full
/// parser then judges.
fn normalize_common(reference: &str) -> Option<String> {
    let (rest, tag) = match reference.rsplit_once(':') {
        Some((rest, tag)) if !tag.contains('/') => (rest, tag),
        _ => (reference, "latest"),
    };
    let tag_ok = !tag.is_empty()
        && tag.len() <= 128
        && tag.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
        });
    let (domain, path) = match rest.split_once('/') {
        Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => (first, path),
        _ => ("docker.io", rest),
    };
    let domain_ok = domain.split(':').next().is_some_and(|host| {
        !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    }) && domain
        .split_once(':')
        .is_none_or(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()));
    // Path components: lowercase alphanumerics joined by single `.`, `_`,
    // `__` or runs of `-`.
    let component_ok = |c: &str| {
        let b = c.as_bytes();
        !b.is_empty()
            && b[0].is_ascii_lowercase() | b[0].is_ascii_digit()
            && b[b.len() - 1].is_ascii_lowercase() | b[b.len() - 1].is_ascii_digit()
            && b.iter()
                .all(|&x| x.is_ascii_lowercase() || x.is_ascii_digit() || b"._-".contains(&x))
            && !c.contains("..")
            && !c.contains("._")
            && !c.contains("_.")
            && !c.contains("___")
            && !c.contains(".-")
            && !c.contains("-.")
            && !c.contains("_-")
            && !c.contains("-_")
    };
    let path_ok = path.split('/').all(component_ok);
    // Docker's aliases of its own registry are left to the full parser.
    let alias = domain == "index.docker.io" || domain == "registry-1.docker.io";
    if !(tag_ok && domain_ok && path_ok)
        || alias
        || reference.contains('@')
        || reference.len() > 255
    {
        return None;
    }
    let path = if domain == "docker.io" && !path.contains('/') {
        format!("library/{path}")
    } else {
        path.to_string()
    };
    Some(format!("{domain}/{path}:{tag}"))
}

fn parse_reference(reference: &str) -> Result<Reference, Error> {
    reference
        .parse::<Reference>()
        .map_err(|e| Error::Invalid(format!("image reference {reference:?}: {e}")))
}

/// Pulls `reference` into `store` (blocking; see [`pull_async`]).
pub fn pull(store: &Store, reference: &str, options: &PullOptions) -> Result<ImageRecord, Error> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| crate::store::io_error("starting the async runtime".into(), e))?;
    runtime.block_on(pull_async(store, reference, options))
}

/// Pulls `reference` into `store`. Blobs already stored are not fetched
/// again; the image record is written last, so an interrupted pull leaves
/// at most some complete, verified blobs behind.
pub async fn pull_async(
    store: &Store,
    reference: &str,
    options: &PullOptions,
) -> Result<ImageRecord, Error> {
    let image = parse_reference(reference)?;
    let _adding = store.lock_shared()?;
    let registry = image.resolve_registry().to_string();
    let ca = registry_ca(options, &registry)?;
    let mut insecure = options.insecure_registries.clone();
    if is_loopback(&registry) && ca.is_none() {
        insecure.push(registry.clone());
    }
    // The process-wide TLS provider, unless the embedding program chose
    // one already (then this fails harmlessly). Elsewhere TLS is the
    // system's.
    #[cfg(target_os = "linux")]
    let _ = rustls::crypto::ring::default_provider().install_default();
    // `Client::new` would fall back to a default client, which panics
    // where the system has no CA certificates; this says so instead.
    let client = Client::try_from(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(insecure),
        extra_root_certificates: ca.into_iter().collect(),
        ..ClientConfig::default()
    })
    .map_err(|e| {
        Error::Registry(format!(
            "{registry}: cannot set up the HTTPS client: {} (Debian: apt-get install ca-certificates)",
            with_causes(&e)
        ))
    })?;
    let auth = match &options.credentials {
        Some((user, pass)) => RegistryAuth::Basic(user.clone(), pass.clone()),
        None => docker_config_auth(options.docker_config.clone(), image.registry(), &registry)?,
    };
    let registry_error = |what: &str, e: oci_client::errors::OciDistributionError| {
        registry_error(&registry, &image.whole(), what, e)
    };
    let accepted = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST];

    let (bytes, _) = client
        .pull_manifest_raw(&image, &auth, &accepted)
        .await
        .map_err(|e| registry_error("fetching the manifest", e))?;
    check_json_size(bytes.len())?;
    let mut digest = Digest::sha256_of(&bytes);
    if let Some(wanted) = image.digest()
        && Digest::parse(wanted)? != digest
    {
        return Err(Error::DigestMismatch {
            expected: wanted.to_string(),
            got: digest.to_string(),
        });
    }
    store.put_blob(&digest, &bytes)?;
    let platform = options.platform.clone().unwrap_or_else(Platform::host);
    let manifest = match Document::parse(&bytes, "")? {
        Document::Manifest(m) => m,
        Document::Index(index) => {
            let entry = index.select(&platform)?.clone();
            let by_digest = Reference::with_digest(
                image.registry().to_string(),
                image.repository().to_string(),
                entry.digest.clone(),
            );
            let (bytes, _) = client
                .pull_manifest_raw(&by_digest, &auth, &accepted)
                .await
                .map_err(|e| registry_error("fetching the platform's manifest", e))?;
            check_json_size(bytes.len())?;
            digest = Digest::parse(&entry.digest)?;
            store
                .put_blob(&digest, &bytes)
                .map_err(|e| with_size_check(e, &entry, bytes.len()))?;
            match Document::parse(&bytes, &entry.media_type)? {
                Document::Manifest(m) => m,
                Document::Index(_) => {
                    return Err(Error::Invalid(
                        "an index inside an index is not supported".into(),
                    ));
                }
            }
        }
    };

    let bars = Bars::new(options.progress);
    let mut blobs: Vec<&Descriptor> = vec![&manifest.config];
    blobs.extend(&manifest.layers);
    futures_util::stream::iter(blobs.into_iter().map(|desc| {
        let (client, image, bars) = (&client, &image, &bars);
        let registry_error = &registry_error;
        async move {
            let digest = Digest::parse(&desc.digest)?;
            if store.has_blob(&digest, desc.size) {
                return Ok(());
            }
            let bar = bars.add(&desc.digest, desc.size);
            let mut writer = store.blob_writer(&digest, Some(desc.size))?;
            let mut stream = client
                .pull_blob_stream(image, desc.digest.as_str())
                .await
                .map_err(|e| registry_error("fetching a blob", e))?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| {
                    Error::Registry(format!(
                        "{}: fetching blob {}: {}",
                        image.resolve_registry(),
                        desc.digest,
                        with_causes(&e)
                    ))
                })?;
                writer.write_all(&chunk).map_err(|e| {
                    crate::store::io_error(format!("storing blob {}", desc.digest), e)
                })?;
                bar.inc(chunk.len() as u64);
            }
            writer.commit()?;
            bar.finish();
            Ok::<(), Error>(())
        }
    }))
    .buffer_unordered(CONCURRENT_LAYERS)
    .try_collect::<Vec<()>>()
    .await?;

    let record = record_for(store, image.whole(), &digest, &manifest)?;
    store.save_image(&record)?;
    Ok(record)
}

/// Builds the record of a stored manifest: its config read for the
/// platform and the layers' diff_ids.
pub(crate) fn record_for(
    store: &Store,
    reference: String,
    digest: &Digest,
    manifest: &Manifest,
) -> Result<ImageRecord, Error> {
    let config_digest = Digest::parse(&manifest.config.digest)?;
    let config = ImageConfig::parse(&store.read_small_blob(&config_digest)?)?;
    let diff_ids = config.rootfs.map(|r| r.diff_ids).unwrap_or_default();
    if diff_ids.len() != manifest.layers.len() {
        return Err(Error::Invalid(format!(
            "the manifest has {} layers but the config lists {} diff_ids",
            manifest.layers.len(),
            diff_ids.len()
        )));
    }
    for layer in &manifest.layers {
        if crate::unpack::Compression::from_media_type(&layer.media_type).is_none() {
            return Err(Error::Invalid(format!(
                "unsupported layer media type {}",
                layer.media_type
            )));
        }
    }
    let mut platform = format!("{}/{}", config.os, config.architecture);
    if platform == "/" {
        platform = Platform::host().to_string();
    }
    Ok(ImageRecord {
        reference,
        manifest_digest: digest.to_string(),
        config_digest: config_digest.to_string(),
        layers: manifest
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(l, diff_id)| LayerRecord {
                digest: l.digest.clone(),
                size: l.size,
                media_type: l.media_type.clone(),
                diff_id,
            })
            .collect(),
        platform,
        stored_at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    })
}

/// The CA certificate kept for `registry` (`host[:port]`), if any.
fn registry_ca(
    options: &PullOptions,
    registry: &str,
) -> Result<Option<oci_client::client::Certificate>, Error> {
    let dir = options
        .certs_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DOCKER_CERTS_DIR));
    // A registry name is a host and port, never a path; refuse to look
    // further than one directory level for anything else.
    if registry.contains(['/', '\\']) || registry.starts_with('.') {
        return Ok(None);
    }
    let path = dir.join(registry).join("ca.crt");
    match std::fs::read(&path) {
        Ok(data) => Ok(Some(oci_client::client::Certificate {
            encoding: oci_client::client::CertificateEncoding::Pem,
            data,
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::store::io_error(
            format!("reading {}", path.display()),
            e,
        )),
    }
}

fn check_json_size(len: usize) -> Result<(), Error> {
    if len as u64 > MAX_JSON_BLOB {
        return Err(Error::Invalid(format!(
            "manifest of {len} bytes is too large"
        )));
    }
    Ok(())
}

fn with_size_check(e: Error, entry: &Descriptor, len: usize) -> Error {
    if entry.size != len as u64 {
        Error::SizeMismatch {
            digest: entry.digest.clone(),
            expected: entry.size,
            got: len as u64,
        }
    } else {
        e
    }
}

fn is_loopback(registry: &str) -> bool {
    let host = registry
        .rsplit_once(':')
        .filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit()))
        .map_or(registry, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

/// One line for a registry failure, naming the registry and what failed.
fn registry_error(
    registry: &str,
    image: &str,
    what: &str,
    e: oci_client::errors::OciDistributionError,
) -> Error {
    use oci_client::errors::OciDistributionError as E;
    let why = match &e {
        E::AuthenticationFailure(m) => format!("authentication failed: {m}"),
        E::UnauthorizedError { .. } => "unauthorized: wrong or missing credentials".to_string(),
        E::ImageManifestNotFoundError(_) => format!("{image} was not found"),
        E::ServerError { code, message, .. } => format!("the registry answered {code}: {message}"),
        E::RegistryError { envelope, .. } => format!("the registry refused: {envelope}"),
        E::RequestError(r) => with_causes(r),
        other => other.to_string(),
    };
    Error::Registry(format!("{registry}: {what} for {image}: {why}"))
}

/// An error and each error that caused it, on one line.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.ends_with(&cause) {
            text = format!("{text}: {cause}");
        }
        source = s.source();
    }
    text
}

/// Credentials for `registry` from the Docker config, if any.
fn docker_config_auth(
    path: Option<PathBuf>,
    name: &str,
    resolved: &str,
) -> Result<RegistryAuth, Error> {
    let path = path.or_else(|| {
        std::env::var_os("DOCKER_CONFIG")
            .map(|d| PathBuf::from(d).join("config.json"))
            .or_else(|| {
                std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker/config.json"))
            })
    });
    let Some(path) = path else {
        return Ok(RegistryAuth::Anonymous);
    };
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => {
            return Err(crate::store::io_error(
                format!("reading {}", path.display()),
                e,
            ));
        }
    };
    let config: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    let Some(auths) = config.get("auths").and_then(|a| a.as_object()) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let mut keys = vec![name.to_string(), resolved.to_string()];
    for host in [name, resolved] {
        keys.push(format!("https://{host}"));
        keys.push(format!("http://{host}"));
    }
    if name == "docker.io" {
        keys.push("https://index.docker.io/v1/".into());
    }
    let Some(entry) = keys.iter().find_map(|k| auths.get(k)) else {
        return Ok(RegistryAuth::Anonymous);
    };
    if let Some(encoded) = entry.get("auth").and_then(|a| a.as_str()) {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .map_err(|e| Error::Invalid(format!("{}: auth for {name}: {e}", path.display())))?;
        let text = String::from_utf8(decoded).map_err(|_| {
            Error::Invalid(format!("{}: auth for {name} is not UTF-8", path.display()))
        })?;
        let (user, pass) = text.split_once(':').ok_or_else(|| {
            Error::Invalid(format!("{}: auth for {name} has no `:`", path.display()))
        })?;
        return Ok(RegistryAuth::Basic(user.into(), pass.into()));
    }
    match (
        entry.get("username").and_then(|u| u.as_str()),
        entry.get("password").and_then(|p| p.as_str()),
    ) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u.into(), p.into())),
        _ => Ok(RegistryAuth::Anonymous),
    }
}

/// One progress bar per blob, drawn only on a terminal.
struct Bars {
    multi: Option<MultiProgress>,
}

impl Bars {
    fn new(wanted: bool) -> Self {
        let multi = (wanted && std::io::stderr().is_terminal())
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
        Self { multi }
    }

    fn add(&self, digest: &str, size: u64) -> ProgressBar {
        let Some(multi) = &self.multi else {
            return ProgressBar::hidden();
        };
        let bar = multi.add(ProgressBar::new(size));
        let style =
            ProgressStyle::with_template("{prefix} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        let short = digest.split_once(':').map_or(digest, |(_, h)| h);
        bar.set_prefix(short.chars().take(12).collect::<String>());
        bar
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalize_like_docker() {
        assert_eq!(
            normalize("alpine").ok().as_deref(),
            Some("docker.io/library/alpine:latest")
        );
        assert_eq!(
            normalize("127.0.0.1:5000/t/busybox:v1").ok().as_deref(),
            Some("127.0.0.1:5000/t/busybox:v1")
        );
        assert!(normalize("Not A Ref").is_err());
    }

    #[test]
    fn the_fast_path_agrees_with_the_full_grammar() {
        for r in [
            "alpine",
            "alpine:3.20",
            "library/alpine",
            "docker.io/alpine",
            "docker.io/library/alpine:latest",
            "index.docker.io/library/alpine",
            "user/repo_name.x-y:v1.0-rc_2",
            "localhost/demo",
            "localhost:5000/a/b/c:tag",
            "127.0.0.1:5000/t/busybox:v1",
            "ghcr.io/owner/image",
            "registry.example.com:443/team/app:2024.01",
            "a__b/c--d",
            "debian-python:bookworm",
        ] {
            let full = parse_reference(r).map(|x| x.whole()).ok();
            let fast = normalize_common(r);
            assert!(
                fast.is_none() || fast == full,
                "{r}: fast {fast:?} vs full {full:?}"
            );
            assert!(
                fast.is_some() || r.starts_with("index."),
                "{r}: expected the fast path"
            );
        }
        for r in [
            "Not A Ref",
            "UPPER/case",
            "a..b",
            "x:",
            ":tag",
            "a@sha256:00",
            "-a",
            "a-",
            "a//b",
        ] {
            assert_eq!(normalize_common(r), None, "{r}");
        }
        assert!(
            is_loopback("127.0.0.1:5000") && is_loopback("localhost") && !is_loopback("ghcr.io")
        );
    }
}
