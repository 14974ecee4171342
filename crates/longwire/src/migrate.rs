//! `longwire migrate SRC DST`: fill DST from SRC with the clone layer, show
//! progress, exit when every region is local and DST is flushed.
//!
//! It is the same machinery as an export with `?clone-from=SRC` (so the
//! bitmap beside DST makes it resumable), only without serving clients.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::cli::MigrateArgs;
use crate::layers::{self, CloneOptions};
use crate::units::human_size;

pub fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(migrate(args))
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let layered = layers::split(&args.dst)?;
    if layered.clone_from.is_some() {
        anyhow::bail!("{}: give the source as SRC, not as clone-from=", args.dst);
    }
    let started = Instant::now();
    let (opened, clone) = layers::open_clone(
        &layered,
        &args.src,
        "migrate",
        CloneOptions {
            timeout: None,
            progress: true,
        },
    )
    .await
    .with_context(|| format!("migrating {} to {}", args.src, args.dst))?;
    let at_start = clone.progress();
    let show = !args.no_progress && std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last_error_logged: Option<String> = None;
    loop {
        tokio::select! {
            _ = clone.wait_complete() => break,
            _ = tick.tick() => {}
        }
        let p = clone.progress();
        if show {
            eprint!(
                "\r{}",
                bar(
                    p.hydrated_bytes,
                    p.total_bytes,
                    p.fetched_bytes,
                    started.elapsed()
                )
            );
            let _ = std::io::stderr().flush();
        }
        if p.source_error != last_error_logged {
            if let Some(e) = &p.source_error {
                eprintln!(
                    "{}longwire: the source is failing, retrying with backoff: {e}",
                    if show { "\n" } else { "" }
                );
            }
            last_error_logged = p.source_error.clone();
        }
    }
    opened
        .volume
        .close()
        .await
        .with_context(|| format!("flushing and closing {}", args.dst))?;
    let p = clone.progress();
    if show {
        eprintln!(
            "\r{}",
            bar(
                p.total_bytes,
                p.total_bytes,
                p.fetched_bytes,
                started.elapsed()
            )
        );
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "migrated {} ({} bytes) from {} to {}: {} bytes fetched, {} bytes of holes skipped, {} bytes already local \
         from an earlier run, {} source errors retried, in {secs:.2} s ({:.1} MB/s)",
        human_size(p.total_bytes),
        p.total_bytes,
        args.src,
        args.dst,
        p.fetched_bytes,
        p.skipped_bytes,
        at_start.hydrated_bytes,
        p.source_errors,
        p.fetched_bytes as f64 / secs.max(1e-6) / 1e6
    );
    Ok(())
}

/// `[#########-----------]  45%  4.5 GiB of 10.0 GiB local, 12.0 MiB fetched, 3.1 MB/s`
fn bar(done: u64, total: u64, fetched: u64, elapsed: Duration) -> String {
    const WIDTH: u64 = 30;
    let frac = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = ((frac * WIDTH as f64) as u64).min(WIDTH);
    format!(
        "[{}{}] {:>3.0}%  {} of {} local, {} fetched, {:.1} MB/s   ",
        "#".repeat(filled as usize),
        "-".repeat((WIDTH - filled) as usize),
        frac * 100.0,
        human_size(done),
        human_size(total),
        human_size(fetched),
        fetched as f64 / elapsed.as_secs_f64().max(1e-3) / 1e6
    )
}
