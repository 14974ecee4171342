//! Read every block of a ledger's range back and judge it.

use std::sync::{Arc, Mutex};

use futures_util::stream::{self, StreamExt};
use longwire_nbd::client::NbdClient;

use crate::block::{self, Observed, BLOCK_SIZE};
use crate::ledger::{Floor, Ledger, Problem};
use crate::writer::read_blocks;

/// Blocks per read request.
const READ_BLOCKS: u64 = 256;
/// Read requests in flight.
const READ_DEPTH: usize = 8;

#[derive(Debug, Default)]
pub struct Verified {
    pub blocks: u64,
    pub zero_blocks: u64,
    /// Blocks that had a covered (or completed, on a live server) operation
    /// and were found holding it or something later.
    pub floors_checked: u64,
    /// Of those, blocks whose floor was set by a FLUSH/FUA since the last
    /// rebase (the writes of the round just ended).
    pub covered_this_round: u64,
    pub problems: Vec<Problem>,
}

/// Read every block and check it against `floor`. With `rebase`, each
/// block's state as read becomes its new history (call only when the
/// caller then flushes before writing again — see [`Ledger::rebase`]).
pub async fn verify_all(
    client: &NbdClient,
    ledger: &Arc<Mutex<Ledger>>,
    floor: Floor,
    rebase: bool,
) -> Result<Verified, String> {
    let (first, len) = {
        let l = ledger.lock().unwrap();
        (l.first(), l.len())
    };
    let pieces: Vec<(u64, u64)> = (0..len.div_ceil(READ_BLOCKS))
        .map(|i| {
            (
                first + i * READ_BLOCKS,
                READ_BLOCKS.min(len - i * READ_BLOCKS),
            )
        })
        .collect();
    let mut reads = stream::iter(pieces)
        .map(|(start, n)| async move { (start, read_blocks(client, start, n).await) })
        .buffer_unordered(READ_DEPTH);
    let mut out = Verified::default();
    while let Some((start, r)) = reads.next().await {
        let data = r?;
        let mut l = ledger.lock().unwrap();
        for (i, b) in data.chunks(BLOCK_SIZE).enumerate() {
            let idx = start + i as u64;
            let observed = block::decode(b, idx);
            out.blocks += 1;
            out.zero_blocks += (observed == Observed::Zero) as u64;
            let had_floor = l.floor(idx, floor) > 0;
            let fresh = l.covered_since_rebase(idx);
            match l.check(idx, observed, floor) {
                Ok(seq) => {
                    out.floors_checked += had_floor as u64;
                    out.covered_this_round += fresh as u64;
                    if rebase {
                        l.rebase(idx, seq);
                    }
                }
                Err(p) => out.problems.push(*p),
            }
        }
    }
    out.problems.sort_by_key(|p| p.block);
    Ok(out)
}
