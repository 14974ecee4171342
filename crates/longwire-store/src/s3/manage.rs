//! Volume management for `s3://` URIs: create, list, info, delete. Used
//! by `longwire volume …`; none of these serve I/O.

use bytes::Bytes;
use object_store::path::Path;
use object_store::PutMode;

use super::bucket::Bucket;
use super::lease::{self, LeaseMode, LeaseRecord};
use super::manifest::{self, Layout, Manifest};
use super::{connect, human, list_chunks, read_manifest, S3Options};

/// What `info` reports about one volume.
#[derive(Debug, Clone)]
pub struct S3Info {
    /// `s3://bucket/prefix`.
    pub name: String,
    pub size: u64,
    pub chunk_size: u64,
    pub compression: String,
    /// Chunks stored in the bucket.
    pub chunks: u64,
    /// Bytes of chunk objects in the bucket (after compression).
    pub stored_bytes: u64,
    /// Bytes of the volume that hold data (chunks × chunk size).
    pub allocated_bytes: u64,
    /// The current lease, if any (possibly expired).
    pub lease: Option<LeaseRecord>,
    /// Whether the server honours conditional writes (probed now).
    pub lease_mode: LeaseMode,
}

impl std::fmt::Display for S3Info {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "volume:      {}", self.name)?;
        writeln!(f, "size:        {} ({} bytes)", human(self.size), self.size)?;
        writeln!(f, "chunk size:  {}", human(self.chunk_size))?;
        writeln!(f, "compression: {}", self.compression)?;
        writeln!(
            f,
            "allocated:   {} in {} chunks ({} stored)",
            human(self.allocated_bytes),
            self.chunks,
            human(self.stored_bytes)
        )?;
        match &self.lease {
            Some(l) => writeln!(
                f,
                "lease:       {} ({} mode)",
                l.describe(),
                self.lease_mode.as_str()
            ),
            None => writeln!(f, "lease:       free ({} mode)", self.lease_mode.as_str()),
        }
    }
}

/// One volume found by [`list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3VolumeSummary {
    /// The volume's prefix inside the bucket.
    pub prefix: String,
    pub size: u64,
    pub allocated_bytes: u64,
}

/// Create the volume (`opts.size` required); refused if it exists.
pub async fn create(opts: &S3Options) -> Result<Manifest, String> {
    let display = opts.display();
    let size = opts
        .size
        .filter(|&s| s > 0)
        .ok_or_else(|| format!("{display}: give the new volume a size, e.g. &size=10G"))?;
    let (bucket, layout) = connect(opts)?;
    if read_manifest(&bucket, &layout, &display).await?.is_some() {
        return Err(format!("{display} already exists"));
    }
    let m = Manifest::new(
        size,
        opts.chunk_size.unwrap_or(manifest::DEFAULT_CHUNK_SIZE),
        opts.compression.unwrap_or_default(),
    );
    // Create-only where the server honours it; a racing creator then fails here.
    match bucket
        .put(
            &layout.manifest(),
            Bytes::from(m.to_json()),
            PutMode::Create,
        )
        .await
    {
        Ok(_) => {}
        Err(object_store::Error::AlreadyExists { .. }) => {
            return Err(format!("{display} already exists"))
        }
        Err(object_store::Error::NotImplemented) => {
            bucket
                .put(
                    &layout.manifest(),
                    Bytes::from(m.to_json()),
                    PutMode::Overwrite,
                )
                .await
                .map_err(|e| format!("{display}: cannot create it in {}: {e}", bucket.name))?;
        }
        Err(e) => {
            return Err(format!(
                "{display}: cannot create it in {}: {e}",
                bucket.name
            ))
        }
    }
    Ok(m)
}

/// Volumes under `opts.prefix` (empty: the whole bucket), with sizes.
pub async fn list(opts: &S3Options) -> Result<Vec<S3VolumeSummary>, String> {
    let store = opts.build_store()?;
    let bucket = super::connect_store(store, opts);
    let under = opts.prefix.trim_matches('/');
    let prefix = if under.is_empty() {
        None
    } else {
        Some(Path::from(under))
    };
    let objects = match &prefix {
        Some(p) => bucket.list(p).await,
        None => bucket.list(&Path::default()).await,
    }
    .map_err(|e| {
        format!(
            "s3://{}/{under}: cannot list {}: {e}",
            opts.bucket, bucket.name
        )
    })?;
    let mut out = Vec::new();
    for m in &objects {
        let key = m.location.as_ref();
        let Some(vol) = key.strip_suffix(&format!("/{}", manifest::MANIFEST)) else {
            continue;
        };
        let layout = Layout::new(vol)?;
        let display = format!("s3://{}/{vol}", opts.bucket);
        let Ok(Some(man)) = read_manifest(&bucket, &layout, &display).await else {
            continue;
        };
        let chunks = objects
            .iter()
            .filter(|o| layout.chunk_index(&o.location).is_some())
            .count() as u64;
        out.push(S3VolumeSummary {
            prefix: vol.to_string(),
            size: man.size,
            allocated_bytes: chunks * man.chunk_size,
        });
    }
    out.sort_by(|a, b| a.prefix.cmp(&b.prefix));
    Ok(out)
}

/// Size, chunking, allocation and lease of one volume.
pub async fn info(opts: &S3Options) -> Result<S3Info, String> {
    let display = opts.display();
    let (bucket, layout) = connect(opts)?;
    info_with(&bucket, &layout, &display).await
}

pub(crate) async fn info_with(
    bucket: &Bucket,
    layout: &Layout,
    display: &str,
) -> Result<S3Info, String> {
    let m = read_manifest(bucket, layout, display)
        .await?
        .ok_or_else(|| format!("{display} does not exist"))?;
    let chunks = list_chunks(bucket, layout, display).await?;
    let lease = lease::read(bucket, layout).await?;
    let lease_mode = lease::probe(bucket, layout).await?;
    Ok(S3Info {
        name: display.to_string(),
        size: m.size,
        chunk_size: m.chunk_size,
        compression: m.compression.clone(),
        chunks: chunks.len() as u64,
        stored_bytes: chunks.iter().map(|(_, s)| s).sum(),
        allocated_bytes: chunks.len() as u64 * m.chunk_size,
        lease,
        lease_mode,
    })
}

/// Delete every object of the volume. Refused while a server holds its
/// lease (stop the server first).
pub async fn delete(opts: &S3Options) -> Result<u64, String> {
    let display = opts.display();
    let (bucket, layout) = connect(opts)?;
    delete_with(&bucket, &layout, &display).await
}

pub(crate) async fn delete_with(
    bucket: &Bucket,
    layout: &Layout,
    display: &str,
) -> Result<u64, String> {
    if read_manifest(bucket, layout, display).await?.is_none() {
        return Err(format!("{display} does not exist"));
    }
    if let Some(l) = lease::read(bucket, layout).await? {
        if l.is_live() {
            return Err(format!(
                "{display} is in use ({}); stop that server before deleting the volume",
                l.describe()
            ));
        }
    }
    let dir = Path::from(layout.prefix.as_str());
    let objects = bucket
        .list(&dir)
        .await
        .map_err(|e| format!("{display}: cannot list it in {}: {e}", bucket.name))?;
    let mut n = 0;
    // The manifest goes last, so an interrupted delete still shows up as a volume.
    let (manifests, rest): (Vec<_>, Vec<_>) = objects
        .into_iter()
        .partition(|o| o.location == layout.manifest());
    for o in rest.iter().chain(manifests.iter()) {
        bucket
            .delete(&o.location)
            .await
            .map_err(|e| format!("{display}: cannot delete {}: {e}", o.location))?;
        n += 1;
    }
    Ok(n)
}

// Adapters for `crate::manage`, whose functions are blocking and return
// `VolumeInfo`. Each runs the async call on a private runtime in its own
// thread, so it works from plain threads and from inside a runtime alike.

use crate::manage::{StoreKind, VolumeInfo};
use crate::sqlite::Compression;
use crate::uri::Spec;
use std::io;

fn run<T: Send + 'static>(
    fut: impl std::future::Future<Output = Result<T, String>> + Send + 'static,
) -> io::Result<T> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(fut)
    })
    .join()
    .map_err(|_| io::Error::other("the S3 request thread panicked"))?
    .map_err(|msg| {
        let kind = if msg.contains("does not exist") {
            io::ErrorKind::NotFound
        } else if msg.contains("already exists") {
            io::ErrorKind::AlreadyExists
        } else {
            io::ErrorKind::Other
        };
        io::Error::new(kind, msg)
    })
}

fn s3_opts(spec: &Spec) -> S3Options {
    spec.s3
        .clone()
        .expect("an s3: target always has s3 options")
}

/// The volume's URI as `list` and `info` show it: bucket, prefix, endpoint.
fn shown_uri(opts: &S3Options) -> String {
    match &opts.endpoint {
        Some(e) => format!("{}?endpoint={e}", opts.display()),
        None => opts.display(),
    }
}

fn volume_info(opts: &S3Options, i: &S3Info) -> VolumeInfo {
    VolumeInfo {
        kind: StoreKind::S3,
        name: opts.prefix.clone(),
        location: format!("s3://{}", opts.bucket),
        uri: shown_uri(opts),
        size: i.size,
        allocated: i.allocated_bytes,
        stored: Some(i.stored_bytes),
        chunk_size: Some(i.chunk_size),
        compression: Some(i.compression.clone()),
        chunks: Some(i.chunks),
        created: None,
        block_device: false,
        lease_mode: Some(i.lease_mode.as_str().to_string()),
        lease: Some(match &i.lease {
            Some(l) if l.is_live() => l.describe(),
            Some(l) => format!("free (expired or stale record of {})", l.describe()),
            None => "free".into(),
        }),
    }
}

pub(crate) fn create_blocking(
    uri: &str,
    spec: &Spec,
    size: u64,
    chunk_size: Option<u64>,
    compression: Option<Compression>,
    replace: bool,
) -> io::Result<VolumeInfo> {
    let mut opts = s3_opts(spec);
    opts.size = Some(size);
    opts.chunk_size = chunk_size;
    opts.compression = compression;
    let o = opts.clone();
    let uri = uri.to_string();
    let info = run(async move {
        if replace {
            match delete(&o).await {
                Ok(_) => {}
                Err(e) if e.contains("does not exist") => {}
                Err(e) => return Err(format!("{uri}: {e}")),
            }
        }
        create(&o).await.map_err(|e| format!("{uri}: {e}"))?;
        info(&o).await.map_err(|e| format!("{uri}: {e}"))
    })?;
    Ok(volume_info(&opts, &info))
}

pub(crate) fn info_blocking(uri: &str, spec: &Spec) -> io::Result<VolumeInfo> {
    let opts = s3_opts(spec);
    let o = opts.clone();
    let uri = uri.to_string();
    let i = run(async move { info(&o).await.map_err(|e| format!("{uri}: {e}")) })?;
    Ok(volume_info(&opts, &i))
}

pub(crate) fn delete_blocking(uri: &str, spec: &Spec) -> io::Result<VolumeInfo> {
    let opts = s3_opts(spec);
    let o = opts.clone();
    let uri = uri.to_string();
    let i = run(async move {
        let i = info(&o).await.map_err(|e| format!("{uri}: {e}"))?;
        delete(&o).await.map_err(|e| format!("{uri}: {e}"))?;
        Ok(i)
    })?;
    Ok(volume_info(&opts, &i))
}

pub(crate) fn list_blocking(store_uri: &str, spec: &Spec) -> io::Result<Vec<VolumeInfo>> {
    let opts = s3_opts(spec);
    let o = opts.clone();
    let uri = store_uri.to_string();
    let found = run(async move { list(&o).await.map_err(|e| format!("{uri}: {e}")) })?;
    Ok(found
        .into_iter()
        .map(|v| {
            let mut one = opts.clone();
            one.prefix = v.prefix.clone();
            VolumeInfo {
                kind: StoreKind::S3,
                name: v.prefix.clone(),
                location: format!("s3://{}", opts.bucket),
                uri: shown_uri(&one),
                size: v.size,
                allocated: v.allocated_bytes,
                stored: None,
                chunk_size: None,
                compression: None,
                chunks: None,
                created: None,
                block_device: false,
                lease_mode: None,
                lease: None,
            }
        })
        .collect())
}
