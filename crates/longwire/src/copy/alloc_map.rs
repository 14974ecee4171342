//! A volume's allocation map as `longwire copy` needs it: which ranges may
//! hold data and which read as zeros, with no finer distinction.
//!
//! SRC's map says what to read. DST's map, taken once before anything is
//! written, says where a SRC zero run must be zeroed on DST: only where DST
//! held data to begin with. Asking DST again during the copy would be
//! wrong in the expensive direction: stores report allocation per chunk
//! (64 KiB for sqlite), so a zero run next to data this copy has just
//! written looks "allocated", and zeroing it rewrote the whole chunk for
//! nothing.

use anyhow::bail;
use longwire_core::Volume;

/// Largest range asked about in one extents call.
const EXTENTS_ASK: u64 = 1 << 30;

/// `len` bytes at `start`, holding data (`data`) or reading as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    pub start: u64,
    pub len: u64,
    pub data: bool,
}

impl Run {
    fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// Runs covering `[0, size)` in order, neighbours of the same kind merged.
#[derive(Debug, Default)]
pub(super) struct AllocationMap {
    runs: Vec<Run>,
}

impl AllocationMap {
    /// Walk `vol`'s extents over `[0, size)`.
    pub async fn read(vol: &dyn Volume, size: u64) -> anyhow::Result<AllocationMap> {
        let mut map = AllocationMap::default();
        let mut off = 0;
        while off < size {
            let exts = vol.extents(off, (size - off).min(EXTENTS_ASK)).await?;
            let before = off;
            for e in exts {
                let len = e.len.min(size - off);
                if len == 0 {
                    break;
                }
                map.push(Run {
                    start: off,
                    len,
                    data: !e.kind.reads_as_zero(),
                });
                off += len;
                if off >= size {
                    break;
                }
            }
            // An empty answer would make this loop spin.
            if off == before {
                bail!("empty allocation map at offset {off}");
            }
        }
        Ok(map)
    }

    fn push(&mut self, run: Run) {
        match self.runs.last_mut() {
            Some(last) if last.data == run.data && last.end() == run.start => last.len += run.len,
            _ => self.runs.push(run),
        }
    }

    pub fn runs(&self) -> &[Run] {
        &self.runs
    }

    /// Bytes in data runs.
    pub fn data_bytes(&self) -> u64 {
        self.runs.iter().filter(|r| r.data).map(|r| r.len).sum()
    }

    /// The parts of `[start, end)` inside data runs, as `(start, end)`
    /// pairs in order.
    pub fn data_within(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first = self.runs.partition_point(|r| r.end() <= start);
        self.runs[first..]
            .iter()
            .take_while(move |r| r.start < end)
            .filter(|r| r.data)
            .map(move |r| (r.start.max(start), r.end().min(end)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use longwire_store::memory::MemoryVolume;

    fn map(runs: &[(u64, u64, bool)]) -> AllocationMap {
        let mut m = AllocationMap::default();
        for &(start, len, data) in runs {
            m.push(Run { start, len, data });
        }
        m
    }

    #[test]
    fn data_within_clips_to_the_range() {
        let m = map(&[
            (0, 10, true),
            (10, 10, false),
            (20, 10, true),
            (30, 10, false),
        ]);
        let got = |s, e| m.data_within(s, e).collect::<Vec<_>>();
        assert_eq!(got(0, 40), vec![(0, 10), (20, 30)]);
        assert_eq!(got(5, 25), vec![(5, 10), (20, 25)]);
        assert_eq!(got(10, 20), vec![]);
        assert_eq!(got(12, 18), vec![]);
        assert_eq!(got(25, 26), vec![(25, 26)]);
        assert_eq!(got(30, 40), vec![]);
        assert_eq!(m.data_bytes(), 20);
    }

    #[test]
    fn neighbours_of_one_kind_merge() {
        let m = map(&[(0, 4, false), (4, 4, false), (8, 4, true), (12, 4, true)]);
        assert_eq!(
            m.runs(),
            &[
                Run {
                    start: 0,
                    len: 8,
                    data: false
                },
                Run {
                    start: 8,
                    len: 8,
                    data: true
                }
            ]
        );
    }

    #[tokio::test]
    async fn read_walks_the_volume_at_its_granularity() {
        let chunk = 64 * 1024;
        let vol = MemoryVolume::new(16 * chunk);
        // 4 KiB of data in chunk 2: the whole chunk counts as data.
        vol.write(2 * chunk + 4096, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        let m = AllocationMap::read(&vol, 16 * chunk).await.unwrap();
        assert_eq!(
            m.runs(),
            &[
                Run {
                    start: 0,
                    len: 2 * chunk,
                    data: false
                },
                Run {
                    start: 2 * chunk,
                    len: chunk,
                    data: true
                },
                Run {
                    start: 3 * chunk,
                    len: 13 * chunk,
                    data: false
                },
            ]
        );
        // A fresh volume is one zero run: nothing would ever be zeroed on it.
        let fresh = AllocationMap::read(&MemoryVolume::new(16 * chunk), 16 * chunk)
            .await
            .unwrap();
        assert_eq!(fresh.data_within(0, 16 * chunk).count(), 0);
    }
}
