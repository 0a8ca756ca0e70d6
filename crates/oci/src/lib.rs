//! OCI images for supermachine: a verified content store, layers unpacked
//! safely into a root file system tree.
//!
//! - [`store`]: blobs by digest under the user's cache directory, written
//!   to a temporary name and renamed only after verification; one record
//!   per image.
//! - [`unpack`]: layers applied in order (whiteouts, opaque directories,
//!   hardlinks, symlinks, modes, ownership, xattrs) without ever writing
//!   outside the target directory.
//! - [`pull`]: from OCI distribution registries; [`import`]: from
//!   `docker save` archives, OCI layouts and `oci-archive` tarballs.
//! - [`rootfs`]: a stored image as an EROFS disk, cached by digest.
//! - [`spec`]: the image config merged with the user's arguments into the
//!   process to run, as `docker run` does.

pub mod digest;
pub mod import;
pub mod manifest;
pub mod pull;
pub mod rootfs;
pub mod spec;
pub mod store;
pub mod unpack;
mod zstd;

pub use digest::Digest;
pub use import::{LoadOptions, load};
pub use pull::{PullOptions, normalize, pull, pull_async};
pub use spec::{ImageConfig, Overrides, ProcessSpec};
pub use store::{ImageRecord, LayerRecord, Store, StoreLock};
#[cfg(unix)]
pub use unpack::Unpacker;
pub use unpack::{Compression, Fixup, Limits};

/// Errors from pulling, importing, storing and unpacking images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// This host has no implementation of what was asked.
    #[error("{0}")]
    Unsupported(&'static str),
    /// Neither `XDG_CACHE_HOME` nor `HOME` (`LOCALAPPDATA` on Windows)
    /// is set.
    #[error("no cache directory: set XDG_CACHE_HOME, or HOME (LOCALAPPDATA on Windows)")]
    NoCacheDir,
    /// Not a digest this crate accepts.
    #[error("not a valid digest: {0:?}")]
    BadDigest(String),
    /// A blob's content does not have the digest it was fetched by.
    #[error("blob content is {got}, expected {expected}: refusing it")]
    DigestMismatch {
        /// The digest asked for.
        expected: String,
        /// The digest of what arrived.
        got: String,
    },
    /// A blob's length is not the length its descriptor gives.
    #[error("blob {digest} is {got} bytes, expected {expected}: refusing it")]
    SizeMismatch {
        /// The blob.
        digest: String,
        /// The descriptor's size.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// A blob the image needs is not in the store.
    #[error("blob {0} is not in the store")]
    MissingBlob(String),
    /// No image by that reference in the store.
    #[error("no image {0} in the store")]
    NoSuchImage(String),
    /// A manifest, config or archive is malformed or unsupported.
    #[error("{0}")]
    Invalid(String),
    /// The registry refused or failed a request.
    #[error("{0}")]
    Registry(String),
    /// A layer entry was refused or could not be written.
    #[error("layer {layer}: entry {entry:?}: {reason}")]
    Unpack {
        /// The layer (its digest).
        layer: String,
        /// The entry's name as the layer gives it.
        entry: String,
        /// Why.
        reason: String,
    },
}
