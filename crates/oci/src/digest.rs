//! Content digests (`sha256:<hex>`, `sha512:<hex>`) and verifying them.

use std::fmt;
use std::io::{self, Write};

use sha2::{Digest as _, Sha256, Sha512};

use crate::Error;

/// A digest algorithm the store verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    /// SHA-256 (what registries use).
    Sha256,
    /// SHA-512 (allowed by the OCI spec).
    Sha512,
}

impl Algorithm {
    fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Sha512 => "sha512",
        }
    }
    fn hex_len(self) -> usize {
        match self {
            Self::Sha256 => 64,
            Self::Sha512 => 128,
        }
    }
}

/// A validated digest: a known algorithm and lowercase hex of the right
/// length. Being validated, it is safe to use as a file name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    /// Parses `algorithm:hex`.
    pub fn parse(text: &str) -> Result<Self, Error> {
        let bad = || Error::BadDigest(text.to_string());
        let (alg, hex) = text.split_once(':').ok_or_else(bad)?;
        let algorithm = match alg {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            _ => return Err(bad()),
        };
        let ok = hex.len() == algorithm.hex_len()
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !ok {
            return Err(bad());
        }
        Ok(Self {
            algorithm,
            hex: hex.to_string(),
        })
    }

    /// The SHA-256 digest of `bytes`.
    pub fn sha256_of(bytes: &[u8]) -> Self {
        Self {
            algorithm: Algorithm::Sha256,
            hex: crate::unpack::hex(&Sha256::digest(bytes)),
        }
    }

    /// The algorithm.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// A hasher for this digest's algorithm.
    pub fn hasher(&self) -> Hasher {
        Hasher::new(self.algorithm)
    }

    /// Where an OCI image layout, and the store, keep this blob:
    /// `blobs/<algorithm>/<hex>`.
    pub fn layout_path(&self) -> String {
        format!("blobs/{}/{}", self.algorithm.name(), self.hex)
    }

    /// Checks that `bytes` are this blob, of `size` bytes when known.
    pub(crate) fn verify_bytes(&self, size: Option<u64>, bytes: &[u8]) -> Result<(), Error> {
        let mut hasher = self.hasher();
        hasher.update(bytes);
        self.verify(size, &hasher.finish(), bytes.len() as u64)
    }

    /// Checks that content of `got_size` bytes whose digest is `got` is
    /// this blob, of `size` bytes when the size is known.
    pub(crate) fn verify(
        &self,
        size: Option<u64>,
        got: &Digest,
        got_size: u64,
    ) -> Result<(), Error> {
        if let Some(size) = size
            && size != got_size
        {
            return Err(Error::SizeMismatch {
                digest: self.to_string(),
                expected: size,
                got: got_size,
            });
        }
        if got != self {
            return Err(Error::DigestMismatch {
                expected: self.to_string(),
                got: got.to_string(),
            });
        }
        Ok(())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

/// Hashes and counts bytes written through it.
#[derive(Clone, Debug)]
pub struct Hasher {
    state: HashState,
    len: u64,
}

#[derive(Clone, Debug)]
enum HashState {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Hasher {
    /// A fresh hasher.
    pub fn new(algorithm: Algorithm) -> Self {
        let state = match algorithm {
            Algorithm::Sha256 => HashState::Sha256(Sha256::new()),
            Algorithm::Sha512 => HashState::Sha512(Sha512::new()),
        };
        Self { state, len: 0 }
    }

    /// Adds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.state {
            HashState::Sha256(h) => h.update(bytes),
            HashState::Sha512(h) => h.update(bytes),
        }
        self.len += bytes.len() as u64;
    }

    /// Bytes so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was hashed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The digest of everything added.
    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self.state {
            HashState::Sha256(h) => (Algorithm::Sha256, crate::unpack::hex(&h.finalize())),
            HashState::Sha512(h) => (Algorithm::Sha512, crate::unpack::hex(&h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

impl Write for Hasher {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_well_formed_digests_parse() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert_eq!(Digest::parse(&good).map(|d| d.to_string()).ok(), Some(good));
        for bad in [
            "sha256:abc",
            "md5:d41d8cd98f00b204e9800998ecf8427e",
            &format!("sha256:{}", "A".repeat(64)),
            &format!("sha256:../{}", "a".repeat(61)),
            "sha256",
            "",
        ] {
            assert!(Digest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hashing_matches_the_known_empty_digest() {
        let h = Hasher::new(Algorithm::Sha256);
        assert_eq!(
            h.finish().to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(Digest::sha256_of(b""), Digest::sha256_of(&[]));
    }
}
