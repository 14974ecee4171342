//! What a logical unit advertises and enforces, derived once from the
//! volume's size and [`Capabilities`]. READ CAPACITY, the VPD pages and the
//! command checks all read from here, so what we promise is what we check.

use longwire_core::Capabilities;

use super::cdb::BLOCK_SIZE;

/// Most logical blocks one UNMAP may name in total. libiscsi (and common
/// sense) wants an explicit limit to stay at or under 2^20.
pub const MAX_UNMAP_LBA_COUNT: u32 = 1 << 20;
/// Most block descriptors in one UNMAP parameter list.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Most blocks one WRITE SAME may cover (2 GiB at 512-byte blocks); Linux
/// caps its own WRITE SAME(16) requests just above this.
pub const MAX_WRITE_SAME_BLOCKS: u64 = 1 << 22;
/// Most blocks one COMPARE AND WRITE may name (the field is one byte).
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u32 = 255;
/// Largest OPTIMAL TRANSFER LENGTH we suggest. A 32 MiB "optimal" size makes
/// mkfs.xfs and friends pick odd stripe geometry, so we cap the hint.
const MAX_OPTIMAL_TRANSFER_BYTES: u32 = 1 << 20;

/// LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT reported by READ CAPACITY(16).
///
/// The volume prefers 4 KiB, which would be exponent 3, but then libiscsi's
/// GetLBAStatus.UnmapSingle (1.19) fails: it expects the first LBA status
/// descriptor to start one physical block past the requested LBA, which no
/// conforming device server does (SBC-3 5.6: it starts at the requested
/// LBA). We report 0 and carry the 4 KiB preference in the Block Limits
/// OPTIMAL TRANSFER LENGTH GRANULARITY instead, which Linux uses as io_min.
pub const LBPPB_EXPONENT: u8 = 0;

/// The advertised shape and limits of one logical unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Whole 512-byte blocks; a volume size that is not a multiple of 512
    /// rounds down (the tail is unreachable).
    pub num_blocks: u64,
    /// MAXIMUM TRANSFER LENGTH: the volume's largest payload in blocks.
    pub max_transfer_blocks: u32,
    /// OPTIMAL TRANSFER LENGTH in blocks.
    pub optimal_transfer_blocks: u32,
    /// OPTIMAL TRANSFER LENGTH GRANULARITY: the preferred block in blocks.
    pub granularity_blocks: u16,
    /// Smallest write the volume accepts, in bytes (partial Data-Out is
    /// rounded down to it).
    pub min_io: u32,
    pub read_only: bool,
    /// Thin provisioned: UNMAP, WRITE SAME with UNMAP, GET LBA STATUS and
    /// LBPME are offered (the volume can trim and is writable).
    pub thin: bool,
    /// Unmapped blocks read as zeros (LBPRZ). True when the volume zeroes
    /// efficiently, because then we deallocate with `write_zeroes`
    /// (may_trim) rather than `trim`, which is only a hint.
    pub lbprz: bool,
    /// The volume has a cache that `flush` empties: the caching mode page
    /// reports WCE=1 and lets the initiator turn it off.
    pub volatile_cache: bool,
}

impl Geometry {
    pub fn new(size: u64, caps: &Capabilities) -> Geometry {
        let block = u64::from(BLOCK_SIZE);
        let max_transfer_blocks = (caps.max_payload / BLOCK_SIZE).max(1);
        let optimal = caps.max_payload.min(MAX_OPTIMAL_TRANSFER_BYTES) / BLOCK_SIZE;
        let granularity = (caps.preferred_block / BLOCK_SIZE).clamp(1, u32::from(u16::MAX));
        let thin = caps.can_trim && !caps.read_only;
        Geometry {
            num_blocks: size / block,
            max_transfer_blocks,
            optimal_transfer_blocks: optimal.clamp(1, max_transfer_blocks),
            granularity_blocks: granularity as u16,
            min_io: caps.min_block.max(1),
            read_only: caps.read_only,
            thin,
            lbprz: thin && caps.can_zero,
            volatile_cache: caps.can_flush,
        }
    }

    /// The last LBA, as READ CAPACITY reports it (0 for an empty volume,
    /// which has no valid LBA at all; every access is then out of range).
    pub fn last_lba(&self) -> u64 {
        self.num_blocks.saturating_sub(1)
    }

    /// True when `[lba, lba + blocks)` lies inside the logical unit.
    pub fn in_range(&self, lba: u64, blocks: u64) -> bool {
        lba.checked_add(blocks)
            .is_some_and(|end| end <= self.num_blocks)
    }

    /// Byte offset of `lba`. Only called for LBAs already range-checked, so
    /// it cannot overflow (num_blocks * 512 <= volume size).
    pub fn offset(&self, lba: u64) -> u64 {
        lba.saturating_mul(u64::from(BLOCK_SIZE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_from_capabilities() {
        let caps = Capabilities {
            can_trim: true,
            can_zero: true,
            ..Capabilities::default()
        };
        let g = Geometry::new(10 * 512 + 100, &caps);
        assert_eq!(g.num_blocks, 10);
        assert_eq!(g.last_lba(), 9);
        assert_eq!(g.max_transfer_blocks, 65536);
        assert_eq!(g.optimal_transfer_blocks, 2048);
        assert_eq!(g.granularity_blocks, 8);
        assert!(g.thin && g.lbprz && g.volatile_cache && !g.read_only);
        assert!(g.in_range(9, 1));
        assert!(g.in_range(10, 0));
        assert!(!g.in_range(10, 1));
        assert!(!g.in_range(u64::MAX, 2));

        let ro = Capabilities {
            read_only: true,
            can_trim: true,
            ..Capabilities::default()
        };
        let g = Geometry::new(0, &ro);
        assert!(!g.thin && !g.lbprz && g.read_only);
        assert_eq!(g.last_lba(), 0);
    }
}
