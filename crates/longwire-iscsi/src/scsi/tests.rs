//! End-to-end tests: CDB bytes in through [`Target::execute`], status,
//! sense and data out, against real stores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use longwire_core::layers::ReadOnly;
use longwire_core::{Capabilities, Volume, VolumeError, VolumeResult};
use longwire_store::{FileVolume, MemoryVolume};

use super::*;

const MIB: u64 = 1 << 20;

fn nexus(i: u32) -> Nexus {
    Nexus {
        initiator_port: format!("iqn.2024-01.test:init{i},i,0x23d00000000{i}"),
        target_port: "iqn.2024-01.test:target,t,0x1".into(),
    }
}

fn identity(export: &str) -> LunIdentity {
    LunIdentity {
        export: export.into(),
        vendor: String::new(),
        product: String::new(),
    }
}

fn target_with(volume: Arc<dyn Volume>) -> Target {
    Target::new(vec![(
        0,
        Arc::new(LogicalUnit::new(volume, identity("disk0"))),
    )])
}

fn memory_target(size: u64) -> Target {
    target_with(Arc::new(MemoryVolume::new(size)))
}

async fn exec(t: &Target, n: &Nexus, cdb: &[u8], data: &[u8]) -> CommandResult {
    t.execute(n, 0, cdb, Bytes::copy_from_slice(data)).await
}

/// (key, ASC, ASCQ) of a CHECK CONDITION.
fn sense_of(r: &CommandResult) -> (u8, u8, u8) {
    assert_eq!(
        r.status,
        status::CHECK_CONDITION,
        "expected CHECK CONDITION, got {r:?}"
    );
    let s = r.sense.as_ref().expect("sense data");
    assert_eq!(s.len(), 18);
    assert_eq!(s[0] & 0x7f, 0x70);
    (s[2] & 0x0f, s[12], s[13])
}

fn assert_sense(r: &CommandResult, key: u8, asc: u8, ascq: u8) {
    assert_eq!(sense_of(r), (key, asc, ascq), "{r:?}");
}

fn assert_good(r: &CommandResult) {
    assert_eq!(r.status, status::GOOD, "{r:?}");
    assert!(r.sense.is_none());
}

/// Sense-key specific field pointer: (C/D, byte).
fn field_pointer(r: &CommandResult) -> Option<(bool, u16)> {
    let s = r.sense.as_ref()?;
    (s[15] & 0x80 != 0).then(|| (s[15] & 0x40 != 0, u16::from_be_bytes([s[16], s[17]])))
}

fn information(r: &CommandResult) -> Option<u32> {
    let s = r.sense.as_ref()?;
    (s[0] & 0x80 != 0).then(|| u32::from_be_bytes(s[3..7].try_into().unwrap()))
}

fn rw10(op: u8, lba: u32, blocks: u16, flags: u8) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = op;
    c[1] = flags;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn rw16(op: u8, lba: u64, blocks: u32, flags: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = op;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn rw12(op: u8, lba: u32, blocks: u32) -> [u8; 12] {
    let mut c = [0u8; 12];
    c[0] = op;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[6..10].copy_from_slice(&blocks.to_be_bytes());
    c
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed) | 1)
        .collect()
}

fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
    let a = alloc.to_be_bytes();
    [0x12, u8::from(evpd), page, a[0], a[1], 0]
}

fn caw(lba: u64, blocks: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x89;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

fn unmap_cdb(param_len: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x42;
    c[7..9].copy_from_slice(&param_len.to_be_bytes());
    c
}

fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut l = vec![0u8; 8];
    l[0..2].copy_from_slice(&((6 + 16 * ranges.len()) as u16).to_be_bytes());
    l[2..4].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
    for &(lba, n) in ranges {
        l.extend_from_slice(&lba.to_be_bytes());
        l.extend_from_slice(&n.to_be_bytes());
        l.extend_from_slice(&[0; 4]);
    }
    l
}

fn get_lba_status(lba: u64, alloc: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = 0x9e;
    c[1] = 0x12;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&alloc.to_be_bytes());
    c
}

fn prout(action: u8, pr_type: u8, rk: u64, sark: u64) -> ([u8; 10], Vec<u8>) {
    let mut c = [0u8; 10];
    c[0] = 0x5f;
    c[1] = action;
    c[2] = pr_type;
    c[5..9].copy_from_slice(&24u32.to_be_bytes());
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&rk.to_be_bytes());
    p[8..16].copy_from_slice(&sark.to_be_bytes());
    (c, p)
}

const TUR: [u8; 6] = [0; 6];

// ---- identification ------------------------------------------------------

#[tokio::test]
async fn inquiry_standard_and_allocation_length() {
    let t = memory_target(MIB);
    let n = nexus(1);
    for alloc in 0..=300u16 {
        let r = exec(&t, &n, &inquiry(false, 0, alloc), &[]).await;
        assert_good(&r);
        assert_eq!(r.data_in.len(), usize::from(alloc).min(96));
    }
    let r = exec(&t, &n, &inquiry(false, 0, 255), &[]).await;
    assert_eq!(r.data_in[0], 0x00);
    assert_eq!(r.data_in[2], 0x06);
    assert_eq!(r.data_in[4], 91);
    assert_eq!(&r.data_in[8..16], b"LONGWIRE");
    // 511 and 512 give the same data (16-bit allocation length).
    let a = exec(&t, &n, &inquiry(false, 0, 511), &[]).await;
    let b = exec(&t, &n, &inquiry(false, 0, 512), &[]).await;
    assert_eq!(a.data_in, b.data_in);
}

#[tokio::test]
async fn inquiry_evpd_rules_and_pages() {
    let t = memory_target(MIB);
    let n = nexus(1);
    let r = exec(&t, &n, &inquiry(false, 1, 256), &[]).await;
    assert_sense(&r, 5, 0x24, 0);
    assert_eq!(field_pointer(&r), Some((true, 2)));
    let r = exec(&t, &n, &inquiry(true, 0x99, 256), &[]).await;
    assert_sense(&r, 5, 0x24, 0);
    let sup = exec(&t, &n, &inquiry(true, 0, 255), &[]).await;
    let pages = sup.data_in[4..].to_vec();
    assert!(pages.windows(2).all(|w| w[0] < w[1]));
    for p in pages {
        let r = exec(&t, &n, &inquiry(true, p, 255), &[]).await;
        assert_good(&r);
        assert_eq!(r.data_in[1], p);
        // Truncation is never an error.
        let r = exec(&t, &n, &inquiry(true, p, 3), &[]).await;
        assert_good(&r);
        assert_eq!(r.data_in.len(), 3);
    }
}

#[tokio::test]
async fn naa_designator_is_stable_per_export() {
    let a = LogicalUnit::new(Arc::new(MemoryVolume::new(MIB)), identity("vol-a"));
    let a2 = LogicalUnit::new(Arc::new(MemoryVolume::new(2 * MIB)), identity("vol-a"));
    let b = LogicalUnit::new(Arc::new(MemoryVolume::new(MIB)), identity("vol-b"));
    assert_eq!(a.naa_designator(), a2.naa_designator());
    assert_eq!(a.unit_serial(), a2.unit_serial());
    assert_ne!(a.naa_designator(), b.naa_designator());
    // And it is what VPD 83h reports.
    let t = Target::new(vec![(0, Arc::new(a))]);
    let r = exec(&t, &nexus(1), &inquiry(true, 0x83, 255), &[]).await;
    assert_eq!(&r.data_in[8..24], &a2.naa_designator());
    let r = exec(&t, &nexus(1), &inquiry(true, 0x80, 255), &[]).await;
    assert_eq!(&r.data_in[4..], a2.unit_serial().as_bytes());
}

#[tokio::test]
async fn absent_lun() {
    let t = memory_target(MIB);
    let n = nexus(1);
    let r = t.execute(&n, 7, &inquiry(false, 0, 96), Bytes::new()).await;
    assert_good(&r);
    assert_eq!(r.data_in[0], 0x7f);
    let r = t.execute(&n, 7, &TUR, Bytes::new()).await;
    assert_sense(&r, 5, 0x25, 0);
    let r = t.execute(&n, 7, &rw10(0x28, 0, 1, 0), Bytes::new()).await;
    assert_sense(&r, 5, 0x25, 0);
    let r = t
        .execute(&n, 7, &[0x03, 0, 0, 0, 18, 0], Bytes::new())
        .await;
    assert_good(&r);
    assert_eq!((r.data_in[2], r.data_in[12]), (5, 0x25));
    let r = t.execute(&n, 7, &inquiry(true, 0, 255), Bytes::new()).await;
    assert_good(&r);
    assert_eq!(&r.data_in[..], &[0x7f, 0, 0, 1, 0]);
    let r = t
        .execute(&n, 7, &inquiry(true, 0x83, 255), Bytes::new())
        .await;
    assert_sense(&r, 5, 0x24, 0);
}

#[tokio::test]
async fn report_luns() {
    let lu = |e: &str| {
        Arc::new(LogicalUnit::new(
            Arc::new(MemoryVolume::new(MIB)),
            identity(e),
        ))
    };
    let t = Target::new(vec![
        (300, lu("c")),
        (0, lu("a")),
        (1, lu("b")),
        (1, lu("dup")),
    ]);
    let n = nexus(1);
    let rl = |select: u8, alloc: u32| {
        let mut c = [0u8; 12];
        c[0] = 0xa0;
        c[2] = select;
        c[6..10].copy_from_slice(&alloc.to_be_bytes());
        c
    };
    // Works through a LUN that does not exist, too.
    let r = t.execute(&n, 42, &rl(0, 4096), Bytes::new()).await;
    assert_good(&r);
    assert_eq!(&r.data_in[0..4], &24u32.to_be_bytes());
    assert_eq!(&r.data_in[8..16], &encode_lun(0));
    assert_eq!(&r.data_in[16..24], &encode_lun(1));
    assert_eq!(&r.data_in[24..32], &[0x41, 0x2c, 0, 0, 0, 0, 0, 0]);
    let r = exec(&t, &n, &rl(2, 16), &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in.len(), 16, "truncated, list length untouched");
    assert_eq!(&r.data_in[0..4], &24u32.to_be_bytes());
    let r = exec(&t, &n, &rl(1, 64), &[]).await;
    assert_eq!(&r.data_in[..], &[0u8; 8]);
    assert_sense(&exec(&t, &n, &rl(3, 64), &[]).await, 5, 0x24, 0);
    let r = exec(&t, &n, &rl(0, 15), &[]).await;
    assert_sense(&r, 5, 0x24, 0);
    assert_eq!(field_pointer(&r), Some((true, 6)));
    assert_eq!(t.lun_numbers().collect::<Vec<_>>(), vec![0, 1, 300]);
    assert_eq!(t.logical_unit(1).unwrap().identity().export, "b");
}

// ---- capacity --------------------------------------------------------------

#[tokio::test]
async fn read_capacity() {
    // Not a multiple of 512: the tail is dropped.
    let t = memory_target(MIB + 100);
    let n = nexus(1);
    let r = exec(&t, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_good(&r);
    assert_eq!(&r.data_in[..], &[0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    let mut rc16 = [0u8; 16];
    rc16[0] = 0x9e;
    rc16[1] = 0x10;
    rc16[13] = 32;
    let r = exec(&t, &n, &rc16, &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in.len(), 32);
    assert_eq!(
        u64::from_be_bytes(r.data_in[0..8].try_into().unwrap()),
        2047
    );
    assert_eq!(&r.data_in[8..12], &512u32.to_be_bytes());
    assert_eq!(r.data_in[13], 0, "LBPPBE");
    assert_eq!(r.data_in[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
    for alloc in 0..16u8 {
        rc16[13] = alloc;
        let r = exec(&t, &n, &rc16, &[]).await;
        assert_good(&r);
        assert_eq!(r.data_in.len(), usize::from(alloc));
    }

    // Over 2 TiB: READ CAPACITY(10) says FFFFFFFFh.
    let big = memory_target(3 << 40);
    let r = exec(&big, &n, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await;
    assert_eq!(&r.data_in[0..4], &[0xff; 4]);
    rc16[13] = 32;
    let r = exec(&big, &n, &rc16, &[]).await;
    assert_eq!(
        u64::from_be_bytes(r.data_in[0..8].try_into().unwrap()),
        (3u64 << 31) - 1
    );
    // And the last block is addressable.
    let w = rw16(0x8a, (3u64 << 31) - 1, 1, 0);
    assert_good(&exec(&big, &n, &w, &[7u8; 512]).await);
    let r = exec(&big, &n, &rw16(0x88, (3u64 << 31) - 1, 1, 0), &[]).await;
    assert_eq!(&r.data_in[..], &[7u8; 512][..]);
}

// ---- read / write ------------------------------------------------------------

#[tokio::test]
async fn read_write_all_sizes() {
    let t = memory_target(MIB);
    let n = nexus(1);
    let data = pattern(4 * 512, 3);
    assert_good(&exec(&t, &n, &rw10(0x2a, 10, 4, 0), &data).await);
    let r = exec(&t, &n, &rw10(0x28, 10, 4, 0), &[]).await;
    assert_eq!(&r.data_in[..], &data[..]);
    let r = exec(&t, &n, &rw12(0xa8, 10, 4), &[]).await;
    assert_eq!(&r.data_in[..], &data[..]);
    let r = exec(&t, &n, &rw16(0x88, 10, 4, 0), &[]).await;
    assert_eq!(&r.data_in[..], &data[..]);
    // READ(6)/WRITE(6): 21-bit LBA, length 0 means 256 blocks.
    let big = pattern(256 * 512, 9);
    assert_good(&exec(&t, &n, &[0x0a, 0, 0, 100, 0, 0], &big).await);
    let r = exec(&t, &n, &[0x08, 0, 0, 100, 0, 0], &[]).await;
    assert_eq!(r.data_in.len(), 256 * 512);
    assert_eq!(&r.data_in[..], &big[..]);
    // FUA, DPO and FUA_NV are accepted on WRITE(12)/(16).
    assert_good(&exec(&t, &n, &rw16(0x8a, 0, 1, 0x1a), &[1u8; 512]).await);
    let mut w12 = rw12(0xaa, 0, 1);
    w12[1] = 0x18;
    assert_good(&exec(&t, &n, &w12, &[2u8; 512]).await);
}

#[tokio::test]
async fn zero_length_and_range_errors() {
    let t = memory_target(MIB); // 2048 blocks
    let n = nexus(1);
    for cdb in [
        rw10(0x28, 0, 0, 0),
        rw10(0x2a, 2048, 0, 0),
        rw10(0x2f, 5, 0, 0),
    ] {
        let r = exec(&t, &n, &cdb, &[]).await;
        assert_good(&r);
        assert!(r.data_in.is_empty());
    }
    for cdb in [
        rw10(0x28, 2049, 0, 0),
        rw10(0x28, 2048, 1, 0),
        rw10(0x28, 2047, 2, 0),
        rw10(0x2a, u32::MAX, 1, 0),
        rw10(0x34, 2049, 0, 0),
        rw10(0x35, 2040, 9, 0),
    ] {
        assert_sense(&exec(&t, &n, &cdb, &[0; 1024]).await, 5, 0x21, 0);
    }
    // 64-bit LBA overflow does not wrap.
    for lba in [u64::MAX, u64::MAX - 1, 1 << 63] {
        assert_sense(&exec(&t, &n, &rw16(0x88, lba, 2, 0), &[]).await, 5, 0x21, 0);
        assert_sense(
            &exec(&t, &n, &get_lba_status(lba, 24), &[]).await,
            5,
            0x21,
            0,
        );
    }
    // READ(6) past the end.
    assert_sense(
        &exec(&t, &n, &[0x08, 0x1f, 0xff, 0xff, 1, 0], &[]).await,
        5,
        0x21,
        0,
    );
    // More than MAXIMUM TRANSFER LENGTH: invalid field, pointing at the length.
    let big = memory_target(1 << 40);
    let r = exec(&big, &n, &rw16(0x88, 0, 65537, 0), &[]).await;
    assert_sense(&r, 5, 0x24, 0);
    assert_eq!(field_pointer(&r), Some((true, 10)));
    // RDPROTECT/WRPROTECT: no protection information.
    let r = exec(&t, &n, &rw10(0x28, 0, 1, 0x20), &[]).await;
    assert_sense(&r, 5, 0x24, 0);
    assert_eq!(field_pointer(&r), Some((true, 1)));
    assert_sense(
        &exec(&t, &n, &rw16(0x8a, 0, 1, 0xe0), &[0; 512]).await,
        5,
        0x24,
        0,
    );
}

#[tokio::test]
async fn short_and_long_data_out() {
    let t = memory_target(MIB);
    let n = nexus(1);
    assert_good(&exec(&t, &n, &rw10(0x2a, 0, 2, 0), &[b'a'; 1024]).await);
    // Two blocks named, one sent: only the first is written.
    assert_good(&exec(&t, &n, &rw10(0x2a, 0, 2, 0), &[b'b'; 512]).await);
    let r = exec(&t, &n, &rw10(0x28, 0, 2, 0), &[]).await;
    assert!(r.data_in[..512].iter().all(|&b| b == b'b'));
    assert!(r.data_in[512..].iter().all(|&b| b == b'a'));
    // One block named, two sent: the extra is ignored.
    assert_good(&exec(&t, &n, &rw10(0x2a, 0, 1, 0), &[b'c'; 1024]).await);
    let r = exec(&t, &n, &rw10(0x28, 0, 2, 0), &[]).await;
    assert!(r.data_in[..512].iter().all(|&b| b == b'c'));
    assert!(r.data_in[512..].iter().all(|&b| b == b'a'));
    // Nothing sent at all: nothing written, still GOOD.
    assert_good(&exec(&t, &n, &rw10(0x2a, 0, 1, 0), &[]).await);
    // A partial block is written as far as it goes.
    assert_good(&exec(&t, &n, &rw10(0x2e, 1, 1, 0), &[b'd'; 200]).await);
    let r = exec(&t, &n, &rw10(0x28, 1, 1, 0), &[]).await;
    assert!(r.data_in[..200].iter().all(|&b| b == b'd'));
    assert!(r.data_in[200..].iter().all(|&b| b == b'a'));
}

#[tokio::test]
async fn write_protection() {
    let ro: Arc<dyn Volume> = Arc::new(ReadOnly::new(Arc::new(MemoryVolume::new(MIB))));
    let t = target_with(ro);
    let n = nexus(1);
    assert_good(&exec(&t, &n, &rw10(0x28, 0, 1, 0), &[]).await);
    assert_sense(
        &exec(&t, &n, &rw10(0x2a, 0, 1, 0), &[0; 512]).await,
        7,
        0x27,
        0,
    );
    assert_sense(
        &exec(&t, &n, &rw10(0x2e, 0, 1, 0x02), &[0; 512]).await,
        7,
        0x27,
        0,
    );
    assert_sense(
        &exec(&t, &n, &rw10(0x41, 0, 1, 0), &[0; 512]).await,
        7,
        0x27,
        0,
    );
    assert_sense(
        &exec(&t, &n, &rw10(0x41, 0, 1, 0x08), &[0; 512]).await,
        7,
        0x27,
        0,
    );
    assert_sense(&exec(&t, &n, &caw(0, 1), &[0; 1024]).await, 7, 0x27, 0);
    // Not thin provisioned: UNMAP and GET LBA STATUS are not offered.
    assert_sense(
        &exec(&t, &n, &unmap_cdb(24), &unmap_list(&[(0, 1)])).await,
        5,
        0x20,
        0,
    );
    let r = exec(&t, &n, &get_lba_status(0, 24), &[]).await;
    assert_sense(&r, 5, 0x24, 0);
    assert_eq!(field_pointer(&r), Some((true, 1)));
    // MODE SENSE shows WP; LBPME is clear.
    let r = exec(&t, &n, &[0x1a, 0, 0x3f, 0, 0xff, 0], &[]).await;
    assert_eq!(r.data_in[2] & 0x80, 0x80);
    let mut rc16 = [0u8; 16];
    rc16[0] = 0x9e;
    rc16[1] = 0x10;
    rc16[13] = 32;
    assert_eq!(exec(&t, &n, &rc16, &[]).await.data_in[14] & 0x80, 0);
}

// ---- verify / compare ----------------------------------------------------------

#[tokio::test]
async fn verify() {
    let t = memory_target(MIB);
    let n = nexus(1);
    let data = pattern(3 * 512, 5);
    assert_good(&exec(&t, &n, &rw10(0x2a, 7, 3, 0), &data).await);
    assert_good(&exec(&t, &n, &rw10(0x2f, 7, 3, 0), &[]).await);
    assert_good(&exec(&t, &n, &rw10(0x2f, 7, 3, 0x02), &data).await);
    let mut bad = data.clone();
    bad[1000] ^= 0xff;
    let r = exec(&t, &n, &rw10(0x2f, 7, 3, 0x02), &bad).await;
    assert_sense(&r, 0x0e, 0x1d, 0);
    assert_eq!(information(&r), Some(1000));
    // BYTCHK 0 never compares.
    assert_good(&exec(&t, &n, &rw10(0x2f, 7, 3, 0), &bad).await);
    // Too little Data-Out for the compare.
    assert_sense(
        &exec(&t, &n, &rw10(0x2f, 7, 3, 0x02), &data[..512]).await,
        5,
        0x0e,
        0x03,
    );
    // BYTCHK 3: one block against every block.
    assert_good(&exec(&t, &n, &rw10(0x2a, 20, 4, 0), &[9u8; 2048]).await);
    assert_good(&exec(&t, &n, &rw10(0x2f, 20, 4, 0x06), &[9u8; 512]).await);
    assert_good(&exec(&t, &n, &rw10(0x2a, 22, 1, 0), &[8u8; 512]).await);
    let r = exec(&t, &n, &rw16(0x8f, 20, 4, 0x06), &[9u8; 512]).await;
    assert_sense(&r, 0x0e, 0x1d, 0);
    assert_eq!(information(&r), Some(1024));
    // VRPROTECT.
    assert_sense(
        &exec(&t, &n, &rw10(0x2f, 7, 1, 0x22), &data[..512]).await,
        5,
        0x24,
        0,
    );
}

#[tokio::test]
async fn compare_and_write() {
    let t = memory_target(MIB);
    let n = nexus(1);
    assert_good(&exec(&t, &n, &rw16(0x8a, 4, 2, 0), &[b'A'; 1024]).await);
    let mut d = vec![b'A'; 1024];
    d.extend_from_slice(&[b'B'; 1024]);
    assert_good(&exec(&t, &n, &caw(4, 2), &d).await);
    let r = exec(&t, &n, &rw16(0x88, 4, 2, 0), &[]).await;
    assert!(r.data_in.iter().all(|&b| b == b'B'));
    // Miscompare: INFORMATION is the offset of the first differing byte,
    // and nothing is written.
    let mut d = vec![b'B'; 1024];
    d[1024 - 27] = b'C';
    d.extend_from_slice(&[b'Z'; 1024]);
    let r = exec(&t, &n, &caw(4, 2), &d).await;
    assert_sense(&r, 0x0e, 0x1d, 0);
    assert_eq!(information(&r), Some(1024 - 27));
    let r = exec(&t, &n, &rw16(0x88, 4, 2, 0), &[]).await;
    assert!(r.data_in.iter().all(|&b| b == b'B'));
    // Wrong Data-Out sizes.
    assert_sense(&exec(&t, &n, &caw(4, 1), &[b'B'; 512]).await, 5, 0x0e, 0x03);
    assert_sense(
        &exec(&t, &n, &caw(4, 1), &[b'B'; 2048]).await,
        5,
        0x0e,
        0x03,
    );
    // NUMBER OF LOGICAL BLOCKS 0: a no-op, unless data came with it (a
    // 256-block request whose one-byte length wrapped).
    assert_good(&exec(&t, &n, &caw(4, 0), &[]).await);
    let r = exec(&t, &n, &caw(4, 0), &[0]).await;
    assert_sense(&r, 5, 0x24, 0);
    assert_eq!(field_pointer(&r), Some((true, 13)));
    assert_sense(&exec(&t, &n, &caw(2048, 1), &[0; 1024]).await, 5, 0x21, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_and_write_is_atomic() {
    // Many tasks race to bump a counter stored in block 0 with
    // COMPARE AND WRITE; with atomic compare+write every increment lands.
    let t = Arc::new(memory_target(MIB));
    let block = |v: u64| {
        let mut b = vec![0u8; 512];
        b[..8].copy_from_slice(&v.to_be_bytes());
        b
    };
    assert_good(&exec(&t, &nexus(0), &rw10(0x2a, 0, 1, 0), &block(0)).await);
    let successes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..8u32 {
        let (t, successes) = (t.clone(), successes.clone());
        tasks.push(tokio::spawn(async move {
            let n = nexus(i);
            let mut done = 0;
            while done < 25 {
                let r = exec(&t, &n, &rw10(0x28, 0, 1, 0), &[]).await;
                let v = u64::from_be_bytes(r.data_in[..8].try_into().unwrap());
                let mut d = block(v);
                d.extend(block(v + 1));
                let r = exec(&t, &n, &caw(0, 1), &d).await;
                if r.status == status::GOOD {
                    done += 1;
                    successes.fetch_add(1, Ordering::Relaxed);
                } else {
                    assert_eq!(sense_of(&r), (0x0e, 0x1d, 0));
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let r = exec(&t, &nexus(0), &rw10(0x28, 0, 1, 0), &[]).await;
    let v = u64::from_be_bytes(r.data_in[..8].try_into().unwrap());
    assert_eq!(v, 200);
    assert_eq!(successes.load(Ordering::Relaxed), 200);
}

// ---- thin provisioning ---------------------------------------------------------

#[tokio::test]
async fn unmap_parameter_list_validation() {
    let t = memory_target(MIB); // 2048 blocks
    let n = nexus(1);
    // No parameter list, and a header with no descriptors: fine.
    assert_good(&exec(&t, &n, &unmap_cdb(0), &[]).await);
    assert_good(&exec(&t, &n, &unmap_cdb(8), &unmap_list(&[])).await);
    // Shorter than the header.
    assert_sense(&exec(&t, &n, &unmap_cdb(7), &[0; 7]).await, 5, 0x1a, 0);
    // Header announces more descriptors than were sent.
    let mut l = unmap_list(&[(0, 1)]);
    l[3] = 32;
    assert_sense(&exec(&t, &n, &unmap_cdb(24), &l).await, 5, 0x1a, 0);
    // Less Data-Out than the parameter list length.
    assert_sense(&exec(&t, &n, &unmap_cdb(24), &l[..16]).await, 5, 0x1a, 0);
    // A trailing partial descriptor is ignored.
    let mut l = unmap_list(&[(0, 1)]);
    l[3] = 20;
    l.extend_from_slice(&[0xff; 4]);
    assert_good(&exec(&t, &n, &unmap_cdb(28), &l).await);
    // Too many descriptors.
    let many: Vec<(u64, u32)> = (0..257).map(|i| (i, 0)).collect();
    let l = unmap_list(&many);
    let r = exec(&t, &n, &unmap_cdb(l.len() as u16), &l).await;
    assert_sense(&r, 5, 0x26, 0);
    assert_eq!(field_pointer(&r), Some((false, 2)));
    // Too many blocks in total (on a volume big enough for them).
    let big = memory_target(4 << 30);
    let l = unmap_list(&[(0, 1 << 19), (1 << 20, (1 << 19) + 1)]);
    assert_sense(&exec(&big, &n, &unmap_cdb(40), &l).await, 5, 0x26, 0);
    // Beyond capacity: nothing is unmapped, even the valid descriptor.
    assert_good(&exec(&t, &n, &rw10(0x2a, 0, 1, 0), &[5u8; 512]).await);
    let l = unmap_list(&[(0, 1), (2047, 2)]);
    assert_sense(&exec(&t, &n, &unmap_cdb(40), &l).await, 5, 0x21, 0);
    let l = unmap_list(&[(u64::MAX, 2)]);
    assert_sense(&exec(&t, &n, &unmap_cdb(24), &l).await, 5, 0x21, 0);
    let r = exec(&t, &n, &rw10(0x28, 0, 1, 0), &[]).await;
    assert!(r.data_in.iter().all(|&b| b == 5));
    // Zero blocks at the very end is fine; ANCHOR is not supported.
    assert_good(&exec(&t, &n, &unmap_cdb(24), &unmap_list(&[(2048, 0)])).await);
    let mut c = unmap_cdb(24);
    c[1] = 1;
    assert_sense(&exec(&t, &n, &c, &unmap_list(&[(0, 1)])).await, 5, 0x24, 0);
}

#[tokio::test]
async fn unmap_reads_back_zero_and_shows_in_lba_status() {
    let t = memory_target(4 * MIB); // 64 KiB memory chunks = 128 blocks
    let n = nexus(1);
    assert_good(&exec(&t, &n, &rw10(0x2a, 0, 512, 0), &vec![0xaa; 512 * 512]).await);
    let r = exec(&t, &n, &get_lba_status(0, 1024), &[]).await;
    assert_good(&r);
    // Written blocks are mapped, the never-written rest deallocated.
    assert_eq!(&r.data_in[0..4], &36u32.to_be_bytes(), "two descriptors");
    assert_eq!(
        &r.data_in[8..24],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0]
    );
    assert_eq!(
        &r.data_in[24..40],
        &[0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0x1e, 0, 1, 0, 0, 0]
    );
    // Unmap blocks 128..384 (two whole chunks) and 10..12 (inside a chunk).
    let l = unmap_list(&[(128, 256), (10, 2)]);
    assert_good(&exec(&t, &n, &unmap_cdb(40), &l).await);
    let r = exec(&t, &n, &rw10(0x28, 8, 6, 0), &[]).await;
    assert!(r.data_in[..1024].iter().all(|&b| b == 0xaa));
    assert!(
        r.data_in[1024..2048].iter().all(|&b| b == 0),
        "LBPRZ: zeros"
    );
    assert!(r.data_in[2048..].iter().all(|&b| b == 0xaa));
    let r = exec(&t, &n, &get_lba_status(100, 1024), &[]).await;
    assert_good(&r);
    let d = &r.data_in;
    let descs: Vec<(u64, u32, u8)> = d[8..]
        .chunks(16)
        .map(|c| {
            (
                u64::from_be_bytes(c[0..8].try_into().unwrap()),
                u32::from_be_bytes(c[8..12].try_into().unwrap()),
                c[12],
            )
        })
        .collect();
    assert_eq!(descs[0], (100, 28, 0), "starts at the requested LBA");
    assert_eq!(descs[1], (128, 256, 1));
    assert_eq!(descs[2].0, 384);
    assert_eq!(descs[2].2, 0);
    // Truncated to the allocation length, the length field still says all.
    let r = exec(&t, &n, &get_lba_status(100, 24), &[]).await;
    assert_eq!(r.data_in.len(), 24);
    assert_eq!(
        &r.data_in[0..4],
        &(4 + 16 * descs.len() as u32).to_be_bytes()
    );
    // Last block, and zero allocation length.
    assert_good(&exec(&t, &n, &get_lba_status(8191, 24), &[]).await);
    let r = exec(&t, &n, &get_lba_status(0, 0), &[]).await;
    assert_good(&r);
    assert!(r.data_in.is_empty());
    assert_sense(
        &exec(&t, &n, &get_lba_status(8192, 24), &[]).await,
        5,
        0x21,
        0,
    );
}

#[tokio::test]
async fn write_same() {
    let t = memory_target(MIB); // 2048 blocks
    let n = nexus(1);
    let block = pattern(512, 77);
    assert_good(&exec(&t, &n, &rw10(0x41, 100, 300, 0), &block).await);
    let r = exec(&t, &n, &rw10(0x28, 100, 300, 0), &[]).await;
    assert!(r.data_in.chunks(512).all(|c| c == &block[..]));
    // UNMAP with a zero block deallocates: reads back zero.
    assert_good(&exec(&t, &n, &rw10(0x41, 100, 10, 0x08), &[0; 512]).await);
    let r = exec(&t, &n, &rw10(0x28, 100, 11, 0), &[]).await;
    assert!(r.data_in[..5120].iter().all(|&b| b == 0));
    assert_eq!(&r.data_in[5120..], &block[..]);
    // UNMAP deallocates whatever the block holds (LBPRZ: zeros).
    assert_good(&exec(&t, &n, &rw10(0x41, 100, 2, 0), &block).await);
    assert_good(&exec(&t, &n, &rw16(0x93, 100, 2, 0x08), &block).await);
    let r = exec(&t, &n, &rw10(0x28, 100, 2, 0), &[]).await;
    assert!(r.data_in.iter().all(|&b| b == 0));
    // NDOB: zeros without a data block.
    assert_good(&exec(&t, &n, &rw16(0x93, 100, 2, 0x01), &[]).await);
    let r = exec(&t, &n, &rw10(0x28, 100, 2, 0), &[]).await;
    assert!(r.data_in.iter().all(|&b| b == 0));
    // Zero blocks means "to the end".
    assert_good(&exec(&t, &n, &rw10(0x41, 2000, 0, 0), &block).await);
    let r = exec(&t, &n, &rw10(0x28, 2000, 48, 0), &[]).await;
    assert!(r.data_in.chunks(512).all(|c| c == &block[..]));
    assert_sense(
        &exec(&t, &n, &rw10(0x41, 2049, 0, 0), &block).await,
        5,
        0x21,
        0,
    );
    assert_good(&exec(&t, &n, &rw10(0x41, 2048, 0, 0), &block).await);
    // Out of range, and wrong Data-Out sizes.
    assert_sense(
        &exec(&t, &n, &rw10(0x41, 2047, 2, 0), &block).await,
        5,
        0x21,
        0,
    );
    assert_sense(
        &exec(&t, &n, &rw16(0x93, u64::MAX, 1, 0), &block).await,
        5,
        0x21,
        0,
    );
    assert_sense(
        &exec(&t, &n, &rw10(0x41, 0, 1, 0x08), &block[..256]).await,
        5,
        0x0e,
        0x03,
    );
    assert_sense(
        &exec(&t, &n, &rw10(0x41, 0, 1, 0), &[0; 1024]).await,
        5,
        0x0e,
        0x03,
    );
    // More than MAXIMUM WRITE SAME LENGTH.
    let big = memory_target(4 << 30);
    let r = exec(&big, &n, &rw16(0x93, 0, (1 << 22) + 1, 0), &block).await;
    assert_sense(&r, 5, 0x24, 0);
    assert_eq!(field_pointer(&r), Some((true, 10)));
    let r = exec(&big, &n, &rw16(0x93, 0, 0, 0x08), &[0; 512]).await;
    assert_sense(&r, 5, 0x24, 0);
}

#[tokio::test]
async fn sync_cache_and_prefetch() {
    let t = memory_target(MIB);
    let n = nexus(1);
    assert_good(&exec(&t, &n, &rw10(0x35, 0, 0, 0x02), &[]).await);
    assert_good(&exec(&t, &n, &rw16(0x91, 2047, 1, 0), &[]).await);
    assert_sense(
        &exec(&t, &n, &rw16(0x91, 2048, 1, 0), &[]).await,
        5,
        0x21,
        0,
    );
    assert_good(&exec(&t, &n, &rw10(0x34, 0, 0, 0x02), &[]).await);
    let mut p = rw10(0x34, 10, 1, 0);
    p[6] = 3; // group number
    assert_good(&exec(&t, &n, &p, &[]).await);
    assert_sense(
        &exec(&t, &n, &rw16(0x90, u64::MAX, 1, 0), &[]).await,
        5,
        0x21,
        0,
    );
}

// ---- modes, sense, opcodes -------------------------------------------------------

#[tokio::test]
async fn mode_sense_and_select_swp() {
    let t = memory_target(MIB);
    let (a, b) = (nexus(1), nexus(2));
    assert_good(&exec(&t, &b, &TUR, &[]).await);
    let r = exec(&t, &a, &[0x1a, 0, 0x3f, 0, 0xff, 0], &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in[0] as usize, r.data_in.len() - 1);
    assert_eq!(r.data_in[2], 0x10, "DPOFUA, writable");
    // Allocation length 4: just the header, no error.
    let r = exec(&t, &a, &[0x1a, 0, 0x3f, 0, 4, 0], &[]).await;
    assert_eq!(r.data_in.len(), 4);
    assert_sense(
        &exec(&t, &a, &[0x1a, 0, 0xff, 0, 0xff, 0], &[]).await,
        5,
        0x39,
        0,
    );
    // Fetch the control page and set SWP through MODE SELECT(6).
    let r = exec(&t, &a, &[0x1a, 0x08, 0x0a, 0, 0xff, 0], &[]).await;
    let mut page = r.data_in[4..].to_vec();
    assert_eq!(page[0], 0x0a);
    page[4] |= 0x08;
    let mut list = vec![0u8; 4];
    list.extend_from_slice(&page);
    let sel = [0x15, 0x10, 0, 0, list.len() as u8, 0];
    assert_good(&exec(&t, &a, &sel, &list).await);
    assert_sense(
        &exec(&t, &a, &rw10(0x2a, 0, 1, 0), &[0; 512]).await,
        7,
        0x27,
        0x02,
    );
    assert_good(&exec(&t, &a, &rw10(0x28, 0, 1, 0), &[]).await);
    let r = exec(&t, &a, &[0x1a, 0, 0x3f, 0, 0xff, 0], &[]).await;
    assert_eq!(r.data_in[2] & 0x80, 0x80, "WP");
    // The other nexus is told, once.
    assert_sense(&exec(&t, &b, &TUR, &[]).await, 6, 0x2a, 0x01);
    assert_good(&exec(&t, &b, &TUR, &[]).await);
    // Changing an unchangeable field is refused.
    let mut bad = list.clone();
    bad[4 + 3] = 0;
    let r = exec(&t, &a, &sel, &bad).await;
    assert_sense(&r, 5, 0x26, 0);
    assert_eq!(field_pointer(&r), Some((false, 7)));
    // Short Data-Out for the parameter list length.
    assert_sense(&exec(&t, &a, &sel, &list[..8]).await, 5, 0x1a, 0);
    // Clear SWP with MODE SELECT(10).
    let mut list10 = vec![0u8; 8];
    page[4] &= !0x08;
    list10.extend_from_slice(&page);
    let sel10 = [0x55, 0x10, 0, 0, 0, 0, 0, 0, list10.len() as u8, 0];
    assert_good(&exec(&t, &a, &sel10, &list10).await);
    assert_good(&exec(&t, &a, &rw10(0x2a, 0, 1, 0), &[0; 512]).await);
}

#[tokio::test]
async fn write_cache_disable() {
    let t = memory_target(MIB);
    let n = nexus(1);
    let r = exec(&t, &n, &[0x1a, 0x08, 0x08, 0, 0xff, 0], &[]).await;
    let mut page = r.data_in[4..].to_vec();
    assert_eq!(page[2] & 0x04, 0x04, "WCE");
    page[2] &= !0x04;
    let mut list = vec![0u8; 4];
    list.extend_from_slice(&page);
    assert_good(&exec(&t, &n, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list).await);
    let r = exec(&t, &n, &[0x1a, 0x08, 0x08, 0, 0xff, 0], &[]).await;
    assert_eq!(r.data_in[4 + 2] & 0x04, 0);
    assert_good(&exec(&t, &n, &rw10(0x2a, 0, 1, 0), &[1; 512]).await);
}

#[tokio::test]
async fn request_sense_and_unknown_opcodes() {
    let t = memory_target(MIB);
    let n = nexus(1);
    let r = exec(&t, &n, &[0x03, 0, 0, 0, 252, 0], &[]).await;
    assert_good(&r);
    assert_eq!(r.data_in.len(), 18);
    assert_eq!((r.data_in[2], r.data_in[12]), (0, 0), "NO SENSE");
    let r = exec(&t, &n, &[0x03, 0, 0, 0, 8, 0], &[]).await;
    assert_eq!(r.data_in.len(), 8);
    // Descriptor format is not supported.
    assert_sense(
        &exec(&t, &n, &[0x03, 1, 0, 0, 252, 0], &[]).await,
        5,
        0x24,
        0,
    );
    // Unsupported opcodes (ORWRITE, SANITIZE, EXTENDED COPY, WRITE ATOMIC).
    for op in [0x8bu8, 0x48, 0x83, 0x9c, 0x04, 0xff] {
        assert_sense(
            &exec(
                &t,
                &n,
                &[op, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &[],
            )
            .await,
            5,
            0x20,
            0,
        );
    }
    // Unsupported service actions point at byte 1.
    let r = exec(
        &t,
        &n,
        &[0x9e, 0x13, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        &[],
    )
    .await;
    assert_sense(&r, 5, 0x24, 0);
    assert_eq!(field_pointer(&r), Some((true, 1)));
    let r = exec(&t, &n, &[0x5e, 0x04, 0, 0, 0, 0, 0, 0, 8, 0], &[]).await;
    assert_sense(&r, 5, 0x24, 0);
    // NACA in the control byte.
    assert_sense(&exec(&t, &n, &[0, 0, 0, 0, 0, 0x04], &[]).await, 5, 0x24, 0);
}

#[tokio::test]
async fn report_supported_opcodes() {
    let t = memory_target(MIB);
    let n = nexus(1);
    let rsoc = |rctd: bool, options: u8, op: u8, sa: u16, alloc: u32| {
        let mut c = [0u8; 12];
        c[0] = 0xa3;
        c[1] = 0x0c;
        c[2] = options | if rctd { 0x80 } else { 0 };
        c[3] = op;
        c[4..6].copy_from_slice(&sa.to_be_bytes());
        c[6..10].copy_from_slice(&alloc.to_be_bytes());
        c
    };
    let r = exec(&t, &n, &rsoc(false, 0, 0, 0, 65535), &[]).await;
    assert_good(&r);
    let len = u32::from_be_bytes(r.data_in[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, r.data_in.len());
    // Every listed command can be asked about on its own.
    for d in r.data_in[4..].chunks(8) {
        let (op, sa, servactv) = (d[0], u16::from_be_bytes([d[2], d[3]]), d[5] & 1 != 0);
        let options = if servactv { 2 } else { 1 };
        let one = exec(&t, &n, &rsoc(false, options, op, sa, 512), &[]).await;
        assert_good(&one);
        assert_eq!(one.data_in[1] & 0x07, 0x03);
        assert_eq!(one.data_in[4], op);
        let wrong = exec(&t, &n, &rsoc(false, 3 - options, op, sa, 512), &[]).await;
        assert_sense(&wrong, 5, 0x24, 0);
    }
    let r = exec(&t, &n, &rsoc(true, 0, 0, 0, 65535), &[]).await;
    assert!(r.data_in[4..]
        .chunks(20)
        .all(|d| d[5] & 0x02 != 0 && d[9] == 0x0a));
    let r = exec(&t, &n, &rsoc(false, 0, 0, 0, 10), &[]).await;
    assert_eq!(r.data_in.len(), 10);
    assert_sense(
        &exec(&t, &n, &rsoc(false, 5, 0, 0, 100), &[]).await,
        5,
        0x24,
        0,
    );
}

// ---- reservations and unit attentions -----------------------------------------------

#[tokio::test]
async fn reserve6_between_two_nexuses() {
    let t = memory_target(MIB);
    let (a, b) = (nexus(1), nexus(2));
    let (reserve, release) = ([0x16, 0, 0, 0, 0, 0], [0x17, 0, 0, 0, 0, 0]);
    assert_good(&exec(&t, &a, &reserve, &[]).await);
    assert_good(&exec(&t, &a, &reserve, &[]).await);
    assert_eq!(
        exec(&t, &b, &reserve, &[]).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_good(&exec(&t, &b, &release, &[]).await); // a no-op
    assert_eq!(
        exec(&t, &b, &[0x1a, 0, 0x3f, 0, 0xff, 0], &[]).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_eq!(
        exec(&t, &b, &rw10(0x28, 0, 1, 0), &[]).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_good(&exec(&t, &b, &inquiry(false, 0, 96), &[]).await);
    assert_good(&exec(&t, &a, &[0x1a, 0, 0x3f, 0, 0xff, 0], &[]).await);
    assert_good(&exec(&t, &a, &release, &[]).await);
    assert_good(&exec(&t, &b, &reserve, &[]).await);
    // The holder's session ends: the reservation goes with it.
    t.nexus_lost(&b);
    assert_good(&exec(&t, &a, &reserve, &[]).await);
    // b comes back and learns of the loss first.
    assert_sense(&exec(&t, &b, &TUR, &[]).await, 6, 0x29, 0x07);
    assert_eq!(
        exec(&t, &b, &TUR, &[]).await.status,
        status::RESERVATION_CONFLICT
    );
}

#[tokio::test]
async fn lun_reset_releases_and_raises_unit_attention_once() {
    let t = memory_target(MIB);
    let (a, b) = (nexus(1), nexus(2));
    assert_good(&exec(&t, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await);
    assert_eq!(
        exec(&t, &b, &TUR, &[]).await.status,
        status::RESERVATION_CONFLICT
    );
    t.lun_reset(0);
    t.lun_reset(5); // no such LUN: nothing happens
                    // INQUIRY and REPORT LUNS do not report or clear it.
    assert_good(&exec(&t, &b, &inquiry(false, 0, 96), &[]).await);
    // The next other command does, once, on every nexus.
    assert_sense(&exec(&t, &b, &TUR, &[]).await, 6, 0x29, 0x03);
    assert_good(&exec(&t, &b, &TUR, &[]).await);
    // REQUEST SENSE returns it as data and clears it.
    let r = exec(&t, &a, &[0x03, 0, 0, 0, 18, 0], &[]).await;
    assert_good(&r);
    assert_eq!(
        (r.data_in[2], r.data_in[12], r.data_in[13]),
        (6, 0x29, 0x03)
    );
    assert_good(&exec(&t, &a, &TUR, &[]).await);
    // The RESERVE(6) is gone.
    assert_good(&exec(&t, &b, &[0x16, 0, 0, 0, 0, 0], &[]).await);
}

#[tokio::test]
async fn target_resets() {
    let t = memory_target(MIB);
    let n = nexus(1);
    // Turn SWP on, then a warm reset keeps it, a cold reset restores it.
    let r = exec(&t, &n, &[0x1a, 0x08, 0x0a, 0, 0xff, 0], &[]).await;
    let mut list = vec![0u8; 4];
    list.extend_from_slice(&r.data_in[4..]);
    list[8] |= 0x08;
    assert_good(&exec(&t, &n, &[0x15, 0x10, 0, 0, list.len() as u8, 0], &list).await);
    t.target_reset(false);
    assert_sense(&exec(&t, &n, &TUR, &[]).await, 6, 0x29, 0x03);
    assert_sense(
        &exec(&t, &n, &rw10(0x2a, 0, 1, 0), &[0; 512]).await,
        7,
        0x27,
        0x02,
    );
    t.target_reset(true);
    assert_sense(
        &exec(&t, &n, &rw10(0x2a, 0, 1, 0), &[0; 512]).await,
        6,
        0x29,
        0x01,
    );
    assert_good(&exec(&t, &n, &rw10(0x2a, 0, 1, 0), &[0; 512]).await);
}

#[tokio::test]
async fn persistent_reservations_between_two_nexuses() {
    let t = memory_target(MIB);
    let (a, b) = (nexus(1), nexus(2));
    let run = |n: &Nexus, (c, p): ([u8; 10], Vec<u8>)| {
        let n = n.clone();
        let t = &t;
        async move { exec(t, &n, &c, &p).await }
    };
    assert_good(&run(&a, prout(6, 0, 0, 0xaa)).await);
    assert_good(&run(&b, prout(6, 0, 0, 0xbb)).await);
    assert_good(&run(&a, prout(1, 3, 0xaa, 0)).await); // EXCLUSIVE ACCESS
    assert_eq!(
        exec(&t, &b, &rw10(0x28, 1, 1, 0), &[]).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_good(&exec(&t, &b, &TUR, &[]).await);
    assert_good(&exec(&t, &a, &rw10(0x2a, 1, 1, 0), &[3; 512]).await);
    // READ KEYS and READ RESERVATION from the other nexus are allowed.
    let r = exec(&t, &b, &[0x5e, 0, 0, 0, 0, 0, 0, 0x40, 0, 0], &[]).await;
    assert_good(&r);
    assert_eq!(&r.data_in[4..8], &16u32.to_be_bytes());
    let r = exec(&t, &b, &[0x5e, 1, 0, 0, 0, 0, 0, 0x40, 0, 0], &[]).await;
    assert_eq!(&r.data_in[8..16], &0xaau64.to_be_bytes());
    assert_eq!(r.data_in[21], 3);
    // Truncated READ KEYS keeps the real ADDITIONAL LENGTH.
    let r = exec(&t, &b, &[0x5e, 0, 0, 0, 0, 0, 0, 0, 8, 0], &[]).await;
    assert_eq!(r.data_in.len(), 8);
    assert_eq!(&r.data_in[4..8], &16u32.to_be_bytes());
    // b preempts a: a's registration goes and a is told.
    assert_good(&run(&b, prout(4, 1, 0xbb, 0xaa)).await);
    assert_sense(&exec(&t, &a, &TUR, &[]).await, 6, 0x2a, 0x05);
    // WRITE EXCLUSIVE now held by b: a may read, not write.
    assert_good(&exec(&t, &a, &rw10(0x28, 1, 1, 0), &[]).await);
    assert_eq!(
        exec(&t, &a, &rw10(0x2a, 1, 1, 0), &[0; 512]).await.status,
        status::RESERVATION_CONFLICT
    );
    // RESERVE(6) under a persistent reservation: conflict for a, no-op for b.
    assert_eq!(
        exec(&t, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await.status,
        status::RESERVATION_CONFLICT
    );
    assert_good(&exec(&t, &b, &[0x16, 0, 0, 0, 0, 0], &[]).await);
    // Registrations survive a LUN reset.
    t.lun_reset(0);
    let _ = exec(&t, &b, &TUR, &[]).await;
    let r = exec(&t, &b, &[0x5e, 1, 0, 0, 0, 0, 0, 0x40, 0, 0], &[]).await;
    assert_eq!(&r.data_in[8..16], &0xbbu64.to_be_bytes());
    // CLEAR drops everything.
    assert_good(&run(&b, prout(3, 0, 0xbb, 0)).await);
    let _ = exec(&t, &a, &TUR, &[]).await;
    assert_good(&exec(&t, &a, &rw10(0x2a, 1, 1, 0), &[0; 512]).await);
    // Wrong parameter list length.
    let (mut c, p) = prout(6, 0, 0, 1);
    c[8] = 23;
    assert_sense(&exec(&t, &a, &c, &p).await, 5, 0x1a, 0);
}

// ---- data direction ------------------------------------------------------------

#[test]
fn data_direction() {
    let t = memory_target(MIB);
    assert_eq!(
        t.data_direction(0, &rw10(0x28, 0, 4, 0)),
        DataDirection::In { len: 2048 }
    );
    assert_eq!(
        t.data_direction(0, &rw10(0x2a, 0, 4, 0)),
        DataDirection::Out { len: 2048 }
    );
    assert_eq!(
        t.data_direction(0, &rw10(0x28, 0, 0, 0)),
        DataDirection::None
    );
    assert_eq!(
        t.data_direction(0, &[0x08, 0, 0, 0, 0, 0]),
        DataDirection::In { len: 256 * 512 }
    );
    assert_eq!(
        t.data_direction(0, &caw(0, 3)),
        DataDirection::Out { len: 3072 }
    );
    // A zero-length COMPARE AND WRITE asks for one byte to catch a mismatch.
    assert_eq!(
        t.data_direction(0, &caw(0, 0)),
        DataDirection::Out { len: 1 }
    );
    assert_eq!(
        t.data_direction(0, &rw10(0x41, 0, 100, 0)),
        DataDirection::Out { len: 512 }
    );
    assert_eq!(
        t.data_direction(0, &rw16(0x93, 0, 100, 1)),
        DataDirection::None
    );
    assert_eq!(
        t.data_direction(0, &rw10(0x2f, 0, 4, 0)),
        DataDirection::None
    );
    assert_eq!(
        t.data_direction(0, &rw10(0x2f, 0, 4, 2)),
        DataDirection::Out { len: 2048 }
    );
    assert_eq!(
        t.data_direction(0, &unmap_cdb(24)),
        DataDirection::Out { len: 24 }
    );
    assert_eq!(
        t.data_direction(0, &inquiry(false, 0, 255)),
        DataDirection::In { len: 255 }
    );
    // Too large to be valid: nothing is solicited.
    assert_eq!(
        t.data_direction(0, &rw16(0x8a, 0, u32::MAX, 0)),
        DataDirection::None
    );
    let (mut c, _) = prout(0, 0, 0, 0);
    c[5..9].copy_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(t.data_direction(0, &c), DataDirection::None);
    // Malformed or unknown.
    assert_eq!(t.data_direction(0, &[0x8b; 16]), DataDirection::None);
    assert_eq!(
        t.data_direction(0, &[0x28, 0x01, 0, 0, 0, 0, 0, 0, 1, 0]),
        DataDirection::None
    );
    assert_eq!(t.data_direction(0, &[]), DataDirection::None);
    // Absent LUN: only INQUIRY, REQUEST SENSE and REPORT LUNS move data.
    assert_eq!(
        t.data_direction(9, &inquiry(false, 0, 96)),
        DataDirection::In { len: 96 }
    );
    assert_eq!(
        t.data_direction(9, &[0x03, 0, 0, 0, 18, 0]),
        DataDirection::In { len: 18 }
    );
    assert_eq!(
        t.data_direction(9, &rw10(0x28, 0, 1, 0)),
        DataDirection::None
    );
    let mut rl = [0u8; 12];
    rl[0] = 0xa0;
    rl[9] = 64;
    assert_eq!(t.data_direction(9, &rl), DataDirection::In { len: 64 });
}

// ---- stores ----------------------------------------------------------------------

/// A temporary image file, removed on drop (no tempfile dev-dependency here).
struct TempImage(std::path::PathBuf);

impl TempImage {
    fn new(tag: &str) -> TempImage {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        TempImage(std::env::temp_dir().join(format!(
            "longwire-scsi-{}-{tag}-{n}.img",
            std::process::id()
        )))
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn file_volume_end_to_end() {
    let img = TempImage::new("e2e");
    let vol = FileVolume::open(&img.0, Some(8 * MIB), false).unwrap();
    let t = target_with(Arc::new(vol));
    let n = nexus(1);
    let data = pattern(256 * 512, 1);
    assert_good(&exec(&t, &n, &rw16(0x8a, 0, 256, 0x08), &data).await);
    let r = exec(&t, &n, &rw16(0x88, 0, 256, 0), &[]).await;
    assert_eq!(&r.data_in[..], &data[..]);
    assert_good(&exec(&t, &n, &rw10(0x35, 0, 0, 0), &[]).await);
    // Unmap a 64 KiB aligned range: zeros, and deallocated in LBA status
    // when the filesystem punches holes.
    assert_good(&exec(&t, &n, &unmap_cdb(24), &unmap_list(&[(128, 128)])).await);
    let r = exec(&t, &n, &rw10(0x28, 128, 128, 0), &[]).await;
    assert!(r.data_in.iter().all(|&b| b == 0));
    let r = exec(&t, &n, &get_lba_status(0, 1024), &[]).await;
    assert_good(&r);
    assert_eq!(&r.data_in[8..16], &0u64.to_be_bytes());
    // COMPARE AND WRITE on a file.
    let mut d = data[..512].to_vec();
    d.extend_from_slice(&[0x5a; 512]);
    assert_good(&exec(&t, &n, &caw(0, 1), &d).await);
    let r = exec(&t, &n, &rw10(0x28, 0, 1, 0), &[]).await;
    assert!(r.data_in.iter().all(|&b| b == 0x5a));
    // WRITE SAME with a pattern larger than one chunk of work.
    assert_good(&exec(&t, &n, &rw16(0x93, 1024, 4096, 0), &[0x77; 512]).await);
    let r = exec(&t, &n, &rw16(0x88, 1024, 4096, 0), &[]).await;
    assert!(r.data_in.iter().all(|&b| b == 0x77));
}

/// A volume whose every operation fails with a chosen error.
struct Failing(fn() -> VolumeError);

#[async_trait]
impl Volume for Failing {
    fn size(&self) -> u64 {
        MIB
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            can_trim: true,
            can_zero: true,
            ..Capabilities::default()
        }
    }
    async fn read(&self, _: u64, _: usize) -> VolumeResult<Bytes> {
        Err((self.0)())
    }
    async fn write(&self, _: u64, _: Bytes, _: bool) -> VolumeResult<()> {
        Err((self.0)())
    }
    async fn flush(&self) -> VolumeResult<()> {
        Err((self.0)())
    }
    async fn write_zeroes(&self, _: u64, _: u64, _: longwire_core::ZeroFlags) -> VolumeResult<()> {
        Err((self.0)())
    }
}

#[tokio::test]
async fn store_failures_map_to_sense() {
    let n = nexus(1);
    let io = target_with(Arc::new(Failing(|| {
        VolumeError::Io(std::io::Error::other("disk on fire"))
    })));
    assert_sense(&exec(&io, &n, &rw10(0x28, 0, 1, 0), &[]).await, 3, 0x11, 0);
    assert_sense(
        &exec(&io, &n, &rw10(0x2a, 0, 1, 0), &[0; 512]).await,
        3,
        0x0c,
        0,
    );
    assert_sense(&exec(&io, &n, &rw10(0x35, 0, 0, 0), &[]).await, 3, 0x0c, 0);
    assert_sense(&exec(&io, &n, &rw10(0x2f, 0, 1, 0), &[]).await, 3, 0x11, 0);
    assert_sense(&exec(&io, &n, &caw(0, 1), &[0; 1024]).await, 3, 0x11, 0);
    assert_sense(
        &exec(&io, &n, &unmap_cdb(24), &unmap_list(&[(0, 1)])).await,
        3,
        0x0c,
        0,
    );
    let full = target_with(Arc::new(Failing(|| VolumeError::NoSpace("full".into()))));
    assert_sense(
        &exec(&full, &n, &rw10(0x2a, 0, 1, 0), &[0; 512]).await,
        7,
        0x27,
        0x07,
    );
    let enospc = target_with(Arc::new(Failing(|| {
        VolumeError::Io(std::io::Error::from_raw_os_error(28))
    })));
    assert_sense(
        &exec(&enospc, &n, &rw10(0x2a, 0, 1, 0), &[0; 512]).await,
        7,
        0x27,
        0x07,
    );
    let down = target_with(Arc::new(Failing(|| VolumeError::Shutdown)));
    assert_eq!(
        exec(&down, &n, &rw10(0x28, 0, 1, 0), &[]).await.status,
        status::BUSY
    );
    let odd = target_with(Arc::new(Failing(|| VolumeError::Invalid("?".into()))));
    assert_sense(&exec(&odd, &n, &rw10(0x28, 0, 1, 0), &[]).await, 4, 0x44, 0);
}

// ---- robustness ---------------------------------------------------------------------

/// xorshift64*: a deterministic generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// Random CDBs for every opcode, with random Data-Out, through execute and
/// data_direction: nothing may panic, and results must be well formed.
#[tokio::test]
async fn random_cdbs_never_panic() {
    let t = Target::new(vec![
        (
            0,
            Arc::new(LogicalUnit::new(
                Arc::new(MemoryVolume::new(MIB)),
                identity("a"),
            )),
        ),
        (
            1,
            Arc::new(LogicalUnit::new(
                Arc::new(ReadOnly::new(Arc::new(MemoryVolume::new(64 * 1024)))),
                identity("b"),
            )),
        ),
    ]);
    let nexuses = [nexus(1), nexus(2), nexus(3)];
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let supported: Vec<u8> = opcodes::SUPPORTED.iter().map(|i| i.opcode).collect();
    for i in 0..40_000u32 {
        let len = match rng.below(4) {
            0 => rng.below(33) as usize,
            _ => 16,
        };
        let mut cdb: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        if let Some(first) = cdb.first_mut() {
            *first = match rng.below(3) {
                0 => i as u8, // every opcode in turn
                _ => supported[rng.below(supported.len() as u64) as usize],
            };
        }
        // Bias towards small, plausible values so deeper paths run.
        if rng.below(2) == 0 {
            for b in cdb.iter_mut().skip(1) {
                if rng.below(3) != 0 {
                    *b &= 0x07;
                }
            }
        }
        let data_len = match rng.below(4) {
            0 => 0,
            1 => rng.below(64) as usize,
            2 => 512 * rng.below(5) as usize,
            _ => rng.below(4096) as usize,
        };
        let data: Vec<u8> = (0..data_len)
            .map(|_| if rng.below(2) == 0 { 0 } else { rng.byte() })
            .collect();
        let lun = rng.below(3);
        let n = &nexuses[rng.below(3) as usize];
        let _ = t.data_direction(lun, &cdb);
        let r = t.execute(n, lun, &cdb, Bytes::from(data)).await;
        match r.status {
            status::CHECK_CONDITION => {
                let s = r.sense.as_ref().expect("sense with CHECK CONDITION");
                assert_eq!(s.len(), 18);
                assert!(r.data_in.is_empty());
            }
            _ => assert!(r.sense.is_none()),
        }
        match rng.below(500) {
            0 => t.lun_reset(lun),
            1 => t.target_reset(rng.below(2) == 0),
            2 => t.nexus_lost(n),
            _ => {}
        }
    }
}

#[test]
fn random_cdbs_decode_never_panics() {
    let mut rng = Rng(42);
    for _ in 0..200_000 {
        let len = rng.below(24) as usize;
        let cdb: Vec<u8> = (0..len).map(|_| rng.byte()).collect();
        if let Ok(cmd) = cdb::decode(&cdb) {
            let _ = cmd.transfer();
        }
    }
}
