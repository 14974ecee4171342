//! Chunk geometry (which chunks a byte range touches) and the stored chunk
//! encoding (raw or zstd), with the corruption checks on the way back.

use std::io;
use std::path::PathBuf;

use longwire_core::VolumeError;

/// `chunks.codec`: the BLOB is the chunk's bytes as they are.
pub(super) const CODEC_RAW: i64 = 0;
/// `chunks.codec`: the BLOB is one zstd frame that decodes to the chunk.
pub(super) const CODEC_ZSTD: i64 = 1;

/// zstd level for chunks. Level 1 compresses block-device data (file
/// systems, logs, zero-padded structures) almost as well as the default 3 at
/// roughly twice the speed, and the writer thread compresses serially.
const ZSTD_LEVEL: i32 = 1;

/// How new chunks of a volume are stored. Chunks carry their own codec, so
/// reading never depends on this setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Chunks are stored as they are.
    #[default]
    None,
    /// Each chunk is compressed with zstd; chunks that do not shrink by at
    /// least 1/16 are stored raw.
    Zstd,
}

impl Compression {
    /// The spelling used in URIs and in the `volumes.compression` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
        }
    }

    /// Parse `none` or `zstd` (case-insensitive).
    pub fn parse(s: &str) -> Option<Compression> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Some(Compression::None),
            "zstd" => Some(Compression::Zstd),
            _ => None,
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fixed facts of one open volume, shared by every request on it.
#[derive(Debug)]
pub(super) struct VolInfo {
    /// `volumes.id`, the key of its rows in `chunks`.
    pub id: i64,
    pub name: String,
    /// The database file, for error messages.
    pub db_path: PathBuf,
    pub size: u64,
    /// Chunk size in bytes (a power of two).
    pub chunk: u64,
    pub compression: Compression,
}

impl VolInfo {
    /// Bytes of chunk `index` that lie inside the volume: the chunk size,
    /// except for a last chunk cut short by the end of the volume. Stored
    /// chunks are always a whole chunk long; the part past the end is zero.
    pub fn logical_len(&self, index: u64) -> u64 {
        let start = index * self.chunk;
        self.chunk.min(self.size.saturating_sub(start))
    }

    /// An EIO error about chunk `index` that says which volume, database,
    /// chunk and byte range are affected.
    pub fn chunk_error(&self, index: u64, what: impl std::fmt::Display) -> VolumeError {
        let start = index * self.chunk;
        VolumeError::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "sqlite volume {:?} in {}: chunk {index} (bytes {start}..{}) is corrupt: {what}",
                self.name,
                self.db_path.display(),
                start + self.chunk
            ),
        ))
    }
}

/// The part of one chunk that a byte range touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Piece {
    /// Chunk index.
    pub index: u64,
    /// Offset of the first byte inside the chunk.
    pub start: usize,
    pub len: usize,
}

/// Split `[offset, offset + len)` into per-chunk pieces, in order. The
/// caller has checked that the range lies inside the volume.
pub(super) fn pieces(chunk: u64, offset: u64, len: u64) -> impl Iterator<Item = Piece> {
    let end = offset + len;
    let mut pos = offset;
    std::iter::from_fn(move || {
        if pos >= end {
            return None;
        }
        let start = pos % chunk;
        let n = (chunk - start).min(end - pos);
        let piece = Piece {
            index: pos / chunk,
            start: start as usize,
            len: n as usize,
        };
        pos += n;
        Some(piece)
    })
}

/// True when every byte is zero. Written so the compiler vectorizes it.
pub(super) fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    blocks.all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

/// Turns chunk contents into what is stored. One per writer thread; keeps
/// the zstd context and output buffer between chunks.
pub(super) struct Encoder {
    cctx: Option<zstd::bulk::Compressor<'static>>,
    buf: Vec<u8>,
}

impl Encoder {
    pub fn new() -> Encoder {
        Encoder {
            cctx: None,
            buf: Vec::new(),
        }
    }

    /// The codec and bytes to store for `data` (one whole chunk).
    pub fn encode<'a>(&'a mut self, data: &'a [u8], compression: Compression) -> (i64, &'a [u8]) {
        if compression == Compression::Zstd {
            // Worth it only if it saves at least 1/16; compressing into a
            // buffer that small makes zstd give up on incompressible data.
            let limit = data.len() - data.len() / 16;
            if self.buf.len() < limit {
                self.buf.resize(limit, 0);
            }
            if self.cctx.is_none() {
                self.cctx = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
            }
            if let Some(cctx) = self.cctx.as_mut() {
                if let Ok(n) = cctx.compress_to_buffer(data, &mut self.buf[..limit]) {
                    return (CODEC_ZSTD, &self.buf[..n]);
                }
            }
        }
        (CODEC_RAW, data)
    }
}

/// Turns stored chunks back into bytes, refusing anything that does not
/// decode to exactly one chunk.
pub(super) struct Decoder {
    dctx: Option<zstd::bulk::Decompressor<'static>>,
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder { dctx: None }
    }

    /// Decode chunk `index` (`codec`, `blob`) into `out`, which is exactly
    /// one chunk long.
    pub fn decode(
        &mut self,
        vol: &VolInfo,
        index: u64,
        codec: i64,
        blob: &[u8],
        out: &mut [u8],
    ) -> Result<(), VolumeError> {
        match codec {
            CODEC_RAW => {
                check_raw_len(vol, index, blob)?;
                out.copy_from_slice(blob);
                Ok(())
            }
            CODEC_ZSTD => {
                if self.dctx.is_none() {
                    let d = zstd::bulk::Decompressor::new()
                        .map_err(|e| VolumeError::Io(io::Error::other(format!("zstd: {e}"))))?;
                    self.dctx = Some(d);
                }
                let dctx = self.dctx.as_mut().expect("set above");
                match dctx.decompress_to_buffer(blob, out) {
                    Ok(n) if n == out.len() => Ok(()),
                    Ok(n) => Err(vol.chunk_error(
                        index,
                        format_args!("zstd data decodes to {n} bytes, expected {}", out.len()),
                    )),
                    Err(e) => Err(vol.chunk_error(
                        index,
                        format_args!("zstd data does not decode to {} bytes: {e}", out.len()),
                    )),
                }
            }
            other => Err(vol.chunk_error(index, format_args!("unknown codec {other}"))),
        }
    }

    /// The bytes of piece `p` of chunk `p.index`, stored as (`codec`,
    /// `blob`). Raw chunks are sliced in place; compressed ones are decoded
    /// into `scratch` (resized to one chunk) first.
    pub fn piece<'a>(
        &mut self,
        vol: &VolInfo,
        p: Piece,
        codec: i64,
        blob: &'a [u8],
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], VolumeError> {
        if codec == CODEC_RAW {
            check_raw_len(vol, p.index, blob)?;
            return Ok(&blob[p.start..p.start + p.len]);
        }
        scratch.resize(vol.chunk as usize, 0);
        self.decode(vol, p.index, codec, blob, scratch)?;
        Ok(&scratch[p.start..p.start + p.len])
    }
}

fn check_raw_len(vol: &VolInfo, index: u64, blob: &[u8]) -> Result<(), VolumeError> {
    if blob.len() as u64 != vol.chunk {
        return Err(vol.chunk_error(
            index,
            format_args!(
                "raw chunk holds {} bytes, expected {}",
                blob.len(),
                vol.chunk
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(chunk: u64) -> VolInfo {
        VolInfo {
            id: 1,
            name: "v".into(),
            db_path: "db".into(),
            size: 10 * chunk + 100,
            chunk,
            compression: Compression::Zstd,
        }
    }

    #[test]
    fn pieces_split_at_chunk_boundaries() {
        let p: Vec<Piece> = pieces(4096, 4000, 5000).collect();
        assert_eq!(
            p,
            vec![
                Piece {
                    index: 0,
                    start: 4000,
                    len: 96
                },
                Piece {
                    index: 1,
                    start: 0,
                    len: 4096
                },
                Piece {
                    index: 2,
                    start: 0,
                    len: 808
                },
            ]
        );
        assert_eq!(pieces(4096, 7, 0).count(), 0);
        let v = vol(4096);
        assert_eq!(v.logical_len(9), 4096);
        assert_eq!(v.logical_len(10), 100);
    }

    #[test]
    fn zero_detection() {
        for n in [0, 1, 63, 64, 65, 4096, 4097] {
            let mut b = vec![0u8; n];
            assert!(is_zero(&b));
            if n > 0 {
                b[n - 1] = 1;
                assert!(!is_zero(&b), "{n}");
                b[n - 1] = 0;
                b[0] = 0x80;
                assert!(!is_zero(&b), "{n}");
            }
        }
    }

    #[test]
    fn codec_round_trip_and_corruption() {
        let v = vol(4096);
        let mut enc = Encoder::new();
        let mut dec = Decoder::new();
        let text: Vec<u8> = b"longwire ".iter().copied().cycle().take(4096).collect();
        let (codec, stored) = enc.encode(&text, Compression::Zstd);
        assert_eq!(codec, CODEC_ZSTD);
        assert!(stored.len() < 200, "{}", stored.len());
        let stored = stored.to_vec();
        let mut out = vec![0u8; 4096];
        dec.decode(&v, 3, codec, &stored, &mut out).unwrap();
        assert_eq!(out, text);

        // Incompressible data is stored raw even when compression is on.
        let mut x = 0x1234_5678_9abc_def1u64;
        let noise: Vec<u8> = (0..4096)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let (codec, raw) = enc.encode(&noise, Compression::Zstd);
        assert_eq!((codec, raw), (CODEC_RAW, &noise[..]));
        assert_eq!(enc.encode(&text, Compression::None).0, CODEC_RAW);

        // Corruption is reported with the chunk, never as zeros.
        let msg = |e: VolumeError| e.to_string();
        let e = msg(dec
            .decode(&v, 3, CODEC_ZSTD, &stored[..stored.len() - 3], &mut out)
            .unwrap_err());
        assert!(
            e.contains("chunk 3 (bytes 12288..16384)") && e.contains("\"v\""),
            "{e}"
        );
        let e = msg(dec
            .decode(&v, 3, CODEC_RAW, &noise[..4095], &mut out)
            .unwrap_err());
        assert!(e.contains("holds 4095 bytes, expected 4096"), "{e}");
        let e = msg(dec.decode(&v, 3, 7, &noise, &mut out).unwrap_err());
        assert!(e.contains("unknown codec 7"), "{e}");
        // A valid frame of the wrong length.
        let short = zstd::bulk::compress(&text[..1000], 1).unwrap();
        let e = msg(dec.decode(&v, 3, CODEC_ZSTD, &short, &mut out).unwrap_err());
        assert!(e.contains("decodes to 1000 bytes, expected 4096"), "{e}");
        let long = zstd::bulk::compress(&vec![7u8; 8192], 1).unwrap();
        let e = msg(dec.decode(&v, 3, CODEC_ZSTD, &long, &mut out).unwrap_err());
        assert!(e.contains("does not decode to 4096 bytes"), "{e}");
    }
}
