//! Chunk objects: what is uploaded for a chunk, and the checks on the way
//! back.
//!
//! A chunk object is either exactly `chunk_size` raw bytes, or a zstd frame
//! (shorter than a chunk: it is only kept when it saves at least 1/16) that
//! decodes to exactly `chunk_size` bytes. The length alone tells them
//! apart, so reading needs no setting. Anything else is corruption and an
//! error, never zeros.

/// zstd level: level 1 compresses block data almost as well as the default
/// at about twice the speed.
const ZSTD_LEVEL: i32 = 1;
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// The object to upload for one whole chunk.
pub fn encode(data: &[u8], zstd: bool) -> Vec<u8> {
    if zstd {
        let limit = data.len() - data.len() / 16;
        let mut out = vec![0u8; limit];
        if let Ok(n) = zstd::bulk::compress_to_buffer(data, &mut out, ZSTD_LEVEL) {
            out.truncate(n);
            return out;
        }
    }
    data.to_vec()
}

/// The chunk's bytes from its object, or why the object is not a chunk.
pub fn decode(object: &[u8], chunk_size: usize) -> Result<Vec<u8>, String> {
    if object.len() == chunk_size {
        return Ok(object.to_vec());
    }
    if object.len() < chunk_size && object.starts_with(&ZSTD_MAGIC) {
        let out = zstd::bulk::decompress(object, chunk_size).map_err(|e| {
            format!(
                "its {} bytes are not a valid zstd frame ({e})",
                object.len()
            )
        })?;
        if out.len() != chunk_size {
            return Err(format!(
                "it decompresses to {} bytes, not the chunk size {chunk_size}",
                out.len()
            ));
        }
        return Ok(out);
    }
    Err(format!(
        "the object is {} bytes; a chunk object is {chunk_size} bytes (or a smaller zstd frame)",
        object.len()
    ))
}

/// True when every byte is zero. Written so the compiler vectorizes it.
pub fn is_zero(b: &[u8]) -> bool {
    let mut blocks = b.chunks_exact(64);
    blocks.all(|c| c.iter().fold(0u8, |acc, &x| acc | x) == 0)
        && blocks.remainder().iter().all(|&x| x == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_and_zstd_round_trip() {
        let mut data = vec![0u8; 65536];
        data[100] = 7;
        let packed = encode(&data, true);
        assert!(packed.len() < 1000);
        assert_eq!(decode(&packed, 65536).unwrap(), data);
        assert_eq!(encode(&data, false), data);

        // Incompressible data stays raw.
        let mut x = 0x9e3779b97f4a7c15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        let packed = encode(&noise, true);
        assert_eq!(packed.len(), 65536);
        assert_eq!(decode(&packed, 65536).unwrap(), noise);
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let e = decode(&[1u8; 100], 4096).unwrap_err();
        assert!(e.contains("100 bytes") && e.contains("4096"), "{e}");
        assert!(decode(&[1u8; 8192], 4096).is_err());
        let packed = encode(&vec![0u8; 8192], true);
        let e = decode(&packed, 4096).unwrap_err();
        assert!(e.contains("8192") || e.contains("zstd"), "{e}");
        let mut torn = encode(&vec![0u8; 4096], true);
        torn.truncate(torn.len() - 2);
        assert!(decode(&torn, 4096).is_err());
    }
}
