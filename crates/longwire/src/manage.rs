//! `longwire create | list | info | delete`: volume management on the
//! command line. The work is [`longwire_store::manage`]'s; this module turns
//! its results into tables or JSON and its errors into advice.

use std::io;

use anyhow::bail;
use longwire_store::manage::{self, CreateOptions, VolumeInfo};
use serde::Serialize;

use crate::cli::{CreateArgs, DeleteArgs, InfoArgs, ListArgs};
use crate::units::human_size;

/// An error from the store with the command-line advice for its kind.
fn advise(e: io::Error, hint_exists: &str) -> anyhow::Error {
    let hint = match e.kind() {
        io::ErrorKind::AlreadyExists => hint_exists,
        // sqlite's message already names the volumes it holds.
        io::ErrorKind::NotFound if !e.to_string().contains("it holds") => {
            "; `longwire list STORE-URI` shows what exists"
        }
        _ => "",
    };
    anyhow::anyhow!("{e}{hint}")
}

pub fn create(args: CreateArgs) -> anyhow::Result<()> {
    let opts = CreateOptions {
        size: args.size,
        chunk_size: args.chunk_size,
        compression: args.compression,
        replace: args.force,
    };
    let info = manage::create(&args.uri, &opts).map_err(|e| {
        advise(
            e,
            "; choose another name, or add --force to replace it (its data is lost)",
        )
    })?;
    if args.json {
        print_json(&Json::from(&info))
    } else {
        eprintln!("created {} ({})", info.uri, human_size(info.size));
        print_info(&info);
        Ok(())
    }
}

pub fn list(args: ListArgs) -> anyhow::Result<()> {
    let all = manage::list(&args.store).map_err(|e| advise(e, ""))?;
    if args.json {
        let json: Vec<Json> = all.iter().map(Json::from).collect();
        return print_json(&json);
    }
    if all.is_empty() {
        eprintln!("{} holds no volumes", args.store);
        return Ok(());
    }
    print!("{}", table(&all));
    Ok(())
}

pub fn info(args: InfoArgs) -> anyhow::Result<()> {
    let info = manage::info(&args.uri).map_err(|e| advise(e, ""))?;
    if args.json {
        print_json(&Json::from(&info))
    } else {
        print_info(&info);
        Ok(())
    }
}

pub fn delete(args: DeleteArgs) -> anyhow::Result<()> {
    let info = manage::info(&args.uri).map_err(|e| advise(e, ""))?;
    if info.allocated > 0 && !args.yes {
        bail!(
            "{} holds {} of data; deleting it cannot be undone. Add --yes to delete it",
            info.uri,
            human_size(info.allocated)
        );
    }
    let gone = manage::delete(&args.uri).map_err(|e| advise(e, ""))?;
    eprintln!(
        "deleted {} ({}, {} of data)",
        gone.uri,
        human_size(gone.size),
        human_size(gone.allocated)
    );
    Ok(())
}

/// `1.5 GiB (1610612736 bytes)`
fn bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n} bytes")
    } else {
        format!("{} ({n} bytes)", human_size(n))
    }
}

fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "0%".into()
    } else {
        format!("{:.0}%", part as f64 * 100.0 / whole as f64)
    }
}

fn print_info(v: &VolumeInfo) {
    let mut rows: Vec<(&str, String)> = vec![
        ("name", v.name.clone()),
        ("store", v.kind.to_string()),
        ("location", v.location.clone()),
        ("uri", v.uri.clone()),
        ("size", bytes(v.size)),
        (
            "allocated",
            format!(
                "{}, {} of the size",
                bytes(v.allocated),
                percent(v.allocated, v.size)
            ),
        ),
    ];
    if let Some(stored) = v.stored {
        rows.push(("stored", bytes(stored)));
    }
    if let Some(chunk) = v.chunk_size {
        rows.push(("chunk size", bytes(chunk)));
    }
    if let Some(c) = &v.compression {
        rows.push(("compression", c.clone()));
    }
    if let Some(n) = v.chunks {
        rows.push(("chunks", n.to_string()));
    }
    if let Some(c) = &v.created {
        rows.push(("created", c.clone()));
    }
    if v.block_device {
        rows.push(("device", "block device".into()));
    }
    if let Some(m) = &v.lease_mode {
        let why = match m.as_str() {
            "best-effort" => {
                " (the server ignores conditional writes: a later second writer is refused, \
                 one started at the same moment may not be)"
            }
            "conditional" => " (the server honours conditional writes)",
            _ => "",
        };
        rows.push(("lease mode", format!("{m}{why}")));
    }
    if let Some(l) = &v.lease {
        rows.push(("lease", l.clone()));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, val) in rows {
        println!("{k:width$}  {val}");
    }
}

/// One line per volume; chunk columns only when some volume has chunks.
fn table(all: &[VolumeInfo]) -> String {
    let chunked = all.iter().any(|v| v.chunk_size.is_some());
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut head = vec!["NAME", "SIZE", "ALLOCATED", "USED"];
    if chunked {
        head.extend(["STORED", "CHUNK", "COMPRESSION"]);
    }
    rows.push(head.iter().map(|s| s.to_string()).collect());
    for v in all {
        let mut row = vec![
            v.name.clone(),
            human_size(v.size),
            human_size(v.allocated),
            percent(v.allocated, v.size),
        ];
        if chunked {
            row.push(human_size(v.stored.unwrap_or(v.allocated)));
            row.push(v.chunk_size.map(human_size).unwrap_or_else(|| "-".into()));
            row.push(v.compression.clone().unwrap_or_else(|| "-".into()));
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(i, (c, w))| {
                // Names left-aligned, numbers right-aligned.
                if i == 0 || i >= 5 {
                    format!("{c:<w$}")
                } else {
                    format!("{c:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The JSON shape of a volume: sizes in bytes, absent facts as null.
#[derive(Serialize)]
struct Json<'a> {
    name: &'a str,
    store: &'static str,
    location: &'a str,
    uri: &'a str,
    size: u64,
    allocated: u64,
    stored: Option<u64>,
    chunk_size: Option<u64>,
    compression: Option<&'a str>,
    chunks: Option<u64>,
    created: Option<&'a str>,
    block_device: bool,
    lease_mode: Option<&'a str>,
    lease: Option<&'a str>,
}

impl<'a> From<&'a VolumeInfo> for Json<'a> {
    fn from(v: &'a VolumeInfo) -> Self {
        Json {
            name: &v.name,
            store: v.kind.as_str(),
            location: &v.location,
            uri: &v.uri,
            size: v.size,
            allocated: v.allocated,
            stored: v.stored,
            chunk_size: v.chunk_size,
            compression: v.compression.as_deref(),
            chunks: v.chunks,
            created: v.created.as_deref(),
            block_device: v.block_device,
            lease_mode: v.lease_mode.as_deref(),
            lease: v.lease.as_deref(),
        }
    }
}

fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use longwire_store::manage::StoreKind;

    #[test]
    fn table_aligns_and_shows_chunk_columns_only_when_needed() {
        let file = VolumeInfo {
            kind: StoreKind::File,
            name: "disk.img".into(),
            location: "d/disk.img".into(),
            uri: "file:d/disk.img".into(),
            size: 1 << 30,
            allocated: 1 << 20,
            stored: None,
            chunk_size: None,
            compression: None,
            chunks: None,
            created: None,
            block_device: false,
            lease_mode: None,
            lease: None,
        };
        let t = table(std::slice::from_ref(&file));
        assert_eq!(
            t,
            "NAME         SIZE  ALLOCATED  USED\ndisk.img  1.0 GiB    1.0 MiB    0%\n"
        );
        let sq = VolumeInfo {
            kind: StoreKind::Sqlite,
            name: "a".into(),
            chunk_size: Some(65536),
            compression: Some("zstd".into()),
            ..file.clone()
        };
        let t = table(&[file, sq]);
        assert!(t.starts_with("NAME"), "{t}");
        assert!(t.lines().nth(2).unwrap().ends_with("64.0 KiB  zstd"), "{t}");
    }
}
