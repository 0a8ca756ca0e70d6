//! Reading zstd streams as `zstd -d` does: every frame in turn, skippable
//! frames skipped, each frame's checksum checked. A layer may hold many
//! frames (zstd:chunked layers hold one per file).
//!
//! The decoder is pure Rust (`ruzstd`), so this crate builds for every
//! host without a C compiler. Frames may ask for a window of at most
//! 128 MiB, libzstd's own default limit.

use std::io::{self, BufRead, Read};

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::{BlockDecodingStrategy, FrameDecoder};

/// Decompresses the zstd stream `source` yields.
pub(crate) struct ZstdReader<R> {
    source: R,
    frame: FrameDecoder,
    in_frame: bool,
}

fn invalid(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {what}"))
}

impl<R: BufRead> ZstdReader<R> {
    pub(crate) fn new(source: R) -> Self {
        Self {
            source,
            frame: FrameDecoder::new(),
            in_frame: false,
        }
    }

    /// Starts the next data frame; false at the end of the stream.
    fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            if self.source.fill_buf()?.is_empty() {
                return Ok(false);
            }
            match self.frame.init(&mut self.source) {
                Ok(()) => return Ok(true),
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let length = u64::from(length);
                    let skipped = io::copy(&mut (&mut self.source).take(length), &mut io::sink())?;
                    if skipped != length {
                        return Err(invalid("a skippable frame is cut short"));
                    }
                }
                Err(e) => return Err(invalid(e)),
            }
        }
    }

    /// Checks a finished frame's content checksum, if it carries one.
    fn check_finished_frame(&self) -> io::Result<()> {
        match (
            self.frame.get_checksum_from_data(),
            self.frame.get_calculated_checksum(),
        ) {
            (Some(expected), Some(got)) if expected != got => Err(invalid(format!(
                "frame checksum {got:#010x} does not match the stream's {expected:#010x}"
            ))),
            _ => Ok(()),
        }
    }
}

impl<R: BufRead> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if !self.next_frame()? {
                    return Ok(0);
                }
                self.in_frame = true;
            }
            while self.frame.can_collect() == 0 && !self.frame.is_finished() {
                self.frame
                    .decode_blocks(&mut self.source, BlockDecodingStrategy::UptoBlocks(1))
                    .map_err(invalid)?;
            }
            let n = self.frame.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if self.frame.is_finished() && self.frame.can_collect() == 0 {
                self.check_finished_frame()?;
                self.in_frame = false;
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// Decompressed with this reader, from libzstd's own output.
    fn decode(stream: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        ZstdReader::new(io::BufReader::with_capacity(7, stream)).read_to_end(&mut out)?;
        Ok(out)
    }

    fn data(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect()
    }

    #[test]
    fn libzstd_frames_decode_one_after_another_skipping_skippable_ones() {
        let (a, b) = (data(300_000, 1), data(70_000, 2));
        let mut stream = zstd::encode_all(&a[..], 3).unwrap();
        // A skippable frame (magic 0x184D2A5?, 5 bytes of payload).
        stream.extend_from_slice(&0x184d_2a53u32.to_le_bytes());
        stream.extend_from_slice(&5u32.to_le_bytes());
        stream.extend_from_slice(b"skip!");
        let mut encoder = zstd::Encoder::new(Vec::new(), 19).unwrap();
        encoder.include_checksum(true).unwrap();
        io::Write::write_all(&mut encoder, &b).unwrap();
        stream.extend(encoder.finish().unwrap());
        let mut expected = a.clone();
        expected.extend(&b);
        assert_eq!(decode(&stream).unwrap(), expected);
        assert!(decode(&[]).unwrap().is_empty());
    }

    #[test]
    fn damaged_streams_are_errors_not_short_output() {
        let a = data(100_000, 3);
        let mut encoder = zstd::Encoder::new(Vec::new(), 3).unwrap();
        encoder.include_checksum(true).unwrap();
        io::Write::write_all(&mut encoder, &a).unwrap();
        let good = encoder.finish().unwrap();
        // The checksum (last 4 bytes) altered.
        let mut bad_sum = good.clone();
        let last = bad_sum.len() - 1;
        bad_sum[last] ^= 0xff;
        assert!(
            decode(&bad_sum)
                .unwrap_err()
                .to_string()
                .contains("checksum")
        );
        // Cut short, and not zstd at all.
        assert!(decode(&good[..good.len() / 2]).is_err());
        assert!(decode(b"definitely not zstd").is_err());
        // A skippable frame promising more than there is.
        let mut short_skip = 0x184d_2a50u32.to_le_bytes().to_vec();
        short_skip.extend_from_slice(&100u32.to_le_bytes());
        short_skip.extend_from_slice(b"abc");
        assert!(
            decode(&short_skip)
                .unwrap_err()
                .to_string()
                .contains("cut short")
        );
    }
}
