//! The mirror's metadata record and the pairing rules (sans-IO).
//!
//! The replica is any NBD server, so there is no side channel for
//! metadata: like DRBD's internal meta-data, the record lives *on the
//! replica volume itself*, in its last 4 KiB, which the mirror never
//! exports. The local side keeps the same record in a small file beside
//! the volume. A record names the pair (a random volume id) and a
//! *generation*: a random number that changes whenever the primary starts
//! writing alone. Comparing the two records on every connection tells a
//! replica that merely missed some writes (resync the dirty regions) from
//! one that was written by someone else, restored from an old copy, or
//! belongs to another volume (refuse: resyncing would overwrite data).

use std::fmt;

/// Bytes reserved for the record at the end of the replica.
pub const RECORD_LEN: usize = 4096;
const MAGIC: &[u8; 8] = b"LWMIRMD1";
const VERSION: u32 = 1;
/// Older generations remembered, to tell "older copy" from "split brain".
pub const HISTORY_LEN: usize = 32;
const FLAG_CONSISTENT: u32 = 1;
const CHECKSUM_AT: usize = RECORD_LEN - 8;

/// One metadata record, local or on the replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Names the pair; random, chosen when the local side first ran.
    pub volume_id: [u8; 16],
    /// The generation this copy of the data is at.
    pub current: u64,
    /// Local record only: the generation last written to the replica's
    /// record (what the replica should still carry), None before the
    /// first pairing.
    pub peer: Option<u64>,
    /// Size of the mirrored data in bytes.
    pub size: u64,
    /// Replica record only: false while a resync is writing to it (its
    /// contents are a mix of old and new until the resync finishes).
    pub consistent: bool,
    /// Earlier generations of this copy, newest last.
    pub history: Vec<u64>,
}

/// Why 4 KiB of bytes are not a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// All zeros: nothing was ever written there.
    Blank,
    /// Something else lives there (another file system, an image).
    NotARecord,
    /// Our magic, but a checksum or version that does not match.
    Corrupt(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Blank => write!(f, "no mirror metadata (the last 4 KiB are zeros)"),
            DecodeError::NotARecord => {
                write!(f, "no mirror metadata (the last 4 KiB hold other data)")
            }
            DecodeError::Corrupt(why) => write!(f, "damaged mirror metadata: {why}"),
        }
    }
}

impl Record {
    /// A new record for a volume that was never mirrored.
    pub fn new(volume_id: [u8; 16], generation: u64, size: u64) -> Record {
        Record {
            volume_id,
            current: generation,
            peer: None,
            size,
            consistent: true,
            history: Vec::new(),
        }
    }

    /// Start a new generation (the primary is about to write alone).
    pub fn next_generation(&mut self, generation: u64) {
        self.history.push(self.current);
        if self.history.len() > HISTORY_LEN {
            self.history.remove(0);
        }
        self.current = generation;
    }

    /// The 4 KiB on-disk form.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; RECORD_LEN];
        b[..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let flags = if self.consistent { FLAG_CONSISTENT } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_id);
        b[32..40].copy_from_slice(&self.current.to_le_bytes());
        b[40..48].copy_from_slice(&self.peer.unwrap_or(0).to_le_bytes());
        b[48..56].copy_from_slice(&self.size.to_le_bytes());
        let n = self.history.len().min(HISTORY_LEN);
        b[56..60].copy_from_slice(&(n as u32).to_le_bytes());
        for (i, g) in self.history[self.history.len() - n..].iter().enumerate() {
            b[64 + i * 8..72 + i * 8].copy_from_slice(&g.to_le_bytes());
        }
        let sum = checksum(&b[..CHECKSUM_AT]);
        b[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Record, DecodeError> {
        if b.len() != RECORD_LEN {
            return Err(DecodeError::Corrupt(format!(
                "{} bytes, expected {RECORD_LEN}",
                b.len()
            )));
        }
        if b.iter().all(|&x| x == 0) {
            return Err(DecodeError::Blank);
        }
        if &b[..8] != MAGIC {
            return Err(DecodeError::NotARecord);
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        if u64_at(CHECKSUM_AT) != checksum(&b[..CHECKSUM_AT]) {
            return Err(DecodeError::Corrupt("checksum mismatch".into()));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(DecodeError::Corrupt(format!(
                "format version {version}, this longwire reads {VERSION}"
            )));
        }
        let n = u32_at(56) as usize;
        if n > HISTORY_LEN {
            return Err(DecodeError::Corrupt(format!(
                "{n} history entries, at most {HISTORY_LEN}"
            )));
        }
        let peer = u64_at(40);
        Ok(Record {
            volume_id: b[16..32].try_into().unwrap(),
            current: u64_at(32),
            peer: (peer != 0).then_some(peer),
            size: u64_at(48),
            consistent: u32_at(12) & FLAG_CONSISTENT != 0,
            history: (0..n).map(|i| u64_at(64 + i * 8)).collect(),
        })
    }
}

/// FNV-1a, 64 bit: enough to catch a torn or foreign block, no dependency.
fn checksum(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// What to do with a replica after reading its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Never paired (or forced): copy everything the local side holds.
    FullSync,
    /// The replica missed only what the dirty bitmap records.
    Resync,
    /// Resyncing would overwrite data that may matter; the reason says why.
    Refuse(String),
}

/// The pairing rules, in the spirit of DRBD's generation identifiers.
pub fn decide(local: &Record, replica: &Result<Record, DecodeError>) -> Decision {
    let gen = |g: u64| format!("{g:016x}");
    let r = match replica {
        Err(e @ (DecodeError::Blank | DecodeError::NotARecord)) => {
            return match local.peer {
                None => Decision::FullSync,
                Some(peer) => Decision::Refuse(format!(
                    "the replica has {e}, but this volume was paired with a replica at generation {}: \
                     it is another volume, or it was wiped",
                    gen(peer)
                )),
            };
        }
        Err(e) => return Decision::Refuse(format!("the replica has {e}")),
        Ok(r) => r,
    };
    if r.volume_id != local.volume_id {
        return Decision::Refuse(format!(
            "the replica belongs to another mirrored volume (id {}, this one is {})",
            hex(&r.volume_id),
            hex(&local.volume_id)
        ));
    }
    if r.size != local.size {
        return Decision::Refuse(format!(
            "the replica's record is for a {}-byte volume, this one is {} bytes",
            r.size, local.size
        ));
    }
    if r.current == local.current || Some(r.current) == local.peer {
        return Decision::Resync;
    }
    if local.history.contains(&r.current) {
        return Decision::Refuse(format!(
            "the replica is at generation {}, older than the {} it had when the pair last split: \
             it was restored from an older copy, and the dirty map does not cover the difference",
            gen(r.current),
            local.peer.map(gen).unwrap_or_else(|| "one".into())
        ));
    }
    Decision::Refuse(format!(
        "split brain: the replica is at generation {}, which this volume never had; \
         something else wrote to it as a primary",
        gen(r.current)
    ))
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Record {
        let mut r = Record::new([7; 16], 100, 1 << 20);
        r.peer = Some(100);
        r
    }

    #[test]
    fn round_trip_and_damage() {
        let mut r = local();
        for g in 101..140 {
            r.next_generation(g);
        }
        assert_eq!(r.history.len(), HISTORY_LEN);
        let b = r.encode();
        assert_eq!(Record::decode(&b), Ok(r.clone()));
        let mut bad = b.clone();
        bad[40] ^= 1;
        assert!(matches!(Record::decode(&bad), Err(DecodeError::Corrupt(_))));
        assert_eq!(Record::decode(&[0u8; RECORD_LEN]), Err(DecodeError::Blank));
        assert_eq!(
            Record::decode(&[0xaa; RECORD_LEN]),
            Err(DecodeError::NotARecord)
        );
    }

    #[test]
    fn pairing_rules() {
        let mut l = Record::new([7; 16], 100, 1 << 20);
        // Never paired, blank replica: full sync.
        assert_eq!(decide(&l, &Err(DecodeError::Blank)), Decision::FullSync);
        l.peer = Some(100);
        // Paired before, replica now blank or foreign: refuse.
        assert!(
            matches!(decide(&l, &Err(DecodeError::Blank)), Decision::Refuse(m) if m.contains("wiped"))
        );
        assert!(matches!(
            decide(&l, &Err(DecodeError::NotARecord)),
            Decision::Refuse(_)
        ));
        let mut r = l.clone();
        r.peer = None;
        assert_eq!(decide(&l, &Ok(r.clone())), Decision::Resync);
        // Local went on alone: a new generation; the replica still has the old.
        l.next_generation(200);
        assert_eq!(decide(&l, &Ok(r.clone())), Decision::Resync);
        // Another volume.
        let mut other = r.clone();
        other.volume_id = [8; 16];
        assert!(
            matches!(decide(&l, &Ok(other)), Decision::Refuse(m) if m.contains("another mirrored volume"))
        );
        // Written elsewhere as a primary.
        let mut split = r.clone();
        split.next_generation(999);
        assert!(matches!(decide(&l, &Ok(split)), Decision::Refuse(m) if m.contains("split brain")));
        // Restored from an older copy: a generation from local history, not the peer's.
        l.peer = Some(200);
        l.next_generation(300);
        assert!(matches!(decide(&l, &Ok(r)), Decision::Refuse(m) if m.contains("older copy")));
    }
}
