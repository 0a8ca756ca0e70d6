//! Manifests and indexes (OCI and Docker schema 2), and choosing the
//! host's platform from an index.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Error;

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Docker schema 2 manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Uncompressed OCI layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// What it points at.
    #[serde(default)]
    pub media_type: String,
    /// Its digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// For index entries: the platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations (`org.opencontainers.image.ref.name`, ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An index entry's platform.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// `amd64`, `arm64`, ...
    pub architecture: String,
    /// `linux`.
    pub os: String,
    /// `v8`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this process runs on, in OCI terms.
    pub fn host() -> Self {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            other => other,
        };
        Self {
            architecture: architecture.into(),
            os: "linux".into(),
            variant: None,
        }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An index or manifest list.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    /// Its media type, when it says.
    #[serde(default)]
    pub media_type: Option<String>,
    /// The manifests it lists.
    pub manifests: Vec<Descriptor>,
}

/// An image manifest.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// Its media type, when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers, bottom first.
    pub layers: Vec<Descriptor>,
}

/// A fetched manifest-or-index document.
#[derive(Debug)]
pub enum Document {
    /// It lists manifests (multi-platform).
    Index(Index),
    /// It is one image.
    Manifest(Manifest),
}

impl Document {
    /// Parses `bytes`, whose media type (from the registry or descriptor)
    /// is `media_type` (may be empty: then the document says).
    pub fn parse(bytes: &[u8], media_type: &str) -> Result<Self, Error> {
        let value: serde_json::Value = serde_json::from_slice(bytes)
            .map_err(|e| Error::Invalid(format!("manifest is not JSON: {e}")))?;
        let declared = value
            .get("mediaType")
            .and_then(|v| v.as_str())
            .unwrap_or(media_type);
        let kind = if media_type.is_empty() {
            declared
        } else {
            media_type
        };
        let is_index = match kind {
            OCI_INDEX | DOCKER_LIST => true,
            OCI_MANIFEST | DOCKER_MANIFEST => false,
            "" => value.get("manifests").is_some(),
            "application/vnd.docker.distribution.manifest.v1+json"
            | "application/vnd.docker.distribution.manifest.v1+prettyjws" => {
                return Err(Error::Invalid(
                    "Docker schema 1 manifests are not supported (push the image again with a current client)".into(),
                ));
            }
            other => {
                return Err(Error::Invalid(format!(
                    "unsupported manifest media type {other}"
                )));
            }
        };
        if is_index {
            serde_json::from_value(value)
                .map(Document::Index)
                .map_err(|e| Error::Invalid(format!("image index: {e}")))
        } else {
            let m: Manifest = serde_json::from_value(value)
                .map_err(|e| Error::Invalid(format!("image manifest: {e}")))?;
            if m.schema_version != 2 {
                return Err(Error::Invalid(format!(
                    "manifest schema version {}",
                    m.schema_version
                )));
            }
            Ok(Document::Manifest(m))
        }
    }
}

impl Index {
    /// The entry for `platform`: same OS and architecture, the same
    /// variant when both name one. Attestation entries (`unknown/unknown`)
    /// never match.
    pub fn select(&self, platform: &Platform) -> Result<&Descriptor, Error> {
        let candidates: Vec<&Descriptor> = self
            .manifests
            .iter()
            .filter(|d| {
                d.platform
                    .as_ref()
                    .is_some_and(|p| p.os == platform.os && p.architecture == platform.architecture)
            })
            .collect();
        let exact = candidates.iter().find(|d| {
            let v = d.platform.as_ref().and_then(|p| p.variant.as_ref());
            v.is_none() || platform.variant.is_none() || v == platform.variant.as_ref()
        });
        exact.or(candidates.first()).copied().ok_or_else(|| {
            let offered: Vec<String> = self
                .manifests
                .iter()
                .filter_map(|d| d.platform.as_ref().map(ToString::to_string))
                .filter(|p| p != "unknown/unknown")
                .collect();
            Error::Invalid(format!(
                "no image for {platform} in the index (it has: {})",
                if offered.is_empty() {
                    "none".to_string()
                } else {
                    offered.join(", ")
                }
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(arch: &str, variant: Option<&str>, digest: char) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: format!("sha256:{}", digest.to_string().repeat(64)),
            size: 1,
            platform: Some(Platform {
                architecture: arch.into(),
                os: if arch == "unknown" {
                    "unknown".into()
                } else {
                    "linux".into()
                },
                variant: variant.map(Into::into),
            }),
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn the_host_platform_is_chosen_from_an_index() {
        let index = Index {
            media_type: Some(OCI_INDEX.into()),
            manifests: vec![
                entry("unknown", None, 'e'),
                entry("arm", Some("v7"), 'a'),
                entry("arm64", Some("v8"), 'b'),
                entry("amd64", None, 'c'),
            ],
        };
        let pick = |arch: &str, variant: Option<&str>| {
            index
                .select(&Platform {
                    architecture: arch.into(),
                    os: "linux".into(),
                    variant: variant.map(Into::into),
                })
                .map(|d| d.digest.chars().last())
        };
        assert_eq!(pick("amd64", None).ok().flatten(), Some('c'));
        assert_eq!(pick("arm64", None).ok().flatten(), Some('b'));
        assert_eq!(pick("arm", Some("v7")).ok().flatten(), Some('a'));
        match pick("s390x", None) {
            Err(Error::Invalid(why)) => {
                assert!(
                    why.contains("linux/arm/v7, linux/arm64/v8, linux/amd64"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn documents_are_told_apart_and_schema_1_is_refused() {
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(Document::parse(index, ""), Ok(Document::Index(_))));
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json",
            "config":{"mediaType":"x","digest":"sha256:00","size":1},"layers":[]}"#;
        assert!(matches!(Document::parse(m, ""), Ok(Document::Manifest(_))));
        assert!(
            Document::parse(
                b"{}",
                "application/vnd.docker.distribution.manifest.v1+prettyjws"
            )
            .is_err()
        );
        assert!(Document::parse(b"not json", OCI_MANIFEST).is_err());
    }
}
