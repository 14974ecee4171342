//! Composite layers ([`Concat`], [`Stripe`]) over real
//! `longwire_store::MemoryVolume` parts: data written through the composite
//! lands in the expected bytes of each part (checked by reading the parts
//! directly), requests crossing part and stripe boundaries are split and
//! run concurrently, capabilities are the intersection of the parts', and
//! bad geometry is refused with a clear error.
//!
//! (These live in `tests/` rather than next to the code because
//! `longwire-store` depends on `longwire-core`: inside the crate's own unit
//! tests its `MemoryVolume` would implement a different copy of `Volume`.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use longwire_core::layers::{Concat, ReadOnly, Stripe};
use longwire_core::{Capabilities, Extent, ExtentKind, ReadSegment, Volume, VolumeError, VolumeResult, ZeroFlags};
use longwire_store::MemoryVolume;
use tokio::sync::Barrier;

const K: u64 = 1024;

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn mem(size: u64) -> Arc<MemoryVolume> {
    Arc::new(MemoryVolume::new(size))
}

fn dyns(parts: &[Arc<MemoryVolume>]) -> Vec<Arc<dyn Volume>> {
    parts.iter().map(|p| p.clone() as Arc<dyn Volume>).collect()
}

fn flatten(segs: &[ReadSegment]) -> Vec<u8> {
    let mut v = Vec::new();
    for s in segs {
        match s {
            ReadSegment::Data(d) => v.extend_from_slice(d),
            ReadSegment::Zero(n) => v.resize(v.len() + *n as usize, 0),
        }
    }
    v
}

/// Independent reference mappings: composite offset → (part, part offset).
fn concat_locate(sizes: &[u64], mut off: u64) -> (usize, u64) {
    for (i, &s) in sizes.iter().enumerate() {
        if off < s {
            return (i, off);
        }
        off -= s;
    }
    panic!("offset past the end");
}

fn stripe_locate(n: u64, stripe: u64, off: u64) -> (usize, u64) {
    let k = off / stripe;
    ((k % n) as usize, (k / n) * stripe + off % stripe)
}

/// Every byte of `data` written at `offset` is where `locate` says, in the part.
async fn check_parts(parts: &[Arc<MemoryVolume>], offset: u64, data: &[u8], locate: impl Fn(u64) -> (usize, u64)) {
    let mut contents = Vec::new();
    for p in parts {
        contents.push(p.read(0, p.size() as usize).await.unwrap());
    }
    for (i, &b) in data.iter().enumerate() {
        let (p, po) = locate(offset + i as u64);
        let got = contents[p][po as usize];
        assert_eq!(got, b, "byte {} of the composite should be byte {po} of part {p}", offset + i as u64);
    }
}

#[tokio::test]
async fn concat_writes_across_boundaries_land_in_each_part() {
    let sizes = [64 * K, 128 * K, 32 * K];
    let parts: Vec<_> = sizes.iter().map(|&s| mem(s)).collect();
    let vol = Concat::new(dyns(&parts)).unwrap();
    assert_eq!(vol.size(), 224 * K);

    // Crossing the first boundary: the tail of part 0 and the head of part 1.
    let d = pattern(1, 8 * K as usize);
    vol.write(60 * K, Bytes::from(d.clone()), false).await.unwrap();
    assert_eq!(&parts[0].read(60 * K, 4 * K as usize).await.unwrap()[..], &d[..4 * K as usize]);
    assert_eq!(&parts[1].read(0, 4 * K as usize).await.unwrap()[..], &d[4 * K as usize..]);

    // Spanning all three parts, then every byte checked against the reference mapping.
    let d = pattern(2, 200 * K as usize);
    vol.write(20 * K, Bytes::from(d.clone()), true).await.unwrap();
    check_parts(&parts, 20 * K, &d, |o| concat_locate(&sizes, o)).await;
    assert_eq!(&vol.read(20 * K, d.len()).await.unwrap()[..], &d[..]);

    // Sparse reads stitch holes across parts.
    vol.write_zeroes(0, 224 * K, ZeroFlags { may_trim: true, ..Default::default() }).await.unwrap();
    vol.write(64 * K - 512, Bytes::from(vec![7; 1024]), false).await.unwrap();
    let segs = vol.read_sparse(0, 224 * K as usize).await.unwrap();
    let flat = flatten(&segs);
    assert_eq!(flat.len(), 224 * K as usize);
    assert!(flat[..64 * K as usize - 512].iter().all(|&b| b == 0));
    assert!(flat[64 * K as usize - 512..64 * K as usize + 512].iter().all(|&b| b == 7));
    assert!(matches!(segs.last(), Some(ReadSegment::Zero(_))), "{segs:?}");

    // Trim across a boundary punches both parts (memory reads trimmed data as zeros).
    vol.trim(64 * K - 512, 1024, false).await.unwrap();
    assert_eq!(&parts[0].read(64 * K - 512, 512).await.unwrap()[..], &[0; 512][..]);
    assert_eq!(&parts[1].read(0, 512).await.unwrap()[..], &[0; 512][..]);
}

#[tokio::test]
async fn concat_extents_are_stitched_across_parts() {
    let parts = vec![mem(64 * K), mem(64 * K), mem(64 * K)];
    let vol = Concat::new(dyns(&parts)).unwrap();
    // Data at the end of part 0 and the start of part 2; part 1 untouched.
    vol.write(0, Bytes::from(vec![1; 64 * K as usize]), false).await.unwrap();
    vol.write(128 * K, Bytes::from(vec![2; 64 * K as usize]), false).await.unwrap();
    let ext = vol.extents(0, 192 * K).await.unwrap();
    assert_eq!(
        ext,
        vec![
            Extent::new(64 * K, ExtentKind::Data),
            Extent::new(64 * K, ExtentKind::Hole),
            Extent::new(64 * K, ExtentKind::Data)
        ]
    );
    // A query starting inside a part, crossing into the next.
    let ext = vol.extents(32 * K, 64 * K).await.unwrap();
    assert_eq!(ext, vec![Extent::new(32 * K, ExtentKind::Data), Extent::new(32 * K, ExtentKind::Hole)]);
}

#[tokio::test]
async fn stripe_writes_land_in_the_right_stripe_of_each_part() {
    let (n, stripe) = (3u64, 16 * K);
    let parts: Vec<_> = (0..n).map(|_| mem(128 * K)).collect();
    let vol = Stripe::new(dyns(&parts), stripe).unwrap();
    assert_eq!(vol.size(), 384 * K);

    // 64 KiB starting mid-stripe: part 0 row 0 (second half), part 1 row 0,
    // part 2 row 0, part 0 row 1, and the first half of part 1 row 1.
    let d = pattern(3, 64 * K as usize);
    vol.write(8 * K, Bytes::from(d.clone()), false).await.unwrap();
    let h = 8 * K as usize;
    let s = 16 * K as usize;
    assert_eq!(&parts[0].read(8 * K, h).await.unwrap()[..], &d[..h]);
    assert_eq!(&parts[1].read(0, s).await.unwrap()[..], &d[h..h + s]);
    assert_eq!(&parts[2].read(0, s).await.unwrap()[..], &d[h + s..h + 2 * s]);
    assert_eq!(&parts[0].read(16 * K, s).await.unwrap()[..], &d[h + 2 * s..h + 3 * s]);
    assert_eq!(&parts[1].read(16 * K, h).await.unwrap()[..], &d[h + 3 * s..]);

    // Every byte of a large write, against the reference mapping.
    let d = pattern(4, 300 * K as usize);
    vol.write(40 * K, Bytes::from(d.clone()), false).await.unwrap();
    check_parts(&parts, 40 * K, &d, |o| stripe_locate(n, stripe, o)).await;
    assert_eq!(&vol.read(40 * K, d.len()).await.unwrap()[..], &d[..]);
    assert_eq!(flatten(&vol.read_sparse(40 * K, d.len()).await.unwrap()), d);

    // Zeroing a range spanning many stripes clears exactly that range.
    vol.write_zeroes(50 * K, 100 * K, ZeroFlags::default()).await.unwrap();
    let all = vol.read(0, vol.size() as usize).await.unwrap();
    let first = pattern(3, 64 * K as usize);
    for (i, &b) in all.iter().enumerate() {
        let i = i as u64;
        let want = if (50 * K..150 * K).contains(&i) {
            0
        } else if (40 * K..340 * K).contains(&i) {
            d[(i - 40 * K) as usize]
        } else if (8 * K..40 * K).contains(&i) {
            first[(i - 8 * K) as usize]
        } else {
            0
        };
        assert_eq!(b, want, "byte {i}");
    }
}

#[tokio::test]
async fn stripe_extents_follow_the_stripes() {
    let parts = vec![mem(64 * K), mem(64 * K)];
    let vol = Stripe::new(dyns(&parts), 16 * K).unwrap();
    // Only part 1 has data: every other stripe of the composite.
    parts[1].write(0, Bytes::from(vec![5; 64 * K as usize]), false).await.unwrap();
    let ext = vol.extents(0, 64 * K).await.unwrap();
    assert_eq!(
        ext,
        vec![
            Extent::new(16 * K, ExtentKind::Hole),
            Extent::new(16 * K, ExtentKind::Data),
            Extent::new(16 * K, ExtentKind::Hole),
            Extent::new(16 * K, ExtentKind::Data)
        ]
    );
}

#[tokio::test]
async fn geometry_is_checked() {
    let e = Stripe::new(vec![mem(64 * K), mem(32 * K)], 4 * K).err().unwrap();
    assert!(e.to_string().contains("same size: part 0 has 65536 bytes, part 1 has 32768"), "{e}");
    let e = Stripe::new(vec![mem(64 * K), mem(64 * K)], 48 * K).err().unwrap();
    assert!(e.to_string().contains("whole, non-zero number of 49152-byte stripes"), "{e}");
    assert!(Stripe::new(vec![mem(64 * K)], 0).is_err());
    assert!(Stripe::new(vec![], 4096).is_err());
    assert!(Concat::new(vec![]).is_err());
    assert!(Concat::new(vec![mem(4 * K), mem(0)]).err().unwrap().to_string().contains("part 1 of the concatenation is empty"));

    // A part with a 4 KiB minimum block: boundaries and stripes must align to it.
    let big_block: Arc<dyn Volume> = Arc::new(Caps { inner: mem(64 * K), caps: |c| Capabilities { min_block: 4096, ..c } });
    let e = Concat::new(vec![mem(6 * K), big_block.clone()]).err().unwrap();
    assert!(e.to_string().contains("not a multiple of the 4096-byte minimum block size"), "{e}");
    assert!(Stripe::new(vec![mem(64 * K), big_block], 2 * K).is_err());

    let vol = Concat::new(vec![mem(8 * K), mem(8 * K)]).unwrap();
    assert!(matches!(vol.read(12 * K, 8 * K as usize).await, Err(VolumeError::Invalid(_))));
    assert!(matches!(vol.write(12 * K, Bytes::from(vec![0; 8192]), false).await, Err(VolumeError::NoSpace(_))));
}

/// Overrides a volume's capabilities (and counts flushes).
struct Caps<F: Fn(Capabilities) -> Capabilities + Send + Sync + 'static> {
    inner: Arc<MemoryVolume>,
    caps: F,
}

#[async_trait]
impl<F: Fn(Capabilities) -> Capabilities + Send + Sync + 'static> Volume for Caps<F> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        (self.caps)(self.inner.capabilities())
    }
    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> VolumeResult<()> {
        self.inner.flush().await
    }
}

#[tokio::test]
async fn capabilities_are_the_intersection_of_the_parts() {
    let a: Arc<dyn Volume> = mem(64 * K);
    let b: Arc<dyn Volume> = Arc::new(Caps {
        inner: mem(64 * K),
        caps: |c| Capabilities { can_trim: false, can_multi_conn: false, min_block: 512, preferred_block: 8192, max_payload: 1 << 20, ..c },
    });
    for vol in [Arc::new(Concat::new(vec![a.clone(), b.clone()]).unwrap()) as Arc<dyn Volume>, Arc::new(Stripe::new(vec![a.clone(), b.clone()], 4096).unwrap())] {
        let c = vol.capabilities();
        assert!(!c.read_only && !c.can_trim && !c.can_multi_conn && c.can_zero && c.can_flush, "{c:?}");
        assert_eq!((c.min_block, c.preferred_block, c.max_payload), (512, 8192, 1 << 20));
    }
    // One read-only part makes the whole composite read-only, and a write
    // is refused before any part is touched.
    let ro: Arc<dyn Volume> = Arc::new(ReadOnly::new(mem(64 * K)));
    let plain = mem(64 * K);
    let vol = Concat::new(vec![plain.clone(), ro]).unwrap();
    assert!(vol.capabilities().read_only);
    assert!(matches!(vol.write(0, Bytes::from(vec![1; 4096]), false).await, Err(VolumeError::ReadOnly)));
    assert_eq!(&plain.read(0, 4096).await.unwrap()[..], &[0; 4096][..], "nothing written to the writable part");
    // Fast zero needs every part to support it.
    let slow: Arc<dyn Volume> = Arc::new(Caps { inner: mem(64 * K), caps: |c| Capabilities { can_fast_zero: false, ..c } });
    let vol = Stripe::new(vec![a, slow], 4096).unwrap();
    let fast = ZeroFlags { fast: true, ..Default::default() };
    assert!(matches!(vol.write_zeroes(0, 16 * K, fast).await, Err(VolumeError::NotSupported(_))));
}

/// Counts flushes and blocks reads at a barrier, proving the pieces of one
/// request run at the same time (a sequential split would never pass it).
struct Probe {
    inner: Arc<MemoryVolume>,
    gate: Arc<Barrier>,
    flushes: AtomicUsize,
}

#[async_trait]
impl Volume for Probe {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn read(&self, offset: u64, len: usize) -> VolumeResult<Bytes> {
        self.gate.wait().await;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> VolumeResult<()> {
        self.inner.write(offset, data, fua).await
    }
    async fn flush(&self) -> VolumeResult<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn pieces_run_concurrently_and_flush_reaches_every_part() {
    for striped in [false, true] {
        let gate = Arc::new(Barrier::new(3));
        let probes: Vec<Arc<Probe>> = (0..3)
            .map(|_| Arc::new(Probe { inner: mem(64 * K), gate: gate.clone(), flushes: AtomicUsize::new(0) }))
            .collect();
        let parts: Vec<Arc<dyn Volume>> = probes.iter().map(|p| p.clone() as Arc<dyn Volume>).collect();
        let vol: Arc<dyn Volume> =
            if striped { Arc::new(Stripe::new(parts, 16 * K).unwrap()) } else { Arc::new(Concat::new(parts).unwrap()) };
        // One read touching all three parts: only completes if the three
        // part reads wait at the barrier together.
        let (offset, len) = if striped { (0, 48 * K) } else { (60 * K, 72 * K) };
        let r = tokio::time::timeout(Duration::from_secs(5), vol.read(offset, len as usize)).await;
        assert!(r.expect("the pieces of one read must run concurrently").is_ok());
        vol.flush().await.unwrap();
        assert!(probes.iter().all(|p| p.flushes.load(Ordering::SeqCst) == 1), "flush goes to every part");
    }
}
