//! The self-describing block format the verifying writer stores (sans-IO).
//!
//! Every 4 KiB block written carries who wrote it, so a block read back
//! after a crash can be judged on its own: which block it was meant for,
//! the per-block sequence number and write id, and a CRC32C over all of
//! it. A block that mixes two versions (a torn write) or holds bytes from
//! elsewhere fails the checksum; one written to the wrong offset names
//! another block index.
//!
//! ```text
//!  0..8      magic "LWTORT01"
//!  8..16     block index (u64 LE)
//!  16..24    per-block sequence number
//!  24..32    write id (unique per write request)
//!  32..4092  filler derived from (write id, block index)
//!  4092..    CRC32C of bytes 0..4092
//! ```

use crate::rng::Rng;

pub const BLOCK_SIZE: usize = 4096;
const MAGIC: &[u8; 8] = b"LWTORT01";
const CRC_AT: usize = BLOCK_SIZE - 4;

/// What a block read back holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observed {
    /// All zero bytes: never written, trimmed or zeroed.
    Zero,
    /// A whole, valid block written for this index.
    Data { seq: u64, write_id: u64 },
    /// A valid block, but written for another index (a misdirected write).
    Misplaced { index: u64, seq: u64, write_id: u64 },
    /// Neither zero nor a valid block: torn, or garbage.
    Torn { reason: &'static str },
}

/// Fill `out` (exactly [`BLOCK_SIZE`] bytes) with the block for `index`.
pub fn encode(out: &mut [u8], index: u64, seq: u64, write_id: u64) {
    assert_eq!(out.len(), BLOCK_SIZE);
    out[0..8].copy_from_slice(MAGIC);
    out[8..16].copy_from_slice(&index.to_le_bytes());
    out[16..24].copy_from_slice(&seq.to_le_bytes());
    out[24..32].copy_from_slice(&write_id.to_le_bytes());
    let mut rng = Rng::new(write_id ^ index.rotate_left(32));
    for piece in out[32..CRC_AT].chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        piece.copy_from_slice(&v[..piece.len()]);
    }
    let crc = crc32c::crc32c(&out[..CRC_AT]);
    out[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
}

/// Judge a block read back from `index`.
pub fn decode(block: &[u8], index: u64) -> Observed {
    assert_eq!(block.len(), BLOCK_SIZE);
    if block.iter().all(|&b| b == 0) {
        return Observed::Zero;
    }
    if &block[0..8] != MAGIC {
        return Observed::Torn {
            reason: "no block header (foreign or partly zero data)",
        };
    }
    let crc = u32::from_le_bytes(block[CRC_AT..].try_into().unwrap());
    if crc32c::crc32c(&block[..CRC_AT]) != crc {
        return Observed::Torn {
            reason: "checksum mismatch (torn or corrupted block)",
        };
    }
    let word = |at: usize| u64::from_le_bytes(block[at..at + 8].try_into().unwrap());
    let (found, seq, write_id) = (word(8), word(16), word(24));
    if found != index {
        return Observed::Misplaced {
            index: found,
            seq,
            write_id,
        };
    }
    Observed::Data { seq, write_id }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(index: u64, seq: u64, id: u64) -> Vec<u8> {
        let mut b = vec![0; BLOCK_SIZE];
        encode(&mut b, index, seq, id);
        b
    }

    #[test]
    fn round_trip() {
        assert_eq!(
            decode(&block(9, 3, 77), 9),
            Observed::Data {
                seq: 3,
                write_id: 77
            }
        );
        assert_eq!(decode(&vec![0; BLOCK_SIZE], 9), Observed::Zero);
    }

    #[test]
    fn a_torn_block_is_caught() {
        let (a, b) = (block(4, 1, 10), block(4, 2, 11));
        let mut torn = a.clone();
        torn[2048..].copy_from_slice(&b[2048..]);
        assert!(matches!(decode(&torn, 4), Observed::Torn { .. }));
        let mut half_zero = a.clone();
        half_zero[512..].fill(0);
        assert!(matches!(decode(&half_zero, 4), Observed::Torn { .. }));
        let mut head_zero = a;
        head_zero[..512].fill(0);
        assert!(matches!(decode(&head_zero, 4), Observed::Torn { .. }));
    }

    #[test]
    fn a_misdirected_block_is_caught() {
        assert_eq!(
            decode(&block(5, 1, 2), 6),
            Observed::Misplaced {
                index: 5,
                seq: 1,
                write_id: 2
            }
        );
    }
}
