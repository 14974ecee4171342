//! Layers named on an export URI: `file:disk.img?clone-from=nbd://old/disk`,
//! `file:disk.img?mirror=nbd://replica:10809/disk`.
//!
//! The store's URI parser rejects parameters it does not know, so the
//! layer parameters are split off first ([`split`]), the store is opened
//! from what is left, and the layer wraps it. Layer state (bitmaps) lives
//! beside a `file:` volume (`PATH.clone-bitmap`, `PATH.mirror-meta`,
//! `PATH.mirror-bitmap`); other stores need a
//! `state=DIR` parameter saying where.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use longwire_core::Volume;
use longwire_nbd::client::{ClientConfig, NbdVolume, ReconnectPolicy};
use longwire_replica::clone::{self, CloneConfig, CloneVolume};
use longwire_replica::mirror::{
    connector_fn, Mirror, MirrorMode, MirrorOptions, ReplicaConnector, StatePaths,
};
use longwire_store::OpenedVolume;
use tracing::info;

/// Parameters this module takes off an export URI.
const LAYER_PARAMS: &[&str] = &[
    "clone-from",
    "clone-timeout",
    "state",
    "mirror",
    "mirror-mode",
    "mirror-region",
    "mirror-timeout",
    "mirror-lag",
    "resync-rate",
];

/// An export URI with its layer parameters taken off.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Layered {
    /// The store URI, as [`longwire_store::open_uri`] reads it.
    pub store: String,
    /// `clone-from=URI`: fill the volume from this source (percent-decoded).
    pub clone_from: Option<String>,
    /// `clone-timeout=SECS`: how long a read waits for the source.
    pub clone_timeout: Option<Duration>,
    /// `state=DIR`: where layer state files live (stores that are not one file).
    pub state: Option<PathBuf>,
    /// `mirror=URI` and its tunables: keep a replica of the volume there.
    pub mirror: Option<MirrorParams>,
}

/// `mirror=URI&mirror-mode=sync|async&mirror-region=64K&resync-rate=50M&mirror-timeout=5&mirror-lag=64M`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MirrorParams {
    /// The replica: an `nbd://`/`nbd+unix://` URI (percent-decoded), or any store URI.
    pub uri: String,
    pub mode: Option<MirrorMode>,
    pub region_size: Option<u64>,
    pub resync_rate: Option<u64>,
    /// How long one request to the replica may take before the mirror degrades.
    pub timeout: Option<Duration>,
    pub max_lag: Option<u64>,
}

/// Split the layer parameters off `uri`.
pub fn split(uri: &str) -> anyhow::Result<Layered> {
    let Some((base, query)) = uri.split_once('?') else {
        return Ok(Layered {
            store: uri.to_string(),
            ..Layered::default()
        });
    };
    let mut out = Layered::default();
    let mut kept: Vec<&str> = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').unwrap_or((part, ""));
        if !LAYER_PARAMS.contains(&key) {
            kept.push(part);
            continue;
        }
        if value.is_empty() {
            bail!("{uri}: parameter {key:?} needs a value, e.g. {key}=…");
        }
        let value = percent_decode(value).map_err(|e| anyhow!("{uri}: {key}: {e}"))?;
        let twice = || anyhow!("{uri}: parameter {key:?} is given twice");
        match key {
            "clone-from" => out
                .clone_from
                .replace(value)
                .map_or(Ok(()), |_| Err(twice()))?,
            "clone-timeout" => {
                let secs: f64 = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| anyhow!("{uri}: clone-timeout={value} is not a number of seconds, e.g. clone-timeout=30"))?;
                out.clone_timeout
                    .replace(Duration::from_secs_f64(secs))
                    .map_or(Ok(()), |_| Err(twice()))?
            }
            "state" => out
                .state
                .replace(PathBuf::from(value))
                .map_or(Ok(()), |_| Err(twice()))?,
            "mirror" => {
                let m = out.mirror.get_or_insert_with(MirrorParams::default);
                if !m.uri.is_empty() {
                    return Err(twice());
                }
                m.uri = value
            }
            _ => mirror_param(
                out.mirror.get_or_insert_with(MirrorParams::default),
                uri,
                key,
                &value,
            )?,
        }
    }
    if out.clone_from.is_none() && out.clone_timeout.is_some() {
        bail!("{uri}: clone-timeout only goes with clone-from");
    }
    if out.mirror.as_ref().is_some_and(|m| m.uri.is_empty()) {
        bail!("{uri}: mirror-mode, mirror-region, mirror-timeout, mirror-lag and resync-rate only go with mirror=URI");
    }
    if out.mirror.is_some() && out.clone_from.is_some() {
        bail!("{uri}: a volume cannot be both a clone (clone-from) and a mirror (mirror) yet; clone first, then mirror");
    }
    out.store = if kept.is_empty() {
        base.to_string()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok(out)
}

/// Open the volume an export URI describes: the store, wrapped in the
/// layers its parameters ask for. `export` names it in messages.
pub async fn open(uri: &str, export: &str) -> anyhow::Result<OpenedVolume> {
    let layered = split(uri)?;
    if let Some(source) = &layered.clone_from {
        return open_clone(
            &layered,
            source,
            export,
            CloneOptions {
                timeout: layered.clone_timeout,
                progress: false,
            },
        )
        .await
        .map(|(opened, _)| opened);
    }
    if let Some(mirror) = &layered.mirror {
        return open_mirror(&layered, mirror, export).await;
    }
    longwire_store::open_uri(&layered.store)
        .await
        .map_err(|msg| anyhow!(msg))
}

/// One `mirror-*` tunable.
fn mirror_param(m: &mut MirrorParams, uri: &str, key: &str, value: &str) -> anyhow::Result<()> {
    let size =
        |what: &str| longwire_store::parse_size(value).map_err(|e| anyhow!("{uri}: {what}: {e}"));
    let twice = || anyhow!("{uri}: parameter {key:?} is given twice");
    match key {
        "mirror-mode" => {
            let mode = MirrorMode::parse(value)
                .ok_or_else(|| anyhow!("{uri}: mirror-mode={value} is not known; use sync (acknowledge when both copies have a write) or async"))?;
            m.mode.replace(mode).map_or(Ok(()), |_| Err(twice()))
        }
        "mirror-region" => {
            let n = size("mirror-region")?;
            if n < 4096 || !n.is_power_of_two() {
                bail!(
                    "{uri}: mirror-region={value} must be a power of two of at least 4K, e.g. 64K"
                );
            }
            m.region_size.replace(n).map_or(Ok(()), |_| Err(twice()))
        }
        "resync-rate" => m
            .resync_rate
            .replace(size("resync-rate")?)
            .map_or(Ok(()), |_| Err(twice())),
        "mirror-lag" => m
            .max_lag
            .replace(size("mirror-lag")?.max(4096))
            .map_or(Ok(()), |_| Err(twice())),
        "mirror-timeout" => {
            let secs: f64 = value
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s > 0.0)
                .ok_or_else(|| anyhow!("{uri}: mirror-timeout={value} is not a number of seconds, e.g. mirror-timeout=5"))?;
            m.timeout
                .replace(Duration::from_secs_f64(secs))
                .map_or(Ok(()), |_| Err(twice()))
        }
        _ => unreachable!("listed in LAYER_PARAMS"),
    }
}

/// Open `layered.store` and wrap it in a [`Mirror`] to `params.uri`.
async fn open_mirror(
    layered: &Layered,
    params: &MirrorParams,
    export: &str,
) -> anyhow::Result<OpenedVolume> {
    let store = &layered.store;
    let paths = match (&layered.state, scheme(store).as_str()) {
        (Some(dir), _) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating the state directory {}", dir.display()))?;
            StatePaths::in_dir(dir)
        }
        (None, "file") => StatePaths::beside(&file_path(store)?),
        (None, _) => bail!(
            "{store}: a mirror keeps its metadata and dirty-region bitmap beside the volume, which only works for \
             file: volumes; add &state=DIR naming a directory for them (one per export)"
        ),
    };
    let opened = longwire_store::open_uri(store)
        .await
        .map_err(|msg| anyhow!(msg))?;
    let mut opts = MirrorOptions::default();
    if let Some(m) = params.mode {
        opts.mode = m;
    }
    if let Some(n) = params.region_size {
        opts.region_size = n;
    }
    if let Some(n) = params.resync_rate {
        opts.resync_rate = n;
    }
    if let Some(n) = params.max_lag {
        opts.max_lag = n;
    }
    let timeout = params.timeout.unwrap_or(MIRROR_TIMEOUT);
    opts.connect_timeout = timeout.max(Duration::from_secs(1)) * 2;
    let connector = replica_connector(&params.uri, timeout);
    let mirror = Mirror::open(opened.volume, connector, paths.clone(), opts.clone())
        .map_err(|e| anyhow!("{store}: mirror to {}: {e}", params.uri))?;
    info!(
        export,
        "export {export:?}: mirrored to {} ({} mode, {} regions, resync at most {}/s; state in {})",
        params.uri,
        opts.mode,
        crate::units::human_size(opts.region_size),
        crate::units::human_size(opts.resync_rate),
        paths.meta.display()
    );
    Ok(OpenedVolume {
        volume: Arc::new(mirror),
        description: opened.description,
    })
}

/// How long one request to a replica may take (default of `mirror-timeout`).
const MIRROR_TIMEOUT: Duration = Duration::from_secs(5);

/// A fresh connection per attempt. For NBD the client does not reconnect
/// by itself and every request has a short deadline: a replica that dies
/// or stalls fails the request, the mirror degrades and goes on locally,
/// and its own supervisor reconnects and resyncs.
fn replica_connector(uri: &str, timeout: Duration) -> Box<dyn ReplicaConnector> {
    let target = uri.to_string();
    if scheme(uri).starts_with("nbd") {
        return connector_fn(target.clone(), move || {
            let uri = target.clone();
            async move {
                let config = ClientConfig {
                    request_timeout: timeout,
                    connect_timeout: timeout,
                    reconnect: ReconnectPolicy {
                        enabled: false,
                        ..ReconnectPolicy::default()
                    },
                    ..ClientConfig::default()
                };
                let v = NbdVolume::connect(&uri, config)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(Arc::new(v) as Arc<dyn Volume>)
            }
        });
    }
    connector_fn(target.clone(), move || {
        let uri = target.clone();
        async move { longwire_store::open_uri(&uri).await.map(|o| o.volume) }
    })
}

/// How a clone is opened.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloneOptions {
    /// How long a read of a region not copied yet waits for the source.
    pub timeout: Option<Duration>,
    /// Say nothing in the log when starting (the caller shows progress).
    pub progress: bool,
}

/// Open `layered.store` as a clone of `source` (an `nbd://` URI or any
/// store URI). A clone whose bitmap says it is complete does not contact
/// the source at all. Returns the volume and the clone layer itself.
pub async fn open_clone(
    layered: &Layered,
    source: &str,
    export: &str,
    opts: CloneOptions,
) -> anyhow::Result<(OpenedVolume, Arc<CloneVolume>)> {
    let store = &layered.store;
    let mut config = CloneConfig::default();
    if let Some(t) = opts.timeout {
        config.fetch_timeout = t;
    }
    let scheme = scheme(store);
    let (bitmap_path, ephemeral) = match (&layered.state, scheme.as_str()) {
        (Some(dir), _) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating the state directory {}", dir.display()))?;
            (clone::bitmap_in_dir(dir), false)
        }
        (None, "file") => (clone::bitmap_beside(&file_path(store)?), false),
        // Nothing to resume: a memory volume starts empty every time.
        (None, "memory") => (std::env::temp_dir().join(format!("longwire-clone-{}-{export}.bitmap", std::process::id())), true),
        (None, _) => bail!(
            "{store}: a clone keeps a hydration bitmap beside the volume, which only works for file: volumes; \
             add &state=DIR naming a directory for it"
        ),
    };
    if ephemeral {
        let _ = std::fs::remove_file(&bitmap_path);
    }

    // A finished clone is an ordinary local volume: no source needed.
    let local_size = existing_size(store).await;
    let complete = match local_size {
        Some(size) if bitmap_path.exists() => {
            clone::is_complete(&bitmap_path, size, &config).map_err(|e| anyhow!("{e}"))?
        }
        _ => false,
    };
    let src: Option<Arc<dyn Volume>> = if complete {
        info!(
            export,
            "export {export:?}: the clone of {source} is complete; the source is not contacted"
        );
        None
    } else {
        Some(open_source(source).await?)
    };
    let mut store_uri = store.clone();
    if let Some(src) = &src {
        store_uri = with_size(&store_uri, src.size());
    }
    let opened = longwire_store::open_uri(&store_uri)
        .await
        .map_err(|msg| anyhow!(msg))?;
    let bitmap = clone::open_bitmap(&bitmap_path, opened.volume.size(), &config)
        .map_err(|e| anyhow!("{e}"))?;
    if ephemeral {
        let _ = std::fs::remove_file(&bitmap_path);
    }
    let layer = Arc::new(
        CloneVolume::new(opened.volume, src, bitmap, config)
            .map_err(|e| anyhow!("{store}: {e}"))?,
    );
    if !complete && !opts.progress {
        let p = layer.progress();
        info!(
            export,
            "export {export:?}: a clone of {source}, served now and filled in the background; {} (bitmap {})",
            p.detail(),
            bitmap_path.display()
        );
    }
    let volume: Arc<dyn Volume> = layer.clone();
    Ok((
        OpenedVolume {
            volume,
            description: opened.description,
        },
        layer,
    ))
}

/// The clone's source: an NBD export through the reconnecting client, or
/// any store URI (opened read-only).
async fn open_source(source: &str) -> anyhow::Result<Arc<dyn Volume>> {
    if scheme(source).starts_with("nbd") {
        // Retry forever in the background: the clone must outlive long
        // outages. Each request still fails at its deadline, which is
        // shorter than the clone's own wait, so a dead source never wedges
        // local I/O.
        let config = ClientConfig {
            request_timeout: Duration::from_secs(20),
            reconnect: ReconnectPolicy {
                give_up_after: None,
                max_delay: Duration::from_secs(5),
                ..ReconnectPolicy::default()
            },
            connections: 4,
            ..ClientConfig::default()
        };
        let vol = NbdVolume::connect(source, config)
            .await
            .with_context(|| format!("connecting to the clone's source {source} (it must be reachable until hydration completes)"))?;
        return Ok(Arc::new(vol));
    }
    let sep = if source.contains('?') { '&' } else { '?' };
    let opened = longwire_store::open_uri(&format!("{source}{sep}readonly=true"))
        .await
        .map_err(|msg| anyhow!("the clone's source: {msg}"))?;
    Ok(opened.volume)
}

/// The size of the volume `store` names if it already exists (file: only;
/// other stores are opened to find out, which creates nothing without a
/// size).
async fn existing_size(store: &str) -> Option<u64> {
    match scheme(store).as_str() {
        "file" => std::fs::metadata(file_path(store).ok()?)
            .ok()
            .map(|m| m.len())
            .filter(|n| *n > 0),
        "memory" => None,
        _ => longwire_store::open_uri(store)
            .await
            .ok()
            .map(|o| o.volume.size()),
    }
}

/// `file:`/`sqlite:` URIs without `size=` get the source's size, so a new
/// local volume is created to match.
fn with_size(uri: &str, size: u64) -> String {
    let query = uri.split_once('?').map(|(_, q)| q).unwrap_or("");
    let has_size = query
        .split('&')
        .any(|p| p.split('=').next() == Some("size"));
    if has_size || !matches!(scheme(uri).as_str(), "file" | "sqlite" | "memory") {
        return uri.to_string();
    }
    let sep = if uri.contains('?') { '&' } else { '?' };
    format!("{uri}{sep}size={size}")
}

fn scheme(uri: &str) -> String {
    uri.split_once(':')
        .map(|(s, _)| s.to_ascii_lowercase())
        .unwrap_or_default()
}

/// The path of a `file:` URI (the forms the store accepts).
fn file_path(uri: &str) -> anyhow::Result<PathBuf> {
    let rest = uri.split_once(':').map(|(_, r)| r).unwrap_or("");
    let path = rest.split_once('?').map(|(p, _)| p).unwrap_or(rest);
    let path = path
        .strip_prefix("//localhost")
        .or_else(|| path.strip_prefix("//"))
        .unwrap_or(path);
    let bytes = percent_decode(path).map_err(|e| anyhow!("{uri}: {e}"))?;
    Ok(Path::new(&bytes).to_path_buf())
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let byte = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    format!("bad percent escape in {s:?} (write %25 for a literal %)")
                })?;
            out.push(byte);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("{s:?} is not valid UTF-8 once decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_layer_params_off() {
        let l = split(
            "file:/srv/d.img?size=1G&clone-from=nbd://old:10809/disk&clone-timeout=5&description=x",
        )
        .unwrap();
        assert_eq!(l.store, "file:/srv/d.img?size=1G&description=x");
        assert_eq!(l.clone_from.as_deref(), Some("nbd://old:10809/disk"));
        assert_eq!(l.clone_timeout, Some(Duration::from_secs(5)));
        let l = split(
            "sqlite:v.db?volume=a&state=/var/lib/lw&clone-from=nbd%2Bunix:///d%3Fsocket%3D/s",
        )
        .unwrap();
        assert_eq!(l.store, "sqlite:v.db?volume=a");
        assert_eq!(l.clone_from.as_deref(), Some("nbd+unix:///d?socket=/s"));
        assert_eq!(l.state, Some(PathBuf::from("/var/lib/lw")));
        assert_eq!(
            split("memory:?size=1G").unwrap(),
            Layered {
                store: "memory:?size=1G".into(),
                ..Layered::default()
            }
        );
        assert!(split("file:a?clone-from=")
            .unwrap_err()
            .to_string()
            .contains("needs a value"));
        assert!(split("file:a?clone-from=x&clone-from=y")
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(split("file:a?clone-from=x&clone-timeout=soon")
            .unwrap_err()
            .to_string()
            .contains("seconds"));
        assert!(split("file:a?clone-timeout=3")
            .unwrap_err()
            .to_string()
            .contains("only goes with clone-from"));
    }

    #[test]
    fn splits_mirror_params_off() {
        let l = split("file:d.img?size=1G&mirror=nbd://r:10809/disk&mirror-mode=async&mirror-region=1M&resync-rate=10M&mirror-timeout=2.5&mirror-lag=8M").unwrap();
        assert_eq!(l.store, "file:d.img?size=1G");
        let m = l.mirror.unwrap();
        assert_eq!(m.uri, "nbd://r:10809/disk");
        assert_eq!(m.mode, Some(MirrorMode::Async));
        assert_eq!(m.region_size, Some(1 << 20));
        assert_eq!(m.resync_rate, Some(10 << 20));
        assert_eq!(m.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(m.max_lag, Some(8 << 20));
        assert!(split("file:a?mirror-mode=sync")
            .unwrap_err()
            .to_string()
            .contains("only go with mirror"));
        assert!(split("file:a?mirror=x&mirror-mode=later")
            .unwrap_err()
            .to_string()
            .contains("sync"));
        assert!(split("file:a?mirror=x&mirror-region=3K")
            .unwrap_err()
            .to_string()
            .contains("power of two"));
        assert!(split("file:a?mirror=x&mirror=y")
            .unwrap_err()
            .to_string()
            .contains("twice"));
        assert!(split("file:a?mirror=x&clone-from=y")
            .unwrap_err()
            .to_string()
            .contains("both"));
    }

    #[test]
    fn file_paths_and_sizes() {
        assert_eq!(
            file_path("file:///srv/a%20b.img?size=1G").unwrap(),
            PathBuf::from("/srv/a b.img")
        );
        assert_eq!(file_path("file:rel.img").unwrap(), PathBuf::from("rel.img"));
        assert_eq!(with_size("file:a.img", 5), "file:a.img?size=5");
        assert_eq!(with_size("file:a.img?size=1G", 5), "file:a.img?size=1G");
        assert_eq!(
            with_size("sqlite:v.db?volume=a", 5),
            "sqlite:v.db?volume=a&size=5"
        );
    }
}
